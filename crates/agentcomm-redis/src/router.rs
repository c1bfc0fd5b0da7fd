//! [`RedisRouter`]: the [`Router`] implementation.

use std::collections::HashMap;
use std::fmt;
use std::fmt::Write as _;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use agentcomm_core::channel::{Channel, DEAD_LETTER_CLASS, REPLY_DIRECTION};
use agentcomm_core::envelope::Envelope;
use agentcomm_core::error::{Error, Result};
use agentcomm_core::router::{
    BoxFuture, Capabilities, Health, HealthStatus, PublishOutcome, Router, SubscribeOptions,
    Subscription,
};
use bytes::Bytes;
use fred::bytes_utils::Str;
use fred::clients::{Client, Pool};
use fred::interfaces::{
    ClientLike, EventInterface, KeysInterface, LuaInterface, PubsubInterface, SetsInterface,
    StreamsInterface,
};
use fred::types::config::Config;
use fred::types::streams::XCap;
use fred::types::{Builder, ClusterHash, CustomCommand, Expiration, Key, SetOptions, Value};

use crate::builder::{DeliveryMode, RedisRouterBuilder, Settings};
use crate::connection::{
    ConnectingPool, Role, connect_error, fred_builder, fred_config, fred_pool, gave_up_error,
    is_noscript, map_error, redact, watch_client, watch_connection_task,
};
use crate::counters::{Counters, LogLimiter};
use crate::hashing::FastState;
use crate::keys::Keys;
use crate::pubsub::PubSubHub;
use crate::sequence::{SEQUENCE_HEADER, SequenceText, new_publisher_id};
use crate::streams::{FRAME_FIELD, StreamSubscription};

/// Adds a frame to a class stream once per publisher sequence number, even when fred writes the command
/// again after a reconnect. KEYS: stream, the publisher's high-water mark on that stream. ARGV: sequence
/// number, mark time-to-live in ms, approximate maximum length (0: no trimming), frame, pub/sub channel
/// to publish the frame to as well ('' for none).
///
/// A publisher hands its publishes of one stream to one connection in the order of their numbers (see
/// [`Shared::in_order`]), and Redis runs a connection's commands in order, replays included: so a number
/// not above the mark was run already, and this run is a replay. Numbers that never reach Redis (a
/// command fred gave up on) leave nothing behind. Returns false for a replay, else the number of pub/sub
/// receivers; when Redis refuses the `PUBLISH` (an ACL user that may not publish), a one-element array
/// with its error: the frame is stored by then, and a script that failed would not undo the `XADD`, so
/// its publisher, told the publish failed, would publish it again and store it twice.
const PUBLISH_SCRIPT: &str = r#"
local seq = tonumber(ARGV[1])
local last = redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2], 'GET')
if last and tonumber(last) >= seq then
  redis.call('SET', KEYS[2], last, 'PX', ARGV[2])
  return false
end
if ARGV[3] == '0' then
  redis.call('XADD', KEYS[1], '*', 'f', ARGV[4])
else
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'f', ARGV[4])
end
if ARGV[5] ~= '' then
  local published = redis.pcall('PUBLISH', ARGV[5], ARGV[4])
  if type(published) == 'table' and published.err then
    return {published.err}
  end
  return published
end
return 0
"#;

/// How long an idle publisher's high-water mark is kept. Replays come within a command timeout.
const DEDUP_TTL_MS: i64 = 3_600_000;
/// How often a publisher lists its classes in the registry again (a Redis restart without persistence,
/// or `FLUSHDB`, would otherwise hide them from wildcard subscriptions for good).
const REGISTRY_REFRESH: Duration = Duration::from_secs(60);
/// How many channels a publisher numbers before it starts afresh under a new publisher id.
const MAX_PUBLISHER_CHANNELS: usize = 100_000;
/// A pub/sub `publish_batch` is numbered, encoded and sent in pipelines of at most this many
/// messages, or of about [`PUBSUB_CHUNK_BYTES`]: a message takes its sequence number when it is
/// encoded, and a publish of its channel that takes a later number meanwhile goes out at once.
/// Encoding a whole large batch before sending any of it kept its first numbers out longer than the
/// subscribers' reorder window: they counted them as lost, then discarded them as repeats when they
/// came.
const PUBSUB_CHUNK_MESSAGES: usize = 256;
/// See [`PUBSUB_CHUNK_MESSAGES`].
const PUBSUB_CHUNK_BYTES: usize = 256 * 1024;
/// How long a malformed frame's marker keeps other subscriptions from dead-lettering it again.
const MALFORMED_MARKER_TTL_MS: i64 = 3_600_000;

/// The one field of a stream entry, its frame: the field's name is fred's static key (not copied for
/// every `XADD`), and one pair is no list to allocate.
fn frame_field(frame: Bytes) -> (Key, Value) {
    (Key::from_static_str(FRAME_FIELD), Value::Bytes(frame))
}

/// Where one class's messages go, computed once per router: its keys, the pool connection that writes
/// them (always the same, so that a stream's publishes stay in order), and its next sequence number.
struct StreamTarget {
    class: String,
    stream: Key,
    /// The cluster hash slot of `stream` (and of `dedup`, which shares its hash tag): where a custom
    /// command for it must go, since fred routes a custom command by its first argument otherwise.
    slot: u16,
    dedup: Key,
    client: usize,
    /// `MAXLEN ~` of the stream, 0 for none.
    max_len: i64,
    /// The next sequence number; taken under the connection's order lock.
    next: AtomicU64,
    /// The registry generation the class was last listed in, and when it is listed again (ms since the
    /// router started).
    registered_generation: AtomicU64,
    refresh_at_ms: AtomicU64,
    registering: tokio::sync::Mutex<()>,
    /// Publishes so far (when to look at the clock again).
    publishes: AtomicU64,
}

impl StreamTarget {
    /// The `MAXLEN ~` of an `XADD` to this stream.
    fn cap(&self) -> XCap {
        if self.max_len > 0 {
            XCap::try_from(("MAXLEN", "~", self.max_len)).unwrap_or_else(|_| XCap::from(None))
        } else {
            XCap::from(None)
        }
    }
}

/// Where one pub/sub channel's messages go, and the last sequence number used on it.
pub(crate) struct ChannelRoute {
    pub(crate) channel: Str,
    pub(crate) client: usize,
    next: AtomicU64,
    /// The publisher id its numbers go with, and `/`: the one of the router's numbering when the route
    /// was made (a restart of the numbering makes new routes).
    publisher: String,
    /// Unique in the process: names the route where holding it would cost (see
    /// [`Shared::publish_numbered`]).
    id: u64,
    /// Numbers of messages never published (refused by Redis, or not encoded) that could not be given
    /// back yet because a later number was taken, as runs: given back when every number above them is
    /// (see [`ChannelRoute::give_back`]). Touched only when a publish fails.
    unused: Mutex<Vec<UnusedRun>>,
    /// How long a run of `unused` can still be waiting for a number above it (see
    /// [`ChannelRoute::give_back`]): twice the command timeout and 5 s.
    stale_after: Duration,
}

/// Numbers `low..=high` of a channel route, never published, waiting for those above them to be given
/// back; `since`: when the run last changed.
struct UnusedRun {
    low: u64,
    high: u64,
    since: Instant,
}

/// How many runs of unused numbers a channel route keeps before it looks for stale ones. A run stays
/// for good when a later number of its channel went out (a gap subscribers count as lost, and whose
/// publisher got the error); the number just above a run was out when the run last changed, and its
/// publisher hears back within the command timeout (twice that for a stored publish sent again after
/// `NOSCRIPT`), so a run unchanged for longer than [`ChannelRoute::stale_after`] is such a gap, and is
/// forgotten. One not that old may still be given back: concurrent publishes refused together whose
/// callers take their errors in another order than their numbers' (each task as the runtime polls it)
/// leave many separate runs, every one of them given back in the end.
const MAX_UNUSED_RUNS: usize = 64;

/// The most runs of unused numbers a channel route keeps, stale or not: beyond this many (all younger
/// than [`ChannelRoute::stale_after`], so as many separate runs refused within that time) the lowest
/// is forgotten. At most 128 KiB a route.
const MAX_UNUSED_RUNS_HELD: usize = 4096;

impl ChannelRoute {
    /// Gives `number` back: the message that had it was never published, and the gap it would leave
    /// would make every subscriber of the channel count a loss. The last number taken is given back at
    /// once, and with it every unused one right below it; one below a number still out (another
    /// publish, concurrent, that took the next number) waits in `unused` until that one is given back
    /// too. Concurrent publishes refused together (an ACL that denies the channel) are answered in the
    /// order of their numbers, the lowest first: giving back only the last one taken would leave a gap
    /// for all the others.
    fn give_back(&self, number: u64) {
        let now = Instant::now();
        let mut unused = self.unused.lock().unwrap_or_else(PoisonError::into_inner);
        let below = unused.iter().position(|run| run.high + 1 == number);
        let above = unused.iter().position(|run| run.low == number + 1);
        match (below, above) {
            (Some(below), Some(above)) => {
                // Updated before the swap, which may move it: its new place keeps the run.
                unused[below].high = unused[above].high;
                unused[below].since = now;
                unused.swap_remove(above);
            }
            (Some(below), None) => {
                unused[below].high = number;
                unused[below].since = now;
            }
            (None, Some(above)) => {
                unused[above].low = number;
                unused[above].since = now;
            }
            (None, None) => unused.push(UnusedRun {
                low: number,
                high: number,
                since: now,
            }),
        }
        loop {
            let last = self.next.load(Ordering::Relaxed);
            let Some(at) = unused.iter().position(|run| run.high == last) else {
                break;
            };
            // Fails only when another publish took a number meanwhile: then the last is that one.
            if self
                .next
                .compare_exchange(
                    last,
                    unused[at].low - 1,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
            {
                unused.swap_remove(at);
            }
        }
        if unused.len() > MAX_UNUSED_RUNS {
            // Stale runs only (see MAX_UNUSED_RUNS): forgetting one that could still be given back
            // would leave its numbers as a gap for good.
            unused.retain(|run| now.saturating_duration_since(run.since) <= self.stale_after);
        }
        if unused.len() > MAX_UNUSED_RUNS_HELD
            && let Some((at, _)) = unused.iter().enumerate().min_by_key(|(_, run)| run.high)
        {
            unused.swap_remove(at);
        }
    }
}

/// Encodes `envelope` for pub/sub with the next number of `route`, its channel's route; the caller holds
/// the order lock of the route's connection. The number is taken only once the envelope is known to
/// encode, and given back if the encoding failed after all (see [`Shared::pubsub_frame`]).
fn frame_on_route(route: &ChannelRoute, envelope: &Envelope) -> Result<(u64, Bytes)> {
    let mut numbered = None;
    let encoded = envelope.to_frame_with_header_from(SEQUENCE_HEADER, || {
        let number = route.next.fetch_add(1, Ordering::Relaxed) + 1;
        numbered = Some(number);
        SequenceText::new(&route.publisher, number)
    });
    match (encoded, numbered) {
        (Ok(frame), Some(number)) => Ok((number, Bytes::from(frame))),
        (Ok(_), None) => Err(Error::Backend {
            backend: "redis",
            message: "a pub/sub frame was encoded without its sequence number".into(),
        }),
        (Err(error), numbered) => {
            if let Some(number) = numbered {
                route.give_back(number);
            }
            Err(error)
        }
    }
}

/// What a `publish_batch` append (`XADD` in a pipeline, without idempotent publishing) that failed on a
/// timeout or a cut connection was doing: fred (10.x) does not mark a pipeline whose wait timed out as
/// timed out, as it does a single command, so its commands may still be written after a reconnect;
/// or they ran and the reply was lost. The message may be stored, and publishing it again may store it
/// twice: the error says so, and names the fix.
const UNCERTAIN_BATCH_APPEND: &str = "XADD in a publish_batch pipeline (the message may have been \
     stored, or may still be stored once the connection is back, since fred can write a pipeline after \
     its caller stopped waiting: publishing it again may store it twice unless idempotent_publish(true) \
     is set)";

/// [`UNCERTAIN_BATCH_APPEND`] for a pub/sub `PUBLISH` in a `publish_batch` pipeline: the message may
/// have been published, or may still be once the connection is back. Publishing it again takes a new
/// sequence number, so subscribers cannot tell the two copies apart: the error says so.
const UNCERTAIN_BATCH_PUBLISH: &str = "PUBLISH in a publish_batch pipeline (the message may have \
     been published, or may still be published once the connection is back, since fred can write a \
     pipeline after its caller stopped waiting: publishing it again may deliver it twice, as a new \
     message subscribers cannot tell from the first)";

/// [`UNCERTAIN_BATCH_PUBLISH`] for a single pub/sub `PUBLISH` that failed on a timeout or a cut
/// connection: written before its caller stopped waiting, Redis ran it (its answer came too late, or
/// was lost with the connection), and subscribers received it, although its caller got an error.
const UNCERTAIN_PUBLISH: &str = "PUBLISH (the message may have been published: Redis may have run \
     it before its answer was lost or came too late; publishing it again may deliver it twice, as a \
     new message subscribers cannot tell from the first)";

/// [`UNCERTAIN_BATCH_APPEND`] for a single `XADD` (without idempotent publishing) that failed on a
/// timeout or a cut connection: Redis may have run it before its answer came too late or was lost.
const UNCERTAIN_APPEND: &str = "XADD (the message may have been stored: Redis may have run it \
     before its answer was lost or came too late; publishing it again may store it twice unless \
     idempotent_publish(true) is set)";

/// Whether a single command that failed with `error` may have run all the same: its answer came too
/// late (`Timeout`) or was lost with the connection (`IO`). Not a `Canceled`: fred answers a single
/// command so only when it drops it unwritten (its client quit, or gave up reconnecting, with the
/// command still queued), so it certainly did not run, and a caller told it may have would not
/// publish it again. But a command fred wrote before its connection was cut is kept to be written
/// again after the reconnection, and when fred gives up reconnecting it drops it: its caller gets
/// "channel closed" (fred's `Unknown`, from the dropped answer channel), and Redis may have run it.
/// Nor when fred gives up writing it again after a reconnection (`max_command_attempts` used up):
/// "Too many failed write attempts." (fred's `Unknown`) comes for a command written at least once, on
/// a connection cut before its answer came, so Redis may have run it too.
fn single_may_have_run(error: &fred::error::Error) -> bool {
    match error.kind() {
        fred::error::ErrorKind::Timeout | fred::error::ErrorKind::IO => true,
        fred::error::ErrorKind::Unknown => {
            error.details() == "channel closed" || error.details() == FRED_WRITE_ATTEMPTS_USED_UP
        }
        _ => false,
    }
}

/// What fred (10.x, `Command::decr_check_attempted`) answers a command it was to write once more
/// than `max_command_attempts` allows.
const FRED_WRITE_ATTEMPTS_USED_UP: &str = "Too many failed write attempts.";

/// Whether Redis itself answered a command with an error (`NOPERM` for a channel the ACL user may not
/// publish to, for one): the command did not run. fred's own errors (a timeout, a cut connection, too
/// many write attempts) leave that open: the command may have run, or (a pipeline that timed out) may
/// still be written after a reconnect, and a number given back for it would then be used twice.
fn refused_by_redis(error: &fred::error::Error) -> bool {
    use fred::error::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::Timeout | ErrorKind::IO | ErrorKind::Canceled
    ) {
        return false;
    }
    // Redis error replies start with an upper-case code: `NOPERM ..`, `ERR ..`, `READONLY ..`.
    let code = error.details().split_whitespace().next().unwrap_or("");
    code.len() >= 2 && code.bytes().all(|b| b.is_ascii_uppercase())
}

/// Whether a pipelined command that failed with `error` may have run, or may still run after a
/// reconnect: neither refused by Redis ([`refused_by_redis`]) nor dropped by fred unwritten (`Canceled`:
/// fred answers so only for commands still in its queue when its client quits or gives up
/// reconnecting).
fn may_have_run(error: &fred::error::Error) -> bool {
    !refused_by_redis(error) && error.kind() != &fred::error::ErrorKind::Canceled
}

/// Gives back the sequence numbers of pub/sub publishes that Redis refused (see
/// [`ChannelRoute::give_back`]), so that a run of refused publishes at the end of a channel's sequence
/// leaves no gap. (One refused between two that went still leaves one: subscribers count it as lost,
/// and its publisher got the error.)
///
/// The highest number first: each is then the last one taken when given back, and goes at once. Given
/// back lowest first, each waited in `unused` for those above it.
fn give_back_refused(mut refused: Vec<(Arc<ChannelRoute>, u64)>) {
    refused.sort_unstable_by(|(_, a), (_, b)| b.cmp(a));
    for (route, number) in refused {
        route.give_back(number);
    }
}

/// Gives back the pub/sub number of a stored publish (a reply, a dead letter in pub/sub mode) whose
/// command Redis refused: it was neither stored nor published, and its publisher got the error.
/// `reconnected`: its connection reconnected after the command was handed to fred, which may then
/// have written it twice (see [`Reconnections`]): the number is kept.
fn give_back_if_refused(
    numbered: Option<&(Arc<ChannelRoute>, u64)>,
    error: &fred::error::Error,
    reconnected: bool,
) {
    if let Some((route, number)) = numbered
        && !reconnected
        && refused_by_redis(error)
    {
        route.give_back(*number);
    }
}

/// The reconnections of one pool connection, as far as a refused publish needs them. fred writes a
/// command cut off by a lost connection again after the reconnect (`max_command_attempts`): when its
/// first write ran and only the reply was lost, Redis may refuse the second (an ACL changed in
/// between), and that refusal does not mean the command did not run. Its number went out, and given
/// back it was used twice: the channel's next publish took it, and every subscriber dropped that
/// message as a repeat. So a refused number is given back only when its connection did not reconnect
/// after the command was handed to fred.
///
/// fred announces a reconnection (`reconnect_rx`) before it writes the commands it kept, so the
/// announcement is in `events` before the reply to such a command can reach its caller: [`Self::since`]
/// sees it. A publish reads only `seen` ([`Self::handed`]); the events are read on a refusal, and by
/// the pool watcher after each reconnection, so that an old one does not count against a later
/// publish.
struct Reconnections {
    /// Reconnections read from `events`.
    seen: AtomicU64,
    events: Mutex<tokio::sync::broadcast::Receiver<fred::types::config::Server>>,
}

impl Reconnections {
    /// Counts the reconnections of `client` from now on.
    fn of(client: &Client) -> Self {
        Reconnections {
            seen: AtomicU64::new(0),
            events: Mutex::new(client.reconnect_rx()),
        }
    }

    /// The count to hand a command to fred with, read before it is handed over.
    fn handed(&self) -> u64 {
        self.seen.load(Ordering::Acquire)
    }

    /// Whether the connection reconnected since [`handed`](Self::handed) returned `handed`.
    fn since(&self, handed: u64) -> bool {
        self.read() != handed
    }

    /// Reads the announcements fred sent so far; the count after them.
    fn read(&self) -> u64 {
        use tokio::sync::broadcast::error::TryRecvError;
        let mut events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        let mut new = 0u64;
        loop {
            match events.try_recv() {
                Ok(_) => new += 1,
                Err(TryRecvError::Lagged(missed)) => new += missed.max(1),
                Err(TryRecvError::Empty) => break,
                // fred replaced its channel (quitting): nothing tells any more, so every refusal
                // keeps its number.
                Err(TryRecvError::Closed) => {
                    new += 1;
                    break;
                }
            }
        }
        if new > 0 {
            self.seen.fetch_add(new, Ordering::AcqRel);
        }
        self.seen.load(Ordering::Acquire)
    }
}

/// Logs a message stored in its stream whose pub/sub copy was not published (a reply in Streams mode, a
/// dead letter in pub/sub mode): its publish still reports it accepted, since publishing it again would
/// store it twice.
#[cold]
fn stored_not_published(target: &StreamTarget, error: &dyn std::fmt::Display) {
    tracing::warn!(
        class = target.class.as_str(),
        error = %error,
        "a message was stored in its stream, but its pub/sub copy could not be published; live \
         subscribers miss it (and count it as lost unless Redis refused the publish)"
    );
}

/// The publisher's numbering of pub/sub channels: `<publisher id>/` and each channel's route.
struct PubSubRoutes {
    publisher: String,
    channels: HashMap<String, Arc<ChannelRoute>, FastState>,
}

/// The state every clone of a router, and every subscription, shares.
pub(crate) struct Shared {
    pub(crate) settings: Settings,
    pub(crate) keys: Keys,
    pub(crate) config: Config,
    pub(crate) pool: Pool,
    pub(crate) counters: Arc<Counters>,
    closed: AtomicBool,
    /// Woken when the router closes (after `closed` is set): see [`Shared::closing`].
    closing: tokio::sync::Notify,
    /// When `close` stops waiting for the publishes under way and quits the pool (set as it begins).
    close_deadline: OnceLock<tokio::time::Instant>,
    /// How the close's task stands (see [`Shared::close`]): [`CLOSE_RUNNING`] until it ends.
    close_ended: tokio::sync::watch::Sender<u8>,
    /// Publishes under way that may still send a command after an await (see [`InFlight`]): `close`
    /// waits for them before it quits the pool.
    in_flight: AtomicU64,
    /// Woken when the last of them ends.
    settled: tokio::sync::Notify,
    /// Set when a pool connection gave up reconnecting (`max_reconnect_attempts`): the pool is broken
    /// for good, and what is published fails at once instead of waiting out the command timeout.
    gave_up: AtomicBool,
    started: Instant,
    publisher_id: String,
    /// Each class stream this router publishes to.
    targets: RwLock<HashMap<String, Arc<StreamTarget>, FastState>>,
    /// One lock per pool connection: sequence numbers of idempotent publishes, and of pub/sub publishes
    /// (single or in a batch), are taken, and their commands handed to fred, under it, so that they
    /// reach Redis in the order of their numbers.
    order: Vec<Mutex<()>>,
    /// One per pool connection: whether a refused command may have been written twice.
    reconnections: Arc<Vec<Reconnections>>,
    /// Bumped when a pool connection reconnects: every class is listed in the registry again.
    registry_generation: Arc<AtomicU64>,
    pubsub_routes: RwLock<PubSubRoutes>,
    script_sha: Str,
    hub: Mutex<Option<Arc<PubSubHub>>>,
    /// Held while the subscriber connects, so that one subscription starts it and the others wait for
    /// it; `hub` itself is never held across an await (health and close read it at once).
    starting_hub: tokio::sync::Mutex<()>,
    streams: Mutex<HashMap<u64, Arc<StreamSubscription>>>,
    next_subscription: AtomicU64,
    malformed_log: LogLimiter,
    duplicate_log: LogLimiter,
    /// Pub/sub messages delivered after their gap was counted as lost (a burst of replays after a
    /// reconnect would otherwise log a line each).
    pub(crate) late_log: LogLimiter,
    /// Entries of each (stream, group) known trimmed before the group read them, as counted so far.
    group_trimmed: Mutex<HashMap<(Arc<str>, String), u64>>,
    /// The runtime the router connected on: clean-up started where there may be no runtime (a drop
    /// outside one: the last clone of the router, a subscription, a subscribe given up part way)
    /// runs there, instead of panicking (`tokio::spawn`) or being skipped.
    pub(crate) runtime: tokio::runtime::Handle,
}

/// A [`Router`] on Redis, in pub/sub or Streams mode ([`DeliveryMode`]).
///
/// Cheap to clone: clones share the connections and subscriptions. Dropping the last clone closes it
/// (in the background; call [`Router::close`] to wait for it). `Debug` never shows the password.
///
/// ```no_run
/// use agentcomm_core::prelude::*;
/// use agentcomm_redis::RedisRouter;
///
/// # async fn run() -> agentcomm_core::Result<()> {
/// // REDIS_URL (default redis://127.0.0.1:6379) and REDIS_DELIVERY_MODE (streams or pubsub).
/// let router = RedisRouter::from_env().await?;
/// let runtime = Runtime::new(router);
/// # let _ = runtime; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisRouter {
    shared: Arc<Shared>,
    _last_clone: Arc<CloseOnDrop>,
}

impl RedisRouter {
    /// The state behind the router, for the crate's own tests.
    #[cfg(test)]
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

/// Closes the router when the last clone of it is dropped, so that its connections and tasks end.
struct CloseOnDrop(Arc<Shared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if self.0.closed.load(Ordering::Acquire) {
            return;
        }
        let shared = self.0.clone();
        // On the router's own runtime: dropped outside one, it is closed all the same.
        let runtime = shared.runtime.clone();
        runtime.spawn(async move {
            if let Err(error) = shared.close().await {
                tracing::debug!(error = %error, "closing a dropped router failed");
            }
        });
    }
}

impl fmt::Debug for RedisRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = &self.shared;
        f.debug_struct("RedisRouter")
            .field("url", &redact(&shared.settings.url))
            .field("mode", &shared.settings.mode)
            .field("prefix", &shared.keys.prefix())
            .field("pool_size", &shared.settings.pool_size)
            .field("closed", &shared.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl RedisRouter {
    /// A builder for a router on `url` (`redis://`, `rediss://`, `redis-sentinel://`,
    /// `redis-cluster://`).
    pub fn builder(url: impl Into<String>) -> RedisRouterBuilder {
        RedisRouterBuilder::new(url)
    }

    /// Connects to `url` with the defaults (Streams mode).
    pub async fn connect(url: impl Into<String>) -> Result<Self> {
        Self::builder(url).connect().await
    }

    /// Connects to `REDIS_URL` (default `redis://127.0.0.1:6379`) in the mode `REDIS_DELIVERY_MODE`
    /// says (`streams`, the default, or `pubsub`), both from the process environment, not from a `.env`
    /// file (see [`RedisRouterBuilder::from_env`]).
    pub async fn from_env() -> Result<Self> {
        RedisRouterBuilder::from_env()?.connect().await
    }

    /// The delivery mode.
    pub fn mode(&self) -> DeliveryMode {
        self.shared.settings.mode
    }

    /// The prefix of every key and channel.
    pub fn prefix(&self) -> &str {
        self.shared.keys.prefix()
    }

    pub(crate) async fn connect_with(settings: Settings) -> Result<Self> {
        crate::keys::check_prefix(&settings.prefix)?;
        settings.check()?;
        let config = fred_config(&settings)?;
        let pool = fred_pool(&settings, &config)
            .map_err(|e| map_error(&e, &settings, "creating the connection pool"))?;
        let limit = settings.connect_timeout * 2;
        // Stopped if this fails, or is dropped by its caller, before the router owns the pool: fred runs
        // each connection on a task of its own, which a dropped future does not stop.
        let (connecting, outcome) = ConnectingPool::connect(&pool, limit).await;
        match outcome {
            Some(Ok(())) => {}
            Some(Err(error)) => {
                let hint = protocol_hint(&error, config.tls.is_some());
                let mut refused = match error.kind() {
                    fred::error::ErrorKind::Timeout => {
                        connect_error(&error, &settings, "connecting")
                    }
                    // Redis was reached: "cannot reach redis .. check that the broker is running"
                    // would send the user the wrong way.
                    _ if crate::connection::is_refused_login(&error) => Error::Backend {
                        backend: "redis",
                        message: format!(
                            "Redis at {} answered {}",
                            redact(&settings.url),
                            connect_failure(&error)
                        ),
                    },
                    _ => Error::Connection {
                        backend: "redis",
                        url: redact(&settings.url),
                        message: connect_failure(&error),
                    },
                };
                if let (Error::Connection { message, .. }, Some(hint)) = (&mut refused, hint) {
                    message.push_str(&format!(" ({hint})"));
                }
                return Err(refused);
            }
            None => {
                let _ = tokio::time::timeout(Duration::from_secs(1), pool.quit()).await;
                return Err(Error::Connection {
                    backend: "redis",
                    url: redact(&settings.url),
                    message: format!("no connection within {limit:?}"),
                });
            }
        }
        let counters = Arc::new(Counters::default());
        let registry_generation = Arc::new(AtomicU64::new(1));
        let reconnections: Arc<Vec<Reconnections>> =
            Arc::new(pool.clients().iter().map(Reconnections::of).collect());
        for (at, client) in pool.clients().iter().enumerate() {
            let generation = registry_generation.clone();
            let reconnections = reconnections.clone();
            watch_client(client, "pool", counters.clone(), &settings.url, move || {
                generation.fetch_add(1, Ordering::AcqRel);
                reconnections[at].read();
            });
        }
        let script_sha = {
            let client = pool.next();
            let loaded = tokio::time::timeout(
                settings.command_timeout,
                client.script_load::<String, _>(PUBLISH_SCRIPT),
            )
            .await;
            match loaded {
                Ok(Ok(sha)) => Str::from(sha),
                Ok(Err(error)) => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), pool.quit()).await;
                    return Err(map_error(
                        &error,
                        &settings,
                        "loading the publish script (SCRIPT LOAD)",
                    ));
                }
                Err(_) => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), pool.quit()).await;
                    return Err(Error::Timeout {
                        operation: "Redis to load the publish script (SCRIPT LOAD)".into(),
                        after: settings.command_timeout,
                    });
                }
            }
        };
        // Quit by the router from now on (`close`, or its last clone dropped).
        let tasks = connecting.keep();
        let order = (0..pool.size()).map(|_| Mutex::new(())).collect();
        let shared = Arc::new(Shared {
            keys: Keys::new(&settings.prefix),
            config,
            pool,
            counters,
            closed: AtomicBool::new(false),
            closing: tokio::sync::Notify::new(),
            close_deadline: OnceLock::new(),
            close_ended: tokio::sync::watch::Sender::new(CLOSE_RUNNING),
            in_flight: AtomicU64::new(0),
            settled: tokio::sync::Notify::new(),
            gave_up: AtomicBool::new(false),
            started: Instant::now(),
            publisher_id: new_publisher_id(),
            targets: RwLock::new(HashMap::default()),
            order,
            reconnections,
            registry_generation,
            pubsub_routes: RwLock::new(PubSubRoutes {
                publisher: format!("{}/", new_publisher_id()),
                channels: HashMap::default(),
            }),
            script_sha,
            hub: Mutex::new(None),
            starting_hub: tokio::sync::Mutex::new(()),
            streams: Mutex::new(HashMap::new()),
            next_subscription: AtomicU64::new(1),
            malformed_log: LogLimiter::new(Duration::from_secs(5)),
            duplicate_log: LogLimiter::new(Duration::from_secs(5)),
            late_log: LogLimiter::new(Duration::from_secs(5)),
            group_trimmed: Mutex::new(HashMap::new()),
            // An async fn that has spawned tasks already (`watch_client`): inside a runtime.
            runtime: tokio::runtime::Handle::current(),
            settings,
        });
        for task in tasks {
            let shared = Arc::downgrade(&shared);
            watch_connection_task(task, move || {
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                // The first pool connection to give up stops the whole router, and says so once:
                // when Redis is out of reach they all give up together, for the same cause.
                if shared.is_closed() || shared.gave_up.swap(true, Ordering::AcqRel) {
                    return;
                }
                shared.counters.mark_trouble();
                // Stream subscriptions stop reading (their readers' connections share the policy,
                // and their acknowledgements go through the pool): each one's stream ends after
                // what it already holds, rather than waiting for ever. What they had not settled
                // stays pending in Redis for the other members of its group.
                let streams: Vec<Arc<StreamSubscription>> = shared
                    .streams
                    .lock()
                    .expect("streams lock")
                    .values()
                    .cloned()
                    .collect();
                for stream in &streams {
                    stream.stop_now();
                }
                tracing::error!(
                    url = %redact(&shared.settings.url),
                    error = %gave_up_error(&shared.settings),
                    stream_subscriptions = streams.len(),
                    pool_connections = shared.pool.size(),
                    "a pool connection gave up reconnecting; publishing fails on all the pool's \
                     connections and stream subscriptions end from now on"
                );
            });
        }
        // The pub/sub subscriber (a connection of its own, and fred's notification rings: about 51 MB
        // at the default `broadcast_capacity`) starts with the first subscription, so that a router
        // that only publishes never holds it. Its connection problems are errors of that subscribe.
        tracing::info!(
            url = %redact(&shared.settings.url),
            mode = %shared.settings.mode,
            prefix = shared.keys.prefix(),
            "connected to Redis"
        );
        Ok(RedisRouter {
            _last_clone: Arc::new(CloseOnDrop(shared.clone())),
            shared,
        })
    }
}

/// What a failed first connection says, with the fix when TLS refused the server's certificate.
fn connect_failure(error: &fred::error::Error) -> String {
    // Redis ends some replies with a full stop, and `Error::Connection` adds one after the message.
    let details =
        crate::connection::without_echoed_arguments(error.details()).trim_end_matches('.');
    // Redis was reached, so "check that the broker is running" does not help: say what does.
    let hint = if crate::connection::is_refused_login(error) {
        Some(
            "Redis refused the login: put the password it requires in the URL, and the user when it \
             is not `default`: redis://:password@host:port or redis://user:password@host:port, with a \
             `%`, `/`, `?` or `#` in the password written %25, %2F, %3F, %23 (the URL's password is \
             percent-decoded: a `%41` in it is sent as `A`)",
        )
    } else if !details.contains("InvalidCertificate") {
        None
    } else if details.contains("UnknownIssuer") {
        Some(
            "the server's TLS certificate is not trusted: for a private certificate authority, give \
             the builder `tls_connector(..)` with a rustls config that trusts it, or add it to the \
             system's roots",
        )
    } else if details.contains("NotValidForName") {
        Some(
            "the server's TLS certificate does not name the host in the URL: connect with a name \
             (or address) the certificate lists",
        )
    } else if details.contains("Expired") || details.contains("NotValidYet") {
        Some(
            "the server's TLS certificate is outside its validity period (check the clocks, or renew it)",
        )
    } else {
        None
    };
    let details = crate::connection::readable_details(details);
    match hint {
        Some(hint) => format!("{details} ({hint})"),
        None => details,
    }
}

/// The likely cause of a first connection that met a server speaking something else than `redis://`
/// or `rediss://` expects: a TLS port resets a plain connection; a plain Redis port waits for the rest
/// of a TLS handshake it reads as a command, until the connect timeout; another service answers what
/// fred cannot decode, or what rustls does not take for TLS. Each said only "Connection reset by
/// peer", "no answer", "Invalid frame type" or "InvalidMessage(InvalidContentType)".
fn protocol_hint(error: &fred::error::Error, tls: bool) -> Option<&'static str> {
    let details = error.details();
    let timeout = matches!(error.kind(), fred::error::ErrorKind::Timeout);
    let reset = details.contains("ConnectionReset") || details.contains("Connection reset");
    match tls {
        // A TLS port behind a firewall that drops packets, or too busy to answer in time, times out
        // as well: the hint names that first, so as not to send such a user to plain redis://.
        true if timeout => Some(
            "the host may be unreachable (a firewall dropping packets) or too slow to answer; a \
             plain Redis port also waits for more of a TLS handshake it cannot read: if the port is \
             not a TLS one, use redis://",
        ),
        true if details.contains("InvalidContentType") || details.contains("CorruptMessage") => {
            Some("the server does not answer TLS: for a plain Redis port use redis://")
        }
        false if reset => Some("a TLS port resets a plain connection: if it is one, use rediss://"),
        false if details.contains("Invalid frame type") => Some(
            "the server does not answer as Redis does: check the port (a TLS port needs rediss://)",
        ),
        _ => None,
    }
}

fn closed_error() -> Error {
    Error::Closed {
        what: "the Redis router",
        hint: "it was closed; connect a new one",
    }
}

impl Shared {
    pub(crate) fn fred_builder(&self, role: Role) -> Builder {
        fred_builder(&self.settings, self.config.clone(), role)
    }

    /// The pool connection for `key`: always the same one, so that commands on one stream or channel
    /// stay in order.
    pub(crate) fn client_for(&self, key: &str) -> &Client {
        &self.pool.clients()[self.client_index(key)]
    }

    /// The index in the pool of [`Shared::client_for`].
    fn client_index(&self, key: &str) -> usize {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        (hasher.finish() % self.pool.clients().len() as u64) as usize
    }

    /// The Streams subscriptions running now, for the crate's own tests.
    #[cfg(test)]
    pub(crate) fn stream_subscriptions(&self) -> Vec<Arc<StreamSubscription>> {
        self.streams
            .lock()
            .expect("streams lock")
            .values()
            .cloned()
            .collect()
    }

    pub(crate) fn forget_stream(&self, id: u64) {
        self.streams.lock().expect("streams lock").remove(&id);
    }

    /// Records that `total` entries of `stream` were trimmed before `group` read them (since the group was
    /// created); returns how many of those were not counted yet by this router.
    pub(crate) fn trimmed_for_group(&self, stream: &Arc<str>, group: &str, total: u64) -> u64 {
        let mut counted = self.group_trimmed.lock().expect("trimmed lock");
        let counted = counted
            .entry((stream.clone(), group.to_string()))
            .or_insert(0);
        let new = total.saturating_sub(*counted);
        *counted = (*counted).max(total);
        new
    }

    /// Whether the router talks to a Redis Cluster.
    pub(crate) fn clustered(&self) -> bool {
        self.config.server.is_clustered()
    }

    /// Whether a pool connection gave up reconnecting (see [`Shared::gave_up`]).
    pub(crate) fn pool_gave_up(&self) -> bool {
        self.gave_up.load(Ordering::Acquire)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Resolves once the router is closed: at once if it already is.
    pub(crate) async fn closing(&self) {
        let notified = self.closing.notified();
        let mut notified = std::pin::pin!(notified);
        // Registered before the flag is looked at, so that a close in between still wakes this.
        notified.as_mut().enable();
        if self.is_closed() {
            return;
        }
        notified.await;
    }

    /// The pub/sub subscriber, connected on first use: the first subscription in pub/sub mode, the first
    /// reply inbox in Streams mode.
    pub(crate) async fn hub(self: &Arc<Self>) -> Result<Arc<PubSubHub>> {
        if let Some(hub) = self.ready_hub() {
            return Ok(hub);
        }
        let _starting = self.starting_hub.lock().await;
        if let Some(hub) = self.ready_hub() {
            return Ok(hub);
        }
        self.check_open()?;
        let started = PubSubHub::start(self).await?;
        {
            // Installed only while the router is open, checked under the slot's lock: `close` marks
            // the router closed before it takes the hub, so it either finds this one or this sees
            // it closed.
            let mut slot = self.hub.lock().expect("hub lock");
            if !self.is_closed() {
                *slot = Some(started.clone());
                return Ok(started);
            }
        }
        started
            .close(tokio::time::Instant::now() + Duration::from_secs(1))
            .await;
        Err(closed_error())
    }

    /// Holds a request (an envelope with a `reply_to`), for `command_timeout` at most, while this
    /// router's pub/sub subscriber reconnects or restores its subscriptions: the requester's reply
    /// inbox is one of them, and a reply published before it is restored reaches nobody. Without
    /// this, the first request after a cut of the requester's connection often went out on the pool
    /// (reconnected first) and its reply was lost while the subscriber was still subscribing again.
    /// After `command_timeout` the request goes out all the same.
    #[cold]
    async fn inbox_restored(&self) {
        if let Some(hub) = self.ready_hub()
            && (hub.is_resubscribing() || !hub.is_connected())
        {
            hub.restored_within(self.settings.command_timeout).await;
        }
    }

    /// The pub/sub subscriber when it is connected.
    fn ready_hub(&self) -> Option<Arc<PubSubHub>> {
        self.hub.lock().expect("hub lock").clone()
    }

    /// Whether messages on `channel` travel over pub/sub: everything in pub/sub mode; in Streams mode the
    /// `reply` direction is also published there (and still stored), for reply inboxes.
    fn publishes_to_channel(&self, channel: &Channel) -> bool {
        self.settings.mode == DeliveryMode::PubSub
            || (self.settings.replies_over_pubsub && channel.direction() == REPLY_DIRECTION)
    }

    /// Whether a subscription with these options is served by pub/sub: in Streams mode, a fan-out
    /// subscription whose every pattern names the `reply` direction (a reply inbox).
    pub(crate) fn serves_over_pubsub(&self, options: &SubscribeOptions) -> bool {
        match self.settings.mode {
            DeliveryMode::PubSub => true,
            DeliveryMode::Streams => {
                self.settings.replies_over_pubsub
                    && matches!(
                        options.distribution,
                        agentcomm_core::router::Distribution::FanOut
                    )
                    && options
                        .patterns
                        .iter()
                        .all(|pattern| pattern.direction() == Some(REPLY_DIRECTION))
            }
        }
    }

    /// The classes that have a stream.
    pub(crate) async fn registered_classes(&self) -> Result<Vec<String>> {
        self.pool
            .next()
            .smembers(self.keys.registry())
            .await
            .map_err(|e| map_error(&e, &self.settings, "reading the stream registry"))
    }

    fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The target of `class`. Lists the class in the registry (so that wildcard subscriptions find its
    /// stream) before anything is written to the stream, and again after a reconnect and every
    /// [`REGISTRY_REFRESH`]. Without an await on the common path: a publish's future stays small.
    async fn target(&self, class: &str) -> Result<Arc<StreamTarget>> {
        match self.registered_target(class) {
            Some(target) => Ok(target),
            None => Box::pin(self.register_target(class)).await,
        }
    }

    /// The target of `class` when it exists and needs no registration now.
    fn registered_target(&self, class: &str) -> Option<Arc<StreamTarget>> {
        let target = self
            .targets
            .read()
            .expect("targets lock")
            .get(class)
            .cloned()?;
        let generation = self.registry_generation.load(Ordering::Acquire);
        // The clock is read once every 256 publishes, not on each. The count moves on only when the
        // target is handed out: a caller that finds it due leaves the same verdict to the next look
        // (the full publish path, which then registers it).
        let due = target.registered_generation.load(Ordering::Acquire) != generation
            || (target.publishes.load(Ordering::Relaxed) % 256 == 0
                && self.registration_stale(&target));
        if due {
            return None;
        }
        target.publishes.fetch_add(1, Ordering::Relaxed);
        Some(target)
    }

    fn registration_stale(&self, target: &StreamTarget) -> bool {
        self.elapsed_ms() >= target.refresh_at_ms.load(Ordering::Relaxed)
    }

    /// Creates the target of `class` if needed and lists the class in the registry.
    async fn register_target(&self, class: &str) -> Result<Arc<StreamTarget>> {
        let found = self
            .targets
            .read()
            .expect("targets lock")
            .get(class)
            .cloned();
        let target = match found {
            Some(target) => target,
            None => {
                let stream = self.keys.stream(class);
                let client = self.client_index(&stream);
                let max_len = if class == DEAD_LETTER_CLASS {
                    self.settings.dead_letter_max_len.unwrap_or(0)
                } else {
                    self.settings.stream_max_len
                };
                let target = Arc::new(StreamTarget {
                    class: class.to_string(),
                    slot: fred::util::redis_keyslot(stream.as_bytes()),
                    dedup: Key::from(self.keys.dedup(class, &self.publisher_id)),
                    stream: Key::from(stream),
                    client,
                    max_len: i64::try_from(max_len).unwrap_or(i64::MAX),
                    next: AtomicU64::new(1),
                    registered_generation: AtomicU64::new(0),
                    refresh_at_ms: AtomicU64::new(0),
                    registering: tokio::sync::Mutex::new(()),
                    publishes: AtomicU64::new(1),
                });
                self.targets
                    .write()
                    .expect("targets lock")
                    .entry(class.to_string())
                    .or_insert(target)
                    .clone()
            }
        };
        // One registration at a time; the others wait for it (nothing is written to the stream before
        // its class is listed).
        let registering = target.registering.lock().await;
        let generation = self.registry_generation.load(Ordering::Acquire);
        if target.registered_generation.load(Ordering::Acquire) != generation
            || self.registration_stale(&target)
        {
            self.pool
                .next()
                .sadd::<i64, _, _>(self.keys.registry(), target.class.as_str())
                .await
                .map_err(|e| map_error(&e, &self.settings, "registering a stream"))?;
            if self.settings.idempotent_publish
                && let Err(error) = self.load_script_for(&target).await
            {
                // Not fatal: a publish that meets NOSCRIPT still goes with the script's text, only
                // possibly behind publishes issued after it.
                tracing::warn!(error = %error, stream = %target.stream.as_str_lossy(), "could not load the publish script on the stream's node; publishes may fall back to EVAL");
            }
            target.refresh_at_ms.store(
                self.elapsed_ms() + REGISTRY_REFRESH.as_millis() as u64,
                Ordering::Relaxed,
            );
            target
                .registered_generation
                .store(generation, Ordering::Release);
        }
        drop(registering);
        Ok(target)
    }

    /// Counts a publish in until the guard is dropped, or fails with `Closed` once the router closes.
    /// Counted in before the flag is looked at, and `close` sets the flag before it looks at the count
    /// (both sequentially consistent): either `close` waits for this publish, or this sees it closed.
    fn enter(&self) -> Result<InFlight<'_>> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(self);
        if self.closed.load(Ordering::SeqCst) {
            return Err(closed_error());
        }
        self.check_connectable()?;
        Ok(guard)
    }

    /// Fails when a pool connection gave up reconnecting (see [`Shared::gave_up`]).
    fn check_connectable(&self) -> Result<()> {
        if self.gave_up.load(Ordering::Acquire) {
            return Err(gave_up_error(&self.settings));
        }
        Ok(())
    }

    /// Resolves once no publish counted in by [`Shared::enter`] is under way.
    async fn publishes_settled(&self) {
        loop {
            let notified = self.settled.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the count is looked at, so that the last publish ending in between
            // still wakes this.
            notified.as_mut().enable();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            Err(closed_error())
        } else {
            self.check_connectable()
        }
    }

    /// Takes the next sequence number of `target` and hands the command `make` builds with it to fred,
    /// under the order lock of the target's connection: fred sends a connection's commands in the order
    /// it was given them (replays after a reconnect included), so they reach Redis in the order of their
    /// numbers, which is what [`PUBLISH_SCRIPT`] relies on. fred's command futures hand the command over
    /// on their first poll, which happens here, under the lock.
    async fn in_order<T, F, Fut>(&self, target: &StreamTarget, make: F) -> T
    where
        F: FnOnce(u64) -> Fut,
        Fut: Future<Output = T>,
    {
        let lock = &self.order[target.client];
        let mut make = Some(make);
        let mut started: Option<Pin<Box<Fut>>> = None;
        let first = std::future::poll_fn(|cx| {
            let _order = lock.lock().unwrap_or_else(PoisonError::into_inner);
            let sequence = target.next.fetch_add(1, Ordering::Relaxed);
            let make = make.take().expect("the command is built once");
            let mut future = Box::pin(make(sequence));
            let poll = future.as_mut().poll(cx);
            started = Some(future);
            Poll::Ready(poll)
        })
        .await;
        match first {
            Poll::Ready(value) => value,
            Poll::Pending => started.expect("the command was started").await,
        }
    }

    /// The script arguments of one stream publish.
    fn script_args(
        target: &StreamTarget,
        sequence: u64,
        frame: &Bytes,
        channel: Option<&Str>,
    ) -> Vec<Value> {
        vec![
            Value::Integer(sequence as i64),
            Value::Integer(DEDUP_TTL_MS),
            Value::Integer(target.max_len),
            Value::Bytes(frame.clone()),
            match channel {
                Some(channel) => Value::String(channel.clone()),
                None => Value::from_static_str(""),
            },
        ]
    }

    /// What the publish script's reply says: `Null` is a replay fred wrote again after a reconnect, stored
    /// by its first run; an array, a frame stored whose `PUBLISH` Redis refused: accepted (publishing it
    /// again would store it twice), its pub/sub number (`numbered`) given back, since it did not run,
    /// unless the connection reconnected since the [`Reconnections::handed`] `handed`: then an earlier
    /// run, whose reply was lost, may have published it (and its mark on the stream, which makes a
    /// replay a `Null`, been lost since: a restart of Redis without persistence, an eviction).
    fn script_outcome(
        &self,
        target: &StreamTarget,
        reply: Value,
        numbered: Option<&(Arc<ChannelRoute>, u64)>,
        handed: u64,
    ) -> PublishOutcome {
        match reply {
            Value::Array(refused) => {
                if let Some((route, number)) = numbered
                    && !self.reconnections[target.client].since(handed)
                {
                    route.give_back(*number);
                }
                let error = refused
                    .first()
                    .and_then(Value::as_string)
                    .unwrap_or_default();
                stored_not_published(target, &error);
                PublishOutcome::Accepted
            }
            Value::Null => {
                self.counters.bump(&self.counters.publish_duplicates);
                if let Some(suppressed) = self.duplicate_log.allow() {
                    tracing::info!(
                        class = target.class.as_str(),
                        suppressed,
                        "a publish written again after a reconnect was already stored; not stored twice"
                    );
                }
                PublishOutcome::Accepted
            }
            value => outcome_of(value.as_i64().unwrap_or(0), true, self.clustered()),
        }
    }

    /// `XADD` of `frame` to the stream of `target` (without idempotence). The future holds fred's
    /// command and nothing of `target`.
    fn append<'a>(
        &'a self,
        target: &StreamTarget,
        frame: Bytes,
    ) -> impl Future<Output = Result<()>> + Send + use<'a> {
        let fields = frame_field(frame);
        let added = self.pool.clients()[target.client].xadd::<Value, _, _, _, _>(
            target.stream.clone(),
            false,
            target.cap(),
            "*",
            fields,
        );
        futures::FutureExt::map(added, move |added| {
            added.map(drop).map_err(|e| self.append_failed(&e))
        })
    }

    /// `PUBLISH` of a numbered pub/sub frame on pool connection `client` (`numbered`: its route's id
    /// and its number): how many received it; a number Redis refused is given back
    /// ([`publish_failed`](Self::publish_failed)) unless the connection reconnected meanwhile.
    ///
    /// Its own layer under the caller's [`map`](futures::FutureExt::map), taking the route by id rather
    /// than its `Arc`: built this way, fred's command future is written into the publish's box in place;
    /// the `Arc` in the closure, or one layer instead of two, made the compiler copy it once more on
    /// every publish (about 700 instructions a message, measured with callgrind).
    fn publish_numbered(
        &self,
        client: usize,
        channel: Str,
        frame: Bytes,
        numbered: (u64, u64),
    ) -> impl Future<Output = Result<i64>> + Send + '_ {
        // Read before fred has the command (it takes it on the first poll).
        let numbered = (numbered.0, numbered.1, self.reconnections[client].handed());
        futures::FutureExt::map(
            self.pool.clients()[client].publish::<i64, _, _>(channel, frame),
            move |receivers| receivers.map_err(|e| self.publish_failed(numbered, &e)),
        )
    }

    /// `SCRIPT LOAD` of the publish script on the node that holds `target`'s stream: loaded at connect
    /// on one node only (a cluster has several; a restarted Redis has none), an `EVALSHA` meeting
    /// `NOSCRIPT` is sent again after the publishes behind it, out of order. Done whenever the target is
    /// registered: first use, after every reconnect and every [`REGISTRY_REFRESH`].
    async fn load_script_for(&self, target: &StreamTarget) -> Result<()> {
        let (command, args) = Self::script_load(target);
        self.pool.clients()[target.client]
            .custom::<Value, _>(command, args)
            .await
            .map(drop)
            .map_err(|e| {
                map_error(
                    &e,
                    &self.settings,
                    "loading the publish script (SCRIPT LOAD)",
                )
            })
    }

    /// `SCRIPT LOAD` of the publish script and its arguments, routed to the node of `target`'s stream
    /// (fred would hash the script's text).
    fn script_load(target: &StreamTarget) -> (CustomCommand, Vec<&'static str>) {
        (
            CustomCommand::new_static("SCRIPT", ClusterHash::Custom(target.slot), false),
            vec!["LOAD", PUBLISH_SCRIPT],
        )
    }

    /// Appends `envelope` to the stream of `target`; with `publish`, also publishes it to its pub/sub
    /// channel (replies in Streams mode, dead letters in pub/sub mode). Its pub/sub number is taken under
    /// the order lock its `PUBLISH` (or the script that publishes it) is handed to fred under, as a
    /// direct publish's: taken when the envelope was encoded, before the `XADD` went out, a concurrent
    /// publish to the same channel could take the next number and overtake it, and every subscriber
    /// counted the overtaken one as lost once the reorder window passed, then discarded it.
    async fn stream_publish(
        &self,
        target: &StreamTarget,
        envelope: &Envelope,
        publish: bool,
    ) -> Result<PublishOutcome> {
        let client = &self.pool.clients()[target.client];
        if !self.settings.idempotent_publish {
            // Without a sequence number: stream readers drop it. The live copy is numbered below.
            let frame = Bytes::from(envelope.to_frame()?);
            let fields = frame_field(frame);
            let added: std::result::Result<Value, fred::error::Error> = client
                .xadd(target.stream.clone(), false, target.cap(), "*", fields)
                .await;
            if let Err(error) = added {
                return Err(self.append_failed(&error));
            }
            if !publish {
                return Ok(PublishOutcome::Accepted);
            }
            return match self.publish_in_order(envelope, true).await {
                Ok(outcome) => Ok(outcome),
                // Stored: an error would make the caller publish it again, and store it twice. The
                // live copy is lost (its number is given back when Redis refused it; otherwise its
                // subscribers count the number it leaves out as lost).
                Err(error) => {
                    stored_not_published(target, &error);
                    Ok(PublishOutcome::Accepted)
                }
            };
        }
        // A stream-only frame is encoded before the lock is taken; one that is also published is
        // numbered, and so encoded, under it.
        let mut plain = match publish {
            true => None,
            false => Some(Bytes::from(envelope.to_frame()?)),
        };
        let mut encoded = None;
        // Read before fred has the command: see `Reconnections`.
        let handed = self.reconnections[target.client].handed();
        let reply = self
            .in_order(target, |sequence| {
                let frame = match plain.take() {
                    Some(frame) => Ok((frame, None)),
                    None => self
                        .pubsub_frame(envelope)
                        .map(|(route, number, frame)| (frame, Some((route, number)))),
                };
                let command = frame.as_ref().ok().map(|(frame, numbered)| {
                    let channel = numbered.as_ref().map(|(route, _)| &route.channel);
                    client.evalsha::<Value, _, _, _>(
                        self.script_sha.clone(),
                        vec![target.stream.clone(), target.dedup.clone()],
                        Self::script_args(target, sequence, frame, channel),
                    )
                });
                encoded = Some(frame);
                // Not encoded: nothing is sent (the stream's number it took leaves nothing behind).
                futures::future::OptionFuture::from(command)
            })
            .await;
        let (frame, numbered, reply) = match (encoded, reply) {
            (Some(Ok((frame, numbered))), Some(reply)) => (frame, numbered, reply),
            (Some(Err(error)), _) => return Err(error),
            _ => {
                return Err(Error::Backend {
                    backend: "redis",
                    message: "a stream publish was encoded but not sent".into(),
                });
            }
        };
        let channel = numbered.as_ref().map(|(route, _)| route.channel.clone());
        match reply {
            // Redis lost its script cache (a restart, another cluster node): nothing was stored.
            Err(error) if is_noscript(&error) => {
                self.publish_with_text(target, &frame, channel.as_ref(), numbered.as_ref(), handed)
                    .await
            }
            reply => reply
                .map(|reply| self.script_outcome(target, reply, numbered.as_ref(), handed))
                .map_err(|e| {
                    let reconnected = self.reconnections[target.client].since(handed);
                    give_back_if_refused(numbered.as_ref(), &e, reconnected);
                    map_error(&e, &self.settings, "publishing to a stream")
                }),
        }
    }

    /// An idempotent publish that met `NOSCRIPT`, sent again with the script's text (`EVAL`, which
    /// loads it) under a fresh number: its old one may be below the mark by now. `handed`: the
    /// [`Reconnections::handed`] of its connection when its first command was handed to fred (that
    /// one may have run before a restart of Redis, and met `NOSCRIPT` when written again).
    async fn publish_with_text(
        &self,
        target: &StreamTarget,
        frame: &Bytes,
        channel: Option<&Str>,
        numbered: Option<&(Arc<ChannelRoute>, u64)>,
        handed: u64,
    ) -> Result<PublishOutcome> {
        let client = &self.pool.clients()[target.client];
        self.in_order(target, |sequence| {
            client.eval::<Value, _, _, _>(
                PUBLISH_SCRIPT,
                vec![target.stream.clone(), target.dedup.clone()],
                Self::script_args(target, sequence, frame, channel),
            )
        })
        .await
        // Stored by this run, its PUBLISH refused: the first command may have published it.
        .map(|reply| self.script_outcome(target, reply, numbered, handed))
        .map_err(|e| {
            let reconnected = self.reconnections[target.client].since(handed);
            give_back_if_refused(numbered, &e, reconnected);
            map_error(&e, &self.settings, "publishing to a stream")
        })
    }

    /// The route of `channel`, made on its first use.
    fn channel_route(&self, channel: &Channel) -> Arc<ChannelRoute> {
        {
            let routes = self.pubsub_routes.read().expect("routes lock");
            if let Some(route) = routes.channels.get(channel.name()) {
                return route.clone();
            }
        }
        let mut routes = self.pubsub_routes.write().expect("routes lock");
        if !routes.channels.contains_key(channel.name())
            && routes.channels.len() >= MAX_PUBLISHER_CHANNELS
        {
            // Numbering restarts under a new id, so that subscribers never see a number go backwards.
            routes.channels.clear();
            routes.publisher = format!("{}/", new_publisher_id());
        }
        let name = self.keys.pubsub_channel(channel);
        let client = self.client_index(&name);
        let publisher = routes.publisher.clone();
        routes
            .channels
            .entry(channel.name().to_string())
            .or_insert_with(|| {
                static ROUTES: AtomicU64 = AtomicU64::new(0);
                Arc::new(ChannelRoute {
                    channel: Str::from(name),
                    client,
                    next: AtomicU64::new(0),
                    publisher,
                    id: ROUTES.fetch_add(1, Ordering::Relaxed),
                    unused: Mutex::new(Vec::new()),
                    stale_after: self
                        .settings
                        .command_timeout
                        .saturating_mul(2)
                        .saturating_add(Duration::from_secs(5)),
                })
            })
            .clone()
    }

    /// The route of `channel` and its next number, with the number's header; taken under the order
    /// lock of the route's connection when `in_order` (held by the guard returned).
    fn pubsub_route(
        &self,
        channel: &Channel,
        in_order: bool,
    ) -> (
        Arc<ChannelRoute>,
        u64,
        SequenceText,
        Option<MutexGuard<'_, ()>>,
    ) {
        // Looked up first: the routes' lock is never held while the order lock is taken (a publish
        // that fails on its first poll, under the order lock, takes the routes' lock).
        let route = self.channel_route(channel);
        let order = in_order.then(|| {
            self.order[route.client]
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        });
        let number = route.next.fetch_add(1, Ordering::Relaxed) + 1;
        let header = SequenceText::new(&route.publisher, number);
        (route, number, header, order)
    }

    /// Numbers and encodes a message for pub/sub; returns its route and frame. The number is taken only
    /// once the envelope is known to encode: a gap left by a message that is never published would make
    /// every subscriber of the channel count it as lost. (Given back when it was taken before the
    /// encoding failed after all, unless a later one was taken meanwhile.)
    fn pubsub_frame(&self, envelope: &Envelope) -> Result<(Arc<ChannelRoute>, u64, Bytes)> {
        self.pubsub_frame_under(envelope, false)
            .map(|(route, number, frame, _)| (route, number, frame))
    }

    /// [`pubsub_frame`](Self::pubsub_frame), the number taken under the order lock of the route's
    /// connection when `in_order`: the guard returned holds it, until the command is handed to fred.
    #[allow(clippy::type_complexity)]
    fn pubsub_frame_under(
        &self,
        envelope: &Envelope,
        in_order: bool,
    ) -> Result<(Arc<ChannelRoute>, u64, Bytes, Option<MutexGuard<'_, ()>>)> {
        let mut numbered = None;
        let mut order = None;
        let encoded = envelope.to_frame_with_header_from(SEQUENCE_HEADER, || {
            let (route, number, sequence, guard) = self.pubsub_route(envelope.channel(), in_order);
            numbered = Some((route, number));
            order = guard;
            sequence
        });
        match (encoded, numbered) {
            (Ok(frame), Some((route, number))) => Ok((route, number, Bytes::from(frame), order)),
            (Ok(_), None) => Err(Error::Backend {
                backend: "redis",
                message: "a pub/sub frame was encoded without its sequence number".into(),
            }),
            (Err(error), numbered) => {
                if let Some((route, number)) = numbered {
                    route.give_back(number);
                }
                Err(error)
            }
        }
    }

    /// Publishes one envelope in this router's mode; dead letters are always also kept in their stream.
    pub(crate) async fn publish_envelope(&self, envelope: Envelope) -> Result<PublishOutcome> {
        // Its commands may be sent after awaits (a registration, a script load): `close` waits for it.
        let _in_flight = self.enter()?;
        let result = self.publish_one(envelope).await;
        self.count_publish(&result);
        result
    }

    /// Publishes `envelope`, as [`publish_envelope`](Self::publish_envelope) does, in a future that stays
    /// small: nothing happens before its first poll, which chooses the path and boxes the future of that
    /// path on its own. fred's command futures are several kilobytes, and a future that held one among
    /// the others would be copied whole into the box the [`Router`] trait asks for: for the two common
    /// cases that need one command and no await before it ([`direct`](Self::direct)), the inner box holds
    /// fred's command future and nothing else.
    fn publish_lazily(&self, envelope: Envelope) -> BoxFuture<'_, Result<PublishOutcome>> {
        Box::pin(async move {
            if envelope.reply_to().is_some() {
                // Boxed: the publish future stays the size it was for every other publish.
                Box::pin(self.inbox_restored()).await;
            }
            match self.direct(&envelope) {
                Some(direct) => {
                    // Counted in, as every publish: `close` waits for it before it quits the pool.
                    // Only looking at the flag, a publish that passed it as `close` began handed its
                    // command to a pool being quit: `Timeout` after the command timeout, or a
                    // "cannot reach Redis" error, instead of `Closed`.
                    let _in_flight = self.enter()?;
                    let result = self.direct_command(&envelope, direct).await;
                    self.count_publish(&result);
                    result
                }
                None => Box::pin(self.publish_envelope(envelope)).await,
            }
        })
    }

    /// The command of a [direct](Self::direct) publish: numbered (pub/sub) and encoded now; a pub/sub
    /// publish is also handed to fred now ([`publish_in_order`](Self::publish_in_order)), an append
    /// when polled.
    fn direct_command(
        &self,
        envelope: &Envelope,
        direct: Direct,
    ) -> BoxFuture<'_, Result<PublishOutcome>> {
        let failed = |error| -> BoxFuture<'_, Result<PublishOutcome>> {
            Box::pin(std::future::ready(Err(error)))
        };
        match direct {
            Direct::Append(target) => {
                let frame = match envelope.to_frame() {
                    Ok(frame) => Bytes::from(frame),
                    Err(error) => return failed(error),
                };
                Box::pin(futures::FutureExt::map(
                    self.append(&target, frame),
                    |added| added.map(|()| PublishOutcome::Accepted),
                ))
            }
            Direct::Publish => self.publish_in_order(envelope, false),
        }
    }

    /// A pub/sub publish of `envelope` (`stored`: also kept in its stream), numbered and encoded now, and
    /// handed to fred now, under the order lock its number is taken under (see below).
    fn publish_in_order(
        &self,
        envelope: &Envelope,
        stored: bool,
    ) -> BoxFuture<'_, Result<PublishOutcome>> {
        let (route, number, frame, order) = match self.pubsub_frame_under(envelope, true) {
            Ok(encoded) => encoded,
            Err(error) => return Box::pin(std::future::ready(Err(error))),
        };
        let clustered = self.clustered();
        let numbered = (route.id, number);
        let mut publishing: BoxFuture<'_, Result<PublishOutcome>> =
            Box::pin(futures::FutureExt::map(
                self.publish_numbered(route.client, route.channel.clone(), frame, numbered),
                move |receivers| receivers.map(|n| outcome_of(n, stored, clustered)),
            ));
        // fred takes the command on the first poll: polled here, still under the order lock
        // the number was taken under, so that the connection's publishes reach Redis in the
        // order of their numbers. Taken and handed over apart, a publish could be overtaken by
        // later numbers (its thread preempted in between): subscribers waited for it only as
        // long as the reorder window, then counted it as lost, and discarded it when it came.
        // The caller polls again at once, with its own waker.
        let first = publishing
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()));
        drop(order);
        match first {
            Poll::Ready(result) => Box::pin(std::future::ready(result)),
            Poll::Pending => publishing,
        }
    }

    /// The error of a single `XADD` (without idempotent publishing) that failed: one that may have
    /// stored the message says so, and counts in `publish_uncertain`, as a batch's does.
    #[cold]
    #[inline(never)]
    fn append_failed(&self, error: &fred::error::Error) -> Error {
        if single_may_have_run(error) {
            self.counters.bump(&self.counters.publish_uncertain);
            return map_error(error, &self.settings, UNCERTAIN_APPEND);
        }
        map_error(error, &self.settings, "XADD")
    }

    /// The error of a pub/sub publish that failed; its number (`numbered`: the id of its route, the
    /// number, and its connection's [`Reconnections::handed`]) is given back if Redis refused it: the
    /// publish did not run, unless its connection reconnected since it was handed to fred (fred may
    /// have written it twice, the first time with success). The route is looked up by its id (a scan,
    /// on this error path only); a route dropped meanwhile (the publisher's numbering restarted) needs
    /// nothing given back.
    #[cold]
    #[inline(never)]
    fn publish_failed(
        &self,
        (route, number, handed): (u64, u64, u64),
        error: &fred::error::Error,
    ) -> Error {
        if refused_by_redis(error) {
            let routes = self.pubsub_routes.read().expect("routes lock");
            if let Some(route) = routes
                .channels
                .values()
                .find(|candidate| candidate.id == route)
                && !self.reconnections[route.client].since(handed)
            {
                route.give_back(number);
            }
        } else if single_may_have_run(error) {
            // The error says so, as a batch's does.
            self.counters.bump(&self.counters.publish_uncertain);
            return map_error(error, &self.settings, UNCERTAIN_PUBLISH);
        }
        map_error(error, &self.settings, "PUBLISH")
    }

    /// Whether `envelope` can be published with one command and no await before it: a pub/sub publish
    /// (not a dead letter), or a Streams append without idempotent publishing to a class registered
    /// and not due for its refresh (otherwise [`target`](Self::target) registers it first).
    fn direct(&self, envelope: &Envelope) -> Option<Direct> {
        let class = envelope.channel().class();
        match self.settings.mode {
            DeliveryMode::PubSub if class != DEAD_LETTER_CLASS => Some(Direct::Publish),
            DeliveryMode::Streams
                if !self.settings.idempotent_publish
                    && !self.publishes_to_channel(envelope.channel()) =>
            {
                self.registered_target(class).map(Direct::Append)
            }
            _ => None,
        }
    }

    async fn publish_one(&self, envelope: Envelope) -> Result<PublishOutcome> {
        let class = envelope.channel().class();
        let stored = self.settings.mode == DeliveryMode::Streams || class == DEAD_LETTER_CLASS;
        if !self.publishes_to_channel(envelope.channel()) {
            let target = self.target(class).await?;
            return self.stream_publish(&target, &envelope, false).await;
        }
        if stored {
            // Stored and published: replies in Streams mode, dead letters in pub/sub mode.
            let target = self.target(class).await?;
            return self.stream_publish(&target, &envelope, true).await;
        }
        self.direct_command(&envelope, Direct::Publish).await
    }

    fn count_publish(&self, result: &Result<PublishOutcome>) {
        match result {
            Ok(outcome) => {
                self.counters.bump(&self.counters.published);
                if outcome.is_unroutable() {
                    self.counters.bump(&self.counters.unroutable);
                }
            }
            Err(_) => self.counters.bump(&self.counters.publish_errors),
        }
    }

    /// Publishes several envelopes in one pipeline per connection (pub/sub: one per connection and
    /// chunk of the batch).
    async fn publish_pipelined(&self, envelopes: Vec<Envelope>) -> Vec<Result<PublishOutcome>> {
        // Registrations come before the pipeline is sent: `close` waits for the whole batch.
        let Ok(_in_flight) = self.enter() else {
            return envelopes.iter().map(|_| Err(closed_error())).collect();
        };
        let careful = envelopes.iter().any(|e| {
            let stored = self.settings.mode == DeliveryMode::Streams
                || e.channel().class() == DEAD_LETTER_CLASS;
            stored && self.publishes_to_channel(e.channel())
        });
        if careful {
            // Dead letters in pub/sub mode and replies in Streams mode go to a stream and a channel:
            // the rare path, one by one.
            let mut results = Vec::with_capacity(envelopes.len());
            for envelope in envelopes {
                let result = self.publish_one(envelope).await;
                self.count_publish(&result);
                results.push(result);
            }
            return results;
        }
        let mut results: Vec<Option<Result<PublishOutcome>>> = Vec::new();
        results.resize_with(envelopes.len(), || None);
        // An envelope that cannot be encoded fails alone. Streams encodes the whole batch first; pub/sub
        // numbers, encodes and sends it chunk by chunk (see `PUBSUB_CHUNK_MESSAGES`), each chunk under
        // the order lock of its connection (see `run_pipeline`).
        let pubsub = self.settings.mode == DeliveryMode::PubSub;
        let total = envelopes.len();
        let (mut chunk_messages, mut chunk_bytes) = (0usize, 0usize);
        let mut by_client: HashMap<usize, Vec<Pending>> = HashMap::new();
        // Set when a chunk failed on a timeout or the connection: the rest is not sent (each chunk
        // would wait out the command timeout in turn), and can be published again safely.
        let mut cut_off = false;
        // Set when a chunk ended after `close` stopped waiting for this batch: the rest is not sent
        // and fails with `Closed`. Sent, the next chunk would go to the pool `close` quits, where fred
        // keeps it until the command timeout: `Timeout`, and the rest "cannot reach redis".
        let mut closing = false;
        for (index, envelope) in envelopes.into_iter().enumerate() {
            if closing {
                results[index] = Some(Err(closed_error()));
                continue;
            }
            if cut_off {
                results[index] = Some(Err(Error::Connection {
                    backend: "redis",
                    url: redact(&self.settings.url),
                    message: "not published: an earlier part of this publish_batch failed on a \
                              timeout or a lost connection, so the rest was not sent; publish it \
                              again once Redis is reachable"
                        .into(),
                }));
                continue;
            }
            let pending = match self.settings.mode {
                DeliveryMode::Streams => match self.target(envelope.channel().class()).await {
                    Err(error) => Err(error),
                    Ok(target) => envelope.to_frame().map(|frame| Pending {
                        index,
                        client: target.client,
                        target: Some(target),
                        channel: None,
                        size: frame.len(),
                        frame: Bytes::from(frame),
                        numbered: None,
                        unnumbered: None,
                    }),
                },
                DeliveryMode::PubSub => {
                    // Numbered and encoded by `run_pipeline`, under the order lock its chunk is handed
                    // to fred under; its size is estimated until then.
                    let route = self.channel_route(envelope.channel());
                    Ok(Pending {
                        index,
                        client: route.client,
                        target: None,
                        channel: Some(route.channel.clone()),
                        frame: Bytes::new(),
                        size: frame_size_estimate(&envelope),
                        numbered: None,
                        unnumbered: Some((route, envelope)),
                    })
                }
            };
            match pending {
                Ok(pending) => {
                    chunk_messages += 1;
                    chunk_bytes += pending.size;
                    by_client.entry(pending.client).or_default().push(pending);
                }
                Err(error) => results[index] = Some(Err(error)),
            }
            let full = pubsub
                && (chunk_messages >= PUBSUB_CHUNK_MESSAGES || chunk_bytes >= PUBSUB_CHUNK_BYTES);
            if !full && index + 1 < total {
                continue;
            }
            (chunk_messages, chunk_bytes) = (0, 0);
            let batches = std::mem::take(&mut by_client)
                .into_iter()
                .map(|(client, batch)| self.run_pipeline(client, batch));
            for batch in futures::future::join_all(batches).await {
                for (index, result) in batch {
                    cut_off |= matches!(
                        result,
                        Err(Error::Timeout { .. } | Error::Connection { .. })
                    );
                    results[index] = Some(result);
                }
            }
            closing = self
                .close_deadline
                .get()
                .is_some_and(|deadline| tokio::time::Instant::now() >= *deadline);
        }
        let results: Vec<Result<PublishOutcome>> = results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(Error::Backend {
                        backend: "redis",
                        message: "the publish got no reply from its pipeline".into(),
                    })
                })
            })
            .collect();
        for result in &results {
            self.count_publish(result);
        }
        results
    }

    /// Sends one connection's share of a batch as one pipeline. Numbers are taken (pub/sub: and the
    /// frames that carry them encoded) and the pipeline is handed to fred under the connection's order
    /// lock (see [`Shared::in_order`]), which fred's pipeline takes on its first poll (`try_all` sends
    /// all its commands at once, before its first await).
    async fn run_pipeline(
        &self,
        position: usize,
        mut batch: Vec<Pending>,
    ) -> Vec<(usize, Result<PublishOutcome>)> {
        let client = &self.pool.clients()[position];
        let pipeline = client.pipeline();
        let idempotent = self.settings.idempotent_publish;
        // Which envelopes made it into the pipeline: the replies belong to those, in order.
        let mut queued: Vec<usize> = Vec::with_capacity(batch.len());
        let mut results: Vec<(usize, Result<PublishOutcome>)> = Vec::with_capacity(batch.len());
        let lock = &self.order[position];
        let mut started = None;
        // Idempotent: the script is loaded first on the node of each stream of the batch, in the same
        // pipeline (a node answers a connection's commands in order), so that no `EVALSHA` of it meets
        // `NOSCRIPT` and is sent again after those behind it (out of order). Their replies are skipped.
        let mut script_loads = 0usize;
        // Pub/sub publishes that never ran: their numbers are given back at the end.
        let mut refused: Vec<(Arc<ChannelRoute>, u64)> = Vec::new();
        // Read before fred has the pipeline: see `Reconnections`.
        let handed = self.reconnections[position].handed();
        let first = std::future::poll_fn(|cx| {
            let _order = lock.lock().unwrap_or_else(PoisonError::into_inner);
            if idempotent {
                let mut loaded: Vec<&Key> = Vec::new();
                for target in batch.iter().filter_map(|pending| pending.target.as_deref()) {
                    if loaded.contains(&&target.stream) {
                        continue;
                    }
                    loaded.push(&target.stream);
                    let (command, args) = Self::script_load(target);
                    let queuing = futures::FutureExt::now_or_never(tokio::task::unconstrained(
                        pipeline.custom::<(), _>(command, args),
                    ));
                    if matches!(queuing, Some(Ok(())) | None) {
                        script_loads += 1;
                    }
                }
            }
            for (slot, pending) in batch.iter_mut().enumerate() {
                if let Some((route, envelope)) = pending.unnumbered.take() {
                    // Numbered here, under the lock the pipeline is handed to fred under: a publish of
                    // the channel elsewhere (alone, another batch) cannot take a later number and reach
                    // Redis first.
                    match frame_on_route(&route, &envelope) {
                        Ok((number, frame)) => {
                            pending.frame = frame;
                            pending.numbered = Some((route, number));
                        }
                        Err(error) => {
                            results.push((pending.index, Err(error)));
                            continue;
                        }
                    }
                }
                let queuing: Option<std::result::Result<(), fred::error::Error>> =
                    match (&pending.target, &pending.channel) {
                        (Some(target), _) if idempotent => {
                            let sequence = target.next.fetch_add(1, Ordering::Relaxed);
                            let mut command = Vec::with_capacity(9);
                            command.push(Value::String(self.script_sha.clone()));
                            command.push(Value::Integer(2));
                            command.push(Value::Bytes(target.stream.inner().clone()));
                            command.push(Value::Bytes(target.dedup.inner().clone()));
                            command.extend(Self::script_args(
                                target,
                                sequence,
                                &pending.frame,
                                None,
                            ));
                            futures::FutureExt::now_or_never(tokio::task::unconstrained(
                                pipeline.custom(
                                    // Routed by the stream's slot: fred honours only a
                                    // custom slot and would hash the script's SHA (the first
                                    // argument), sending it to another node of a cluster, whose
                                    // MOVED would make it arrive after later publishes.
                                    CustomCommand::new_static(
                                        "EVALSHA",
                                        ClusterHash::Custom(target.slot),
                                        false,
                                    ),
                                    command,
                                ),
                            ))
                        }
                        (Some(target), _) => futures::FutureExt::now_or_never(
                            tokio::task::unconstrained(pipeline.xadd(
                                target.stream.clone(),
                                false,
                                target.cap(),
                                "*",
                                frame_field(pending.frame.clone()),
                            )),
                        ),
                        (None, Some(channel)) => {
                            futures::FutureExt::now_or_never(tokio::task::unconstrained(
                                pipeline.publish(channel.clone(), pending.frame.clone()),
                            ))
                        }
                        (None, None) => continue,
                    };
                match queuing {
                    // A pipeline takes a command synchronously and answers at once; `None` (the answer not
                    // seen yet) still means the command is in the pipeline.
                    Some(Ok(())) | None => queued.push(slot),
                    Some(Err(error)) => {
                        refused.extend(pending.numbered.clone());
                        results.push((
                            pending.index,
                            Err(map_error(&error, &self.settings, "queuing a publish")),
                        ));
                    }
                }
            }
            let mut sending = Box::pin(pipeline.try_all::<Value>());
            let poll = sending.as_mut().poll(cx);
            started = Some(sending);
            Poll::Ready(poll)
        })
        .await;
        let replies = match first {
            Poll::Ready(replies) => replies,
            Poll::Pending => started.expect("the pipeline was started").await,
        };
        if queued.is_empty() {
            give_back_refused(refused);
            return results;
        }
        // Whether each publish has a reply of its own (else the whole pipeline failed, and whether any
        // of it ran is not known).
        let replied = replies.len() == script_loads + queued.len();
        let replies: Vec<std::result::Result<Value, fred::error::Error>> = if replied {
            // The script loads' replies come first; a failed load shows in the publishes' own.
            replies.into_iter().skip(script_loads).collect()
        } else {
            // The whole pipeline failed (fred answers one error for all): each publish gets it.
            let counts = (replies.len(), queued.len());
            let error = replies
                .into_iter()
                .find_map(|reply| reply.err())
                .unwrap_or_else(|| {
                    fred::error::Error::new(
                        fred::error::ErrorKind::Unknown,
                        format!(
                            "the pipeline's {} replies do not match its {} commands",
                            counts.0, counts.1
                        ),
                    )
                });
            queued.iter().map(|_| Err(error.clone())).collect()
        };
        let streams = self.settings.mode == DeliveryMode::Streams;
        // Whether the connection reconnected since the pipeline was handed to fred, which may then
        // have written some of it twice: looked up at the first refusal.
        let mut reconnected = None;
        for (slot, reply) in queued.into_iter().zip(replies) {
            let pending = &batch[slot];
            let result = match (reply, &pending.target) {
                (Ok(reply), Some(target)) if idempotent => {
                    Ok(self.script_outcome(target, reply, None, handed))
                }
                (Ok(_), _) if streams => Ok(PublishOutcome::Accepted),
                (Ok(reply), _) => Ok(outcome_of(
                    reply.as_i64().unwrap_or(0),
                    false,
                    self.clustered(),
                )),
                (Err(error), Some(target)) if idempotent && is_noscript(&error) => {
                    // Not stored: again, alone.
                    self.publish_with_text(target, &pending.frame, None, None, 0)
                        .await
                }
                (Err(error), Some(_)) if !idempotent && may_have_run(&error) => {
                    // fred does not mark a pipeline whose wait timed out as timed out (as it does a
                    // single command): it may still be written after a reconnect, or ran already.
                    self.counters.bump(&self.counters.publish_uncertain);
                    Err(map_error(&error, &self.settings, UNCERTAIN_BATCH_APPEND))
                }
                (Err(error), None) if !streams && may_have_run(&error) => {
                    // The same for a pub/sub PUBLISH. Its number is not given back: it may be used.
                    self.counters.bump(&self.counters.publish_uncertain);
                    Err(map_error(&error, &self.settings, UNCERTAIN_BATCH_PUBLISH))
                }
                (Err(error), _) => {
                    if let Some(numbered) = &pending.numbered
                        && replied
                        && refused_by_redis(&error)
                        && !*reconnected
                            .get_or_insert_with(|| self.reconnections[position].since(handed))
                    {
                        refused.push(numbered.clone());
                    }
                    Err(map_error(&error, &self.settings, "publishing"))
                }
            };
            results.push((pending.index, result));
        }
        give_back_refused(refused);
        results
    }

    /// Moves a frame that cannot be decoded to `DeadLetter:agentcomm.Malformed:unknown`; returns whether
    /// it is dealt with (the raw entry may then be removed). `identity` names the frame (a stream entry,
    /// or a channel and the frame's bytes): the first subscription to find it publishes the dead letter,
    /// others (fan-out copies, other groups, other routers) only count it.
    pub(crate) async fn dead_letter_malformed(
        &self,
        raw: Bytes,
        source: &str,
        identity: &str,
        error: &Error,
    ) -> bool {
        self.counters.bump(&self.counters.malformed);
        self.counters.mark_trouble();
        let marker = self.keys.malformed_marker(&stable_hash(identity));
        let first: std::result::Result<Value, _> = self
            .pool
            .next()
            .set(
                marker.as_str(),
                1,
                Some(Expiration::PX(MALFORMED_MARKER_TTL_MS)),
                Some(SetOptions::NX),
                false,
            )
            .await;
        match first {
            Ok(Value::Null) => {
                tracing::debug!(
                    source,
                    "a malformed frame another subscription dead-lettered already"
                );
                return true;
            }
            Ok(_) => {}
            Err(marker_error) => {
                tracing::debug!(error = %marker_error, "could not mark a malformed frame; dead-lettering it anyway");
            }
        }
        if let Some(suppressed) = self.malformed_log.allow() {
            tracing::error!(
                source,
                error = %error,
                bytes = raw.len(),
                suppressed,
                "a frame could not be decoded; it is moved to DeadLetter:agentcomm.Malformed:unknown"
            );
        }
        let dead = Envelope::malformed(raw, source, &error.to_string());
        match self.publish_envelope(dead).await {
            Ok(_) => true,
            Err(publish_error) => {
                // Let the next attempt publish it.
                let _: std::result::Result<i64, _> = self.pool.next().del(marker.as_str()).await;
                tracing::error!(error = %publish_error, source, "could not publish the dead letter of a malformed frame");
                false
            }
        }
    }

    /// Like [`Shared::dead_letter_malformed`], in the background (pub/sub: nothing to remove).
    pub(crate) fn malformed(self: &Arc<Self>, raw: Bytes, channel: &str, error: &Error) {
        let shared = self.clone();
        let source = channel.to_string();
        let mut identity = String::with_capacity(channel.len() + 17);
        identity.push_str(channel);
        let _ = write!(identity, " {:016x}", stable_hash_bytes(&raw));
        let error = Error::decode("envelope", error);
        self.runtime.spawn(async move {
            shared
                .dead_letter_malformed(raw, &source, &identity, &error)
                .await;
        });
    }

    async fn health(&self) -> Health {
        let settings = &self.settings;
        let backend = backend_name(settings.mode);
        let closed = self.is_closed();
        let started = Instant::now();
        // Not on a closed pool, or one that gave up: fred keeps a command written to a client that
        // quit until the command timeout, and the ping would wait out its limit.
        let round_trip = if closed || self.gave_up.load(Ordering::Acquire) {
            None
        } else {
            let ping = tokio::time::timeout(
                Duration::from_secs(2).min(settings.command_timeout),
                self.pool.next().ping::<Value>(None),
            )
            .await;
            matches!(ping, Ok(Ok(_))).then(|| started.elapsed())
        };
        let pool_connected = self.pool.clients().iter().all(|c| c.is_connected());
        let hub = self.ready_hub();
        let subscriber_connected = hub.as_ref().is_none_or(|hub| hub.is_connected());
        let resubscribing = hub.as_ref().is_some_and(|hub| hub.is_resubscribing());
        let streams: Vec<Arc<StreamSubscription>> = self
            .streams
            .lock()
            .expect("streams lock")
            .values()
            .cloned()
            .collect();
        let subscriptions = hub.as_ref().map_or(0, |hub| hub.subscription_count()) + streams.len();
        let readers_connected = streams.iter().all(|stream| stream.readers_connected());
        let read_failure = streams
            .iter()
            .filter_map(|stream| stream.read_failure())
            .max_by_key(|(failing_for, _)| *failing_for);
        let gave_up =
            self.gave_up.load(Ordering::Acquire) || hub.as_ref().is_some_and(|hub| hub.gave_up());
        let reader_gave_up = streams
            .iter()
            .any(|stream| stream.reader_gave_up_reconnecting());
        let connected = !closed
            && !gave_up
            && pool_connected
            && subscriber_connected
            && readers_connected
            && round_trip.is_some();
        let (status, detail) = if closed {
            (HealthStatus::Unhealthy, "closed".to_string())
        } else if gave_up {
            (HealthStatus::Unhealthy, gave_up_error(settings).to_string())
        } else if reader_gave_up {
            (
                HealthStatus::Unhealthy,
                crate::streams::reader_gave_up_error(settings),
            )
        } else if round_trip.is_none() {
            let detail = match self.counters.last_connection_error() {
                // Redis may answer and refuse: say what the last attempt to reconnect met.
                Some(error) => format!(
                    "Redis at {} cannot be used: {error}; reconnecting with backoff",
                    redact(&settings.url)
                ),
                None => format!(
                    "Redis at {} does not answer; reconnecting with backoff (check that it is running and reachable)",
                    redact(&settings.url)
                ),
            };
            (HealthStatus::Unhealthy, detail)
        } else if !pool_connected || !subscriber_connected || !readers_connected {
            (
                HealthStatus::Degraded,
                "some connections are reconnecting".to_string(),
            )
        } else if resubscribing {
            (
                HealthStatus::Degraded,
                "the pub/sub subscriber lost its connection, or reconnected and is restoring its subscriptions".to_string(),
            )
        } else if let Some((failing_for, error)) = read_failure {
            (
                HealthStatus::Degraded,
                format!(
                    "a stream subscription's reads have been failing for {:.1} s (it retries with \
                     backoff); last error: {error}",
                    failing_for.as_secs_f64()
                ),
            )
        } else if self.counters.recent_trouble() {
            (
                HealthStatus::Degraded,
                "messages were lost or connections failed in the last minute; see the counters and the logs"
                    .to_string(),
            )
        } else {
            (HealthStatus::Healthy, "ok".to_string())
        };
        let mut health = Health::new(backend, status)
            .connected(connected)
            .detail(detail)
            .counter("subscriptions", subscriptions as u64);
        if let Some(round_trip) = round_trip {
            health = health.round_trip(round_trip);
        }
        for (name, value) in self.counters.snapshot() {
            health = health.counter(name, value);
        }
        health
    }

    /// Closes, and returns once closed.
    ///
    /// The close runs on a task of its own, on the router's runtime, and every call, first or later,
    /// waits for that same end: a close cut short (a shutdown under a timeout, a second signal in a
    /// `select!`) still finishes, and a second close called meanwhile does not return before the
    /// first one's work is done. (Before, a second call returned `Ok` at once, while subscriptions
    /// were still finishing; and a close cut short left the router half closed for good: its
    /// subscriptions' tasks and the pool's connections stayed, and every later close returned at
    /// once.) Should the router's runtime not run the task (it shut down), the close runs here;
    /// should that runtime be alive but not driven, the wait ends after `close_timeout` + 3 s with
    /// `Error::Timeout`, and the close runs once the runtime is driven again.
    async fn close(self: &Arc<Self>) -> Result<()> {
        let mut ended = self.close_ended.subscribe();
        // Sequentially consistent: see `Shared::enter`.
        if !self.closed.swap(true, Ordering::SeqCst) {
            self.closing.notify_waiters();
            let abandoned = CloseAbandoned(self.clone());
            self.runtime.spawn(async move {
                let shared = abandoned.0.clone();
                shared.close_work().await;
                shared.close_ended.send_replace(CLOSE_FINISHED);
                drop(abandoned);
            });
        }
        // Above what the close's own bounded steps take (its deadline, 0.2 s, 1 s to quit): a router
        // whose runtime is alive but not driven (a current_thread runtime outside its `block_on`)
        // does not run the task, and its caller would otherwise wait for ever.
        let bound = self.settings.close_timeout + Duration::from_secs(3);
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let ended =
                tokio::time::timeout_at(deadline, ended.wait_for(|state| *state != CLOSE_RUNNING))
                    .await
                    .map(|state| state.map_or(CLOSE_FINISHED, |state| *state));
            let Ok(state) = ended else {
                return Err(Error::Timeout {
                    operation:
                        "the Redis router to close (it goes on closing in the background, on \
                                the runtime the router connected on)"
                            .into(),
                    after: bound,
                });
            };
            if state == CLOSE_FINISHED {
                return Ok(());
            }
            // Its task was dropped unfinished (the router's runtime shut down): closed here, by one
            // call only; the others wait for it as they waited for the task. (Each closing in place,
            // every call but the one that found the subscriptions returned while they were still
            // finishing.) Should this call be cut short in turn, the next one takes over.
            let claimed = self.close_ended.send_if_modified(|state| {
                if *state != CLOSE_ABANDONED {
                    return false;
                }
                *state = CLOSE_RUNNING;
                true
            });
            if claimed {
                let abandoned = CloseAbandoned(self.clone());
                self.close_work().await;
                self.close_ended.send_replace(CLOSE_FINISHED);
                drop(abandoned);
                return Ok(());
            }
        }
    }

    /// The work of [`Shared::close`], once `closed` is set.
    async fn close_work(&self) {
        // One deadline for all the cleanup: with Redis gone, every command would wait its own timeout.
        let until = tokio::time::Instant::now() + self.settings.close_timeout;
        let _ = self.close_deadline.set(until);
        let hub = self.hub.lock().expect("hub lock").take();
        let streams: Vec<Arc<StreamSubscription>> = self
            .streams
            .lock()
            .expect("streams lock")
            .drain()
            .map(|(_, s)| s)
            .collect();
        let closing_hub = async {
            if let Some(hub) = hub {
                hub.close(until).await;
            }
        };
        let finishing = futures::future::join_all(streams.iter().map(|s| s.finish(until)));
        let _ = tokio::time::timeout_at(
            until + Duration::from_millis(200),
            futures::future::join3(closing_hub, finishing, self.publishes_settled()),
        )
        .await;
        // A subscription whose finishing the deadline cut short before it released its entries has
        // tasks waiting for that release: they end now.
        for stream in &streams {
            stream.give_up_finishing();
        }
        // A subscription whose finishing the deadline cut short (Redis stopped answering) did not quit
        // its readers yet: their connections would stay open for as long as the subscription is held.
        let quitting_readers = futures::future::join_all(
            streams
                .iter()
                .map(|s| s.quit_readers(tokio::time::Instant::now() + Duration::from_secs(1))),
        );
        let quit = tokio::time::timeout(Duration::from_secs(1), async {
            futures::future::join(self.pool.quit(), quitting_readers)
                .await
                .0
        })
        .await;
        if !matches!(quit, Ok(Ok(()))) {
            tracing::debug!("the connection pool did not quit cleanly");
        }
        tracing::info!(url = %redact(&self.settings.url), "Redis router closed");
    }
}

/// [`Shared::close_ended`] while the close's task runs.
const CLOSE_RUNNING: u8 = 0;
/// [`Shared::close_ended`] once the close's work is done.
const CLOSE_FINISHED: u8 = 1;
/// [`Shared::close_ended`] when the close's task was dropped before its work was done.
const CLOSE_ABANDONED: u8 = 2;

/// Tells the router's closes that its close task ended without finishing, when dropped first (the
/// task panicked, or its runtime shut down, even before running it).
struct CloseAbandoned(Arc<Shared>);

impl Drop for CloseAbandoned {
    fn drop(&mut self) {
        self.0.close_ended.send_if_modified(|state| {
            if *state != CLOSE_RUNNING {
                return false;
            }
            *state = CLOSE_ABANDONED;
            true
        });
    }
}

/// A publish counted in by [`Shared::enter`]; counted out when dropped.
struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.settled.notify_waiters();
        }
    }
}

/// One publish of a batch.
struct Pending {
    index: usize,
    client: usize,
    target: Option<Arc<StreamTarget>>,
    channel: Option<Str>,
    /// Its frame: a pub/sub one is empty until [`Shared::run_pipeline`] numbers and encodes it.
    frame: Bytes,
    /// The frame's length, or (pub/sub, not encoded yet) an estimate of it: what it adds to its chunk.
    size: usize,
    /// A pub/sub publish's route and sequence number (given back if Redis refuses the publish).
    numbered: Option<(Arc<ChannelRoute>, u64)>,
    /// A pub/sub publish not numbered yet: its channel's route and the envelope.
    unnumbered: Option<(Arc<ChannelRoute>, Envelope)>,
}

/// About how long `envelope`'s frame will be: a pub/sub batch is cut into chunks of about
/// [`PUBSUB_CHUNK_BYTES`] before it is encoded, since a message is encoded only with its sequence
/// number, under the order lock its chunk is handed to fred under.
fn frame_size_estimate(envelope: &Envelope) -> usize {
    // The id, timestamp, attempt, content type, sequence header and the field names.
    const FIXED: usize = 160;
    let headers: usize = envelope
        .headers()
        .iter()
        .map(|(name, value)| name.len() + value.len() + 2)
        .sum();
    FIXED
        + envelope.payload().len()
        + envelope.channel().name().len()
        + envelope.content_type().len()
        + envelope.correlation_id().map_or(0, str::len)
        + envelope.reply_to().map_or(0, str::len)
        + headers
}

/// A hash that is the same in every process of one build (for markers other routers must find).
fn stable_hash(text: &str) -> String {
    format!("{:016x}", stable_hash_bytes(text.as_bytes()))
}

fn stable_hash_bytes(bytes: &[u8]) -> u64 {
    // `DefaultHasher::new()` uses fixed keys: the same value in every process.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

/// How a publish that needs one command goes ([`Shared::direct`]).
enum Direct {
    /// `PUBLISH` (pub/sub mode).
    Publish,
    /// `XADD` to this registered target (Streams mode).
    Append(Arc<StreamTarget>),
}

/// What a publish that `PUBLISH` counted `receivers` for is. In a cluster, `PUBLISH` counts only the
/// receivers on the node that took it (the message still reaches subscribers on every node), so none
/// there proves nothing: `Accepted`, not `Unroutable`.
fn outcome_of(receivers: i64, stored: bool, clustered: bool) -> PublishOutcome {
    match receivers {
        n if n > 0 => PublishOutcome::Delivered(n as usize),
        _ if stored || clustered => PublishOutcome::Accepted,
        _ => PublishOutcome::Unroutable,
    }
}

fn backend_name(mode: DeliveryMode) -> &'static str {
    match mode {
        DeliveryMode::Streams => "redis-streams",
        DeliveryMode::PubSub => "redis-pubsub",
    }
}

impl Router for RedisRouter {
    fn backend(&self) -> &str {
        backend_name(self.shared.settings.mode)
    }

    fn capabilities(&self) -> Capabilities {
        match self.shared.settings.mode {
            DeliveryMode::Streams => Capabilities::none()
                .persistent(true)
                .ordered_per_channel(true)
                .consumer_groups(true)
                .redelivery(true)
                .publish_confirms(true),
            // `reports_unroutable` is not claimed: a subscription with a wildcard class listens to every
            // channel under the prefix, so while one exists anywhere, a message no pattern matches is
            // still reported as delivered (and a cluster counts only the receivers of one node).
            // `no_duplicates` is not claimed on a cluster: a PUBLISH reaches each node over the cluster
            // bus at its own time, so a subscription starting on another node just after it may still
            // get a message an earlier subscription already had (docs/redis.md, "Redis Cluster").
            DeliveryMode::PubSub => Capabilities::none()
                .ordered_per_channel(true)
                .redelivery(true)
                .publish_confirms(true)
                .no_duplicates(!self.shared.clustered()),
        }
    }

    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, Result<PublishOutcome>> {
        self.shared.publish_lazily(envelope)
    }

    fn publish_batch(
        &self,
        envelopes: Vec<Envelope>,
    ) -> BoxFuture<'_, Vec<Result<PublishOutcome>>> {
        Box::pin(self.shared.publish_pipelined(envelopes))
    }

    fn subscribe(&self, options: SubscribeOptions) -> BoxFuture<'_, Result<Subscription>> {
        Box::pin(async move {
            options.check()?;
            let shared = &self.shared;
            shared.check_open()?;
            if shared.serves_over_pubsub(&options) {
                // Given up at once when the router closes (dropping it gives back what it took: see
                // `Claim`): its commands would go to the subscriber connection `close` quits, where
                // fred keeps them until the command timeout.
                return tokio::select! {
                    biased;
                    subscribed = async { shared.hub().await?.subscribe(shared, options).await } => subscribed,
                    () = shared.closing() => Err(closed_error()),
                };
            }
            let id = shared.next_subscription.fetch_add(1, Ordering::Relaxed);
            // A set-up still under way when the router closes is given up at once (dropping it undoes
            // what it did so far: see `Abandoned`): its next command would go to the pool `close`
            // quits, and wait out the command timeout there before failing.
            let started = tokio::select! {
                biased;
                started = StreamSubscription::start(shared, options, id) => started,
                () = shared.closing() => return Err(closed_error()),
            };
            let (subscription, handle) = started?;
            let refused = {
                // Kept only while the router is open and its pool has not given up reconnecting,
                // checked under the lock `close` and the give-up drain the subscriptions under, after
                // they mark the router: either they find this one and stop it, or this sees the mark.
                // Kept otherwise, its reader would go on reading, on a connection of its own, for as
                // long as the subscription is held (after a give-up: a stream that never ends).
                let mut streams = shared.streams.lock().expect("streams lock");
                match shared.check_open() {
                    Ok(()) => {
                        streams.insert(id, subscription);
                        return Ok(handle);
                    }
                    Err(refused) => refused,
                }
            };
            drop(handle);
            subscription
                .finish(tokio::time::Instant::now() + Duration::from_secs(1))
                .await;
            Err(refused)
        })
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        Box::pin(self.shared.health())
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.shared.close())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A single command fred wrote, then dropped when it gave up reconnecting, fails with the error of
    /// its dropped answer channel: Redis may have run it. One fred never wrote fails with `Canceled`.
    #[tokio::test]
    async fn a_written_command_fred_dropped_may_have_run() {
        let (answer, waiting) = tokio::sync::oneshot::channel::<()>();
        drop(answer);
        let dropped = fred::error::Error::from(waiting.await.unwrap_err());
        assert!(single_may_have_run(&dropped), "{dropped:?}");
        assert!(!single_may_have_run(&fred::error::Error::new_canceled()));
        assert!(single_may_have_run(&fred::error::Error::new(
            fred::error::ErrorKind::Unknown,
            FRED_WRITE_ATTEMPTS_USED_UP
        )));
        assert!(!single_may_have_run(&fred::error::Error::new(
            fred::error::ErrorKind::Unknown,
            "Client is not initialized."
        )));
    }

    /// The URL's password is percent-decoded (fred): a password with a `%` followed by two hex digits
    /// is sent changed unless its `%` is written %25, so the hint of a refused login says so, with the
    /// other characters that must be encoded.
    #[test]
    fn a_refused_login_says_how_to_write_a_percent_in_the_password() {
        use fred::error::{Error as FredError, ErrorKind};
        for error in [
            FredError::new(
                ErrorKind::Auth,
                "WRONGPASS invalid username-password pair or user is disabled.",
            ),
            FredError::new(ErrorKind::Unknown, "NOAUTH Authentication required."),
        ] {
            let text = connect_failure(&error);
            assert!(
                text.contains("Redis refused the login") && text.contains("%25"),
                "{text}"
            );
        }
    }

    /// fred keeps an I/O error as its `Debug` text; a failed connect showed it to the user as
    /// `Os { code: 111, kind: ConnectionRefused, message: "Connection refused" }`. It reads as the
    /// I/O error displays instead.
    /// A `rediss://` first connection that times out is not only a plain Redis port: a TLS port behind
    /// a firewall dropping packets, or too busy, times out alike. The hint names those first and
    /// keeps the `redis://` advice conditional. Before, it named only the plain port, sending a TLS
    /// user whose network was down to switch TLS off.
    #[test]
    fn a_tls_connection_that_times_out_is_not_only_blamed_on_the_port() {
        use fred::error::{Error as FredError, ErrorKind};
        let timeout = FredError::new(ErrorKind::Timeout, "Request timed out.");
        let hint = protocol_hint(&timeout, true).expect("a hint");
        assert!(hint.contains("unreachable"), "{hint}");
        assert!(
            hint.contains("if the port is not a TLS one, use redis://"),
            "{hint}"
        );
        assert_eq!(protocol_hint(&timeout, false), None);
    }

    #[test]
    fn a_failed_connect_reads_like_the_io_error() {
        use fred::error::{Error as FredError, ErrorKind};
        let refused = std::io::Error::from_raw_os_error(111);
        let lookup = std::io::Error::other(
            "failed to lookup address information: Name or service not known",
        );
        let timed_out = std::io::Error::from(std::io::ErrorKind::TimedOut);
        for (io, expected) in [
            (refused, "Connection refused (os error 111)"),
            (
                lookup,
                "failed to lookup address information: Name or service not known",
            ),
            (timed_out, "I/O error: TimedOut"),
        ] {
            // What fred's `From<io::Error>` makes of it.
            let error = FredError::from(io);
            assert_eq!(error.kind(), &ErrorKind::IO);
            assert_eq!(connect_failure(&error), expected);
        }
        // Details that are not an I/O error's `Debug` text stay as they are.
        let text = connect_failure(&FredError::new(
            ErrorKind::Unknown,
            "ERR DB index is out of range",
        ));
        assert_eq!(text, "ERR DB index is out of range");
        let quoted = std::io::Error::other("a \"quoted\" word, and a comma");
        assert_eq!(
            connect_failure(&FredError::from(quoted)),
            "a \"quoted\" word, and a comma"
        );
    }

    /// A channel route with `taken` numbers taken.
    fn route_with(taken: u64) -> ChannelRoute {
        ChannelRoute {
            channel: Str::from_static("c"),
            client: 0,
            next: AtomicU64::new(taken),
            publisher: "p/".into(),
            id: 0,
            unused: Mutex::new(Vec::new()),
            stale_after: Duration::from_secs(65),
        }
    }

    /// Two refused batches of one channel (1..=100, then 101..=200), the first answered first: its
    /// numbers wait for the second's, which then take them all back. Kept one by one, the route forgot
    /// all but 64 of the first batch's: 1..=36 stayed a gap that subscribers counted as lost.
    #[test]
    fn two_refused_runs_answered_lowest_first_are_all_given_back() {
        let route = route_with(200);
        for number in (1..=100).rev() {
            route.give_back(number);
        }
        assert_eq!(
            route.next.load(Ordering::Relaxed),
            200,
            "a later number is out"
        );
        for number in (101..=200).rev() {
            route.give_back(number);
        }
        assert_eq!(
            route.next.load(Ordering::Relaxed),
            0,
            "numbers left as a gap"
        );
        assert!(route.unused.lock().unwrap().is_empty());
    }

    /// Numbers given back in any order, with one still out, wait; once it is given back, all go, and a
    /// number taken meanwhile (a publish that went out) keeps those below it as a gap.
    #[test]
    fn unused_numbers_join_into_runs_in_any_order() {
        let route = route_with(10);
        for number in [3, 1, 2, 6, 5, 4, 7, 9, 8] {
            route.give_back(number);
        }
        assert_eq!(route.next.load(Ordering::Relaxed), 10);
        route.give_back(10);
        assert_eq!(route.next.load(Ordering::Relaxed), 0);
        let route = route_with(4);
        route.give_back(2);
        route.give_back(3);
        // 4 went out: 2 and 3 stay a gap.
        route.next.fetch_add(1, Ordering::Relaxed);
        route.give_back(5);
        assert_eq!(route.next.load(Ordering::Relaxed), 4);
    }

    /// Refused numbers given back in an order that leaves more separate runs waiting than the route
    /// keeps for good (64): 1, 3, .., 129 while 2, 4, .., 130 are still out, then those. Every run was
    /// still to be given back; the lowest one, forgotten past the 64th, stayed a gap that subscribers
    /// counted as lost although its publisher got the error.
    #[test]
    fn more_than_64_separate_refused_runs_are_all_given_back() {
        let route = route_with(130);
        for number in (1..=130).step_by(2) {
            route.give_back(number);
        }
        assert_eq!(route.next.load(Ordering::Relaxed), 130, "130 is still out");
        for number in (2..=130).step_by(2) {
            route.give_back(number);
        }
        assert_eq!(
            route.next.load(Ordering::Relaxed),
            0,
            "numbers left as a gap"
        );
        assert!(route.unused.lock().unwrap().is_empty());
    }

    /// Past 64 runs, those unchanged for longer than `stale_after` (below a number that went out: a gap
    /// for good) are forgotten, and only those; past 4,096 the lowest is, however young.
    #[test]
    fn stale_unused_runs_are_forgotten_past_64_and_any_past_4096() {
        // A short `stale_after`, so that "long ago" is seconds back: an `Instant` cannot go back
        // further than the machine's boot, and a test run soon after it would panic.
        let route = ChannelRoute {
            stale_after: Duration::from_secs(2),
            ..route_with(20_000)
        };
        let long_ago = Instant::now()
            .checked_sub(Duration::from_secs(3))
            .expect("the machine booted at least 3 s ago");
        for number in (2..=126).step_by(2) {
            route.give_back(number);
        }
        for run in route.unused.lock().unwrap().iter_mut() {
            run.since = long_ago;
        }
        route.give_back(1_000);
        assert_eq!(route.unused.lock().unwrap().len(), 64, "none forgotten");
        route.give_back(1_002);
        let kept: Vec<u64> = route.unused.lock().unwrap().iter().map(|r| r.low).collect();
        assert_eq!(kept.len(), 2, "only the stale ones forgotten: {kept:?}");
        for number in (3_000..3_000 + 2 * 4_095).step_by(2) {
            route.give_back(number);
        }
        let unused = route.unused.lock().unwrap();
        assert_eq!(unused.len(), 4_096);
        assert!(unused.iter().all(|run| run.low != 1_000), "the lowest went");
    }

    /// Threads taking numbers under one lock (as publishes do under their connection's), each number
    /// either going out or refused, the refused ones given back in bunches, out of order and outside
    /// the lock (as callers do when polled): a number that went out is never taken again, and once
    /// every refused number is back the route's last number is the highest that went out.
    #[test]
    fn numbers_that_went_out_are_never_taken_again() {
        use std::collections::HashSet;
        let route = Arc::new(route_with(0));
        let order = Arc::new(Mutex::new(()));
        let out = Arc::new(Mutex::new(HashSet::new()));
        let threads: Vec<_> = (0..4u64)
            .map(|thread| {
                let (route, order, out) = (route.clone(), order.clone(), out.clone());
                std::thread::spawn(move || {
                    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ thread;
                    let mut random = move || {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        state
                    };
                    let mut refused = Vec::new();
                    for _ in 0..5_000 {
                        let number = {
                            let _order = order.lock().unwrap();
                            route.next.fetch_add(1, Ordering::Relaxed) + 1
                        };
                        // Refused more often than not, so that long runs form.
                        if random() % 8 < 5 {
                            refused.push(number);
                        } else {
                            assert!(
                                out.lock().unwrap().insert(number),
                                "{number} went out twice"
                            );
                        }
                        if refused.len() > (random() % 16) as usize {
                            while !refused.is_empty() {
                                let at = (random() % refused.len() as u64) as usize;
                                route.give_back(refused.swap_remove(at));
                            }
                        }
                    }
                    for number in refused {
                        route.give_back(number);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let highest = out.lock().unwrap().iter().copied().max().unwrap_or(0);
        assert_eq!(route.next.load(Ordering::Relaxed), highest);
    }

    /// The publish script against a real Redis (REDIS_URL); skipped when there is none.
    #[tokio::test]
    async fn the_publish_script_stores_each_sequence_number_once() {
        let url = crate::unit_redis::url();
        let client = Builder::from_config(Config::from_url(&url).unwrap())
            .build()
            .unwrap();
        if !matches!(
            tokio::time::timeout(Duration::from_secs(3), client.init()).await,
            Ok(Ok(_))
        ) {
            crate::unit_redis::unreachable(&url, "no answer within 3 s");
            return;
        }
        let prefix = crate::unit_redis::prefix();
        let keys = vec![
            format!("{prefix}:stream:{{A}}"),
            format!("{prefix}:dedup:{{A}}:p"),
        ];
        let run = |seq: i64, channel: &'static str| {
            let args = vec![
                Value::Integer(seq),
                Value::Integer(DEDUP_TTL_MS),
                Value::Integer(1000),
                Value::from("frame"),
                Value::from(channel),
            ];
            client.eval::<Value, _, _, _>(PUBLISH_SCRIPT, keys.clone(), args)
        };
        assert_eq!(run(1, "").await.unwrap(), Value::Integer(0), "stored");
        assert!(
            run(1, "").await.unwrap().is_null(),
            "the same number again is a replay"
        );
        // Numbers that never reached Redis (3 to 99) leave nothing behind: every later number is new,
        // however many come after (the old bitmap design lost messages 65,536 numbers later).
        assert!(!run(2, "").await.unwrap().is_null());
        assert!(!run(100, "").await.unwrap().is_null());
        assert!(
            run(99, "").await.unwrap().is_null(),
            "below the mark: a replay"
        );
        assert!(!run(100_000, "").await.unwrap().is_null());
        assert!(!run(100_001, "").await.unwrap().is_null());
        // A replay left the mark where it was.
        let mark: String = client.get(&keys[1]).await.unwrap();
        assert_eq!(mark, "100001");
        // Published to a channel too (replies): the reply is the receiver count.
        assert_eq!(
            run(100_002, "nobody-listens").await.unwrap(),
            Value::Integer(0)
        );
        let length: i64 = client.xlen(&keys[0]).await.unwrap();
        assert_eq!(length, 6);
        let ttl: i64 = client.pttl(&keys[1]).await.unwrap();
        assert!(ttl > 0, "the mark expires when idle");
        let _: i64 = client.del(keys.clone()).await.unwrap();
        let _ = client.quit().await;
    }

    /// A publish fred wrote, whose connection is made again before the answer came (a forced
    /// reconnection; fred does the same on a Sentinel failover or a cluster's new layout): Redis ran
    /// it, and with its write attempts used up fred answers "Too many failed write attempts." The
    /// error must say that it may have been published, and count in `publish_uncertain`, as a
    /// timeout's does: it said only that the publish failed, and a caller that published it again
    /// delivered it twice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_publish_fred_will_not_write_again_says_it_may_have_been_published() {
        let url = crate::unit_redis::url();
        let prefix = crate::unit_redis::prefix();
        let Some(subscriber) = crate::unit_redis::connect(
            RedisRouter::builder(&url)
                .mode(DeliveryMode::PubSub)
                .prefix(&prefix),
            &url,
        )
        .await
        else {
            return;
        };
        let Some((proxy, proxied)) = crate::unit_redis::loopback_proxy(&url).await else {
            return;
        };
        let builder = RedisRouter::builder(&proxied)
            .mode(DeliveryMode::PubSub)
            .prefix(&prefix)
            .pool_size(1)
            .max_command_attempts(1);
        let Some(publisher) = crate::unit_redis::connect(builder, &proxied).await else {
            return;
        };
        let pattern = agentcomm_core::ChannelPattern::parse("Once:*:*").unwrap();
        let mut subscription = subscriber
            .subscribe(SubscribeOptions::new(pattern))
            .await
            .unwrap();
        // The PUBLISH reaches Redis after 1 s, and its answer would come 1 s later: the connection is
        // made again as soon as the subscriber has the message.
        proxy.set_latency(Duration::from_secs(1));
        let publishing = publisher.publish(Envelope::new(
            agentcomm_core::channel::Channel::new("Once", "event", "s1").unwrap(),
            "application/msgpack",
            vec![0x80],
        ));
        let reconnecting = async {
            let delivery = tokio::time::timeout(Duration::from_secs(10), subscription.next())
                .await
                .expect("Redis ran the publish")
                .expect("a delivery");
            let client = publisher.shared.pool.clients()[0].clone();
            tokio::spawn(async move { client.force_reconnection().await });
            delivery.ack().await.unwrap();
        };
        let (result, ()) = tokio::time::timeout(
            Duration::from_secs(20),
            futures::future::join(publishing, reconnecting),
        )
        .await
        .expect("fred answers the publish");
        let error = result
            .expect_err("its answer was lost, and fred may not write it again")
            .to_string();
        assert!(
            error.contains("Too many failed write attempts"),
            "fred's write attempts were used up: {error}"
        );
        assert!(
            error.contains("may have been published") && error.contains("may deliver it twice"),
            "Redis ran it: {error}"
        );
        let health = publisher.health().await;
        assert_eq!(health.get("publish_uncertain"), 1, "{health:?}");
        proxy.set_latency(Duration::ZERO);
        drop(subscription);
        subscriber.close().await.unwrap();
        publisher.close().await.unwrap();
    }

    /// A publish under way when the router closes (here: listing its class in the registry again, as
    /// after a reconnect) is waited for by `close`, and confirmed. Before, `close` quit the pool at
    /// once, the publish's next command went to the quit connection, where fred keeps a command until
    /// the command timeout, and the publish failed with `Timeout` only then (30 s by default), its
    /// message not stored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_publish_under_way_when_the_router_closes_is_waited_for() {
        let url = crate::unit_redis::url();
        let prefix = crate::unit_redis::prefix();
        let builder = RedisRouter::builder(&url)
            .mode(DeliveryMode::Streams)
            .prefix(&prefix)
            .command_timeout(Duration::from_secs(10));
        let Some(router) = crate::unit_redis::connect(builder, &url).await else {
            return;
        };
        let shared = router.shared.clone();
        let publish = || {
            router.publish(Envelope::new(
                agentcomm_core::channel::Channel::new("A", "event", "s1").unwrap(),
                "application/msgpack",
                vec![0x80],
            ))
        };
        publish().await.unwrap();
        // The next publish lists the class again, and waits for the registration, held here.
        let target = shared.registered_target("A").expect("registered");
        shared.registry_generation.fetch_add(1, Ordering::AcqRel);
        let held = target.registering.lock().await;
        let mut publishing = publish();
        assert!(futures::poll!(&mut publishing).is_pending());
        let closing = tokio::spawn({
            let router = router.clone();
            async move { router.close().await }
        });
        tokio::time::timeout(Duration::from_secs(10), shared.closing())
            .await
            .expect("the router starts closing");
        drop(held);
        let started = Instant::now();
        let outcome = tokio::time::timeout(Duration::from_secs(3), publishing)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the publish still waits {:?} after the close",
                    started.elapsed()
                )
            });
        closing.await.unwrap().unwrap();
        assert_eq!(outcome.unwrap(), PublishOutcome::Accepted);
        let client = Builder::from_config(Config::from_url(&url).unwrap())
            .build()
            .unwrap();
        client.init().await.unwrap();
        let stream = shared.keys.stream("A");
        let length: i64 = client.xlen(&stream).await.unwrap();
        assert_eq!(length, 2, "both messages are stored");
        delete_keys(&client, &prefix).await;
        let _ = client.quit().await;
    }

    /// The health of a closed router answers at once. Before, it pinged the pool `close` had quit,
    /// where fred keeps a command until the command timeout, and waited the ping's 2 s limit.
    #[tokio::test]
    async fn the_health_of_a_closed_router_answers_at_once() {
        let url = crate::unit_redis::url();
        let builder = RedisRouter::builder(&url).prefix(crate::unit_redis::prefix());
        let Some(router) = crate::unit_redis::connect(builder, &url).await else {
            return;
        };
        router.close().await.unwrap();
        let started = Instant::now();
        let health = router.health().await;
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "health took {:?}",
            started.elapsed()
        );
        assert_eq!(health.status, HealthStatus::Unhealthy);
        assert_eq!(health.detail, "closed");
    }

    /// A server that accepts the connection and never answers (a black hole: a firewall dropping the
    /// replies, a wrong port of another service) fails `connect` within about `connect_timeout`, with a
    /// connection error that names the setting and no password. Before, it read "Request timed out".
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_that_never_answers_fails_connect_naming_connect_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                open.push(socket);
            }
        });
        let started = Instant::now();
        let error = tokio::time::timeout(
            Duration::from_secs(10),
            RedisRouter::builder(format!("redis://:Bl4ckH0le@127.0.0.1:{port}"))
                .connect_timeout(Duration::from_millis(300))
                .connect(),
        )
        .await
        .expect("connect ends")
        .expect_err("nothing answers");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(matches!(error, Error::Connection { .. }), "{error:?}");
        let text = error.to_string();
        assert!(
            text.contains("no answer within connect_timeout (300ms)"),
            "{text}"
        );
        assert!(!text.contains("Bl4ckH0le"), "{text}");
        held.abort();
    }

    /// A prefix whose brace takes the place of the `{<class>}` tag is refused at connect, naming why.
    /// With `a{b`, the stream of class `A` and its publishers' marks hashed to two slots (Redis Cluster
    /// takes the text between the first `{` and the next `}`; with nothing between, the whole key),
    /// so every idempotent publish to a cluster failed with `CROSSSLOT`. Before, any prefix was taken.
    #[tokio::test]
    async fn a_prefix_with_a_brace_is_refused() {
        let url = crate::unit_redis::url();
        for prefix in ["a{b", "{}", "x{}y", "a{"] {
            let keys = Keys::new(prefix);
            assert_ne!(
                fred::util::redis_keyslot(keys.stream("A").as_bytes()),
                fred::util::redis_keyslot(keys.dedup("A", "p").as_bytes()),
                "the reason, for {prefix}"
            );
            let outcome = RedisRouter::builder(&url).prefix(prefix).connect().await;
            match outcome {
                Err(Error::Config { expected, .. }) => {
                    assert!(expected.contains("hash tag"), "{expected}")
                }
                Err(other) => panic!("{prefix}: {other}"),
                Ok(router) => {
                    router.close().await.unwrap();
                    panic!("{prefix} was taken");
                }
            }
        }
    }

    /// A prefix with a hash tag of its own (`{tenant}`: every key of the router in one slot, a common
    /// way to keep one tenant's keys on one node) or with a `}` alone leaves a class's stream and its
    /// publishers' marks in one slot, and is taken, as before. e70c390 refused every brace.
    #[tokio::test]
    async fn a_prefix_with_a_hash_tag_of_its_own_is_taken() {
        let url = crate::unit_redis::url();
        let unique = crate::unit_redis::prefix();
        for prefix in [
            format!("{{{unique}}}"),
            format!("{unique}}}b"),
            format!("{unique}{{v1}}:x"),
        ] {
            let keys = Keys::new(&prefix);
            for class in ["A", "PaymentRequest"] {
                assert_eq!(
                    fred::util::redis_keyslot(keys.stream(class).as_bytes()),
                    fred::util::redis_keyslot(keys.dedup(class, "p").as_bytes()),
                    "{prefix}: one slot for the stream of {class} and its marks"
                );
            }
            let builder = RedisRouter::builder(&url)
                .prefix(&prefix)
                .mode(DeliveryMode::Streams);
            let router = match builder.connect().await {
                Ok(router) => router,
                Err(error @ Error::Config { .. }) => panic!("{prefix} was refused: {error}"),
                Err(other) => {
                    crate::unit_redis::unreachable(&url, other);
                    return;
                }
            };
            router.close().await.unwrap();
        }
    }

    /// A class is listed in the registry again when its refresh is due, also when publishes take the
    /// direct path (which must leave the due refresh to the full path, not skip it).
    #[tokio::test]
    async fn a_due_registry_refresh_lists_the_class_again() {
        let url = crate::unit_redis::url();
        let prefix = crate::unit_redis::prefix();
        let builder = RedisRouter::builder(&url)
            .mode(DeliveryMode::Streams)
            .prefix(&prefix);
        let Some(router) = crate::unit_redis::connect(builder, &url).await else {
            return;
        };
        let shared = router.shared.clone();
        let registry = shared.keys.registry();
        let publish = || {
            router.publish(Envelope::new(
                agentcomm_core::channel::Channel::new("A", "event", "s1").unwrap(),
                "application/msgpack",
                vec![0x80],
            ))
        };
        publish().await.unwrap();
        let client = shared.pool.next().clone();
        let listed = |client: Client, registry: String| async move {
            client.sismember::<bool, _, _>(registry, "A").await.unwrap()
        };
        assert!(listed(client.clone(), registry.clone()).await);
        // The registry loses the class (a restart without persistence, a FLUSHDB)...
        let _: i64 = client.srem(&registry, "A").await.unwrap();
        publish().await.unwrap();
        assert!(
            !listed(client.clone(), registry.clone()).await,
            "not due yet: the class is not listed again on every publish"
        );
        // ...and its refresh comes due, at a publish that looks at the clock.
        let target = shared.registered_target("A").expect("registered");
        target.refresh_at_ms.store(0, Ordering::Relaxed);
        target.publishes.store(256, Ordering::Relaxed);
        publish().await.unwrap();
        assert!(listed(client.clone(), registry.clone()).await);
        delete_keys(&client, &prefix).await;
        router.close().await.unwrap();
    }

    /// Deletes the keys a test made under `prefix`.
    async fn delete_keys(client: &Client, prefix: &str) {
        let keys: Vec<String> = client
            .custom(
                fred::types::CustomCommand::new_static("KEYS", ClusterHash::Random, false),
                vec![format!("{prefix}:*")],
            )
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: i64 = client.del(keys).await.unwrap();
        }
    }

    /// A stream subscription whose set-up ends after a pool connection gave up reconnecting is
    /// refused with the give-up's error. Before, the give-up ended the subscriptions it found, and
    /// one still setting up was kept after it, its reader reading on a connection of its own: a
    /// stream that never ended and, its connections gone too, never delivered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[allow(clippy::await_holding_lock)] // held on purpose: the subscription cannot be kept meanwhile
    async fn a_stream_subscription_set_up_as_the_pool_gives_up_is_refused() {
        let url = crate::unit_redis::url();
        let prefix = crate::unit_redis::prefix();
        let builder = RedisRouter::builder(&url)
            .mode(DeliveryMode::Streams)
            .prefix(&prefix)
            .max_reconnect_attempts(Some(3));
        let Some(router) = crate::unit_redis::connect(builder, &url).await else {
            return;
        };
        let shared = router.shared.clone();
        let first_id = shared.next_subscription.load(Ordering::Acquire);
        // Holding the lock the subscriptions are kept under, the give-up is made to come while the
        // subscription sets up: after its open check, before it is kept.
        let streams = shared.streams.lock().expect("streams lock");
        let subscribing = tokio::spawn({
            let router = router.clone();
            async move {
                let pattern = agentcomm_core::ChannelPattern::parse("A:*:*").unwrap();
                router
                    .subscribe(SubscribeOptions::new(pattern).group("g"))
                    .await
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while shared.next_subscription.load(Ordering::Acquire) == first_id {
            assert!(Instant::now() < deadline, "the subscription never started");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // What the give-up does first; it then finds no subscription to end (this one is not kept).
        shared.gave_up.store(true, Ordering::Release);
        drop(streams);
        let outcome = tokio::time::timeout(Duration::from_secs(10), subscribing)
            .await
            .expect("the subscribe answers")
            .unwrap();
        match outcome {
            Err(Error::Connection { message, .. }) => {
                assert!(message.contains("max_reconnect_attempts"), "{message}")
            }
            Err(other) => panic!("another error: {other}"),
            Ok(_) => panic!("a subscription set up after the give-up was kept"),
        }
        assert!(shared.streams.lock().expect("streams lock").is_empty());
        let client = shared.pool.next().clone();
        delete_keys(&client, &prefix).await;
        router.close().await.unwrap();
    }
}
