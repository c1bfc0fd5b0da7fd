//! What the crate's unit tests that need a real Redis share: where it is, and the skip-or-fail rule
//! every broker test follows (a failure under `AGENTCOMM_REQUIRE_BROKERS=1`, else one skip line).

use std::time::Duration;

use crate::connection::redact;
use crate::{RedisRouter, RedisRouterBuilder};

/// `REDIS_URL`, or the local Redis.
pub(crate) fn url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A key prefix of the test's own.
pub(crate) fn prefix() -> String {
    format!("agentcomm-unit-{}", uuid::Uuid::now_v7().simple())
}

/// Redis at `shown` could not be reached (`why`): panics under `AGENTCOMM_REQUIRE_BROKERS=1`, else
/// prints the skip line; the caller then returns.
pub(crate) fn unreachable(shown: &str, why: impl std::fmt::Display) {
    // The testkit's rule, so that `true` and `yes` mean what they mean to every other broker test.
    if agentcomm_testkit::require_brokers() {
        panic!(
            "AGENTCOMM_REQUIRE_BROKERS=1, but there is no Redis at {}: {why}",
            redact(shown)
        );
    }
    println!("skipped: no Redis at {}", redact(shown));
}

/// Connects `builder` (for Redis at `url`) within 5 s; `None`, after [`unreachable`], when that fails.
pub(crate) async fn connect(builder: RedisRouterBuilder, url: &str) -> Option<RedisRouter> {
    match tokio::time::timeout(Duration::from_secs(5), builder.connect()).await {
        Ok(Ok(router)) => Some(router),
        Ok(Err(error)) => {
            unreachable(url, error);
            None
        }
        Err(_) => {
            unreachable(url, "connecting took more than 5 s");
            None
        }
    }
}

/// A fault proxy in front of the Redis at `url`, when it is on loopback (the proxy only forwards to
/// loopback), and `url` pointed through it (credentials and database kept); `None`, after a skip line,
/// otherwise.
pub(crate) async fn loopback_proxy(
    url: &str,
) -> Option<(agentcomm_testkit::proxy::FaultProxy, String)> {
    use agentcomm_testkit::proxy::{FaultProxy, loopback_address, url_through};
    let Some(target) = loopback_address(url, 6379) else {
        println!(
            "skipped: REDIS_URL is not on loopback, and the fault proxy only targets loopback"
        );
        return None;
    };
    let proxy = FaultProxy::start(target)
        .await
        .expect("start the fault proxy");
    let proxied = url_through(url, proxy.local_addr());
    Some((proxy, proxied))
}
