//! In-memory end-to-end typed throughput (publish, encode, route, decode, dispatch to a trivial handler)
//! and envelope encode + decode of a PaymentRequest.
//!
//! `cargo bench -p agentcomm-core --bench throughput`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agentcomm_core::Bus;
use agentcomm_core::prelude::*;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(direction = "request")]
struct PaymentRequest {
    amount: f64,
    user_id: String,
    payment_method: String,
}

fn request(i: u64) -> PaymentRequest {
    PaymentRequest {
        amount: 10.0 + i as f64,
        user_id: format!("user{}", i % 1000),
        payment_method: "credit_card".into(),
    }
}

#[agent(receives = [PaymentRequest])]
struct Counter {
    handled: Arc<AtomicU64>,
    target: Arc<AtomicU64>,
    done: Arc<Notify>,
}

impl Handle<PaymentRequest> for Counter {
    async fn handle(&self, _request: PaymentRequest, _ctx: &Context<Self>) -> HandlerResult {
        let handled = self.handled.fetch_add(1, Ordering::Relaxed) + 1;
        if handled == self.target.load(Ordering::Relaxed) {
            self.done.notify_one();
        }
        Ok(())
    }
}

#[agent(sends = [PaymentRequest])]
struct Client;

const BATCH: u64 = 20_000;

fn end_to_end(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let target = Arc::new(AtomicU64::new(u64::MAX));
    let done = Arc::new(Notify::new());
    let agents = runtime.block_on(async {
        let agents = Runtime::new(MemoryRouter::new());
        agents
            .spawn_with(
                Counter {
                    handled: handled.clone(),
                    target: target.clone(),
                    done: done.clone(),
                },
                AgentOptions::new().prefetch(4096),
            )
            .await
            .unwrap();
        agents
    });
    let publisher = agents.publisher::<Client>();
    let messages: Vec<PaymentRequest> = (0..BATCH).map(request).collect();

    let mut group = c.benchmark_group("memory_end_to_end");
    group.throughput(Throughput::Elements(BATCH));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(8));
    for (name, batched) in [("publish_one_by_one", false), ("publish_batch_256", true)] {
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter_custom(|iterations| {
                let publisher = publisher.clone();
                let messages = messages.clone();
                let (handled, target, done) = (handled.clone(), target.clone(), done.clone());
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iterations {
                        let start_count = handled.load(Ordering::Relaxed);
                        target.store(start_count + BATCH, Ordering::Relaxed);
                        let waiter = done.notified();
                        tokio::pin!(waiter);
                        waiter.as_mut().enable();
                        // The messages are made before the clock starts; the publisher runs as a task
                        // of the runtime (a worker thread), like an agent's or a client's code would.
                        let publishing = publisher.clone();
                        let chunks: Vec<Vec<PaymentRequest>> = messages
                            .chunks(256)
                            .map(<[PaymentRequest]>::to_vec)
                            .collect();
                        let start = Instant::now();
                        tokio::spawn(async move {
                            for chunk in chunks {
                                if batched {
                                    for result in publishing.publish_batch("bench", chunk).await {
                                        result.unwrap();
                                    }
                                } else {
                                    for message in chunk {
                                        publishing.publish("bench", message).await.unwrap();
                                    }
                                }
                            }
                        })
                        .await
                        .unwrap();
                        if handled.load(Ordering::Relaxed) < start_count + BATCH {
                            tokio::time::timeout(Duration::from_secs(30), waiter)
                                .await
                                .unwrap();
                        }
                        total += start.elapsed();
                    }
                    total
                }
            })
        });
    }
    group.finish();
}

fn envelope_codec(c: &mut Criterion) {
    let bus = Bus::new(
        Arc::new(MemoryRouter::new()),
        Codec::MessagePack,
        Duration::from_secs(1),
    );
    let channel = PaymentRequest::channel("request", "session456").unwrap();
    let message = request(7);
    let mut group = c.benchmark_group("envelope");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode_decode_payment_request", |b| {
        b.iter(|| {
            let envelope = bus.envelope(channel.clone(), &message).unwrap();
            let frame = bytes::Bytes::from(envelope.to_frame().unwrap());
            let back = Envelope::from_frame_bytes(frame).unwrap();
            let decoded: PaymentRequest = agentcomm_core::runtime::decode_message(&back).unwrap();
            std::hint::black_box(decoded);
        })
    });
    let frame = bytes::Bytes::from(
        bus.envelope(channel.clone(), &message)
            .unwrap()
            .to_frame()
            .unwrap(),
    );
    group.bench_function("encode_only", |b| {
        b.iter(|| {
            std::hint::black_box(
                bus.envelope(channel.clone(), &message)
                    .unwrap()
                    .to_frame()
                    .unwrap(),
            )
        })
    });
    group.bench_function("decode_only", |b| {
        b.iter_batched(
            || frame.clone(),
            |frame: bytes::Bytes| {
                let back = Envelope::from_frame_bytes(frame).unwrap();
                std::hint::black_box(
                    agentcomm_core::runtime::decode_message::<PaymentRequest>(&back).unwrap(),
                )
            },
            BatchSize::SmallInput,
        )
    });
    let envelope = bus.envelope(channel.clone(), &message).unwrap();
    group.bench_function("frame_encode_only", |b| {
        b.iter(|| std::hint::black_box(envelope.to_frame().unwrap()))
    });
    group.bench_function("frame_decode_only", |b| {
        b.iter(|| std::hint::black_box(Envelope::from_frame_bytes(frame.clone()).unwrap()))
    });
    group.bench_function("payload_encode_decode_only", |b| {
        b.iter(|| {
            let payload = Codec::MessagePack
                .encode("PaymentRequest", &message)
                .unwrap();
            std::hint::black_box(
                Codec::MessagePack
                    .decode::<PaymentRequest>("PaymentRequest", &payload)
                    .unwrap(),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, envelope_codec, end_to_end);
criterion_main!(benches);
