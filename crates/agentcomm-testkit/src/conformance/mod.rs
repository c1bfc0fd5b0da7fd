//! The conformance suite: what every backend must do, scenario by scenario.
//!
//! A backend crate implements [`ConformanceBackend`] (how to open a new connection to its broker, and
//! which guarantees it claims) and expands [`conformance_tests!`](crate::conformance_tests) in a test
//! file. That gives one named test per [`Scenario`], so the backend's test output lists each:
//!
//! ```no_run
//! // crates/agentcomm-mybroker/tests/conformance.rs
//! use agentcomm_core::router::{BoxFuture, Capabilities, SharedRouter};
//! use agentcomm_testkit::conformance::ConformanceBackend;
//!
//! struct MyBroker;
//!
//! impl ConformanceBackend for MyBroker {
//!     fn name(&self) -> &str {
//!         "mybroker"
//!     }
//!     fn declared_capabilities(&self) -> Capabilities {
//!         Capabilities::none().consumer_groups(true).redelivery(true)
//!     }
//!     fn connect(&self) -> BoxFuture<'_, Option<SharedRouter>> {
//!         Box::pin(async {
//!             // Connect to the broker; `None` when it is not running (the scenario is then skipped,
//!             // or fails when AGENTCOMM_REQUIRE_BROKERS=1).
//!             None
//!         })
//!     }
//! }
//!
//! agentcomm_testkit::conformance_tests!(MyBroker);
//! ```
//!
//! Each scenario uses its own channels, sessions and group names (made unique with a random run id),
//! never subscribes to `*:*:*`, and bounds every wait, so the scenarios of one or several backends can
//! run at once against one shared broker. A scenario whose guarantee the backend does not claim prints
//! `not applicable: <why>` and passes; a failure says what was lost, duplicated or reordered, e.g.
//! `subscriber 2: lost 3 of 5000 (first lost: publisher 7 seq 12), duplicated 0, reordered 0 within 30s`.
//!
//! Sizes are those of Watermill's universal tests (50 publishers and 5,000 messages, 1,000 messages
//! over 16 sessions, 10,000 messages before a publisher closes, ...) times `AGENTCOMM_SOAK`
//! (default 1) for a longer soak run.

mod agents;
mod scenarios;
mod support;

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use agentcomm_core::channel::Channel;
use agentcomm_core::error::Result;
use agentcomm_core::router::{BoxFuture, Capabilities, SharedRouter};

use crate::env::{REQUIRE_BROKERS_VAR, require_brokers, soak_factor};

/// A backend under test: how the suite opens connections to its broker, and what it claims.
pub trait ConformanceBackend: Send + Sync + 'static {
    /// The backend's name in the suite's output (`memory`, `redis-streams`, ...).
    fn name(&self) -> &str;

    /// The guarantees the backend claims. The suite checks that every connection reports exactly
    /// these ([`Router::capabilities`](agentcomm_core::Router::capabilities)), and runs the scenarios
    /// that test each one.
    fn declared_capabilities(&self) -> Capabilities;

    /// A **new** connection to the same broker (scenarios open several and close them independently).
    /// `None` when the broker cannot be reached: the scenario prints one `skipped: ...` line
    /// ([`unreachable`](Self::unreachable)) and passes, or fails when `AGENTCOMM_REQUIRE_BROKERS=1`.
    /// A `None` after a connection of the same scenario succeeded fails the scenario.
    fn connect(&self) -> BoxFuture<'_, Option<SharedRouter>>;

    /// The sentence printed after `skipped: ` when [`connect`](Self::connect) gives `None`, e.g.
    /// `no Redis at redis://127.0.0.1:6379` (never with a password in it).
    fn unreachable(&self) -> String {
        format!("the {} broker is unreachable", self.name())
    }

    /// How long a scenario waits for a message before it counts it as lost (times `AGENTCOMM_SOAK`).
    /// 30 s by default: generous for a broker on a loaded machine. Every wait of the suite is bounded
    /// by it, and waits that overlap share one such window.
    fn max_wait(&self) -> Duration {
        Duration::from_secs(30)
    }

    /// Puts raw bytes on `channel` as if a foreign client had published them, for the malformed-frame
    /// scenario. `Ok(false)` (the default) means the backend cannot do this, and that scenario does not
    /// apply.
    fn publish_raw(&self, channel: &Channel, frame: Vec<u8>) -> BoxFuture<'_, Result<bool>> {
        let _ = (channel, frame);
        Box::pin(async { Ok(false) })
    }

    /// How long a scenario keeps listening after the messages it expects arrived, for late
    /// duplicates and leaks (times `AGENTCOMM_SOAK`). 200 ms by default, which suits a backend that
    /// delivers at once. A duplicate that arrives later than this cannot fail a scenario: for the
    /// duplicate checks to mean something on a broker, make it at least the time your backend takes
    /// to deliver an unacknowledged message again (a claim idle time, a redelivery delay), at the
    /// cost of that much time per scenario.
    fn settle_time(&self) -> Duration {
        Duration::from_millis(200)
    }

    /// The longest one scenario may run before it fails (times `AGENTCOMM_SOAK`): by default 120 s,
    /// or 4 × [`max_wait`](Self::max_wait) when that is longer. A scenario that runs out of it fails
    /// with what it was doing and what its subscribers had received.
    fn scenario_limit(&self) -> Duration {
        SCENARIO_LIMIT.max(self.max_wait() * 4)
    }

    /// The broker's own address, on loopback, for the checks that put the fault proxy
    /// ([`crate::proxy::FaultProxy`]) between a connection and the broker. `None` (the default)
    /// leaves those checks out (the scenario says so in its summary).
    fn broker_address(&self) -> Option<SocketAddr> {
        None
    }

    /// A **new** connection to the broker made through `address` (the fault proxy's) instead of
    /// [`broker_address`](Self::broker_address), otherwise configured like [`connect`](Self::connect).
    /// `None` (the default) when the backend cannot.
    fn connect_through(&self, address: SocketAddr) -> BoxFuture<'_, Option<SharedRouter>> {
        let _ = address;
        Box::pin(async { None })
    }
}

// `$d` is a `$` passed in, so that the generated `macro_rules!` can have metavariables of its own.
macro_rules! scenarios {
    (($d:tt) $( $(#[doc = $doc:literal])* $variant:ident => $name:ident, )*) => {
        /// One scenario of the suite. Each is one test named after it (see [`Scenario::name`]).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Scenario {
            $( $(#[doc = $doc])* $variant, )*
        }

        impl Scenario {
            /// Every scenario, in the order the suite lists them.
            pub const ALL: &'static [Scenario] = &[$(Scenario::$variant),*];

            /// The test name: `concurrent_publishers_lose_nothing`, ...
            pub fn name(self) -> &'static str {
                match self {
                    $(Scenario::$variant => stringify!($name),)*
                }
            }
        }

        /// Expands to one `#[test]` per scenario of the conformance suite, each running
        /// [`conformance::run`](crate::conformance::run) on a fresh `$backend` (the expression is
        /// evaluated inside each test's Tokio runtime: multi-threaded, 2 workers).
        ///
        /// `conformance_tests!(MyBackend::new());` at the top of a test file; to run several backends
        /// from one file, give each a module: `conformance_tests!(mod streams, MyBackend::streams());`.
        #[macro_export]
        macro_rules! conformance_tests {
            (mod $d module:ident, $d backend:expr $d(,)?) => {
                mod $d module {
                    #[allow(unused_imports)]
                    use super::*;
                    $d crate::conformance_tests!($d backend);
                }
            };
            ($d backend:expr $d(,)?) => {
                $(
                    #[test]
                    fn $name() {
                        $d crate::conformance::run_blocking(
                            $d crate::conformance::Scenario::$variant,
                            || $d backend,
                        );
                    }
                )*
            };
        }
    };
}

scenarios! {
    ($)
    /// Every connection reports the declared capabilities and a healthy, connected state.
    DeclaredCapabilities => declared_capabilities_match_the_router,
    /// 100 messages with every envelope field and header set arrive equal to what was sent.
    EnvelopeFields => publish_subscribe_keeps_every_envelope_field,
    /// Patterns with wildcards in every position, and several patterns in one subscription, get exactly
    /// the channels [`ChannelPattern::matches`](agentcomm_core::ChannelPattern::matches) says, once each
    /// (also where several patterns match, whether or not `no_duplicates` is claimed);
    /// groups with a wildcard class get the messages of classes created after they subscribed, once.
    PatternSubscriptions => pattern_subscriptions_match_by_component,
    /// A message type with its own channel template is routed by its rendered name like a default one.
    CustomTemplates => custom_channel_templates_route_like_default_ones,
    /// An exact subscription gets nothing from other sessions, directions or classes, including
    /// look-alike names built from glob and topic special characters.
    Isolation => channels_and_classes_are_isolated,
    /// 50 publishers, 5,000 messages, 5 subscribers: none lost, none duplicated where promised, each
    /// publisher's order kept where promised.
    ConcurrentPublishers => concurrent_publishers_lose_nothing,
    /// 64 channels with their own subscriptions, published at once: each gets exactly its own.
    ManyChannels => many_channels_at_once,
    /// 1,000 messages over 16 sessions arrive in order per session (backends that promise order).
    OrderPerChannel => order_is_kept_per_channel,
    /// A nacked (retry, requeue) or abandoned delivery comes back, with the attempt count and the retry
    /// delay respected, to the subscription that gave it back only (the channel's other subscriptions
    /// get each message once), and an acknowledged one does not (backends with redelivery).
    NackRedelivery => nack_then_redelivery,
    /// Through the runtime: a handler that always fails is tried `max_attempts` times, then its message
    /// is dead-lettered with the reason, attempts, agent and original id (backends with redelivery).
    DeadLetterAfterMaxAttempts => max_attempts_then_dead_letter,
    /// A consumer group shares the work between its members while fan-out subscribers each get every
    /// message (backends with consumer groups).
    GroupSplitsWork => consumer_group_splits_work_while_fan_out_subscribers_each_get_a_copy,
    /// Two consumer groups on the same channel each get every message (backends with consumer groups).
    TwoGroups => two_groups_each_get_everything,
    /// A group member's connection closes while messages are in flight: another member gets every
    /// message that was not acknowledged (persistent backends with consumer groups).
    CloseWhileInFlight => close_while_messages_are_in_flight_loses_nothing,
    /// Subscribe, receive, close, resubscribe, 20 times: each round gets its message and only it, and
    /// each closed subscription's stream ends.
    ResubscribeLoops => subscribe_close_resubscribe_loops,
    /// A publisher that closes right after 10,000 confirmed publishes loses none of them.
    PublisherClose => publisher_closing_after_10000_messages_loses_none,
    /// 1 MiB payloads arrive byte for byte.
    LargePayloads => one_mebibyte_payloads_arrive_intact,
    /// A batch of 500 gives one result per message and delivers them all (in order where promised); an
    /// empty batch gives no results.
    BatchPublish => batch_publish_delivers_every_message,
    /// Through the runtime: undecodable and invalid payloads are dead-lettered with their reason, and the
    /// agent goes on handling the messages after them.
    MalformedPayloads => malformed_payloads_are_dead_lettered_without_stopping_the_subscriber,
    /// Undecodable bytes on a channel are dead-lettered to `DeadLetter:agentcomm.Malformed:unknown` and
    /// the subscription goes on (backends that can inject raw frames, see
    /// [`ConformanceBackend::publish_raw`]).
    MalformedFrames => malformed_frames_are_dead_lettered_without_stopping_the_subscriber,
    /// Through the runtime: stopping an agent waits for its running handler, which finishes and
    /// acknowledges its message.
    GracefulShutdown => graceful_shutdown_waits_for_in_flight_handlers,
    /// Through the runtime: concurrent requests each get their own reply, also when the reply type has
    /// a channel template of its own.
    RequestReply => request_reply_round_trips,
    /// Through the runtime: a request nobody receives fails at once where the backend reports
    /// unroutable messages (otherwise its timeout names its class); one its agent dead-letters fails at
    /// once with the agent's error; requests cancelled while handled leave nothing waiting and their
    /// late replies are counted; a group of two members answers each request once.
    RequestFailures => request_failures_are_told_and_cancelled_requests_leave_nothing,
    /// Through the runtime and the fault proxy: after the requester's connection is cut, its requests
    /// get their replies again once it is back (backends that offer
    /// [`ConformanceBackend::broker_address`]).
    RequestsAcrossACut => requests_get_replies_again_after_a_cut,
    /// Messages published while no consumer is connected reach the group's consumer when it connects
    /// (persistent backends with consumer groups).
    PersistentWithoutConsumer => messages_published_without_a_consumer_wait_for_one,
    /// A publish that no subscription matches is reported as unroutable, and one that some subscription
    /// matches is not (backends that report unroutable messages).
    Unroutable => unroutable_messages_are_reported,
    /// Closing a connection ends its subscriptions' streams, refuses further operations with
    /// `Error::Closed`, and leaves other connections working.
    CloseRefusesFurtherUse => close_ends_subscriptions_and_refuses_further_operations,
    /// A second `close()` called while the first waits for a held delivery returns only once the
    /// connection is closed; a `close()` cut short after it began (a shutdown under a timeout) is
    /// finished by closing again: publish then fails with `Error::Closed`, and (through the fault
    /// proxy) no connection to the broker is left open.
    CloseTwiceOrCutShort => a_close_called_twice_or_cut_short_still_closes,
    /// A publish resolves only once the broker has the message: a message whose publish resolved
    /// reaches its subscriber even when the publisher's connection closes or is cut right after;
    /// through the fault proxy, a publish whose bytes are held back does not resolve `Ok` (backends
    /// that claim publish_confirms).
    PublishConfirms => publish_resolves_only_once_the_broker_has_the_message,
}

impl Scenario {
    /// Why the scenario does not apply to a backend with these capabilities, or `None` when it does.
    pub fn not_applicable(self, capabilities: &Capabilities) -> Option<&'static str> {
        let c = capabilities;
        match self {
            Scenario::OrderPerChannel if !c.ordered_per_channel => {
                Some("the backend does not claim ordered_per_channel")
            }
            Scenario::NackRedelivery | Scenario::DeadLetterAfterMaxAttempts if !c.redelivery => {
                Some("the backend does not claim redelivery")
            }
            Scenario::GroupSplitsWork | Scenario::TwoGroups if !c.consumer_groups => {
                Some("the backend does not claim consumer_groups")
            }
            // Claiming persistent without consumer_groups runs them too, and they fail: see there.
            Scenario::CloseWhileInFlight | Scenario::PersistentWithoutConsumer if !c.persistent => {
                Some("the backend does not claim persistent")
            }
            Scenario::PublishConfirms if !c.publish_confirms => {
                Some("the backend does not claim publish_confirms")
            }
            Scenario::Unroutable if !c.reports_unroutable => {
                Some("the backend does not claim reports_unroutable")
            }
            _ => None,
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What running one scenario gave.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ScenarioOutcome {
    /// It passed; the summary counts what was checked.
    Passed {
        /// What was published and received, and the counts of lost, duplicated, reordered.
        summary: String,
        /// How long it took.
        duration: Duration,
    },
    /// The backend does not claim what the scenario tests.
    NotApplicable(String),
    /// The broker could not be reached (and brokers are not required).
    Skipped(String),
    /// It failed; the text says what was expected and what happened.
    Failed(String),
}

/// The longest one scenario may run before it fails, at soak factor 1 (or 4 × `max_wait`, if longer).
const SCENARIO_LIMIT: Duration = Duration::from_secs(120);

/// Runs one scenario and prints its outcome line (`ok: ...`, `not applicable: ...`, `skipped: ...`);
/// panics with the explanation when it fails. The macro's tests call this.
pub async fn run<B: ConformanceBackend + ?Sized>(scenario: Scenario, backend: &B) {
    let name = backend.name().to_string();
    match try_run(scenario, backend).await {
        ScenarioOutcome::Passed { summary, duration } => {
            println!("ok: {scenario} on {name}: {summary} ({duration:.2?})");
        }
        ScenarioOutcome::NotApplicable(why) => println!("not applicable: {why}"),
        ScenarioOutcome::Skipped(why) => println!("skipped: {why}"),
        ScenarioOutcome::Failed(text) => panic!("{scenario} failed on {name}: {text}"),
    }
}

/// Runs one scenario and returns its outcome without printing or panicking (for tools, and for
/// tests of the suite itself). Honours `AGENTCOMM_REQUIRE_BROKERS`: with it, an unreachable broker is
/// a failure.
pub async fn try_run<B: ConformanceBackend + ?Sized>(
    scenario: Scenario,
    backend: &B,
) -> ScenarioOutcome {
    let declared = backend.declared_capabilities();
    if let Some(why) = scenario.not_applicable(&declared) {
        return ScenarioOutcome::NotApplicable(format!("{scenario} on {}: {why}", backend.name()));
    }
    let soak = soak_factor();
    let limit = backend.scenario_limit() * soak;
    let started = Instant::now();
    let context = support::Context::new(backend, declared, soak as usize);
    let result = tokio::time::timeout(limit, scenarios::run(scenario, &context)).await;
    // Read before closing: closing ends the subscriptions that fill the sinks.
    let progress = context.progress();
    context.close_all().await;
    match result {
        Ok(Ok(summary)) => ScenarioOutcome::Passed {
            summary,
            duration: started.elapsed(),
        },
        Ok(Err(support::Failure::Unreachable)) => {
            let reason = backend.unreachable();
            if require_brokers() {
                ScenarioOutcome::Failed(format!("{REQUIRE_BROKERS_VAR}=1, but {reason}"))
            } else {
                ScenarioOutcome::Skipped(reason)
            }
        }
        Ok(Err(support::Failure::NotApplicable(why))) => {
            ScenarioOutcome::NotApplicable(format!("{scenario} on {}: {why}", backend.name()))
        }
        Ok(Err(support::Failure::Failed(text))) => ScenarioOutcome::Failed(text),
        Err(_) => ScenarioOutcome::Failed(format!(
            "the scenario did not finish within {limit:?} (ConformanceBackend::scenario_limit) {progress}"
        )),
    }
}

/// Runs one scenario on a new multi-threaded Tokio runtime (2 workers), making the backend inside it.
/// What each test of [`conformance_tests!`](crate::conformance_tests) does.
pub fn run_blocking<B: ConformanceBackend>(scenario: Scenario, make_backend: impl FnOnce() -> B) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a Tokio runtime for the conformance scenario");
    runtime.block_on(async {
        let backend = make_backend();
        run(scenario, &backend).await;
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
}
