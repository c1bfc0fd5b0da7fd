//! The agent runtime: subscribes agents to what they receive, decodes, validates and dispatches,
//! acknowledges, retries with backoff, dead-letters, and shuts down gracefully.
//!
//! ```
//! use std::time::Duration;
//! use agentcomm_core::prelude::*;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Serialize, Deserialize, Message)]
//! #[message(direction = "request")]
//! struct Ping { n: u32 }
//!
//! #[derive(Debug, Serialize, Deserialize, Message)]
//! struct Pong { n: u32 }
//!
//! #[agent(receives = [Ping], sends = [Pong])]
//! struct Echo;
//!
//! impl Handle<Ping> for Echo {
//!     async fn handle(&self, ping: Ping, ctx: &Context<Self>) -> HandlerResult {
//!         ctx.reply(Pong { n: ping.n }).await?;
//!         Ok(())
//!     }
//! }
//!
//! #[agent(sends = [Ping])]
//! struct Client;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> agentcomm_core::Result<()> {
//! let runtime = Runtime::new(MemoryRouter::new());
//! runtime.spawn(Echo).await?;
//! let pong: Pong = runtime.publisher::<Client>().request("session-1", Ping { n: 7 }).await?;
//! assert_eq!(pong.n, 7);
//! runtime.shutdown(Duration::from_secs(5)).await?;
//! # Ok(())
//! # }
//! ```

use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::agent::{Agent, Context, HandlerError, Publisher, Rejection};
use crate::backoff::Backoff;
use crate::bus::{Bus, DEFAULT_REQUEST_TIMEOUT};
use crate::channel::{Channel, ChannelTemplate, DEAD_LETTER_CLASS, parse_channel};
use crate::codec::{BINARY_CONTENT_TYPE, Codec, JSON_CONTENT_TYPE, MSGPACK_CONTENT_TYPE};
use crate::envelope::{Envelope, MessageId, headers};
use crate::error::{Error, Result};
use crate::message::Message;
use crate::router::{
    Delivery, Distribution, Health, HealthStatus, NackAction, Router, SharedRouter,
    SubscribeOptions, Subscription, SubscriptionCloser,
};

/// Decodes and validates the payload of `envelope` as `M`. A failure is a [`Rejection`]: the message is
/// dead-lettered at once.
pub fn decode_message<M: Message>(envelope: &Envelope) -> Result<M, Rejection> {
    let codec = Codec::from_content_type(envelope.content_type()).ok_or_else(|| Rejection {
        reason: headers::REASON_UNDECODABLE,
        error: Error::decode(
            M::CLASS,
            format!(
                "content type '{}' is not one agentcomm reads (application/msgpack, or \
                 application/json in UTF-8)",
                envelope.content_type()
            ),
        ),
    })?;
    let message: M = codec
        .decode(M::CLASS, envelope.payload())
        .map_err(|error| Rejection {
            reason: headers::REASON_UNDECODABLE,
            error,
        })?;
    message.validate().map_err(|source| Rejection {
        reason: headers::REASON_INVALID,
        error: Error::Validation {
            class: M::CLASS.to_string(),
            source,
        },
    })?;
    Ok(message)
}

/// How one agent runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AgentOptions {
    /// Receive only this session's messages (all sessions when `None`).
    pub session: Option<String>,
    /// Fan-out or a named group; `None` is a group named after the agent (`Agent.session` when the agent
    /// listens to one session), so that instances of one agent share the work and different agents each
    /// get every message. The name is the struct's unless `#[agent(name = "...")]` says otherwise: a
    /// runtime refuses a second agent type in a group used by another of its agents, but agents of one
    /// name in two programs on one broker share their group, and on a broker that keeps groups (a
    /// RabbitMQ queue, a Redis Streams group) a group outlives its agents' stop, with what waits in it:
    /// name agents apart.
    pub distribution: Option<Distribution>,
    /// How many messages are handled at once. Messages of one session are handled in the order they
    /// arrive: each session is served by one worker, so a message waits while its session's worker is
    /// busy and, when that worker's queue is full, the agent stops taking new messages until it has
    /// room (the backpressure reaches the broker). A message that fails and is retried arrives again
    /// after its backoff delay, behind those of its session that came meanwhile: it is handled after
    /// them.
    pub concurrency: usize,
    /// How many deliveries may wait unsettled.
    pub prefetch: usize,
    /// Attempts before a failing message is dead-lettered (at least 1).
    pub max_attempts: u32,
    /// Delay between attempts.
    pub backoff: Backoff,
    /// A handler running longer than this fails (and is retried); `None` lets it run forever. Zero is
    /// refused when the agent is spawned.
    pub handler_timeout: Option<Duration>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            session: None,
            distribution: None,
            concurrency: 1,
            prefetch: SubscribeOptions::DEFAULT_PREFETCH,
            max_attempts: 5,
            backoff: Backoff::default(),
            handler_timeout: Some(Duration::from_secs(60)),
        }
    }
}

impl AgentOptions {
    /// The defaults: all sessions, a group named after the agent, one message at a time, prefetch 256,
    /// 5 attempts with backoff from 100 ms to 30 s, handlers limited to 60 s.
    pub fn new() -> Self {
        Self::default()
    }

    /// Receives only `session`'s messages.
    pub fn session(mut self, session: impl Into<String>) -> Self {
        self.session = Some(session.into());
        self
    }

    /// Every instance gets a copy of every message (no group).
    pub fn fan_out(mut self) -> Self {
        self.distribution = Some(Distribution::FanOut);
        self
    }

    /// Joins the named group instead of the agent's own.
    pub fn group(mut self, name: impl Into<String>) -> Self {
        self.distribution = Some(Distribution::Group(name.into()));
        self
    }

    /// Handles up to `concurrency` messages at once (at least 1); one session's are handled in the
    /// order they arrive (a retry arrives again after its delay: see [`AgentOptions::concurrency`]).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Sets the prefetch (at least 1).
    pub fn prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// Sets the number of attempts before dead-lettering (at least 1).
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts.max(1);
        self
    }

    /// Sets the backoff between attempts.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sets the handler time limit, above zero (`None`: no limit; zero is refused when the agent is
    /// spawned).
    pub fn handler_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.handler_timeout = timeout;
        self
    }
}

/// Builds a [`Runtime`].
pub struct RuntimeBuilder {
    router: SharedRouter,
    codec: Codec,
    request_timeout: Duration,
}

impl fmt::Debug for RuntimeBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeBuilder")
            .field("backend", &self.router.backend())
            .field("codec", &self.codec)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

impl RuntimeBuilder {
    /// Encodes payloads with `codec` (MessagePack by default). Receivers read either.
    pub fn codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// How long requests wait for replies unless told otherwise (30 s by default).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Builds the runtime.
    pub fn build(self) -> Runtime {
        Runtime {
            inner: Arc::new(RuntimeInner {
                bus: Bus::new(self.router, self.codec, self.request_timeout),
                agents: Mutex::new(Vec::new()),
                claims: Mutex::new(Vec::new()),
            }),
        }
    }
}

/// Runs agents on a router.
///
/// Dropping every clone of a runtime does not stop its agents, nor close its router: each agent runs
/// on its own task until it is stopped ([`AgentHandle::stop`], through a handle kept), its router
/// closes, or the Tokio runtime ends, taking messages all along. End with
/// [`shutdown`](Runtime::shutdown).
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<RuntimeInner>,
}

struct RuntimeInner {
    bus: Bus,
    agents: Mutex<Vec<AgentHandle>>,
    /// Groups taken by spawns still under way (their agents are not listed yet): group, agent type.
    claims: Mutex<Vec<GroupClaim>>,
}

/// A group taken by an agent type whose spawn is under way.
type GroupClaim = (String, std::any::TypeId, &'static str);

/// Gives a spawn's claim on its group back when the spawn is over (its agent is listed by then, or it
/// failed).
struct ClaimGuard<'a> {
    claims: &'a Mutex<Vec<GroupClaim>>,
    group: String,
    type_id: std::any::TypeId,
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = claims
            .iter()
            .position(|(group, type_id, _)| *group == self.group && *type_id == self.type_id)
        {
            claims.swap_remove(at);
        }
    }
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("bus", &self.inner.bus)
            .field(
                "agents",
                &self.inner.agents.lock().expect("runtime lock").len(),
            )
            .finish()
    }
}

impl Runtime {
    /// A runtime on `router` with the defaults (MessagePack, 30 s request timeout).
    pub fn new(router: impl Router) -> Self {
        Self::builder(router).build()
    }

    /// A runtime builder on `router`.
    pub fn builder(router: impl Router) -> RuntimeBuilder {
        Self::builder_shared(Arc::new(router))
    }

    /// A runtime builder on a router already shared.
    ///
    /// [`shutdown`](Runtime::shutdown) closes the router, for every other holder too: another runtime
    /// on the same router, or on a clone of it (clones of a `MemoryRouter`, a `RedisRouter` or an
    /// `AmqpRouter` share its bus or connections), then fails every publish with [`Error::Closed`] and
    /// its agents receive nothing more. To leave the router to the others, stop this runtime's agents
    /// instead (`for agent in runtime.agents() { agent.stop(deadline).await; }`) and drop the runtime.
    pub fn builder_shared(router: SharedRouter) -> RuntimeBuilder {
        RuntimeBuilder {
            router,
            codec: Codec::default(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// The bus: publishes any message, without an agent's contract (for tests and tools).
    pub fn bus(&self) -> &Bus {
        &self.inner.bus
    }

    /// The router: publishes raw envelopes, like [`Runtime::bus`] without any agent's contract (for
    /// tests, tools and backends). Agents publish through their [`Context`], clients through
    /// [`Runtime::publisher`], which check what an agent declares it sends.
    pub fn router(&self) -> &SharedRouter {
        self.inner.bus.router()
    }

    /// Publishes on behalf of agent `A`, within what `A` declares it sends.
    pub fn publisher<A: Agent>(&self) -> Publisher<A> {
        Publisher::new(self.inner.bus.clone())
    }

    /// Starts `agent` with the default options.
    pub async fn spawn<A: Agent>(&self, agent: A) -> Result<AgentHandle> {
        self.spawn_with(agent, AgentOptions::default()).await
    }

    /// Starts `agent`: subscribes it to every class it receives, then dispatches what arrives.
    pub async fn spawn_with<A: Agent>(
        &self,
        agent: A,
        options: AgentOptions,
    ) -> Result<AgentHandle> {
        if A::RECEIVES.is_empty() {
            return Err(Error::InvalidAgent {
                agent: A::NAME.to_string(),
                reason:
                    "it receives nothing, so there is nothing to run: declare `receives = [...]`, \
                         or use `runtime.publisher::<Agent>()` to only send"
                        .into(),
            });
        }
        if options.handler_timeout == Some(Duration::ZERO) {
            return Err(Error::Config {
                variable: "AgentOptions::handler_timeout".into(),
                value: format!("{:?}", options.handler_timeout),
                expected:
                    "a limit above zero (every handler that waits for anything would time out), \
                           or None for no limit"
                        .into(),
            });
        }
        let duplicate = A::RECEIVES
            .iter()
            .enumerate()
            .find_map(|(index, class)| A::RECEIVES[..index].contains(class).then_some(*class));
        if let Some(class) = duplicate {
            return Err(Error::InvalidAgent {
                agent: A::NAME.to_string(),
                reason: format!(
                    "two received types have the class name '{class}', so a delivery could not be told \
                     apart; give one of them another name with #[message(name = \"...\")]"
                ),
            });
        }
        if A::RECEIVES.contains(&DEAD_LETTER_CLASS) {
            // Only a `Message` written by hand can have this class (the derive refuses it). Such an
            // agent receives every dead letter, and dead-letters what it fails on, or cannot decode (a
            // dead letter carries its original class), to `DeadLetter:DeadLetter:<session>`, where it
            // receives it again: a loop, one publish each turn.
            return Err(Error::InvalidAgent {
                agent: A::NAME.to_string(),
                reason: format!(
                    "it receives the class '{DEAD_LETTER_CLASS}', that of dead-letter channels: what it \
                     fails on would be dead-lettered where it receives it again, for ever; read dead \
                     letters with a subscription of the router instead \
                     (`runtime.router().subscribe(SubscribeOptions::new(ChannelPattern::parse(\"DeadLetter:*:*\")?))`), \
                     and settle each dead letter it reads"
                ),
            });
        }
        let router = self.router();
        // The default group is the agent's name, per session when the agent listens to one session:
        // instances for different sessions must not share one queue.
        let distribution = options.distribution.clone().unwrap_or_else(|| {
            Distribution::Group(match &options.session {
                Some(session) => format!("{}.{session}", A::NAME),
                None => A::NAME.to_string(),
            })
        });
        let claim = match &distribution {
            Distribution::Group(group) => Some(self.claim_group::<A>(group)?),
            _ => None,
        };
        if matches!(distribution, Distribution::Group(_)) && !router.capabilities().consumer_groups
        {
            return Err(Error::Unsupported {
                backend: router.backend().to_string(),
                feature: "consumer groups",
                fix: "spawn the agent with `AgentOptions::new().fan_out()` (every instance then gets every message), \
                      or use a backend with consumer groups",
            });
        }
        let patterns = A::__receive_patterns(options.session.as_deref())?;
        // Replies to requesters' inboxes are theirs: an agent skips them, so it asks not to get them.
        let mut subscribe = SubscribeOptions::patterns(patterns)
            .prefetch(options.prefetch)
            .without_inbox_replies();
        subscribe.distribution = distribution;
        let subscription = router.subscribe(subscribe).await?;
        let stats = Arc::new(AgentStats::default());
        let (phase_sender, phase) = watch::channel(Phase::Running);
        tracing::info!(
            agent = A::NAME,
            receives = ?A::RECEIVES,
            sends = ?A::SENDS,
            subscription = subscription.description(),
            concurrency = options.concurrency,
            "agent started"
        );
        let description = subscription.description().to_string();
        let closer = subscription.closer();
        let shared = Arc::new(AgentShared {
            agent,
            bus: self.inner.bus.clone(),
            options,
            stats: stats.clone(),
        });
        // Kept for the agent's stop, which may be awaited outside Tokio (`futures::executor::block_on`
        // on a thread of its own): it runs on the Tokio runtime the agent runs on.
        let tokio = tokio::runtime::Handle::current();
        let task = tokio.spawn(run(shared, subscription, phase));
        let handle = AgentHandle {
            inner: Arc::new(AgentHandleInner {
                name: A::NAME,
                tokio,
                group: claim.as_ref().map(|claim| {
                    (
                        claim.group.clone(),
                        claim.type_id,
                        std::any::type_name::<A>(),
                    )
                }),
                receives: A::RECEIVES,
                sends: A::SENDS,
                subscription: description,
                stats,
                closer,
                phase: phase_sender,
                task: tokio::sync::Mutex::new(Some(task)),
                done: watch::Sender::new(None),
                stop_started: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        self.inner
            .agents
            .lock()
            .expect("runtime lock")
            .push(handle.clone());
        Ok(handle)
    }

    /// Refuses a group already used by an agent of another type on this runtime: a group's members
    /// compete for its messages, so two different agents in one group would each get only part of
    /// them, and each would dead-letter the classes only the other receives. (Two types of one name
    /// in different modules get the same default group, the name.) Spawns under way count too: the
    /// claim returned holds the group until the spawn is over.
    fn claim_group<A: Agent>(&self, group: &str) -> Result<ClaimGuard<'_>> {
        let this = std::any::TypeId::of::<A>();
        let mut claims = self.inner.claims.lock().expect("claims lock");
        let listed = self.agents().into_iter().find_map(|agent| {
            let (taken, type_id, type_name) = agent.inner.group.as_ref()?;
            (taken == group && *type_id != this).then_some(*type_name)
        });
        let under_way = claims
            .iter()
            .find(|(taken, type_id, _)| taken == group && *type_id != this)
            .map(|(_, _, type_name)| *type_name);
        if let Some(other) = listed.or(under_way) {
            return Err(Error::InvalidAgent {
                agent: A::NAME.to_string(),
                reason: format!(
                    "its group '{group}' is already used by another agent type, {other} (this one is {}): \
                     the two would share its messages, each getting only part of them. Give one of them \
                     another name with #[agent(name = \"...\")], or another group with AgentOptions::group",
                    std::any::type_name::<A>()
                ),
            });
        }
        claims.push((group.to_string(), this, std::any::type_name::<A>()));
        Ok(ClaimGuard {
            claims: &self.inner.claims,
            group: group.to_string(),
            type_id: this,
        })
    }

    /// The handles of the agents started on this runtime, except those stopped with
    /// [`AgentHandle::stop`] (which the runtime forgets once their stop is over: replacing or scaling
    /// down an agent neither leaves the runtime unhealthy nor makes its list grow). An agent whose
    /// subscription ended on its own stays listed, and unhealthy.
    pub fn agents(&self) -> Vec<AgentHandle> {
        let mut agents = self.inner.agents.lock().expect("runtime lock");
        agents.retain(|agent| !agent.is_stopped());
        agents.clone()
    }

    /// The health of the router and of every agent.
    pub async fn health(&self) -> RuntimeHealth {
        let router = self.router().health().await;
        let agents: Vec<AgentHealth> = self.agents().iter().map(AgentHandle::health).collect();
        let status = agents
            .iter()
            .map(|a| a.status)
            .chain([router.status])
            .max()
            .unwrap_or(HealthStatus::Healthy);
        RuntimeHealth {
            status,
            router,
            agents,
        }
    }

    /// Stops every agent still running (each stops taking messages, finishes what it holds within
    /// `deadline`, and acknowledges it), then closes the router, also for any other runtime that shares
    /// it (see [`builder_shared`](Runtime::builder_shared)). Agents whose stop was over before
    /// are not counted again; an agent whose stop is under way is waited for, and its report
    /// counted.
    ///
    /// Like [`AgentHandle::stop`], the shutdown runs on a task of its own: a caller that stops waiting
    /// for it (a timeout around `shutdown`, or a handler of one of this runtime's agents, dropped at
    /// the stop deadline) does not leave it half done, with its agents stopped and its router open.
    /// Awaited outside Tokio, it runs on the Tokio runtime its agents run on (in place when it has
    /// none, or when that runtime has ended); should that runtime not run it within `deadline` (1 s
    /// at least; a current_thread runtime runs tasks only inside its `block_on`), the shutdown
    /// returns [`Error::Timeout`], and runs there once the runtime is driven again. Run in place, it
    /// runs on a Tokio runtime of its own, which a router's close may need (Redis's timers).
    pub async fn shutdown(&self, deadline: Duration) -> Result<ShutdownReport> {
        // Awaited outside Tokio (`futures::executor::block_on` on a thread of its own), it runs on
        // the Tokio runtime its agents run on; with no agents, and no Tokio, there is no task to run
        // it on, and it runs here.
        let current = tokio::runtime::Handle::try_current().ok();
        let outside_tokio = current.is_none();
        let tokio = current.or_else(|| Some(self.agents().first()?.inner.tokio.clone()));
        let Some(tokio) = tokio else {
            return self.shutdown_outside_tokio(deadline).await;
        };
        let runtime = self.clone();
        let (started, start) = futures::channel::oneshot::channel::<()>();
        let task = tokio.spawn(async move {
            let _ = started.send(());
            runtime.shutdown_here(deadline, false).await
        });
        if outside_tokio
            && within(start, deadline.max(START_WAIT_FLOOR))
                .await
                .is_none()
        {
            // A current_thread Tokio runtime runs its tasks only while its `block_on` runs: one that
            // nobody drives never runs the shutdown (nor its agents), and waiting for it never ended.
            // The task stays: it runs if the runtime is driven again.
            return Err(Error::Timeout {
                operation:
                    "the runtime's shutdown to start on its agents' Tokio runtime, which did \
                            not run it (a current_thread runtime runs tasks only inside its \
                            `block_on`): await the shutdown inside that runtime, or while it is \
                            driven; it runs there if the runtime is driven again"
                        .to_string(),
                after: deadline,
            });
        }
        match task.await {
            Ok(result) => result,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            // The agents' Tokio runtime has ended (and its agents with it): their stops report at
            // once, and the router is closed here.
            Err(_) if outside_tokio => self.shutdown_outside_tokio(deadline).await,
            Err(_) => Err(Error::Closed {
                what: "the runtime's shutdown",
                hint: "its task was cancelled: the Tokio runtime it ran on is shutting down, so the \
                       router may not have been closed; shut down before the Tokio runtime ends",
            }),
        }
    }

    /// Waits until the process is asked to stop (Ctrl-C, that is SIGINT, or on Unix SIGTERM, which
    /// `docker stop`, systemd and Kubernetes send), then shuts the runtime down as
    /// [`shutdown`](Runtime::shutdown) does: agents stop taking messages, handlers have until
    /// `deadline` to finish and acknowledge, and the router is closed. The end of a service's `main`:
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use agentcomm_core::prelude::*;
    /// # async fn run(runtime: Runtime) -> agentcomm_core::Result<()> {
    /// // Agents spawned; now serve until stopped.
    /// let report = runtime.shutdown_on_signal(Duration::from_secs(25)).await?;
    /// println!("stopped: {report:?}");
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// Choose `deadline` below the time whatever stops the process waits before killing it
    /// (Kubernetes' `terminationGracePeriodSeconds`, 30 s unless set; `docker stop`, 10 s), so that
    /// the router is closed before the kill. A second signal while the shutdown runs, one second or
    /// more after the first, returns [`Error::Interrupted`] at once, without waiting for the handlers
    /// still running (the shutdown goes on in the background until the process ends): a second
    /// Ctrl-C ends a program that would otherwise wait for its deadline. One within a second of the
    /// first is taken for the same request to stop (a terminal's Ctrl-C and a process manager
    /// forwarding it, or SIGINT and SIGTERM sent together), and the shutdown goes on. The signals are listened for from the first poll of the
    /// future this returns, not from the call: before, Ctrl-C and SIGTERM end the process at once,
    /// without a shutdown, so await it as soon as the agents are spawned. From then on they no
    /// longer end the process by themselves (Tokio's signal handlers stay installed): return from
    /// `main` when it returns.
    ///
    /// On Unix, it works on any Tokio runtime (also one built without its I/O driver) and outside
    /// Tokio: the signals are listened for on a thread of its own. On Windows, it listens for Ctrl-C
    /// only, and outside Tokio fails with [`Error::Unsupported`].
    pub async fn shutdown_on_signal(&self, deadline: Duration) -> Result<ShutdownReport> {
        let mut signals = StopSignals::listen()?;
        let signal = signals.next().await;
        let first_at = std::time::Instant::now();
        tracing::info!(
            signal,
            deadline_ms = deadline.as_millis() as u64,
            "asked to stop: shutting down, handlers have until the deadline to finish (a second \
             Ctrl-C or SIGTERM stops waiting for them)"
        );
        tokio::select! {
            result = self.shutdown(deadline) => result,
            again = async {
                loop {
                    let again = signals.next().await;
                    if first_at.elapsed() >= SECOND_SIGNAL_AFTER {
                        break again;
                    }
                    tracing::info!(
                        signal = again,
                        "asked to stop again within a second of the first signal: taken for the \
                         same request, the shutdown goes on"
                    );
                }
            } => {
                let interrupted = Error::Interrupted { signal: again };
                tracing::warn!(signal = again, "{interrupted}");
                Err(interrupted)
            }
        }
    }

    /// The work of [`Runtime::shutdown`] in place, outside Tokio (no Tokio runtime, or its agents' has
    /// ended), on a Tokio runtime of its own for the length of the shutdown: a router's close may need
    /// Tokio (the Redis router's timers), and panicked outside it ('there is no reactor running').
    /// The caller, outside Tokio, is blocked meanwhile, as awaiting the shutdown blocks it anyway.
    async fn shutdown_outside_tokio(&self, deadline: Duration) -> Result<ShutdownReport> {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            // No agent runs on this Tokio runtime: each stop's task runs on its agent's own, which
            // may be alive but not driven (agents spawned from more than one Tokio runtime), so the
            // wait for each stop to start is bounded as it is outside Tokio.
            Ok(tokio) => tokio.block_on(self.shutdown_here(deadline, true)),
            Err(error) => {
                tracing::warn!(error = %error, "could not start a Tokio runtime to close the router on; closing it in place");
                self.shutdown_here(deadline, true).await
            }
        }
    }

    /// The work of [`Runtime::shutdown`], in the caller's task.
    /// `elsewhere`: the caller is on none of the agents' Tokio runtimes (see
    /// [`AgentHandle::stop_from`]).
    async fn shutdown_here(&self, deadline: Duration, elsewhere: bool) -> Result<ShutdownReport> {
        let agents = self.agents();
        let reports = futures::future::join_all(
            agents
                .iter()
                .map(|agent| agent.stop_from(deadline, elsewhere)),
        )
        .await;
        let mut total = ShutdownReport::default();
        for report in reports {
            total.add(&report);
        }
        self.router().close().await?;
        tracing::info!(
            handled = total.handled,
            requeued = total.requeued,
            aborted = total.aborted,
            "runtime shut down"
        );
        Ok(total)
    }
}

/// The signals that ask the process to stop, as Tokio reports them: Ctrl-C, and on Unix SIGTERM.
#[derive(Debug)]
struct StopSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    /// Ends, when dropped, the Tokio runtime of our own that delivers the signals (see `listen`).
    #[cfg(unix)]
    _delivery: tokio::sync::oneshot::Sender<()>,
}

impl StopSignals {
    /// Starts listening (from now on the process no longer ends on these signals by itself).
    ///
    /// On Unix, Tokio delivers a signal through the I/O driver of a runtime that is driven, and its
    /// `signal` panics on a runtime built without one (`enable_time` only): the signals are
    /// registered with a current_thread runtime of our own, driven on a thread of its own while they
    /// are listened for, so that the caller's runtime may be any, or none.
    fn listen() -> Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let failed = |error: std::io::Error| Error::Unsupported {
                backend: format!("this process ({error})"),
                feature: "listening for stop signals (Ctrl-C, SIGTERM)",
                fix: "raise the process's limit of open files (ulimit -n) if it ran out of them, \
                      or call Runtime::shutdown on a signal of your own",
            };
            let tokio = Detached(Some(
                tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()
                    .map_err(failed)?,
            ));
            let (interrupt, terminate) = {
                let _entered = tokio.0.as_ref().map(tokio::runtime::Runtime::enter);
                (
                    signal(SignalKind::interrupt()).map_err(failed)?,
                    signal(SignalKind::terminate()).map_err(failed)?,
                )
            };
            let (delivery, ended) = tokio::sync::oneshot::channel::<()>();
            std::thread::Builder::new()
                .name("agentcomm-signals".to_string())
                .spawn(move || {
                    if let Some(tokio) = &tokio.0 {
                        let _ = tokio.block_on(ended);
                    }
                })
                .map_err(failed)?;
            Ok(Self {
                interrupt,
                terminate,
                _delivery: delivery,
            })
        }
        #[cfg(not(unix))]
        {
            if tokio::runtime::Handle::try_current().is_err() {
                return Err(Error::Unsupported {
                    backend: "this thread".to_string(),
                    feature: "listening for stop signals (Ctrl-C, SIGTERM)",
                    fix: "call shutdown_on_signal inside a Tokio runtime (#[tokio::main])",
                });
            }
            Ok(Self {})
        }
    }

    /// The next signal's name; never, should Tokio's signal driver end.
    async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                Some(()) = self.interrupt.recv() => "SIGINT",
                Some(()) = self.terminate.recv() => "SIGTERM",
                else => std::future::pending().await,
            }
        }
        #[cfg(not(unix))]
        {
            match tokio::signal::ctrl_c().await {
                Ok(()) => "Ctrl-C",
                Err(_) => std::future::pending().await,
            }
        }
    }
}

/// A Tokio runtime that ends in the background when dropped: dropped where blocking is not allowed
/// (in an async fn, as on an error of [`StopSignals::listen`]), a runtime's own drop panics.
#[cfg(unix)]
struct Detached(Option<tokio::runtime::Runtime>);

#[cfg(unix)]
impl Drop for Detached {
    fn drop(&mut self) {
        if let Some(tokio) = self.0.take() {
            tokio.shutdown_background();
        }
    }
}

/// How long after the first signal [`Runtime::shutdown_on_signal`] takes another for a second request
/// to stop: one sooner is the same request (SIGINT and SIGTERM sent together, a terminal's Ctrl-C and
/// a process manager forwarding it), and skipped the graceful shutdown.
const SECOND_SIGNAL_AFTER: Duration = Duration::from_secs(1);

/// How long a shutdown or stop awaited outside Tokio waits at least for its task to start on the
/// agents' Tokio runtime, whatever its deadline: a zero deadline ("stop now") on a runtime whose
/// workers were busy for a moment gave up before the task (which went on all the same) began.
const START_WAIT_FLOOR: Duration = Duration::from_secs(1);

/// `future`'s output, or `None` when `deadline` passed first: waited for outside Tokio, with no Tokio
/// timer (a thread of its own keeps the time, and ends as soon as the answer came).
async fn within<F: std::future::Future>(future: F, deadline: Duration) -> Option<F::Output> {
    let (timed_out, time_up) = futures::channel::oneshot::channel::<()>();
    let (answered, answer) = std::sync::mpsc::channel::<()>();
    let timer = std::thread::Builder::new()
        .name("agentcomm-stop-timer".into())
        .spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = answer.recv_timeout(deadline) {
                let _ = timed_out.send(());
            }
        });
    if timer.is_err() {
        // No thread for the timer: wait as before.
        return Some(future.await);
    }
    let future = std::pin::pin!(future);
    let output = match futures::future::select(future, time_up).await {
        futures::future::Either::Left((output, _)) => Some(output),
        futures::future::Either::Right((_, mut future)) => (&mut future).now_or_never(),
    };
    let _ = answered.send(());
    output
}

/// The health of a runtime: the router's and each agent's.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RuntimeHealth {
    /// The worst of all.
    pub status: HealthStatus,
    /// The router's.
    pub router: Health,
    /// Each agent's.
    pub agents: Vec<AgentHealth>,
}

/// What a graceful stop did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Messages handled while stopping (taken before the stop, finished before the deadline).
    pub handled: u64,
    /// Messages given back to the backend unhandled (buffered when the deadline came).
    pub requeued: u64,
    /// Handlers cut off by the deadline (their messages are given back to the backend).
    pub aborted: u64,
}

impl ShutdownReport {
    fn add(&mut self, other: &ShutdownReport) {
        self.handled += other.handled;
        self.requeued += other.requeued;
        self.aborted += other.aborted;
    }
}

/// Where an agent is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AgentState {
    /// Taking and handling messages.
    Running,
    /// Finishing what it holds before stopping.
    Stopping,
    /// Stopped.
    Stopped,
}

/// An agent's health: its state and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AgentHealth {
    /// The agent's name.
    pub name: &'static str,
    /// Healthy while running; degraded when stopping; unhealthy when stopped, or when its subscription
    /// ended on its own (the router closed or lost it: the agent receives nothing more).
    pub status: HealthStatus,
    /// Its state.
    pub state: AgentState,
    /// The classes it receives.
    pub receives: &'static [&'static str],
    /// The classes it sends.
    pub sends: &'static [&'static str],
    /// Its subscription.
    pub subscription: String,
    /// Deliveries received.
    pub received: u64,
    /// Messages handled successfully (acknowledged).
    pub handled: u64,
    /// Handler failures (errors, panics, timeouts), each attempt counted.
    pub failed: u64,
    /// Of those, panics.
    pub panicked: u64,
    /// Retries scheduled.
    pub retried: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Dead letters the backend did not keep (nothing subscribed to them on a non-persistent backend).
    pub dead_letters_unkept: u64,
    /// Messages refused before their handler (undecodable, invalid, undeclared class).
    pub rejected: u64,
    /// Acknowledgements that failed (the broker may deliver those messages again).
    pub ack_failures: u64,
    /// Nacks that returned an error: retries that did not go as asked. The backend's error, logged,
    /// says what became of the message (on RabbitMQ: sent back to its queue at once, held until a
    /// late confirm of its retry, requeued unchanged, or delivered again after a reconnect).
    pub nack_failures: u64,
    /// Deliveries that were retries (attempt above 1). `retried - retries_received` is how many
    /// scheduled retries have not come back yet.
    pub retries_received: u64,
    /// Replies routed to a requester's inbox (`<Class>:reply:<inbox>`) that this agent's patterns
    /// matched: acknowledged without running the handler, since they are their requester's. 0
    /// on the in-memory router, which does not deliver them to agents (unless a subscription asking
    /// for them joined the agent's group: see
    /// [`SubscribeOptions::without_inbox_replies`](crate::router::SubscribeOptions::without_inbox_replies));
    /// brokers whose bindings cannot leave them out deliver them, and they are counted here.
    pub replies_skipped: u64,
    /// Requests (messages with a requester's inbox as `reply_to`) whose handler returned `Ok` without
    /// replying through [`Context::reply`](crate::agent::Context::reply), though this agent sends the
    /// class the requester waits for. Its requester waits out its timeout unless another agent answers
    /// it: every agent type that receives the request's class is counted here when it does not reply,
    /// also when another one does, and so is a retry whose earlier attempt replied. Each is logged at
    /// WARN.
    pub requests_unanswered: u64,
    /// Handlers running now.
    pub in_flight: u64,
}

#[derive(Debug, Default)]
struct AgentStats {
    received: AtomicU64,
    handled: AtomicU64,
    failed: AtomicU64,
    panicked: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    dead_letters_unkept: AtomicU64,
    rejected: AtomicU64,
    ack_failures: AtomicU64,
    nack_failures: AtomicU64,
    retries_received: AtomicU64,
    replies_skipped: AtomicU64,
    requests_unanswered: AtomicU64,
    in_flight: AtomicU64,
    state: AtomicU8,
    ended_on_its_own: std::sync::atomic::AtomicBool,
}

impl AgentStats {
    /// Marks an agent that nobody is stopping as ended on its own (its subscription ended, or its task
    /// failed); returns whether it did.
    fn mark_ended_on_its_own(&self) -> bool {
        if self.state.load(Ordering::Acquire) != STATE_RUNNING {
            return false;
        }
        self.ended_on_its_own.store(true, Ordering::Release);
        true
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Controls a running agent.
#[derive(Clone)]
pub struct AgentHandle {
    inner: Arc<AgentHandleInner>,
}

struct AgentHandleInner {
    name: &'static str,
    /// Its group, with the agent's type: no other type may join it on this runtime.
    group: Option<(String, std::any::TypeId, &'static str)>,
    receives: &'static [&'static str],
    sends: &'static [&'static str],
    subscription: String,
    stats: Arc<AgentStats>,
    closer: SubscriptionCloser,
    phase: watch::Sender<Phase>,
    task: tokio::sync::Mutex<Option<JoinHandle<ShutdownReport>>>,
    /// The Tokio runtime the agent's task runs on, where its stop runs.
    tokio: tokio::runtime::Handle,
    /// The report of the stop, once it is done, for every caller of `stop`.
    done: watch::Sender<Option<ShutdownReport>>,
    /// Whether the stop's task began to run on the agent's Tokio runtime.
    stop_started: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for AgentHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentHandle")
            .field("name", &self.inner.name)
            .field("subscription", &self.inner.subscription)
            .finish()
    }
}

const STATE_RUNNING: u8 = 0;
const STATE_STOPPING: u8 = 1;
const STATE_STOPPED: u8 = 2;

impl AgentHandle {
    /// The agent's name.
    pub fn name(&self) -> &'static str {
        self.inner.name
    }

    /// Whether a stop of this agent is over.
    fn is_stopped(&self) -> bool {
        self.inner.stats.state.load(Ordering::Acquire) == STATE_STOPPED
    }

    /// The agent's health.
    pub fn health(&self) -> AgentHealth {
        let stats = &self.inner.stats;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let state = match stats.state.load(Ordering::Acquire) {
            STATE_RUNNING => AgentState::Running,
            STATE_STOPPING => AgentState::Stopping,
            _ => AgentState::Stopped,
        };
        let status = match state {
            AgentState::Running if stats.ended_on_its_own.load(Ordering::Acquire) => {
                HealthStatus::Unhealthy
            }
            AgentState::Running => HealthStatus::Healthy,
            AgentState::Stopping => HealthStatus::Degraded,
            AgentState::Stopped => HealthStatus::Unhealthy,
        };
        AgentHealth {
            name: self.inner.name,
            status,
            state,
            receives: self.inner.receives,
            sends: self.inner.sends,
            subscription: self.inner.subscription.clone(),
            received: load(&stats.received),
            handled: load(&stats.handled),
            failed: load(&stats.failed),
            panicked: load(&stats.panicked),
            retried: load(&stats.retried),
            dead_lettered: load(&stats.dead_lettered),
            dead_letters_unkept: load(&stats.dead_letters_unkept),
            rejected: load(&stats.rejected),
            ack_failures: load(&stats.ack_failures),
            nack_failures: load(&stats.nack_failures),
            retries_received: load(&stats.retries_received),
            replies_skipped: load(&stats.replies_skipped),
            requests_unanswered: load(&stats.requests_unanswered),
            in_flight: load(&stats.in_flight),
        }
    }

    /// Stops the agent gracefully: it stops taking messages, finishes the ones it holds (handlers
    /// running and deliveries already buffered) until `deadline`, acknowledges them, and gives back to
    /// the backend whatever is left when the deadline comes. Stopping twice is harmless.
    ///
    /// The stop runs on a task of its own: a caller that stops waiting for it (a timeout around
    /// `stop`, or a handler of this very agent, dropped at the deadline) does not leave it half done,
    /// and every caller gets its report. That task runs on the Tokio runtime the agent runs on, so the
    /// stop may be awaited outside Tokio too (`futures::executor::block_on`); once that Tokio runtime
    /// has ended, the agent with it, the stop returns an empty report at once; should that runtime
    /// not run the stop within `deadline` (1 s at least; a current_thread runtime runs tasks only
    /// inside its `block_on`), it returns an empty report then, and the agent stops once the runtime
    /// runs again.
    pub async fn stop(&self, deadline: Duration) -> ShutdownReport {
        self.stop_from(deadline, false).await
    }

    /// [`AgentHandle::stop`]; `elsewhere`: the caller is inside a Tokio runtime that is not the
    /// agent's (a shutdown run in place on a Tokio runtime of its own), so the wait for the stop's
    /// task to start is bounded as outside Tokio: the agent's runtime may not be driven.
    async fn stop_from(&self, deadline: Duration, elsewhere: bool) -> ShutdownReport {
        let mut done = self.inner.done.subscribe();
        if let Some(task) = self.inner.task.lock().await.take() {
            let inner = self.inner.clone();
            // Should this task end any other way (a panic, its runtime shutting down, or never
            // running: a task spawned on a Tokio runtime that has ended is dropped unpolled), the
            // callers still get a report rather than wait forever.
            let guard = ReportOnDrop(inner.clone());
            self.inner.tokio.spawn(async move {
                inner.stop_started.store(true, Ordering::Release);
                let report = inner.stop_task(task, deadline).await;
                inner.done.send_replace(Some(report));
                drop(guard);
            });
        }
        // Whichever call took the task, the report comes when its stop is over.
        let mut report = std::pin::pin!(async move {
            let report = done.wait_for(Option::is_some).await.map(|report| *report);
            report.ok().flatten().unwrap_or_default()
        });
        if elsewhere || tokio::runtime::Handle::try_current().is_err() {
            // Outside Tokio, the stop's task runs only while the agent's Tokio runtime is driven (a
            // current_thread runtime only inside its `block_on`): one that did not start within the
            // deadline may never run, and its caller waited for ever. It gets an empty report then
            // (the agent, frozen with its runtime, stops once that runtime runs again).
            if let Some(report) = within(&mut report, deadline.max(START_WAIT_FLOOR)).await {
                return report;
            }
            if !self.inner.stop_started.load(Ordering::Acquire) {
                tracing::warn!(
                    agent = self.inner.name,
                    "the agent's stop did not start within its deadline: its Tokio runtime does not \
                     run it (await the stop inside that runtime)"
                );
                return ShutdownReport::default();
            }
        }
        report.await
    }
}

/// Sends an empty report to the waiters of a stop that ended without one.
struct ReportOnDrop(Arc<AgentHandleInner>);

impl Drop for ReportOnDrop {
    fn drop(&mut self) {
        self.0.done.send_if_modified(|report| {
            if report.is_some() {
                return false;
            }
            self.0.stats.state.store(STATE_STOPPED, Ordering::Release);
            *report = Some(ShutdownReport::default());
            true
        });
    }
}

impl AgentHandleInner {
    /// Stops the agent's task (see [`AgentHandle::stop`]) and returns its report.
    async fn stop_task(
        &self,
        task: JoinHandle<ShutdownReport>,
        deadline: Duration,
    ) -> ShutdownReport {
        self.stats.state.store(STATE_STOPPING, Ordering::Release);
        // `Duration::MAX` ("as long as it takes") would overflow an instant: some thirty years instead.
        let now = Instant::now();
        let until = now
            .checked_add(deadline)
            .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 24 * 60 * 60));
        let _ = self.phase.send(Phase::Draining { until });
        tracing::info!(agent = self.name, deadline = ?deadline, "agent stopping");
        match tokio::time::timeout_at(until, self.closer.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(agent = self.name, error = %error, "could not close the subscription cleanly")
            }
            Err(_) => tracing::warn!(
                agent = self.name,
                "closing the subscription did not finish before the deadline; the agent stops anyway"
            ),
        }
        // The task itself stops at the deadline; the margin covers settling what it still holds.
        let abort = task.abort_handle();
        let report = match tokio::time::timeout_at(until + Duration::from_secs(5), task).await {
            Ok(Ok(report)) => report,
            Ok(Err(error)) => {
                tracing::error!(agent = self.name, error = %error, "the agent task failed while stopping");
                ShutdownReport::default()
            }
            Err(_) => {
                abort.abort();
                tracing::error!(
                    agent = self.name,
                    "the agent did not stop in time and was aborted"
                );
                ShutdownReport {
                    aborted: self.stats.in_flight.load(Ordering::Relaxed),
                    ..ShutdownReport::default()
                }
            }
        };
        self.stats.state.store(STATE_STOPPED, Ordering::Release);
        tracing::info!(
            agent = self.name,
            handled = report.handled,
            requeued = report.requeued,
            aborted = report.aborted,
            "agent stopped"
        );
        report
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Draining { until: Instant },
}

/// Completes when the agent is stopping and its deadline has passed. Made once per loop and polled
/// again and again (making one per message would register a waiter on the watch each time).
async fn deadline_passed(mut phase: watch::Receiver<Phase>) {
    loop {
        let current = *phase.borrow_and_update();
        match current {
            Phase::Draining { until } => {
                tokio::time::sleep_until(until).await;
                return;
            }
            Phase::Running => {
                if phase.changed().await.is_err() {
                    // Nobody can stop this agent any more; it runs until its subscription ends.
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

/// A delivery whose envelope is lent to a handler's context. Dropped before [`Loan::end`], it puts the
/// envelope back first, so the delivery's own drop hands the whole message back to the backend.
struct Loan<A: Agent> {
    delivery: Option<Delivery>,
    context: Option<Context<A>>,
}

impl<A: Agent> Loan<A> {
    fn new(mut delivery: Delivery, bus: Bus) -> Self {
        let envelope = delivery.lend();
        Loan {
            delivery: Some(delivery),
            context: Some(Context::new(envelope, bus)),
        }
    }

    fn context(&self) -> &Context<A> {
        self.context.as_ref().expect("the loan is running")
    }

    /// The delivery, whole again.
    fn end(mut self) -> Delivery {
        self.give_back();
        self.delivery.take().expect("the loan ends once")
    }

    fn give_back(&mut self) {
        if let (Some(context), Some(delivery)) = (self.context.take(), self.delivery.as_mut()) {
            delivery.restore(context.into_envelope());
        }
    }
}

impl<A: Agent> Drop for Loan<A> {
    fn drop(&mut self) {
        if let Some(context) = &self.context {
            // Dropped with the envelope still lent: the handler was cut off mid-run (the stop
            // deadline, the agent's task aborted or its Tokio runtime ending). Said here, where the
            // message is known: the stop's own line names only the agent.
            let envelope = context.envelope();
            tracing::warn!(
                agent = A::NAME,
                message_id = %envelope.id(),
                class = envelope.class(),
                session = envelope.session(),
                channel = envelope.channel().name(),
                attempt = envelope.attempt(),
                "a handler was cut off before it finished (the agent's stop deadline passed, or its \
                 task ended); its message goes back to the backend unsettled"
            );
        }
        self.give_back();
    }
}

struct AgentShared<A: Agent> {
    agent: A,
    bus: Bus,
    options: AgentOptions,
    stats: Arc<AgentStats>,
}

enum Outcome {
    Handled,
    Rejected(Rejection),
    Failed(HandlerError),
    Panicked(String),
    TimedOut(Duration),
}

async fn run<A: Agent>(
    shared: Arc<AgentShared<A>>,
    mut subscription: Subscription,
    phase: watch::Receiver<Phase>,
) -> ShutdownReport {
    let _panic = EndedByPanic(shared.clone());
    let report = if shared.options.concurrency <= 1 {
        let mut report = ShutdownReport::default();
        shared.serve(&mut subscription, phase, &mut report).await;
        report
    } else {
        run_workers(shared.clone(), &mut subscription, phase).await
    };
    if shared.stats.mark_ended_on_its_own() {
        log_ended_on_its_own(A::NAME, shared.bus.router().clone());
    }
    report
}

/// Marks an agent whose task panicked (outside the guards around its handlers: the user's logging
/// layer, a backend's settlement) as ended on its own, as a failed worker marks it: with one worker,
/// whose loop is the agent's task, or a panic in the loop handing deliveries to the workers, health
/// said Healthy until the agent was stopped, and nothing said it no longer received.
struct EndedByPanic<A: Agent>(Arc<AgentShared<A>>);

impl<A: Agent> Drop for EndedByPanic<A> {
    fn drop(&mut self) {
        if std::thread::panicking() && self.0.stats.mark_ended_on_its_own() {
            // Logged from a task of its own, not here: this runs while the panic unwinds, and a
            // second panic now (the user's logging layer may be what panicked) would abort the
            // process. The panic hook has reported the panic itself.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async {
                    tracing::error!(
                        agent = A::NAME,
                        "the agent's task panicked outside its handlers; the agent no longer \
                         receives (what its subscription held goes back to the backend as its drop \
                         hands it back)"
                    );
                });
            }
        }
    }
}

/// How long the line saying an agent's subscription ended waits for the router's health, which
/// says why (a broker the backend gave up reconnecting to, a closed router).
const ENDED_HEALTH_WAIT: Duration = Duration::from_secs(5);

/// Logs that `agent`'s subscription ended without a stop, with the router's account of why: the
/// subscription itself ends with no reason. On a task of its own, so that a router slow to answer
/// does not hold up the agent's end.
#[cold]
fn log_ended_on_its_own(agent: &'static str, router: SharedRouter) {
    tokio::spawn(async move {
        let router = match tokio::time::timeout(ENDED_HEALTH_WAIT, router.health()).await {
            Ok(health) => format!("{:?}: {}", health.status, health.detail),
            Err(_) => format!(
                "its health did not answer within {}s",
                ENDED_HEALTH_WAIT.as_secs()
            ),
        };
        tracing::error!(
            agent,
            router,
            "the agent's subscription ended without a stop (the router was closed, gave up \
             reconnecting, or a worker failed; `router` says what the router reports); the agent no \
             longer receives"
        );
    });
}

/// Where an agent loop takes its deliveries from: the subscription, or a worker's queue.
trait DeliverySource: Send {
    /// The next delivery, or `None` when the source has ended.
    fn next_delivery(&mut self) -> impl Future<Output = Option<Delivery>> + Send;
    /// Takes nothing new from now on (what is buffered stays readable).
    fn stop_taking(&mut self) {}
    /// A delivery already waiting, without waiting.
    fn try_next_delivery(&mut self) -> Option<Delivery>;

    /// Takes nothing new and gives back what is buffered, unhandled (the backend redelivers it where
    /// it can, without counting an attempt); returns how many were given back.
    fn give_back_buffered(&mut self) -> u64 {
        self.stop_taking();
        let mut given_back = 0;
        while let Some(delivery) = self.try_next_delivery() {
            delivery.give_back();
            given_back += 1;
        }
        given_back
    }
}

/// The next delivery from `source`, or `None` when it ends or the stop deadline passes first.
async fn next_before_deadline(
    source: &mut impl DeliverySource,
    deadline: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Option<Delivery> {
    tokio::select! {
        biased;
        () = deadline => None,
        next = source.next_delivery() => next,
    }
}

impl DeliverySource for Subscription {
    fn next_delivery(&mut self) -> impl Future<Output = Option<Delivery>> + Send {
        self.next()
    }
    fn try_next_delivery(&mut self) -> Option<Delivery> {
        self.try_next()
    }
}

impl DeliverySource for mpsc::Receiver<Delivery> {
    fn next_delivery(&mut self) -> impl Future<Output = Option<Delivery>> + Send {
        self.recv()
    }
    fn stop_taking(&mut self) {
        self.close();
    }
    fn try_next_delivery(&mut self) -> Option<Delivery> {
        self.try_recv().ok()
    }
}

async fn run_workers<A: Agent>(
    shared: Arc<AgentShared<A>>,
    subscription: &mut Subscription,
    phase: watch::Receiver<Phase>,
) -> ShutdownReport {
    let workers = shared.options.concurrency;
    // A worker's queue holds at most `MAX_PERMITS` (tokio panics beyond): a prefetch of `usize::MAX`
    // (no bound, which the routers take) is as good as unbounded at that.
    let per_worker =
        (shared.options.prefetch / workers).clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
    let mut senders = Vec::with_capacity(workers);
    let mut tasks = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (sender, mut receiver) = mpsc::channel::<Delivery>(per_worker);
        senders.push(sender);
        let shared = shared.clone();
        let phase = phase.clone();
        tasks.push(tokio::spawn(async move {
            let mut report = ShutdownReport::default();
            shared.serve(&mut receiver, phase, &mut report).await;
            report
        }));
    }
    let mut report = ShutdownReport::default();
    // The delivery whose worker was found gone: it goes back after the subscription is closed, or a
    // backend that hands it straight back would have it read and given back a second time.
    let mut worker_failed: Option<Delivery> = None;
    let deadline = deadline_passed(phase);
    tokio::pin!(deadline);
    while let Some(delivery) = next_before_deadline(subscription, deadline.as_mut()).await {
        let mut hasher = DefaultHasher::new();
        delivery.envelope().session().hash(&mut hasher);
        let worker = (hasher.finish() % workers as u64) as usize;
        // Room in the worker's queue first, so that the delivery stays here if the deadline comes
        // while waiting: no handler saw it, so it goes back unhandled (dropping it would count an
        // attempt on a backend that counts deliveries).
        let room = tokio::select! {
            biased;
            () = &mut deadline => {
                delivery.give_back();
                report.requeued += 1;
                break;
            }
            room = senders[worker].reserve() => room,
        };
        if let Ok(room) = room {
            room.send(delivery);
        } else {
            // The worker is gone (its task failed): the delivery goes back to the backend unhandled.
            tracing::error!(
                agent = A::NAME,
                worker,
                "an agent worker stopped unexpectedly; the agent stops taking messages"
            );
            worker_failed = Some(delivery);
            break;
        }
    }
    // A stop closed the subscription before its deadline came; a failed worker did not. A backend
    // that hands a delivery given back to the same subscription again while it is open (the
    // in-memory router, Redis pub/sub) would feed the loop below for ever: closed first, as a stop
    // does, or left to drop what it holds if it cannot be.
    match worker_failed {
        None => report.requeued += subscription.give_back_buffered(),
        Some(delivery) => {
            if close_after_worker_failure::<A>(subscription).await {
                report.requeued += subscription.give_back_buffered();
            }
            delivery.give_back();
            report.requeued += 1;
        }
    }
    drop(senders);
    for task in tasks {
        match task.await {
            Ok(worker_report) => report.add(&worker_report),
            Err(error) => {
                tracing::error!(agent = A::NAME, error = %error, "an agent worker failed")
            }
        }
    }
    report
}

/// How long an agent whose worker failed waits for its subscription to close.
const CLOSE_AFTER_WORKER_FAILURE: Duration = Duration::from_secs(10);

/// Closes the subscription of an agent whose worker failed, before what it buffered is given back;
/// returns whether it closed. If it did not, what it buffered is not given back one by one (that
/// could go on for ever) but dropped with it, which hands it back to the backend as abandoned.
async fn close_after_worker_failure<A: Agent>(subscription: &Subscription) -> bool {
    let error = match tokio::time::timeout(CLOSE_AFTER_WORKER_FAILURE, subscription.close()).await {
        Ok(Ok(())) => return true,
        Ok(Err(error)) => error.to_string(),
        Err(_) => format!(
            "it did not close within {}s",
            CLOSE_AFTER_WORKER_FAILURE.as_secs()
        ),
    };
    tracing::error!(
        agent = A::NAME,
        error,
        "could not close the subscription of an agent whose worker failed; what it buffered is \
         dropped with it (the backend gets it back as abandoned)"
    );
    false
}

/// A handler's future, dropped inside a panic guard: a panic in the user's `Drop` code (of the
/// future's state, when it finishes or when the stop deadline cuts it short) is logged and counted in
/// `panicked` instead of taking the agent's worker down.
struct DropGuarded<'a, F: Future + Unpin> {
    future: Option<F>,
    panicked: &'a AtomicU64,
}

impl<F: Future + Unpin> Future for DropGuarded<'_, F> {
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let future = self
            .future
            .as_mut()
            .expect("a handler's future is polled only until it is dropped");
        std::pin::Pin::new(future).poll(cx)
    }
}

impl<F: Future + Unpin> Drop for DropGuarded<'_, F> {
    fn drop(&mut self) {
        let Some(future) = self.future.take() else {
            return;
        };
        if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(move || drop(future))) {
            bump(self.panicked);
            tracing::error!(
                panic = %panic_text(panic.as_ref()),
                "dropping the handler's future panicked (user code in a Drop); the agent goes on"
            );
        }
    }
}

struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<A: Agent> AgentShared<A> {
    /// Takes deliveries from `source` one at a time until it ends or the stop deadline passes, then
    /// gives back what is still buffered, unhandled (the backend redelivers it where it can).
    async fn serve(
        &self,
        source: &mut impl DeliverySource,
        phase: watch::Receiver<Phase>,
        report: &mut ShutdownReport,
    ) {
        let deadline = deadline_passed(phase);
        tokio::pin!(deadline);
        while let Some(delivery) = next_before_deadline(source, deadline.as_mut()).await {
            if !self
                .process_until_deadline(delivery, deadline.as_mut(), report)
                .await
            {
                break;
            }
        }
        report.requeued += source.give_back_buffered();
    }

    fn is_stopping(&self) -> bool {
        self.stats.state.load(Ordering::Acquire) != STATE_RUNNING
    }

    /// Processes one delivery unless the stop deadline passes first; returns whether to go on.
    async fn process_until_deadline(
        &self,
        delivery: Delivery,
        deadline: std::pin::Pin<&mut impl Future<Output = ()>>,
        report: &mut ShutdownReport,
    ) -> bool {
        let stopping = self.is_stopping();
        tokio::select! {
            biased;
            () = self.process(delivery) => {
                if stopping || self.is_stopping() {
                    report.handled += 1;
                }
                true
            }
            () = deadline => {
                // Dropping the processing future drops the delivery unsettled: the backend gets it back.
                report.aborted += 1;
                tracing::warn!(agent = A::NAME, "stop deadline reached with a handler still running; its message is given back");
                false
            }
        }
    }

    async fn process(&self, delivery: Delivery) {
        let stats = &self.stats;
        if delivery.envelope().is_inbox_reply() {
            // A reply on its way to a requester's inbox, matched by this agent's `<Class>:*:*`: it is
            // the requester's, not this agent's (and an agent that replies with a class it receives
            // would otherwise answer its own replies). Anything else on direction `reply` (a reply
            // addressed to an agent's own session, another program's messages) is handled as usual.
            bump(&stats.replies_skipped);
            tracing::debug!(
                agent = A::NAME,
                channel = delivery.envelope().channel().name(),
                "a reply to a requester's inbox is not for agents; acknowledged without handling"
            );
            if let Err(error) = delivery.ack().await {
                bump(&stats.ack_failures);
                tracing::warn!(error = %error, "could not acknowledge a reply meant for a requester; the broker may deliver it again");
            }
            return;
        }
        bump(&stats.received);
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight(&stats.in_flight);
        let envelope = delivery.envelope();
        if envelope.attempt() > 1 {
            bump(&stats.retries_received);
        }
        // At ERROR level, so that it is on whatever the level filter lets through: a WARN or ERROR line
        // about this message (a retry, a dead letter) must still say which message it is.
        let span = tracing::error_span!(
            "message",
            message_id = %envelope.id(),
            class = envelope.class(),
            session = envelope.session(),
            agent = A::NAME,
            attempt = envelope.attempt(),
        );
        async move {
            tracing::debug!("received");
            // Honoured only from this agent (it marks with its name): a frame from elsewhere that
            // carries the reserved header is handled as usual.
            let envelope = delivery.envelope();
            if envelope.header(headers::DEAD_LETTER_PENDING).is_some()
                && envelope.header(headers::AGENT) == Some(A::NAME)
            {
                // Its dead letter could not be published last time: publish it now, without running
                // the handler again.
                return Box::pin(self.dead_letter_pending(delivery)).await;
            }
            // The handler's context borrows the delivery's envelope instead of a copy of it; the loan
            // ends before settling, or when this future is dropped (the stop deadline), so a delivery
            // given back to the backend always has its envelope.
            let loan = Loan::new(delivery, self.bus.clone());
            let outcome = self.run_handler(loan.context()).await;
            if matches!(outcome, Outcome::Handled) && !loan.context().replied() {
                self.check_answered(loan.context().envelope());
            }
            self.settle(loan.end(), outcome).await;
        }
        .instrument(span)
        .await
    }

    /// A request this agent could have answered (its `SENDS` has the class its requester waits for)
    /// whose handler returned `Ok` without replying: its requester waits out its timeout, which is
    /// counted and logged here, where the cause is known.
    fn check_answered(&self, request: &Envelope) {
        if answerable_inbox::<A>(request).is_some() {
            bump(&self.stats.requests_unanswered);
            tracing::warn!(
                reply_to = request.reply_to(),
                "the handler returned Ok without replying to the request (Context::reply); unless \
                 another agent answers it, its requester waits for its timeout"
            );
        }
    }

    async fn run_handler(&self, context: &Context<A>) -> Outcome {
        let dispatched =
            std::panic::catch_unwind(AssertUnwindSafe(|| self.agent.__dispatch(context)));
        let handler = match dispatched {
            Ok(Ok(handler)) => handler,
            Ok(Err(rejection)) => return Outcome::Rejected(rejection),
            Err(panic) => return Outcome::Panicked(panic_text(panic.as_ref())),
        };
        let handler = DropGuarded {
            future: Some(handler),
            panicked: &self.stats.panicked,
        };
        let mut guarded = std::pin::pin!(AssertUnwindSafe(handler).catch_unwind());
        // Most handlers finish at their first poll; the timer is only set up for those that do not.
        let result = match futures::poll!(guarded.as_mut()) {
            std::task::Poll::Ready(result) => result,
            std::task::Poll::Pending => match self.options.handler_timeout {
                Some(limit) => match tokio::time::timeout(limit, guarded).await {
                    Ok(result) => result,
                    Err(_) => return Outcome::TimedOut(limit),
                },
                None => guarded.await,
            },
        };
        match result {
            Ok(Ok(())) => Outcome::Handled,
            Ok(Err(error)) => Outcome::Failed(error),
            Err(panic) => Outcome::Panicked(panic_text(panic.as_ref())),
        }
    }

    // The rare paths (dead letters) are boxed: their futures are large, and every message's processing
    // future would otherwise carry (and copy) their size.
    async fn settle(&self, delivery: Delivery, outcome: Outcome) {
        let stats = &self.stats;
        let error = match outcome {
            Outcome::Handled => {
                bump(&stats.handled);
                if let Err(error) = delivery.ack().await {
                    bump(&stats.ack_failures);
                    tracing::warn!(error = %error, "handled, but the acknowledgement failed; the broker may deliver the message again");
                }
                return;
            }
            Outcome::Rejected(rejection) => {
                bump(&stats.rejected);
                Box::pin(self.dead_letter(
                    delivery,
                    rejection.reason,
                    &rejection.error.to_string(),
                ))
                .await;
                return;
            }
            // A reply of another class than the requester waits for: the requester is told (by
            // `failure_reply`) only if this agent sends that class too; otherwise it is not the one
            // that answers the requester (another agent type receiving the request's class may be,
            // and may answer it a moment later). Its dead letter says why.
            Outcome::Failed(error)
                if error.is_permanent() || replied_with_another_class(&error, &delivery) =>
            {
                bump(&stats.failed);
                Box::pin(self.dead_letter(delivery, headers::REASON_REJECTED, &describe(&error)))
                    .await;
                return;
            }
            Outcome::Failed(error) => describe(&error),
            Outcome::Panicked(text) => {
                bump(&stats.panicked);
                tracing::error!(panic = %text, "the handler panicked; handled as a failure");
                format!("handler panicked: {text}")
            }
            Outcome::TimedOut(limit) => format!(
                "handler timed out after {limit:?} (the limit AgentOptions::handler_timeout sets)"
            ),
        };
        bump(&stats.failed);
        let attempt = delivery.envelope().attempt();
        let max_attempts = self.options.max_attempts;
        if attempt < max_attempts {
            let delay = self.options.backoff.delay(attempt);
            bump(&stats.retried);
            tracing::warn!(
                error = %error,
                attempt,
                max_attempts,
                retry_in_ms = delay.as_millis() as u64,
                "handler failed; retrying"
            );
            if let Err(nack_error) = delivery.nack(NackAction::Retry { delay }).await {
                bump(&stats.nack_failures);
                // The backend's error says what became of the message instead (sent back at once,
                // held for a late confirm, requeued unchanged, delivered again after a reconnect).
                tracing::warn!(error = %nack_error, "the retry did not go as asked; the error says what becomes of the message");
            }
        } else {
            Box::pin(self.dead_letter(delivery, headers::REASON_HANDLER_FAILED, &error)).await;
        }
    }

    /// Dead-letters a delivery given back because publishing its dead letter failed, with the reason,
    /// error and attempts it was marked with then.
    async fn dead_letter_pending(&self, delivery: Delivery) {
        let envelope = delivery.envelope();
        let reason = envelope
            .header(headers::DEAD_LETTER_PENDING)
            .unwrap_or(headers::REASON_HANDLER_FAILED)
            .to_string();
        let error = envelope.header(headers::ERROR).unwrap_or("").to_string();
        let attempts = envelope
            .header(headers::ATTEMPTS)
            .and_then(|attempts| attempts.parse().ok())
            .unwrap_or(envelope.attempt());
        tracing::warn!(
            reason,
            "publishing again the dead letter of a message whose dead letter could not be published"
        );
        self.dead_letter_as(delivery, &reason, &error, attempts)
            .await;
    }

    /// Tells the requester of a dead-lettered request that it failed, so that it does not wait out its
    /// timeout. If this publish fails, the requester only waits for its timeout, as before.
    async fn answer_with_failure(&self, reply: Envelope) {
        let reply_to = reply.channel().name().to_string();
        match self.bus.router().publish(reply).await {
            Ok(_) => tracing::debug!(reply_to, "told the requester its request failed"),
            Err(error) => tracing::warn!(
                reply_to,
                error = %error,
                "could not tell the requester its request failed; it waits for its timeout"
            ),
        }
    }

    async fn dead_letter(&self, delivery: Delivery, reason: &str, error: &str) {
        let attempts = delivery.envelope().attempt();
        self.dead_letter_as(delivery, reason, error, attempts).await;
    }

    /// Publishes the dead letter of `delivery` after `attempts` attempts, then acknowledges it; if the
    /// publish fails, gives it back marked so that its next delivery is dead-lettered at once.
    async fn dead_letter_as(
        &self,
        mut delivery: Delivery,
        reason: &str,
        error: &str,
        attempts: u32,
    ) {
        let original = delivery.envelope();
        let mut dead = original
            .clone()
            .with_id(MessageId::new())
            .with_channel(original.channel().dead_letter())
            .with_header(headers::DEAD_LETTER_REASON, reason)
            .with_header(headers::ERROR, error)
            .with_header(headers::ATTEMPTS, attempts.to_string())
            .with_header(headers::AGENT, A::NAME)
            .with_header(headers::ORIGINAL_ID, original.id().to_string())
            .with_header(headers::ORIGINAL_CHANNEL, original.channel().name());
        dead.headers_mut().remove(headers::DEAD_LETTER_PENDING);
        // A payload labelled JSON that is not JSON (undecodable: a frame from elsewhere) has no JSON
        // frame, which carries the payload inline: kept as it is, its dead letter could never be
        // published on a broker, and the message would come back forever. Its bytes go as raw bytes.
        if dead.content_type() == JSON_CONTENT_TYPE
            && serde_json::from_slice::<&serde_json::value::RawValue>(dead.payload()).is_err()
        {
            dead = dead.with_content_type(BINARY_CONTENT_TYPE);
        }
        let failure_reply = failure_reply::<A>(original, reason, error, attempts);
        tracing::error!(
            reason,
            error,
            attempts,
            dead_letter_channel = dead.channel().name(),
            "dead-lettered"
        );
        match self.bus.router().publish(dead).await {
            Ok(outcome) => {
                bump(&self.stats.dead_lettered);
                if outcome.is_unroutable() {
                    bump(&self.stats.dead_letters_unkept);
                    tracing::warn!(
                        "the dead letter was not kept: nothing subscribes to DeadLetter channels and this backend does not store them"
                    );
                }
                if let Some(failure) = failure_reply {
                    self.answer_with_failure(failure).await;
                }
                if let Err(error) = delivery.ack().await {
                    bump(&self.stats.ack_failures);
                    tracing::warn!(error = %error, "dead-lettered, but the acknowledgement failed; the broker may deliver the message again");
                }
            }
            Err(publish_error) => {
                // Never lose it: give it back rather than acknowledging, marked so that its next
                // delivery is dead-lettered without running the handler again.
                // The envelope's attempt grows with each time it is given back: the delay too.
                let delay = self.options.backoff.delay(delivery.envelope().attempt());
                let marked = delivery
                    .lend()
                    .with_header(headers::DEAD_LETTER_PENDING, reason)
                    .with_header(headers::ERROR, error)
                    .with_header(headers::ATTEMPTS, attempts.to_string())
                    .with_header(headers::AGENT, A::NAME);
                delivery.restore(marked);
                // A retry scheduled like any other (its redelivery counts in `retries_received`).
                bump(&self.stats.retried);
                tracing::error!(error = %publish_error, retry_in_ms = delay.as_millis() as u64, "could not publish the dead letter; the message is given back, to be dead-lettered when it comes again");
                if let Err(error) = delivery.nack(NackAction::Retry { delay }).await {
                    bump(&self.stats.nack_failures);
                    tracing::error!(error = %error, "could not give the message back either; the error says what becomes of it");
                }
            }
        }
    }
}

/// Whether the handler failed because its reply to the delivered request was of another class than
/// the request's `reply_to` names ([`Error::UnexpectedReply`] from `Context::reply`, passed on with
/// `?`): the request names the class its requester waits for and the reply type is the handler's
/// code's, so every attempt would fail the same way, after doing the handler's work again. (The same
/// error about a reply the handler's own request received names another `reply_to`, that of the
/// handler's inbox, and stays transient: the service that sent it may mend.)
fn replied_with_another_class(error: &crate::agent::HandlerError, delivery: &Delivery) -> bool {
    match error.error().downcast_ref::<Error>() {
        Some(Error::UnexpectedReply { reply_to, .. }) => {
            delivery.envelope().reply_to() == Some(reply_to.as_str())
        }
        _ => false,
    }
}

/// The requester's inbox that `request`'s `reply_to` names, with the index in `A::SENDS` of the class
/// the requester waits for, when agent `A` could answer it (it sends that class): the agents that are
/// expected to answer a request, and may tell its requester it failed.
fn answerable_inbox<A: Agent>(request: &Envelope) -> Option<(Channel, usize)> {
    let target = parse_channel(request.reply_to()?).ok()?;
    if !crate::channel::is_inbox(&target) {
        return None;
    }
    let sent = A::SENDS.iter().position(|class| *class == target.class())?;
    Some((target, sent))
}

/// The reply that tells the requester of `request` (when it is one: its `reply_to` is a requester's
/// inbox) that it was dead-lettered: on its reply channel, correlated, empty, with the dead letter's
/// reason, error, attempts and agent in headers.
///
/// Only from an agent that could have answered it (the agent's `SENDS` has the reply's class): every
/// agent type that receives a class gets its requests, and one that only observes them failing (or
/// whose handler replied with another class, the only one it sends) must not cut short the requester
/// of the agent that answers.
///
/// The channel is named with the reply type's template, as [`Context::reply`] names it: `reply_to`
/// is in canonical form, and a broker that routes by name (Redis pub/sub) delivers to the requester's
/// inbox only what is published under the name it subscribed to.
fn failure_reply<A: Agent>(
    request: &Envelope,
    reason: &str,
    error: &str,
    attempts: u32,
) -> Option<Envelope> {
    let (target, sent) = answerable_inbox::<A>(request)?;
    let template = A::__SENDS_TEMPLATES
        .get(sent)
        .unwrap_or(&ChannelTemplate::DEFAULT);
    // A `reply_to` from another client that the template cannot name (a session holding the
    // template's separator) keeps its canonical name: backends that route by components still
    // deliver it.
    let channel = Channel::with_template(
        template,
        target.class(),
        target.direction(),
        target.session(),
    )
    .unwrap_or(target);
    // A MessagePack frame whatever the request's codec: a JSON frame carries its payload inline, and an
    // empty payload is no JSON, so a broker could not frame the reply (and the requester would wait
    // out its timeout). The requester reads the header before the payload.
    Some(
        Envelope::new(channel, MSGPACK_CONTENT_TYPE, Vec::new())
            .with_correlation_id(request.id().to_string())
            .with_header(headers::REQUEST_FAILED, reason)
            .with_header(headers::ERROR, error)
            .with_header(headers::ATTEMPTS, attempts.to_string())
            .with_header(headers::AGENT, A::NAME),
    )
}

/// The text of a handler's error. Its `Display` is the user's code, run outside the handler's panic
/// guard: a panic there must not take the agent's task down with it.
fn describe(error: &HandlerError) -> String {
    std::panic::catch_unwind(AssertUnwindSafe(|| error.to_string())).unwrap_or_else(|panic| {
        format!(
            "the handler failed, and displaying its error panicked: {}",
            panic_text(panic.as_ref())
        )
    })
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "a non-string panic payload".to_string()
    }
}
