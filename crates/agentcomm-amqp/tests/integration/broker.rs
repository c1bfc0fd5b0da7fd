//! The RabbitMQ router against a real broker (RABBITMQ_URL): what a user checks.

use crate::common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use agentcomm_amqp::{AmqpRouter, topology};
use agentcomm_core::envelope::{Envelope, headers};
use agentcomm_core::router::{
    HealthStatus, NackAction, PublishOutcome, Router, SubscribeOptions, Subscription,
};
use agentcomm_core::{ChannelPattern, Error, parse_channel};

use crate::common::{Cleanup, Logs, Raw, STEP, broker_available, builder, unique, within};

fn envelope(channel: &str, n: u32) -> Envelope {
    Envelope::new(
        parse_channel(channel).expect("channel"),
        "application/json",
        format!(r#"{{"n":{n}}}"#).into_bytes(),
    )
}

fn pattern(text: &str) -> ChannelPattern {
    ChannelPattern::parse(text).expect("pattern")
}

/// Publishes `envelope()` and leaves once its frame went out: polled once (with the channel open,
/// the frame goes out in that poll), then dropped. On a loaded machine the broker's answer can come
/// back within that poll, and the caller is told: then it tries again. Returns how many callers were
/// told.
async fn publish_cut_short(router: &AmqpRouter, envelope: impl Fn() -> Envelope) -> u64 {
    let mut told = 0;
    while let Some(result) = futures::FutureExt::now_or_never(router.publish(envelope())) {
        told += 1;
        assert!(told < 10, "the publish was never cut short: {result:?}");
    }
    told
}

/// A router on the test broker with its own exchange.
async fn connect(exchange: &str) -> AmqpRouter {
    within("connect", builder(exchange).connect())
        .await
        .unwrap()
}

/// A member of group `g`, subscribed to every `Ping`.
async fn ping_member(router: &AmqpRouter) -> Subscription {
    within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(pattern("Ping:*:*")).group("g")),
    )
    .await
    .unwrap()
}

fn number(envelope: &Envelope) -> u32 {
    let text = std::str::from_utf8(envelope.payload()).expect("utf-8");
    text.trim_start_matches(r#"{"n":"#)
        .trim_end_matches('}')
        .parse()
        .expect("a number")
}

/// Reads `count` deliveries, acknowledging each; returns their numbers in arrival order.
async fn take(subscription: &mut Subscription, count: usize) -> Vec<u32> {
    let mut numbers = Vec::with_capacity(count);
    while numbers.len() < count {
        let delivery = within("a delivery", subscription.next())
            .await
            .expect("the stream ended early");
        numbers.push(number(delivery.envelope()));
        within("an ack", delivery.ack()).await.expect("ack");
    }
    numbers
}

/// Asserts nothing more arrives within `quiet`.
async fn assert_quiet(subscription: &mut Subscription, quiet: Duration) {
    if let Ok(Some(delivery)) = tokio::time::timeout(quiet, subscription.next()).await {
        panic!("unexpected delivery: {:?}", delivery.envelope());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_delivers_every_message_with_its_metadata_in_order() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-fanout");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = connect(&exchange).await;
    let mut first = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(pattern("Ping:*:*"))),
    )
    .await
    .unwrap();
    let mut second = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(pattern("*:event:s1"))),
    )
    .await
    .unwrap();
    let sample = envelope("Ping:event:s1", 0)
        .with_correlation_id("order-7")
        .with_reply_to("Pong:reply:inbox-1")
        .with_header("tenant", "acme")
        .with_attempt(3);
    assert_eq!(
        within("publish", router.publish(sample.clone()))
            .await
            .unwrap(),
        PublishOutcome::Accepted
    );
    for subscription in [&mut first, &mut second] {
        let delivery = within("a delivery", subscription.next()).await.unwrap();
        assert_eq!(delivery.envelope(), &sample, "the envelope arrives intact");
        assert!(!delivery.is_redelivered());
        within("ack", delivery.ack()).await.unwrap();
    }
    for n in 1..=100 {
        let outcome = within("publish", router.publish(envelope("Ping:event:s1", n)))
            .await
            .unwrap();
        assert_eq!(outcome, PublishOutcome::Accepted);
    }
    let expected: Vec<u32> = (1..=100).collect();
    assert_eq!(
        take(&mut first, 100).await,
        expected,
        "one channel stays in order"
    );
    assert_eq!(take(&mut second, 100).await, expected);

    // Messages on other channels are not delivered to either.
    within("publish", router.publish(envelope("Other:event:s2", 0)))
        .await
        .unwrap();
    assert_quiet(&mut first, Duration::from_millis(300)).await;
    let health = within("health", router.health()).await;
    assert!(health.connected);
    assert_eq!(health.get("delivered"), 202, "{health:?}");
    assert_eq!(health.get("acked"), 202, "{health:?}");
    assert!(health.round_trip.is_some());
    within("close", router.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_publishes_are_reported_and_dead_letters_are_kept() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-unroutable");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = connect(&exchange).await;
    let outcome = within("publish", router.publish(envelope("Nobody:request:s1", 1)))
        .await
        .unwrap();
    assert_eq!(outcome, PublishOutcome::Unroutable);
    // A batch mixing both: each result in order.
    let mut subscription = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(pattern("Somebody:*:*"))),
    )
    .await
    .unwrap();
    let batch = vec![
        envelope("Somebody:request:s1", 1),
        envelope("Nobody:request:s1", 2),
        envelope("Somebody:request:s1", 3),
    ];
    let results: Vec<PublishOutcome> = within("a batch", router.publish_batch(batch))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        results,
        [
            PublishOutcome::Accepted,
            PublishOutcome::Unroutable,
            PublishOutcome::Accepted
        ]
    );
    assert_eq!(take(&mut subscription, 2).await, [1, 3]);

    // Dead letters go to the durable dead-letter queue even with nobody subscribed.
    let original = envelope("Somebody:request:s9", 42);
    let dead = original
        .clone()
        .with_channel(original.channel().dead_letter())
        .with_header(headers::DEAD_LETTER_REASON, headers::REASON_HANDLER_FAILED);
    let outcome = within("publish a dead letter", router.publish(dead.clone()))
        .await
        .unwrap();
    assert_eq!(outcome, PublishOutcome::Accepted);
    let raw = Raw::open().await;
    let queue = router.dead_letter_queue().unwrap().to_string();
    let (properties, body) = raw.get(&queue).await.expect("the dead letter is kept");
    let kept = Envelope::from_frame(&body).unwrap();
    assert_eq!(kept, dead);
    assert_eq!(properties.delivery_mode(), Some(2), "persistent");
    assert_eq!(
        properties.content_type().map(String::as_str),
        Some("application/json")
    );
    assert_eq!(properties.message_id(), None, "not copied by default");
    let health = within("health", router.health()).await;
    assert_eq!(health.get("unroutable"), 2, "{health:?}");
    within("close", router.close()).await.unwrap();

    // Copied into the AMQP properties on request, for tooling; returns still match.
    let tooled = within(
        "connect",
        builder(&exchange).envelope_properties(true).connect(),
    )
    .await
    .unwrap();
    let outcome = within("publish", tooled.publish(envelope("Nobody:request:s1", 3)))
        .await
        .unwrap();
    assert_eq!(outcome, PublishOutcome::Unroutable);
    let replied = dead.clone().with_correlation_id("order-7");
    within("publish a dead letter", tooled.publish(replied.clone()))
        .await
        .unwrap();
    let (properties, _) = raw.get(&queue).await.expect("the dead letter is kept");
    assert_eq!(properties.message_id(), Some(&replied.id().to_string()));
    assert_eq!(
        properties.message_type().map(String::as_str),
        Some("Somebody")
    );
    assert_eq!(
        properties.correlation_id().map(String::as_str),
        Some("order-7")
    );
    assert_eq!(properties.timestamp(), Some(replied.timestamp_ms() / 1000));
    within("close", tooled.close()).await.unwrap();

    raw.close().await;
}

/// A basic.return names no delivery tag; it names the message, the exchange and the routing key. The
/// same envelope (one id) sent at once to a channel a queue listens on and to one nobody does: the
/// return of the second used to be matched by the id alone, so it marked whichever copy was first
/// still waiting for its confirm (the routed one, whose confirm waits for the queue to store it).
/// The copy nobody got was then reported accepted, lost without a word, and the delivered one
/// unroutable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_return_marks_its_own_publish_when_one_envelope_goes_to_two_channels() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-return-route");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = connect(&exchange).await;
    let mut subscription = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(pattern("Somebody:*:*"))),
    )
    .await
    .unwrap();
    let nobody = parse_channel("Nobody:request:s1").unwrap();
    let mut batch = Vec::new();
    for n in 0..50 {
        let routed = envelope("Somebody:request:s1", n);
        let unrouted = routed.clone().with_channel(nobody.clone());
        batch.push(routed);
        batch.push(unrouted);
    }
    let results = within("a batch", router.publish_batch(batch)).await;
    let wrong: Vec<String> = results
        .into_iter()
        .enumerate()
        .filter_map(|(i, result)| {
            let expected = if i % 2 == 0 {
                PublishOutcome::Accepted
            } else {
                PublishOutcome::Unroutable
            };
            match result {
                Ok(outcome) if outcome == expected => None,
                other => Some(format!("publish {i}: {other:?}, expected {expected:?}")),
            }
        })
        .collect();
    assert!(wrong.is_empty(), "{} wrong: {wrong:?}", wrong.len());
    assert_eq!(
        take(&mut subscription, 50).await,
        (0..50).collect::<Vec<_>>()
    );
    let health = within("health", router.health()).await;
    assert_eq!(health.get("unroutable"), 50, "{health:?}");
    assert_eq!(health.get("returned"), 50, "{health:?}");
    within("close", router.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_members_compete_and_every_group_gets_everything() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-groups");
    let _cleanup = Cleanup::new(
        &exchange,
        &[
            topology::group_queue(&exchange, "workers"),
            topology::group_queue(&exchange, "auditors"),
        ],
    );
    let router = connect(&exchange).await;
    let workers = |prefetch| {
        SubscribeOptions::new(pattern("Job:*:*"))
            .group("workers")
            .prefetch(prefetch)
    };
    let mut a = within("subscribe", router.subscribe(workers(5)))
        .await
        .unwrap();
    let mut b = within("subscribe", router.subscribe(workers(5)))
        .await
        .unwrap();
    // A member with another pattern widens the group's bindings (union).
    let mut c = within(
        "subscribe",
        router.subscribe(
            SubscribeOptions::new(pattern("Task:*:*"))
                .group("workers")
                .prefetch(5),
        ),
    )
    .await
    .unwrap();
    let mut auditors = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(pattern("Job:*:*")).group("auditors")),
    )
    .await
    .unwrap();
    let batch: Vec<Envelope> = (0..300)
        .map(|n| {
            envelope(
                if n % 3 == 0 {
                    "Task:request:s1"
                } else {
                    "Job:request:s1"
                },
                n,
            )
        })
        .collect();
    for result in within("a batch", router.publish_batch(batch)).await {
        result.unwrap();
    }
    let mut seen = BTreeMap::<u32, usize>::new();
    let mut per_member = [0usize; 3];
    let deadline = Instant::now() + STEP;
    while seen.len() < 300 && Instant::now() < deadline {
        for (index, member) in [&mut a, &mut b, &mut c].into_iter().enumerate() {
            while let Some(delivery) = member.try_next() {
                *seen.entry(number(delivery.envelope())).or_default() += 1;
                per_member[index] += 1;
                within("ack", delivery.ack()).await.unwrap();
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(seen.len(), 300, "every message reached the group");
    assert!(seen.values().all(|count| *count == 1), "each exactly once");
    assert!(
        per_member.iter().all(|count| *count > 0),
        "the members shared the work: {per_member:?}"
    );
    let audited = take(&mut auditors, 200).await;
    assert_eq!(audited.len(), 200, "the other group got every Job");
    assert_quiet(&mut auditors, Duration::from_millis(300)).await;
    within("close", router.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_queue_keeps_messages_while_no_member_is_connected() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-persist");
    let _cleanup = Cleanup::new(&exchange, &[topology::group_queue(&exchange, "billing")]);
    let router = connect(&exchange).await;
    let options = SubscribeOptions::new(pattern("Order:*:*")).group("billing");
    let subscription = within("subscribe", router.subscribe(options.clone()))
        .await
        .unwrap();
    within("close", subscription.close()).await.unwrap();
    drop(subscription);
    within("close", router.close()).await.unwrap();

    // Another process publishes while nobody consumes.
    let publisher = within("connect", builder(&exchange).connect())
        .await
        .unwrap();
    for n in 0..50 {
        let outcome = within(
            "publish",
            publisher.publish(envelope("Order:request:s1", n)),
        )
        .await
        .unwrap();
        assert_eq!(
            outcome,
            PublishOutcome::Accepted,
            "the durable queue takes it"
        );
    }
    within("close", publisher.close()).await.unwrap();

    let consumer = within("connect", builder(&exchange).connect())
        .await
        .unwrap();
    let mut subscription = within("subscribe", consumer.subscribe(options))
        .await
        .unwrap();
    assert_eq!(
        take(&mut subscription, 50).await,
        (0..50).collect::<Vec<_>>()
    );
    within("close", consumer.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacked_and_abandoned_deliveries_come_back() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-nack");
    let _cleanup = Cleanup::new(&exchange, &[topology::group_queue(&exchange, "g")]);
    let router = connect(&exchange).await;
    let mut subscription = ping_member(&router).await;
    within("publish", router.publish(envelope("Ping:event:s1", 7)))
        .await
        .unwrap();
    let delivery = within("a delivery", subscription.next()).await.unwrap();
    within("nack", delivery.nack(NackAction::Requeue))
        .await
        .unwrap();
    let again = within("a redelivery", subscription.next()).await.unwrap();
    assert_eq!(number(again.envelope()), 7);
    assert!(again.is_redelivered());
    drop(again); // abandoned: dropped unsettled
    let third = within("a redelivery", subscription.next()).await.unwrap();
    assert_eq!(number(third.envelope()), 7);
    assert!(third.is_redelivered());
    within("ack", third.ack()).await.unwrap();
    assert_quiet(&mut subscription, Duration::from_millis(300)).await;
    let health = within("health", router.health()).await;
    assert_eq!(health.get("requeued"), 2, "{health:?}");
    assert_eq!(health.get("abandoned"), 1, "{health:?}");
    within("close", router.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_subscription_gives_back_what_it_buffered_at_once() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-dropped");
    let _cleanup = Cleanup::new(&exchange, &[topology::group_queue(&exchange, "g")]);
    // A close timeout far above the bound asserted below: the buffer must not wait for it.
    let router = within(
        "connect",
        builder(&exchange)
            .close_timeout(Duration::from_secs(15))
            .connect(),
    )
    .await
    .unwrap();
    let options = SubscribeOptions::new(pattern("Ping:*:*"))
        .group("g")
        .prefetch(10);
    let mut first = within("subscribe", router.subscribe(options.clone()))
        .await
        .unwrap();
    for n in 0..5 {
        within("publish", router.publish(envelope("Ping:event:s1", n)))
            .await
            .unwrap();
    }
    assert_eq!(take(&mut first, 1).await, [0]);
    let deadline = Instant::now() + STEP;
    while first.buffered() < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(first.buffered(), 4, "the rest waits in the buffer");
    let dropped_at = Instant::now();
    drop(first);
    let mut second = within("subscribe", router.subscribe(options))
        .await
        .unwrap();
    assert_eq!(take(&mut second, 4).await, [1, 2, 3, 4]);
    let waited = dropped_at.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "the buffered messages came back after {waited:?}: nobody can read them once the subscription is dropped"
    );
    let health = within("health", router.health()).await;
    assert_eq!(health.get("acked"), 5, "{health:?}");
    within("close", router.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_retry_returns_to_its_own_queue_only_after_the_delay() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-retry");
    let workers_queue = topology::group_queue(&exchange, "workers");
    let _cleanup = Cleanup::new(
        &exchange,
        &[
            topology::retry_queue(&workers_queue, 500),
            workers_queue,
            topology::group_queue(&exchange, "others"),
        ],
    );
    let router = connect(&exchange).await;
    let mut workers = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(pattern("Ping:*:*")).group("workers")),
    )
    .await
    .unwrap();
    let mut others = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(pattern("Ping:*:*")).group("others")),
    )
    .await
    .unwrap();
    within("publish", router.publish(envelope("Ping:event:s1", 1)))
        .await
        .unwrap();
    assert_eq!(take(&mut others, 1).await, [1]);
    let delivery = within("a delivery", workers.next()).await.unwrap();
    assert_eq!(delivery.envelope().attempt(), 1);
    let id = delivery.envelope().id();
    let nacked_at = Instant::now();
    within(
        "retry",
        delivery.nack(NackAction::Retry {
            delay: Duration::from_millis(500),
        }),
    )
    .await
    .unwrap();
    let retried = within("the retry", workers.next()).await.unwrap();
    let waited = nacked_at.elapsed();
    assert!(
        waited >= Duration::from_millis(400),
        "the retry came after {waited:?}"
    );
    assert_eq!(retried.envelope().id(), id);
    assert_eq!(
        retried.envelope().attempt(),
        2,
        "the attempt count survives"
    );
    within("ack", retried.ack()).await.unwrap();
    assert_quiet(&mut others, Duration::from_millis(300)).await;
    assert_quiet(&mut workers, Duration::from_millis(300)).await;
    let health = within("health", router.health()).await;
    assert_eq!(health.get("retried"), 1, "{health:?}");
    within("close", router.close()).await.unwrap();
}

/// A `nack(Retry)` whose retry queue cannot be declared (here a queue of that name exists with
/// other arguments: RabbitMQ refuses the declaration, 406) sends the message straight back to its
/// queue. That used to return `Ok`, a delayed retry as far as its caller could tell, while the retry
/// came back at once (a handler failing on every attempt ran them all back to back), with only a
/// warning in the log. The caller now gets an error naming the cause, and health counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_whose_delay_cannot_be_scheduled_says_so_and_is_counted() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-retry-undelayed");
    let group_queue = topology::group_queue(&exchange, "g");
    let retry_queue = topology::retry_queue(&group_queue, 5000);
    let _cleanup = Cleanup::new(&exchange, &[group_queue.clone(), retry_queue.clone()]);
    // The retry queue, declared by someone else without its TTL and dead-lettering.
    let raw = Raw::open().await;
    within(
        "declare the retry queue with other arguments",
        raw.channel.queue_declare(
            amqprs::channel::QueueDeclareArguments::durable_client_named(&retry_queue),
        ),
    )
    .await
    .expect("declare");
    raw.close().await;
    let router = connect(&exchange).await;
    let mut member = ping_member(&router).await;
    within("publish", router.publish(envelope("Ping:event:s1", 1)))
        .await
        .unwrap();
    let delivery = within("a delivery", member.next()).await.unwrap();
    let id = delivery.envelope().id();
    let nacked_at = Instant::now();
    let error = within(
        "retry",
        delivery.nack(NackAction::Retry {
            delay: Duration::from_secs(5),
        }),
    )
    .await
    .expect_err("a retry sent back at once, told it was delayed");
    let text = error.to_string();
    assert!(text.contains("PRECONDITION_FAILED"), "{text}");
    assert!(text.contains("at once"), "{text}");
    assert!(text.contains(&id.to_string()), "{text}");
    // It comes back at once (well before its 5 s), as the next attempt, and only once.
    let again = within("the retry", member.next()).await.unwrap();
    let waited = nacked_at.elapsed();
    assert!(
        waited < Duration::from_secs(4),
        "came back after {waited:?}"
    );
    assert_eq!(again.envelope().id(), id);
    assert_eq!(again.envelope().attempt(), 2);
    within("ack", again.ack()).await.unwrap();
    assert_quiet(&mut member, Duration::from_millis(300)).await;
    let health = within("health", router.health()).await;
    assert_eq!(health.get("retries_undelayed"), 1, "{health:?}");
    assert_eq!(health.get("retried"), 1, "{health:?}");
    within("close", router.close()).await.unwrap();
}

/// A `nack(Retry)` cut short (its future dropped: a caller's timeout, a `select!`) once its copy was
/// on its way to the retry queue, before the confirm, gives the original back, and RabbitMQ stores
/// the copy too: the message came twice, with nothing saying so but the warning of a delivery left
/// unsettled. That is counted in `copies_unconfirmed` now, and logged with the message id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_cut_short_while_its_copy_is_unconfirmed_says_the_message_may_come_twice() {
    if !broker_available().await {
        return;
    }
    let logs = Logs::capture();
    let exchange = unique("t-retry-cut-copying");
    let group_queue = topology::group_queue(&exchange, "g");
    let delay = Duration::from_secs(1);
    let retry_queue = topology::retry_queue(&group_queue, topology::retry_bucket_ms(delay));
    let _cleanup = Cleanup::new(&exchange, &[group_queue, retry_queue]);
    let router = connect(&exchange).await;
    let mut member = ping_member(&router).await;
    // A first retry declares the retry queue, so that the next one sends its copy at its first poll.
    within("publish", router.publish(envelope("Ping:event:s1", 1)))
        .await
        .unwrap();
    let first = within("a delivery", member.next()).await.unwrap();
    within("a first retry", first.nack(NackAction::Retry { delay }))
        .await
        .unwrap();
    let retried = within("the first retry", member.next()).await.unwrap();
    within("ack", retried.ack()).await.unwrap();
    within("publish", router.publish(envelope("Ping:event:s1", 2)))
        .await
        .unwrap();
    let delivery = within("a delivery", member.next()).await.unwrap();
    let id = delivery.envelope().id();
    // Polled once: the copy's frame goes out, and the retry is dropped while it waits for the confirm.
    let cut = futures::FutureExt::now_or_never(delivery.nack(NackAction::Retry { delay }));
    assert!(cut.is_none(), "the retry was not cut short: {cut:?}");
    let health = within("health", router.health()).await;
    assert_eq!(health.get("copies_unconfirmed"), 1, "{health:?}");
    assert_eq!(health.get("abandoned"), 1, "{health:?}");
    let warned = logs.lines_with(&id.to_string());
    assert!(
        warned.iter().any(|line| line.contains("may come twice")),
        "{warned:?}"
    );
    // Both come: the original, given back, and the copy RabbitMQ stored, after its delay.
    let mut attempts = Vec::new();
    for _ in 0..2 {
        let again = within("the message again", member.next()).await.unwrap();
        assert_eq!(again.envelope().id(), id);
        attempts.push(again.envelope().attempt());
        within("ack", again.ack()).await.unwrap();
    }
    attempts.sort_unstable();
    assert_eq!(attempts, [1, 2]);
    assert_quiet(&mut member, Duration::from_millis(500)).await;
    within("close", router.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_that_are_not_envelopes_are_dead_lettered_and_counted() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-malformed");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = connect(&exchange).await;
    let mut subscription = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(pattern("Ping:*:*"))),
    )
    .await
    .unwrap();
    let mut dead_letters = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(pattern("DeadLetter:*:*"))),
    )
    .await
    .unwrap();
    let raw = Raw::open().await;
    raw.publish(&exchange, "Ping.event.s1", b"\xc1 not a frame")
        .await;
    within("publish", router.publish(envelope("Ping:event:s1", 2)))
        .await
        .unwrap();
    assert_eq!(
        take(&mut subscription, 1).await,
        [2],
        "the garbage never reaches the handler"
    );
    // The raw publish is not confirmed, so the garbage may reach the queue after message 2: the
    // subscription is read on while the dead letter is awaited, as an agent reads its queue.
    let dead = within("the dead letter", async {
        tokio::select! {
            dead = dead_letters.next() => dead,
            delivery = subscription.next() => {
                panic!("the garbage reached the handler: {:?}", delivery.map(|d| d.envelope().clone()))
            }
        }
    })
    .await
    .unwrap();
    let envelope = dead.envelope();
    assert_eq!(envelope.class(), agentcomm_core::envelope::MALFORMED_CLASS);
    assert_eq!(envelope.payload().as_ref(), b"\xc1 not a frame");
    assert_eq!(
        envelope.header(headers::DEAD_LETTER_REASON),
        Some(headers::REASON_MALFORMED_FRAME)
    );
    assert!(
        envelope
            .header(headers::SOURCE)
            .unwrap()
            .contains("Ping.event.s1")
    );
    within("ack", dead.ack()).await.unwrap();
    let health = within("health", router.health()).await;
    assert_eq!(health.get("malformed"), 1, "{health:?}");
    within("close", router.close()).await.unwrap();

    raw.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_with_amqp_wildcards_route_exactly() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-escape");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = connect(&exchange).await;
    let mut dotted = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(pattern("billing.Invoice:*:s#1"))),
    )
    .await
    .unwrap();
    let mut plain = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(pattern("billing:*:*"))),
    )
    .await
    .unwrap();
    within(
        "publish",
        router.publish(envelope("billing.Invoice:event:s#1", 1)),
    )
    .await
    .unwrap();
    within(
        "publish",
        router.publish(envelope("billing.Invoice:event:s2", 2)),
    )
    .await
    .unwrap();
    within(
        "publish",
        router.publish(envelope("billing:Invoice.event:s#1", 3)),
    )
    .await
    .unwrap();
    assert_eq!(take(&mut dotted, 1).await, [1]);
    assert_eq!(take(&mut plain, 1).await, [3]);
    assert_quiet(&mut dotted, Duration::from_millis(300)).await;
    assert_quiet(&mut plain, Duration::from_millis(100)).await;
    within("close", router.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_ends_streams_after_what_they_buffered_and_refuses_new_work() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-close");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = connect(&exchange).await;
    let mut subscription = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(pattern("Ping:*:*")).prefetch(10)),
    )
    .await
    .unwrap();
    let batch: Vec<Envelope> = (0..5).map(|n| envelope("Ping:event:s1", n)).collect();
    for result in within("a batch", router.publish_batch(batch)).await {
        assert_eq!(result.unwrap(), PublishOutcome::Accepted);
    }
    let first = within("a delivery", subscription.next()).await.unwrap();
    // Wait until the other four are buffered.
    let deadline = Instant::now() + STEP;
    while subscription.buffered() < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    within("close the subscription", subscription.close())
        .await
        .unwrap();
    within("ack after close", first.ack()).await.unwrap();
    let rest = take(&mut subscription, 4).await;
    assert_eq!(
        rest,
        [1, 2, 3, 4],
        "buffered deliveries stay readable and settle"
    );
    assert!(
        within("the end", subscription.next()).await.is_none(),
        "then the stream ends"
    );
    // Now nothing matches: the fan-out queue is gone.
    let outcome = within("publish", router.publish(envelope("Ping:event:s1", 9)))
        .await
        .unwrap();
    assert_eq!(outcome, PublishOutcome::Unroutable);

    let mut other = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(pattern("Pong:*:*"))),
    )
    .await
    .unwrap();
    within("close the router", router.close()).await.unwrap();
    assert!(within("the end", other.next()).await.is_none());
    let error = within(
        "publish after close",
        router.publish(envelope("Ping:event:s1", 1)),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, Error::Closed { .. }), "{error}");
    let error = within(
        "subscribe after close",
        router.subscribe(SubscribeOptions::new(pattern("Ping:*:*"))),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, Error::Closed { .. }), "{error}");
    let health = within("health", router.health()).await;
    assert!(!health.connected);
    assert_eq!(health.detail, "closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_name_the_url_without_its_password() {
    if !broker_available().await {
        return;
    }
    // Nothing listens on port 1.
    let error = within(
        "a refused connection",
        AmqpRouter::connect("amqp://app:hunter2@127.0.0.1:1/%2f"),
    )
    .await
    .unwrap_err();
    let text = error.to_string();
    assert!(matches!(error, Error::Connection { .. }), "{text}");
    assert!(text.contains("amqp://app:***@127.0.0.1:1/%2f"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");

    let address = common::broker_address();
    let error = within(
        "a wrong password",
        AmqpRouter::connect(format!("amqp://guest:wrong-pass-123@{address}/%2f")),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(!error.contains("wrong-pass-123"), "{error}");
    assert!(
        error.contains("refused the login of user 'guest'"),
        "{error}"
    );
    assert!(!error.contains("cannot reach"), "{error}");
    assert!(
        error.contains("check the user name and password"),
        "{error}"
    );

    let error = within(
        "TLS to a plain port",
        AmqpRouter::builder(format!("amqps://guest:guest-tls@{address}/%2f"))
            .connect_timeout(Duration::from_secs(5))
            .connect(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(error.contains("amqps://guest:***@"), "{error}");
    assert!(error.contains("does not answer TLS"), "{error}");

    let error = within("a bad URL", AmqpRouter::connect("http://x:pw123@h"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("the scheme 'http' is not supported"),
        "{error}"
    );
    assert!(!error.contains("pw123"), "{error}");

    let exchange = unique("t-errors");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = connect(&exchange).await;
    let debug = format!("{router:?}");
    assert!(debug.contains("connected"), "{debug}");
    if let Some((_, password)) = common::url()
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
    {
        assert!(!debug.contains(&format!(":{password}@")), "{debug}");
    }
    within("close", router.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_runs_agents_on_rabbitmq() {
    use agentcomm_core::prelude::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Serialize, Deserialize, Message)]
    #[message(direction = "request")]
    struct Charge {
        amount: f64,
    }

    #[derive(Debug, Serialize, Deserialize, Message)]
    #[message(direction = "response")]
    struct Charged {
        ok: bool,
    }

    #[agent(receives = [Charge], sends = [Charged])]
    struct Biller;

    impl Handle<Charge> for Biller {
        async fn handle(&self, charge: Charge, ctx: &Context<Self>) -> HandlerResult {
            if charge.amount < 0.0 {
                return Err(HandlerError::permanent("negative amount"));
            }
            ctx.reply(Charged {
                ok: charge.amount > 0.0,
            })
            .await?;
            Ok(())
        }
    }

    #[agent(sends = [Charge])]
    struct Shop;

    if !broker_available().await {
        return;
    }
    let exchange = unique("t-runtime");
    let _cleanup = Cleanup::new(&exchange, &[topology::group_queue(&exchange, "Biller")]);
    let router = connect(&exchange).await;
    let runtime = Runtime::new(router.clone());
    within("spawn", runtime.spawn(Biller)).await.unwrap();
    let shop = runtime.publisher::<Shop>();
    let reply: Charged = within("a request", shop.request("s1", Charge { amount: 10.0 }))
        .await
        .unwrap();
    assert!(reply.ok);
    // A permanent failure is dead-lettered into the dead-letter queue.
    within("publish", shop.publish("s1", Charge { amount: -1.0 }))
        .await
        .unwrap();
    let raw = Raw::open().await;
    let (_, body) = raw
        .get(router.dead_letter_queue().unwrap())
        .await
        .expect("a dead letter");
    let dead = Envelope::from_frame(&body).unwrap();
    assert_eq!(dead.class(), "Charge");
    assert_eq!(
        dead.header(headers::DEAD_LETTER_REASON),
        Some(headers::REASON_REJECTED)
    );
    let report = within("shutdown", runtime.shutdown(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(report.aborted, 0);

    raw.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_groups_work_and_mismatched_queues_fail_clearly() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-quorum");
    let second_dead_letter_queue = unique("dlq");
    let _cleanup = Cleanup::new(
        &exchange,
        &[
            topology::group_queue(&exchange, "q"),
            second_dead_letter_queue.clone(),
        ],
    );
    let router = within(
        "connect",
        builder(&exchange)
            .queue_type(agentcomm_amqp::QueueType::Quorum)
            .delivery_limit(5)
            .connect(),
    )
    .await
    .unwrap();
    let options = SubscribeOptions::new(pattern("Ping:*:*")).group("q");
    let mut subscription = within("subscribe", router.subscribe(options.clone()))
        .await
        .unwrap();
    within("publish", router.publish(envelope("Ping:event:s1", 5)))
        .await
        .unwrap();
    assert_eq!(take(&mut subscription, 1).await, [5]);
    within("close", router.close()).await.unwrap();

    // The same group queue, declared as classic by a misconfigured process, is refused clearly.
    // (The first router's dead-letter queue is quorum: this one names its own.)
    let classic = within(
        "connect",
        builder(&exchange)
            .dead_letter_queue(&second_dead_letter_queue)
            .connect(),
    )
    .await
    .unwrap();
    let error = within("subscribe", classic.subscribe(options))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("inequivalent"), "{error}");
    assert!(
        error.contains("already exists with other settings"),
        "{error}"
    );
    // The router still works after the broker closed that channel.
    let outcome = within("publish", classic.publish(envelope("Ping:event:s1", 6)))
        .await
        .unwrap();
    assert_eq!(
        outcome,
        PublishOutcome::Accepted,
        "the quorum group queue takes it"
    );
    assert_eq!(
        classic.dead_letter_queue(),
        Some(second_dead_letter_queue.as_str())
    );
    within("close", classic.close()).await.unwrap();
}

/// A router on an exchange of its own (named after `name`) with quorum queues and a `delivery_limit`
/// of 2, and one member of group `g` on `Ping:*:*` with a prefetch of 1: the group's queue, the
/// clean-up guard, the router and the member.
async fn quorum_group_of_one(name: &str) -> (String, Cleanup, AmqpRouter, Subscription) {
    let exchange = unique(name);
    let queue = topology::group_queue(&exchange, "g");
    let cleanup = Cleanup::new(&exchange, std::slice::from_ref(&queue));
    let router = within(
        "connect",
        builder(&exchange)
            .queue_type(agentcomm_amqp::QueueType::Quorum)
            .delivery_limit(2)
            .connect(),
    )
    .await
    .unwrap();
    let member = within(
        "subscribe",
        router.subscribe(
            SubscribeOptions::new(pattern("Ping:*:*"))
                .group("g")
                .prefetch(1),
        ),
    )
    .await
    .unwrap();
    (queue, cleanup, router, member)
}

/// A delivery handed back unhandled (`Delivery::give_back`) from a classic queue is requeued and
/// counted in `requeued`: no handler saw it, so it is not `abandoned`, which is what giving it back
/// used to count it as (with a warning that a delivery was left unsettled), at every graceful stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_given_back_unhandled_from_a_classic_queue_is_requeued_not_abandoned() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-classic-give-back");
    let queue = topology::group_queue(&exchange, "g");
    let _cleanup = Cleanup::new(&exchange, std::slice::from_ref(&queue));
    let router = connect(&exchange).await;
    let mut member = ping_member(&router).await;
    within("publish", router.publish(envelope("Ping:event:s1", 7)))
        .await
        .unwrap();
    let delivery = within("a delivery", member.next()).await.unwrap();
    delivery.give_back();
    let again = within("the delivery given back", member.next())
        .await
        .unwrap();
    assert_eq!(number(again.envelope()), 7);
    assert!(again.is_redelivered(), "requeued, not sent again as a copy");
    within("ack", again.ack()).await.unwrap();
    let deadline = Instant::now() + STEP;
    loop {
        let health = within("health", router.health()).await;
        assert_eq!(health.get("abandoned"), 0, "{health:?}");
        if health.get("requeued") == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not counted as requeued: {health:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    within("close", router.close()).await.unwrap();
}

/// A delivery handed back unhandled (`Delivery::give_back`, what the runtime does at a graceful stop
/// with deliveries still buffered) is not an attempt: a quorum queue's `delivery_limit` must not
/// dead-letter a message no handler ever saw, however often it was given back. RabbitMQ counts every
/// requeue of a quorum queue's message in `x-delivery-count`, and a plain requeue used to be all a
/// give-back did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_given_back_unhandled_is_not_an_attempt_for_a_quorum_delivery_limit() {
    if !broker_available().await {
        return;
    }
    // A prefetch of 1: the copy comes only once the original was acknowledged.
    let (_queue, _cleanup, router, mut member) = quorum_group_of_one("t-quorum-give-back").await;
    let published = envelope("Ping:event:s1", 7);
    within("publish", router.publish(published.clone()))
        .await
        .unwrap();
    // More give-backs than the limit allows deliveries.
    for _ in 0..4 {
        let delivery = within("a delivery", member.next()).await.unwrap();
        assert_eq!(number(delivery.envelope()), 7);
        delivery.give_back();
    }
    let delivery = within("the message after 4 give-backs", member.next())
        .await
        .unwrap();
    assert_eq!(number(delivery.envelope()), 7);
    // The copy is the same message: its id, class and attempt are kept.
    assert_eq!(delivery.envelope().id(), published.id());
    assert_eq!(delivery.envelope().attempt(), published.attempt());
    within("ack", delivery.ack()).await.unwrap();
    let dead_letters = router.dead_letter_queue().unwrap().to_string();
    let raw = Raw::open().await;
    assert_eq!(raw.count(&dead_letters).await, Some(0), "dead-lettered");
    let health = within("health", router.health()).await;
    assert_eq!(
        health.get("abandoned"),
        0,
        "given back is not abandoned: {health:?}"
    );
    assert_eq!(health.get("requeued"), 4, "{health:?}");
    within("close", router.close()).await.unwrap();
    raw.close().await;
}

/// The copy a quorum queue's delivery given back unhandled goes back as keeps what a requeue would
/// have kept of it: the AMQP properties its publisher set (a per-message TTL, a priority, headers of
/// its own), not only agentcomm's. Nor is it a new publish: it counts in `requeued`, not
/// `published`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_given_back_as_a_copy_keeps_its_amqp_properties() {
    if !broker_available().await {
        return;
    }
    let (queue, _cleanup, router, mut member) = quorum_group_of_one("t-copy-props").await;
    // Published by another client, with properties agentcomm does not set itself.
    let published = envelope("Ping:event:s1", 8);
    let raw = Raw::open().await;
    let mut own_headers = amqprs::FieldTable::new();
    own_headers.insert("trace-id".try_into().unwrap(), "abc".into());
    let mut properties = amqprs::BasicProperties::default();
    properties
        .with_content_type("application/json")
        .with_delivery_mode(2)
        .with_expiration("600000")
        .with_priority(3)
        .with_app_id("billing")
        .with_headers(own_headers);
    within(
        "raw publish",
        raw.channel.basic_publish(
            properties,
            published.to_frame().unwrap(),
            amqprs::channel::BasicPublishArguments::new("", &queue),
        ),
    )
    .await
    .unwrap();
    let delivery = within("a delivery", member.next()).await.unwrap();
    assert_eq!(number(delivery.envelope()), 8);
    delivery.give_back();
    let deadline = Instant::now() + STEP;
    loop {
        let health = within("health", router.health()).await;
        if health.get("requeued") == 1 {
            assert_eq!(
                health.get("published"),
                0,
                "a copy is no publish: {health:?}"
            );
            assert_eq!(health.get("confirmed"), 0, "{health:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not given back as a copy: {health:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The member may hold the copy: dropped, it leaves it in the queue for the raw client.
    drop(member);
    let (copy, body) = within("the copy", raw.get(&queue)).await.expect("the copy");
    assert_eq!(
        Envelope::from_frame(&body).unwrap().id(),
        published.id(),
        "the same message"
    );
    assert_eq!(
        copy.expiration().map(String::as_str),
        Some("600000"),
        "{copy:?}"
    );
    assert_eq!(copy.priority(), Some(3), "{copy:?}");
    assert_eq!(
        copy.app_id().map(String::as_str),
        Some("billing"),
        "{copy:?}"
    );
    let trace = copy.headers().and_then(|headers| {
        headers
            .as_ref()
            .iter()
            .find(|(key, _)| key.as_ref() == "trace-id")
            .map(|(_, value)| value.clone())
    });
    assert_eq!(trace, Some(amqprs::FieldValue::from("abc")), "{copy:?}");
    within("close", router.close()).await.unwrap();
    raw.close().await;
}

/// amqprs never frees the id of a channel the broker closes, and a connection has `channel_max`
/// (2,047 on RabbitMQ) of them: a group queue that exists with other settings, whose subscribe (or
/// restore, every 10 s) the broker refuses by closing the channel, must not use them up. Without the
/// recycle, every channel.open on the consuming connection fails after that many refusals, and the
/// consumers on it stop receiving, while the router still reports itself healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_channels_closed_by_the_broker_than_a_connection_has_ids_are_survived() {
    use amqprs::channel::QueueDeclareArguments;

    if !broker_available().await {
        return;
    }
    let exchange = unique("t-channel-ids");
    let mismatched = topology::group_queue(&exchange, "mismatched");
    let _cleanup = Cleanup::new(
        &exchange,
        &[mismatched.clone(), topology::group_queue(&exchange, "g")],
    );
    // The group queue, declared by another process without the router's dead-letter exchange.
    let raw = Raw::open().await;
    let channel_max = usize::from(raw.connection.channel_max());
    within(
        "declare",
        raw.channel
            .queue_declare(QueueDeclareArguments::durable_client_named(&mismatched)),
    )
    .await
    .unwrap();
    raw.close().await;
    let router = connect(&exchange).await;
    let mut member = ping_member(&router).await;

    let started = Instant::now();
    let refused_options = SubscribeOptions::new(pattern("Ping:*:*")).group("mismatched");
    let (mut refused, mut other) = (0, Vec::new());
    while refused <= channel_max {
        let error = within(
            "a refused subscribe",
            router.subscribe(refused_options.clone()),
        )
        .await
        .expect_err("the broker refuses the mismatched group queue")
        .to_string();
        if error.contains("PRECONDITION_FAILED") {
            refused += 1;
        } else {
            // A subscribe that met the recycle may fail otherwise; a few at most.
            other.push(error);
            assert!(
                other.len() <= 20,
                "after {refused} refusals, subscribes fail otherwise: {other:#?}"
            );
        }
    }
    println!(
        "{refused} channels closed by the broker in {:.1?}; other errors: {other:?}",
        started.elapsed()
    );

    // Everything a user does still works: the member restored, a publish, a new subscription.
    let deadline = Instant::now() + STEP;
    let health = loop {
        let health = within("health", router.health()).await;
        if health.status == HealthStatus::Healthy && health.round_trip.is_some() {
            break health;
        }
        assert!(Instant::now() < deadline, "never healthy again: {health:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(health.get("channel_id_recycles") >= 1, "{health:?}");
    assert!(
        health.get("channel_id_recycles") <= (refused / (channel_max / 2)) as u64,
        "recycled more often than the ids require: {health:?}"
    );
    assert_eq!(health.get("connection_losses"), 0, "{health:?}");
    let mut fresh = within(
        "a new subscription",
        router.subscribe(SubscribeOptions::new(pattern("Ping:*:*"))),
    )
    .await
    .expect("subscribing works again");
    let outcome = within("publish", router.publish(envelope("Ping:event:s1", 7)))
        .await
        .unwrap();
    assert_eq!(outcome, PublishOutcome::Accepted);
    assert_eq!(take(&mut fresh, 1).await, [7], "the new subscription");
    assert_eq!(take(&mut member, 1).await, [7], "the member, restored");
    let health = within("health", router.health()).await;
    assert!(health.get("consumers_restored") >= 1, "{health:?}");
    within("close", router.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_broker_refuses_is_an_error_not_silence() {
    use amqprs::channel::{QueueBindArguments, QueueDeclareArguments};

    if !broker_available().await {
        return;
    }
    let exchange = unique("t-nacked");
    let full = format!("{exchange}.full");
    let _cleanup = Cleanup::new(&exchange, std::slice::from_ref(&full));
    let router = connect(&exchange).await;
    // A queue that holds one message and refuses the next: RabbitMQ nacks the publish.
    let raw = Raw::open().await;
    let mut arguments = amqprs::FieldTable::new();
    arguments.insert("x-max-length".try_into().unwrap(), amqprs::FieldValue::l(1));
    arguments.insert(
        "x-overflow".try_into().unwrap(),
        amqprs::FieldValue::from("reject-publish"),
    );
    let mut declare = QueueDeclareArguments::durable_client_named(&full);
    declare.arguments(arguments);
    within("declare", raw.channel.queue_declare(declare))
        .await
        .unwrap();
    within(
        "bind",
        raw.channel
            .queue_bind(QueueBindArguments::new(&full, &exchange, "Full.*.*")),
    )
    .await
    .unwrap();
    let first = within("publish", router.publish(envelope("Full:event:s1", 1)))
        .await
        .unwrap();
    assert_eq!(first, PublishOutcome::Accepted);
    let error = within(
        "publish into a full queue",
        router.publish(envelope("Full:event:s1", 2)),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(error.contains("RabbitMQ refused message"), "{error}");
    assert!(error.contains("basic.nack"), "{error}");
    let health = within("health", router.health()).await;
    assert_eq!(health.get("publish_nacks"), 1, "{health:?}");
    assert_eq!(health.get("publish_failures"), 1, "{health:?}");
    assert_eq!(raw.count(&full).await, Some(1));
    within("close", router.close()).await.unwrap();
    raw.close().await;
}

/// A publish whose caller stopped waiting once its frame was sent (a timeout around it) and that
/// RabbitMQ then refuses is lost: that must be counted, not only logged. `publish_nacks` used to count
/// only the nacks some caller was still waiting for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_message_whose_caller_stopped_waiting_is_counted() {
    use amqprs::channel::{QueueBindArguments, QueueDeclareArguments};

    if !broker_available().await {
        return;
    }
    let exchange = unique("t-nacked-alone");
    let full = format!("{exchange}.full");
    let _cleanup = Cleanup::new(&exchange, std::slice::from_ref(&full));
    let router = connect(&exchange).await;
    let raw = Raw::open().await;
    let mut arguments = amqprs::FieldTable::new();
    arguments.insert("x-max-length".try_into().unwrap(), amqprs::FieldValue::l(1));
    arguments.insert(
        "x-overflow".try_into().unwrap(),
        amqprs::FieldValue::from("reject-publish"),
    );
    let mut declare = QueueDeclareArguments::durable_client_named(&full);
    declare.arguments(arguments);
    within("declare", raw.channel.queue_declare(declare))
        .await
        .unwrap();
    within(
        "bind",
        raw.channel
            .queue_bind(QueueBindArguments::new(&full, &exchange, "Full.*.*")),
    )
    .await
    .unwrap();
    let first = within("publish", router.publish(envelope("Full:event:s1", 1)))
        .await
        .unwrap();
    assert_eq!(first, PublishOutcome::Accepted);
    let told = publish_cut_short(&router, || envelope("Full:event:s1", 2)).await;
    let deadline = Instant::now() + STEP;
    loop {
        let health = within("health", router.health()).await;
        if health.get("publish_nacks") == told + 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the refused message was never counted: {health:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(raw.count(&full).await, Some(1));
    within("close", router.close()).await.unwrap();
    raw.close().await;
}

/// A publish whose caller stopped waiting once its frame was sent, and that then reaches no queue,
/// is lost with nobody told: it must be logged as lost, and counted in `unroutable` as a publish
/// whose caller still waited is (and in `returned`, as every return is). It used to be counted only
/// in `returned`, so `unroutable` under-counted the publishes that reached no queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_message_whose_caller_stopped_waiting_is_logged_as_lost() {
    if !broker_available().await {
        return;
    }
    let logs = Logs::capture();
    let exchange = unique("t-unroutable-alone");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = connect(&exchange).await;
    // Opens the publishing channel.
    let first = within("publish", router.publish(envelope("Nobody:event:s1", 1)))
        .await
        .unwrap();
    assert_eq!(first, PublishOutcome::Unroutable);
    let abandoned = envelope("Nobody:event:s1", 2);
    let id = abandoned.id().to_string();
    let told = publish_cut_short(&router, || abandoned.clone()).await;
    let deadline = Instant::now() + STEP;
    loop {
        let warned = logs.lines_with(&id);
        if warned.iter().any(|line| {
            line.contains("WARN") && line.contains("reached no queue") && line.contains("lost")
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no warning says message {id} was lost: {warned:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let health = within("health", router.health()).await;
    assert_eq!(health.get("returned"), told + 2, "{health:?}");
    assert_eq!(
        health.get("unroutable"),
        told + 2,
        "the publish whose caller had stopped waiting is counted too: {health:?}"
    );
    within("close", router.close()).await.unwrap();
}

/// A channel the broker closes for a reason no redeclaration fixes (403: the user may not write to
/// the exchange) fails the publish at once, with an error and a log line naming the cause and the
/// fix. It used to be sent again on 10 more channels, and then fail with only the broker's reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_the_user_may_not_make_fails_at_once_naming_the_fix() {
    if !broker_available().await {
        return;
    }
    let logs = Logs::capture();
    let exchange = unique("t-refused");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let user = unique("t-agentcomm-user");
    let password = uuid::Uuid::new_v4().simple().to_string();
    let Some(temporary) =
        tokio::task::block_in_place(|| common::ThrowawayUser::add(&user, &password))
    else {
        return;
    };
    // Enough to declare the topology (the dead-letter queue is bound, which takes write permission
    // on it), but not to publish to the exchange.
    let dead_letters = format!("^{}\\.dead-letters$", exchange.replace('.', "\\."));
    tokio::task::block_in_place(|| temporary.permit(".*", &dead_letters, ".*"));
    let url = format!("amqp://{user}:{password}@{}/%2f", common::broker_address());
    let router = within(
        "connect",
        AmqpRouter::builder(url)
            .exchange(&exchange)
            .confirm_timeout(Duration::from_secs(10))
            .connect(),
    )
    .await
    .unwrap();
    let refused = envelope("Secret:event:s1", 1);
    let id = refused.id().to_string();
    let error = within("a refused publish", router.publish(refused))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains(&id), "{error}");
    assert!(error.contains("403 ACCESS_REFUSED"), "{error}");
    assert!(error.contains("write permission"), "{error}");
    assert!(error.contains("rabbitmqctl set_permissions"), "{error}");
    assert!(!error.contains(&password), "{error}");
    let health = within("health", router.health()).await;
    assert_eq!(health.get("resent"), 0, "sent again: {health:?}");
    assert_eq!(health.get("publish_failures"), 1, "{health:?}");
    let warned = logs.lines_with(&format!("exchange '{exchange}'"));
    assert!(
        warned.iter().any(|line| line.contains("WARN")
            && line.contains("reply_code=403")
            && line.contains("write permission")),
        "no warning names the cause and the fix: {warned:?}"
    );
    // The next publish reopens the channel without declaring the topology again first: no
    // declaration fixes a refusal.
    within(
        "a second refused publish",
        router.publish(envelope("Secret:event:s1", 2)),
    )
    .await
    .unwrap_err();
    let reopened = logs.lines_with("reopening the publishing channel");
    assert!(
        reopened
            .iter()
            .any(|line| line.contains(&exchange) && line.contains("not declared again")),
        "the topology was declared again after a refusal: {reopened:?}"
    );
    within("close", router.close()).await.unwrap();
    drop(temporary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_goes_on_after_the_runtime_of_the_first_publish_shut_down() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-runtimes");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = within(
        "connect",
        builder(&exchange)
            .confirm_timeout(Duration::from_secs(2))
            .connect(),
    )
    .await
    .unwrap();
    let mut subscription = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(pattern("Ping:*:*"))),
    )
    .await
    .unwrap();
    // The first publish opens the publishing channel (and its tasks) on a short-lived runtime, as a
    // `block_on` helper or another test's runtime would.
    let elsewhere = router.clone();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(elsewhere.publish(envelope("Ping:event:s1", 1)))
    })
    .join()
    .unwrap()
    .unwrap();
    // That runtime is gone, and with it the tasks that read this channel's confirms and time them
    // out: the channel must be given up at once, not used for a publish whose confirm nobody reads
    // (which then waits, is resent on a new channel, and arrives twice).
    for n in 2..=3 {
        let outcome = within("a publish after the other runtime shut down", async {
            router.publish(envelope("Ping:event:s1", n)).await
        })
        .await;
        assert!(
            matches!(&outcome, Ok(accepted) if !accepted.is_unroutable()),
            "{outcome:?}"
        );
    }
    assert_eq!(take(&mut subscription, 3).await, vec![1, 2, 3]);
}

/// The publishing channel's tasks (amqprs's dispatcher of its confirms, and the sweeper that times
/// them out) ran on the runtime of the publish that opened the channel. A runtime kept but idle (a
/// current-thread runtime outside `block_on`, as a sync wrapper holds one) runs no task: later
/// publishes from another runtime were sent, but no confirm was read and none timed out, so each
/// waited for ever. They belong with the connection, on the runtime the router connected on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_goes_on_while_the_runtime_of_the_first_publish_is_idle() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-idle-runtime");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = within(
        "connect",
        builder(&exchange)
            .confirm_timeout(Duration::from_secs(2))
            .connect(),
    )
    .await
    .unwrap();
    let mut subscription = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(pattern("Ping:*:*"))),
    )
    .await
    .unwrap();
    // The first publish opens the publishing channel on a runtime that is then kept, idle.
    let elsewhere = router.clone();
    let (idle, first) = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let outcome = runtime.block_on(elsewhere.publish(envelope("Ping:event:s1", 1)));
        (runtime, outcome)
    })
    .join()
    .unwrap();
    assert!(matches!(first, Ok(PublishOutcome::Accepted)), "{first:?}");
    for n in 2..=3 {
        // Bounded by the confirm timeout (2 s) either way: well within 10 s.
        let outcome = tokio::time::timeout(
            Duration::from_secs(10),
            router.publish(envelope("Ping:event:s1", n)),
        )
        .await;
        assert!(
            matches!(outcome, Ok(Ok(PublishOutcome::Accepted))),
            "publish {n}: {outcome:?}"
        );
    }
    assert_eq!(take(&mut subscription, 3).await, [1, 2, 3]);
    within("close", router.close()).await.unwrap();
    tokio::task::spawn_blocking(move || drop(idle))
        .await
        .unwrap();
}

/// A `health()` dropped right after its first poll (a liveness endpoint's timeout, a `select!`) used
/// to drop amqprs's passive declare while it registered its responder: the shared declaration
/// channel's dispatcher panicked while the channel still said it was open, so every declaration
/// failed until the next reconnect: no health round trip, and a delayed retry turned into an
/// immediate requeue. One worker thread: the dispatcher cannot answer between the poll and the drop.
#[tokio::test(flavor = "current_thread")]
async fn a_dropped_health_call_leaves_declarations_working() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-health-drop");
    let group_queue = topology::group_queue(&exchange, "g");
    let _cleanup = Cleanup::new(
        &exchange,
        &[
            group_queue.clone(),
            topology::retry_queue(&group_queue, 2000),
        ],
    );
    let router = connect(&exchange).await;
    let mut member = ping_member(&router).await;
    {
        let mut probing = std::pin::pin!(router.health());
        assert!(futures::poll!(&mut probing).is_pending());
    }
    let health = within("health", router.health()).await;
    assert!(health.round_trip.is_some(), "the health probe is gone");

    within("publish", router.publish(envelope("Ping:event:s1", 1)))
        .await
        .unwrap();
    let delivery = within("a delivery", member.next()).await.unwrap();
    let nacked_at = tokio::time::Instant::now();
    within(
        "nack",
        delivery.nack(NackAction::Retry {
            delay: Duration::from_secs(2),
        }),
    )
    .await
    .unwrap();
    let again = within("the retry", member.next()).await.unwrap();
    let waited = nacked_at.elapsed();
    within("ack", again.ack()).await.unwrap();
    within("close", router.close()).await.unwrap();
    assert!(
        waited >= Duration::from_millis(1500),
        "a 2 s retry came back after {waited:?}"
    );
}

/// The same on the ordinary runtime, with a caller's short timeout around each `health()`: a request
/// cut short after it was sent used to leave its reply to the next probe, whose own reply then found
/// no waiter and panicked the declaration channel's dispatcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_under_a_callers_short_timeout_keeps_its_round_trip() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-health-timeouts");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = connect(&exchange).await;
    // Each call is dropped after a few polls, with the runtime let run in between (so its request may
    // be sent, or even answered, by then): a timeout of microseconds would not do, since Tokio's
    // timers fire on whole milliseconds and a fast broker answers well within one.
    let mut timed_out = 0;
    for i in 0..500u64 {
        let mut call = Box::pin(router.health());
        let mut done = false;
        for _ in 0..=(i % 4) {
            if futures::poll!(call.as_mut()).is_ready() {
                done = true;
                break;
            }
            tokio::task::yield_now().await;
        }
        if !done {
            timed_out += 1;
        }
        drop(call);
    }
    let health = within("health", router.health()).await;
    within("close", router.close()).await.unwrap();
    assert!(timed_out > 0, "no health call was cut short");
    assert!(
        health.round_trip.is_some(),
        "the health probe is gone after {timed_out} calls were cut short: {health:?}"
    );
    assert_eq!(health.get("connection_losses"), 0, "{health:?}");
}

/// A `Subscription::close()` dropped right after its first poll (the runtime's stop deadline around
/// it, a `select!`) used to drop amqprs's basic.cancel while it registered its responder: the consumer
/// channel's dispatcher panicked, the consumer was never cancelled, and the next message the broker
/// delivered to it tore the whole consuming connection down, so another agent's handler could not
/// acknowledge the message it had finished. And since the close was cut short before it told the
/// subscription's task to stop, the channel was never closed: the stopped agent kept the group's
/// next message unacknowledged, out of the other members' reach, until the router closed.
#[tokio::test(flavor = "current_thread")]
async fn a_subscription_close_cut_short_leaves_the_other_subscriptions_alone() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-close-cut");
    let _cleanup = Cleanup::new(
        &exchange,
        &[
            topology::group_queue(&exchange, "g"),
            topology::group_queue(&exchange, "bystanders"),
        ],
    );
    let router = connect(&exchange).await;
    // Another agent, busy with a message.
    let mut bystander = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(pattern("Other:*:*")).group("bystanders")),
    )
    .await
    .unwrap();
    within("publish", router.publish(envelope("Other:event:s1", 1)))
        .await
        .unwrap();
    let in_hand = within("a delivery", bystander.next()).await.unwrap();

    let options = SubscribeOptions::new(pattern("Ping:*:*")).group("g");
    let first = within("subscribe", router.subscribe(options.clone()))
        .await
        .unwrap();
    {
        let mut closing = std::pin::pin!(first.close());
        assert!(futures::poll!(&mut closing).is_pending());
    }
    drop(first);
    // A message for the stopped agent's group: the next member gets it.
    within("publish", router.publish(envelope("Ping:event:s1", 2)))
        .await
        .unwrap();
    let mut next_member = within("subscribe", router.subscribe(options))
        .await
        .unwrap();
    let message = within("the group's message", next_member.next())
        .await
        .unwrap();
    assert_eq!(number(message.envelope()), 2);
    within("ack", message.ack()).await.unwrap();
    // The bystander's handler finishes and acknowledges.
    let acked = within("ack", in_hand.ack()).await;
    let health = within("health", router.health()).await;
    within("close", router.close()).await.unwrap();
    assert!(acked.is_ok(), "the bystander's ack failed: {acked:?}");
    assert_eq!(health.get("connection_losses"), 0, "{health:?}");
}

/// A `subscribe` dropped before it resolved (the caller's own timeout, a `select!` that took another
/// branch; the Bus's request timeout around its inbox subscribe) used to leave its consumer running
/// with nobody reading it: it took its round-robin share of the group's messages (up to the
/// prefetch) and held them unacknowledged, out of the other members' reach, until the router closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_subscribe_leaves_no_hidden_consumer_behind() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-orphan");
    let queue = topology::group_queue(&exchange, "g");
    let _cleanup = Cleanup::new(&exchange, std::slice::from_ref(&queue));
    let router = connect(&exchange).await;
    let raw = Raw::open().await;
    let options = SubscribeOptions::new(pattern("Ping:*:*")).group("g");
    // The caller gives up on this subscribe after polling it once (e.g. a short timeout).
    {
        let mut pending = router.subscribe(options.clone());
        assert!(
            futures::poll!(&mut pending).is_pending(),
            "the subscribe needs a broker round trip"
        );
    }
    // The caller tries again, and this one succeeds.
    let mut member = within("subscribe", router.subscribe(options))
        .await
        .unwrap();
    // The member alone consumes (bounded: the given-up consumer may stay, which the reads below
    // show).
    let deadline = Instant::now() + Duration::from_secs(5);
    while raw.consumers(&queue).await != Some(1) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for n in 0..10 {
        within("publish", router.publish(envelope("Ping:event:s1", n)))
            .await
            .unwrap();
    }
    let mut got = take(&mut member, 10).await;
    got.sort_unstable();
    assert_eq!(got, (0..10).collect::<Vec<_>>());
    let health = within("health", router.health()).await;
    assert_eq!(health.get("subscriptions"), 1, "{health:?}");
    assert_eq!(raw.consumers(&queue).await, Some(1));
    within("close", router.close()).await.unwrap();
    raw.close().await;
}

/// A `Router::close()` dropped part-way (a shutdown under a timeout, a second signal in a
/// `select!`) used to leave the router half closed for good: a later `close()` returned `Ok(())` at
/// once and did nothing, so the connections stayed open, publishes were still taken, and health
/// still said connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_close_cut_short_is_finished_by_closing_again() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-close-twice");
    let _cleanup = Cleanup::new(&exchange, &[topology::group_queue(&exchange, "g")]);
    let router = connect(&exchange).await;
    let mut member = ping_member(&router).await;
    within("publish", router.publish(envelope("Ping:event:s1", 1)))
        .await
        .unwrap();
    // A handler holds a message, so the close has to wait for it.
    let in_hand = within("a delivery", member.next()).await.unwrap();
    let cut = tokio::time::timeout(Duration::from_millis(300), router.close()).await;
    assert!(cut.is_err(), "the close did not wait for the handler");
    drop(in_hand);
    within("close again", router.close()).await.unwrap();
    let health = within("health", router.health()).await;
    assert!(
        !health.connected,
        "the router says it is closed, but its connections are still open: {health:?}"
    );
    assert_eq!(health.detail, "closed", "{health:?}");
    let publish = within("publish", router.publish(envelope("Ping:event:s1", 2))).await;
    assert!(
        matches!(publish, Err(Error::Closed { .. })),
        "a closed router took a publish: {publish:?}"
    );
}

/// `in_flight` (deliveries held by handlers) used to leave out subscriptions that were closing:
/// while a close waited for a handler to settle, health said nothing was in hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_counts_what_a_closing_subscription_still_waits_for() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-inflight");
    let _cleanup = Cleanup::new(&exchange, &[topology::group_queue(&exchange, "g")]);
    let router = connect(&exchange).await;
    let mut member = ping_member(&router).await;
    within("publish", router.publish(envelope("Ping:event:s1", 1)))
        .await
        .unwrap();
    let in_hand = within("a delivery", member.next()).await.unwrap();
    within("close the subscription", member.close())
        .await
        .unwrap();
    let during = within("health", router.health()).await;
    assert_eq!(during.get("in_flight"), 1, "{during:?}");
    assert_eq!(during.get("subscriptions"), 0, "{during:?}");
    within("ack", in_hand.ack()).await.unwrap();
    assert!(
        within("the end of the stream", member.next())
            .await
            .is_none()
    );
    let after = within("health", router.health()).await;
    assert_eq!(after.get("in_flight"), 0, "{after:?}");
    within("close", router.close()).await.unwrap();
}

/// A `nack(Retry)` whose future is dropped part-way (a caller's timeout around it while the retry
/// queue is declared or the copy published, a `select!`) used to leave the message neither retried
/// nor given back: unacknowledged on a live channel, out of everyone's reach until that channel
/// closed, with no count and no log. One worker thread: nothing answers between the poll and the
/// drop.
#[tokio::test(flavor = "current_thread")]
async fn a_settlement_cut_short_gives_the_message_back() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-settle-cut");
    let group_queue = topology::group_queue(&exchange, "g");
    let _cleanup = Cleanup::new(
        &exchange,
        &[
            group_queue.clone(),
            topology::retry_queue(&group_queue, 60_000),
        ],
    );
    let router = connect(&exchange).await;
    let mut member = ping_member(&router).await;
    within("publish", router.publish(envelope("Ping:event:s1", 1)))
        .await
        .unwrap();
    let delivery = within("a delivery", member.next()).await.unwrap();
    {
        let mut nacking = std::pin::pin!(delivery.nack(NackAction::Retry {
            delay: Duration::from_secs(60),
        }));
        assert!(futures::poll!(&mut nacking).is_pending());
    }
    let again = within("the message given back", member.next())
        .await
        .unwrap();
    assert_eq!(number(again.envelope()), 1);
    assert!(again.is_redelivered(), "not the same message given back");
    within("ack", again.ack()).await.unwrap();
    let health = within("health", router.health()).await;
    assert_eq!(health.get("abandoned"), 1, "{health:?}");
    within("close", router.close()).await.unwrap();
}

/// Closing a fan-out subscription deletes its queue with whatever it still holds. That is fan-out's
/// meaning (nobody else was to get those copies), but it used to happen with neither a count nor a
/// log, unlike the retries deleted with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_fan_out_queue_counts_what_it_still_held() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-fan-out-dropped");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = connect(&exchange).await;
    let subscription = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(pattern("Ping:*:*")).prefetch(1)),
    )
    .await
    .unwrap();
    for n in 0..3 {
        within("publish", router.publish(envelope("Ping:event:s1", n)))
            .await
            .unwrap();
    }
    // Dropped unread: one message buffered, two still in the queue.
    drop(subscription);
    let deadline = Instant::now() + STEP;
    let mut health = within("health", router.health()).await;
    while health.get("fan_out_dropped") < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        health = within("health", router.health()).await;
    }
    within("close", router.close()).await.unwrap();
    assert_eq!(health.get("fan_out_dropped"), 3, "{health:?}");
}

/// `Delivery::discard()` drops a delivery without settling it and without handing it back (the
/// broker delivers it again when its channel closes): its handle must not requeue it on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discarded_delivery_is_not_handed_back_by_the_client() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-rerev-discard");
    let _cleanup = Cleanup::new(&exchange, &[topology::group_queue(&exchange, "g")]);
    let router = connect(&exchange).await;
    let mut member = ping_member(&router).await;
    within("publish", router.publish(envelope("Ping:event:s1", 1)))
        .await
        .unwrap();
    let delivery = within("a delivery", member.next()).await.unwrap();
    delivery.discard();
    let again = tokio::time::timeout(Duration::from_secs(2), member.next()).await;
    let health = within("health", router.health()).await;
    let came_back = matches!(again, Ok(Some(_)));
    drop(again);
    within("close", router.close()).await.unwrap();
    assert!(
        !came_back,
        "discard() handed the delivery back (abandoned = {})",
        health.get("abandoned")
    );
}

/// On a router close, buffered deliveries stay readable and are read: the fan-out queue deleted with
/// the subscription must not count them as dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_queue_closed_with_the_router_does_not_count_what_its_reader_still_reads() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-rerev-fodrop");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = connect(&exchange).await;
    let mut subscription = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(pattern("Ping:*:*")).prefetch(10)),
    )
    .await
    .unwrap();
    for n in 0..3 {
        within("publish", router.publish(envelope("Ping:event:s1", n)))
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while subscription.buffered() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(subscription.buffered(), 3);
    within("close", router.close()).await.unwrap();
    let mut read = 0;
    while let Some(delivery) = within("read after close", subscription.next()).await {
        read += 1;
        let _ = delivery.ack().await;
    }
    let health = within("health", router.health()).await;
    assert_eq!(read, 3, "buffered deliveries stay readable");
    assert_eq!(
        health.get("fan_out_dropped"),
        0,
        "the reader read all {read} messages, yet they are counted as dropped unread: {health:?}"
    );
}

/// A delivery abandoned just before its runtime shuts down (the requeue task never runs) is counted
/// once in `abandoned`.
#[test]
fn a_delivery_abandoned_as_its_runtime_shuts_down_is_counted_once() {
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let exchange = unique("t-rerev-abandon-rt");
    let router = first.block_on(async {
        if !broker_available().await {
            return None;
        }
        let router = within("connect", builder(&exchange).connect())
            .await
            .unwrap();
        let mut member = within(
            "subscribe",
            router.subscribe(SubscribeOptions::new(pattern("Ping:*:*")).group("g")),
        )
        .await
        .unwrap();
        within("publish", router.publish(envelope("Ping:event:s1", 1)))
            .await
            .unwrap();
        let delivery = within("a delivery", member.next()).await.unwrap();
        drop(delivery); // abandon: spawns the requeue, not polled before block_on returns
        std::mem::forget(member);
        Some(router)
    });
    let Some(router) = router else { return };
    drop(first);
    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let abandoned = second.block_on(async {
        let _cleanup = Cleanup::new(&exchange, &[topology::group_queue(&exchange, "g")]);
        let health = tokio::time::timeout(Duration::from_secs(5), router.health())
            .await
            .unwrap();
        health.get("abandoned")
    });
    assert_eq!(
        abandoned, 1,
        "one abandoned delivery counted {abandoned} times"
    );
}

/// An `ack()` whose future is dropped part-way (here its first poll is Pending because the task's
/// coop budget ran out; in production a timeout or `select!` around an ack while the writer is
/// stalled) is finished as an ack: the handled message does not come back.
#[tokio::test(flavor = "current_thread")]
async fn an_ack_cut_short_is_finished_as_an_ack() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-rerev-ack-cut");
    let _cleanup = Cleanup::new(&exchange, &[topology::group_queue(&exchange, "g")]);
    let router = connect(&exchange).await;
    let mut member = within(
        "subscribe",
        router.subscribe(
            SubscribeOptions::new(pattern("Ping:*:*"))
                .group("g")
                .prefetch(400),
        ),
    )
    .await
    .unwrap();
    let batch: Vec<_> = (0..300).map(|n| envelope("Ping:event:s1", n)).collect();
    for result in within("publish", router.publish_batch(batch)).await {
        result.unwrap();
    }
    let mut deliveries = Vec::new();
    while deliveries.len() < 300 {
        deliveries.push(within("a delivery", member.next()).await.unwrap());
    }
    tokio::task::yield_now().await;
    let mut cut = 0;
    for delivery in deliveries {
        let mut acking = std::pin::pin!(delivery.ack());
        if futures::poll!(&mut acking).is_pending() {
            cut += 1; // dropped here, part-way
        }
    }
    assert!(cut > 0, "no ack was cut short");
    let mut again = 0;
    while let Ok(Some(delivery)) = tokio::time::timeout(Duration::from_secs(2), member.next()).await
    {
        again += 1;
        let _ = delivery.ack().await;
    }
    let health = within("health", router.health()).await;
    within("close", router.close()).await.unwrap();
    assert_eq!(
        again, 0,
        "{cut} acks were cut short; {again} of those acknowledged messages came back: {health:?}"
    );
}

/// `publish_outage_timeout` bounds how long a publish waits for a lost connection to come back. It
/// used to bound opening the publishing channel on a live connection as well: below the time that
/// takes (0, to fail at once during an outage, or a few milliseconds), no publish ever succeeded,
/// each failing with "RabbitMQ does not answer in time", though it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_outage_timeout_still_publishes_while_connected() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-zero-outage");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = within(
        "connect",
        builder(&exchange)
            .publish_outage_timeout(Duration::ZERO)
            .connect(),
    )
    .await
    .unwrap();
    let mut subscription = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(pattern("Ping:*:*"))),
    )
    .await
    .unwrap();
    for n in 1..=3 {
        let outcome = within("publish", router.publish(envelope("Ping:event:s1", n))).await;
        assert!(
            matches!(outcome, Ok(PublishOutcome::Accepted)),
            "{outcome:?}"
        );
    }
    assert_eq!(take(&mut subscription, 3).await, [1, 2, 3]);
    within("close", router.close()).await.unwrap();
}

/// Every failed publish counts in `publish_failures`, whatever the cause (docs/rabbitmq.md). One
/// whose channel has no AMQP routing key (over 255 bytes once escaped) failed before the count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_without_a_routing_key_counts_as_a_failure() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-no-key");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = connect(&exchange).await;
    let dots = ".".repeat(80);
    let channel = agentcomm_core::Channel::new(&dots, "request", &dots).unwrap();
    let too_long = Envelope::new(channel, "application/json", br#"{"n":1}"#.to_vec());
    let error = within("publish", router.publish(too_long))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("more than the 255 AMQP allows"), "{error}");
    let health = within("health", router.health()).await;
    assert_eq!(health.get("published"), 1, "{health:?}");
    assert_eq!(health.get("publish_failures"), 1, "{health:?}");
    within("close", router.close()).await.unwrap();
}

/// Every failed publish counts in `publish_failures`, whatever the cause: also one refused because
/// the router closed (a handler's reply after close's drain is one), which failed before the count
/// like the one without a routing key did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_refused_after_close_counts_as_a_failure() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-closed-count");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = connect(&exchange).await;
    within("close", router.close()).await.unwrap();
    let error = within("publish", router.publish(envelope("Ping:event:s1", 1)))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Closed { .. }), "{error}");
    let results = within(
        "a batch",
        router.publish_batch(vec![envelope("Ping:event:s1", 2)]),
    )
    .await;
    assert!(
        matches!(results[..], [Err(Error::Closed { .. })]),
        "{results:?}"
    );
    let health = within("health", router.health()).await;
    assert_eq!(health.get("published"), 2, "{health:?}");
    assert_eq!(health.get("publish_failures"), 2, "{health:?}");
}

/// A delivery dropped unsettled outside any Tokio runtime (kept in a struct that `main` drops after
/// its runtime's `block_on` returned) is given back to its queue at once, on the router's runtime,
/// as one dropped inside a runtime is. It used to be left unacknowledged on the live channel (a
/// warning said it would come back when the channel closed), out of every member's reach.
#[test]
fn a_delivery_dropped_outside_a_runtime_is_given_back_at_once() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if !runtime.block_on(broker_available()) {
        return;
    }
    let exchange = unique("t-drop-outside");
    let _cleanup = Cleanup::new(&exchange, &[topology::group_queue(&exchange, "g")]);
    let router = runtime.block_on(connect(&exchange));
    let mut subscription = runtime.block_on(ping_member(&router));
    let delivery = runtime.block_on(async {
        within("publish", router.publish(envelope("Ping:event:s1", 7)))
            .await
            .unwrap();
        within("a delivery", subscription.next()).await.unwrap()
    });
    drop(delivery);
    runtime.block_on(async {
        let again = within("the dropped delivery, given back", subscription.next())
            .await
            .unwrap();
        assert_eq!(number(again.envelope()), 7);
        assert!(again.is_redelivered());
        within("ack", again.ack()).await.unwrap();
        let health = within("health", router.health()).await;
        assert_eq!(health.get("abandoned"), 1, "{health:?}");
        drop(subscription);
        within("close", router.close()).await.unwrap();
    });
}

/// RabbitMQ refuses an `x-expires` above ten years (315,360,000,000 ms: found on the test broker by
/// declaring queues with a bisected value), and a fan-out subscription's queue carries
/// `fan_out_expiry` there: a longer expiry (`Duration::MAX` for "never") was accepted by the
/// builder, then every fan-out subscribe failed with "406 PRECONDITION_FAILED - invalid arg
/// 'x-expires' ... {value_too_large,...}", an error that does not name the setting. The longest
/// expiry RabbitMQ takes is used instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_expiry_beyond_what_rabbitmq_takes_is_capped_not_refused_by_every_subscribe() {
    if !broker_available().await {
        return;
    }
    for expiry in [Duration::from_secs(20 * 365 * 24 * 3600), Duration::MAX] {
        let exchange = unique("t-expiry");
        let _cleanup = Cleanup::new(&exchange, &[]);
        let router = within(
            "connect",
            builder(&exchange).fan_out_expiry(expiry).connect(),
        )
        .await
        .expect("connect");
        let mut subscription = within(
            "subscribe",
            router.subscribe(SubscribeOptions::new(pattern("Ping:*:*"))),
        )
        .await
        .unwrap_or_else(|error| panic!("fan_out_expiry {expiry:?}: {error}"));
        let outcome = within("publish", router.publish(envelope("Ping:request:s1", 1))).await;
        assert_eq!(outcome.unwrap(), PublishOutcome::Accepted);
        assert_eq!(take(&mut subscription, 1).await, [1]);
        within("close", router.close()).await.unwrap();
    }
}

/// Deleting an exchange deletes its bindings. A router whose exchange was deleted (by hand in the
/// management UI, by a script that resets the topology) declared the exchange again when its next
/// publish failed with 404, and sent that publish again, but not the bindings of its subscriptions:
/// from then on every publish came back `Unroutable` and the subscribers, still consuming their
/// queues, got nothing until the process restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_bound_again_when_the_exchange_is_declared_again() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-rebind");
    let group_queue = topology::group_queue(&exchange, "g");
    let _cleanup = Cleanup::new(&exchange, std::slice::from_ref(&group_queue));
    let router = connect(&exchange).await;
    let mut group = ping_member(&router).await;
    let mut fan_out = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(pattern("Ping:*:*"))),
    )
    .await
    .unwrap();
    let outcome = within("publish", router.publish(envelope("Ping:request:s1", 1))).await;
    assert_eq!(outcome.unwrap(), PublishOutcome::Accepted);
    assert_eq!(take(&mut group, 1).await, [1]);
    assert_eq!(take(&mut fan_out, 1).await, [1]);

    delete_exchange(&exchange).await;

    // The first publish finds the exchange gone (404), which declares it again.
    let outcome = within("publish", router.publish(envelope("Ping:request:s1", 2))).await;
    assert_eq!(outcome.unwrap(), PublishOutcome::Accepted);
    assert_eq!(take(&mut group, 1).await, [2]);
    assert_eq!(take(&mut fan_out, 1).await, [2]);
    within("close", router.close()).await.unwrap();
}

/// Deletes `exchange` behind the routers' backs (with its bindings), as an operator might.
async fn delete_exchange(exchange: &str) {
    let raw = Raw::open().await;
    within(
        "delete the exchange",
        raw.channel
            .exchange_delete(amqprs::channel::ExchangeDeleteArguments::new(exchange)),
    )
    .await
    .expect("exchange.delete");
    raw.close().await;
}

/// A consuming router (one group member, "g") and a publishing one on `exchange`, a message through,
/// then the exchange deleted.
async fn split_routers_losing_their_exchange(
    exchange: &str,
) -> (Cleanup, AmqpRouter, AmqpRouter, Subscription) {
    let group_queue = topology::group_queue(exchange, "g");
    let cleanup = Cleanup::new(exchange, std::slice::from_ref(&group_queue));
    let consumer = connect(exchange).await;
    let publisher = connect(exchange).await;
    let mut group = ping_member(&consumer).await;
    let outcome = within("publish", publisher.publish(envelope("Ping:request:s1", 1))).await;
    assert_eq!(outcome.unwrap(), PublishOutcome::Accepted);
    assert_eq!(take(&mut group, 1).await, [1]);
    delete_exchange(exchange).await;
    (cleanup, consumer, publisher, group)
}

/// Publishes messages numbered from `first` until one is accepted (the consumer's queue is bound
/// again), within `limit`; returns the number of the accepted one.
async fn publish_until_accepted(publisher: &AmqpRouter, first: u32, limit: Duration) -> u32 {
    let deadline = Instant::now() + limit;
    let mut n = first;
    loop {
        let outcome = within("publish", publisher.publish(envelope("Ping:request:s1", n)))
            .await
            .unwrap();
        if outcome == PublishOutcome::Accepted {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "still {outcome:?} after {limit:?}: the consumer's queue was never bound again"
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A router that only consumes never publishes into the 404 that makes a router declare its
/// exchange again: when someone deleted the exchange, its subscriptions' bindings were gone for
/// good (every publish from elsewhere unroutable) and its health said `ok`. Its health probe (a
/// passive declaration of the exchange) now notices, says so, and declares the exchange and the
/// bindings again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consuming_router_whose_exchange_was_deleted_binds_again_once_its_health_notices() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-rebind-health");
    let (_cleanup, consumer, publisher, mut group) =
        split_routers_losing_their_exchange(&exchange).await;

    let health = within("health", consumer.health()).await;
    assert_eq!(health.status, HealthStatus::Degraded, "{health:?}");
    assert!(health.detail.contains("does not exist"), "{health:?}");
    // The publisher declares the exchange again at its first 404; the consumer binds its queue.
    let n = publish_until_accepted(&publisher, 2, STEP).await;
    assert_eq!(take(&mut group, 1).await, [n]);
    within("close", publisher.close()).await.unwrap();
    within("close", consumer.close()).await.unwrap();
}

/// The split of the test above, with the publisher first: a busy publisher meets the 404 of the
/// deleted exchange first and declares it again, so the consumer's health probe (a passive
/// declaration of the exchange) finds it there and said "ok" for ever, while its queue stayed
/// unbound and every publish came back `Unroutable` (28 of 28 over 5 s, measured). The consumer now
/// binds its queues again within a check period of its own (15 s), health probed or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consuming_router_binds_again_when_a_publisher_declared_the_deleted_exchange_first() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-rebind-split");
    let (_cleanup, consumer, publisher, mut group) =
        split_routers_losing_their_exchange(&exchange).await;

    // The publisher meets the 404 and declares the exchange again; nothing is bound to it.
    let outcome = within("publish", publisher.publish(envelope("Ping:request:s1", 2))).await;
    assert_eq!(outcome.unwrap(), PublishOutcome::Unroutable);
    // Within one check period (15 s) and some slack for a loaded machine.
    let n = publish_until_accepted(&publisher, 3, Duration::from_secs(45)).await;
    assert_eq!(take(&mut group, 1).await, [n]);
    within("close", publisher.close()).await.unwrap();
    within("close", consumer.close()).await.unwrap();
}

/// A subscription whose consumer the broker cancelled (its queue deleted) and which cannot be
/// restored (the queue was declared again by someone else with other settings) consumes nothing
/// while both connections are up: health said `ok`, healthy, and only `consumer_failures` and the
/// log told that the subscription's messages were piling up. It is degraded now, naming the queue
/// and the error, and healthy again once the consumer is back. The detail counts the failures in
/// words ("failed once", not "failed 1 times").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_whose_consumer_cannot_be_restored_makes_health_degraded() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-unrestored");
    let queue = topology::group_queue(&exchange, "g");
    let _cleanup = Cleanup::new(&exchange, std::slice::from_ref(&queue));
    let router = within(
        "connect",
        builder(&exchange)
            .reconnect(agentcomm_core::backoff::Backoff::new(
                Duration::from_millis(300),
                Duration::from_millis(600),
            ))
            .connect(),
    )
    .await
    .unwrap();
    let mut member = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(pattern("Ping:*:*")).group("g")),
    )
    .await
    .unwrap();
    within("publish", router.publish(envelope("Ping:event:s1", 1)))
        .await
        .unwrap();
    assert_eq!(take(&mut member, 1).await, [1]);
    assert_eq!(
        within("health", router.health()).await.status,
        HealthStatus::Healthy
    );

    // Deleted (the broker cancels the consumer), then declared again, not durable, before the
    // router restores its consumer: every restore now fails with PRECONDITION_FAILED.
    let raw = Raw::open().await;
    within(
        "delete the queue",
        raw.channel
            .queue_delete(amqprs::channel::QueueDeleteArguments::new(&queue)),
    )
    .await
    .expect("queue.delete");
    within(
        "declare it again with other settings",
        raw.channel
            .queue_declare(amqprs::channel::QueueDeclareArguments::new(&queue)),
    )
    .await
    .expect("queue.declare");
    let deadline = tokio::time::Instant::now() + STEP;
    // Each detail that names the queue (read every 50 ms, the restores 300 ms apart: the first one
    // seen is almost always after the first failure).
    let mut details = Vec::new();
    let health = loop {
        let health = within("health", router.health()).await;
        if health.detail.contains(&queue) {
            details.push(health.detail.clone());
        }
        if health.get("consumer_failures") >= 2 {
            break health;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restore never failed: {health:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(router.is_connected(), "both connections are up");
    assert_eq!(health.status, HealthStatus::Degraded, "{health:?}");
    assert!(health.detail.contains(&queue), "{health:?}");
    assert!(health.detail.contains("inequivalent"), "{health:?}");
    assert_eq!(health.get("consumers_not_restored"), 1, "{health:?}");
    for detail in &details {
        assert!(!detail.contains(" 1 times"), "{detail}");
        assert!(
            detail.contains("failed once") || detail.contains("times in a row"),
            "{detail}"
        );
    }

    // Once the queue can be declared as the router wants it, the consumer comes back.
    let channel = within("a raw channel", raw.connection.open_channel(None))
        .await
        .expect("channel");
    within(
        "delete the other queue",
        channel.queue_delete(amqprs::channel::QueueDeleteArguments::new(&queue)),
    )
    .await
    .expect("queue.delete");
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let health = within("health", router.health()).await;
        if health.status == HealthStatus::Healthy {
            assert_eq!(health.get("consumers_not_restored"), 0, "{health:?}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the consumer never came back: {health:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    within("publish", router.publish(envelope("Ping:event:s1", 2)))
        .await
        .unwrap();
    assert_eq!(take(&mut member, 1).await, [2]);
    raw.close().await;
    within("close", router.close()).await.unwrap();
}

/// A subscription made on a short-lived runtime (a `block_on` helper, a set-up step on a runtime of
/// its own) and read on the main one: its task, and amqprs's dispatcher of its consumer channel,
/// ran on the runtime of the `subscribe` call. Once that runtime shut down, nothing forwarded its
/// deliveries nor restored its consumer: the stream waited for ever, while the broker kept
/// delivering to the consumer (held unacknowledged), and health counted one subscription fewer,
/// nothing else. They belong with the connection, on the runtime the router connected on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_goes_on_after_the_runtime_that_made_it_shut_down() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-sub-runtime");
    let queue = topology::group_queue(&exchange, "g");
    let _cleanup = Cleanup::new(&exchange, std::slice::from_ref(&queue));
    let router = connect(&exchange).await;
    let elsewhere = router.clone();
    let mut member = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async { within("subscribe", ping_member(&elsewhere)).await })
    })
    .join()
    .unwrap();
    for n in 1..=3 {
        let outcome = within("publish", router.publish(envelope("Ping:event:s1", n)))
            .await
            .unwrap();
        assert_eq!(outcome, PublishOutcome::Accepted);
    }
    let got = tokio::time::timeout(Duration::from_secs(10), take(&mut member, 3)).await;
    assert!(
        matches!(&got, Ok(numbers) if numbers == &[1, 2, 3]),
        "the subscription stopped delivering once the runtime that made it shut down: {got:?}"
    );
    let health = within("health", router.health()).await;
    assert_eq!(health.get("subscriptions"), 1, "{health:?}");
    drop(member);
    within("close", router.close()).await.unwrap();
}

/// A frame that is not an envelope, read by a subscriber polling from a short-lived runtime (a
/// `block_on` helper): its dead-lettering was spawned on that runtime and ended with it, unrun. The
/// frame was neither dead-lettered nor acknowledged: held by the consumer until its channel closed,
/// then delivered and lost the same way again. It is dead-lettered on the router's runtime now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_frame_read_from_a_short_lived_runtime_is_still_dead_lettered() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-malformed-runtime");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = connect(&exchange).await;
    let mut subscription = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(pattern("Ping:*:*"))),
    )
    .await
    .unwrap();
    let mut dead_letters = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(pattern("DeadLetter:*:*"))),
    )
    .await
    .unwrap();
    let raw = Raw::open().await;
    // Both wait in the subscription's buffer before anything reads it, the malformed frame first:
    // published on two connections, they could arrive in either order, and a reader that got 2 first
    // would never read the frame. So 2 is published once the frame is buffered.
    let buffered = async |count: usize| {
        let deadline = Instant::now() + STEP;
        while subscription.buffered() < count {
            assert!(Instant::now() < deadline, "{count} messages never arrived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    raw.publish(&exchange, "Ping.event.s1", b"\xc1 not a frame")
        .await;
    buffered(1).await;
    within("publish", router.publish(envelope("Ping:event:s1", 2)))
        .await
        .unwrap();
    buffered(2).await;
    let subscription = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                assert_eq!(take(&mut subscription, 1).await, [2]);
                subscription
            })
    })
    .join()
    .unwrap();
    let dead = tokio::time::timeout(Duration::from_secs(10), dead_letters.next()).await;
    let dead = dead
        .expect("the malformed frame was never dead-lettered")
        .expect("the dead-letter stream ended");
    assert_eq!(dead.envelope().payload().as_ref(), b"\xc1 not a frame");
    within("ack", dead.ack()).await.unwrap();
    drop(subscription);
    within("close", router.close()).await.unwrap();
    raw.close().await;
}

/// A router kept past the runtime it connected on (connected in a `block_on` helper, or in a test's
/// runtime and used from another): its connections and tasks ended with that runtime. A subscribe
/// then fails at once (its task, spawned on that runtime, never runs), and was told only "the
/// subscription stopped before its consumer was live", with nothing naming the cause or the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_on_a_router_whose_runtime_shut_down_names_the_runtime() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-gone-runtime");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let elsewhere = exchange.clone();
    let router = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move { within("connect", builder(&elsewhere).connect()).await })
    })
    .join()
    .unwrap()
    .unwrap();
    let Err(error) = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(pattern("Ping:*:*"))),
    )
    .await
    else {
        panic!("a subscribe on a router whose runtime is gone succeeded");
    };
    assert!(
        error
            .to_string()
            .contains("the runtime the router connected on"),
        "{error}"
    );
    within("close", router.close()).await.unwrap();
}

/// A subscription read on one runtime of a router connected on another: its task runs on the
/// router's runtime (76574df). When that runtime shuts down, the task is dropped before it can end
/// the stream, and the stream, read elsewhere, waited for ever instead of ending: the reader never
/// learnt that nothing more would come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_ends_when_the_runtime_the_router_connected_on_shuts_down() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-router-runtime-ends");
    let queue = topology::group_queue(&exchange, "g");
    let _cleanup = Cleanup::new(&exchange, std::slice::from_ref(&queue));
    let (connected, router) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let elsewhere = exchange.clone();
    let thread = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let router = within("connect", builder(&elsewhere).connect())
                    .await
                    .unwrap();
                connected.send(router).unwrap();
                // The router's tasks run while this runtime waits here.
                let _ = stopped.await;
            });
    });
    let router = tokio::task::spawn_blocking(move || router.recv().unwrap())
        .await
        .unwrap();
    let mut member = ping_member(&router).await;
    within("publish", router.publish(envelope("Ping:event:s1", 1)))
        .await
        .unwrap();
    assert_eq!(take(&mut member, 1).await, [1]);

    stop.send(()).unwrap();
    tokio::task::spawn_blocking(move || thread.join().unwrap())
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), member.next())
        .await
        .map(|next| next.is_some());
    assert!(
        matches!(next, Ok(false)),
        "the stream did not end once the router's runtime shut down (Ok(false) is the end): {next:?}"
    );
    drop(member);
    within("close", router.close()).await.unwrap();
}

/// The declaration channel, when it has to be opened again (a request on it failed, or was cut
/// short), was opened by whoever needed it next, on that caller's runtime, and amqprs runs the
/// channel's dispatcher where the channel opens. A health check from a short-lived runtime (a
/// `block_on` helper) left the channel with a dispatcher that ended with that runtime: the next
/// request's answer had nowhere to go, so that request failed after its timeout, and amqprs's reader,
/// unable to hand the frame over, could end the whole consuming connection. Requests and channels
/// belong on the router's runtime, as its connections do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_declaration_channel_opened_from_a_short_lived_runtime_outlives_it() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-op-runtime");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = connect(&exchange).await;
    // A health check given up while its probe is under way retires the declaration channel: the
    // probe's answer is still to come on it.
    let mut retired = false;
    for _ in 0..10 {
        if futures::FutureExt::now_or_never(router.health()).is_none() {
            retired = true;
            break;
        }
    }
    assert!(retired, "the health probe always answered within one poll");
    let elsewhere = router.clone();
    let health = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async { within("health", elsewhere.health()).await })
    })
    .join()
    .unwrap();
    assert!(health.round_trip.is_some(), "{health:?}");
    for _ in 0..3 {
        let health = within("health", router.health()).await;
        assert!(
            health.round_trip.is_some() && health.get("connection_losses") == 0,
            "the declaration channel died with the runtime that opened it: {health:?}"
        );
    }
    within("close", router.close()).await.unwrap();
}

/// A close cut short on a runtime that then ends (a `block_on` helper under a timeout, as a
/// synchronous shutdown hook does) is to go on closing, as one cut short anywhere else does. Its
/// task ran on the caller's runtime and was dropped with it half done: the router stayed closing
/// for ever, its connections open, and every later close failed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_cut_short_on_a_runtime_that_then_ends_still_finishes() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-close-elsewhere");
    let queue = topology::group_queue(&exchange, "g");
    let _cleanup = Cleanup::new(&exchange, std::slice::from_ref(&queue));
    let router = within(
        "connect",
        builder(&exchange)
            .close_timeout(Duration::from_secs(10))
            .connect(),
    )
    .await
    .unwrap();
    let mut member = ping_member(&router).await;
    within("publish", router.publish(envelope("Ping:event:s1", 1)))
        .await
        .unwrap();
    // In the handler's hands: the close waits for it.
    let delivery = within("a delivery", member.next())
        .await
        .expect("a delivery");
    let elsewhere = router.clone();
    let cut_short = tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                tokio::time::timeout(Duration::from_millis(300), elsewhere.close())
                    .await
                    .is_err()
            })
    })
    .await
    .unwrap();
    assert!(cut_short, "the close did not wait for the delivery in hand");
    within("ack", delivery.ack()).await.unwrap();
    let closed = within("the close", router.close()).await;
    assert!(
        closed.is_ok(),
        "the close cut short on a runtime that ended did not finish: {closed:?}"
    );
    assert!(!router.is_connected(), "the connections are still open");
    drop(member);
}

/// Everything on one current-thread runtime, the router's and the caller's (`#[tokio::test]`'s
/// default flavor). The subscription tasks (76574df), the requests and channel opens and closes
/// (12428f1) and the close run on the router's runtime while the caller awaits them from the same
/// thread: none may wait on another in a way that needs a second thread. The other tests all run on
/// two workers, where such a wait goes unnoticed. The scenario runs on a thread of its own, watched
/// from here: a blocked current-thread runtime cannot even time itself out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_used_wholly_on_a_current_thread_runtime_works_and_closes() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-current-thread");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let (done, finished) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let passed = std::panic::catch_unwind(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(on_one_thread(&exchange));
        });
        let _ = done.send(passed.is_ok());
    });
    let outcome = tokio::time::timeout(STEP * 2, finished).await;
    assert!(
        matches!(outcome, Ok(Ok(true))),
        "the scenario on a current-thread runtime failed (its panic is above) or hung: {outcome:?}"
    );
}

async fn on_one_thread(exchange: &str) {
    let router = connect(exchange).await;
    let mut fan_out = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(pattern("Ping:*:*"))),
    )
    .await
    .unwrap();
    within("publish", router.publish(envelope("Ping:event:s1", 1)))
        .await
        .unwrap();
    let delivery = within("a delivery", fan_out.next())
        .await
        .expect("a delivery");
    // Through the declaration channel: the retry queue is declared there.
    within(
        "retry",
        delivery.nack(NackAction::Retry {
            delay: Duration::from_millis(200),
        }),
    )
    .await
    .unwrap();
    let retried = within("the retry", fan_out.next())
        .await
        .expect("the retry");
    assert_eq!(retried.envelope().attempt(), 2);
    within("ack", retried.ack()).await.unwrap();
    let health = within("health", router.health()).await;
    assert_eq!(health.status, HealthStatus::Healthy, "{health:?}");
    assert!(health.round_trip.is_some(), "{health:?}");
    within("close the subscription", fan_out.close())
        .await
        .unwrap();
    assert!(
        within("the end of the stream", fan_out.next())
            .await
            .is_none()
    );
    // Its queue and retry queue were deleted before its stream ended: nothing takes the next one.
    let outcome = within("publish", router.publish(envelope("Ping:event:s1", 2)))
        .await
        .unwrap();
    assert_eq!(outcome, PublishOutcome::Unroutable);
    within("close", router.close()).await.unwrap();
    assert!(!router.is_connected());
}

/// A router kept past the runtime it connected on has lost its connections with that runtime, and
/// nothing reconnects them (the tasks that would ran there too). Its health said "ok", healthy and
/// connected, with no round trip: both connections still read as connected, and the failed probe
/// said nothing.
#[test]
fn health_says_so_when_the_runtime_the_router_connected_on_has_shut_down() {
    let main = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if !main.block_on(broker_available()) {
        return;
    }
    let exchange = unique("t-runtime-gone-health");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let short = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let router = short.block_on(async {
        let router = connect(&exchange).await;
        let health = within("health on the router's runtime", router.health()).await;
        assert_eq!(health.status, HealthStatus::Healthy, "{health:?}");
        router
    });
    drop(short);
    // The router moves in: dropped inside a runtime also when an assertion fails (amqprs's drop of a
    // connection that looks open spawns its close).
    main.block_on(async move {
        let health = within(
            "health after the router's runtime shut down",
            router.health(),
        )
        .await;
        assert_eq!(health.status, HealthStatus::Unhealthy, "{health:?}");
        assert!(!health.connected, "{health:?}");
        assert!(
            health
                .detail
                .contains("the runtime the router connected on has shut down"),
            "{health:?}"
        );
        assert!(!router.is_connected());
        let _ = within("close", router.close()).await;
    });
}

/// A health call whose probe's task ran only once the call's time was up (the runtime's thread was
/// busy: a handler blocking it, a starved machine) asked RabbitMQ nothing, and so learned nothing of
/// it. Health said degraded, "RabbitMQ did not answer the health probe", of a broker never asked.
#[test]
fn health_does_not_blame_rabbitmq_for_a_probe_that_ran_too_late_to_ask() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        if !broker_available().await {
            return;
        }
        let exchange = unique("t-health-late-probe");
        let _cleanup = Cleanup::new(&exchange, &[]);
        let router = within(
            "connect",
            builder(&exchange)
                .operation_timeout(Duration::from_millis(300))
                .connect(),
        )
        .await
        .unwrap();
        let before = within("health", router.health()).await;
        assert_eq!(before.status, HealthStatus::Healthy, "{before:?}");
        // Runs before the probe's task (spawned later): holds the only thread past the probe's
        // limit (300 ms), so the probe finds its call's time up and asks nothing.
        let blocker = tokio::spawn(async {
            std::thread::sleep(Duration::from_millis(600));
        });
        let health = within("health", router.health()).await;
        blocker.await.unwrap();
        // No round trip: the probe did run too late to ask (else this test tells nothing).
        assert!(health.round_trip.is_none(), "{health:?}");
        assert!(
            !health.detail.contains("did not answer the health probe"),
            "{health:?}"
        );
        assert_eq!(health.status, HealthStatus::Healthy, "{health:?}");
        within("close", router.close()).await.unwrap();
    });
}

/// `auth_mechanism=amqplain` logs in with the URL's user and password; one whose user name or
/// password amqprs cannot put in its AMQPLAIN table (a length of 128 to 255 bytes) is refused with
/// a configuration error naming the fix, instead of panicking the task that connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqplain_logs_in_and_a_password_it_cannot_carry_is_refused() {
    if !broker_available().await {
        return;
    }
    let address = common::broker_address();
    let exchange = unique("amqplain");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = within(
        "connect with amqplain",
        AmqpRouter::builder(format!(
            "amqp://guest:guest@{address}/%2f?auth_mechanism=amqplain"
        ))
        .exchange(&exchange)
        .connect(),
    )
    .await
    .expect("guest/guest over AMQPLAIN");
    assert_eq!(router.health().await.status, HealthStatus::Healthy);
    within("close", router.close()).await.unwrap();

    let long = "p".repeat(200);
    let connecting = tokio::spawn(
        AmqpRouter::builder(format!(
            "amqp://guest:{long}@{address}/%2f?auth_mechanism=amqplain"
        ))
        .connect(),
    );
    let error = within("connect with a long password", connecting)
        .await
        .expect("connecting panicked")
        .unwrap_err();
    let text = error.to_string();
    assert!(matches!(error, Error::Config { .. }), "{text}");
    assert!(
        text.contains("auth_mechanism=amqplain cannot carry")
            && text.contains("use auth_mechanism=plain"),
        "{text}"
    );
    assert!(!text.contains(&long), "{text}");
}
