//! [`RedisRouterBuilder`]: every setting of a [`RedisRouter`], with safe defaults.

use std::fmt;
use std::time::Duration;

use agentcomm_core::backoff::Backoff;
use agentcomm_core::config::{DEFAULT_REDIS_URL, REDIS_URL_VAR, check_url};
use agentcomm_core::error::{Error, Result, redact_url};

use crate::router::RedisRouter;

/// The environment variable that chooses the delivery mode: `streams` (the default) or `pubsub`.
pub const DELIVERY_MODE_VAR: &str = "REDIS_DELIVERY_MODE";

/// The URL forms a [`RedisRouter`] accepts.
pub const ACCEPTED_URLS: &str = "redis://[[user]:password@]host[:port][/db], rediss:// (TLS), \
     redis-sentinel://host:port/db?sentinelServiceName=name[&node=host:port], \
     redis-cluster://host:port[?node=host:port], rediss-sentinel:// and rediss-cluster:// (TLS), \
     or unix:///path/to/redis.sock[?db=number]";

/// The URL schemes a [`RedisRouter`] accepts (in any letter case): fred reads any other as a single
/// server's.
pub(crate) const ACCEPTED_SCHEMES: &[&str] = &[
    "redis",
    "rediss",
    "redis-sentinel",
    "rediss-sentinel",
    "redis-cluster",
    "rediss-cluster",
    "unix",
];

/// How messages travel through Redis. Both modes implement the same [`agentcomm_core::Router`]
/// contract; they differ in what they guarantee (see [`agentcomm_core::router::Capabilities`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum DeliveryMode {
    /// Redis Streams: durable, at-least-once, consumer groups, redelivery of failed and abandoned
    /// messages, dead letters after too many deliveries. The default.
    #[default]
    Streams,
    /// Redis pub/sub: fan-out, at-most-once, the lowest latency. Nothing is kept for a subscriber that is
    /// not connected; losses are counted in health. Dead letters are still kept in a stream.
    PubSub,
}

/// The longest duration any setting of the builder takes (a year): a longer one, `Duration::MAX` for
/// "as long as it takes", is taken as this. Added to the clock or to another setting, a longer one
/// overflowed it: a panic in `connect`, in `close`, in a pub/sub subscription's stream, or in a Streams
/// subscription's reader or lease renewals (which then delivered nothing).
const LONGEST_WAIT: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// The largest [`RedisRouterBuilder::broadcast_capacity`]: 1,048,576 messages, about 730 MB of fred's
/// rings when the pub/sub subscriber starts.
pub const MAX_BROADCAST_CAPACITY: usize = 1 << 20;

impl Settings {
    /// Refuses settings that cannot work, naming the setting and the fix.
    pub(crate) fn check(&self) -> Result<()> {
        if self.broadcast_capacity > MAX_BROADCAST_CAPACITY {
            return Err(Error::Config {
                variable: "broadcast_capacity".into(),
                value: self.broadcast_capacity.to_string(),
                expected: format!(
                    "at most {MAX_BROADCAST_CAPACITY}: fred fills its notification rings with this \
                     capacity when the pub/sub subscriber starts, about 0.7 KB per unit, which would \
                     be about {:.1} GB here; keep the default (65,536) or a value that fits the \
                     bursts (what does not fit is counted as lost)",
                    self.broadcast_capacity as f64 * 700.0 / 1e9
                ),
            });
        }
        Ok(())
    }
}

impl DeliveryMode {
    /// Parses `streams` or `pubsub` (also `pub/sub`, `pub-sub`; any case).
    pub fn parse(text: &str) -> Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "streams" | "stream" => Ok(DeliveryMode::Streams),
            "pubsub" | "pub/sub" | "pub-sub" | "pub_sub" => Ok(DeliveryMode::PubSub),
            _ => Err(Error::Config {
                variable: DELIVERY_MODE_VAR.into(),
                value: text.into(),
                expected:
                    "accepted values are streams (durable, the default) and pubsub (at-most-once)"
                        .into(),
            }),
        }
    }

    /// `streams` or `pubsub`.
    pub fn as_str(&self) -> &'static str {
        match self {
            DeliveryMode::Streams => "streams",
            DeliveryMode::PubSub => "pubsub",
        }
    }
}

impl fmt::Display for DeliveryMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every setting of a router. Built by [`RedisRouterBuilder`].
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) url: String,
    pub(crate) mode: DeliveryMode,
    pub(crate) prefix: String,
    pub(crate) pool_size: usize,
    pub(crate) reconnect: Backoff,
    pub(crate) max_reconnect_attempts: Option<u32>,
    pub(crate) max_command_attempts: u32,
    pub(crate) connect_timeout: Duration,
    pub(crate) command_timeout: Duration,
    pub(crate) close_timeout: Duration,
    pub(crate) stream_max_len: u64,
    pub(crate) dead_letter_max_len: Option<u64>,
    pub(crate) claim_idle: Duration,
    pub(crate) max_deliveries: u32,
    pub(crate) read_block: Duration,
    pub(crate) read_batch: usize,
    pub(crate) discovery_interval: Duration,
    pub(crate) idempotent_publish: bool,
    pub(crate) broadcast_capacity: usize,
    pub(crate) reorder_window: Duration,
    pub(crate) replies_over_pubsub: bool,
    pub(crate) tls: Option<fred::types::config::TlsConnector>,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("url", &redact_url(&self.url))
            .field("mode", &self.mode)
            .field("prefix", &self.prefix)
            .field("pool_size", &self.pool_size)
            .field("reconnect", &self.reconnect)
            .field("max_reconnect_attempts", &self.max_reconnect_attempts)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("stream_max_len", &self.stream_max_len)
            .field("claim_idle", &self.claim_idle)
            .field("max_deliveries", &self.max_deliveries)
            .field("idempotent_publish", &self.idempotent_publish)
            .field("replies_over_pubsub", &self.replies_over_pubsub)
            .field("custom_tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// The defaults for `url`.
    #[cfg(test)]
    pub(crate) fn for_tests(url: &str) -> Self {
        Self::new(url.to_string())
    }

    fn new(url: String) -> Self {
        Settings {
            url,
            mode: DeliveryMode::Streams,
            prefix: "agentcomm".into(),
            pool_size: 2,
            reconnect: Backoff::new(Duration::from_millis(50), Duration::from_secs(10)),
            max_reconnect_attempts: None,
            max_command_attempts: 20,
            connect_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(30),
            close_timeout: Duration::from_secs(10),
            stream_max_len: 1_000_000,
            dead_letter_max_len: None,
            claim_idle: Duration::from_secs(30),
            max_deliveries: 10,
            read_block: Duration::from_secs(5),
            read_batch: 128,
            discovery_interval: Duration::from_secs(1),
            idempotent_publish: false,
            broadcast_capacity: 65_536,
            reorder_window: Duration::from_millis(500),
            replies_over_pubsub: true,
            tls: None,
        }
    }
}

/// Builds a [`RedisRouter`]. Every default is safe for production: reconnect forever with exponential
/// backoff and jitter, bounded timeouts, durable Streams delivery.
///
/// ```no_run
/// use std::time::Duration;
/// use agentcomm_core::backoff::Backoff;
/// use agentcomm_redis::{DeliveryMode, RedisRouter};
///
/// # async fn run() -> agentcomm_core::Result<()> {
/// let router = RedisRouter::builder("redis://127.0.0.1:6379")
///     .mode(DeliveryMode::Streams)
///     .pool_size(4)
///     .reconnect(Backoff::new(Duration::from_millis(100), Duration::from_secs(5)))
///     .command_timeout(Duration::from_secs(10))
///     .claim_idle(Duration::from_secs(60))
///     .max_deliveries(8)
///     .connect()
///     .await?;
/// # let _ = router; Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `.connect().await`"]
pub struct RedisRouterBuilder {
    settings: Settings,
}

impl RedisRouterBuilder {
    pub(crate) fn new(url: impl Into<String>) -> Self {
        RedisRouterBuilder {
            settings: Settings::new(url.into()),
        }
    }

    /// Reads `REDIS_URL` (default `redis://127.0.0.1:6379`) and `REDIS_DELIVERY_MODE` (`streams`, the
    /// default, or `pubsub`) from the process environment. A `.env` file is not read: a variable set
    /// only there is taken as unset. To honour one, load it with
    /// [`Config::load`](agentcomm_core::config::Config::load) and pass its variables:
    /// `RedisRouterBuilder::from_lookup(|name| config.var(name))`.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(agentcomm_core::config::env_var)
    }

    /// Like [`RedisRouterBuilder::from_env`], reading variables through `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        // Surrounding whitespace (a value copied with its newline) is not part of any value.
        let non_empty = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let url = non_empty(REDIS_URL_VAR).unwrap_or_else(|| DEFAULT_REDIS_URL.to_string());
        // fred's own forms, which the builder takes (`redis+unix://`, the `valkey` schemes), are
        // checked by `connect` as the builder's are: `REDIS_URL` refused them.
        if !crate::connection::has_fred_scheme(&url) {
            check_url(REDIS_URL_VAR, &url, ACCEPTED_SCHEMES, ACCEPTED_URLS)?;
        }
        let mut builder = Self::new(url);
        if let Some(mode) = non_empty(DELIVERY_MODE_VAR) {
            builder = builder.mode(DeliveryMode::parse(&mode)?);
        }
        Ok(builder)
    }

    /// Chooses pub/sub or Streams delivery (default: [`DeliveryMode::Streams`]).
    pub fn mode(mut self, mode: DeliveryMode) -> Self {
        self.settings.mode = mode;
        self
    }

    /// The prefix of every key and channel (default `agentcomm`). Routers see each other's messages only
    /// when they share it. An empty prefix is refused by `connect` ([`Error::Config`]): keys and
    /// channels would start with a bare `:`. A `{` in it must close with a `}` after some text (`{tenant}`, a Redis
    /// Cluster hash tag of its own: every key in one slot); `a{b` or `{}` would break the `{<class>}`
    /// tags of its keys, and `connect` fails with [`Error::Config`].
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.settings.prefix = prefix.into();
        self
    }

    /// How many connections publish and acknowledge (default 2; from 1 to 64, a value outside taken as
    /// the nearest of the two). Each subscription reads on a connection of its own besides.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.settings.pool_size = size.clamp(1, 64);
        self
    }

    /// How to wait between reconnection attempts (default: 50 ms doubling up to 10 s). fred's policy
    /// takes the first and longest delay from `backoff`, its multiplier rounded to a whole number (at
    /// least 1), and adds a random jitter of up to a fifth of the first delay. Each connection's
    /// longest delay is `backoff`'s shortened at random by up to its jitter (default 20%: from 8 to
    /// 10 s; by half at most), so that connections that lost Redis together do not keep retrying in
    /// step.
    pub fn reconnect(mut self, backoff: Backoff) -> Self {
        self.settings.reconnect = backoff;
        self
    }

    /// Gives up reconnecting after this many attempts in a row (default `None`: never gives up).
    /// `Some(0)` never reconnects: the first lost connection is final. A router whose pool or pub/sub
    /// subscriber connection gave up reports `Unhealthy`, fails publishes at once with
    /// [`Error::Connection`], and ends its subscriptions: connect a new one. A Streams subscription
    /// whose own reading connection gave up ends alone (health `Unhealthy` until it is dropped):
    /// subscribe again.
    pub fn max_reconnect_attempts(mut self, attempts: Option<u32>) -> Self {
        self.settings.max_reconnect_attempts = attempts;
        self
    }

    /// TLS with your own settings (custom CA, client certificate), for `rediss://` URLs: a rustls
    /// `ClientConfig` converts into a connector (`TlsConnector::from(config)`). Without it, `rediss://`
    /// uses the system's root certificates. If the application installed no rustls crypto provider, ring's
    /// is installed. With a Unix socket's URL, `connect` fails with [`Error::Config`]: that connection
    /// is not encrypted.
    pub fn tls_connector(mut self, connector: fred::types::config::TlsConnector) -> Self {
        self.settings.tls = Some(connector);
        self
    }

    /// How often a command is written again after its connection dropped before it fails (default 20).
    pub fn max_command_attempts(mut self, attempts: u32) -> Self {
        self.settings.max_command_attempts = attempts.max(1);
        self
    }

    /// The limit on opening a connection, TLS handshake included, and on each command that sets it up
    /// (`AUTH`, `HELLO`, `SELECT`): connecting, or a subscriber's connection, fails after at most
    /// twice this (default 10 s; from 1 ms to a year, a value outside taken as the nearest of the two).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.settings.connect_timeout = timeout.clamp(Duration::from_millis(1), LONGEST_WAIT);
        self
    }

    /// The limit on every command, waiting for a reconnection included (default 30 s; from 1 ms to a
    /// year, a value outside taken as the nearest of the two). A publish that cannot be confirmed in
    /// time fails with [`Error::Timeout`].
    ///
    /// It also bounds how long a connection that silently stopped answering (a NAT or firewall that
    /// dropped it, a partition: nothing is closed) goes unnoticed: a command unanswered for
    /// `max(command_timeout, 2 s)` makes its connection again (a Streams reader's blocking read:
    /// unanswered for `read_block` plus that, or about twice as long just after a reconnection, see
    /// `docs/redis.md`). The pub/sub subscriber, which writes
    /// nothing of its own, is checked with a `PING` that often while it has subscriptions: a silent
    /// subscriber connection is made again, and its subscriptions restored, within about
    /// `2 × max(command_timeout, 2 s) + 1 s` (61 s by default).
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.settings.command_timeout = timeout.clamp(Duration::from_millis(1), LONGEST_WAIT);
        self
    }

    /// How long [`agentcomm_core::Router::close`] waits for delivered messages to be settled and for
    /// publishes under way to be confirmed (default 10 s; at most a year, a longer value taken as a
    /// year).
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.settings.close_timeout = timeout.min(LONGEST_WAIT);
        self
    }

    /// Streams: the approximate number of entries each stream keeps (`XADD MAXLEN ~`, default
    /// 1,000,000). Entries trimmed before a subscription read them are lost: they are counted as
    /// `trimmed` and logged. Size it for your slowest consumer.
    pub fn stream_max_len(mut self, max_len: u64) -> Self {
        self.settings.stream_max_len = max_len.max(1);
        self
    }

    /// Streams: the approximate number of entries the dead-letter stream keeps (default `None`: it is
    /// never trimmed, dead letters are rare and each one matters).
    pub fn dead_letter_max_len(mut self, max_len: Option<u64>) -> Self {
        self.settings.dead_letter_max_len = max_len.map(|len| len.max(1));
        self
    }

    /// Streams: whether channels of the `reply` direction (request/reply answers) travel over pub/sub
    /// (default `true`). A reply is only useful to a requester that is waiting for it, and every
    /// requester's inbox would otherwise read the whole reply stream of its class: traffic growing with
    /// the square of the number of requesters. Over pub/sub, a reply published while nobody waits is
    /// `Unroutable` and not kept. `false` keeps replies in their class stream like everything else.
    pub fn replies_over_pubsub(mut self, on: bool) -> Self {
        self.settings.replies_over_pubsub = on;
        self
    }

    /// Streams: how long an entry may stay unacknowledged by a consumer that stopped renewing it before
    /// another member of its group takes it over (default 30 s). Live consumers renew what they hold,
    /// so slow handlers are not robbed. From 100 ms to a year, a value outside taken as the nearest of
    /// the two.
    pub fn claim_idle(mut self, idle: Duration) -> Self {
        self.settings.claim_idle = idle.clamp(Duration::from_millis(100), LONGEST_WAIT);
        self
    }

    /// Streams: after this many deliveries an entry is moved to its dead-letter channel instead of being
    /// delivered again (default 10). This catches messages that crash their consumers; ordinary handler
    /// failures are dead-lettered earlier by the runtime's `max_attempts`.
    pub fn max_deliveries(mut self, deliveries: u32) -> Self {
        self.settings.max_deliveries = deliveries.max(1);
        self
    }

    /// Streams: how long one blocking read waits for new entries (default 5 s; from 1 ms to a year, a
    /// value outside taken as the nearest of the two). Closing a subscription interrupts it.
    pub fn read_block(mut self, block: Duration) -> Self {
        self.settings.read_block = block.clamp(Duration::from_millis(1), LONGEST_WAIT);
        self
    }

    /// Streams: the most entries one read asks for (default 128; never more than the prefetch allows).
    pub fn read_batch(mut self, batch: usize) -> Self {
        self.settings.read_batch = batch.max(1);
        self
    }

    /// Streams: how often subscriptions with a wildcard class look for streams of new classes, and every
    /// subscription checks whether entries it had not read yet were trimmed (default 1 s). A stream found
    /// late is read from its first entry, so nothing is missed. From 10 ms to a year, a value outside
    /// taken as the nearest of the two.
    pub fn discovery_interval(mut self, interval: Duration) -> Self {
        self.settings.discovery_interval = interval.clamp(Duration::from_millis(10), LONGEST_WAIT);
        self
    }

    /// Streams: whether a publish that fred writes again after a lost connection is stored once
    /// (default `false`). On, each publish runs `XADD` in a small script that keeps the publisher's
    /// highest sequence number per stream (a few bytes, expiring after an hour idle): a number not above
    /// it is a replay and is not stored again. It costs about 4 µs of Redis CPU per publish instead of 1
    /// (roughly half the throughput at 64 publishes in flight). Off, a publish in flight when a
    /// connection drops may be stored twice; Streams delivery is at-least-once anyway (a lost `XACK`, or
    /// a consumer cut off longer than `claim_idle`, redelivers), so handlers must tolerate repeats either
    /// way. Turn it on when duplicate entries cost more than the Redis CPU.
    pub fn idempotent_publish(mut self, on: bool) -> Self {
        self.settings.idempotent_publish = on;
        self
    }

    /// Pub/sub: the capacity of the subscriber client's message channel, the buffer every subscription
    /// reads from (default 65,536; fred's own default of 32 loses messages on bursts). A subscription
    /// that falls further behind skips the oldest messages of the channel (counted as `lagged`, messages
    /// of every subscription of the router); what each subscription lost of agentcomm publishers'
    /// messages is counted exactly as `lost`, and logged.
    ///
    /// Memory: fred sizes all eight of its notification channels (errors, reconnections and the like,
    /// not only messages) with this capacity, and fills them when the subscriber is created: about 0.7 KB
    /// per unit of capacity. Measured, a pub/sub router's resident memory grows by about 51 MB at the
    /// default, 16 MB at 16,384, 10 MB at 8,192 and 5 MB at 1,024. Lower it where many routers share a
    /// process and bursts stay small; what a smaller ring cannot hold is counted, as above. From 32
    /// (a smaller value is taken as 32) to [`MAX_BROADCAST_CAPACITY`]: above it, `connect` fails with
    /// [`Error::Config`] rather than the first subscribe taking gigabytes.
    pub fn broadcast_capacity(mut self, capacity: usize) -> Self {
        self.settings.broadcast_capacity = capacity.max(32);
        self
    }

    /// Pub/sub: how long a gap in a publisher's sequence may stay open (the message arriving out of
    /// order) before it is counted as `lost` (default 500 ms; at most a year, a longer value taken as
    /// a year).
    pub fn reorder_window(mut self, window: Duration) -> Self {
        self.settings.reorder_window = window.min(LONGEST_WAIT);
        self
    }

    /// The settings so far.
    #[cfg(test)]
    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Connects. Fails with [`Error::Config`] for a URL or a setting that cannot be used and with
    /// [`Error::Connection`] (the URL without its password) when Redis cannot be reached in time.
    pub async fn connect(self) -> Result<RedisRouter> {
        RedisRouter::connect_with(self.settings).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_modes_parse_and_name_the_accepted_values() {
        assert_eq!(DeliveryMode::parse("PubSub").unwrap(), DeliveryMode::PubSub);
        assert_eq!(
            DeliveryMode::parse(" streams ").unwrap(),
            DeliveryMode::Streams
        );
        let error = DeliveryMode::parse("kafka").unwrap_err().to_string();
        assert_eq!(
            error,
            "REDIS_DELIVERY_MODE='kafka' is not valid: accepted values are streams (durable, the default) and pubsub (at-most-once)"
        );
    }

    #[test]
    fn builder_debug_hides_the_sentinel_password() {
        let builder = RedisRouterBuilder::new(
            "redis-sentinel://u:pw1@h:26379/0?sentinelServiceName=m&sentinelPassword=S3ntinelSecret&node=h2:26379",
        );
        let debug = format!("{builder:?}");
        assert!(!debug.contains("S3ntinelSecret"), "{debug}");
    }

    #[test]
    fn the_environment_chooses_url_and_mode_and_hides_the_password() {
        let builder = RedisRouterBuilder::from_lookup(|name| match name {
            "REDIS_URL" => Some("redis://:hunter2@10.1.2.3:6380/2".into()),
            "REDIS_DELIVERY_MODE" => Some("pubsub".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(builder.settings().mode, DeliveryMode::PubSub);
        let debug = format!("{builder:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("10.1.2.3:6380"), "{debug}");

        let defaults = RedisRouterBuilder::from_lookup(|_| None).unwrap();
        assert_eq!(defaults.settings().url, DEFAULT_REDIS_URL);
        assert_eq!(defaults.settings().mode, DeliveryMode::Streams);

        let error = RedisRouterBuilder::from_lookup(|name| {
            (name == "REDIS_URL").then(|| "http://:pw@host".to_string())
        })
        .unwrap_err()
        .to_string();
        assert!(
            error.starts_with("REDIS_URL='http://:***@host' is not valid"),
            "{error}"
        );
    }

    /// A broadcast capacity that would take gigabytes at the first subscribe is refused at connect,
    /// naming the setting and its bound; before, it was taken, and fred filled its rings with it when
    /// the pub/sub subscriber started (about 0.7 KB per unit). The bound itself is taken.
    #[tokio::test]
    async fn a_broadcast_capacity_beyond_the_bound_is_refused_at_connect() {
        let error = RedisRouterBuilder::new("redis://:pw@127.0.0.1:1")
            .broadcast_capacity(MAX_BROADCAST_CAPACITY + 1)
            .connect()
            .await
            .unwrap_err();
        assert!(matches!(error, Error::Config { .. }), "{error}");
        let text = error.to_string();
        assert!(
            text.starts_with("broadcast_capacity='1048577' is not valid: at most 1048576"),
            "{text}"
        );
        let mut settings = RedisRouterBuilder::new(DEFAULT_REDIS_URL)
            .broadcast_capacity(MAX_BROADCAST_CAPACITY)
            .settings()
            .clone();
        assert!(settings.check().is_ok());
        settings.broadcast_capacity = usize::MAX;
        assert!(settings.check().unwrap_err().to_string().contains("GB"));
    }

    /// The URL forms fred reads that the builder takes are taken from `REDIS_URL` too, as
    /// docs/redis.md says ("refused, by the builder as by REDIS_URL"): before, `valkey://` and
    /// `redis+unix://` were refused there ("the scheme 'valkey' is not supported").
    #[test]
    fn the_fred_url_forms_the_builder_takes_are_taken_from_the_environment() {
        for url in [
            "valkey://:pw@10.1.2.3:6380/2",
            "valkeys-cluster://10.0.0.1:7000?node=10.0.0.2:7000",
            "redis+unix:///run/redis.sock",
        ] {
            let builder = RedisRouterBuilder::from_lookup(|name| {
                (name == "REDIS_URL").then(|| url.to_string())
            })
            .unwrap_or_else(|error| panic!("{url}: {error}"));
            assert!(
                crate::connection::fred_config(builder.settings()).is_ok(),
                "{url}"
            );
        }
    }

    /// A `REDIS_URL` copied with its newline (or with spaces around it) names the same server; before,
    /// `from_env` refused it ("the scheme ' redis' is not supported") although the builder took it.
    #[test]
    fn a_url_from_the_environment_is_taken_without_surrounding_whitespace() {
        let builder = RedisRouterBuilder::from_lookup(|name| {
            (name == "REDIS_URL").then(|| " redis://:pw@10.1.2.3:6380/2\n".to_string())
        })
        .unwrap();
        assert_eq!(builder.settings().url, "redis://:pw@10.1.2.3:6380/2");
    }
}
