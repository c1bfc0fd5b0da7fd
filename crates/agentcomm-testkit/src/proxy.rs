//! A fault-injecting TCP proxy for tests.
//!
//! [`FaultProxy`] listens on an ephemeral port on `127.0.0.1` and forwards every
//! connection it accepts to a fixed *loopback* target (typically a Redis or
//! RabbitMQ broker started for the test). Between the client under test and
//! the broker it can inject faults on command:
//!
//! | method                                   | effect                                                            |
//! |------------------------------------------|-------------------------------------------------------------------|
//! | [`cut_all`](FaultProxy::cut_all)         | closes every live connection at once, cleanly (FIN: the client reads EOF) |
//! | [`reset_all`](FaultProxy::reset_all)     | resets every live connection at once (RST: the client gets "connection reset") |
//! | [`reject_for`](FaultProxy::reject_for)   | stops listening for a while: new connects are refused (`ECONNREFUSED`) |
//! | [`refuse_for`](FaultProxy::refuse_for)   | accepts new connections and closes them at once (connect succeeds, then EOF) |
//! | [`set_latency`](FaultProxy::set_latency) | delays every forwarded chunk, both directions                     |
//! | [`blackhole`](FaultProxy::blackhole)     | holds all bytes in both directions without closing                |
//! | [`silence_live`](FaultProxy::silence_live) | the live connections carry nothing more, for good, and are not closed; new ones work |
//!
//! A broker that is stopped cleanly closes with FIN; one whose process or host dies, or a firewall
//! in between, shows as a reset or as silence (a blackhole); a broker that is down refuses connects.
//!
//! Only loopback targets (`127.0.0.0/8`, `::1`) are accepted; this is a
//! safety rule of the project so that tests can never proxy to, or disturb,
//! anything off the machine.
//!
//! Every await that could block inside the proxy is bounded (target
//! resolution and connection use [`FaultProxyBuilder::connect_timeout`]), and
//! dropping a [`FaultProxy`] stops its listener and all connection tasks.
//! Events (cuts, refusals, connection open/close) are reported through
//! `tracing`; payload bytes are never logged.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tracing::{debug, info, warn};

/// Default bound on resolving the target and on connecting to it.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Size of a single read from either socket.
const CHUNK_SIZE: usize = 16 * 1024;
/// Chunks buffered per direction (bounds held bytes to 1 MiB per direction).
const QUEUE_CHUNKS: usize = 64;
/// Pause after a failed `accept` (e.g. out of file descriptors) before retrying.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Upper bound on waiting for tasks to finish in [`FaultProxy::shutdown`].
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A snapshot of a [`FaultProxy`]'s counters, from [`FaultProxy::stats`].
///
/// All counters are cumulative since the proxy started, except
/// [`live`](Self::live).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProxyStats {
    /// Connections taken from the listening socket, including refused ones.
    pub accepted: u64,
    /// Accepted connections that were closed at once because of
    /// [`FaultProxy::refuse_for`].
    pub refused: u64,
    /// Connections closed because the target could not be reached (connect
    /// error or timeout).
    pub target_failures: u64,
    /// Connections currently open through the proxy (including those still
    /// connecting to the target).
    pub live: u64,
    /// Number of [`FaultProxy::cut_all`] and [`FaultProxy::reset_all`] calls.
    pub cuts: u64,
    /// Connections closed by [`FaultProxy::cut_all`] or reset by [`FaultProxy::reset_all`].
    pub connections_cut: u64,
    /// Times the proxy could not listen again on its port after [`FaultProxy::reject_for`] (it
    /// retries every 50 ms until it can).
    pub relisten_failures: u64,
    /// Payload bytes written to the target (client → target).
    pub bytes_to_target: u64,
    /// Payload bytes written to clients (target → client).
    pub bytes_to_client: u64,
}

/// Fault settings shared with every task through a `watch` channel.
#[derive(Debug, Clone, Default)]
struct Control {
    /// Bumped by `cut_all` and `reset_all`; a connection ends when it differs
    /// from the value it saw when it was accepted.
    cut_generation: u64,
    /// Whether the latest cut resets connections instead of closing them.
    cut_resets: bool,
    latency: Duration,
    blackhole: bool,
    /// Bumped by `silence_live`; a connection accepted before the bump forwards nothing more.
    silence_generation: u64,
    refuse_until: Option<Instant>,
    reject_until: Option<Instant>,
    shutdown: bool,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    target_failures: AtomicU64,
    live: AtomicU64,
    cuts: AtomicU64,
    connections_cut: AtomicU64,
    relisten_failures: AtomicU64,
    bytes_to_target: AtomicU64,
    bytes_to_client: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    control: watch::Sender<Control>,
    counters: Counters,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// `now + duration`, saturating (at about a year) instead of overflowing.
fn deadline_after(duration: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(duration)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// Configuration for a [`FaultProxy`]; obtain one with [`FaultProxy::builder`].
#[derive(Debug, Clone)]
pub struct FaultProxyBuilder {
    connect_timeout: Duration,
}

impl Default for FaultProxyBuilder {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

impl FaultProxyBuilder {
    /// Bounds resolving the target in [`start`](Self::start) and each
    /// connection attempt to the target (default [`DEFAULT_CONNECT_TIMEOUT`]).
    ///
    /// When connecting to the target fails or times out, the client's
    /// connection is closed and [`ProxyStats::target_failures`] is incremented.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Starts the proxy: listens on `127.0.0.1:0` and forwards to `target`.
    ///
    /// `target` is resolved once, here. The target is not contacted until a
    /// client connects.
    ///
    /// Must be called within a Tokio runtime.
    ///
    /// # Errors
    ///
    /// - [`io::ErrorKind::InvalidInput`] if `target` resolves to any address
    ///   that is not loopback (`127.0.0.0/8` or `::1`), or to no address;
    /// - [`io::ErrorKind::TimedOut`] if resolving `target` takes longer than
    ///   the connect timeout;
    /// - any error from resolving `target` or binding the listener.
    pub async fn start(self, target: impl ToSocketAddrs) -> io::Result<FaultProxy> {
        let resolved = timeout(self.connect_timeout, tokio::net::lookup_host(target))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "fault proxy: resolving the target timed out after {:?}",
                        self.connect_timeout
                    ),
                )
            })??;
        let targets: Vec<SocketAddr> = resolved.collect();
        if targets.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "fault proxy: the target resolved to no address",
            ));
        }
        if let Some(bad) = targets
            .iter()
            .find(|addr| !addr.ip().to_canonical().is_loopback())
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "fault proxy: refusing non-loopback target {bad}; \
                     only 127.0.0.0/8 and ::1 are allowed"
                ),
            ));
        }

        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            control: watch::Sender::new(Control::default()),
            counters: Counters::default(),
        });
        let accept_task = tokio::spawn(accept_loop(
            listener,
            local_addr,
            Arc::from(targets.as_slice()),
            self.connect_timeout,
            Arc::clone(&shared),
        ));
        info!(%local_addr, ?targets, "fault proxy started");
        Ok(FaultProxy {
            local_addr,
            targets,
            shared,
            accept_task: Some(accept_task),
        })
    }
}

/// A loopback TCP proxy that injects connection faults on command.
///
/// Put it between a client and a broker: start it with the broker's address,
/// point the client at [`local_addr`](Self::local_addr), then break things
/// with [`cut_all`](Self::cut_all), [`reset_all`](Self::reset_all),
/// [`reject_for`](Self::reject_for), [`refuse_for`](Self::refuse_for),
/// [`set_latency`](Self::set_latency) and [`blackhole`](Self::blackhole).
/// Fault methods take effect immediately and may be called from any thread.
///
/// Dropping the proxy stops listening and closes every connection (as
/// [`shutdown`](Self::shutdown) does, without waiting).
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use agentcomm_testkit::proxy::FaultProxy;
/// use tokio::io::AsyncReadExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// // Stand-in for a broker, e.g. Redis at "127.0.0.1:6379".
/// let broker = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
///
/// let proxy = FaultProxy::start(broker.local_addr()?).await?;
/// // Point the client under test at the proxy instead of the broker.
/// let mut client = tokio::net::TcpStream::connect(proxy.local_addr()).await?;
/// let (_server_side, _) = broker.accept().await?;
///
/// proxy.set_latency(Duration::from_millis(50)); // slow every chunk down
/// proxy.cut_all(); // drop the connection under the client's feet
/// let mut buf = [0u8; 1];
/// let n = tokio::time::timeout(Duration::from_secs(1), client.read(&mut buf))
///     .await?
///     .unwrap_or(0);
/// assert_eq!(n, 0); // EOF (or a reset error)
/// assert_eq!(proxy.stats().cuts, 1);
///
/// proxy.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct FaultProxy {
    local_addr: SocketAddr,
    targets: Vec<SocketAddr>,
    shared: Arc<Shared>,
    accept_task: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy to `target` with default settings; see
    /// [`FaultProxyBuilder::start`] for details and errors.
    ///
    /// # Errors
    ///
    /// Fails if `target` does not resolve to loopback addresses only, or if
    /// resolution or binding the listener fails.
    pub async fn start(target: impl ToSocketAddrs) -> io::Result<Self> {
        Self::builder().start(target).await
    }

    /// Returns a builder to configure the proxy before starting it.
    pub fn builder() -> FaultProxyBuilder {
        FaultProxyBuilder::default()
    }

    /// The address clients should connect to (`127.0.0.1:<ephemeral port>`).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The resolved target addresses, tried in order for every connection.
    pub fn target_addrs(&self) -> &[SocketAddr] {
        &self.targets
    }

    /// Closes every live connection at once, both the client and the target
    /// side (the client reads EOF, or a reset error if it had unread data in
    /// flight). Bytes held by latency or [`blackhole`](Self::blackhole) are
    /// discarded. Connections accepted afterwards are proxied normally.
    ///
    /// The sockets are closed by the proxy's tasks, shortly after this returns;
    /// but from the moment it returns nothing more is forwarded on a cut
    /// connection, in either direction: bytes written after the call never
    /// reach the other side, even before the sockets are closed.
    ///
    /// "Live" means accepted by the proxy: a client whose TCP handshake has
    /// completed but that the proxy has not yet picked up from the listen
    /// queue is not cut. Tests should exchange data (or otherwise observe the
    /// connection through the proxy) before cutting it.
    pub fn cut_all(&self) {
        self.cut(false);
    }

    /// Like [`cut_all`](Self::cut_all), but each connection is reset (TCP RST,
    /// with `SO_LINGER` 0) instead of closed: the client's next read or write
    /// fails with "connection reset", as when a broker's process or host dies
    /// with data in flight, rather than seeing a clean end of stream.
    pub fn reset_all(&self) {
        self.cut(true);
    }

    fn cut(&self, reset: bool) {
        bump(&self.shared.counters.cuts, 1);
        self.shared.control.send_modify(|c| {
            c.cut_generation = c.cut_generation.wrapping_add(1);
            c.cut_resets = reset;
        });
        info!(
            proxy = %self.local_addr,
            live = self.shared.counters.live.load(Ordering::Relaxed),
            reset,
            "fault proxy: cutting all live connections"
        );
    }

    /// For `duration` from now, the proxy does not listen at all: a client's
    /// connect fails at once with "connection refused", as when the broker is
    /// down. Live connections are untouched. When the window ends the proxy
    /// listens again on the same address (should another socket have taken
    /// the port meanwhile, it retries every 50 ms and counts
    /// [`ProxyStats::relisten_failures`]). Replaces any earlier window;
    /// `Duration::ZERO` ends the window at once.
    pub fn reject_for(&self, duration: Duration) {
        let until = (!duration.is_zero()).then(|| deadline_after(duration));
        self.shared.control.send_modify(|c| c.reject_until = until);
        info!(proxy = %self.local_addr, ?duration, "fault proxy: not listening");
    }

    /// For `duration` from now, new connections are **accepted** and closed
    /// at once: the client's connect succeeds, and its first read sees EOF
    /// (or a write fails with a reset), as with a broker that accepts and
    /// then drops the connection during its handshake. For connects that are
    /// refused outright use [`reject_for`](Self::reject_for). Live
    /// connections are untouched. Replaces any earlier window;
    /// `Duration::ZERO` ends the window at once.
    pub fn refuse_for(&self, duration: Duration) {
        let until = (!duration.is_zero()).then(|| deadline_after(duration));
        self.shared.control.send_modify(|c| c.refuse_until = until);
        info!(proxy = %self.local_addr, ?duration, "fault proxy: refusing new connections");
    }

    /// Delays every chunk forwarded in either direction by `latency`, keeping
    /// byte order. A request/response round trip therefore gains about
    /// `2 × latency`. This is latency, not a throughput cap: chunks are read
    /// as they arrive and are in flight concurrently (up to 1 MiB per
    /// direction). The setting applies to chunks read after the call;
    /// `Duration::ZERO` removes it.
    pub fn set_latency(&self, latency: Duration) {
        self.shared.control.send_modify(|c| c.latency = latency);
        info!(proxy = %self.local_addr, ?latency, "fault proxy: latency set");
    }

    /// While `on`, stops forwarding bytes in both directions without closing
    /// anything (a stall). Bytes sent meanwhile are **held**, not dropped:
    /// the proxy buffers up to 1 MiB per direction per connection, beyond
    /// which TCP backpressure applies to the sender. When turned off, held
    /// bytes are delivered in order. Applies to live and new connections.
    pub fn blackhole(&self, on: bool) {
        self.shared.control.send_modify(|c| c.blackhole = on);
        info!(proxy = %self.local_addr, on, "fault proxy: blackhole");
    }

    /// The connections live now stop carrying bytes, for good, in both directions, and are not
    /// closed: not even when one side closes its end (that end's FIN is not passed on either). This is
    /// a network that lost the connections' state (a NAT or firewall that dropped it, a partition):
    /// each side waits for the other for ever, unless it checks. Unlike
    /// [`blackhole`](Self::blackhole), what was held is never delivered, and connections accepted
    /// afterwards are proxied normally. The silenced connections close with the proxy.
    pub fn silence_live(&self) {
        self.shared
            .control
            .send_modify(|c| c.silence_generation = c.silence_generation.wrapping_add(1));
        info!(proxy = %self.local_addr, "fault proxy: live connections silenced");
    }

    /// Returns a snapshot of the proxy's counters.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        let get = |v: &AtomicU64| v.load(Ordering::Relaxed);
        ProxyStats {
            accepted: get(&c.accepted),
            refused: get(&c.refused),
            target_failures: get(&c.target_failures),
            live: get(&c.live),
            cuts: get(&c.cuts),
            connections_cut: get(&c.connections_cut),
            relisten_failures: get(&c.relisten_failures),
            bytes_to_target: get(&c.bytes_to_target),
            bytes_to_client: get(&c.bytes_to_client),
        }
    }

    /// Stops listening, closes every connection and waits (bounded) for the
    /// proxy's tasks to finish. Afterwards connecting to
    /// [`local_addr`](Self::local_addr) fails.
    pub async fn shutdown(mut self) {
        self.shared.control.send_modify(|c| c.shutdown = true);
        if let Some(mut task) = self.accept_task.take()
            && timeout(SHUTDOWN_GRACE, &mut task).await.is_err()
        {
            warn!(proxy = %self.local_addr, "fault proxy: shutdown timed out; aborting");
            task.abort();
        }
        info!(proxy = %self.local_addr, "fault proxy shut down");
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(task) = self.accept_task.take() {
            self.shared.control.send_modify(|c| c.shutdown = true);
            // Aborting the accept task drops the listener and its `JoinSet`,
            // which aborts every connection task.
            task.abort();
            debug!(proxy = %self.local_addr, "fault proxy dropped");
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    local_addr: SocketAddr,
    targets: Arc<[SocketAddr]>,
    connect_timeout: Duration,
    shared: Arc<Shared>,
) {
    let mut control = shared.control.subscribe();
    let mut connections = JoinSet::new();
    let mut listener = Some(listener);
    let rejecting = |c: &Control| c.reject_until.is_some_and(|until| Instant::now() < until);
    loop {
        let reject_until = {
            let c = control.borrow_and_update();
            if c.shutdown {
                break;
            }
            c.reject_until.filter(|until| Instant::now() < *until)
        };
        if let Some(until) = reject_until {
            if listener.take().is_some() {
                info!(proxy = %local_addr, "fault proxy: stopped listening");
            }
            tokio::select! {
                _ = sleep_until(until) => {}
                // A new window, its end, or shutdown.
                _ = control.changed() => {}
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
            continue;
        }
        let Some(active) = &listener else {
            match TcpListener::bind(local_addr).await {
                Ok(bound) => {
                    info!(proxy = %local_addr, "fault proxy: listening again");
                    listener = Some(bound);
                }
                Err(error) => {
                    bump(&shared.counters.relisten_failures, 1);
                    warn!(proxy = %local_addr, %error, "fault proxy: cannot listen again yet; retrying");
                    tokio::select! {
                        _ = sleep(ACCEPT_BACKOFF) => {}
                        _ = control.changed() => {}
                    }
                }
            }
            continue;
        };
        tokio::select! {
            accepted = active.accept() => match accepted {
                Ok((client, peer)) => {
                    bump(&shared.counters.accepted, 1);
                    let (refusing, generation) = {
                        let c = shared.control.borrow();
                        let refusing = c.refuse_until.is_some_and(|until| Instant::now() < until);
                        (refusing, Generations { cut: c.cut_generation, silence: c.silence_generation })
                    };
                    if refusing {
                        bump(&shared.counters.refused, 1);
                        debug!(%peer, "fault proxy: refusing connection");
                        drop(client);
                        continue;
                    }
                    debug!(%peer, "fault proxy: connection accepted");
                    connections.spawn(run_connection(
                        client,
                        peer,
                        Arc::clone(&targets),
                        connect_timeout,
                        Arc::clone(&shared),
                        generation,
                    ));
                }
                Err(error) => {
                    warn!(%error, "fault proxy: accept failed");
                    sleep(ACCEPT_BACKOFF).await;
                }
            },
            // Reap finished connection tasks so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = wait_for(&mut control, |c| c.shutdown || rejecting(c)) => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

/// Waits until `condition` holds for the current fault settings and returns
/// a copy of them (`None` if the proxy's state is gone, which cannot happen
/// while a task holds `Shared`). Unlike `watch::Receiver::wait_for`, the
/// returned value is `Send`.
async fn wait_for(
    control: &mut watch::Receiver<Control>,
    condition: impl FnMut(&Control) -> bool,
) -> Option<Control> {
    control.wait_for(condition).await.ok().map(|c| c.clone())
}

/// Keeps [`Counters::live`] accurate even when the task is aborted.
struct LiveGuard(Arc<Shared>);

impl LiveGuard {
    fn new(shared: &Arc<Shared>) -> Self {
        bump(&shared.counters.live, 1);
        Self(Arc::clone(shared))
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.counters.live.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn run_connection(
    client: TcpStream,
    peer: SocketAddr,
    targets: Arc<[SocketAddr]>,
    connect_timeout: Duration,
    shared: Arc<Shared>,
    generation: Generations,
) {
    let _live = LiveGuard::new(&shared);
    let mut control = shared.control.subscribe();
    let ends = |c: &Control| c.shutdown || c.cut_generation != generation.cut;
    let upstream = tokio::select! {
        upstream = connect_target(&targets, connect_timeout) => upstream,
        stop = wait_for(&mut control, ends) => {
            note_stop(&shared, peer, stop, generation.cut);
            return;
        }
    };
    let upstream = match upstream {
        Ok(upstream) => upstream,
        Err(error) => {
            bump(&shared.counters.target_failures, 1);
            warn!(%peer, %error, "fault proxy: cannot reach target; closing client");
            return;
        }
    };
    // Small request/response protocols should not wait on Nagle.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let forwarding = async {
        tokio::try_join!(
            pump(
                &mut client_read,
                &mut upstream_write,
                &shared,
                generation,
                &shared.counters.bytes_to_target
            ),
            pump(
                &mut upstream_read,
                &mut client_write,
                &shared,
                generation,
                &shared.counters.bytes_to_client
            ),
        )
    };
    tokio::select! {
        result = forwarding => match result {
            Ok(_) => debug!(%peer, "fault proxy: connection closed"),
            Err(error) => debug!(%peer, %error, "fault proxy: connection ended with error"),
        },
        stop = wait_for(&mut control, ends) => {
            let reset = stop
                .as_ref()
                .is_some_and(|c| c.cut_generation != generation.cut && c.cut_resets);
            note_stop(&shared, peer, stop, generation.cut);
            if reset {
                // Whole again, so that dropping does not first shut the write half down (a FIN);
                // closing a socket whose linger is zero then sends RST. A zero linger never blocks
                // on drop, which is why tokio deprecated only the general setter.
                for (read, write) in [(client_read, client_write), (upstream_read, upstream_write)] {
                    if let Ok(socket) = read.reunite(write) {
                        #[allow(deprecated)]
                        let _ = socket.set_linger(Some(Duration::ZERO));
                    }
                }
            }
        }
    }
    // Otherwise the sockets close here, when the halves are dropped.
}

/// Counts and logs a connection ended by a cut or by shutdown.
fn note_stop(shared: &Shared, peer: SocketAddr, stop: Option<Control>, generation: u64) {
    match stop {
        Some(c) if c.cut_generation != generation => {
            bump(&shared.counters.connections_cut, 1);
            debug!(%peer, reset = c.cut_resets, "fault proxy: connection cut");
        }
        _ => debug!(%peer, "fault proxy: connection closed by shutdown"),
    }
}

async fn connect_target(
    targets: &[SocketAddr],
    connect_timeout: Duration,
) -> io::Result<TcpStream> {
    let attempt = async {
        let mut last_error = None;
        for addr in targets {
            match TcpStream::connect(addr).await {
                Ok(stream) => return Ok(stream),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("no target address")))
    };
    timeout(connect_timeout, attempt).await.unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connecting to the target timed out after {connect_timeout:?}"),
        ))
    })
}

/// What a connection saw when it was accepted: it is cut once `cut_all` or `reset_all` bumped
/// [`Control::cut_generation`], and silent once `silence_live` bumped [`Control::silence_generation`].
#[derive(Debug, Clone, Copy)]
struct Generations {
    cut: u64,
    silence: u64,
}

struct Chunk {
    data: Vec<u8>,
    /// When the chunk may be written (`None` = no latency).
    due: Option<Instant>,
}

/// Forwards one direction. The read side keeps reading (stamping chunks with
/// their due time) while the write side waits for latency / blackhole, so
/// latency does not limit throughput and order is preserved. EOF is passed on
/// as a write shutdown (half-close). Nothing is forwarded once the connection's
/// cut `generation` is over (see [`FaultProxy::cut_all`]), nor, EOF included, once it is silenced
/// (see [`FaultProxy::silence_live`]).
async fn pump(
    reader: &mut OwnedReadHalf,
    writer: &mut OwnedWriteHalf,
    shared: &Shared,
    generation: Generations,
    forwarded: &AtomicU64,
) -> io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<Chunk>(QUEUE_CHUNKS);
    let read_side = async move {
        let mut buf = vec![0u8; CHUNK_SIZE];
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), io::Error>(()); // dropping `tx` signals EOF
            }
            let latency = shared.control.borrow().latency;
            let due = (!latency.is_zero()).then(|| deadline_after(latency));
            let chunk = Chunk {
                data: buf[..n].to_vec(),
                due,
            };
            if tx.send(chunk).await.is_err() {
                return Ok(()); // write side ended; its result decides
            }
        }
    };
    let write_side = async move {
        let mut control = shared.control.subscribe();
        while let Some(chunk) = rx.recv().await {
            if let Some(due) = chunk.due {
                sleep_until(due).await;
            }
            // Blackhole: hold the chunk until it is lifted.
            wait_for(&mut control, |c| !c.blackhole).await;
            // Cut: the connection's task closes the sockets, on its own time. Until then this side
            // must not forward what it still holds, nor bytes the client wrote after `cut_all`
            // returned (read after it, so the new generation is seen here): wait to be dropped.
            let cut = {
                let c = control.borrow();
                c.shutdown
                    || c.cut_generation != generation.cut
                    || c.silence_generation != generation.silence
            };
            if cut {
                std::future::pending::<()>().await;
            }
            writer.write_all(&chunk.data).await?;
            bump(forwarded, chunk.data.len() as u64);
        }
        if control.borrow().silence_generation != generation.silence {
            std::future::pending::<()>().await;
        }
        writer.shutdown().await
    };
    tokio::try_join!(read_side, write_side)?;
    Ok(())
}

/// `scheme://[userinfo@]host[:port][/rest]`: what comes before the host (scheme and userinfo), the
/// host and port, and the rest (path, query).
fn url_parts(url: &str) -> Option<(String, &str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, host_port) = match authority.rsplit_once('@') {
        Some((userinfo, host_port)) => (format!("{userinfo}@"), host_port),
        None => (String::new(), authority),
    };
    Some((format!("{scheme}://{userinfo}"), host_port, tail))
}

/// The address of the broker a URL (`redis://`, `amqp://`, ...) names, when it is on loopback: the only
/// target a [`FaultProxy`] forwards to. `default_port` when the URL names none; `None` for a host off
/// the machine, a name that does not resolve, or text that is not a URL.
///
/// ```
/// use agentcomm_testkit::proxy::loopback_address;
/// assert_eq!(loopback_address("redis://:pw@localhost/0", 6379).map(|a| a.port()), Some(6379));
/// assert_eq!(loopback_address("amqp://guest:guest@127.0.0.1:5673/%2f", 5672).map(|a| a.port()), Some(5673));
/// assert_eq!(loopback_address("redis://10.1.2.3:6379", 6379), None);
/// ```
pub fn loopback_address(url: &str, default_port: u16) -> Option<SocketAddr> {
    let (_, host_port, _) = url_parts(url)?;
    // A port after the last ':' that is not inside an IPv6 literal's brackets.
    let has_port = host_port
        .rsplit_once(':')
        .is_some_and(|(_, port)| !port.contains(']'));
    let host_port = if has_port {
        host_port.to_string()
    } else {
        format!("{host_port}:{default_port}")
    };
    std::net::ToSocketAddrs::to_socket_addrs(&host_port)
        .ok()?
        .find(|address| address.ip().is_loopback())
}

/// `url` pointing at `address` instead of its host and port (a [`FaultProxy`]'s
/// [`local_addr`](FaultProxy::local_addr)), its scheme, credentials, path and query kept; `url`
/// unchanged when it is not a URL.
///
/// ```
/// use agentcomm_testkit::proxy::url_through;
/// let proxy = "127.0.0.1:40000".parse().unwrap();
/// assert_eq!(
///     url_through("amqp://guest:guest@127.0.0.1:5672/%2f", proxy),
///     "amqp://guest:guest@127.0.0.1:40000/%2f"
/// );
/// assert_eq!(url_through("redis://:pw@localhost/0", proxy), "redis://:pw@127.0.0.1:40000/0");
/// ```
pub fn url_through(url: &str, address: SocketAddr) -> String {
    match url_parts(url) {
        Some((head, _, tail)) => format!("{head}{address}{tail}"),
        None => url.to_string(),
    }
}
