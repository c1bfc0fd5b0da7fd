//! One publisher to one subscriber of typed PaymentRequest messages, on one Redis, through agentcomm
//! and through plain fred doing the same work, with 1 and 64 publishes in flight, in both modes.
//!
//! `cargo bench -p agentcomm-redis --bench throughput` (REDIS_URL, default redis://127.0.0.1:6379;
//! BENCH_MESSAGES scales the message counts, default 15000 at 64 in flight and 3000 at 1; each
//! configuration runs 3 times, interleaved, and the median run is reported).
//!
//! The same work on both sides: the publisher encodes a PaymentRequest with MessagePack and publishes
//! it (PUBLISH, or XADD into a stream); the subscriber receives it, decodes it, and (Streams) reads it
//! with a consumer group and XACKs it. agentcomm adds its envelope, sequence numbers, pattern matching,
//! idempotent publishing (Streams) and delivery accounting.

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
    in_flight: usize,
    client: &'static str,
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
    Row {
        mode,
        in_flight,
        client,
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
    let reader = {
        let clock = clock.clone();
        tokio::spawn(async move {
            while let Some(delivery) = subscription.next().await {
                let request: PaymentRequest =
                    agentcomm_core::runtime::decode_message(delivery.envelope()).expect("decode");
                clock.received(index_of(&request));
                delivery.ack().await.expect("ack");
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
        .with_performance_config(|perf| perf.broadcast_channel_capacity = 65_536)
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
                let payload = rmp_serde::to_vec_named(&request(n)).unwrap();
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
                        let _: i64 = acker
                            .xack(key.as_str(), "payments", id.as_str())
                            .await
                            .unwrap();
                        clock.received(index_of(&request));
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
                let payload = rmp_serde::to_vec_named(&request(n)).unwrap();
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

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let scale: f64 = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(1.0, |n| n / 15_000.0);
    runtime.block_on(async {
        if tokio::time::timeout(Duration::from_secs(3), fred_client(&url))
            .await
            .is_err()
        {
            println!("skipped: no Redis at {}", agentcomm_core::error::redact_url(&url));
            return;
        }
        // Each configuration runs REPEATS times, interleaved with the others; the row reported is the
        // run with the median throughput (this machine is shared and noisy).
        const REPEATS: usize = 3;
        let mut runs: Vec<Vec<Row>> = Vec::new();
        for in_flight in [1usize, 64] {
            let total = ((if in_flight == 1 { 3_000.0 } else { 15_000.0 }) * scale).max(100.0) as usize;
            // Warm-up (connections, script cache, allocator), not recorded.
            let _ = fred_pubsub_run(&url, in_flight, total / 10).await;
            let _ = agentcomm_run(&url, DeliveryMode::PubSub, true, in_flight, total / 10).await;
            let _ = agentcomm_run(&url, DeliveryMode::Streams, true, in_flight, total / 10).await;
            let first = runs.len();
            runs.extend((0..5).map(|_| Vec::new()));
            for _ in 0..REPEATS {
                let (clock, elapsed) = fred_pubsub_run(&url, in_flight, total).await;
                runs[first].push(summarize("pub/sub", in_flight, "plain fred", &clock.0, elapsed));
                let (clock, elapsed) =
                    agentcomm_run(&url, DeliveryMode::PubSub, true, in_flight, total).await;
                runs[first + 1].push(summarize("pub/sub", in_flight, "agentcomm", &clock.0, elapsed));
                let (clock, elapsed) = fred_streams_run(&url, in_flight, total).await;
                runs[first + 2].push(summarize("streams", in_flight, "plain fred", &clock.0, elapsed));
                let (clock, elapsed) =
                    agentcomm_run(&url, DeliveryMode::Streams, true, in_flight, total).await;
                runs[first + 3].push(summarize("streams", in_flight, "agentcomm", &clock.0, elapsed));
                let (clock, elapsed) =
                    agentcomm_run(&url, DeliveryMode::Streams, false, in_flight, total).await;
                runs[first + 4].push(summarize(
                    "streams",
                    in_flight,
                    "agentcomm (idempotent off)",
                    &clock.0,
                    elapsed,
                ));
            }
        }
        let rows: Vec<Row> = runs
            .into_iter()
            .map(|mut repeats| {
                repeats.sort_by(|a, b| a.per_second.total_cmp(&b.per_second));
                repeats.remove(repeats.len() / 2)
            })
            .collect();
        println!();
        println!(
            "| mode | in flight | client | messages | msg/s | p50 | p99 | msg/s vs fred | p50 vs fred | p99 vs fred |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for row in &rows {
            let base = rows
                .iter()
                .find(|r| r.mode == row.mode && r.in_flight == row.in_flight && r.client == "plain fred")
                .unwrap();
            println!(
                "| {} | {} | {} | {} | {:.0} | {:.0} µs | {:.0} µs | {:.1}% | {:.1}% | {:.1}% |",
                row.mode,
                row.in_flight,
                row.client,
                row.messages,
                row.per_second,
                row.p50.as_secs_f64() * 1e6,
                row.p99.as_secs_f64() * 1e6,
                100.0 * row.per_second / base.per_second,
                100.0 * row.p50.as_secs_f64() / base.p50.as_secs_f64(),
                100.0 * row.p99.as_secs_f64() / base.p99.as_secs_f64(),
            );
        }
    });
}
