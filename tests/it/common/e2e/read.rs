//! Reading the worker's topics back with the independent client (confluent-kafka,
//! tests/e2e/kafka_client.py): followers that hand records over as they come, reads that stop
//! at a count, an idle bound or each partition's end.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::{client, Broker, Published, Worker, IDLE};

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

/// A [`follow`]er: a receiver of the records the client reads; dropping it ends the client
/// (a test that has what it wanted, or failed, leaves no reader behind to wait out its idle
/// bound against a broker that is gone).
pub struct Follower {
    rx: mpsc::Receiver<ReadBack>,
    child: std::sync::Arc<std::sync::Mutex<Child>>,
}

impl std::ops::Deref for Follower {
    type Target = mpsc::Receiver<ReadBack>;
    fn deref(&self) -> &Self::Target {
        &self.rx
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Follow `topic` in the background: records arrive on the channel as the client reads them;
/// it stops after `expect` distinct sources or `idle` without a record.
pub fn follow(broker: &Broker, topic: &str, expect: usize, idle: Duration) -> Follower {
    follow_with(broker, topic, expect, idle, &[])
}

/// As [`follow`], the client given more librdkafka `properties` (e.g.
/// `isolation.level=read_uncommitted`; it reads committed records only by default).
pub fn follow_with(
    broker: &Broker,
    topic: &str,
    expect: usize,
    idle: Duration,
    properties: &[&str],
) -> Follower {
    let mut child = client()
        .args(["consume", "--brokers", &broker.brokers(), "--topic", topic])
        .args(broker.client_args())
        .args(properties.iter().flat_map(|p| ["--property", p]))
        .args(["--expect", &expect.to_string()])
        .args(["--idle", &idle.as_secs_f64().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let child = std::sync::Arc::new(std::sync::Mutex::new(child));
    let (tx, rx) = mpsc::channel();
    let reaper = child.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                break;
            }
        }
        let mut child = reaper.lock().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    });
    Follower { rx, child }
}

/// The next `n` records of a [`follow`]er; when it stops first (`idle` without a record),
/// panics naming the record that did not come, with the logs of `workers`.
pub fn take(
    records: &mpsc::Receiver<ReadBack>,
    n: usize,
    idle: Duration,
    workers: &[&Worker],
) -> Vec<ReadBack> {
    (0..n)
        .map(|i| {
            records.recv().unwrap_or_else(|_| {
                let logs: Vec<String> = workers.iter().map(|w| w.log_tail()).collect();
                panic!(
                    "record {} of {n}: none for {idle:?}\n{}",
                    i + 1,
                    logs.join("\n")
                )
            })
        })
        .collect()
}

/// Where the broker put the bad requests of `published`.
pub fn bad(published: &[Published]) -> std::collections::HashSet<(i32, i64)> {
    published
        .iter()
        .filter(|p| p.bad)
        .map(|p| (p.partition, p.offset))
        .collect()
}

/// Every record of `topic` up to its end as the client finds it when the read starts
/// (`--to-end`: each partition's end of file; for a reader of committed records, the last
/// stable offset), given `properties`; for a topic nothing writes to any more, so duplicates
/// after the last distinct source are counted too. `IDLE` bounds a read that never ends.
pub fn read_to_end(broker: &Broker, topic: &str, properties: &[&str]) -> Vec<ReadBack> {
    let mut child = client()
        .args([
            "consume",
            "--to-end",
            "--brokers",
            &broker.brokers(),
            "--topic",
            topic,
        ])
        .args(broker.client_args())
        .args(properties.iter().flat_map(|p| ["--property", p]))
        .args(["--idle", &IDLE.as_secs_f64().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let records = out
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    assert!(
        child.wait().unwrap().success(),
        "kafka_client.py consume --to-end {topic}"
    );
    records
}

/// Read `topic` to the end (until `expect` distinct sources or `idle` without a record).
pub fn read_all(broker: &Broker, topic: &str, expect: usize, idle: Duration) -> Vec<ReadBack> {
    follow(broker, topic, expect, idle).iter().collect()
}
