//! The sink hop: a verdict, or a dead letter, as Kafka records.
//!
//! Guarantees: each returns Ok only once the broker acknowledged the record; an error when
//! the drain time is up (the input offset then stays uncommitted) or when the broker refuses
//! the record for good. Verdicts are keyed by camera id and carry their source coordinates
//! in headers; a dead letter is the original record, key, payload and headers unchanged,
//! plus Kafka Connect style error headers, except when the dead-letter topic refuses it for
//! its size: then it goes *trimmed*: without its payload (header `clipqc-payload-dropped`:
//! its size), its key and headers cut ([`crate::sink::dead_letter`]). The original stays on
//! the input topic at the coordinates the headers give. A trimmed dead letter is a few tens
//! of kilobytes at most, so one record with a megabyte key or headers cannot be refused for
//! good and stop its partition (or, worker after worker, the group).

use prost::Message as _;
use rdkafka::message::OwnedMessage;

use super::Shared;
use crate::proto::v1::{SourceRecord, Verdict};
use crate::request::Encoding;
use crate::sink::outbox::OwnedRecord;
use crate::sink::SendError;
use crate::verdict::Failure;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Send(#[from] SendError),
    #[error("the verdict cannot be encoded as JSON: {0}")]
    Encode(String),
}

impl PublishError {
    /// The record will never be taken as it is (as opposed to: the worker stopped waiting).
    pub fn is_refusal(&self) -> bool {
        !matches!(self, Self::Send(SendError::Aborted))
    }
}

/// The verdict's record; `trace` continues the request's trace context (see
/// [`crate::trace_context`]).
pub fn verdict_record(
    shared: &Shared,
    v: &Verdict,
    trace: Vec<(String, Vec<u8>)>,
) -> Result<OwnedRecord, PublishError> {
    let encoding = shared.kafka.verdict_encoding;
    let payload = match encoding {
        Encoding::Protobuf => v.encode_to_vec(),
        Encoding::Json => serde_json::to_vec(v).map_err(|e| PublishError::Encode(e.to_string()))?,
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
    Ok(OwnedRecord {
        topic: shared.kafka.verdict_topic.clone(),
        key: (!v.camera_id.is_empty()).then(|| v.camera_id.as_bytes().to_vec()),
        payload,
        headers,
    })
}

/// Publish the verdict, acknowledged.
pub async fn verdict(
    shared: &Shared,
    v: &Verdict,
    trace: Vec<(String, Vec<u8>)>,
) -> Result<(), PublishError> {
    let record = verdict_record(shared, v, trace)?;
    Ok(shared.sink.send_owned(&record, &shared.abort).await?)
}

/// The dead letter of `msg`: whole, or trimmed when `whole` is false (see the module's doc:
/// no payload, the key and headers cut to bounds that any topic accepts).
pub fn dead_letter_record(
    shared: &Shared,
    msg: &OwnedMessage,
    source: &SourceRecord,
    failure: &Failure,
    whole: bool,
) -> OwnedRecord {
    crate::sink::dead_letter::record(&shared.kafka.dlq_topic, msg, source, failure, whole)
}

/// Publish the dead letter, acknowledged; trimmed if the topic refuses it for its size.
pub async fn dead_letter(
    shared: &Shared,
    msg: &OwnedMessage,
    source: &SourceRecord,
    failure: &Failure,
) -> Result<(), SendError> {
    let topic = &shared.kafka.dlq_topic;
    (shared.sink)
        .send_dead_letter(topic, msg, source, failure, &shared.abort)
        .await
}
