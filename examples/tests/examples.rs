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
    let dir = std::env::temp_dir().join(format!("agentcomm-dotenv-{}", uuid_like()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(".env"),
        "LOG_LEVEL=INFO\nMESSAGING_BACKEND=memory\n",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_payment"))
        .current_dir(&dir)
        .env_remove("LOG_LEVEL")
        .env_remove("MESSAGING_BACKEND")
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        stdout.contains("\"level\":\"INFO\"") && stdout.contains("\"message\":\"agent started\""),
        "{stdout}"
    );
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
