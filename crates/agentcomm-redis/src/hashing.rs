//! A fast hasher for the maps touched once or more per message: Streams' held entries and waiting
//! acknowledgements, pub/sub's sequence tracks (by publisher, then channel), and a publisher's routes
//! (pub/sub, by channel) and stream targets (by class). The standard SipHash was 1–2% of the client's
//! instructions. A keyed multiply-and-rotate hash is enough here: its seed is random per map, as the
//! standard one's is, so colliding keys cannot be chosen without knowing it; and every such map is
//! bounded: the Streams maps hold at most a subscription's prefetch of ids Redis assigned, the
//! sequence tracks forget those idle for five minutes beyond 1,024, a publisher's routes are cleared
//! at `MAX_PUBLISHER_CHANNELS`, and its targets are one per class it publishes.

use std::hash::{BuildHasher, Hasher, RandomState};

/// Builds [`FastHasher`]s with a seed drawn once per map.
#[derive(Clone)]
pub(crate) struct FastState {
    seed: u64,
}

impl Default for FastState {
    fn default() -> Self {
        FastState {
            seed: RandomState::new().hash_one(0x5eed_u64),
        }
    }
}

impl BuildHasher for FastState {
    type Hasher = FastHasher;

    fn build_hasher(&self) -> FastHasher {
        FastHasher(self.seed)
    }
}

/// Multiplies in one 64-bit word at a time; `finish` folds the high half of a full product into the
/// low one, so that both the bucket bits and the tag bits (the top seven) depend on every input bit.
pub(crate) struct FastHasher(u64);

const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;
const FOLD: u64 = 0xd6e8_feb8_6659_fd93;

impl FastHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0 ^ word).wrapping_mul(MULTIPLIER).rotate_left(23);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.add(u64::from_le_bytes(chunk.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            // The length goes in too: "a" and "a\0" differ.
            self.add(u64::from_le_bytes(last) ^ ((rest.len() as u64) << 59));
        }
    }

    #[inline]
    fn write_u8(&mut self, value: u8) {
        self.add(u64::from(value));
    }

    #[inline]
    fn write_u64(&mut self, value: u64) {
        self.add(value);
    }

    #[inline]
    fn write_usize(&mut self, value: usize) {
        self.add(value as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        // The high half is folded into the low one before the multiply: without it, about one seed
        // in 8,000 spread consecutive entry ids over only half the buckets a random hash fills (467
        // of 1,024 at worst, in 200,000 seeds; with it, 604 at worst, against some 647 expected).
        let word = self.0 ^ (self.0 >> 32);
        let product = u128::from(word) * u128::from(FOLD);
        (product as u64) ^ ((product >> 64) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Arc;

    #[test]
    fn entries_that_differ_anywhere_hash_apart() {
        let state = FastState::default();
        let key: Arc<str> = Arc::from("agentcomm:stream:PaymentRequest");
        let other: Arc<str> = Arc::from("agentcomm:stream:PaymentRequesu");
        let hash = |key: &Arc<str>, ms: u64, seq: u64| state.hash_one((key.clone(), (ms, seq)));
        let base = hash(&key, 1_764_130_000_000, 0);
        assert_eq!(base, hash(&key, 1_764_130_000_000, 0));
        assert_ne!(base, hash(&other, 1_764_130_000_000, 0));
        assert_ne!(base, hash(&key, 1_764_130_000_001, 0));
        assert_ne!(base, hash(&key, 1_764_130_000_000, 1));
        // Strings that differ only in a trailing zero byte or in where they split.
        assert_ne!(state.hash_one("a"), state.hash_one("a\0"));
        assert_ne!(state.hash_one(("ab", "c")), state.hash_one(("a", "bc")));
    }

    #[test]
    fn consecutive_entry_ids_spread_over_the_tag_and_bucket_bits() {
        // hashbrown takes its bucket from the low bits and a tag from the top seven: consecutive ids
        // (one millisecond, rising sequence numbers, as a busy stream makes them) must vary both.
        let state = FastState::default();
        let key: Arc<str> = Arc::from("agentcomm:stream:PaymentRequest");
        let hashes: Vec<u64> = (0..4096u64)
            .map(|seq| state.hash_one((key.clone(), (1_764_130_000_000u64, seq))))
            .collect();
        // With the seed random, 1,024 hashes leave one of the 128 tag values unused in about 4% of
        // runs even when they spread perfectly; with 4,096, about once in 10^12 runs.
        let tags: HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        let buckets: HashSet<u64> = hashes[..1024].iter().map(|h| h & 1023).collect();
        assert_eq!(tags.len(), 128, "every tag value is used");
        assert!(
            buckets.len() > 550,
            "{} of 1024 buckets used",
            buckets.len()
        );
    }
}
