//! The agent runtime when things around a handler go wrong: a dead letter that cannot be published,
//! two agents of one name, replies that match an agent's patterns, a panic outside the handler.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use agentcomm_core::backoff::Backoff;
use agentcomm_core::envelope::headers;
use agentcomm_core::prelude::*;
use agentcomm_core::router::{
    BoxFuture, Capabilities, Health, PublishOutcome, SubscribeOptions, Subscription,
};
use serde::{Deserialize, Serialize};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
struct Job {
    id: u32,
}

#[agent(sends = [Job])]
struct Client;

fn fast_retries(max_attempts: u32) -> AgentOptions {
    AgentOptions::new()
        .max_attempts(max_attempts)
        .backoff(Backoff::new(Duration::from_millis(5), Duration::from_millis(20)).jitter(0.0))
}

async fn dead_letters(router: &agentcomm_core::router::SharedRouter) -> Subscription {
    router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("DeadLetter:*:*").unwrap(),
        ))
        .await
        .unwrap()
}

/// A memory router whose first `failures` publishes to a DeadLetter channel fail, like a broker
/// hiccup.
struct DeadLetterHiccup {
    inner: MemoryRouter,
    failures: AtomicUsize,
}

impl DeadLetterHiccup {
    fn new(failures: usize) -> Self {
        DeadLetterHiccup {
            inner: MemoryRouter::new(),
            failures: AtomicUsize::new(failures),
        }
    }
}

impl Router for DeadLetterHiccup {
    fn backend(&self) -> &str {
        "memory-hiccup"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, Result<PublishOutcome>> {
        let take_failure = |n: usize| n.checked_sub(1);
        if envelope.channel().class() == "DeadLetter"
            && self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, take_failure)
                .is_ok()
        {
            return Box::pin(async {
                Err(Error::Backend {
                    backend: "memory-hiccup",
                    message: "connection reset while publishing".into(),
                })
            });
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

/// Fails every job, permanently or not.
#[agent(receives = [Job])]
struct Charger {
    runs: Arc<AtomicUsize>,
    permanent: bool,
}

impl Handle<Job> for Charger {
    async fn handle(&self, _: Job, _: &Context<Self>) -> HandlerResult {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if self.permanent {
            Err(HandlerError::permanent(
                "card was charged already; never retry",
            ))
        } else {
            Err(HandlerError::msg("payment service unavailable"))
        }
    }
}

/// Runs a failing Charger whose first two dead-letter publishes fail; returns how often the handler
/// ran and the dead letter that finally came.
async fn charge_with_dead_letter_hiccups(permanent: bool, max_attempts: u32) -> (usize, Envelope) {
    let runtime = Runtime::new(DeadLetterHiccup::new(2));
    let mut dead = dead_letters(runtime.router()).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let charger = Charger {
        runs: runs.clone(),
        permanent,
    };
    runtime
        .spawn_with(charger, fast_retries(max_attempts))
        .await
        .unwrap();
    runtime
        .publisher::<Client>()
        .publish("s1", Job { id: 1 })
        .await
        .unwrap();
    let letter = timeout(WAIT, dead.next()).await.unwrap().unwrap();
    let envelope = letter.envelope().clone();
    letter.ack().await.unwrap();
    // Nothing more comes: the message is settled once its dead letter is out.
    assert!(
        timeout(Duration::from_millis(200), dead.next())
            .await
            .is_err(),
        "one dead letter"
    );
    let stats = runtime.health().await;
    assert_eq!(stats.agents[0].dead_lettered, 1, "{stats:?}");
    (runs.load(Ordering::SeqCst), envelope)
}

#[tokio::test]
async fn a_permanent_failure_runs_once_even_when_its_dead_letter_publish_fails() {
    let (runs, letter) = charge_with_dead_letter_hiccups(true, 5).await;
    assert_eq!(runs, 1, "the handler said the failure is permanent");
    assert_eq!(letter.header(headers::DEAD_LETTER_REASON), Some("rejected"));
    assert_eq!(letter.header(headers::ATTEMPTS), Some("1"));
    assert_eq!(
        letter.header(headers::ERROR),
        Some("card was charged already; never retry")
    );
    assert_eq!(letter.header(headers::DEAD_LETTER_PENDING), None);
}

#[tokio::test]
async fn a_handler_runs_max_attempts_times_even_when_its_dead_letter_publish_fails() {
    let (runs, letter) = charge_with_dead_letter_hiccups(false, 3).await;
    assert_eq!(runs, 3, "max_attempts is 3");
    assert_eq!(
        letter.header(headers::DEAD_LETTER_REASON),
        Some("handler-failed")
    );
    assert_eq!(letter.header(headers::ATTEMPTS), Some("3"));
    assert_eq!(letter.header(headers::DEAD_LETTER_PENDING), None);
}
