//! Kafka helpers of the in-process pipeline tests: a mock cluster with the worker's topics,
//! the worker's dependencies, a reader, publishing, the group's committed offsets.

use std::time::Duration;

use clipqc::config::Settings;
use clipqc::model::Artifact;
use clipqc::model::ModelOwner;
use clipqc::pipeline::Deps;
use clipqc::proto::v1::{inspection_request::Image, InspectionRequest};
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};

pub const PARTITIONS: i32 = 3;

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

pub fn deps(
    settings: &Settings,
    brokers: &str,
    artifact: &Artifact,
    model: &clipqc::model::ModelHandle,
) -> Deps {
    let profiles = tokio::task::block_in_place(|| {
        clipqc::pipeline::build::load_profiles(settings, artifact, model)
    })
    .unwrap();
    let readiness = std::sync::Arc::new(clipqc::http::Readiness::default());
    let mut deps =
        clipqc::pipeline::build::deps(settings, brokers, artifact, model, profiles, readiness)
            .unwrap();
    deps.pipeline.max_in_flight = 16;
    deps.pipeline.drain_timeout_ms = 10_000;
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

/// Publish `n` protobuf requests with the same inline JPEG.
pub async fn publish_inline(brokers: &str, prefix: &str, n: usize) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let jpeg = std::fs::read(super::fixtures().join("images/part_250.jpg")).unwrap();
    for i in 0..n {
        let r = InspectionRequest {
            request_id: format!("{prefix}-{i}"),
            image: Some(Image::InlineData(jpeg.clone())),
            ..Default::default()
        };
        let payload = r.encode_to_vec();
        let record = FutureRecord::<(), _>::to("clipqc.requests").payload(&payload);
        producer.send(record, Duration::from_secs(5)).await.unwrap();
    }
}

/// The fake backend taking `delay` per batch, on its model thread.
pub fn slow_model(delay: Duration) -> (ModelOwner, clipqc::model::ModelHandle) {
    ModelOwner::spawn(
        move || {
            let mut fake = clipqc::model::fake::FakeBackend::new(32, 224);
            fake.delay = delay;
            Ok(fake)
        },
        2,
    )
    .unwrap()
}

/// The fake backend holding each image batch at `gate` until the test lets it through.
pub fn gated_model(gate: clipqc::model::fake::Gate) -> (ModelOwner, clipqc::model::ModelHandle) {
    ModelOwner::spawn(
        move || {
            let mut fake = clipqc::model::fake::FakeBackend::new(32, 224);
            fake.gate = Some(gate);
            Ok(fake)
        },
        2,
    )
    .unwrap()
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
pub fn read_all<T>(brokers: &str, topic: &str, decode: impl Fn(&[u8]) -> T) -> Vec<(i32, i64, T)> {
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::message::Message as _;
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
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let done = |out: &Vec<(i32, i64, T)>| {
        ends.iter()
            .all(|(&p, &end)| end == 0 || out.iter().any(|(q, o, _)| *q == p && *o == end - 1))
    };
    while !done(&out) && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            out.push((
                m.partition(),
                m.offset(),
                decode(m.payload().unwrap_or_default()),
            ));
        }
    }
    out
}

/// The high watermark of each partition of `topic`.
pub fn ends(brokers: &str, topic: &str) -> std::collections::BTreeMap<i32, i64> {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    (0..PARTITIONS)
        .map(|p| {
            let (_, high) = c
                .fetch_watermarks(topic, p, Duration::from_secs(5))
                .unwrap();
            (p, high)
        })
        .collect()
}
