//! The source stage: the Kafka consumer.
//!
//! Guarantees: offsets are never stored automatically (`enable.auto.offset.store=false`);
//! the pipeline stores a partition's position only when every record below it is done
//! (see `offsets`), and auto-commit commits what was stored. Cooperative-sticky assignment
//! moves only the partitions that must move on a rebalance; `kafka.instance_id` gives static
//! membership so a restarted worker gets its partitions back at once. Knows nothing of CLIP.

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaSettings;

pub fn consumer(settings: &KafkaSettings, brokers: &str) -> KafkaResult<StreamConsumer> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers)
        .set("group.id", &settings.group_id)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky");
    if let Some(id) = &settings.instance_id {
        cfg.set("group.instance.id", id);
    }
    for (k, v) in &settings.properties {
        cfg.set(k, v);
    }
    let consumer: StreamConsumer = cfg.create()?;
    let topics: Vec<&str> = settings.input_topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok(consumer)
}

/// Store `position` (the next offset to consume) for a partition, for the next auto-commit.
pub fn store_position(
    consumer: &StreamConsumer,
    topic: &str,
    partition: i32,
    position: i64,
) -> KafkaResult<()> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(position))?;
    consumer.store_offsets(&tpl)
}

/// A header's value as text, if the record has it.
pub fn header<'a>(msg: &'a impl Message, name: &str) -> Option<&'a str> {
    let headers = msg.headers()?;
    headers
        .iter()
        .find(|h| h.key.eq_ignore_ascii_case(name))
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}
