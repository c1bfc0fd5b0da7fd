//! The delay before each give-back grows as the agent's backoff says: between the attempts of a
//! handler that keeps failing, and between the tries to publish a dead letter while its target is
//! down. Measured on Tokio's paused clock, which jumps straight to the next timer: the gaps between
//! attempts are the delays themselves, with no wall-clock sleeping.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentcomm_core::backoff::Backoff;
use agentcomm_core::envelope::headers;
use agentcomm_core::prelude::*;
use agentcomm_core::router::{
    BoxFuture, Capabilities, Health, PublishOutcome, SubscribeOptions, Subscription,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

/// Long enough for any delay here; on the paused clock it costs no real time.
const WAIT: Duration = Duration::from_secs(60);

/// Tokio's timers have a resolution of one millisecond: a delay may end up to that much later.
const TIMER_SLACK: Duration = Duration::from_millis(2);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
struct Job {
    id: u32,
}

#[agent(sends = [Job])]
struct Client;

/// Fails every job (a transient error: retried), and reports when each attempt started.
#[agent(receives = [Job])]
struct AlwaysFailing {
    attempts: mpsc::UnboundedSender<(u32, Instant)>,
}

impl Handle<Job> for AlwaysFailing {
    async fn handle(&self, _: Job, ctx: &Context<Self>) -> HandlerResult {
        let _ = self.attempts.send((ctx.attempt(), Instant::now()));
        Err(HandlerError::msg("the payment service is unavailable"))
    }
}

/// 100 ms, then three times as long per attempt, up to 2 s, with no jitter: 100, 300, 900, 2000, 2000.
fn growing_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100), Duration::from_secs(2))
        .multiplier(3.0)
        .jitter(0.0)
}

/// The gaps between successive instants.
fn gaps(instants: &[Instant]) -> Vec<Duration> {
    instants
        .windows(2)
        .map(|pair| pair[1].duration_since(pair[0]))
        .collect()
}

/// Each gap is the expected delay, give or take the timer's resolution.
fn assert_gaps(what: &str, gaps: &[Duration], expected: &[Duration]) {
    assert_eq!(
        gaps.len(),
        expected.len(),
        "{what}: {gaps:?}, expected {expected:?}"
    );
    for (index, (gap, want)) in gaps.iter().zip(expected).enumerate() {
        assert!(
            *gap >= *want && *gap <= *want + TIMER_SLACK,
            "{what}: delay {} was {gap:?}, expected {want:?} (all: {gaps:?}, expected {expected:?})",
            index + 1
        );
    }
}

fn millis(values: &[u64]) -> Vec<Duration> {
    values.iter().copied().map(Duration::from_millis).collect()
}

#[tokio::test(start_paused = true)]
async fn the_delay_between_attempts_of_a_failing_handler_grows_as_the_backoff_says() {
    let runtime = Runtime::new(MemoryRouter::new());
    let (sender, mut attempts) = mpsc::unbounded_channel();
    let options = AgentOptions::new()
        .max_attempts(6)
        .backoff(growing_backoff());
    runtime
        .spawn_with(AlwaysFailing { attempts: sender }, options)
        .await
        .unwrap();
    runtime
        .publisher::<Client>()
        .publish("s1", Job { id: 1 })
        .await
        .unwrap();
    let mut instants = Vec::new();
    for expected_attempt in 1..=6 {
        let (attempt, at) = timeout(WAIT, attempts.recv())
            .await
            .expect("the next attempt comes")
            .expect("the agent runs");
        assert_eq!(attempt, expected_attempt);
        instants.push(at);
    }
    assert_gaps(
        "handler retries",
        &gaps(&instants),
        &millis(&[100, 300, 900, 2000, 2000]),
    );
}

#[tokio::test(start_paused = true)]
async fn jittered_delays_between_attempts_stay_within_the_jitter_of_the_backoff() {
    let runtime = Runtime::new(MemoryRouter::new());
    let (sender, mut attempts) = mpsc::unbounded_channel();
    // Doubling from 1 s with 20% jitter: each delay is between 80% and 100% of 1, 2, 4, 8 s, so each
    // is longer than the one before whatever the jitter draws.
    let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60)).jitter(0.2);
    let options = AgentOptions::new().max_attempts(5).backoff(backoff);
    runtime
        .spawn_with(AlwaysFailing { attempts: sender }, options)
        .await
        .unwrap();
    runtime
        .publisher::<Client>()
        .publish("s1", Job { id: 1 })
        .await
        .unwrap();
    let mut instants = Vec::new();
    for _ in 1..=5 {
        let (_, at) = timeout(WAIT, attempts.recv()).await.unwrap().unwrap();
        instants.push(at);
    }
    let gaps = gaps(&instants);
    for (index, gap) in gaps.iter().enumerate() {
        let full = Duration::from_secs(1 << index);
        assert!(
            *gap >= full.mul_f64(0.8) && *gap <= full + TIMER_SLACK,
            "delay {} was {gap:?}, expected 80% to 100% of {full:?} (all: {gaps:?})",
            index + 1
        );
    }
    assert!(
        gaps.windows(2).all(|pair| pair[1] > pair[0]),
        "the delays grow: {gaps:?}"
    );
}

/// A memory router whose first `failures` publishes to a DeadLetter channel fail (the dead-letter
/// target is down), and that records when each of them was tried.
struct DeadLetterDown {
    inner: MemoryRouter,
    failures: Mutex<usize>,
    tries: Mutex<Vec<Instant>>,
}

impl Router for DeadLetterDown {
    fn backend(&self) -> &str {
        "memory-dead-letter-down"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, Result<PublishOutcome>> {
        if envelope.channel().class() == "DeadLetter" {
            self.tries.lock().unwrap().push(Instant::now());
            let mut failures = self.failures.lock().unwrap();
            if *failures > 0 {
                *failures -= 1;
                return Box::pin(async {
                    Err(Error::Backend {
                        backend: "memory-dead-letter-down",
                        message: "connection refused".into(),
                    })
                });
            }
        }
        self.inner.publish(envelope)
    }
    fn subscribe(&self, options: SubscribeOptions) -> BoxFuture<'_, Result<Subscription>> {
        self.inner.subscribe(options)
    }
    fn health(&self) -> BoxFuture<'_, Health> {
        self.inner.health()
    }
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        self.inner.close()
    }
}

#[tokio::test(start_paused = true)]
async fn the_delay_between_tries_of_a_dead_letter_grows_while_its_target_is_down() {
    let router = Arc::new(DeadLetterDown {
        inner: MemoryRouter::new(),
        failures: Mutex::new(5),
        tries: Mutex::new(Vec::new()),
    });
    let runtime = Runtime::builder_shared(router.clone()).build();
    let mut dead = runtime
        .router()
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("DeadLetter:*:*").unwrap(),
        ))
        .await
        .unwrap();
    let (sender, mut attempts) = mpsc::unbounded_channel();
    // Two attempts (100 ms apart), then the dead letter: tried at once, then after each give-back.
    // 100 ms, three times as long per attempt, up to 10 s.
    let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10))
        .multiplier(3.0)
        .jitter(0.0);
    let options = AgentOptions::new().max_attempts(2).backoff(backoff);
    runtime
        .spawn_with(AlwaysFailing { attempts: sender }, options)
        .await
        .unwrap();
    runtime
        .publisher::<Client>()
        .publish("s1", Job { id: 1 })
        .await
        .unwrap();
    let letter = timeout(WAIT, dead.next())
        .await
        .expect("the dead letter comes once its target is back")
        .expect("the subscription is open");
    assert_eq!(letter.envelope().header(headers::ATTEMPTS), Some("2"));
    // The handler ran twice only: the give-backs publish the dead letter without running it again.
    let mut handler_attempts = Vec::new();
    while let Ok(attempt) = attempts.try_recv() {
        handler_attempts.push(attempt.0);
    }
    assert_eq!(handler_attempts, [1, 2]);
    let tries = router.tries.lock().unwrap().clone();
    // Five failed tries, then the one that went through. The first give-back follows attempt 2, so
    // the delays go on from the backoff's second: 300 ms, then three times as long, capped at 10 s.
    assert_gaps(
        "dead-letter tries",
        &gaps(&tries),
        &millis(&[300, 900, 2700, 8100, 10000]),
    );
}
