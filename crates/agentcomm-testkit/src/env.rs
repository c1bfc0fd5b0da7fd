//! The environment variables tests read: soak factor and whether brokers are required.

use std::fmt::Display;

/// `AGENTCOMM_SOAK`: a whole number ≥ 1 that multiplies the sizes of the conformance scenarios (and of
/// any test that uses [`scaled`]) for a longer soak run. Default 1.
pub const SOAK_VAR: &str = "AGENTCOMM_SOAK";

/// `AGENTCOMM_REQUIRE_BROKERS`: when `1`, a test whose broker is unreachable fails instead of printing
/// `skipped: ...` and passing.
pub const REQUIRE_BROKERS_VAR: &str = "AGENTCOMM_REQUIRE_BROKERS";

fn parse_soak(value: Option<&str>) -> Result<u32, String> {
    match value.map(str::trim) {
        None | Some("") => Ok(1),
        Some(text) => match text.parse::<u32>() {
            Ok(factor) if factor >= 1 => Ok(factor),
            _ => Err(format!(
                "{SOAK_VAR}='{text}' is not valid: expected a whole number of at least 1 (the factor that \
                 multiplies scenario sizes), or leave it unset for 1"
            )),
        },
    }
}

fn parse_require(value: Option<&str>) -> Result<bool, String> {
    match value.map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(false),
        Some(text) => match text.as_str() {
            "" | "0" | "false" | "no" => Ok(false),
            "1" | "true" | "yes" => Ok(true),
            _ => Err(format!(
                "{REQUIRE_BROKERS_VAR}='{text}' is not valid: use 1 to fail tests whose broker is unreachable, \
                 or 0 (or leave it unset) to skip them"
            )),
        },
    }
}

/// The soak factor from `AGENTCOMM_SOAK` (1 when unset). Panics with the fix when it is not a whole
/// number ≥ 1.
pub fn soak_factor() -> u32 {
    parse_soak(std::env::var(SOAK_VAR).ok().as_deref()).unwrap_or_else(|error| panic!("{error}"))
}

/// `size` times the soak factor.
pub fn scaled(size: usize) -> usize {
    size.saturating_mul(soak_factor() as usize)
}

/// Whether `AGENTCOMM_REQUIRE_BROKERS=1`. Panics with the fix when the value is not understood.
pub fn require_brokers() -> bool {
    parse_require(std::env::var(REQUIRE_BROKERS_VAR).ok().as_deref())
        .unwrap_or_else(|error| panic!("{error}"))
}

/// Call when a test cannot reach its broker: prints exactly one line `skipped: <reason>` and returns,
/// or fails the test when `AGENTCOMM_REQUIRE_BROKERS=1`.
///
/// ```no_run
/// # fn connect() -> Option<()> { None }
/// let Some(_client) = connect() else {
///     agentcomm_testkit::broker_unavailable("no Redis at redis://127.0.0.1:6379");
///     return;
/// };
/// ```
pub fn broker_unavailable(reason: impl Display) {
    if require_brokers() {
        panic!("{REQUIRE_BROKERS_VAR}=1, but {reason}");
    }
    println!("skipped: {reason}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soak_factors_are_whole_numbers_from_one() {
        assert_eq!(parse_soak(None), Ok(1));
        assert_eq!(parse_soak(Some(" 4 ")), Ok(4));
        for bad in ["0", "-2", "1.5", "lots"] {
            let error = parse_soak(Some(bad)).unwrap_err();
            assert!(
                error.starts_with(&format!("AGENTCOMM_SOAK='{bad}' is not valid")),
                "{error}"
            );
        }
    }

    #[test]
    fn require_brokers_reads_the_usual_spellings() {
        assert_eq!(parse_require(None), Ok(false));
        assert_eq!(parse_require(Some("1")), Ok(true));
        assert_eq!(parse_require(Some("TRUE")), Ok(true));
        assert_eq!(parse_require(Some("0")), Ok(false));
        assert!(
            parse_require(Some("maybe"))
                .unwrap_err()
                .contains("use 1 to fail")
        );
    }
}
