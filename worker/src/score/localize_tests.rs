//! Tiled profiles: aggregation, heatmap, fused map and regions, on hand-made probabilities.

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
    let (q, anomaly, acceptable) = aggregate(&p, Aggregate::Max, &views(&scores), None);
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

    let (q, anomaly, acceptable) = aggregate(&p, Aggregate::MeanMax, &views(&scores), None);
    assert_eq!(q, [(0.05 + 0.70) / 2.0, (0.05 + 0.30) / 2.0, 0.90]);
    assert!((anomaly - (0.10 + 0.90) / 2.0).abs() < 1e-6);
    assert!((acceptable - (0.90 + 0.10) / 2.0).abs() < 1e-6);
}

#[test]
fn without_windows_aggregation_is_the_whole_frame() {
    let p = profile();
    let whole = vec![0.3, 0.3, 0.4];
    let (q, anomaly, acceptable) = aggregate(&p, Aggregate::Max, &[view(&whole)], None);
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

/// `localize` on a frame whose whole view scored `whole` and whose windows `scores`, as
/// `Scorer::decide_views_with` calls it.
fn located(
    windows: &[Window],
    whole: f32,
    scores: &[f32],
    origin: (u32, u32),
    flag: bool,
) -> Localization {
    let probabilities: Vec<Vec<f32>> = std::iter::once(whole)
        .chain(scores.iter().copied())
        .map(probs)
        .collect();
    let map = AnomalyMap::fuse(windows, scores, whole);
    localize(
        &profile(),
        &tiles(),
        origin,
        windows,
        &views(&probabilities),
        map,
        flag,
    )
}

#[test]
fn the_heatmap_is_the_finest_scale_row_major_in_frame_pixels() {
    let windows = grid();
    let scores = [0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.05];
    let l = located(&windows, 0.5, &scores, (100, 50), false);
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
fn the_anomaly_map_is_the_fused_map_in_frame_pixels() {
    let windows = grid();
    let scores = [0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.05];
    let l = located(&windows, 0.5, &scores, (100, 50), false);
    let map = l.anomaly_map.unwrap();
    let fused = AnomalyMap::fuse(&windows, &scores, 0.5).unwrap();
    assert_eq!(map.x_edges, [100, 101, 102, 103, 104]);
    assert_eq!(map.y_edges, [50, 51, 52, 53, 54]);
    assert_eq!(map.scores, fused.scores);
}

/// A row of touching 2-pixel windows, and one more over the first two's seam; the whole frame
/// scores 1, so a cell is `2 / (1 + 1/m)` of its windows' harmonic mean `m` and reaches 0.5
/// when `m` reaches 1/3.
#[test]
fn hot_cells_that_touch_make_one_region_and_apart_they_do_not() {
    let mut windows: Vec<Window> = (0..5)
        .map(|i| Window {
            x: i * 2,
            y: 0,
            side: 2,
            scale: 0,
        })
        .collect();
    windows.push(Window {
        x: 1,
        y: 0,
        side: 2,
        scale: 0,
    });
    let scores = [0.7, 0.1, 0.2, 0.1, 0.95, 0.6];
    let l = located(&windows, 1.0, &scores, (0, 0), true);
    let boxes: Vec<_> = l
        .regions
        .iter()
        .map(|r| (r.x, r.y, r.width, r.height, r.class))
        .collect();
    // Cells [0, 1) (0.82) and [1, 2) (0.79) touch; [2, 3) is 0.29. The last window's cells
    // (0.97) stand apart. The windows' union would have been 3 pixels wide: the map's box is 2.
    assert_eq!(boxes, [(8, 0, 2, 2, 0), (0, 0, 2, 2, 0)], "worst first");
    assert!((l.regions[0].score - 2.0 / (1.0 + 1.0 / 0.95)).abs() < 1e-6);
    assert!(
        (l.regions[1].score - 2.0 / (1.0 + 1.0 / 0.7)).abs() < 1e-6,
        "the hottest cell's"
    );
}

#[test]
fn a_regions_class_is_the_top_defect_class_of_the_worst_window_overlapping_it() {
    let windows: Vec<Window> = [0, 2]
        .into_iter()
        .map(|x| Window {
            x,
            y: 0,
            side: 2,
            scale: 0,
        })
        .collect();
    // The second window is hot, and its defect mass is mostly "chip".
    let probabilities = vec![
        vec![0.5, 0.0, 0.5],
        vec![0.05, 0.0, 0.95],
        vec![0.1, 0.8, 0.1],
    ];
    let map = AnomalyMap::fuse(&windows, &[0.05, 0.9], 0.5);
    let l = localize(
        &profile(),
        &tiles(),
        (0, 0),
        &windows,
        &views(&probabilities),
        map,
        false,
    );
    assert_eq!(l.regions.len(), 1);
    assert_eq!((l.regions[0].x, l.regions[0].width), (2, 2));
    assert_eq!(profile().classes[l.regions[0].class].name, "chip");
}

#[test]
fn a_flagged_verdict_without_hot_cells_points_at_the_hottest_ones() {
    let windows = grid();
    // The fine window in the middle is the warmest; nothing reaches 0.5.
    let mut scores = [0.1f32; 10];
    scores[0] = 0.45;
    scores[5] = 0.3;
    let flagged = located(&windows, 0.2, &scores, (7, 0), true);
    assert_eq!(flagged.regions.len(), 1);
    let r = &flagged.regions[0];
    // The four middle cells are each covered by the warm window and three cool ones.
    assert_eq!((r.x, r.y, r.width, r.height), (8, 1, 2, 2));
    let pass = located(&windows, 0.2, &scores, (7, 0), false);
    assert!(pass.regions.is_empty());
    // A whole frame scored 0 makes every cell 0: the map says nothing, the worst window does.
    let cold = located(&windows, 0.0, &scores, (7, 0), true);
    let r = &cold.regions[0];
    assert_eq!((r.x, r.y, r.width, r.height), (7, 0, 4, 4));
}

#[test]
fn winclip_aggregation_is_the_whole_frame_zero_shot_and_half_the_few_shot_maps_max_with_references()
{
    let p = profile();
    let scores = [0.3, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1];
    let whole = 0.2;
    let probabilities: Vec<Vec<f32>> = std::iter::once(whole)
        .chain(scores.iter().copied())
        .map(probs)
        .collect();
    let v = views(&probabilities);
    let (q, anomaly, acceptable) = aggregate(&p, Aggregate::Winclip, &v, None);
    assert_eq!(q, probs(whole), "zero-shot: the whole frame alone");
    assert!((anomaly - whole).abs() < 1e-6 && (acceptable - (1.0 - whole)).abs() < 1e-6);
    let few_shot_max = 0.7;
    let (q, anomaly, acceptable) = aggregate(&p, Aggregate::Winclip, &v, Some(few_shot_max));
    assert!(
        (anomaly - (whole + few_shot_max) / 2.0).abs() < 1e-6,
        "{anomaly}"
    );
    assert!((acceptable - (1.0 - whole + 1.0 - few_shot_max) / 2.0).abs() < 1e-6);
    assert!((q[0] - (probs(whole)[0] + probs(0.9)[0]) / 2.0).abs() < 1e-6);
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

/// The case: a 1080p frame under `[1, .5, .25]`, a 20-pixel scratch, and a detector
/// that sees it in every window containing it (0.9) and nothing elsewhere (0.1). The finest
/// hot windows' union (the regions before the fused map) is ~400 pixels wide; the map's region
/// is the cells every scale agrees on, and still holds the scratch.
#[test]
fn a_small_defects_region_is_tighter_than_its_windows_union() {
    let mut t = tiles();
    t.scales = vec![1.0, 0.5, 0.25];
    t.max_windows = 1000;
    t.region_threshold = 0.5;
    let windows = t.layout(1920, 1080);
    let scratch = (1000u32, 600u32, 20u32, 4u32);
    let sees = |w: &Window| {
        w.x < scratch.0 + scratch.2
            && scratch.0 < w.x + w.side
            && w.y < scratch.1 + scratch.3
            && scratch.1 < w.y + w.side
    };
    let scores: Vec<f32> = windows
        .iter()
        .map(|w| if sees(w) { 0.9 } else { 0.1 })
        .collect();
    let finest = TileConfig::finest(&windows).unwrap();
    let hot: Vec<&Window> = windows
        .iter()
        .filter(|w| w.scale == finest && sees(w))
        .collect();
    let union = (
        hot.iter().map(|w| w.x).min().unwrap(),
        hot.iter().map(|w| w.y).min().unwrap(),
        hot.iter().map(|w| w.x + w.side).max().unwrap(),
        hot.iter().map(|w| w.y + w.side).max().unwrap(),
    );
    let union_area = u64::from(union.2 - union.0) * u64::from(union.3 - union.1);
    let l = located(&windows, 0.9, &scores, (0, 0), true);
    assert_eq!(l.regions.len(), 1, "{:?}", l.regions);
    let r = &l.regions[0];
    let area = u64::from(r.width) * u64::from(r.height);
    eprintln!(
        "1080p, scales [1, .5, .25]: {} finest windows see the scratch, their union {}×{} = {union_area} px²; \
         the fused map's region {}×{} = {area} px² at ({}, {}), score {:.3}",
        hot.len(),
        union.2 - union.0,
        union.3 - union.1,
        r.width,
        r.height,
        r.x,
        r.y,
        r.score
    );
    assert!(
        area < union_area,
        "{area} px² is not tighter than {union_area}"
    );
    assert!(
        r.x <= scratch.0
            && r.y <= scratch.1
            && r.x + r.width >= scratch.0 + scratch.2
            && r.y + r.height >= scratch.1 + scratch.3,
        "the region {r:?} does not hold the scratch"
    );
}

/// The case: a defect exemplar's clean windows used to be labelled with its class
/// and raised every clean window of a good part that resembled them. Under WinCLIP+ a window
/// is compared with the normal references' windows only, so adding a defect exemplar leaves a
/// good part's windows (their heatmap and fused map) exactly as they were.
#[test]
fn a_defect_exemplar_does_not_raise_a_good_parts_clean_windows() {
    let mut p = profile();
    p.tiles.as_mut().unwrap().scales = vec![0.5];
    p.tiles.as_mut().unwrap().aggregate = Aggregate::Winclip;
    p.exemplars.alpha = 20.0;
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
    let clean = normalized(&[0.05, 0.0, 1.0]);
    let windows: Vec<Window> = [(0, 0), (50, 0), (0, 50), (50, 50)]
        .into_iter()
        .map(|(x, y)| Window {
            x,
            y,
            side: 50,
            scale: 0,
        })
        .collect();
    let entry =
        |id: &str, class: usize, whole: Vec<f32>, windows: Vec<Vec<f32>>| super::bank::Entry {
            id: id.into(),
            class,
            whole,
            window_scales: vec![0.5; windows.len()],
            windows,
            added_at: 0,
            from_feedback: false,
        };
    let classes = ["scratch", "chip", "good"];
    let mut normal_only = ProfileBank::default();
    normal_only.index_by(classes.iter().copied());
    assert!(normal_only.insert(entry("g", 2, clean.clone(), vec![clean.clone(); 4]), 10));
    let mut with_defect = normal_only.clone();
    // A scratched part: its whole frame and one window show the scratch, three are clean.
    let mut scratch_windows = vec![clean.clone(); 3];
    scratch_windows.push(normalized(&[1.0, 0.0, 0.2]));
    assert!(with_defect.insert(
        entry("s", 0, normalized(&[1.0, 0.0, 0.3]), scratch_windows),
        10
    ));
    // A good part whose windows look like the exemplars' clean windows, a little off.
    let part = normalized(&[0.1, 0.02, 1.0]);
    let embeddings = vec![part.clone(); 5];
    let a = s.decide_views_with(&embeddings, &windows, (0, 0), Some(&normal_only));
    let b = s.decide_views_with(&embeddings, &windows, (0, 0), Some(&with_defect));
    let (la, lb) = (a.localization.unwrap(), b.localization.unwrap());
    assert_eq!(la.heatmap, lb.heatmap, "the windows' scores moved");
    assert_eq!(la.anomaly_map, lb.anomaly_map, "the fused map moved");
    assert_eq!(b.outcome, Outcome::Pass);
}
