//! Helpers shared by the Redis integration tests.
#![allow(dead_code)]

pub mod servers;

use std::future::Future;
use std::time::Duration;

use agentcomm_core::config::{DEFAULT_REDIS_URL, REDIS_URL_VAR};
use agentcomm_core::router::{Delivery, Subscription};
use agentcomm_redis::{DeliveryMode, RedisRouter, RedisRouterBuilder};

/// `REDIS_URL`, or the default.
pub fn redis_url() -> String {
    std::env::var(REDIS_URL_VAR)
        .ok()
        .filter(|url| !url.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_REDIS_URL.to_string())
}

/// A prefix no other test uses.
pub fn unique_prefix() -> String {
    format!("agentcomm-test-{}", uuid::Uuid::now_v7().simple())
}

/// Whether Redis answers; prints the one `skipped:` line (or fails with AGENTCOMM_REQUIRE_BROKERS=1)
/// when it does not.
pub async fn redis_available() -> bool {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let url = redis_url();
    let probe = RedisRouter::builder(&url)
        .connect_timeout(Duration::from_secs(2))
        .prefix(unique_prefix())
        .connect();
    match tokio::time::timeout(Duration::from_secs(5), probe).await {
        Ok(Ok(router)) => {
            let _ = agentcomm_core::Router::close(&router).await;
            true
        }
        _ => {
            servers::skip(&format!(
                "no Redis at {}",
                agentcomm_core::error::redact_url(&url)
            ));
            false
        }
    }
}

/// A builder on `REDIS_URL` with quick test settings.
pub fn builder(mode: DeliveryMode, prefix: &str) -> RedisRouterBuilder {
    RedisRouter::builder(redis_url())
        .mode(mode)
        .prefix(prefix)
        .read_block(Duration::from_millis(500))
        .discovery_interval(Duration::from_millis(100))
        .reorder_window(Duration::from_millis(200))
}

/// Connects `builder`, failing the test when that takes more than 10 s.
pub async fn connected(builder: RedisRouterBuilder) -> RedisRouter {
    within(Duration::from_secs(10), "connecting", builder.connect())
        .await
        .expect("connect")
}

/// Bounds a future: panics with `what` when it takes longer than `limit`.
pub async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// The next delivery within 10 s.
pub async fn next(subscription: &mut Subscription) -> Delivery {
    within(Duration::from_secs(10), "a delivery", subscription.next())
        .await
        .expect("the subscription ended early")
}

/// Asserts that nothing arrives within `quiet`.
pub async fn assert_quiet(subscription: &mut Subscription, quiet: Duration) {
    if let Ok(Some(delivery)) = tokio::time::timeout(quiet, subscription.next()).await {
        panic!("expected nothing, got {:?}", delivery.envelope());
    }
}

/// Reads `subscription`, acknowledging each delivery, until `total` different messages came or nothing
/// more came for two seconds (what was discarded never comes): how many times each message (by
/// `number`) was delivered.
pub async fn arrivals(
    subscription: &mut Subscription,
    total: usize,
    number: impl Fn(&Delivery) -> u32,
) -> std::collections::HashMap<u32, u32> {
    let mut seen = std::collections::HashMap::new();
    while seen.len() < total {
        match tokio::time::timeout(Duration::from_secs(2), subscription.next()).await {
            Ok(Some(delivery)) => {
                *seen.entry(number(&delivery)).or_default() += 1;
                delivery.ack().await.unwrap();
            }
            Ok(None) => panic!("the subscription ended early"),
            Err(_) => break,
        }
    }
    seen
}

/// Waits until `condition` holds, checking every 20 ms, up to `limit`.
pub async fn eventually(limit: Duration, what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if condition().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `host:port` of a Redis URL, when it is on loopback (the fault proxy only targets loopback).
pub fn loopback_target(url: &str) -> Option<String> {
    agentcomm_testkit::proxy::loopback_address(url, 6379).map(|address| address.to_string())
}

/// `url` with its host and port replaced by `address` (credentials and database kept).
pub fn through(url: &str, address: std::net::SocketAddr) -> String {
    agentcomm_testkit::proxy::url_through(url, address)
}

/// A fault proxy in front of the Redis of REDIS_URL and the URL through it; `None` (after the one
/// `skipped:` line) when there is no Redis, or REDIS_URL is not on loopback (the only proxy target).
pub async fn redis_proxy() -> Option<(agentcomm_testkit::proxy::FaultProxy, String)> {
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
    let proxy = agentcomm_testkit::proxy::FaultProxy::start(target.as_str())
        .await
        .expect("start the fault proxy");
    let proxied = through(&url, proxy.local_addr());
    Some((proxy, proxied))
}

/// A plain fred client on REDIS_URL, not through any proxy: it sees what Redis really holds.
pub async fn raw_client() -> fred::prelude::Client {
    raw_client_at(&redis_url()).await
}

/// A plain fred client on `url` (a cluster's `redis-cluster://` too), connected within 10 s.
pub async fn raw_client_at(url: &str) -> fred::prelude::Client {
    use fred::prelude::ClientLike;
    let client = fred::prelude::Builder::from_config(fred::prelude::Config::from_url(url).unwrap())
        .build()
        .unwrap();
    within(Duration::from_secs(10), "a raw connection", client.init())
        .await
        .unwrap();
    client
}

/// Deletes every key under `prefix` (tests share one Redis with other people's tests).
pub async fn remove_keys(prefix: &str) {
    use fred::prelude::{ClientLike, KeysInterface};
    use fred::types::scan::Scanner;
    use futures::TryStreamExt;
    let Ok(config) = fred::prelude::Config::from_url(&redis_url()) else {
        return;
    };
    let Ok(client) = fred::prelude::Builder::from_config(config).build() else {
        return;
    };
    if !matches!(
        tokio::time::timeout(Duration::from_secs(3), client.init()).await,
        Ok(Ok(_))
    ) {
        return;
    }
    let pattern = format!("{}:*", prefix.replace(['*', '?', '[', ']'], "?"));
    let mut pages = client.scan(pattern, Some(500), None);
    let mut keys: Vec<fred::types::Key> = Vec::new();
    while let Ok(Some(mut page)) = pages.try_next().await {
        if let Some(found) = page.take_results() {
            keys.extend(found);
        }
    }
    for chunk in keys.chunks(200) {
        let _: Result<i64, _> = client.del(chunk.to_vec()).await;
    }
    let _ = client.quit().await;
}

/// Removes the keys under `prefix` when dropped, from a thread of its own (drop cannot wait).
pub struct RemoveKeysOnDrop(pub String);

impl Drop for RemoveKeysOnDrop {
    fn drop(&mut self) {
        let prefix = std::mem::take(&mut self.0);
        let _ = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                runtime.block_on(remove_keys(&prefix));
            }
        })
        .join();
    }
}

/// In each delivery mode, a router from `builder()` subscribes to `Payment:*:*` (a group in Streams
/// mode), publishes one message to itself and gets it back whole, acks it, is healthy, and closes;
/// `how` names the connection in failures ("over TLS", ...).
pub async fn round_trip_in_both_modes(how: &str, builder: impl Fn() -> RedisRouterBuilder) {
    use agentcomm_core::envelope::Envelope;
    use agentcomm_core::prelude::*;
    use agentcomm_core::router::{PublishOutcome, SubscribeOptions};
    for mode in [DeliveryMode::PubSub, DeliveryMode::Streams] {
        let router = connected(builder().mode(mode).prefix(unique_prefix())).await;
        let pattern = ChannelPattern::parse("Payment:*:*").unwrap();
        let options = match mode {
            DeliveryMode::Streams => SubscribeOptions::new(pattern).group("payments"),
            _ => SubscribeOptions::new(pattern),
        };
        let mut subscription = within(
            Duration::from_secs(10),
            "subscribing",
            router.subscribe(options),
        )
        .await
        .unwrap_or_else(|e| panic!("{mode:?}: subscribe {how}: {e}"));
        let sent = Envelope::new(
            parse_channel("Payment:request:s1").unwrap(),
            "application/json",
            br#"{"amount":12.5}"#.to_vec(),
        );
        let outcome = within(
            Duration::from_secs(10),
            "publishing",
            router.publish(sent.clone()),
        )
        .await
        .unwrap_or_else(|e| panic!("{mode:?}: publish {how}: {e}"));
        // pub/sub counts the subscribers that got it; a stream stores it.
        assert!(
            matches!(
                (mode, outcome),
                (DeliveryMode::PubSub, PublishOutcome::Delivered(1))
                    | (DeliveryMode::Streams, PublishOutcome::Accepted)
            ),
            "{mode:?} {how}: {outcome:?}"
        );
        let delivery = next(&mut subscription).await;
        assert_eq!(delivery.envelope().id(), sent.id(), "{mode:?} {how}");
        assert_eq!(
            delivery.envelope().payload(),
            sent.payload(),
            "{mode:?} {how}"
        );
        within(Duration::from_secs(10), "acking", delivery.ack())
            .await
            .unwrap();
        let health = within(Duration::from_secs(10), "health", router.health()).await;
        assert!(health.connected, "{mode:?} {how}: {health:?}");
        within(Duration::from_secs(10), "closing", router.close())
            .await
            .unwrap();
    }
}
