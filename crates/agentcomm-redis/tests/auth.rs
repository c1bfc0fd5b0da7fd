//! A Redis that requires a password, started by the test on loopback (`--requirepass`): a URL without
//! the password, or with a wrong one, fails `connect` with an error that names the fix, not only
//! "check that the broker is running". The shared Redis is not touched.
//!
//! Needs the `redis-server` binary. Without it the test prints one `skipped:` line and passes, unless
//! AGENTCOMM_REQUIRE_BROKERS=1.

mod common;

use std::time::Duration;

use agentcomm_redis::RedisRouter;
use common::*;

const PASSWORD: &str = "auth-test-secret";

/// The error of a connection Redis must refuse (one attempt, bounded).
async fn refused(url: &str) -> String {
    let error = within(
        Duration::from_secs(20),
        "the refused connection",
        RedisRouter::builder(url)
            .connect_timeout(Duration::from_secs(3))
            .max_reconnect_attempts(Some(0))
            .connect(),
    )
    .await
    .expect_err("Redis must refuse this login");
    error.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_wrong_password_is_an_error_that_names_the_url_password() {
    if let Some(reason) = servers::missing_tools() {
        servers::skip(&reason);
        return;
    }
    let port = servers::free_ports(1)[0];
    let _server = servers::start(
        servers::server_dir("auth"),
        port,
        &[
            "--port".into(),
            port.to_string(),
            "--requirepass".into(),
            PASSWORD.into(),
        ],
    )
    .expect("a redis-server with a password");

    for (url, what) in [
        (format!("redis://127.0.0.1:{port}"), "NOAUTH"),
        (
            format!("redis://:wrong-{PASSWORD}@127.0.0.1:{port}"),
            "WRONGPASS",
        ),
        (
            format!("redis://nobody:{PASSWORD}@127.0.0.1:{port}"),
            "WRONGPASS",
        ),
    ] {
        let text = refused(&url).await;
        println!("refused as expected: {text}");
        assert!(text.contains(what), "Redis's own reason is kept: {text}");
        assert!(
            text.contains("Redis refused the login") && text.contains("redis://:password@host"),
            "the error must name the fix (the password in the URL): {text}"
        );
        assert!(!text.contains(".."), "no doubled full stop: {text}");
        assert!(!text.contains(PASSWORD), "the password leaked: {text}");
    }

    let router = within(
        Duration::from_secs(20),
        "the accepted connection",
        RedisRouter::connect(format!("redis://:{PASSWORD}@127.0.0.1:{port}")),
    )
    .await
    .expect("the right password connects");
    agentcomm_core::router::Router::close(&router)
        .await
        .expect("close");
}
