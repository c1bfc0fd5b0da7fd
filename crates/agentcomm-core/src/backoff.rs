//! Exponential backoff with jitter: for handler retries and for backends' reconnects.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff: `initial`, then times `multiplier` per attempt, capped at `max`, each delay
/// shortened by a random part of up to `jitter` (0 to 1) so that many clients do not retry in step.
///
/// ```
/// use std::time::Duration;
/// use agentcomm_core::backoff::Backoff;
///
/// let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5)).jitter(0.0);
/// assert_eq!(backoff.delay(1), Duration::from_millis(100));
/// assert_eq!(backoff.delay(2), Duration::from_millis(200));
/// assert_eq!(backoff.delay(10), Duration::from_secs(5));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: f64,
}

impl Default for Backoff {
    /// 100 ms doubling up to 30 s, with 20% jitter.
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// Starts at `initial` and doubles up to `max`, with 20% jitter. A `max` below `initial` is taken
    /// as `initial`: every delay is then `initial` (check the order of the two arguments).
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            ..Self::default()
        }
    }

    /// Sets the growth factor per attempt (at least 1).
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = if multiplier.is_finite() {
            multiplier.max(1.0)
        } else {
            2.0
        };
        self
    }

    /// Sets the jitter: each delay is shortened by a random part of up to this fraction (0 to 1).
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// The first delay.
    pub fn initial(&self) -> Duration {
        self.initial
    }

    /// The longest delay.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The delay after failed attempt number `attempt` (from 1).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let full = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = full.min(self.max.as_secs_f64());
        let jittered = if self.jitter > 0.0 {
            capped * (1.0 - self.jitter * rand::rng().random::<f64>())
        } else {
            capped
        };
        // In seconds as an f64, `Duration::MAX` rounds up to 2^64 s, one more than a Duration holds:
        // a delay capped there would not convert back. Nor may rounding make a delay above `max`.
        Duration::try_from_secs_f64(jittered.max(0.0))
            .unwrap_or(self.max)
            .min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps_and_jitter_only_shortens() {
        let backoff =
            Backoff::new(Duration::from_millis(10), Duration::from_millis(1000)).jitter(0.5);
        for attempt in 1..20 {
            let plain = Backoff::new(Duration::from_millis(10), Duration::from_millis(1000))
                .jitter(0.0)
                .delay(attempt);
            let delay = backoff.delay(attempt);
            assert!(
                delay <= plain && delay >= plain / 2,
                "attempt {attempt}: {delay:?} vs {plain:?}"
            );
        }
        assert_eq!(
            Backoff::new(Duration::from_millis(10), Duration::from_millis(1000))
                .jitter(0.0)
                .delay(u32::MAX),
            Duration::from_millis(1000)
        );
    }

    /// `Duration::MAX` as the longest delay ("back off as far as it goes"): in seconds as an f64 it
    /// is 2^64, which `Duration::from_secs_f64` refuses, so a delay that reached it panicked, in a
    /// reconnect loop from the 22nd failed attempt with a multiplier of 10, from the 65th with the default
    /// one and a first delay of 1 s.
    #[test]
    fn a_longest_delay_of_duration_max_does_not_panic() {
        let cases = [
            Backoff::new(Duration::from_millis(100), Duration::MAX)
                .multiplier(10.0)
                .jitter(0.0),
            Backoff::new(Duration::from_secs(1), Duration::MAX).jitter(0.0),
            Backoff::new(Duration::MAX, Duration::MAX).jitter(0.0),
        ];
        for backoff in cases {
            for attempt in [1, 2, 20, 21, 64, 65, 66, u32::MAX] {
                let delay = std::panic::catch_unwind(|| backoff.delay(attempt))
                    .unwrap_or_else(|_| panic!("{backoff:?}: delay({attempt}) panicked"));
                assert!(delay >= backoff.initial(), "{backoff:?}: {delay:?}");
            }
            assert_eq!(backoff.delay(u32::MAX), Duration::MAX, "{backoff:?}");
        }
        // With jitter, every delay still converts and stays at most the longest.
        let jittered = Backoff::new(Duration::MAX, Duration::MAX).jitter(0.5);
        for attempt in 1..100 {
            assert!(jittered.delay(attempt) >= Duration::MAX / 3);
        }
    }
}
