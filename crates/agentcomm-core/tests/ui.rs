//! Misuses the macros must refuse, with messages that name the agent, the type and the fix.
//! The `.stderr` files next to each case are what users see; refresh with `TRYBUILD=overwrite`.

#[test]
fn misuse_does_not_compile() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/*.rs");
}
