//! A password rotated while the router runs: with a credentials provider, the reconnect after a
//! cut logs in with whatever the provider gives at that attempt. Needs `rabbitmqctl` on the
//! broker's machine to make a throwaway user (skips without it, unless AGENTCOMM_REQUIRE_BROKERS=1).

use crate::common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentcomm_amqp::{AmqpRouter, Credentials};
use agentcomm_core::ChannelPattern;
use agentcomm_core::backoff::Backoff;
use agentcomm_core::envelope::Envelope;
use agentcomm_core::parse_channel;
use agentcomm_core::router::{PublishOutcome, Router, SubscribeOptions, Subscription};
use agentcomm_testkit::proxy::FaultProxy;
use tokio::time::Instant;

use crate::common::{
    Cleanup, Logs, ThrowawayUser, broker_address, broker_available, unique, wait_until, within,
};

fn envelope(n: u64) -> Envelope {
    Envelope::new(
        parse_channel("Rotation:request:s1").expect("channel"),
        "application/json",
        format!(r#"{{"n":{n}}}"#).into_bytes(),
    )
}

/// Publishes `n` and checks that `subscription` gets it.
async fn round_trip(router: &AmqpRouter, subscription: &mut Subscription, n: u64) {
    let outcome = within("a publish", router.publish(envelope(n)))
        .await
        .expect("publish");
    assert_eq!(outcome, PublishOutcome::Accepted);
    let delivery = within("the delivery", subscription.next())
        .await
        .expect("a delivery");
    assert_eq!(
        delivery.envelope().payload().as_ref(),
        format!(r#"{{"n":{n}}}"#).as_bytes()
    );
    within("ack", delivery.ack()).await.expect("ack");
}

/// The user's password is changed and the connection cut: while the provider still gives the old
/// password, every reconnect is refused (and each refusal asks the provider again); once it gives
/// the new one, the router reconnects with it, and its subscription and publishes work again.
/// Neither password shows in the logs, the errors or `Debug`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_password_is_used_from_the_next_reconnect_on() {
    if !broker_available().await {
        return;
    }
    let logs = Logs::capture();
    let name = unique("agentcomm-rotation");
    let old = unique("old-pw");
    let new = unique("new-pw");
    let Some(user) = ThrowawayUser::add(&name, &old) else {
        return;
    };
    let proxy = within("the proxy", FaultProxy::start(broker_address()))
        .await
        .expect("proxy");
    let exchange = unique("t-rotation");
    let _cleanup = Cleanup::new(&exchange, &[]);

    // What the provider gives, as a secret store would after the rotation, and how often it was
    // asked.
    let current = Arc::new(Mutex::new(old.clone()));
    let asked = Arc::new(AtomicU32::new(0));
    let provider = {
        let (name, current, asked) = (name.clone(), current.clone(), asked.clone());
        move || {
            asked.fetch_add(1, Ordering::SeqCst);
            let password = current.lock().expect("password lock").clone();
            let name = name.clone();
            async move { Ok::<_, String>(Credentials::new(name, password)) }
        }
    };
    // The URL names the user with the old password: a router that kept it could not come back.
    let url = format!("amqp://{name}:{old}@{}/%2f", proxy.local_addr());
    let router = within(
        "connect with the provider's credentials",
        AmqpRouter::builder(url)
            .exchange(&exchange)
            .credentials_provider(provider)
            .reconnect(Backoff::new(
                Duration::from_millis(50),
                Duration::from_millis(300),
            ))
            .heartbeat(Duration::from_secs(2))
            .confirm_timeout(Duration::from_secs(5))
            .publish_outage_timeout(Duration::from_secs(15))
            .close_timeout(Duration::from_secs(5))
            .connect(),
    )
    .await
    .expect("connect");
    assert_eq!(asked.load(Ordering::SeqCst), 2, "once per connection");
    let debug = format!("{router:?}");
    assert!(!debug.contains(&old), "{debug}");
    let mut subscription = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Rotation:*:*").expect("pattern"),
        )),
    )
    .await
    .expect("subscribe");
    round_trip(&router, &mut subscription, 1).await;

    // The rotation: the live connections keep their login, the next ones need the new password.
    user.change_password(&new);
    let before = asked.load(Ordering::SeqCst);
    proxy.cut_all();
    wait_until("the disconnect", async || !router.is_connected()).await;
    // The provider still gives the old password: refused, attempt after attempt, each asking it.
    wait_until("three refused logins", async || {
        router.health().await.get("connect_failures") >= 3
    })
    .await;
    assert!(!router.is_connected());
    assert!(
        asked.load(Ordering::SeqCst) >= before + 3,
        "each attempt asks the provider"
    );
    let health = within("health", router.health()).await;
    assert!(
        health.detail.contains(&format!(
            "logging in as '{name}', from the credentials provider"
        )),
        "{health:?}"
    );
    assert!(!health.detail.contains(&old), "{health:?}");

    // The secret store has the new password: the next attempt uses it.
    *current.lock().expect("password lock") = new.clone();
    wait_until("the reconnect with the new password", async || {
        router.is_connected()
    })
    .await;
    round_trip(&router, &mut subscription, 2).await;
    let health = within("health", router.health()).await;
    assert!(health.get("reconnects") >= 2, "{health:?}");

    let refused = logs.lines_with("reconnecting to RabbitMQ failed");
    assert!(
        refused
            .iter()
            .any(|line| line.contains("from the credentials provider")),
        "{refused:#?}"
    );
    for secret in [&old, &new] {
        let leaked = logs.lines_with(secret);
        assert!(leaked.is_empty(), "{leaked:#?}");
    }
    within("close", router.close()).await.expect("close");
}

/// A provider that does not answer fails the connect within `connect_timeout`, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_never_answers_fails_the_connect_in_time() {
    if !broker_available().await {
        return;
    }
    let started = Instant::now();
    let error = within(
        "a connect with a hung provider",
        AmqpRouter::builder(common::url())
            .exchange(unique("t-hung-provider"))
            .connect_timeout(Duration::from_millis(500))
            .credentials_provider(std::future::pending::<Result<Credentials, String>>)
            .connect(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("the credentials provider did not answer within 500ms (connect_timeout)"),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "{error}");
}

/// The error of a connect to `url` whose provider gives `user` and `password`.
async fn connect_error(url: String, user: &str, password: &str) -> String {
    let credentials = Credentials::new(user, password);
    within(
        "a connect with the provider's credentials",
        AmqpRouter::builder(url)
            .exchange(unique("t-provided"))
            .credentials_provider(move || {
                let credentials = credentials.clone();
                async move { Ok::<_, String>(credentials) }
            })
            .connect(),
    )
    .await
    .unwrap_err()
    .to_string()
}

/// amqprs's AMQPLAIN encoding panics (printing the password's bytes) on a password of 128 to 255
/// bytes: the URL's is checked when the URL is read, the provider's at each attempt, before it is
/// sent.
#[tokio::test]
async fn amqplain_refuses_a_provider_password_it_cannot_carry_without_panicking() {
    let long = "p".repeat(130);
    let url = format!(
        "{}?auth_mechanism=amqplain",
        common::url().split('?').next().unwrap_or_default()
    );
    let error = connect_error(url, "app", &long).await;
    assert!(
        error.contains("auth_mechanism=amqplain cannot carry the user name or password the credentials provider gave"),
        "{error}"
    );
    assert!(!error.contains(&long), "{error}");
}

/// PLAIN separates the user name and password with NUL: a password with one is refused before it
/// is sent (RabbitMQ would refuse the login as a wrong password, after its 3 s delay, and write the
/// whole login, the password's bytes included, to its log).
#[tokio::test]
async fn a_provider_password_with_a_nul_is_refused_before_it_is_sent() {
    let error = connect_error(common::url(), "guest", "gu\0est-s3cret").await;
    assert!(
        error.contains("auth_mechanism=plain cannot carry a user name or password with a NUL"),
        "{error}"
    );
    assert!(!error.contains("s3cret"), "{error}");
}

/// A long password (a token) RabbitMQ cannot read in its login frame: the error says so, rather
/// than only that the user name or password may be wrong (RabbitMQ drops such a connection just
/// as it drops a failed login).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_password_too_long_for_the_login_frame_is_named_in_the_error() {
    if !broker_available().await {
        return;
    }
    let name = unique("agentcomm-long-login");
    let password = "t".repeat(5000);
    let Some(_user) = ThrowawayUser::add(&name, &password) else {
        return;
    };
    let error = connect_error(common::url(), &name, &password).await;
    assert!(error.contains("frame_too_large"), "{error}");
    let login = format!("take {} bytes", name.len() + password.len());
    assert!(error.contains(&login), "{error}");
    assert!(!error.contains(&password), "{error}");
}

/// Counts the provider's calls that are still running: one is dropped when it ends or is aborted.
struct Running(Arc<AtomicU32>);

impl Running {
    fn new(running: &Arc<AtomicU32>) -> Self {
        running.fetch_add(1, Ordering::SeqCst);
        Running(running.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The user name and password of `url` (`guest`/`guest` when it has none).
fn url_login(url: &str) -> (String, String) {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    authority
        .rsplit_once('@')
        .and_then(|(login, _)| login.split_once(':'))
        .map_or(("guest".into(), "guest".into()), |(user, password)| {
            (user.into(), password.into())
        })
}

/// Closing the router while a reconnect waits for a provider that hangs lets that call go at once:
/// it is not left running, then followed by a login, for up to the connect_timeout after close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_lets_a_hung_provider_call_go() {
    if !broker_available().await {
        return;
    }
    let proxy = within("the proxy", FaultProxy::start(broker_address()))
        .await
        .expect("proxy");
    let exchange = unique("t-close-hung-provider");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let (user, password) = url_login(&common::url());
    // The first two calls (one per connection) answer; the ones after the cut hang.
    let asked = Arc::new(AtomicU32::new(0));
    let running = Arc::new(AtomicU32::new(0));
    let provider = {
        let (asked, running) = (asked.clone(), running.clone());
        move || {
            let first = asked.fetch_add(1, Ordering::SeqCst) < 2;
            let credentials = Credentials::new(user.clone(), password.clone());
            let running = Running::new(&running);
            async move {
                let _running = running;
                if !first {
                    std::future::pending::<()>().await;
                }
                Ok::<_, String>(credentials)
            }
        }
    };
    let router = within(
        "connect",
        AmqpRouter::builder(common::through(&common::url(), proxy.local_addr()))
            .exchange(&exchange)
            .connect_timeout(Duration::from_secs(120))
            .reconnect(Backoff::new(
                Duration::from_millis(50),
                Duration::from_millis(300),
            ))
            .close_timeout(Duration::from_secs(5))
            .credentials_provider(provider)
            .connect(),
    )
    .await
    .expect("connect");
    proxy.cut_all();
    wait_until("both reconnects waiting for the provider", async || {
        running.load(Ordering::SeqCst) == 2
    })
    .await;
    within("close", router.close()).await.expect("close");
    wait_until("the hung calls let go after close", async || {
        running.load(Ordering::SeqCst) == 0
    })
    .await;
    assert_eq!(asked.load(Ordering::SeqCst), 4, "no call after close");
}
