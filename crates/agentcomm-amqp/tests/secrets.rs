//! "Credentials never appear in logs or `Debug` output": every AMQP URL form a password can take
//! (and TLS key material), printed through every path the router has for it (`Debug` of the
//! builder and of the router, `Display` and `Debug` of its errors, and every JSON log line written
//! meanwhile): no piece of the secret may show.
//!
//! The unreachable URLs need no broker (port 1 refuses at once); the refused login uses the shared
//! RabbitMQ (a wrong password for `guest`), skipped when it is not there.
//!
//! A test binary of its own (not in `tests/integration`): it asserts on lines captured by a subscriber
//! of its own thread, and tracing caches each log line's interest process-wide, so a test without a
//! subscriber that reaches the same line first can make it never fire (tokio-rs/tracing#3611).

use std::time::Duration;

use agentcomm_amqp::{AmqpRouter, AmqpRouterBuilder};
use agentcomm_core::router::Router;
use agentcomm_testkit::logs;

/// The pieces of every secret below: none of them may appear anywhere.
const PIECES: [&str; 3] = ["Qz7k", "Wm4p", "Xc5v"];

/// Passwords made of [`PIECES`], as they are written in a URL.
const PASSWORDS: [&str; 10] = [
    "Qz7kWm4pXc5v",
    "Qz7k%40Wm4p%3AXc5v",
    "Qz7k%2FWm4p%3FXc5v%23",
    "Qz7k@Wm4p@Xc5v",
    "Qz7k:Wm4p:Xc5v",
    "Qz7k/Wm4p/Xc5v",
    "Qz7k?Wm4p?Xc5v",
    "Qz7k#Wm4p#Xc5v",
    "Qz7k&Wm4p&Xc5v",
    "Qz7k&Wm4p=Xc5v",
];

/// URLs of brokers that cannot be reached (port 1), holding a secret in every place a URL can.
fn unreachable_urls() -> Vec<String> {
    let mut urls = Vec::new();
    for password in PASSWORDS {
        for template in [
            "amqp://app:{}@127.0.0.1:1/%2f",
            "amqp://:{}@127.0.0.1:1",
            "amqp://{}@127.0.0.1:1/prod",
            "amqp://app:{}@[::1]:1/prod?heartbeat=10",
            "amqps://app:{}@127.0.0.1:1/prod?cacertfile=/nonexistent/ca.pem",
            // The key's password in the query, as other clients read it.
            "amqps://app:pw@127.0.0.1:1/prod?certfile=/nonexistent/c.pem&keyfile=/nonexistent/k.pem&password={}",
            "amqp://app:pw@127.0.0.1:1/prod?password={}&heartbeat=10",
            // URLs that are refused: their error shows them.
            "amqp://app:{}@127.0.0.1:99999/prod",
            "amqp://app:{}@127.0.0.1:1/a/b",
            "amqp://app:{}@127.0.0.1:1/prod?heartbeat=x",
            "amqp://app:{}@127.0.0.1:1/prod?cacertfile=/ca.pem",
        ] {
            // In a lone user part, the text before a ':' is the user name, not a secret.
            if !(template.contains("//{}@") && password.contains(':')) {
                urls.push(template.replace("{}", password));
            }
        }
    }
    urls.extend(
        [
            "amqp:/app:Qz7kWm4pXc5v@127.0.0.1:1/prod",
            "app:Qz7kWm4pXc5v@127.0.0.1:1/prod?redirect=amqp://other",
            "http://app:Qz7kWm4pXc5v@127.0.0.1:1",
        ]
        .map(String::from),
    );
    urls
}

fn quick(url: &str) -> AmqpRouterBuilder {
    AmqpRouter::builder(url)
        .connect_timeout(Duration::from_secs(2))
        .exchange(format!("secrets-{}", uuid::Uuid::now_v7().simple()))
}

/// Every text the router shows of `builder`: its `Debug`, and what connecting it shows.
async fn shown(builder: AmqpRouterBuilder) -> Vec<(&'static str, String)> {
    let mut texts = vec![("builder Debug", format!("{builder:?}"))];
    match builder.connect().await {
        Ok(router) => {
            texts.push(("router Debug", format!("{router:?}")));
            let _ = router.close().await;
        }
        Err(error) => {
            texts.push(("connect error Display", error.to_string()));
            texts.push(("connect error Debug", format!("{error:?}")));
        }
    }
    texts
}

fn leaking(url: &str, texts: &[(&str, String)]) -> Vec<String> {
    logs::leaks(&format!("{url:?}"), &PIECES, texts)
}

#[test]
fn no_unreachable_url_shows_its_password() {
    let mut found = Vec::new();
    for url in unreachable_urls() {
        let (mut texts, lines) = logs::capture(shown(quick(&url)));
        if url.contains("?password=") && !url.contains(":99999") {
            // The capture works: the parameter this client does not read is logged (by name).
            assert!(
                lines.contains("ignoring an AMQP URL parameter"),
                "{url}: {lines}"
            );
        }
        texts.push(("log lines", lines));
        found.extend(leaking(&url, &texts));
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}

/// A key file that is not valid PEM, holding what looks like key material: the TLS set-up's error
/// (and amqprs's panic, caught) shows none of it.
#[test]
fn a_bad_key_file_shows_none_of_its_content() {
    let dir = std::env::temp_dir().join(format!("agentcomm-secrets-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut found = Vec::new();
    for (name, content) in [
        (
            "bad-base64",
            "-----BEGIN PRIVATE KEY-----\nQz7k*Wm4p*Xc5v!!\n-----END PRIVATE KEY-----\n",
        ),
        ("no-end", "-----BEGIN PRIVATE KEY-----\nQz7kWm4pXc5v\n"),
        ("no-pem", "Qz7kWm4pXc5v\n"),
        (
            "not-a-key",
            "-----BEGIN PRIVATE KEY-----\nUXo3a1dtNHBYYzV2UXo3a1dtNHBYYzV2\n-----END PRIVATE KEY-----\n",
        ),
    ] {
        let key = dir.join(format!("{name}.pem"));
        std::fs::write(&key, content).unwrap();
        // The certificate file is a key too: whichever is read first fails.
        let url = format!(
            "amqps://app:pw@127.0.0.1:1/prod?certfile={}&keyfile={}",
            key.display(),
            key.display()
        );
        let (mut texts, lines) = logs::capture(shown(quick(&url)));
        texts.push(("log lines", lines));
        found.extend(leaking(&url, &texts));
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(found.is_empty(), "{}", found.join("\n"));
}

/// A login RabbitMQ refuses (a wrong password for `guest`, in every form) shows the password
/// nowhere.
#[test]
fn a_refused_login_shows_its_password_nowhere() {
    let Some(address) = reachable_broker() else {
        return;
    };
    let mut found = Vec::new();
    for password in PASSWORDS {
        let url = format!("amqp://guest:{password}@{address}/%2f");
        let (mut texts, lines) = logs::capture(shown(quick(&url)));
        texts.push(("log lines", lines));
        found.extend(leaking(&url, &texts));
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}

/// The shared RabbitMQ's address, or `None` after the skip line (a failure under
/// `AGENTCOMM_REQUIRE_BROKERS=1`).
fn reachable_broker() -> Option<String> {
    let address = "127.0.0.1:5672";
    if std::net::TcpStream::connect_timeout(&address.parse().unwrap(), Duration::from_secs(2))
        .is_ok()
    {
        return Some(address.to_string());
    }
    agentcomm_testkit::broker_unavailable(format!("no RabbitMQ at {address}"));
    None
}
