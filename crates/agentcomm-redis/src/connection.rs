//! Building fred clients with agentcomm's settings, and turning fred's errors into agentcomm's.
//!
//! fred's defaults lose messages silently; here every client gets a reconnect policy, a command
//! timeout, bounded retries of commands cut off by a lost connection, a large pub/sub channel, and a task
//! that counts and logs its reconnections and errors.

use std::sync::Arc;
use std::time::Duration;

use agentcomm_core::error::{Error, redact_url};
use fred::error::ErrorKind;
use fred::interfaces::{ClientLike, EventInterface};
use fred::types::Builder;
use fred::types::config::{Config, ConnectionConfig, PerformanceConfig, ReconnectPolicy};

use crate::builder::{ACCEPTED_URLS, Settings};
use crate::counters::Counters;

/// The fred configuration for `settings`, or a configuration error naming the URL without its password.
pub(crate) fn fred_config(settings: &Settings) -> Result<Config, Error> {
    let url = match settings.url.strip_prefix("unix://") {
        Some(path) => format!("redis+unix://{path}"),
        None => settings.url.clone(),
    };
    Config::from_url(&url).map_err(|error| Error::Config {
        variable: "Redis URL".into(),
        value: redact_url(&settings.url),
        expected: format!("{}; accepted: {ACCEPTED_URLS}", error.details()),
    })
}

/// A fred builder with every safety setting applied.
pub(crate) fn fred_builder(settings: &Settings, config: Config) -> Builder {
    let mut builder = Builder::from_config(config);
    let backoff = settings.reconnect;
    let initial_ms = backoff.initial().as_millis().clamp(1, u32::MAX as u128) as u32;
    let max_ms = backoff.max().as_millis().clamp(1, u32::MAX as u128) as u32;
    // fred adds up to `jitter` ms to every delay; a tenth of the first delay spreads reconnecting clients.
    let mut policy =
        ReconnectPolicy::new_exponential(settings.max_reconnect_attempts, initial_ms, max_ms, 2);
    policy.set_jitter((initial_ms / 10).max(1));
    builder.set_policy(policy);
    builder.set_performance_config(PerformanceConfig {
        default_command_timeout: settings.command_timeout,
        broadcast_channel_capacity: settings.broadcast_capacity,
        ..PerformanceConfig::default()
    });
    let mut connection = ConnectionConfig {
        connection_timeout: settings.connect_timeout,
        internal_command_timeout: settings.connect_timeout,
        max_command_attempts: settings.max_command_attempts,
        ..ConnectionConfig::default()
    };
    // A connection that stops answering (a network black hole) is closed and reconnected instead of
    // waiting forever; blocking reads are excluded by fred.
    connection.unresponsive.max_timeout =
        Some(settings.command_timeout.max(Duration::from_secs(2)));
    connection.unresponsive.interval = Duration::from_millis(500);
    builder.set_connection_config(connection);
    builder.with_config(|config| config.fail_fast = true);
    builder
}

/// The error for a fred failure of `operation`.
pub(crate) fn map_error(error: &fred::error::Error, url: &str, operation: &str) -> Error {
    let details = error.details();
    match error.kind() {
        ErrorKind::IO
        | ErrorKind::Canceled
        | ErrorKind::Tls
        | ErrorKind::Sentinel
        | ErrorKind::Cluster
        | ErrorKind::Routing => Error::Connection {
            backend: "redis",
            url: redact_url(url),
            message: format!("{operation} failed: {details}"),
        },
        ErrorKind::Auth => Error::Connection {
            backend: "redis",
            url: redact_url(url),
            message: format!(
                "{operation} was refused ({details}); check the user and password in the URL"
            ),
        },
        ErrorKind::Timeout => Error::Timeout {
            operation: format!("Redis to answer {operation} at {}", redact_url(url)),
            after: Duration::ZERO,
        },
        ErrorKind::Backpressure => Error::Backend {
            backend: "redis",
            message: format!(
                "{operation} was refused: the client's command queue is full ({details}); publish less at once"
            ),
        },
        _ => Error::Backend {
            backend: "redis",
            message: format!("{operation} failed: {details}"),
        },
    }
}

/// Like [`map_error`], with the real timeout in timeout errors.
pub(crate) fn map_error_with_timeout(
    error: &fred::error::Error,
    settings: &Settings,
    operation: &str,
) -> Error {
    match map_error(error, &settings.url, operation) {
        Error::Timeout { operation, .. } => Error::Timeout {
            operation,
            after: settings.command_timeout,
        },
        other => other,
    }
}

/// Whether a fred error says the script cache does not have our script (Redis restarted).
pub(crate) fn is_noscript(error: &fred::error::Error) -> bool {
    error.details().starts_with("NOSCRIPT")
}

/// Whether a fred error says the consumer group or its stream is gone.
pub(crate) fn is_nogroup(error: &fred::error::Error) -> bool {
    error.details().starts_with("NOGROUP")
}

/// Counts and logs the reconnections and errors of `client`, until the client quits. `on_reconnect` runs
/// after each reconnection.
pub(crate) fn watch_client<C: ClientLike + EventInterface>(
    client: &C,
    role: &'static str,
    counters: Arc<Counters>,
    url: &str,
    on_reconnect: impl Fn() + Send + Sync + 'static,
) {
    let mut reconnects = client.reconnect_rx();
    let mut errors = client.error_rx();
    let url = redact_url(url);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                event = reconnects.recv() => match event {
                    Ok(server) => {
                        counters.bump(&counters.reconnects);
                        on_reconnect();
                        tracing::info!(role, url = %url, server = %server, "reconnected to Redis");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
                event = errors.recv() => match event {
                    Ok((error, server)) => {
                        counters.bump(&counters.connection_errors);
                        counters.mark_trouble();
                        tracing::warn!(
                            role,
                            url = %url,
                            server = ?server.map(|s| s.to_string()),
                            error = %error,
                            "Redis connection problem; reconnecting with backoff"
                        );
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
            }
        }
    });
}
