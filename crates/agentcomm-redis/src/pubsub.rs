//! Pub/sub delivery: one subscriber connection per router; each subscription reads the client's own
//! message channel, with no task in between.
//!
//! - After each reconnect of the subscriber, a task of this module subscribes again to every Redis
//!   channel and glob in use and confirms with a `PING`, retrying with backoff until it succeeds; health
//!   says `Degraded` meanwhile (fred's own `manage_subscriptions` only logs a failure, and stops for good
//!   when it misses a reconnection event).
//! - While there are subscriptions, another task checks that the subscriber connection still answers
//!   (see [`check_liveness`]): a subscriber writes nothing, so a connection the network silently
//!   stopped carrying (a NAT or firewall that dropped its state, a partition: nothing is closed) would
//!   otherwise never be found out, and its subscriptions would wait for ever, deaf, with nothing counted.
//! - The client's message channel is a broadcast ring sized for bursts
//!   ([`Settings::broadcast_capacity`], 65,536 instead of fred's 32); every subscription has its own
//!   cursor in it, so a slow subscription never holds up the others. A subscription that falls more
//!   than the ring behind skips the oldest messages of the ring (all channels of the router): that is
//!   counted as `lagged`, and what the subscription lost of its own channels shows as gaps in the
//!   publishers' sequences, counted exactly as `lost`.
//! - As the subscriber polls, its subscription skips messages on Redis channels none of its own Redis
//!   subscriptions cover (without decoding them), decodes the rest, keeps what its patterns match
//!   ([`ChannelPattern::matches`], the one matcher) and checks their sequence numbers
//!   ([`crate::sequence`]: gaps counted as `lost`, repeats discarded as `duplicates`); the numbers of
//!   channels it does not deliver (a wildcard class listens to the whole prefix) are not followed.
//! - A nacked or abandoned delivery is delivered again to its subscription, from memory (no broker
//!   redelivery exists in pub/sub).
//!
//! [`Settings::broadcast_capacity`]: crate::builder::Settings

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use agentcomm_core::channel::{ChannelPattern, parse_channel};
use agentcomm_core::envelope::{Envelope, FrameDecoder};
use agentcomm_core::error::{Error, Result};
use agentcomm_core::router::{
    Acknowledge, BoxFuture, Delivery, Distribution, NackAction, SubscribeOptions, Subscription,
    SubscriptionControl,
};
use bytes::Bytes;
use fred::bytes_utils::Str;
use fred::clients::SubscriberClient;
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use fred::types::{Message, MessageKind};
use tokio::sync::broadcast::{self, error::RecvError};

use crate::connection::{
    Connecting, Role, connect_error, gave_up_error, map_error, on_node_of, redact,
    unresponsive_limit, watch_client_with, watch_connection_task,
};
use crate::counters::{Counters, SummedLog};
use crate::keys::RedisSubscription;
use crate::router::Shared;
use crate::sequence::{SEQUENCE_HEADER, SequenceTracker, Verdict, note_lost_on};

/// Where a subscribe's counting of its Redis subscriptions stands: under way, done (the counts are
/// held and wait for the subscribe to take them), taken by the subscribe, or given up by it (the
/// counts, once held, are given back).
const CLAIM_OPEN: u8 = 0;
const CLAIM_DONE: u8 = 1;
const CLAIM_TAKEN: u8 = 2;
const CLAIM_GIVEN_UP: u8 = 3;

/// A subscribe's claim on the counts its task takes. Dropped before the subscribe took them (it timed
/// out, failed, or its caller dropped it), it gives them up: the task gives them back when it
/// finishes, or, if it already has, a task is started to do it.
struct Claim {
    state: Arc<AtomicU8>,
    /// The router's runtime, where the counts are given back.
    runtime: tokio::runtime::Handle,
    hub: Arc<PubSubHub>,
    redis: Vec<RedisSubscription>,
}

impl Claim {
    /// Takes the counts, if they are held and not given up.
    fn take(&self) -> bool {
        self.state
            .compare_exchange(CLAIM_DONE, CLAIM_TAKEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let before = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| {
                (state != CLAIM_TAKEN).then_some(CLAIM_GIVEN_UP)
            });
        if before == Ok(CLAIM_DONE) {
            // On the router's runtime: the subscribe may be dropped outside any.
            let (hub, redis) = (self.hub.clone(), std::mem::take(&mut self.redis));
            self.runtime
                .spawn(async move { hub.give_back(&redis).await });
        }
    }
}

/// The subscriber side of a router.
pub(crate) struct PubSubHub {
    client: SubscriberClient,
    /// How many local subscriptions use each Redis subscription.
    redis: tokio::sync::Mutex<HashMap<RedisSubscription, usize>>,
    /// The globs among them, for the readers (see [`ConnectionGlobs`]).
    globs: Arc<ConnectionGlobs>,
    open: AtomicU64,
    next_id: AtomicU64,
    subscriptions: std::sync::Mutex<HashMap<u64, Arc<PubSubSubscription>>>,
    /// Set from a reconnection until every Redis subscription is confirmed again.
    resubscribing: Arc<AtomicBool>,
    /// Ends the resubscribing task.
    stop: tokio::sync::watch::Sender<bool>,
    /// Set when the subscriber gave up reconnecting (`max_reconnect_attempts`): it never connects
    /// again, and its subscriptions were ended.
    gave_up: AtomicBool,
    /// `gave_up`, for subscribes waiting for their confirmation to wait on.
    gave_up_signal: tokio::sync::watch::Sender<bool>,
    /// Woken when a restore round ends with every Redis subscription confirmed (`resubscribing`
    /// cleared), for requests waiting for their reply inbox (see [`PubSubHub::restored_within`]).
    restored: tokio::sync::Notify,
}

pub(crate) struct PubSubSubscription {
    id: u64,
    redis: Vec<RedisSubscription>,
    /// The globs of the subscriber connection, the other subscriptions' included.
    globs: Arc<ConnectionGlobs>,
    closed: AtomicBool,
    /// Deliveries given back (nack, abandon), delivered again before new messages.
    again: async_channel::Sender<Delivery>,
    /// Wakes the stream when the subscription closes.
    stop: tokio::sync::watch::Sender<bool>,
    /// Set with `stop` (see [`PubSubSubscription::signal_stop`]): the reader looks at it for every
    /// message, and a load costs less than `stop.borrow()`, which takes the watch's lock.
    stopping: AtomicBool,
}

impl PubSubHub {
    /// Connects the subscriber client.
    pub(crate) async fn start(shared: &Arc<Shared>) -> Result<Arc<Self>> {
        let settings = &shared.settings;
        let client = shared
            .fred_builder(Role::Subscriber)
            .build_subscriber_client()
            .map_err(|error| map_error(&error, settings, "creating the pub/sub subscriber"))?;
        // Stopped if this is dropped before the hub owns the client.
        let mut connecting = Connecting::start(&client);
        let connect = tokio::time::timeout(settings.connect_timeout * 2, connecting.wait()).await;
        match connect {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                return Err(connect_error(
                    &error,
                    settings,
                    "connecting the pub/sub subscriber",
                ));
            }
            Err(_) => {
                quit_small(&client);
                let _ = tokio::time::timeout(Duration::from_secs(1), client.quit()).await;
                return Err(Error::Connection {
                    backend: "redis",
                    url: redact(&settings.url),
                    message: format!(
                        "the pub/sub subscriber could not connect within {:?}",
                        settings.connect_timeout * 2
                    ),
                });
            }
        }
        let resubscribing = Arc::new(AtomicBool::new(false));
        let (reconnected, reconnections) = tokio::sync::watch::channel(0u64);
        {
            let flag = resubscribing.clone();
            let lost = resubscribing.clone();
            watch_client_with(
                &client,
                "pub/sub subscriber",
                shared.counters.clone(),
                &settings.url,
                move || {
                    flag.store(true, Ordering::Release);
                    reconnected.send_modify(|count| *count += 1);
                },
                // Set as soon as the connection is lost: fred says it is connected until its next
                // attempt, after the reconnect delay, and a request sent meanwhile (on the pool,
                // which often reconnects first) had its reply published before its inbox was
                // subscribed again. The restore round after the reconnection clears it.
                move || lost.store(true, Ordering::Release),
            );
        }
        let task = connecting.keep_task();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let hub = Arc::new(PubSubHub {
            client,
            redis: tokio::sync::Mutex::new(HashMap::new()),
            globs: Arc::default(),
            open: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            subscriptions: std::sync::Mutex::new(HashMap::new()),
            resubscribing,
            stop,
            gave_up: AtomicBool::new(false),
            gave_up_signal: tokio::sync::watch::Sender::new(false),
            restored: tokio::sync::Notify::new(),
        });
        if let Some(task) = task {
            let hub = Arc::downgrade(&hub);
            let url = redact(&settings.url);
            watch_connection_task(task, move || {
                if let Some(hub) = hub.upgrade() {
                    hub.given_up(&url);
                }
            });
        }
        tokio::spawn(check_liveness(
            Arc::downgrade(&hub),
            reconnections.clone(),
            stopped.clone(),
            // How often, and how long a PING may go unanswered: fred's own limit, so that a
            // connection that goes silent is found out within about twice this, plus half a second
            // (fred looks every 500 ms).
            unresponsive_limit(settings.command_timeout),
        ));
        tokio::spawn(resubscribe_after_reconnects(
            Arc::downgrade(&hub),
            reconnections,
            stopped,
            settings.reconnect,
            settings.command_timeout,
        ));
        Ok(hub)
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.client.is_connected()
    }

    /// Whether the subscriber gave up reconnecting.
    pub(crate) fn gave_up(&self) -> bool {
        self.gave_up.load(Ordering::Acquire)
    }

    /// The subscriber's connection task ended: unless the hub closed it, the subscriber gave up
    /// reconnecting and never receives again. Every subscription ends (after what it already
    /// received), rather than waiting for ever; new ones are refused.
    fn given_up(&self, url: &str) {
        if *self.stop.borrow() {
            return;
        }
        self.gave_up.store(true, Ordering::Release);
        self.gave_up_signal.send_replace(true);
        self.restored.notify_waiters();
        // Taken out, as `remove` would (which, once `closed` is set, does nothing): health no longer
        // counts them. Their Redis subscriptions are not given back: a command written to a client
        // that gave up waits out the command timeout.
        let open: Vec<Arc<PubSubSubscription>> = self
            .subscriptions
            .lock()
            .expect("subscriptions lock")
            .drain()
            .map(|(_, subscription)| subscription)
            .collect();
        for subscription in &open {
            if !subscription.closed.swap(true, Ordering::AcqRel) {
                self.open.fetch_sub(1, Ordering::Relaxed);
            }
            subscription.signal_stop();
            subscription.again.close();
        }
        tracing::error!(
            url,
            subscriptions = open.len(),
            "the pub/sub subscriber gave up reconnecting (max_reconnect_attempts); its subscriptions \
             have ended: connect a new router"
        );
    }

    pub(crate) fn is_resubscribing(&self) -> bool {
        self.resubscribing.load(Ordering::Acquire)
    }

    /// Waits, for `limit` at most, until the subscriber is connected with every Redis subscription
    /// confirmed (or gave up, or closed). A request's reply inbox is one of them: a reply published
    /// while it is being restored after a reconnection reaches nobody (Redis pub/sub keeps nothing),
    /// and its requester would wait out its whole timeout. Returns whether it is.
    pub(crate) async fn restored_within(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.restored.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.gave_up() || *self.stop.borrow() {
                return false;
            }
            if self.client.is_connected() && !self.is_resubscribing() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    pub(crate) fn subscription_count(&self) -> usize {
        self.open.load(Ordering::Relaxed) as usize
    }

    pub(crate) async fn subscribe(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        options: SubscribeOptions,
    ) -> Result<Subscription> {
        if self.gave_up() {
            return Err(gave_up_error(&shared.settings));
        }
        if let Distribution::Group(_) = options.distribution {
            return Err(Error::Unsupported {
                backend: "redis-pubsub".into(),
                feature: "consumer groups",
                fix: "subscribe with fan-out (`AgentOptions::new().fan_out()` for agents), or use \
                      `DeliveryMode::Streams`, which has consumer groups",
            });
        }
        let mut redis: Vec<RedisSubscription> = options
            .patterns
            .iter()
            .map(|pattern| shared.keys.pubsub_subscription(pattern))
            .collect();
        redis.sort();
        redis.dedup();
        // The receiver exists before Redis confirms, so nothing arriving right after is missed.
        let messages = Arc::new(tokio::sync::Mutex::new(self.client.message_rx()));
        let (again, again_receiver) = async_channel::unbounded();
        let (stop, stop_receiver) = tokio::sync::watch::channel(false);
        let subscription = Arc::new(PubSubSubscription {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            redis: redis.clone(),
            globs: self.globs.clone(),
            closed: AtomicBool::new(false),
            again,
            stop,
            stopping: AtomicBool::new(false),
        });
        // Counted and confirmed on a task of its own, which this call can give up on (a timeout, or
        // its caller dropping it) without leaving a count half taken, or held by nobody: see `Claim`.
        let state = Arc::new(AtomicU8::new(CLAIM_OPEN));
        let adding = {
            let (hub, redis, state) = (self.clone(), redis.clone(), state.clone());
            let settings = shared.settings.clone();
            tokio::spawn(async move {
                let result = hub.add_redis(&redis, &settings).await;
                if result.is_ok()
                    && state
                        .compare_exchange(
                            CLAIM_OPEN,
                            CLAIM_DONE,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        )
                        .is_err()
                {
                    // Given up meanwhile: nobody will use them.
                    hub.give_back(&redis).await;
                }
                result
            })
        };
        let claim = Claim {
            state,
            runtime: shared.runtime.clone(),
            hub: self.clone(),
            redis: redis.clone(),
        };
        // A close or a give-up meanwhile ends the wait: a command fred had not written yet when the
        // connection went would otherwise keep the task (and this subscribe) until the command timeout.
        let (mut stopping, mut giving_up) =
            (self.stop.subscribe(), self.gave_up_signal.subscribe());
        let waited = tokio::time::timeout(shared.settings.command_timeout, async {
            tokio::select! {
                biased;
                added = adding => Some(added),
                _ = giving_up.wait_for(|gave_up| *gave_up) => None,
                _ = stopping.wait_for(|stop| *stop) => None,
            }
        });
        let taken = match waited.await {
            Ok(Some(Ok(Ok(())))) => claim.take(),
            Ok(Some(Ok(Err(error)))) => return Err(error),
            Ok(Some(Err(error))) => {
                return Err(Error::Backend {
                    backend: "redis",
                    message: format!("subscribing stopped unexpectedly: {error}"),
                });
            }
            // Dropping the claim gives the counts up: the task gives them back when it is done (on a
            // connection that is quit or never comes back, without unsubscribing).
            Ok(None) if *self.stop.borrow() => return Err(closed_while_confirming()),
            Ok(None) => return Err(gave_up_error(&shared.settings)),
            // Taken if the task got them just as the time ran out.
            Err(_) => claim.take(),
        };
        if !taken {
            // Dropping the claim gives the counts up: the task gives them back when it is done.
            return Err(Error::Timeout {
                operation: "Redis to confirm a pub/sub subscription".into(),
                after: shared.settings.command_timeout,
            });
        }
        // Nothing waits from here to the subscription's registration, which now owns the counts.
        {
            // Registered only while the hub is open and its subscriber has not given up, checked under
            // the lock `close` and `given_up` list the subscriptions under, after they set `stop` or
            // `gave_up`: either they find this one and end it, or this sees them. Registered after
            // that list, it would be left out, and returned as live on a closed router, or on a
            // connection that never comes back.
            let mut subscriptions = self.subscriptions.lock().expect("subscriptions lock");
            let closing = *self.stop.borrow();
            if !closing && !self.gave_up() {
                self.open.fetch_add(1, Ordering::Relaxed);
                subscriptions.insert(subscription.id, subscription.clone());
                drop(subscriptions);
            } else {
                drop(subscriptions);
                subscription.closed.store(true, Ordering::Release);
                subscription.signal_stop();
                subscription.again.close();
                // Its counts are not given back: the hub's connection is being quit, or never comes
                // back, and a command written to such a client waits out the command timeout.
                if !closing {
                    return Err(gave_up_error(&shared.settings));
                }
                return Err(closed_while_confirming());
            }
        }
        let reader = Reader {
            messages: messages.clone(),
            again: again_receiver.clone(),
            stop: stop_receiver,
            subscription: subscription.clone(),
            patterns: options.patterns.clone(),
            shared: Arc::downgrade(shared),
            tracker: SequenceTracker::new(shared.settings.reorder_window),
            last_sweep: Instant::now(),
            done: false,
            left: None,
            last: None,
            covered: None,
            decoder: FrameDecoder::new(),
            losses: Losses::new(shared.settings.broadcast_capacity),
        };
        let control = Arc::new(PubSubControl {
            hub: Arc::downgrade(self),
            subscription,
        });
        // Boxed: the stream moves its state in and out for every message.
        let deliveries = futures::stream::unfold(Box::new(reader), |mut reader| async move {
            let delivery = reader.next().await?;
            Some((delivery, reader))
        });
        let stream = PubSubStream {
            // Fused: the runtime may poll again after the end.
            deliveries: Box::pin(futures::StreamExt::fuse(deliveries)),
            messages,
            again: Box::new(again_receiver),
        };
        Ok(Subscription::from_stream(stream, control, &options))
    }

    /// Subscribes to what `wanted` needs and is not subscribed yet, then confirms with a `PING`. On a
    /// failure nothing stays counted, and what this call subscribed is unsubscribed again. Not to be
    /// cancelled (it runs on a task of its own): a count taken would stay.
    async fn add_redis(
        &self,
        wanted: &[RedisSubscription],
        settings: &crate::builder::Settings,
    ) -> Result<()> {
        let mut counts = self.redis.lock().await;
        // Closing: its connection is quit, where fred would keep a command until the command timeout
        // (and this task the hub with it).
        if *self.stop.borrow() {
            return Err(Error::Closed {
                what: "the Redis router",
                hint: "it was closed while this subscription was being set up; connect a new one",
            });
        }
        // Gave up reconnecting (while this waited for the counts): likewise, the connection never
        // comes back.
        if self.gave_up() {
            return Err(gave_up_error(settings));
        }
        // Reconnections from here on: see the end.
        let mut reconnections = self.client.reconnect_rx();
        // Everything it needs is sent, also what another local subscription already counts (Redis
        // ignores a repeat): what is counted may not be subscribed on the connection the PING below
        // is answered on. After a reconnection that the restore round has not served yet, or one not
        // even seen yet (a PING written while the subscriber is cut off waits for the new
        // connection), a count alone would confirm this subscription live while Redis has nothing
        // for it, and what is published until the restore round runs would reach nobody, uncounted.
        for (done, subscription) in wanted.iter().enumerate() {
            let result = match subscription {
                RedisSubscription::Channel(name) => self.client.subscribe(name.as_str()).await,
                RedisSubscription::Pattern(glob) => self.client.psubscribe(glob.as_str()).await,
            };
            if let Err(error) = result {
                self.release(&mut counts, &wanted[..done]).await;
                return Err(map_error(&error, settings, "subscribing"));
            }
            *counts.entry(subscription.clone()).or_insert(0) += 1;
        }
        self.globs.update(&counts);
        // fred resolves SUBSCRIBE when it is written, not when Redis confirms it. Redis answers the
        // commands of one connection in order, so once this PING is answered the subscriptions are live
        // on the connection that answered it.
        let confirmed = self.ping_subscriptions_node().await;
        if let Err(error) = confirmed {
            self.release(&mut counts, wanted).await;
            return Err(map_error(
                &error,
                settings,
                "confirming a subscription (PING)",
            ));
        }
        // Unless the connection changed on the way: fred does not write a SUBSCRIBE again after a
        // reconnection (it counts as done once written), but does write the PING again, and the new
        // connection answers it. fred announces a reconnection before it writes anything on the new
        // connection, so a PING answered there is answered after the announcement: then everything is
        // sent again on the new connection and confirmed again.
        let mut rounds = 0;
        while reconnected(&mut reconnections) {
            // Bounded: it holds the counts, which closing and the restore rounds wait for.
            rounds += 1;
            if rounds > MAX_SUBSCRIBE_ROUNDS {
                self.release(&mut counts, wanted).await;
                return Err(Error::Connection {
                    backend: "redis",
                    url: redact(&settings.url),
                    message: format!(
                        "the pub/sub subscriber reconnected {MAX_SUBSCRIBE_ROUNDS} times while a \
                         subscription was being confirmed; the connection keeps dropping"
                    ),
                });
            }
            let mut again = Ok(());
            for subscription in wanted {
                again = match subscription {
                    RedisSubscription::Channel(name) => self.client.subscribe(name.as_str()).await,
                    RedisSubscription::Pattern(glob) => self.client.psubscribe(glob.as_str()).await,
                };
                if again.is_err() {
                    break;
                }
            }
            if again.is_ok() {
                again = self.ping_subscriptions_node().await;
            }
            if let Err(error) = again {
                self.release(&mut counts, wanted).await;
                return Err(map_error(
                    &error,
                    settings,
                    "subscribing again after a reconnection",
                ));
            }
        }
        Ok(())
    }

    /// Gives back one count of each of `taken`, and unsubscribes from those nobody uses any more.
    async fn release(
        &self,
        counts: &mut HashMap<RedisSubscription, usize>,
        taken: &[RedisSubscription],
    ) {
        for redis in taken {
            let Some(count) = counts.get_mut(redis) else {
                continue;
            };
            *count = count.saturating_sub(1);
            if *count > 0 {
                continue;
            }
            counts.remove(redis);
            // Closing, or given up reconnecting: the connection is quit anyway, or never comes back,
            // and fred would keep the command until the command timeout. Cut off (reconnecting): the
            // subscription went with the connection, and the restore round after the reconnection
            // (which waits for these counts) subscribes only to what is still counted; fred would keep
            // the command until the connection is back, or the command timeout, and the close with it.
            if *self.stop.borrow() || self.gave_up() || !self.client.is_connected() {
                continue;
            }
            let result = match redis {
                RedisSubscription::Channel(name) => self.client.unsubscribe(name.as_str()).await,
                RedisSubscription::Pattern(glob) => self.client.punsubscribe(glob.as_str()).await,
            };
            if let Err(error) = result {
                tracing::debug!(error = %error, "could not unsubscribe; the connection closes anyway");
            }
        }
        self.globs.update(counts);
    }

    /// Takes a subscription out: its stream ends after what it already received; Redis subscriptions
    /// nobody uses any more are dropped.
    async fn remove(&self, subscription: &Arc<PubSubSubscription>) {
        if subscription.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        subscription.signal_stop();
        subscription.again.close();
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.subscriptions
            .lock()
            .expect("subscriptions lock")
            .remove(&subscription.id);
        self.give_back(&subscription.redis).await;
    }

    /// [`PubSubHub::release`] under the counts' lock.
    async fn give_back(&self, taken: &[RedisSubscription]) {
        let mut counts = self.redis.lock().await;
        self.release(&mut counts, taken).await;
    }

    /// Ends every subscription and disconnects, by `until` at the latest.
    pub(crate) async fn close(&self, until: tokio::time::Instant) {
        self.stop.send_replace(true);
        self.restored.notify_waiters();
        let open: Vec<Arc<PubSubSubscription>> = self
            .subscriptions
            .lock()
            .expect("subscriptions lock")
            .values()
            .cloned()
            .collect();
        // Each stream ends now; unsubscribing is only manners, bounded by the deadline.
        for subscription in &open {
            subscription.signal_stop();
        }
        let removing = async {
            for subscription in &open {
                self.remove(subscription).await;
            }
        };
        let _ = tokio::time::timeout_at(until, removing).await;
        for subscription in &open {
            subscription.closed.store(true, Ordering::Release);
            subscription.again.close();
        }
        quit_small(&self.client);
        let quit = tokio::time::timeout(Duration::from_secs(1), self.client.quit()).await;
        if !matches!(quit, Ok(Ok(()))) {
            tracing::debug!("the pub/sub subscriber did not quit cleanly");
        }
    }

    /// Subscribes again to every Redis channel and glob in use, then confirms with a `PING`.
    async fn resubscribe(&self) -> std::result::Result<(), fred::error::Error> {
        let counts = self.redis.lock().await;
        let mut channels: Vec<&str> = Vec::new();
        let mut patterns: Vec<&str> = Vec::new();
        for redis in counts.keys() {
            match redis {
                RedisSubscription::Channel(name) => channels.push(name),
                RedisSubscription::Pattern(glob) => patterns.push(glob),
            }
        }
        if !channels.is_empty() {
            self.client.subscribe(channels).await?;
        }
        if !patterns.is_empty() {
            self.client.psubscribe(patterns).await?;
        }
        self.ping_subscriptions_node().await?;
        Ok(())
    }

    /// A `PING` on the connection that carries the subscriptions. In a cluster fred sends `SUBSCRIBE`
    /// and `PSUBSCRIBE` to the node of the slot of the client's id; a plain `PING` could go to another
    /// node and be answered before the subscriptions are registered.
    async fn ping_subscriptions_node(&self) -> std::result::Result<(), fred::error::Error> {
        self.ping_subscriptions_node_within(None).await
    }

    /// [`PubSubHub::ping_subscriptions_node`], failed by fred after `timeout` (`None`: the command
    /// timeout).
    async fn ping_subscriptions_node_within(
        &self,
        timeout: Option<Duration>,
    ) -> std::result::Result<(), fred::error::Error> {
        let options = on_node_of(&self.client, self.client.id().as_bytes(), timeout);
        let _: fred::types::Value = self.client.with_options(&options).ping(None).await?;
        Ok(())
    }
}

/// How many times a subscribe sends its subscriptions again because the subscriber reconnected meanwhile
/// before it gives up.
const MAX_SUBSCRIBE_ROUNDS: u32 = 5;

/// Whether `reconnections` announced a reconnection since it was last looked at (all announcements
/// are taken).
fn reconnected(reconnections: &mut broadcast::Receiver<fred::types::config::Server>) -> bool {
    let mut any = false;
    loop {
        match reconnections.try_recv() {
            Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => any = true,
            Err(broadcast::error::TryRecvError::Empty | broadcast::error::TryRecvError::Closed) => {
                return any;
            }
        }
    }
}

/// How long after fred's own limit the check waits for fred to find an unanswered connection, before
/// it makes the connection again itself: fred looks every 500 ms.
const LIVENESS_MARGIN: Duration = Duration::from_secs(1);

/// Checks, every `limit` while the hub has subscriptions, that the subscriber connection still answers
/// a `PING`. The subscriber otherwise writes nothing, and fred finds a connection unresponsive only
/// when a command written to it goes unanswered (pub/sub commands not even then): a connection the
/// network silently stopped carrying was never found out, and its subscriptions received nothing, for
/// ever, with nothing counted or logged and health `Healthy`. The `PING` is such a command: fred closes
/// a connection that leaves it unanswered for `limit`, and reconnects (counted in `reconnects` and
/// `connection_errors`); the restore round then subscribes again, and the publishers' sequence numbers
/// count what was published meanwhile as `lost`. Should the connection still stand a second after
/// that, having neither answered the `PING` nor carried a message meanwhile, it is made again here,
/// with a warning. An answer is waited for that long whatever the command timeout: a connection that
/// answers late, but before fred's limit, is kept. No check runs
/// while the subscriber reconnects or restores its subscriptions (fred, and the restore round's own
/// `PING`, look after it then); the task ends when the hub closes, gives up reconnecting, or is
/// dropped.
async fn check_liveness(
    hub: Weak<PubSubHub>,
    reconnections: tokio::sync::watch::Receiver<u64>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
    limit: Duration,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(limit) => {}
            _ = stopped.wait_for(|stopped| *stopped) => return,
        }
        let Some(hub) = hub.upgrade() else { return };
        if hub.gave_up() {
            return;
        }
        if hub.subscription_count() == 0 || !hub.is_connected() || hub.is_resubscribing() {
            continue;
        }
        let before = *reconnections.borrow();
        // Says whether messages came in meanwhile: then the connection carries, only slowly.
        let heard = hub.client.message_rx();
        // The answer is waited for until the check would act, not only for `limit` (nor for fred's
        // command timeout, which may be shorter): an answer that comes late, but before fred found the
        // connection unresponsive, shows that the connection carries.
        let wait = limit + LIVENESS_MARGIN;
        let started = tokio::time::Instant::now();
        let answered = tokio::select! {
            answered = tokio::time::timeout(wait, hub.ping_subscriptions_node_within(Some(wait))) => {
                answered
            }
            _ = stopped.wait_for(|stopped| *stopped) => return,
        };
        match answered {
            Ok(Ok(())) => continue,
            // fred's own check closes the connection once the PING is unanswered for `limit`.
            Ok(Err(_)) => tokio::select! {
                () = tokio::time::sleep_until(started + wait) => {}
                _ = stopped.wait_for(|stopped| *stopped) => return,
            },
            Err(_) => {}
        }
        if hub.gave_up() {
            return;
        }
        // fred closed it (its warning, "Unresponsive connection.", is logged and counted by
        // `watch_client`), or it was reconnecting anyway: the restore round follows. Or messages came
        // in: the connection carries, and fred's check (which any message read resets) stays quiet.
        if *reconnections.borrow() != before || !hub.is_connected() || !heard.is_empty() {
            continue;
        }
        tracing::warn!(
            after = ?limit + LIVENESS_MARGIN,
            subscriptions = hub.subscription_count(),
            "the pub/sub subscriber's connection did not answer a PING (the network stopped carrying \
             it, and nothing was closed); it is made again and its subscriptions restored, and what \
             was published meanwhile is counted as lost when later messages arrive"
        );
        // In the background (fred's reconnect policy applies): this task must not wait on it
        // through a close.
        let client = hub.client.clone();
        tokio::spawn(async move {
            let _ = client.force_reconnection().await;
        });
    }
}

/// After each reconnection of the subscriber: subscribe again to everything and confirm, retrying with
/// backoff until that succeeds (or the hub closes).
async fn resubscribe_after_reconnects(
    hub: Weak<PubSubHub>,
    mut reconnections: tokio::sync::watch::Receiver<u64>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
    backoff: agentcomm_core::backoff::Backoff,
    command_timeout: Duration,
) {
    loop {
        tokio::select! {
            changed = reconnections.changed() => if changed.is_err() { return },
            _ = stopped.wait_for(|stopped| *stopped) => return,
        }
        let mut failures = 0u32;
        loop {
            let Some(hub) = hub.upgrade() else { return };
            // Set by each round: the round before may have cleared it after this one's reconnection.
            hub.resubscribing.store(true, Ordering::Release);
            let result = tokio::time::timeout(command_timeout, hub.resubscribe()).await;
            match result {
                Ok(Ok(())) => {
                    // A reconnection that came while resubscribing is served by the next round, and
                    // health says the subscriber is restoring until then.
                    if !reconnections.has_changed().unwrap_or(false) {
                        hub.resubscribing.store(false, Ordering::Release);
                        hub.restored.notify_waiters();
                    }
                    if failures > 0 {
                        tracing::info!(failures, "pub/sub subscriptions restored");
                    }
                    break;
                }
                Ok(Err(error)) => {
                    failures += 1;
                    tracing::warn!(error = %error, failures, "could not restore the pub/sub subscriptions after a reconnect; retrying");
                }
                Err(_) => {
                    failures += 1;
                    tracing::warn!(
                        failures,
                        "restoring the pub/sub subscriptions after a reconnect timed out; retrying"
                    );
                }
            }
            drop(hub);
            tokio::select! {
                () = tokio::time::sleep(backoff.delay(failures)) => {}
                _ = stopped.wait_for(|stopped| *stopped) => return,
            }
        }
    }
}

impl PubSubSubscription {
    /// Tells the reader the subscription closed: its stream ends after what waited for it.
    fn signal_stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stop.send_replace(true);
    }

    /// How this subscription's Redis subscriptions cover `channel` (without decoding).
    fn covers(&self, channel: &str) -> Coverage {
        let mut coverage = Coverage::None;
        for redis in &self.redis {
            match redis {
                RedisSubscription::Channel(name) if name == channel => return Coverage::Channel,
                RedisSubscription::Pattern(glob)
                    if glob_matches(glob.as_bytes(), channel.as_bytes()) =>
                {
                    coverage = Coverage::Pattern;
                }
                _ => {}
            }
        }
        coverage
    }
}

/// How a subscription's Redis subscriptions cover a Redis channel, which says which of the copies Redis
/// sends the connection (one per matching Redis subscription, of any local subscription) it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coverage {
    /// Not at all: none is for it.
    None,
    /// By a channel subscription: it keeps the `message` copy (sent first, once per publish) and
    /// ignores the `pmessage` copies of globs.
    Channel,
    /// By globs only: it keeps the first `pmessage` copy and skips the copies of the connection's other
    /// matching globs right behind it.
    Pattern,
}

/// The globs the subscriber connection is subscribed to, every local subscription's: Redis sends the
/// connection one `pmessage` copy of a publish per glob that matches its channel. A reader covering a
/// channel by globs only keeps the first copy and skips the others: how many follow it says whether an
/// identical frame right behind is a copy or a publish of its own (another program may publish the
/// same bytes twice).
#[derive(Default)]
struct ConnectionGlobs {
    globs: std::sync::Mutex<Vec<String>>,
}

impl ConnectionGlobs {
    /// Takes the globs among `counts` (kept under the counts' lock, so in step with them).
    fn update(&self, counts: &HashMap<RedisSubscription, usize>) {
        let mut now: Vec<String> = counts
            .keys()
            .filter_map(|redis| match redis {
                RedisSubscription::Pattern(glob) => Some(glob.clone()),
                RedisSubscription::Channel(_) => None,
            })
            .collect();
        now.sort();
        *self.globs.lock().expect("globs lock") = now;
    }

    /// How many copies of one publish on `channel` Redis sends the connection for its globs (at least
    /// one: a copy arrived).
    fn copies(&self, channel: &str) -> usize {
        self.globs
            .lock()
            .expect("globs lock")
            .iter()
            .filter(|glob| glob_matches(glob.as_bytes(), channel.as_bytes()))
            .count()
            .max(1)
    }
}

/// The last glob copy a reader took (see [`Reader::last`]).
struct LastCopy {
    frame: Bytes,
    channel: Str,
    /// Whether it carried a sequence number: then a frame identical to it is always a copy.
    numbered: bool,
    /// How many of its copies were skipped so far.
    skipped: usize,
}

/// Whether `text` matches a Redis glob made by [`crate::keys`]: `*` and `\`-escapes (`?` and `[..]`
/// are only ever escaped there, but are handled as Redis does for safety).
fn glob_matches(glob: &[u8], text: &[u8]) -> bool {
    match glob.first() {
        None => text.is_empty(),
        Some(b'*') => {
            let rest = &glob[1..];
            (0..=text.len()).any(|skip| glob_matches(rest, &text[skip..]))
        }
        Some(b'?') => !text.is_empty() && glob_matches(&glob[1..], &text[1..]),
        Some(b'\\') if glob.len() > 1 => {
            text.first() == Some(&glob[1]) && glob_matches(&glob[2..], &text[1..])
        }
        Some(c) => text.first() == Some(c) && glob_matches(&glob[1..], &text[1..]),
    }
}

/// The state of one subscription's stream, advanced as the subscriber polls.
struct Reader {
    /// This subscription's cursor in the client's message channel. Locked while the reader waits on it,
    /// so [`PubSubStream::size_hint`] counts only what waits while the reader is busy.
    messages: Arc<tokio::sync::Mutex<broadcast::Receiver<Message>>>,
    again: async_channel::Receiver<Delivery>,
    stop: tokio::sync::watch::Receiver<bool>,
    subscription: Arc<PubSubSubscription>,
    patterns: Vec<ChannelPattern>,
    shared: Weak<Shared>,
    tracker: SequenceTracker,
    last_sweep: Instant,
    done: bool,
    /// Once the subscription is closed: how many messages of the client's channel it still reads, those
    /// that waited for it when it saw the close. What comes later is not for it, though the channel
    /// may go on carrying its Redis subscription for another subscription of the router.
    left: Option<usize>,
    /// The last glob copy taken: Redis sends one copy per matching glob of the connection, one right
    /// after the other, and those copies are skipped without counting them as duplicates (whether they
    /// carry a sequence number or not). A frame without a number identical to it is skipped only while
    /// copies of it are still due: beyond, it is another publish of the same bytes. Forgotten at a
    /// channel subscription's copy, which starts the copies of the next publish.
    last: Option<LastCopy>,
    /// The last Redis channel seen, and how this subscription's Redis subscriptions cover it.
    covered: Option<(Str, Coverage)>,
    decoder: FrameDecoder,
    /// What this subscription lost and did not log yet (see [`LOSS_LOG_EVERY`]).
    losses: Losses,
}

/// How often a subscription logs its losses at most (each kind: its missing messages, and its falling
/// behind): the first at once, then one line per this, counting what was lost since the line before,
/// so that a subscription that keeps losing (after every cut, or a consumer that stays too slow) does
/// not flood the log. The counters in health count every loss as it comes.
const LOSS_LOG_EVERY: Duration = Duration::from_secs(5);

/// A subscription's loss warnings waiting for their line: the messages missing from their sequences
/// (and the channels they were missing from), and those skipped when it fell behind.
struct Losses {
    lost: SummedLog,
    channels: Vec<String>,
    more: bool,
    lagged: SummedLog,
    /// The router's `broadcast_capacity`, named on the lag warning: kept here, because a subscription
    /// dropped after its router is gone still writes what it held.
    capacity: usize,
}

impl Losses {
    /// Whether a loss waits for its line (one came within [`LOSS_LOG_EVERY`] of the line before).
    fn waiting(&self) -> bool {
        self.lost.waiting() || self.lagged.waiting()
    }

    fn new(capacity: usize) -> Self {
        Losses {
            lost: SummedLog::new(LOSS_LOG_EVERY),
            channels: Vec::new(),
            more: false,
            lagged: SummedLog::new(LOSS_LOG_EVERY),
            capacity,
        }
    }

    /// Counts `lost` messages missing from the sequences of `channels` (`more`: of others too) in
    /// `counters` (`None`: the router is gone), and logs what is due: everything when `ending` (the
    /// subscription ends; nothing comes later).
    fn lost(
        &mut self,
        counters: Option<&Counters>,
        lost: u64,
        channels: &[impl AsRef<str>],
        more: bool,
        ending: bool,
    ) {
        if let Some(counters) = counters {
            counters.lose(&counters.lost, lost);
        }
        if lost > 0 {
            for channel in channels {
                note_lost_on(&mut self.channels, &mut self.more, channel.as_ref());
            }
            self.more |= more;
        }
        if let Some((lost, suppressed)) = self.lost.add_or_end(lost, Instant::now(), ending) {
            warn_lost(
                lost,
                suppressed,
                &std::mem::take(&mut self.channels),
                std::mem::take(&mut self.more),
            );
        }
    }

    /// Counts `missed` messages skipped by falling behind (in `counters`, unless the router is gone),
    /// and logs what is due (everything when `ending`).
    fn lagged(&mut self, counters: Option<&Counters>, missed: u64, ending: bool) {
        if let Some(counters) = counters {
            counters.lose(&counters.lagged, missed);
        }
        if let Some((missed, suppressed)) = self.lagged.add_or_end(missed, Instant::now(), ending) {
            tracing::warn!(
                missed,
                suppressed,
                capacity = self.capacity,
                "a pub/sub subscription fell behind the subscriber's message channel and skipped its oldest \
                 messages (its consumer is too slow; raise `broadcast_capacity`, consume faster, or use \
                 DeliveryMode::Streams); its own losses are counted as `lost`"
            );
        }
    }
}

impl Drop for Reader {
    /// The subscription's stream ended or was dropped: a gap still open in a sequence is a loss (the
    /// message missing below ones it received will never come to it), counted even when younger than
    /// the reorder window. With the lines it held, it is logged even when the router is gone (closed
    /// and dropped before the subscription): no other line has them.
    fn drop(&mut self) {
        let shared = self.shared.upgrade();
        let counters = shared.as_deref().map(|shared| &*shared.counters);
        let lost = self.tracker.finish(Instant::now());
        let (channels, more) = self.tracker.take_lost_on();
        self.losses.lost(counters, lost, &channels, more, true);
        self.losses.lagged(counters, 0, true);
    }
}

/// What waiting for the next message produced.
enum Next {
    Message(Message),
    Lagged(u64),
    Again(Delivery),
    Sweep,
    Stopped,
    Closed,
}

impl Reader {
    async fn next(&mut self) -> Option<Delivery> {
        loop {
            if self.done {
                return None;
            }
            // Given-back deliveries first.
            if let Ok(delivery) = self.again.try_recv() {
                return Some(delivery);
            }
            let next = {
                let mut messages = self.messages.lock().await;
                // Looked at for every message: an atomic load, not the watch's lock.
                if self.left.is_none() && self.subscription.stopping.load(Ordering::Acquire) {
                    self.left = Some(messages.len());
                }
                let received = match self.left {
                    // Closed, and what waited for it at the close is read: the stream ends.
                    Some(0) => Err(broadcast::error::TryRecvError::Empty),
                    _ => messages.try_recv(),
                };
                match received {
                    Ok(message) => Next::Message(message),
                    Err(broadcast::error::TryRecvError::Lagged(missed)) => Next::Lagged(missed),
                    Err(broadcast::error::TryRecvError::Closed) => Next::Closed,
                    Err(broadcast::error::TryRecvError::Empty) if *self.stop.borrow() => {
                        // Closed, and what already arrived is read: the stream ends.
                        Next::Stopped
                    }
                    Err(broadcast::error::TryRecvError::Empty) => {
                        let window = match self.shared.upgrade() {
                            Some(shared) => shared.settings.reorder_window,
                            None => return None,
                        };
                        let sweep = self.last_sweep + window.max(Duration::from_millis(50));
                        // Woken by a timer only when a sweep has something to do: a gap to settle
                        // as lost once it is older than the window, or a loss line to write. A timer
                        // armed and cancelled for every wait cost about 600 client instructions a
                        // message at one publish in flight, where each message finds it waiting.
                        let sweep_due = self.tracker.has_open_gaps() || self.losses.waiting();
                        tokio::select! {
                            biased;
                            delivery = self.again.recv() => match delivery {
                                Ok(delivery) => Next::Again(delivery),
                                // Closed with the subscription: read what already arrived.
                                Err(_) => Next::Stopped,
                            },
                            received = messages.recv() => match received {
                                Ok(message) => Next::Message(message),
                                Err(RecvError::Lagged(missed)) => Next::Lagged(missed),
                                Err(RecvError::Closed) => Next::Closed,
                            },
                            _ = self.stop.changed() => Next::Sweep,
                            () = tokio::time::sleep_until(sweep.into()), if sweep_due => Next::Sweep,
                        }
                    }
                }
            };
            let shared = self.shared.upgrade()?;
            match next {
                Next::Message(message) => {
                    if let Some(left) = &mut self.left {
                        *left = left.saturating_sub(1);
                    }
                    if let Some(delivery) = self.accept(&shared, message) {
                        return Some(delivery);
                    }
                }
                Next::Lagged(missed) => {
                    if let Some(left) = &mut self.left {
                        *left = left.saturating_sub(usize::try_from(missed).unwrap_or(usize::MAX));
                    }
                    self.lagged(&shared, missed);
                }
                Next::Again(delivery) => return Some(delivery),
                Next::Sweep => {
                    self.last_sweep = Instant::now();
                    let lost = self.tracker.sweep(self.last_sweep);
                    let (channels, more) = self.tracker.take_lost_on();
                    self.losses
                        .lost(Some(&shared.counters), lost, &channels, more, false);
                    self.losses.lagged(Some(&shared.counters), 0, false);
                }
                Next::Stopped => {
                    if *self.stop.borrow()
                        && (self.left == Some(0) || self.messages.lock().await.is_empty())
                    {
                        self.done = true;
                        return None;
                    }
                    if !*self.stop.borrow() {
                        let _ = self.stop.wait_for(|stopped| *stopped).await;
                    }
                }
                Next::Closed => {
                    self.done = true;
                    return None;
                }
            }
            if self.last_sweep.elapsed()
                > shared
                    .settings
                    .reorder_window
                    .max(Duration::from_millis(50))
            {
                self.last_sweep = Instant::now();
                let lost = self.tracker.sweep(self.last_sweep);
                let (channels, more) = self.tracker.take_lost_on();
                self.losses
                    .lost(Some(&shared.counters), lost, &channels, more, false);
                self.losses.lagged(Some(&shared.counters), 0, false);
            }
        }
    }

    /// Turns one Redis message into a delivery for this subscription, or `None` when it is not for it
    /// (another subscription's channel, a pattern mismatch, a repeat, an undecodable frame).
    fn accept(&mut self, shared: &Arc<Shared>, message: Message) -> Option<Delivery> {
        // Most messages come on the channel of the one before: its answer is kept.
        let covered = match &self.covered {
            Some((channel, covered)) if *channel == message.channel => *covered,
            _ => {
                let covered = self.subscription.covers(&message.channel);
                self.covered = Some((message.channel.clone(), covered));
                covered
            }
        };
        // Redis sends a channel subscription's copy first, then one per matching glob.
        let glob_copy = message.kind == MessageKind::PMessage;
        if !glob_copy {
            self.last = None;
        }
        match covered {
            Coverage::Channel if !glob_copy => {}
            Coverage::Pattern if glob_copy => {}
            // Not its copy: another subscription's channel or glob (or not its channel at all).
            _ => return None,
        }
        let raw = message.value.into_bytes().unwrap_or_default();
        if glob_copy
            && let Some(last) = &mut self.last
            && last.channel == message.channel
            && last.frame == raw
            // Counted only for an identical frame without a number (rare): the globs' lock is not
            // taken per message.
            && (last.numbered
                || last.skipped + 1 < self.subscription.globs.copies(&message.channel))
        {
            last.skipped += 1;
            return None;
        }
        let (envelope, sequence) = match self.decoder.decode_taking(raw.clone(), SEQUENCE_HEADER) {
            Ok(decoded) => decoded,
            Err(error) => {
                // Its copies for the connection's other matching Redis subscriptions follow: skipped.
                if glob_copy {
                    self.last = Some(LastCopy {
                        frame: raw.clone(),
                        channel: message.channel.clone(),
                        numbered: false,
                        skipped: 0,
                    });
                }
                // Only this router's: the glob `<prefix>:*` of a wildcard class also matches the
                // channels of a longer prefix (`<prefix>:v2:...`), whose names, under this prefix,
                // have more than a channel's three parts.
                let own = message
                    .channel
                    .strip_prefix(shared.keys.prefix())
                    .and_then(|rest| rest.strip_prefix(':'))
                    .is_some_and(|name| parse_channel(name).is_ok());
                if own {
                    shared.malformed(raw, &message.channel, &error);
                }
                return None;
            }
        };
        // A glob (a wildcard class's `<prefix>:*`) also matches the channels of a longer prefix
        // (`<prefix>:v2:...`), another router's: a message is this router's only when its Redis
        // channel is its own channel's name under the prefix.
        let own = message
            .channel
            .strip_prefix(shared.keys.prefix())
            .and_then(|rest| rest.strip_prefix(':'))
            == Some(envelope.channel().name());
        if !own {
            misnamed(
                shared,
                &raw,
                &message.channel,
                covered,
                envelope.channel().name(),
            );
        }
        if glob_copy {
            self.last = Some(LastCopy {
                frame: raw,
                channel: message.channel,
                numbered: sequence.is_some(),
                skipped: 0,
            });
        }
        if !own {
            return None;
        }
        // Matched before its number is followed: a Redis glob can be wider than the patterns (a
        // wildcard class listens to the whole prefix), and the gaps and repeats of channels this
        // subscription does not deliver are not its losses or duplicates.
        if !self
            .patterns
            .iter()
            .any(|pattern| pattern.matches(envelope.channel()))
        {
            return None;
        }
        if let Some(sequence) = sequence {
            let (verdict, lost) =
                self.tracker
                    .observe(envelope.channel().name(), &sequence, Instant::now());
            // Most messages close no gap: for them nothing but this branch (no clock read, no
            // limiter); what waits for its line is written by the sweeps.
            if lost > 0 {
                self.losses.lost(
                    Some(&shared.counters),
                    lost,
                    &[envelope.channel().name()],
                    false,
                    false,
                );
            }
            match verdict {
                Verdict::Duplicate => {
                    shared.counters.bump(&shared.counters.duplicates);
                    return None;
                }
                Verdict::Late => report_late(shared),
                Verdict::New => {}
            }
        }
        shared.counters.bump(&shared.counters.delivered);
        Some(delivery(&self.subscription, shared, envelope))
    }

    fn lagged(&mut self, shared: &Shared, missed: u64) {
        // The skipped messages belong to every channel of the router; the sequences (kept, not reset)
        // count exactly what this subscription lost of its own as `lost`.
        self.losses.lagged(Some(&shared.counters), missed, false);
        self.last = None;
    }
}

/// A frame that decoded on `channel` but names another channel (`named`): a frame's `channel` is the
/// name of the Redis channel it is published on, under the prefix, and no agentcomm publisher sends
/// one that says otherwise. Another program's mistake (the canonical name where a template renders
/// another, say) is dead-lettered as malformed, counted and logged, instead of being skipped without a
/// trace: none of the channel's subscribers would ever receive it. Only on this router's channels: its
/// exact channel (`Coverage::Channel`), or a glob's match whose name under the prefix is a channel
/// (a wildcard class's `<prefix>:*` also hears a longer prefix's channels, another router's).
#[cold]
#[inline(never)]
fn misnamed(shared: &Arc<Shared>, raw: &Bytes, channel: &Str, covered: Coverage, named: &str) {
    let Some(name) = channel
        .strip_prefix(shared.keys.prefix())
        .and_then(|rest| rest.strip_prefix(':'))
    else {
        return;
    };
    // Well named for a longer prefix (`<prefix>:<more>:<named>`: another router's, which a wildcard
    // class's glob hears too), whatever its name under this prefix reads as: a template without `:`
    // (`prices.{direction}.{session_id}`) under `<prefix>:eu:v2` reads as a channel under `<prefix>`.
    if name
        .strip_suffix(named)
        .is_some_and(|longer| longer.ends_with(':'))
    {
        return;
    }
    if covered != Coverage::Channel && parse_channel(name).is_err() {
        return;
    }
    let error = Error::InvalidChannelFormat {
        channel: named.to_string(),
        expected: name.to_string(),
        detail: Some(format!(
            "the frame names channel '{named}' but was published on the Redis channel '{}'; a \
             frame's `channel` must be the name of the Redis channel it is published on, without \
             the prefix (docs/wire-format.md)",
            &**channel
        )),
    };
    shared.malformed(raw.clone(), channel, &error);
}

/// The error of a subscribe whose router closed before its subscription was confirmed and registered.
fn closed_while_confirming() -> Error {
    Error::Closed {
        what: "the Redis router",
        hint: "it was closed while this subscription was being confirmed; connect a new one",
    }
}

/// Makes the subscriber's `QUIT` cheap in memory: when a `QUIT` succeeds, fred replaces seven of its
/// eight notification channels (broadcast rings, each sized like the message channel) with new ones of
/// the configured capacity. At `broadcast_capacity` 65,536 that is tens of megabytes allocated and
/// written just to close; with the capacity set back to fred's default first, a few kilobytes.
fn quit_small(client: &SubscriberClient) {
    let mut config = client.perf_config();
    config.broadcast_channel_capacity = 32;
    client.update_perf_config(config);
}

/// A subscription's deliveries, produced as the subscriber polls; knows how many messages wait.
struct PubSubStream {
    deliveries: std::pin::Pin<Box<dyn futures::Stream<Item = Delivery> + Send>>,
    messages: Arc<tokio::sync::Mutex<broadcast::Receiver<Message>>>,
    // Boxed to keep the stream `Unpin`.
    again: Box<async_channel::Receiver<Delivery>>,
}

impl futures::Stream for PubSubStream {
    type Item = Delivery;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Delivery>> {
        self.get_mut().deliveries.as_mut().poll_next(cx)
    }

    /// What waits in the client's channel for this subscription's cursor (messages of the router's
    /// other subscriptions included), and given-back deliveries. While the reader waits for a message
    /// (it holds the cursor), nothing waits.
    fn size_hint(&self) -> (usize, Option<usize>) {
        let waiting = self.messages.try_lock().map(|r| r.len()).unwrap_or(0) + self.again.len();
        (waiting, None)
    }
}

impl Drop for PubSubStream {
    /// Deliveries given back and not read again are dropped with the stream: counted and logged as
    /// `dropped` (each one's abandon finds the channel closed). Left in the channel, they would keep
    /// the subscription alive through their acknowledgers, uncounted.
    fn drop(&mut self) {
        self.again.close();
        while let Ok(delivery) = self.again.try_recv() {
            drop(delivery);
        }
    }
}

fn delivery(
    subscription: &Arc<PubSubSubscription>,
    shared: &Arc<Shared>,
    envelope: Envelope,
) -> Delivery {
    Delivery::new(
        envelope,
        Box::new(PubSubAck {
            subscription: subscription.clone(),
            shared: Arc::downgrade(shared),
        }),
    )
}

/// Logs `lost` messages missing from the sequences of `channels` (the channels' names, at most
/// [`MAX_LOST_CHANNELS`](crate::sequence::MAX_LOST_CHANNELS) of them, and `more` when there were
/// others), so that an operator sees which flow lost them; `suppressed`: the losses since the last
/// line that had no line of their own (see [`LOSS_LOG_EVERY`]), counted in `lost`.
fn warn_lost(lost: u64, suppressed: u64, channels: &[String], more: bool) {
    let mut channels = channels.join(", ");
    if more {
        channels.push_str(", and others");
    }
    tracing::warn!(
        lost,
        suppressed,
        channels,
        "pub/sub messages were lost (missing from their publisher's sequence: published while \
         this subscriber was disconnected, cut off in transit, or overrun); use \
         DeliveryMode::Streams for durable delivery"
    );
}

/// A message whose gap was counted as lost arrived after all: it is delivered, and taken off `lost`.
#[cold]
fn report_late(shared: &Shared) {
    shared.counters.bump(&shared.counters.late);
    shared.counters.unlose(&shared.counters.lost);
    if let Some(suppressed) = shared.late_log.allow() {
        tracing::info!(
            suppressed,
            "a pub/sub message arrived after it was counted as lost (later than reorder_window); it is \
             delivered out of order and taken off the lost count (`late` counts them)"
        );
    }
}

struct PubSubAck {
    subscription: Arc<PubSubSubscription>,
    shared: Weak<Shared>,
}

impl PubSubAck {
    fn hand_back(self, envelope: Envelope, delay: Duration) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let subscription = self.subscription;
        let give = move |shared: Arc<Shared>, subscription: Arc<PubSubSubscription>, envelope| {
            let delivery = delivery(&subscription, &shared, envelope).redelivered(true);
            match subscription.again.try_send(delivery) {
                Ok(()) => shared.counters.bump(&shared.counters.redelivered),
                // Unbounded: only a closed channel refuses.
                Err(error) => {
                    let delivery = error.into_inner();
                    lost_on_close(&shared, delivery.envelope());
                    delivery.discard();
                }
            }
        };
        if delay.is_zero() {
            give(shared, subscription, envelope);
            return;
        }
        // On the router's runtime: a delivery may be given back (dropped) outside any.
        let runtime = shared.runtime.clone();
        runtime.spawn(async move {
            tokio::time::sleep(delay).await;
            give(shared, subscription, envelope);
        });
    }
}

fn lost_on_close(shared: &Shared, envelope: &Envelope) {
    shared.counters.lose(&shared.counters.dropped, 1);
    tracing::warn!(
        message_id = %envelope.id(),
        channel = envelope.channel().name(),
        "a pub/sub message given back after its subscription closed was dropped (pub/sub keeps nothing)"
    );
}

impl Acknowledge for PubSubAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        if let Some(shared) = self.shared.upgrade() {
            shared.counters.bump(&shared.counters.acked);
        }
        agentcomm_core::router::ready_ok()
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
        if let Some(shared) = self.shared.upgrade() {
            shared.counters.bump(&shared.counters.nacked);
        }
        self.hand_back(envelope, delay);
        agentcomm_core::router::ready_ok()
    }

    fn abandon(self: Box<Self>, envelope: Envelope) {
        self.hand_back(envelope, Duration::ZERO);
    }
}

struct PubSubControl {
    hub: Weak<PubSubHub>,
    subscription: Arc<PubSubSubscription>,
}

impl SubscriptionControl for PubSubControl {
    fn close(&self) -> BoxFuture<'static, Result<()>> {
        let hub = self.hub.clone();
        let subscription = self.subscription.clone();
        Box::pin(async move {
            if let Some(hub) = hub.upgrade() {
                hub.remove(&subscription).await;
            } else {
                subscription.closed.store(true, Ordering::Release);
                subscription.signal_stop();
                subscription.again.close();
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::glob_matches;
    use agentcomm_core::channel::{ChannelPattern, parse_channel};
    use agentcomm_core::envelope::Envelope;
    use agentcomm_core::router::{Router, SubscribeOptions};
    use std::time::Duration;

    /// A pub/sub router on `url` under a prefix of its own, built by `configure`; `None`, with the
    /// skip line printed, when Redis cannot be reached (a failure under AGENTCOMM_REQUIRE_BROKERS=1).
    /// `shown` is the URL the skip line names (REDIS_URL, not a proxy in front of it).
    async fn pubsub_router(
        url: &str,
        shown: &str,
        configure: impl FnOnce(crate::RedisRouterBuilder) -> crate::RedisRouterBuilder,
    ) -> Option<crate::RedisRouter> {
        let prefix = crate::unit_redis::prefix();
        let builder = crate::RedisRouter::builder(url)
            .mode(crate::DeliveryMode::PubSub)
            .prefix(&prefix);
        match configure(builder).connect().await {
            Ok(router) => Some(router),
            Err(error) => {
                crate::unit_redis::unreachable(shown, error);
                None
            }
        }
    }

    /// A pub/sub router reaching the loopback Redis at REDIS_URL through a fault proxy, with a 10 s
    /// command timeout (and, with `quick_reconnect`, reconnections every 20-50 ms); `None`, with the
    /// skip line printed, when REDIS_URL is not on loopback or Redis cannot be reached.
    async fn proxied_router(
        quick_reconnect: bool,
    ) -> Option<(agentcomm_testkit::proxy::FaultProxy, crate::RedisRouter)> {
        proxied_router_with(|builder| {
            if quick_reconnect {
                builder.reconnect(agentcomm_core::backoff::Backoff::new(
                    Duration::from_millis(20),
                    Duration::from_millis(50),
                ))
            } else {
                builder
            }
        })
        .await
    }

    /// [`proxied_router`] with the builder changed further by `configure`.
    async fn proxied_router_with(
        configure: impl FnOnce(crate::RedisRouterBuilder) -> crate::RedisRouterBuilder,
    ) -> Option<(agentcomm_testkit::proxy::FaultProxy, crate::RedisRouter)> {
        let url = crate::unit_redis::url();
        let (proxy, proxied) = crate::unit_redis::loopback_proxy(&url).await?;
        let router = pubsub_router(&proxied, &url, |builder| {
            configure(builder.command_timeout(Duration::from_secs(10)))
        })
        .await?;
        Some((proxy, router))
    }

    /// Another task in line for the hub's subscription counts, behind whoever holds them now: once it
    /// gets them, it holds them until released.
    struct NextInLine {
        holding: std::sync::Arc<std::sync::atomic::AtomicBool>,
        release: tokio::sync::oneshot::Sender<()>,
        task: tokio::task::JoinHandle<()>,
    }

    impl NextInLine {
        /// Returns once the task waits for the counts.
        async fn queue(hub: &std::sync::Arc<super::PubSubHub>) -> Self {
            use std::sync::Arc;
            use std::sync::atomic::{AtomicBool, Ordering};
            let queued = Arc::new(AtomicBool::new(false));
            let holding = Arc::new(AtomicBool::new(false));
            let (release, released) = tokio::sync::oneshot::channel::<()>();
            let task = {
                let (hub, queued, holding) = (hub.clone(), queued.clone(), holding.clone());
                tokio::spawn(async move {
                    let mut locking = Box::pin(hub.redis.lock());
                    assert!(futures::poll!(&mut locking).is_pending());
                    queued.store(true, Ordering::Release);
                    let counts = locking.await;
                    holding.store(true, Ordering::Release);
                    let _ = released.await;
                    drop(counts);
                })
            };
            within("the other to wait for the counts", || {
                queued.load(Ordering::Acquire)
            })
            .await;
            NextInLine {
                holding,
                release,
                task,
            }
        }

        /// Whether it holds the counts.
        fn holds(&self) -> bool {
            self.holding.load(std::sync::atomic::Ordering::Acquire)
        }

        /// Lets the counts go and waits for the task to end.
        async fn release(self) {
            let _ = self.release.send(());
            self.task.await.unwrap();
        }
    }

    /// Waits until `condition` holds, failing the test with `what` after 10 s.
    /// A message on `Ping:event:s1`, the channel the subscribe tests subscribe to.
    fn ping() -> Envelope {
        Envelope::new(
            parse_channel("Ping:event:s1").unwrap(),
            "application/json",
            b"{}".to_vec(),
        )
    }

    /// Publishes a [`ping`] while `other` still holds the counts (so the restore round has not run),
    /// then lets go, gives back the test's Redis subscriptions, closes, and asserts that the publish
    /// reached the subscription the subscribe confirmed.
    async fn assert_live_then_close(
        router: &crate::RedisRouter,
        other: NextInLine,
        hub: &std::sync::Arc<super::PubSubHub>,
        wanted: &[super::RedisSubscription],
    ) {
        let outcome = router.publish(ping()).await;
        other.release().await;
        hub.give_back(wanted).await;
        let _ = router.close().await;
        assert!(
            matches!(
                outcome,
                Ok(agentcomm_core::router::PublishOutcome::Delivered(1))
            ),
            "the subscription the subscribe confirmed is live: {outcome:?}"
        );
    }

    /// Subscribes `router` to `Ping:event:s1`, which starts its subscriber; returns the subscription
    /// and the subscriber's hub.
    async fn first_subscription(
        router: &crate::RedisRouter,
    ) -> (
        agentcomm_core::router::Subscription,
        std::sync::Arc<super::PubSubHub>,
    ) {
        let first = router
            .subscribe(SubscribeOptions::new(
                ChannelPattern::parse("Ping:event:s1").unwrap(),
            ))
            .await
            .unwrap();
        (first, router.shared().hub().await.unwrap())
    }

    /// A subscribe to `Pong:*:s1` whose PSUBSCRIBE and PING wait in `proxy`'s black hole (turned on
    /// here), returned once it has counted its glob.
    async fn a_pattern_subscribe_held_in_the_blackhole<'a>(
        proxy: &agentcomm_testkit::proxy::FaultProxy,
        router: &'a crate::RedisRouter,
        hub: &super::PubSubHub,
    ) -> agentcomm_core::router::BoxFuture<
        'a,
        agentcomm_core::Result<agentcomm_core::router::Subscription>,
    > {
        proxy.blackhole(true);
        let mut second = router.subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Pong:*:s1").unwrap(),
        ));
        assert!(futures::poll!(&mut second).is_pending());
        within("the subscribe to count its glob", || {
            hub.globs
                .globs
                .lock()
                .unwrap()
                .iter()
                .any(|glob| glob.contains("Pong"))
        })
        .await;
        second
    }

    /// What `second` answers, which must come within 3 s of the give-up.
    async fn answered_soon_after_the_give_up(
        second: agentcomm_core::router::BoxFuture<
            '_,
            agentcomm_core::Result<agentcomm_core::router::Subscription>,
        >,
    ) -> agentcomm_core::Result<agentcomm_core::router::Subscription> {
        let started = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(3), second)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the subscribe still waits {:?} after the give-up",
                    started.elapsed()
                )
            })
    }

    async fn within(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A subscribe that gives up while another holds the subscription counts (a close unsubscribing
    /// during an outage, a resubscribe) must not take back counts it never took: before, it took one
    /// of another live subscription's, whose Redis subscription then ended with the next subscriber
    /// of that channel to close (or was not restored after a reconnect), leaving it open and deaf,
    /// with nothing counted or logged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscribe_that_gives_up_waiting_leaves_the_counts_of_others_alone() {
        let url = crate::unit_redis::url();
        let Some(router) = pubsub_router(&url, &url, |builder| {
            builder.command_timeout(Duration::from_millis(300))
        })
        .await
        else {
            return;
        };
        let pattern = ChannelPattern::parse("Ping:event:s1").unwrap();
        let mut first = router
            .subscribe(SubscribeOptions::new(pattern.clone()))
            .await
            .unwrap();
        let hub = router.shared().hub().await.unwrap();
        let key = router.shared().keys.pubsub_subscription(&pattern);
        assert_eq!(hub.redis.lock().await.get(&key).copied(), Some(1));
        // Something holds the counts for longer than the command timeout; a second subscribe to the
        // same channel gives up meanwhile, and a third one, once they are free, comes and goes.
        let held = hub.redis.lock().await;
        let second = tokio::time::timeout(
            Duration::from_secs(5),
            router.subscribe(SubscribeOptions::new(pattern.clone())),
        )
        .await
        .expect("a subscribe gives up by its command timeout, even while the counts are held");
        assert!(second.is_err(), "the second subscribe timed out");
        drop(held);
        let third = router
            .subscribe(SubscribeOptions::new(pattern.clone()))
            .await
            .unwrap();
        assert_eq!(hub.redis.lock().await.get(&key).copied(), Some(2));
        third.close().await.unwrap();
        assert_eq!(hub.redis.lock().await.get(&key).copied(), Some(1));
        let envelope = ping();
        let outcome = router.publish(envelope).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), first.next()).await;
        let _ = router.close().await;
        assert!(
            matches!(got, Ok(Some(_))),
            "the first subscription received nothing; the publish was {outcome:?}"
        );
    }

    /// A reconnection that comes while the subscriptions are being restored gets a round of its own,
    /// and health says the subscriber is restoring until that round is done. Before, the round that
    /// was under way cleared the flag when it finished, and the next round (for a connection on which
    /// nothing was subscribed yet) ran, and retried for as long as it failed, with the subscriber
    /// reported as fully restored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reconnection_during_a_restore_keeps_health_saying_restoring() {
        use std::sync::atomic::Ordering;
        let Some((proxy, router)) = proxied_router(false).await else {
            return;
        };
        let mut subscription = router
            .subscribe(SubscribeOptions::new(
                ChannelPattern::parse("Ping:event:s1").unwrap(),
            ))
            .await
            .unwrap();
        let shared = router.shared().clone();
        let hub = shared.hub().await.unwrap();
        let reconnects = || shared.counters.reconnects.load(Ordering::Relaxed);
        // The first round waits for the counts (held here); a second reconnection comes meanwhile.
        let held = hub.redis.lock().await;
        proxy.cut_all();
        // The pool's two connections and the subscriber reconnect.
        within("the first reconnection", || reconnects() >= 3).await;
        proxy.cut_all();
        within("the second reconnection", || reconnects() >= 6).await;
        within("the subscriber to be connected", || hub.is_connected()).await;
        // Something else takes the counts right after the first round, before the second one.
        let other = NextInLine::queue(&hub).await;
        drop(held);
        // The first round is done once the other holds the counts; the second one waits.
        within("the other to take the counts", || other.holds()).await;
        let until = tokio::time::Instant::now() + Duration::from_millis(300);
        while tokio::time::Instant::now() < until {
            assert!(
                hub.is_resubscribing(),
                "health says restored while the second round waits"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let health = router.health().await;
        assert!(health.detail.contains("restoring"), "{health:?}");
        other.release().await;
        within("the second round to finish", || !hub.is_resubscribing()).await;
        let envelope = ping();
        router.publish(envelope).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), subscription.next()).await;
        let _ = router.close().await;
        assert!(matches!(got, Ok(Some(_))), "restored and delivering");
    }

    /// A request (an envelope with a `reply_to`) published while the subscriber is restoring its
    /// subscriptions after a reconnection waits until they are restored, its reply inbox among them.
    /// Before, the pool (reconnected first) sent it at once, and its reply, published while the inbox
    /// was not subscribed again, reached nobody: the first request after a cut often timed out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_waits_until_its_reply_inbox_is_restored() {
        let Some((proxy, router)) = proxied_router(true).await else {
            return;
        };
        let inbox = ChannelPattern::parse("Pong:reply:inbox-restored").unwrap();
        let mut replies = router
            .subscribe(SubscribeOptions::new(inbox.clone()))
            .await
            .unwrap();
        let hub = router.shared().hub().await.unwrap();
        // The restore round after the reconnection waits for the counts held here.
        let held = hub.redis.lock().await;
        proxy.cut_all();
        within("the subscriber to reconnect", || {
            hub.is_connected() && hub.is_resubscribing()
        })
        .await;
        request_held_until_restored(
            &router,
            held,
            &mut replies,
            "Pong:reply:inbox-restored",
            Duration::from_millis(300),
            "the request went out while its reply inbox was being restored",
        )
        .await;
    }

    /// Publishes a request answered on `inbox` and checks that it stays held for `held_for` (else
    /// fails with `too_early`), goes out once the restore waiting for `held` (the hub's counts) ends,
    /// and that a reply then reaches the inbox through `replies`; closes `router`.
    async fn request_held_until_restored(
        router: &crate::RedisRouter,
        held: tokio::sync::MutexGuard<'_, super::HashMap<crate::keys::RedisSubscription, usize>>,
        replies: &mut agentcomm_core::router::Subscription,
        inbox: &str,
        held_for: Duration,
        too_early: &str,
    ) {
        let request = ping().with_reply_to(inbox);
        let mut publishing = Box::pin(router.publish(request));
        let until = tokio::time::Instant::now() + held_for;
        while tokio::time::Instant::now() < until {
            assert!(futures::poll!(&mut publishing).is_pending(), "{too_early}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), publishing)
            .await
            .expect("the request goes out once the inbox is restored")
            .unwrap();
        // The inbox is subscribed again: a reply reaches it.
        let reply = Envelope::new(
            parse_channel(inbox).unwrap(),
            "application/json",
            b"{}".to_vec(),
        );
        router.publish(reply).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), replies.next()).await;
        let _ = router.close().await;
        assert!(matches!(got, Ok(Some(_))), "the reply reached the inbox");
    }

    /// A request published after the subscriber lost its connection, while fred waits out its reconnect
    /// delay (it still says the client is connected then), also waits until the reply inbox is
    /// restored. Before, only a reconnection marked the subscriber as restoring: the request went out
    /// as soon as the pool reconnected, often first, and its reply was published before the inbox
    /// was subscribed again (the first request after a cut timed out in about half the runs).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_made_before_the_subscriber_reconnects_waits_for_its_reply_inbox() {
        let Some((proxy, router)) = proxied_router_with(|builder| {
            builder.reconnect(agentcomm_core::backoff::Backoff::new(
                Duration::from_secs(1),
                Duration::from_secs(1),
            ))
        })
        .await
        else {
            return;
        };
        let inbox = ChannelPattern::parse("Pong:reply:inbox-lost").unwrap();
        let mut replies = router
            .subscribe(SubscribeOptions::new(inbox.clone()))
            .await
            .unwrap();
        let hub = router.shared().hub().await.unwrap();
        let mut errors = fred::interfaces::EventInterface::error_rx(&hub.client);
        // The restore round after the reconnection waits for the counts held here.
        let held = hub.redis.lock().await;
        proxy.cut_all();
        tokio::time::timeout(Duration::from_secs(5), errors.recv())
            .await
            .expect("the subscriber sees its connection end")
            .unwrap();
        // The router's own watcher sees the same event (at most a moment later).
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            while !hub.is_resubscribing() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(
            hub.is_connected(),
            "fred says connected until its next attempt"
        );
        // Past the pool's reconnection (1 s): the request stays held while the inbox is not restored.
        request_held_until_restored(
            &router,
            held,
            &mut replies,
            "Pong:reply:inbox-lost",
            Duration::from_millis(1600),
            "the request went out before its reply inbox was restored",
        )
        .await;
    }

    /// A subscribe that comes after the subscriber reconnected, before its subscriptions are restored,
    /// subscribes itself to what it needs: the Redis subscription it shares with an older local one
    /// does not exist yet on the new connection. Before, it only counted itself in, confirmed with a
    /// `PING`, and returned "live" while Redis had no subscription for it: what was published next
    /// reached nobody (`Unroutable`), and the new subscription, which knew no publisher yet, could not
    /// count it as lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscribe_before_the_restore_is_live_when_it_returns() {
        let Some((proxy, router)) = proxied_router(false).await else {
            return;
        };
        let pattern = ChannelPattern::parse("Ping:event:s1").unwrap();
        let _older = router
            .subscribe(SubscribeOptions::new(pattern.clone()))
            .await
            .unwrap();
        let shared = router.shared().clone();
        let hub = shared.hub().await.unwrap();
        let wanted = vec![shared.keys.pubsub_subscription(&pattern)];
        // In line for the counts, in this order: the new subscription's count, then something else
        // that holds them for a while; the restore after the reconnection comes last.
        let held = hub.redis.lock().await;
        let mut adding = Box::pin(hub.add_redis(&wanted, &shared.settings));
        assert!(futures::poll!(&mut adding).is_pending());
        let other = NextInLine::queue(&hub).await;
        proxy.cut_all();
        within("the subscriber to reconnect", || {
            hub.is_connected() && hub.is_resubscribing()
        })
        .await;
        drop(held);
        tokio::time::timeout(Duration::from_secs(10), adding)
            .await
            .expect("the subscribe's count is taken")
            .expect("and confirmed");
        within("the other to hold the counts", || other.holds()).await;
        // The restore has not run: only the new subscription's own SUBSCRIBE can make it live.
        assert!(hub.is_resubscribing());
        assert_live_then_close(&router, other, &hub, &wanted).await;
    }

    /// A subscribe made while the subscriber is cut off, before its reconnection is even seen, must
    /// also be live when it returns. Its `PING` waits for the new connection and is answered there;
    /// a Redis subscription it shares with an older local one was then never sent on that
    /// connection (the restore flag is set only once the reconnection is seen, after this subscribe
    /// had decided what to send), so it returned "live" while Redis had nothing for it until the
    /// restore round ran: what was published meanwhile reached nobody, and the new subscription,
    /// which knew no publisher yet, could not count it as lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscribe_while_disconnected_is_live_when_it_returns() {
        let Some((proxy, router)) = proxied_router(true).await else {
            return;
        };
        let pattern = ChannelPattern::parse("Ping:event:s1").unwrap();
        let _older = router
            .subscribe(SubscribeOptions::new(pattern.clone()))
            .await
            .unwrap();
        let shared = router.shared().clone();
        let hub = shared.hub().await.unwrap();
        let wanted = vec![shared.keys.pubsub_subscription(&pattern)];
        // Cut off, and kept off: the reconnection has not happened. (The lost connection already
        // marks the subscriber as restoring, as a request needs; the subscribe must be live either
        // way, and the flag is only set by the router's watcher, a moment after fred saw the cut.)
        proxy.reject_for(Duration::from_secs(30));
        proxy.cut_all();
        within("the subscriber to see the cut", || !hub.is_connected()).await;
        // The new subscription's count: it takes the counts now, and its PING waits for a connection.
        let mut adding = Box::pin(hub.add_redis(&wanted, &shared.settings));
        assert!(futures::poll!(&mut adding).is_pending());
        // Something else waits for the counts before the restore round, and holds them for a while.
        let other = NextInLine::queue(&hub).await;
        proxy.reject_for(Duration::ZERO);
        tokio::time::timeout(Duration::from_secs(10), adding)
            .await
            .expect("the subscribe's PING is answered after the reconnection")
            .expect("and confirmed");
        within("the other to hold the counts", || other.holds()).await;
        within("the reconnection to be seen", || hub.is_resubscribing()).await;
        // The restore has not run: only the subscribe's own SUBSCRIBE can make it live.
        assert_live_then_close(&router, other, &hub, &wanted).await;
    }

    /// A subscribe whose `SUBSCRIBE` is lost with a cut connection must not return as live. fred
    /// resolves `SUBSCRIBE` once it is written and does not write it again after a reconnection, but
    /// writes the `PING` that follows it again on the new connection, where it is answered: the
    /// subscribe returned "live" while Redis had nothing for it until the restore round ran, and what
    /// was published meanwhile reached nobody, uncounted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscribe_whose_subscribe_is_cut_off_is_live_when_it_returns() {
        let Some((proxy, router)) = proxied_router(true).await else {
            return;
        };
        // Opens the subscriber; another channel.
        let _other_channel = router
            .subscribe(SubscribeOptions::new(
                ChannelPattern::parse("Other:event:s1").unwrap(),
            ))
            .await
            .unwrap();
        let shared = router.shared().clone();
        let hub = shared.hub().await.unwrap();
        let pattern = ChannelPattern::parse("Ping:event:s1").unwrap();
        let wanted = vec![shared.keys.pubsub_subscription(&pattern)];
        // Nothing reaches Redis: the SUBSCRIBE and the PING are written, and the PING waits.
        proxy.blackhole(true);
        let mut adding = Box::pin(hub.add_redis(&wanted, &shared.settings));
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut adding)
                .await
                .is_err(),
            "no answer comes through the black hole"
        );
        // Something else waits for the counts before the restore round, and holds them for a while.
        let other = NextInLine::queue(&hub).await;
        // The connection is cut with both commands in the black hole.
        proxy.cut_all();
        proxy.blackhole(false);
        tokio::time::timeout(Duration::from_secs(10), adding)
            .await
            .expect("the subscribe's PING is answered after the reconnection")
            .expect("and confirmed");
        within("the other to hold the counts", || other.holds()).await;
        // The restore has not run: only the subscribe itself can have made it live.
        assert_live_then_close(&router, other, &hub, &wanted).await;
    }

    /// A pub/sub subscribe whose confirmation is answered while the subscriber closes must fail with
    /// `Closed`, as in Streams mode. Before, it was registered after `close` had listed the
    /// subscriptions to end, and returned a live-looking subscription of a closed router.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscribe_confirmed_while_the_router_closes_fails_with_closed() {
        use std::sync::atomic::Ordering;
        let Some((proxy, router)) = proxied_router(false).await else {
            return;
        };
        let (_first, hub) = first_subscription(&router).await;
        let first = hub
            .subscriptions
            .lock()
            .unwrap()
            .values()
            .next()
            .cloned()
            .unwrap();
        // The second subscribe's SUBSCRIBE and PING wait in the black hole. (The hub's own subscribe:
        // the router's gives up at once when the router closes, but may finish just as it does.)
        proxy.blackhole(true);
        let shared = router.shared().clone();
        let mut second = Box::pin(hub.subscribe(
            &shared,
            SubscribeOptions::new(ChannelPattern::parse("Pong:event:s1").unwrap()),
        ));
        assert!(futures::poll!(&mut second).is_pending());
        // Its set-up holds the counts once it is past its own check of the close (it then writes its
        // SUBSCRIBE and PING at once): only the registration can see the close from here.
        within("the subscribe to hold the counts", || {
            hub.redis.try_lock().is_err()
        })
        .await;
        // The router closes: it has listed the subscriptions to end once the first one is told.
        let closing = tokio::spawn({
            let router = router.clone();
            async move { router.close().await }
        });
        within("close to list the subscriptions", || {
            first.stopping.load(Ordering::Acquire)
        })
        .await;
        proxy.blackhole(false);
        let outcome = tokio::time::timeout(Duration::from_secs(10), second)
            .await
            .expect("the subscribe ends");
        closing.await.unwrap().unwrap();
        match outcome {
            Err(agentcomm_core::error::Error::Closed { .. }) => {}
            Err(other) => panic!("expected Closed, got {other}"),
            Ok(_) => {
                panic!("a subscribe that raced close returned a subscription of a closed router")
            }
        }
        assert_eq!(hub.subscription_count(), 0, "nothing stays registered");
    }

    /// Subscribes once, then starts a second subscribe and closes the router while that one waits for
    /// the subscription counts (held by the test until the close returned): the first subscription,
    /// the hub, and the second subscribe, under way.
    async fn second_subscribe_under_way_at_close(
        router: &crate::RedisRouter,
    ) -> (
        agentcomm_core::router::Subscription,
        std::sync::Arc<super::PubSubHub>,
        futures::future::BoxFuture<
            '_,
            agentcomm_core::error::Result<agentcomm_core::router::Subscription>,
        >,
    ) {
        let first = router
            .subscribe(SubscribeOptions::new(
                ChannelPattern::parse("Ping:event:s1").unwrap(),
            ))
            .await
            .unwrap();
        let hub = router.shared().hub().await.unwrap();
        let held = hub.redis.lock().await;
        let mut second = router.subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Pong:event:s1").unwrap(),
        ));
        assert!(futures::poll!(&mut second).is_pending());
        router.close().await.unwrap();
        drop(held);
        (first, hub, second)
    }

    /// A pub/sub subscribe still waiting for its Redis subscriptions when the router closes fails with
    /// `Closed` at once. Before, its `SUBSCRIBE` went to the subscriber connection `close` had quit,
    /// where fred keeps a command until the command timeout: it failed with `Timeout` only then.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscribe_under_way_when_the_router_closes_fails_with_closed_at_once() {
        let url = crate::unit_redis::url();
        // The default command timeout (30 s), far beyond what the test waits for the subscribe.
        let Some(router) = pubsub_router(&url, &url, |builder| {
            builder.close_timeout(Duration::from_millis(300))
        })
        .await
        else {
            return;
        };
        let (_first, _hub, second) = second_subscribe_under_way_at_close(&router).await;
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(Duration::from_secs(3), second)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the subscribe still waits {:?} after the close",
                    started.elapsed()
                )
            });
        assert!(
            matches!(outcome, Err(agentcomm_core::error::Error::Closed { .. })),
            "{:?}",
            outcome.map(|_| ())
        );
    }

    /// Once the router closed, nothing keeps the subscriber (and its fred rings, some 51 MB at the
    /// default capacity) alive. Before, the set-up task of a subscribe given up by the close sent its
    /// `SUBSCRIBE` to the quit subscriber, where fred keeps a command until the command timeout (30 s by
    /// default), holding the hub all that time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_closed_subscriber_is_freed_at_once() {
        let url = crate::unit_redis::url();
        let Some(router) = pubsub_router(&url, &url, |builder| {
            builder.close_timeout(Duration::from_millis(300))
        })
        .await
        else {
            return;
        };
        let (_first, hub, second) = second_subscribe_under_way_at_close(&router).await;
        assert!(second.await.is_err());
        let freed = std::sync::Arc::downgrade(&hub);
        drop(hub);
        within("the subscriber to be freed", || freed.upgrade().is_none()).await;
    }

    /// A pub/sub subscribe confirmed just as the subscriber gives up reconnecting fails, as one that
    /// starts after it does. Before, it was registered after the give-up had ended the subscriptions it
    /// listed, and returned a subscription that nothing ended, waiting for ever on a connection that
    /// never comes back. (The give-up is announced here while the subscribe's `PING` is held.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscribe_confirmed_as_the_subscriber_gives_up_fails() {
        let Some((proxy, router)) = proxied_router(false).await else {
            return;
        };
        let (_first, hub) = first_subscription(&router).await;
        let second = a_pattern_subscribe_held_in_the_blackhole(&proxy, &router, &hub).await;
        hub.given_up("redis://127.0.0.1:6379");
        proxy.blackhole(false);
        let outcome = tokio::time::timeout(Duration::from_secs(10), second)
            .await
            .expect("the subscribe ends");
        match outcome {
            Err(agentcomm_core::error::Error::Connection { message, .. }) => {
                assert!(message.contains("connect a new router"), "{message}")
            }
            Err(other) => panic!("expected the give-up's error, got {other}"),
            Ok(_) => panic!(
                "a subscribe confirmed as the subscriber gave up returned a subscription nothing ends"
            ),
        }
        router.close().await.unwrap();
    }

    /// A pub/sub subscribe under way when the subscriber gives up reconnecting fails at once with the
    /// give-up's error. Before, its `SUBSCRIBE` went to the client that gave up, where fred keeps a
    /// command until the command timeout: it failed with `Timeout` only then (30 s by default).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscribe_under_way_when_the_subscriber_gives_up_fails_at_once() {
        let Some((proxy, router)) =
            proxied_router_with(|builder| builder.max_reconnect_attempts(Some(0))).await
        else {
            return;
        };
        let (_first, hub) = first_subscription(&router).await;
        // The second subscribe waits for the counts, held here until the subscriber gave up.
        let held = hub.redis.lock().await;
        let mut second = router.subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Pong:event:s1").unwrap(),
        ));
        assert!(futures::poll!(&mut second).is_pending());
        proxy.reject_for(Duration::from_secs(600));
        proxy.cut_all();
        within("the subscriber to give up", || hub.gave_up()).await;
        drop(held);
        let outcome = answered_soon_after_the_give_up(second).await;
        match outcome {
            Err(agentcomm_core::error::Error::Connection { message, .. }) => {
                assert!(message.contains("max_reconnect_attempts"), "{message}")
            }
            Err(other) => panic!("expected the give-up's error, got {other}"),
            Ok(_) => panic!("subscribed on a subscriber that gave up"),
        }
        proxy.reject_for(Duration::ZERO);
        router.close().await.unwrap();
    }

    /// A pub/sub subscribe whose confirmation the give-up cuts off fails at once. Before, its set-up
    /// unsubscribed what it had subscribed on the client that gave up, where fred keeps a command until
    /// the command timeout: the subscribe (and the counts, which every other subscribe and the close
    /// wait for) waited that long.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscribe_the_give_up_cuts_off_fails_at_once() {
        let Some((proxy, router)) =
            proxied_router_with(|builder| builder.max_reconnect_attempts(Some(0))).await
        else {
            return;
        };
        let (_first, hub) = first_subscription(&router).await;
        let second = a_pattern_subscribe_held_in_the_blackhole(&proxy, &router, &hub).await;
        proxy.reject_for(Duration::from_secs(600));
        proxy.cut_all();
        within("the subscriber to give up", || hub.gave_up()).await;
        let outcome = answered_soon_after_the_give_up(second).await;
        assert!(outcome.is_err(), "subscribed on a subscriber that gave up");
        proxy.reject_for(Duration::ZERO);
        router.close().await.unwrap();
    }

    /// A subscriber whose connection the network silently stops carrying (a NAT or firewall that
    /// dropped its state, a partition: nothing is closed, nothing comes back) connects again and
    /// receives again, and what was published while it was deaf is counted as lost. Before, the
    /// subscriber wrote nothing on its connection, so neither fred nor agentcomm ever found it out:
    /// the subscription received nothing for ever while a publisher published on, with nothing
    /// counted, and health `Healthy`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscriber_whose_connection_goes_silent_connects_again_and_counts_the_loss() {
        use std::sync::atomic::Ordering;
        let prefix = crate::unit_redis::prefix();
        // fred's limit for an unanswered command is then 2 s.
        let Some((proxy, router)) = proxied_router_with(|builder| {
            builder
                .prefix(&prefix)
                .command_timeout(Duration::from_secs(1))
                .reconnect(agentcomm_core::backoff::Backoff::new(
                    Duration::from_millis(20),
                    Duration::from_millis(50),
                ))
        })
        .await
        else {
            return;
        };
        // The publisher reaches Redis directly, not through the proxy.
        let url = crate::unit_redis::url();
        let Some(publisher) = pubsub_router(&url, &url, |builder| builder.prefix(&prefix)).await
        else {
            return;
        };
        let pattern = ChannelPattern::parse("Ping:event:s1").unwrap();
        let mut subscription = router
            .subscribe(SubscribeOptions::new(pattern))
            .await
            .unwrap();
        let counters = router.shared().counters.clone();
        let numbered = |number: u32| {
            Envelope::new(
                parse_channel("Ping:event:s1").unwrap(),
                "application/json",
                number.to_string().into_bytes(),
            )
        };
        let number_of = |delivery: &agentcomm_core::router::Delivery| -> u32 {
            std::str::from_utf8(delivery.envelope().payload())
                .unwrap()
                .parse()
                .unwrap()
        };
        publisher.publish(numbered(0)).await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), subscription.next())
            .await
            .expect("the first message")
            .expect("a delivery");
        assert_eq!(number_of(&first), 0);
        first.ack().await.unwrap();
        let reconnects = counters.reconnects.load(Ordering::Relaxed);
        proxy.silence_live();
        // Published while the subscriber's connection carries nothing, and on until it hears again.
        let started = tokio::time::Instant::now();
        let mut number = 0;
        let heard = loop {
            number += 1;
            publisher.publish(numbered(number)).await.unwrap();
            if let Ok(Some(delivery)) =
                tokio::time::timeout(Duration::from_millis(100), subscription.next()).await
            {
                break delivery;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the subscription received nothing within 20 s of its connection going silent, \
                 while {number} messages were published"
            );
        };
        let resumed_at = number_of(&heard);
        heard.ack().await.unwrap();
        assert!(
            counters.reconnects.load(Ordering::Relaxed) > reconnects,
            "the subscriber connected again"
        );
        // What was published from the silence to the restore is lost, and counted once a later
        // message showed the gap and the reorder window passed (the subscription counts as it is
        // read: what came after is read meanwhile).
        assert!(
            resumed_at > 1,
            "some messages were published into the silence"
        );
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        while counters.lost.load(Ordering::Relaxed) < u64::from(resumed_at - 1) {
            assert!(
                tokio::time::Instant::now() < until,
                "lost {} of the {} messages published into the silence",
                counters.lost.load(Ordering::Relaxed),
                resumed_at - 1
            );
            if let Ok(Some(delivery)) =
                tokio::time::timeout(Duration::from_millis(50), subscription.next()).await
            {
                delivery.ack().await.unwrap();
            }
        }
        assert_eq!(
            counters.lost.load(Ordering::Relaxed),
            u64::from(resumed_at - 1)
        );
        drop(subscription);
        let _ = publisher.close().await;
        let _ = router.close().await;
    }

    /// A subscriber connection that answers the liveness `PING` late, but within fred's own limit for
    /// an unanswered command (`max(command_timeout, 2 s)`), is kept: no reconnection, no warning, and
    /// nothing published meanwhile is lost. Before, with a `command_timeout` under 2 s, the `PING`
    /// failed with fred's command timeout, its late answer was not looked at, and, no message having
    /// arrived meanwhile, the check made the live connection again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscriber_connection_that_answers_the_liveness_ping_late_is_kept() {
        use std::sync::atomic::Ordering;
        let prefix = crate::unit_redis::prefix();
        // fred's limit for an unanswered command is then 2 s; the round trip below takes 0.4 s.
        let Some((proxy, router)) = proxied_router_with(|builder| {
            builder
                .prefix(&prefix)
                .command_timeout(Duration::from_millis(300))
        })
        .await
        else {
            return;
        };
        let pattern = ChannelPattern::parse("Late:event:s1").unwrap();
        let mut subscription = router
            .subscribe(SubscribeOptions::new(pattern))
            .await
            .unwrap();
        let counters = router.shared().counters.clone();
        let reconnects = counters.reconnects.load(Ordering::Relaxed);
        let errors = counters.connection_errors.load(Ordering::Relaxed);
        // Longer than the check's period (2 s), so that one of its PINGs is answered in 0.4 s.
        proxy.set_latency(Duration::from_millis(200));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        proxy.set_latency(Duration::ZERO);
        // Then the check would have made the connection again within 3 s of that PING.
        let until = tokio::time::Instant::now() + Duration::from_secs(4);
        while tokio::time::Instant::now() < until {
            assert_eq!(
                counters.reconnects.load(Ordering::Relaxed),
                reconnects,
                "the subscriber reconnected, though its connection answered in 0.4 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(counters.connection_errors.load(Ordering::Relaxed), errors);
        // And it still receives.
        router
            .publish(Envelope::new(
                parse_channel("Late:event:s1").unwrap(),
                "application/json",
                b"1".to_vec(),
            ))
            .await
            .unwrap();
        let delivery = tokio::time::timeout(Duration::from_secs(5), subscription.next())
            .await
            .expect("a message after the slow PING")
            .expect("a delivery");
        delivery.ack().await.unwrap();
        drop(subscription);
        let _ = router.close().await;
    }

    #[test]
    fn globs_match_like_redis_for_the_patterns_agentcomm_makes() {
        let cases = [
            ("p:*", "p:A:b:c", true),
            ("p:A:*:s1", "p:A:request:s1", true),
            ("p:A:*:s1", "p:A:request:s2", false),
            ("p:A:*:s1", "p:AB:request:s1", false),
            ("a\\*b:*", "a*b:x", true),
            ("a\\*b:*", "aXb:x", false),
            ("p:s\\[1\\]", "p:s[1]", true),
            ("p:?", "p:x", true),
            ("p:*:*:*", "p:a:b", false),
        ];
        for (glob, text, expected) in cases {
            assert_eq!(
                glob_matches(glob.as_bytes(), text.as_bytes()),
                expected,
                "{glob} vs {text}"
            );
        }
    }
}
