//! Publishing with confirms: one channel in confirm mode per connection, our own map of delivery tags
//! to waiters (amqprs has no per-publish future), multiple-acks, nacks and returns.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use amqprs::channel::{BasicPublishArguments, Channel, ConfirmSelectArguments};
use amqprs::{BasicProperties, CloseChannel};
use tokio::sync::oneshot;

use agentcomm_core::Envelope;

/// What the broker said about one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Confirmed {
    /// basic.ack; `returned` when a basic.return (no queue bound) came first.
    Ack { returned: bool },
    /// basic.nack: the broker could not take responsibility for the message.
    Nack,
}

/// A message ready to publish, kept by the publishing call so it can be sent again after a reconnect.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub exchange: String,
    pub routing_key: String,
    pub properties: BasicProperties,
    pub body: Vec<u8>,
    /// The envelope id, as a number, to match basic.return with its publish.
    pub id: u128,
    /// The envelope id as text, for errors and logs.
    pub id_text: String,
}

/// The AMQP `content_type` of an agentcomm frame.
pub(crate) fn frame_content_type(envelope: &Envelope) -> &'static str {
    if envelope.content_type() == agentcomm_core::codec::JSON_CONTENT_TYPE {
        "application/json"
    } else {
        "application/msgpack"
    }
}

impl Outgoing {
    /// The message for `envelope`: the frame as body; id, correlation id, timestamp, class and the
    /// frame's content type copied into the AMQP properties for tooling; persistent.
    pub(crate) fn new(
        envelope: &Envelope,
        exchange: &str,
        routing_key: String,
    ) -> agentcomm_core::Result<Self> {
        let body = envelope.to_frame()?;
        let id_text = envelope.id().to_string();
        let mut properties = BasicProperties::default();
        properties
            .with_delivery_mode(amqprs::DELIVERY_MODE_PERSISTENT)
            .with_content_type(frame_content_type(envelope))
            .with_message_id(&id_text)
            .with_timestamp(envelope.timestamp_ms() / 1000)
            .with_app_id("agentcomm");
        // AMQP short strings hold 255 bytes; longer values stay in the frame only.
        if envelope.class().len() <= 255 {
            properties.with_message_type(envelope.class());
        }
        if let Some(correlation_id) = envelope.correlation_id().filter(|id| id.len() <= 255) {
            properties.with_correlation_id(correlation_id);
        }
        Ok(Outgoing {
            exchange: exchange.to_string(),
            routing_key,
            properties,
            body,
            id: envelope.id().as_uuid().as_u128(),
            id_text,
        })
    }
}

struct Waiting {
    id: u128,
    returned: bool,
    waiter: oneshot::Sender<Confirmed>,
}

#[derive(Default)]
struct Pending {
    by_tag: BTreeMap<u64, Waiting>,
    /// Tags by envelope id: a basic.return carries the message, not its delivery tag.
    by_id: HashMap<u128, Vec<u64>>,
}

impl Pending {
    fn remove(&mut self, tag: u64) -> Option<Waiting> {
        let waiting = self.by_tag.remove(&tag)?;
        if let Some(tags) = self.by_id.get_mut(&waiting.id) {
            tags.retain(|t| *t != tag);
            if tags.is_empty() {
                self.by_id.remove(&waiting.id);
            }
        }
        Some(waiting)
    }
}

/// The confirm state of one publishing channel, shared with its amqprs callback.
#[derive(Default)]
pub(crate) struct Confirms {
    pending: Mutex<Pending>,
    dead: AtomicBool,
    reason: Mutex<Option<String>>,
}

impl Confirms {
    fn insert(&self, tag: u64, id: u128, waiter: oneshot::Sender<Confirmed>) {
        let mut pending = self.pending.lock().expect("confirms lock");
        pending.by_tag.insert(
            tag,
            Waiting {
                id,
                returned: false,
                waiter,
            },
        );
        pending.by_id.entry(id).or_default().push(tag);
    }

    /// Forgets a publish whose caller gave up (timed out): its confirm, if it comes, is ignored.
    pub(crate) fn forget(&self, tag: u64) {
        self.pending.lock().expect("confirms lock").remove(tag);
    }

    fn settle(&self, tag: u64, multiple: bool, ack: bool) {
        let done: Vec<Waiting> = {
            let mut pending = self.pending.lock().expect("confirms lock");
            if multiple {
                let later = pending.by_tag.split_off(&(tag + 1));
                let settled = std::mem::replace(&mut pending.by_tag, later);
                for (tag, waiting) in &settled {
                    if let Some(tags) = pending.by_id.get_mut(&waiting.id) {
                        tags.retain(|t| t != tag);
                        if tags.is_empty() {
                            pending.by_id.remove(&waiting.id);
                        }
                    }
                }
                settled.into_values().collect()
            } else {
                pending.remove(tag).into_iter().collect()
            }
        };
        for waiting in done {
            let confirmed = if ack {
                Confirmed::Ack {
                    returned: waiting.returned,
                }
            } else {
                Confirmed::Nack
            };
            // The caller may have given up (timeout): nobody to tell.
            let _ = waiting.waiter.send(confirmed);
        }
    }

    fn returned(&self, message_id: Option<&String>) -> bool {
        let Some(id) = message_id.and_then(|id| uuid::Uuid::try_parse(id).ok()) else {
            return false;
        };
        let mut pending = self.pending.lock().expect("confirms lock");
        let Pending { by_tag, by_id } = &mut *pending;
        let Some(tags) = by_id.get(&id.as_u128()) else {
            return false;
        };
        // Returns come in publish order, before their ack: the first not yet returned is this one.
        for tag in tags {
            if let Some(waiting) = by_tag.get_mut(tag).filter(|w| !w.returned) {
                waiting.returned = true;
                return true;
            }
        }
        false
    }

    /// The channel is gone: every waiter learns it by its sender being dropped, and sends again.
    pub(crate) fn fail_all(&self, reason: &str) {
        self.dead.store(true, Ordering::Release);
        self.reason
            .lock()
            .expect("confirms lock")
            .get_or_insert_with(|| reason.to_string());
        let pending = std::mem::take(&mut *self.pending.lock().expect("confirms lock"));
        drop(pending);
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    pub(crate) fn reason(&self) -> Option<String> {
        self.reason.lock().expect("confirms lock").clone()
    }

    pub(crate) fn unconfirmed(&self) -> usize {
        self.pending.lock().expect("confirms lock").by_tag.len()
    }
}

/// The amqprs callback of a publishing channel.
pub(crate) struct ConfirmCallback {
    pub confirms: Arc<Confirms>,
    pub returns: Arc<std::sync::atomic::AtomicU64>,
}

#[async_trait::async_trait]
impl amqprs::callbacks::ChannelCallback for ConfirmCallback {
    async fn close(
        &mut self,
        _channel: &Channel,
        close: CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        let reason = format!(
            "the broker closed the publishing channel: {} {}",
            close.reply_code(),
            close.reply_text()
        );
        tracing::warn!(reason = %reason, "publishing channel closed by RabbitMQ");
        self.confirms.fail_all(&reason);
        Ok(())
    }

    async fn cancel(
        &mut self,
        _channel: &Channel,
        _cancel: amqprs::Cancel,
    ) -> Result<(), amqprs::error::Error> {
        Ok(())
    }

    async fn flow(
        &mut self,
        _channel: &Channel,
        active: bool,
    ) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }

    async fn publish_ack(&mut self, _channel: &Channel, ack: amqprs::Ack) {
        self.confirms
            .settle(ack.delivery_tag(), ack.mutiple(), true);
    }

    async fn publish_nack(&mut self, _channel: &Channel, nack: amqprs::Nack) {
        tracing::warn!(
            delivery_tag = nack.delivery_tag(),
            multiple = nack.multiple(),
            "RabbitMQ nacked a publish"
        );
        self.confirms
            .settle(nack.delivery_tag(), nack.multiple(), false);
    }

    async fn publish_return(
        &mut self,
        _channel: &Channel,
        ret: amqprs::Return,
        properties: BasicProperties,
        _content: Vec<u8>,
    ) {
        self.returns
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if !self.confirms.returned(properties.message_id()) {
            tracing::debug!(
                routing_key = %ret.routing_key(),
                reply = %ret.reply_text(),
                "a returned message matched no waiting publish"
            );
        }
    }
}

/// A publishing channel in confirm mode, for one connection generation.
pub(crate) struct Publisher {
    channel: Channel,
    pub generation: u64,
    /// The next delivery tag; the lock keeps tag order and send order the same.
    next_tag: tokio::sync::Mutex<u64>,
    pub confirms: Arc<Confirms>,
}

/// Why a send did not reach the broker.
pub(crate) enum SendFailure {
    /// The channel or connection is gone: send again on the next one.
    Lost,
    /// The frame could not be queued in time (the connection is stalled or blocked).
    Stalled,
}

impl Publisher {
    /// Opens a channel on `connection`, puts it in confirm mode and registers the callback.
    pub(crate) async fn open(
        connection: &amqprs::connection::Connection,
        generation: u64,
        timeout: std::time::Duration,
        returns: Arc<std::sync::atomic::AtomicU64>,
    ) -> Result<Arc<Self>, String> {
        let setup = async {
            let channel = connection
                .open_channel(None)
                .await
                .map_err(|e| format!("could not open a publishing channel: {e}"))?;
            let confirms = Arc::new(Confirms::default());
            channel
                .register_callback(ConfirmCallback {
                    confirms: confirms.clone(),
                    returns,
                })
                .await
                .map_err(|e| format!("could not register the confirm callback: {e}"))?;
            channel
                .confirm_select(ConfirmSelectArguments::default())
                .await
                .map_err(|e| format!("could not enable publisher confirms: {e}"))?;
            Ok::<_, String>(Arc::new(Publisher {
                channel,
                generation,
                next_tag: tokio::sync::Mutex::new(1),
                confirms,
            }))
        };
        tokio::time::timeout(timeout, setup)
            .await
            .map_err(|_| format!("opening a publishing channel took more than {timeout:?}"))?
    }

    /// Whether the channel can still be used.
    pub(crate) fn is_alive(&self) -> bool {
        !self.confirms.is_dead() && self.channel.is_open() && self.channel.is_connection_open()
    }

    /// Sends `message` (mandatory, so an unroutable one is returned); the receiver resolves with the
    /// broker's confirm, or fails when the channel is lost first.
    pub(crate) async fn send(
        &self,
        message: &Outgoing,
        timeout: std::time::Duration,
    ) -> Result<(u64, oneshot::Receiver<Confirmed>), SendFailure> {
        let mut next_tag = match tokio::time::timeout(timeout, self.next_tag.lock()).await {
            Ok(guard) => guard,
            Err(_) => return Err(SendFailure::Stalled),
        };
        if !self.is_alive() {
            return Err(SendFailure::Lost);
        }
        let tag = *next_tag;
        let (sender, receiver) = oneshot::channel();
        // Registered before sending: the ack may come back before basic_publish returns.
        self.confirms.insert(tag, message.id, sender);
        let mut arguments = BasicPublishArguments::new(&message.exchange, &message.routing_key);
        arguments.mandatory(true);
        let sent = tokio::time::timeout(
            timeout,
            self.channel
                .basic_publish(message.properties.clone(), message.body.clone(), arguments),
        )
        .await;
        match sent {
            Ok(Ok(())) => {
                *next_tag += 1;
                Ok((tag, receiver))
            }
            Ok(Err(error)) => {
                self.confirms.forget(tag);
                self.confirms
                    .fail_all(&format!("the connection failed while publishing: {error}"));
                Err(SendFailure::Lost)
            }
            Err(_) => {
                // The send future was dropped before the frame was queued, so the tag is unused.
                self.confirms.forget(tag);
                Err(SendFailure::Stalled)
            }
        }
    }

    /// Closes the channel (bounded).
    pub(crate) async fn close(&self, timeout: std::time::Duration) {
        self.confirms.fail_all("the router closed");
        let channel = self.channel.clone();
        let _ = tokio::time::timeout(timeout, channel.close()).await;
    }
}

/// How many times one publish is sent again after losing its channel before it fails.
const MAX_RESENDS: u32 = 10;

impl crate::link::Inner {
    /// The publishing channel of the live connection, opened on demand; during an outage, waits for
    /// the reconnect until `outage_deadline` (set on the first wait of this publish).
    async fn publisher_for(
        &self,
        outage_deadline: &mut Option<tokio::time::Instant>,
    ) -> agentcomm_core::Result<Arc<Publisher>> {
        use std::sync::atomic::Ordering;
        loop {
            let generation = self.connected.load(Ordering::Acquire);
            if generation != 0 {
                let mut slot = self.publisher.lock().await;
                if let Some(publisher) = slot.as_ref()
                    && publisher.generation == generation
                    && publisher.is_alive()
                {
                    return Ok(publisher.clone());
                }
                let live = match &*self.state.borrow() {
                    crate::link::LinkState::Connected(live) if live.generation == generation => {
                        Some(live.clone())
                    }
                    _ => None,
                };
                if let Some(live) = live {
                    let channel_died = slot
                        .as_ref()
                        .is_some_and(|previous| previous.generation == generation);
                    if channel_died {
                        // The broker closed the channel on a live connection: a deleted exchange
                        // (404) is the usual cause, so declare the topology again first.
                        let reason = slot.as_ref().and_then(|p| p.confirms.reason());
                        tracing::warn!(reason = ?reason, "reopening the publishing channel");
                        if let Err(error) = self.redeclare_topology().await {
                            tracing::warn!(error = %error, "could not declare the topology again");
                        }
                    }
                    match Publisher::open(
                        &live.connection,
                        generation,
                        self.settings.operation_timeout,
                        self.counters.returned.clone(),
                    )
                    .await
                    {
                        Ok(publisher) => {
                            *slot = Some(publisher.clone());
                            return Ok(publisher);
                        }
                        Err(error) if live.connection.is_open() => {
                            return Err(self.backend_error(error));
                        }
                        Err(_) => {}
                    }
                }
                drop(slot);
                // The connection died and the supervisor has not seen it yet: do not spin.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            let deadline = *outage_deadline.get_or_insert_with(|| {
                tokio::time::Instant::now() + self.settings.publish_outage_timeout
            });
            self.wait_connected(Some(deadline)).await?;
        }
    }

    /// Publishes `message` and waits for the broker's confirm, sending it again on the next channel
    /// if the channel or connection is lost first.
    pub(crate) async fn publish_outgoing(
        &self,
        message: &Outgoing,
    ) -> agentcomm_core::Result<agentcomm_core::router::PublishOutcome> {
        use crate::link::bump;
        use agentcomm_core::router::PublishOutcome;
        let settings = &self.settings;
        let mut outage_deadline = None;
        let mut losses = 0u32;
        bump(&self.counters.published);
        loop {
            let publisher = match self.publisher_for(&mut outage_deadline).await {
                Ok(publisher) => publisher,
                Err(error) => {
                    bump(&self.counters.publish_failures);
                    return Err(error);
                }
            };
            let (tag, confirm) = match publisher.send(message, settings.confirm_timeout).await {
                Ok(sent) => sent,
                Err(SendFailure::Lost) => {
                    losses += 1;
                    if losses > MAX_RESENDS {
                        bump(&self.counters.publish_failures);
                        return Err(self.lost_too_often(message, &publisher));
                    }
                    continue;
                }
                Err(SendFailure::Stalled) => {
                    bump(&self.counters.publish_failures);
                    return Err(agentcomm_core::Error::Timeout {
                        operation: format!(
                            "room to send message {} on '{}' (the connection is stalled, or blocked by a RabbitMQ memory or disk alarm)",
                            message.id_text, message.routing_key
                        ),
                        after: settings.confirm_timeout,
                    });
                }
            };
            match tokio::time::timeout(settings.confirm_timeout, confirm).await {
                Ok(Ok(Confirmed::Ack { returned })) => {
                    bump(&self.counters.confirmed);
                    if returned {
                        bump(&self.counters.unroutable);
                        return Ok(PublishOutcome::Unroutable);
                    }
                    return Ok(PublishOutcome::Accepted);
                }
                Ok(Ok(Confirmed::Nack)) => {
                    bump(&self.counters.publish_nacks);
                    bump(&self.counters.publish_failures);
                    return Err(self.backend_error(format!(
                        "RabbitMQ refused message {} on '{}' (basic.nack: it could not take responsibility for it, e.g. a full queue with overflow=reject-publish or an internal error); publish it again later",
                        message.id_text, message.routing_key
                    )));
                }
                Ok(Err(_)) => {
                    // The channel was lost before the confirm: the broker may or may not have it, so
                    // send it again (at-least-once).
                    losses += 1;
                    bump(&self.counters.resent);
                    if losses > MAX_RESENDS {
                        bump(&self.counters.publish_failures);
                        return Err(self.lost_too_often(message, &publisher));
                    }
                    tracing::debug!(message_id = %message.id_text, "the publishing channel was lost before the confirm; sending again");
                }
                Err(_) => {
                    publisher.confirms.forget(tag);
                    bump(&self.counters.confirm_timeouts);
                    bump(&self.counters.publish_failures);
                    return Err(agentcomm_core::Error::Timeout {
                        operation: format!(
                            "RabbitMQ's confirm of message {} on '{}' (it may or may not have been stored)",
                            message.id_text, message.routing_key
                        ),
                        after: settings.confirm_timeout,
                    });
                }
            }
        }
    }

    fn lost_too_often(&self, message: &Outgoing, publisher: &Publisher) -> agentcomm_core::Error {
        self.backend_error(format!(
            "message {} on '{}' was not confirmed: its channel was lost {MAX_RESENDS} times ({})",
            message.id_text,
            message.routing_key,
            publisher
                .confirms
                .reason()
                .unwrap_or_else(|| "connection lost".to_string())
        ))
    }
}
