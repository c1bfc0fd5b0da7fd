//! The in-memory router's own promises: bounded queues with all-or-nothing publishes, no message lost
//! without being counted, groups that outlive their members.

use std::time::Duration;

use agentcomm_core::memory::MemoryConfig;
use agentcomm_core::prelude::*;
use agentcomm_core::router::{
    HealthStatus, NackAction, PublishOutcome, SubscribeOptions, Subscription,
};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);

fn ping(session: &str) -> Envelope {
    Envelope::new(
        parse_channel(&format!("Ping:event:{session}")).unwrap(),
        "application/json",
        &b"{}"[..],
    )
}

fn small(capacity: usize) -> MemoryRouter {
    MemoryRouter::with_config(
        MemoryConfig::default()
            .queue_capacity(capacity)
            .publish_timeout(Duration::from_millis(100)),
    )
}

async fn subscribe(router: &MemoryRouter, options: SubscribeOptions) -> Subscription {
    router.subscribe(options).await.unwrap()
}

fn pings() -> SubscribeOptions {
    SubscribeOptions::new(ChannelPattern::parse("Ping:*:*").unwrap()).prefetch(1)
}

/// Takes the next delivery of `subscription` and gives it back for a retry after `delay`.
async fn take_and_retry(subscription: &mut Subscription, delay: Duration) {
    let delivery = timeout(WAIT, subscription.next()).await.unwrap().unwrap();
    delivery.nack(NackAction::Retry { delay }).await.unwrap();
}

#[tokio::test]
async fn a_publish_that_times_out_is_delivered_nowhere() {
    let router = small(2);
    let mut slow = subscribe(&router, pings()).await;
    let mut fast = subscribe(&router, pings()).await;
    for n in 0..2 {
        router.publish(ping(&format!("s{n}"))).await.unwrap();
    }
    // The fast subscriber keeps up; the slow one reads nothing, so its queue is full.
    for _ in 0..2 {
        timeout(WAIT, fast.next())
            .await
            .unwrap()
            .unwrap()
            .ack()
            .await
            .unwrap();
    }
    let error = router.publish(ping("late")).await.unwrap_err();
    assert!(matches!(error, Error::Timeout { .. }), "{error:?}");
    assert!(
        error.to_string().contains("its consumer is not keeping up"),
        "{error}"
    );
    // It names the ways out, not only the cause.
    for fix in [
        "AgentOptions::concurrency",
        "MemoryConfig::queue_capacity",
        "MemoryConfig::publish_timeout",
    ] {
        assert!(error.to_string().contains(fix), "{fix}: {error}");
    }
    // Room comes back; the timed-out message must not appear anywhere.
    for _ in 0..2 {
        timeout(WAIT, slow.next())
            .await
            .unwrap()
            .unwrap()
            .ack()
            .await
            .unwrap();
    }
    router.publish(ping("after")).await.unwrap();
    for subscription in [&mut slow, &mut fast] {
        let delivery = timeout(WAIT, subscription.next()).await.unwrap().unwrap();
        assert_eq!(delivery.envelope().session(), "after");
        delivery.ack().await.unwrap();
        assert!(subscription.try_next().is_none());
    }
    let health = router.health().await;
    assert_eq!(health.get("backpressure_waits"), 1);
    // The publish that timed out was not published (it counted as one before, while its caller was
    // told it failed and it was delivered nowhere).
    assert_eq!(health.get("published"), 3, "{health:?}");
}

#[tokio::test]
async fn room_is_held_until_acknowledged_and_kept_across_a_nack() {
    let router = small(1);
    let mut subscription = subscribe(&router, pings()).await;
    router.publish(ping("a")).await.unwrap();
    let delivery = timeout(WAIT, subscription.next()).await.unwrap().unwrap();
    // Handed out but not acknowledged: the queue is still full.
    assert!(router.publish(ping("b")).await.is_err());
    delivery.nack(NackAction::Requeue).await.unwrap();
    let again = timeout(WAIT, subscription.next()).await.unwrap().unwrap();
    assert!(again.is_redelivered());
    assert_eq!(again.envelope().attempt(), 1);
    again.ack().await.unwrap();
    assert_eq!(
        router.publish(ping("c")).await.unwrap(),
        PublishOutcome::Delivered(1)
    );
    assert_eq!(router.health().await.get("redelivered"), 1);
}

#[tokio::test]
async fn messages_left_unread_in_a_dropped_subscription_are_counted() {
    let router = MemoryRouter::new();
    let subscription = subscribe(&router, pings()).await;
    for n in 0..5 {
        router.publish(ping(&format!("s{n}"))).await.unwrap();
    }
    drop(subscription);
    let health = router.health().await;
    assert_eq!((health.get("dropped"), health.get("subscriptions")), (5, 0));
    assert!(router.publish(ping("after")).await.unwrap().is_unroutable());
}

/// Health said `Healthy` and `ok` after messages were dropped (only the `dropped` counter moved),
/// where a report is `Degraded` when something is wrong, "dropping messages" among the examples: a
/// health check reading the status alone never saw the loss.
#[tokio::test(start_paused = true)]
async fn health_is_degraded_for_a_minute_after_messages_were_dropped() {
    let router = MemoryRouter::new();
    assert_eq!(router.health().await.status, HealthStatus::Healthy);
    let subscription = subscribe(&router, pings()).await;
    router.publish(ping("s1")).await.unwrap();
    drop(subscription);
    let health = router.health().await;
    assert_eq!(health.get("dropped"), 1);
    assert_eq!(health.status, HealthStatus::Degraded, "{health:?}");
    assert!(health.detail.contains("dropped"), "{}", health.detail);
    tokio::time::advance(Duration::from_secs(61)).await;
    let health = router.health().await;
    assert_eq!(
        (health.status, health.detail.as_str(), health.get("dropped")),
        (HealthStatus::Healthy, "ok", 1),
        "the counter keeps the count; the status mends"
    );
}

#[tokio::test]
async fn a_group_keeps_messages_without_members_and_says_so_when_full() {
    let router = small(2);
    let member = subscribe(&router, pings().group("billing")).await;
    drop(member);
    for n in 0..2 {
        assert_eq!(
            router.publish(ping(&format!("s{n}"))).await.unwrap(),
            PublishOutcome::Delivered(1)
        );
    }
    assert_eq!(router.health().await.get("groups_without_members"), 1);
    let error = router.publish(ping("s2")).await.unwrap_err();
    assert!(
        error.to_string().contains("the group has no member")
            && error.to_string().contains("remove_group(\"billing\")"),
        "{error}"
    );
    // A new member gets what waited.
    let mut member = subscribe(&router, pings().group("billing")).await;
    for n in 0..2 {
        let delivery = timeout(WAIT, member.next()).await.unwrap().unwrap();
        assert_eq!(delivery.envelope().session(), format!("s{n}"));
        delivery.ack().await.unwrap();
    }
    drop(member);
    router.publish(ping("s3")).await.unwrap();
    assert_eq!(router.remove_group("billing"), Some(1));
    assert_eq!(router.remove_group("billing"), None);
    let health = router.health().await;
    assert_eq!((health.get("dropped"), health.get("groups")), (1, 0));
}

#[tokio::test]
async fn closing_the_router_counts_what_groups_still_held() {
    let router = MemoryRouter::new();
    let mut fan_out = subscribe(&router, pings()).await;
    let member = subscribe(&router, pings().group("audit")).await;
    drop(member);
    for n in 0..3 {
        router.publish(ping(&format!("s{n}"))).await.unwrap();
    }
    router.close().await.unwrap();
    assert_eq!(router.health().await.get("dropped"), 3, "the group's three");
    // A fan-out subscriber still reads what it had, then its stream ends.
    for _ in 0..3 {
        timeout(WAIT, fan_out.next())
            .await
            .unwrap()
            .unwrap()
            .ack()
            .await
            .unwrap();
    }
    assert!(timeout(WAIT, fan_out.next()).await.unwrap().is_none());
    assert!(matches!(
        router.publish(ping("x")).await.unwrap_err(),
        Error::Closed { .. }
    ));
}

/// A publish waiting for room when the router closes was delivered nowhere because the router closed:
/// it fails with `Closed`, as operations after close do, instead of reporting `Unroutable` (no
/// subscriber matched, which the caller would read as a missing consumer, and a request as "no agent
/// found").
#[tokio::test]
async fn a_publish_waiting_for_room_fails_with_closed_when_the_router_closes() {
    let router = MemoryRouter::with_config(
        MemoryConfig::default()
            .queue_capacity(1)
            .publish_timeout(Duration::from_secs(30)),
    );
    let _full = subscribe(&router, pings()).await;
    router.publish(ping("s0")).await.unwrap();
    let started = tokio::time::Instant::now();
    let (waiting, ()) = tokio::join!(router.publish(ping("s1")), async {
        let deadline = tokio::time::Instant::now() + WAIT;
        while router.health().await.get("backpressure_waits") == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the second publish never waited for room"
            );
            tokio::task::yield_now().await;
        }
        router.close().await.unwrap();
    });
    let error = waiting.unwrap_err();
    assert!(matches!(error, Error::Closed { .. }), "{error:?}");
    assert!(
        started.elapsed() < WAIT,
        "told at once, not after its timeout"
    );
    assert_eq!(router.health().await.get("unroutable"), 0);
}

/// A subscribe racing `close()` either fails with `Closed` or gets a subscription that close ends:
/// never a live subscription on a closed router, whose stream would wait forever (an agent spawned
/// while the runtime shuts down would never stop). The race is narrow, so it is run many times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_racing_close_never_outlives_the_router() {
    for round in 0..100_000 {
        let router = MemoryRouter::new();
        let subscribing = tokio::spawn({
            let router = router.clone();
            async move { router.subscribe(pings()).await }
        });
        router.close().await.unwrap();
        let subscribed = subscribing.await.unwrap();
        let live = router.health().await.get("subscriptions");
        assert_eq!(
            live, 0,
            "round {round}: a subscription is live on the closed router"
        );
        match subscribed {
            Ok(mut subscription) => assert!(
                timeout(WAIT, subscription.next()).await.unwrap().is_none(),
                "round {round}: the stream ended"
            ),
            Err(error) => assert!(matches!(error, Error::Closed { .. }), "{error:?}"),
        }
    }
}

/// `usize::MAX` as a queue capacity or a prefetch (the obvious way to ask for "unbounded") gives a
/// working subscription, not a panic in the semaphore that bounds the queue.
#[tokio::test]
async fn an_unbounded_capacity_or_prefetch_subscribes_instead_of_panicking() {
    let unbounded = MemoryRouter::with_config(MemoryConfig::default().queue_capacity(usize::MAX));
    let huge_prefetch = MemoryRouter::new();
    for (router, options) in [
        (&unbounded, pings()),
        (&huge_prefetch, pings().prefetch(usize::MAX)),
    ] {
        let mut subscription = subscribe(router, options).await;
        for n in 0..3 {
            router.publish(ping(&format!("s{n}"))).await.unwrap();
        }
        for _ in 0..3 {
            timeout(WAIT, subscription.next())
                .await
                .unwrap()
                .unwrap()
                .ack()
                .await
                .unwrap();
        }
    }
}

/// A publish timeout too long to add to the clock (`Duration::MAX`, to wait as long as it takes) makes
/// a publish to a full queue wait for room, not panic computing its deadline.
#[tokio::test]
async fn a_publish_timeout_of_duration_max_waits_instead_of_panicking() {
    let router = MemoryRouter::with_config(
        MemoryConfig::default()
            .queue_capacity(1)
            .publish_timeout(Duration::MAX),
    );
    let mut subscription = subscribe(&router, pings()).await;
    router.publish(ping("s0")).await.unwrap();
    let (waiting, ()) = tokio::join!(router.publish(ping("s1")), async {
        let deadline = tokio::time::Instant::now() + WAIT;
        while router.health().await.get("backpressure_waits") == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the second publish never waited for room"
            );
            tokio::task::yield_now().await;
        }
        // Room comes back: the waiting publish goes through.
        let first = timeout(WAIT, subscription.next()).await.unwrap().unwrap();
        first.ack().await.unwrap();
    });
    assert_eq!(waiting.unwrap(), PublishOutcome::Delivered(1));
    let second = timeout(WAIT, subscription.next()).await.unwrap().unwrap();
    assert_eq!(second.envelope().session(), "s1");
}

fn on(class: &str) -> Envelope {
    Envelope::new(
        parse_channel(&format!("{class}:event:s1")).unwrap(),
        "application/json",
        &b"{}"[..],
    )
}

fn fan_out_on(classes: &[&str]) -> SubscribeOptions {
    let patterns = classes
        .iter()
        .map(|class| ChannelPattern::parse(&format!("{class}:*:*")).unwrap())
        .collect();
    SubscribeOptions::patterns(patterns).prefetch(1)
}

/// Reads and acknowledges everything, and sends on the classes it read.
fn consume(mut subscription: Subscription) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(delivery) = subscription.next().await {
            let _ = sender.send(delivery.envelope().channel().class().to_string());
            delivery.ack().await.unwrap();
        }
    });
    receiver
}

/// Waits (without letting the paused clock run) until `count` publishes have waited for room.
async fn waits_for_room(router: &MemoryRouter, count: u64) {
    for _ in 0..10_000 {
        if router.health().await.get("backpressure_waits") >= count {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("{count} publishes never waited for room");
}

/// Two publishes to the same full queues, each holding room the other waits for, must not block
/// each other while the consumers keep reading: room is waited for in one order by every publish,
/// without holding room further along it. (Before, the first held room in queue A waiting for C,
/// the second held C waiting for A, and both failed at their publish timeout, saying the consumers
/// were not keeping up.)
#[tokio::test(start_paused = true)]
async fn two_publishes_waiting_for_room_in_the_same_queues_do_not_block_each_other() {
    let router = MemoryRouter::with_config(
        MemoryConfig::default()
            .queue_capacity(1)
            .publish_timeout(Duration::from_secs(3600)),
    );
    let a = subscribe(&router, fan_out_on(&["Ping"])).await;
    let mut b = subscribe(&router, fan_out_on(&["Ping", "Pong"])).await;
    let mut c = subscribe(&router, fan_out_on(&["Ping", "Pang"])).await;
    // B and C are full; A has room.
    router.publish(on("Pong")).await.unwrap();
    router.publish(on("Pang")).await.unwrap();
    // The first Ping takes A's room and waits for B's.
    let first = tokio::spawn({
        let router = router.clone();
        async move { router.publish(on("Ping")).await }
    });
    waits_for_room(&router, 1).await;
    // C's room comes back; the second Ping takes it, finds A's taken, and waits.
    c.next().await.unwrap().ack().await.unwrap();
    let second = tokio::spawn({
        let router = router.clone();
        async move { router.publish(on("Ping")).await }
    });
    waits_for_room(&router, 2).await;
    // B's room comes back; from here on every queue is read as fast as it fills.
    b.next().await.unwrap().ack().await.unwrap();
    let (mut read_a, mut read_b, mut read_c) = (consume(a), consume(b), consume(c));
    let (first, second) = timeout(WAIT, async { (first.await, second.await) })
        .await
        .expect("the two publishes blocked each other");
    assert_eq!(first.unwrap().unwrap(), PublishOutcome::Delivered(3));
    assert_eq!(second.unwrap().unwrap(), PublishOutcome::Delivered(3));
    for read in [&mut read_a, &mut read_b, &mut read_c] {
        for _ in 0..2 {
            assert_eq!(timeout(WAIT, read.recv()).await.unwrap().unwrap(), "Ping");
        }
    }
}

/// Health counts the retries waiting out their delay (`retries_waiting`) until they are queued
/// again. Before, a message in its delay showed nowhere: not queued, not delivered, not dropped.
#[tokio::test(start_paused = true)]
async fn health_counts_the_retries_waiting_out_their_delay() {
    let router = MemoryRouter::new();
    let mut subscription = subscribe(&router, pings().group("workers")).await;
    router.publish(ping("s1")).await.unwrap();
    take_and_retry(&mut subscription, Duration::from_secs(60)).await;
    let health = router.health().await;
    assert_eq!(
        (health.get("retries_waiting"), health.get("queued")),
        (1, 0),
        "{health:?}"
    );
    // The paused clock runs on to the end of the delay; the retry is queued and handed out again.
    let again = timeout(Duration::from_secs(120), subscription.next())
        .await
        .unwrap()
        .unwrap();
    assert!(again.is_redelivered());
    assert_eq!(router.health().await.get("retries_waiting"), 0);
    again.ack().await.unwrap();
}

/// Messages waiting out their retry delay inside the router when it closes can never come back:
/// they are counted as dropped when it closes, like what the queues held, not when their delay
/// ends (which may be after the process has gone, with nothing counted or logged).
#[tokio::test]
async fn closing_the_router_counts_the_retries_waiting_out_their_delay() {
    let router = MemoryRouter::new();
    let mut member = subscribe(&router, pings().group("workers")).await;
    let mut fan_out = subscribe(&router, pings()).await;
    router.publish(ping("s1")).await.unwrap();
    for subscription in [&mut member, &mut fan_out] {
        take_and_retry(subscription, Duration::from_secs(60)).await;
    }
    router.close().await.unwrap();
    let health = router.health().await;
    assert_eq!(
        (health.get("dropped"), health.get("redelivered")),
        (2, 0),
        "both retries are lost with the router"
    );
    assert!(timeout(WAIT, fan_out.next()).await.unwrap().is_none());
}

/// A retry waiting out its delay when its Tokio runtime ends is put back at once, not lost: the
/// router (shared with another runtime) still delivers it.
#[test]
fn a_retry_whose_runtime_ends_during_its_delay_is_put_back_at_once() {
    let router = MemoryRouter::new();
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut member = first.block_on(async {
        let mut member = subscribe(&router, pings().group("workers")).await;
        router.publish(ping("s1")).await.unwrap();
        take_and_retry(&mut member, Duration::from_secs(3600)).await;
        member
    });
    drop(first);
    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    second.block_on(async {
        let again = timeout(WAIT, member.next()).await.unwrap().unwrap();
        assert_eq!(again.envelope().attempt(), 2);
        again.ack().await.unwrap();
        assert_eq!(router.health().await.get("dropped"), 0);
    });
}

/// Removing a group drops its retries waiting out their delay too, and says how many it dropped.
#[tokio::test]
async fn removing_a_group_counts_its_retries_waiting_out_their_delay() {
    let router = MemoryRouter::new();
    let mut member = subscribe(&router, pings().group("workers")).await;
    router.publish(ping("s1")).await.unwrap();
    router.publish(ping("s2")).await.unwrap();
    take_and_retry(&mut member, Duration::from_secs(60)).await;
    drop(member);
    assert_eq!(
        router.remove_group("workers"),
        Some(2),
        "the one queued and the one waiting to be retried"
    );
    assert_eq!(router.health().await.get("dropped"), 2);
}

/// A delivery still held when its queue closes (a fan-out subscriber reading its buffer after the
/// router closed, a group member's message in flight) and nacked for a retry afterwards can never
/// come back: it is counted as dropped when it is nacked, not when its delay ends (which may be
/// after the process has gone, with nothing counted or logged), and only once.
#[tokio::test(start_paused = true)]
async fn a_retry_nacked_after_its_queue_closed_is_counted_as_dropped_at_once() {
    let router = MemoryRouter::new();
    let mut member = subscribe(&router, pings().group("workers")).await;
    let mut fan_out = subscribe(&router, pings()).await;
    router.publish(ping("s1")).await.unwrap();
    let mut held = Vec::new();
    for subscription in [&mut member, &mut fan_out] {
        held.push(timeout(WAIT, subscription.next()).await.unwrap().unwrap());
    }
    router.close().await.unwrap();
    for delivery in held {
        delivery
            .nack(NackAction::Retry {
                delay: Duration::from_secs(60),
            })
            .await
            .unwrap();
    }
    let health = router.health().await;
    assert_eq!(
        (health.get("dropped"), health.get("redelivered")),
        (2, 0),
        "both retries were lost when they were nacked, before their delay ended"
    );
    // Once their delay would have ended, they are not counted a second time.
    tokio::time::sleep(Duration::from_secs(61)).await;
    let health = router.health().await;
    assert_eq!((health.get("dropped"), health.get("redelivered")), (2, 0));
}

/// A retry counted as dropped when its queue closed is not counted again when its delay ends.
#[tokio::test(start_paused = true)]
async fn a_retry_dropped_at_close_is_not_counted_again_when_its_delay_ends() {
    let router = MemoryRouter::new();
    let mut member = subscribe(&router, pings().group("workers")).await;
    let mut fan_out = subscribe(&router, pings()).await;
    router.publish(ping("s1")).await.unwrap();
    for subscription in [&mut member, &mut fan_out] {
        take_and_retry(subscription, Duration::from_secs(60)).await;
    }
    router.close().await.unwrap();
    assert_eq!(router.health().await.get("dropped"), 2);
    tokio::time::sleep(Duration::from_secs(61)).await;
    let health = router.health().await;
    assert_eq!(
        (health.get("dropped"), health.get("redelivered")),
        (2, 0),
        "counted once, at close"
    );
}
