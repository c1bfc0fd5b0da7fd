//! The conformance suite catches broken backends, and says what they broke.
//!
//! Each test wraps the in-memory router in a connection with one deliberate fault (losing, duplicating
//! or reordering messages, dropping a header, lying about its capabilities, ...) and checks that the
//! scenario made to catch it fails with a message that counts the damage.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentcomm_core::MemoryRouter;
use agentcomm_core::channel::{ChannelPattern, ChannelTemplate};
use agentcomm_core::envelope::Envelope;
use agentcomm_core::error::{Error, Result};
use agentcomm_core::router::{
    Acknowledge, BoxFuture, Capabilities, Delivery, Distribution, Health, NackAction,
    PublishOutcome, Router, SharedRouter, SubscribeOptions, Subscription, SubscriptionCloser,
    SubscriptionControl,
};
use agentcomm_testkit::conformance::{ConformanceBackend, Scenario, ScenarioOutcome, try_run};
use agentcomm_testkit::memory::{MemoryBackend, MemoryConnection};
use agentcomm_testkit::require_brokers;
use futures::stream::BoxStream;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    /// Drops the header naming the conformance run.
    DropRunHeader,
    /// Keeps accepting publishes after close.
    PublishAfterClose,
    /// Reports other capabilities than declared.
    MisreportCapabilities,
    /// Says a publish is done at once and delivers it 50 ms later, unless the connection closed.
    ConfirmsTooEarly,
    /// An exact session matches every session that starts with it (a glob without escaping).
    PrefixSessions,
    /// Group members each get every message.
    FanOutGroups,
    /// `nack(Retry)` puts the original back (the attempt count does not grow, the delay is ignored).
    RetryAsRequeue,
    /// A closed subscription's stream never ends.
    EndlessStreams,
    /// Reads ahead into a buffer of 16, which a closing connection throws away with what it has not
    /// acknowledged.
    LoseBufferOnClose,
    /// An acknowledgement is not sent: the message comes back 100 ms later.
    AckIgnored,
    /// A delivery dropped unsettled is lost instead of handed back.
    AbandonLoses,
    /// Every retry is delivered twice (an at-least-once broker after a hiccup).
    DuplicateRetries,
    /// Every 4th numbered message of a group goes to each of its members, the rest to one.
    LeakyGroups,
    /// A group's patterns with a wildcard class see no class created after the group subscribed
    /// (in this scenario's memory bus: none at all).
    GroupsMissNewClasses,
    /// `nack(Retry)` publishes the message to its channel again, after the delay, and acknowledges
    /// the original: every subscription of the channel gets the retry.
    RetryToChannel,
    /// A fan-out subscription with several patterns delivers a message once per pattern that matches
    /// it (one broker subscription per pattern, as with Redis `PSUBSCRIBE`).
    CopyPerPattern,
    /// `nack(Retry)` waits only 60% of the delay asked for.
    ShortRetryDelay,
}

struct FaultyConnection {
    inner: MemoryConnection,
    bus: MemoryRouter,
    fault: Fault,
    capabilities: Capabilities,
    published: AtomicU64,
    held: Mutex<HashMap<String, Envelope>>,
    closed: Arc<AtomicBool>,
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
            Fault::DropRunHeader => {
                envelope.headers_mut().remove("conformance-run");
                self.inner.publish(envelope).await
            }
            Fault::PublishAfterClose => self.bus.publish(envelope).await,
            Fault::ConfirmsTooEarly => {
                let (bus, closed) = (self.bus.clone(), self.closed.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if !closed.load(Ordering::SeqCst) {
                        let _ = bus.publish(envelope).await;
                    }
                });
                Ok(PublishOutcome::Delivered(1))
            }
            _ => self.inner.publish(envelope).await,
        }
    }

    /// Subscribes with the subscribe-side faults; other faults get the bus's own subscription.
    async fn faulty_subscribe(&self, options: SubscribeOptions) -> Result<Subscription> {
        let mut asked = options.clone();
        if self.fault == Fault::LeakyGroups && options.distribution != Distribution::FanOut {
            let group = self.inner.subscribe(options.clone()).await?;
            let leak = self.inner.subscribe(options.clone().fan_out()).await?;
            let closers = vec![group.closer(), leak.closer()];
            let leaked = leak.filter_map(|delivery| {
                if seq_of(delivery.envelope()).is_some_and(|seq| seq % 4 == 0) {
                    futures::future::ready(Some(delivery))
                } else {
                    delivery.discard();
                    futures::future::ready(None)
                }
            });
            return Ok(Subscription::from_stream(
                futures::stream::select(group, leaked),
                Arc::new(Closers(closers)),
                &options,
            ));
        }
        if self.fault == Fault::CopyPerPattern
            && options.distribution == Distribution::FanOut
            && options.patterns.len() > 1
        {
            let mut streams = Vec::new();
            let mut closers = Vec::new();
            for pattern in &options.patterns {
                let one = self
                    .inner
                    .subscribe(SubscribeOptions::new(pattern.clone()))
                    .await?;
                closers.push(one.closer());
                streams.push(one);
            }
            return Ok(Subscription::from_stream(
                futures::stream::select_all(streams),
                Arc::new(Closers(closers)),
                &options,
            ));
        }
        if self.fault == Fault::GroupsMissNewClasses && options.distribution != Distribution::FanOut
        {
            let named: Vec<ChannelPattern> = options
                .patterns
                .iter()
                .filter(|pattern| pattern.class().is_some())
                .cloned()
                .collect();
            let subscription = self.inner.subscribe(options.clone()).await?;
            let closer = subscription.closer();
            let stream = subscription.filter_map(move |delivery| {
                let channel = delivery.envelope().channel();
                if named.iter().any(|pattern| pattern.matches(channel)) {
                    futures::future::ready(Some(delivery))
                } else {
                    // Taken from the group and never delivered: lost to every member.
                    let ack = delivery.ack();
                    tokio::spawn(ack);
                    futures::future::ready(None)
                }
            });
            return Ok(Subscription::from_stream(
                stream,
                Arc::new(Closer(closer)),
                &options,
            ));
        }
        match self.fault {
            Fault::FanOutGroups => asked = asked.fan_out(),
            Fault::PrefixSessions => {
                asked.patterns = options
                    .patterns
                    .iter()
                    .map(|pattern| {
                        ChannelPattern::with_template(
                            ChannelTemplate::DEFAULT,
                            pattern.class(),
                            pattern.direction(),
                            None,
                        )
                        .unwrap()
                    })
                    .collect();
            }
            Fault::RetryAsRequeue
            | Fault::EndlessStreams
            | Fault::LoseBufferOnClose
            | Fault::AckIgnored
            | Fault::AbandonLoses
            | Fault::DuplicateRetries
            | Fault::RetryToChannel
            | Fault::ShortRetryDelay => {}
            _ => return self.inner.subscribe(options).await,
        }
        let subscription = self.inner.subscribe(asked).await?;
        let closer = subscription.closer();
        let stream: BoxStream<'static, Delivery> = match self.fault {
            Fault::PrefixSessions => {
                let patterns = options.patterns.clone();
                subscription
                    .filter_map(move |delivery| {
                        let channel = delivery.envelope().channel();
                        let leaks = patterns.iter().any(|pattern| {
                            pattern.class().is_none_or(|c| c == channel.class())
                                && pattern.direction().is_none_or(|d| d == channel.direction())
                                && pattern
                                    .session()
                                    .is_none_or(|s| channel.session().starts_with(s))
                        });
                        if leaks {
                            futures::future::ready(Some(delivery))
                        } else {
                            delivery.discard();
                            futures::future::ready(None)
                        }
                    })
                    .boxed()
            }
            Fault::EndlessStreams => subscription.chain(futures::stream::pending()).boxed(),
            Fault::LoseBufferOnClose => {
                let (mut buffer, buffered) = futures::channel::mpsc::channel(16);
                tokio::spawn(async move {
                    let mut subscription = subscription;
                    while let Some(delivery) = subscription.next().await {
                        if buffer.send(delivery).await.is_err() {
                            break;
                        }
                    }
                });
                let closed = self.closed.clone();
                buffered
                    .filter_map(move |delivery: Delivery| {
                        if closed.load(Ordering::SeqCst) {
                            delivery.discard();
                            futures::future::ready(None)
                        } else {
                            futures::future::ready(Some(delivery))
                        }
                    })
                    .boxed()
            }
            _ => subscription.boxed(),
        };
        let (fault, closed, bus) = (self.fault, self.closed.clone(), self.bus.clone());
        let stream = stream.map(move |delivery| {
            let envelope = delivery.envelope().clone();
            let ack = FaultyAck {
                delivery,
                fault,
                closed: closed.clone(),
                bus: bus.clone(),
            };
            Delivery::new(envelope, Box::new(ack))
        });
        Ok(Subscription::from_stream(
            stream,
            Arc::new(Closer(closer)),
            &options,
        ))
    }
}

struct Closer(SubscriptionCloser);

struct Closers(Vec<SubscriptionCloser>);

impl SubscriptionControl for Closers {
    fn close(&self) -> BoxFuture<'static, Result<()>> {
        let closers = self.0.clone();
        Box::pin(async move {
            for closer in closers {
                closer.close().await?;
            }
            Ok(())
        })
    }
}

impl SubscriptionControl for Closer {
    fn close(&self) -> BoxFuture<'static, Result<()>> {
        let closer = self.0.clone();
        Box::pin(async move { closer.close().await })
    }
}

/// Settles a delivery of the bus with the settle-side faults.
struct FaultyAck {
    delivery: Delivery,
    fault: Fault,
    closed: Arc<AtomicBool>,
    bus: MemoryRouter,
}

impl Acknowledge for FaultyAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        let FaultyAck {
            delivery,
            fault,
            closed,
            ..
        } = *self;
        match fault {
            Fault::AckIgnored => {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    drop(delivery);
                });
                Box::pin(async { Ok(()) })
            }
            Fault::LoseBufferOnClose if closed.load(Ordering::SeqCst) => {
                delivery.discard();
                Box::pin(async {
                    Err(Error::Closed {
                        what: "this faulty connection",
                        hint: "it was closed",
                    })
                })
            }
            _ => Box::pin(delivery.ack()),
        }
    }

    fn nack(
        self: Box<Self>,
        envelope: Envelope,
        action: NackAction,
    ) -> BoxFuture<'static, Result<()>> {
        match (self.fault, action) {
            (Fault::RetryAsRequeue, NackAction::Retry { .. }) => {
                Box::pin(self.delivery.nack(NackAction::Requeue))
            }
            (Fault::DuplicateRetries, action @ NackAction::Retry { .. }) => Box::pin(async move {
                self.bus.publish(envelope).await?;
                self.delivery.nack(action).await
            }),
            (Fault::ShortRetryDelay, NackAction::Retry { delay }) => {
                Box::pin(self.delivery.nack(NackAction::Retry {
                    delay: delay * 6 / 10,
                }))
            }
            (Fault::RetryToChannel, NackAction::Retry { delay }) => Box::pin(async move {
                self.delivery.ack().await?;
                tokio::time::sleep(delay).await;
                self.bus.publish(envelope).await.map(|_| ())
            }),
            (_, action) => Box::pin(self.delivery.nack(action)),
        }
    }

    fn abandon(self: Box<Self>, _: Envelope) {
        if self.fault == Fault::AbandonLoses {
            self.delivery.discard();
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
        Box::pin(self.faulty_subscribe(options))
    }
    fn health(&self) -> BoxFuture<'_, Health> {
        self.inner.health()
    }
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        self.closed.store(true, Ordering::SeqCst);
        self.inner.close()
    }
}

struct FaultyBackend {
    memory: MemoryBackend,
    fault: Fault,
    declared: Capabilities,
    max_wait: Duration,
    settle: Duration,
    limit: Option<Duration>,
}

impl FaultyBackend {
    fn new(fault: Fault) -> Self {
        let memory = MemoryBackend::new();
        let declared = memory.declared_capabilities();
        FaultyBackend {
            memory,
            fault,
            declared,
            // Everything arrives at once in memory, but on a loaded 2-core machine (CI, with other test
            // binaries running) 1,000 messages of a scenario once took more than 1 s: what is missing
            // after 10 s is lost. A test that expects every message to be lost sets a shorter wait.
            max_wait: Duration::from_secs(10),
            // Nothing comes late in memory unless a fault makes it.
            settle: Duration::from_millis(100),
            limit: None,
        }
    }

    fn declaring(mut self, declared: Capabilities) -> Self {
        self.declared = declared;
        self
    }

    fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    fn settle_time(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    fn scenario_limit(mut self, limit: Duration) -> Self {
        self.limit = Some(limit);
        self
    }
}

impl ConformanceBackend for FaultyBackend {
    fn name(&self) -> &str {
        "faulty-memory"
    }
    fn max_wait(&self) -> Duration {
        self.max_wait
    }
    fn settle_time(&self) -> Duration {
        self.settle
    }
    fn scenario_limit(&self) -> Duration {
        self.limit.unwrap_or(Duration::from_secs(120))
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
            closed: Arc::default(),
        };
        Box::pin(async move { Some(Arc::new(connection) as SharedRouter) })
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

async fn failure_of(scenario: Scenario, backend: &impl ConformanceBackend) -> String {
    match try_run(scenario, backend).await {
        ScenarioOutcome::Failed(text) => text,
        other => panic!("{scenario} should have failed, got {other:?}"),
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

/// A backend whose first connection works and whose next `connect()` gives `None` (it allows one
/// connection, or its broker went away mid-scenario) fails: the broker was there, so this is not a
/// skip, and without `AGENTCOMM_REQUIRE_BROKERS=1` a skip passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_that_gives_none_after_one_succeeded_fails_instead_of_skipping() {
    struct OneConnection {
        memory: MemoryBackend,
        made: AtomicU64,
    }
    impl ConformanceBackend for OneConnection {
        fn name(&self) -> &str {
            "one-connection"
        }
        fn declared_capabilities(&self) -> Capabilities {
            self.memory.declared_capabilities()
        }
        fn connect(&self) -> BoxFuture<'_, Option<SharedRouter>> {
            if self.made.fetch_add(1, Ordering::SeqCst) == 0 {
                self.memory.connect()
            } else {
                Box::pin(async { None })
            }
        }
    }
    let backend = OneConnection {
        memory: MemoryBackend::new(),
        made: AtomicU64::new(0),
    };
    let text = failure_of(Scenario::ConcurrentPublishers, &backend).await;
    assert_eq!(
        text,
        "connect() gave None after an earlier connect() of this scenario had succeeded: the broker was \
         reachable, so this is a failure, not a skip (a backend that allows one connection only, or a broker \
         that went away mid-scenario)"
    );
}

#[test]
fn every_scenario_has_a_distinct_test_name() {
    let mut names: Vec<&str> = Scenario::ALL.iter().map(|s| s.name()).collect();
    assert_eq!(names.len(), 28);
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 28);
    assert!(names.contains(&"concurrent_publishers_lose_nothing"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_drops_the_run_header_is_told_so_not_only_that_messages_were_lost() {
    let backend = FaultyBackend::new(Fault::DropRunHeader).max_wait(Duration::from_millis(500));
    let text = failure(Scenario::BatchPublish, &backend).await;
    assert!(
        text.starts_with("the subscriber: lost 500 of 500 (first lost: publisher 0 seq 0), duplicated 0, reordered 0 within "),
        "{text}"
    );
    assert!(
        text.ends_with(
            ", and 500 deliveries without this run's conformance-run/conformance-stream/conformance-seq headers \
             (headers dropped or changed by the backend, or another run's messages leaking in)"
        ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_resolves_before_the_broker_has_the_message_fails_the_confirms_scenario() {
    let text = failure(
        Scenario::PublishConfirms,
        &FaultyBackend::new(Fault::ConfirmsTooEarly).max_wait(Duration::from_millis(500)),
    )
    .await;
    assert!(
        text.starts_with("the subscriber: lost 20 of 20 (first lost: check 0 seq 0)"),
        "{text}"
    );
    assert!(
        text.ends_with("(every one of these publishes had resolved Ok: the broker had them)"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistence_claimed_without_groups_fails_the_persistence_scenarios() {
    let claims = Capabilities::none().persistent(true).redelivery(true);
    for scenario in [
        Scenario::PersistentWithoutConsumer,
        Scenario::CloseWhileInFlight,
    ] {
        let backend = FaultyBackend::new(Fault::MisreportCapabilities).declaring(claims);
        // The connection must report what is declared; MisreportCapabilities only drops
        // no_duplicates, which these claims do not have.
        let text = failure(scenario, &backend).await;
        assert!(
            text.starts_with("the backend claims persistent but not consumer_groups: "),
            "{scenario}: {text}"
        );
    }
}

/// A handler that fails an attempt of a message twice (a duplicate delivery) is fine for an
/// at-least-once backend: it must be tried at least max_attempts times, not exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_attempts_fail_the_dead_letter_scenario_only_where_no_duplicates_is_claimed() {
    let text = failure(
        Scenario::DeadLetterAfterMaxAttempts,
        &FaultyBackend::new(Fault::DuplicateRetries),
    )
    .await;
    assert!(
        text.starts_with("dead letters: lost 0 of 5, duplicated 15 (first duplicate: work 0 seq "),
        "{text}"
    );
    assert!(
        text.contains("message 0 was handled 7 time(s), expected exactly 3 (max_attempts)"),
        "{text}"
    );
    let at_least_once = MemoryBackend::new()
        .declared_capabilities()
        .no_duplicates(false);
    let backend = FaultyBackend::new(Fault::DuplicateRetries).declaring(at_least_once);
    match try_run(Scenario::DeadLetterAfterMaxAttempts, &backend).await {
        ScenarioOutcome::Passed { summary, .. } => {
            assert!(summary.contains("lost 0 of 5, duplicated 15"), "{summary}")
        }
        other => panic!("an at-least-once backend may deliver an attempt twice: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_that_leaks_look_alike_sessions_fails_isolation() {
    let text = failure(
        Scenario::Isolation,
        &FaultyBackend::new(Fault::PrefixSessions),
    )
    .await;
    assert!(text.starts_with("the exact subscription on "), "{text}");
    assert!(
        text.contains(": lost 0 of 3, duplicated 0, reordered 0, unexpected 3 (first unexpected: channel 2 seq 0)"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_fans_out_fails_even_where_duplicates_are_allowed() {
    let at_least_once = MemoryBackend::new()
        .declared_capabilities()
        .no_duplicates(false);
    let backend = FaultyBackend::new(Fault::FanOutGroups).declaring(at_least_once);
    let text = failure(Scenario::GroupSplitsWork, &backend).await;
    assert!(
        text.starts_with("300 of 300 messages went to more than one member of group workers_"),
        "{text}"
    );
    assert!(
        text.ends_with(
            ": a group gives each message to one of its members, not to each (that is fan-out)"
        ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_comes_back_as_the_original_fails_nack_redelivery() {
    let text = failure(
        Scenario::NackRedelivery,
        &FaultyBackend::new(Fault::RetryAsRequeue),
    )
    .await;
    assert!(
        text.starts_with(
            "message 0: nack(Retry { delay: 0 }) of attempt 1 came back as attempt 1, expected 2 (deliver the \
             envelope given with the nack: the runtime counts attempts with it)"
        ),
        "{text}"
    );
    assert!(
        text.contains("message 3 came back ")
            && text.contains("after nack(Retry { delay: 300ms }): the delay was not respected"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_subscription_whose_stream_never_ends_fails_the_resubscribe_loops() {
    let text = failure(
        Scenario::ResubscribeLoops,
        &FaultyBackend::new(Fault::EndlessStreams).max_wait(Duration::from_millis(300)),
    )
    .await;
    assert_eq!(
        text,
        "round 0: the subscription's stream did not end within 300ms after close(); round 1: the subscription's \
         stream did not end within 300ms after close(); round 2: the subscription's stream did not end within \
         300ms after close() (the scenario stopped after 3 of 20 rounds)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_closing_connection_throws_away_its_buffer_fails_close_while_in_flight() {
    let durable = MemoryBackend::new()
        .declared_capabilities()
        .persistent(true);
    let backend = FaultyBackend::new(Fault::LoseBufferOnClose).declaring(durable);
    let text = failure(Scenario::CloseWhileInFlight, &backend).await;
    assert!(text.starts_with("group inflight_"), "{text}");
    assert!(
        text.contains(": lost ") && !text.contains(": lost 0 of"),
        "{text}"
    );
    assert!(
        text.contains("by the member whose connection closed, the rest by the next"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ignored_acknowledgement_fails_graceful_shutdown_when_the_settle_time_covers_it() {
    // The message comes back 100 ms after its acknowledgement: listening 300 ms catches it.
    let backend = FaultyBackend::new(Fault::AckIgnored).settle_time(Duration::from_millis(300));
    let text = failure(Scenario::GracefulShutdown, &backend).await;
    assert!(
        text.contains(
            "were delivered again after the stopped agent handled them: they were not acknowledged"
        ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_stopping_agent_gives_back_must_come_back() {
    let text = failure(
        Scenario::GracefulShutdown,
        &FaultyBackend::new(Fault::AbandonLoses).max_wait(Duration::from_millis(500)),
    )
    .await;
    assert!(
        text.contains(
            " messages the stopped instances did not handle never reached the next instance within 500ms"
        ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scenario_out_of_time_says_what_it_was_doing_and_what_had_arrived() {
    let backend = FaultyBackend::new(Fault::LoseEveryHundredth)
        .max_wait(Duration::from_secs(10))
        .scenario_limit(Duration::from_secs(1));
    let text = failure(Scenario::EnvelopeFields, &backend).await;
    assert!(
        text.starts_with(
            "the scenario did not finish within 1s (ConformanceBackend::scenario_limit) while waiting for the \
             published messages to arrive (for "
        ),
        "{text}"
    );
    assert!(
        text.ends_with(
            "; received so far: the subscriber: 99 distinct of 99 deliveries, 99 acknowledged"
        ),
        "{text}"
    );
}

// ----- publish confirms through the fault proxy --------------------------------------------------

/// A broker stand-in on loopback: it reads frames (a 4-byte length, then `Envelope::to_frame`),
/// publishes each to the bus, and answers each with one byte.
async fn frame_broker(bus: MemoryRouter) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let bus = bus.clone();
            tokio::spawn(async move {
                loop {
                    let mut length = [0u8; 4];
                    if stream.read_exact(&mut length).await.is_err() {
                        return;
                    }
                    let mut frame = vec![0; u32::from_be_bytes(length) as usize];
                    if stream.read_exact(&mut frame).await.is_err() {
                        return;
                    }
                    if let Ok(envelope) = Envelope::from_frame(&frame) {
                        let _ = bus.publish(envelope).await;
                    }
                    if stream.write_all(&[1]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    address
}

/// Publishes to the stand-in over TCP, subscribes on the bus. With `confirms` a publish waits for
/// the stand-in's answer; without, it resolves once its bytes are written.
struct TcpPublisher {
    stream: tokio::sync::Mutex<tokio::net::TcpStream>,
    bus: MemoryConnection,
    confirms: bool,
}

impl TcpPublisher {
    async fn send(&self, envelope: Envelope) -> Result<PublishOutcome> {
        let fail = |error: std::io::Error| Error::Backend {
            backend: "tcp-memory",
            message: error.to_string(),
        };
        let frame = envelope.to_frame()?;
        let mut stream = self.stream.lock().await;
        stream
            .write_all(&(frame.len() as u32).to_be_bytes())
            .await
            .map_err(fail)?;
        stream.write_all(&frame).await.map_err(fail)?;
        if self.confirms {
            let mut answer = [0u8; 1];
            stream.read_exact(&mut answer).await.map_err(fail)?;
        }
        Ok(PublishOutcome::Accepted)
    }
}

impl Router for TcpPublisher {
    fn backend(&self) -> &str {
        "tcp-memory"
    }
    fn capabilities(&self) -> Capabilities {
        MemoryBackend::new().declared_capabilities()
    }
    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, Result<PublishOutcome>> {
        Box::pin(self.send(envelope))
    }
    fn subscribe(&self, options: SubscribeOptions) -> BoxFuture<'_, Result<Subscription>> {
        self.bus.subscribe(options)
    }
    fn health(&self) -> BoxFuture<'_, Health> {
        self.bus.health()
    }
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        self.bus.close()
    }
}

struct TcpBackend {
    bus: MemoryRouter,
    broker: SocketAddr,
    confirms: bool,
}

impl TcpBackend {
    async fn new(confirms: bool) -> Self {
        let bus = MemoryRouter::new();
        let broker = frame_broker(bus.clone()).await;
        TcpBackend {
            bus,
            broker,
            confirms,
        }
    }
}

impl ConformanceBackend for TcpBackend {
    fn name(&self) -> &str {
        "tcp-memory"
    }
    fn max_wait(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn declared_capabilities(&self) -> Capabilities {
        MemoryBackend::new().declared_capabilities()
    }
    fn connect(&self) -> BoxFuture<'_, Option<SharedRouter>> {
        self.connect_through(self.broker)
    }
    fn broker_address(&self) -> Option<SocketAddr> {
        Some(self.broker)
    }
    fn connect_through(&self, address: SocketAddr) -> BoxFuture<'_, Option<SharedRouter>> {
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(address).await.ok()?;
            Some(Arc::new(TcpPublisher {
                stream: tokio::sync::Mutex::new(stream),
                bus: MemoryConnection::new(self.bus.clone()),
                confirms: self.confirms,
            }) as SharedRouter)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_does_not_wait_for_the_broker_is_caught_through_the_proxy() {
    let (lying, waiting) = (TcpBackend::new(false).await, TcpBackend::new(true).await);
    let (text, outcome) = tokio::join!(
        failure_of(Scenario::PublishConfirms, &lying),
        try_run(Scenario::PublishConfirms, &waiting)
    );
    // Its publishes resolve before their bytes left the machine: holding the bytes back does not stop
    // one from resolving. (Cutting the connection right after a publish may lose it too, or not,
    // depending on whether the proxy had forwarded it yet.)
    assert!(
        text.contains(
            "a publish resolved Ok(Accepted) while the fault proxy held back every byte between the connection \
             and the broker: it did not wait for the broker (the backend claims publish_confirms)"
        ),
        "{text}"
    );
    match outcome {
        ScenarioOutcome::Passed { summary, .. } => assert!(
            summary.contains(
                "through the fault proxy, a message whose publish resolved arrived although the connection was \
                 cut at once, and a publish whose bytes were held back had not resolved after 500ms"
            ),
            "{summary}"
        ),
        other => panic!("a backend that waits for the broker passes: {other:?}"),
    }
}

/// An at-least-once backend may deliver a message again after a failure, but nothing fails in the
/// group scenarios: a group that hands a quarter of the messages to every member must fail them,
/// although it hands most messages to one member and does not claim no_duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_hands_some_messages_to_every_member_fails_where_duplicates_are_allowed() {
    let at_least_once = MemoryBackend::new()
        .declared_capabilities()
        .no_duplicates(false);
    let backend = FaultyBackend::new(Fault::LeakyGroups).declaring(at_least_once);
    let text = failure(Scenario::GroupSplitsWork, &backend).await;
    assert!(
        text.starts_with("80 of 300 messages went to more than one member of group workers_"),
        "{text}"
    );
    let text = failure(Scenario::TwoGroups, &backend).await;
    assert!(
        text.starts_with("group first_") && text.contains(": lost 0 of 200, duplicated 100"),
        "{text}"
    );
    assert!(
        text.contains("a group hands each message to one member once when nothing fails"),
        "{text}"
    );
}

/// "An acknowledged one does not come back" holds for at-least-once backends too: an ack that is
/// not carried out fails the redelivery scenario although the backend does not claim no_duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ignored_acknowledgement_fails_nack_redelivery_where_duplicates_are_allowed() {
    let at_least_once = MemoryBackend::new()
        .declared_capabilities()
        .no_duplicates(false);
    let backend = FaultyBackend::new(Fault::AckIgnored).declaring(at_least_once);
    let text = failure(Scenario::NackRedelivery, &backend).await;
    assert!(
        text.starts_with(
            "messages [4, 9, 14] were acknowledged on their first delivery and came back within "
        ),
        "{text}"
    );
}

/// A subscription whose patterns overlap gets a message they both match once, on an at-least-once
/// backend too: nothing failed that could make it come twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_delivered_once_per_matching_pattern_fails_pattern_subscriptions() {
    let at_least_once = MemoryBackend::new()
        .declared_capabilities()
        .no_duplicates(false);
    let backend = FaultyBackend::new(Fault::CopyPerPattern).declaring(at_least_once);
    let text = failure(Scenario::PatternSubscriptions, &backend).await;
    assert!(text.starts_with("subscription "), "{text}");
    assert!(
        text.contains(
            ": lost 0 of 12, duplicated 3 (first duplicate: channel 0 seq 0), reordered "
        ) && text.contains(
            ": a subscription gets each message it matches once, also one that several of its \
                 patterns match"
        ),
        "{text}"
    );
}

/// A retry that comes back well before its delay fails nack_redelivery, not only one that ignores
/// the delay altogether.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_waits_only_part_of_its_delay_fails_nack_redelivery() {
    let text = failure(
        Scenario::NackRedelivery,
        &FaultyBackend::new(Fault::ShortRetryDelay),
    )
    .await;
    assert!(text.starts_with("message 3 came back 18"), "{text}");
    assert!(
        text.contains("after nack(Retry { delay: 300ms }): the delay was not respected"),
        "{text}"
    );
}

/// A retry published to the channel again reaches the channel's other subscriptions, which did not
/// ask for it: that fails nack_redelivery on an at-least-once backend too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_reaches_every_subscription_of_the_channel_fails_nack_redelivery() {
    let at_least_once = MemoryBackend::new()
        .declared_capabilities()
        .no_duplicates(false);
    let backend = FaultyBackend::new(Fault::RetryToChannel).declaring(at_least_once);
    let text = failure(Scenario::NackRedelivery, &backend).await;
    assert!(
        text.starts_with(
            "a fan-out subscriber of the same channel: lost 0 of 15, duplicated 6 (first duplicate: publisher 0 \
             seq 0), reordered 0 within "
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "what another subscription gave back came to this one too (a redelivery goes to the subscription \
             that gave the message back, not to every subscription of the channel); another group (nack_other_"
        ),
        "{text}"
    );
}

/// Acknowledgements that resolve Ok and are not carried out fail close_while_in_flight on a
/// persistent at-least-once backend too: the acknowledged messages come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_that_come_back_fail_close_while_in_flight_where_duplicates_are_allowed()
 {
    let durable_at_least_once = MemoryBackend::new()
        .declared_capabilities()
        .persistent(true)
        .no_duplicates(false);
    let backend = FaultyBackend::new(Fault::AckIgnored).declaring(durable_at_least_once);
    let text = failure(Scenario::CloseWhileInFlight, &backend).await;
    assert!(
        text.contains(
            " messages the member whose connection closed had acknowledged were delivered again"
        ),
        "{text}"
    );
}

/// A group whose wildcard-class patterns miss classes created after it subscribed fails the
/// pattern scenario.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_misses_new_classes_fails_pattern_subscriptions() {
    let backend = FaultyBackend::new(Fault::GroupsMissNewClasses);
    let text = failure(Scenario::PatternSubscriptions, &backend).await;
    assert!(
        text.starts_with("group patterns0_") && text.contains(": lost 12 of 12"),
        "{text}"
    );
    assert!(text.contains("; group patterns1_"), "{text}");
}
