//! Tiled profiles: aggregation, heatmap and regions, on hand-made probabilities.

use super::localize::{aggregate, localize};
use super::*;
use crate::preprocess::{Aggregate, TileConfig, Window};

fn profile() -> ProfileConfig {
    let class = |name: &str, defect| ClassConfig {
        name: name.into(),
        label: None,
        prompts: vec![name.into()],
        defect,
        threshold: None,
    };
    ProfileConfig {
        templates: vec!["{}".into()],
        review_threshold: 0.6,
        clahe: None,
        view: Default::default(),
        tiles: Some(tiles()),
        states: None,
        exemplars: Default::default(),
        feedback: Default::default(),
        line_memory: None,
        segment: false,
        min_area_mm2: None,
        min_area_pixels: None,
        below_min_area: Default::default(),
        classes: vec![
            class("scratch", true),
            class("chip", true),
            class("good", false),
        ],
    }
}

/// A view's scores from its softmax probabilities over (scratch, chip, good).
fn view(p: &[f32]) -> ViewScore {
    ViewScore {
        probabilities: p.to_vec(),
        anomaly: p[0] + p[1],
        acceptable: p[2],
        nearest: None,
    }
}

fn views(ps: &[Vec<f32>]) -> Vec<ViewScore> {
    ps.iter().map(|p| view(p)).collect()
}

fn tiles() -> TileConfig {
    TileConfig {
        scales: vec![1.0, 0.5],
        overlap: 0.5,
        max_windows: 64,
        max_aspect_ratio: None,
        min_window: 1,
        aggregate: Aggregate::Max,
        region_threshold: 0.5,
        max_regions: 8,
    }
}

#[test]
fn max_aggregation_takes_the_worst_view_for_defects_and_the_whole_frame_for_the_rest() {
    let p = profile();
    let scores = vec![
        vec![0.05, 0.05, 0.90], // whole frame: looks good
        vec![0.10, 0.10, 0.80],
        vec![0.70, 0.20, 0.10], // one window sees a scratch
        vec![0.05, 0.30, 0.65],
    ];
    let (q, anomaly, acceptable) = aggregate(&p, Aggregate::Max, &views(&scores));
    assert_eq!(q, [0.70, 0.30, 0.90]);
    assert!(
        (anomaly - 0.90).abs() < 1e-6,
        "the worst window's defect mass"
    );
    assert!(
        (acceptable - 0.10).abs() < 1e-6,
        "that window's acceptable mass"
    );
    let d = decide_masses(&p, q, anomaly, acceptable);
    assert_eq!(d.outcome, Outcome::Defect);
    assert_eq!(p.classes[d.class].name, "scratch");

    let (q, anomaly, acceptable) = aggregate(&p, Aggregate::MeanMax, &views(&scores));
    assert_eq!(q, [(0.05 + 0.70) / 2.0, (0.05 + 0.30) / 2.0, 0.90]);
    assert!((anomaly - (0.10 + 0.90) / 2.0).abs() < 1e-6);
    assert!((acceptable - (0.90 + 0.10) / 2.0).abs() < 1e-6);
}

#[test]
fn without_windows_aggregation_is_the_whole_frame() {
    let p = profile();
    let whole = vec![0.3, 0.3, 0.4];
    let (q, anomaly, acceptable) = aggregate(&p, Aggregate::Max, &[view(&whole)]);
    assert_eq!(q, whole);
    assert!((anomaly - 0.6).abs() < 1e-6 && (acceptable - 0.4).abs() < 1e-6);
}

/// A 3×3 grid of 2-pixel windows with stride 1 (overlapping neighbours) at scale 1, and one
/// 4-pixel window at scale 0, on a 4×4 area at (100, 50).
fn grid() -> Vec<Window> {
    let mut w = vec![Window {
        x: 0,
        y: 0,
        side: 4,
        scale: 0,
    }];
    for y in 0..3 {
        for x in 0..3 {
            w.push(Window {
                x,
                y,
                side: 2,
                scale: 1,
            });
        }
    }
    w
}

fn probs(defect: f32) -> Vec<f32> {
    vec![defect * 0.8, defect * 0.2, 1.0 - defect]
}

#[test]
fn the_heatmap_is_the_finest_scale_row_major_in_frame_pixels() {
    let p = profile();
    let windows = grid();
    let scores = [0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.05];
    let probabilities: Vec<Vec<f32>> = scores.iter().map(|&s| probs(s)).collect();
    let l = localize(
        &p,
        &tiles(),
        (100, 50),
        &windows,
        &views(&probabilities),
        false,
    );
    assert_eq!(l.views, 11);
    let h = l.heatmap.unwrap();
    assert_eq!((h.rows, h.cols, h.window), (3, 3, 2));
    assert_eq!(h.x, [100, 101, 102]);
    assert_eq!(h.y, [50, 51, 52]);
    for (got, want) in h.scores.iter().zip(&scores[1..]) {
        assert!((got - want).abs() < 1e-6, "{:?}", h.scores);
    }
}

#[test]
fn overlapping_hot_windows_merge_and_separate_ones_do_not() {
    let p = profile();
    // A 5×1 row of 2-pixel windows with stride 2 (touching, not overlapping) at scale 1.
    let windows: Vec<Window> = (0..5)
        .map(|i| Window {
            x: i * 2,
            y: 0,
            side: 2,
            scale: 1,
        })
        .chain([Window {
            x: 1,
            y: 0,
            side: 2,
            scale: 1,
        }])
        .collect();
    // Hot: windows 0 and 5 (overlapping: x 0..2 and 1..3) and window 4 (x 8..10), alone.
    let scores = [0.7, 0.1, 0.2, 0.3, 0.95, 0.6];
    let probabilities: Vec<Vec<f32>> = scores.iter().map(|&s| probs(s)).collect();
    let l = localize(&p, &tiles(), (0, 0), &windows, &views(&probabilities), true);
    let boxes: Vec<_> = l
        .regions
        .iter()
        .map(|r| (r.x, r.y, r.width, r.height, r.class))
        .collect();
    assert_eq!(boxes, [(8, 0, 2, 2, 0), (0, 0, 3, 2, 0)], "worst first");
    assert!((l.regions[0].score - 0.95).abs() < 1e-6);
    assert!(
        (l.regions[1].score - 0.7).abs() < 1e-6,
        "the group's highest"
    );
}

#[test]
fn a_flagged_verdict_without_hot_windows_points_at_its_worst_window() {
    let p = profile();
    let windows = grid();
    let mut scores = [0.1f32; 10];
    scores[0] = 0.45; // the coarse window is the worst, under the threshold
    let probabilities: Vec<Vec<f32>> = scores.iter().map(|&s| probs(s)).collect();
    let flagged = localize(&p, &tiles(), (7, 0), &windows, &views(&probabilities), true);
    assert_eq!(flagged.regions.len(), 1);
    let r = &flagged.regions[0];
    assert_eq!((r.x, r.y, r.width, r.height), (7, 0, 4, 4));
    let pass = localize(
        &p,
        &tiles(),
        (7, 0),
        &windows,
        &views(&probabilities),
        false,
    );
    assert!(pass.regions.is_empty());
}

#[test]
fn a_scratch_seen_by_one_window_makes_the_part_a_defect_and_says_where() {
    // Class embeddings: scratch along x, chip along y, good along z.
    let mut p = profile();
    p.tiles.as_mut().unwrap().scales = vec![0.5];
    let s = Scorer {
        name: "t".into(),
        profile: p,
        class_embeddings: vec![
            vec![1.0, 0.0, 0.0],
            vec![0.0, 1.0, 0.0],
            vec![0.0, 0.0, 1.0],
        ],
        scoring: Scoring::Softmax,
        states: None,
        logit_scale: 100.0,
        logit_bias: 0.0,
    };
    let good = vec![0.0, 0.0, 1.0];
    let windows: Vec<Window> = [(0, 0), (50, 0), (0, 50), (50, 50)]
        .into_iter()
        .map(|(x, y)| Window {
            x,
            y,
            side: 50,
            scale: 0,
        })
        .collect();
    let mut embeddings = vec![good.clone(); 5];
    embeddings[4] = vec![1.0, 0.0, 0.1]; // bottom-right window: a scratch
    let d = s.decide_views(&embeddings, &windows, (10, 20));
    assert_eq!(d.outcome, Outcome::Defect);
    assert_eq!(s.profile.classes[d.class].name, "scratch");
    assert!(d.anomaly_score > 0.99, "{}", d.anomaly_score);
    let l = d.localization.unwrap();
    assert_eq!(l.views, 5);
    let r: Vec<_> = l
        .regions
        .iter()
        .map(|r| (r.x, r.y, r.width, r.height))
        .collect();
    assert_eq!(r, [(60, 70, 50, 50)]);
    // The whole-frame view alone would have passed it.
    assert_eq!(s.decide(&good).outcome, Outcome::Pass);
}
