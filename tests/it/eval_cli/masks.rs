//! `clipqc eval --masks`: the pixel metrics of a tiled profile on the sample data with masks
//! (deploy/samples/make_samples.py --labelled --masks), recomputed from the 16-bit maps it
//! writes: pixel AUROC by scikit-learn, AUPRO by an independent transcription of MVTec AD's
//! `compute_pro` and `trapezoid` (numpy and scipy's `ndimage.label` with a 3×3 structure);
//! and bad masks refused, naming the file.

use std::path::Path;
use std::process::Command;

use super::eval;
use crate::common::cli::{refused, succeeded};
use crate::common::profile::{self, GOOD, SCRATCH};
use serde_json::Value;

const RECOMPUTE: &str = r#"
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image
from scipy.ndimage import label
from sklearn.metrics import roc_auc_score

maps_dir, masks_dir = Path(sys.argv[1]), Path(sys.argv[2])
scores, truths = [], []
for m in sorted(maps_dir.rglob("*.png")):
    rel = m.relative_to(maps_dir)
    s = np.array(Image.open(m), dtype=np.int64) / 65535.0
    mask_file = masks_dir / rel.parent / (rel.stem + "_mask.png")
    if mask_file.exists():
        gt = np.array(Image.open(mask_file).convert("L")) > 0
    elif rel.parts[0] == "good_part":
        gt = np.zeros(s.shape, dtype=bool)
    else:
        continue  # a defective image without a mask: not measured
    scores.append(s); truths.append(gt)

# MVTec AD's evaluation code, transcribed: generic_util.trapezoid, pro_curve_util.compute_pro.
def trapezoid(x, y, x_max):
    x, y = np.asarray(x), np.asarray(y)
    correction = 0.0
    if x_max not in x:
        ins = np.searchsorted(x, x_max, side="right")
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)

def compute_pro(maps, gts):
    structure = np.ones((3, 3), dtype=int)
    ok, regions = 0, 0
    fp = [np.zeros(m.shape) for m in maps]
    pro = [np.zeros(m.shape) for m in maps]
    for i, gt in enumerate(gts):
        labeled, n = label(gt, structure)
        regions += n
        ok_mask = labeled == 0
        ok += ok_mask.sum()
        fp[i][ok_mask] = 1
        for k in range(n):
            region = labeled == (k + 1)
            pro[i][region] = 1.0 / region.sum()
    flat = np.concatenate([m.ravel() for m in maps])
    fp = np.concatenate([f.ravel() for f in fp]); pro = np.concatenate([p.ravel() for p in pro])
    order = np.argsort(flat, kind="stable")[::-1]
    flat, fp, pro = flat[order], fp[order], pro[order]
    fprs = np.cumsum(fp) / ok
    pros = np.cumsum(pro) / regions
    keep = np.append(np.diff(flat) != 0, True)
    fprs, pros = np.clip(fprs[keep], None, 1.0), np.clip(pros[keep], None, 1.0)
    return np.concatenate(([0.0], fprs, [1.0])), np.concatenate(([0.0], pros, [1.0])), regions

y = np.concatenate([t.ravel() for t in truths]); s = np.concatenate([v.ravel() for v in scores])
fprs, pros, regions = compute_pro(scores, truths)
print(json.dumps({"pixel_auroc": float(roc_auc_score(y, s)), "aupro": trapezoid(fprs, pros, 0.3) / 0.3,
                  "images": len(scores), "regions": int(regions)}))
"#;

/// The sample data with masks, a tiled profile over its folders' names, and its config file.
fn samples(root: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/samples/make_samples.py");
    let status = Command::new("python")
        .arg(&script)
        .args(["--labelled", "--masks", "--count", "3", "--size", "192x144", "--out"])
        .arg(root.join("mvtec"))
        .status()
        .expect("python (the project environment: run the tests through scripts/test.sh)");
    assert!(status.success(), "make_samples.py --labelled --masks failed");
    let tiles = "tiles = { scales = [1.0, 0.5, 0.25], overlap = 0.5, max_windows = 200, min_window = 16, region_threshold = 0.3 }";
    let good = profile::Class {
        name: "good_part",
        ..GOOD
    };
    let scratch = profile::Class {
        name: "surface_scratch",
        ..SCRATCH
    };
    let text = profile::toml("tiled", &[tiles], &[scratch, good]);
    let config = profile::config_file(root, "tiled.toml", &text);
    (root.join("mvtec"), config)
}

#[test]
#[ignore = "needs the tiny model and the Python environment (scripts/test.sh)"]
fn pixel_metrics_are_what_sklearn_and_mvtecs_code_compute_from_the_written_maps() {
    let tmp = tempfile::tempdir().unwrap();
    let (mvtec, config) = samples(tmp.path());
    let out = tmp.path().join("out");
    let ground_truth = mvtec.join("ground_truth");
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--profile",
        "tiled",
        "--masks",
        ground_truth.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let summary = succeeded(&eval(&mvtec.join("test"), &args));
    assert!(summary.contains("pixel AUROC"), "{summary}");
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    // 3 good images and 3 with masks in each of the 3 defect folders.
    assert_eq!(m["pixel_images"], 12, "{m:#}");
    assert_eq!(m["masks_missing"], 0, "{m:#}");
    let theirs = Command::new("python")
        .args(["-c", RECOMPUTE])
        .arg(out.join("maps"))
        .arg(mvtec.join("ground_truth"))
        .output()
        .unwrap();
    assert!(
        theirs.status.success(),
        "{}",
        String::from_utf8_lossy(&theirs.stderr)
    );
    let theirs: Value = serde_json::from_slice(&theirs.stdout).unwrap();
    assert_eq!(theirs["images"], 12, "maps written for every measured image");
    assert_eq!(m["gt_regions"], theirs["regions"], "8-connected regions");
    for key in ["pixel_auroc", "aupro"] {
        let (ours, reference) = (m[key].as_f64().unwrap(), theirs[key].as_f64().unwrap());
        eprintln!("{key}: clipqc {ours:.9}, reference {reference:.9}");
        assert!(
            (ours - reference).abs() < 1e-6,
            "{key}: clipqc {ours}, reference {reference}"
        );
    }
    for key in ["region_hit_rate", "region_precision"] {
        let v = m[key].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&v), "{key}: {m:#}");
    }
    assert!(m["best_aggregate"].is_string(), "{m:#}");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("AUPRO") && html.contains("magenta"), "the report shows pixel metrics");
}

#[test]
#[ignore = "needs the tiny model and the Python environment (scripts/test.sh)"]
fn bad_masks_are_refused_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (mvtec, config) = samples(tmp.path());
    let gt = mvtec.join("ground_truth");
    let run = || {
        eval(
            &mvtec.join("test"),
            &[
                "--config",
                config.to_str().unwrap(),
                "--profile",
                "tiled",
                "--masks",
                gt.to_str().unwrap(),
            ],
        )
    };
    let small = gt.join("paint_spot/part_0001_mask.png");
    image::GrayImage::new(10, 10).save(&small).unwrap();
    refused(&run(), Some(2), &["paint_spot/part_0001_mask.png", "10×10"]);
    std::fs::write(&small, b"not a png").unwrap();
    refused(&run(), Some(2), &["paint_spot/part_0001_mask.png", "cannot read"]);
    let untiled = profile::config_file(
        tmp.path(),
        "plain.toml",
        &profile::toml("plain", &[], &[SCRATCH, GOOD]),
    );
    let out = eval(
        &mvtec.join("test"),
        &[
            "--config",
            untiled.to_str().unwrap(),
            "--profile",
            "plain",
            "--masks",
            gt.to_str().unwrap(),
        ],
    );
    refused(&out, Some(2), &["no tiles"]);
}

/// `--line-memory`: every image gets a score against the rest of the set in scores.csv, and
/// metrics.json's AUROC of it is the pairwise one of that column (recomputed here); the blend
/// at weight 0 is the anomaly score's own AUROC.
#[test]
#[ignore = "needs the tiny model and the Python environment (scripts/test.sh)"]
fn line_memory_scores_are_in_scores_csv_and_their_auroc_in_metrics_json() {
    let tmp = tempfile::tempdir().unwrap();
    let (mvtec, config) = samples(tmp.path());
    let out = tmp.path().join("out");
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--profile",
        "tiled",
        "--line-memory",
        "--out",
        out.to_str().unwrap(),
    ];
    succeeded(&eval(&mvtec.join("test"), &args));
    let (header, rows) = super::read_csv(&out.join("scores.csv"));
    assert_eq!(header.last().map(String::as_str), Some("line_memory_score"));
    let column = |truth: &str, key: &str| -> Vec<f64> {
        rows.iter()
            .filter(|r| r["truth"] == truth)
            .map(|r| r[key].parse().unwrap_or_else(|_| panic!("{key} in {r:?}")))
            .collect()
    };
    let (pos, neg) = (column("defective", "line_memory_score"), column("normal", "line_memory_score"));
    assert_eq!((pos.len(), neg.len()), (9, 3), "every image has a score (12 images, min_parts 8)");
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    let auroc = m["line_memory_auroc"].as_f64().unwrap();
    assert!((auroc - super::pairwise_auroc(&pos, &neg)).abs() < 1e-12, "{m:#}");
    let weights = m["line_memory_weights"].as_array().unwrap();
    assert_eq!(weights.len(), 11);
    let at_zero = weights[0]["auroc"].as_f64().unwrap();
    assert!((at_zero - m["auroc"].as_f64().unwrap()).abs() < 1e-12, "w = 0 is the anomaly score alone");
    assert!(m["line_memory_best_weight"].is_number(), "{m:#}");
}
