//! The exemplar topic's catch-up on Apache Kafka, where a partition's offsets are not one per
//! record: records deleted by retention or DeleteRecords leave the partition starting past 0,
//! and a transaction's commit marker takes an offset no record is read at. The catch-up used
//! to wait for a record at every offset up to the end, never finished, and the worker refused
//! to start after 120 s (at a rollout, the whole fleet). It now reads from the low watermark
//! to the end by the consumer's position.

use std::time::Duration;

use clipqc::exemplars::follow::{cleanup_policy, read_to_end};
use clipqc::kafka::KafkaSettings;
use clipqc::proto::v1::Exemplar;
use prost::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::producer::BaseRecord;
use rdkafka::{Offset, TopicPartitionList};

use super::common::e2e::Broker;

/// Well past a catch-up of a few records (milliseconds); the old reader waited all of it.
const READ_WITHIN: Duration = Duration::from_secs(30);

fn settings(topic: &str) -> KafkaSettings {
    KafkaSettings {
        exemplar_topic: topic.into(),
        group_id: "exemplar-topic-test".into(),
        ..KafkaSettings::default()
    }
}

fn exemplar(id: &str) -> Vec<u8> {
    Exemplar {
        id: id.into(),
        profile: "default".into(),
        class: "good".into(),
        embedding: vec![1.0, 0.0],
        dim: 2,
        model_hash: "m".into(),
        ..Default::default()
    }
    .encode_to_vec()
}

/// `ids` as records of `topic`, in a transaction when `transactional` (its commit marker
/// then ends the partition).
fn produce(brokers: &str, topic: &str, ids: &[&str], transactional: bool) {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers);
    if transactional {
        cfg.set("transactional.id", format!("{topic}-writer"));
    }
    let p: BaseProducer = cfg.create().unwrap();
    let t = Duration::from_secs(30);
    if transactional {
        p.init_transactions(t).unwrap();
        p.begin_transaction().unwrap();
    }
    for id in ids {
        let payload = exemplar(id);
        let key = format!("default/{id}");
        p.send(BaseRecord::to(topic).key(&key).payload(&payload))
            .unwrap();
    }
    if transactional {
        p.commit_transaction(t).unwrap();
    } else {
        p.flush(t).unwrap();
    }
}

fn admin(brokers: &str) -> (AdminClient<DefaultClientContext>, tokio::runtime::Runtime) {
    let admin = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    (admin, runtime)
}

/// DeleteRecords: every record of partition 0 of `topic` before `offset`.
fn delete_before(brokers: &str, topic: &str, offset: i64) {
    let (admin, runtime) = admin(brokers);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(offset))
        .unwrap();
    let done = runtime
        .block_on(admin.delete_records(&tpl, &AdminOptions::new()))
        .unwrap();
    let low = done.elements()[0].offset();
    assert_eq!(low, Offset::Offset(offset), "{:?}", done.elements()[0].error());
}

fn create_compacted(brokers: &str, topic: &str) {
    let (admin, runtime) = admin(brokers);
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(1)).set("cleanup.policy", "compact");
    for r in runtime
        .block_on(admin.create_topics([&new], &AdminOptions::new()))
        .unwrap()
    {
        r.unwrap();
    }
}

/// The ids read to the end of `topic`.
fn read(brokers: &str, topic: &str) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    read_to_end(&settings(topic), brokers, READ_WITHIN, |_, x| {
        ids.push(x.map(|x| x.id).unwrap_or_default())
    })?;
    Ok(ids)
}

#[test]
#[ignore = "needs Apache Kafka (scripts/kafka.sh)"]
fn catch_up_finishes_past_deleted_records_and_transaction_markers() {
    let broker = Broker::start();
    let brokers = broker.brokers();

    // Every record deleted: the partition starts and ends at 3, and nothing is read.
    broker.create_topic("ex.all-deleted", 1);
    produce(&brokers, "ex.all-deleted", &["a", "b", "c"], false);
    delete_before(&brokers, "ex.all-deleted", 3);
    assert_eq!(read(&brokers, "ex.all-deleted").unwrap(), Vec::<String>::new());

    // The first two deleted: the third is read.
    broker.create_topic("ex.some-deleted", 1);
    produce(&brokers, "ex.some-deleted", &["a", "b", "c"], false);
    delete_before(&brokers, "ex.some-deleted", 2);
    assert_eq!(read(&brokers, "ex.some-deleted").unwrap(), ["c"]);

    // Written in a transaction: records at 0 and 1, the commit marker at 2, the end at 3.
    broker.create_topic("ex.transactional", 1);
    produce(&brokers, "ex.transactional", &["a", "b"], true);
    assert_eq!(read(&brokers, "ex.transactional").unwrap(), ["a", "b"]);

    // The worker warns when the policy is not `compact` (retention would delete exemplars
    // still in use): it can tell.
    assert_eq!(
        cleanup_policy(&settings("x"), &brokers, "ex.some-deleted").as_deref(),
        Some("delete")
    );
    create_compacted(&brokers, "ex.compacted");
    assert_eq!(
        cleanup_policy(&settings("x"), &brokers, "ex.compacted").as_deref(),
        Some("compact")
    );
    // A topic that does not exist is an empty bank, as before.
    let none = read_to_end(&settings("ex.absent"), &brokers, READ_WITHIN, |_, _| {}).unwrap();
    assert!(none.is_none());
}
