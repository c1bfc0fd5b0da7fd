//! # agentcomm-amqp
//!
//! The RabbitMQ backend of agentcomm, on [amqprs]: an [`AmqpRouter`] implements
//! [`Router`] with durable, confirmed publishing and reconnection.
//!
//! ```no_run
//! use agentcomm_amqp::AmqpRouter;
//! use agentcomm_core::prelude::*;
//!
//! # async fn run() -> agentcomm_core::Result<()> {
//! // RABBITMQ_URL, or amqp://guest:guest@127.0.0.1:5672/%2f
//! let router = AmqpRouter::from_env().await?;
//! let runtime = Runtime::new(router);
//! # Ok(())
//! # }
//! ```
//!
//! # What it does
//! - **Topology**: one durable topic exchange; a channel `class:direction:session` is the routing key
//!   `class.direction.session` (components escaped, see [`topology`]); a pattern is a binding key with
//!   `*` wildcards. A fan-out subscription gets its own queue; a group shares one durable queue
//!   `<exchange>.group.<name>` (competing consumers), bound to the union of its members' patterns.
//! - **Publishing**: persistent messages, published mandatory on a channel in confirm mode (opened
//!   by `connect`, so that the first publishes do not wait for it); a publish
//!   resolves with [`PublishOutcome::Accepted`](agentcomm_core::router::PublishOutcome) once the broker
//!   confirms it, [`Unroutable`](agentcomm_core::router::PublishOutcome::Unroutable) when no queue was
//!   bound (basic.return), an error on basic.nack or when no confirm comes within the confirm timeout.
//!   Batches pipeline their confirms.
//! - **Consuming**: manual acknowledgement with the subscription's prefetch; requeue; delayed retry
//!   through TTL queues that dead-letter back to the originating queue only; a dead-letter exchange and
//!   durable queue; frames that are not agentcomm envelopes are dead-lettered and counted (`malformed`).
//! - **Reconnection**: a lost connection is detected (I/O error, heartbeat, broker close), reopened
//!   with exponential backoff and jitter, the topology declared again, every consumer restored, and every
//!   publish not yet confirmed sent again. A connection is also recycled that way before it runs out
//!   of channel ids (amqprs never frees the id of a channel the broker closed; counted in
//!   `channel_id_recycles`). A publish during an outage waits up to
//!   `publish_outage_timeout`, then fails with an error that says so. Deliveries from a lost channel
//!   are stale: settling them fails instead of settling another message on the new channel.
//! - **Health** reports the connection state and counters; **close** cancels consumers, lets handlers
//!   settle what they hold, waits for outstanding confirms, then closes channels and the connection.
//!
//! See `docs/rabbitmq.md` in the repository for the full design.
//!
//! [amqprs]: https://docs.rs/amqprs

#![deny(missing_docs)]

mod builder;
mod consumer;
mod credentials;
mod link;
mod publisher;
#[cfg(feature = "tls")]
mod tls;
pub mod topology;
mod url;

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use amqprs::channel::ExchangeDeclareArguments;
use tokio::time::Instant;

use agentcomm_core::envelope::Envelope;
use agentcomm_core::error::{Error, Result};
use agentcomm_core::router::{
    BoxFuture, Capabilities, Distribution, Health, HealthStatus, PublishOutcome, Router,
    SubscribeOptions, Subscription,
};

pub use builder::{AmqpRouterBuilder, DEFAULT_EXCHANGE, DeadLetterSettings, QueueType};
pub use credentials::{Credentials, CredentialsError};

use consumer::{Control, DeliveryStream, QueueKind, QueueSpec, SubShared};
use link::{BACKEND, Inner, Link, LinkState, OpChannel, ProbeWatch, Unanswered, Wait};

/// The most publishes of one batch waiting for their confirm at once.
const BATCH_IN_FLIGHT: usize = 1024;

/// A [`Router`] on RabbitMQ. Cheap to clone: clones share the connection. `Debug` shows the URL
/// without its password.
#[derive(Clone)]
pub struct AmqpRouter {
    inner: Arc<Inner>,
}

impl fmt::Debug for AmqpRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = |link: &link::Link| match &*link.state.borrow() {
            LinkState::Connected(live) => format!("connected (generation {})", live.generation),
            LinkState::Connecting { attempt, .. } => format!("reconnecting (attempt {attempt})"),
            LinkState::Closed => "closed".to_string(),
        };
        f.debug_struct("AmqpRouter")
            .field("url", &self.inner.settings.url.redacted)
            .field("exchange", &self.inner.settings.exchange)
            .field("publishing", &state(&self.inner.publishing))
            .field("consuming", &state(&self.inner.consuming))
            .finish_non_exhaustive()
    }
}

impl AmqpRouter {
    /// A builder for the broker at `url` (`amqp://` or `amqps://`).
    pub fn builder(url: impl Into<String>) -> AmqpRouterBuilder {
        AmqpRouterBuilder::new(url)
    }

    /// Connects to `url` with the default settings.
    pub async fn connect(url: impl Into<String>) -> Result<Self> {
        Self::builder(url).connect().await
    }

    /// Connects to `RABBITMQ_URL` (or `amqp://guest:guest@127.0.0.1:5672/%2f` when unset) with the
    /// default settings. The process environment only, not a `.env` file (see
    /// [`AmqpRouterBuilder::from_env`]).
    pub async fn from_env() -> Result<Self> {
        AmqpRouterBuilder::from_env().connect().await
    }

    pub(crate) async fn start(settings: builder::Settings) -> Result<Self> {
        let inner = Arc::new(Inner::new(settings));
        link::start(&inner).await?;
        tracing::info!(
            url = %inner.settings.url.redacted,
            exchange = %inner.settings.exchange,
            "connected to RabbitMQ"
        );
        Ok(AmqpRouter { inner })
    }

    /// The exchange messages are published to.
    pub fn exchange(&self) -> &str {
        &self.inner.settings.exchange
    }

    /// The dead-letter queue, when one is kept.
    pub fn dead_letter_queue(&self) -> Option<&str> {
        self.inner.settings.dead_letter_queue.as_deref()
    }

    /// The URL, without its password.
    pub fn url(&self) -> &str {
        &self.inner.settings.url.redacted
    }

    /// The durable queues this router declared so far: its dead-letter queue, the queues of the groups
    /// it subscribed, their retry queues. For tools and for tests that clean up after themselves.
    pub fn declared_queues(&self) -> Vec<String> {
        self.inner
            .declared_queues
            .lock()
            .expect("declared lock")
            .iter()
            .cloned()
            .collect()
    }

    /// The dead-letter exchange.
    pub fn dead_letter_exchange(&self) -> &str {
        &self.inner.settings.dead_letter_exchange
    }

    /// Whether both connections (publishing and consuming) are up now. Not once the runtime the router
    /// connected on has shut down: the connections ended with it.
    pub fn is_connected(&self) -> bool {
        self.inner.publishing.is_connected()
            && self.inner.consuming.is_connected()
            && !self.inner.supervisors_gone()
    }

    /// One publish. An `async` block rather than an `async fn`, which would copy the envelope into
    /// a local of its own: the future is moved whole into a box for every publish.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn would copy the envelope into a local"
    )]
    fn publish_one(
        &self,
        envelope: Envelope,
    ) -> impl Future<Output = Result<PublishOutcome>> + Send + '_ {
        async move {
            // A publish refused before it reaches `publish_envelope` is counted as every failed
            // publish is, though it never reached the broker.
            let refused = |error: Error| {
                let counters = &self.inner.counters;
                link::bump(&counters.published);
                link::bump(&counters.publish_failures);
                Err(error)
            };
            if self.inner.publishing_closed.load(Ordering::Acquire) {
                return refused(Inner::closed_error());
            }
            let routing_key = match topology::routing_key(envelope.channel()) {
                Ok(routing_key) => routing_key,
                Err(error) => return refused(error),
            };
            self.inner
                .publish_envelope(&envelope, &self.inner.settings.exchange, &routing_key)
                .await
        }
    }

    async fn subscribe_now(&self, options: SubscribeOptions) -> Result<Subscription> {
        options.check()?;
        let inner = &self.inner;
        if inner.is_closing() {
            return Err(Inner::closed_error());
        }
        let mut bindings = Vec::with_capacity(options.patterns.len());
        for pattern in &options.patterns {
            let key = topology::binding_key(pattern)?;
            if !bindings.contains(&key) {
                bindings.push(key);
            }
        }
        let settings = &inner.settings;
        let (name, kind) = match &options.distribution {
            Distribution::Group(group) => {
                topology::check_group_name(group)?;
                (
                    topology::group_queue(&settings.exchange, group),
                    QueueKind::Group,
                )
            }
            _ => (
                topology::fan_out_queue(&settings.exchange),
                QueueKind::FanOut,
            ),
        };
        let prefetch = if options.prefetch == SubscribeOptions::DEFAULT_PREFETCH {
            settings
                .prefetch
                .unwrap_or(SubscribeOptions::DEFAULT_PREFETCH as u16)
        } else {
            options.prefetch.clamp(1, usize::from(u16::MAX)) as u16
        };
        let id = inner.next_subscription.fetch_add(1, Ordering::Relaxed);
        let spec = QueueSpec {
            name: name.clone(),
            kind,
            bindings: bindings.clone(),
            prefetch,
        };
        let shared = Arc::new(SubShared::new(id, spec, inner.clone()));
        {
            let mut subscriptions = inner.subscriptions.lock().expect("subscriptions lock");
            subscriptions.retain(|sub| sub.strong_count() > 0);
            subscriptions.push(Arc::downgrade(&shared));
        }
        let (ready_sender, ready) = tokio::sync::oneshot::channel();
        // On the router's runtime, not the caller's: the task restores the consumer after every
        // loss, and amqprs runs the consumer channel's dispatcher where the channel opens (in this
        // task). On a runtime that shuts down (a `block_on` helper that subscribed), both would end
        // with it, and the stream, read elsewhere, would wait for ever.
        let task = inner
            .runtime
            .spawn(consumer::run(shared.clone(), ready_sender));
        // Closes the subscription on every way out but the one that hands it to the caller,
        // including this future being dropped while it waits for the consumer.
        let unclaimed = Unclaimed(Some(shared));
        {
            let mut tasks = inner.tasks.lock().expect("tasks lock");
            tasks.retain(|task| !task.is_finished());
            tasks.push(task);
        }
        // A close that began after the check above may have listed the subscriptions and tasks
        // before this one was added: then it is closed here (by `unclaimed`), not left running
        // through the close. (A close that begins later lists it: it is registered already.)
        if inner.is_closing() {
            return Err(Inner::closed_error());
        }
        let bound = settings.publish_outage_timeout
            + settings.operation_timeout * (5 + bindings.len() as u32);
        match tokio::time::timeout(bound, ready).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => return Err(error),
            // Stopped by a close that began after the check above.
            Ok(Err(_)) if inner.is_closing() => return Err(Inner::closed_error()),
            // The task never ran, or did not finish: on the router's runtime, which a router kept
            // past the runtime it connected on (a `block_on` helper, a test's) no longer has.
            Ok(Err(_)) => {
                return Err(inner.backend_error(
                    "the subscription's task ended before its consumer was live: it panicked, or \
                     the runtime the router connected on has shut down (the router's connections \
                     and tasks run there: keep that runtime running while the router is used, or \
                     connect the router on the runtime that uses it)",
                ));
            }
            Err(_) => {
                return Err(Error::Timeout {
                    operation: format!("the consumer on queue '{name}' to start"),
                    after: bound,
                });
            }
        }
        let Some(shared) = unclaimed.claim() else {
            return Err(inner.backend_error("the subscription went missing"));
        };
        tracing::info!(queue = %name, bindings = ?bindings, prefetch, "subscribed");
        let control = Arc::new(Control(shared.clone()));
        Ok(Subscription::from_stream(
            DeliveryStream::new(shared),
            control,
            &options,
        ))
    }

    /// The subscriptions not finished yet: open ones, and closed ones still waiting for their
    /// handlers or their reader (what they hold counts in health until they let go of it).
    fn unfinished_subscriptions(&self) -> Vec<Arc<SubShared>> {
        self.inner
            .subscriptions
            .lock()
            .expect("subscriptions lock")
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|sub| !sub.is_finished())
            .collect()
    }

    /// A passive declaration of the exchange, timed. The call answers within 2 s or the operation
    /// timeout, whichever is shorter, counted from the call: the wait for the declaration channel
    /// (held by another request, or by other health calls, one after the other, while the broker is
    /// silent), opening it, and the request. Bounded only per step, a health call waited for every
    /// request queued before it, an opening (the operation timeout) and its own request (2 s).
    ///
    /// The call's deadline bounds the wait, not the work: the probe runs on a task of its own, which
    /// gives up waiting for the channel at that deadline, but finishes what it began on the channel:
    /// an opening goes on (up to the operation timeout) and the channel is kept, and a request begun
    /// before the deadline has the whole limit for its answer. Given only what was left of the
    /// call's time, a request queued behind another timed out on a slow link and retired a good
    /// channel, and once opening and asking took longer than the limit, every probe did so. A
    /// request that does time out still retires the channel (its reply is still to come, see
    /// `with_op_channel`).
    ///
    /// A call whose time ran out tells a silent RabbitMQ from a busy channel: its probe held the
    /// channel at once and nothing it asked was answered ([`Probe::Unanswered`]), or it waited for
    /// the channel and tells nothing ([`Probe::GaveUp`]). The probe's task leaves what it found in
    /// `probe_unanswered` for the calls after it (see [`probe_problem`](Self::probe_problem)).
    async fn round_trip(&self) -> Probe {
        const PROBE_LIMIT: Duration = Duration::from_secs(2);
        let limit = PROBE_LIMIT.min(self.inner.settings.operation_timeout);
        let deadline = Instant::now() + limit;
        let inner = self.inner.clone();
        let watch = Arc::new(ProbeWatch::default());
        let watching = watch.clone();
        let probe = self.inner.runtime.spawn(async move {
            let wait = Wait::Not("the health probe does not wait for a reconnect");
            let (inner, watch) = (&inner, &*watching);
            let asked = Instant::now();
            let result = inner
                .with_op_channel_queued_until(
                    wait,
                    Some(deadline),
                    Some(watch),
                    async |op: &OpChannel| {
                        if Instant::now() >= deadline {
                            // The caller is gone (the opening took its time): ask nothing, and
                            // keep the channel.
                            return Ok(None);
                        }
                        let started = Instant::now();
                        let mut passive =
                            ExchangeDeclareArguments::new(&inner.settings.exchange, "topic");
                        passive.passive(true);
                        let answer =
                            inner
                                .operation_within(
                                    limit,
                                    "the health probe",
                                    &op.reason,
                                    &op.channel,
                                    move |channel| async move {
                                        channel.exchange_declare(passive).await
                                    },
                                )
                                .await;
                        // A refusal (the exchange is gone) is an answer too.
                        if !matches!(answer, Err(Error::Timeout { .. })) {
                            watch.answered.store(true, Ordering::Release);
                        }
                        answer.map(|()| Some(started.elapsed()))
                    },
                )
                .await;
            // What the next health calls go by: RabbitMQ answered this probe, or left it unanswered
            // for the whole limit (its opening, bounded by the operation timeout, or its request).
            // A probe that never got the channel (busy with the requests before it) tells nothing.
            let mut unanswered = inner.probe_unanswered.lock().expect("probe lock");
            if watch.answered.load(Ordering::Acquire) {
                *unanswered = None;
            } else if watch.held.load(Ordering::Acquire)
                && matches!(result, Err(Error::Timeout { .. }))
            {
                *unanswered = Some(Unanswered {
                    generation: watch.generation.load(Ordering::Acquire),
                    asked,
                    limit,
                });
            }
            drop(unanswered);
            result
        });
        match tokio::time::timeout_at(deadline, probe).await {
            Ok(Ok(Ok(Some(round_trip)))) => Probe::Answered(round_trip),
            Ok(Ok(Err(error))) if !matches!(error, Error::Timeout { .. }) => Probe::Failed(error),
            Ok(Err(error)) => Probe::Failed(
                self.inner
                    .backend_error(format!("the health probe's task ended early: {error}")),
            ),
            // The call's time is up (the probe's own timeouts end with it: waiting for the channel
            // at the same deadline, its request at the same limit from a moment later). RabbitMQ
            // owed an answer for all of it only if the probe held the channel at once, and nothing
            // it asked was answered since; a probe that waited for the channel (busy with other
            // requests, or with other probes) asked late, or not at all. So did one whose task ran
            // late (the runtime's threads busy: a blocking handler, a starved machine): it held a
            // free channel at once, but with less than half the call's time left, or none (then it
            // asked nothing), and tells nothing of RabbitMQ either.
            Ok(Ok(Ok(None) | Err(_))) | Err(_) => {
                let held_early = watch
                    .held_at
                    .get()
                    .is_some_and(|at| deadline.saturating_duration_since(*at) >= limit / 2);
                if held_early
                    && !watch.waited.load(Ordering::Acquire)
                    && !watch.answered.load(Ordering::Acquire)
                {
                    Probe::Unanswered(limit)
                } else {
                    Probe::GaveUp
                }
            }
        }
    }

    /// The health problem of a probe RabbitMQ did not answer within its limit: this call's own, or
    /// the last one's on the live consuming connection when no probe was answered since.
    fn probe_problem(&self, probe: &Probe) -> Option<String> {
        let stalled = "the broker or the network to it may be stalled (a connection silent for two \
                       heartbeats is taken as lost, and reconnected), or this process too busy to \
                       read the answer in time (its runtime's threads blocked)";
        if let Probe::Unanswered(limit) = probe {
            return Some(format!(
                "RabbitMQ did not answer the health probe within {limit:?}: {stalled}"
            ));
        }
        if matches!(probe, Probe::Answered(_)) {
            return None;
        }
        let last = (*self.inner.probe_unanswered.lock().expect("probe lock"))?;
        let live = self.inner.consuming.connected.load(Ordering::Acquire);
        (live == last.generation).then(|| {
            format!(
                "RabbitMQ did not answer the health probe asked {:.1?} ago within {:?}, and has \
                 answered none since: {stalled}",
                last.asked.elapsed(),
                last.limit
            )
        })
    }

    /// What is wrong with one connection, if anything: its status and a sentence.
    fn link_problem(&self, link: &Link) -> Option<(HealthStatus, String)> {
        let inner = &self.inner;
        let role = link.role.as_str();
        match &*link.state.borrow() {
            LinkState::Closed => Some((HealthStatus::Unhealthy, "closed".to_string())),
            LinkState::Connecting {
                attempt,
                last_error,
                since,
                ..
            } => {
                let down = since.elapsed();
                let status = if down > inner.settings.publish_outage_timeout {
                    HealthStatus::Unhealthy
                } else {
                    HealthStatus::Degraded
                };
                // The advice is added only to a loss, which names neither the URL nor what to
                // check. A failed attempt's error says what to check itself: whether RabbitMQ runs
                // for one that could not reach it, something else for one that it refused (the
                // login, a declaration) or did not answer in time.
                let url = &inner.settings.url.redacted;
                let advice = if **last_error == *link::LOST {
                    format!("; check that RabbitMQ at {url} is running")
                } else {
                    String::new()
                };
                Some((
                    status,
                    format!(
                        "the {role} connection is down for {down:.1?}, reconnecting (attempt {attempt}; last error: {last_error}){advice}"
                    ),
                ))
            }
            LinkState::Connected(live) if !live.connection.is_open() => Some((
                HealthStatus::Degraded,
                format!("the {role} connection was just lost; reconnecting"),
            )),
            LinkState::Connected(_) => {
                let blocked = link.blocked.lock().expect("blocked lock").clone();
                blocked.map(|reason| {
                    (
                        HealthStatus::Degraded,
                        format!(
                            "RabbitMQ blocks the {role} connection ({reason}): free memory or disk on the broker"
                        ),
                    )
                })
            }
        }
    }

    async fn health_now(&self) -> Health {
        let inner = &self.inner;
        let subscriptions = self.unfinished_subscriptions();
        let open = subscriptions.iter().filter(|sub| !sub.is_closed()).count();
        let unconfirmed = inner.unconfirmed();
        let connected = self.is_connected();
        let mut problems: Vec<(HealthStatus, String)> = if inner.supervisors_gone() {
            // Both connections still read as connected: their state is what it was when the
            // runtime ended.
            vec![(
                HealthStatus::Unhealthy,
                "the runtime the router connected on has shut down, and the connections, which \
                 ran there, ended with it; nothing reconnects them (keep that runtime running while \
                 the router is used, or connect the router on the runtime that uses it)"
                    .to_string(),
            )]
        } else {
            [&inner.publishing, &inner.consuming]
                .into_iter()
                .filter_map(|link| self.link_problem(link))
                .collect()
        };
        // A subscription whose lost consumer cannot be restored consumes nothing while both
        // connections are up: its messages pile up in its queue.
        let mut without_consumer = 0u64;
        for sub in subscriptions.iter().filter(|sub| !sub.is_closed()) {
            if let Some((times, error)) = sub.restore_failures() {
                without_consumer += 1;
                let failed = if times == 1 {
                    "once".to_string()
                } else {
                    format!("{times} times in a row")
                };
                problems.push((
                    HealthStatus::Degraded,
                    format!(
                        "the consumer of queue '{}' was lost and restoring it failed {failed} (last error: {error}); it is tried again with backoff, and messages wait in the queue meanwhile",
                        sub.spec.name
                    ),
                ));
            }
        }
        let blocked = [&inner.publishing, &inner.consuming]
            .iter()
            .any(|link| link.blocked.lock().expect("blocked lock").is_some());
        let (status, detail) = if problems.iter().all(|(_, detail)| detail == "closed")
            && !problems.is_empty()
        {
            (HealthStatus::Unhealthy, "closed".to_string())
        } else if problems.is_empty() {
            (HealthStatus::Healthy, "ok".to_string())
        } else {
            let status = problems
                .iter()
                .map(|(status, _)| *status)
                .max()
                .unwrap_or(HealthStatus::Degraded);
            let detail: Vec<&str> = problems.iter().map(|(_, detail)| detail.as_str()).collect();
            (status, detail.join("; "))
        };
        let counters = &inner.counters;
        let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        let mut health = Health::new(BACKEND, status)
            .connected(connected)
            .detail(detail)
            .counter("unconfirmed", unconfirmed)
            .counter("published", load(&counters.published))
            .counter("confirmed", load(&counters.confirmed))
            .counter("publish_nacks", load(&counters.publish_nacks))
            .counter("unroutable", load(&counters.unroutable))
            .counter("returned", load(&counters.returned))
            .counter("resent", load(&counters.resent))
            .counter("confirm_timeouts", load(&counters.confirm_timeouts))
            .counter(
                "abandoned_unconfirmed",
                load(&counters.abandoned_unconfirmed),
            )
            .counter("publish_failures", load(&counters.publish_failures))
            .counter("connection_losses", load(&counters.connection_losses))
            .counter("channel_id_recycles", load(&counters.channel_id_recycles))
            .counter("reconnects", load(&counters.reconnects))
            .counter("connect_failures", load(&counters.connect_failures))
            .counter("delivered", load(&counters.delivered))
            .counter("acked", load(&counters.acked))
            .counter("requeued", load(&counters.requeued))
            .counter("retried", load(&counters.retried))
            .counter("retries_undelayed", load(&counters.retries_undelayed))
            .counter("copies_unconfirmed", load(&counters.copies_unconfirmed))
            .counter(
                "copies_confirmed_late",
                load(&counters.copies_confirmed_late),
            )
            .counter(
                "held_for_late_confirm",
                load(&counters.held_for_late_confirm),
            )
            .counter("abandoned", load(&counters.abandoned))
            .counter("settle_failures", load(&counters.settle_failures))
            .counter("stale", load(&counters.stale))
            .counter("stale_discarded", load(&counters.stale_discarded))
            .counter("malformed", load(&counters.malformed))
            .counter("consumers_restored", load(&counters.consumers_restored))
            .counter("consumer_failures", load(&counters.consumer_failures))
            .counter("consumers_not_restored", without_consumer)
            .counter("fan_out_queues_lost", load(&counters.fan_out_queues_lost))
            .counter("retries_dropped", load(&counters.retries_dropped))
            .counter("fan_out_dropped", load(&counters.fan_out_dropped))
            .counter("subscriptions", open as u64)
            .counter(
                "in_flight",
                subscriptions.iter().map(|sub| sub.in_hand()).sum::<u64>(),
            )
            .counter(
                "buffered",
                subscriptions
                    .iter()
                    .map(|sub| sub.buffered() as u64)
                    .sum::<u64>(),
            )
            .counter("blocked", u64::from(blocked));
        if connected {
            let probe = self.round_trip().await;
            match &probe {
                Probe::Answered(round_trip) => health = health.round_trip(*round_trip),
                // Someone deleted the exchange, and with it every binding to it: publishes are
                // unroutable until it is declared and the queues bound again.
                Probe::Failed(Error::Backend { message, .. }) if message.contains("NOT_FOUND") => {
                    inner.repair_topology();
                    let gone = format!(
                        "RabbitMQ says the exchange '{}' does not exist (deleted?): declaring it and binding the subscriptions' queues again",
                        inner.settings.exchange
                    );
                    degrade(&mut health, gone);
                }
                Probe::Failed(_) | Probe::Unanswered(_) | Probe::GaveUp => {}
            }
            if let Some(silent) = self.probe_problem(&probe) {
                degrade(&mut health, silent);
            }
        }
        health
    }

    /// Closes, and returns once closed; see [`close_in_background`](Self::close_in_background).
    ///
    /// The close runs on a task of its own: one cut short (a shutdown under a timeout, a second
    /// signal in a `select!`) still finishes, and every call, first or later, waits for that same
    /// end. Bounded by what the close itself is bounded by.
    ///
    /// That task runs on the router's runtime, not the caller's: a close cut short on a runtime that
    /// then ends (a `block_on` helper under a timeout) would be dropped half done, the router left
    /// closing for ever with its connections open, and every later close failing at once. When the
    /// router's runtime is gone, or shuts down before the task runs (it is dropped unrun, and nothing
    /// reports an end), the close runs on the caller's.
    async fn close_now(&self) -> Result<()> {
        let inner = &self.inner;
        let mut closed = inner.closed.subscribe();
        if !inner.closing.swap(true, Ordering::AcqRel) {
            let task = inner.runtime.spawn(self.clone().close_task());
            let router = self.clone();
            tokio::spawn(async move {
                if task.await.is_err() && router.inner.closed.borrow().is_none() {
                    router.close_task().await;
                }
            });
        }
        let settings = &inner.settings;
        // Above the sum of the close's own bounded steps (subscriptions closing, their tasks, the
        // publishes, the channels and connections), so that a close still within them is not
        // reported as timed out.
        let bound = settings.close_timeout * 3 + settings.operation_timeout * 30;
        let ended = tokio::time::timeout(bound, closed.wait_for(Option::is_some))
            .await
            .map(|ended| ended.map(|ended| *ended));
        match ended {
            Ok(Ok(Some(true))) => Ok(()),
            Ok(_) => Err(self.inner.backend_error(
                "the router's close ended before it finished (its task panicked or its runtime shut \
                 down); its connections may still be open",
            )),
            Err(_) => Err(Error::Timeout {
                operation: "the RabbitMQ router to close (it goes on closing in the background)"
                    .into(),
                after: bound,
            }),
        }
    }

    /// The task of [`close_now`](Self::close_now).
    async fn close_task(self) {
        // However the task ends, a close waiting for it is let go, and told how it ended.
        let _closed = ClosedOnDrop(&self.inner.closed);
        self.close_in_background().await;
        self.inner.closed.send_replace(Some(true));
    }

    /// Closes in two phases: new subscriptions are refused at once (`closing`, set by the caller),
    /// while publishes stay allowed until every subscription has drained, so that a handler
    /// finishing its message during the drain can still publish its reply; then publishes are
    /// refused, the ones under way are awaited, and the connections close.
    async fn close_in_background(&self) {
        let inner = &self.inner;
        let settings = &inner.settings;
        tracing::info!(url = %settings.url.redacted, "closing the RabbitMQ router");
        let subscriptions: Vec<Arc<SubShared>> = inner
            .subscriptions
            .lock()
            .expect("subscriptions lock")
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        // Subscriptions closed earlier and still draining now wait only for what is in hand.
        for sub in &subscriptions {
            sub.feed_changed.notify_waiters();
        }
        futures::future::join_all(subscriptions.iter().map(|sub| sub.close())).await;
        // Each subscription's task lets its handlers settle (up to the close timeout), closes its
        // channel and deletes its fan-out queue.
        let tasks = std::mem::take(&mut *inner.tasks.lock().expect("tasks lock"));
        let bound = settings.close_timeout + settings.operation_timeout * 2;
        if tokio::time::timeout(bound, futures::future::join_all(tasks))
            .await
            .is_err()
        {
            tracing::warn!("some subscriptions did not finish closing in time");
        }
        inner.publishing_closed.store(true, Ordering::Release);
        let deadline = Instant::now() + settings.close_timeout;
        let left = inner.publishes_finished(deadline).await;
        if left > 0 {
            tracing::warn!(
                publishes = left,
                "closing with publishes still waiting for their confirm; their callers get an error"
            );
        }
        // Publishes whose callers stopped waiting once their frame went out are owed a confirm
        // too (same bound): those still unconfirmed then are counted and logged as the channel
        // closes (`abandoned_unconfirmed`).
        let publisher = inner.publisher.lock().expect("publisher lock").clone();
        if let Some(publisher) = publisher {
            publisher.confirms.owed_until(deadline).await;
        }
        inner.stop.send_replace(true);
        let publisher = inner.publisher.lock().expect("publisher lock").take();
        let topology = inner.topology.lock().await.take();
        let [publishing, consuming] = [&inner.publishing, &inner.consuming].map(|link| {
            let previous = link.state.send_replace(LinkState::Closed);
            link.connected.store(0, Ordering::Release);
            match previous {
                LinkState::Connected(live) => Some(live),
                _ => None,
            }
        });
        // The two connections close side by side, each with its channel first, within one
        // operation timeout in all: one after the other, each step with a timeout of its own, a
        // broker that answered nothing (a black hole, a stalled network) held close for four of them
        // (40 s with the defaults) on top of the subscriptions' own. What does not finish in time
        // goes on in the background (every step runs on a task of its own).
        let deadline = Instant::now() + settings.operation_timeout;
        let publishing = async {
            if let Some(publisher) = publisher {
                let _ = tokio::time::timeout_at(deadline, publisher.close(inner)).await;
            }
            if let Some(live) = publishing {
                inner.close_connection_by(&live.connection, deadline).await;
            }
        };
        let consuming = async {
            if let Some(op) = topology {
                let _ = tokio::time::timeout_at(deadline, inner.close_channel(op.channel)).await;
            }
            if let Some(live) = consuming {
                inner.close_connection_by(&live.connection, deadline).await;
            }
        };
        futures::future::join(publishing, consuming).await;
        tracing::info!(url = %settings.url.redacted, "RabbitMQ router closed");
    }
}

/// How a health call's probe ended, when the call stopped waiting for it.
enum Probe {
    /// RabbitMQ answered, after this long.
    Answered(Duration),
    /// It failed (RabbitMQ refused it, the channel was lost, its task ended).
    Failed(Error),
    /// It held the declaration channel from the start and RabbitMQ answered nothing it asked
    /// within the limit.
    Unanswered(Duration),
    /// The call's time ran out while it waited for the channel, busy with other requests, or
    /// after it asked late because of that wait: it tells nothing of RabbitMQ.
    GaveUp,
}

/// Makes `health` at least degraded, adding `problem` to its detail.
fn degrade(health: &mut Health, problem: String) {
    health.status = health.status.max(HealthStatus::Degraded);
    health.detail = if health.detail == "ok" {
        problem
    } else {
        format!("{}; {problem}", health.detail)
    };
}

/// Lets the router's closes go when dropped: as ended before finishing, unless the close task said
/// it finished.
struct ClosedOnDrop<'a>(&'a tokio::sync::watch::Sender<Option<bool>>);

impl Drop for ClosedOnDrop<'_> {
    fn drop(&mut self) {
        self.0.send_if_modified(|ended| {
            if ended.is_some() {
                return false;
            }
            *ended = Some(false);
            true
        });
    }
}

/// A subscription being made, closed when dropped unless [`claim`](Self::claim)ed (see
/// `SubShared::unclaimed`).
struct Unclaimed(Option<Arc<SubShared>>);

impl Unclaimed {
    fn claim(mut self) -> Option<Arc<SubShared>> {
        self.0.take()
    }
}

impl Drop for Unclaimed {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            shared.unclaimed();
        }
    }
}

impl Router for AmqpRouter {
    fn backend(&self) -> &str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::none()
            .persistent(true)
            .ordered_per_channel(true)
            .consumer_groups(true)
            .redelivery(true)
            .publish_confirms(true)
            .reports_unroutable(true)
    }

    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, Result<PublishOutcome>> {
        Box::pin(self.publish_one(envelope))
    }

    fn publish_batch(
        &self,
        envelopes: Vec<Envelope>,
    ) -> BoxFuture<'_, Vec<Result<PublishOutcome>>> {
        use futures::StreamExt;
        Box::pin(
            futures::stream::iter(envelopes)
                .map(|envelope| self.publish_one(envelope))
                .buffered(BATCH_IN_FLIGHT)
                .collect(),
        )
    }

    fn subscribe(&self, options: SubscribeOptions) -> BoxFuture<'_, Result<Subscription>> {
        Box::pin(self.subscribe_now(options))
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        Box::pin(self.health_now())
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.close_now())
    }
}
