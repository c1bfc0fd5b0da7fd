//! A Redis that requires a password, started by the test on loopback (`--requirepass`): a URL without
//! the password, or with a wrong one, fails `connect` with an error that names the fix, not only
//! "check that the broker is running". The shared Redis is not touched.
//!
//! Needs the `redis-server` binary. Without it the test prints one `skipped:` line and passes, unless
//! AGENTCOMM_REQUIRE_BROKERS=1.

use std::time::Duration;

use crate::common::*;
use agentcomm_redis::RedisRouter;

const PASSWORD: &str = "auth-test-secret";

/// A redis-server of its own on a free loopback port (its files in `name`'s directory), requiring
/// [`PASSWORD`]: the port, and the server, which stops when dropped.
fn password_server(name: &str) -> (u16, servers::Spawned) {
    let port = servers::free_ports(1)[0];
    let server = servers::start(
        servers::server_dir(name),
        port,
        &[
            "--port".into(),
            port.to_string(),
            "--requirepass".into(),
            PASSWORD.into(),
        ],
    )
    .expect("a redis-server with a password");
    (port, server)
}

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
    let (port, _server) = password_server("auth");

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
        assert!(
            !text.contains("cannot reach") && !text.contains("Check that the broker is running"),
            "Redis answered: the error must not say it could not be reached: {text}"
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

/// A password changed on the server while a router runs (a rotation, an ACL change): once its
/// connections are cut, every reconnection is refused. Health says so, naming the fix, and shows
/// neither password. Before, it said "Redis does not answer ... check that it is running and
/// reachable", although Redis answered every attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_names_a_login_refused_on_reconnection() {
    if let Some(reason) = servers::missing_tools() {
        servers::skip(&reason);
        return;
    }
    const ROTATED: &str = "auth-test-rotated";
    let (port, _server) = password_server("auth-rotated");
    let router = within(
        Duration::from_secs(20),
        "the connection",
        RedisRouter::builder(format!("redis://:{PASSWORD}@127.0.0.1:{port}"))
            .prefix(unique_prefix())
            .command_timeout(Duration::from_secs(2))
            .connect(),
    )
    .await
    .expect("the right password connects");
    let cli = |password: &str, command: &[&str]| {
        let mut args: Vec<String> = ["-p", &port.to_string(), "-a", password, "--no-auth-warning"]
            .iter()
            .map(|arg| arg.to_string())
            .collect();
        args.extend(command.iter().map(|arg| arg.to_string()));
        let output = servers::redis_cli(&args, Duration::from_secs(5)).expect("redis-cli");
        assert!(output.status.success(), "redis-cli {command:?}: {output:?}");
    };
    cli(PASSWORD, &["CONFIG", "SET", "requirepass", ROTATED]);
    cli(ROTATED, &["CLIENT", "KILL", "TYPE", "normal"]);
    eventually(
        Duration::from_secs(10),
        "health to name the refused login",
        async || {
            let health = agentcomm_core::router::Router::health(&router).await;
            assert!(
                !health.detail.contains(PASSWORD) && !health.detail.contains(ROTATED),
                "{}",
                health.detail
            );
            health.status == agentcomm_core::router::HealthStatus::Unhealthy
                && health.detail.contains("WRONGPASS")
                && health
                    .detail
                    .contains("put the password it requires now in the URL")
        },
    )
    .await;
    let _ = within(
        Duration::from_secs(20),
        "close",
        agentcomm_core::router::Router::close(&router),
    )
    .await;
}
