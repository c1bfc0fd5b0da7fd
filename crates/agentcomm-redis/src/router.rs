//! [`RedisRouter`]: the [`Router`] implementation.

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use agentcomm_core::channel::DEAD_LETTER_CLASS;
use agentcomm_core::envelope::Envelope;
use agentcomm_core::error::{Error, Result, redact_url};
use agentcomm_core::router::{
    BoxFuture, Capabilities, Health, HealthStatus, PublishOutcome, Router, SubscribeOptions,
    Subscription,
};
use bytes::Bytes;
use fred::bytes_utils::Str;
use fred::clients::{Client, Pool};
use fred::interfaces::{
    ClientLike, LuaInterface, PubsubInterface, SetsInterface, StreamsInterface,
};
use fred::types::config::Config;
use fred::types::{Builder, ClusterHash, CustomCommand, Key, Value};

use crate::builder::{DeliveryMode, RedisRouterBuilder, Settings};
use crate::connection::{
    fred_builder, fred_config, is_noscript, map_error_with_timeout, watch_client,
};
use crate::counters::{Counters, LogLimiter};
use crate::keys::Keys;
use crate::pubsub::PubSubHub;
use crate::sequence::{PublisherSequences, SEQUENCE_HEADER, new_publisher_id};
use crate::streams::{FRAME_FIELD, StreamSubscription};

/// Adds a frame to a class stream once per publisher sequence number, even when fred writes the command
/// again after a reconnect. KEYS: stream, dedup bitmap. ARGV: sequence number (counted per stream),
/// bitmap size in bits, bitmap time-to-live in ms, approximate maximum length, frame.
///
/// `SETBIT` answers the bit's previous value: set means this number was stored already. Every 64th number
/// (1, 65, 129, ...) clears the 64-bit word half the bitmap ahead, so that bits are reused, and refreshes
/// the bitmap's time-to-live.
const PUBLISH_SCRIPT: &str = r#"
local seq = tonumber(ARGV[1])
local size = tonumber(ARGV[2])
local bit = seq % size
if redis.call('SETBIT', KEYS[2], bit, 1) == 1 then
  return false
end
if bit % 64 == 1 then
  redis.call('BITFIELD', KEYS[2], 'SET', 'i64', math.floor((bit - 1 + size / 2) % size), 0)
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', 'f', ARGV[5])
"#;

/// Bits of a publisher's de-duplication bitmap (8 KiB); a retried publish is recognised while fewer
/// than half this many later publishes of the same publisher came in between.
const DEDUP_BITS: i64 = 65_536;
/// How long an idle publisher's bitmap is kept.
const DEDUP_TTL_MS: i64 = 3_600_000;

/// One publish of a batch: its index in the batch, its keys (or channel) and its arguments.
type PipelinedCommand = (usize, Vec<Key>, Vec<Value>);

/// Where one class's messages go, computed once per router: its keys, the pool connection that writes
/// them (always the same, so that a stream's publishes stay in order), and its next sequence number.
struct StreamTarget {
    stream: Key,
    dedup: Key,
    client: usize,
    next: AtomicU64,
}

/// The state every clone of a router, and every subscription, shares.
pub(crate) struct Shared {
    pub(crate) settings: Settings,
    pub(crate) keys: Keys,
    pub(crate) config: Config,
    pub(crate) pool: Pool,
    pub(crate) counters: Arc<Counters>,
    closed: AtomicBool,
    publisher_id: String,
    /// Each class stream this router publishes to. Each has its own sequence: a de-duplication bitmap
    /// must see every number of its sequence, or the words ahead would not be cleared.
    targets: RwLock<HashMap<String, Arc<StreamTarget>>>,
    /// Sequence numbers by channel, with each channel's Redis name and pool connection.
    pubsub_sequences: Mutex<PublisherSequences<(Str, usize)>>,
    script_sha: String,
    hub: tokio::sync::Mutex<Option<Arc<PubSubHub>>>,
    streams: Mutex<HashMap<u64, Arc<StreamSubscription>>>,
    next_subscription: AtomicU64,
    malformed_log: LogLimiter,
}

/// A [`Router`] on Redis, in pub/sub or Streams mode ([`DeliveryMode`]).
///
/// Cheap to clone: clones share the connections and subscriptions. Dropping the last clone closes it
/// (in the background; call [`Router::close`] to wait for it). `Debug` never shows the password.
///
/// ```no_run
/// use agentcomm_core::prelude::*;
/// use agentcomm_redis::RedisRouter;
///
/// # async fn run() -> agentcomm_core::Result<()> {
/// // REDIS_URL (default redis://127.0.0.1:6379) and REDIS_DELIVERY_MODE (streams or pubsub).
/// let router = RedisRouter::from_env().await?;
/// let runtime = Runtime::new(router);
/// # let _ = runtime; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisRouter {
    shared: Arc<Shared>,
    _last_clone: Arc<CloseOnDrop>,
}

/// Closes the router when the last clone of it is dropped, so that its connections and tasks end.
struct CloseOnDrop(Arc<Shared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if self.0.closed.load(Ordering::Acquire) {
            return;
        }
        let shared = self.0.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = shared.close().await {
                    tracing::debug!(error = %error, "closing a dropped router failed");
                }
            });
        }
    }
}

impl fmt::Debug for RedisRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = &self.shared;
        f.debug_struct("RedisRouter")
            .field("url", &redact_url(&shared.settings.url))
            .field("mode", &shared.settings.mode)
            .field("prefix", &shared.keys.prefix())
            .field("pool_size", &shared.settings.pool_size)
            .field("closed", &shared.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl RedisRouter {
    /// A builder for a router on `url` (`redis://`, `rediss://`, `redis-sentinel://`,
    /// `redis-cluster://`).
    pub fn builder(url: impl Into<String>) -> RedisRouterBuilder {
        RedisRouterBuilder::new(url)
    }

    /// Connects to `url` with the defaults (Streams mode).
    pub async fn connect(url: impl Into<String>) -> Result<Self> {
        Self::builder(url).connect().await
    }

    /// Connects to `REDIS_URL` (default `redis://127.0.0.1:6379`) in the mode `REDIS_DELIVERY_MODE`
    /// says (`streams`, the default, or `pubsub`).
    pub async fn from_env() -> Result<Self> {
        RedisRouterBuilder::from_env()?.connect().await
    }

    /// The delivery mode.
    pub fn mode(&self) -> DeliveryMode {
        self.shared.settings.mode
    }

    /// The prefix of every key and channel.
    pub fn prefix(&self) -> &str {
        self.shared.keys.prefix()
    }

    pub(crate) async fn connect_with(settings: Settings) -> Result<Self> {
        let config = fred_config(&settings)?;
        let builder = fred_builder(&settings, config.clone());
        let pool = builder
            .build_pool(settings.pool_size)
            .map_err(|e| map_error_with_timeout(&e, &settings, "creating the connection pool"))?;
        let limit = settings.connect_timeout * 2;
        match tokio::time::timeout(limit, pool.init()).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                return Err(Error::Connection {
                    backend: "redis",
                    url: redact_url(&settings.url),
                    message: error.details().to_string(),
                });
            }
            Err(_) => {
                let _ = tokio::time::timeout(Duration::from_secs(1), pool.quit()).await;
                return Err(Error::Connection {
                    backend: "redis",
                    url: redact_url(&settings.url),
                    message: format!("no connection within {limit:?}"),
                });
            }
        }
        let counters = Arc::new(Counters::default());
        for client in pool.clients() {
            watch_client(client, "pool", counters.clone(), &settings.url, || {});
        }
        let script_sha = {
            let client = pool.next();
            let loaded: std::result::Result<String, _> = client.script_load(PUBLISH_SCRIPT).await;
            match loaded {
                Ok(sha) => sha,
                Err(error) => {
                    let _ = pool.quit().await;
                    return Err(map_error_with_timeout(
                        &error,
                        &settings,
                        "loading the publish script (SCRIPT LOAD)",
                    ));
                }
            }
        };
        let shared = Arc::new(Shared {
            keys: Keys::new(&settings.prefix),
            config,
            pool,
            counters,
            closed: AtomicBool::new(false),
            publisher_id: new_publisher_id(),
            targets: RwLock::new(HashMap::new()),
            pubsub_sequences: Mutex::new(PublisherSequences::new()),
            script_sha,
            hub: tokio::sync::Mutex::new(None),
            streams: Mutex::new(HashMap::new()),
            next_subscription: AtomicU64::new(1),
            malformed_log: LogLimiter::new(Duration::from_secs(5)),
            settings,
        });
        if shared.settings.mode == DeliveryMode::PubSub {
            let hub = match PubSubHub::start(&shared).await {
                Ok(hub) => hub,
                Err(error) => {
                    let _ = shared.pool.quit().await;
                    return Err(error);
                }
            };
            *shared.hub.lock().await = Some(hub);
        }
        tracing::info!(
            url = %redact_url(&shared.settings.url),
            mode = %shared.settings.mode,
            prefix = shared.keys.prefix(),
            "connected to Redis"
        );
        Ok(RedisRouter {
            _last_clone: Arc::new(CloseOnDrop(shared.clone())),
            shared,
        })
    }
}

fn closed_error() -> Error {
    Error::Closed {
        what: "the Redis router",
        hint: "it was closed; connect a new one",
    }
}

impl Shared {
    pub(crate) fn fred_builder(&self) -> Builder {
        fred_builder(&self.settings, self.config.clone())
    }

    /// The pool connection for `key`: always the same one, so that commands on one stream or channel
    /// stay in order.
    pub(crate) fn client_for(&self, key: &str) -> &Client {
        &self.pool.clients()[self.client_index(key)]
    }

    /// The index in the pool of [`Shared::client_for`].
    fn client_index(&self, key: &str) -> usize {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        (hasher.finish() % self.pool.clients().len() as u64) as usize
    }

    pub(crate) fn forget_stream(&self, id: u64) {
        self.streams.lock().expect("streams lock").remove(&id);
    }

    /// The classes that have a stream.
    pub(crate) async fn registered_classes(&self) -> Result<Vec<String>> {
        self.pool
            .next()
            .smembers(self.keys.registry())
            .await
            .map_err(|e| map_error_with_timeout(&e, &self.settings, "reading the stream registry"))
    }

    /// The target of `class`. The first time, lists the class in the registry (so that wildcard
    /// subscriptions find its stream) before anything is written to the stream.
    async fn target(&self, class: &str) -> Result<Arc<StreamTarget>> {
        if let Some(target) = self.targets.read().expect("targets lock").get(class) {
            return Ok(target.clone());
        }
        self.pool
            .next()
            .sadd::<i64, _, _>(self.keys.registry(), class)
            .await
            .map_err(|e| map_error_with_timeout(&e, &self.settings, "registering a stream"))?;
        let stream = self.keys.stream(class);
        let client = self.client_index(&stream);
        let target = Arc::new(StreamTarget {
            dedup: Key::from(self.keys.dedup(class, &self.publisher_id)),
            stream: Key::from(stream),
            client,
            next: AtomicU64::new(1),
        });
        Ok(self
            .targets
            .write()
            .expect("targets lock")
            .entry(class.to_string())
            .or_insert(target)
            .clone())
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(closed_error())
        } else {
            Ok(())
        }
    }

    /// The keys and script arguments of one stream publish.
    fn stream_command(&self, target: &StreamTarget, frame: Vec<u8>) -> (Vec<Key>, Vec<Value>) {
        let sequence = target.next.fetch_add(1, Ordering::Relaxed);
        let keys = vec![target.stream.clone(), target.dedup.clone()];
        let args = vec![
            Value::Integer(sequence as i64),
            Value::Integer(DEDUP_BITS),
            Value::Integer(DEDUP_TTL_MS),
            Value::Integer(i64::try_from(self.settings.stream_max_len).unwrap_or(i64::MAX)),
            Value::Bytes(Bytes::from(frame)),
        ];
        (keys, args)
    }

    /// Appends `envelope` to its class stream.
    async fn stream_add(&self, envelope: &Envelope) -> Result<()> {
        let target = self.target(envelope.channel().class()).await?;
        let frame = envelope.to_frame()?;
        let client = &self.pool.clients()[target.client];
        if !self.settings.idempotent_publish {
            let fields = vec![(FRAME_FIELD, Value::Bytes(Bytes::from(frame)))];
            let cap = (
                "MAXLEN",
                "~",
                i64::try_from(self.settings.stream_max_len).unwrap_or(i64::MAX),
            );
            return client
                .xadd::<Value, _, _, _, _>(target.stream.clone(), false, cap, "*", fields)
                .await
                .map(drop)
                .map_err(|e| map_error_with_timeout(&e, &self.settings, "XADD"));
        }
        let (keys, args) = self.stream_command(&target, frame);
        let result: std::result::Result<Value, _> = client
            .evalsha(self.script_sha.as_str(), keys.clone(), args.clone())
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(error) if is_noscript(&error) => client
                .eval::<Value, _, _, _>(PUBLISH_SCRIPT, keys, args)
                .await
                .map(drop)
                .map_err(|e| map_error_with_timeout(&e, &self.settings, "publishing to a stream")),
            Err(error) => Err(map_error_with_timeout(
                &error,
                &self.settings,
                "publishing to a stream",
            )),
        }
    }

    /// Numbers and encodes a pub/sub message; returns the Redis channel, the pool connection for it and
    /// the frame.
    fn pubsub_frame(&self, mut envelope: Envelope) -> Result<(Str, usize, Vec<u8>)> {
        let (sequence, (channel, client)) = self
            .pubsub_sequences
            .lock()
            .expect("sequences lock")
            .next(envelope.channel().name(), || {
                let channel = self.keys.pubsub_channel(envelope.channel());
                let client = self.client_index(&channel);
                (Str::from(channel), client)
            });
        envelope
            .headers_mut()
            .insert(SEQUENCE_HEADER.to_string(), sequence);
        Ok((channel, client, envelope.to_frame()?))
    }

    /// Publishes one envelope in this router's mode; dead letters are always also kept in their stream.
    pub(crate) async fn publish_envelope(&self, envelope: Envelope) -> Result<PublishOutcome> {
        self.check_open()?;
        let result = match self.settings.mode {
            DeliveryMode::Streams => self
                .stream_add(&envelope)
                .await
                .map(|()| PublishOutcome::Accepted),
            DeliveryMode::PubSub => self.pubsub_publish(envelope).await,
        };
        self.count_publish(&result);
        result
    }

    async fn pubsub_publish(&self, envelope: Envelope) -> Result<PublishOutcome> {
        let keep = envelope.channel().class() == DEAD_LETTER_CLASS;
        if keep {
            self.stream_add(&envelope).await?;
        }
        let (channel, client, frame) = self.pubsub_frame(envelope)?;
        let receivers: i64 = self.pool.clients()[client]
            .publish(channel, Bytes::from(frame))
            .await
            .map_err(|e| map_error_with_timeout(&e, &self.settings, "PUBLISH"))?;
        Ok(outcome_of(receivers, keep))
    }

    fn count_publish(&self, result: &Result<PublishOutcome>) {
        match result {
            Ok(outcome) => {
                self.counters.bump(&self.counters.published);
                if outcome.is_unroutable() {
                    self.counters.bump(&self.counters.unroutable);
                }
            }
            Err(_) => self.counters.bump(&self.counters.publish_errors),
        }
    }

    /// Publishes several envelopes in one pipeline per connection.
    async fn publish_pipelined(&self, envelopes: Vec<Envelope>) -> Vec<Result<PublishOutcome>> {
        if let Err(error) = self.check_open() {
            return envelopes
                .iter()
                .map(|_| Err(closed_error_like(&error)))
                .collect();
        }
        let keep_any = envelopes
            .iter()
            .any(|e| e.channel().class() == DEAD_LETTER_CLASS);
        if self.settings.mode == DeliveryMode::PubSub && keep_any {
            // Dead letters take the careful path (stream and channel).
            let mut results = Vec::with_capacity(envelopes.len());
            for envelope in envelopes {
                results.push(self.publish_envelope(envelope).await);
            }
            return results;
        }
        let mut results: Vec<Option<Result<PublishOutcome>>> = Vec::new();
        results.resize_with(envelopes.len(), || None);
        // Encode first: an envelope that cannot be encoded fails alone.
        let mut by_client: HashMap<usize, Vec<PipelinedCommand>> = HashMap::new();
        for (index, envelope) in envelopes.into_iter().enumerate() {
            let encoded = match self.settings.mode {
                DeliveryMode::Streams => match self.target(envelope.channel().class()).await {
                    Err(error) => Err(error),
                    Ok(target) => envelope.to_frame().map(|frame| {
                        let (keys, args) = self.stream_command(&target, frame);
                        (target.client, keys, args)
                    }),
                },
                DeliveryMode::PubSub => {
                    self.pubsub_frame(envelope).map(|(channel, client, frame)| {
                        (
                            client,
                            vec![Key::from(channel)],
                            vec![Value::Bytes(Bytes::from(frame))],
                        )
                    })
                }
            };
            match encoded {
                Ok((client, keys, args)) => by_client
                    .entry(client)
                    .or_default()
                    .push((index, keys, args)),
                Err(error) => results[index] = Some(Err(error)),
            }
        }
        let clients = self.pool.clients();
        let batches = by_client.into_iter().map(|(position, batch)| {
            let client = &clients[position];
            self.run_pipeline(client, batch)
        });
        for batch in futures::future::join_all(batches).await {
            for (index, result) in batch {
                results[index] = Some(result);
            }
        }
        let results: Vec<Result<PublishOutcome>> = results
            .into_iter()
            .map(|r| r.expect("every envelope has a result"))
            .collect();
        for result in &results {
            self.count_publish(result);
        }
        results
    }

    async fn run_pipeline(
        &self,
        client: &Client,
        batch: Vec<PipelinedCommand>,
    ) -> Vec<(usize, Result<PublishOutcome>)> {
        let pipeline = client.pipeline();
        let streams = self.settings.mode == DeliveryMode::Streams;
        for (_, keys, args) in &batch {
            let queued: std::result::Result<(), _> = if streams {
                if self.settings.idempotent_publish {
                    let mut command: Vec<Value> = Vec::with_capacity(2 + keys.len() + args.len());
                    command.push(Value::from(self.script_sha.as_str()));
                    command.push(Value::Integer(keys.len() as i64));
                    command.extend(keys.iter().map(|k| Value::from(k.as_bytes())));
                    command.extend(args.iter().cloned());
                    pipeline
                        .custom(
                            CustomCommand::new_static("EVALSHA", ClusterHash::Offset(2), false),
                            command,
                        )
                        .await
                } else {
                    let fields = vec![(FRAME_FIELD, args[4].clone())];
                    let cap = (
                        "MAXLEN",
                        "~",
                        i64::try_from(self.settings.stream_max_len).unwrap_or(i64::MAX),
                    );
                    pipeline
                        .xadd(keys[0].clone(), false, cap, "*", fields)
                        .await
                }
            } else {
                pipeline
                    .publish(keys[0].as_str().unwrap_or_default(), args[0].clone())
                    .await
            };
            let _ = queued;
        }
        let replies: Vec<std::result::Result<Value, fred::error::Error>> = pipeline.try_all().await;
        let mut results = Vec::with_capacity(batch.len());
        for ((index, keys, args), reply) in batch.into_iter().zip(replies) {
            let result = match reply {
                Ok(value) if streams => {
                    let _ = value;
                    Ok(PublishOutcome::Accepted)
                }
                Ok(value) => Ok(outcome_of(value.as_i64().unwrap_or(0), false)),
                Err(error) if streams && is_noscript(&error) => client
                    .eval::<Value, _, _, _>(PUBLISH_SCRIPT, keys, args)
                    .await
                    .map(|_| PublishOutcome::Accepted)
                    .map_err(|e| {
                        map_error_with_timeout(&e, &self.settings, "publishing to a stream")
                    }),
                Err(error) => Err(map_error_with_timeout(&error, &self.settings, "publishing")),
            };
            results.push((index, result));
        }
        results
    }

    /// Moves a frame that cannot be decoded to `DeadLetter:agentcomm.Malformed:unknown`; returns whether
    /// it was published (the raw entry may then be removed).
    pub(crate) async fn dead_letter_malformed(
        &self,
        raw: Bytes,
        source: &str,
        error: &Error,
    ) -> bool {
        self.counters.bump(&self.counters.malformed);
        self.counters.mark_trouble();
        if let Some(suppressed) = self.malformed_log.allow() {
            tracing::error!(
                source,
                error = %error,
                bytes = raw.len(),
                suppressed,
                "a frame could not be decoded; it is moved to DeadLetter:agentcomm.Malformed:unknown"
            );
        }
        let dead = Envelope::malformed(raw, source, &error.to_string());
        match self.publish_envelope(dead).await {
            Ok(_) => true,
            Err(publish_error) => {
                tracing::error!(error = %publish_error, source, "could not publish the dead letter of a malformed frame");
                false
            }
        }
    }

    /// Like [`Shared::dead_letter_malformed`], in the background (pub/sub: nothing to remove).
    pub(crate) fn malformed(self: &Arc<Self>, raw: Bytes, source: &str, error: &Error) {
        let shared = self.clone();
        let source = source.to_string();
        let error = Error::decode("envelope", error);
        tokio::spawn(async move {
            shared.dead_letter_malformed(raw, &source, &error).await;
        });
    }

    async fn health(&self) -> Health {
        let settings = &self.settings;
        let backend = backend_name(settings.mode);
        let closed = self.closed.load(Ordering::Acquire);
        let started = Instant::now();
        let ping = tokio::time::timeout(
            Duration::from_secs(2).min(settings.command_timeout),
            self.pool.next().ping::<Value>(None),
        )
        .await;
        let round_trip = matches!(ping, Ok(Ok(_))).then(|| started.elapsed());
        let pool_connected = self.pool.clients().iter().all(|c| c.is_connected());
        let hub = self.hub.lock().await.clone();
        let subscriber_connected = hub.as_ref().is_none_or(|hub| hub.is_connected());
        let streams: Vec<Arc<StreamSubscription>> = self
            .streams
            .lock()
            .expect("streams lock")
            .values()
            .cloned()
            .collect();
        let subscriptions = hub.as_ref().map_or(0, |hub| hub.subscription_count()) + streams.len();
        let connected = !closed && pool_connected && subscriber_connected && round_trip.is_some();
        let (status, detail) = if closed {
            (HealthStatus::Unhealthy, "closed".to_string())
        } else if round_trip.is_none() {
            (
                HealthStatus::Unhealthy,
                format!(
                    "Redis at {} does not answer; reconnecting with backoff (check that it is running and reachable)",
                    redact_url(&settings.url)
                ),
            )
        } else if !pool_connected || !subscriber_connected {
            (
                HealthStatus::Degraded,
                "some connections are reconnecting".to_string(),
            )
        } else if self.counters.recent_trouble() {
            (
                HealthStatus::Degraded,
                "messages were lost or connections failed in the last minute; see the counters and the logs"
                    .to_string(),
            )
        } else {
            (HealthStatus::Healthy, "ok".to_string())
        };
        let mut health = Health::new(backend, status)
            .connected(connected)
            .detail(detail)
            .counter("subscriptions", subscriptions as u64);
        if let Some(round_trip) = round_trip {
            health = health.round_trip(round_trip);
        }
        for (name, value) in self.counters.snapshot() {
            health = health.counter(name, value);
        }
        health
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let hub = self.hub.lock().await.take();
        if let Some(hub) = hub {
            hub.close().await;
        }
        let streams: Vec<Arc<StreamSubscription>> = self
            .streams
            .lock()
            .expect("streams lock")
            .drain()
            .map(|(_, s)| s)
            .collect();
        let deadline = self.settings.close_timeout;
        futures::future::join_all(streams.iter().map(|s| s.finish(deadline))).await;
        let quit =
            tokio::time::timeout(deadline.max(Duration::from_secs(1)), self.pool.quit()).await;
        if !matches!(quit, Ok(Ok(()))) {
            tracing::debug!("the connection pool did not quit cleanly");
        }
        tracing::info!(url = %redact_url(&self.settings.url), "Redis router closed");
        Ok(())
    }
}

fn closed_error_like(error: &Error) -> Error {
    match error {
        Error::Closed { what, hint } => Error::Closed { what, hint },
        other => Error::Backend {
            backend: "redis",
            message: other.to_string(),
        },
    }
}

fn outcome_of(receivers: i64, stored: bool) -> PublishOutcome {
    match receivers {
        n if n > 0 => PublishOutcome::Delivered(n as usize),
        _ if stored => PublishOutcome::Accepted,
        _ => PublishOutcome::Unroutable,
    }
}

fn backend_name(mode: DeliveryMode) -> &'static str {
    match mode {
        DeliveryMode::Streams => "redis-streams",
        DeliveryMode::PubSub => "redis-pubsub",
    }
}

impl Router for RedisRouter {
    fn backend(&self) -> &str {
        backend_name(self.shared.settings.mode)
    }

    fn capabilities(&self) -> Capabilities {
        match self.shared.settings.mode {
            DeliveryMode::Streams => Capabilities::none()
                .persistent(true)
                .ordered_per_channel(true)
                .consumer_groups(true)
                .redelivery(true)
                .publish_confirms(true),
            DeliveryMode::PubSub => Capabilities::none()
                .ordered_per_channel(true)
                .redelivery(true)
                .publish_confirms(true)
                // A cluster counts only the receivers on the node that took the PUBLISH.
                .reports_unroutable(!self.shared.config.server.is_clustered())
                .no_duplicates(true),
        }
    }

    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, Result<PublishOutcome>> {
        Box::pin(self.shared.publish_envelope(envelope))
    }

    fn publish_batch(
        &self,
        envelopes: Vec<Envelope>,
    ) -> BoxFuture<'_, Vec<Result<PublishOutcome>>> {
        Box::pin(self.shared.publish_pipelined(envelopes))
    }

    fn subscribe(&self, options: SubscribeOptions) -> BoxFuture<'_, Result<Subscription>> {
        Box::pin(async move {
            options.check()?;
            let shared = &self.shared;
            shared.check_open()?;
            match shared.settings.mode {
                DeliveryMode::PubSub => {
                    let hub = shared.hub.lock().await.clone().ok_or_else(closed_error)?;
                    hub.subscribe(shared, options).await
                }
                DeliveryMode::Streams => {
                    let id = shared.next_subscription.fetch_add(1, Ordering::Relaxed);
                    let (subscription, handle) =
                        StreamSubscription::start(shared, options, id).await?;
                    shared
                        .streams
                        .lock()
                        .expect("streams lock")
                        .insert(id, subscription);
                    Ok(handle)
                }
            }
        })
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        Box::pin(self.shared.health())
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.shared.close())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fred::interfaces::KeysInterface;

    /// The publish script against a real Redis (REDIS_URL); skipped when there is none.
    #[tokio::test]
    async fn the_publish_script_stores_each_sequence_number_once() {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let client = Builder::from_config(Config::from_url(&url).unwrap())
            .build()
            .unwrap();
        if !matches!(
            tokio::time::timeout(Duration::from_secs(3), client.init()).await,
            Ok(Ok(_))
        ) {
            if std::env::var("AGENTCOMM_REQUIRE_BROKERS").is_ok_and(|v| v.trim() == "1") {
                panic!(
                    "AGENTCOMM_REQUIRE_BROKERS=1, but there is no Redis at {}",
                    redact_url(&url)
                );
            }
            println!("skipped: no Redis at {}", redact_url(&url));
            return;
        }
        let prefix = format!("agentcomm-unit-{}", uuid::Uuid::now_v7().simple());
        let keys = vec![
            format!("{prefix}:stream:{{A}}"),
            format!("{prefix}:dedup:{{A}}:p"),
        ];
        let run = |seq: i64| {
            let args = vec![
                Value::Integer(seq),
                Value::Integer(DEDUP_BITS),
                Value::Integer(DEDUP_TTL_MS),
                Value::Integer(1000),
                Value::from("frame"),
            ];
            client.eval::<Value, _, _, _>(PUBLISH_SCRIPT, keys.clone(), args)
        };
        assert!(!run(1).await.unwrap().is_null(), "first publish stored");
        assert!(
            run(1).await.unwrap().is_null(),
            "the same number again is a retry"
        );
        assert!(!run(2).await.unwrap().is_null());
        // Number 65 clears the word half the bitmap ahead: bits 32,832 .. 32,895 become usable again.
        let bits = |command: &'static str, args: Vec<Value>| {
            client.custom::<i64, Value>(
                CustomCommand::new_static(command, ClusterHash::FirstKey, false),
                args,
            )
        };
        let key = Value::from(keys[1].as_str());
        bits(
            "SETBIT",
            vec![key.clone(), Value::Integer(32_840), Value::Integer(1)],
        )
        .await
        .unwrap();
        assert!(!run(65).await.unwrap().is_null());
        let bit = bits("GETBIT", vec![key, Value::Integer(32_840)])
            .await
            .unwrap();
        assert_eq!(bit, 0);
        let length: i64 = client.xlen(&keys[0]).await.unwrap();
        assert_eq!(length, 3);
        let ttl: i64 = client.pttl(&keys[1]).await.unwrap();
        assert!(ttl > 0, "the bitmap expires when idle");
        let _: i64 = client.del(keys.clone()).await.unwrap();
        let _ = client.quit().await;
    }
}
