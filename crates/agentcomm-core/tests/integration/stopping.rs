//! Stopping agents: a stop or a shutdown whose caller stops waiting, an agent that stops itself or
//! its runtime, and what the runtime reports about agents stopped on purpose.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use agentcomm_core::prelude::*;
use agentcomm_core::router::HealthStatus;
use agentcomm_core::runtime::{AgentHandle, AgentState};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::timeout;

use crate::common::{Client, Job, Worker, busy_worker};

async fn wait_for(what: &str, condition: impl Fn() -> bool) {
    let waited = timeout(Duration::from_secs(10), async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "waited 10 s for {what}");
}

#[tokio::test]
async fn a_stop_whose_caller_gave_up_still_finishes_and_later_stops_get_its_report() {
    let (runtime, agent) = busy_worker(1_000).await;
    // The caller bounds its stop by less than the handler takes: its future is dropped mid-stop.
    let cut_off = timeout(
        Duration::from_millis(100),
        agent.stop(Duration::from_secs(5)),
    )
    .await;
    assert!(cut_off.is_err(), "the first stop was cut off by its caller");
    // The stop goes on without its caller: the handler finishes at about 1 s and is acknowledged.
    let second = timeout(Duration::from_secs(10), agent.stop(Duration::from_secs(5)))
        .await
        .expect("a second stop returns once the first is over");
    assert_eq!(second.handled, 1, "{second:?}");
    assert_eq!(agent.health().state, AgentState::Stopped);
    timeout(
        Duration::from_secs(10),
        runtime.shutdown(Duration::from_secs(5)),
    )
    .await
    .expect("shutdown returns")
    .unwrap();
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
struct Quit {}

#[agent(sends = [Quit])]
struct Boss;

/// Stops itself when told to quit: its handler waits for a stop that waits for its handler, until the
/// stop's deadline drops the handler (and, with it, the handler's wait).
#[agent(receives = [Quit])]
struct Quitter {
    me: Arc<OnceLock<AgentHandle>>,
}

impl Handle<Quit> for Quitter {
    async fn handle(&self, _quit: Quit, _ctx: &Context<Self>) -> HandlerResult {
        if let Some(me) = self.me.get() {
            me.stop(Duration::from_millis(200)).await;
        }
        Ok(())
    }
}

#[tokio::test]
async fn an_agent_that_stops_itself_from_its_handler_stops_and_the_runtime_shuts_down() {
    let runtime = Runtime::new(MemoryRouter::new());
    let me = Arc::new(OnceLock::new());
    let handle = runtime.spawn(Quitter { me: me.clone() }).await.unwrap();
    me.set(handle.clone()).unwrap();
    runtime
        .publisher::<Boss>()
        .publish("s1", Quit {})
        .await
        .unwrap();
    wait_for("the agent to stop itself", || {
        handle.health().state == AgentState::Stopped
    })
    .await;
    timeout(
        Duration::from_secs(10),
        runtime.shutdown(Duration::from_secs(1)),
    )
    .await
    .expect("shutdown returns")
    .unwrap();
}

#[tokio::test]
async fn an_agent_stopped_on_purpose_leaves_the_runtime_healthy_and_unlisted() {
    let runtime = Runtime::new(MemoryRouter::new());
    let (started, _old_rx) = mpsc::unbounded_channel();
    let old = runtime.spawn(Worker { started }).await.unwrap();
    old.stop(Duration::from_secs(1)).await;
    assert_eq!(old.health().state, AgentState::Stopped);
    assert_eq!(
        old.health().status,
        HealthStatus::Unhealthy,
        "its own health says it is stopped"
    );
    let (started, _new_rx) = mpsc::unbounded_channel();
    let _replacement = runtime.spawn(Worker { started }).await.unwrap();
    let health = runtime.health().await;
    assert_eq!(health.status, HealthStatus::Healthy, "{health:?}");
    assert_eq!(health.agents.len(), 1, "only the replacement is listed");
    assert_eq!(runtime.agents().len(), 1);
    // Shutdown stops the replacement only; the old agent's stop is not counted again.
    let report = runtime.shutdown(Duration::from_secs(1)).await.unwrap();
    assert_eq!(report.handled, 0, "{report:?}");
}

/// Waits until the runtime's router says it is closed (a memory router reports itself disconnected
/// once closed).
async fn wait_for_router_closed(runtime: &Runtime, what: &str) {
    let waited = timeout(Duration::from_secs(10), async {
        while runtime.router().health().await.connected {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "waited 10 s for the router to close: {what}"
    );
}

#[tokio::test]
async fn a_shutdown_whose_caller_gave_up_still_closes_the_router() {
    let (runtime, agent) = busy_worker(300).await;
    // The caller bounds its shutdown by less than the handler takes: its future is dropped while the
    // agent finishes its message.
    let cut_off = timeout(
        Duration::from_millis(50),
        runtime.shutdown(Duration::from_secs(5)),
    )
    .await;
    assert!(cut_off.is_err(), "the shutdown was cut off by its caller");
    // The shutdown goes on without its caller: the handler finishes, then the router closes (before,
    // the agents stopped and the router stayed open, publishes going on into it).
    wait_for_router_closed(&runtime, "after a shutdown whose caller gave up").await;
    assert_eq!(agent.health().handled, 1, "{:?}", agent.health());
    let error = runtime
        .publisher::<Client>()
        .publish("s1", Job { sleep_ms: 0 })
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Closed { .. }), "{error}");
}

/// Shuts its whole runtime down when told to quit.
#[agent(receives = [Quit])]
struct ShutsDown {
    runtime: Arc<OnceLock<Runtime>>,
}

impl Handle<Quit> for ShutsDown {
    async fn handle(&self, _quit: Quit, _ctx: &Context<Self>) -> HandlerResult {
        if let Some(runtime) = self.runtime.get() {
            runtime.shutdown(Duration::from_millis(200)).await?;
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_runtime_shut_down_from_a_handler_of_its_own_agent_closes_its_router() {
    let runtime = Runtime::new(MemoryRouter::new());
    let cell = Arc::new(OnceLock::new());
    cell.set(runtime.clone()).unwrap();
    let agent = runtime.spawn(ShutsDown { runtime: cell }).await.unwrap();
    runtime
        .publisher::<Boss>()
        .publish("s1", Quit {})
        .await
        .unwrap();
    // The handler waits for a shutdown that waits for the handler, until the stop deadline drops the
    // handler, and with it the shutdown's caller: the shutdown still closes the router.
    wait_for_router_closed(&runtime, "after a shutdown called from a handler").await;
    assert_eq!(agent.health().state, AgentState::Stopped);
}

/// A runtime without agents, shut down outside any Tokio runtime: its router closes (the shutdown has
/// no task to run on there, and needs none).
#[test]
fn a_runtime_without_agents_shuts_down_outside_tokio() {
    let runtime = Runtime::new(MemoryRouter::new());
    let report = futures::executor::block_on(runtime.shutdown(Duration::from_secs(1))).unwrap();
    assert_eq!(report, agentcomm_core::runtime::ShutdownReport::default());
    let health = futures::executor::block_on(runtime.router().health());
    assert!(!health.connected, "{health:?}");
}

/// Runs `work` on a thread of its own, outside any Tokio runtime, and gives its result, or panics
/// when it takes more than 10 s (a stop that waits for a report nobody sends never ends).
fn outside_tokio<T: Send + 'static>(what: &str, work: impl FnOnce() -> T + Send + 'static) -> T {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(work());
    });
    receiver
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|error| panic!("{what}: no result within 10 s ({error})"))
}

/// A runtime whose agents run on a Tokio runtime, shut down from a thread outside it (a signal
/// thread, a `Drop`, a synchronous caller with `futures::executor::block_on`): its agents stop on
/// the Tokio runtime they run on, and its router closes. It panicked there (`AgentHandle::stop`
/// spawned its task with `tokio::spawn`, which needs to be inside Tokio).
#[test]
fn a_runtime_with_agents_shuts_down_from_a_thread_outside_tokio() {
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (runtime, agent) = tokio.block_on(busy_worker(200));
    let shut_down = runtime.clone();
    let report = outside_tokio("a shutdown outside Tokio", move || {
        futures::executor::block_on(shut_down.shutdown(Duration::from_secs(5)))
    })
    .unwrap();
    assert_eq!(report.handled, 1, "{report:?}");
    assert_eq!(agent.health().state, AgentState::Stopped);
    let health = futures::executor::block_on(runtime.router().health());
    assert!(!health.connected, "{health:?}");
}

/// An agent whose Tokio runtime has ended, stopped from outside Tokio: the stop's task can no longer
/// run (a task spawned on an ended runtime is dropped unpolled), and the stop says so with an empty
/// report instead of waiting for ever.
#[test]
fn an_agent_whose_tokio_runtime_ended_stops_at_once() {
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (started, _started_rx) = mpsc::unbounded_channel();
    let agent = tokio.block_on(async {
        Runtime::new(MemoryRouter::new())
            .spawn(Worker { started })
            .await
            .unwrap()
    });
    drop(tokio);
    let stopped = agent.clone();
    let report = outside_tokio("a stop after Tokio ended", move || {
        futures::executor::block_on(stopped.stop(Duration::from_secs(1)))
    });
    assert_eq!(report, agentcomm_core::runtime::ShutdownReport::default());
    assert_eq!(agent.health().state, AgentState::Stopped);
}

/// A runtime whose agents' Tokio runtime has ended, shut down from outside Tokio: its shutdown
/// cannot run on that Tokio runtime any more, and runs in place, closing the router (it said that
/// its task was cancelled, and left the router open).
#[test]
fn a_runtime_whose_tokio_runtime_ended_still_closes_its_router() {
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (started, _started_rx) = mpsc::unbounded_channel();
    let runtime = tokio.block_on(async {
        let runtime = Runtime::new(MemoryRouter::new());
        runtime.spawn(Worker { started }).await.unwrap();
        runtime
    });
    drop(tokio);
    let shut_down = runtime.clone();
    let report = outside_tokio("a shutdown after Tokio ended", move || {
        futures::executor::block_on(shut_down.shutdown(Duration::from_secs(1)))
    })
    .unwrap();
    assert_eq!(report, agentcomm_core::runtime::ShutdownReport::default());
    let health = futures::executor::block_on(runtime.router().health());
    assert!(!health.connected, "{health:?}");
}

/// A runtime whose agents run on a current_thread Tokio runtime that is alive but not being driven
/// (its `block_on` returned; a synchronous `main` shutting down after it), shut down from outside
/// Tokio: the shutdown's task can never run there, and the caller is told so once its deadline has
/// passed, instead of waiting for ever (the deadline bounded nothing).
#[test]
fn a_shutdown_on_a_tokio_runtime_nobody_drives_answers_after_its_deadline() {
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (started, _started_rx) = mpsc::unbounded_channel();
    let runtime = tokio.block_on(async {
        let runtime = Runtime::new(MemoryRouter::new());
        runtime.spawn(Worker { started }).await.unwrap();
        runtime
    });
    let shut_down = runtime.clone();
    let result = outside_tokio("a shutdown on an undriven Tokio runtime", move || {
        futures::executor::block_on(shut_down.shutdown(Duration::from_millis(500)))
    });
    let error = result.expect_err("nothing ran the shutdown").to_string();
    assert!(error.contains("block_on"), "{error}");
    // Driven again, the runtime runs the shutdown that was left to it: the agents stop and the
    // router closes.
    tokio.block_on(async {
        timeout(Duration::from_secs(10), async {
            while runtime.router().health().await.connected {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the router closes once the runtime runs again");
    });
    drop(tokio);
}

/// A router whose close needs Tokio (a timer around its cleanup, as the Redis router's has), around
/// the in-memory one.
struct TimedCloseRouter(MemoryRouter);

impl agentcomm_core::Router for TimedCloseRouter {
    fn backend(&self) -> &str {
        "timed-close"
    }
    fn capabilities(&self) -> agentcomm_core::Capabilities {
        self.0.capabilities()
    }
    fn publish(
        &self,
        envelope: Envelope,
    ) -> futures::future::BoxFuture<
        '_,
        agentcomm_core::Result<agentcomm_core::router::PublishOutcome>,
    > {
        self.0.publish(envelope)
    }
    fn subscribe(
        &self,
        options: agentcomm_core::router::SubscribeOptions,
    ) -> futures::future::BoxFuture<'_, agentcomm_core::Result<agentcomm_core::router::Subscription>>
    {
        self.0.subscribe(options)
    }
    fn health(&self) -> futures::future::BoxFuture<'_, agentcomm_core::router::Health> {
        self.0.health()
    }
    fn close(&self) -> futures::future::BoxFuture<'_, agentcomm_core::Result<()>> {
        Box::pin(async move {
            tokio::time::timeout(Duration::from_secs(1), self.0.close())
                .await
                .unwrap_or(Ok(()))
        })
    }
}

/// A runtime on a router whose close needs Tokio, shut down from outside Tokio after its agents'
/// Tokio runtime ended: the shutdown, run in place, closes that router on a Tokio runtime of its own
/// (it panicked inside the router's close, 'there is no reactor running').
#[test]
fn a_shutdown_in_place_closes_a_router_needing_tokio() {
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (started, _started_rx) = mpsc::unbounded_channel();
    let runtime = tokio.block_on(async {
        let runtime = Runtime::new(TimedCloseRouter(MemoryRouter::new()));
        runtime.spawn(Worker { started }).await.unwrap();
        runtime
    });
    drop(tokio);
    let shut_down = runtime.clone();
    let result = outside_tokio("a shutdown in place on a router needing Tokio", move || {
        futures::executor::block_on(shut_down.shutdown(Duration::from_secs(1)))
    });
    result.expect("the shutdown closed the router");
    let error = outside_tokio("a publish after the shutdown", move || {
        futures::executor::block_on(runtime.router().publish(Envelope::new(
            agentcomm_core::parse_channel("Job:event:s1").unwrap(),
            "application/json",
            &b"{}"[..],
        )))
    })
    .expect_err("the router is closed");
    assert!(
        matches!(error, agentcomm_core::Error::Closed { .. }),
        "{error}"
    );
}

/// An agent whose current_thread Tokio runtime is alive but not driven, stopped from outside Tokio:
/// the stop's task cannot run before the runtime is driven again, and the caller gets an empty report
/// once the deadline has passed (it waited for ever); driven again, the runtime stops the agent.
#[test]
fn a_stop_on_a_tokio_runtime_nobody_drives_answers_after_its_deadline() {
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (started, _started_rx) = mpsc::unbounded_channel();
    let agent = tokio.block_on(async {
        Runtime::new(MemoryRouter::new())
            .spawn(Worker { started })
            .await
            .unwrap()
    });
    let stopped = agent.clone();
    let report = outside_tokio("a stop on an undriven Tokio runtime", move || {
        futures::executor::block_on(stopped.stop(Duration::from_millis(500)))
    });
    assert_eq!(report, agentcomm_core::runtime::ShutdownReport::default());
    tokio.block_on(wait_for(
        "the agent stops once its runtime runs again",
        || agent.health().state == AgentState::Stopped,
    ));
}

/// A shutdown with a zero deadline ("now"), outside Tokio, on a multi-thread Tokio runtime whose one
/// worker is busy for a moment: the runtime is driven, and runs the shutdown once its worker is free;
/// the caller gets its report, not a timeout for a start that came a little later.
#[test]
fn a_shutdown_now_on_a_busy_tokio_runtime_is_waited_for() {
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (started, _started_rx) = mpsc::unbounded_channel();
    let (runtime, agent) = tokio.block_on(async {
        let runtime = Runtime::new(MemoryRouter::new());
        let agent = runtime.spawn(Worker { started }).await.unwrap();
        (runtime, agent)
    });
    let (busy, is_busy) = std::sync::mpsc::channel();
    tokio.spawn(async move {
        let _ = busy.send(());
        // Blocks the one worker on purpose, as a handler doing blocking work would.
        std::thread::sleep(Duration::from_millis(600));
    });
    is_busy.recv().unwrap();
    let shut_down = runtime.clone();
    let report = outside_tokio("a shutdown now on a busy runtime", move || {
        futures::executor::block_on(shut_down.shutdown(Duration::ZERO))
    })
    .unwrap();
    assert_eq!(report, agentcomm_core::runtime::ShutdownReport::default());
    assert_eq!(agent.health().state, AgentState::Stopped);
    let health = futures::executor::block_on(runtime.router().health());
    assert!(!health.connected, "{health:?}");
}

/// A runtime with agents spawned from two Tokio runtimes, shut down from outside Tokio after the
/// first ended while the second (current_thread) is alive but not driven: the shutdown runs in place
/// on a Tokio runtime of its own, and its wait for the second agent's stop to start is bounded as
/// outside Tokio. It waited for ever there: inside that temporary runtime the stop was taken to be
/// inside Tokio, and waited unbounded for a task that the undriven runtime never ran.
#[test]
fn a_shutdown_in_place_does_not_wait_for_ever_for_an_agent_on_an_undriven_tokio_runtime() {
    let ended = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let undriven = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (started, _started_rx) = mpsc::unbounded_channel();
    let runtime = Runtime::new(MemoryRouter::new());
    ended.block_on(async {
        runtime
            .spawn(Worker {
                started: started.clone(),
            })
            .await
            .unwrap();
    });
    let agent = undriven.block_on(async { runtime.spawn(Worker { started }).await.unwrap() });
    drop(ended);
    let shut_down = runtime.clone();
    let report = outside_tokio(
        "a shutdown with an agent on an undriven runtime",
        move || futures::executor::block_on(shut_down.shutdown(Duration::from_millis(500))),
    )
    .expect("the router closed");
    assert_eq!(report, agentcomm_core::runtime::ShutdownReport::default());
    let health = futures::executor::block_on(runtime.router().health());
    assert!(!health.connected, "{health:?}");
    // Driven again, that runtime runs the stop left to it.
    undriven.block_on(wait_for(
        "the agent stops once its runtime runs again",
        || agent.health().state == AgentState::Stopped,
    ));
}
