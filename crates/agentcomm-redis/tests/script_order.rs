//! Idempotent publishing when Redis has lost the publish script (a restart, `SCRIPT FLUSH`, a cluster
//! node that never had it): a batch keeps its order even when another client loads the script again
//! while the batch is in flight. A file of its own: it flushes the script cache of the shared Redis,
//! which no other test of this binary may see meanwhile.

mod common;

use std::time::Duration;

use agentcomm_core::envelope::Envelope;
use agentcomm_core::prelude::*;
use agentcomm_redis::DeliveryMode;
use common::*;
use fred::prelude::{ClientLike, LuaInterface, StreamsInterface};
use fred::types::Value;

const WAIT: Duration = Duration::from_secs(20);
const ROUNDS: u32 = 16;
const BATCH: u32 = 500;

fn envelope(channel: &str, n: u32) -> Envelope {
    Envelope::new(
        parse_channel(channel).unwrap(),
        "application/json",
        format!("{{\"n\":{n}}}").into_bytes(),
    )
}

fn number_of(frame: &[u8]) -> u32 {
    let envelope = Envelope::from_frame(frame).expect("an agentcomm frame");
    let text = std::str::from_utf8(envelope.payload()).unwrap();
    text.trim_start_matches("{\"n\":")
        .trim_end_matches('}')
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_batch_keeps_its_order_when_the_script_comes_back_mid_batch() {
    if !redis_available().await {
        return;
    }
    let prefix = unique_prefix();
    let router = connected(builder(DeliveryMode::Streams, &prefix).idempotent_publish(true)).await;
    // Another publisher: after the flush, its next publish meets NOSCRIPT and loads the script again
    // (EVAL), at a moment that moves through the batch's flight from round to round.
    let loader = connected(builder(DeliveryMode::Streams, &prefix).idempotent_publish(true)).await;
    let raw = raw_client().await;
    // Both publishers know their streams before the rounds start.
    within(
        WAIT,
        "a first publish",
        router.publish(envelope("Order:event:s1", 0)),
    )
    .await
    .unwrap();
    within(
        WAIT,
        "a first publish",
        loader.publish(envelope("Other:event:s1", 0)),
    )
    .await
    .unwrap();

    let mut expected = vec![0u32];
    for round in 0..ROUNDS {
        raw.script_flush(false).await.unwrap();
        let batch: Vec<Envelope> = (0..BATCH)
            .map(|n| envelope("Order:event:s1", 1 + round * BATCH + n))
            .collect();
        expected.extend(1 + round * BATCH..1 + (round + 1) * BATCH);
        let delay = Duration::from_micros(u64::from(round) * 250);
        let loading = async {
            tokio::time::sleep(delay).await;
            loader.publish(envelope("Other:event:s1", round)).await
        };
        let (results, loaded) = within(
            WAIT,
            "a batch and a publish that loads the script",
            futures::future::join(router.publish_batch(batch), loading),
        )
        .await;
        loaded.unwrap();
        for result in results {
            result.unwrap();
        }
    }

    let entries: Vec<(String, Vec<(String, Value)>)> = raw
        .xrange(format!("{prefix}:stream:{{Order}}"), "-", "+", None)
        .await
        .unwrap();
    let stored: Vec<u32> = entries
        .iter()
        .map(|(_, fields)| {
            let frame = fields[0].1.as_bytes().expect("the frame");
            number_of(frame)
        })
        .collect();
    let out_of_order = stored.windows(2).filter(|pair| pair[0] > pair[1]).count();
    assert_eq!(
        out_of_order, 0,
        "{out_of_order} entries stored after a later one"
    );
    assert_eq!(stored, expected);
    let _ = raw.quit().await;
    router.close().await.unwrap();
    loader.close().await.unwrap();
    remove_keys(&prefix).await;
}
