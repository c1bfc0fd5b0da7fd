//! Configuration from the environment (and an optional `.env` file).
//!
//! | variable | values | default |
//! |---|---|---|
//! | `MESSAGING_BACKEND` | `memory`, `redis`, `rabbitmq` | `memory` |
//! | `REDIS_URL` | `redis://`, `rediss://`, `redis-sentinel://`, `redis-cluster://` (`rediss-` for TLS), `unix://` URL | `redis://127.0.0.1:6379` |
//! | `RABBITMQ_URL` | `amqp://` or `amqps://` URL | `amqp://guest:guest@127.0.0.1:5672/%2f` |
//! | `LOG_LEVEL` | `TRACE`, `DEBUG`, `INFO`, `WARNING`, `ERROR` (`CRITICAL` is read as `ERROR`) | `INFO` |
//!
//! ```
//! use agentcomm_core::config::{Backend, Config};
//!
//! let config = Config::from_lookup(|name| match name {
//!     "MESSAGING_BACKEND" => Some("redis".to_string()),
//!     "REDIS_URL" => Some("redis://:secret@10.0.0.5:6379/0".to_string()),
//!     _ => None,
//! })?;
//! assert_eq!(config.backend(), Backend::Redis);
//! assert!(!format!("{config:?}").contains("secret"));
//!
//! let error = Config::from_lookup(|name| (name == "MESSAGING_BACKEND").then(|| "kafka".to_string())).unwrap_err();
//! assert_eq!(
//!     error.to_string(),
//!     "MESSAGING_BACKEND='kafka' is not valid: accepted values are memory, redis, rabbitmq"
//! );
//! # Ok::<(), agentcomm_core::Error>(())
//! ```

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use tracing_subscriber::filter::LevelFilter;

use crate::error::{Error, Result, redact_url};
use crate::logging;

/// `MESSAGING_BACKEND`.
pub const BACKEND_VAR: &str = "MESSAGING_BACKEND";
/// `REDIS_URL`.
pub const REDIS_URL_VAR: &str = "REDIS_URL";
/// `RABBITMQ_URL`.
pub const RABBITMQ_URL_VAR: &str = "RABBITMQ_URL";
/// The Redis URL used when `REDIS_URL` is not set.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// The RabbitMQ URL used when `RABBITMQ_URL` is not set.
pub const DEFAULT_RABBITMQ_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Which broker to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Backend {
    /// The in-memory router (no broker).
    #[default]
    Memory,
    /// Redis, through `agentcomm-redis`.
    Redis,
    /// RabbitMQ, through `agentcomm-amqp`.
    RabbitMq,
}

impl Backend {
    /// The accepted values of `MESSAGING_BACKEND`.
    pub const ACCEPTED: &'static str = "memory, redis, rabbitmq";

    /// Parses a backend name (case-insensitive; `rabbit` and `amqp` are read as `rabbitmq`).
    pub fn parse(value: &str) -> Result<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "memory" | "in-memory" | "inmemory" => Ok(Backend::Memory),
            "redis" => Ok(Backend::Redis),
            "rabbitmq" | "rabbit" | "amqp" => Ok(Backend::RabbitMq),
            _ => Err(Error::Config {
                variable: BACKEND_VAR.into(),
                // A URL put here by mistake may carry a password.
                value: redact_url(value),
                expected: format!("accepted values are {}", Self::ACCEPTED),
            }),
        }
    }

    /// The name as written in `MESSAGING_BACKEND`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Redis => "redis",
            Backend::RabbitMq => "rabbitmq",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The configuration read from the environment. `Debug` hides passwords.
#[derive(Clone)]
pub struct Config {
    backend: Backend,
    redis_url: String,
    rabbitmq_url: String,
    log_level: LevelFilter,
    /// What the env file said, for variables other crates read (`REDIS_DELIVERY_MODE`, ...).
    file: HashMap<String, String>,
    /// The env file's path, for errors about those variables ([`Config::locate`]).
    path: Option<PathBuf>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("backend", &self.backend)
            .field("redis_url", &redact_url(&self.redis_url))
            .field("rabbitmq_url", &redact_url(&self.rabbitmq_url))
            .field("log_level", &self.log_level)
            .finish()
    }
}

/// Compares what the configuration says, not where the env file that said it lies: the path is kept
/// only to name the file in errors ([`Config::locate`]).
impl PartialEq for Config {
    fn eq(&self, other: &Self) -> bool {
        let Config {
            backend,
            redis_url,
            rabbitmq_url,
            log_level,
            file,
            path: _,
        } = self;
        *backend == other.backend
            && *redis_url == other.redis_url
            && *rabbitmq_url == other.rabbitmq_url
            && *log_level == other.log_level
            && *file == other.file
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            backend: Backend::Memory,
            redis_url: DEFAULT_REDIS_URL.into(),
            rabbitmq_url: DEFAULT_RABBITMQ_URL.into(),
            log_level: LevelFilter::INFO,
            file: HashMap::new(),
            path: None,
        }
    }
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(env_var)
    }

    /// Reads `.env` in the current directory (if there is one), with the process environment taking
    /// precedence over it.
    pub fn load() -> Result<Self> {
        Self::load_with_file(Path::new(".env"))
    }

    /// Reads an env file (if it exists), with the process environment taking precedence over it. A
    /// line of the file that names one of agentcomm's variables but has no `=` (`REDIS_URL
    /// redis://..`) is an [`Error::Config`] naming the line, rather than a line skipped; so is a line
    /// naming `MESSAGING_BACKEND`, `REDIS_URL`, `RABBITMQ_URL` or `REDIS_DELIVERY_MODE` in other letter case (`redis_url=..`:
    /// names are case-sensitive), unless the variable is set all the same (then, and for the other
    /// variables, a warning).
    pub fn load_with_file(path: &Path) -> Result<Self> {
        Self::load_with_file_and(path, env_var)
    }

    /// [`Config::load_with_file`] with `process` standing for the process environment.
    fn load_with_file_and(path: &Path, process: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let file = match std::fs::read_to_string(path) {
            Ok(text) => {
                let file = parse_env_file(&text);
                line_without_equals(path, &text, &process)?;
                name_in_other_case(path, &text, &file, &process)?;
                file
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(error) => {
                return Err(Error::Config {
                    variable: path.display().to_string(),
                    value: String::new(),
                    expected: format!("a readable env file ({error})"),
                });
            }
        };
        Self::from_file_and(path, file, process)
    }

    /// The configuration from the variables of the env file at `path`, with `process`'s taking
    /// precedence.
    fn from_file_and(
        path: &Path,
        file: HashMap<String, String>,
        process: impl Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        let mut config = Self::from_lookup(|name| prefer(process(name), file.get(name)))
            .map_err(|error| name_the_file(error, path, &file, &process))?;
        config.file = file;
        config.path = Some(path.to_path_buf());
        Ok(config)
    }

    /// Reads the variables through `lookup` (for tests and other sources).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        // Surrounding whitespace (a value copied with its newline) is not part of any value.
        let non_empty = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let backend = match non_empty(BACKEND_VAR) {
            Some(value) => Backend::parse(&value)?,
            None => Backend::Memory,
        };
        let redis_url = non_empty(REDIS_URL_VAR).unwrap_or_else(|| DEFAULT_REDIS_URL.into());
        check_url(
            REDIS_URL_VAR,
            &redis_url,
            &[
                "redis",
                "rediss",
                "redis-sentinel",
                "rediss-sentinel",
                "redis-cluster",
                "rediss-cluster",
                "unix",
            ],
            "redis://[:password@]host:port[/db], rediss://, redis-sentinel://, redis-cluster://, \
             rediss-sentinel:// or rediss-cluster:// (TLS), or unix:///path/to/redis.sock",
        )?;
        let rabbitmq_url =
            non_empty(RABBITMQ_URL_VAR).unwrap_or_else(|| DEFAULT_RABBITMQ_URL.into());
        check_url(
            RABBITMQ_URL_VAR,
            &rabbitmq_url,
            &["amqp", "amqps"],
            "amqp://user:password@host:port/vhost or amqps://",
        )?;
        // Empty means unset here as for every variable (and as for the logging set-up).
        let log_level = match non_empty(logging::LOG_LEVEL_ENV) {
            Some(value) => logging::parse_level(&value)?,
            None => LevelFilter::INFO,
        };
        Ok(Config {
            backend,
            redis_url,
            rabbitmq_url,
            log_level,
            file: HashMap::new(),
            path: None,
        })
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The Redis URL (may contain a password: do not log it; use [`redact_url`]).
    pub fn redis_url(&self) -> &str {
        &self.redis_url
    }

    /// The RabbitMQ URL (may contain a password: do not log it; use [`redact_url`]).
    pub fn rabbitmq_url(&self) -> &str {
        &self.rabbitmq_url
    }

    /// The log level.
    pub fn log_level(&self) -> LevelFilter {
        self.log_level
    }

    /// Any other variable (such as `REDIS_DELIVERY_MODE`): the process environment first, then the env
    /// file this configuration was loaded with.
    pub fn var(&self, name: &str) -> Option<String> {
        process_or_file(name, &self.file)
    }

    /// `error`, about a variable read through [`var`](Self::var), with the env file named when the
    /// value came from it (the process environment does not set the variable): `variable` becomes
    /// `NAME (from <file>)`, as in the errors about the variables this configuration reads itself.
    ///
    /// ```
    /// # use agentcomm_core::config::Config;
    /// # fn parse_mode(value: &str) -> agentcomm_core::Result<()> { Ok(()) }
    /// let config = Config::load()?;
    /// if let Some(mode) = config.var("REDIS_DELIVERY_MODE") {
    ///     parse_mode(&mode).map_err(|error| config.locate(error))?;
    /// }
    /// # Ok::<(), agentcomm_core::Error>(())
    /// ```
    pub fn locate(&self, error: Error) -> Error {
        match &self.path {
            Some(path) => name_the_file(error, path, &self.file, &|name: &str| env_var(name)),
            None => error,
        }
    }

    /// Sets the backend.
    pub fn with_backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }
}

/// A variable of the process environment, as agentcomm reads it: a value that is not UTF-8 is read
/// with each invalid byte sequence replaced by `\u{FFFD}` (so that a checked value, such as
/// `MESSAGING_BACKEND`'s, is refused with an error naming the variable), not taken for unset, which
/// fell back to the default without a word (the in-memory router for a backend meant to be Redis).
pub fn env_var(name: &str) -> Option<String> {
    std::env::var_os(name).map(|value| value.to_string_lossy().into_owned())
}

/// A variable from the process environment, or else from the env file. An empty (or blank) value counts
/// as unset, as everywhere in the configuration: a blank process variable does not hide the file's
/// value, and a blank value in the file is no value.
fn process_or_file(name: &str, file: &HashMap<String, String>) -> Option<String> {
    prefer(env_var(name), file.get(name))
}

/// The variables of agentcomm's own, whose lines in an env file are checked.
const CHECKED_VARIABLES: [&str; 5] = [
    BACKEND_VAR,
    REDIS_URL_VAR,
    RABBITMQ_URL_VAR,
    logging::LOG_LEVEL_ENV,
    "REDIS_DELIVERY_MODE",
];

/// Refuses an env file line that names one of agentcomm's variables but has no `=` right after the
/// name (`REDIS_URL redis://prod:6379`, `LOG_LEVEL: DEBUG`): [`parse_env_file`] skips such a line, and the
/// program silently ran on the variable's default (the local Redis, say). The error names the file,
/// the line and the variable, never the value (it may hold a password). Lines naming other
/// variables are left alone: the file may be another tool's too, and so are lines for a variable the
/// process environment sets (it takes precedence: the line would not be used), with a warning
/// (kept until logging starts when no subscriber listens yet).
fn line_without_equals(
    path: &Path,
    text: &str,
    process: &impl Fn(&str) -> Option<String>,
) -> Result<()> {
    for (number, line) in setting_lines(text) {
        // A name alone (`REDIS_URL`) passes the variable on from the environment in docker's
        // `--env-file`, which the file may be written for: agentcomm reads the environment first, so
        // no value is lost, and it is left alone.
        // What comes before the first '=' is the name [`parse_env_file`] reads. A value holding '='
        // itself (`REDIS_URL redis://h:6379/?timeout=5`, a base64 password ending in '=') gives a
        // name that is not the variable's, and the line is ignored as surely as one without '='.
        let before = line.split_once('=').map_or(line, |(name, _)| name).trim();
        let name = before
            .split(|c: char| c.is_whitespace() || c == ':')
            .next()
            .unwrap_or("");
        if CHECKED_VARIABLES.contains(&name) && before != name {
            if prefer(process(name), None).is_some() {
                let (file, line, variable) = (path.display().to_string(), number, name.to_string());
                // `Config::load` usually runs before logging starts: the warning then waits for it.
                logging::warn_now_or_at_init(move || {
                    // Not `file` and `line`: every log line has those (where it was logged).
                    tracing::warn!(
                        env_file = file,
                        env_line = line,
                        variable = variable.as_str(),
                        "the env file's line for this variable has no '=' right after the name and \
                         is ignored; the process environment sets the variable, which is used"
                    );
                });
                continue;
            }
            return Err(line_refused(
                path,
                number,
                name,
                format!(
                    "`{name}=value`: the line has no '=' right after the name, so it would be \
                     ignored and {name}'s default used"
                ),
            ));
        }
    }
    Ok(())
}

/// Refuses an env file line whose name is one of agentcomm's variables that pick the broker in other
/// letter case (`redis_url=redis://prod:6379`, as a case-insensitive settings library would read it):
/// names are case-sensitive here, so the line is not read and the program would silently run on the
/// local broker (or, for `REDIS_DELIVERY_MODE`, in another delivery mode than the programs it talks
/// to). Where the variable is set all the same (by the process environment, or by another line of the
/// file), or is `LOG_LEVEL` (whose default is harmless, and whose lowercase name another tool sharing
/// the file may use), the line is passed over with a warning. Errors name the file, the line and the
/// variable, never the value.
fn name_in_other_case(
    path: &Path,
    text: &str,
    file: &HashMap<String, String>,
    process: &impl Fn(&str) -> Option<String>,
) -> Result<()> {
    for (number, line) in setting_lines(text) {
        let Some((name, _)) = line.split_once('=') else {
            continue;
        };
        let name = name.trim();
        let Some(variable) = CHECKED_VARIABLES
            .iter()
            .find(|variable| variable.eq_ignore_ascii_case(name) && **variable != name)
        else {
            continue;
        };
        let set_elsewhere = prefer(process(variable), file.get(*variable)).is_some();
        // Only where the default picks the broker or how messages travel on it (programs sharing a
        // Redis in different delivery modes do not hear each other): a shared file's `log_level=`
        // (another tool's, say) does not stop the program, whose default level is harmless; it is
        // warned about.
        let picks_the_broker = matches!(
            *variable,
            BACKEND_VAR | REDIS_URL_VAR | RABBITMQ_URL_VAR | "REDIS_DELIVERY_MODE"
        );
        if set_elsewhere || !picks_the_broker {
            let (env_file, env_line, written, variable) = (
                path.display().to_string(),
                number,
                name.to_string(),
                variable.to_string(),
            );
            let used = if set_elsewhere {
                "the variable is set elsewhere, which is used"
            } else {
                "the variable's default is used"
            };
            logging::warn_now_or_at_init(move || {
                tracing::warn!(
                    env_file,
                    env_line,
                    written = written.as_str(),
                    variable = variable.as_str(),
                    "the env file's line names this variable in other letter case and is not \
                     read (names are case-sensitive); {used}"
                );
            });
            continue;
        }
        return Err(line_refused(
            path,
            number,
            name,
            format!(
                "`{variable}=value`: names are case-sensitive, so `{name}` is not read and \
                 {variable}'s default would be used"
            ),
        ));
    }
    Ok(())
}

/// The lines of an env file that may set a variable, numbered from 1: without a byte order mark,
/// trimmed, without `export `; blank lines and comments left out.
fn setting_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    text.lines()
        .enumerate()
        .map(|(index, line)| (index + 1, without_export(line.trim())))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
}

/// The error refusing line `number` of the env file at `path`, which names `name`: never its value
/// (it may hold a password).
fn line_refused(path: &Path, number: usize, name: &str, expected: String) -> Error {
    Error::Config {
        variable: format!("{} line {number}", path.display()),
        value: name.to_string(),
        expected,
    }
}

fn prefer(process: Option<String>, file: Option<&String>) -> Option<String> {
    let set = |value: &String| !value.trim().is_empty();
    process
        .filter(set)
        .or_else(|| file.filter(|value| set(value)).cloned())
}

/// `error` about a variable whose value came from the env file at `path` (the process environment
/// does not set it), with the variable named as `NAME (from <path>)`: a user who finds the variable
/// unset in their shell learns where the bad value is.
fn name_the_file(
    error: Error,
    path: &Path,
    file: &HashMap<String, String>,
    process: &dyn Fn(&str) -> Option<String>,
) -> Error {
    let from_file = |name: &str| {
        process(name)
            .filter(|value| !value.trim().is_empty())
            .is_none()
            && prefer(None, file.get(name)).is_some()
    };
    let located = |name: &str| format!("{name} (from {})", path.display());
    match error {
        Error::Config {
            variable,
            value,
            expected,
        } if from_file(&variable) => Error::Config {
            variable: located(&variable),
            value,
            expected,
        },
        Error::Logging(logging::LoggingError::InvalidLevel { variable, value })
            if from_file(&variable) =>
        {
            Error::Logging(logging::LoggingError::InvalidLevel {
                variable: located(&variable),
                value,
            })
        }
        other => other,
    }
}

/// Checks that `url` has one of `schemes` and a host; the error names the variable and the accepted forms.
pub fn check_url(variable: &str, url: &str, schemes: &[&str], accepted: &str) -> Result<()> {
    let fail = |why: &str| Error::Config {
        variable: variable.into(),
        value: redact_url(url),
        expected: format!("{why}; accepted: {accepted}"),
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(fail("it is not a URL (no '://')"));
    };
    if !schemes.contains(&scheme.to_ascii_lowercase().as_str()) {
        // Named only when it is a scheme, maybe with quotes or a variable name before it: the text
        // before a later "://" (a URL without its scheme, with a URL in its query) holds the password.
        return Err(fail(&match crate::error::split_scheme(scheme) {
            Some((prefix, name, suffix))
                if (!prefix.is_empty() || !suffix.is_empty())
                    && schemes.contains(&name.to_ascii_lowercase().as_str()) =>
            {
                let before = match prefix.is_empty() {
                    true => String::new(),
                    false => {
                        format!("'{prefix}' before '{name}' (and any closing quote or bracket)")
                    }
                };
                let after = match suffix.is_empty() {
                    true => "",
                    false => "the space between the scheme and '://'",
                };
                let and = match before.is_empty() || after.is_empty() {
                    true => "",
                    false => " and ",
                };
                format!("it must start with '{name}://': remove {before}{and}{after}")
            }
            Some(_) => format!("the scheme '{scheme}' is not supported"),
            None => "it does not start with a scheme (such as redis:// or amqp://)".to_string(),
        }));
    }
    if scheme.eq_ignore_ascii_case("unix") {
        return if rest.is_empty() {
            Err(fail("the socket path is empty"))
        } else {
            Ok(())
        };
    }
    // The host starts after the last '@' (a password may contain '/' or '?' when not
    // percent-encoded), unless that '@' is in the query (`sentinelPassword=p@ss`): then it starts
    // after the last '@' before the query, or right after the scheme. The URL is taken when either
    // reading finds a host; the first one's complaint is reported otherwise.
    // The second reading is only tried when every '@' after the '?' is in a parameter's value
    // (`name=p@ss`): an '@' with no `=` before it in its piece (`admin:12?34@cache:63x9`) is the end of
    // a password holding a '?', and the host after it is the one to check.
    let after_last_at = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let after_last_at_before_query = before_query
        .rsplit_once('@')
        .map_or(before_query, |(_, host)| host);
    let ats_in_values = query
        .split('&')
        .filter(|piece| piece.contains('@'))
        .all(|piece| {
            piece
                .find('=')
                .is_some_and(|eq| eq < piece.find('@').unwrap_or(0))
        });
    match host_problem(after_last_at) {
        None => Ok(()),
        Some(_) if ats_in_values && host_problem(after_last_at_before_query).is_none() => Ok(()),
        Some(problem) => Err(fail(problem)),
    }
}

/// What is wrong with the hosts at the start of `authority` (the URL after its user info), if anything.
fn host_problem(authority: &str) -> Option<&'static str> {
    let host_port = authority.split(['/', '?', '#']).next().unwrap_or("");
    if host_port.is_empty() || host_port.starts_with(':') {
        return Some("the host is missing");
    }
    // Sentinel and cluster URLs may list several hosts.
    for host in host_port.split(',') {
        let port = match host.strip_prefix('[') {
            Some(ipv6) => ipv6.split_once("]:").map(|(_, port)| port),
            None => host.rsplit_once(':').map(|(_, port)| port),
        };
        if port.is_some_and(|port| port.parse::<u16>().is_err()) {
            // The port text is not shown: a mangled URL may have put part of a password there.
            return Some("the port is not a number from 0 to 65535");
        }
    }
    None
}

/// `line` without a leading `export` and the whitespace after it: a tab there too (`export\tNAME=..`),
/// which was read as part of the name, so the value was ignored and the line check passed it by.
fn without_export(line: &str) -> &str {
    match line.strip_prefix("export") {
        Some(rest) if rest.starts_with(char::is_whitespace) => rest.trim_start(),
        _ => line,
    }
}

/// `value` up to a `#` after whitespace, which starts a comment: after a tab too (`DEBUG\t# verbose`),
/// which was kept in the value. A `#` right after other text (`pa#ss`) is part of the value.
fn without_comment(value: &str) -> &str {
    value
        .char_indices()
        .find(|&(at, c)| c == '#' && value[..at].ends_with(char::is_whitespace))
        .map_or(value, |(at, _)| &value[..at])
}

/// Parses `KEY=value` lines; `#` starts a comment, `export ` is allowed, values may be quoted.
pub fn parse_env_file(text: &str) -> HashMap<String, String> {
    let mut values = HashMap::new();
    // A byte order mark some editors write would otherwise become part of the first name.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = without_export(line);
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        // A quoted value ends at its closing quote; a comment may follow it.
        let quoted = |quote: char| {
            let inner = value.strip_prefix(quote)?;
            let (inner, rest) = inner.split_once(quote)?;
            let rest = rest.trim_start();
            (rest.is_empty() || rest.starts_with('#')).then(|| inner.to_string())
        };
        let value = match quoted('"').or_else(|| quoted('\'')) {
            Some(inner) => inner,
            // Quotes around the whole value (with quotes inside it), as before comments were read.
            None => match ['"', '\'']
                .into_iter()
                .find_map(|q| value.strip_prefix(q).and_then(|v| v.strip_suffix(q)))
            {
                Some(inner) => inner.to_string(),
                None => without_comment(value).trim().to_string(),
            },
        };
        values.insert(key.trim().to_string(), value);
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_values_are_unset_and_never_hide_the_env_file() {
        let config = Config::from_lookup(lookup(&[("LOG_LEVEL", " "), ("MESSAGING_BACKEND", "")]))
            .expect("empty LOG_LEVEL is INFO, as for logging");
        assert_eq!(config.log_level(), LevelFilter::INFO);
        let in_file = "amqp://app@mq:5672/prod".to_string();
        assert_eq!(
            prefer(Some(String::new()), Some(&in_file)),
            Some(in_file.clone())
        );
        assert_eq!(
            prefer(Some(" ".into()), Some(&in_file)),
            Some(in_file.clone())
        );
        assert_eq!(prefer(None, Some(&in_file)), Some(in_file.clone()));
        assert_eq!(
            prefer(Some("amqp://other".into()), Some(&in_file)).as_deref(),
            Some("amqp://other"),
            "a set process variable still wins"
        );
        assert_eq!(prefer(Some(String::new()), None), None);
        assert_eq!(
            prefer(None, Some(&" ".to_string())),
            None,
            "blank in the file too"
        );
    }

    #[test]
    fn a_unix_socket_url_is_read_in_any_letter_case() {
        for url in ["unix:///run/redis.sock", "UNIX:///run/redis.sock"] {
            assert!(
                Config::from_lookup(lookup(&[("REDIS_URL", url)])).is_ok(),
                "{url}"
            );
        }
    }

    #[test]
    fn a_url_in_the_backend_variable_is_shown_without_its_password() {
        let error = Config::from_lookup(lookup(&[(
            "MESSAGING_BACKEND",
            "redis://:S3cret@cache:6379/0",
        )]))
        .unwrap_err()
        .to_string();
        assert!(
            !error.contains("S3cret") && error.contains("MESSAGING_BACKEND"),
            "{error}"
        );
    }

    #[test]
    fn env_files_with_a_byte_order_mark_or_comments_after_quotes_are_read() {
        let values = parse_env_file(
            "\u{feff}MESSAGING_BACKEND=redis\nREDIS_DELIVERY_MODE=\"pubsub\"  # fan-out\nLOG_LEVEL='DEBUG' # verbose\nX=\"a # b\"\n",
        );
        assert_eq!(values["MESSAGING_BACKEND"], "redis");
        assert_eq!(values["REDIS_DELIVERY_MODE"], "pubsub");
        assert_eq!(values["LOG_LEVEL"], "DEBUG");
        assert_eq!(values["X"], "a # b");
        let values = parse_env_file("K=\"a \\\"b\\\" c\"\n");
        assert_eq!(values["K"], "a \\\"b\\\" c", "quotes inside a quoted value");
    }

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn defaults_need_no_environment() {
        let config = Config::from_lookup(lookup(&[])).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.backend(), Backend::Memory);
    }

    /// TLS to a Redis cluster or through Sentinel (`rediss-cluster://`, `rediss-sentinel://`, which the
    /// Redis backend reads) is accepted. Before, both were refused: a TLS cluster could not be named
    /// in `REDIS_URL` at all (`rediss://` is a single server).
    #[test]
    fn tls_redis_cluster_and_sentinel_urls_are_accepted() {
        for url in [
            "rediss-cluster://:pw@10.0.0.1:7000?node=10.0.0.2:7000",
            "rediss-sentinel://:pw@10.0.0.1:26379/0?sentinelServiceName=m",
        ] {
            let config = Config::from_lookup(lookup(&[("REDIS_URL", url)]))
                .unwrap_or_else(|error| panic!("{url}: {error}"));
            assert_eq!(config.redis_url(), url);
        }
    }

    /// Values copied with their newline (or with spaces around them) are taken without it; before, a
    /// URL with a leading space was refused ("the scheme ' redis' is not supported") and one with a
    /// trailing newline kept it.
    #[test]
    fn values_are_taken_without_surrounding_whitespace() {
        let config = Config::from_lookup(lookup(&[
            ("MESSAGING_BACKEND", " redis\n"),
            ("REDIS_URL", " redis://:pw@cache.internal:6380/2\n"),
            ("RABBITMQ_URL", "amqp://app:pw@mq.internal:5672/prod \n"),
        ]))
        .unwrap();
        assert_eq!(config.backend(), Backend::Redis);
        assert_eq!(config.redis_url(), "redis://:pw@cache.internal:6380/2");
        assert_eq!(config.rabbitmq_url(), "amqp://app:pw@mq.internal:5672/prod");
    }

    #[test]
    fn reads_every_variable() {
        let config = Config::from_lookup(lookup(&[
            ("MESSAGING_BACKEND", "RabbitMQ"),
            ("REDIS_URL", "rediss://:pw@cache.internal:6380/2"),
            ("RABBITMQ_URL", "amqps://app:pw@mq.internal:5671/prod"),
            ("LOG_LEVEL", "warning"),
        ]))
        .unwrap();
        assert_eq!(config.backend(), Backend::RabbitMq);
        assert_eq!(config.redis_url(), "rediss://:pw@cache.internal:6380/2");
        assert_eq!(config.log_level(), LevelFilter::WARN);
        let debug = format!("{config:?}");
        assert!(!debug.contains("pw"), "{debug}");
    }

    #[test]
    fn bad_values_name_the_variable_and_the_accepted_values() {
        let cases = [
            (
                ("MESSAGING_BACKEND", "kafka"),
                "MESSAGING_BACKEND='kafka' is not valid: accepted values are memory, redis, rabbitmq",
            ),
            (
                ("REDIS_URL", "localhost:6379"),
                "REDIS_URL='localhost:6379' is not valid: it is not a URL (no '://'); accepted: redis://",
            ),
            (
                ("REDIS_URL", "http://localhost"),
                "REDIS_URL='http://localhost' is not valid: the scheme 'http' is not supported",
            ),
            (
                ("REDIS_URL", "redis://:pw@:6379"),
                "REDIS_URL='redis://:***@:6379' is not valid: the host is missing",
            ),
            (
                ("RABBITMQ_URL", "amqp://u:pw@host:56x2/"),
                "RABBITMQ_URL='amqp://u:***@host:56x2/' is not valid: the port is not a number",
            ),
            (
                ("REDIS_URL", "redis://app:Xy/9pw@cache:x/0"),
                "REDIS_URL='redis://app:***@cache:x/0' is not valid: the port is not a number",
            ),
            (
                ("LOG_LEVEL", "loud"),
                "LOG_LEVEL='loud' is not a log level. Accepted values: TRACE, DEBUG, INFO, WARNING (or WARN), ERROR (or CRITICAL)",
            ),
        ];
        for ((name, value), expected) in cases {
            let error = Config::from_lookup(lookup(&[(name, value)]))
                .unwrap_err()
                .to_string();
            assert!(error.starts_with(expected), "{name}={value}: {error}");
            assert!(!error.contains("pw"), "{error}");
        }
    }

    /// An `@` in the query (a Sentinel password, `sentinelPassword=p@ss:w0rd`, which fred reads) is not
    /// where the host starts. Before, the host was taken after the URL's last `@`, so `REDIS_URL`
    /// refused this URL, which `RedisRouter::builder` takes, with "the port is not a number": a
    /// Sentinel deployment with such a password could not be configured from the environment.
    #[test]
    fn an_at_sign_in_the_query_is_not_taken_for_the_host() {
        for (variable, url) in [
            (
                "REDIS_URL",
                "redis-sentinel://sentinel-a:26379,sentinel-b:26379/0?sentinelServiceName=m&sentinelPassword=p@ss:w0rd",
            ),
            (
                "REDIS_URL",
                "rediss-sentinel://:pw@sentinel-a:26379/0?sentinelServiceName=m&sentinelPassword=p@ss:w0rd",
            ),
        ] {
            if let Err(error) = Config::from_lookup(lookup(&[(variable, url)])) {
                panic!("{variable}: {error}");
            }
        }
        // Still refused: a bad port before the query, and a password with a '?' does not hide one.
        for url in [
            "redis-sentinel://h:2637x/0?sentinelPassword=p@ss:w0rd",
            "redis://:pa?ss@cache:63x9/0",
        ] {
            let error = Config::from_lookup(lookup(&[("REDIS_URL", url)]))
                .unwrap_err()
                .to_string();
            assert!(error.contains("the port is not a number"), "{url}: {error}");
        }
        // A password with a '?' (not percent-encoded) still leaves the host after its '@'.
        assert!(
            Config::from_lookup(lookup(&[("REDIS_URL", "redis://:pa?ss@cache:6379/0")])).is_ok()
        );
    }

    /// A password holding a '?' whose start reads as `host:port` (`admin:12?34@cache:63x9`) does not
    /// hide the bad port after its '@': the '@' is not in a query parameter's value, so the URL is not
    /// read as host `admin`, port `12` and a query `34@cache..`. That URL was refused before the
    /// Sentinel reading was added, and was taken after it.
    #[test]
    fn a_password_with_a_question_mark_does_not_hide_a_bad_port() {
        for url in [
            "redis://admin:12?34@cache:63x9/0",
            "redis://admin:6379?x@cache:63x9",
        ] {
            let error = Config::from_lookup(lookup(&[("REDIS_URL", url)]))
                .unwrap_err()
                .to_string();
            assert!(error.contains("the port is not a number"), "{url}: {error}");
        }
        assert!(
            Config::from_lookup(lookup(&[("REDIS_URL", "redis://admin:12?34@cache:6379/0")]))
                .is_ok()
        );
    }

    #[test]
    fn debug_hides_passwords_in_the_query() {
        for (variable, url, secret) in [
            (
                "REDIS_URL",
                "redis-sentinel://sentinel-a:26379,sentinel-b:26379/0?sentinelServiceName=m&sentinelPassword=S3ntinelSecret",
                "S3ntinelSecret",
            ),
            (
                "RABBITMQ_URL",
                "amqps://app:pw@mq:5671/prod?certfile=/c.pem&keyfile=/k.pem&password=KeyPassphrase",
                "KeyPassphrase",
            ),
        ] {
            let config = Config::from_lookup(lookup(&[(variable, url)])).unwrap();
            let debug = format!("{config:?}");
            assert!(!debug.contains(secret), "{debug}");
        }
    }

    #[test]
    fn config_errors_hide_query_and_malformed_passwords() {
        let mut leaks = Vec::new();
        for (name, value, secret) in [
            // Bad port in the first node: the error shows the whole query.
            (
                "REDIS_URL",
                "redis-sentinel://h:2637x/0?sentinelServiceName=m&sentinelPassword=S3ntinelSecret",
                "S3ntinelSecret",
            ),
            // A typo in the scheme separator: no '://', the URL is shown as given.
            ("REDIS_URL", "redis:/:TypoSecret@cache:6379/0", "TypoSecret"),
            (
                "RABBITMQ_URL",
                "amqp//app:TypoSecret@mq:5672/prod",
                "TypoSecret",
            ),
        ] {
            let error = Config::from_lookup(lookup(&[(name, value)]))
                .unwrap_err()
                .to_string();
            if error.contains(secret) {
                leaks.push(error);
            }
        }
        assert!(leaks.is_empty(), "{leaks:#?}");
    }

    #[test]
    fn other_variables_come_from_the_env_file_too() {
        let path =
            std::env::temp_dir().join(format!("agentcomm-config-{}.env", std::process::id()));
        std::fs::write(
            &path,
            "MESSAGING_BACKEND=redis\nAGENTCOMM_TEST_ONLY_VARIABLE=pubsub\n",
        )
        .unwrap();
        let config = Config::load_with_file(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            config.var("AGENTCOMM_TEST_ONLY_VARIABLE").as_deref(),
            Some("pubsub")
        );
        assert_eq!(config.var("AGENTCOMM_TEST_ABSENT_VARIABLE"), None);
    }

    /// A line of agentcomm's own variable without '=' (`REDIS_URL redis://..`, `LOG_LEVEL: DEBUG`) was
    /// skipped without a word, and the program ran on the default (the local Redis): it is refused,
    /// naming the file, the line and the fix, and not the value.
    #[test]
    fn an_env_file_line_without_equals_is_refused_naming_the_line() {
        let path = std::env::temp_dir().join(format!(
            "agentcomm-config-noequals-{}.env",
            std::process::id()
        ));
        for (text, line, name) in [
            (
                "# production\nMESSAGING_BACKEND=redis\nREDIS_URL redis://:s3cr3t@prod:6379\n",
                3,
                "REDIS_URL",
            ),
            ("export LOG_LEVEL: DEBUG\n", 1, "LOG_LEVEL"),
            // A value holding '=' of its own: the line was read as the variable
            // `REDIS_URL redis://:c2VjcmV0` and ignored, the check passing it by.
            (
                "REDIS_URL redis://:s3cr3t=@prod:6379/?timeout=5\n",
                1,
                "REDIS_URL",
            ),
            (
                "MESSAGING_BACKEND: rabbitmq # was=redis\n",
                1,
                "MESSAGING_BACKEND",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let result = Config::load_with_file_and(&path, |_| None);
            std::fs::remove_file(&path).unwrap();
            let error = result.unwrap_err().to_string();
            assert!(
                error.contains(&format!("line {line}='{name}'"))
                    && error.contains(&format!("`{name}=value`")),
                "{error}"
            );
            assert!(!error.contains("s3cr3t"), "{error}");
        }
        // Spaces around the '=' are no mistake, whatever the value holds.
        std::fs::write(&path, "REDIS_URL = redis://h:6379/?timeout=5\n").unwrap();
        let config = Config::load_with_file(&path);
        std::fs::remove_file(&path).unwrap();
        let config = config.unwrap();
        // (The process environment, which takes precedence, may set it.)
        if std::env::var_os("REDIS_URL").is_none() {
            assert_eq!(
                config.var("REDIS_URL").as_deref(),
                Some("redis://h:6379/?timeout=5")
            );
        }
        // A name alone is docker's `--env-file` way of passing the variable on from the environment,
        // where agentcomm reads it first anyway: no value was lost.
        std::fs::write(&path, "export REDIS_URL\nLOG_LEVEL\n").unwrap();
        let config = Config::load_with_file(&path);
        std::fs::remove_file(&path).unwrap();
        config.unwrap();
        // Another tool's line without '=' is left alone.
        std::fs::write(&path, "SOMETHING_ELSE\nAGENTCOMM_TEST_ONLY_VARIABLE=x\n").unwrap();
        let config = Config::load_with_file(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            config
                .unwrap()
                .var("AGENTCOMM_TEST_ONLY_VARIABLE")
                .as_deref(),
            Some("x")
        );
    }

    /// The process environment takes precedence over the env file: a malformed line for a variable it
    /// sets would not be used, and must not stop a program whose deployment sets the variable (it did:
    /// "the line has no '='" for a `REDIS_URL` the environment gave). The process's value is used.
    #[test]
    fn a_line_without_equals_for_a_variable_the_environment_sets_is_passed_over() {
        let path = std::env::temp_dir().join(format!(
            "agentcomm-config-noequals-set-{}.env",
            std::process::id()
        ));
        std::fs::write(
            &path,
            "MESSAGING_BACKEND=redis\nREDIS_URL redis://:s3cr3t@prod:6379\n",
        )
        .unwrap();
        let process =
            |name: &str| (name == "REDIS_URL").then(|| "redis://from-env:6379".to_string());
        let config = Config::load_with_file_and(&path, process);
        // Set but blank is not set (as everywhere else): the line is refused again.
        let blank = Config::load_with_file_and(&path, |name: &str| {
            (name == "REDIS_URL").then(|| " ".to_string())
        });
        std::fs::remove_file(&path).unwrap();
        let config = config.unwrap();
        assert_eq!(config.redis_url(), "redis://from-env:6379");
        let error = blank.unwrap_err().to_string();
        assert!(error.contains("line 2='REDIS_URL'"), "{error}");
    }

    /// A line naming one of agentcomm's variables in other letter case (`redis_url=`, as a
    /// case-insensitive settings library reads it) is not read: the program ran on the local Redis
    /// with nothing said. It is refused, naming the line and the variable and not the value, unless the
    /// variable is set all the same (by the environment or another line), when it is passed over.
    #[test]
    fn a_variable_named_in_other_letter_case_is_refused_unless_set_elsewhere() {
        let path =
            std::env::temp_dir().join(format!("agentcomm-config-case-{}.env", std::process::id()));
        let load = |text: &str, process: &dyn Fn(&str) -> Option<String>| {
            std::fs::write(&path, text).unwrap();
            let config = Config::load_with_file_and(&path, process);
            std::fs::remove_file(&path).unwrap();
            config
        };
        let nothing = |_: &str| None;
        let error = load(
            "MESSAGING_BACKEND=redis\nexport redis_url = redis://:s3cr3t@prod:6379\n",
            &nothing,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("line 2='redis_url'"), "{error}");
        assert!(error.contains("`REDIS_URL=value`"), "{error}");
        assert!(
            !error.contains("s3cr3t") && !error.contains("prod"),
            "{error}"
        );
        let error = load("Messaging_Backend=redis\n", &nothing)
            .unwrap_err()
            .to_string();
        assert!(error.contains("`MESSAGING_BACKEND=value`"), "{error}");
        // Where the default does not pick the broker (a shared file's `log_level=`, another tool's),
        // the line is passed over with a warning.
        let config = load("log_level=debug\n", &nothing).unwrap();
        assert_eq!(config.log_level(), LevelFilter::INFO);
        // The delivery mode is refused: a program on the default (Streams) beside ones in pub/sub
        // mode would not hear them.
        let error = load("redis_delivery_mode=pubsub\n", &nothing)
            .unwrap_err()
            .to_string();
        assert!(error.contains("`REDIS_DELIVERY_MODE=value`"), "{error}");
        // Set elsewhere: passed over, and the value set is used.
        let config = load("redis_url=redis://a:1\nREDIS_URL=redis://b:2\n", &nothing).unwrap();
        assert_eq!(config.redis_url(), "redis://b:2");
        let from_env =
            |name: &str| (name == "REDIS_URL").then(|| "redis://from-env:6379".to_string());
        let config = load("redis_url=redis://a:1\n", &from_env).unwrap();
        assert_eq!(config.redis_url(), "redis://from-env:6379");
        // Other variables, comments and the right letter case are left alone.
        let config = load(
            "# redis_url=redis://a:1\nother_tool=1\nLOG_LEVEL=debug\n",
            &nothing,
        )
        .unwrap();
        assert_eq!(config.log_level(), LevelFilter::DEBUG);
    }

    /// A bad value read from the env file names the file. Before, the error was the same as for the
    /// process environment ("MESSAGING_BACKEND='kafka' is not valid: .."), and a user whose shell has
    /// no MESSAGING_BACKEND could not tell where 'kafka' came from.
    #[test]
    fn a_bad_value_from_the_env_file_names_the_file() {
        let path = Path::new("/srv/app/.env");
        let file =
            parse_env_file("MESSAGING_BACKEND=kafka\nLOG_LEVEL=loud\nREDIS_URL=localhost:6379\n");
        let unset = |_: &str| None;
        let load = |process: &dyn Fn(&str) -> Option<String>| {
            Config::from_file_and(path, file.clone(), process)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            load(&unset),
            "MESSAGING_BACKEND (from /srv/app/.env)='kafka' is not valid: accepted values are memory, redis, rabbitmq"
        );
        let backend_set = |name: &str| (name == "MESSAGING_BACKEND").then(|| "redis".to_string());
        let error = load(&backend_set);
        assert!(
            error.starts_with("REDIS_URL (from /srv/app/.env)='localhost:6379' is not valid"),
            "{error}"
        );
        let urls_set = |name: &str| match name {
            "MESSAGING_BACKEND" => Some("memory".to_string()),
            "REDIS_URL" => Some("redis://cache:6379".to_string()),
            _ => None,
        };
        let error = load(&urls_set);
        assert!(
            error.starts_with("LOG_LEVEL (from /srv/app/.env)='loud' is not a log level"),
            "{error}"
        );
        // A bad value from the process environment is reported as before.
        let process_bad = |name: &str| (name == "MESSAGING_BACKEND").then(|| "amqq".to_string());
        assert!(load(&process_bad).starts_with("MESSAGING_BACKEND='amqq' is not valid"));
    }

    /// A bad value of another crate's variable (read through `var`) names the env file it came from
    /// once passed through `locate`, and only then: a value from the process environment, or a
    /// configuration read without a file, leaves the error as it was.
    #[test]
    fn locate_names_the_env_file_of_another_crates_variable() {
        let path = Path::new("/srv/app/.env");
        let file = parse_env_file("AGENTCOMM_TEST_ONLY_MODE=kafka\n");
        let config = Config::from_file_and(path, file, |_| None).unwrap();
        let bad = |variable: &str| Error::Config {
            variable: variable.into(),
            value: "kafka".into(),
            expected: "streams or pubsub".into(),
        };
        assert_eq!(
            config.locate(bad("AGENTCOMM_TEST_ONLY_MODE")).to_string(),
            "AGENTCOMM_TEST_ONLY_MODE (from /srv/app/.env)='kafka' is not valid: streams or pubsub"
        );
        // Not in the file: as it was.
        assert_eq!(
            config.locate(bad("AGENTCOMM_TEST_ONLY_OTHER")).to_string(),
            "AGENTCOMM_TEST_ONLY_OTHER='kafka' is not valid: streams or pubsub"
        );
        // Read from the environment alone: no file to name.
        let from_env = Config::from_lookup(|_| None).unwrap();
        assert_eq!(
            from_env.locate(bad("AGENTCOMM_TEST_ONLY_MODE")).to_string(),
            "AGENTCOMM_TEST_ONLY_MODE='kafka' is not valid: streams or pubsub"
        );
    }

    /// Where the env file lies is not part of what a configuration says: one loaded where there is
    /// no env file equals the defaults (and one read from the environment alone), and two files that
    /// say the same thing give equal configurations. Before, the path kept for `locate` made them
    /// differ.
    #[test]
    fn the_env_files_path_does_not_change_equality() {
        let no_file = Config::from_file_and(Path::new("/srv/app/.env"), HashMap::new(), |_| None);
        assert_eq!(no_file.unwrap(), Config::default());
        let text = "MESSAGING_BACKEND=redis\nREDIS_DELIVERY_MODE=pubsub\n";
        let one = Config::from_file_and(Path::new("/a/.env"), parse_env_file(text), |_| None);
        let other = Config::from_file_and(Path::new("/b/.env"), parse_env_file(text), |_| None);
        assert_eq!(one.unwrap(), other.unwrap());
        // What the file says still counts.
        let pubsub = Config::from_file_and(Path::new("/a/.env"), parse_env_file(text), |_| None);
        let streams = Config::from_file_and(
            Path::new("/a/.env"),
            parse_env_file("MESSAGING_BACKEND=redis\nREDIS_DELIVERY_MODE=streams\n"),
            |_| None,
        );
        assert_ne!(pubsub.unwrap(), streams.unwrap());
    }

    #[test]
    fn env_files_are_read_with_comments_quotes_and_export() {
        let values = parse_env_file(
            "# comment\nMESSAGING_BACKEND=redis\nexport REDIS_URL=\"redis://h:1\"\nLOG_LEVEL='DEBUG'\nX=1 # trailing\n\nnot a pair\n",
        );
        assert_eq!(values["MESSAGING_BACKEND"], "redis");
        assert_eq!(values["REDIS_URL"], "redis://h:1");
        assert_eq!(values["LOG_LEVEL"], "DEBUG");
        assert_eq!(values["X"], "1");
        assert_eq!(values.len(), 4);
    }

    /// A comment after a tab was kept in the value: `LOG_LEVEL=DEBUG\t# verbose` was refused as the
    /// level 'DEBUG\t# verbose', and a variable read through `Config::var` held the comment.
    #[test]
    fn a_comment_after_a_tab_is_no_part_of_the_value() {
        let values = parse_env_file(
            "LOG_LEVEL=DEBUG\t# verbose\nREDIS_DELIVERY_MODE=pubsub\t\t#fan-out\nK=a#b\nP=x \t # y\n",
        );
        assert_eq!(values["LOG_LEVEL"], "DEBUG");
        assert_eq!(values["REDIS_DELIVERY_MODE"], "pubsub");
        assert_eq!(values["K"], "a#b", "a '#' right after text is kept");
        assert_eq!(values["P"], "x");
    }

    /// `export` followed by a tab, or by more than one space, is `export` all the same: the name was
    /// read as `export\tREDIS_URL`, so REDIS_URL's value was ignored, and the line check, which
    /// took the name for `export`, let it pass.
    #[test]
    fn export_followed_by_any_whitespace_is_read() {
        let values = parse_env_file("export\tREDIS_URL=redis://h:1\nexport  LOG_LEVEL=DEBUG\n");
        assert_eq!(
            values.get("REDIS_URL").map(String::as_str),
            Some("redis://h:1")
        );
        assert_eq!(values.get("LOG_LEVEL").map(String::as_str), Some("DEBUG"));
        let error = line_without_equals(
            Path::new(".env"),
            "export\tREDIS_URL redis://h:1\n",
            &|_| None,
        )
        .expect_err("a line of REDIS_URL without '=' is refused");
        assert!(error.to_string().contains("REDIS_URL"), "{error}");
        // A variable whose name begins with `export` stays that name.
        assert_eq!(parse_env_file("exporter=1\n")["exporter"], "1");
    }
}
