//! The counters a router reports in its [`Health`](agentcomm_core::router::Health).
//!
//! | counter | meaning |
//! |---|---|
//! | `published` | publishes Redis confirmed |
//! | `publish_duplicates` | streams: publishes fred wrote again after a reconnect, found stored already and not stored twice |
//! | `publish_errors` | publishes that failed (the caller got the error) |
//! | `publish_uncertain` | publishes of a `publish_batch` (pub/sub, or Streams without `idempotent_publish`) whose pipeline failed on a timeout or a cut connection: their caller got an error, yet they may have been published or stored, or may still be once the connection is back (fred can write a pipeline after its caller stopped waiting); publishing them again may deliver them twice. Also pub/sub `PUBLISH`es and Streams `XADD`s (without `idempotent_publish`) sent alone that failed on a timeout or a cut connection (Redis may have run one before its answer came too late or was lost; not one fred dropped unwritten). Also in `publish_errors`, except the live copies of stored messages (a reply in Streams mode, a dead letter in pub/sub mode), whose publish reports `Accepted` |
//! | `unroutable` | pub/sub: publishes no subscriber received |
//! | `delivered` | deliveries handed to subscriptions |
//! | `acked`, `nacked` | settlements |
//! | `acks_not_pending` | streams: acknowledgements whose entry was no longer pending: another member had claimed and acknowledged it first (handled twice) |
//! | `acks_recovered` | streams: entries a handler acknowledged whose `XACK` was lost (a connection cut), acknowledged when they came back (recovery after the reconnect, or a claim after `claim_idle`), or when their subscription closed, instead of being handled again; also counted in `acked` |
//! | `redelivered` | deliveries handed out again (nack, abandon, recovery after a reconnect) |
//! | `reclaimed` | streams: entries taken over from a consumer that stopped renewing them |
//! | `reclaim_rounds` | streams: rounds a group subscription made over its streams looking for entries left pending longer than `claim_idle` (one every `claim_idle / 2`, between 50 ms and 1 s, while it runs), counting only rounds in which every stream was looked at: a round in which listing or claiming failed on any stream (logged at debug) is not counted |
//! | `read_interrupts` | streams: blocking reads a reclaim round interrupted (`CLIENT UNBLOCK .. TIMEOUT`) to get the prefetch slots they held for entries to claim: at most one per reader and round, and none for entries the round before could not claim either (a live member holds them, trimmed) |
//! | `lease_renewals` | streams: renewals Redis answered of the entries a group subscription holds (one per stream every `claim_idle / 3`, while it holds some) |
//! | `dead_lettered` | streams: entries moved to their dead-letter channel after `max_deliveries` |
//! | `dead_letters_left` | streams: dead letters of dead letters (channel `DeadLetter:DeadLetter:<session>`) that reached `max_deliveries`: acknowledged and left in their stream (until trimmed) instead of dead-lettered again into the stream they came from, which would loop |
//! | `malformed` | frames that could not be decoded (pub/sub: or that name another channel than the one they came on); moved to `DeadLetter:agentcomm.Malformed:unknown` |
//! | `filtered` | streams: entries of a class stream no pattern of the group wanted (acknowledged, logged) |
//! | `trimmed` | streams: entries trimmed (`stream_max_len`) before a subscription read them, or while pending |
//! | `dropped` | messages given back after their subscription closed (pub/sub, fan-out streams) |
//! | `lagged` | pub/sub: messages a subscription skipped in the subscriber's channel because it fell more than `broadcast_capacity` behind (every channel of the router: what it lost of its own channels is in `lost`) |
//! | `lost` | pub/sub: messages missing from a publisher's sequence (published while disconnected, cut off in transit, skipped by a subscription that fell behind); it goes down by one when such a message arrives after all (see `late`), so that it says how many never came: export it as a gauge, not as a monotonic counter |
//! | `late` | pub/sub: messages that arrived after their gap had been counted in `lost` (later than `reorder_window`): delivered out of order, and taken off `lost` |
//! | `duplicates` | pub/sub: repeats discarded (a publish fred wrote again after a reconnect) |
//! | `reconnects`, `connection_errors` | connection events of all the router's clients |

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long after a loss or a connection error the router reports itself degraded.
pub(crate) const TROUBLE_MEMORY: Duration = Duration::from_secs(60);

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) published: AtomicU64,
    pub(crate) publish_duplicates: AtomicU64,
    pub(crate) publish_errors: AtomicU64,
    pub(crate) publish_uncertain: AtomicU64,
    pub(crate) unroutable: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) acked: AtomicU64,
    pub(crate) nacked: AtomicU64,
    pub(crate) acks_not_pending: AtomicU64,
    pub(crate) acks_recovered: AtomicU64,
    pub(crate) redelivered: AtomicU64,
    pub(crate) reclaimed: AtomicU64,
    pub(crate) reclaim_rounds: AtomicU64,
    pub(crate) read_interrupts: AtomicU64,
    pub(crate) lease_renewals: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) dead_letters_left: AtomicU64,
    pub(crate) malformed: AtomicU64,
    pub(crate) filtered: AtomicU64,
    pub(crate) trimmed: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) lagged: AtomicU64,
    pub(crate) lost: AtomicU64,
    pub(crate) late: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) connection_errors: AtomicU64,
    last_trouble: Mutex<Option<Instant>>,
    /// What the last failed connection attempt of any client said (nothing secret: fred's details),
    /// until a client reconnects: health names it while Redis cannot be used.
    last_connection_error: Mutex<Option<String>>,
}

impl Counters {
    pub(crate) fn bump(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(&self, counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }

    /// Remembers that something went wrong just now (a loss, a connection error).
    pub(crate) fn mark_trouble(&self) {
        *self.last_trouble.lock().expect("counters lock") = Some(Instant::now());
    }

    /// Counts a loss and remembers it.
    pub(crate) fn lose(&self, counter: &AtomicU64, by: u64) {
        if by > 0 {
            self.add(counter, by);
            self.mark_trouble();
        }
    }

    /// Takes one off `counter`: something counted as lost came after all.
    pub(crate) fn unlose(&self, counter: &AtomicU64) {
        let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Remembers what a failed connection attempt said (`None`: a client reconnected).
    pub(crate) fn connection_error(&self, error: Option<String>) {
        *self.last_connection_error.lock().expect("counters lock") = error;
    }

    /// What the last failed connection attempt said, unless a client reconnected since.
    pub(crate) fn last_connection_error(&self) -> Option<String> {
        self.last_connection_error
            .lock()
            .expect("counters lock")
            .clone()
    }

    /// Whether something went wrong within [`TROUBLE_MEMORY`].
    pub(crate) fn recent_trouble(&self) -> bool {
        self.last_trouble
            .lock()
            .expect("counters lock")
            .is_some_and(|at| at.elapsed() < TROUBLE_MEMORY)
    }

    /// Every counter with its name.
    pub(crate) fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("published", load(&self.published)),
            ("publish_duplicates", load(&self.publish_duplicates)),
            ("publish_errors", load(&self.publish_errors)),
            ("publish_uncertain", load(&self.publish_uncertain)),
            ("unroutable", load(&self.unroutable)),
            ("delivered", load(&self.delivered)),
            ("acked", load(&self.acked)),
            ("nacked", load(&self.nacked)),
            ("acks_not_pending", load(&self.acks_not_pending)),
            ("acks_recovered", load(&self.acks_recovered)),
            ("redelivered", load(&self.redelivered)),
            ("reclaimed", load(&self.reclaimed)),
            ("reclaim_rounds", load(&self.reclaim_rounds)),
            ("read_interrupts", load(&self.read_interrupts)),
            ("lease_renewals", load(&self.lease_renewals)),
            ("dead_lettered", load(&self.dead_lettered)),
            ("dead_letters_left", load(&self.dead_letters_left)),
            ("malformed", load(&self.malformed)),
            ("filtered", load(&self.filtered)),
            ("trimmed", load(&self.trimmed)),
            ("dropped", load(&self.dropped)),
            ("lagged", load(&self.lagged)),
            ("lost", load(&self.lost)),
            ("late", load(&self.late)),
            ("duplicates", load(&self.duplicates)),
            ("reconnects", load(&self.reconnects)),
            ("connection_errors", load(&self.connection_errors)),
        ]
    }
}

/// Logs at most one warning per `every` for a repeated problem, saying how many were not logged.
pub(crate) struct LogLimiter {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimiter {
    pub(crate) fn new(every: Duration) -> Self {
        LogLimiter {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(number suppressed since the last log)` when this occurrence should be logged.
    pub(crate) fn allow(&self) -> Option<u64> {
        let mut state = self.state.lock().expect("log limiter lock");
        let now = Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < self.every => {
                state.1 += 1;
                None
            }
            _ => {
                let suppressed = state.1;
                *state = (Some(now), 0);
                Some(suppressed)
            }
        }
    }
}

/// A warning about a loss that may repeat (a subscription that loses messages after every cut, or
/// keeps falling behind): the first written at once, then at most one per `every`, each carrying what
/// was lost since the line before, so that sustained loss does not flood the log. The health counters
/// count every loss as it comes, whatever is written.
pub(crate) struct SummedLog {
    every: Duration,
    last: Option<Instant>,
    /// What was lost since the last line, and in how many occurrences.
    count: u64,
    times: u64,
}

impl SummedLog {
    pub(crate) fn new(every: Duration) -> Self {
        SummedLog {
            every,
            last: None,
            count: 0,
            times: 0,
        }
    }

    /// Whether something was added since the last line: a line is still due for it.
    pub(crate) fn waiting(&self) -> bool {
        self.count > 0
    }

    /// Adds `count` (0: nothing new, only whether what waits is due). When a line is due now:
    /// `Some((lost since the last line, occurrences not written on a line of their own))`.
    pub(crate) fn add(&mut self, count: u64, now: Instant) -> Option<(u64, u64)> {
        if count > 0 {
            self.count = self.count.saturating_add(count);
            self.times += 1;
        }
        if self.count == 0
            || self
                .last
                .is_some_and(|last| now.duration_since(last) < self.every)
        {
            return None;
        }
        self.last = Some(now);
        let folded = self.times - u64::from(count > 0);
        self.times = 0;
        Some((std::mem::take(&mut self.count), folded))
    }

    /// [`SummedLog::add`], and when `ending` (nothing comes later) what waits, due or not.
    pub(crate) fn add_or_end(
        &mut self,
        count: u64,
        now: Instant,
        ending: bool,
    ) -> Option<(u64, u64)> {
        self.add(count, now)
            .or_else(|| if ending { self.take() } else { None })
    }

    /// What waits for a line, due or not (the subscription ends):
    /// `Some((lost since the last line, occurrences not written on a line of their own))`.
    pub(crate) fn take(&mut self) -> Option<(u64, u64)> {
        let folded = std::mem::take(&mut self.times);
        (self.count > 0).then(|| (std::mem::take(&mut self.count), folded))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first loss is written at once; those within `every` wait, and are written summed once
    /// `every` has passed, even with nothing new lost then (a sweep), or when the warnings end.
    #[test]
    fn a_summed_log_writes_the_first_at_once_and_sums_the_rest() {
        let every = Duration::from_secs(5);
        let start = Instant::now();
        let mut log = SummedLog::new(every);
        assert_eq!(log.add(1, start), Some((1, 0)));
        assert!(!log.waiting(), "written");
        assert_eq!(log.add(2, start + Duration::from_secs(1)), None);
        assert!(
            log.waiting(),
            "a line is due for it: a waiting subscriber needs a timer"
        );
        assert_eq!(log.add(3, start + Duration::from_secs(2)), None);
        assert_eq!(log.add(0, start + Duration::from_secs(4)), None);
        assert_eq!(log.add(0, start + every), Some((5, 2)));
        assert!(!log.waiting(), "written");
        assert_eq!(log.add(0, start + every * 3), None, "nothing waits");
        // After a quiet spell, a loss is written at once again.
        assert_eq!(log.add(4, start + every * 3), Some((4, 0)));
        assert_eq!(log.add(1, start + every * 3), None);
        assert_eq!(log.take(), Some((1, 1)));
        assert_eq!(log.take(), None);
    }
}
