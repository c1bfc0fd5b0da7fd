//! Subscriptions: one consumer channel each, restored after every reconnect; deliveries with manual
//! acknowledgement, requeue, delayed retry through TTL queues, and stale-delivery protection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use amqprs::channel::{
    BasicAckArguments, BasicCancelArguments, BasicConsumeArguments, BasicNackArguments,
    BasicQosArguments, BasicRejectArguments, Channel, ConsumerMessage, QueueBindArguments,
    QueueDeclareArguments, QueueDeleteArguments,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use agentcomm_core::envelope::Envelope;
use agentcomm_core::error::{Error, Result};
use agentcomm_core::router::{
    Acknowledge, BoxFuture, Delivery, NackAction, PublishOutcome, SubscriptionControl,
};

use crate::builder::QueueType;
use crate::link::{Inner, Live, OpChannel, Reason, bump};
use crate::topology::{retry_bucket_ms, retry_queue};

/// How a subscription's queue is shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueKind {
    /// Its own queue, expiring when unused, deleted at close.
    FanOut,
    /// A durable queue shared by the group's members.
    Group,
}

/// The queue a subscription reads and how it is bound.
#[derive(Debug, Clone)]
pub(crate) struct QueueSpec {
    pub name: String,
    pub kind: QueueKind,
    pub bindings: Vec<String>,
    pub prefetch: u16,
}

/// What each delivery's acknowledgement handle needs (no reference to the subscription's buffer, so
/// buffered deliveries never keep their subscription alive).
pub(crate) struct AckState {
    pub inner: Arc<Inner>,
    pub queue: String,
    /// Bumped each time the consumer's channel is replaced or lost: older deliveries are stale.
    pub generation: AtomicU64,
    /// Deliveries made and not yet settled or dropped.
    pub outstanding: AtomicU64,
}

/// The live consumer of a subscription.
#[derive(Clone)]
pub(crate) struct LiveConsumer {
    /// Shared with every delivery's handle (one reference count instead of amqprs's several).
    pub channel: Arc<Channel>,
    pub tag: String,
    pub reason: Reason,
}

/// A subscription, shared by its task and its control.
pub(crate) struct SubShared {
    pub id: u64,
    pub spec: QueueSpec,
    pub state: Arc<AckState>,
    pub sender: async_channel::Sender<Delivery>,
    pub receiver: async_channel::Receiver<Delivery>,
    pub consumer: tokio::sync::Mutex<Option<LiveConsumer>>,
    pub closed: AtomicBool,
    pub stop: watch::Sender<bool>,
}

impl SubShared {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Deliveries handed to the application and not settled yet.
    pub(crate) fn in_hand(&self) -> u64 {
        self.state
            .outstanding
            .load(Ordering::Acquire)
            .saturating_sub(self.receiver.len() as u64)
    }

    /// Stops the subscription: basic.cancel, then the stream ends after what it buffered.
    pub(crate) async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let consumer = self.consumer.lock().await.clone();
        if let Some(consumer) = consumer {
            cancel(&self.state.inner, &consumer).await;
        }
        self.stop.send_replace(true);
        Ok(())
    }
}

async fn cancel(inner: &Inner, consumer: &LiveConsumer) {
    let arguments = BasicCancelArguments::new(&consumer.tag);
    if let Err(error) = inner
        .operation(
            &format!("cancelling consumer {}", consumer.tag),
            &consumer.reason,
            consumer.channel.basic_cancel(arguments),
        )
        .await
    {
        // The channel or connection is gone: the broker has dropped the consumer already.
        tracing::debug!(error = %error, "cancelling a consumer failed");
    }
}

/// The control handed to [`agentcomm_core::router::Subscription`].
pub(crate) struct Control(pub Arc<SubShared>);

impl SubscriptionControl for Control {
    fn close(&self) -> BoxFuture<'static, Result<()>> {
        let shared = self.0.clone();
        Box::pin(async move { shared.close().await })
    }
}

/// Runs a subscription: sets up its consumer, forwards deliveries, restores it after every loss,
/// and cleans up when it is closed. `ready` gets the result of the first setup.
pub(crate) async fn run(shared: Arc<SubShared>, ready: oneshot::Sender<Result<()>>) {
    let inner = shared.state.inner.clone();
    let mut ready = Some(ready);
    let mut failures = 0u32;
    let mut stop = shared.stop.subscribe();
    let first_deadline = Instant::now() + inner.settings.publish_outage_timeout;
    let mut last_consumer: Option<LiveConsumer> = None;
    loop {
        if shared.is_closed() {
            break;
        }
        let deadline = ready.is_some().then_some(first_deadline);
        let live = tokio::select! {
            live = inner.wait_connected(deadline) => live,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let live = match live {
            Ok(live) => live,
            Err(error) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(error));
                }
                break;
            }
        };
        match setup(&shared, &live, ready.is_none()).await {
            Ok((consumer, generation, receiver)) => {
                let consuming_since = Instant::now();
                *shared.consumer.lock().await = Some(consumer.clone());
                last_consumer = Some(consumer.clone());
                match ready.take() {
                    Some(ready) => {
                        let _ = ready.send(Ok(()));
                    }
                    None => {
                        bump(&inner.counters.consumers_restored);
                        tracing::info!(queue = %shared.spec.name, "consumer restored after a reconnect");
                    }
                }
                if shared.is_closed() {
                    // Closed while it was being set up: cancel what was just made.
                    cancel(&inner, &consumer).await;
                }
                forward(&shared, &consumer, generation, receiver).await;
                if shared.is_closed() {
                    break;
                }
                // The channel or connection died: what it delivered can no longer be settled there.
                shared.state.generation.fetch_add(1, Ordering::AcqRel);
                let mut discarded = 0u64;
                while let Ok(delivery) = shared.receiver.try_recv() {
                    delivery.discard();
                    discarded += 1;
                }
                inner
                    .counters
                    .stale_discarded
                    .fetch_add(discarded, Ordering::Relaxed);
                let reason = consumer
                    .reason
                    .lock()
                    .expect("reason lock")
                    .clone()
                    .unwrap_or_else(|| "the connection was lost".to_string());
                tracing::warn!(
                    queue = %shared.spec.name,
                    reason = %reason,
                    discarded,
                    "consumer lost; restoring it (unacknowledged messages are redelivered by RabbitMQ)"
                );
                // A consumer that lived a while starts its backoff over; one that keeps dying at once
                // backs off further each time.
                failures = if consuming_since.elapsed() > Duration::from_secs(10) {
                    1
                } else {
                    failures.saturating_add(1)
                };
                if consumer.channel.is_connection_open() {
                    // Only the channel died (or the consumer was cancelled): wait before restoring.
                    let _ = tokio::time::timeout(
                        inner.settings.reconnect.delay(failures),
                        stop.wait_for(|stop| *stop),
                    )
                    .await;
                    let channel = Channel::clone(&consumer.channel);
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(5), channel.close()).await;
                    });
                }
            }
            Err(error) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(error));
                    break;
                }
                failures = failures.saturating_add(1);
                let delay = inner.settings.reconnect.delay(failures);
                tracing::warn!(
                    queue = %shared.spec.name,
                    error = %error,
                    retry_in_ms = delay.as_millis() as u64,
                    "restoring a consumer failed"
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = stop.wait_for(|stop| *stop) => break,
                }
            }
        }
    }
    cleanup(&shared, last_consumer).await;
}

/// After the subscription stopped: let the application settle what it holds (up to the close
/// timeout), close the channel, delete a fan-out queue, then end the stream.
///
/// A subscription closed on its own (an agent stopping) also waits for what is buffered: its reader
/// drains the stream and settles each delivery while the channel is still open. When the whole router
/// closes, only deliveries already in a handler's hands are waited for; buffered ones stay readable,
/// but can no longer be settled, and RabbitMQ delivers them again.
async fn cleanup(shared: &SubShared, consumer: Option<LiveConsumer>) {
    let inner = &shared.state.inner;
    let deadline = Instant::now() + inner.settings.close_timeout;
    let unsettled = || {
        if inner.is_closing() {
            shared.in_hand()
        } else {
            shared.state.outstanding.load(Ordering::Acquire)
        }
    };
    while unsettled() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let unsettled = unsettled();
    if unsettled > 0 {
        tracing::warn!(
            queue = %shared.spec.name,
            unsettled,
            "closing a subscription with deliveries still unsettled; RabbitMQ delivers them again"
        );
    }
    if let Some(consumer) = consumer {
        let channel = Channel::clone(&consumer.channel);
        let _ = tokio::time::timeout(inner.settings.operation_timeout, channel.close()).await;
    }
    if shared.spec.kind == QueueKind::FanOut {
        let name = shared.spec.name.clone();
        let deleted = inner
            .with_op_channel(Some(Instant::now()), async |op: &OpChannel| {
                inner
                    .operation(
                        &format!("deleting fan-out queue '{name}'"),
                        &op.reason,
                        op.channel.queue_delete(QueueDeleteArguments::new(&name)),
                    )
                    .await
                    .map(|_| ())
            })
            .await;
        if let Err(error) = deleted {
            tracing::debug!(queue = %shared.spec.name, error = %error, "could not delete a fan-out queue; it expires by itself");
        }
    }
    shared.sender.close();
    tracing::debug!(queue = %shared.spec.name, "subscription closed");
}

/// Opens a channel, sets the prefetch, declares and binds the queue and starts consuming.
async fn setup(
    shared: &SubShared,
    live: &Live,
    restoring: bool,
) -> Result<(LiveConsumer, u64, mpsc::UnboundedReceiver<ConsumerMessage>)> {
    let inner = &shared.state.inner;
    let spec = &shared.spec;
    if restoring && spec.kind == QueueKind::FanOut {
        check_fan_out_queue_survived(inner, &spec.name).await;
    }
    let op = inner.open_op_channel(live).await?;
    let result = async {
        let channel = &op.channel;
        inner
            .operation(
                "setting the prefetch",
                &op.reason,
                channel.basic_qos(BasicQosArguments::new(0, spec.prefetch, false)),
            )
            .await?;
        let (queue_type, expires) = match spec.kind {
            QueueKind::Group => (inner.settings.queue_type, None),
            QueueKind::FanOut => (QueueType::Classic, Some(inner.settings.fan_out_expiry)),
        };
        let mut declare = QueueDeclareArguments::new(&spec.name);
        declare
            // Fan-out queues too: RabbitMQ 4 deprecates transient non-exclusive queues, and their
            // `x-expires` (plus the delete at close) already bounds their life.
            .durable(true)
            .arguments(inner.queue_arguments(queue_type, expires));
        inner
            .operation(
                &format!("declaring queue '{}'", spec.name),
                &op.reason,
                channel.queue_declare(declare),
            )
            .await?;
        if spec.kind == QueueKind::Group {
            inner.remember_queue(&spec.name);
        }
        for key in &spec.bindings {
            inner
                .operation(
                    &format!("binding queue '{}' to '{key}'", spec.name),
                    &op.reason,
                    channel.queue_bind(QueueBindArguments::new(
                        &spec.name,
                        &inner.settings.exchange,
                        key,
                    )),
                )
                .await?;
        }
        let generation = shared.state.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let tag = format!(
            "agentcomm-{}-{}-{generation}",
            std::process::id(),
            shared.id
        );
        let mut consume = BasicConsumeArguments::new(&spec.name, &tag);
        consume.manual_ack(true);
        let (tag, receiver) = inner
            .operation(
                &format!("consuming from queue '{}'", spec.name),
                &op.reason,
                channel.basic_consume_rx(consume),
            )
            .await?;
        Ok((tag, generation, receiver))
    }
    .await;
    match result {
        Ok((tag, generation, receiver)) => Ok((
            LiveConsumer {
                channel: Arc::new(op.channel),
                tag,
                reason: op.reason,
            },
            generation,
            receiver,
        )),
        Err(error) => {
            let channel = op.channel;
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), channel.close()).await;
            });
            Err(error)
        }
    }
}

/// A fan-out queue expires when its consumer is gone longer than `fan_out_expiry`: say so when a
/// reconnect finds it gone, since what was published meanwhile is lost.
async fn check_fan_out_queue_survived(inner: &Inner, name: &str) {
    let found = inner
        .with_op_channel(Some(Instant::now()), async |op: &OpChannel| {
            let mut passive = QueueDeclareArguments::new(name);
            passive.passive(true);
            inner
                .operation(
                    "checking a fan-out queue",
                    &op.reason,
                    op.channel.queue_declare(passive),
                )
                .await
                .map(|_| ())
        })
        .await;
    if let Err(Error::Backend { message, .. }) = found
        && message.contains("NOT_FOUND")
    {
        bump(&inner.counters.fan_out_queues_lost);
        tracing::warn!(
            queue = name,
            expiry = ?inner.settings.fan_out_expiry,
            "the fan-out queue expired during the outage: messages published meanwhile were lost; raise fan_out_expiry to ride out longer outages"
        );
    }
}

/// Hands deliveries to the subscription until the consumer ends (cancelled, channel or connection lost).
async fn forward(
    shared: &SubShared,
    consumer: &LiveConsumer,
    generation: u64,
    mut receiver: mpsc::UnboundedReceiver<ConsumerMessage>,
) {
    let inner = &shared.state.inner;
    let mut stop = shared.stop.subscribe();
    while let Some(message) = receiver.recv().await {
        let (Some(deliver), Some(content)) = (message.deliver, message.content) else {
            continue;
        };
        let tag = deliver.delivery_tag();
        let envelope = match Envelope::from_frame(&content) {
            Ok(envelope) => envelope,
            Err(error) => {
                dead_letter_malformed(
                    inner,
                    consumer,
                    tag,
                    content,
                    &shared.spec.name,
                    deliver.routing_key(),
                    &error,
                )
                .await;
                continue;
            }
        };
        bump(&inner.counters.delivered);
        shared.state.outstanding.fetch_add(1, Ordering::AcqRel);
        let handle = AmqpAck {
            state: shared.state.clone(),
            channel: consumer.channel.clone(),
            generation,
            tag,
        };
        let delivery = Delivery::new(envelope, Box::new(handle)).redelivered(deliver.redelivered());
        // The buffer holds the prefetch, so it is rarely full: try without waiting first.
        let delivery = match shared.sender.try_send(delivery) {
            Ok(()) => continue,
            Err(async_channel::TrySendError::Full(delivery)) => delivery,
            // The subscription is gone: dropping the delivery gives it back.
            Err(async_channel::TrySendError::Closed(_)) => continue,
        };
        if *stop.borrow() {
            // Closing with a full buffer: give it back to the broker.
            continue;
        }
        tokio::select! {
            // A failed send returns the delivery, and dropping it gives it back (abandon).
            _ = shared.sender.send(delivery) => {}
            // Stopped while the buffer was full: the delivery in the dropped send is given back.
            _ = stop.wait_for(|stop| *stop) => {}
        }
    }
}

/// A frame that is not an agentcomm envelope: published as `Envelope::malformed` to the dead-letter
/// channel, then acknowledged; if that fails, rejected without requeue (the queue's dead-letter
/// exchange keeps it). Counted and logged either way.
async fn dead_letter_malformed(
    inner: &Arc<Inner>,
    consumer: &LiveConsumer,
    tag: u64,
    content: Vec<u8>,
    queue: &str,
    routing_key: &str,
    error: &Error,
) {
    bump(&inner.counters.malformed);
    tracing::error!(
        queue,
        routing_key,
        bytes = content.len(),
        error = %error,
        "a message that is not an agentcomm frame arrived; dead-lettering it"
    );
    let source = format!("rabbitmq queue '{queue}' (routing key '{routing_key}')");
    let dead = Envelope::malformed(content, &source, &error.to_string());
    let published = match crate::topology::routing_key(dead.channel()) {
        Ok(key) => {
            inner
                .publish_envelope(&dead, &inner.settings.exchange, &key)
                .await
        }
        Err(error) => Err(error),
    };
    let settle = match published {
        Ok(PublishOutcome::Unroutable) | Err(_) => {
            tracing::warn!(
                queue,
                "the malformed frame could not be published as a dead letter; rejecting it to the queue's dead-letter exchange"
            );
            consumer
                .channel
                .basic_reject(BasicRejectArguments::new(tag, false))
                .await
        }
        Ok(_) => {
            consumer
                .channel
                .basic_ack(BasicAckArguments::new(tag, false))
                .await
        }
    };
    if let Err(error) = settle {
        tracing::warn!(error = %error, "could not settle a malformed frame; RabbitMQ delivers it again");
    }
}

/// Settles one delivery on the channel it came from.
struct AmqpAck {
    state: Arc<AckState>,
    channel: Arc<Channel>,
    generation: u64,
    tag: u64,
}

impl Drop for AmqpAck {
    fn drop(&mut self) {
        self.state.outstanding.fetch_sub(1, Ordering::AcqRel);
    }
}

impl AmqpAck {
    /// Whether the delivery can still be settled: same consumer channel, still open. A delivery tag
    /// on another channel would name another message, so a stale one is never settled.
    fn is_current(&self) -> bool {
        self.state.generation.load(Ordering::Acquire) == self.generation
            && self.channel.is_open()
            && self.channel.is_connection_open()
    }

    fn stale(&self, what: &str) -> Error {
        bump(&self.state.inner.counters.stale);
        self.state.inner.backend_error(format!(
            "cannot {what} the message: the channel it was delivered on is gone (connection lost, consumer restored or router closed); RabbitMQ delivers it again"
        ))
    }

    // basic.ack and basic.nack only queue a frame for the connection's writer: they wait only while
    // the writer is stalled, and a stalled connection is ended by its heartbeat (the queue then
    // fails every waiting send). So they need no timer of their own.
    async fn basic_ack(&self) -> Result<()> {
        let inner = &self.state.inner;
        self.channel
            .basic_ack(BasicAckArguments::new(self.tag, false))
            .await
            .map_err(|error| {
                inner.backend_error(format!(
                    "acknowledging the message failed ({error}); RabbitMQ delivers it again"
                ))
            })?;
        bump(&inner.counters.acked);
        Ok(())
    }

    async fn basic_requeue(&self) -> Result<()> {
        let inner = &self.state.inner;
        self.channel
            .basic_nack(BasicNackArguments::new(self.tag, false, true))
            .await
            .map_err(|error| {
                inner.backend_error(format!(
                    "giving the message back failed ({error}); RabbitMQ delivers it again when the channel closes"
                ))
            })?;
        bump(&inner.counters.requeued);
        Ok(())
    }

    async fn retry(&self, envelope: Envelope, delay: Duration) -> Result<()> {
        let inner = &self.state.inner;
        let scheduled = match inner
            .schedule_retry(&self.state.queue, &envelope, delay)
            .await
        {
            Ok(()) => Ok(()),
            Err(error) => {
                tracing::warn!(
                    queue = %self.state.queue,
                    error = %error,
                    "could not schedule a delayed retry; sending the message back to its queue at once"
                );
                inner
                    .requeue_now(&self.state.queue, &envelope)
                    .await
                    .map_err(|_| error)
            }
        };
        match scheduled {
            Ok(()) => {
                bump(&inner.counters.retried);
                self.basic_ack().await.map_err(|error| {
                    inner.backend_error(format!(
                        "the retry was scheduled, but the original could not be acknowledged ({error}): it will be delivered twice"
                    ))
                })
            }
            Err(error) => {
                self.basic_requeue().await?;
                Err(inner.backend_error(format!(
                    "could not schedule the retry ({error}); the message was requeued unchanged instead"
                )))
            }
        }
    }
}

impl Acknowledge for AmqpAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        Box::pin(async move {
            if !self.is_current() {
                return Err(self.stale("acknowledge"));
            }
            self.basic_ack().await
        })
    }

    fn nack(
        self: Box<Self>,
        envelope: Envelope,
        action: NackAction,
    ) -> BoxFuture<'static, Result<()>> {
        Box::pin(async move {
            if !self.is_current() {
                return Err(self.stale("give back"));
            }
            match action {
                NackAction::Retry { delay } => self.retry(envelope, delay).await,
                _ => self.basic_requeue().await,
            }
        })
    }

    fn abandon(self: Box<Self>, _envelope: Envelope) {
        if !self.is_current() {
            // Its channel is gone, so the broker has put it back already.
            return;
        }
        bump(&self.state.inner.counters.abandoned);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(error) = self.basic_requeue().await {
                        tracing::warn!(error = %error, "could not give back an abandoned delivery; RabbitMQ redelivers it when the channel closes");
                    }
                });
            }
            Err(_) => tracing::warn!(
                "a delivery was dropped outside a Tokio runtime; RabbitMQ redelivers it when the channel closes"
            ),
        }
    }
}

impl Inner {
    /// Sends `envelope` to `queue` after `delay`: through a retry queue whose TTL is the delay's bucket
    /// and which dead-letters back to `queue` only (the default exchange, the queue's own name), so no
    /// other subscription gets a copy.
    pub(crate) async fn schedule_retry(
        &self,
        queue: &str,
        envelope: &Envelope,
        delay: Duration,
    ) -> Result<()> {
        let ttl = retry_bucket_ms(delay);
        if ttl == 0 {
            return self.requeue_now(queue, envelope).await;
        }
        let name = retry_queue(queue, ttl);
        for _ in 0..2 {
            self.ensure_retry_queue(&name, queue, ttl).await?;
            match self.publish_envelope(envelope, "", &name).await? {
                PublishOutcome::Unroutable => {
                    // The retry queue expired or was deleted since we declared it: declare it again.
                    self.retry_queues.lock().expect("retry lock").remove(&name);
                }
                _ => return Ok(()),
            }
        }
        Err(self.backend_error(format!(
            "the retry queue '{name}' does not take messages (it was deleted as soon as it was declared?)"
        )))
    }

    /// Sends `envelope` straight back to `queue` (the default exchange routes by queue name).
    pub(crate) async fn requeue_now(&self, queue: &str, envelope: &Envelope) -> Result<()> {
        match self.publish_envelope(envelope, "", queue).await? {
            PublishOutcome::Unroutable => Err(self.backend_error(format!(
                "the queue '{queue}' no longer exists, so the retry has nowhere to go"
            ))),
            _ => Ok(()),
        }
    }

    /// Declares the retry queue `name` (durable, classic) for `queue` with a TTL of `ttl_ms`, unless
    /// it was declared on this connection in the last 5 minutes. It expires when unused for twice its
    /// TTL plus 10 minutes: by then it is empty, and declaring it again every 5 minutes while in use
    /// keeps it alive (publishing alone does not count as use for `x-expires`).
    async fn ensure_retry_queue(&self, name: &str, queue: &str, ttl_ms: u64) -> Result<()> {
        const REDECLARE_AFTER: Duration = Duration::from_secs(300);
        if self
            .retry_queues
            .lock()
            .expect("retry lock")
            .get(name)
            .is_some_and(|declared| declared.elapsed() < REDECLARE_AFTER)
        {
            return Ok(());
        }
        let mut arguments = amqprs::FieldTable::new();
        let ttl = i64::try_from(ttl_ms).unwrap_or(i64::MAX);
        crate::link::put(&mut arguments, "x-queue-type", "classic".into());
        crate::link::put(&mut arguments, "x-message-ttl", amqprs::FieldValue::l(ttl));
        crate::link::put(&mut arguments, "x-dead-letter-exchange", "".into());
        crate::link::put(&mut arguments, "x-dead-letter-routing-key", queue.into());
        crate::link::put(
            &mut arguments,
            "x-expires",
            amqprs::FieldValue::l(ttl.saturating_mul(2).saturating_add(600_000)),
        );
        let mut declare = QueueDeclareArguments::durable_client_named(name);
        declare.arguments(arguments);
        let deadline = Instant::now() + self.settings.publish_outage_timeout;
        self.with_op_channel(Some(deadline), async |op: &OpChannel| {
            self.operation(
                &format!("declaring retry queue '{name}'"),
                &op.reason,
                op.channel.queue_declare(declare),
            )
            .await
            .map(|_| ())
        })
        .await?;
        self.retry_queues
            .lock()
            .expect("retry lock")
            .insert(name.to_string(), Instant::now());
        self.remember_queue(name);
        Ok(())
    }
}
