//! The core integration tests, in one test binary: each module was a test binary of its own, and every
//! binary linked the whole dependency graph again. Run one module's tests with
//! `cargo test -p agentcomm-core --test integration <module>::`.
//!
//! Files that need a binary of their own stay beside this directory: `logging.rs` installs the global
//! subscriber (and reruns its own binary), `signals.rs` signals its own process, `runtime_logs.rs`
//! asserts on log lines the runtime tests here would reach first without a subscriber,
//! `crate_versions.rs` is left out of the published crate, and `ui.rs` is trybuild's.

#[path = "../common/mod.rs"]
mod common;

// `handlers.rs` has a `mod handlers` of its own (where the agent declared elsewhere is handled).
#[allow(clippy::module_inception)]
mod handlers;
mod hygiene;
mod memory;
mod messages;
mod retry_delays;
mod runtime;
mod runtime_faults;
mod secrets;
mod stopping;
