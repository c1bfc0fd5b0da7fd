//! Parsing `amqp://` and `amqps://` URLs (the RabbitMQ URI spec), with percent-decoding.
//!
//! `amqp[s]://[user[:password]@]host[:port][/vhost][?heartbeat=S&connection_timeout=MS&auth_mechanism=plain|amqplain|external&cacertfile=PATH&certfile=PATH&keyfile=PATH&server_name_indication=NAME]`
//!
//! amqprs's own URI parser (feature `urispec`) neither percent-decodes the virtual host (so the usual
//! `/%2f` would name a vhost called `%2f`) nor survives a query parameter without `=`; this one does both.

use std::path::PathBuf;
use std::time::Duration;

use agentcomm_core::config::check_url;
use agentcomm_core::error::{Error, Result, redact_url};
use amqprs::security::SecurityCredentials;

/// The accepted URL forms, for error messages.
pub(crate) const ACCEPTED: &str =
    "amqp://user:password@host:port/vhost or amqps://... (vhost '/' is written %2f)";

/// How the client logs in (the URL's `auth_mechanism`, RabbitMQ's SASL mechanisms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) enum AuthMechanism {
    /// User name and password (`PLAIN`), the default.
    #[default]
    Plain,
    /// User name and password in an AMQP table (`AMQPLAIN`).
    AmqPlain,
    /// The client certificate's identity (`EXTERNAL`, RabbitMQ's `rabbitmq_auth_mechanism_ssl`).
    External,
}

impl AuthMechanism {
    /// The credentials amqprs sends for this mechanism.
    pub(crate) fn credentials(self, user: &str, password: &str) -> SecurityCredentials {
        match self {
            AuthMechanism::Plain => SecurityCredentials::new_plain(user, password),
            AuthMechanism::AmqPlain => SecurityCredentials::new_amqplain(user, password),
            AuthMechanism::External => SecurityCredentials::new_external(),
        }
    }
}

/// A parsed broker URL. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct AmqpUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub vhost: String,
    pub user: String,
    pub password: String,
    pub heartbeat: Option<u16>,
    pub connection_timeout: Option<Duration>,
    pub auth_mechanism: AuthMechanism,
    pub ca_cert: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub server_name: Option<String>,
    /// The URL as given, with the password replaced by `***`.
    pub redacted: String,
    /// Parameters neither this client nor the other AMQP clients it knows read (a typo, the
    /// builder's `connect_timeout` written in the URL): ignored, with a warning at connect.
    pub unknown: Vec<String>,
}

/// The URL parameters of other AMQP clients (RabbitMQ's URI spec, the Erlang, Python, Node.js and
/// Rust clients) that this one does not use: ignored quietly, so that one URL serves every client.
const OTHER_CLIENTS: &[&str] = &[
    "channel_max",
    "frame_max",
    "verify",
    "fail_if_no_peer_cert",
    "depth",
    "password",
    "connection_attempts",
    "retry_delay",
    "socket_timeout",
    "stack_timeout",
    "blocked_connection_timeout",
    "locale",
    "ssl_options",
    "tcp_options",
    "client_properties",
    "backpressure_detection",
    // Node.js amqplib writes these two in camel case (and reads `heartbeat` and `locale`).
    "frameMax",
    "channelMax",
];

/// The parameters this client reads, for the warning about the others.
const READ: &str = "heartbeat, connection_timeout, auth_mechanism, cacertfile, certfile, keyfile, server_name_indication";

impl std::fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

pub(crate) fn invalid(variable: &str, url: &str, why: impl Into<String>) -> Error {
    Error::Config {
        variable: variable.to_string(),
        value: redact_url(url),
        expected: format!("{}; accepted: {ACCEPTED}", why.into()),
    }
}

/// Whether amqprs can send `value` (a user name or password) in its AMQPLAIN response: it writes
/// the value as an AMQP long string (four length bytes, big-endian, then the text) into a `String`,
/// and panics (with the password's bytes in the panic message) when the result is not UTF-8, as it
/// is not when a length byte is 128 or more (a length of 128 to 255 bytes, among others). The
/// text around each value is ASCII, so each value can be checked on its own.
pub(crate) fn amqplain_carries(value: &str) -> bool {
    let Ok(length) = u32::try_from(value.len()) else {
        return false;
    };
    let mut encoded = length.to_be_bytes().to_vec();
    encoded.extend_from_slice(value.as_bytes());
    std::str::from_utf8(&encoded).is_ok()
}

/// Whether a PLAIN login can carry `value` (a user name or password): PLAIN separates the two with
/// a NUL, and RabbitMQ refuses a login with one more as invalid, writing all of it, the password's
/// bytes included, to its log.
pub(crate) fn plain_carries(value: &str) -> bool {
    !value.contains('\0')
}

/// Decodes `%XX` escapes.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = text.get(index + 1..index + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Whether `text` (what follows a '?') reads as query parameters: `key=value` pairs joined by '&',
/// each key of letters, digits, '_', '-' and '.' (other clients' parameters are taken and ignored,
/// whatever their names' case). Empty pieces (`a=1&&b=2`, a leading or trailing '&') are skipped, as
/// the parameters are read.
fn reads_as_query(text: &str) -> bool {
    text.split('&').filter(|pair| !pair.is_empty()).all(|pair| {
        pair.split_once('=').is_some_and(|(key, _)| {
            !key.is_empty()
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        })
    })
}

impl AmqpUrl {
    /// Parses `url`; errors name `variable` and never show the password.
    pub(crate) fn parse(variable: &str, url: &str) -> Result<Self> {
        check_url(variable, url, &["amqp", "amqps"], ACCEPTED)?;
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid(variable, url, "it is not a URL"))?;
        let tls = scheme.eq_ignore_ascii_case("amqps");
        // A '?' or '#' in the user name or password, not percent-encoded, ends the authority early:
        // the rest of the password would be read as a query or a fragment, and its start as a host
        // and port ("the port is not a number", or worse `user:12#...@host` taken as host `user`,
        // port 12). An '@' between such a '?' or '#' and the next '/' gives it away, unless the
        // user part already ended before it (an '@' there), or what comes between the '?' and the
        // '@' reads as query parameters: `amqps://h?cacertfile=ca@corp.pem` names a file.
        if let Some(at) = rest.find(['?', '#'])
            && !rest[..at].contains(['/', '@'])
            && let Some(part) = rest[at + 1..].split('/').next()
            && let Some((before_at, _)) = part.split_once('@')
            && !(rest[at..].starts_with('?') && reads_as_query(before_at))
        {
            return Err(invalid(
                variable,
                url,
                "an '@' follows a '?' or '#' before the host: a '?' or '#' in the user name or password must be percent-encoded (%3F, %23)",
            ));
        }
        // A '/' in the user name or password, not percent-encoded, ends the authority early in the
        // same way: `user:12/secret@host` read as host `user`, port 12 and virtual host `secret@host`
        // (logging in as guest). An '@' after the authority's end gives it away, unless it stands in
        // query parameters, also where the authority has one: a password with an unencoded '@'
        // before its '/' (`user:p@ss/word@host`) was read as host `ss` and virtual host `word@host`,
        // and `user:p@ss#word@host` as host `ss`. An '@' in a virtual host is refused with it: `%40`.
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        if let Some(at) = rest[authority_end..].find('@') {
            let before_at = &rest[authority_end..authority_end + at];
            let in_query = before_at.find(['?', '#']).is_some_and(|mark| {
                before_at[mark..].starts_with('?') && reads_as_query(&before_at[mark + 1..])
            });
            if !in_query {
                return Err(invalid(
                    variable,
                    url,
                    match before_at.starts_with('/') {
                        true => {
                            "an '@' follows a '/' before the host: a '/' in the user name or password must be percent-encoded (%2F), and an '@' in the virtual host (%40)"
                        }
                        false => {
                            "an '@' follows a '?' or '#' before the host: a '?' or '#' in the user name or password must be percent-encoded (%3F, %23)"
                        }
                    },
                ));
            }
        }
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (rest, None),
        };
        let rest = rest.split('#').next().unwrap_or("");
        let (authority, path) = match rest.find('/') {
            Some(index) => (&rest[..index], Some(&rest[index + 1..])),
            None => (rest, None),
        };
        let (userinfo, host_port) = match authority.rsplit_once('@') {
            Some((userinfo, host_port)) => (Some(userinfo), host_port),
            None => (None, authority),
        };
        let decode = |part: &str, what: &str| {
            percent_decode(part)
                .ok_or_else(|| invalid(variable, url, format!("the {what} has a bad %-escape")))
        };
        let (user, password) = match userinfo {
            Some(userinfo) => match userinfo.split_once(':') {
                Some((user, password)) => (decode(user, "user")?, decode(password, "password")?),
                None => (decode(userinfo, "user")?, String::new()),
            },
            None => ("guest".to_string(), "guest".to_string()),
        };
        let (host, port) = if let Some(ipv6) = host_port.strip_prefix('[') {
            let (host, after) = ipv6
                .split_once(']')
                .ok_or_else(|| invalid(variable, url, "the IPv6 host has no closing ']'"))?;
            (host.to_string(), after.strip_prefix(':'))
        } else {
            match host_port.rsplit_once(':') {
                Some((host, port)) => (host.to_string(), Some(port)),
                None => (host_port.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(invalid(variable, url, "the host is missing"));
        }
        let port = match port {
            // The port text is not shown: a mangled URL may have put part of a password there.
            Some(port) => port
                .parse::<u16>()
                .map_err(|_| invalid(variable, url, "the port is not a number from 0 to 65535"))?,
            None if tls => 5671,
            None => 5672,
        };
        let vhost = match path {
            None | Some("") => "/".to_string(),
            Some(path) => {
                if path.contains('/') {
                    return Err(invalid(
                        variable,
                        url,
                        "the virtual host must be one path segment (write '/' as %2f)",
                    ));
                }
                decode(path, "virtual host")?
            }
        };
        // An AMQP short string: amqprs panics on a longer one while connecting.
        if vhost.len() > 255 {
            return Err(invalid(
                variable,
                url,
                format!(
                    "the virtual host is {} bytes long; AMQP allows at most 255",
                    vhost.len()
                ),
            ));
        }
        let mut parsed = AmqpUrl {
            tls,
            host,
            port,
            vhost,
            user,
            password,
            heartbeat: None,
            connection_timeout: None,
            auth_mechanism: AuthMechanism::Plain,
            ca_cert: None,
            client_cert: None,
            client_key: None,
            server_name: None,
            redacted: redact_url(url),
            unknown: Vec::new(),
        };
        for pair in query
            .unwrap_or("")
            .split('&')
            .filter(|pair| !pair.is_empty())
        {
            // A piece is named (in an error or a log line) only where the redacted URL shows it:
            // after a secret parameter (`password=ab&cd=ef`), a piece may be the rest of its value,
            // and is hidden there.
            let shown = parsed
                .redacted
                .split_once('?')
                .is_some_and(|(_, query)| query.split('&').any(|piece| piece == pair));
            let (key, value) = pair.split_once('=').ok_or_else(|| {
                invalid(
                    variable,
                    url,
                    match shown {
                        true => format!("the query parameter '{pair}' has no '=value'"),
                        false => "a query parameter has no '=value' (a '&' in a value must be \
                                  percent-encoded: %26)"
                            .to_string(),
                    },
                )
            })?;
            let value = decode(value, key)?;
            match key {
                "heartbeat" => {
                    parsed.heartbeat = Some(value.parse().map_err(|_| {
                        invalid(
                            variable,
                            url,
                            "heartbeat must be a number of seconds (0 to 65535)",
                        )
                    })?)
                }
                "connection_timeout" => {
                    // 0 is refused by the builder, naming this parameter, when it is used: a
                    // connect_timeout set on the builder takes precedence over it.
                    let ms: u64 = value.parse().map_err(|_| {
                        invalid(
                            variable,
                            url,
                            "connection_timeout must be a number of milliseconds above 0",
                        )
                    })?;
                    parsed.connection_timeout = Some(Duration::from_millis(ms));
                }
                // Ignored before: `auth_mechanism=external` logged in with PLAIN, as guest/guest
                // when the URL has no user (the certificate's identity never asked for).
                "auth_mechanism" => {
                    parsed.auth_mechanism = match value.to_ascii_lowercase().as_str() {
                        "plain" => AuthMechanism::Plain,
                        "amqplain" => AuthMechanism::AmqPlain,
                        "external" => AuthMechanism::External,
                        _ => {
                            return Err(invalid(
                                variable,
                                url,
                                "auth_mechanism must be plain, amqplain or external (given once: \
                                 this client offers one mechanism)",
                            ));
                        }
                    }
                }
                "cacertfile" => parsed.ca_cert = Some(PathBuf::from(value)),
                "certfile" => parsed.client_cert = Some(PathBuf::from(value)),
                "keyfile" => parsed.client_key = Some(PathBuf::from(value)),
                "server_name_indication" => parsed.server_name = Some(value),
                // Other clients' parameters (channel_max, frame_max, verify, ...) are accepted and
                // ignored, so that one URL serves every client of the system.
                _ if shown && !OTHER_CLIENTS.contains(&key) => parsed.unknown.push(key.to_string()),
                _ if shown => tracing::debug!(
                    parameter = key,
                    "ignoring an AMQP URL parameter this client does not use"
                ),
                _ => tracing::debug!(
                    "ignoring an AMQP URL parameter this client does not use (its name is hidden: \
                     after a secret parameter, it may be the rest of a password with an '&')"
                ),
            }
        }
        if !tls && (parsed.ca_cert.is_some() || parsed.client_cert.is_some()) {
            return Err(invalid(
                variable,
                url,
                "cacertfile/certfile only apply to amqps:// URLs",
            ));
        }
        if parsed.auth_mechanism == AuthMechanism::External
            && (!tls || parsed.client_cert.is_none())
        {
            return Err(invalid(
                variable,
                url,
                "auth_mechanism=external logs in with a client certificate: use amqps:// with \
                 certfile and keyfile",
            ));
        }
        if parsed.auth_mechanism == AuthMechanism::AmqPlain
            && !(amqplain_carries(&parsed.user) && amqplain_carries(&parsed.password))
        {
            return Err(invalid(
                variable,
                url,
                "auth_mechanism=amqplain cannot carry this user name or password (amqprs writes \
                 each with its length into a text that must be UTF-8, which some lengths, 128 to \
                 255 bytes among them, are not): use auth_mechanism=plain, the default",
            ));
        }
        if parsed.auth_mechanism == AuthMechanism::Plain
            && !(plain_carries(&parsed.user) && plain_carries(&parsed.password))
        {
            return Err(invalid(
                variable,
                url,
                "auth_mechanism=plain cannot carry a user name or password with a NUL character \
                 (%00; PLAIN separates the two with it): remove it",
            ));
        }
        if parsed.client_cert.is_some() != parsed.client_key.is_some() {
            return Err(invalid(
                variable,
                url,
                "certfile and keyfile must be given together",
            ));
        }
        Ok(parsed)
    }

    /// The warning for parameters no AMQP client this one knows reads (see [`AmqpUrl::unknown`]),
    /// if any: a misspelt `heartbeat` or the builder's `connect_timeout` was dropped without a word
    /// above debug level.
    pub(crate) fn unknown_parameters(&self) -> Option<String> {
        (!self.unknown.is_empty()).then(|| {
            format!(
                "ignoring the URL parameter{} {} of {}: not one this client reads ({READ}) nor one \
                 another AMQP client is known to; check the spelling (names are case-sensitive)",
                if self.unknown.len() == 1 { "" } else { "s" },
                self.unknown
                    .iter()
                    .map(|name| format!("'{name}'"))
                    .collect::<Vec<_>>()
                    .join(", "),
                self.redacted,
            )
        })
    }

    /// Replaces the password in `text` (an error from the client) by `***`, however short it is. A
    /// password of fewer than 4 characters is replaced only where it stands alone (not inside a longer
    /// run of letters and digits), so that a one-letter password does not garble every word.
    pub(crate) fn scrub(&self, text: &str) -> String {
        scrub(text, &self.password)
    }
}

/// Replaces `password` in `text` by `***`, as [`AmqpUrl::scrub`] does with the URL's password (also
/// for a password a credentials provider gave).
pub(crate) fn scrub(text: &str, password: &str) -> String {
    if password.is_empty() {
        return text.to_string();
    }
    if password.chars().count() >= 4 {
        return text.replace(password, "***");
    }
    let word = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
    let mut scrubbed = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(password) {
        let (before, after) = (&rest[..at], &rest[at + password.len()..]);
        scrubbed.push_str(before);
        let inside_a_word = (word(before.chars().next_back()) && word(password.chars().next()))
            || (word(after.chars().next()) && word(password.chars().next_back()));
        scrubbed.push_str(if inside_a_word { password } else { "***" });
        rest = after;
    }
    scrubbed.push_str(rest);
    scrubbed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_default_url() {
        let url = AmqpUrl::parse("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(
            (url.tls, url.host.as_str(), url.port, url.vhost.as_str()),
            (false, "127.0.0.1", 5672, "/")
        );
        assert_eq!(
            (url.user.as_str(), url.password.as_str()),
            ("guest", "guest")
        );
        assert_eq!(url.redacted, "amqp://guest:***@127.0.0.1:5672/%2f");
        assert!(!format!("{url:?}").contains("guest@"));
    }

    #[test]
    fn decodes_credentials_vhost_and_parameters() {
        let url = AmqpUrl::parse(
            "url",
            "amqps://app%40corp:p%3Ass@[::1]/prod%2Fa?heartbeat=5&connection_timeout=2500&cacertfile=/ca.pem&verify=verify_peer",
        )
        .unwrap();
        assert!(url.tls);
        assert_eq!((url.host.as_str(), url.port), ("::1", 5671));
        assert_eq!(
            (url.user.as_str(), url.password.as_str()),
            ("app@corp", "p:ss")
        );
        assert_eq!(url.vhost, "prod/a");
        assert_eq!(url.heartbeat, Some(5));
        assert_eq!(url.connection_timeout, Some(Duration::from_millis(2500)));
        assert_eq!(
            url.ca_cert.as_deref(),
            Some(std::path::Path::new("/ca.pem"))
        );
        assert_eq!(AmqpUrl::parse("url", "amqp://h").unwrap().vhost, "/");
        assert_eq!(AmqpUrl::parse("url", "amqp://h/").unwrap().vhost, "/");
        assert_eq!(AmqpUrl::parse("url", "amqp://h/v").unwrap().vhost, "v");
        // Encoded, they are part of the password; an '@' in the query is not in the authority.
        let url = AmqpUrl::parse("url", "amqp://u:a%3Fb%23c@h/v").unwrap();
        assert_eq!((url.password.as_str(), url.host.as_str()), ("a?b#c", "h"));
        let url = AmqpUrl::parse("url", "amqp://u:a%2Fb@h/team%40prod").unwrap();
        assert_eq!(
            (url.password.as_str(), url.host.as_str(), url.vhost.as_str()),
            ("a/b", "h", "team@prod")
        );
        let url = AmqpUrl::parse("url", "amqps://h/v?cacertfile=/certs/ops@corp/ca.pem").unwrap();
        assert_eq!(url.host, "h");
        // Nor one in a query parameter without a path before it, which parsed before the check of
        // '?' and '#' in passwords came, and was refused by it.
        for (url, user, host, port) in [
            ("amqps://u:p@h?cacertfile=ca@corp.pem", "u", "h", 5671),
            ("amqps://h:5671?cacertfile=ca@corp.pem", "guest", "h", 5671),
            (
                "amqps://h?heartbeat=5&certfile=me@corp.pem&keyfile=k.pem",
                "guest",
                "h",
                5671,
            ),
        ] {
            let parsed =
                AmqpUrl::parse("url", url).unwrap_or_else(|error| panic!("{url}: {error}"));
            assert_eq!(
                (parsed.user.as_str(), parsed.host.as_str(), parsed.port),
                (user, host, port)
            );
        }
        // With empty pieces between the parameters (a template's empty part), which the parameters
        // are read past: an '@' in a later value was refused as if it followed a password's '/'.
        for url in [
            "amqps://h/v?heartbeat=5&&cacertfile=/certs/ops@corp/ca.pem",
            "amqps://h/v?&cacertfile=/certs/ops@corp/ca.pem",
            "amqps://h?heartbeat=5&&cacertfile=/certs/ops@corp/ca.pem",
            // Other clients' parameters, whose names need not be lowercase letters.
            "amqps://h/v?tls13=1&cacertfile=/certs/ops@corp/ca.pem",
            "amqps://u:p@h/v?Verify=verify_peer&cacertfile=/certs/ops@corp/ca.pem",
            "amqps://h?x-client.name=a&cacertfile=/certs/ops@corp/ca.pem",
        ] {
            let parsed =
                AmqpUrl::parse("url", url).unwrap_or_else(|error| panic!("{url}: {error}"));
            assert_eq!(
                (parsed.host.as_str(), parsed.ca_cert.as_deref()),
                ("h", Some(std::path::Path::new("/certs/ops@corp/ca.pem")))
            );
        }
        let url = AmqpUrl::parse("url", "amqps://h?certfile=me@corp.pem&keyfile=k.pem").unwrap();
        assert_eq!(
            url.client_cert.as_deref(),
            Some(std::path::Path::new("me@corp.pem"))
        );
    }

    #[test]
    fn bad_urls_are_refused_without_their_password() {
        for (url, expected) in [
            ("http://u:secret@h", "the scheme 'http' is not supported"),
            ("amqp://u:secret@h:99999/", "the port is not a number"),
            ("amqp://u:secret@h/a/b", "one path segment"),
            ("amqp://u:secret@h/?heartbeat", "has no '=value'"),
            // The end of a key's password with an '&' in it: not named (the URL hides it).
            (
                "amqps://u:p@h/?password=KeyPass&wordsecret",
                "a query parameter has no '=value' (a '&' in a value must be percent-encoded: %26)",
            ),
            (
                "amqp://u:secret@h/?heartbeat=x",
                "heartbeat must be a number",
            ),
            (
                "amqp://u:secret@h/?connection_timeout=x",
                "connection_timeout must be a number of milliseconds above 0",
            ),
            ("amqp://u:secret@h/%zz", "bad %-escape"),
            ("amqp://u:secret@h/?cacertfile=/x", "only apply to amqps://"),
            ("amqps://u:secret@h/?certfile=/x", "must be given together"),
            ("amqp://u:secret@:5672", "the host is missing"),
            (
                "amqp://u:sec?ret@h:5672/v",
                "must be percent-encoded (%3F, %23)",
            ),
            (
                "amqp://u:12#secret@h/v",
                "must be percent-encoded (%3F, %23)",
            ),
            ("amqp://u:sec#ret@h", "must be percent-encoded (%3F, %23)"),
            ("amqp://u:secret?=x@h", "must be percent-encoded (%3F, %23)"),
            ("amqp://u:sec/ret@h/v", "must be percent-encoded (%2F)"),
            ("amqp://u:se/cr?et@h/v", "must be percent-encoded (%2F)"),
            ("amqp://u:se/cr#et@h/v", "must be percent-encoded (%2F)"),
            ("amqp://u:se/cret@h", "must be percent-encoded (%2F)"),
            ("amqp://u:12/secret@h", "must be percent-encoded (%2F)"),
            (
                "amqp://u:se/cret@h:5672/v?heartbeat=5",
                "must be percent-encoded (%2F)",
            ),
            ("amqp://h/team@prod", "an '@' in the virtual host (%40)"),
            // An '@' in the password before its '/', '?' or '#': read as host `ss` before.
            (
                "amqp://u:p@ss/wordsecret@h",
                "must be percent-encoded (%2F)",
            ),
            (
                "amqp://u:p@ss/wordsecret@h:5672",
                "must be percent-encoded (%2F)",
            ),
            (
                "amqp://u:p@ss#wordsecret@h",
                "must be percent-encoded (%3F, %23)",
            ),
            ("amqp://u:p@h/team@prod", "an '@' in the virtual host (%40)"),
        ] {
            let error = AmqpUrl::parse("RABBITMQ_URL", url).unwrap_err().to_string();
            assert!(error.contains(expected), "{url}: {error}");
            assert!(error.starts_with("RABBITMQ_URL="), "{error}");
            assert!(!error.contains("secret"), "{error}");
        }
    }

    /// `auth_mechanism` was taken as another client's parameter and ignored: `external` logged in
    /// with PLAIN, as guest/guest when the URL named no user, instead of with the certificate.
    #[test]
    fn the_auth_mechanism_is_taken_or_refused() {
        let tls = "amqps://h/v?certfile=/c.pem&keyfile=/k.pem";
        for (query, expected) in [
            ("", AuthMechanism::Plain),
            ("&auth_mechanism=plain", AuthMechanism::Plain),
            ("&auth_mechanism=AMQPLAIN", AuthMechanism::AmqPlain),
            ("&auth_mechanism=external", AuthMechanism::External),
            ("&auth_mechanism=EXTERNAL", AuthMechanism::External),
        ] {
            let url = format!("{tls}{query}");
            let parsed = AmqpUrl::parse("url", &url).unwrap_or_else(|error| panic!("{error}"));
            assert_eq!(parsed.auth_mechanism, expected, "{url}");
        }
        for (url, expected) in [
            (
                "amqps://u:secret@h/?auth_mechanism=scram-sha-256",
                "auth_mechanism must be plain, amqplain or external",
            ),
            (
                "amqp://u:secret@h/?auth_mechanism=external",
                "use amqps:// with certfile and keyfile",
            ),
            (
                "amqps://u:secret@h/?auth_mechanism=external",
                "use amqps:// with certfile and keyfile",
            ),
        ] {
            let error = AmqpUrl::parse("RABBITMQ_URL", url).unwrap_err().to_string();
            assert!(error.contains(expected), "{url}: {error}");
            assert!(!error.contains("secret"), "{error}");
        }
    }

    /// A virtual host is an AMQP short string: amqprs panicked on a longer one while connecting.
    #[test]
    fn a_virtual_host_longer_than_255_bytes_is_refused() {
        let long = "v".repeat(256);
        let error = AmqpUrl::parse("url", &format!("amqp://h/{long}"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("the virtual host is 256 bytes long; AMQP allows at most 255"),
            "{error}"
        );
        // Counted once decoded: `%2f` is one byte.
        let longest = format!("amqp://h/{}%2f", "v".repeat(254));
        let parsed = AmqpUrl::parse("url", &longest).unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(parsed.vhost.len(), 255);
    }

    /// amqprs panics while connecting with AMQPLAIN when a user name or password has a length
    /// whose bytes are not UTF-8 (128 to 255 bytes, 400, ...), its panic message listing the
    /// password's bytes: such a URL is refused before connecting; PLAIN carries any length.
    #[test]
    fn amqplain_refuses_a_user_or_password_amqprs_cannot_carry() {
        for (user, password) in [
            ("guest".to_string(), "p".repeat(200)),
            ("u".repeat(128), "guest".to_string()),
            ("guest".to_string(), "p".repeat(400)),
        ] {
            let url = format!("amqp://{user}:{password}@h/?auth_mechanism=amqplain");
            let error = AmqpUrl::parse("url", &url).unwrap_err().to_string();
            assert!(
                error.contains("auth_mechanism=amqplain cannot carry")
                    && error.contains("use auth_mechanism=plain"),
                "{error}"
            );
            assert!(!error.contains(&password), "{error}");
            let plain = url.replace("amqplain", "plain");
            assert!(AmqpUrl::parse("url", &plain).is_ok(), "{plain}");
        }
        for (user, password) in [
            ("guest", "guest".to_string()),
            ("guest", "p".repeat(127)),
            ("guest", "p".repeat(256)),
            ("guest", String::new()),
        ] {
            let url = format!("amqp://{user}:{password}@h/?auth_mechanism=amqplain");
            let parsed = AmqpUrl::parse("url", &url).unwrap_or_else(|error| panic!("{error}"));
            assert_eq!(parsed.auth_mechanism, AuthMechanism::AmqPlain);
        }
    }

    /// A `%00` in the user name or password was sent in a PLAIN login, where NUL separates the two:
    /// RabbitMQ refused it as a wrong password and wrote the whole login, password included, to its
    /// log. AMQPLAIN writes each with its length, and carries it.
    #[test]
    fn plain_refuses_a_user_or_password_with_a_nul() {
        for url in [
            "amqp://guest:s3cret%00@h/",
            "amqp://gu%00est:guest@h/?auth_mechanism=plain",
        ] {
            let error = AmqpUrl::parse("url", url).unwrap_err().to_string();
            assert!(
                error.contains(
                    "auth_mechanism=plain cannot carry a user name or password with a NUL"
                ),
                "{error}"
            );
            assert!(!error.contains("s3cret"), "{error}");
        }
        let amqplain = "amqp://guest:s3cret%00@h/?auth_mechanism=amqplain";
        assert!(AmqpUrl::parse("url", amqplain).is_ok(), "{amqplain}");
    }

    /// A parameter no AMQP client reads was ignored at debug level: `?connect_timeout=2000` (the
    /// builder's name for `connection_timeout`) or `?Heartbeat=5` left the defaults in force, and
    /// nothing said so.
    #[test]
    fn unknown_parameters_are_named_in_a_warning() {
        let url = AmqpUrl::parse(
            "url",
            "amqp://u:secret@h/v?connect_timeout=2000&Heartbeat=5&channel_max=10&verify=verify_peer",
        )
        .unwrap();
        let warning = url.unknown_parameters().expect("a warning");
        assert!(
            warning.starts_with(
                "ignoring the URL parameters 'connect_timeout', 'Heartbeat' of amqp://u:***@h/v?"
            ),
            "{warning}"
        );
        assert!(
            warning.contains("connection_timeout, auth_mechanism"),
            "{warning}"
        );
        assert!(!warning.contains("secret"), "{warning}");
        // After `auth_mechanism` too: it was hidden as a secret (its name has "auth" in it), and
        // hid the parameters after it, whose typos went unsaid.
        let url =
            AmqpUrl::parse("url", "amqp://u:secret@h/v?auth_mechanism=plain&hearbeat=5").unwrap();
        let warning = url.unknown_parameters().expect("a warning");
        assert!(
            warning.starts_with(
                "ignoring the URL parameter 'hearbeat' of amqp://u:***@h/v?auth_mechanism=plain&hearbeat=5:"
            ),
            "{warning}"
        );
        // Other clients' parameters, and the end of a secret one, are ignored quietly.
        for quiet in [
            "amqp://h/v?channel_max=10&frame_max=4096&verify=verify_none&connection_attempts=3",
            // A URL shared with a Node.js service (amqplib).
            "amqp://h/v?frameMax=0x1000&channelMax=100&heartbeat=30&locale=en_US",
            "amqps://h/v?password=Key&Pa=ss",
            "amqp://h/v?heartbeat=5",
        ] {
            let url = AmqpUrl::parse("url", quiet).unwrap();
            assert_eq!(url.unknown_parameters(), None, "{quiet}");
        }
    }

    #[test]
    fn a_key_password_in_the_query_is_hidden() {
        let url = AmqpUrl::parse(
            "RABBITMQ_URL",
            "amqps://app:pw@mq/prod?cacertfile=/ca.pem&certfile=/c.pem&keyfile=/k.pem&password=KeyPassphrase",
        )
        .unwrap();
        assert!(!url.redacted.contains("KeyPassphrase"), "{}", url.redacted);
        assert!(!format!("{url:?}").contains("KeyPassphrase"), "{url:?}");
        let error = AmqpUrl::parse(
            "RABBITMQ_URL",
            "amqps://app:pw@mq/prod?heartbeat=x&password=KeyPassphrase",
        )
        .unwrap_err()
        .to_string();
        assert!(!error.contains("KeyPassphrase"), "{error}");
    }

    #[test]
    fn scrubs_passwords_from_client_errors() {
        let url = AmqpUrl::parse("url", "amqp://u:hunter2@h").unwrap();
        assert_eq!(url.scrub("login hunter2 refused"), "login *** refused");
        // Short passwords are scrubbed too, where they stand alone.
        let url = AmqpUrl::parse("url", "amqp://u:pw@h").unwrap();
        assert_eq!(
            url.scrub("amqp://u:pw@h refused pw; powerful pwned"),
            "amqp://u:***@h refused ***; powerful pwned"
        );
        let url = AmqpUrl::parse("url", "amqp://u:%21@h").unwrap();
        assert_eq!(url.scrub("u:!@h said hi!"), "u:***@h said hi***");
        let url = AmqpUrl::parse("url", "amqp://u:ab1@h").unwrap();
        assert_eq!(url.scrub("ab1 ab12 xab1"), "*** ab12 xab1");
        let url = AmqpUrl::parse("url", "amqp://u@h").unwrap();
        assert_eq!(url.scrub("no password"), "no password");
    }
}
