//! `rediss://` against a real Redis speaking TLS: each test starts its own `redis-server` with a TLS
//! port on loopback (a certificate made for the test, no plain port) and stops it at the end. The
//! shared Redis is not touched.
//!
//! Needs the `redis-server` binary (Debian's redis-server is built with TLS). Without it the tests print
//! one `skipped:` line and pass, unless AGENTCOMM_REQUIRE_BROKERS=1.

use std::time::Duration;

use crate::common::*;
use agentcomm_core::prelude::*;
use agentcomm_redis::RedisRouter;

/// A TLS Redis of the test's own, or `None` (with the `skipped:` line) when none can be started.
fn tls_redis() -> Option<servers::TlsRedis> {
    if let Some(reason) = servers::missing_tools() {
        servers::skip(&reason);
        return None;
    }
    Some(servers::start_tls(PASSWORD))
}

const PASSWORD: &str = "tls-secret";

/// A rustls connector that trusts only `certificate`.
fn trusting(certificate: &[u8]) -> fred::types::config::TlsConnector {
    let _ = fred::rustls::crypto::ring::default_provider().install_default();
    let mut roots = fred::rustls::RootCertStore::empty();
    roots
        .add(fred::rustls::pki_types::CertificateDer::from(
            certificate.to_vec(),
        ))
        .expect("the test certificate as a root");
    let config = fred::rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    fred::types::config::TlsConnector::from(config)
}

/// The error of a first connection that TLS must refuse (one attempt, bounded).
async fn refused(builder: agentcomm_redis::RedisRouterBuilder) -> String {
    let error = within(
        Duration::from_secs(20),
        "the refused connection",
        builder
            .connect_timeout(Duration::from_secs(3))
            .max_reconnect_attempts(Some(0))
            .connect(),
    )
    .await
    .expect_err("TLS must refuse this server's certificate");
    let text = error.to_string();
    println!("refused as expected: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rediss_url_carries_messages_over_tls_in_both_modes() {
    let Some(server) = tls_redis() else {
        return;
    };
    let url = format!("rediss://:{PASSWORD}@127.0.0.1:{}", server.server.port);
    round_trip_in_both_modes("over TLS", || {
        RedisRouter::builder(&url)
            .read_block(Duration::from_millis(500))
            .tls_connector(trusting(&server.certificate))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_a_clear_error_without_the_password() {
    let Some(server) = tls_redis() else {
        return;
    };
    let url = format!("rediss://:{PASSWORD}@127.0.0.1:{}", server.server.port);
    // The system's roots, which do not include the test's self-signed certificate.
    let text = refused(RedisRouter::builder(&url)).await;
    assert!(
        text.contains(&format!("127.0.0.1:{}", server.server.port)),
        "the error names the server: {text}"
    );
    assert!(!text.contains(PASSWORD), "the password leaked: {text}");
    assert!(
        text.contains("TLS certificate is not trusted") && text.contains("tls_connector"),
        "the error says what is wrong and how to fix it: {text}"
    );
    // The right certificate on the same URL works.
    let router = connected(
        RedisRouter::builder(&url)
            .prefix(unique_prefix())
            .tls_connector(trusting(&server.certificate)),
    )
    .await;
    within(Duration::from_secs(10), "closing", router.close())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_is_a_clear_error() {
    if let Some(reason) = servers::missing_tools() {
        servers::skip(&reason);
        return;
    }
    // Trusted, but issued for another name than the URL's host.
    let server = servers::start_tls_for(PASSWORD, "agentcomm.invalid");
    let url = format!("rediss://:{PASSWORD}@127.0.0.1:{}", server.server.port);
    let text =
        refused(RedisRouter::builder(&url).tls_connector(trusting(&server.certificate))).await;
    assert!(
        text.contains("does not name the host in the URL") && !text.contains("tls_connector"),
        "the error says the name is wrong, not that the certificate is untrusted: {text}"
    );
    assert!(!text.contains(PASSWORD), "the password leaked: {text}");
}

/// A URL whose TLS does not match the port's fails within its connect timeout with an error that
/// names the scheme to use: `redis://` to a TLS port (Redis resets the connection), `rediss://` to
/// the plain shared Redis (which waits for the rest of a handshake it reads as a command). Before,
/// they said only "Connection reset by peer" and "Request timed out".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheme_that_does_not_match_the_port_names_the_other_one() {
    let Some(server) = tls_redis() else {
        return;
    };
    if !redis_available().await {
        return;
    }
    let plain = agentcomm_testkit::proxy::loopback_address(&redis_url(), 6379)
        .expect("the shared Redis on loopback");
    // Another service (an HTTP server) on the port.
    let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other_port = other.local_addr().unwrap().port();
    let answering = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut socket, _)) = other.accept().await {
            let mut request = [0u8; 512];
            let _ = socket.read(&mut request).await;
            let _ = socket
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                .await;
        }
    });
    for (url, expected) in [
        (
            format!("redis://:{PASSWORD}@127.0.0.1:{}", server.server.port),
            "use rediss://",
        ),
        (format!("rediss://{plain}"), "use redis://"),
        (
            format!("redis://127.0.0.1:{other_port}"),
            "does not answer as Redis does",
        ),
        (
            format!("rediss://127.0.0.1:{other_port}"),
            "does not answer TLS",
        ),
    ] {
        let started = std::time::Instant::now();
        let error = within(
            Duration::from_secs(10),
            "the refused connection",
            RedisRouter::builder(&url)
                .connect_timeout(Duration::from_secs(1))
                .connect(),
        )
        .await
        .expect_err("the scheme does not match the port");
        assert!(started.elapsed() < Duration::from_secs(4), "{url}");
        let text = error.to_string();
        assert!(text.contains(expected), "{url}: {text}");
        assert!(!text.contains(PASSWORD), "the password leaked: {text}");
    }
    answering.abort();
}
