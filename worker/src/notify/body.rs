//! The JSON a webhook is sent: Alertmanager's `POST /api/v2/alerts` body (an array of alerts;
//! a resolved one carries an `endsAt` in the past) or one generic object per event.

use std::time::SystemTime;

use serde_json::{json, Value};

use super::Event;

/// A verdict's regions as webhook JSON: boxes in source-frame pixels, class, label, score.
fn regions(v: &crate::proto::v1::Verdict) -> Value {
    v.regions
        .iter()
        .map(|r| {
            json!({"x": r.x, "y": r.y, "width": r.width, "height": r.height,
                   "class": r.class, "label": r.label, "score": r.score})
        })
        .collect()
}

/// A verdict's defect outlines as webhook JSON: area (pixels, and mm² where the camera is
/// calibrated), box and SAM's IoU; never the mask itself (a webhook is a message, not a file).
fn masks(v: &crate::proto::v1::Verdict) -> Value {
    v.masks
        .iter()
        .map(|m| {
            let b = m.r#box.as_ref();
            json!({"region": m.region, "area": m.area, "area_mm2": m.area_mm2, "iou": m.iou,
                   "box": b.map(|b| json!({"x": b.x, "y": b.y, "width": b.width, "height": b.height}))})
        })
        .collect()
}

/// A verdict's fused anomaly map as webhook JSON, summarised: its grid, its maximum and the
/// hottest cell's box (the map itself stays in the verdict: a webhook is a message). Null
/// for verdicts without a map.
fn anomaly_map(v: &crate::proto::v1::Verdict) -> Value {
    let Some(m) = v.anomaly_map.as_ref() else {
        return Value::Null;
    };
    let cols = m.x_edges.len().saturating_sub(1);
    let rows = m.y_edges.len().saturating_sub(1);
    let hottest = m
        .scores
        .iter()
        .enumerate()
        .filter(|_| cols > 0 && rows > 0)
        .max_by(|a, b| a.1.total_cmp(b.1));
    json!({
        "cols": cols,
        "rows": rows,
        "max": hottest.map(|(_, s)| *s),
        "hottest": hottest.filter(|(i, _)| i / cols < rows).map(|(i, s)| {
            let (r, c) = (i / cols, i % cols);
            json!({"x": m.x_edges[c], "y": m.y_edges[r],
                   "width": m.x_edges[c + 1] - m.x_edges[c],
                   "height": m.y_edges[r + 1] - m.y_edges[r], "score": s})
        }),
    })
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn timestamp(t: Option<&pbjson_types::Timestamp>) -> Option<SystemTime> {
    t.filter(|t| t.seconds > 0)
        .map(crate::timestamps::system_time)
}

pub(super) fn alertmanager(event: &Event, worker: &str) -> Value {
    let alert = match event {
        Event::Defect(v) => {
            let at = timestamp(v.decided_at.as_ref()).unwrap_or_else(SystemTime::now);
            json!({
                "labels": {
                    "alertname": "ClipqcDefect",
                    "severity": "warning",
                    "line": v.line_id,
                    "camera": v.camera_id,
                    "class": v.top_class,
                    "profile": v.profile,
                },
                "annotations": {
                    "summary": format!("{} on line {} (camera {})", v.top_class, v.line_id, v.camera_id),
                    "description": format!("DEFECT {} with probability {:.3}; request {}", v.top_class, v.probability, v.request_id),
                    "request_id": v.request_id,
                    "probability": format!("{:.4}", v.probability),
                    "anomaly_score": format!("{:.4}", v.anomaly_score),
                    "label": v.top_label,
                    // Annotations are strings: the regions as JSON text.
                    "regions": regions(v).to_string(),
                    "masks": masks(v).to_string(),
                    "anomaly_map": anomaly_map(v).to_string(),
                    "worker": worker,
                },
                "startsAt": rfc3339(at),
            })
        }
        Event::Rate {
            line,
            firing,
            rate,
            verdicts,
            window_seconds,
            since,
        } => {
            let mut alert = json!({
                "labels": {
                    "alertname": "ClipqcLineDefectRate",
                    "severity": "critical",
                    "line": line,
                },
                "annotations": {
                    "summary": format!("line {line}: {:.0}% defects over {window_seconds} s", rate * 100.0),
                    "description": format!("{verdicts} verdicts in the window; defect rate {rate:.3}"),
                    "worker": worker,
                },
            });
            // A resolved alert is one whose end lies in the past.
            let key = if *firing { "startsAt" } else { "endsAt" };
            alert[key] = Value::String(rfc3339(*since));
            alert
        }
    };
    Value::Array(vec![alert])
}

pub(super) fn generic(event: &Event, worker: &str) -> Value {
    match event {
        Event::Defect(v) => json!({
            "event": "defect",
            "request_id": v.request_id,
            "camera_id": v.camera_id,
            "line_id": v.line_id,
            "profile": v.profile,
            "class": v.top_class,
            "label": v.top_label,
            "probability": v.probability,
            "anomaly_score": v.anomaly_score,
            "regions": regions(v),
            "masks": masks(v),
            "anomaly_map": anomaly_map(v),
            "decided_at": timestamp(v.decided_at.as_ref()).map(rfc3339),
            "source": v.source.as_ref().map(|s| json!({"topic": s.topic, "partition": s.partition, "offset": s.offset})),
            "worker": worker,
        }),
        Event::Rate {
            line,
            firing,
            rate,
            verdicts,
            window_seconds,
            since,
        } => json!({
            "event": if *firing { "defect_rate_firing" } else { "defect_rate_resolved" },
            "line_id": line,
            "defect_rate": rate,
            "verdicts": verdicts,
            "window_seconds": window_seconds,
            "at": rfc3339(*since),
            "worker": worker,
        }),
    }
}
