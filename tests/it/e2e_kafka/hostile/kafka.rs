//! Publishing the campaign's records and reading the answers back, with rdkafka: the payloads
//! are arbitrary bytes (the Python client of the other tests writes JSON requests only), and
//! dead letters carry the original payload under its original content type, which need not
//! be what it says.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::cases::Case;

/// Publish every case, case `i` to partition `i % partitions`; where each landed, in order.
pub fn publish(brokers: &str, topic: &str, partitions: i32, cases: &[Case]) -> Vec<(i32, i64)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            // The 1 MB key and headers cases: over the worker's own producer limit, under
            // the broker's.
            .set("message.max.bytes", "1048000")
            .create()
            .unwrap();
        let sends = cases.iter().enumerate().map(|(i, c)| {
            let mut headers = OwnedHeaders::new();
            for (key, value) in &c.headers {
                headers = headers.insert(Header {
                    key,
                    value: Some(value),
                });
            }
            let mut record = FutureRecord::<[u8], [u8]>::to(topic)
                .partition(i as i32 % partitions)
                .headers(headers);
            if let Some(payload) = &c.payload {
                record = record.payload(payload);
            }
            if let Some(key) = &c.key {
                record = record.key(key);
            }
            // The send's queue timeout: all 1,165 records are queued at once (librdkafka's
            // queue takes 100,000 and 1 GiB), so it is never reached; delivery is bounded by
            // message.timeout.ms (300 s).
            producer.send(record, Duration::from_secs(60))
        });
        futures_util::future::join_all(sends)
            .await
            .into_iter()
            .zip(cases)
            .map(|(r, c)| match r {
                Ok(d) => (d.partition, d.offset),
                Err((e, _)) => panic!("publishing {:?} ({}): {e}", c.kind, c.what),
            })
            .collect()
    })
}

/// A record read back: a verdict or a dead letter.
pub struct Rec {
    pub headers: HashMap<String, Vec<u8>>,
    pub payload: Vec<u8>,
}

impl Rec {
    pub fn header(&self, name: &str) -> Option<&str> {
        std::str::from_utf8(self.headers.get(name)?).ok()
    }

    /// The input record this one answers (verdict or dead-letter headers).
    pub fn source(&self) -> Option<(i32, i64)> {
        let get = |a: &str, b: &str| self.header(a).or_else(|| self.header(b))?.parse().ok();
        let p = get("clipqc-source-partition", "__connect.errors.partition")?;
        let o = get("clipqc-source-offset", "__connect.errors.offset")?;
        Some((p as i32, o))
    }
}

/// A consumer of every partition of `topic` from the beginning, by assignment.
fn assigned(brokers: &str, topic: &str, partitions: i32) -> BaseConsumer {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("hostile-reader-{topic}"))
        .set("enable.auto.commit", "false")
        // A verdict of a megabyte must come through whole.
        .set("fetch.max.bytes", "10485760")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    consumer
}

fn rec(m: &BorrowedMessage<'_>) -> Rec {
    let headers = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default();
    Rec {
        headers,
        payload: m.payload().unwrap_or_default().to_vec(),
    }
}

/// Every record of `topic` (all `partitions`, from the beginning) until `want` distinct
/// sources have answers, or nothing came for `idle`: for records still coming.
pub fn read(brokers: &str, topic: &str, partitions: i32, want: usize, idle: Duration) -> Vec<Rec> {
    let consumer = assigned(brokers, topic, partitions);
    let mut out = Vec::new();
    let mut sources = HashSet::new();
    let mut last = Instant::now();
    while sources.len() < want && last.elapsed() < idle {
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m.unwrap_or_else(|e| panic!("reading {topic}: {e}"));
        last = Instant::now();
        let rec = rec(&m);
        if let Some(s) = rec.source() {
            sources.insert(s);
        }
        out.push(rec);
    }
    out
}

/// How many distinct requests `verdicts` answer with an ERROR verdict: the dead letters due.
pub fn error_sources(verdicts: &[Rec]) -> usize {
    verdicts
        .iter()
        .filter(|v| {
            serde_json::from_slice::<serde_json::Value>(&v.payload)
                .is_ok_and(|j| j["outcome"] == "OUTCOME_ERROR")
        })
        .filter_map(Rec::source)
        .collect::<HashSet<_>>()
        .len()
}
