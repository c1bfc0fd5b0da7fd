//! JSON Lines logging built on `tracing`, `tracing-subscriber` and `tracing-appender`.
//!
//! Every event becomes one JSON object on one line:
//!
//! ```text
//! {"timestamp":"2026-11-25T15:30:45.123Z","level":"INFO","message":"message sent","target":"agentcomm_redis::publisher","file":"crates/agentcomm-redis/src/publisher.rs","line":87,"agent":"PaymentAgent","class":"PaymentRequest","message_id":"0193…","session":"s1"}
//! ```
//!
//! * `timestamp` is RFC 3339 in UTC with milliseconds, `level` is one of `TRACE`, `DEBUG`,
//!   `INFO`, `WARNING`, `ERROR` (Python's logging names: a warning is `WARNING`, not
//!   `tracing`'s `WARN`), `message` is the event's message (an empty string when the
//!   event has none), `target` is the event's target (usually its module path), and `file`
//!   and `line` give where the event was emitted (`null` when unknown).
//! * The fields of the event and of the spans it is in are flattened into the object. The
//!   innermost span wins when two spans have a field of the same name, and the event's own
//!   fields win over span fields. A field whose name is one of the keys above is kept under
//!   `fields.<name>` (for instance `fields.level`) instead of replacing it.
//! * Numbers, booleans and strings keep their JSON type; values recorded with `?value`
//!   (`Debug`) or `%value` (`Display`) become strings, and errors recorded as
//!   `&dyn Error` become their message followed by their sources, separated by `": "`.
//! * Events forwarded from the `log` crate by `tracing-log` take `target`, `file` and `line`
//!   from the `log` record.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use tracing_subscriber::layer::SubscriberExt;
//!
//! #[derive(Clone, Default)]
//! struct Lines(Arc<Mutex<Vec<u8>>>);
//! impl std::io::Write for Lines {
//!     fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
//!         self.0.lock().unwrap().extend_from_slice(bytes);
//!         Ok(bytes.len())
//!     }
//!     fn flush(&mut self) -> std::io::Result<()> { Ok(()) }
//! }
//!
//! let lines = Lines::default();
//! let writer = lines.clone();
//! let subscriber = tracing_subscriber::registry()
//!     .with(agentcomm_core::logging::json_layer(move || writer.clone()));
//! tracing::subscriber::with_default(subscriber, || {
//!     tracing::warn!(attempt = 3, "retrying");
//! });
//! let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
//! assert!(text.contains(r#""level":"WARNING","message":"retrying""#), "{text}");
//! assert!(text.ends_with("\"attempt\":3}\n"), "{text}");
//! ```
//!
//! [`init`] installs this as the global subscriber, writing to standard output or a rolling
//! file through a background thread, and returns a [`LogGuard`] that must be kept alive:
//! dropping it writes out and flushes every line logged so far. [`json_layer`] is the
//! formatting layer on its own, to compose into a subscriber of your own.
//!
//! The level comes from the `LOG_LEVEL` environment variable ([`LogConfig::from_env`],
//! [`try_init_from_env`]) or is set explicitly with [`LogConfig::level`]; full
//! [`EnvFilter`] directives such as `agentcomm_core=debug,info` are accepted by
//! [`LogConfig::filter`].

use std::error::Error as StdError;
use std::ffi::OsString;
use std::fmt;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Number, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_appender::rolling::RollingFileAppender;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::{LookupSpan, Registry};

/// Name of the environment variable read by [`LogConfig::from_env`] and
/// [`try_init_from_env`].
pub const LOG_LEVEL_ENV: &str = "LOG_LEVEL";

/// The values [`parse_level`] accepts, as listed in its error message.
const ACCEPTED_LEVELS: &str = "TRACE, DEBUG, INFO, WARNING (or WARN), ERROR (or CRITICAL)";

/// Suffix (extension) of the log files written by [`LogOutput::File`].
const FILE_SUFFIX: &str = "jsonl";

/// Name of the background thread that writes log lines.
const WORKER_THREAD_NAME: &str = "agentcomm-log";

/// How long dropping a [`LogGuard`] waits for pending lines by default.
const DEFAULT_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Keys written for every event; fields with these names go to `fields.<name>`.
const RESERVED_KEYS: [&str; 6] = ["timestamp", "level", "message", "target", "file", "line"];

/// Errors from setting up logging.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoggingError {
    /// A level setting (normally the `LOG_LEVEL` environment variable) holds an unknown level.
    #[error("{variable}='{value}' is not a log level. Accepted values: {ACCEPTED_LEVELS}")]
    InvalidLevel {
        /// The setting that held the value, e.g. `LOG_LEVEL`; `LOG_LEVEL (from ./.env)` for a value
        /// [`Config::load`](crate::config::Config::load) read from an env file.
        variable: String,
        /// The rejected value.
        value: String,
    },
    /// A filter given to [`LogConfig::filter`] is not valid `EnvFilter` syntax.
    #[error(
        "'{filter}' is not a valid log filter ({reason}). Use a level such as `info`, or \
         comma-separated directives such as `agentcomm_core=debug,info`"
    )]
    InvalidFilter {
        /// The rejected filter.
        filter: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A global `tracing` subscriber was installed before [`init`] was called.
    #[error(
        "a global tracing subscriber is already installed. Call `logging::init` only once, at \
         the start of the program, or add `logging::json_layer` to the subscriber you install \
         yourself"
    )]
    AlreadyInitialized,
    /// The log file could not be opened.
    #[error(
        "cannot open a log file in '{}': {source}. Check that the directory can be created \
         and written to by this process",
        directory.display()
    )]
    Io {
        /// The directory the log file was to be written in.
        directory: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Parses a level name as used in `LOG_LEVEL`.
///
/// Accepts `TRACE`, `DEBUG`, `INFO`, `WARNING` (or `WARN`) and `ERROR` (or `CRITICAL`, Python's
/// highest level, which has no more severe counterpart here) in any letter case,
/// ignoring surrounding whitespace. Any other value is a [`LoggingError::InvalidLevel`]
/// whose message names `LOG_LEVEL` and lists the accepted values.
///
/// # Errors
///
/// [`LoggingError::InvalidLevel`] if `value` is not one of the names above.
pub fn parse_level(value: &str) -> Result<LevelFilter, LoggingError> {
    match value.trim().to_ascii_uppercase().as_str() {
        "TRACE" => Ok(LevelFilter::TRACE),
        "DEBUG" => Ok(LevelFilter::DEBUG),
        "INFO" => Ok(LevelFilter::INFO),
        "WARNING" | "WARN" => Ok(LevelFilter::WARN),
        "ERROR" | "CRITICAL" => Ok(LevelFilter::ERROR),
        _ => Err(LoggingError::InvalidLevel {
            variable: LOG_LEVEL_ENV.to_owned(),
            value: value.to_owned(),
        }),
    }
}

/// The `level` written in a line: Python's logging names (`WARNING`, not `WARN`), so that what reads
/// the logs of the Python library reads these too; `TRACE` has no Python counterpart.
fn level_name(level: tracing::Level) -> &'static str {
    match level {
        tracing::Level::WARN => "WARNING",
        level => level.as_str(),
    }
}

/// When a log file is closed and a new one started.
///
/// Files are named `<prefix>.<date>.jsonl`, with the date in UTC as `YYYY-MM-DD` for
/// [`Rotation::Daily`] and `YYYY-MM-DD-HH` for [`Rotation::Hourly`]; with
/// [`Rotation::Never`] the single file is `<prefix>.jsonl`. Old files are never deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Rotation {
    /// A new file every day (UTC). The default.
    #[default]
    Daily,
    /// A new file every hour (UTC).
    Hourly,
    /// One file, appended to forever.
    Never,
}

impl Rotation {
    fn to_appender(self) -> tracing_appender::rolling::Rotation {
        match self {
            Rotation::Daily => tracing_appender::rolling::Rotation::DAILY,
            Rotation::Hourly => tracing_appender::rolling::Rotation::HOURLY,
            Rotation::Never => tracing_appender::rolling::Rotation::NEVER,
        }
    }
}

/// Where log lines are written.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LogOutput {
    /// Standard output. The default.
    #[default]
    Stdout,
    /// Files in `directory`, named after `file_name_prefix` and `rotation` (see [`Rotation`]).
    /// The directory is created if it does not exist.
    File {
        /// The directory the files are written in.
        directory: PathBuf,
        /// The start of each file name, e.g. `payment-agent`.
        file_name_prefix: String,
        /// When to start a new file.
        rotation: Rotation,
    },
}

/// Which events are logged.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FilterSpec {
    Level(LevelFilter),
    Directives(String),
}

/// Settings for [`init`], built with chained methods.
///
/// The defaults are: level `INFO`, output to standard output, and up to 10 seconds to write
/// out pending lines when the [`LogGuard`] is dropped.
///
/// ```
/// use agentcomm_core::logging::{LogConfig, Rotation};
/// use tracing::Level;
///
/// let config = LogConfig::new()
///     .level(Level::DEBUG)
///     .to_file("/var/log/agentcomm", "payment-agent", Rotation::Hourly);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    filter: FilterSpec,
    output: LogOutput,
    flush_timeout: Duration,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            filter: FilterSpec::Level(LevelFilter::INFO),
            output: LogOutput::Stdout,
            flush_timeout: DEFAULT_FLUSH_TIMEOUT,
        }
    }
}

impl LogConfig {
    /// The default settings: `INFO`, standard output.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The default settings with the level taken from the `LOG_LEVEL` environment variable.
    ///
    /// An unset or empty `LOG_LEVEL` means `INFO`; see [`parse_level`] for the accepted
    /// values.
    ///
    /// # Errors
    ///
    /// [`LoggingError::InvalidLevel`] if `LOG_LEVEL` is set to anything else.
    pub fn from_env() -> Result<Self, LoggingError> {
        let level = level_from_env_value(std::env::var_os(LOG_LEVEL_ENV))?;
        Ok(Self::new().level(level))
    }

    /// Logs events at `level` and more severe ones, replacing any earlier level or filter.
    #[must_use]
    pub fn level(mut self, level: impl Into<LevelFilter>) -> Self {
        self.filter = FilterSpec::Level(level.into());
        self
    }

    /// Logs the events selected by `directives`, in [`EnvFilter`] syntax (for instance
    /// `agentcomm_core=debug,info`), replacing any earlier level or filter.
    ///
    /// A plain level name accepted by [`parse_level`] (such as `WARNING`) is taken as that
    /// level, alone or in a directive (`agentcomm_core=debug,WARNING`). The directives are checked by [`init`], which returns
    /// [`LoggingError::InvalidFilter`] if they are not valid.
    #[must_use]
    pub fn filter(mut self, directives: impl Into<String>) -> Self {
        self.filter = FilterSpec::Directives(directives.into());
        self
    }

    /// Writes to standard output.
    #[must_use]
    pub fn to_stdout(self) -> Self {
        self.output(LogOutput::Stdout)
    }

    /// Writes to rolling files in `directory`; see [`Rotation`] for the file names.
    #[must_use]
    pub fn to_file(
        self,
        directory: impl Into<PathBuf>,
        file_name_prefix: impl Into<String>,
        rotation: Rotation,
    ) -> Self {
        self.output(LogOutput::File {
            directory: directory.into(),
            file_name_prefix: file_name_prefix.into(),
            rotation,
        })
    }

    /// Writes to `output`.
    #[must_use]
    pub fn output(mut self, output: LogOutput) -> Self {
        self.output = output;
        self
    }

    /// How long dropping the [`LogGuard`] waits for pending lines to be written (10 seconds
    /// by default). If they are not all written by then, a warning is printed to standard
    /// error.
    #[must_use]
    pub fn flush_timeout(mut self, timeout: Duration) -> Self {
        self.flush_timeout = timeout;
        self
    }

    /// Builds the filter, checking the directives.
    fn build_filter(&self) -> Result<EnvFilter, LoggingError> {
        let level = match &self.filter {
            FilterSpec::Level(level) => *level,
            FilterSpec::Directives(directives) => match parse_level(directives) {
                Ok(level) => level,
                Err(_) => return parse_filter(directives),
            },
        };
        Ok(EnvFilter::default().add_directive(level.into()))
    }
}

/// Parses `EnvFilter` directives, rejecting an empty string (which would log nothing but
/// errors, never what was meant).
fn parse_filter(directives: &str) -> Result<EnvFilter, LoggingError> {
    let invalid = |reason: String| LoggingError::InvalidFilter {
        filter: directives.to_owned(),
        reason,
    };
    if directives.trim().is_empty() {
        return Err(invalid("it is empty".to_owned()));
    }
    EnvFilter::try_new(with_tracing_level_names(directives)).map_err(|e| invalid(e.to_string()))
}

/// `directives` with the level names [`parse_level`] accepts and `EnvFilter` does not (Python's
/// `WARNING` and `CRITICAL`) written as `EnvFilter` reads them. It took a bare `WARNING` in a list
/// (`agentcomm_core=debug,WARNING`) for the name of a target, which left every other target's
/// events, errors included, unlogged; and it refused `agentcomm_core=WARNING`.
fn with_tracing_level_names(directives: &str) -> String {
    let directives: Vec<String> = directives
        .split(',')
        .map(|directive| {
            let (target, level) = match directive.rsplit_once('=') {
                Some((target, level)) => (Some(target), level),
                None => (None, directive),
            };
            let level = match level.trim().to_ascii_uppercase().as_str() {
                "WARNING" => "warn",
                "CRITICAL" => "error",
                _ => return directive.to_owned(),
            };
            match target {
                Some(target) => format!("{target}={level}"),
                None => level.to_owned(),
            }
        })
        .collect();
    directives.join(",")
}

/// The level for a `LOG_LEVEL` value: `INFO` when unset or empty.
fn level_from_env_value(value: Option<OsString>) -> Result<LevelFilter, LoggingError> {
    let Some(value) = value else {
        return Ok(LevelFilter::INFO);
    };
    match value.to_str() {
        Some(text) if text.trim().is_empty() => Ok(LevelFilter::INFO),
        Some(text) => parse_level(text),
        None => Err(LoggingError::InvalidLevel {
            variable: LOG_LEVEL_ENV.to_owned(),
            value: value.to_string_lossy().into_owned(),
        }),
    }
}

/// Keeps the background log writer running; dropping it writes out and flushes every
/// pending line.
///
/// Returned by [`init`]. Keep it alive for as long as the program logs, typically as a
/// variable in `main` (`let _guard = ...`; a bare `let _ = ...` would drop it at once).
/// Dropping it waits until all lines logged so far are written and flushed, or until the
/// configured [`LogConfig::flush_timeout`] runs out, in which case a warning is printed to
/// standard error. Log nothing once it is being dropped: such lines go to standard error
/// at best.
///
/// Destructors do not run on [`std::process::exit`] or on an abort, so drop the guard
/// before calling `exit`.
#[must_use = "logging stops, and pending lines may be lost, when the LogGuard is dropped: keep it alive until the program ends"]
pub struct LogGuard {
    worker: Option<WorkerGuard>,
    finished: mpsc::Receiver<()>,
    flush_timeout: Duration,
    progress: Arc<Progress>,
}

impl fmt::Debug for LogGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogGuard")
            .field("flush_timeout", &self.flush_timeout)
            .finish_non_exhaustive()
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let deadline = Instant::now().checked_add(self.flush_timeout);
        // tracing-appender's guard queues a shutdown message behind the pending lines, but gives up
        // after 0.1 s when every place is taken (printing so to standard output, among the lines),
        // and then the writer thread never ends. So the lines pending now are waited for first.
        let pending = self.progress.queued.load(Ordering::SeqCst);
        if !self.progress.wait_for(pending, deadline) {
            self.warn_unwritten();
            // Dropped, it would print its complaint to standard output; the writer thread goes on
            // writing until the program ends.
            std::mem::forget(self.worker.take());
            return;
        }
        // Queues the shutdown message and waits up to one second for the worker to reach it.
        drop(self.worker.take());
        // The worker drops its writer (`TrackedWriter`) only after writing and flushing
        // everything before the shutdown message.
        let left = deadline.map_or(Duration::MAX, |deadline| {
            deadline.saturating_duration_since(Instant::now())
        });
        if let Err(mpsc::RecvTimeoutError::Timeout) = self.finished.recv_timeout(left) {
            self.warn_unwritten();
        }
    }
}

impl LogGuard {
    fn warn_unwritten(&self) {
        eprintln!(
            "agentcomm logging: pending log lines were not written within {:?}; some may be lost",
            self.flush_timeout
        );
    }
}

/// How many lines were handed to the writer thread, and how many it has dealt with (written, or
/// sent to the fallback): what [`LogGuard`] waits for when it is dropped.
#[derive(Default)]
struct Progress {
    queued: AtomicU64,
    done: Mutex<u64>,
    changed: Condvar,
    /// Whether the guard waits on `changed` (set with `done` locked): the writer thread wakes it only
    /// then, not with a system call per line.
    waiting: AtomicBool,
}

impl Progress {
    fn line_done(&self) {
        let mut done = self.done.lock().unwrap_or_else(PoisonError::into_inner);
        *done += 1;
        if self.waiting.load(Ordering::SeqCst) {
            self.changed.notify_all();
        }
    }

    /// Waits until `lines` lines are dealt with, or `deadline` (none: no limit); whether they are.
    fn wait_for(&self, lines: u64, deadline: Option<Instant>) -> bool {
        let mut done = self.done.lock().unwrap_or_else(PoisonError::into_inner);
        self.waiting.store(true, Ordering::SeqCst);
        while *done < lines {
            done = match deadline {
                None => self
                    .changed
                    .wait(done)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    self.changed
                        .wait_timeout(done, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
        true
    }
}

/// The writer of the subscriber [`init`] installs: the channel to the writer thread, counting the
/// lines it takes.
struct QueueWriter {
    inner: NonBlocking,
    progress: Arc<Progress>,
}

/// One line's writer, made by [`QueueWriter`].
struct QueueLine<'a> {
    inner: NonBlocking,
    progress: &'a Progress,
}

impl<'a> MakeWriter<'a> for QueueWriter {
    type Writer = QueueLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        QueueLine {
            inner: self.inner.make_writer(),
            progress: &self.progress,
        }
    }
}

impl Write for QueueLine<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        // One message to the writer thread, which deals with it in one `write_all`.
        self.inner.write_all(buf)?;
        self.progress.queued.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The writer owned by the background thread: reports when the thread is done with it (by
/// dropping `_finished`), and sends lines it cannot write to `fallback` (standard error)
/// instead of losing them.
struct TrackedWriter<W> {
    inner: W,
    fallback: Box<dyn Write + Send>,
    failed: bool,
    /// The output ends with part of a line (a write failed part-way).
    fragment: bool,
    progress: Arc<Progress>,
    _finished: mpsc::Sender<()>,
}

impl<W: Write> Write for TrackedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let result = self.write_or_fall_back(buf);
        self.progress.line_done();
        result
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write> TrackedWriter<W> {
    /// Writes `buf` (one line) to the output, or to the fallback if the output fails.
    fn write_or_fall_back(&mut self, buf: &[u8]) -> io::Result<()> {
        if let Err(error) = self.write_line(buf) {
            if !self.failed {
                self.failed = true;
                writeln!(
                    self.fallback,
                    "agentcomm logging: cannot write to the log output ({error}); writing the \
                     lines that fail here instead"
                )?;
            }
            self.fallback.write_all(buf)?;
        }
        Ok(())
    }

    /// Writes `line` to the output. When a write fails part-way (a full disk takes the first bytes,
    /// then refuses), the fragment is ended with a newline before the next line, so that only the
    /// fragment is broken, not the line after it too.
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        if self.fragment {
            self.inner.write_all(b"\n")?;
            self.fragment = false;
        }
        let mut rest = line;
        while !rest.is_empty() {
            match self.inner.write(rest) {
                Ok(0) => {
                    self.fragment = rest.len() < line.len();
                    return Err(io::ErrorKind::WriteZero.into());
                }
                Ok(written) => rest = &rest[written..],
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    self.fragment = rest.len() < line.len();
                    return Err(error);
                }
            }
        }
        Ok(())
    }
}

/// Starts the background writer thread for `writer`, lossless (callers block when
/// 128,000 lines are pending). Lines `writer` fails to take go to `fallback`.
fn spawn_writer<W: Write + Send + 'static>(
    writer: W,
    fallback: Box<dyn Write + Send>,
    flush_timeout: Duration,
) -> (QueueWriter, LogGuard) {
    let (finished_tx, finished_rx) = mpsc::channel();
    let progress = Arc::new(Progress::default());
    let tracked = TrackedWriter {
        inner: writer,
        fallback,
        failed: false,
        fragment: false,
        progress: Arc::clone(&progress),
        _finished: finished_tx,
    };
    let (non_blocking, worker) = NonBlockingBuilder::default()
        .lossy(false)
        .thread_name(WORKER_THREAD_NAME)
        .finish(tracked);
    let guard = LogGuard {
        worker: Some(worker),
        finished: finished_rx,
        flush_timeout,
        progress: Arc::clone(&progress),
    };
    let writer = QueueWriter {
        inner: non_blocking,
        progress,
    };
    (writer, guard)
}

/// The subscriber [`init`] installs.
type JsonSubscriber = tracing_subscriber::layer::Layered<
    JsonLayer<QueueWriter>,
    tracing_subscriber::layer::Layered<EnvFilter, Registry>,
>;

/// Builds the subscriber and its writer without installing it.
fn build(config: &LogConfig) -> Result<(JsonSubscriber, LogGuard), LoggingError> {
    let filter = config.build_filter()?;
    let (writer, guard) = match &config.output {
        LogOutput::Stdout => {
            spawn_writer(io::stdout(), Box::new(io::stderr()), config.flush_timeout)
        }
        LogOutput::File {
            directory,
            file_name_prefix,
            rotation,
        } => {
            let appender = RollingFileAppender::builder()
                .rotation(rotation.to_appender())
                .filename_prefix(file_name_prefix.as_str())
                .filename_suffix(FILE_SUFFIX)
                .build(directory)
                .map_err(|error| LoggingError::Io {
                    directory: directory.clone(),
                    source: init_error_to_io(&error),
                })?;
            spawn_writer(appender, Box::new(io::stderr()), config.flush_timeout)
        }
    };
    let subscriber = Registry::default().with(filter).with(json_layer(writer));
    Ok((subscriber, guard))
}

/// Turns `tracing-appender`'s error into an `io::Error` with the full message and the kind
/// of the underlying error.
fn init_error_to_io(error: &tracing_appender::rolling::InitError) -> io::Error {
    let cause = error
        .source()
        .and_then(|source| source.downcast_ref::<io::Error>());
    let kind = cause.map_or(io::ErrorKind::Other, io::Error::kind);
    match cause {
        Some(cause) => io::Error::new(kind, format!("{error}: {cause}")),
        None => io::Error::new(kind, error.to_string()),
    }
}

/// Installs JSON Lines logging as the global `tracing` subscriber.
///
/// Lines are written by a background thread, so logging does not wait for the output,
/// except when 128,000 lines are already pending: then the logging call waits rather than
/// dropping the line. Keep the returned [`LogGuard`] alive until the program ends; dropping
/// it writes out and flushes all pending lines.
///
/// Records of the `log` crate (fred logs through it) are written too: `init` installs the
/// `log`-to-`tracing` bridge, unless the program installed a `log` logger of its own first. The
/// runtime's per-message span (`message_id`, `class`, `session`, `agent`) is at ERROR level so that
/// every line about a message carries them whatever the level: other layers you add see it as such.
///
/// # Errors
///
/// * [`LoggingError::InvalidFilter`] if the [`LogConfig::filter`] directives are invalid;
/// * [`LoggingError::Io`] if the log file cannot be opened;
/// * [`LoggingError::AlreadyInitialized`] if a global subscriber is already installed
///   (by an earlier call or by another library).
///
/// # Example
///
/// ```no_run
/// use agentcomm_core::logging::{self, LogConfig, Rotation};
///
/// fn main() -> Result<(), Box<dyn std::error::Error>> {
///     // Level from LOG_LEVEL (INFO when unset), one file per day in /var/log/agentcomm.
///     let config = LogConfig::from_env()?.to_file("/var/log/agentcomm", "payment-agent", Rotation::Daily);
///     let _guard = logging::init(config)?;
///
///     let span = tracing::info_span!("session", session = "s1", agent = "PaymentAgent");
///     let _entered = span.enter();
///     tracing::info!(message_id = "0193a0c2", class = "PaymentRequest", "message sent");
///     // {"timestamp":"…","level":"INFO","message":"message sent",…,"agent":"PaymentAgent",
///     //  "class":"PaymentRequest","message_id":"0193a0c2","session":"s1"}
///     Ok(())
/// } // `_guard` is dropped here: every line is written before the program exits.
/// ```
pub fn init(config: LogConfig) -> Result<LogGuard, LoggingError> {
    let (subscriber, guard) = build(&config)?;
    // On failure the guard is dropped here, which stops the unused writer thread.
    tracing::subscriber::set_global_default(subscriber)
        .map_err(|_| LoggingError::AlreadyInitialized)?;
    // Libraries that log through the `log` crate (fred's connection and reconnection messages) reach
    // the same lines. Left alone when the program already installed a `log` logger of its own.
    let _ = tracing_log::LogTracer::init();
    for warning in std::mem::take(&mut *early_warnings()) {
        warning();
    }
    Ok(guard)
}

/// The most warnings kept for [`init`] ([`warn_now_or_at_init`]): a program that never starts logging
/// does not keep collecting them.
const MAX_EARLY_WARNINGS: usize = 64;

/// A warning raised before any subscriber listened.
type EarlyWarning = Box<dyn FnOnce() + Send>;

fn early_warnings() -> std::sync::MutexGuard<'static, Vec<EarlyWarning>> {
    static EARLY: Mutex<Vec<EarlyWarning>> = Mutex::new(Vec::new());
    EARLY.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `warning` (a `tracing::warn!`) now if a subscriber listens (the global one or this thread's),
/// otherwise keeps it for [`init`], which runs it once its subscriber is installed: the documented
/// flow reads the configuration (`Config::load`) before it starts logging, and a warning about the
/// configuration would otherwise reach nobody.
pub(crate) fn warn_now_or_at_init(warning: impl FnOnce() + Send + 'static) {
    let listening = tracing::dispatcher::get_default(|dispatch| {
        !dispatch.is::<tracing::subscriber::NoSubscriber>()
    });
    if listening {
        warning();
        return;
    }
    let mut early = early_warnings();
    if early.len() < MAX_EARLY_WARNINGS {
        early.push(Box::new(warning));
    }
}

/// Installs JSON Lines logging to standard output at the level given by `LOG_LEVEL`
/// (`INFO` when unset); the same as `init(LogConfig::from_env()?)`.
///
/// # Errors
///
/// [`LoggingError::InvalidLevel`] if `LOG_LEVEL` is not a level, otherwise as [`init`].
pub fn try_init_from_env() -> Result<LogGuard, LoggingError> {
    init(LogConfig::from_env()?)
}

/// The JSON Lines formatting layer on its own, writing each event as one line to
/// `make_writer`.
///
/// It filters nothing: add a filter (such as an [`EnvFilter`] or a [`LevelFilter`]) to the
/// subscriber. Each line is written with a single `write_all` call; if that fails, the line
/// is written to standard error instead.
///
/// ```
/// use agentcomm_core::logging::json_layer;
/// use tracing_subscriber::filter::LevelFilter;
/// use tracing_subscriber::layer::SubscriberExt;
///
/// let subscriber = tracing_subscriber::registry()
///     .with(LevelFilter::DEBUG)
///     .with(json_layer(std::io::stderr));
/// tracing::subscriber::with_default(subscriber, || {
///     tracing::debug!(attempt = 2, "retrying");
/// });
/// ```
#[must_use]
pub fn json_layer<W>(make_writer: W) -> JsonLayer<W>
where
    W: for<'w> MakeWriter<'w> + 'static,
{
    JsonLayer { make_writer }
}

/// A [`Layer`] writing events as JSON Lines; made by [`json_layer`].
pub struct JsonLayer<W> {
    make_writer: W,
}

impl<W> fmt::Debug for JsonLayer<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonLayer").finish_non_exhaustive()
    }
}

/// The fields of a span, stored in the span's extensions.
struct SpanFields(Map<String, Value>);

impl<S, W> Layer<S> for JsonLayer<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + 'static,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        // Another `JsonLayer` in the same subscriber may have stored them already.
        if extensions.get_mut::<SpanFields>().is_none() {
            let mut fields = Map::new();
            attrs.record(&mut JsonVisitor(&mut fields));
            extensions.insert(SpanFields(fields));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        if let Some(SpanFields(fields)) = span.extensions_mut().get_mut::<SpanFields>() {
            values.record(&mut JsonVisitor(fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let timestamp = SystemTime::now();
        let metadata = event.metadata();

        let mut event_fields = Map::new();
        event.record(&mut JsonVisitor(&mut event_fields));

        let message = match event_fields.remove("message") {
            Some(Value::String(message)) => message,
            Some(other) => other.to_string(),
            None => String::new(),
        };
        // Events from the `log` crate (via `tracing-log`) carry their origin as fields.
        let mut target = Value::from(metadata.target());
        let mut file = metadata.file().map_or(Value::Null, Value::from);
        let mut line = metadata.line().map_or(Value::Null, Value::from);
        if metadata.fields().field("log.target").is_some() {
            if let Some(value) = event_fields.remove("log.target") {
                target = value;
            }
            if let Some(value) = event_fields.remove("log.file") {
                file = value;
            }
            if let Some(value) = event_fields.remove("log.line") {
                line = value;
            }
        }

        let mut fields = Map::new();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(SpanFields(span_fields)) = span.extensions().get::<SpanFields>() {
                    fields.extend(span_fields.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
        }
        fields.extend(event_fields);

        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(b"{\"timestamp\":\"");
        write_timestamp(&mut buf, timestamp);
        buf.extend_from_slice(b"\",\"level\":\"");
        buf.extend_from_slice(level_name(*metadata.level()).as_bytes());
        buf.extend_from_slice(b"\",\"message\":");
        push_json_str(&mut buf, &message);
        buf.extend_from_slice(b",\"target\":");
        push_json_value(&mut buf, &target);
        buf.extend_from_slice(b",\"file\":");
        push_json_value(&mut buf, &file);
        buf.extend_from_slice(b",\"line\":");
        push_json_value(&mut buf, &line);
        for (key, value) in &fields {
            buf.push(b',');
            if RESERVED_KEYS.contains(&key.as_str()) {
                push_json_str(&mut buf, &format!("fields.{key}"));
            } else {
                push_json_str(&mut buf, key);
            }
            buf.push(b':');
            push_json_value(&mut buf, value);
        }
        buf.extend_from_slice(b"}\n");

        let mut writer = self.make_writer.make_writer_for(metadata);
        if writer.write_all(&buf).is_err() {
            // Nowhere else to report it; standard error is the last resort.
            let _ = io::stderr().write_all(&buf);
        }
    }
}

/// Appends `text` as a JSON string.
fn push_json_str(buf: &mut Vec<u8>, text: &str) {
    // Serializing a string into a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut *buf, text);
}

/// Appends `value` as JSON.
fn push_json_value(buf: &mut Vec<u8>, value: &Value) {
    // Serializing a `Value` (whose map keys are strings) into a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut *buf, value);
}

/// Appends `time` as RFC 3339 in UTC with milliseconds, e.g. `2026-11-25T15:30:45.123Z`.
/// Times before 1970 are written as 1970-01-01T00:00:00.000Z.
fn write_timestamp(buf: &mut Vec<u8>, time: SystemTime) {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let millis = since_epoch.subsec_millis();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let secs_of_day = secs % 86_400;
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    // Writing into a `Vec` cannot fail.
    let _ = write!(
        buf,
        "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{millis:03}Z"
    );
}

/// The proleptic Gregorian date `days` days after 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097; // day of era, [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365], from March 1st
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Records fields into a JSON map, keeping numbers, booleans and strings as such.
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl JsonVisitor<'_> {
    fn insert(&mut self, field: &Field, value: Value) {
        self.0.insert(field.name().to_owned(), value);
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        // NaN and infinities have no JSON number.
        let value =
            Number::from_f64(value).map_or_else(|| Value::String(value.to_string()), Value::Number);
        self.insert(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.insert(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.insert(field, Value::from(value));
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        let value =
            i64::try_from(value).map_or_else(|_| Value::String(value.to_string()), Value::from);
        self.insert(field, value);
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        let value =
            u64::try_from(value).map_or_else(|_| Value::String(value.to_string()), Value::from);
        self.insert(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.insert(field, Value::Bool(value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.insert(field, Value::String(value.to_owned()));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn StdError + 'static)) {
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        self.insert(field, Value::String(text));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.insert(field, Value::String(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing::{debug, error, info, info_span, warn};

    /// A `MakeWriter` collecting everything in memory.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Capture {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).expect("output is UTF-8")
        }
    }

    impl<'a> MakeWriter<'a> for Capture {
        type Writer = CaptureWriter;
        fn make_writer(&'a self) -> CaptureWriter {
            CaptureWriter(Arc::clone(&self.0))
        }
    }

    struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

    impl Write for CaptureWriter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Parses each line as a JSON object.
    fn parse_lines(text: &str) -> Vec<Map<String, Value>> {
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "output ends with a newline: {text:?}"
        );
        text.lines()
            .map(|line| match serde_json::from_str(line) {
                Ok(Value::Object(object)) => object,
                other => panic!("line is not a JSON object: {line:?} ({other:?})"),
            })
            .collect()
    }

    /// Runs `f` with a `json_layer` subscriber filtered by `filter`; returns the lines.
    fn capture_with(filter: EnvFilter, f: impl FnOnce()) -> Vec<Map<String, Value>> {
        let capture = Capture::default();
        let subscriber = Registry::default()
            .with(filter)
            .with(json_layer(capture.clone()));
        tracing::subscriber::with_default(subscriber, f);
        parse_lines(&capture.text())
    }

    fn capture(f: impl FnOnce()) -> Vec<Map<String, Value>> {
        capture_with(EnvFilter::new("trace"), f)
    }

    fn check_timestamp(value: &Value) {
        let text = value.as_str().expect("timestamp is a string");
        let bytes = text.as_bytes();
        assert_eq!(bytes.len(), 24, "{text}");
        for (i, b) in bytes.iter().enumerate() {
            match i {
                4 | 7 => assert_eq!(*b, b'-', "{text}"),
                10 => assert_eq!(*b, b'T', "{text}"),
                13 | 16 => assert_eq!(*b, b':', "{text}"),
                19 => assert_eq!(*b, b'.', "{text}"),
                23 => assert_eq!(*b, b'Z', "{text}"),
                _ => assert!(b.is_ascii_digit(), "{text}"),
            }
        }
        assert!(text >= "2024", "{text}");
    }

    #[test]
    fn event_has_the_documented_keys() {
        let mut expected_line = 0;
        let lines = capture(|| {
            expected_line = line!() + 1;
            info!(
                message_id = "0193a0c2",
                class = "PaymentRequest",
                "message sent"
            );
        });
        assert_eq!(lines.len(), 1);
        let obj = &lines[0];
        check_timestamp(&obj["timestamp"]);
        assert_eq!(obj["level"], "INFO");
        assert_eq!(obj["message"], "message sent");
        assert_eq!(obj["target"], module_path!());
        let file = obj["file"].as_str().expect("file is a string");
        assert!(file.ends_with("logging.rs"), "{file}");
        assert_eq!(obj["line"], Value::from(expected_line));
        assert_eq!(obj["message_id"], "0193a0c2");
        assert_eq!(obj["class"], "PaymentRequest");
        assert_eq!(obj.len(), 8, "no other keys: {obj:?}");
    }

    #[test]
    fn field_values_keep_their_json_types() {
        let lines = capture(|| {
            info!(
                count = 3,
                big = u64::MAX,
                delta = -7,
                ratio = 0.5,
                ok = true,
                text = "s",
                items = ?vec![1, 2],
                shown = %"disp",
            );
        });
        let obj = &lines[0];
        assert_eq!(obj["count"], Value::from(3));
        assert_eq!(obj["big"], Value::from(u64::MAX));
        assert_eq!(obj["delta"], Value::from(-7));
        assert_eq!(obj["ratio"], Value::from(0.5));
        assert_eq!(obj["ok"], Value::Bool(true));
        assert_eq!(obj["text"], "s");
        assert_eq!(obj["items"], "[1, 2]");
        assert_eq!(obj["shown"], "disp");
    }

    #[test]
    fn key_order_starts_with_the_fixed_keys() {
        let capture_buf = Capture::default();
        let subscriber = Registry::default().with(json_layer(capture_buf.clone()));
        tracing::subscriber::with_default(subscriber, || info!(a = 1, "hi"));
        let text = capture_buf.text();
        assert!(text.starts_with("{\"timestamp\":\""), "{text}");
        let order: Vec<usize> = [
            "\"level\":",
            "\"message\":",
            "\"target\":",
            "\"file\":",
            "\"line\":",
            "\"a\":",
        ]
        .iter()
        .map(|key| text.find(key).expect(key))
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
    }

    #[test]
    fn levels_are_upper_case_names() {
        let lines = capture(|| {
            tracing::trace!("t");
            debug!("d");
            info!("i");
            warn!("w");
            error!("e");
        });
        let levels: Vec<&str> = lines.iter().map(|o| o["level"].as_str().unwrap()).collect();
        assert_eq!(levels, ["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"]);
    }

    #[test]
    fn span_fields_are_flattened_inner_span_and_event_win() {
        let lines = capture(|| {
            let outer = info_span!("session", session = "s1", agent = "Outer", depth = 1);
            let _outer = outer.enter();
            let inner = info_span!(
                "handler",
                agent = "PaymentAgent",
                attempt = 1,
                late = tracing::field::Empty
            );
            let _inner = inner.enter();
            inner.record("late", "recorded");
            info!(attempt = 2, "handled");
        });
        let obj = &lines[0];
        assert_eq!(obj["session"], "s1");
        assert_eq!(obj["agent"], "PaymentAgent", "inner span wins");
        assert_eq!(obj["attempt"], Value::from(2), "event wins");
        assert_eq!(obj["depth"], Value::from(1));
        assert_eq!(
            obj["late"], "recorded",
            "fields recorded after creation are included"
        );
        assert_eq!(obj["message"], "handled");
    }

    #[test]
    fn events_outside_spans_have_no_span_fields() {
        let lines = capture(|| {
            {
                let span = info_span!("s", session = "s1");
                let _entered = span.enter();
                info!("inside");
            }
            info!("outside");
        });
        assert_eq!(lines[0]["session"], "s1");
        assert!(!lines[1].contains_key("session"));
    }

    #[test]
    fn explicit_parent_span_is_used() {
        let lines = capture(|| {
            let span = info_span!("s", session = "s9");
            info!(parent: &span, "child");
        });
        assert_eq!(lines[0]["session"], "s9");
    }

    #[test]
    fn two_json_layers_in_one_subscriber_do_not_conflict() {
        let (a, b) = (Capture::default(), Capture::default());
        let subscriber = Registry::default()
            .with(json_layer(a.clone()))
            .with(json_layer(b.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let span = info_span!("s", session = "s1");
            let _entered = span.enter();
            info!("twice");
        });
        for capture in [a, b] {
            let lines = parse_lines(&capture.text());
            assert_eq!(lines.len(), 1);
            assert_eq!(lines[0]["session"], "s1");
        }
    }

    #[test]
    fn special_characters_give_valid_json() {
        let nasty = "quote \" backslash \\ newline \n cr \r tab \t nul \u{0} bell \u{7} unicode é 日本 🦀 \u{2028}";
        let lines = capture(|| {
            info!(field = nasty, "{nasty}");
            info!(message = nasty);
        });
        assert_eq!(lines.len(), 2, "one line per event");
        for obj in &lines {
            assert_eq!(obj["message"], nasty);
        }
        assert_eq!(lines[0]["field"], nasty);
    }

    #[test]
    fn n_events_give_n_lines() {
        let lines = capture(|| {
            for i in 0..500 {
                info!(i, "event\nwith newline");
            }
        });
        assert_eq!(lines.len(), 500);
        for (i, obj) in lines.iter().enumerate() {
            assert_eq!(obj["i"], Value::from(i));
        }
    }

    #[test]
    fn event_without_message_has_empty_message() {
        let lines = capture(|| info!(k = 1));
        assert_eq!(lines[0]["message"], "");
        assert_eq!(lines[0]["k"], Value::from(1));
    }

    #[test]
    fn non_string_message_becomes_a_string() {
        let lines = capture(|| info!(message = 42));
        assert_eq!(lines[0]["message"], "42");
    }

    #[test]
    fn fields_named_like_fixed_keys_are_kept_aside() {
        let lines = capture(|| {
            let span = info_span!("s", timestamp = "span-ts");
            let _entered = span.enter();
            info!(level = "custom", line = 5, file = "x.rs", target = "t", "m");
        });
        let obj = &lines[0];
        assert_eq!(obj["level"], "INFO");
        assert!(obj["line"].as_u64().unwrap() > 5);
        assert_eq!(obj["fields.level"], "custom");
        assert_eq!(obj["fields.line"], Value::from(5));
        assert_eq!(obj["fields.file"], "x.rs");
        assert_eq!(obj["fields.target"], "t");
        assert_eq!(obj["fields.timestamp"], "span-ts");
        check_timestamp(&obj["timestamp"]);
    }

    #[test]
    fn errors_include_their_sources() {
        #[derive(Debug)]
        struct Outer(io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("publish failed")
            }
        }
        impl StdError for Outer {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let err = Outer(io::Error::other("connection reset"));
        let lines = capture(|| error!(error = &err as &dyn StdError, "oops"));
        assert_eq!(lines[0]["error"], "publish failed: connection reset");
    }

    #[test]
    fn special_float_values_are_strings() {
        let lines = capture(|| {
            info!(
                nan = f64::NAN,
                inf = f64::INFINITY,
                big = i128::MAX,
                small = 5i128
            )
        });
        let obj = &lines[0];
        assert_eq!(obj["nan"], "NaN");
        assert_eq!(obj["inf"], "inf");
        assert_eq!(obj["big"], i128::MAX.to_string());
        assert_eq!(obj["small"], Value::from(5));
    }

    #[test]
    fn log_crate_origin_fields_are_used() {
        let lines = capture(|| {
            info!(
                log.target = "fred::router",
                log.file = "src/router.rs",
                log.line = 12u64,
                log.module_path = "fred::router",
                "from log"
            );
        });
        let obj = &lines[0];
        assert_eq!(obj["target"], "fred::router");
        assert_eq!(obj["file"], "src/router.rs");
        assert_eq!(obj["line"], Value::from(12));
        assert_eq!(obj["log.module_path"], "fred::router");
        assert!(!obj.contains_key("log.target"));
    }

    #[test]
    fn levels_below_the_configured_one_are_filtered() {
        let filter = LogConfig::new()
            .level(LevelFilter::WARN)
            .build_filter()
            .unwrap();
        let lines = capture_with(filter, || {
            tracing::trace!("t");
            debug!("d");
            info!("i");
            warn!("w");
            error!("e");
        });
        let messages: Vec<&str> = lines
            .iter()
            .map(|o| o["message"].as_str().unwrap())
            .collect();
        assert_eq!(messages, ["w", "e"]);
    }

    #[test]
    fn filter_accepts_level_names_and_directives() {
        let filter = LogConfig::new().filter("WARNING").build_filter().unwrap();
        let lines = capture_with(filter, || {
            info!("i");
            warn!("w");
        });
        assert_eq!(lines.len(), 1);

        let filter = LogConfig::new()
            .filter("chatty=debug,warn")
            .build_filter()
            .unwrap();
        let lines = capture_with(filter, || {
            debug!(target: "chatty", "kept");
            info!(target: "quiet", "dropped");
            debug!("dropped");
            warn!(target: "quiet", "kept too");
        });
        let messages: Vec<&str> = lines
            .iter()
            .map(|o| o["message"].as_str().unwrap())
            .collect();
        assert_eq!(messages, ["kept", "kept too"]);
    }

    /// `WARNING` (the level name of LOG_LEVEL) in a list of directives was taken for a target: only
    /// `chatty`'s events were logged, other targets' warnings and errors never. `quiet=CRITICAL` was
    /// refused.
    #[test]
    fn filter_directives_accept_the_level_names_of_log_level() {
        for directives in [
            "chatty=debug,WARNING",
            "chatty=debug, warning",
            "chatty=debug,quiet=Warning,info",
        ] {
            let filter = LogConfig::new().filter(directives).build_filter().unwrap();
            let lines = capture_with(filter, || {
                debug!(target: "chatty", "kept");
                info!(target: "quiet", "dropped");
                warn!(target: "quiet", "kept too");
                error!(target: "quiet", "kept as well");
            });
            let messages: Vec<&str> = lines
                .iter()
                .map(|o| o["message"].as_str().unwrap())
                .collect();
            assert_eq!(
                messages,
                ["kept", "kept too", "kept as well"],
                "{directives}"
            );
        }
        let filter = LogConfig::new()
            .filter("quiet=CRITICAL,debug")
            .build_filter()
            .unwrap();
        let lines = capture_with(filter, || {
            warn!(target: "quiet", "dropped");
            error!(target: "quiet", "kept");
            debug!(target: "chatty", "kept too");
        });
        let messages: Vec<&str> = lines
            .iter()
            .map(|o| o["message"].as_str().unwrap())
            .collect();
        assert_eq!(messages, ["kept", "kept too"]);
    }

    #[test]
    fn invalid_filters_are_errors() {
        for bad in ["chatty=loud", "", "  ", "[{"] {
            let err = LogConfig::new().filter(bad).build_filter().unwrap_err();
            assert!(
                matches!(err, LoggingError::InvalidFilter { .. }),
                "{bad:?}: {err:?}"
            );
            let text = err.to_string();
            assert!(text.contains(&format!("'{bad}'")), "{text}");
            assert!(text.contains("agentcomm_core=debug,info"), "{text}");
        }
    }

    #[test]
    fn parse_level_accepts_the_documented_names() {
        let cases = [
            ("TRACE", LevelFilter::TRACE),
            ("trace", LevelFilter::TRACE),
            ("DEBUG", LevelFilter::DEBUG),
            ("debug", LevelFilter::DEBUG),
            ("INFO", LevelFilter::INFO),
            ("info", LevelFilter::INFO),
            ("Info", LevelFilter::INFO),
            ("WARNING", LevelFilter::WARN),
            ("warning", LevelFilter::WARN),
            ("WARN", LevelFilter::WARN),
            ("warn", LevelFilter::WARN),
            ("ERROR", LevelFilter::ERROR),
            ("error", LevelFilter::ERROR),
            ("CRITICAL", LevelFilter::ERROR),
            ("critical", LevelFilter::ERROR),
            (" info\n", LevelFilter::INFO),
        ];
        for (text, level) in cases {
            assert_eq!(parse_level(text).unwrap(), level, "{text:?}");
        }
    }

    #[test]
    fn invalid_level_names_the_variable_and_accepted_values() {
        let err = parse_level("loud").unwrap_err();
        assert_eq!(
            err.to_string(),
            "LOG_LEVEL='loud' is not a log level. Accepted values: TRACE, DEBUG, INFO, WARNING (or WARN), ERROR (or CRITICAL)"
        );
        assert!(
            matches!(err, LoggingError::InvalidLevel { ref variable, ref value } if variable == "LOG_LEVEL" && value == "loud")
        );
        assert!(parse_level("FATAL").is_err());
        assert!(parse_level("").is_err());
    }

    #[test]
    fn log_level_env_value() {
        assert_eq!(level_from_env_value(None).unwrap(), LevelFilter::INFO);
        assert_eq!(
            level_from_env_value(Some("".into())).unwrap(),
            LevelFilter::INFO
        );
        assert_eq!(
            level_from_env_value(Some("debug".into())).unwrap(),
            LevelFilter::DEBUG
        );
        assert_eq!(
            level_from_env_value(Some("WARNING".into())).unwrap(),
            LevelFilter::WARN
        );
        let err = level_from_env_value(Some("loud".into())).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("LOG_LEVEL='loud' is not a log level."),
            "{err}"
        );
    }

    #[test]
    fn config_defaults_and_builder() {
        let config = LogConfig::new();
        assert_eq!(config, LogConfig::default());
        assert_eq!(config.filter, FilterSpec::Level(LevelFilter::INFO));
        assert_eq!(config.output, LogOutput::Stdout);
        assert_eq!(config.flush_timeout, DEFAULT_FLUSH_TIMEOUT);

        let config = LogConfig::new()
            .level(tracing::Level::DEBUG)
            .to_file("/tmp/x", "agent", Rotation::Hourly)
            .flush_timeout(Duration::from_secs(1));
        assert_eq!(config.filter, FilterSpec::Level(LevelFilter::DEBUG));
        assert_eq!(
            config.output,
            LogOutput::File {
                directory: PathBuf::from("/tmp/x"),
                file_name_prefix: "agent".to_owned(),
                rotation: Rotation::Hourly
            }
        );
        assert_eq!(config.clone().to_stdout().output, LogOutput::Stdout);
        assert_eq!(
            config.filter("a=debug").filter,
            FilterSpec::Directives("a=debug".to_owned())
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_millis() {
        let cases = [
            (0, 0, "1970-01-01T00:00:00.000Z"),
            (951_782_400, 5, "2000-02-29T00:00:00.005Z"),
            (951_868_799, 999, "2000-02-29T23:59:59.999Z"),
            (1_709_164_800, 0, "2024-02-29T00:00:00.000Z"),
            (1_735_689_599, 1, "2024-12-31T23:59:59.001Z"),
            (1_795_620_645, 123, "2026-11-25T15:30:45.123Z"),
            (4_107_542_400, 0, "2100-03-01T00:00:00.000Z"),
        ];
        for (secs, millis, expected) in cases {
            let time = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis);
            let mut buf = Vec::new();
            write_timestamp(&mut buf, time);
            assert_eq!(String::from_utf8(buf).unwrap(), expected, "{secs}");
        }
        let mut buf = Vec::new();
        write_timestamp(&mut buf, UNIX_EPOCH - Duration::from_secs(10));
        assert_eq!(buf, b"1970-01-01T00:00:00.000Z");
    }

    /// A fresh, empty directory under the system temp dir.
    fn temp_dir(name: &str) -> PathBuf {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "agentcomm-logging-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Reads every line of every file in `dir` whose name starts with `prefix`, in file-name
    /// order (which is time order).
    fn read_log_files(
        dir: &std::path::Path,
        prefix: &str,
    ) -> (Vec<String>, Vec<Map<String, Value>>) {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.starts_with(prefix))
            .collect();
        names.sort();
        let text: String = names
            .iter()
            .map(|name| std::fs::read_to_string(dir.join(name)).unwrap())
            .collect();
        (names, parse_lines(&text))
    }

    #[test]
    fn rolling_file_gets_every_line_once_the_guard_is_dropped() {
        const N: usize = 10_000;
        let dir = temp_dir("rolling");
        let config = LogConfig::new().to_file(&dir, "agent", Rotation::Daily);
        let (subscriber, guard) = build(&config).unwrap();
        tracing::subscriber::with_default(subscriber, || {
            let span = info_span!("session", session = "s1");
            let _entered = span.enter();
            for i in 0..N {
                info!(i, "line \"{i}\"\nend");
                debug!("filtered out");
            }
        });
        drop(guard);

        let (names, lines) = read_log_files(&dir, "agent.");
        assert!(!names.is_empty());
        for name in &names {
            assert!(
                name.ends_with(".jsonl") && name.len() == "agent.2026-11-25.jsonl".len(),
                "{name}"
            );
        }
        assert_eq!(lines.len(), N);
        for (i, obj) in lines.iter().enumerate() {
            assert_eq!(obj["i"], Value::from(i));
            assert_eq!(obj["message"], format!("line \"{i}\"\nend"));
            assert_eq!(obj["session"], "s1");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn never_rotated_file_is_named_after_the_prefix() {
        let dir = temp_dir("never").join("created/by/init");
        let config = LogConfig::new().to_file(&dir, "payment-agent", Rotation::Never);
        let (subscriber, guard) = build(&config).unwrap();
        tracing::subscriber::with_default(subscriber, || info!("one"));
        drop(guard);
        let text = std::fs::read_to_string(dir.join("payment-agent.jsonl")).unwrap();
        assert_eq!(parse_lines(&text).len(), 1);
        std::fs::remove_dir_all(dir.parent().unwrap().parent().unwrap().parent().unwrap()).unwrap();
    }

    #[test]
    fn unusable_log_directory_is_an_io_error() {
        let dir = temp_dir("io");
        let file = dir.join("not-a-directory");
        std::fs::write(&file, b"").unwrap();
        let err = build(&LogConfig::new().to_file(&file, "agent", Rotation::Daily)).unwrap_err();
        assert!(matches!(err, LoggingError::Io { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("not-a-directory") && text.contains("written to"),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A writer that takes about a millisecond per line.
    struct SlowWriter(Arc<Mutex<Vec<u8>>>);

    impl Write for SlowWriter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            std::thread::sleep(Duration::from_millis(1));
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guard_waits_for_a_slow_writer_beyond_one_second() {
        // tracing-appender's own guard gives up after one second; ours waits longer.
        const N: usize = 1_500;
        let out = Arc::new(Mutex::new(Vec::new()));
        let (writer, guard) = spawn_writer(
            SlowWriter(Arc::clone(&out)),
            Box::new(io::sink()),
            Duration::from_secs(20),
        );
        let subscriber = Registry::default().with(json_layer(writer));
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..N {
                info!(i);
            }
        });
        drop(guard);
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        assert_eq!(parse_lines(&text).len(), N);
    }

    /// Holds its first line until `open` is set, as an output nobody reads for a while (a full
    /// pipe) would; takes everything at once after that.
    struct StalledWriter {
        out: Arc<Mutex<Vec<u8>>>,
        open: Arc<(Mutex<bool>, std::sync::Condvar)>,
    }

    impl Write for StalledWriter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (open, opened) = &*self.open;
            drop(
                opened
                    .wait_while(open.lock().unwrap(), |open| !*open)
                    .unwrap(),
            );
            self.out.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The guard dropped while every one of the 128,000 places for pending lines was taken (an output
    /// stalled for a while under a burst of lines): tracing-appender's guard gives up queueing its
    /// shutdown message after 0.1 s, printing "Failed to send shutdown signal" to standard output,
    /// among the JSON lines. The writer thread then never ended, and our guard waited the whole
    /// flush timeout, then warned that lines may be lost, although every line had been written within
    /// a second of the output resuming.
    #[test]
    fn guard_dropped_with_every_place_taken_returns_once_the_lines_are_written() {
        // tracing-appender's default number of places.
        const N: usize = 128_000 + 1;
        let out = Arc::new(Mutex::new(Vec::new()));
        let open = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let (writer, guard) = spawn_writer(
            StalledWriter {
                out: Arc::clone(&out),
                open: Arc::clone(&open),
            },
            Box::new(io::sink()),
            Duration::from_secs(20),
        );
        let subscriber = Registry::default().with(json_layer(writer));
        // The global subscriber `init` installs keeps its writer for as long as the program runs.
        let kept = Arc::new(subscriber);
        let subscriber = Arc::clone(&kept);
        tracing::subscriber::with_default(subscriber, || {
            // The writer thread holds the first line; the others take every place.
            for i in 0..N {
                info!(i);
            }
        });
        let started = std::time::Instant::now();
        let resume = std::thread::spawn(move || {
            // The output resumes a while after the guard starts being dropped (a slow reader: part
            // of the scenario, not a wait for a condition).
            std::thread::sleep(Duration::from_millis(500));
            let (flag, opened) = &*open;
            *flag.lock().unwrap() = true;
            opened.notify_all();
        });
        drop(guard);
        let elapsed = started.elapsed();
        resume.join().unwrap();
        drop(kept);
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), N);
        assert!(
            elapsed < Duration::from_secs(10),
            "the guard waited {elapsed:?} for lines written within a second"
        );
    }

    /// A writer that always fails.
    struct BrokenWriter;

    impl Write for BrokenWriter {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("disk on fire"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_the_output_rejects_go_to_the_fallback() {
        let fallback = Capture::default();
        let (writer, guard) = spawn_writer(
            BrokenWriter,
            Box::new(fallback.make_writer()),
            Duration::from_secs(10),
        );
        let subscriber = Registry::default().with(json_layer(writer));
        tracing::subscriber::with_default(subscriber, || {
            info!("first");
            info!("second");
        });
        drop(guard);
        let text = fallback.text();
        let (notice, rest) = text.split_once('\n').unwrap();
        assert!(notice.contains("disk on fire"), "{notice}");
        let messages: Vec<Value> = parse_lines(rest)
            .iter()
            .map(|o| o["message"].clone())
            .collect();
        assert_eq!(messages, ["first", "second"]);
    }

    /// Takes the first line whole, 20 bytes of the second, then fails once (a full disk), then takes
    /// everything again.
    struct FillsUpOnce {
        out: Arc<Mutex<Vec<u8>>>,
        calls: usize,
    }

    impl Write for FillsUpOnce {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.calls += 1;
            let taken = match self.calls {
                2 => 20,
                3 => return Err(io::Error::other("No space left on device")),
                _ => buf.len(),
            };
            self.out.lock().unwrap().extend_from_slice(&buf[..taken]);
            Ok(taken)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_cut_by_a_failed_write_does_not_break_the_next_one() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let fallback = Capture::default();
        let (writer, guard) = spawn_writer(
            FillsUpOnce {
                out: Arc::clone(&out),
                calls: 0,
            },
            Box::new(fallback.make_writer()),
            Duration::from_secs(10),
        );
        let subscriber = Registry::default().with(json_layer(writer));
        tracing::subscriber::with_default(subscriber, || {
            info!("one");
            info!("two");
            info!("three");
        });
        drop(guard);
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        let message =
            |line: &str| serde_json::from_str::<Value>(line).map(|o| o["message"].clone());
        assert_eq!(message(lines[0]).unwrap(), "one");
        assert!(message(lines[1]).is_err(), "the fragment: {}", lines[1]);
        assert_eq!(message(lines[2]).unwrap(), "three");
        // The line cut short went to the fallback whole.
        assert!(fallback.text().contains("\"message\":\"two\""));
    }
}
