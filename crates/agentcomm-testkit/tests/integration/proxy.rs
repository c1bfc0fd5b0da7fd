//! Behaviour tests for the fault-injecting TCP proxy.
//!
//! Every test runs its own echo server on `127.0.0.1:0` as the target, and
//! every await is bounded by a timeout so that no test can hang.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use agentcomm_testkit::proxy::FaultProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, sleep, timeout};

/// Bound on any single step of a test.
const STEP: Duration = Duration::from_secs(2);
/// Poll interval of the wait loops.
const POLL: Duration = Duration::from_millis(10);

/// Awaits `fut`, failing the test if it takes longer than [`STEP`].
async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match timeout(STEP, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {STEP:?}: {what}"),
    }
}

/// Polls `condition` until it holds, failing the test after [`STEP`].
async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + STEP;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "condition not met within {STEP:?}: {what}"
        );
        sleep(POLL).await;
    }
}

/// Starts an echo server on an ephemeral loopback port; it lives as long as
/// the test's runtime.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn start_proxy() -> FaultProxy {
    let target = echo_server().await;
    within("start proxy", FaultProxy::start(target))
        .await
        .expect("start proxy")
}

async fn connect(proxy: &FaultProxy) -> TcpStream {
    let stream = within("connect", TcpStream::connect(proxy.local_addr()))
        .await
        .expect("connect to proxy");
    stream.set_nodelay(true).expect("nodelay");
    stream
}

/// Writes `payload` and reads back as many bytes (unbounded; wrap it).
async fn round_trip(stream: &mut TcpStream, payload: &[u8]) -> io::Result<Vec<u8>> {
    stream.write_all(payload).await?;
    let mut buf = vec![0; payload.len()];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

/// A round trip that must succeed within [`STEP`].
async fn echo_ok(stream: &mut TcpStream, payload: &[u8]) {
    let back = within("round trip", round_trip(stream, payload))
        .await
        .expect("round trip through proxy");
    assert_eq!(back, payload);
}

/// Asserts the peer closed the connection: a read returns EOF or an error.
async fn assert_closed(stream: &mut TcpStream) {
    let mut buf = [0u8; 64];
    match within("read after close", stream.read(&mut buf)).await {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("expected EOF or error, read {n} bytes"),
    }
}

/// Deterministic pseudo-random bytes (xorshift), so corruption is detectable.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9E37_79B9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn passes_one_mebibyte_both_ways_intact() {
    const LEN: usize = 1 << 20;
    let proxy = start_proxy().await;
    let client = connect(&proxy).await;
    let payload = pattern(LEN);

    // Write and read concurrently so neither side's buffers can deadlock.
    let (mut r, mut w) = client.into_split();
    let write = async {
        w.write_all(&payload).await?;
        w.flush().await
    };
    let read = async {
        let mut back = vec![0u8; LEN];
        r.read_exact(&mut back).await?;
        Ok::<_, io::Error>(back)
    };
    let ((), back) = within("1 MiB round trip", async { tokio::try_join!(write, read) })
        .await
        .expect("1 MiB round trip");
    assert!(back == payload, "echoed bytes differ from the sent bytes");

    let len = LEN as u64;
    wait_until("byte counters reach 1 MiB each way", || {
        let s = proxy.stats();
        s.bytes_to_target == len && s.bytes_to_client == len
    })
    .await;
    let stats = proxy.stats();
    assert_eq!((stats.accepted, stats.live), (1, 1));
}

#[tokio::test]
async fn cut_all_ends_live_connections_and_new_ones_work() {
    let proxy = start_proxy().await;
    let mut a = connect(&proxy).await;
    let mut b = connect(&proxy).await;
    // Round trips prove both connections are live through the proxy.
    echo_ok(&mut a, b"hello a").await;
    echo_ok(&mut b, b"hello b").await;

    proxy.cut_all();
    assert_closed(&mut a).await;
    assert_closed(&mut b).await;
    wait_until("both connections counted as cut", || {
        let s = proxy.stats();
        s.connections_cut == 2 && s.live == 0
    })
    .await;

    let mut c = connect(&proxy).await;
    echo_ok(&mut c, b"after the cut").await;
    let stats = proxy.stats();
    assert_eq!(stats.cuts, 1);
    assert_eq!(stats.connections_cut, 2, "the new connection is not cut");
    assert_eq!(stats.accepted, 3);
    assert_eq!(stats.live, 1);
}

/// A target that keeps every byte it receives, over all its connections.
async fn recording_server() -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind recorder");
    let addr = listener.local_addr().expect("recorder addr");
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = received.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = stream.read(&mut buf).await {
                    kept.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    (addr, received)
}

/// Nothing passes a cut connection once `cut_all` returned: neither what the blackhole held, nor
/// what the client writes next, although the proxy's tasks close the sockets a moment later. Tests
/// cut and then act at once (a publish that must fail, an acknowledgement that must be lost); the
/// proxy used to forward the held chunk when the blackhole was lifted right after the cut (if the
/// connection's task saw both changes at once, it picked the forwarding at random), and bytes
/// written right after the cut until its task got to close the sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_passes_a_cut_connection_once_cut_all_returned() {
    for round in 0..20 {
        let (target, received) = recording_server().await;
        let proxy = within("start proxy", FaultProxy::start(target))
            .await
            .expect("start proxy");
        let mut client = connect(&proxy).await;
        within("write", client.write_all(b"<live>"))
            .await
            .expect("write");
        wait_until("the first bytes to pass", || {
            received.lock().unwrap().len() == 6
        })
        .await;
        proxy.blackhole(true);
        within("write", client.write_all(b"<held>"))
            .await
            .expect("write");
        // Time for the proxy to read the held bytes into its queue (read later, they must not
        // pass either).
        sleep(POLL).await;
        proxy.cut_all();
        proxy.blackhole(false);
        // The socket may be closed already: a failed write is fine, a forwarded one is not.
        let _ = client.write_all(b"<after>").await;
        assert_closed(&mut client).await;
        wait_until("the cut to be counted", || proxy.stats().live == 0).await;
        assert_eq!(
            String::from_utf8_lossy(&received.lock().unwrap()),
            "<live>",
            "round {round}: bytes passed the cut"
        );
    }
}

#[tokio::test]
async fn cut_all_closes_cleanly_and_reset_all_resets() {
    let proxy = start_proxy().await;
    let mut closed = connect(&proxy).await;
    echo_ok(&mut closed, b"hello").await;
    proxy.cut_all();
    let mut buf = [0u8; 8];
    let read = within("read after cut", closed.read(&mut buf)).await;
    assert!(matches!(read, Ok(0)), "a cut ends with EOF: {read:?}");

    let mut reset = connect(&proxy).await;
    echo_ok(&mut reset, b"hello").await;
    proxy.reset_all();
    let read = within("read after reset", reset.read(&mut buf)).await;
    assert_eq!(
        read.map_err(|error| error.kind()),
        Err(io::ErrorKind::ConnectionReset),
        "a reset ends with ECONNRESET"
    );
    wait_until("both counted as cut", || proxy.stats().connections_cut == 2).await;
    assert_eq!(proxy.stats().cuts, 2);

    let mut after = connect(&proxy).await;
    echo_ok(&mut after, b"after the reset").await;
}

#[tokio::test]
async fn reject_for_refuses_connects_during_the_window_and_listens_again_after() {
    const WINDOW: Duration = Duration::from_millis(300);
    let proxy = start_proxy().await;
    let mut live = connect(&proxy).await;
    echo_ok(&mut live, b"before").await;

    let started = Instant::now();
    proxy.reject_for(WINDOW);
    // The listener closes in the proxy's task: wait for the first refused connect. (A connect
    // caught in the listener's backlog as it closes is reset instead.)
    let deadline = Instant::now() + STEP;
    loop {
        match within("connect", TcpStream::connect(proxy.local_addr())).await {
            Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => break,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "connects are not refused during the window: {other:?}"
                );
                sleep(POLL).await;
            }
        }
    }
    assert!(
        started.elapsed() < WINDOW,
        "refusing began too late to check"
    );
    // The live connection is untouched.
    echo_ok(&mut live, b"still alive").await;

    // Connects work again once the window is over, on the same address.
    let deadline = Instant::now() + STEP;
    let mut back = loop {
        if let Ok(stream) = TcpStream::connect(proxy.local_addr()).await {
            break stream;
        }
        assert!(Instant::now() < deadline, "the proxy never listened again");
        sleep(POLL).await;
    };
    assert!(
        started.elapsed() >= WINDOW,
        "a connect worked inside the window"
    );
    echo_ok(&mut back, b"back").await;
    assert_eq!(proxy.stats().relisten_failures, 0);

    // A window can be ended early.
    proxy.reject_for(Duration::from_secs(60));
    let deadline = Instant::now() + STEP;
    while TcpStream::connect(proxy.local_addr()).await.is_ok() {
        assert!(Instant::now() < deadline, "the proxy still accepts");
        sleep(POLL).await;
    }
    proxy.reject_for(Duration::ZERO);
    let deadline = Instant::now() + STEP;
    while TcpStream::connect(proxy.local_addr()).await.is_err() {
        assert!(Instant::now() < deadline, "the window did not end");
        sleep(POLL).await;
    }
}

#[tokio::test]
async fn refuse_for_rejects_new_connections_during_the_window_only() {
    const WINDOW: Duration = Duration::from_millis(400);
    let proxy = start_proxy().await;
    let mut live = connect(&proxy).await;
    echo_ok(&mut live, b"before").await;

    let started = Instant::now();
    proxy.refuse_for(WINDOW);

    // A new connection during the window fails: connect error, EOF or reset.
    let attempt = async {
        let mut s = TcpStream::connect(proxy.local_addr()).await?;
        round_trip(&mut s, b"refused?").await
    };
    let refused = within("refused attempt", attempt).await;
    assert!(
        refused.is_err(),
        "connection during the refuse window worked"
    );

    // The live connection is untouched.
    echo_ok(&mut live, b"still alive").await;

    // Retry until a new connection works again; it must be after the window.
    let deadline = Instant::now() + STEP;
    loop {
        let attempt = async {
            let mut s = TcpStream::connect(proxy.local_addr()).await?;
            round_trip(&mut s, b"back?").await
        };
        if let Ok(Ok(back)) = timeout(Duration::from_millis(500), attempt).await {
            assert_eq!(back, b"back?");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "proxy still refusing after {STEP:?}"
        );
        sleep(Duration::from_millis(20)).await;
    }
    assert!(
        started.elapsed() >= WINDOW,
        "a connection worked inside the refuse window"
    );
    let stats = proxy.stats();
    assert!(stats.refused >= 1, "refusals are counted: {stats:?}");
    assert_eq!(stats.accepted, stats.refused + 2);
}

#[tokio::test]
async fn set_latency_delays_round_trips_and_can_be_removed() {
    const LATENCY: Duration = Duration::from_millis(200);
    let proxy = start_proxy().await;
    let mut client = connect(&proxy).await;
    echo_ok(&mut client, b"warm up").await;

    proxy.set_latency(LATENCY);
    let t = Instant::now();
    echo_ok(&mut client, b"slow").await;
    let rtt = t.elapsed();
    // The delay applies in both directions, so a round trip gains 2x latency.
    assert!(rtt >= 2 * LATENCY, "round trip took only {rtt:?}");

    proxy.set_latency(Duration::ZERO);
    let fast = timeout(LATENCY, round_trip(&mut client, b"fast")).await;
    let back = fast.expect("latency still applied after removal");
    assert_eq!(back.expect("round trip"), b"fast");
}

#[tokio::test]
async fn latency_changes_keep_byte_order() {
    let proxy = start_proxy().await;
    let client = connect(&proxy).await;
    let (mut r, mut w) = client.into_split();

    let mut sent = Vec::new();
    proxy.set_latency(Duration::from_millis(150));
    for i in 0..20u8 {
        if i == 10 {
            // Later chunks become due before earlier ones; order must hold.
            proxy.set_latency(Duration::ZERO);
        }
        let msg = [b'<', i, b'>'];
        within("write", w.write_all(&msg)).await.expect("write");
        sent.extend_from_slice(&msg);
        sleep(Duration::from_millis(2)).await; // spread writes over chunks
    }
    let mut back = vec![0u8; sent.len()];
    within("read all", r.read_exact(&mut back))
        .await
        .expect("read");
    assert_eq!(back, sent);
}

#[tokio::test]
async fn blackhole_holds_bytes_until_lifted() {
    let proxy = start_proxy().await;
    let mut client = connect(&proxy).await;
    echo_ok(&mut client, b"before").await;

    proxy.blackhole(true);
    within("write", client.write_all(b"held"))
        .await
        .expect("write");
    let mut buf = [0u8; 4];
    let stalled = timeout(Duration::from_millis(300), client.read_exact(&mut buf)).await;
    // Timing out (rather than EOF or an error) shows the connection is open.
    assert!(
        stalled.is_err(),
        "data or EOF arrived through the blackhole"
    );
    assert_eq!(proxy.stats().live, 1);

    proxy.blackhole(false);
    within("held bytes arrive", client.read_exact(&mut buf))
        .await
        .expect("read held bytes");
    assert_eq!(&buf, b"held");
    echo_ok(&mut client, b"after").await;
}

/// A silenced connection carries nothing more, ever (not even its client's close), while a new
/// connection works.
#[tokio::test]
async fn silence_live_mutes_live_connections_for_good_and_spares_new_ones() {
    let proxy = start_proxy().await;
    let mut client = connect(&proxy).await;
    echo_ok(&mut client, b"before").await;

    proxy.silence_live();
    within("write", client.write_all(b"lost"))
        .await
        .expect("write");
    let mut buf = [0u8; 4];
    let silent = timeout(Duration::from_millis(300), client.read_exact(&mut buf)).await;
    // Timing out (rather than EOF or an error) shows the connection is open.
    assert!(
        silent.is_err(),
        "data or EOF came through a silenced connection"
    );

    let mut fresh = connect(&proxy).await;
    echo_ok(&mut fresh, b"new").await;
    // Unlike the black hole, nothing held is delivered later, and the connection stays open.
    let still = timeout(Duration::from_millis(300), client.read_exact(&mut buf)).await;
    assert!(still.is_err(), "a silenced connection spoke again");
    // The client's close does not reach the echo server either (which would close its end too).
    within("shutdown", client.shutdown())
        .await
        .expect("shutdown");
    let after = timeout(Duration::from_millis(300), client.read(&mut buf)).await;
    assert!(
        after.is_err(),
        "the close came through a silenced connection"
    );
    assert_eq!(proxy.stats().live, 2);
}

#[tokio::test]
async fn start_refuses_non_loopback_targets() {
    for target in [
        "10.1.2.3:6379",
        "8.8.8.8:53",
        "0.0.0.0:6379",
        "[2001:db8::1]:6379",
        "[::ffff:10.1.2.3]:6379",
    ] {
        // Far below the connect timeout: nothing is contacted.
        let result = timeout(Duration::from_millis(500), FaultProxy::start(target))
            .await
            .unwrap_or_else(|_| panic!("start({target}) did not return promptly"));
        let err = result.expect_err(target);
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{target}: {err}");
        assert!(err.to_string().contains("loopback"), "{target}: {err}");
    }
}

#[tokio::test]
async fn start_accepts_loopback_targets() {
    for target in ["127.0.0.1:6379", "127.1.2.3:6379", "[::1]:6379"] {
        let proxy = within("start", FaultProxy::start(target))
            .await
            .unwrap_or_else(|e| panic!("start({target}) failed: {e}"));
        assert!(proxy.local_addr().ip().is_loopback());
        assert_eq!(proxy.target_addrs().len(), 1);
    }
}

#[tokio::test]
async fn stats_count_connections_cuts_and_bytes() {
    let proxy = start_proxy().await;
    assert_eq!(proxy.stats(), Default::default());

    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = connect(&proxy).await;
        echo_ok(&mut c, b"12345").await;
        clients.push(c);
    }
    let s = proxy.stats();
    assert_eq!((s.accepted, s.live, s.cuts), (3, 3, 0));

    proxy.cut_all();
    proxy.cut_all(); // nothing left to cut: counted as a cut, cuts no connection
    wait_until("cut connections counted", || proxy.stats().live == 0).await;
    let s = proxy.stats();
    assert_eq!((s.cuts, s.connections_cut), (2, 3));
    assert_eq!((s.bytes_to_target, s.bytes_to_client), (15, 15));
}

#[tokio::test]
async fn unreachable_target_closes_the_client() {
    // A port that was just free: connecting to it is refused.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr")
    };
    let proxy = within(
        "start",
        FaultProxy::builder()
            .connect_timeout(Duration::from_millis(500))
            .start(closed),
    )
    .await
    .expect("start");
    let mut client = connect(&proxy).await;
    assert_closed(&mut client).await;
    wait_until("target failure counted", || {
        proxy.stats().target_failures == 1
    })
    .await;
}

#[tokio::test]
async fn shutdown_closes_connections_and_stops_listening() {
    let proxy = start_proxy().await;
    let addr = proxy.local_addr();
    let mut client = connect(&proxy).await;
    echo_ok(&mut client, b"hi").await;

    within("shutdown", proxy.shutdown()).await;
    assert_closed(&mut client).await;
    let reconnect = within("reconnect", TcpStream::connect(addr)).await;
    assert!(reconnect.is_err(), "proxy still listening after shutdown");
}

#[tokio::test]
async fn dropping_the_proxy_stops_its_tasks() {
    let proxy = start_proxy().await;
    let addr = proxy.local_addr();
    let mut client = connect(&proxy).await;
    echo_ok(&mut client, b"hi").await;

    drop(proxy);
    assert_closed(&mut client).await;
    // The listener goes away once the aborted accept task is dropped.
    let deadline = Instant::now() + STEP;
    while within("reconnect", TcpStream::connect(addr)).await.is_ok() {
        assert!(Instant::now() < deadline, "listener still open after drop");
        sleep(POLL).await;
    }
}

/// The broker URLs the fault proxy is put in front of: IPv6 literals with and without a port, an `@`
/// in the password, a fragment, TLS; and what it cannot be put in front of (a host off the machine, a
/// Unix socket, text that is not a URL).
#[test]
fn broker_urls_are_read_and_pointed_through_the_proxy() {
    use agentcomm_testkit::proxy::{loopback_address, url_through};
    let v6: SocketAddr = "[::1]:6379".parse().unwrap();
    let v4: SocketAddr = "127.0.0.1:6380".parse().unwrap();
    assert_eq!(loopback_address("redis://[::1]:6379", 6379), Some(v6));
    assert_eq!(loopback_address("redis://[::1]", 6379), Some(v6));
    assert_eq!(loopback_address("redis://:p@ss@[::1]/0", 6379), Some(v6));
    assert_eq!(
        loopback_address("rediss://u:pw@127.0.0.1:6380/0#x", 6379),
        Some(v4)
    );
    assert_eq!(loopback_address("redis://10.1.2.3", 6379), None);
    assert_eq!(loopback_address("unix:///run/redis.sock", 6379), None);
    assert_eq!(loopback_address("127.0.0.1:6379", 6379), None);

    let proxy: SocketAddr = "[::1]:40000".parse().unwrap();
    for (url, expected) in [
        ("redis://[::1]", "redis://[::1]:40000"),
        ("redis://:p@ss@[::1]:6379/0", "redis://:p@ss@[::1]:40000/0"),
        ("redis://localhost:6379#frag", "redis://[::1]:40000#frag"),
        (
            "rediss://u:pw@127.0.0.1:6380?x=a@b",
            "rediss://u:pw@[::1]:40000?x=a@b",
        ),
        ("not a url", "not a url"),
    ] {
        assert_eq!(url_through(url, proxy), expected, "{url}");
    }
}
