//! "Credentials never appear in logs or `Debug` output": every Redis URL form a password can take,
//! printed through every path the router has for it (`Debug` of the builder and of the router, its
//! health, `Display` and `Debug` of its errors, and every JSON log line written meanwhile, fred's
//! own included): no piece of the secret may show.
//!
//! The unreachable URLs need no Redis (port 1 refuses at once). The accepted ones use a
//! `redis-server` the test starts with that password (skipped without the binary).
//!
//! A test binary of its own (not in `tests/integration`): it installs a process-wide `log` bridge.

mod common;

use std::sync::Once;
use std::time::Duration;

use agentcomm_core::router::Router;
use agentcomm_redis::{DeliveryMode, RedisRouter, RedisRouterBuilder};
use agentcomm_testkit::logs;
use common::*;

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
    "Qz7k?Wm4p=Xc5v",
    "Qz7k&Wm4p=Xc5v",
];

/// URLs of servers that cannot be reached (port 1), holding a secret in every place a URL can.
fn unreachable_urls() -> Vec<String> {
    let mut urls = Vec::new();
    for password in PASSWORDS {
        for template in [
            "redis://user:{}@127.0.0.1:1/0",
            "redis://:{}@127.0.0.1:1",
            "redis://{}@127.0.0.1:1/0",
            "redis://user:{}@[::1]:1/2",
            "redis-cluster://user:{}@127.0.0.1:1?node=127.0.0.1:2&node=[::1]:3",
            "redis-sentinel://user:{}@127.0.0.1:1,[::1]:2/0?sentinelServiceName=main",
            "redis-sentinel://127.0.0.1:1,127.0.0.1:2/0?sentinelServiceName=main&sentinelPassword={}",
            "redis-sentinel://127.0.0.1:1/0?sentinelPassword={}&sentinelServiceName=main&node=127.0.0.1:2",
            "redis-sentinel://user:{}@127.0.0.1:1/0?sentinelServiceName=main&sentinelUsername=u&sentinelPassword={}",
            // URLs fred refuses: their error shows them.
            "redis://user:{}@127.0.0.1:99999/0",
            "redis://user:{}@127.0.0.1:1/notadb",
            "redis-cluster://user:{}@127.0.0.1:1?node=127.0.0.1",
            "redis-sentinel://user:{}@127.0.0.1:1/0",
        ] {
            // In a lone user part, the text before a ':' is the user name, not a secret; in a
            // query, a `name=value` after an '&' is another parameter to every client (fred reads
            // the password up to the '&').
            let lone_user = template.contains("//{}@") && password.contains(':');
            let split_query = template.contains("={}") && password.contains('&');
            if !lone_user && !split_query {
                urls.push(template.replace("{}", password));
            }
        }
    }
    urls.extend(
        [
            "redis:/user:Qz7kWm4pXc5v@127.0.0.1:1/0",
            "user:Qz7kWm4pXc5v@127.0.0.1:1/0?client=http://proxy",
            "http://user:Qz7kWm4pXc5v@127.0.0.1:1",
        ]
        .map(String::from),
    );
    urls
}

/// Runs `test` on a runtime of one thread (every task fred spawns runs there) with a JSON log layer
/// at TRACE, `log` records (fred's) included, until fred's tasks have ended; returns what it returned
/// and the log lines.
fn logged<T>(test: impl std::future::Future<Output = T>) -> (T, String) {
    static LOG_BRIDGE: Once = Once::new();
    LOG_BRIDGE.call_once(|| {
        let _ = tracing_log::LogTracer::init();
    });
    logs::capture(test)
}

fn quick(url: &str) -> RedisRouterBuilder {
    RedisRouter::builder(url)
        .connect_timeout(Duration::from_millis(500))
        .command_timeout(Duration::from_millis(500))
        .max_reconnect_attempts(Some(0))
        .prefix(unique_prefix())
}

/// The texts in `texts` that show a piece of the secret, labelled.
fn leaking(url: &str, texts: &[(&str, String)]) -> Vec<String> {
    logs::leaks(&format!("{url:?}"), &PIECES, texts)
}

#[test]
fn no_unreachable_url_shows_its_password() {
    let mut found = Vec::new();
    for url in unreachable_urls() {
        let mut texts = vec![("builder Debug", format!("{:?}", quick(&url)))];
        let env =
            RedisRouterBuilder::from_lookup(|name| (name == "REDIS_URL").then(|| url.clone()));
        match env {
            Ok(builder) => {
                texts.push(("builder from the environment Debug", format!("{builder:?}")))
            }
            Err(error) => {
                texts.push(("REDIS_URL error Display", error.to_string()));
                texts.push(("REDIS_URL error Debug", format!("{error:?}")));
            }
        }
        for mode in [DeliveryMode::Streams, DeliveryMode::PubSub] {
            let (shown, lines) = logged(async {
                match quick(&url).mode(mode).connect().await {
                    Ok(router) => {
                        let debug = format!("{router:?}");
                        let _ = router.close().await;
                        vec![("router Debug", debug)]
                    }
                    Err(error) => vec![
                        ("connect error Display", error.to_string()),
                        ("connect error Debug", format!("{error:?}")),
                    ],
                }
            });
            texts.extend(shown);
            texts.push(("log lines", lines));
        }
        found.extend(leaking(&url, &texts));
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}

/// Connects `builder` (which must succeed: `taken` says what that proves), and returns the router's
/// and its health's `Debug` output before it closes.
async fn connected_texts(
    builder: RedisRouterBuilder,
    what: &str,
    taken: &str,
) -> Vec<(&'static str, String)> {
    let router = within(Duration::from_secs(20), what, builder.connect())
        .await
        .unwrap_or_else(|error| panic!("{taken}: {error}"));
    let health = router.health().await;
    let texts = vec![
        ("router Debug", format!("{router:?}")),
        ("health Debug", format!("{health:?}")),
    ];
    router.close().await.expect("close");
    texts
}

/// A Redis of the test's own that wants `password` (as the server reads it, decoded).
fn server_with(password: &str) -> Option<servers::Spawned> {
    if let Some(reason) = servers::missing_tools() {
        servers::skip(&reason);
        return None;
    }
    let port = servers::free_ports(1)[0];
    Some(
        servers::start(
            servers::server_dir("secrets"),
            port,
            &[
                "--port".into(),
                port.to_string(),
                "--requirepass".into(),
                password.into(),
            ],
        )
        .expect("a redis-server with a password"),
    )
}

/// A router connected with a password (plain, and with percent-encoded delimiters) shows it
/// nowhere: not in its `Debug`, its health, or the log lines of its life (connecting, closing).
#[test]
fn a_connected_router_shows_its_password_nowhere() {
    let Some(server) = server_with("Qz7k@Wm4p:Xc5v/?#") else {
        return;
    };
    let port = server.port;
    let mut found = Vec::new();
    for (url, mode) in [
        (
            format!("redis://:Qz7k%40Wm4p%3AXc5v%2F%3F%23@127.0.0.1:{port}/0"),
            DeliveryMode::Streams,
        ),
        (
            format!("redis://default:Qz7k%40Wm4p%3AXc5v%2F%3F%23@[::ffff:127.0.0.1]:{port}"),
            DeliveryMode::PubSub,
        ),
    ] {
        let (texts, lines) = logged(connected_texts(
            RedisRouter::builder(&url)
                .mode(mode)
                .prefix(unique_prefix()),
            "connecting",
            "the password is taken",
        ));
        // The capture works: the router's own line, and fred's (through the `log` bridge).
        assert!(lines.contains("connected to Redis"), "{lines}");
        assert!(lines.contains("\"target\":\"fred::"), "{lines}");
        found.extend(leaking(&url, &texts));
        found.extend(leaking(&url, &[("log lines", lines)]));
    }
    drop(server);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

/// Through a Sentinel that wants a password of its own (`sentinelPassword`, with an '@') in front
/// of a primary that wants another (percent-encoded in the user part): neither shows in the
/// router's `Debug`, its health or the log lines of its life.
#[test]
fn a_router_through_a_sentinel_with_passwords_shows_neither() {
    if let Some(reason) = servers::missing_tools() {
        servers::skip(&reason);
        return;
    }
    let service = "agentcomm-secrets";
    let ports = servers::free_ports(2);
    let primary = servers::start(
        servers::server_dir("secrets-primary"),
        ports[0],
        &[
            "--port".into(),
            ports[0].to_string(),
            "--requirepass".into(),
            "Qz7k@Wm4p:Xc5v".into(),
        ],
    )
    .expect("the Sentinel's primary");
    let dir = servers::server_dir("secrets-sentinel");
    let config = dir.join("sentinel.conf");
    std::fs::write(
        &config,
        format!(
            "sentinel monitor {service} 127.0.0.1 {} 1\nsentinel auth-pass {service} Qz7k@Wm4p:Xc5v\nrequirepass Xc5v@Qz7k\n",
            ports[0]
        ),
    )
    .expect("write sentinel.conf");
    let sentinel = servers::start_from(
        Some(&config),
        dir,
        ports[1],
        &["--sentinel".into(), "--port".into(), ports[1].to_string()],
    )
    .expect("the Sentinel");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let args = [
            "-p",
            &ports[1].to_string(),
            "-a",
            "Xc5v@Qz7k",
            "--no-auth-warning",
            "sentinel",
            "get-master-addr-by-name",
            service,
        ]
        .map(String::from);
        let answer = servers::redis_cli(&args, Duration::from_secs(5)).expect("ask the Sentinel");
        if String::from_utf8_lossy(&answer.stdout).contains(&ports[0].to_string()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the Sentinel did not name its primary within 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!(
        "redis-sentinel://:Qz7k%40Wm4p%3AXc5v@127.0.0.1:{}/0?sentinelServiceName={service}&sentinelPassword=Xc5v@Qz7k",
        ports[1]
    );
    let (texts, lines) = logged(connected_texts(
        RedisRouter::builder(&url).prefix(unique_prefix()),
        "connecting through the Sentinel",
        "both passwords are taken",
    ));
    assert!(lines.contains("connected to Redis"), "{lines}");
    let mut found = leaking(&url, &texts);
    found.extend(leaking(&url, &[("log lines", lines)]));
    drop((sentinel, primary));
    assert!(found.is_empty(), "{}", found.join("\n"));
}

/// The password of [`a_server_echoing_the_refused_auth_shows_no_password`].
const ECHOED: &str = "echo-test-Qz7kWm4p";

/// A server that does not know `AUTH` (a proxy without it, or a Redis with it renamed away) answers
/// "unknown command 'AUTH', with args beginning with: '<password>'". Neither the error of `connect`,
/// nor health while reconnections meet that server, nor the warning logged for each of them shows
/// the password. Before, all three did.
#[test]
fn a_server_echoing_the_refused_auth_shows_no_password() {
    if let Some(reason) = servers::missing_tools() {
        servers::skip(&reason);
        return;
    }
    let port = servers::free_ports(1)[0];
    let without_auth = |name: &str| {
        servers::start(
            servers::server_dir(name),
            port,
            &[
                "--port".into(),
                port.to_string(),
                "--rename-command".into(),
                "AUTH".into(),
                "".into(),
            ],
        )
        .expect("a redis-server without AUTH")
    };
    let url = format!("redis://:{ECHOED}@127.0.0.1:{port}");
    let ((), lines) = logged(async {
        // The first connection.
        let server = without_auth("auth-echo-first");
        let text = within(
            Duration::from_secs(20),
            "the refused connection",
            RedisRouter::builder(&url)
                .connect_timeout(Duration::from_secs(3))
                .max_reconnect_attempts(Some(0))
                .connect(),
        )
        .await
        .expect_err("a server without AUTH refuses the login")
        .to_string();
        assert!(text.contains("unknown command"), "{text}");
        assert!(!text.contains(ECHOED), "the password leaked: {text}");
        drop(server);
        // Reconnections: the router connected to a Redis with the password, which is replaced by
        // one without AUTH on the same port.
        let server = servers::start(
            servers::server_dir("auth-echo-before"),
            port,
            &[
                "--port".into(),
                port.to_string(),
                "--requirepass".into(),
                ECHOED.into(),
            ],
        )
        .expect("a redis-server with a password");
        let router = within(
            Duration::from_secs(20),
            "the connection",
            RedisRouter::builder(&url)
                .prefix(unique_prefix())
                .command_timeout(Duration::from_secs(2))
                .connect(),
        )
        .await
        .expect("the right password connects");
        drop(server);
        let _server = without_auth("auth-echo-after");
        eventually(
            Duration::from_secs(15),
            "health to name the unknown AUTH",
            async || {
                let health = router.health().await;
                assert!(
                    !health.detail.contains(ECHOED),
                    "the password leaked: {}",
                    health.detail
                );
                health.detail.contains("unknown command")
            },
        )
        .await;
        let _ = within(Duration::from_secs(20), "close", router.close()).await;
    });
    let warnings: Vec<&str> = lines
        .lines()
        .filter(|line| line.contains("Redis connection problem"))
        .collect();
    assert!(
        warnings.iter().any(|line| line.contains("unknown command")),
        "the reconnections were logged: {lines}"
    );
    for line in warnings {
        assert!(!line.contains(ECHOED), "the password leaked: {line}");
    }
}
