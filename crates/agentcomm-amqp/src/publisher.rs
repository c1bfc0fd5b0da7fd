//! Publishing with confirms: one channel in confirm mode per connection, our own map of delivery tags
//! to waiters (amqprs has no per-publish future), multiple-acks, nacks and returns.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqprs::channel::{BasicPublishArguments, Channel, ConfirmSelectArguments};
use amqprs::{BasicProperties, CloseChannel};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use agentcomm_core::Envelope;
use agentcomm_core::error::{Error, Result};
use agentcomm_core::router::PublishOutcome;

use crate::link::{ChannelIds, Inner, LogLimiter, Role, Wait, bump};

/// What the broker said about one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Confirmed {
    /// basic.ack; `returned` when a basic.return (no queue bound) came first.
    Ack { returned: bool },
    /// basic.nack: the broker could not take responsibility for the message.
    Nack,
    /// No confirm within the confirm timeout (told by the publisher's sweeper).
    TimedOut,
}

/// A publish that failed: its error, and whether RabbitMQ may have stored the message all the same
/// (a frame of it went out and was neither confirmed nor refused: its confirm timed out, or its
/// channel was lost and sending it again failed). Then whoever sends it somewhere else instead
/// (a retry sent straight back, say) may make it come twice.
pub(crate) struct Unconfirmed {
    pub error: Error,
    pub maybe_stored: bool,
}

impl Unconfirmed {
    /// A failure before any frame of the message went out (a declaration refused, say).
    pub(crate) fn not_stored(error: Error) -> Self {
        Unconfirmed {
            error,
            maybe_stored: false,
        }
    }
}

/// How one publish's sends went so far: what RabbitMQ may have of its message, and the channels it
/// lost.
#[derive(Default)]
struct Sends {
    /// Frames of it that went out (queued to the connection's writer).
    sent: u32,
    /// The last one was refused (basic.nack, or its channel closed by a refusal): not stored. A
    /// refusal ends the publish, so only the last frame can have been refused.
    refused: bool,
    /// Times its channel was lost before the send or before the confirm.
    losses: u32,
    /// Its channel was lost after the send, and it was not sent again yet (then sending it again
    /// counts in `resent`).
    lost: bool,
}

impl Sends {
    /// A frame of `message` went out.
    fn went_out(&mut self, message: &Outgoing<'_>) {
        self.sent += 1;
        if let Some(went_out) = message.went_out {
            went_out.store(true, Ordering::Relaxed);
        }
        if self.sent > 1
            && let Some(late) = message.late
        {
            late.earlier_frames.store(true, Ordering::Relaxed);
        }
    }

    fn maybe_stored(&self) -> bool {
        self.sent > 1 || (self.sent == 1 && !self.refused)
    }
}

/// Where a message goes, and its id (to match basic.return with its publish).
pub(crate) struct Outgoing<'a> {
    exchange: &'a str,
    routing_key: &'a str,
    id: u128,
    /// The AMQP properties of the delivery this message is a copy of (a delivery given back
    /// unhandled, see [`Inner::give_back_copy`]): sent with them instead of agentcomm's own, and not
    /// counted as a publish (`published`, `confirmed`, `publish_failures`).
    copy_of: Option<&'a BasicProperties>,
    /// Set when a frame of it goes out (its caller, cut short, then knows RabbitMQ may store it).
    went_out: Option<&'a AtomicBool>,
    /// Where to hear of a confirm that comes after the publish timed out waiting for it (see
    /// [`LateConfirm`]); `None`: such a confirm is dropped, as for any publish.
    late: Option<&'a LateConfirm>,
}

/// What a caller that asks for it hears of the confirm of its message's last frame when that
/// confirm comes after `confirm_timeout` (the publish failed with a timeout by then, and the caller
/// was told): a retry holds its original delivery unacknowledged until it knows whether the copy was
/// stored, instead of guessing.
///
/// The receiver resolves with the late basic.ack (`Confirmed::Ack`, `returned` when no queue took
/// it) or basic.nack (`Confirmed::Nack`); with `Confirmed::TimedOut` when `hold` passed after the
/// timeout without either; and fails (sender dropped) when the channel or its connection is lost
/// first, or the router closes: then whether RabbitMQ stored the message cannot be known.
pub(crate) struct LateConfirm {
    /// How long past the publish's timeout the publisher keeps listening for the confirm.
    hold: Duration,
    /// The receiver of the last frame that went out, put there once the frame is queued.
    receiver: Mutex<Option<oneshot::Receiver<Confirmed>>>,
    /// More than one frame of the message went out (its channel was lost after a send, and it was
    /// sent again): an earlier one may be stored whatever the last one's confirm says.
    earlier_frames: AtomicBool,
}

impl LateConfirm {
    pub(crate) fn new(hold: Duration) -> Self {
        LateConfirm {
            hold,
            receiver: Mutex::new(None),
            earlier_frames: AtomicBool::new(false),
        }
    }

    /// The receiver of the last frame's late confirm (taken: at most once), and whether an earlier
    /// frame went out too.
    pub(crate) fn take(&self) -> Option<(oneshot::Receiver<Confirmed>, bool)> {
        let receiver = self.receiver.lock().expect("late confirm lock").take()?;
        Some((receiver, self.earlier_frames.load(Ordering::Relaxed)))
    }

    fn put(&self, receiver: oneshot::Receiver<Confirmed>) {
        *self.receiver.lock().expect("late confirm lock") = Some(receiver);
    }
}

impl Outgoing<'_> {
    /// What one send of `envelope` carries: [`content`], or for a copy the frame with the
    /// original's properties.
    fn content(&self, envelope: &Envelope, envelope_properties: bool) -> Result<Content> {
        match self.copy_of {
            None => content(envelope, envelope_properties),
            Some(properties) => {
                let mut properties = properties.clone();
                // The frame is encoded again: its content type says how, as the original's did.
                properties.with_content_type(frame_content_type(envelope));
                Ok((properties, envelope.to_frame()?))
            }
        }
    }
}

/// What one send of a message carries: its AMQP properties and the frame as body. Built once per
/// publish and moved into its first send; built again only for a resend after a lost channel.
type Content = (BasicProperties, Vec<u8>);

/// The AMQP `content_type` of an agentcomm frame.
pub(crate) fn frame_content_type(envelope: &Envelope) -> &'static str {
    if envelope.content_type() == agentcomm_core::codec::JSON_CONTENT_TYPE {
        "application/json"
    } else {
        "application/msgpack"
    }
}

/// The frame as body and the AMQP properties: persistent, the frame's content type, and with
/// `envelope_properties` the envelope's id, class, timestamp and correlation id for tooling.
fn content(envelope: &Envelope, envelope_properties: bool) -> Result<Content> {
    let body = envelope.to_frame()?;
    let mut properties = BasicProperties::default();
    properties
        .with_delivery_mode(amqprs::DELIVERY_MODE_PERSISTENT)
        .with_content_type(frame_content_type(envelope));
    if envelope_properties {
        let mut id = uuid::Uuid::encode_buffer();
        properties
            .with_message_id(envelope.id().as_uuid().hyphenated().encode_lower(&mut id))
            .with_timestamp(envelope.timestamp_ms() / 1000);
        // AMQP short strings hold 255 bytes; longer values stay in the frame only.
        if envelope.class().len() <= 255 {
            properties.with_message_type(envelope.class());
        }
        if let Some(correlation_id) = envelope.correlation_id().filter(|id| id.len() <= 255) {
            properties.with_correlation_id(correlation_id);
        }
    }
    Ok((properties, body))
}

struct Waiting {
    /// The envelope id, to match a basic.return (which carries the message, not its delivery tag).
    id: u128,
    /// Where it was sent ([`route`]): one envelope may go to several places at once, and only the
    /// copy sent where the return says was returned.
    route: u64,
    returned: bool,
    /// When the publish times out if no confirm came (for a waiter in [`Pending::late`]: when
    /// its caller is told that no confirm came within its hold either).
    deadline: Instant,
    waiter: oneshot::Sender<Confirmed>,
    /// Who hears of a confirm that comes after `deadline`, and how much longer it listens (see
    /// [`LateConfirm`]).
    late: Option<(oneshot::Sender<Confirmed>, Duration)>,
}

#[derive(Default)]
struct Pending {
    by_tag: BTreeMap<u64, Waiting>,
    /// Publishes that timed out and whose caller listens for a late confirm ([`LateConfirm`]),
    /// by delivery tag: settled by the confirms like the others, told `TimedOut` at their hold's
    /// end, and dropped (their caller learns the channel was lost) with the channel.
    late: BTreeMap<u64, Waiting>,
    /// The channel is gone: nothing may wait here any more. Kept under the same lock as the waiters,
    /// so that a publish never registers after [`Confirms::fail_all`] emptied the map.
    dead: bool,
}

/// A digest of the exchange and routing key a message was sent to, as a basic.return names them.
fn route(exchange: &str, routing_key: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    (exchange, routing_key).hash(&mut hasher);
    hasher.finish()
}

/// Where the publishing channels of a router report what happens to a publish whose caller stopped
/// waiting (its future dropped once the frame was sent): nobody else would count or log it.
#[derive(Default, Clone)]
pub(crate) struct Orphans {
    /// The router's `confirm_timeouts`.
    pub confirm_timeouts: Arc<AtomicU64>,
    /// The router's `abandoned_unconfirmed`: lost with their channel before the confirm.
    pub unconfirmed: Arc<AtomicU64>,
    /// The router's `unroutable`: returned (no queue was bound), then acked.
    pub unroutable: Arc<AtomicU64>,
    /// The router's limiters of warnings about such messages.
    pub log: Arc<OrphanLogs>,
}

/// One limiter of warnings per way a publish whose caller stopped waiting can end badly: a kind
/// logged often (say, messages returned unroutable every second) must not keep another kind (a
/// confirm that never came) out of the log, nor have its lines count the other's in
/// `earlier_not_logged`.
#[derive(Default)]
pub(crate) struct OrphanLogs {
    /// No confirm within `confirm_timeout` (`confirm_timeouts`).
    pub timed_out: LogLimiter,
    /// Lost with the channel before the confirm (`abandoned_unconfirmed`).
    pub channel_lost: LogLimiter,
    /// Returned: no queue was bound (`unroutable`).
    pub returned: LogLimiter,
    /// Refused by the broker with basic.nack (`publish_nacks`).
    pub nacked: LogLimiter,
    /// Every basic.nack the broker sends, whoever waits for it: a broker that nacks every publish (a
    /// disk alarm, a full queue with overflow=reject-publish) would otherwise log one line per nack.
    pub broker_nacks: LogLimiter,
}

/// Why RabbitMQ closed a publishing channel, when resending what was lost with it cannot succeed
/// for some of those publishes (unlike a 404 for a deleted exchange, which declaring the topology
/// again fixes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// 403 ACCESS_REFUSED: the user may not publish to `exchange` (`None`: the reply did not say
    /// which exchange; then every publish lost with the channel is taken as refused).
    AccessRefused { exchange: Option<String> },
    /// 406 PRECONDITION_FAILED: a message over the broker's `max_message_size` (`max` bytes).
    TooLarge { max: u64 },
}

impl Refusal {
    /// Reads a channel.close: `reply_code`, and `reply_text` as RabbitMQ words it ("ACCESS_REFUSED -
    /// access to exchange 'x' in vhost '/' refused for user 'u'", "PRECONDITION_FAILED - message size
    /// 200 is larger than configured max size 100").
    pub(crate) fn of(reply_code: u16, reply_text: &str) -> Option<Refusal> {
        match reply_code {
            403 => {
                let exchange = reply_text
                    .split_once("exchange '")
                    .and_then(|(_, rest)| rest.rsplit_once("' in vhost"))
                    .map(|(exchange, _)| exchange.to_string());
                Some(Refusal::AccessRefused { exchange })
            }
            406 => {
                let (_, rest) = reply_text.split_once("max size ")?;
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                Some(Refusal::TooLarge {
                    max: digits.parse().ok()?,
                })
            }
            _ => None,
        }
    }

    /// What becomes of the publishes lost with the channel, for the log.
    fn next_step(refusal: Option<&Refusal>, reply_code: u16) -> &'static str {
        match refusal {
            Some(Refusal::AccessRefused { .. }) => {
                "publishes to that exchange fail without being sent again (resending cannot succeed): grant the user write permission on it (rabbitmqctl set_permissions); other publishes lost with the channel are sent again"
            }
            Some(Refusal::TooLarge { .. }) => {
                "messages over max_message_size fail without being sent again (resending cannot succeed): send smaller messages, or raise max_message_size in rabbitmq.conf; other publishes lost with the channel are sent again"
            }
            None if reply_code == 404 => {
                "declaring the topology again (an exchange was deleted?), then sending again the publishes lost with the channel"
            }
            None => {
                "sending again the publishes lost with the channel (each at most 10 times), as the cause may be passing; if it repeats, the reply says what to fix on the broker"
            }
        }
    }
}

/// The confirm state of one publishing channel, shared with its amqprs callback.
#[derive(Default)]
pub(crate) struct Confirms {
    pending: Mutex<Pending>,
    /// A copy of `Pending::dead` for the lock-free check on every publish.
    dead: AtomicBool,
    reason: Mutex<Option<String>>,
    /// Set (before the waiters are failed) when the broker closed the channel for a reason resending
    /// cannot fix for some publishes.
    refusal: Mutex<Option<Refusal>>,
    /// Every delivery tag below this one was sent: stored by each send once its frame is queued
    /// (under the `pending` lock: see [`Confirms::sent`]). A waiter of a tag not below it belongs to a send dropped before
    /// its frame went out, whose caller knows it gave up: only the others can be lost unseen.
    sent_below: AtomicU64,
    orphans: Orphans,
    /// Set while the router's close waits for the confirms still owed here ([`Confirms::owed_until`]),
    /// so that only then does settling a confirm pay for a wake-up (one atomic load otherwise).
    draining: AtomicBool,
    /// Told, while `draining`, whenever waiters leave the map.
    settled: Notify,
}

impl Confirms {
    pub(crate) fn new(orphans: Orphans) -> Self {
        Confirms {
            orphans,
            ..Confirms::default()
        }
    }

    /// Tells every publish waiting past its deadline that it timed out. Deadlines mostly follow tag
    /// order, but not strictly (each is taken when its attempt starts, before it waits for its tag):
    /// every waiter is checked, which is cheap at one pass per tick.
    ///
    /// A publish whose caller had stopped waiting after its frame went out is told by nobody: it is
    /// counted in `confirm_timeouts` here, and logged (rate-limited) as maybe not stored.
    ///
    /// Whether a waiter's frame went out is decided under the lock that registers waiters and that
    /// the send path stores `sent_below` under ([`Confirms::sent`]), so it is the state of that one
    /// moment: the waiter of a send dropped before its frame went out (its tag not below
    /// `sent_below`, its receiver gone) is not counted, though a later send may reuse its tag and
    /// move `sent_below` past it right after; the waiter of a send still under way then (not below
    /// `sent_below`, its receiver there) is left for a later sweep, which sees whether its frame
    /// went out. That send is bounded by the same deadline by its caller.
    ///
    /// A timed-out publish whose frame went out and whose caller listens for a late confirm
    /// ([`LateConfirm`]) moves to [`Pending::late`], where the confirm still settles it, for its
    /// hold; at the hold's end its caller is told `TimedOut` there too.
    fn expire(&self, now: Instant) {
        let mut expired = Vec::new();
        let mut held_too_long = Vec::new();
        {
            let mut pending = self.pending.lock().expect("confirms lock");
            let sent_below = self.sent_below.load(Ordering::Acquire);
            let late: Vec<u64> = pending
                .by_tag
                .iter()
                .filter(|(tag, waiting)| {
                    waiting.deadline <= now && (**tag < sent_below || waiting.waiter.is_closed())
                })
                .map(|(tag, _)| *tag)
                .collect();
            for tag in late {
                let Some(mut waiting) = pending.by_tag.remove(&tag) else {
                    continue;
                };
                let sent = tag < sent_below;
                if sent
                    && let Some((listener, hold)) = waiting.late.take()
                    && !listener.is_closed()
                {
                    pending.late.insert(
                        tag,
                        Waiting {
                            id: waiting.id,
                            route: waiting.route,
                            returned: waiting.returned,
                            deadline: now + hold,
                            waiter: listener,
                            late: None,
                        },
                    );
                }
                expired.push((sent, waiting));
            }
            if !pending.late.is_empty() {
                let over: Vec<u64> = pending
                    .late
                    .iter()
                    .filter(|(_, waiting)| waiting.deadline <= now || waiting.waiter.is_closed())
                    .map(|(tag, _)| *tag)
                    .collect();
                held_too_long.extend(over.iter().filter_map(|tag| pending.late.remove(tag)));
            }
        }
        self.wake_drain();
        for waiting in held_too_long {
            // Its caller was told of the timeout already, and counted it.
            let _ = waiting.waiter.send(Confirmed::TimedOut);
        }
        let (mut orphaned, mut first) = (0, None);
        for (sent, waiting) in expired {
            if waiting.waiter.send(Confirmed::TimedOut).is_err() && sent {
                orphaned += 1;
                first.get_or_insert(waiting.id);
            }
        }
        if let Some(id) = first {
            self.orphans
                .confirm_timeouts
                .fetch_add(orphaned, Ordering::Relaxed);
            if let Some(left_out) = self.orphans.log.timed_out.allow(orphaned) {
                tracing::warn!(
                    messages = orphaned,
                    message_id = %uuid::Uuid::from_u128(id),
                    earlier_not_logged = left_out,
                    "RabbitMQ did not confirm messages within confirm_timeout, and their publishers had stopped waiting (the publish future was dropped after sending): they may not have been stored, and nobody will send them again; counted in confirm_timeouts"
                );
            }
        }
    }

    /// Settles the waiters of `tag` (and below it with `multiple`); a nack (`nacks` given) counts them
    /// there before any is told, since a caller told of its nack returns its error at once and may
    /// read health next. Returns how many had no caller waiting any more.
    ///
    /// The waiters are told while the lock that registers waiters is still held, so that a
    /// publish woken by this confirm cannot register its next message before every waiter of this
    /// confirm has been told. A multiple ack wakes many publishes one after the other; when they
    /// were told after the lock was released, the other Tokio worker took a woken publish, sent
    /// that caller's next message, found nothing else to run and went back to sleep in the I/O
    /// driver, and the next waiter told woke it again (an eventfd write and two context switches
    /// each time: 5,400-6,500 eventfd writes per 90,000 messages at 64 in flight, against about
    /// 1,400 for the bench's plain amqprs client, which tells its waiters under its lock, and for
    /// this code). Now that worker waits on this lock for the short time the waiters are told, and
    /// then finds them all ready to run. Telling a waiter only schedules its task (Tokio's waker
    /// never polls it from inside the wake), so no publish runs under this lock.
    fn settle(&self, tag: u64, multiple: bool, nacks: Option<&AtomicU64>) -> u64 {
        let mut done = Vec::new();
        let mut late_done = Vec::new();
        let mut pending = self.pending.lock().expect("confirms lock");
        if multiple {
            let later = pending.by_tag.split_off(&(tag + 1));
            let settled = std::mem::replace(&mut pending.by_tag, later);
            done.extend(settled.into_values());
        } else if let Some(waiting) = pending.by_tag.remove(&tag) {
            done.push(waiting);
        }
        if !pending.late.is_empty() {
            if multiple {
                let later = pending.late.split_off(&(tag + 1));
                let settled = std::mem::replace(&mut pending.late, later);
                late_done.extend(settled.into_values());
            } else if let Some(waiting) = pending.late.remove(&tag) {
                late_done.push(waiting);
            }
        }
        if let Some(nacks) = nacks {
            nacks.fetch_add((done.len() + late_done.len()) as u64, Ordering::Relaxed);
        }
        for waiting in late_done {
            let confirmed = match nacks {
                None => Confirmed::Ack {
                    returned: waiting.returned,
                },
                Some(_) => Confirmed::Nack,
            };
            // Its caller was told of the timeout, and counted it, already; one that stopped
            // listening since has nothing left to decide.
            let _ = waiting.waiter.send(confirmed);
        }
        let (mut orphaned, mut unroutable, mut first_unroutable, mut first_nacked) =
            (0, 0, None, None);
        for waiting in done {
            let confirmed = match nacks {
                None => Confirmed::Ack {
                    returned: waiting.returned,
                },
                Some(_) => Confirmed::Nack,
            };
            // The caller may have gone (its future dropped): nobody to tell.
            if waiting.waiter.send(confirmed).is_err() {
                orphaned += 1;
                match confirmed {
                    Confirmed::Ack { returned: true } => {
                        unroutable += 1;
                        first_unroutable.get_or_insert(waiting.id);
                    }
                    Confirmed::Nack => {
                        first_nacked.get_or_insert(waiting.id);
                    }
                    _ => {}
                }
            }
        }
        drop(pending);
        self.wake_drain();
        // Counted in `unroutable` here, as the caller would have counted it had it still waited (and
        // in `returned` when the return came); nobody else hears that it reached no queue.
        self.orphans
            .unroutable
            .fetch_add(unroutable, Ordering::Relaxed);
        if let Some(id) = first_unroutable
            && let Some(left_out) = self.orphans.log.returned.allow(unroutable)
        {
            tracing::warn!(
                messages = unroutable,
                message_id = %uuid::Uuid::from_u128(id),
                earlier_not_logged = left_out,
                "messages reached no queue (RabbitMQ returned them: nothing is bound for their routing key) after their publishers had stopped waiting: they are lost; counted in unroutable"
            );
        }
        // Counted in `publish_nacks` above; nobody else hears that the broker refused them.
        if let Some(id) = first_nacked
            && let Some(left_out) = self.orphans.log.nacked.allow(orphaned)
        {
            tracing::warn!(
                messages = orphaned,
                message_id = %uuid::Uuid::from_u128(id),
                earlier_not_logged = left_out,
                "RabbitMQ refused messages (basic.nack) whose publishers had stopped waiting for the confirm: they are lost; counted in publish_nacks"
            );
        }
        orphaned
    }

    /// Settles the waiters of a basic.nack and counts them in `nacks`; returns how many had no caller
    /// waiting any more.
    fn nacked(&self, tag: u64, multiple: bool, nacks: &AtomicU64) -> u64 {
        self.settle(tag, multiple, Some(nacks))
    }

    /// A basic.nack came from the broker: logged (at most one line per 5 s, with how many were left
    /// out since the last), then settled with [`Confirms::nacked`].
    fn broker_nacked(&self, tag: u64, multiple: bool, nacks: &AtomicU64) -> u64 {
        if let Some(left_out) = self.orphans.log.broker_nacks.allow(1) {
            tracing::warn!(
                delivery_tag = tag,
                multiple,
                earlier_not_logged = left_out,
                "RabbitMQ nacked a publish (it could not take responsibility for the message: a disk or memory alarm, a full queue with overflow=reject-publish, an internal error); counted in publish_nacks"
            );
        }
        self.nacked(tag, multiple, nacks)
    }

    /// Marks the publish of envelope `id` to `route` as returned (no queue was bound). Returns come
    /// rarely, in publish order and before their ack: the first waiting publish of that id to that
    /// exchange and routing key not yet returned is this one. (A scan of what waits, rather than an
    /// index kept on every publish.) The route counts: a copy of the same envelope sent elsewhere
    /// with a smaller tag may still wait for its own confirm (a queue storing it) when this return
    /// comes.
    ///
    /// The oldest across both maps: a publish held for its late confirm ([`Pending::late`]) may
    /// have a smaller tag than one of the same id and route still waiting in time (a redelivered
    /// original retried again), and marking the newer one made the held copy's ack read as stored.
    fn returned(&self, id: u128, route: u64) -> bool {
        let mut guard = self.pending.lock().expect("confirms lock");
        let pending = &mut *guard;
        let matches = |waiting: &&mut Waiting| {
            waiting.id == id && waiting.route == route && !waiting.returned
        };
        let in_time = pending.by_tag.iter_mut().find(|(_, w)| matches(w));
        let held = pending.late.iter_mut().find(|(_, w)| matches(w));
        let oldest = match (in_time, held) {
            (Some(in_time), Some(held)) if held.0 < in_time.0 => Some(held.1),
            (Some(in_time), _) => Some(in_time.1),
            (None, held) => held.map(|(_, waiting)| waiting),
        };
        match oldest {
            Some(waiting) => {
                waiting.returned = true;
                true
            }
            None => false,
        }
    }

    /// Every tag below `below` was sent: stored under the waiters' lock, so that the sweeper reads
    /// it consistently with the waiters it takes ([`Confirms::expire`]).
    fn sent(&self, below: u64) {
        let _pending = self.pending.lock().expect("confirms lock");
        self.sent_below.store(below, Ordering::Release);
    }

    /// Registers the waiter of delivery tag `tag`, unless the channel is gone.
    #[cfg(test)]
    fn register(
        &self,
        tag: u64,
        id: u128,
        route: u64,
        deadline: Instant,
        waiter: oneshot::Sender<Confirmed>,
    ) -> bool {
        self.register_with_late(tag, id, route, deadline, waiter, None)
    }

    /// Registers the waiter of delivery tag `tag`, and who hears of its confirm if it comes after
    /// `deadline` (for how long), unless the channel is gone.
    fn register_with_late(
        &self,
        tag: u64,
        id: u128,
        route: u64,
        deadline: Instant,
        waiter: oneshot::Sender<Confirmed>,
        late: Option<(oneshot::Sender<Confirmed>, Duration)>,
    ) -> bool {
        let mut pending = self.pending.lock().expect("confirms lock");
        if pending.dead {
            return false;
        }
        pending.by_tag.insert(
            tag,
            Waiting {
                id,
                route,
                returned: false,
                deadline,
                waiter,
                late,
            },
        );
        true
    }

    /// The channel is gone: every waiter learns it by its sender being dropped, and sends again; later
    /// publishes find the channel dead and use the next one.
    ///
    /// A publish whose caller had stopped waiting after its frame went out is sent again by nobody:
    /// it is counted in `abandoned_unconfirmed` here, and logged (rate-limited) as maybe not stored.
    pub(crate) fn fail_all(&self, reason: &str) {
        self.reason
            .lock()
            .expect("confirms lock")
            .get_or_insert_with(|| reason.to_string());
        // The callers listening for a late confirm learn that the channel was lost as their
        // senders drop, with these.
        let (waiting, _late) = {
            let mut pending = self.pending.lock().expect("confirms lock");
            pending.dead = true;
            self.dead.store(true, Ordering::Release);
            (
                std::mem::take(&mut pending.by_tag),
                std::mem::take(&mut pending.late),
            )
        };
        self.wake_drain();
        // Once the channel is dead no tag is registered again, so `sent_below` passes a waiter's tag
        // after this only when the send that registered that waiter still sends its frame. Read
        // after the waiter was seen abandoned, not before: a send that completed and was then
        // abandoned in between was sent, and is lost unseen.
        let mut orphans = waiting.iter().filter(|(tag, waiting)| {
            waiting.waiter.is_closed() && **tag < self.sent_below.load(Ordering::Acquire)
        });
        let first = orphans.next().map(|(_, waiting)| waiting.id);
        let orphaned = first.map_or(0, |_| 1 + orphans.count() as u64);
        drop(waiting);
        if let Some(id) = first {
            self.orphans
                .unconfirmed
                .fetch_add(orphaned, Ordering::Relaxed);
            if let Some(left_out) = self.orphans.log.channel_lost.allow(orphaned) {
                tracing::warn!(
                    messages = orphaned,
                    message_id = %uuid::Uuid::from_u128(id),
                    earlier_not_logged = left_out,
                    reason,
                    "the publishing channel was lost before RabbitMQ confirmed messages whose publishers had stopped waiting (the publish future was dropped after sending): they may not have been stored, and nobody will send them again; counted in abandoned_unconfirmed"
                );
            }
        }
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Tells a close waiting in [`Confirms::owed_until`] that waiters left the map.
    fn wake_drain(&self) {
        if self.draining.load(Ordering::SeqCst) {
            self.settled.notify_waiters();
        }
    }

    /// How many frames sent on this channel still wait for their confirm, including those whose
    /// caller listens for a late one (a retry holding its original until it knows). A waiter left
    /// by a send dropped before its frame went out (its tag not below `sent_below`) is owed nothing.
    fn owed(&self) -> usize {
        let pending = self.pending.lock().expect("confirms lock");
        let sent_below = self.sent_below.load(Ordering::Acquire);
        pending.by_tag.range(..sent_below).count() + pending.late.len()
    }

    /// Waits until no frame sent on this channel waits for its confirm, or `deadline`; returns how
    /// many still do. For the router's close: a publish whose caller stopped waiting once its frame
    /// went out is not under way, yet its confirm is owed, and failing the channel before it comes
    /// would report as maybe not stored (`abandoned_unconfirmed`) a message the broker has.
    pub(crate) async fn owed_until(&self, deadline: Instant) -> usize {
        self.draining.store(true, Ordering::SeqCst);
        loop {
            let settled = self.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            let owed = self.owed();
            if owed == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, settled).await.is_err() {
                return self.owed();
            }
        }
    }

    pub(crate) fn reason(&self) -> Option<String> {
        self.reason.lock().expect("confirms lock").clone()
    }

    pub(crate) fn refusal(&self) -> Option<Refusal> {
        self.refusal.lock().expect("confirms lock").clone()
    }

    pub(crate) fn unconfirmed(&self) -> usize {
        self.pending.lock().expect("confirms lock").by_tag.len()
    }
}

/// The amqprs callback of a publishing channel.
struct ConfirmCallback {
    confirms: Arc<Confirms>,
    returns: Arc<AtomicU64>,
    nacks: Arc<AtomicU64>,
    /// Its connection's channel ids, one of which is lost when the broker closes the channel.
    ids: Arc<ChannelIds>,
}

#[async_trait::async_trait]
impl amqprs::callbacks::ChannelCallback for ConfirmCallback {
    async fn close(
        &mut self,
        _channel: &Channel,
        close: CloseChannel,
    ) -> std::result::Result<(), amqprs::error::Error> {
        let (code, text) = (close.reply_code(), close.reply_text());
        let reason = format!("the broker closed the publishing channel: {code} {text}");
        let refusal = Refusal::of(code, text);
        tracing::warn!(
            reply_code = code,
            reply_text = %text,
            next = Refusal::next_step(refusal.as_ref(), code),
            "RabbitMQ closed the publishing channel"
        );
        // Before the waiters are failed: each reads it as it learns its channel was lost.
        *self.confirms.refusal.lock().expect("confirms lock") = refusal;
        self.confirms.fail_all(&reason);
        self.ids.closed_by_broker();
        Ok(())
    }

    async fn cancel(
        &mut self,
        _channel: &Channel,
        _cancel: amqprs::Cancel,
    ) -> std::result::Result<(), amqprs::error::Error> {
        Ok(())
    }

    async fn flow(
        &mut self,
        _channel: &Channel,
        active: bool,
    ) -> std::result::Result<bool, amqprs::error::Error> {
        Ok(active)
    }

    async fn publish_ack(&mut self, _channel: &Channel, ack: amqprs::Ack) {
        let _ = self
            .confirms
            .settle(ack.delivery_tag(), ack.mutiple(), None);
    }

    async fn publish_nack(&mut self, _channel: &Channel, nack: amqprs::Nack) {
        // Counted here, not by the publishes told of it: one whose caller stopped waiting is lost
        // too, and nobody else would count it (nor log it: `settle` does, with its message id).
        self.confirms
            .broker_nacked(nack.delivery_tag(), nack.multiple(), &self.nacks);
    }

    async fn publish_return(
        &mut self,
        _channel: &Channel,
        ret: amqprs::Return,
        properties: BasicProperties,
        content: Vec<u8>,
    ) {
        self.returns.fetch_add(1, Ordering::Relaxed);
        // The envelope id: from the message id property, else from the frame itself.
        let id = properties
            .message_id()
            .and_then(|id| uuid::Uuid::try_parse(id).ok())
            .map(|id| id.as_u128())
            .or_else(|| {
                Envelope::from_frame(&content)
                    .ok()
                    .map(|envelope| envelope.id().as_uuid().as_u128())
            });
        let route = route(ret.exchange(), ret.routing_key());
        if !id.is_some_and(|id| self.confirms.returned(id, route)) {
            tracing::debug!(
                routing_key = %ret.routing_key(),
                reply = %ret.reply_text(),
                "a returned message matched no waiting publish"
            );
        }
    }
}

/// Fails a channel's waiters when dropped (see the sweeper in [`Publisher::open`]).
struct FailOnDrop(std::sync::Weak<Confirms>);

impl Drop for FailOnDrop {
    fn drop(&mut self) {
        if let Some(confirms) = self.0.upgrade() {
            confirms.fail_all(
                "the task that times out confirms stopped (the runtime that opened the channel shut down)",
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

impl Publisher {
    /// Opens a channel on `connection`, puts it in confirm mode, registers the callback and starts
    /// the sweeper that times out publishes whose confirm has not come by their deadline (checked
    /// every eighth of `confirm_timeout`, between 10 ms and 1 s: one timer per channel, not per
    /// publish). Both on `runtime`, the router's (see [`Inner::runtime`]), not the caller's.
    async fn open(
        runtime: &tokio::runtime::Handle,
        live: &crate::link::Live,
        timeout: Duration,
        confirm_timeout: Duration,
        returns: Arc<AtomicU64>,
        nacks: Arc<AtomicU64>,
        orphans: Orphans,
    ) -> std::result::Result<Arc<Self>, String> {
        // On a task of its own (as `crate::link::detached` does, on the router's runtime: amqprs
        // spawns the channel's dispatcher where the channel opens): the publish that opens the
        // channel may be dropped by its caller, and a channel.open or confirm.select cut short
        // panics amqprs. A channel that opens after the timeout is dropped by the task, which
        // closes it.
        let connection = live.connection.clone();
        let generation = live.generation;
        let ids = live.ids.clone();
        let setup = runtime.spawn(async move {
            let channel = connection.open_channel(None).await.map_err(|e| {
                ids.check_open_error(&connection, &e);
                format!("could not open a publishing channel: {e}")
            })?;
            let confirms = Arc::new(Confirms::new(orphans));
            channel
                .register_callback(ConfirmCallback {
                    confirms: confirms.clone(),
                    returns,
                    nacks,
                    ids,
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
        });
        let publisher = match tokio::time::timeout(timeout, setup).await {
            Ok(Ok(opened)) => opened?,
            Ok(Err(error)) => {
                return Err(format!(
                    "opening a publishing channel ended early (the router's runtime is shutting down?): {error}"
                ));
            }
            Err(_) => {
                return Err(format!(
                    "opening a publishing channel took more than {timeout:?}"
                ));
            }
        };
        let confirms = Arc::downgrade(&publisher.confirms);
        let every = (confirm_timeout / 8).clamp(Duration::from_millis(10), Duration::from_secs(1));
        runtime.spawn(async move {
            // The sweeper is all that bounds a wait for a confirm: if it stops for any reason but
            // the channel's end (its runtime shut down, with amqprs's dispatcher for this channel),
            // the channel is failed, so its waiters resend on a new one instead of waiting forever.
            let _fail_on_exit = FailOnDrop(confirms.clone());
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(confirms) = confirms.upgrade() else {
                    return;
                };
                if confirms.is_dead() {
                    return;
                }
                confirms.expire(Instant::now());
            }
        });
        Ok(publisher)
    }

    /// Whether the channel can still be used.
    pub(crate) fn is_alive(&self) -> bool {
        !self.confirms.is_dead() && self.channel.is_open() && self.channel.is_connection_open()
    }

    /// Sends `message` (mandatory, so an unroutable one is returned). `Some(tag, receiver)`: the
    /// receiver resolves with the broker's confirm, or fails when the channel is lost first. `None`:
    /// the channel is gone and nothing was sent.
    ///
    /// Unbounded by itself (queuing the frame waits only while the connection's writer is stalled,
    /// which its heartbeat ends): the caller bounds it by `deadline`, which is also when the sweeper
    /// gives up on the confirm.
    ///
    /// An `async` block rather than an `async fn`: an `async fn` copies its arguments into locals
    /// of its own, which would hold the message's properties (400 bytes) twice in this future, and
    /// in every publish's.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn would hold the properties twice"
    )]
    fn send<'a>(
        &'a self,
        message: &'a Outgoing<'a>,
        content: Content,
        deadline: Instant,
    ) -> impl Future<Output = Option<(u64, oneshot::Receiver<Confirmed>)>> + 'a {
        async move {
            let mut next_tag = self.next_tag.lock().await;
            if !self.is_alive() {
                return None;
            }
            let tag = *next_tag;
            let (sender, receiver) = oneshot::channel();
            let (late, mut late_receiver) = match message.late {
                Some(slot) => {
                    let (sender, receiver) = oneshot::channel();
                    (Some((sender, slot.hold)), Some(receiver))
                }
                None => (None, None),
            };
            // Registered before sending: the ack may come back before basic_publish returns.
            let route = route(message.exchange, message.routing_key);
            if !self
                .confirms
                .register_with_late(tag, message.id, route, deadline, sender, late)
            {
                return None;
            }
            let mut arguments = BasicPublishArguments::new(message.exchange, message.routing_key);
            arguments.mandatory(true);
            // If this future is dropped (the caller's deadline) before the frame is queued, the
            // frame is not sent and the tag stays unused: the next publish registers it again,
            // replacing this entry (whose waiter is gone).
            match self
                .channel
                .basic_publish(content.0, content.1, arguments)
                .await
            {
                Ok(()) => {
                    *next_tag += 1;
                    self.confirms.sent(*next_tag);
                    if let (Some(slot), Some(late)) = (message.late, late_receiver.take()) {
                        slot.put(late);
                    }
                    Some((tag, receiver))
                }
                Err(error) => {
                    self.confirms
                        .fail_all(&format!("the connection failed while publishing: {error}"));
                    None
                }
            }
        }
    }

    /// Fails what still waits for a confirm and closes the channel (bounded).
    pub(crate) async fn close(&self, inner: &Inner) {
        self.confirms.fail_all("the router closed");
        inner.close_channel(self.channel.clone()).await;
    }
}

/// How many times one publish is sent again after losing its channel before it fails.
const MAX_RESENDS: u32 = 10;

/// What one attempt of a publish came to.
enum Attempt {
    Confirmed(Confirmed),
    /// The channel was gone before sending: send on the next one.
    NotSent,
    /// The channel was lost after sending, before the confirm: send again.
    Lost,
    TimedOut,
}

impl Attempt {
    /// The send's result: the confirm to wait for, or what the attempt already came to.
    fn sent(
        sent: std::result::Result<
            Option<(u64, oneshot::Receiver<Confirmed>)>,
            tokio::time::error::Elapsed,
        >,
    ) -> std::result::Result<oneshot::Receiver<Confirmed>, Attempt> {
        match sent {
            Ok(Some((_, confirm))) => Ok(confirm),
            Ok(None) => Err(Attempt::NotSent),
            // Not queued: the send was dropped before its frame went to the writer. A waiter it
            // registered is left to the sweeper.
            Err(_) => Err(Attempt::TimedOut),
        }
    }

    /// The confirm's result: a sender dropped unanswered means the channel was lost.
    fn confirmed(confirm: std::result::Result<Confirmed, oneshot::error::RecvError>) -> Attempt {
        match confirm {
            Ok(confirmed) => Attempt::Confirmed(confirmed),
            Err(_) => Attempt::Lost,
        }
    }
}

/// Counts a publish in one of [`Inner`]'s counters until dropped (finished or cancelled); when the
/// count falls to zero, `emptied` (if any) is told.
struct Counted<'a> {
    count: &'a AtomicU64,
    emptied: Option<&'a Notify>,
}

impl<'a> Counted<'a> {
    fn new(count: &'a AtomicU64, emptied: Option<&'a Notify>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Counted { count, emptied }
    }

    /// A publish in flight: close waits for them.
    fn in_flight(inner: &'a Inner) -> Self {
        Counted::new(&inner.publishes_in_flight, Some(&inner.publishes_done))
    }

    /// A publish waiting to be sent again (its channel lost before the confirm): until sent again (its
    /// confirm then waits on the new channel), or finished, or cancelled.
    fn to_resend(inner: &'a Inner) -> Self {
        Counted::new(&inner.publishes_to_resend, None)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(emptied) = self.emptied
        {
            emptied.notify_waiters();
        }
    }
}

impl Inner {
    /// Publishes whose confirm is owed: those waiting for it on the current channel (including
    /// some whose caller has gone), and those whose channel was lost first, waiting to be sent
    /// again (through an outage, too).
    pub(crate) fn unconfirmed(&self) -> u64 {
        let waiting = self
            .publisher
            .lock()
            .expect("publisher lock")
            .as_ref()
            .map_or(0, |publisher| publisher.confirms.unconfirmed() as u64);
        waiting + self.publishes_to_resend.load(Ordering::Acquire)
    }

    /// The publishing channel of the live publishing connection (opened at connect, and on demand
    /// after a reconnect or a channel lost). Waiting for the
    /// connection (an outage) is bounded by `outage`, set when this publish first finds the
    /// connection down to `publish_outage_timeout` from then (and cleared by its caller once the
    /// publish was sent, so that a later outage gets the whole bound too): opening the channel on a
    /// live connection, or waiting for a confirm, is not an outage. Work on a live connection
    /// (opening the channel, and declaring the topology again first after the broker closed one) is
    /// bounded by the operation timeout of each step, however short the outage bound: a publish may
    /// be told to fail at once during an outage, and must still open a channel when the broker is
    /// there.
    async fn publisher_for(&self, outage: &mut Option<Wait>) -> Result<Arc<Publisher>> {
        if let Some(publisher) = self.live_publisher() {
            return Ok(publisher);
        }
        let started = Instant::now();
        // The wait for the connection ends by its own deadline, within the outage bound; this one
        // also covers the work on the connection once it is there.
        let bound =
            started + self.settings.publish_outage_timeout + self.settings.operation_timeout * 2;
        // Boxed: the slow path's state is large, and would otherwise make every publish's future
        // (moved into a box per publish by the Router trait) as large.
        let opening = Box::pin(self.open_publisher(outage));
        match tokio::time::timeout_at(bound, opening).await {
            Ok(result) => result,
            Err(_) => Err(self.connection_error(format!(
                "no publishing channel could be opened within {:?} (the connection is up but RabbitMQ does not answer in time)",
                bound - started
            ))),
        }
    }

    /// Opens the publishing channel once the router has connected, so that its first publishes do
    /// not wait for it: opening it (channel.open, confirm.select, the broker's set-up of the
    /// channel) is two round trips, and every publish started meanwhile waited behind it. In the
    /// payments bench at 64 in flight, the first 64 messages took a median 2.6 ms more than the
    /// round's median latency (plain amqprs: 0.2 ms); at 1 in flight the first message took
    /// 1.95 ms, against 0.39 ms with the channel opened here. If it cannot be opened now (the
    /// connection was lost again at once, the broker does not answer in time), the first publish
    /// opens it as after a reconnect, and reports what fails then.
    pub(crate) async fn open_publisher_at_connect(&self) {
        // No outage to wait out: the connection was made just now.
        let mut outage = Some(Wait::Not(
            "the publishing channel is opened at connect only on a live connection",
        ));
        let bound = self.settings.operation_timeout * 2;
        let opened = tokio::time::timeout(bound, self.open_publisher(&mut outage)).await;
        let error = match opened {
            Ok(Ok(_)) => return,
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("not opened within {bound:?}"),
        };
        tracing::debug!(error = %error, "the publishing channel was not opened at connect; the first publish opens it");
    }

    async fn open_publisher(&self, outage: &mut Option<Wait>) -> Result<Arc<Publisher>> {
        let link = &self.publishing;
        loop {
            if self.is_stopping() {
                return Err(Self::closed_unconfirmed_error());
            }
            let generation = link.connected.load(Ordering::Acquire);
            if generation == 0 {
                let bound = self.settings.publish_outage_timeout;
                let wait =
                    *outage.get_or_insert_with(|| Wait::up_to("publish_outage_timeout", bound));
                self.wait_connected(Role::Publishing, wait).await?;
                continue;
            }
            if let Some(publisher) = self.current_publisher(generation) {
                return Ok(publisher);
            }
            let opening = self.opening_publisher.lock().await;
            // Another publish may have opened it while this one waited.
            if let Some(publisher) = self.current_publisher(generation) {
                return Ok(publisher);
            }
            if let Some(live) = link.live(generation) {
                let previous = self.publisher.lock().expect("publisher lock").clone();
                if let Some(previous) = previous.filter(|p| p.generation == generation) {
                    // The broker closed the channel on a live connection: a deleted exchange
                    // (404) is the usual cause, so declare the topology again first. Not after a
                    // refusal (403 ACCESS_REFUSED, 406 over max_message_size): it concerned one
                    // publish, and no declaration fixes it.
                    let redeclare = previous.confirms.refusal().is_none();
                    tracing::warn!(
                        reason = ?previous.confirms.reason(),
                        topology = if redeclare {
                            "declared again first"
                        } else {
                            "not declared again (the broker refused a publish, which declaring cannot fix)"
                        },
                        "reopening the publishing channel"
                    );
                    if redeclare {
                        // Deleting an exchange deleted the bindings of the subscriptions' queues
                        // to it too: without them, every publish from now on would be unroutable
                        // while the subscribers wait for ever. So they are bound again too.
                        self.redeclare_and_rebind(false).await;
                    }
                }
                match Publisher::open(
                    &self.runtime,
                    &live,
                    self.settings.operation_timeout,
                    self.settings.confirm_timeout,
                    self.counters.returned.clone(),
                    self.counters.publish_nacks.clone(),
                    Orphans {
                        confirm_timeouts: self.counters.confirm_timeouts.clone(),
                        unconfirmed: self.counters.abandoned_unconfirmed.clone(),
                        unroutable: self.counters.unroutable.clone(),
                        log: self.orphans_log.clone(),
                    },
                )
                .await
                {
                    Ok(publisher) => {
                        let mut slot = self.publisher.lock().expect("publisher lock");
                        // Stored only while its connection is still the live one, under the lock
                        // `on_lost` takes after clearing `connected`: no publisher outlives its
                        // connection without its waiters being failed. Nor after close set `stop`
                        // (then takes the slot under this lock): it would be left open after close.
                        if self.is_stopping() {
                            drop(slot);
                            publisher.confirms.fail_all("the router closed");
                            return Err(Self::closed_unconfirmed_error());
                        }
                        if link.connected.load(Ordering::Acquire) == generation {
                            if let Some(replaced) = slot.replace(publisher.clone()) {
                                replaced
                                    .confirms
                                    .fail_all("the publishing channel was replaced");
                            }
                            return Ok(publisher);
                        }
                        drop(slot);
                        publisher.confirms.fail_all("the connection was lost");
                    }
                    Err(error) if live.connection.is_open() => {
                        return Err(self.backend_error(error));
                    }
                    Err(_) => {}
                }
            }
            drop(opening);
            // The connection died and the supervisor has not seen it yet: do not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The publishing channel, when the publishing connection is up and its channel open.
    fn live_publisher(&self) -> Option<Arc<Publisher>> {
        let generation = self.publishing.connected.load(Ordering::Acquire);
        if generation == 0 {
            return None;
        }
        self.current_publisher(generation)
    }

    fn current_publisher(&self, generation: u64) -> Option<Arc<Publisher>> {
        self.publisher
            .lock()
            .expect("publisher lock")
            .as_ref()
            .filter(|p| p.generation == generation && p.is_alive())
            .cloned()
    }

    /// One send of `message`, bounded with its confirm by one confirm timeout from now: the send by
    /// this timer (armed only when it cannot complete at once: the writer is stalled or other sends
    /// queue), the confirm by the publisher's sweeper, which checks every eighth of the timeout.
    /// Awaited where the attempt is made, then the confirm with [`Attempt::sent`] and
    /// [`Attempt::confirmed`]: no future of its own around both, which would be one more layer
    /// copied with every publish's future.
    fn sending<'a>(
        &self,
        publisher: &'a Publisher,
        message: &'a Outgoing<'a>,
        content: Content,
    ) -> tokio::time::Timeout<impl Future<Output = Option<(u64, oneshot::Receiver<Confirmed>)>> + 'a>
    {
        let deadline = Instant::now() + self.settings.confirm_timeout;
        tokio::time::timeout_at(deadline, publisher.send(message, content, deadline))
    }

    /// What a publish makes of one attempt: `Some` result when the publish is over, `None` when its
    /// channel was lost before the send or before the confirm and it is to be sent again (at most
    /// [`MAX_RESENDS`] times).
    fn conclude(
        &self,
        outcome: Attempt,
        envelope: &Envelope,
        message: &Outgoing<'_>,
        publisher: &Publisher,
        sends: &mut Sends,
    ) -> Option<Result<PublishOutcome>> {
        let routing_key = message.routing_key;
        match outcome {
            Attempt::Confirmed(Confirmed::Ack { returned }) => {
                if message.copy_of.is_none() {
                    bump(&self.counters.confirmed);
                }
                if returned {
                    bump(&self.counters.unroutable);
                    return Some(Ok(PublishOutcome::Unroutable));
                }
                Some(Ok(PublishOutcome::Accepted))
            }
            // Counted in `publish_nacks` where the nack was read.
            Attempt::Confirmed(Confirmed::Nack) => {
                sends.refused = true;
                Some(Err(self.backend_error(format!(
                    "RabbitMQ refused message {} on '{routing_key}' (basic.nack: it could not take responsibility for it, e.g. a full queue with overflow=reject-publish or an internal error); publish it again later",
                    envelope.id()
                ))))
            }
            // Close gave up waiting for this confirm and failed the channel (`stop` is set before
            // it does): the caller gets the error close promised, and nothing is sent again on a
            // connection being closed.
            Attempt::Lost | Attempt::NotSent if self.is_stopping() => {
                Some(Err(Self::closed_unconfirmed_error()))
            }
            Attempt::Lost | Attempt::NotSent => {
                // Sent on a channel the broker closed for a reason resending cannot fix for it.
                if matches!(outcome, Attempt::Lost)
                    && let Some(error) = self.refused(publisher, envelope, message)
                {
                    sends.refused = true;
                    return Some(Err(error));
                }
                // The broker may or may not have it: send it again (at-least-once).
                sends.losses += 1;
                if sends.losses > MAX_RESENDS {
                    return Some(Err(self.backend_error(format!(
                        "message {} on '{routing_key}' was not confirmed: its channel was lost {} times ({})",
                        envelope.id(),
                        sends.losses,
                        publisher
                            .confirms
                            .reason()
                            .unwrap_or_else(|| "connection lost".to_string())
                    ))));
                }
                // Counted in `resent` once it is sent again: a publish that gives up first (the
                // outage outlasts its bound) was not.
                sends.lost |= matches!(outcome, Attempt::Lost);
                tracing::debug!(message_id = %envelope.id(), "the publishing channel was lost before the confirm; sending again");
                None
            }
            // The send could not be queued in time, or the sweeper found no confirm in time.
            Attempt::TimedOut | Attempt::Confirmed(Confirmed::TimedOut) => {
                bump(&self.counters.confirm_timeouts);
                Some(Err(Error::Timeout {
                    operation: format!(
                        "RabbitMQ's confirm of message {} on '{routing_key}' (it may or may not have been stored; a stalled connection or a memory/disk alarm delays confirms)",
                        envelope.id()
                    ),
                    after: self.settings.confirm_timeout,
                }))
            }
        }
    }

    /// The error of a publish lost with a channel the broker closed for a reason that resending cannot
    /// fix for this publish, naming the cause and the fix; `None` when it is to be sent again (the
    /// reason is another one, or it concerns another publish lost with the same channel).
    fn refused(
        &self,
        publisher: &Publisher,
        envelope: &Envelope,
        message: &Outgoing<'_>,
    ) -> Option<Error> {
        let refusal = publisher.confirms.refusal()?;
        let reason = publisher.confirms.reason().unwrap_or_default();
        let (id, routing_key) = (envelope.id(), message.routing_key);
        match refusal {
            Refusal::AccessRefused { exchange } => {
                // RabbitMQ names the default exchange `amq.default`.
                let target = match message.exchange {
                    "" => "amq.default",
                    exchange => exchange,
                };
                if exchange.as_deref().is_some_and(|refused| refused != target) {
                    return None;
                }
                Some(self.backend_error(format!(
                    "RabbitMQ refused message {id} on '{routing_key}' ({reason}): the user of the URL may not publish to exchange '{target}'. Grant it write permission on that exchange (rabbitmqctl set_permissions -p <vhost> <user> <configure> <write> <read>, the write pattern matching '{target}'), then publish again; not sent again meanwhile, since it cannot succeed"
                )))
            }
            Refusal::TooLarge { max } => {
                // Built again only here: the body was moved into the send.
                let size = envelope.to_frame().map_or(0, |frame| frame.len() as u64);
                (size > max).then(|| {
                    self.backend_error(format!(
                        "RabbitMQ refused message {id} on '{routing_key}' ({reason}): its frame is {size} bytes, more than the broker's max_message_size of {max} bytes. Send smaller messages (a large payload by reference), or raise max_message_size in rabbitmq.conf; not sent again, since it cannot succeed"
                    ))
                })
            }
        }
    }

    /// Whether close is past waiting for the publishes under way: no channel is opened any more.
    fn is_stopping(&self) -> bool {
        *self.stop.borrow()
    }

    fn closed_unconfirmed_error() -> Error {
        Error::Closed {
            what: "the RabbitMQ router",
            hint: "it closed before RabbitMQ confirmed this message (after waiting close_timeout), \
                   so it may or may not have been stored; publish it again through a new router",
        }
    }

    /// Publishes `envelope` to `exchange` with `routing_key` and waits for the broker's confirm,
    /// sending it again on the next channel if the channel or connection is lost first. Every
    /// failure is counted in `publish_failures`.
    ///
    /// The usual case (a live channel, one send, its confirm) runs here; anything else (no channel
    /// yet, an outage, a resend) continues in [`Inner::publish_confirmed`], boxed, so that its large
    /// and rarely used state is not part of every publish's future, which is moved whole into a box
    /// by the `Router` trait and again by every layer that awaits it.
    pub(crate) async fn publish_envelope(
        &self,
        envelope: &Envelope,
        exchange: &str,
        routing_key: &str,
    ) -> Result<PublishOutcome> {
        let message = Outgoing {
            exchange,
            routing_key,
            id: envelope.id().as_uuid().as_u128(),
            copy_of: None,
            went_out: None,
            late: None,
        };
        self.publish_message(envelope, &message)
            .await
            .map_err(|failed| failed.error)
    }

    /// Publishes `envelope` to `queue` (through the default exchange) like
    /// [`Inner::publish_envelope`], telling of a failure whether RabbitMQ may have stored the message
    /// all the same. `went_out` is set as soon as a frame of it goes out; `late` (if any) hears of
    /// a confirm that comes after the publish timed out.
    pub(crate) async fn publish_to_queue(
        &self,
        envelope: &Envelope,
        queue: &str,
        went_out: &AtomicBool,
        late: Option<&LateConfirm>,
    ) -> std::result::Result<PublishOutcome, Unconfirmed> {
        let message = Outgoing {
            exchange: "",
            routing_key: queue,
            id: envelope.id().as_uuid().as_u128(),
            copy_of: None,
            went_out: Some(went_out),
            late,
        };
        self.publish_message(envelope, &message).await
    }

    /// Sends `envelope` to `queue` (through the default exchange) as a copy of a delivery given
    /// back unhandled, with that delivery's AMQP `properties` (a per-message TTL, a priority, other
    /// publishers' headers: what a requeue would have kept), and waits for the confirm like
    /// [`Inner::publish_to_queue`]. Not counted as a publish: the give-back counts in `requeued`.
    pub(crate) async fn give_back_copy(
        &self,
        queue: &str,
        envelope: &Envelope,
        properties: &BasicProperties,
        went_out: &AtomicBool,
    ) -> std::result::Result<PublishOutcome, Unconfirmed> {
        let message = Outgoing {
            exchange: "",
            routing_key: queue,
            id: envelope.id().as_uuid().as_u128(),
            copy_of: Some(properties),
            went_out: Some(went_out),
            late: None,
        };
        self.publish_message(envelope, &message).await
    }

    async fn publish_message(
        &self,
        envelope: &Envelope,
        message: &Outgoing<'_>,
    ) -> std::result::Result<PublishOutcome, Unconfirmed> {
        let _in_flight = Counted::in_flight(self);
        let counted = message.copy_of.is_none();
        if counted {
            bump(&self.counters.published);
        }
        let mut sends = Sends::default();
        let result = 'publish: {
            let Some(publisher) = self.live_publisher() else {
                break 'publish Box::pin(self.publish_confirmed(envelope, message, &mut sends))
                    .await;
            };
            let content = match message.content(envelope, self.settings.envelope_properties) {
                Ok(content) => content,
                Err(error) => break 'publish Err(error),
            };
            let outcome = match Attempt::sent(self.sending(&publisher, message, content).await) {
                Ok(confirm) => {
                    sends.went_out(message);
                    Attempt::confirmed(confirm.await)
                }
                Err(outcome) => outcome,
            };
            match self.conclude(outcome, envelope, message, &publisher, &mut sends) {
                Some(result) => result,
                None => {
                    drop(publisher);
                    Box::pin(self.publish_confirmed(envelope, message, &mut sends)).await
                }
            }
        };
        if counted && result.is_err() {
            bump(&self.counters.publish_failures);
        }
        result.map_err(|error| Unconfirmed {
            error,
            maybe_stored: sends.maybe_stored(),
        })
    }

    /// A publish that found no live channel, or lost its channel `sends.losses` times
    /// (`sends.lost`: after it was sent, so that sending it again counts in `resent`): waits for a
    /// channel (bounded by `publish_outage_timeout`), sends, and sends again after each loss.
    async fn publish_confirmed(
        &self,
        envelope: &Envelope,
        message: &Outgoing<'_>,
        sends: &mut Sends,
    ) -> Result<PublishOutcome> {
        let full = self.settings.envelope_properties;
        // A first attempt is encoded before waiting for a channel, so that a message that cannot be
        // encoded fails at once; after a loss (the frame was encoded once already) the frame is
        // encoded again only when a channel is there, not held through an outage.
        let mut first = if sends.losses == 0 {
            Some(message.content(envelope, full)?)
        } else {
            None
        };
        let mut outage = None;
        let mut to_resend = (sends.losses > 0).then(|| Counted::to_resend(self));
        // Whether a frame of this message went out on a channel lost before its confirm: then the
        // broker may have it, and a failure to send it again must not read as "never sent".
        let mut sent_before = sends.lost;
        loop {
            let publisher = match self.publisher_for(&mut outage).await {
                Ok(publisher) => publisher,
                Err(error) if sent_before => return Err(self.maybe_stored(error, envelope)),
                Err(error) => return Err(error),
            };
            let content = match first.take() {
                Some(content) => content,
                None => message.content(envelope, full)?,
            };
            let outcome = match Attempt::sent(self.sending(&publisher, message, content).await) {
                Ok(confirm) => {
                    // Sent: its confirm now waits on this channel, and is counted there. Whatever
                    // outage it waited through is over: a later one gets the whole bound again.
                    to_resend = None;
                    outage = None;
                    sends.went_out(message);
                    if std::mem::take(&mut sends.lost) {
                        bump(&self.counters.resent);
                    }
                    Attempt::confirmed(confirm.await)
                }
                Err(outcome) => outcome,
            };
            if let Some(result) = self.conclude(outcome, envelope, message, &publisher, sends) {
                return result;
            }
            sent_before |= sends.lost;
            if to_resend.is_none() {
                to_resend = Some(Counted::to_resend(self));
            }
        }
    }

    /// The error of a publish that could not be sent again after its channel was lost with the
    /// frame sent and no confirm: the broker may have the message, which the error of a publish
    /// never sent (an outage outlasting its bound, the router closed) does not say.
    fn maybe_stored(&self, error: Error, envelope: &Envelope) -> Error {
        let note = |message: String| {
            format!(
                "{message} (message {} had been sent before its connection was lost, without a confirm: it may or may not have been stored)",
                envelope.id()
            )
        };
        match error {
            Error::Closed { .. } => Self::closed_unconfirmed_error(),
            Error::Connection {
                backend,
                url,
                message,
            } => Error::Connection {
                backend,
                url,
                message: note(message),
            },
            Error::Backend { backend, message } => Error::Backend {
                backend,
                message: note(message),
            },
            other => other,
        }
    }

    /// Waits until no publish is in flight, or `deadline`; returns how many still are.
    pub(crate) async fn publishes_finished(&self, deadline: Instant) -> u64 {
        loop {
            let done = self.publishes_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            let left = self.publishes_in_flight.load(Ordering::Acquire);
            if left == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, done).await.is_err() {
                return self.publishes_in_flight.load(Ordering::Acquire);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Taken by every test here that reaches the publisher's warnings. A warning's callsite is
    /// registered by the first thread that reaches it; one that registers it while another test is
    /// installing its capturing subscriber could cache it as never enabled, and that test then
    /// misses its line (it did, about one run in five).
    fn logging_tests() -> std::sync::MutexGuard<'static, ()> {
        static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
        ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[test]
    fn the_sweeper_times_out_every_waiter_past_its_deadline_whatever_its_tag() {
        let _one_at_a_time = logging_tests();
        let confirms = Confirms::default();
        let now = Instant::now();
        let mut waiters = Vec::new();
        // Tag 2 started its attempt first (an earlier deadline) but got its tag after tag 1.
        for (tag, deadline) in [
            (1, now + Duration::from_secs(5)),
            (2, now - Duration::from_millis(1)),
            (3, now + Duration::from_secs(5)),
            (4, now),
        ] {
            let (sender, receiver) = oneshot::channel();
            assert!(confirms.register(tag, u128::from(tag), 0, deadline, sender));
            waiters.push((tag, receiver));
        }
        // All four were sent.
        confirms.sent(5);
        confirms.expire(now);
        for (tag, mut receiver) in waiters {
            let told = receiver.try_recv().ok();
            match tag {
                2 | 4 => assert!(matches!(told, Some(Confirmed::TimedOut)), "tag {tag}"),
                _ => assert!(told.is_none(), "tag {tag} is still waiting"),
            }
        }
        assert_eq!(confirms.unconfirmed(), 2);
    }

    /// Registers tag `tag` (sent) with a caller listening for its late confirm for `hold`, its
    /// deadline past: the publish's waiter, and the late confirm's receiver.
    fn register_late(
        confirms: &Confirms,
        tag: u64,
        hold: Duration,
    ) -> (oneshot::Receiver<Confirmed>, oneshot::Receiver<Confirmed>) {
        let (sender, receiver) = oneshot::channel();
        let (late_sender, late_receiver) = oneshot::channel();
        let past = Instant::now() - Duration::from_millis(1);
        assert!(confirms.register_with_late(
            tag,
            u128::from(tag),
            0,
            past,
            sender,
            Some((late_sender, hold)),
        ));
        confirms.sent(tag + 1);
        (receiver, late_receiver)
    }

    /// A confirm that comes after its publish timed out is not dropped when its caller listens for
    /// it (a retry holding its original until it knows whether the copy was stored): a late ack, a
    /// late nack (counted in `publish_nacks` like any) and a multiple ack covering it each reach
    /// that caller, once its publish was told of the timeout, and only then. Close waits for them
    /// as owed confirms.
    #[test]
    fn a_confirm_after_the_timeout_reaches_a_caller_listening_for_it() {
        let _one_at_a_time = logging_tests();
        let confirms = Confirms::default();
        let nacks = AtomicU64::new(0);
        let hold = Duration::from_secs(60);
        let (mut acked, mut acked_late) = register_late(&confirms, 1, hold);
        let (mut nacked, mut nacked_late) = register_late(&confirms, 2, hold);
        let (mut covered, mut covered_late) = register_late(&confirms, 3, hold);
        // A caller that stopped listening has nothing held: its entry goes at the next sweep.
        let (_, gone_late) = register_late(&confirms, 4, hold);
        drop(gone_late);
        confirms.expire(Instant::now());
        for waiter in [&mut acked, &mut nacked, &mut covered] {
            assert_eq!(waiter.try_recv().ok(), Some(Confirmed::TimedOut));
        }
        assert!(acked_late.try_recv().is_err(), "told before any confirm");
        assert_eq!(
            confirms.unconfirmed(),
            0,
            "not counted as unconfirmed publishes"
        );
        assert_eq!(confirms.owed(), 3, "owed to the callers listening");
        confirms.settle(1, false, None);
        confirms.nacked(2, false, &nacks);
        confirms.settle(3, true, None);
        assert_eq!(
            acked_late.try_recv().ok(),
            Some(Confirmed::Ack { returned: false })
        );
        assert_eq!(nacked_late.try_recv().ok(), Some(Confirmed::Nack));
        assert_eq!(
            covered_late.try_recv().ok(),
            Some(Confirmed::Ack { returned: false })
        );
        assert_eq!(nacks.load(Ordering::Relaxed), 1);
        assert_eq!(confirms.owed(), 0);
    }

    /// A caller listening for a late confirm is not held for ever: at the end of its hold it is
    /// told `TimedOut`, and when the channel is lost (or the router closes) first its receiver
    /// fails, since the confirm cannot come any more. A publish whose frame never went out has no
    /// late confirm to wait for.
    #[test]
    fn a_late_confirm_is_awaited_for_its_hold_and_until_the_channel_is_lost() {
        let _one_at_a_time = logging_tests();
        let confirms = Confirms::default();
        let (_, mut held) = register_late(&confirms, 1, Duration::from_millis(50));
        let (_, mut lost) = register_late(&confirms, 2, Duration::from_secs(60));
        let now = Instant::now();
        confirms.expire(now);
        confirms.expire(now + Duration::from_millis(49));
        assert!(held.try_recv().is_err(), "held for 50 ms");
        confirms.expire(now + Duration::from_millis(50));
        assert_eq!(held.try_recv().ok(), Some(Confirmed::TimedOut));
        assert!(matches!(
            lost.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        confirms.fail_all("the connection was lost");
        assert!(matches!(
            lost.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        // Tag 3 registered, its frame never sent (`sent_below` stays at 3).
        let other = Confirms::default();
        other.sent(3);
        let (sender, waiter) = oneshot::channel();
        let (late_sender, mut late_receiver) = oneshot::channel();
        let past = Instant::now() - Duration::from_millis(1);
        assert!(other.register_with_late(
            3,
            3,
            0,
            past,
            sender,
            Some((late_sender, Duration::from_secs(60)))
        ));
        other.expire(Instant::now());
        assert!(
            matches!(
                late_receiver.try_recv(),
                Err(oneshot::error::TryRecvError::Empty)
            ),
            "left for a later sweep while its send may still go out"
        );
        drop(waiter);
        other.expire(Instant::now());
        assert!(matches!(
            late_receiver.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert_eq!(other.owed(), 0);
    }

    /// A basic.return names the message, not its delivery tag: it belongs to the oldest publish of
    /// that id and route not returned yet (returns come in publish order). A retry's copy timed out
    /// and held for its late confirm (in [`Pending::late`], tag 1) and a newer copy of the same
    /// message to the same queue still waiting on time (tag 2, a redelivered original retried
    /// again) both match: the return is tag 1's. Marking tag 2 instead made tag 1's late ack read
    /// as stored (its original acknowledged while the copy was in no queue: lost) and tag 2's read
    /// as returned (sent again: a duplicate).
    #[test]
    fn a_return_goes_to_the_oldest_matching_publish_even_one_held_for_its_late_confirm() {
        let _one_at_a_time = logging_tests();
        let confirms = Confirms::default();
        let (_, mut held) = register_late(&confirms, 1, Duration::from_secs(60));
        confirms.expire(Instant::now());
        let (sender, mut newer) = oneshot::channel();
        let later = Instant::now() + Duration::from_secs(60);
        // The same message (id 1) to the same route as tag 1.
        assert!(confirms.register(2, 1, 0, later, sender));
        confirms.sent(3);
        assert!(confirms.returned(1, 0));
        confirms.settle(2, true, None);
        assert_eq!(
            held.try_recv().ok(),
            Some(Confirmed::Ack { returned: true }),
            "the held copy was the one returned"
        );
        assert_eq!(
            newer.try_recv().ok(),
            Some(Confirmed::Ack { returned: false }),
            "the newer copy was stored"
        );
    }

    /// The waiters of one confirm are all told before a publish woken by it can register its next
    /// message (see [`Confirms::settle`]): when they were told after the lock was released, the
    /// other Tokio worker ran woken publishes one at a time and slept in between, to be woken again
    /// by the next waiter told. Checked where it happens: from each waiter's wake, whether a new
    /// waiter could register at that moment.
    #[test]
    fn a_confirm_tells_all_its_waiters_before_a_woken_publish_can_register_again() {
        struct Probe {
            confirms: Arc<Confirms>,
            could_register: Mutex<Vec<bool>>,
        }
        impl std::task::Wake for Probe {
            fn wake(self: Arc<Self>) {
                self.wake_by_ref();
            }
            fn wake_by_ref(self: &Arc<Self>) {
                let free = self.confirms.pending.try_lock().is_ok();
                self.could_register.lock().unwrap().push(free);
            }
        }
        let confirms = Arc::new(Confirms::default());
        let probe = Arc::new(Probe {
            confirms: confirms.clone(),
            could_register: Mutex::new(Vec::new()),
        });
        let waker = std::task::Waker::from(probe.clone());
        let mut context = std::task::Context::from_waker(&waker);
        let later = Instant::now() + Duration::from_secs(60);
        let mut receivers = Vec::new();
        for tag in 1..=3 {
            let (sender, mut receiver) = oneshot::channel();
            assert!(confirms.register(tag, u128::from(tag), 0, later, sender));
            assert!(
                std::pin::Pin::new(&mut receiver)
                    .poll(&mut context)
                    .is_pending()
            );
            receivers.push(receiver);
        }
        confirms.sent(4);
        // One multiple ack for all three, as RabbitMQ sends them under load.
        assert_eq!(confirms.settle(3, true, None), 0);
        assert_eq!(
            *probe.could_register.lock().unwrap(),
            [false, false, false],
            "a publish woken by the confirm could register its next message before the others were told"
        );
        for mut receiver in receivers {
            assert_eq!(
                receiver.try_recv().ok(),
                Some(Confirmed::Ack { returned: false })
            );
        }
        assert_eq!(confirms.unconfirmed(), 0);
    }

    /// A waiter nobody listens to any more is counted as a timed-out confirm only when its frame went
    /// out: one whose send was dropped before that (its caller timed out queuing it, and was told)
    /// is not a message that may be lost, nor counted twice.
    #[test]
    fn the_sweeper_counts_only_abandoned_publishes_that_were_sent() {
        let _one_at_a_time = logging_tests();
        let orphans = Orphans::default();
        let confirms = Confirms::new(orphans.clone());
        let past = Instant::now() - Duration::from_millis(1);
        for tag in [1, 2] {
            let (sender, receiver) = oneshot::channel();
            assert!(confirms.register(tag, u128::from(tag), 0, past, sender));
            drop(receiver);
        }
        // Tag 1 was sent; tag 2's send was dropped before its frame was queued.
        confirms.sent_below.store(2, Ordering::Release);
        confirms.expire(Instant::now());
        assert_eq!(confirms.unconfirmed(), 0);
        assert_eq!(orphans.confirm_timeouts.load(Ordering::Relaxed), 1);
    }

    /// Whether a late waiter's frame went out is decided at one moment, under the lock the send path
    /// stores `sent_below` under: a send still under way when the sweeper runs (registered, its
    /// frame not out yet) is left to a later sweep, which counts it once its frame went out and its
    /// caller then stopped waiting; a send dropped before its frame went out is not counted, though
    /// the next send reuses its tag and sends.
    #[test]
    fn the_sweeper_counts_a_late_publish_by_whether_its_own_frame_went_out() {
        let _one_at_a_time = logging_tests();
        let orphans = Orphans::default();
        let confirms = Confirms::new(orphans.clone());
        let past = Instant::now() - Duration::from_millis(1);
        let timeouts = || orphans.confirm_timeouts.load(Ordering::Relaxed);
        // Tag 1: its send is under way when the sweeper runs.
        let (sender, receiver) = oneshot::channel();
        assert!(confirms.register(1, 1, 0, past, sender));
        confirms.expire(Instant::now());
        assert_eq!(confirms.unconfirmed(), 1, "left for a later sweep");
        // Its frame goes out, then its caller stops waiting.
        confirms.sent(2);
        drop(receiver);
        confirms.expire(Instant::now());
        assert_eq!(confirms.unconfirmed(), 0);
        assert_eq!(timeouts(), 1, "sent, then abandoned: counted");
        // Tag 2: its send is dropped before its frame goes out...
        let (sender, receiver) = oneshot::channel();
        assert!(confirms.register(2, 2, 0, past, sender));
        drop(receiver);
        confirms.expire(Instant::now());
        assert_eq!(confirms.unconfirmed(), 0);
        // ...and the next send reuses its tag and sends.
        let (sender, _receiver) = oneshot::channel();
        let later = Instant::now() + Duration::from_secs(60);
        assert!(confirms.register(2, 3, 0, later, sender));
        confirms.sent(3);
        confirms.expire(Instant::now());
        assert_eq!(timeouts(), 1, "the dropped send is not counted");
    }

    /// Where a unit test's warnings go (WARN and above).
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        /// A subscriber that writes warnings (WARN and above) here, without colours.
        fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + use<> {
            let writer = self.clone();
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::WARN)
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .finish()
        }
    }

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Each way a publish whose caller stopped waiting can end badly is logged with its message id,
    /// however recently another way was: they used to share one limiter (one line per 5 s in all),
    /// so a return logged first kept a lost confirm out of the log. A nack says which message it
    /// lost, too.
    #[test]
    fn every_kind_of_abandoned_publish_lost_is_logged_though_another_just_was() {
        let _one_at_a_time = logging_tests();
        let captured = Captured::default();
        let subscriber = captured.subscriber();
        tracing::subscriber::with_default(subscriber, || {
            let orphans = Orphans::default();
            let confirms = Confirms::new(orphans.clone());
            let nacks = AtomicU64::new(0);
            let later = Instant::now() + Duration::from_secs(60);
            let past = Instant::now() - Duration::from_millis(1);
            for (tag, deadline) in [(1, later), (2, later), (3, past), (4, later)] {
                let (sender, receiver) = oneshot::channel();
                assert!(confirms.register(tag, u128::from(tag), 0, deadline, sender));
                drop(receiver);
            }
            confirms.sent_below.store(5, Ordering::Release);
            // 1: returned, then acked; 2: nacked; 3: no confirm in time; 4: its channel lost.
            assert!(confirms.returned(1, 0));
            confirms.settle(1, false, None);
            confirms.nacked(2, false, &nacks);
            confirms.expire(Instant::now());
            confirms.fail_all("the connection was lost");
            assert_eq!(nacks.load(Ordering::Relaxed), 1);
            assert_eq!(orphans.confirm_timeouts.load(Ordering::Relaxed), 1);
            assert_eq!(orphans.unconfirmed.load(Ordering::Relaxed), 1);
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        for (tag, says) in [
            (1, "reached no queue"),
            (2, "basic.nack"),
            (3, "did not confirm"),
            (4, "channel was lost"),
        ] {
            let id = uuid::Uuid::from_u128(tag).to_string();
            assert!(
                text.lines()
                    .any(|line| line.contains("WARN") && line.contains(&id) && line.contains(says)),
                "no warning names message {id} ({says}):\n{text}"
            );
        }
    }

    /// A broker that nacks every publish (a disk alarm) does not flood the log: one line per 5 s
    /// (here 50 ms), saying how many were left out, and every nack still counted.
    #[test]
    fn broker_nacks_are_logged_rate_limited_with_what_was_left_out() {
        let _one_at_a_time = logging_tests();
        let captured = Captured::default();
        let subscriber = captured.subscriber();
        let nacks = AtomicU64::new(0);
        tracing::subscriber::with_default(subscriber, || {
            let orphans = Orphans {
                log: Arc::new(OrphanLogs {
                    broker_nacks: LogLimiter::new(Duration::from_millis(50)),
                    ..OrphanLogs::default()
                }),
                ..Orphans::default()
            };
            let confirms = Confirms::new(orphans);
            let later = Instant::now() + Duration::from_secs(60);
            let mut receivers = Vec::new();
            for tag in 1..=101 {
                let (sender, receiver) = oneshot::channel();
                assert!(confirms.register(tag, u128::from(tag), 0, later, sender));
                receivers.push(receiver);
            }
            for tag in 1..=100 {
                confirms.broker_nacked(tag, false, &nacks);
            }
            std::thread::sleep(Duration::from_millis(60));
            confirms.broker_nacked(101, false, &nacks);
        });
        assert_eq!(nacks.load(Ordering::Relaxed), 101);
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text
            .lines()
            .filter(|line| line.contains("RabbitMQ nacked a publish"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[1].contains("earlier_not_logged=99"), "{text}");
    }

    /// RabbitMQ's replies for what resending cannot fix are read with what decides which publish
    /// they concern (its exchange; the size limit); other codes are not refusals.
    #[test]
    fn a_broker_close_is_read_as_a_refusal_only_when_resending_cannot_fix_it() {
        assert_eq!(
            Refusal::of(
                403,
                "ACCESS_REFUSED - access to exchange 'pay' in vhost '/' refused for user 'app'"
            ),
            Some(Refusal::AccessRefused {
                exchange: Some("pay".to_string())
            })
        );
        assert_eq!(
            Refusal::of(403, "ACCESS_REFUSED - something else"),
            Some(Refusal::AccessRefused { exchange: None })
        );
        assert_eq!(
            Refusal::of(
                406,
                "PRECONDITION_FAILED - message size 134217729 is larger than configured max size 134217728"
            ),
            Some(Refusal::TooLarge { max: 134_217_728 })
        );
        assert_eq!(
            Refusal::of(406, "PRECONDITION_FAILED - unknown delivery tag 7"),
            None
        );
        assert_eq!(
            Refusal::of(404, "NOT_FOUND - no exchange 'pay' in vhost '/'"),
            None
        );
        assert_eq!(Refusal::of(541, "INTERNAL_ERROR"), None);
    }

    /// What `publish_nacks` says at the moment a publish is told of its nack.
    struct CountWhenTold {
        nacks: Arc<AtomicU64>,
        seen: Mutex<Option<u64>>,
    }

    impl std::task::Wake for CountWhenTold {
        fn wake(self: Arc<Self>) {
            *self.seen.lock().unwrap() = Some(self.nacks.load(Ordering::Relaxed));
        }
    }

    /// A caller told of its nack returns its error at once, and may read health next: the nack must
    /// be counted by then, not after every publish it settles was told.
    #[test]
    fn a_nack_is_counted_before_its_publish_is_told() {
        let _one_at_a_time = logging_tests();
        use std::future::Future;
        use std::task::Context;

        let confirms = Confirms::default();
        let nacks = Arc::new(AtomicU64::new(0));
        let (sender, mut receiver) = oneshot::channel();
        let deadline = Instant::now() + Duration::from_secs(5);
        assert!(confirms.register(1, 1, 0, deadline, sender));
        let observer = Arc::new(CountWhenTold {
            nacks: nacks.clone(),
            seen: Mutex::new(None),
        });
        let waker = std::task::Waker::from(observer.clone());
        let mut context = Context::from_waker(&waker);
        assert!(
            std::pin::Pin::new(&mut receiver)
                .poll(&mut context)
                .is_pending()
        );
        assert_eq!(confirms.nacked(1, false, &nacks), 0);
        assert_eq!(receiver.try_recv().ok(), Some(Confirmed::Nack));
        assert_eq!(
            *observer.seen.lock().unwrap(),
            Some(1),
            "publish_nacks when the publish was told"
        );
    }
}
