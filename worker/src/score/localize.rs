//! Tiled profiles: the windows' scores made into the image's, and where the defect is.
//!
//! Aggregation (a profile's `tiles.aggregate`), over the views (the whole frame and every
//! window), each with its own class distribution and its anomaly score ([`ViewScore`]: the
//! defect mass, blended with the state prompts' verdict when the profile has them):
//! - `max`: a defect class scores its largest probability over the views; the image's
//!   anomaly score is the largest defect mass of any view, and the acceptable side's mass is
//!   that same view's; an acceptable class scores as in the whole-frame view. So one small
//!   scratch seen by one window at 0.9 makes the part 90 % likely defective, however clean
//!   the rest of the frame looks.
//! - `mean_max`: the mean of the whole-frame view's value and the worst window's, for defect
//!   classes, the anomaly score and the acceptable mass alike. (Earlier docs called this
//!   WinCLIP's image score: it is not, see `winclip`.)
//! - `winclip`: WinCLIP's image score as anomalib computes it (`WinClipModel.forward`):
//!   zero-shot, the whole-frame view's alone (the windows only say where); with normal
//!   references (a profile whose exemplar bank holds an acceptable exemplar), half the
//!   whole-frame view's and half the fused map's maximum. anomalib's second half is the max
//!   of its few-shot map (visual association with the references); here the references act
//!   inside every view's scores (the exemplar cache, [`super::Scorer::view_with`]), so the
//!   map's max carries them. Defect classes score as `mean_max` with references, as the
//!   whole frame without; the acceptable mass is the complement's counterpart
//!   (`(acceptable_whole + 1 − map max) / 2` with references).
//!
//! The outcome rules then run on those numbers unchanged.
//!
//! Where: every view meets in the fused multi-scale map ([`AnomalyMap`], WinCLIP's harmonic
//! aggregation), the verdict's `anomaly_map`. Its cells at or over `tiles.region_threshold`
//! that touch along a side make the `regions` (their cells' box, the hottest cell's score,
//! the top defect class of the highest-scoring window overlapping the box), the worst first.
//! A DEFECT or REVIEW verdict with no such cell still points somewhere: the hottest cells
//! (the worst window when the map is 0 everywhere). The finest scale's windows still form the
//! `heatmap` (their anomaly scores, row-major), as consumers of earlier verdicts read it.

use serde::Serialize;

use super::anomaly_map::AnomalyMap;
use super::{top_of_side, ProfileConfig, ViewScore};
use crate::preprocess::{Aggregate, TileConfig, Window};

/// Where a tiled profile found the defect, in source-frame pixels (after EXIF orientation,
/// offset by the region of interest).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Localization {
    /// How many views were scored: the whole frame and every window.
    pub views: u32,
    pub regions: Vec<DefectRegion>,
    /// The finest scale's windows. `None` when the frame was too small for any window.
    pub heatmap: Option<Heatmap>,
    /// Every scale and the whole frame fused. `None` when the frame was too small for any
    /// window.
    pub anomaly_map: Option<AnomalyMap>,
    /// The image's anomaly score under each `tiles.aggregate`, whichever the profile uses:
    /// `clipqc eval` ranks them on the user's images without scoring them three times.
    pub aggregates: AggregateScores,
}

/// The anomaly score of one image under each aggregation rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct AggregateScores {
    pub max: f32,
    pub mean_max: f32,
    pub winclip: f32,
}

impl AggregateScores {
    pub const NAMES: [&'static str; 3] = ["max", "mean_max", "winclip"];

    /// In the order of [`Self::NAMES`].
    pub fn values(&self) -> [f32; 3] {
        [self.max, self.mean_max, self.winclip]
    }
}

/// [`aggregate`]'s anomaly score under every rule.
pub(super) fn aggregate_scores(
    profile: &ProfileConfig,
    views: &[ViewScore],
    few_shot_max: Option<f32>,
) -> AggregateScores {
    let score = |how| aggregate(profile, how, views, few_shot_max).1;
    AggregateScores {
        max: score(Aggregate::Max),
        mean_max: score(Aggregate::MeanMax),
        winclip: score(Aggregate::Winclip),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DefectRegion {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    /// Index into the profile's classes: the top defect class of the highest-scoring window
    /// overlapping the region.
    pub class: usize,
    /// The region's anomaly score: its hottest cell's in the fused map (the worst window's
    /// when the map has no hot spot).
    pub score: f32,
}

/// The finest scale's windows' anomaly scores, self-describing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Heatmap {
    pub rows: u32,
    pub cols: u32,
    /// The windows' side in source pixels.
    pub window: u32,
    /// The left edge of each column's windows.
    pub x: Vec<u32>,
    /// The top edge of each row's windows.
    pub y: Vec<u32>,
    /// Row-major: `scores[row * cols + col]`.
    pub scores: Vec<f32>,
}

/// The image's class probabilities, anomaly score and acceptable mass from its views'
/// (`views[0]` the whole frame) and, for `winclip`, the maximum of WinCLIP+'s few-shot map
/// when the profile has normal references (anomalib: `(image_scores +
/// few_shot_scores.amax()) / 2`).
pub(super) fn aggregate(
    profile: &ProfileConfig,
    how: Aggregate,
    views: &[ViewScore],
    few_shot_max: Option<f32>,
) -> (Vec<f32>, f32, f32) {
    let whole = &views[0];
    let worst = views[1..]
        .iter()
        .max_by(|a, b| a.anomaly.total_cmp(&b.anomaly));
    let Some(worst) = worst else {
        return (whole.probabilities.clone(), whole.anomaly, whole.acceptable);
    };
    let class_max =
        |c: usize, from: &[ViewScore]| from.iter().map(|v| v.probabilities[c]).fold(0f32, f32::max);
    let mean_max = |c: usize| (whole.probabilities[c] + class_max(c, &views[1..])) / 2.0;
    let mut probabilities = whole.probabilities.clone();
    for (c, class) in profile.classes.iter().enumerate() {
        if class.defect {
            probabilities[c] = match how {
                Aggregate::Max => class_max(c, views),
                Aggregate::MeanMax => mean_max(c),
                Aggregate::Winclip if few_shot_max.is_some() => mean_max(c),
                Aggregate::Winclip => whole.probabilities[c],
            };
        }
    }
    let (anomaly, accept) = match how {
        Aggregate::Max if whole.anomaly >= worst.anomaly => (whole.anomaly, whole.acceptable),
        Aggregate::Max => (worst.anomaly, worst.acceptable),
        Aggregate::MeanMax => (
            (whole.anomaly + worst.anomaly) / 2.0,
            (whole.acceptable + worst.acceptable) / 2.0,
        ),
        Aggregate::Winclip => match few_shot_max {
            Some(f) => (
                (whole.anomaly + f) / 2.0,
                (whole.acceptable + 1.0 - f) / 2.0,
            ),
            None => (whole.anomaly, whole.acceptable),
        },
    };
    (probabilities, anomaly, accept)
}

/// The heatmap, the fused map and the regions of a frame whose windows (`windows[i]` scored
/// `views[1 + i]`, `views[0]` the whole frame) lie at `origin`; `map` their fused map (in
/// the windows' coordinates, [`AnomalyMap::fuse`]); `flag` says whether the verdict needs a
/// region even when no cell reaches the threshold (DEFECT and REVIEW).
pub(super) fn localize(
    profile: &ProfileConfig,
    tiles: &TileConfig,
    origin: (u32, u32),
    windows: &[Window],
    views: &[ViewScore],
    map: Option<AnomalyMap>,
    flag: bool,
) -> Localization {
    let count = views.len() as u32;
    let (Some(finest), Some(map)) = (TileConfig::finest(windows), map) else {
        return Localization {
            views: count,
            regions: Vec::new(),
            heatmap: None,
            anomaly_map: None,
            aggregates: AggregateScores::default(),
        };
    };
    let windows_views = &views[1..];
    let scores: Vec<f32> = windows_views.iter().map(|v| v.anomaly).collect();
    let fine: Vec<usize> = (0..windows.len())
        .filter(|&i| windows[i].scale == finest)
        .collect();
    let mut xs: Vec<u32> = fine.iter().map(|&i| windows[i].x).collect();
    let mut ys: Vec<u32> = fine.iter().map(|&i| windows[i].y).collect();
    xs.sort_unstable();
    xs.dedup();
    ys.sort_unstable();
    ys.dedup();
    let heatmap = Heatmap {
        rows: ys.len() as u32,
        cols: xs.len() as u32,
        window: windows[fine[0]].side,
        x: xs.iter().map(|x| x + origin.0).collect(),
        y: ys.iter().map(|y| y + origin.1).collect(),
        // Windows are laid out row by row.
        scores: fine.iter().map(|&i| scores[i]).collect(),
    };

    let threshold = tiles.region_threshold;
    let mut groups = map.components(|s| s >= threshold && s > 0.0);
    if groups.is_empty() && flag {
        // Nothing reaches the threshold, yet the verdict says DEFECT or REVIEW: point at the
        // hottest cells. A map without a hot spot at all (every cell 0: a whole frame scored
        // 0) says nothing, so then the worst window, as before the map.
        // "Hottest": within a millionth of the maximum, so cells the same windows make equal
        // are not told apart by the order their reciprocals were summed in.
        let max = map.max();
        if max > 0.0 {
            groups = map.components(|s| s >= max * (1.0 - 1e-6));
        }
    }
    let mut regions: Vec<DefectRegion> = groups
        .iter()
        .map(|group| region(profile, &map, windows, windows_views, group, origin))
        .collect();
    if regions.is_empty() && flag {
        let worst = (0..windows.len()).max_by(|&a, &b| scores[a].total_cmp(&scores[b]));
        regions.extend(worst.map(|i| {
            let w = &windows[i];
            DefectRegion {
                x: w.x + origin.0,
                y: w.y + origin.1,
                width: w.side,
                height: w.side,
                class: top_class(profile, &windows_views[i]),
                score: scores[i],
            }
        }));
    }
    regions.sort_by(|a, b| b.score.total_cmp(&a.score));
    regions.truncate(tiles.max_regions as usize);
    Localization {
        views: count,
        regions,
        heatmap: Some(heatmap),
        anomaly_map: Some(map.offset(origin)),
        aggregates: AggregateScores::default(),
    }
}

/// A group of the map's cells as a region: its cells' box, its hottest cell's score, and the
/// top defect class of the highest-scoring window overlapping the box (of any scale).
fn region(
    profile: &ProfileConfig,
    map: &AnomalyMap,
    windows: &[Window],
    views: &[ViewScore],
    group: &[usize],
    origin: (u32, u32),
) -> DefectRegion {
    let (x, y, width, height) = map.bounding_box(group);
    let score = group.iter().map(|&i| map.scores[i]).fold(0f32, f32::max);
    let overlaps =
        |w: &Window| w.x < x + width && x < w.x + w.side && w.y < y + height && y < w.y + w.side;
    let worst = (0..windows.len())
        .filter(|&i| overlaps(&windows[i]))
        .max_by(|&a, &b| views[a].anomaly.total_cmp(&views[b].anomaly))
        .expect("the windows cover every cell. This is a bug.");
    DefectRegion {
        x: x + origin.0,
        y: y + origin.1,
        width,
        height,
        class: top_class(profile, &views[worst]),
        score,
    }
}

/// A view's top defect class (its top class when the profile has no defect class).
fn top_class(profile: &ProfileConfig, view: &ViewScore) -> usize {
    top_of_side(profile, &view.probabilities, true)
        .or_else(|| top_of_side(profile, &view.probabilities, false))
        .expect("a profile has classes. This is a bug.")
}
