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
    if std::env::var("AGENTCOMM_REQUIRE_BROKERS").is_ok_and(|v| v.trim() == "1") {
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

/// A fault proxy in front of the Redis at `url`, when that is a plain loopback `redis://` URL (the
/// proxy only forwards to loopback); `None`, after a skip line, otherwise.
pub(crate) async fn loopback_proxy(url: &str) -> Option<agentcomm_testkit::proxy::FaultProxy> {
    let Some(target) = url
        .strip_prefix("redis://")
        .filter(|rest| rest.starts_with("127.0.0.1:") && !rest.contains(['@', '/']))
    else {
        println!("skipped: REDIS_URL is not a plain loopback redis:// URL");
        return None;
    };
    Some(
        agentcomm_testkit::proxy::FaultProxy::start(target)
            .await
            .expect("start the fault proxy"),
    )
}
