//! The fused multi-scale anomaly map: where a tiled profile's views say the defect is.
//!
//! WinCLIP's aggregation (Jeong et al., CVPR 2023; anomalib's `winclip/utils.py`
//! `harmonic_aggregation` and `torch_model.py` `_compute_zero_shot_scores`), on the worker's
//! windows instead of a ViT's patch grid:
//! - **cells**: the frame is cut at every distinct window edge of every scale, so each cell
//!   lies wholly inside or wholly outside each window;
//! - **per scale**: a cell takes the harmonic mean of the anomaly scores of that scale's
//!   windows covering it (`n / Σ 1/sᵢ`; 0 when one of them is 0, and 0 when none covers it,
//!   as anomalib's `nan_to_num`);
//! - **across scales**: the harmonic mean of the per-scale maps and the whole-frame view's
//!   score, `(S + 1) / (1/s_whole + Σ 1/map_s)` over the S scales that made windows.
//!
//! The harmonic mean is pulled down by the low scores: a cell is hot only where the windows of
//! every scale around it agree, which is what makes the map sharper than any one scale's
//! windows, and what makes a clean-looking whole frame cool every cell. Windows of every scale
//! cover the whole frame (see `preprocess::windows`), so every cell is covered at every scale.
//!
//! With normal references (WinCLIP+, [`AnomalyMap::few_shot`]): the same cells, per scale the
//! harmonic mean of the windows' visual association scores, then the arithmetic mean over
//! scales; the map is the cell-wise mean of the zero-shot map and that
//! ([`AnomalyMap::mean_with`]), as anomalib's `forward` with `k_shot`.
//!
//! Guarantees: pure and deterministic; a cell's value depends only on the whole-frame score
//! and the scores of the windows that contain it (`locality`: a change inside the frame moves
//! no cell outside the windows that see it, but through the whole-frame term); O(windows ×
//! cells they cover) time, `cells ≤ (2 × windows)²` values.

use serde::Serialize;

use crate::preprocess::Window;

/// The fused map in source-frame pixels (after EXIF orientation, offset by the region of
/// interest): column `c` spans `x_edges[c]..x_edges[c + 1]`, row `r` `y_edges[r]..y_edges[r + 1]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AnomalyMap {
    pub x_edges: Vec<u32>,
    pub y_edges: Vec<u32>,
    /// Row-major: `scores[row × cols + col]`, `(x_edges.len() − 1) × (y_edges.len() − 1)` values.
    pub scores: Vec<f32>,
}

/// A cell's box: its first column and row in pixels, and its width and height.
pub type CellBox = (u32, u32, u32, u32);

impl AnomalyMap {
    /// The map of a frame's windows (`scores[i]` the anomaly score of `windows[i]`) and its
    /// whole-frame view's score `whole`, in the windows' coordinates. `None` without windows.
    pub fn fuse(windows: &[Window], scores: &[f32], whole: f32) -> Option<Self> {
        let (x_edges, y_edges, per_scale) = per_scale(windows, scores)?;
        // f64 throughout: 1/0 = ∞ and n/∞ = 0 carry a zero score through both harmonic means,
        // as float32 does in anomalib's tensors.
        let mut inverse = vec![1.0 / f64::from(whole); per_scale[0].len()];
        for map in &per_scale {
            for (inv, v) in inverse.iter_mut().zip(map) {
                *inv += 1.0 / v;
            }
        }
        let views = (per_scale.len() + 1) as f64;
        let scores = inverse.iter().map(|inv| (views / inv) as f32).collect();
        Some(Self {
            x_edges,
            y_edges,
            scores,
        })
    }

    /// WinCLIP+'s few-shot map (anomalib's `_compute_few_shot_scores`): per scale, the harmonic
    /// aggregation of the windows' visual association scores `scores` (as [`Self::fuse`]),
    /// then the arithmetic mean over the scales. anomalib adds a patch-level term, the ViT's
    /// patch tokens against the references'; the worker embeds windows, not patch tokens, so
    /// the mean is over the window scales alone. `None` without windows.
    pub fn few_shot(windows: &[Window], scores: &[f32]) -> Option<Self> {
        let (x_edges, y_edges, per_scale) = per_scale(windows, scores)?;
        let n = per_scale.len() as f64;
        let mut sum = vec![0f64; per_scale[0].len()];
        for map in &per_scale {
            sum.iter_mut().zip(map).for_each(|(s, v)| *s += v);
        }
        Some(Self {
            x_edges,
            y_edges,
            scores: sum.iter().map(|s| (s / n) as f32).collect(),
        })
    }

    /// The cell-wise mean of two maps of the same windows (anomalib's few-shot WinCLIP:
    /// `(multi_scale_scores + few_shot_scores) / 2`).
    pub fn mean_with(mut self, other: &AnomalyMap) -> Self {
        assert!(
            self.x_edges == other.x_edges && self.y_edges == other.y_edges,
            "maps of the same windows. This is a bug."
        );
        self.scores
            .iter_mut()
            .zip(&other.scores)
            .for_each(|(a, b)| *a = (*a + b) / 2.0);
        self
    }

    pub fn cols(&self) -> usize {
        self.x_edges.len() - 1
    }

    pub fn rows(&self) -> usize {
        self.y_edges.len() - 1
    }

    /// The highest cell's score.
    pub fn max(&self) -> f32 {
        self.scores.iter().copied().fold(0f32, f32::max)
    }

    /// Cell `i` (row-major)'s box.
    pub fn cell(&self, i: usize) -> CellBox {
        let (r, c) = (i / self.cols(), i % self.cols());
        (
            self.x_edges[c],
            self.y_edges[r],
            self.x_edges[c + 1] - self.x_edges[c],
            self.y_edges[r + 1] - self.y_edges[r],
        )
    }

    /// The score of the cell holding pixel `(x, y)`; 0 outside the map.
    pub fn at(&self, x: u32, y: u32) -> f32 {
        let find = |edges: &[u32], v: u32| {
            (v >= edges[0] && v < edges[edges.len() - 1])
                .then(|| edges.partition_point(|&e| e <= v) - 1)
        };
        match (find(&self.x_edges, x), find(&self.y_edges, y)) {
            (Some(c), Some(r)) => self.scores[r * self.cols() + c],
            _ => 0.0,
        }
    }

    /// The map moved by `(dx, dy)` pixels (the region of interest's offset).
    pub fn offset(mut self, (dx, dy): (u32, u32)) -> Self {
        self.x_edges.iter_mut().for_each(|e| *e += dx);
        self.y_edges.iter_mut().for_each(|e| *e += dy);
        self
    }

    /// The groups of cells for which `hot` holds that touch along a side (4-connectivity),
    /// each listed row-major, the groups in the order of their first cell.
    pub fn components(&self, hot: impl Fn(f32) -> bool) -> Vec<Vec<usize>> {
        let (cols, rows) = (self.cols(), self.rows());
        let mut seen = vec![false; self.scores.len()];
        let mut out = Vec::new();
        for start in 0..self.scores.len() {
            if seen[start] || !hot(self.scores[start]) {
                continue;
            }
            seen[start] = true;
            let mut group = vec![start];
            let mut stack = vec![start];
            while let Some(i) = stack.pop() {
                let (r, c) = (i / cols, i % cols);
                let neighbours = [
                    (r > 0).then(|| i - cols),
                    (r + 1 < rows).then(|| i + cols),
                    (c > 0).then(|| i - 1),
                    (c + 1 < cols).then(|| i + 1),
                ];
                for j in neighbours.into_iter().flatten() {
                    if !seen[j] && hot(self.scores[j]) {
                        seen[j] = true;
                        group.push(j);
                        stack.push(j);
                    }
                }
            }
            group.sort_unstable();
            out.push(group);
        }
        out
    }

    /// The smallest box holding the cells of `group`.
    pub fn bounding_box(&self, group: &[usize]) -> CellBox {
        let cols = self.cols();
        let c0 = group.iter().map(|&i| i % cols).min().unwrap_or(0);
        let c1 = group.iter().map(|&i| i % cols).max().unwrap_or(0);
        let r0 = group.iter().map(|&i| i / cols).min().unwrap_or(0);
        let r1 = group.iter().map(|&i| i / cols).max().unwrap_or(0);
        (
            self.x_edges[c0],
            self.y_edges[r0],
            self.x_edges[c1 + 1] - self.x_edges[c0],
            self.y_edges[r1 + 1] - self.y_edges[r0],
        )
    }

    /// The map bilinearly upsampled to a `width`×`height` frame (row-major), as anomalib
    /// upsamples its patch map: each cell's value sits at its centre and every pixel (at its
    /// centre) is interpolated between the nearest cell centres around it, clamped at the
    /// edges. The map is in the frame's coordinates (its own origin at 0, 0).
    pub fn upsample(&self, width: u32, height: u32) -> Vec<f32> {
        let centres = |edges: &[u32]| -> Vec<f64> {
            edges
                .windows(2)
                .map(|e| (f64::from(e[0]) + f64::from(e[1])) / 2.0)
                .collect()
        };
        // For each pixel along an axis: the two cells around it and the weight of the second.
        let axis = |len: u32, centres: &[f64]| -> Vec<(usize, usize, f32)> {
            (0..len)
                .map(|p| {
                    let at = f64::from(p) + 0.5;
                    let hi = centres.partition_point(|&c| c <= at);
                    if hi == 0 {
                        (0, 0, 0.0)
                    } else if hi == centres.len() {
                        (hi - 1, hi - 1, 0.0)
                    } else {
                        let (a, b) = (centres[hi - 1], centres[hi]);
                        (hi - 1, hi, ((at - a) / (b - a)) as f32)
                    }
                })
                .collect()
        };
        let xs = axis(width, &centres(&self.x_edges));
        let ys = axis(height, &centres(&self.y_edges));
        let cols = self.cols();
        let v = |r: usize, c: usize| self.scores[r * cols + c];
        let mut out = Vec::with_capacity(width as usize * height as usize);
        for &(r0, r1, ty) in &ys {
            for &(c0, c1, tx) in &xs {
                let top = v(r0, c0) * (1.0 - tx) + v(r0, c1) * tx;
                let bottom = v(r1, c0) * (1.0 - tx) + v(r1, c1) * tx;
                out.push(top * (1.0 - ty) + bottom * ty);
            }
        }
        out
    }
}

/// The cells' edges of `windows` and, per scale that made windows (in increasing scale index
/// order), each cell's harmonic mean of the `scores` of that scale's windows covering it (0 if
/// one is 0 or none covers it, as anomalib's `harmonic_aggregation`). `None` without windows.
#[allow(clippy::type_complexity)]
fn per_scale(windows: &[Window], scores: &[f32]) -> Option<(Vec<u32>, Vec<u32>, Vec<Vec<f64>>)> {
    assert_eq!(
        windows.len(),
        scores.len(),
        "one score per window. This is a bug."
    );
    if windows.is_empty() {
        return None;
    }
    let edges = |start: fn(&Window) -> u32| {
        let mut e: Vec<u32> = windows
            .iter()
            .flat_map(|w| [start(w), start(w) + w.side])
            .collect();
        e.sort_unstable();
        e.dedup();
        e
    };
    let x_edges = edges(|w| w.x);
    let y_edges = edges(|w| w.y);
    let (cols, rows) = (x_edges.len() - 1, y_edges.len() - 1);
    let index = |edges: &[u32], v: u32| {
        edges
            .binary_search(&v)
            .expect("every window edge is an edge. This is a bug.")
    };
    let mut scales: Vec<usize> = windows.iter().map(|w| w.scale).collect();
    scales.sort_unstable();
    scales.dedup();
    let mut maps = Vec::with_capacity(scales.len());
    let mut sum = vec![0f64; cols * rows];
    let mut count = vec![0u32; cols * rows];
    for &scale in &scales {
        sum.iter_mut().for_each(|s| *s = 0.0);
        count.iter_mut().for_each(|n| *n = 0);
        for (w, &s) in windows.iter().zip(scores).filter(|(w, _)| w.scale == scale) {
            let (c0, c1) = (index(&x_edges, w.x), index(&x_edges, w.x + w.side));
            let (r0, r1) = (index(&y_edges, w.y), index(&y_edges, w.y + w.side));
            for r in r0..r1 {
                for c in c0..c1 {
                    sum[r * cols + c] += 1.0 / f64::from(s);
                    count[r * cols + c] += 1;
                }
            }
        }
        maps.push(
            sum.iter()
                .zip(&count)
                .map(|(&s, &n)| if n == 0 { 0.0 } else { f64::from(n) / s })
                .collect(),
        );
    }
    Some((x_edges, y_edges, maps))
}

#[cfg(test)]
#[path = "anomaly_map_tests.rs"]
mod tests;
