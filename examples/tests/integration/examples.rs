//! The examples run end to end on the in-memory router, and say what they did.

use std::sync::Arc;

use agentcomm_core::MemoryRouter;
use agentcomm_examples::{game, payment};

#[tokio::test]
async fn the_payment_example_answers_every_request_and_refuses_the_invalid_one() {
    let mut out = Vec::new();
    let summary = payment::run(Arc::new(MemoryRouter::new()), &mut out)
        .await
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    let verdicts: Vec<(bool, &str)> = summary
        .answers
        .iter()
        .map(|(_, _, answer)| (answer.success, answer.transaction_id.as_str()))
        .collect();
    assert_eq!(
        verdicts,
        vec![
            (true, "TXN000001"),
            (true, "TXN000002"),
            (false, ""),
            (false, ""),
            (true, "TXN000003")
        ],
        "{text}"
    );
    assert_eq!(summary.refused.len(), 1);
    assert!(
        summary.refused[0]
            .1
            .contains("field `amount` breaks rule `min`"),
        "{text}"
    );
    assert_eq!((summary.handled, summary.dead_lettered), (5, 0));
    assert!(text.contains("session456  user123  $   100.00  credit_card  -> approved TXN000001 Payment of $100.00 processed successfully"), "{text}");
    assert!(text.contains("shut down cleanly"), "{text}");
}

#[tokio::test]
async fn the_game_example_starts_a_match_for_every_pair_of_players() {
    let mut out = Vec::new();
    let scoreboard = game::run(Arc::new(MemoryRouter::new()), 6, &mut out)
        .await
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    let started = scoreboard.started.lock().unwrap().clone();
    assert_eq!(started.len(), 6, "{text}");
    let mut matches: Vec<&String> = started.iter().map(|(_, m)| m).collect();
    matches.sort();
    matches.dedup();
    assert_eq!(matches.len(), 3, "three matches of two: {text}");
    assert!(text.contains("all 6 players are playing"), "{text}");
}

/// The payment binary as a user runs it, in a directory whose `.env` sets LOG_LEVEL=INFO: its JSON
/// Lines logs come out, though the process environment names no level.
#[test]
fn the_log_level_in_dot_env_reaches_the_logs() {
    let output = payment_with_dot_env(
        "LOG_LEVEL=INFO\nMESSAGING_BACKEND=memory\n",
        &["LOG_LEVEL", "MESSAGING_BACKEND"],
    );
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        stdout.contains("\"level\":\"INFO\"") && stdout.contains("\"message\":\"agent started\""),
        "{stdout}"
    );
}

/// A bad `REDIS_DELIVERY_MODE` in `.env` (a variable the Redis crate reads, not the configuration):
/// the error names the file, as it does for `MESSAGING_BACKEND` or `LOG_LEVEL`. It is refused before
/// any connection is made, so no Redis is needed.
#[test]
fn a_bad_delivery_mode_in_dot_env_names_the_file() {
    let output = payment_with_dot_env(
        "MESSAGING_BACKEND=redis\nREDIS_DELIVERY_MODE=kafka\n",
        &["MESSAGING_BACKEND", "REDIS_DELIVERY_MODE"],
    );
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("REDIS_DELIVERY_MODE (from .env)='kafka' is not valid"),
        "{stderr}"
    );
}

/// A `MESSAGING_BACKEND` that is not UTF-8 (a mangled deployment file) is refused, naming the
/// variable: it was read as unset, and the program ran on the in-memory router without a word.
#[cfg(unix)]
#[test]
fn a_backend_variable_that_is_not_utf8_is_refused_not_taken_for_unset() {
    use std::os::unix::ffi::OsStrExt;
    let backend = std::ffi::OsStr::from_bytes(b"re\xffdis");
    let output = payment_with("", &[], &[("MESSAGING_BACKEND", backend)]);
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("MESSAGING_BACKEND='re\u{FFFD}dis' is not valid"),
        "{stderr}"
    );
}

/// The payment binary run in a directory of its own whose `.env` holds `dot_env`, with `unset` removed
/// from its environment (so that the file's values are the ones read).
fn payment_with_dot_env(dot_env: &str, unset: &[&str]) -> std::process::Output {
    payment_with(dot_env, unset, &[])
}

/// [`payment_with_dot_env`], with `set` added to its environment.
fn payment_with(
    dot_env: &str,
    unset: &[&str],
    set: &[(&str, &std::ffi::OsStr)],
) -> std::process::Output {
    let dir = std::env::temp_dir().join(format!("agentcomm-dotenv-{}", uuid_like()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(".env"), dot_env).unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_payment"));
    command.current_dir(&dir);
    for name in unset {
        command.env_remove(name);
    }
    for (name, value) in set {
        command.env(name, value);
    }
    let output = command.output().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    output
}

/// A name of this test run's own, for its temporary directory.
fn uuid_like() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}
