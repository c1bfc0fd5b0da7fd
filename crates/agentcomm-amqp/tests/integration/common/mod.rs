//! Shared by the broker tests: finding RabbitMQ (skip or fail as the workspace rules say), unique
//! names, raw amqprs access, and cleanup of what a test declared.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use agentcomm_amqp::{AmqpRouter, AmqpRouterBuilder};
use agentcomm_core::config::{DEFAULT_RABBITMQ_URL, RABBITMQ_URL_VAR};
use amqprs::channel::{
    BasicGetArguments, BasicPublishArguments, Channel, ExchangeDeleteArguments,
    QueueDeleteArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};

/// Bounds every await of a test that could hang.
pub const STEP: Duration = Duration::from_secs(20);

/// `RABBITMQ_URL`, or the default.
pub fn url() -> String {
    std::env::var(RABBITMQ_URL_VAR)
        .ok()
        .filter(|url| !url.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_RABBITMQ_URL.to_string())
}

/// `host:port` of the broker URL.
pub fn broker_address() -> String {
    address_of(&url())
}

/// `host:port` of an AMQP URL, port 5672 when it names none. The port is after the last `:` outside
/// an IPv6 literal's brackets: `amqp://[::1]` has none.
pub fn address_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host_port
        .rsplit_once(':')
        .is_some_and(|(_, port)| !port.contains(']'))
    {
        host_port.to_string()
    } else {
        format!("{host_port}:5672")
    }
}

/// `url` pointing at `address` (a fault proxy) instead of its host and port, credentials and vhost
/// kept; also when the URL names no port (`amqp://guest:guest@localhost/%2f`), whose `host:port`
/// from [`broker_address`] does not appear in it as text.
pub fn through(url: &str, address: std::net::SocketAddr) -> String {
    agentcomm_testkit::proxy::url_through(url, address)
}

/// Whether RabbitMQ answers; when it does not, prints the one skip line, or panics when
/// `AGENTCOMM_REQUIRE_BROKERS=1`.
pub async fn broker_available() -> bool {
    let address = broker_address();
    let reachable = matches!(
        tokio::time::timeout(
            Duration::from_secs(3),
            tokio::net::TcpStream::connect(&address)
        )
        .await,
        Ok(Ok(_))
    );
    if reachable {
        return true;
    }
    let redacted = agentcomm_core::error::redact_url(&url());
    agentcomm_testkit::broker_unavailable(format!("no RabbitMQ at {redacted}"));
    false
}

/// A name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// A builder on the test broker with a unique exchange and short timeouts.
pub fn builder(exchange: &str) -> AmqpRouterBuilder {
    AmqpRouter::builder(url())
        .exchange(exchange)
        .confirm_timeout(Duration::from_secs(10))
        .publish_outage_timeout(Duration::from_secs(15))
        .close_timeout(Duration::from_secs(5))
}

/// Awaits `future` within [`STEP`], failing the test with `what` otherwise.
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(STEP, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {STEP:?} waiting for {what}"),
    }
}

/// Waits until `condition` holds, failing the test with `what` after [`STEP`].
pub async fn wait_until(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + STEP;
    while tokio::time::Instant::now() < deadline {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out after {STEP:?} waiting for {what}");
}

/// A plain amqprs connection to the test broker, for what agentcomm does not do.
pub struct Raw {
    pub connection: Connection,
    pub channel: Channel,
}

impl Raw {
    pub async fn open() -> Raw {
        Self::try_open()
            .await
            .expect("a raw connection to RabbitMQ")
    }

    /// A raw connection, or `None` when it cannot be opened within a few seconds.
    pub async fn try_open() -> Option<Raw> {
        let url = url();
        let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
        let authority = rest.split(['/', '?']).next().unwrap_or(rest);
        let (user, password) = match authority.rsplit_once('@') {
            Some((userinfo, _)) => userinfo
                .split_once(':')
                .map(|(u, p)| (u.to_string(), p.to_string()))
                .unwrap_or((userinfo.to_string(), String::new())),
            None => ("guest".to_string(), "guest".to_string()),
        };
        let address = broker_address();
        let (host, port) = address.rsplit_once(':').expect("host:port");
        let arguments =
            OpenConnectionArguments::new(host, port.parse().expect("port"), &user, &password);
        let bound = Duration::from_secs(5);
        let connection = tokio::time::timeout(bound, Connection::open(&arguments))
            .await
            .ok()?
            .ok()?;
        let channel = tokio::time::timeout(bound, connection.open_channel(None))
            .await
            .ok()?
            .ok()?;
        Some(Raw {
            connection,
            channel,
        })
    }

    /// Publishes raw bytes (no confirm needed: a get or a consumer follows).
    pub async fn publish(&self, exchange: &str, routing_key: &str, body: &[u8]) {
        self.channel
            .basic_publish(
                amqprs::BasicProperties::default(),
                body.to_vec(),
                BasicPublishArguments::new(exchange, routing_key),
            )
            .await
            .expect("raw publish");
    }

    /// Takes one message from `queue` (acknowledged), waiting up to [`STEP`] for one to arrive.
    pub async fn get(&self, queue: &str) -> Option<(amqprs::BasicProperties, Vec<u8>)> {
        let deadline = tokio::time::Instant::now() + STEP;
        while tokio::time::Instant::now() < deadline {
            let mut arguments = BasicGetArguments::new(queue);
            arguments.no_ack = true;
            if let Some((_, properties, body)) =
                within("basic.get", self.channel.basic_get(arguments))
                    .await
                    .expect("basic.get")
            {
                return Some((properties, body));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// How many messages `queue` holds (passive declare), `None` when it does not exist.
    pub async fn count(&self, queue: &str) -> Option<u32> {
        self.passive_declare(queue).await.map(|(count, _)| count)
    }

    /// How many consumers `queue` has (passive declare), `None` when it does not exist.
    pub async fn consumers(&self, queue: &str) -> Option<u32> {
        self.passive_declare(queue)
            .await
            .map(|(_, consumers)| consumers)
    }

    /// `queue`'s message and consumer counts, `None` when it does not exist.
    async fn passive_declare(&self, queue: &str) -> Option<(u32, u32)> {
        let channel = within("a raw channel", self.connection.open_channel(None))
            .await
            .ok()?;
        let mut arguments = amqprs::channel::QueueDeclareArguments::new(queue);
        arguments.passive(true);
        let result = within("a passive declare", channel.queue_declare(arguments)).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), channel.close()).await;
        result
            .ok()
            .flatten()
            .map(|(_, count, consumers)| (count, consumers))
    }

    /// Deletes queues and the exchange's topology (`<exchange>`, `.dlx`, `.dead-letters`). Best effort,
    /// bounded, never panics (it also runs from `Drop`).
    pub async fn cleanup(&self, exchange: &str, queues: &[String]) {
        let bound = Duration::from_secs(5);
        let mut all: Vec<String> = queues.to_vec();
        all.push(format!("{exchange}.dead-letters"));
        for queue in all {
            let Ok(Ok(channel)) =
                tokio::time::timeout(bound, self.connection.open_channel(None)).await
            else {
                continue;
            };
            let _ = tokio::time::timeout(
                bound,
                channel.queue_delete(QueueDeleteArguments::new(&queue)),
            )
            .await;
            let _ = tokio::time::timeout(bound, channel.close()).await;
        }
        for name in [exchange.to_string(), format!("{exchange}.dlx")] {
            let Ok(Ok(channel)) =
                tokio::time::timeout(bound, self.connection.open_channel(None)).await
            else {
                continue;
            };
            let _ = tokio::time::timeout(
                bound,
                channel.exchange_delete(ExchangeDeleteArguments::new(&name)),
            )
            .await;
            let _ = tokio::time::timeout(bound, channel.close()).await;
        }
    }

    pub async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.connection.close()).await;
    }
}

/// Deletes a test's exchange topology and durable queues when dropped, also when the test fails
/// halfway (Drop runs while unwinding). Runs on a thread with its own runtime, since it is dropped
/// inside the test's.
pub struct Cleanup {
    exchange: String,
    queues: Vec<String>,
}

impl Cleanup {
    pub fn new(exchange: &str, queues: &[String]) -> Self {
        Cleanup {
            exchange: exchange.to_string(),
            queues: queues.to_vec(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let exchange = std::mem::take(&mut self.exchange);
        let queues = std::mem::take(&mut self.queues);
        let cleaning = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                if let Some(raw) = Raw::try_open().await {
                    raw.cleanup(&exchange, &queues).await;
                    raw.close().await;
                }
            });
        });
        let _ = cleaning.join();
    }
}

/// A server of the test's own on 127.0.0.1 that reads the AMQP protocol header of every connection
/// and hands the connection to `serve` (a fake broker, or a port that is not one). Its `host:port`;
/// it stops with the test's runtime.
pub async fn after_protocol_header<F, Fut>(serve: F) -> String
where
    F: Fn(tokio::net::TcpStream) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let serve = serve.clone();
            tokio::spawn(async move {
                let mut header = [0u8; 8];
                if socket.read_exact(&mut header).await.is_ok() {
                    serve(socket).await;
                }
            });
        }
    });
    address
}

/// An AMQP 0-9-1 method frame on channel 0 carrying `payload` (class, method, arguments), for the
/// fake brokers above.
pub fn method_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![1, 0, 0];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    frame.push(0xCE);
    frame
}

/// The frame of a connection.start offering `mechanisms` (version 0-9, no server properties).
pub fn connection_start(mechanisms: &str) -> Vec<u8> {
    let mut payload = vec![0, 10, 0, 10, 0, 9];
    payload.extend_from_slice(&0u32.to_be_bytes());
    for text in [mechanisms, "en_US"] {
        payload.extend_from_slice(&(text.len() as u32).to_be_bytes());
        payload.extend_from_slice(text.as_bytes());
    }
    method_frame(&payload)
}

/// What this test binary logged at WARN and above, captured by a global subscriber installed on
/// first use. Tests run side by side, so a test looks for lines that name its own message ids.
pub struct Logs(std::sync::Mutex<Vec<u8>>);

impl Logs {
    /// The log of this test binary from now on.
    pub fn capture() -> &'static Logs {
        static LOGS: std::sync::OnceLock<&'static Logs> = std::sync::OnceLock::new();
        LOGS.get_or_init(|| {
            let logs: &'static Logs = Box::leak(Box::new(Logs(std::sync::Mutex::new(Vec::new()))));
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::WARN)
                .with_ansi(false)
                .with_writer(move || LogWriter(logs))
                .finish();
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other global subscriber in this test binary");
            logs
        })
    }

    /// The lines that contain `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        let text = self.0.lock().expect("logs lock");
        String::from_utf8_lossy(&text)
            .lines()
            .filter(|line| line.contains(needle))
            .map(str::to_string)
            .collect()
    }
}

struct LogWriter(&'static Logs);

impl std::io::Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.0.lock().expect("logs lock").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How long one `rabbitmqctl` call may take (it starts an Erlang VM: seconds, and over a minute on a
/// loaded machine): one that hangs fails its test instead of holding the suite.
const RABBITMQCTL_LIMIT: Duration = Duration::from_secs(180);

/// Runs `rabbitmqctl` with `arguments`, killed after [`RABBITMQCTL_LIMIT`]: `Err` with what went
/// wrong when it cannot be run, fails or hangs. Never names a password: only the first argument
/// (the command) is in the error.
pub fn rabbitmqctl(arguments: &[&str]) -> Result<(), String> {
    let mut child = std::process::Command::new("rabbitmqctl")
        .args(arguments)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|error| format!("rabbitmqctl cannot be run: {error}"))?;
    let deadline = std::time::Instant::now() + RABBITMQCTL_LIMIT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "rabbitmqctl {} did not end within {RABBITMQCTL_LIMIT:?}",
                    arguments[0]
                ));
            }
            Err(error) => return Err(format!("rabbitmqctl {}: {error}", arguments[0])),
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    Err(format!(
        "rabbitmqctl {} failed ({status}): {}",
        arguments[0],
        stderr.trim()
    ))
}

/// A RabbitMQ user a test made with `rabbitmqctl`, deleted when dropped: also when the test fails
/// halfway.
pub struct ThrowawayUser {
    name: String,
}

impl ThrowawayUser {
    /// Adds `name` with `password` and every permission on the default virtual host; `None` (after
    /// the skip line; a failure with AGENTCOMM_REQUIRE_BROKERS=1) when rabbitmqctl is missing or not
    /// permitted here.
    pub fn add(name: &str, password: &str) -> Option<Self> {
        if let Err(why) = rabbitmqctl(&["add_user", name, password]) {
            agentcomm_testkit::broker_unavailable(format!("cannot add a RabbitMQ user: {why}"));
            return None;
        }
        let user = ThrowawayUser {
            name: name.to_string(),
        };
        user.permit(".*", ".*", ".*");
        Some(user)
    }

    /// Sets the user's permissions on the default virtual host (regular expressions).
    pub fn permit(&self, configure: &str, write: &str, read: &str) {
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            "/",
            &self.name,
            configure,
            write,
            read,
        ])
        .expect("permissions for the throwaway user");
    }

    /// Takes away every permission of the user on the default virtual host.
    pub fn clear_permissions(&self) {
        rabbitmqctl(&["clear_permissions", "-p", "/", &self.name]).expect("clear_permissions");
    }

    /// Gives the user another password.
    pub fn change_password(&self, password: &str) {
        rabbitmqctl(&["change_password", &self.name, password]).expect("change_password");
    }
}

impl Drop for ThrowawayUser {
    fn drop(&mut self) {
        if let Err(why) = rabbitmqctl(&["delete_user", &self.name]) {
            eprintln!("could not delete the test user {}: {why}", self.name);
        }
    }
}
