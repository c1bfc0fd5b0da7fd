//! Pub/sub delivery: one subscriber connection per router, sorted to local subscriptions.
//!
//! - fred's `SubscriberClient` restores every `SUBSCRIBE`/`PSUBSCRIBE` after each reconnect.
//! - One task reads the client's message channel (sized for bursts, [`Settings::broadcast_capacity`]),
//!   decodes each frame once, checks its sequence number ([`crate::sequence`]) and hands a copy to every
//!   local subscription whose patterns match ([`ChannelPattern::matches`], the one matcher).
//! - It never waits for a slow subscription (that would stall all of them and overrun the client's
//!   channel): each subscription has a buffer of its own ([`Settings::pubsub_buffer`]); a message that
//!   finds it full is dropped, counted (`dropped`) and logged.
//! - A nacked or abandoned delivery is delivered again to its subscription, from memory (no broker
//!   redelivery exists in pub/sub).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use agentcomm_core::channel::ChannelPattern;
use agentcomm_core::envelope::Envelope;
use agentcomm_core::error::{Error, Result};
use agentcomm_core::router::{
    Acknowledge, BoxFuture, Delivery, Distribution, NackAction, SubscribeOptions, Subscription,
    SubscriptionControl,
};
use fred::clients::SubscriberClient;
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use tokio::sync::broadcast::error::RecvError;

use crate::connection::{map_error, watch_client};
use crate::counters::LogLimiter;
use crate::keys::RedisSubscription;
use crate::router::Shared;
use crate::sequence::{SEQUENCE_HEADER, SequenceTracker, Verdict};

/// The subscriber side of a pub/sub router.
pub(crate) struct PubSubHub {
    client: SubscriberClient,
    subscriptions: RwLock<Vec<Arc<PubSubSubscription>>>,
    /// How many local subscriptions use each Redis subscription.
    redis: tokio::sync::Mutex<HashMap<RedisSubscription, usize>>,
    next_id: AtomicU64,
    dropped_log: LogLimiter,
}

pub(crate) struct PubSubSubscription {
    id: u64,
    patterns: Vec<ChannelPattern>,
    redis: Vec<RedisSubscription>,
    sender: async_channel::Sender<Delivery>,
    closed: AtomicBool,
}

impl PubSubHub {
    /// Connects the subscriber client and starts sorting what it receives.
    pub(crate) async fn start(shared: &Arc<Shared>) -> Result<Arc<Self>> {
        let settings = &shared.settings;
        let client = shared
            .fred_builder()
            .build_subscriber_client()
            .map_err(|error| map_error(&error, &settings.url, "creating the pub/sub subscriber"))?;
        let connect = tokio::time::timeout(settings.connect_timeout * 2, client.init()).await;
        match connect {
            Ok(Ok(_task)) => {}
            Ok(Err(error)) => {
                return Err(map_error(
                    &error,
                    &settings.url,
                    "connecting the pub/sub subscriber",
                ));
            }
            Err(_) => {
                return Err(Error::Connection {
                    backend: "redis",
                    url: agentcomm_core::error::redact_url(&settings.url),
                    message: format!(
                        "the pub/sub subscriber could not connect within {:?}",
                        settings.connect_timeout * 2
                    ),
                });
            }
        }
        let _resubscriber = client.manage_subscriptions();
        watch_client(
            &client,
            "pub/sub subscriber",
            shared.counters.clone(),
            &settings.url,
            || {},
        );
        let hub = Arc::new(PubSubHub {
            client,
            subscriptions: RwLock::new(Vec::new()),
            redis: tokio::sync::Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            dropped_log: LogLimiter::new(Duration::from_secs(5)),
        });
        tokio::spawn(dispatch(hub.clone(), Arc::downgrade(shared)));
        Ok(hub)
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.client.is_connected()
    }

    pub(crate) fn subscription_count(&self) -> usize {
        self.subscriptions.read().expect("subscriptions lock").len()
    }

    pub(crate) async fn subscribe(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        options: SubscribeOptions,
    ) -> Result<Subscription> {
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
        let capacity = shared.settings.pubsub_buffer.max(options.prefetch);
        let (sender, receiver) = async_channel::bounded(capacity);
        let subscription = Arc::new(PubSubSubscription {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            patterns: options.patterns.clone(),
            redis: redis.clone(),
            sender,
            closed: AtomicBool::new(false),
        });
        // Registered before Redis confirms, so that nothing arriving right after the confirmation is missed.
        self.subscriptions
            .write()
            .expect("subscriptions lock")
            .push(subscription.clone());
        if let Err(error) = self.add_redis(&redis, &shared.settings.url).await {
            self.remove(&subscription).await;
            return Err(error);
        }
        let control = Arc::new(PubSubControl {
            hub: Arc::downgrade(self),
            subscription: subscription.clone(),
        });
        Ok(Subscription::new(receiver, control, &options))
    }

    async fn add_redis(&self, wanted: &[RedisSubscription], url: &str) -> Result<()> {
        let mut counts = self.redis.lock().await;
        for subscription in wanted {
            if counts.get(subscription).copied().unwrap_or(0) == 0 {
                let result = match subscription {
                    RedisSubscription::Channel(name) => self.client.subscribe(name.as_str()).await,
                    RedisSubscription::Pattern(glob) => self.client.psubscribe(glob.as_str()).await,
                };
                result.map_err(|error| map_error(&error, url, "subscribing"))?;
            }
            *counts.entry(subscription.clone()).or_insert(0) += 1;
        }
        // fred resolves SUBSCRIBE when it is written, not when Redis confirms it. Redis answers the
        // commands of one connection in order, so once this PING is answered the subscriptions are live.
        let _: fred::types::Value = self
            .client
            .ping(None)
            .await
            .map_err(|error| map_error(&error, url, "confirming a subscription (PING)"))?;
        Ok(())
    }

    /// Takes a subscription out: no more messages are sorted to it; Redis subscriptions nobody uses any
    /// more are dropped.
    async fn remove(&self, subscription: &Arc<PubSubSubscription>) {
        if subscription.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.subscriptions
            .write()
            .expect("subscriptions lock")
            .retain(|s| s.id != subscription.id);
        subscription.sender.close();
        let mut counts = self.redis.lock().await;
        for redis in &subscription.redis {
            let Some(count) = counts.get_mut(redis) else {
                continue;
            };
            *count -= 1;
            if *count > 0 {
                continue;
            }
            counts.remove(redis);
            let result = match redis {
                RedisSubscription::Channel(name) => self.client.unsubscribe(name.as_str()).await,
                RedisSubscription::Pattern(glob) => self.client.punsubscribe(glob.as_str()).await,
            };
            if let Err(error) = result {
                tracing::debug!(error = %error, "could not unsubscribe; the connection closes anyway");
            }
        }
    }

    /// Ends every subscription and disconnects.
    pub(crate) async fn close(&self) {
        let subscriptions: Vec<_> = self
            .subscriptions
            .read()
            .expect("subscriptions lock")
            .clone();
        for subscription in &subscriptions {
            self.remove(subscription).await;
        }
        if let Err(error) = self.client.quit().await {
            tracing::debug!(error = %error, "the pub/sub subscriber did not quit cleanly");
        }
    }
}

impl PubSubSubscription {
    fn matches(&self, envelope: &Envelope) -> bool {
        self.patterns
            .iter()
            .any(|pattern| pattern.matches(envelope.channel()))
    }

    fn delivery(self: &Arc<Self>, shared: &Arc<Shared>, envelope: Envelope) -> Delivery {
        Delivery::new(
            envelope,
            Box::new(PubSubAck {
                subscription: self.clone(),
                shared: Arc::downgrade(shared),
            }),
        )
    }
}

/// Reads the subscriber client's messages and sorts them to subscriptions until the client quits.
async fn dispatch(hub: Arc<PubSubHub>, shared: std::sync::Weak<Shared>) {
    let mut messages = hub.client.message_rx();
    let mut tracker = None;
    let mut sweep = tokio::time::interval(Duration::from_millis(100));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let message = tokio::select! {
            message = messages.recv() => message,
            _ = sweep.tick() => {
                let Some(shared) = shared.upgrade() else { break };
                let tracker = tracker.get_or_insert_with(|| SequenceTracker::new(shared.settings.reorder_window));
                let lost = tracker.sweep(Instant::now());
                report_lost(&shared, lost);
                continue;
            }
        };
        let Some(shared) = shared.upgrade() else {
            break;
        };
        let tracker =
            tracker.get_or_insert_with(|| SequenceTracker::new(shared.settings.reorder_window));
        match message {
            Ok(message) => {
                let raw = message.value.as_bytes().unwrap_or_default();
                let mut envelope = match Envelope::from_frame(raw) {
                    Ok(envelope) => envelope,
                    Err(error) => {
                        shared.malformed(
                            bytes::Bytes::copy_from_slice(raw),
                            &message.channel,
                            &error,
                        );
                        continue;
                    }
                };
                if let Some(sequence) = envelope.headers_mut().remove(SEQUENCE_HEADER) {
                    let (verdict, lost) =
                        tracker.observe(envelope.channel().name(), &sequence, Instant::now());
                    report_lost(&shared, lost);
                    if verdict == Verdict::Duplicate {
                        shared.counters.bump(&shared.counters.duplicates);
                        continue;
                    }
                }
                let subscriptions = hub.subscriptions.read().expect("subscriptions lock");
                let mut remaining = subscriptions
                    .iter()
                    .filter(|subscription| subscription.matches(&envelope))
                    .count();
                let mut envelope = Some(envelope);
                for subscription in subscriptions.iter() {
                    if remaining == 0 {
                        break;
                    }
                    let Some(current) = envelope.as_ref() else {
                        break;
                    };
                    if !subscription.matches(current) {
                        continue;
                    }
                    remaining -= 1;
                    // The last target takes the envelope itself; the others get copies.
                    let copy = if remaining == 0 {
                        envelope.take().expect("present until the last target")
                    } else {
                        current.clone()
                    };
                    let delivery = subscription.delivery(&shared, copy);
                    match subscription.sender.try_send(delivery) {
                        Ok(()) => shared.counters.bump(&shared.counters.delivered),
                        Err(async_channel::TrySendError::Full(delivery)) => {
                            shared.counters.lose(&shared.counters.dropped, 1);
                            if let Some(suppressed) = hub.dropped_log.allow() {
                                tracing::warn!(
                                    message_id = %delivery.envelope().id(),
                                    channel = delivery.envelope().channel().name(),
                                    buffer = subscription.sender.capacity().unwrap_or(0),
                                    suppressed,
                                    "a pub/sub subscription's buffer is full: the message was dropped \
                                     (its consumer is too slow; raise `pubsub_buffer`, add consumers, \
                                     or use DeliveryMode::Streams)"
                                );
                            }
                            delivery.discard();
                        }
                        Err(async_channel::TrySendError::Closed(delivery)) => delivery.discard(),
                    }
                }
            }
            Err(RecvError::Lagged(missed)) => {
                shared.counters.lose(&shared.counters.lagged, missed);
                tracing::warn!(
                    missed,
                    capacity = shared.settings.broadcast_capacity,
                    "the pub/sub message channel overran: messages were lost before they could be \
                     sorted (raise `broadcast_capacity`)"
                );
            }
            Err(RecvError::Closed) => break,
        }
    }
}

fn report_lost(shared: &Shared, lost: u64) {
    if lost > 0 {
        shared.counters.lose(&shared.counters.lost, lost);
        tracing::warn!(
            lost,
            "pub/sub messages were lost (missing from their publisher's sequence: published while \
             this subscriber was disconnected, or cut off in transit); use DeliveryMode::Streams for \
             durable delivery"
        );
    }
}

struct PubSubAck {
    subscription: Arc<PubSubSubscription>,
    shared: std::sync::Weak<Shared>,
}

impl PubSubAck {
    fn give_back(self, envelope: Envelope, delay: Duration) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let subscription = self.subscription;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            lost_on_close(&shared, &envelope);
            return;
        };
        runtime.spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            shared.counters.bump(&shared.counters.redelivered);
            let delivery = subscription.delivery(&shared, envelope).redelivered(true);
            if let Err(async_channel::SendError(delivery)) =
                subscription.sender.send(delivery).await
            {
                lost_on_close(&shared, delivery.envelope());
                delivery.discard();
            }
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
        Box::pin(async { Ok(()) })
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
        self.give_back(envelope, delay);
        Box::pin(async { Ok(()) })
    }

    fn abandon(self: Box<Self>, envelope: Envelope) {
        self.give_back(envelope, Duration::ZERO);
    }
}

struct PubSubControl {
    hub: std::sync::Weak<PubSubHub>,
    subscription: Arc<PubSubSubscription>,
}

impl SubscriptionControl for PubSubControl {
    fn close(&self) -> BoxFuture<'static, Result<()>> {
        // Stop sorting to it at once; Redis-side unsubscribing may wait for the connection.
        self.subscription.sender.close();
        let hub = self.hub.clone();
        let subscription = self.subscription.clone();
        Box::pin(async move {
            if let Some(hub) = hub.upgrade() {
                hub.remove(&subscription).await;
            }
            Ok(())
        })
    }
}
