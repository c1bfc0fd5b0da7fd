//! Pub/sub delivery: one subscriber connection per router; each subscription reads the client's own
//! message channel, with no task in between.
//!
//! - fred's `SubscriberClient` restores every `SUBSCRIBE`/`PSUBSCRIBE` after each reconnect.
//! - The client's message channel is a broadcast ring sized for bursts
//!   ([`Settings::broadcast_capacity`], 65,536 instead of fred's 32); every subscription has its own
//!   cursor in it, so a slow subscription never holds up the others. A subscription that falls more
//!   than the ring behind loses the oldest messages: counted as `lagged` (and as `lost`), and logged.
//! - As the subscriber polls, its subscription skips messages on Redis channels none of its own Redis
//!   subscriptions cover (without decoding them), decodes the rest, checks sequence numbers
//!   ([`crate::sequence`]: gaps counted as `lost`, repeats discarded as `duplicates`) and keeps what
//!   its patterns match ([`ChannelPattern::matches`], the one matcher).
//! - A nacked or abandoned delivery is delivered again to its subscription, from memory (no broker
//!   redelivery exists in pub/sub).
//!
//! [`Settings::broadcast_capacity`]: crate::builder::Settings

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
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
use fred::types::Message;
use tokio::sync::broadcast::{self, error::TryRecvError};

use crate::connection::{map_error, watch_client};
use crate::keys::RedisSubscription;
use crate::router::Shared;
use crate::sequence::{SEQUENCE_HEADER, SequenceTracker, Verdict};

/// The subscriber side of a pub/sub router.
pub(crate) struct PubSubHub {
    client: SubscriberClient,
    /// How many local subscriptions use each Redis subscription.
    redis: tokio::sync::Mutex<HashMap<RedisSubscription, usize>>,
    open: AtomicU64,
    next_id: AtomicU64,
    subscriptions: std::sync::Mutex<HashMap<u64, Arc<PubSubSubscription>>>,
}

pub(crate) struct PubSubSubscription {
    id: u64,
    redis: Vec<RedisSubscription>,
    closed: AtomicBool,
    /// Deliveries given back (nack, abandon), delivered again before new messages.
    again: async_channel::Sender<Delivery>,
    /// Wakes the stream when the subscription closes.
    stop: tokio::sync::watch::Sender<bool>,
}

impl PubSubHub {
    /// Connects the subscriber client.
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
        Ok(Arc::new(PubSubHub {
            client,
            redis: tokio::sync::Mutex::new(HashMap::new()),
            open: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            subscriptions: std::sync::Mutex::new(HashMap::new()),
        }))
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.client.is_connected()
    }

    pub(crate) fn subscription_count(&self) -> usize {
        self.open.load(Ordering::Relaxed) as usize
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
        // The receivers exist before Redis confirms, so nothing arriving right after is missed.
        let messages = Arc::new(std::sync::Mutex::new(self.client.message_rx()));
        let wake = self.client.message_rx();
        let (again, again_receiver) = async_channel::unbounded();
        let (stop, stop_receiver) = tokio::sync::watch::channel(false);
        let subscription = Arc::new(PubSubSubscription {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            redis: redis.clone(),
            closed: AtomicBool::new(false),
            again,
            stop,
        });
        self.add_redis(&redis, &shared.settings.url).await?;
        self.open.fetch_add(1, Ordering::Relaxed);
        self.subscriptions
            .lock()
            .expect("subscriptions lock")
            .insert(subscription.id, subscription.clone());
        let reader = Reader {
            messages: messages.clone(),
            wake,
            again: again_receiver.clone(),
            stop: stop_receiver,
            subscription: subscription.clone(),
            patterns: options.patterns.clone(),
            shared: Arc::downgrade(shared),
            tracker: SequenceTracker::new(shared.settings.reorder_window),
            last_sweep: Instant::now(),
            done: false,
            last: None,
        };
        let control = Arc::new(PubSubControl {
            hub: Arc::downgrade(self),
            subscription,
        });
        let deliveries = futures::stream::unfold(reader, |mut reader| async move {
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

    /// Takes a subscription out: its stream ends after what it already received; Redis subscriptions
    /// nobody uses any more are dropped.
    async fn remove(&self, subscription: &Arc<PubSubSubscription>) {
        if subscription.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        subscription.stop.send_replace(true);
        subscription.again.close();
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.subscriptions
            .lock()
            .expect("subscriptions lock")
            .remove(&subscription.id);
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
        let open: Vec<Arc<PubSubSubscription>> = self
            .subscriptions
            .lock()
            .expect("subscriptions lock")
            .values()
            .cloned()
            .collect();
        for subscription in &open {
            self.remove(subscription).await;
        }
        if let Err(error) = self.client.quit().await {
            tracing::debug!(error = %error, "the pub/sub subscriber did not quit cleanly");
        }
    }
}

impl PubSubSubscription {
    /// Whether one of this subscription's Redis subscriptions covers `channel` (without decoding).
    fn covers(&self, channel: &str) -> bool {
        self.redis.iter().any(|redis| match redis {
            RedisSubscription::Channel(name) => name == channel,
            RedisSubscription::Pattern(glob) => glob_matches(glob.as_bytes(), channel.as_bytes()),
        })
    }
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
    /// This subscription's cursor in the client's message channel, read with `try_recv` only (so that
    /// [`PubSubStream::size_hint`] can count what waits in it).
    messages: Arc<std::sync::Mutex<broadcast::Receiver<Message>>>,
    /// A second cursor, only to be woken when a message arrives.
    wake: broadcast::Receiver<Message>,
    again: async_channel::Receiver<Delivery>,
    stop: tokio::sync::watch::Receiver<bool>,
    subscription: Arc<PubSubSubscription>,
    patterns: Vec<ChannelPattern>,
    shared: Weak<Shared>,
    tracker: SequenceTracker,
    last_sweep: Instant,
    done: bool,
    /// The last message taken, when it carried a sequence number: Redis sends one copy per matching
    /// Redis subscription of the connection, one right after the other, and those copies are skipped
    /// without counting them as duplicates.
    last: Option<(fred::types::Value, fred::bytes_utils::Str)>,
}

impl Reader {
    async fn next(&mut self) -> Option<Delivery> {
        loop {
            if self.done {
                return None;
            }
            let shared = self.shared.upgrade()?;
            // Given-back deliveries first.
            if let Ok(delivery) = self.again.try_recv() {
                return Some(delivery);
            }
            let received = self.messages.lock().expect("messages lock").try_recv();
            match received {
                Ok(message) => {
                    if let Some(delivery) = self.accept(&shared, message) {
                        return Some(delivery);
                    }
                    continue;
                }
                Err(TryRecvError::Lagged(missed)) => {
                    self.lagged(&shared, missed);
                    continue;
                }
                Err(TryRecvError::Closed) => {
                    self.done = true;
                    return None;
                }
                Err(TryRecvError::Empty) => {}
            }
            if *self.stop.borrow() {
                // Closed, and what already arrived is read: the stream ends.
                self.done = true;
                return None;
            }
            // Nothing waits: forget what the wake-up cursor saw (the messages cursor has it), then sleep
            // until something new arrives, is given back, the subscription closes, or gaps are due.
            while let Ok(_) | Err(TryRecvError::Lagged(_)) = self.wake.try_recv() {}
            if !self.messages.lock().expect("messages lock").is_empty() {
                continue;
            }
            let sweep = self.last_sweep
                + shared
                    .settings
                    .reorder_window
                    .max(Duration::from_millis(50));
            drop(shared);
            tokio::select! {
                biased;
                delivery = self.again.recv() => match delivery {
                    Ok(delivery) => return Some(delivery),
                    // Closed with the subscription: read what already arrived.
                    Err(_) => { let _ = self.stop.wait_for(|stopped| *stopped).await; }
                },
                _ = self.wake.recv() => {}
                _ = self.stop.changed() => {}
                () = tokio::time::sleep_until(sweep.into()) => {
                    let shared = self.shared.upgrade()?;
                    self.last_sweep = Instant::now();
                    let lost = self.tracker.sweep(self.last_sweep);
                    report_lost(&shared, lost);
                }
            }
        }
    }

    /// Turns one Redis message into a delivery for this subscription, or `None` when it is not for it
    /// (another subscription's channel, a pattern mismatch, a repeat, an undecodable frame).
    fn accept(&mut self, shared: &Arc<Shared>, message: Message) -> Option<Delivery> {
        if !self.subscription.covers(&message.channel) {
            return None;
        }
        if let Some((value, channel)) = &self.last
            && *channel == message.channel
            && *value == message.value
        {
            return None;
        }
        let raw = message.value.as_bytes().unwrap_or_default();
        let mut envelope = match Envelope::from_frame(raw) {
            Ok(envelope) => envelope,
            Err(error) => {
                shared.malformed(bytes::Bytes::copy_from_slice(raw), &message.channel, &error);
                return None;
            }
        };
        self.last = None;
        if let Some(sequence) = envelope.headers_mut().remove(SEQUENCE_HEADER) {
            self.last = Some((message.value.clone(), message.channel.clone()));
            let (verdict, lost) =
                self.tracker
                    .observe(envelope.channel().name(), &sequence, Instant::now());
            report_lost(shared, lost);
            if verdict == Verdict::Duplicate {
                shared.counters.bump(&shared.counters.duplicates);
                return None;
            }
        }
        if !self
            .patterns
            .iter()
            .any(|pattern| pattern.matches(envelope.channel()))
        {
            return None;
        }
        shared.counters.bump(&shared.counters.delivered);
        Some(delivery(&self.subscription, shared, envelope))
    }

    fn lagged(&mut self, shared: &Shared, missed: u64) {
        shared.counters.lose(&shared.counters.lagged, missed);
        // The overrun messages are counted here, exactly; following the sequences afresh keeps them
        // from being counted again as `lost`.
        self.tracker = SequenceTracker::new(shared.settings.reorder_window);
        self.last = None;
        tracing::warn!(
            missed,
            capacity = shared.settings.broadcast_capacity,
            "a pub/sub subscription fell behind the client's message channel and lost its oldest \
             messages (its consumer is too slow; raise `broadcast_capacity`, consume faster, or use \
             DeliveryMode::Streams)"
        );
    }
}

/// A subscription's deliveries, produced as the subscriber polls; knows how many messages wait.
struct PubSubStream {
    deliveries: std::pin::Pin<Box<dyn futures::Stream<Item = Delivery> + Send>>,
    messages: Arc<std::sync::Mutex<broadcast::Receiver<Message>>>,
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
    /// other subscriptions included), and given-back deliveries.
    fn size_hint(&self) -> (usize, Option<usize>) {
        let waiting = self.messages.lock().map(|r| r.len()).unwrap_or(0) + self.again.len();
        (waiting, None)
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

fn report_lost(shared: &Shared, lost: u64) {
    if lost > 0 {
        shared.counters.lose(&shared.counters.lost, lost);
        tracing::warn!(
            lost,
            "pub/sub messages were lost (missing from their publisher's sequence: published while \
             this subscriber was disconnected, cut off in transit, or overrun); use \
             DeliveryMode::Streams for durable delivery"
        );
    }
}

struct PubSubAck {
    subscription: Arc<PubSubSubscription>,
    shared: Weak<Shared>,
}

impl PubSubAck {
    fn give_back(self, envelope: Envelope, delay: Duration) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let subscription = self.subscription;
        let give = move |shared: Arc<Shared>, subscription: Arc<PubSubSubscription>, envelope| {
            shared.counters.bump(&shared.counters.redelivered);
            let delivery = delivery(&subscription, &shared, envelope).redelivered(true);
            if let Err(async_channel::TrySendError::Closed(delivery)) =
                subscription.again.try_send(delivery)
            {
                lost_on_close(&shared, delivery.envelope());
                delivery.discard();
            }
        };
        if delay.is_zero() {
            give(shared, subscription, envelope);
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            lost_on_close(&shared, &envelope);
            return;
        };
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
                subscription.stop.send_replace(true);
                subscription.again.close();
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::glob_matches;

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
