//! The one error type of agentcomm-core, and the result alias used everywhere.
//!
//! Every message says what happened and what to do next. Backend crates wrap their client's errors in
//! [`Error::Connection`] or [`Error::Backend`] instead of leaking the client's own types.

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
        /// The environment variable or setting.
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
/// parameters whose names speak of a password, secret or token (`sentinelPassword=`, `password=`),
/// names compared percent-decoded and in any case. What cannot be told apart safely is hidden whole:
/// an `@` after the first `?` that is neither in such a parameter nor preceded by a user part (a
/// password that contains `?` unencoded) hides everything after `scheme://`; a text without `://`
/// that contains an `@` shows only what follows its last `@`.
///
/// ```
/// use agentcomm_core::error::redact_url;
/// assert_eq!(redact_url("redis://:s3cret@127.0.0.1:6379/0"), "redis://:***@127.0.0.1:6379/0");
/// assert_eq!(redact_url("amqp://guest:guest@localhost:5672/%2f"), "amqp://guest:***@localhost:5672/%2f");
/// assert_eq!(redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
/// assert_eq!(
///     redact_url("redis-sentinel://h:26379/0?sentinelServiceName=m&sentinelPassword=Pa@ss"),
///     "redis-sentinel://h:26379/0?sentinelServiceName=m&sentinelPassword=***"
/// );
/// ```
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        // Not a URL (a typo): what comes before an '@' may be credentials.
        return match url.rfind('@') {
            Some(at) => format!("***{}", &url[at..]),
            None => url.to_string(),
        };
    };
    let (head, rest) = url.split_at(scheme_end + 3);
    let question = rest.find('?');
    let before_query = &rest[..question.unwrap_or(rest.len())];
    let (userinfo_end, query_start) = match (before_query.rfind('@'), question) {
        // The usual shape: a user part (if any) before the query.
        (Some(at), _) => (Some(at), question),
        (None, None) => (rest.rfind('@'), None),
        (None, Some(question)) => match rest[question..].find('@') {
            None => (None, Some(question)),
            // An '@' in the query: fine inside a parameter that gets hidden; otherwise the '?' may
            // belong to a password, and nothing can be shown safely.
            Some(offset) => {
                let at = question + offset;
                let parameter_start = rest[..at].rfind(['?', '&']).map_or(0, |p| p + 1);
                let parameter = &rest[parameter_start..];
                let name = parameter.split('=').next().unwrap_or("");
                if parameter.contains('=') && is_secret_name(name) {
                    (None, Some(question))
                } else {
                    return format!("{head}***");
                }
            }
        },
    };
    let mut out = String::from(head);
    let authority_start = match userinfo_end {
        Some(at) => {
            let userinfo = &rest[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..colon]);
                    out.push_str(":***");
                }
                // A lone user part may itself be a token (`redis://token@host`): hidden too.
                None if userinfo.is_empty() => {}
                None => out.push_str("***"),
            }
            at
        }
        None => 0,
    };
    match query_start {
        Some(question) if question >= authority_start => {
            out.push_str(&rest[authority_start..question]);
            out.push('?');
            let query = &rest[question + 1..];
            for (index, parameter) in query.split('&').enumerate() {
                if index > 0 {
                    out.push('&');
                }
                match parameter.split_once('=') {
                    Some((name, _)) if is_secret_name(name) => {
                        out.push_str(name);
                        out.push_str("=***");
                    }
                    _ => out.push_str(parameter),
                }
            }
        }
        _ => out.push_str(&rest[authority_start..]),
    }
    out
}

/// Whether a query parameter's name (percent-decoded, in any case) speaks of a password, secret or
/// token.
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
    ["password", "passwd", "secret", "token"]
        .iter()
        .any(|word| name.contains(word))
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
            redact_url("amqp://mq/prod?auth_token=T0k&x=y@z"),
            "amqp://***",
            "an '@' in a parameter that is not hidden: nothing shown"
        );
        // Not URLs at all (typos): what precedes an '@' is hidden.
        assert_eq!(
            redact_url("redis:/:TypoSecret@cache:6379/0"),
            "***@cache:6379/0"
        );
        assert_eq!(
            redact_url("amqp//app:TypoSecret@mq:5672/prod"),
            "***@mq:5672/prod"
        );
        for url in [
            "redis://[::1]:6379/0",
            "redis://h:1/0?sentinelServiceName=m",
            "unix:///tmp/redis.sock",
        ] {
            assert_eq!(redact_url(url), url);
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
