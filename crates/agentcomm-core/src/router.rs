//! The contract every backend implements: [`Router`].
//!
//! A backend author reads this file to learn what to build. The runtime, the testkit and users speak to
//! brokers only through these types.
//!
//! # The contract
//! - [`Router::publish`] resolves when the backend can say what became of the message: for a broker with
//!   publisher confirms, after the confirm; for Redis, after the command's reply. A publish that cannot be
//!   confirmed is an error, never silence. [`PublishOutcome::Unroutable`] reports a message that reached no
//!   subscriber and was not stored.
//! - [`Router::subscribe`] resolves when the subscription is live: every message published after that
//!   (and matching) reaches it, or, for a group, one of its members.
//! - A subscription delivers [`Delivery`] values. Each must be settled once with [`Delivery::ack`] or
//!   [`Delivery::nack`]. Dropping an unsettled delivery hands it back to the backend
//!   ([`Acknowledge::abandon`]): persistent backends redeliver it.
//! - Fan-out ([`Distribution::FanOut`]): every fan-out subscription whose pattern matches gets its own copy.
//!   Group ([`Distribution::Group`]): the subscriptions that share a group name share one queue; each message
//!   bound to it goes to one member. A group's patterns are the union of its members' patterns; two groups
//!   each get every message.
//! - A connection may drop and come back: the backend restores live subscriptions itself, and reports
//!   what it could not deliver in [`Health`] counters (`dropped`, `lagged`, `reconnects`, ...).
//! - [`Router::close`] stops every subscription (each one's stream ends after what it already buffered),
//!   waits for outstanding confirms, then disconnects. Operations after close fail with [`Error::Closed`].
//! - Capabilities ([`Capabilities`]) say honestly which guarantees hold; the conformance suite in
//!   `agentcomm-testkit` checks each one that is claimed.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;

use crate::channel::ChannelPattern;
use crate::envelope::Envelope;
use crate::error::{Error, Result};

/// A boxed, sendable future: what the object-safe router methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A future that is already `Ok(())`. Zero-sized, so boxing it does not allocate: for acknowledgements
/// that have nothing to send.
pub fn ready_ok() -> BoxFuture<'static, Result<()>> {
    struct ReadyOk;
    impl Future for ReadyOk {
        type Output = Result<()>;
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<()>> {
            Poll::Ready(Ok(()))
        }
    }
    Box::pin(ReadyOk)
}

/// A shared router, as the runtime holds it.
pub type SharedRouter = Arc<dyn Router>;

/// The guarantees a backend gives. Tests and users read them; the conformance suite checks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Capabilities {
    /// Messages survive with no consumer connected, and a restart of the consumer: they are delivered
    /// when a consumer (or a group member) subscribes later.
    pub persistent: bool,
    /// Messages on one channel reach one consumer in the order they were published (when nothing is
    /// retried).
    pub ordered_per_channel: bool,
    /// Named groups of competing consumers ([`Distribution::Group`]).
    pub consumer_groups: bool,
    /// A nacked or abandoned delivery is delivered again (at-least-once).
    pub redelivery: bool,
    /// Publish resolves only once the broker has the message (publisher confirms or a command reply).
    pub publish_confirms: bool,
    /// A message published with no matching subscriber is reported as [`PublishOutcome::Unroutable`].
    pub reports_unroutable: bool,
    /// Each message is delivered at most once to a successful handler, even across reconnects
    /// (no duplicates). Brokers with at-least-once delivery leave this `false`.
    pub no_duplicates: bool,
}

impl Capabilities {
    /// No guarantees at all; set the ones that hold with the builder methods.
    pub fn none() -> Self {
        Self::default()
    }

    /// Sets [`Capabilities::persistent`].
    pub fn persistent(mut self, yes: bool) -> Self {
        self.persistent = yes;
        self
    }

    /// Sets [`Capabilities::ordered_per_channel`].
    pub fn ordered_per_channel(mut self, yes: bool) -> Self {
        self.ordered_per_channel = yes;
        self
    }

    /// Sets [`Capabilities::consumer_groups`].
    pub fn consumer_groups(mut self, yes: bool) -> Self {
        self.consumer_groups = yes;
        self
    }

    /// Sets [`Capabilities::redelivery`].
    pub fn redelivery(mut self, yes: bool) -> Self {
        self.redelivery = yes;
        self
    }

    /// Sets [`Capabilities::publish_confirms`].
    pub fn publish_confirms(mut self, yes: bool) -> Self {
        self.publish_confirms = yes;
        self
    }

    /// Sets [`Capabilities::reports_unroutable`].
    pub fn reports_unroutable(mut self, yes: bool) -> Self {
        self.reports_unroutable = yes;
        self
    }

    /// Sets [`Capabilities::no_duplicates`].
    pub fn no_duplicates(mut self, yes: bool) -> Self {
        self.no_duplicates = yes;
        self
    }
}

/// What became of a published message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublishOutcome {
    /// The broker has it (stored or routed), without saying to how many.
    Accepted,
    /// It was handed to this many subscriptions (more than zero).
    Delivered(usize),
    /// No subscription matched and the broker did not keep it.
    Unroutable,
}

impl PublishOutcome {
    /// Whether the message reached nobody.
    pub fn is_unroutable(&self) -> bool {
        matches!(self, PublishOutcome::Unroutable)
    }
}

/// How a subscription shares the messages it matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Distribution {
    /// Every fan-out subscription gets its own copy.
    FanOut,
    /// Members of the named group compete: each message to one of them.
    Group(String),
}

/// What to subscribe to, and how.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SubscribeOptions {
    /// The patterns; a message matching any of them is delivered once.
    pub patterns: Vec<ChannelPattern>,
    /// Fan-out or a group.
    pub distribution: Distribution,
    /// How many deliveries may wait unsettled in the subscription (the broker prefetch, or the local
    /// buffer). The backend stops reading when it is full: that is the backpressure. (The in-memory
    /// router bounds each queue by its `queue_capacity`, or by this when it is larger.)
    pub prefetch: usize,
    /// Whether replies on their way to a requester's inbox (direction `reply`, a session beginning
    /// with `inbox-`, a correlation id) are delivered where only a wildcard direction matches them
    /// (the default, `true`). Agents subscribe without them ([`without_inbox_replies`]): they would
    /// only skip them. A pattern that names the `reply` direction gets them either way. The in-memory
    /// router honours it, so that such replies take no room in agents' queues (a group that a
    /// subscription without them has read gets them while one of its members asked for them; a group
    /// only ever read by subscriptions with them gets them always); brokers whose
    /// bindings cannot tell them apart may still deliver them (the agent runtime skips them there).
    ///
    /// [`without_inbox_replies`]: SubscribeOptions::without_inbox_replies
    pub inbox_replies: bool,
}

impl SubscribeOptions {
    /// The default number of unsettled deliveries.
    pub const DEFAULT_PREFETCH: usize = 256;

    /// Fan-out on one pattern.
    pub fn new(pattern: ChannelPattern) -> Self {
        SubscribeOptions {
            patterns: vec![pattern],
            distribution: Distribution::FanOut,
            prefetch: Self::DEFAULT_PREFETCH,
            inbox_replies: true,
        }
    }

    /// Fan-out on several patterns.
    pub fn patterns(patterns: Vec<ChannelPattern>) -> Self {
        SubscribeOptions {
            patterns,
            ..Self::new(ChannelPattern::all())
        }
    }

    /// Joins the named group.
    pub fn group(mut self, name: impl Into<String>) -> Self {
        self.distribution = Distribution::Group(name.into());
        self
    }

    /// Gets a copy of every message (the default).
    pub fn fan_out(mut self) -> Self {
        self.distribution = Distribution::FanOut;
        self
    }

    /// Leaves out replies on their way to a requester's inbox that only a wildcard direction of the
    /// patterns matches (see [`SubscribeOptions::inbox_replies`]), as agents subscribe.
    pub fn without_inbox_replies(mut self) -> Self {
        self.inbox_replies = false;
        self
    }

    /// Sets the prefetch (at least 1).
    pub fn prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// Whether a channel matches any of the patterns (the one matcher, [`ChannelPattern::matches`]).
    pub fn matches(&self, channel: &crate::Channel) -> bool {
        self.patterns.iter().any(|pattern| pattern.matches(channel))
    }

    /// Checks the options before a backend acts on them.
    pub fn check(&self) -> Result<()> {
        if self.patterns.is_empty() {
            return Err(Error::Config {
                variable: "subscription patterns".into(),
                value: "[]".into(),
                expected:
                    "at least one pattern: SubscribeOptions::new(pattern), or a non-empty list \
                           to SubscribeOptions::patterns"
                        .into(),
            });
        }
        if let Distribution::Group(name) = &self.distribution
            && (name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(Error::Config {
                variable: "group".into(),
                value: name.clone(),
                expected: "a non-empty group name without whitespace".into(),
            });
        }
        Ok(())
    }
}

/// How a nacked delivery should come back.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum NackAction {
    /// Put it back at once, unchanged. The attempt count may not increase on every backend.
    Requeue,
    /// Deliver the envelope given with the nack (the runtime passes it with the next attempt number)
    /// after `delay`, to the same subscription or group.
    Retry {
        /// How long to wait first.
        delay: Duration,
    },
}

/// The backend side of a delivery: how to settle it with the broker.
///
/// Implemented by backends; the [`Delivery`] calls it exactly once.
pub trait Acknowledge: Send + Sync + 'static {
    /// The message was handled: tell the broker (XACK, basic.ack, ...).
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<()>>;

    /// The message was not handled: give `envelope` back as `action` says. For [`NackAction::Retry`] the
    /// envelope carries the next attempt number; a backend that can only requeue the original (AMQP
    /// `basic.nack`) republishes this envelope instead so the count survives.
    fn nack(
        self: Box<Self>,
        envelope: Envelope,
        action: NackAction,
    ) -> BoxFuture<'static, Result<()>>;

    /// The delivery was dropped unsettled. Persistent backends make sure it is delivered again; the
    /// default does nothing (at-most-once). Must not block.
    fn abandon(self: Box<Self>, envelope: Envelope) {
        let _ = envelope;
    }

    /// The delivery goes back without any handler having seen it (it waited in a buffer when its
    /// consumer stopped): like [`abandon`](Acknowledge::abandon), but a backend that counts
    /// deliveries (Redis Streams' delivery counter) should not count this one as an attempt. The
    /// default abandons it. Must not block.
    fn give_back(self: Box<Self>, envelope: Envelope) {
        self.abandon(envelope);
    }
}

/// A message delivered by a subscription, to be settled once.
pub struct Delivery {
    envelope: Option<Envelope>,
    handle: Option<Box<dyn Acknowledge>>,
    redelivered: bool,
}

impl Delivery {
    /// A delivery of `envelope` settled through `handle`.
    pub fn new(envelope: Envelope, handle: Box<dyn Acknowledge>) -> Self {
        Delivery {
            envelope: Some(envelope),
            handle: Some(handle),
            redelivered: false,
        }
    }

    /// Marks the delivery as a redelivery (the broker said so).
    pub fn redelivered(mut self, redelivered: bool) -> Self {
        self.redelivered = redelivered;
        self
    }

    /// Whether the broker said this message was delivered before.
    pub fn is_redelivered(&self) -> bool {
        self.redelivered
    }

    /// Hands the delivery back unhandled, before any handler saw it (a consumer stopping with
    /// deliveries still buffered): it is delivered again where the backend can, and does not count as
    /// an attempt where the backend counts deliveries. Dropping a delivery unsettled also hands it
    /// back, but counts as an attempt there (a handler may have started on it).
    pub fn give_back(mut self) {
        if let (Some(envelope), Some(handle)) = (self.envelope.take(), self.handle.take()) {
            handle.give_back(envelope);
        }
    }

    /// Drops the delivery without settling it and without handing it back: for a backend discarding a
    /// delivery it never handed out (its subscription closed in between).
    pub fn discard(mut self) {
        self.envelope = None;
        self.handle = None;
    }

    /// The envelope.
    pub fn envelope(&self) -> &Envelope {
        self.envelope
            .as_ref()
            .expect("a delivery holds its envelope until settled")
    }

    /// Takes the envelope out for a while (the runtime lends it to the handler's context instead of
    /// copying it); [`Delivery::restore`] must put it back before the delivery is settled or dropped.
    pub(crate) fn lend(&mut self) -> Envelope {
        self.envelope
            .take()
            .expect("a delivery holds its envelope until settled")
    }

    /// Puts back the envelope [`Delivery::lend`] took.
    pub(crate) fn restore(&mut self, envelope: Envelope) {
        debug_assert!(self.envelope.is_none(), "restored an envelope never lent");
        self.envelope = Some(envelope);
    }

    /// Takes the delivery apart without settling it: its envelope and the backend's handle, the
    /// inverse of [`Delivery::new`]. For a router that wraps another: its own [`Acknowledge`] settles
    /// the inner delivery through the handle with the envelope the runtime gives it (the next
    /// attempt, headers the runtime added), which [`Delivery::nack`] on the inner delivery would
    /// replace with the inner one's. The caller must call exactly one method of the handle: dropped
    /// uncalled, it neither settles the message nor hands it back. The redelivered flag is not one
    /// of the parts: read [`Delivery::is_redelivered`] first and pass it to
    /// [`Delivery::redelivered`] on the delivery made from them, or it reads `false`.
    pub fn into_parts(mut self) -> (Envelope, Box<dyn Acknowledge>) {
        self.take()
    }

    fn take(&mut self) -> (Envelope, Box<dyn Acknowledge>) {
        (
            self.envelope.take().expect("a delivery is settled once"),
            self.handle.take().expect("a delivery is settled once"),
        )
    }

    /// Acknowledges the delivery: it is done and must not come back.
    pub async fn ack(mut self) -> Result<()> {
        let (_, handle) = self.take();
        handle.ack().await
    }

    /// Gives the delivery back to the backend: unchanged for [`NackAction::Requeue`], as the next
    /// attempt for [`NackAction::Retry`].
    pub async fn nack(mut self, action: NackAction) -> Result<()> {
        let (envelope, handle) = self.take();
        let envelope = match action {
            NackAction::Retry { .. } => {
                let next = envelope.attempt().saturating_add(1);
                envelope.with_attempt(next)
            }
            _ => envelope,
        };
        handle.nack(envelope, action).await
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let (Some(envelope), Some(handle)) = (self.envelope.take(), self.handle.take()) {
            handle.abandon(envelope);
        }
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("envelope", &self.envelope)
            .field("redelivered", &self.redelivered)
            .finish_non_exhaustive()
    }
}

/// The backend side of a subscription: how to stop it.
pub trait SubscriptionControl: Send + Sync + 'static {
    /// Stops delivering new messages (AMQP basic.cancel, stop reading a stream, unsubscribe). What was
    /// already handed to the subscription stays readable; then the stream ends.
    fn close(&self) -> BoxFuture<'static, Result<()>>;
}

/// A live subscription: a stream of [`Delivery`] values.
///
/// Either the backend pushes deliveries into a bounded channel (capacity = prefetch) and stops reading
/// from the broker while it is full ([`Subscription::new`]), or it hands over a stream that turns what
/// the broker client delivers into deliveries as the subscriber polls it, with no task in between
/// ([`Subscription::from_stream`]; the broker's prefetch is then the bound). The stream ends (`None`) once
/// the subscription is closed and drained, or the router is closed.
///
/// Inside a Tokio task, reading spends the task's cooperative budget, as Tokio's own channels do: a
/// task that always finds a delivery waiting still gives its thread back now and then. So
/// `next().now_or_never()` in a loop may stop after about 128 deliveries with more waiting; use
/// [`Subscription::try_next`] to take what is waiting without waiting.
pub struct Subscription {
    source: Source,
    stop: Option<Pin<Box<async_channel::Receiver<()>>>>,
    control: Arc<dyn SubscriptionControl>,
    description: Arc<str>,
    /// The runtime it was made on, if any: a subscription dropped outside a runtime is closed there.
    runtime: Option<tokio::runtime::Handle>,
}

impl Subscription {
    /// Wraps the receiving end the backend fills, and its control.
    pub fn new(
        receiver: async_channel::Receiver<Delivery>,
        control: Arc<dyn SubscriptionControl>,
        options: &SubscribeOptions,
    ) -> Self {
        let patterns: Vec<String> = options.patterns.iter().map(ToString::to_string).collect();
        let description = match &options.distribution {
            Distribution::FanOut => format!("fan-out on {}", patterns.join(", ")),
            Distribution::Group(group) => format!("group '{group}' on {}", patterns.join(", ")),
        };
        Subscription {
            // Boxed because the receivers are not `Unpin`; this keeps `Subscription` easy to poll and move.
            source: Source::Channel(Box::pin(receiver)),
            stop: None,
            control,
            description: description.into(),
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }

    /// Wraps a stream of deliveries produced where the subscriber polls (for example a broker client's
    /// own receiver, mapped to [`Delivery`] values), and its control. The stream must end after the
    /// control closed the subscription and what was buffered was read.
    pub fn from_stream(
        stream: impl Stream<Item = Delivery> + Send + 'static,
        control: Arc<dyn SubscriptionControl>,
        options: &SubscribeOptions,
    ) -> Self {
        let (_, unused) = async_channel::bounded(1);
        let mut subscription = Self::new(unused, control, options);
        subscription.source = Source::Stream(std::sync::Mutex::new(Box::pin(stream)));
        subscription
    }

    /// Ends the stream as soon as `stop` is closed, even if `receiver` is shared with other
    /// subscriptions (members of one group reading one queue) and stays open.
    pub fn with_stop_signal(mut self, stop: async_channel::Receiver<()>) -> Self {
        self.stop = Some(Box::pin(stop));
        self
    }

    /// The next delivery, or `None` when the subscription has ended.
    pub async fn next(&mut self) -> Option<Delivery> {
        futures::StreamExt::next(self).await
    }

    /// A delivery that is already waiting, without waiting for one.
    pub fn try_next(&mut self) -> Option<Delivery> {
        if self.stop.as_ref().is_some_and(|stop| stop.is_closed()) {
            return None;
        }
        match &mut self.source {
            Source::Channel(receiver) => receiver.try_recv().ok(),
            Source::Stream(stream) => {
                let stream = stream
                    .get_mut()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                // Spends no cooperative budget, as the channel source's `try_recv` does not: a loop
                // taking what waits (a drain at shutdown) would otherwise stop after the budget's 128
                // units with deliveries still waiting, for a stream that spends it (Tokio's channels).
                futures::FutureExt::now_or_never(tokio::task::unconstrained(
                    futures::StreamExt::next(stream),
                ))
                .flatten()
            }
        }
    }

    /// Stops new deliveries; buffered ones can still be read until the stream ends.
    pub async fn close(&self) -> Result<()> {
        self.control.close().await
    }

    /// A handle that can close this subscription from elsewhere.
    pub fn closer(&self) -> SubscriptionCloser {
        SubscriptionCloser(self.control.clone())
    }

    /// What the subscription is, for logs: `fan-out on PaymentRequest:*:*`.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// How many deliveries are waiting to be read (for a stream source, its lower size hint).
    pub fn buffered(&self) -> usize {
        match &self.source {
            Source::Channel(receiver) => receiver.len(),
            Source::Stream(stream) => {
                stream
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .size_hint()
                    .0
            }
        }
    }
}

enum Source {
    Channel(Pin<Box<async_channel::Receiver<Delivery>>>),
    // The mutex only makes `Subscription` `Sync` for streams that are not; polling goes through
    // `get_mut`, which takes no lock.
    Stream(std::sync::Mutex<Pin<Box<dyn Stream<Item = Delivery> + Send>>>),
}

impl Drop for Subscription {
    /// Dropping a subscription closes it.
    fn drop(&mut self) {
        let closing = self.control.close();
        // Dropped outside a runtime: closed on the one it was made on (a backend's close finishes on
        // a task, which would otherwise never run, and leave the subscription open until its router
        // closes).
        let runtime = tokio::runtime::Handle::try_current()
            .ok()
            .or_else(|| self.runtime.clone());
        match runtime {
            Some(runtime) => {
                runtime.spawn(async move {
                    if let Err(error) = closing.await {
                        tracing::debug!(error = %error, "closing a dropped subscription failed");
                    }
                });
            }
            None => tracing::warn!(
                subscription = %self.description,
                "a subscription made and dropped outside any Tokio runtime could not finish closing; \
                 it ends when its router closes"
            ),
        }
    }
}

impl Stream for Subscription {
    type Item = Delivery;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        let this = self.get_mut();
        if let Some(stop) = &mut this.stop {
            // Nothing is ever sent on the stop channel: it only ends, when the subscription closes.
            if let Poll::Ready(None) = stop.as_mut().poll_next(cx) {
                return Poll::Ready(None);
            }
        }
        match &mut this.source {
            Source::Channel(receiver) => {
                // async-channel knows nothing of Tokio's cooperative budget: a subscription that always
                // has a delivery ready (an agent answering its own class, a backlog) would never give
                // the thread back, and on a current-thread runtime the timers, the other agents and
                // `shutdown` would never run again. Each delivery spends a unit of the task's budget.
                let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
                let next = receiver.as_mut().poll_next(cx);
                if next.is_ready() {
                    coop.made_progress();
                }
                next
            }
            Source::Stream(stream) => stream
                .get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_mut()
                .poll_next(cx),
        }
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("description", &self.description)
            .field("buffered", &self.buffered())
            .finish()
    }
}

/// A cloneable handle that closes a subscription.
#[derive(Clone)]
pub struct SubscriptionCloser(Arc<dyn SubscriptionControl>);

impl SubscriptionCloser {
    /// Stops new deliveries.
    pub async fn close(&self) -> Result<()> {
        self.0.close().await
    }
}

impl fmt::Debug for SubscriptionCloser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SubscriptionCloser")
    }
}

/// Overall state of a router or agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum HealthStatus {
    /// Working.
    Healthy,
    /// Working, but something is wrong (reconnecting, dropping messages, lagging).
    Degraded,
    /// Not working (disconnected, closed).
    Unhealthy,
}

/// A health report.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Health {
    /// Overall state.
    pub status: HealthStatus,
    /// The backend, e.g. `memory`, `redis-streams`, `rabbitmq`.
    pub backend: String,
    /// Whether the connection to the broker is up.
    pub connected: bool,
    /// The last measured round trip to the broker.
    pub round_trip: Option<Duration>,
    /// Counters: `published`, `delivered`, `dropped`, `lagged`, `reconnects`, `unconfirmed`,
    /// `malformed`, `unroutable`, ... (each backend documents its own).
    pub counters: BTreeMap<String, u64>,
    /// A sentence for people: what is wrong and what to do, or `ok`.
    pub detail: String,
}

impl Health {
    /// A report for `backend` with `status`.
    pub fn new(backend: impl Into<String>, status: HealthStatus) -> Self {
        Health {
            status,
            backend: backend.into(),
            connected: status != HealthStatus::Unhealthy,
            round_trip: None,
            counters: BTreeMap::new(),
            detail: "ok".into(),
        }
    }

    /// Sets whether the broker connection is up.
    pub fn connected(mut self, connected: bool) -> Self {
        self.connected = connected;
        self
    }

    /// Sets the round trip.
    pub fn round_trip(mut self, round_trip: Duration) -> Self {
        self.round_trip = Some(round_trip);
        self
    }

    /// Sets a counter.
    pub fn counter(mut self, name: impl Into<String>, value: u64) -> Self {
        self.counters.insert(name.into(), value);
        self
    }

    /// Sets the detail sentence.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    /// A counter's value (0 when absent).
    pub fn get(&self, counter: &str) -> u64 {
        self.counters.get(counter).copied().unwrap_or(0)
    }
}

/// A message broker, seen from agentcomm. Implement it to add a backend; pass the
/// `agentcomm-testkit` conformance suite to prove it.
pub trait Router: Send + Sync + 'static {
    /// The backend's name, e.g. `memory`, `redis-pubsub`, `redis-streams`, `rabbitmq`.
    fn backend(&self) -> &str;

    /// The guarantees this backend gives.
    fn capabilities(&self) -> Capabilities;

    /// Publishes one message. Resolves when the backend knows what became of it (see the module docs).
    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, Result<PublishOutcome>>;

    /// Publishes several messages, pipelined where the broker allows. One result per envelope, in order.
    /// The default publishes them one after the other.
    fn publish_batch(
        &self,
        envelopes: Vec<Envelope>,
    ) -> BoxFuture<'_, Vec<Result<PublishOutcome>>> {
        Box::pin(async move {
            let mut results = Vec::with_capacity(envelopes.len());
            for envelope in envelopes {
                results.push(self.publish(envelope).await);
            }
            results
        })
    }

    /// Subscribes. Resolves once the subscription is live.
    fn subscribe(&self, options: SubscribeOptions) -> BoxFuture<'_, Result<Subscription>>;

    /// The router's health.
    fn health(&self) -> BoxFuture<'_, Health>;

    /// Closes the router: ends every subscription, waits for outstanding confirms, disconnects.
    fn close(&self) -> BoxFuture<'_, Result<()>>;
}

impl<R: Router + ?Sized> Router for Arc<R> {
    fn backend(&self) -> &str {
        (**self).backend()
    }
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, Result<PublishOutcome>> {
        (**self).publish(envelope)
    }
    fn publish_batch(
        &self,
        envelopes: Vec<Envelope>,
    ) -> BoxFuture<'_, Vec<Result<PublishOutcome>>> {
        (**self).publish_batch(envelopes)
    }
    fn subscribe(&self, options: SubscribeOptions) -> BoxFuture<'_, Result<Subscription>> {
        (**self).subscribe(options)
    }
    fn health(&self) -> BoxFuture<'_, Health> {
        (**self).health()
    }
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        (**self).close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::parse_channel;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct CountingAck(Arc<AtomicUsize>);

    impl Acknowledge for CountingAck {
        fn ack(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            ready_ok()
        }
        fn nack(self: Box<Self>, _: Envelope, _: NackAction) -> BoxFuture<'static, Result<()>> {
            ready_ok()
        }
    }

    struct NoControl;

    impl SubscriptionControl for NoControl {
        fn close(&self) -> BoxFuture<'static, Result<()>> {
            ready_ok()
        }
    }

    #[tokio::test]
    async fn a_subscription_can_read_a_backends_own_stream() {
        let acked = Arc::new(AtomicUsize::new(0));
        let channel = parse_channel("Ping:event:s1").unwrap();
        let deliveries: Vec<Delivery> = (0..3)
            .map(|i| {
                let envelope = Envelope::new(
                    channel.clone(),
                    "application/json",
                    format!("{i}").into_bytes(),
                );
                Delivery::new(envelope, Box::new(CountingAck(acked.clone())))
            })
            .collect();
        let options = SubscribeOptions::new(ChannelPattern::parse("Ping:*:*").unwrap());
        let mut subscription = Subscription::from_stream(
            futures::stream::iter(deliveries),
            Arc::new(NoControl),
            &options,
        );
        assert_eq!(subscription.buffered(), 3);
        let first = subscription.next().await.unwrap();
        assert_eq!(&first.envelope().payload()[..], b"0");
        first.ack().await.unwrap();
        let second = subscription.try_next().unwrap();
        assert_eq!(&second.envelope().payload()[..], b"1");
        second.ack().await.unwrap();
        subscription.next().await.unwrap().ack().await.unwrap();
        assert!(subscription.next().await.is_none(), "the stream ended");
        assert_eq!(acked.load(Ordering::SeqCst), 3);
        assert_eq!(subscription.description(), "fan-out on Ping:*:*");
    }

    #[tokio::test]
    async fn try_next_takes_everything_waiting_in_a_stream_that_spends_the_budget() {
        let acked = Arc::new(AtomicUsize::new(0));
        let channel = parse_channel("Ping:event:s1").unwrap();
        let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..300 {
            let envelope = Envelope::new(
                channel.clone(),
                "application/json",
                format!("{i}").into_bytes(),
            );
            sender
                .send(Delivery::new(
                    envelope,
                    Box::new(CountingAck(acked.clone())),
                ))
                .unwrap();
        }
        drop(sender);
        // Tokio's receiver spends a unit of the task's budget per message.
        let stream = futures::stream::poll_fn(move |cx| receiver.poll_recv(cx));
        let options = SubscribeOptions::new(ChannelPattern::parse("Ping:*:*").unwrap());
        let mut subscription = Subscription::from_stream(stream, Arc::new(NoControl), &options);
        // In a task of its own, with a fresh budget: nothing here awaits.
        let taken = tokio::spawn(async move {
            let mut taken = 0;
            while subscription.try_next().is_some() {
                taken += 1;
            }
            taken
        })
        .await
        .unwrap();
        assert_eq!(taken, 300, "everything waiting was taken");
    }
}
