//! Sequence numbers that let pub/sub count exactly what it lost.
//!
//! Redis pub/sub forgets a message the moment it is sent: one published while a subscriber reconnects,
//! or still in a socket buffer when a connection is cut, is gone without a trace. So every agentcomm
//! publisher numbers its messages per channel (header [`SEQUENCE_HEADER`], `<publisher id>/<number>`),
//! and every subscriber follows each publisher's numbers: a number that never arrives is counted as
//! `lost`, a number that arrives twice (a publish that fred wrote again after a reconnect, or a message
//! matched by two overlapping Redis patterns) is discarded and counted as a duplicate.
//!
//! Publishes of one channel may overtake each other on their way (concurrent publishes), so a gap is
//! counted as lost only when it stays open longer than the reorder window.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ops::Range;

use crate::hashing::FastState;
use std::time::{Duration, Instant};

/// The header that carries a pub/sub message's sequence number. Removed before delivery.
pub const SEQUENCE_HEADER: &str = "agentcomm-seq";

/// When it follows more than [`KEEP_TRACKS`] sequences, a subscriber forgets a publisher's channel after
/// this long without a message from it. A publish fred writes again after a reconnect comes within the
/// publisher's command timeout (30 s by default), long before.
const TRACK_IDLE: Duration = Duration::from_secs(300);
/// Up to this many sequences are kept however long they stay idle; beyond it, those idle for
/// [`TRACK_IDLE`] are forgotten.
const KEEP_TRACKS: usize = 1024;
/// Arrivals held past a gap before the gap is settled regardless of the window; also the most numbers
/// below the first one seen that are remembered.
const MAX_AHEAD: usize = 4096;

pub(crate) fn new_publisher_id() -> String {
    let uuid = uuid::Uuid::new_v4().simple().to_string();
    uuid[..16].to_string()
}

/// A [`SEQUENCE_HEADER`] value, `<publisher id>/<number>`, written on the stack: made for every pub/sub
/// publish, it needs neither an allocation nor `fmt` (the publisher's prefix is 17 bytes, a number at
/// most 20 digits; a longer prefix than [`SequenceText::CAPACITY`] allows is kept on the heap).
pub(crate) enum SequenceText {
    /// The text in the first `len` bytes.
    Inline {
        bytes: [u8; Self::CAPACITY],
        len: u8,
    },
    /// A prefix too long for the inline buffer.
    Heap(String),
}

impl SequenceText {
    /// The most bytes held without an allocation.
    pub(crate) const CAPACITY: usize = 48;

    /// `prefix` (the publisher's id and `/`) followed by `number` in decimal.
    pub(crate) fn new(prefix: &str, number: u64) -> Self {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut rest = number;
        loop {
            at -= 1;
            digits[at] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        let digits = &digits[at..];
        let len = prefix.len() + digits.len();
        if len > Self::CAPACITY {
            let mut text = String::with_capacity(len);
            text.push_str(prefix);
            // Only ASCII digits.
            text.extend(digits.iter().map(|digit| char::from(*digit)));
            return SequenceText::Heap(text);
        }
        let mut bytes = [0u8; Self::CAPACITY];
        bytes[..prefix.len()].copy_from_slice(prefix.as_bytes());
        bytes[prefix.len()..len].copy_from_slice(digits);
        SequenceText::Inline {
            bytes,
            len: len as u8,
        }
    }
}

impl AsRef<str> for SequenceText {
    fn as_ref(&self) -> &str {
        match self {
            // A `str` prefix followed by ASCII digits: always UTF-8.
            SequenceText::Inline { bytes, len } => std::str::from_utf8(&bytes[..usize::from(*len)])
                .expect("a str followed by ASCII digits"),
            SequenceText::Heap(text) => text,
        }
    }
}

/// What a subscriber makes of an arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Not seen before: deliver it.
    New,
    /// Seen before: discard it.
    Duplicate,
    /// Not seen before, but its gap was counted as lost already (it came later than the reorder
    /// window): deliver it, and take it off the count of lost messages.
    Late,
}

struct Track {
    /// Every number below this one arrived or was counted as lost.
    base: u64,
    /// Numbers at or above `base` that arrived.
    ahead: BTreeSet<u64>,
    /// Since when the gap below the first of `ahead` is open.
    gap_since: Option<Instant>,
    /// The first number seen. Numbers below it were never expected: one that arrives (overtaken by
    /// later ones, or a publish fred wrote again after a reconnect, however late) was not seen before
    /// and is delivered, and kept in `early` so that a second copy of it is a duplicate.
    first: u64,
    /// Numbers below `first` that arrived (at most [`MAX_AHEAD`], the lowest forgotten first).
    early: BTreeSet<u64>,
    /// Numbers counted as lost (at most [`MAX_AHEAD`], the lowest forgotten first): one that arrives
    /// after all is [`Verdict::Late`], not a duplicate: it was never delivered.
    lost: LostNumbers,
    last_seen: Instant,
}

/// The numbers a track counted as lost, kept as its gaps: a gap costs one range however long it is, so
/// a subscriber that was cut off keeps a few bytes per publisher channel, not a number each (a set of
/// 4,096 numbers took 80 KB, kept for as long as the track, on each of up to 1,024 tracks of every
/// subscription; and settling a gap inserted up to 4,096 numbers, so that `finish` with 4,095 long
/// gaps open stalled the subscription's drop for seconds). At most [`MAX_AHEAD`] numbers, the lowest forgotten first: of a longer gap (a
/// reconnection) only its last numbers, the likeliest to come late.
#[derive(Default)]
struct LostNumbers {
    /// Disjoint, none empty, in ascending order.
    gaps: VecDeque<Range<u64>>,
    /// How many numbers `gaps` holds.
    count: usize,
}

impl LostNumbers {
    /// Remembers `gap`, above every number remembered; makes room first, so that at most
    /// [`MAX_AHEAD`] numbers (and as many gaps) are ever held.
    fn add(&mut self, gap: Range<u64>) {
        debug_assert!(self.gaps.back().is_none_or(|last| last.end <= gap.start));
        let kept = (gap.end.saturating_sub(gap.start)).min(MAX_AHEAD as u64);
        if kept == 0 {
            return;
        }
        let gap = gap.end - kept..gap.end;
        // At most MAX_AHEAD: fits a usize.
        let kept = kept as usize;
        let mut excess = (self.count + kept).saturating_sub(MAX_AHEAD);
        while excess > 0 {
            let Some(lowest) = self.gaps.front_mut() else {
                break;
            };
            // A gap held is at most MAX_AHEAD long.
            let len = (lowest.end - lowest.start) as usize;
            if len <= excess {
                self.gaps.pop_front();
                self.count -= len;
                excess -= len;
            } else {
                lowest.start += excess as u64;
                self.count -= excess;
                excess = 0;
            }
        }
        self.gaps.push_back(gap);
        self.count += kept;
    }

    /// Forgets `seq`; whether it was remembered.
    fn take(&mut self, seq: u64) -> bool {
        // The gap that would hold it: the last one starting at or below it.
        let Some(at) = self
            .gaps
            .partition_point(|gap| gap.start <= seq)
            .checked_sub(1)
        else {
            return false;
        };
        let gap = self.gaps[at].clone();
        if seq >= gap.end {
            return false;
        }
        self.count -= 1;
        match (gap.start < seq, seq + 1 < gap.end) {
            (false, false) => {
                self.gaps.remove(at);
            }
            (true, false) => self.gaps[at].end = seq,
            (false, true) => self.gaps[at].start = seq + 1,
            (true, true) => {
                self.gaps[at].end = seq;
                self.gaps.insert(at + 1, seq + 1..gap.end);
            }
        }
        true
    }
}

#[cfg(test)]
impl LostNumbers {
    /// The memory taken by what is remembered, not counting the track itself.
    fn held_bytes(&self) -> usize {
        self.gaps.capacity() * std::mem::size_of::<Range<u64>>()
    }
}

/// The subscriber side: follows every (publisher, channel) sequence seen.
pub(crate) struct SequenceTracker {
    window: Duration,
    /// By publisher, then channel: looked up with `&str`, without allocating. Hashed with the keyed
    /// fast hash: two lookups per message, and SipHash was 1.6% of a pub/sub client's instructions.
    tracks: HashMap<String, HashMap<String, Track, FastState>, FastState>,
    last_sweep: Instant,
    /// The channels of the gaps the last [`sweep`](Self::sweep) or [`finish`](Self::finish) settled as
    /// lost (at most [`MAX_LOST_CHANNELS`]), for the warning to name them.
    lost_on: Vec<String>,
    /// Whether gaps on other channels than `lost_on`'s were settled too (the list was full).
    lost_on_more: bool,
    /// How many tracks have a gap open: while none has, a sweep has nothing to settle.
    open_gaps: usize,
}

/// How many channels [`SequenceTracker::take_lost_on`] names at most.
pub(crate) const MAX_LOST_CHANNELS: usize = 8;

/// Adds `channel` to `lost_on` unless it is there; when the list is full, notes in `more` that
/// there were others.
#[cold]
pub(crate) fn note_lost_on(lost_on: &mut Vec<String>, more: &mut bool, channel: &str) {
    if !lost_on.iter().any(|known| known == channel) {
        if lost_on.len() < MAX_LOST_CHANNELS {
            lost_on.push(channel.to_string());
        } else {
            *more = true;
        }
    }
}

impl SequenceTracker {
    pub(crate) fn new(window: Duration) -> Self {
        SequenceTracker {
            window,
            tracks: HashMap::default(),
            last_sweep: Instant::now(),
            lost_on: Vec::new(),
            lost_on_more: false,
            open_gaps: 0,
        }
    }

    /// Whether a gap is open in some sequence: one a [`sweep`](Self::sweep) may settle as lost once it is
    /// older than the window. Without one, a subscriber waiting for messages needs no timer to sweep.
    pub(crate) fn has_open_gaps(&self) -> bool {
        self.open_gaps > 0
    }

    /// Records the arrival of `header` (a [`SEQUENCE_HEADER`] value) on `channel`. Returns the verdict and
    /// how many messages this arrival proved lost.
    pub(crate) fn observe(&mut self, channel: &str, header: &str, now: Instant) -> (Verdict, u64) {
        let Some((publisher, number)) = header.rsplit_once('/') else {
            return (Verdict::New, 0);
        };
        // No publisher reaches the largest number (its successor would overflow): a frame of
        // another program, taken as unnumbered.
        let Some(seq) = number.parse::<u64>().ok().filter(|seq| *seq < u64::MAX) else {
            return (Verdict::New, 0);
        };
        let channels = match self.tracks.get_mut(publisher) {
            Some(channels) => channels,
            None => self.tracks.entry(publisher.to_string()).or_default(),
        };
        let Some(track) = channels.get_mut(channel) else {
            channels.insert(
                channel.to_string(),
                Track {
                    base: seq + 1,
                    ahead: BTreeSet::new(),
                    gap_since: None,
                    first: seq,
                    early: BTreeSet::new(),
                    lost: LostNumbers::default(),
                    last_seen: now,
                },
            );
            return (Verdict::New, 0);
        };
        track.last_seen = now;
        let was_open = track.gap_since.is_some();
        let verdict = if seq < track.base {
            // Below the first number seen: an earlier message overtaken by a later one, or sent again,
            // that this subscriber never saw, however long after the first one it comes. (Only what
            // was seen is a duplicate.)
            if seq < track.first && track.early.insert(seq) {
                if track.early.len() > MAX_AHEAD {
                    track.early.pop_first();
                }
                Verdict::New
            } else if track.lost.take(seq) {
                Verdict::Late
            } else {
                Verdict::Duplicate
            }
        } else if seq == track.base {
            track.base += 1;
            while track.ahead.remove(&track.base) {
                track.base += 1;
            }
            if track.ahead.is_empty() {
                track.gap_since = None;
            }
            Verdict::New
        } else if track.ahead.insert(seq) {
            track.gap_since.get_or_insert(now);
            Verdict::New
        } else {
            Verdict::Duplicate
        };
        let lost = settle(track, now, self.window);
        match (was_open, track.gap_since.is_some()) {
            (false, true) => self.open_gaps += 1,
            (true, false) => self.open_gaps = self.open_gaps.saturating_sub(1),
            _ => {}
        }
        (verdict, lost)
    }

    /// Settles every gap older than the window and, when more than [`KEEP_TRACKS`] sequences are
    /// followed, forgets those idle for [`TRACK_IDLE`]; returns how many messages were proved lost.
    ///
    /// A sequence is not forgotten for being idle alone: the flow may only be paused (a subscriber cut
    /// off for minutes while its publishers go on, a publisher that sends now and then), and its gap is
    /// counted when it resumes.
    pub(crate) fn sweep(&mut self, now: Instant) -> u64 {
        self.last_sweep = now;
        let window = self.window;
        let mut lost = 0u64;
        let lost_on = &mut self.lost_on;
        let more = &mut self.lost_on_more;
        let forget = self.tracks.values().map(HashMap::len).sum::<usize>() > KEEP_TRACKS;
        let mut open_gaps = 0;
        self.tracks.retain(|_, channels| {
            channels.retain(|channel, track| {
                let settled = settle(track, now, window);
                if settled > 0 {
                    note_lost_on(lost_on, more, channel);
                }
                lost = lost.saturating_add(settled);
                let keep = !forget || now.duration_since(track.last_seen) < TRACK_IDLE;
                if keep && track.gap_since.is_some() {
                    open_gaps += 1;
                }
                keep
            });
            !channels.is_empty()
        });
        self.open_gaps = open_gaps;
        lost
    }

    /// The channels of the gaps settled as lost since this was last called, for the warning that
    /// counts them (at most [`MAX_LOST_CHANNELS`]), and whether there were more.
    pub(crate) fn take_lost_on(&mut self) -> (Vec<String>, bool) {
        (
            std::mem::take(&mut self.lost_on),
            std::mem::take(&mut self.lost_on_more),
        )
    }
}

impl SequenceTracker {
    /// Settles every gap still open, however young: the subscription that follows these sequences
    /// ends, and will never receive what is missing below numbers it received. Returns how many
    /// messages that is.
    pub(crate) fn finish(&mut self, now: Instant) -> u64 {
        let mut lost = 0u64;
        for channels in self.tracks.values_mut() {
            for (channel, track) in channels.iter_mut() {
                let settled = settle(track, now, Duration::ZERO);
                if settled > 0 {
                    note_lost_on(&mut self.lost_on, &mut self.lost_on_more, channel);
                }
                lost = lost.saturating_add(settled);
            }
        }
        // A window of zero settles every gap.
        self.open_gaps = 0;
        lost
    }
}

/// Closes the gap of `track` if it stayed open longer than `window` (or too much arrived past it).
fn settle(track: &mut Track, now: Instant, window: Duration) -> u64 {
    let mut lost = 0;
    while let Some(since) = track.gap_since {
        if now.duration_since(since) < window && track.ahead.len() < MAX_AHEAD {
            break;
        }
        let Some(&first) = track.ahead.first() else {
            track.gap_since = None;
            break;
        };
        lost += first - track.base;
        // Remembered, so that one arriving after all is delivered (late) rather than discarded as a
        // duplicate.
        track.lost.add(track.base..first);
        track.base = first;
        while track.ahead.remove(&track.base) {
            track.base += 1;
        }
        track.gap_since = if track.ahead.is_empty() {
            None
        } else {
            Some(now)
        };
    }
    lost
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(publisher: &str, seq: u64) -> String {
        format!("{publisher}/{seq}")
    }

    #[test]
    fn in_order_arrivals_lose_nothing_and_repeats_are_duplicates() {
        let mut tracker = SequenceTracker::new(Duration::from_millis(100));
        let now = Instant::now();
        for seq in 1..=5 {
            assert_eq!(
                tracker.observe("c", &header("p", seq), now),
                (Verdict::New, 0)
            );
        }
        assert_eq!(
            tracker.observe("c", &header("p", 3), now),
            (Verdict::Duplicate, 0)
        );
        assert_eq!(tracker.sweep(now + Duration::from_secs(1)), 0);
    }

    #[test]
    fn a_gap_is_lost_only_after_the_window() {
        let window = Duration::from_millis(100);
        let mut tracker = SequenceTracker::new(window);
        let t0 = Instant::now();
        tracker.observe("c", &header("p", 1), t0);
        // 2 and 3 overtaken by 4: not lost yet.
        assert_eq!(tracker.observe("c", &header("p", 4), t0), (Verdict::New, 0));
        assert_eq!(tracker.observe("c", &header("p", 2), t0), (Verdict::New, 0));
        assert_eq!(tracker.sweep(t0 + window / 2), 0);
        // 3 does not come within the window.
        assert_eq!(tracker.sweep(t0 + window * 2), 1);
        // When it comes after all, it was never delivered: late, not a repeat; a second copy is one.
        assert_eq!(
            tracker.observe("c", &header("p", 3), t0 + window * 3),
            (Verdict::Late, 0)
        );
        assert_eq!(
            tracker.observe("c", &header("p", 3), t0 + window * 3),
            (Verdict::Duplicate, 0)
        );
        // A later gap is counted when the next arrival finds it old.
        tracker.observe("c", &header("p", 10), t0 + window * 3);
        assert_eq!(
            tracker.observe("c", &header("p", 11), t0 + window * 5),
            (Verdict::New, 5)
        );
    }

    /// The warning names up to [`MAX_LOST_CHANNELS`] channels of the gaps it counts, and says when
    /// there were others (it named eight and left the rest unsaid).
    #[test]
    fn the_channels_of_the_gaps_are_named_and_others_are_said() {
        let window = Duration::from_millis(100);
        let mut tracker = SequenceTracker::new(window);
        let t0 = Instant::now();
        let channels: Vec<String> = (0..MAX_LOST_CHANNELS + 2)
            .map(|i| format!("A:event:s{i}"))
            .collect();
        for channel in &channels {
            tracker.observe(channel, &header("p", 1), t0);
            tracker.observe(channel, &header("p", 3), t0);
        }
        assert_eq!(tracker.sweep(t0 + window * 2), channels.len() as u64);
        let (named, more) = tracker.take_lost_on();
        assert_eq!(named.len(), MAX_LOST_CHANNELS);
        assert!(
            named.iter().all(|name| channels.contains(name)),
            "{named:?}"
        );
        assert!(more, "ten channels lost messages, eight were named");
        assert_eq!(tracker.take_lost_on(), (Vec::new(), false));
        // Eight or fewer: all named, no others.
        for channel in &channels[..3] {
            tracker.observe(channel, &header("p", 5), t0 + window * 3);
        }
        assert_eq!(tracker.sweep(t0 + window * 6), 3);
        let (named, more) = tracker.take_lost_on();
        assert_eq!((named.len(), more), (3, false));
    }

    /// Of a gap longer than [`MAX_AHEAD`] (a subscriber cut off for a while), only the last numbers are
    /// remembered as lost: those may still come late; one below them is taken for a repeat.
    #[test]
    fn of_a_long_gap_the_last_numbers_counted_lost_are_remembered() {
        let window = Duration::from_millis(100);
        let mut tracker = SequenceTracker::new(window);
        let t0 = Instant::now();
        tracker.observe("c", &header("p", 1), t0);
        let last = MAX_AHEAD as u64 * 2;
        tracker.observe("c", &header("p", last + 1), t0);
        assert_eq!(tracker.sweep(t0 + window * 2), last - 1);
        let now = t0 + window * 3;
        for seq in [last, last - MAX_AHEAD as u64 + 1] {
            assert_eq!(
                tracker.observe("c", &header("p", seq), now),
                (Verdict::Late, 0),
                "{seq}"
            );
        }
        assert_eq!(
            tracker.observe("c", &header("p", last - MAX_AHEAD as u64), now),
            (Verdict::Duplicate, 0)
        );
        assert_eq!(
            tracker.observe("c", &header("p", 1), now),
            (Verdict::Duplicate, 0)
        );
    }

    /// A subscriber cut off for a while counts a long gap on every publisher channel it follows; what
    /// it remembers of them to tell a late arrival costs a few bytes per channel, however long the gaps.
    /// Before, each track kept a set of the last 4,096 numbers of its gap (80 KB), for as long as the
    /// track: up to 80 MB for the 1,024 tracks a subscription keeps however idle, and as much again
    /// for each of the router's subscriptions.
    #[test]
    fn long_gaps_cost_little_memory() {
        let window = Duration::from_millis(100);
        let mut tracker = SequenceTracker::new(window);
        let t0 = Instant::now();
        for channel in 0..KEEP_TRACKS {
            let channel = channel.to_string();
            tracker.observe(&channel, &header("p", 1), t0);
            tracker.observe(&channel, &header("p", 1_000_000), t0);
        }
        assert_eq!(tracker.sweep(t0 + window * 2), KEEP_TRACKS as u64 * 999_998);
        let held: usize = tracker
            .tracks
            .values()
            .flat_map(HashMap::values)
            .map(|track| track.lost.held_bytes())
            .sum();
        assert!(
            held <= KEEP_TRACKS * 128,
            "{held} bytes remembered for {KEEP_TRACKS} gaps"
        );
        // Still told apart: the last numbers of each gap are late, older ones taken for repeats.
        assert_eq!(
            tracker.observe("7", &header("p", 999_999), t0 + window * 3),
            (Verdict::Late, 0)
        );
        assert_eq!(
            tracker.observe("7", &header("p", 2), t0 + window * 3),
            (Verdict::Duplicate, 0)
        );
    }

    /// Numbers of several gaps arrive late in any order, splitting the gaps they come from; each is
    /// late once. Beyond [`MAX_AHEAD`] numbers remembered, the lowest are forgotten.
    #[test]
    fn late_numbers_split_their_gaps_and_the_lowest_are_forgotten() {
        let mut lost = LostNumbers::default();
        lost.add(10..20);
        lost.add(30..31);
        lost.add(40..50);
        for seq in [15, 14, 16, 10, 19, 30, 49, 40] {
            assert!(lost.take(seq), "{seq}");
            assert!(!lost.take(seq), "{seq} again");
        }
        for seq in [9, 20, 29, 31, 39, 50, u64::MAX] {
            assert!(!lost.take(seq), "{seq} was never lost");
        }
        assert_eq!(lost.count, 21 - 8);
        assert_eq!(lost.gaps, [11..14, 17..19, 41..49]);
        // Room is made by forgetting the lowest: all of 11..14, 17..19, and 41.
        lost.add(100..100 + MAX_AHEAD as u64 - 7);
        assert_eq!(lost.count, MAX_AHEAD);
        assert_eq!(lost.gaps.front(), Some(&(42..49)));
        assert!(!lost.take(41) && lost.take(42));
        // A gap longer than MAX_AHEAD keeps only its last numbers, and forgets all before.
        lost.add(10_000..20_000);
        assert_eq!(lost.count, MAX_AHEAD);
        assert_eq!(lost.gaps.len(), 1);
        assert_eq!(lost.gaps[0], 20_000 - MAX_AHEAD as u64..20_000);
        lost.add(30_000..30_000);
        assert_eq!(lost.gaps.len(), 1, "an empty gap is not kept");
    }

    /// A flow that pauses longer than the idle time (a subscriber cut off for minutes while its
    /// publishers go on, or a publisher that sends every ten minutes) still has its gap counted when
    /// it resumes. Before, the sweep forgot every sequence idle for 5 minutes, however few were
    /// followed, and the messages missing across the pause were never counted.
    #[test]
    fn a_gap_across_a_long_pause_is_still_counted() {
        let window = Duration::from_millis(100);
        let mut tracker = SequenceTracker::new(window);
        let t0 = Instant::now();
        tracker.observe("c", &header("p", 1), t0);
        tracker.observe("d", &header("q", 7), t0);
        // The subscriber sweeps all along while nothing comes.
        let later = t0 + TRACK_IDLE * 3;
        assert_eq!(tracker.sweep(later), 0);
        // 2 to 4 were published meanwhile and never arrived.
        assert_eq!(
            tracker.observe("c", &header("p", 5), later),
            (Verdict::New, 0)
        );
        assert_eq!(tracker.sweep(later + window * 2), 3);
        assert_eq!(
            tracker.observe("d", &header("q", 7), later),
            (Verdict::Duplicate, 0)
        );
    }

    /// A number below the first one seen that arrives after the reorder window was never seen: it is
    /// delivered (and a second copy of it is a duplicate). Before, it was discarded as a duplicate.
    #[test]
    fn a_number_below_the_first_arriving_late_is_new() {
        let window = Duration::from_millis(100);
        let mut tracker = SequenceTracker::new(window);
        let t0 = Instant::now();
        tracker.observe("c", &header("p", 5), t0);
        let late = t0 + window * 5;
        assert_eq!(
            tracker.observe("c", &header("p", 4), late),
            (Verdict::New, 0)
        );
        assert_eq!(
            tracker.observe("c", &header("p", 4), late),
            (Verdict::Duplicate, 0)
        );
        assert_eq!(tracker.sweep(late + window * 2), 0);
    }

    /// Beyond [`KEEP_TRACKS`] sequences, those idle for [`TRACK_IDLE`] are forgotten (publishers that
    /// restarted leave theirs behind): memory stays bounded.
    #[test]
    fn many_idle_sequences_are_forgotten() {
        let mut tracker = SequenceTracker::new(Duration::from_millis(100));
        let t0 = Instant::now();
        for publisher in 0..KEEP_TRACKS + 10 {
            tracker.observe("c", &header(&publisher.to_string(), 1), t0);
        }
        tracker.observe("c", &header("live", 1), t0 + TRACK_IDLE);
        tracker.sweep(t0 + TRACK_IDLE * 2 - Duration::from_secs(1));
        assert_eq!(tracker.tracks.len(), 1, "only the live one stays");
    }

    /// A number no publisher reaches (`u64::MAX`, in a frame of another program) is taken as no number.
    /// Before, it overflowed the next expected number: a panic in a debug build, and in a release
    /// build a sequence that started again at 0.
    #[test]
    fn the_largest_number_is_taken_as_none() {
        let mut tracker = SequenceTracker::new(Duration::from_millis(100));
        let now = Instant::now();
        let largest = header("p", u64::MAX);
        assert_eq!(tracker.observe("c", &largest, now), (Verdict::New, 0));
        assert_eq!(tracker.observe("c", &largest, now), (Verdict::New, 0));
        assert_eq!(
            tracker.observe("c", &header("p", 1), now),
            (Verdict::New, 0)
        );
        assert_eq!(
            tracker.observe("c", &header("p", 1), now),
            (Verdict::Duplicate, 0)
        );
    }

    /// Gaps of several sequences are added without overflowing: frames of another program may carry
    /// any number, and a gap of almost `u64::MAX` on two channels overflowed the sum (a panic in a
    /// debug build, in the reader's drop, where `finish` runs).
    #[test]
    fn the_gaps_of_several_sequences_add_up_without_overflowing() {
        let now = Instant::now();
        let gaps = || {
            let mut tracker = SequenceTracker::new(Duration::from_millis(500));
            for channel in ["c", "d"] {
                tracker.observe(channel, &header("p", 0), now);
                tracker.observe(channel, &header("p", u64::MAX - 1), now);
            }
            tracker
        };
        assert_eq!(gaps().finish(now), u64::MAX);
        assert_eq!(gaps().sweep(now + Duration::from_secs(1)), u64::MAX);
    }

    /// Whether a gap is open decides whether a waiting subscriber arms a timer to sweep: it must say
    /// yes from the first gap to the last one closed, however they close (the missing message
    /// arriving, a sweep settling it as lost, the end).
    #[test]
    fn open_gaps_are_known_until_each_is_closed() {
        let window = Duration::from_secs(1);
        let mut tracker = SequenceTracker::new(window);
        let now = Instant::now();
        tracker.observe("c", &header("p", 1), now);
        tracker.observe("c", &header("p", 2), now);
        assert!(!tracker.has_open_gaps(), "in order");
        tracker.observe("c", &header("p", 4), now);
        tracker.observe("d", &header("p", 1), now);
        tracker.observe("d", &header("p", 3), now);
        assert!(tracker.has_open_gaps(), "3 and 2 missing");
        tracker.observe("c", &header("p", 3), now);
        assert!(tracker.has_open_gaps(), "2 still missing on d");
        assert_eq!(tracker.sweep(now), 0, "within the window");
        assert!(
            tracker.has_open_gaps(),
            "a sweep within the window leaves it open"
        );
        tracker.observe("d", &header("q", 1), now);
        tracker.observe("d", &header("q", 5), now);
        assert_eq!(
            tracker.sweep(now + window),
            4,
            "2 on d from p, 2 to 4 from q"
        );
        assert!(!tracker.has_open_gaps(), "settled by the sweep");
        tracker.observe("c", &header("p", 7), now + window);
        assert!(tracker.has_open_gaps(), "5 and 6 missing");
        assert_eq!(tracker.finish(now + window), 2);
        assert!(!tracker.has_open_gaps(), "settled by the end");
    }

    #[test]
    fn finishing_settles_every_open_gap() {
        let mut tracker = SequenceTracker::new(Duration::from_secs(60));
        let now = Instant::now();
        for seq in [1, 3, 6] {
            tracker.observe("c", &header("p", seq), now);
        }
        tracker.observe("d", &header("q", 1), now);
        tracker.observe("d", &header("q", 2), now);
        assert_eq!(tracker.sweep(now), 0, "within the window");
        assert_eq!(tracker.finish(now), 3, "2, 4 and 5");
        assert_eq!(tracker.finish(now), 0, "counted once");
    }

    #[test]
    fn sequence_texts_are_the_prefix_and_the_number_in_decimal() {
        for number in [0, 1, 9, 10, 12_345, u64::MAX] {
            let text = SequenceText::new("0123456789abcdef/", number);
            assert_eq!(text.as_ref(), format!("0123456789abcdef/{number}"));
            assert!(
                matches!(text, SequenceText::Inline { .. }),
                "a publisher's prefix and any number fit without an allocation"
            );
        }
        let long = "p".repeat(SequenceText::CAPACITY);
        assert_eq!(SequenceText::new(&long, 7).as_ref(), format!("{long}7"));
    }

    #[test]
    fn publishers_and_channels_are_followed_apart() {
        let mut tracker = SequenceTracker::new(Duration::ZERO);
        let now = Instant::now();
        tracker.observe("a", &header("p", 1), now);
        tracker.observe("b", &header("p", 7), now);
        tracker.observe("a", &header("q", 3), now);
        assert_eq!(
            tracker.observe("a", &header("p", 2), now),
            (Verdict::New, 0)
        );
        assert_eq!(
            tracker.observe("b", &header("p", 8), now),
            (Verdict::New, 0)
        );
        assert_eq!(
            tracker.observe("a", &header("q", 4), now),
            (Verdict::New, 0)
        );
        // Numbers below the first seen: overtaken, not duplicates.
        let mut tracker = SequenceTracker::new(Duration::from_secs(1));
        tracker.observe("a", &header("p", 5), now);
        assert_eq!(
            tracker.observe("a", &header("p", 4), now),
            (Verdict::New, 0)
        );
        assert_eq!(
            tracker.observe("a", &header("p", 4), now),
            (Verdict::Duplicate, 0)
        );
    }
}
