//! What a failed connect says: a broker that was reached and refused the login or the virtual host
//! is named as such (not "cannot reach ... check that the broker is running"), and a port that is
//! not RabbitMQ's is named as such (not "raise connect_timeout"). The refusals are met on the real
//! RabbitMQ (a wrong password for guest, a virtual host that does not exist: nothing is changed on
//! the broker); the wrong ports are listeners of the test's own on loopback.

mod common;

use std::time::{Duration, Instant};

use agentcomm_amqp::AmqpRouter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::{after_protocol_header, broker_address, broker_available, unique, within};

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
    for wrong in ["cannot reach", "broker is running", "RabbitMQ is running"] {
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
    let vhost = unique("agentcomm-no-such-vhost");
    let text = refused(
        &format!("amqp://guest:guest@{}/{vhost}", broker_address()),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        text.contains(&format!(
            "the virtual host '{vhost}' does not exist on RabbitMQ at amqp://guest:***@{}/{vhost}",
            broker_address()
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("rabbitmqctl add_vhost {vhost}")),
        "{text}"
    );
    assert!(text.contains("fix the URL's path"), "{text}");
    not_about_reachability(&text);
    for debug in ["MethodHeader", "ShortStr", "class_id"] {
        assert!(!text.contains(debug), "amqprs's Debug output: {text}");
    }
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
    for (what, answer) in [
        (
            "an HTTP server",
            &b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"[..],
        ),
        ("a server that closes at once", &b""[..]),
    ] {
        let address = listener(Some(answer)).await;
        let started = Instant::now();
        let text = refused(&format!("amqp://app:s3cret-pw@{address}/%2f"), timeout).await;
        assert!(
            text.contains(&format!("{address} does not speak AMQP 0-9-1")),
            "{what}: {text}"
        );
        assert!(
            text.contains("is it the right port? RabbitMQ listens on 5672, or 5671 for amqps"),
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
