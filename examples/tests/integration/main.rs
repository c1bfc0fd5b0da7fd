//! The examples' tests, in one test binary (two binaries linked the whole dependency graph twice).

mod examples;
mod examples_on_brokers;
