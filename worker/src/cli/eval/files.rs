//! The files of `clipqc eval --out DIR`: `metrics.json` (the [`Metrics`] as JSON),
//! `scores.csv`, `roc.png`, `pr.png` and `report.html`, all from the same records, so they
//! agree.
//!
//! `scores.csv`: a header row, then one row per image in dataset order:
//! `path,folder,outcome,anomaly_score,<one column per class, named by it>,truth,error`, and
//! `line_memory_score` last with `--line-memory` (empty where the image has none).
//! Scores are written as the shortest text that reads back as the same `f32`, so the metrics
//! can be recomputed from the file exactly. An error row has outcome `ERROR`, empty scores
//! and the message in `error`.

use std::path::Path;

use super::report::{outcome, share, Input, Metrics};
use super::{html, plot, EvalError};
use crate::preprocess::DecodeLimits;

/// metrics.json, scores.csv, roc.png, pr.png and report.html into `dir`.
pub(crate) fn write_all(
    dir: &Path,
    input: &Input,
    m: &Metrics,
    limits: &DecodeLimits,
) -> Result<(), EvalError> {
    let put = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|source| EvalError::Write { path, source })
    };
    let json = serde_json::to_vec_pretty(m).expect("metrics serialise");
    put("metrics.json", &json)?;
    put("scores.csv", &scores_csv(input))?;
    let (roc, pr) = plots(m)?;
    put("roc.png", &roc)?;
    put("pr.png", &pr)?;
    put(
        "report.html",
        html::report(input, m, &roc, &pr, limits).as_bytes(),
    )
}

fn scores_csv(input: &Input) -> Vec<u8> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let classes: Vec<&str> = input.scorer.class_names().collect();
    let mut header = vec!["path", "folder", "outcome", "anomaly_score"];
    header.extend(&classes);
    header.extend(["truth", "error"]);
    if input.args.line_memory {
        header.push("line_memory_score");
    }
    let io = "writing to memory cannot fail";
    w.write_record(&header).expect(io);
    for r in input.records {
        let folder = &input.data.folders[r.folder];
        let mut row = vec![
            r.path.display().to_string(),
            folder.name.clone(),
            outcome(r).into(),
        ];
        match &r.result {
            Ok(d) => {
                row.push(d.anomaly_score.to_string());
                row.extend(d.probabilities.iter().map(f32::to_string));
            }
            Err(_) => row.extend(std::iter::repeat_n(String::new(), 1 + classes.len())),
        }
        row.push(
            if folder.defective {
                "defective"
            } else {
                "normal"
            }
            .into(),
        );
        row.push(
            r.result
                .as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_default(),
        );
        if input.args.line_memory {
            row.push(
                r.line_memory_score
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
            );
        }
        w.write_record(&row).expect(io);
    }
    w.into_inner().expect(io)
}

fn plots(m: &Metrics) -> Result<(Vec<u8>, Vec<u8>), EvalError> {
    let op = &m.operating_point;
    let mark = |x: Option<f64>, y: Option<f64>, what: &str, colour| {
        x.zip(y)
            .map(|(x, y)| (x, y, what.to_string(), colour))
            .into_iter()
            .collect::<Vec<_>>()
    };
    let roc = plot::png(&plot::Plot {
        title: "ROC: defective vs normal, by anomaly_score",
        x_label: "false-alarm rate (normal images flagged)",
        y_label: "recall (defective images flagged)",
        points: m.curve.roc_points(),
        reference: Some([(0.0, 0.0), (1.0, 1.0)]),
        steps: false,
        legend: format!(
            "AUROC {}",
            m.auroc.map_or("n/a".into(), |v| format!("{v:.3}"))
        ),
        marks: mark(
            op.false_alarm_rate,
            op.recall,
            &format!(
                "recall >= {}: threshold {:.3}",
                op.min_recall,
                op.threshold.unwrap_or(0.0)
            ),
            plot::MARK,
        ),
    })?;
    let prevalence = share(m.defective, m.scored).unwrap_or(0.0);
    let mut marks = mark(
        op.recall,
        op.precision,
        &format!("operating point (recall >= {})", op.min_recall),
        plot::MARK,
    );
    marks.extend(mark(
        m.f1_recall,
        m.f1_precision,
        &format!(
            "F1-max {:.3} at {:.3}",
            m.f1_max.unwrap_or(0.0),
            m.f1_threshold.unwrap_or(0.0)
        ),
        plot::SECOND_MARK,
    ));
    let pr = plot::png(&plot::Plot {
        title: "Precision-recall: defective images, by anomaly_score",
        x_label: "recall",
        y_label: "precision",
        points: m.curve.pr_points(),
        reference: Some([(0.0, prevalence), (1.0, prevalence)]),
        steps: true,
        legend: format!(
            "AP {}",
            m.average_precision
                .map_or("n/a".into(), |v| format!("{v:.3}"))
        ),
        marks,
    })?;
    Ok((roc, pr))
}
