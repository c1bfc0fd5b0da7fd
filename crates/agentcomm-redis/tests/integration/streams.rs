//! Streams mode against a real Redis (REDIS_URL, default redis://127.0.0.1:6379).

use std::collections::HashSet;
use std::time::Duration;

use crate::common::*;
use agentcomm_core::envelope::{Envelope, MALFORMED_CLASS, headers};
use agentcomm_core::prelude::*;
use agentcomm_core::router::{HealthStatus, NackAction, PublishOutcome, SubscribeOptions};
use agentcomm_redis::{DeliveryMode, RedisRouter};
use fred::prelude::{ClientLike, HashesInterface, LuaInterface, StreamsInterface};
use fred::types::Value;

const WAIT: Duration = Duration::from_secs(10);

fn envelope(channel: &str, n: u32) -> Envelope {
    Envelope::new(
        parse_channel(channel).unwrap(),
        "application/json",
        format!("{{\"n\":{n}}}").into_bytes(),
    )
}

fn number(delivery: &agentcomm_core::router::Delivery) -> u32 {
    let text = std::str::from_utf8(delivery.envelope().payload()).unwrap();
    text.trim_start_matches("{\"n\":")
        .trim_end_matches('}')
        .parse()
        .unwrap()
}

/// A router's builder through the fault proxy at `proxied`: `mode`, `prefix`, reads blocking 500 ms.
fn through(
    proxied: String,
    mode: DeliveryMode,
    prefix: &str,
) -> agentcomm_redis::RedisRouterBuilder {
    RedisRouter::builder(proxied)
        .mode(mode)
        .prefix(prefix)
        .read_block(Duration::from_millis(500))
}

async fn connect(prefix: &str) -> RedisRouter {
    connected(builder(DeliveryMode::Streams, prefix)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_share_work_fan_out_gets_copies_and_acks_stick() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let pattern = ChannelPattern::parse("Job:*:*").unwrap();
    let mut first = router
        .subscribe(SubscribeOptions::new(pattern.clone()).group("workers"))
        .await
        .unwrap();
    let mut second = router
        .subscribe(SubscribeOptions::new(pattern.clone()).group("workers"))
        .await
        .unwrap();
    let mut watcher = router
        .subscribe(SubscribeOptions::new(pattern))
        .await
        .unwrap();
    for n in 0..20 {
        let outcome = router.publish(envelope("Job:request:s1", n)).await.unwrap();
        assert_eq!(outcome, PublishOutcome::Accepted);
    }
    let mut seen = Vec::new();
    for _ in 0..20 {
        let delivery = next(&mut watcher).await;
        seen.push(number(&delivery));
        delivery.ack().await.unwrap();
    }
    assert_eq!(seen, (0..20).collect::<Vec<_>>(), "fan-out keeps the order");
    let mut shared = HashSet::new();
    let mut counts = [0, 0];
    while shared.len() < 20 {
        let (index, delivery) = tokio::select! {
            d = next(&mut first) => (0, d),
            d = next(&mut second) => (1, d),
        };
        counts[index] += 1;
        assert!(
            shared.insert(number(&delivery)),
            "a group member got a duplicate"
        );
        delivery.ack().await.unwrap();
    }
    assert_eq!(counts[0] + counts[1], 20);
    assert_quiet(&mut first, Duration::from_millis(300)).await;
    assert_quiet(&mut second, Duration::from_millis(300)).await;
    let health = router.health().await;
    assert_eq!(health.backend, "redis-streams");
    assert!(health.connected, "{health:?}");
    assert!(health.round_trip.is_some());
    assert_eq!(health.get("acked"), 40);
    router.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_wait_for_a_group_and_a_restarted_consumer_resumes() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let options =
        SubscribeOptions::new(ChannelPattern::parse("Order:*:*").unwrap()).group("billing");
    let subscription = router.subscribe(options.clone()).await.unwrap();
    subscription.close().await.unwrap();
    drop(subscription);
    for n in 0..5 {
        router.publish(envelope("Order:event:s1", n)).await.unwrap();
    }
    // Another connection (a restarted process) joins the group: it gets what was published meanwhile.
    let other = connect(&prefix).await;
    let mut resumed = other.subscribe(options).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..5 {
        let delivery = next(&mut resumed).await;
        got.push(number(&delivery));
        delivery.ack().await.unwrap();
    }
    // The closed member may have taken the first one just before it closed: it gave it back, and it
    // comes after the others.
    got.sort();
    assert_eq!(got, vec![0, 1, 2, 3, 4]);
    assert_quiet(&mut resumed, Duration::from_millis(300)).await;
    router.close().await.unwrap();
    other.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_class_pattern_sees_classes_created_after_it_subscribed() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    router.publish(envelope("Early:event:s1", 0)).await.unwrap();
    let mut group = router
        .subscribe(
            SubscribeOptions::new(ChannelPattern::parse("*:event:s1").unwrap()).group("audit"),
        )
        .await
        .unwrap();
    let mut fan_out = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("*:*:s1").unwrap(),
        ))
        .await
        .unwrap();
    // A class that did not exist when they subscribed, and one that did.
    router.publish(envelope("Late:event:s1", 1)).await.unwrap();
    router.publish(envelope("Early:event:s1", 2)).await.unwrap();
    router.publish(envelope("Late:event:s2", 3)).await.unwrap();
    for subscription in [&mut group, &mut fan_out] {
        let mut got = Vec::new();
        for _ in 0..2 {
            let delivery = next(subscription).await;
            got.push(number(&delivery));
            delivery.ack().await.unwrap();
        }
        got.sort();
        assert_eq!(got, vec![1, 2]);
        assert_quiet(subscription, Duration::from_millis(300)).await;
    }
    let health = router.health().await;
    assert!(
        health.get("filtered") >= 1,
        "the s2 entry was filtered: {health:?}"
    );
    router.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_retry_carries_the_attempt_and_abandon_redelivers() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let mut subscription = router
        .subscribe(SubscribeOptions::new(ChannelPattern::parse("Task:*:*").unwrap()).group("g"))
        .await
        .unwrap();
    router
        .publish(envelope("Task:request:s1", 7))
        .await
        .unwrap();
    let first = next(&mut subscription).await;
    assert_eq!(first.envelope().attempt(), 1);
    first
        .nack(NackAction::Retry {
            delay: Duration::from_millis(200),
        })
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let second = next(&mut subscription).await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!((number(&second), second.envelope().attempt()), (7, 2));
    assert!(second.is_redelivered());
    drop(second);
    let third = next(&mut subscription).await;
    assert_eq!((number(&third), third.envelope().attempt()), (7, 2));
    third.ack().await.unwrap();
    assert_quiet(&mut subscription, Duration::from_millis(300)).await;
    router.close().await.unwrap();
}

/// Makes the group of `options` exist, then has its only member leave (the router keeps `others`
/// subscriptions), so that what is published next waits for a consumer.
async fn group_left_by_its_member(router: &RedisRouter, options: &SubscribeOptions, others: u64) {
    let member = router.subscribe(options.clone()).await.unwrap();
    member.close().await.unwrap();
    drop(member);
    eventually(WAIT, "the member to have left", async || {
        router.health().await.get("subscriptions") == others
    })
    .await;
}

/// Has consumer `dead-1` of group `g`, which never acknowledges, take up to `count` new entries of
/// `key`.
async fn taken_by_a_dead_consumer(raw: &fred::prelude::Client, key: &str, count: u64) {
    use fred::prelude::StreamsInterface;
    let taken: fred::types::Value = raw
        .xreadgroup("g", "dead-1", Some(count), None, false, key, ">")
        .await
        .unwrap();
    assert!(!taken.is_null(), "the dead consumer took the entries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_a_dead_consumer_are_reclaimed_then_dead_lettered() {
    use fred::prelude::{ClientLike, StreamsInterface};
    use fred::types::Value;
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let survivor = connected(
        builder(DeliveryMode::Streams, &prefix)
            .claim_idle(Duration::from_millis(300))
            .max_deliveries(2),
    )
    .await;
    let options = SubscribeOptions::new(ChannelPattern::parse("Poison:*:*").unwrap()).group("g");
    let mut dead_letters = survivor
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("DeadLetter:Poison:*").unwrap(),
        ))
        .await
        .unwrap();
    // No live member, so that the dead one takes the entries.
    group_left_by_its_member(&survivor, &options, 1).await;
    survivor
        .publish(envelope("Poison:request:s1", 1))
        .await
        .unwrap();
    survivor
        .publish(envelope("Poison:request:s1", 2))
        .await
        .unwrap();
    let key = format!("{prefix}:stream:{{Poison}}");
    let raw = raw_client().await;
    taken_by_a_dead_consumer(&raw, &key, 2).await;
    // A second dead consumer claimed entry 2 as well: it was delivered twice already.
    let pending: Value = raw.xrange(key.as_str(), "-", "+", None).await.unwrap();
    let second_id = pending.into_array()[1].clone().into_array()[0]
        .as_string()
        .unwrap();
    let _: Value = raw
        .xclaim(
            key.as_str(),
            "g",
            "dead-2",
            0,
            second_id.as_str(),
            None,
            None,
            None,
            false,
            false,
        )
        .await
        .unwrap();
    let mut heir = survivor.subscribe(options).await.unwrap();
    // Entry 1: delivered once before, reclaimed as attempt 2.
    let reclaimed = next(&mut heir).await;
    assert!(reclaimed.is_redelivered());
    assert_eq!((number(&reclaimed), reclaimed.envelope().attempt()), (1, 2));
    reclaimed.ack().await.unwrap();
    // Entry 2: its third delivery would pass max_deliveries = 2, so it is dead-lettered instead.
    let dead = next(&mut dead_letters).await;
    let envelope = dead.envelope();
    assert_eq!(envelope.channel().name(), "DeadLetter:Poison:s1");
    assert_eq!(number(&dead), 2);
    assert_eq!(
        envelope.header(headers::DEAD_LETTER_REASON),
        Some(headers::REASON_HANDLER_FAILED)
    );
    assert_eq!(envelope.header(headers::ATTEMPTS), Some("3"));
    assert!(
        envelope
            .header(headers::ERROR)
            .unwrap()
            .contains("max_deliveries")
    );
    dead.ack().await.unwrap();
    assert_quiet(&mut heir, Duration::from_millis(700)).await;
    let health = survivor.health().await;
    assert_eq!(health.get("reclaimed"), 2, "{health:?}");
    assert_eq!(health.get("dead_lettered"), 1, "{health:?}");
    let _ = raw.quit().await;
    survivor.close().await.unwrap();
}

/// A router with `claim_idle` 300 ms and `max_deliveries(1)`, whose group `g` consumes dead letters;
/// message `n` published on `channel` (a dead-letter channel) was taken by a consumer that never
/// acknowledges, and the group's live member (returned, with the router, a plain client and the
/// stream's key) subscribed after: its claim would be the entry's second delivery.
async fn dead_letter_taken_by_a_dead_consumer(
    prefix: &str,
    channel: &str,
    n: u32,
) -> (
    RedisRouter,
    fred::prelude::Client,
    String,
    agentcomm_core::router::Subscription,
) {
    let router = connected(
        builder(DeliveryMode::Streams, prefix)
            .claim_idle(Duration::from_millis(300))
            .max_deliveries(1),
    )
    .await;
    let options =
        SubscribeOptions::new(ChannelPattern::parse("DeadLetter:*:*").unwrap()).group("g");
    // No live member, so that the dead consumer takes the entry.
    group_left_by_its_member(&router, &options, 0).await;
    router.publish(envelope(channel, n)).await.unwrap();
    let key = format!("{prefix}:stream:{{DeadLetter}}");
    let raw = raw_client().await;
    taken_by_a_dead_consumer(&raw, &key, 1).await;
    let heir = router.subscribe(options).await.unwrap();
    (router, raw, key, heir)
}

/// A dead letter of a dead letter (`DeadLetter:DeadLetter:<session>`) that reaches `max_deliveries` is
/// not dead-lettered again: its dead letter has the same channel, goes into the stream it came from, and
/// a group consuming dead letters would read it and fail again, for ever. It is acknowledged and left in
/// its stream, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_of_a_dead_letter_is_not_dead_lettered_again() {
    use fred::prelude::{ClientLike, StreamsInterface};
    use fred::types::Value;
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    // Its next delivery, a claim after claim_idle, would be its second: past max_deliveries = 1.
    let (router, raw, key, mut heir) =
        dead_letter_taken_by_a_dead_consumer(&prefix, "DeadLetter:DeadLetter:s1", 1).await;
    eventually(WAIT, "the entry to be given up", async || {
        router.health().await.get("dead_letters_left") == 1
    })
    .await;
    assert_quiet(&mut heir, Duration::from_millis(1000)).await;
    let health = router.health().await;
    assert_eq!(health.get("dead_lettered"), 0, "{health:?}");
    let length: u64 = raw.xlen(key.as_str()).await.unwrap();
    assert_eq!(length, 1, "left in its stream, and nothing added to it");
    let pending: Value = raw.xpending(key.as_str(), "g", ()).await.unwrap();
    assert_eq!(
        pending.into_array().first().and_then(Value::as_u64),
        Some(0),
        "acknowledged"
    );
    let _ = raw.quit().await;
    router.close().await.unwrap();
}

/// A first-level dead letter (`DeadLetter:<class>:<session>`) that a group consuming dead letters fails
/// on until `max_deliveries` is still dead-lettered, once, to `DeadLetter:DeadLetter:<session>`: only a
/// dead letter of a dead letter is left in its stream. (A check on the channel's class alone would
/// leave every dead letter a consumer crashes on, and nothing else would notice.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_level_dead_letter_is_still_dead_lettered_once() {
    use fred::prelude::ClientLike;
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    // Its claim would be its second delivery: past max_deliveries = 1, so it is dead-lettered, and
    // its dead letter, new in the same stream, reaches the group's live member.
    let (router, raw, _key, mut heir) =
        dead_letter_taken_by_a_dead_consumer(&prefix, "DeadLetter:Poison:s1", 7).await;
    let dead = next(&mut heir).await;
    let envelope = dead.envelope();
    assert_eq!(envelope.channel().name(), "DeadLetter:DeadLetter:s1");
    assert_eq!(number(&dead), 7);
    assert_eq!(
        envelope.header(headers::ORIGINAL_CHANNEL),
        Some("DeadLetter:Poison:s1")
    );
    dead.ack().await.unwrap();
    assert_quiet(&mut heir, Duration::from_millis(700)).await;
    let health = router.health().await;
    assert_eq!(
        (health.get("dead_lettered"), health.get("dead_letters_left")),
        (1, 0),
        "{health:?}"
    );
    let _ = raw.quit().await;
    router.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_entries_are_dead_lettered_and_reading_goes_on() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let mut subscription = router
        .subscribe(SubscribeOptions::new(ChannelPattern::parse("Raw:*:*").unwrap()).group("g"))
        .await
        .unwrap();
    let mut malformed = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse(&format!("DeadLetter:{MALFORMED_CLASS}:*")).unwrap(),
        ))
        .await
        .unwrap();
    // A foreign client writes garbage into the stream.
    let raw = raw_client().await;
    use fred::prelude::{ClientLike, StreamsInterface};
    let _: String = raw
        .xadd(
            format!("{prefix}:stream:{{Raw}}"),
            false,
            None,
            "*",
            vec![("f", "not a frame")],
        )
        .await
        .unwrap();
    router.publish(envelope("Raw:event:s1", 5)).await.unwrap();
    let good = next(&mut subscription).await;
    assert_eq!(number(&good), 5);
    good.ack().await.unwrap();
    let dead = next(&mut malformed).await;
    assert_eq!(dead.envelope().payload().as_ref(), b"not a frame");
    assert!(
        dead.envelope()
            .header(headers::SOURCE)
            .unwrap()
            .contains("Raw")
    );
    dead.ack().await.unwrap();
    assert_eq!(router.health().await.get("malformed"), 1);
    let _ = raw.quit().await;
    router.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_pipelined_and_close_refuses_further_use() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let mut subscription = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Batch:*:*").unwrap(),
        ))
        .await
        .unwrap();
    let batch: Vec<Envelope> = (0..300).map(|n| envelope("Batch:event:s1", n)).collect();
    let results = router.publish_batch(batch).await;
    assert_eq!(results.len(), 300);
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Ok(PublishOutcome::Accepted)))
    );
    for n in 0..300 {
        let delivery = next(&mut subscription).await;
        assert_eq!(number(&delivery), n);
        delivery.ack().await.unwrap();
    }
    assert!(router.publish_batch(Vec::new()).await.is_empty());
    router.close().await.unwrap();
    assert!(
        within(WAIT, "the stream to end", subscription.next())
            .await
            .is_none()
    );
    let error = router
        .publish(envelope("Batch:event:s1", 1))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Closed { .. }), "{error}");
    assert_eq!(router.health().await.status, HealthStatus::Unhealthy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_name_the_url_without_the_password() {
    // No Redis listens on port 1.
    let error = RedisRouter::builder("redis://:s3cret@127.0.0.1:1/0")
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(matches!(error, Error::Connection { .. }), "{text}");
    assert!(text.contains("redis://:***@127.0.0.1:1/0"), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
    let error = RedisRouter::connect("redis://:s3cret@127.0.0.1:notaport")
        .await
        .unwrap_err()
        .to_string();
    assert!(!error.contains("s3cret"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_publishing_never_mistakes_a_new_message_for_a_retry() {
    use fred::prelude::{ClientLike, StreamsInterface};
    if !redis_available().await {
        return;
    }
    // More publishes to one stream than the de-duplication bitmap has bits (65,536), interleaved with
    // another stream's: every sequence number is new, so every message must be stored.
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connected(builder(DeliveryMode::Streams, &prefix).idempotent_publish(true)).await;
    let (mut big, mut small) = (0u32, 0u32);
    for round in 0..70u32 {
        let batch: Vec<Envelope> = (0..1000)
            .map(|n| {
                if (round * 1000 + n) % 16 == 0 {
                    small += 1;
                    envelope("Small:event:s1", n)
                } else {
                    big += 1;
                    envelope("Big:event:s1", n)
                }
            })
            .collect();
        for result in router.publish_batch(batch).await {
            result.unwrap();
        }
    }
    assert!(big > 65_536, "{big}");
    let raw = raw_client().await;
    let stored_big: u64 = raw.xlen(format!("{prefix}:stream:{{Big}}")).await.unwrap();
    let stored_small: u64 = raw
        .xlen(format!("{prefix}:stream:{{Small}}"))
        .await
        .unwrap();
    assert_eq!(
        (stored_big, stored_small),
        (u64::from(big), u64::from(small))
    );
    let _ = raw.quit().await;
    router.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_closing_with_a_full_buffer_hands_nothing_out_twice() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let quick = || {
        builder(DeliveryMode::Streams, &prefix)
            .claim_idle(Duration::from_millis(300))
            .connect()
    };
    let first_router = within(WAIT, "connecting", quick()).await.unwrap();
    let second_router = within(WAIT, "connecting", quick()).await.unwrap();
    let options = SubscribeOptions::new(ChannelPattern::parse("Buf:*:*").unwrap())
        .group("g")
        .prefetch(50);
    let mut first = first_router.subscribe(options.clone()).await.unwrap();
    for n in 0..20 {
        first_router
            .publish(envelope("Buf:event:s1", n))
            .await
            .unwrap();
    }
    eventually(WAIT, "the first member to buffer everything", async || {
        first.buffered() == 20
    })
    .await;
    let mut second = second_router.subscribe(options).await.unwrap();
    // The first member stops (as an agent does: close, then handle what is buffered, slowly).
    let closer = first.closer();
    let handled: std::sync::Arc<std::sync::Mutex<Vec<u32>>> = Default::default();
    let draining = {
        let handled = handled.clone();
        tokio::spawn(async move {
            closer.close().await.unwrap();
            while let Ok(Some(delivery)) =
                tokio::time::timeout(Duration::from_secs(5), first.next()).await
            {
                handled.lock().unwrap().push(number(&delivery));
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = delivery.ack().await;
            }
        })
    };
    // The other member must get none of them: they are being handled.
    let mut stolen = Vec::new();
    while let Ok(Some(delivery)) =
        tokio::time::timeout(Duration::from_millis(2_500), second.next()).await
    {
        stolen.push(number(&delivery));
        delivery.ack().await.unwrap();
    }
    within(WAIT, "the first member to drain", draining)
        .await
        .unwrap();
    let mut handled = handled.lock().unwrap().clone();
    handled.sort();
    assert_eq!(stolen, Vec::<u32>::new(), "handled twice");
    assert_eq!(handled, (0..20).collect::<Vec<_>>());
    first_router.close().await.unwrap();
    second_router.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_trimmed_before_they_were_read_are_counted() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let publisher = connected(builder(DeliveryMode::Streams, &prefix).stream_max_len(100)).await;
    let group_router = connect(&prefix).await;
    let fan_out_router = connect(&prefix).await;
    let pattern = ChannelPattern::parse("Trim:*:*").unwrap();
    let mut group = group_router
        .subscribe(
            SubscribeOptions::new(pattern.clone())
                .group("g")
                .prefetch(1),
        )
        .await
        .unwrap();
    let mut fan_out = fan_out_router
        .subscribe(SubscribeOptions::new(pattern).prefetch(1))
        .await
        .unwrap();
    // Neither reads while far more than the stream keeps is published.
    const TOTAL: u64 = 1_000;
    for start in (0..TOTAL as u32).step_by(250) {
        let batch: Vec<Envelope> = (start..start + 250)
            .map(|n| envelope("Trim:event:s1", n))
            .collect();
        for result in publisher.publish_batch(batch).await {
            result.unwrap();
        }
    }
    for (router, subscription) in [(&group_router, &mut group), (&fan_out_router, &mut fan_out)] {
        let mut received = 0u64;
        let mut last = None;
        while let Ok(Some(delivery)) =
            tokio::time::timeout(Duration::from_millis(500), subscription.next()).await
        {
            let n = number(&delivery);
            assert!(last.is_none_or(|last| n > last), "in order");
            last = Some(n);
            received += 1;
            delivery.ack().await.unwrap();
        }
        assert_eq!(last, Some(TOTAL as u32 - 1), "the newest arrived");
        assert!(received < TOTAL, "the cap trimmed some: {received}");
        eventually(
            WAIT,
            "every message to be received or counted",
            async || received + router.health().await.get("trimmed") >= TOTAL,
        )
        .await;
        let health = router.health().await;
        assert_eq!(received + health.get("trimmed"), TOTAL, "{health:?}");
    }
    for router in [publisher, group_router, fan_out_router] {
        router.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_just_joined_gets_its_messages_from_a_member_that_knew_the_group_before() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let mut requests = router
        .subscribe(
            SubscribeOptions::new(ChannelPattern::parse("Foo:request:*").unwrap()).group("g"),
        )
        .await
        .unwrap();
    // An entry nobody wants: the member reads the group's patterns and acknowledges it.
    router.publish(envelope("Foo:other:s1", 0)).await.unwrap();
    eventually(WAIT, "the unwanted entry to be filtered", async || {
        router.health().await.get("filtered") == 1
    })
    .await;
    let mut events = router
        .subscribe(SubscribeOptions::new(ChannelPattern::parse("Foo:event:*").unwrap()).group("g"))
        .await
        .unwrap();
    for n in 1..=20 {
        router.publish(envelope("Foo:event:s1", n)).await.unwrap();
    }
    // Each goes to one member (the group's patterns are the union of its members').
    let mut got = Vec::new();
    while got.len() < 20 {
        let delivery = tokio::select! {
            d = next(&mut requests) => d,
            d = next(&mut events) => d,
        };
        got.push(number(&delivery));
        delivery.ack().await.unwrap();
    }
    got.sort();
    assert_eq!(got, (1..=20).collect::<Vec<_>>());
    assert_eq!(router.health().await.get("filtered"), 1);
    router.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_another_member_claimed_is_never_taken_back() {
    use fred::prelude::{ClientLike, StreamsInterface};
    use fred::types::Value;
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    // Leases are renewed every 100 ms.
    let router =
        connected(builder(DeliveryMode::Streams, &prefix).claim_idle(Duration::from_millis(300)))
            .await;
    let mut subscription = router
        .subscribe(SubscribeOptions::new(ChannelPattern::parse("Own:*:*").unwrap()).group("g"))
        .await
        .unwrap();
    router.publish(envelope("Own:event:s1", 1)).await.unwrap();
    let held = next(&mut subscription).await;
    let key = format!("{prefix}:stream:{{Own}}");
    let raw = raw_client().await;
    let ids: Value = raw.xrange(key.as_str(), "-", "+", None).await.unwrap();
    let id = ids.into_array()[0].clone().into_array()[0]
        .as_string()
        .unwrap();
    // Another member takes it over (as it would from a consumer out of reach for claim_idle), and
    // renews it as a live member does, while the old holder's renewals go on.
    for round in 0..6 {
        if round > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let pending: Value = raw
                .xpending(key.as_str(), "g", ("-", "+", 10))
                .await
                .unwrap();
            let owner = pending.into_array()[0].clone().into_array()[1]
                .as_string()
                .unwrap();
            assert_eq!(owner, "other", "round {round}: the old holder took it back");
        }
        let _: Value = raw
            .xclaim(
                key.as_str(),
                "g",
                "other",
                0,
                id.as_str(),
                None,
                None,
                None,
                false,
                true,
            )
            .await
            .unwrap();
    }
    held.ack().await.unwrap();
    let _ = raw.quit().await;
    router.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_go_to_waiting_inboxes_over_pubsub_and_stay_in_their_stream() {
    use fred::prelude::{ClientLike, StreamsInterface};
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let mut inbox = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Resp:reply:inbox-1").unwrap(),
        ))
        .await
        .unwrap();
    let mut auditors = router
        .subscribe(SubscribeOptions::new(ChannelPattern::parse("Resp:*:*").unwrap()).group("audit"))
        .await
        .unwrap();
    let outcome = router
        .publish(envelope("Resp:reply:inbox-1", 1))
        .await
        .unwrap();
    assert_eq!(outcome, PublishOutcome::Delivered(1), "one inbox listens");
    let reply = next(&mut inbox).await;
    assert_eq!(number(&reply), 1);
    assert!(
        reply.envelope().headers().is_empty(),
        "{:?}",
        reply.envelope()
    );
    reply.ack().await.unwrap();
    let audited = next(&mut auditors).await;
    assert_eq!(number(&audited), 1);
    assert!(audited.envelope().headers().is_empty());
    audited.ack().await.unwrap();
    // The inbox does not read the stream: an entry written there directly does not reach it.
    let raw = raw_client().await;
    let frame = envelope("Resp:reply:inbox-1", 2).to_frame().unwrap();
    let _: String = raw
        .xadd(
            format!("{prefix}:stream:{{Resp}}"),
            false,
            None,
            "*",
            vec![("f", frame)],
        )
        .await
        .unwrap();
    assert_eq!(number(&next(&mut auditors).await), 2);
    assert_quiet(&mut inbox, Duration::from_millis(300)).await;
    // Nobody waiting: still stored, so `Accepted`.
    let outcome = router
        .publish(envelope("Resp:reply:inbox-2", 3))
        .await
        .unwrap();
    assert_eq!(outcome, PublishOutcome::Accepted);
    let _ = raw.quit().await;
    router.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_a_read_returned_beyond_the_free_slots_stay_this_members() {
    use fred::types::Value;
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    // The first member renews what it holds every 100 ms. The second one takes what was not renewed
    // for 2 s: a member whose renewals stall longer than the other's claim_idle is taken for gone (by
    // design), and a test process starved of CPU (a loaded machine) stalls for a few hundred ms.
    let with_claim_idle = |claim_idle: Duration| {
        builder(DeliveryMode::Streams, &prefix)
            .claim_idle(claim_idle)
            .connect()
    };
    let quick = || with_claim_idle(Duration::from_millis(300));
    let first_router = within(WAIT, "connecting", quick()).await.unwrap();
    let options = SubscribeOptions::patterns(vec![
        ChannelPattern::parse("X:*:*").unwrap(),
        ChannelPattern::parse("Y:*:*").unwrap(),
    ])
    .group("g")
    .prefetch(2);
    let mut first = first_router.subscribe(options.clone()).await.unwrap();
    first_router
        .publish(envelope("X:event:s1", 1))
        .await
        .unwrap();
    first_router
        .publish(envelope("X:event:s1", 2))
        .await
        .unwrap();
    let one = next(&mut first).await;
    let two = next(&mut first).await;
    // Both slots taken; then one entry on each stream.
    first_router
        .publish(envelope("X:event:s1", 3))
        .await
        .unwrap();
    first_router
        .publish(envelope("Y:event:s1", 4))
        .await
        .unwrap();
    // One slot frees: the next read asks for one entry per stream (COUNT applies per stream) and gets
    // two; the second waits for a slot.
    one.ack().await.unwrap();
    let three = next(&mut first).await;
    assert_eq!(number(&three), 3);
    // The waiting entry is renewed: its idle time in the pending list drops, however slow the machine.
    let raw = raw_client().await;
    let y_key = format!("{prefix}:stream:{{Y}}");
    let mut last_idle = None;
    eventually(
        WAIT,
        "the entry waiting for a slot to be renewed",
        async || {
            let pending: Value = raw
                .xpending(y_key.as_str(), "g", ("-", "+", 10u64))
                .await
                .unwrap();
            let pending = pending.into_array();
            assert_eq!(pending.len(), 1, "entry 4 pending: {pending:?}");
            let idle = pending[0].clone().into_array()[2].as_u64().unwrap();
            let renewed = last_idle.is_some_and(|last| idle < last);
            last_idle = Some(idle);
            renewed
        },
    )
    .await;
    let _ = raw.quit().await;
    // Another member joins: the waiting entry must not look abandoned to it (watched longer than its
    // claim_idle, and a few of its reclaim rounds).
    let second_router = within(WAIT, "connecting", with_claim_idle(Duration::from_secs(2)))
        .await
        .unwrap();
    let mut second = second_router.subscribe(options).await.unwrap();
    assert_quiet(&mut second, Duration::from_millis(2_500)).await;
    two.ack().await.unwrap();
    three.ack().await.unwrap();
    let four = next(&mut first).await;
    assert_eq!(number(&four), 4);
    four.ack().await.unwrap();
    assert_quiet(&mut second, Duration::from_millis(300)).await;
    first_router.close().await.unwrap();
    second_router.close().await.unwrap();
}

/// A read over two streams can take more entries than the member has free slots (`COUNT` applies per
/// stream); the extra one waits for a slot. A member that closes meanwhile gives it back unhandled: the
/// member that takes it over gets it as its first attempt. It used to be left pending with the read
/// counted, so the next member's claim made it a second attempt: with `max_deliveries(1)`, dead-lettered
/// without any handler having seen it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_waiting_for_a_slot_when_its_member_closes_counts_no_attempt() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let quick = || {
        builder(DeliveryMode::Streams, &prefix)
            .claim_idle(Duration::from_millis(500))
            .max_deliveries(1)
            .connect()
    };
    let options = SubscribeOptions::patterns(vec![
        ChannelPattern::parse("X:*:*").unwrap(),
        ChannelPattern::parse("Y:*:*").unwrap(),
    ])
    .group("g")
    .prefetch(1);
    let router = within(WAIT, "connecting", quick()).await.unwrap();
    let mut member = router.subscribe(options.clone()).await.unwrap();
    router.publish(envelope("X:event:s1", 1)).await.unwrap();
    let one = next(&mut member).await;
    // The only slot is taken; then one entry on each stream. When the slot frees, the next read takes
    // both: 2 is delivered, 3 waits for a slot.
    router.publish(envelope("X:event:s1", 2)).await.unwrap();
    router.publish(envelope("Y:event:s1", 3)).await.unwrap();
    one.ack().await.unwrap();
    let two = next(&mut member).await;
    assert_eq!(number(&two), 2);
    let raw = raw_client().await;
    let y_key = format!("{prefix}:stream:{{Y}}");
    let pending: Value = raw
        .xpending(y_key.as_str(), "g", ("-", "+", 10u64))
        .await
        .unwrap();
    assert_eq!(pending.into_array().len(), 1, "3 read with 2");
    member.closer().close().await.unwrap();
    two.ack().await.unwrap();
    drop(member);
    router.close().await.unwrap();
    let heir_router = within(WAIT, "connecting", quick()).await.unwrap();
    let mut heir = heir_router.subscribe(options).await.unwrap();
    eventually(WAIT, "3 to be delivered or dead-lettered", async || {
        let health = heir_router.health().await;
        health.get("delivered") + health.get("dead_lettered") > 0
    })
    .await;
    assert_eq!(
        heir_router.health().await.get("dead_lettered"),
        0,
        "3 was dead-lettered: its member's read counted as an attempt"
    );
    let three = next(&mut heir).await;
    assert_eq!(
        (number(&three), three.envelope().attempt()),
        (3, 1),
        "(message, attempt) after its member closed before handing it out"
    );
    three.ack().await.unwrap();
    let _ = raw.quit().await;
    heir_router.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joining_gets_what_a_wildcard_member_of_its_group_was_owed_on_a_new_class() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    // The wildcard member's discovery must not find the new class before the second member joins:
    // that second member is then the one that creates the group on the new class's stream.
    let wildcard_router = connected(
        builder(DeliveryMode::Streams, &prefix).discovery_interval(Duration::from_secs(30)),
    )
    .await;
    let joining_router = connect(&prefix).await;
    // The same agent scaled out (a wildcard class too), and a member that names the class.
    for (group, class, joining) in [
        ("scaled", "FreshA", "*:request:*"),
        ("named", "FreshB", "FreshB:*:*"),
    ] {
        let mut first = wildcard_router
            .subscribe(
                SubscribeOptions::new(ChannelPattern::parse("*:request:*").unwrap()).group(group),
            )
            .await
            .unwrap();
        // Published after the first member subscribed: the group's, whoever joins later.
        wildcard_router
            .publish(envelope(&format!("{class}:request:s1"), 1))
            .await
            .unwrap();
        let mut second = joining_router
            .subscribe(SubscribeOptions::new(ChannelPattern::parse(joining).unwrap()).group(group))
            .await
            .unwrap();
        joining_router
            .publish(envelope(&format!("{class}:request:s1"), 2))
            .await
            .unwrap();
        let mut got = HashSet::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        while got.len() < 2 {
            let delivery = tokio::select! {
                d = first.next() => d,
                d = second.next() => d,
                () = tokio::time::sleep_until(deadline) => None,
            };
            let Some(delivery) = delivery else { break };
            got.insert(number(&delivery));
            delivery.ack().await.unwrap();
        }
        assert_eq!(
            got,
            HashSet::from([1, 2]),
            "group {group}: entry 1 was published after its first member subscribed"
        );
        first.close().await.unwrap();
        second.close().await.unwrap();
    }
    wildcard_router.close().await.unwrap();
    joining_router.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_counts_no_delivery_for_an_entry_its_member_still_holds() {
    use fred::prelude::{ClientLike, StreamsInterface};
    use fred::types::Value;
    let Some((proxy, proxied)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let member_router = connected(
        through(proxied, DeliveryMode::Streams, &prefix)
            .claim_idle(Duration::from_millis(600))
            .max_deliveries(2)
            .close_timeout(Duration::from_millis(500)),
    )
    .await;
    let heir_router = connected(
        builder(DeliveryMode::Streams, &prefix)
            .claim_idle(Duration::from_millis(600))
            .max_deliveries(2),
    )
    .await;
    let mut dead_letters = heir_router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("DeadLetter:Slow:*").unwrap(),
        ))
        .await
        .unwrap();
    let options = SubscribeOptions::new(ChannelPattern::parse("Slow:*:*").unwrap()).group("g");
    let mut member = member_router.subscribe(options.clone()).await.unwrap();
    heir_router
        .publish(envelope("Slow:request:s1", 1))
        .await
        .unwrap();
    // Its handler is slow: the entry stays unsettled across a cut of the member's connections.
    let held = next(&mut member).await;
    assert_eq!(held.envelope().attempt(), 1);
    let raw = raw_client().await;
    let key = format!("{prefix}:stream:{{Slow}}");
    let delivery_count = async || -> u64 {
        let pending: Value = raw
            .xpending(key.as_str(), "g", ("1-0", "+", 10))
            .await
            .unwrap();
        // Entry 1 is the first pending one (its id is the smallest).
        pending
            .into_array()
            .first()
            .and_then(|e| e.clone().into_array().get(3).and_then(Value::as_u64))
            .unwrap_or(0)
    };
    assert_eq!(delivery_count().await, 1);
    proxy.cut_all();
    // The cut reached the member (its reader among its connections), so recovery runs on the read
    // after the reconnect.
    eventually(WAIT, "the member to reconnect", async || {
        member_router.health().await.get("reconnects") >= 1
    })
    .await;
    // The member reconnected and recovered its pending entries once it reads new ones.
    heir_router
        .publish(envelope("Slow:request:s1", 2))
        .await
        .unwrap();
    let after = next(&mut member).await;
    assert_eq!(number(&after), 2);
    after.ack().await.unwrap();
    assert_eq!(
        delivery_count().await,
        1,
        "the entry was handed to a handler once"
    );
    // The member stops with the entry unsettled: it is given back, and comes to the heir as its
    // second attempt, not dead-lettered.
    member_router.close().await.unwrap();
    drop(held);
    drop(member);
    let mut heir = heir_router.subscribe(options).await.unwrap();
    tokio::select! {
        d = heir.next() => {
            let d = d.unwrap();
            assert_eq!((number(&d), d.envelope().attempt()), (1, 2));
            d.ack().await.unwrap();
        }
        d = dead_letters.next() => panic!(
            "dead-lettered after {:?} deliveries",
            d.unwrap().envelope().header(headers::ATTEMPTS).map(str::to_string)
        ),
        () = tokio::time::sleep(WAIT) => panic!("the given-back entry never came back"),
    }
    let _ = raw.quit().await;
    heir_router.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_trimmed_while_its_handler_works_is_not_counted_as_lost() {
    use fred::prelude::{ClientLike, LuaInterface, StreamsInterface};
    use fred::types::Value;
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    // Leases are renewed every 100 ms; reclaiming looks every 150 ms.
    let settings =
        || builder(DeliveryMode::Streams, &prefix).claim_idle(Duration::from_millis(300));
    let holder_router = connected(settings()).await;
    let other_router = connected(settings()).await;
    let raw = raw_client().await;
    let key = format!("{prefix}:stream:{{Trim}}");
    // A consumer that takes entry 0 and then dies (it never renews nor settles it).
    holder_router
        .publish(envelope("Trim:request:s1", 0))
        .await
        .unwrap();
    let _: Value = raw
        .eval(
            "return redis.call('XGROUP', 'CREATE', KEYS[1], 'g', '0', 'ENTRIESREAD', 0)",
            vec![key.as_str()],
            Vec::<String>::new(),
        )
        .await
        .unwrap();
    let _: Value = raw
        .xreadgroup("g", "dead", Some(1), None, false, key.as_str(), ">")
        .await
        .unwrap();
    let options = SubscribeOptions::new(ChannelPattern::parse("Trim:*:*").unwrap()).group("g");
    let mut holder = holder_router.subscribe(options.clone()).await.unwrap();
    holder_router
        .publish(envelope("Trim:request:s1", 1))
        .await
        .unwrap();
    // Its handler works on entry 1 while the stream is trimmed past both entries.
    let held = next(&mut holder).await;
    assert_eq!(number(&held), 1);
    let _other = other_router.subscribe(options).await.unwrap();
    let _: Value = raw.xtrim(key.as_str(), ("MAXLEN", 0i64)).await.unwrap();
    let trimmed = async || {
        holder_router.health().await.get("trimmed") + other_router.health().await.get("trimmed")
    };
    // The dead consumer's entry is lost, and counted once claim_idle passed.
    eventually(
        WAIT,
        "the dead consumer's entry to be counted",
        async || trimmed().await >= 1,
    )
    .await;
    // Meanwhile, and for several claim_idle more, both members reclaim and the holder renews: eight
    // reclaim rounds each (one every 150 ms: four claim_idle) and as many renewals by the holder.
    let progress = async |router: &RedisRouter| {
        let health = router.health().await;
        (health.get("reclaim_rounds"), health.get("lease_renewals"))
    };
    let (holder_rounds, holder_renewals) = progress(&holder_router).await;
    let (other_rounds, _) = progress(&other_router).await;
    eventually(
        WAIT,
        "both members to reclaim, and the holder to renew, for four claim_idle",
        async || {
            let (rounds, renewals) = progress(&holder_router).await;
            let (others, _) = progress(&other_router).await;
            rounds >= holder_rounds + 8
                && renewals >= holder_renewals + 8
                && others >= other_rounds + 8
        },
    )
    .await;
    held.ack().await.unwrap();
    let health = holder_router.health().await;
    assert_eq!(health.get("acked"), 1, "{health:?}");
    assert_eq!(
        trimmed().await,
        1,
        "entry 1 was read, handled and acknowledged: only entry 0 was lost"
    );
    let pending: Value = raw.xpending(key.as_str(), "g", ()).await.unwrap();
    assert_eq!(
        pending.into_array().first().and_then(Value::as_u64),
        Some(0)
    );
    let _ = raw.quit().await;
    holder_router.close().await.unwrap();
    other_router.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_shows_a_subscription_whose_reads_fail_until_they_work_again() {
    use fred::prelude::{ClientLike, KeysInterface};
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let mut subscription = router
        .subscribe(SubscribeOptions::new(ChannelPattern::parse("Bad:*:*").unwrap()).group("g"))
        .await
        .unwrap();
    assert_eq!(router.health().await.status, HealthStatus::Healthy);
    // Every read now fails, as with `OOM command not allowed` or `NOPERM` after an ACL change.
    let raw = raw_client().await;
    let key = format!("{prefix}:stream:{{Bad}}");
    let _: i64 = raw.del(key.as_str()).await.unwrap();
    let _: () = raw
        .set(key.as_str(), "not a stream", None, None, false)
        .await
        .unwrap();
    eventually(WAIT, "health to show the failing reads", async || {
        let health = router.health().await;
        health.status == HealthStatus::Degraded && health.detail.contains("WRONGTYPE")
    })
    .await;
    // The key is gone: the group is created again, and reads work again.
    let _: i64 = raw.del(key.as_str()).await.unwrap();
    eventually(WAIT, "health to recover", async || {
        router.health().await.status == HealthStatus::Healthy
    })
    .await;
    router.publish(envelope("Bad:event:s1", 1)).await.unwrap();
    let delivery = next(&mut subscription).await;
    assert_eq!(number(&delivery), 1);
    delivery.ack().await.unwrap();
    let _ = raw.quit().await;
    router.close().await.unwrap();
}

/// A class with a history on which group `g` never existed. A wildcard member of `g` that registered
/// after that history and left without closing keeps its entry in the members hash: a new member of
/// `g` (naming the class, or with a wildcard class itself) creates `g` from when that member
/// registered, not at `0`: the history before it is not delivered to a group created now. (An entry
/// written by an older agentcomm, without a registration time, is not taken as a claim.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leftover_wildcard_member_does_not_make_a_new_member_replay_a_streams_history() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connected(builder(DeliveryMode::Streams, &prefix)).await;
    let raw = raw_client().await;
    let mut failures = Vec::new();
    for (group, joining) in [("named", "Old:*:*"), ("wild", "*:request:*")] {
        // Old history on the class stream, published long before group `group` had any live member.
        for n in 1..=5 {
            router.publish(envelope("Old:request:s1", n)).await.unwrap();
        }
        // A crashed wildcard member's leftover, registered now (Redis's clock), and one without a
        // registration time.
        let now = next_redis_millisecond(&raw).await;
        let _: i64 = raw
            .hset(
                format!("{prefix}:group:{group}:members"),
                [
                    ("c-crashed", format!("@{now}\n*:request:*")),
                    ("c-older-version", "*:request:*".to_string()),
                ],
            )
            .await
            .unwrap();
        let mut member = router
            .subscribe(SubscribeOptions::new(ChannelPattern::parse(joining).unwrap()).group(group))
            .await
            .unwrap();
        router
            .publish(envelope("Old:request:s1", 100))
            .await
            .unwrap();
        let first = next(&mut member).await;
        let n = number(&first);
        first.ack().await.unwrap();
        if n != 100 {
            failures.push(format!(
                "group {group} (joining with {joining}): created now, its first delivery is entry {n}, \
                 published before any live member subscribed"
            ));
        }
        member.close().await.unwrap();
    }
    let _ = raw.quit().await;
    router.close().await.unwrap();
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Two replicas of a new wildcard agent start together (a deploy): each registers, then finds the
/// other in the members hash, and creates the new group at `0` on every existing class stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_new_wildcard_members_starting_together_do_not_replay_history() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let a_router = connected(builder(DeliveryMode::Streams, &prefix)).await;
    let b_router = connected(builder(DeliveryMode::Streams, &prefix)).await;
    for n in 1..=5 {
        a_router
            .publish(envelope("Hist:request:s1", n))
            .await
            .unwrap();
    }
    // Registrations are told apart from entries by the millisecond: the history is older.
    let raw = raw_client().await;
    next_redis_millisecond(&raw).await;
    let _ = raw.quit().await;
    let mut replayed = 0;
    let rounds = 5;
    for round in 0..rounds {
        let group = format!("fresh{round}");
        let options =
            SubscribeOptions::new(ChannelPattern::parse("*:request:*").unwrap()).group(&group);
        let (a, b) = tokio::join!(
            a_router.subscribe(options.clone()),
            b_router.subscribe(options.clone())
        );
        let (mut a, mut b) = (a.unwrap(), b.unwrap());
        a_router
            .publish(envelope("Hist:request:s1", 100))
            .await
            .unwrap();
        let first = within(WAIT, "a delivery", async {
            tokio::select! {
                d = a.next() => d.unwrap(),
                d = b.next() => d.unwrap(),
            }
        })
        .await;
        if number(&first) != 100 {
            replayed += 1;
        }
        first.ack().await.unwrap();
        a.close().await.unwrap();
        b.close().await.unwrap();
    }
    a_router.close().await.unwrap();
    b_router.close().await.unwrap();
    assert_eq!(
        replayed, 0,
        "{replayed} of {rounds} new groups replayed the stream's history"
    );
}

/// A live member holds (in its buffer) more trimmed entries than `read_batch`. They stay pending and
/// idle (renewal cannot XCLAIM a deleted entry), and reclaiming leaves them alone since their owner is
/// alive; an entry of a dead consumer that comes after them is still reclaimed: the round looks past
/// the full page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimmed_entries_a_live_member_holds_do_not_hold_up_reclaiming() {
    let read_batch = 4;
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let settings = || {
        builder(DeliveryMode::Streams, &prefix)
            .claim_idle(Duration::from_millis(300))
            .read_batch(read_batch)
    };
    let holder_router = connected(settings()).await;
    let heir_router = connected(settings()).await;
    let raw = raw_client().await;
    let key = format!("{prefix}:stream:{{Starve}}");
    let options = SubscribeOptions::new(ChannelPattern::parse("Starve:*:*").unwrap()).group("g");
    // The holder's prefetch is full with 8 entries that its application has not taken yet.
    let _holder = holder_router
        .subscribe(options.clone().prefetch(8))
        .await
        .unwrap();
    for n in 1..=8 {
        holder_router
            .publish(envelope("Starve:request:s1", n))
            .await
            .unwrap();
    }
    let pending_count = async || -> u64 {
        let summary: Value = raw.xpending(key.as_str(), "g", ()).await.unwrap();
        summary
            .into_array()
            .first()
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    // It reads until fewer than its refill (2) slots are free: 7 or 8 entries, then stops.
    eventually(WAIT, "the holder to fill its prefetch", async || {
        pending_count().await >= 7
    })
    .await;
    // Entry 9 goes to a consumer that then dies.
    holder_router
        .publish(envelope("Starve:request:s1", 9))
        .await
        .unwrap();
    let read: Value = raw
        .xreadgroup("g", "dead", Some(10), None, false, key.as_str(), ">")
        .await
        .unwrap();
    // The dead consumer took every entry nobody had read (8 and 9, or 9): the first one's id.
    let last: Value = raw
        .eval(
            "local p = redis.call('XPENDING', KEYS[1], 'g', '-', '+', 1, 'dead') return p[1][1]",
            vec![key.as_str()],
            Vec::<String>::new(),
        )
        .await
        .unwrap();
    assert!(!read.is_null(), "the dead consumer read an entry");
    let last = last.as_string().unwrap();
    let _: Value = raw
        .xtrim(key.as_str(), ("MINID", last.as_str()))
        .await
        .unwrap();
    let mut heir = heir_router.subscribe(options).await.unwrap();
    // The stream is trimmed past the holder's entries; the dead consumer's stays. It exists and its
    // consumer is dead: claimed after claim_idle (300 ms).
    let delivery = within(
        WAIT,
        "the dead consumer's entry to be reclaimed",
        heir.next(),
    )
    .await
    .unwrap();
    assert!(number(&delivery) >= 8);
    delivery.ack().await.unwrap();
    let _ = raw.quit().await;
    holder_router.close().await.unwrap();
    heir_router.close().await.unwrap();
}

/// Redis's clock in ms (as stream ids count it), once it has moved on from the millisecond it was in
/// when called: entries added before are older than anything registered from then on.
async fn next_redis_millisecond(raw: &fred::clients::Client) -> String {
    let now = async || -> u64 {
        let time: Value = raw
            .eval(
                "local t = redis.call('TIME') return string.format('%.0f', t[1] * 1000 + math.floor(t[2] / 1000))",
                Vec::<String>::new(),
                Vec::<String>::new(),
            )
            .await
            .unwrap();
        time.as_string().unwrap().parse().unwrap()
    };
    let start = now().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ms = now().await;
        if ms > start {
            return ms.to_string();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Redis's clock stands still"
        );
    }
}

/// A member that stops with entries still in its buffer gives them back unhandled: however often
/// that happens, the member that finally handles them gets them as their first attempt, so they are
/// neither dead-lettered early nor given fewer retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_given_back_unhandled_from_a_stopping_members_buffer_count_no_attempt() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let quick = || {
        builder(DeliveryMode::Streams, &prefix)
            .claim_idle(Duration::from_millis(300))
            .max_deliveries(3)
            .connect()
    };
    let options = SubscribeOptions::new(ChannelPattern::parse("Kept:*:*").unwrap())
        .group("g")
        .prefetch(50);
    let publisher = within(WAIT, "connecting", quick()).await.unwrap();
    // Each stop gives the buffer back its own way: the subscription dropped unread; each delivery
    // given back (as the agent runtime does); the subscription closed, then given back; one delivery
    // read and given back, and the subscription dropped with the rest of what its read took.
    for stop in 0..4 {
        let router = within(WAIT, "connecting", quick()).await.unwrap();
        let mut member = router.subscribe(options.clone()).await.unwrap();
        if stop == 0 {
            for n in 0..5 {
                publisher
                    .publish(envelope("Kept:event:s1", n))
                    .await
                    .unwrap();
            }
        }
        eventually(WAIT, "the member to buffer all five", async || {
            member.buffered() == 5
        })
        .await;
        match stop {
            0 => drop(member),
            1 => {
                while let Some(delivery) = member.try_next() {
                    delivery.give_back();
                }
                drop(member);
            }
            2 => {
                member.closer().close().await.unwrap();
                while let Some(delivery) = member.try_next() {
                    delivery.give_back();
                }
                drop(member);
            }
            _ => {
                member.try_next().expect("one waits").give_back();
                drop(member);
            }
        }
        router.close().await.unwrap();
    }
    let heir_router = within(WAIT, "connecting", quick()).await.unwrap();
    let mut heir = heir_router.subscribe(options).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..5 {
        let delivery = next(&mut heir).await;
        seen.push((number(&delivery), delivery.envelope().attempt()));
        delivery.ack().await.unwrap();
    }
    seen.sort();
    assert_eq!(
        seen,
        (0..5).map(|n| (n, 1)).collect::<Vec<_>>(),
        "(message, attempt) after four members gave them back unhandled"
    );
    assert_eq!(heir_router.health().await.get("dead_lettered"), 0);
    heir_router.close().await.unwrap();
    publisher.close().await.unwrap();
}

/// Publishes one delivery on `wanted` and then calls `add_more`, which adds `more` entries behind it that
/// the member must wait for Redis over (each raising the health counter `counter` when the member comes
/// to it, before its wait); with every command of the member taking at least 50 ms, checks that the
/// delivery was in the subscription's buffer once the first of them was counted, and before the last.
async fn delivery_is_handed_over_before_the_waits_of_entries_read_with_it(
    pattern: &str,
    wanted: &str,
    counter: &str,
    more: u64,
    add_more: impl AsyncFnOnce(&str, &RedisRouter),
) {
    let Some((proxy, proxied)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let options = SubscribeOptions::new(ChannelPattern::parse(pattern).unwrap())
        .group("g")
        .prefetch(100);
    // The group exists, with nobody reading: the member below gets everything in one read. Made
    // through a router of its own, closed before anything is published: a closing member's last
    // read could take the first entry and give it back for a claim, which comes later.
    let setup = connect(&prefix).await;
    drop(setup.subscribe(options.clone()).await.unwrap());
    setup.close().await.unwrap();
    router.publish(envelope(wanted, 0)).await.unwrap();
    add_more(&prefix, &router).await;
    // Every command of the member takes a round trip of at least 50 ms.
    proxy.set_latency(Duration::from_millis(25));
    let member_router = connected(through(proxied, DeliveryMode::Streams, &prefix)).await;
    let mut member = member_router.subscribe(options).await.unwrap();
    eventually(
        WAIT,
        &format!("the member's first {counter} entry"),
        async || member_router.health().await.get(counter) >= 1,
    )
    .await;
    // Handed over before the read loop waited for Redis over the first entry behind it, although the
    // subscriber was not waiting for it then (it was not polling).
    assert_eq!(
        member.buffered(),
        1,
        "the delivery waits in the subscription's buffer, not with the read loop"
    );
    assert!(
        member_router.health().await.get(counter) < more,
        "checked before all {more} {counter} entries were dealt with"
    );
    let delivery = next(&mut member).await;
    assert_eq!(number(&delivery), 0);
    delivery.ack().await.unwrap();
    eventually(
        WAIT,
        &format!("the member's last {counter} entry"),
        async || member_router.health().await.get(counter) == more,
    )
    .await;
    drop(member);
    member_router.close().await.unwrap();
    router.close().await.unwrap();
}

/// A delivery a read made ready goes to the subscriber before the read loop waits for Redis over a later
/// entry of the same read (here the acknowledgements of entries no member wants): it used to wait
/// for every one of them, to the end of the batch, while the subscriber waited for it; and with the
/// subscriber busy when it was made, it waited at least for the next entry's round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_does_not_wait_for_the_acknowledgements_of_filtered_entries_read_with_it() {
    delivery_is_handed_over_before_the_waits_of_entries_read_with_it(
        "Lat:wanted:*",
        "Lat:wanted:s1",
        "filtered",
        40,
        async |_, router| {
            for n in 1..=40 {
                router.publish(envelope("Lat:other:s1", n)).await.unwrap();
            }
        },
    )
    .await;
}

/// The same for malformed entries read after a delivery: each one's dead letter (a marker, a publish
/// and an acknowledgement, all waiting for Redis) comes after the delivery was handed over, not
/// before. Only the filtered entries' wait had a test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_does_not_wait_for_the_dead_letters_of_malformed_entries_read_with_it() {
    delivery_is_handed_over_before_the_waits_of_entries_read_with_it(
        "Bad:*:*",
        "Bad:event:s1",
        "malformed",
        10,
        async |prefix, _| {
            let raw = raw_client().await;
            for n in 1..=10 {
                let _: String = raw
                    .xadd(
                        format!("{prefix}:stream:{{Bad}}"),
                        false,
                        None,
                        "*",
                        vec![("f", format!("not a frame {n}"))],
                    )
                    .await
                    .unwrap();
            }
            let _ = raw.quit().await;
        },
    )
    .await;
}

/// `try_next` takes everything that waits, however much: a subscriber draining its buffer with it
/// (the agent runtime gives back what is buffered that way when it stops, and counts it) must not stop
/// after the cooperative budget's 128 units with deliveries still waiting, as the buffer's stream
/// did when polled for `try_next` (the channel it replaced was read without spending the budget).
#[tokio::test]
async fn try_next_takes_everything_buffered_beyond_the_cooperative_budget() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    // Room for all 300 and more: the reader reads again once a quarter of the prefetch is free.
    let options = SubscribeOptions::new(ChannelPattern::parse("Drained:*:*").unwrap())
        .group("g")
        .prefetch(1000);
    let mut member = router.subscribe(options).await.unwrap();
    for n in 0..300 {
        router
            .publish(envelope("Drained:event:s1", n))
            .await
            .unwrap();
    }
    eventually(WAIT, "the member to buffer all 300", async || {
        member.buffered() == 300
    })
    .await;
    // In a task of its own, with a fresh budget: nothing here awaits.
    let (taken, member) = tokio::spawn(async move {
        let mut taken = Vec::new();
        while let Some(delivery) = member.try_next() {
            taken.push(delivery);
        }
        (taken, member)
    })
    .await
    .unwrap();
    assert_eq!(
        taken.iter().map(number).collect::<Vec<_>>(),
        (0..300).collect::<Vec<_>>(),
        "all taken, in order"
    );
    assert_eq!(member.buffered(), 0);
    for delivery in taken {
        delivery.ack().await.unwrap();
    }
    drop(member);
    router.close().await.unwrap();
}

/// A member whose reader waits in a blocking read holds every free prefetch slot for that read: the
/// entries a stopping member gives back (marked idle, to be claimed at once) used to wait for that
/// read to time out (`read_block`, 5 s by default) before the member's reclaim round got a slot.
/// They are claimed at the next round now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_member_claims_given_back_entries_without_waiting_out_its_blocking_read() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    // Long enough that the heir's read, which started before the holder stopped, is still waiting when
    // the bound below runs out.
    let read_block = Duration::from_secs(15);
    let quick = || {
        builder(DeliveryMode::Streams, &prefix)
            .claim_idle(Duration::from_millis(300))
            .read_block(read_block)
            .connect()
    };
    let options = SubscribeOptions::new(ChannelPattern::parse("Idle:*:*").unwrap())
        .group("g")
        .prefetch(50);
    let holder_router = within(WAIT, "connecting", quick()).await.unwrap();
    let holder = holder_router.subscribe(options.clone()).await.unwrap();
    for n in 0..8 {
        holder_router
            .publish(envelope("Idle:event:s1", n))
            .await
            .unwrap();
    }
    eventually(WAIT, "the holder to buffer all eight", async || {
        holder.buffered() == 8
    })
    .await;
    let heir_router = within(WAIT, "connecting", quick()).await.unwrap();
    let mut heir = heir_router.subscribe(options).await.unwrap();
    // The heir's reader is in its blocking read (nothing new to read) once a few reclaim rounds went
    // by: each found only entries the holder renews.
    eventually(WAIT, "the heir's reclaim rounds", async || {
        heir_router.health().await.get("reclaim_rounds") >= 3
    })
    .await;
    drop(holder);
    holder_router.close().await.unwrap();
    let mut seen = Vec::new();
    within(
        read_block / 3,
        "the eight given-back entries, long before the heir's blocking read times out",
        async {
            while seen.len() < 8 {
                let delivery = heir.next().await.unwrap();
                seen.push((number(&delivery), delivery.envelope().attempt()));
                delivery.ack().await.unwrap();
            }
        },
    )
    .await;
    seen.sort();
    assert_eq!(seen, (0..8).map(|n| (n, 1)).collect::<Vec<_>>());
    heir_router.close().await.unwrap();
}

/// Entries trimmed while a live member holds them cannot be renewed (`XCLAIM` does not take a deleted
/// entry): they stay idle in the pending list until that member settles them, and every reclaim round
/// of the other members lists them and cannot claim them. An idle member's reader holds every free slot in its
/// blocking read (again after every read that brought something: here a steady trickle on a class only
/// it reads); the rounds must not interrupt that read for these entries every round (a `CLIENT UNBLOCK`
/// and a new read each time, for as long as the holder works on it), only when they are new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaim_rounds_do_not_interrupt_the_read_again_for_an_entry_they_could_not_claim() {
    use fred::types::Value;
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    // Reclaiming looks every 150 ms; the reads would block for 15 s.
    let settings = || {
        builder(DeliveryMode::Streams, &prefix)
            .claim_idle(Duration::from_millis(300))
            .read_block(Duration::from_secs(15))
    };
    let holder_router = connected(settings()).await;
    let other_router = connected(settings()).await;
    let raw = raw_client().await;
    let key = format!("{prefix}:stream:{{Unclaimed}}");
    let options = SubscribeOptions::new(ChannelPattern::parse("Unclaimed:*:*").unwrap())
        .group("g")
        .prefetch(10);
    let mut holder = holder_router.subscribe(options).await.unwrap();
    // Three, more than the slots a reader leaves free when the one it delivered is settled.
    let mut held = Vec::new();
    for n in 0..3 {
        holder_router
            .publish(envelope("Unclaimed:request:s1", n))
            .await
            .unwrap();
        held.push(next(&mut holder).await);
    }
    let mut other = other_router
        .subscribe(
            SubscribeOptions::patterns(vec![
                ChannelPattern::parse("Unclaimed:*:*").unwrap(),
                ChannelPattern::parse("Trickle:*:*").unwrap(),
            ])
            .group("g")
            .prefetch(10),
        )
        .await
        .unwrap();
    let _: Value = raw.xtrim(key.as_str(), ("MAXLEN", 0i64)).await.unwrap();
    // The other member's rounds find the entry idle once claim_idle passed, then every round: twelve
    // rounds are 1.8 s, the first two of which may find nothing. Meanwhile it gets a message after
    // another, so that its reader takes every free slot again.
    let rounds = async || other_router.health().await.get("reclaim_rounds");
    let start = rounds().await;
    let mut n = 0;
    eventually(
        WAIT,
        "twelve reclaim rounds of the other member",
        async || {
            n += 1;
            other_router
                .publish(envelope("Trickle:event:s1", n))
                .await
                .unwrap();
            let delivery = next(&mut other).await;
            assert_eq!(number(&delivery), n);
            delivery.ack().await.unwrap();
            rounds().await >= start + 12
        },
    )
    .await;
    let interrupts = other_router.health().await.get("read_interrupts");
    // Once per entry at most (a round may find one idle before the others).
    assert!(
        interrupts <= 3,
        "the other member interrupted its read {interrupts} times for entries it could not claim"
    );
    // Nothing was lost or counted lost: the holder still settles it.
    for delivery in held {
        delivery.ack().await.unwrap();
    }
    assert_eq!(other_router.health().await.get("trimmed"), 0);
    let _ = raw.quit().await;
    holder_router.close().await.unwrap();
    other_router.close().await.unwrap();
}

/// An acknowledgement of an entry another member already acknowledged (it claimed the entry while
/// this one was out of reach, and handled it too) finds nothing pending: the handler's work is done,
/// so the ack succeeds, but the double handling is counted where a user looks for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_of_an_entry_another_member_acknowledged_first_is_counted() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let options = SubscribeOptions::new(ChannelPattern::parse("Twice:*:*").unwrap()).group("g");
    let mut member = router.subscribe(options).await.unwrap();
    for n in 0..3 {
        router.publish(envelope("Twice:event:s1", n)).await.unwrap();
    }
    let mut deliveries = Vec::new();
    for _ in 0..3 {
        deliveries.push(next(&mut member).await);
    }
    deliveries.sort_by_key(number);
    // What another member that claimed entry 1 and handled it would have done: acknowledge it.
    let raw = raw_client().await;
    let key = format!("{prefix}:stream:{{Twice}}");
    let pending: Value = raw
        .xpending(key.as_str(), "g", ("-", "+", 10))
        .await
        .unwrap();
    let ids: Vec<String> = pending
        .into_array()
        .into_iter()
        .filter_map(|entry| entry.into_array().first().and_then(Value::as_string))
        .collect();
    assert_eq!(ids.len(), 3, "three entries pending: {ids:?}");
    let removed: u64 = raw.xack(key.as_str(), "g", ids[1].as_str()).await.unwrap();
    assert_eq!(removed, 1);
    for delivery in deliveries {
        delivery.ack().await.unwrap();
    }
    let health = router.health().await;
    assert_eq!(
        (health.get("acked"), health.get("acks_not_pending")),
        (2, 1),
        "(acked, acks_not_pending)"
    );
    let _ = raw.quit().await;
    router.close().await.unwrap();
}

/// A delivery a handler saw and dropped unsettled goes back into its member's buffer with the same
/// attempt; when that member then stops and gives its buffer back unhandled, the handler's attempt
/// still counts: the next member gets the next attempt, so that a message that keeps being abandoned
/// still reaches `max_deliveries` instead of looping at attempt 1 forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_delivery_given_back_from_the_buffer_still_counts_its_attempt() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let quick = || {
        builder(DeliveryMode::Streams, &prefix)
            .claim_idle(Duration::from_millis(300))
            .connect()
    };
    let options = SubscribeOptions::new(ChannelPattern::parse("Seen:*:*").unwrap()).group("g");
    let publisher = within(WAIT, "connecting", quick()).await.unwrap();
    let mut attempts = Vec::new();
    for stop in 0..3 {
        let router = within(WAIT, "connecting", quick()).await.unwrap();
        let mut member = router.subscribe(options.clone()).await.unwrap();
        if stop == 0 {
            publisher
                .publish(envelope("Seen:event:s1", 1))
                .await
                .unwrap();
        }
        let delivery = next(&mut member).await;
        attempts.push(delivery.envelope().attempt());
        // The handler gives up on it (dropped unsettled): it waits in the buffer again.
        drop(delivery);
        eventually(
            WAIT,
            "the abandoned delivery back in the buffer",
            async || member.buffered() == 1,
        )
        .await;
        if stop == 1 {
            member.closer().close().await.unwrap();
            while let Some(delivery) = member.try_next() {
                delivery.give_back();
            }
        }
        drop(member);
        router.close().await.unwrap();
    }
    assert_eq!(
        attempts,
        [1, 2, 3],
        "the attempt each member saw, each having dropped it unsettled"
    );
    publisher.close().await.unwrap();
}

/// A prefetch of `usize::MAX` asks for no bound (the memory router and RabbitMQ take it): a stream
/// subscription takes it too, instead of panicking while it allocates its buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_with_an_unbounded_prefetch_receives() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let mut member = router
        .subscribe(
            SubscribeOptions::new(ChannelPattern::parse("Wide:*:*").unwrap())
                .group("g")
                .prefetch(usize::MAX),
        )
        .await
        .unwrap();
    router.publish(envelope("Wide:event:s1", 1)).await.unwrap();
    let delivery = next(&mut member).await;
    delivery.ack().await.unwrap();
    router.close().await.unwrap();
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, agentcomm_core::Message)]
#[message(direction = "request")]
struct InboxAsk {
    n: u64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, agentcomm_core::Message)]
struct InboxAnswer {
    n: u64,
}

#[agent(sends = [InboxAsk])]
struct InboxAsker;

/// A request given up by its caller (a timeout around it, a `select!`) while its reply inbox is being
/// subscribed, with replies read from a stream: that takes a reader connection of its own, made part
/// way through. The set-up used to be dropped there with the request, and its reader kept reading for
/// nobody, for as long as the process lived (a connection and a blocking XREAD each). Now it is
/// finished on a task of its own and the inbox owns it: gone with the runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cancelled_while_its_inbox_is_made_leaves_no_reader_behind() {
    let Some((proxy, proxied)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router =
        connected(through(proxied, DeliveryMode::Streams, &prefix).replies_over_pubsub(false))
            .await;
    let baseline = proxy.stats().live;
    // Given up at different points of the set-up: from before it starts to after it is done.
    for round in 0..30u64 {
        let runtime = Runtime::new(router.clone());
        let asked = tokio::time::timeout(
            Duration::from_millis(round),
            runtime
                .publisher::<InboxAsker>()
                .request_timeout::<InboxAsk, InboxAnswer>("s1", InboxAsk { n: round }, WAIT),
        )
        .await;
        assert!(asked.is_err(), "nothing answers");
        drop(runtime);
    }
    eventually(
        WAIT,
        "the dropped runtimes' reply inboxes leave no connection open",
        async || proxy.stats().live <= baseline,
    )
    .await;
    router.close().await.unwrap();
}

/// A subscribe given up by its caller part way (a timeout around it, a `select!`) leaves nothing
/// running: in Streams mode, fan-out and group subscriptions connect a reader each while they set up,
/// and in pub/sub mode the first subscribe connects the subscriber. Those connections used to stay
/// open for nobody (a reader reading for ever) when the subscribe was dropped after making them; then
/// even closing the router left them open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_given_up_part_way_leaves_no_connection_behind() {
    let Some((proxy, proxied)) = redis_proxy().await else {
        return;
    };
    for mode in [DeliveryMode::Streams, DeliveryMode::PubSub] {
        let prefix = unique_prefix();
        let _cleanup = RemoveKeysOnDrop(prefix.clone());
        let router = connected(through(proxied.clone(), mode, &prefix)).await;
        let mut kept = Vec::new();
        // Given up at different points: from before anything is sent to after it is done.
        for round in 0..30u64 {
            let pattern = ChannelPattern::parse(&format!("Given{round}:*:*")).unwrap();
            let mut options = SubscribeOptions::new(pattern);
            if mode == DeliveryMode::Streams && round % 2 == 1 {
                options = options.group("given-up");
            }
            let subscribed =
                tokio::time::timeout(Duration::from_millis(round), router.subscribe(options)).await;
            if let Ok(subscription) = subscribed {
                kept.push(subscription.unwrap());
            }
        }
        drop(kept);
        router.close().await.unwrap();
        eventually(
            WAIT,
            &format!("{mode:?}: the closed router leaves no connection open"),
            async || proxy.stats().live == 0,
        )
        .await;
    }
}

/// A Streams subscribe still setting up when the router is closed is not made: it fails with `Closed`,
/// and the reader it was connecting is stopped. It used to be made once `close` had ended the router's
/// subscriptions, and to go on reading, on a connection of its own, for as long as it was held (a
/// reply inbox's: for as long as its bus lived).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_under_way_when_the_router_closes_is_not_made() {
    let Some((proxy, proxied)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connected(through(proxied, DeliveryMode::Streams, &prefix)).await;
    let baseline = proxy.stats().live;
    // Slow enough that the router closes while the reader's connection is being made.
    proxy.set_latency(Duration::from_millis(300));
    let subscribing = tokio::spawn({
        let router = router.clone();
        async move {
            router
                .subscribe(SubscribeOptions::new(
                    ChannelPattern::parse("Closing:*:*").unwrap(),
                ))
                .await
        }
    });
    eventually(
        WAIT,
        "the subscription's reader starts connecting",
        async || proxy.stats().live > baseline,
    )
    .await;
    router.close().await.unwrap();
    let subscribed = within(WAIT, "the subscribe ends", subscribing)
        .await
        .unwrap();
    proxy.set_latency(Duration::ZERO);
    assert!(
        matches!(subscribed, Err(Error::Closed { .. })),
        "a subscribe the router closed under is not made: {:?}",
        subscribed.as_ref().map(|_| "a subscription")
    );
    eventually(
        WAIT,
        "the closed router leaves no connection open",
        async || proxy.stats().live == 0,
    )
    .await;
}

/// A group subscribe that is still sending its set-up commands when the router closes fails with
/// `Closed` at once. It used to send its next command to the pool that `close` had just quit, where it
/// waited out the command timeout (30 s by default, once per command left), and then failed with a
/// timeout, so that an application shutting down waited for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_sending_its_set_up_when_the_router_closes_fails_at_once() {
    let Some((proxy, proxied)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connected(
        through(proxied, DeliveryMode::Streams, &prefix).command_timeout(Duration::from_secs(30)),
    )
    .await;
    // Each command of the set-up takes 400 ms: the router closes while they are being sent.
    proxy.set_latency(Duration::from_millis(200));
    let sent = proxy.stats().bytes_to_target;
    let subscribing = tokio::spawn({
        let router = router.clone();
        async move {
            router
                .subscribe(
                    SubscribeOptions::new(ChannelPattern::parse("Closing:*:*").unwrap())
                        .group("workers"),
                )
                .await
        }
    });
    eventually(WAIT, "the subscribe sends its first command", async || {
        proxy.stats().bytes_to_target > sent
    })
    .await;
    within(WAIT, "closing", router.close()).await.unwrap();
    let subscribed = within(WAIT, "the subscribe ends", subscribing)
        .await
        .unwrap();
    proxy.set_latency(Duration::ZERO);
    assert!(
        matches!(subscribed, Err(Error::Closed { .. })),
        "a subscribe the router closed under fails with Closed: {:?}",
        subscribed.as_ref().map(|_| "a subscription")
    );
    eventually(
        WAIT,
        "the closed router leaves no connection open",
        async || proxy.stats().live == 0,
    )
    .await;
}

/// For the tests that drop things outside any Tokio runtime: a runtime of their own, and a Streams
/// router made on it through a fault proxy (whose live connections show what was closed).
struct OutsideRuntime {
    runtime: tokio::runtime::Runtime,
    proxy: agentcomm_testkit::proxy::FaultProxy,
    prefix: String,
    _cleanup: RemoveKeysOnDrop,
    router: RedisRouter,
}

impl OutsideRuntime {
    /// `None` when no Redis answers (the test is skipped).
    fn connect() -> Option<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (proxy, proxied) = runtime.block_on(redis_proxy())?;
        let prefix = unique_prefix();
        let _cleanup = RemoveKeysOnDrop(prefix.clone());
        let router = runtime.block_on(connected(through(proxied, DeliveryMode::Streams, &prefix)));
        Some(Self {
            runtime,
            proxy,
            prefix,
            _cleanup,
            router,
        })
    }
}

/// Subscriptions are dropped wherever their owner drops them, outside any Tokio runtime too (a struct
/// dropped by `main` after its runtime's `block_on` returned, a non-Tokio thread). A library must not
/// panic in a drop, nor skip the clean-up there:
/// - a made Streams subscription dropped outside a runtime used to panic (closing it interrupted its
///   reader's blocking read with `tokio::spawn`); now it is closed on the router's runtime, and its
///   reader's connection goes;
/// - a group subscribe given up part way (after it registered the member's patterns) and dropped
///   outside a runtime used to leave the member in the group's registry for good (the undoing was
///   skipped without a runtime), making later members start the group's new streams early for a
///   member that never was; now it is undone on the router's runtime.
#[test]
fn streams_subscriptions_dropped_outside_a_runtime_are_cleaned_up_without_panicking() {
    let Some(OutsideRuntime {
        runtime,
        proxy,
        prefix,
        _cleanup,
        router,
    }) = OutsideRuntime::connect()
    else {
        return;
    };
    let baseline = proxy.stats().live;

    // A made subscription, dropped outside the runtime.
    let subscription = runtime.block_on(within(
        WAIT,
        "subscribing",
        router.subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Outside:*:*").unwrap(),
        )),
    ));
    let subscription = subscription.unwrap();
    assert!(proxy.stats().live > baseline, "its reader has a connection");
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(subscription)));
    assert!(
        dropped.is_ok(),
        "a subscription dropped outside a runtime must not panic"
    );
    runtime.block_on(eventually(
        WAIT,
        "the subscription dropped outside a runtime closes its reader's connection",
        async || proxy.stats().live <= baseline,
    ));

    // A group subscribe given up once it registered its member, dropped outside the runtime.
    let members = format!("{prefix}:group:outside:members");
    let raw = runtime.block_on(raw_client());
    proxy.set_latency(Duration::from_millis(300));
    let mut subscribing = {
        let router = router.clone();
        Box::pin(async move {
            router
                .subscribe(
                    SubscribeOptions::new(ChannelPattern::parse("Outside:*:*").unwrap())
                        .group("outside"),
                )
                .await
        })
    };
    runtime.block_on(async {
        tokio::select! {
            subscribed = subscribing.as_mut() => {
                panic!("the subscribe was to be given up part way: {:?}", subscribed.map(|_| ()))
            }
            () = eventually(WAIT, "the member registers its patterns", async || {
                raw.hlen::<u64, _>(&members).await.unwrap() == 1
            }) => {}
        }
    });
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(subscribing)));
    assert!(
        dropped.is_ok(),
        "a subscribe given up outside a runtime must not panic"
    );
    runtime.block_on(async {
        proxy.set_latency(Duration::ZERO);
        eventually(
            WAIT,
            "the given-up member's patterns are taken back out of the group's registry",
            async || raw.hlen::<u64, _>(&members).await.unwrap() == 0,
        )
        .await;
        router.close().await.unwrap();
        let _ = raw.quit().await;
    });
}

/// The other clean-ups of a drop outside any Tokio runtime: a group delivery dropped unsettled there
/// is given back at once on the router's runtime (it used to be left pending until `claim_idle`, with
/// a warning), and a router whose last clone is dropped there is closed on its runtime, its
/// connections with it (its close used to be skipped: the connections stayed open).
#[test]
fn a_delivery_and_a_router_dropped_outside_a_runtime_are_given_back_and_closed() {
    let Some(OutsideRuntime {
        runtime,
        proxy,
        _cleanup,
        router,
        ..
    }) = OutsideRuntime::connect()
    else {
        return;
    };
    let mut subscription = runtime
        .block_on(router.subscribe(
            SubscribeOptions::new(ChannelPattern::parse("Dropped:*:*").unwrap()).group("g"),
        ))
        .unwrap();
    let delivery = runtime.block_on(async {
        router
            .publish(envelope("Dropped:event:s1", 7))
            .await
            .unwrap();
        next(&mut subscription).await
    });
    // Outside the runtime: given back at once (claim_idle is 30 s, the wait 10 s).
    drop(delivery);
    runtime.block_on(async {
        let again = next(&mut subscription).await;
        assert_eq!(number(&again), 7);
        assert!(again.is_redelivered());
        again.ack().await.unwrap();
    });
    drop(subscription);
    assert!(proxy.stats().live > 0, "the router has connections");
    drop(router);
    runtime.block_on(eventually(
        WAIT,
        "the router dropped outside a runtime closes its connections",
        async || proxy.stats().live == 0,
    ));
}

/// `Duration::MAX` ("as long as it takes") for the command timeout, the blocking read, the claim idle
/// time and the discovery interval is taken (as a year), as it is for the connect and close timeouts.
/// Before, a Streams subscription's tasks added them to the clock or to each other and panicked: its
/// reader (`read_block` plus the command timeout) and its lease renewals (now plus a third of
/// `claim_idle`). The subscription then delivered nothing, with no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_stream_durations_are_taken_without_a_panic() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connected(
        builder(DeliveryMode::Streams, &prefix)
            .command_timeout(Duration::MAX)
            .read_block(Duration::MAX)
            .claim_idle(Duration::MAX)
            .discovery_interval(Duration::MAX),
    )
    .await;
    // A group: its leases are renewed, its idle entries looked for.
    let mut subscription = router
        .subscribe(SubscribeOptions::new(ChannelPattern::parse("Longest:*:*").unwrap()).group("g"))
        .await
        .unwrap();
    router
        .publish(envelope("Longest:event:s1", 1))
        .await
        .unwrap();
    let delivery = next(&mut subscription).await;
    assert_eq!(number(&delivery), 1);
    delivery.ack().await.unwrap();
    within(WAIT, "closing the subscription", subscription.close())
        .await
        .unwrap();
    within(WAIT, "closing", router.close()).await.unwrap();
}

/// Concurrent replies of one router to one reply inbox (stored in their stream and published to the
/// inbox's channel) reach Redis in the order of their sequence numbers. Before, a reply took its number
/// when it was encoded, before its `XADD` went out, and its `PUBLISH` followed the `XADD`'s answer (the
/// idempotent script: after the number, taken apart): a later reply could overtake it, and the inbox,
/// once the reorder window passed, counted it as lost and then discarded it as a duplicate. A zero
/// window shows any overtaking: since 52b77d7 as `late` (the reply is delivered late, and taken off
/// `lost`).
async fn concurrent_replies_reach_the_inbox_in_the_order_of_their_numbers(idempotent: bool) {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let requester =
        connected(builder(DeliveryMode::Streams, &prefix).reorder_window(Duration::ZERO)).await;
    let responder =
        connected(builder(DeliveryMode::Streams, &prefix).idempotent_publish(idempotent)).await;
    let mut inbox = requester
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Race:reply:inbox-1").unwrap(),
        ))
        .await
        .unwrap();
    const TASKS: u32 = 8;
    const EACH: u32 = 150;
    let total = (TASKS * EACH) as usize;
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let responder = responder.clone();
            tokio::spawn(async move {
                for index in 0..EACH {
                    responder
                        .publish(envelope("Race:reply:inbox-1", task * EACH + index))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let seen = arrivals(&mut inbox, total, number).await;
    let health = requester.health().await;
    assert_eq!(
        seen.len(),
        total,
        "delivered {} of {total}: {health:?}",
        seen.len()
    );
    assert_eq!(health.get("lost"), 0, "{health:?}");
    // An overtaken reply is delivered late since 52b77d7, and counted: none must be.
    assert_eq!(health.get("late"), 0, "{health:?}");
    assert_eq!(health.get("duplicates"), 0, "{health:?}");
    drop(inbox);
    requester.close().await.unwrap();
    responder.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_replies_reach_the_inbox_in_order() {
    concurrent_replies_reach_the_inbox_in_the_order_of_their_numbers(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_idempotent_replies_reach_the_inbox_in_order() {
    concurrent_replies_reach_the_inbox_in_the_order_of_their_numbers(true).await;
}

/// A subscription closed on a runtime of the application's that is then no longer driven (a
/// `current_thread` runtime outside its `block_on`): its finishing ran on a task of that runtime,
/// which stopped at its first wait for Redis, holding the subscription's finishing. The router's close,
/// which now waits for that finishing instead of running it again, waited until its deadline and quit:
/// the member stayed in its group, and the entries it held were given back only after `claim_idle`.
/// The finishing runs on the router's runtime, like the router's close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_closed_on_a_runtime_no_longer_driven_leaves_its_group_when_the_router_closes()
 {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let raw = raw_client().await;
    let members_key = format!("{prefix}:group:idle:members");
    let router =
        connected(builder(DeliveryMode::Streams, &prefix).close_timeout(Duration::from_secs(2)))
            .await;
    let pattern = ChannelPattern::parse("*:event:idle").unwrap();
    let subscription = router
        .subscribe(SubscribeOptions::new(pattern).group("idle"))
        .await
        .unwrap();
    // A stream the member knows: its finishing asks Redis what it holds there before it leaves.
    let channel = parse_channel("Idle:event:idle").unwrap();
    router
        .publish(Envelope::new(channel, "application/json", b"{}".to_vec()))
        .await
        .unwrap();
    let mut subscription = subscription;
    within(Duration::from_secs(5), "the entry", subscription.next())
        .await
        .expect("a delivery")
        .ack()
        .await
        .unwrap();
    let members: u64 = raw.hlen(&members_key).await.unwrap();
    assert_eq!(members, 1, "the member joined its group");
    // Closed on a runtime of its own, which runs the tasks it spawned only while it is driven.
    let idle = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            subscription.close().await.unwrap();
            drop(subscription);
            for _ in 0..16 {
                tokio::task::yield_now().await;
            }
        });
        runtime
    })
    .join()
    .unwrap();
    within(
        Duration::from_secs(10),
        "the router to close",
        agentcomm_core::Router::close(&router),
    )
    .await
    .unwrap();
    let members: u64 = raw.hlen(&members_key).await.unwrap();
    assert_eq!(
        members, 0,
        "the member left its group when the router closed"
    );
    std::thread::spawn(move || drop(idle)).join().unwrap();
    let _ = raw.quit().await;
}

/// A subscription closed before its router with a delivery still in its handler's hands: the
/// router's close waits for the finishing that close started (it no longer runs its own beside it),
/// and that finishing waits for the delivery to be settled: acknowledged while the router closes, the
/// entry is acknowledged in Redis, not given back to be handled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledgement_made_while_the_router_closes_after_its_subscription_is_sent() {
    use fred::prelude::StreamsInterface;
    use fred::types::Value;
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let raw = raw_client().await;
    let router = connected(builder(DeliveryMode::Streams, &prefix)).await;
    let mut subscription = router
        .subscribe(SubscribeOptions::new(ChannelPattern::parse("Late:*:*").unwrap()).group("g"))
        .await
        .unwrap();
    let channel = parse_channel("Late:event:s1").unwrap();
    router
        .publish(Envelope::new(channel, "application/json", b"{}".to_vec()))
        .await
        .unwrap();
    let delivery = within(WAIT, "the entry", subscription.next())
        .await
        .expect("a delivery");
    subscription.close().await.unwrap();
    let closing = tokio::spawn({
        let router = router.clone();
        async move { agentcomm_core::Router::close(&router).await }
    });
    // The router's close has begun: it waits for the delivery, in the handler's hands.
    eventually(WAIT, "the router to be closing", async || {
        router
            .publish(Envelope::new(
                parse_channel("Probe:event:s2").unwrap(),
                "application/json",
                b"{}".to_vec(),
            ))
            .await
            .is_err()
    })
    .await;
    assert!(!closing.is_finished(), "the close waits for the delivery");
    delivery.ack().await.unwrap();
    within(WAIT, "the router to close", closing)
        .await
        .unwrap()
        .unwrap();
    let key = format!("{prefix}:stream:{{Late}}");
    let pending: Value = raw.xpending(key.as_str(), "g", ()).await.unwrap();
    assert_eq!(
        pending.into_array().first().and_then(Value::as_u64),
        Some(0),
        "acknowledged before the router quit"
    );
    let _ = raw.quit().await;
}

/// A group member reading two streams acknowledges deliveries of both at once: the acknowledgements
/// go out in one batch, one `XACK` for each stream with that stream's ids. Every entry of both streams
/// is then acknowledged in Redis (none left pending, to be delivered again after `claim_idle`).
#[tokio::test]
async fn acknowledgements_of_two_streams_sent_together_each_reach_their_stream() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let options = SubscribeOptions::new(ChannelPattern::parse("*:event:s1").unwrap()).group("g");
    let mut member = router.subscribe(options).await.unwrap();
    for n in 0..10 {
        router.publish(envelope("PairA:event:s1", n)).await.unwrap();
        router.publish(envelope("PairB:event:s1", n)).await.unwrap();
    }
    let mut deliveries = Vec::new();
    for _ in 0..20 {
        deliveries.push(next(&mut member).await);
    }
    // Interleaved by stream, and all queued before the task that sends them runs (this runtime has one
    // thread): one batch with both streams in it.
    deliveries.sort_by_key(number);
    let acked =
        futures::future::join_all(deliveries.into_iter().map(|delivery| delivery.ack())).await;
    assert!(acked.iter().all(Result::is_ok), "{acked:?}");
    let raw = raw_client().await;
    for class in ["PairA", "PairB"] {
        let key = format!("{prefix}:stream:{{{class}}}");
        let pending: Value = raw.xpending(key.as_str(), "g", ()).await.unwrap();
        assert_eq!(
            pending.into_array().first().and_then(Value::as_u64),
            Some(0),
            "{class}'s entries all acknowledged"
        );
    }
    let health = router.health().await;
    assert_eq!(
        (health.get("acked"), health.get("acks_not_pending")),
        (20, 0),
        "(acked, acks_not_pending)"
    );
    let _ = raw.quit().await;
    router.close().await.unwrap();
}
