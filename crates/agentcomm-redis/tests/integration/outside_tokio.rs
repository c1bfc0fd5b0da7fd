//! A Redis runtime shut down from a thread outside Tokio after the Tokio runtime its agents ran on
//! ended: the shutdown closes the router in place, on a Tokio runtime of its own.

use std::time::{Duration, Instant};

use crate::common::*;
use agentcomm_core::prelude::*;
use agentcomm_redis::DeliveryMode;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, Message)]
struct Tick {
    n: u64,
}

#[agent(receives = [Tick])]
struct Ticker;

impl Handle<Tick> for Ticker {
    async fn handle(&self, _tick: Tick, _ctx: &Context<Self>) -> HandlerResult {
        Ok(())
    }
}

/// Runs `work` on a thread of its own, outside any Tokio runtime; panics after 30 s.
fn outside_tokio<T: Send + 'static>(what: &str, work: impl FnOnce() -> T + Send + 'static) -> T {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(work());
    });
    receiver
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|error| panic!("{what}: no result within 30 s ({error})"))
}

/// An agent on a Redis router in `mode`, spawned on a Tokio runtime that then ends; the runtime is
/// shut down from a plain thread with a 1 s deadline. The shutdown closes the router, and takes far
/// less than the router's close timeout (10 s): the stream subscription's reader task, dropped with
/// the ended runtime, was never counted out, and the close waited for it until its timeout.
fn shut_down_after_tokio_ended(mode: DeliveryMode, multi_thread: bool) {
    let tokio = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let prefix = unique_prefix();
    let Some(runtime) = tokio.block_on(async {
        if !redis_available().await {
            return None;
        }
        let router = connected(builder(mode, &prefix).close_timeout(Duration::from_secs(10))).await;
        let runtime = Runtime::new(router);
        runtime
            .spawn_with(Ticker, AgentOptions::new().fan_out())
            .await
            .unwrap();
        Some(runtime)
    }) else {
        return;
    };
    drop(tokio);
    let shut_down = runtime.clone();
    let began = Instant::now();
    let report = outside_tokio("the shutdown", move || {
        futures::executor::block_on(shut_down.shutdown(Duration::from_secs(1)))
    })
    .expect("the shutdown closed the router");
    let took = began.elapsed();
    assert_eq!(report, agentcomm_core::runtime::ShutdownReport::default());
    assert!(
        took < Duration::from_secs(5),
        "{mode:?}: the shutdown took {took:?}"
    );
    let health = outside_tokio("health after the shutdown", move || {
        futures::executor::block_on(runtime.router().health())
    });
    assert!(!health.connected, "{health:?}");
}

#[test]
fn a_streams_runtime_shuts_down_promptly_after_its_current_thread_tokio_ended() {
    shut_down_after_tokio_ended(DeliveryMode::Streams, false);
}

#[test]
fn a_streams_runtime_shuts_down_promptly_after_its_multi_thread_tokio_ended() {
    shut_down_after_tokio_ended(DeliveryMode::Streams, true);
}

#[test]
fn a_pubsub_runtime_shuts_down_promptly_after_its_tokio_ended() {
    shut_down_after_tokio_ended(DeliveryMode::PubSub, true);
}

/// A router connected on a current_thread Tokio runtime that is alive but not driven (outside its
/// `block_on`), closed from another runtime: the close, which runs on the router's runtime, cannot
/// run there, and `close` says so after its bound (`close_timeout` + 3 s) instead of waiting for
/// ever; the router is closed all the same once its runtime is driven again.
#[test]
fn a_close_on_a_router_whose_runtime_nobody_drives_answers_after_its_bound() {
    let origin = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let available = origin.block_on(redis_available());
    if !available {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = origin.block_on(connected(
        builder(DeliveryMode::Streams, &prefix).close_timeout(Duration::from_millis(500)),
    ));
    let closing = router.clone();
    let (result, took) = outside_tokio("closing from another runtime", move || {
        let other = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let started = Instant::now();
        let result = other.block_on(Router::close(&closing));
        (result, started.elapsed())
    });
    assert!(
        matches!(result, Err(agentcomm_core::Error::Timeout { .. })),
        "{result:?}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    // Driven again, the router's runtime runs the close.
    origin
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(10), Router::close(&router)).await
        })
        .expect("the close ends once its runtime is driven")
        .unwrap();
}

/// Two closes at once on a router whose Tokio runtime ended, with a delivery still held: the close
/// runs in place, on the callers' runtime, and neither call returns before it is over (here at
/// `close_timeout`: the held delivery's settling needed the ended runtime). Before, each call closed
/// in place on its own: the one that found the subscription waited for the delivery, and the other
/// returned `Ok` within about a second, the router still closing.
#[test]
fn two_closes_after_the_routers_runtime_ended_both_wait_for_the_close() {
    let origin = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    if !origin.block_on(redis_available()) {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let (router, subscription, held) = origin.block_on(async {
        let router = connected(
            builder(DeliveryMode::Streams, &prefix).close_timeout(Duration::from_secs(4)),
        )
        .await;
        let pattern = agentcomm_core::channel::ChannelPattern::parse("Tick:*:*").unwrap();
        let mut subscription = router
            .subscribe(agentcomm_core::router::SubscribeOptions::new(pattern).group("g"))
            .await
            .unwrap();
        let channel = agentcomm_core::channel::Channel::new("Tick", "event", "s1").unwrap();
        router
            .publish(agentcomm_core::envelope::Envelope::new(
                channel,
                "application/msgpack",
                vec![0x80],
            ))
            .await
            .unwrap();
        let held = next(&mut subscription).await;
        (router, subscription, held)
    });
    drop(origin);
    let (early, took) = outside_tokio("closing twice", move || {
        let other = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        other.block_on(async move {
            let closes: Vec<_> = (0..2)
                .map(|_| {
                    let router = router.clone();
                    tokio::spawn(async move { Router::close(&router).await })
                })
                .collect();
            // Both closes wait for the held delivery: none returns within these 2.5 s.
            let until = Instant::now() + Duration::from_millis(2500);
            while Instant::now() < until && !closes.iter().any(|close| close.is_finished()) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let early = closes.iter().filter(|close| close.is_finished()).count();
            let started = Instant::now();
            for close in closes {
                tokio::time::timeout(Duration::from_secs(10), close)
                    .await
                    .expect("the closes end by the close timeout")
                    .unwrap()
                    .unwrap();
            }
            drop((held, subscription));
            (early, started.elapsed())
        })
    });
    assert_eq!(
        early, 0,
        "a close returned while the router was still closing (a delivery held)"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
}
