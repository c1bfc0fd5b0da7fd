//! Pub/sub mode against a real Redis (REDIS_URL, default redis://127.0.0.1:6379).

use std::time::Duration;

use crate::common::*;
use agentcomm_core::envelope::{Envelope, headers};
use agentcomm_core::prelude::*;
use agentcomm_core::router::{NackAction, PublishOutcome, SubscribeOptions};
use agentcomm_redis::{DeliveryMode, RedisRouter};

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

async fn connect(prefix: &str) -> RedisRouter {
    connected(builder(DeliveryMode::PubSub, prefix)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_patterns_unroutable_and_intact_envelopes() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let nobody = router.publish(envelope("Ping:event:s1", 0)).await.unwrap();
    assert_eq!(nobody, PublishOutcome::Unroutable);
    let mut by_class = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Ping:*:*").unwrap(),
        ))
        .await
        .unwrap();
    let mut exact = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Ping:event:s2").unwrap(),
        ))
        .await
        .unwrap();
    let mut any_class = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("*:event:s2").unwrap(),
        ))
        .await
        .unwrap();
    let sent = envelope("Ping:event:s2", 1)
        .with_header("tenant", "acme")
        .with_correlation_id("c-1")
        .with_reply_to("Pong:reply:inbox-1");
    let outcome = router.publish(sent.clone()).await.unwrap();
    assert!(
        matches!(outcome, PublishOutcome::Delivered(n) if n >= 3),
        "{outcome:?}"
    );
    for subscription in [&mut by_class, &mut exact, &mut any_class] {
        let delivery = next(subscription).await;
        // The sequence header is removed: what arrives equals what was sent.
        assert_eq!(delivery.envelope(), &sent);
        delivery.ack().await.unwrap();
    }
    router.publish(envelope("Ping:event:s3", 2)).await.unwrap();
    assert_eq!(number(&next(&mut by_class).await), 2);
    assert_quiet(&mut exact, Duration::from_millis(200)).await;
    assert_quiet(&mut any_class, Duration::from_millis(200)).await;
    let health = router.health().await;
    assert_eq!(health.backend, "redis-pubsub");
    assert_eq!(health.get("unroutable"), 1);
    // Redis sends one copy per matching Redis subscription (a channel and two globs matched s2): each
    // subscription keeps one, and these copies are not duplicates.
    assert_eq!(health.get("duplicates"), 0, "{health:?}");
    assert_eq!(health.get("delivered"), 4, "{health:?}");
    assert_eq!(health.get("lost"), 0, "{health:?}");
    router.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_are_refused_with_the_fix() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    assert!(!router.capabilities().consumer_groups);
    let error = router
        .subscribe(SubscribeOptions::new(ChannelPattern::parse("Ping:*:*").unwrap()).group("g"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("fan_out()") && error.contains("Streams"),
        "{error}"
    );
    router.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacked_messages_come_back_from_memory() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let mut subscription = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Job:*:*").unwrap(),
        ))
        .await
        .unwrap();
    router.publish(envelope("Job:request:s1", 9)).await.unwrap();
    let first = next(&mut subscription).await;
    first
        .nack(NackAction::Retry {
            delay: Duration::from_millis(100),
        })
        .await
        .unwrap();
    let second = next(&mut subscription).await;
    assert_eq!((number(&second), second.envelope().attempt()), (9, 2));
    assert!(second.is_redelivered());
    drop(second);
    let third = next(&mut subscription).await;
    assert_eq!(third.envelope().attempt(), 2);
    third.ack().await.unwrap();
    router.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_that_falls_behind_counts_what_it_lost_and_does_not_stall_others() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connected(builder(DeliveryMode::PubSub, &prefix).broadcast_capacity(64)).await;
    let mut slow = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Burst:*:*").unwrap(),
        ))
        .await
        .unwrap();
    let mut fast = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Burst:*:*").unwrap(),
        ))
        .await
        .unwrap();
    // The fast one reads as messages come, the slow one not at all during the burst.
    let fast_reader = tokio::spawn(async move {
        let mut got = 0u64;
        while got < 40 {
            match tokio::time::timeout(WAIT, fast.next()).await {
                Ok(Some(delivery)) => {
                    delivery.ack().await.unwrap();
                    got += 1;
                }
                _ => break,
            }
        }
        got
    });
    for chunk in 0..4 {
        let batch: Vec<Envelope> = (0..10)
            .map(|n| envelope("Burst:event:s1", chunk * 10 + n))
            .collect();
        for result in router.publish_batch(batch).await {
            assert!(
                matches!(result, Ok(PublishOutcome::Delivered(_))),
                "{result:?}"
            );
        }
    }
    assert_eq!(
        within(WAIT, "the fast reader", fast_reader).await.unwrap(),
        40,
        "the fast one got everything"
    );
    // The slow one reads those 40 now: it follows the publisher's sequence from here on.
    let mut slow_got = 0u64;
    for n in 0..40 {
        let delivery = next(&mut slow).await;
        assert_eq!(number(&delivery), n);
        delivery.ack().await.unwrap();
        slow_got += 1;
    }
    // Another subscription of the router, on another class, reads everything as it comes: its messages
    // share the subscriber's channel with the slow one's.
    let mut other = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Other:*:*").unwrap(),
        ))
        .await
        .unwrap();
    let other_got = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let other_reader = {
        let other_got = other_got.clone();
        tokio::spawn(async move {
            while let Ok(Some(delivery)) = tokio::time::timeout(WAIT, other.next()).await {
                delivery.ack().await.unwrap();
                other_got.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    // A burst far beyond the channel's capacity while the slow one still reads nothing, in chunks the
    // other subscription keeps up with.
    for start in (40..300).step_by(10) {
        let batch: Vec<Envelope> = (start..start + 10)
            .flat_map(|n| [envelope("Burst:event:s1", n), envelope("Other:event:s1", n)])
            .collect();
        for result in router.publish_batch(batch).await {
            assert!(result.is_ok(), "{result:?}");
        }
        eventually(WAIT, "the other subscription to keep up", async || {
            other_got.load(std::sync::atomic::Ordering::Relaxed) == u64::from(start - 30)
        })
        .await;
    }
    eventually(WAIT, "the slow one's channel to overrun", async || {
        slow.buffered() >= 64
    })
    .await;
    // Reading now: it gets the newest messages; what it lost is counted once the gap is settled.
    let mut last = 0;
    while let Ok(Some(delivery)) =
        tokio::time::timeout(Duration::from_millis(500), slow.next()).await
    {
        last = number(&delivery);
        delivery.ack().await.unwrap();
        slow_got += 1;
    }
    assert_eq!(last, 299, "the newest message arrived");
    router
        .publish(envelope("Burst:event:s1", 300))
        .await
        .unwrap();
    assert_eq!(number(&next(&mut slow).await), 300);
    slow_got += 1;
    // Gaps are settled after the reorder window: what the slow one lost of its own channel is counted
    // exactly as `lost`; `lagged` counts every message it skipped in the shared channel, the other
    // subscription's included.
    let until = tokio::time::Instant::now() + WAIT;
    while slow_got + router.health().await.get("lost") < 301 && tokio::time::Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let health = router.health().await;
    assert_eq!(
        slow_got + health.get("lost"),
        301,
        "received {slow_got}; {health:?}"
    );
    assert!(health.get("lagged") > health.get("lost"), "{health:?}");
    other_reader.abort();
    assert_eq!(health.get("duplicates"), 0, "{health:?}");
    router.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_kept_in_a_stream_even_in_pubsub_mode() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let dead = envelope("Job:request:s1", 3)
        .with_channel(parse_channel("Job:request:s1").unwrap().dead_letter())
        .with_header(headers::DEAD_LETTER_REASON, headers::REASON_HANDLER_FAILED);
    let outcome = router.publish(dead.clone()).await.unwrap();
    assert_eq!(
        outcome,
        PublishOutcome::Accepted,
        "kept although nobody listens"
    );
    router.close().await.unwrap();
    // A Streams router on the same prefix reads it: it was not lost.
    let streams = connected(builder(DeliveryMode::Streams, &prefix)).await;
    let key = format!("{prefix}:stream:{{DeadLetter}}");
    use fred::prelude::{ClientLike, StreamsInterface};
    let raw = raw_client().await;
    let length: u64 = raw.xlen(key.as_str()).await.unwrap();
    assert_eq!(length, 1);
    let _ = raw.quit().await;
    streams.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_are_dead_lettered_and_the_subscriber_goes_on() {
    use fred::prelude::{ClientLike, PubsubInterface};
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let mut subscription = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Raw:*:*").unwrap(),
        ))
        .await
        .unwrap();
    // A second subscription sees the same frame: one dead letter between them.
    let mut also = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Raw:event:*").unwrap(),
        ))
        .await
        .unwrap();
    let raw = raw_client().await;
    let _: i64 = raw
        .publish(format!("{prefix}:Raw:event:s1"), "garbage")
        .await
        .unwrap();
    router.publish(envelope("Raw:event:s1", 4)).await.unwrap();
    assert_eq!(number(&next(&mut subscription).await), 4);
    assert_eq!(number(&next(&mut also).await), 4);
    eventually(WAIT, "the malformed frame is counted", async || {
        router.health().await.get("malformed") == 2
    })
    .await;
    use fred::prelude::StreamsInterface;
    let dead_letters: u64 = raw
        .xlen(format!("{prefix}:stream:{{DeadLetter}}"))
        .await
        .unwrap();
    let _ = dead_letters;
    eventually(WAIT, "the dead letter to be stored", async || {
        raw.xlen::<u64, _>(format!("{prefix}:stream:{{DeadLetter}}"))
            .await
            .unwrap()
            == 1
    })
    .await;
    // Both subscriptions are done with it (counted above): no second dead letter comes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dead_letters: u64 = raw
        .xlen(format!("{prefix}:stream:{{DeadLetter}}"))
        .await
        .unwrap();
    assert_eq!(dead_letters, 1, "one dead letter for one malformed frame");
    let _ = raw.quit().await;
    router.close().await.unwrap();
}

/// A publish future does nothing until polled: one dropped unpolled sends nothing and takes no sequence
/// number, so subscribers count no loss for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_dropped_before_it_runs_sends_nothing_and_costs_no_number() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connected(
        builder(DeliveryMode::PubSub, &prefix).reorder_window(Duration::from_millis(100)),
    )
    .await;
    let mut subscription = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Lazy:*:*").unwrap(),
        ))
        .await
        .unwrap();
    // One before, so that the subscriber follows this publisher's numbers from the first.
    router.publish(envelope("Lazy:event:s1", 1)).await.unwrap();
    drop(router.publish(envelope("Lazy:event:s1", 2)));
    router.publish(envelope("Lazy:event:s1", 3)).await.unwrap();
    for expected in [1, 3] {
        let delivery = next(&mut subscription).await;
        assert_eq!(number(&delivery), expected);
        delivery.ack().await.unwrap();
    }
    // Three reorder windows without a message: a gap would have been settled as lost by now.
    assert_quiet(&mut subscription, Duration::from_millis(300)).await;
    let health = router.health().await;
    assert_eq!(health.get("lost"), 0, "{health:?}");
    assert_eq!(health.get("delivered"), 2, "{health:?}");
    // Each publish that ran is counted once; the dropped one not at all.
    assert_eq!(health.get("published"), 2, "{health:?}");
    router.close().await.unwrap();
}

/// A pub/sub router that only publishes holds no subscriber connection (nor its buffers, about 51 MB
/// at the default capacity); its first subscription opens it, and when that cannot connect, the
/// subscribe fails naming the server, and a later one opens it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscriber_connection_opens_with_the_first_subscription() {
    let Some((proxy, proxied)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let router = connected(
        RedisRouter::builder(proxied)
            .mode(DeliveryMode::PubSub)
            .prefix(&prefix)
            .pool_size(2)
            .connect_timeout(Duration::from_millis(500)),
    )
    .await;
    let channel = "Lazy:event:s1";
    let outcome = within(WAIT, "publish", router.publish(envelope(channel, 1)))
        .await
        .unwrap();
    assert_eq!(outcome, PublishOutcome::Unroutable);
    assert_eq!(
        proxy.stats().live,
        2,
        "the pool's two connections, no subscriber"
    );

    // The first subscription cannot connect its subscriber: it fails, saying where.
    proxy.refuse_for(Duration::from_secs(3));
    let error = within(
        WAIT,
        "a subscribe while connections are refused",
        router.subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Lazy:*:*").unwrap(),
        )),
    )
    .await
    .expect_err("the subscribe fails");
    assert!(matches!(error, Error::Connection { .. }), "{error}");
    assert!(error.to_string().contains("pub/sub subscriber"), "{error}");
    assert!(
        error.to_string().contains(&proxy.local_addr().to_string()),
        "{error}"
    );
    proxy.refuse_for(Duration::ZERO);

    // The next one opens it, and messages flow.
    let mut subscription = within(
        WAIT,
        "subscribe",
        router.subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Lazy:*:*").unwrap(),
        )),
    )
    .await
    .unwrap();
    assert_eq!(proxy.stats().live, 3, "the pool and the subscriber");
    let outcome = within(WAIT, "publish", router.publish(envelope(channel, 2)))
        .await
        .unwrap();
    assert_eq!(outcome, PublishOutcome::Delivered(1));
    let delivery = within(WAIT, "the delivery", subscription.next())
        .await
        .unwrap();
    assert_eq!(number(&delivery), 2);
    within(WAIT, "ack", delivery.ack()).await.unwrap();
    within(WAIT, "close", router.close()).await.unwrap();
}

/// A delivery given back (nack) and not read again before the subscription is dropped: pub/sub keeps
/// nothing, so it is counted and logged as dropped. Before, it stayed in the subscription's channel
/// (holding the subscription alive through its acknowledger), neither delivered nor counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_given_back_delivery_still_unread_when_the_subscription_is_dropped_counts_as_dropped() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let mut subscription = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Ping:*:*").unwrap(),
        ))
        .await
        .unwrap();
    router.publish(envelope("Ping:event:s1", 1)).await.unwrap();
    let delivery = next(&mut subscription).await;
    delivery.nack(NackAction::Requeue).await.unwrap();
    let before = router.health().await;
    assert_eq!(before.get("redelivered"), 1, "given back once");
    drop(subscription);
    eventually(
        WAIT,
        "the given-back delivery is counted as dropped",
        async || router.health().await.get("dropped") == before.get("dropped") + 1,
    )
    .await;
    let after = router.health().await;
    assert_eq!(after.get("redelivered"), 1, "dropped, not delivered again");
    within(WAIT, "close", router.close()).await.unwrap();
}

/// A subscription with a wildcard class listens to every channel under the prefix (`<prefix>:*`), but
/// its losses and repeats are those of the channels its patterns match. Before, it followed the
/// sequences of every channel it heard, so a gap on a channel it never delivered was counted as `lost`
/// (and made health `Degraded`), and a repeat there as a `duplicate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_class_subscription_counts_only_the_losses_of_its_own_channels() {
    use fred::prelude::PubsubInterface;
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let mut subscription = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("*:event:s1").unwrap(),
        ))
        .await
        .unwrap();
    let raw = raw_client().await;
    // Frames numbered by a publisher of our own making, so that the gaps are known.
    let publish = async |channel: &str, n: u32, sequence: &str| {
        let frame = envelope(channel, n)
            .to_frame_with_header("agentcomm-seq", sequence)
            .unwrap();
        let _: i64 = raw
            .publish(format!("{prefix}:{channel}"), frame)
            .await
            .unwrap();
    };
    // On a channel the subscription hears (its Redis glob) but does not match: a gap of 3, then a
    // repeat that does not follow its original.
    publish("Other:request:s2", 1, "forged/1").await;
    publish("Other:request:s2", 5, "forged/5").await;
    // On its own channel: a gap of 1.
    publish("Tick:event:s1", 1, "forged/1").await;
    publish("Other:request:s2", 5, "forged/5").await;
    publish("Tick:event:s1", 3, "forged/3").await;
    for expected in [1, 3] {
        let delivery = next(&mut subscription).await;
        assert_eq!(
            (delivery.envelope().channel().name(), number(&delivery)),
            ("Tick:event:s1", expected)
        );
        delivery.ack().await.unwrap();
    }
    // Polled for three reorder windows (200 ms): every gap is settled by then.
    assert_quiet(&mut subscription, Duration::from_millis(600)).await;
    let health = router.health().await;
    assert_eq!(
        health.get("lost"),
        1,
        "only its own channel's gap: {health:?}"
    );
    assert_eq!(health.get("duplicates"), 0, "{health:?}");
    assert_eq!(health.get("delivered"), 2, "{health:?}");
    let _ = fred::prelude::ClientLike::quit(&raw).await;
    router.close().await.unwrap();
}

/// A closed subscription delivers what had reached it and then ends, even while another subscription
/// of the router keeps its Redis channel subscribed and messages keep coming. Before, it went on
/// reading everything that arrived after its close until it once found nothing waiting: a consumer
/// slower than the flow (an agent draining at stop) never saw its stream end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_subscription_ends_while_its_channel_keeps_flowing_for_another() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let pattern = ChannelPattern::parse("Feed:event:s1").unwrap();
    // Keeps the Redis subscription of the channel (never read: it only holds the channel).
    let _other = router
        .subscribe(SubscribeOptions::new(pattern.clone()))
        .await
        .unwrap();
    let mut closing = router
        .subscribe(SubscribeOptions::new(pattern))
        .await
        .unwrap();
    let flowing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let publishing = {
        let (router, flowing) = (router.clone(), flowing.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while flowing.load(std::sync::atomic::Ordering::Relaxed) {
                router.publish(envelope("Feed:event:s1", n)).await.unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    eventually(WAIT, "messages to wait for the subscription", async || {
        closing.buffered() >= 10
    })
    .await;
    closing.close().await.unwrap();
    // Read more slowly than messages come (a handler taking 20 ms each): the stream still ends.
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        let mut read = 0u32;
        while let Some(delivery) = closing.next().await {
            delivery.ack().await.unwrap();
            read += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        read
    })
    .await;
    flowing.store(false, std::sync::atomic::Ordering::Relaxed);
    within(WAIT, "the publisher to stop", publishing)
        .await
        .unwrap();
    let read =
        drained.expect("the closed subscription's stream ends although its channel flows on");
    assert!(read < 50, "it read {read} messages after its close");
    router.close().await.unwrap();
}

/// A publish that fails before anything is sent (its JSON payload is not JSON) costs no sequence
/// number: subscribers count no loss for it. Before, its number was taken before encoding, so every
/// subscriber of the channel counted a lost message (and health said `Degraded`, pointing at the
/// network) for a message that was never published, and whose publisher got the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_cannot_be_encoded_costs_no_number() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let mut subscription = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Bad:*:*").unwrap(),
        ))
        .await
        .unwrap();
    let broken = || {
        Envelope::new(
            parse_channel("Bad:event:s1").unwrap(),
            "application/json",
            b"{not json".to_vec(),
        )
    };
    router.publish(envelope("Bad:event:s1", 1)).await.unwrap();
    let error = router.publish(broken()).await.unwrap_err();
    assert!(matches!(error, Error::Codec { .. }), "{error}");
    router.publish(envelope("Bad:event:s1", 2)).await.unwrap();
    // In a batch too: the others go, numbered without a gap.
    let results = router
        .publish_batch(vec![
            envelope("Bad:event:s1", 3),
            broken(),
            envelope("Bad:event:s1", 4),
        ])
        .await;
    assert!(
        results[0].is_ok() && results[1].is_err() && results[2].is_ok(),
        "{results:?}"
    );
    for expected in 1..=4 {
        let delivery = next(&mut subscription).await;
        assert_eq!(number(&delivery), expected);
        delivery.ack().await.unwrap();
    }
    // Three reorder windows without a message: a gap would have been settled as lost by now.
    assert_quiet(&mut subscription, Duration::from_millis(600)).await;
    let health = router.health().await;
    assert_eq!(health.get("lost"), 0, "{health:?}");
    router.close().await.unwrap();
}

/// A dead letter in pub/sub mode is stored, then published; when its `PUBLISH` fails after the store
/// worked, the publish reports `Accepted` (it is kept, the promise of a dead letter) and is stored
/// once. Before, the error made the caller think nothing was kept: the runtime gives the message back
/// to dead-letter it again when it returns, storing a second dead letter for one failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_stored_but_not_published_is_accepted_and_stored_once() {
    use fred::prelude::{ClientLike, StreamsInterface};
    if !redis_available().await {
        return;
    }
    let Some(target) = loopback_target(&redis_url()) else {
        println!("skipped: REDIS_URL is not a loopback redis:// URL");
        return;
    };
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    // A user that may do everything on the test's keys but PUBLISH: the store works, the publish
    // after it fails (NOPERM), as any error after the store would.
    let raw = raw_client().await;
    let Some(user) = TestUser::create(&prefix, &["&*", "+@all", "-publish"]).await else {
        return;
    };
    let outcome = async {
        let router = connected(
            RedisRouter::builder(user.url(&target))
                .mode(DeliveryMode::PubSub)
                .prefix(&prefix),
        )
        .await;
        let dead = envelope("Job:request:s1", 3)
            .with_channel(parse_channel("Job:request:s1").unwrap().dead_letter())
            .with_header(headers::DEAD_LETTER_REASON, headers::REASON_HANDLER_FAILED);
        let outcome = within(WAIT, "the dead letter's publish", router.publish(dead)).await;
        router.close().await.unwrap();
        outcome
    }
    .await;
    let length: u64 = raw
        .xlen(format!("{prefix}:stream:{{DeadLetter}}"))
        .await
        .unwrap();
    let _ = raw.quit().await;
    assert!(
        matches!(outcome, Ok(PublishOutcome::Accepted)),
        "stored, so kept: {outcome:?}"
    );
    assert_eq!(length, 1);
}

/// An ACL user of the shared Redis for one test: its password, the test's keys and the given rules.
/// Deleted when dropped, however the test ends (a panic included).
struct TestUser {
    name: String,
}

impl TestUser {
    const PASSWORD: &str = "secret-for-this-test";

    /// Creates the user of the test under `prefix`, with `rules` besides its password and keys; `None`,
    /// after a skip line, where this Redis cannot have ACL users (a failure instead with
    /// AGENTCOMM_REQUIRE_BROKERS=1).
    async fn create(prefix: &str, rules: &[&str]) -> Option<TestUser> {
        let name = format!("{prefix}-user");
        let password = format!(">{}", Self::PASSWORD);
        let keys = format!("~{prefix}:*");
        let mut all = vec!["on", password.as_str(), keys.as_str()];
        all.extend_from_slice(rules);
        let created = Self::acl(&name, &all).await;
        let user = TestUser { name };
        match created {
            Ok(()) => Some(user),
            Err(error) => {
                // Redis before 6 has no ACL users; with AGENTCOMM_REQUIRE_BROKERS=1 this fails instead,
                // so that a refused `ACL SETUSER` cannot quietly skip the tests that need it.
                servers::skip(&format!(
                    "cannot create an ACL user on the Redis at {} ({error})",
                    agentcomm_core::error::redact_url(&redis_url())
                ));
                None
            }
        }
    }

    /// Changes the user's rules (`ACL SETUSER`).
    async fn set(&self, rules: &[&str]) {
        Self::acl(&self.name, rules).await.expect("ACL SETUSER");
    }

    /// The URL of Redis at `target` as this user.
    fn url(&self, target: &str) -> String {
        format!("redis://{}:{}@{target}", self.name, Self::PASSWORD)
    }

    async fn acl(name: &str, rules: &[&str]) -> Result<(), fred::error::Error> {
        use fred::prelude::ClientLike;
        use fred::types::{CustomCommand, Value};
        let raw = raw_client().await;
        let mut args = vec!["SETUSER".to_string(), name.to_string()];
        args.extend(rules.iter().map(|rule| rule.to_string()));
        let set = raw
            .custom::<Value, _>(CustomCommand::new_static("ACL", None, false), args)
            .await
            .map(drop);
        let _ = raw.quit().await;
        set
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        use fred::prelude::ClientLike;
        use fred::types::{CustomCommand, Value};
        let user = std::mem::take(&mut self.name);
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                let raw = raw_client().await;
                let _ = raw
                    .custom::<Value, _>(
                        CustomCommand::new_static("ACL", None, false),
                        vec!["DELUSER".to_string(), user],
                    )
                    .await;
                let _ = raw.quit().await;
            });
        })
        .join();
    }
}

/// Routers see each other only when they share a prefix, also when one prefix starts with the other
/// and a colon (`app` and `app:v2`). A wildcard class subscribes to `<prefix>:*`, which Redis also
/// matches with the other router's channels; before, their messages were delivered, since only the
/// channel inside the frame was matched against the patterns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_class_does_not_receive_the_messages_of_a_longer_prefix() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let nested = format!("{prefix}:v2");
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let other = connect(&nested).await;
    let mut subscription = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("*:event:s1").unwrap(),
        ))
        .await
        .unwrap();
    other.publish(envelope("Ping:event:s1", 1)).await.unwrap();
    router.publish(envelope("Ping:event:s1", 2)).await.unwrap();
    let delivery = next(&mut subscription).await;
    assert_eq!(number(&delivery), 2, "only its own prefix's message");
    delivery.ack().await.unwrap();
    other.close().await.unwrap();
    router.close().await.unwrap();
}

/// A publish that cannot be encoded costs no sequence number even while another task publishes on the
/// same channel. 1946e59 gave the number back only when no later one had been taken meanwhile: a
/// concurrent publish of the channel during the failed one's encoding (a large payload takes a while
/// to be found invalid) kept the gap, and every subscriber counted a message as lost that was never
/// published (health `Degraded`, pointing at the network).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_cannot_be_encoded_costs_no_number_beside_a_concurrent_publisher() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let mut subscription = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Bad:*:*").unwrap(),
        ))
        .await
        .unwrap();
    let flowing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let publishing = {
        let (router, flowing) = (router.clone(), flowing.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while flowing.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                router.publish(envelope("Bad:event:s1", n)).await.unwrap();
            }
            n
        })
    };
    // Valid JSON for megabytes, then not: finding out takes long enough for the other task to publish.
    let mut payload = b"[".to_vec();
    for _ in 0..500_000 {
        payload.extend_from_slice(b"1,");
    }
    payload.extend_from_slice(b"}");
    for _ in 0..5 {
        // Wait for the other task to be publishing, so that it runs during the encoding below.
        let before = router.health().await.get("published");
        eventually(WAIT, "the other task to publish", async || {
            router.health().await.get("published") > before
        })
        .await;
        let broken = Envelope::new(
            parse_channel("Bad:event:s1").unwrap(),
            "application/json",
            payload.clone(),
        );
        let error = router.publish(broken).await.unwrap_err();
        assert!(matches!(error, Error::Codec { .. }), "{error}");
    }
    flowing.store(false, std::sync::atomic::Ordering::Relaxed);
    let sent = within(WAIT, "the other task to stop", publishing)
        .await
        .unwrap();
    for expected in 1..=sent {
        let delivery = next(&mut subscription).await;
        assert_eq!(number(&delivery), expected);
        delivery.ack().await.unwrap();
    }
    // Three reorder windows without a message: a gap would have been settled as lost by now.
    assert_quiet(&mut subscription, Duration::from_millis(600)).await;
    let health = router.health().await;
    assert_eq!(health.get("lost"), 0, "{health:?}");
    router.close().await.unwrap();
}

/// A malformed frame on a channel of a longer prefix (another router's: `<prefix>:v2:...`, which the
/// glob `<prefix>:*` of a wildcard class also matches) is not this router's to dead-letter. abb0982
/// keeps such routers' messages out, but only once decoded: a frame that does not decode was still
/// counted as this router's `malformed` and stored as a dead letter under its prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_frame_of_a_longer_prefix_is_not_this_routers() {
    use fred::prelude::{PubsubInterface, StreamsInterface};
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let mut subscription = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("*:event:s1").unwrap(),
        ))
        .await
        .unwrap();
    let raw = raw_client().await;
    let _: i64 = raw
        .publish(format!("{prefix}:v2:Tick:event:s1"), "not a frame")
        .await
        .unwrap();
    // One of its own, after: once its dead letter is stored, the other one was long seen.
    let _: i64 = raw
        .publish(format!("{prefix}:Tick:event:s1"), "not a frame either")
        .await
        .unwrap();
    // The subscription reads as it is polled: a message behind both shows they were read.
    router.publish(envelope("Tick:event:s1", 1)).await.unwrap();
    assert_eq!(number(&next(&mut subscription).await), 1);
    let stream = format!("{prefix}:stream:{{DeadLetter}}");
    eventually(
        WAIT,
        "its own malformed frame to be dead-lettered",
        async || raw.xlen::<u64, _>(stream.as_str()).await.unwrap_or(0) >= 1,
    )
    .await;
    let health = router.health().await;
    assert_eq!(health.get("malformed"), 1, "only its own: {health:?}");
    let stored: u64 = raw.xlen(stream.as_str()).await.unwrap();
    assert_eq!(stored, 1, "only its own frame is dead-lettered");
    let _ = fred::prelude::ClientLike::quit(&raw).await;
    router.close().await.unwrap();
}

/// A frame another program publishes on a channel of this router, but that names another channel (a
/// mistake such as the canonical name where the type's template renders another), reaches none of the
/// channel's subscriptions: it is dead-lettered as malformed, once, counted by each subscription that
/// read it and logged, like a frame that does not decode. Before, every subscription skipped it
/// without a trace: nothing counted, nothing logged, health `Healthy`, the message gone. A well-named
/// message of a longer prefix (another router's), which the wildcard class's glob also hears, is still
/// skipped quietly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_naming_another_channel_than_its_own_is_dead_lettered() {
    use fred::prelude::{PubsubInterface, StreamsInterface};
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let other = connect(&format!("{prefix}:v2")).await;
    let mut subscriptions = Vec::new();
    // By name, by a glob of the class, and by the wildcard class's glob of the whole prefix.
    for pattern in ["Named:event:s1", "Named:*:*", "*:event:*"] {
        subscriptions.push(
            router
                .subscribe(SubscribeOptions::new(
                    ChannelPattern::parse(pattern).unwrap(),
                ))
                .await
                .unwrap(),
        );
    }
    let raw = raw_client().await;
    let misnamed = envelope("Named:event:s2", 1).to_frame().unwrap();
    let receivers: i64 = raw
        .publish(format!("{prefix}:Named:event:s1"), misnamed)
        .await
        .unwrap();
    assert_eq!(receivers, 3, "Redis sent it to every subscription");
    other.publish(envelope("Named:event:s1", 2)).await.unwrap();
    // One of its own behind both: read by every subscription, so the other two were read before.
    router.publish(envelope("Named:event:s1", 3)).await.unwrap();
    for subscription in &mut subscriptions {
        assert_eq!(received(subscription).await, 3);
    }
    let stream = format!("{prefix}:stream:{{DeadLetter}}");
    eventually(WAIT, "the misnamed frame to be dead-lettered", async || {
        raw.xlen::<u64, _>(stream.as_str()).await.unwrap_or(0) >= 1
    })
    .await;
    let health = router.health().await;
    assert_eq!(
        health.get("malformed"),
        3,
        "once per subscription that read it: {health:?}"
    );
    assert_eq!(
        health.status,
        agentcomm_core::router::HealthStatus::Degraded
    );
    let stored: u64 = raw.xlen(stream.as_str()).await.unwrap();
    assert_eq!(stored, 1, "dead-lettered once");
    let _ = fred::prelude::ClientLike::quit(&raw).await;
    other.close().await.unwrap();
    router.close().await.unwrap();
}

/// A router whose prefix begins a longer one (`<prefix>` and `<prefix>:eu:v2`, another router's) hears
/// the longer prefix's messages through a wildcard class's glob `<prefix>:*`. One of a type named with a
/// template without `:` (`prices.{direction}.{session_id}`) comes on
/// `<prefix>:eu:v2:prices.response.s1`, whose name under the shorter prefix, `eu:v2:prices.response.s1`,
/// reads as a channel, yet it is well named: for the longer prefix. It is the other router's, and must
/// be skipped quietly, as before. It was dead-lettered as a misnamed frame into this router's dead
/// letters (every such message the other router published), counted as `malformed`, and health said
/// `Degraded`. A frame that really names another channel than this router's one it came on still is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_longer_prefixs_templated_message_is_not_taken_for_a_misnamed_frame() {
    use fred::prelude::{PubsubInterface, StreamsInterface};
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let other = connect(&format!("{prefix}:eu:v2")).await;
    let mut everything = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("*:response:*").unwrap(),
        ))
        .await
        .unwrap();
    let templated =
        Channel::with_template(&PriceGiven::TEMPLATE, PriceGiven::CLASS, "response", "s1").unwrap();
    let theirs = Envelope::new(templated, "application/json", b"{\"n\":1}".to_vec());
    assert_eq!(
        other.publish(theirs).await.unwrap(),
        PublishOutcome::Delivered(1),
        "this router's glob heard it"
    );
    // Behind it, a frame on one of this router's channels that names another: dead-lettered.
    let raw = raw_client().await;
    let misnamed = envelope("Named:response:s2", 2).to_frame().unwrap();
    let _: i64 = raw
        .publish(format!("{prefix}:Named:response:s1"), misnamed)
        .await
        .unwrap();
    // One of its own behind both: received, so the other two were read before.
    router
        .publish(envelope("Named:response:s1", 3))
        .await
        .unwrap();
    assert_eq!(received(&mut everything).await, 3);
    let stream = format!("{prefix}:stream:{{DeadLetter}}");
    eventually(WAIT, "the misnamed frame to be dead-lettered", async || {
        raw.xlen::<u64, _>(stream.as_str()).await.unwrap_or(0) >= 1
    })
    .await;
    let health = router.health().await;
    assert_eq!(
        health.get("malformed"),
        1,
        "only the misnamed frame: {health:?}"
    );
    let stored: u64 = raw.xlen(stream.as_str()).await.unwrap();
    assert_eq!(stored, 1, "only the misnamed frame is dead-lettered");
    let _ = fred::prelude::ClientLike::quit(&raw).await;
    other.close().await.unwrap();
    router.close().await.unwrap();
}

/// Receives the next delivery, checks that it is message `expected` and acknowledges it, then waits
/// three reorder windows with nothing arriving (a gap would have been settled as lost by then): the
/// router's health after that.
async fn lost_after(
    router: &RedisRouter,
    subscription: &mut agentcomm_core::router::Subscription,
    expected: u32,
) -> agentcomm_core::router::Health {
    assert_eq!(received(subscription).await, expected);
    assert_quiet(subscription, Duration::from_millis(600)).await;
    router.health().await
}

/// What the ACL tests share: an ACL user of the test's own (every channel and command allowed until the
/// test changes its rules), a router in `mode` connected as that user (`idempotent`: with
/// `idempotent_publish`), and a router of the default user subscribed to `pattern`; `None`, after the
/// skip line, without Redis, off loopback, or where this Redis cannot have ACL users.
async fn acl_routers(
    prefix: &str,
    mode: DeliveryMode,
    idempotent: bool,
    pattern: &str,
) -> Option<(
    TestUser,
    RedisRouter,
    RedisRouter,
    agentcomm_core::router::Subscription,
)> {
    if !redis_available().await {
        return None;
    }
    let Some(target) = loopback_target(&redis_url()) else {
        println!("skipped: REDIS_URL is not a loopback redis:// URL");
        return None;
    };
    let user = TestUser::create(prefix, &["&*", "+@all"]).await?;
    let publisher = connected(
        RedisRouter::builder(user.url(&target))
            .mode(mode)
            .idempotent_publish(idempotent)
            .prefix(prefix),
    )
    .await;
    let router = connected(builder(mode, prefix)).await;
    let subscription = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse(pattern).unwrap(),
        ))
        .await
        .unwrap();
    Some((user, publisher, router, subscription))
}

/// A publish that Redis refuses (`NOPERM`: the ACL user may not publish to the channel), in a batch or
/// alone, costs no sequence number: subscribers count no loss for it, and its publisher got the error.
/// Before, a refused publish kept its number, and once the channel's next publish went through, every
/// subscriber counted it as lost (health `Degraded`, pointing at the network) although its publisher
/// knew it had failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_redis_refuses_costs_no_number() {
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let Some((user, publisher, router, mut subscription)) =
        acl_routers(&prefix, DeliveryMode::PubSub, false, "Acl:*:*").await
    else {
        return;
    };
    publisher
        .publish(envelope("Acl:event:s1", 1))
        .await
        .unwrap();
    assert_eq!(
        lost_after(&router, &mut subscription, 1).await.get("lost"),
        0
    );
    // Refused in a pipeline.
    user.set(&["resetchannels"]).await;
    let results = publisher
        .publish_batch(vec![
            envelope("Acl:event:s1", 2),
            envelope("Acl:event:s1", 3),
        ])
        .await;
    assert!(
        results.iter().all(|result| result
            .as_ref()
            .is_err_and(|error| error.to_string().contains("NOPERM"))),
        "{results:?}"
    );
    user.set(&["allchannels"]).await;
    let results = publisher
        .publish_batch(vec![envelope("Acl:event:s1", 4)])
        .await;
    assert!(results[0].is_ok(), "{results:?}");
    assert_eq!(
        lost_after(&router, &mut subscription, 4).await.get("lost"),
        0,
        "the refused batch counted as lost"
    );
    // Refused alone.
    user.set(&["resetchannels"]).await;
    let refused = publisher.publish(envelope("Acl:event:s1", 5)).await;
    assert!(refused.is_err(), "{refused:?}");
    user.set(&["allchannels"]).await;
    publisher
        .publish(envelope("Acl:event:s1", 6))
        .await
        .unwrap();
    assert_eq!(
        lost_after(&router, &mut subscription, 6).await.get("lost"),
        0,
        "the refused publish counted as lost"
    );
    // Refused concurrently: Redis answers them in the order of their numbers, the lowest first.
    user.set(&["resetchannels"]).await;
    let refused =
        futures::future::join_all((7..=10).map(|n| publisher.publish(envelope("Acl:event:s1", n))))
            .await;
    assert!(refused.iter().all(Result::is_err), "{refused:?}");
    user.set(&["allchannels"]).await;
    publisher
        .publish(envelope("Acl:event:s1", 11))
        .await
        .unwrap();
    assert_eq!(
        lost_after(&router, &mut subscription, 11).await.get("lost"),
        0,
        "concurrent refused publishes counted as lost"
    );
    publisher.close().await.unwrap();
    router.close().await.unwrap();
}

/// A batch that Redis refuses whole (`NOPERM`), of more messages than a channel route remembers as
/// unused (64), costs no sequence number either. The refused numbers were given back lowest first:
/// each waited, as unused, for the ones above it, and past 64 the lowest were forgotten, so the last
/// give-back only reached down to the forgotten ones. The channel's next publish then left a gap of
/// those, and every subscriber counted them as lost although their publisher got the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_batch_redis_refuses_costs_no_number() {
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let Some((user, publisher, router, mut subscription)) =
        acl_routers(&prefix, DeliveryMode::PubSub, false, "Acl:*:*").await
    else {
        return;
    };
    publisher
        .publish(envelope("Acl:event:s1", 0))
        .await
        .unwrap();
    let delivery = next(&mut subscription).await;
    assert_eq!(number(&delivery), 0);
    delivery.ack().await.unwrap();
    // More than the 64 unused numbers a route remembers, fewer than a chunk (256).
    const REFUSED: u32 = 100;
    user.set(&["resetchannels"]).await;
    let results = publisher
        .publish_batch((1..=REFUSED).map(|n| envelope("Acl:event:s1", n)).collect())
        .await;
    assert!(
        results.iter().all(|result| result
            .as_ref()
            .is_err_and(|error| error.to_string().contains("NOPERM"))),
        "{:?}",
        &results[..3]
    );
    user.set(&["allchannels"]).await;
    publisher
        .publish(envelope("Acl:event:s1", REFUSED + 1))
        .await
        .unwrap();
    let health = lost_after(&router, &mut subscription, REFUSED + 1).await;
    assert_eq!(
        health.get("lost"),
        0,
        "the refused batch counted as lost: {health:?}"
    );
    publisher.close().await.unwrap();
    router.close().await.unwrap();
}

/// Two batches Redis refuses (`NOPERM`), sent concurrently to one channel, cost no sequence number
/// either. The first takes numbers 1..=100 and the second 101..=200 on the same connection, so the
/// first is answered first: its numbers, below those the second still has out, wait as unused. A route
/// remembered at most 64 unused numbers, one by one: it forgot 1..=36, and once the second batch gave
/// its numbers back the channel's next publish left those out, counted as lost by every subscriber
/// although their publisher got the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_batches_redis_refuses_cost_no_number() {
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let Some((user, publisher, router, mut subscription)) =
        acl_routers(&prefix, DeliveryMode::PubSub, false, "Acl:*:*").await
    else {
        return;
    };
    publisher
        .publish(envelope("Acl:event:s1", 0))
        .await
        .unwrap();
    let delivery = next(&mut subscription).await;
    assert_eq!(number(&delivery), 0);
    delivery.ack().await.unwrap();
    // Each batch longer than the 64 unused numbers a route remembers, shorter than a chunk (256).
    const REFUSED: u32 = 100;
    user.set(&["resetchannels"]).await;
    let batch = |first: u32| {
        publisher.publish_batch(
            (first..first + REFUSED)
                .map(|n| envelope("Acl:event:s1", n))
                .collect(),
        )
    };
    // Polled in one task, in this order: both are numbered before either is answered.
    let (first, second) = futures::future::join(batch(1), batch(1 + REFUSED)).await;
    assert!(
        first.iter().chain(&second).all(|result| result
            .as_ref()
            .is_err_and(|error| error.to_string().contains("NOPERM"))),
        "{:?} {:?}",
        &first[..2],
        &second[..2]
    );
    user.set(&["allchannels"]).await;
    publisher
        .publish(envelope("Acl:event:s1", 2 * REFUSED + 1))
        .await
        .unwrap();
    let health = lost_after(&router, &mut subscription, 2 * REFUSED + 1).await;
    assert_eq!(
        health.get("lost"),
        0,
        "the concurrent refused batches counted as lost: {health:?}"
    );
    publisher.close().await.unwrap();
    router.close().await.unwrap();
}

/// Concurrent publishes Redis refuses (`NOPERM`) whose callers see the refusal in an order that leaves
/// more than 64 separate runs of given-back numbers waiting at once cost no sequence number either:
/// 130 publishes, numbered 1..=130 in order, whose callers take their errors 1, 3, .., 129 first (each
/// waits as a run of its own for the number above it, still out), then 2, 4, .., 130. A route
/// remembered at most 64 runs and forgot the lowest: once all came back, that one stayed a gap every
/// subscriber counted as lost, although its publisher got the error.
///
/// On one thread: fred's task sends nothing while this one hands the publishes over, so no answer can
/// come before all 130 are numbered.
#[tokio::test(flavor = "current_thread")]
async fn refused_publishes_answered_as_more_than_64_runs_cost_no_number() {
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let Some((user, publisher, router, mut subscription)) =
        acl_routers(&prefix, DeliveryMode::PubSub, false, "Acl:*:*").await
    else {
        return;
    };
    publisher
        .publish(envelope("Acl:event:s1", 0))
        .await
        .unwrap();
    assert_eq!(received(&mut subscription).await, 0);
    const REFUSED: u32 = 130;
    user.set(&["resetchannels"]).await;
    let mut publishes: Vec<_> = (1..=REFUSED)
        .map(|n| publisher.publish(envelope("Acl:event:s1", n)))
        .collect();
    // A publish takes its number and is handed to fred on its first poll: all of them, in order.
    for publish in &mut publishes {
        assert!(futures::poll!(publish).is_pending());
    }
    // The odd-numbered ones' callers first, then the even ones'.
    let order = (0..publishes.len())
        .step_by(2)
        .chain((1..publishes.len()).step_by(2));
    for at in order {
        let refused = within(WAIT, "a refused publish", &mut publishes[at]).await;
        assert!(
            refused
                .as_ref()
                .is_err_and(|error| error.to_string().contains("NOPERM")),
            "{refused:?}"
        );
    }
    user.set(&["allchannels"]).await;
    publisher
        .publish(envelope("Acl:event:s1", REFUSED + 1))
        .await
        .unwrap();
    let health = lost_after(&router, &mut subscription, REFUSED + 1).await;
    assert_eq!(
        health.get("lost"),
        0,
        "refused publishes counted as lost: {health:?}"
    );
    publisher.close().await.unwrap();
    router.close().await.unwrap();
}

/// A `PUBLISH` that ran, whose reply was lost with its connection, and that Redis refuses when fred
/// writes it again after the reconnect (the ACL changed in between) went out: its number must not be
/// used again. Given back as refused, the channel's next publish took it, and every subscriber dropped
/// that message as a repeat of the first: a publish that succeeded, never delivered (health
/// `Healthy`, `duplicates` 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_ran_then_was_refused_when_written_again_keeps_its_number() {
    let Some((proxy, _)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let Some(user) = TestUser::create(&prefix, &["&*", "+@all"]).await else {
        return;
    };
    let publisher = connected(
        RedisRouter::builder(user.url(&proxy.local_addr().to_string()))
            .mode(DeliveryMode::PubSub)
            .prefix(&prefix),
    )
    .await;
    let router = connect(&prefix).await;
    let mut subscription = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Acl:*:*").unwrap(),
        ))
        .await
        .unwrap();
    publisher
        .publish(envelope("Acl:event:s1", 1))
        .await
        .unwrap();
    assert_eq!(received(&mut subscription).await, 1);
    // The next publish reaches Redis after 2 s, and its reply would come 2 s later: held for good
    // (blackhole, then cut) as soon as the subscriber has the message, however slow this machine.
    proxy.set_latency(Duration::from_secs(2));
    let second = tokio::spawn({
        let publisher = publisher.clone();
        async move { publisher.publish(envelope("Acl:event:s1", 2)).await }
    });
    assert_eq!(received(&mut subscription).await, 2, "it ran");
    proxy.blackhole(true);
    proxy.set_latency(Duration::ZERO);
    user.set(&["resetchannels"]).await;
    proxy.cut_all();
    proxy.blackhole(false);
    // Refused when fred wrote it again after the reconnect, although it ran.
    let second = within(WAIT, "the second publish", second).await.unwrap();
    assert!(
        second
            .as_ref()
            .is_err_and(|error| error.to_string().contains("NOPERM")),
        "the reply came before the cut, or the publish was not written again: {second:?}"
    );
    user.set(&["allchannels"]).await;
    for n in [3, 4] {
        publisher
            .publish(envelope("Acl:event:s1", n))
            .await
            .unwrap();
    }
    // One connection, in order: 3 comes before 4, unless it was dropped as a repeat of 2.
    let third = received(&mut subscription).await;
    let health = router.health().await;
    assert_eq!(
        third, 3,
        "a published message dropped as a repeat: {health:?}"
    );
    publisher.close().await.unwrap();
    router.close().await.unwrap();
}

/// The same for a stored publish (a reply, with `idempotent_publish`): the publish script ran, stored
/// and published it, its reply was lost with its connection, and its publisher's mark on the stream was
/// gone when fred wrote it again (a restart of Redis without persistence, an eviction of the key under
/// `allkeys-*` memory policies: here deleted): the script stored it again and Redis refused its
/// `PUBLISH`. That refusal does not mean the number did not go out. Given back, the reply's next publish
/// took it, and the inbox dropped it as a repeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_publish_that_ran_then_was_refused_when_run_again_keeps_its_number() {
    use fred::prelude::{ClientLike, KeysInterface, StreamsInterface};
    use fred::types::{CustomCommand, Value};
    let Some((proxy, _)) = redis_proxy().await else {
        return;
    };
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let Some(user) = TestUser::create(&prefix, &["&*", "+@all"]).await else {
        return;
    };
    let publisher = connected(
        RedisRouter::builder(user.url(&proxy.local_addr().to_string()))
            .mode(DeliveryMode::Streams)
            .idempotent_publish(true)
            .prefix(&prefix),
    )
    .await;
    let router = connected(builder(DeliveryMode::Streams, &prefix)).await;
    let mut inbox = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Again:reply:inbox-1").unwrap(),
        ))
        .await
        .unwrap();
    publisher
        .publish(envelope("Again:reply:inbox-1", 1))
        .await
        .unwrap();
    assert_eq!(received(&mut inbox).await, 1);
    // As in the test above: the reply of the next publish is held for good once the inbox has it.
    proxy.set_latency(Duration::from_secs(2));
    let second = tokio::spawn({
        let publisher = publisher.clone();
        async move { publisher.publish(envelope("Again:reply:inbox-1", 2)).await }
    });
    assert_eq!(received(&mut inbox).await, 2, "it ran");
    proxy.blackhole(true);
    proxy.set_latency(Duration::ZERO);
    let raw = raw_client().await;
    let marks: Vec<String> = raw
        .custom(
            CustomCommand::new_static("KEYS", None, false),
            vec![format!("{prefix}:dedup:*")],
        )
        .await
        .unwrap();
    assert_eq!(marks.len(), 1, "the publisher's mark: {marks:?}");
    let _: Value = raw.del(marks).await.unwrap();
    let _ = raw.quit().await;
    user.set(&["-publish"]).await;
    proxy.cut_all();
    proxy.blackhole(false);
    // Run again after the reconnect: stored again, its PUBLISH refused, so reported accepted.
    let second = within(WAIT, "the second publish", second).await.unwrap();
    assert!(
        matches!(second, Ok(PublishOutcome::Accepted)),
        "the reply came before the cut: {second:?}"
    );
    user.set(&["+publish"]).await;
    for n in [3, 4] {
        publisher
            .publish(envelope("Again:reply:inbox-1", n))
            .await
            .unwrap();
    }
    // One connection, in order: 3 comes before 4, unless it was dropped as a repeat of 2.
    let third = received(&mut inbox).await;
    let health = router.health().await;
    assert_eq!(
        third, 3,
        "a published reply dropped as a repeat: {health:?}"
    );
    let raw = raw_client().await;
    let length: u64 = raw
        .xlen(format!("{prefix}:stream:{{Again}}"))
        .await
        .unwrap();
    let _ = raw.quit().await;
    assert_eq!(
        length, 5,
        "the second reply stored twice: run again after the reconnect"
    );
    publisher.close().await.unwrap();
    router.close().await.unwrap();
}

/// Publishes with a plain client what an agentcomm publisher sends for message `number` on `channel`,
/// numbered by hand (publisher `0123456789abcdef`).
async fn publish_numbered(raw: &fred::prelude::Client, prefix: &str, channel: &str, number: u32) {
    use agentcomm_redis::sequence::SEQUENCE_HEADER;
    use fred::prelude::PubsubInterface;
    let frame = envelope(channel, number)
        .with_header(SEQUENCE_HEADER, format!("0123456789abcdef/{number}"))
        .to_frame()
        .unwrap();
    let _: i64 = raw
        .publish(format!("{prefix}:{channel}"), bytes::Bytes::from(frame))
        .await
        .unwrap();
}

/// The number of the next delivery, acknowledged.
async fn received(subscription: &mut agentcomm_core::router::Subscription) -> u32 {
    let delivery = next(subscription).await;
    let n = number(&delivery);
    delivery.ack().await.unwrap();
    n
}

/// A message numbered below the first one a subscription heard from its publisher, arriving after the
/// reorder window (overtaken by later ones, or written again by fred after a reconnect), was never seen
/// by it: it is delivered, and only a second copy of it is a duplicate. Before, it was discarded and
/// counted as a duplicate: a message lost with a false reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_message_below_the_first_number_heard_is_delivered() {
    use fred::prelude::ClientLike;
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let mut subscription = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Late:*:*").unwrap(),
        ))
        .await
        .unwrap();
    let raw = raw_client().await;
    let publish =
        async |number: u32| publish_numbered(&raw, &prefix, "Late:event:s1", number).await;
    publish(5).await;
    assert_eq!(received(&mut subscription).await, 5);
    // Well past the reorder window (200 ms).
    assert_quiet(&mut subscription, Duration::from_millis(600)).await;
    publish(4).await;
    assert_eq!(received(&mut subscription).await, 4, "never seen before");
    publish(4).await;
    publish(6).await;
    assert_eq!(
        received(&mut subscription).await,
        6,
        "4 again is a duplicate"
    );
    let health = router.health().await;
    assert_eq!(health.get("duplicates"), 1, "{health:?}");
    assert_eq!(health.get("lost"), 0, "{health:?}");
    let _ = raw.quit().await;
    router.close().await.unwrap();
}

/// A message that arrives after its gap was counted as lost (later than the reorder window: a publish
/// fred wrote again after a reconnect, a publisher's thread stalled) was never delivered: it is
/// delivered late, taken off `lost` and counted as `late`; only a second copy is a duplicate. Before,
/// it was discarded as a duplicate while `lost` kept counting it: a message dropped with a false reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_arriving_after_its_gap_was_counted_lost_is_delivered_late() {
    use fred::prelude::ClientLike;
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router =
        connected(builder(DeliveryMode::PubSub, &prefix).reorder_window(Duration::from_millis(50)))
            .await;
    let mut subscription = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Tardy:*:*").unwrap(),
        ))
        .await
        .unwrap();
    let raw = raw_client().await;
    let publish =
        async |number: u32| publish_numbered(&raw, &prefix, "Tardy:event:s1", number).await;
    publish(1).await;
    assert_eq!(received(&mut subscription).await, 1);
    publish(3).await;
    assert_eq!(received(&mut subscription).await, 3);
    // 2, missing past the window (50 ms), is counted as lost.
    read_until_lost(&router, &mut subscription, 1).await;
    publish(2).await;
    assert_eq!(
        received(&mut subscription).await,
        2,
        "a message counted as lost that comes after all was never delivered"
    );
    publish(2).await;
    publish(4).await;
    assert_eq!(
        received(&mut subscription).await,
        4,
        "2 again is a duplicate"
    );
    let health = router.health().await;
    assert_eq!(health.get("lost"), 0, "{health:?}");
    assert_eq!(health.get("late"), 1, "{health:?}");
    assert_eq!(health.get("duplicates"), 1, "{health:?}");
    let _ = raw.quit().await;
    router.close().await.unwrap();
}

/// Reads `subscription`, asserting that nothing comes, until `lost` reaches `count`: sweeps run while a
/// subscription is read, and a gap is counted once it stayed open past the window, however slow the
/// machine (not a fixed wait); then checks that it did not go beyond.
async fn read_until_lost(
    router: &RedisRouter,
    subscription: &mut agentcomm_core::router::Subscription,
    count: u64,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while router.health().await.get("lost") < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{count} not counted as lost within 10 s: {:?}",
            router.health().await
        );
        assert_quiet(subscription, Duration::from_millis(50)).await;
    }
    let health = router.health().await;
    assert_eq!(health.get("lost"), count, "{health:?}");
}

/// Many messages arriving after their gap was counted as lost (fred writing a burst of publishes
/// again after a reconnect) are each delivered, but logged once per few seconds, saying how many were
/// not logged, not a line each.
#[tokio::test]
async fn a_burst_of_late_messages_is_logged_once_not_a_line_each() {
    use fred::prelude::ClientLike;
    if !redis_available().await {
        return;
    }
    #[derive(Clone, Default)]
    struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let lines = Lines::default();
    let writer = lines.clone();
    // A current-thread runtime: the subscription is read, and logs, on this thread.
    let _logs = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::INFO)
            .finish(),
    );
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router =
        connected(builder(DeliveryMode::PubSub, &prefix).reorder_window(Duration::from_millis(50)))
            .await;
    let mut subscription = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Burst:*:*").unwrap(),
        ))
        .await
        .unwrap();
    let raw = raw_client().await;
    for number in [1, 40] {
        publish_numbered(&raw, &prefix, "Burst:event:s1", number).await;
        assert_eq!(received(&mut subscription).await, number);
    }
    read_until_lost(&router, &mut subscription, 38).await;
    for number in 2..40 {
        publish_numbered(&raw, &prefix, "Burst:event:s1", number).await;
    }
    for number in 2..40 {
        assert_eq!(received(&mut subscription).await, number);
    }
    let health = router.health().await;
    assert_eq!(
        (health.get("lost"), health.get("late")),
        (0, 38),
        "{health:?}"
    );
    let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
    let logged = text
        .lines()
        .filter(|line| line.contains("arrived after it was counted as lost"))
        .count();
    // One line per 5 s: two at most, however slow the machine.
    assert!((1..=2).contains(&logged), "{logged} lines:\n{text}");
    let _ = raw.quit().await;
    router.close().await.unwrap();
}

/// A frame without a sequence number (published by another program) on a channel that one subscription
/// of a router subscribes to by name and another by glob is delivered once to each. Redis sends the
/// connection one copy per matching Redis subscription; before, only the copies of numbered frames were
/// skipped, and both subscriptions got such a frame twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_without_a_number_matched_by_a_channel_and_a_glob_is_delivered_once_to_each() {
    use fred::prelude::{ClientLike, PubsubInterface};
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let mut by_name = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Plain:event:s1").unwrap(),
        ))
        .await
        .unwrap();
    let mut by_glob = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Plain:*:*").unwrap(),
        ))
        .await
        .unwrap();
    let raw = raw_client().await;
    for n in 1..=2 {
        let frame = envelope("Plain:event:s1", n).to_frame().unwrap();
        let _: i64 = raw
            .publish(
                format!("{prefix}:Plain:event:s1"),
                bytes::Bytes::from(frame),
            )
            .await
            .unwrap();
    }
    for subscription in [&mut by_name, &mut by_glob] {
        for expected in 1..=2 {
            let delivery = next(subscription).await;
            assert_eq!(number(&delivery), expected, "each frame once");
            delivery.ack().await.unwrap();
        }
    }
    assert_quiet(&mut by_name, Duration::from_millis(300)).await;
    assert_quiet(&mut by_glob, Duration::from_millis(100)).await;
    let _ = raw.quit().await;
    router.close().await.unwrap();
}

/// A frame without a sequence number that another program publishes twice, the same bytes each time,
/// reaches a subscription that covers its channel by globs once per publish, as it reaches one that
/// subscribes by name; with two globs of the connection matching, the second glob's copies are still
/// skipped. Before, a glob-covered subscription skipped a frame identical to the one it took last as a
/// copy, however many globs matched: the second publish was dropped, uncounted and unlogged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_frame_published_twice_reaches_a_glob_subscription_twice() {
    use fred::prelude::{ClientLike, PubsubInterface};
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connect(&prefix).await;
    let raw = raw_client().await;
    // Each frame encoded once: a publish repeated sends the very same bytes.
    let frames: Vec<bytes::Bytes> = (0..=4)
        .map(|n| bytes::Bytes::from(envelope("Same:event:s1", n).to_frame().unwrap()))
        .collect();
    let publish = async |n: usize| {
        let _: i64 = raw
            .publish(format!("{prefix}:Same:event:s1"), frames[n].clone())
            .await
            .unwrap();
    };
    let mut wide = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Same:*:*").unwrap(),
        ))
        .await
        .unwrap();
    // One glob of the connection matches: one copy per publish.
    publish(1).await;
    publish(1).await;
    publish(2).await;
    for expected in [1, 1, 2] {
        let delivery = next(&mut wide).await;
        assert_eq!(number(&delivery), expected, "each publish once");
        delivery.ack().await.unwrap();
    }
    // Two globs match: two copies per publish, one kept by each subscription.
    let mut narrow = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Same:event:*").unwrap(),
        ))
        .await
        .unwrap();
    publish(3).await;
    publish(3).await;
    publish(4).await;
    for subscription in [&mut wide, &mut narrow] {
        for expected in [3, 3, 4] {
            let delivery = next(subscription).await;
            assert_eq!(number(&delivery), expected, "each publish once");
            delivery.ack().await.unwrap();
        }
    }
    assert_quiet(&mut wide, Duration::from_millis(300)).await;
    assert_quiet(&mut narrow, Duration::from_millis(100)).await;
    let _ = raw.quit().await;
    router.close().await.unwrap();
}

/// A gap still open in a publisher's sequence when a subscription ends is counted as `lost`: the
/// message missing from it was published before ones the subscription received, and it will never
/// receive it. Before, a gap younger than the reorder window at the close was forgotten with the
/// subscription, and received + `lost` fell short of what was published before the last message
/// received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_still_open_when_a_subscription_ends_is_counted_as_lost() {
    use fred::prelude::ClientLike;
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    // A window longer than the test: no sweep settles the gap before the close.
    let router =
        connected(builder(DeliveryMode::PubSub, &prefix).reorder_window(Duration::from_secs(60)))
            .await;
    let mut subscription = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Gap:event:s1").unwrap(),
        ))
        .await
        .unwrap();
    let raw = raw_client().await;
    // 2 never comes.
    for number in [1, 3] {
        publish_numbered(&raw, &prefix, "Gap:event:s1", number).await;
    }
    for expected in [1, 3] {
        assert_eq!(received(&mut subscription).await, expected);
    }
    assert_eq!(router.health().await.get("lost"), 0, "within the window");
    subscription.close().await.unwrap();
    let end = within(Duration::from_secs(5), "the end", subscription.next()).await;
    assert!(end.is_none());
    let health = router.health().await;
    assert_eq!(health.get("lost"), 1, "{health:?}");
    let _ = raw.quit().await;
    router.close().await.unwrap();
}

/// In Streams mode a reply is stored and published over pub/sub, numbered for the inboxes; when Redis
/// refuses to store it (here `NOPERM` for `XADD`), it is never published, and its number is given back
/// as for a refused pub/sub publish. Before, the number stayed taken: the inbox counted a message as
/// `lost` whose publisher had got the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_redis_refuses_to_store_costs_no_number() {
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let Some((user, publisher, router, mut inbox)) =
        acl_routers(&prefix, DeliveryMode::Streams, false, "Ack:reply:inbox-1").await
    else {
        return;
    };
    publisher
        .publish(envelope("Ack:reply:inbox-1", 1))
        .await
        .unwrap();
    assert_eq!(received(&mut inbox).await, 1);
    user.set(&["-xadd"]).await;
    let refused = publisher.publish(envelope("Ack:reply:inbox-1", 2)).await;
    assert!(refused.is_err(), "{refused:?}");
    user.set(&["+xadd"]).await;
    publisher
        .publish(envelope("Ack:reply:inbox-1", 3))
        .await
        .unwrap();
    let health = lost_after(&router, &mut inbox, 3).await;
    assert_eq!(health.get("lost"), 0, "{health:?}");
    publisher.close().await.unwrap();
    router.close().await.unwrap();
}

/// A reply in Streams mode is stored, then published to the requester's inbox; when Redis stores it but
/// refuses its `PUBLISH` (here `NOPERM`: the user may not publish), the publish reports `Accepted`, it
/// is stored once, and its number is given back (the inbox counts nothing as lost), with or without
/// `idempotent_publish`. Before, with `idempotent_publish`, the publish script's `PUBLISH` failed after
/// its `XADD` had stored the reply, and the publish failed: a caller that published it again stored it
/// twice.
async fn a_reply_stored_but_refused_its_publish_is_accepted_once(idempotent: bool) {
    use fred::prelude::{ClientLike, StreamsInterface};
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let Some((user, publisher, router, mut inbox)) = acl_routers(
        &prefix,
        DeliveryMode::Streams,
        idempotent,
        "Kept:reply:inbox-1",
    )
    .await
    else {
        return;
    };
    publisher
        .publish(envelope("Kept:reply:inbox-1", 1))
        .await
        .unwrap();
    assert_eq!(received(&mut inbox).await, 1);
    user.set(&["-publish"]).await;
    let refused = publisher.publish(envelope("Kept:reply:inbox-1", 2)).await;
    assert!(
        matches!(refused, Ok(PublishOutcome::Accepted)),
        "stored, so kept: {refused:?}"
    );
    user.set(&["+publish"]).await;
    publisher
        .publish(envelope("Kept:reply:inbox-1", 3))
        .await
        .unwrap();
    let health = lost_after(&router, &mut inbox, 3).await;
    assert_eq!(health.get("lost"), 0, "{health:?}");
    let raw = raw_client().await;
    let length: u64 = raw.xlen(format!("{prefix}:stream:{{Kept}}")).await.unwrap();
    let _ = raw.quit().await;
    assert_eq!(length, 3, "each reply stored once");
    publisher.close().await.unwrap();
    router.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_stored_but_refused_its_publish_is_accepted_once_and_costs_no_number() {
    a_reply_stored_but_refused_its_publish_is_accepted_once(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_reply_stored_but_refused_its_publish_is_accepted_once() {
    a_reply_stored_but_refused_its_publish_is_accepted_once(true).await;
}

/// docs/wire-format.md shows a program in another language joining the bus: its JSON frame, published
/// with a plain `PUBLISH` where its Python example publishes, reaches an agentcomm subscription of a
/// router with the default settings. Before, the example published to the bare channel name
/// (`PaymentRequest:request:session456`), which no agentcomm subscriber listens on (their Redis
/// channels carry the router's prefix, `agentcomm:` by default): PUBLISH reached 0 receivers and the
/// message was silently lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wire_format_example_frame_published_where_the_doc_says_reaches_a_subscriber() {
    use fred::prelude::{ClientLike, PubsubInterface};
    if !redis_available().await {
        return;
    }
    const DOC: &str = include_str!("../../../../docs/wire-format.md");
    const SESSION: &str = "session456";
    let key = DOC
        .split_once("redis.publish(\"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(key, _)| key)
        .expect("the doc publishes with redis.publish(\"<key>\", frame)");
    let frame = DOC
        .split_once("```json\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(frame, _)| frame)
        .expect("the doc shows a JSON frame");
    assert!(key.ends_with(SESSION) && frame.contains(SESSION), "{key}");
    // A session of this test's own: the shared Redis may carry the payment example's session456.
    let session = format!("wire-doc-{}", uuid::Uuid::now_v7().simple());
    let (key, frame) = (
        key.replace(SESSION, &session),
        frame.replace(SESSION, &session),
    );

    // The router's defaults, as a user's program has them: the doc names no prefix.
    let router = connected(RedisRouter::builder(redis_url()).mode(DeliveryMode::PubSub)).await;
    let pattern = format!("PaymentRequest:request:{session}");
    let mut subscription = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse(&pattern).unwrap(),
        ))
        .await
        .unwrap();
    let raw = raw_client().await;
    let receivers: i64 = raw.publish(&key, frame).await.unwrap();
    assert!(
        receivers >= 1,
        "PUBLISH to '{key}' (the doc's key) reached no subscriber of channel {pattern}"
    );
    let delivery = next(&mut subscription).await;
    let envelope = delivery.envelope();
    assert_eq!(
        (envelope.class(), envelope.channel().name()),
        ("PaymentRequest", pattern.as_str())
    );
    assert_eq!(
        std::str::from_utf8(envelope.payload()).unwrap(),
        r#"{"amount":100.0,"user_id":"user123","payment_method":"credit_card"}"#
    );
    delivery.ack().await.unwrap();
    let _ = raw.quit().await;
    router.close().await.unwrap();
}

/// `Duration::MAX` ("as long as it takes") for the connect and close timeouts and the reorder window
/// is taken (as a year). Before, each was added to the clock and overflowed it: `connect` panicked
/// (twice the connect timeout), `close` panicked, and a subscription's stream panicked as soon as it
/// waited for a message (its next sweep of the sequences).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_durations_are_taken_without_a_panic() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connected(
        builder(DeliveryMode::PubSub, &prefix)
            .connect_timeout(Duration::MAX)
            .close_timeout(Duration::MAX)
            .reorder_window(Duration::MAX),
    )
    .await;
    let mut subscription = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Long:*:*").unwrap(),
        ))
        .await
        .unwrap();
    // Published once the subscription waits for it.
    let publisher = router.clone();
    let publishing = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        publisher
            .publish(envelope("Long:event:s1", 1))
            .await
            .unwrap();
    });
    let delivery = next(&mut subscription).await;
    assert_eq!(number(&delivery), 1);
    delivery.ack().await.unwrap();
    publishing.await.unwrap();
    within(WAIT, "closing", router.close()).await.unwrap();
}

/// A large `publish_batch` while other publishes of the same channel go on: every message reaches
/// the subscriber, none counted as lost or as a repeat. Before, the whole batch was numbered and
/// encoded before any of it was sent, so a publish that took a later number meanwhile arrived first,
/// the batch's numbers stayed missing longer than the reorder window, and the subscriber counted them
/// as lost, then discarded them as repeats when Redis delivered them (thousands of messages here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_beside_other_publishes_of_its_channel_loses_nothing() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let router = connected(
        // The default window: a chunk of the batch takes far less, even on a loaded machine.
        builder(DeliveryMode::PubSub, &prefix).reorder_window(Duration::from_millis(500)),
    )
    .await;
    let mut subscription = router
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Bulk:event:s1").unwrap(),
        ))
        .await
        .unwrap();
    const BATCH: u32 = 50_000;
    const ALONE: u32 = 100;
    let reading = tokio::spawn(async move {
        let mut received = 0;
        while received < BATCH + ALONE {
            match tokio::time::timeout(Duration::from_secs(30), subscription.next()).await {
                Ok(Some(delivery)) => {
                    delivery.ack().await.unwrap();
                    received += 1;
                }
                _ => break,
            }
        }
        received
    });
    let publisher = router.clone();
    let alone = tokio::spawn(async move {
        for n in 0..ALONE {
            publisher
                .publish(envelope("Bulk:event:s1", BATCH + n))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let batch = (0..BATCH)
        .map(|n| envelope("Bulk:event:s1", n).with_header("pad", "x".repeat(300)))
        .collect();
    let results = router.publish_batch(batch).await;
    assert!(results.iter().all(Result::is_ok));
    alone.await.unwrap();
    let received = reading.await.unwrap();
    let health = router.health().await;
    assert_eq!(received, BATCH + ALONE, "{health:?}");
    assert_eq!(health.get("lost"), 0, "{health:?}");
    assert_eq!(health.get("duplicates"), 0, "{health:?}");
    // A message of the batch held back past the window is delivered late (52b77d7), and counted.
    assert_eq!(health.get("late"), 0, "{health:?}");
    router.close().await.unwrap();
}

/// Publishes racing `close` fail with `Closed`, never with `Timeout` or a connection error. Before, a
/// publish that found the router open just as `close` began handed its `PUBLISH` to the pool `close`
/// then quit without waiting for it: it failed after the command timeout with `Timeout`, or at once
/// with "cannot reach redis", although Redis was fine and the application had closed the router
/// (about one round in a hundred here, so the race is run many times).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_racing_close_fail_with_closed() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let mut wrong = Vec::new();
    for round in 0..400u64 {
        let router = connected(
            builder(DeliveryMode::PubSub, &prefix).command_timeout(Duration::from_millis(300)),
        )
        .await;
        let publishers: Vec<_> = (0..4)
            .map(|publisher| {
                let router = router.clone();
                tokio::spawn(async move {
                    let channel = parse_channel(&format!("Race:event:s{publisher}")).unwrap();
                    for n in 0..200 {
                        let message = Envelope::new(
                            channel.clone(),
                            "application/octet-stream",
                            vec![b'x'; 2_000 + n],
                        );
                        if let Err(error) = router.publish(message).await {
                            return Some(error);
                        }
                    }
                    None
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_micros(200 * (round % 10))).await;
        router.close().await.unwrap();
        for publisher in publishers {
            match publisher.await.unwrap() {
                None | Some(agentcomm_core::Error::Closed { .. }) => {}
                Some(error) => wrong.push(error.to_string()),
            }
        }
    }
    assert!(wrong.is_empty(), "{} publishes: {wrong:?}", wrong.len());
}

/// A large batch still under way when `close` stops waiting for it (`close_timeout`) sends no more of
/// itself: the rest fails at once with `Closed`, and what it says went out is what the subscriber
/// gets. Before, its next chunk went to the pool `close` had quit, where fred keeps a command until
/// the command timeout: the batch took 30 s, that chunk failed with `Timeout` ("may have been
/// published"), and the rest with "cannot reach redis .. publish it again once Redis is reachable",
/// although Redis was fine and the application had closed the router.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_still_under_way_when_close_stops_waiting_fails_the_rest_with_closed() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let publisher =
        connected(builder(DeliveryMode::PubSub, &prefix).close_timeout(Duration::from_millis(500)))
            .await;
    let receiver = connected(builder(DeliveryMode::PubSub, &prefix)).await;
    let mut subscription = receiver
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Closing:event:s1").unwrap(),
        ))
        .await
        .unwrap();
    // Far more than is sent in the half second `close` waits.
    const BATCH: u32 = 200_000;
    let batch: Vec<Envelope> = (0..BATCH)
        .map(|n| envelope("Closing:event:s1", n))
        .collect();
    let publishing = {
        let publisher = publisher.clone();
        tokio::spawn(async move { publisher.publish_batch(batch).await })
    };
    let mut received = 0usize;
    while received < 1_000 {
        next(&mut subscription).await.ack().await.unwrap();
        received += 1;
    }
    within(Duration::from_secs(10), "closing", publisher.close())
        .await
        .unwrap();
    let results = within(Duration::from_secs(10), "the rest of the batch", publishing)
        .await
        .unwrap();
    let sent = results.iter().filter(|result| result.is_ok()).count();
    let closed = results
        .iter()
        .filter(|result| matches!(result, Err(agentcomm_core::Error::Closed { .. })))
        .count();
    let other: Vec<String> = results
        .iter()
        .filter_map(|result| result.as_ref().err())
        .filter(|error| !matches!(error, agentcomm_core::Error::Closed { .. }))
        .take(3)
        .map(ToString::to_string)
        .collect();
    assert!(other.is_empty(), "{other:?}");
    assert!(closed > 0, "the whole batch was sent after close");
    assert_eq!(sent + closed, BATCH as usize);
    // What the results say went out arrives, and nothing else.
    while received < sent {
        next(&mut subscription).await.ack().await.unwrap();
        received += 1;
    }
    assert_quiet(&mut subscription, Duration::from_millis(300)).await;
    receiver.close().await.unwrap();
}

/// Concurrent publishes of one router to one channel reach Redis in the order of their sequence
/// numbers. Before, a publish took its number while it encoded, and handed its command to fred only
/// after: another publish could take the next number and overtake it. On a loaded machine the
/// overtaken one (its thread preempted in between) came later than the reorder window, and every
/// subscriber counted it as lost and then discarded it as a duplicate when it came: the rare loss of one
/// message in the conformance suite's concurrent-publisher scenarios. A zero window shows any overtaking:
/// since 52b77d7 as `late` (the message is delivered late, and taken off `lost`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishes_of_one_channel_reach_redis_in_the_order_of_their_numbers() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let subscriber =
        connected(builder(DeliveryMode::PubSub, &prefix).reorder_window(Duration::ZERO)).await;
    let publisher = connect(&prefix).await;
    let mut subscription = subscriber
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Race:event:s1").unwrap(),
        ))
        .await
        .unwrap();
    const TASKS: u32 = 8;
    const EACH: u32 = 500;
    let total = (TASKS * EACH) as usize;
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let publisher = publisher.clone();
            tokio::spawn(async move {
                for index in 0..EACH {
                    publisher
                        .publish(envelope("Race:event:s1", task * EACH + index))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let seen = arrivals(&mut subscription, total, number).await;
    let health = subscriber.health().await;
    assert_eq!(
        seen.len(),
        total,
        "delivered {} of {total}: {health:?}",
        seen.len()
    );
    assert_eq!(health.get("lost"), 0, "{health:?}");
    assert_eq!(health.get("duplicates"), 0, "{health:?}");
    // An overtaken message is delivered late (52b77d7), and taken off `lost`.
    assert_eq!(health.get("late"), 0, "overtaken: {health:?}");
    subscriber.close().await.unwrap();
    publisher.close().await.unwrap();
}

/// Concurrent batches of one router to one channel, beside single publishes of it, reach Redis in the
/// order of their sequence numbers. Before, a batch took its numbers while it encoded a chunk, outside
/// the connection's order lock, and handed the chunk's pipeline to fred only after: a single publish,
/// or another batch, could take later numbers and reach Redis first. Every subscriber then waited for
/// the overtaken numbers only as long as the reorder window, counted them as lost, and discarded them
/// as duplicates when they came. A zero window shows any overtaking as such a loss; since 52b77d7 an
/// overtaken message is delivered after all and taken off `lost`, counted as `late`: `late` is what
/// shows it now.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_batches_and_publishes_of_one_channel_reach_redis_in_the_order_of_their_numbers()
{
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let subscriber =
        connected(builder(DeliveryMode::PubSub, &prefix).reorder_window(Duration::ZERO)).await;
    let publisher = connect(&prefix).await;
    let mut subscription = subscriber
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Race:event:s2").unwrap(),
        ))
        .await
        .unwrap();
    // Each batch task sends BATCHES batches of BATCH messages; each single task EACH publishes.
    const BATCH_TASKS: u32 = 4;
    const BATCHES: u32 = 20;
    const BATCH: u32 = 40;
    const SINGLE_TASKS: u32 = 4;
    const EACH: u32 = 300;
    let batched = BATCH_TASKS * BATCHES * BATCH;
    let total = (batched + SINGLE_TASKS * EACH) as usize;
    let mut tasks = Vec::new();
    for task in 0..BATCH_TASKS {
        let publisher = publisher.clone();
        tasks.push(tokio::spawn(async move {
            for batch in 0..BATCHES {
                let first = (task * BATCHES + batch) * BATCH;
                let envelopes = (first..first + BATCH)
                    .map(|n| envelope("Race:event:s2", n))
                    .collect();
                for result in publisher.publish_batch(envelopes).await {
                    result.unwrap();
                }
            }
        }));
    }
    for task in 0..SINGLE_TASKS {
        let publisher = publisher.clone();
        tasks.push(tokio::spawn(async move {
            for index in 0..EACH {
                publisher
                    .publish(envelope("Race:event:s2", batched + task * EACH + index))
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let seen = arrivals(&mut subscription, total, number).await;
    // Nothing more comes: a message delivered twice would show here.
    assert_quiet(&mut subscription, Duration::from_millis(200)).await;
    let health = subscriber.health().await;
    assert_eq!(
        seen.len(),
        total,
        "delivered {} of {total}: {health:?}",
        seen.len()
    );
    let twice: Vec<_> = seen.iter().filter(|(_, count)| **count > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(health.get("lost"), 0, "{health:?}");
    assert_eq!(health.get("duplicates"), 0, "{health:?}");
    assert_eq!(health.get("late"), 0, "overtaken: {health:?}");
    subscriber.close().await.unwrap();
    publisher.close().await.unwrap();
}

/// Concurrent batches that each span channels of several pool connections, beside single publishes of
/// those channels, reach Redis in the order of their numbers on every channel, and none waits on
/// another: each connection's part of a chunk is numbered and handed to fred under that connection's
/// own order lock (one at a time, none held across an await), whichever order the batches name the
/// channels in.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_batches_across_pool_connections_reach_redis_in_the_order_of_their_numbers() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let subscriber =
        connected(builder(DeliveryMode::PubSub, &prefix).reorder_window(Duration::ZERO)).await;
    let publisher = connected(builder(DeliveryMode::PubSub, &prefix).pool_size(4)).await;
    let mut subscription = subscriber
        .subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Spread:event:*").unwrap(),
        ))
        .await
        .unwrap();
    // Eight channels: spread over the four connections.
    const CHANNELS: u32 = 8;
    const BATCH_TASKS: u32 = 4;
    const BATCHES: u32 = 20;
    const BATCH: u32 = 48;
    const SINGLE_TASKS: u32 = 4;
    const EACH: u32 = 200;
    let channel = |n: u32| format!("Spread:event:s{}", n % CHANNELS);
    let batched = BATCH_TASKS * BATCHES * BATCH;
    let total = (batched + SINGLE_TASKS * EACH) as usize;
    let mut tasks = Vec::new();
    for task in 0..BATCH_TASKS {
        let publisher = publisher.clone();
        tasks.push(tokio::spawn(async move {
            for batch in 0..BATCHES {
                let first = (task * BATCHES + batch) * BATCH;
                // Odd tasks name the channels the other way round.
                let envelopes = (first..first + BATCH)
                    .map(|n| {
                        let on = if task % 2 == 0 {
                            n
                        } else {
                            CHANNELS - 1 - n % CHANNELS
                        };
                        envelope(&channel(on), n)
                    })
                    .collect();
                for result in publisher.publish_batch(envelopes).await {
                    result.unwrap();
                }
            }
        }));
    }
    for task in 0..SINGLE_TASKS {
        let publisher = publisher.clone();
        tasks.push(tokio::spawn(async move {
            for index in 0..EACH {
                let n = batched + task * EACH + index;
                publisher.publish(envelope(&channel(n), n)).await.unwrap();
            }
        }));
    }
    for task in tasks {
        within(WAIT, "the publishing tasks", task).await.unwrap();
    }
    let seen = arrivals(&mut subscription, total, number).await;
    assert_quiet(&mut subscription, Duration::from_millis(200)).await;
    let health = subscriber.health().await;
    assert_eq!(
        seen.len(),
        total,
        "delivered {} of {total}: {health:?}",
        seen.len()
    );
    let twice: Vec<_> = seen.iter().filter(|(_, count)| **count > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(health.get("lost"), 0, "{health:?}");
    assert_eq!(health.get("duplicates"), 0, "{health:?}");
    assert_eq!(health.get("late"), 0, "overtaken: {health:?}");
    subscriber.close().await.unwrap();
    publisher.close().await.unwrap();
}

/// A request of the agents in [`a_dead_lettered_request_fails_its_requester_at_once_on_pubsub`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, Message)]
#[message(direction = "request")]
struct PriceAsked {
    n: u32,
}

/// Its reply, on channels named with a template of its own.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, Message)]
#[message(direction = "response", channel = "prices.{direction}.{session_id}")]
struct PriceGiven {
    n: u32,
}

#[agent(sends = [PriceAsked])]
struct PriceAsker;

/// Refuses every request for good: each is dead-lettered at its first attempt.
#[agent(receives = [PriceAsked], sends = [PriceGiven])]
struct PricesDown;

impl Handle<PriceAsked> for PricesDown {
    async fn handle(&self, _: PriceAsked, _: &Context<Self>) -> HandlerResult {
        Err(HandlerError::permanent(std::io::Error::other(
            "the prices are down",
        )))
    }
}

/// Redis pub/sub delivers by name: the reply telling a requester that its request was dead-lettered
/// reaches the requester's inbox only under the name the reply type's template gives
/// (`prices.reply.inbox-..`), which the inbox subscribes to. Published under the canonical name of
/// the request's `reply_to` (`PriceGiven:reply:inbox-..`), it reached no one, and the requester
/// waited out its whole timeout instead of failing at once with `RequestFailed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_request_fails_its_requester_at_once_on_pubsub() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let runtime = Runtime::builder(connect(&prefix).await).build();
    runtime
        .spawn_with(PricesDown, AgentOptions::new().fan_out())
        .await
        .unwrap();
    let asker = runtime.publisher::<PriceAsker>();
    let asking = asker.request_timeout::<PriceAsked, PriceGiven>(
        "s1",
        PriceAsked { n: 1 },
        Duration::from_secs(600),
    );
    // Bounded far below the request's own timeout: the failure reply, not a timeout, ends it.
    let error = tokio::time::timeout(WAIT, asking)
        .await
        .expect("the requester was told before its timeout")
        .unwrap_err();
    match &error {
        Error::RequestFailed(failure) => assert_eq!(
            (failure.agent.as_str(), failure.reason.as_str()),
            ("PricesDown", "rejected")
        ),
        other => panic!("expected RequestFailed, got {other:?}"),
    }
    runtime.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A pub/sub router (reorder window 100 ms) and its subscription to `class`'s channels.
async fn losing_subscription(
    prefix: &str,
    class: &str,
) -> (RedisRouter, agentcomm_core::router::Subscription) {
    let router =
        connected(builder(DeliveryMode::PubSub, prefix).reorder_window(Duration::from_millis(100)))
            .await;
    let pattern = ChannelPattern::parse(&format!("{class}:*:*")).unwrap();
    let subscription = router
        .subscribe(SubscribeOptions::new(pattern))
        .await
        .unwrap();
    (router, subscription)
}

/// Waits (10 s at most) until `router` counted `lost` messages as lost, reading `subscription` so
/// that its sweeps run.
async fn lost_counted(
    router: &RedisRouter,
    subscription: &mut agentcomm_core::router::Subscription,
    lost: u64,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while router.health().await.get("lost") < lost {
        assert!(
            std::time::Instant::now() < deadline,
            "{lost} lost not counted"
        );
        tokio::time::timeout(Duration::from_millis(50), subscription.next())
            .await
            .ok();
    }
}

/// The warning that counts lost pub/sub messages names the channels they were missing from, so that
/// an operator can tell which flow lost them. Before, it gave the count alone.
#[test]
fn the_loss_warning_names_the_channel_of_the_gap() {
    let (ran, lines) = agentcomm_testkit::logs::capture(async {
        if !redis_available().await {
            return false;
        }
        let prefix = unique_prefix();
        let _cleanup = RemoveKeysOnDrop(prefix.clone());
        let (router, mut subscription) = losing_subscription(&prefix, "Gap").await;
        let raw = raw_client().await;
        // 2 never comes on this channel; the other channel has no gap.
        for number in [1, 3] {
            publish_numbered(&raw, &prefix, "Gap:event:s1", number).await;
        }
        publish_numbered(&raw, &prefix, "Gap:event:s2", 1).await;
        for _ in 0..3 {
            received(&mut subscription).await;
        }
        // The sweep after the window settles the gap.
        lost_counted(&router, &mut subscription, 1).await;
        let _ = fred::prelude::ClientLike::quit(&raw).await;
        router.close().await.unwrap();
        true
    });
    if !ran {
        return;
    }
    let warning = lines
        .lines()
        .find(|line| line.contains("pub/sub messages were lost"))
        .unwrap_or_else(|| panic!("no loss warning in:\n{lines}"));
    assert!(
        warning.contains(r#""lost":1,"#) || warning.contains(r#""lost":1}"#),
        "{warning}"
    );
    assert!(
        warning.contains(r#""channels":"Gap:event:s1""#),
        "{warning}"
    );
}

/// The JSON lines among `lines` that contain `text`.
fn lines_with<'a>(lines: &'a str, text: &str) -> Vec<&'a str> {
    lines.lines().filter(|line| line.contains(text)).collect()
}

/// Whether the JSON log line `line` has the field `name` with the number `value`.
fn shows(line: &str, name: &str, value: u64) -> bool {
    let field = format!(r#""{name}":{value}"#);
    line.contains(&format!("{field},")) || line.contains(&format!("{field}}}"))
}

/// A subscription that keeps losing messages logs its first loss at once, and the later ones (within
/// 5 s) on one line, whose `lost` counts all of them, when the subscription ends; health counts each
/// as it comes. Before, every loss had its line: a subscriber that lost messages after every cut, or
/// all the time, flooded the log.
#[test]
fn repeated_losses_are_logged_once_then_summed() {
    let (ran, lines) = agentcomm_testkit::logs::capture(async {
        if !redis_available().await {
            return false;
        }
        let prefix = unique_prefix();
        let _cleanup = RemoveKeysOnDrop(prefix.clone());
        let (router, mut subscription) = losing_subscription(&prefix, "Leak").await;
        let raw = raw_client().await;
        publish_numbered(&raw, &prefix, "Leak:event:s1", 1).await;
        assert_eq!(received(&mut subscription).await, 1);
        // Four losses one after the other: every other number never comes.
        for (lost, number) in [3, 5, 7, 9].into_iter().enumerate() {
            publish_numbered(&raw, &prefix, "Leak:event:s1", number).await;
            assert_eq!(received(&mut subscription).await, number);
            lost_counted(&router, &mut subscription, lost as u64 + 1).await;
        }
        assert_eq!(router.health().await.get("lost"), 4);
        drop(subscription);
        let _ = fred::prelude::ClientLike::quit(&raw).await;
        router.close().await.unwrap();
        true
    });
    if !ran {
        return;
    }
    let warnings = lines_with(&lines, "pub/sub messages were lost");
    assert_eq!(warnings.len(), 2, "one line, then one summing up:\n{lines}");
    assert!(shows(warnings[0], "lost", 1), "{}", warnings[0]);
    assert!(shows(warnings[0], "suppressed", 0), "{}", warnings[0]);
    assert!(shows(warnings[1], "lost", 3), "{}", warnings[1]);
    assert!(shows(warnings[1], "suppressed", 3), "{}", warnings[1]);
    assert!(
        warnings[1].contains(r#""channels":"Leak:event:s1""#),
        "{}",
        warnings[1]
    );
}

/// A consumer that keeps falling behind logs its first lag at once, and the later ones (within 5 s)
/// on one line whose `missed` sums them, when the subscription ends; health's `lagged` counts every
/// skipped message. Before, every lag had its line.
#[test]
fn repeated_lags_are_logged_once_then_summed() {
    let (ran, lines) = agentcomm_testkit::logs::capture(async {
        if !redis_available().await {
            return false;
        }
        let prefix = unique_prefix();
        let _cleanup = RemoveKeysOnDrop(prefix.clone());
        let router = connected(builder(DeliveryMode::PubSub, &prefix).broadcast_capacity(32)).await;
        let pattern = || SubscribeOptions::new(ChannelPattern::parse("Slow:*:*").unwrap());
        let mut slow = router.subscribe(pattern()).await.unwrap();
        let mut fast = router.subscribe(pattern()).await.unwrap();
        let (got, mut fast_got) = tokio::sync::mpsc::unbounded_channel();
        let fast_reader = tokio::spawn(async move {
            for _ in 0..120 {
                got.send(received(&mut fast).await).unwrap();
            }
        });
        let raw = raw_client().await;
        for round in 0..3u32 {
            // 40 unnumbered messages into a ring of 32: the fast subscription reads them as they
            // come, so they are all in the ring before the slow one reads.
            for n in 0..40 {
                let frame = envelope("Slow:event:s1", round * 100 + n)
                    .to_frame()
                    .unwrap();
                let _: i64 = fred::prelude::PubsubInterface::publish(
                    &raw,
                    format!("{prefix}:Slow:event:s1"),
                    bytes::Bytes::from(frame),
                )
                .await
                .unwrap();
            }
            for n in 0..40 {
                let number = within(WAIT, "the fast reader", fast_got.recv()).await;
                assert_eq!(number, Some(round * 100 + n));
            }
            // The slow one skips the 8 oldest, and reads the 32 left.
            for n in 8..40 {
                assert_eq!(received(&mut slow).await, round * 100 + n);
            }
        }
        assert_eq!(router.health().await.get("lagged"), 24);
        drop(slow);
        fast_reader.await.unwrap();
        let _ = fred::prelude::ClientLike::quit(&raw).await;
        router.close().await.unwrap();
        true
    });
    if !ran {
        return;
    }
    let warnings = lines_with(&lines, "fell behind the subscriber's message channel");
    assert_eq!(warnings.len(), 2, "one line, then one summing up:\n{lines}");
    assert!(shows(warnings[0], "missed", 8), "{}", warnings[0]);
    assert!(shows(warnings[1], "missed", 16), "{}", warnings[1]);
    assert!(shows(warnings[1], "suppressed", 2), "{}", warnings[1]);
}

/// A subscription that outlives its router (dropped without `close`, as when a program or a runtime
/// ends and drops what it holds in any order) still writes, when it is dropped, the loss line it
/// held and the gaps it had open: they are in no other line. Before, both were dropped silently
/// once the router was gone.
#[test]
fn a_held_loss_line_is_written_when_the_router_went_first() {
    let (ran, lines) = agentcomm_testkit::logs::capture(async {
        if !redis_available().await {
            return false;
        }
        let prefix = unique_prefix();
        let _cleanup = RemoveKeysOnDrop(prefix.clone());
        let (router, mut subscription) = losing_subscription(&prefix, "Orphan").await;
        let raw = raw_client().await;
        publish_numbered(&raw, &prefix, "Orphan:event:s1", 1).await;
        assert_eq!(received(&mut subscription).await, 1);
        // 2 is logged at once, 4 is held.
        for (lost, number) in [3, 5].into_iter().enumerate() {
            publish_numbered(&raw, &prefix, "Orphan:event:s1", number).await;
            assert_eq!(received(&mut subscription).await, number);
            lost_counted(&router, &mut subscription, lost as u64 + 1).await;
        }
        // 6 to 8 are still open (no sweep runs until the stream is read again).
        publish_numbered(&raw, &prefix, "Orphan:event:s1", 9).await;
        assert_eq!(received(&mut subscription).await, 9);
        router.close().await.unwrap();
        drop(router);
        drop(subscription);
        let _ = fred::prelude::ClientLike::quit(&raw).await;
        true
    });
    if !ran {
        return;
    }
    let warnings = lines_with(&lines, "pub/sub messages were lost");
    assert_eq!(warnings.len(), 2, "the first loss, then the rest:\n{lines}");
    assert!(shows(warnings[0], "lost", 1), "{}", warnings[0]);
    assert!(
        shows(warnings[1], "lost", 4),
        "4, and 6 to 8: {}",
        warnings[1]
    );
}
