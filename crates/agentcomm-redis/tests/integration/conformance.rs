//! The testkit's conformance suite, in both delivery modes, against a real Redis (REDIS_URL, default
//! redis://127.0.0.1:6379), and again on a three-node Redis Cluster this binary starts on loopback
//! (`common::servers`). Each mode declares exactly what its router claims.

use crate::common;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use agentcomm_core::channel::Channel;
use agentcomm_core::error::{Error, Result, redact_url};
use agentcomm_core::router::{BoxFuture, Capabilities, SharedRouter};
use agentcomm_redis::{DeliveryMode, RedisRouter};
use agentcomm_testkit::conformance::ConformanceBackend;
use fred::prelude::{ClientLike, PubsubInterface, StreamsInterface};

struct Redis {
    mode: DeliveryMode,
    url: String,
    /// Every connection of one scenario shares it; scenarios do not see each other.
    prefix: String,
    /// On the shared Redis: its keys are removed after the scenario.
    _cleanup: Option<common::RemoveKeysOnDrop>,
    /// Why there is no server to connect to (a cluster that could not be started).
    unreachable: Option<String>,
    /// Publishes through the publish script (`idempotent_publish(true)`).
    idempotent: bool,
}

/// The three-node Redis Cluster this test binary starts for itself, once, for all its tests. A failure
/// to start is kept too: every test then reports it (skipped, or failed under
/// AGENTCOMM_REQUIRE_BROKERS=1) instead of trying again.
fn cluster() -> &'static std::result::Result<common::servers::Cluster, String> {
    static CLUSTER: OnceLock<std::result::Result<common::servers::Cluster, String>> =
        OnceLock::new();
    CLUSTER.get_or_init(|| match common::servers::cluster_unsupported() {
        Some(reason) => Err(reason),
        None => {
            common::servers::start_cluster().map_err(|reason| format!("no test cluster: {reason}"))
        }
    })
}

impl Redis {
    fn new(mode: DeliveryMode) -> Self {
        let mut redis = Self::at(mode, common::redis_url());
        redis._cleanup = Some(common::RemoveKeysOnDrop(redis.prefix.clone()));
        redis
    }

    /// On a three-node Redis Cluster this test binary starts for itself (once, for all its tests).
    fn on_cluster(mode: DeliveryMode) -> Self {
        match cluster() {
            Ok(cluster) => Self::at(mode, cluster.url()),
            Err(reason) => Redis {
                unreachable: Some(reason.clone()),
                ..Self::at(mode, "redis-cluster://127.0.0.1:1".into())
            },
        }
    }

    fn at(mode: DeliveryMode, url: String) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let prefix = common::unique_prefix();
        Redis {
            mode,
            // The cluster's keys go with it.
            _cleanup: None,
            url,
            prefix,
            unreachable: None,
            idempotent: false,
        }
    }

    /// [`Redis::on_cluster`] with idempotent publishing: the publish script runs on every node that
    /// holds a class's stream (loaded there on first use).
    fn idempotent_on_cluster(mode: DeliveryMode) -> Self {
        Redis {
            idempotent: true,
            ..Self::on_cluster(mode)
        }
    }
}

impl Redis {
    /// A new connection to `url`, configured for the scenarios.
    fn connect_to(&self, url: String) -> BoxFuture<'_, Option<SharedRouter>> {
        Box::pin(async move {
            let connecting = RedisRouter::builder(&url)
                .mode(self.mode)
                .prefix(&self.prefix)
                .connect_timeout(Duration::from_secs(3))
                .read_block(Duration::from_millis(500))
                .discovery_interval(Duration::from_millis(100))
                .reorder_window(Duration::from_millis(200))
                .idempotent_publish(self.idempotent)
                .connect();
            match tokio::time::timeout(Duration::from_secs(10), connecting).await {
                Ok(Ok(router)) => Some(Arc::new(router) as SharedRouter),
                _ => None,
            }
        })
    }
}

impl ConformanceBackend for Redis {
    fn name(&self) -> &str {
        match self.mode {
            DeliveryMode::Streams => "redis-streams",
            _ => "redis-pubsub",
        }
    }

    fn declared_capabilities(&self) -> Capabilities {
        match self.mode {
            DeliveryMode::Streams => Capabilities::none()
                .persistent(true)
                .ordered_per_channel(true)
                .consumer_groups(true)
                .redelivery(true)
                .publish_confirms(true),
            // Not `reports_unroutable`: a wildcard-class subscriber anywhere receives every message.
            // Not `no_duplicates` on a cluster (see the router's capabilities).
            _ => Capabilities::none()
                .ordered_per_channel(true)
                .redelivery(true)
                .publish_confirms(true)
                .no_duplicates(!self.url.starts_with("redis-cluster://")),
        }
    }

    fn connect(&self) -> BoxFuture<'_, Option<SharedRouter>> {
        self.connect_to(self.url.clone())
    }

    /// The standalone Redis's address when it is on loopback (the fault proxy's only target); a
    /// cluster redirects clients to its nodes' own addresses, past any proxy, so it has none.
    fn broker_address(&self) -> Option<SocketAddr> {
        if self.url.starts_with("redis-cluster://") || self.unreachable.is_some() {
            return None;
        }
        common::loopback_target(&self.url)?
            .to_socket_addrs()
            .ok()?
            .next()
    }

    fn connect_through(&self, address: SocketAddr) -> BoxFuture<'_, Option<SharedRouter>> {
        self.connect_to(common::through(&self.url, address))
    }

    fn unreachable(&self) -> String {
        self.unreachable
            .clone()
            .unwrap_or_else(|| format!("no Redis at {}", redact_url(&self.url)))
    }

    fn publish_raw(&self, channel: &Channel, frame: Vec<u8>) -> BoxFuture<'_, Result<bool>> {
        let channel = channel.clone();
        Box::pin(async move {
            let fail = |error: fred::error::Error| Error::Backend {
                backend: "redis",
                message: error.to_string(),
            };
            let config = fred::prelude::Config::from_url(&self.url).map_err(fail)?;
            let client = fred::prelude::Builder::from_config(config)
                .build()
                .map_err(fail)?;
            client.init().await.map_err(fail)?;
            match self.mode {
                DeliveryMode::Streams => {
                    let key = format!("{}:stream:{{{}}}", self.prefix, channel.class());
                    let _: String = client
                        .xadd(key, false, None, "*", vec![("f", frame)])
                        .await
                        .map_err(fail)?;
                }
                _ => {
                    let name = format!("{}:{}", self.prefix, channel.name());
                    let _: i64 = client.publish(name, frame).await.map_err(fail)?;
                }
            }
            let _ = client.quit().await;
            Ok(true)
        })
    }
}

agentcomm_testkit::conformance_tests!(mod streams, Redis::new(DeliveryMode::Streams));
agentcomm_testkit::conformance_tests!(mod pubsub, Redis::new(DeliveryMode::PubSub));
agentcomm_testkit::conformance_tests!(mod cluster_streams, Redis::on_cluster(DeliveryMode::Streams));
agentcomm_testkit::conformance_tests!(mod cluster_pubsub, Redis::on_cluster(DeliveryMode::PubSub));
agentcomm_testkit::conformance_tests!(
    mod cluster_streams_idempotent,
    Redis::idempotent_on_cluster(DeliveryMode::Streams)
);

/// On a cluster, idempotent publishing sends a batch's scripts straight to the node of their stream:
/// a batch and a single publish on the same stream at once store every message once. (Sent first to
/// the node of the script's hash, a batch came back by MOVED behind the single publish, whose higher
/// number then made the script take the whole batch for replays: 1,006 published, 6 stored.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_idempotent_batches_and_single_publishes_are_all_stored() {
    use agentcomm_core::envelope::Envelope;
    use agentcomm_core::router::Router;
    let cluster = match cluster() {
        Ok(cluster) => cluster,
        Err(reason) => {
            common::servers::skip(reason);
            return;
        }
    };
    let prefix = common::unique_prefix();
    let router = RedisRouter::builder(cluster.url())
        .mode(DeliveryMode::Streams)
        .prefix(&prefix)
        .idempotent_publish(true)
        .connect()
        .await
        .expect("connect to the test cluster");
    let channel = agentcomm_core::parse_channel("Mixed:event:s1").unwrap();
    let envelope = |n: u32| {
        Envelope::new(
            channel.clone(),
            "application/json",
            format!("{{\"n\":{n}}}").into_bytes(),
        )
    };
    let (rounds, batch) = (5u32, 200u32);
    for round in 0..rounds {
        let envelopes: Vec<Envelope> = (0..batch).map(|n| envelope(round * batch + n)).collect();
        let (results, single) = common::within(
            Duration::from_secs(20),
            "a batch and a single publish",
            futures::future::join(
                router.publish_batch(envelopes),
                router.publish(envelope(1_000_000 + round)),
            ),
        )
        .await;
        single.unwrap();
        for result in results {
            result.unwrap();
        }
    }
    let health = router.health().await;
    assert_eq!(health.get("publish_duplicates"), 0, "{health:?}");
    let raw = common::raw_client_at(&cluster.url()).await;
    let stored: u64 = raw
        .xlen(format!("{prefix}:stream:{{Mixed}}"))
        .await
        .unwrap();
    assert_eq!(stored, u64::from(rounds * (batch + 1)));
    let _ = raw.quit().await;
    router.close().await.unwrap();
}
