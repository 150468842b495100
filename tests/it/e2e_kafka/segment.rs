//! Defect masks end to end on the real broker: a worker with the tiny random SAM and a tiled,
//! segmenting profile (every part a DEFECT), a camera calibrated through a route. Every request
//! gets exactly one verdict (the bad ones an ERROR and a dead letter, nothing lost); each
//! DEFECT carries one mask per region, as COCO RLE at the frame's size whose runs add up to
//! its area, with the area in mm², and the worker counts the segmentations.

use std::collections::HashMap;

use super::common::e2e::*;
use super::common::profile::{self, Class, DENT, SCRATCH};

/// Every part a DEFECT (only defect classes), outlined; cameras calibrated by a route.
fn config() -> String {
    let scratch = Class {
        prompts: &["a scratch"],
        ..SCRATCH
    };
    let settings = [
        "segment = true",
        "tiles = { scales = [0.5], overlap = 0.0, max_windows = 8 }",
    ];
    let routes = "\n[[routes]]\ncamera = \"cam-*\"\nmm_per_pixel = 0.1\n";
    profile::toml("default", &settings, &[DENT, scratch]) + routes
}

fn number(v: &serde_json::Value) -> f64 {
    // uint64 is a string in protobuf's JSON mapping, and a zero is left out (null here).
    if v.is_null() {
        return 0.0;
    }
    v.as_f64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
#[ignore = "needs Apache Kafka (scripts/kafka.sh) and the Python Kafka client (scripts/test.sh)"]
fn a_segmenting_profiles_defects_carry_their_masks_and_nothing_is_lost() {
    let e = E2e::start("segment", 2);
    let sam = super::common::tiny_sam();
    let env = [
        ("CLIPQC__MODEL__SAM_DIR", sam.display().to_string()),
        // Room for every request: here each DEFECT must be outlined (the full queue's path
        // is the in-process test's).
        ("CLIPQC__MODEL__SAM_QUEUE", "64".to_string()),
    ];
    let worker = e.worker("segment-a").config(&config()).env(&env).start();
    const N: usize = 40;
    let published = e.produce(N, 10);
    let bad = published.iter().filter(|p| p.bad).count();
    assert_eq!(bad, N / 10);
    // The first verdicts wait for the worker's start (the tiny SAM loads too); then each
    // DEFECT is outlined by SAM on the CPU, seconds apart at most.
    let verdicts = read_all(&e.broker, &e.topics.verdicts, N, START_WITHIN);
    let dead = read_all(&e.broker, &e.topics.dlq, bad, IDLE);

    let mut by_source: HashMap<(i32, i64), Vec<serde_json::Value>> = HashMap::new();
    for v in &verdicts {
        by_source
            .entry(v.source())
            .or_default()
            .push(v.verdict.clone().expect("a JSON verdict"));
    }
    assert_eq!(dead.len(), bad, "{}", worker.log_tail());
    for p in &published {
        let answers = by_source
            .get(&(p.partition, p.offset))
            .unwrap_or_else(|| panic!("no verdict for {p:?}\n{}", worker.log_tail()));
        assert_eq!(answers.len(), 1, "one verdict for {p:?}");
        let v = &answers[0];
        if p.bad {
            assert_eq!(v["outcome"], "OUTCOME_ERROR", "{v}");
            assert!(v.get("masks").is_none(), "{v}");
            continue;
        }
        assert_eq!(v["outcome"], "OUTCOME_DEFECT", "{v}");
        assert_eq!(v["segmentation"], "OK", "{v}");
        let regions = v["regions"].as_array().expect("a tiled DEFECT has regions");
        let masks = v["masks"].as_array().expect("masks");
        assert_eq!(masks.len(), regions.len().min(32), "{v}");
        for (i, m) in masks.iter().enumerate() {
            assert_eq!(number(&m["region"]) as usize, i, "{m}");
            let rle = &m["rle"];
            assert_eq!(rle["size"], serde_json::json!([250, 250]), "{m}");
            let counts: Vec<f64> = rle["counts"]
                .as_array()
                .unwrap()
                .iter()
                .map(number)
                .collect();
            assert_eq!(
                counts.iter().sum::<f64>(),
                250.0 * 250.0,
                "runs cover the frame"
            );
            let ones: f64 = counts.iter().skip(1).step_by(2).sum();
            let area = number(&m["area"]);
            assert_eq!(ones, area, "the area is the mask's pixels: {m}");
            let mm2 = number(&m["area_mm2"]);
            assert!((mm2 - area * 0.01).abs() < 1e-6, "0.1 mm per pixel: {m}");
            if area > 0.0 {
                let b = &m["box"];
                assert!(number(&b["x"]) + number(&b["width"]) <= 250.0, "{m}");
                assert!(number(&b["y"]) + number(&b["height"]) <= 250.0, "{m}");
            }
        }
    }
    // Each DEFECT was segmented before its verdict was published: the count is final.
    let count = super::common::metric(&worker.metrics(), "clipqc_segment_seconds_count", &[]);
    assert!(
        count >= (N - bad) as f64,
        "every DEFECT segmented once (at-least-once may redo some): {count}"
    );
    assert!(worker.terminate(), "clean exit");
}
