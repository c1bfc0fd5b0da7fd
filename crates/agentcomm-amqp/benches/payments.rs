//! Typed PaymentRequest throughput and latency on RabbitMQ: agentcomm against plain amqprs doing the
//! same work (MessagePack, persistent, publisher confirms, durable queue, manual ack, one connection
//! for publishing and one for consuming), with 1 and 64 publishes in flight, alternating the two in
//! every round on the same broker.
//!
//! `cargo bench -p agentcomm-amqp --bench payments` (RABBITMQ_URL, default amqp://guest:guest@127.0.0.1:5672/%2f).
//! AGENTCOMM_BENCH_FACTOR=<n> multiplies the message counts; AGENTCOMM_BENCH_ROUNDS sets the rounds (7).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentcomm_amqp::{AmqpRouter, topology};
use agentcomm_core::bus::Bus;
use agentcomm_core::codec::Codec;
use agentcomm_core::prelude::*;
use agentcomm_core::router::{PublishOutcome, SubscribeOptions};
use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, BasicQosArguments, Channel,
    ConfirmSelectArguments, ExchangeDeleteArguments, QueueBindArguments, QueueDeclareArguments,
    QueueDeleteArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(direction = "request")]
struct PaymentRequest {
    amount: f64,
    user_id: String,
    payment_method: String,
}

const PREFETCH: u16 = 256;

fn url() -> String {
    std::env::var("RABBITMQ_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

fn factor() -> usize {
    std::env::var("AGENTCOMM_BENCH_FACTOR")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|f| *f >= 1)
        .unwrap_or(1)
}

fn request(seq: u64) -> PaymentRequest {
    PaymentRequest {
        amount: 100.0 + (seq % 100) as f64,
        user_id: format!("user-{seq}"),
        payment_method: "credit_card".to_string(),
    }
}

fn seq_of(request: &PaymentRequest) -> u64 {
    request
        .user_id
        .strip_prefix("user-")
        .and_then(|n| n.parse().ok())
        .expect("user-<seq>")
}

/// Publish start times (ns since the run began) and end-to-end latencies, by sequence number.
struct Clock {
    origin: Instant,
    sent: Vec<AtomicU64>,
    latencies: Mutex<Vec<Duration>>,
    received: AtomicU64,
    done: tokio::sync::Notify,
    total: u64,
}

impl Clock {
    fn new(total: u64) -> Arc<Self> {
        Arc::new(Clock {
            origin: Instant::now(),
            sent: (0..total).map(|_| AtomicU64::new(0)).collect(),
            latencies: Mutex::new(Vec::with_capacity(total as usize)),
            received: AtomicU64::new(0),
            done: tokio::sync::Notify::new(),
            total,
        })
    }

    fn sending(&self, seq: u64) {
        self.sent[seq as usize].store(self.origin.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    fn received(&self, seq: u64) {
        let sent = Duration::from_nanos(self.sent[seq as usize].load(Ordering::Relaxed));
        let latency = self.origin.elapsed().saturating_sub(sent);
        self.latencies.lock().unwrap().push(latency);
        if self.received.fetch_add(1, Ordering::AcqRel) + 1 == self.total {
            self.done.notify_one();
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    throughput: f64,
    p50: Duration,
    p99: Duration,
}

fn summarize(clock: &Clock, elapsed: Duration) -> Sample {
    let mut latencies = clock.latencies.lock().unwrap().clone();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Sample {
        throughput: clock.total as f64 / elapsed.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
    }
}

async fn run_publishers<F, Fut>(clock: &Arc<Clock>, in_flight: usize, publish: F)
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..in_flight {
        let next = next.clone();
        let clock = clock.clone();
        let publish = publish.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= clock.total {
                    return;
                }
                clock.sending(seq);
                publish(seq).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

async fn wait_all(clock: &Clock) {
    let wait = async {
        while clock.received.load(Ordering::Acquire) < clock.total {
            let notified = clock.done.notified();
            if clock.received.load(Ordering::Acquire) >= clock.total {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(120), wait)
        .await
        .expect("every message consumed within 120 s");
}

/// agentcomm: typed publish through the bus (encode, envelope, confirm), a group subscription,
/// typed decode, ack.
async fn agentcomm_round(exchange: &str, total: u64, in_flight: usize) -> Sample {
    let router = AmqpRouter::builder(url())
        .exchange(exchange)
        .connect()
        .await
        .expect("connect");
    let mut subscription = router
        .subscribe(
            SubscribeOptions::new(
                ChannelPattern::for_message::<PaymentRequest>(None, None).unwrap(),
            )
            .group("bench")
            .prefetch(PREFETCH as usize),
        )
        .await
        .expect("subscribe");
    let clock = Clock::new(total);
    let consumer = {
        let clock = clock.clone();
        tokio::spawn(async move {
            while let Some(delivery) = subscription.next().await {
                let request: PaymentRequest =
                    agentcomm_core::runtime::decode_message(delivery.envelope()).expect("decode");
                delivery.ack().await.expect("ack");
                clock.received(seq_of(&request));
                if clock.received.load(Ordering::Acquire) >= clock.total {
                    return;
                }
            }
        })
    };
    let bus = Bus::new(
        Arc::new(router.clone()),
        Codec::MessagePack,
        Duration::from_secs(30),
    );
    let started = Instant::now();
    run_publishers(&clock, in_flight, move |seq| {
        let bus = bus.clone();
        async move {
            let outcome = bus.publish("bench", &request(seq)).await.expect("publish");
            assert_eq!(outcome, PublishOutcome::Accepted);
        }
    })
    .await;
    wait_all(&clock).await;
    let elapsed = started.elapsed();
    consumer.await.unwrap();
    router.close().await.expect("close");
    summarize(&clock, elapsed)
}

/// Plain amqprs: the same work by hand (MessagePack payload, persistent, confirms with a tag map,
/// durable queue, prefetch, manual ack, decode).
struct Confirms {
    waiters: Mutex<HashMap<u64, oneshot::Sender<bool>>>,
}

impl Confirms {
    fn settle(&self, tag: u64, multiple: bool, ack: bool) {
        let mut waiters = self.waiters.lock().unwrap();
        let tags: Vec<u64> = if multiple {
            waiters.keys().copied().filter(|t| *t <= tag).collect()
        } else {
            vec![tag]
        };
        for tag in tags {
            if let Some(waiter) = waiters.remove(&tag) {
                let _ = waiter.send(ack);
            }
        }
    }
}

struct ConfirmCallback(Arc<Confirms>);

#[async_trait::async_trait]
impl ChannelCallback for ConfirmCallback {
    async fn close(
        &mut self,
        _: &Channel,
        _: amqprs::CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn cancel(&mut self, _: &Channel, _: amqprs::Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(&mut self, _: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _: &Channel, ack: amqprs::Ack) {
        self.0.settle(ack.delivery_tag(), ack.mutiple(), true);
    }
    async fn publish_nack(&mut self, _: &Channel, nack: amqprs::Nack) {
        self.0.settle(nack.delivery_tag(), nack.multiple(), false);
    }
    async fn publish_return(
        &mut self,
        _: &Channel,
        _: amqprs::Return,
        _: amqprs::BasicProperties,
        _: Vec<u8>,
    ) {
    }
}

fn open_arguments() -> OpenConnectionArguments {
    let url = url();
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let (userinfo, host_port) = authority
        .rsplit_once('@')
        .unwrap_or(("guest:guest", authority));
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let (host, port) = host_port.rsplit_once(':').unwrap_or((host_port, "5672"));
    OpenConnectionArguments::new(host, port.parse().unwrap(), user, password)
}

async fn plain_round(exchange: &str, total: u64, in_flight: usize) -> Sample {
    // Its own exchange: agentcomm's durable group queue must not get copies of these.
    let exchange = &plain_exchange(exchange);
    let connection = Connection::open(&open_arguments()).await.expect("connect");
    let setup = connection.open_channel(None).await.unwrap();
    let mut declare = amqprs::channel::ExchangeDeclareArguments::new(exchange, "topic");
    declare.durable(true);
    setup.exchange_declare(declare).await.unwrap();
    let queue = format!("{exchange}.plain");
    setup
        .queue_declare(QueueDeclareArguments::durable_client_named(&queue))
        .await
        .unwrap();
    let routing_key = "PaymentRequest.request.bench";
    setup
        .queue_bind(QueueBindArguments::new(
            &queue,
            exchange,
            "PaymentRequest.*.*",
        ))
        .await
        .unwrap();

    let consumer_channel = connection.open_channel(None).await.unwrap();
    consumer_channel
        .basic_qos(BasicQosArguments::new(0, PREFETCH, false))
        .await
        .unwrap();
    let mut consume = BasicConsumeArguments::new(&queue, "plain-bench");
    consume.manual_ack(true);
    let (_, mut deliveries) = consumer_channel.basic_consume_rx(consume).await.unwrap();
    let clock = Clock::new(total);
    let consumer = {
        let clock = clock.clone();
        let channel = consumer_channel.clone();
        tokio::spawn(async move {
            while let Some(message) = deliveries.recv().await {
                let tag = message.deliver.as_ref().unwrap().delivery_tag();
                let request: PaymentRequest =
                    rmp_serde::from_slice(message.content.as_ref().unwrap()).expect("decode");
                channel
                    .basic_ack(BasicAckArguments::new(tag, false))
                    .await
                    .expect("ack");
                clock.received(seq_of(&request));
                if clock.received.load(Ordering::Acquire) >= clock.total {
                    return;
                }
            }
        })
    };

    // A connection of its own for publishing, as agentcomm does (and RabbitMQ advises).
    let publishing = Connection::open(&open_arguments()).await.expect("connect");
    let publisher = publishing.open_channel(None).await.unwrap();
    let confirms = Arc::new(Confirms {
        waiters: Mutex::new(HashMap::new()),
    });
    publisher
        .register_callback(ConfirmCallback(confirms.clone()))
        .await
        .unwrap();
    publisher
        .confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();
    let next_tag = Arc::new(tokio::sync::Mutex::new(1u64));
    let started = Instant::now();
    run_publishers(&clock, in_flight, {
        let publisher = publisher.clone();
        move |seq| {
            let publisher = publisher.clone();
            let confirms = confirms.clone();
            let next_tag = next_tag.clone();
            async move {
                let mut body = rmp_serde::to_vec_named(&request(seq)).unwrap();
                let mut properties = amqprs::BasicProperties::default();
                properties
                    .with_delivery_mode(amqprs::DELIVERY_MODE_PERSISTENT)
                    .with_content_type("application/msgpack");
                if same_size() {
                    // As many bytes as agentcomm's frame (its default properties are these): what
                    // is left of the difference is the work in the client.
                    body.resize(body.len() + FRAME_OVERHEAD, 0);
                }
                let (sender, receiver) = oneshot::channel();
                {
                    let mut tag = next_tag.lock().await;
                    confirms.waiters.lock().unwrap().insert(*tag, sender);
                    publisher
                        .basic_publish(
                            properties,
                            body,
                            BasicPublishArguments::new(
                                &plain_exchange(exchange_name()),
                                routing_key,
                            ),
                        )
                        .await
                        .unwrap();
                    *tag += 1;
                }
                assert!(receiver.await.unwrap(), "nacked");
            }
        }
    })
    .await;
    wait_all(&clock).await;
    let elapsed = started.elapsed();
    consumer.await.unwrap();
    // The queue stays for the next round (deleted at the end, as agentcomm's group queue is): a
    // queue declared afresh every round made plain amqprs's first delivery about 1.3 ms slower.
    let _ = publishing.close().await;
    let _ = connection.close().await;
    summarize(&clock, elapsed)
}

/// How many bytes agentcomm's frame adds to the PaymentRequest payload (envelope fields).
const FRAME_OVERHEAD: usize = 215;

/// AGENTCOMM_BENCH_PLAIN_SIZE=agentcomm: plain amqprs pads its body to agentcomm's frame size, to
/// tell the cost of the bytes (broker, network) from the cost of the work in the client.
fn same_size() -> bool {
    static SAME: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SAME.get_or_init(|| std::env::var("AGENTCOMM_BENCH_PLAIN_SIZE").as_deref() == Ok("agentcomm"))
}

fn plain_exchange(exchange: &str) -> String {
    format!("{exchange}-plain")
}

static EXCHANGE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn exchange_name() -> &'static str {
    EXCHANGE.get().expect("set in main")
}

fn median(samples: &mut [Sample]) -> Sample {
    samples.sort_by(|a, b| a.throughput.total_cmp(&b.throughput));
    let mut p50: Vec<Duration> = samples.iter().map(|s| s.p50).collect();
    let mut p99: Vec<Duration> = samples.iter().map(|s| s.p99).collect();
    p50.sort();
    p99.sort();
    Sample {
        throughput: samples[samples.len() / 2].throughput,
        p50: p50[p50.len() / 2],
        p99: p99[p99.len() / 2],
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let address = {
        let args = open_arguments();
        format!("{}:{}", args.get_host(), args.get_port())
    };
    if !matches!(
        tokio::time::timeout(
            Duration::from_secs(3),
            tokio::net::TcpStream::connect(&address)
        )
        .await,
        Ok(Ok(_))
    ) {
        println!(
            "skipped: no RabbitMQ at {}",
            agentcomm_core::error::redact_url(&url())
        );
        return;
    }
    let exchange = format!("bench-{}", uuid::Uuid::now_v7().simple());
    EXCHANGE.set(exchange.clone()).unwrap();
    let rounds: usize = std::env::var("AGENTCOMM_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    // AGENTCOMM_BENCH_PROFILE=agentcomm|plain: run only that side (AGENTCOMM_BENCH_IN_FLIGHT
    // publishes in flight, default 64), for a profiler.
    if let Ok(side) = std::env::var("AGENTCOMM_BENCH_PROFILE") {
        let in_flight: usize = std::env::var("AGENTCOMM_BENCH_IN_FLIGHT")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|n| *n >= 1)
            .unwrap_or(64);
        let total = if in_flight == 1 { 600 } else { 10_000 } * factor() as u64;
        for _ in 0..rounds {
            let sample = if side == "plain" {
                plain_round(&exchange, total, in_flight).await
            } else {
                agentcomm_round(&exchange, total, in_flight).await
            };
            println!("{side}: {sample:?}");
        }
        cleanup(&exchange).await;
        return;
    }
    let configs = [
        (1usize, 600 * factor() as u64),
        (64, 10_000 * factor() as u64),
    ];
    // Warm up both paths (connections, queues, JIT-less but caches and the broker's own).
    let _ = agentcomm_round(&exchange, 500, 16).await;
    let _ = plain_round(&exchange, 500, 16).await;
    println!(
        "\nTyped PaymentRequest on RabbitMQ ({}), persistent + confirmed + manual ack, prefetch {PREFETCH}, {rounds} rounds alternating plain and agentcomm; medians (ratios: median of the per-round ratios)\n",
        agentcomm_core::error::redact_url(&url())
    );
    if same_size() {
        println!(
            "(AGENTCOMM_BENCH_PLAIN_SIZE=agentcomm: plain amqprs sends as many bytes as agentcomm)\n"
        );
    }
    println!(
        "| in flight | messages | plain amqprs msg/s | agentcomm msg/s | throughput ratio | plain p50 | agentcomm p50 | p50 difference | plain p99 | agentcomm p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (in_flight, total) in configs {
        let mut plain = Vec::new();
        let mut ours = Vec::new();
        for round in 0..rounds {
            // Alternate which goes first so that neither always runs on a warmer broker.
            if round % 2 == 0 {
                plain.push(plain_round(&exchange, total, in_flight).await);
                ours.push(agentcomm_round(&exchange, total, in_flight).await);
            } else {
                ours.push(agentcomm_round(&exchange, total, in_flight).await);
                plain.push(plain_round(&exchange, total, in_flight).await);
            }
        }
        // The machine is shared: compare each round's pair, then take the median of those ratios.
        let mut ratios: Vec<f64> = plain
            .iter()
            .zip(&ours)
            .map(|(plain, ours)| ours.throughput / plain.throughput)
            .collect();
        ratios.sort_by(f64::total_cmp);
        let mut p50_ratios: Vec<f64> = plain
            .iter()
            .zip(&ours)
            .map(|(plain, ours)| ours.p50.as_secs_f64() / plain.p50.as_secs_f64())
            .collect();
        p50_ratios.sort_by(f64::total_cmp);
        let plain = median(&mut plain);
        let ours = median(&mut ours);
        println!(
            "| {in_flight} | {total} | {:.0} | {:.0} | {:.1}% | {} | {} | {:+.1}% | {} | {} |",
            plain.throughput,
            ours.throughput,
            100.0 * ratios[ratios.len() / 2],
            ms(plain.p50),
            ms(ours.p50),
            100.0 * (p50_ratios[p50_ratios.len() / 2] - 1.0),
            ms(plain.p99),
            ms(ours.p99),
        );
    }
    cleanup(&exchange).await;
}

/// Deletes what the bench declared.
async fn cleanup(exchange: &str) {
    if let Ok(connection) = Connection::open(&open_arguments()).await {
        if let Ok(channel) = connection.open_channel(None).await {
            for queue in [
                topology::group_queue(exchange, "bench"),
                format!("{exchange}.dead-letters"),
                format!("{}.plain", plain_exchange(exchange)),
            ] {
                let _ = channel
                    .queue_delete(QueueDeleteArguments::new(&queue))
                    .await;
            }
            for name in [
                exchange.to_string(),
                format!("{exchange}.dlx"),
                plain_exchange(exchange),
            ] {
                let _ = channel
                    .exchange_delete(ExchangeDeleteArguments::new(&name))
                    .await;
            }
        }
        let _ = connection.close().await;
    }
}
