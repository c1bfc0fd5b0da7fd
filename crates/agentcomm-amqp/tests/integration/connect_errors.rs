//! What a failed connect says: a broker that was reached and refused the login or the virtual host
//! is named as such (not "cannot reach ... check that the broker is running"), and a port that is
//! not RabbitMQ's is named as such (not "raise connect_timeout"). The refusals are met on the real
//! RabbitMQ (a wrong password for guest, a virtual host that does not exist: nothing is changed on
//! the broker); the wrong ports are listeners of the test's own on loopback.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use agentcomm_amqp::{AmqpRouter, Credentials};
use agentcomm_core::backoff::Backoff;
use agentcomm_core::envelope::Envelope;
use agentcomm_core::parse_channel;
use agentcomm_core::router::Router;
use agentcomm_testkit::proxy::FaultProxy;
use amqprs::channel::{ExchangeDeclareArguments, ExchangeDeleteArguments};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{
    Cleanup, Raw, ThrowawayUser, after_protocol_header, broker_address, broker_available,
    connection_start, method_frame, unique, wait_until, within,
};

/// The error text of a connect to `url` that must fail.
async fn refused(url: &str, connect_timeout: Duration) -> String {
    let connected = within(
        "the failing connect",
        AmqpRouter::builder(url)
            .connect_timeout(connect_timeout)
            .connect(),
    )
    .await;
    let text = connected
        .map(|_| ())
        .expect_err("this connect must fail")
        .to_string();
    println!("the error: {text}");
    text
}

/// What no error of a broker that answered may say.
fn not_about_reachability(text: &str) {
    for wrong in ["cannot reach", "is running"] {
        assert!(!text.contains(wrong), "the broker was reached: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_a_refused_login_not_an_unreachable_broker() {
    if !broker_available().await {
        return;
    }
    let password = unique("wrong-pw");
    let text = refused(
        &format!("amqp://guest:{password}@{}/%2f", broker_address()),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        text.contains(&format!(
            "RabbitMQ at amqp://guest:***@{}/%2f refused the login of user 'guest'",
            broker_address()
        )),
        "{text}"
    );
    assert!(
        text.contains("check the user name and password in the URL"),
        "{text}"
    );
    not_about_reachability(&text);
    assert!(!text.contains(&password), "the password leaked: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_virtual_host_is_named_with_the_command_that_creates_it() {
    if !broker_available().await {
        return;
    }
    let plain = unique("agentcomm-no-such-vhost");
    // A virtual host a shell would split, expand or end the quotes of, pasted as it is.
    let id = unique("");
    let odd = format!("agentcomm no-such vhost's $HOME{id}");
    for (vhost, path, command) in [
        (
            plain.clone(),
            plain.clone(),
            format!("rabbitmqctl add_vhost {plain}"),
        ),
        (
            odd.clone(),
            format!("agentcomm%20no-such%20vhost%27s%20%24HOME{id}"),
            format!(r"rabbitmqctl add_vhost 'agentcomm no-such vhost'\''s $HOME{id}'"),
        ),
    ] {
        let text = refused(
            &format!("amqp://guest:guest@{}/{path}", broker_address()),
            Duration::from_secs(5),
        )
        .await;
        assert!(
            text.contains(&format!(
                "the virtual host '{vhost}' does not exist on RabbitMQ at amqp://guest:***@{}/{path}",
                broker_address()
            )),
            "{text}"
        );
        assert!(text.contains(&format!("`{command}`")), "{text}");
        assert!(text.contains("fix the URL's path"), "{text}");
        not_about_reachability(&text);
        for debug in ["MethodHeader", "ShortStr", "class_id"] {
            assert!(!text.contains(debug), "amqprs's Debug output: {text}");
        }
    }
}

/// A user without permission on the virtual host is told the command that grants it: RabbitMQ's
/// NOT_ALLOWED reply was passed on alone ("refused the connection: NOT_ALLOWED - access to vhost '/'
/// refused for user ..."), with no fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_permission_on_the_virtual_host_is_told_how_to_grant_it() {
    if !broker_available().await {
        return;
    }
    let name = unique("t-agentcomm-noperm");
    let password = unique("pw");
    let Some(user) = tokio::task::block_in_place(|| ThrowawayUser::add(&name, &password)) else {
        return;
    };
    tokio::task::block_in_place(|| user.clear_permissions());
    let text = refused(
        &format!("amqp://{name}:{password}@{}/%2f", broker_address()),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        text.contains(&format!(
            "refused user '{name}' the virtual host '/': grant it with `rabbitmqctl set_permissions -p / {name} '.*' '.*' '.*'`"
        )),
        "{text}"
    );
    assert!(!text.contains(&password), "the password leaked: {text}");
    not_about_reachability(&text);
    drop(user);
}

/// A listener on loopback whose every connection gets `answer` (written after the AMQP protocol
/// header is read) and is then closed, or, with `None`, is held open without a word. Its
/// `host:port`; it stops with the test's runtime.
async fn listener(answer: Option<&'static [u8]>) -> String {
    after_protocol_header(move |mut socket| async move {
        match answer {
            Some(answer) => {
                let _ = socket.write_all(answer).await;
            }
            // Silent: held until the client goes.
            None => {
                let mut read = [0u8; 64];
                while socket.read(&mut read).await.is_ok_and(|n| n > 0) {}
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_that_answers_but_not_as_amqp_is_named_at_once() {
    let timeout = Duration::from_secs(10);
    for (what, answer, expected) in [
        (
            "an HTTP server",
            &b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"[..],
            "does not speak AMQP 0-9-1 (it answered the AMQP protocol header with something \
             else): is it the right port? RabbitMQ listens on 5672, or 5671 for amqps",
        ),
        // As a load balancer whose RabbitMQ is down does: named first.
        (
            "a server that closes at once",
            &b""[..],
            "closed the connection without answering the AMQP protocol header, as a proxy or load \
             balancer in front of a RabbitMQ that is down or restarting does (or a port that is \
             not RabbitMQ's: it listens on 5672, or 5671 for amqps)",
        ),
    ] {
        let address = listener(Some(answer)).await;
        let started = Instant::now();
        let text = refused(&format!("amqp://app:s3cret-pw@{address}/%2f"), timeout).await;
        assert!(
            text.contains(&format!("{address} {expected}")),
            "{what}: {text}"
        );
        for wrong in [
            "connect_timeout",
            "user name and password",
            "refused the login",
        ] {
            assert!(!text.contains(wrong), "{what}: {text}");
        }
        assert!(!text.contains("s3cret-pw"), "the password leaked: {text}");
        assert!(
            started.elapsed() < timeout / 2,
            "{what}: not a timeout, took {:?}",
            started.elapsed()
        );
    }
}

/// A fake broker that answers every login with a connection.close whose reply text is `reply`,
/// as RabbitMQ answers a login it refuses, or a virtual host it does not let the user in.
async fn broker_closing_with(reply: String) -> String {
    after_protocol_header(move |mut socket| {
        let reply = reply.clone();
        async move {
            // connection.close: class 10, method 50, 403, the reply text, about start-ok (10, 11).
            let mut close = vec![0, 10, 0, 50, 0x01, 0x93, reply.len() as u8];
            close.extend_from_slice(reply.as_bytes());
            close.extend_from_slice(&[0, 10, 0, 11]);
            for frame in [connection_start("PLAIN AMQPLAIN"), method_frame(&close)] {
                if socket.write_all(&frame).await.is_err() {
                    return;
                }
                // The start-ok, then the close-ok.
                let mut answer = [0u8; 1024];
                let _ = socket.read(&mut answer).await;
            }
        }
    })
    .await
}

/// A password with a `"` in it was scrubbed from amqprs's Debug text of the broker's close, where
/// it is escaped (`\"`), and then shown unescaped in the reply quoted from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_with_a_quote_in_the_broker_s_reply_is_hidden() {
    let password = format!("pa\"ss-{}", unique("pw"));
    let address = broker_closing_with(format!(
        "ACCESS_REFUSED - no login with password {password}"
    ))
    .await;
    let text = refused(
        &format!("amqp://app:{}@{address}/%2f", password.replace('"', "%22")),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        text.contains("refused the login of user 'app'") && text.contains("RabbitMQ said:"),
        "{text}"
    );
    assert!(!text.contains(&password), "the password leaked: {text}");
    assert!(
        !text.contains(&password.replace('"', "\\\"")),
        "the password leaked: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_port_s_timeout_also_names_a_port_that_is_not_rabbitmq_s() {
    let address = listener(None).await;
    let text = refused(
        &format!("amqp://app:s3cret-pw@{address}/%2f"),
        Duration::from_millis(500),
    )
    .await;
    assert!(text.contains("did not open within 500ms"), "{text}");
    assert!(
        text.contains("did not answer the AMQP handshake, as a port that is not RabbitMQ's does"),
        "{text}"
    );
    assert!(
        text.contains(
            "check the URL's host and port (RabbitMQ listens on 5672, or 5671 for amqps)"
        ),
        "{text}"
    );
    assert!(!text.contains("s3cret-pw"), "the password leaked: {text}");
}

/// A router on a fault proxy in front of RabbitMQ, on `exchange`, whose logins come from `login`
/// (user, password) at each connection attempt, and the proxy.
async fn proxied_router(
    exchange: &str,
    login: impl Fn() -> (String, String) + Send + Sync + 'static,
) -> (AmqpRouter, FaultProxy) {
    let proxy = within("the proxy", FaultProxy::start(broker_address()))
        .await
        .expect("proxy");
    let router = within(
        "connect",
        AmqpRouter::builder(format!("amqp://guest:unused-pw@{}/%2f", proxy.local_addr()))
            .exchange(exchange)
            .close_timeout(Duration::from_secs(5))
            .publish_outage_timeout(Duration::from_secs(1))
            .credentials_provider(move || {
                let (user, password) = login();
                async move { Ok::<_, String>(Credentials::new(user, password)) }
            })
            .reconnect(Backoff::new(
                Duration::from_millis(50),
                Duration::from_millis(300),
            ))
            .connect(),
    )
    .await
    .expect("the first connect");
    (router, proxy)
}

/// The health of `router` once each of its connections is back or has failed a reconnection
/// attempt. Until then, a connection still down has its loss as its last error, rightly with the
/// advice to check that RabbitMQ runs: the two connections are cut together, but their attempts
/// do not end together.
async fn health_after_a_failed_reconnect(router: &AmqpRouter, proxy: &FaultProxy) -> String {
    proxy.cut_all();
    let mut detail = String::new();
    wait_until("each connection back or failed once", async || {
        let health = router.health().await;
        let failed = health.get("connect_failures") >= 1;
        detail = health.detail;
        failed && !detail.contains("last error: the connection was lost")
    })
    .await;
    println!("health: {detail}");
    detail
}

/// Health, and a publish that gave up waiting, named a reconnection RabbitMQ refused the login of
/// "cannot reach rabbitmq ... Check that the broker is running".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_names_a_login_refused_on_reconnection() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-refused-health");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let wrong = unique("wrong-pw");
    let refuse = Arc::new(AtomicBool::new(false));
    let (router, proxy) = {
        let (wrong, refuse) = (wrong.clone(), refuse.clone());
        proxied_router(&exchange, move || {
            let password = if refuse.load(Ordering::SeqCst) {
                wrong.clone()
            } else {
                "guest".to_string()
            };
            ("guest".to_string(), password)
        })
        .await
    };
    refuse.store(true, Ordering::SeqCst);
    let detail = health_after_a_failed_reconnect(&router, &proxy).await;
    assert!(
        detail.contains("refused the login of user 'guest'")
            && detail.contains("check the user name and password the credentials provider gives"),
        "{detail}"
    );
    not_about_reachability(&detail);
    assert!(!detail.contains(&wrong), "the password leaked: {detail}");
    // A publish gives up after publish_outage_timeout, saying why it could not wait longer.
    let envelope = Envelope::new(
        parse_channel("Refused:request:s1").expect("channel"),
        "application/json",
        b"{}".to_vec(),
    );
    let text = within(
        "a publish while logins are refused",
        router.publish(envelope),
    )
    .await
    .expect_err("no connection to publish on")
    .to_string();
    println!("the publish: {text}");
    assert!(
        text.contains("gave up after 1s") && text.contains("refused the login of user 'guest'"),
        "{text}"
    );
    not_about_reachability(&text);
    assert!(!text.contains(&wrong), "the password leaked: {text}");
    refuse.store(false, Ordering::SeqCst);
    within("close", router.close()).await.unwrap();
}

/// A reconnection whose topology RabbitMQ refuses (the exchange was declared again with another
/// type meanwhile) was reported in health with "; check that RabbitMQ at ... is running" added,
/// although RabbitMQ answered every attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_does_not_send_to_check_a_broker_that_refused_the_topology() {
    if !broker_available().await {
        return;
    }
    let exchange = unique("t-inequivalent-health");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let (router, proxy) =
        proxied_router(&exchange, || ("guest".to_string(), "guest".to_string())).await;
    let raw = Raw::open().await;
    within(
        "delete the exchange",
        raw.channel
            .exchange_delete(ExchangeDeleteArguments::new(&exchange)),
    )
    .await
    .expect("exchange.delete");
    within(
        "declare it as fanout",
        raw.channel
            .exchange_declare(ExchangeDeclareArguments::new(&exchange, "fanout")),
    )
    .await
    .expect("exchange.declare");
    raw.close().await;
    let detail = health_after_a_failed_reconnect(&router, &proxy).await;
    assert!(
        detail.contains("PRECONDITION_FAILED")
            && detail.contains("it already exists with other settings"),
        "{detail}"
    );
    not_about_reachability(&detail);
    within("close", router.close()).await.unwrap();
}
