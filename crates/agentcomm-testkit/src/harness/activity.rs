//! What the harness's runtime does that its observer cannot see, counted at the router: deliveries
//! handed to agents and not settled yet, deliveries waiting in the agents' subscriptions, retries
//! waiting out their backoff inside the router, publishes the observer should see and has not seen
//! yet, and the order in which publishes were made.
//!
//! The runtime of a harness runs on a [`TrackedRouter`] that wraps the real one; the harness's own
//! observer subscribes to the real router directly, so none of this counts its work.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use agentcomm_core::channel::{Channel, ChannelPattern};
use agentcomm_core::envelope::{Envelope, MessageId};
use agentcomm_core::error::Result;
use agentcomm_core::router::{
    Acknowledge, BoxFuture, Capabilities, Delivery, Distribution, Health, NackAction,
    PublishOutcome, Router, SharedRouter, SubscribeOptions, Subscription, SubscriptionCloser,
    SubscriptionControl,
};
use futures::Stream;
use tokio::time::Instant;

/// How long after its delay a retry is still waited for. A retry that has not come back by then went
/// to a consumer outside this runtime (a group shared with another process) or was lost by the
/// router; either way the harness cannot wait for it.
pub(crate) const RETRY_GRACE: Duration = Duration::from_secs(1);

/// The counts, shared by the tracked router, its subscriptions and deliveries, and the harness.
#[derive(Default)]
pub(crate) struct Activity {
    /// Deliveries handed out by the runtime's subscriptions and not yet acknowledged, nacked or
    /// dropped.
    unsettled: AtomicU64,
    state: Mutex<ActivityState>,
    /// The router was closed through the harness (by the test, or by the runtime's shutdown): the
    /// observer's subscriptions end because nothing more can be published.
    closed: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct ActivityState {
    next_subscription: u64,
    subscriptions: Vec<Weak<Watched>>,
    retries: Vec<PendingRetry>,
    publish_order: HashMap<MessageId, u64>,
    next_publish: u64,
    /// The observer's patterns, once its subscriptions are live.
    observed: Vec<ChannelPattern>,
    /// Published through the runtime on an observed channel, and not seen by the observer yet.
    unseen: HashSet<MessageId>,
}

/// Where a retry comes back: to the group, or to the one fan-out subscription that gave it back.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Group(String),
    FanOut(u64),
}

struct PendingRetry {
    id: MessageId,
    route: Route,
    /// When it is due back.
    due: Instant,
}

/// One subscription of the runtime: where its retries come back, and what it holds.
struct Watched {
    route: Route,
    subscription: Mutex<Subscription>,
    ended: AtomicBool,
}

impl Watched {
    fn is_live(&self) -> bool {
        !self.ended.load(Ordering::Acquire)
    }
}

/// What keeps the runtime busy right now; [`Busy::is_idle`] when nothing does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Busy {
    /// Handlers running, by agent name.
    pub handlers: Vec<(&'static str, u64)>,
    /// Deliveries taken from a subscription and not settled yet (running handlers included).
    pub unsettled: u64,
    /// Deliveries waiting in the agents' subscriptions.
    pub buffered: u64,
    /// Retries waiting out their backoff, each with the time until it is due.
    pub retries: Vec<Duration>,
    /// Messages published through the runtime on a watched channel that the observer has not seen.
    pub unseen: u64,
}

impl Busy {
    pub fn is_idle(&self) -> bool {
        self.handlers.is_empty()
            && self.unsettled == 0
            && self.buffered == 0
            && self.retries.is_empty()
            && self.unseen == 0
    }
}

impl fmt::Display for Busy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if !self.handlers.is_empty() {
            let running: u64 = self.handlers.iter().map(|(_, n)| n).sum();
            let names: Vec<String> = self
                .handlers
                .iter()
                .map(|(name, n)| format!("{name}: {n}"))
                .collect();
            parts.push(format!(
                "{running} handler(s) running ({})",
                names.join(", ")
            ));
        }
        if self.unsettled > 0 {
            parts.push(format!(
                "{} deliveries taken by agents and not settled yet",
                self.unsettled
            ));
        }
        if self.buffered > 0 {
            parts.push(format!(
                "{} deliveries waiting in the agents' subscriptions",
                self.buffered
            ));
        }
        if !self.retries.is_empty() {
            let soonest = self.retries.iter().min().copied().unwrap_or_default();
            parts.push(format!(
                "{} retries waiting out their backoff (the next due in {}ms)",
                self.retries.len(),
                soonest.as_millis()
            ));
        }
        if self.unseen > 0 {
            parts.push(format!(
                "{} published messages not seen by the harness yet",
                self.unseen
            ));
        }
        if parts.is_empty() {
            f.write_str("nothing running")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

impl Activity {
    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Numbers a publish made through the runtime, at the moment it is made, and notes whether the
    /// observer should see it.
    fn publishing(&self, envelope: &Envelope) {
        let mut state = self.lock();
        if observes(&state.observed, envelope.channel()) {
            state.unseen.insert(envelope.id());
        }
        let next = state.next_publish + 1;
        if let std::collections::hash_map::Entry::Vacant(entry) =
            state.publish_order.entry(envelope.id())
        {
            entry.insert(next);
            state.next_publish = next;
        }
    }

    /// A publish that failed or reached nobody: the observer will not see it.
    fn not_published(&self, id: &MessageId) {
        self.lock().unseen.remove(id);
    }

    /// The observer saw the message.
    /// Whether the router was closed through the harness.
    pub fn router_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn seen(&self, id: &MessageId) {
        self.lock().unseen.remove(id);
    }

    /// The observer's subscriptions on `patterns` are live: what is published there from now on
    /// will be seen.
    pub fn observing(&self, patterns: &[ChannelPattern]) {
        self.lock().observed.extend_from_slice(patterns);
    }

    /// The place of a message among the publishes made through the runtime, from 1.
    pub fn publish_order(&self, id: &MessageId) -> Option<u64> {
        self.lock().publish_order.get(id).copied()
    }

    fn retry_scheduled(&self, id: MessageId, route: Route, delay: Duration) {
        let due = Instant::now() + delay;
        self.lock().retries.push(PendingRetry { id, route, due });
    }

    fn delivered(&self, id: &MessageId) {
        let mut state = self.lock();
        if let Some(index) = state.retries.iter().position(|retry| retry.id == *id) {
            state.retries.swap_remove(index);
        }
    }

    fn register(&self, watched: &Arc<Watched>) {
        let mut state = self.lock();
        state.subscriptions.retain(|w| w.strong_count() > 0);
        state.subscriptions.push(Arc::downgrade(watched));
    }

    fn route_for(&self, distribution: &Distribution) -> Route {
        match distribution {
            Distribution::Group(group) => Route::Group(group.clone()),
            _ => {
                let mut state = self.lock();
                state.next_subscription += 1;
                Route::FanOut(state.next_subscription)
            }
        }
    }

    /// What the runtime's subscriptions and deliveries hold now (agents' handlers are added by the
    /// harness, which knows the agents).
    pub fn busy(&self) -> Busy {
        let now = Instant::now();
        let mut state = self.lock();
        let live: Vec<Arc<Watched>> = state
            .subscriptions
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|watched| watched.is_live())
            .collect();
        // A retry is waited for while it is not overdue and something that would receive it is
        // subscribed; a retry to a subscription that ended is gone with it.
        state.retries.retain(|retry| {
            now < retry.due + RETRY_GRACE && live.iter().any(|watched| watched.route == retry.route)
        });
        let retries = state
            .retries
            .iter()
            .map(|retry| retry.due.saturating_duration_since(now))
            .collect();
        drop(state);
        let buffered = live
            .iter()
            .map(|watched| {
                watched
                    .subscription
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .buffered() as u64
            })
            .sum();
        let unseen = self.lock().unseen.len() as u64;
        Busy {
            handlers: Vec::new(),
            unsettled: self.unsettled.load(Ordering::Acquire),
            buffered,
            retries,
            unseen,
        }
    }
}

/// Whether the observer, subscribed on `patterns`, receives a message on `channel`: a pattern must
/// match it and be of the channel's template (on a broker, `*:*:*` does not cover a channel named
/// by another template, whatever its components).
fn observes(patterns: &[ChannelPattern], channel: &Channel) -> bool {
    patterns.iter().any(|pattern| {
        pattern.matches(channel)
            && pattern
                .template()
                .render(channel.class(), channel.direction(), channel.session())
                == channel.name()
    })
}

/// The router the harness's runtime runs on: the real one, counted.
pub(crate) struct TrackedRouter {
    inner: SharedRouter,
    activity: Arc<Activity>,
}

impl TrackedRouter {
    pub fn new(inner: SharedRouter, activity: Arc<Activity>) -> Self {
        TrackedRouter { inner, activity }
    }
}

impl Router for TrackedRouter {
    fn backend(&self) -> &str {
        self.inner.backend()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, Result<PublishOutcome>> {
        self.activity.publishing(&envelope);
        let id = envelope.id();
        Box::pin(async move {
            let outcome = self.inner.publish(envelope).await;
            if !matches!(&outcome, Ok(done) if !done.is_unroutable()) {
                self.activity.not_published(&id);
            }
            outcome
        })
    }

    fn publish_batch(
        &self,
        envelopes: Vec<Envelope>,
    ) -> BoxFuture<'_, Vec<Result<PublishOutcome>>> {
        for envelope in &envelopes {
            self.activity.publishing(envelope);
        }
        let ids: Vec<MessageId> = envelopes.iter().map(Envelope::id).collect();
        Box::pin(async move {
            let outcomes = self.inner.publish_batch(envelopes).await;
            for (id, outcome) in ids.iter().zip(&outcomes) {
                if !matches!(outcome, Ok(done) if !done.is_unroutable()) {
                    self.activity.not_published(id);
                }
            }
            outcomes
        })
    }

    fn subscribe(&self, options: SubscribeOptions) -> BoxFuture<'_, Result<Subscription>> {
        Box::pin(async move {
            let subscription = self.inner.subscribe(options.clone()).await?;
            let closer = subscription.closer();
            let watched = Arc::new(Watched {
                route: self.activity.route_for(&options.distribution),
                subscription: Mutex::new(subscription),
                ended: AtomicBool::new(false),
            });
            self.activity.register(&watched);
            let stream = WatchedStream {
                watched,
                activity: self.activity.clone(),
            };
            Ok(Subscription::from_stream(
                stream,
                Arc::new(Closer(closer)),
                &options,
            ))
        })
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        self.inner.health()
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        self.activity
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner.close()
    }
}

struct Closer(SubscriptionCloser);

impl SubscriptionControl for Closer {
    fn close(&self) -> BoxFuture<'static, Result<()>> {
        let closer = self.0.clone();
        Box::pin(async move { closer.close().await })
    }
}

struct WatchedStream {
    watched: Arc<Watched>,
    activity: Arc<Activity>,
}

impl Stream for WatchedStream {
    type Item = Delivery;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        let this = self.get_mut();
        let polled = {
            let mut subscription = this
                .watched
                .subscription
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            Pin::new(&mut *subscription).poll_next(cx)
        };
        match polled {
            Poll::Ready(Some(delivery)) => {
                let envelope = delivery.envelope().clone();
                this.activity.delivered(&envelope.id());
                this.activity.unsettled.fetch_add(1, Ordering::AcqRel);
                let redelivered = delivery.is_redelivered();
                let handle = TrackedAck {
                    delivery,
                    route: this.watched.route.clone(),
                    unsettled: Unsettled(this.activity.clone()),
                };
                Poll::Ready(Some(
                    Delivery::new(envelope, Box::new(handle)).redelivered(redelivered),
                ))
            }
            Poll::Ready(None) => {
                this.watched.ended.store(true, Ordering::Release);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let subscription = self
            .watched
            .subscription
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (subscription.buffered(), None)
    }
}

impl Drop for WatchedStream {
    fn drop(&mut self) {
        self.watched.ended.store(true, Ordering::Release);
    }
}

/// Counts a delivery as unsettled until it is dropped.
struct Unsettled(Arc<Activity>);

impl Drop for Unsettled {
    fn drop(&mut self) {
        self.0.unsettled.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Settles the real delivery, noting retries on the way. Counted as unsettled until the real
/// settlement is done (or, dropped unsettled, handed back). The real delivery is settled with the
/// envelope the runtime gives: a message given back marked (its dead letter could not be published)
/// must come back marked, as it does without the harness.
struct TrackedAck {
    delivery: Delivery,
    route: Route,
    unsettled: Unsettled,
}

impl Acknowledge for TrackedAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        let TrackedAck {
            delivery,
            unsettled,
            ..
        } = *self;
        // Still unsettled until the broker has the acknowledgement.
        Box::pin(async move {
            let result = delivery.ack().await;
            drop(unsettled);
            result
        })
    }

    fn nack(
        self: Box<Self>,
        envelope: Envelope,
        action: NackAction,
    ) -> BoxFuture<'static, Result<()>> {
        let TrackedAck {
            delivery,
            route,
            unsettled,
        } = *self;
        if let NackAction::Retry { delay } = &action {
            unsettled.0.retry_scheduled(envelope.id(), route, *delay);
        }
        // The runtime's envelope (already the next attempt), not the real delivery's.
        let (_, handle) = delivery.into_parts();
        Box::pin(async move {
            let result = handle.nack(envelope, action).await;
            drop(unsettled);
            result
        })
    }

    fn abandon(self: Box<Self>, envelope: Envelope) {
        let (_, handle) = self.delivery.into_parts();
        handle.abandon(envelope);
    }

    fn give_back(self: Box<Self>, envelope: Envelope) {
        // Not an attempt where the backend counts deliveries: the real delivery is given back too.
        let (_, handle) = self.delivery.into_parts();
        handle.give_back(envelope);
    }
}
