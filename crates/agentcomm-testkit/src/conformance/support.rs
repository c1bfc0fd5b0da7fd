//! What the scenarios share: the run context (connections, unique names, sizes), numbered messages,
//! and sinks that collect deliveries from several subscriptions.

use std::collections::HashSet;
use std::fmt::{Display, Write as _};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentcomm_core::channel::Channel;
use agentcomm_core::codec::BINARY_CONTENT_TYPE;
use agentcomm_core::envelope::Envelope;
use agentcomm_core::router::{Capabilities, SharedRouter, Subscription};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::ConformanceBackend;
use crate::tally::{Key, Tally, TallyReport};

/// Header naming the run a conformance message belongs to.
pub const RUN_HEADER: &str = "conformance-run";
/// Header with the stream (publisher, session, channel) of a numbered message.
pub const STREAM_HEADER: &str = "conformance-stream";
/// Header with the sequence number of a numbered message.
pub const SEQ_HEADER: &str = "conformance-seq";

/// Why a scenario did not pass.
#[derive(Debug)]
pub enum Failure {
    /// `connect()` gave `None`.
    Unreachable,
    /// Found out while running (e.g. the backend cannot inject raw frames).
    NotApplicable(String),
    /// A broken guarantee, explained.
    Failed(String),
}

pub type Outcome<T = String> = Result<T, Failure>;

/// Fails the scenario with a formatted explanation.
macro_rules! fail {
    ($($arg:tt)*) => {
        return Err($crate::conformance::support::Failure::Failed(format!($($arg)*)))
    };
}
pub(crate) use fail;

/// Adds what the scenario was doing to a backend error.
pub trait During<T> {
    fn during(self, what: impl Display) -> Outcome<T>;
}

impl<T, E: Display> During<T> for Result<T, E> {
    fn during(self, what: impl Display) -> Outcome<T> {
        self.map_err(|error| Failure::Failed(format!("{what} failed: {error}")))
    }
}

/// One scenario run: its connections, unique names and sizes, and what it is doing (for a failure
/// that has to say where a scenario got stuck).
pub struct Context<'a> {
    backend: Box<dyn ConformanceBackendDyn + 'a>,
    pub capabilities: Capabilities,
    pub run: String,
    pub soak: usize,
    /// The bound on each wait for messages.
    pub wait: Duration,
    /// How long to listen after the expected messages arrived, for late duplicates and leaks.
    pub settle: Duration,
    connections: Mutex<Vec<SharedRouter>>,
    phase: Mutex<(String, Instant)>,
    sinks: Mutex<Vec<(String, Arc<Sink>)>>,
}

/// Object-safe view of a backend whatever its type (`?Sized` ones included).
pub trait ConformanceBackendDyn: Send + Sync {
    fn connect_dyn(&self) -> agentcomm_core::router::BoxFuture<'_, Option<SharedRouter>>;
    fn publish_raw_dyn(
        &self,
        channel: &Channel,
        frame: Vec<u8>,
    ) -> agentcomm_core::router::BoxFuture<'_, agentcomm_core::Result<bool>>;
    fn broker_address_dyn(&self) -> Option<std::net::SocketAddr>;
    fn connect_through_dyn(
        &self,
        address: std::net::SocketAddr,
    ) -> agentcomm_core::router::BoxFuture<'_, Option<SharedRouter>>;
}

/// A reference to a backend of any type, `dyn` ones included.
struct BackendRef<'a, B: ?Sized>(&'a B);

impl<B: ConformanceBackend + ?Sized> ConformanceBackendDyn for BackendRef<'_, B> {
    fn connect_dyn(&self) -> agentcomm_core::router::BoxFuture<'_, Option<SharedRouter>> {
        self.0.connect()
    }
    fn publish_raw_dyn(
        &self,
        channel: &Channel,
        frame: Vec<u8>,
    ) -> agentcomm_core::router::BoxFuture<'_, agentcomm_core::Result<bool>> {
        self.0.publish_raw(channel, frame)
    }
    fn broker_address_dyn(&self) -> Option<std::net::SocketAddr> {
        self.0.broker_address()
    }
    fn connect_through_dyn(
        &self,
        address: std::net::SocketAddr,
    ) -> agentcomm_core::router::BoxFuture<'_, Option<SharedRouter>> {
        self.0.connect_through(address)
    }
}

impl<'a> Context<'a> {
    pub fn new<B: ConformanceBackend + ?Sized>(
        backend: &'a B,
        capabilities: Capabilities,
        soak: usize,
    ) -> Self {
        let id = uuid::Uuid::now_v7().simple().to_string();
        Context {
            backend: Box::new(BackendRef(backend)),
            capabilities,
            // The tail of a v7 UUID is random.
            run: id[id.len() - 12..].to_string(),
            soak,
            wait: backend.max_wait() * soak as u32,
            settle: backend.settle_time() * soak as u32,
            connections: Mutex::new(Vec::new()),
            phase: Mutex::new(("starting".into(), Instant::now())),
            sinks: Mutex::new(Vec::new()),
        }
    }

    /// Notes what the scenario does now, for the failure of a scenario that runs out of time.
    pub fn phase(&self, what: impl Into<String>) {
        *self.phase.lock().expect("context lock") = (what.into(), Instant::now());
    }

    /// A sink for this run's messages, named in the progress report.
    pub fn sink(&self, label: impl Into<String>) -> Arc<Sink> {
        let sink = Sink::new(&self.run);
        self.sinks
            .lock()
            .expect("context lock")
            .push((label.into(), sink.clone()));
        sink
    }

    /// Where the scenario is: its phase and what each sink has received.
    pub fn progress(&self) -> String {
        let (phase, since) = self.phase.lock().expect("context lock").clone();
        let mut text = format!("while {phase} (for {:.1?})", since.elapsed());
        let sinks = self.sinks.lock().expect("context lock");
        if !sinks.is_empty() {
            let counts: Vec<String> = sinks
                .iter()
                .map(|(label, sink)| {
                    let mut count = format!(
                        "{label}: {} distinct of {} deliveries, {} acknowledged",
                        sink.distinct(),
                        sink.deliveries(),
                        sink.acked()
                    );
                    if sink.foreign() > 0 {
                        let _ = write!(count, ", {} foreign", sink.foreign());
                    }
                    count
                })
                .collect();
            let _ = write!(text, "; received so far: {}", counts.join("; "));
        }
        text
    }

    /// The broker's address and a connection through `address` instead, when the backend offers
    /// both (see [`ConformanceBackend::connect_through`]).
    pub fn broker_address(&self) -> Option<std::net::SocketAddr> {
        self.backend.broker_address_dyn()
    }

    /// A new connection through `address`, checked like [`connect`](Self::connect); `None` when
    /// the backend cannot connect through another address.
    pub async fn connect_through(
        &self,
        address: std::net::SocketAddr,
    ) -> Outcome<Option<SharedRouter>> {
        let connection = bounded(
            self.wait,
            "connect_through()",
            self.backend.connect_through_dyn(address),
        )
        .await?;
        let Some(connection) = connection else {
            return Ok(None);
        };
        self.connections
            .lock()
            .expect("context lock")
            .push(connection.clone());
        self.check_capabilities(&connection)?;
        Ok(Some(connection))
    }

    fn check_capabilities(&self, connection: &SharedRouter) -> Outcome<()> {
        let reported = connection.capabilities();
        if reported != self.capabilities {
            fail!(
                "the backend declares {} but its connection reports {}: make declared_capabilities() and \
                 Router::capabilities() agree",
                describe_capabilities(&self.capabilities),
                describe_capabilities(&reported)
            );
        }
        Ok(())
    }

    /// A window of one `wait` starting now, shared by several waits that overlap (sinks filled at
    /// the same time), so that together they wait no longer than one.
    pub fn window(&self) -> Window {
        self.phase("waiting for the published messages to arrive");
        Window {
            started: Instant::now(),
            deadline: Instant::now() + self.wait,
        }
    }

    /// A new connection, checked to report the declared capabilities; closed when the scenario ends.
    /// `None` from the backend skips the scenario only while it has no connection yet: once one
    /// worked, the broker was there, and a skip would pass what may be a backend that allows one
    /// connection only.
    pub async fn connect(&self) -> Outcome<SharedRouter> {
        self.phase("connecting");
        let connection = tokio::time::timeout(self.wait, self.backend.connect_dyn())
            .await
            .map_err(|_| {
                Failure::Failed(format!("connect() did not finish within {:?}", self.wait))
            })?;
        let Some(connection) = connection else {
            if self.connections.lock().expect("context lock").is_empty() {
                return Err(Failure::Unreachable);
            }
            fail!(
                "connect() gave None after an earlier connect() of this scenario had succeeded: the broker was \
                 reachable, so this is a failure, not a skip (a backend that allows one connection only, or a \
                 broker that went away mid-scenario)"
            );
        };
        self.connections
            .lock()
            .expect("context lock")
            .push(connection.clone());
        self.check_capabilities(&connection)?;
        Ok(connection)
    }

    pub async fn publish_raw(&self, channel: &Channel, frame: Vec<u8>) -> Outcome<bool> {
        bounded(
            self.wait,
            "publish_raw",
            self.backend.publish_raw_dyn(channel, frame),
        )
        .await?
        .during("publish_raw")
    }

    /// Closes every connection the scenario opened (bounded; errors are logged, the close scenario
    /// checks them itself).
    pub async fn close_all(&self) {
        let connections = std::mem::take(&mut *self.connections.lock().expect("context lock"));
        for connection in connections {
            match tokio::time::timeout(Duration::from_secs(10), connection.close()).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::debug!(error = %error, "closing a conformance connection failed")
                }
                Err(_) => tracing::warn!("closing a conformance connection took more than 10 s"),
            }
        }
    }

    /// A name unique to this run: `label_<run>` (sessions, directions, groups).
    pub fn unique(&self, label: &str) -> String {
        format!("{label}_{}", self.run)
    }

    /// A message class unique to this run.
    pub fn class(&self, label: &str) -> String {
        format!("Conformance{label}_{}", self.run)
    }

    /// A size times the soak factor.
    pub fn size(&self, size: usize) -> usize {
        size * self.soak
    }

    /// A channel from components the scenario made (always valid).
    pub fn channel(&self, class: &str, direction: &str, session: &str) -> Outcome<Channel> {
        Channel::new(class, direction, session).during(format!(
            "building the channel {class}:{direction}:{session}"
        ))
    }

    /// A numbered message of this run on `channel`.
    pub fn numbered(&self, channel: &Channel, stream: u32, seq: u64) -> Envelope {
        Envelope::new(
            channel.clone(),
            BINARY_CONTENT_TYPE,
            format!("{stream}/{seq}").into_bytes(),
        )
        .with_header(RUN_HEADER, self.run.clone())
        .with_header(STREAM_HEADER, stream.to_string())
        .with_header(SEQ_HEADER, seq.to_string())
    }

    /// Whether a claimed duplicate is a failure.
    pub fn duplicates_fail(&self) -> bool {
        self.capabilities.no_duplicates
    }

    /// Judges a tally: lost and unexpected messages always fail, and so do `foreign` deliveries
    /// (without this run's headers: another run's messages leaking in, or a backend that drops
    /// headers); duplicates where `no_duplicates` is claimed; reordering where `ordered_per_channel`
    /// is claimed and `order_matters`.
    pub fn judge(
        &self,
        who: &str,
        report: &TallyReport,
        foreign: usize,
        waited: Duration,
        order_matters: bool,
    ) -> Option<String> {
        let duplicates = self.capabilities.no_duplicates && report.duplicated() > 0;
        let reordered =
            order_matters && self.capabilities.ordered_per_channel && report.reordered() > 0;
        if report.lost() > 0 || report.unexpected() > 0 || foreign > 0 || duplicates || reordered {
            let mut text = format!("{who}: {report} within {waited:.1?}");
            if foreign > 0 {
                let _ = write!(
                    text,
                    ", and {foreign} deliveries without this run's {RUN_HEADER}/{STREAM_HEADER}/{SEQ_HEADER} \
                     headers (headers dropped or changed by the backend, or another run's messages leaking in)"
                );
            }
            if duplicates {
                text.push_str(" (the backend claims no_duplicates)");
            }
            if reordered {
                text.push_str(" (the backend claims ordered_per_channel)");
            }
            if report.unexpected() > 0 {
                text.push_str(" (unexpected = a message this subscription should never have had)");
            }
            Some(text)
        } else {
            None
        }
    }
}

/// See [`Context::window`].
pub struct Window {
    started: Instant,
    deadline: Instant,
}

impl Window {
    /// What is left of the window.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// How long since the window opened.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

pub fn describe_capabilities(capabilities: &Capabilities) -> String {
    let c = capabilities;
    let claimed: Vec<&str> = [
        (c.persistent, "persistent"),
        (c.ordered_per_channel, "ordered_per_channel"),
        (c.consumer_groups, "consumer_groups"),
        (c.redelivery, "redelivery"),
        (c.publish_confirms, "publish_confirms"),
        (c.reports_unroutable, "reports_unroutable"),
        (c.no_duplicates, "no_duplicates"),
    ]
    .into_iter()
    .filter_map(|(yes, name)| yes.then_some(name))
    .collect();
    if claimed.is_empty() {
        "no capabilities".into()
    } else {
        format!("[{}]", claimed.join(", "))
    }
}

/// Awaits `future` at most `limit`.
pub async fn bounded<T>(
    limit: Duration,
    what: impl Display,
    future: impl std::future::Future<Output = T>,
) -> Outcome<T> {
    tokio::time::timeout(limit, future)
        .await
        .map_err(|_| Failure::Failed(format!("{what} did not finish within {limit:?}")))
}

/// The key of a numbered message of run `run`.
pub fn key_of(envelope: &Envelope, run: &str) -> Option<Key> {
    if envelope.header(RUN_HEADER) != Some(run) {
        return None;
    }
    let stream = envelope.header(STREAM_HEADER)?.parse().ok()?;
    let seq = envelope.header(SEQ_HEADER)?.parse().ok()?;
    Some((stream, seq))
}

/// Fails joined explanations, if any.
pub fn failures(problems: Vec<String>) -> Outcome<()> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Failure::Failed(problems.join("; ")))
    }
}

/// One delivery a sink collected.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// Which feeder (subscription) it came through.
    pub member: usize,
    pub key: Key,
    pub envelope: Envelope,
    pub acked: bool,
}

#[derive(Default)]
struct SinkState {
    arrivals: Vec<Arrival>,
    distinct: HashSet<Key>,
    acked: HashSet<Key>,
    /// When the last delivery arrived (or the sink was made).
    last_activity: Option<Instant>,
}

/// Collects the numbered messages of one run from any number of subscriptions.
pub struct Sink {
    run: String,
    state: Mutex<SinkState>,
    changed: watch::Sender<u64>,
    /// Deliveries without this run's headers: another run's message, or headers dropped.
    pub foreign: AtomicUsize,
    pub ack_failures: AtomicUsize,
}

/// How a feeder settles what it receives.
#[derive(Debug, Clone, Copy)]
pub enum Settle {
    /// Acknowledge at once.
    Ack,
    /// Wait this long (a handler's work), then acknowledge.
    AckAfter(Duration),
}

impl Sink {
    pub fn new(run: &str) -> Arc<Self> {
        Arc::new(Sink {
            run: run.to_string(),
            state: Mutex::new(SinkState {
                last_activity: Some(Instant::now()),
                ..SinkState::default()
            }),
            changed: watch::Sender::new(0),
            foreign: AtomicUsize::new(0),
            ack_failures: AtomicUsize::new(0),
        })
    }

    fn push(&self, arrival: Arrival) {
        let mut state = self.state.lock().expect("sink lock");
        state.distinct.insert(arrival.key);
        if arrival.acked {
            state.acked.insert(arrival.key);
        }
        state.arrivals.push(arrival);
        state.last_activity = Some(Instant::now());
        drop(state);
        self.changed.send_modify(|version| *version += 1);
    }

    /// A delivery without this run's headers: counted, and activity for [`settle`](Self::settle).
    fn foreign_arrived(&self) {
        self.foreign.fetch_add(1, Ordering::Relaxed);
        self.state.lock().expect("sink lock").last_activity = Some(Instant::now());
        self.changed.send_modify(|version| *version += 1);
    }

    /// Waits until `condition` holds on the state, at most `limit`; returns whether it did and how
    /// long it waited.
    async fn wait_until(
        &self,
        limit: Duration,
        condition: impl Fn(&SinkState) -> bool,
    ) -> (bool, Duration) {
        let started = Instant::now();
        let deadline = started + limit;
        let mut changes = self.changed.subscribe();
        loop {
            changes.borrow_and_update();
            if condition(&self.state.lock().expect("sink lock")) {
                return (true, started.elapsed());
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return (false, started.elapsed()),
            }
        }
    }

    /// Waits until `count` distinct messages arrived.
    pub async fn wait_distinct(&self, count: usize, limit: Duration) -> (bool, Duration) {
        self.wait_until(limit, |state| state.distinct.len() >= count)
            .await
    }

    /// Waits until every one of `keys` arrived.
    pub async fn wait_keys(&self, keys: &[Key], limit: Duration) -> (bool, Duration) {
        self.wait_until(limit, |state| {
            keys.iter().all(|key| state.distinct.contains(key))
        })
        .await
    }

    /// Waits until `count` distinct messages were acknowledged.
    pub async fn wait_acked(&self, count: usize, limit: Duration) -> (bool, Duration) {
        self.wait_until(limit, |state| state.acked.len() >= count)
            .await
    }

    /// Waits until nothing has arrived for `quiet` (at most 5 × `quiet`): late duplicates and leaks
    /// show up here. Sinks judged one after the other do not each wait the full `quiet` again.
    pub async fn settle(&self, quiet: Duration) {
        let limit = Instant::now() + quiet * 5;
        loop {
            let last = self
                .state
                .lock()
                .expect("sink lock")
                .last_activity
                .unwrap_or_else(Instant::now);
            let quiet_from = last + quiet;
            if Instant::now() >= quiet_from || Instant::now() >= limit {
                return;
            }
            tokio::time::sleep_until(quiet_from.min(limit)).await;
        }
    }

    pub fn arrivals(&self) -> Vec<Arrival> {
        self.state.lock().expect("sink lock").arrivals.clone()
    }

    pub fn distinct(&self) -> usize {
        self.state.lock().expect("sink lock").distinct.len()
    }

    /// Every delivery of this run's messages, duplicates included.
    pub fn deliveries(&self) -> usize {
        self.state.lock().expect("sink lock").arrivals.len()
    }

    pub fn acked(&self) -> usize {
        self.state.lock().expect("sink lock").acked.len()
    }

    /// Deliveries without this run's headers.
    pub fn foreign(&self) -> usize {
        self.foreign.load(Ordering::Relaxed)
    }

    /// The keys that arrived through `member` (all members when `None`), in arrival order.
    pub fn keys(&self, member: Option<usize>) -> Vec<Key> {
        self.state
            .lock()
            .expect("sink lock")
            .arrivals
            .iter()
            .filter(|arrival| member.is_none_or(|m| arrival.member == m))
            .map(|arrival| arrival.key)
            .collect()
    }

    /// A tally of what arrived through `member` (or all) against `expected`.
    pub fn tally(&self, expected: &Tally, member: Option<usize>) -> TallyReport {
        let mut tally = expected.clone();
        tally.record_all(self.keys(member));
        tally.report()
    }
}

/// A task feeding one subscription's deliveries into a sink.
/// Dropping it stops the task, which drops (and so closes) the subscription.
pub struct Feeder {
    task: JoinHandle<()>,
}

impl Feeder {
    pub fn start(
        subscription: Subscription,
        sink: &Arc<Sink>,
        member: usize,
        settle: Settle,
    ) -> Self {
        let sink = sink.clone();
        let task = tokio::spawn(async move {
            let mut subscription = subscription;
            while let Some(delivery) = subscription.next().await {
                let envelope = delivery.envelope().clone();
                let Some(key) = key_of(&envelope, &sink.run) else {
                    sink.foreign_arrived();
                    let _ = delivery.ack().await;
                    continue;
                };
                if let Settle::AckAfter(pause) = settle {
                    tokio::time::sleep(pause).await;
                }
                let acked = match delivery.ack().await {
                    Ok(()) => true,
                    Err(_) => {
                        sink.ack_failures.fetch_add(1, Ordering::Relaxed);
                        false
                    }
                };
                sink.push(Arrival {
                    member,
                    key,
                    envelope,
                    acked,
                });
            }
        });
        Feeder { task }
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Deterministic bytes for payloads (xorshift), so a corrupted byte is noticed.
pub fn pattern_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes = Vec::with_capacity(len);
    while bytes.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}
