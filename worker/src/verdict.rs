//! Verdicts and dead letters, as data: what the sink publishes for each request.
//!
//! Guarantees: every verdict carries the source record (topic, partition, offset) so readers
//! can de-duplicate under at-least-once delivery, the model identity, and every class score;
//! a failure becomes an ERROR verdict with a stable code and the stage that failed, and its
//! dead letter carries the same facts in Kafka Connect's header names, so existing DLQ
//! tooling reads it.

use std::time::SystemTime;

use crate::preprocess::PreprocessError;
use crate::proto::v1::{
    ClassScore, Error as VerdictError, ErrorCode, InspectionRequest, ModelInfo,
    Outcome as ProtoOutcome, SourceRecord, StageLatencies, Verdict,
};
use crate::request::RequestError;
use crate::score::{Decision, Outcome, Scorer};

/// Why a request got no decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub code: ErrorCode,
    /// `decode_request`, `fetch`, `decode_image`, `model`, `deadline`.
    pub stage: &'static str,
    pub message: String,
}

impl Failure {
    pub fn new(code: ErrorCode, stage: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            stage,
            message: message.into(),
        }
    }

    /// The code as it appears in headers and metric labels: `DECODE_FAILED`.
    pub fn code_name(&self) -> &'static str {
        self.code.as_str_name().trim_start_matches("ERROR_CODE_")
    }
}

impl From<&RequestError> for Failure {
    fn from(e: &RequestError) -> Self {
        Self::new(
            ErrorCode::InvalidRequest,
            stage::DECODE_REQUEST,
            e.to_string(),
        )
    }
}

impl From<&PreprocessError> for Failure {
    fn from(e: &PreprocessError) -> Self {
        let code = match e {
            PreprocessError::TooLarge { .. } => ErrorCode::TooLarge,
            _ => ErrorCode::DecodeFailed,
        };
        Self::new(code, stage::DECODE_IMAGE, e.to_string())
    }
}

/// The stages a record can fail at: a failed verdict's `error.stage`, its dead letter's
/// `__connect.errors.stage` header and the `stage` label of `clipqc_dead_letters_total`.
pub mod stage {
    pub const DECODE_REQUEST: &str = "decode_request";
    pub const FETCH: &str = "fetch";
    pub const DECODE_IMAGE: &str = "decode_image";
    pub const DEADLINE: &str = "deadline";
    pub const MODEL: &str = "model";
    pub const ALL: [&str; 5] = [DECODE_REQUEST, FETCH, DECODE_IMAGE, DEADLINE, MODEL];
}

/// A protobuf timestamp as a `SystemTime` (negative parts clamp to the epoch).
pub fn system_time(t: &pbjson_types::Timestamp) -> SystemTime {
    SystemTime::UNIX_EPOCH
        + std::time::Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32)
}

fn timestamp(t: SystemTime) -> pbjson_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    pbjson_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn base(
    request: Option<&InspectionRequest>,
    model: &ModelInfo,
    source: SourceRecord,
    latencies: StageLatencies,
    now: SystemTime,
) -> Verdict {
    let r = request.cloned().unwrap_or_default();
    Verdict {
        request_id: r.request_id,
        camera_id: r.camera_id,
        line_id: r.line_id,
        profile: r.profile,
        captured_at: r.captured_at,
        attributes: r.attributes,
        model: Some(model.clone()),
        decided_at: Some(timestamp(now)),
        latencies: Some(latencies),
        source: Some(source),
        ..Default::default()
    }
}

/// The verdict for a decided request.
pub fn decided(
    request: &InspectionRequest,
    scorer: &Scorer,
    decision: &Decision,
    model: &ModelInfo,
    source: SourceRecord,
    latencies: StageLatencies,
    now: SystemTime,
) -> Verdict {
    let mut v = base(Some(request), model, source, latencies, now);
    v.profile = scorer.name.clone();
    v.outcome = match decision.outcome {
        Outcome::Pass => ProtoOutcome::Pass,
        Outcome::Defect => ProtoOutcome::Defect,
        Outcome::Review => ProtoOutcome::Review,
    } as i32;
    v.top_class = scorer.profile.classes[decision.class].name.clone();
    v.probability = decision.probability;
    v.scores = scorer
        .profile
        .classes
        .iter()
        .zip(&decision.probabilities)
        .map(|(c, p)| ClassScore {
            name: c.name.clone(),
            probability: *p,
            defect: c.defect,
        })
        .collect();
    v
}

/// The ERROR verdict for a request that failed (`request` is `None` when even the payload
/// could not be decoded).
pub fn failed(
    request: Option<&InspectionRequest>,
    failure: &Failure,
    model: &ModelInfo,
    source: SourceRecord,
    latencies: StageLatencies,
    now: SystemTime,
) -> Verdict {
    let mut v = base(request, model, source, latencies, now);
    v.outcome = ProtoOutcome::Error as i32;
    v.error = Some(VerdictError {
        code: failure.code as i32,
        message: failure.message.clone(),
        stage: failure.stage.into(),
    });
    v
}

/// Headers of the dead letter (the original record, unchanged, on the DLQ topic).
pub fn dlq_headers(source: &SourceRecord, failure: &Failure) -> Vec<(&'static str, String)> {
    vec![
        ("__connect.errors.topic", source.topic.clone()),
        ("__connect.errors.partition", source.partition.to_string()),
        ("__connect.errors.offset", source.offset.to_string()),
        ("__connect.errors.stage", failure.stage.to_string()),
        (
            "__connect.errors.class.name",
            failure.code_name().to_string(),
        ),
        (
            "__connect.errors.exception.message",
            failure.message.clone(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::score::{decide, ProfileConfig};

    fn source() -> SourceRecord {
        SourceRecord {
            topic: "clipqc.requests".into(),
            partition: 4,
            offset: 1234,
        }
    }

    #[test]
    fn a_decided_verdict_carries_every_score_and_the_source() {
        let profile = ProfileConfig::builtin_default();
        let scorer = Scorer::for_tests("default", profile.clone());
        let decision = decide(&profile, vec![0.7, 0.1, 0.1, 0.05, 0.05]);
        let request = InspectionRequest {
            request_id: "r1".into(),
            line_id: "L2".into(),
            ..Default::default()
        };
        let model = ModelInfo {
            name: "clip".into(),
            hash: "abc".into(),
        };
        let v = decided(
            &request,
            &scorer,
            &decision,
            &model,
            source(),
            StageLatencies::default(),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(v.outcome(), ProtoOutcome::Defect);
        assert_eq!(
            (v.top_class.as_str(), v.probability),
            ("surface_scratch", 0.7)
        );
        assert_eq!(v.scores.len(), 5);
        assert!(v.scores[0].defect && !v.scores[4].defect);
        assert_eq!(v.source.as_ref().unwrap().offset, 1234);
        assert_eq!(
            (
                v.request_id.as_str(),
                v.line_id.as_str(),
                v.profile.as_str()
            ),
            ("r1", "L2", "default")
        );
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["outcome"], "OUTCOME_DEFECT");
        assert_eq!(
            json["source"]["offset"], "1234",
            "int64 is a string in the proto3 JSON mapping"
        );
    }

    #[test]
    fn a_failure_becomes_an_error_verdict_and_a_dead_letter() {
        let err = PreprocessError::Decode {
            input: "s3://b/k.jpg".into(),
            message: "bad huffman".into(),
        };
        let f = Failure::from(&err);
        assert_eq!(
            (f.code, f.stage, f.code_name()),
            (ErrorCode::DecodeFailed, "decode_image", "DECODE_FAILED")
        );
        let model = ModelInfo::default();
        let v = failed(
            None,
            &f,
            &model,
            source(),
            StageLatencies::default(),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(v.outcome(), ProtoOutcome::Error);
        assert_eq!(
            v.error.as_ref().unwrap().message,
            "s3://b/k.jpg: cannot decode image: bad huffman"
        );
        let headers = dlq_headers(&source(), &f);
        assert!(headers.contains(&("__connect.errors.offset", "1234".into())));
        assert!(headers.contains(&("__connect.errors.class.name", "DECODE_FAILED".into())));
    }
}
