//! `redis-sentinel://` against a real Sentinel: the test starts a Redis and a Sentinel monitoring it, on
//! loopback, and the router finds the primary through the Sentinel. The shared Redis is not touched.
//!
//! Needs the `redis-server` and `redis-cli` binaries; without them the test prints one `skipped:` line
//! and passes, unless AGENTCOMM_REQUIRE_BROKERS=1.

use std::time::Duration;

use crate::common::*;
use agentcomm_redis::RedisRouter;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_url_finds_the_primary_and_carries_messages_in_both_modes() {
    if let Some(reason) = servers::missing_tools() {
        servers::skip(&reason);
        return;
    }
    let servers = servers::start_sentinel();
    let url = servers.url();
    round_trip_in_both_modes("through the Sentinel", || {
        RedisRouter::builder(&url).read_block(Duration::from_millis(500))
    })
    .await;
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
