//! The examples of agentcomm, as a library so that tests can run them on every backend.
//!
//! - [`payment`]: a PaymentAgent answers PaymentRequests; a client sends requests and prints the answers.
//! - [`game`]: a lobby, a matchmaker and player agents, each player in its own session.
//! - [`backend`]: the router named by `MESSAGING_BACKEND`.
//!
//! Run them with `cargo run -p agentcomm-examples --bin payment` and `--bin game`.

#![deny(missing_docs)]

pub mod backend;
pub mod game;
pub mod payment;
