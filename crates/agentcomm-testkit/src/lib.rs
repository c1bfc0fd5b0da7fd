//! # agentcomm-testkit
//!
//! What downstream crates use in their tests: a harness to run agents and assert what they publish,
//! the conformance suite every backend must pass, and a fault-injecting TCP proxy.

#![deny(missing_docs)]

pub mod proxy;
