//! The runtime logs publish, receive, retry and dead-letter as JSON Lines carrying the message id,
//! class, session and agent.
//!
//! A test binary of its own (not in `tests/integration`): it asserts on lines captured by a subscriber
//! of its own thread, and tracing caches each log line's interest process-wide, so a test without a
//! subscriber that reaches the same line first (any runtime test) can make it never fire
//! (tokio-rs/tracing#3611).

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentcomm_core::backoff::Backoff;
use agentcomm_core::logging::json_layer;
use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;

#[derive(Debug, Serialize, Deserialize, Message)]
struct Charge {
    fail: bool,
}

#[agent(receives = [Charge])]
struct Biller;

impl Handle<Charge> for Biller {
    async fn handle(&self, charge: Charge, _ctx: &Context<Self>) -> HandlerResult {
        if charge.fail {
            return Err(HandlerError::msg("the bank is down"));
        }
        tracing::info!(amount_cents = 1200, "charged");
        Ok(())
    }
}

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buffer {
    type Writer = Buffer;
    fn make_writer(&'a self) -> Buffer {
        self.clone()
    }
}

impl Buffer {
    /// What was logged so far.
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// Runs `body` on a current-thread runtime with JSON logs at `level` written to a buffer (given to
/// `body`, which may read what was logged so far), and returns the log's text.
fn run_logged<F: std::future::Future<Output = ()>>(
    level: LevelFilter,
    body: impl FnOnce(Buffer) -> F,
) -> String {
    let buffer = Buffer::default();
    let subscriber = tracing_subscriber::registry()
        .with(level)
        .with(json_layer(buffer.clone()));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tracing::subscriber::with_default(subscriber, || runtime.block_on(body(buffer.clone())));
    buffer.text()
}

/// Runs a Biller through one good and one failing charge (retried once, then dead-lettered) with
/// logs at `level`, and returns the log's lines and its text.
fn charge_and_log(level: LevelFilter) -> (Vec<Value>, String) {
    let text = run_logged(level, |_| async {
        let agents = Runtime::new(MemoryRouter::new());
        let options = AgentOptions::new()
            .max_attempts(2)
            .backoff(Backoff::new(Duration::from_millis(1), Duration::from_millis(1)).jitter(0.0));
        let biller = agents.spawn_with(Biller, options).await.unwrap();
        agents
            .bus()
            .publish("s-ok", &Charge { fail: false })
            .await
            .unwrap();
        agents
            .bus()
            .publish("s-bad", &Charge { fail: true })
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while biller.health().dead_lettered < 1 || biller.health().handled < 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the agent did not finish: {:?}",
                biller.health()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        agents.shutdown(Duration::from_secs(1)).await.unwrap();
    });
    let lines = text
        .lines()
        .map(|line| serde_json::from_str(line).expect(line))
        .collect();
    (lines, text)
}

#[test]
fn publish_receive_retry_and_dead_letter_are_logged_with_their_context() {
    let (lines, text) = charge_and_log(LevelFilter::DEBUG);
    let find = |message: &str, session: &str| {
        lines
            .iter()
            .find(|line| line["message"] == message && line["session"] == session)
            .unwrap_or_else(|| panic!("no '{message}' line for session {session} in:\n{text}"))
    };
    for (message, session) in [
        ("published", "s-ok"),
        ("received", "s-ok"),
        ("received", "s-bad"),
        ("handler failed; retrying", "s-bad"),
        ("dead-lettered", "s-bad"),
    ] {
        let line = find(message, session);
        assert_eq!(line["class"], "Charge", "{line}");
        assert!(
            line["message_id"].as_str().is_some_and(|id| id.len() == 36),
            "{line}"
        );
        assert!(
            line["timestamp"].is_string() && line["level"].is_string(),
            "{line}"
        );
        assert!(line["file"].is_string() && line["line"].is_u64(), "{line}");
        if message != "published" {
            assert_eq!(line["agent"], "Biller", "{line}");
        }
    }
    let retry = find("handler failed; retrying", "s-bad");
    assert_eq!(
        (retry["level"].as_str(), retry["attempt"].as_u64()),
        (Some("WARNING"), Some(1))
    );
    assert_eq!(retry["error"], "the bank is down");
    let dead = find("dead-lettered", "s-bad");
    assert_eq!(dead["reason"], "handler-failed");
    // A handler's own log lines carry the message's context too.
    let charged = find("charged", "s-ok");
    assert_eq!(
        (charged["agent"].as_str(), charged["amount_cents"].as_u64()),
        (Some("Biller"), Some(1200))
    );
}

/// The same at the level most production deployments use (`LOG_LEVEL=WARNING`): the retry and the
/// dead-letter lines must still say which message, session and agent they are about.
#[test]
fn warn_and_error_lines_keep_their_context_at_the_warning_level() {
    let (lines, text) = charge_and_log(LevelFilter::WARN);
    for message in ["handler failed; retrying", "dead-lettered"] {
        let line = lines
            .iter()
            .find(|line| line["message"] == message)
            .unwrap_or_else(|| panic!("no '{message}' line in:\n{text}"));
        for key in ["session", "agent", "message_id", "class"] {
            assert!(
                line.get(key).is_some(),
                "'{message}' line has no {key}: {line}"
            );
        }
    }
}

#[derive(Debug, Serialize, Deserialize, Message)]
struct Slow {}

/// Never finishes its handler: only a stop deadline ends it.
#[agent(receives = [Slow])]
struct Stuck {
    started: tokio::sync::mpsc::UnboundedSender<()>,
}

impl Handle<Slow> for Stuck {
    async fn handle(&self, _slow: Slow, _ctx: &Context<Self>) -> HandlerResult {
        let _ = self.started.send(());
        std::future::pending::<()>().await;
        Ok(())
    }
}

/// A handler cut off by the stop deadline is logged with the message it held (id, class, session,
/// channel, agent): before, the only line said "stop deadline reached with a handler still
/// running" with the agent's name, and which message went back unsettled was not known.
#[test]
fn a_handler_cut_off_by_the_stop_deadline_is_logged_with_its_message() {
    let text = run_logged(LevelFilter::WARN, |_| async {
        let agents = Runtime::new(MemoryRouter::new());
        let (started, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
        let stuck = agents.spawn(Stuck { started }).await.unwrap();
        agents.bus().publish("s-stuck", &Slow {}).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), started_rx.recv())
            .await
            .expect("the handler starts within 5 s");
        let report = stuck.stop(Duration::from_millis(100)).await;
        assert_eq!(report.aborted, 1, "{report:?}");
        agents.shutdown(Duration::from_secs(1)).await.unwrap();
    });
    let line: Value = text
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).expect(line))
        .find(|line| {
            line["message"]
                .as_str()
                .is_some_and(|message| message.starts_with("a handler was cut off"))
        })
        .unwrap_or_else(|| panic!("no line about the handler cut off in:\n{text}"));
    assert!(
        line["message_id"].as_str().is_some_and(|id| !id.is_empty()),
        "{line}"
    );
    assert_eq!(line["agent"], "Stuck", "{line}");
    assert_eq!(line["class"], "Slow", "{line}");
    assert_eq!(line["session"], "s-stuck", "{line}");
    assert_eq!(line["channel"], "Slow:event:s-stuck", "{line}");
}

/// An agent whose subscription ends without a stop (its router closed under it, or a backend that gave
/// up reconnecting) says so at ERROR with the router's account of why: the subscription itself ends
/// without a reason, and the line said only what it might have been.
#[test]
fn a_subscription_that_ends_on_its_own_is_logged_with_the_routers_reason() {
    let text = run_logged(LevelFilter::WARN, |buffer| async move {
        let agents = Runtime::new(MemoryRouter::new());
        agents.spawn(Biller).await.unwrap();
        agents.router().close().await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !buffer.text().contains("ended without a stop") {
            assert!(
                tokio::time::Instant::now() < deadline,
                "nothing logged:\n{}",
                buffer.text()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let line: Value = text
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).expect(line))
        .find(|line| {
            line["message"]
                .as_str()
                .unwrap()
                .contains("ended without a stop")
        })
        .unwrap();
    assert_eq!(
        (line["level"].as_str(), line["agent"].as_str()),
        (Some("ERROR"), Some("Biller")),
        "{line}"
    );
    assert_eq!(line["router"], "Unhealthy: closed", "{line}");
}
