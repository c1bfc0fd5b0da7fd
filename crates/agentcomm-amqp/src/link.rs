//! The connections and what hangs on them: opening (with TLS), declaring the topology, watching for a
//! lost connection, reconnecting with backoff, and the shared state every publish and consumer reads.
//!
//! A router keeps two connections, as RabbitMQ advises: during a memory or disk alarm RabbitMQ blocks
//! a connection that publishes and stops reading from it, so acknowledgements sent on that connection
//! would wait until the alarm clears, while the consumers that could drain the queues stand still.
//! Consumers, their acknowledgements and the declarations therefore use a connection that never
//! publishes; publishes (retries and dead letters included) use the other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use amqprs::channel::{
    Channel, ExchangeDeclareArguments, QueueBindArguments, QueueDeclareArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{FieldTable, FieldValue};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use agentcomm_core::error::{Error, Result};

use crate::builder::{QueueType, Settings};
use crate::publisher::Publisher;
use crate::topology::DEAD_LETTER_BINDING;
use crate::url::{AuthMechanism, amqplain_carries, plain_carries, scrub};

/// The backend name in errors, logs and health.
pub(crate) const BACKEND: &str = "rabbitmq";

/// Above this many bytes of user name, password and connection name together, a login may be over
/// the 4,096 bytes RabbitMQ 3 reads before the frame size is agreed (amqprs adds about 150 bytes of
/// its own).
const LONGEST_LOGIN: usize = 3_900;

/// What a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Publishes with confirms: the connection RabbitMQ may block during an alarm.
    Publishing,
    /// Consumers, their acknowledgements, and declarations.
    Consuming,
}

impl Role {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Role::Publishing => "publishing",
            Role::Consuming => "consuming",
        }
    }
}

/// How long a request waits for its lost connection to come back, and what its error names when
/// it gives up.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Wait {
    /// Until the connection is back or the router closes.
    Forever,
    /// Not at all: fails at once while the connection is down, with this reason in its error.
    Not(&'static str),
    /// Until `deadline`, which the setting named `setting` (of length `bound`) set.
    Until {
        deadline: Instant,
        setting: &'static str,
        bound: Duration,
    },
}

impl Wait {
    /// Waits up to `bound` from now, the value of the setting named `setting`.
    pub(crate) fn up_to(setting: &'static str, bound: Duration) -> Wait {
        Wait::Until {
            deadline: Instant::now() + bound,
            setting,
            bound,
        }
    }
}

/// `n` and the noun that goes with it: "1 attempt", "3 attempts".
pub(crate) fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Where a connection is.
#[derive(Clone)]
pub(crate) enum LinkState {
    /// Not connected; `attempt` reconnection attempts failed so far.
    Connecting {
        attempt: u32,
        last_error: Arc<str>,
        /// Whether RabbitMQ answered the last attempt and refused it (a login, a declaration):
        /// then the error of a wait that gives up is not a connection error.
        refused: bool,
        since: Instant,
    },
    /// Connected.
    Connected(Live),
    /// The router was closed.
    Closed,
}

/// A live connection and its generation (unique across both connections of a router, +1 per
/// connection opened).
#[derive(Clone)]
pub(crate) struct Live {
    pub connection: Connection,
    pub generation: u64,
    /// How many of its channel ids amqprs lost, and whether the connection is to be recycled.
    pub ids: Arc<ChannelIds>,
}

/// The channel ids of one connection, which amqprs loses one by one: it frees a channel's id only
/// when the client closes the channel, never when the broker does (a PRECONDITION_FAILED or NOT_FOUND
/// on a declare, bind or consume; amqprs 2.1.5, gftea/amqprs#199). Once every id is taken, the next
/// channel.open panics the connection's reader: the connection still looks open and still sends
/// heartbeats, so RabbitMQ keeps it (with its consumers and what they hold), but no frame is read
/// from it any more and no channel opens on it.
///
/// So the channels the broker closes are counted, and once they reach half of the connection's ids
/// the connection is recycled (closed and opened again, as after a loss), while the other half is
/// still free for the channels in use. A reader found gone anyway (more channels in use than that
/// half) asks for the same, at once.
pub(crate) struct ChannelIds {
    closed_by_broker: AtomicU32,
    /// How many ids the connection has: its channel_max (amqprs hands out up to 7 more).
    ids: u32,
    /// How many channels the broker may close on the connection before it is recycled.
    limit: u32,
    /// Why the connection should be replaced, once it should.
    recycle: watch::Sender<Option<Arc<str>>>,
    /// amqprs's reader of the connection is gone while the connection still reports itself open.
    reader_gone: AtomicBool,
}

impl ChannelIds {
    /// For a connection that negotiated `channel_max` (0: no limit, so amqprs's 65,535).
    pub(crate) fn new(channel_max: u16) -> Self {
        let ids = if channel_max == 0 {
            u32::from(u16::MAX)
        } else {
            u32::from(channel_max)
        };
        ChannelIds {
            closed_by_broker: AtomicU32::new(0),
            ids,
            limit: (ids / 2).max(1),
            recycle: watch::Sender::new(None),
            reader_gone: AtomicBool::new(false),
        }
    }

    /// Counts a channel the broker closed (its id is lost), and asks for the connection to be
    /// recycled once they reach the limit.
    pub(crate) fn closed_by_broker(&self) {
        let closed = self.closed_by_broker.fetch_add(1, Ordering::AcqRel) + 1;
        if closed == self.limit {
            self.ask_recycle(format!(
                "RabbitMQ closed {closed} channels on it, and amqprs never frees the id of such a channel (its channel_max is {})",
                self.ids
            ));
        }
    }

    /// Looks at the error of a failed channel.open on `connection`: when amqprs's reader of a
    /// connection that still reports itself open is gone (the ids ran out), nothing more can be done
    /// on it, and it is recycled. (A connection that was lost or closed ends its reader too, but
    /// reports itself closed; the supervisor sees that loss on its own.)
    pub(crate) fn check_open_error(&self, connection: &Connection, error: &amqprs::error::Error) {
        let gone = connection.is_open()
            && matches!(error, amqprs::error::Error::ChannelOpenError(message)
                if message.contains("register channel resource"));
        if gone && !self.reader_gone.swap(true, Ordering::AcqRel) {
            self.ask_recycle(format!(
                "amqprs stopped reading it (its channel ids ran out after RabbitMQ closed {} channels on it): {error}",
                self.closed_by_broker.load(Ordering::Acquire)
            ));
        }
    }

    fn ask_recycle(&self, why: String) {
        self.recycle.send_if_modified(|recycle| {
            if recycle.is_some() {
                return false;
            }
            *recycle = Some(Arc::from(why));
            true
        });
    }

    /// Completes with the reason once the connection is to be recycled.
    async fn recycle_asked(&self) -> Arc<str> {
        let mut recycle = self.recycle.subscribe();
        // The sender lives as long as `self`, so the wait ends only with a reason.
        let why = recycle
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|why| why.clone());
        why.unwrap_or_else(|| Arc::from("its channel ids ran low"))
    }
}

/// Why a connection of the router is down, until an attempt to reconnect it fails.
pub(crate) const LOST: &str = "the connection was lost";

/// One of the router's two connections, as it comes and goes.
pub(crate) struct Link {
    pub role: Role,
    pub state: watch::Sender<LinkState>,
    /// The generation of the live connection, 0 while disconnected (read on every publish).
    pub connected: AtomicU64,
    /// Why RabbitMQ blocks this connection (a memory or disk alarm), while it does.
    pub blocked: Arc<Mutex<Option<String>>>,
}

impl Link {
    fn new(role: Role) -> Self {
        Link {
            role,
            state: watch::Sender::new(LinkState::Connecting {
                attempt: 0,
                last_error: Arc::from("not connected yet"),
                refused: false,
                since: Instant::now(),
            }),
            connected: AtomicU64::new(0),
            blocked: Arc::new(Mutex::new(None)),
        }
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire) != 0
    }

    /// The live connection if it is still the one of `generation`.
    pub(crate) fn live(&self, generation: u64) -> Option<Live> {
        match &*self.state.borrow() {
            LinkState::Connected(live) if live.generation == generation => Some(live.clone()),
            _ => None,
        }
    }

    /// Completes once the connection of `generation` is no longer the live one (lost or closed).
    pub(crate) async fn gone(&self, generation: u64) {
        let mut state = self.state.subscribe();
        let _ = state
            .wait_for(|state| !matches!(state, LinkState::Connected(live) if live.generation == generation))
            .await;
    }

    /// Makes `live` the connection of this link, unless close already marked the link closed
    /// (then returns false and the caller closes `live`). Decided under the state's lock, which
    /// close's own switch to `Closed` also takes, so a reconnect finishing while close shuts the
    /// connections down never brings the link back to life.
    fn on_connected(&self, live: &Live) -> bool {
        self.state.send_if_modified(|state| {
            if matches!(state, LinkState::Closed) {
                return false;
            }
            self.connected.store(live.generation, Ordering::Release);
            *state = LinkState::Connected(live.clone());
            true
        })
    }
}

/// Every counter the router reports in its health.
#[derive(Default)]
pub(crate) struct Counters {
    pub published: AtomicU64,
    pub confirmed: AtomicU64,
    /// Messages RabbitMQ nacked, counted where the nack is read: also those whose caller stopped
    /// waiting for the confirm.
    pub publish_nacks: Arc<AtomicU64>,
    /// Confirmed publishes that reached no queue (returned, then acked), counted by the caller told
    /// of it, or by the channel for a publish whose caller had stopped waiting after its frame went
    /// out: every such publish, as `publish_nacks` and `confirm_timeouts` count theirs.
    pub unroutable: Arc<AtomicU64>,
    pub returned: Arc<AtomicU64>,
    pub resent: AtomicU64,
    /// Publishes whose confirm did not come in time, counted by the caller told of it, or by the
    /// sweeper for a publish whose caller had stopped waiting after its frame went out.
    pub confirm_timeouts: Arc<AtomicU64>,
    /// Publishes whose caller had stopped waiting after sending, lost with their channel before the
    /// confirm: nobody sends them again (see [`crate::publisher::Confirms::fail_all`]).
    pub abandoned_unconfirmed: Arc<AtomicU64>,
    pub publish_failures: AtomicU64,
    pub connection_losses: AtomicU64,
    /// Live connections replaced because their channel ids ran low (see [`ChannelIds`]).
    pub channel_id_recycles: AtomicU64,
    pub reconnects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub delivered: AtomicU64,
    pub acked: AtomicU64,
    pub requeued: AtomicU64,
    pub retried: AtomicU64,
    /// Retries whose delay could not be scheduled (the retry queue could not be declared or took
    /// nothing), sent straight back to their queue instead: also in `retried`.
    pub retries_undelayed: AtomicU64,
    /// Copies (a retry, a delivery given back as a copy) RabbitMQ did not confirm but may have
    /// stored all the same, whose original was given back instead: the message may come twice. For
    /// a retry: its confirm timed out and no late answer came either (the channel lost first, the
    /// router closed), or the channel was lost and sending again given up, or the settlement was
    /// cut short before the confirm.
    pub copies_unconfirmed: AtomicU64,
    /// Retries whose copy's confirm came after `confirm_timeout`, while the original was held for
    /// it: the original was acknowledged then, and the copy carries the retry (also in `retried`).
    pub copies_confirmed_late: AtomicU64,
    /// A gauge, not a count: retries' originals held now for their copy's late confirm
    /// (`AmqpAck::hold_for_late_confirm`). Each keeps its prefetch slot until RabbitMQ answers (or `retry_hold_timeout`).
    pub held_for_late_confirm: AtomicU64,
    pub abandoned: AtomicU64,
    pub settle_failures: AtomicU64,
    pub stale: AtomicU64,
    pub stale_discarded: AtomicU64,
    pub malformed: AtomicU64,
    pub consumers_restored: AtomicU64,
    pub consumer_failures: AtomicU64,
    pub fan_out_queues_lost: AtomicU64,
    pub retries_dropped: AtomicU64,
    pub fan_out_dropped: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Logs at most one warning per `every` for a problem that can repeat many times a second (messages
/// lost one by one while the broker misbehaves), saying how many occurrences were left out in
/// between. Only rare paths ask it: a lock is fine.
pub(crate) struct LogLimiter {
    every: Duration,
    /// When the last warning was logged, and how many occurrences were left out since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter::new(Duration::from_secs(5))
    }
}

impl LogLimiter {
    pub(crate) fn new(every: Duration) -> Self {
        LogLimiter {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// `occurrences` happened: `Some(left out since the last warning)` when they are to be logged
    /// now, `None` when they are only counted towards the next warning.
    pub(crate) fn allow(&self, occurrences: u64) -> Option<u64> {
        let mut state = self.state.lock().expect("log limiter lock");
        let now = Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < self.every => {
                state.1 += occurrences;
                None
            }
            _ => {
                let left_out = state.1;
                *state = (Some(now), 0);
                Some(left_out)
            }
        }
    }
}

/// A channel used for declarations, bindings, deletions or a consumer, with the reason the broker gave
/// if it closed the channel (or cancelled its consumer), and a signal when it did.
pub(crate) struct OpChannel {
    pub channel: Channel,
    pub generation: u64,
    pub reason: Reason,
    pub ended: Arc<Notify>,
}

/// The reason a channel was closed or a consumer cancelled by the broker, recorded by its callback.
pub(crate) type Reason = Arc<Mutex<Option<String>>>;

/// The callback of channels that do not publish: records why the broker closed the channel or
/// cancelled its consumer, signals `ended`, and counts the channel's id as lost when the broker closed
/// it.
struct ReasonCallback {
    reason: Reason,
    ended: Arc<Notify>,
    ids: Arc<ChannelIds>,
}

#[async_trait::async_trait]
impl amqprs::callbacks::ChannelCallback for ReasonCallback {
    async fn close(
        &mut self,
        _channel: &Channel,
        close: amqprs::CloseChannel,
    ) -> std::result::Result<(), amqprs::error::Error> {
        *self.reason.lock().expect("reason lock") =
            Some(format!("{} {}", close.reply_code(), close.reply_text()));
        self.ids.closed_by_broker();
        self.ended.notify_one();
        Ok(())
    }

    async fn cancel(
        &mut self,
        _channel: &Channel,
        cancel: amqprs::Cancel,
    ) -> std::result::Result<(), amqprs::error::Error> {
        *self.reason.lock().expect("reason lock") = Some(format!(
            "the broker cancelled consumer {} (its queue was deleted?)",
            cancel.consumer_tag()
        ));
        self.ended.notify_one();
        Ok(())
    }

    async fn flow(
        &mut self,
        _channel: &Channel,
        active: bool,
    ) -> std::result::Result<bool, amqprs::error::Error> {
        Ok(active)
    }

    async fn publish_ack(&mut self, _channel: &Channel, _ack: amqprs::Ack) {}

    async fn publish_nack(&mut self, _channel: &Channel, _nack: amqprs::Nack) {}

    async fn publish_return(
        &mut self,
        _channel: &Channel,
        _ret: amqprs::Return,
        _properties: amqprs::BasicProperties,
        _content: Vec<u8>,
    ) {
    }
}

/// The connection callback: logs a close by the broker, records blocked/unblocked notifications
/// (memory or disk alarms).
struct LinkCallback {
    role: Role,
    blocked: Arc<Mutex<Option<String>>>,
}

#[async_trait::async_trait]
impl amqprs::callbacks::ConnectionCallback for LinkCallback {
    async fn close(
        &mut self,
        _connection: &Connection,
        close: amqprs::Close,
    ) -> std::result::Result<(), amqprs::error::Error> {
        tracing::warn!(connection = self.role.as_str(), reason = %close, "RabbitMQ closed the connection");
        Ok(())
    }

    async fn blocked(&mut self, _connection: &Connection, reason: String) {
        tracing::warn!(
            connection = self.role.as_str(),
            reason = %reason,
            "RabbitMQ blocked the connection (memory or disk alarm): publishes wait until it is unblocked"
        );
        *self.blocked.lock().expect("blocked lock") = Some(reason);
    }

    async fn unblocked(&mut self, _connection: &Connection) {
        tracing::info!(
            connection = self.role.as_str(),
            "RabbitMQ unblocked the connection"
        );
        *self.blocked.lock().expect("blocked lock") = None;
    }

    async fn secret_updated(&mut self, _connection: &Connection) {}
}

/// How far one health probe got on the declaration channel, for its caller to read when it stops
/// waiting, and for the probe's task to tell a silent broker from a busy channel.
#[derive(Default)]
pub(crate) struct ProbeWatch {
    /// It holds the declaration channel (opening it, or asking).
    pub held: AtomicBool,
    /// When it began to hold the channel: a probe whose task ran late (the runtime's threads busy)
    /// holds it at once, yet late in its call's time, or after it (and then asks nothing).
    pub held_at: std::sync::OnceLock<Instant>,
    /// It had to wait for the channel, busy with requests before it.
    pub waited: AtomicBool,
    /// RabbitMQ answered something it asked: the channel's opening, or the probe itself.
    pub answered: AtomicBool,
    /// The generation of the consuming connection it holds the channel on.
    pub generation: AtomicU64,
}

/// A health probe RabbitMQ did not answer within its limit.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Unanswered {
    /// The generation of the consuming connection it asked on.
    pub generation: u64,
    /// When it held the channel and began asking (opening the channel, or the probe's request).
    pub asked: Instant,
    pub limit: Duration,
}

/// The shared state of a router.
pub(crate) struct Inner {
    pub settings: Settings,
    /// The runtime the router connected on. The connections' tasks run there (amqprs spawns them
    /// where a connection opens, and reconnections run there too); so do the publishing channel's,
    /// whatever runtime a publish comes from: one that a caller keeps idle, or shuts down, must not
    /// hold the confirms of every later publish.
    pub runtime: tokio::runtime::Handle,
    pub publishing: Link,
    pub consuming: Link,
    next_generation: AtomicU64,
    /// The publishing channel of the live publishing connection (read on every publish, so not an
    /// async lock).
    pub publisher: Mutex<Option<Arc<Publisher>>>,
    /// Held while a publishing channel is being opened.
    pub opening_publisher: tokio::sync::Mutex<()>,
    /// The declaration channel, on the consuming connection.
    pub topology: tokio::sync::Mutex<Option<OpChannel>>,
    /// Retry queues declared on the live consuming connection, with when they were declared.
    pub retry_queues: Mutex<HashMap<String, Instant>>,
    pub subscriptions: Mutex<Vec<Weak<crate::consumer::SubShared>>>,
    /// Durable queues this router declared (dead-letter, group and retry queues).
    pub declared_queues: Mutex<std::collections::BTreeSet<String>>,
    pub tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The tasks that watch the two connections and reconnect them ([`supervise`]), on the router's
    /// runtime. They end only once close stops them; before that, only with that runtime (or a panic).
    supervisors: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    pub next_subscription: AtomicU64,
    pub counters: Counters,
    /// Warnings about messages lost with publishes whose caller had stopped waiting (shared by every
    /// publishing channel of the router).
    pub orphans_log: Arc<crate::publisher::OrphanLogs>,
    /// Set first by close: no new subscriptions.
    pub closing: AtomicBool,
    /// Set by close once its subscriptions are drained: no new publishes (handlers finishing during
    /// the drain may still reply).
    pub publishing_closed: AtomicBool,
    /// Publishes started and not finished (close waits for them).
    pub publishes_in_flight: AtomicU64,
    /// Publishes that lost their channel before the confirm and wait to be sent again (counted as
    /// unconfirmed in health: their confirm is still owed).
    pub publishes_to_resend: AtomicU64,
    pub publishes_done: Notify,
    /// The last health probe RabbitMQ left unanswered for its whole limit (its request, or the
    /// opening of the declaration channel for it): the consuming connection's generation, when it
    /// asked, and the limit. Cleared by the next probe RabbitMQ answers.
    pub probe_unanswered: Mutex<Option<Unanswered>>,
    /// Set while the topology is being declared again and the queues bound again, by the health
    /// probe's repair ([`Inner::repair_topology`]) or the periodic check (`keep_bound`): one at a time.
    repairing: AtomicBool,
    pub stop: watch::Sender<bool>,
    /// Set once close's task has ended: `Some(true)` when it finished, `Some(false)` when it ended
    /// otherwise (a panic, its runtime shutting down). What every `close()` waits for.
    pub closed: watch::Sender<Option<bool>>,
}

impl Inner {
    pub(crate) fn new(settings: Settings) -> Self {
        Inner {
            settings,
            runtime: tokio::runtime::Handle::current(),
            publishing: Link::new(Role::Publishing),
            consuming: Link::new(Role::Consuming),
            next_generation: AtomicU64::new(1),
            publisher: Mutex::new(None),
            opening_publisher: tokio::sync::Mutex::new(()),
            topology: tokio::sync::Mutex::new(None),
            retry_queues: Mutex::new(HashMap::new()),
            subscriptions: Mutex::new(Vec::new()),
            declared_queues: Mutex::new(std::collections::BTreeSet::new()),
            tasks: Mutex::new(Vec::new()),
            supervisors: Mutex::new(Vec::new()),
            next_subscription: AtomicU64::new(1),
            counters: Counters::default(),
            orphans_log: Arc::default(),
            closing: AtomicBool::new(false),
            publishing_closed: AtomicBool::new(false),
            publishes_in_flight: AtomicU64::new(0),
            publishes_to_resend: AtomicU64::new(0),
            publishes_done: Notify::new(),
            probe_unanswered: Mutex::new(None),
            repairing: AtomicBool::new(false),
            stop: watch::Sender::new(false),
            closed: watch::Sender::new(None),
        }
    }

    pub(crate) fn link(&self, role: Role) -> &Link {
        match role {
            Role::Publishing => &self.publishing,
            Role::Consuming => &self.consuming,
        }
    }

    /// An [`Error::Connection`] naming the URL without its password.
    pub(crate) fn connection_error(&self, message: impl AsRef<str>) -> Error {
        let mut message = self.settings.url.scrub(message.as_ref());
        // Once per message: a reconnect's last error, already hinted, may be wrapped again.
        if message.contains("invalid peer certificate") && !message.contains("(the server's TLS") {
            message.push_str(if message.contains("UnknownIssuer") {
                " (the server's TLS certificate is not trusted: for a private certificate authority, \
                 add `cacertfile=<its PEM file>` to the URL)"
            } else if message.contains("not valid for name") || message.contains("NotValidForName") {
                " (the server's TLS certificate does not name the host in the URL: connect with a name \
                 it lists, or set `server_name_indication=<that name>`)"
            } else {
                " (the server's TLS certificate was refused: check that it is valid now and issued \
                 by the authority in `cacertfile`)"
            });
        }
        Error::Connection {
            backend: BACKEND,
            url: self.settings.url.redacted.clone(),
            message,
        }
    }

    /// An [`Error::Backend`] with the password scrubbed from the message.
    pub(crate) fn backend_error(&self, message: impl AsRef<str>) -> Error {
        Error::Backend {
            backend: BACKEND,
            message: self.settings.url.scrub(message.as_ref()),
        }
    }

    pub(crate) fn closed_error() -> Error {
        Error::Closed {
            what: "the RabbitMQ router",
            hint: "it was closed; connect a new AmqpRouter",
        }
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Whether a task that watches and reconnects a connection has ended although close did not
    /// stop it: the runtime the router connected on has shut down (or the task panicked). The
    /// connections' own tasks (amqprs's reader and writer) ran there too, so the connections still
    /// look open and connected, but nothing reads from them, and nothing reconnects them.
    pub(crate) fn supervisors_gone(&self) -> bool {
        !*self.stop.borrow()
            && self
                .supervisors
                .lock()
                .expect("supervisors lock")
                .iter()
                .any(|task| task.is_finished())
    }

    /// The live connection of `role`; while reconnecting, waits as `wait` says. The error of a wait
    /// that gives up names what ended it: the setting whose bound ran out, or why it did not wait.
    pub(crate) async fn wait_connected(&self, role: Role, wait: Wait) -> Result<Live> {
        let mut state = self.link(role).state.subscribe();
        loop {
            let last = match &*state.borrow_and_update() {
                LinkState::Connected(live) => return Ok(live.clone()),
                LinkState::Closed => return Err(Self::closed_error()),
                LinkState::Connecting {
                    attempt,
                    last_error,
                    refused,
                    since,
                } => (*attempt, last_error.clone(), *refused, *since),
            };
            let (attempt, last_error, refused, since) = last;
            // "cannot reach RabbitMQ ... check that it is running" only when it was not reached.
            let failed = |text: String| {
                if refused {
                    self.backend_error(text)
                } else {
                    self.connection_error(text)
                }
            };
            // When it gives up: how long the connection has been down by then.
            let down = || {
                format!(
                    "no {} connection for {:.1?} (reconnecting: {} failed, last: {last_error})",
                    role.as_str(),
                    since.elapsed(),
                    plural(u64::from(attempt), "attempt", "attempts"),
                )
            };
            let changed = state.changed();
            let result = match wait {
                Wait::Forever => changed.await,
                Wait::Not(why) => {
                    return Err(failed(format!("{}; {why}", down())));
                }
                Wait::Until {
                    deadline,
                    setting,
                    bound,
                } => match tokio::time::timeout_at(deadline, changed).await {
                    Ok(result) => result,
                    Err(_) => {
                        return Err(failed(format!(
                            "{}; gave up after {bound:?} ({setting})",
                            down()
                        )));
                    }
                },
            };
            if result.is_err() {
                return Err(Self::closed_error());
            }
        }
    }

    /// Opens the connection of `role` (the consuming one also declares the topology); returns it
    /// with its generation.
    pub(crate) async fn establish(&self, role: Role) -> Result<Live> {
        let settings = &self.settings;
        let url = &settings.url;
        let name = format!("{} ({})", settings.connection_name, role.as_str());
        let asked = match &settings.credentials {
            Some(provider) => {
                let asking = provider.ask(
                    &self.runtime,
                    settings.connect_timeout,
                    settings.connect_timeout_source,
                );
                // Close does not wait for a reconnect: one still asking the provider then lets
                // it go (its call is aborted) rather than asking on, then logging in, up to two
                // connect_timeouts after the router closed.
                let mut stop = self.stop.subscribe();
                let asked = tokio::select! {
                    asked = asking => asked,
                    _ = stop.wait_for(|stop| *stop) => return Err(Self::closed_error()),
                };
                Some(asked.map_err(|why| {
                    self.connection_error(format!(
                        "the {} connection was not opened: {why}",
                        role.as_str()
                    ))
                })?)
            }
            None => None,
        };
        let (user, password) = match &asked {
            Some(credentials) => (credentials.user(), credentials.password()),
            None => (url.user.as_str(), url.password.as_str()),
        };
        if asked.is_some()
            && url.auth_mechanism == AuthMechanism::AmqPlain
            && !(amqplain_carries(user) && amqplain_carries(password))
        {
            return Err(self.connection_error(
                "auth_mechanism=amqplain cannot carry the user name or password the credentials \
                 provider gave (amqprs writes each with its length into a text that must be UTF-8, \
                 which some lengths, 128 to 255 bytes among them, are not): use \
                 auth_mechanism=plain, the default",
            ));
        }
        if asked.is_some()
            && url.auth_mechanism == AuthMechanism::Plain
            && !(plain_carries(user) && plain_carries(password))
        {
            // Not sent: RabbitMQ would refuse the login as wrong, and write all of it, the
            // password's bytes included, to its log.
            return Err(self.connection_error(
                "auth_mechanism=plain cannot carry a user name or password with a NUL character \
                 (PLAIN separates the two with it), and the credentials provider gave one: check \
                 what it reads (a secret with binary content?)",
            ));
        }
        let mut arguments = OpenConnectionArguments::new(&url.host, url.port, user, password);
        arguments
            .virtual_host(&url.vhost)
            .heartbeat(settings.heartbeat)
            .connection_name(&name)
            .credentials(url.auth_mechanism.credentials(user, password));
        if url.tls {
            #[cfg(feature = "tls")]
            {
                arguments
                    .scheme("amqps")
                    .tls_adaptor(crate::tls::adaptor(url).map_err(|e| self.connection_error(e))?);
            }
            #[cfg(not(feature = "tls"))]
            return Err(self.connection_error(
                "amqps:// needs the `tls` feature of agentcomm-amqp (on by default); enable it or use amqp://",
            ));
        }
        let connection = match tokio::time::timeout(
            settings.connect_timeout,
            Connection::open(&arguments),
        )
        .await
        {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => {
                let provided = if asked.is_some() {
                    let mut provided = format!(
                        " (logging in as '{user}', from the credentials provider, which is asked \
                         again on the next attempt)"
                    );
                    // The login frame carries both, the connection name and about 150 bytes more.
                    let login = user.len() + password.len();
                    if login + name.len() > LONGEST_LOGIN {
                        provided.push_str(&format!(
                            " (the user name and password take {login} bytes: RabbitMQ reads the \
                             login before the frame size is agreed, and drops a connection whose \
                             login frame is over its limit (4,096 bytes in RabbitMQ 3), with \
                             frame_too_large in its log: a shorter password or token is needed)"
                        ));
                    }
                    provided
                } else {
                    String::new()
                };
                return Err(self.open_error(&error, user, password, &provided).await);
            }
            Err(_) => {
                return Err(self.connection_error(format!(
                    "the {} connection did not open within {:?} ({}): nothing answered. Either the \
                     TCP connection did not complete (a wrong host, a firewall dropping it), or \
                     the port accepted it and did not answer the AMQP handshake, as a port that is \
                     not RabbitMQ's does (Redis's 6379, for one): check the URL's host and port \
                     (RabbitMQ listens on 5672, or 5671 for amqps); a longer timeout helps only a \
                     broker that is slow to answer",
                    role.as_str(),
                    settings.connect_timeout,
                    settings.connect_timeout_source
                )));
            }
        };
        let live = Live {
            ids: Arc::new(ChannelIds::new(connection.channel_max())),
            connection,
            generation: self.next_generation.fetch_add(1, Ordering::Relaxed),
        };
        let prepared = async {
            live.connection
                .register_callback(LinkCallback {
                    role,
                    blocked: self.link(role).blocked.clone(),
                })
                .await
                .map_err(|e| self.connection_error(e.to_string()))?;
            if role == Role::Consuming {
                let topology = self.open_op_channel(&live).await?;
                self.declare_topology(&topology).await?;
                *self.topology.lock().await = Some(topology);
            }
            Ok::<_, Error>(())
        }
        .await;
        if let Err(error) = prepared {
            self.close_connection(&live.connection).await;
            return Err(error);
        }
        Ok(live)
    }

    /// The error of a failed `Connection::open` logging in as `user` with `password` (`provided`:
    /// the note on a login from the credentials provider, or nothing). A broker that was reached
    /// and refused the login or the virtual host is a [`Error::Backend`] saying so, not a
    /// connection error telling to check that RabbitMQ runs; a peer that is not RabbitMQ is named
    /// as such.
    async fn open_error(
        &self,
        error: &amqprs::error::Error,
        user: &str,
        password: &str,
        provided: &str,
    ) -> Error {
        let url = &self.settings.url;
        // What may carry a password is scrubbed; the redacted URL is added after, as in
        // `connection_error`, so that a user whose password is their name is not hidden there too.
        let hide = |text: &str| url.scrub(&scrub(text, password));
        let (text, user, provided) = (hide(&error.to_string()), hide(user), hide(provided));
        let at = format!("RabbitMQ at {}", url.redacted);
        let vhost = &url.vhost;
        let refused = |what: String| Error::Backend {
            backend: BACKEND,
            message: format!("{what}{provided}"),
        };
        // Where the user name and password came from, to be checked there.
        let check = if provided.is_empty() {
            "check the user name and password in the URL"
        } else {
            "check the user name and password the credentials provider gives"
        };
        if url.auth_mechanism != AuthMechanism::External {
            // Scrubbed again once unescaped: in amqprs's Debug text, a password with a `"` or `\`
            // in it is written escaped, which the scrub above does not match.
            if let Some(reply) = close_reply(&text).map(|reply| hide(&reply)) {
                let what = if reply.contains("NOT_ALLOWED") && reply.contains("not found") {
                    format!(
                        "the virtual host '{vhost}' does not exist on {at}: create it with \
                         `rabbitmqctl add_vhost {}`, or fix the URL's path (the virtual host \
                         after the port, %2f for the default '/') (RabbitMQ said: {reply})",
                        shell_word(vhost)
                    )
                } else if reply.contains("ACCESS_REFUSED") {
                    format!(
                        "{at} refused the login of user '{user}': {check} (RabbitMQ said: {reply})"
                    )
                } else if reply.contains("NOT_ALLOWED") && reply.contains("access to vhost") {
                    format!(
                        "{at} refused user '{user}' the virtual host '{vhost}': grant it with \
                         `rabbitmqctl set_permissions -p {} {} '.*' '.*' '.*'` (or narrower \
                         patterns), or use a user that has it (RabbitMQ said: {reply})",
                        shell_word(vhost),
                        shell_word(&user)
                    )
                } else {
                    // A connection limit, and what else RabbitMQ may refuse: its reply names it.
                    format!("{at} refused the connection: {reply}")
                };
                return refused(what);
            }
            if !url.tls && dropped(&text) {
                match speaks_amqp(&url.host, url.port, self.settings.connect_timeout).await {
                    Some(Peer::Amqp) => {
                        return refused(format!(
                            "{at} refused the login of user '{user}': it closed the connection once \
                             the user name and password were sent, as RabbitMQ does when either is \
                             wrong (or the user is guest, from another host than localhost): \
                             {check}; RabbitMQ's log says which ({text})"
                        ));
                    }
                    Some(Peer::Tls) => {
                        return self.connection_error(format!(
                            "{}:{} answers with TLS, not plain AMQP: use amqps:// ({text})",
                            url.host, url.port
                        ));
                    }
                    Some(Peer::Other) => {
                        return self.connection_error(format!(
                            "{}:{} does not speak AMQP 0-9-1 (it answered the AMQP protocol header \
                             with something else): is it the right port? RabbitMQ listens on \
                             5672, or 5671 for amqps ({text})",
                            url.host, url.port
                        ));
                    }
                    // More often a proxy or load balancer whose RabbitMQ is down or restarting
                    // than a wrong port: not told to change a port that may have worked so far.
                    Some(Peer::Closed) => {
                        return self.connection_error(format!(
                            "{}:{} closed the connection without answering the AMQP protocol \
                             header, as a proxy or load balancer in front of a RabbitMQ that is \
                             down or restarting does (or a port that is not RabbitMQ's: it \
                             listens on 5672, or 5671 for amqps) ({text})",
                            url.host, url.port
                        ));
                    }
                    None => {}
                }
            }
        }
        let described = hide(&describe_open_error(error, url.auth_mechanism));
        self.connection_error(format!("{described}{provided}"))
    }

    /// Opens a channel on `live` (a consuming connection) with a callback recording why the broker
    /// closes it.
    pub(crate) async fn open_op_channel(&self, live: &Live) -> Result<OpChannel> {
        let reason: Reason = Arc::default();
        let ended = Arc::new(Notify::new());
        let connection = live.connection.clone();
        let callback = ReasonCallback {
            reason: reason.clone(),
            ended: ended.clone(),
            ids: live.ids.clone(),
        };
        let ids = live.ids.clone();
        // On a task of its own (see `detached`): a channel.open cut short while it registers its
        // responder panics the connection's reader, which takes the whole connection down. One that
        // opens after the timeout is dropped by the task, which closes it.
        let open = detached(&self.runtime, async move {
            let channel = connection
                .open_channel(None)
                .await
                .inspect_err(|error| ids.check_open_error(&connection, error))?;
            channel.register_callback(callback).await?;
            Ok::<_, amqprs::error::Error>(channel)
        });
        let opened = tokio::time::timeout(self.settings.operation_timeout, open)
            .await
            .map(|opened| opened.and_then(|channel| channel.map_err(|error| error.to_string())));
        match opened {
            Ok(Ok(channel)) => Ok(OpChannel {
                channel,
                generation: live.generation,
                reason,
                ended,
            }),
            Ok(Err(error)) => {
                Err(self.connection_error(format!("could not open a channel: {error}")))
            }
            Err(_) => Err(Error::Timeout {
                operation: "opening a RabbitMQ channel".into(),
                after: self.settings.operation_timeout,
            }),
        }
    }

    /// Runs one synchronous AMQP request on `channel` (`request` gets a clone of it), bounded by the
    /// operation timeout; a failure carries the reason the broker gave when it closed the channel.
    /// The request runs on a task of its own (see [`detached`]), so neither this timeout nor a caller
    /// that gives up can cut it short.
    pub(crate) async fn operation<T, F>(
        &self,
        what: &str,
        reason: &Reason,
        channel: &Channel,
        request: impl FnOnce(Channel) -> F,
    ) -> Result<T>
    where
        T: Send + 'static,
        F: Future<Output = std::result::Result<T, amqprs::error::Error>> + Send + 'static,
    {
        self.operation_within(
            self.settings.operation_timeout,
            what,
            reason,
            channel,
            request,
        )
        .await
    }

    /// [`operation`](Self::operation) with a time limit of its own.
    pub(crate) async fn operation_within<T, F>(
        &self,
        limit: Duration,
        what: &str,
        reason: &Reason,
        channel: &Channel,
        request: impl FnOnce(Channel) -> F,
    ) -> Result<T>
    where
        T: Send + 'static,
        F: Future<Output = std::result::Result<T, amqprs::error::Error>> + Send + 'static,
    {
        let failed = |error: String| {
            let why = reason.lock().expect("reason lock").clone().unwrap_or(error);
            self.backend_error(format!("{what} failed: {why}{}", hint_for(&why)))
        };
        match tokio::time::timeout(limit, detached(&self.runtime, request(channel.clone()))).await {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(error))) => Err(failed(error.to_string())),
            Ok(Err(error)) => Err(failed(error)),
            Err(_) => Err(Error::Timeout {
                operation: format!("RabbitMQ to answer: {what}"),
                after: limit,
            }),
        }
    }

    /// Closes `channel`, waiting at most the operation timeout. A channel the broker already closed
    /// (or whose connection is gone) is left as it is.
    pub(crate) async fn close_channel(&self, channel: Channel) {
        // The handshake runs to its end in a task of its own: amqprs's dispatcher panics on a
        // close-ok whose waiter was dropped, so a slow close is left to finish (or to end with its
        // connection) instead of being cancelled.
        let closing = self.runtime.spawn(channel.close());
        let why = match tokio::time::timeout(self.settings.operation_timeout, closing).await {
            Ok(Ok(Ok(()))) => return,
            Ok(Ok(Err(error))) => error.to_string(),
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no answer within {:?}", self.settings.operation_timeout),
        };
        tracing::debug!(error = %why, "closing a channel failed; it ends with its connection");
    }

    /// [`close_channel`](Self::close_channel) in the background, for paths that must not wait.
    pub(crate) fn close_channel_later(self: &Arc<Self>, channel: Channel) {
        let inner = self.clone();
        self.runtime
            .spawn(async move { inner.close_channel(channel).await });
    }

    /// Closes `connection`, waiting at most the operation timeout.
    pub(crate) async fn close_connection(&self, connection: &Connection) {
        // On a task of its own (see `detached`): a close handshake cut short by the timeout would
        // panic the connection's reader.
        let _ = tokio::time::timeout(
            self.settings.operation_timeout,
            detached(&self.runtime, connection.clone().close()),
        )
        .await;
    }

    /// Closes `connection`, waiting until `deadline` at most; past it, the close goes on in the
    /// background. It is begun even when the deadline has passed.
    pub(crate) async fn close_connection_by(&self, connection: &Connection, deadline: Instant) {
        let closing = self.runtime.spawn(connection.clone().close());
        let _ = tokio::time::timeout_at(deadline, closing).await;
    }

    /// Closes a connection being recycled. One whose reader is gone cannot close by handshake: amqprs
    /// waits for the close-ok through that reader, and marks the connection closed first, which would
    /// also stop its fallback. That fallback, run when the last handle to the connection is dropped,
    /// sends connection.close without waiting for an answer, and RabbitMQ then closes the connection
    /// and gives back what its consumers held; so such a connection is only let go.
    async fn retire(&self, live: &Live) {
        if live.ids.reader_gone.load(Ordering::Acquire) {
            tracing::debug!(
                generation = live.generation,
                "the recycled connection is closed once its last handle is dropped"
            );
            return;
        }
        self.close_connection(&live.connection).await;
    }

    /// Declares the exchange, and the dead-letter exchange and queue with their bindings.
    async fn declare_topology(&self, op: &OpChannel) -> Result<()> {
        let settings = &self.settings;
        let mut exchange = ExchangeDeclareArguments::new(&settings.exchange, "topic");
        exchange.durable(true);
        self.operation(
            &format!("declaring the topic exchange '{}'", settings.exchange),
            &op.reason,
            &op.channel,
            move |channel| async move { channel.exchange_declare(exchange).await },
        )
        .await?;
        let mut dead_letter_exchange =
            ExchangeDeclareArguments::new(&settings.dead_letter_exchange, "fanout");
        dead_letter_exchange.durable(true);
        self.operation(
            &format!(
                "declaring the dead-letter exchange '{}'",
                settings.dead_letter_exchange
            ),
            &op.reason,
            &op.channel,
            move |channel| async move { channel.exchange_declare(dead_letter_exchange).await },
        )
        .await?;
        if let Some(queue) = &settings.dead_letter_queue {
            let mut arguments = FieldTable::new();
            put(
                &mut arguments,
                "x-queue-type",
                settings.queue_type.as_str().into(),
            );
            let mut declare = QueueDeclareArguments::durable_client_named(queue);
            declare.arguments(arguments);
            self.operation(
                &format!("declaring the dead-letter queue '{queue}'"),
                &op.reason,
                &op.channel,
                move |channel| async move { channel.queue_declare(declare).await },
            )
            .await?;
            self.remember_queue(queue);
            for (exchange, key) in [
                (settings.dead_letter_exchange.as_str(), ""),
                (settings.exchange.as_str(), DEAD_LETTER_BINDING),
            ] {
                let bind = QueueBindArguments::new(queue, exchange, key);
                self.operation(
                    &format!("binding the dead-letter queue '{queue}' to '{exchange}'"),
                    &op.reason,
                    &op.channel,
                    move |channel| async move { channel.queue_bind(bind).await },
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Declares the exchange and dead-letter topology again (after the broker closed a channel with
    /// NOT_FOUND, say, because someone deleted the exchange).
    pub(crate) async fn redeclare_topology(&self) -> Result<()> {
        let wait = Wait::Not("the topology is declared again on the next connection");
        self.with_op_channel(wait, async |op: &OpChannel| self.declare_topology(op).await)
            .await
    }

    /// The health probe found the exchange gone (someone deleted it): declares the topology again
    /// and binds the subscriptions' queues again ([`Inner::rebind_subscriptions`]), in the
    /// background, once at a time. A router that only consumes never publishes into the 404 that
    /// repairs it otherwise, and its subscribers would wait for ever.
    pub(crate) fn repair_topology(self: &Arc<Self>) {
        if self.repairing.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = self.clone();
        self.runtime.spawn(async move {
            tracing::warn!(
                exchange = %inner.settings.exchange,
                "RabbitMQ says the exchange does not exist (deleted?): declaring it again and binding the subscriptions' queues again"
            );
            inner.redeclare_and_rebind(false).await;
            inner.repairing.store(false, Ordering::Release);
        });
    }

    /// Declares the topology again, then binds the subscriptions' queues again. `quiet`: the
    /// periodic check, which logs a success at debug level only.
    pub(crate) async fn redeclare_and_rebind(&self, quiet: bool) {
        match tokio::time::timeout(self.settings.operation_timeout, self.redeclare_topology()).await
        {
            Ok(Ok(())) => self.rebind_subscriptions(quiet).await,
            Ok(Err(error)) => {
                tracing::warn!(error = %error, "could not declare the topology again")
            }
            Err(_) => tracing::warn!("declaring the topology again took too long"),
        }
    }

    /// Runs `f` with the declaration channel of the live consuming connection, opening one if needed.
    /// A failed operation closes the channel (the broker does, on errors), so the next call opens a
    /// new one.
    pub(crate) async fn with_op_channel<T>(
        &self,
        wait: Wait,
        f: impl AsyncFnOnce(&OpChannel) -> Result<T>,
    ) -> Result<T> {
        self.with_op_channel_queued_until(wait, None, None, f).await
    }

    /// [`with_op_channel`](Self::with_op_channel), giving up at `queued_until` (if any) while the
    /// channel is busy with the requests before it: given up then, it has touched nothing. `watch`
    /// (the health probe's) is told whether it waited for the channel, when it holds it, and when
    /// RabbitMQ answered its opening.
    pub(crate) async fn with_op_channel_queued_until<T>(
        &self,
        wait: Wait,
        queued_until: Option<Instant>,
        watch: Option<&ProbeWatch>,
        f: impl AsyncFnOnce(&OpChannel) -> Result<T>,
    ) -> Result<T> {
        let live = self.wait_connected(Role::Consuming, wait).await?;
        let queued = Instant::now();
        let (mut slot, waited) = match self.topology.try_lock() {
            Ok(slot) => (slot, false),
            Err(_) => {
                let slot = match queued_until {
                    None => self.topology.lock().await,
                    Some(until) => tokio::time::timeout_at(until, self.topology.lock())
                        .await
                        .map_err(|_| Error::Timeout {
                            operation:
                                "the declaration channel, busy with the requests before this one"
                                    .into(),
                            after: queued.elapsed(),
                        })?,
                };
                (slot, true)
            }
        };
        if let Some(watch) = watch {
            watch.waited.store(waited, Ordering::Release);
            watch.generation.store(live.generation, Ordering::Release);
            let _ = watch.held_at.set(Instant::now());
            watch.held.store(true, Ordering::Release);
        }
        let usable = slot
            .as_ref()
            .is_some_and(|op| op.generation == live.generation && op.channel.is_open());
        if !usable {
            *slot = Some(self.open_op_channel(&live).await?);
            if let Some(watch) = watch {
                watch.answered.store(true, Ordering::Release);
            }
        }
        // Armed until `f` finishes well. A request cut short (its caller gave up, or it timed out)
        // goes on in its own task, and its reply is still to come: a next request of the same kind
        // on this channel would take that reply for its own, and its own reply would then find no
        // waiter, which panics amqprs's dispatcher. Any other failure means the broker closed the
        // channel, or amqprs lost track of it. Either way the channel is never used again (dropping
        // its last handle closes it).
        let mut retire = RetireOnDrop { slot, armed: true };
        let Some(op) = retire.slot.as_ref() else {
            return Err(self.backend_error("the declaration channel went missing"));
        };
        let result = f(op).await;
        retire.armed = result.is_err();
        result
    }

    /// The arguments of the queues consumers read: the queue type and the dead-letter exchange.
    pub(crate) fn queue_arguments(
        &self,
        queue_type: QueueType,
        expires: Option<Duration>,
    ) -> FieldTable {
        let settings = &self.settings;
        let mut arguments = FieldTable::new();
        put(&mut arguments, "x-queue-type", queue_type.as_str().into());
        put(
            &mut arguments,
            "x-dead-letter-exchange",
            settings.dead_letter_exchange.as_str().into(),
        );
        if let Some(expires) = expires {
            put(
                &mut arguments,
                "x-expires",
                FieldValue::l(expires.as_millis().min(i64::MAX as u128) as i64),
            );
        }
        if queue_type == QueueType::Quorum
            && let Some(limit) = settings.delivery_limit
        {
            put(
                &mut arguments,
                "x-delivery-limit",
                FieldValue::l(i64::from(limit)),
            );
        }
        arguments
    }

    /// Marks the connection of `role` as lost. Publishing: fails the confirms waiting on it (their
    /// publishes are sent again after the reconnect). Consuming: forgets its declaration channel and
    /// which retry queues were declared (consumers notice the loss themselves).
    pub(crate) async fn on_lost(&self, role: Role, live: &Live, why: &str) {
        let link = self.link(role);
        // `connected` is cleared before the publisher slot is taken: a publisher opened on the lost
        // connection either lands in the slot first (and is failed here) or sees the change and is
        // failed by whoever opened it.
        let _ = link.connected.compare_exchange(
            live.generation,
            0,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        let _ = link.state.send_if_modified(|state| match state {
            LinkState::Connected(current) if current.generation == live.generation => {
                *state = LinkState::Connecting {
                    attempt: 0,
                    last_error: Arc::from(why),
                    refused: false,
                    since: Instant::now(),
                };
                true
            }
            _ => false,
        });
        match role {
            Role::Publishing => {
                let publisher = {
                    let mut slot = self.publisher.lock().expect("publisher lock");
                    if slot
                        .as_ref()
                        .is_some_and(|p| p.generation == live.generation)
                    {
                        slot.take()
                    } else {
                        None
                    }
                };
                if let Some(publisher) = publisher {
                    publisher.confirms.fail_all(why);
                }
            }
            Role::Consuming => {
                let mut slot = self.topology.lock().await;
                if slot
                    .as_ref()
                    .is_some_and(|op| op.generation == live.generation)
                {
                    *slot = None;
                }
                drop(slot);
                self.retry_queues.lock().expect("retry lock").clear();
            }
        }
    }

    /// Records a durable queue this router declared.
    pub(crate) fn remember_queue(&self, queue: &str) {
        let mut declared = self.declared_queues.lock().expect("declared lock");
        if !declared.contains(queue) {
            declared.insert(queue.to_string());
        }
    }
}

/// Empties the declaration channel's slot when dropped armed (see `with_op_channel`).
struct RetireOnDrop<'a> {
    slot: tokio::sync::MutexGuard<'a, Option<OpChannel>>,
    armed: bool,
}

impl Drop for RetireOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            *self.slot = None;
        }
    }
}

/// Runs an amqprs request on a task of its own and waits for its result; an error only when that
/// task could not finish (the runtime is shutting down).
///
/// amqprs's requests are not cancel-safe. One dropped while it registers its responder panics the
/// channel's dispatcher (or, for a channel.open or connection.close, the connection's reader): the
/// channel then fails every later request while still reporting itself open. One dropped after it
/// was sent leaves its reply to the next request of the same kind, whose own reply then panics the
/// dispatcher. A spawned task runs to its end even when its handle is dropped, so neither a caller's
/// timeout nor a `select!` can cut a request short. For rare requests only (declarations, cancels,
/// opening and closing): the ack and publish paths send no request that waits for a reply.
///
/// On `runtime`, the router's: a channel.open starts amqprs's dispatcher of the channel where it
/// runs, and a request on a caller's runtime (a health check or a retry from a `block_on` helper)
/// would end with that runtime, leaving a channel whose answers have nowhere to go.
pub(crate) async fn detached<T: Send + 'static>(
    runtime: &tokio::runtime::Handle,
    request: impl Future<Output = T> + Send + 'static,
) -> std::result::Result<T, String> {
    runtime
        .spawn(request)
        .await
        .map_err(|error| format!("the request's task ended early: {error}"))
}

/// Adds a field to an AMQP table (names are short and static).
pub(crate) fn put(table: &mut FieldTable, name: &str, value: FieldValue) {
    table.insert(
        name.try_into().expect("AMQP field names here are short"),
        value,
    );
}

/// A hint for the broker errors users can fix.
pub(crate) fn hint_for(reason: &str) -> &'static str {
    if reason.contains("PRECONDITION_FAILED") && reason.contains("inequivalent") {
        " (it already exists with other settings: delete it, or use the same exchange type, queue type and dead-letter settings)"
    } else if reason.contains("ACCESS_REFUSED") {
        " (the user lacks permission on this virtual host: grant it with rabbitmqctl set_permissions)"
    } else if reason.contains("NOT_FOUND") {
        " (it does not exist: the topology is declared again on the next attempt)"
    } else {
        ""
    }
}

/// Where a refused certificate login (`auth_mechanism=external`) is to be looked for: the URL's user
/// name and password are not sent.
const EXTERNAL_LOGIN: &str = "with auth_mechanism=external RabbitMQ logs in the user the client \
     certificate names (its subject's distinguished name, or its common name with \
     ssl_cert_login_from = common_name): check that this user exists and may use this virtual host";

fn describe_open_error(error: &amqprs::error::Error, mechanism: AuthMechanism) -> String {
    let text = error.to_string();
    let external = mechanism == AuthMechanism::External;
    if text.contains("authentication '") && text.contains("is not supported by server") {
        format!(
            "{text} (RabbitMQ does not offer the URL's auth_mechanism: EXTERNAL needs the \
             rabbitmq_auth_mechanism_ssl plugin and EXTERNAL in the broker's auth_mechanisms)"
        )
    } else if external
        && (text.contains("ACCESS_REFUSED")
            || text.contains("403")
            || text.contains("reset by peer")
            || text.contains("unexpected end of file")
            || text.contains("early eof")
            || text.contains("peer shutdown"))
    {
        format!(
            "{text} (the broker refused the login or dropped the connection during the handshake, \
             as RabbitMQ does on a failed login: {EXTERNAL_LOGIN})"
        )
    } else if text.contains("ACCESS_REFUSED") || text.contains("403") {
        format!(
            "{text} (the user name or password is wrong, or the user may not use this virtual host)"
        )
    } else if text.contains("NOT_ALLOWED") || text.contains("530") {
        format!("{text} (the virtual host does not exist or the user may not open it)")
    } else if text.contains("InvalidContentType") || text.contains("corrupt message") {
        format!(
            "{text} (the port does not answer TLS: use amqp:// for a plain AMQP port, or the broker's TLS port, usually 5671)"
        )
    } else if text.contains("reset by peer")
        || text.contains("unexpected end of file")
        || text.contains("early eof")
        || text.contains("peer shutdown")
    {
        format!(
            "{text} (the broker dropped the connection during the handshake: RabbitMQ does that on a failed login, \
             so check the user name and password; or the port speaks TLS and the URL is amqp://)"
        )
    } else {
        text
    }
}

/// `word` as one word for a POSIX shell, to be pasted into a command: as it is when it has nothing
/// a shell reads specially, otherwise in single quotes (a virtual host may have spaces, quotes, `$`).
fn shell_word(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:@%+=,".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Whether an open failed because the peer closed or reset the connection during the handshake.
fn dropped(text: &str) -> bool {
    text.contains("reset by peer")
        || text.contains("unexpected end of file")
        || text.contains("early eof")
        || text.contains("peer shutdown")
        || text.contains("connection interrupted")
}

/// The reply text of the connection.close a broker answered an open with, from amqprs's error
/// (which carries only the frame's `Debug` form: `reply_text: ShortStr(41, "NOT_ALLOWED - ...")`).
fn close_reply(text: &str) -> Option<String> {
    let start = text.find("reply_text: ShortStr(")?;
    let rest = &text[start..];
    let quoted = &rest[rest.find('"')? + 1..];
    let end = quoted.find("\"), class_id").or_else(|| quoted.rfind('"'))?;
    Some(quoted[..end].replace("\\\"", "\"").replace("\\\\", "\\"))
}

/// What answered at an address whose peer dropped the connection during the handshake.
enum Peer {
    /// It answers the AMQP 0-9-1 protocol header with a method frame: an AMQP broker.
    Amqp,
    /// It answers with a TLS record (a TLS port, reached with amqp://).
    Tls,
    /// It answers otherwise.
    Other,
    /// It closes the connection without answering.
    Closed,
}

/// Sends the AMQP 0-9-1 protocol header to `host:port` on a connection of its own and looks at the
/// first byte of the answer (bounded by `bound`, at most 3 s); `None` when that cannot tell (no
/// connection, no answer in time). RabbitMQ answers with connection.start at once, and never
/// closes or resets a connection before.
async fn speaks_amqp(host: &str, port: u16, bound: Duration) -> Option<Peer> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        // A peer that closes at once may fail the write or reset the read: both are its answer.
        let _ = stream.write_all(b"AMQP\x00\x00\x09\x01").await;
        let mut first = [0u8; 1];
        Some(match stream.read(&mut first).await.unwrap_or(0) {
            0 => Peer::Closed,
            _ if first[0] == 1 => Peer::Amqp,
            _ if first[0] == 0x15 || first[0] == 0x16 => Peer::Tls,
            _ => Peer::Other,
        })
    };
    tokio::time::timeout(bound.min(Duration::from_secs(3)), probe)
        .await
        .ok()
        .flatten()
}

/// Completes when `connection` is lost (network failure, heartbeat timeout, or closed by the broker).
async fn connection_lost(connection: &Connection) {
    let failure = connection.listen_network_io_failure();
    tokio::pin!(failure);
    // The notification is a broadcast: one sent before we listened is missed, so also poll.
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = &mut failure => return,
            _ = tick.tick() => {
                if !connection.is_open() {
                    return;
                }
            }
        }
    }
}

/// Watches the connection of `role` and reconnects with backoff until the router is closed or
/// dropped.
pub(crate) async fn supervise(
    inner: Weak<Inner>,
    role: Role,
    mut live: Live,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        // `Some(why)` when the connection is to be recycled (see `ChannelIds`), `None` when lost.
        let recycle = tokio::select! {
            () = connection_lost(&live.connection) => None,
            why = live.ids.recycle_asked() => Some(why),
            _ = stop.wait_for(|stop| *stop) => return,
        };
        {
            let Some(inner) = inner.upgrade() else { return };
            if *stop.borrow() {
                // Close is past its drain and shuts the connections down itself.
                return;
            }
            match recycle {
                None => {
                    bump(&inner.counters.connection_losses);
                    tracing::warn!(
                        url = %inner.settings.url.redacted,
                        connection = role.as_str(),
                        generation = live.generation,
                        "lost a connection to RabbitMQ; reconnecting"
                    );
                    inner.on_lost(role, &live, LOST).await;
                }
                Some(why) => {
                    bump(&inner.counters.channel_id_recycles);
                    tracing::warn!(
                        url = %inner.settings.url.redacted,
                        connection = role.as_str(),
                        generation = live.generation,
                        reason = %why,
                        "recycling a connection to RabbitMQ before it runs out of channel ids; reconnecting"
                    );
                    // As for a loss: publishes waiting for a confirm are sent again on the next
                    // connection, consumers are restored there, and closing this one gives back what
                    // its consumers held unacknowledged.
                    inner
                        .on_lost(role, &live, &format!("the connection is recycled: {why}"))
                        .await;
                    inner.retire(&live).await;
                }
            }
        }
        let mut attempt = 0u32;
        live = loop {
            let Some(strong) = inner.upgrade() else {
                return;
            };
            // Reconnects go on while close drains its subscriptions (`closing` is set, `stop` not
            // yet): publishes are still taken then, so that handlers finishing their messages
            // can send their replies, and those need a connection after a network blip.
            if *stop.borrow() {
                return;
            }
            attempt = attempt.saturating_add(1);
            match strong.establish(role).await {
                Ok(new_live) if *stop.borrow() || !strong.link(role).on_connected(&new_live) => {
                    // Closed while this attempt was connecting: do not come back to life.
                    strong.close_connection(&new_live.connection).await;
                    return;
                }
                Ok(new_live) => {
                    bump(&strong.counters.reconnects);
                    tracing::info!(
                        url = %strong.settings.url.redacted,
                        connection = role.as_str(),
                        attempt,
                        generation = new_live.generation,
                        "reconnected to RabbitMQ"
                    );
                    break new_live;
                }
                // Closed while this attempt asked the credentials provider.
                Err(_) if *stop.borrow() => return,
                Err(error) => {
                    bump(&strong.counters.connect_failures);
                    let delay = strong.settings.reconnect.delay(attempt);
                    tracing::warn!(
                        connection = role.as_str(),
                        error = %error,
                        attempt,
                        retry_in_ms = delay.as_millis() as u64,
                        "reconnecting to RabbitMQ failed"
                    );
                    strong.link(role).state.send_if_modified(|state| {
                        let LinkState::Connecting { since, .. } = state else {
                            return false;
                        };
                        let since = *since;
                        *state = LinkState::Connecting {
                            attempt,
                            last_error: Arc::from(error.to_string()),
                            refused: matches!(error, Error::Backend { .. }),
                            since,
                        };
                        true
                    });
                    drop(strong);
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        _ = stop.wait_for(|stop| *stop) => return,
                    }
                }
            }
        };
    }
}

/// How often a router with subscriptions declares its topology and binds their queues again.
pub(crate) const REBIND_EVERY: Duration = Duration::from_secs(15);

/// Every [`REBIND_EVERY`], while the router has consuming subscriptions: declares the topology and
/// binds their queues again (both idempotent). Deleting the exchange deletes every binding to it;
/// the router that meets the 404 declares it again (and binds its own subscriptions), and from then
/// on every other router's probe finds the exchange there, though their queues are no longer bound:
/// with publishers and consumers in different processes, a busy publisher re-creates it within
/// milliseconds, and the consumers' queues would stay unbound for good. Holds the router only while
/// it works, and ends with it.
async fn keep_bound(inner: Weak<Inner>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(REBIND_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once: the topology was just declared.
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        let Some(inner) = inner.upgrade() else { return };
        if inner.is_closing()
            || inner.consuming.connected.load(Ordering::Acquire) == 0
            || !inner.has_consuming_subscriptions()
            || inner.repairing.swap(true, Ordering::AcqRel)
        {
            continue;
        }
        inner.redeclare_and_rebind(true).await;
        inner.repairing.store(false, Ordering::Release);
    }
}

/// Starts the router's connections: the first ones are made here (their failure is the caller's
/// error; the consuming one declares the topology, so a misconfiguration shows at once), and the
/// publishing channel opened on the publishing one (see [`Inner::open_publisher_at_connect`]);
/// reconnections run in the background.
pub(crate) async fn start(inner: &Arc<Inner>) -> Result<()> {
    let consuming = inner.establish(Role::Consuming).await?;
    let publishing = match inner.establish(Role::Publishing).await {
        Ok(live) => live,
        Err(error) => {
            inner.close_connection(&consuming.connection).await;
            return Err(error);
        }
    };
    for (role, live) in [(Role::Consuming, consuming), (Role::Publishing, publishing)] {
        inner.link(role).on_connected(&live);
        let weak = Arc::downgrade(inner);
        let supervisor = tokio::spawn(supervise(weak, role, live, inner.stop.subscribe()));
        inner
            .supervisors
            .lock()
            .expect("supervisors lock")
            .push(supervisor);
    }
    tokio::spawn(keep_bound(Arc::downgrade(inner), inner.stop.subscribe()));
    inner.open_publisher_at_connect().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_is_recycled_once_the_broker_closed_half_of_its_channel_ids() {
        // RabbitMQ's default channel_max.
        let ids = ChannelIds::new(2047);
        for _ in 0..1022 {
            ids.closed_by_broker();
        }
        assert!(ids.recycle.borrow().is_none(), "1,022 closes leave room");
        ids.closed_by_broker();
        let why = tokio::time::timeout(Duration::from_secs(1), ids.recycle_asked())
            .await
            .expect("asked at the 1,023rd close");
        assert!(why.contains("RabbitMQ closed 1023 channels"), "{why}");
        assert!(why.contains("channel_max is 2047"), "{why}");
        // Later closes keep the first reason.
        ids.closed_by_broker();
        assert_eq!(ids.recycle_asked().await, why);
        // A broker without a limit, and one with a tiny one.
        assert_eq!(ChannelIds::new(0).limit, 32767);
        assert_eq!(ChannelIds::new(1).limit, 1);
    }
}
