//! # agentcomm-testkit
//!
//! What downstream crates use in their tests:
//!
//! - [`harness`]: [`TestHarness`] runs agents on an in-memory router (or any broker), sends them
//!   messages and asserts what they publish, reply and dead-letter, with failures that list what
//!   arrived instead. No sleeping: every wait is a wait-for-condition with a timeout.
//! - [`conformance`]: the suite every backend runs ([`conformance_tests!`]), scenario by scenario,
//!   counting what was lost, duplicated and reordered.
//! - [`memory`]: connections to one in-memory bus, so the in-memory router runs the suite too.
//! - [`tally`]: the counting of lost, duplicated and reordered messages, for your own tests.
//! - [`proxy`]: a fault-injecting TCP proxy to break broker connections on command.
//! - [`logs`]: capture the JSON log lines written while a future runs, and find which piece of a
//!   secret they (or any other text) show.
//!
//! See `docs/testing.md` for a walk-through.

#![deny(missing_docs)]

pub mod conformance;
pub mod harness;
pub mod logs;
pub mod memory;
pub mod proxy;
pub mod tally;

mod env;

pub use env::{
    REQUIRE_BROKERS_VAR, SOAK_VAR, broker_unavailable, require_brokers, scaled, soak_factor,
};
pub use harness::{DeadLetter, Expectation, ExpectationFailed, Received, TestHarness};

/// `docs/testing.md`, whose Rust examples compile (and run, where they do not need a broker) as
/// doctests of this crate, so that the guide cannot drift from the API. Its first example is a
/// `#[tokio::test]`, which a doctest never calls: `tests/integration/guide.rs` runs it, and checks
/// that it is still the guide's.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/testing.md")]
pub struct TestingGuide;
