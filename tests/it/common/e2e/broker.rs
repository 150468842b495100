//! The broker of the end-to-end tests: Apache Kafka itself, one node in KRaft mode
//! (`scripts/kafka.sh`: its jars from Maven Central, resolved into the cache once), a process
//! of its own that a test can stop (SIGSTOP), resume and kill.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::tail;

/// `scripts/kafka.sh`: resolves Apache Kafka's jars into the cache once, starts and stops a
/// single-node KRaft broker, runs Kafka's own tools.
pub fn kafka_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka.sh")
}

/// An Apache Kafka broker (KRaft, broker and controller in one process, `scripts/kafka.sh`)
/// with its store in a folder; killed on drop (SIGKILL: nothing of a test's broker needs to
/// outlive it, and a controlled shutdown costs seconds).
pub struct Broker {
    pid: u32,
    /// Where clients connect (127.0.0.1).
    pub port: u16,
    /// librdkafka properties the test's own clients need: the security settings of a broker
    /// that requires a login or TLS ([`Broker::start_in`]); none for a plain one.
    pub client_properties: Vec<(String, String)>,
    /// The broker's folder: its store, `server.properties`, `broker.log`.
    pub dir: PathBuf,
    /// A plaintext listener on loopback without a login (setup: topics; Kafka's tools).
    internal: String,
    _dir: Option<tempfile::TempDir>,
}

impl Broker {
    /// A plain broker (no login, no TLS) in a temporary folder.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut broker = Self::start_in(dir.path(), None, &[], Vec::new());
        broker._dir = Some(dir);
        broker
    }

    /// A broker in `dir` (started again in the same folder, it keeps its topics, offsets and
    /// users), on `port` (default: a free one), started with `kafka.sh start` options `args`,
    /// to be reached with `client_properties`.
    pub fn start_in(
        dir: &Path,
        port: Option<u16>,
        args: &[&str],
        client_properties: Vec<(String, String)>,
    ) -> Self {
        let mut cmd = Command::new(kafka_sh());
        cmd.arg("start").arg(dir);
        if let Some(port) = port {
            cmd.args(["--port", &port.to_string()]);
        }
        let out = cmd
            .args(args)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", kafka_sh().display()));
        assert!(
            out.status.success(),
            "kafka.sh start {} failed; its log: {}",
            dir.display(),
            tail(&dir.join("broker.log"), 30)
        );
        let bootstrap = String::from_utf8(out.stdout).unwrap();
        let port = bootstrap
            .trim()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        Self {
            pid: read("kafka.pid").trim().parse().unwrap(),
            port,
            client_properties,
            dir: dir.to_path_buf(),
            internal: read("internal").trim().to_string(),
            _dir: None,
        }
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker process's id (the tests stop, resume and kill it).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `signal` (SIGSTOP, SIGCONT, SIGKILL …) to the broker process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {}", self.pid);
    }

    /// Creates `name` with `partitions` partitions and one replica (through the internal
    /// listener, so a broker that requires a login takes it too), and waits until the broker
    /// serves it.
    pub fn create_topic(&self, name: &str, partitions: u32) {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        use rdkafka::client::DefaultClientContext;
        let admin: AdminClient<DefaultClientContext> = rdkafka::config::ClientConfig::new()
            .set("bootstrap.servers", &self.internal)
            .create()
            .unwrap();
        let topic = NewTopic::new(name, partitions as i32, TopicReplication::Fixed(1));
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let results = runtime
            .block_on(admin.create_topics([&topic], &options))
            .unwrap_or_else(|e| panic!("create topic {name}: {e}"));
        for r in results {
            if let Err((topic, code)) = r {
                panic!("create topic {topic}: {code}");
            }
        }
    }

    /// `--property K=V` for each of [`Broker::client_properties`] (tests/e2e/kafka_client.py).
    pub(super) fn client_args(&self) -> Vec<String> {
        self.client_properties
            .iter()
            .flat_map(|(k, v)| ["--property".to_string(), format!("{k}={v}")])
            .collect()
    }

    /// One of Kafka's command-line tools against this broker (`kafka.sh tool`): its stdout.
    pub fn tool(&self, class: &str, args: &[&str]) -> String {
        let out = Command::new(kafka_sh())
            .args(["tool"])
            .arg(&self.dir)
            .arg(class)
            .args(args)
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kafka.sh tool {class} {args:?} failed"
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // Resumed first: a stopped process takes SIGKILL too, but one a test left stopped
        // should not linger for a moment as a frozen listener.
        let _ = Command::new("kill")
            .args(["-CONT", &self.pid.to_string()])
            .status();
        let _ = Command::new("kill")
            .args(["-KILL", &self.pid.to_string()])
            .status();
        // Gone before the next test's broker starts (its memory, its ports).
        for _ in 0..100 {
            if !Path::new(&format!("/proc/{}", self.pid)).exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
