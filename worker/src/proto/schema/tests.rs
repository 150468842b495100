use std::path::PathBuf;

use super::json_schema;
use crate::proto::v1::{
    inspection_request::Image, AnomalyMap, ClassScore, DefectMask, DefectRegion, Error, Heatmap,
    InspectionRequest, MaskBox, MaskRle, ModelInfo, NearestExemplar, Outcome, SourceRecord,
    StageLatencies, Verdict,
};
use crate::request::{self, Encoding};

const MESSAGES: [(&str, &str); 2] = [
    (
        "clipqc.v1.InspectionRequest",
        "clipqc.v1.inspection-request.schema.json",
    ),
    ("clipqc.v1.Verdict", "clipqc.v1.verdict.schema.json"),
];

fn schemas_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas")
}

fn validator(message: &str) -> jsonschema::Validator {
    jsonschema::validator_for(&json_schema(message)).expect("a valid JSON Schema")
}

/// The files in `schemas/` are what the `.proto` says. Regenerate with
/// `CLIPQC_UPDATE_SCHEMAS=1 cargo test --lib schema`.
#[test]
fn checked_in_schemas_are_current() {
    for (message, file) in MESSAGES {
        let path = schemas_dir().join(file);
        let text = serde_json::to_string_pretty(&json_schema(message)).unwrap() + "\n";
        if std::env::var_os("CLIPQC_UPDATE_SCHEMAS").is_some() {
            std::fs::write(&path, &text).unwrap();
        }
        let on_disk =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            on_disk,
            text,
            "{} is stale: CLIPQC_UPDATE_SCHEMAS=1 cargo test --lib schema",
            path.display()
        );
    }
}

#[test]
fn a_verdict_as_the_worker_writes_it_matches_its_schema() {
    let verdict = Verdict {
        request_id: "r-1".into(),
        camera_id: "cam-3".into(),
        line_id: "line-1".into(),
        profile: "default".into(),
        outcome: Outcome::Defect as i32,
        top_class: "edge_chip".into(),
        probability: 0.71,
        anomaly_score: 0.83,
        scores: vec![ClassScore {
            name: "edge_chip".into(),
            probability: 0.71,
            ..Default::default()
        }],
        model: Some(ModelInfo {
            name: "clip-vit-b-32".into(),
            hash: "13b31d54ba09".into(),
        }),
        captured_at: Some(pbjson_types::Timestamp {
            seconds: 1_790_000_000,
            nanos: 5,
        }),
        decided_at: Some(pbjson_types::Timestamp {
            seconds: 1_790_000_001,
            nanos: 0,
        }),
        latencies: Some(StageLatencies {
            fetch_seconds: 0.01,
            total_seconds: 0.05,
            ..Default::default()
        }),
        source: Some(SourceRecord {
            topic: "clipqc.requests".into(),
            partition: 2,
            offset: 9_000_000_000,
        }),
        error: Some(Error {
            code: 3,
            message: "x".into(),
            stage: "fetch".into(),
        }),
        attributes: [("sku".to_string(), "b-7".to_string())].into(),
        regions: vec![DefectRegion {
            x: 270,
            y: 135,
            width: 405,
            height: 270,
            class: "edge_chip".into(),
            score: 0.93,
            label: "边缘缺口".into(),
        }],
        heatmap: Some(Heatmap {
            rows: 1,
            cols: 2,
            window: 270,
            x: vec![0, 135],
            y: vec![0],
            scores: vec![0.1, 0.93],
        }),
        anomaly_map: Some(AnomalyMap {
            x_edges: vec![0, 135, 270, 405],
            y_edges: vec![0, 270],
            scores: vec![0.1, 0.4, 0.8],
        }),
        top_label: "边缘缺口".into(),
        views: 4,
        nearest_exemplar: Some(NearestExemplar {
            id: "3f2a9c0e1b7d4a55".into(),
            class: "good_part".into(),
            similarity: 0.87,
        }),
        profile_version: "5d41402abc4b".into(),
        line_memory_score: Some(0.12),
        adapter_version: Some("0123456789abcdef".into()),
        masks: vec![DefectMask {
            rle: Some(MaskRle {
                size: vec![1080, 1920],
                counts: vec![291_735, 12, 1068, 12],
            }),
            area: 24,
            area_mm2: Some(0.06),
            r#box: Some(MaskBox {
                x: 270,
                y: 135,
                width: 2,
                height: 12,
            }),
            iou: 0.91,
            region: 0,
        }],
        segmentation: "OK".into(),
        outcome_before_mask_rules: Some(Outcome::Defect as i32),
    };
    let json = serde_json::to_value(&verdict).unwrap();
    // The issue's contract: these names, as written, in the JSON verdict.
    let mask = &json["masks"][0];
    for key in ["rle", "area", "area_mm2", "box", "iou"] {
        assert!(mask.get(key).is_some(), "masks[0].{key} missing: {mask}");
    }
    assert_eq!(mask["rle"]["size"], serde_json::json!([1080, 1920]));
    assert_eq!(mask["rle"]["counts"][0], 291_735);
    let v = validator("clipqc.v1.Verdict");
    let errors: Vec<String> = v.iter_errors(&json).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:?}\n{json:#}");
    assert!(
        json["source"]["offset"].is_string(),
        "int64 as a string: {json}"
    );
}

/// The schema accepts what the worker accepts and refuses what it refuses.
#[test]
fn request_schema_and_parser_agree() {
    let v = validator("clipqc.v1.InspectionRequest");
    let accepted = [
        r#"{"requestId": "a", "cameraId": "c", "uri": "https://cam/1.jpg", "capturedAt": "2026-11-26T10:00:00Z", "attributes": {"sku": "x"}}"#,
        r#"{"request_id": "a", "camera_id": "c", "inline_data": "/9j/4AAQ", "deadline": "2026-11-26T10:00:01.5Z"}"#,
        r#"{"requestId": "a", "uri": "s3://b/k.png", "region": {"x": 1, "y": 2, "width": 30, "height": 40}, "captured_at": null}"#,
    ];
    for text in accepted {
        let json: serde_json::Value = serde_json::from_str(text).unwrap();
        assert!(v.is_valid(&json), "schema refuses {text}");
        request::decode(text.as_bytes(), None, Encoding::Json)
            .unwrap_or_else(|e| panic!("parser refuses {text}: {e}"));
    }
    let refused = [
        r#"{"requestId": "a", "uri": "https://x/1.jpg", "inlineData": "AAAA"}"#,
        r#"{"requestId": "a", "uri": "https://x/1.jpg", "cameraId": 5}"#,
        r#"{"requestId": "a", "uri": "https://x/1.jpg", "colour": "red"}"#,
        r#"{"requestId": "a", "uri": "https://x/1.jpg", "capturedAt": 1790000000}"#,
        r#"{"requestId": "a", "uri": "https://x/1.jpg", "profile": null}"#,
    ];
    for text in refused {
        let json: serde_json::Value = serde_json::from_str(text).unwrap();
        assert!(!v.is_valid(&json), "schema accepts {text}");
        assert!(
            request::decode(text.as_bytes(), None, Encoding::Json).is_err(),
            "parser accepts {text}"
        );
    }
    // Sanity: the request built in Rust serialises to something its schema accepts.
    let r = InspectionRequest {
        request_id: "a".into(),
        image: Some(Image::InlineData(vec![1, 2, 3])),
        ..Default::default()
    };
    assert!(v.is_valid(&serde_json::to_value(&r).unwrap()));
}
