//! Connections cut while messages flow, with the testkit's fault proxy between client and Redis.
//!
//! The sizes scale with AGENTCOMM_SOAK (10,000 messages and 5 cuts at factor 1).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use agentcomm_core::envelope::Envelope;
use agentcomm_core::prelude::*;
use agentcomm_core::router::SubscribeOptions;
use agentcomm_redis::{DeliveryMode, RedisRouter};
use futures::StreamExt;

const CUTS: u64 = 5;

fn soak() -> usize {
    std::env::var("AGENTCOMM_SOAK")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(1)
        .max(1)
}

fn message(channel: &Channel, n: usize) -> Envelope {
    Envelope::new(
        channel.clone(),
        "application/octet-stream",
        n.to_le_bytes().to_vec(),
    )
}

fn number(envelope: &Envelope) -> usize {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&envelope.payload()[..8]);
    usize::from_le_bytes(bytes)
}

/// Connects `builder` (pointed at the proxy), failing the test after 10 s.
async fn connect_through_proxy(builder: agentcomm_redis::RedisRouterBuilder) -> RedisRouter {
    within(
        Duration::from_secs(10),
        "connecting through the proxy",
        builder.connect(),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_lose_nothing_and_duplicate_nothing_across_cuts() {
    let Some((proxy, proxied)) = redis_proxy().await else {
        return;
    };
    let total = 10_000 * soak();
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let consumer: RedisRouter = connect_through_proxy(
        RedisRouter::builder(proxied.clone())
            .prefix(&prefix)
            .read_block(Duration::from_millis(500))
            .claim_idle(Duration::from_secs(1)),
    )
    .await;
    let publisher: RedisRouter = connect_through_proxy(
        RedisRouter::builder(proxied)
            .prefix(&prefix)
            .idempotent_publish(true),
    )
    .await;
    let mut subscription = consumer
        .subscribe(SubscribeOptions::new(ChannelPattern::parse("Flow:*:*").unwrap()).group("sink"))
        .await
        .unwrap();
    let seen: Arc<Mutex<HashMap<usize, u32>>> = Arc::default();
    let received = Arc::new(AtomicU64::new(0));
    let reader = {
        let seen = seen.clone();
        let received = received.clone();
        tokio::spawn(async move {
            while let Some(delivery) = subscription.next().await {
                let n = number(delivery.envelope());
                if delivery.ack().await.is_ok() {
                    *seen.lock().unwrap().entry(n).or_insert(0) += 1;
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let channel = parse_channel("Flow:event:s1").unwrap();
    let publishing = {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            let results: Vec<_> = futures::stream::iter(0..total)
                .map(|n| {
                    let publisher = publisher.clone();
                    let envelope = message(&channel, n);
                    async move { publisher.publish(envelope).await }
                })
                .buffer_unordered(64)
                .collect()
                .await;
            results
        })
    };
    for cut in 1..=CUTS {
        let target = total as u64 * cut / (CUTS + 1);
        eventually(
            Duration::from_secs(60),
            "messages flow before the next cut",
            async || received.load(Ordering::Relaxed) >= target,
        )
        .await;
        proxy.cut_all();
    }
    let results = within(
        Duration::from_secs(120),
        "every publish to finish",
        publishing,
    )
    .await
    .unwrap();
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} publishes failed, e.g. {}",
        failed.len(),
        failed[0]
    );
    eventually(
        Duration::from_secs(60),
        "every message to arrive",
        async || received.load(Ordering::Relaxed) >= total as u64,
    )
    .await;
    // Anything still to come would be a duplicate, from a reclaim after claim_idle (1 s): wait past it.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let seen = seen.lock().unwrap().clone();
    let missing: Vec<usize> = (0..total).filter(|n| !seen.contains_key(n)).collect();
    let duplicated: Vec<(usize, u32)> = seen
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(n, c)| (*n, *c))
        .collect();
    let health = consumer.health().await;
    assert!(
        missing.is_empty(),
        "lost {} messages, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(
        duplicated.is_empty(),
        "delivered twice to a successful handler: {duplicated:?}; {health:?}"
    );
    assert_eq!(proxy.stats().cuts, CUTS);
    assert!(health.get("reconnects") >= CUTS, "{health:?}");
    consumer.close().await.unwrap();
    publisher.close().await.unwrap();
    let _ = within(Duration::from_secs(10), "the reader to end", reader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_counts_exactly_what_it_lost_and_resumes_after_each_cut() {
    let Some((proxy, proxied)) = redis_proxy().await else {
        return;
    };
    let total = 10_000 * soak();
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    // The subscriber goes through the proxy; the publisher does not, so it goes on publishing while
    // the subscriber reconnects, and those messages are lost to it.
    let subscriber = connect_through_proxy(
        RedisRouter::builder(proxied)
            .mode(DeliveryMode::PubSub)
            .prefix(&prefix)
            .reorder_window(Duration::from_millis(200)),
    )
    .await;
    let publisher = connected(builder(DeliveryMode::PubSub, &prefix)).await;
    let mut subscription = subscriber
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Tick:*:*").unwrap(),
        ))
        .await
        .unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let duplicates = Arc::new(AtomicU64::new(0));
    let reader = {
        let received = received.clone();
        let duplicates = duplicates.clone();
        tokio::spawn(async move {
            let mut seen = std::collections::HashSet::new();
            while let Some(delivery) = subscription.next().await {
                if !seen.insert(number(delivery.envelope())) {
                    duplicates.fetch_add(1, Ordering::Relaxed);
                }
                received.fetch_add(1, Ordering::Relaxed);
                let _ = delivery.ack().await;
            }
        })
    };
    let channel = parse_channel("Tick:event:s1").unwrap();
    let published = Arc::new(AtomicU64::new(0));
    let publishing = {
        let publisher = publisher.clone();
        let published = published.clone();
        tokio::spawn(async move {
            // Batches of 50 with a short pause: a steady flow for the cuts to fall into.
            for start in (0..total).step_by(50) {
                let batch: Vec<Envelope> = (start..(start + 50).min(total))
                    .map(|n| message(&channel, n))
                    .collect();
                for result in publisher.publish_batch(batch).await {
                    result.expect("the publisher is not cut");
                    published.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    for cut in 1..=CUTS {
        let target = total as u64 * cut / (CUTS + 1);
        eventually(
            Duration::from_secs(60),
            "publishing to progress",
            async || published.load(Ordering::Relaxed) >= target,
        )
        .await;
        let before = received.load(Ordering::Relaxed);
        proxy.cut_all();
        // It resumes: messages published after the cut arrive again.
        eventually(
            Duration::from_secs(30),
            "delivery to resume after the cut",
            async || {
                received.load(Ordering::Relaxed) > before
                    && subscriber.health().await.get("reconnects") >= cut
            },
        )
        .await;
    }
    within(Duration::from_secs(120), "publishing to finish", publishing)
        .await
        .unwrap();
    // Every message is either received or reported lost.
    eventually(
        Duration::from_secs(30),
        "received + lost to account for every message",
        async || {
            let health = subscriber.health().await;
            received.load(Ordering::Relaxed) + health.get("lost") + health.get("dropped")
                >= total as u64
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let health = subscriber.health().await;
    let received = received.load(Ordering::Relaxed);
    // `lagged` (messages skipped in the subscriber's shared channel) is not part of the sum: a
    // subscription's own losses show as gaps in the sequences it follows, counted in `lost`.
    assert_eq!(
        received + health.get("lost") + health.get("dropped"),
        total as u64,
        "received {received}; {health:?}"
    );
    assert_eq!(duplicates.load(Ordering::Relaxed), 0);
    println!(
        "pub/sub across {CUTS} cuts: received {received} of {total}, lost {} (counted), dropped {}",
        health.get("lost"),
        health.get("dropped")
    );
    subscriber.close().await.unwrap();
    publisher.close().await.unwrap();
    let _ = within(Duration::from_secs(10), "the reader to end", reader).await;
}

async fn stream_length(raw: &fred::prelude::Client, key: &str) -> u64 {
    use fred::prelude::StreamsInterface;
    raw.xlen(key).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_publish_fred_writes_again_after_a_cut_is_stored_once() {
    let Some((proxy, proxied)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let publisher = connect_through_proxy(
        RedisRouter::builder(proxied)
            .prefix(&prefix)
            .idempotent_publish(true),
    )
    .await;
    let channel = parse_channel("Replay:event:s1").unwrap();
    publisher.publish(message(&channel, 0)).await.unwrap();
    let raw = raw_client().await;
    let key = format!("{prefix}:stream:{{Replay}}");
    // The next XADD reaches Redis, but its reply is held in the proxy; the connection is cut while it
    // is, and fred writes the command again on the new connection. The test must see the entry and
    // cut within the latency: 500 ms was too short on a loaded 2-core machine.
    proxy.set_latency(Duration::from_secs(3));
    let publishing = {
        let publisher = publisher.clone();
        let envelope = message(&channel, 1);
        tokio::spawn(async move { publisher.publish(envelope).await })
    };
    eventually(Duration::from_secs(10), "Redis to store it", async || {
        stream_length(&raw, &key).await == 2
    })
    .await;
    proxy.set_latency(Duration::ZERO);
    proxy.cut_all();
    let outcome = within(Duration::from_secs(20), "the publish to finish", publishing)
        .await
        .unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
    assert_eq!(stream_length(&raw, &key).await, 2, "stored once");
    let health = publisher.health().await;
    assert_eq!(health.get("publish_duplicates"), 1, "{health:?}");
    let _ = fred::prelude::ClientLike::quit(&raw).await;
    publisher.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pubsub_publish_fred_writes_again_after_a_cut_is_delivered_once() {
    let Some((proxy, proxied)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    // The subscriber is direct; the publisher goes through the proxy.
    let subscriber = connected(builder(DeliveryMode::PubSub, &prefix)).await;
    let publisher = connect_through_proxy(
        RedisRouter::builder(proxied)
            .mode(DeliveryMode::PubSub)
            .prefix(&prefix),
    )
    .await;
    let mut subscription = subscriber
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Echo:*:*").unwrap(),
        ))
        .await
        .unwrap();
    // A plain subscriber counts what Redis really sent.
    let raw = {
        use fred::prelude::{ClientLike, PubsubInterface};
        let raw = fred::prelude::Builder::from_config(
            fred::prelude::Config::from_url(&redis_url()).unwrap(),
        )
        .build_subscriber_client()
        .unwrap();
        within(Duration::from_secs(10), "a raw subscriber", raw.init())
            .await
            .unwrap();
        raw.subscribe(format!("{prefix}:Echo:event:s1"))
            .await
            .unwrap();
        let _: fred::types::Value = raw.ping(None).await.unwrap();
        raw
    };
    let mut sent = fred::prelude::EventInterface::message_rx(&raw);
    let channel = parse_channel("Echo:event:s1").unwrap();
    // The reply to the PUBLISH is held this long on its way back: the delivery must be read and the
    // connection cut within it, or fred has its reply and publishes nothing again. 500 ms was too
    // short on a loaded 2-core machine.
    proxy.set_latency(Duration::from_secs(3));
    let publishing = {
        let publisher = publisher.clone();
        let envelope = message(&channel, 7);
        tokio::spawn(async move { publisher.publish(envelope).await })
    };
    let first = next(&mut subscription).await;
    assert_eq!(number(first.envelope()), 7);
    first.ack().await.unwrap();
    // Delivered, and its reply still held: cut, so that fred publishes it again.
    proxy.set_latency(Duration::ZERO);
    proxy.cut_all();
    let outcome = within(Duration::from_secs(20), "the publish to finish", publishing)
        .await
        .unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
    for copy in 1..=2 {
        let message = within(Duration::from_secs(5), "Redis to send it", sent.recv())
            .await
            .unwrap_or_else(|error| panic!("copy {copy}: {error}"));
        assert!(message.channel.ends_with("Echo:event:s1"));
    }
    // Published twice by Redis, delivered once: the repeat (right after the original, it cannot be told
    // from the copy Redis sends for a second matching subscription) is skipped.
    assert_quiet(&mut subscription, Duration::from_millis(300)).await;
    let health = subscriber.health().await;
    assert_eq!(health.get("delivered"), 1, "{health:?}");
    let _ = fred::prelude::ClientLike::quit(&raw).await;
    subscriber.close().await.unwrap();
    publisher.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_published_during_an_outage_fails_publish_by_publish() {
    let Some((proxy, proxied)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    for mode in [DeliveryMode::Streams, DeliveryMode::PubSub] {
        let router = connect_through_proxy(
            RedisRouter::builder(proxied.clone())
                .mode(mode)
                .prefix(&prefix)
                .command_timeout(Duration::from_millis(500)),
        )
        .await;
        let channel = parse_channel("Outage:event:s1").unwrap();
        router.publish(message(&channel, 0)).await.unwrap();
        proxy.blackhole(true);
        let batch: Vec<Envelope> = (1..=10).map(|n| message(&channel, n)).collect();
        let results = within(
            Duration::from_secs(10),
            "the batch to fail",
            router.publish_batch(batch),
        )
        .await;
        assert_eq!(results.len(), 10, "{mode}");
        assert!(results.iter().all(Result::is_err), "{mode}: {results:?}");
        proxy.blackhole(false);
        proxy.cut_all();
        eventually(
            Duration::from_secs(10),
            "publishing to work again",
            async || router.publish(message(&channel, 11)).await.is_ok(),
        )
        .await;
        assert!(router.health().await.get("publish_errors") >= 10);
        router.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_numbers_that_never_reached_redis_never_turn_new_messages_into_repeats() {
    use fred::prelude::StreamsInterface;
    let Some((proxy, proxied)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect_through_proxy(
        RedisRouter::builder(proxied)
            .prefix(&prefix)
            .idempotent_publish(true)
            // Bounds the publishes made while Redis is out of reach. Each batch below is 1,000 commands
            // pipelined on one connection, the last of which waits for all the others: with 400 ms, one
            // timed out on a loaded 2-core machine before any fault was injected.
            .command_timeout(Duration::from_secs(3)),
    )
    .await;
    let channel = parse_channel("Big:event:s1").unwrap();
    let mut stored = 0u64;
    let publish_thousands = async |count: usize, stored: &mut u64| {
        for _ in 0..count {
            let batch: Vec<Envelope> = (0..1000).map(|n| message(&channel, n)).collect();
            for result in router.publish_batch(batch).await {
                result.unwrap();
                *stored += 1;
            }
        }
    };
    // Past a whole lap of the former 65,536-bit window, then numbers that never reach Redis (taken while
    // the connection is down and Redis refuses new ones; they time out in fred's queue and are never
    // written), then past half a lap more.
    publish_thousands(66, &mut stored).await;
    proxy.refuse_for(Duration::from_secs(30));
    proxy.cut_all();
    let lost: Vec<_> = futures::stream::iter(0..200)
        .map(|n| {
            let router = router.clone();
            let envelope = message(&channel, n);
            async move { router.publish(envelope).await }
        })
        .buffer_unordered(200)
        .collect()
        .await;
    assert!(
        lost.iter().all(Result::is_err),
        "the publishes time out while disconnected"
    );
    proxy.refuse_for(Duration::ZERO);
    // (A publish that times out after reaching Redis is stored all the same: so no probing publishes,
    // only the connection's state.)
    eventually(
        Duration::from_secs(10),
        "the connections to be back",
        async || {
            let health = router.health().await;
            health.connected && health.get("reconnects") >= 1
        },
    )
    .await;
    publish_thousands(40, &mut stored).await;
    let raw = raw_client().await;
    let length: u64 = raw.xlen(format!("{prefix}:stream:{{Big}}")).await.unwrap();
    assert_eq!(length, stored, "every publish that succeeded is stored");
    assert_eq!(router.health().await.get("publish_duplicates"), 0);
    let _ = fred::prelude::ClientLike::quit(&raw).await;
    router.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_lost_with_a_cut_read_come_back_first_and_in_order() {
    use fred::prelude::StreamsInterface;
    use fred::types::Value;
    let Some((proxy, proxied)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let consumer = connect_through_proxy(
        RedisRouter::builder(proxied)
            .prefix(&prefix)
            .read_block(Duration::from_secs(5)),
    )
    .await;
    let publisher = connected(builder(DeliveryMode::Streams, &prefix)).await;
    let mut subscription = consumer
        .subscribe(SubscribeOptions::new(ChannelPattern::parse("Ord:*:*").unwrap()).group("g"))
        .await
        .unwrap();
    let channel = parse_channel("Ord:event:s1").unwrap();
    let raw = raw_client().await;
    let key = format!("{prefix}:stream:{{Ord}}");
    // The blocked read takes entry 1; its reply is held in the proxy while 2 and 3 are published; then
    // the connection is cut and the reply lost.
    proxy.set_latency(Duration::from_millis(600));
    publisher.publish(message(&channel, 1)).await.unwrap();
    eventually(
        Duration::from_secs(5),
        "entry 1 to be handed out",
        async || {
            let pending: Value = raw.xpending(key.as_str(), "g", ()).await.unwrap();
            pending.into_array().first().and_then(Value::as_u64) == Some(1)
        },
    )
    .await;
    publisher.publish(message(&channel, 2)).await.unwrap();
    publisher.publish(message(&channel, 3)).await.unwrap();
    proxy.set_latency(Duration::ZERO);
    proxy.cut_all();
    let mut order = Vec::new();
    for _ in 0..3 {
        let delivery = next(&mut subscription).await;
        order.push(number(delivery.envelope()));
        delivery.ack().await.unwrap();
    }
    assert_eq!(order, vec![1, 2, 3]);
    let _ = fred::prelude::ClientLike::quit(&raw).await;
    consumer.close().await.unwrap();
    publisher.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_is_bounded_when_redis_stops_answering() {
    let Some((proxy, proxied)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    for mode in [DeliveryMode::Streams, DeliveryMode::PubSub] {
        let router = connect_through_proxy(
            RedisRouter::builder(proxied.clone())
                .mode(mode)
                .prefix(&prefix)
                .close_timeout(Duration::from_secs(1)),
        )
        .await;
        let options = SubscribeOptions::new(ChannelPattern::parse("Gone:*:*").unwrap());
        let options = match mode {
            DeliveryMode::Streams => options.group("g"),
            _ => options,
        };
        let _subscription = router.subscribe(options).await.unwrap();
        proxy.blackhole(true);
        let started = std::time::Instant::now();
        within(Duration::from_secs(8), "close", router.close())
            .await
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{mode}: {:?}",
            started.elapsed()
        );
        proxy.blackhole(false);
        proxy.cut_all();
    }
}

/// Closing while Redis does not answer gives up waiting at its deadline; a stream subscription's
/// reading connection used to be left open then (its finishing, which quits it, was cut short), idle
/// for as long as the subscription was held. It is quit with the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_while_redis_stops_answering_leaves_no_reader_connection_open() {
    let Some((proxy, proxied)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = closing_within_a_second(proxied, &prefix).await;
    let subscription = router
        .subscribe(SubscribeOptions::new(ChannelPattern::parse("Held:*:*").unwrap()).group("g"))
        .await
        .unwrap();
    proxy.blackhole(true);
    // The subscription is still held: its reader's connection must be closed all the same.
    close_while_redis_is_silent(&proxy, &router).await;
    drop(subscription);
}

/// A router through the fault proxy whose close gives up after a second.
async fn closing_within_a_second(proxied: String, prefix: &str) -> RedisRouter {
    connect_through_proxy(
        RedisRouter::builder(proxied)
            .prefix(prefix)
            .read_block(Duration::from_millis(500))
            .close_timeout(Duration::from_secs(1)),
    )
    .await
}

/// Closes `router`, whose Redis the proxy black-holes: the close returns within its deadline, and
/// every connection is closed once the proxy passes traffic again.
async fn close_while_redis_is_silent(
    proxy: &agentcomm_testkit::proxy::FaultProxy,
    router: &RedisRouter,
) {
    let started = std::time::Instant::now();
    within(Duration::from_secs(8), "close", router.close())
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    proxy.blackhole(false);
    eventually(
        Duration::from_secs(5),
        "every connection to be closed",
        async || proxy.stats().live == 0,
    )
    .await;
}

/// A subscription closed while Redis does not answer: its finishing waits for Redis, and the router's
/// close, which waits for that finishing instead of running it again, still gives up at its deadline
/// and quits every connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_after_a_subscription_whose_finishing_hangs_is_bounded() {
    let Some((proxy, proxied)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = closing_within_a_second(proxied, &prefix).await;
    let channel = parse_channel("Hung:event:s1").unwrap();
    router.publish(message(&channel, 1)).await.unwrap();
    let mut subscription = router
        .subscribe(SubscribeOptions::new(ChannelPattern::parse("Hung:*:*").unwrap()).group("g"))
        .await
        .unwrap();
    router.publish(message(&channel, 2)).await.unwrap();
    within(Duration::from_secs(10), "the entry", subscription.next())
        .await
        .expect("a delivery")
        .ack()
        .await
        .unwrap();
    proxy.blackhole(true);
    subscription.close().await.unwrap();
    drop(subscription);
    close_while_redis_is_silent(&proxy, &router).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_registry_is_written_again_after_a_reconnect() {
    use fred::prelude::{KeysInterface, SetsInterface};
    let Some((proxy, proxied)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect_through_proxy(RedisRouter::builder(proxied).prefix(&prefix)).await;
    let channel = parse_channel("Listed:event:s1").unwrap();
    router.publish(message(&channel, 1)).await.unwrap();
    let raw = raw_client().await;
    let registry = format!("{prefix}:streams");
    // Redis restarted without persistence, or someone flushed it: the registry is gone.
    let _: i64 = raw.del(registry.as_str()).await.unwrap();
    proxy.cut_all();
    eventually(Duration::from_secs(10), "a reconnect", async || {
        router.health().await.get("reconnects") >= 1
    })
    .await;
    router.publish(message(&channel, 2)).await.unwrap();
    let classes: Vec<String> = raw.smembers(registry.as_str()).await.unwrap();
    assert_eq!(classes, vec!["Listed".to_string()]);
    let _ = fred::prelude::ClientLike::quit(&raw).await;
    router.close().await.unwrap();
}

/// An entry whose handler acknowledged it, but whose `XACK` was lost with a cut connection, is pending
/// still when the connection is back: it is acknowledged then, not handled again, and counted in
/// `acks_recovered`. Before, it came again as its next attempt: handled twice, and with
/// `max_deliveries(1)` dead-lettered although its handler had succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_whose_acknowledgement_was_lost_is_acknowledged_when_it_comes_back() {
    use fred::prelude::StreamsInterface;
    use fred::types::Value;
    let Some((proxy, proxied)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let consumer = connect_through_proxy(
        RedisRouter::builder(proxied)
            .prefix(&prefix)
            .max_deliveries(1)
            .command_timeout(Duration::from_millis(500))
            .read_block(Duration::from_millis(500)),
    )
    .await;
    let publisher = connected(builder(DeliveryMode::Streams, &prefix)).await;
    let mut subscription = consumer
        .subscribe(SubscribeOptions::new(ChannelPattern::parse("Ack:*:*").unwrap()).group("g"))
        .await
        .unwrap();
    let channel = parse_channel("Ack:event:s1").unwrap();
    publisher.publish(message(&channel, 1)).await.unwrap();
    let first = next(&mut subscription).await;
    assert_eq!(first.envelope().attempt(), 1);
    // Cut off, and kept off until the acknowledgement has failed (it times out in fred's queue and is
    // never written).
    proxy.reject_for(Duration::from_secs(30));
    proxy.cut_all();
    // The proxy cuts its connections on its own tasks: until they are closed, an XACK written now
    // could still pass through (under load it did, once).
    eventually(
        Duration::from_secs(10),
        "the proxy to have cut every connection",
        async || proxy.stats().live == 0,
    )
    .await;
    let acked = within(
        Duration::from_secs(10),
        "the acknowledgement to fail",
        first.ack(),
    )
    .await;
    assert!(acked.is_err(), "the XACK never reached Redis: {acked:?}");
    proxy.reject_for(Duration::ZERO);
    eventually(
        Duration::from_secs(10),
        "the entry to be acknowledged once the connection is back",
        async || consumer.health().await.get("acks_recovered") == 1,
    )
    .await;
    // A message published after the cut comes through: nothing of the first came before it.
    publisher.publish(message(&channel, 2)).await.unwrap();
    let second = next(&mut subscription).await;
    assert_eq!(
        number(second.envelope()),
        2,
        "the first is not handled again"
    );
    second.ack().await.unwrap();
    let raw = raw_client().await;
    let pending: Value = raw
        .xpending(format!("{prefix}:stream:{{Ack}}"), "g", ("-", "+", 10))
        .await
        .unwrap();
    assert!(
        pending.into_array().is_empty(),
        "nothing is left pending in Redis"
    );
    let health = consumer.health().await;
    assert_eq!(health.get("dead_lettered"), 0, "{health:?}");
    assert_eq!(health.get("acked"), 2, "{health:?}");
    let _ = fred::prelude::ClientLike::quit(&raw).await;
    consumer.close().await.unwrap();
    publisher.close().await.unwrap();
}

/// A `publish_batch` (Streams mode, without idempotent publishing) whose pipeline fred gave up waiting
/// for while Redis was unreachable is written by fred once the connection is back (fred 10 does not
/// mark a pipeline whose wait timed out as timed out, as it does a single command): its messages end
/// up stored although each got an error. The error must say so, so that a caller does not retry
/// blindly and store them twice; before, it only said the publish timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_given_up_while_redis_is_unreachable_says_its_messages_may_be_stored() {
    use fred::prelude::StreamsInterface;
    let Some((proxy, proxied)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let publisher = connect_through_proxy(
        RedisRouter::builder(proxied)
            .prefix(&prefix)
            .command_timeout(Duration::from_millis(500)),
    )
    .await;
    let channel = parse_channel("Late:event:s1").unwrap();
    // Registers the class: the batch sends nothing but its pipeline.
    publisher.publish(message(&channel, 0)).await.unwrap();
    proxy.reject_for(Duration::from_secs(30));
    proxy.cut_all();
    let results = within(
        Duration::from_secs(10),
        "the batch to fail",
        publisher.publish_batch(vec![message(&channel, 1), message(&channel, 2)]),
    )
    .await;
    proxy.reject_for(Duration::ZERO);
    let raw = raw_client().await;
    let stream = format!("{prefix}:stream:{{Late}}");
    // What makes the wording matter: the failed batch is stored after all, once fred reconnects.
    eventually(
        Duration::from_secs(10),
        "fred to write the batch it gave up on once reconnected",
        async || raw.xlen::<u64, _>(stream.as_str()).await.unwrap_or(0) == 3,
    )
    .await;
    assert_eq!(results.len(), 2);
    for result in results {
        let error = result
            .expect_err("the batch timed out while Redis was unreachable")
            .to_string();
        assert!(
            error.contains("may have been stored")
                && error.contains("may store it twice unless idempotent_publish(true)"),
            "the error says the message may be stored, and names the fix: {error}"
        );
    }
    let health = publisher.health().await;
    assert_eq!(health.get("publish_uncertain"), 2, "{health:?}");
    let _ = fred::prelude::ClientLike::quit(&raw).await;
    publisher.close().await.unwrap();
}

/// The same in pub/sub mode: a `publish_batch` whose pipeline fred gave up waiting for while Redis was
/// unreachable is published once the connection is back, and reaches subscribers, although each of its
/// messages got an error. A caller that publishes them again delivers them twice (a retry takes a new
/// sequence number: subscribers cannot tell the copies apart). The error must say so, and the
/// publishes are counted in `publish_uncertain`; before, the error only said the publish timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pubsub_batch_given_up_while_redis_is_unreachable_says_its_messages_may_be_delivered() {
    let Some((proxy, proxied)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let publisher = connect_through_proxy(
        RedisRouter::builder(proxied)
            .mode(DeliveryMode::PubSub)
            .prefix(&prefix)
            .command_timeout(Duration::from_millis(500)),
    )
    .await;
    let (subscriber, mut subscription, channel) =
        flowing(&publisher, DeliveryMode::PubSub, &prefix, "Late").await;
    proxy.reject_for(Duration::from_secs(30));
    proxy.cut_all();
    let results = within(
        Duration::from_secs(10),
        "the batch to fail",
        publisher.publish_batch(vec![message(&channel, 1), message(&channel, 2)]),
    )
    .await;
    proxy.reject_for(Duration::ZERO);
    // What makes the wording matter: the failed batch is published after all, once fred reconnects.
    for expected in [1, 2] {
        let delivery = next(&mut subscription).await;
        assert_eq!(number(delivery.envelope()), expected);
        delivery.ack().await.unwrap();
    }
    assert_eq!(results.len(), 2);
    for result in results {
        let error = result
            .expect_err("the batch timed out while Redis was unreachable")
            .to_string();
        assert!(
            error.contains("may have been published") && error.contains("may deliver it twice"),
            "the error says the message may be delivered, and what a retry does: {error}"
        );
    }
    let health = publisher.health().await;
    assert_eq!(health.get("publish_uncertain"), 2, "{health:?}");
    subscriber.close().await.unwrap();
    publisher.close().await.unwrap();
}

/// A single pub/sub publish whose answer comes later than the command timeout was run by Redis all the
/// same: its subscribers receive it, although its caller got an error. A caller that publishes it again
/// delivers it twice (a retry takes a new sequence number). The error must say so, as a batch's does,
/// and the publish is counted in `publish_uncertain`; before, the error only said that Redis did not
/// answer in time, and nothing was counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_pubsub_publish_that_times_out_says_it_may_be_delivered() {
    single_publish_times_out(
        DeliveryMode::PubSub,
        ["may have been published", "may deliver it twice"],
    )
    .await;
}

/// The same for a Streams publish (`XADD` without idempotent publishing): its answer comes after the
/// command timeout, yet Redis stored it, and the group receives it; a caller that publishes it again
/// stores it twice. Before, the error only said that Redis did not answer in time, and nothing was
/// counted, while a batch's `XADD` said "may have been stored".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_stream_publish_that_times_out_says_it_may_be_stored() {
    single_publish_times_out(
        DeliveryMode::Streams,
        ["may have been stored", "store it twice"],
    )
    .await;
}

/// A publish in `mode` whose answer comes after the command timeout (the connection carries, slowly:
/// Redis runs it): its subscriber receives it, its error says each of `says`, and it counts once in
/// `publish_uncertain` and in `publish_errors`.
async fn single_publish_times_out(mode: DeliveryMode, says: [&str; 2]) {
    let Some((proxy, proxied)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let publisher = connect_through_proxy(
        RedisRouter::builder(proxied)
            .mode(mode)
            .prefix(&prefix)
            .command_timeout(Duration::from_millis(500)),
    )
    .await;
    // In Streams mode the first publish registers the stream; the next ones are a single XADD each.
    let (subscriber, mut subscription, channel) = flowing(&publisher, mode, &prefix, "Slow").await;
    proxy.set_latency(Duration::from_secs(2));
    let error = within(
        Duration::from_secs(10),
        "the publish to time out",
        publisher.publish(message(&channel, 1)),
    )
    .await
    .expect_err("its answer comes after the command timeout")
    .to_string();
    // What makes the wording matter: it was published (stored) all the same.
    let delivery = next(&mut subscription).await;
    assert_eq!(number(delivery.envelope()), 1);
    delivery.ack().await.unwrap();
    proxy.set_latency(Duration::ZERO);
    assert!(
        says.iter().all(|said| error.contains(said)),
        "the error says the message may have gone, and what a retry does ({says:?}): {error}"
    );
    let health = publisher.health().await;
    assert_eq!(health.get("publish_uncertain"), 1, "{health:?}");
    assert_eq!(health.get("publish_errors"), 1, "{health:?}");
    subscriber.close().await.unwrap();
    publisher.close().await.unwrap();
}

/// A publish handed to fred while its connection is down waits behind the reconnection; when fred runs
/// out of reconnection attempts (`max_reconnect_attempts`), it drops the commands it never wrote, and the
/// publish fails with fred's `Canceled`: it was certainly not published. Its error must not say that it
/// may have been published (a caller who believes it does not publish it again, and the message is
/// lost), nor count it in `publish_uncertain`, as it did since a single publish's `Canceled` was taken
/// for a cut connection like a timeout's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_fred_dropped_unwritten_does_not_say_it_may_have_been_published() {
    dropped_unwritten(false).await;
}

/// The same for a `publish_batch`: fred drops its pipeline unwritten, and answers `Canceled`. Its
/// messages were not published, yet each error said they may have been, and each counted in
/// `publish_uncertain`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_fred_dropped_unwritten_does_not_say_it_may_have_been_published() {
    dropped_unwritten(true).await;
}

/// A pub/sub publisher at `url` that gives up reconnecting after two attempts 2.5 s apart, well
/// within its command timeout (30 s): fred gives up before a publish waiting for it times out.
async fn giving_up_publisher(url: &str, prefix: &str) -> RedisRouter {
    connected(
        RedisRouter::builder(url)
            .mode(DeliveryMode::PubSub)
            .prefix(prefix)
            .reconnect(agentcomm_core::backoff::Backoff::new(
                Duration::from_millis(2500),
                Duration::from_millis(2500),
            ))
            .max_reconnect_attempts(Some(2))
            .command_timeout(Duration::from_secs(30)),
    )
    .await
}

/// A publish (`batch`: a `publish_batch` of two) handed to fred behind a reconnection fred gives up.
async fn dropped_unwritten(batch: bool) {
    let Some((proxy, url)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let publisher = giving_up_publisher(&url, &prefix).await;
    let channel = parse_channel("Gone:event:s1").unwrap();
    publisher.publish(message(&channel, 0)).await.unwrap();
    proxy.reject_for(Duration::from_secs(600));
    proxy.cut_all();
    // The publisher saw its connection go: a publish now waits behind the reconnection.
    eventually(
        Duration::from_secs(10),
        "the publisher to see its connection go",
        async || !publisher.health().await.connected,
    )
    .await;
    let results = within(Duration::from_secs(20), "fred to give up", async {
        if batch {
            publisher
                .publish_batch(vec![message(&channel, 1), message(&channel, 2)])
                .await
        } else {
            vec![publisher.publish(message(&channel, 1)).await]
        }
    })
    .await;
    for result in &results {
        let error = result
            .as_ref()
            .expect_err("Redis is out of reach")
            .to_string();
        assert!(
            !error.contains("may have been published"),
            "fred never wrote it: {error}"
        );
    }
    let health = publisher.health().await;
    assert_eq!(health.get("publish_uncertain"), 0, "{health:?}");
    assert_eq!(
        health.get("publish_errors"),
        results.len() as u64,
        "{health:?}"
    );
    proxy.reject_for(Duration::ZERO);
    publisher.close().await.unwrap();
}

/// A publish fred wrote before its connection was cut, whose answer the cut lost: Redis ran it (its
/// subscribers receive it). fred keeps such a command to write again after the reconnection; when it
/// runs out of reconnection attempts it drops it, and the caller gets fred's "channel closed", not a
/// `Canceled` (that is only for commands never written). Its error must say that it may have been
/// published, and count in `publish_uncertain`, as a timeout's does: it said only that the publish
/// failed, and a caller that published it again delivered it twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_written_publish_fred_dropped_when_giving_up_says_it_may_have_been_published() {
    let Some((proxy, url)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let publisher = giving_up_publisher(&url, &prefix).await;
    let (subscriber, mut subscription, channel) =
        flowing(&publisher, DeliveryMode::PubSub, &prefix, "Ran").await;
    // The PUBLISH reaches Redis after 2 s, and its answer would come 2 s later: the connection is cut
    // as soon as the subscriber has the message, and reconnections are refused.
    proxy.set_latency(Duration::from_secs(2));
    let (result, ()) = tokio::join!(
        within(
            Duration::from_secs(25),
            "fred to give up",
            publisher.publish(message(&channel, 1)),
        ),
        async {
            let delivery = next(&mut subscription).await;
            proxy.reject_for(Duration::from_secs(600));
            proxy.cut_all();
            assert_eq!(number(delivery.envelope()), 1, "Redis ran the publish");
            delivery.ack().await.unwrap();
        }
    );
    let error = result
        .expect_err("its answer was lost, and Redis is out of reach")
        .to_string();
    assert!(
        error.contains("may have been published") && error.contains("may deliver it twice"),
        "Redis ran it: {error}"
    );
    let health = publisher.health().await;
    assert_eq!(health.get("publish_uncertain"), 1, "{health:?}");
    assert_eq!(health.get("publish_errors"), 1, "{health:?}");
    proxy.set_latency(Duration::ZERO);
    proxy.reject_for(Duration::ZERO);
    subscriber.close().await.unwrap();
    publisher.close().await.unwrap();
}

/// `reclaim_rounds` counts the rounds that looked at every stream: none while Redis is unreachable
/// (each round fails), and again once it is back. Before, a round in which every stream failed was
/// counted too, so the counter could not tell an operator (or a test waiting on it) that reclaiming
/// was not happening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaim_rounds_that_fail_are_not_counted() {
    let Some((proxy, proxied)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let consumer = connect_through_proxy(
        RedisRouter::builder(proxied)
            .prefix(&prefix)
            .command_timeout(Duration::from_millis(300))
            .claim_idle(Duration::from_millis(200))
            .read_block(Duration::from_millis(500)),
    )
    .await;
    let channel = parse_channel("Rounds:event:s1").unwrap();
    let mut subscription = consumer
        .subscribe(SubscribeOptions::new(ChannelPattern::parse("Rounds:*:*").unwrap()).group("g"))
        .await
        .unwrap();
    // A stream to look at.
    consumer.publish(message(&channel, 1)).await.unwrap();
    next(&mut subscription).await.ack().await.unwrap();
    let rounds = async || consumer.health().await.get("reclaim_rounds");
    let start = rounds().await;
    eventually(
        Duration::from_secs(10),
        "the group subscription to make reclaim rounds",
        async || rounds().await >= start + 2,
    )
    .await;
    proxy.reject_for(Duration::from_secs(30));
    proxy.cut_all();
    // Read once cut off: a round under way fails.
    let before = rounds().await;
    // A window of several rounds (one every 100 ms; each fails after the 300 ms command timeout).
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let during = rounds().await;
    proxy.reject_for(Duration::ZERO);
    assert_eq!(
        during, before,
        "no reclaim round is counted while Redis is unreachable"
    );
    eventually(
        Duration::from_secs(10),
        "reclaim rounds to be counted again once Redis is back",
        async || rounds().await >= during + 2,
    )
    .await;
    drop(subscription);
    consumer.close().await.unwrap();
}

/// A `connect` given up part way (a timeout around it, a `select!`) leaves no connection open: fred
/// runs each pool connection on a task of its own from the start, and those used to stay open for
/// nobody, for as long as the process lived, when the connect future was dropped after starting them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_given_up_part_way_leaves_no_connection_behind() {
    let Some((proxy, proxied)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let mut kept = Vec::new();
    // Given up at different points: from before anything is sent to after it is done.
    for round in 0..30u64 {
        let connecting = RedisRouter::builder(proxied.clone())
            .prefix(&prefix)
            .pool_size(2)
            .connect();
        if let Ok(router) = tokio::time::timeout(Duration::from_millis(round), connecting).await {
            kept.push(router.unwrap());
        }
    }
    for router in kept {
        router.close().await.unwrap();
    }
    eventually(
        Duration::from_secs(10),
        "no connection to stay open once every connect is given up or closed",
        async || proxy.stats().live == 0,
    )
    .await;
}

/// With `max_reconnect_attempts(Some(n))`, a router whose connections ran out of attempts says so: its
/// pub/sub subscriptions end, health is `Unhealthy` and names the setting, and a publish fails at once
/// with the fix. Before, fred's connection tasks ended for good while every subscription waited
/// forever, health said "reconnecting with backoff", and each publish waited out the command timeout
/// (fred keeps the commands of a client whose task ended) before failing with `Timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_that_gave_up_reconnecting_says_so_and_ends_its_subscriptions() {
    gave_up_reconnecting(DeliveryMode::PubSub).await;
}

/// The same in Streams mode: the subscriptions end (their entries stay pending in Redis for the
/// group's other members). Before, they waited for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streams_router_that_gave_up_reconnecting_ends_its_subscriptions() {
    gave_up_reconnecting(DeliveryMode::Streams).await;
}

/// A router in `mode` that gives up after `attempts` reconnection attempts in a row, 20-50 ms apart
/// (stream reads block 500 ms at most, so a reader notices an ended connection soon).
async fn bounded_policy_router(
    url: &str,
    prefix: &str,
    mode: DeliveryMode,
    attempts: u32,
) -> RedisRouter {
    connected(
        RedisRouter::builder(url)
            .mode(mode)
            .read_block(Duration::from_millis(500))
            .prefix(prefix)
            .reconnect(agentcomm_core::backoff::Backoff::new(
                Duration::from_millis(20),
                Duration::from_millis(50),
            ))
            .max_reconnect_attempts(Some(attempts))
            .command_timeout(Duration::from_secs(10)),
    )
    .await
}

async fn gave_up_reconnecting(mode: DeliveryMode) {
    let Some((proxy, url)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = bounded_policy_router(&url, &prefix, mode, 2).await;
    let channel = parse_channel("Ping:event:s1").unwrap();
    let mut subscription = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Ping:event:s1").unwrap(),
        ))
        .await
        .unwrap();
    // Redis stays out of reach for longer than the two attempts take.
    proxy.reject_for(Duration::from_secs(600));
    proxy.cut_all();
    let end = within(
        Duration::from_secs(5),
        "the subscription to end",
        subscription.next(),
    )
    .await;
    assert!(end.is_none(), "nothing was published");
    drop(subscription);
    // Every connection (the pool's two and the subscriber) runs out of attempts at its own time. The
    // ended subscription, dropped, is no longer counted.
    eventually(Duration::from_secs(10), "health to say why", async || {
        let health = router.health().await;
        health.status == agentcomm_core::router::HealthStatus::Unhealthy
            && health.detail.contains("max_reconnect_attempts")
            && health.get("subscriptions") == 0
    })
    .await;
    let started = std::time::Instant::now();
    let error = router
        .publish(message(&channel, 1))
        .await
        .expect_err("nothing can be published");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the publish failed after {:?}",
        started.elapsed()
    );
    assert!(
        error.to_string().contains("max_reconnect_attempts"),
        "{error}"
    );
    proxy.reject_for(Duration::ZERO);
    router.close().await.unwrap();
}

/// When Redis goes out of reach, every pool connection gives up together, for the same cause: the
/// router says so on one ERROR line, naming how many connections the pool has. Before, each pool
/// connection wrote its own line.
#[test]
fn a_pool_that_gives_up_together_says_so_once() {
    let (ran, lines) = agentcomm_testkit::logs::capture(async {
        let Some((proxy, url)) = redis_proxy().await else {
            return false;
        };
        let prefix = unique_prefix();
        let router = connected(
            RedisRouter::builder(&url)
                .mode(DeliveryMode::PubSub)
                .prefix(&prefix)
                .pool_size(4)
                .max_reconnect_attempts(Some(0)),
        )
        .await;
        proxy.reject_for(Duration::from_secs(600));
        proxy.cut_all();
        // Each of the four connections sees the cut and, never reconnecting, gives up at once. The
        // router must have given up before it is closed: a give-up after the close writes nothing.
        eventually(
            Duration::from_secs(10),
            "every pool connection to see the cut, and the router to give up",
            async || {
                let health = router.health().await;
                health.get("connection_errors") >= 4
                    && health.detail.contains("max_reconnect_attempts")
            },
        )
        .await;
        router.close().await.unwrap();
        proxy.reject_for(Duration::ZERO);
        true
    });
    if !ran {
        return;
    }
    let gave_up = lines
        .lines()
        .filter(|line| line.contains("a pool connection gave up reconnecting"))
        .collect::<Vec<_>>();
    assert_eq!(gave_up.len(), 1, "one line for the pool:\n{lines}");
    assert!(
        gave_up[0].contains(r#""pool_connections":4"#),
        "{}",
        gave_up[0]
    );
}

/// A bounded policy (`max_reconnect_attempts(Some(n))`) whose connections come back within their
/// attempts is not taken for a give-up: attempts that fail while Redis is out of reach, and the
/// reconnection under way, end nothing. After each of three outages the subscription receives
/// again, and health never names the setting. (fred counts the attempts in a row and starts again
/// from zero after each reconnection; only its connection task ending is taken for a give-up.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_policy_that_reconnects_in_time_keeps_its_subscriptions() {
    let Some((proxy, url)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = bounded_policy_router(&url, &prefix, DeliveryMode::PubSub, 50).await;
    let channel = parse_channel("Ping:event:s1").unwrap();
    let mut subscription = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Ping:event:s1").unwrap(),
        ))
        .await
        .unwrap();
    for outage in 1..=3u64 {
        // Several attempts fail while the proxy is not listening (each 20-50 ms apart).
        proxy.reject_for(Duration::from_millis(300));
        proxy.cut_all();
        let resumed = async {
            loop {
                let _ = router.publish(message(&channel, outage as usize)).await;
                let next = tokio::time::timeout(Duration::from_millis(200), subscription.next());
                match next.await {
                    Ok(Some(delivery)) => {
                        let _ = delivery.ack().await;
                        return;
                    }
                    Ok(None) => panic!("the subscription ended after outage {outage}"),
                    Err(_) => {}
                }
            }
        };
        within(
            Duration::from_secs(15),
            "the subscription to receive again",
            resumed,
        )
        .await;
        let health = router.health().await;
        assert!(
            !health.detail.contains("max_reconnect_attempts"),
            "outage {outage}: {health:?}"
        );
        assert!(
            health.get("reconnects") >= outage && health.get("connection_errors") > 0,
            "outage {outage}: {health:?}"
        );
    }
    router.close().await.unwrap();
}

/// Closing a pub/sub subscription while the subscriber is cut off from Redis returns at once, and the
/// router's other subscriptions come back with the connection. Before, the close waited for its
/// `UNSUBSCRIBE`, which fred holds until the connection is back or the command timeout (30 s by
/// default) runs out: stopping an agent during an outage took that long, and held up the restore of
/// the other subscriptions meanwhile. A connection that is gone holds no subscription to take back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_pubsub_subscription_while_cut_off_returns_at_once() {
    let Some((proxy, proxied)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect_through_proxy(
        RedisRouter::builder(proxied)
            .mode(DeliveryMode::PubSub)
            .prefix(&prefix)
            .command_timeout(Duration::from_secs(10))
            .reconnect(agentcomm_core::backoff::Backoff::new(
                Duration::from_millis(20),
                Duration::from_millis(50),
            )),
    )
    .await;
    let mut kept = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Kept:event:s1").unwrap(),
        ))
        .await
        .unwrap();
    let closed = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Closed:*:*").unwrap(),
        ))
        .await
        .unwrap();
    proxy.reject_for(Duration::from_secs(30));
    proxy.cut_all();
    eventually(
        Duration::from_secs(5),
        "the router sees the cut",
        async || !router.health().await.connected,
    )
    .await;
    let started = std::time::Instant::now();
    within(Duration::from_secs(20), "closing", closed.close())
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "closing a subscription while cut off took {:?}",
        started.elapsed()
    );
    proxy.reject_for(Duration::ZERO);
    eventually(
        Duration::from_secs(10),
        "the router is back, its subscriptions restored",
        async || {
            let health = router.health().await;
            health.connected && !health.detail.contains("restoring")
        },
    )
    .await;
    router
        .publish(Envelope::new(
            parse_channel("Kept:event:s1").unwrap(),
            "application/json",
            b"{}".to_vec(),
        ))
        .await
        .unwrap();
    within(
        Duration::from_secs(10),
        "the kept subscription's message",
        kept.next(),
    )
    .await
    .expect("the kept subscription still runs");
    router.close().await.unwrap();
}

/// A large pub/sub batch published while Redis is unreachable fails in about one command timeout, not
/// one per chunk of it: once a chunk failed on the timeout, the rest is not sent, and its error says
/// so (publishing it again is safe). The chunk that was sent keeps its "may have been published"
/// error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_pubsub_batch_during_an_outage_fails_in_one_command_timeout() {
    let Some((proxy, proxied)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let publisher = connect_through_proxy(
        RedisRouter::builder(proxied)
            .mode(DeliveryMode::PubSub)
            .prefix(&prefix)
            .command_timeout(Duration::from_millis(500)),
    )
    .await;
    let channel = parse_channel("Outage:event:s1").unwrap();
    publisher.publish(message(&channel, 0)).await.unwrap();
    proxy.reject_for(Duration::from_secs(30));
    proxy.cut_all();
    // Ten chunks of 256.
    let batch = (1..=2_560).map(|n| message(&channel, n)).collect();
    let started = std::time::Instant::now();
    let results = within(
        Duration::from_secs(20),
        "the batch to fail",
        publisher.publish_batch(batch),
    )
    .await;
    let took = started.elapsed();
    proxy.reject_for(Duration::ZERO);
    assert!(
        took < Duration::from_millis(2_500),
        "the batch took {took:?}"
    );
    assert_eq!(results.len(), 2_560);
    let errors: Vec<String> = results
        .into_iter()
        .map(|result| result.expect_err("Redis is unreachable").to_string())
        .collect();
    assert!(
        errors[0].contains("may have been published"),
        "{}",
        errors[0]
    );
    let last = errors.last().unwrap();
    assert!(last.contains("the rest was not sent"), "{last}");
    publisher.close().await.unwrap();
}

/// A pub/sub subscriber connection that Redis never answers (the first `subscribe` after the network
/// started dropping packets) fails that `subscribe` within about `connect_timeout`, with a connection
/// error naming that setting. Before, it failed after 1 s saying "timed out after 30s" (the command
/// timeout, which plays no part there): a user tuning `command_timeout` changed nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_connection_nobody_answers_names_connect_timeout() {
    let Some((proxy, url)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect_through_proxy(
        RedisRouter::builder(url)
            .mode(DeliveryMode::PubSub)
            .prefix(&prefix)
            .connect_timeout(Duration::from_millis(500))
            .close_timeout(Duration::from_secs(1)),
    )
    .await;
    proxy.blackhole(true);
    let started = std::time::Instant::now();
    let error = within(
        Duration::from_secs(10),
        "the subscribe to fail",
        router.subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Hole:*:*").unwrap(),
        )),
    )
    .await
    .expect_err("the subscriber connection gets no answer");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(error, agentcomm_core::Error::Connection { .. }),
        "{error:?}"
    );
    assert!(
        error.to_string().contains(
            "connecting the pub/sub subscriber got no answer within connect_timeout (500ms)"
        ),
        "{error}"
    );
    proxy.blackhole(false);
    proxy.cut_all();
    router.close().await.unwrap();
}

/// A subscriber of `class`'s channels, connected directly (in Streams mode with group "g"), and
/// `publisher`'s first message on `<class>:event:s1` published and received: the flow works before a
/// test breaks it.
async fn flowing(
    publisher: &RedisRouter,
    mode: DeliveryMode,
    prefix: &str,
    class: &str,
) -> (
    RedisRouter,
    agentcomm_core::router::Subscription,
    agentcomm_core::channel::Channel,
) {
    let subscriber = connected(builder(mode, prefix)).await;
    let pattern = ChannelPattern::parse(&format!("{class}:*:*")).unwrap();
    let options = match mode {
        DeliveryMode::Streams => SubscribeOptions::new(pattern).group("g"),
        _ => SubscribeOptions::new(pattern),
    };
    let mut subscription = subscriber.subscribe(options).await.unwrap();
    let channel = parse_channel(&format!("{class}:event:s1")).unwrap();
    publisher.publish(message(&channel, 0)).await.unwrap();
    let first = next(&mut subscription).await;
    assert_eq!(number(first.envelope()), 0);
    first.ack().await.unwrap();
    (subscriber, subscription, channel)
}
