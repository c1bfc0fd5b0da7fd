//! The conformance suite catches broken backends, and says what they broke.
//!
//! Each test wraps the in-memory router in a connection with one deliberate fault (losing, duplicating
//! or reordering messages, dropping a header, lying about its capabilities, ...) and checks that the
//! scenario made to catch it fails with a message that counts the damage.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use agentcomm_core::MemoryRouter;
use agentcomm_core::envelope::Envelope;
use agentcomm_core::error::Result;
use agentcomm_core::router::{
    BoxFuture, Capabilities, Health, PublishOutcome, Router, SharedRouter, SubscribeOptions,
    Subscription,
};
use agentcomm_testkit::conformance::{ConformanceBackend, Scenario, ScenarioOutcome, try_run};
use agentcomm_testkit::memory::{MemoryBackend, MemoryConnection};
use agentcomm_testkit::require_brokers;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// Says it delivered every 100th numbered message, and drops it.
    LoseEveryHundredth,
    /// Publishes every 100th numbered message twice.
    DuplicateEveryHundredth,
    /// Holds every 10th numbered message of a channel and publishes it after the next one.
    SwapPairs,
    /// Drops the header `text`.
    DropHeader,
    /// Keeps accepting publishes after close.
    PublishAfterClose,
    /// Reports other capabilities than declared.
    MisreportCapabilities,
}

struct FaultyConnection {
    inner: MemoryConnection,
    bus: MemoryRouter,
    fault: Fault,
    capabilities: Capabilities,
    published: AtomicU64,
    held: Mutex<HashMap<String, Envelope>>,
}

fn seq_of(envelope: &Envelope) -> Option<u64> {
    envelope.header("conformance-seq")?.parse().ok()
}

impl FaultyConnection {
    async fn faulty_publish(&self, mut envelope: Envelope) -> Result<PublishOutcome> {
        let Some(seq) = seq_of(&envelope) else {
            return self.inner.publish(envelope).await;
        };
        let count = self.published.fetch_add(1, Ordering::Relaxed) + 1;
        match self.fault {
            Fault::LoseEveryHundredth if count.is_multiple_of(100) => {
                Ok(PublishOutcome::Delivered(1))
            }
            Fault::DuplicateEveryHundredth if count.is_multiple_of(100) => {
                self.inner.publish(envelope.clone()).await?;
                self.inner.publish(envelope).await
            }
            Fault::SwapPairs => {
                let channel = envelope.channel().name().to_string();
                if seq % 10 == 0 {
                    self.held.lock().unwrap().insert(channel, envelope);
                    return Ok(PublishOutcome::Delivered(1));
                }
                let held = self.held.lock().unwrap().remove(&channel);
                let outcome = self.inner.publish(envelope).await?;
                if let Some(held) = held {
                    self.inner.publish(held).await?;
                }
                Ok(outcome)
            }
            Fault::DropHeader => {
                envelope.headers_mut().remove("text");
                self.inner.publish(envelope).await
            }
            Fault::PublishAfterClose => self.bus.publish(envelope).await,
            _ => self.inner.publish(envelope).await,
        }
    }
}

impl Router for FaultyConnection {
    fn backend(&self) -> &str {
        "faulty-memory"
    }
    fn capabilities(&self) -> Capabilities {
        self.capabilities
    }
    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, Result<PublishOutcome>> {
        Box::pin(self.faulty_publish(envelope))
    }
    fn subscribe(&self, options: SubscribeOptions) -> BoxFuture<'_, Result<Subscription>> {
        self.inner.subscribe(options)
    }
    fn health(&self) -> BoxFuture<'_, Health> {
        self.inner.health()
    }
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        self.inner.close()
    }
}

struct FaultyBackend {
    memory: MemoryBackend,
    fault: Fault,
    declared: Capabilities,
}

impl FaultyBackend {
    fn new(fault: Fault) -> Self {
        let memory = MemoryBackend::new();
        let declared = memory.declared_capabilities();
        FaultyBackend {
            memory,
            fault,
            declared,
        }
    }

    fn declaring(mut self, declared: Capabilities) -> Self {
        self.declared = declared;
        self
    }
}

impl ConformanceBackend for FaultyBackend {
    fn name(&self) -> &str {
        "faulty-memory"
    }
    fn max_wait(&self) -> Duration {
        // Everything arrives at once in memory: what is missing after 2 s is lost.
        Duration::from_secs(2)
    }
    fn declared_capabilities(&self) -> Capabilities {
        self.declared
    }
    fn connect(&self) -> BoxFuture<'_, Option<SharedRouter>> {
        let capabilities = if self.fault == Fault::MisreportCapabilities {
            self.declared.no_duplicates(false)
        } else {
            self.declared
        };
        let connection = FaultyConnection {
            inner: MemoryConnection::new(self.memory.bus().clone()),
            bus: self.memory.bus().clone(),
            fault: self.fault,
            capabilities,
            published: AtomicU64::new(0),
            held: Mutex::default(),
        };
        Box::pin(async move { Some(std::sync::Arc::new(connection) as SharedRouter) })
    }
}

async fn failure(scenario: Scenario, backend: &FaultyBackend) -> String {
    match try_run(scenario, backend).await {
        ScenarioOutcome::Failed(text) => text,
        other => panic!(
            "{scenario} should have failed on {:?}, got {other:?}",
            backend.fault
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_messages_are_counted_and_the_first_is_named() {
    let text = failure(
        Scenario::ConcurrentPublishers,
        &FaultyBackend::new(Fault::LoseEveryHundredth),
    )
    .await;
    assert!(
        text.starts_with("subscriber 0: lost 50 of 5000 (first lost: publisher "),
        "{text}"
    );
    assert!(
        text.contains(", duplicated 0, reordered 0 within "),
        "{text}"
    );
    assert!(text.contains("subscriber 4: lost 50 of 5000"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_fail_only_where_no_duplicates_is_claimed() {
    let text = failure(
        Scenario::PublisherClose,
        &FaultyBackend::new(Fault::DuplicateEveryHundredth),
    )
    .await;
    assert!(
        text.starts_with(
            "the subscriber: lost 0 of 10000, duplicated 100 (first duplicate: publisher "
        ),
        "{text}"
    );
    assert!(
        text.contains("(the backend claims no_duplicates)"),
        "{text}"
    );

    let at_least_once = MemoryBackend::new()
        .declared_capabilities()
        .no_duplicates(false);
    let backend = FaultyBackend::new(Fault::DuplicateEveryHundredth).declaring(at_least_once);
    match try_run(Scenario::PublisherClose, &backend).await {
        ScenarioOutcome::Passed { summary, .. } => {
            assert!(summary.contains("duplicated 100"), "{summary}")
        }
        other => panic!("an at-least-once backend may duplicate: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordering_fails_where_order_is_claimed() {
    let text = failure(
        Scenario::OrderPerChannel,
        &FaultyBackend::new(Fault::SwapPairs),
    )
    .await;
    assert!(
        text.starts_with("the fan-out subscriber: lost 0 of 1000, duplicated 0, reordered 112 (first reordered: session "),
        "{text}"
    );
    assert!(
        text.contains("(the backend claims ordered_per_channel)"),
        "{text}"
    );

    let unordered = MemoryBackend::new()
        .declared_capabilities()
        .ordered_per_channel(false);
    let backend = FaultyBackend::new(Fault::SwapPairs).declaring(unordered);
    assert!(matches!(
        try_run(Scenario::OrderPerChannel, &backend).await,
        ScenarioOutcome::NotApplicable(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_header_is_named() {
    let text = failure(
        Scenario::EnvelopeFields,
        &FaultyBackend::new(Fault::DropHeader),
    )
    .await;
    assert!(
        text.starts_with(
            "100 of 100 messages arrived changed; first: message 0: header \"text\" is missing"
        ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_after_close_is_refused() {
    let text = failure(
        Scenario::CloseRefusesFurtherUse,
        &FaultyBackend::new(Fault::PublishAfterClose),
    )
    .await;
    assert!(
        text.starts_with("publish after close() gave Ok(()), expected Err(Error::Closed)"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_checks_the_reported_capabilities() {
    let backend = FaultyBackend::new(Fault::MisreportCapabilities);
    for scenario in [Scenario::DeclaredCapabilities, Scenario::BatchPublish] {
        let text = failure(scenario, &backend).await;
        assert_eq!(
            text,
            "the backend declares [ordered_per_channel, consumer_groups, redelivery, publish_confirms, \
             reports_unroutable, no_duplicates] but its connection reports [ordered_per_channel, consumer_groups, \
             redelivery, publish_confirms, reports_unroutable]: make declared_capabilities() and \
             Router::capabilities() agree"
        );
    }
}

/// In-memory groups outlive their members, so the in-memory bus keeps what a group has not taken:
/// claiming persistence runs the persistence scenarios, and they pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_persistence_scenarios_run_when_persistence_is_claimed() {
    struct Durable(MemoryBackend);
    impl ConformanceBackend for Durable {
        fn name(&self) -> &str {
            "durable-memory"
        }
        fn declared_capabilities(&self) -> Capabilities {
            self.0.declared_capabilities().persistent(true)
        }
        fn connect(&self) -> BoxFuture<'_, Option<SharedRouter>> {
            let connection = Claiming(MemoryConnection::new(self.0.bus().clone()));
            Box::pin(async move { Some(std::sync::Arc::new(connection) as SharedRouter) })
        }
    }
    struct Claiming(MemoryConnection);
    impl Router for Claiming {
        fn backend(&self) -> &str {
            "durable-memory"
        }
        fn capabilities(&self) -> Capabilities {
            self.0.capabilities().persistent(true)
        }
        fn publish(&self, envelope: Envelope) -> BoxFuture<'_, Result<PublishOutcome>> {
            self.0.publish(envelope)
        }
        fn subscribe(&self, options: SubscribeOptions) -> BoxFuture<'_, Result<Subscription>> {
            self.0.subscribe(options)
        }
        fn health(&self) -> BoxFuture<'_, Health> {
            self.0.health()
        }
        fn close(&self) -> BoxFuture<'_, Result<()>> {
            self.0.close()
        }
    }
    for scenario in [
        Scenario::CloseWhileInFlight,
        Scenario::PersistentWithoutConsumer,
    ] {
        match try_run(scenario, &Durable(MemoryBackend::new())).await {
            ScenarioOutcome::Passed { summary, .. } => {
                assert!(summary.contains("lost 0 of"), "{scenario}: {summary}")
            }
            other => panic!("{scenario}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_skipped_unless_brokers_are_required() {
    struct Nowhere;
    impl ConformanceBackend for Nowhere {
        fn name(&self) -> &str {
            "nowhere"
        }
        fn declared_capabilities(&self) -> Capabilities {
            Capabilities::none()
        }
        fn connect(&self) -> BoxFuture<'_, Option<SharedRouter>> {
            Box::pin(async { None })
        }
        fn unreachable(&self) -> String {
            "no broker at nowhere://127.0.0.1:1".into()
        }
    }
    let outcome = try_run(Scenario::ConcurrentPublishers, &Nowhere).await;
    if require_brokers() {
        assert_eq!(
            outcome,
            ScenarioOutcome::Failed(
                "AGENTCOMM_REQUIRE_BROKERS=1, but no broker at nowhere://127.0.0.1:1".into()
            )
        );
    } else {
        assert_eq!(
            outcome,
            ScenarioOutcome::Skipped("no broker at nowhere://127.0.0.1:1".into())
        );
    }
    assert_eq!(
        try_run(Scenario::TwoGroups, &Nowhere).await,
        ScenarioOutcome::NotApplicable(
            "two_groups_each_get_everything on nowhere: the backend does not claim consumer_groups"
                .into()
        )
    );
}

#[test]
fn every_scenario_has_a_distinct_test_name() {
    let mut names: Vec<&str> = Scenario::ALL.iter().map(|s| s.name()).collect();
    assert_eq!(names.len(), 24);
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 24);
    assert!(names.contains(&"concurrent_publishers_lose_nothing"));
}
