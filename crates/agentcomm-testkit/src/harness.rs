//! The test harness: run agents, send them messages, and assert what they publish.
//!
//! [`TestHarness`] runs a [`Runtime`] on a router (a fresh [`MemoryRouter`] by default, any broker when
//! given one) and watches all traffic through its own fan-out subscription. A test sends messages
//! into sessions, then *expects* what should come out: each expectation waits, up to a timeout, for
//! the first matching message nobody has matched yet, and fails with a list of what arrived instead.
//! No test needs to sleep.
//!
//! ```
//! use std::time::Duration;
//! use agentcomm_core::prelude::*;
//! use agentcomm_testkit::TestHarness;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Serialize, Deserialize, Message)]
//! #[message(direction = "request")]
//! struct PaymentRequest { amount: f64 }
//!
//! #[derive(Debug, Serialize, Deserialize, Message)]
//! #[message(direction = "response")]
//! struct PaymentResponse { success: bool }
//!
//! #[agent(receives = [PaymentRequest], sends = [PaymentResponse])]
//! struct PaymentAgent;
//!
//! impl Handle<PaymentRequest> for PaymentAgent {
//!     async fn handle(&self, request: PaymentRequest, ctx: &Context<Self>) -> HandlerResult {
//!         ctx.reply(PaymentResponse { success: request.amount > 0.0 }).await?;
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let h = TestHarness::new().await;
//! h.spawn(PaymentAgent).await;
//! let request = h.send("s1", PaymentRequest { amount: 10.0 }).await;
//! let response = h
//!     .expect::<PaymentResponse>()
//!     .session("s1")
//!     .matching(|response| response.success)
//!     .within(Duration::from_secs(1))
//!     .await;
//! assert_eq!(response.envelope.correlation_id(), Some(request.id().to_string().as_str()));
//! h.assert_nothing_else_published().await;
//! # }
//! ```
//!
//! The same test runs on a broker: build the harness with [`TestHarness::with_router`]. On a broker
//! shared with other tests, give each test its own sessions ([`TestHarness::unique_session`]) and
//! restrict the harness to them ([`HarnessBuilder::only_sessions`]); see `docs/testing.md`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::future::IntoFuture;
use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentcomm_core::agent::Agent;
use agentcomm_core::bus::Bus;
use agentcomm_core::channel::{
    Channel, ChannelPattern, DEAD_LETTER_CLASS, INBOX_PREFIX, REPLY_DIRECTION,
};
use agentcomm_core::codec::Codec;
use agentcomm_core::envelope::{Envelope, MessageId, headers};
use agentcomm_core::error::{Error, Result};
use agentcomm_core::memory::MemoryRouter;
use agentcomm_core::message::Message;
use agentcomm_core::router::{BoxFuture, Router, SharedRouter, SubscribeOptions, Subscription};
use agentcomm_core::runtime::{AgentHandle, AgentOptions, Runtime, ShutdownReport, decode_message};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

mod activity;

use activity::{Activity, Busy, TrackedRouter};

/// How long an expectation waits unless told otherwise ([`HarnessBuilder::timeout`]).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long nothing must happen before [`TestHarness::assert_nothing_else_published`] looks.
pub const DEFAULT_QUIET_PERIOD: Duration = Duration::from_millis(100);

/// The most messages a failure lists.
const MAX_LISTED: usize = 30;

/// Builds a [`TestHarness`] with settings other than the defaults.
///
/// ```
/// use std::time::Duration;
/// use agentcomm_core::MemoryRouter;
/// use agentcomm_testkit::TestHarness;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> agentcomm_core::Result<()> {
/// let h = TestHarness::builder()
///     .router(MemoryRouter::new())
///     .timeout(Duration::from_secs(2))
///     .build()
///     .await?;
/// assert_eq!(h.timeout(), Duration::from_secs(2));
/// # Ok(())
/// # }
/// ```
#[must_use = "a builder does nothing until `build().await`"]
pub struct HarnessBuilder {
    router: Option<SharedRouter>,
    codec: Codec,
    timeout: Duration,
    quiet_period: Duration,
    sessions: Option<Vec<String>>,
}

impl fmt::Debug for HarnessBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HarnessBuilder")
            .field(
                "backend",
                &self
                    .router
                    .as_ref()
                    .map(|router| router.backend().to_string()),
            )
            .field("codec", &self.codec)
            .field("timeout", &self.timeout)
            .field("quiet_period", &self.quiet_period)
            .field("sessions", &self.sessions)
            .finish()
    }
}

impl HarnessBuilder {
    /// Runs on `router` instead of a new in-memory router.
    pub fn router(self, router: impl Router) -> Self {
        self.shared_router(Arc::new(router))
    }

    /// Runs on a router already shared.
    pub fn shared_router(mut self, router: SharedRouter) -> Self {
        self.router = Some(router);
        self
    }

    /// Encodes what the harness sends with `codec` (MessagePack by default).
    pub fn codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// How long expectations and requests wait unless told otherwise (default 5 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long nothing must arrive before [`TestHarness::assert_nothing_else_published`] decides
    /// (default 100 ms).
    pub fn quiet_period(mut self, quiet_period: Duration) -> Self {
        self.quiet_period = quiet_period;
        self
    }

    /// Watches only these sessions instead of everything (`*:*:*`): for a broker shared with other
    /// tests. Sessions the harness sends to, requests from, or spawns agents on are added as they come;
    /// add others with [`TestHarness::observe_session`].
    pub fn only_sessions<S: Into<String>>(mut self, sessions: impl IntoIterator<Item = S>) -> Self {
        self.sessions = Some(sessions.into_iter().map(Into::into).collect());
        self
    }

    /// Starts the harness: builds the runtime and subscribes the observer.
    pub async fn build(self) -> Result<TestHarness> {
        let router = match self.router {
            Some(router) => router,
            None => Arc::new(MemoryRouter::new()),
        };
        // The runtime runs on the router counted, so that the harness knows what its agents hold
        // and what waits to be retried; the observer reads the router itself.
        let activity = Arc::new(Activity::default());
        let tracked: SharedRouter = Arc::new(TrackedRouter::new(router.clone(), activity.clone()));
        let runtime = Runtime::builder_shared(tracked)
            .codec(self.codec)
            .request_timeout(self.timeout)
            .build();
        let id = uuid::Uuid::now_v7().simple().to_string();
        let harness = TestHarness {
            // The last characters of a v7 UUID are random: short, and unique enough per test run.
            id: id[id.len() - 12..].to_string(),
            router,
            runtime,
            recorder: Arc::new(Recorder::new(activity.clone())),
            activity,
            observing: tokio::sync::Mutex::new(Observing {
                everything: self.sessions.is_none(),
                sessions: Vec::new(),
                templated: Vec::new(),
                patterns: HashSet::new(),
                tasks: Vec::new(),
            }),
            agents: Mutex::new(Vec::new()),
            timeout: self.timeout,
            quiet_period: self.quiet_period,
        };
        match self.sessions {
            None => {
                harness
                    .observe_patterns(vec![ChannelPattern::all()])
                    .await?;
            }
            Some(sessions) => {
                for session in sessions {
                    harness.try_observe_session(&session).await?;
                }
            }
        }
        Ok(harness)
    }
}

/// Runs agents on a router and asserts what they publish. See the [module documentation](self).
///
/// Methods that set up or act (`spawn`, `send`, `request`, expectations awaited directly) panic with
/// a message that says what went wrong, as assertions do; the `try_` methods and
/// [`Expectation::result`] return the error instead.
pub struct TestHarness {
    id: String,
    router: SharedRouter,
    runtime: Runtime,
    recorder: Arc<Recorder>,
    activity: Arc<Activity>,
    observing: tokio::sync::Mutex<Observing>,
    agents: Mutex<Vec<AgentHandle>>,
    timeout: Duration,
    quiet_period: Duration,
}

struct Observing {
    everything: bool,
    sessions: Vec<String>,
    /// Message types with their own channel template: their channels need their own patterns.
    templated: Vec<(&'static str, PatternFor)>,
    patterns: HashSet<ChannelPattern>,
    tasks: Vec<JoinHandle<()>>,
}

impl fmt::Debug for TestHarness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.recorder.lock();
        f.debug_struct("TestHarness")
            .field("id", &self.id)
            .field("backend", &self.router.backend())
            .field("seen", &state.records.len())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Drop for TestHarness {
    /// Stops watching, and stops the agents still running (in the background, within a second):
    /// a harness dropped without [`shutdown`](TestHarness::shutdown) leaves no agent taking messages.
    /// The router stays open (it may be shared); durable group queues a broker made for the agents
    /// stay too, since the `Router` trait cannot delete them: see `docs/testing.md` for cleaning up.
    fn drop(&mut self) {
        self.recorder.stopping();
        if let Ok(observing) = self.observing.try_lock() {
            for task in &observing.tasks {
                task.abort();
            }
        }
        let agents = self.runtime.agents();
        if !agents.is_empty()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                futures::future::join_all(
                    agents
                        .iter()
                        .map(|agent| agent.stop(Duration::from_secs(1))),
                )
                .await;
            });
        }
    }
}

impl TestHarness {
    /// A harness on a new in-memory router, watching everything.
    pub async fn new() -> Self {
        Self::builder()
            .build()
            .await
            .expect("a harness on the in-memory router starts")
    }

    /// A harness on `router` (a broker, or a configured in-memory router), watching everything.
    pub async fn with_router(router: impl Router) -> Result<Self> {
        Self::builder().router(router).build().await
    }

    /// A builder for other settings.
    pub fn builder() -> HarnessBuilder {
        HarnessBuilder {
            router: None,
            codec: Codec::default(),
            timeout: DEFAULT_TIMEOUT,
            quiet_period: DEFAULT_QUIET_PERIOD,
            sessions: None,
        }
    }

    /// The runtime the agents run on.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// The router the harness was built on. (The runtime's [`Runtime::router`] is the same router
    /// counted by the harness, so that it knows what the agents hold and what waits to be retried.)
    pub fn router(&self) -> &SharedRouter {
        &self.router
    }

    /// The bus the harness publishes through: it publishes any message, without an agent's contract
    /// (the test plays the world outside the agents).
    pub fn bus(&self) -> &Bus {
        self.runtime.bus()
    }

    /// How long expectations wait unless told otherwise.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A short id unique to this harness (it names the harness's agent groups and request inbox).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// `prefix` made unique to this harness (`s1` becomes `s1-<id>`): sessions that tests sharing a
    /// broker cannot confuse.
    pub fn unique_session(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.id)
    }

    // ----- agents -------------------------------------------------------------------------------

    /// Starts `agent`. Its instances share a group private to this harness (when the backend has
    /// groups; otherwise each gets every message), so that tests sharing a broker do not take each
    /// other's messages. Panics if it cannot start.
    pub async fn spawn<A: Agent>(&self, agent: A) -> AgentHandle {
        match self.try_spawn(agent).await {
            Ok(handle) => handle,
            Err(error) => panic!("could not spawn agent {}: {error}", A::NAME),
        }
    }

    /// Starts `agent` as [`TestHarness::spawn`] does, or says why it cannot.
    pub async fn try_spawn<A: Agent>(&self, agent: A) -> Result<AgentHandle> {
        let options = if self.router().capabilities().consumer_groups {
            AgentOptions::new().group(format!("{}.{}", A::NAME, self.id))
        } else {
            AgentOptions::new().fan_out()
        };
        self.try_spawn_with(agent, options).await
    }

    /// Starts `agent` with `options`, exactly as given. Panics if it cannot start.
    pub async fn spawn_with<A: Agent>(&self, agent: A, options: AgentOptions) -> AgentHandle {
        match self.try_spawn_with(agent, options).await {
            Ok(handle) => handle,
            Err(error) => panic!("could not spawn agent {}: {error}", A::NAME),
        }
    }

    /// Starts `agent` with `options`, or says why it cannot.
    pub async fn try_spawn_with<A: Agent>(
        &self,
        agent: A,
        options: AgentOptions,
    ) -> Result<AgentHandle> {
        if let Some(session) = &options.session {
            self.try_observe_session(session).await?;
        }
        let handle = self
            .bounded(
                || {
                    format!(
                        "agent {} to start (subscribing to what it receives)",
                        A::NAME
                    )
                },
                self.runtime.spawn_with(agent, options),
            )
            .await??;
        self.agents
            .lock()
            .expect("agents lock")
            .push(handle.clone());
        Ok(handle)
    }

    /// The agents started through this harness.
    pub fn agents(&self) -> Vec<AgentHandle> {
        self.agents.lock().expect("agents lock").clone()
    }

    // ----- sending ------------------------------------------------------------------------------

    /// Publishes `message` to `session` in its default direction, as a test client; returns the
    /// envelope sent. Panics if it cannot be published.
    pub async fn send<M: Message>(&self, session: &str, message: M) -> Envelope {
        self.send_to(M::DIRECTION, session, message).await
    }

    /// Publishes `message` to `session` in its default direction as [`TestHarness::send`] does, or
    /// says why it cannot (an invalid message, a broken connection, ...).
    pub async fn try_send<M: Message>(&self, session: &str, message: M) -> Result<Envelope> {
        self.try_send_to(M::DIRECTION, session, message).await
    }

    /// Publishes `message` on `direction` and `session`. Panics if it cannot be published.
    pub async fn send_to<M: Message>(
        &self,
        direction: &str,
        session: &str,
        message: M,
    ) -> Envelope {
        match self.try_send_to(direction, session, message).await {
            Ok(envelope) => envelope,
            Err(error) => panic!(
                "could not send {} to session {session:?} (direction {direction:?}): {error}",
                M::CLASS
            ),
        }
    }

    /// Publishes `message` on `direction` and `session`, or says why it cannot (an invalid message,
    /// a broken connection, ...).
    pub async fn try_send_to<M: Message>(
        &self,
        direction: &str,
        session: &str,
        message: M,
    ) -> Result<Envelope> {
        self.try_observe::<M>().await?;
        self.try_observe_session(session).await?;
        let channel = Channel::for_message::<M>(direction, session)?;
        let envelope = self.bus().envelope(channel, &message)?;
        self.try_send_envelope(envelope).await
    }

    /// Publishes a ready envelope (for instance one whose payload is deliberately broken). Panics if
    /// it cannot be published.
    pub async fn send_envelope(&self, envelope: Envelope) -> Envelope {
        let channel = envelope.channel().canonical();
        match self.try_send_envelope(envelope).await {
            Ok(envelope) => envelope,
            Err(error) => panic!("could not send an envelope to {channel}: {error}"),
        }
    }

    /// Publishes a ready envelope, or says why it cannot.
    pub async fn try_send_envelope(&self, envelope: Envelope) -> Result<Envelope> {
        self.try_observe_session(envelope.session()).await?;
        self.recorder.mark_sent(envelope.id());
        let channel = envelope.channel().canonical();
        self.bounded(
            || format!("the publish to {channel}"),
            self.bus().publish_envelope(envelope.clone(), Some("test")),
        )
        .await??;
        Ok(envelope)
    }

    /// Awaits `future` at most the harness timeout; past it, an `Error::Timeout` naming `what`.
    async fn bounded<T>(
        &self,
        what: impl FnOnce() -> String,
        future: impl std::future::Future<Output = T>,
    ) -> Result<T> {
        tokio::time::timeout(self.timeout, future)
            .await
            .map_err(|_| Error::Timeout {
                operation: format!("{} on {}", what(), self.router.backend()),
                after: self.timeout,
            })
    }

    /// Sends `message` as a request to `session` and waits (up to the harness timeout) for the reply,
    /// which it matches so that it does not count as unexpected. Panics when no reply comes, listing
    /// what arrived instead, or at once when the agent dead-lettered the request, with its error.
    pub async fn request<Req: Message, Resp: Message>(
        &self,
        session: &str,
        message: Req,
    ) -> Received<Resp> {
        match self.try_request::<Req, Resp>(session, message).await {
            Ok(reply) => reply,
            Err(failure) => panic!("{failure}"),
        }
    }

    /// Like [`request`](Self::request), returning the failure instead of panicking.
    pub async fn try_request<Req: Message, Resp: Message>(
        &self,
        session: &str,
        message: Req,
    ) -> std::result::Result<Received<Resp>, ExpectationFailed> {
        let inbox = format!("{INBOX_PREFIX}harness-{}", self.id);
        let prepare = async {
            self.try_observe::<Resp>().await?;
            self.try_observe_session(&inbox).await?;
            let reply_to = Channel::for_message::<Resp>(REPLY_DIRECTION, &inbox)?;
            let channel = Channel::for_message::<Req>(Req::DIRECTION, session)?;
            let envelope = self
                .bus()
                .envelope(channel, &message)?
                .with_reply_to(reply_to.canonical());
            self.try_send_envelope(envelope).await
        };
        let request = prepare.await.map_err(|error| ExpectationFailed {
            message: format!(
                "could not send the {} request to session {session:?}: {error}",
                Req::CLASS
            ),
        })?;
        let request_id = request.id().to_string();
        let what = format!("the reply to {} {}", Req::CLASS, request.id());
        // Any envelope correlated with the request ends the wait: the reply, or the failure reply the
        // runtime sends when the agent dead-letters the request (which `Publisher::request` turns
        // into `Error::RequestFailed` at once). Only then is it decoded.
        let seen = self
            .expect_envelope()
            .session(&inbox)
            .direction(REPLY_DIRECTION)
            .where_envelope(move |envelope| envelope.correlation_id() == Some(request_id.as_str()))
            .described_as(what.clone())
            .result()
            .await?;
        let envelope = seen.envelope();
        if let Some(reason) = envelope.header(headers::REQUEST_FAILED) {
            return Err(ExpectationFailed {
                message: format!(
                    "expected {what}, but the request failed in agent '{}' and was dead-lettered ({reason}, \
                     after {} attempt(s)): {}; its dead letter is on 'DeadLetter:{}:*' with \
                     agentcomm-original-id {}",
                    envelope.header(headers::AGENT).unwrap_or("unknown"),
                    envelope.header(headers::ATTEMPTS).unwrap_or("?"),
                    envelope.header(headers::ERROR).unwrap_or(""),
                    Req::CLASS,
                    request.id(),
                ),
            });
        }
        match decode_message::<Resp>(envelope) {
            Ok(message) => Ok(Received {
                message,
                envelope: envelope.clone(),
                position: seen.position(),
                publish_order: seen.publish_order(),
                at: seen.at(),
            }),
            Err(rejection) => Err(ExpectationFailed {
                message: format!(
                    "expected {what}, but the reply that came ({} on '{}') could not be decoded as {}: {}",
                    envelope.class(),
                    envelope.channel().name(),
                    Resp::CLASS,
                    rejection.error
                ),
            }),
        }
    }

    // ----- observing ----------------------------------------------------------------------------

    /// Makes sure messages of type `M` are seen even when their channel template is not the default
    /// (on a broker, `*:*:*` only covers default names). `send`, `request` and `expect` call it; call
    /// it yourself before an agent publishes such a type the test has not named yet.
    pub async fn observe<M: Message>(&self) {
        if let Err(error) = self.try_observe::<M>().await {
            panic!("the harness could not observe {}: {error}", M::CLASS);
        }
    }

    /// Whether this made a new subscription (so anything published earlier may have been missed).
    async fn try_observe<M: Message>(&self) -> Result<bool> {
        if M::TEMPLATE.is_default() {
            return Ok(false);
        }
        let pattern_for: PatternFor = pattern_of::<M>;
        let patterns = {
            let mut observing = self.observing.lock().await;
            if observing
                .templated
                .iter()
                .any(|(class, _)| *class == M::CLASS)
            {
                return Ok(false);
            }
            observing.templated.push((M::CLASS, pattern_for));
            if observing.everything {
                vec![pattern_for(None)?]
            } else {
                observing
                    .sessions
                    .iter()
                    .map(|session| pattern_for(Some(session)))
                    .collect::<Result<Vec<_>>>()?
            }
        };
        self.observe_patterns(patterns).await
    }

    /// Watches `session` too (only matters for a harness built with
    /// [`HarnessBuilder::only_sessions`]).
    pub async fn observe_session(&self, session: &str) {
        if let Err(error) = self.try_observe_session(session).await {
            panic!("the harness could not observe session {session:?}: {error}");
        }
    }

    /// Whether this made a new subscription (so anything published earlier was missed).
    async fn try_observe_session(&self, session: &str) -> Result<bool> {
        let patterns = {
            let mut observing = self.observing.lock().await;
            if observing.everything || observing.sessions.iter().any(|known| known == session) {
                return Ok(false);
            }
            observing.sessions.push(session.to_string());
            let mut patterns = vec![ChannelPattern::with_template(
                agentcomm_core::channel::ChannelTemplate::DEFAULT,
                None,
                None,
                Some(session),
            )?];
            for (_, pattern_for) in &observing.templated {
                patterns.push(pattern_for(Some(session))?);
            }
            patterns
        };
        self.observe_patterns(patterns).await
    }

    /// Watches `pattern` too, with its own fan-out subscription.
    pub async fn observe_pattern(&self, pattern: ChannelPattern) {
        let text = format!("{pattern:?}");
        if let Err(error) = self.observe_patterns(vec![pattern]).await {
            panic!("the harness could not observe {text}: {error}");
        }
    }

    /// Subscribes the observer to the patterns not watched yet; whether it did.
    async fn observe_patterns(&self, patterns: Vec<ChannelPattern>) -> Result<bool> {
        let mut observing = self.observing.lock().await;
        let fresh: Vec<ChannelPattern> = patterns
            .into_iter()
            .filter(|pattern| !observing.patterns.contains(pattern))
            .collect();
        if fresh.is_empty() {
            return Ok(false);
        }
        let listed = fresh
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let subscription = self
            .bounded(
                || format!("the harness's subscription to {listed}"),
                self.router
                    .subscribe(SubscribeOptions::patterns(fresh.clone())),
            )
            .await??;
        // Live now: what is published there from here on will be seen.
        self.activity.observing(&fresh);
        observing.patterns.extend(fresh);
        let observer = observing.tasks.len();
        observing.tasks.push(tokio::spawn(observe(
            subscription,
            self.recorder.clone(),
            observer,
        )));
        Ok(true)
    }

    // ----- expectations -------------------------------------------------------------------------

    /// Expects a message of type `M` (not a dead letter). Refine it with `.session(..)`,
    /// `.direction(..)`, `.matching(..)`, `.within(..)`, then `.await` it.
    pub fn expect<M: Message>(&self) -> Expectation<'_, Received<M>> {
        Expectation::new(
            self,
            format!("a {}", M::CLASS),
            Box::new(|record: &Record| {
                let envelope = &record.envelope;
                if envelope.channel().class() == DEAD_LETTER_CLASS || envelope.class() != M::CLASS {
                    return Check::Other;
                }
                match decode_message::<M>(envelope) {
                    Ok(message) => Check::Candidate(Received {
                        message,
                        envelope: envelope.clone(),
                        position: record.position,
                        publish_order: record.publish_order,
                        at: record.at,
                    }),
                    Err(rejection) => Check::Near(format!(
                        "could not be decoded as {}: {}",
                        M::CLASS,
                        rejection.error
                    )),
                }
            }),
        )
        .observing_type(M::CLASS, observe_type_of::<M>)
    }

    /// Expects the dead letter of a message of type `M` (on `DeadLetter:<M's class>:<session>`).
    pub fn expect_dead_letter<M: Message>(&self) -> Expectation<'_, DeadLetter<M>> {
        Expectation::new(
            self,
            format!("a dead letter of {}", M::CLASS),
            Box::new(|record: &Record| {
                let envelope = &record.envelope;
                if envelope.channel().class() != DEAD_LETTER_CLASS || envelope.class() != M::CLASS {
                    return Check::Other;
                }
                Check::Candidate(DeadLetter {
                    message: decode_message::<M>(envelope).ok(),
                    envelope: envelope.clone(),
                    position: record.position,
                    publish_order: record.publish_order,
                    at: record.at,
                })
            }),
        )
    }

    /// Expects any envelope, narrowed with `.class(..)`, `.channel_class(..)`, `.session(..)`,
    /// `.direction(..)` and `.matching(..)` (for instance the dead letter of a malformed frame,
    /// class `agentcomm.Malformed`).
    pub fn expect_envelope(&self) -> Expectation<'_, Seen> {
        Expectation::new(
            self,
            "a message".to_string(),
            Box::new(|record: &Record| Check::Candidate(record.seen())),
        )
    }

    /// Everything seen so far, in arrival order (the test's own sends included, marked).
    pub fn published(&self) -> Traffic {
        let state = self.recorder.lock();
        Traffic(state.records.iter().map(Record::seen).collect())
    }

    /// What was seen that no expectation has matched, apart from the test's own sends.
    pub fn unmatched(&self) -> Traffic {
        let state = self.recorder.lock();
        Traffic(
            state
                .records
                .iter()
                .filter(|record| !record.matched && !record.sent_by_test)
                .map(Record::seen)
                .collect(),
        )
    }

    /// Waits until things are quiet, then fails if anything was seen that no expectation matched,
    /// listing it. Quiet means: nothing new seen for the quiet period (100 ms by default), no handler
    /// of any agent of the runtime running, no delivery taken by an agent and not settled, none
    /// waiting in an agent's subscription, no retry waiting out its backoff in the router, and
    /// nothing published through the runtime on a watched channel that the harness has not seen. When
    /// things are still not quiet after the harness timeout, it fails and says what is still going
    /// on: more may be published, so "nothing else" cannot be asserted.
    pub async fn assert_nothing_else_published(&self) {
        let started = Instant::now();
        let still_busy = self.wait_for_quiet().await;
        self.assert_still_watching("nothing else to be published");
        self.assert_no_duplicates("nothing else to be published");
        let unmatched = self.unmatched();
        if let Some(busy) = still_busy {
            let mut text = format!(
                "expected nothing else to be published, but things were not quiet after {} (the harness \
                 timeout): {busy}; more may be published. Expect what the agents still do, stop them, or \
                 raise the harness timeout.\n",
                human(started.elapsed()),
            );
            if !unmatched.is_empty() {
                let _ = writeln!(
                    text,
                    "Meanwhile {} that no expectation matched:",
                    count(unmatched.len(), "message arrived", "messages arrived")
                );
                list_records(&mut text, &unmatched, &BTreeMap::new());
            }
            panic!("{text}");
        }
        if !unmatched.is_empty() {
            let mut text = format!(
                "expected nothing else to be published, but {} that no expectation matched \
                 (checked after {:?} of quiet, {} after the assertion started):\n",
                count(unmatched.len(), "message arrived", "messages arrived"),
                self.quiet_period,
                human(started.elapsed()),
            );
            list_records(&mut text, &unmatched, &BTreeMap::new());
            text.push_str(
                "Match each with `expect::<T>()` or `expect_dead_letter::<T>()` before this assertion.",
            );
            panic!("{text}");
        }
    }

    /// Fails as soon as anything that no expectation matched is seen, now or within `duration`.
    pub async fn assert_no_more_within(&self, duration: Duration) {
        let started = Instant::now();
        let deadline = later(started, duration);
        let mut changes = self.recorder.version.subscribe();
        let expected = format!("nothing more within {duration:?}");
        loop {
            changes.borrow_and_update();
            self.assert_still_watching(&expected);
            self.assert_no_duplicates(&expected);
            let unmatched = self.unmatched();
            if !unmatched.is_empty() {
                let mut text = format!(
                    "expected nothing more within {duration:?}, but after {} {} that no expectation matched:\n",
                    human(started.elapsed()),
                    count(
                        unmatched.len(),
                        "message had arrived",
                        "messages had arrived"
                    ),
                );
                list_records(&mut text, &unmatched, &BTreeMap::new());
                panic!("{text}");
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return,
            }
        }
    }

    /// Fails when one of the harness's subscriptions has ended: what was published since cannot
    /// have been seen, so "nothing else" cannot be asserted.
    fn assert_still_watching(&self, expected: &str) {
        let ended = self.recorder.lock().ended.clone();
        if let Some(reason) = ended {
            panic!(
                "expected {expected}, but the harness stopped watching: {reason}; what was published \
                 since was not seen"
            );
        }
    }

    /// Fails when one of the harness's subscriptions was given the same attempt of a message twice.
    fn assert_no_duplicates(&self, expected: &str) {
        let duplicates = self.recorder.lock().duplicates.clone();
        if let Some(first) = duplicates.first() {
            panic!(
                "expected {expected}, but {} delivered again: the first, {} {} on '{}' (attempt {}), \
                 came twice",
                count(duplicates.len(), "message was", "messages were"),
                first.class(),
                first.id(),
                first.channel().name(),
                first.attempt(),
            );
        }
    }

    /// Waits, at most the harness timeout, until nothing new has been seen for the quiet period and
    /// the runtime is idle; `None` when it got there, otherwise what was still going on.
    async fn wait_for_quiet(&self) -> Option<String> {
        let deadline = later(Instant::now(), self.timeout);
        let mut changes = self.recorder.version.subscribe();
        changes.borrow_and_update();
        let mut last_arrival = Instant::now();
        let mut look_from = later(last_arrival, self.quiet_period);
        while Instant::now() < deadline {
            match tokio::time::timeout_at(look_from.min(deadline), changes.changed()).await {
                Ok(Ok(())) => {
                    changes.borrow_and_update();
                    last_arrival = Instant::now();
                    look_from = later(last_arrival, self.quiet_period);
                }
                Ok(Err(_)) => return None,
                Err(_) if Instant::now() >= look_from => {
                    if self.busy().is_idle() {
                        return None;
                    }
                    // Busy without news: look again a quiet period later.
                    look_from = later(Instant::now(), self.quiet_period);
                }
                Err(_) => {}
            }
        }
        let busy = self.busy();
        if !busy.is_idle() {
            Some(busy.to_string())
        } else if last_arrival.elapsed() < self.quiet_period {
            Some(format!(
                "messages kept arriving (the last {} ago)",
                human(last_arrival.elapsed())
            ))
        } else {
            None
        }
    }

    /// What keeps the runtime busy: handlers of any of its agents, and what its subscriptions hold.
    fn busy(&self) -> Busy {
        let mut busy = self.activity.busy();
        busy.handlers = self
            .runtime
            .agents()
            .iter()
            .map(AgentHandle::health)
            .filter(|health| health.in_flight > 0)
            .map(|health| (health.name, health.in_flight))
            .collect();
        busy
    }

    /// Stops every agent (each finishes what it holds, within the harness timeout) and closes the
    /// router, like [`Runtime::shutdown`]. Bounded: an agent that does not stop is aborted by the
    /// runtime shortly after the timeout, and a router whose `close()` takes longer than the timeout
    /// gives `Error::Timeout`.
    pub async fn shutdown(self) -> Result<ShutdownReport> {
        self.recorder.stopping();
        let agents = self.runtime.agents();
        let reports =
            futures::future::join_all(agents.iter().map(|agent| agent.stop(self.timeout))).await;
        let mut total = ShutdownReport::default();
        for report in reports {
            total.handled += report.handled;
            total.requeued += report.requeued;
            total.aborted += report.aborted;
        }
        self.bounded(|| "the router to close".to_string(), self.router.close())
            .await??;
        Ok(total)
    }
}

type PatternFor = fn(Option<&str>) -> Result<ChannelPattern>;

fn pattern_of<M: Message>(session: Option<&str>) -> Result<ChannelPattern> {
    ChannelPattern::for_message::<M>(None, session)
}

fn observe_type_of<M: Message>(harness: &TestHarness) -> BoxFuture<'_, Result<bool>> {
    Box::pin(harness.try_observe::<M>())
}

/// Records what `subscription` delivers; `observer` tells the harness's subscriptions apart.
async fn observe(mut subscription: Subscription, recorder: Arc<Recorder>, observer: usize) {
    let description = subscription.description().to_string();
    while let Some(delivery) = subscription.next().await {
        recorder.record(delivery.envelope().clone(), observer);
        if let Err(error) = delivery.ack().await {
            tracing::warn!(error = %error, "the test harness could not acknowledge what it observed");
        }
    }
    recorder.ended(format!(
        "its subscription ({description}) ended: the router was closed"
    ));
}

// ----- recording ---------------------------------------------------------------------------------

struct Recorder {
    started: Instant,
    state: Mutex<RecorderState>,
    version: watch::Sender<u64>,
    activity: Arc<Activity>,
}

#[derive(Default)]
struct RecorderState {
    records: Vec<Record>,
    ids: HashSet<MessageId>,
    /// Copies each observer was given of each attempt of a message: more than one, and more than the
    /// test itself sent, is a duplicate (a retry is another attempt).
    copies: HashMap<(usize, MessageId, u32), u32>,
    /// The copies beyond those, which no expectation can match.
    duplicates: Vec<Envelope>,
    /// How many times the test itself sent each message: as many copies of it are no duplicates.
    sent: HashMap<MessageId, u32>,
    ended: Option<String>,
    stopping: bool,
}

#[derive(Clone)]
struct Record {
    envelope: Envelope,
    position: usize,
    publish_order: Option<u64>,
    at: Duration,
    sent_by_test: bool,
    matched: bool,
}

impl Record {
    fn seen(&self) -> Seen {
        Seen {
            envelope: self.envelope.clone(),
            position: self.position,
            publish_order: self.publish_order,
            at: self.at,
            sent_by_test: self.sent_by_test,
            matched: self.matched,
        }
    }
}

impl Recorder {
    fn new(activity: Arc<Activity>) -> Self {
        Recorder {
            started: Instant::now(),
            state: Mutex::default(),
            version: watch::Sender::new(0),
            activity,
        }
    }

    fn mark_sent(&self, id: MessageId) {
        *self.lock().sent.entry(id).or_default() += 1;
    }

    fn record(&self, envelope: Envelope, observer: usize) {
        self.activity.seen(&envelope.id());
        let mut state = self.lock();
        let copies = state
            .copies
            .entry((observer, envelope.id(), envelope.attempt()))
            .or_insert(0);
        *copies += 1;
        let copies = *copies;
        if copies > 1 {
            // One more copy than the test sent is a duplicate; a test sending a message twice (to
            // check that it is handled once) gets two copies and no complaint.
            let sent = state.sent.get(&envelope.id()).copied().unwrap_or(0);
            if copies > sent.max(1) {
                state.duplicates.push(envelope);
                drop(state);
                self.version.send_modify(|version| *version += 1);
            }
            return;
        }
        // Several observer subscriptions can match one message; it was published once.
        if !state.ids.insert(envelope.id()) {
            return;
        }
        let sent_by_test = state.sent.contains_key(&envelope.id());
        let position = state.records.len() + 1;
        // Numbered when the publish was made, before it reached the broker: already known here.
        let publish_order = self.activity.publish_order(&envelope.id());
        state.records.push(Record {
            envelope,
            position,
            publish_order,
            at: self.started.elapsed(),
            sent_by_test,
            matched: false,
        });
        drop(state);
        self.version.send_modify(|version| *version += 1);
    }

    fn ended(&self, reason: String) {
        let mut state = self.lock();
        // A router closed through the harness (by the test, or by the runtime's shutdown) can publish
        // nothing more: its observer ending hides nothing.
        if state.stopping || state.ended.is_some() || self.activity.router_closed() {
            return;
        }
        state.ended = Some(reason);
        drop(state);
        self.version.send_modify(|version| *version += 1);
    }

    /// What was seen. A panic under the lock (a test's predicate panicking while an expectation
    /// checks it) leaves the state as it was: the harness goes on, and above all its `Drop`, which
    /// runs while that panic unwinds, must not panic again (that aborts the test binary).
    fn lock(&self) -> std::sync::MutexGuard<'_, RecorderState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn stopping(&self) {
        self.lock().stopping = true;
    }
}

// ----- what was seen -----------------------------------------------------------------------------

/// One message the harness saw.
#[derive(Debug, Clone)]
pub struct Seen {
    envelope: Envelope,
    position: usize,
    publish_order: Option<u64>,
    at: Duration,
    sent_by_test: bool,
    matched: bool,
}

impl Seen {
    /// The envelope.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// Its place in arrival order (the order the harness saw), from 1.
    pub fn position(&self) -> usize {
        self.position
    }

    /// Its place among the publishes made through the harness's runtime (its agents, their replies
    /// and dead letters, and the test's own sends), from 1, numbered when each publish was made: the
    /// order they were published in, on every backend. `None` for a message published by something
    /// else (another process, or the router directly).
    pub fn publish_order(&self) -> Option<u64> {
        self.publish_order
    }

    /// When it was seen, from the start of the harness.
    pub fn at(&self) -> Duration {
        self.at
    }

    /// Whether the test sent it itself (`send`, `request`).
    pub fn sent_by_test(&self) -> bool {
        self.sent_by_test
    }

    /// Whether an expectation had matched it when this snapshot was taken.
    pub fn matched(&self) -> bool {
        self.matched
    }

    /// Whether it is a dead letter.
    pub fn is_dead_letter(&self) -> bool {
        self.envelope.channel().class() == DEAD_LETTER_CLASS
    }

    /// Whether it is the failure reply the runtime sends a requester when the agent dead-letters its
    /// request: on the reply's channel, but empty, with the reason in headers
    /// (`agentcomm-request-failed`), not a message of the reply's type.
    pub fn is_failure_reply(&self) -> bool {
        self.envelope.header(headers::REQUEST_FAILED).is_some()
    }

    /// Decodes the payload as `M`.
    pub fn decode<M: Message>(&self) -> Result<M> {
        decode_message::<M>(&self.envelope).map_err(|rejection| rejection.error)
    }
}

/// A snapshot of what the harness saw, in arrival order. Derefs to a slice of [`Seen`].
///
/// ```
/// # use agentcomm_testkit::harness::Traffic;
/// # fn check(traffic: Traffic) {
/// assert_eq!(traffic.from_agents().channels(), ["PaymentResponse:response:s1"]);
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct Traffic(Vec<Seen>);

impl Traffic {
    /// The canonical channel of each message (`Class:direction:session`), in order.
    pub fn channels(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|seen| seen.envelope.channel().canonical())
            .collect()
    }

    /// The message class of each message, in order (a dead letter shows its original class).
    pub fn classes(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|seen| seen.envelope.class().to_string())
            .collect()
    }

    /// The messages published through the harness's runtime, in the order they were published
    /// ([`Seen::publish_order`]), whatever order they arrived in; messages published by something
    /// else are left out. `h.published().from_agents().in_publish_order().channels()` is what the
    /// agents published, in order.
    pub fn in_publish_order(&self) -> Traffic {
        let mut ordered: Vec<Seen> = self
            .0
            .iter()
            .filter(|seen| seen.publish_order.is_some())
            .cloned()
            .collect();
        ordered.sort_by_key(|seen| seen.publish_order);
        Traffic(ordered)
    }

    /// Without the test's own sends: what the system under test published.
    pub fn from_agents(&self) -> Traffic {
        Traffic(
            self.0
                .iter()
                .filter(|seen| !seen.sent_by_test)
                .cloned()
                .collect(),
        )
    }

    /// Only dead letters.
    pub fn dead_letters(&self) -> Traffic {
        Traffic(
            self.0
                .iter()
                .filter(|seen| seen.is_dead_letter())
                .cloned()
                .collect(),
        )
    }

    /// Every message of type `M` (dead letters and failure replies excluded), decoded, in order.
    /// Panics if one cannot be decoded.
    pub fn of<M: Message>(&self) -> Vec<M> {
        self.0
            .iter()
            .filter(|seen| {
                !seen.is_dead_letter()
                    && !seen.is_failure_reply()
                    && seen.envelope.class() == M::CLASS
            })
            .map(|seen| {
                seen.decode::<M>().unwrap_or_else(|error| {
                    panic!(
                        "message #{} ({}) cannot be decoded as {}: {error}",
                        seen.position,
                        seen.envelope.channel().canonical(),
                        M::CLASS
                    )
                })
            })
            .collect()
    }

    /// The snapshots.
    pub fn into_vec(self) -> Vec<Seen> {
        self.0
    }
}

impl Deref for Traffic {
    type Target = [Seen];

    fn deref(&self) -> &[Seen] {
        &self.0
    }
}

impl IntoIterator for Traffic {
    type Item = Seen;
    type IntoIter = std::vec::IntoIter<Seen>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a Traffic {
    type Item = &'a Seen;
    type IntoIter = std::slice::Iter<'a, Seen>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// A message an expectation matched: decoded, with its envelope. Derefs to the message.
#[non_exhaustive]
pub struct Received<M> {
    /// The message.
    pub message: M,
    /// Its envelope.
    pub envelope: Envelope,
    position: usize,
    publish_order: Option<u64>,
    at: Duration,
}

impl<M> Received<M> {
    /// Its place in arrival order, from 1 (on a broker, arrival order holds only within one channel:
    /// brokers order each channel, not channels between them).
    pub fn position(&self) -> usize {
        self.position
    }

    /// Its place among the publishes made through the harness's runtime, from 1 (see
    /// [`Seen::publish_order`]): compare two to assert the order an agent published them in, on any
    /// backend and across channels. `None` when something else published it.
    pub fn publish_order(&self) -> Option<u64> {
        self.publish_order
    }

    /// When it was seen, from the start of the harness.
    pub fn at(&self) -> Duration {
        self.at
    }

    /// The message, without the envelope.
    pub fn into_message(self) -> M {
        self.message
    }
}

impl<M> Deref for Received<M> {
    type Target = M;

    fn deref(&self) -> &M {
        &self.message
    }
}

impl<M: fmt::Debug> fmt::Debug for Received<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Received")
            .field("message", &self.message)
            .field("envelope", &self.envelope)
            .field("position", &self.position)
            .finish()
    }
}

/// A dead letter an expectation matched.
#[non_exhaustive]
pub struct DeadLetter<M> {
    /// The dead letter's envelope (on `DeadLetter:<class>:<session>`, with the reason in headers).
    pub envelope: Envelope,
    message: Option<M>,
    position: usize,
    publish_order: Option<u64>,
    at: Duration,
}

impl<M> DeadLetter<M> {
    /// The original message, when its payload decodes (not for undecodable or invalid ones).
    pub fn message(&self) -> Option<&M> {
        self.message.as_ref()
    }

    /// Why it was dead-lettered: one of the `REASON_*` values of
    /// [`agentcomm_core::envelope::headers`] (`handler-failed`, `undecodable`, ...).
    pub fn reason(&self) -> Option<&str> {
        self.envelope.header(headers::DEAD_LETTER_REASON)
    }

    /// The error of the last attempt.
    pub fn error(&self) -> Option<&str> {
        self.envelope.header(headers::ERROR)
    }

    /// How many attempts were made.
    pub fn attempts(&self) -> Option<u32> {
        self.envelope.header(headers::ATTEMPTS)?.parse().ok()
    }

    /// The agent that gave up on it.
    pub fn agent(&self) -> Option<&str> {
        self.envelope.header(headers::AGENT)
    }

    /// The id the message had before it was dead-lettered.
    pub fn original_id(&self) -> Option<&str> {
        self.envelope.header(headers::ORIGINAL_ID)
    }

    /// The session of the message.
    pub fn session(&self) -> &str {
        self.envelope.session()
    }

    /// Its place in arrival order, from 1.
    pub fn position(&self) -> usize {
        self.position
    }

    /// Its place among the publishes made through the harness's runtime, from 1 (see
    /// [`Seen::publish_order`]).
    pub fn publish_order(&self) -> Option<u64> {
        self.publish_order
    }

    /// When it was seen, from the start of the harness.
    pub fn at(&self) -> Duration {
        self.at
    }
}

impl<M: fmt::Debug> fmt::Debug for DeadLetter<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetter")
            .field("reason", &self.reason())
            .field("error", &self.error())
            .field("attempts", &self.attempts())
            .field("message", &self.message)
            .field("envelope", &self.envelope)
            .finish()
    }
}

// ----- expectations ------------------------------------------------------------------------------

/// An expectation that failed: its text says what was expected, what arrived instead, and how long
/// the harness waited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectationFailed {
    message: String,
}

impl ExpectationFailed {
    /// The whole explanation.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ExpectationFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ExpectationFailed {}

enum Check<T> {
    /// Of the expected kind; filters and the predicate decide.
    Candidate(T),
    /// Of the expected kind but unusable, and why.
    Near(String),
    /// Another kind of message.
    Other,
}

type Extract<T> = Box<dyn Fn(&Record) -> Check<T> + Send + Sync>;
type Predicate<T> = Box<dyn Fn(&T) -> bool + Send + Sync>;
type EnvelopePredicate = Box<dyn Fn(&Envelope) -> bool + Send + Sync>;
type ObserveType = fn(&TestHarness) -> BoxFuture<'_, Result<bool>>;

/// A pending expectation: narrow it, then `.await` it (panics on failure) or call
/// [`result`](Self::result).
#[must_use = "an expectation does nothing until it is awaited"]
pub struct Expectation<'h, T> {
    harness: &'h TestHarness,
    what: String,
    extract: Extract<T>,
    class: Option<String>,
    channel_class: Option<String>,
    session: Option<String>,
    direction: Option<String>,
    envelope_predicate: Option<EnvelopePredicate>,
    predicate: Option<Predicate<T>>,
    description: Option<String>,
    within: Duration,
    observe_type: Option<(&'static str, ObserveType)>,
}

impl<T> fmt::Debug for Expectation<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Expectation")
            .field("what", &self.describe())
            .field("within", &self.within)
            .finish()
    }
}

impl<'h, T> Expectation<'h, T> {
    fn new(harness: &'h TestHarness, what: String, extract: Extract<T>) -> Self {
        Expectation {
            harness,
            what,
            extract,
            class: None,
            channel_class: None,
            session: None,
            direction: None,
            envelope_predicate: None,
            predicate: None,
            description: None,
            within: harness.timeout,
            observe_type: None,
        }
    }

    fn observing_type(mut self, class: &'static str, observe: ObserveType) -> Self {
        self.observe_type = Some((class, observe));
        self
    }

    /// Only in this session.
    pub fn session(mut self, session: impl Into<String>) -> Self {
        self.session = Some(session.into());
        self
    }

    /// Only in this direction (for a dead letter, the direction of its channel is the original class).
    pub fn direction(mut self, direction: impl Into<String>) -> Self {
        self.direction = Some(direction.into());
        self
    }

    /// Only what `predicate` accepts.
    pub fn matching(mut self, predicate: impl Fn(&T) -> bool + Send + Sync + 'static) -> Self {
        self.predicate = Some(Box::new(predicate));
        self
    }

    /// Only envelopes `predicate` accepts (headers, correlation id, ...).
    pub fn where_envelope(
        mut self,
        predicate: impl Fn(&Envelope) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.envelope_predicate = Some(Box::new(predicate));
        self
    }

    /// Names what is expected in the failure message, instead of "matching the predicate".
    pub fn described_as(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// Waits at most this long (default: the harness timeout).
    pub fn within(mut self, timeout: Duration) -> Self {
        self.within = timeout;
        self
    }

    fn describe(&self) -> String {
        if let Some(description) = &self.description {
            return description.clone();
        }
        let mut what = self.what.clone();
        if let Some(class) = &self.class {
            let _ = write!(what, " of class {class:?}");
        }
        if let Some(channel_class) = &self.channel_class {
            let _ = write!(what, " on a {channel_class:?} channel");
        }
        if let Some(session) = &self.session {
            let _ = write!(what, " on session {session:?}");
        }
        if let Some(direction) = &self.direction {
            let _ = write!(what, " in direction {direction:?}");
        }
        match (&self.envelope_predicate, &self.predicate) {
            (Some(_), Some(_)) => what.push_str(" matching both predicates"),
            (Some(_), None) => what.push_str(" matching the envelope predicate"),
            (None, Some(_)) => what.push_str(" matching the predicate"),
            (None, None) => {}
        }
        what
    }

    fn check(&self, record: &Record) -> Check<T> {
        let envelope = &record.envelope;
        if self
            .class
            .as_deref()
            .is_some_and(|class| envelope.class() != class)
            || self
                .channel_class
                .as_deref()
                .is_some_and(|class| envelope.channel().class() != class)
        {
            return Check::Other;
        }
        let candidate = match (self.extract)(record) {
            Check::Candidate(candidate) => candidate,
            other => return other,
        };
        if let Some(session) = &self.session
            && envelope.session() != session
        {
            return Check::Near(format!(
                "session is {:?}, not {session:?}",
                envelope.session()
            ));
        }
        if let Some(direction) = &self.direction
            && envelope.channel().direction() != direction
        {
            return Check::Near(format!(
                "direction is {:?}, not {direction:?}",
                envelope.channel().direction()
            ));
        }
        if let Some(predicate) = &self.envelope_predicate
            && !predicate(envelope)
        {
            return Check::Near("its envelope did not match the envelope predicate".into());
        }
        if let Some(predicate) = &self.predicate
            && !predicate(&candidate)
        {
            return Check::Near(match &self.description {
                Some(description) => format!("it is not {description}"),
                None => "it did not match the predicate".into(),
            });
        }
        Check::Candidate(candidate)
    }

    /// Waits for the expected message; on failure, returns the explanation instead of panicking.
    pub async fn result(self) -> std::result::Result<T, ExpectationFailed> {
        let harness = self.harness;
        let what = self.describe();
        // What this expectation had to start watching itself: anything published there before was
        // not seen, and a failure must say so rather than "it did not arrive".
        let mut watched_late = Vec::new();
        if let Some((class, observe)) = self.observe_type {
            match observe(harness).await {
                Ok(true) => watched_late.push(format!(
                    "{class} has its own channel template and was only watched with its own subscription from \
                     when this expectation started: what was published before may have been missed (on a \
                     broker `*:*:*` does not cover its channel names). Call `h.observe::<{class}>().await` \
                     before the agents publish it."
                )),
                Ok(false) => {}
                Err(error) => {
                    return Err(ExpectationFailed {
                        message: format!(
                            "expected {what}, but the harness could not watch for it: {error}"
                        ),
                    });
                }
            }
        }
        if let Some(session) = &self.session {
            match harness.try_observe_session(session).await {
                Ok(true) => watched_late.push(format!(
                    "session {session:?} was only watched from when this expectation started (the harness \
                     watches only some sessions): what was published to it before was missed. Name it in \
                     `only_sessions(..)` or call `h.observe_session({session:?}).await` before the agents publish."
                )),
                Ok(false) => {}
                Err(error) => {
                    return Err(ExpectationFailed {
                        message: format!(
                            "expected {what}, but the harness could not watch session {session:?}: {error}"
                        ),
                    });
                }
            }
        }
        let started = Instant::now();
        let deadline = later(started, self.within);
        let recorder = &harness.recorder;
        let mut changes = recorder.version.subscribe();
        let mut cursor = 0;
        let mut notes: BTreeMap<usize, String> = BTreeMap::new();
        loop {
            changes.borrow_and_update();
            let ended = {
                let mut state = recorder.lock();
                while cursor < state.records.len() {
                    let record = &state.records[cursor];
                    let position = record.position;
                    match self.check(record) {
                        Check::Candidate(_) if record.sent_by_test => {
                            notes.insert(position, "sent by the test itself".into());
                        }
                        Check::Candidate(_) if record.matched => {
                            notes.insert(
                                position,
                                "already matched by an earlier expectation".into(),
                            );
                        }
                        Check::Candidate(found) => {
                            state.records[cursor].matched = true;
                            return Ok(found);
                        }
                        Check::Near(reason) => {
                            notes.insert(position, reason);
                        }
                        Check::Other => {}
                    }
                    cursor += 1;
                }
                state.ended.clone()
            };
            let outcome = match ended {
                Some(reason) => Some(format!("the harness stopped watching: {reason}")),
                None => match tokio::time::timeout_at(deadline, changes.changed()).await {
                    Ok(Ok(())) => None,
                    Ok(Err(_)) => Some("the harness was dropped".to_string()),
                    Err(_) => Some("it did not arrive".to_string()),
                },
            };
            if let Some(outcome) = outcome {
                let mut message =
                    harness.failure_text(&what, self.within, started.elapsed(), &outcome, &notes);
                for note in &watched_late {
                    let _ = writeln!(message, "Note: {note}");
                }
                return Err(ExpectationFailed { message });
            }
        }
    }
}

impl<'h, T: Send + 'h> IntoFuture for Expectation<'h, T> {
    type Output = T;
    type IntoFuture = BoxFuture<'h, T>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            match self.result().await {
                Ok(found) => found,
                Err(failure) => panic!("{failure}"),
            }
        })
    }
}

impl<'h> Expectation<'h, Seen> {
    /// Only messages of this class (for a dead letter, the class of the message it carries).
    pub fn class(mut self, class: impl Into<String>) -> Self {
        self.class = Some(class.into());
        self
    }

    /// Only messages on channels of this class (`DeadLetter` for dead letters).
    pub fn channel_class(mut self, class: impl Into<String>) -> Self {
        self.channel_class = Some(class.into());
        self
    }
}

impl<'h, M: Message> Expectation<'h, DeadLetter<M>> {
    /// Only dead letters with this reason (`handler-failed`, `undecodable`, `invalid`, ...).
    pub fn reason(self, reason: &'static str) -> Self {
        self.where_envelope(move |envelope| {
            envelope.header(headers::DEAD_LETTER_REASON) == Some(reason)
        })
    }
}

impl TestHarness {
    fn failure_text(
        &self,
        what: &str,
        within: Duration,
        waited: Duration,
        outcome: &str,
        notes: &BTreeMap<usize, String>,
    ) -> String {
        let seen = self.published();
        let mut text = format!(
            "expected {what} within {within:?}, but {outcome} (waited {}).\n",
            human(waited)
        );
        if seen.is_empty() {
            text.push_str(
                "Nothing was published at all: is an agent that handles what the test sent spawned on this harness, \
                 and listening to that session?\n",
            );
        } else {
            let _ = writeln!(
                text,
                "Seen instead ({}, oldest first):",
                count(seen.len(), "message", "messages")
            );
            list_records(&mut text, &seen, notes);
        }
        text
    }
}

/// `250ms`, `1.25s`: short and exact enough for a failure message.
fn human(duration: Duration) -> String {
    if duration < Duration::from_secs(1) {
        format!("{}ms", duration.as_millis())
    } else {
        format!("{:.2}s", duration.as_secs_f64())
    }
}

/// `from` plus `duration`, or some thirty years from `from` when that is past what an `Instant` holds
/// (`Duration::MAX` for "as long as it takes").
fn later(from: Instant, duration: Duration) -> Instant {
    from.checked_add(duration)
        .unwrap_or_else(|| from + Duration::from_secs(30 * 365 * 24 * 60 * 60))
}

fn count(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

/// Lists messages, one per line, with the note an expectation left on each; long lists keep the
/// noted messages and the most recent others.
fn list_records(text: &mut String, seen: &[Seen], notes: &BTreeMap<usize, String>) {
    let shown: Vec<&Seen> = if seen.len() <= MAX_LISTED {
        seen.iter().collect()
    } else {
        let noted: Vec<&Seen> = seen
            .iter()
            .filter(|s| notes.contains_key(&s.position))
            .take(MAX_LISTED / 2)
            .collect();
        let room = MAX_LISTED - noted.len();
        let recent: Vec<&Seen> = seen
            .iter()
            .filter(|s| !notes.contains_key(&s.position))
            .rev()
            .take(room)
            .collect();
        let mut shown: Vec<&Seen> = noted.into_iter().chain(recent).collect();
        shown.sort_by_key(|s| s.position);
        shown
    };
    for seen in &shown {
        let envelope = &seen.envelope;
        let _ = write!(
            text,
            "  #{} +{:.3}s {}",
            seen.position,
            seen.at.as_secs_f64(),
            envelope.channel().canonical()
        );
        if envelope.channel().name() != envelope.channel().canonical() {
            let _ = write!(text, " (named {:?})", envelope.channel().name());
        }
        let _ = write!(text, " id {}", envelope.id());
        if let Some(correlation) = envelope.correlation_id() {
            let _ = write!(text, " correlation {correlation}");
        }
        if seen.is_dead_letter() {
            let _ = write!(
                text,
                " [dead letter of {}: {} after {} attempt(s): {}]",
                envelope.class(),
                envelope
                    .header(headers::DEAD_LETTER_REASON)
                    .unwrap_or("no reason given"),
                envelope.header(headers::ATTEMPTS).unwrap_or("?"),
                envelope.header(headers::ERROR).unwrap_or("no error given"),
            );
        }
        if seen.sent_by_test {
            text.push_str(" [sent by the test]");
        }
        if let Some(note) = notes.get(&seen.position) {
            let _ = write!(text, " <- {note}");
        }
        text.push('\n');
    }
    if shown.len() < seen.len() {
        let _ = writeln!(text, "  ({} more not shown)", seen.len() - shown.len());
    }
}
