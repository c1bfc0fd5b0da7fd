//! Building fred clients with agentcomm's settings, and turning fred's errors into agentcomm's.
//!
//! fred's defaults lose messages silently; here every client gets a reconnect policy, a command
//! timeout, bounded retries of commands cut off by a lost connection, and a task that counts and logs its
//! reconnections and errors. Only the pub/sub subscriber gets a large message channel: fred preallocates
//! every broadcast channel of a client at that size.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use agentcomm_core::error::Error;
use fred::clients::Pool;
use fred::error::ErrorKind;
use fred::interfaces::{ClientLike, EventInterface};
use fred::types::Builder;
use fred::types::config::{Config, ConnectionConfig, PerformanceConfig, ReconnectPolicy};

use crate::builder::{ACCEPTED_SCHEMES, ACCEPTED_URLS, Settings};
use crate::counters::Counters;

/// The fred configuration for `settings`, or a configuration error naming the URL without its password.
pub(crate) fn fred_config(settings: &Settings) -> Result<Config, Error> {
    // fred's URL parser trims surrounding whitespace (a URL read from a file keeps its newline).
    let raw = settings.url.trim();
    check_scheme(raw, &settings.url)?;
    // The scheme in any letter case, as the configuration reads it.
    let unix = raw
        .get(..7)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("unix://"));
    let url = match unix {
        true => format!("redis+unix://{}", &raw[7..]),
        false => raw.to_string(),
    };
    // A password with an unencoded '?' or '#' that fred can still read is read wrongly, silently:
    // `redis://u:12#secret@h` as host `u`, port 12 and no password. An '@' after the authority's end
    // (outside query parameters) is never part of a server URL, so such a URL is refused; a Unix
    // socket's path may hold one.
    let socket = url
        .split_once("://")
        .is_some_and(|(scheme, _)| scheme.to_ascii_lowercase().ends_with("+unix"));
    let hint = unencoded_password_hint(&url);
    if !socket && !hint.is_empty() {
        return Err(Error::Config {
            variable: "Redis URL".into(),
            value: redact(&settings.url),
            expected: format!("an '@' follows the host's end{hint}; accepted: {ACCEPTED_URLS}"),
        });
    }
    let mut config = Config::from_url(&url).map_err(|error| Error::Config {
        variable: "Redis URL".into(),
        value: redact(&settings.url),
        // Only a socket's URL gets here with a hint (any other is refused above).
        expected: format!(
            "{}{hint}; accepted: {ACCEPTED_URLS}",
            readable_url_details(error.details())
        ),
    })?;
    config.database = url_meaning(&url, config.database).map_err(|why| Error::Config {
        variable: "Redis URL".into(),
        value: redact(&settings.url),
        expected: format!("{why}; accepted: {ACCEPTED_URLS}"),
    })?;
    if let Some(connector) = &settings.tls {
        // fred would connect over TCP with TLS to a host made of the socket's path.
        if socket {
            return Err(Error::Config {
                variable: "Redis URL".into(),
                value: redact(&settings.url),
                expected: "a Unix socket's connection is not encrypted, and tls_connector(..) was \
                           given: remove it, or connect over rediss://"
                    .into(),
            });
        }
        config.tls = Some(connector.clone().into());
    }
    if config.tls.is_some() {
        install_crypto_provider();
    }
    Ok(config)
}

/// The database `url` (which fred read as `database`) selects, or why the URL means something fred
/// would not do, silently. fred reads no query parameter of a single server's or a Unix socket's URL,
/// only `node` of a cluster's, and only `node` and the `sentinel..` ones of a Sentinel's: a `db=3`
/// (the form of other clients) connected to database 0, a `node=` or `sentinelServiceName=` under the
/// wrong scheme connected to the one host as a lone server, a `password=` was never sent; and a
/// cluster's URL lost its database (a cluster has only database 0). A Unix socket's URL has no room
/// for a database in its path: its `db` parameter chooses one, as other clients read it. Other
/// parameters (another client's `client_name`) are left to fred, which reads past them.
fn url_meaning(url: &str, database: Option<u8>) -> Result<Option<u8>, String> {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let scheme = scheme.to_ascii_lowercase();
    let (cluster, sentinel, unix) = (
        scheme.ends_with("-cluster"),
        scheme.ends_with("-sentinel"),
        scheme.ends_with("+unix"),
    );
    let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut database = database;
    if cluster {
        let path = before_query.find('/').map_or("", |at| &before_query[at..]);
        if !matches!(path, "" | "/" | "/0") {
            return Err(format!(
                "a Redis Cluster has only database 0, and '{path}' would be ignored: remove it \
                 (routers sharing a cluster are kept apart by their prefix)"
            ));
        }
    }
    for parameter in query.split('&').filter(|piece| !piece.is_empty()) {
        let (name, value) = parameter.split_once('=').unwrap_or((parameter, ""));
        let single = match (cluster, sentinel) {
            (true, _) => "a cluster's",
            (_, true) => "a Sentinel",
            _ if unix => "a Unix socket's",
            _ => "a single server's",
        };
        let why = match name {
            "db" | "database" if unix => {
                database = Some(value.parse().map_err(|_| {
                    format!("'{name}={value}' is not a database number from 0 to 255")
                })?);
                continue;
            }
            // The database the URL selects anyway (`?db=0`, `redis://h/2?db=2`): nothing is ignored.
            "db" | "database" if value.parse::<u8>().ok() == Some(database.unwrap_or(0)) => {
                continue;
            }
            "db" | "database" if cluster => {
                "a Redis Cluster has only database 0: remove it".to_string()
            }
            "db" | "database" if sentinel => "the database is the number after the host: \
                 redis-sentinel://host:port/3?sentinelServiceName=name"
                .to_string(),
            "db" | "database" => {
                "the database is the number after the host: redis://host:port/3".to_string()
            }
            "password" | "username" | "user" | "pass" if unix => {
                "credentials go before the host, which is then any name: \
                 redis+unix://user:password@localhost/path/to/redis.sock"
                    .to_string()
            }
            "password" | "username" | "user" | "pass" if sentinel => {
                "the server's credentials go before the host: \
                 redis-sentinel://user:password@host:port/0?sentinelServiceName=name (the Sentinels' \
                 own in sentinelUsername and sentinelPassword)"
                    .to_string()
            }
            "password" | "username" | "user" | "pass" if cluster => {
                "credentials go before the first node: \
                 redis-cluster://user:password@host:port?node=host2:port2"
                    .to_string()
            }
            "password" | "username" | "user" | "pass" => {
                "credentials go before the host: redis://user:password@host:port".to_string()
            }
            "node" if !cluster && !sentinel => {
                "it names other nodes of a cluster or other Sentinels: use redis-cluster:// or \
                 redis-sentinel://"
                    .to_string()
            }
            "sentinelServiceName" | "sentinelUsername" | "sentinelPassword" if !sentinel => {
                "it is read only from a Sentinel URL: use redis-sentinel://".to_string()
            }
            _ => continue,
        };
        return Err(format!(
            "the query parameter '{name}' is not read from {single} URL, and would be ignored: {why}"
        ));
    }
    Ok(database)
}

/// A hint for a URL fred could not read whose password (it seems) holds a `/`, `?` or `#` that is not
/// percent-encoded: its authority ends there, so fred reads a port, host or database out of the
/// password ("InvalidPort", "Invalid integer string"), naming nothing the user wrote. Given when an `@`
/// comes after the authority's end, unless that `@` stands in the value of a query parameter fred reads
/// (a Sentinel URL's user name, password or service name), with no `#` before it; also when the
/// authority has one, a password with an unencoded `@` before its `/` (`u:p@ss/word@host`). Any
/// `key=value` before the `@` was not enough: the password `12?a=b` in `redis://u:12?a=b@h` was read
/// as host `u`, port 12, and a bare parameter (`&flag&`) before a Sentinel password made a URL fred
/// reads refused.
fn unencoded_password_hint(url: &str) -> &'static str {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let tail = &rest[authority_end..];
    // fred reads the Sentinel parameters of a Sentinel URL only: elsewhere such a value is no reason
    // to take an '@' (`redis://u:12?sentinelPassword=x@h` is host `u`, port 12, no password).
    let sentinel = scheme.to_ascii_lowercase().ends_with("-sentinel");
    let in_query = |before_at: &str| {
        sentinel
            && before_at.split_once('?').is_some_and(|(path, query)| {
                !path.contains('#')
                    && !query.contains('#')
                    && query
                        .rsplit('&')
                        .next()
                        .and_then(|piece| piece.split_once('='))
                        .is_some_and(|(key, _)| {
                            matches!(
                                key,
                                "sentinelServiceName" | "sentinelUsername" | "sentinelPassword"
                            )
                        })
            })
    };
    if tail.find('@').is_some_and(|at| !in_query(&tail[..at])) {
        " (a '/', '?' or '#' in the password must be percent-encoded: %2F, %3F, %23; so must an '@' \
         in a query value other than a Sentinel URL's sentinelServiceName, sentinelUsername or \
         sentinelPassword: %40)"
    } else {
        ""
    }
}

/// Refuses a URL whose scheme fred would misread: fred reads any scheme it does not know as a single
/// server's (`http://`, a mistyped `redis-clustr://` connected to a cluster's first node as a lone
/// server). Only the scheme is checked: fred's parser checks the rest, with errors of its own. (The
/// host check `REDIS_URL` gets refuses forms fred reads, such as an `@` in a Sentinel password in the
/// query; the builder took them before its URLs were checked.) `shown` is the URL as given, for the
/// error, without its password.
fn check_scheme(url: &str, shown: &str) -> Result<(), Error> {
    let fail = |why: String| Error::Config {
        variable: "Redis URL".into(),
        value: redact(shown),
        expected: format!("{why}; accepted: {ACCEPTED_URLS}"),
    };
    let Some((scheme, _)) = url.split_once("://") else {
        return Err(fail("it is not a URL (no '://')".into()));
    };
    if ACCEPTED_SCHEMES.contains(&scheme.to_ascii_lowercase().as_str()) || has_fred_scheme(url) {
        return Ok(());
    }
    // Shown only when it is a scheme: the text before a mangled URL's first `://` may hold a password.
    let is_scheme = scheme
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    Err(fail(match is_scheme {
        true => format!("the scheme '{scheme}' is not supported"),
        false => "the scheme is not supported".into(),
    }))
}

/// Schemes fred reads besides [`ACCEPTED_SCHEMES`], which the builder took before its URLs were
/// checked: fred's own form of a Unix socket URL, and Valkey's names of the same forms.
const FRED_SCHEMES: &[&str] = &[
    "redis+unix",
    "valkey",
    "valkeys",
    "valkey-cluster",
    "valkeys-cluster",
    "valkey-sentinel",
    "valkeys-sentinel",
    "valkey+unix",
];

/// Whether `url`'s scheme (in any letter case) is one of [`FRED_SCHEMES`].
pub(crate) fn has_fred_scheme(url: &str) -> bool {
    url.split_once("://")
        .is_some_and(|(scheme, _)| FRED_SCHEMES.contains(&scheme.to_ascii_lowercase().as_str()))
}

/// Installs ring as rustls's process-wide crypto provider unless the application installed one: rustls
/// panics on the first TLS connection when it cannot choose a provider (an application that also pulls
/// in aws-lc-rs has two and must pick).
pub(crate) fn install_crypto_provider() {
    use fred::rustls::crypto::CryptoProvider;
    if CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: a provider is installed either way.
        let _ = fred::rustls::crypto::ring::default_provider().install_default();
    }
}

/// `url` for logs and errors, its credentials hidden (a sentinel password in its query too).
pub(crate) use agentcomm_core::error::redact_url as redact;

/// Which kind of client is built: only a pub/sub subscriber needs a large message channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Pool connections and stream readers: fred's small default channels (they carry only connection
    /// events here).
    Commands,
    /// The pub/sub subscriber: its message channel is the buffer every subscription reads.
    Subscriber,
}

/// The reconnect policy for `settings`: fred's exponential policy takes a whole-number multiplier and a
/// jitter in milliseconds that it adds; the builder's `Backoff` multiplier is rounded (at least 1, which
/// makes the delay constant) and the jitter is a fifth of the first delay.
///
/// fred caps the delay with its jitter added (`min(max, delay + jitter)`): once the delay reached its
/// longest, every attempt of every connection came exactly `max` apart, in step with every other
/// process that lost Redis at the same moment, the herd that jitter is there to break up. So each
/// policy takes its own longest delay, shortened at random by up to the `Backoff`'s jitter (20% by
/// default: from 8 to 10 s), as `Backoff::delay` shortens a capped delay, and by half at most.
pub(crate) fn reconnect_policy(settings: &Settings) -> Option<ReconnectPolicy> {
    if settings.max_reconnect_attempts == Some(0) {
        return None;
    }
    let backoff = settings.reconnect;
    let initial_ms = backoff.initial().as_millis().clamp(1, u32::MAX as u128) as u32;
    // `delay(u32::MAX)` is the longest delay with the backoff's jitter taken off at random; never
    // under half the longest: a full jitter (1.0) would leave some connections retrying every few
    // milliseconds for as long as Redis is away, as this delay stays the same for a connection.
    let max_ms = backoff
        .delay(u32::MAX)
        .max(backoff.max() / 2)
        .as_millis()
        .clamp(initial_ms as u128, u32::MAX as u128) as u32;
    let exact = backoff.jitter(0.0);
    let first = exact.delay(1).as_secs_f64();
    let multiplier = if first > 0.0 && exact.delay(2) < backoff.max() {
        (exact.delay(2).as_secs_f64() / first)
            .round()
            .clamp(1.0, 1000.0) as u32
    } else {
        2
    };
    // fred counts 0 as "forever".
    let attempts = settings.max_reconnect_attempts.unwrap_or(0);
    let mut policy = ReconnectPolicy::new_exponential(attempts, initial_ms, max_ms, multiplier);
    policy.set_jitter((initial_ms / 5).max(1));
    Some(policy)
}

/// A fred builder with every safety setting applied.
pub(crate) fn fred_builder(settings: &Settings, config: Config, role: Role) -> Builder {
    let mut builder = Builder::from_config(config);
    if let Some(policy) = reconnect_policy(settings) {
        builder.set_policy(policy);
    }
    let defaults = PerformanceConfig::default();
    builder.set_performance_config(PerformanceConfig {
        default_command_timeout: settings.command_timeout,
        broadcast_channel_capacity: match role {
            Role::Subscriber => settings.broadcast_capacity,
            Role::Commands => defaults.broadcast_channel_capacity,
        },
        ..defaults
    });
    let mut connection = ConnectionConfig {
        connection_timeout: settings.connect_timeout,
        internal_command_timeout: settings.connect_timeout,
        max_command_attempts: settings.max_command_attempts,
        ..ConnectionConfig::default()
    };
    // A connection that stops answering (a network black hole) is closed and reconnected instead of
    // waiting forever; blocking reads are excluded by fred (the Streams readers check theirs), and a
    // connection that writes nothing is never checked (the pub/sub subscriber sends PINGs for that:
    // `pubsub::check_liveness`).
    connection.unresponsive.max_timeout = Some(unresponsive_limit(settings.command_timeout));
    connection.unresponsive.interval = Duration::from_millis(500);
    builder.set_connection_config(connection);
    builder.with_config(|config| config.fail_fast = true);
    builder
}

/// The router's pool of command connections. Each connection is built with a reconnect policy of its
/// own: fred's `build_pool` gives every connection a copy of one policy, and so one longest delay, with
/// which a pool's connections kept retrying in step.
pub(crate) fn fred_pool(settings: &Settings, config: &Config) -> Result<Pool, fred::error::Error> {
    let clients = (0..settings.pool_size)
        .map(|_| fred_builder(settings, config.clone(), Role::Commands).build())
        .collect::<Result<Vec<_>, _>>()?;
    Pool::from_clients(clients)
}

/// Options for a command that names no key (a `PING`) and must reach the connection of the node that
/// holds `key`'s slot: fred sends such a command to any node of a cluster. On one server the slot
/// changes nothing. `timeout` replaces the command timeout when given.
pub(crate) fn on_node_of(
    client: &impl ClientLike,
    key: &[u8],
    timeout: Option<Duration>,
) -> fred::types::config::Options {
    fred::types::config::Options {
        cluster_hash: client
            .is_clustered()
            .then(|| fred::types::ClusterHash::Custom(fred::util::redis_keyslot(key))),
        timeout,
        ..Default::default()
    }
}

/// How long a connection may leave a command unanswered before it is taken for dead and made again:
/// fred's check of every connection not blocked in a read (every 500 ms), the Streams readers' own
/// check of their blocking reads (beyond `read_block`), and the pub/sub subscriber's liveness check,
/// which waits as long for its `PING`. Never under 2 s: a command timeout set short for quick failures
/// must not turn every slow moment of Redis into reconnections.
pub(crate) fn unresponsive_limit(command_timeout: Duration) -> Duration {
    command_timeout.max(Duration::from_secs(2))
}

/// fred's reason for refusing a URL, as a person reads it: fred gives the `url` crate's error as its
/// `Debug` name (`InvalidPort`), a number that does not parse as "Invalid integer string.", and ends
/// some reasons with a full stop, which the error's `; accepted: ..` then followed.
fn readable_url_details(details: &str) -> String {
    let details = details.trim().trim_end_matches('.');
    let text = match details {
        "EmptyHost" => "the host is empty",
        "IdnaError" => "the host is not a valid international domain name",
        "InvalidPort" => "the port is not a number from 0 to 65535",
        "InvalidIpv4Address" => "the host is not a valid IPv4 address",
        "InvalidIpv6Address" => "the host is not a valid IPv6 address",
        "InvalidDomainCharacter" => "the host holds a character no host name may hold",
        "RelativeUrlWithoutBase" => "it is not a URL (no scheme)",
        "Invalid integer string" => {
            "a number in it does not parse (the database after the host's '/' is a number from 0 \
             to 255, a port from 0 to 65535)"
        }
        "Invalid or missing host" => "the host is missing or not valid",
        "Invalid database path" => "after the host comes at most one '/' and a database number",
        other => other,
    };
    text.to_string()
}

/// fred's details of a failure, as a person reads them: fred keeps an I/O error as its `Debug` text
/// (`Os { code: 111, kind: ConnectionRefused, message: "Connection refused" }`), which is turned back
/// into what the I/O error displays (`Connection refused (os error 111)`). Other details are kept.
pub(crate) fn readable_details(details: &str) -> String {
    /// The value of `field: ` up to the next `, ` or the closing ` }` (a quoted one unescaped).
    fn field<'a>(text: &'a str, name: &str) -> Option<std::borrow::Cow<'a, str>> {
        let start = text.find(&format!("{name}: "))? + name.len() + 2;
        let rest = &text[start..];
        if let Some(quoted) = rest.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.chars();
            while let Some(c) = chars.next() {
                match c {
                    '"' => return Some(value.into()),
                    '\\' => match chars.next()? {
                        'n' => value.push('\n'),
                        't' => value.push('\t'),
                        other => value.push(other),
                    },
                    c => value.push(c),
                }
            }
            return None;
        }
        Some(rest[..unquoted_end(rest)?].into())
    }
    /// Where an unquoted value at the start of `rest` ends: at the first `, ` or ` }` outside the
    /// brackets and strings of the value itself. (The first `, ` anywhere cut a nested value short: a
    /// TLS error read `InvalidCertificate(NotValidForNameContext { expected: IpAddress(V4(Ipv4Addr([127`,
    /// without the names the certificate presents.)
    fn unquoted_end(rest: &str) -> Option<usize> {
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        for (index, c) in rest.char_indices() {
            if in_string {
                match c {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '"' => in_string = false,
                    _ => {}
                }
                continue;
            }
            match c {
                '"' => in_string = true,
                '(' | '[' | '{' => depth += 1,
                ')' | ']' | '}' if depth > 0 => depth -= 1,
                _ if depth == 0
                    && (rest[index..].starts_with(", ") || rest[index..].starts_with(" }")) =>
                {
                    return Some(index);
                }
                _ => {}
            }
        }
        None
    }
    let details = details.trim();
    if details.starts_with("Os { ") {
        if let (Some(code), Some(message)) = (field(details, "code"), field(details, "message")) {
            return format!("{message} (os error {code})");
        }
    } else if details.starts_with("Custom { ") {
        if let Some(error) = field(details, "error") {
            return error.into_owned();
        }
    } else if details.starts_with("Error { ") {
        if let Some(message) = field(details, "message") {
            return message.into_owned();
        }
    } else if let Some(kind) = details
        .strip_prefix("Kind(")
        .and_then(|rest| rest.strip_suffix(')'))
    {
        return format!("I/O error: {kind}");
    }
    details.to_string()
}

/// The error for a fred failure of `operation` (a timeout names the command timeout).
pub(crate) fn map_error(error: &fred::error::Error, settings: &Settings, operation: &str) -> Error {
    let url = &settings.url;
    let details = readable_details(without_echoed_arguments(error.details()));
    match error.kind() {
        ErrorKind::IO
        | ErrorKind::Canceled
        | ErrorKind::Tls
        | ErrorKind::Sentinel
        | ErrorKind::Cluster
        | ErrorKind::Routing => Error::Connection {
            backend: "redis",
            url: redact(url),
            message: format!("{operation} failed: {details}"),
        },
        // Redis was reached: not "cannot reach redis .. check that the broker is running".
        ErrorKind::Auth => Error::Backend {
            backend: "redis",
            message: format!(
                "Redis at {} refused {operation} ({details}): check the user and password in the URL",
                redact(url)
            ),
        },
        ErrorKind::Timeout => Error::Timeout {
            operation: format!("Redis to answer {operation} at {}", redact(url)),
            after: settings.command_timeout,
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

/// The error of a connection that could not be set up (`operation`). fred waits for the answers to
/// its setup commands (`PING`, `AUTH`, `SELECT`) at most `connect_timeout`: a timeout there names that
/// setting and is a connection error. [`map_error`] named the command timeout: a subscriber behind a
/// firewall that drops packets failed after 1 s "timed out after 30s".
pub(crate) fn connect_error(
    error: &fred::error::Error,
    settings: &Settings,
    operation: &str,
) -> Error {
    match error.kind() {
        ErrorKind::Timeout => Error::Connection {
            backend: "redis",
            url: redact(&settings.url),
            message: format!(
                "{operation} got no answer within connect_timeout ({:?})",
                settings.connect_timeout
            ),
        },
        _ => map_error(error, settings, operation),
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
    watch_client_with(client, role, counters, url, on_reconnect, || {});
}

/// [`watch_client`], also calling `on_error` on each connection error fred reports (its connection
/// ended, or a reconnection attempt failed: a reconnection follows, or fred gives up). fred still says
/// the client is connected until its next attempt begins, after the reconnect policy's delay.
pub(crate) fn watch_client_with<C: ClientLike + EventInterface>(
    client: &C,
    role: &'static str,
    counters: Arc<Counters>,
    url: &str,
    on_reconnect: impl Fn() + Send + Sync + 'static,
    on_error: impl Fn() + Send + Sync + 'static,
) {
    let mut reconnects = client.reconnect_rx();
    let mut errors = client.error_rx();
    let url = redact(url);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                // Errors first: an error and the reconnection after it, both waiting, are seen in
                // that order.
                biased;
                event = errors.recv() => match event {
                    Ok((error, server)) => {
                        on_error();
                        counters.connection_error(Some(connection_problem(&error)));
                        counters.bump(&counters.connection_errors);
                        counters.mark_trouble();
                        tracing::warn!(
                            role,
                            url = %url,
                            server = ?server.map(|s| s.to_string()),
                            // As fred displays it, without the password a server may echo.
                            error = %format_args!(
                                "{}: {}",
                                error.kind().to_str(),
                                without_echoed_arguments(error.details())
                            ),
                            "Redis connection problem; reconnecting with backoff"
                        );
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        on_error();
                        counters.add(&counters.connection_errors, missed);
                        counters.mark_trouble();
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
                event = reconnects.recv() => match event {
                    Ok(server) => {
                        counters.connection_error(None);
                        counters.bump(&counters.reconnects);
                        on_reconnect();
                        tracing::info!(role, url = %url, server = %server, "reconnected to Redis");
                    }
                    // Missed reconnection events (fred's small channel overran): still reconnected.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        counters.add(&counters.reconnects, missed);
                        on_reconnect();
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
            }
        }
    });
}

/// `details` without what the server echoed of a command it does not know: a server without `AUTH`
/// (a proxy that has none, a Redis with it renamed away) answers the login with "unknown command
/// 'AUTH', with args beginning with: '<password>'" (Redis 6.0 quotes with backticks).
pub(crate) fn without_echoed_arguments(details: &str) -> &str {
    details
        .find(", with args beginning with:")
        .map_or(details, |at| &details[..at])
}

/// Whether Redis answered and refused the login (no password where one is required, a wrong one, an
/// unknown user).
pub(crate) fn is_refused_login(error: &fred::error::Error) -> bool {
    let details = without_echoed_arguments(error.details()).trim_start();
    matches!(error.kind(), ErrorKind::Auth)
        || details.starts_with("NOAUTH")
        || details.starts_with("WRONGPASS")
}

/// What health says of a failed connection attempt: fred's details, with the fix when Redis refused
/// the login (it answers, so "check that it is running" would mislead: a password rotated on the
/// server while the router ran).
pub(crate) fn connection_problem(error: &fred::error::Error) -> String {
    let details = readable_details(without_echoed_arguments(error.details()));
    let details = details.trim_end_matches('.');
    match is_refused_login(error) {
        true => format!(
            "Redis refused the login ({details}): put the password it requires now in the URL, and \
             connect a new router"
        ),
        false => details.to_string(),
    }
}

/// A client being connected, as fred's `init` does it, but with its connection task aborted if this
/// is dropped before [`Connecting::keep`]: when the future connecting it fails, times out, or is itself
/// dropped (its caller gave up: a timeout around `subscribe`, a `select!`). fred runs a client's
/// connection on a task of its own from the start, which a dropped future does not stop, and a `QUIT`
/// sent before that task has started is ignored: without this the connection, and what it then
/// subscribes or reads, would stay open for nobody for as long as the process lives.
pub(crate) struct Connecting {
    task: Option<fred::types::ConnectHandle>,
    /// The first connection's outcome, listened for before the task started.
    outcome: std::pin::Pin<Box<dyn Future<Output = Result<(), fred::error::Error>> + Send>>,
}

impl Connecting {
    /// Starts connecting `client`. fred's connect notice is listened for first, as fred's own `init`
    /// does: fred announces the outcome once, to whoever listens then, and its `wait_for_connect`
    /// listens only when first polled, after looking at the client's state. An outcome announced
    /// before that (a quick failure, or a success in between) would be missed, and the caller would
    /// wait out its timeout.
    pub(crate) fn start<C: ClientLike + Clone + Send + Sync + 'static>(client: &C) -> Self {
        let waiting = client.clone();
        let mut outcome: std::pin::Pin<
            Box<dyn Future<Output = Result<(), fred::error::Error>> + Send>,
        > = Box::pin(async move { waiting.wait_for_connect().await });
        // Polled once to listen (not connected yet: it subscribes and waits); polled for real by
        // `wait`, which registers its own waker.
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        if let std::task::Poll::Ready(early) = outcome.as_mut().poll(&mut context) {
            outcome = Box::pin(std::future::ready(early));
        }
        Connecting {
            task: Some(client.connect()),
            outcome,
        }
    }

    /// Waits until the first connection is made or fails.
    pub(crate) async fn wait(&mut self) -> Result<(), fred::error::Error> {
        self.outcome.as_mut().await
    }

    /// The client is connected and owned elsewhere from now on, which quits it; hands over the
    /// connection task (see [`watch_connection_task`]).
    pub(crate) fn keep_task(mut self) -> Option<fred::types::ConnectHandle> {
        self.task.take()
    }
}

impl Drop for Connecting {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A pool being connected, as [`Connecting`] does it for one client: each of its clients' connection
/// tasks is aborted if this is dropped before [`ConnectingPool::keep`] (the router's `connect` failed,
/// timed out, or was dropped by its caller). fred's own `Pool::connect` runs the clients' tasks under
/// one task of its own, whose abort would not stop them: they are started one by one here.
pub(crate) struct ConnectingPool {
    tasks: Vec<fred::types::ConnectHandle>,
}

impl ConnectingPool {
    /// Connects every client of `pool`, waiting up to `limit` until all are connected or one failed:
    /// `None` when that took longer. The outcome is listened for before the connection tasks start, as
    /// fred's own `init` does, so that a failure quicker than this task's next poll (a refused
    /// connection) is not missed: with `fail_fast` fred reports it once and stops trying.
    pub(crate) async fn connect(
        pool: &fred::clients::Pool,
        limit: std::time::Duration,
    ) -> (Self, Option<Result<(), fred::error::Error>>) {
        let mut waiting = std::pin::pin!(pool.wait_for_connect());
        let early = futures::poll!(waiting.as_mut());
        let connecting = ConnectingPool {
            tasks: pool.connect_pool(),
        };
        let outcome = match early {
            std::task::Poll::Ready(outcome) => Some(outcome),
            std::task::Poll::Pending => tokio::time::timeout(limit, waiting).await.ok(),
        };
        (connecting, outcome)
    }

    /// The pool is connected and owned elsewhere from now on, which quits it. Hands over the clients'
    /// connection tasks (see [`watch_connection_task`]).
    pub(crate) fn keep(mut self) -> Vec<fred::types::ConnectHandle> {
        std::mem::take(&mut self.tasks)
    }
}

/// Runs `ended` when a client's connection task ends. fred ends it when the client quits, and when its
/// reconnect policy runs out of attempts (`max_reconnect_attempts`): the client then never connects
/// again, and keeps every command written to it until the command timeout.
pub(crate) fn watch_connection_task(
    task: fred::types::ConnectHandle,
    ended: impl FnOnce() + Send + 'static,
) {
    tokio::spawn(async move {
        let _ = task.await;
        ended();
    });
}

/// How many reconnection attempts failed before giving up: "1 attempt", "3 attempts in a row".
pub(crate) fn attempts_in_a_row(attempts: u32) -> String {
    if attempts == 1 {
        "1 attempt".to_string()
    } else {
        format!("{attempts} attempts in a row")
    }
}

/// The error of a router whose connection gave up reconnecting ([`watch_connection_task`]).
pub(crate) fn gave_up_error(settings: &Settings) -> Error {
    let message = match settings.max_reconnect_attempts {
        Some(0) => "the connection to Redis was lost and max_reconnect_attempts(Some(0)) never \
                    reconnects; connect a new router, or allow reconnections"
            .to_string(),
        Some(attempts) => format!(
            "gave up reconnecting to Redis after {} (max_reconnect_attempts); connect a new \
             router, or raise max_reconnect_attempts (None: never give up)",
            attempts_in_a_row(attempts)
        ),
        // fred stops for good only on a configuration error.
        None => "the client stopped reconnecting to Redis for good (a configuration error, in the \
                 logs); connect a new router"
            .to_string(),
    };
    Error::Connection {
        backend: "redis",
        url: redact(&settings.url),
        message,
    }
}

impl Drop for ConnectingPool {
    fn drop(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentcomm_core::backoff::Backoff;

    /// An I/O error wrapping an error whose `Debug` nests brackets and commas (rustls' certificate
    /// errors: `InvalidCertificate(NotValidForNameContext { expected: .., presented: [..] })`) reads
    /// as that whole `Debug`; it was cut at its first `, `, losing the names the certificate
    /// presents.
    #[test]
    fn a_nested_io_error_is_read_whole() {
        #[derive(Debug)]
        #[allow(dead_code)]
        struct NotValidForNameContext {
            expected: (u8, [u8; 4]),
            presented: Vec<String>,
        }
        #[derive(Debug)]
        #[allow(dead_code)]
        enum Refused {
            InvalidCertificate(NotValidForNameContext),
        }
        impl std::fmt::Display for Refused {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{self:?}")
            }
        }
        impl std::error::Error for Refused {}
        let inner = Refused::InvalidCertificate(NotValidForNameContext {
            expected: (4, [127, 0, 0, 1]),
            presented: vec!["DnsName(\"agentcomm.invalid\")".into(), "b, c }".into()],
        });
        let expected = format!("{inner:?}");
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, inner);
        assert_eq!(readable_details(&format!("{io:?}")), expected);
        // The simple cases stay as they were.
        let refused = std::io::Error::from_raw_os_error(111);
        assert_eq!(
            readable_details(&format!("{refused:?}")),
            refused.to_string()
        );
        let other = std::io::Error::other("a \"quoted\" word, and a comma");
        assert_eq!(
            readable_details(&format!("{other:?}")),
            "a \"quoted\" word, and a comma"
        );
    }

    /// With `max_reconnect_attempts(Some(1))` the router's error and a stream reader's health detail
    /// read "after 1 attempts in a row".
    #[test]
    fn the_gave_up_errors_count_their_attempts_in_words_that_agree() {
        let mut settings = Settings::for_tests("redis://127.0.0.1:6379");
        for (attempts, expected) in [(1, "after 1 attempt ("), (3, "after 3 attempts in a row (")] {
            settings.max_reconnect_attempts = Some(attempts);
            for text in [
                gave_up_error(&settings).to_string(),
                crate::streams::reader_gave_up_error(&settings),
            ] {
                assert!(text.contains(expected), "{text}");
                assert!(!text.contains("1 attempts"), "{text}");
            }
        }
    }

    #[test]
    fn sentinel_passwords_are_redacted_too() {
        let url =
            "redis-sentinel://u:pw1@h:26379/0?sentinelServiceName=m&sentinelPassword=pw2&node=h2:1";
        let shown = redact(url);
        assert!(!shown.contains("pw1") && !shown.contains("pw2"), "{shown}");
        assert!(
            shown.contains("sentinelServiceName=m") && shown.contains("node=h2:1"),
            "{shown}"
        );
    }

    #[test]
    fn sentinel_password_with_an_at_sign_is_redacted_whole() {
        let shown =
            redact("redis-sentinel://h:26379/0?sentinelServiceName=m&sentinelPassword=Pa@ssTail99");
        assert!(!shown.contains("ssTail99"), "{shown}");
    }

    #[test]
    fn percent_encoded_sentinel_password_name_is_redacted() {
        // fred reads query names through url's query_pairs, which percent-decodes them.
        let url =
            "redis-sentinel://h:26379/0?sentinelServiceName=m&sentinel%50assword=EncodedNameSecret";
        let config = fred::types::config::Config::from_url(url).unwrap();
        assert!(
            format!("{:?}", config.server).contains("EncodedNameSecret"),
            "fred uses it"
        );
        let shown = redact(url);
        assert!(!shown.contains("EncodedNameSecret"), "{shown}");
    }

    #[test]
    fn a_tls_url_gets_a_crypto_provider_and_a_custom_connector() {
        let mut settings = Settings::for_tests("rediss://:pw@127.0.0.1:6380");
        let config = fred_config(&settings).unwrap();
        assert!(config.tls.is_some());
        assert!(fred::rustls::crypto::CryptoProvider::get_default().is_some());
        let roots = fred::rustls::RootCertStore::empty();
        let client = fred::rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        settings.url = "redis://127.0.0.1:6379".into();
        settings.tls = Some(fred::types::config::TlsConnector::from(client));
        assert!(
            fred_config(&settings).unwrap().tls.is_some(),
            "the connector is used"
        );
    }

    /// A TLS connector given with a Unix socket's URL is refused, naming both: fred took it and
    /// connected over TCP with TLS to a host made of the socket's path.
    #[test]
    fn a_tls_connector_with_a_unix_socket_is_refused() {
        let client = fred::rustls::ClientConfig::builder()
            .with_root_certificates(fred::rustls::RootCertStore::empty())
            .with_no_client_auth();
        for url in [
            "unix:///run/redis.sock",
            "redis+unix://:pw@localhost/run/redis.sock",
        ] {
            let mut settings = Settings::for_tests(url);
            settings.tls = Some(fred::types::config::TlsConnector::from(client.clone()));
            match fred_config(&settings) {
                Ok(config) => panic!("{url} was taken as {:?}", config.server),
                Err(error) => assert!(error.to_string().contains("tls_connector"), "{error}"),
            }
        }
    }

    /// A first connection that fails before anyone waits for it is still reported: the outcome is
    /// listened for before the connection task starts. Before, `wait` subscribed to fred's connect
    /// notice only when first polled: an outcome announced before that was missed, and the caller
    /// waited out its own timeout (a pub/sub subscribe or a stream reader failed after 20 s with "could
    /// not connect"; for a success announced between fred's state check and that subscription, too,
    /// which happened under load in about one run in six of the crate's unit tests).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connect_outcome_announced_before_the_wait_is_not_missed() {
        // Nothing listens on port 1: the connection is refused at once.
        let settings = Settings::for_tests("redis://127.0.0.1:1");
        let config = fred_config(&settings).unwrap();
        let client = fred_builder(&settings, config, Role::Commands)
            .build()
            .unwrap();
        let mut errors = client.error_rx();
        let mut connecting = Connecting::start(&client);
        // The failure is announced before anything waits for the outcome.
        tokio::time::timeout(Duration::from_secs(5), errors.recv())
            .await
            .expect("the connection fails")
            .expect("its error");
        let outcome = tokio::time::timeout(Duration::from_secs(2), connecting.wait())
            .await
            .expect("the outcome announced before the wait is seen");
        assert!(outcome.is_err(), "refused");
    }

    /// The error `fred_config` gives for `url`; panics if it takes it.
    fn refused(url: &str) -> String {
        match fred_config(&Settings::for_tests(url)) {
            Ok(config) => panic!("{url} was taken as {:?}", config.server),
            Err(error) => error.to_string(),
        }
    }

    /// An '@' in the value of a query parameter fred does not read (another client's, such as
    /// redis-py's `client_name`) is refused, as it cannot be told from a password with an unencoded
    /// `?` (`redis://u:12?a=b@h`); the error says to write it `%40`, which is taken. Before, it only
    /// spoke of a password the URL may not have, naming no fix.
    #[test]
    fn an_at_sign_in_another_clients_query_value_is_named_in_the_error() {
        let error = refused("redis://:s3cr3t@h:6379/0?client_name=svc@h1");
        assert!(error.contains("'@' in a query value"), "{error}");
        assert!(error.contains("%40"), "{error}");
        assert!(!error.contains("s3cr3t"), "{error}");
        if let Err(error) = fred_config(&Settings::for_tests(
            "redis://:s3cr3t@h:6379/0?client_name=svc%40h1",
        )) {
            panic!("the encoded form was refused: {error}");
        }
    }

    /// What fred says of a URL it cannot read reaches the user in words: it gave the `url` crate's
    /// error as its `Debug` name (`InvalidPort; accepted: ..`) and a bad database as "Invalid integer
    /// string.; accepted: ..".
    #[test]
    fn a_url_fred_cannot_read_is_refused_in_words() {
        for (url, expected) in [
            (
                "redis://127.0.0.1:99999",
                "the port is not a number from 0 to 65535",
            ),
            ("redis://", "the host is missing or not valid"),
            (
                "redis://127.0.0.1:6379/abc",
                "a number in it does not parse",
            ),
            (
                "redis://127.0.0.1:6379/300",
                "a number in it does not parse",
            ),
            (
                "redis://127.0.0.1:6379/0/1",
                "after the host comes at most one '/' and a database number",
            ),
        ] {
            let error = refused(url);
            assert!(
                error.contains(&format!("is not valid: {expected}")),
                "{url}: {error}"
            );
            assert!(!error.contains(".;"), "{url}: {error}");
        }
    }

    /// A URL whose scheme is none of the accepted ones is refused, naming the accepted forms. Before,
    /// fred read any other scheme as a single server's: `http://` connected, and a mistyped
    /// `redis-clustr://` connected to the first node as if it were a lone server, silently.
    #[test]
    fn a_url_of_another_scheme_is_refused_with_the_accepted_forms() {
        for url in [
            "http://127.0.0.1:6379",
            "redis-clustr://127.0.0.1:7000",
            "redis+cluster://127.0.0.1:7000",
        ] {
            let error = refused(url);
            assert!(
                error.contains("is not supported") && error.contains("accepted: redis://"),
                "{url}: {error}"
            );
        }
    }

    /// A password holding an unencoded `/`, `?` or `#` ends the URL's authority early, and fred's
    /// error named a port or a number ("InvalidPort", "Invalid integer string"): the error now says to
    /// percent-encode them, and shows no password. The hint is not given where no `@` follows the
    /// authority's end, or where it stands in query parameters; it is where the authority has an `@`
    /// of its own too (a password with an unencoded `@` before its `/`).
    #[test]
    fn a_password_with_an_unencoded_slash_question_mark_or_hash_is_named_in_the_error() {
        let hint = "must be percent-encoded: %2F, %3F, %23";
        for url in [
            "redis://u:12/secret@h",
            "redis://u:se/cret@h:6379/0",
            "redis://:12/secret@h",
            "redis://u:se?cret@h:6379",
            "redis://u:se#cret@h:6379",
            // An unencoded '@' before the '/': fred read host `se` and database `cret@h:6379`.
            "redis://u:p@se/cret@h:6379",
            // Taken by fred, wrongly: host `u`, port 12, no password; host `se`, password `p`.
            "redis://u:12#secret@h",
            "redis://u:12?secret@h:6379",
            "redis://u:p@se#cret@h:6379",
            "rediss://:12#secret@h",
            // A password whose end after the '?' reads as a parameter: host `u`, port 12, before.
            "redis://u:12?se=cret@h",
            "redis://u:6379?a=b&se=cret@h:6380/0",
            // A '#' in a Sentinel password: fred read the password `p`.
            "redis-sentinel://h:26379/0?sentinelServiceName=m&sentinelPassword=p#se@cret",
            // A password whose end reads as a Sentinel parameter, in a URL that is not a Sentinel's
            // (fred reads none there): taken as host `u`, port 12, no password, before.
            "redis://u:12?sentinelPassword=se@cret:6379",
            "redis-cluster://u:12?sentinelServiceName=se@cret:7000",
            "rediss://u:12?sentinelUsername=se@cret",
        ] {
            let error = refused(url);
            assert!(error.contains(hint), "{url}: {error}");
            assert!(
                !error.contains("secret") && !error.contains("cret@"),
                "{error}"
            );
        }
        for url in [
            "redis://u:pw@h:99999",
            "redis-sentinel://h:26379/x?sentinelServiceName=m&sentinelPassword=p@ss",
            // Empty pieces between the parameters are read past, as fred does.
            "redis-sentinel://h:99999/0?sentinelServiceName=m&&sentinelPassword=p@ss",
        ] {
            let error = refused(url);
            assert!(!error.contains(hint), "{url}: {error}");
        }
    }

    /// The URL forms fred reads that the builder took before its URLs were checked are still taken:
    /// fred's own `redis+unix://` and the `valkey` schemes, a URL with surrounding whitespace (read from
    /// a file with its newline: fred's URL parser trims it), and a Sentinel password with `@` and `:`
    /// in the query. The scheme check refused the first ones, and its host check the others (it took
    /// the text after the query's `@` as the host).
    #[test]
    fn the_url_forms_fred_reads_are_still_taken_by_the_builder() {
        for url in [
            "redis+unix:///run/redis.sock",
            "REDIS+UNIX:///run/redis.sock",
            "valkey://127.0.0.1:6379",
            "valkeys-cluster://127.0.0.1:7000",
            "redis://127.0.0.1:6379\n",
            " redis://127.0.0.1:6379 ",
            "redis-sentinel://127.0.0.1:26379/0?sentinelServiceName=m&sentinelPassword=p@ss:word",
            // A socket's path may hold an '@'.
            "unix:///run/user@1000/redis.sock",
            "redis+unix:///run/user@1000/redis.sock",
            // A parameter without a value, which fred reads past, before a Sentinel password.
            "redis-sentinel://127.0.0.1:26379/0?sentinelServiceName=m&tls&sentinelPassword=p@ss",
            "redis-sentinel://127.0.0.1:26379/0?sentinelServiceName=m&sentinelUsername=u@corp&sentinelPassword=p@ss",
        ] {
            if let Err(error) = fred_config(&Settings::for_tests(url)) {
                panic!("{url:?} was refused: {error}");
            }
        }
    }

    /// TLS to a cluster or through Sentinel (`rediss-cluster://`, `rediss-sentinel://`, which fred
    /// reads) is accepted from `REDIS_URL` too. Before, `from_env` refused both: a TLS cluster could
    /// not be reached from the environment at all (`rediss://` is a single server).
    #[test]
    fn tls_cluster_and_sentinel_urls_are_accepted_from_the_environment() {
        for url in [
            "rediss-cluster://:pw@10.0.0.1:7000?node=10.0.0.2:7000",
            "rediss-sentinel://:pw@10.0.0.1:26379/0?sentinelServiceName=m",
        ] {
            let builder = crate::RedisRouterBuilder::from_lookup(|name| {
                (name == "REDIS_URL").then(|| url.to_string())
            })
            .unwrap_or_else(|error| panic!("{url}: {error}"));
            let config = fred_config(builder.settings()).unwrap();
            assert!(config.tls.is_some(), "{url}: TLS");
            assert!(
                matches!(
                    config.server,
                    fred::types::config::ServerConfig::Clustered { .. }
                        | fred::types::config::ServerConfig::Sentinel { .. }
                ),
                "{url}: {:?}",
                config.server
            );
        }
    }

    /// What a URL asks for that fred would not do is refused, naming the fix: a database on a
    /// cluster's URL, a `db=` parameter (other clients' form), credentials in the query, and a
    /// cluster's or Sentinel's parameters under another scheme. Before, each was taken and ignored:
    /// the router used database 0, sent no password, or connected to the one host as a lone server.
    #[test]
    fn url_parts_fred_would_ignore_are_refused_with_the_fix() {
        for (url, expected) in [
            (
                "redis-cluster://127.0.0.1:7000/3",
                "a Redis Cluster has only database 0",
            ),
            (
                "rediss-cluster://:pw@127.0.0.1:7000/1?node=h:7001",
                "has only database 0",
            ),
            ("redis-cluster://127.0.0.1:7000?db=2", "has only database 0"),
            ("redis://127.0.0.1:6379?db=3", "redis://host:port/3"),
            (
                "redis://:s3cr3t@127.0.0.1:6379/0?client_name=a&database=3",
                "'database'",
            ),
            (
                "redis-sentinel://h:26379?sentinelServiceName=m&db=1",
                "redis-sentinel://host:port/3?sentinelServiceName=name",
            ),
            (
                "redis://127.0.0.1:6379?password=s3cr3t",
                "credentials go before the host",
            ),
            (
                "redis://127.0.0.1:6379/0?node=127.0.0.1:6380",
                "use redis-cluster://",
            ),
            ("unix:///run/redis.sock?node=h:1", "use redis-cluster://"),
            (
                "redis://127.0.0.1:26379/0?sentinelServiceName=m",
                "use redis-sentinel://",
            ),
            (
                "redis-cluster://h:7000?sentinelPassword=s3cr3t",
                "use redis-sentinel://",
            ),
            (
                "unix:///run/redis.sock?db=x",
                "'db=x' is not a database number",
            ),
        ] {
            let error = refused(url);
            assert!(error.contains(expected), "{url}: {error}");
            assert!(!error.contains("s3cr3t"), "{error}");
        }
        for (url, database) in [
            ("redis-cluster://127.0.0.1:7000/0?node=127.0.0.1:7001", None),
            ("redis-cluster://127.0.0.1:7000/", None),
            (
                "redis://127.0.0.1:6379/4?client_name=svc&protocol=resp3",
                Some(4),
            ),
            (
                "redis-sentinel://h:26379/2?sentinelServiceName=m&node=h2:26379",
                Some(2),
            ),
            // A Unix socket's database, as other clients write it: fred had no way to choose one.
            ("unix:///run/redis.sock?db=5", Some(5)),
            (
                "redis+unix://:pw@localhost/run/redis.sock?database=6",
                Some(6),
            ),
        ] {
            let config = fred_config(&Settings::for_tests(url))
                .unwrap_or_else(|error| panic!("{url} was refused: {error}"));
            assert_eq!(config.database, database, "{url}");
        }
    }

    /// A `db` parameter that names the database the URL selects anyway is nothing fred ignores:
    /// `redis://h:6379?db=0` (a URL copied from another client's settings) and `redis://h/2?db=2`
    /// connected to that database before `db` parameters were checked, and are taken. One that names
    /// another database is still refused.
    #[test]
    fn a_db_parameter_naming_the_database_the_url_selects_is_taken() {
        for (url, database) in [
            ("redis://127.0.0.1:6379?db=0", None),
            ("redis://127.0.0.1:6379/2?db=2", Some(2)),
            (
                "rediss://127.0.0.1:6380/0?database=0&protocol=resp3",
                Some(0),
            ),
            ("redis-cluster://127.0.0.1:7000?db=0", None),
            (
                "redis-sentinel://h:26379/1?sentinelServiceName=m&db=1",
                Some(1),
            ),
        ] {
            let config = fred_config(&Settings::for_tests(url))
                .unwrap_or_else(|error| panic!("{url} was refused: {error}"));
            assert_eq!(config.database, database, "{url}");
        }
        for url in [
            "redis://127.0.0.1:6379/2?db=0",
            "redis://127.0.0.1:6379?db=0&db=3",
            "redis-cluster://127.0.0.1:7000?db=1",
        ] {
            refused(url);
        }
    }

    /// The fix a refused query parameter names fits the URL's form: a Unix socket's credentials go
    /// before a host fred reads past (`redis://user:password@host:port` would be a TCP server), and a
    /// Sentinel URL's database is the number after its host, in the Sentinel form.
    #[test]
    fn a_refused_parameter_names_the_fix_for_the_urls_form() {
        for (url, expected) in [
            (
                "unix:///run/redis.sock?db=3&pass=s3cr3t",
                "redis+unix://user:password@localhost/path/to/redis.sock",
            ),
            (
                "unix:///run/redis.sock?password=s3cr3t",
                "redis+unix://user:password@localhost/path/to/redis.sock",
            ),
            (
                "redis-sentinel://h:26379?sentinelServiceName=m&db=2",
                "redis-sentinel://host:port/3?sentinelServiceName=name",
            ),
            // A Sentinel's or a cluster's credentials in a parameter were told the single-server form,
            // which drops the Sentinels or the other nodes.
            (
                "redis-sentinel://h:26379?sentinelServiceName=m&password=s3cr3t",
                "redis-sentinel://user:password@host:port/0?sentinelServiceName=name",
            ),
            (
                "redis-cluster://h:7000?password=s3cr3t",
                "redis-cluster://user:password@host:port?node=host2:port2",
            ),
        ] {
            let error = refused(url);
            assert!(error.contains(expected), "{url}: {error}");
            assert!(!error.contains("s3cr3t"), "{error}");
        }
    }

    #[test]
    fn a_unix_socket_url_is_read_in_any_letter_case() {
        for url in ["unix:///run/redis.sock", "UNIX:///run/redis.sock"] {
            let config = fred_config(&Settings::for_tests(url)).unwrap();
            assert!(
                matches!(&config.server, fred::types::config::ServerConfig::Unix { path } if path.to_str() == Some("/run/redis.sock")),
                "{url}: {:?}",
                config.server
            );
        }
    }

    /// With the defaults, connections that have been failing for a while do not retry in step: each
    /// policy's longest delay is its own, from 8 to 10 s. Before, fred's cap took the jitter off
    /// (`min(max, delay + jitter)`), and every connection of every router retried exactly every 10 s.
    #[test]
    fn the_longest_reconnect_delay_keeps_a_jitter() {
        let settings = Settings::for_tests("redis://127.0.0.1:6379");
        let longest: Vec<u64> = (0..32)
            .map(|_| {
                let mut policy = reconnect_policy(&settings).expect("reconnects forever");
                // 50 ms doubling: capped from the ninth attempt on.
                (0..40)
                    .map(|_| policy.next_delay().unwrap())
                    .last()
                    .unwrap()
            })
            .collect();
        assert!(
            longest.iter().all(|ms| (8_000..=10_000).contains(ms)),
            "{longest:?}"
        );
        let distinct: std::collections::HashSet<_> = longest.iter().collect();
        assert!(distinct.len() > 8, "in step: {longest:?}");
        // A full jitter shortens it by half at most: no connection retries every few milliseconds.
        let mut settings = settings;
        settings.reconnect = settings.reconnect.jitter(1.0);
        for _ in 0..32 {
            let mut policy = reconnect_policy(&settings).unwrap();
            let longest = (0..40)
                .map(|_| policy.next_delay().unwrap())
                .last()
                .unwrap();
            assert!((5_000..=10_000).contains(&longest), "{longest}");
        }
    }

    /// Each connection of the pool has its own longest delay: fred's `build_pool` copied one policy
    /// into every connection, so a router's pool retried in step.
    #[test]
    fn each_pool_connection_has_its_own_longest_delay() {
        let mut settings = Settings::for_tests("redis://127.0.0.1:6379");
        settings.pool_size = 8;
        let config = fred_config(&settings).unwrap();
        let pool = fred_pool(&settings, &config).unwrap();
        assert_eq!(pool.clients().len(), 8);
        let longest: std::collections::HashSet<u64> = pool
            .clients()
            .iter()
            .map(|client| {
                let mut policy = client
                    .client_reconnect_policy()
                    .expect("reconnects forever");
                (0..40)
                    .map(|_| policy.next_delay().unwrap())
                    .last()
                    .unwrap()
            })
            .collect();
        assert!(longest.len() > 1, "in step: {longest:?}");
    }

    #[test]
    fn the_reconnect_policy_follows_the_backoff() {
        let mut settings = Settings::for_tests("redis://127.0.0.1:6379");
        settings.reconnect = Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
            .multiplier(3.0)
            .jitter(0.0);
        let mut policy = reconnect_policy(&settings).expect("reconnects");
        let delays: Vec<u64> = (0..5).map(|_| policy.next_delay().unwrap()).collect();
        // 100, 300, 900, 2,700 then capped, each plus up to 20 ms of jitter.
        for (delay, expected) in delays.iter().zip([100u64, 300, 900, 2_700, 5_000]) {
            assert!(*delay >= expected && *delay <= expected + 20, "{delays:?}");
        }
        settings.max_reconnect_attempts = Some(0);
        assert!(
            reconnect_policy(&settings).is_none(),
            "Some(0): never reconnect"
        );
        settings.max_reconnect_attempts = Some(2);
        let mut policy = reconnect_policy(&settings).unwrap();
        assert!(policy.next_delay().is_some() && policy.next_delay().is_some());
        assert!(policy.next_delay().is_none(), "gives up after 2 attempts");
    }
}
