//! The agent runtime when things around a handler go wrong: a dead letter that cannot be published,
//! two agents of one name, replies that match an agent's patterns, a panic outside the handler.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use agentcomm_core::backoff::Backoff;
use agentcomm_core::envelope::headers;
use agentcomm_core::memory::MemoryConfig;
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[message(direction = "request")]
struct Ask {
    n: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
struct Answer {
    n: u32,
}

#[agent(sends = [Ask, Answer])]
struct Asker;

#[agent(receives = [Ask], sends = [Answer])]
struct Answerer;

impl Handle<Ask> for Answerer {
    async fn handle(&self, ask: Ask, ctx: &Context<Self>) -> HandlerResult {
        ctx.reply(Answer { n: ask.n }).await?;
        Ok(())
    }
}

/// Books every Answer published as an event.
#[agent(receives = [Answer])]
struct Ledger(Arc<std::sync::Mutex<Vec<String>>>);

impl Handle<Answer> for Ledger {
    async fn handle(&self, answer: Answer, ctx: &Context<Self>) -> HandlerResult {
        let channel = ctx.envelope().channel().name().to_string();
        self.0
            .lock()
            .unwrap()
            .push(format!("{} on {channel}", answer.n));
        Ok(())
    }
}

async fn wait_for_health(
    runtime: &Runtime,
    what: &str,
    condition: impl Fn(&agentcomm_core::runtime::RuntimeHealth) -> bool,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let health = runtime.health().await;
        if condition(&health) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}: {health:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_reply_goes_to_its_requester_not_to_agents_that_receive_its_class() {
    let runtime = Runtime::new(MemoryRouter::new());
    runtime.spawn(Answerer).await.unwrap();
    let booked = Arc::new(std::sync::Mutex::new(Vec::new()));
    runtime.spawn(Ledger(booked.clone())).await.unwrap();
    let asker = runtime.publisher::<Asker>();
    let answer: Answer = asker.request("s1", Ask { n: 7 }).await.unwrap();
    assert_eq!(answer.n, 7);
    // The ledger's pattern matches the reply's channel, but the memory router queues an inbox reply
    // only where a pattern names the `reply` direction (checked below: the ledger never saw it).
    // An Answer published as an event still reaches the ledger.
    asker.publish("s1", Answer { n: 8 }).await.unwrap();
    wait_for_health(&runtime, "the ledger handled the event", |health| {
        health
            .agents
            .iter()
            .any(|agent| agent.name == "Ledger" && agent.handled == 1)
    })
    .await;
    // A reply addressed to an agent's own session (a request whose reply_to names it), and another
    // program's message on direction `reply`: not inbox replies, so handled as usual.
    for (channel, correlation) in [
        ("Answer:reply:ledger-session", Some("a-request-id")),
        ("Answer:reply:s1", None),
    ] {
        let payload = Codec::MessagePack
            .encode("Answer", &Answer { n: 9 })
            .unwrap();
        let mut envelope = Envelope::new(
            parse_channel(channel).unwrap(),
            "application/msgpack",
            payload,
        );
        if let Some(correlation) = correlation {
            envelope = envelope.with_correlation_id(correlation);
        }
        runtime.router().publish(envelope).await.unwrap();
    }
    wait_for_health(&runtime, "the ledger handled both", |health| {
        health
            .agents
            .iter()
            .any(|agent| agent.name == "Ledger" && agent.handled == 3)
    })
    .await;
    let health = runtime.health().await;
    let ledger = health.agents.iter().find(|agent| agent.name == "Ledger");
    assert_eq!(
        ledger.map(|agent| (agent.received, agent.replies_skipped)),
        Some((3, 0)),
        "the inbox reply never reached the ledger"
    );
    let mut booked = booked.lock().unwrap().clone();
    booked.sort();
    assert_eq!(
        booked,
        vec![
            "8 on Answer:event:s1".to_string(),
            "9 on Answer:reply:ledger-session".to_string(),
            "9 on Answer:reply:s1".to_string()
        ]
    );
}

/// Answers every Chat with a Chat: the class it receives is the class it replies with.
#[agent(receives = [Chat], sends = [Chat])]
struct Echo(Arc<AtomicUsize>);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
struct Chat {
    text: String,
}

#[agent(sends = [Chat])]
struct Chatter;

impl Handle<Chat> for Echo {
    async fn handle(&self, chat: Chat, ctx: &Context<Self>) -> HandlerResult {
        self.0.fetch_add(1, Ordering::SeqCst);
        ctx.reply(Chat {
            text: format!("echo: {}", chat.text),
        })
        .await?;
        Ok(())
    }
}

// Multi-threaded: were the agent to answer its own replies, it would do so without end, and the test's
// timers must still fire to fail it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_replying_with_the_class_it_receives_does_not_answer_its_own_replies() {
    let runtime = Runtime::new(MemoryRouter::new());
    let runs = Arc::new(AtomicUsize::new(0));
    runtime.spawn(Echo(runs.clone())).await.unwrap();
    let reply: Chat = runtime
        .publisher::<Chatter>()
        .request("s1", Chat { text: "hi".into() })
        .await
        .unwrap();
    assert_eq!(reply.text, "echo: hi");
    // A second request, queued behind where the first reply would have been.
    let reply: Chat = runtime
        .publisher::<Chatter>()
        .request("s1", Chat { text: "bye".into() })
        .await
        .unwrap();
    assert_eq!(reply.text, "echo: bye");
    wait_for_health(&runtime, "the echo handled both chats", |health| {
        health.agents[0].handled == 2
    })
    .await;
    assert_eq!(runs.load(Ordering::SeqCst), 2, "two chats, two answers");
    assert_eq!(runtime.health().await.agents[0].replies_skipped, 0);
}

/// Answers every `Talk` with a `Talk`, after a moment, so that requests pile up in its queue.
#[agent(receives = [Talk], sends = [Talk])]
struct SlowEcho;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
struct Talk {
    n: u32,
}

#[agent(sends = [Talk])]
struct Talker;

impl Handle<Talk> for SlowEcho {
    async fn handle(&self, talk: Talk, ctx: &Context<Self>) -> HandlerResult {
        tokio::time::sleep(Duration::from_millis(20)).await;
        ctx.reply(Talk { n: talk.n }).await?;
        Ok(())
    }
}

/// An agent replying with the class it receives, its queue full of requests: its replies went into
/// that same queue, which only it drains, so each waited `publish_timeout` for room and failed (3 of
/// 12 requests answered on a queue of 4). Replies to inboxes no longer take room in agents' queues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_replying_with_the_class_it_receives_answers_a_burst_through_a_full_queue() {
    let router = MemoryRouter::with_config(
        MemoryConfig::default()
            .queue_capacity(4)
            .publish_timeout(Duration::from_secs(2)),
    );
    let runtime = Runtime::new(router);
    runtime
        .spawn_with(SlowEcho, AgentOptions::new().prefetch(1).concurrency(1))
        .await
        .unwrap();
    let talker = runtime.publisher::<Talker>();
    let answers = futures::future::join_all((0..12).map(|n| {
        let talker = talker.clone();
        async move {
            talker
                .request_timeout::<Talk, Talk>("s1", Talk { n }, Duration::from_secs(20))
                .await
        }
    }))
    .await;
    for (n, answer) in answers.into_iter().enumerate() {
        assert_eq!(answer.expect("answered").n, n as u32);
    }
}

/// Records every `Answer` it receives; stopped, its group keeps what arrives for it.
#[agent(receives = [Answer])]
struct Auditor;

impl Handle<Answer> for Auditor {
    async fn handle(&self, _: Answer, _: &Context<Self>) -> HandlerResult {
        Ok(())
    }
}

/// A stopped agent that receives a reply class: its group outlives it, and every reply to a
/// requester's inbox of that class was queued there too, until the group was full; from then on every
/// reply publish timed out, and requests between two healthy agents failed, the requester told to
/// look at the wrong agent (0..255 answered, then none, with the default prefetch). Now the group
/// holds none of them, and events of the class still wait there for the agent.
#[tokio::test]
async fn a_stopped_agent_receiving_a_reply_class_does_not_stop_others_requests() {
    let router = MemoryRouter::with_config(
        MemoryConfig::default()
            .queue_capacity(4)
            .publish_timeout(Duration::from_millis(200)),
    );
    let runtime = Runtime::new(router.clone());
    runtime.spawn(Answerer).await.unwrap();
    let auditor = runtime
        .spawn_with(Auditor, AgentOptions::new().prefetch(4))
        .await
        .unwrap();
    auditor.stop(WAIT).await;
    let asker = runtime.publisher::<Asker>();
    for n in 0..20 {
        let answer: Answer = asker
            .request_timeout("s1", Ask { n }, WAIT)
            .await
            .unwrap_or_else(|error| panic!("request {n}: {error}"));
        assert_eq!(answer.n, n);
    }
    asker.publish("s1", Answer { n: 99 }).await.unwrap();
    let health = router.health().await;
    assert_eq!(
        health.counters.get("queued"),
        Some(&1),
        "only the event waits for the stopped auditor: {health:?}"
    );
}

#[tokio::test]
async fn publishing_on_the_reply_direction_is_refused_with_the_way_out() {
    let runtime = Runtime::new(MemoryRouter::new());
    let error = runtime
        .bus()
        .publish_to("reply", "s1", &Answer { n: 1 })
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("'reply' is reserved") && text.contains("Context::reply"),
        "{text}"
    );
}

mod billing {
    use super::*;
    /// Bills every job.
    #[agent(receives = [Job])]
    pub struct Recorder(pub Arc<AtomicUsize>);
    impl Handle<Job> for Recorder {
        async fn handle(&self, _: Job, _: &Context<Self>) -> HandlerResult {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
}

mod audit {
    use super::*;
    /// Audits every job; its struct has the name of billing's.
    #[agent(receives = [Job])]
    pub struct Recorder(pub Arc<AtomicUsize>);
    impl Handle<Job> for Recorder {
        async fn handle(&self, _: Job, _: &Context<Self>) -> HandlerResult {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
}

#[tokio::test]
async fn two_agent_types_of_one_name_are_not_put_in_one_group() {
    let runtime = Runtime::new(MemoryRouter::new());
    let billed = Arc::new(AtomicUsize::new(0));
    let audited = Arc::new(AtomicUsize::new(0));
    let billing = runtime
        .spawn(billing::Recorder(billed.clone()))
        .await
        .unwrap();
    // A second instance of the same agent shares the work: allowed.
    let billing_too = runtime
        .spawn(billing::Recorder(billed.clone()))
        .await
        .unwrap();
    let error = runtime
        .spawn(audit::Recorder(audited.clone()))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("group 'Recorder' is already used by another agent type")
            && error.contains("billing::Recorder")
            && error.contains("audit::Recorder")
            && error.contains("#[agent(name"),
        "{error}"
    );
    // In a group of its own, the other agent gets every job too.
    runtime
        .spawn_with(
            audit::Recorder(audited.clone()),
            AgentOptions::new().group("audit"),
        )
        .await
        .unwrap();
    let client = runtime.publisher::<Client>();
    for id in 0..10 {
        client.publish("s1", Job { id }).await.unwrap();
    }
    wait_for_health(&runtime, "every job is billed and audited", |_| {
        billed.load(Ordering::SeqCst) == 10 && audited.load(Ordering::SeqCst) == 10
    })
    .await;
    // Once billing's instances are stopped, the group is free for another type.
    billing.stop(Duration::from_secs(1)).await;
    billing_too.stop(Duration::from_secs(1)).await;
    runtime
        .spawn(audit::Recorder(audited.clone()))
        .await
        .unwrap();
}

/// An error whose `Display` panics: user code the runtime runs when it settles a failed message.
#[derive(Debug)]
struct BadDisplay;

impl std::fmt::Display for BadDisplay {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        panic!("Display of a user error panicked")
    }
}

impl std::error::Error for BadDisplay {}

#[agent(receives = [Job])]
struct Fragile(Arc<AtomicUsize>);

impl Handle<Job> for Fragile {
    async fn handle(&self, job: Job, _: &Context<Self>) -> HandlerResult {
        if job.id == 0 {
            return Err(BadDisplay.into());
        }
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test]
async fn an_error_whose_display_panics_does_not_take_the_agent_down() {
    let runtime = Runtime::new(MemoryRouter::new());
    let mut dead = dead_letters(runtime.router()).await;
    let handled = Arc::new(AtomicUsize::new(0));
    runtime
        .spawn_with(Fragile(handled.clone()), fast_retries(2))
        .await
        .unwrap();
    let client = runtime.publisher::<Client>();
    client.publish("s1", Job { id: 0 }).await.unwrap();
    client.publish("s1", Job { id: 1 }).await.unwrap();
    let letter = timeout(WAIT, dead.next()).await.unwrap().unwrap();
    let error = letter.envelope().header(headers::ERROR).unwrap_or_default();
    assert!(
        error.contains("displaying its error panicked: Display of a user error panicked"),
        "{error}"
    );
    wait_for_health(&runtime, "the next job is handled", |_| {
        handled.load(Ordering::SeqCst) == 1
    })
    .await;
}

#[tokio::test]
async fn a_reply_of_another_class_is_refused_not_decoded_as_the_expected_one() {
    let runtime = Runtime::new(MemoryRouter::new());
    // A hand-written replier: answers every Ask with a Job frame on the requester's reply channel.
    let mut asks = runtime
        .router()
        .subscribe(SubscribeOptions::new(Ask::pattern()))
        .await
        .unwrap();
    let router = runtime.router().clone();
    tokio::spawn(async move {
        while let Some(delivery) = asks.next().await {
            let request = delivery.envelope().clone();
            let reply_to = parse_channel(request.reply_to().unwrap()).unwrap();
            let payload = Codec::MessagePack.encode("Job", &Job { id: 1 }).unwrap();
            let reply = Envelope::with_class("Job", reply_to, "application/msgpack", payload)
                .with_correlation_id(request.id().to_string());
            router.publish(reply).await.unwrap();
            delivery.ack().await.unwrap();
        }
    });
    let error = runtime
        .publisher::<Asker>()
        .request_timeout::<Ask, Answer>("s1", Ask { n: 1 }, WAIT)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, Error::UnexpectedReply { expected, got, .. } if expected == "Answer" && got == "Job"),
        "{error:?}"
    );
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
struct Refund {
    #[message(min = 0.01)]
    amount: f64,
}

/// Refunds every job to a session that cannot be a channel component: the publish fails with an
/// invalid-channel error, which `?` passes on.
#[agent(receives = [Job], sends = [Refund])]
struct Refunder(Arc<AtomicUsize>);

impl Handle<Job> for Refunder {
    async fn handle(&self, _: Job, ctx: &Context<Self>) -> HandlerResult {
        self.0.fetch_add(1, Ordering::SeqCst);
        ctx.send_to("not a session", Refund { amount: 1.0 }).await?;
        Ok(())
    }
}

#[tokio::test]
async fn an_agentcomm_error_that_cannot_mend_is_not_retried() {
    let runtime = Runtime::new(MemoryRouter::new());
    let mut dead = dead_letters(runtime.router()).await;
    let runs = Arc::new(AtomicUsize::new(0));
    runtime
        .spawn_with(Refunder(runs.clone()), fast_retries(5))
        .await
        .unwrap();
    runtime
        .publisher::<Client>()
        .publish("s1", Job { id: 1 })
        .await
        .unwrap();
    let letter = timeout(WAIT, dead.next()).await.unwrap().unwrap();
    assert_eq!(
        letter.envelope().header(headers::DEAD_LETTER_REASON),
        Some("rejected")
    );
    let error = letter.envelope().header(headers::ERROR).unwrap_or_default();
    assert!(error.contains("invalid channel session"), "{error}");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "not retried");
}

/// A memory router whose subscribes take a while, as a broker's do.
struct SlowSubscribe(MemoryRouter);

impl Router for SlowSubscribe {
    fn backend(&self) -> &str {
        "slow-subscribe"
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, Result<PublishOutcome>> {
        self.0.publish(envelope)
    }
    fn subscribe(&self, options: SubscribeOptions) -> BoxFuture<'_, Result<Subscription>> {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.0.subscribe(options).await
        })
    }
    fn health(&self) -> BoxFuture<'_, Health> {
        self.0.health()
    }
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        self.0.close()
    }
}

#[tokio::test]
async fn two_agent_types_of_one_name_spawned_at_once_are_not_put_in_one_group() {
    let runtime = Runtime::new(SlowSubscribe(MemoryRouter::new()));
    let (billing, audit) = tokio::join!(
        runtime.spawn(billing::Recorder(Arc::default())),
        runtime.spawn(audit::Recorder(Arc::default()))
    );
    // One of the two is refused; another instance of the one that started joins it (its claim,
    // given back when its spawn was over, stands in no one's way).
    match (billing, audit) {
        (Ok(_), Err(_)) => drop(
            runtime
                .spawn(billing::Recorder(Arc::default()))
                .await
                .unwrap(),
        ),
        (Err(_), Ok(_)) => drop(
            runtime
                .spawn(audit::Recorder(Arc::default()))
                .await
                .unwrap(),
        ),
        (billing, audit) => panic!(
            "expected exactly one refused: {:?} / {:?}",
            billing.map(|agent| agent.name()),
            audit.map(|agent| agent.name())
        ),
    }
}

/// Counts the jobs it handles.
#[agent(receives = [Job])]
struct Counter(Arc<AtomicUsize>);

impl Handle<Job> for Counter {
    async fn handle(&self, _: Job, _: &Context<Self>) -> HandlerResult {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test]
async fn a_dead_letter_pending_header_from_elsewhere_is_not_obeyed() {
    let runtime = Runtime::new(MemoryRouter::new());
    let handled = Arc::new(AtomicUsize::new(0));
    runtime.spawn(Counter(handled.clone())).await.unwrap();
    // Another program (or a bridge copying headers) sets the reserved header: not this agent's mark.
    let payload = Codec::MessagePack.encode("Job", &Job { id: 1 }).unwrap();
    let envelope = Envelope::new(
        parse_channel("Job:event:s1").unwrap(),
        "application/msgpack",
        payload,
    )
    .with_header(headers::DEAD_LETTER_PENDING, "anything at all");
    runtime.router().publish(envelope).await.unwrap();
    wait_for_health(&runtime, "the job is handled", |_| {
        handled.load(Ordering::SeqCst) == 1
    })
    .await;
}

/// Panics when dropped: user state a handler holds while it waits.
struct PanicsWhenDropped;

impl Drop for PanicsWhenDropped {
    fn drop(&mut self) {
        panic!("a guard of the handler panicked in its Drop")
    }
}

#[agent(receives = [Job])]
struct Stuck(Arc<AtomicUsize>);

impl Handle<Job> for Stuck {
    async fn handle(&self, job: Job, _: &Context<Self>) -> HandlerResult {
        if job.id == 0 {
            // Never finishes: the handler timeout drops this future, and with it the guard.
            let _guard = PanicsWhenDropped;
            std::future::pending::<()>().await;
        }
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test]
async fn a_panic_while_dropping_a_handlers_future_does_not_take_the_agent_down() {
    let runtime = Runtime::new(MemoryRouter::new());
    let mut dead = dead_letters(runtime.router()).await;
    let handled = Arc::new(AtomicUsize::new(0));
    let agent = runtime
        .spawn_with(
            Stuck(handled.clone()),
            fast_retries(1).handler_timeout(Some(Duration::from_millis(20))),
        )
        .await
        .unwrap();
    let client = runtime.publisher::<Client>();
    client.publish("s1", Job { id: 0 }).await.unwrap();
    client.publish("s1", Job { id: 1 }).await.unwrap();
    let letter = timeout(WAIT, dead.next()).await.unwrap().unwrap();
    assert!(
        letter
            .envelope()
            .header(headers::ERROR)
            .unwrap_or_default()
            .contains("timed out"),
        "{:?}",
        letter.envelope().header(headers::ERROR)
    );
    wait_for_health(&runtime, "the next job is handled", |_| {
        handled.load(Ordering::SeqCst) == 1
    })
    .await;
    let health = agent.health();
    assert_eq!(
        (health.panicked, health.state),
        (1, agentcomm_core::runtime::AgentState::Running)
    );
}

/// How each delivery of a [`RecordsGiveBacks`] router went back unsettled: given back unhandled, or
/// abandoned (dropped, which counts as an attempt on a backend that counts deliveries).
#[derive(Default)]
struct Returns {
    given_back: std::sync::Mutex<Vec<u32>>,
    abandoned: std::sync::Mutex<Vec<u32>>,
    /// Deliveries put in the subscription's buffer (one place) so far.
    buffered: AtomicUsize,
}

/// Settles the memory router's delivery it wraps, recording how it went back.
struct Recording {
    job: u32,
    inner: std::sync::Mutex<Option<agentcomm_core::router::Delivery>>,
    returns: Arc<Returns>,
}

impl Recording {
    fn take(&self) -> agentcomm_core::router::Delivery {
        self.inner.lock().unwrap().take().expect("settled once")
    }
}

impl agentcomm_core::router::Acknowledge for Recording {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        let inner = self.take();
        Box::pin(inner.ack())
    }
    fn nack(
        self: Box<Self>,
        _: Envelope,
        action: agentcomm_core::router::NackAction,
    ) -> BoxFuture<'static, Result<()>> {
        let inner = self.take();
        Box::pin(inner.nack(action))
    }
    fn abandon(self: Box<Self>, _: Envelope) {
        self.returns.abandoned.lock().unwrap().push(self.job);
        drop(self.take());
    }
    fn give_back(self: Box<Self>, _: Envelope) {
        self.returns.given_back.lock().unwrap().push(self.job);
        self.take().give_back();
    }
}

struct Closes(agentcomm_core::router::SubscriptionCloser);

impl agentcomm_core::router::SubscriptionControl for Closes {
    fn close(&self) -> BoxFuture<'static, Result<()>> {
        let closer = self.0.clone();
        Box::pin(async move { closer.close().await })
    }
}

/// A memory router whose deliveries record whether they were given back unhandled or abandoned.
struct RecordsGiveBacks {
    inner: MemoryRouter,
    returns: Arc<Returns>,
}

impl Router for RecordsGiveBacks {
    fn backend(&self) -> &str {
        "records-give-backs"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, Result<PublishOutcome>> {
        self.inner.publish(envelope)
    }
    fn subscribe(&self, options: SubscribeOptions) -> BoxFuture<'_, Result<Subscription>> {
        Box::pin(async move {
            let mut inner = self.inner.subscribe(options.clone()).await?;
            let (sender, receiver) = async_channel::bounded(1);
            let control = Arc::new(Closes(inner.closer()));
            let returns = self.returns.clone();
            tokio::spawn(async move {
                while let Some(delivery) = inner.next().await {
                    let envelope = delivery.envelope().clone();
                    let job = Codec::MessagePack
                        .decode::<Job>("Job", envelope.payload())
                        .map_or(u32::MAX, |job| job.id);
                    let recording = Recording {
                        job,
                        inner: std::sync::Mutex::new(Some(delivery)),
                        returns: returns.clone(),
                    };
                    let wrapped =
                        agentcomm_core::router::Delivery::new(envelope, Box::new(recording));
                    if let Err(unsent) = sender.send(wrapped).await {
                        unsent.0.give_back();
                        break;
                    }
                    returns.buffered.fetch_add(1, Ordering::SeqCst);
                }
            });
            Ok(Subscription::new(receiver, control, &options))
        })
    }
    fn health(&self) -> BoxFuture<'_, Health> {
        self.inner.health()
    }
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        self.inner.close()
    }
}

/// Never finishes a job.
#[agent(receives = [Job])]
struct Hangs(Arc<AtomicUsize>);

impl Handle<Job> for Hangs {
    async fn handle(&self, _: Job, _: &Context<Self>) -> HandlerResult {
        self.0.fetch_add(1, Ordering::SeqCst);
        std::future::pending().await
    }
}

/// With several workers, the stop deadline can come while the dispatcher waits to hand a delivery to
/// a worker whose queue is full. No handler has seen that delivery: it goes back unhandled, like the
/// ones still buffered, so that a backend counting deliveries does not count it as an attempt. Only
/// the delivery whose handler the deadline cut off is abandoned.
#[tokio::test]
async fn the_delivery_a_stop_deadline_catches_on_its_way_to_a_worker_is_given_back_unhandled() {
    let returns = Arc::new(Returns::default());
    let runtime = Runtime::new(RecordsGiveBacks {
        inner: MemoryRouter::new(),
        returns: returns.clone(),
    });
    let started = Arc::new(AtomicUsize::new(0));
    // One session, so one worker: it hangs on job 0, job 1 waits in its queue (one place), job 2 in
    // the dispatcher's hands, job 3 in the subscription's buffer.
    let agent = runtime
        .spawn_with(
            Hangs(started.clone()),
            AgentOptions::new().concurrency(2).prefetch(2),
        )
        .await
        .unwrap();
    let client = runtime.publisher::<Client>();
    for id in 0..4 {
        client.publish("s1", Job { id }).await.unwrap();
    }
    // Job 3 is in the buffer (its one place) once jobs 0 to 2 were taken from it: the worker has
    // started job 0 and holds job 1 in its queue, so job 2 is in the dispatcher's hands.
    timeout(WAIT, async {
        while started.load(Ordering::SeqCst) == 0 || returns.buffered.load(Ordering::SeqCst) < 4 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("job 0 started and job 3 buffered");
    agent.stop(Duration::from_millis(100)).await;
    let mut given_back = returns.given_back.lock().unwrap().clone();
    given_back.sort();
    let abandoned = returns.abandoned.lock().unwrap().clone();
    assert_eq!(
        (abandoned, given_back),
        (vec![0], vec![1, 2, 3]),
        "(abandoned, given back unhandled)"
    );
}

/// `usize::MAX` is the natural way to ask for no prefetch bound, and the memory router takes it: an
/// agent with several workers must take it too, not fail to start its workers.
#[tokio::test]
async fn an_unbounded_prefetch_with_several_workers_handles_messages() {
    let runtime = Runtime::new(MemoryRouter::new());
    let handled = Arc::new(AtomicUsize::new(0));
    let agent = runtime
        .spawn_with(
            Counter(handled.clone()),
            AgentOptions::new().concurrency(2).prefetch(usize::MAX),
        )
        .await
        .unwrap();
    let client = runtime.publisher::<Client>();
    client.publish("s1", Job { id: 1 }).await.unwrap();
    client.publish("s2", Job { id: 2 }).await.unwrap();
    timeout(WAIT, async {
        while handled.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{} of 2 handled; agent {:?}",
            handled.load(Ordering::SeqCst),
            agent.health().state
        )
    });
}

/// A memory router that sends every envelope through its wire frame first, as every broker does
/// (Redis and RabbitMQ publish `Envelope::to_frame`, their subscribers read `Envelope::from_frame`):
/// an envelope that has no frame cannot be published.
struct Framing(MemoryRouter);

impl Router for Framing {
    fn backend(&self) -> &str {
        "memory-framing"
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, Result<PublishOutcome>> {
        let framed = envelope
            .to_frame()
            .and_then(|frame| Envelope::from_frame(&frame));
        match framed {
            Ok(envelope) => self.0.publish(envelope),
            Err(error) => Box::pin(async move { Err(error) }),
        }
    }
    fn subscribe(&self, options: SubscribeOptions) -> BoxFuture<'_, Result<Subscription>> {
        self.0.subscribe(options)
    }
    fn health(&self) -> BoxFuture<'_, Health> {
        self.0.health()
    }
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        self.0.close()
    }
}

/// Answers nothing: every attempt fails.
#[agent(receives = [Ask], sends = [Answer])]
struct AnswererDown;

impl Handle<Ask> for AnswererDown {
    async fn handle(&self, _: Ask, _: &Context<Self>) -> HandlerResult {
        Err(HandlerError::msg("the answers are down"))
    }
}

/// The failure reply of a dead-lettered request has an empty payload. Made with the request's
/// content type, it had no frame when the request was JSON (an empty payload is not JSON): on a
/// broker its publish failed, and a requester of a runtime speaking JSON waited out its whole
/// timeout instead of failing at once with `RequestFailed`.
#[tokio::test]
async fn a_json_request_dead_lettered_on_a_broker_fails_its_requester_at_once() {
    let runtime = Runtime::builder(Framing(MemoryRouter::new()))
        .codec(Codec::Json)
        .build();
    runtime
        .spawn_with(AnswererDown, fast_retries(2))
        .await
        .unwrap();
    let asker = runtime.publisher::<Asker>();
    let asking = asker.request_timeout::<Ask, Answer>("s1", Ask { n: 1 }, Duration::from_secs(600));
    // Bounded far below the request's own timeout: an answer, not a timeout, ends it.
    let error = timeout(WAIT, asking)
        .await
        .expect("the requester was told before its timeout")
        .unwrap_err();
    match &error {
        Error::RequestFailed(failure) => {
            assert_eq!(
                (
                    failure.agent.as_str(),
                    failure.reason.as_str(),
                    failure.attempts
                ),
                ("AnswererDown", "handler-failed", 2)
            );
            assert!(failure.error.contains("the answers are down"), "{error}");
        }
        other => panic!("expected RequestFailed, got {other:?}"),
    }
}

/// A frame from another program whose payload is not what its content type says (MessagePack bytes
/// labelled `application/json`) is undecodable, and dead-lettered at once. Its dead letter kept the
/// label and the bytes, and so had no frame (a JSON frame carries its payload inline): on a broker
/// its publish failed every time, and the message came back again and again, never dead-lettered
/// and never acknowledged.
#[tokio::test]
async fn a_payload_that_is_not_the_json_its_label_says_is_dead_lettered_on_a_broker() {
    let memory = MemoryRouter::new();
    let runtime = Runtime::new(Framing(memory.clone()));
    let mut dead = memory
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("DeadLetter:*:*").unwrap(),
        ))
        .await
        .unwrap();
    let agent = runtime.spawn_with(Answerer, fast_retries(3)).await.unwrap();
    // The frame of a MessagePack message, relabelled `application/json` (a fixstr of 16 bytes in place
    // of one of 19): a MessagePack frame takes any payload bytes, so a broker's subscriber reads it.
    let payload = Codec::MessagePack.encode("Ask", &Ask { n: 1 }).unwrap();
    let channel = parse_channel("Ask:request:s1").unwrap();
    let mut frame = Envelope::new(channel, "application/msgpack", payload.clone())
        .to_frame()
        .unwrap();
    let at = frame
        .windows(20)
        .position(|w| w == b"\xb3application/msgpack")
        .unwrap();
    frame.splice(at..at + 20, *b"\xb0application/json");
    let mislabelled = Envelope::from_frame(&frame).unwrap();
    assert_eq!(mislabelled.content_type(), "application/json");
    memory.publish(mislabelled).await.unwrap();
    let letter = timeout(WAIT, dead.next())
        .await
        .expect("dead-lettered, not given back forever")
        .unwrap();
    let envelope = letter.envelope();
    assert_eq!(
        envelope.header(headers::DEAD_LETTER_REASON),
        Some("undecodable")
    );
    assert_eq!(
        envelope.payload(),
        &payload,
        "the bytes are kept as they came"
    );
    assert_eq!(envelope.content_type(), "application/octet-stream");
    letter.ack().await.unwrap();
    let health = agent.health();
    assert_eq!((health.dead_lettered, health.retried), (1, 0), "{health:?}");
}

/// A memory router that routes by channel name where a subscription names one channel, like Redis
/// pub/sub: a subscription to an exact pattern listens to the name its template renders, and a
/// message with its components but published under another name never reaches it.
struct ByName {
    inner: MemoryRouter,
    /// The exact subscriptions: the canonical channel, and the name they listen to.
    exact: std::sync::Mutex<Vec<(String, String)>>,
}

impl Router for ByName {
    fn backend(&self) -> &str {
        "memory-by-name"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, Result<PublishOutcome>> {
        let channel = envelope.channel();
        let misnamed = self.exact.lock().unwrap().iter().any(|(canonical, name)| {
            *canonical == channel.canonical() && name.as_str() != channel.name()
        });
        if misnamed {
            return Box::pin(async { Ok(PublishOutcome::Unroutable) });
        }
        self.inner.publish(envelope)
    }
    fn subscribe(&self, options: SubscribeOptions) -> BoxFuture<'_, Result<Subscription>> {
        for pattern in options.patterns.iter().filter(|pattern| pattern.is_exact()) {
            let (class, direction, session) = (
                pattern.class().unwrap(),
                pattern.direction().unwrap(),
                pattern.session().unwrap(),
            );
            let name = pattern.template().render(class, direction, session);
            self.exact.lock().unwrap().push((pattern.to_string(), name));
        }
        self.inner.subscribe(options)
    }
    fn health(&self) -> BoxFuture<'_, Health> {
        self.inner.health()
    }
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        self.inner.close()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[message(direction = "request")]
struct Quote {
    n: u32,
}

/// A reply type whose channels are named with a template of its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[message(direction = "response", channel = "quotes.{direction}.{session_id}")]
struct Quoted {
    n: u32,
}

#[agent(sends = [Quote])]
struct QuoteAsker;

/// Quotes nothing: every attempt fails.
#[agent(receives = [Quote], sends = [Quoted])]
struct QuoterDown;

impl Handle<Quote> for QuoterDown {
    async fn handle(&self, _: Quote, _: &Context<Self>) -> HandlerResult {
        Err(HandlerError::msg("the quotes are down"))
    }
}

/// The failure reply of a dead-lettered request was published on the canonical name of the
/// request's `reply_to` (`Quoted:reply:inbox-..`), not the name the reply type's template gives
/// (`quotes.reply.inbox-..`), which the requester's inbox listens to and `Context::reply` uses: on a
/// broker routing by name (Redis pub/sub) it reached no one, and the requester waited out its whole
/// timeout instead of failing at once with `RequestFailed`.
#[tokio::test]
async fn a_dead_lettered_request_whose_reply_type_has_a_template_fails_its_requester_at_once() {
    let runtime = Runtime::builder(ByName {
        inner: MemoryRouter::new(),
        exact: std::sync::Mutex::default(),
    })
    .build();
    runtime
        .spawn_with(QuoterDown, fast_retries(2))
        .await
        .unwrap();
    let asker = runtime.publisher::<QuoteAsker>();
    let asking =
        asker.request_timeout::<Quote, Quoted>("s1", Quote { n: 1 }, Duration::from_secs(600));
    // Bounded far below the request's own timeout: an answer, not a timeout, ends it.
    let error = timeout(WAIT, asking)
        .await
        .expect("the requester was told before its timeout")
        .unwrap_err();
    match &error {
        Error::RequestFailed(failure) => {
            assert_eq!(
                (failure.agent.as_str(), failure.reason.as_str()),
                ("QuoterDown", "handler-failed")
            );
        }
        other => panic!("expected RequestFailed, got {other:?}"),
    }
}

/// A stopped agent's group that a subscription of its own (made with the default
/// `SubscribeOptions`, which takes inbox replies) joined for a while, to drain it: once that member
/// left, the group still took every inbox reply of its class (the group's flag stayed as its
/// member had set it), filled up, and other agents' requests failed as before 197a525.
#[tokio::test]
async fn a_group_a_default_subscription_joined_and_left_takes_no_inbox_replies_again() {
    let router = MemoryRouter::with_config(
        MemoryConfig::default()
            .queue_capacity(4)
            .publish_timeout(Duration::from_millis(200)),
    );
    let runtime = Runtime::new(router.clone());
    runtime.spawn(Answerer).await.unwrap();
    let auditor = runtime
        .spawn_with(Auditor, AgentOptions::new().prefetch(4))
        .await
        .unwrap();
    auditor.stop(WAIT).await;
    // Someone drains the stopped auditor's group for a while, then leaves.
    let drain = router
        .subscribe(
            SubscribeOptions::new(ChannelPattern::parse("Answer:*:*").unwrap()).group("Auditor"),
        )
        .await
        .unwrap();
    drain.closer().close().await.unwrap();
    drop(drain);
    let asker = runtime.publisher::<Asker>();
    for n in 0..20 {
        let answer: Answer = asker
            .request_timeout("s1", Ask { n }, WAIT)
            .await
            .unwrap_or_else(|error| panic!("request {n}: {error}"));
        assert_eq!(answer.n, n);
    }
    let health = router.health().await;
    assert_eq!(
        health.counters.get("queued"),
        Some(&0),
        "no inbox reply waits in the auditor's group: {health:?}"
    );
}

/// A group made only by subscriptions that asked for inbox replies (a monitor reading every class,
/// with the default `SubscribeOptions`) outlives its members like a durable queue, inbox replies
/// included: while its one reader restarts, a request's reply waits for it, as the request does.
/// (256805d took a group's inbox replies only while an asking member read it: the restarting
/// monitor found the request and lost its reply.)
#[tokio::test]
async fn a_monitor_group_keeps_inbox_replies_while_its_reader_restarts() {
    let router = MemoryRouter::new();
    let runtime = Runtime::new(router.clone());
    runtime.spawn(Answerer).await.unwrap();
    let monitor = || {
        router.subscribe(
            SubscribeOptions::new(ChannelPattern::parse("*:*:*").unwrap()).group("monitor"),
        )
    };
    let first = monitor().await.unwrap();
    first.closer().close().await.unwrap();
    drop(first);
    let answer: Answer = runtime
        .publisher::<Asker>()
        .request_timeout("s1", Ask { n: 7 }, WAIT)
        .await
        .unwrap();
    assert_eq!(answer.n, 7);
    let mut again = monitor().await.unwrap();
    let mut seen = Vec::new();
    while let Some(delivery) = again.try_next() {
        seen.push(delivery.envelope().channel().to_string());
        delivery.ack().await.unwrap();
    }
    assert_eq!(seen.len(), 2, "the request and its reply: {seen:?}");
    assert!(seen[1].starts_with("Answer:reply:"), "{seen:?}");
}

/// A delivery whose first acknowledgement (of all those `armed` is shared by) panics: a backend's
/// bug, and a way for a test to make an agent's task fail outside the guards around its handlers.
struct PanicsOnFirstAck {
    inner: std::sync::Mutex<Option<agentcomm_core::router::Delivery>>,
    armed: Arc<std::sync::atomic::AtomicBool>,
}

impl PanicsOnFirstAck {
    fn take(&self) -> agentcomm_core::router::Delivery {
        self.inner.lock().unwrap().take().expect("settled once")
    }
}

impl agentcomm_core::router::Acknowledge for PanicsOnFirstAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        // Dropped unsettled as the panic unwinds: the in-memory router puts it back.
        let inner = self.take();
        if self.armed.swap(false, Ordering::SeqCst) {
            panic!("the backend's acknowledgement panicked");
        }
        Box::pin(inner.ack())
    }
    fn nack(
        self: Box<Self>,
        _: Envelope,
        action: agentcomm_core::router::NackAction,
    ) -> BoxFuture<'static, Result<()>> {
        Box::pin(self.take().nack(action))
    }
    fn abandon(self: Box<Self>, _: Envelope) {
        drop(self.take());
    }
    fn give_back(self: Box<Self>, _: Envelope) {
        self.take().give_back();
    }
}

/// A memory router whose first acknowledgement panics. Its subscriptions are the memory router's,
/// read where the subscriber polls (no task in between), so that a delivery given back to an open
/// one is there to be read again at once, as on the memory router itself.
struct AckPanics {
    inner: MemoryRouter,
    armed: Arc<std::sync::atomic::AtomicBool>,
}

impl Router for AckPanics {
    fn backend(&self) -> &str {
        "ack-panics"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, Result<PublishOutcome>> {
        self.inner.publish(envelope)
    }
    fn subscribe(&self, options: SubscribeOptions) -> BoxFuture<'_, Result<Subscription>> {
        Box::pin(async move {
            let inner = self.inner.subscribe(options.clone()).await?;
            let control = Arc::new(Closes(inner.closer()));
            let armed = self.armed.clone();
            let deliveries = futures::StreamExt::map(inner, move |delivery| {
                let envelope = delivery.envelope().clone();
                let wrapped = PanicsOnFirstAck {
                    inner: std::sync::Mutex::new(Some(delivery)),
                    armed: armed.clone(),
                };
                agentcomm_core::router::Delivery::new(envelope, Box::new(wrapped))
            });
            Ok(Subscription::from_stream(deliveries, control, &options))
        })
    }
    fn health(&self) -> BoxFuture<'_, Health> {
        self.inner.health()
    }
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        self.inner.close()
    }
}

/// Runs an agent spawned with `options` on a router whose first acknowledgement panics (the agent's
/// first job's, after its handler ran), with two jobs of one session waiting for it; then stops it
/// and spawns the next agent of its kind. Returns whether the agent said it no longer receives (before its stop),
/// how many jobs it and the next one handled, and how many deliveries its stop report says it gave
/// back unhandled.
fn an_agent_whose_task_fails(options: AgentOptions, next_gets: usize) -> (bool, usize, usize, u64) {
    let (finished, outcome) = std::sync::mpsc::channel();
    // A runtime on one thread of its own: a loop that never awaits would hold up the whole runtime,
    // so the test watches it from outside.
    std::thread::spawn(move || {
        let tokio = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let result = tokio.block_on(async {
            let runtime = Runtime::new(AckPanics {
                inner: MemoryRouter::new(),
                armed: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            });
            let first = Arc::new(AtomicUsize::new(0));
            let agent = runtime
                .spawn_with(Counter(first.clone()), options)
                .await
                .unwrap();
            let client = runtime.publisher::<Client>();
            // One session: with several workers, both go to the worker that fails on the first.
            for id in 0..2 {
                client.publish("s1", Job { id }).await.unwrap();
            }
            let ended = timeout(WAIT, async {
                while agent.health().status != agentcomm_core::router::HealthStatus::Unhealthy {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .is_ok();
            let report = agent.stop(Duration::from_secs(1)).await;
            let next = Arc::new(AtomicUsize::new(0));
            runtime.spawn(Counter(next.clone())).await.unwrap();
            let _ = timeout(WAIT, async {
                while next.load(Ordering::SeqCst) < next_gets {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await;
            (
                ended,
                first.load(Ordering::SeqCst),
                next.load(Ordering::SeqCst),
                report.requeued,
            )
        });
        let _ = finished.send(result);
    });
    outcome
        .recv_timeout(Duration::from_secs(30))
        .expect("the agent whose task failed stopped, and the next one ran")
}

/// An agent with several workers whose worker task fails stops taking messages, gives back what it
/// buffered, and can be stopped; the next agent of its kind handles its messages. It used to give
/// its buffered messages back while its subscription was still open: the in-memory router handed
/// each one straight back to it, and the agent span in that loop for ever, stop or no stop.
#[test]
fn an_agent_whose_worker_fails_leaves_its_messages_to_the_next_one() {
    let (ended, first, next, _) =
        an_agent_whose_task_fails(AgentOptions::new().concurrency(2).prefetch(8), 2);
    assert!(
        ended,
        "the agent whose worker failed says it no longer receives"
    );
    assert_eq!(
        (first, next),
        (1, 2),
        "jobs handled by the agent whose worker failed (job 0, not acknowledged), and by the next \
         one (job 0 again and job 1)"
    );
}

/// The same with one worker, whose loop is the agent's task itself: a panic there ended the task,
/// and the agent's health said Healthy until it was stopped (nothing was logged either), although
/// it no longer received anything.
#[test]
fn an_agent_whose_only_task_fails_says_it_no_longer_receives() {
    let (ended, first, next, _) = an_agent_whose_task_fails(AgentOptions::new().concurrency(1), 2);
    assert!(
        ended,
        "the agent whose task failed says it no longer receives"
    );
    assert_eq!(
        (first, next),
        (1, 2),
        "jobs handled by the agent whose task failed (job 0, not acknowledged), and by the next one \
         (job 0 again and job 1)"
    );
}

/// A fan-out agent whose worker fails gives each delivery it still held back once. The one it was
/// handing to the gone worker went back before the subscription was closed: the in-memory router
/// handed it straight back, and it was given back (and counted) a second time. Here job 1 waited in
/// the failed worker's queue and came back; job 0, whose acknowledgement panicked, came back too.
#[test]
fn a_fan_out_agent_whose_worker_fails_gives_each_delivery_back_once() {
    let (ended, first, next, requeued) =
        an_agent_whose_task_fails(AgentOptions::new().concurrency(2).prefetch(8).fan_out(), 0);
    assert!(
        ended,
        "the agent whose worker failed says it no longer receives"
    );
    // A fan-out subscription's messages go with it: the next agent has none of them.
    assert_eq!((first, next), (1, 0), "jobs handled");
    assert_eq!(
        requeued, 2,
        "deliveries given back unhandled, for 2 messages"
    );
}
