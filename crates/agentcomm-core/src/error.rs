//! The one error type of agentcomm-core, and the result alias used everywhere.
//!
//! Every message says what happened and what to do next. Backend crates wrap their client's errors in
//! [`Error::Connection`] or [`Error::Backend`] instead of leaking the client's own types.

use std::fmt;
use std::time::Duration;

use crate::message::ValidationError;

/// The result type of agentcomm.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The shape every well-formed channel has; part of the [`Error::InvalidChannelFormat`] text.
pub const EXPECTED_CHANNEL_FORMAT: &str = "MessageClass:direction:session_id";

/// Everything that can go wrong in agentcomm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A string that should be a channel is not one.
    #[error("Channel '{channel}' has invalid format. Expected: '{expected}', got: '{channel}'{}", detail_suffix(.detail))]
    InvalidChannelFormat {
        /// The string that was given.
        channel: String,
        /// The format that was expected.
        expected: String,
        /// What exactly is wrong, when that is more than the shape.
        detail: Option<String>,
    },

    /// One component of a channel (class, direction or session) cannot be used.
    #[error(
        "invalid channel {component} '{value}': {reason}. Use a non-empty value without ':', '*', whitespace or control characters{}",
        extra_hint(.forbidden)
    )]
    InvalidChannelComponent {
        /// `class`, `direction` or `session`.
        component: &'static str,
        /// The value that was given.
        value: String,
        /// Why it cannot be used.
        reason: String,
        /// The further character the message's channel template forbids, if any (quoted).
        forbidden: String,
    },

    /// A message class arrived that no known message type has.
    #[error(
        "Message class '{class}' is not registered with {registry}. Derive `Message` for the type and list it in `#[agent(receives = [...])]`"
    )]
    MessageClassNotRegistered {
        /// The class that was not found.
        class: String,
        /// Where it was looked up (an agent name, usually).
        registry: String,
    },

    /// A message was published where no agent receives it.
    #[error(
        "No agent found for message class '{class}' on channel '{channel}': nothing is subscribed there. Spawn an agent that receives `{class}` before publishing, or check the session"
    )]
    NoAgentFound {
        /// The class of the message.
        class: String,
        /// The channel it was published to.
        channel: String,
    },

    /// An agent cannot be used as declared.
    #[error("Invalid agent '{agent}': {reason}")]
    InvalidAgent {
        /// The agent's name.
        agent: String,
        /// What is wrong and how to fix it.
        reason: String,
    },

    /// A handler replied with another class than the requester waits for.
    #[error(
        "the requester expects a reply of class '{expected}' (reply_to '{reply_to}'), not '{got}': reply with `{expected}`, or change the reply type the request waits for"
    )]
    UnexpectedReply {
        /// The class the requester waits for.
        expected: String,
        /// The class the handler replied with.
        got: String,
        /// The request's reply_to.
        reply_to: String,
    },

    /// The agent that received a request dead-lettered it instead of answering (its handler failed on
    /// every attempt, refused it, or could not decode it): no reply will come.
    #[error("{0}")]
    RequestFailed(Box<RequestFailure>),

    /// A message failed its own validation rules.
    #[error("invalid {class}: {source}")]
    Validation {
        /// The message class.
        class: String,
        /// The field and the rule it broke.
        #[source]
        source: ValidationError,
    },

    /// Encoding or decoding failed.
    #[error("could not {operation} {subject}: {message}")]
    Codec {
        /// `encode` or `decode`.
        operation: &'static str,
        /// What was being encoded or decoded (a class, or `envelope`).
        subject: String,
        /// The codec's own explanation.
        message: String,
    },

    /// A broker could not be reached, or the connection was lost.
    #[error(
        "cannot reach {backend} at {url}: {message}. Check that the broker is running and the URL is right"
    )]
    Connection {
        /// The backend, such as `redis` or `rabbitmq`.
        backend: &'static str,
        /// The URL, with any password replaced by `***`.
        url: String,
        /// What the client reported.
        message: String,
    },

    /// The broker refused or failed an operation.
    #[error("{backend}: {message}")]
    Backend {
        /// The backend, such as `redis` or `rabbitmq`.
        backend: &'static str,
        /// What happened and what to do.
        message: String,
    },

    /// Something did not complete in time.
    #[error("timed out after {after:?} waiting for {operation}")]
    Timeout {
        /// What was waited for.
        operation: String,
        /// How long it was waited for.
        after: Duration,
    },

    /// A message was not published because of something else (another message of its batch was invalid).
    #[error("not published: {reason}")]
    NotPublished {
        /// Why.
        reason: String,
    },

    /// The router, subscription or runtime was closed.
    #[error("{what} is closed: {hint}")]
    Closed {
        /// What is closed.
        what: &'static str,
        /// What to do about it.
        hint: &'static str,
    },

    /// A shutdown was no longer waited for: the process was asked to stop again (a second Ctrl-C or
    /// SIGTERM during [`Runtime::shutdown_on_signal`](crate::runtime::Runtime::shutdown_on_signal)).
    /// The shutdown goes on in the background, but once the process ends, the messages its handlers
    /// still hold, and those buffered for them, are lost on the in-memory router and Redis pub/sub,
    /// and delivered again on RabbitMQ (when the connection closes) and Redis Streams (once
    /// another consumer claims them, after `claim_idle`).
    #[error(
        "asked to stop again ({signal}) while shutting down: stopped waiting for the handlers still \
         running, and the router may not be closed; once the process ends, the messages they hold \
         are lost on the in-memory router and Redis pub/sub, and delivered again on RabbitMQ and \
         Redis Streams"
    )]
    Interrupted {
        /// The second signal: `SIGINT` (Ctrl-C) or `SIGTERM`; on Windows, `Ctrl-C`.
        signal: &'static str,
    },

    /// The backend cannot do what was asked.
    #[error("{backend} does not support {feature}: {fix}")]
    Unsupported {
        /// The backend.
        backend: String,
        /// The feature that was asked for.
        feature: &'static str,
        /// What to do instead.
        fix: &'static str,
    },

    /// A configuration value is wrong.
    #[error("{variable}='{value}' is not valid: {expected}")]
    Config {
        /// The environment variable or setting; for a value [`Config::load`](crate::config::Config::load)
        /// read from an env file (the process environment not setting it), followed by the file:
        /// `MESSAGING_BACKEND (from ./.env)`.
        variable: String,
        /// The value that was given (with any password replaced by `***`).
        value: String,
        /// What is accepted.
        expected: String,
    },

    /// Logging could not be set up.
    #[error(transparent)]
    Logging(#[from] crate::logging::LoggingError),
}

fn detail_suffix(detail: &Option<String>) -> String {
    match detail {
        Some(detail) => format!(" ({detail})"),
        None => String::new(),
    }
}

fn extra_hint(forbidden: &str) -> String {
    if forbidden.is_empty() {
        String::new()
    } else {
        format!(" (this message's channel template also forbids {forbidden})")
    }
}

impl Error {
    /// A decoding error for `subject`.
    pub fn decode(subject: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Error::Codec {
            operation: "decode",
            subject: subject.into(),
            message: message.to_string(),
        }
    }

    /// An encoding error for `subject`.
    pub fn encode(subject: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Error::Codec {
            operation: "encode",
            subject: subject.into(),
            message: message.to_string(),
        }
    }

    /// Whether retrying the same operation later may succeed (lost connections, timeouts).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Connection { .. } | Error::Timeout { .. } | Error::Backend { .. }
        )
    }
}

/// Hides what a URL may carry of credentials, for logs and errors: the password of its user part
/// (`scheme://user:password@host`, or a lone token `scheme://token@host`), and the values of query
/// parameters whose names speak of a password, secret, token or auth (`sentinelPassword=`,
/// `password=`), names compared percent-decoded and in any case. What cannot be told apart safely is
/// hidden whole: an `@` in the query outside such a parameter hides everything after `scheme://`; a
/// text that is not a URL is hidden whole when it has an `@` or a `?`. A `host:port` whose port is no
/// number, with no `@` before it, may be a user and a password left without their host
/// (`amqp://guest:password`): what follows the `:` is hidden, the host (or user name) is shown.
///
/// ```
/// use agentcomm_core::error::redact_url;
/// assert_eq!(redact_url("redis://:s3cret@127.0.0.1:6379/0"), "redis://:***@127.0.0.1:6379/0");
/// assert_eq!(redact_url("amqp://guest:guest@localhost:5672/%2f"), "amqp://guest:***@localhost:5672/%2f");
/// assert_eq!(redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
/// assert_eq!(redact_url("redis://localhost:abc/0"), "redis://localhost:***");
/// assert_eq!(
///     redact_url("redis-sentinel://h:26379/0?sentinelServiceName=m&sentinelPassword=Pa@ss"),
///     "redis-sentinel://h:26379/0?sentinelServiceName=m&sentinelPassword=***"
/// );
/// ```
pub fn redact_url(url: &str) -> String {
    // What precedes the first "://" is a scheme only when it reads as one: in a URL without its
    // scheme, that "://" may be a later one (`user:pw@host/0?next=http://proxy`), after the password.
    // Text a value often carries by mistake around it (quotes, `REDIS_URL=`) is shown with the scheme.
    let scheme_end = url
        .find("://")
        .filter(|&end| split_scheme(&url[..end]).is_some());
    let Some(scheme_end) = scheme_end else {
        // Not a URL (a typo): it may hold credentials anywhere.
        return if url.contains(['@', '?']) {
            "***".to_string()
        } else {
            url.to_string()
        };
    };
    let (head, rest) = url.split_at(scheme_end + 3);
    let hidden = || format!("{head}***");
    // Text without an '@' that is no `host:port`: what precedes its first ':' is a host or a user
    // name, neither of them secret; what follows it may be a password (a bracketed IPv6 address
    // is shown whole).
    let host_or_user = |text: &str| {
        let ipv6 = text
            .strip_prefix('[')
            .and_then(|inner| inner.split_once("]:"))
            .filter(|(address, _)| {
                address
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
            })
            .map(|(address, _)| address.len() + 2);
        match ipv6.or_else(|| text.find(':')) {
            Some(colon) => format!("{head}{}:***", &text[..colon]),
            None => hidden(),
        }
    };
    let Some(question) = rest.find('?') else {
        // The user part ends at the last '@': a password may contain '/', '#' or '@' unencoded.
        return match rest.rfind('@') {
            Some(at) => format!("{head}{}{}", redact_userinfo(&rest[..at]), &rest[at..]),
            // No '@' and no host: the user part left without its host (`redis://:password`,
            // `amqp://guest:password`) reads as `host:port` with a port that is no number. A closing
            // quote or bracket, or a space, after the port is no part of it (`"redis://cache:6379"`),
            // when the quote or bracket was opened before the scheme: else it may end a password of
            // digits (`amqp://guest:2024)`), which would read as a port.
            None if !looks_like_hosts(rest.trim_end_matches(|c: char| {
                let opener = match c {
                    '>' => '<',
                    ')' => '(',
                    c => c,
                };
                c.is_whitespace()
                    || (matches!(c, '"' | '\'' | '`' | '>' | ')') && head.contains(opener))
            })) =>
            {
                host_or_user(rest)
            }
            None => url.to_string(),
        };
    };
    let (query, visible_at) = redact_query(&rest[question + 1..]);
    if visible_at {
        // An '@' that no hidden parameter holds: in the query, or in a password with a '?' in it.
        return hidden();
    }
    let before_query = &rest[..question];
    let (userinfo, after_userinfo) = match before_query.rfind('@') {
        Some(at) => (redact_userinfo(&before_query[..at]), &before_query[at..]),
        None => (String::new(), before_query),
    };
    if !looks_like_hosts(after_userinfo.trim_start_matches('@')) {
        // `app:pass?word@host`: what follows the ':' before the '?' is a password, not a port.
        return match before_query.contains('@') {
            false => host_or_user(before_query),
            true => hidden(),
        };
    }
    format!("{head}{userinfo}{after_userinfo}?{query}")
}

/// Whether `text` reads as a URL scheme: a letter, then letters, digits, `+`, `-` or `.` (RFC 3986).
pub(crate) fn is_scheme(text: &str) -> bool {
    text.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// The text before a URL's "://" as (what precedes the scheme, the scheme, what follows it), when it
/// is a scheme, possibly with text around it that a value often carries by mistake and that cannot
/// hold a credential: whitespace, quotes or brackets (`"redis`, `<amqp`, `redis `), after a variable
/// name ending in `URL` and a `=` (`REDIS_URL=redis`, `export REDIS_URL='redis`). Anything else
/// (`user:pw@host/0?next=http`, a URL without its scheme with a URL in its query) is no scheme.
pub(crate) fn split_scheme(before: &str) -> Option<(&str, &str, &str)> {
    let trimmed = before.trim_end();
    let start = trimmed
        .char_indices()
        .rfind(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
        .map_or(0, |(at, c)| at + c.len_utf8());
    let (prefix, scheme) = trimmed.split_at(start);
    let wrapping = |text: &str| {
        text.chars()
            .all(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '(' | '['))
    };
    let name_then_wrapping = |text: &str| {
        let text = text.trim_start();
        let text = text.strip_prefix("export ").unwrap_or(text);
        text.split_once('=').is_some_and(|(name, after)| {
            let name = name.trim_end();
            name.ends_with("URL")
                && name
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
                && wrapping(after)
        })
    };
    (is_scheme(scheme) && (wrapping(prefix) || name_then_wrapping(prefix)))
        .then(|| (prefix, scheme, &before[trimmed.len()..]))
}

/// `user:***`, `***` for a lone token, nothing for nothing.
fn redact_userinfo(userinfo: &str) -> String {
    match userinfo.find(':') {
        Some(colon) => format!("{}:***", &userinfo[..colon]),
        // A lone user part may itself be a token (`redis://token@host`): hidden too.
        None if userinfo.is_empty() => String::new(),
        None => "***".to_string(),
    }
}

/// The query with the values of secret parameters hidden, and whether an `@` is still shown. A secret
/// with an unencoded `&` in it leaves its rest as pieces after it (`sentinelPassword=ab&cd=ef`): after
/// a secret, a piece without `=` is dropped, and one with `=` is hidden whole (`***`) unless its name
/// is one a client of ours reads ([`KNOWN_PARAMETERS`]), which ends the secret.
fn redact_query(query: &str) -> (String, bool) {
    let mut out = String::with_capacity(query.len());
    let mut in_secret = false;
    for (index, parameter) in query.split('&').enumerate() {
        let shown = match parameter.split_once('=') {
            // A parameter a client reads is no secret, though its name may look like one
            // (`auth_mechanism`): hidden, it took the parameters after it along.
            Some((name, _)) if is_secret_name(name) && !is_known_parameter(name) => {
                in_secret = true;
                format!("{name}=***")
            }
            None if in_secret => continue,
            Some((name, _)) if in_secret && !is_known_parameter(name) => "***".to_string(),
            _ => {
                in_secret = false;
                parameter.to_string()
            }
        };
        if index > 0 {
            out.push('&');
        }
        out.push_str(&shown);
    }
    let visible_at = out.contains('@');
    (out, visible_at)
}

/// The query parameters our clients read (fred's for Redis, the RabbitMQ URI's for AMQP) and a few
/// common ones: after a secret parameter, a piece of another name may be the rest of the secret.
const KNOWN_PARAMETERS: &[&str] = &[
    "sentinelServiceName",
    "sentinelUsername",
    "node",
    "db",
    "protocol",
    "heartbeat",
    "connection_timeout",
    "channel_max",
    "frame_max",
    "auth_mechanism",
    "cacertfile",
    "certfile",
    "keyfile",
    "verify",
    "fail_if_no_peer_cert",
    "server_name_indication",
];

/// Whether `name` is one of [`KNOWN_PARAMETERS`], in any letter case.
fn is_known_parameter(name: &str) -> bool {
    KNOWN_PARAMETERS
        .iter()
        .any(|known| known.eq_ignore_ascii_case(name))
}

/// Whether `authority` (up to its path) is hosts: names or addresses, each with a numeric port if any
/// (`h1:26379,h2:26379`, `[::1]:6379`, nothing for `unix:///path`).
fn looks_like_hosts(authority: &str) -> bool {
    let hosts = authority.split('/').next().unwrap_or("");
    hosts.split(',').all(|host| {
        if let Some(bracketed) = host.strip_prefix('[') {
            return bracketed
                .split_once(']')
                .is_some_and(|(_, port)| port.is_empty() || numeric_port(port.strip_prefix(':')));
        }
        match host.rsplit_once(':') {
            // A port after no host name is a password's start (`redis://:2024?token=x@host`).
            Some((name, port)) => !name.is_empty() && numeric_port(Some(port)),
            None => true,
        }
    })
}

fn numeric_port(port: Option<&str>) -> bool {
    port.is_some_and(|port| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether a query parameter's name (percent-decoded, in any case) speaks of a password, secret,
/// token, auth, credential, API key or access key.
fn is_secret_name(name: &str) -> bool {
    let mut decoded = Vec::with_capacity(name.len());
    let bytes = name.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[at],
            bytes.get(at + 1).copied(),
            bytes.get(at + 2).copied(),
        ) {
            (b'%', Some(high), Some(low)) if hex(high).is_some() && hex(low).is_some() => {
                decoded.push((hex(high).unwrap_or(0) * 16 + hex(low).unwrap_or(0)) as u8);
                at += 3;
            }
            (b'+', _, _) => {
                decoded.push(b' ');
                at += 1;
            }
            (byte, _, _) => {
                decoded.push(byte);
                at += 1;
            }
        }
    }
    let name = String::from_utf8_lossy(&decoded).to_ascii_lowercase();
    [
        "pass",
        "pwd",
        "secret",
        "token",
        "auth",
        "credential",
        "apikey",
        "api_key",
        "api-key",
        "api key",
        "accesskey",
        "access_key",
        "access-key",
        "access key",
    ]
    .iter()
    .any(|word| name.contains(word))
}

/// What a requester learns when the agent that received its request dead-lettered it
/// ([`Error::RequestFailed`]): what the dead letter says.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RequestFailure {
    /// The request's message class.
    pub class: &'static str,
    /// The request's message id (the dead letter's `agentcomm-original-id`).
    pub request_id: crate::envelope::MessageId,
    /// The agent that dead-lettered it.
    pub agent: String,
    /// Why it was dead-lettered: one of the `headers::REASON_*` values.
    pub reason: String,
    /// How many attempts were made.
    pub attempts: u32,
    /// The error of the last attempt.
    pub error: String,
}

impl fmt::Display for RequestFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let RequestFailure {
            class,
            request_id,
            agent,
            reason,
            attempts,
            error,
        } = self;
        write!(
            f,
            "the {class} request {request_id} failed in agent '{agent}' and was dead-lettered ({reason}, after {attempts} attempt(s)): {error}; its dead letter is on 'DeadLetter:{class}:*' with agentcomm-original-id {request_id}"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_in_every_shape() {
        assert_eq!(redact_url("rediss://user:pw@h:1"), "rediss://user:***@h:1");
        assert_eq!(redact_url("redis://token@h"), "redis://***@h");
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(redact_url("amqp://u:p@ss@h/v"), "amqp://u:***@h/v");
        // Passwords that were not percent-encoded and contain URL delimiters.
        assert_eq!(
            redact_url("amqp://app:Xy/9ab@mq/prod"),
            "amqp://app:***@mq/prod"
        );
        // A '?' in a password cannot be told from a query's: everything is hidden.
        assert_eq!(redact_url("redis://:a?b#c@h:6379/0"), "redis://***");
        // Credentials in the query, and an '@' inside one.
        let sentinel = "redis-sentinel://u:pw@s1:26379,s2:26379/0?sentinelServiceName=m&sentinelPassword=S3cret&node=s3:1";
        assert_eq!(
            redact_url(sentinel),
            "redis-sentinel://u:***@s1:26379,s2:26379/0?sentinelServiceName=m&sentinelPassword=***&node=s3:1"
        );
        assert_eq!(
            redact_url(
                "redis-sentinel://h:26379/0?sentinelServiceName=m&sentinelPassword=Pa@ssTail99"
            ),
            "redis-sentinel://h:26379/0?sentinelServiceName=m&sentinelPassword=***"
        );
        assert_eq!(
            redact_url("redis-sentinel://h:1/0?sentinel%50assword=Encoded&SENTINELPASSWORD=Upper"),
            "redis-sentinel://h:1/0?sentinel%50assword=***&SENTINELPASSWORD=***"
        );
        assert_eq!(
            redact_url(
                "amqps://app:pw@mq:5671/prod?cacertfile=/ca.pem&keyfile=/k.pem&password=KeyPass"
            ),
            "amqps://app:***@mq:5671/prod?cacertfile=/ca.pem&keyfile=/k.pem&password=***"
        );
        assert_eq!(
            redact_url("amqp://mq/prod?heartbeat=10&x=y@z"),
            "amqp://***",
            "an '@' in a parameter that is not hidden: nothing shown"
        );
        // A secret with an unencoded '&' and a later '=' leaves its rest as a piece of its own: hidden
        // whole, up to a parameter a client reads.
        assert_eq!(
            redact_url("amqp://mq/prod?auth_token=T0k&x=y@z"),
            "amqp://mq/prod?auth_token=***&***"
        );
        assert_eq!(
            redact_url(
                "redis-sentinel://h:26379/0?sentinelPassword=Ab1&Cd2=Ef3&Gh4&node=h2:1&sentinelServiceName=m"
            ),
            "redis-sentinel://h:26379/0?sentinelPassword=***&***&node=h2:1&sentinelServiceName=m"
        );
        assert_eq!(
            redact_url("amqp://u@mq/prod?password=Ab1&Cd2=Ef3&HEARTBEAT=10"),
            "amqp://***@mq/prod?password=***&***&HEARTBEAT=10"
        );
        // `auth_mechanism` names a mechanism, not a secret: shown, and so is what follows it.
        assert_eq!(
            redact_url("amqps://u:pw@mq/prod?auth_mechanism=external&hearbeat=5&auth=T0k"),
            "amqps://u:***@mq/prod?auth_mechanism=external&hearbeat=5&auth=***"
        );
        // API keys and credentials by their usual names, however spelled.
        assert_eq!(
            redact_url("redis://cache:6379/0?apikey=K3y&ApiKey=K3y&api_key=K3y&db=1"),
            "redis://cache:6379/0?apikey=***&ApiKey=***&api_key=***&db=1"
        );
        assert_eq!(
            redact_url("amqp://mq/prod?access-key=K3y&Credentials=C&heartbeat=5"),
            "amqp://mq/prod?access-key=***&Credentials=***&heartbeat=5"
        );
        // Not URLs at all (typos): hidden whole when they may hold credentials.
        assert_eq!(redact_url("redis:/:TypoSecret@cache:6379/0"), "***");
        assert_eq!(redact_url("amqp//app:TypoSecret@mq:5672/prod"), "***");
        assert_eq!(
            redact_url("redis-sentinel:/s1:26379/0?sentinelServiceName=m&sentinelPassword=S3c"),
            "***"
        );
        assert_eq!(redact_url("localhost:6379"), "localhost:6379");
        // Without its scheme, with a URL in its query: that URL's "://" is not the scheme's.
        assert_eq!(
            redact_url("user:TypoSecret@cache:6379/0?client=http://proxy"),
            "***"
        );
        // A password of digits, a '?' and a secret parameter's `name=`: what precedes the '?' is
        // no host (nothing before its port), so what follows its ':' is hidden with the rest.
        assert_eq!(
            redact_url("redis://:2024?token=Tail@cache:6379"),
            "redis://:***"
        );
        assert_eq!(
            redact_url(" redis://:s3cret@cache:6379"),
            " redis://:***@cache:6379"
        );
        // A password with both '@' and '?' in it, unencoded; one with '?' then `name=`; an '&' in a
        // secret; other names of secrets.
        assert_eq!(
            redact_url("redis://user:Qx@Zk?Wv@cache:6379/0"),
            "redis://***"
        );
        assert_eq!(
            redact_url("amqp://app:ab?token=cd@mq:5672/prod"),
            "amqp://app:***"
        );
        assert_eq!(
            redact_url(
                "redis-sentinel://h:1/0?sentinelServiceName=m&sentinelPassword=Qx&ZkWv&node=h2:1"
            ),
            "redis-sentinel://h:1/0?sentinelServiceName=m&sentinelPassword=***&node=h2:1"
        );
        assert_eq!(
            redact_url("redis://h/0?pass=a&pwd=b&auth=c&db=1"),
            "redis://h/0?pass=***&pwd=***&auth=***&db=1"
        );

        for url in [
            "redis://[::1]:6379/0",
            "redis://h:1/0?sentinelServiceName=m",
            "unix:///tmp/redis.sock",
        ] {
            assert_eq!(redact_url(url), url);
        }
    }

    /// A URL without a password whose port is no number was hidden whole (`redis://***`), so the
    /// error about its port did not show which host it named. Only what follows the ':' is hidden: it
    /// may be a password left without its host (`amqp://guest:password`).
    #[test]
    fn a_port_that_is_no_number_hides_only_what_follows_the_colon() {
        for (url, shown) in [
            ("redis://localhost:abc", "redis://localhost:***"),
            ("redis://localhost:abc/0", "redis://localhost:***"),
            (
                "redis://cache.internal:6379x/0?protocol=resp3",
                "redis://cache.internal:***",
            ),
            ("redis://[::1]:abc", "redis://[::1]:***"),
            ("redis-cluster://h1:6379,h2:x", "redis-cluster://h1:***"),
            ("amqp://guest:Qz7kWm4p", "amqp://guest:***"),
            ("amqp://guest:Qz7k/Wm4p?heartbeat=5", "amqp://guest:***"),
            ("redis://:Qz7kWm4p", "redis://:***"),
            ("redis://[app:Qz7k]:Wm4p", "redis://[app:***"),
            // A port out of range is still a number: shown (the parser says what is wrong with it).
            ("redis://127.0.0.1:99999", "redis://127.0.0.1:99999"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    /// What the rule for a port that is no number shows (the text before the first ':') is never a
    /// password, whatever shape the URL has: a password with ':', '@', '/', '#' or '?' in it, encoded
    /// or not; a password without a user (Redis's `redis://:pw@host` and `redis://pw@host`); in the
    /// query; IPv6 hosts; Unix sockets; several sentinel or cluster hosts; RabbitMQ's URLs.
    #[test]
    fn what_a_port_that_is_no_number_shows_holds_no_password() {
        for (url, shown) in [
            ("redis://:Qz7k@host:abc", "redis://:***@host:abc"),
            ("redis://Qz7k@host", "redis://***@host"),
            ("redis://Qz7k@host:abc", "redis://***@host:abc"),
            ("redis://:Qz7k", "redis://:***"),
            ("amqp://user:Qz:7k@host", "amqp://user:***@host"),
            ("amqp://user:Qz:7k", "amqp://user:***"),
            ("amqp://user:Qz%3A7k", "amqp://user:***"),
            ("redis://user:Qz@7k@host:abc", "redis://user:***@host:abc"),
            ("redis://user:Qz%407k", "redis://user:***"),
            ("redis://user:Qz/7k", "redis://user:***"),
            ("amqp://user:Qz#7k", "amqp://user:***"),
            ("redis://user:Qz?7k@host", "redis://***"),
            ("redis://user:Qz?password=7k@host", "redis://user:***"),
            ("redis://host:abc?password=Qz7k", "redis://host:***"),
            (
                "redis://host:6379?password=Qz7k",
                "redis://host:6379?password=***",
            ),
            ("redis://[::1]:Qz7k", "redis://[::1]:***"),
            ("redis://[fe80::1%25eth0]:Qz7k", "redis://[fe80:***"),
            ("redis://user:Qz7k@[::1]:abc", "redis://user:***@[::1]:abc"),
            ("redis://[user:Qz7k]@host", "redis://[user:***@host"),
            (
                "unix://:Qz7k@/tmp/redis.sock",
                "unix://:***@/tmp/redis.sock",
            ),
            (
                "unix:///tmp/redis.sock?password=Qz7k",
                "unix:///tmp/redis.sock?password=***",
            ),
            (
                "redis-sentinel://:Qz7k@h1:26379,h2:26379/mymaster/0",
                "redis-sentinel://:***@h1:26379,h2:26379/mymaster/0",
            ),
            (
                "redis-sentinel://h1:26379,:Qz7k/m",
                "redis-sentinel://h1:***",
            ),
            (
                "redis-sentinel://h1:26379,user:Qz7k",
                "redis-sentinel://h1:***",
            ),
            (
                "redis-sentinel://h1:26379,h2:x/m?sentinelPassword=Qz7k",
                "redis-sentinel://h1:***",
            ),
            ("redis-cluster://h1:Qz7k,h2:6379", "redis-cluster://h1:***"),
            (
                "amqps://user:Qz:7k@mq:5671/vh",
                "amqps://user:***@mq:5671/vh",
            ),
            ("amqp://user:Qz7k?heartbeat=5", "amqp://user:***"),
            ("amqp://user:Qz7k ", "amqp://user:***"),
            ("REDIS_URL=redis://user:Qz7k", "REDIS_URL=redis://user:***"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
            assert!(!redact_url(url).contains("Qz"), "{url}");
        }
    }

    #[test]
    fn no_part_of_a_password_survives_whatever_punctuation_it_holds() {
        let punctuation: Vec<char> = (b'!'..=b'~')
            .map(char::from)
            .filter(|c| c.is_ascii_punctuation())
            .collect();
        let in_userinfo = [
            "redis://user:{}@cache:6379/0",
            "rediss://user:{}@cache:6380",
            "redis-sentinel://user:{}@s1:26379,s2:26379/0?sentinelServiceName=m",
            "amqp://app:{}@mq:5672/prod",
            "amqps://app:{}@[::1]:5671/prod?heartbeat=10",
            "unix://user:{}@/tmp/redis.sock",
        ];
        let in_query = [
            "redis-sentinel://s1:26379,s2:26379/0?sentinelServiceName=m&sentinelPassword={}",
            "amqps://app:pw@mq/prod?password={}&heartbeat=10",
            "rediss://cache:6380/0?Password={}",
        ];
        for first in &punctuation {
            for second in &punctuation {
                let password = format!("ZQ1{first}WX2{second}YV3");
                for template in in_userinfo {
                    let shown = redact_url(&template.replace("{}", &password));
                    for piece in ["ZQ1", "WX2", "YV3"] {
                        assert!(
                            !shown.contains(piece),
                            "{password:?} in {template}: {shown}"
                        );
                    }
                }
                for template in in_query {
                    let shown = redact_url(&template.replace("{}", &password));
                    // After an '&', a `name=value` is another parameter to every client too: the
                    // password they use ends at the '&'.
                    let split = password
                        .find('&')
                        .is_some_and(|amp| password[amp..].contains('='));
                    let pieces: &[&str] = if split {
                        &["ZQ1"]
                    } else {
                        &["ZQ1", "WX2", "YV3"]
                    };
                    for piece in pieces {
                        assert!(
                            !shown.contains(piece),
                            "{password:?} in {template}: {shown}"
                        );
                    }
                }
            }
        }
        // Non-ASCII next to the delimiters does not panic.
        for url in [
            "redis://é@?@é",
            "amqp://ü:é%@h?é=@&%é",
            "redis://h/0?%é=1",
            "é@?",
        ] {
            let _ = redact_url(url);
        }
    }

    #[test]
    fn invalid_channel_text_matches_the_python_library() {
        let error = Error::InvalidChannelFormat {
            channel: "invalid_format".into(),
            expected: EXPECTED_CHANNEL_FORMAT.into(),
            detail: None,
        };
        assert_eq!(
            error.to_string(),
            "Channel 'invalid_format' has invalid format. Expected: 'MessageClass:direction:session_id', got: 'invalid_format'"
        );
    }
}
