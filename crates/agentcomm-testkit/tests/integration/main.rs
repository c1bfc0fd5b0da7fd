//! The testkit's integration tests, in one test binary: each module was a test binary of its own, and
//! every binary linked the whole dependency graph again. Run one module's tests with
//! `cargo test -p agentcomm-testkit --test integration <module>::`.

mod brokers;
mod conformance_faults;
mod conformance_memory;
mod guide;
mod harness;
mod proxy;
