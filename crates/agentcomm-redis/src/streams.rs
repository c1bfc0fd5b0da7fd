//! Streams delivery: durable, at-least-once, with consumer groups.
//!
//! See `docs/redis.md` for the design. In short:
//! - one stream per message class (`<prefix>:stream:{<class>}`); a subscription reads the streams of the
//!   classes its patterns name, and a pattern with a wildcard class reads every class stream listed in
//!   the registry, finding new ones as they appear and reading those from their first entry;
//! - a group subscription is a consumer of a Redis consumer group named after the group; a fan-out
//!   subscription reads with `XREAD` from the position the streams had when it subscribed;
//! - each subscription reads on a connection of its own with blocking reads, at most `prefetch`
//!   unsettled entries at a time (a semaphore), and renews the entries it holds so that nobody takes
//!   them over while its handlers work;
//! - ack is `XACK`; a nack keeps the entry pending and delivers it again after the delay, with its
//!   delivery counter set to the new attempt (`XCLAIM .. RETRYCOUNT`), so a crash does not reset it;
//! - entries left pending by a consumer that stopped (crashed, or cut off) are claimed by the others after
//!   `claim_idle`; an entry delivered more than `max_deliveries` times goes to its dead-letter channel.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentcomm_core::channel::ChannelPattern;
use agentcomm_core::envelope::{Envelope, MessageId, headers};
use agentcomm_core::error::{Error, Result};
use agentcomm_core::router::{
    Acknowledge, BoxFuture, Delivery, Distribution, NackAction, SubscribeOptions, Subscription,
    SubscriptionControl,
};
use bytes::Bytes;
use fred::clients::Client;
use fred::interfaces::{ClientInterface, ClientLike, SetsInterface, StreamsInterface};
use fred::types::config::Options;
use fred::types::{ClusterHash, CustomCommand, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::connection::{is_nogroup, map_error, watch_client};
use crate::router::Shared;

/// The field of a stream entry that holds the frame.
pub(crate) const FRAME_FIELD: &str = "f";

/// One entry as read from a stream: its id and frame (`None` when the entry was deleted or trimmed while
/// it was pending).
type Entry = (String, Option<Bytes>);

pub(crate) struct StreamSubscription {
    pub(crate) id: u64,
    shared: Arc<Shared>,
    group: Option<String>,
    consumer: String,
    patterns: Vec<ChannelPattern>,
    wildcard_class: bool,
    /// The patterns of every member of the group, and when they were read.
    union: Mutex<(Vec<ChannelPattern>, Option<Instant>)>,
    sender: async_channel::Sender<Delivery>,
    permits: Arc<Semaphore>,
    /// How many prefetch slots must be free before the reader reads again: reading one entry per
    /// settled delivery would cost a read per message once the prefetch is full.
    refill: usize,
    /// Entries delivered and not settled yet, by stream key and id.
    held: Mutex<HashSet<(Arc<str>, Arc<str>)>>,
    settled: tokio::sync::Notify,
    closed: AtomicBool,
    stop: watch::Sender<bool>,
    readers: Mutex<Vec<Arc<Reader>>>,
    /// Fan-out: where each stream was read up to.
    cursors: Mutex<HashMap<Arc<str>, String>>,
    known: Mutex<HashSet<Arc<str>>>,
    running: AtomicU64,
    done: tokio::sync::Notify,
    /// Read loops still running (a subset of `running`).
    reading: AtomicU64,
}

/// A connection that reads some of a subscription's streams with blocking reads.
struct Reader {
    client: Client,
    keys: Mutex<Vec<Arc<str>>>,
    rescan: Arc<AtomicBool>,
}

impl StreamSubscription {
    pub(crate) async fn start(
        shared: &Arc<Shared>,
        options: SubscribeOptions,
        id: u64,
    ) -> Result<(Arc<Self>, Subscription)> {
        let group = match &options.distribution {
            Distribution::Group(name) => Some(name.clone()),
            _ => None,
        };
        let (sender, receiver) = async_channel::bounded(options.prefetch);
        let (stop, _) = watch::channel(false);
        let consumer = format!("c-{}", uuid::Uuid::now_v7().simple());
        let subscription = Arc::new(StreamSubscription {
            id,
            shared: shared.clone(),
            group,
            consumer,
            wildcard_class: options.patterns.iter().any(|p| p.class().is_none()),
            patterns: options.patterns.clone(),
            union: Mutex::new((options.patterns.clone(), None)),
            sender,
            permits: Arc::new(Semaphore::new(options.prefetch)),
            refill: (options.prefetch / 4)
                .clamp(1, shared.settings.read_batch)
                .min(options.prefetch),
            held: Mutex::new(HashSet::new()),
            settled: tokio::sync::Notify::new(),
            closed: AtomicBool::new(false),
            stop,
            readers: Mutex::new(Vec::new()),
            cursors: Mutex::new(HashMap::new()),
            known: Mutex::new(HashSet::new()),
            running: AtomicU64::new(0),
            done: tokio::sync::Notify::new(),
            reading: AtomicU64::new(0),
        });
        if let Err(error) = subscription.setup().await {
            subscription.stop_now();
            subscription.quit_readers().await;
            return Err(error);
        }
        let control = Arc::new(StreamControl {
            subscription: subscription.clone(),
        });
        let handle = Subscription::new(receiver, control, &options);
        Ok((subscription, handle))
    }

    fn url(&self) -> &str {
        &self.shared.settings.url
    }

    fn is_group(&self) -> bool {
        self.group.is_some()
    }

    /// Creates groups or cursors, connects the readers and starts the tasks. Once it returns, every
    /// message published afterwards reaches this subscription (or its group).
    async fn setup(self: &Arc<Self>) -> Result<()> {
        let shared = &self.shared;
        let mut classes: Vec<String> = self
            .patterns
            .iter()
            .filter_map(|p| p.class().map(str::to_string))
            .collect();
        if self.wildcard_class {
            classes.extend(shared.registered_classes().await?);
        }
        classes.sort();
        classes.dedup();
        if let Some(group) = &self.group {
            let patterns: Vec<String> = self.patterns.iter().map(ToString::to_string).collect();
            let client = shared.pool.next();
            client
                .sadd::<i64, _, _>(shared.keys.group_patterns(group), patterns)
                .await
                .map_err(|e| map_error(&e, self.url(), "registering the group's patterns"))?;
        }
        let keys: Vec<Arc<str>> = classes
            .iter()
            .map(|class| Arc::from(shared.keys.stream(class)))
            .collect();
        for key in &keys {
            self.prepare_key(key, false).await?;
        }
        let clustered = shared.config.server.is_clustered();
        if clustered {
            for key in &keys {
                self.add_reader(vec![key.clone()]).await?;
            }
        } else {
            self.add_reader(keys).await?;
        }
        if self.is_group() {
            self.spawn(renew_leases(self.clone()));
            self.spawn(reclaim(self.clone()));
        }
        if self.wildcard_class {
            self.spawn(discover(self.clone()));
        }
        Ok(())
    }

    /// Makes `key` readable: the group exists (created at the end of the stream, or at its start for a
    /// stream found after subscribing), or the fan-out cursor is set.
    async fn prepare_key(&self, key: &Arc<str>, found_later: bool) -> Result<()> {
        let client = self.shared.pool.next();
        if let Some(group) = &self.group {
            let start = if found_later { "0" } else { "$" };
            create_group(client, key, group, start, self.url()).await?;
        } else {
            let start = if found_later {
                "0-0".to_string()
            } else {
                let last: Value = client
                    .xrevrange(key.as_ref(), "+", "-", Some(1))
                    .await
                    .map_err(|e| map_error(&e, self.url(), "reading the end of a stream"))?;
                last.into_array()
                    .into_iter()
                    .next()
                    .and_then(|entry| entry.into_array().into_iter().next())
                    .and_then(|id| id.as_string())
                    .unwrap_or_else(|| "0-0".to_string())
            };
            self.cursors
                .lock()
                .expect("cursors lock")
                .insert(key.clone(), start);
        }
        self.known
            .lock()
            .expect("known streams lock")
            .insert(key.clone());
        Ok(())
    }

    async fn add_reader(self: &Arc<Self>, keys: Vec<Arc<str>>) -> Result<()> {
        let shared = &self.shared;
        let client = shared
            .fred_builder()
            .build()
            .map_err(|e| map_error(&e, self.url(), "creating a stream reader"))?;
        let timeout = shared.settings.connect_timeout * 2;
        match tokio::time::timeout(timeout, client.init()).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                return Err(map_error(&error, self.url(), "connecting a stream reader"));
            }
            Err(_) => {
                return Err(Error::Connection {
                    backend: "redis",
                    url: agentcomm_core::error::redact_url(self.url()),
                    message: format!("a stream reader could not connect within {timeout:?}"),
                });
            }
        }
        let rescan = Arc::new(AtomicBool::new(false));
        let flag = rescan.clone();
        watch_client(
            &client,
            "stream reader",
            shared.counters.clone(),
            self.url(),
            move || flag.store(true, Ordering::Release),
        );
        let reader = Arc::new(Reader {
            client,
            keys: Mutex::new(keys),
            rescan,
        });
        self.readers
            .lock()
            .expect("readers lock")
            .push(reader.clone());
        self.reading.fetch_add(1, Ordering::AcqRel);
        let subscription = self.clone();
        self.spawn(async move {
            read_loop(subscription.clone(), reader).await;
            subscription.reading.fetch_sub(1, Ordering::AcqRel);
            subscription.done.notify_waiters();
        });
        Ok(())
    }

    fn spawn(self: &Arc<Self>, task: impl Future<Output = ()> + Send + 'static) {
        self.running.fetch_add(1, Ordering::AcqRel);
        let subscription = self.clone();
        tokio::spawn(async move {
            task.await;
            if subscription.running.fetch_sub(1, Ordering::AcqRel) == 1 {
                subscription.done.notify_waiters();
            }
        });
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Stops reading; what was delivered may still be settled.
    fn stop_now(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.sender.close();
        self.stop.send_replace(true);
        let readers = self.readers.lock().expect("readers lock").clone();
        for reader in readers {
            // Interrupts a blocking read as if it timed out, so that no entry it took is lost.
            tokio::spawn(async move {
                let _ = reader
                    .client
                    .unblock_self(Some(fred::types::ClientUnblockFlag::Timeout))
                    .await;
            });
        }
    }

    async fn quit_readers(&self) {
        let readers: Vec<_> = self
            .readers
            .lock()
            .expect("readers lock")
            .drain(..)
            .collect();
        for reader in readers {
            let _ = reader.client.quit().await;
        }
    }

    /// Waits until every delivered entry is settled and the tasks have ended, up to `deadline`.
    pub(crate) async fn finish(self: &Arc<Self>, deadline: Duration) {
        self.stop_now();
        let until = tokio::time::Instant::now() + deadline;
        // First the readers: what their last read took is given back before anything else ends.
        self.wait_until(until, || self.reading.load(Ordering::Acquire) == 0)
            .await;
        // Then what was handed out: handlers finish and settle. Deliveries still in the buffer stay
        // readable (the contract), but nobody is working on them, so closing does not wait for them;
        // in a group their entries stay pending and go to another member after `claim_idle`.
        loop {
            let settled = self.settled.notified();
            let handed_out = self
                .held
                .lock()
                .expect("held lock")
                .len()
                .saturating_sub(self.sender.len());
            if handed_out == 0 {
                break;
            }
            if tokio::time::timeout_at(until, settled).await.is_err() {
                tracing::warn!(
                    handed_out,
                    "closing with deliveries still unsettled; their entries stay pending and are \
                     delivered again to another consumer of the group"
                );
                break;
            }
        }
        self.settled.notify_waiters();
        // The lease renewer must be gone first: a renewal after the release would make the entries
        // look fresh again for another `claim_idle`.
        self.wait_until(until, || self.running.load(Ordering::Acquire) == 0)
            .await;
        self.release_all_pending().await;
        self.quit_readers().await;
        if let Some(group) = &self.group {
            self.leave_group(group).await;
        }
    }

    /// Gives every entry still pending for this consumer back to the group, marked idle so that
    /// another member claims it at once: entries of deliveries still buffered (they stay readable in the
    /// closed subscription, but can no longer be acknowledged once the router is closed), and any other
    /// this consumer still owns. Asks Redis rather than trusting local bookkeeping, so that nothing
    /// waits for `claim_idle` after a clean close.
    async fn release_all_pending(&self) {
        let Some(group) = &self.group else {
            return;
        };
        self.held.lock().expect("held lock").clear();
        self.settled.notify_waiters();
        let keys: Vec<Arc<str>> = self
            .known
            .lock()
            .expect("known streams lock")
            .iter()
            .cloned()
            .collect();
        let idle = self.shared.settings.claim_idle.as_millis() as u64;
        for key in keys {
            let client = self.shared.client_for(&key);
            let pending: Result<Value, _> = client
                .custom(
                    CustomCommand::new_static("XPENDING", ClusterHash::FirstKey, false),
                    vec![
                        Value::from(key.as_ref()),
                        Value::from(group.as_str()),
                        Value::from("-"),
                        Value::from("+"),
                        Value::from(10_000),
                        Value::from(self.consumer.as_str()),
                    ],
                )
                .await;
            let ids: Vec<String> = match pending {
                Ok(value) => value
                    .into_array()
                    .into_iter()
                    .filter_map(|item| item.into_array().into_iter().next()?.as_string())
                    .collect(),
                Err(error) => {
                    tracing::debug!(error = %error, "could not list pending entries to give back; they are claimed after claim_idle");
                    continue;
                }
            };
            for chunk in ids.chunks(500) {
                let result: Result<Value, _> = client
                    .xclaim(
                        key.as_ref(),
                        group.as_str(),
                        self.consumer.as_str(),
                        0,
                        chunk.to_vec(),
                        Some(idle),
                        None,
                        None,
                        false,
                        true,
                    )
                    .await;
                if let Err(error) = result {
                    tracing::debug!(error = %error, "could not give pending entries back; they are claimed after claim_idle");
                }
            }
        }
    }

    /// Waits for `condition`, checked each time a task ends, up to `until`.
    async fn wait_until(&self, until: tokio::time::Instant, condition: impl Fn() -> bool) {
        loop {
            let done = self.done.notified();
            if condition() {
                return;
            }
            if tokio::time::timeout_at(until, done).await.is_err() {
                return;
            }
        }
    }

    /// Removes this consumer from its group when it holds nothing pending, so groups do not collect
    /// dead consumers.
    async fn leave_group(&self, group: &str) {
        let keys: Vec<Arc<str>> = self
            .known
            .lock()
            .expect("known streams lock")
            .iter()
            .cloned()
            .collect();
        let client = self.shared.pool.next();
        for key in keys {
            let pending: Result<Value, _> = client
                .custom(
                    CustomCommand::new_static("XPENDING", ClusterHash::FirstKey, false),
                    vec![
                        Value::from(key.as_ref()),
                        Value::from(group),
                        Value::from("-"),
                        Value::from("+"),
                        Value::from(1),
                        Value::from(self.consumer.as_str()),
                    ],
                )
                .await;
            if matches!(&pending, Ok(value) if value.clone().into_array().is_empty()) {
                let _ = client
                    .xgroup_delconsumer::<Value, _, _, _>(
                        key.as_ref(),
                        group,
                        self.consumer.as_str(),
                    )
                    .await;
            }
        }
    }

    /// Whether an entry on this channel is for this subscription: its patterns match, or, for a group,
    /// those of another member do (a group receives the union of its members' patterns).
    async fn wants(&self, envelope: &Envelope) -> bool {
        if self.patterns.iter().any(|p| p.matches(envelope.channel())) {
            return true;
        }
        let Some(group) = &self.group else {
            return false;
        };
        let fresh = {
            let union = self.union.lock().expect("union lock");
            union
                .1
                .is_some_and(|at| at.elapsed() < Duration::from_secs(2))
        };
        if !fresh {
            let members: Result<Vec<String>, _> = self
                .shared
                .pool
                .next()
                .smembers(self.shared.keys.group_patterns(group))
                .await;
            if let Ok(members) = members {
                let patterns = members
                    .iter()
                    .filter_map(|text| ChannelPattern::parse(text).ok())
                    .collect();
                *self.union.lock().expect("union lock") = (patterns, Some(Instant::now()));
            }
        }
        self.union
            .lock()
            .expect("union lock")
            .0
            .iter()
            .any(|p| p.matches(envelope.channel()))
    }

    /// Delivers one entry read from `key`, or settles it when it cannot be delivered.
    async fn handle_entry(
        self: &Arc<Self>,
        key: &Arc<str>,
        id: String,
        frame: Option<Bytes>,
        deliveries: Option<u64>,
        redelivered: bool,
        permit: OwnedSemaphorePermit,
    ) {
        let shared = &self.shared;
        if !self.is_group() {
            self.cursors
                .lock()
                .expect("cursors lock")
                .insert(key.clone(), id.clone());
        }
        let Some(frame) = frame else {
            shared.counters.lose(&shared.counters.dropped, 1);
            tracing::warn!(
                stream = key.as_ref(),
                entry = id,
                "a pending entry was trimmed from its stream before it was handled (raise \
                 `stream_max_len`, or consume faster)"
            );
            self.ack_entry(key, &id).await;
            return;
        };
        let envelope = match Envelope::from_frame(&frame) {
            Ok(envelope) => envelope,
            Err(error) => {
                let source = format!("{key} {id}");
                if shared.dead_letter_malformed(frame, &source, &error).await {
                    self.ack_entry(key, &id).await;
                }
                return;
            }
        };
        if !self.wants(&envelope).await {
            if self.is_group() {
                shared.counters.bump(&shared.counters.filtered);
                self.ack_entry(key, &id).await;
            }
            return;
        }
        let deliveries = deliveries.unwrap_or(1);
        if deliveries > u64::from(shared.settings.max_deliveries) {
            self.dead_letter(key, &id, envelope, deliveries).await;
            return;
        }
        let attempt = envelope
            .attempt()
            .max(u32::try_from(deliveries).unwrap_or(u32::MAX));
        let envelope = envelope.with_attempt(attempt);
        let entry_id: Arc<str> = Arc::from(id);
        self.held
            .lock()
            .expect("held lock")
            .insert((key.clone(), entry_id.clone()));
        let ack = StreamAck {
            subscription: self.clone(),
            key: key.clone(),
            id: entry_id.clone(),
            _permit: Some(permit),
        };
        if redelivered {
            shared.counters.bump(&shared.counters.redelivered);
        }
        let delivery = Delivery::new(envelope, Box::new(ack)).redelivered(redelivered);
        self.send(delivery, key, &entry_id).await;
    }

    /// Hands a delivery to the subscription. If it has closed meanwhile, a group gets the entry back
    /// (dropping the delivery abandons it, which releases the entry); a fan-out subscription, which
    /// asked for nothing more, just forgets it.
    async fn send(self: &Arc<Self>, delivery: Delivery, key: &Arc<str>, id: &Arc<str>) {
        match self.sender.send(delivery).await {
            Ok(()) => self.shared.counters.bump(&self.shared.counters.delivered),
            Err(async_channel::SendError(delivery)) if self.is_group() => {
                // Given back now (not through `abandon`, which would do it in the background), so
                // that closing waits for it.
                let envelope = delivery.envelope().clone();
                delivery.discard();
                self.release(key, id, &envelope).await;
            }
            Err(async_channel::SendError(delivery)) => {
                delivery.discard();
                self.unhold(key, id);
            }
        }
    }

    async fn dead_letter(&self, key: &Arc<str>, id: &str, envelope: Envelope, deliveries: u64) {
        let shared = &self.shared;
        let max = shared.settings.max_deliveries;
        let error = format!(
            "delivered {deliveries} times without being acknowledged (max_deliveries is {max}): \
             its consumers may be crashing or timing out on it"
        );
        let dead = envelope
            .clone()
            .with_id(MessageId::new())
            .with_channel(envelope.channel().dead_letter())
            .with_header(headers::DEAD_LETTER_REASON, headers::REASON_HANDLER_FAILED)
            .with_header(headers::ERROR, error.as_str())
            .with_header(headers::ATTEMPTS, deliveries.to_string())
            .with_header(
                headers::AGENT,
                self.group.as_deref().unwrap_or(&self.consumer),
            )
            .with_header(headers::ORIGINAL_ID, envelope.id().to_string())
            .with_header(headers::ORIGINAL_CHANNEL, envelope.channel().name());
        match shared.publish_envelope(dead).await {
            Ok(_) => {
                shared.counters.bump(&shared.counters.dead_lettered);
                tracing::error!(
                    message_id = %envelope.id(),
                    channel = envelope.channel().name(),
                    deliveries,
                    dead_letter_channel = envelope.channel().dead_letter().name(),
                    "dead-lettered after too many deliveries"
                );
                self.ack_entry(key, id).await;
            }
            Err(error) => tracing::error!(
                error = %error,
                message_id = %envelope.id(),
                "could not publish a dead letter; the entry stays pending and is tried again"
            ),
        }
    }

    /// Acknowledges an entry that is not delivered (filtered, malformed, dead-lettered).
    async fn ack_entry(&self, key: &Arc<str>, id: &str) {
        let Some(group) = &self.group else {
            return;
        };
        let client = self.shared.client_for(key);
        if let Err(error) = client
            .xack::<Value, _, _, _>(key.as_ref(), group.as_str(), id)
            .await
        {
            tracing::warn!(error = %error, stream = key.as_ref(), entry = id, "could not acknowledge an entry; it will come back");
        }
    }

    /// Forgets a held entry.
    fn unhold(&self, key: &Arc<str>, id: &Arc<str>) {
        let mut held = self.held.lock().expect("held lock");
        held.remove(&(key.clone(), id.clone()));
        if held.is_empty() || self.is_closed() {
            self.settled.notify_waiters();
        }
    }

    /// Gives a held entry back to the group: marked idle, so another member claims it at once.
    async fn release(&self, key: &Arc<str>, id: &Arc<str>, envelope: &Envelope) {
        if let Some(group) = &self.group {
            let idle = self.shared.settings.claim_idle.as_millis() as u64;
            let result: Result<Value, _> = self
                .shared
                .client_for(key)
                .xclaim(
                    key.as_ref(),
                    group.as_str(),
                    self.consumer.as_str(),
                    0,
                    id.as_ref(),
                    Some(idle),
                    None,
                    None,
                    false,
                    true,
                )
                .await;
            if let Err(error) = result {
                tracing::debug!(error = %error, "could not mark a given-back entry idle; it is claimed after claim_idle");
            }
        } else {
            self.shared.counters.lose(&self.shared.counters.dropped, 1);
            tracing::warn!(
                message_id = %envelope.id(),
                channel = envelope.channel().name(),
                "a message given back after its fan-out subscription closed was dropped (a fan-out \
                 subscription keeps nothing once closed; use a group for durable consumption)"
            );
        }
        self.unhold(key, id);
    }

    /// Delivers a held entry again after `delay` (nack or abandon).
    fn redeliver(
        self: &Arc<Self>,
        ack: StreamAck,
        envelope: Envelope,
        delay: Duration,
        retry_count: Option<u32>,
    ) {
        let subscription = self.clone();
        let run = async move {
            if !delay.is_zero() {
                let mut stop = subscription.stop.subscribe();
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stopped(&mut stop) => {}
                }
            }
            if subscription.is_closed() {
                subscription.release(&ack.key, &ack.id, &envelope).await;
                drop(ack);
                return;
            }
            if let (Some(group), Some(count)) = (&subscription.group, retry_count) {
                // The attempt number survives a crash: it becomes the entry's delivery counter.
                let result: Result<Value, _> = subscription
                    .shared
                    .client_for(&ack.key)
                    .xclaim(
                        ack.key.as_ref(),
                        group.as_str(),
                        subscription.consumer.as_str(),
                        0,
                        ack.id.as_ref(),
                        None,
                        None,
                        Some(u64::from(count)),
                        false,
                        true,
                    )
                    .await;
                if let Err(error) = result {
                    tracing::debug!(error = %error, "could not record the attempt on the entry");
                }
            }
            subscription
                .shared
                .counters
                .bump(&subscription.shared.counters.redelivered);
            let (key, id) = (ack.key.clone(), ack.id.clone());
            let delivery = Delivery::new(envelope, Box::new(ack)).redelivered(true);
            subscription.send(delivery, &key, &id).await;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(run);
            }
            Err(_) => tracing::warn!(
                "a delivery was given back outside a Tokio runtime; its entry is delivered again after claim_idle"
            ),
        }
    }

    /// Reads this consumer's own pending entries that it does not hold: entries whose delivery was lost
    /// with a connection.
    async fn recover_pending(self: &Arc<Self>, reader: &Reader, keys: &[Arc<str>]) -> Result<()> {
        let Some(group) = &self.group else {
            return Ok(());
        };
        for key in keys {
            let mut from = "0-0".to_string();
            loop {
                if self.is_closed() {
                    return Ok(());
                }
                let reply: Value = reader
                    .client
                    .xreadgroup(
                        group.as_str(),
                        self.consumer.as_str(),
                        Some(self.shared.settings.read_batch as u64),
                        None,
                        false,
                        key.as_ref(),
                        from.as_str(),
                    )
                    .await
                    .map_err(|e| map_error(&e, self.url(), "reading pending entries"))?;
                let entries: Vec<Entry> = parse_read_reply(reply)
                    .into_iter()
                    .flat_map(|(_, entries)| entries)
                    .collect();
                if entries.is_empty() {
                    break;
                }
                from = entries.last().expect("not empty").0.clone();
                let candidates: Vec<Entry> = {
                    let held = self.held.lock().expect("held lock");
                    entries
                        .into_iter()
                        .filter(|(id, _)| !held.contains(&(key.clone(), Arc::from(id.as_str()))))
                        .collect()
                };
                if candidates.is_empty() {
                    continue;
                }
                // The list above may be stale: an entry acknowledged since was unheld after its XACK
                // succeeded. Claiming them again (without counting a delivery) returns only those still
                // pending, so nothing acknowledged is delivered again.
                let ids: Vec<&str> = candidates.iter().map(|(id, _)| id.as_str()).collect();
                let still: Value = reader
                    .client
                    .xclaim(
                        key.as_ref(),
                        group.as_str(),
                        self.consumer.as_str(),
                        0,
                        ids,
                        None,
                        None,
                        None,
                        false,
                        true,
                    )
                    .await
                    .map_err(|e| map_error(&e, self.url(), "confirming pending entries"))?;
                let still: HashSet<String> = still
                    .into_array()
                    .into_iter()
                    .filter_map(|id| id.as_string())
                    .collect();
                for (id, frame) in candidates {
                    if !still.contains(&id) {
                        continue;
                    }
                    let Some(permit) = self.acquire().await else {
                        return Ok(());
                    };
                    self.handle_entry(key, id, frame, None, true, permit).await;
                }
            }
        }
        Ok(())
    }

    /// `count` prefetch slots (waiting in line for them), or `None` once the subscription stops.
    async fn acquire_many(&self, count: usize) -> Option<Vec<OwnedSemaphorePermit>> {
        let mut stop = self.stop.subscribe();
        let count = u32::try_from(count.max(1)).unwrap_or(u32::MAX);
        let mut bulk = tokio::select! {
            permit = self.permits.clone().acquire_many_owned(count) => permit.ok()?,
            () = stopped(&mut stop) => return None,
        };
        let mut permits = Vec::with_capacity(count as usize);
        while bulk.num_permits() > 1 {
            permits.push(bulk.split(1).expect("more than one permit left"));
        }
        permits.push(bulk);
        Some(permits)
    }

    /// One prefetch slot, or `None` once the subscription stops.
    async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        let mut stop = self.stop.subscribe();
        tokio::select! {
            permit = self.permits.clone().acquire_owned() => permit.ok(),
            () = stopped(&mut stop) => None,
        }
    }
}

/// Completes once the subscription stops.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

async fn create_group(
    client: &Client,
    key: &str,
    group: &str,
    start: &str,
    url: &str,
) -> Result<()> {
    match client
        .xgroup_create::<Value, _, _, _>(key, group, start, true)
        .await
    {
        Ok(_) => Ok(()),
        Err(error) if error.details().starts_with("BUSYGROUP") => Ok(()),
        Err(error) => Err(map_error(&error, url, "creating a consumer group")),
    }
}

/// Splits an `XREAD`/`XREADGROUP`/`XCLAIM` reply into (stream, entries).
pub(crate) fn parse_read_reply(reply: Value) -> Vec<(String, Vec<Entry>)> {
    let mut streams = Vec::new();
    match reply {
        Value::Array(items) => {
            for item in items {
                let mut parts = item.into_array().into_iter();
                let (Some(key), Some(entries)) = (parts.next(), parts.next()) else {
                    continue;
                };
                let Some(key) = key.as_string() else { continue };
                streams.push((key, parse_entries(entries)));
            }
        }
        Value::Map(map) => {
            for (key, entries) in map.inner() {
                let Some(key) = key.as_str() else { continue };
                streams.push((key.to_string(), parse_entries(entries)));
            }
        }
        _ => {}
    }
    streams
}

/// Parses `[[id, [field, value, ...]], ...]`.
pub(crate) fn parse_entries(entries: Value) -> Vec<Entry> {
    entries
        .into_array()
        .into_iter()
        .filter_map(|entry| {
            let mut parts = entry.into_array().into_iter();
            let id = parts.next()?.as_string()?;
            let frame = match parts.next() {
                Some(Value::Array(fields)) => {
                    let mut fields = fields.into_iter();
                    let mut frame = None;
                    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
                        if name.as_bytes() == Some(FRAME_FIELD.as_bytes()) {
                            frame = value.into_bytes();
                        }
                    }
                    // An entry without our field is foreign: an empty frame makes it a malformed one.
                    Some(frame.unwrap_or_default())
                }
                Some(Value::Map(map)) => {
                    let mut frame = None;
                    for (name, value) in map.inner() {
                        if name.as_bytes() == FRAME_FIELD.as_bytes() {
                            frame = value.into_bytes();
                        }
                    }
                    Some(frame.unwrap_or_default())
                }
                _ => None,
            };
            Some((id, frame))
        })
        .collect()
}

/// Reads new entries until the subscription stops.
async fn read_loop(subscription: Arc<StreamSubscription>, reader: Arc<Reader>) {
    let settings = &subscription.shared.settings;
    let block_ms = settings.read_block.as_millis().max(1) as u64;
    let options = Options {
        timeout: Some(settings.read_block + settings.command_timeout),
        ..Options::default()
    };
    let mut recover = true;
    let mut failures = 0u32;
    loop {
        if subscription.is_closed() {
            break;
        }
        let keys = reader.keys.lock().expect("reader keys lock").clone();
        if keys.is_empty() {
            // A wildcard subscription before any class stream exists: discovery adds keys and wakes us.
            let mut stop = subscription.stop.subscribe();
            tokio::select! {
                () = tokio::time::sleep(settings.discovery_interval) => {}
                () = stopped(&mut stop) => {}
            }
            continue;
        }
        if reader.rescan.swap(false, Ordering::AcqRel) {
            recover = true;
        }
        if recover && subscription.is_group() {
            match subscription.recover_pending(&reader, &keys).await {
                Ok(()) => recover = false,
                Err(error) => {
                    backoff(&subscription, &mut failures, &error).await;
                    continue;
                }
            }
        }
        let Some(mut permits) = subscription.acquire_many(subscription.refill).await else {
            break;
        };
        while permits.len() < settings.read_batch {
            match subscription.permits.clone().try_acquire_owned() {
                Ok(permit) => permits.push(permit),
                Err(_) => break,
            }
        }
        let count = permits.len() as u64;
        let client = reader.client.with_options(&options);
        let key_names: Vec<&str> = keys.iter().map(|k| k.as_ref()).collect();
        let result: std::result::Result<Value, fred::error::Error> = match &subscription.group {
            Some(group) => {
                let ids = vec![">"; keys.len()];
                client
                    .xreadgroup(
                        group.as_str(),
                        subscription.consumer.as_str(),
                        Some(count),
                        Some(block_ms),
                        false,
                        key_names,
                        ids,
                    )
                    .await
            }
            None => {
                let ids: Vec<String> = {
                    let cursors = subscription.cursors.lock().expect("cursors lock");
                    keys.iter()
                        .map(|k| cursors.get(k).cloned().unwrap_or_else(|| "0-0".into()))
                        .collect()
                };
                client
                    .xread(Some(count), Some(block_ms), key_names, ids)
                    .await
            }
        };
        match result {
            Ok(reply) => {
                failures = 0;
                for (key, entries) in parse_read_reply(reply) {
                    let Some(key) = keys.iter().find(|k| k.as_ref() == key).cloned() else {
                        continue;
                    };
                    for (id, frame) in entries {
                        let permit = match permits.pop() {
                            Some(permit) => permit,
                            None => match subscription.acquire().await {
                                Some(permit) => permit,
                                None => return,
                            },
                        };
                        subscription
                            .handle_entry(&key, id, frame, None, false, permit)
                            .await;
                    }
                }
            }
            Err(error) if is_nogroup(&error) && !subscription.is_closed() => {
                // The stream or its group was deleted (or Redis restarted empty): create them again.
                tracing::warn!(error = %error, "a consumer group is missing; creating it again");
                if let Some(group) = &subscription.group {
                    for key in &keys {
                        let _ = create_group(
                            subscription.shared.pool.next(),
                            key,
                            group,
                            "0",
                            subscription.url(),
                        )
                        .await;
                    }
                }
            }
            Err(error) => {
                if subscription.is_closed() {
                    break;
                }
                recover = true;
                let error = map_error(&error, subscription.url(), "reading a stream");
                backoff(&subscription, &mut failures, &error).await;
            }
        }
    }
}

async fn backoff(subscription: &StreamSubscription, failures: &mut u32, error: &Error) {
    *failures += 1;
    let delay = subscription.shared.settings.reconnect.delay(*failures);
    if *failures == 1 || failures.is_power_of_two() {
        tracing::warn!(error = %error, failures = *failures, retry_in_ms = delay.as_millis() as u64, "reading a stream failed; retrying");
    }
    let mut stop = subscription.stop.subscribe();
    tokio::select! {
        () = tokio::time::sleep(delay) => {}
        () = stopped(&mut stop) => {}
    }
}

/// Keeps the entries this consumer holds from being claimed by others: resets their idle time.
async fn renew_leases(subscription: Arc<StreamSubscription>) {
    let Some(group) = subscription.group.clone() else {
        return;
    };
    let every = subscription.shared.settings.claim_idle / 3;
    let mut stop = subscription.stop.subscribe();
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stopped(&mut stop) => {
                // Keep renewing while deliveries handed out are being finished.
                let settled = subscription.settled.notified();
                let handed_out = subscription
                    .held
                    .lock()
                    .expect("held lock")
                    .len()
                    .saturating_sub(subscription.sender.len());
                if handed_out == 0 {
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = settled => continue,
                }
            }
        }
        let mut by_key: HashMap<Arc<str>, Vec<Arc<str>>> = HashMap::new();
        for (key, id) in subscription.held.lock().expect("held lock").iter() {
            by_key.entry(key.clone()).or_default().push(id.clone());
        }
        if by_key.is_empty() && subscription.is_closed() {
            return;
        }
        for (key, ids) in by_key {
            let ids: Vec<&str> = ids.iter().map(|id| id.as_ref()).collect();
            let result: Result<Value, _> = subscription
                .shared
                .client_for(&key)
                .xclaim(
                    key.as_ref(),
                    group.as_str(),
                    subscription.consumer.as_str(),
                    0,
                    ids,
                    None,
                    None,
                    None,
                    false,
                    true,
                )
                .await;
            if let Err(error) = result {
                tracing::debug!(error = %error, "could not renew held entries");
            }
        }
    }
}

/// Claims entries other consumers (or this one, before a reconnect) left pending longer than
/// `claim_idle`, and dead-letters those delivered too often.
async fn reclaim(subscription: Arc<StreamSubscription>) {
    let Some(group) = subscription.group.clone() else {
        return;
    };
    let settings = &subscription.shared.settings;
    let idle_ms = settings.claim_idle.as_millis() as u64;
    // Entries given back by a closing member are marked idle at once: look often enough to pick them up
    // quickly. The query is cheap (one XPENDING per stream).
    let every = (settings.claim_idle / 2).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut stop = subscription.stop.subscribe();
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = stopped(&mut stop) => return,
            }
        }
        first = false;
        let keys: Vec<Arc<str>> = subscription
            .known
            .lock()
            .expect("known streams lock")
            .iter()
            .cloned()
            .collect();
        for key in keys {
            if let Err(error) = reclaim_key(&subscription, &group, &key, idle_ms).await {
                tracing::debug!(error = %error, stream = key.as_ref(), "reclaiming pending entries failed; trying again later");
            }
        }
    }
}

async fn reclaim_key(
    subscription: &Arc<StreamSubscription>,
    group: &str,
    key: &Arc<str>,
    idle_ms: u64,
) -> Result<()> {
    let client = subscription.shared.client_for(key);
    let url = subscription.url();
    let pending: Value = client
        .custom(
            CustomCommand::new_static("XPENDING", ClusterHash::FirstKey, false),
            vec![
                Value::from(key.as_ref()),
                Value::from(group),
                Value::from("IDLE"),
                Value::from(idle_ms as i64),
                Value::from("-"),
                Value::from("+"),
                Value::from(subscription.shared.settings.read_batch as i64),
            ],
        )
        .await
        .map_err(|e| map_error(&e, url, "listing pending entries"))?;
    let mut counts: HashMap<String, u64> = HashMap::new();
    for item in pending.into_array() {
        let mut parts = item.into_array().into_iter();
        let (Some(id), Some(consumer), _, Some(count)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (Some(id), Some(consumer)) = (id.as_string(), consumer.as_string()) else {
            continue;
        };
        if consumer == subscription.consumer
            && subscription
                .held
                .lock()
                .expect("held lock")
                .contains(&(key.clone(), Arc::from(id.as_str())))
        {
            continue;
        }
        counts.insert(id, count.as_u64().unwrap_or(1));
    }
    if counts.is_empty() {
        return Ok(());
    }
    // Wait for a prefetch slot in line with the reader (the semaphore is fair): taking only free slots
    // would starve reclaiming while new entries keep the prefetch full.
    let Some(first) = subscription.acquire().await else {
        return Ok(());
    };
    let mut permits = vec![first];
    while permits.len() < counts.len() {
        match subscription.permits.clone().try_acquire_owned() {
            Ok(permit) => permits.push(permit),
            Err(_) => break,
        }
    }
    let ids: Vec<String> = counts.keys().take(permits.len()).cloned().collect();
    let claimed: Value = client
        .xclaim(
            key.as_ref(),
            group,
            subscription.consumer.as_str(),
            idle_ms,
            ids,
            None,
            None,
            None,
            false,
            false,
        )
        .await
        .map_err(|e| map_error(&e, url, "claiming pending entries"))?;
    let mut entries = parse_entries(claimed);
    entries.sort_by(|a, b| compare_ids(&a.0, &b.0));
    for (id, frame) in entries {
        let Some(permit) = permits.pop() else { break };
        let deliveries = counts.get(&id).copied().unwrap_or(1) + 1;
        subscription
            .shared
            .counters
            .bump(&subscription.shared.counters.reclaimed);
        tracing::info!(
            stream = key.as_ref(),
            entry = id,
            deliveries,
            "claimed an entry another consumer left pending"
        );
        subscription
            .handle_entry(key, id, frame, Some(deliveries), true, permit)
            .await;
    }
    Ok(())
}

/// Orders stream ids (`<ms>-<seq>`) numerically.
fn compare_ids(a: &str, b: &str) -> std::cmp::Ordering {
    let parse = |id: &str| {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        (
            ms.parse::<u64>().unwrap_or(0),
            seq.parse::<u64>().unwrap_or(0),
        )
    };
    parse(a).cmp(&parse(b))
}

/// Finds streams of classes that appeared after a wildcard-class subscription started.
async fn discover(subscription: Arc<StreamSubscription>) {
    let every = subscription.shared.settings.discovery_interval;
    let mut stop = subscription.stop.subscribe();
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stopped(&mut stop) => return,
        }
        let classes = match subscription.shared.registered_classes().await {
            Ok(classes) => classes,
            Err(error) => {
                tracing::debug!(error = %error, "could not read the stream registry; trying again later");
                continue;
            }
        };
        for class in classes {
            let key: Arc<str> = Arc::from(subscription.shared.keys.stream(&class));
            if subscription
                .known
                .lock()
                .expect("known streams lock")
                .contains(&key)
            {
                continue;
            }
            if let Err(error) = subscription.prepare_key(&key, true).await {
                tracing::debug!(error = %error, "could not start reading a new stream; trying again later");
                continue;
            }
            tracing::debug!(stream = key.as_ref(), "found the stream of a new class");
            if subscription.shared.config.server.is_clustered() {
                if let Err(error) = subscription.add_reader(vec![key]).await {
                    tracing::warn!(error = %error, "could not start a reader for a new stream");
                }
            } else {
                let reader = subscription
                    .readers
                    .lock()
                    .expect("readers lock")
                    .first()
                    .cloned();
                if let Some(reader) = reader {
                    reader.keys.lock().expect("reader keys lock").push(key);
                    let _ = reader
                        .client
                        .unblock_self(Some(fred::types::ClientUnblockFlag::Timeout))
                        .await;
                }
            }
        }
    }
}

/// Settles one stream entry.
struct StreamAck {
    subscription: Arc<StreamSubscription>,
    key: Arc<str>,
    id: Arc<str>,
    /// Held until the delivery is settled: one prefetch slot.
    _permit: Option<OwnedSemaphorePermit>,
}

impl Acknowledge for StreamAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        Box::pin(async move {
            let this = *self;
            let subscription = &this.subscription;
            let shared = &subscription.shared;
            if let Some(group) = &subscription.group {
                let result = shared
                    .client_for(&this.key)
                    .xack::<Value, _, _, _>(this.key.as_ref(), group.as_str(), this.id.as_ref())
                    .await;
                if let Err(error) = result {
                    // Still held: the lease keeps it ours until the subscription ends.
                    subscription.unhold(&this.key, &this.id);
                    return Err(map_error(
                        &error,
                        &shared.settings.url,
                        "acknowledging (XACK)",
                    ));
                }
            }
            shared.counters.bump(&shared.counters.acked);
            subscription.unhold(&this.key, &this.id);
            Ok(())
        })
    }

    fn nack(
        self: Box<Self>,
        envelope: Envelope,
        action: NackAction,
    ) -> BoxFuture<'static, Result<()>> {
        let this = *self;
        let subscription = this.subscription.clone();
        subscription
            .shared
            .counters
            .bump(&subscription.shared.counters.nacked);
        let (delay, retry_count) = match action {
            NackAction::Retry { delay } => (delay, Some(envelope.attempt())),
            _ => (Duration::ZERO, None),
        };
        subscription.redeliver(this, envelope, delay, retry_count);
        Box::pin(async { Ok(()) })
    }

    fn abandon(self: Box<Self>, envelope: Envelope) {
        let this = *self;
        let subscription = this.subscription.clone();
        subscription.redeliver(this, envelope, Duration::ZERO, None);
    }
}

struct StreamControl {
    subscription: Arc<StreamSubscription>,
}

impl SubscriptionControl for StreamControl {
    fn close(&self) -> BoxFuture<'static, Result<()>> {
        let subscription = self.subscription.clone();
        subscription.stop_now();
        Box::pin(async move {
            // Finishing (waiting for settlements, leaving the group) goes on in the background.
            let finishing = subscription.clone();
            tokio::spawn(async move {
                let deadline = finishing.shared.settings.close_timeout;
                finishing.finish(deadline).await;
                finishing.shared.forget_stream(finishing.id);
            });
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_replies_are_split_into_streams_and_entries() {
        let reply = Value::Array(vec![Value::Array(vec![
            Value::from("p:stream:{A}"),
            Value::Array(vec![
                Value::Array(vec![
                    Value::from("1-0"),
                    Value::Array(vec![
                        Value::from("f"),
                        Value::Bytes(Bytes::from_static(b"\x80")),
                    ]),
                ]),
                Value::Array(vec![Value::from("2-0"), Value::Null]),
                Value::Array(vec![
                    Value::from("3-0"),
                    Value::Array(vec![Value::from("other"), Value::from("x")]),
                ]),
            ]),
        ])]);
        let streams = parse_read_reply(reply);
        assert_eq!(streams.len(), 1);
        let (key, entries) = &streams[0];
        assert_eq!(key, "p:stream:{A}");
        assert_eq!(
            entries,
            &vec![
                ("1-0".to_string(), Some(Bytes::from_static(b"\x80"))),
                ("2-0".to_string(), None),
                ("3-0".to_string(), Some(Bytes::new())),
            ]
        );
        assert!(parse_read_reply(Value::Null).is_empty());
    }

    #[test]
    fn ids_order_numerically() {
        assert_eq!(compare_ids("9-1", "10-0"), std::cmp::Ordering::Less);
        assert_eq!(compare_ids("10-2", "10-10"), std::cmp::Ordering::Less);
    }
}
