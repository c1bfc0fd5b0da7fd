//! The harness, and the suite's checks that need the fault proxy, against the real brokers: Redis
//! (`REDIS_URL`, default `redis://127.0.0.1:6379`, in both delivery modes) and RabbitMQ
//! (`RABBITMQ_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//!
//! Each test prints one `skipped: ...` line and passes when its broker is not running, or fails when
//! `AGENTCOMM_REQUIRE_BROKERS=1`. Each uses a namespace of its own (a Redis key prefix, a RabbitMQ
//! exchange) and deletes what it created when it ends, failed or not.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentcomm_amqp::AmqpRouter;
use agentcomm_core::backoff::Backoff;
use agentcomm_core::config::{
    DEFAULT_RABBITMQ_URL, DEFAULT_REDIS_URL, RABBITMQ_URL_VAR, REDIS_URL_VAR,
};
use agentcomm_core::envelope::headers;
use agentcomm_core::error::redact_url;
use agentcomm_core::prelude::*;
use agentcomm_core::router::{BoxFuture, Capabilities, SharedRouter};
use agentcomm_redis::fred::prelude::{ClientLike, KeysInterface};
use agentcomm_redis::{DeliveryMode, RedisRouter};
use agentcomm_testkit::conformance::{ConformanceBackend, Scenario, ScenarioOutcome, try_run};
use agentcomm_testkit::proxy::{loopback_address, url_through};
use agentcomm_testkit::{TestHarness, broker_unavailable};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

/// Bounds every step that could hang.
const STEP: Duration = Duration::from_secs(20);

// ----- the agents under test ---------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[message(direction = "request")]
struct PaymentRequest {
    amount: f64,
    user_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[message(direction = "response")]
struct PaymentResponse {
    success: bool,
    transaction_id: String,
}

/// Published before the response for big payments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
struct AuditEvent {
    amount: f64,
}

#[agent(receives = [PaymentRequest], sends = [PaymentResponse, AuditEvent])]
struct PaymentAgent;

impl Handle<PaymentRequest> for PaymentAgent {
    async fn handle(&self, request: PaymentRequest, ctx: &Context<Self>) -> HandlerResult {
        if request.amount > 1000.0 {
            ctx.publish(AuditEvent {
                amount: request.amount,
            })
            .await?;
        }
        ctx.reply(PaymentResponse {
            success: request.amount > 0.0,
            transaction_id: format!("TXN-{}", request.user_id),
        })
        .await?;
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
struct Job {
    id: u32,
}

#[agent(receives = [Job])]
struct AlwaysFails;

impl Handle<Job> for AlwaysFails {
    async fn handle(&self, _job: Job, _ctx: &Context<Self>) -> HandlerResult {
        Err(HandlerError::msg("the job service is down"))
    }
}

/// The test a user would write, on a broker shared with other tests: sessions of its own, agents
/// spawned on them, the harness watching only them.
async fn payment_flow(router: SharedRouter) {
    let h = TestHarness::builder()
        .shared_router(router)
        .only_sessions(Vec::<String>::new())
        .timeout(Duration::from_secs(10))
        .build()
        .await
        .expect("a harness on the broker");
    let groups = h.router().capabilities().consumer_groups;
    let on = |session: &str| {
        let options = AgentOptions::new().session(session);
        if groups { options } else { options.fan_out() }
    };
    let payments = h.unique_session("payments");
    let jobs = h.unique_session("jobs");
    h.spawn_with(PaymentAgent, on(&payments)).await;
    h.spawn_with(
        AlwaysFails,
        on(&jobs).max_attempts(2).backoff(
            Backoff::new(Duration::from_millis(50), Duration::from_millis(50)).jitter(0.0),
        ),
    )
    .await;

    let request = h
        .send(
            &payments,
            PaymentRequest {
                amount: 5000.0,
                user_id: "user123".into(),
            },
        )
        .await;
    let audit = h.expect::<AuditEvent>().session(&payments).await;
    let response = h
        .expect::<PaymentResponse>()
        .session(&payments)
        .matching(|response| response.success)
        .await;
    assert_eq!(response.transaction_id, "TXN-user123");
    assert_eq!(
        response.envelope.correlation_id(),
        Some(request.id().to_string().as_str())
    );
    assert!(audit.publish_order() < response.publish_order());

    let reply = h
        .request::<PaymentRequest, PaymentResponse>(
            &payments,
            PaymentRequest {
                amount: -1.0,
                user_id: "user456".into(),
            },
        )
        .await;
    assert!(!reply.success);

    let job = h.send(&jobs, Job { id: 7 }).await;
    let dead = h
        .expect_dead_letter::<Job>()
        .session(&jobs)
        .reason(headers::REASON_HANDLER_FAILED)
        .await;
    assert_eq!(dead.attempts(), Some(2));
    assert_eq!(dead.original_id(), Some(job.id().to_string().as_str()));
    assert_eq!(dead.message(), Some(&Job { id: 7 }));

    h.assert_nothing_else_published().await;
    let report = tokio::time::timeout(STEP, h.shutdown())
        .await
        .expect("the harness shuts down in time")
        .expect("the harness shuts down");
    assert_eq!(report.aborted, 0);
}

// ----- Redis -------------------------------------------------------------------------------------

fn redis_url() -> String {
    std::env::var(REDIS_URL_VAR)
        .ok()
        .filter(|url| !url.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_REDIS_URL.to_string())
}

/// A key prefix no other test uses.
fn unique(label: &str) -> String {
    format!("testkit-{label}-{}", uuid::Uuid::now_v7().simple())
}

/// `scheme://[userinfo@]host:port[/rest]`: what comes before the host, the host and port, and the rest.
fn authority(url: &str) -> Option<(String, String, String)> {
    let (scheme, rest) = url.split_once("://")?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, host_port) = match authority.rsplit_once('@') {
        Some((userinfo, host_port)) => (format!("{userinfo}@"), host_port),
        None => (String::new(), authority),
    };
    Some((
        format!("{scheme}://{userinfo}"),
        host_port.to_string(),
        tail.to_string(),
    ))
}

/// Deletes every key under a prefix when dropped (the test's runtime may be gone: its own thread and
/// runtime do it).
struct RedisCleanup {
    url: String,
    prefix: String,
}

impl Drop for RedisCleanup {
    fn drop(&mut self) {
        let (url, pattern) = (self.url.clone(), format!("{}*", self.prefix));
        let cleaning = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                let removing = async {
                    let config = agentcomm_redis::fred::prelude::Config::from_url(&url).ok()?;
                    let client = agentcomm_redis::fred::prelude::Builder::from_config(config)
                        .build()
                        .ok()?;
                    client.init().await.ok()?;
                    let keys: Vec<_> = client
                        .scan_buffered(pattern, Some(500), None)
                        .filter_map(|key| async move { key.ok() })
                        .collect()
                        .await;
                    for chunk in keys.chunks(500) {
                        let _: Result<i64, _> = client.del(chunk.to_vec()).await;
                    }
                    let _ = client.quit().await;
                    Some(())
                };
                let _ = tokio::time::timeout(STEP, removing).await;
            });
        });
        let _ = cleaning.join();
    }
}

/// A router on the test Redis, or `None` (with the skip line) when nothing listens there.
async fn redis_router(mode: DeliveryMode, prefix: &str) -> Option<RedisRouter> {
    let url = redis_url();
    let connecting = RedisRouter::builder(&url)
        .mode(mode)
        .prefix(prefix)
        .connect_timeout(Duration::from_secs(3))
        .read_block(Duration::from_millis(200))
        .discovery_interval(Duration::from_millis(100))
        .connect();
    match tokio::time::timeout(STEP, connecting).await {
        Ok(Ok(router)) => Some(router),
        outcome => {
            broker_unavailable(format!(
                "no Redis at {} ({})",
                redact_url(&url),
                match outcome {
                    Ok(Err(error)) => error.to_string(),
                    _ => format!("connecting took more than {STEP:?}"),
                }
            ));
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_runs_a_users_test_on_redis_streams() {
    let prefix = unique("harness-streams");
    let _cleanup = RedisCleanup {
        url: redis_url(),
        prefix: prefix.clone(),
    };
    let Some(router) = redis_router(DeliveryMode::Streams, &prefix).await else {
        return;
    };
    payment_flow(Arc::new(router)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_runs_a_users_test_on_redis_pubsub() {
    let prefix = unique("harness-pubsub");
    let _cleanup = RedisCleanup {
        url: redis_url(),
        prefix: prefix.clone(),
    };
    let Some(router) = redis_router(DeliveryMode::PubSub, &prefix).await else {
        return;
    };
    payment_flow(Arc::new(router)).await;
}

/// Redis Streams as a conformance backend that can be reached through the fault proxy.
struct RedisStreams {
    prefix: String,
    _cleanup: RedisCleanup,
}

impl RedisStreams {
    fn new() -> Self {
        let prefix = unique("conformance");
        RedisStreams {
            _cleanup: RedisCleanup {
                url: redis_url(),
                prefix: prefix.clone(),
            },
            prefix,
        }
    }

    async fn connect_to(&self, url: String) -> Option<SharedRouter> {
        let connecting = RedisRouter::builder(url)
            .mode(DeliveryMode::Streams)
            .prefix(&self.prefix)
            .connect_timeout(Duration::from_secs(3))
            .command_timeout(Duration::from_secs(2))
            .read_block(Duration::from_millis(200))
            .discovery_interval(Duration::from_millis(100))
            .claim_idle(Duration::from_millis(500))
            .connect();
        match tokio::time::timeout(STEP, connecting).await {
            Ok(Ok(router)) => Some(Arc::new(router) as SharedRouter),
            _ => None,
        }
    }
}

impl ConformanceBackend for RedisStreams {
    fn name(&self) -> &str {
        "redis-streams"
    }
    fn declared_capabilities(&self) -> Capabilities {
        Capabilities::none()
            .persistent(true)
            .ordered_per_channel(true)
            .consumer_groups(true)
            .redelivery(true)
            .publish_confirms(true)
    }
    fn connect(&self) -> BoxFuture<'_, Option<SharedRouter>> {
        Box::pin(self.connect_to(redis_url()))
    }
    fn unreachable(&self) -> String {
        format!("no Redis at {}", redact_url(&redis_url()))
    }
    fn max_wait(&self) -> Duration {
        Duration::from_secs(10)
    }
    fn broker_address(&self) -> Option<SocketAddr> {
        loopback_address(&redis_url(), 6379)
    }
    fn connect_through(&self, address: SocketAddr) -> BoxFuture<'_, Option<SharedRouter>> {
        Box::pin(self.connect_to(url_through(&redis_url(), address)))
    }
}

// ----- RabbitMQ ----------------------------------------------------------------------------------

fn rabbitmq_url() -> String {
    std::env::var(RABBITMQ_URL_VAR)
        .ok()
        .filter(|url| !url.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_RABBITMQ_URL.to_string())
}

/// Deletes an exchange's topology and the queues its routers declared when dropped.
struct RabbitMqCleanup {
    exchange: String,
    routers: Arc<Mutex<Vec<AmqpRouter>>>,
}

impl Drop for RabbitMqCleanup {
    fn drop(&mut self) {
        let routers = std::mem::take(&mut *self.routers.lock().expect("routers lock"));
        let mut queues: Vec<String> = routers
            .iter()
            .flat_map(|router| {
                let mut queues = router.declared_queues();
                queues.extend(router.dead_letter_queue().map(str::to_string));
                queues
            })
            .collect();
        queues.sort();
        queues.dedup();
        let mut exchanges = vec![self.exchange.clone()];
        exchanges.extend(
            routers
                .iter()
                .map(|router| router.dead_letter_exchange().to_string()),
        );
        exchanges.sort();
        exchanges.dedup();
        drop(routers);
        let cleaning = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                let _ = tokio::time::timeout(STEP, delete_topology(&queues, &exchanges)).await;
            });
        });
        let _ = cleaning.join();
    }
}

/// Deletes queues and exchanges through a plain amqprs connection. Best effort.
async fn delete_topology(queues: &[String], exchanges: &[String]) -> Option<()> {
    use amqprs::channel::{ExchangeDeleteArguments, QueueDeleteArguments};
    use amqprs::connection::{Connection, OpenConnectionArguments};
    let url = rabbitmq_url();
    let (head, host_port, _) = authority(&url)?;
    let userinfo = head.split_once("://")?.1.trim_end_matches('@');
    let (user, password) = userinfo.split_once(':').unwrap_or(("guest", "guest"));
    let (host, port) = host_port.rsplit_once(':').unwrap_or((&host_port, "5672"));
    let arguments = OpenConnectionArguments::new(host, port.parse().ok()?, user, password);
    let connection = Connection::open(&arguments).await.ok()?;
    // A failed delete closes its channel: one channel per delete.
    for queue in queues {
        if let Ok(channel) = connection.open_channel(None).await {
            let _ = channel.queue_delete(QueueDeleteArguments::new(queue)).await;
            let _ = channel.close().await;
        }
    }
    for exchange in exchanges {
        if let Ok(channel) = connection.open_channel(None).await {
            let _ = channel
                .exchange_delete(ExchangeDeleteArguments::new(exchange))
                .await;
            let _ = channel.close().await;
        }
    }
    let _ = connection.close().await;
    Some(())
}

/// RabbitMQ on its own exchange, as a conformance backend that can be reached through the proxy;
/// also what the harness test connects with.
struct RabbitMq {
    exchange: String,
    routers: Arc<Mutex<Vec<AmqpRouter>>>,
    _cleanup: RabbitMqCleanup,
}

impl RabbitMq {
    fn new(label: &str) -> Self {
        let exchange = unique(label);
        let routers = Arc::default();
        RabbitMq {
            _cleanup: RabbitMqCleanup {
                exchange: exchange.clone(),
                routers: Arc::clone(&routers),
            },
            exchange,
            routers,
        }
    }

    /// Whether something listens at the broker's address (a refused connection means no broker;
    /// anything else that goes wrong afterwards is a failure).
    async fn reachable() -> bool {
        let url = rabbitmq_url();
        let Some((_, host_port, _)) = authority(&url) else {
            return false;
        };
        let host_port = if host_port.contains(':') {
            host_port
        } else {
            format!("{host_port}:5672")
        };
        matches!(
            tokio::time::timeout(
                Duration::from_secs(3),
                tokio::net::TcpStream::connect(host_port)
            )
            .await,
            Ok(Ok(_))
        )
    }

    async fn connect_to(&self, url: String) -> Option<SharedRouter> {
        let connecting = AmqpRouter::builder(url)
            .exchange(&self.exchange)
            .connect_timeout(Duration::from_secs(5))
            .confirm_timeout(Duration::from_secs(5))
            .close_timeout(Duration::from_secs(5))
            .connect();
        let router = tokio::time::timeout(STEP, connecting).await.ok()?.ok()?;
        self.routers
            .lock()
            .expect("routers lock")
            .push(router.clone());
        Some(Arc::new(router) as SharedRouter)
    }
}

impl ConformanceBackend for RabbitMq {
    fn name(&self) -> &str {
        "rabbitmq"
    }
    fn declared_capabilities(&self) -> Capabilities {
        Capabilities::none()
            .persistent(true)
            .ordered_per_channel(true)
            .consumer_groups(true)
            .redelivery(true)
            .publish_confirms(true)
            .reports_unroutable(true)
    }
    fn connect(&self) -> BoxFuture<'_, Option<SharedRouter>> {
        Box::pin(self.connect_to(rabbitmq_url()))
    }
    fn unreachable(&self) -> String {
        format!("no RabbitMQ at {}", redact_url(&rabbitmq_url()))
    }
    fn max_wait(&self) -> Duration {
        Duration::from_secs(10)
    }
    fn broker_address(&self) -> Option<SocketAddr> {
        loopback_address(&rabbitmq_url(), 5672)
    }
    fn connect_through(&self, address: SocketAddr) -> BoxFuture<'_, Option<SharedRouter>> {
        Box::pin(self.connect_to(url_through(&rabbitmq_url(), address)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_runs_a_users_test_on_rabbitmq() {
    if !RabbitMq::reachable().await {
        broker_unavailable(format!("no RabbitMQ at {}", redact_url(&rabbitmq_url())));
        return;
    }
    let broker = RabbitMq::new("testkit-harness");
    let router = broker
        .connect()
        .await
        .expect("RabbitMQ answers, but connecting failed");
    payment_flow(router).await;
}

// ----- the suite's fault-proxy checks on real brokers ---------------------------------------------

/// Runs a scenario and fails with its text unless it passed (or the broker is away and not required).
async fn passes(scenario: Scenario, backend: &impl ConformanceBackend) -> Option<String> {
    match try_run(scenario, backend).await {
        ScenarioOutcome::Passed { summary, .. } => {
            println!("ok: {scenario} on {}: {summary}", backend.name());
            Some(summary)
        }
        ScenarioOutcome::Skipped(why) => {
            println!("skipped: {why}");
            None
        }
        other => panic!("{scenario} on {}: {other:?}", backend.name()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_streams_publishes_resolve_only_once_redis_has_them() {
    if let Some(summary) = passes(Scenario::PublishConfirms, &RedisStreams::new()).await {
        assert!(summary.contains("through the fault proxy"), "{summary}");
        assert!(!summary.contains("not checked"), "{summary}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_publishes_resolve_only_once_rabbitmq_has_them() {
    if !RabbitMq::reachable().await {
        broker_unavailable(format!("no RabbitMQ at {}", redact_url(&rabbitmq_url())));
        return;
    }
    if let Some(summary) = passes(
        Scenario::PublishConfirms,
        &RabbitMq::new("testkit-confirms"),
    )
    .await
    {
        assert!(summary.contains("through the fault proxy"), "{summary}");
        assert!(!summary.contains("not checked"), "{summary}");
    }
}

#[test]
fn broker_urls_are_pointed_through_another_address_with_their_credentials() {
    let proxy: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    assert_eq!(
        url_through("amqp://guest:guest@127.0.0.1:5672/%2f", proxy),
        "amqp://guest:guest@127.0.0.1:40000/%2f"
    );
    assert_eq!(
        url_through("redis://127.0.0.1:6379", proxy),
        "redis://127.0.0.1:40000"
    );
    assert_eq!(
        loopback_address("redis://localhost", 6379).map(|a| a.port()),
        Some(6379)
    );
    assert_eq!(loopback_address("redis://10.1.2.3:6379", 6379), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_streams_passes_the_graceful_shutdown_scenario() {
    passes(Scenario::GracefulShutdown, &RedisStreams::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_passes_the_graceful_shutdown_scenario() {
    if !RabbitMq::reachable().await {
        broker_unavailable(format!("no RabbitMQ at {}", redact_url(&rabbitmq_url())));
        return;
    }
    passes(
        Scenario::GracefulShutdown,
        &RabbitMq::new("testkit-shutdown"),
    )
    .await;
}
