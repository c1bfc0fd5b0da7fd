//! Capturing agentcomm's JSON log lines, to check what they show.
//!
//! [`capture`] runs a future on a runtime of one thread under agentcomm's JSON log layer
//! ([`agentcomm_core::logging::json_layer`]) at TRACE, waits until every task it spawned has ended
//! (so that a line a background task writes late is not missed), and returns the lines written.
//! [`leaks`] lists the texts that show any piece of a secret, naming the piece and where it showed.
//!
//! ```
//! use agentcomm_testkit::logs::{capture, leaks};
//!
//! let (debug, lines) = capture(async {
//!     tracing::warn!(url = "redis://:***@cache:6379", "connection refused");
//!     format!("{:?}", "redis://:***@cache:6379")
//! });
//! assert!(lines.contains("connection refused"), "{lines}");
//!
//! let texts = [("Debug", debug), ("log lines", lines)];
//! let found = leaks("REDIS_URL", &["Qz7k", "Wm4p"], &texts);
//! assert!(found.is_empty(), "{}", found.join("\n"));
//!
//! let shown = [("error Display", "refused redis://:Qz7k@cache".to_string())];
//! assert_eq!(
//!     leaks("REDIS_URL", &["Qz7k"], &shown),
//!     ["REDIS_URL through error Display shows \"Qz7k\": refused redis://:Qz7k@cache"]
//! );
//! ```

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing_subscriber::layer::SubscriberExt;

/// How long the tasks a captured future spawned may still run after it returned.
const TASKS_END_WITHIN: Duration = Duration::from_secs(10);

/// A writer the JSON layer writes into: every clone appends to the same buffer.
#[derive(Clone, Debug, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn text(&self) -> String {
        let bytes = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Runs `future` on a new runtime of one thread (so that every task it spawns runs there too) with
/// agentcomm's JSON log layer at TRACE as the thread's subscriber, and returns what it returned and
/// the JSON lines written meanwhile.
///
/// After `future` returns, the runtime keeps running until every task spawned on it has ended, so
/// that what they log on their way out is in the lines too.
///
/// `log` records reach the lines only if a `log`-to-`tracing` bridge (such as
/// `tracing_log::LogTracer`) is installed.
///
/// # Panics
///
/// If tasks spawned on the runtime still run 10 s after `future` returned, or if the runtime
/// cannot be built; and if `future` panics.
pub fn capture<T>(future: impl Future<Output = T>) -> (T, String) {
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new("trace"))
        .with(agentcomm_core::logging::json_layer(move || writer.clone()));
    let outcome = tracing::subscriber::with_default(subscriber, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime of one thread");
        let outcome = runtime.block_on(future);
        // The tasks the future spawned may log after it returned: every one of them must end (and
        // log what it logs) before the lines are read, or a late line would be missed.
        let deadline = Instant::now() + TASKS_END_WITHIN;
        while runtime.metrics().num_alive_tasks() > 0 {
            assert!(
                Instant::now() < deadline,
                "{} spawned tasks still run {} s after the future returned",
                runtime.metrics().num_alive_tasks(),
                TASKS_END_WITHIN.as_secs()
            );
            runtime.block_on(async { tokio::time::sleep(Duration::from_millis(1)).await });
        }
        outcome
    });
    (outcome, lines.text())
}

/// The texts among `texts` (each labelled with the path it was shown through) that show any of
/// `pieces`, each as `"{subject} through {path} shows {piece:?}: {text}"` for the first piece found.
///
/// `subject` names what held the secret (a URL, a variable), for the message. Collect the leaks of
/// many cases, then assert the list is empty, so that a failure lists them all.
#[must_use]
pub fn leaks(subject: &str, pieces: &[&str], texts: &[(&str, String)]) -> Vec<String> {
    texts
        .iter()
        .filter_map(|(path, text)| {
            let piece = pieces.iter().find(|piece| text.contains(*piece))?;
            Some(format!("{subject} through {path} shows {piece:?}: {text}"))
        })
        .collect()
}
