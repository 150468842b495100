//! Tiled profiles: the windows' scores made into the image's, and where the defect is.
//!
//! Aggregation (a profile's `tiles.aggregate`), over the views (the whole frame and every
//! window), each with its own class distribution and its anomaly score ([`ViewScore`]: the
//! defect mass, blended with the state prompts' verdict when the profile has them):
//! - `max`: a defect class scores its largest probability over the views; the image's
//!   anomaly score is the largest defect mass of any view, and the acceptable side's mass is
//!   that same view's; an acceptable class scores as in the whole-frame view.
//! - `mean_max`: the mean of the whole-frame view's value and the worst window's (WinCLIP's
//!   image score), for defect classes, the anomaly score and the acceptable mass alike.
//!
//! So one small scratch seen by one window at 0.9 makes the part 90 % likely defective,
//! however clean the rest of the frame looks. The outcome rules then run on those numbers
//! unchanged.
//!
//! Where: the finest scale's windows form the `heatmap` (their anomaly scores, row-major);
//! the finest windows at or over `tiles.region_threshold` are merged where they overlap into
//! `regions` (the union's box, the highest score, the class of the highest window), the worst
//! first. A DEFECT or REVIEW verdict with no such window still points somewhere: its single
//! worst window, of any scale.

use serde::Serialize;

use super::{top_of_side, ProfileConfig, ViewScore};
use crate::preprocess::{Aggregate, TileConfig, Window};

/// Where a tiled profile found the defect, in source-frame pixels (after EXIF orientation,
/// offset by the region of interest).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Localization {
    /// How many views were scored: the whole frame and every window.
    pub views: u32,
    pub regions: Vec<DefectRegion>,
    /// `None` when the frame was too small for any window.
    pub heatmap: Option<Heatmap>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DefectRegion {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    /// Index into the profile's classes: the top defect class of the region's worst window.
    pub class: usize,
    /// The region's anomaly score (its worst window's).
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
/// (`views[0]` the whole frame).
pub(super) fn aggregate(
    profile: &ProfileConfig,
    how: Aggregate,
    views: &[ViewScore],
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
    let mut probabilities = whole.probabilities.clone();
    for (c, class) in profile.classes.iter().enumerate() {
        if class.defect {
            probabilities[c] = match how {
                Aggregate::Max => class_max(c, views),
                Aggregate::MeanMax => (whole.probabilities[c] + class_max(c, &views[1..])) / 2.0,
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
    };
    (probabilities, anomaly, accept)
}

/// The heatmap and regions of a frame whose windows (`windows[i]` scored `views[i]`) lie at
/// `origin`; `flag` says whether the verdict needs a region even when no window reaches the
/// threshold (DEFECT and REVIEW).
pub(super) fn localize(
    profile: &ProfileConfig,
    tiles: &TileConfig,
    origin: (u32, u32),
    windows: &[Window],
    views: &[ViewScore],
    flag: bool,
) -> Localization {
    let count = 1 + windows.len() as u32;
    let Some(finest) = TileConfig::finest(windows) else {
        return Localization {
            views: count,
            regions: Vec::new(),
            heatmap: None,
        };
    };
    let scores: Vec<f32> = views.iter().map(|v| v.anomaly).collect();
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

    let hot: Vec<usize> = fine
        .iter()
        .copied()
        .filter(|&i| scores[i] >= tiles.region_threshold && scores[i] > 0.0)
        .collect();
    let mut regions: Vec<DefectRegion> = components(windows, &hot)
        .into_iter()
        .map(|group| region(profile, windows, views, &group, origin))
        .collect();
    if regions.is_empty() && flag {
        let worst = (0..windows.len()).max_by(|&a, &b| scores[a].total_cmp(&scores[b]));
        regions.extend(worst.map(|i| region(profile, windows, views, &[i], origin)));
    }
    regions.sort_by(|a, b| b.score.total_cmp(&a.score));
    regions.truncate(tiles.max_regions as usize);
    Localization {
        views: count,
        regions,
        heatmap: Some(heatmap),
    }
}

/// The windows of `members` grouped where they overlap (transitively).
fn components(windows: &[Window], members: &[usize]) -> Vec<Vec<usize>> {
    let mut group: Vec<usize> = (0..members.len()).collect();
    fn root(group: &mut [usize], mut i: usize) -> usize {
        while group[i] != i {
            group[i] = group[group[i]];
            i = group[i];
        }
        i
    }
    for a in 0..members.len() {
        for b in a + 1..members.len() {
            if windows[members[a]].overlaps(&windows[members[b]]) {
                let (ra, rb) = (root(&mut group, a), root(&mut group, b));
                group[ra.max(rb)] = ra.min(rb);
            }
        }
    }
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for (a, &member) in members.iter().enumerate() {
        let r = root(&mut group, a);
        let at = *index.entry(r).or_insert_with(|| {
            out.push(Vec::new());
            out.len() - 1
        });
        out[at].push(member);
    }
    out
}

fn region(
    profile: &ProfileConfig,
    windows: &[Window],
    views: &[ViewScore],
    group: &[usize],
    origin: (u32, u32),
) -> DefectRegion {
    let worst = *group
        .iter()
        .max_by(|&&a, &&b| views[a].anomaly.total_cmp(&views[b].anomaly))
        .expect("a region has a window. This is a bug.");
    let x0 = group.iter().map(|&i| windows[i].x).min().unwrap_or(0);
    let y0 = group.iter().map(|&i| windows[i].y).min().unwrap_or(0);
    let x1 = group
        .iter()
        .map(|&i| windows[i].x + windows[i].side)
        .max()
        .unwrap_or(0);
    let y1 = group
        .iter()
        .map(|&i| windows[i].y + windows[i].side)
        .max()
        .unwrap_or(0);
    let class = top_of_side(profile, &views[worst].probabilities, true)
        .or_else(|| top_of_side(profile, &views[worst].probabilities, false))
        .expect("a profile has classes. This is a bug.");
    DefectRegion {
        x: x0 + origin.0,
        y: y0 + origin.1,
        width: x1 - x0,
        height: y1 - y0,
        class,
        score: views[worst].anomaly,
    }
}
