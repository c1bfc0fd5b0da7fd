//! The test harness: what a user's agent test looks like, and how its failures read.

use std::sync::Arc;
use std::time::Duration;

use agentcomm_core::backoff::Backoff;
use agentcomm_core::codec::MSGPACK_CONTENT_TYPE;
use agentcomm_core::envelope::{Envelope, headers};
use agentcomm_core::prelude::*;
use agentcomm_core::router::{
    BoxFuture, Capabilities, Health, PublishOutcome, SubscribeOptions, Subscription,
};
use agentcomm_core::runtime::AgentState;
use agentcomm_testkit::TestHarness;
use agentcomm_testkit::memory::MemoryConnection;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[message(direction = "request")]
struct PaymentRequest {
    amount: f64,
    user_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[message(direction = "response")]
struct PaymentResponse {
    success: bool,
    transaction_id: String,
}

/// Published on big payments, besides the response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
struct AuditEvent {
    amount: f64,
}

/// A message type named with its own channel template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[message(channel = "ledger.{direction}.{session_id}")]
struct LedgerEntry {
    amount: f64,
}

#[agent(receives = [PaymentRequest], sends = [PaymentResponse, AuditEvent, LedgerEntry])]
struct PaymentAgent;

impl Handle<PaymentRequest> for PaymentAgent {
    async fn handle(&self, request: PaymentRequest, ctx: &Context<Self>) -> HandlerResult {
        if request.amount > 1000.0 {
            ctx.publish(AuditEvent {
                amount: request.amount,
            })
            .await?;
        }
        if request.user_id == "ledger" {
            ctx.publish(LedgerEntry {
                amount: request.amount,
            })
            .await?;
        }
        ctx.reply(PaymentResponse {
            success: request.amount > 0.0,
            transaction_id: format!("TXN-{}", request.user_id),
        })
        .await?;
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
struct Job {
    id: u32,
}

#[agent(receives = [Job])]
struct AlwaysFails;

impl Handle<Job> for AlwaysFails {
    async fn handle(&self, _job: Job, _ctx: &Context<Self>) -> HandlerResult {
        Err(HandlerError::msg("the job service is down"))
    }
}

/// Publishes its event a while after the request, to show late arrivals.
#[agent(receives = [Job], sends = [AuditEvent])]
struct LateAuditor;

impl Handle<Job> for LateAuditor {
    async fn handle(&self, job: Job, ctx: &Context<Self>) -> HandlerResult {
        tokio::time::sleep(Duration::from_millis(50)).await;
        ctx.publish(AuditEvent {
            amount: f64::from(job.id),
        })
        .await?;
        Ok(())
    }
}

fn payment(amount: f64, user: &str) -> PaymentRequest {
    PaymentRequest {
        amount,
        user_id: user.into(),
    }
}

/// The panic message of a future that is expected to panic.
async fn panic_text<F>(future: F) -> String
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let outcome = tokio::time::timeout(Duration::from_secs(10), tokio::spawn(future))
        .await
        .expect("the assertion finishes in time");
    let panic = outcome
        .expect_err("the assertion should have failed")
        .into_panic();
    match panic.downcast::<String>() {
        Ok(text) => *text,
        Err(panic) => (*panic.downcast::<&str>().expect("a text panic")).to_string(),
    }
}

/// A user's test, written once and run on two routers.
async fn payment_flow(h: TestHarness) {
    h.spawn(PaymentAgent).await;
    let request = h.send("session456", payment(100.0, "user123")).await;
    let response = h
        .expect::<PaymentResponse>()
        .session("session456")
        .matching(|response| response.success)
        .within(Duration::from_secs(1))
        .await;
    assert_eq!(response.transaction_id, "TXN-user123");
    let request_id = request.id().to_string();
    assert_eq!(
        response.envelope.correlation_id(),
        Some(request_id.as_str())
    );
    assert_eq!(response.envelope.channel().direction(), "response");
    h.assert_nothing_else_published().await;
    h.shutdown().await.expect("the harness shuts down");
}

#[tokio::test]
async fn an_agent_test_in_a_few_lines() {
    payment_flow(TestHarness::new().await).await;
}

#[tokio::test]
async fn the_same_test_runs_unchanged_on_another_router() {
    let connection = MemoryConnection::new(MemoryRouter::new());
    let h = TestHarness::with_router(connection)
        .await
        .expect("a harness on the connection");
    payment_flow(h).await;
}

#[tokio::test]
async fn requests_get_their_reply_and_it_is_not_counted_as_unexpected() {
    let h = TestHarness::new().await;
    h.spawn(PaymentAgent).await;
    let reply = h
        .request::<PaymentRequest, PaymentResponse>("s1", payment(5.0, "u1"))
        .await;
    assert!(reply.success);
    assert_eq!(reply.envelope.channel().direction(), "reply");
    assert!(h.unmatched().is_empty(), "{:?}", h.unmatched());
    h.assert_nothing_else_published().await;
}

#[tokio::test]
async fn published_lists_everything_in_order_with_envelopes() {
    let h = TestHarness::new().await;
    h.spawn(PaymentAgent).await;
    h.send("s1", payment(5000.0, "big")).await;
    h.expect::<PaymentResponse>().session("s1").await;
    let traffic = h.published();
    assert_eq!(
        traffic.channels(),
        [
            "PaymentRequest:request:s1",
            "AuditEvent:event:s1",
            "PaymentResponse:response:s1"
        ]
    );
    assert!(traffic[0].sent_by_test());
    assert_eq!(
        traffic.from_agents().classes(),
        ["AuditEvent", "PaymentResponse"]
    );
    assert_eq!(traffic.of::<AuditEvent>(), [AuditEvent { amount: 5000.0 }]);
    assert_eq!(
        traffic[1].envelope().correlation_id(),
        Some(traffic[0].envelope().id().to_string().as_str())
    );
    // The audit event was not expected yet.
    assert_eq!(h.unmatched().classes(), ["AuditEvent"]);
    let audit = h.expect::<AuditEvent>().await;
    assert!(audit.position() < h.published()[2].position());
    h.assert_nothing_else_published().await;
}

#[tokio::test]
async fn dead_letters_can_be_expected_with_their_reason() {
    let h = TestHarness::new().await;
    h.spawn_with(
        AlwaysFails,
        AgentOptions::new().max_attempts(2).backoff(Backoff::new(
            Duration::from_millis(5),
            Duration::from_millis(10),
        )),
    )
    .await;
    let sent = h.send("s1", Job { id: 7 }).await;
    let dead = h
        .expect_dead_letter::<Job>()
        .session("s1")
        .reason(headers::REASON_HANDLER_FAILED)
        .await;
    assert_eq!(dead.message(), Some(&Job { id: 7 }));
    assert_eq!(dead.attempts(), Some(2));
    assert_eq!(dead.agent(), Some("AlwaysFails"));
    assert_eq!(dead.error(), Some("the job service is down"));
    assert_eq!(dead.original_id(), Some(sent.id().to_string().as_str()));
    assert_eq!(dead.envelope.channel().canonical(), "DeadLetter:Job:s1");
    h.assert_nothing_else_published().await;
}

#[tokio::test]
async fn a_broken_payload_is_dead_lettered_as_undecodable() {
    let h = TestHarness::new().await;
    h.spawn(PaymentAgent).await;
    let channel = PaymentRequest::channel("request", "s1").unwrap();
    h.send_envelope(Envelope::with_class(
        PaymentRequest::CLASS,
        channel,
        MSGPACK_CONTENT_TYPE,
        vec![0xc1],
    ))
    .await;
    let dead = h
        .expect_dead_letter::<PaymentRequest>()
        .reason(headers::REASON_UNDECODABLE)
        .await;
    assert!(dead.message().is_none());
    assert!(
        dead.error().unwrap().contains("PaymentRequest"),
        "{:?}",
        dead.error()
    );
}

#[tokio::test]
async fn a_failed_expectation_says_what_arrived_instead() {
    let h = TestHarness::new().await;
    h.spawn(PaymentAgent).await;
    h.send("s1", payment(10.0, "u1")).await;
    let failure = h
        .expect::<PaymentResponse>()
        .session("s2")
        .within(Duration::from_millis(500))
        .result()
        .await
        .expect_err("the response went to s1");
    let text = failure.to_string();
    assert!(
        text.starts_with(
            "expected a PaymentResponse on session \"s2\" within 500ms, but it did not arrive (waited 5"
        ),
        "{text}"
    );
    assert!(
        text.contains("Seen instead (2 messages, oldest first):\n"),
        "{text}"
    );
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[2].starts_with("  #1 +"), "{text}");
    assert!(
        lines[2].contains(" PaymentRequest:request:s1 id ")
            && lines[2].ends_with("[sent by the test]"),
        "{text}"
    );
    assert!(
        lines[3].contains(" PaymentResponse:response:s1 id ")
            && lines[3].contains(" correlation ")
            && lines[3].ends_with("<- session is \"s1\", not \"s2\""),
        "{text}"
    );
    assert_eq!(lines.len(), 4, "{text}");
}

#[tokio::test]
async fn a_failed_predicate_is_named_in_the_failure() {
    let h = TestHarness::new().await;
    h.spawn(PaymentAgent).await;
    h.send("s1", payment(-1.0, "u1")).await;
    let text = h
        .expect::<PaymentResponse>()
        .matching(|response| response.success)
        .described_as("a successful payment")
        .within(Duration::from_millis(500))
        .result()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        text.starts_with("expected a successful payment within 500ms, but it did not arrive"),
        "{text}"
    );
    assert!(
        text.contains("PaymentResponse:response:s1")
            && text.contains("<- it is not a successful payment"),
        "{text}"
    );

    let text = h
        .expect::<PaymentResponse>()
        .matching(|response| response.transaction_id == "nope")
        .within(Duration::from_millis(50))
        .result()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        text.starts_with("expected a PaymentResponse matching the predicate within 50ms"),
        "{text}"
    );
    assert!(text.contains("<- it did not match the predicate"), "{text}");
}

#[tokio::test]
async fn when_nothing_was_published_the_failure_says_so() {
    let h = TestHarness::new().await;
    let text = h
        .expect::<PaymentResponse>()
        .within(Duration::from_millis(50))
        .result()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        text.starts_with("expected a PaymentResponse within 50ms, but it did not arrive"),
        "{text}"
    );
    assert!(
        text.contains(
            "Nothing was published at all: is an agent that handles what the test sent spawned"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn awaiting_a_failed_expectation_panics_with_the_same_text() {
    let h = Arc::new(TestHarness::new().await);
    let expected = h
        .expect::<AuditEvent>()
        .within(Duration::from_millis(50))
        .result()
        .await
        .unwrap_err()
        .to_string();
    let panicked = panic_text({
        let h = h.clone();
        async move {
            h.expect::<AuditEvent>()
                .within(Duration::from_millis(50))
                .await;
        }
    })
    .await;
    // The waited time differs; everything else is the same.
    let strip = |text: &str| text.split(" (waited").next().unwrap().to_string();
    assert_eq!(strip(&panicked), strip(&expected));
}

#[tokio::test]
async fn each_message_matches_one_expectation_only() {
    let h = TestHarness::new().await;
    h.spawn(PaymentAgent).await;
    h.send("s1", payment(1.0, "a")).await;
    h.send("s1", payment(2.0, "b")).await;
    let first = h.expect::<PaymentResponse>().await;
    let second = h.expect::<PaymentResponse>().await;
    assert_ne!(first.envelope.id(), second.envelope.id());
    assert!(first.position() < second.position());
    let text = h
        .expect::<PaymentResponse>()
        .within(Duration::from_millis(50))
        .result()
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        text.matches("<- already matched by an earlier expectation")
            .count(),
        2,
        "{text}"
    );
}

#[tokio::test]
async fn anything_unexpected_fails_the_nothing_else_assertion() {
    let h = Arc::new(TestHarness::new().await);
    h.spawn(PaymentAgent).await;
    h.send("s1", payment(2000.0, "big")).await;
    h.expect::<PaymentResponse>().await;
    let text = panic_text({
        let h = h.clone();
        async move { h.assert_nothing_else_published().await }
    })
    .await;
    assert!(
        text.starts_with(
            "expected nothing else to be published, but 1 message arrived that no expectation matched (checked after 100ms of quiet"
        ),
        "{text}"
    );
    assert!(text.contains(" AuditEvent:event:s1 id "), "{text}");
    assert!(
        text.ends_with(
            "Match each with `expect::<T>()` or `expect_dead_letter::<T>()` before this assertion."
        ),
        "{text}"
    );
}

#[tokio::test]
async fn no_more_within_fails_on_a_late_arrival_and_passes_on_silence() {
    let h = Arc::new(TestHarness::new().await);
    h.spawn(LateAuditor).await;
    h.assert_no_more_within(Duration::from_millis(20)).await;
    h.send("s1", Job { id: 3 }).await;
    let text = panic_text({
        let h = h.clone();
        async move { h.assert_no_more_within(Duration::from_secs(2)).await }
    })
    .await;
    assert!(
        text.starts_with("expected nothing more within 2s, but after "),
        "{text}"
    );
    assert!(
        text.contains("1 message had arrived that no expectation matched")
            && text.contains("AuditEvent:event:s1"),
        "{text}"
    );
}

#[tokio::test]
async fn types_with_their_own_channel_template_are_watched_and_named() {
    let h = TestHarness::new().await;
    h.observe::<LedgerEntry>().await;
    h.spawn(PaymentAgent).await;
    h.send("s1", payment(3.0, "ledger")).await;
    let entry = h.expect::<LedgerEntry>().session("s1").await;
    assert_eq!(entry.envelope.channel().name(), "ledger.event.s1");
    let text = h
        .expect::<LedgerEntry>()
        .within(Duration::from_millis(20))
        .result()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("LedgerEntry:event:s1 (named \"ledger.event.s1\")"),
        "{text}"
    );
    h.expect::<PaymentResponse>().await;
    h.assert_nothing_else_published().await;
}

#[tokio::test]
async fn a_harness_limited_to_its_sessions_ignores_other_traffic() {
    let router = MemoryRouter::new();
    let h = TestHarness::builder()
        .router(MemoryConnection::new(router.clone()))
        .only_sessions(["mine"])
        .timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let session = h.unique_session("s1");
    assert!(session.starts_with("s1-") && session.len() > 4);
    h.spawn_with(PaymentAgent, AgentOptions::new().session("mine"))
        .await;
    // Another test on the same bus.
    let other = TestHarness::with_router(MemoryConnection::new(router.clone()))
        .await
        .unwrap();
    other.send("theirs", AuditEvent { amount: 1.0 }).await;
    h.send("mine", payment(1.0, "u")).await;
    h.expect::<PaymentResponse>().session("mine").await;
    assert_eq!(
        h.published().channels(),
        [
            "PaymentRequest:request:mine",
            "PaymentResponse:response:mine"
        ]
    );
    h.assert_nothing_else_published().await;
    // The other harness saw everything, including this one's traffic.
    assert!(other.published().len() >= 3);
}

/// docs/testing.md says `spawn`, `send` and `request` panic on failure and "their `try_` forms return
/// it"; only `try_spawn_with`, `try_send_to` and `try_request` existed, so a user's `h.try_send(..)` or
/// `h.try_spawn(..)` did not compile. Both exist now and return the error.
#[tokio::test]
async fn try_spawn_and_try_send_return_the_error_instead_of_panicking() {
    let h = TestHarness::new().await;
    h.try_spawn(PaymentAgent).await.expect("spawned");
    let request = h.try_send("s1", payment(5.0, "u1")).await.expect("sent");
    let response = h.expect::<PaymentResponse>().session("s1").await;
    assert_eq!(
        response.envelope.correlation_id(),
        Some(request.id().to_string().as_str())
    );
    h.assert_nothing_else_published().await;
    // The runtime's router closed under the harness: both fail, neither panics.
    h.runtime()
        .shutdown(Duration::from_secs(1))
        .await
        .expect("the runtime shuts down");
    let error = h.try_send("s1", payment(5.0, "u1")).await.unwrap_err();
    assert!(matches!(error, Error::Closed { .. }), "{error:?}");
    let error = h.try_spawn(PaymentAgent).await.unwrap_err();
    assert!(matches!(error, Error::Closed { .. }), "{error:?}");
}

#[tokio::test]
async fn send_refuses_invalid_messages_with_the_reason() {
    #[derive(Debug, Serialize, Deserialize, Message)]
    struct Strict {
        #[message(non_empty)]
        name: String,
    }
    let h = TestHarness::new().await;
    let error = h
        .try_send_to("event", "s1", Strict { name: " ".into() })
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("field `name` breaks rule `non_empty`"),
        "{error}"
    );
    let text = panic_text(async move {
        h.send(
            "s1",
            Strict {
                name: String::new(),
            },
        )
        .await;
    })
    .await;
    assert!(
        text.starts_with(
            "could not send Strict to session \"s1\" (direction \"event\"): invalid Strict"
        ),
        "{text}"
    );
}

/// Fails its first attempt; the retry publishes an event.
#[agent(receives = [Job], sends = [AuditEvent])]
struct FailsOnce {
    failed: std::sync::atomic::AtomicBool,
}

impl Handle<Job> for FailsOnce {
    async fn handle(&self, job: Job, ctx: &Context<Self>) -> HandlerResult {
        if !self.failed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(HandlerError::msg("the first attempt fails"));
        }
        ctx.publish(AuditEvent {
            amount: f64::from(job.id),
        })
        .await?;
        Ok(())
    }
}

/// Regression: the quiet check only looked at running handlers, so a retry waiting out a backoff
/// longer than the quiet period let `assert_nothing_else_published` pass before the retry published.
#[tokio::test]
async fn a_retry_waiting_out_its_backoff_is_waited_for() {
    let h = Arc::new(TestHarness::new().await);
    h.spawn_with(
        FailsOnce {
            failed: false.into(),
        },
        AgentOptions::new().backoff(
            Backoff::new(Duration::from_millis(250), Duration::from_millis(250)).jitter(0.0),
        ),
    )
    .await;
    h.send("s1", Job { id: 4 }).await;
    let text = panic_text({
        let h = h.clone();
        async move { h.assert_nothing_else_published().await }
    })
    .await;
    assert!(
        text.starts_with(
            "expected nothing else to be published, but 1 message arrived that no expectation matched"
        ),
        "{text}"
    );
    assert!(text.contains(" AuditEvent:event:s1 id "), "{text}");
    let [agent] = &h.agents()[..] else {
        panic!("one agent")
    };
    assert_eq!(agent.health().retried, 1);
}

/// Blocks every handler until the test ends.
#[agent(receives = [Job])]
struct Stuck;

impl Handle<Job> for Stuck {
    async fn handle(&self, _job: Job, _ctx: &Context<Self>) -> HandlerResult {
        std::future::pending::<()>().await;
        Ok(())
    }
}

#[tokio::test]
async fn a_harness_that_never_gets_quiet_fails_the_nothing_else_assertion_and_says_why() {
    let h = Arc::new(
        TestHarness::builder()
            .timeout(Duration::from_millis(600))
            .build()
            .await
            .unwrap(),
    );
    // Started on the runtime directly, not through the harness: still counted.
    h.runtime()
        .spawn_with(Stuck, AgentOptions::new().fan_out())
        .await
        .unwrap();
    h.send("s1", Job { id: 1 }).await;
    let text = panic_text({
        let h = h.clone();
        async move { h.assert_nothing_else_published().await }
    })
    .await;
    assert!(
        text.starts_with(
            "expected nothing else to be published, but things were not quiet after 6"
        ),
        "{text}"
    );
    assert!(
        text.contains("(the harness timeout): 1 handler(s) running (Stuck: 1), 1 deliveries taken by agents and not settled yet; more may be published."),
        "{text}"
    );
}

/// A router whose operations can be made to hang, to show that the harness bounds each.
struct Hanging {
    inner: MemoryRouter,
    subscribe: std::sync::atomic::AtomicBool,
    publish: std::sync::atomic::AtomicBool,
    close: std::sync::atomic::AtomicBool,
}

impl Hanging {
    fn hangs(flag: &std::sync::atomic::AtomicBool) -> bool {
        flag.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Router for Hanging {
    fn backend(&self) -> &str {
        "hanging-memory"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, agentcomm_core::Result<PublishOutcome>> {
        if Self::hangs(&self.publish) {
            return Box::pin(std::future::pending());
        }
        self.inner.publish(envelope)
    }
    fn subscribe(
        &self,
        options: SubscribeOptions,
    ) -> BoxFuture<'_, agentcomm_core::Result<Subscription>> {
        if Self::hangs(&self.subscribe) {
            return Box::pin(std::future::pending());
        }
        self.inner.subscribe(options)
    }
    fn health(&self) -> BoxFuture<'_, Health> {
        self.inner.health()
    }
    fn close(&self) -> BoxFuture<'_, agentcomm_core::Result<()>> {
        if Self::hangs(&self.close) {
            return Box::pin(std::future::pending());
        }
        self.inner.close()
    }
}

#[tokio::test]
async fn every_harness_operation_on_a_hanging_router_fails_within_the_timeout() {
    let router = Arc::new(Hanging {
        inner: MemoryRouter::new(),
        subscribe: false.into(),
        publish: false.into(),
        close: false.into(),
    });
    let h = TestHarness::builder()
        .shared_router(router.clone())
        .only_sessions(["s1"])
        .timeout(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let step = Duration::from_secs(5);
    router
        .subscribe
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let error = tokio::time::timeout(step, h.try_spawn_with(PaymentAgent, AgentOptions::new()))
        .await
        .expect("bounded")
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "timed out after 200ms waiting for agent PaymentAgent to start (subscribing to what it receives) on hanging-memory"
    );
    let failure = tokio::time::timeout(
        step,
        h.expect::<PaymentResponse>()
            .session("s2")
            .within(Duration::from_millis(50))
            .result(),
    )
    .await
    .expect("bounded")
    .unwrap_err();
    assert!(
        failure.to_string().starts_with(
            "expected a PaymentResponse on session \"s2\", but the harness could not watch session \"s2\": \
             timed out after 200ms waiting for the harness's subscription to *:*:s2 on hanging-memory"
        ),
        "{failure}"
    );
    router
        .subscribe
        .store(false, std::sync::atomic::Ordering::SeqCst);
    router
        .publish
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let error = tokio::time::timeout(step, h.try_send_to("request", "s1", payment(1.0, "u")))
        .await
        .expect("bounded")
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "timed out after 200ms waiting for the publish to PaymentRequest:request:s1 on hanging-memory"
    );
    router
        .close
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let error = tokio::time::timeout(step, h.shutdown())
        .await
        .expect("bounded")
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "timed out after 200ms waiting for the router to close on hanging-memory"
    );
}

#[tokio::test]
async fn an_expectation_that_had_to_start_watching_says_what_it_may_have_missed() {
    let router = MemoryRouter::new();
    let h = TestHarness::builder()
        .router(MemoryConnection::new(router.clone()))
        .only_sessions(["mine"])
        .build()
        .await
        .unwrap();
    // Published to a session the harness does not watch yet, by another client.
    let early = Envelope::new(
        AuditEvent::channel("event", "late").unwrap(),
        "application/json",
        &br#"{"amount":1.0}"#[..],
    );
    router.publish(early).await.unwrap();
    let text = h
        .expect::<AuditEvent>()
        .session("late")
        .within(Duration::from_millis(100))
        .result()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        text.starts_with(
            "expected a AuditEvent on session \"late\" within 100ms, but it did not arrive"
        ),
        "{text}"
    );
    assert!(
        text.ends_with(
            "Note: session \"late\" was only watched from when this expectation started (the harness watches \
             only some sessions): what was published to it before was missed. Name it in `only_sessions(..)` \
             or call `h.observe_session(\"late\").await` before the agents publish.\n"
        ),
        "{text}"
    );
    // From now on the session is watched, and a second expectation has nothing to note.
    router
        .publish(Envelope::new(
            AuditEvent::channel("event", "late").unwrap(),
            "application/json",
            &br#"{"amount":2.0}"#[..],
        ))
        .await
        .unwrap();
    let seen = h.expect::<AuditEvent>().session("late").await;
    assert_eq!(seen.amount, 2.0);
    let text = h
        .expect::<AuditEvent>()
        .session("late")
        .within(Duration::from_millis(20))
        .result()
        .await
        .unwrap_err()
        .to_string();
    assert!(!text.contains("Note:"), "{text}");
}

/// Publishes an audit event, then a response, for each job.
#[agent(receives = [Job], sends = [AuditEvent, PaymentResponse])]
struct Announcer;

impl Handle<Job> for Announcer {
    async fn handle(&self, job: Job, ctx: &Context<Self>) -> HandlerResult {
        ctx.publish(AuditEvent {
            amount: f64::from(job.id),
        })
        .await?;
        ctx.publish(PaymentResponse {
            success: true,
            transaction_id: job.id.to_string(),
        })
        .await?;
        Ok(())
    }
}

/// Delivers audit events late, so they arrive after what was published after them.
struct SlowAudits(MemoryRouter, Duration);

impl Router for SlowAudits {
    fn backend(&self) -> &str {
        "slow-audits"
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, agentcomm_core::Result<PublishOutcome>> {
        if envelope.class() != AuditEvent::CLASS {
            return self.0.publish(envelope);
        }
        let (bus, delay) = (self.0.clone(), self.1);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = bus.publish(envelope).await;
        });
        Box::pin(async { Ok(PublishOutcome::Accepted) })
    }
    fn subscribe(
        &self,
        options: SubscribeOptions,
    ) -> BoxFuture<'_, agentcomm_core::Result<Subscription>> {
        self.0.subscribe(options)
    }
    fn health(&self) -> BoxFuture<'_, Health> {
        self.0.health()
    }
    fn close(&self) -> BoxFuture<'_, agentcomm_core::Result<()>> {
        self.0.close()
    }
}

#[tokio::test]
async fn what_agents_published_can_be_read_in_the_order_they_published_it() {
    let h = TestHarness::with_router(SlowAudits(MemoryRouter::new(), Duration::from_millis(100)))
        .await
        .unwrap();
    h.spawn(Announcer).await;
    let job = h.send("s1", Job { id: 9 }).await;
    let response = h.expect::<PaymentResponse>().await;
    let audit = h.expect::<AuditEvent>().await;
    // Seen in the other order...
    assert!(audit.position() > response.position());
    assert_eq!(
        h.published().from_agents().channels(),
        ["PaymentResponse:response:s1", "AuditEvent:event:s1"]
    );
    // ...but published audit first.
    assert!(audit.publish_order() < response.publish_order());
    assert_eq!(
        h.published().from_agents().in_publish_order().channels(),
        ["AuditEvent:event:s1", "PaymentResponse:response:s1"]
    );
    let published = h.published().in_publish_order();
    assert_eq!(published[0].envelope().id(), job.id());
    assert_eq!(published[0].publish_order(), Some(1));
    h.assert_nothing_else_published().await;
}

#[tokio::test]
async fn dropping_the_harness_stops_its_agents() {
    let h = TestHarness::new().await;
    let agent = h.spawn(PaymentAgent).await;
    drop(h);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while agent.health().state != AgentState::Stopped {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent of a dropped harness still runs: {:?}",
            agent.health()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Regression: a message published but still on its way to the harness's observer (a broker, or a
/// starved observer task, slower than the quiet period) let `assert_nothing_else_published` pass.
#[tokio::test]
async fn a_publish_still_on_its_way_to_the_harness_is_waited_for() {
    let h = Arc::new(
        TestHarness::with_router(SlowAudits(MemoryRouter::new(), Duration::from_millis(400)))
            .await
            .unwrap(),
    );
    h.spawn(Announcer).await;
    h.send("s1", Job { id: 2 }).await;
    h.expect::<PaymentResponse>().await;
    let text = panic_text({
        let h = h.clone();
        async move { h.assert_nothing_else_published().await }
    })
    .await;
    assert!(
        text.starts_with(
            "expected nothing else to be published, but 1 message arrived that no expectation matched"
        ),
        "{text}"
    );
    assert!(text.contains(" AuditEvent:event:s1 id "), "{text}");
}

#[tokio::test]
async fn a_message_delivered_twice_is_not_hidden_by_nothing_else_published() {
    let h = TestHarness::new().await;
    let channel = Channel::for_message::<AuditEvent>(AuditEvent::DIRECTION, "s1").unwrap();
    let envelope = h
        .bus()
        .envelope(channel, &AuditEvent { amount: 1.0 })
        .unwrap();
    // The same message twice: a broker redelivering, or a backend resending what it lost track of.
    h.router().publish(envelope.clone()).await.unwrap();
    h.router().publish(envelope.clone()).await.unwrap();
    // Its retry (the same id, the next attempt) is not a duplicate.
    h.router().publish(envelope.with_attempt(2)).await.unwrap();
    let event = h.expect::<AuditEvent>().session("s1").await;
    assert_eq!(event.amount, 1.0);
    let text = panic_text(async move { h.assert_nothing_else_published().await }).await;
    assert!(
        text.contains("1 message was delivered again") && text.contains("(attempt 1), came twice"),
        "{text}"
    );
}

/// A router that lets the test end the harness's own subscription, as a lost connection would.
struct LosesObserver {
    inner: MemoryRouter,
    first: std::sync::Mutex<Option<agentcomm_core::router::SubscriptionCloser>>,
}

impl Router for LosesObserver {
    fn backend(&self) -> &str {
        "loses-observer"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, agentcomm_core::Result<PublishOutcome>> {
        self.inner.publish(envelope)
    }
    fn subscribe(
        &self,
        options: SubscribeOptions,
    ) -> BoxFuture<'_, agentcomm_core::Result<Subscription>> {
        Box::pin(async move {
            let subscription = self.inner.subscribe(options).await?;
            let mut first = self.first.lock().unwrap();
            if first.is_none() {
                *first = Some(subscription.closer());
            }
            Ok(subscription)
        })
    }
    fn health(&self) -> BoxFuture<'_, Health> {
        self.inner.health()
    }
    fn close(&self) -> BoxFuture<'_, agentcomm_core::Result<()>> {
        self.inner.close()
    }
}

#[tokio::test]
async fn nothing_else_cannot_be_asserted_once_the_harness_stopped_watching() {
    let router = Arc::new(LosesObserver {
        inner: MemoryRouter::new(),
        first: std::sync::Mutex::new(None),
    });
    let h = Arc::new(
        TestHarness::builder()
            .shared_router(router.clone())
            .timeout(Duration::from_secs(1))
            .build()
            .await
            .unwrap(),
    );
    let closer = router.first.lock().unwrap().take().unwrap();
    closer.close().await.unwrap();
    // Published after the harness's subscription ended: it cannot have been seen.
    let channel = Channel::for_message::<AuditEvent>(AuditEvent::DIRECTION, "s1").unwrap();
    let envelope = h
        .bus()
        .envelope(channel, &AuditEvent { amount: 7.0 })
        .unwrap();
    router.inner.publish(envelope).await.unwrap();
    for text in [
        panic_text({
            let h = h.clone();
            async move { h.assert_no_more_within(Duration::from_millis(300)).await }
        })
        .await,
        panic_text({
            let h = h.clone();
            async move { h.assert_nothing_else_published().await }
        })
        .await,
    ] {
        assert!(
            text.contains("but the harness stopped watching")
                && text.contains("what was published since was not seen"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn waits_of_any_length_are_accepted() {
    let h = TestHarness::builder()
        .timeout(Duration::MAX)
        .build()
        .await
        .unwrap();
    h.send("s1", payment(1.0, "u")).await;
    let channel = Channel::for_message::<AuditEvent>(AuditEvent::DIRECTION, "s1").unwrap();
    let envelope = h
        .bus()
        .envelope(channel, &AuditEvent { amount: 2.0 })
        .unwrap();
    h.router().publish(envelope).await.unwrap();
    let event = h.expect::<AuditEvent>().within(Duration::MAX).await;
    assert_eq!(event.amount, 2.0);
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
struct Charge {
    id: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
struct Charged {
    id: u32,
}

/// Charges each message id once, however often it comes; counts its runs; takes `pause` per run.
#[agent(receives = [Charge], sends = [Charged])]
struct Idempotent {
    seen: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    runs: Arc<std::sync::atomic::AtomicUsize>,
    pause: Duration,
}

impl Idempotent {
    fn new(pause: Duration) -> (Self, Arc<std::sync::atomic::AtomicUsize>) {
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let agent = Idempotent {
            seen: Arc::default(),
            runs: runs.clone(),
            pause,
        };
        (agent, runs)
    }
}

impl Handle<Charge> for Idempotent {
    async fn handle(&self, charge: Charge, ctx: &Context<Self>) -> HandlerResult {
        self.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(self.pause).await;
        let id = ctx.envelope().id().to_string();
        if self.seen.lock().unwrap().insert(id) {
            ctx.publish(Charged { id: charge.id }).await?;
        }
        Ok(())
    }
}

/// Waits until `runs` reaches `n`, within 5 s.
async fn runs_reach(runs: &std::sync::atomic::AtomicUsize, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while runs.load(std::sync::atomic::Ordering::SeqCst) < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "runs stayed below {n}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_test_may_send_one_message_twice_without_it_counting_as_a_duplicate() {
    let h = TestHarness::new().await;
    let (agent, runs) = Idempotent::new(Duration::ZERO);
    h.spawn(agent).await;
    let channel = Channel::for_message::<Charge>(Charge::DIRECTION, "s1").unwrap();
    let envelope = h.bus().envelope(channel, &Charge { id: 1 }).unwrap();
    h.send_envelope(envelope.clone()).await;
    h.send_envelope(envelope).await;
    h.expect::<Charged>().session("s1").await;
    runs_reach(&runs, 2).await;
    h.assert_nothing_else_published().await;
}

#[tokio::test]
async fn nothing_else_holds_after_the_test_shut_the_runtime_down_itself() {
    let h = TestHarness::new().await;
    let (agent, _) = Idempotent::new(Duration::ZERO);
    h.spawn(agent).await;
    h.send("s1", Charge { id: 1 }).await;
    h.expect::<Charged>().await;
    let report = h.runtime().shutdown(Duration::from_secs(1)).await.unwrap();
    assert_eq!(report.aborted, 0);
    h.assert_nothing_else_published().await;
}

#[tokio::test]
async fn a_harness_without_a_time_limit_still_stops_its_agents_gracefully() {
    let h = TestHarness::builder()
        .timeout(Duration::MAX)
        .build()
        .await
        .unwrap();
    let (agent, runs) = Idempotent::new(Duration::from_millis(300));
    h.spawn(agent).await;
    h.send("s1", Charge { id: 1 }).await;
    runs_reach(&runs, 1).await;
    let report = h.shutdown().await.unwrap();
    assert_eq!(report.handled, 1, "{report:?}");
}

/// Refuses every job for good, and counts its runs (a permanent failure must run once).
#[agent(receives = [Job])]
struct RefusesForGood(Arc<std::sync::atomic::AtomicUsize>);

impl Handle<Job> for RefusesForGood {
    async fn handle(&self, _: Job, _: &Context<Self>) -> HandlerResult {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Err(HandlerError::permanent("the card was charged already"))
    }
}

/// A memory router whose first dead-letter publish fails, like a broker hiccup.
struct FirstDeadLetterFails {
    inner: MemoryRouter,
    failed: std::sync::atomic::AtomicBool,
}

impl Router for FirstDeadLetterFails {
    fn backend(&self) -> &str {
        "memory-first-dead-letter-fails"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, Result<PublishOutcome>> {
        if envelope.channel().class() == "DeadLetter"
            && !self.failed.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return Box::pin(async {
                Err(Error::Backend {
                    backend: "memory-first-dead-letter-fails",
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

/// The runtime gives back a message whose dead letter could not be published marked so that it is
/// dead-lettered when it comes again, without running its handler again. Under the harness it must
/// behave the same: a handler that refused a charge for good must not be run a second time.
#[tokio::test]
async fn a_message_given_back_marked_by_the_runtime_comes_back_marked_under_the_harness() {
    let h = TestHarness::with_router(FirstDeadLetterFails {
        inner: MemoryRouter::new(),
        failed: std::sync::atomic::AtomicBool::new(false),
    })
    .await
    .unwrap();
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let options = AgentOptions::new()
        .group(format!("refuses.{}", h.id()))
        .backoff(Backoff::new(
            Duration::from_millis(5),
            Duration::from_millis(5),
        ));
    h.spawn_with(RefusesForGood(runs.clone()), options).await;
    h.send("s1", Job { id: 1 }).await;
    let letter = h.expect_dead_letter::<Job>().reason("rejected").await;
    h.assert_nothing_else_published().await;
    assert_eq!(
        runs.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the handler failed for good once; it ran again"
    );
    assert_eq!(letter.attempts(), Some(1));
    assert_eq!(letter.error(), Some("the card was charged already"));
}

/// How the runtime handed each delivery back: `give_back` (no handler saw it) or `abandon`.
type HandBacks = Arc<std::sync::Mutex<Vec<&'static str>>>;

/// A memory router that records how its deliveries are handed back unsettled.
struct RecordsHandBacks {
    inner: MemoryRouter,
    hand_backs: HandBacks,
}

struct RecordingAck {
    inner: Box<dyn agentcomm_core::router::Acknowledge>,
    hand_backs: HandBacks,
}

impl agentcomm_core::router::Acknowledge for RecordingAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        self.inner.ack()
    }
    fn nack(
        self: Box<Self>,
        envelope: Envelope,
        action: agentcomm_core::router::NackAction,
    ) -> BoxFuture<'static, Result<()>> {
        self.inner.nack(envelope, action)
    }
    fn abandon(self: Box<Self>, envelope: Envelope) {
        self.hand_backs.lock().unwrap().push("abandon");
        self.inner.abandon(envelope);
    }
    fn give_back(self: Box<Self>, envelope: Envelope) {
        self.hand_backs.lock().unwrap().push("give_back");
        self.inner.give_back(envelope);
    }
}

impl Router for RecordsHandBacks {
    fn backend(&self) -> &str {
        "memory-records-hand-backs"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, Result<PublishOutcome>> {
        self.inner.publish(envelope)
    }
    fn subscribe(&self, options: SubscribeOptions) -> BoxFuture<'_, Result<Subscription>> {
        Box::pin(async move {
            let subscription = self.inner.subscribe(options.clone()).await?;
            let closer = subscription.closer();
            let hand_backs = self.hand_backs.clone();
            let deliveries = futures::StreamExt::map(subscription, move |delivery| {
                let (envelope, inner) = delivery.into_parts();
                agentcomm_core::router::Delivery::new(
                    envelope,
                    Box::new(RecordingAck {
                        inner,
                        hand_backs: hand_backs.clone(),
                    }),
                )
            });
            Ok(Subscription::from_stream(
                deliveries,
                Arc::new(CloseWith(closer)),
                &options,
            ))
        })
    }
    fn health(&self) -> BoxFuture<'_, Health> {
        self.inner.health()
    }
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        self.inner.close()
    }
}

struct CloseWith(agentcomm_core::router::SubscriptionCloser);

impl agentcomm_core::router::SubscriptionControl for CloseWith {
    fn close(&self) -> BoxFuture<'static, Result<()>> {
        let closer = self.0.clone();
        Box::pin(async move { closer.close().await })
    }
}

/// An agent stopped with deliveries still buffered gives them back as unseen (a backend that
/// counts deliveries, such as Redis Streams, does not count them as attempts) and abandons only the
/// one its handler was cut off on. Under the harness the backend must be told the same.
#[tokio::test]
async fn deliveries_given_back_unseen_reach_the_backend_as_given_back_under_the_harness() {
    let hand_backs = HandBacks::default();
    let h = TestHarness::with_router(RecordsHandBacks {
        inner: MemoryRouter::new(),
        hand_backs: hand_backs.clone(),
    })
    .await
    .unwrap();
    let agent = h.spawn_with(Stuck, AgentOptions::new().fan_out()).await;
    for id in 0..3 {
        h.send("s1", Job { id }).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while agent.health().in_flight == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no handler started");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let report = agent.stop(Duration::from_millis(100)).await;
    assert_eq!((report.aborted, report.requeued), (1, 2), "{report:?}");
    let mut recorded = hand_backs.lock().unwrap().clone();
    recorded.sort_unstable();
    assert_eq!(recorded, ["abandon", "give_back", "give_back"]);
}

/// Declines every payment for good.
#[agent(receives = [PaymentRequest], sends = [PaymentResponse])]
struct Declines;

impl Handle<PaymentRequest> for Declines {
    async fn handle(&self, _: PaymentRequest, _: &Context<Self>) -> HandlerResult {
        Err(HandlerError::permanent("the card was declined"))
    }
}

/// A request its agent dead-letters fails at once with the agent's error, as `Publisher::request`
/// does, instead of waiting out the harness timeout and calling the failure reply undecodable.
#[tokio::test]
async fn a_request_its_agent_dead_letters_fails_at_once_with_the_agents_error() {
    let h = TestHarness::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .await
        .unwrap();
    h.spawn(Declines).await;
    let started = std::time::Instant::now();
    let failure = h
        .try_request::<PaymentRequest, PaymentResponse>("s1", payment(5.0, "u1"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        failure.starts_with("expected the reply to PaymentRequest ")
            && failure.contains(
                ", but the request failed in agent 'Declines' and was dead-lettered (rejected, after 1 \
                 attempt(s)): the card was declined"
            ),
        "{failure}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "waited {:?} for a reply that had failed",
        started.elapsed()
    );
    h.expect_dead_letter::<PaymentRequest>()
        .reason("rejected")
        .await;
    // The failure reply is on the reply's channel, but it is no PaymentResponse: `of` leaves it out
    // (it panicked, "cannot be decoded as PaymentResponse").
    let published = h.published();
    assert_eq!(
        published
            .iter()
            .filter(|seen| seen.is_failure_reply())
            .count(),
        1
    );
    assert!(published.of::<PaymentResponse>().is_empty());
    h.assert_nothing_else_published().await;
}

/// A predicate that panics (an `unwrap` in it) fails the test with its own message. It panicked
/// while the harness held the lock on what it had seen: dropping the harness then panicked again on
/// that lock, and a panic while unwinding aborts the whole test binary.
#[tokio::test]
#[should_panic(expected = "the predicate's own panic")]
async fn a_panicking_predicate_fails_the_test_with_its_own_message() {
    let h = TestHarness::new().await;
    h.spawn(PaymentAgent).await;
    h.send(
        "s1",
        PaymentRequest {
            amount: 5.0,
            user_id: "u".into(),
        },
    )
    .await;
    h.expect::<PaymentResponse>()
        .matching(|_| panic!("the predicate's own panic"))
        .await;
}
