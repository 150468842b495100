//! The metric code of `clipqc eval` against scikit-learn 1.8 (tests/requirements.txt) on
//! fixed score vectors made here: distinct scores, ties, one class only, a single image.

use std::collections::BTreeMap;
use std::process::Command;

use clipqc::cli::eval::metrics::{self, Curve};
use serde_json::{json, Value};

/// A deterministic score vector: `n` samples from a linear congruential generator, rounded
/// to `decimals` (few decimals: many ties).
fn lcg_case(n: usize, decimals: i32, seed: u64) -> Vec<(f64, bool)> {
    let mut x = seed;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 11) as f64 / (1u64 << 53) as f64
    };
    let scale = 10f64.powi(decimals);
    (0..n)
        .map(|_| {
            let positive = next() < 0.4;
            // Defects score higher on average, with overlap.
            let s = (next() * 0.7 + if positive { 0.3 } else { 0.0 }).min(1.0);
            ((s * scale).round() / scale, positive)
        })
        .collect()
}

const SKLEARN: &str = r#"
import json, sys, warnings
import numpy as np
from sklearn.metrics import roc_auc_score, average_precision_score, precision_recall_curve, roc_curve
warnings.simplefilter("ignore")
out = {}
for name, case in json.load(sys.stdin).items():
    y = np.array([int(p) for _, p in case["samples"]]); s = np.array([v for v, _ in case["samples"]], dtype=float)
    r = {}
    # One class only: scikit-learn 1.8 warns and returns NaN (older versions raise).
    try: a = float(roc_auc_score(y, s))
    except ValueError: a = float("nan")
    r["auroc"] = None if np.isnan(a) else a
    if y.sum() == 0:
        r["ap"] = None; r["f1"] = None; r["op"] = None
    else:
        r["ap"] = float(average_precision_score(y, s))
        p, rc, t = precision_recall_curve(y, s, drop_intermediate=False)
        p, rc = p[:-1], rc[:-1]
        f1 = np.where(p + rc > 0, 2 * p * rc / np.where(p + rc > 0, p + rc, 1), 0.0)
        best = f1.max(); r["f1"] = float(best)
        r["f1_threshold"] = float(t[f1 >= best - 1e-12].max())
        ops = {}
        for R in case["recalls"]:
            if (y == 0).any():
                fpr, tpr, th = roc_curve(y, s, drop_intermediate=False)
                i = int(np.argmax(tpr >= R - 1e-12)); ops[str(R)] = [float(th[i]), float(fpr[i])]
            else:
                # roc_curve needs both classes: the highest threshold reaching R by hand.
                order = np.sort(s[y == 1])[::-1]; k = int(np.ceil(R * len(order) - 1e-9))
                ops[str(R)] = [float(order[max(k, 1) - 1]), None]
        r["op"] = ops
    out[name] = r
print(json.dumps(out))
"#;

fn sklearn(cases: &Value) -> Value {
    use std::io::Write;
    let mut child = Command::new("python")
        .args(["-c", SKLEARN])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python (the project environment: run the tests through scripts/test.sh)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(cases.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "scikit-learn reference failed (tests/requirements.txt, installed by scripts/test.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
#[ignore = "compares with scikit-learn (scripts/test.sh)"]
fn metrics_match_scikit_learn_on_fixed_score_vectors() {
    let mut cases: BTreeMap<&str, Vec<(f64, bool)>> = BTreeMap::new();
    cases.insert("distinct_200", lcg_case(200, 9, 1));
    cases.insert("ties_60", lcg_case(60, 1, 2));
    cases.insert("heavy_ties_30", lcg_case(30, 0, 3));
    cases.insert(
        "all_tied",
        vec![(0.5, true), (0.5, false), (0.5, false), (0.5, true)],
    );
    cases.insert(
        "perfect",
        vec![(0.9, true), (0.8, true), (0.3, false), (0.1, false)],
    );
    cases.insert(
        "inverted",
        vec![(0.1, true), (0.2, true), (0.8, false), (0.9, false)],
    );
    cases.insert("all_defective", vec![(0.2, true), (0.7, true), (0.7, true)]);
    cases.insert("all_normal", vec![(0.2, false), (0.7, false)]);
    cases.insert("single_defective", vec![(0.4, true)]);
    cases.insert("single_normal", vec![(0.4, false)]);
    let recalls = [0.5, 0.9, 0.99, 1.0];
    let input: Value = cases
        .iter()
        .map(|(k, v)| (k.to_string(), json!({"samples": v, "recalls": recalls})))
        .collect::<serde_json::Map<_, _>>()
        .into();
    let reference = sklearn(&input);
    // Guard against a vacuous pass: most cases must have compared real numbers.
    let defined = |key: &str| {
        cases
            .keys()
            .filter(|k| reference[**k][key].is_f64())
            .count()
    };
    assert_eq!((defined("auroc"), defined("ap")), (6, 8), "{reference}");
    for (name, samples) in &cases {
        let r = &reference[name];
        let c = Curve::new(samples);
        let auroc = metrics::auroc(&c).ok();
        match r["auroc"].as_f64() {
            Some(want) => assert!(
                close(auroc.unwrap(), want),
                "{name}: AUROC {auroc:?} vs {want}"
            ),
            None => assert!(
                auroc.is_none(),
                "{name}: sklearn has no AUROC, we have {auroc:?}"
            ),
        }
        let ap = metrics::average_precision(&c).ok();
        match r["ap"].as_f64() {
            Some(want) => assert!(close(ap.unwrap(), want), "{name}: AP {ap:?} vs {want}"),
            None => assert!(ap.is_none(), "{name}: AP {ap:?} without defects"),
        }
        let f1 = metrics::f1_max(&c).ok();
        match r["f1"].as_f64() {
            Some(want) => {
                let f1 = f1.unwrap();
                assert!(close(f1.f1, want), "{name}: F1 {} vs {want}", f1.f1);
                let t = r["f1_threshold"].as_f64().unwrap();
                assert_eq!(f1.threshold, t, "{name}: F1 threshold");
            }
            None => assert!(f1.is_none()),
        }
        for recall in recalls {
            let op = metrics::operating_point(&c, recall).ok();
            // Python keys: str(1.0) is "1.0", as Rust's Debug.
            let want = &r["op"][format!("{recall:?}")];
            if want.is_null() {
                assert!(op.is_none(), "{name}: operating point without defects");
                continue;
            }
            let op = op.unwrap();
            assert_eq!(op.threshold, want[0].as_f64().unwrap(), "{name} @ {recall}");
            assert!(op.recall >= recall - 1e-12);
            match want[1].as_f64() {
                Some(fpr) => assert!(
                    close(op.false_alarm_rate.unwrap(), fpr),
                    "{name} @ {recall}"
                ),
                None => assert!(op.false_alarm_rate.is_none()),
            }
        }
    }
}
