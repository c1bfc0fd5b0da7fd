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
//! - ack is `XACK`, several at once when they come together; a nack keeps the entry pending and
//!   delivers it again after the delay, with its delivery counter set to the new attempt
//!   (`XCLAIM .. RETRYCOUNT`), so a crash does not reset it;
//! - entries left pending by a consumer that stopped (crashed, or cut off) are claimed by the others after
//!   `claim_idle`; an entry delivered more than `max_deliveries` times goes to its dead-letter channel;
//! - entries trimmed before a subscription read them are counted (`trimmed`) and logged.
//!
//! Every command that takes or touches an entry of this consumer (renewal, retry count, release) goes
//! through [`CLAIM_OWNED_SCRIPT`], and recovery after a reconnect through [`RECOVER_SCRIPT`]; both
//! check first that this consumer still owns it: an entry another member reclaimed is never taken back.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentcomm_core::channel::{ChannelPattern, DEAD_LETTER_CLASS};
use agentcomm_core::envelope::{Envelope, FrameDecoder, MessageId, headers};
use agentcomm_core::error::{Error, Result};
use agentcomm_core::router::{
    Acknowledge, BoxFuture, Delivery, Distribution, NackAction, SubscribeOptions, Subscription,
    SubscriptionControl,
};
use bytes::Bytes;
use fred::bytes_utils::Str;
use fred::clients::Client;
use fred::interfaces::{
    ClientInterface, ClientLike, HashesInterface, LuaInterface, StreamsInterface,
};
use fred::types::Value;
use fred::types::config::Options;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::connection::{
    Connecting, Role, connect_error, is_nogroup, map_error, on_node_of, redact, unresponsive_limit,
    watch_client, watch_connection_task,
};
use crate::counters::LogLimiter;
use crate::handoff::Handoff;
use crate::hashing::FastState;
use crate::router::Shared;
use crate::sequence::SEQUENCE_HEADER;

/// The field of a stream entry that holds the frame.
pub(crate) const FRAME_FIELD: &str = "f";

/// Takes entries this consumer still owns: for each id, only if it is pending for this consumer and its
/// entry still exists, `XCLAIM .. JUSTID` (which does not count a delivery), with `IDLE` and
/// `RETRYCOUNT` when given. KEYS: stream. ARGV: group, consumer, idle ms or '', retry count or '' or
/// 'unread' (one delivery less than the entry has: the read that took it never reached a handler), ids.
/// Returns {ids taken, ids kept}.
///
/// A renewal (neither idle nor retry count) of an entry trimmed from the stream while this consumer
/// holds it cannot renew it (`XCLAIM` does not take a deleted entry), yet its handler has the frame and
/// will settle it: such ids are returned as kept, and the consumer's own idle time is reset instead (a
/// history read past every id, which returns nothing and counts nothing), which is how the reclaim of
/// other members ([`RECLAIM_SCRIPT`]) tells that its owner is alive and does not count it as lost.
const CLAIM_OWNED_SCRIPT: &str = r#"
local taken, kept, touched = {}, {}, false
for i = 5, #ARGV do
  local id = ARGV[i]
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if #pending > 0 and pending[1][2] == ARGV[2] then
    if #redis.call('XRANGE', KEYS[1], id, id) > 0 then
      local claim = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id}
      if ARGV[3] ~= '' then table.insert(claim, 'IDLE'); table.insert(claim, ARGV[3]) end
      local retry = ARGV[4]
      if retry == 'unread' then retry = tostring(math.max(pending[1][4] - 1, 0)) end
      if retry ~= '' then table.insert(claim, 'RETRYCOUNT'); table.insert(claim, retry) end
      table.insert(claim, 'JUSTID')
      if #redis.call(unpack(claim)) > 0 then table.insert(taken, id) end
    elseif ARGV[3] == '' and ARGV[4] == '' then
      table.insert(kept, id)
      if not touched then
        -- Not max-max: XREADGROUP reads that id as '>' (new entries).
        redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[1],
          '18446744073709551615-18446744073709551614')
        touched = true
      end
    end
  end
end
return {taken, kept}
"#;

/// Takes back entries pending for this consumer that it does not hold (their delivery was lost with a
/// connection, or their handler's acknowledgement was), without counting a delivery for what no handler
/// saw: a history read (`XREADGROUP .. 0`) would add one to every pending entry it returns, held ones
/// included. For each id, only if it is still pending for this consumer: its entry (`XRANGE`), renewed
/// with `XCLAIM .. JUSTID` (which does not count a delivery); one whose entry was trimmed is
/// acknowledged and counted instead. An id written `+<id>` was acknowledged by its handler, whose `XACK`
/// was lost: it is acknowledged now (`XACK`), not delivered again (its handler succeeded: handling it
/// again would repeat its effects, and counting that delivery would dead-letter it at
/// `max_deliveries(1)`), trimmed or not. KEYS: stream. ARGV: group, consumer, ids. Returns {entries as
/// XRANGE gives them, number trimmed, each entry's deliveries counting the coming one, ids acknowledged
/// for their handler}.
const RECOVER_SCRIPT: &str = r#"
local entries, trimmed, counts, acked = {}, 0, {}, {}
for i = 3, #ARGV do
  local id, seen = ARGV[i], false
  if string.sub(id, 1, 1) == '+' then id = string.sub(id, 2); seen = true end
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if #pending > 0 and pending[1][2] == ARGV[2] then
    if seen then
      redis.call('XACK', KEYS[1], ARGV[1], id)
      table.insert(acked, id)
    else
      local entry = redis.call('XRANGE', KEYS[1], id, id)
      if #entry > 0 then
        redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
        table.insert(entries, entry[1])
        table.insert(counts, pending[1][4])
      else
        redis.call('XACK', KEYS[1], ARGV[1], id)
        trimmed = trimmed + 1
      end
    end
  end
end
return {entries, trimmed, counts, acked}
"#;

/// Claims entries idle for at least ARGV[3] ms: those whose entry was trimmed meanwhile are acknowledged
/// and reported instead (Redis 7 would drop them from the pending list without a word), unless another
/// consumer that is alive owns them (its idle time, which it resets while it holds them, is below the
/// minimum: see [`CLAIM_OWNED_SCRIPT`]): its handler has the frame, settles the entry, and nothing was
/// lost. The caller leaves out this consumer's own held entries. KEYS: stream. ARGV: group, consumer,
/// min idle ms, ids. Returns {claimed entries, trimmed ids}.
const RECLAIM_SCRIPT: &str = r#"
local claimed, trimmed = {}, {}
local idle_of = nil
for i = 4, #ARGV do
  local id = ARGV[i]
  if #redis.call('XRANGE', KEYS[1], id, id) == 0 then
    local pending = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], id, id, 1)
    if #pending > 0 then
      local owner, live = pending[1][2], false
      if owner ~= ARGV[2] then
        if idle_of == nil then
          idle_of = {}
          for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
            local name, idle = nil, nil
            for j = 1, #consumer, 2 do
              if consumer[j] == 'name' then name = consumer[j + 1]
              elseif consumer[j] == 'idle' then idle = consumer[j + 1] end
            end
            if name ~= nil then idle_of[name] = idle end
          end
        end
        live = idle_of[owner] ~= nil and idle_of[owner] < tonumber(ARGV[3])
      end
      if not live then
        redis.call('XACK', KEYS[1], ARGV[1], id)
        table.insert(trimmed, id)
      end
    end
  else
    local entry = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], id)
    if #entry > 0 then table.insert(claimed, entry[1]) end
  end
end
return {claimed, trimmed}
"#;

/// Removes a consumer from its group only if it holds nothing pending, atomically (a read landing
/// between a check and `XGROUP DELCONSUMER` would otherwise lose its entries). KEYS: stream. ARGV:
/// group, consumer. Returns the number of pending entries it would have lost (0: removed).
const LEAVE_SCRIPT: &str = r#"
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #pending > 0 then return #pending end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 0
"#;

/// Creates a consumer group with an exact read counter (`ENTRIESREAD`, Redis 7), so that entries
/// trimmed before the group read them can be counted: at the end of the stream (`$`, the entries so far
/// count as read) or at its start (`0`). KEYS: stream. ARGV: group, '$' or '0'.
const CREATE_GROUP_SCRIPT: &str = r#"
local added = 0
if ARGV[2] ~= '$' and ARGV[2] ~= '0' then
  -- From an id inside the stream: how many entries come before it is not known here.
  return redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], ARGV[2], 'MKSTREAM')
end
if ARGV[2] == '$' and redis.call('EXISTS', KEYS[1]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'entries-added' then added = info[i + 1] end
  end
end
return redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], ARGV[2], 'MKSTREAM', 'ENTRIESREAD', added)
"#;

/// Registers a group member: its entry in the group's members hash is `@<ms>` (Redis's clock when it
/// registered, the clock stream ids are made of) and its patterns, one per line. KEYS: the members
/// hash. ARGV: consumer, patterns.
const REGISTER_MEMBER_SCRIPT: &str = r#"
local now = redis.call('TIME')
local ms = string.format('%.0f', tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
return redis.call('HSET', KEYS[1], ARGV[1], '@' .. ms .. '\n' .. ARGV[2])
"#;

/// Where a stream stands, and a group's position in it (Redis 7): {length, entries added, first entry
/// id, last generated id, group's last delivered id, group's entries read}. KEYS: stream. ARGV: group
/// or ''. An empty array when the stream does not exist.
const POSITION_SCRIPT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local length, added, first, last = 0, false, '0-0', '0-0'
for i = 1, #info, 2 do
  local name = info[i]
  if name == 'length' then length = info[i + 1]
  elseif name == 'entries-added' then added = info[i + 1]
  elseif name == 'recorded-first-entry-id' then first = info[i + 1]
  elseif name == 'last-generated-id' then last = info[i + 1] end
end
local delivered, read = '', false
if ARGV[1] ~= '' then
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local name, group_last, group_read = nil, nil, false
    for i = 1, #group, 2 do
      if group[i] == 'name' then name = group[i + 1]
      elseif group[i] == 'last-delivered-id' then group_last = group[i + 1]
      elseif group[i] == 'entries-read' then group_read = group[i + 1] end
    end
    if name == ARGV[1] then delivered, read = group_last, group_read end
  end
end
return {length, added, first, last, delivered, read}
"#;

/// A stream entry id (`<ms>-<seq>`), ordered numerically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct EntryId(u64, u64);

impl EntryId {
    /// Parses `<ms>-<seq>` (or `<ms>`, sequence 0) in one pass over the bytes: ids are parsed once
    /// or twice for every entry read.
    fn parse(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        let dash = bytes.iter().position(|b| *b == b'-');
        let (ms, seq) = match dash {
            Some(at) => (&bytes[..at], Some(&bytes[at + 1..])),
            None => (bytes, None),
        };
        Some(EntryId(decimal(ms)?, seq.map_or(Some(0), decimal)?))
    }

    /// The id as Redis writes it, as `to_string` makes it, without the formatting machinery (for the
    /// commands that name entries one by one; an `XACK` batch takes [`EntryId::texts`]).
    fn text(self) -> String {
        let mut out = Vec::with_capacity(41);
        self.write(&mut out);
        String::from_utf8(out).expect("ASCII digits and a dash")
    }

    /// Appends the id as Redis writes it.
    fn write(self, out: &mut Vec<u8>) {
        push_decimal(out, self.0);
        out.push(b'-');
        push_decimal(out, self.1);
    }

    /// The ids as Redis writes them, for one command (an `XACK` of a batch): printed into one buffer
    /// that they all view, not one allocation each (the frame reader's buffer is not held for them
    /// either: ids kept from a read's reply would keep that buffer shared until the `XACK` came back,
    /// which makes fred read and parse its next replies in smaller pieces).
    fn texts(ids: impl ExactSizeIterator<Item = EntryId>) -> Vec<Str> {
        let mut buffer = Vec::with_capacity(ids.len() * 41);
        let mut ends = Vec::with_capacity(ids.len());
        for id in ids {
            id.write(&mut buffer);
            ends.push(buffer.len());
        }
        let buffer = Bytes::from(buffer);
        let mut start = 0;
        ends.into_iter()
            .map(|end| {
                let text = buffer.slice(start..end);
                start = end;
                Str::from_inner(text).expect("ASCII digits and a dash")
            })
            .collect()
    }
}

/// A non-empty run of ASCII digits as a u64, `None` for anything else or an overflow.
/// Reads a group member's entry as [`REGISTER_MEMBER_SCRIPT`] writes it: when it registered (ms of
/// Redis's clock; `None` for an entry without it, written by an older agentcomm) and its patterns.
fn member_entry(entry: &str) -> (Option<u64>, impl Iterator<Item = ChannelPattern> + '_) {
    let since = entry
        .split('\n')
        .next()
        .and_then(|line| line.strip_prefix('@')?.parse().ok());
    let patterns = entry
        .split('\n')
        .filter(|line| !line.starts_with('@'))
        .filter_map(|line| ChannelPattern::parse(line).ok());
    (since, patterns)
}

/// Where a subscription starts reading a stream it prepares.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Start {
    /// After the last entry: what is added from now on.
    End,
    /// From the first entry (a stream found after subscribing: everything in it is new).
    Beginning,
    /// From entries added at this time on (ms of Redis's clock): what is owed to a group since an
    /// earlier member registered.
    After(u64),
}

fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |value, digit| {
        let digit = digit.checked_sub(b'0').filter(|d| *d <= 9)?;
        value.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

fn push_decimal(out: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// One entry as read from a stream: its id and frame (`None` when the entry was deleted or trimmed while
/// it was pending).
type Entry = (Str, Option<Bytes>);

/// A held entry: its stream key and id.
type Held = (Arc<str>, EntryId);

/// Deliveries [`StreamSubscription::handle_entry`] made and nobody has handed to the subscriber yet, with
/// their entries, in order.
#[derive(Default)]
struct Ready {
    deliveries: Vec<Delivery>,
    entries: Vec<Held>,
}

pub(crate) struct StreamSubscription {
    pub(crate) id: u64,
    shared: Arc<Shared>,
    group: Option<String>,
    consumer: String,
    patterns: Vec<ChannelPattern>,
    wildcard_class: bool,
    /// The patterns of every member of the group.
    union: Mutex<Vec<ChannelPattern>>,
    /// Where deliveries wait for the subscriber (see [`crate::handoff`]). Once the subscriber dropped
    /// its subscription, what waits there is given back (nobody will read it).
    handoff: Arc<Handoff<Delivery>>,
    permits: Arc<Semaphore>,
    /// How many prefetch slots must be free before the reader reads again: reading one entry per
    /// settled delivery would cost a read per message once the prefetch is full.
    refill: usize,
    /// Entries read and not settled yet (delivered, buffered, or waiting for a prefetch slot).
    held: Mutex<HashSet<Held, FastState>>,
    /// Entries a handler acknowledged whose `XACK` failed (lost with a connection): pending for this
    /// consumer still, unless another member claimed them, so when they come back (recovery after the
    /// reconnect, see [`RECOVER_SCRIPT`], or a claim after `claim_idle`) they are acknowledged, not
    /// handled again (nor dead-lettered). At most [`UNACKED_CAP`] (see [`remember_unacked`]).
    unacked: Mutex<HashSet<Held, FastState>>,
    /// Limits the warnings about entries [`remember_unacked`] forgot.
    unacked_log: LogLimiter,
    settled: tokio::sync::Notify,
    closed: AtomicBool,
    /// Set when a reader's connection gave up reconnecting (see [`StreamSubscription::reader_gave_up`]).
    reader_gave_up: AtomicBool,
    /// Set when closing gives the entries still held back to the group: their acks then fail, since
    /// another member may already have them.
    released: AtomicBool,
    stop: watch::Sender<bool>,
    readers: Mutex<Vec<Arc<Reader>>>,
    /// Fan-out: where each stream was read up to.
    cursors: Mutex<HashMap<Arc<str>, EntryId>>,
    /// Fan-out: per stream, entries added before the subscription started, and entries read since.
    counted: Mutex<HashMap<Arc<str>, (u64, u64)>>,
    /// Entries known trimmed before they were read, as reported so far (per stream).
    trim_reported: Mutex<HashMap<Arc<str>, u64>>,
    known: Mutex<HashSet<Arc<str>>>,
    running: AtomicU64,
    done: tokio::sync::Notify,
    /// Read loops still running (a subset of `running`).
    reading: AtomicU64,
    acks: AckBatcher,
    filtered_log: LogLimiter,
    /// Acknowledgements of entries no longer pending (another member acknowledged them first).
    not_pending_log: LogLimiter,
    /// Per stream, the idle entries a reclaim round asked for and could neither claim nor count trimmed
    /// (trimmed while a live member holds them), and when: they stay idle until that member settles
    /// them (or is gone for `claim_idle`), so rounds that find only these do not interrupt the reader's
    /// blocking read for them (see [`UNCLAIMABLE_RETRY`]).
    unclaimable: Mutex<HashMap<Arc<str>, Unclaimable>>,
    /// Reuses the channel of the previous entry when the next one has the same.
    decoder: Mutex<FrameDecoder>,
    /// Held while [`finish`](Self::finish) runs; `true` once it ran to its end.
    finishing: tokio::sync::Mutex<bool>,
}

/// A connection that reads some of a subscription's streams with blocking reads.
struct Reader {
    client: Client,
    keys: Mutex<Vec<Arc<str>>>,
    rescan: Arc<AtomicBool>,
    /// Set while its reads fail (cheap to check after every read); `failure` says since when and why.
    failing: AtomicBool,
    failure: Mutex<Option<(tokio::time::Instant, String)>>,
}

impl Reader {
    /// Records a failed read (or recovery): health reports the subscription degraded until one works.
    fn failed(&self, error: &Error) {
        let mut failure = self.failure.lock().expect("failure lock");
        let since = failure
            .as_ref()
            .map_or_else(tokio::time::Instant::now, |(since, _)| *since);
        *failure = Some((since, error.to_string()));
        self.failing.store(true, Ordering::Release);
    }

    /// A read worked: whatever failed before is over.
    fn succeeded(&self) {
        if self.failing.load(Ordering::Acquire) {
            self.failing.store(false, Ordering::Release);
            *self.failure.lock().expect("failure lock") = None;
        }
    }

    /// A blocking read went unanswered for `read_block` plus [`unresponsive_limit`], which Redis never
    /// lets happen: the connection stopped answering (a silent network failure, nothing closed). fred
    /// does not check a connection blocked in a read for unresponsiveness, and queues every later
    /// command behind the lost read, until TCP gives up on the connection (many minutes): it is made
    /// again now, in the background (fred's reconnect policy applies; the reconnection makes the
    /// reader recover what the lost reads took). Not while fred is reconnecting already.
    fn replace_silent_connection(&self) {
        if !self.client.is_connected() {
            return;
        }
        tracing::warn!(
            "a stream read got no answer within read_block plus max(command_timeout, 2 s); the reader's \
             connection stopped answering and is made again"
        );
        let client = self.client.clone();
        tokio::spawn(async move {
            let _ = client.force_reconnection().await;
        });
    }

    /// A read timed out after the reader reconnected: it may have waited for the reconnection in fred's
    /// queue, and be answered late on a connection that works, or the new connection went silent too.
    /// With that read unanswered, fred does not check the connection for unresponsiveness (it counts
    /// as blocked), and the group's recovery, which only queues behind the read, would fail with
    /// timeouts for ever without making it again. A `PING` written behind the read is answered on a
    /// working connection as soon as the read is (within `read_block`); unanswered for `within` (the
    /// read's limit), the connection is made again. In the background: the read loop goes on.
    fn replace_if_silent(
        self: &Arc<Self>,
        subscription: &Arc<StreamSubscription>,
        within: Duration,
    ) {
        let reader = self.clone();
        let subscription = Arc::downgrade(subscription);
        let options = self.silence_probe_options(within);
        tokio::spawn(async move {
            let answer: std::result::Result<fred::types::Value, fred::error::Error> =
                reader.client.with_options(&options).ping(None).await;
            if let Err(error) = answer
                && *error.kind() == fred::error::ErrorKind::Timeout
                && subscription
                    .upgrade()
                    .is_some_and(|subscription| !subscription.is_closed())
            {
                reader.replace_silent_connection();
            }
        });
    }

    /// The options of [`Reader::replace_if_silent`]'s `PING`: one attempt, failed after `within`, and
    /// on a cluster sent to the node of the reader's stream (a reader reads one stream there), the
    /// connection its read waits on. fred sends a `PING` without them to any node, whose answer says
    /// nothing about the read's connection: a silent one would never be made again.
    fn silence_probe_options(&self, within: Duration) -> Options {
        let keys = self.keys.lock().expect("reader keys lock");
        let mut options = match keys.first() {
            Some(key) => on_node_of(&self.client, key.as_bytes(), Some(within)),
            None => Options {
                timeout: Some(within),
                ..Options::default()
            },
        };
        options.max_attempts = Some(1);
        options
    }

    /// Interrupts this reader's blocking read as if it timed out (`CLIENT UNBLOCK .. TIMEOUT`), so no
    /// entry it took is lost; waits at most 2 s for Redis to answer.
    async fn interrupt(&self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.client
                .unblock_self(Some(fred::types::ClientUnblockFlag::Timeout)),
        )
        .await;
    }
}

/// An acknowledgement waiting for its `XACK`: the entry, who waits for the result, and the entry's
/// prefetch slot (given back with the batch's).
type AckWaiter = (
    EntryId,
    tokio::sync::oneshot::Sender<Result<()>>,
    Option<OwnedSemaphorePermit>,
);

/// Acknowledgements waiting, by stream; `closed` once nothing is sent any more.
#[derive(Default)]
struct AckQueue {
    closed: bool,
    /// In the order they came, with their stream: grouped by stream when a batch is sent, not for each
    /// acknowledgement (nearly always one stream).
    waiting: Vec<(Arc<str>, AckWaiter)>,
}

/// Acknowledgements waiting to be sent: one `XACK` per stream for all that came together.
#[derive(Default)]
struct AckBatcher {
    queue: Mutex<AckQueue>,
    wake: tokio::sync::Notify,
    /// Held (read) while a batch is sent; closing takes it (write) to stop acknowledgements before it
    /// gives entries back.
    gate: tokio::sync::RwLock<()>,
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
        // Every delivery in the buffer holds one of the `prefetch` slots, which bound it: the buffer
        // needs no bound of its own (a bounded one allocates all its places at once, which for a
        // prefetch of `usize::MAX`, "no bound", cannot be done). A semaphore holds at most
        // `MAX_PERMITS`, as good as unbounded.
        let prefetch = options.prefetch.clamp(1, Semaphore::MAX_PERMITS);
        let (stop, _) = watch::channel(false);
        let consumer = format!("c-{}", uuid::Uuid::now_v7().simple());
        let mut receiver = None;
        let subscription = Arc::new_cyclic(|this: &std::sync::Weak<StreamSubscription>| {
            let this = this.clone();
            // A subscription dropped while closing: what waits for it can be given back now.
            let (handoff, handoff_receiver) = Handoff::new(move || {
                if let Some(subscription) = this.upgrade() {
                    subscription.settled.notify_waiters();
                }
            });
            receiver = Some(handoff_receiver);
            StreamSubscription {
                id,
                shared: shared.clone(),
                group,
                consumer,
                wildcard_class: options.patterns.iter().any(|p| p.class().is_none()),
                patterns: options.patterns.clone(),
                union: Mutex::new(options.patterns.clone()),
                handoff,
                permits: Arc::new(Semaphore::new(prefetch)),
                refill: (prefetch / 4)
                    .clamp(1, shared.settings.read_batch)
                    .min(prefetch),
                held: Mutex::new(HashSet::default()),
                unacked: Mutex::new(HashSet::default()),
                settled: tokio::sync::Notify::new(),
                closed: AtomicBool::new(false),
                reader_gave_up: AtomicBool::new(false),
                released: AtomicBool::new(false),
                stop,
                readers: Mutex::new(Vec::new()),
                cursors: Mutex::new(HashMap::new()),
                counted: Mutex::new(HashMap::new()),
                trim_reported: Mutex::new(HashMap::new()),
                known: Mutex::new(HashSet::new()),
                running: AtomicU64::new(0),
                done: tokio::sync::Notify::new(),
                reading: AtomicU64::new(0),
                acks: AckBatcher::default(),
                filtered_log: LogLimiter::new(Duration::from_secs(5)),
                not_pending_log: LogLimiter::new(Duration::from_secs(5)),
                unclaimable: Mutex::new(HashMap::new()),
                unacked_log: LogLimiter::new(Duration::from_secs(5)),
                decoder: Mutex::new(FrameDecoder::new()),
                finishing: tokio::sync::Mutex::new(false),
            }
        });
        let receiver = receiver.expect("made with the subscription");
        let abandoned = Abandoned(Some(subscription.clone()));
        let set_up = subscription.setup().await;
        abandoned.disarm();
        if let Err(error) = set_up {
            subscription.stop_now();
            subscription
                .quit_readers(tokio::time::Instant::now() + Duration::from_secs(1))
                .await;
            if let Some(group) = &subscription.group {
                // Its patterns would otherwise stay in the group's union, and, with a wildcard class,
                // make later members start the group at the start of new streams for a member that
                // never was.
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    shared.pool.next().hdel::<i64, _, _>(
                        shared.keys.group_members(group),
                        subscription.consumer.as_str(),
                    ),
                )
                .await;
            }
            return Err(error);
        }
        let control = Arc::new(StreamControl {
            subscription: subscription.clone(),
        });
        let handle = Subscription::from_stream(receiver, control, &options);
        Ok((subscription, handle))
    }

    fn is_group(&self) -> bool {
        self.group.is_some()
    }

    /// Undoes a set-up that did not finish, on a task of its own: stops the readers and tasks started
    /// so far and quits the readers' connections, and takes a group member's patterns back out of the
    /// group's union.
    /// On the router's runtime (see [`Shared::runtime`]): it is dropped wherever its caller drops it,
    /// outside a runtime too.
    fn abandon(self: Arc<Self>) {
        self.stop_now();
        let runtime = self.shared.runtime.clone();
        runtime.spawn(async move {
            self.quit_readers(tokio::time::Instant::now() + Duration::from_secs(1))
                .await;
            if let Some(group) = &self.group {
                let shared = &self.shared;
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    shared.pool.next().hdel::<i64, _, _>(
                        shared.keys.group_members(group),
                        self.consumer.as_str(),
                    ),
                )
                .await;
            }
        });
    }

    fn settings(&self) -> &crate::builder::Settings {
        &self.shared.settings
    }

    /// Creates groups or cursors, connects the readers and starts the tasks. Once it returns, every
    /// message published afterwards reaches this subscription (or its group).
    async fn setup(self: &Arc<Self>) -> Result<()> {
        let shared = &self.shared;
        // A group member registers its patterns before it reads the registry: a member that joins
        // later and finds this one there knows that every class stream missing from what this one
        // read holds only entries owed to the group (see `another_wildcard_member`).
        if let Some(group) = &self.group {
            let patterns: Vec<String> = self.patterns.iter().map(ToString::to_string).collect();
            shared
                .pool
                .next()
                .eval::<Value, _, _, _>(
                    REGISTER_MEMBER_SCRIPT,
                    vec![shared.keys.group_members(group)],
                    vec![self.consumer.clone(), patterns.join("\n")],
                )
                .await
                .map_err(|e| {
                    map_error(
                        &e,
                        self.settings(),
                        "registering the group member's patterns",
                    )
                })?;
        }
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
        let keys: Vec<Arc<str>> = classes
            .iter()
            .map(|class| Arc::from(shared.keys.stream(class)))
            .collect();
        // A group this subscription creates must start where the group's earliest claim on the stream
        // begins, not at its end: see `wildcard_members_since`.
        let start = match &self.group {
            Some(group) => match self.wildcard_members_since(group).await? {
                Some(ms) => Start::After(ms),
                None => Start::End,
            },
            None => Start::End,
        };
        for key in &keys {
            self.prepare_key(key, start).await?;
        }
        let clustered = shared.config.server.is_clustered();
        if clustered {
            for key in &keys {
                self.add_reader(vec![key.clone()]).await?;
            }
        } else {
            self.add_reader(keys).await?;
        }
        self.spawn(send_acks(self.clone()));
        self.spawn(watch_trimming(self.clone()));
        if self.is_group() {
            self.spawn(renew_leases(self.clone()));
            self.spawn(reclaim(self.clone()));
        }
        if self.wildcard_class {
            self.spawn(discover(self.clone()));
        }
        Ok(())
    }

    /// When the earliest other member of `group` with a wildcard class registered (Redis's clock, in
    /// ms), if there is one. Such a member reads every class stream in the registry, and a class
    /// registers before its first entry: so a stream on which the group does not exist yet was not in
    /// the registry when that member subscribed (else it would have created the group there), and
    /// what was added to it since that member registered is owed to the group. Creating the group at
    /// the end of such a stream (`$`) would skip those entries for good (that member's discovery,
    /// later, finds the group and keeps it); it is created from that moment instead (stream ids are
    /// Redis's clock), so nothing older is replayed. A member that left without closing keeps its
    /// entry: groups then start from when it registered, which delivers more, never less. Where the
    /// group exists already, nothing changes. One `HGETALL` per subscribe.
    async fn wildcard_members_since(&self, group: &str) -> Result<Option<u64>> {
        let members: HashMap<String, String> = self
            .shared
            .pool
            .next()
            .hgetall(self.shared.keys.group_members(group))
            .await
            .map_err(|e| map_error(&e, self.settings(), "reading the group's members"))?;
        Ok(members
            .iter()
            .filter(|(consumer, _)| **consumer != self.consumer)
            .filter_map(|(_, entry)| {
                let (since, mut patterns) = member_entry(entry);
                patterns
                    .any(|pattern| pattern.class().is_none())
                    .then_some(since?)
            })
            .min())
    }

    /// Makes `key` readable: the group exists (created at `start`: the end of the stream, its
    /// beginning for a stream found after subscribing, or where an earlier member's claim begins),
    /// or the fan-out cursor is set (at the stream's end, or its beginning).
    async fn prepare_key(&self, key: &Arc<str>, start: Start) -> Result<()> {
        let client = self.shared.pool.next();
        if let Some(group) = &self.group {
            let start = match start {
                Start::End => "$".to_string(),
                Start::Beginning => "0".to_string(),
                // Entries from that millisecond on: the id just before its first.
                Start::After(0) => "0".to_string(),
                Start::After(ms) => format!("{}-{}", ms - 1, u64::MAX),
            };
            create_group(client, key, group, &start, self.settings()).await?;
        } else {
            let (start, added) = if start == Start::Beginning {
                (EntryId(0, 0), 0)
            } else {
                let position = stream_position(client, key, None)
                    .await
                    .map_err(|e| map_error(&e, self.settings(), "reading the end of a stream"))?;
                position.map_or((EntryId(0, 0), 0), |p| (p.last, p.added.unwrap_or(0)))
            };
            self.cursors
                .lock()
                .expect("cursors lock")
                .insert(key.clone(), start);
            self.counted
                .lock()
                .expect("counted lock")
                .insert(key.clone(), (added, 0));
        }
        Ok(())
    }

    async fn add_reader(self: &Arc<Self>, keys: Vec<Arc<str>>) -> Result<()> {
        let shared = &self.shared;
        let client = shared
            .fred_builder(Role::Commands)
            .build()
            .map_err(|e| map_error(&e, self.settings(), "creating a stream reader"))?;
        let timeout = shared.settings.connect_timeout * 2;
        // Stopped if this is dropped before the subscription owns the client (see `Abandoned`).
        let mut connecting = Connecting::start(&client);
        let task = match tokio::time::timeout(timeout, connecting.wait()).await {
            Ok(Ok(())) => connecting.keep_task(),
            Ok(Err(error)) => {
                return Err(connect_error(
                    &error,
                    self.settings(),
                    "connecting a stream reader",
                ));
            }
            Err(_) => {
                let _ = tokio::time::timeout(Duration::from_secs(1), client.quit()).await;
                return Err(Error::Connection {
                    backend: "redis",
                    url: redact(&self.settings().url),
                    message: format!("a stream reader could not connect within {timeout:?}"),
                });
            }
        };
        // A reader's connection that runs out of reconnection attempts (`max_reconnect_attempts`)
        // never reads again, while the pool's connections may be fine: the subscription ends, as when
        // the pool gives up, instead of waiting for ever with health saying "reconnecting".
        if let Some(task) = task {
            let subscription = Arc::downgrade(self);
            watch_connection_task(task, move || {
                if let Some(subscription) = subscription.upgrade() {
                    subscription.reader_gave_up();
                }
            });
        }
        let rescan = Arc::new(AtomicBool::new(false));
        let flag = rescan.clone();
        watch_client(
            &client,
            "stream reader",
            shared.counters.clone(),
            &self.settings().url,
            move || flag.store(true, Ordering::Release),
        );
        self.known
            .lock()
            .expect("known streams lock")
            .extend(keys.iter().cloned());
        let reader = Arc::new(Reader {
            client,
            keys: Mutex::new(keys),
            rescan,
            failing: AtomicBool::new(false),
            failure: Mutex::new(None),
        });
        self.readers
            .lock()
            .expect("readers lock")
            .push(reader.clone());
        self.reading.fetch_add(1, Ordering::AcqRel);
        // Counted out when the loop ends, and also when its task is dropped unfinished, even unpolled
        // (its Tokio runtime ended): `finish` waits for this count, and waited out the close timeout.
        let reading = CountedTask(self.clone(), |s| &s.reading);
        let subscription = self.clone();
        self.spawn(async move {
            let _reading = reading;
            read_loop(subscription, reader).await;
        });
        Ok(())
    }

    fn spawn(self: &Arc<Self>, task: impl Future<Output = ()> + Send + 'static) {
        self.running.fetch_add(1, Ordering::AcqRel);
        let running = CountedTask(self.clone(), |s| &s.running);
        tokio::spawn(async move {
            let _running = running;
            task.await;
        });
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// A reader's connection task ended. Unless this subscription stopped first (closing quits the
    /// readers), or the router closed or its pool gave up (which stop every subscription and say so),
    /// the reader gave up reconnecting: the subscription ends after what it already received, and
    /// health says why until it is dropped. What it had not settled stays pending for its group's
    /// other members.
    fn reader_gave_up(&self) {
        if self.is_closed() || self.shared.is_closed() || self.shared.pool_gave_up() {
            return;
        }
        self.reader_gave_up.store(true, Ordering::Release);
        self.shared.counters.mark_trouble();
        tracing::error!(
            url = %redact(&self.settings().url),
            error = %reader_gave_up_error(self.settings()),
            "a stream subscription's reading connection gave up reconnecting; the subscription ends"
        );
        self.stop_now();
    }

    /// Whether the subscription ended because a reader's connection gave up reconnecting (for health).
    pub(crate) fn reader_gave_up_reconnecting(&self) -> bool {
        self.reader_gave_up.load(Ordering::Acquire)
    }

    /// Stops reading; what was delivered may still be settled.
    pub(crate) fn stop_now(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.handoff.close();
        self.stop.send_replace(true);
        self.acks.wake.notify_one();
        let readers = self.readers.lock().expect("readers lock").clone();
        for reader in readers {
            // Interrupts a blocking read as if it timed out, so that no entry it took is lost. On the
            // router's runtime: this runs in drops (a subscription's, an abandoned subscribe's), which
            // may happen outside any runtime.
            self.shared
                .runtime
                .spawn(async move { reader.interrupt().await });
        }
    }

    pub(crate) async fn quit_readers(&self, until: tokio::time::Instant) {
        let readers: Vec<_> = self
            .readers
            .lock()
            .expect("readers lock")
            .drain(..)
            .collect();
        let quitting = futures::future::join_all(readers.iter().map(|reader| reader.client.quit()));
        let _ = tokio::time::timeout_at(
            until.max(tokio::time::Instant::now() + Duration::from_millis(500)),
            quitting,
        )
        .await;
    }

    fn held_count(&self) -> usize {
        self.held.lock().expect("held lock").len()
    }

    /// Whether every reading connection is connected (for health).
    pub(crate) fn readers_connected(&self) -> bool {
        self.readers
            .lock()
            .expect("readers lock")
            .iter()
            .all(|reader| reader.client.is_connected())
    }

    /// For how long reads have been failing, and the last error, for the reader failing longest
    /// (for health): read failures are otherwise only logged, so a subscription whose every read
    /// fails (`WRONGTYPE`, `OOM`, `NOPERM`) would look healthy.
    pub(crate) fn read_failure(&self) -> Option<(Duration, String)> {
        self.readers
            .lock()
            .expect("readers lock")
            .iter()
            .filter(|reader| reader.failing.load(Ordering::Acquire))
            .filter_map(|reader| reader.failure.lock().expect("failure lock").clone())
            .min_by_key(|(since, _)| *since)
            .map(|(since, error)| (since.elapsed(), error))
    }

    /// Stops, waits until every entry read is settled (delivered ones, and those still in the
    /// subscription's buffer, which stay readable), gives back what is left, and leaves the group; all
    /// by `until`.
    ///
    /// Once: a subscription closed before its router is finished by its own close's task and by the
    /// router's close. The later call waits for the earlier one to end instead of running the steps
    /// again, side by side: the router's close quits the pool's connections once its own call
    /// returns, while the other call still left the group on them (fred then dropped its commands
    /// with the warning "Skip command with canceled error after calling quit"). A call cut short
    /// (its future dropped) leaves the steps to the next call.
    pub(crate) async fn finish(self: &Arc<Self>, until: tokio::time::Instant) {
        self.stop_now();
        let mut finished = self.finishing.lock().await;
        if !*finished {
            self.finish_steps(until).await;
            *finished = true;
        }
    }

    /// The steps of [`finish`](Self::finish).
    async fn finish_steps(self: &Arc<Self>, until: tokio::time::Instant) {
        // First the readers: what their last read took is held before anything else ends.
        self.wait_until(until, || self.reading.load(Ordering::Acquire) == 0)
            .await;
        loop {
            let settled = self.settled.notified();
            // Once the subscription was dropped, what waits in its buffer is given back, unhandled.
            for delivery in self.handoff.take_unread() {
                delivery.give_back();
            }
            let held = self.held_count();
            if held == 0 {
                break;
            }
            if tokio::time::timeout_at(until, settled).await.is_err() {
                tracing::warn!(
                    held,
                    "closing with deliveries still unsettled; their entries go back to the group (to \
                     another member, or this group's next consumer) and acknowledging them now fails"
                );
                break;
            }
        }
        // From here an acknowledgement could race another member that reclaims the entry: they fail.
        {
            let _no_more_acks = self.acks.gate.write().await;
            self.released.store(true, Ordering::Release);
        }
        self.acks.wake.notify_one();
        self.settled.notify_waiters();
        // The lease renewer must be gone first: a renewal after the release would make the entries
        // look fresh again for another `claim_idle`.
        let grace = until.max(tokio::time::Instant::now() + Duration::from_millis(500));
        self.wait_until(grace, || self.running.load(Ordering::Acquire) == 0)
            .await;
        let _ = tokio::time::timeout_at(grace, self.release_all_pending()).await;
        self.quit_readers(until).await;
        if let Some(group) = &self.group {
            let _ = tokio::time::timeout_at(grace, self.leave_group(group)).await;
        }
    }

    /// Lets the lease renewer and the acknowledgement sender end when [`finish`](Self::finish) was cut
    /// short before it released the entries (the router's close stopped waiting for it: Redis stopped
    /// answering, with an `XACK` under way). Both wait for that release, and waited for ever,
    /// holding the router's state and connections. Acknowledgements from now on fail, as after a
    /// release; what is still pending is claimed by the group's other members after `claim_idle`.
    pub(crate) fn give_up_finishing(&self) {
        if self.released.swap(true, Ordering::AcqRel) {
            return;
        }
        self.acks.wake.notify_one();
        self.settled.notify_waiters();
    }

    /// Gives every entry still pending for this consumer back to the group, marked idle so that
    /// another member claims it at once. Asks Redis rather than trusting local bookkeeping, so that
    /// nothing waits for `claim_idle` after a clean close.
    async fn release_all_pending(&self) {
        let Some(group) = &self.group else {
            return;
        };
        self.held.lock().expect("held lock").clear();
        self.settled.notify_waiters();
        let idle = self.settings().claim_idle.as_millis().to_string();
        for key in self.known_keys() {
            let client = self.shared.client_for(&key);
            let ids = match pending_of(client, &key, group, &self.consumer, "-", 10_000).await {
                Ok(ids) => ids,
                Err(error) => {
                    tracing::debug!(error = %error, "could not list pending entries to give back; they are claimed after claim_idle");
                    continue;
                }
            };
            // Those its handlers acknowledged whose `XACK` was lost: acknowledged now, not given back
            // to be handled again by another member (nor dead-lettered at `max_deliveries(1)`).
            let late: HashSet<EntryId, FastState> = {
                let unacked = self.unacked.lock().expect("unacked lock");
                ids.iter()
                    .filter(|id| unacked.contains(&(key.clone(), **id)))
                    .copied()
                    .collect()
            };
            let mut ids = ids;
            if !late.is_empty() {
                let texts: Vec<String> = late.iter().map(ToString::to_string).collect();
                match client
                    .xack::<Value, _, _, _>(key.as_ref(), group.as_str(), texts)
                    .await
                {
                    Ok(removed) => {
                        let mut unacked = self.unacked.lock().expect("unacked lock");
                        for id in &late {
                            unacked.remove(&(key.clone(), *id));
                        }
                        drop(unacked);
                        ids.retain(|id| !late.contains(id));
                        self.count_late_acks(&key, removed.as_u64().unwrap_or(0));
                    }
                    Err(error) => tracing::debug!(
                        error = %error,
                        "could not acknowledge entries whose acknowledgement was lost; they are given back, and handled again"
                    ),
                }
            }
            for chunk in ids.chunks(500) {
                let ids: Vec<String> = chunk.iter().map(ToString::to_string).collect();
                if let Err(error) =
                    claim_owned(client, &key, group, &self.consumer, Some(&idle), None, ids).await
                {
                    tracing::debug!(error = %error, "could not give pending entries back; they are claimed after claim_idle");
                }
            }
        }
    }

    fn known_keys(&self) -> Vec<Arc<str>> {
        self.known
            .lock()
            .expect("known streams lock")
            .iter()
            .cloned()
            .collect()
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

    /// Removes this consumer from its group when it holds nothing pending (atomically), so groups do
    /// not collect dead consumers, and takes its patterns out of the group's union.
    async fn leave_group(&self, group: &str) {
        let client = self.shared.pool.next();
        for key in self.known_keys() {
            let left: std::result::Result<i64, _> = client
                .eval(
                    LEAVE_SCRIPT,
                    vec![key.as_ref()],
                    vec![group, self.consumer.as_str()],
                )
                .await;
            match left {
                Ok(0) => {}
                Ok(pending) => tracing::debug!(
                    stream = key.as_ref(),
                    pending,
                    "the consumer stays in its group: it still has pending entries (claimed by others later)"
                ),
                Err(error) => tracing::debug!(error = %error, "could not leave the consumer group"),
            }
        }
        let _: std::result::Result<i64, _> = client
            .hdel(
                self.shared.keys.group_members(group),
                self.consumer.as_str(),
            )
            .await;
    }

    /// Reads the patterns of every member of the group again.
    async fn refresh_union(&self, group: &str) -> std::result::Result<(), fred::error::Error> {
        let members: Vec<String> = self
            .shared
            .pool
            .next()
            .hvals(self.shared.keys.group_members(group))
            .await?;
        let mut patterns: Vec<ChannelPattern> = members
            .iter()
            .flat_map(|entry| member_entry(entry).1)
            .collect();
        patterns.extend(self.patterns.iter().cloned());
        *self.union.lock().expect("union lock") = patterns;
        Ok(())
    }

    /// Whether an entry on this channel is for this subscription: its patterns match, or, for a group,
    /// those of another member do (a group receives the union of its members' patterns). `fresh` says
    /// whether the union was read after the entry was: a member that joined before the entry was
    /// published is then in it. `None`: the union could not be read, so nothing may be filtered.
    async fn wants(&self, envelope: &Envelope, fresh: &mut bool) -> Option<bool> {
        if self.wants_now(envelope) {
            return Some(true);
        }
        let Some(group) = &self.group else {
            return Some(false);
        };
        if !*fresh {
            if let Err(error) = self.refresh_union(group).await {
                tracing::warn!(error = %error, "could not read the group's patterns; the entry stays pending and is tried again");
                return None;
            }
            *fresh = true;
        }
        Some(self.union_matches(envelope))
    }

    /// [`wants`](Self::wants) without reading the group's patterns again: `false` may be a `true`
    /// with the patterns of a member that joined since they were last read.
    fn wants_now(&self, envelope: &Envelope) -> bool {
        self.patterns.iter().any(|p| p.matches(envelope.channel()))
            || (self.group.is_some() && self.union_matches(envelope))
    }

    fn union_matches(&self, envelope: &Envelope) -> bool {
        self.union
            .lock()
            .expect("union lock")
            .iter()
            .any(|p| p.matches(envelope.channel()))
    }

    /// Makes one entry read from `key` a delivery, added to `ready`, or settles it when it cannot be
    /// delivered. A group's entry must be held already (by its read, recovery or claim). `fresh`: see
    /// [`StreamSubscription::wants`]. What `ready` holds is handed over before anything here waits
    /// (for Redis: a filtered entry's acknowledgement, a dead letter, the group's patterns), so that a
    /// subscriber with nothing to do does not wait with it.
    #[allow(clippy::too_many_arguments)]
    async fn handle_entry(
        self: &Arc<Self>,
        key: &Arc<str>,
        id: Str,
        frame: Option<Bytes>,
        deliveries: Option<u64>,
        redelivered: bool,
        permit: OwnedSemaphorePermit,
        fresh: &mut bool,
        ready: &mut Ready,
    ) {
        let shared = &self.shared;
        let Some(entry_id) = EntryId::parse(&id) else {
            tracing::warn!(
                stream = key.as_ref(),
                entry = &*id,
                "an entry id that is not <ms>-<seq>; skipped"
            );
            return;
        };
        if !self.is_group() {
            self.cursors
                .lock()
                .expect("cursors lock")
                .insert(key.clone(), entry_id);
            if let Some(counted) = self.counted.lock().expect("counted lock").get_mut(key) {
                counted.1 += 1;
            }
        }
        let Some(frame) = frame else {
            shared.counters.lose(&shared.counters.trimmed, 1);
            tracing::warn!(
                stream = key.as_ref(),
                entry = &*id,
                "a pending entry was trimmed from its stream before it was handled (raise \
                 `stream_max_len`, or consume faster)"
            );
            self.send_ready(ready).await;
            self.ack_entry(key, entry_id).await;
            return;
        };
        // A reply (a dead letter in pub/sub mode) stored by the publish script (`idempotent_publish`)
        // carries the sequence number of its pub/sub copy: taken out. Stored by `XADD`, it has none.
        let decoded = self
            .decoder
            .lock()
            .expect("decoder lock")
            .decode_taking(frame.clone(), SEQUENCE_HEADER);
        let envelope = match decoded {
            Ok((envelope, _)) => envelope,
            Err(error) => {
                let source = format!("{key} {id}");
                self.send_ready(ready).await;
                if shared
                    .dead_letter_malformed(frame, &source, &source, &error)
                    .await
                {
                    self.ack_entry(key, entry_id).await;
                } else {
                    self.unhold(key, entry_id);
                }
                return;
            }
        };
        let wanted = if self.wants_now(&envelope) {
            Some(true)
        } else {
            // A group reads its members' patterns again, or acknowledges the entry nobody wants: both
            // wait for Redis. A fan-out subscription passes over it without waiting, and what is ready
            // stays for the batch's one hand-over.
            if self.is_group() {
                self.send_ready(ready).await;
            }
            self.wants(&envelope, fresh).await
        };
        match wanted {
            Some(true) => {}
            Some(false) => {
                if self.is_group() {
                    shared.counters.bump(&shared.counters.filtered);
                    if let Some(suppressed) = self.filtered_log.allow() {
                        tracing::info!(
                            channel = envelope.channel().name(),
                            group = self.group.as_deref().unwrap_or_default(),
                            suppressed,
                            "an entry no member of the group subscribed to was acknowledged without delivery"
                        );
                    }
                    self.ack_entry(key, entry_id).await;
                }
                return;
            }
            None => {
                // Left pending: reclaimed after claim_idle, when the patterns can be read again.
                self.unhold(key, entry_id);
                return;
            }
        }
        let deliveries = deliveries.unwrap_or(1);
        if deliveries > u64::from(shared.settings.max_deliveries) {
            self.send_ready(ready).await;
            self.dead_letter(key, entry_id, envelope, deliveries).await;
            return;
        }
        let attempt = envelope
            .attempt()
            .max(u32::try_from(deliveries).unwrap_or(u32::MAX));
        let envelope = envelope.with_attempt(attempt);
        // A group's entries were held when their read, recovery or claim came back (every caller
        // holds them first); a fan-out subscription holds what it delivers from here.
        if !self.is_group() {
            self.held
                .lock()
                .expect("held lock")
                .insert((key.clone(), entry_id));
        }
        let ack = StreamAck {
            subscription: self.clone(),
            key: key.clone(),
            id: entry_id,
            counted: Handled::Never,
            _permit: Some(permit),
        };
        if redelivered {
            shared.counters.bump(&shared.counters.redelivered);
        }
        ready
            .deliveries
            .push(Delivery::new(envelope, Box::new(ack)).redelivered(redelivered));
        ready.entries.push((key.clone(), entry_id));
    }

    /// Hands deliveries to the subscription, in order; `entries` are their stream keys and ids, in the
    /// same order. If it has closed meanwhile, a group gets the entries back (`counted`: see
    /// [`StreamAck::counted`]); a fan-out subscription, which asked for nothing more, just forgets
    /// them.
    async fn send(
        self: &Arc<Self>,
        deliveries: Vec<Delivery>,
        entries: Vec<Held>,
        counted: Handled,
    ) {
        if deliveries.is_empty() {
            return;
        }
        let count = deliveries.len() as u64;
        let Err(deliveries) = self.handoff.send_all(deliveries) else {
            self.shared
                .counters
                .add(&self.shared.counters.delivered, count);
            return;
        };
        for (delivery, (key, id)) in deliveries.into_iter().zip(entries) {
            if self.is_group() {
                // Given back now (not through `abandon`, which would do it in the background), so
                // that closing waits for it.
                let envelope = delivery.envelope().clone();
                delivery.discard();
                self.release(&key, id, &envelope, counted).await;
            } else {
                delivery.discard();
                self.unhold(&key, id);
            }
        }
    }

    /// [`send`](Self::send) for what [`handle_entry`](Self::handle_entry) made ready, leaving it
    /// empty.
    async fn send_ready(self: &Arc<Self>, ready: &mut Ready) {
        let Ready {
            deliveries,
            entries,
        } = std::mem::take(ready);
        self.send(deliveries, entries, Handled::Never).await;
    }

    /// [`send`](Self::send) for one delivery.
    async fn send_one(
        self: &Arc<Self>,
        delivery: Delivery,
        key: Arc<str>,
        id: EntryId,
        counted: Handled,
    ) {
        self.send(vec![delivery], vec![(key, id)], counted).await;
    }

    async fn dead_letter(&self, key: &Arc<str>, id: EntryId, envelope: Envelope, deliveries: u64) {
        let shared = &self.shared;
        let max = shared.settings.max_deliveries;
        let channel = envelope.channel();
        if channel.class() == DEAD_LETTER_CLASS && channel.direction() == DEAD_LETTER_CLASS {
            // The dead letter of a dead letter: its own dead letter would have the same channel and go
            // into the stream it came from, to be read and fail again, for ever. It is left where it
            // is: acknowledged for this group, kept in the stream until trimmed.
            shared.counters.bump(&shared.counters.dead_letters_left);
            tracing::error!(
                message_id = %envelope.id(),
                channel = channel.name(),
                deliveries,
                stream = key.as_ref(),
                entry = %id,
                "a dead letter of a dead letter was delivered {deliveries} times without being \
                 acknowledged (max_deliveries is {max}); it is not dead-lettered again, which would \
                 loop: it stays in its stream (until trimmed), acknowledged for this group"
            );
            self.ack_entry(key, id).await;
            return;
        }
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
            Err(error) => {
                tracing::error!(
                    error = %error,
                    message_id = %envelope.id(),
                    "could not publish a dead letter; the entry stays pending and is tried again"
                );
                self.unhold(key, id);
            }
        }
    }

    /// Acknowledges an entry that is not delivered (filtered, malformed, dead-lettered).
    async fn ack_entry(&self, key: &Arc<str>, id: EntryId) {
        if let Some(group) = &self.group {
            let client = self.shared.client_for(key);
            if let Err(error) = client
                .xack::<Value, _, _, _>(key.as_ref(), group.as_str(), id.to_string())
                .await
            {
                tracing::warn!(error = %error, stream = key.as_ref(), entry = %id, "could not acknowledge an entry; it will come back");
            }
        }
        self.unhold(key, id);
    }

    /// Holds the entries a read brought (taken apart by [`read_entries`], so only the streams it read;
    /// an id that is not `<ms>-<seq>` is not held, see [`held_of`]): their leases are renewed from now
    /// on.
    fn hold_read(&self, entries: &[ReadEntry]) {
        if !entries.is_empty() {
            self.held
                .lock()
                .expect("held lock")
                .extend(held_of(entries));
        }
    }

    /// Holds the entries `ids` (as Redis writes them) of `key`: their leases are renewed from now on.
    /// Returns those it held now; the others were held already, by another path of this subscription
    /// (recovery reserves what it takes back before its script runs), whose handler has them or will:
    /// the caller leaves them to it rather than deliver them a second time.
    fn hold_ids<'a>(
        &self,
        key: &Arc<str>,
        ids: impl IntoIterator<Item = &'a str>,
    ) -> HashSet<EntryId, FastState> {
        let mut held = self.held.lock().expect("held lock");
        let mut new = HashSet::default();
        for id in ids {
            if let Some(id) = EntryId::parse(id)
                && held.insert((key.clone(), id))
            {
                new.insert(id);
            }
        }
        new
    }

    /// [`StreamSubscription::unhold`] for an id as Redis writes it.
    fn unhold_text(&self, key: &Arc<str>, id: &str) {
        if let Some(id) = EntryId::parse(id) {
            self.unhold(key, id);
        }
    }

    /// Forgets held entries of `key`, under one lock.
    fn unhold_all(&self, key: &Arc<str>, ids: impl IntoIterator<Item = EntryId>) {
        let mut held = self.held.lock().expect("held lock");
        for id in ids {
            held.remove(&(key.clone(), id));
        }
        if held.is_empty() || self.is_closed() {
            self.settled.notify_waiters();
        }
    }

    /// Counts an `XACK` of `sent` entries that removed `removed` from the pending list. One that
    /// removed fewer found entries no longer pending: another member had claimed them (this one was
    /// out of reach, or its handler slower than `claim_idle` allows while its leases could not be
    /// renewed) and acknowledged them first, so they were handled twice; or the group was deleted
    /// and made again. The acknowledgement itself succeeded (the entry is settled), so it is counted
    /// and logged rather than failed.
    fn count_acks(&self, key: &str, group: &str, sent: u64, removed: u64) {
        let counters = &self.shared.counters;
        let removed = removed.min(sent);
        counters.add(&counters.acked, removed);
        let missed = sent - removed;
        if missed == 0 {
            return;
        }
        counters.add(&counters.acks_not_pending, missed);
        if let Some(suppressed) = self.not_pending_log.allow() {
            tracing::warn!(
                stream = key,
                group,
                entries = missed,
                suppressed,
                "acknowledged entries that were no longer pending: another member of the group had \
                 claimed and acknowledged them first, so they were handled twice (raise claim_idle if \
                 handlers or outages last longer), or the group was made again"
            );
        }
    }

    /// Counts `late` entries acknowledged when they came back after their handler's `XACK` was lost
    /// (`acked`, and `acks_recovered`), instead of being handled again.
    fn count_late_acks(&self, key: &str, late: u64) {
        if late == 0 {
            return;
        }
        let counters = &self.shared.counters;
        counters.add(&counters.acked, late);
        counters.add(&counters.acks_recovered, late);
        tracing::info!(
            stream = key,
            entries = late,
            "entries whose acknowledgement was lost with a connection came back and were acknowledged, \
             not handled again (their handlers had succeeded)"
        );
    }

    /// Acknowledges an entry its handler acknowledged already, whose `XACK` was lost, now that it came
    /// back (claimed after `claim_idle`) instead of handling it again. Should this `XACK` fail too, it
    /// is remembered again, and comes back again.
    async fn ack_late(&self, key: &Arc<str>, id: EntryId) {
        if let Some(group) = &self.group {
            let acked = self
                .shared
                .client_for(key)
                .xack::<Value, _, _, _>(key.as_ref(), group.as_str(), id.to_string())
                .await;
            match acked {
                // 0: no longer pending (the recovery after a reconnect, or another member, acknowledged
                // it meanwhile): counted there, not here.
                Ok(removed) => self.count_late_acks(key, removed.as_u64().unwrap_or(0).min(1)),
                Err(error) => {
                    tracing::warn!(error = %error, stream = key.as_ref(), entry = %id, "could not acknowledge an entry whose earlier acknowledgement was lost; it comes back, and is acknowledged then");
                    let mut unacked = self.unacked.lock().expect("unacked lock");
                    remember_unacked(&mut unacked, std::iter::once((key.clone(), id)));
                }
            }
        }
        self.unhold(key, id);
    }

    /// Forgets a held entry.
    fn unhold(&self, key: &Arc<str>, id: EntryId) {
        self.unhold_all(key, [id]);
    }

    /// Gives a held entry back to the group: marked idle, so another member claims it at once. One whose
    /// delivery counter last counted a delivery no handler saw (`Handled::Never`) gets its counter back
    /// as it was before that count, so that the next member's claim does not count it as a second
    /// attempt.
    async fn release(&self, key: &Arc<str>, id: EntryId, envelope: &Envelope, handled: Handled) {
        if let Some(group) = &self.group {
            self.mark_idle(group, key, vec![id.to_string()], handled == Handled::Never)
                .await;
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

    /// Gives entries a read (or recovery) took back to the group when the subscription stops before
    /// they were handed to anyone (they waited for a prefetch slot): marked idle, with their delivery
    /// counter as it was before that read, as a delivery given back from the buffer is (see
    /// [`Handled::Never`]). Left pending as they were, the next member's claim counted a second attempt
    /// for them: with `max_deliveries(1)`, a dead letter of an entry no handler ever saw.
    async fn release_unread(&self, entries: impl IntoIterator<Item = (Arc<str>, Str)>) {
        let mut by_key: HashMap<Arc<str>, Vec<String>> = HashMap::new();
        for (key, id) in entries {
            by_key.entry(key).or_default().push(id.to_string());
        }
        for (key, ids) in by_key {
            if let Some(group) = &self.group {
                self.mark_idle(group, &key, ids.clone(), true).await;
            }
            self.unhold_all(&key, ids.iter().filter_map(|id| EntryId::parse(id)));
        }
    }

    /// Marks entries of `key` this consumer holds idle in `group`, so that another member claims them at
    /// once; `unread`: with their delivery counter as it was before the delivery no handler saw. If
    /// Redis does not take it, they are claimed after `claim_idle` (logged).
    async fn mark_idle(&self, group: &str, key: &Arc<str>, ids: Vec<String>, unread: bool) {
        let idle = self.settings().claim_idle.as_millis().to_string();
        let result = claim_owned(
            self.shared.client_for(key),
            key,
            group,
            &self.consumer,
            Some(&idle),
            unread.then_some("unread"),
            ids,
        )
        .await;
        if let Err(error) = result {
            tracing::debug!(error = %error, "could not mark given-back entries idle; they are claimed after claim_idle");
        }
    }

    /// Delivers a held entry again after `delay` (nack, abandon or give-back); once the subscription
    /// has closed, gives it back to the group instead. `handled`: whether a handler may have seen this
    /// delivery (`Never` only for a give-back).
    fn redeliver(
        self: &Arc<Self>,
        ack: StreamAck,
        envelope: Envelope,
        delay: Duration,
        retry_count: Option<u32>,
        handled: Handled,
    ) {
        let subscription = self.clone();
        let mut ack = ack;
        // A delivery a handler may have seen is what the entry's counter last counted (abandon and
        // requeue do not count again), unless a retry count is recorded below for the next one.
        if handled == Handled::Maybe {
            ack.counted = Handled::Maybe;
        }
        let run = async move {
            if !delay.is_zero() {
                let mut stop = subscription.stop.subscribe();
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stopped(&mut stop) => {}
                }
            }
            if subscription.is_closed() {
                subscription
                    .release(&ack.key, ack.id, &envelope, ack.counted)
                    .await;
                drop(ack);
                return;
            }
            if let (Some(group), Some(count)) = (&subscription.group, retry_count) {
                // The attempt number survives a crash: it becomes the entry's delivery counter.
                let count = count.to_string();
                let result = claim_owned(
                    subscription.shared.client_for(&ack.key),
                    &ack.key,
                    group,
                    &subscription.consumer,
                    None,
                    Some(&count),
                    vec![ack.id.to_string()],
                )
                .await;
                match result {
                    // The counter now counts the delivery made below, which no handler saw yet.
                    Ok((taken, _)) if !taken.is_empty() => ack.counted = Handled::Never,
                    Ok(_) => {}
                    Err(error) => {
                        tracing::debug!(error = %error, "could not record the attempt on the entry")
                    }
                }
            }
            subscription
                .shared
                .counters
                .bump(&subscription.shared.counters.redelivered);
            let (key, id, counted) = (ack.key.clone(), ack.id, ack.counted);
            let delivery = Delivery::new(envelope, Box::new(ack)).redelivered(true);
            subscription.send_one(delivery, key, id, counted).await;
        };
        // On the router's runtime: a delivery may be given back (dropped) outside any.
        self.shared.runtime.spawn(run);
    }

    /// Reads this consumer's own pending entries that it does not hold: entries whose delivery was lost
    /// with a connection. They come before anything new, in their order. Lists them (`XPENDING`) and
    /// takes those it does not hold with [`RECOVER_SCRIPT`], so that no delivery is counted for the
    /// entries its handlers still have (they would be dead-lettered early, or reach the next member
    /// with an inflated attempt), nor for the recovered ones, which no handler saw.
    async fn recover_pending(self: &Arc<Self>, reader: &Reader, keys: &[Arc<str>]) -> Result<()> {
        let Some(group) = &self.group else {
            return Ok(());
        };
        let page = self.settings().read_batch.max(1) as u64;
        for key in keys {
            let mut from = "-".to_string();
            // This consumer's pending entries of `key`: those of `unacked` not among them are no longer
            // its own (another member claimed them, or the XACK went through after all).
            let mut listed_all: HashSet<EntryId, FastState> = HashSet::default();
            loop {
                if self.is_closed() {
                    return Ok(());
                }
                let listed =
                    match pending_of(&reader.client, key, group, &self.consumer, &from, page).await
                    {
                        Ok(listed) => listed,
                        // The stream or its group is gone, and this consumer's pending entries with
                        // it: nothing to recover. The read that follows meets the same error and
                        // creates the group again (else recovery would fail forever).
                        Err(error) if is_nogroup(&error) => break,
                        Err(error) => {
                            return Err(map_error(
                                &error,
                                self.settings(),
                                "listing pending entries",
                            ));
                        }
                    };
                let Some(last) = listed.last() else {
                    break;
                };
                from = format!("({last}");
                let more = listed.len() as u64 >= page;
                listed_all.extend(listed.iter().copied());
                let (ids, reserved) = self.reserve_for_recovery(key, &listed);
                if !ids.is_empty() {
                    let mut args: Vec<String> = Vec::with_capacity(2 + ids.len());
                    args.push(group.clone());
                    args.push(self.consumer.clone());
                    args.extend(ids);
                    self.recover_entries(reader, key, args, reserved).await?;
                }
                if !more {
                    break;
                }
            }
            self.unacked
                .lock()
                .expect("unacked lock")
                .retain(|(of, id)| of != key || listed_all.contains(id));
        }
        Ok(())
    }

    /// Of this consumer's pending entries of `key` that `listed` names, those it does not hold, as
    /// [`RECOVER_SCRIPT`] takes them (`+<id>` for one whose handler acknowledged it, see `unacked`),
    /// and those of them now held: held here, in the same lock as the check, before the script runs.
    /// The subscription's claim round may claim one of them (pending for this consumer, idle for
    /// `claim_idle` after an outage as long) in the round trip between the listing and the script:
    /// whichever of the two holds an entry first delivers it, and the other finds it held and leaves
    /// it (see [`StreamSubscription::hold_ids`]), so that one handler never gets it twice.
    fn reserve_for_recovery(
        &self,
        key: &Arc<str>,
        listed: &[EntryId],
    ) -> (Vec<String>, Vec<EntryId>) {
        let mut held = self.held.lock().expect("held lock");
        let unacked = self.unacked.lock().expect("unacked lock");
        let mut ids = Vec::with_capacity(listed.len());
        let mut reserved = Vec::with_capacity(listed.len());
        for id in listed {
            if !held.insert((key.clone(), *id)) {
                continue;
            }
            reserved.push(*id);
            if unacked.contains(&(key.clone(), *id)) {
                ids.push(format!("+{}", id.text()));
            } else {
                ids.push(id.text());
            }
        }
        (ids, reserved)
    }

    /// Runs [`RECOVER_SCRIPT`] (`args`: group, consumer, ids) and delivers what it took back.
    /// `reserved`: the ids asked for, held by [`StreamSubscription::reserve_for_recovery`]; those the
    /// script did not take back (acknowledged, trimmed, no longer this consumer's) are unheld here.
    async fn recover_entries(
        self: &Arc<Self>,
        reader: &Reader,
        key: &Arc<str>,
        args: Vec<String>,
        reserved: Vec<EntryId>,
    ) -> Result<()> {
        let reply: Value = match reader
            .client
            .eval(RECOVER_SCRIPT, vec![key.as_ref()], args)
            .await
        {
            Ok(reply) => reply,
            Err(error) => {
                // Nothing taken back: they stay pending for this consumer, for the next recovery.
                self.unhold_all(key, reserved);
                return Err(map_error(
                    &error,
                    self.settings(),
                    "taking back pending entries",
                ));
            }
        };
        let mut parts = reply.into_array().into_iter();
        let owned = parse_entries(parts.next().unwrap_or(Value::Null));
        let trimmed = parts.next().and_then(|count| count.as_u64()).unwrap_or(0);
        let counts: Vec<u64> = parts
            .next()
            .map(|counts| {
                counts
                    .into_array()
                    .into_iter()
                    .map(|count| count.as_u64().unwrap_or(1).max(1))
                    .collect()
            })
            .unwrap_or_default();
        let acked: Vec<EntryId> = parts
            .next()
            .map(|ids| {
                ids.into_array()
                    .into_iter()
                    .filter_map(|id| id.as_string().as_deref().and_then(EntryId::parse))
                    .collect()
            })
            .unwrap_or_default();
        {
            // Recovered: their deliveries are counted in Redis now. Acknowledged: done with.
            let mut unacked = self.unacked.lock().expect("unacked lock");
            for (id, _) in &owned {
                if let Some(id) = EntryId::parse(id) {
                    unacked.remove(&(key.clone(), id));
                }
            }
            for id in &acked {
                unacked.remove(&(key.clone(), *id));
            }
        }
        self.count_late_acks(key, acked.len() as u64);
        if trimmed > 0 {
            // Pending for this consumer, not held: no handler had them. Gone before anyone handled them.
            self.shared
                .counters
                .lose(&self.shared.counters.trimmed, trimmed);
            tracing::warn!(
                stream = key.as_ref(),
                entries = trimmed,
                "pending entries were trimmed before they were handled (raise `stream_max_len`, or consume faster)"
            );
        }
        // Held already (reserved before the script ran), like a read's entries: none is left
        // unrenewed while one before it is handled. Those not taken back are no longer held.
        {
            let taken: HashSet<EntryId, FastState> = owned
                .iter()
                .filter_map(|(id, _)| EntryId::parse(id))
                .collect();
            self.unhold_all(key, reserved.into_iter().filter(|id| !taken.contains(id)));
        }
        let mut fresh = false;
        let mut owned = owned.into_iter();
        let mut counts = counts.into_iter();
        while let Some((id, frame)) = owned.next() {
            let deliveries = counts.next();
            let Some(permit) = self.acquire().await else {
                // Closing: the rest goes back to the group unhandled.
                let rest = std::iter::once((id, frame)).chain(owned);
                self.release_unread(rest.map(|(id, _)| (key.clone(), id)))
                    .await;
                return Ok(());
            };
            let mut ready = Ready::default();
            self.handle_entry(
                key, id, frame, deliveries, true, permit, &mut fresh, &mut ready,
            )
            .await;
            self.send_ready(&mut ready).await;
        }
        Ok(())
    }

    /// `count` prefetch slots in one permit (waiting in line for them), or `None` once the subscription
    /// stops. Split one slot off per entry as entries come.
    async fn acquire_slots(&self, count: usize) -> Option<OwnedSemaphorePermit> {
        let mut stop = self.stop.subscribe();
        let count = u32::try_from(count.max(1)).unwrap_or(u32::MAX);
        tokio::select! {
            permit = self.permits.clone().acquire_many_owned(count) => permit.ok(),
            () = stopped(&mut stop) => None,
        }
    }

    /// `count` prefetch slots to claim entries with, or `None` once the subscription stops.
    ///
    /// A reader in its blocking read holds every slot that was free when the read started (up to
    /// `read_batch`), for as long as `read_block` when nothing new comes: waiting that out would
    /// leave entries that a stopping member gave back (marked idle so that they are claimed at once)
    /// waiting seconds, and get one slot per read at worst. So when the slots are not free, this
    /// takes its place in line first, then interrupts the readers' blocking reads (as if they timed
    /// out: nothing a read took is lost): the slots a read gives back go to the first in line.
    async fn slots_for_claim(&self, count: usize) -> Option<OwnedSemaphorePermit> {
        let count = u32::try_from(count.max(1)).unwrap_or(u32::MAX);
        let mut stop = self.stop.subscribe();
        let mut acquire = std::pin::pin!(self.permits.clone().acquire_many_owned(count));
        // Polled once: in line now (or served at once, when the slots are free).
        if let std::task::Poll::Ready(permit) = futures::poll!(acquire.as_mut()) {
            return permit.ok();
        }
        let readers = self.readers.lock().expect("readers lock").clone();
        for reader in readers {
            let counters = &self.shared.counters;
            counters.bump(&counters.read_interrupts);
            tokio::select! {
                () = reader.interrupt() => {}
                () = stopped(&mut stop) => return None,
            }
        }
        tokio::select! {
            permit = acquire => permit.ok(),
            () = stopped(&mut stop) => None,
        }
    }

    /// One prefetch slot, or `None` once the subscription stops.
    async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        let mut stop = self.stop.subscribe();
        tokio::select! {
            permit = self.permits.clone().acquire_owned() => permit.ok(),
            () = stopped(&mut stop) => None,
        }
    }

    /// Compares what Redis says about `key` with what this subscription read: entries trimmed before it
    /// read them are counted (once) and logged.
    async fn check_trimming(&self, key: &Arc<str>) -> std::result::Result<(), fred::error::Error> {
        let client = self.shared.client_for(key);
        let Some(position) = stream_position(client, key, self.group.as_deref()).await? else {
            return Ok(());
        };
        let Some(added) = position.added else {
            return Ok(());
        };
        // What the subscription has read (or counted as read at its start), and where it stands.
        let (read, at) = match &self.group {
            Some(_) => match (position.read, position.delivered) {
                (Some(read), Some(at)) => (read, at),
                _ => return Ok(()),
            },
            None => {
                let counted = self.counted.lock().expect("counted lock").get(key).copied();
                let cursor = self.cursors.lock().expect("cursors lock").get(key).copied();
                match (counted, cursor) {
                    (Some((base, read)), Some(at)) => (base + read, at),
                    _ => return Ok(()),
                }
            }
        };
        // Entries gone unread: knowable when the subscription read everything (nothing after it) or
        // stands before the first entry left (everything it read is gone too).
        let gone_unread = if at == position.last {
            added.saturating_sub(read)
        } else if at < position.first {
            added.saturating_sub(position.length).saturating_sub(read)
        } else {
            return Ok(());
        };
        let new = match &self.group {
            // Every member of the group in this router sees the group's losses: counted once per router.
            Some(group) => self.shared.trimmed_for_group(key, group, gone_unread),
            None => {
                let mut reported = self.trim_reported.lock().expect("trim lock");
                let reported = reported.entry(key.clone()).or_insert(0);
                let new = gone_unread.saturating_sub(*reported);
                *reported = (*reported).max(gone_unread);
                new
            }
        };
        if new > 0 {
            self.shared
                .counters
                .lose(&self.shared.counters.trimmed, new);
            tracing::error!(
                stream = key.as_ref(),
                group = self.group.as_deref().unwrap_or("-"),
                lost = new,
                "entries were trimmed from the stream before this subscription read them: they are \
                 lost to it (raise `stream_max_len`, or consume faster)"
            );
        }
        Ok(())
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
    settings: &crate::builder::Settings,
) -> Result<()> {
    let created: std::result::Result<Value, _> = client
        .eval(CREATE_GROUP_SCRIPT, vec![key], vec![group, start])
        .await;
    let error = match created {
        Ok(_) => return Ok(()),
        Err(error) if error.details().contains("BUSYGROUP") => return Ok(()),
        Err(error) => error,
    };
    // Before Redis 7 (no ENTRIESREAD): a plain group; trimming losses are then not counted.
    tracing::debug!(error = %error, "creating the group with an exact read counter failed; creating it plainly");
    match client
        .xgroup_create::<Value, _, _, _>(key, group, start, true)
        .await
    {
        Ok(_) => Ok(()),
        Err(error) if error.details().starts_with("BUSYGROUP") => Ok(()),
        Err(error) => Err(map_error(&error, settings, "creating a consumer group")),
    }
}

/// What [`POSITION_SCRIPT`] says about a stream.
struct Position {
    length: u64,
    /// `None` before Redis 7.
    added: Option<u64>,
    first: EntryId,
    last: EntryId,
    /// The group's last delivered id and read counter, when asked and known.
    delivered: Option<EntryId>,
    read: Option<u64>,
}

async fn stream_position(
    client: &Client,
    key: &str,
    group: Option<&str>,
) -> std::result::Result<Option<Position>, fred::error::Error> {
    let reply: Value = client
        .eval(POSITION_SCRIPT, vec![key], vec![group.unwrap_or("")])
        .await?;
    let items = reply.into_array();
    if items.len() < 6 {
        return Ok(None);
    }
    let id = |value: &Value| value.as_str().and_then(|text| EntryId::parse(&text));
    let number = |value: &Value| value.as_u64();
    Ok(Some(Position {
        length: number(&items[0]).unwrap_or(0),
        added: number(&items[1]),
        first: id(&items[2]).unwrap_or(EntryId(0, 0)),
        last: id(&items[3]).unwrap_or(EntryId(0, 0)),
        delivered: id(&items[4]),
        read: number(&items[5]),
    }))
}

/// The ids pending for `consumer` (up to `count`), from `from` (`-`, an id, or `(id` for those after it).
async fn pending_of(
    client: &Client,
    key: &str,
    group: &str,
    consumer: &str,
    from: &str,
    count: u64,
) -> std::result::Result<Vec<EntryId>, fred::error::Error> {
    let pending: Value = client
        .xpending(key, group, (from, "+", count, consumer))
        .await?;
    Ok(pending
        .into_array()
        .into_iter()
        .filter_map(|item| {
            let id = item.into_array().into_iter().next()?.as_string()?;
            EntryId::parse(&id)
        })
        .collect())
}

/// Runs [`CLAIM_OWNED_SCRIPT`]: the ids among `ids` this consumer still owns, taken (renewed, marked
/// idle, or given a delivery count), and, for a renewal, those it owns whose entry was trimmed (kept).
async fn claim_owned(
    client: &Client,
    key: &str,
    group: &str,
    consumer: &str,
    idle_ms: Option<&str>,
    retry_count: Option<&str>,
    ids: Vec<String>,
) -> std::result::Result<(Vec<String>, Vec<String>), fred::error::Error> {
    let mut args: Vec<String> = Vec::with_capacity(4 + ids.len());
    args.push(group.to_string());
    args.push(consumer.to_string());
    args.push(idle_ms.unwrap_or("").to_string());
    args.push(retry_count.unwrap_or("").to_string());
    args.extend(ids);
    let reply: Value = client.eval(CLAIM_OWNED_SCRIPT, vec![key], args).await?;
    let mut parts = reply.into_array().into_iter();
    let mut ids = || -> Vec<String> {
        parts
            .next()
            .map(Value::into_array)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|id| id.as_string())
            .collect()
    };
    let taken = ids();
    Ok((taken, ids()))
}

/// The entries of an `XREAD`/`XREADGROUP` reply (an array of `[stream, entries]`, or a map in RESP3)
/// from the streams `keys` (the streams read; another stream's are left out), each with its stream's
/// key from `keys`, in the order of the reply: taken apart once, when the reply comes, for the read to
/// hold its entries and for their batch to be handled.
fn read_entries(reply: Value, keys: &[Arc<str>]) -> Vec<ReadEntry> {
    let mut out = Vec::new();
    let mut add = |key: &[u8], entries: Value| {
        if let Some(key) = keys.iter().find(|k| k.as_bytes() == key) {
            out.extend(
                parse_entries(entries)
                    .into_iter()
                    .map(|(id, frame)| (key.clone(), id, frame)),
            );
        }
    };
    match reply {
        Value::Array(streams) => {
            for stream in streams {
                let mut parts = stream.into_array().into_iter();
                if let (Some(key), Some(entries)) = (parts.next(), parts.next())
                    && let Some(key) = key.as_bytes()
                {
                    add(key, entries);
                }
            }
        }
        Value::Map(map) => {
            for (key, entries) in map.inner() {
                add(key.as_bytes(), entries);
            }
        }
        _ => {}
    }
    out
}

/// What a read holds of its entries: those whose id is `<ms>-<seq>` (another is skipped when handled).
fn held_of(entries: &[ReadEntry]) -> impl Iterator<Item = Held> + '_ {
    entries
        .iter()
        .filter_map(|(key, id, _)| Some((key.clone(), EntryId::parse(id)?)))
}

/// Parses `[[id, [field, value, ...]], ...]`.
pub(crate) fn parse_entries(entries: Value) -> Vec<Entry> {
    entries
        .into_array()
        .into_iter()
        .filter_map(|entry| {
            let mut parts = entry.into_array().into_iter();
            // A view into the reply, as the frame is, not a copy.
            let id = parts.next()?.into_bytes_str()?;
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

/// One entry of a stream read: the stream (one of those read), the id, the frame (see [`Entry`]).
type ReadEntry = (Arc<str>, Str, Option<Bytes>);

/// The entries of a stream read, in the order of its reply.
type ReadReply = std::result::Result<Vec<ReadEntry>, fred::error::Error>;

/// A read written to Redis ahead, while the entries of the read before it are handled.
struct ReadAhead {
    read: std::pin::Pin<Box<dyn Future<Output = ReadReply> + Send>>,
    permits: OwnedSemaphorePermit,
    keys: Vec<Arc<str>>,
}

impl StreamSubscription {
    /// Up to `read_batch` prefetch slots: at least `refill`, waiting in line for them, or `None` once
    /// the subscription stops.
    async fn slots_for_read(&self) -> Option<OwnedSemaphorePermit> {
        let mut permits = self.acquire_slots(self.refill).await?;
        self.top_up(&mut permits);
        Some(permits)
    }

    /// Up to `read_batch` prefetch slots when at least `refill` are free now, without waiting.
    fn free_slots_for_read(&self) -> Option<OwnedSemaphorePermit> {
        let count = u32::try_from(self.refill.max(1)).unwrap_or(u32::MAX);
        let mut permits = self.permits.clone().try_acquire_many_owned(count).ok()?;
        self.top_up(&mut permits);
        Some(permits)
    }

    /// Adds the free slots to `permits`, up to `read_batch` in all.
    fn top_up(&self, permits: &mut OwnedSemaphorePermit) {
        let more = self.permits.available_permits().min(
            self.settings()
                .read_batch
                .saturating_sub(permits.num_permits()),
        );
        if more > 0
            && let Ok(extra) = self.permits.clone().try_acquire_many_owned(more as u32)
        {
            permits.merge(extra);
        }
    }

    /// Writes a blocking read of `keys` for as many entries as `permits` holds. Fan-out reads go on
    /// from the cursors, or from `read_up_to` for the streams whose entries are still being handled.
    /// The command is handed to fred when the future is first polled.
    fn start_read(
        self: &Arc<Self>,
        reader: &Reader,
        options: &Options,
        keys: &[Arc<str>],
        permits: &OwnedSemaphorePermit,
        read_up_to: &HashMap<Arc<str>, EntryId>,
    ) -> std::pin::Pin<Box<dyn Future<Output = ReadReply> + Send>> {
        let count = permits.num_permits() as u64;
        let block_ms = self.settings().read_block.as_millis().max(1) as u64;
        let client = reader.client.with_options(options);
        let names: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        match &self.group {
            Some(group) => {
                let (group, consumer) = (group.clone(), self.consumer.clone());
                let (subscription, keys) = (self.clone(), keys.to_vec());
                Box::pin(async move {
                    let ids = vec![">"; names.len()];
                    let reply: std::result::Result<Value, _> = client
                        .xreadgroup(
                            group.as_str(),
                            consumer.as_str(),
                            Some(count),
                            Some(block_ms),
                            false,
                            names,
                            ids,
                        )
                        .await;
                    // Redis made every entry of the reply pending for this consumer when it answered:
                    // all are held from now on (their leases renewed), so that no other member claims
                    // one while the entries before it are handled (a command made for one may be slow),
                    // while it waits for a slot, or while the batch before this read-ahead is handled.
                    let entries = read_entries(reply?, &keys);
                    subscription.hold_read(&entries);
                    Ok(entries)
                })
            }
            None => {
                let ids: Vec<String> = {
                    let cursors = self.cursors.lock().expect("cursors lock");
                    keys.iter()
                        .map(|k| {
                            read_up_to
                                .get(k)
                                .or_else(|| cursors.get(k))
                                .copied()
                                .unwrap_or(EntryId(0, 0))
                                .to_string()
                        })
                        .collect()
                };
                let keys = keys.to_vec();
                Box::pin(async move {
                    let reply: Value = client
                        .xread(Some(count), Some(block_ms), names, ids)
                        .await?;
                    Ok(read_entries(reply, &keys))
                })
            }
        }
    }
}

impl StreamSubscription {
    /// The reply of `read`. When the subscription stops meanwhile, the blocking read is interrupted
    /// (as if it timed out, so no entry it took is lost) until it ends: the `CLIENT UNBLOCK` sent by
    /// [`StreamSubscription::stop_now`] misses a read that reaches Redis after it, which would then
    /// hold closing for the whole `read_block`.
    async fn finish_read(
        &self,
        reader: &Reader,
        mut read: std::pin::Pin<Box<dyn Future<Output = ReadReply> + Send>>,
    ) -> ReadReply {
        let mut stop = self.stop.subscribe();
        tokio::select! {
            reply = read.as_mut() => return reply,
            () = stopped(&mut stop) => {}
        }
        loop {
            tokio::select! {
                reply = read.as_mut() => return reply,
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            reader.interrupt().await;
        }
    }
}

/// A task of a stream subscription counted in one of its counters (`reading`, `running`): counted
/// out, and [`StreamSubscription::finish`] woken, when the task ends or is dropped unfinished (its
/// Tokio runtime ended).
struct CountedTask(
    Arc<StreamSubscription>,
    fn(&StreamSubscription) -> &AtomicU64,
);

impl Drop for CountedTask {
    fn drop(&mut self) {
        (self.1)(&self.0).fetch_sub(1, Ordering::AcqRel);
        self.0.done.notify_waiters();
    }
}

/// What health says of a subscription whose reader gave up reconnecting, with the fix.
pub(crate) fn reader_gave_up_error(settings: &crate::builder::Settings) -> String {
    let attempts = match settings.max_reconnect_attempts {
        Some(0) => "max_reconnect_attempts(Some(0)) never reconnects".to_string(),
        Some(attempts) => format!(
            "after {} (max_reconnect_attempts)",
            crate::connection::attempts_in_a_row(attempts)
        ),
        None => "a configuration error, in the logs".to_string(),
    };
    format!(
        "a stream subscription's reading connection to Redis at {} gave up reconnecting ({attempts}); \
         the subscription ended: subscribe again, or raise max_reconnect_attempts (None: never give up)",
        redact(&settings.url)
    )
}

/// Reads new entries until the subscription stops.
///
/// When a read brings entries and enough prefetch slots are free, the next read is written before they
/// are handled: Redis then holds a blocked read for the next entry while this one is delivered (one
/// round trip less in the latency of a lone message, and Redis fills the next batch meanwhile).
async fn read_loop(subscription: Arc<StreamSubscription>, reader: Arc<Reader>) {
    let settings = &subscription.shared.settings;
    let options = Options {
        // Past this without an answer the connection is taken for dead and made again (see
        // `Reader::replace_silent_connection`), by the rule fred applies to the other connections.
        timeout: Some(settings.read_block + unresponsive_limit(settings.command_timeout)),
        // A read cut off by a lost connection fails instead of being written again by fred: the entries
        // Redis handed out in the lost reply are recovered first, in order, before anything newer.
        max_attempts: Some(1),
        ..Options::default()
    };
    let mut recover = true;
    let mut failures = 0u32;
    let mut ahead: Option<ReadAhead> = None;
    loop {
        let (result, mut permits, keys) = match ahead.take() {
            // Even when closing: a read left blocked in Redis would take entries published later for a
            // consumer that is gone (they would wait `claim_idle`). What it brings is given back below.
            Some(ReadAhead {
                read,
                permits,
                keys,
            }) => (subscription.finish_read(&reader, read).await, permits, keys),
            None if subscription.is_closed() => break,
            None => {
                let keys = reader.keys.lock().expect("reader keys lock").clone();
                if keys.is_empty() {
                    // A wildcard subscription before any class stream exists: discovery adds keys and
                    // wakes us.
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
                        Ok(()) => {
                            recover = false;
                            // Redis answers again: the failure is over, even if the prefetch that
                            // recovery filled holds the next read back for a while.
                            reader.succeeded();
                        }
                        Err(error) => {
                            backoff(&subscription, &reader, &mut failures, &error).await;
                            continue;
                        }
                    }
                }
                let Some(permits) = subscription.slots_for_read().await else {
                    break;
                };
                let read =
                    subscription.start_read(&reader, &options, &keys, &permits, &HashMap::new());
                (subscription.finish_read(&reader, read).await, permits, keys)
            }
        };
        match result {
            Ok(batch) => {
                failures = 0;
                reader.succeeded();
                // COUNT applies per stream: a read over several streams may return more entries than
                // slots (the read held them all when its reply came).
                let overflow = batch.len() > permits.num_permits();
                // The slots this read did not fill are free for the next one.
                let unused = permits.num_permits().saturating_sub(batch.len());
                if unused > 0 {
                    drop(permits.split(unused));
                }
                // The next read goes out now, before these entries are handled, when it needs no wait:
                // it brought entries (not a quiet stream's timeout), every entry has its slot, enough
                // slots are free, and no reconnect asks for pending entries to be recovered first.
                if !batch.is_empty()
                    && !overflow
                    && !subscription.is_closed()
                    && !reader.rescan.load(Ordering::Acquire)
                {
                    let next_keys = reader.keys.lock().expect("reader keys lock").clone();
                    if !next_keys.is_empty()
                        && let Some(next_permits) = subscription.free_slots_for_read()
                    {
                        let mut read_up_to = HashMap::new();
                        if !subscription.is_group() {
                            for (key, id, _) in &batch {
                                if let Some(id) = EntryId::parse(id) {
                                    read_up_to.insert(key.clone(), id);
                                }
                            }
                        }
                        let mut read = subscription.start_read(
                            &reader,
                            &options,
                            &next_keys,
                            &next_permits,
                            &read_up_to,
                        );
                        // Polled once: fred writes the command now.
                        let read = match futures::poll!(read.as_mut()) {
                            std::task::Poll::Ready(reply) => {
                                Box::pin(std::future::ready(reply)) as std::pin::Pin<Box<_>>
                            }
                            std::task::Poll::Pending => read,
                        };
                        ahead = Some(ReadAhead {
                            read,
                            permits: next_permits,
                            keys: next_keys,
                        });
                    }
                }
                let delivered_now = batch.len();
                let handling = async {
                    let mut fresh = false;
                    let mut entries = batch.into_iter();
                    let mut stopped_at = None;
                    // Handed over together at the end of the batch (one lock, one wake), as they
                    // come while the subscriber waits for them, and before anything that waits:
                    // nothing made ready waits with the read loop (see `handle_entry`).
                    let mut ready = Ready::default();
                    for (key, id, frame) in entries.by_ref() {
                        let permit = match permits.split(1) {
                            Some(permit) => permit,
                            None => {
                                // Settling what is ready frees the slots waited for.
                                subscription.send_ready(&mut ready).await;
                                match subscription.acquire().await {
                                    Some(permit) => permit,
                                    None => {
                                        stopped_at = Some((key, id));
                                        break;
                                    }
                                }
                            }
                        };
                        subscription
                            .handle_entry(
                                &key, id, frame, None, false, permit, &mut fresh, &mut ready,
                            )
                            .await;
                        if subscription.handoff.subscriber_waits() {
                            subscription.send_ready(&mut ready).await;
                        }
                    }
                    subscription.send_ready(&mut ready).await;
                    // Closing: this entry and the rest waited for a slot, unseen by any handler.
                    let rest = stopped_at
                        .into_iter()
                        .chain(entries.map(|(key, id, _)| (key, id)));
                    subscription.release_unread(rest).await;
                };
                match ahead.as_mut() {
                    // The read-ahead is polled while this batch is handled, so that its reply, should
                    // it come first (a command made for this batch is slow), holds its entries at once.
                    Some(next) if subscription.is_group() => {
                        let mut handling = std::pin::pin!(handling);
                        tokio::select! {
                            biased;
                            () = &mut handling => {}
                            reply = next.read.as_mut() => {
                                next.read = Box::pin(std::future::ready(reply));
                                handling.await;
                            }
                        }
                    }
                    _ => handling.await,
                }
                // With few entries per read (a quiet stream), let the subscriber take what was just
                // handed to it before going on. Busy, going on at once keeps the batches large.
                if delivered_now <= 4 {
                    tokio::task::yield_now().await;
                }
            }
            Err(error) if is_nogroup(&error) && !subscription.is_closed() => {
                // The stream or its group was deleted (or Redis restarted empty): create them again, from
                // the stream's start so that nothing in it is skipped.
                tracing::error!(error = %error, "a consumer group is missing (deleted, or Redis restarted empty); creating it again from the start of its stream");
                let mut recreated = Ok(());
                if let Some(group) = &subscription.group {
                    for key in &keys {
                        if let Err(error) =
                            create_group(subscription.shared.pool.next(), key, group, "0", settings)
                                .await
                        {
                            recreated = Err(error);
                        }
                    }
                }
                match recreated {
                    Ok(()) => failures = 0,
                    Err(error) => backoff(&subscription, &reader, &mut failures, &error).await,
                }
            }
            Err(error) => {
                if subscription.is_closed() {
                    break;
                }
                recover = true;
                if *error.kind() == fred::error::ErrorKind::Timeout {
                    if reader.rescan.load(Ordering::Acquire) {
                        // The reader reconnected since the read was written: a read that waited out
                        // an outage in fred's queue is answered on the new connection `read_block`
                        // after it was made, which may be past its limit; or the new connection went
                        // silent too. A `PING` tells the two apart.
                        reader
                            .replace_if_silent(&subscription, options.timeout.unwrap_or_default());
                    } else {
                        reader.replace_silent_connection();
                    }
                }
                let error = map_error(&error, settings, "reading a stream");
                backoff(&subscription, &reader, &mut failures, &error).await;
            }
        }
    }
}

async fn backoff(
    subscription: &StreamSubscription,
    reader: &Reader,
    failures: &mut u32,
    error: &Error,
) {
    *failures += 1;
    reader.failed(error);
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

/// Sends the acknowledgements that came together, one `XACK` per stream, until the subscription is
/// closed and nothing waits any more.
async fn send_acks(subscription: Arc<StreamSubscription>) {
    let Some(group) = subscription.group.clone() else {
        return;
    };
    loop {
        let woken = subscription.acks.wake.notified();
        let batch = {
            let mut queue = subscription.acks.queue.lock().expect("acks lock");
            let batch = std::mem::take(&mut queue.waiting);
            if batch.is_empty() && subscription.released.load(Ordering::Acquire) {
                queue.closed = true;
                return;
            }
            batch
        };
        if batch.is_empty() {
            woken.await;
            continue;
        }
        let gate = subscription.acks.gate.read().await;
        let released = subscription.released.load(Ordering::Acquire);
        let sends = by_stream(batch).into_iter().map(|(key, waiting)| {
            let subscription = &subscription;
            let group = &group;
            async move {
                let result = if released {
                    Err(Error::Backend {
                        backend: "redis",
                        message:
                            "the subscription closed and gave its unsettled entries back to the \
                                  group before this acknowledgement: the entry is delivered again"
                                .into(),
                    })
                } else {
                    let ids = EntryId::texts(waiting.iter().map(|(id, _, _)| *id));
                    subscription
                        .shared
                        .client_for(&key)
                        .xack::<Value, _, _, _>(key.as_ref(), group.as_str(), ids)
                        .await
                        .map(|removed| removed.as_u64().unwrap_or(0))
                        .map_err(|e| map_error(&e, subscription.settings(), "acknowledging (XACK)"))
                };
                // Whether it worked or not, the entries are no longer their deliveries': when XACK
                // failed, they stay pending without renewal and come again after claim_idle. Unheld
                // and their slots given back together, once per batch.
                let mut slots: Option<OwnedSemaphorePermit> = None;
                if result.is_err() && !released {
                    // Acknowledged by their handlers: when they come back, they are acknowledged.
                    let forgotten = {
                        let mut unacked = subscription.unacked.lock().expect("unacked lock");
                        remember_unacked(
                            &mut unacked,
                            waiting.iter().map(|(id, _, _)| (key.clone(), *id)),
                        )
                    };
                    if forgotten > 0
                        && let Some(suppressed) = subscription.unacked_log.allow()
                    {
                        tracing::warn!(
                            stream = key.as_ref(),
                            forgotten,
                            suppressed,
                            cap = UNACKED_CAP,
                            "acknowledgements keep failing without a reconnect (does the ACL user \
                             lack XACK?); the oldest entries whose XACK failed are forgotten: if \
                             they come back, they are handled again"
                        );
                    }
                }
                subscription.unhold_all(&key, waiting.iter().map(|(id, _, _)| *id));
                if let Ok(removed) = result {
                    subscription.count_acks(&key, group, waiting.len() as u64, removed);
                }
                let result = result.map(drop);
                for (_, done, slot) in waiting {
                    match (&mut slots, slot) {
                        (Some(slots), Some(slot)) => slots.merge(slot),
                        (none @ None, slot) => *none = slot,
                        (Some(_), None) => {}
                    }
                    let _ = done.send(match &result {
                        Ok(()) => Ok(()),
                        Err(error) => Err(Error::Backend {
                            backend: "redis",
                            message: error.to_string(),
                        }),
                    });
                }
                drop(slots);
            }
        });
        futures::future::join_all(sends).await;
        drop(gate);
    }
}

/// Acknowledgements grouped by stream, each group in the order they came.
fn by_stream(batch: Vec<(Arc<str>, AckWaiter)>) -> Vec<(Arc<str>, Vec<AckWaiter>)> {
    let mut groups: Vec<(Arc<str>, Vec<AckWaiter>)> = Vec::new();
    for (key, waiter) in batch {
        match groups.iter_mut().find(|(known, _)| *known == key) {
            Some((_, waiting)) => waiting.push(waiter),
            None => groups.push((key, vec![waiter])),
        }
    }
    groups
}

/// The most entries whose `XACK` failed a subscription remembers (see `StreamSubscription::unacked`).
/// A cut loses the acknowledgements of the entries held then, a few prefetches at most; the set is
/// emptied of them when they are taken back. It only grows past that when acknowledgements keep failing
/// without a reconnect (an ACL user that may not `XACK`), which must not cost memory without bound.
const UNACKED_CAP: usize = 16_384;

/// Adds `failed` to `unacked` and, past [`UNACKED_CAP`], forgets the oldest entries (lowest ids, of any
/// stream). Returns how many were forgotten: should they be taken back after a reconnect, they count one
/// delivery fewer than their handlers had (they come again one attempt lower than their next one).
fn remember_unacked(
    unacked: &mut HashSet<Held, FastState>,
    failed: impl Iterator<Item = Held>,
) -> usize {
    unacked.extend(failed);
    let excess = unacked.len().saturating_sub(UNACKED_CAP);
    if excess == 0 {
        return 0;
    }
    let mut oldest: Vec<Held> = unacked.iter().cloned().collect();
    oldest.select_nth_unstable_by_key(excess - 1, |(_, id)| *id);
    for held in &oldest[..excess] {
        unacked.remove(held);
    }
    excess
}

/// Keeps the entries this consumer holds from being claimed by others: resets their idle time, for those
/// it still owns.
async fn renew_leases(subscription: Arc<StreamSubscription>) {
    let Some(group) = subscription.group.clone() else {
        return;
    };
    let every = subscription.shared.settings.claim_idle / 3;
    let mut stop = subscription.stop.subscribe();
    // A fixed schedule: waking up to notice the end must not postpone the next renewal.
    let mut due = tokio::time::Instant::now() + every;
    loop {
        let settled = subscription.settled.notified();
        if subscription.released.load(Ordering::Acquire) {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep_until(due) => {}
            () = stopped(&mut stop), if !subscription.is_closed() => continue,
            () = settled, if subscription.is_closed() => continue,
        }
        if subscription.released.load(Ordering::Acquire) {
            return;
        }
        due = tokio::time::Instant::now() + every;
        let mut by_key: HashMap<Arc<str>, Vec<EntryId>> = HashMap::new();
        for (key, id) in subscription.held.lock().expect("held lock").iter() {
            by_key.entry(key.clone()).or_default().push(*id);
        }
        for (key, ids) in by_key {
            let asked: Vec<String> = ids.iter().map(ToString::to_string).collect();
            let result = claim_owned(
                subscription.shared.client_for(&key),
                &key,
                &group,
                &subscription.consumer,
                None,
                None,
                asked.clone(),
            )
            .await;
            if result.is_ok() {
                let counters = &subscription.shared.counters;
                counters.bump(&counters.lease_renewals);
            }
            match result {
                // Kept: trimmed while held. The handler has the frame and settles it; the entry stays
                // held (and the consumer's idle time was reset, so nobody counts it as lost).
                Ok((renewed, kept)) if renewed.len() + kept.len() < asked.len() => {
                    let renewed: HashSet<String> = renewed.into_iter().chain(kept).collect();
                    for (id, text) in ids.iter().zip(&asked) {
                        if renewed.contains(text) {
                            continue;
                        }
                        // Acknowledged meanwhile, or claimed by another member after this one could not
                        // renew it for claim_idle (cut off): no longer this consumer's to renew.
                        let still_held = subscription
                            .held
                            .lock()
                            .expect("held lock")
                            .contains(&(key.clone(), *id));
                        if still_held {
                            tracing::warn!(
                                stream = key.as_ref(),
                                entry = text,
                                "an entry this consumer holds is no longer its own (another member claimed \
                                 it after this one was out of reach for claim_idle); it may be handled twice"
                            );
                            subscription.unhold(&key, *id);
                        }
                    }
                }
                Ok(_) => {}
                Err(error) => tracing::debug!(error = %error, "could not renew held entries"),
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
        // Counted only when every stream was looked at: a round that failed (Redis unreachable, a
        // command refused) did not do the work an operator (or a test) counts on it for.
        let mut failed = false;
        for key in subscription.known_keys() {
            if let Err(error) = reclaim_key(&subscription, &group, &key, idle_ms).await {
                failed = true;
                tracing::debug!(error = %error, stream = key.as_ref(), "reclaiming pending entries failed; trying again later");
            }
        }
        if !failed {
            let counters = &subscription.shared.counters;
            counters.bump(&counters.reclaim_rounds);
        }
    }
}

async fn reclaim_key(
    subscription: &Arc<StreamSubscription>,
    group: &str,
    key: &Arc<str>,
    idle_ms: u64,
) -> Result<()> {
    // Entries no one may take fill a page without being taken: this consumer's own held ones, and
    // trimmed ones a live member still holds. The next pages are looked at until something is taken,
    // so that a dead consumer's later entries are not left behind them (bounded per round).
    let previous = subscription
        .unclaimable
        .lock()
        .expect("unclaimable lock")
        .remove(key)
        .unwrap_or_default();
    let mut unclaimable = Unclaimable::default();
    let mut from = "-".to_string();
    let mut result = Ok(());
    for _ in 0..RECLAIM_PAGES {
        let page = match reclaim_page(
            subscription,
            group,
            key,
            idle_ms,
            &from,
            &previous,
            &mut unclaimable,
        )
        .await
        {
            Ok(page) => page,
            Err(error) => {
                result = Err(error);
                break;
            }
        };
        match page.last {
            Some(last) if !page.progressed && page.full => from = format!("({last}"),
            _ => break,
        }
    }
    if !unclaimable.is_empty() {
        subscription
            .unclaimable
            .lock()
            .expect("unclaimable lock")
            .insert(key.clone(), unclaimable);
    }
    result
}

/// Idle entries a reclaim round could not claim, with when it last tried (see
/// [`StreamSubscription::unclaimable`]).
type Unclaimable = HashMap<EntryId, tokio::time::Instant, FastState>;

/// How long after a reclaim round could not claim an entry (a live member holds it, trimmed) later
/// rounds that find it interrupt no blocking read for it: `max(claim_idle, read_block)`. Its owner
/// cannot be judged gone sooner than `claim_idle`, and until then only its trimmed count waits (the
/// entry is gone): interrupting the read every round (every `claim_idle / 2`, at most 1 s) would cost a
/// `CLIENT UNBLOCK` and a read per round for as long as that member holds it. Rounds that find free
/// slots try it anyway.
fn unclaimable_retry(settings: &crate::builder::Settings) -> Duration {
    settings.claim_idle.max(settings.read_block)
}

/// How many pages of idle pending entries one reclaim round looks at, at most, per stream.
const RECLAIM_PAGES: usize = 8;

/// What one page of a reclaim round came to.
struct ReclaimPage {
    /// The last id listed.
    last: Option<String>,
    /// As many were listed as asked: there may be more.
    full: bool,
    /// Something was taken or found trimmed (or the subscription is closing): no more pages now.
    progressed: bool,
}

/// Lists up to `read_batch` entries idle for at least `idle_ms`, from `from`, and claims those it may.
/// `previous`: the entries rounds before could not claim (see [`StreamSubscription::unclaimable`]);
/// those this one cannot claim, or leaves untried, are added to `unclaimable`.
async fn reclaim_page(
    subscription: &Arc<StreamSubscription>,
    group: &str,
    key: &Arc<str>,
    idle_ms: u64,
    from: &str,
    previous: &Unclaimable,
    unclaimable: &mut Unclaimable,
) -> Result<ReclaimPage> {
    let client = subscription.shared.client_for(key);
    let settings = subscription.settings();
    let pending: Value = client
        .xpending(
            key.as_ref(),
            group,
            (idle_ms, from, "+", settings.read_batch as u64),
        )
        .await
        .map_err(|e| map_error(&e, settings, "listing pending entries"))?;
    let pending = pending.into_array();
    let mut page = ReclaimPage {
        last: pending
            .last()
            .and_then(|item| item.clone().into_array().into_iter().next())
            .and_then(|id| id.as_string()),
        full: pending.len() >= settings.read_batch.max(1),
        progressed: false,
    };
    let mut counts: HashMap<String, u64> = HashMap::new();
    for item in pending {
        let mut parts = item.into_array().into_iter();
        let (Some(id), Some(consumer), _, Some(count)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (Some(id), Some(consumer)) = (id.as_string(), consumer.as_string()) else {
            continue;
        };
        let Some(entry_id) = EntryId::parse(&id) else {
            continue;
        };
        if consumer == subscription.consumer
            && subscription
                .held
                .lock()
                .expect("held lock")
                .contains(&(key.clone(), entry_id))
        {
            continue;
        }
        counts.insert(id, count.as_u64().unwrap_or(1));
    }
    if counts.is_empty() {
        return Ok(page);
    }
    // Wait for prefetch slots in line with the reader (the semaphore is fair): taking only free slots
    // would starve reclaiming while new entries keep the prefetch full. As many as the reader waits
    // for (`refill`) at most, then whatever else is free.
    let wanted = counts.len().min(subscription.refill);
    // Entries a round before could not claim (a live member holds them, trimmed) are tried only with
    // free slots, until `unclaimable_retry` passed: see there.
    let now = tokio::time::Instant::now();
    let retry = unclaimable_retry(settings);
    let known = |id: &EntryId| {
        previous
            .get(id)
            .is_some_and(|at| now.saturating_duration_since(*at) < retry)
    };
    let mut permits = if counts
        .keys()
        .all(|id| EntryId::parse(id).is_some_and(|id| known(&id)))
    {
        let Ok(permits) = subscription.permits.clone().try_acquire_owned() else {
            for id in counts.keys().filter_map(|id| EntryId::parse(id)) {
                if let Some(at) = previous.get(&id) {
                    unclaimable.insert(id, *at);
                }
            }
            return Ok(page);
        };
        permits
    } else {
        let Some(permits) = subscription.slots_for_claim(wanted).await else {
            page.progressed = true;
            return Ok(page);
        };
        permits
    };
    let more = counts
        .len()
        .saturating_sub(permits.num_permits())
        .min(subscription.permits.available_permits());
    if more > 0
        && let Ok(extra) = subscription
            .permits
            .clone()
            .try_acquire_many_owned(u32::try_from(more).unwrap_or(u32::MAX))
    {
        permits.merge(extra);
    }
    let mut ids: Vec<String> = counts.keys().cloned().collect();
    ids.sort_by_key(|id| EntryId::parse(id));
    ids.truncate(permits.num_permits());
    let asked: Vec<EntryId> = ids.iter().filter_map(|id| EntryId::parse(id)).collect();
    let mut args: Vec<String> = vec![
        group.to_string(),
        subscription.consumer.clone(),
        idle_ms.to_string(),
    ];
    args.extend(ids);
    let reply: Value = client
        .eval(RECLAIM_SCRIPT, vec![key.as_ref()], args)
        .await
        .map_err(|e| map_error(&e, settings, "claiming pending entries"))?;
    let mut parts = reply.into_array().into_iter();
    let claimed = parts.next().unwrap_or(Value::Null);
    let mut trimmed = parts.next().unwrap_or(Value::Null).into_array();
    // Asked for, and neither claimed nor trimmed: see `StreamSubscription::unclaimable`. Those left
    // unasked (too few slots) keep when they were last tried.
    for id in counts.keys().filter_map(|id| EntryId::parse(id)) {
        if let Some(at) = previous.get(&id)
            && !asked.contains(&id)
        {
            unclaimable.insert(id, *at);
        }
    }
    let mut left: HashSet<EntryId, FastState> = asked.into_iter().collect();
    for id in &trimmed {
        if let Some(id) = id.as_string().as_deref().and_then(EntryId::parse) {
            left.remove(&id);
        }
    }
    {
        // Trimmed, but acknowledged by this consumer's handlers (their `XACK` was lost): handled, not
        // lost. The script acknowledged them: counted as late acknowledgements.
        let mut unacked = subscription.unacked.lock().expect("unacked lock");
        let before = trimmed.len();
        if !unacked.is_empty() {
            trimmed.retain(|id| {
                let Some(id) = id.as_string().as_deref().and_then(EntryId::parse) else {
                    return true;
                };
                !unacked.remove(&(key.clone(), id))
            });
        }
        let late = (before - trimmed.len()) as u64;
        drop(unacked);
        subscription.count_late_acks(key, late);
    }
    if !trimmed.is_empty() {
        subscription
            .shared
            .counters
            .lose(&subscription.shared.counters.trimmed, trimmed.len() as u64);
        tracing::warn!(
            stream = key.as_ref(),
            entries = trimmed.len(),
            "entries left pending by a stopped consumer were trimmed before anyone handled them (raise \
             `stream_max_len`, or consume faster)"
        );
    }
    let mut entries = parse_entries(claimed);
    for (id, _) in &entries {
        if let Some(id) = EntryId::parse(id) {
            left.remove(&id);
        }
    }
    unclaimable.extend(left.into_iter().map(|id| (id, now)));
    page.progressed = !trimmed.is_empty() || !entries.is_empty();
    entries.sort_by_key(|(id, _)| EntryId::parse(id));
    // Held at once: none is left unrenewed while one before it is handled. One held already was
    // claimed here in the round trip between recovery's listing of this consumer's pending entries
    // (after a reconnect) and its script: recovery delivers it. It is left to recovery, still held
    // (unholding it would stop renewing the lease recovery's handler relies on). The delivery this
    // claim counted in Redis stays counted: recovery's attempt number includes it.
    let newly = subscription.hold_ids(key, entries.iter().map(|(id, _)| &**id));
    entries.retain(|(id, _)| {
        let new = EntryId::parse(id).is_some_and(|id| newly.contains(&id));
        if !new {
            tracing::debug!(
                stream = key.as_ref(),
                entry = &**id,
                "claimed an entry that recovery takes back at the same time; left to recovery"
            );
        }
        new
    });
    // Entries this consumer's handlers acknowledged whose `XACK` was lost: acknowledged, not handled
    // again (see `ack_late`).
    let mut handled: HashSet<EntryId, FastState> = HashSet::default();
    {
        let mut unacked = subscription.unacked.lock().expect("unacked lock");
        if !unacked.is_empty() {
            for (id, _) in &entries {
                if let Some(id) = EntryId::parse(id)
                    && unacked.remove(&(key.clone(), id))
                {
                    handled.insert(id);
                }
            }
        }
    }
    let mut fresh = false;
    let mut entries = entries.into_iter();
    while let Some((id, frame)) = entries.next() {
        let Some(permit) = permits.split(1) else {
            // More came back than slots were taken (not expected: as many were asked): left pending.
            for (id, _) in std::iter::once((id, frame)).chain(entries) {
                subscription.unhold_text(key, &id);
            }
            break;
        };
        if let Some(entry_id) = EntryId::parse(&id).filter(|id| handled.contains(id)) {
            drop(permit);
            subscription.ack_late(key, entry_id).await;
            continue;
        }
        let deliveries = counts.get(&*id).copied().unwrap_or(1) + 1;
        subscription
            .shared
            .counters
            .bump(&subscription.shared.counters.reclaimed);
        tracing::info!(
            stream = key.as_ref(),
            entry = &*id,
            deliveries,
            "claimed an entry another consumer left pending"
        );
        let mut ready = Ready::default();
        subscription
            .handle_entry(
                key,
                id,
                frame,
                Some(deliveries),
                true,
                permit,
                &mut fresh,
                &mut ready,
            )
            .await;
        subscription.send_ready(&mut ready).await;
    }
    Ok(page)
}

/// Looks for entries trimmed before this subscription read them, every `discovery_interval`.
async fn watch_trimming(subscription: Arc<StreamSubscription>) {
    let every = subscription.shared.settings.discovery_interval;
    let mut stop = subscription.stop.subscribe();
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stopped(&mut stop) => return,
        }
        for key in subscription.known_keys() {
            if let Err(error) = subscription.check_trimming(&key).await {
                tracing::debug!(error = %error, stream = key.as_ref(), "could not check the stream for trimmed entries; trying again later");
            }
        }
    }
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
            if let Err(error) = subscription.prepare_key(&key, Start::Beginning).await {
                tracing::debug!(error = %error, "could not start reading a new stream; trying again later");
                continue;
            }
            tracing::debug!(stream = key.as_ref(), "found the stream of a new class");
            if subscription.shared.config.server.is_clustered() {
                // Known only once its reader runs: a failure is tried again at the next round.
                if let Err(error) = subscription.add_reader(vec![key]).await {
                    tracing::warn!(error = %error, "could not start a reader for a new stream; trying again later");
                }
            } else {
                let reader = subscription
                    .readers
                    .lock()
                    .expect("readers lock")
                    .first()
                    .cloned();
                if let Some(reader) = reader {
                    subscription
                        .known
                        .lock()
                        .expect("known streams lock")
                        .insert(key.clone());
                    reader.keys.lock().expect("reader keys lock").push(key);
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        reader
                            .client
                            .unblock_self(Some(fred::types::ClientUnblockFlag::Timeout)),
                    )
                    .await;
                }
            }
        }
    }
}

/// Whether a handler may have seen an entry given back: if it did, the delivery counts as an attempt.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Handled {
    /// Handed to the subscriber, which may have started on it.
    Maybe,
    /// Never handed to a handler (it waited in a buffer): the read that took it does not count.
    Never,
}

/// Settles one stream entry.
struct StreamAck {
    subscription: Arc<StreamSubscription>,
    key: Arc<str>,
    id: EntryId,
    /// Whether a handler may have seen the delivery that the entry's delivery counter last counted:
    /// `Never` for a delivery fresh from a read or claim (or after a recorded retry count), `Maybe`
    /// once a delivery was abandoned or requeued (delivered again without a count). Only a give-back
    /// of a `Never` entry takes that count back; otherwise a handler's attempt would be forgotten.
    counted: Handled,
    /// Held until the delivery is settled: one prefetch slot.
    _permit: Option<OwnedSemaphorePermit>,
}

impl Acknowledge for StreamAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        let this = *self;
        let subscription = this.subscription.clone();
        if !subscription.is_group() {
            subscription
                .shared
                .counters
                .bump(&subscription.shared.counters.acked);
            subscription.unhold(&this.key, this.id);
            return agentcomm_core::router::ready_ok();
        }
        let (done, result) = tokio::sync::oneshot::channel();
        let StreamAck {
            subscription: _,
            key,
            id,
            counted: _,
            _permit: slot,
        } = this;
        let queued = {
            let mut queue = subscription.acks.queue.lock().expect("acks lock");
            if queue.closed {
                // Not sent: `done` goes when this returns, and the acknowledgement fails below.
                drop(slot);
                false
            } else {
                queue.waiting.push((key.clone(), (id, done, slot)));
                true
            }
        };
        if queued {
            subscription.acks.wake.notify_one();
        }
        Box::pin(async move {
            let result = result.await;
            if result.is_err() {
                // Not sent (closed: `done` was dropped), or the batch went without an answer:
                // nobody else unholds it.
                subscription.unhold(&key, id);
            }
            result.unwrap_or(Err(Error::Closed {
                what: "the Redis stream subscription",
                hint: "it closed and gave its unsettled entries back to the group before this \
                           acknowledgement; the entry is delivered again",
            }))
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
        subscription.redeliver(this, envelope, delay, retry_count, Handled::Maybe);
        agentcomm_core::router::ready_ok()
    }

    fn abandon(self: Box<Self>, envelope: Envelope) {
        let this = *self;
        let subscription = this.subscription.clone();
        subscription.redeliver(this, envelope, Duration::ZERO, None, Handled::Maybe);
    }

    fn give_back(self: Box<Self>, envelope: Envelope) {
        let this = *self;
        let subscription = this.subscription.clone();
        subscription.redeliver(this, envelope, Duration::ZERO, None, Handled::Never);
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
            // Finishing (waiting for settlements, leaving the group) goes on in the background, on
            // the router's runtime: the router's close waits for it, and a runtime of the caller's
            // that is no longer driven would hold it, half done, until that close gave up.
            let finishing = subscription.clone();
            subscription.shared.runtime.spawn(async move {
                let until = tokio::time::Instant::now() + finishing.shared.settings.close_timeout;
                finishing.finish(until).await;
                finishing.shared.forget_stream(finishing.id);
            });
            Ok(())
        })
    }
}

/// A subscription being set up, abandoned if this is dropped before [`Abandoned::disarm`]: its caller
/// gave up (a timeout around `subscribe`, a `select!`, a reply inbox's request cancelled) while it
/// connected readers and started tasks. Those run on tasks of their own, which a dropped future does
/// not stop: without this a reader would go on reading (its connection and a blocking `XREAD` or
/// `XREADGROUP`) for nobody for as long as the process lives.
struct Abandoned(Option<Arc<StreamSubscription>>);

impl Abandoned {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        if let Some(subscription) = self.0.take() {
            subscription.abandon();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Acknowledgements that keep failing without a reconnect (an ACL user that may not `XACK`) do not
    /// grow the set of entries remembered for their recovery without bound: past the cap, the oldest
    /// are forgotten and counted, and the newest kept.
    #[test]
    fn entries_whose_acknowledgement_failed_are_remembered_up_to_a_cap() {
        let mut unacked: HashSet<Held, FastState> = HashSet::default();
        let stream: Arc<str> = Arc::from("p:stream:{A}");
        let other: Arc<str> = Arc::from("p:stream:{B}");
        let mut forgotten = 0;
        for batch in 0..(UNACKED_CAP as u64 / 100 + 10) {
            let key = if batch.is_multiple_of(2) {
                &stream
            } else {
                &other
            };
            forgotten += remember_unacked(
                &mut unacked,
                (0..100).map(|seq| (key.clone(), EntryId(batch, seq))),
            );
            assert!(unacked.len() <= UNACKED_CAP, "{} remembered", unacked.len());
        }
        let total = (UNACKED_CAP / 100 + 10) * 100;
        assert_eq!(forgotten, total - UNACKED_CAP);
        let last = UNACKED_CAP as u64 / 100 + 9;
        let newest = if last.is_multiple_of(2) {
            &stream
        } else {
            &other
        };
        assert!(unacked.contains(&(newest.clone(), EntryId(last, 99))));
        assert!(!unacked.contains(&(stream.clone(), EntryId(0, 0))));
        // Below the cap nothing is forgotten.
        let mut few: HashSet<Held, FastState> = HashSet::default();
        assert_eq!(
            remember_unacked(
                &mut few,
                (0..10).map(|seq| (stream.clone(), EntryId(1, seq)))
            ),
            0
        );
        assert_eq!(few.len(), 10);
    }

    #[test]
    fn read_replies_are_split_into_entries_of_the_streams_read() {
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
        let keys: Vec<Arc<str>> = vec!["p:stream:{A}".into()];
        assert_eq!(
            read_entries(reply, &keys),
            vec![
                (
                    keys[0].clone(),
                    Str::from("1-0"),
                    Some(Bytes::from_static(b"\x80"))
                ),
                (keys[0].clone(), Str::from("2-0"), None),
                (keys[0].clone(), Str::from("3-0"), Some(Bytes::new())),
            ]
        );
        assert!(read_entries(Value::Null, &keys).is_empty());
    }

    #[test]
    fn a_read_holds_the_entries_of_the_streams_it_asked_for() {
        let entry = |id: &str| Value::Array(vec![Value::from(id), Value::Null]);
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::from("p:stream:{A}"),
                Value::Array(vec![entry("1-0"), entry("1-1")]),
            ]),
            // A stream this read did not ask for: left out. An entry whose id is not <ms>-<seq>: kept
            // for its batch (which skips it), not held.
            Value::Array(vec![
                Value::from("p:stream:{Other}"),
                Value::Array(vec![entry("5-0")]),
            ]),
            Value::Array(vec![
                Value::Bytes(Bytes::from_static(b"p:stream:{B}")),
                Value::Array(vec![entry("2-0"), entry("not-an-id")]),
            ]),
        ]);
        let keys: Vec<Arc<str>> = vec!["p:stream:{A}".into(), "p:stream:{B}".into()];
        let entries = read_entries(reply, &keys);
        let ids: Vec<(&str, &str)> = entries
            .iter()
            .map(|(key, id, _)| (key.as_ref(), &**id))
            .collect();
        assert_eq!(
            ids,
            [
                ("p:stream:{A}", "1-0"),
                ("p:stream:{A}", "1-1"),
                ("p:stream:{B}", "2-0"),
                ("p:stream:{B}", "not-an-id"),
            ]
        );
        let mut held: Vec<Held> = held_of(&entries).collect();
        held.sort();
        let parse = |text| EntryId::parse(text).unwrap();
        assert_eq!(
            held,
            vec![
                (keys[0].clone(), parse("1-0")),
                (keys[0].clone(), parse("1-1")),
                (keys[1].clone(), parse("2-0")),
            ]
        );
        // RESP3 answers with a map.
        let mut map = fred::types::Map::new();
        map.insert(
            fred::types::Key::from("p:stream:{B}"),
            Value::Array(vec![entry("7-0")]),
        );
        let entries = read_entries(Value::Map(map), &keys);
        assert_eq!(entries, vec![(keys[1].clone(), Str::from("7-0"), None)]);
    }

    #[test]
    fn acknowledgements_are_grouped_by_stream_in_the_order_they_came() {
        let waiter = |ms| {
            let (done, _) = tokio::sync::oneshot::channel();
            (EntryId(ms, 0), done, None)
        };
        let (a, b): (Arc<str>, Arc<str>) = ("p:stream:{A}".into(), "p:stream:{B}".into());
        let batch = vec![
            (a.clone(), waiter(1)),
            (b.clone(), waiter(2)),
            (Arc::from("p:stream:{A}"), waiter(3)),
            (b.clone(), waiter(4)),
        ];
        let groups: Vec<(Arc<str>, Vec<u64>)> = by_stream(batch)
            .into_iter()
            .map(|(key, waiting)| (key, waiting.iter().map(|(id, _, _)| id.0).collect()))
            .collect();
        assert_eq!(groups, vec![(a, vec![1, 3]), (b, vec![2, 4])]);
        assert!(by_stream(Vec::new()).is_empty());
    }

    #[test]
    fn ids_order_numerically_and_print_back() {
        let parse = |text| EntryId::parse(text).unwrap();
        assert!(parse("9-1") < parse("10-0"));
        assert!(parse("10-2") < parse("10-10"));
        assert_eq!(parse("1700000000000-7").to_string(), "1700000000000-7");
        assert_eq!(EntryId::parse("x-1"), None);
        assert_eq!(EntryId::parse("5"), Some(EntryId(5, 0)));
        assert_eq!(
            EntryId::parse("18446744073709551615-18446744073709551615"),
            Some(EntryId(u64::MAX, u64::MAX))
        );
        for bad in [
            "",
            "-",
            "-1",
            "1-",
            "1-2-3",
            "18446744073709551616-0",
            "1-x",
            " 1-2",
            "1 -2",
        ] {
            assert_eq!(EntryId::parse(bad), None, "{bad:?}");
        }
        for id in [
            EntryId(0, 0),
            EntryId(1_764_130_000_000, 9),
            EntryId(10, 1_000_000),
            EntryId(u64::MAX, u64::MAX),
        ] {
            assert_eq!(id.text(), id.to_string());
            assert_eq!(EntryId::parse(&id.text()), Some(id));
        }
        // A batch's ids, printed into one buffer, each its own string.
        let batch = [
            EntryId(0, 0),
            EntryId(1_764_130_000_000, 9),
            EntryId(u64::MAX, u64::MAX),
        ];
        let texts = EntryId::texts(batch.into_iter());
        let texts: Vec<&str> = texts.iter().map(|text| &**text).collect();
        assert_eq!(
            texts,
            [
                "0-0",
                "1764130000000-9",
                "18446744073709551615-18446744073709551615"
            ]
        );
        assert!(EntryId::texts(std::iter::empty()).is_empty());
    }

    /// A group subscription (`max_deliveries(1)` unless [`LostAck::start_with`] says otherwise, `claim_idle` as given) holding nothing, and one entry
    /// its handler acknowledged whose `XACK` was lost, in the state `send_acks` leaves such an entry:
    /// pending for this consumer, no longer held, remembered in `unacked`. (A real lost `XACK` needs a
    /// cut of the pool's connection alone: a cut of every connection makes the reader recover the entry
    /// first, so the other paths it can come back by are reached here this way.)
    struct LostAck {
        router: crate::RedisRouter,
        subscription: Subscription,
        inner: Arc<StreamSubscription>,
        raw: Client,
        key: Arc<str>,
        id: EntryId,
    }

    impl LostAck {
        /// `None` when there is no Redis (a failure instead with `AGENTCOMM_REQUIRE_BROKERS=1`).
        /// `before_release` runs once the entry is remembered in `unacked`, before it is unheld.
        async fn start(
            claim_idle: Duration,
            before_release: impl AsyncFnOnce(&Client, &str, EntryId),
        ) -> Option<Self> {
            Self::start_with(claim_idle, 1, before_release).await
        }

        /// [`LostAck::start`] with another `max_deliveries`.
        async fn start_with(
            claim_idle: Duration,
            max_deliveries: u32,
            before_release: impl AsyncFnOnce(&Client, &str, EntryId),
        ) -> Option<Self> {
            use agentcomm_core::router::Router;
            use fred::interfaces::ClientLike;
            let url = crate::unit_redis::url();
            let prefix = crate::unit_redis::prefix();
            let builder = crate::RedisRouter::builder(&url)
                .mode(crate::DeliveryMode::Streams)
                .prefix(&prefix)
                .claim_idle(claim_idle)
                .max_deliveries(max_deliveries)
                .read_block(Duration::from_millis(200));
            let router = crate::unit_redis::connect(builder, &url).await?;
            let raw =
                fred::prelude::Builder::from_config(fred::prelude::Config::from_url(&url).unwrap())
                    .build()
                    .unwrap();
            raw.init().await.unwrap();
            let mut subscription = router
                .subscribe(
                    SubscribeOptions::new(ChannelPattern::parse("Lost:*:*").unwrap()).group("g"),
                )
                .await
                .unwrap();
            router
                .publish(Envelope::new(
                    agentcomm_core::channel::Channel::new("Lost", "event", "s1").unwrap(),
                    "application/msgpack",
                    vec![0x80],
                ))
                .await
                .unwrap();
            let delivery = tokio::time::timeout(Duration::from_secs(10), subscription.next())
                .await
                .expect("a delivery within 10 s")
                .expect("a delivery");
            let key: Arc<str> = Arc::from(router.shared().keys.stream("Lost"));
            let inner = router
                .shared()
                .stream_subscriptions()
                .into_iter()
                .next()
                .expect("the subscription is registered");
            let id = pending_of(&raw, &key, "g", &inner.consumer, "-", 10)
                .await
                .unwrap()
                .into_iter()
                .next()
                .expect("the entry is pending");
            // What a failed XACK leaves (see `send_acks`): remembered first, then unheld, so that no
            // claim finds it unheld and not remembered. The delivery was settled (its slot is not
            // given back here: one slot fewer does not matter to these tests).
            inner.unacked.lock().unwrap().insert((key.clone(), id));
            before_release(&raw, &key, id).await;
            inner.unhold(&key, id);
            std::mem::forget(delivery);
            Some(Self {
                router,
                subscription,
                inner,
                raw,
                key,
                id,
            })
        }

        fn counter(&self, name: &str) -> u64 {
            self.router
                .shared()
                .counters
                .snapshot()
                .into_iter()
                .find(|(counter, _)| *counter == name)
                .map(|(_, value)| value)
                .expect("a counter of that name")
        }

        /// The entries pending in the group, for any consumer.
        async fn pending(&self) -> usize {
            let pending: Value = self
                .raw
                .xpending(self.key.as_ref(), "g", ("-", "+", 10))
                .await
                .unwrap();
            pending.into_array().len()
        }

        /// Waits (10 s at most) until `done` holds.
        async fn wait_for(&self, what: &str, mut done: impl AsyncFnMut(&Self) -> bool) {
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            while !done(self).await {
                assert!(
                    tokio::time::Instant::now() < until,
                    "timed out after 10 s waiting for {what}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        async fn end(self) {
            let (raw, key) = (self.raw.clone(), self.key.clone());
            self.end_keeping_keys().await;
            Self::remove_keys(&raw, &key).await;
        }

        /// Drops the subscription and closes the router (the raw client stays connected).
        async fn end_keeping_keys(self) {
            use agentcomm_core::router::Router;
            drop(self.subscription);
            self.router.close().await.unwrap();
        }

        /// Removes the keys of the prefix `key` has, and quits `raw`.
        async fn remove_keys(raw: &Client, key: &str) {
            use fred::interfaces::{ClientLike, KeysInterface};
            let prefix = key.split(":stream:").next().unwrap();
            let keys: Vec<String> = raw
                .custom(
                    fred::types::CustomCommand::new_static(
                        "KEYS",
                        fred::types::ClusterHash::Random,
                        false,
                    ),
                    vec![format!("{prefix}:*")],
                )
                .await
                .unwrap();
            if !keys.is_empty() {
                let _: i64 = raw.del(keys).await.unwrap();
            }
            let _ = raw.quit().await;
        }
    }

    /// An entry whose `XACK` was lost, claimed back after `claim_idle` by its own consumer (no
    /// reconnect made its reader recover it first), is acknowledged, not handled again: with
    /// `max_deliveries(1)` it would otherwise be dead-lettered although its handler succeeded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_entry_whose_ack_was_lost_claimed_back_after_claim_idle_is_acknowledged() {
        let Some(lost) = LostAck::start(Duration::from_millis(100), async |_, _, _| {}).await
        else {
            return;
        };
        lost.wait_for("the entry to be acknowledged", async |lost| {
            lost.counter("acks_recovered") == 1 && lost.pending().await == 0
        })
        .await;
        assert_eq!(lost.counter("dead_lettered"), 0);
        assert_eq!(lost.counter("reclaimed"), 0, "not handled again");
        assert_eq!(lost.counter("acked"), 1);
        let remembered = (lost.key.clone(), lost.id);
        assert!(!lost.inner.unacked.lock().unwrap().contains(&remembered));
        lost.end().await;
    }

    /// An entry whose `XACK` was lost and whose entry was then trimmed, found by a claim after
    /// `claim_idle`, is acknowledged as handled (`acks_recovered`), not counted and logged as an entry
    /// trimmed before anyone handled it (`trimmed`, a loss): its handler succeeded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_entry_whose_ack_was_lost_then_trimmed_is_not_counted_as_lost() {
        let trim = async |raw: &Client, key: &str, id: EntryId| {
            let _: u64 = raw.xdel(key, id.to_string()).await.unwrap();
        };
        let Some(lost) = LostAck::start(Duration::from_millis(100), trim).await else {
            return;
        };
        // The claim script empties the pending list in Redis before the round reads its reply and
        // counts: wait for the count too, whichever it is, so that a wrong one fails below at once.
        lost.wait_for("the entry to be acknowledged and counted", async |lost| {
            lost.pending().await == 0
                && lost.counter("acks_recovered") + lost.counter("trimmed") >= 1
        })
        .await;
        assert_eq!(lost.counter("trimmed"), 0, "its handler had it: not lost");
        assert_eq!(lost.counter("acks_recovered"), 1);
        assert_eq!(lost.counter("acked"), 1);
        let remembered = (lost.key.clone(), lost.id);
        assert!(!lost.inner.unacked.lock().unwrap().contains(&remembered));
        lost.end().await;
    }

    /// A subscription closing with an entry whose `XACK` was lost acknowledges it, rather than giving
    /// it back to the group with the entries no handler finished (where another member would handle
    /// it again at once, or dead-letter it with `max_deliveries(1)`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscription_closing_acknowledges_an_entry_whose_ack_was_lost() {
        let Some(lost) = LostAck::start(Duration::from_secs(30), async |_, _, _| {}).await else {
            return;
        };
        let (raw, key, counters) = (
            lost.raw.clone(),
            lost.key.clone(),
            lost.router.shared().clone(),
        );
        lost.end_keeping_keys().await;
        let pending: Value = raw
            .xpending(key.as_ref(), "g", ("-", "+", 10))
            .await
            .unwrap();
        assert!(
            pending.into_array().is_empty(),
            "acknowledged, not given back to the group"
        );
        let recovered = counters.counters.acks_recovered.load(Ordering::Relaxed);
        assert_eq!(recovered, 1);
        LostAck::remove_keys(&raw, &key).await;
    }

    /// A delivery lost with a connection (pending for this consumer, not held, not acknowledged), seen
    /// by recovery and by the subscription's claim round at once (an outage longer than `claim_idle`):
    /// `LostAck`'s entry, forgotten as acknowledged. `claim_idle` is long, so only the rounds a test
    /// runs by hand claim it. Returns the reader recovery runs on.
    async fn lost_delivery() -> Option<(LostAck, Arc<Reader>)> {
        let lost = LostAck::start_with(Duration::from_secs(30), 5, async |_, _, _| {}).await?;
        lost.inner.unacked.lock().unwrap().clear();
        let reader = lost.inner.readers.lock().unwrap()[0].clone();
        Some((lost, reader))
    }

    /// Runs recovery's script for what `reserve_for_recovery` gave, as `recover_pending` does.
    async fn recover_reserved(
        lost: &LostAck,
        reader: &Reader,
        (ids, reserved): (Vec<String>, Vec<EntryId>),
    ) {
        let mut args = vec!["g".to_string(), lost.inner.consumer.clone()];
        args.extend(ids);
        lost.inner
            .recover_entries(reader, &lost.key, args, reserved)
            .await
            .unwrap();
    }

    /// Acknowledges the deliveries waiting for the handler now (the paths that send them have
    /// returned), and counts them.
    async fn waiting(lost: &mut LostAck) -> usize {
        use futures::FutureExt;
        let mut count = 0;
        while let Some(Some(delivery)) = lost.subscription.next().now_or_never() {
            delivery.ack().await.unwrap();
            count += 1;
        }
        count
    }

    /// Recovery has listed a lost delivery when the claim round lists it too: the claim round leaves
    /// it (recovery holds it from its listing on), and it reaches the handler once, by recovery.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_round_between_recoverys_listing_and_its_script_does_not_deliver_again() {
        let Some((mut lost, reader)) = lost_delivery().await else {
            return;
        };
        let reserved = lost.inner.reserve_for_recovery(&lost.key, &[lost.id]);
        assert_eq!(reserved.1, vec![lost.id]);
        let mut unclaimable = Unclaimable::default();
        reclaim_page(
            &lost.inner,
            "g",
            &lost.key,
            0,
            "-",
            &Unclaimable::default(),
            &mut unclaimable,
        )
        .await
        .unwrap();
        recover_reserved(&lost, &reader, reserved).await;
        assert_eq!(waiting(&mut lost).await, 1, "delivered once");
        assert_eq!(lost.counter("reclaimed"), 0);
        assert_eq!(lost.counter("dead_lettered"), 0);
        lost.end().await;
    }

    /// The claim round claimed a lost delivery before recovery listed it, and holds it only after:
    /// whichever path holds it first delivers it, the other leaves it held, whatever the order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_round_holding_after_recoverys_listing_leaves_the_entry_to_recovery() {
        let Some((mut lost, reader)) = lost_delivery().await else {
            return;
        };
        // The claim round's `XCLAIM` (counting a delivery), before recovery's listing.
        let claimed: Value = lost
            .raw
            .xclaim(
                lost.key.as_ref(),
                "g",
                lost.inner.consumer.as_str(),
                0,
                lost.id.to_string(),
                None,
                None,
                None,
                false,
                false,
            )
            .await
            .unwrap();
        assert_eq!(claimed.into_array().len(), 1);
        let reserved = lost.inner.reserve_for_recovery(&lost.key, &[lost.id]);
        // The claim round's reply comes now: the entry is recovery's.
        let text = lost.id.to_string();
        assert!(
            lost.inner.hold_ids(&lost.key, [text.as_str()]).is_empty(),
            "held by recovery already: the claim round leaves it"
        );
        recover_reserved(&lost, &reader, reserved).await;
        assert_eq!(waiting(&mut lost).await, 1, "delivered once, by recovery");
        assert_eq!(lost.counter("reclaimed"), 0);
        // The other order: the claim round holds first, recovery leaves it.
        let (mut other, _) = lost_delivery().await.unwrap();
        let text = other.id.to_string();
        assert_eq!(other.inner.hold_ids(&other.key, [text.as_str()]).len(), 1);
        let reserved = other.inner.reserve_for_recovery(&other.key, &[other.id]);
        assert!(reserved.0.is_empty() && reserved.1.is_empty());
        assert_eq!(waiting(&mut other).await, 0, "the claim round delivers it");
        // What the claim round's handler would do when done (no delivery here to settle it).
        other.inner.unhold(&other.key, other.id);
        lost.end().await;
        other.end().await;
    }

    /// Recovery took back an entry whose read reply was lost (its delivery counter counts that read),
    /// and the subscription stopped before a prefetch slot came for it: it goes back to the group with
    /// the read uncounted and marked idle, as the give-back of a buffered delivery does, so the next
    /// member gets it as the attempt recovery would have delivered. Left as it was, the next member's
    /// claim counted one more: with `max_deliveries(1)`, a dead letter no handler had seen.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_entry_recovery_took_back_for_a_stopping_subscription_goes_back_unread() {
        let Some((lost, reader)) = lost_delivery().await else {
            return;
        };
        let reserved = lost.inner.reserve_for_recovery(&lost.key, &[lost.id]);
        // Stopping, with every prefetch slot taken (handlers at work): no slot comes any more. (Taken
        // once the reader stopped, which gives back the slots of its last read.)
        lost.inner.stop_now();
        lost.wait_for("the reader to stop", async |lost| {
            lost.inner.reading.load(Ordering::Acquire) == 0
        })
        .await;
        let free = lost.inner.permits.available_permits() as u32;
        let _slots = lost.inner.permits.clone().try_acquire_many_owned(free);
        recover_reserved(&lost, &reader, reserved).await;
        let pending: Value = lost
            .raw
            .xpending(lost.key.as_ref(), "g", ("-", "+", 10))
            .await
            .unwrap();
        let entry = pending.into_array()[0].clone().into_array();
        let (idle, deliveries) = (entry[2].as_u64().unwrap(), entry[3].as_u64().unwrap());
        assert_eq!(
            deliveries, 0,
            "the delivery counter of an entry no handler saw"
        );
        assert!(idle >= 30_000, "marked idle for another member: {idle} ms");
        assert_eq!(lost.inner.held_count(), 0);
        lost.end().await;
    }

    /// A late acknowledgement that finds its entry no longer pending (recovery, or another member,
    /// acknowledged it first) does not count it again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_late_acknowledgement_of_an_entry_no_longer_pending_is_not_counted() {
        let Some(lost) = LostAck::start(Duration::from_secs(30), async |_, _, _| {}).await else {
            return;
        };
        let _: u64 = lost
            .raw
            .xack(lost.key.as_ref(), "g", lost.id.to_string())
            .await
            .unwrap();
        lost.inner.unacked.lock().unwrap().clear();
        lost.inner.ack_late(&lost.key, lost.id).await;
        assert_eq!(lost.counter("acks_recovered"), 0);
        assert_eq!(lost.counter("acked"), 0);
        lost.end().await;
    }

    /// A router closed while Redis does not answer, with an acknowledgement under way, gives up on
    /// finishing its subscription at the close's deadline; the subscription's lease renewer and
    /// acknowledgement sender then end once their commands time out. Before, both waited for the
    /// release the cut-short finishing never made: for ever, holding the router's state.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_close_given_up_during_an_outage_leaves_no_task_running() {
        use agentcomm_core::router::Router;
        let url = crate::unit_redis::url();
        let Some((proxy, proxied)) = crate::unit_redis::loopback_proxy(&url).await else {
            return;
        };
        let builder =
            quiet_streams_builder(&proxied, Duration::from_millis(200), Duration::from_secs(1))
                .close_timeout(Duration::from_millis(200));
        let Some(router) = crate::unit_redis::connect(builder, &url).await else {
            return;
        };
        let mut subscription = router
            .subscribe(
                SubscribeOptions::new(ChannelPattern::parse("Outage:*:*").unwrap()).group("g"),
            )
            .await
            .unwrap();
        let delivery = publish_and_receive(&router, &mut subscription, "Outage").await;
        let inner = only_stream_subscription(&router);
        proxy.blackhole(true);
        let acking = tokio::spawn(delivery.ack());
        // The XACK is written (and held by the proxy) before the close begins.
        tokio::time::sleep(Duration::from_millis(100)).await;
        tokio::time::timeout(Duration::from_secs(5), router.close())
            .await
            .expect("close within 5 s")
            .unwrap();
        let ack = tokio::time::timeout(Duration::from_secs(5), acking)
            .await
            .expect("the acknowledgement fails within 5 s")
            .unwrap();
        assert!(ack.is_err(), "Redis never answered it: {ack:?}");
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        while inner.running.load(Ordering::Acquire) > 0 {
            assert!(
                tokio::time::Instant::now() < until,
                "{} task(s) of the closed subscription still running 10 s after their commands \
                 timed out (released: {})",
                inner.running.load(Ordering::Acquire),
                inner.released.load(Ordering::Acquire)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        proxy.blackhole(false);
        drop(subscription);
        let raw =
            fred::prelude::Builder::from_config(fred::prelude::Config::from_url(&url).unwrap())
                .build()
                .unwrap();
        raw.init().await.unwrap();
        LostAck::remove_keys(&raw, &router.shared().keys.stream("Outage")).await;
    }

    /// A Streams router's builder for `proxied` (a URL through a fault proxy), under a prefix of its own, that reconnects at once
    /// (20–50 ms) and checks for new streams only hourly: nothing but its readers talks to Redis.
    fn quiet_streams_builder(
        proxied: &str,
        read_block: Duration,
        command_timeout: Duration,
    ) -> crate::RedisRouterBuilder {
        crate::RedisRouter::builder(proxied)
            .mode(crate::DeliveryMode::Streams)
            .prefix(crate::unit_redis::prefix())
            .read_block(read_block)
            .command_timeout(command_timeout)
            .discovery_interval(Duration::from_secs(3600))
            .reconnect(agentcomm_core::backoff::Backoff::new(
                Duration::from_millis(20),
                Duration::from_millis(50),
            ))
    }

    /// The one Streams subscription `router` has.
    fn only_stream_subscription(router: &crate::RedisRouter) -> Arc<StreamSubscription> {
        router
            .shared()
            .stream_subscriptions()
            .into_iter()
            .next()
            .expect("the subscription is registered")
    }

    /// Publishes an empty message of `class` (session `s1`) through `publisher`, then waits up to 10 s
    /// for the next delivery of `subscription`.
    async fn publish_and_receive(
        publisher: &crate::RedisRouter,
        subscription: &mut agentcomm_core::router::Subscription,
        class: &str,
    ) -> Delivery {
        use agentcomm_core::router::Router;
        let channel = agentcomm_core::channel::Channel::new(class, "event", "s1").unwrap();
        publisher
            .publish(Envelope::new(channel, "application/msgpack", vec![0x80]))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), subscription.next())
            .await
            .expect("a delivery within 10 s")
            .expect("a delivery")
    }

    /// Closes `router`, then removes the keys of its prefix (found from the stream of `class`) with a
    /// client of its own to the Redis at `url`.
    async fn close_and_remove_keys(router: crate::RedisRouter, url: &str, class: &str) {
        use agentcomm_core::router::Router;
        let key = router.shared().keys.stream(class);
        router.close().await.unwrap();
        let raw =
            fred::prelude::Builder::from_config(fred::prelude::Config::from_url(url).unwrap())
                .build()
                .unwrap();
        raw.init().await.unwrap();
        LostAck::remove_keys(&raw, &key).await;
    }

    /// A fan-out subscription passes over an entry it does not want (another channel of its class
    /// stream) without waiting for anything: the deliveries its batch made ready before it stay for
    /// the batch's one hand-over. They used to be handed over at each such entry, as before a group's
    /// wait for Redis: on a stream mixing wanted and unwanted channels, a lock (and a wake) per run of
    /// wanted entries instead of one per batch.
    #[tokio::test]
    async fn a_fan_out_subscription_keeps_what_is_ready_over_an_entry_it_passes_over() {
        use agentcomm_core::router::Router;
        let url = crate::unit_redis::url();
        let prefix = crate::unit_redis::prefix();
        let builder = crate::RedisRouter::builder(&url)
            .mode(crate::DeliveryMode::Streams)
            .prefix(&prefix);
        let Some(router) = crate::unit_redis::connect(builder, &url).await else {
            return;
        };
        let mut subscription = router
            .subscribe(SubscribeOptions::new(
                ChannelPattern::parse("Mixed:wanted:*").unwrap(),
            ))
            .await
            .unwrap();
        let inner = only_stream_subscription(&router);
        let key: Arc<str> = Arc::from(router.shared().keys.stream("Mixed"));
        let frame = |channel: &str| {
            let envelope = Envelope::new(
                agentcomm_core::parse_channel(channel).unwrap(),
                "application/msgpack",
                vec![0x80],
            );
            Some(Bytes::from(envelope.to_frame().unwrap()))
        };
        // Slots of their own: the reader may hold the subscription's for its blocking read.
        let slots = Arc::new(Semaphore::new(2));
        let mut fresh = false;
        let mut ready = Ready::default();
        // Ids below any Redis makes for this stream: the reader's cursor is not moved past them.
        for (id, channel) in [("0-1", "Mixed:wanted:s1"), ("0-2", "Mixed:other:s1")] {
            let slot = slots.clone().acquire_owned().await.unwrap();
            inner
                .handle_entry(
                    &key,
                    Str::from(id),
                    frame(channel),
                    None,
                    false,
                    slot,
                    &mut fresh,
                    &mut ready,
                )
                .await;
        }
        assert_eq!(
            ready.deliveries.len(),
            1,
            "the wanted entry's delivery waits for the end of the batch"
        );
        assert_eq!(subscription.buffered(), 0, "nothing handed over yet");
        inner.send_ready(&mut ready).await;
        let delivery = subscription.try_next().expect("handed over at the end");
        assert_eq!(delivery.envelope().channel().name(), "Mixed:wanted:s1");
        delivery.ack().await.unwrap();
        drop(subscription);
        close_and_remove_keys(router, &url, "Mixed").await;
    }

    /// A subscription whose own reading connection gives up reconnecting (`max_reconnect_attempts`)
    /// while the pool's connections stay up ends, and health says why and names the setting; the
    /// router still publishes. Before, fred's connection task of the reader ended for good, every read
    /// waited out its timeout and was tried again for ever, the subscription never received nor ended,
    /// and health said "some connections are reconnecting".
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscription_whose_reader_gave_up_reconnecting_ends_and_health_says_why() {
        use agentcomm_core::router::{HealthStatus, Router};
        let url = crate::unit_redis::url();
        let Some((proxy, proxied)) = crate::unit_redis::loopback_proxy(&url).await else {
            return;
        };
        let prefix = crate::unit_redis::prefix();
        let builder = crate::RedisRouter::builder(&proxied)
            .mode(crate::DeliveryMode::Streams)
            .prefix(&prefix)
            .read_block(Duration::from_millis(200))
            .reconnect(agentcomm_core::backoff::Backoff::new(
                Duration::from_millis(20),
                Duration::from_millis(50),
            ))
            .max_reconnect_attempts(Some(2))
            .command_timeout(Duration::from_secs(10));
        let Some(router) = crate::unit_redis::connect(builder, &url).await else {
            return;
        };
        let mut subscription = router
            .subscribe(SubscribeOptions::new(ChannelPattern::parse("Gone:*:*").unwrap()).group("g"))
            .await
            .unwrap();
        let inner = only_stream_subscription(&router);
        let reader = inner.readers.lock().unwrap()[0].clone();
        // New connections are refused from now on: the pool's stay up, the reader's alone is dropped
        // and cannot come back within its two attempts.
        proxy.reject_for(Duration::from_secs(600));
        let gave_up =
            tokio::time::timeout(Duration::from_secs(5), reader.client.force_reconnection())
                .await
                .expect("the reader's reconnection to end within 5 s");
        assert!(
            gave_up.is_err(),
            "the reader reconnected through a closed proxy"
        );
        let end = tokio::time::timeout(Duration::from_secs(5), subscription.next())
            .await
            .expect("the subscription to end within 5 s");
        assert!(end.is_none(), "nothing was published");
        let health = router.health().await;
        assert_eq!(health.status, HealthStatus::Unhealthy, "{health:?}");
        assert!(
            health.detail.contains("reading connection")
                && health.detail.contains("max_reconnect_attempts"),
            "{health:?}"
        );
        // The pool did not give up: publishing works.
        router
            .publish(Envelope::new(
                agentcomm_core::channel::Channel::new("Gone", "event", "s1").unwrap(),
                "application/msgpack",
                vec![0x80],
            ))
            .await
            .expect("the pool still publishes");
        drop(subscription);
        proxy.reject_for(Duration::ZERO);
        close_and_remove_keys(router, &url, "Gone").await;
    }

    /// A reader whose connection stops answering (a silent network failure: nothing is closed, and
    /// nothing comes back) connects again once a blocking read went unanswered for `read_block` plus
    /// the command timeout (at least 2 s), and receives again once the network does. fred does not
    /// check a connection blocked in a read for unresponsiveness: before, every later read (and a group's
    /// recovery) waited behind the lost one on the dead connection, for as long as TCP took to give
    /// up on it (many minutes; for ever behind the proxy's black hole, which holds the bytes), while
    /// the pool reconnected and publishing worked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_whose_connection_stops_answering_connects_again() {
        use agentcomm_core::router::Router;
        let url = crate::unit_redis::url();
        let Some((proxy, proxied)) = crate::unit_redis::loopback_proxy(&url).await else {
            return;
        };
        // Nothing but the reader talks to Redis while the black hole lasts: a fan-out subscription
        // (no leases, no reclaim rounds) whose trimming checks wait an hour.
        let builder =
            quiet_streams_builder(&proxied, Duration::from_millis(200), Duration::from_secs(1));
        let Some(router) = crate::unit_redis::connect(builder, &url).await else {
            return;
        };
        let mut subscription = router
            .subscribe(SubscribeOptions::new(
                ChannelPattern::parse("Quiet:*:*").unwrap(),
            ))
            .await
            .unwrap();
        let accepted = proxy.stats().accepted;
        proxy.blackhole(true);
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        while proxy.stats().accepted == accepted {
            assert!(
                tokio::time::Instant::now() < until,
                "the reader did not connect again within 10 s of its connection going silent"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        proxy.blackhole(false);
        let delivery = publish_and_receive(&router, &mut subscription, "Quiet").await;
        delivery.ack().await.unwrap();
        drop(subscription);
        close_and_remove_keys(router, &url, "Quiet").await;
    }

    /// A read written while the reader was reconnecting after an ordinary outage, and answered late
    /// for that reason, does not make the freshly made connection again: Redis answered, the connection
    /// is fine. Before, a Redis outage longer than the command timeout often ended in a second
    /// reconnection of the reader, logged as "the reader's connection stopped answering" (not true)
    /// and counted in `reconnects`: the read that waited out the outage in fred's queue was written
    /// on the new connection and blocked there for `read_block`, past its own timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_late_because_of_a_reconnection_does_not_reconnect_again() {
        use agentcomm_core::router::Router;
        use fred::interfaces::EventInterface;
        let url = crate::unit_redis::url();
        let Some((proxy, proxied)) = crate::unit_redis::loopback_proxy(&url).await else {
            return;
        };
        // A fan-out subscription on a quiet stream: every read blocks for the whole `read_block`.
        let builder =
            quiet_streams_builder(&proxied, Duration::from_secs(1), Duration::from_secs(2));
        let Some(router) = crate::unit_redis::connect(builder, &url).await else {
            return;
        };
        let mut subscription = router
            .subscribe(SubscribeOptions::new(
                ChannelPattern::parse("Outage:*:*").unwrap(),
            ))
            .await
            .unwrap();
        let inner = only_stream_subscription(&router);
        let reader = inner.readers.lock().unwrap()[0].clone();
        let reconnections = Arc::new(AtomicU64::new(0));
        let mut events = reader.client.reconnect_rx();
        let counting = reconnections.clone();
        tokio::spawn(async move {
            while events.recv().await.is_ok() {
                counting.fetch_add(1, Ordering::AcqRel);
            }
        });
        // Redis is unreachable for 2.5 s: the read written after the cut waits in fred's queue, is
        // written once the reader reconnected (about 2.5 s), and its answer comes `read_block` later
        // (about 3.5 s), after its limit of `read_block` plus the command timeout (about 3 s).
        let outage = tokio::time::Instant::now();
        proxy.reject_for(Duration::from_millis(2500));
        proxy.cut_all();
        let until = outage + Duration::from_secs(10);
        while reconnections.load(Ordering::Acquire) == 0 {
            assert!(
                tokio::time::Instant::now() < until,
                "the reader did not reconnect within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Past the late read's limit (about 3 s after the cut), and past the limit of the PING that
        // its timeout writes behind it (as long again, about 6 s): a reconnection either would ask
        // for is counted. A working connection answers that PING as soon as the late read.
        tokio::time::sleep_until(outage + Duration::from_millis(7500)).await;
        publish_and_receive(&router, &mut subscription, "Outage").await;
        assert_eq!(
            reconnections.load(Ordering::Acquire),
            1,
            "the reader reconnected again after a read that was late only because of the outage"
        );
        drop(subscription);
        close_and_remove_keys(router, &url, "Outage").await;
    }

    /// A Redis that answers late for a moment, by more than the command timeout but less than the
    /// limit fred applies to every other connection (`max(command_timeout, 2 s)` without an answer),
    /// does not make the reader's connection again: with `max_reconnect_attempts(Some(0))` that ended
    /// the subscription (health: "gave up reconnecting") while the pool rode through the same moment.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_answered_late_within_the_unresponsive_limit_keeps_the_connection() {
        use agentcomm_core::router::Router;
        let url = crate::unit_redis::url();
        let Some((proxy, proxied)) = crate::unit_redis::loopback_proxy(&url).await else {
            return;
        };
        let prefix = crate::unit_redis::prefix();
        let builder = crate::RedisRouter::builder(&proxied)
            .mode(crate::DeliveryMode::Streams)
            .prefix(&prefix)
            .read_block(Duration::from_millis(500))
            .command_timeout(Duration::from_millis(500))
            .discovery_interval(Duration::from_secs(3600))
            .max_reconnect_attempts(Some(0));
        let Some(router) = crate::unit_redis::connect(builder, &url).await else {
            return;
        };
        let mut subscription = router
            .subscribe(SubscribeOptions::new(
                ChannelPattern::parse("Late:*:*").unwrap(),
            ))
            .await
            .unwrap();
        let inner = only_stream_subscription(&router);
        // For 3 s every read on the quiet stream is answered after about 1.3 s: read_block, and 0.8 s
        // more on the way, past read_block + command_timeout (1 s).
        proxy.set_latency(Duration::from_millis(400));
        let spike = tokio::time::Instant::now();
        while spike.elapsed() < Duration::from_secs(3) {
            assert!(
                !inner.reader_gave_up_reconnecting(),
                "the subscription ended after {:?} of a Redis answering 0.8 s late",
                spike.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        proxy.set_latency(Duration::ZERO);
        let channel = agentcomm_core::channel::Channel::new("Late", "event", "s1").unwrap();
        router
            .publish(Envelope::new(channel, "application/msgpack", vec![0x80]))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), subscription.next())
            .await
            .expect("a delivery within 10 s")
            .expect("a delivery: the subscription did not end");
        assert!(!inner.reader_gave_up_reconnecting());
        drop(subscription);
        close_and_remove_keys(router, &url, "Late").await;
    }

    /// On a cluster, the `PING` that tells a late read from a silent connection goes to the node of the
    /// reader's stream, where its read waits: fred sends a `PING` without a hash to any node, so a
    /// reader whose node went silent just after a reconnection was never made again.
    #[test]
    fn the_silence_probe_goes_to_the_node_of_the_readers_stream() {
        let reader = |url: &str, key: &str| Reader {
            client: fred::prelude::Builder::from_config(
                fred::prelude::Config::from_url(url).unwrap(),
            )
            .build()
            .unwrap(),
            keys: Mutex::new(vec![Arc::from(key)]),
            rescan: Arc::new(AtomicBool::new(false)),
            failing: AtomicBool::new(false),
            failure: Mutex::new(None),
        };
        let key = "app:stream:{Orders}";
        let options = reader("redis-cluster://127.0.0.1:1", key)
            .silence_probe_options(Duration::from_secs(3));
        assert_eq!(
            options.cluster_hash,
            Some(fred::types::ClusterHash::Custom(fred::util::redis_keyslot(
                key.as_bytes()
            )))
        );
        assert_eq!(options.timeout, Some(Duration::from_secs(3)));
        assert_eq!(options.max_attempts, Some(1));
        let options =
            reader("redis://127.0.0.1:1", key).silence_probe_options(Duration::from_secs(3));
        assert_eq!(options.cluster_hash, None);
    }

    /// A group reader whose new connection goes silent just after a reconnection (an outage, then a
    /// network that drops the fresh connection's state) is made again all the same. The read written
    /// on it is late, as a read that waited for the reconnection is, so it does not by itself make the
    /// connection again; before, nothing else did: with that read unanswered fred takes the connection
    /// for blocked and does not check it, and the group's recovery that follows failed with a timeout
    /// every command timeout, for ever, the subscription delivering nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_reader_whose_new_connection_goes_silent_connects_again() {
        use agentcomm_core::router::Router;
        use fred::interfaces::EventInterface;
        let url = crate::unit_redis::url();
        let Some((proxy, proxied)) = crate::unit_redis::loopback_proxy(&url).await else {
            return;
        };
        let builder =
            quiet_streams_builder(&proxied, Duration::from_secs(1), Duration::from_secs(2));
        let Some(router) = crate::unit_redis::connect(builder, &url).await else {
            return;
        };
        let mut subscription = router
            .subscribe(
                SubscribeOptions::new(ChannelPattern::parse("Relapse:*:*").unwrap()).group("g"),
            )
            .await
            .unwrap();
        let inner = only_stream_subscription(&router);
        let reader = inner.readers.lock().unwrap()[0].clone();
        let mut events = reader.client.reconnect_rx();
        proxy.reject_for(Duration::from_millis(1200));
        proxy.cut_all();
        tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("the reader reconnects within 10 s")
            .expect("a reconnection");
        // The reader recovers and writes its next read on the new connection; then it goes silent.
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.silence_live();
        // The read's limit is read_block + 2 s (3 s), and the PING's as long again.
        tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("the reader connects again within 10 s of its new connection going silent")
            .expect("a reconnection");
        // Published by a router of its own: the pool's connections went silent too.
        let publisher = crate::unit_redis::connect(
            crate::RedisRouter::builder(url.clone())
                .mode(crate::DeliveryMode::Streams)
                .prefix(router.shared().settings.prefix.clone()),
            &url,
        )
        .await
        .expect("a publisher");
        let channel = agentcomm_core::channel::Channel::new("Relapse", "event", "s1").unwrap();
        publisher
            .publish(Envelope::new(channel, "application/msgpack", vec![0x80]))
            .await
            .unwrap();
        publisher.close().await.unwrap();
        let delivery = tokio::time::timeout(Duration::from_secs(10), subscription.next())
            .await
            .expect("a delivery within 10 s")
            .expect("a delivery");
        delivery.ack().await.unwrap();
        drop(subscription);
        close_and_remove_keys(router, &url, "Relapse").await;
    }
}
