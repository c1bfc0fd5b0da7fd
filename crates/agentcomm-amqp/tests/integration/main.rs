//! The RabbitMQ integration tests, in one test binary: each module was a test binary of its own, and
//! every binary linked the whole dependency graph again. Run one module's tests with
//! `cargo test -p agentcomm-amqp --test integration <module>::`.
//!
//! `common::Logs` installs this binary's global tracing subscriber (once, on first use); no other
//! module installs one. `secrets.rs` stays a binary of its own: it asserts on lines captured by a
//! subscriber of its own thread, which tests without one can silence (see its top).

mod common;

mod broker;
mod conformance;
mod connect_errors;
mod credentials;
mod reconnect;
mod tls;
