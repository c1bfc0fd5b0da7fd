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
        Duration::from_secs_f64(jittered.max(0.0))
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
}
