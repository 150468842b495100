//! End-to-end harness: a real broker process (Apache Kafka, `scripts/kafka.sh`), the worker binary as a process of
//! its own (so it can be killed), an HTTP server with the part images, and an independent
//! Kafka client (confluent-kafka from PyPI, tests/e2e/kafka_client.py).
//!
//! The bounds of the waits here, and where their numbers come from: [`LISTEN_WITHIN`] (a
//! server process listens), [`START_WITHIN`] (a worker process is ready), [`STOP_WITHIN`] (a
//! worker drains and exits on SIGTERM), [`IDLE`] (the Python client reads on without a record).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

/// A server process a test starts (moto, Prometheus, Alertmanager) listens within a
/// second or two of its start on an idle machine; a minute is room for a loaded 2-core one.
pub const LISTEN_WITHIN: Duration = Duration::from_secs(60);

/// A worker process gets ready (`/readyz` 200) once it has loaded and warmed up the tiny model
/// (seconds; a debug build on a loaded 2-core machine, up to half a minute), passed its brokers'
/// check (bounded by the worker at 60 s, answered at once by a live broker) and joined its
/// group (one join round: seconds). Two minutes is twice the worst of that.
pub const START_WITHIN: Duration = Duration::from_secs(120);

/// A worker's own bounds after SIGTERM: the drain (`pipeline.drain_timeout_ms`, 15 s in the
/// config [`Worker`] writes), 5 s for records that overran it, the producer's flush (10 s),
/// then the final commit and leaving the group (a round trip each). A minute is twice their
/// sum; a worker that exits as it should takes a second or two.
pub const STOP_WITHIN: Duration = Duration::from_secs(60);

/// How long the Python client reads on without a record before it stops: it joins a group of
/// its own first (one join round: seconds), then takes records that are on the topic
/// already or come from a running worker, the next within a second or two of the last. A
/// minute without one is a stall, not a slow machine; a read that ends on a count (`expect`)
/// stops as soon as it has it, so the bound costs nothing when all is well.
pub const IDLE: Duration = Duration::from_secs(60);

/// Waits until something listens on `port` (`what`: the server), within [`LISTEN_WITHIN`].
pub fn wait_for_port(port: u16, what: &str) {
    super::wait_for(
        &format!("{what} to listen on port {port}"),
        LISTEN_WITHIN,
        || match TcpStream::connect(("127.0.0.1", port)) {
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        },
    )
}

mod broker;
mod read;
pub use broker::*;
pub use read::*;

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

/// How a [`Worker`] is to be started: [`Worker::named`], the options, then [`Start::start`].
pub struct Start<'a> {
    broker: &'a Broker,
    topics: &'a Topics,
    name: &'a str,
    dir: &'a Path,
    static_member: bool,
    /// Its `kafka.instance_id` when not its name.
    instance: Option<&'a str>,
    /// `kafka.group_protocol`.
    protocol: &'a str,
    config: String,
    env: Vec<(&'a str, String)>,
}

impl<'a> Start<'a> {
    /// A dynamic member of its group: a leaving member says so and the broker rebalances at once.
    pub fn dynamic(mut self) -> Self {
        self.static_member = false;
        self
    }

    /// A static member with instance id `id` (its config and log still named after it): a
    /// second process standing in for one that is stopped, not dead (a zombie).
    pub fn instance(mut self, id: &'a str) -> Self {
        self.instance = Some(id);
        self
    }

    /// `kafka.group_protocol` (`classic`, the default, or `consumer`: KIP-848).
    pub fn group_protocol(mut self, protocol: &'a str) -> Self {
        self.protocol = protocol;
        self
    }

    /// `toml` (whole sections) appended to the config.
    pub fn config(mut self, toml: &str) -> Self {
        self.config.push_str(toml);
        self
    }

    /// `CLIPQC__…` variables in the worker's environment: they override keys of sections the
    /// config file already has (`[fetch]`, `[pipeline]`).
    pub fn env(mut self, vars: &[(&'a str, String)]) -> Self {
        self.env.extend(vars.iter().cloned());
        self
    }

    pub fn start(self) -> Worker {
        let name = self.name;
        // A static member's session must outlast its restart, or the broker drops it between
        // the kill and the rejoin (KIP-345). The restart here is a process start, the model's
        // load and a join: on tansu 0.6.0 (the broker of these tests before Apache Kafka),
        // with its 3 s pauses on a static member's join and sync, a 10 s session ran out under
        // load, and the rejoined worker waited for ever (the crash test's STUCK). So static
        // members keep librdkafka's default, 45 s, as the worker does; dynamic ones 10 s (a
        // leaving member says so, and nothing waits for its session). KIP-848's protocol takes
        // the session from the broker (kafka.sh: 10 s) and refuses the client's setting.
        let (membership, session_ms) = if self.static_member {
            (
                format!("instance_id = \"{}\"", self.instance.unwrap_or(name)),
                45_000,
            )
        } else {
            (String::new(), 10_000)
        };
        let config = self.dir.join(format!("{name}.toml"));
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
group_protocol = "{protocol}"
[kafka.properties]
{session}

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
                brokers = self.broker.brokers(),
                protocol = self.protocol,
                session = if self.protocol == "classic" {
                    format!("\"session.timeout.ms\" = \"{session_ms}\"")
                } else {
                    String::new()
                },
                group = self.topics.group,
                requests = self.topics.requests,
                verdicts = self.topics.verdicts,
                dlq = self.topics.dlq,
                model = super::tiny_model().display(),
                extra = self.config,
            ),
        )
        .unwrap();
        let log = self.dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_clipqc"))
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Worker { child, log }
    }
}

impl Worker {
    /// A worker named `name` (its config `dir/NAME.toml`, its log `dir/NAME.log`), a static
    /// member of the group of `topics` (the name is its `group.instance.id`) unless
    /// [`Start::dynamic`].
    pub fn named<'a>(
        broker: &'a Broker,
        topics: &'a Topics,
        name: &'a str,
        dir: &'a Path,
    ) -> Start<'a> {
        Start {
            broker,
            topics,
            name,
            dir,
            static_member: true,
            instance: None,
            protocol: "classic",
            config: String::new(),
            env: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no drain, no commit, no goodbye to the group.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then wait (within [`STOP_WITHIN`]) for the drain and the exit; returns whether
    /// it exited cleanly in time.
    pub fn terminate(mut self) -> bool {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        match self.wait_exit(STOP_WITHIN) {
            Some(status) => status.success(),
            None => {
                let _ = self.child.kill();
                false
            }
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

    /// The worker must stop by itself, within `within` (`why`: where that bound comes from),
    /// with a failure and an `error: …` line in its log; returns that line.
    pub fn refused(mut self, within: Duration, why: &str) -> String {
        let status = self.wait_exit(within).unwrap_or_else(|| {
            panic!(
                "the worker went on for {within:?} ({why})\n{}",
                self.log_tail()
            )
        });
        assert!(!status.success(), "{status:?}\n{}", self.log_tail());
        self.log_text()
            .lines()
            .rfind(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("no error line\n{}", self.log_tail()))
            .to_string()
    }

    /// The address of the worker's `/metrics` endpoint, from its log (`http.listen` port 0):
    /// logged once the model is loaded and warmed up, within [`START_WITHIN`].
    pub fn http_addr(&self) -> String {
        super::wait_for("the worker's http address in its log", START_WITHIN, || {
            self.log_text()
                .lines()
                .filter(|l| l.contains("serving /metrics"))
                .filter_map(|l| l.split("addr=").nth(1))
                .filter_map(|rest| rest.split_whitespace().next())
                .next_back()
                .map(str::to_string)
                .ok_or_else(|| self.log_tail())
        })
    }

    /// GET `path` of the worker's HTTP endpoint: (status, body); (0, the error) when it cannot
    /// be reached.
    pub fn get(&self, path: &str) -> (u16, String) {
        match reqwest::blocking::get(format!("http://{}{path}", self.http_addr())) {
            Ok(r) => (r.status().as_u16(), r.text().unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    }

    /// The worker's `/metrics` text.
    pub fn metrics(&self) -> String {
        let (status, text) = self.get("/metrics");
        assert_eq!(status, 200, "/metrics: {text}");
        text
    }

    /// Waits for `/readyz` to answer 200, within [`START_WITHIN`].
    pub fn wait_ready(&self) {
        super::wait_for("the worker to be ready", START_WITHIN, || {
            match self.get("/readyz") {
                (200, _) => Ok(()),
                (status, body) => Err(format!("{status} {body}\n{}", self.log_tail())),
            }
        })
    }

    /// Waits until metric `name` (the sum of its series with `labels`) is at least `at_least`,
    /// within `within`; returns its value.
    pub fn wait_for_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        at_least: f64,
        within: Duration,
    ) -> f64 {
        let what = format!("{name}{labels:?} >= {at_least}");
        super::wait_for(&what, within, || {
            let value = super::metric(&self.metrics(), name, labels);
            if value >= at_least {
                Ok(value)
            } else {
                Err(format!("{value}\n{}", self.log_tail()))
            }
        })
    }

    /// Waits until the worker's log has a line containing `needle`, within `within`.
    pub fn wait_for_log(&self, needle: &str, within: Duration) {
        super::wait_for(&format!("{needle:?} in the log"), within, || {
            if self.log_text().contains(needle) {
                Ok(())
            } else {
                Err(self.log_tail())
            }
        })
    }

    /// The whole log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log, 40)
    }

    /// A copy of the whole log that outlives the test's folder (`clipqc-NAME.log` in the
    /// system's temporary folder), for the post-mortem of a failure: a tail is rarely enough.
    /// Its path, for the failure message.
    pub fn keep_log(&self, name: &str) -> PathBuf {
        let keep = std::env::temp_dir().join(format!("clipqc-{name}.log"));
        let _ = std::fs::copy(&self.log, &keep);
        keep
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

/// What an end-to-end test starts with: its turn ([`serial`]), a broker, the worker's topics,
/// the fixtures' images served over HTTP, and a folder for configs and logs. Dropped in this
/// order (the broker first, the turn last); workers made after it are dropped before it.
pub struct E2e {
    pub broker: Broker,
    pub topics: Topics,
    pub images: ImageServer,
    pub dir: tempfile::TempDir,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl E2e {
    /// A broker with topics named after `name`, `partitions` of requests.
    pub fn start(name: &str, partitions: u32) -> Self {
        Self::start_on(Broker::start, name, partitions)
    }

    /// As [`E2e::start`], on the broker `broker` starts.
    pub fn start_on(broker: impl FnOnce() -> Broker, name: &str, partitions: u32) -> Self {
        let turn = serial();
        let broker = broker();
        let topics = Topics::create(&broker, name, partitions);
        Self {
            images: ImageServer::start(&super::fixtures().join("images")),
            dir: tempfile::tempdir().unwrap(),
            broker,
            topics,
            _turn: turn,
        }
    }

    /// A worker of this test's group, named `name`: see [`Worker::named`].
    pub fn worker<'a>(&'a self, name: &'a str) -> Start<'a> {
        Worker::named(&self.broker, &self.topics, name, self.dir.path())
    }

    /// The URL of the fixtures' 250×250 part photo.
    pub fn part_url(&self) -> String {
        self.images.url("part_250.jpg")
    }

    /// Publish `count` requests for the part photo to the requests topic (every `bad_every`-th
    /// names a missing image); see [`produce`].
    pub fn produce(&self, count: usize, bad_every: usize) -> Vec<Published> {
        produce(
            &self.broker,
            &self.topics.requests,
            count,
            &self.part_url(),
            bad_every,
        )
    }

    /// The group's committed position per input partition, read with rdkafka.
    pub fn committed(&self, partitions: i32) -> std::collections::HashMap<i32, i64> {
        super::committed_positions(
            &self.broker.brokers(),
            &self.topics.group,
            &self.topics.requests,
            partitions,
        )
        .into_iter()
        .collect()
    }
}
