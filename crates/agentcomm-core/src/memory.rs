//! The in-memory router: the embedded default, for single-process systems and tests.
//!
//! It implements the whole router contract: patterns, fan-out and groups, ack/nack with redelivery,
//! bounded queues with backpressure, and close. It is not persistent: what is queued is lost when the
//! process ends.
//!
//! - Every subscription and every group has a bounded queue (`queue_capacity`). A publish into a full
//!   queue waits (backpressure) up to `publish_timeout`, then fails with [`Error::Timeout`]; nothing is
//!   dropped silently.
//! - A group outlives its members, like a durable queue: messages for it wait until a member comes.
//! - A delivery dropped unsettled, or nacked, goes back to its queue.
//!
//! ```
//! use agentcomm_core::prelude::*;
//! use agentcomm_core::router::SubscribeOptions;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> agentcomm_core::Result<()> {
//! let router = MemoryRouter::new();
//! let mut subscription = router.subscribe(SubscribeOptions::new(ChannelPattern::parse("Ping:*:*")?)).await?;
//! let channel = parse_channel("Ping:event:s1")?;
//! router.publish(Envelope::new(channel, "application/json", &b"{}"[..])).await?;
//! let delivery = subscription.next().await.expect("a delivery");
//! assert_eq!(delivery.envelope().session(), "s1");
//! delivery.ack().await?;
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use crate::channel::ChannelPattern;
use crate::envelope::Envelope;
use crate::error::{Error, Result};
use crate::router::{
    Acknowledge, BoxFuture, Capabilities, Delivery, Distribution, Health, HealthStatus, NackAction,
    PublishOutcome, Router, SubscribeOptions, Subscription, SubscriptionControl, ready_ok,
};

/// Settings of a [`MemoryRouter`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MemoryConfig {
    /// The capacity of each queue (fan-out subscription or group); at least the subscription's prefetch.
    pub queue_capacity: usize,
    /// How long a publish waits for room in a full queue before failing.
    pub publish_timeout: Duration,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            queue_capacity: 1024,
            publish_timeout: Duration::from_secs(10),
        }
    }
}

impl MemoryConfig {
    /// Sets the queue capacity (at least 1).
    pub fn queue_capacity(mut self, capacity: usize) -> Self {
        self.queue_capacity = capacity.max(1);
        self
    }

    /// Sets the publish timeout.
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }
}

/// The in-memory router. Cheap to clone: clones share the same bus.
#[derive(Clone)]
pub struct MemoryRouter {
    inner: Arc<MemoryInner>,
}

struct MemoryInner {
    config: MemoryConfig,
    routes: RwLock<Routes>,
    closed: AtomicBool,
    next_id: AtomicU64,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    published: AtomicU64,
    delivered: AtomicU64,
    unroutable: AtomicU64,
    redelivered: AtomicU64,
    dropped: AtomicU64,
    backpressure_waits: AtomicU64,
}

#[derive(Default)]
struct Routes {
    fan_outs: Vec<Arc<Queue>>,
    groups: HashMap<String, Arc<Queue>>,
}

/// A queue: a fan-out subscription's own, or a group's shared one.
struct Queue {
    id: u64,
    name: String,
    patterns: RwLock<Vec<ChannelPattern>>,
    sender: async_channel::Sender<Delivery>,
    receiver: async_channel::Receiver<Delivery>,
    router: Weak<MemoryInner>,
}

impl Queue {
    fn matches(&self, envelope: &Envelope) -> bool {
        self.patterns
            .read()
            .expect("queue patterns lock")
            .iter()
            .any(|pattern| pattern.matches(envelope.channel()))
    }

    fn delivery(self: &Arc<Self>, envelope: Envelope) -> Delivery {
        Delivery::new(
            envelope,
            Box::new(MemoryAck {
                queue: self.clone(),
            }),
        )
    }

    /// Puts a message back, now or after `delay`, without blocking the caller.
    fn requeue(self: &Arc<Self>, envelope: Envelope, delay: Duration) {
        let Some(router) = self.router.upgrade() else {
            return;
        };
        router.counters.redelivered.fetch_add(1, Ordering::Relaxed);
        let delivery = self.delivery(envelope).redelivered(true);
        if !delay.is_zero() {
            self.requeue_later(delivery, delay);
            return;
        }
        match self.sender.try_send(delivery) {
            Ok(()) => {}
            Err(async_channel::TrySendError::Closed(delivery)) => self.lost(&router, delivery),
            Err(async_channel::TrySendError::Full(delivery)) => self.requeue_later(delivery, delay),
        }
    }

    fn requeue_later(self: &Arc<Self>, delivery: Delivery, delay: Duration) {
        let queue = self.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            if let Some(router) = self.router.upgrade() {
                self.lost(&router, delivery);
            }
            return;
        };
        runtime.spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if let Err(async_channel::SendError(delivery)) = queue.sender.send(delivery).await
                && let Some(router) = queue.router.upgrade()
            {
                queue.lost(&router, delivery);
            }
        });
    }

    fn lost(&self, router: &MemoryInner, delivery: Delivery) {
        router.counters.dropped.fetch_add(1, Ordering::Relaxed);
        let envelope = delivery.envelope();
        tracing::warn!(
            message_id = %envelope.id(),
            class = envelope.class(),
            session = envelope.session(),
            queue = %self.name,
            "a message given back to a closed subscription was dropped (the in-memory router is not persistent)"
        );
        // Discard it so that dropping it does not try to requeue it again.
        delivery.discard();
    }
}

struct MemoryAck {
    queue: Arc<Queue>,
}

impl Acknowledge for MemoryAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        ready_ok()
    }

    fn nack(
        self: Box<Self>,
        envelope: Envelope,
        action: NackAction,
    ) -> BoxFuture<'static, Result<()>> {
        let delay = match action {
            NackAction::Retry { delay } => delay,
            _ => Duration::ZERO,
        };
        self.queue.requeue(envelope, delay);
        ready_ok()
    }

    fn abandon(self: Box<Self>, envelope: Envelope) {
        self.queue.requeue(envelope, Duration::ZERO);
    }
}

/// Stops one subscription: a fan-out queue is removed and closed (its buffer drains, then the stream
/// ends); a group member only leaves (the group's queue stays for the other members).
struct MemoryControl {
    router: Weak<MemoryInner>,
    queue: Arc<Queue>,
    group: bool,
    stop: async_channel::Sender<()>,
}

impl SubscriptionControl for MemoryControl {
    fn close(&self) -> BoxFuture<'static, Result<()>> {
        self.stop.close();
        if !self.group {
            if let Some(router) = self.router.upgrade() {
                router
                    .routes
                    .write()
                    .expect("routes lock")
                    .fan_outs
                    .retain(|queue| queue.id != self.queue.id);
            }
            self.queue.sender.close();
        }
        ready_ok()
    }
}

impl Default for MemoryRouter {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryRouter {
    /// A router with the default settings (queues of 1024, publish timeout 10 s).
    pub fn new() -> Self {
        Self::with_config(MemoryConfig::default())
    }

    /// A router with these settings.
    pub fn with_config(config: MemoryConfig) -> Self {
        MemoryRouter {
            inner: Arc::new(MemoryInner {
                config,
                routes: RwLock::default(),
                closed: AtomicBool::new(false),
                next_id: AtomicU64::new(1),
                counters: Counters::default(),
            }),
        }
    }

    fn closed_error() -> Error {
        Error::Closed {
            what: "the in-memory router",
            hint: "it was closed; create a new one",
        }
    }

    async fn publish_one(&self, envelope: Envelope) -> Result<PublishOutcome> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(Self::closed_error());
        }
        inner.counters.published.fetch_add(1, Ordering::Relaxed);
        let mut delivered = 0usize;
        // Queues that are full: waited on after the routes lock is released.
        let mut full: Vec<(Arc<Queue>, Delivery)> = Vec::new();
        {
            let routes = inner.routes.read().expect("routes lock");
            for queue in routes.fan_outs.iter().chain(routes.groups.values()) {
                if !queue.matches(&envelope) {
                    continue;
                }
                match queue.sender.try_send(queue.delivery(envelope.clone())) {
                    Ok(()) => delivered += 1,
                    Err(async_channel::TrySendError::Full(delivery)) => {
                        full.push((queue.clone(), delivery))
                    }
                    // Closed between routing and sending: it was never delivered.
                    Err(async_channel::TrySendError::Closed(delivery)) => delivery.discard(),
                }
            }
        }
        for (queue, delivery) in full {
            inner
                .counters
                .backpressure_waits
                .fetch_add(1, Ordering::Relaxed);
            match tokio::time::timeout(inner.config.publish_timeout, queue.sender.send(delivery))
                .await
            {
                Ok(Ok(())) => delivered += 1,
                Ok(Err(async_channel::SendError(delivery))) => delivery.discard(),
                Err(_) => {
                    return Err(Error::Timeout {
                        operation: format!(
                            "room in the full queue of {} (capacity {}): its consumer is not keeping up",
                            queue.name, inner.config.queue_capacity
                        ),
                        after: inner.config.publish_timeout,
                    });
                }
            }
        }
        inner
            .counters
            .delivered
            .fetch_add(delivered as u64, Ordering::Relaxed);
        if delivered == 0 {
            inner.counters.unroutable.fetch_add(1, Ordering::Relaxed);
            return Ok(PublishOutcome::Unroutable);
        }
        Ok(PublishOutcome::Delivered(delivered))
    }

    async fn subscribe_now(&self, options: SubscribeOptions) -> Result<Subscription> {
        options.check()?;
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(Self::closed_error());
        }
        let capacity = inner.config.queue_capacity.max(options.prefetch);
        let make_queue = |name: String| {
            let (sender, receiver) = async_channel::bounded(capacity);
            Arc::new(Queue {
                id: inner.next_id.fetch_add(1, Ordering::Relaxed),
                name,
                patterns: RwLock::new(options.patterns.clone()),
                sender,
                receiver,
                router: Arc::downgrade(&self.inner),
            })
        };
        let (stop_sender, stop_receiver) = async_channel::bounded(1);
        let mut routes = inner.routes.write().expect("routes lock");
        let (queue, group) = match &options.distribution {
            Distribution::Group(name) => {
                let queue = routes
                    .groups
                    .entry(name.clone())
                    .or_insert_with(|| make_queue(format!("group '{name}'")))
                    .clone();
                let mut patterns = queue.patterns.write().expect("queue patterns lock");
                for pattern in &options.patterns {
                    if !patterns.contains(pattern) {
                        patterns.push(pattern.clone());
                    }
                }
                drop(patterns);
                (queue, true)
            }
            _ => {
                let patterns: Vec<String> =
                    options.patterns.iter().map(ToString::to_string).collect();
                let queue = make_queue(format!("fan-out subscription on {}", patterns.join(", ")));
                routes.fan_outs.push(queue.clone());
                (queue, false)
            }
        };
        drop(routes);
        let control = Arc::new(MemoryControl {
            router: Arc::downgrade(&self.inner),
            queue: queue.clone(),
            group,
            stop: stop_sender,
        });
        let subscription = Subscription::new(queue.receiver.clone(), control, &options);
        // A fan-out queue is this subscription's own: closing it lets its buffer drain, then ends the
        // stream. A group member reads the group's shared queue, which stays open for the others: the
        // stop signal ends its stream.
        Ok(if group {
            subscription.with_stop_signal(stop_receiver)
        } else {
            subscription
        })
    }
}

impl fmt::Debug for MemoryRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let routes = self.inner.routes.read().expect("routes lock");
        f.debug_struct("MemoryRouter")
            .field("fan_outs", &routes.fan_outs.len())
            .field("groups", &routes.groups.len())
            .field("closed", &self.inner.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl Router for MemoryRouter {
    fn backend(&self) -> &str {
        "memory"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::none()
            .ordered_per_channel(true)
            .consumer_groups(true)
            .redelivery(true)
            .publish_confirms(true)
            .reports_unroutable(true)
            .no_duplicates(true)
    }

    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, Result<PublishOutcome>> {
        Box::pin(self.publish_one(envelope))
    }

    fn subscribe(&self, options: SubscribeOptions) -> BoxFuture<'_, Result<Subscription>> {
        Box::pin(self.subscribe_now(options))
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        let inner = &self.inner;
        let closed = inner.closed.load(Ordering::Acquire);
        let counters = &inner.counters;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let routes = inner.routes.read().expect("routes lock");
        let queued: usize = routes
            .fan_outs
            .iter()
            .chain(routes.groups.values())
            .map(|q| q.sender.len())
            .sum();
        let health = Health::new(
            "memory",
            if closed {
                HealthStatus::Unhealthy
            } else {
                HealthStatus::Healthy
            },
        )
        .connected(!closed)
        .counter("published", load(&counters.published))
        .counter("delivered", load(&counters.delivered))
        .counter("unroutable", load(&counters.unroutable))
        .counter("redelivered", load(&counters.redelivered))
        .counter("dropped", load(&counters.dropped))
        .counter("backpressure_waits", load(&counters.backpressure_waits))
        .counter("queued", queued as u64)
        .counter("subscriptions", routes.fan_outs.len() as u64)
        .counter("groups", routes.groups.len() as u64)
        .detail(if closed { "closed" } else { "ok" });
        Box::pin(async move { health })
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.inner.closed.store(true, Ordering::Release);
            let routes = std::mem::take(&mut *self.inner.routes.write().expect("routes lock"));
            for queue in routes.fan_outs.iter().chain(routes.groups.values()) {
                queue.sender.close();
            }
            Ok(())
        })
    }
}
