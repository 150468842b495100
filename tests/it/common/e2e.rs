//! End-to-end harness: a real broker process (tansu 0.6.0), the worker binary as a process of
//! its own (so it can be killed), an HTTP server with the part images, and an independent
//! Kafka client (confluent-kafka from PyPI, tests/e2e/kafka_client.py).

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A unique suffix for topics and groups, so runs never see each other's records.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{nanos:x}", std::process::id())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_for_port(port: u16, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on port {port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// tansu: `CLIPQC_TANSU`, else `tansu` on PATH (scripts/env.sh installs and exports it).
pub fn tansu_bin() -> PathBuf {
    std::env::var_os("CLIPQC_TANSU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("tansu"))
}

/// A tansu broker with sqlite storage in a temporary folder; killed on drop.
pub struct Broker {
    child: Child,
    /// Where clients connect (127.0.0.1).
    pub port: u16,
    /// librdkafka properties the test's own clients need: the security settings of a broker
    /// that requires a login or TLS ([`Broker::start_in`]); none for a plain one.
    pub client_properties: Vec<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

mod secured;

impl Broker {
    pub fn start() -> Self {
        Self::start_with_storage("sqlite://tansu.db")
    }

    /// As [`Broker::start`] on another storage engine (`memory://tansu/`: tansu 0.6.0's sqlite
    /// engine has panicked under heavy produce loads of large records).
    pub fn start_with_storage(storage: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("tansu.log")).unwrap();
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            // sqlite paths are relative to tansu's working directory.
            .args(["--storage-engine", storage])
            .current_dir(dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "start tansu ({}): {e}; scripts/test.sh installs it",
                    tansu_bin().display()
                )
            });
        wait_for_port(port, Duration::from_secs(30), "tansu");
        Self {
            child,
            port,
            client_properties: Vec::new(),
            _dir: Some(dir),
        }
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// tansu 0.6.0 does not create topics on first use.
    pub fn create_topic(&self, name: &str, partitions: u32) {
        let status = Command::new(tansu_bin())
            .args(["topic", "create", "--broker"])
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .args(["--partitions", &partitions.to_string(), name])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "tansu topic create {name}");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serves the files of `dir` over HTTP on 127.0.0.1, on a runtime of its own.
pub struct ImageServer {
    pub addr: SocketAddr,
    _runtime: tokio::runtime::Runtime,
}

impl ImageServer {
    pub fn start(dir: &Path) -> Self {
        let dir = dir.to_path_buf();
        let app = axum::Router::new().route(
            "/{name}",
            axum::routing::get(
                move |axum::extract::Path(name): axum::extract::Path<String>| {
                    let path = dir.join(&name);
                    async move {
                        match tokio::fs::read(&path).await {
                            Ok(bytes) => Ok(bytes),
                            Err(_) => Err(axum::http::StatusCode::NOT_FOUND),
                        }
                    }
                },
            ),
        );
        let (addr, runtime) = serve_in_background(app);
        Self {
            addr,
            _runtime: runtime,
        }
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{name}", self.addr)
    }
}

/// Serve `app` on a loopback port from a runtime of its own (tests here are synchronous);
/// the server lives as long as the returned runtime.
pub fn serve_in_background(app: axum::Router) -> (SocketAddr, tokio::runtime::Runtime) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let addr = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    });
    (addr, runtime)
}

/// The worker's topics and group for one test.
#[derive(Clone)]
pub struct Topics {
    pub requests: String,
    pub verdicts: String,
    pub dlq: String,
    pub group: String,
}

impl Topics {
    pub fn create(broker: &Broker, name: &str, partitions: u32) -> Self {
        let t = Self {
            requests: unique(&format!("{name}.requests")),
            verdicts: unique(&format!("{name}.verdicts")),
            dlq: unique(&format!("{name}.dlq")),
            group: unique(&format!("{name}-group")),
        };
        broker.create_topic(&t.requests, partitions);
        broker.create_topic(&t.verdicts, partitions);
        broker.create_topic(&t.dlq, 1);
        t
    }
}

/// `clipqc run` as a child process, with a config file written for it.
pub struct Worker {
    child: Child,
    pub log: PathBuf,
}

impl Worker {
    /// Start a worker named `name`; `static_member` makes the name its `group.instance.id`.
    pub fn start(
        broker: &Broker,
        topics: &Topics,
        name: &str,
        static_member: bool,
        dir: &Path,
    ) -> Self {
        Self::start_with(broker, topics, name, static_member, dir, "")
    }

    /// As [`Worker::start`], with `extra` TOML (whole sections) appended to the config.
    pub fn start_with(
        broker: &Broker,
        topics: &Topics,
        name: &str,
        static_member: bool,
        dir: &Path,
        extra: &str,
    ) -> Self {
        Self::start_with_env(broker, topics, name, static_member, dir, extra, &[])
    }

    /// As [`Worker::start_with`], with `CLIPQC__…` variables in the worker's environment:
    /// they override keys of sections the config file already has (`[fetch]`, `[pipeline]`).
    pub fn start_with_env(
        broker: &Broker,
        topics: &Topics,
        name: &str,
        static_member: bool,
        dir: &Path,
        extra: &str,
        env: &[(&str, String)],
    ) -> Self {
        let instance_id = name;
        let membership = if static_member {
            format!("instance_id = \"{name}\"")
        } else {
            String::new()
        };
        let config = dir.join(format!("{instance_id}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"[kafka]
brokers = "{brokers}"
group_id = "{group}"
input_topics = ["{requests}"]
verdict_topic = "{verdicts}"
dlq_topic = "{dlq}"
{membership}
verdict_encoding = "json"
[kafka.properties]
"session.timeout.ms" = "10000"

[model]
dir = "{model}"
device = "cpu"

[fetch]
allowed_hosts = ["127.0.0.1"]
allowed_networks = ["127.0.0.0/8"]
retries = 1

[pipeline]
drain_timeout_ms = 15000

[http]
listen = "127.0.0.1:0"

{extra}
"#,
                brokers = broker.brokers(),
                group = topics.group,
                requests = topics.requests,
                verdicts = topics.verdicts,
                dlq = topics.dlq,
                model = super::tiny_model().display(),
            ),
        )
        .unwrap();
        let log = dir.join(format!("{instance_id}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_clipqc"))
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Self { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no drain, no commit, no goodbye to the group.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then wait for the drain; returns whether it exited cleanly.
    pub fn terminate(mut self, within: Duration) -> bool {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait (up to `within`) for the worker to exit by itself; its exit status, or `None` if
    /// it is still running.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The address of the worker's `/metrics` endpoint, from its log (`http.listen` port 0).
    pub fn http_addr(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let found = text
                .lines()
                .filter(|l| l.contains("serving /metrics"))
                .filter_map(|l| l.split("addr=").nth(1))
                .filter_map(|rest| rest.split_whitespace().next())
                .next_back();
            if let Some(addr) = found {
                return addr.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no http address in the log\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log, 40)
    }
}

/// The last `n` lines of a log file (empty when it cannot be read), for failure messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> Command {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/kafka_client.py");
    let mut cmd = Command::new("python");
    cmd.arg(script);
    cmd
}

/// A request the client published, where the broker put it.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Published {
    pub partition: i32,
    pub offset: i64,
    pub request_id: String,
    pub bad: bool,
    /// The W3C trace context the request carried.
    pub traceparent: String,
}

/// Publish `count` requests for the image at `url` (every `bad_every`-th names a missing one).
pub fn produce(
    broker: &Broker,
    topic: &str,
    count: usize,
    url: &str,
    bad_every: usize,
) -> Vec<Published> {
    produce_at(broker, topic, count, url, bad_every, 0.0)
        .join()
        .unwrap()
}

/// As [`produce`], `rate` requests per second (0: at once), in the background.
pub fn produce_at(
    broker: &Broker,
    topic: &str,
    count: usize,
    url: &str,
    bad_every: usize,
    rate: f64,
) -> std::thread::JoinHandle<Vec<Published>> {
    let mut cmd = produce_command(broker, topic, count, url, bad_every, rate);
    std::thread::spawn(move || run_producer(&mut cmd))
}

/// As [`produce_at`] with no bad requests, in batches of `batch`, until `stop` is set or
/// `within` has passed: for a stream that must last until something has happened (a group
/// has rebalanced), however long that takes on a loaded machine, rather than for a fixed time.
pub fn produce_until(
    broker: &Broker,
    topic: &str,
    url: &str,
    rate: f64,
    batch: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    within: Duration,
) -> std::thread::JoinHandle<Vec<Published>> {
    let mut cmd = produce_command(broker, topic, batch, url, 0, rate);
    std::thread::spawn(move || {
        let deadline = Instant::now() + within;
        let mut all = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < deadline {
            all.extend(run_producer(&mut cmd));
        }
        all
    })
}

fn produce_command(
    broker: &Broker,
    topic: &str,
    count: usize,
    url: &str,
    bad_every: usize,
    rate: f64,
) -> Command {
    let mut cmd = client();
    cmd.args(["produce", "--brokers", &broker.brokers(), "--topic", topic])
        .args(broker.client_args())
        .args(["--count", &count.to_string(), "--image-url", url])
        .args([
            "--bad-every",
            &bad_every.to_string(),
            "--rate",
            &rate.to_string(),
        ])
        .stderr(Stdio::inherit());
    cmd
}

fn run_producer(cmd: &mut Command) -> Vec<Published> {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "kafka_client.py produce failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// One end-to-end test at a time: each runs a broker, workers and clients, and on a small
/// machine running them side by side only measures the contention.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A record read back by the client: its headers and, for verdicts, the verdict as JSON.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ReadBack {
    pub partition: i32,
    pub offset: i64,
    pub headers: std::collections::HashMap<String, Option<String>>,
    pub verdict: Option<serde_json::Value>,
}

impl ReadBack {
    fn header_i64(&self, name: &str) -> Option<i64> {
        self.headers.get(name)?.as_deref()?.parse().ok()
    }

    /// The input record this one answers: (partition, offset).
    pub fn source(&self) -> (i32, i64) {
        let p = self
            .header_i64("clipqc-source-partition")
            .or_else(|| self.header_i64("__connect.errors.partition"))
            .expect("verdicts and dead letters name their source partition");
        let o = self
            .header_i64("clipqc-source-offset")
            .or_else(|| self.header_i64("__connect.errors.offset"))
            .expect("verdicts and dead letters name their source offset");
        (p as i32, o)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.as_deref()
    }
}

/// Follow `topic` in the background: records arrive on the channel as the client reads them;
/// it stops after `expect` distinct sources or `idle` without a record.
pub fn follow(
    broker: &Broker,
    topic: &str,
    expect: usize,
    idle: Duration,
) -> mpsc::Receiver<ReadBack> {
    let mut child = client()
        .args(["consume", "--brokers", &broker.brokers(), "--topic", topic])
        .args(broker.client_args())
        .args(["--expect", &expect.to_string()])
        .args(["--idle", &idle.as_secs_f64().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    });
    rx
}

/// Read `topic` to the end (until `expect` distinct sources or `idle` without a record).
pub fn read_all(broker: &Broker, topic: &str, expect: usize, idle: Duration) -> Vec<ReadBack> {
    follow(broker, topic, expect, idle).iter().collect()
}
