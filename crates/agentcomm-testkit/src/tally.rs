//! Counting what a delivery test lost, duplicated and reordered.
//!
//! A [`Tally`] knows which messages were sent (each one a *stream* and a *sequence number*: a publisher
//! and its counter, a session and its position, ...) and records what arrived, in arrival order. Its
//! [`TallyReport`] says how many were lost, duplicated or reordered, names the first of each, and
//! reads well in a failure:
//!
//! ```
//! use agentcomm_testkit::tally::Tally;
//!
//! let mut tally = Tally::new("publisher");
//! tally.expect_stream(7, 3); // publisher 7 sent seq 0, 1 and 2
//! tally.record(7, 0);
//! tally.record(7, 2);
//! tally.record(7, 2);
//! let report = tally.report();
//! assert_eq!((report.lost(), report.duplicated(), report.reordered()), (1, 1, 0));
//! assert_eq!(
//!     report.to_string(),
//!     "lost 1 of 3 (first lost: publisher 7 seq 1), duplicated 1 (first duplicate: publisher 7 seq 2), reordered 0"
//! );
//! ```

use std::collections::{BTreeSet, HashMap};
use std::fmt;

/// One message of a tally: its stream (a publisher, session or channel number) and its sequence
/// number within that stream.
pub type Key = (u32, u64);

/// What was sent and what arrived. See the [module documentation](self).
#[derive(Debug, Clone)]
pub struct Tally {
    stream_label: &'static str,
    expected: BTreeSet<Key>,
    arrivals: Vec<Key>,
}

impl Tally {
    /// An empty tally; `stream_label` names the streams in reports (`publisher`, `session`, ...).
    pub fn new(stream_label: &'static str) -> Self {
        Tally {
            stream_label,
            expected: BTreeSet::new(),
            arrivals: Vec::new(),
        }
    }

    /// Expects sequence numbers `0..count` of `stream`.
    pub fn expect_stream(&mut self, stream: u32, count: u64) {
        self.expected.extend((0..count).map(|seq| (stream, seq)));
    }

    /// Expects one message.
    pub fn expect(&mut self, stream: u32, seq: u64) {
        self.expected.insert((stream, seq));
    }

    /// Records an arrival, in arrival order.
    pub fn record(&mut self, stream: u32, seq: u64) {
        self.arrivals.push((stream, seq));
    }

    /// Records several arrivals, in arrival order.
    pub fn record_all(&mut self, arrivals: impl IntoIterator<Item = Key>) {
        self.arrivals.extend(arrivals);
    }

    /// How many messages are expected.
    pub fn expected(&self) -> usize {
        self.expected.len()
    }

    /// How many distinct expected messages have arrived so far.
    pub fn arrived(&self) -> usize {
        self.arrivals
            .iter()
            .filter(|key| self.expected.contains(key))
            .collect::<BTreeSet<_>>()
            .len()
    }

    /// Counts what was lost, duplicated, reordered and unexpected.
    pub fn report(&self) -> TallyReport {
        let mut seen: HashMap<Key, u32> = HashMap::with_capacity(self.arrivals.len());
        let mut highest: HashMap<u32, u64> = HashMap::new();
        let mut report = TallyReport {
            stream_label: self.stream_label,
            expected: self.expected.len(),
            received: self.arrivals.len(),
            lost: 0,
            first_lost: None,
            duplicated: 0,
            first_duplicate: None,
            reordered: 0,
            first_reordered: None,
            unexpected: 0,
            first_unexpected: None,
        };
        for &key in &self.arrivals {
            if !self.expected.contains(&key) {
                report.unexpected += 1;
                report.first_unexpected.get_or_insert(key);
                continue;
            }
            let copies = seen.entry(key).or_insert(0);
            *copies += 1;
            if *copies > 1 {
                report.duplicated += 1;
                report.first_duplicate.get_or_insert(key);
                continue;
            }
            let (stream, seq) = key;
            match highest.get_mut(&stream) {
                Some(high) if seq < *high => {
                    report.reordered += 1;
                    report.first_reordered.get_or_insert((key, *high));
                }
                Some(high) => *high = seq,
                None => {
                    highest.insert(stream, seq);
                }
            }
        }
        for key in &self.expected {
            if !seen.contains_key(key) {
                report.lost += 1;
                report.first_lost.get_or_insert(*key);
            }
        }
        report
    }
}

/// What a [`Tally`] counted. Its `Display` is the sentence a failing test prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TallyReport {
    stream_label: &'static str,
    expected: usize,
    received: usize,
    lost: usize,
    first_lost: Option<Key>,
    duplicated: usize,
    first_duplicate: Option<Key>,
    reordered: usize,
    first_reordered: Option<(Key, u64)>,
    unexpected: usize,
    first_unexpected: Option<Key>,
}

impl TallyReport {
    /// How many messages were expected.
    pub fn expected(&self) -> usize {
        self.expected
    }

    /// How many deliveries arrived (duplicates and unexpected ones included).
    pub fn received(&self) -> usize {
        self.received
    }

    /// Expected messages that never arrived.
    pub fn lost(&self) -> usize {
        self.lost
    }

    /// The first lost message (lowest stream, then lowest sequence number).
    pub fn first_lost(&self) -> Option<Key> {
        self.first_lost
    }

    /// Extra copies of messages that had already arrived.
    pub fn duplicated(&self) -> usize {
        self.duplicated
    }

    /// Messages that arrived after a later message of their stream.
    pub fn reordered(&self) -> usize {
        self.reordered
    }

    /// Arrivals that were never expected (a leak from another channel, or a stale message).
    pub fn unexpected(&self) -> usize {
        self.unexpected
    }

    /// Whether every expected message arrived at least once.
    pub fn is_complete(&self) -> bool {
        self.lost == 0
    }

    /// Whether every expected message arrived exactly once, in order, and nothing else arrived.
    pub fn is_perfect(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.reordered == 0 && self.unexpected == 0
    }

    fn key(&self, (stream, seq): Key) -> String {
        format!("{} {stream} seq {seq}", self.stream_label)
    }
}

impl fmt::Display for TallyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "lost {} of {}", self.lost, self.expected)?;
        if let Some(key) = self.first_lost {
            write!(f, " (first lost: {})", self.key(key))?;
        }
        write!(f, ", duplicated {}", self.duplicated)?;
        if let Some(key) = self.first_duplicate {
            write!(f, " (first duplicate: {})", self.key(key))?;
        }
        write!(f, ", reordered {}", self.reordered)?;
        if let Some((key, after)) = self.first_reordered {
            write!(f, " (first reordered: {} after seq {after})", self.key(key))?;
        }
        if self.unexpected > 0 {
            write!(f, ", unexpected {}", self.unexpected)?;
            if let Some(key) = self.first_unexpected {
                write!(f, " (first unexpected: {})", self.key(key))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_perfect_run_reports_zeroes() {
        let mut tally = Tally::new("session");
        tally.expect_stream(0, 2);
        tally.expect_stream(1, 2);
        tally.record_all([(0, 0), (1, 0), (0, 1), (1, 1)]);
        let report = tally.report();
        assert!(report.is_perfect(), "{report}");
        assert_eq!(report.to_string(), "lost 0 of 4, duplicated 0, reordered 0");
        assert_eq!(tally.arrived(), 4);
    }

    #[test]
    fn reordering_is_counted_per_stream_and_named() {
        let mut tally = Tally::new("session");
        tally.expect_stream(3, 4);
        tally.expect_stream(4, 1);
        // Session 4 interleaving with session 3 is no reordering; 3/1 after 3/2 is.
        tally.record_all([(3, 0), (4, 0), (3, 2), (3, 1), (3, 3)]);
        let report = tally.report();
        assert_eq!(report.reordered(), 1);
        assert!(report.is_complete());
        assert_eq!(
            report.to_string(),
            "lost 0 of 5, duplicated 0, reordered 1 (first reordered: session 3 seq 1 after seq 2)"
        );
    }

    #[test]
    fn losses_duplicates_and_leaks_are_all_reported() {
        let mut tally = Tally::new("channel");
        tally.expect_stream(0, 3);
        tally.record_all([(0, 1), (9, 9), (0, 1)]);
        let report = tally.report();
        assert_eq!(
            (
                report.lost(),
                report.duplicated(),
                report.unexpected(),
                report.received()
            ),
            (2, 1, 1, 3)
        );
        assert_eq!(report.first_lost(), Some((0, 0)));
        assert_eq!(
            report.to_string(),
            "lost 2 of 3 (first lost: channel 0 seq 0), duplicated 1 (first duplicate: channel 0 seq 1), \
             reordered 0, unexpected 1 (first unexpected: channel 9 seq 9)"
        );
        assert!(!report.is_perfect());
    }
}
