//! `Runtime::shutdown_on_signal`: SIGTERM shuts the runtime down gracefully, and a second signal
//! stops waiting for handlers that would hold the process until the deadline.
//!
//! The signals go to this test process: this file is a test binary of its own, whose tests listen
//! for signals one at a time (`listening_alone`).
#![cfg(unix)]

use std::time::Duration;

use agentcomm_core::prelude::*;
use agentcomm_core::runtime::AgentState;
use tokio::time::timeout;

mod common;
use common::{Client, Job, busy_worker};

/// Sends `signal` (`TERM`, `INT`) to this process, with the shell's `kill` (a builtin: images
/// without procps, such as rust:slim, have no `kill` program).
fn send(signal: &str) {
    let status = std::process::Command::new("sh")
        .args([
            "-c",
            "kill -s \"$0\" \"$1\"",
            signal,
            &std::process::id().to_string(),
        ])
        .status()
        .expect("run sh");
    assert!(status.success(), "kill -s {signal} failed");
}

/// Held by each test while it listens for signals and sends them: every listener in the process
/// receives every signal, so a signal meant for one test would reach another test's listener.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// [`ALONE`], from a test outside Tokio.
fn listening_alone() -> tokio::sync::MutexGuard<'static, ()> {
    ALONE.blocking_lock()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_gracefully_and_a_second_signal_stops_waiting() {
    let _alone = ALONE.lock().await;
    // SIGTERM: the job in hand finishes and is counted, and the router is closed.
    let (runtime, agent) = busy_worker(300).await;
    let mut stopping = std::pin::pin!(runtime.shutdown_on_signal(Duration::from_secs(10)));
    // The first poll installs the signal handlers (before it, SIGTERM would end the test process).
    assert!(futures::poll!(stopping.as_mut()).is_pending());
    send("TERM");
    let report = timeout(Duration::from_secs(10), stopping)
        .await
        .expect("the shutdown ends within 10 s of SIGTERM")
        .expect("a graceful shutdown");
    assert_eq!(report.handled, 1, "{report:?}");
    assert_eq!(report.aborted, 0, "{report:?}");
    assert_eq!(agent.health().state, AgentState::Stopped);
    let after = runtime
        .publisher::<Client>()
        .publish("s1", Job { sleep_ms: 0 })
        .await;
    assert!(
        matches!(after, Err(Error::Closed { .. })),
        "the router is closed after the shutdown: {after:?}"
    );

    // A handler that would hold the shutdown for its whole deadline: a second signal (Ctrl-C)
    // returns at once.
    let (runtime, agent) = busy_worker(60_000).await;
    let mut stopping = std::pin::pin!(runtime.shutdown_on_signal(Duration::from_secs(60)));
    assert!(futures::poll!(stopping.as_mut()).is_pending());
    send("TERM");
    let first_sent = tokio::time::Instant::now();
    let began_stopping = timeout(Duration::from_secs(10), async {
        loop {
            tokio::select! {
                result = stopping.as_mut() => panic!("the shutdown ended with its handler running: {result:?}"),
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
            if agent.health().state != AgentState::Running {
                break;
            }
        }
    })
    .await;
    assert!(
        began_stopping.is_ok(),
        "SIGTERM did not start the shutdown within 10 s"
    );
    // A second signal counts from a second after the first (sooner, it is the same request).
    tokio::time::sleep_until(first_sent + Duration::from_millis(1_100)).await;
    send("INT");
    let interrupted = timeout(Duration::from_secs(5), stopping)
        .await
        .expect("a second signal ends the wait within 5 s, not at the 60 s deadline");
    assert!(
        matches!(interrupted, Err(Error::Interrupted { signal: "SIGINT" })),
        "{interrupted:?}"
    );
    assert_eq!(
        agent.health().state,
        AgentState::Stopping,
        "the handler still runs"
    );
}

/// SIGINT and SIGTERM sent together (a terminal's Ctrl-C and a process manager forwarding it) are one
/// request to stop: the shutdown stays graceful. The second was taken for a second request, which
/// stopped waiting for the handlers at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_signals_sent_together_still_shut_down_gracefully() {
    let _alone = ALONE.lock().await;
    let (runtime, agent) = busy_worker(500).await;
    let mut stopping = std::pin::pin!(runtime.shutdown_on_signal(Duration::from_secs(10)));
    assert!(futures::poll!(stopping.as_mut()).is_pending());
    send("INT");
    send("TERM");
    let report = timeout(Duration::from_secs(10), stopping)
        .await
        .expect("the shutdown ends within 10 s")
        .expect("a graceful shutdown, not Interrupted");
    assert_eq!((report.handled, report.aborted), (1, 0), "{report:?}");
    assert_eq!(agent.health().state, AgentState::Stopped);
}

/// A Tokio runtime built without its I/O driver (`enable_time` only), on which Tokio's own signals
/// panic: SIGTERM still shuts the runtime down gracefully.
#[test]
fn on_a_tokio_runtime_without_its_io_driver_sigterm_shuts_down() {
    let _alone = listening_alone();
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let report = tokio.block_on(async {
        let (runtime, _agent) = busy_worker(300).await;
        let mut stopping = std::pin::pin!(runtime.shutdown_on_signal(Duration::from_secs(10)));
        assert!(futures::poll!(stopping.as_mut()).is_pending());
        send("TERM");
        timeout(Duration::from_secs(10), stopping)
            .await
            .expect("the shutdown ends within 10 s of SIGTERM")
    });
    let report = report.expect("a graceful shutdown");
    assert_eq!(report.handled, 1, "{report:?}");
}

/// Outside Tokio (`futures::executor::block_on`), as `Runtime::shutdown` works there.
#[test]
fn outside_tokio_sigterm_shuts_down() {
    let _alone = listening_alone();
    let runtime = Runtime::new(MemoryRouter::new());
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        futures::executor::block_on(async {
            let mut stopping = std::pin::pin!(runtime.shutdown_on_signal(Duration::from_secs(10)));
            assert!(futures::poll!(stopping.as_mut()).is_pending());
            send("TERM");
            let _ = done.send(stopping.await);
        })
    });
    let result = result
        .recv_timeout(Duration::from_secs(10))
        .expect("the shutdown ends within 10 s of SIGTERM");
    let report = result.expect("a graceful shutdown");
    assert_eq!((report.handled, report.aborted), (0, 0), "{report:?}");
}
