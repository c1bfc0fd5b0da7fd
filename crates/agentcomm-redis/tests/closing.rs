//! The order of a clean close in Streams mode: subscriptions closed just before their router (an
//! agent stopped, then the runtime shut down) finish before the router quits its connections. A file
//! of its own: it reads fred's log lines, through a `log` bridge set up for the whole process.

mod common;

use std::sync::Once;
use std::time::Duration;

use agentcomm_core::envelope::Envelope;
use agentcomm_core::prelude::*;
use agentcomm_core::router::SubscribeOptions;
use agentcomm_redis::DeliveryMode;
use agentcomm_testkit::logs;
use common::*;
use fred::prelude::{ClientLike, HashesInterface};

/// Rounds of subscribe, publish, close; without the fix, about one round in three showed the race.
const ROUNDS: usize = 8;
const MEMBERS: usize = 8;
const CLASSES: usize = 6;

/// A subscription's close finishes it on a task of its own (settles, gives back, leaves its group),
/// and the router's close finished it again, side by side, then quit the pool once its own finishing
/// ended: the other one's commands that leave the group (`EVAL` of the leave script, `HDEL` of the
/// member) were still queued, and fred dropped them with the warning "Skip command with canceled
/// error after calling quit", which worried users of a clean shutdown. The router's close now waits
/// for the finishing under way; every member has left its group when it returns.
#[test]
fn subscriptions_closed_before_their_router_finish_before_it_quits() {
    static LOG_BRIDGE: Once = Once::new();
    LOG_BRIDGE.call_once(|| {
        let _ = tracing_log::LogTracer::init();
    });
    let prefix = unique_prefix();
    let _cleanup = RemoveKeysOnDrop(prefix.clone());
    let (ran, lines) = logs::capture(async {
        if !redis_available().await {
            return false;
        }
        let raw = raw_client().await;
        for round in 0..ROUNDS {
            let router = connected(builder(DeliveryMode::Streams, &prefix)).await;
            let mut subscriptions = Vec::new();
            for member in 0..MEMBERS {
                let pattern = ChannelPattern::parse(&format!("*:event:m{member}")).unwrap();
                let options = SubscribeOptions::new(pattern).group("players");
                subscriptions.push(router.subscribe(options).await.unwrap());
            }
            // Streams every member knows: leaving the group runs the leave script on each, one
            // after the other, which leaves time for the race.
            for class in 0..CLASSES {
                let channel = parse_channel(&format!("Close{class}:event:m0")).unwrap();
                let envelope = Envelope::new(channel, "application/json", b"{}".to_vec());
                router.publish(envelope).await.unwrap();
            }
            // As an agent's stop does: closed, then dropped with what its buffer holds (given back).
            for subscription in subscriptions {
                subscription.close().await.unwrap();
            }
            within(
                Duration::from_secs(10),
                "the router to close",
                router.close(),
            )
            .await
            .unwrap();
            let members: u64 = raw
                .hlen(format!("{prefix}:group:players:members"))
                .await
                .unwrap();
            assert_eq!(members, 0, "round {round}: members still in the group");
        }
        let _ = raw.quit().await;
        true
    });
    if !ran {
        return;
    }
    assert!(lines.contains("\"target\":\"fred::"), "{lines}");
    let skipped: Vec<&str> = lines
        .lines()
        .filter(|line| line.contains("Skip command"))
        .collect();
    assert!(skipped.is_empty(), "{}", skipped.join("\n"));
}
