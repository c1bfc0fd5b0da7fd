//! The in-memory router: the embedded default, for single-process systems and tests.
//!
//! It implements the whole router contract: patterns, fan-out and groups, ack/nack with redelivery,
//! bounded queues with backpressure, and close. It is not persistent: what is queued is lost when the
//! process ends.
//!
//! - Every subscription and every group has a bounded queue: at most `queue_capacity` messages (or the
//!   subscription's prefetch, if larger) queued or handed out and not yet acknowledged. A publish waits
//!   for room in every queue it goes to (backpressure) up to `publish_timeout`, then fails with
//!   [`Error::Timeout`] and is delivered nowhere: a publish is all or nothing.
//! - A group outlives its members, like a durable queue: messages for it wait until a member comes.
//!   [`MemoryRouter::remove_group`] deletes one; health counts `groups_without_members`.
//! - A reply on its way to a requester's inbox (direction `reply`, a session beginning with `inbox-`,
//!   a correlation id) does not go to a subscription made
//!   [`without_inbox_replies`](SubscribeOptions::without_inbox_replies), as agents' are, unless one of
//!   its patterns names the `reply` direction: agents, which would skip it, never hold it in their
//!   queues. A group that such a subscription has read takes such a reply only while a member
//!   subscribed with them reads it; a group only ever read by subscriptions with them (a monitor's)
//!   takes them like everything else, also while it has no member.
//! - A delivery dropped unsettled, or nacked, goes back to its queue.
//! - Messages that can no longer be delivered (a subscription dropped with messages unread, group
//!   queues when the router closes, retries waiting out their delay when their queue closes) are
//!   counted in health as `dropped` and logged, when that happens; health says `Degraded` for a
//!   minute after.
//! - Health shows what waits: `queued` (in the queues, not yet handed out) and `retries_waiting`
//!   (nacked for a retry, waiting out its delay before it is queued again).
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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::channel::{ChannelPattern, REPLY_DIRECTION};
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
    /// How many messages each queue (fan-out subscription or group) holds, queued or handed out and not
    /// yet acknowledged; a subscription with a larger prefetch gets that instead.
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
    /// Sets the queue capacity (at least 1; `usize::MAX` is as good as unbounded).
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
    /// When a message was last dropped: health says `Degraded` for [`DROP_MEMORY`] after.
    last_drop: std::sync::Mutex<Option<tokio::time::Instant>>,
}

/// How long health says `Degraded` after a message was dropped.
const DROP_MEMORY: Duration = Duration::from_secs(60);

impl Counters {
    /// Counts `count` messages dropped now.
    fn dropped(&self, count: u64) {
        self.dropped.fetch_add(count, Ordering::Relaxed);
        *self
            .last_drop
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tokio::time::Instant::now());
    }

    /// Whether a message was dropped within [`DROP_MEMORY`].
    fn dropped_lately(&self) -> bool {
        self.last_drop
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|at| at.elapsed() < DROP_MEMORY)
    }
}

#[derive(Default)]
struct Routes {
    fan_outs: Vec<Arc<Queue>>,
    groups: HashMap<String, Arc<Queue>>,
}

/// A queue: a fan-out subscription's own, or a group's shared one.
///
/// The channel itself is unbounded; `room` bounds it: a message takes a permit when it is published and
/// gives it back when it is acknowledged (or dropped for good), so the bound covers messages queued and
/// messages handed out. A nacked message keeps its permit on its way back into the queue.
struct Queue {
    id: u64,
    name: String,
    group: Option<String>,
    capacity: usize,
    patterns: RwLock<Vec<ChannelPattern>>,
    /// How many of its members' subscriptions asked for replies to requesters' inboxes that only a
    /// wildcard direction matches ([`SubscribeOptions::inbox_replies`]): they go here while any
    /// does.
    inbox_reply_members: AtomicUsize,
    /// Whether a member subscribed without inbox replies (an agent) ever read this queue. A group only
    /// ever read by members that asked for them (a monitor of every class) takes them also while it
    /// has no member, as it takes everything else.
    had_member_without_inbox_replies: AtomicBool,
    sender: async_channel::Sender<Delivery>,
    receiver: async_channel::Receiver<Delivery>,
    room: Arc<Semaphore>,
    members: AtomicUsize,
    router: Weak<MemoryInner>,
    /// Retries waiting out their delay, by number: closing the queue counts them as dropped at once
    /// (they can no longer come back), instead of when their delay ends.
    delayed: std::sync::Mutex<HashMap<u64, Delivery>>,
    next_delayed: AtomicU64,
}

/// A retry's wait on its task: when the delay is over, or when the task is dropped first (its Tokio
/// runtime ended), the retry goes back into its queue, or is counted as dropped if the queue closed.
struct DelayedRetry {
    queue: Arc<Queue>,
    number: u64,
}

impl Drop for DelayedRetry {
    fn drop(&mut self) {
        let delivery = self
            .queue
            .delayed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.number);
        // Not there: the queue closed meanwhile and counted it.
        if let Some(delivery) = delivery {
            self.queue.put_back(delivery);
        }
    }
}

impl Queue {
    /// Whether `envelope` goes to this queue. A reply on its way to a requester's inbox goes to an
    /// agent's queue (subscribed without inbox replies) only where a pattern names the `reply`
    /// direction: the agent would only skip it, and queued there it took room that every later
    /// publish to that queue waits for. A stopped agent's group filled with the replies of other
    /// agents' requests until every reply publish timed out, and an agent replying with the class it
    /// receives waited for room in its own full queue.
    fn matches(&self, envelope: &Envelope) -> bool {
        let inbox_reply = !self.wants_inbox_replies() && envelope.is_inbox_reply();
        self.patterns
            .read()
            .expect("queue patterns lock")
            .iter()
            .any(|pattern| {
                pattern.matches(envelope.channel())
                    && (!inbox_reply || pattern.direction() == Some(REPLY_DIRECTION))
            })
    }

    /// Whether inbox replies that only a wildcard direction matches go here: while a subscription
    /// reading this queue asked for them. An agent's group without such a member takes none: a reply
    /// is its requester's, who waits for it now, and queued for a member that may never come it only
    /// took room. (Set for good once a member had asked, a stopped agent's group that a subscription
    /// taking them joined for a while went on taking other agents' replies after it left, until it
    /// was full and every reply publish timed out.) A group no agent ever read (a monitor's, every
    /// member asking for them) takes them always, also while its reader restarts, like everything
    /// else it takes.
    fn wants_inbox_replies(&self) -> bool {
        self.inbox_reply_members.load(Ordering::Acquire) > 0
            || !self
                .had_member_without_inbox_replies
                .load(Ordering::Acquire)
    }

    fn delivery(self: &Arc<Self>, envelope: Envelope, permit: OwnedSemaphorePermit) -> Delivery {
        Delivery::new(
            envelope,
            Box::new(MemoryAck {
                queue: self.clone(),
                permit,
            }),
        )
    }

    /// Puts a message back, now or after `delay`, without blocking the caller.
    fn requeue(
        self: &Arc<Self>,
        envelope: Envelope,
        permit: OwnedSemaphorePermit,
        delay: Duration,
    ) {
        let delivery = self.delivery(envelope, permit).redelivered(true);
        if delay.is_zero() {
            self.put_back(delivery);
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.lost(delivery, "no Tokio runtime to wait for its retry delay");
            return;
        };
        let number = self.next_delayed.fetch_add(1, Ordering::Relaxed);
        {
            let mut delayed = self
                .delayed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Checked under the lock: `close()` closes the sender before it takes the retries, so a
            // retry added after that finds the queue closed, and is counted now instead of when its
            // delay ends (maybe never: the process may be gone by then).
            if self.sender.is_closed() {
                drop(delayed);
                self.lost(delivery, "its subscription is closed");
                return;
            }
            delayed.insert(number, delivery);
        }
        let wait = DelayedRetry {
            queue: self.clone(),
            number,
        };
        runtime.spawn(async move {
            tokio::time::sleep(delay).await;
            drop(wait);
        });
    }

    fn put_back(&self, delivery: Delivery) {
        // The channel is unbounded (the permit already holds the message's room): only a closed queue
        // refuses.
        match self.sender.try_send(delivery) {
            Ok(()) => {
                if let Some(router) = self.router.upgrade() {
                    router.counters.redelivered.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(error) => self.lost(error.into_inner(), "its subscription is closed"),
        }
    }

    fn lost(&self, delivery: Delivery, why: &str) {
        if let Some(router) = self.router.upgrade() {
            router.counters.dropped(1);
        }
        let envelope = delivery.envelope();
        tracing::warn!(
            message_id = %envelope.id(),
            class = envelope.class(),
            session = envelope.session(),
            queue = %self.name,
            "a message given back was dropped: {why} (the in-memory router is not persistent)"
        );
        // Discarded, so that dropping it does not try to requeue it again.
        delivery.discard();
    }

    /// Stops taking messages: publishers waiting for room give up, the buffer stays readable. Retries
    /// waiting out their delay can no longer come back: they are counted as dropped now, and their
    /// number returned.
    fn close(&self) -> usize {
        self.sender.close();
        self.room.close();
        let delayed: Vec<Delivery> = self
            .delayed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain()
            .map(|(_, delivery)| delivery)
            .collect();
        let count = delayed.len();
        for delivery in delayed {
            delivery.discard();
        }
        self.count_dropped(
            count,
            "messages waiting out their retry delay were dropped: their queue closed",
        );
        count
    }

    /// Drops what is still queued, counting and logging it; returns how many.
    fn drain_lost(&self, why: &str) -> usize {
        let mut count = 0;
        while let Ok(delivery) = self.receiver.try_recv() {
            delivery.discard();
            count += 1;
        }
        self.count_dropped(count, &format!("queued messages were dropped: {why}"));
        count
    }

    /// Counts `count` messages (discarded already) in health's `dropped` and logs them, when there are
    /// any: `what` says which and why.
    fn count_dropped(&self, count: usize, what: &str) {
        if count == 0 {
            return;
        }
        if let Some(router) = self.router.upgrade() {
            router.counters.dropped(count as u64);
        }
        tracing::warn!(
            queue = %self.name,
            dropped = count,
            "{count} {what} (the in-memory router is not persistent)"
        );
    }

    fn full_error(&self, after: Duration) -> Error {
        let why = match &self.group {
            Some(group) if self.members.load(Ordering::Acquire) == 0 => format!(
                "the group has no member (were its agents stopped?): start one, or delete the group with \
                 MemoryRouter::remove_group(\"{group}\")"
            ),
            _ => "its consumer is not keeping up: give it more workers (AgentOptions::concurrency) or \
                  instances, more room (MemoryConfig::queue_capacity) or a longer wait \
                  (MemoryConfig::publish_timeout), or publish more slowly"
                .to_string(),
        };
        Error::Timeout {
            operation: format!(
                "room in the full queue of {} (capacity {}): {why}",
                self.name, self.capacity
            ),
            after,
        }
    }
}

struct MemoryAck {
    queue: Arc<Queue>,
    permit: OwnedSemaphorePermit,
}

impl Acknowledge for MemoryAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        // Dropping the permit frees the message's room in the queue.
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
        let MemoryAck { queue, permit } = *self;
        queue.requeue(envelope, permit, delay);
        ready_ok()
    }

    fn abandon(self: Box<Self>, envelope: Envelope) {
        let MemoryAck { queue, permit } = *self;
        queue.requeue(envelope, permit, Duration::ZERO);
    }
}

/// Stops one subscription: a fan-out queue is removed and closed (its buffer drains, then the stream
/// ends; what is left unread when the subscription is dropped is counted as dropped); a group member
/// only leaves (the group's queue stays for the other members).
struct MemoryControl {
    router: Weak<MemoryInner>,
    queue: Arc<Queue>,
    /// Whether this subscription asked for inbox replies ([`SubscribeOptions::inbox_replies`]).
    inbox_replies: bool,
    stop: async_channel::Sender<()>,
    closed: AtomicBool,
}

impl MemoryControl {
    fn leave(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.stop.close();
        if self.queue.group.is_some() {
            if self.inbox_replies {
                self.queue
                    .inbox_reply_members
                    .fetch_sub(1, Ordering::AcqRel);
            }
            let members = self.queue.members.fetch_sub(1, Ordering::AcqRel) - 1;
            if members == 0 && self.router.upgrade().is_none() {
                // The last member of a group whose router is gone: nobody can join or read again.
                self.queue.close();
                self.queue
                    .drain_lost("the router was dropped and the group's last member left");
            }
            return;
        }
        if let Some(router) = self.router.upgrade() {
            router
                .routes
                .write()
                .expect("routes lock")
                .fan_outs
                .retain(|queue| queue.id != self.queue.id);
        }
        self.queue.close();
    }
}

impl SubscriptionControl for MemoryControl {
    fn close(&self) -> BoxFuture<'static, Result<()>> {
        self.leave();
        ready_ok()
    }
}

impl Drop for MemoryControl {
    fn drop(&mut self) {
        self.leave();
        if self.queue.group.is_none() {
            self.queue
                .drain_lost("the subscription was dropped before reading them");
        }
    }
}

impl Drop for MemoryInner {
    /// The last handle of a router dropped without `close()`: nothing can be published any more, so
    /// every queue is closed. Subscriptions still reading get what was queued for them, then their
    /// stream ends (a delivery given back after that is dropped, and logged). What group queues
    /// without members hold is dropped now, and logged: nobody can read it. (A queued message holds
    /// its queue through its acknowledger: left queued, both would stay in memory.)
    fn drop(&mut self) {
        let routes = std::mem::take(self.routes.get_mut().unwrap_or_else(|e| e.into_inner()));
        for queue in routes.fan_outs {
            queue.close();
        }
        for queue in routes.groups.into_values() {
            queue.close();
            if queue.members.load(Ordering::Acquire) == 0 {
                queue.drain_lost("the router was dropped without being closed");
            }
        }
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

    /// Deletes a group and drops what is queued for it and its retries waiting out their delay
    /// (counted and logged as dropped); returns how many messages were dropped, or `None` when
    /// there is no such group. Members still subscribed see their stream end.
    pub fn remove_group(&self, name: &str) -> Option<usize> {
        let queue = self
            .inner
            .routes
            .write()
            .expect("routes lock")
            .groups
            .remove(name)?;
        let delayed = queue.close();
        Some(delayed + queue.drain_lost(&format!("group '{name}' was removed")))
    }

    async fn publish_one(&self, envelope: Envelope) -> Result<PublishOutcome> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(Self::closed_error());
        }
        // First room in every queue the message goes to, then the sends: a publish that times out
        // waiting for room is delivered nowhere.
        let mut targets: Vec<(Arc<Queue>, Option<OwnedSemaphorePermit>)> = Vec::new();
        {
            let routes = inner.routes.read().expect("routes lock");
            for queue in routes.fan_outs.iter().chain(routes.groups.values()) {
                if queue.matches(&envelope) {
                    let permit = queue.room.clone().try_acquire_owned().ok();
                    targets.push((queue.clone(), permit));
                }
            }
        }
        if targets.iter().any(|(_, permit)| permit.is_none()) {
            inner
                .counters
                .backpressure_waits
                .fetch_add(1, Ordering::Relaxed);
            let wait = inner.config.publish_timeout;
            let now = tokio::time::Instant::now();
            // `Duration::MAX` (wait as long as it takes) cannot be added to the clock: a century will do.
            let deadline = now
                .checked_add(wait)
                .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 60 * 60));
            // Room is waited for in one order (the queues' ids) by every publish, holding no room
            // in a queue further along it: a publish holding room in A while it waits for C, and
            // another holding C while it waits for A, would wait for each other until both time out.
            targets.sort_unstable_by_key(|(queue, _)| queue.id);
            for index in 0..targets.len() {
                if targets[index].1.is_some() {
                    continue;
                }
                for (_, later) in &mut targets[index + 1..] {
                    *later = None;
                }
                let (queue, permit) = &mut targets[index];
                match tokio::time::timeout_at(deadline, queue.room.clone().acquire_owned()).await {
                    Ok(Ok(acquired)) => *permit = Some(acquired),
                    // The queue closed meanwhile: it is skipped.
                    Ok(Err(_)) => {}
                    Err(_) => return Err(queue.full_error(wait)),
                }
            }
        }
        let last = targets.iter().rposition(|(_, permit)| permit.is_some());
        let mut envelope = Some(envelope);
        let mut delivered = 0usize;
        for (index, (queue, permit)) in targets.into_iter().enumerate() {
            let Some(permit) = permit else { continue };
            let copy = if Some(index) == last {
                envelope.take()
            } else {
                envelope.clone()
            }
            .expect("the envelope is moved into the last target only");
            match queue.sender.try_send(queue.delivery(copy, permit)) {
                Ok(()) => delivered += 1,
                // Closed between routing and sending: it was never delivered there.
                Err(error) => error.into_inner().discard(),
            }
        }
        if delivered == 0 && inner.closed.load(Ordering::Acquire) {
            // The router closed while this publish waited for room (or between its check and its
            // sends): every queue refused it because it closed, not because nobody subscribes.
            return Err(Self::closed_error());
        }
        // Counted once it went through: a publish that timed out, or met the router closing, was
        // not published (its caller got the error).
        inner.counters.published.fetch_add(1, Ordering::Relaxed);
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
        // A semaphore holds at most `MAX_PERMITS` (2^61 - 1) permits and panics beyond: a larger
        // capacity (`usize::MAX` for "unbounded") is that many, which no process reaches anyway.
        let capacity = inner
            .config
            .queue_capacity
            .max(options.prefetch)
            .clamp(1, Semaphore::MAX_PERMITS);
        let make_queue = |name: String, group: Option<String>| {
            let (sender, receiver) = async_channel::unbounded();
            Arc::new(Queue {
                id: inner.next_id.fetch_add(1, Ordering::Relaxed),
                name,
                group,
                capacity,
                patterns: RwLock::new(options.patterns.clone()),
                inbox_reply_members: AtomicUsize::new(0),
                had_member_without_inbox_replies: AtomicBool::new(false),
                sender,
                receiver,
                room: Arc::new(Semaphore::new(capacity)),
                members: AtomicUsize::new(0),
                router: Arc::downgrade(&self.inner),
                delayed: std::sync::Mutex::default(),
                next_delayed: AtomicU64::new(0),
            })
        };
        let (stop_sender, stop_receiver) = async_channel::bounded(1);
        let mut routes = inner.routes.write().expect("routes lock");
        // Again under the lock: `close()` sets the flag before it takes the routes, so a close that
        // came after the check above either finds this queue in the routes and closes it, or has
        // already set the flag. (Added to the routes close left behind, the subscription would stay
        // open, its stream never ending, on a closed router.)
        if inner.closed.load(Ordering::Acquire) {
            return Err(Self::closed_error());
        }
        let queue = match &options.distribution {
            Distribution::Group(name) => {
                let queue = routes
                    .groups
                    .entry(name.clone())
                    .or_insert_with(|| make_queue(format!("group '{name}'"), Some(name.clone())))
                    .clone();
                let mut patterns = queue.patterns.write().expect("queue patterns lock");
                for pattern in &options.patterns {
                    if !patterns.contains(pattern) {
                        patterns.push(pattern.clone());
                    }
                }
                drop(patterns);
                queue
            }
            _ => {
                let patterns: Vec<String> =
                    options.patterns.iter().map(ToString::to_string).collect();
                let queue = make_queue(
                    format!("fan-out subscription on {}", patterns.join(", ")),
                    None,
                );
                routes.fan_outs.push(queue.clone());
                queue
            }
        };
        if options.inbox_replies {
            queue.inbox_reply_members.fetch_add(1, Ordering::AcqRel);
        } else {
            queue
                .had_member_without_inbox_replies
                .store(true, Ordering::Release);
        }
        queue.members.fetch_add(1, Ordering::AcqRel);
        drop(routes);
        let group = queue.group.is_some();
        let control = Arc::new(MemoryControl {
            router: Arc::downgrade(&self.inner),
            queue: queue.clone(),
            inbox_replies: options.inbox_replies,
            stop: stop_sender,
            closed: AtomicBool::new(false),
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
        let queues = || routes.fan_outs.iter().chain(routes.groups.values());
        let queued: usize = queues().map(|q| q.receiver.len()).sum();
        let retries_waiting: usize = queues()
            .map(|q| {
                q.delayed
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .len()
            })
            .sum();
        let idle_groups = routes
            .groups
            .values()
            .filter(|q| q.members.load(Ordering::Acquire) == 0)
            .count();
        let (status, detail) = if closed {
            (HealthStatus::Unhealthy, "closed")
        } else if counters.dropped_lately() {
            (
                HealthStatus::Degraded,
                "messages were dropped in the last minute (left unread in a subscription dropped or \
                 closed, given back or retried after their queue closed, or in a removed group): see \
                 the `dropped` counter and the WARN logs",
            )
        } else {
            (HealthStatus::Healthy, "ok")
        };
        let health = Health::new("memory", status)
            .connected(!closed)
            .counter("published", load(&counters.published))
            .counter("delivered", load(&counters.delivered))
            .counter("unroutable", load(&counters.unroutable))
            .counter("redelivered", load(&counters.redelivered))
            .counter("dropped", load(&counters.dropped))
            .counter("backpressure_waits", load(&counters.backpressure_waits))
            .counter("queued", queued as u64)
            .counter("retries_waiting", retries_waiting as u64)
            .counter("subscriptions", routes.fan_outs.len() as u64)
            .counter("groups", routes.groups.len() as u64)
            .counter("groups_without_members", idle_groups as u64)
            .detail(detail);
        Box::pin(async move { health })
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.inner.closed.store(true, Ordering::Release);
            let routes = std::mem::take(&mut *self.inner.routes.write().expect("routes lock"));
            for queue in &routes.fan_outs {
                // Subscribers read what they have buffered, then their streams end.
                queue.close();
            }
            for queue in routes.groups.values() {
                queue.close();
                queue.drain_lost("the router closed");
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::parse_channel;

    /// A message queued for a group without members, in a router dropped without `close()`: the queue
    /// and the message go with the router (before, each held the other).
    #[tokio::test]
    async fn a_router_dropped_without_close_frees_what_its_queues_held() {
        let router = MemoryRouter::new();
        let pattern = ChannelPattern::parse("Ping:*:*").unwrap();
        let subscription = router
            .subscribe(SubscribeOptions::new(pattern).group("workers"))
            .await
            .unwrap();
        drop(subscription);
        let envelope = Envelope::new(
            parse_channel("Ping:event:s1").unwrap(),
            "application/json",
            &b"{}"[..],
        );
        router.publish(envelope).await.unwrap();
        let routes = router.inner.routes.read().unwrap();
        let queue = Arc::downgrade(routes.groups.get("workers").unwrap());
        drop(routes);
        assert_eq!(queue.upgrade().map(|q| q.receiver.len()), Some(1));
        drop(router);
        assert!(
            queue.upgrade().is_none(),
            "the group's queue outlived its router: {} strong references",
            queue.strong_count()
        );
    }

    /// Subscriptions that outlive every handle of their router still read what was queued for them,
    /// then their stream ends (nothing can be published any more); the queue goes with its last reader.
    #[tokio::test]
    async fn live_subscriptions_read_what_was_queued_then_end_after_the_router_is_dropped() {
        for group in [None, Some("workers")] {
            let router = MemoryRouter::new();
            let mut options = SubscribeOptions::new(ChannelPattern::parse("Ping:*:*").unwrap());
            if let Some(group) = group {
                options = options.group(group);
            }
            let mut subscription = router.subscribe(options).await.unwrap();
            let envelope = Envelope::new(
                parse_channel("Ping:event:s1").unwrap(),
                "application/json",
                &b"{}"[..],
            );
            router.publish(envelope.clone()).await.unwrap();
            router.publish(envelope).await.unwrap();
            let queue = {
                let routes = router.inner.routes.read().unwrap();
                match group {
                    Some(group) => Arc::downgrade(routes.groups.get(group).unwrap()),
                    None => Arc::downgrade(&routes.fan_outs[0]),
                }
            };
            drop(router);
            for _ in 0..2 {
                let delivery = tokio::time::timeout(Duration::from_secs(2), subscription.next())
                    .await
                    .expect("a delivery")
                    .expect("what was queued is still delivered");
                delivery.ack().await.unwrap();
            }
            let end = tokio::time::timeout(Duration::from_secs(2), subscription.next())
                .await
                .expect("the stream ends instead of waiting forever");
            assert!(end.is_none(), "{group:?}");
            drop(subscription);
            assert!(
                queue.upgrade().is_none(),
                "{group:?}: the queue outlived its last reader and its router"
            );
        }
    }
}
