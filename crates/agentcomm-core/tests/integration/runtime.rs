//! The agent runtime on the in-memory router: dispatch, ack, retry, dead letters, panics, request/reply,
//! concurrency with per-session order, graceful shutdown and health.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use agentcomm_core::backoff::Backoff;
use agentcomm_core::envelope::headers;
use agentcomm_core::prelude::*;
use agentcomm_core::router::{Capabilities, Delivery, SubscribeOptions, Subscription};
use agentcomm_core::runtime::AgentState;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify, mpsc};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[message(direction = "request")]
struct PaymentRequest {
    #[message(min = 0.0)]
    amount: f64,
    user_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[message(direction = "response")]
struct PaymentResponse {
    success: bool,
    transaction_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
struct Job {
    id: u32,
    behaviour: Behaviour,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
enum Behaviour {
    Succeed,
    FailTimes(u32),
    FailForever,
    FailPermanently,
    Panic,
    PanicOnce,
    Sleep(u64),
}

fn fast_retries(max_attempts: u32) -> AgentOptions {
    AgentOptions::new()
        .max_attempts(max_attempts)
        .backoff(Backoff::new(Duration::from_millis(5), Duration::from_millis(20)).jitter(0.0))
}

#[agent(receives = [PaymentRequest], sends = [PaymentResponse])]
struct PaymentAgent;

impl Handle<PaymentRequest> for PaymentAgent {
    async fn handle(&self, request: PaymentRequest, ctx: &Context<Self>) -> HandlerResult {
        ctx.reply(PaymentResponse {
            success: request.amount > 0.0,
            transaction_id: format!("TXN-{}-{}", request.user_id, ctx.session()),
        })
        .await?;
        Ok(())
    }
}

#[agent(sends = [PaymentRequest, Job])]
struct Client;

/// Runs jobs as they say, and reports each attempt.
#[agent(receives = [Job])]
struct Worker {
    attempts: mpsc::UnboundedSender<(u32, u32)>,
    seen: Arc<std::sync::Mutex<std::collections::HashMap<u32, u32>>>,
}

impl Worker {
    fn new() -> (Self, mpsc::UnboundedReceiver<(u32, u32)>) {
        let (attempts, receiver) = mpsc::unbounded_channel();
        (
            Worker {
                attempts,
                seen: Arc::default(),
            },
            receiver,
        )
    }
}

impl Handle<Job> for Worker {
    async fn handle(&self, job: Job, ctx: &Context<Self>) -> HandlerResult {
        let count = {
            let mut seen = self.seen.lock().unwrap();
            let count = seen.entry(job.id).or_default();
            *count += 1;
            *count
        };
        let _ = self.attempts.send((job.id, ctx.attempt()));
        match job.behaviour {
            Behaviour::Succeed => Ok(()),
            Behaviour::FailTimes(n) if count <= n => {
                Err(HandlerError::msg(format!("failure {count} of {n}")))
            }
            Behaviour::FailTimes(_) => Ok(()),
            Behaviour::FailForever => Err(std::io::Error::other("the disk is full").into()),
            Behaviour::FailPermanently => Err(HandlerError::permanent("card number is invalid")),
            Behaviour::Panic => panic!("handler bug for job {}", job.id),
            Behaviour::PanicOnce if count == 1 => panic!("first attempt of job {} panics", job.id),
            Behaviour::PanicOnce => Ok(()),
            Behaviour::Sleep(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(())
            }
        }
    }
}

async fn dead_letters(router: &SharedRouterHandle) -> Subscription {
    router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("DeadLetter:*:*").unwrap(),
        ))
        .await
        .unwrap()
}

type SharedRouterHandle = agentcomm_core::router::SharedRouter;

async fn next(subscription: &mut Subscription) -> Delivery {
    timeout(WAIT, subscription.next())
        .await
        .expect("a delivery within 5 s")
        .expect("the subscription is open")
}

async fn recv<T>(receiver: &mut mpsc::UnboundedReceiver<T>) -> T {
    timeout(WAIT, receiver.recv())
        .await
        .expect("within 5 s")
        .expect("channel open")
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after 5 s waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn request_reply_round_trip_with_correlation() {
    let runtime = Runtime::new(MemoryRouter::new());
    runtime.spawn(PaymentAgent).await.unwrap();
    let client = runtime.publisher::<Client>();
    let response: PaymentResponse = client
        .request(
            "session456",
            PaymentRequest {
                amount: 100.0,
                user_id: "user123".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        response,
        PaymentResponse {
            success: true,
            transaction_id: "TXN-user123-session456".into()
        }
    );
    // Many concurrent requests each get their own answer.
    let answers = futures::future::join_all((0..50).map(|i| {
        let client = client.clone();
        async move {
            client
                .request::<PaymentRequest, PaymentResponse>(
                    &format!("s{i}"),
                    PaymentRequest {
                        amount: i as f64,
                        user_id: format!("u{i}"),
                    },
                )
                .await
        }
    }))
    .await;
    for (i, answer) in answers.into_iter().enumerate() {
        let answer = answer.unwrap();
        assert_eq!(answer.transaction_id, format!("TXN-u{i}-s{i}"));
        assert_eq!(answer.success, i > 0);
    }
}

#[tokio::test]
async fn a_plain_publish_is_answered_on_the_response_direction_of_its_session() {
    let runtime = Runtime::new(MemoryRouter::new());
    runtime.spawn(PaymentAgent).await.unwrap();
    let mut responses = runtime
        .router()
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("PaymentResponse:*:*").unwrap(),
        ))
        .await
        .unwrap();
    let published = runtime
        .publisher::<Client>()
        .publish(
            "s9",
            PaymentRequest {
                amount: 1.0,
                user_id: "u".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        published,
        agentcomm_core::router::PublishOutcome::Delivered(1)
    );
    let delivery = next(&mut responses).await;
    let envelope = delivery.envelope();
    assert_eq!(envelope.channel().name(), "PaymentResponse:response:s9");
    assert!(envelope.correlation_id().is_some());
}

#[tokio::test]
async fn a_request_nobody_receives_fails_at_once_and_a_silent_agent_times_out() {
    let runtime = Runtime::new(MemoryRouter::new());
    let client = runtime.publisher::<Client>();
    let error = client
        .request::<PaymentRequest, PaymentResponse>(
            "s1",
            PaymentRequest {
                amount: 1.0,
                user_id: "u".into(),
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(error, Error::NoAgentFound { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .contains("No agent found for message class 'PaymentRequest'"),
        "{error}"
    );

    // Something receives but never replies: the request times out with a message that helps.
    let _silent = runtime
        .router()
        .subscribe(SubscribeOptions::new(PaymentRequest::pattern()))
        .await
        .unwrap();
    let error = client
        .request_timeout::<PaymentRequest, PaymentResponse>(
            "s1",
            PaymentRequest {
                amount: 1.0,
                user_id: "u".into(),
            },
            Duration::from_millis(50),
        )
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Timeout { .. }), "{error:?}");
    let text = error.to_string();
    assert!(
        text.starts_with(
            "timed out after 50ms waiting for the PaymentResponse reply to PaymentRequest"
        ) && text.contains("a dead letter with agentcomm-original-id")
            && text.contains("'DeadLetter:PaymentRequest:*'"),
        "{text}"
    );
    // The replier may have answered: on a backend that delivers replies at most once, a reply that
    // comes while the requester's inbox is reconnecting is lost, and the text must not send the user
    // only after a replier that did its work.
    assert!(
        text.contains("the reply was lost on its way")
            && text.contains("while this requester's connection is reconnecting")
            && text.contains("send the request again"),
        "{text}"
    );
}

/// A request with no time to wait is refused before it is published: it would otherwise reach the
/// agent, be handled (a payment made), and have its reply dropped while the caller reads "timed out".
#[tokio::test]
async fn a_request_with_a_zero_timeout_is_refused_before_it_is_published() {
    let router = MemoryRouter::new();
    let runtime = Runtime::builder(router.clone())
        .request_timeout(Duration::ZERO)
        .build();
    let mut requests = router
        .subscribe(SubscribeOptions::new(PaymentRequest::pattern()))
        .await
        .unwrap();
    let client = runtime.publisher::<Client>();
    let request = || PaymentRequest {
        amount: 1.0,
        user_id: "u".into(),
    };
    let errors = [
        client
            .request::<PaymentRequest, PaymentResponse>("s1", request())
            .await
            .unwrap_err(),
        client
            .request_timeout::<PaymentRequest, PaymentResponse>("s1", request(), Duration::ZERO)
            .await
            .unwrap_err(),
    ];
    for error in errors {
        assert!(matches!(error, Error::Config { .. }), "{error:?}");
        let text = error.to_string();
        assert!(
            text.contains("request timeout='0ns' is not valid")
                && text.contains("RuntimeBuilder::request_timeout"),
            "{text}"
        );
    }
    assert!(requests.try_next().is_none(), "nothing was published");
    assert_eq!(router.health().await.get("published"), 0);
}

#[tokio::test]
async fn a_request_is_told_at_once_when_its_inbox_closes_and_never_leaks_its_registration() {
    let router = MemoryRouter::new();
    let runtime = Runtime::new(router.clone());
    // Something receives the requests but never answers.
    let _silent = runtime
        .router()
        .subscribe(SubscribeOptions::new(PaymentRequest::pattern()))
        .await
        .unwrap();
    let client = runtime.publisher::<Client>();
    let request = || PaymentRequest {
        amount: 1.0,
        user_id: "u".into(),
    };

    // Cancelled by the caller: nothing stays registered.
    let cancelled = timeout(
        Duration::from_millis(50),
        client.request_timeout::<PaymentRequest, PaymentResponse>("s1", request(), WAIT),
    )
    .await;
    assert!(cancelled.is_err(), "the caller gave up first");
    assert_eq!(runtime.bus().pending_requests(), 0);

    // The router closes while a request waits: it fails at once with Closed, not after its timeout.
    let started = tokio::time::Instant::now();
    let (answer, ()) = tokio::join!(
        client.request_timeout::<PaymentRequest, PaymentResponse>(
            "s1",
            request(),
            Duration::from_secs(30)
        ),
        async {
            wait_until("the request is waiting", || {
                runtime.bus().pending_requests() == 1
            })
            .await;
            router.close().await.unwrap();
        }
    );
    let error = answer.unwrap_err();
    assert!(matches!(error, Error::Closed { .. }), "{error:?}");
    assert!(
        started.elapsed() < WAIT,
        "told within {:?}",
        started.elapsed()
    );
    assert_eq!(runtime.bus().pending_requests(), 0);
}

/// A router that loses every reply inbox subscription as soon as it is made (a broker connection
/// that keeps failing, say), and is otherwise the in-memory router.
struct LosesInboxes(MemoryRouter);

impl Router for LosesInboxes {
    fn backend(&self) -> &str {
        "loses-inboxes"
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    fn publish(
        &self,
        envelope: Envelope,
    ) -> agentcomm_core::router::BoxFuture<'_, Result<agentcomm_core::router::PublishOutcome>> {
        self.0.publish(envelope)
    }
    fn subscribe(
        &self,
        options: SubscribeOptions,
    ) -> agentcomm_core::router::BoxFuture<'_, Result<Subscription>> {
        Box::pin(async move {
            let inbox = options
                .patterns
                .iter()
                .any(|pattern| pattern.direction() == Some("reply"));
            let subscription = self.0.subscribe(options).await?;
            if inbox {
                subscription.close().await?;
            }
            Ok(subscription)
        })
    }
    fn health(&self) -> agentcomm_core::router::BoxFuture<'_, agentcomm_core::router::Health> {
        self.0.health()
    }
    fn close(&self) -> agentcomm_core::router::BoxFuture<'_, Result<()>> {
        self.0.close()
    }
}

/// A request whose inbox subscription ends while it starts is told at once, however the ending task
/// and the request interleave: registered after the task dropped the waiters, it used to wait out its
/// whole timeout for replies nobody read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_inbox_ends_as_it_starts_is_told_at_once() {
    let memory = MemoryRouter::new();
    // Takes the requests (so that they are routable) and never answers.
    let mut requests = memory
        .subscribe(SubscribeOptions::new(PaymentRequest::pattern()))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Some(delivery) = requests.next().await {
            let _ = delivery.ack().await;
        }
    });
    let runtime = Runtime::new(LosesInboxes(memory));
    let client = runtime.publisher::<Client>();
    for round in 0..200 {
        let started = tokio::time::Instant::now();
        let error = client
            .request_timeout::<PaymentRequest, PaymentResponse>(
                "s1",
                PaymentRequest {
                    amount: 1.0,
                    user_id: "u".into(),
                },
                Duration::from_secs(2),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(error, Error::Closed { .. }),
            "round {round}: {error} (after {:?})",
            started.elapsed()
        );
        assert_eq!(runtime.bus().pending_requests(), 0);
    }
}

/// The in-memory router, but each reply inbox subscription waits until the test lets it through, and
/// the test can end the inbox subscriptions made so far (a broker connection lost, say).
struct GatedInboxes {
    inner: MemoryRouter,
    /// How many inbox subscribes have started.
    entered: tokio::sync::watch::Sender<u32>,
    /// How many inbox subscribes may finish.
    allowed: tokio::sync::watch::Sender<u32>,
    made: std::sync::Mutex<Vec<agentcomm_core::router::SubscriptionCloser>>,
}

impl GatedInboxes {
    fn new(inner: MemoryRouter) -> Arc<Self> {
        Arc::new(GatedInboxes {
            inner,
            entered: tokio::sync::watch::Sender::new(0),
            allowed: tokio::sync::watch::Sender::new(0),
            made: std::sync::Mutex::default(),
        })
    }

    async fn wait_entered(&self, count: u32) {
        timeout(WAIT, self.entered.subscribe().wait_for(|n| *n >= count))
            .await
            .expect("the inbox subscribe starts")
            .unwrap();
    }

    fn allow(&self, count: u32) {
        self.allowed.send_replace(count);
    }

    async fn end_inboxes(&self) {
        let closers: Vec<_> = self.made.lock().unwrap().drain(..).collect();
        for closer in closers {
            closer.close().await.unwrap();
        }
    }
}

impl Router for GatedInboxes {
    fn backend(&self) -> &str {
        "gated-inboxes"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn publish(
        &self,
        envelope: Envelope,
    ) -> agentcomm_core::router::BoxFuture<'_, Result<agentcomm_core::router::PublishOutcome>> {
        self.inner.publish(envelope)
    }
    fn subscribe(
        &self,
        options: SubscribeOptions,
    ) -> agentcomm_core::router::BoxFuture<'_, Result<Subscription>> {
        Box::pin(async move {
            let inbox = options
                .patterns
                .iter()
                .any(|pattern| pattern.direction() == Some("reply"));
            if !inbox {
                return self.inner.subscribe(options).await;
            }
            let mut number = 0;
            self.entered.send_modify(|entered| {
                *entered += 1;
                number = *entered;
            });
            timeout(WAIT, self.allowed.subscribe().wait_for(|n| *n >= number))
                .await
                .expect("the test lets the inbox subscribe through")
                .unwrap();
            let subscription = self.inner.subscribe(options).await?;
            self.made.lock().unwrap().push(subscription.closer());
            Ok(subscription)
        })
    }
    fn health(&self) -> agentcomm_core::router::BoxFuture<'_, agentcomm_core::router::Health> {
        self.inner.health()
    }
    fn close(&self) -> agentcomm_core::router::BoxFuture<'_, Result<()>> {
        self.inner.close()
    }
}

/// A request waiting for its inbox's subscription, which is lost and being made again by another
/// request when it gets to register, waits for the new one and is answered: it used to fail with
/// `Closed` (the listener it found then was not subscribed yet), though nothing was lost.
#[tokio::test]
async fn a_request_whose_inbox_is_being_made_again_waits_for_it() {
    let memory = MemoryRouter::new();
    // Session "silent": taken (so that requests are routable), never answered.
    let mut silent = memory
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("PaymentRequest:request:silent").unwrap(),
        ))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Some(delivery) = silent.next().await {
            let _ = delivery.ack().await;
        }
    });
    let router = GatedInboxes::new(memory);
    let runtime = Runtime::new(router.clone());
    runtime
        .spawn_with(PaymentAgent, AgentOptions::new().session("s1"))
        .await
        .unwrap();
    let client = runtime.publisher::<Client>();
    let request = |session: &'static str| {
        let client = client.clone();
        async move {
            client
                .request_timeout::<PaymentRequest, PaymentResponse>(
                    session,
                    PaymentRequest {
                        amount: 1.0,
                        user_id: "u".into(),
                    },
                    WAIT,
                )
                .await
        }
    };

    // The first request has the inbox subscribed; it waits at the gate.
    let first = tokio::spawn(request("silent"));
    router.wait_entered(1).await;
    // This one waits for that subscription.
    let mut waiting = Box::pin(request("s1"));
    assert!(futures::poll!(&mut waiting).is_pending());
    // Subscribed; then lost, which the first request (still waiting for its reply) is told.
    router.allow(1);
    timeout(WAIT, async {
        while runtime.bus().pending_requests() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the first request waits for its reply");
    router.end_inboxes().await;
    let lost = timeout(WAIT, first).await.unwrap().unwrap().unwrap_err();
    assert!(matches!(lost, Error::Closed { .. }), "{lost:?}");
    // A third request has the inbox subscribed again, and waits at the gate.
    let third = tokio::spawn(request("s1"));
    router.wait_entered(2).await;
    // The waiting request gets on now, while the new subscription is being made.
    let polled = futures::poll!(&mut waiting);
    assert!(
        polled.is_pending(),
        "the request waits for the inbox being made again, instead of: {polled:?}"
    );
    router.allow(2);
    let answer = timeout(WAIT, waiting).await.unwrap().unwrap();
    assert!(answer.success);
    assert!(
        timeout(WAIT, third)
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .success
    );
    assert_eq!(runtime.bus().pending_requests(), 0);
}

/// The in-memory router, whose first reply inbox subscribe panics (a bug in a router).
struct PanicsOnFirstInbox {
    inner: MemoryRouter,
    panicked: std::sync::atomic::AtomicBool,
}

impl Router for PanicsOnFirstInbox {
    fn backend(&self) -> &str {
        "panics-on-first-inbox"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn publish(
        &self,
        envelope: Envelope,
    ) -> agentcomm_core::router::BoxFuture<'_, Result<agentcomm_core::router::PublishOutcome>> {
        self.inner.publish(envelope)
    }
    fn subscribe(
        &self,
        options: SubscribeOptions,
    ) -> agentcomm_core::router::BoxFuture<'_, Result<Subscription>> {
        Box::pin(async move {
            let inbox = options
                .patterns
                .iter()
                .any(|pattern| pattern.direction() == Some("reply"));
            if inbox && !self.panicked.swap(true, Ordering::SeqCst) {
                panic!("the router's subscribe panics (this is the test)");
            }
            self.inner.subscribe(options).await
        })
    }
    fn health(&self) -> agentcomm_core::router::BoxFuture<'_, agentcomm_core::router::Health> {
        self.inner.health()
    }
    fn close(&self) -> agentcomm_core::router::BoxFuture<'_, Result<()>> {
        self.inner.close()
    }
}

/// A reply inbox whose set-up died (the router panicked) is forgotten: the request that asked for it
/// fails at once, and the next one subscribes again and is answered, instead of waiting for good for a
/// subscription nobody is making.
#[tokio::test]
async fn an_inbox_whose_set_up_died_is_made_again_by_the_next_request() {
    let runtime = Runtime::new(PanicsOnFirstInbox {
        inner: MemoryRouter::new(),
        panicked: std::sync::atomic::AtomicBool::new(false),
    });
    runtime.spawn(PaymentAgent).await.unwrap();
    let client = runtime.publisher::<Client>();
    let request = || {
        client.request_timeout::<PaymentRequest, PaymentResponse>(
            "s1",
            PaymentRequest {
                amount: 1.0,
                user_id: "u".into(),
            },
            WAIT,
        )
    };
    let started = tokio::time::Instant::now();
    let (first, second) = tokio::join!(request(), request());
    assert!(
        matches!(first, Err(Error::Closed { .. })),
        "the request whose set-up died: {first:?}"
    );
    assert!(second.unwrap().success, "the request that waited for it");
    assert!(
        started.elapsed() < WAIT,
        "told within {:?}",
        started.elapsed()
    );
    assert!(request().await.unwrap().success);
}

/// A client kept across Tokio runtimes (a `static` one shared by `#[tokio::test]`s, each on a runtime of
/// its own): the agents on a runtime that lives on, the client's requests made on others.
struct AcrossRuntimes {
    /// Runs the agents; it outlives the runtimes the requests are made on.
    agents: tokio::runtime::Runtime,
    runtime: Runtime,
    client: Publisher<Client>,
}

impl AcrossRuntimes {
    fn new() -> Self {
        let agents = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let runtime = agents.block_on(async {
            let runtime = Runtime::new(MemoryRouter::new());
            runtime.spawn(PaymentAgent).await.unwrap();
            runtime
        });
        let client = runtime.publisher::<Client>();
        AcrossRuntimes {
            agents,
            runtime,
            client,
        }
    }

    fn request(&self) -> impl Future<Output = Result<PaymentResponse>> + Send + 'static {
        let client = self.client.clone();
        async move {
            client
                .request_timeout::<PaymentRequest, PaymentResponse>(
                    "s1",
                    PaymentRequest {
                        amount: 1.0,
                        user_id: "u".into(),
                    },
                    Duration::from_secs(2),
                )
                .await
        }
    }

    /// A Tokio runtime of its own, as each `#[tokio::test]` has.
    fn other_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn finish(self) {
        let AcrossRuntimes {
            agents,
            runtime,
            client,
        } = self;
        agents.block_on(async move {
            drop(client);
            runtime.shutdown(WAIT).await.unwrap();
        });
    }
}

/// A request given up on a Tokio runtime that then ends, before the task setting its reply inbox up
/// first ran: that task is dropped without running, and the inbox must not go on waiting for it. The
/// same client's next request, on another runtime, used to wait for that set-up until it timed out, as
/// did every later request of that reply class.
#[test]
fn a_request_given_up_with_its_runtime_before_its_inbox_was_made_leaves_it_to_the_next() {
    let setting = AcrossRuntimes::new();
    let other = AcrossRuntimes::other_runtime();
    other.block_on(async {
        let mut request = std::pin::pin!(setting.request());
        assert!(futures::poll!(&mut request).is_pending());
    });
    drop(other);
    let answered = setting.agents.block_on(setting.request());
    assert!(answered.unwrap().success);
    setting.finish();
}

/// A client's reply inbox read by a task on a Tokio runtime that has ended since: the next request,
/// on another runtime, has the inbox subscribed again. It used to register with the inbox whose task
/// was gone, and wait for a reply nobody read until it timed out, as did every later request of that
/// reply class.
#[test]
fn a_reply_inbox_read_on_an_ended_runtime_is_made_again() {
    let setting = AcrossRuntimes::new();
    let other = AcrossRuntimes::other_runtime();
    assert!(other.block_on(setting.request()).unwrap().success);
    drop(other);
    let answered = setting.agents.block_on(setting.request());
    assert!(answered.unwrap().success);
    setting.finish();
}

/// Answers payment requests, but holds the one of user "hold" until told.
#[agent(receives = [PaymentRequest], sends = [PaymentResponse])]
struct HeldPayments {
    asked: Arc<Notify>,
    release: Arc<Notify>,
}

impl Handle<PaymentRequest> for HeldPayments {
    async fn handle(&self, request: PaymentRequest, ctx: &Context<Self>) -> HandlerResult {
        if request.user_id == "hold" {
            self.asked.notify_one();
            self.release.notified().await;
        }
        ctx.reply(PaymentResponse {
            success: true,
            transaction_id: request.user_id,
        })
        .await?;
        Ok(())
    }
}

/// A client shared by several Tokio runtimes has its reply inbox read on the runtime of the request
/// that first needed it. When that runtime ends, a request waiting on another runtime, which lives
/// on, is told at once that its inbox closed, and the error says why: it used to blame the router
/// ("the router closed or lost it"), which was open and fine.
#[test]
fn a_request_whose_inbox_ended_with_another_runtime_is_told_that_runtime_ended() {
    let agents = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (asked, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let runtime = agents.block_on(async {
        let runtime = Runtime::new(MemoryRouter::new());
        runtime
            .spawn(HeldPayments {
                asked: asked.clone(),
                release: release.clone(),
            })
            .await
            .unwrap();
        runtime
    });
    let client = runtime.publisher::<Client>();
    let request = |user: &str| {
        let client = client.clone();
        let user_id = user.to_string();
        async move {
            client
                .request_timeout::<PaymentRequest, PaymentResponse>(
                    "s1",
                    PaymentRequest {
                        amount: 1.0,
                        user_id,
                    },
                    Duration::from_secs(30),
                )
                .await
        }
    };
    // The inbox is made, and read, on a runtime of its own, as a first #[tokio::test]'s.
    let other = AcrossRuntimes::other_runtime();
    assert!(other.block_on(request("first")).unwrap().success);
    // A request on the runtime that lives on is registered with it and published...
    let held = agents.spawn(request("hold"));
    agents.block_on(async { timeout(WAIT, asked.notified()).await.unwrap() });
    // ...when the runtime reading the inbox ends.
    drop(other);
    let error = agents
        .block_on(async { timeout(WAIT, held).await })
        .expect("told at once, not after its 30 s timeout")
        .unwrap()
        .unwrap_err();
    match error {
        Error::Closed { what, hint } => {
            assert_eq!(what, "the reply inbox");
            assert!(hint.contains("Tokio runtime"), "{hint}");
        }
        other => panic!("{other}"),
    }
    release.notify_one();
    // The next request has the inbox made again, on its own runtime.
    assert!(agents.block_on(request("next")).unwrap().success);
    agents.block_on(async move {
        drop(client);
        runtime.shutdown(WAIT).await.unwrap();
    });
}

/// A router shared by several runtimes outlives each of them: a runtime dropped without `shutdown`
/// (which would close the router for all) must take its reply inbox's subscriptions with it, not leave
/// one per runtime and reply class on the router for as long as it lives.
#[tokio::test]
async fn a_dropped_runtime_leaves_no_reply_inbox_on_a_shared_router() {
    let router = MemoryRouter::new();
    // Something receives the requests but never answers.
    let _silent = router
        .subscribe(SubscribeOptions::new(PaymentRequest::pattern()))
        .await
        .unwrap();
    let subscriptions = || async { router.health().await.get("subscriptions") };
    assert_eq!(subscriptions().await, 1);
    for round in 0..3 {
        let runtime = Runtime::new(router.clone());
        let error = runtime
            .publisher::<Client>()
            .request_timeout::<PaymentRequest, PaymentResponse>(
                &format!("s{round}"),
                PaymentRequest {
                    amount: 1.0,
                    user_id: "u".into(),
                },
                Duration::from_millis(20),
            )
            .await
            .unwrap_err();
        assert!(matches!(error, Error::Timeout { .. }), "{error:?}");
        assert_eq!(
            subscriptions().await,
            2,
            "the request's inbox is subscribed"
        );
        drop(runtime);
        let deadline = tokio::time::Instant::now() + WAIT;
        while subscriptions().await != 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: the dropped runtime's reply inbox is still subscribed after 5 s ({} subscriptions)",
                subscriptions().await
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

#[tokio::test]
async fn stopping_twice_waits_for_the_first_stop_and_gives_its_report() {
    let runtime = Runtime::new(MemoryRouter::new());
    let (worker, mut attempts) = Worker::new();
    let agent = runtime.spawn(worker).await.unwrap();
    runtime
        .publisher::<Client>()
        .publish(
            "s1",
            Job {
                id: 1,
                behaviour: Behaviour::Sleep(300),
            },
        )
        .await
        .unwrap();
    recv(&mut attempts).await;
    let (first, second) = tokio::join!(agent.stop(WAIT), async {
        tokio::task::yield_now().await;
        agent.stop(WAIT).await
    });
    assert_eq!(first.handled, 1, "{first:?}");
    assert_eq!(second, first, "the second caller waited for the same stop");
    assert_eq!(agent.health().state, AgentState::Stopped);
}

#[tokio::test]
async fn failures_are_retried_with_backoff_then_succeed() {
    let runtime = Runtime::new(MemoryRouter::new());
    let (worker, mut attempts) = Worker::new();
    let agent = runtime.spawn_with(worker, fast_retries(5)).await.unwrap();
    runtime
        .publisher::<Client>()
        .publish(
            "s1",
            Job {
                id: 1,
                behaviour: Behaviour::FailTimes(2),
            },
        )
        .await
        .unwrap();
    assert_eq!(recv(&mut attempts).await, (1, 1));
    assert_eq!(recv(&mut attempts).await, (1, 2));
    assert_eq!(recv(&mut attempts).await, (1, 3));
    wait_until("the job is handled", || agent.health().handled == 1).await;
    let health = agent.health();
    assert_eq!(
        (health.failed, health.retried, health.dead_lettered),
        (2, 2, 0)
    );
}

#[tokio::test]
async fn after_max_attempts_a_message_is_dead_lettered_with_the_reason_in_headers() {
    let runtime = Runtime::new(MemoryRouter::new());
    let mut dead = dead_letters(runtime.router()).await;
    let (worker, mut attempts) = Worker::new();
    let agent = runtime.spawn_with(worker, fast_retries(3)).await.unwrap();
    runtime
        .publisher::<Client>()
        .publish(
            "s7",
            Job {
                id: 9,
                behaviour: Behaviour::FailForever,
            },
        )
        .await
        .unwrap();
    for attempt in 1..=3 {
        assert_eq!(recv(&mut attempts).await, (9, attempt));
    }
    let delivery = next(&mut dead).await;
    let letter = delivery.envelope();
    assert_eq!(letter.channel().name(), "DeadLetter:Job:s7");
    assert_eq!(letter.class(), "Job");
    assert_eq!(
        letter.header(headers::DEAD_LETTER_REASON),
        Some(headers::REASON_HANDLER_FAILED)
    );
    assert_eq!(letter.header(headers::ATTEMPTS), Some("3"));
    assert_eq!(letter.header(headers::ERROR), Some("the disk is full"));
    assert_eq!(letter.header(headers::AGENT), Some("Worker"));
    assert_eq!(
        letter.header(headers::ORIGINAL_CHANNEL),
        Some("Job:event:s7")
    );
    // The dead letter still carries the message, decodable as its class.
    let job: Job = agentcomm_core::runtime::decode_message(letter).unwrap();
    assert_eq!(job.id, 9);
    wait_until("the dead letter is counted", || {
        agent.health().dead_lettered == 1
    })
    .await;
    // And no fourth attempt comes.
    assert!(
        timeout(Duration::from_millis(100), attempts.recv())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_permanent_error_is_dead_lettered_without_retry() {
    let runtime = Runtime::new(MemoryRouter::new());
    let mut dead = dead_letters(runtime.router()).await;
    let (worker, mut attempts) = Worker::new();
    runtime.spawn_with(worker, fast_retries(5)).await.unwrap();
    runtime
        .publisher::<Client>()
        .publish(
            "s1",
            Job {
                id: 3,
                behaviour: Behaviour::FailPermanently,
            },
        )
        .await
        .unwrap();
    assert_eq!(recv(&mut attempts).await, (3, 1));
    let delivery = next(&mut dead).await;
    assert_eq!(
        delivery.envelope().header(headers::DEAD_LETTER_REASON),
        Some(headers::REASON_REJECTED)
    );
    assert_eq!(delivery.envelope().header(headers::ATTEMPTS), Some("1"));
    assert!(
        timeout(Duration::from_millis(100), attempts.recv())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_panicking_handler_is_caught_retried_and_the_agent_keeps_running() {
    let runtime = Runtime::new(MemoryRouter::new());
    let mut dead = dead_letters(runtime.router()).await;
    let (worker, mut attempts) = Worker::new();
    let agent = runtime.spawn_with(worker, fast_retries(2)).await.unwrap();
    let client = runtime.publisher::<Client>();
    client
        .publish(
            "s1",
            Job {
                id: 1,
                behaviour: Behaviour::PanicOnce,
            },
        )
        .await
        .unwrap();
    assert_eq!(recv(&mut attempts).await, (1, 1));
    assert_eq!(recv(&mut attempts).await, (1, 2));
    client
        .publish(
            "s1",
            Job {
                id: 2,
                behaviour: Behaviour::Panic,
            },
        )
        .await
        .unwrap();
    let delivery = next(&mut dead).await;
    assert_eq!(
        delivery.envelope().header(headers::ERROR),
        Some("handler panicked: handler bug for job 2")
    );
    client
        .publish(
            "s1",
            Job {
                id: 3,
                behaviour: Behaviour::Succeed,
            },
        )
        .await
        .unwrap();
    wait_until("the agent handled jobs 1 and 3", || {
        agent.health().handled == 2
    })
    .await;
    let health = agent.health();
    assert_eq!(health.panicked, 3, "{health:?}");
    assert_eq!(health.state, AgentState::Running);
}

/// Another program's JSON, labelled as HTTP tooling labels it (`application/json; charset=utf-8`),
/// reaches the handler; a charset JSON does not allow is dead-lettered naming the content type.
#[tokio::test]
async fn json_with_a_charset_parameter_is_handled() {
    let runtime = Runtime::new(MemoryRouter::new());
    let mut dead = dead_letters(runtime.router()).await;
    let (worker, mut attempts) = Worker::new();
    let agent = runtime.spawn_with(worker, fast_retries(5)).await.unwrap();
    let channel = Job::channel("event", "s1").unwrap();
    let json = br#"{"id":4,"behaviour":"Succeed"}"#;

    let labelled = Envelope::new(
        channel.clone(),
        "application/json; charset=utf-8",
        &json[..],
    );
    runtime.router().publish(labelled).await.unwrap();
    assert_eq!(recv(&mut attempts).await, (4, 1));
    wait_until("job 4 is handled", || agent.health().handled == 1).await;

    let latin1 = Envelope::new(channel, "application/json; charset=iso-8859-1", &json[..]);
    runtime.router().publish(latin1).await.unwrap();
    let letter = next(&mut dead).await;
    assert_eq!(
        letter.envelope().header(headers::DEAD_LETTER_REASON),
        Some(headers::REASON_UNDECODABLE)
    );
    assert!(
        letter.envelope().header(headers::ERROR).unwrap().contains(
            "content type 'application/json; charset=iso-8859-1' is not one agentcomm reads"
        ),
        "{:?}",
        letter.envelope().header(headers::ERROR)
    );
}

#[tokio::test]
async fn undecodable_invalid_and_undeclared_messages_are_dead_lettered_at_once() {
    let runtime = Runtime::new(MemoryRouter::new());
    let mut dead = dead_letters(runtime.router()).await;
    let (worker, mut attempts) = Worker::new();
    let agent = runtime.spawn_with(worker, fast_retries(5)).await.unwrap();
    let router = runtime.router();
    let channel = Job::channel("event", "s1").unwrap();

    let garbage = Envelope::new(
        channel.clone(),
        "application/msgpack",
        &b"\xc1\xc1 not msgpack"[..],
    );
    router.publish(garbage).await.unwrap();
    let letter = next(&mut dead).await;
    assert_eq!(
        letter.envelope().header(headers::DEAD_LETTER_REASON),
        Some(headers::REASON_UNDECODABLE)
    );
    assert!(
        letter
            .envelope()
            .header(headers::ERROR)
            .unwrap()
            .starts_with("could not decode Job")
    );

    let unknown_type = Envelope::new(channel.clone(), "text/plain", &b"hello"[..]);
    router.publish(unknown_type).await.unwrap();
    let letter = next(&mut dead).await;
    assert!(
        letter
            .envelope()
            .header(headers::ERROR)
            .unwrap()
            .contains("content type 'text/plain'")
    );

    // A class the agent does not declare, delivered on a channel it listens to.
    let stranger = Envelope::with_class("Stranger", channel, "application/json", &b"{}"[..]);
    router.publish(stranger).await.unwrap();
    let letter = next(&mut dead).await;
    assert_eq!(
        letter.envelope().header(headers::DEAD_LETTER_REASON),
        Some(headers::REASON_UNDECLARED_CLASS)
    );
    assert_eq!(
        letter.envelope().header(headers::ERROR),
        Some(
            "Message class 'Stranger' is not registered with agent 'Worker' (it does not declare this class in `receives`). \
             Derive `Message` for the type and list it in `#[agent(receives = [...])]`"
        )
    );

    // Nothing reached the handler, nothing was retried, and the agent still works.
    runtime
        .publisher::<Client>()
        .publish(
            "s1",
            Job {
                id: 5,
                behaviour: Behaviour::Succeed,
            },
        )
        .await
        .unwrap();
    assert_eq!(recv(&mut attempts).await, (5, 1));
    wait_until("job 5 is handled", || agent.health().handled == 1).await;
    let health = agent.health();
    assert_eq!(
        (health.rejected, health.retried, health.dead_lettered),
        (3, 0, 3)
    );
}

#[tokio::test]
async fn a_message_invalid_on_arrival_is_dead_lettered_as_invalid() {
    let runtime = Runtime::new(MemoryRouter::new());
    let mut dead = dead_letters(runtime.router()).await;
    runtime.spawn(PaymentAgent).await.unwrap();
    // Another program (or an older version) published a negative amount, bypassing our validation.
    let payload = Codec::Json
        .encode(
            "PaymentRequest",
            &serde_json::json!({"amount": -1.0, "user_id": "u"}),
        )
        .unwrap();
    let envelope = Envelope::new(
        PaymentRequest::channel("request", "s1").unwrap(),
        "application/json",
        payload,
    );
    runtime.router().publish(envelope).await.unwrap();
    let letter = next(&mut dead).await;
    assert_eq!(
        letter.envelope().header(headers::DEAD_LETTER_REASON),
        Some(headers::REASON_INVALID)
    );
    assert!(
        letter
            .envelope()
            .header(headers::ERROR)
            .unwrap()
            .contains("field `amount` breaks rule `min`")
    );
}

#[tokio::test]
async fn handlers_that_run_too_long_fail_and_are_retried() {
    let runtime = Runtime::new(MemoryRouter::new());
    let mut dead = dead_letters(runtime.router()).await;
    let (worker, mut attempts) = Worker::new();
    let options = fast_retries(2).handler_timeout(Some(Duration::from_millis(30)));
    runtime.spawn_with(worker, options).await.unwrap();
    runtime
        .publisher::<Client>()
        .publish(
            "s1",
            Job {
                id: 4,
                behaviour: Behaviour::Sleep(10_000),
            },
        )
        .await
        .unwrap();
    assert_eq!(recv(&mut attempts).await, (4, 1));
    assert_eq!(recv(&mut attempts).await, (4, 2));
    let letter = next(&mut dead).await;
    assert_eq!(
        letter.envelope().header(headers::ERROR),
        Some("handler timed out after 30ms (the limit AgentOptions::handler_timeout sets)")
    );
}

/// A handler time limit of zero would fail every handler that waits for anything: refused when the
/// agent is spawned, naming the setting, instead of showing up as timeouts and dead letters.
#[tokio::test]
async fn a_handler_time_limit_of_zero_is_refused_with_the_fix() {
    let runtime = Runtime::new(MemoryRouter::new());
    let (worker, _) = Worker::new();
    let options = AgentOptions::new().handler_timeout(Some(Duration::ZERO));
    let error = runtime.spawn_with(worker, options).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "AgentOptions::handler_timeout='Some(0ns)' is not valid: a limit above zero (every handler that \
         waits for anything would time out), or None for no limit"
    );
    assert!(runtime.agents().is_empty());
}

/// A subscription without patterns is refused with what to give instead.
#[tokio::test]
async fn a_subscription_without_patterns_is_refused_with_the_fix() {
    let router = MemoryRouter::new();
    let error = router
        .subscribe(SubscribeOptions::patterns(Vec::new()))
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "subscription patterns='[]' is not valid: at least one pattern: SubscribeOptions::new(pattern), \
         or a non-empty list to SubscribeOptions::patterns"
    );
}

/// Records the order of jobs per session; a job of session "slow" waits until a job of another session
/// has started, which can only happen if sessions run concurrently.
#[agent(receives = [Job])]
struct Ordered {
    log: Arc<Mutex<Vec<(String, u32)>>>,
    other_started: Arc<Notify>,
}

impl Handle<Job> for Ordered {
    async fn handle(&self, job: Job, ctx: &Context<Self>) -> HandlerResult {
        if ctx.session() == "slow" && job.id == 0 {
            timeout(WAIT, self.other_started.notified())
                .await
                .map_err(|_| HandlerError::permanent("sessions did not run concurrently"))?;
        } else if ctx.session() != "slow" {
            self.other_started.notify_one();
        }
        tokio::task::yield_now().await;
        self.log
            .lock()
            .await
            .push((ctx.session().to_string(), job.id));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_runs_sessions_in_parallel_and_keeps_each_sessions_order() {
    let runtime = Runtime::new(MemoryRouter::new());
    let log = Arc::new(Mutex::new(Vec::new()));
    let agent = Ordered {
        log: log.clone(),
        other_started: Arc::new(Notify::new()),
    };
    let handle = runtime
        .spawn_with(agent, AgentOptions::new().concurrency(8))
        .await
        .unwrap();
    let client = runtime.publisher::<Client>();
    let sessions = ["slow", "a", "b", "c", "d", "e", "f", "g"];
    for id in 0..50 {
        for session in sessions {
            client
                .publish(
                    session,
                    Job {
                        id,
                        behaviour: Behaviour::Succeed,
                    },
                )
                .await
                .unwrap();
        }
    }
    wait_until("all 400 jobs are handled", || {
        handle.health().handled == 400
    })
    .await;
    let log = log.lock().await;
    for session in sessions {
        let ids: Vec<u32> = log
            .iter()
            .filter(|(s, _)| s == session)
            .map(|(_, id)| *id)
            .collect();
        assert_eq!(
            ids,
            (0..50).collect::<Vec<_>>(),
            "order of session {session}"
        );
    }
    assert_eq!(handle.health().dead_lettered, 0);
}

#[tokio::test]
async fn an_agent_can_listen_to_one_session_only() {
    let runtime = Runtime::new(MemoryRouter::new());
    let (worker, mut attempts) = Worker::new();
    runtime
        .spawn_with(worker, AgentOptions::new().session("mine"))
        .await
        .unwrap();
    let client = runtime.publisher::<Client>();
    let outcome = client
        .publish(
            "other",
            Job {
                id: 1,
                behaviour: Behaviour::Succeed,
            },
        )
        .await
        .unwrap();
    assert!(outcome.is_unroutable());
    client
        .publish(
            "mine",
            Job {
                id: 2,
                behaviour: Behaviour::Succeed,
            },
        )
        .await
        .unwrap();
    assert_eq!(recv(&mut attempts).await, (2, 1));
}

#[tokio::test]
async fn one_agent_type_spawned_per_session_keeps_each_sessions_messages_apart() {
    let runtime = Runtime::new(MemoryRouter::new());
    let (alice, mut alice_attempts) = Worker::new();
    let (bob, mut bob_attempts) = Worker::new();
    let a = runtime
        .spawn_with(alice, AgentOptions::new().session("alice"))
        .await
        .unwrap();
    runtime
        .spawn_with(bob, AgentOptions::new().session("bob"))
        .await
        .unwrap();
    assert_eq!(
        a.health().subscription,
        "group 'Worker.alice' on Job:*:alice"
    );
    let client = runtime.publisher::<Client>();
    for id in 0..10 {
        client
            .publish(
                "alice",
                Job {
                    id,
                    behaviour: Behaviour::Succeed,
                },
            )
            .await
            .unwrap();
        client
            .publish(
                "bob",
                Job {
                    id: 100 + id,
                    behaviour: Behaviour::Succeed,
                },
            )
            .await
            .unwrap();
    }
    for id in 0..10 {
        assert_eq!(recv(&mut alice_attempts).await, (id, 1));
        assert_eq!(recv(&mut bob_attempts).await, (100 + id, 1));
    }
}

#[tokio::test]
async fn instances_of_one_agent_share_work_and_fan_out_instances_each_get_a_copy() {
    let runtime = Runtime::new(MemoryRouter::new());
    let (first, mut first_attempts) = Worker::new();
    let (second, mut second_attempts) = Worker::new();
    let a = runtime.spawn(first).await.unwrap();
    let b = runtime.spawn(second).await.unwrap();
    let client = runtime.publisher::<Client>();
    for id in 0..100 {
        client
            .publish(
                "s1",
                Job {
                    id,
                    behaviour: Behaviour::Sleep(1),
                },
            )
            .await
            .unwrap();
    }
    wait_until("the group handled 100 jobs", || {
        a.health().handled + b.health().handled == 100
    })
    .await;
    let mut total = 0;
    while let Ok((_, _)) = first_attempts.try_recv() {
        total += 1;
    }
    while let Ok((_, _)) = second_attempts.try_recv() {
        total += 1;
    }
    assert_eq!(total, 100, "each job once across the group");
    assert!(
        a.health().handled > 0 && b.health().handled > 0,
        "both members worked"
    );

    let runtime = Runtime::new(MemoryRouter::new());
    let (first, _) = Worker::new();
    let (second, _) = Worker::new();
    let a = runtime
        .spawn_with(first, AgentOptions::new().fan_out())
        .await
        .unwrap();
    let b = runtime
        .spawn_with(second, AgentOptions::new().fan_out())
        .await
        .unwrap();
    for id in 0..20 {
        runtime
            .publisher::<Client>()
            .publish(
                "s1",
                Job {
                    id,
                    behaviour: Behaviour::Succeed,
                },
            )
            .await
            .unwrap();
    }
    wait_until("each fan-out instance handled 20", || {
        a.health().handled == 20 && b.health().handled == 20
    })
    .await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_handlers_and_acknowledges_them() {
    let router = MemoryRouter::new();
    let runtime = Runtime::new(router.clone());
    let (worker, mut attempts) = Worker::new();
    let agent = runtime
        .spawn_with(worker, AgentOptions::new().concurrency(4))
        .await
        .unwrap();
    let client = runtime.publisher::<Client>();
    for id in 0..4 {
        client
            .publish(
                &format!("s{id}"),
                Job {
                    id,
                    behaviour: Behaviour::Sleep(200),
                },
            )
            .await
            .unwrap();
    }
    // At least one handler is running (sessions that hash to one worker wait their turn).
    recv(&mut attempts).await;
    let report = runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    assert!(
        report.handled >= 1,
        "the running handler finished during the stop: {report:?}"
    );
    assert_eq!((report.requeued, report.aborted), (0, 0), "{report:?}");
    let health = agent.health();
    assert_eq!(
        (health.handled, health.in_flight, health.state),
        (4, 0, AgentState::Stopped)
    );
    assert!(
        router
            .publish(Envelope::new(
                parse_channel("Job:event:s").unwrap(),
                "application/json",
                &b"{}"[..]
            ))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_handler_past_the_deadline_is_cut_off_and_its_message_given_back() {
    let router = MemoryRouter::new();
    let runtime = Runtime::new(router.clone());
    let (worker, mut attempts) = Worker::new();
    let agent = runtime.spawn(worker).await.unwrap();
    let client = runtime.publisher::<Client>();
    client
        .publish(
            "s1",
            Job {
                id: 1,
                behaviour: Behaviour::Sleep(60_000),
            },
        )
        .await
        .unwrap();
    client
        .publish(
            "s1",
            Job {
                id: 2,
                behaviour: Behaviour::Succeed,
            },
        )
        .await
        .unwrap();
    assert_eq!(recv(&mut attempts).await, (1, 1));
    let report = agent.stop(Duration::from_millis(100)).await;
    assert_eq!(report.aborted, 1, "{report:?}");
    // Both messages are back in the agent's group queue: a new instance gets them.
    let (replacement, mut replacement_attempts) = Worker::new();
    runtime
        .spawn_with(
            replacement,
            AgentOptions::new().handler_timeout(Some(Duration::from_millis(10))),
        )
        .await
        .unwrap();
    let mut ids = vec![
        recv(&mut replacement_attempts).await.0,
        recv(&mut replacement_attempts).await.0,
    ];
    ids.sort();
    assert_eq!(ids, vec![1, 2]);
}

#[tokio::test]
async fn health_shows_router_and_agents() {
    let runtime = Runtime::new(MemoryRouter::new());
    let (worker, _) = Worker::new();
    runtime.spawn(worker).await.unwrap();
    let health = runtime.health().await;
    assert_eq!(health.status, agentcomm_core::router::HealthStatus::Healthy);
    assert_eq!(health.router.backend, "memory");
    assert_eq!(health.agents.len(), 1);
    let agent = &health.agents[0];
    assert_eq!(
        (agent.name, agent.receives, agent.sends),
        ("Worker", &["Job"][..], &[][..])
    );
    assert_eq!(agent.subscription, "group 'Worker' on Job:*:*");
    runtime.router().close().await.unwrap();
    wait_until("the agent notices its subscription ended", || {
        runtime.agents()[0].health().status == agentcomm_core::router::HealthStatus::Unhealthy
    })
    .await;
}

/// A router that declares no consumer groups, like Redis pub/sub.
struct NoGroups(MemoryRouter);

impl Router for NoGroups {
    fn backend(&self) -> &str {
        "no-groups"
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities().consumer_groups(false)
    }
    fn publish(
        &self,
        envelope: Envelope,
    ) -> agentcomm_core::router::BoxFuture<'_, Result<agentcomm_core::router::PublishOutcome>> {
        self.0.publish(envelope)
    }
    fn subscribe(
        &self,
        options: SubscribeOptions,
    ) -> agentcomm_core::router::BoxFuture<'_, Result<Subscription>> {
        self.0.subscribe(options)
    }
    fn health(&self) -> agentcomm_core::router::BoxFuture<'_, agentcomm_core::router::Health> {
        self.0.health()
    }
    fn close(&self) -> agentcomm_core::router::BoxFuture<'_, Result<()>> {
        self.0.close()
    }
}

#[tokio::test]
async fn agents_refuse_what_they_cannot_do_with_a_fix() {
    let runtime = Runtime::new(NoGroups(MemoryRouter::new()));
    let (worker, _) = Worker::new();
    let error = runtime.spawn(worker).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "no-groups does not support consumer groups: spawn the agent with `AgentOptions::new().fan_out()` \
         (every instance then gets every message), or use a backend with consumer groups"
    );
    let (worker, _) = Worker::new();
    runtime
        .spawn_with(worker, AgentOptions::new().fan_out())
        .await
        .unwrap();

    let error = runtime.spawn(Client).await.unwrap_err();
    assert!(matches!(error, Error::InvalidAgent { .. }));
    assert!(
        error
            .to_string()
            .starts_with("Invalid agent 'Client': it receives nothing"),
        "{error}"
    );
}

static REPLIES: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug, Serialize, Deserialize, Message)]
struct Unexpected {
    note: String,
}

#[agent(receives = [PaymentRequest], sends = [Unexpected])]
struct WrongReplier;

impl Handle<PaymentRequest> for WrongReplier {
    async fn handle(&self, _: PaymentRequest, ctx: &Context<Self>) -> HandlerResult {
        REPLIES.fetch_add(1, Ordering::SeqCst);
        match ctx
            .reply(Unexpected {
                note: "oops".into(),
            })
            .await
        {
            Err(Error::UnexpectedReply { expected, got, .. }) => {
                assert_eq!(
                    (expected.as_str(), got.as_str()),
                    ("PaymentResponse", "Unexpected")
                );
                Err(HandlerError::permanent("replied with the wrong type"))
            }
            other => panic!("expected UnexpectedReply, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn replying_with_another_type_than_the_requester_waits_for_is_an_error() {
    let runtime = Runtime::new(MemoryRouter::new());
    runtime.spawn(WrongReplier).await.unwrap();
    let error = runtime
        .publisher::<Client>()
        .request_timeout::<PaymentRequest, PaymentResponse>(
            "s1",
            PaymentRequest {
                amount: 1.0,
                user_id: "u".into(),
            },
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
    // The handler refused the request, but this agent cannot send the type the requester waits for
    // (it is not an agent that answers these requests): its dead letter does not fail the requester,
    // which waits for an agent that can answer, up to its timeout.
    assert!(matches!(error, Error::Timeout { .. }), "{error:?}");
    assert_eq!(REPLIES.load(Ordering::SeqCst), 1);
}

static WRONG_REPLIES_WITH_QUESTION_MARK: AtomicUsize = AtomicUsize::new(0);

/// Replies with the wrong type and passes the error on with `?`, as handlers do.
#[agent(receives = [PaymentRequest], sends = [Unexpected])]
struct WrongReplierWithQuestionMark;

impl Handle<PaymentRequest> for WrongReplierWithQuestionMark {
    async fn handle(&self, _: PaymentRequest, ctx: &Context<Self>) -> HandlerResult {
        // Whatever the handler did before (charged a card, wrote a row) is done again on every attempt.
        WRONG_REPLIES_WITH_QUESTION_MARK.fetch_add(1, Ordering::SeqCst);
        ctx.reply(Unexpected {
            note: "oops".into(),
        })
        .await?;
        Ok(())
    }
}

/// The request's `reply_to` names the class its requester waits for, and the handler's reply type is
/// its code's: a reply of another class fails the same way on every attempt. Passed on with `?`, it
/// was retried `max_attempts` times (the handler's work done again each time) before its dead letter;
/// it is dead-lettered at once, as `rejected`, like agentcomm's other errors about what a handler sends.
/// The requester is not told: this agent does not send the class it waits for, so another agent type
/// may be the one that answers it (see
/// a_wrong_class_reply_from_another_agent_does_not_cut_short_the_right_answer).
#[tokio::test]
async fn a_reply_of_the_wrong_type_passed_on_with_a_question_mark_is_not_retried() {
    let runtime = Runtime::new(MemoryRouter::new());
    let mut dead = dead_letters(runtime.router()).await;
    runtime
        .spawn_with(WrongReplierWithQuestionMark, fast_retries(4))
        .await
        .unwrap();
    let error = runtime
        .publisher::<Client>()
        .request_timeout::<PaymentRequest, PaymentResponse>(
            "s1",
            PaymentRequest {
                amount: 1.0,
                user_id: "u".into(),
            },
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Timeout { .. }), "{error:?}");
    let letter = next(&mut dead).await;
    let envelope = letter.envelope();
    assert_eq!(
        envelope.header(headers::DEAD_LETTER_REASON),
        Some(headers::REASON_REJECTED),
        "{:?}",
        envelope.headers()
    );
    assert_eq!(envelope.header(headers::ATTEMPTS), Some("1"));
    assert!(
        envelope
            .header(headers::ERROR)
            .is_some_and(|error| error.contains("expects a reply of class 'PaymentResponse'")),
        "{:?}",
        envelope.headers()
    );
    assert_eq!(WRONG_REPLIES_WITH_QUESTION_MARK.load(Ordering::SeqCst), 1);
}

/// Replies with its own class to every request of the class, passing the error on with `?`: for a
/// requester that waits for another class it is not the answerer.
#[agent(receives = [PaymentRequest], sends = [Unexpected])]
struct OtherClassReplier;

impl Handle<PaymentRequest> for OtherClassReplier {
    async fn handle(&self, _: PaymentRequest, ctx: &Context<Self>) -> HandlerResult {
        ctx.reply(Unexpected {
            note: "for requesters that wait for Unexpected".into(),
        })
        .await?;
        Ok(())
    }
}

static SLOW_PAYMENTS_GO: Notify = Notify::const_new();

/// Answers `PaymentResponse`, once the test says so.
#[agent(receives = [PaymentRequest], sends = [PaymentResponse])]
struct SlowPayments;

impl Handle<PaymentRequest> for SlowPayments {
    async fn handle(&self, request: PaymentRequest, ctx: &Context<Self>) -> HandlerResult {
        SLOW_PAYMENTS_GO.notified().await;
        ctx.reply(PaymentResponse {
            success: true,
            transaction_id: format!("TXN-{}", request.user_id),
        })
        .await?;
        Ok(())
    }
}

/// Two agent types receive the request class: one answers with the class the requester waits for, the
/// other replies with its own class (wrong for this requester) and passes the error on. The second is
/// not an agent that answers these requests: its dead letter must not fail a requester whose answer
/// comes from the first, however late that answer is within the timeout.
#[tokio::test]
async fn a_wrong_class_reply_from_another_agent_does_not_cut_short_the_right_answer() {
    let runtime = Runtime::new(MemoryRouter::new());
    let wrong = runtime.spawn(OtherClassReplier).await.unwrap();
    runtime.spawn(SlowPayments).await.unwrap();
    let client = runtime.publisher::<Client>();
    let asking = tokio::spawn(async move {
        client
            .request_timeout::<PaymentRequest, PaymentResponse>(
                "s1",
                PaymentRequest {
                    amount: 1.0,
                    user_id: "u".into(),
                },
                Duration::from_secs(20),
            )
            .await
    });
    // The other agent is done with the request (dead-lettered, and whatever it sent the requester is
    // on its way) before the answering agent replies.
    wait_until("the other agent dead-lettered the request", || {
        let health = wrong.health();
        health.dead_lettered == 1 && health.in_flight == 0
    })
    .await;
    SLOW_PAYMENTS_GO.notify_one();
    let answer = timeout(WAIT, asking)
        .await
        .expect("the request ends")
        .unwrap();
    assert_eq!(answer.unwrap().transaction_id, "TXN-u");
}

/// Sends both the class its requesters wait for and another one, and replies with the other one by
/// mistake, passing the error on with `?`.
#[agent(receives = [PaymentRequest], sends = [PaymentResponse, Unexpected])]
struct MixedUpPayments;

impl Handle<PaymentRequest> for MixedUpPayments {
    async fn handle(&self, _: PaymentRequest, ctx: &Context<Self>) -> HandlerResult {
        ctx.reply(Unexpected {
            note: "meant a PaymentResponse".into(),
        })
        .await?;
        Ok(())
    }
}

/// An agent that sends the class its requester waits for is the one that answers it, also when its
/// handler replied with another class: the request is dead-lettered at once, as `rejected`, and the
/// requester is told at once (`Error::RequestFailed`) rather than left to its timeout. (The README,
/// docs/wire-format.md and `HandlerError` said such a requester is never told.)
#[tokio::test]
async fn a_wrong_class_reply_from_an_agent_that_sends_the_right_class_fails_its_requester_at_once()
{
    let runtime = Runtime::new(MemoryRouter::new());
    runtime.spawn(MixedUpPayments).await.unwrap();
    let client = runtime.publisher::<Client>();
    let asking = client.request_timeout::<PaymentRequest, PaymentResponse>(
        "s1",
        PaymentRequest {
            amount: 1.0,
            user_id: "u".into(),
        },
        Duration::from_secs(600),
    );
    let error = timeout(WAIT, asking)
        .await
        .expect("the requester was told before its timeout")
        .unwrap_err();
    match &error {
        Error::RequestFailed(failure) => {
            assert_eq!(failure.reason, headers::REASON_REJECTED, "{failure:?}");
        }
        other => panic!("expected RequestFailed, got {other:?}"),
    }
}

/// Declares the reply class, and forgets to reply.
#[agent(receives = [PaymentRequest], sends = [PaymentResponse])]
struct SilentPayments;

impl Handle<PaymentRequest> for SilentPayments {
    async fn handle(&self, _: PaymentRequest, _: &Context<Self>) -> HandlerResult {
        Ok(())
    }
}

/// A handler that returns `Ok` without replying to a request leaves its requester waiting out its
/// timeout, with nothing on the agent's side to say why: it is counted in `requests_unanswered` and
/// logged. A handler that replies, and a message that is no request, are not counted.
#[tokio::test]
async fn a_request_handled_without_a_reply_is_counted() {
    let runtime = Runtime::new(MemoryRouter::new());
    let silent = runtime.spawn(SilentPayments).await.unwrap();
    let answering = runtime.spawn(PaymentAgent).await.unwrap();
    let client = runtime.publisher::<Client>();
    let request = || PaymentRequest {
        amount: 1.0,
        user_id: "u".into(),
    };
    // The two agent types each get the request; PaymentAgent answers it.
    client
        .request_timeout::<PaymentRequest, PaymentResponse>(
            "s1",
            request(),
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    // Not a request: nobody waits for a reply.
    client.publish("s1", request()).await.unwrap();
    wait_until("both messages are handled by both agents", || {
        silent.health().handled == 2 && answering.health().handled == 2
    })
    .await;
    assert_eq!(silent.health().requests_unanswered, 1);
    assert_eq!(answering.health().requests_unanswered, 0);
}

#[agent(receives = [PaymentRequest], sends = [PaymentResponse])]
struct LedgerDown;

impl Handle<PaymentRequest> for LedgerDown {
    async fn handle(&self, _: PaymentRequest, _: &Context<Self>) -> HandlerResult {
        Err(HandlerError::msg("the ledger is down"))
    }
}

/// A request whose handler fails on every attempt is dead-lettered; its requester is told so and
/// fails at once, with what the dead letter says, instead of waiting out its timeout.
#[tokio::test]
async fn a_dead_lettered_request_fails_its_requester_at_once() {
    let runtime = Runtime::new(MemoryRouter::new());
    let mut dead = dead_letters(runtime.router()).await;
    runtime
        .spawn_with(LedgerDown, fast_retries(2))
        .await
        .unwrap();
    let client = runtime.publisher::<Client>();
    let asking = client.request_timeout::<PaymentRequest, PaymentResponse>(
        "s1",
        PaymentRequest {
            amount: 1.0,
            user_id: "u".into(),
        },
        Duration::from_secs(600),
    );
    // Bounded far below the request's own timeout: an answer, not a timeout, ends it.
    let error = timeout(WAIT, asking)
        .await
        .expect("the requester was told before its timeout")
        .unwrap_err();
    let dead_letter = next(&mut dead).await;
    let original_id = dead_letter
        .envelope()
        .header(headers::ORIGINAL_ID)
        .unwrap()
        .to_string();
    match &error {
        Error::RequestFailed(failure) => {
            assert_eq!(
                (
                    failure.class,
                    failure.agent.as_str(),
                    failure.reason.as_str(),
                    failure.attempts
                ),
                ("PaymentRequest", "LedgerDown", "handler-failed", 2)
            );
            assert_eq!(failure.request_id.to_string(), original_id);
            assert!(
                failure.error.contains("the ledger is down"),
                "{}",
                failure.error
            );
        }
        other => panic!("expected RequestFailed, got {other:?}"),
    }
    assert!(
        error.to_string().contains("'DeadLetter:PaymentRequest:*'"),
        "{error}"
    );
}

static JSON_SEEN: AtomicU32 = AtomicU32::new(0);

#[agent(receives = [PaymentRequest])]
struct JsonReader;

impl Handle<PaymentRequest> for JsonReader {
    async fn handle(&self, request: PaymentRequest, ctx: &Context<Self>) -> HandlerResult {
        assert_eq!(ctx.envelope().content_type(), "application/json");
        JSON_SEEN.store(request.amount as u32, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test]
async fn a_runtime_can_speak_json_and_receivers_read_either_codec() {
    let router = MemoryRouter::new();
    let json = Runtime::builder(router.clone()).codec(Codec::Json).build();
    let msgpack = Runtime::new(router.clone());
    msgpack.spawn(JsonReader).await.unwrap();
    json.bus()
        .publish(
            "s1",
            &PaymentRequest {
                amount: 42.0,
                user_id: "u".into(),
            },
        )
        .await
        .unwrap();
    wait_until("the JSON message is read", || {
        JSON_SEEN.load(Ordering::SeqCst) == 42
    })
    .await;
}

/// Receives payment requests to keep a record of them; it does not answer them (it sends nothing).
#[agent(receives = [PaymentRequest])]
struct PaymentAuditor;

impl Handle<PaymentRequest> for PaymentAuditor {
    async fn handle(&self, _: PaymentRequest, _: &Context<Self>) -> HandlerResult {
        Err(HandlerError::permanent("the audit log is full"))
    }
}

/// Answers payment requests, a little slower than the auditor fails on them.
#[agent(receives = [PaymentRequest], sends = [PaymentResponse])]
struct SlowPaymentAgent;

impl Handle<PaymentRequest> for SlowPaymentAgent {
    async fn handle(&self, request: PaymentRequest, ctx: &Context<Self>) -> HandlerResult {
        tokio::time::sleep(Duration::from_millis(200)).await;
        ctx.reply(PaymentResponse {
            success: true,
            transaction_id: format!("TXN-{}", request.user_id),
        })
        .await?;
        Ok(())
    }
}

/// An agent that only observes a request class (it cannot send the reply type, so it never answers)
/// and dead-letters a request does not fail the requester: the agent that does answer still does,
/// and its reply is what the requester gets.
#[tokio::test]
async fn a_request_dead_lettered_by_an_agent_that_cannot_answer_it_still_gets_its_reply() {
    let runtime = Runtime::new(MemoryRouter::new());
    let _dead = dead_letters(runtime.router()).await;
    runtime.spawn(PaymentAuditor).await.unwrap();
    runtime.spawn(SlowPaymentAgent).await.unwrap();
    let client = runtime.publisher::<Client>();
    let reply = timeout(
        WAIT,
        client.request_timeout::<PaymentRequest, PaymentResponse>(
            "s1",
            PaymentRequest {
                amount: 1.0,
                user_id: "u".into(),
            },
            WAIT,
        ),
    )
    .await
    .expect("an answer before the test's own timeout");
    assert_eq!(
        reply.unwrap(),
        PaymentResponse {
            success: true,
            transaction_id: "TXN-u".into(),
        }
    );
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
struct Echoed {
    n: u64,
}

/// Answers every `Echoed` with another on the same session, which it receives again: a loop that always
/// has a delivery ready.
#[agent(receives = [Echoed], sends = [Echoed])]
struct SelfFeeding;

impl Handle<Echoed> for SelfFeeding {
    async fn handle(&self, message: Echoed, ctx: &Context<Self>) -> HandlerResult {
        ctx.reply(Echoed { n: message.n + 1 }).await?;
        Ok(())
    }
}

/// An agent whose subscription always has a delivery ready gives the thread back now and then: on a
/// current-thread runtime (what `#[tokio::test]` gives) a timer still fires and `shutdown` finishes.
/// Before, the in-memory subscription never returned `Pending` (async-channel spends no Tokio budget),
/// so the agent's task kept the thread: a 200 ms sleep next to it did not return within 10 s.
#[test]
fn an_agent_that_always_has_a_delivery_ready_lets_the_rest_of_its_runtime_run() {
    let (done, finished) = std::sync::mpsc::channel();
    // Its own thread, so that a starved runtime fails this test instead of hanging it.
    std::thread::spawn(move || {
        let threaded = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let outcome = threaded.block_on(async {
            let runtime = Runtime::new(MemoryRouter::new());
            let agent = runtime.spawn(SelfFeeding).await.unwrap();
            runtime.bus().publish("s1", &Echoed { n: 0 }).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            let handled = agent.health().handled;
            let stopped = runtime.shutdown(Duration::from_secs(2)).await;
            (
                handled,
                stopped.map(|_| ()).map_err(|error| error.to_string()),
            )
        });
        let _ = done.send(outcome);
    });
    let (handled, stopped) = finished
        .recv_timeout(Duration::from_secs(10))
        .expect("the runtime did not get its thread back within 10 s");
    assert!(handled > 0, "the agent ran: {handled}");
    assert_eq!(stopped, Ok(()));
}

/// A message type written by hand (not derived, which refuses the class) with the class of dead-letter
/// channels.
#[derive(Debug, Serialize, Deserialize)]
struct HandWrittenDeadLetter {
    note: String,
}

impl Message for HandWrittenDeadLetter {
    const CLASS: &'static str = "DeadLetter";
}

#[agent(receives = [HandWrittenDeadLetter])]
struct DeadLetterReader;

impl Handle<HandWrittenDeadLetter> for DeadLetterReader {
    async fn handle(&self, _: HandWrittenDeadLetter, _: &Context<Self>) -> HandlerResult {
        Err(HandlerError::msg("cannot handle a dead letter"))
    }
}

/// An agent receiving the class `DeadLetter` is refused at spawn: its own dead letters
/// (`DeadLetter:DeadLetter:<session>`) would come back to it, and every dead letter whose payload it
/// cannot decode or handle (all of them carry their original class) would be dead-lettered again where
/// it receives them, for ever, a publish each time.
#[tokio::test]
async fn an_agent_receiving_dead_letters_is_refused_it_would_loop() {
    let runtime = Runtime::new(MemoryRouter::new());
    let error = runtime.spawn(DeadLetterReader).await.unwrap_err();
    assert!(matches!(error, Error::InvalidAgent { .. }), "{error:?}");
    let text = error.to_string();
    assert!(
        text.contains("'DeadLetter'") && text.contains("subscribe"),
        "the error names the class and the fix: {text}"
    );
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
struct Ask {
    /// `None`: `Context::request`, with the runtime's timeout; else `request_timeout` with this.
    timeout_ms: Option<u64>,
}

#[agent(sends = [Ask])]
struct AskClient;

/// Asks for a payment from its handler, and reports how the request ended.
#[agent(receives = [Ask], sends = [PaymentRequest])]
struct Asker {
    outcomes: mpsc::UnboundedSender<Result<PaymentResponse>>,
}

impl Handle<Ask> for Asker {
    async fn handle(&self, ask: Ask, ctx: &Context<Self>) -> HandlerResult {
        let request = PaymentRequest {
            amount: 1.0,
            user_id: "u1".into(),
        };
        let outcome = match ask.timeout_ms {
            None => ctx.request("pay", request).await,
            Some(ms) => {
                ctx.request_timeout("pay", request, Duration::from_millis(ms))
                    .await
            }
        };
        let _ = self.outcomes.send(outcome);
        Ok(())
    }
}

/// Takes payment requests and never answers them.
#[agent(receives = [PaymentRequest], sends = [PaymentResponse])]
struct Silent;

impl Handle<PaymentRequest> for Silent {
    async fn handle(&self, _request: PaymentRequest, _ctx: &Context<Self>) -> HandlerResult {
        Ok(())
    }
}

/// A handler's `Context::request` waits the runtime's request timeout, as `Publisher::request` does,
/// and `request_timeout` the one it is given.
#[tokio::test]
async fn a_handler_requests_with_the_runtimes_timeout_or_its_own() {
    let runtime = Runtime::builder(MemoryRouter::new())
        .request_timeout(Duration::from_millis(300))
        .build();
    let (outcomes, mut outcomes_rx) = mpsc::unbounded_channel();
    runtime.spawn(Asker { outcomes }).await.unwrap();
    let silent = runtime.spawn(Silent).await.unwrap();
    let client = runtime.publisher::<AskClient>();
    for (session, timeout_ms, waited) in [("a1", None, 300), ("a2", Some(100), 100)] {
        client.publish(session, Ask { timeout_ms }).await.unwrap();
        let outcome = timeout(WAIT, outcomes_rx.recv()).await.unwrap().unwrap();
        assert!(
            matches!(&outcome, Err(Error::Timeout { after, .. }) if *after == Duration::from_millis(waited)),
            "{timeout_ms:?}: {outcome:?}"
        );
    }
    silent.stop(Duration::from_secs(1)).await;
    runtime.spawn(PaymentAgent).await.unwrap();
    client
        .publish("a3", Ask { timeout_ms: None })
        .await
        .unwrap();
    let outcome = timeout(WAIT, outcomes_rx.recv()).await.unwrap().unwrap();
    assert!(outcome.unwrap().success);
    runtime.shutdown(Duration::from_secs(1)).await.unwrap();
}
