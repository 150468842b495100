//! The sink hop: a verdict, or a dead letter, as Kafka records.
//!
//! Guarantees: each returns only once the broker acknowledged the record (true), or when the
//! drain time is up (false: the input offset then stays uncommitted). Verdicts are keyed by
//! camera id and carry their source coordinates in headers; a dead letter is the original
//! record, key, payload and headers unchanged, plus Kafka Connect style error headers.

use prost::Message as _;
use rdkafka::message::{Headers, Message, OwnedMessage};

use super::Shared;
use crate::proto::v1::{SourceRecord, Verdict};
use crate::request::Encoding;
use crate::sink::Record;
use crate::verdict::{self, Failure};

/// `trace` continues the request's trace context (see [`crate::trace_context`]).
pub async fn verdict(shared: &Shared, v: &Verdict, trace: Vec<(String, Vec<u8>)>) -> bool {
    let encoding = shared.kafka.verdict_encoding;
    let payload = match encoding {
        Encoding::Protobuf => v.encode_to_vec(),
        Encoding::Json => serde_json::to_vec(v).expect("a verdict serialises. This is a bug."),
    };
    let source = v.source.clone().unwrap_or_default();
    let mut headers = vec![
        (
            "content-type".to_string(),
            encoding.content_type().as_bytes().to_vec(),
        ),
        (
            "clipqc-request-id".to_string(),
            v.request_id.as_bytes().to_vec(),
        ),
        ("clipqc-source-topic".to_string(), source.topic.into_bytes()),
        (
            "clipqc-source-partition".to_string(),
            source.partition.to_string().into_bytes(),
        ),
        (
            "clipqc-source-offset".to_string(),
            source.offset.to_string().into_bytes(),
        ),
        (
            "clipqc-worker".to_string(),
            shared.worker_id.as_bytes().to_vec(),
        ),
    ];
    headers.extend(trace);
    let key = (!v.camera_id.is_empty()).then_some(v.camera_id.as_bytes());
    let record = Record {
        topic: &shared.kafka.verdict_topic,
        key,
        payload: &payload,
        headers,
    };
    shared.sink.send(&record, &shared.abort).await
}

pub async fn dead_letter(
    shared: &Shared,
    msg: &OwnedMessage,
    source: &SourceRecord,
    failure: &Failure,
) -> bool {
    let mut headers: Vec<(String, Vec<u8>)> = msg
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default();
    headers.extend(
        verdict::dlq_headers(source, failure)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into_bytes())),
    );
    let record = Record {
        topic: &shared.kafka.dlq_topic,
        key: msg.key(),
        payload: msg.payload().unwrap_or_default(),
        headers,
    };
    shared.sink.send(&record, &shared.abort).await
}
