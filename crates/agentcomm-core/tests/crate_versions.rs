//! Two versions of one message crate in one build (`orders_v1 = { package = "orders", version = "1" }`
//! beside version 2, as a service that upgrades messages has): their `Order` types have one class name,
//! one module path (`orders`) and here the same line and column. `#[agent(...)]` refuses an agent that
//! receives one and sends the other (it would receive its own output) by comparing where the derive
//! met each type, so the two must differ there.
//!
//! A test binary of its own (not in `tests/integration`): the published crate leaves it out (`exclude`).

use agentcomm_core::Message;

#[test]
fn the_same_type_of_two_versions_of_a_crate_is_told_apart() {
    assert_eq!(
        <orders_v1::Order as Message>::CLASS,
        <orders_v2::Order as Message>::CLASS
    );
    assert_ne!(
        <orders_v1::Order as Message>::__DEFINED_AT,
        <orders_v2::Order as Message>::__DEFINED_AT,
        "an agent receiving orders_v1::Order and sending orders_v2::Order would compile, and loop"
    );
}

/// The two fixture crates are workspace members (path dependencies inside the workspace) whose
/// libraries have one name: `cargo doc` of the workspace stopped with "document output filename
/// collision" unless they are left out of the documentation.
#[test]
fn the_fixture_crates_are_left_out_of_the_documentation() {
    for manifest in [
        include_str!("fixtures/orders-v1/Cargo.toml"),
        include_str!("fixtures/orders-v2/Cargo.toml"),
    ] {
        assert!(
            manifest
                .lines()
                .any(|line| line.replace(' ', "") == "doc=false"),
            "{manifest}"
        );
    }
}
