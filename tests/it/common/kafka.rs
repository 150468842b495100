//! Kafka helpers of the in-process pipeline tests: a mock cluster with the worker's topics,
//! the worker's dependencies, models for it, a running pipeline, publishing, reading verdicts
//! back, the group's committed offsets.
//!
//! The bounds of the waits here, and where their numbers come from:
//! - [`PATIENCE`], the longest a test waits for the next verdict of a running worker;
//! - [`QUEUE_ROOM`], how long a send may wait for room in the producer's queue;
//! - [`REQUEST`], one request to the mock broker;
//! - [`READ_TO_END`], reading a topic to its end by assignment.

use std::sync::Arc;
use std::time::Duration;

use clipqc::config::Settings;
use clipqc::model::fake::FakeBackend;
use clipqc::model::tch_backend::TchBackend;
use clipqc::model::{Artifact, DeviceSpec, ModelHandle, ModelOwner};
use clipqc::pipeline::{self, Deps, RunError, RunStats};
use clipqc::proto::v1::{inspection_request::Image, InspectionRequest, Verdict};
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message as _, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

pub const PARTITIONS: i32 = 3;

/// The longest a test waits for the next verdict (or dead letter) of a running in-process
/// worker before it calls the wait a stall. Before the first one: the mock coordinator's first
/// join, 3 s (the mock's `group.initial.rebalance.delay.ms`), for the worker's group and again
/// for the reader's; between two, one record's work (the tiny model or the fake: well under a
/// second). 60 s is ten times the first wait, for a 2-core machine running two tests beside
/// librdkafka's threads: running out is a stall, not a slow machine.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// `FutureProducer::send`'s queue timeout: how long a send may wait for room in the producer's
/// local queue (100 000 records by default). The tests publish at most a few hundred records,
/// so it is never reached; the delivery itself is bounded by librdkafka's
/// `message.timeout.ms` (300 s).
pub const QUEUE_ROOM: Duration = Duration::from_secs(5);

/// One request to the in-process mock broker (watermarks, committed offsets), the client's
/// connection and the coordinator lookup included: milliseconds; 30 s is librdkafka's own
/// `request.timeout.ms`, a bound on a hung request.
pub const REQUEST: Duration = Duration::from_secs(30);

/// Reading a topic to its end by assignment (no group to join): a few hundred records from the
/// mock broker in the same process, milliseconds; 20 s is a bound on a hung read.
pub const READ_TO_END: Duration = Duration::from_secs(20);

/// A consumer of `topic` from the start, in a group of its own.
pub fn reader(brokers: &str, topic: &str) -> StreamConsumer {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{topic}"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    c.subscribe(&[topic]).unwrap();
    c
}

pub fn file_uri(p: &std::path::Path) -> String {
    format!("file://{}", p.canonicalize().unwrap().display())
}

/// The drain the tests' stops wait for: at most `max_in_flight` (16) records of the tiny or the
/// fake model, a second or two; 10 s bounds it without cutting it short.
const DRAIN_MS: u64 = 10_000;

pub fn deps(settings: &Settings, brokers: &str, artifact: &Artifact, model: &ModelHandle) -> Deps {
    let profiles = tokio::task::block_in_place(|| {
        clipqc::pipeline::build::load_profiles(settings, artifact, model)
    })
    .unwrap();
    let readiness = std::sync::Arc::new(clipqc::http::Readiness::default());
    let mut deps =
        clipqc::pipeline::build::deps(settings, brokers, artifact, model, profiles, readiness)
            .unwrap();
    deps.pipeline.max_in_flight = 16;
    deps.pipeline.drain_timeout_ms = DRAIN_MS;
    deps
}

/// A mock cluster with the three topics, and default settings for consumer group `group`.
pub fn cluster(
    group: &str,
) -> (
    MockCluster<'static, DefaultProducerContext>,
    Settings,
    String,
) {
    let mock = MockCluster::new(1).unwrap();
    let mut settings = Settings::load_with_env(None, []).unwrap();
    settings.kafka.group_id = group.into();
    for t in ["clipqc.requests", "clipqc.verdicts", "clipqc.dlq"] {
        mock.create_topic(t, PARTITIONS, 1).unwrap();
    }
    let brokers = mock.bootstrap_servers();
    (mock, settings, brokers)
}

/// A producer to `brokers`.
pub fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap()
}

/// Send one record to `clipqc.requests` and wait for its delivery.
pub async fn send(
    producer: &FutureProducer,
    key: Option<&str>,
    payload: &[u8],
    headers: Option<OwnedHeaders>,
) {
    let mut record = FutureRecord::<str, [u8]>::to("clipqc.requests").payload(payload);
    if let Some(key) = key {
        record = record.key(key);
    }
    if let Some(headers) = headers {
        record = record.headers(headers);
    }
    producer.send(record, QUEUE_ROOM).await.unwrap();
}

/// Publish `requests` as protobuf records, in order; each keyed by its request id when
/// `keyed` (else librdkafka's partitioner places them).
pub async fn publish_requests(brokers: &str, requests: &[InspectionRequest], keyed: bool) {
    let producer = producer(brokers);
    for r in requests {
        let key = keyed.then_some(r.request_id.as_str());
        send(&producer, key, &r.encode_to_vec(), None).await;
    }
}

/// A request for the inline image `bytes`.
pub fn inline_request(id: &str, bytes: &[u8]) -> InspectionRequest {
    InspectionRequest {
        request_id: id.into(),
        image: Some(Image::InlineData(bytes.to_vec())),
        ..Default::default()
    }
}

/// Publish `n` protobuf requests with the same inline JPEG.
pub async fn publish_inline(brokers: &str, prefix: &str, n: usize) {
    let jpeg = std::fs::read(super::fixtures().join("images/part_250.jpg")).unwrap();
    let requests: Vec<_> = (0..n)
        .map(|i| inline_request(&format!("{prefix}-{i}"), &jpeg))
        .collect();
    publish_requests(brokers, &requests, false).await;
}

/// The tiny CLIP ([`super::tiny_model`]) on the CPU, on its model thread.
pub fn tiny_clip(artifact: &Artifact) -> (ModelOwner, ModelHandle) {
    let artifact = artifact.clone();
    ModelOwner::spawn(move || TchBackend::load(&artifact, DeviceSpec::Cpu), 2).unwrap()
}

/// The fake backend, as `tune` sets it, on its model thread.
pub fn fake_model(
    tune: impl FnOnce(&mut FakeBackend) + Send + 'static,
) -> (ModelOwner, ModelHandle) {
    ModelOwner::spawn(
        move || {
            let mut fake = FakeBackend::new(32, 224);
            tune(&mut fake);
            Ok(fake)
        },
        2,
    )
    .unwrap()
}

/// The fake backend taking `delay` per batch.
pub fn slow_model(delay: Duration) -> (ModelOwner, ModelHandle) {
    fake_model(move |fake| fake.delay = delay)
}

/// The fake backend holding each image batch at `gate` until the test lets it through.
pub fn gated_model(gate: clipqc::model::fake::Gate) -> (ModelOwner, ModelHandle) {
    fake_model(move |fake| fake.gate = Some(gate))
}

/// A pipeline running on a task of its own, until [`Running::stop`] or it stops by itself.
pub struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<RunStats, RunError>>,
    probe: Arc<pipeline::Probe>,
}

impl Running {
    pub fn start(deps: Deps) -> Self {
        let probe = deps.probe.clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(pipeline::run(deps, shutdown.clone()));
        Self {
            shutdown,
            task,
            probe,
        }
    }

    /// Where each record in flight is and librdkafka's view of the consumer: for the message
    /// of a wait that ran out.
    pub fn state(&self) -> pipeline::Snapshot {
        self.probe.snapshot()
    }

    /// Signal the shutdown without waiting for it (then [`Running::stop`]).
    pub fn cancel(&self) {
        self.shutdown.cancel();
    }

    /// Shut it down (the drain included) and return how the run ended.
    pub async fn stop(self) -> Result<RunStats, RunError> {
        self.shutdown.cancel();
        self.task.await.unwrap()
    }

    /// Wait for the run to stop by itself, for at most `within` (`why`: the bound's reason,
    /// for the message when it runs out); how it ended.
    pub async fn ended(self, within: Duration, why: &str) -> Result<RunStats, RunError> {
        let state = self.probe.clone();
        match tokio::time::timeout(within, self.task).await {
            Ok(ended) => ended.unwrap(),
            Err(_) => panic!(
                "the worker did not stop by itself within {within:?} ({why}); {}",
                state.snapshot()
            ),
        }
    }

    /// The next record `reader` gets (a Kafka error is returned, not a stall), waiting at most
    /// `within` (`what`: what is awaited, for the message when it runs out, which carries the
    /// pipeline's state).
    pub async fn next_within<'c>(
        &self,
        reader: &'c StreamConsumer,
        within: Duration,
        what: &str,
    ) -> KafkaResult<BorrowedMessage<'c>> {
        match tokio::time::timeout(within, clipqc::source::recv(reader)).await {
            Ok(got) => got,
            Err(_) => panic!("no {what} within {within:?}; {}", self.state()),
        }
    }

    /// The next record of `reader`, within [`PATIENCE`].
    pub async fn next<'c>(&self, reader: &'c StreamConsumer, what: &str) -> BorrowedMessage<'c> {
        self.next_within(reader, PATIENCE, what)
            .await
            .unwrap_or_else(|e| panic!("reading the {what}: {e}"))
    }

    /// The next verdict of `reader`, within [`PATIENCE`].
    pub async fn next_verdict(&self, reader: &StreamConsumer) -> Verdict {
        let msg = self.next(reader, "verdict").await;
        Verdict::decode(msg.payload().unwrap()).unwrap()
    }
}

/// The group's committed position on every input partition (0 where nothing is committed).
pub fn committed(brokers: &str, group: &str) -> std::collections::BTreeMap<i32, i64> {
    super::committed_positions(brokers, group, "clipqc.requests", PARTITIONS)
}

/// The sum of the group's committed positions: the number of records it has finished.
pub fn committed_total(brokers: &str, group: &str) -> i64 {
    committed(brokers, group).values().sum()
}

/// Every record of `topic` from the beginning to the high watermark, read by assignment (no
/// group), payloads decoded with `decode`: what the broker holds, independent of any reader.
/// Panics when the end is not reached within [`READ_TO_END`], saying how far it got.
pub fn read_all<T>(brokers: &str, topic: &str, decode: impl Fn(&[u8]) -> T) -> Vec<(i32, i64, T)> {
    read_all_records(brokers, topic)
        .into_iter()
        .map(|m| {
            let decoded = decode(m.payload().unwrap_or_default());
            (m.partition(), m.offset(), decoded)
        })
        .collect()
}

/// As [`read_all`], the records whole (key and headers too).
pub fn read_all_records(brokers: &str, topic: &str) -> Vec<rdkafka::message::OwnedMessage> {
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::{Offset, TopicPartitionList};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "read-all")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_uncommitted")
        .create()
        .unwrap();
    let ends = ends(brokers, topic);
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    // The consumer's position, not the last record read: it moves past the transactions'
    // control records too, which are never returned.
    let positions = |c: &BaseConsumer| -> std::collections::BTreeMap<i32, i64> {
        c.position()
            .unwrap()
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => (e.partition(), o),
                _ => (e.partition(), 0),
            })
            .collect()
    };
    let done = |at: &std::collections::BTreeMap<i32, i64>| {
        ends.iter()
            .all(|(p, &end)| end == 0 || at.get(p).is_some_and(|&o| o >= end))
    };
    let deadline = std::time::Instant::now() + READ_TO_END;
    loop {
        let at = positions(&c);
        if done(&at) {
            return out;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reading {topic} to its end {ends:?} took over {READ_TO_END:?}: at {at:?}, {} records",
            out.len()
        );
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            out.push(m.detach());
        }
    }
}

/// The high watermark of each partition of `topic`.
pub fn ends(brokers: &str, topic: &str) -> std::collections::BTreeMap<i32, i64> {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    (0..PARTITIONS)
        .map(|p| {
            let (_, high) = c.fetch_watermarks(topic, p, REQUEST).unwrap();
            (p, high)
        })
        .collect()
}

/// The size of the key, and of the headers in all, of [`publish_megabyte_key_and_headers`]'s
/// records: over the producer's default `message.max.bytes` (1,000,000) by themselves.
pub const MEGABYTE: usize = 1 << 20;

/// Two bad records (payloads that are not requests) whose dead letters are too large even
/// without their payload: one with a 1 MiB key, one with 1 MiB of headers (16 of 64 KiB) and
/// a small `x-keep` header. Sent by a producer allowed 4 MB records, as a camera's might be.
pub async fn publish_megabyte_key_and_headers(brokers: &str) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.max.bytes", "4000000")
        .create()
        .unwrap();
    let key = "k".repeat(MEGABYTE);
    send(&producer, Some(&key), b"\x01not a request: big key", None).await;
    let mut headers = OwnedHeaders::new().insert(rdkafka::message::Header {
        key: "x-keep",
        value: Some("yes"),
    });
    let value = vec![b'h'; MEGABYTE / 16];
    for i in 0..16 {
        headers = headers.insert(rdkafka::message::Header {
            key: &format!("x-bulk-{i}"),
            value: Some(&value),
        });
    }
    send(
        &producer,
        None,
        b"\x01not a request: big headers",
        Some(headers),
    )
    .await;
}

/// The dead letters of [`publish_megabyte_key_and_headers`]'s records are on `clipqc.dlq`,
/// trimmed and saying what was cut: the key to 1 KiB (`clipqc-key-truncated`: its size), the
/// 16 bulky headers left out (`clipqc-headers-dropped`), the small one kept; no payload.
pub fn assert_trimmed_dead_letters(brokers: &str) {
    let dead = read_all_records(brokers, "clipqc.dlq");
    let header = |m: &rdkafka::message::OwnedMessage, name: &str| -> Option<String> {
        use rdkafka::message::Headers;
        m.headers()?
            .iter()
            .find(|h| h.key == name)
            .map(|h| String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())
    };
    let keyed: Vec<_> = dead
        .iter()
        .filter(|m| header(m, "clipqc-key-truncated").is_some())
        .collect();
    assert_eq!(keyed.len(), 1, "one dead letter with its key cut");
    let m = keyed[0];
    assert_eq!(
        header(m, "clipqc-key-truncated").as_deref(),
        Some(MEGABYTE.to_string().as_str())
    );
    assert_eq!(m.key().map(<[u8]>::len), Some(1024));
    assert_eq!(m.payload().map_or(0, <[u8]>::len), 0);
    assert!(header(m, "clipqc-payload-dropped").is_some());
    let bulky: Vec<_> = dead
        .iter()
        .filter(|m| header(m, "clipqc-headers-dropped").is_some())
        .collect();
    assert_eq!(bulky.len(), 1, "one dead letter with headers left out");
    let m = bulky[0];
    assert_eq!(header(m, "clipqc-headers-dropped").as_deref(), Some("16"));
    assert_eq!(header(m, "x-keep").as_deref(), Some("yes"));
    assert!(header(m, "x-bulk-0").is_none());
    assert_eq!(
        header(m, "__connect.errors.class.name").as_deref(),
        Some("INVALID_REQUEST")
    );
    assert_eq!(m.payload().map_or(0, <[u8]>::len), 0);
}
