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
    AnomalyMap, ClassScore, DefectMask, DefectRegion, Error as VerdictError, ErrorCode, Heatmap,
    InspectionRequest, MaskBox, MaskRle, ModelInfo, NearestExemplar, Outcome as ProtoOutcome,
    SourceRecord, StageLatencies, Verdict,
};
use crate::request::RequestError;
use crate::score::{Decision, Outcome, Scorer};
// The timestamp conversions live below the stages (notify and the feedback loop need them
// without the rest of this module); re-exported where callers have always found them.
pub use crate::timestamps::{system_time, timestamp};

/// Why a request got no decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub code: ErrorCode,
    pub stage: Stage,
    pub message: String,
}

impl Failure {
    pub fn new(code: ErrorCode, stage: Stage, message: impl Into<String>) -> Self {
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
            Stage::DecodeRequest,
            e.to_string(),
        )
    }
}

impl From<&PreprocessError> for Failure {
    fn from(e: &PreprocessError) -> Self {
        Self::new(e.code(), Stage::DecodeImage, e.to_string())
    }
}

impl From<&crate::fetch::FetchError> for Failure {
    fn from(e: &crate::fetch::FetchError) -> Self {
        Self::new(e.code(), Stage::Fetch, e.to_string())
    }
}

/// The stages a record can fail at: a failed verdict's `error.stage`, its dead letter's
/// `__connect.errors.stage` header and the `stage` label of `clipqc_dead_letters_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    DecodeRequest,
    Fetch,
    DecodeImage,
    Deadline,
    Model,
    /// A panic caught while handling the record.
    Internal,
    /// The broker refused the record's verdict for good.
    Publish,
    /// Operator feedback that cannot become an exemplar (its dead letter).
    Feedback,
}

impl Stage {
    pub const ALL: [Stage; 8] = [
        Self::DecodeRequest,
        Self::Fetch,
        Self::DecodeImage,
        Self::Deadline,
        Self::Model,
        Self::Internal,
        Self::Publish,
        Self::Feedback,
    ];

    /// Its name in verdicts, headers and metric labels: `decode_image` (one of
    /// [`crate::metrics::DEAD_LETTER_STAGES`], which a test checks).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DecodeRequest => "decode_request",
            Self::Fetch => "fetch",
            Self::DecodeImage => "decode_image",
            Self::Deadline => "deadline",
            Self::Model => "model",
            Self::Internal => "internal",
            Self::Publish => "publish",
            Self::Feedback => "feedback",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
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
    v.outcome = proto_outcome(decision.outcome) as i32;
    let classes = &scorer.profile.classes;
    v.top_class = classes[decision.class].name.clone();
    v.top_label = classes[decision.class].display().to_string();
    v.probability = decision.probability;
    v.anomaly_score = decision.anomaly_score;
    v.scores = classes
        .iter()
        .zip(&decision.probabilities)
        .map(|(c, p)| ClassScore {
            name: c.name.clone(),
            probability: *p,
            defect: c.defect,
            label: c.display().to_string(),
        })
        .collect();
    v.views = 1;
    v.line_memory_score = decision.line_memory_score;
    v.adapter_version = decision.adapter_version.clone();
    v.nearest_exemplar = decision.nearest.as_ref().map(|n| NearestExemplar {
        id: n.id.clone(),
        class: classes[n.class].name.clone(),
        similarity: n.similarity,
    });
    if let Some(l) = &decision.localization {
        v.views = l.views;
        v.regions = l
            .regions
            .iter()
            .map(|r| DefectRegion {
                x: r.x,
                y: r.y,
                width: r.width,
                height: r.height,
                class: classes[r.class].name.clone(),
                score: r.score,
                label: classes[r.class].display().to_string(),
            })
            .collect();
        v.heatmap = l.heatmap.as_ref().map(|h| Heatmap {
            rows: h.rows,
            cols: h.cols,
            window: h.window,
            x: h.x.clone(),
            y: h.y.clone(),
            scores: h.scores.clone(),
        });
        v.anomaly_map = l.anomaly_map.as_ref().map(|m| AnomalyMap {
            x_edges: m.x_edges.clone(),
            y_edges: m.y_edges.clone(),
            scores: m.scores.clone(),
        });
    }
    if let Some(o) = &decision.outline {
        outline(&mut v, o);
    }
    v
}

/// The most RLE runs a verdict carries over all its masks: a mask as ragged as noise has
/// millions, and a verdict the broker refuses would become an ERROR. Masks past it keep their
/// area, box and IoU, without `rle`.
pub const MAX_RLE_RUNS: usize = 65_536;

/// A decision's outline into its verdict: masks (RLE within [`MAX_RLE_RUNS`]), status, and the
/// outcome the mask rules replaced.
fn outline(v: &mut Verdict, o: &crate::score::masks::Outline) {
    v.segmentation = o.status.to_string();
    v.outcome_before_mask_rules = o.outcome_before_rules.map(|b| proto_outcome(b) as i32);
    let mut runs = 0;
    v.masks = o
        .masks
        .iter()
        .map(|m| {
            runs += m.mask.rle.counts.len();
            DefectMask {
                rle: (runs <= MAX_RLE_RUNS).then(|| MaskRle {
                    size: m.mask.rle.size.to_vec(),
                    counts: m.mask.rle.counts.clone(),
                }),
                area: m.mask.area,
                area_mm2: m.area_mm2,
                r#box: m.mask.bbox.map(|b| MaskBox {
                    x: b.x,
                    y: b.y,
                    width: b.width,
                    height: b.height,
                }),
                iou: m.mask.iou,
                region: m.region,
            }
        })
        .collect();
}

fn proto_outcome(o: Outcome) -> ProtoOutcome {
    match o {
        Outcome::Pass => ProtoOutcome::Pass,
        Outcome::Defect => ProtoOutcome::Defect,
        Outcome::Review => ProtoOutcome::Review,
    }
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
        stage: failure.stage.as_str().into(),
    });
    v
}

/// The longest text a [`shrunk`] verdict echoes from its request, in bytes.
pub const SHRUNK_FIELD_BYTES: usize = 256;

/// A small ERROR verdict standing in for `v`, which the broker refused for good (too large:
/// mostly echoed request attributes): the same identity, source and model, its text fields
/// cut to [`SHRUNK_FIELD_BYTES`], without attributes and scores, and `failure` as the error.
pub fn shrunk(v: &Verdict, failure: &Failure) -> Verdict {
    let cut = |s: &str| truncate(s, SHRUNK_FIELD_BYTES).to_string();
    Verdict {
        request_id: cut(&v.request_id),
        camera_id: cut(&v.camera_id),
        line_id: cut(&v.line_id),
        profile: cut(&v.profile),
        captured_at: v.captured_at,
        model: v.model.clone(),
        decided_at: v.decided_at,
        latencies: v.latencies,
        source: v.source.clone(),
        outcome: ProtoOutcome::Error as i32,
        error: Some(VerdictError {
            code: failure.code as i32,
            message: truncate(&failure.message, 4 * SHRUNK_FIELD_BYTES).to_string(),
            stage: failure.stage.as_str().into(),
        }),
        ..Default::default()
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let end = (0..=max)
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0);
    &s[..end]
}

/// Headers of the dead letter (the original record, unchanged, on the DLQ topic).
pub fn dlq_headers(source: &SourceRecord, failure: &Failure) -> Vec<(&'static str, String)> {
    vec![
        ("__connect.errors.topic", source.topic.clone()),
        ("__connect.errors.partition", source.partition.to_string()),
        ("__connect.errors.offset", source.offset.to_string()),
        ("__connect.errors.stage", failure.stage.as_str().to_string()),
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
    use prost::Message as _;

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
        // Four defect classes: 0.7 + 0.1 + 0.1 + 0.05.
        assert!((v.anomaly_score - 0.95).abs() < 1e-6, "{}", v.anomaly_score);
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

    /// The metrics own the `stage` label's values (and start each at 0): every stage is one.
    #[test]
    fn every_stage_is_in_the_metrics_vocabulary() {
        let names = Stage::ALL.map(Stage::as_str);
        assert_eq!(names, crate::metrics::DEAD_LETTER_STAGES);
    }

    #[test]
    fn a_shrunk_verdict_keeps_identity_and_source_and_drops_the_bulk() {
        let big = Verdict {
            request_id: "é".repeat(1000),
            camera_id: "cam-1".into(),
            attributes: [("blob".to_string(), "x".repeat(2 << 20))].into(),
            scores: vec![ClassScore::default(); 100],
            source: Some(source()),
            ..Default::default()
        };
        let failure = Failure::new(ErrorCode::PublishFailed, Stage::Publish, "too large");
        let small = shrunk(&big, &failure);
        assert!(small.encoded_len() < 4096, "{} bytes", small.encoded_len());
        assert_eq!(
            small.request_id.len(),
            SHRUNK_FIELD_BYTES,
            "cut on a char boundary"
        );
        assert_eq!(small.camera_id, "cam-1");
        assert_eq!(small.source, Some(source()));
        assert!(small.attributes.is_empty() && small.scores.is_empty());
        assert_eq!(small.outcome(), ProtoOutcome::Error);
        assert_eq!(small.error.unwrap().code(), ErrorCode::PublishFailed);
    }

    #[test]
    fn a_failure_becomes_an_error_verdict_and_a_dead_letter() {
        let err = PreprocessError::Decode {
            input: "s3://b/k.jpg".into(),
            message: "bad huffman".into(),
        };
        let f = Failure::from(&err);
        assert_eq!(
            (f.code, f.stage.as_str(), f.code_name()),
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
