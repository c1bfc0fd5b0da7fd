//! `redis-sentinel://` against a real Sentinel: the test starts a Redis and a Sentinel monitoring it, on
//! loopback, and the router finds the primary through the Sentinel. The shared Redis is not touched.
//!
//! Needs the `redis-server` and `redis-cli` binaries; without them the test prints one `skipped:` line
//! and passes, unless AGENTCOMM_REQUIRE_BROKERS=1.

mod common;

use std::time::Duration;

use agentcomm_core::envelope::Envelope;
use agentcomm_core::prelude::*;
use agentcomm_core::router::SubscribeOptions;
use agentcomm_redis::{DeliveryMode, RedisRouter};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_url_finds_the_primary_and_carries_messages_in_both_modes() {
    if let Some(reason) = servers::missing_tools() {
        servers::skip(&reason);
        return;
    }
    let servers = servers::start_sentinel();
    let url = servers.url();
    for mode in [DeliveryMode::PubSub, DeliveryMode::Streams] {
        let router = connected(
            RedisRouter::builder(&url)
                .mode(mode)
                .prefix(unique_prefix())
                .read_block(Duration::from_millis(500)),
        )
        .await;
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
        .unwrap_or_else(|e| panic!("{mode:?}: subscribe through the Sentinel: {e}"));
        let sent = Envelope::new(
            parse_channel("Payment:request:s1").unwrap(),
            "application/json",
            br#"{"amount":7}"#.to_vec(),
        );
        within(
            Duration::from_secs(10),
            "publishing",
            router.publish(sent.clone()),
        )
        .await
        .unwrap_or_else(|e| panic!("{mode:?}: publish through the Sentinel: {e}"));
        let delivery = next(&mut subscription).await;
        assert_eq!(delivery.envelope().id(), sent.id(), "{mode:?}");
        within(Duration::from_secs(10), "acking", delivery.ack())
            .await
            .unwrap();
        within(Duration::from_secs(10), "closing", router.close())
            .await
            .unwrap();
    }
    // The messages went to the primary the Sentinel named.
    let args = ["-p", &servers.primary.port.to_string(), "dbsize"].map(String::from);
    let keys = servers::redis_cli(&args, Duration::from_secs(5)).expect("redis-cli dbsize");
    let stored: u64 = String::from_utf8_lossy(&keys.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(
        stored > 0,
        "the Streams mode's keys are on the primary (DBSIZE {stored})"
    );
}
