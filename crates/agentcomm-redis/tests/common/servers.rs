//! Redis servers a test starts for itself, on loopback, when it needs what the shared Redis is not
//! (TLS, a cluster): `redis-server` and `redis-cli` from the machine (Debian's redis-server package).
//!
//! Each server runs under a small shell that kills it and removes its directory when the test process
//! ends (its standard input, held by the test process, closes), so a server outlives neither a passing
//! nor a failing test binary.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server`; stopped when dropped, or when the test process ends.
pub struct Spawned {
    child: Child,
    /// Held open: the shell stops the server when it closes.
    _lifeline: Option<ChildStdin>,
    pub port: u16,
    pub dir: PathBuf,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // Closing the lifeline makes the shell stop the server and clean up; wait for that.
        self._lifeline.take();
        let _ = self.child.wait();
    }
}

/// Why servers cannot be started here (`redis-server` or `redis-cli` missing), if they cannot.
pub fn missing_tools() -> Option<String> {
    for tool in ["redis-server", "redis-cli"] {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !found {
            return Some(format!(
                "no {tool} binary to start a Redis of the test's own (apt-get install redis-server)"
            ));
        }
    }
    None
}

/// Prints the one `skipped:` line for `reason`, or fails with AGENTCOMM_REQUIRE_BROKERS=1.
pub fn skip(reason: &str) {
    agentcomm_testkit::broker_unavailable(reason);
}

/// Runs `redis-cli` with `args`, killed if it has not finished within `limit`.
pub fn redis_cli(args: &[String], limit: Duration) -> Result<std::process::Output, String> {
    let mut child = Command::new("redis-cli")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("could not run redis-cli: {e}"))?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => {
                return child
                    .wait_with_output()
                    .map_err(|e| format!("redis-cli: {e}"));
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "redis-cli {} did not finish within {limit:?}",
                    args.join(" ")
                ));
            }
            Err(error) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("redis-cli: {error}"));
            }
        }
    }
}

/// Whether this `redis-server` can run the test cluster (`cluster-port` needs Redis 7), or why not.
pub fn cluster_unsupported() -> Option<String> {
    if let Some(reason) = missing_tools() {
        return Some(reason);
    }
    let version = Command::new("redis-server")
        .arg("--version")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).to_string())
        .unwrap_or_default();
    // "Redis server v=7.0.15 sha=..."
    let major = version
        .split("v=")
        .nth(1)
        .and_then(|rest| rest.split('.').next())
        .and_then(|major| major.parse::<u32>().ok());
    match major {
        Some(major) if major >= 7 => None,
        _ => Some(format!(
            "the test cluster needs redis-server 7 or later (cluster-port); this one says {:?}",
            version.trim()
        )),
    }
}

/// `count` loopback ports the system just handed out (free again once returned).
pub fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    listeners
        .iter()
        .map(|listener| listener.local_addr().expect("its address").port())
        .collect()
}

/// A fresh directory for one server's files.
pub fn server_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "agentcomm-{name}-{}",
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    dir
}

/// Starts `redis-server` in `dir` with `args` (no persistence, loopback only), and waits until `port`
/// accepts connections.
pub fn start(dir: PathBuf, port: u16, args: &[String]) -> Result<Spawned, String> {
    start_from(None, dir, port, args)
}

/// [`start`], reading the configuration file `config` first (which must come before any option).
pub fn start_from(
    config: Option<&Path>,
    dir: PathBuf,
    port: u16,
    args: &[String],
) -> Result<Spawned, String> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(
            r#"dir="$1"; shift
redis-server "$@" &
server=$!
cat >/dev/null
kill "$server" 2>/dev/null
wait "$server"
rm -rf "$dir""#,
        )
        .arg("sh")
        .arg(&dir)
        .args(config)
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("could not start redis-server: {e}"))?;
    let lifeline = child.stdin.take();
    let spawned = Spawned {
        child,
        _lifeline: lifeline,
        port,
        dir,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            // Dropping `spawned` stops what did start.
            return Err(format!(
                "the redis-server started on port {port} did not listen within 10 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(spawned)
}

/// A `redis-server` with only a TLS port (no plain one) and a self-signed certificate for 127.0.0.1.
pub struct TlsRedis {
    pub server: Spawned,
    /// The server's certificate, DER: the one root a client must trust.
    pub certificate: Vec<u8>,
}

/// Starts a TLS Redis with `password`, its certificate for 127.0.0.1.
pub fn start_tls(password: &str) -> TlsRedis {
    start_tls_for(password, "127.0.0.1")
}

/// Starts a TLS Redis with `password`, its certificate for `name` only.
pub fn start_tls_for(password: &str, name: &str) -> TlsRedis {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec![name.to_string()]).expect("certificate");
    let dir = server_dir("tls");
    let cert_file = dir.join("redis.crt");
    let key_file = dir.join("redis.key");
    std::fs::write(&cert_file, cert.pem()).expect("write the certificate");
    std::fs::write(&key_file, signing_key.serialize_pem()).expect("write the key");
    let port = free_ports(1)[0];
    let path = |p: &PathBuf| p.display().to_string();
    let args: Vec<String> = [
        "--port",
        "0",
        "--tls-port",
        &port.to_string(),
        "--tls-cert-file",
        &path(&cert_file),
        "--tls-key-file",
        &path(&key_file),
        "--tls-ca-cert-file",
        &path(&cert_file),
        "--tls-auth-clients",
        "no",
        "--requirepass",
        password,
    ]
    .map(String::from)
    .to_vec();
    TlsRedis {
        server: start(dir, port, &args).expect("a TLS redis-server"),
        certificate: cert.der().to_vec(),
    }
}

/// A Redis Cluster of three primaries, no replicas, every slot assigned.
pub struct Cluster {
    pub nodes: Vec<Spawned>,
}

impl Cluster {
    /// `redis-cluster://` for it, naming every node.
    pub fn url(&self) -> String {
        let mut url = format!("redis-cluster://127.0.0.1:{}", self.nodes[0].port);
        for (index, node) in self.nodes.iter().enumerate().skip(1) {
            url.push(if index == 1 { '?' } else { '&' });
            url.push_str(&format!("node=127.0.0.1:{}", node.port));
        }
        url
    }
}

/// Starts three cluster nodes (each with its bus on a port of its own), joins them with
/// `redis-cli --cluster create`, and waits until every node says the cluster is ok; or says why it could
/// not, within about 80 s at worst (each step has its own bound). redis-cli's output here is a few
/// kilobytes, well within what its pipes hold while it runs.
pub fn start_cluster() -> Result<Cluster, String> {
    let ports = free_ports(6);
    let nodes: Vec<Spawned> = (0..3)
        .map(|index| {
            let dir = server_dir("cluster");
            let args: Vec<String> = [
                "--port",
                &ports[index].to_string(),
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &ports[index + 3].to_string(),
                "--cluster-config-file",
                &dir.join("nodes.conf").display().to_string(),
                "--cluster-node-timeout",
                "5000",
            ]
            .map(String::from)
            .to_vec();
            start(dir, ports[index], &args)
        })
        .collect::<Result<_, _>>()?;
    let mut create: Vec<String> = vec!["--cluster".into(), "create".into()];
    create.extend(nodes.iter().map(|node| format!("127.0.0.1:{}", node.port)));
    create.extend(["--cluster-replicas", "0", "--cluster-yes"].map(String::from));
    let created = redis_cli(&create, Duration::from_secs(20))?;
    if !created.status.success() {
        return Err(format!(
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&created.stderr)
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for node in &nodes {
        loop {
            let args = ["-p", &node.port.to_string(), "cluster", "info"].map(String::from);
            let info = redis_cli(&args, Duration::from_secs(5))?;
            if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                break;
            }
            if Instant::now() > deadline {
                return Err("the test cluster was not ok within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(Cluster { nodes })
}

/// A Redis with a Sentinel that monitors it as `SENTINEL_SERVICE`.
pub struct Sentinel {
    pub primary: Spawned,
    pub sentinel: Spawned,
}

/// The service name the Sentinel knows the primary by.
pub const SENTINEL_SERVICE: &str = "agentcomm-primary";

impl Sentinel {
    /// `redis-sentinel://` for it.
    pub fn url(&self) -> String {
        format!(
            "redis-sentinel://127.0.0.1:{}/0?sentinelServiceName={SENTINEL_SERVICE}",
            self.sentinel.port
        )
    }
}

/// Starts a Redis and a Sentinel monitoring it, and waits until the Sentinel names it.
pub fn start_sentinel() -> Sentinel {
    let ports = free_ports(2);
    let primary = start(
        server_dir("sentinel-primary"),
        ports[0],
        &["--port".to_string(), ports[0].to_string()],
    )
    .expect("the Sentinel's primary");
    let dir = server_dir("sentinel");
    // Sentinel rewrites its configuration file: it lives in the server's directory.
    let config = dir.join("sentinel.conf");
    std::fs::write(
        &config,
        format!(
            "sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {} 1\n",
            ports[0]
        ),
    )
    .expect("write sentinel.conf");
    let sentinel = start_from(
        Some(&config),
        dir,
        ports[1],
        &[
            "--sentinel".to_string(),
            "--port".to_string(),
            ports[1].to_string(),
        ],
    )
    .expect("the Sentinel");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let args = [
            "-p",
            &ports[1].to_string(),
            "sentinel",
            "get-master-addr-by-name",
            SENTINEL_SERVICE,
        ]
        .map(String::from);
        let answer = redis_cli(&args, Duration::from_secs(5)).expect("asking the Sentinel");
        if String::from_utf8_lossy(&answer.stdout).contains(&ports[0].to_string()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the Sentinel did not name its primary within 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Sentinel { primary, sentinel }
}
