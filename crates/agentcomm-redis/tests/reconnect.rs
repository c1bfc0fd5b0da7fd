//! Connections cut while messages flow, with the testkit's fault proxy between client and Redis.
//!
//! The sizes scale with AGENTCOMM_SOAK (10,000 messages and 5 cuts at factor 1).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentcomm_core::envelope::Envelope;
use agentcomm_core::prelude::*;
use agentcomm_core::router::SubscribeOptions;
use agentcomm_redis::{DeliveryMode, RedisRouter};
use agentcomm_testkit::proxy::FaultProxy;
use common::*;
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

/// Starts a proxy to the Redis of REDIS_URL, or says why the test cannot run.
async fn proxy() -> Option<(FaultProxy, String)> {
    if !redis_available().await {
        return None;
    }
    let url = redis_url();
    let Some(target) = loopback_target(&url) else {
        println!(
            "skipped: REDIS_URL is not a loopback redis:// URL, and the fault proxy only targets loopback"
        );
        return None;
    };
    let proxy = FaultProxy::start(target.as_str())
        .await
        .expect("start the fault proxy");
    let proxied = through(&url, proxy.local_addr());
    Some((proxy, proxied))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_lose_nothing_and_duplicate_nothing_across_cuts() {
    let Some((proxy, proxied)) = proxy().await else {
        return;
    };
    let total = 10_000 * soak();
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let consumer: RedisRouter = within(
        Duration::from_secs(10),
        "connecting through the proxy",
        RedisRouter::builder(proxied.clone())
            .prefix(&prefix)
            .read_block(Duration::from_millis(500))
            .claim_idle(Duration::from_secs(5))
            .connect(),
    )
    .await
    .unwrap();
    let publisher: RedisRouter = within(
        Duration::from_secs(10),
        "connecting through the proxy",
        RedisRouter::builder(proxied).prefix(&prefix).connect(),
    )
    .await
    .unwrap();
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
    // Anything still to come would be a duplicate: give it a moment to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
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
    let Some((proxy, proxied)) = proxy().await else {
        return;
    };
    let total = 10_000 * soak();
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    // The subscriber goes through the proxy; the publisher does not, so it goes on publishing while
    // the subscriber reconnects, and those messages are lost to it.
    let subscriber = within(
        Duration::from_secs(10),
        "connecting through the proxy",
        RedisRouter::builder(proxied)
            .mode(DeliveryMode::PubSub)
            .prefix(&prefix)
            .reorder_window(Duration::from_millis(200))
            .connect(),
    )
    .await
    .unwrap();
    let publisher = within(
        Duration::from_secs(10),
        "connecting",
        builder(DeliveryMode::PubSub, &prefix).connect(),
    )
    .await
    .unwrap();
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
    assert_eq!(
        received + health.get("lost") + health.get("lagged") + health.get("dropped"),
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
