//! The examples run end to end on Redis (both delivery modes) and RabbitMQ, as
//! `MESSAGING_BACKEND=redis|rabbitmq cargo run --bin payment` runs them. Without a broker each test prints
//! one `skipped:` line and passes, unless `AGENTCOMM_REQUIRE_BROKERS=1`.

use std::sync::Arc;
use std::time::Duration;

use agentcomm_amqp::AmqpRouter;
use agentcomm_core::config::{
    DEFAULT_RABBITMQ_URL, DEFAULT_REDIS_URL, RABBITMQ_URL_VAR, REDIS_URL_VAR,
};
use agentcomm_core::router::SharedRouter;
use agentcomm_examples::{game, payment};
use agentcomm_redis::{DeliveryMode, RedisRouter};

fn url(variable: &str, default: &str) -> String {
    std::env::var(variable).unwrap_or_else(|_| default.to_string())
}

async fn redis(mode: DeliveryMode) -> Option<SharedRouter> {
    let url = url(REDIS_URL_VAR, DEFAULT_REDIS_URL);
    let connecting = RedisRouter::builder(url.as_str()).mode(mode).connect();
    match tokio::time::timeout(Duration::from_secs(10), connecting).await {
        Ok(Ok(router)) => Some(Arc::new(router)),
        Ok(Err(error)) => {
            agentcomm_testkit::broker_unavailable(format!("no Redis at {url} ({error})"));
            None
        }
        Err(_) => {
            agentcomm_testkit::broker_unavailable(format!("no Redis at {url} (no answer in 10 s)"));
            None
        }
    }
}

async fn rabbitmq() -> Option<SharedRouter> {
    let url = url(RABBITMQ_URL_VAR, DEFAULT_RABBITMQ_URL);
    let shown = agentcomm_core::error::redact_url(&url);
    match tokio::time::timeout(Duration::from_secs(10), AmqpRouter::connect(url.as_str())).await {
        Ok(Ok(router)) => Some(Arc::new(router)),
        Ok(Err(error)) => {
            agentcomm_testkit::broker_unavailable(format!("no RabbitMQ at {shown} ({error})"));
            None
        }
        Err(_) => {
            agentcomm_testkit::broker_unavailable(format!(
                "no RabbitMQ at {shown} (no answer in 10 s)"
            ));
            None
        }
    }
}

/// The broker keeps state between runs (a durable group may still hold a request of a run that crashed),
/// so this checks the answers, not the transaction numbers.
async fn check_payment(router: SharedRouter) {
    let backend = router.backend().to_string();
    let mut out = Vec::new();
    let summary = tokio::time::timeout(Duration::from_secs(60), payment::run(router, &mut out))
        .await
        .unwrap_or_else(|_| panic!("the payment example did not finish in 60 s on {backend}"))
        .unwrap_or_else(|error| panic!("the payment example failed on {backend}: {error}"));
    let text = String::from_utf8(out).unwrap();
    let verdicts: Vec<bool> = summary
        .answers
        .iter()
        .map(|(_, _, answer)| answer.success)
        .collect();
    assert_eq!(verdicts, vec![true, true, false, false, true], "{text}");
    assert!(
        summary.answers[0].2.transaction_id.starts_with("TXN"),
        "{text}"
    );
    assert_eq!(summary.refused.len(), 1, "{text}");
    assert!(summary.handled >= 5 && summary.dead_lettered == 0, "{text}");
    assert!(text.contains(&format!("on the {backend} router")), "{text}");
}

async fn check_game(router: SharedRouter) {
    let backend = router.backend().to_string();
    let mut out = Vec::new();
    let scoreboard = tokio::time::timeout(Duration::from_secs(60), game::run(router, 4, &mut out))
        .await
        .unwrap_or_else(|_| panic!("the game example did not finish in 60 s on {backend}"))
        .unwrap_or_else(|error| panic!("the game example failed on {backend}: {error}"));
    let text = String::from_utf8(out).unwrap();
    assert!(scoreboard.started.lock().unwrap().len() >= 4, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_run_on_redis_streams() {
    let Some(router) = redis(DeliveryMode::Streams).await else {
        return;
    };
    check_payment(router).await;
    let Some(router) = redis(DeliveryMode::Streams).await else {
        return;
    };
    check_game(router).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_run_on_redis_pubsub() {
    let Some(router) = redis(DeliveryMode::PubSub).await else {
        return;
    };
    check_payment(router).await;
    let Some(router) = redis(DeliveryMode::PubSub).await else {
        return;
    };
    check_game(router).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_run_on_rabbitmq() {
    let Some(router) = rabbitmq().await else {
        return;
    };
    check_payment(router).await;
    let Some(router) = rabbitmq().await else {
        return;
    };
    check_game(router).await;
}
