//! The connection and what hangs on it: opening (with TLS), declaring the topology, watching for a
//! lost connection, reconnecting with backoff, and the shared state every publish and consumer reads.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use amqprs::channel::{
    Channel, ExchangeDeclareArguments, QueueBindArguments, QueueDeclareArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::security::SecurityCredentials;
use amqprs::{FieldTable, FieldValue};
use tokio::sync::watch;
use tokio::time::Instant;

use agentcomm_core::error::{Error, Result};

use crate::builder::{QueueType, Settings};
use crate::publisher::Publisher;
use crate::topology::DEAD_LETTER_BINDING;

/// The backend name in errors, logs and health.
pub(crate) const BACKEND: &str = "rabbitmq";

/// Where the connection is.
#[derive(Clone)]
pub(crate) enum LinkState {
    /// Not connected; `attempt` reconnection attempts failed so far.
    Connecting {
        attempt: u32,
        last_error: Arc<str>,
        since: Instant,
    },
    /// Connected.
    Connected(Live),
    /// The router was closed.
    Closed,
}

/// A live connection and its generation (1 for the first, +1 per reconnect).
#[derive(Clone)]
pub(crate) struct Live {
    pub connection: Connection,
    pub generation: u64,
}

/// Every counter the router reports in its health.
#[derive(Default)]
pub(crate) struct Counters {
    pub published: AtomicU64,
    pub confirmed: AtomicU64,
    pub publish_nacks: AtomicU64,
    pub unroutable: AtomicU64,
    pub returned: Arc<AtomicU64>,
    pub resent: AtomicU64,
    pub confirm_timeouts: AtomicU64,
    pub publish_failures: AtomicU64,
    pub connection_losses: AtomicU64,
    pub reconnects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub delivered: AtomicU64,
    pub acked: AtomicU64,
    pub requeued: AtomicU64,
    pub retried: AtomicU64,
    pub abandoned: AtomicU64,
    pub stale: AtomicU64,
    pub stale_discarded: AtomicU64,
    pub malformed: AtomicU64,
    pub consumers_restored: AtomicU64,
    pub fan_out_queues_lost: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A channel used for declarations, bindings and deletions, with the reason the broker gave if it
/// closed it.
pub(crate) struct OpChannel {
    pub channel: Channel,
    pub generation: u64,
    pub reason: Reason,
}

/// The reason a channel was closed or a consumer cancelled by the broker, recorded by its callback.
pub(crate) type Reason = Arc<Mutex<Option<String>>>;

/// The callback of channels that do not publish: records why the broker closed the channel or
/// cancelled its consumer.
pub(crate) struct ReasonCallback {
    pub reason: Reason,
}

#[async_trait::async_trait]
impl amqprs::callbacks::ChannelCallback for ReasonCallback {
    async fn close(
        &mut self,
        _channel: &Channel,
        close: amqprs::CloseChannel,
    ) -> std::result::Result<(), amqprs::error::Error> {
        *self.reason.lock().expect("reason lock") =
            Some(format!("{} {}", close.reply_code(), close.reply_text()));
        Ok(())
    }

    async fn cancel(
        &mut self,
        _channel: &Channel,
        cancel: amqprs::Cancel,
    ) -> std::result::Result<(), amqprs::error::Error> {
        *self.reason.lock().expect("reason lock") = Some(format!(
            "the broker cancelled consumer {} (its queue was deleted?)",
            cancel.consumer_tag()
        ));
        Ok(())
    }

    async fn flow(
        &mut self,
        _channel: &Channel,
        active: bool,
    ) -> std::result::Result<bool, amqprs::error::Error> {
        Ok(active)
    }

    async fn publish_ack(&mut self, _channel: &Channel, _ack: amqprs::Ack) {}

    async fn publish_nack(&mut self, _channel: &Channel, _nack: amqprs::Nack) {}

    async fn publish_return(
        &mut self,
        _channel: &Channel,
        _ret: amqprs::Return,
        _properties: amqprs::BasicProperties,
        _content: Vec<u8>,
    ) {
    }
}

/// The connection callback: records blocked/unblocked notifications (memory or disk alarms).
struct LinkCallback {
    blocked: Arc<Mutex<Option<String>>>,
}

#[async_trait::async_trait]
impl amqprs::callbacks::ConnectionCallback for LinkCallback {
    async fn close(
        &mut self,
        _connection: &Connection,
        close: amqprs::Close,
    ) -> std::result::Result<(), amqprs::error::Error> {
        tracing::warn!(reason = %close, "RabbitMQ closed the connection");
        Ok(())
    }

    async fn blocked(&mut self, _connection: &Connection, reason: String) {
        tracing::warn!(reason = %reason, "RabbitMQ blocked the connection: publishes wait until it is unblocked");
        *self.blocked.lock().expect("blocked lock") = Some(reason);
    }

    async fn unblocked(&mut self, _connection: &Connection) {
        tracing::info!("RabbitMQ unblocked the connection");
        *self.blocked.lock().expect("blocked lock") = None;
    }

    async fn secret_updated(&mut self, _connection: &Connection) {}
}

/// The shared state of a router.
pub(crate) struct Inner {
    pub settings: Settings,
    pub state: watch::Sender<LinkState>,
    /// The generation of the live connection, 0 while disconnected (read on every publish).
    pub connected: AtomicU64,
    next_generation: AtomicU64,
    /// The publishing channel of the live connection (read on every publish, so not an async lock).
    pub publisher: Mutex<Option<Arc<Publisher>>>,
    /// Held while a publishing channel is being opened.
    pub opening_publisher: tokio::sync::Mutex<()>,
    pub topology: tokio::sync::Mutex<Option<OpChannel>>,
    /// Retry queues declared on the live connection, with when they were declared.
    pub retry_queues: Mutex<HashMap<String, Instant>>,
    pub subscriptions: Mutex<Vec<Weak<crate::consumer::SubShared>>>,
    /// Durable queues this router declared (dead-letter, group and retry queues).
    pub declared_queues: Mutex<std::collections::BTreeSet<String>>,
    pub tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    pub next_subscription: AtomicU64,
    pub counters: Counters,
    pub closing: AtomicBool,
    pub stop: watch::Sender<bool>,
    pub blocked: Arc<Mutex<Option<String>>>,
}

impl Inner {
    pub(crate) fn new(settings: Settings) -> Self {
        Inner {
            settings,
            state: watch::Sender::new(LinkState::Connecting {
                attempt: 0,
                last_error: Arc::from("not connected yet"),
                since: Instant::now(),
            }),
            connected: AtomicU64::new(0),
            next_generation: AtomicU64::new(1),
            publisher: Mutex::new(None),
            opening_publisher: tokio::sync::Mutex::new(()),
            topology: tokio::sync::Mutex::new(None),
            retry_queues: Mutex::new(HashMap::new()),
            subscriptions: Mutex::new(Vec::new()),
            declared_queues: Mutex::new(std::collections::BTreeSet::new()),
            tasks: Mutex::new(Vec::new()),
            next_subscription: AtomicU64::new(1),
            counters: Counters::default(),
            closing: AtomicBool::new(false),
            stop: watch::Sender::new(false),
            blocked: Arc::new(Mutex::new(None)),
        }
    }

    /// An [`Error::Connection`] naming the URL without its password.
    pub(crate) fn connection_error(&self, message: impl AsRef<str>) -> Error {
        Error::Connection {
            backend: BACKEND,
            url: self.settings.url.redacted.clone(),
            message: self.settings.url.scrub(message.as_ref()),
        }
    }

    /// An [`Error::Backend`] with the password scrubbed from the message.
    pub(crate) fn backend_error(&self, message: impl AsRef<str>) -> Error {
        Error::Backend {
            backend: BACKEND,
            message: self.settings.url.scrub(message.as_ref()),
        }
    }

    pub(crate) fn closed_error() -> Error {
        Error::Closed {
            what: "the RabbitMQ router",
            hint: "it was closed; connect a new AmqpRouter",
        }
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// The live connection; while reconnecting, waits until `deadline` (forever when `None`).
    pub(crate) async fn wait_connected(&self, deadline: Option<Instant>) -> Result<Live> {
        let mut state = self.state.subscribe();
        loop {
            let last = match &*state.borrow_and_update() {
                LinkState::Connected(live) => return Ok(live.clone()),
                LinkState::Closed => return Err(Self::closed_error()),
                LinkState::Connecting {
                    attempt,
                    last_error,
                    since,
                } => (*attempt, last_error.clone(), *since),
            };
            let changed = state.changed();
            let result = match deadline {
                Some(deadline) => match tokio::time::timeout_at(deadline, changed).await {
                    Ok(result) => result,
                    Err(_) => {
                        let (attempt, last_error, since) = last;
                        return Err(self.connection_error(format!(
                            "no connection for {:.1?} (reconnecting: {attempt} attempts failed, last: {last_error}); gave up after {:?}",
                            since.elapsed(),
                            self.settings.publish_outage_timeout
                        )));
                    }
                },
                None => changed.await,
            };
            if result.is_err() {
                return Err(Self::closed_error());
            }
        }
    }

    /// Opens a connection and declares the topology; returns it with its generation.
    pub(crate) async fn establish(&self) -> Result<Live> {
        let settings = &self.settings;
        let url = &settings.url;
        let mut arguments =
            OpenConnectionArguments::new(&url.host, url.port, &url.user, &url.password);
        arguments
            .virtual_host(&url.vhost)
            .heartbeat(settings.heartbeat)
            .connection_name(&settings.connection_name)
            .credentials(SecurityCredentials::new_plain(&url.user, &url.password));
        if url.tls {
            #[cfg(feature = "tls")]
            {
                arguments
                    .scheme("amqps")
                    .tls_adaptor(crate::tls::adaptor(url).map_err(|e| self.connection_error(e))?);
            }
            #[cfg(not(feature = "tls"))]
            return Err(self.connection_error(
                "amqps:// needs the `tls` feature of agentcomm-amqp (on by default); enable it or use amqp://",
            ));
        }
        let connection = match tokio::time::timeout(
            settings.connect_timeout,
            Connection::open(&arguments),
        )
        .await
        {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => return Err(self.connection_error(describe_open_error(&error))),
            Err(_) => {
                return Err(self.connection_error(format!(
                    "the connection did not open within {:?}",
                    settings.connect_timeout
                )));
            }
        };
        connection
            .register_callback(LinkCallback {
                blocked: self.blocked.clone(),
            })
            .await
            .map_err(|e| self.connection_error(e.to_string()))?;
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let live = Live {
            connection,
            generation,
        };
        let declared = async {
            let topology = self.open_op_channel(&live).await?;
            self.declare_topology(&topology).await?;
            *self.topology.lock().await = Some(topology);
            Ok::<_, Error>(())
        }
        .await;
        if let Err(error) = declared {
            let connection = live.connection.clone();
            let _ = tokio::time::timeout(settings.operation_timeout, connection.close()).await;
            return Err(error);
        }
        Ok(live)
    }

    /// Opens a channel for declarations on `live`.
    pub(crate) async fn open_op_channel(&self, live: &Live) -> Result<OpChannel> {
        let reason: Reason = Arc::default();
        let open = async {
            let channel = live.connection.open_channel(None).await?;
            channel
                .register_callback(ReasonCallback {
                    reason: reason.clone(),
                })
                .await?;
            Ok::<_, amqprs::error::Error>(channel)
        };
        match tokio::time::timeout(self.settings.operation_timeout, open).await {
            Ok(Ok(channel)) => Ok(OpChannel {
                channel,
                generation: live.generation,
                reason,
            }),
            Ok(Err(error)) => {
                Err(self.connection_error(format!("could not open a channel: {error}")))
            }
            Err(_) => Err(Error::Timeout {
                operation: "opening a RabbitMQ channel".into(),
                after: self.settings.operation_timeout,
            }),
        }
    }

    /// Runs one synchronous AMQP operation on `channel`, bounded by the operation timeout; a failure
    /// carries the reason the broker gave when it closed the channel.
    pub(crate) async fn operation<T>(
        &self,
        what: &str,
        reason: &Reason,
        operation: impl std::future::Future<Output = std::result::Result<T, amqprs::error::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.settings.operation_timeout, operation).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                let why = reason
                    .lock()
                    .expect("reason lock")
                    .clone()
                    .unwrap_or_else(|| error.to_string());
                Err(self.backend_error(format!("{what} failed: {why}{}", hint_for(&why))))
            }
            Err(_) => Err(Error::Timeout {
                operation: format!("RabbitMQ to answer: {what}"),
                after: self.settings.operation_timeout,
            }),
        }
    }

    /// Declares the exchange, and the dead-letter exchange and queue with their bindings.
    async fn declare_topology(&self, op: &OpChannel) -> Result<()> {
        let settings = &self.settings;
        let mut exchange = ExchangeDeclareArguments::new(&settings.exchange, "topic");
        exchange.durable(true);
        self.operation(
            &format!("declaring the topic exchange '{}'", settings.exchange),
            &op.reason,
            op.channel.exchange_declare(exchange),
        )
        .await?;
        let mut dead_letter_exchange =
            ExchangeDeclareArguments::new(&settings.dead_letter_exchange, "fanout");
        dead_letter_exchange.durable(true);
        self.operation(
            &format!(
                "declaring the dead-letter exchange '{}'",
                settings.dead_letter_exchange
            ),
            &op.reason,
            op.channel.exchange_declare(dead_letter_exchange),
        )
        .await?;
        if let Some(queue) = &settings.dead_letter_queue {
            let mut arguments = FieldTable::new();
            put(
                &mut arguments,
                "x-queue-type",
                settings.queue_type.as_str().into(),
            );
            let mut declare = QueueDeclareArguments::durable_client_named(queue);
            declare.arguments(arguments);
            self.operation(
                &format!("declaring the dead-letter queue '{queue}'"),
                &op.reason,
                op.channel.queue_declare(declare),
            )
            .await?;
            self.remember_queue(queue);
            for (exchange, key) in [
                (settings.dead_letter_exchange.as_str(), ""),
                (settings.exchange.as_str(), DEAD_LETTER_BINDING),
            ] {
                self.operation(
                    &format!("binding the dead-letter queue '{queue}' to '{exchange}'"),
                    &op.reason,
                    op.channel
                        .queue_bind(QueueBindArguments::new(queue, exchange, key)),
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Declares the exchange and dead-letter topology again (after the broker closed a channel with
    /// NOT_FOUND, say, because someone deleted the exchange).
    pub(crate) async fn redeclare_topology(&self) -> Result<()> {
        self.with_op_channel(Some(Instant::now()), async |op: &OpChannel| {
            self.declare_topology(op).await
        })
        .await
    }

    /// Runs `f` with the declaration channel of the live connection, opening one if needed. A failed
    /// operation closes the channel (the broker does, on errors), so the next call opens a new one.
    pub(crate) async fn with_op_channel<T>(
        &self,
        deadline: Option<Instant>,
        f: impl AsyncFnOnce(&OpChannel) -> Result<T>,
    ) -> Result<T> {
        let live = self.wait_connected(deadline).await?;
        let mut slot = self.topology.lock().await;
        let usable = slot
            .as_ref()
            .is_some_and(|op| op.generation == live.generation && op.channel.is_open());
        if !usable {
            *slot = Some(self.open_op_channel(&live).await?);
        }
        let op = slot.as_ref().expect("set above");
        let result = f(op).await;
        if result.is_err() && !op.channel.is_open() {
            *slot = None;
        } else if matches!(result, Err(Error::Timeout { .. })) {
            // A late answer would be taken for the next request's: never reuse this channel.
            *slot = None;
        }
        result
    }

    /// The arguments of the queues consumers read: the queue type and the dead-letter exchange.
    pub(crate) fn queue_arguments(
        &self,
        queue_type: QueueType,
        expires: Option<Duration>,
    ) -> FieldTable {
        let settings = &self.settings;
        let mut arguments = FieldTable::new();
        put(&mut arguments, "x-queue-type", queue_type.as_str().into());
        put(
            &mut arguments,
            "x-dead-letter-exchange",
            settings.dead_letter_exchange.as_str().into(),
        );
        if let Some(expires) = expires {
            put(
                &mut arguments,
                "x-expires",
                FieldValue::l(expires.as_millis().min(i64::MAX as u128) as i64),
            );
        }
        if queue_type == QueueType::Quorum
            && let Some(limit) = settings.delivery_limit
        {
            put(
                &mut arguments,
                "x-delivery-limit",
                FieldValue::l(i64::from(limit)),
            );
        }
        arguments
    }

    /// Marks the connection as lost: fails the confirms waiting on it (their publishes are sent again
    /// after the reconnect) and forgets channels of that connection.
    pub(crate) async fn on_lost(&self, live: &Live, why: &str) {
        if self.connected.load(Ordering::Acquire) == live.generation {
            self.connected.store(0, Ordering::Release);
        }
        let _ = self.state.send_if_modified(|state| match state {
            LinkState::Connected(current) if current.generation == live.generation => {
                *state = LinkState::Connecting {
                    attempt: 0,
                    last_error: Arc::from(why),
                    since: Instant::now(),
                };
                true
            }
            _ => false,
        });
        let publisher = self.publisher.lock().expect("publisher lock").take();
        if let Some(publisher) = publisher {
            publisher.confirms.fail_all(why);
        }
        *self.topology.lock().await = None;
        self.retry_queues.lock().expect("retry lock").clear();
    }

    /// Records a durable queue this router declared.
    pub(crate) fn remember_queue(&self, queue: &str) {
        let mut declared = self.declared_queues.lock().expect("declared lock");
        if !declared.contains(queue) {
            declared.insert(queue.to_string());
        }
    }

    fn on_connected(&self, live: &Live) {
        self.connected.store(live.generation, Ordering::Release);
        self.state.send_replace(LinkState::Connected(live.clone()));
    }
}

/// Adds a field to an AMQP table (names are short and static).
pub(crate) fn put(table: &mut FieldTable, name: &str, value: FieldValue) {
    table.insert(
        name.try_into().expect("AMQP field names here are short"),
        value,
    );
}

/// A hint for the broker errors users can fix.
pub(crate) fn hint_for(reason: &str) -> &'static str {
    if reason.contains("PRECONDITION_FAILED") && reason.contains("inequivalent") {
        " (it already exists with other settings: delete it, or use the same exchange type, queue type and dead-letter settings)"
    } else if reason.contains("ACCESS_REFUSED") {
        " (the user lacks permission on this virtual host: grant it with rabbitmqctl set_permissions)"
    } else if reason.contains("NOT_FOUND") {
        " (it does not exist: the topology is declared again on the next attempt)"
    } else {
        ""
    }
}

fn describe_open_error(error: &amqprs::error::Error) -> String {
    let text = error.to_string();
    if text.contains("ACCESS_REFUSED") || text.contains("403") {
        format!(
            "{text} (the user name or password is wrong, or the user may not use this virtual host)"
        )
    } else if text.contains("NOT_ALLOWED") || text.contains("530") {
        format!("{text} (the virtual host does not exist or the user may not open it)")
    } else if text.contains("InvalidContentType") || text.contains("corrupt message") {
        format!(
            "{text} (the port does not answer TLS: use amqp:// for a plain AMQP port, or the broker's TLS port, usually 5671)"
        )
    } else if text.contains("reset by peer")
        || text.contains("unexpected end of file")
        || text.contains("early eof")
    {
        format!(
            "{text} (the broker dropped the connection during the handshake: RabbitMQ does that on a failed login,              so check the user name and password; or the port speaks TLS and the URL is amqp://)"
        )
    } else {
        text
    }
}

/// Completes when `connection` is lost (network failure, heartbeat timeout, or closed by the broker).
async fn connection_lost(connection: &Connection) {
    let failure = connection.listen_network_io_failure();
    tokio::pin!(failure);
    // The notification is a broadcast: one sent before we listened is missed, so also poll.
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = &mut failure => return,
            _ = tick.tick() => {
                if !connection.is_open() {
                    return;
                }
            }
        }
    }
}

/// Watches the connection and reconnects with backoff until the router is closed or dropped.
pub(crate) async fn supervise(inner: Weak<Inner>, mut live: Live, mut stop: watch::Receiver<bool>) {
    loop {
        let lost = tokio::select! {
            () = connection_lost(&live.connection) => true,
            _ = stop.wait_for(|stop| *stop) => false,
        };
        if !lost {
            return;
        }
        {
            let Some(inner) = inner.upgrade() else { return };
            if inner.is_closing() {
                return;
            }
            bump(&inner.counters.connection_losses);
            tracing::warn!(
                url = %inner.settings.url.redacted,
                generation = live.generation,
                "lost the connection to RabbitMQ; reconnecting"
            );
            inner.on_lost(&live, "the connection was lost").await;
        }
        let mut attempt = 0u32;
        live = loop {
            let Some(strong) = inner.upgrade() else {
                return;
            };
            if strong.is_closing() {
                return;
            }
            attempt = attempt.saturating_add(1);
            match strong.establish().await {
                Ok(new_live) if strong.is_closing() => {
                    // Closed while this attempt was connecting: do not come back to life.
                    let _ = tokio::time::timeout(
                        strong.settings.operation_timeout,
                        new_live.connection.close(),
                    )
                    .await;
                    return;
                }
                Ok(new_live) => {
                    bump(&strong.counters.reconnects);
                    tracing::info!(
                        url = %strong.settings.url.redacted,
                        attempt,
                        generation = new_live.generation,
                        "reconnected to RabbitMQ"
                    );
                    strong.on_connected(&new_live);
                    break new_live;
                }
                Err(error) => {
                    bump(&strong.counters.connect_failures);
                    let delay = strong.settings.reconnect.delay(attempt);
                    tracing::warn!(
                        error = %error,
                        attempt,
                        retry_in_ms = delay.as_millis() as u64,
                        "reconnecting to RabbitMQ failed"
                    );
                    let _ = strong.state.send_if_modified(|state| match state {
                        LinkState::Connecting { .. } => {
                            let since = match state {
                                LinkState::Connecting { since, .. } => *since,
                                _ => Instant::now(),
                            };
                            *state = LinkState::Connecting {
                                attempt,
                                last_error: Arc::from(error.to_string()),
                                since,
                            };
                            true
                        }
                        _ => false,
                    });
                    drop(strong);
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        _ = stop.wait_for(|stop| *stop) => return,
                    }
                }
            }
        };
    }
}

/// Starts the router's connection: the first connection is made here (its failure is the caller's
/// error); reconnections run in the background.
pub(crate) async fn start(inner: &Arc<Inner>) -> Result<()> {
    let live = inner.establish().await?;
    inner.on_connected(&live);
    let stop = inner.stop.subscribe();
    let weak = Arc::downgrade(inner);
    tokio::spawn(supervise(weak, live, stop));
    Ok(())
}
