//! Subscriptions: one consumer channel each, on the consuming connection, restored after every loss.
//!
//! The subscription's stream reads amqprs's own receiver of the live consumer and turns each message
//! into a [`Delivery`] as the subscriber polls, with no task in between; the broker's prefetch bounds
//! what waits there. A task per subscription sets the consumer up, notices when it is lost (channel
//! closed or consumer cancelled by the broker, connection lost), installs the next one, and cleans up
//! after close. Deliveries carry the generation of their consumer: one from a lost consumer is never
//! settled, since its delivery tag would name another message on the next channel.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use amqprs::channel::{
    BasicAckArguments, BasicCancelArguments, BasicConsumeArguments, BasicNackArguments,
    BasicQosArguments, BasicRejectArguments, Channel, ConsumerMessage, QueueBindArguments,
    QueueDeclareArguments, QueueDeleteArguments,
};
use futures::Stream;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;

use agentcomm_core::envelope::{Envelope, FrameDecoder, MessageId};
use agentcomm_core::error::{Error, Result};
use agentcomm_core::router::{
    Acknowledge, BoxFuture, Delivery, NackAction, PublishOutcome, SubscriptionControl,
};
use amqprs::BasicProperties;
use bytes::Bytes;

use crate::builder::QueueType;
use crate::link::{Inner, LinkState, Live, OpChannel, Reason, Role, Wait, bump};
use crate::publisher::{Confirmed, LateConfirm, Unconfirmed};
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

/// What every delivery's acknowledgement handle needs (no reference to the subscription, so
/// deliveries in a handler's hands never keep it alive).
pub(crate) struct AckState {
    pub inner: Arc<Inner>,
    pub queue: String,
    /// The queue counts every requeue of a message (`x-delivery-count`, a quorum group queue) and
    /// may dead-letter it at the delivery limit: a delivery given back unhandled must not count.
    counts_requeues: bool,
    /// Bumped each time a consumer is set up or lost: deliveries of older consumers are stale.
    pub generation: AtomicU64,
    /// Deliveries handed out (and malformed frames being dead-lettered) not yet settled or dropped.
    pub outstanding: AtomicU64,
    /// Set while a closing subscription waits for `outstanding` to reach 0, so that only then does
    /// the last settlement pay for a wake-up.
    draining: AtomicBool,
    idle: Notify,
}

impl AckState {
    fn release(&self) {
        if self.outstanding.fetch_sub(1, Ordering::SeqCst) == 1
            && self.draining.load(Ordering::SeqCst)
        {
            self.idle.notify_waiters();
        }
    }
}

/// One consumer of a subscription (one channel), shared by the deliveries it made.
pub(crate) struct ConsumerHandle {
    pub state: Arc<AckState>,
    pub channel: Channel,
    /// The subscription's generation when this consumer was set up.
    pub generation: u64,
    pub tag: String,
    pub reason: Reason,
    /// Signalled when the broker closes the channel or cancels the consumer, or the stream sees the
    /// consumer's receiver end.
    pub ended: Arc<Notify>,
}

impl ConsumerHandle {
    /// Whether a delivery of this consumer can still be settled: the consumer is the subscription's
    /// current one and its channel is open. Checked right before every settlement is sent.
    fn is_current(&self) -> bool {
        self.state.generation.load(Ordering::Acquire) == self.generation
            && self.channel.is_open()
            && self.channel.is_connection_open()
    }
}

/// What the subscription's stream reads.
#[derive(Default)]
struct Feed {
    /// amqprs's receiver of the live consumer; `None` between consumers and after the end.
    receiver: Option<mpsc::UnboundedReceiver<ConsumerMessage>>,
    /// The consumer the receiver belongs to.
    consumer: Option<Arc<ConsumerHandle>>,
    /// No receiver will come any more: the stream ends once the current one is empty.
    finished: bool,
    /// The subscription was dropped: nobody will read what is buffered.
    reader_gone: bool,
    /// The stream's task, woken when a receiver is installed or the feed finishes.
    waker: Option<Waker>,
}

impl Feed {
    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    fn buffered(&self) -> usize {
        self.receiver.as_ref().map_or(0, |receiver| receiver.len())
    }

    /// Whether the reader has taken everything it will take.
    fn drained(&self) -> bool {
        self.reader_gone || self.receiver.is_none() || (self.finished && self.buffered() == 0)
    }
}

/// A subscription, shared by its task, its stream and its control.
pub(crate) struct SubShared {
    pub id: u64,
    pub spec: QueueSpec,
    pub state: Arc<AckState>,
    feed: Mutex<Feed>,
    /// Signalled when the feed drains or its reader goes, and when the router starts closing.
    pub feed_changed: Notify,
    /// The live consumer, for cancelling it.
    live: Mutex<Option<Arc<ConsumerHandle>>>,
    closed: AtomicBool,
    /// Tells the subscription's task to stop: it alone cancels the consumer and cleans up.
    stop: watch::Sender<bool>,
    /// Set by the subscription's task once it stopped consuming (its consumer cancelled, or none
    /// left), or ended: what every `close()` waits for.
    stopped: watch::Sender<bool>,
    /// Set once the subscription's task has cleaned up: it holds nothing any more.
    finished: AtomicBool,
    /// Set once a declaration of its queue was sent: only then may the queue exist, and only then
    /// does a closed fan-out subscription have a queue to delete.
    declared: AtomicBool,
    /// While its consumer is lost and restoring it has failed: how many times in a row, and the last
    /// error. Cleared once a consumer is installed again. Health reads it: the connections can be up
    /// while a subscription consumes nothing (its queue re-declared with other arguments, a
    /// permission revoked), and the messages pile up in its queue.
    restore_failures: Mutex<Option<(u32, String)>>,
}

impl SubShared {
    pub(crate) fn new(id: u64, spec: QueueSpec, inner: Arc<Inner>) -> Self {
        SubShared {
            id,
            state: Arc::new(AckState {
                counts_requeues: spec.kind == QueueKind::Group
                    && inner.settings.queue_type == QueueType::Quorum,
                inner,
                queue: spec.name.clone(),
                generation: AtomicU64::new(0),
                outstanding: AtomicU64::new(0),
                draining: AtomicBool::new(false),
                idle: Notify::new(),
            }),
            spec,
            feed: Mutex::new(Feed::default()),
            feed_changed: Notify::new(),
            live: Mutex::new(None),
            closed: AtomicBool::new(false),
            stop: watch::Sender::new(false),
            stopped: watch::Sender::new(false),
            finished: AtomicBool::new(false),
            declared: AtomicBool::new(false),
            restore_failures: Mutex::new(None),
        }
    }

    /// How many times in a row restoring this subscription's lost consumer failed, and the last
    /// error; `None` while it consumes (or restoring it has not failed yet).
    pub(crate) fn restore_failures(&self) -> Option<(u32, String)> {
        self.restore_failures
            .lock()
            .expect("restore failures lock")
            .clone()
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Whether the subscription's task has ended (after its cleanup, when closed).
    pub(crate) fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    fn feed(&self) -> std::sync::MutexGuard<'_, Feed> {
        self.feed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Deliveries handed to the application and not settled yet.
    pub(crate) fn in_hand(&self) -> u64 {
        self.state.outstanding.load(Ordering::Acquire)
    }

    /// Deliveries received from the broker and not read yet.
    pub(crate) fn buffered(&self) -> usize {
        self.feed().buffered()
    }

    /// Stops the subscription: basic.cancel, then the stream ends after what it buffered. Returns
    /// once the consumer is cancelled.
    ///
    /// The work is the subscription's task's, which `stop` tells: a close cut short (a stop deadline
    /// around it, a `select!`) still has its consumer cancelled and its channel closed, and every
    /// close, first or later, waits for that same end. Bounded: the task may be setting a consumer
    /// up (one operation timeout per step) before it can cancel it.
    pub(crate) async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::SeqCst);
        self.stop.send_replace(true);
        let inner = &self.state.inner;
        let bound = inner.settings.operation_timeout * (8 + self.spec.bindings.len() as u32);
        let mut stopped = self.stopped.subscribe();
        if tokio::time::timeout(bound, stopped.wait_for(|stopped| *stopped))
            .await
            .is_err()
        {
            tracing::warn!(
                queue = %self.spec.name,
                after = ?bound,
                "the subscription's consumer is not cancelled yet; it is cancelled in the background"
            );
        }
        Ok(())
    }

    /// basic.cancel: amqprs then drops its sender, and the receiver ends after what it buffered.
    /// A cancel that fails may leave the consumer registered in amqprs, so the channel is closed
    /// (which also ends the receiver), and the stream is told to end once its buffer is read.
    async fn stop_consumer(&self, consumer: &Arc<ConsumerHandle>) {
        let inner = &self.state.inner;
        let cancel = BasicCancelArguments::new(&consumer.tag);
        let cancelled = inner
            .operation(
                &format!("cancelling consumer {}", consumer.tag),
                &consumer.reason,
                &consumer.channel,
                move |channel| async move { channel.basic_cancel(cancel).await },
            )
            .await;
        if let Err(error) = cancelled {
            tracing::debug!(queue = %self.spec.name, error = %error, "cancelling a consumer failed; closing its channel");
            inner.close_channel(consumer.channel.clone()).await;
            let mut feed = self.feed();
            if feed
                .consumer
                .as_ref()
                .is_some_and(|current| Arc::ptr_eq(current, consumer))
            {
                feed.finished = true;
                feed.wake();
            }
        }
    }

    /// The `subscribe` call that made this subscription was given up before it returned (a
    /// caller's timeout, a `select!`): no stream will ever read it, so nothing would ever close it,
    /// and its consumer would take its share of the queue's messages into a buffer nobody reads. So
    /// the subscription is closed at once, with no reader to wait for: its consumer is cancelled
    /// once set up, and what it received goes back to the queue when its channel closes.
    pub(crate) fn unclaimed(&self) {
        let mut feed = self.feed();
        feed.reader_gone = true;
        feed.receiver = None;
        feed.consumer = None;
        drop(feed);
        self.closed.store(true, Ordering::SeqCst);
        self.stop.send_replace(true);
        self.feed_changed.notify_waiters();
    }

    /// Makes `consumer` the one the stream reads.
    fn install(
        &self,
        consumer: &Arc<ConsumerHandle>,
        receiver: mpsc::UnboundedReceiver<ConsumerMessage>,
    ) {
        *self.live.lock().expect("live lock") = Some(consumer.clone());
        *self.restore_failures.lock().expect("restore failures lock") = None;
        let mut feed = self.feed();
        feed.receiver = Some(receiver);
        feed.consumer = Some(consumer.clone());
        feed.wake();
    }

    /// Takes a lost consumer's receiver away from the stream; returns how many of its deliveries were
    /// still buffered (RabbitMQ delivers them again).
    fn retire(&self, consumer: &Arc<ConsumerHandle>) -> u64 {
        let mut live = self.live.lock().expect("live lock");
        if live
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, consumer))
        {
            *live = None;
        }
        drop(live);
        let mut feed = self.feed();
        if !feed
            .consumer
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, consumer))
        {
            return 0;
        }
        feed.consumer = None;
        feed.receiver
            .take()
            .map_or(0, |receiver| receiver.len() as u64)
    }

    /// Whether a closing subscription can let go of its channel: nothing in a handler's hands and,
    /// unless the whole router is closing, nothing buffered that its reader may still settle.
    fn settled(&self) -> bool {
        self.state.outstanding.load(Ordering::SeqCst) == 0
            && (self.state.inner.is_closing() || self.feed().drained())
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

/// The stream handed to [`agentcomm_core::router::Subscription::from_stream`].
pub(crate) struct DeliveryStream {
    shared: Arc<SubShared>,
    /// Reuses the channel of the previous message when the next one has the same.
    decoder: FrameDecoder,
}

impl DeliveryStream {
    pub(crate) fn new(shared: Arc<SubShared>) -> Self {
        DeliveryStream {
            shared,
            decoder: FrameDecoder::new(),
        }
    }
}

impl Stream for DeliveryStream {
    type Item = Delivery;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        let DeliveryStream { shared, decoder } = self.get_mut();
        loop {
            let (message, consumer) = {
                let mut feed = shared.feed();
                let polled = feed
                    .receiver
                    .as_mut()
                    .map(|receiver| receiver.poll_recv(cx));
                match polled {
                    Some(Poll::Ready(Some(message))) => {
                        let consumer = feed.consumer.clone().expect("a receiver has its consumer");
                        (message, consumer)
                    }
                    Some(Poll::Ready(None)) => {
                        // The consumer ended (cancelled, channel or connection closed) and everything
                        // it delivered was read.
                        feed.receiver = None;
                        if let Some(consumer) = feed.consumer.take() {
                            consumer.ended.notify_one();
                        }
                        drop(feed);
                        shared.feed_changed.notify_waiters();
                        continue;
                    }
                    Some(Poll::Pending) | None => {
                        if feed.finished {
                            return Poll::Ready(None);
                        }
                        if !feed.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                            feed.waker = Some(cx.waker().clone());
                        }
                        return Poll::Pending;
                    }
                }
            };
            if let Some(delivery) = deliver(shared, decoder, message, consumer) {
                return Poll::Ready(Some(delivery));
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.shared.buffered(), None)
    }
}

impl Drop for DeliveryStream {
    /// The subscription was dropped: what is buffered will not be read. Dropping it leaves those
    /// messages unacknowledged on a channel about to close, so RabbitMQ delivers them again, and the
    /// task closing the subscription has nothing to wait for.
    fn drop(&mut self) {
        let mut feed = self.shared.feed();
        feed.reader_gone = true;
        feed.receiver = None;
        feed.consumer = None;
        drop(feed);
        self.shared.feed_changed.notify_waiters();
    }
}

/// Turns one message of `consumer` into a delivery; `None` when it is not one to hand out (a
/// malformed frame, dead-lettered in the background; a leftover of a lost consumer).
fn deliver(
    shared: &SubShared,
    decoder: &mut FrameDecoder,
    message: ConsumerMessage,
    consumer: Arc<ConsumerHandle>,
) -> Option<Delivery> {
    let inner = &shared.state.inner;
    let Some(deliver) = message.deliver else {
        // amqprs promises every message has its method; one without cannot even be settled.
        bump(&inner.counters.malformed);
        tracing::error!(
            queue = %shared.spec.name,
            "amqprs handed over a message without its basic.deliver; it cannot be settled, RabbitMQ delivers it again when the channel closes"
        );
        return None;
    };
    if consumer.generation != shared.state.generation.load(Ordering::Acquire) {
        // Read in the instant between the loss of its consumer and the retirement of its receiver.
        bump(&inner.counters.stale_discarded);
        return None;
    }
    // The payload stays in the message's buffer: the envelope holds a view into it, not a copy.
    let content = Bytes::from(message.content.unwrap_or_default());
    let redelivered = deliver.redelivered();
    let mut handle = AmqpAck::new(consumer, deliver.delivery_tag());
    // Never requeued yet: RabbitMQ adds `x-delivery-count` at the first requeue. Its properties are
    // kept for the copy a give-back sends.
    if shared.state.counts_requeues
        && !message
            .basic_properties
            .as_ref()
            .and_then(|properties| properties.headers())
            .is_some_and(|headers| {
                headers
                    .as_ref()
                    .keys()
                    .any(|key| key.as_ref() == "x-delivery-count")
            })
    {
        handle.uncounted = Some(Box::new(message.basic_properties.unwrap_or_default()));
    }
    match decoder.decode(content.clone()) {
        Ok(envelope) => {
            bump(&inner.counters.delivered);
            Some(Delivery::new(envelope, Box::new(handle)).redelivered(redelivered))
        }
        Err(error) => {
            let routing_key = deliver.routing_key().clone();
            // On the router's runtime: the reader may poll from one that ends as soon as it has
            // its delivery (a `block_on` helper), which would drop this task unrun, the frame
            // neither dead-lettered nor acknowledged.
            inner
                .runtime
                .spawn(dead_letter_malformed(handle, content, routing_key, error));
            None
        }
    }
}

/// Runs a subscription: sets up its consumer, waits for it to end, restores it after every loss,
/// and cleans up when the subscription is closed. `ready` gets the result of the first setup.
pub(crate) async fn run(shared: Arc<SubShared>, ready: oneshot::Sender<Result<()>>) {
    // However the task ends, a close waiting for it is let go and health stops counting it.
    let _stopped = SignalOnDrop(&shared);
    let inner = shared.state.inner.clone();
    let mut ready = Some(ready);
    let mut failures = 0u32;
    let mut stop = shared.stop.subscribe();
    // The first setup (the `subscribe` call waits for it) is bounded like a publish in an outage.
    let first_wait = Wait::up_to(
        "publish_outage_timeout",
        inner.settings.publish_outage_timeout,
    );
    let mut last_consumer: Option<Arc<ConsumerHandle>> = None;
    loop {
        if shared.is_closed() {
            break;
        }
        let wait = if ready.is_some() {
            first_wait
        } else {
            Wait::Forever
        };
        let live = tokio::select! {
            live = inner.wait_connected(Role::Consuming, wait) => live,
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
        let (consumer, receiver) = match setup(&shared, &live, ready.is_none()).await {
            Ok(set_up) => set_up,
            Err(error) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(error));
                    break;
                }
                failures = failures.saturating_add(1);
                bump(&inner.counters.consumer_failures);
                {
                    let mut failed = shared
                        .restore_failures
                        .lock()
                        .expect("restore failures lock");
                    let times = failed.as_ref().map_or(0, |(times, _)| *times) + 1;
                    *failed = Some((times, error.to_string()));
                }
                let delay = inner.settings.reconnect.delay(failures);
                tracing::warn!(
                    queue = %shared.spec.name,
                    error = %error,
                    retry_in_ms = delay.as_millis() as u64,
                    "restoring a consumer failed"
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => continue,
                    _ = stop.wait_for(|stop| *stop) => break,
                }
            }
        };
        let consuming_since = Instant::now();
        shared.install(&consumer, receiver);
        last_consumer = Some(consumer.clone());
        match ready.take() {
            Some(ready) => {
                let _ = ready.send(Ok(()));
            }
            None => {
                bump(&inner.counters.consumers_restored);
                tracing::info!(queue = %shared.spec.name, "consumer restored after a loss");
            }
        }
        let lost = tokio::select! {
            () = consumer.ended.notified() => true,
            () = inner.consuming.gone(live.generation) => true,
            _ = stop.wait_for(|stop| *stop) => false,
        };
        if !lost || shared.is_closed() {
            break;
        }
        // The channel or connection died, or the broker cancelled the consumer: what it delivered can
        // no longer be settled there.
        shared.state.generation.fetch_add(1, Ordering::AcqRel);
        let discarded = shared.retire(&consumer);
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
        // A consumer that lived a while starts its backoff over; one that keeps dying at once backs
        // off further each time.
        failures = if consuming_since.elapsed() > Duration::from_secs(10) {
            1
        } else {
            failures.saturating_add(1)
        };
        if consumer.channel.is_connection_open() {
            // Only the channel died (or the consumer was cancelled): close it, wait, restore.
            inner.close_channel_later(consumer.channel.clone());
            tokio::select! {
                () = tokio::time::sleep(inner.settings.reconnect.delay(failures)) => {}
                _ = stop.wait_for(|stop| *stop) => break,
            }
        }
    }
    // The only place a consumer is cancelled (close only asks, through `stop`): so a close cut short
    // cannot leave it half done, and two cancels never race on one channel.
    let consumer = shared.live.lock().expect("live lock").clone();
    if let Some(consumer) = consumer {
        shared.stop_consumer(&consumer).await;
    }
    shared.stopped.send_replace(true);
    cleanup(&shared, last_consumer).await;
}

/// Marks the subscription's task as ended when dropped: a close waiting for it is let go, health
/// stops counting it, and its stream ends after what it buffered. Its cleanup ends the stream too,
/// but a task dropped before it finished (its runtime, the router's, shut down; a panic) does not
/// get there, and a reader on another runtime would wait for ever.
struct SignalOnDrop<'a>(&'a SubShared);

impl Drop for SignalOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stopped.send_replace(true);
        self.0.finished.store(true, Ordering::Release);
        end_stream(self.0);
    }
}

/// After the subscription stopped: let the application settle what it holds (up to the close
/// timeout), close the channel, delete a fan-out queue and its retry queues, then end the stream.
///
/// A subscription closed on its own (an agent stopping) also waits for what is buffered: its reader
/// drains the stream and settles each delivery while the channel is still open. When the whole router
/// closes, only deliveries already in a handler's hands are waited for; buffered ones stay readable,
/// but can no longer be settled, and RabbitMQ delivers them again. A dropped subscription has no
/// reader: its buffer is dropped at once and its channel closed as soon as nothing is in hand.
async fn cleanup(shared: &SubShared, consumer: Option<Arc<ConsumerHandle>>) {
    let inner = &shared.state.inner;
    let deadline = Instant::now() + inner.settings.close_timeout;
    shared.state.draining.store(true, Ordering::SeqCst);
    loop {
        let idle = shared.state.idle.notified();
        let fed = shared.feed_changed.notified();
        tokio::pin!(idle, fed);
        idle.as_mut().enable();
        fed.as_mut().enable();
        if shared.settled() {
            break;
        }
        let changed = async {
            tokio::select! {
                () = idle => {}
                () = fed => {}
            }
        };
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            tracing::warn!(
                queue = %shared.spec.name,
                in_hand = shared.in_hand(),
                buffered = shared.buffered(),
                "closing a subscription with deliveries still unsettled after the close timeout; RabbitMQ delivers them again"
            );
            break;
        }
    }
    if let Some(consumer) = consumer {
        inner.close_channel(consumer.channel.clone()).await;
    }
    // A subscription that never sent its queue's declaration (its subscribe gave up waiting out an
    // outage, or was stopped by the router's close) has no queue: nothing to wait for or delete.
    if shared.spec.kind == QueueKind::FanOut && shared.declared.load(Ordering::Acquire) {
        // What the reader holds or can still read went back to the queue when the channel closed,
        // yet it is not lost: it is not counted as dropped with the queue.
        let readable = {
            let feed = shared.feed();
            let buffered = if feed.reader_gone { 0 } else { feed.buffered() };
            drop(feed);
            shared.in_hand() + buffered as u64
        };
        // During an outage, the deletion waits for the reconnect within the same close timeout:
        // the queue left behind would keep its bindings until it expires (`fan_out_expiry`), and
        // every publish matching them would be confirmed `Accepted`, then dropped with it, uncounted.
        // The stream ends first: its reader (an agent stopping reads it to its end) has no part in
        // the deletion, and is not to wait out an outage for it.
        if !matches!(*inner.consuming.state.borrow(), LinkState::Connected(_)) {
            end_stream(shared);
            reconnected_or_closing(shared, deadline).await;
        }
        let wait = if inner.is_closing() {
            Wait::Not("the router is closing, and its close does not wait out an outage")
        } else {
            Wait::Until {
                deadline,
                setting: "close_timeout",
                bound: inner.settings.close_timeout,
            }
        };
        delete_fan_out_queue(inner, &shared.spec.name, readable, wait).await;
    }
    end_stream(shared);
    tracing::debug!(queue = %shared.spec.name, "subscription closed");
}

/// Ends the subscription's stream once its reader has read what is buffered.
fn end_stream(shared: &SubShared) {
    let mut feed = shared.feed();
    feed.finished = true;
    feed.wake();
}

/// Waits until the consuming connection is back, `deadline`, or the whole router starts closing:
/// its close does not wait out an outage (`close` wakes `feed_changed` once `closing` is set).
async fn reconnected_or_closing(shared: &SubShared, deadline: Instant) {
    let inner = &shared.state.inner;
    let mut state = inner.consuming.state.subscribe();
    loop {
        let woken = shared.feed_changed.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if inner.is_closing() || !matches!(*state.borrow_and_update(), LinkState::Connecting { .. })
        {
            return;
        }
        tokio::select! {
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = woken => {}
            () = tokio::time::sleep_until(deadline) => return,
        }
    }
}

/// Deletes a closed fan-out subscription's queue and the retry queues this router declared for it:
/// retries still waiting there have nowhere to go back to (counted in `retries_dropped`), and
/// messages still in the queue (not read, or given back when its channel closed) have nobody to go
/// to (counted in `fan_out_dropped`), except the `readable` ones its reader holds or can still read.
/// `wait`: how long it may still wait for the consuming connection.
async fn delete_fan_out_queue(inner: &Inner, name: &str, readable: u64, wait: Wait) {
    let retry_prefix = format!("{name}.retry.");
    let retry_queues: Vec<String> = inner
        .declared_queues
        .lock()
        .expect("declared lock")
        .iter()
        .filter(|queue| queue.starts_with(&retry_prefix))
        .cloned()
        .collect();
    let deleted = inner
        .with_op_channel(wait, async |op: &OpChannel| {
            let (mut dropped, mut unread) = (0u64, 0u64);
            for queue in retry_queues.iter().map(String::as_str).chain([name]) {
                let delete = QueueDeleteArguments::new(queue);
                let left = inner
                    .operation(
                        &format!("deleting queue '{queue}'"),
                        &op.reason,
                        &op.channel,
                        move |channel| async move { channel.queue_delete(delete).await },
                    )
                    .await?;
                let left = u64::from(left.unwrap_or(0));
                if queue == name {
                    unread += left;
                } else {
                    dropped += left;
                }
            }
            Ok((dropped, unread.saturating_sub(readable)))
        })
        .await;
    match deleted {
        Ok((dropped, unread)) => {
            let mut declared = inner.declared_queues.lock().expect("declared lock");
            for queue in &retry_queues {
                declared.remove(queue);
                inner.retry_queues.lock().expect("retry lock").remove(queue);
            }
            drop(declared);
            if dropped > 0 {
                inner
                    .counters
                    .retries_dropped
                    .fetch_add(dropped, Ordering::Relaxed);
                tracing::warn!(
                    queue = name,
                    dropped,
                    "a closed fan-out subscription still had delayed retries waiting; they were dropped with its queue"
                );
            }
            if unread > 0 {
                inner
                    .counters
                    .fan_out_dropped
                    .fetch_add(unread, Ordering::Relaxed);
                tracing::warn!(
                    queue = name,
                    dropped = unread,
                    "a closed fan-out subscription's queue still held messages nobody read; they were dropped with it"
                );
            }
        }
        Err(error) => {
            tracing::warn!(
                queue = name,
                error = %error,
                expiry = ?inner.settings.fan_out_expiry,
                "could not delete the queue of a closed fan-out subscription: until it expires (fan_out_expiry), publishes matching its bindings are confirmed as accepted and dropped with it"
            );
        }
    }
}

/// Opens a channel, sets the prefetch, declares and binds the queue and starts consuming.
async fn setup(
    shared: &SubShared,
    live: &Live,
    restoring: bool,
) -> Result<(
    Arc<ConsumerHandle>,
    mpsc::UnboundedReceiver<ConsumerMessage>,
)> {
    let inner = &shared.state.inner;
    let spec = &shared.spec;
    if restoring && spec.kind == QueueKind::FanOut {
        check_fan_out_queue_survived(inner, &spec.name).await;
    }
    let op = inner.open_op_channel(live).await?;
    let result = async {
        let channel = &op.channel;
        let qos = BasicQosArguments::new(0, spec.prefetch, false);
        inner
            .operation(
                "setting the prefetch",
                &op.reason,
                channel,
                move |channel| async move { channel.basic_qos(qos).await },
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
        shared.declared.store(true, Ordering::Release);
        inner
            .operation(
                &format!("declaring queue '{}'", spec.name),
                &op.reason,
                channel,
                move |channel| async move { channel.queue_declare(declare).await },
            )
            .await?;
        if spec.kind == QueueKind::Group {
            inner.remember_queue(&spec.name);
        }
        for key in &spec.bindings {
            let bind = QueueBindArguments::new(&spec.name, &inner.settings.exchange, key);
            inner
                .operation(
                    &format!("binding queue '{}' to '{key}'", spec.name),
                    &op.reason,
                    channel,
                    move |channel| async move { channel.queue_bind(bind).await },
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
                channel,
                move |channel| async move { channel.basic_consume_rx(consume).await },
            )
            .await?;
        Ok((tag, generation, receiver))
    }
    .await;
    match result {
        Ok((tag, generation, receiver)) => Ok((
            Arc::new(ConsumerHandle {
                state: shared.state.clone(),
                channel: op.channel,
                generation,
                tag,
                reason: op.reason,
                ended: op.ended,
            }),
            receiver,
        )),
        Err(error) => {
            inner.close_channel(op.channel).await;
            Err(error)
        }
    }
}

/// A fan-out queue expires when its consumer is gone longer than `fan_out_expiry`: say so when a
/// reconnect finds it gone, since what was published meanwhile is lost.
async fn check_fan_out_queue_survived(inner: &Inner, name: &str) {
    let wait = Wait::Not("a fan-out queue is checked only on a live connection");
    let found = inner
        .with_op_channel(wait, async |op: &OpChannel| {
            let mut passive = QueueDeclareArguments::new(name);
            passive.passive(true);
            inner
                .operation(
                    "checking a fan-out queue",
                    &op.reason,
                    &op.channel,
                    move |channel| async move { channel.queue_declare(passive).await },
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

/// A frame that is not an agentcomm envelope: published as `Envelope::malformed` to the dead-letter
/// channel, then acknowledged. If that publish fails or reaches no queue (no dead-letter queue is
/// declared and nobody subscribes to dead letters), the frame is rejected without requeue: the queue's
/// dead-letter exchange keeps it if something is bound there, and otherwise RabbitMQ drops it.
/// Counted (`malformed`) and logged either way.
async fn dead_letter_malformed(handle: AmqpAck, content: Bytes, routing_key: String, error: Error) {
    let inner = handle.consumer.state.inner.clone();
    let queue = handle.consumer.state.queue.clone();
    bump(&inner.counters.malformed);
    tracing::error!(
        queue = %queue,
        routing_key = %routing_key,
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
    let settled = match published {
        Ok(PublishOutcome::Unroutable) | Err(_) => {
            if inner.settings.dead_letter_queue.is_some() {
                tracing::warn!(
                    queue = %queue,
                    "the malformed frame could not be published as a dead letter; rejecting it to the queue's dead-letter exchange"
                );
            } else {
                tracing::warn!(
                    queue = %queue,
                    "the malformed frame reached no dead-letter queue (none is declared: without_dead_letter_queue); rejecting it, so RabbitMQ drops it unless something is bound to the dead-letter exchange"
                );
            }
            handle
                .settle(
                    "rejecting",
                    handle
                        .consumer
                        .channel
                        .basic_reject(BasicRejectArguments::new(handle.tag, false)),
                )
                .await
        }
        Ok(_) => handle.basic_ack().await,
    };
    if let Err(error) = settled {
        tracing::warn!(error = %error, "could not settle a malformed frame; RabbitMQ delivers it again");
    }
}

/// Settles one delivery on the channel it came from. Counts as outstanding until dropped.
struct AmqpAck {
    consumer: Arc<ConsumerHandle>,
    tag: u64,
    /// How far its settlement got: [`UNSETTLED`], [`REQUEUING`], [`ACKING`], [`RETRY_SENT`] or
    /// [`DONE`].
    progress: AtomicU8,
    /// From a queue that counts requeues, and never requeued yet: given back unhandled, it goes back
    /// as a copy (see [`AmqpAck::give_back`]) with these, its AMQP properties.
    uncounted: Option<Box<BasicProperties>>,
    /// The message's id, once a settlement that sends a copy (`nack(Retry)`, a give-back as a copy)
    /// was asked for: a message whose copy went out and whose original is then not acknowledged
    /// comes twice, and the warning names it.
    copied: Option<MessageId>,
    /// A copy of it (a retry, one sent straight back, a delivery given back as a copy) went out and
    /// was not confirmed yet: cut short now, the original is given back, and RabbitMQ may store the
    /// copy too. Cleared once the copy's publish is over, and set again while the original is held
    /// for the copy's late confirm.
    copy_out: AtomicBool,
    /// For a `nack(Retry)`: where the publisher reports the confirm of the retry's copy should it
    /// come after `confirm_timeout` (see [`AmqpAck::hold_for_late_confirm`]).
    late: Option<Box<LateConfirm>>,
}

/// No settlement asked for: dropped like this (`Delivery::discard`), it is left to the broker, which
/// delivers it again when its channel closes.
const UNSETTLED: u8 = 0;
/// Giving it back was asked for (a requeue, a retry not sent yet, or the delivery was abandoned).
const REQUEUING: u8 = 1;
/// Its acknowledgement was asked for.
const ACKING: u8 = 2;
/// The retry's copy went out; the original still waits for its ack.
const RETRY_SENT: u8 = 3;
/// Settled, or its settlement ended with an error its caller was told about.
const DONE: u8 = 4;

impl AmqpAck {
    fn new(consumer: Arc<ConsumerHandle>, tag: u64) -> Self {
        consumer.state.outstanding.fetch_add(1, Ordering::SeqCst);
        AmqpAck {
            consumer,
            tag,
            progress: AtomicU8::new(UNSETTLED),
            uncounted: None,
            copied: None,
            copy_out: AtomicBool::new(false),
            late: None,
        }
    }

    /// Finishes a settlement that was asked for and not completed (its future was dropped, or the
    /// delivery was abandoned), on a task of its own, as it was asked: acknowledges the message when
    /// an ack was asked for or its retry's copy went out already, gives it back otherwise (counted in
    /// `abandoned`).
    ///
    /// On the router's runtime (see `Inner::runtime`): the delivery may be dropped outside any.
    fn finish_in_background(&self, progress: u8) {
        let runtime = self.inner().runtime.clone();
        let acknowledge = matches!(progress, ACKING | RETRY_SENT);
        if acknowledge {
            tracing::debug!(
                queue = %self.consumer.state.queue,
                "an acknowledgement was cut short (its future was dropped); sending it"
            );
        } else {
            bump(&self.inner().counters.abandoned);
            tracing::warn!(
                queue = %self.consumer.state.queue,
                "a delivery was left unsettled (dropped, or its nack cut short); giving the message back to its queue"
            );
        }
        // A handle of its own keeps the delivery outstanding (close waits for it) until this is
        // done. It starts as done: should this task be dropped (its runtime shutting down), its
        // drop does not start another.
        let handle = AmqpAck::new(self.consumer.clone(), self.tag);
        handle.progress.store(DONE, Ordering::Relaxed);
        let retried = (progress == RETRY_SENT).then_some(self.copied).flatten();
        runtime.spawn(async move {
            let finished = if acknowledge {
                handle.basic_ack().await
            } else {
                handle.basic_requeue().await
            };
            match (finished, retried) {
                (Ok(()), _) => {}
                (Err(error), Some(id)) => tracing::warn!(
                    queue = %handle.consumer.state.queue,
                    message_id = %id,
                    error = %error,
                    "a copy of a message went back to its queue (a retry, or a delivery given back as a copy), but the settlement was cut short and the original could not be acknowledged: RabbitMQ delivers the original again, so the message comes twice"
                ),
                (Err(error), None) => tracing::warn!(error = %error, "could not finish a settlement that was cut short; RabbitMQ redelivers the message when the channel closes"),
            }
        });
    }
}

impl Drop for AmqpAck {
    /// A settlement whose future was dropped part-way (a caller's timeout around a slow
    /// `nack(Retry)` during a publishing outage, a `select!`) would otherwise leave the message
    /// unacknowledged on a live channel, held out of everyone's reach until that channel closes.
    fn drop(&mut self) {
        let progress = self.progress.load(Ordering::Relaxed);
        if self.copy_out.load(Ordering::Relaxed) {
            // Whether RabbitMQ stores the copy nobody waits for now cannot be known: say so.
            bump(&self.inner().counters.copies_unconfirmed);
            tracing::warn!(
                queue = %self.consumer.state.queue,
                message_id = %self.copied.map(|id| id.to_string()).unwrap_or_default(),
                "a settlement that sends a copy of a message to a queue (a retry, or a delivery given back as a copy) was cut short before RabbitMQ confirmed the copy: the original goes back to its queue, and RabbitMQ may store the copy too, so the message may come twice"
            );
        }
        if !matches!(progress, UNSETTLED | DONE) {
            if self.consumer.is_current() {
                self.finish_in_background(progress);
            } else if progress == RETRY_SENT {
                // Its channel is gone with the original unacknowledged: RabbitMQ delivers it again,
                // and the retry's copy comes too. A nack not cut short tells its caller so; this
                // one has no caller left to tell.
                bump(&self.inner().counters.stale);
                tracing::warn!(
                    queue = %self.consumer.state.queue,
                    message_id = %self.copied.map(|id| id.to_string()).unwrap_or_default(),
                    "a copy of a message went back to its queue (a retry, or a delivery given back as a copy), but the settlement was cut short and the channel the original came on was gone before it was acknowledged: RabbitMQ delivers the original again, so the message comes twice"
                );
            }
        }
        self.consumer.state.release();
    }
}

impl AmqpAck {
    fn inner(&self) -> &Inner {
        &self.consumer.state.inner
    }

    fn stale(&self, what: &str) -> Error {
        bump(&self.inner().counters.stale);
        self.inner().backend_error(format!(
            "cannot {what} the message: the channel it was delivered on is gone (connection lost, consumer restored or router closed); RabbitMQ delivers it again"
        ))
    }

    /// Sends one settlement frame, if the delivery's consumer is still the current one (checked right
    /// before sending: a delivery tag on another channel would name another message). Bounded by the
    /// operation timeout: the frame waits only while the connection's writer is stalled.
    async fn settle(
        &self,
        what: &str,
        frame: impl Future<Output = std::result::Result<(), amqprs::error::Error>>,
    ) -> Result<()> {
        if !self.consumer.is_current() {
            // Failed with an error the caller hears about: nothing is left for `Drop` (which
            // would otherwise count and log a retry's original as cut short, a second time).
            self.progress.store(DONE, Ordering::Relaxed);
            return Err(self.stale(what));
        }
        let inner = self.inner();
        let timeout = inner.settings.operation_timeout;
        let sent = tokio::time::timeout(timeout, frame).await;
        // Settled, or failed with an error the caller hears about: nothing is left for `Drop`.
        self.progress.store(DONE, Ordering::Relaxed);
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => {
                bump(&inner.counters.settle_failures);
                Err(inner.backend_error(format!(
                    "{what} the message failed ({error}); RabbitMQ delivers it again"
                )))
            }
            Err(_) => {
                bump(&inner.counters.settle_failures);
                Err(Error::Timeout {
                    operation: format!(
                        "{what} the message (the connection is stalled; RabbitMQ delivers it again once the connection is lost)"
                    ),
                    after: timeout,
                })
            }
        }
    }

    async fn basic_ack(&self) -> Result<()> {
        let channel = &self.consumer.channel;
        self.settle(
            "acknowledge",
            channel.basic_ack(BasicAckArguments::new(self.tag, false)),
        )
        .await?;
        bump(&self.inner().counters.acked);
        Ok(())
    }

    async fn basic_requeue(&self) -> Result<()> {
        let channel = &self.consumer.channel;
        self.settle(
            "give back",
            channel.basic_nack(BasicNackArguments::new(self.tag, false, true)),
        )
        .await?;
        bump(&self.inner().counters.requeued);
        Ok(())
    }

    /// Publishes `envelope` (the next attempt) to the retry queue for `delay`, then acknowledges the
    /// original. When the retry queue cannot be used (it cannot be declared: a queue of that name
    /// with other arguments, a permission missing), the envelope is sent straight back to its queue
    /// instead, counted in `retries_undelayed`, and the caller gets an error naming the cause: the
    /// retry comes back at once, not after `delay`. When that fails too, the original is requeued
    /// unchanged, and the caller gets an error saying so.
    ///
    /// A copy RabbitMQ did not confirm in time but may have stored all the same is not followed by
    /// another (it would go the way the first one could not, and the message could come three
    /// times). When its frame went out and its confirm is still awaited (a confirm timeout), the
    /// original is held unacknowledged until RabbitMQ's answer comes (see
    /// [`AmqpAck::hold_for_late_confirm`]), and the caller gets an error saying so at once. When it
    /// cannot come any more (the copy's channel was lost and sending it again gave up), the original
    /// is requeued unchanged, counted in `copies_unconfirmed`, and the caller gets an error saying
    /// that the message comes again at once and may come a second time, from that copy.
    ///
    /// Requeuing the original at once after every confirm timeout multiplied a failing message
    /// while confirms were slow: it came back with its attempt unchanged, so `max_attempts` never
    /// stopped it, and each round left one more copy at the next attempt (7 deliveries at attempt 1
    /// and 7 dead letters for one message in 10 s of 600 ms latency with a 500 ms confirm timeout).
    async fn retry(self: Box<Self>, envelope: Envelope, delay: Duration) -> Result<()> {
        let inner = self.consumer.state.inner.clone();
        let queue = self.consumer.state.queue.clone();
        let id = envelope.id();
        let late = self.late.as_deref();
        // Where the next attempt went: to the retry queue (`Ok(None)`); straight back to `queue`
        // instead (`Ok(Some(why not to the retry queue))`); nowhere for sure (`Err`, with where a
        // copy may be when RabbitMQ may have stored one).
        let scheduled = inner
            .schedule_retry(&queue, &envelope, delay, &self.copy_out, late)
            .await;
        // Its publish is over: a failure that may have been stored is counted below.
        self.copy_out.store(false, Ordering::Relaxed);
        let sent = match scheduled {
            Ok(()) => Ok(None),
            Err(failed) if failed.maybe_stored => Err((
                failed.error,
                Some(CopySent {
                    delay: Some(delay),
                    attempt: envelope.attempt(),
                }),
            )),
            Err(failed) => {
                tracing::warn!(
                    queue = %queue,
                    message_id = %id,
                    error = %failed.error,
                    "could not schedule a delayed retry; sending the message back to its queue at once"
                );
                let requeued = inner
                    .requeue_now(&queue, &envelope, &self.copy_out, late)
                    .await;
                self.copy_out.store(false, Ordering::Relaxed);
                match requeued {
                    Ok(()) => Ok(Some(failed.error)),
                    Err(again) if again.maybe_stored => Err((
                        again.error,
                        Some(CopySent {
                            delay: None,
                            attempt: envelope.attempt(),
                        }),
                    )),
                    Err(_) => Err((failed.error, None)),
                }
            }
        };
        match sent {
            Ok(undelayed) => {
                self.progress.store(RETRY_SENT, Ordering::Relaxed);
                bump(&inner.counters.retried);
                if undelayed.is_some() {
                    bump(&inner.counters.retries_undelayed);
                }
                self.basic_ack().await.map_err(|error| {
                    inner.backend_error(format!(
                        "the retry of message {id} was sent, but the original could not be acknowledged ({error}): it will be delivered twice"
                    ))
                })?;
                match undelayed {
                    None => Ok(()),
                    Some(cause) => Err(inner.backend_error(format!(
                        "could not schedule the retry after {delay:?} ({cause}); message {id} was sent back to its queue '{queue}' at once instead, as attempt {}",
                        envelope.attempt()
                    ))),
                }
            }
            Err((error, None)) => {
                self.basic_requeue().await?;
                Err(inner.backend_error(format!(
                    "could not schedule the retry ({error}); the message was requeued unchanged instead"
                )))
            }
            Err((error, Some(copy))) => {
                let waiting = self.late.as_deref().and_then(LateConfirm::take);
                let fate = match waiting {
                    Some((mut receiver, earlier_frames)) => match receiver.try_recv() {
                        Err(oneshot::error::TryRecvError::Empty) => {
                            return self.hold_for_late_confirm(
                                receiver,
                                earlier_frames,
                                id,
                                copy,
                                &error,
                            );
                        }
                        Ok(confirmed) => CopyFate::of(Ok(confirmed), earlier_frames),
                        Err(oneshot::error::TryRecvError::Closed) => {
                            CopyFate::of(Err(()), earlier_frames)
                        }
                    },
                    None => CopyFate::Unknown("no confirm came in time"),
                };
                self.settle_for_copy(fate, id, copy, Some(error)).await
            }
        }
    }

    /// The retry's copy went out and its confirm did not come within `confirm_timeout`: the
    /// original stays unacknowledged (it keeps its prefetch slot, and counts in `in_flight`) until
    /// RabbitMQ's answer comes, on a task of its own, and the caller is told so now. The answer,
    /// whenever it comes, settles the original ([`AmqpAck::settle_for_copy`]): acknowledged when
    /// the copy was stored (the copy carries the retry on: no duplicate), requeued unchanged when
    /// RabbitMQ refused it, and requeued, counted in `copies_unconfirmed` and logged as maybe
    /// coming twice when the answer cannot come any more: the copy's channel or connection was lost
    /// first, the router closed, or `retry_hold_timeout` passed.
    ///
    /// The router's close waits for the held original like any delivery in hand (up to
    /// `close_timeout`, while its channel is open), then for the copy's confirm like any owed
    /// confirm (up to `close_timeout` again), then fails it: by then the subscription's channel is
    /// closed and RabbitMQ gave the original back, and the copy may be stored too (counted and
    /// logged as above).
    fn hold_for_late_confirm(
        self: Box<Self>,
        receiver: oneshot::Receiver<Confirmed>,
        earlier_frames: bool,
        id: MessageId,
        copy: CopySent,
        error: &Error,
    ) -> Result<()> {
        let inner = self.consumer.state.inner.clone();
        // Until the answer settles it, a drop (the task stopped by its runtime shutting down) gives
        // the original back and counts the copy as unconfirmed.
        self.copy_out.store(true, Ordering::Relaxed);
        self.progress.store(REQUEUING, Ordering::Relaxed);
        let hold = inner.settings.retry_hold_timeout;
        let told = inner.backend_error(format!(
            "RabbitMQ did not confirm the retry of message {id} in time ({error}), but may still store it: the original is held unacknowledged until RabbitMQ confirms or refuses the copy, its publishing channel or connection is lost, the router closes, or retry_hold_timeout ({hold:?}) passes. If the copy is confirmed, the original is acknowledged and {} (unless the original's own channel closed meanwhile, as RabbitMQ's consumer_timeout does: then the original comes again too); if it is refused, the original is requeued unchanged; if no answer comes, the original is requeued and the message may come twice (logged, and counted in copies_unconfirmed)",
            copy.comes()
        ));
        // Shown in health (`held_for_late_confirm`) until the answer settles it, or the task is
        // dropped: the hold may last up to `retry_hold_timeout` (25 minutes by default), and
        // `in_flight` alone does not tell a held original from a handler at work.
        let held = HeldForLateConfirm::new(inner.clone());
        inner.runtime.clone().spawn(async move {
            let _held = held;
            let fate = CopyFate::of(receiver.await.map_err(|_| ()), earlier_frames);
            let stored = matches!(fate, CopyFate::Stored);
            let queue = self.consumer.state.queue.clone();
            match self.settle_for_copy(fate, id, copy, None).await {
                Ok(()) if stored => tracing::info!(
                    queue = %queue,
                    message_id = %id,
                    "RabbitMQ confirmed a retry's copy after confirm_timeout: the original it held is acknowledged, and the copy carries the retry"
                ),
                Ok(()) => {}
                Err(error) => tracing::warn!(
                    queue = %queue,
                    message_id = %id,
                    error = %error,
                    "settled a delivery held for its retry's late confirm"
                ),
            }
        });
        Err(told)
    }

    /// Settles the original of a retry whose copy's confirm did not come in time, once what became
    /// of the copy is known (`fate`). `error` is the publish's own error when the caller of the nack
    /// still waits (it is told the result), `None` when the original was held for a late confirm.
    async fn settle_for_copy(
        &self,
        fate: CopyFate,
        id: MessageId,
        copy: CopySent,
        error: Option<Error>,
    ) -> Result<()> {
        let inner = self.inner();
        // Known now: a drop from here on is not a copy cut short.
        self.copy_out.store(false, Ordering::Relaxed);
        // Held: the late answer (if any) is `fate`; the cause is the timeout only.
        let cause = error.map_or_else(
            || "no confirm came within confirm_timeout".to_string(),
            |error| error.to_string(),
        );
        match fate {
            CopyFate::Stored => {
                self.progress.store(RETRY_SENT, Ordering::Relaxed);
                bump(&inner.counters.retried);
                if copy.delay.is_none() {
                    bump(&inner.counters.retries_undelayed);
                }
                self.basic_ack().await.map_err(|ack| {
                    inner.backend_error(format!(
                        "RabbitMQ confirmed the retry of message {id} late ({cause}), so it stored it, but the original could not be acknowledged ({ack}): it will be delivered twice"
                    ))
                })?;
                // Only once acknowledged: an original whose channel closed while it was held comes
                // again with the copy (counted in `stale`, and logged, by the failure above).
                bump(&inner.counters.copies_confirmed_late);
                Ok(())
            }
            CopyFate::NotStored(why) => {
                self.basic_requeue().await?;
                Err(inner.backend_error(format!(
                    "the retry of message {id} was not stored ({why}); the original was requeued unchanged instead"
                )))
            }
            CopyFate::Unknown(why) => {
                // Counted before the caller is told, whatever becomes of the original.
                bump(&inner.counters.copies_unconfirmed);
                let given_back = match self.basic_requeue().await {
                    Ok(()) => "the original was requeued unchanged instead of sending another copy, so it comes again at once".to_string(),
                    Err(requeue) => format!("the original could not be requeued ({requeue})"),
                };
                Err(inner.backend_error(format!(
                    "message {id} may come twice: its retry was not confirmed ({cause}; {why}), but RabbitMQ may have stored it all the same; {given_back}, and {}",
                    copy.may_come()
                )))
            }
        }
    }
}

/// Counts one original in `held_for_late_confirm` from its creation to its drop.
struct HeldForLateConfirm(Arc<Inner>);

impl HeldForLateConfirm {
    fn new(inner: Arc<Inner>) -> Self {
        inner
            .counters
            .held_for_late_confirm
            .fetch_add(1, Ordering::Relaxed);
        HeldForLateConfirm(inner)
    }
}

impl Drop for HeldForLateConfirm {
    fn drop(&mut self) {
        self.0
            .counters
            .held_for_late_confirm
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where a retry's copy went whose confirm did not come in time.
struct CopySent {
    /// To the retry queue, to come back after this delay; `None`: straight back to its queue.
    delay: Option<Duration>,
    /// Its attempt.
    attempt: u32,
}

impl CopySent {
    /// What happens to the copy once it is known to be stored.
    fn comes(&self) -> String {
        match self.delay {
            Some(delay) => format!(
                "the retry comes after {delay:?}, as attempt {}",
                self.attempt
            ),
            None => format!(
                "the copy sent straight back comes, as attempt {}",
                self.attempt
            ),
        }
    }

    /// What may happen to the copy when nobody knows whether it was stored.
    fn may_come(&self) -> String {
        match self.delay {
            Some(delay) => format!(
                "its retry may come too, after {delay:?}, as attempt {}",
                self.attempt
            ),
            None => format!(
                "the copy sent straight back may come too, as attempt {}",
                self.attempt
            ),
        }
    }
}

/// What became of a retry's copy whose confirm did not come within `confirm_timeout`.
enum CopyFate {
    /// RabbitMQ confirmed it (late): the copy carries the retry.
    Stored,
    /// RabbitMQ refused it, or returned it: not stored.
    NotStored(&'static str),
    /// Nobody will know: it may be stored.
    Unknown(&'static str),
}

impl CopyFate {
    /// Reads the late confirm (`Err`: it cannot come any more, its channel lost or the router
    /// closed). `earlier_frames`: an earlier frame of the copy went out on a channel lost before
    /// its confirm, and may be stored whatever the last one's confirm says.
    fn of(confirm: std::result::Result<Confirmed, ()>, earlier_frames: bool) -> CopyFate {
        match confirm {
            Ok(Confirmed::Ack { returned: false }) => CopyFate::Stored,
            Ok(Confirmed::Ack { returned: true } | Confirmed::Nack) if earlier_frames => {
                CopyFate::Unknown(
                    "RabbitMQ refused its last frame, but an earlier one went out on a channel lost before its confirm",
                )
            }
            Ok(Confirmed::Ack { returned: true }) => {
                CopyFate::NotStored("RabbitMQ returned it: its queue no longer exists")
            }
            Ok(Confirmed::Nack) => CopyFate::NotStored("RabbitMQ refused it with basic.nack"),
            Ok(Confirmed::TimedOut) => {
                CopyFate::Unknown("no confirm came within retry_hold_timeout either")
            }
            Err(()) => CopyFate::Unknown(
                "its publishing channel or connection was lost, or the router closed, before RabbitMQ confirmed it",
            ),
        }
    }
}

impl Acknowledge for AmqpAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        // The frame is queued at once while the connection's writer keeps up: then nothing needs
        // a future of its own. When there is no room yet, the attempt is dropped unsent (a bounded
        // channel's send that has not completed queues nothing) and the ack waits below.
        if self.consumer.is_current() {
            let queued = {
                let frame = self
                    .consumer
                    .channel
                    .basic_ack(BasicAckArguments::new(self.tag, false));
                let frame = std::pin::pin!(frame);
                frame.poll(&mut Context::from_waker(Waker::noop()))
            };
            if let Poll::Ready(Ok(())) = queued {
                self.progress.store(DONE, Ordering::Relaxed);
                bump(&self.inner().counters.acked);
                return agentcomm_core::router::ready_ok();
            }
        }
        // Asked for now: if this future is dropped before it is done, the ack is sent anyway.
        self.progress.store(ACKING, Ordering::Relaxed);
        Box::pin(async move { self.basic_ack().await })
    }

    fn nack(
        mut self: Box<Self>,
        envelope: Envelope,
        action: NackAction,
    ) -> BoxFuture<'static, Result<()>> {
        // Asked for now: if this future is dropped before it is done, the message is given back.
        self.progress.store(REQUEUING, Ordering::Relaxed);
        if matches!(action, NackAction::Retry { .. }) {
            self.copied = Some(envelope.id());
            // The original may be held for the copy's late confirm until RabbitMQ answers, for
            // up to `retry_hold_timeout` only (below RabbitMQ's consumer_timeout, which would
            // close the consumer's channel and send back all it holds). A hold that ended with
            // `publish_outage_timeout` multiplied a handler failing through a longer stall: the
            // original came back at its old attempt while its copy was stored all the same.
            let hold = self.inner().settings.retry_hold_timeout;
            self.late = Some(Box::new(LateConfirm::new(hold)));
        }
        Box::pin(async move {
            // Checked before scheduling a retry too: a retry of a stale delivery would be a
            // duplicate of its redelivery.
            if !self.consumer.is_current() {
                return Err(self.stale("give back"));
            }
            match action {
                NackAction::Retry { delay } => self.retry(envelope, delay).await,
                _ => self.basic_requeue().await,
            }
        })
    }

    fn abandon(self: Box<Self>, _envelope: Envelope) {
        // Given back by its drop (counted once, there), unless its channel is gone: then the broker
        // has put it back already.
        self.progress.store(REQUEUING, Ordering::Relaxed);
    }

    /// A quorum queue counts every requeue in `x-delivery-count`, and its delivery limit
    /// dead-letters a message requeued that often, whether or not a handler ever saw it. A delivery
    /// never requeued before is therefore given back as a copy sent to its own queue (a new message,
    /// with no count), and the original acknowledged once the copy is confirmed: the give-back
    /// counts nowhere (in `requeued` here). The copy waits at the back of the queue. One already
    /// requeued is requeued as before: a copy would also drop the requeues handlers did cause.
    ///
    /// Any other delivery is requeued, counted in `requeued`: it is not abandoned (no handler saw
    /// it), unlike a delivery dropped unsettled.
    fn give_back(mut self: Box<Self>, envelope: Envelope) {
        // Until it is requeued, or its copy confirmed, a drop (the task stopped by its runtime
        // shutting down) requeues it.
        self.progress.store(REQUEUING, Ordering::Relaxed);
        self.copied = Some(envelope.id());
        let runtime = self.inner().runtime.clone();
        runtime.spawn(async move {
            if !self.consumer.is_current() {
                // Its channel is gone: the broker has put it back already.
                return;
            }
            let Some(properties) = self.uncounted.as_deref() else {
                if let Err(error) = self.basic_requeue().await {
                    tracing::warn!(error = %error, "could not requeue a delivery given back unhandled; RabbitMQ delivers it again when its channel closes");
                }
                return;
            };
            let inner = self.inner();
            let queue = &self.consumer.state.queue;
            let copied = inner
                .give_back_copy(queue, &envelope, properties, &self.copy_out)
                .await;
            // Its publish is over: a failure that may have been stored is counted below.
            self.copy_out.store(false, Ordering::Relaxed);
            let copied = match copied {
                Ok(PublishOutcome::Unroutable) => Err(Unconfirmed::not_stored(
                    inner.backend_error(format!("the queue '{queue}' no longer exists")),
                )),
                Ok(_) => Ok(()),
                Err(failed) => Err(failed),
            };
            match copied {
                Ok(()) => {
                    self.progress.store(RETRY_SENT, Ordering::Relaxed);
                    let channel = &self.consumer.channel;
                    match self
                        .settle(
                            "acknowledge the given-back",
                            channel.basic_ack(BasicAckArguments::new(self.tag, false)),
                        )
                        .await
                    {
                        Ok(()) => bump(&inner.counters.requeued),
                        Err(error) => tracing::warn!(
                            queue = %queue,
                            message_id = %envelope.id(),
                            error = %error,
                            "a delivery given back unhandled was sent back to its queue as a copy, but the original could not be acknowledged: it will be delivered twice"
                        ),
                    }
                }
                Err(failed) if failed.maybe_stored => {
                    bump(&inner.counters.copies_unconfirmed);
                    tracing::warn!(
                        queue = %queue,
                        message_id = %envelope.id(),
                        error = %failed.error,
                        "a delivery given back unhandled was sent back to its queue as a copy that RabbitMQ did not confirm but may have stored all the same; requeuing the original instead (which RabbitMQ counts towards the delivery limit), so the message may come twice"
                    );
                    if let Err(error) = self.basic_requeue().await {
                        tracing::warn!(error = %error, "could not requeue a delivery given back unhandled; RabbitMQ delivers it again when its channel closes");
                    }
                }
                Err(failed) => {
                    tracing::warn!(
                        queue = %queue,
                        message_id = %envelope.id(),
                        error = %failed.error,
                        "could not send a delivery given back unhandled to its queue as a copy; requeuing it instead, which RabbitMQ counts towards the delivery limit"
                    );
                    if let Err(error) = self.basic_requeue().await {
                        tracing::warn!(error = %error, "could not requeue a delivery given back unhandled; RabbitMQ delivers it again when its channel closes");
                    }
                }
            }
        });
    }
}

impl Inner {
    /// Binds the queue of every subscription consuming now to its binding keys again, once the
    /// exchange was declared again after the broker said it was gone (404): deleting an exchange
    /// deletes every binding to it, and nothing else would restore them while the consumers live
    /// on. Bindings are idempotent, so those that were still there are left as they were. Each on
    /// the declaration channel, bounded by the operation timeout; one that fails (its queue was
    /// deleted too, say) is logged, and the others are still bound (a failed request retires the
    /// channel, and the next one opens another).
    /// `quiet`: a success is logged at debug level only (the periodic check).
    pub(crate) async fn rebind_subscriptions(&self, quiet: bool) {
        let subscriptions = self.consuming_subscriptions();
        let mut bound = std::collections::HashSet::new();
        for sub in &subscriptions {
            for key in &sub.spec.bindings {
                // Members of one group share a queue and often its keys.
                if !bound.insert((sub.spec.name.as_str(), key.as_str())) {
                    continue;
                }
                let bind = QueueBindArguments::new(&sub.spec.name, &self.settings.exchange, key);
                let what = format!("binding queue '{}' to '{key}' again", sub.spec.name);
                let wait = Wait::Not("a lost consumer binds its queue again once it is restored");
                let rebound = self
                    .with_op_channel(wait, async |op: &OpChannel| {
                        self.operation(&what, &op.reason, &op.channel, move |channel| async move {
                            channel.queue_bind(bind).await
                        })
                        .await
                    })
                    .await;
                if let Err(error) = rebound {
                    tracing::warn!(
                        queue = %sub.spec.name,
                        binding = %key,
                        error = %error,
                        "could not bind a subscription's queue again after its exchange was declared again; publishes may be unroutable until its consumer is restored"
                    );
                }
            }
        }
        if quiet {
            tracing::debug!(
                bindings = bound.len(),
                "bound the subscriptions' queues again"
            );
        } else if !bound.is_empty() {
            tracing::info!(
                bindings = bound.len(),
                "bound the subscriptions' queues again after declaring the exchange again"
            );
        }
    }

    /// The subscriptions open and consuming now.
    fn consuming_subscriptions(&self) -> Vec<Arc<SubShared>> {
        self.subscriptions
            .lock()
            .expect("subscriptions lock")
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .filter(|sub| !sub.is_closed() && sub.live.lock().expect("live lock").is_some())
            .collect()
    }

    /// Whether any subscription is open and consuming now.
    pub(crate) fn has_consuming_subscriptions(&self) -> bool {
        !self.consuming_subscriptions().is_empty()
    }

    /// Sends `envelope` to `queue` after `delay`: through a retry queue whose TTL is the delay's bucket
    /// and which dead-letters back to `queue` only (the default exchange, the queue's own name), so no
    /// other subscription gets a copy.
    /// A failure tells whether the retry queue may have the envelope all the same. `copy_out` is set
    /// while a frame of it that went out waits for its confirm.
    pub(crate) async fn schedule_retry(
        &self,
        queue: &str,
        envelope: &Envelope,
        delay: Duration,
        copy_out: &AtomicBool,
        late: Option<&LateConfirm>,
    ) -> std::result::Result<(), Unconfirmed> {
        let ttl = retry_bucket_ms(delay);
        if ttl == 0 {
            return self.requeue_now(queue, envelope, copy_out, late).await;
        }
        let name = retry_queue(queue, ttl);
        for _ in 0..2 {
            self.ensure_retry_queue(&name, queue, ttl)
                .await
                .map_err(Unconfirmed::not_stored)?;
            match self
                .publish_to_queue(envelope, &name, copy_out, late)
                .await?
            {
                PublishOutcome::Unroutable => {
                    // Returned: not stored.
                    copy_out.store(false, Ordering::Relaxed);
                    // The retry queue expired or was deleted since we declared it: declare it again.
                    self.retry_queues.lock().expect("retry lock").remove(&name);
                }
                _ => return Ok(()),
            }
        }
        Err(Unconfirmed::not_stored(self.backend_error(format!(
            "the retry queue '{name}' does not take messages (it was deleted as soon as it was declared?)"
        ))))
    }

    /// Sends `envelope` straight back to `queue` (the default exchange routes by queue name). A
    /// failure tells whether `queue` may have it all the same. `copy_out` is set while a frame of it
    /// that went out waits for its confirm.
    pub(crate) async fn requeue_now(
        &self,
        queue: &str,
        envelope: &Envelope,
        copy_out: &AtomicBool,
        late: Option<&LateConfirm>,
    ) -> std::result::Result<(), Unconfirmed> {
        match self
            .publish_to_queue(envelope, queue, copy_out, late)
            .await?
        {
            PublishOutcome::Unroutable => Err(Unconfirmed::not_stored(self.backend_error(
                format!("the queue '{queue}' no longer exists, so the retry has nowhere to go"),
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
        let wait = Wait::up_to(
            "publish_outage_timeout",
            self.settings.publish_outage_timeout,
        );
        self.with_op_channel(wait, async |op: &OpChannel| {
            self.operation(
                &format!("declaring retry queue '{name}'"),
                &op.reason,
                &op.channel,
                move |channel| async move { channel.queue_declare(declare).await },
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

#[cfg(test)]
mod tests {
    use super::*;
    use agentcomm_core::ChannelPattern;
    use agentcomm_core::router::{Router, SubscribeOptions};
    use agentcomm_testkit::proxy::{FaultProxy, loopback_address, url_through};

    /// What a retry's late confirm decides for the original: acknowledged only when the copy is
    /// known to be stored; requeued as not stored only when nothing else of it may be stored (an
    /// earlier frame sent on a channel lost before its confirm may be); given back as maybe coming
    /// twice whenever nobody can know.
    #[test]
    fn a_late_confirm_acknowledges_the_original_only_when_the_copy_is_known_stored() {
        let fate = |confirm, earlier| match CopyFate::of(confirm, earlier) {
            CopyFate::Stored => "stored",
            CopyFate::NotStored(_) => "not stored",
            CopyFate::Unknown(_) => "unknown",
        };
        let stored = Ok(Confirmed::Ack { returned: false });
        let returned = Ok(Confirmed::Ack { returned: true });
        assert_eq!(fate(stored, false), "stored");
        assert_eq!(fate(stored, true), "stored");
        assert_eq!(fate(returned, false), "not stored");
        assert_eq!(fate(Ok(Confirmed::Nack), false), "not stored");
        assert_eq!(fate(returned, true), "unknown");
        assert_eq!(fate(Ok(Confirmed::Nack), true), "unknown");
        assert_eq!(fate(Ok(Confirmed::TimedOut), false), "unknown");
        assert_eq!(fate(Err(()), false), "unknown");
    }

    /// A `nack(Retry)` cut short once the retry's copy went out (its caller's timeout, a `select!`,
    /// while the ack frame waits for a stalled connection's writer) leaves the original to its drop.
    /// When the channel the original came on is gone by then, RabbitMQ delivers the original again
    /// and the copy comes too: the message comes twice. The drop said nothing (a nack not cut short
    /// tells its caller). It now counts it in `stale` and warns, naming the message.
    ///
    /// In here, not in `tests/`: only a stalled writer with a full frame buffer (8,192 frames) keeps
    /// the ack frame from going out in the poll that sent the copy, which a test cannot bring about
    /// through the proxy. So the delivery's handle is set up as the cut-short nack leaves it, on a
    /// real consumer whose connection is then cut through the fault proxy.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retry_cut_short_on_a_channel_then_lost_is_counted_and_named() {
        let url = std::env::var(agentcomm_core::config::RABBITMQ_URL_VAR)
            .ok()
            .filter(|url| !url.trim().is_empty())
            .unwrap_or_else(|| agentcomm_core::config::DEFAULT_RABBITMQ_URL.to_string());
        let reachable = match loopback_address(&url, 5672) {
            Some(address) => tokio::net::TcpStream::connect(address).await.is_ok(),
            None => false,
        };
        if !reachable {
            agentcomm_testkit::broker_unavailable("no RabbitMQ on this machine");
            return;
        }
        let broker = loopback_address(&url, 5672).expect("the broker's address");
        let proxy = FaultProxy::start(broker).await.expect("proxy");
        let exchange = format!("t-retry-cut-lost-{}", uuid::Uuid::now_v7().simple());
        let bound = Duration::from_secs(20);
        let router = tokio::time::timeout(
            bound,
            crate::AmqpRouter::builder(url_through(&url, proxy.local_addr()))
                .exchange(&exchange)
                .without_dead_letter_queue()
                .reconnect(agentcomm_core::backoff::Backoff::new(
                    Duration::from_millis(50),
                    Duration::from_millis(500),
                ))
                .connect(),
        )
        .await
        .expect("connect in time")
        .expect("connect");
        let subscription = tokio::time::timeout(
            bound,
            router.subscribe(SubscribeOptions::new(
                ChannelPattern::parse("Ping:*:*").expect("pattern"),
            )),
        )
        .await
        .expect("subscribe in time")
        .expect("subscribe");
        let inner = router.inner.clone();
        let shared = inner
            .subscriptions
            .lock()
            .expect("subscriptions lock")
            .iter()
            .find_map(std::sync::Weak::upgrade)
            .expect("the subscription");
        let consumer = shared
            .live
            .lock()
            .expect("live lock")
            .clone()
            .expect("its consumer");
        // What a nack(Retry) cut short after its copy went out leaves behind.
        let id = MessageId::new();
        let mut handle = AmqpAck::new(consumer, 1);
        handle.copied = Some(id);
        handle.progress.store(RETRY_SENT, Ordering::Relaxed);
        let generation = shared.state.generation.load(Ordering::Acquire);
        proxy.cut_all();
        let deadline = Instant::now() + bound;
        while shared.state.generation.load(Ordering::Acquire) == generation {
            assert!(
                Instant::now() < deadline,
                "the consumer's loss went unnoticed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let stale = inner.counters.stale.load(Ordering::Relaxed);
        let logged = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer({
                let logged = logged.clone();
                move || Sink(logged.clone())
            })
            .finish();
        tracing::subscriber::with_default(subscriber, || drop(handle));
        let logged = String::from_utf8(logged.lock().expect("log lock").clone()).expect("utf-8");
        assert_eq!(inner.counters.stale.load(Ordering::Relaxed), stale + 1);
        assert!(
            logged.contains(&id.to_string()) && logged.contains("comes twice"),
            "{logged:?}"
        );
        drop(subscription);
        let _ = tokio::time::timeout(bound, router.close()).await;
        let _ = tokio::time::timeout(bound, delete_exchanges(&url, &exchange)).await;
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log lock").extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Deletes the test's exchange and its dead-letter exchange (what the router declared durable).
    async fn delete_exchanges(url: &str, exchange: &str) {
        let url = crate::url::AmqpUrl::parse("RABBITMQ_URL", url).expect("the broker URL");
        let mut arguments = amqprs::connection::OpenConnectionArguments::new(
            &url.host,
            url.port,
            &url.user,
            &url.password,
        );
        arguments.virtual_host(&url.vhost);
        let Ok(connection) = amqprs::connection::Connection::open(&arguments).await else {
            return;
        };
        if let Ok(channel) = connection.open_channel(None).await {
            for name in [exchange.to_string(), format!("{exchange}.dlx")] {
                let _ = channel
                    .exchange_delete(amqprs::channel::ExchangeDeleteArguments::new(&name))
                    .await;
            }
            let _ = channel.close().await;
        }
        let _ = connection.close().await;
    }
}
