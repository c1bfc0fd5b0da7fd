//! `Runtime::shutdown_on_signal`: SIGTERM shuts the runtime down gracefully, and a second signal
//! stops waiting for handlers that would hold the process until the deadline.
//!
//! The signals go to this test process: this file is a test binary of its own, whose one test that sends
//! signals is the only one that listens for them.
#![cfg(unix)]

use std::time::Duration;

use agentcomm_core::prelude::*;
use agentcomm_core::runtime::AgentState;
use tokio::time::timeout;

mod common;
use common::{Client, Job, busy_worker};

/// Sends `signal` (`TERM`, `INT`) to this process.
fn send(signal: &str) {
    let status = std::process::Command::new("kill")
        .args(["-s", signal, &std::process::id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -s {signal} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_gracefully_and_a_second_signal_stops_waiting() {
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

/// Outside Tokio there is no signal driver: a clear error naming the fix, not Tokio's panic.
#[test]
fn outside_tokio_it_fails_naming_the_fix() {
    let runtime = Runtime::new(MemoryRouter::new());
    let result = futures::executor::block_on(runtime.shutdown_on_signal(Duration::from_secs(1)));
    match result {
        Err(error @ Error::Unsupported { .. }) => {
            assert!(error.to_string().contains("#[tokio::main]"), "{error}")
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
}
