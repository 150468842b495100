//! Kafka settings (`kafka` in the config): the brokers, topics and delivery mode shared by
//! every stage that talks to Kafka (the source, the sink, the exemplar topic and the feedback
//! loop, the start-up check in `brokers`). They live here, beside those stages rather than in
//! `config`, so each of them reads its settings from below instead of from the module that
//! gathers them all.
//!
//! Guarantees: the librdkafka properties the worker's delivery guarantees depend on
//! ([`RESERVED_PROPERTIES`]) cannot be set through `properties`, `property_files` or the
//! environment: [`KafkaSettings::resolve_properties`] refuses them, naming the reason.

use std::collections::BTreeMap;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::Deserialize;

use crate::request::Encoding;

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSettings {
    /// Bootstrap servers, `host:port[,host:port]`. Unset: `clipqc run` starts an embedded
    /// in-process broker for trying things out.
    pub brokers: Option<String>,
    /// The consumer group the workers share the input partitions in.
    pub group_id: String,
    /// Topics the inspection requests are read from.
    pub input_topics: Vec<String>,
    /// Where verdicts are published (keyed by camera id).
    pub verdict_topic: String,
    /// Where failed requests go, unchanged, with error headers (the dead-letter topic).
    pub dlq_topic: String,
    /// The few-shot exemplar bank: a compacted topic (key `profile/id`) every worker reads
    /// from the beginning before taking requests, then follows.
    pub exemplar_topic: String,
    /// Tip-Adapter-F adapters (`clipqc adapt --publish`): a compacted topic (key = the
    /// profile) the workers read with the exemplar topic and follow, swapping an adapter in
    /// whole.
    pub adapter_topic: String,
    /// Operators' answers about parts (`clipqc.v1.Feedback`), turned into exemplars by the
    /// workers (their group `<group_id>.feedback` shares the topic's partitions).
    pub feedback_topic: String,
    /// Static group membership (`group.instance.id`): a restarted worker gets its partitions
    /// back at once. On Kubernetes, the pod name.
    pub instance_id: Option<String>,
    /// Encoding of requests without a content-type header.
    pub default_encoding: Encoding,
    /// Encoding of the verdicts published (`protobuf` or `json`).
    pub verdict_encoding: Encoding,
    /// Any other librdkafka property (security.protocol, sasl.*, ssl.*, …), passed through.
    /// From the environment: `CLIPQC__KAFKA__PROPERTIES__SASL_PASSWORD` sets `sasl.password`
    /// (the name after the prefix, lower-cased, `_` read as `.`). Properties the worker's
    /// delivery guarantees depend on are refused (see [`RESERVED_PROPERTIES`]).
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties read from files, e.g. `{ "sasl.password" =
    /// "/var/run/secrets/kafka/password" }` for a mounted Kubernetes secret: the file's
    /// content, without its trailing newline, is the value.
    pub property_files: BTreeMap<String, PathBuf>,
    /// `at_least_once` (the default): a verdict is published, then its request's offset is
    /// committed; a crash between the two repeats the request. `exactly_once`: each
    /// transaction holds a run of finished requests' verdicts and dead letters together with
    /// their input offsets, so a reader with `isolation.level=read_committed` sees each
    /// request's verdict once, crashes included. Needs a broker with transactions (Apache
    /// Kafka ≥ 2.5, Redpanda; not tansu 0.6.0) and should have `instance_id` set.
    pub delivery: Delivery,
    /// Exactly-once: how often the finished requests are committed in a transaction. Verdicts
    /// become visible to read_committed readers at that pace; shorter means more transactions.
    pub transaction_interval_ms: u64,
    /// Exactly-once: how long one step of a transaction (sending the input offsets, the
    /// commit, an abort) waits for the broker. A step that runs out is still in progress and
    /// is repeated (`/readyz` and `clipqc_transaction_stalled` say the transaction is stalled);
    /// after 10 in a row the worker stops, and its restart ends the transaction.
    pub transaction_call_timeout_ms: u64,
    /// The consumer group protocol: `classic` (the default; the members agree on the
    /// assignment through a leader, with `session.timeout.ms` set by the client) or `consumer`
    /// (KIP-848, Apache Kafka ≥ 4.0: the broker assigns partitions incrementally through
    /// heartbeats, and the session and heartbeat timings are the broker's
    /// `group.consumer.*` settings, so `session.timeout.ms`, `heartbeat.interval.ms` and
    /// `partition.assignment.strategy` must not be set in `properties`). With `consumer`, a
    /// second process with a live member's `instance_id` is the one refused.
    pub group_protocol: GroupProtocol,
}

/// The consumer group protocol: see [`KafkaSettings::group_protocol`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum GroupProtocol {
    #[default]
    Classic,
    Consumer,
}

impl GroupProtocol {
    /// librdkafka's `group.protocol` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Consumer => "consumer",
        }
    }
}

/// How verdicts and input offsets are committed: see [`KafkaSettings::delivery`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    #[default]
    AtLeastOnce,
    ExactlyOnce,
}

/// librdkafka properties the worker sets itself, and why they cannot be overridden.
pub const RESERVED_PROPERTIES: [(&str, &str); 10] = [
    ("bootstrap.servers", "set kafka.brokers"),
    ("group.id", "set kafka.group_id"),
    ("group.instance.id", "set kafka.instance_id"),
    (
        "enable.auto.offset.store",
        "offsets are stored only once their verdicts are acknowledged",
    ),
    (
        "enable.auto.commit",
        "the worker commits what it stored, and nothing before",
    ),
    (
        "enable.idempotence",
        "the verdict producer must not write duplicates or reorder on retries",
    ),
    (
        "acks",
        "the idempotent producer needs acknowledgement by all in-sync replicas",
    ),
    (
        "request.required.acks",
        "the idempotent producer needs acknowledgement by all in-sync replicas",
    ),
    (
        "transactional.id",
        "set by the worker's delivery mode, not by hand",
    ),
    ("group.protocol", "set kafka.group_protocol"),
];

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            brokers: None,
            group_id: "clipqc".into(),
            input_topics: vec!["clipqc.requests".into()],
            verdict_topic: "clipqc.verdicts".into(),
            dlq_topic: "clipqc.dlq".into(),
            exemplar_topic: "clipqc.exemplars".into(),
            adapter_topic: "clipqc.adapters".into(),
            feedback_topic: "clipqc.feedback".into(),
            instance_id: None,
            default_encoding: Encoding::Protobuf,
            verdict_encoding: Encoding::Protobuf,
            properties: BTreeMap::new(),
            property_files: BTreeMap::new(),
            delivery: Delivery::AtLeastOnce,
            transaction_interval_ms: 100,
            transaction_call_timeout_ms: 30_000,
            group_protocol: GroupProtocol::Classic,
        }
    }
}

/// `CLIPQC__KAFKA__PROPERTIES__SASL_PASSWORD` → `sasl.password`: config-rs would split a
/// dotted key into sections, and shells do not allow dots in names.
const PROPERTY_ENV_PREFIX: &str = "CLIPQC__KAFKA__PROPERTIES__";

/// The librdkafka property a `CLIPQC__KAFKA__PROPERTIES__…` variable sets (`None` for any
/// other variable); the config reads them apart from the other keys.
pub(crate) fn property_from_env(name: &str) -> Option<String> {
    let key = name.strip_prefix(PROPERTY_ENV_PREFIX)?;
    (!key.is_empty()).then(|| key.to_ascii_lowercase().replace('_', "."))
}

impl KafkaSettings {
    /// Read `property_files` into `properties`, and refuse reserved properties.
    pub(crate) fn resolve_properties(&mut self) -> Result<(), PropertyError> {
        for (key, path) in &self.property_files {
            let value =
                std::fs::read_to_string(path).map_err(|source| PropertyError::Unreadable {
                    key: key.clone(),
                    path: path.clone(),
                    source,
                })?;
            let value = value.strip_suffix('\n').unwrap_or(&value);
            let value = value.strip_suffix('\r').unwrap_or(value);
            self.properties.insert(key.clone(), value.to_string());
        }
        for (key, why) in RESERVED_PROPERTIES {
            if self.properties.contains_key(key) {
                return Err(PropertyError::Reserved { key, why });
            }
        }
        Ok(())
    }
}

/// Why `kafka.properties` and `kafka.property_files` are refused.
#[derive(Debug, thiserror::Error)]
pub enum PropertyError {
    /// A property file that cannot be read.
    #[error("kafka.property_files.{key:?}: cannot read {path}: {source}")]
    Unreadable {
        key: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// One of [`RESERVED_PROPERTIES`], with why the worker sets it itself.
    #[error("kafka.properties: {key:?} cannot be set here: {why}")]
    Reserved {
        key: &'static str,
        why: &'static str,
    },
}
