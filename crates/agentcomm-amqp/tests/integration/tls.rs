//! `amqps://` against a real TLS endpoint: the test runs a TLS terminator on loopback (a certificate made
//! for the test) in front of the real RabbitMQ (RABBITMQ_URL), so the client's TLS handshake, certificate
//! check and AMQP over TLS are all real; the shared broker keeps its configuration.

use std::time::Duration;

use crate::common::*;
use agentcomm_amqp::AmqpRouter;
use agentcomm_core::envelope::Envelope;
use agentcomm_core::prelude::*;
use agentcomm_core::router::{PublishOutcome, SubscribeOptions};

/// A TLS listener on 127.0.0.1 that forwards what it decrypts to the broker; stops when dropped.
struct TlsTerminator {
    port: u16,
    /// The listener's certificate (self-signed, for 127.0.0.1), PEM, in a file for `cacertfile`.
    ca_file: std::path::PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.ca_file);
    }
}

/// A terminator whose certificate names 127.0.0.1.
async fn tls_terminator() -> TlsTerminator {
    tls_terminator_for("127.0.0.1").await
}

/// A terminator whose certificate names only `name`.
async fn tls_terminator_for(name: &str) -> TlsTerminator {
    tls_terminator_to(name, broker_address()).await
}

/// A terminator whose certificate names only `name`, forwarding to `upstream` (`host:port`).
async fn tls_terminator_to(name: &str, upstream: String) -> TlsTerminator {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec![name.to_string()]).expect("certificate");
    let ca_file = std::env::temp_dir().join(format!("{}.pem", unique("agentcomm-amqps-ca")));
    std::fs::write(&ca_file, cert.pem()).expect("write the certificate");
    let key = rustls::pki_types::PrivateKeyDer::try_from(signing_key.serialize_der())
        .expect("the test key");
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .expect("a TLS server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let broker = upstream;
    let task = tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let broker = broker.clone();
            tokio::spawn(async move {
                // A client that refuses the certificate ends the handshake: nothing to forward.
                let Ok(mut tls) = acceptor.accept(inbound).await else {
                    return;
                };
                let Ok(mut upstream) = tokio::net::TcpStream::connect(&broker).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
            });
        }
    });
    TlsTerminator {
        port,
        ca_file,
        task,
    }
}

/// Fails if `text` shows the password of the test URL (as written, or percent-decoded) in clear; when
/// the URL has one, it must appear as `***`. A URL without a password (the client then logs in as
/// guest) has nothing to hide.
fn assert_password_hidden(text: &str) {
    let plain = url();
    let authority = plain
        .split_once("://")
        .map_or(plain.as_str(), |(_, rest)| rest)
        .split(['/', '?'])
        .next()
        .unwrap_or_default();
    let Some((user, password)) = authority
        .rsplit_once('@')
        .and_then(|(credentials, _)| credentials.split_once(':'))
        .filter(|(_, password)| !password.is_empty())
    else {
        return;
    };
    assert!(
        text.contains(":***@"),
        "the URL is shown with its password masked: {text}"
    );
    for shown in [password.to_string(), percent_decoded(password)] {
        if shown != user {
            assert!(!text.contains(&shown), "the password leaked: {text}");
        }
    }
}

/// `text` with its `%XX` escapes decoded (as a URL's password is before use).
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let escaped = (bytes[at] == b'%')
            .then(|| text.get(at + 1..at + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                at += 3;
            }
            None => {
                out.push(bytes[at]);
                at += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The test broker's URL as `amqps://` to the terminator, with `query` added.
fn amqps_url(terminator: &TlsTerminator, query: &str) -> String {
    let plain = url();
    let rest = plain.split_once("://").map_or(plain.as_str(), |(_, r)| r);
    let rest = rest.replacen(
        &broker_address(),
        &format!("127.0.0.1:{}", terminator.port),
        1,
    );
    let separator = if rest.contains('?') { '&' } else { '?' };
    format!("amqps://{rest}{separator}{query}")
}

/// The error of connecting to `url`, which TLS must refuse.
async fn refused(url: &str) -> String {
    let error = within(
        "the refused connection",
        AmqpRouter::builder(url)
            .exchange(unique("t-tls-refused"))
            .connect(),
    )
    .await
    .expect_err("TLS must refuse this server's certificate");
    let text = error.to_string();
    println!("refused as expected: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_amqps_url_with_its_ca_publishes_and_consumes_over_tls() {
    if !broker_available().await {
        return;
    }
    let terminator = tls_terminator().await;
    let exchange = unique("t-tls");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let url = amqps_url(
        &terminator,
        &format!("cacertfile={}", terminator.ca_file.display()),
    );
    let router = within(
        "connect over TLS",
        AmqpRouter::builder(&url)
            .exchange(&exchange)
            .confirm_timeout(Duration::from_secs(10))
            .connect(),
    )
    .await
    .unwrap_or_else(|e| panic!("amqps:// with cacertfile: {e}"));
    let mut subscription = within(
        "subscribe",
        router.subscribe(SubscribeOptions::new(
            ChannelPattern::parse("Payment:*:*").unwrap(),
        )),
    )
    .await
    .unwrap();
    let sent = Envelope::new(
        parse_channel("Payment:request:s1").unwrap(),
        "application/json",
        br#"{"amount":3}"#.to_vec(),
    );
    let outcome = within("publish", router.publish(sent.clone()))
        .await
        .unwrap();
    assert_eq!(outcome, PublishOutcome::Accepted);
    let delivery = within("a delivery", subscription.next())
        .await
        .expect("a delivery");
    assert_eq!(delivery.envelope().id(), sent.id());
    assert_eq!(delivery.envelope().payload(), sent.payload());
    within("ack", delivery.ack()).await.unwrap();
    assert!(within("health", router.health()).await.connected);
    within("close", router.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_amqps_url_without_the_ca_is_refused_with_a_clear_error() {
    if !broker_available().await {
        return;
    }
    let terminator = tls_terminator().await;
    // The system's roots, which do not vouch for the test's certificate.
    let url = amqps_url(&terminator, "connection_timeout=3000");
    let text = refused(&url).await;
    assert!(
        text.contains(&format!("127.0.0.1:{}", terminator.port)),
        "the error names the server: {text}"
    );
    assert_password_hidden(&text);
    assert!(
        text.contains("TLS certificate is not trusted") && text.contains("cacertfile="),
        "the error says what is wrong and how to fix it: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_names_the_fix_and_the_fix_works() {
    if !broker_available().await {
        return;
    }
    // Trusted (cacertfile), but issued for another name than the URL's host.
    let terminator = tls_terminator_for("agentcomm.invalid").await;
    let ca = format!("cacertfile={}", terminator.ca_file.display());
    let text = refused(&amqps_url(
        &terminator,
        &format!("{ca}&connection_timeout=3000"),
    ))
    .await;
    assert!(
        text.contains("does not name the host") && text.contains("server_name_indication"),
        "the error says the name is wrong and how to connect anyway: {text}"
    );
    assert_password_hidden(&text);
    // The fix it names: verify the certificate against the name it was issued for.
    let exchange = unique("t-tls-sni");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let router = within(
        "connect with server_name_indication",
        AmqpRouter::builder(amqps_url(
            &terminator,
            &format!("{ca}&server_name_indication=agentcomm.invalid"),
        ))
        .exchange(&exchange)
        .connect(),
    )
    .await
    .unwrap_or_else(|e| panic!("amqps:// with server_name_indication: {e}"));
    let outcome = within(
        "publish",
        router.publish(Envelope::new(
            parse_channel("Payment:request:s1").unwrap(),
            "application/json",
            b"{}".to_vec(),
        )),
    )
    .await
    .unwrap();
    // No queue is bound: the broker took it and said so.
    assert_eq!(outcome, PublishOutcome::Unroutable);
    within("close", router.close()).await.unwrap();
}

/// A self-signed client certificate and its key, written to files for a URL's `certfile=` and
/// `keyfile=`; the files are removed when it is dropped.
struct ClientCertificate {
    cert_file: std::path::PathBuf,
    key_file: std::path::PathBuf,
}

impl ClientCertificate {
    fn new() -> Self {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["agentcomm-client".to_string()])
                .expect("a client certificate");
        let name = unique("agentcomm-client");
        let cert_file = std::env::temp_dir().join(format!("{name}.pem"));
        let key_file = std::env::temp_dir().join(format!("{name}.key"));
        std::fs::write(&cert_file, cert.pem()).expect("write the client certificate");
        std::fs::write(&key_file, signing_key.serialize_pem()).expect("write the client key");
        Self {
            cert_file,
            key_file,
        }
    }

    /// `certfile=..&keyfile=..`
    fn url_parameters(&self) -> String {
        format!(
            "certfile={}&keyfile={}",
            self.cert_file.display(),
            self.key_file.display()
        )
    }
}

impl Drop for ClientCertificate {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.cert_file);
        let _ = std::fs::remove_file(&self.key_file);
    }
}

/// `auth_mechanism=external` logs in with the client certificate (SASL EXTERNAL), never with a
/// user name and password. It was taken as another client's parameter and ignored: the router
/// logged in with PLAIN as guest/guest (the URL named no user), and connected as a user the
/// operator never meant it to be. The test broker does not offer EXTERNAL, so the connection must
/// be refused, naming the mechanism and what the broker needs for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_mechanism_external_logs_in_with_the_certificate_not_as_guest() {
    if !broker_available().await {
        return;
    }
    let terminator = tls_terminator().await;
    let client = ClientCertificate::new();
    // The broker's user and password left out, as for a certificate login.
    let authority = format!("127.0.0.1:{}", terminator.port);
    let url = format!(
        "amqps://{authority}/%2f?cacertfile={}&{}&auth_mechanism=external&connection_timeout=3000",
        terminator.ca_file.display(),
        client.url_parameters(),
    );
    let exchange = unique("t-tls-external");
    let _cleanup = Cleanup::new(&exchange, &[]);
    let connected = within(
        "connect with auth_mechanism=external",
        AmqpRouter::builder(&url).exchange(&exchange).connect(),
    )
    .await;
    drop(client);
    let text = match connected {
        Ok(router) => {
            let _ = within("close", router.close()).await;
            panic!("connected without EXTERNAL, which the test broker does not offer: as guest");
        }
        Err(error) => error.to_string(),
    };
    assert!(
        text.contains("EXTERNAL") && text.contains("rabbitmq_auth_mechanism_ssl"),
        "the error names the mechanism and what RabbitMQ needs for it: {text}"
    );
}

/// A broker on 127.0.0.1 that offers EXTERNAL and PLAIN, then drops the connection after the
/// client's answer, as RabbitMQ does on a refused login (amqprs does not ask to be told why). Its
/// `host:port`; it stops with the test's runtime.
async fn broker_refusing_every_login() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    after_protocol_header(|mut socket| async move {
        if socket
            .write_all(&connection_start("EXTERNAL PLAIN"))
            .await
            .is_err()
        {
            return;
        }
        // The start-ok, then the login is refused: the connection is dropped.
        let mut answer = [0u8; 1024];
        let _ = socket.read(&mut answer).await;
    })
    .await
}

/// A certificate login RabbitMQ refuses (the certificate names no user it knows) was reported with
/// the hint for a password login: "check the user name and password", neither of which EXTERNAL
/// sends, and "or the port speaks TLS and the URL is amqp://", with an amqps:// URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_certificate_login_names_the_certificate_s_user_not_a_password() {
    let terminator = tls_terminator_to("127.0.0.1", broker_refusing_every_login().await).await;
    let client = ClientCertificate::new();
    let url = format!(
        "amqps://127.0.0.1:{}/%2f?cacertfile={}&{}&auth_mechanism=external&connection_timeout=3000",
        terminator.port,
        terminator.ca_file.display(),
        client.url_parameters(),
    );
    let connected = within("a refused certificate login", AmqpRouter::connect(&url)).await;
    drop(client);
    let text = connected.map(|_| ()).unwrap_err().to_string();
    assert!(
        text.contains(
            "with auth_mechanism=external RabbitMQ logs in the user the client certificate names"
        ),
        "{text}"
    );
    assert!(!text.contains("check the user name and password"), "{text}");
    assert!(!text.contains("the URL is amqp://"), "{text}");
}
