//! One publisher to one subscriber of typed PaymentRequest messages, on one Redis, through agentcomm
//! and through plain fred doing the same work, with 1 and 64 publishes in flight, in both modes.
//!
//! `cargo bench -p agentcomm-redis --bench throughput` (REDIS_URL, default redis://127.0.0.1:6379;
//! BENCH_MESSAGES scales the message counts, default 40,000 at 64 in flight and 3,000 at 1;
//! BENCH_ROUNDS rounds, default 5, each running every client once, back to back: the figures are the
//! medians over the rounds, and the ratios the medians of each round's ratio to plain fred;
//! BENCH_CASES picks cases, e.g. `streams-64`; BENCH_WORKERS sets Tokio's worker threads, default 2).
//!
//! The same work on both sides, as a user of plain fred would write it: the publisher encodes a
//! PaymentRequest with MessagePack and publishes it (PUBLISH, or XADD into a stream); the subscriber
//! receives it and decodes it, and that is the moment of receipt on both sides; (Streams) it reads with
//! a consumer group and acknowledges off the read loop (plain fred: a task that XACKs what came
//! together; agentcomm: the ack futures run while the next message is read). agentcomm adds its
//! envelope, sequence numbers, pattern matching and delivery accounting; a third row (Streams) adds
//! idempotent publishing (`idempotent_publish(true)`, off by default).
//!
//! BENCH_PLAIN_SIZE=agentcomm pads plain fred's payload to the size of agentcomm's frame (envelope
//! and sequence header), to tell the cost of the bytes (Redis, the socket) from the client's work.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agentcomm_core::bus::Bus;
use agentcomm_core::codec::Codec;
use agentcomm_core::prelude::*;
use agentcomm_core::router::SubscribeOptions;
use agentcomm_redis::{DeliveryMode, RedisRouter};
use fred::prelude::*;
use fred::types::Value;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, agentcomm_core::Message)]
#[message(direction = "request")]
struct PaymentRequest {
    amount: f64,
    user_id: String,
    payment_method: String,
}

fn request(n: usize) -> PaymentRequest {
    PaymentRequest {
        amount: 100.0 + n as f64,
        user_id: format!("user-{n}"),
        payment_method: "credit_card".into(),
    }
}

fn index_of(request: &PaymentRequest) -> usize {
    request.user_id[5..].parse().expect("user-<n>")
}

/// The payload plain fred sends for message `n`: the PaymentRequest, padded with BENCH_PLAIN_SIZE=agentcomm
/// to as many bytes as agentcomm's frame (MessagePack ignores what follows the value when decoding).
fn plain_payload(n: usize) -> Vec<u8> {
    static PADDING: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let mut payload = rmp_serde::to_vec_named(&request(n)).unwrap();
    let padding = *PADDING.get_or_init(|| {
        if std::env::var("BENCH_PLAIN_SIZE").as_deref() != Ok("agentcomm") {
            return 0;
        }
        let channel = Channel::for_message::<PaymentRequest>("request", "session-1").unwrap();
        let envelope = Envelope::new(channel, "application/msgpack", payload.clone());
        // A publisher id and number as agentcomm-redis writes them (`agentcomm-seq`).
        let frame = envelope
            .to_frame_with_header("agentcomm-seq", "0123456789abcdef/12345")
            .unwrap();
        frame.len() - payload.len()
    });
    payload.resize(payload.len() + padding, 0);
    payload
}

/// Send times by message index, and latencies measured at the subscriber.
struct Clock {
    start: Instant,
    sent: Vec<AtomicU64>,
    latencies: std::sync::Mutex<Vec<Duration>>,
    received: AtomicU64,
    done: tokio::sync::Notify,
    total: usize,
}

impl Clock {
    fn new(total: usize) -> Arc<Self> {
        Arc::new(Clock {
            start: Instant::now(),
            sent: (0..total).map(|_| AtomicU64::new(0)).collect(),
            latencies: std::sync::Mutex::new(Vec::with_capacity(total)),
            received: AtomicU64::new(0),
            done: tokio::sync::Notify::new(),
            total,
        })
    }

    fn sending(&self, n: usize) {
        self.sent[n].store(self.start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    fn received(&self, n: usize) {
        let now = self.start.elapsed().as_nanos() as u64;
        let sent = self.sent[n].load(Ordering::Relaxed);
        self.latencies
            .lock()
            .unwrap()
            .push(Duration::from_nanos(now.saturating_sub(sent)));
        if self.received.fetch_add(1, Ordering::AcqRel) + 1 == self.total as u64 {
            self.done.notify_one();
        }
    }
}

struct Row {
    mode: &'static str,
    messages: usize,
    per_second: f64,
    p50: Duration,
    p99: Duration,
}

fn summarize(
    mode: &'static str,
    in_flight: usize,
    client: &'static str,
    clock: &Clock,
    elapsed: Duration,
) -> Row {
    let mut latencies = clock.latencies.lock().unwrap().clone();
    latencies.sort();
    let pick = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    let _ = (in_flight, client);
    Row {
        mode,
        messages: latencies.len(),
        per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: pick(0.50),
        p99: pick(0.99),
    }
}

async fn wait_all(clock: &Clock, what: &str) {
    let limit = Duration::from_secs(60);
    let deadline = tokio::time::Instant::now() + limit;
    while clock.received.load(Ordering::Acquire) < clock.total as u64 {
        let notified = clock.done.notified();
        if clock.received.load(Ordering::Acquire) >= clock.total as u64 {
            break;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            panic!(
                "{what}: only {} of {} messages arrived within {limit:?}",
                clock.received.load(Ordering::Relaxed),
                clock.total
            );
        }
    }
}

async fn agentcomm_run(
    url: &str,
    mode: DeliveryMode,
    idempotent: bool,
    in_flight: usize,
    total: usize,
) -> (Clock2, Duration) {
    let prefix = format!("bench-{}", uuid::Uuid::now_v7().simple());
    let connect = || {
        RedisRouter::builder(url)
            .mode(mode)
            .prefix(&prefix)
            .idempotent_publish(idempotent)
            .connect()
    };
    let subscriber = connect().await.expect("connect");
    let publisher = connect().await.expect("connect");
    let pattern = ChannelPattern::for_message::<PaymentRequest>(None, None).unwrap();
    let options = match mode {
        DeliveryMode::Streams => SubscribeOptions::new(pattern).group("payments"),
        _ => SubscribeOptions::new(pattern),
    }
    .prefetch(1024);
    let mut subscription = subscriber.subscribe(options).await.expect("subscribe");
    let clock = Clock::new(total);
    let pubsub = mode == DeliveryMode::PubSub;
    let reader = {
        let clock = clock.clone();
        tokio::spawn(async move {
            let mut acks = futures::stream::FuturesUnordered::<
                agentcomm_core::router::BoxFuture<'static, agentcomm_core::Result<()>>,
            >::new();
            loop {
                tokio::select! {
                    biased;
                    Some(acked) = acks.next(), if !acks.is_empty() => acked.expect("ack"),
                    delivery = subscription.next() => match delivery {
                        Some(delivery) => {
                            let request: PaymentRequest =
                                agentcomm_core::runtime::decode_message(delivery.envelope())
                                    .expect("decode");
                            clock.received(index_of(&request));
                            if pubsub {
                                // Nothing to send: the ack is ready at once.
                                delivery.ack().await.expect("ack");
                            } else {
                                acks.push(Box::pin(delivery.ack()));
                            }
                        }
                        None => break,
                    },
                }
            }
            while let Some(acked) = acks.next().await {
                acked.expect("ack");
            }
        })
    };
    let bus = Bus::new(
        Arc::new(publisher.clone()),
        Codec::MessagePack,
        Duration::from_secs(30),
    );
    let started = Instant::now();
    futures::stream::iter(0..total)
        .map(|n| {
            let bus = bus.clone();
            let clock = clock.clone();
            async move {
                clock.sending(n);
                bus.publish("session-1", &request(n))
                    .await
                    .expect("publish");
            }
        })
        .buffer_unordered(in_flight)
        .collect::<Vec<()>>()
        .await;
    wait_all(&clock, "agentcomm").await;
    let elapsed = started.elapsed();
    subscriber.close().await.unwrap();
    publisher.close().await.unwrap();
    let _ = reader.await;
    cleanup(url, &prefix).await;
    (Clock2(clock), elapsed)
}

/// Keeps the clock alive for the summary.
struct Clock2(Arc<Clock>);

async fn fred_client(url: &str) -> Client {
    let client = Builder::from_config(Config::from_url(url).unwrap())
        .build()
        .unwrap();
    client.init().await.unwrap();
    client
}

async fn fred_pubsub_run(url: &str, in_flight: usize, total: usize) -> (Clock2, Duration) {
    let channel = format!(
        "bench-{}:PaymentRequest:request:session-1",
        uuid::Uuid::now_v7().simple()
    );
    let subscriber = Builder::from_config(Config::from_url(url).unwrap())
        .with_performance_config(|perf| perf.broadcast_channel_capacity = 65_536)
        .build_subscriber_client()
        .unwrap();
    subscriber.init().await.unwrap();
    subscriber.subscribe(channel.as_str()).await.unwrap();
    let _: Value = subscriber.ping(None).await.unwrap();
    let publisher = fred_client(url).await;
    let clock = Clock::new(total);
    let mut messages = subscriber.message_rx();
    let reader = {
        let clock = clock.clone();
        tokio::spawn(async move {
            loop {
                match messages.recv().await {
                    Ok(message) => {
                        let request: PaymentRequest =
                            rmp_serde::from_slice(message.value.as_bytes().unwrap()).unwrap();
                        clock.received(index_of(&request));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        panic!("plain fred lagged by {n}")
                    }
                    Err(_) => break,
                }
            }
        })
    };
    let started = Instant::now();
    futures::stream::iter(0..total)
        .map(|n| {
            let publisher = publisher.clone();
            let clock = clock.clone();
            let channel = channel.clone();
            async move {
                clock.sending(n);
                let payload = plain_payload(n);
                let _: i64 = publisher.publish(channel.as_str(), payload).await.unwrap();
            }
        })
        .buffer_unordered(in_flight)
        .collect::<Vec<()>>()
        .await;
    wait_all(&clock, "plain fred pub/sub").await;
    let elapsed = started.elapsed();
    let _ = subscriber.quit().await;
    let _ = publisher.quit().await;
    reader.abort();
    (Clock2(clock), elapsed)
}

async fn fred_streams_run(url: &str, in_flight: usize, total: usize) -> (Clock2, Duration) {
    let prefix = format!("bench-{}", uuid::Uuid::now_v7().simple());
    let key = format!("{prefix}:stream:{{PaymentRequest}}");
    let publisher = fred_client(url).await;
    let acker = fred_client(url).await;
    let reader_client = fred_client(url).await;
    let _: Value = publisher
        .xgroup_create(key.as_str(), "payments", "$", true)
        .await
        .unwrap();
    let clock = Clock::new(total);
    // Acknowledged off the read loop: a task sends what came together in one XACK.
    let (to_ack, mut acks) = tokio::sync::mpsc::unbounded_channel::<String>();
    let acking = {
        let key = key.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            while acks.recv_many(&mut ids, 1024).await > 0 {
                let _: i64 = acker
                    .xack(key.as_str(), "payments", std::mem::take(&mut ids))
                    .await
                    .unwrap();
            }
            let _ = acker.quit().await;
        })
    };
    let reader = {
        let clock = clock.clone();
        let key = key.clone();
        tokio::spawn(async move {
            loop {
                let reply: Value = match reader_client
                    .xreadgroup(
                        "payments",
                        "c1",
                        Some(128),
                        Some(1000),
                        false,
                        key.as_str(),
                        ">",
                    )
                    .await
                {
                    Ok(reply) => reply,
                    Err(_) => break,
                };
                for stream in reply.into_array() {
                    let mut parts = stream.into_array().into_iter();
                    let _key = parts.next();
                    for entry in parts.next().map(Value::into_array).unwrap_or_default() {
                        let mut entry = entry.into_array().into_iter();
                        let id = entry.next().unwrap().as_string().unwrap();
                        let fields = entry.next().unwrap().into_array();
                        let request: PaymentRequest =
                            rmp_serde::from_slice(fields[1].as_bytes().unwrap()).unwrap();
                        clock.received(index_of(&request));
                        to_ack.send(id).unwrap();
                    }
                }
                if clock.received.load(Ordering::Acquire) >= clock.total as u64 {
                    break;
                }
            }
        })
    };
    let started = Instant::now();
    futures::stream::iter(0..total)
        .map(|n| {
            let publisher = publisher.clone();
            let clock = clock.clone();
            let key = key.clone();
            async move {
                clock.sending(n);
                let payload = plain_payload(n);
                let _: String = publisher
                    .xadd(
                        key.as_str(),
                        false,
                        ("MAXLEN", "~", 1_000_000),
                        "*",
                        vec![("f", payload)],
                    )
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(in_flight)
        .collect::<Vec<()>>()
        .await;
    wait_all(&clock, "plain fred streams").await;
    let elapsed = started.elapsed();
    let _ = reader.await;
    let _ = acking.await;
    let _: i64 = publisher.del(key.as_str()).await.unwrap();
    let _ = publisher.quit().await;
    (Clock2(clock), elapsed)
}

/// Removes what a run left in Redis.
async fn cleanup(url: &str, prefix: &str) {
    let client = fred_client(url).await;
    let keys: Vec<String> = client
        .custom(
            fred::types::CustomCommand::new_static("KEYS", fred::types::ClusterHash::Random, false),
            vec![format!("{prefix}:*")],
        )
        .await
        .unwrap_or_default();
    for key in keys {
        let _: i64 = client.del(key).await.unwrap_or(0);
    }
    let _ = client.quit().await;
}

/// One measured configuration.
#[derive(Clone, Copy, PartialEq)]
enum Side {
    PlainFred,
    Agentcomm,
    AgentcommIdempotent,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::PlainFred => "plain fred",
            Side::Agentcomm => "agentcomm",
            Side::AgentcommIdempotent => "agentcomm (idempotent publish)",
        }
    }
}

async fn run_once(
    url: &str,
    mode: DeliveryMode,
    client: Side,
    in_flight: usize,
    total: usize,
) -> Row {
    let label = match mode {
        DeliveryMode::PubSub => "pub/sub",
        _ => "streams",
    };
    let (clock, elapsed) = match (mode, client) {
        (DeliveryMode::PubSub, Side::PlainFred) => fred_pubsub_run(url, in_flight, total).await,
        (_, Side::PlainFred) => fred_streams_run(url, in_flight, total).await,
        (mode, Side::Agentcomm) => agentcomm_run(url, mode, false, in_flight, total).await,
        (mode, Side::AgentcommIdempotent) => agentcomm_run(url, mode, true, in_flight, total).await,
    };
    summarize(label, in_flight, client.name(), &clock.0, elapsed)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    // BENCH_WORKERS: Tokio worker threads (default 2, the machine's cores), to see what a message's
    // hand-off between threads costs (1: every task on one worker).
    let workers: usize = std::env::var("BENCH_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
        .max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap();
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let scale: f64 = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(1.0, |n| n / 40_000.0);
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    // Which cases: pubsub-1, pubsub-64, streams-1, streams-64 (default all); BENCH_CLIENTS=agentcomm
    // runs agentcomm only (for a profiler).
    let cases = std::env::var("BENCH_CASES")
        .unwrap_or_else(|_| "pubsub-1,pubsub-64,streams-1,streams-64".into());
    let only_agentcomm = std::env::var("BENCH_CLIENTS").is_ok_and(|v| v == "agentcomm");
    let only_plain = std::env::var("BENCH_CLIENTS").is_ok_and(|v| v == "plain");
    let only_idempotent = std::env::var("BENCH_CLIENTS").is_ok_and(|v| v == "idempotent");
    runtime.block_on(async {
        if tokio::time::timeout(Duration::from_secs(3), fred_client(&url))
            .await
            .is_err()
        {
            println!("skipped: no Redis at {}", agentcomm_core::error::redact_url(&url));
            return;
        }
        println!(
            "| mode | in flight | client | messages | msg/s | p50 | p99 | msg/s vs fred | p50 vs fred | p99 vs fred |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for case in cases.split(',') {
            let (mode, in_flight) = match case.trim() {
                "pubsub-1" => (DeliveryMode::PubSub, 1),
                "pubsub-64" => (DeliveryMode::PubSub, 64),
                "streams-1" => (DeliveryMode::Streams, 1),
                "streams-64" => (DeliveryMode::Streams, 64),
                other => panic!("unknown case {other}"),
            };
            let total =
                ((if in_flight == 1 { 3_000.0 } else { 40_000.0 }) * scale).max(100.0) as usize;
            let mut clients = vec![Side::PlainFred, Side::Agentcomm];
            if mode == DeliveryMode::Streams {
                clients.push(Side::AgentcommIdempotent);
            }
            if only_agentcomm {
                clients.retain(|c| *c == Side::Agentcomm);
            }
            if only_plain {
                clients.retain(|c| *c == Side::PlainFred);
            }
            if only_idempotent {
                clients.retain(|c| *c == Side::AgentcommIdempotent);
            }
            // Warm-up (connections, script cache, allocator), not recorded.
            for client in &clients {
                let _ = run_once(&url, mode, *client, in_flight, total / 10).await;
            }
            // Rounds of one run per client, back to back: each round's ratios compare runs made under
            // the same conditions on this shared machine; the median round is reported.
            let mut rows: Vec<Vec<Row>> = clients.iter().map(|_| Vec::new()).collect();
            for _ in 0..rounds {
                for (index, client) in clients.iter().enumerate() {
                    rows[index].push(run_once(&url, mode, *client, in_flight, total).await);
                }
            }
            for (index, client) in clients.iter().enumerate() {
                let runs = &rows[index];
                let ratio = |value: &dyn Fn(&Row) -> f64| {
                    if only_agentcomm || only_plain || only_idempotent {
                        return f64::NAN;
                    }
                    median(
                        runs.iter()
                            .zip(&rows[0])
                            .map(|(run, base)| 100.0 * value(run) / value(base))
                            .collect(),
                    )
                };
                println!(
                    "| {} | {} | {} | {} | {:.0} | {:.0} µs | {:.0} µs | {:.1}% | {:.1}% | {:.1}% |",
                    runs[0].mode,
                    in_flight,
                    client.name(),
                    runs[0].messages,
                    median(runs.iter().map(|r| r.per_second).collect()),
                    median(runs.iter().map(|r| r.p50.as_secs_f64() * 1e6).collect()),
                    median(runs.iter().map(|r| r.p99.as_secs_f64() * 1e6).collect()),
                    ratio(&|r| r.per_second),
                    ratio(&|r| r.p50.as_secs_f64()),
                    ratio(&|r| r.p99.as_secs_f64()),
                );
            }
        }
    });
}
