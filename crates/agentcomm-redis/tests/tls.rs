//! `rediss://` against a real Redis speaking TLS: each test starts its own `redis-server` with a TLS
//! port on loopback (a certificate made for the test, no plain port) and stops it at the end. The
//! shared Redis is not touched.
//!
//! Needs the `redis-server` binary (Debian's redis-server is built with TLS). Without it the tests print
//! one `skipped:` line and pass, unless AGENTCOMM_REQUIRE_BROKERS=1.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agentcomm_core::envelope::Envelope;
use agentcomm_core::prelude::*;
use agentcomm_core::router::{PublishOutcome, SubscribeOptions};
use agentcomm_redis::{DeliveryMode, RedisRouter};
use common::*;

/// A `redis-server` with only a TLS port, on 127.0.0.1; killed when dropped.
struct TlsRedis {
    child: Child,
    port: u16,
    /// The server's certificate (self-signed, for 127.0.0.1), DER.
    certificate: Vec<u8>,
    dir: PathBuf,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts a TLS Redis, or says why it cannot (no `redis-server`): prints the `skipped:` line, or fails
/// with AGENTCOMM_REQUIRE_BROKERS=1.
async fn start_tls_redis() -> Option<TlsRedis> {
    let missing = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .map(|status| !status.success())
        .unwrap_or(true);
    if missing {
        let reason =
            "no redis-server binary to start a TLS Redis with (apt-get install redis-server)";
        if std::env::var("AGENTCOMM_REQUIRE_BROKERS").is_ok_and(|v| v.trim() == "1") {
            panic!("AGENTCOMM_REQUIRE_BROKERS=1, but {reason}");
        }
        println!("skipped: {reason}");
        return None;
    }
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("certificate");
    let dir = std::env::temp_dir().join(format!("agentcomm-tls-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    let cert_file = dir.join("redis.crt");
    let key_file = dir.join("redis.key");
    std::fs::write(&cert_file, cert.pem()).expect("write the certificate");
    std::fs::write(&key_file, signing_key.serialize_pem()).expect("write the key");
    // A port the system just handed out; free again when the listener is dropped.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new("redis-server")
        .args(["--port", "0", "--bind", "127.0.0.1"])
        .args(["--tls-port", &port.to_string()])
        .arg("--tls-cert-file")
        .arg(&cert_file)
        .arg("--tls-key-file")
        .arg(&key_file)
        .arg("--tls-ca-cert-file")
        .arg(&cert_file)
        .args(["--tls-auth-clients", "no"])
        .args(["--requirepass", "tls-secret"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("start redis-server");
    let server = TlsRedis {
        child,
        port,
        certificate: cert.der().to_vec(),
        dir,
    };
    eventually(
        Duration::from_secs(10),
        "the TLS Redis to listen",
        async || {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        },
    )
    .await;
    Some(server)
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rediss_url_carries_messages_over_tls_in_both_modes() {
    let Some(server) = start_tls_redis().await else {
        return;
    };
    let url = format!("rediss://:tls-secret@127.0.0.1:{}", server.port);
    for mode in [DeliveryMode::PubSub, DeliveryMode::Streams] {
        let router = connected(
            RedisRouter::builder(&url)
                .mode(mode)
                .prefix(unique_prefix())
                .read_block(Duration::from_millis(500))
                .tls_connector(trusting(&server.certificate)),
        )
        .await;
        let mut subscription = within(
            Duration::from_secs(10),
            "subscribing",
            router.subscribe(match mode {
                DeliveryMode::Streams => {
                    SubscribeOptions::new(ChannelPattern::parse("Payment:*:*").unwrap())
                        .group("payments")
                }
                _ => SubscribeOptions::new(ChannelPattern::parse("Payment:*:*").unwrap()),
            }),
        )
        .await
        .unwrap_or_else(|e| panic!("{mode:?}: subscribe over TLS: {e}"));
        let sent = Envelope::new(
            parse_channel("Payment:request:s1").unwrap(),
            "application/json",
            br#"{"amount":12.5}"#.to_vec(),
        );
        let outcome = within(
            Duration::from_secs(10),
            "publishing",
            router.publish(sent.clone()),
        )
        .await
        .unwrap_or_else(|e| panic!("{mode:?}: publish over TLS: {e}"));
        // pub/sub counts the subscribers that got it; a stream stores it.
        assert!(
            matches!(
                (mode, outcome),
                (DeliveryMode::PubSub, PublishOutcome::Delivered(1))
                    | (DeliveryMode::Streams, PublishOutcome::Accepted)
            ),
            "{mode:?}: {outcome:?}"
        );
        let delivery = next(&mut subscription).await;
        assert_eq!(delivery.envelope().id(), sent.id(), "{mode:?}");
        assert_eq!(delivery.envelope().payload(), sent.payload(), "{mode:?}");
        within(Duration::from_secs(10), "acking", delivery.ack())
            .await
            .unwrap();
        let health = within(Duration::from_secs(10), "health", router.health()).await;
        assert!(health.connected, "{mode:?}: {health:?}");
        within(Duration::from_secs(10), "closing", router.close())
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_a_clear_error_without_the_password() {
    let Some(server) = start_tls_redis().await else {
        return;
    };
    let url = format!("rediss://:tls-secret@127.0.0.1:{}", server.port);
    // The system's roots, which do not include the test's self-signed certificate.
    let error = within(
        Duration::from_secs(20),
        "the refused connection",
        RedisRouter::builder(&url)
            .connect_timeout(Duration::from_secs(3))
            .max_reconnect_attempts(Some(0))
            .connect(),
    )
    .await
    .expect_err("a certificate nobody vouches for must be refused");
    let text = error.to_string();
    println!("refused as expected: {text}");
    assert!(
        text.contains(&format!("127.0.0.1:{}", server.port)),
        "the error names the server: {text}"
    );
    assert!(!text.contains("tls-secret"), "the password leaked: {text}");
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
