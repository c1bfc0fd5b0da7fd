//! Reconnection through the testkit's fault proxy: cuts, refusals and a black hole between the router
//! and RabbitMQ. Scenario sizes scale with AGENTCOMM_SOAK (a factor, default 1).

use crate::common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentcomm_amqp::{AmqpRouter, AmqpRouterBuilder, topology};
use agentcomm_core::backoff::Backoff;
use agentcomm_core::envelope::{Envelope, MessageId};
use agentcomm_core::router::{
    HealthStatus, NackAction, PublishOutcome, Router, SubscribeOptions, Subscription,
};
use agentcomm_core::{ChannelPattern, Error, parse_channel};
use agentcomm_testkit::proxy::FaultProxy;
use tokio::time::Instant;

use crate::common::{
    Cleanup, Logs, Raw, broker_address, broker_available, builder, unique, wait_until, within,
};

fn soak() -> usize {
    std::env::var("AGENTCOMM_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|factor| *factor >= 1)
        .unwrap_or(1)
}

/// The broker URL, pointed at the proxy.
fn proxied_url(proxy: &FaultProxy) -> String {
    common::through(&common::url(), proxy.local_addr())
}

/// A RABBITMQ_URL without a port (RabbitMQ's default, 5672) still goes through the proxy: pointed
/// at it by replacing the text `host:port`, it went straight to RabbitMQ, and every cut, refusal and
/// black hole of these tests missed the router.
#[test]
fn a_broker_url_without_a_port_is_pointed_through_the_proxy() {
    let proxy: std::net::SocketAddr = "127.0.0.1:40000".parse().unwrap();
    for (url, expected) in [
        (
            "amqp://guest:guest@localhost/%2f",
            "amqp://guest:guest@127.0.0.1:40000/%2f",
        ),
        (
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            "amqp://guest:guest@127.0.0.1:40000/%2f",
        ),
        ("amqp://[::1]", "amqp://127.0.0.1:40000"),
    ] {
        assert_eq!(common::through(url, proxy), expected, "{url}");
    }
}

/// The proxy's target, from RABBITMQ_URL: an IPv6 literal without a port gets RabbitMQ's (a `:`
/// inside the brackets is not a port), as does a host followed by a fragment.
#[test]
fn the_broker_address_of_an_ipv6_url_without_a_port_has_the_default_port() {
    for (url, expected) in [
        ("amqp://guest:guest@[::1]/%2f", "[::1]:5672"),
        ("amqp://[::1]:5673", "[::1]:5673"),
        ("amqp://guest:guest@localhost", "localhost:5672"),
        ("amqp://localhost#x", "localhost:5672"),
        ("amqp://127.0.0.1:5673/%2f", "127.0.0.1:5673"),
    ] {
        assert_eq!(common::address_of(url), expected, "{url}");
    }
}

/// A router through the proxy that reconnects fast and notices a silent broker within seconds.
async fn proxied_router(proxy: &FaultProxy, exchange: &str) -> AmqpRouter {
    within(
        "connect through the proxy",
        AmqpRouter::builder(proxied_url(proxy))
            .exchange(exchange)
            .reconnect(Backoff::new(
                Duration::from_millis(50),
                Duration::from_millis(500),
            ))
            .heartbeat(Duration::from_secs(2))
            .confirm_timeout(Duration::from_secs(5))
            .publish_outage_timeout(Duration::from_secs(20))
            .close_timeout(Duration::from_secs(5))
            .connect(),
    )
    .await
    .expect("connect")
}

async fn start_proxy() -> FaultProxy {
    within("the proxy", FaultProxy::start(broker_address()))
        .await
        .expect("proxy")
}

fn envelope(n: u64) -> Envelope {
    Envelope::new(
        parse_channel("Payment:request:s1").expect("channel"),
        "application/json",
        format!(r#"{{"n":{n}}}"#).into_bytes(),
    )
}

#[derive(Default)]
struct Tally {
    /// Successful handlings (ack returned Ok) per message id, and whether any was a redelivery.
    handled: Mutex<HashMap<MessageId, (u32, bool)>>,
    ack_failures: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_survive_six_cuts_through_a_group_queue() {
    if !broker_available().await {
        return;
    }
    let total = 10_000 * soak() as u64;
    let cuts_wanted = 6u64;
    let members = 2usize;
    let prefetch = 50usize;
    let publishers = 16usize;
    let proxy = start_proxy().await;
    let exchange = unique("t-cuts");
    let _cleanup = Cleanup::new(&exchange, &[topology::group_queue(&exchange, "payments")]);
    let router = proxied_router(&proxy, &exchange).await;
    let tally = Arc::new(Tally::default());
    let mut consumers = Vec::new();
    for _ in 0..members {
        let mut subscription = within(
            "subscribe",
            router.subscribe(
                SubscribeOptions::new(ChannelPattern::parse("Payment:*:*").unwrap())
                    .group("payments")
                    .prefetch(prefetch),
            ),
        )
        .await
        .expect("subscribe");
        let tally = tally.clone();
        consumers.push(tokio::spawn(async move {
            while let Some(delivery) = subscription.next().await {
                let id = delivery.envelope().id();
                let redelivered = delivery.is_redelivered();
                match delivery.ack().await {
                    Ok(()) => {
                        let mut handled = tally.handled.lock().unwrap();
                        let entry = handled.entry(id).or_default();
                        entry.0 += 1;
                        entry.1 |= redelivered;
                    }
                    Err(_) => {
                        tally.ack_failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    // Publishers: each message published once. The router itself must carry every publish through
    // the cuts (resending what lost its confirm); an error here is a failure of the router.
    let next = Arc::new(AtomicU64::new(0));
    let publish_errors = Arc::new(AtomicU64::new(0));
    let mut producers = Vec::new();
    for _ in 0..publishers {
        let router = router.clone();
        let next = next.clone();
        let publish_errors = publish_errors.clone();
        producers.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return;
                }
                match router.publish(envelope(n)).await {
                    Ok(PublishOutcome::Accepted) => {}
                    Ok(other) => panic!("message {n}: {other:?}"),
                    Err(error) => {
                        publish_errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("publish of message {n} failed: {error}");
                    }
                }
            }
        }));
    }

    // The cutter: a cut each time another seventh of the messages has been handled.
    let mut cuts = 0u64;
    let deadline = Instant::now() + Duration::from_secs(120 * soak() as u64);
    while cuts < cuts_wanted {
        assert!(
            Instant::now() < deadline,
            "the flow stalled after {cuts} cuts"
        );
        let handled = tally.handled.lock().unwrap().len() as u64;
        if handled >= (cuts + 1) * total / (cuts_wanted + 1) {
            proxy.cut_all();
            cuts += 1;
            // Let it reconnect and restore both consumers before the next cut, so that every cut
            // interrupts a live flow.
            let restored = cuts * members as u64;
            wait_until("the reconnect and the consumers", async || {
                router.is_connected() && router.health().await.get("consumers_restored") >= restored
            })
            .await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for producer in producers {
        within("the publishers", producer).await.unwrap();
    }
    let failed = publish_errors.load(Ordering::Relaxed);
    assert_eq!(failed, 0, "publishes failed instead of riding out the cuts");
    // Every message handled, nothing in a handler's hands or buffered, and nothing waiting in the
    // queue (redeliveries of acks lost in a cut included) before duplicates are counted.
    let raw = Raw::open().await;
    let queue = topology::group_queue(&exchange, "payments");
    while (tally.handled.lock().unwrap().len() as u64) < total {
        assert!(
            Instant::now() < deadline,
            "only {} of {total} messages were handled",
            tally.handled.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_until("the queue and the consumers to be drained", async || {
        let health = router.health().await;
        health.get("in_flight") == 0
            && health.get("buffered") == 0
            && raw.count(&queue).await == Some(0)
    })
    .await;
    let health = within("health", router.health()).await;
    let (handled_count, twice) = {
        let handled = tally.handled.lock().unwrap();
        let twice: Vec<(u32, bool)> = handled
            .values()
            .filter(|(count, _)| *count > 1)
            .copied()
            .collect();
        (handled.len() as u64, twice)
    };
    let redelivered_twice = twice.iter().filter(|(_, redelivered)| *redelivered).count();
    let resent_twice = twice.len() - redelivered_twice;
    println!(
        "{total} messages, {cuts} cuts (proxy: {:?}): every message handled; handled twice: {} \
         ({redelivered_twice} redelivered after their ack was lost in a cut, {resent_twice} published again \
         after their confirm was lost in a cut); acks refused as stale: {}; publish errors: {}; \
         router: reconnects {}, resent {}, consumers restored {}, stale discarded {}",
        proxy.stats(),
        twice.len(),
        tally.ack_failures.load(Ordering::Relaxed),
        publish_errors.load(Ordering::Relaxed),
        health.get("reconnects"),
        health.get("resent"),
        health.get("consumers_restored"),
        health.get("stale_discarded"),
    );
    assert_eq!(handled_count, total, "none lost");
    assert!(health.get("reconnects") >= cuts, "{health:?}");
    assert!(
        health.get("consumers_restored") >= cuts * members as u64,
        "{health:?}"
    );
    // Every duplicate has a cause the router reports. A cut loses at most the acks in flight (the
    // prefetch of each member): those come back flagged as redelivered. And it loses at most the
    // confirms in flight (one per publisher), which the router sends again (`resent`).
    let resent = health.get("resent");
    assert!(
        resent > 0,
        "no publish was waiting for its confirm in any of {cuts} cuts: {health:?}"
    );
    assert!(
        resent <= cuts * publishers as u64,
        "more publishes resent ({resent}) than could wait for a confirm in {cuts} cuts"
    );
    assert!(
        resent_twice as u64 <= resent,
        "duplicates not explained by resent publishes: {resent_twice} vs {health:?}"
    );
    assert!(
        redelivered_twice <= cuts as usize * members * prefetch,
        "{redelivered_twice} redelivered duplicates, more than {cuts} cuts can explain"
    );
    within("close", router.close()).await.unwrap();
    for consumer in consumers {
        within("the consumers", consumer).await.unwrap();
    }
    assert_eq!(
        raw.count(&queue).await,
        Some(0),
        "nothing left in the queue"
    );

    raw.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_during_an_outage_waits_for_the_reconnect_or_fails_clearly() {
    if !broker_available().await {
        return;
    }
    let proxy = start_proxy().await;
    let exchange = unique("t-outage");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = proxied_router(&proxy, &exchange).await;
    let mut subscription = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Payment:*:*").unwrap(),
        )),
    )
    .await
    .unwrap();

    // A short outage: the publish waits, then goes through, and the fan-out queue kept its place.
    proxy.refuse_for(Duration::from_millis(800));
    proxy.cut_all();
    wait_until("the disconnect", async || !router.is_connected()).await;
    let health = within("health", router.health()).await;
    assert!(!health.connected);
    assert!(health.detail.contains("reconnecting"), "{}", health.detail);
    let started = Instant::now();
    let outcome = within("a publish through the outage", router.publish(envelope(1)))
        .await
        .unwrap();
    assert_eq!(outcome, PublishOutcome::Accepted);
    println!(
        "the publish waited {:?} for the reconnect",
        started.elapsed()
    );
    let delivery = within("the delivery", subscription.next()).await.unwrap();
    assert_eq!(delivery.envelope().payload().as_ref(), br#"{"n":1}"#);
    within("ack", delivery.ack()).await.unwrap();

    // A long outage: the publish gives up after the configured bound, saying why.
    let impatient = within(
        "connect",
        AmqpRouter::builder(proxied_url(&proxy))
            .exchange(&exchange)
            .reconnect(Backoff::new(
                Duration::from_millis(50),
                Duration::from_millis(200),
            ))
            .publish_outage_timeout(Duration::from_millis(700))
            .connect(),
    )
    .await
    .unwrap();
    proxy.refuse_for(Duration::from_secs(3));
    proxy.cut_all();
    wait_until("the disconnect", async || !impatient.is_connected()).await;
    let started = Instant::now();
    let error = within("a publish in a long outage", impatient.publish(envelope(2)))
        .await
        .unwrap_err();
    let waited = started.elapsed();
    let text = error.to_string();
    assert!(matches!(error, Error::Connection { .. }), "{text}");
    assert!(text.contains("no publishing connection for"), "{text}");
    assert!(text.contains("gave up after 700ms"), "{text}");
    assert!(!text.contains(":guest@"), "{text}");
    assert!(
        waited >= Duration::from_millis(600) && waited < Duration::from_secs(3),
        "waited {waited:?}"
    );
    // After the outage both routers work again.
    wait_until("the reconnect", async || {
        impatient.is_connected() && router.is_connected()
    })
    .await;
    let outcome = within("a publish after the outage", impatient.publish(envelope(3)))
        .await
        .unwrap();
    assert_eq!(outcome, PublishOutcome::Accepted);
    let delivery = within("the delivery", subscription.next()).await.unwrap();
    assert_eq!(delivery.envelope().payload().as_ref(), br#"{"n":3}"#);
    within("ack", delivery.ack()).await.unwrap();
    let health = within("health", impatient.health()).await;
    assert!(health.get("reconnects") >= 1, "{health:?}");
    assert!(health.get("publish_failures") >= 1, "{health:?}");
    within("close", impatient.close()).await.unwrap();
    within("close", router.close()).await.unwrap();
}

/// A publish whose frame was sent but whose confirm never came (the connection was cut first) is sent
/// again on the new connection, once, and its caller sees it accepted, not failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_cut_off_before_its_confirm_is_sent_again_once_and_accepted() {
    if !broker_available().await {
        return;
    }
    let proxy = start_proxy().await;
    let exchange = unique("t-resend");
    let _cleanup = Cleanup::new(&exchange, &[topology::group_queue(&exchange, "resend")]);
    let router = proxied_router(&proxy, &exchange).await;
    let mut subscription = within(
        "subscribe",
        router.subscribe(
            SubscribeOptions::new(ChannelPattern::parse("Payment:*:*").unwrap()).group("resend"),
        ),
    )
    .await
    .unwrap();
    // A first publish opens the publishing channel: the next one takes the usual path.
    let outcome = within("a first publish", router.publish(envelope(1)))
        .await
        .unwrap();
    assert_eq!(outcome, PublishOutcome::Accepted);
    let delivery = within("the first delivery", subscription.next())
        .await
        .unwrap();
    within("ack", delivery.ack()).await.unwrap();
    let before = within("health", router.health()).await;

    // The proxy holds what the client sends: the frame leaves the client, no confirm comes back.
    proxy.blackhole(true);
    let publishing = tokio::spawn({
        let router = router.clone();
        async move { router.publish(envelope(2)).await }
    });
    wait_until("the publish to wait for its confirm", async || {
        router.health().await.get("unconfirmed") == 1
    })
    .await;
    proxy.cut_all();
    proxy.blackhole(false);
    let outcome = within("the publish across the cut", publishing)
        .await
        .expect("the publishing task")
        .expect("accepted after the reconnect");
    assert_eq!(outcome, PublishOutcome::Accepted);
    let after = within("health", router.health()).await;
    let delta = |name: &str| after.get(name) - before.get(name);
    assert_eq!(delta("resent"), 1, "{after:?}");
    assert_eq!(delta("published"), 1, "{after:?}");
    assert_eq!(delta("confirmed"), 1, "{after:?}");
    assert_eq!(delta("publish_failures"), 0, "{after:?}");
    assert_eq!(after.get("unconfirmed"), 0, "{after:?}");
    // The held frame died with the cut connection: the broker got the message once, by the resend.
    let delivery = within("the resent message", subscription.next())
        .await
        .unwrap();
    assert_eq!(delivery.envelope().payload().as_ref(), br#"{"n":2}"#);
    within("ack", delivery.ack()).await.unwrap();
    within("close", router.close()).await.unwrap();
}

/// While RabbitMQ is silent, every health call answers within the operation timeout, however many
/// are made at once. Each call's probe waited for the declaration channel behind the calls before it,
/// then up to the operation timeout to open it and 2 s for its own request: four calls at once took
/// 2, 3, 4 and 5 s with an operation timeout of 1 s, and a monitor asking every second was answered
/// later and later, for as long as the silence lasted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_within_the_operation_timeout_while_rabbitmq_is_silent() {
    if !broker_available().await {
        return;
    }
    let proxy = start_proxy().await;
    let exchange = unique("t-health-silent");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = within(
        "connect through the proxy",
        AmqpRouter::builder(proxied_url(&proxy))
            .exchange(&exchange)
            .operation_timeout(Duration::from_secs(1))
            .connect(),
    )
    .await
    .unwrap();
    proxy.blackhole(true);
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let router = router.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let health = router.health().await;
                (started.elapsed(), health)
            })
        })
        .collect();
    for call in calls {
        let (took, health) = within("a health call", call).await.expect("the call");
        // The bound is the operation timeout; the second on top of it is slack for a busy machine.
        assert!(
            took < Duration::from_secs(2),
            "a health call took {took:?} with an operation timeout of 1 s: {health:?}"
        );
    }
    proxy.blackhole(false);
    // Giving up on the probe broke nothing: once RabbitMQ answers, so does the probe.
    wait_until("a health call with a round trip", async || {
        router.health().await.round_trip.is_some()
    })
    .await;
    within("close", router.close()).await.unwrap();
}

/// While RabbitMQ answers nothing (a stalled broker or network; the heartbeat takes two intervals,
/// 40 s with the defaults, to give the connection up), health says so: degraded, with no round trip,
/// from the first call whose probe found the channel free, and on every call after it until a probe
/// is answered again, including calls whose probes only waited for the channel behind the
/// unanswered ones. It said `Healthy`, "ok", throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_degraded_while_rabbitmq_does_not_answer_the_probe() {
    if !broker_available().await {
        return;
    }
    let proxy = start_proxy().await;
    let exchange = unique("t-health-unanswered");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = within(
        "connect through the proxy",
        AmqpRouter::builder(proxied_url(&proxy))
            .exchange(&exchange)
            .operation_timeout(Duration::from_secs(1))
            .connect(),
    )
    .await
    .unwrap();
    let before = within("health", router.health()).await;
    assert_eq!(before.status, HealthStatus::Healthy, "{before:?}");
    assert!(before.round_trip.is_some(), "{before:?}");
    proxy.blackhole(true);
    let first = within("health", router.health()).await;
    assert_eq!(first.status, HealthStatus::Degraded, "{first:?}");
    assert!(first.connected, "{first:?}");
    assert!(first.round_trip.is_none(), "{first:?}");
    assert!(
        first
            .detail
            .contains("RabbitMQ did not answer the health probe within 1s"),
        "{first:?}"
    );
    // Calls at once, one after the other: the first of them waits for an opening of the channel
    // (the first probe's request timed out and retired it), the others for that one.
    for round in 0..2 {
        let calls: Vec<_> = (0..3)
            .map(|_| {
                let router = router.clone();
                tokio::spawn(async move { router.health().await })
            })
            .collect();
        for call in calls {
            let health = within("a health call", call).await.expect("the call");
            assert_eq!(
                health.status,
                HealthStatus::Degraded,
                "round {round}: {health:?}"
            );
            assert!(
                health.detail.contains("did not answer the health probe"),
                "round {round}: {health:?}"
            );
        }
    }
    proxy.blackhole(false);
    wait_until("a healthy health call with a round trip", async || {
        let health = router.health().await;
        health.status == HealthStatus::Healthy && health.round_trip.is_some()
    })
    .await;
    within("close", router.close()).await.unwrap();
}

/// On a slow link, a health call that waited for the declaration channel behind another still
/// answers in time, and leaves the channel usable. Its request was given only what was left of the
/// call's time: it timed out, and retired a good channel; with opening and asking then taking longer
/// than the limit, every later call opened a channel and retired it, and the probe never had a round
/// trip again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_calls_queued_on_a_slow_link_keep_the_declaration_channel() {
    if !broker_available().await {
        return;
    }
    let proxy = start_proxy().await;
    let exchange = unique("t-health-slow");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = within(
        "connect through the proxy",
        AmqpRouter::builder(proxied_url(&proxy))
            .exchange(&exchange)
            .operation_timeout(Duration::from_secs(1))
            .connect(),
    )
    .await
    .unwrap();
    // A round trip takes about 0.6 s, within the 1 s limit; opening a channel and then asking takes
    // about 1.2 s, beyond it.
    proxy.set_latency(Duration::from_millis(300));
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let router = router.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let health = router.health().await;
                (started.elapsed(), health)
            })
        })
        .collect();
    for call in calls {
        let (took, health) = within("a health call", call).await.expect("the call");
        // The bound is the operation timeout; the second on top of it is slack for a busy machine.
        assert!(
            took < Duration::from_secs(2),
            "a health call took {took:?} with an operation timeout of 1 s: {health:?}"
        );
        // The second call's probe asked only once the first one's was answered, too late for its
        // call: RabbitMQ answers, and the call only waited for a busy channel.
        assert_eq!(health.status, HealthStatus::Healthy, "{health:?}");
    }
    wait_until("a health call with a round trip", async || {
        router.health().await.round_trip.is_some()
    })
    .await;
    proxy.set_latency(Duration::ZERO);
    within("close", router.close()).await.unwrap();
}

/// A publish whose channel was lost before its confirm waits to be sent again: its confirm is still
/// owed. Health counted only what waits on the current channel, so through the outage, when those
/// publishes are most at risk, `unconfirmed` said 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_counts_a_publish_waiting_to_be_sent_again_as_unconfirmed() {
    if !broker_available().await {
        return;
    }
    let proxy = start_proxy().await;
    let exchange = unique("t-resend-health");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = within(
        "connect through the proxy",
        AmqpRouter::builder(proxied_url(&proxy))
            .exchange(&exchange)
            .reconnect(Backoff::new(
                Duration::from_millis(50),
                Duration::from_millis(500),
            ))
            // A health call's round trip into the silence below gives up within these 1-2 s,
            // well before the confirm timeout.
            .operation_timeout(Duration::from_secs(1))
            .confirm_timeout(Duration::from_secs(10))
            .connect(),
    )
    .await
    .unwrap();
    // A first publish opens the publishing channel (nothing is bound: it comes back unroutable).
    within("a first publish", router.publish(envelope(1)))
        .await
        .unwrap();
    proxy.blackhole(true);
    let publishing = tokio::spawn({
        let router = router.clone();
        async move { router.publish(envelope(2)).await }
    });
    wait_until("the publish to wait for its confirm", async || {
        router.health().await.get("unconfirmed") == 1
    })
    .await;
    // The connection is cut and the broker unreachable until health has counted the publish waiting
    // to be resent: the outage ends below, once seen, not at a set time that a slow health call or a
    // busy machine could outlast. The proxy stops listening on a task of its own: under load, a
    // reconnect 50 ms after the cut could still reach it, and the publish be sent again before any
    // health call saw the outage; so the cut waits for the refusals.
    proxy.reject_for(Duration::from_secs(120));
    wait_until("the proxy to stop listening", async || {
        tokio::net::TcpStream::connect(proxy.local_addr())
            .await
            .is_err()
    })
    .await;
    proxy.cut_all();
    proxy.blackhole(false);
    wait_until(
        "health to count it while the publishing connection is down",
        async || {
            let health = router.health().await;
            health.detail.contains("publishing connection is down")
                && health.get("unconfirmed") == 1
        },
    )
    .await;
    proxy.reject_for(Duration::ZERO);
    let outcome = within("the publish after the outage", publishing)
        .await
        .expect("the publishing task")
        .expect("sent again and confirmed");
    assert_eq!(outcome, PublishOutcome::Unroutable);
    let health = within("health", router.health()).await;
    assert_eq!(health.get("unconfirmed"), 0, "{health:?}");
    assert_eq!(health.get("resent"), 1, "{health:?}");
    within("close", router.close()).await.unwrap();
}

/// `resent` counts publishes sent again after their channel was lost before the confirm (and bounds
/// the duplicates that can follow). It was counted when the channel was lost, before the resend: a
/// publish that then gave up in the outage, never sent again, counted as resent all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_gives_up_in_an_outage_is_not_counted_as_resent() {
    if !broker_available().await {
        return;
    }
    let proxy = start_proxy().await;
    let exchange = unique("t-resend-gave-up");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = within(
        "connect through the proxy",
        AmqpRouter::builder(proxied_url(&proxy))
            .exchange(&exchange)
            .reconnect(Backoff::new(
                Duration::from_millis(50),
                Duration::from_millis(200),
            ))
            // A health call's round trip into the silence below gives up within these 1-2 s,
            // well before the confirm timeout.
            .operation_timeout(Duration::from_secs(1))
            .confirm_timeout(Duration::from_secs(10))
            .publish_outage_timeout(Duration::from_millis(500))
            .connect(),
    )
    .await
    .unwrap();
    // A first publish opens the publishing channel (nothing is bound: it comes back unroutable).
    within("a first publish", router.publish(envelope(1)))
        .await
        .unwrap();
    proxy.blackhole(true);
    let publishing = tokio::spawn({
        let router = router.clone();
        async move { router.publish(envelope(2)).await }
    });
    wait_until("the publish to wait for its confirm", async || {
        router.health().await.get("unconfirmed") == 1
    })
    .await;
    // The connection is cut and the broker unreachable for longer than the publish waits. The proxy
    // stops listening on a task of its own: under load, a reconnect 50 ms after the cut could still
    // reach it, and the publish be sent again after all; so the cut waits for the refusals.
    proxy.reject_for(Duration::from_secs(3));
    wait_until("the proxy to stop listening", async || {
        tokio::net::TcpStream::connect(proxy.local_addr())
            .await
            .is_err()
    })
    .await;
    proxy.cut_all();
    proxy.blackhole(false);
    let error = within("the publish in the outage", publishing)
        .await
        .expect("the publishing task")
        .unwrap_err();
    assert!(matches!(error, Error::Connection { .. }), "{error}");
    let health = within("health", router.health()).await;
    assert_eq!(health.get("resent"), 0, "never sent again: {health:?}");
    assert_eq!(health.get("publish_failures"), 1, "{health:?}");
    wait_until("the reconnect", async || router.is_connected()).await;
    within("close", router.close()).await.unwrap();
}

/// The publishing channel is opened at connect: the first publish is sent at once and waits one
/// round trip, for its confirm, not three (channel.open and confirm.select first). At 64 publishes
/// in flight, the 64 that waited behind the first for the channel were a large part of the
/// slowest 1%.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_publish_after_connect_waits_one_round_trip_not_three() {
    if !broker_available().await {
        return;
    }
    let proxy = start_proxy().await;
    let exchange = unique("t-first-publish");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = proxied_router(&proxy, &exchange).await;
    // Each way 300 ms: a round trip takes 600 ms.
    proxy.set_latency(Duration::from_millis(300));
    let started = Instant::now();
    let outcome = within("the first publish", router.publish(envelope(1))).await;
    let took = started.elapsed();
    // No queue is bound: returned, then confirmed, in the same round trip.
    assert_eq!(outcome.unwrap(), PublishOutcome::Unroutable);
    assert!(
        took >= Duration::from_millis(600),
        "the confirm came back in {took:?}, faster than the proxy's round trip"
    );
    assert!(
        took < Duration::from_millis(1200),
        "the first publish took {took:?}, more than two round trips: it opened the channel first"
    );
    proxy.set_latency(Duration::ZERO);
    within("close", router.close()).await.unwrap();
}

/// `publish_outage_timeout` bounds how long a publish waits for a lost connection to come back. Its
/// clock used to start when the publish first had no channel, which is also the first publish after
/// a reconnect, opening the channel on a broker that is up: a publish that then waited longer than
/// the bound for its confirm and lost its connection found its outage over before it began, and
/// failed at once without waiting for the reconnect ("no publishing connection for 0.0s").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_opened_the_channel_still_waits_out_a_later_outage() {
    if !broker_available().await {
        return;
    }
    let proxy = start_proxy().await;
    let exchange = unique("t-outage-clock");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let outage = Duration::from_secs(2);
    let router = within(
        "connect through the proxy",
        AmqpRouter::builder(proxied_url(&proxy))
            .exchange(&exchange)
            .reconnect(Backoff::new(
                Duration::from_millis(50),
                Duration::from_millis(200),
            ))
            // Opening the channel takes two round trips of 1.6 s below.
            .operation_timeout(Duration::from_secs(8))
            .confirm_timeout(Duration::from_secs(20))
            .publish_outage_timeout(outage)
            .connect(),
    )
    .await
    .unwrap();
    // The channel opened at connect goes with its connection: the next publish opens one.
    proxy.cut_all();
    wait_until("both connections back", async || {
        router.is_connected() && router.health().await.get("reconnects") >= 2
    })
    .await;
    // Each way 800 ms: the channel.open and the confirm.select take 1.6 s each, so the publish is
    // sent 3.2 s after it began, and its confirm comes 4.8 s after it began at the earliest.
    proxy.set_latency(Duration::from_millis(800));
    let started = Instant::now();
    let publishing = tokio::spawn({
        let router = router.clone();
        async move { router.publish(envelope(1)).await }
    });
    // Past the outage bound from the publish's start, once it waits for its confirm and before that
    // can have come: the connection is lost, and comes back at once.
    tokio::time::sleep(Duration::from_millis(4000)).await;
    proxy.set_latency(Duration::ZERO);
    proxy.cut_all();
    let outcome = within("the publish after the cut", publishing)
        .await
        .expect("the publishing task");
    assert!(
        outcome.is_ok(),
        "the publish did not wait for the reconnect ({:?} after it began): {outcome:?}",
        started.elapsed()
    );
    within("close", router.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_from_a_lost_channel_is_never_settled_on_the_new_one() {
    if !broker_available().await {
        return;
    }
    let proxy = start_proxy().await;
    let exchange = unique("t-stale");
    let _cleanup = Cleanup::new(&exchange, &[topology::group_queue(&exchange, "stale")]);
    let router = proxied_router(&proxy, &exchange).await;
    assert_eq!(
        proxy.stats().live,
        2,
        "one connection publishes, the other consumes (a blocked publisher must not hold acks back)"
    );
    let mut subscription = within(
        "subscribe",
        router.subscribe(
            SubscribeOptions::new(ChannelPattern::parse("Payment:*:*").unwrap())
                .group("stale")
                .prefetch(10),
        ),
    )
    .await
    .unwrap();
    for n in 0..2 {
        within("publish", router.publish(envelope(n)))
            .await
            .unwrap();
    }
    let held = within("a delivery", subscription.next()).await.unwrap();
    let held_id = held.envelope().id();
    proxy.cut_all();
    wait_until("the consumer to be restored", async || {
        router.health().await.get("consumers_restored") >= 1
    })
    .await;
    // Delivery tag 1 on the new channel is another delivery: acking the old one must not touch it.
    let error = within("a stale ack", held.ack()).await.unwrap_err();
    assert!(
        error
            .to_string()
            .contains("channel it was delivered on is gone"),
        "{error}"
    );
    let mut seen = HashMap::new();
    while seen.len() < 2 {
        let delivery = within("a redelivery", subscription.next()).await.unwrap();
        if delivery.envelope().id() == held_id {
            assert!(delivery.is_redelivered());
        }
        *seen.entry(delivery.envelope().id()).or_insert(0) += 1;
        within("ack", delivery.ack()).await.unwrap();
    }
    let health = within("health", router.health()).await;
    assert_eq!(health.get("stale"), 1, "{health:?}");
    within("close", router.close()).await.unwrap();
    let raw = Raw::open().await;
    assert_eq!(
        raw.count(&topology::group_queue(&exchange, "stale")).await,
        Some(0),
        "both were settled exactly once on the new channel"
    );

    raw.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_broker_is_a_confirm_timeout_then_a_reconnect() {
    if !broker_available().await {
        return;
    }
    let proxy = start_proxy().await;
    let exchange = unique("t-silent");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = within(
        "connect",
        AmqpRouter::builder(proxied_url(&proxy))
            .exchange(&exchange)
            .reconnect(Backoff::new(
                Duration::from_millis(50),
                Duration::from_millis(500),
            ))
            .heartbeat(Duration::from_secs(2))
            .confirm_timeout(Duration::from_millis(1500))
            .connect(),
    )
    .await
    .unwrap();
    let mut subscription = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Payment:*:*").unwrap(),
        )),
    )
    .await
    .unwrap();
    // The publishing channel is open before the broker falls silent.
    let outcome = within("a publish", router.publish(envelope(0)))
        .await
        .unwrap();
    assert_eq!(outcome, PublishOutcome::Accepted);
    let delivery = within("a delivery", subscription.next()).await.unwrap();
    within("ack", delivery.ack()).await.unwrap();
    proxy.blackhole(true);
    let started = std::time::Instant::now();
    let error = within("a publish into silence", router.publish(envelope(1)))
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(error, Error::Timeout { .. }), "{error}");
    assert!(error.to_string().contains("confirm"), "{error}");
    // The whole publish, send and confirm, is bounded by one confirm timeout (1.5 s), give or take
    // the sweeper's tick (an eighth of it) and a loaded machine.
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_millis(2700),
        "the publish failed after {waited:?}, not about confirm_timeout (1.5 s)"
    );
    // Missed heartbeats end the connection; then the broker answers again.
    wait_until("the heartbeat to notice", async || !router.is_connected()).await;
    proxy.blackhole(false);
    wait_until("the reconnect", async || router.is_connected()).await;
    let outcome = within("a publish after", router.publish(envelope(2)))
        .await
        .unwrap();
    assert_eq!(outcome, PublishOutcome::Accepted);
    // The timed-out publish may or may not have reached the broker; the later one does.
    let mut payloads = Vec::new();
    while payloads.last().map(Vec::as_slice) != Some(&br#"{"n":2}"#[..]) {
        let delivery = within("a delivery", subscription.next()).await.unwrap();
        payloads.push(delivery.envelope().payload().to_vec());
        within("ack", delivery.ack()).await.unwrap();
    }
    let health = within("health", router.health()).await;
    assert_eq!(health.get("confirm_timeouts"), 1, "{health:?}");
    within("close", router.close()).await.unwrap();
}

/// A publish whose caller stopped waiting once its frame was sent (a timeout around it), and whose
/// confirm then never comes, may be lost with nobody told: it must be counted in `confirm_timeouts`
/// and logged as maybe not stored. It used to be neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_publish_whose_confirm_times_out_is_counted_and_logged() {
    if !broker_available().await {
        return;
    }
    let logs = Logs::capture();
    let proxy = start_proxy().await;
    let exchange = unique("t-orphan-timeout");
    let _cleanup = Cleanup::new(&exchange, &[]);
    // The confirm times out (1 s) long before missed heartbeats (10 s) end the connection, which
    // would fail the channel instead.
    let router = within(
        "connect",
        AmqpRouter::builder(proxied_url(&proxy))
            .exchange(&exchange)
            .heartbeat(Duration::from_secs(5))
            .confirm_timeout(Duration::from_secs(1))
            .connect(),
    )
    .await
    .unwrap();
    // The publishing channel is open before the broker falls silent.
    within("a publish", router.publish(envelope(0)))
        .await
        .unwrap();
    proxy.blackhole(true);
    let abandoned = envelope(1);
    let id = abandoned.id().to_string();
    // Polled once: with the channel open, the frame goes out in that poll; then its caller leaves.
    let cut = futures::FutureExt::now_or_never(router.publish(abandoned));
    assert!(cut.is_none(), "the publish was not cut short: {cut:?}");
    wait_until("the abandoned publish to be counted", async || {
        router.health().await.get("confirm_timeouts") == 1
    })
    .await;
    let warned = logs.lines_with(&id);
    assert!(
        warned.iter().any(|line| line.contains("WARN")
            && line.contains("may not have been stored")
            && line.contains("confirm_timeouts")),
        "no warning names message {id}: {warned:?}"
    );
    proxy.blackhole(false);
    let health = within("health", router.health()).await;
    assert_eq!(health.get("confirm_timeouts"), 1, "{health:?}");
    within("close", router.close()).await.unwrap();
}

/// A publish whose caller stopped waiting once its frame was sent is not sent again when its channel
/// is lost before the confirm (nobody waits to send it): it may be lost, and must be counted in
/// `abandoned_unconfirmed` and logged. It used to be neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_publish_lost_with_its_connection_is_counted_and_logged() {
    if !broker_available().await {
        return;
    }
    let logs = Logs::capture();
    let proxy = start_proxy().await;
    let exchange = unique("t-orphan-cut");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = proxied_router(&proxy, &exchange).await;
    within("a publish", router.publish(envelope(0)))
        .await
        .unwrap();
    // Held by the proxy, so that no confirm comes before the cut.
    proxy.blackhole(true);
    let abandoned = envelope(1);
    let id = abandoned.id().to_string();
    // Polled once: with the channel open, the frame goes out in that poll; then its caller leaves.
    let cut = futures::FutureExt::now_or_never(router.publish(abandoned));
    assert!(cut.is_none(), "the publish was not cut short: {cut:?}");
    proxy.cut_all();
    proxy.blackhole(false);
    wait_until("the abandoned publish to be counted", async || {
        router.health().await.get("abandoned_unconfirmed") == 1
    })
    .await;
    let warned = logs.lines_with(&id);
    assert!(
        warned.iter().any(|line| line.contains("WARN")
            && line.contains("may not have been stored")
            && line.contains("abandoned_unconfirmed")),
        "no warning names message {id}: {warned:?}"
    );
    let health = within("health", router.health()).await;
    assert_eq!(health.get("confirm_timeouts"), 0, "{health:?}");
    within("close", router.close()).await.unwrap();
}

/// Close waits for the confirm of a publish whose caller stopped waiting once its frame went out, as
/// it does for the publishes under way: the broker has the message. Close used to fail the channel
/// at once, and so reported a message that was stored as maybe not stored (`abandoned_unconfirmed`
/// and a warning) after every publish cut short just before a shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_waits_for_the_confirm_of_a_publish_whose_caller_stopped_waiting() {
    if !broker_available().await {
        return;
    }
    let proxy = start_proxy().await;
    let exchange = unique("t-close-orphan");
    let queue = topology::group_queue(&exchange, "keep");
    let _cleanup = Cleanup::new(&exchange, std::slice::from_ref(&queue));
    // A group queue that keeps what is published while nobody consumes.
    let declaring = within("connect", builder(&exchange).connect())
        .await
        .unwrap();
    let subscription = within(
        "subscribe",
        declaring.subscribe(
            SubscribeOptions::new(ChannelPattern::parse("Payment:*:*").unwrap()).group("keep"),
        ),
    )
    .await
    .unwrap();
    drop(subscription);
    within("close", declaring.close()).await.unwrap();
    let router = proxied_router(&proxy, &exchange).await;
    within("a publish", router.publish(envelope(0)))
        .await
        .unwrap();
    // Confirms now take at least 600 ms: far longer than close takes to reach the channel.
    proxy.set_latency(Duration::from_millis(300));
    let cut = futures::FutureExt::now_or_never(router.publish(envelope(1)));
    assert!(cut.is_none(), "the publish was not cut short: {cut:?}");
    within("close", router.close()).await.unwrap();
    let health = within("health", router.health()).await;
    assert_eq!(health.get("abandoned_unconfirmed"), 0, "{health:?}");
    assert_eq!(health.get("confirm_timeouts"), 0, "{health:?}");
    assert_eq!(health.get("confirmed"), 1, "{health:?}");
    let raw = Raw::open().await;
    assert_eq!(raw.count(&queue).await, Some(2), "both messages are stored");
    raw.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_after_a_slow_retry_never_goes_to_a_replaced_channel() {
    use amqprs::channel::QueueDeleteArguments;

    if !broker_available().await {
        return;
    }
    let proxy = start_proxy().await;
    let exchange = unique("t-late-ack");
    let queue = topology::group_queue(&exchange, "late");
    let retry_delay = Duration::from_secs(2);
    let _cleanup = Cleanup::new(
        &exchange,
        &[
            queue.clone(),
            topology::retry_queue(&queue, topology::retry_bucket_ms(retry_delay)),
        ],
    );
    let router = proxied_router(&proxy, &exchange).await;
    let mut subscription = within(
        "subscribe",
        router.subscribe(
            SubscribeOptions::new(ChannelPattern::parse("Payment:*:*").unwrap())
                .group("late")
                .prefetch(10),
        ),
    )
    .await
    .unwrap();
    within("publish", router.publish(envelope(1)))
        .await
        .unwrap();
    let delivery = within("a delivery", subscription.next()).await.unwrap();
    // Every exchange with the broker now takes 300 ms more: the retry below (declaring its queue,
    // then a confirmed publish) takes over 600 ms after its delivery was checked.
    proxy.set_latency(Duration::from_millis(150));
    // Meanwhile an operator deletes the group queue: RabbitMQ cancels the consumer, whose channel
    // is closed and replaced while the retry is under way.
    let raw = Raw::open().await;
    within(
        "deleting the queue",
        raw.channel.queue_delete(QueueDeleteArguments::new(&queue)),
    )
    .await
    .unwrap();
    let error = within(
        "the retry",
        delivery.nack(NackAction::Retry { delay: retry_delay }),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("the original could not be acknowledged"),
        "{error}"
    );
    proxy.set_latency(Duration::ZERO);
    wait_until("the consumer to be restored", async || {
        router.health().await.get("consumers_restored") >= 1
    })
    .await;
    // The retry comes back once the restored consumer declared the queue again.
    let retried = within("the retry", subscription.next()).await.unwrap();
    assert_eq!(retried.envelope().attempt(), 2);
    within("ack", retried.ack()).await.unwrap();
    // An ack sent on the closed channel would have made RabbitMQ close the connection (504
    // CHANNEL_ERROR), or the new channel (406, unknown delivery tag).
    let health = within("health", router.health()).await;
    assert_eq!(health.get("connection_losses"), 0, "{health:?}");
    assert_eq!(health.get("consumer_failures"), 0, "{health:?}");
    assert_eq!(health.get("consumers_restored"), 1, "{health:?}");
    assert_eq!(health.get("stale"), 1, "{health:?}");
    within("close", router.close()).await.unwrap();
    raw.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_subscription_ends_its_stream_even_when_the_broker_stops_answering() {
    if !broker_available().await {
        return;
    }
    let proxy = start_proxy().await;
    let exchange = unique("t-mute");
    let _cleanup = Cleanup::new(&exchange, &[topology::group_queue(&exchange, "mute")]);
    // Heartbeats far apart: the silence below is not noticed as a lost connection during the test,
    // so only close itself can end the stream.
    let router = within(
        "connect",
        AmqpRouter::builder(proxied_url(&proxy))
            .exchange(&exchange)
            .heartbeat(Duration::from_secs(60))
            .operation_timeout(Duration::from_millis(500))
            .close_timeout(Duration::from_secs(2))
            .connect(),
    )
    .await
    .unwrap();
    let mut subscription = within(
        "subscribe",
        router.subscribe(
            SubscribeOptions::new(ChannelPattern::parse("Payment:*:*").unwrap()).group("mute"),
        ),
    )
    .await
    .unwrap();
    within("publish", router.publish(envelope(1)))
        .await
        .unwrap();
    let delivery = within("a delivery", subscription.next()).await.unwrap();
    within("ack", delivery.ack()).await.unwrap();
    proxy.blackhole(true);
    let started = Instant::now();
    within("close", subscription.close()).await.unwrap();
    assert!(
        within("the end of the stream", subscription.next())
            .await
            .is_none()
    );
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the stream ended after {took:?}"
    );
    proxy.blackhole(false);
    within("close", router.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_lets_handlers_reply_and_settle_and_waits_for_confirms() {
    if !broker_available().await {
        return;
    }
    let proxy = start_proxy().await;
    let exchange = unique("t-close-drain");
    let queue = topology::group_queue(&exchange, "server");
    let _cleanup = Cleanup::new(&exchange, std::slice::from_ref(&queue));
    let router = proxied_router(&proxy, &exchange).await;
    fn pong(n: u64) -> Envelope {
        Envelope::new(
            parse_channel("Pong:reply:s1").expect("channel"),
            "application/json",
            format!(r#"{{"n":{n}}}"#).into_bytes(),
        )
    }
    // The replies are read through another router, straight to the broker.
    let listener = within("connect", builder(&exchange).connect())
        .await
        .unwrap();
    let mut replies = within(
        "subscribe",
        listener.subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Pong:*:*").unwrap(),
        )),
    )
    .await
    .unwrap();
    let mut requests = within(
        "subscribe",
        router.subscribe(
            SubscribeOptions::new(ChannelPattern::parse("Payment:*:*").unwrap()).group("server"),
        ),
    )
    .await
    .unwrap();
    within("publish", router.publish(envelope(1)))
        .await
        .unwrap();
    let request = within("a request", requests.next()).await.unwrap();

    // Confirms now take at least 600 ms: health counts the publishes waiting for theirs.
    proxy.set_latency(Duration::from_millis(300));
    let batch = |from: u64| (from..from + 50).map(pong).collect::<Vec<Envelope>>();
    let first = tokio::spawn({
        let router = router.clone();
        async move { router.publish_batch(batch(100)).await }
    });
    let samples = futures::future::join_all((0..10u64).map(|i| {
        let router = router.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(40 * i)).await;
            router.health().await.get("unconfirmed")
        }
    }))
    .await;
    assert!(
        samples.iter().any(|unconfirmed| *unconfirmed > 0),
        "health never counted a publish waiting for its confirm: {samples:?}"
    );
    for result in within("the first batch", first).await.unwrap() {
        assert_eq!(result.unwrap(), PublishOutcome::Accepted);
    }

    // Close while publishes wait for their confirm and a handler holds a request.
    let second = tokio::spawn({
        let router = router.clone();
        async move { router.publish_batch(batch(200)).await }
    });
    let closing = tokio::spawn({
        let router = router.clone();
        async move { router.close().await }
    });
    wait_until("close to stop the subscriptions", async || {
        router.health().await.get("subscriptions") == 0
    })
    .await;
    // The handler finishes during the drain: its reply goes out, its ack lands.
    let outcome = within("the reply during close", router.publish(pong(1)))
        .await
        .unwrap();
    assert_eq!(outcome, PublishOutcome::Accepted);
    within("the ack during close", request.ack()).await.unwrap();
    within("close", closing).await.unwrap().unwrap();
    // Everything published before close was confirmed, none failed.
    for result in within("the second batch", second).await.unwrap() {
        assert_eq!(result.unwrap(), PublishOutcome::Accepted);
    }
    let error = within("a publish after close", router.publish(pong(2)))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Closed { .. }), "{error}");
    let mut numbers = Vec::new();
    while numbers.len() < 101 {
        let delivery = within("a reply", replies.next()).await.unwrap();
        numbers.push(delivery.envelope().payload().to_vec());
        within("ack", delivery.ack()).await.unwrap();
    }
    assert!(
        numbers.contains(&br#"{"n":1}"#.to_vec()),
        "the reply arrived"
    );
    let raw = Raw::open().await;
    assert_eq!(
        raw.count(&queue).await,
        Some(0),
        "the request was acknowledged, not given back"
    );
    within("close", listener.close()).await.unwrap();
    raw.close().await;
}

/// Close waits `close_timeout` for the confirms of the publishes under way, then fails those still
/// waiting: their callers get an error. Failing them used to look like a lost channel to each of
/// them, so each was sent again: on a new publishing channel opened on the connection being closed,
/// a second copy of the message possibly stored after close, and its caller told whatever that
/// attempt came to (here: a channel that did not open in time), not that the router closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_close_gives_up_on_fails_as_closed_and_is_not_sent_again() {
    if !broker_available().await {
        return;
    }
    let proxy = start_proxy().await;
    let exchange = unique("t-close-gave-up");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = within(
        "connect through the proxy",
        AmqpRouter::builder(proxied_url(&proxy))
            .exchange(&exchange)
            .confirm_timeout(Duration::from_secs(10))
            .operation_timeout(Duration::from_secs(1))
            .close_timeout(Duration::from_millis(300))
            .connect(),
    )
    .await
    .unwrap();
    // A first publish opens the publishing channel (nothing is bound: it comes back unroutable).
    within("a first publish", router.publish(envelope(1)))
        .await
        .unwrap();
    // The broker falls silent: the next publish waits for its confirm past close's patience.
    proxy.blackhole(true);
    let publishing = tokio::spawn({
        let router = router.clone();
        async move { router.publish(envelope(2)).await }
    });
    wait_until("the publish to wait for its confirm", async || {
        router.health().await.get("unconfirmed") == 1
    })
    .await;
    within("close", router.close()).await.unwrap();
    let error = within("the publish close gave up on", publishing)
        .await
        .expect("the publishing task")
        .unwrap_err();
    let health = within("health", router.health()).await;
    assert_eq!(
        health.get("resent"),
        0,
        "sent again after close: {error}; {health:?}"
    );
    assert_eq!(health.get("publish_failures"), 1, "{health:?}");
    assert!(matches!(error, Error::Closed { .. }), "{error}");
    assert!(
        error.to_string().contains("before RabbitMQ confirmed"),
        "{error}"
    );
    proxy.blackhole(false);
}

/// A `Subscription::close()` cut short after its basic.cancel was sent (the broker answers slower
/// than the agent's stop deadline) used to leave the subscription stuck: `closed` was set but its
/// task was never told to stop, so its channel stayed open, closing again did nothing, and what it
/// had received and not settled stayed unacknowledged, out of the other members' reach, until the
/// router closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_close_cut_short_still_gives_back_what_it_held() {
    if !broker_available().await {
        return;
    }
    let proxy = start_proxy().await;
    let exchange = unique("t-close-slow");
    let _cleanup = Cleanup::new(&exchange, &[topology::group_queue(&exchange, "g")]);
    let router = proxied_router(&proxy, &exchange).await;
    let options = SubscribeOptions::new(ChannelPattern::parse("Payment:*:*").unwrap())
        .group("g")
        .prefetch(10);
    let first = within("subscribe", router.subscribe(options.clone()))
        .await
        .unwrap();
    for n in 0..5 {
        within("publish", router.publish(envelope(n)))
            .await
            .unwrap();
    }
    wait_until(
        "the five messages in the first member's buffer",
        async || first.buffered() == 5,
    )
    .await;
    // The broker answers slower than the stop deadline.
    proxy.set_latency(Duration::from_millis(300));
    let cut = tokio::time::timeout(Duration::from_millis(100), first.close()).await;
    assert!(cut.is_err(), "the close was not cut short");
    proxy.set_latency(Duration::ZERO);
    within("close again", first.close()).await.unwrap();
    drop(first);
    let mut second = within("subscribe", router.subscribe(options))
        .await
        .unwrap();
    let mut got = std::collections::HashSet::new();
    for _ in 0..5 {
        let delivery = within("what the first member held", second.next())
            .await
            .unwrap();
        got.insert(delivery.envelope().id());
        within("ack", delivery.ack()).await.unwrap();
    }
    within("close", router.close()).await.unwrap();
    assert_eq!(got.len(), 5, "a message came twice");
}

/// Publishes stay allowed during close's drain so that a handler finishing its message can still
/// send its reply, but the connection supervisors used to stop as soon as close started, before
/// even marking a lost connection as lost. A network blip during the drain therefore left the
/// publishing link "connected" to a dead connection: the handler's reply spun (reopening the
/// channel every ~10 ms, with two warnings each time) until close gave up on it, and failed, where a
/// reconnect would have taken a moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_during_the_close_drain_survives_a_network_blip() {
    if !broker_available().await {
        return;
    }
    let proxy = start_proxy().await;
    let exchange = unique("t-drain-cut");
    let _cleanup = Cleanup::new(&exchange, &[topology::group_queue(&exchange, "server")]);
    let router = proxied_router(&proxy, &exchange).await;
    fn pong() -> Envelope {
        Envelope::new(
            parse_channel("Pong:reply:s1").expect("channel"),
            "application/json",
            br#"{"n":1}"#.to_vec(),
        )
    }
    // The replies are read through another router, straight to the broker.
    let listener = within("connect", builder(&exchange).connect())
        .await
        .unwrap();
    let mut replies = within(
        "subscribe",
        listener.subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Pong:*:*").unwrap(),
        )),
    )
    .await
    .unwrap();
    let mut requests = within(
        "subscribe",
        router.subscribe(
            SubscribeOptions::new(ChannelPattern::parse("Payment:*:*").unwrap()).group("server"),
        ),
    )
    .await
    .unwrap();
    within("publish", router.publish(envelope(1)))
        .await
        .unwrap();
    let request = within("a request", requests.next()).await.unwrap();
    let closing = tokio::spawn({
        let router = router.clone();
        async move { router.close().await }
    });
    wait_until("close to stop the subscriptions", async || {
        router.health().await.get("subscriptions") == 0
    })
    .await;
    // A network blip during the drain: both connections cut, the broker unreachable for 300 ms.
    proxy.reject_for(Duration::from_millis(300));
    proxy.cut_all();
    let reply = within("the reply during the drain", router.publish(pong())).await;
    // The handler is done; its delivery came on the lost connection, so RabbitMQ redelivers it.
    drop(request);
    within("close", closing).await.unwrap().unwrap();
    assert!(
        matches!(reply, Ok(PublishOutcome::Accepted)),
        "the reply failed: {reply:?}"
    );
    let delivery = within("the reply", replies.next()).await.unwrap();
    within("ack", delivery.ack()).await.unwrap();
    within("close", listener.close()).await.unwrap();
}

/// What one router with `setting` at `Duration::MAX` does, start to close: a fan-out subscription,
/// a publish and its delivery, a cut and a publish after the reconnect (the slow path that opens a
/// publishing channel), a delayed retry of it (which declares a retry queue), and close.
async fn exercise_longest(proxy: &FaultProxy, setting: &str) {
    let exchange = unique("t-longest");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let builder = AmqpRouter::builder(proxied_url(proxy))
        .exchange(&exchange)
        .reconnect(Backoff::new(
            Duration::from_millis(50),
            Duration::from_millis(500),
        ))
        .heartbeat(Duration::from_secs(2));
    let builder = match setting {
        "confirm_timeout" => builder.confirm_timeout(Duration::MAX),
        "operation_timeout" => builder.operation_timeout(Duration::MAX),
        "publish_outage_timeout" => builder.publish_outage_timeout(Duration::MAX),
        "close_timeout" => builder.close_timeout(Duration::MAX),
        "connect_timeout" => builder.connect_timeout(Duration::MAX),
        other => panic!("no setting {other}"),
    };
    let router = within("connect", builder.connect()).await.expect("connect");
    let mut subscription = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Payment:*:*").unwrap(),
        )),
    )
    .await
    .expect("subscribe");
    let outcome = within("publish", router.publish(envelope(1))).await;
    assert_eq!(outcome.expect("publish"), PublishOutcome::Accepted);
    let delivery = within("delivery", subscription.next()).await.unwrap();
    within("ack", delivery.ack()).await.unwrap();

    let reconnects = router.health().await.get("reconnects");
    proxy.cut_all();
    wait_until("both connections back", async || {
        let health = router.health().await;
        health.get("reconnects") >= reconnects + 2 && health.get("consumers_restored") >= 1
    })
    .await;
    let outcome = within("publish after the reconnect", router.publish(envelope(2))).await;
    assert_eq!(
        outcome.expect("publish after the reconnect"),
        PublishOutcome::Accepted
    );
    let delivery = within("delivery after the reconnect", subscription.next())
        .await
        .unwrap();
    within(
        "retry",
        delivery.nack(NackAction::Retry {
            delay: Duration::from_millis(20),
        }),
    )
    .await
    .expect("retry");
    let delivery = within("the retried delivery", subscription.next())
        .await
        .unwrap();
    assert_eq!(delivery.envelope().payload().as_ref(), br#"{"n":2}"#);
    within("ack", delivery.ack()).await.unwrap();
    within("close", router.close()).await.expect("close");
}

/// `Duration::MAX` for any of the router's timeouts, which the rest of agentcomm reads as "as long
/// as it takes", was accepted by the builder and then panicked on an overflow adding it to the
/// clock or multiplying it: `operation_timeout` in `connect` itself, `confirm_timeout` in every
/// publish, `publish_outage_timeout` in every subscribe (and in a publish after a reconnect and a
/// delayed retry), `close_timeout` in `close`. Each setting on a router of its own, and each run on
/// caught so that a panic names its setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_timeouts_mean_as_long_as_it_takes_and_panic_nowhere() {
    if !broker_available().await {
        return;
    }
    let proxy = start_proxy().await;
    let mut failed = Vec::new();
    for setting in [
        "confirm_timeout",
        "operation_timeout",
        "publish_outage_timeout",
        "close_timeout",
        "connect_timeout",
    ] {
        let run = std::panic::AssertUnwindSafe(exercise_longest(&proxy, setting));
        if let Err(panic) = futures::FutureExt::catch_unwind(run).await {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
                .unwrap_or_default();
            failed.push(format!("{setting}=Duration::MAX: {message}"));
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
}

/// A fan-out subscription closed while the consuming connection is down had its queue deletion
/// tried once, at once, and given up (logged at debug level): the queue stayed bound until it expired
/// (`fan_out_expiry`, 60 s), and every publish matching it meanwhile was confirmed `Accepted`, then
/// dropped with the queue, counted nowhere. The deletion now waits for the reconnect within the
/// close timeout, so those publishes are `Unroutable`, as for any closed subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_subscription_closed_during_an_outage_leaves_no_queue_accepting_messages() {
    if !broker_available().await {
        return;
    }
    let proxy = start_proxy().await;
    let exchange = unique("t-fan-out-outage");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = proxied_router(&proxy, &exchange).await;
    let subscription = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Payment:*:*").unwrap(),
        )),
    )
    .await
    .unwrap();
    let outcome = within("a first publish", router.publish(envelope(1)))
        .await
        .unwrap();
    assert_eq!(outcome, PublishOutcome::Accepted);

    // Both connections are lost, and the broker stays unreachable for a moment.
    proxy.reject_for(Duration::from_millis(1500));
    wait_until("the proxy to stop listening", async || {
        tokio::net::TcpStream::connect(proxy.local_addr())
            .await
            .is_err()
    })
    .await;
    proxy.cut_all();
    // The consuming connection's loss (not only the publishing one's, which alone makes
    // is_connected false): a cleanup on a consuming connection not yet seen lost deletes at once,
    // fails, and leaves the queue.
    wait_until(
        "the consuming connection's loss to be noticed",
        async || consuming_down(&router).await,
    )
    .await;
    within("close the subscription", subscription.close())
        .await
        .unwrap();
    drop(subscription);
    wait_until("the reconnect", async || router.is_connected()).await;

    // Well within fan_out_expiry (60 s): nothing is bound any more.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 2;
    loop {
        let outcome = within("a publish", router.publish(envelope(n))).await;
        if outcome
            .as_ref()
            .is_ok_and(|outcome| *outcome == PublishOutcome::Unroutable)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the closed subscription's queue still takes messages: {outcome:?}"
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    within("close", router.close()).await.unwrap();
}

/// A fan-out subscription closed during an outage that outlasts its `close_timeout` gives up
/// deleting its queue, with a warning carrying the error. That error said "gave up after 30s": the
/// value of `publish_outage_timeout`, which had nothing to do with it (the close gave up after
/// 300 ms). It names the setting that ended the wait now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_queue_deletion_given_up_in_an_outage_names_close_timeout() {
    if !broker_available().await {
        return;
    }
    let logs = Logs::capture();
    let proxy = start_proxy().await;
    let exchange = unique("t-fan-out-close-timeout");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = within(
        "connect through the proxy",
        AmqpRouter::builder(proxied_url(&proxy))
            .exchange(&exchange)
            .reconnect(Backoff::new(
                Duration::from_millis(50),
                Duration::from_millis(500),
            ))
            .publish_outage_timeout(Duration::from_secs(30))
            .close_timeout(Duration::from_millis(300))
            .connect(),
    )
    .await
    .expect("connect");
    let subscription = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Payment:*:*").unwrap(),
        )),
    )
    .await
    .unwrap();
    proxy.reject_for(Duration::from_secs(60));
    wait_until("the proxy to stop listening", async || {
        tokio::net::TcpStream::connect(proxy.local_addr())
            .await
            .is_err()
    })
    .await;
    proxy.cut_all();
    wait_until(
        "the consuming connection's loss to be noticed",
        async || consuming_down(&router).await,
    )
    .await;
    within("close the subscription", subscription.close())
        .await
        .unwrap();
    drop(subscription);
    let queue = format!("{exchange}.fanout.");
    let mut warned = Vec::new();
    wait_until("the warning that the queue was not deleted", async || {
        warned = logs
            .lines_with(&queue)
            .into_iter()
            .filter(|line| line.contains("could not delete the queue"))
            .collect();
        !warned.is_empty()
    })
    .await;
    proxy.reject_for(Duration::ZERO);
    within("close", router.close()).await.unwrap();
    let line = &warned[0];
    assert!(
        line.contains("gave up after 300ms (close_timeout)"),
        "{line}"
    );
    assert!(!line.contains("30s"), "{line}");
}

/// A publish whose frame went out, whose connection was then lost before the confirm, and which
/// waits through the outage to be sent again, may well be stored already. When the outage outlasted
/// its bound, or the router closed meanwhile, its caller was told what a publish never sent is told:
/// "no publishing connection ... gave up", or closed, "connect a new AmqpRouter", with nothing
/// saying the broker may have the message. Both errors say so now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_sent_before_an_outage_it_gives_up_in_says_it_may_be_stored() {
    if !broker_available().await {
        return;
    }
    for closing in [false, true] {
        let proxy = start_proxy().await;
        let exchange = unique("t-maybe-stored");
        let _cleanup = Cleanup::new(&exchange, &[]);
        let router = within(
            "connect through the proxy",
            AmqpRouter::builder(proxied_url(&proxy))
                .exchange(&exchange)
                .reconnect(Backoff::new(
                    Duration::from_millis(50),
                    Duration::from_millis(200),
                ))
                .operation_timeout(Duration::from_secs(1))
                .confirm_timeout(Duration::from_secs(10))
                .publish_outage_timeout(if closing {
                    Duration::from_secs(15)
                } else {
                    Duration::from_millis(500)
                })
                .close_timeout(Duration::from_millis(500))
                .connect(),
        )
        .await
        .unwrap();
        within("a first publish", router.publish(envelope(1)))
            .await
            .unwrap();
        // The frame leaves the client; no confirm comes back.
        proxy.blackhole(true);
        let publishing = tokio::spawn({
            let router = router.clone();
            async move { router.publish(envelope(2)).await }
        });
        wait_until("the publish to wait for its confirm", async || {
            router.health().await.get("unconfirmed") == 1
        })
        .await;
        proxy.reject_for(Duration::from_secs(20));
        wait_until("the proxy to stop listening", async || {
            tokio::net::TcpStream::connect(proxy.local_addr())
                .await
                .is_err()
        })
        .await;
        proxy.cut_all();
        proxy.blackhole(false);
        if closing {
            wait_until("the loss to be noticed", async || !router.is_connected()).await;
            within("close", router.close()).await.unwrap();
        }
        let error = within("the publish in the outage", publishing)
            .await
            .expect("the publishing task")
            .unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("may or may not have been stored"),
            "closing: {closing}: {text}"
        );
        if !closing {
            assert!(matches!(error, Error::Connection { .. }), "{error}");
            within("close", router.close()).await.unwrap();
        }
    }
}

/// A fan-out subscription closed on its own during an outage waits, within its close timeout, for
/// the reconnect to delete its queue. Neither its reader nor the router's close is to wait with
/// it: its stream ended only once that wait was over (an agent stopping read it to its end, so a
/// runtime's shutdown in an outage took the whole close timeout, for ever with `Duration::MAX`),
/// and the router's close, closed after it, waited for the subscription's task as long, though a
/// router closing in an outage does not wait for the reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_subscription_closed_during_an_outage_holds_neither_its_stream_nor_the_close() {
    if !broker_available().await {
        return;
    }
    let proxy = start_proxy().await;
    let exchange = unique("t-fan-out-outage-close");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = within(
        "connect through the proxy",
        AmqpRouter::builder(proxied_url(&proxy))
            .exchange(&exchange)
            // After the first failed attempt, the next is 30 s away: nothing changes in the
            // connection's state meanwhile that could end a wait for the reconnect by chance.
            .reconnect(Backoff::new(Duration::from_secs(30), Duration::from_secs(30)).jitter(0.0))
            .close_timeout(Duration::from_secs(60))
            .connect(),
    )
    .await
    .expect("connect");
    let mut subscription = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Payment:*:*").unwrap(),
        )),
    )
    .await
    .unwrap();
    let outcome = within("a first publish", router.publish(envelope(1)))
        .await
        .unwrap();
    assert_eq!(outcome, PublishOutcome::Accepted);
    let delivery = within("the first delivery", subscription.next())
        .await
        .expect("a delivery");
    within("ack", delivery.ack()).await.unwrap();

    // The broker stays unreachable for longer than the test.
    proxy.reject_for(Duration::from_secs(120));
    wait_until("the proxy to stop listening", async || {
        tokio::net::TcpStream::connect(proxy.local_addr())
            .await
            .is_err()
    })
    .await;
    proxy.cut_all();
    wait_until(
        "the consuming connection's loss to be noticed",
        async || consuming_down(&router).await,
    )
    .await;
    within("close the subscription", subscription.close())
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), subscription.next())
        .await
        .map(|next| next.is_some());
    assert!(
        matches!(ended, Ok(false)),
        "the stream of a subscription closed during an outage did not end (Ok(false) is the end): {ended:?}"
    );
    drop(subscription);
    let closed = tokio::time::timeout(Duration::from_secs(5), router.close()).await;
    assert!(
        matches!(closed, Ok(Ok(()))),
        "the router's close waited for the outage to end: {closed:?}"
    );
}

/// A subscribe waiting for the consuming connection when the router's close begins is stopped by
/// that close. Its caller was told "the subscription stopped before its consumer was live", a
/// backend error, instead of the `Error::Closed` every other call after close gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_waiting_out_an_outage_when_the_router_closes_fails_as_closed() {
    if !broker_available().await {
        return;
    }
    let proxy = start_proxy().await;
    let exchange = unique("t-subscribe-close");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = proxied_router(&proxy, &exchange).await;
    proxy.reject_for(Duration::from_secs(60));
    wait_until("the proxy to stop listening", async || {
        tokio::net::TcpStream::connect(proxy.local_addr())
            .await
            .is_err()
    })
    .await;
    proxy.cut_all();
    wait_until(
        "the consuming connection's loss to be noticed",
        async || consuming_down(&router).await,
    )
    .await;
    let subscribing = tokio::spawn({
        let router = router.clone();
        async move {
            router
                .subscribe(SubscribeOptions::new(
                    ChannelPattern::parse("Payment:*:*").unwrap(),
                ))
                .await
                .err()
        }
    });
    wait_until("the subscription to wait for the connection", async || {
        assert!(
            !subscribing.is_finished(),
            "the subscribe ended before the close"
        );
        router.health().await.get("subscriptions") == 1
    })
    .await;
    within("close", router.close()).await.unwrap();
    let error = within("the subscribe", subscribing)
        .await
        .expect("the subscribing task")
        .expect("a subscribe stopped by the close");
    assert!(matches!(error, Error::Closed { .. }), "{error}");
}

/// Whether the router's consuming connection is down (reconnecting), as health reports it.
async fn consuming_down(router: &AmqpRouter) -> bool {
    router
        .health()
        .await
        .detail
        .contains("the consuming connection is down")
}

/// A fan-out subscribe that gives up waiting out an outage never declared its queue. Its task still
/// cleaned up as for a queue left behind: it waited, within its close timeout, for the reconnect to
/// delete that queue, and when the router closed first it warned that the queue "could not be
/// deleted" and that publishes matching its bindings were accepted and dropped, about a queue that
/// never existed (one such warning per subscribe that failed in the outage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_subscribe_that_failed_in_an_outage_has_no_queue_to_delete() {
    if !broker_available().await {
        return;
    }
    let logs = Logs::capture();
    let proxy = start_proxy().await;
    let exchange = unique("t-fan-out-never-declared");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = within(
        "connect through the proxy",
        AmqpRouter::builder(proxied_url(&proxy))
            .exchange(&exchange)
            .reconnect(Backoff::new(
                Duration::from_millis(50),
                Duration::from_millis(500),
            ))
            .publish_outage_timeout(Duration::from_millis(300))
            .close_timeout(Duration::from_secs(5))
            .connect(),
    )
    .await
    .expect("connect");
    proxy.reject_for(Duration::from_secs(60));
    wait_until("the proxy to stop listening", async || {
        tokio::net::TcpStream::connect(proxy.local_addr())
            .await
            .is_err()
    })
    .await;
    proxy.cut_all();
    wait_until(
        "the consuming connection's loss to be noticed",
        async || consuming_down(&router).await,
    )
    .await;
    let subscribed = within(
        "the subscribe",
        router.subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Payment:*:*").unwrap(),
        )),
    )
    .await;
    assert!(
        matches!(subscribed, Err(Error::Connection { .. })),
        "a subscribe in an outage longer than publish_outage_timeout: {:?}",
        subscribed.err()
    );
    // Closed in the outage: the subscription's task, still waiting for the reconnect to delete a
    // queue, is woken by the close and tries at once.
    within("close", router.close()).await.unwrap();
    let warned: Vec<String> = logs
        .lines_with(&format!("{exchange}.fanout."))
        .into_iter()
        .filter(|line| line.contains("could not delete the queue"))
        .collect();
    assert!(
        warned.is_empty(),
        "a warning about a queue the failed subscribe never declared: {warned:?}"
    );
}

/// A router through a fresh proxy whose confirms time out after 500 ms (`configure` may change
/// that and more), a group subscription "g" of its `Payment:*:*`, and one message published to it:
/// the set-up of the tests of a retry whose copy's confirm does not come in time.
struct SlowConfirms {
    proxy: FaultProxy,
    router: AmqpRouter,
    subscription: Subscription,
    exchange: String,
    /// The retry queue of the group's queue for the tests' delay.
    retry_queue: String,
    /// Deletes the exchange, the group's queue and the retry queue.
    _cleanup: Cleanup,
}

async fn group_subscriber_with_slow_confirms(
    name: &str,
    delay: Duration,
    configure: impl FnOnce(AmqpRouterBuilder) -> AmqpRouterBuilder,
) -> SlowConfirms {
    let proxy = start_proxy().await;
    let exchange = unique(name);
    let queue = topology::group_queue(&exchange, "g");
    let retry_queue = topology::retry_queue(&queue, topology::retry_bucket_ms(delay));
    let cleanup = Cleanup::new(&exchange, &[queue.clone(), retry_queue.clone()]);
    let router = within(
        "connect through the proxy",
        configure(
            AmqpRouter::builder(proxied_url(&proxy))
                .exchange(&exchange)
                .confirm_timeout(Duration::from_millis(500))
                .operation_timeout(Duration::from_secs(10)),
        )
        .connect(),
    )
    .await
    .expect("connect");
    let subscription = within("subscribe", router.subscribe(group_g()))
        .await
        .unwrap();
    within("publish", router.publish(envelope(1)))
        .await
        .unwrap();
    SlowConfirms {
        proxy,
        router,
        subscription,
        exchange,
        retry_queue,
        _cleanup: cleanup,
    }
}

/// Nacks the next delivery of `subscription` for a retry after `delay` while the proxy delays every
/// byte by `latency` each way (past the confirm timeout, the copy's confirm comes late): its id, and
/// the nack's error (the original held for the copy's late confirm).
async fn retry_with_confirms_late(
    proxy: &FaultProxy,
    subscription: &mut Subscription,
    delay: Duration,
    latency: Duration,
) -> (MessageId, String) {
    let delivery = within("a delivery", subscription.next()).await.unwrap();
    let id = delivery.envelope().id();
    proxy.set_latency(latency);
    let error = within("the retry", delivery.nack(NackAction::Retry { delay }))
        .await
        .expect_err("a retry whose copy was not confirmed in time");
    (id, error.to_string())
}

/// The attempts, sorted, in which a member of group "g" on a router of its own (not through the
/// proxy) gets message `id` of `exchange` until nothing more comes for `delay` and 3 s; the router is
/// closed after.
async fn attempts_of_a_new_member(exchange: &str, id: MessageId, delay: Duration) -> Vec<u32> {
    let again = within("connect", builder(exchange).connect())
        .await
        .unwrap();
    let mut member = within("subscribe", again.subscribe(group_g()))
        .await
        .unwrap();
    let mut attempts = attempts_until_quiet(&mut member, id, delay + Duration::from_secs(3)).await;
    attempts.sort_unstable();
    within("close", again.close()).await.unwrap();
    attempts
}

/// A member of group "g" of `Payment:*:*`.
fn group_g() -> SubscribeOptions {
    SubscribeOptions::new(ChannelPattern::parse("Payment:*:*").unwrap()).group("g")
}

/// Reads the next deliveries of `id` until `quiet` passes without one, acknowledging each: their
/// attempts, in order of arrival.
async fn attempts_until_quiet(
    subscription: &mut Subscription,
    id: MessageId,
    quiet: Duration,
) -> Vec<u32> {
    let mut attempts = Vec::new();
    while let Ok(Some(delivery)) = tokio::time::timeout(quiet, subscription.next()).await {
        assert_eq!(delivery.envelope().id(), id, "{:?}", delivery.envelope());
        attempts.push(delivery.envelope().attempt());
        within("ack", delivery.ack()).await.unwrap();
    }
    attempts
}

/// A `nack(Retry)` whose copy to the retry queue went out but was not confirmed in time (here every
/// byte through the proxy is 600 ms late, and `confirm_timeout` is 500 ms) may have been stored all
/// the same: this one was, and its confirm came 1.2 s after it was sent. The retry used to requeue
/// the original at once, unchanged (still attempt 1), and say "message <id> may come twice": the
/// message came again at once and, from the copy, after the delay. Now the original is held
/// unacknowledged until the copy's confirm comes, the caller is told so at once, and when the late
/// confirm says the copy was stored the original is acknowledged: the message comes once more, as
/// the retry, after its delay. Counted in `copies_confirmed_late` (and `retried`), not in
/// `copies_unconfirmed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_whose_copy_is_confirmed_late_holds_the_original_then_acknowledges_it() {
    if !broker_available().await {
        return;
    }
    let delay = Duration::from_secs(5);
    let SlowConfirms {
        proxy,
        router,
        mut subscription,
        _cleanup,
        ..
    } = group_subscriber_with_slow_confirms("t-retry-late", delay, |builder| builder).await;
    let delivery = within("a delivery", subscription.next()).await.unwrap();
    let id = delivery.envelope().id();
    // Every confirm now comes at least 1.2 s after its publish: far beyond confirm_timeout, while
    // the publish itself reaches RabbitMQ, which stores it.
    proxy.set_latency(Duration::from_millis(600));
    let nacked_at = Instant::now();
    let error = within("the retry", delivery.nack(NackAction::Retry { delay }))
        .await
        .expect_err("a retry whose copy was not confirmed in time");
    let text = error.to_string();
    assert!(text.contains("held unacknowledged"), "{text}");
    assert!(text.contains(&id.to_string()), "{text}");
    assert!(text.contains("after 5s, as attempt 2"), "{text}");
    let health = within("health", router.health()).await;
    assert_eq!(health.get("copies_unconfirmed"), 0, "{health:?}");
    assert_eq!(
        health.get("in_flight"),
        1,
        "the original is held: {health:?}"
    );
    wait_until("the late confirm to acknowledge the original", async || {
        router.health().await.get("copies_confirmed_late") == 1
    })
    .await;
    proxy.set_latency(Duration::ZERO);
    let health = within("health", router.health()).await;
    assert_eq!(health.get("copies_unconfirmed"), 0, "{health:?}");
    assert_eq!(health.get("confirm_timeouts"), 1, "{health:?}");
    assert_eq!(health.get("retried"), 1, "{health:?}");
    assert_eq!(health.get("requeued"), 0, "{health:?}");
    assert_eq!(health.get("acked"), 1, "{health:?}");
    assert_eq!(health.get("in_flight"), 0, "{health:?}");
    // Only the retry comes, after its delay, and nothing else.
    let copy = within("the stored retry", subscription.next())
        .await
        .unwrap();
    let waited = nacked_at.elapsed();
    assert_eq!(copy.envelope().id(), id);
    assert_eq!(copy.envelope().attempt(), 2);
    assert!(!copy.is_redelivered());
    assert!(waited >= delay, "the retry came after {waited:?}");
    within("ack", copy.ack()).await.unwrap();
    let extra = attempts_until_quiet(&mut subscription, id, Duration::from_secs(1)).await;
    assert!(extra.is_empty(), "more deliveries: attempts {extra:?}");
    within("close", router.close()).await.unwrap();
}

/// The original held for its copy's late confirm is given back when that confirm cannot come any
/// more: here RabbitMQ stored the copy, and the connections were cut before its confirm got through.
/// Whether the copy was stored cannot be known then, so the message may come twice: counted in
/// `copies_unconfirmed` and logged with its id, once the channel is lost, not before. The message
/// comes again as it was (RabbitMQ gave the original back with its channel), and the copy after its
/// delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_held_for_a_late_confirm_gives_the_original_back_when_the_copy_is_lost() {
    if !broker_available().await {
        return;
    }
    let logs = Logs::capture();
    let delay = Duration::from_secs(5);
    let SlowConfirms {
        proxy,
        router,
        mut subscription,
        retry_queue,
        _cleanup,
        ..
    } = group_subscriber_with_slow_confirms("t-retry-late-lost", delay, |builder| builder).await;
    let raw = Raw::open().await;
    // Declares the retry queue first (a round trip of 1.2 s), then the copy: its frame reaches
    // RabbitMQ 600 ms after it was sent, its confirm comes back 600 ms later.
    let (id, error) =
        retry_with_confirms_late(&proxy, &mut subscription, delay, Duration::from_millis(600))
            .await;
    assert!(error.contains("held unacknowledged"), "{error}");
    wait_until("RabbitMQ to store the copy", async || {
        raw.count(&retry_queue).await == Some(1)
    })
    .await;
    // Its confirm is on its way back through the proxy, and is dropped with the connections.
    proxy.cut_all();
    proxy.set_latency(Duration::ZERO);
    let health = within("health", router.health()).await;
    assert_eq!(
        health.get("copies_confirmed_late"),
        0,
        "the cut came before the confirm: {health:?}"
    );
    wait_until("the lost copy to be counted", async || {
        router.health().await.get("copies_unconfirmed") == 1
    })
    .await;
    // Logged once the original's settlement is over (its requeue may wait for the lost
    // connection's writer up to the operation timeout).
    wait_until(
        "the message to be logged as maybe coming twice",
        async || {
            logs.lines_with(&id.to_string())
                .iter()
                .any(|line| line.contains("may come twice"))
        },
    )
    .await;
    // Saying why: no confirm came, not even late (it said "its confirm came after
    // confirm_timeout" there, next to "the channel was lost before RabbitMQ confirmed it").
    let line = logs
        .lines_with(&id.to_string())
        .into_iter()
        .find(|line| line.contains("may come twice"))
        .unwrap();
    assert!(
        line.contains("its retry was not confirmed (no confirm came within confirm_timeout; its publishing channel or connection was lost"),
        "{line}"
    );
    assert!(!line.contains("came after"), "{line}");
    // Nothing is lost: the original comes again as attempt 1, then the stored copy as attempt 2.
    let attempts =
        attempts_until_quiet(&mut subscription, id, delay + Duration::from_secs(3)).await;
    assert_eq!(attempts, [1, 2]);
    raw.close().await;
    within("close", router.close()).await.unwrap();
}

/// The original is held for its copy's late confirm until RabbitMQ answers (up to
/// `retry_hold_timeout`, 25 minutes by default), however long past `publish_outage_timeout` (here
/// 500 ms, while the confirm takes 4 s): the late ack then acknowledges it, and the message comes
/// once more, as the copy's retry. A hold that ended with
/// `publish_outage_timeout` requeued the original unchanged while its copy was stored: the
/// message came at attempt 1 again, counted in `copies_unconfirmed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_held_for_a_late_confirm_outlasts_publish_outage_timeout() {
    if !broker_available().await {
        return;
    }
    let delay = Duration::from_secs(5);
    let SlowConfirms {
        proxy,
        router,
        mut subscription,
        _cleanup,
        ..
    } = group_subscriber_with_slow_confirms("t-retry-late-hold", delay, |builder| {
        builder.publish_outage_timeout(Duration::from_millis(500))
    })
    .await;
    let (id, text) =
        retry_with_confirms_late(&proxy, &mut subscription, delay, Duration::from_secs(2)).await;
    assert!(text.contains("held unacknowledged"), "{text}");
    assert!(!text.contains("at most"), "{text}");
    wait_until("the late confirm to acknowledge the original", async || {
        router.health().await.get("copies_confirmed_late") == 1
    })
    .await;
    proxy.set_latency(Duration::ZERO);
    let attempts =
        attempts_until_quiet(&mut subscription, id, delay + Duration::from_secs(3)).await;
    assert_eq!(attempts, [2], "only the copy's retry comes");
    let health = within("health", router.health()).await;
    assert_eq!(health.get("copies_unconfirmed"), 0, "{health:?}");
    within("close", router.close()).await.unwrap();
}

/// An original held for its copy's late confirm is shown in health while it is held
/// (`held_for_late_confirm`), and no longer once RabbitMQ answered: the hold lasts up to 25 minutes,
/// and during a stall every failing handler holds one more prefetch slot, a subscription with all
/// of them held getting nothing, while `in_flight` alone cannot tell that from handlers at work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_shows_an_original_held_for_its_copy_s_late_confirm_while_it_is_held() {
    if !broker_available().await {
        return;
    }
    let delay = Duration::from_secs(2);
    let SlowConfirms {
        proxy,
        router,
        mut subscription,
        _cleanup,
        ..
    } = group_subscriber_with_slow_confirms("t-retry-late-gauge", delay, |builder| builder).await;
    let (id, text) =
        retry_with_confirms_late(&proxy, &mut subscription, delay, Duration::from_secs(2)).await;
    assert!(text.contains("held unacknowledged"), "{text}");
    // The hold ends with the publishing channel too (the broker closing it, say for another
    // publish's 404), not only with its connection; and a confirmed copy acknowledges nothing once
    // the original's own channel closed (RabbitMQ's consumer_timeout closes it for a long hold).
    assert!(
        text.contains("its publishing channel or connection is lost"),
        "{text}"
    );
    assert!(text.contains("consumer_timeout"), "{text}");
    let health = within("health", router.health()).await;
    assert_eq!(health.get("copies_confirmed_late"), 0, "{health:?}");
    assert_eq!(health.get("held_for_late_confirm"), 1, "{health:?}");
    wait_until("the late confirm to acknowledge the original", async || {
        router.health().await.get("copies_confirmed_late") == 1
    })
    .await;
    let health = within("health", router.health()).await;
    assert_eq!(health.get("held_for_late_confirm"), 0, "{health:?}");
    proxy.set_latency(Duration::ZERO);
    let attempts =
        attempts_until_quiet(&mut subscription, id, delay + Duration::from_secs(3)).await;
    assert_eq!(attempts, [2]);
    within("close", router.close()).await.unwrap();
}

/// The hold ends with `retry_hold_timeout` (here 500 ms, while the copy's confirm takes 4 s): the
/// original is then requeued unchanged, counted in `copies_unconfirmed` as maybe coming twice, and the
/// copy, stored, comes after its delay; its confirm, when it comes, settles nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_held_for_a_late_confirm_gives_the_original_back_after_retry_hold_timeout() {
    if !broker_available().await {
        return;
    }
    let delay = Duration::from_secs(5);
    let SlowConfirms {
        proxy,
        router,
        mut subscription,
        _cleanup,
        ..
    } = group_subscriber_with_slow_confirms("t-retry-hold-ends", delay, |builder| {
        builder.retry_hold_timeout(Duration::from_millis(500))
    })
    .await;
    let (id, text) =
        retry_with_confirms_late(&proxy, &mut subscription, delay, Duration::from_secs(2)).await;
    assert!(
        text.contains("held unacknowledged") && text.contains("retry_hold_timeout (500ms)"),
        "{text}"
    );
    wait_until("the held original to be given back", async || {
        router.health().await.get("copies_unconfirmed") == 1
    })
    .await;
    proxy.set_latency(Duration::ZERO);
    let mut attempts =
        attempts_until_quiet(&mut subscription, id, delay + Duration::from_secs(3)).await;
    attempts.sort_unstable();
    assert_eq!(attempts, [1, 2], "the original again, then the copy");
    let health = within("health", router.health()).await;
    assert_eq!(health.get("copies_confirmed_late"), 0, "{health:?}");
    assert_eq!(health.get("held_for_late_confirm"), 0, "{health:?}");
    within("close", router.close()).await.unwrap();
}

/// A router closed while a retry holds its original for the copy's late confirm does not wait for
/// that confirm longer than its close timeouts, and loses nothing silently: here the connections go
/// silent (RabbitMQ stored the copy, its confirm never comes), close returns, the held original is
/// counted in `copies_unconfirmed` and logged as maybe coming twice, and a new router's member gets
/// both the original (RabbitMQ gave it back with its connection) and the copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_resolves_a_retry_held_for_a_late_confirm() {
    if !broker_available().await {
        return;
    }
    let logs = Logs::capture();
    let delay = Duration::from_secs(2);
    let SlowConfirms {
        proxy,
        router,
        mut subscription,
        exchange,
        retry_queue,
        _cleanup,
        ..
    } = group_subscriber_with_slow_confirms("t-retry-late-close", delay, |builder| {
        builder
            .operation_timeout(Duration::from_secs(1))
            .close_timeout(Duration::from_secs(1))
    })
    .await;
    let raw = Raw::open().await;
    // Declares the retry queue before the copy (within the 1 s operation timeout).
    let (id, error) =
        retry_with_confirms_late(&proxy, &mut subscription, delay, Duration::from_millis(300))
            .await;
    assert!(error.contains("held unacknowledged"), "{error}");
    wait_until("RabbitMQ to store the copy", async || {
        raw.count(&retry_queue).await == Some(1)
    })
    .await;
    proxy.silence_live();
    within("close", router.close()).await.unwrap();
    wait_until("the held original to be counted", async || {
        router.health().await.get("copies_unconfirmed") == 1
    })
    .await;
    wait_until(
        "the message to be logged as maybe coming twice",
        async || {
            logs.lines_with(&id.to_string())
                .iter()
                .any(|line| line.contains("may come twice"))
        },
    )
    .await;
    // RabbitMQ gives the original back once its connection is gone.
    proxy.shutdown().await;
    assert_eq!(attempts_of_a_new_member(&exchange, id, delay).await, [1, 2]);
    raw.close().await;
}

/// A late confirm that comes once the held original's channel is closed (here its subscription
/// closed meanwhile) cannot acknowledge it any more: RabbitMQ gives the original back with its
/// channel, and the stored copy comes too, so the message comes twice. That is counted in `stale`
/// and logged with the message id, and not in `copies_confirmed_late`, which counts originals
/// acknowledged for their copy (it counted this one too: it was bumped before the acknowledgement
/// was tried). A member of the group then gets the message as it was, and the retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_confirm_after_the_original_s_channel_closed_is_not_counted_as_acknowledging_it() {
    if !broker_available().await {
        return;
    }
    let logs = Logs::capture();
    let delay = Duration::from_secs(2);
    let SlowConfirms {
        proxy,
        router,
        mut subscription,
        exchange,
        _cleanup,
        ..
    } = group_subscriber_with_slow_confirms("t-retry-late-stale", delay, |builder| {
        builder
            .confirm_timeout(Duration::from_millis(200))
            .operation_timeout(Duration::from_secs(3))
            .close_timeout(Duration::from_millis(100))
    })
    .await;
    // The copy reaches RabbitMQ 800 ms after its send, well after its confirm timeout (200 ms).
    let (id, error) =
        retry_with_confirms_late(&proxy, &mut subscription, delay, Duration::from_millis(800))
            .await;
    // Its confirm, read by the proxy from now on, comes back 10 s later; the subscription's
    // cancel gets no answer either, so the subscription closes its channel (after the 3 s
    // operation timeout) long before the confirm comes.
    proxy.set_latency(Duration::from_secs(10));
    assert!(error.contains("held unacknowledged"), "{error}");
    within("close the subscription", subscription.close())
        .await
        .unwrap();
    wait_until(
        "the late confirm to find the original's channel gone",
        async || router.health().await.get("stale") == 1,
    )
    .await;
    proxy.set_latency(Duration::ZERO);
    wait_until("the duplicate to be logged", async || {
        logs.lines_with(&id.to_string())
            .iter()
            .any(|line| line.contains("delivered twice"))
    })
    .await;
    let health = within("health", router.health()).await;
    assert_eq!(
        health.get("copies_confirmed_late"),
        0,
        "the original was not acknowledged: {health:?}"
    );
    assert_eq!(health.get("acked"), 0, "{health:?}");
    assert_eq!(
        health.get("retried"),
        1,
        "the copy carries a retry: {health:?}"
    );
    // Through a router of its own: bytes already held by the proxy's 10 s latency still hold up
    // the first one's connections.
    assert_eq!(attempts_of_a_new_member(&exchange, id, delay).await, [1, 2]);
    proxy.shutdown().await;
    within("close", router.close()).await.unwrap();
}

/// The error of a publish that gave up waiting out an outage says how long the connection has been
/// down: "no publishing connection for 1.0s ...; gave up after 1s". That figure was taken when the
/// connection's state last changed before the wait (the last reconnect attempt that failed), not
/// when the publish gave up: with reconnects 10 s apart, a publish that waited 1 s said the
/// connection had been down for a few milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_gives_up_in_an_outage_says_how_long_it_has_lasted_by_then() {
    if !broker_available().await {
        return;
    }
    let proxy = start_proxy().await;
    let exchange = unique("t-outage-length");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let bound = Duration::from_secs(1);
    let router = within(
        "connect through the proxy",
        AmqpRouter::builder(proxied_url(&proxy))
            .exchange(&exchange)
            .reconnect(Backoff::new(Duration::from_secs(10), Duration::from_secs(10)).jitter(0.0))
            .publish_outage_timeout(bound)
            .connect(),
    )
    .await
    .expect("connect");
    within("a first publish", router.publish(envelope(1)))
        .await
        .unwrap();
    proxy.reject_for(Duration::from_secs(60));
    wait_until("the proxy to stop listening", async || {
        tokio::net::TcpStream::connect(proxy.local_addr())
            .await
            .is_err()
    })
    .await;
    proxy.cut_all();
    // The first reconnect attempt failed; the next is 10 s away, so nothing changes while the
    // publish below waits.
    wait_until("the first reconnect attempt to fail", async || {
        let detail = router.health().await.detail;
        detail.contains("the publishing connection is down") && detail.contains("(attempt 1;")
    })
    .await;
    let error = within("a publish in the outage", router.publish(envelope(2)))
        .await
        .unwrap_err();
    proxy.reject_for(Duration::ZERO);
    let text = error.to_string();
    assert!(
        text.contains("gave up after 1s (publish_outage_timeout)"),
        "{text}"
    );
    assert!(text.contains("1 attempt failed"), "{text}");
    let down = text
        .split("no publishing connection for ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("no outage length in: {text}"));
    let down = if let Some(ms) = down.strip_suffix("ms") {
        ms.parse::<f64>().unwrap() / 1000.0
    } else if let Some(s) = down.strip_suffix('s') {
        s.parse::<f64>().unwrap()
    } else {
        0.0
    };
    assert!(down >= bound.as_secs_f64(), "{text}");
    within("close", router.close()).await.unwrap();
}

/// A handler that keeps failing, settled as the core runtime does with `max_attempts` 2 (a retry at
/// attempt 1, a dead letter at attempt 2), while every confirm on the publishing connection is late
/// (a stalled or alarmed broker that still stores what it reads). Each `nack(Retry)` used to leave a
/// copy RabbitMQ may store and requeue the original unchanged, still attempt 1, so the handler ran
/// again at once, and again after each confirm timeout: max_attempts no longer bounded it, and every
/// round's copy came back as attempt 2. In 10 s with a 500 ms confirm timeout and 600 ms latency: 7
/// deliveries at attempt 1 and 7 at attempt 2 (7 dead letters for one message). Now the original is
/// held until the copy's late confirm says it was stored, then acknowledged: the message is handled
/// at attempt 1, then at attempt 2 (dead-lettered), once each, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_failing_while_confirms_time_out_does_not_multiply_its_message() {
    if !broker_available().await {
        return;
    }
    const MAX_ATTEMPTS: u32 = 2;
    let delay = Duration::from_secs(1);
    let SlowConfirms {
        proxy,
        router,
        mut subscription,
        _cleanup,
        ..
    } = group_subscriber_with_slow_confirms("t-poison-stall", delay, |builder| builder).await;
    proxy.set_latency(Duration::from_millis(600));
    let mut attempts = Vec::new();
    let mut id = None;
    let stall = Instant::now() + Duration::from_secs(10);
    let mut stalled = true;
    loop {
        if stalled && Instant::now() >= stall {
            proxy.set_latency(Duration::ZERO);
            stalled = false;
        }
        let Ok(Some(delivery)) =
            tokio::time::timeout(Duration::from_secs(4), subscription.next()).await
        else {
            if stalled {
                continue;
            }
            break;
        };
        assert_eq!(
            *id.get_or_insert(delivery.envelope().id()),
            delivery.envelope().id()
        );
        let attempt = delivery.envelope().attempt();
        attempts.push(attempt);
        if attempt < MAX_ATTEMPTS {
            let _ = delivery.nack(NackAction::Retry { delay }).await;
        } else {
            // Dead-lettered by the runtime: acknowledged here.
            let _ = delivery.ack().await;
        }
    }
    let health = within("health", router.health()).await;
    // Handled once per attempt, in order, up to max_attempts, and dead-lettered once: nothing more,
    // and nothing lost.
    assert_eq!(
        attempts,
        (1..=MAX_ATTEMPTS).collect::<Vec<_>>(),
        "attempts of one message with max_attempts {MAX_ATTEMPTS}: {health:?}"
    );
    assert_eq!(health.get("copies_unconfirmed"), 0, "{health:?}");
    assert_eq!(health.get("copies_confirmed_late"), 1, "{health:?}");
    within("close", router.close()).await.unwrap();
}

/// A handler failing through a stall longer than `publish_outage_timeout` runs `max_attempts` times.
/// When the original was held for its copy's late confirm for `publish_outage_timeout` only, each
/// hold ended with the original requeued unchanged (attempt 1 again, counted in
/// `copies_unconfirmed`) while its copy was stored all the same, and the handler's next failure
/// sent another copy: here, 20 s of 1.5 s latency with a 1 s `publish_outage_timeout` gave 5
/// deliveries at attempt 1 and 5 at attempt 2 (5 dead letters) for one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_failing_through_a_stall_longer_than_the_hold_does_not_multiply_its_message() {
    if !broker_available().await {
        return;
    }
    const MAX_ATTEMPTS: u32 = 2;
    let delay = Duration::from_secs(1);
    let SlowConfirms {
        proxy,
        router,
        mut subscription,
        _cleanup,
        ..
    } = group_subscriber_with_slow_confirms("t-poison-long", delay, |builder| {
        builder.publish_outage_timeout(Duration::from_secs(1))
    })
    .await;
    proxy.set_latency(Duration::from_millis(1500));
    let mut attempts = Vec::new();
    let stall = Instant::now() + Duration::from_secs(20);
    let mut stalled = true;
    loop {
        if stalled && Instant::now() >= stall {
            proxy.set_latency(Duration::ZERO);
            stalled = false;
        }
        let Ok(Some(delivery)) =
            tokio::time::timeout(Duration::from_secs(6), subscription.next()).await
        else {
            if stalled {
                continue;
            }
            break;
        };
        let attempt = delivery.envelope().attempt();
        attempts.push(attempt);
        if attempt < MAX_ATTEMPTS {
            let _ = delivery.nack(NackAction::Retry { delay }).await;
        } else {
            let _ = delivery.ack().await;
        }
    }
    let health = within("health", router.health()).await;
    assert_eq!(
        attempts,
        (1..=MAX_ATTEMPTS).collect::<Vec<_>>(),
        "attempts of one message with max_attempts {MAX_ATTEMPTS}: {health:?}"
    );
    within("close", router.close()).await.unwrap();
}

/// A connection that does not open in time names the setting that bounded it: `connect_timeout`,
/// or the URL's `connection_timeout` (the builder's name and the URL's differ). It said only "did
/// not open within 500ms", leaving the user to find which of the two to raise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_does_not_open_in_time_names_the_setting_that_bounded_it() {
    if !broker_available().await {
        return;
    }
    let proxy = start_proxy().await;
    // Accepted, and never answered: the AMQP handshake stalls.
    proxy.blackhole(true);
    let exchange = unique("t-connect-timeout");
    let url = proxied_url(&proxy);
    let separator = if url.contains('?') { '&' } else { '?' };
    for (builder, expected) in [
        (
            AmqpRouter::builder(&url).connect_timeout(Duration::from_millis(500)),
            "did not open within 500ms (connect_timeout)",
        ),
        (
            AmqpRouter::builder(format!("{url}{separator}connection_timeout=500")),
            "did not open within 500ms (the URL's connection_timeout)",
        ),
    ] {
        let error = within(
            "a connect that times out",
            builder.exchange(&exchange).connect(),
        )
        .await
        .expect_err("a black-holed broker cannot be connected to");
        let text = error.to_string();
        assert!(text.contains(expected), "{text}");
    }
    proxy.shutdown().await;
}

/// Closing a router whose broker went silent (the network lost the connections' state: nothing
/// answers, nothing is closed) shuts its channels and connections down within one
/// `operation_timeout`. One after the other, each with a timeout of its own, they took four (40 s
/// with the defaults), past a container's usual grace period, with `close_timeout` at 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_shuts_a_silent_broker_s_connections_within_one_operation_timeout() {
    if !broker_available().await {
        return;
    }
    let proxy = start_proxy().await;
    let exchange = unique("t-close-silent");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let operation_timeout = Duration::from_secs(1);
    let router = within(
        "connect through the proxy",
        AmqpRouter::builder(proxied_url(&proxy))
            .exchange(&exchange)
            .operation_timeout(operation_timeout)
            .close_timeout(Duration::from_secs(1))
            .connect(),
    )
    .await
    .unwrap();
    // The publishing channel is open and used.
    let outcome = within("publish", router.publish(envelope(1)))
        .await
        .unwrap();
    assert_eq!(outcome, PublishOutcome::Unroutable);
    proxy.silence_live();
    let started = Instant::now();
    within("close", router.close()).await.unwrap();
    let took = started.elapsed();
    // Nothing is in flight: only the channels and connections to close. Half a timeout of slack.
    assert!(
        took < operation_timeout * 3 / 2,
        "close took {took:?} with an operation timeout of {operation_timeout:?}"
    );
    assert!(!router.is_connected());
    proxy.shutdown().await;
}

/// While a connection cannot be made again, health names the URL once per connection, in the last
/// attempt's error, which says what to check. The detail added "check that RabbitMQ at <url> is
/// running" after it, repeating the URL and, after a refused login (a password rotated on the
/// broker), contradicting the error's own advice to check the user name and password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_during_a_failing_reconnect_gives_its_advice_once_per_connection() {
    if !broker_available().await {
        return;
    }
    let proxy = start_proxy().await;
    let exchange = unique("t-health-advice");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = proxied_router(&proxy, &exchange).await;
    // Accepted and dropped at once, as a load balancer in front of a RabbitMQ that is down does.
    proxy.refuse_for(Duration::from_secs(30));
    proxy.cut_all();
    wait_until("both connections failing to reconnect", async || {
        let detail = router.health().await.detail;
        detail.matches("last error: cannot reach").count() == 2
    })
    .await;
    let health = router.health().await;
    assert_eq!(health.status, HealthStatus::Degraded, "{}", health.detail);
    assert_eq!(
        health.detail.matches(router.url()).count(),
        2,
        "the URL once per connection: {}",
        health.detail
    );
    assert_eq!(
        health.detail.to_lowercase().matches("check that").count(),
        2,
        "the advice once per connection: {}",
        health.detail
    );
    // The drop comes before RabbitMQ's connection.start, which a refused login would have come
    // after: both name a load balancer whose RabbitMQ is down, not the password; nor do they ask
    // whether the port, on which the router was connected until the cut, is the right one.
    assert_eq!(
        health
            .detail
            .matches(
                "closed the connection without answering the AMQP protocol header, as a proxy or \
                 load balancer in front of a RabbitMQ that is down or restarting does"
            )
            .count(),
        2,
        "{}",
        health.detail
    );
    for wrong in [
        "does not speak AMQP",
        "the right port",
        "user name and password",
    ] {
        assert!(!health.detail.contains(wrong), "{}", health.detail);
    }
    proxy.refuse_for(Duration::ZERO);
    within("close", router.close()).await.unwrap();
    proxy.shutdown().await;
}
