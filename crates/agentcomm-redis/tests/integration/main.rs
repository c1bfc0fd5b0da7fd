//! The Redis integration tests, in one test binary: each module was a test binary of its own, and every
//! binary linked the whole dependency graph again. Run one module's tests with
//! `cargo test -p agentcomm-redis --test integration <module>::`.
//!
//! Files that need a process of their own stay beside this directory: `closing.rs` and `secrets.rs`
//! install a process-wide `log` bridge, and `script_order.rs` flushes the shared Redis's script cache.

#[path = "../common/mod.rs"]
mod common;

mod auth;
mod conformance;
mod outside_tokio;
mod pubsub;
mod reconnect;
mod sentinel;
mod streams;
mod tls;
