//! Tests of `agentcomm_core::logging` that install the global subscriber, so they run in
//! this test binary's own process (or in a child process started by a test).

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use agentcomm_core::logging::{self, LogConfig, LoggingError, Rotation};
use serde_json::Value;

/// Set in the child processes started by `run_child`.
const CHILD_MARKER: &str = "AGENTCOMM_LOGGING_TEST_CHILD";

/// Runs the test `child_process` of this binary in a new process with `LOG_LEVEL` set to
/// `level`; returns its standard output.
fn run_child(level: &str) -> String {
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_MARKER, "1")
        .env("LOG_LEVEL", level)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap()
}

/// The JSON objects in `text` that start a line or follow other output.
fn json_lines(text: &str) -> Vec<Value> {
    text.match_indices("{\"timestamp\"")
        .map(|(start, _)| {
            let line = text[start..].lines().next().unwrap();
            serde_json::from_str(line).unwrap()
        })
        .collect()
}

/// Only does something in a child process started by `run_child`.
#[test]
fn child_process() {
    if std::env::var_os(CHILD_MARKER).is_none() {
        return;
    }
    match logging::try_init_from_env() {
        Ok(guard) => {
            tracing::info!("below the level");
            tracing::warn!(attempt = 3, "shown");
            log::info!("below the level, from the log crate");
            log::warn!("from the log crate");
            drop(guard);
        }
        Err(error) => println!("INIT FAILED: {error}"),
    }
}

#[test]
fn try_init_from_env_logs_to_stdout_at_the_log_level() {
    let lines = json_lines(&run_child("warning"));
    assert_eq!(lines.len(), 2, "{lines:?}");
    // What libraries log through the `log` crate (fred does) comes out the same way.
    assert_eq!(lines[1]["level"], "WARNING");
    assert_eq!(lines[1]["message"], "from the log crate");
    assert_eq!(lines[0]["level"], "WARNING");
    assert_eq!(lines[0]["message"], "shown");
    assert_eq!(lines[0]["attempt"], 3);
    assert!(lines[0]["file"].as_str().unwrap().ends_with("logging.rs"));
}

#[test]
fn try_init_from_env_rejects_an_invalid_log_level() {
    let stdout = run_child("loud");
    assert!(
        stdout.contains(
            "INIT FAILED: LOG_LEVEL='loud' is not a log level. Accepted values: TRACE, DEBUG, \
             INFO, WARNING (or WARN), ERROR"
        ),
        "{stdout}"
    );
}

#[test]
fn init_installs_the_global_subscriber_once() {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!(
        "agentcomm-logging-init-{}-{nanos}",
        std::process::id()
    ));
    let guard = logging::init(
        LogConfig::new()
            .filter("agentcomm_logging_test=debug,warn")
            .to_file(&dir, "agent", Rotation::Never),
    )
    .unwrap();

    let err = logging::init(LogConfig::new()).unwrap_err();
    assert!(matches!(err, LoggingError::AlreadyInitialized));
    assert!(err.to_string().contains("already installed"), "{err}");

    // Other threads log to the global subscriber too.
    std::thread::spawn(|| {
        for i in 0..1000 {
            tracing::debug!(target: "agentcomm_logging_test", i, "kept");
            tracing::info!(target: "other", i, "filtered out");
        }
    })
    .join()
    .unwrap();
    drop(guard);

    let text = std::fs::read_to_string(dir.join("agent.jsonl")).unwrap();
    let lines = json_lines(&text);
    assert_eq!(lines.len(), 1000);
    assert_eq!(text.lines().count(), 1000);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["i"], i);
        assert_eq!(line["level"], "DEBUG");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Set (to an env file's path) in the child process of
/// `a_configuration_warning_raised_before_logging_starts_is_logged_when_it_starts`.
const EARLY_CHILD_MARKER: &str = "AGENTCOMM_LOGGING_TEST_EARLY_ENV_FILE";

/// Only does something in that child: reads the configuration first, then starts logging, as the
/// examples and the README do.
#[test]
fn child_loading_the_configuration_before_logging() {
    let Some(path) = std::env::var_os(EARLY_CHILD_MARKER) else {
        return;
    };
    let config = agentcomm_core::config::Config::load_with_file(std::path::Path::new(&path));
    let guard = logging::try_init_from_env().unwrap();
    println!("REDIS_URL in use: {}", config.unwrap().redis_url());
    drop(guard);
}

/// `Config::load` warns about an env file line it passes over (no '=' after the name, for a variable
/// the process environment sets), and the documented flow loads the configuration before logging
/// starts. Before, that warning went to no subscriber and was lost; it is now logged once `init` runs.
#[test]
fn a_configuration_warning_raised_before_logging_starts_is_logged_when_it_starts() {
    let path = std::env::temp_dir().join(format!(
        "agentcomm-logging-early-{}.env",
        std::process::id()
    ));
    std::fs::write(&path, "REDIS_URL redis://file-host:6379\n").unwrap();
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_loading_the_configuration_before_logging",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(EARLY_CHILD_MARKER, &path)
        .env("REDIS_URL", "redis://env-host:6379")
        .env_remove("LOG_LEVEL")
        .output()
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        stdout.contains("REDIS_URL in use: redis://env-host:6379"),
        "{stdout}"
    );
    let warnings: Vec<Value> = json_lines(&stdout)
        .into_iter()
        .filter(|line| line["level"] == "WARNING")
        .collect();
    assert_eq!(warnings.len(), 1, "{stdout}");
    let warning = &warnings[0];
    assert!(
        warning["message"]
            .as_str()
            .unwrap()
            .contains("no '=' right after the name"),
        "{warning}"
    );
    assert_eq!(warning["variable"], "REDIS_URL", "{warning}");
    assert_eq!(warning["env_line"], 1, "{warning}");
    assert_eq!(warning["env_file"], path.display().to_string(), "{warning}");
}
