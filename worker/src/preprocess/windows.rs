//! Multi-scale windows: where a tiled profile looks at a frame, besides the whole-frame view.
//!
//! A scale is a window's side as a fraction of the frame's (or region of interest's) shorter
//! side: `side = ceil(scale × short)` pixels. Windows of one scale slide by a stride of
//! `side × (1 − overlap)` pixels (at least 1) along each axis: the k-th starts at
//! `floor(k × stride)`, as many as start before `len − side`, and the last row and column
//! are placed flush with the far edge (at `len − side`). So the windows of every scale cover
//! every pixel (two starts are never more than `ceil(stride) ≤ side` apart), and a frame makes
//! `ceil((len − side) / stride) + 1` windows along an axis: rounding the side up keeps that
//! count from jumping above the exact formula's with the frame's size. A scale whose window would be
//! narrower than `min_window` pixels is skipped for that frame: a small frame has no finer
//! detail to show, and a 2-pixel window blown up to the model's size only adds work.
//!
//! The same integer rules are written in `tests/reference/make_fixtures.py`, which builds the
//! Python reference of a tiled profile.

use serde::{Deserialize, Serialize};

use super::DecodeLimits;

/// Why a profile's `tiles` are refused: each names the key at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TileError {
    #[error("tiles.scales is empty (give at least one, e.g. [1.0, 0.5])")]
    NoScales,
    #[error("tiles.scales: {scale} is not within (0, 1]")]
    Scale { scale: f64 },
    #[error("tiles.scales {scales:?} repeats a scale")]
    RepeatedScale { scales: Vec<f64> },
    #[error("tiles.overlap {overlap} is not within [0, 0.9]")]
    Overlap { overlap: f64 },
    #[error(
        "tiles.max_windows {max_windows} leaves no room for a window besides the whole-frame view"
    )]
    NoRoomForWindows { max_windows: u32 },
    #[error("tiles.max_aspect_ratio {ratio} is under 1")]
    AspectRatioUnderOne { ratio: f64 },
    #[error("tiles.region_threshold {threshold} is not within [0, 1]")]
    RegionThreshold { threshold: f32 },
    /// A frame of `tiles.max_aspect_ratio` would make more views than `max_windows`.
    #[error(
        "tiles make up to {views} views (windows and the whole frame) for a {ratio}:1 frame \
         (tiles.max_aspect_ratio), over tiles.max_windows {max_windows}: raise max_windows, \
         lower overlap, drop the smallest scale or take less elongated frames"
    )]
    TooManyViews {
        views: u64,
        ratio: f64,
        max_windows: u32,
    },
    /// `tiles.max_aspect_ratio` unset, and not even a square frame fits `max_windows`.
    #[error(
        "tiles make up to {views} views (windows and the whole frame) even for a square frame, \
         over tiles.max_windows {max_windows}: raise max_windows, lower overlap or drop the \
         smallest scale"
    )]
    TooManyViewsSquare { views: u64, max_windows: u32 },
}

/// A profile's `tiles`: multi-scale windows scored besides the whole-frame view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TileConfig {
    /// Window sides as fractions of the frame's (or region's) shorter side, each in (0, 1]:
    /// `[1.0, 0.5, 0.25]` looks at the frame in squares of its full height, half and quarter.
    pub scales: Vec<f64>,
    /// How much neighbouring windows of a scale overlap, in [0, 0.9]: the stride is
    /// `side × (1 − overlap)` pixels (each window's start rounded down).
    #[serde(default = "default_overlap")]
    pub overlap: f64,
    /// The most model inputs one frame may make, the whole-frame view included. A frame that
    /// would make more gets a TOO_LARGE verdict; a config whose windows exceed it for a frame
    /// of `max_aspect_ratio` is refused at load.
    #[serde(default = "default_max_windows")]
    pub max_windows: u32,
    /// The most elongated frame (longer side over shorter) this profile takes. When unset:
    /// the most elongated frame whose windows fit `max_windows` (logged at start). More
    /// elongated frames get a TOO_LARGE verdict.
    #[serde(default)]
    pub max_aspect_ratio: Option<f64>,
    /// Windows narrower than this many source pixels are not made (their scale is skipped
    /// for that frame).
    #[serde(default = "default_min_window")]
    pub min_window: u32,
    /// How the windows' scores make the image's: `max` (a defect class scores its largest
    /// probability over every view; the anomaly score is the largest defect mass of any
    /// view), `mean_max` (the mean of the whole-frame view's and the worst window's) or
    /// `winclip` (WinCLIP's image score as anomalib computes it: the whole-frame view's
    /// zero-shot; with normal exemplars' windows (WinCLIP+), half that and half the few-shot
    /// map's maximum).
    /// `clipqc eval` says which scores best on your images.
    #[serde(default)]
    pub aggregate: Aggregate,
    /// Cells of the fused anomaly map (every scale and the whole frame, WinCLIP's harmonic
    /// aggregation) whose score reaches this are reported as regions (cells touching along a
    /// side merged). The harmonic mean is pulled down by cool views: a clean-looking whole
    /// frame cools every cell, so this is usually lower than a window's score would be.
    #[serde(default = "default_region_threshold")]
    #[schemars(extend("default" = 0.5))]
    pub region_threshold: f32,
    /// The most regions a verdict reports (the highest-scoring first).
    #[serde(default = "default_max_regions")]
    pub max_regions: u32,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    /// The worst view decides.
    #[default]
    Max,
    /// The mean of the whole frame's and the worst window's.
    MeanMax,
    /// WinCLIP's image score (anomalib): the whole frame's zero-shot; with normal references,
    /// half the whole frame's and half the fused map's maximum.
    Winclip,
}

fn default_overlap() -> f64 {
    0.5
}
fn default_max_windows() -> u32 {
    64
}
fn default_min_window() -> u32 {
    32
}
fn default_region_threshold() -> f32 {
    0.5
}
fn default_max_regions() -> u32 {
    8
}

/// One window, in the pixels of what is inspected (the frame after EXIF orientation, or the
/// region of interest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub x: u32,
    pub y: u32,
    pub side: u32,
    /// Index into the config's `scales`.
    pub scale: usize,
}

impl Window {
    pub fn contains(&self, x: u32, y: u32) -> bool {
        (self.x..self.x + self.side).contains(&x) && (self.y..self.y + self.side).contains(&y)
    }

    pub fn overlaps(&self, o: &Window) -> bool {
        self.x < o.x + o.side
            && o.x < self.x + self.side
            && self.y < o.y + o.side
            && o.y < self.y + self.side
    }
}

/// Slack for floating-point error in the geometry (a millionth of a pixel).
const EPS: f64 = 1e-6;

/// The positions of windows of `side` along an axis of `len` pixels: every `stride`
/// (floored), and the last flush with the end.
pub fn positions(len: u32, side: u32, stride: f64) -> Vec<u32> {
    let n = count(len, side, stride);
    let mut at: Vec<u32> = (0..n - 1)
        .map(|k| (k as f64 * stride + EPS).floor() as u32)
        .collect();
    at.push(len.saturating_sub(side));
    at
}

/// How many [`positions`] there are, without listing them.
fn count(len: u32, side: u32, stride: f64) -> u64 {
    if side >= len {
        1
    } else {
        (f64::from(len - side) / stride - EPS).ceil() as u64 + 1
    }
}

impl TileConfig {
    /// A window's side at `scale` for a frame whose shorter side is `short`, or `None` when
    /// it would be under `min_window`.
    pub fn side(&self, short: u32, scale: f64) -> Option<u32> {
        let side = (f64::from(short) * scale - EPS).ceil() as u32;
        let side = side.clamp(1, short.max(1));
        (side >= self.min_window.max(1)).then_some(side)
    }

    pub fn stride(&self, side: u32) -> f64 {
        (f64::from(side) * (1.0 - self.overlap)).max(1.0)
    }

    /// Every window of a `w`×`h` frame: by scale in the config's order, then row by row.
    pub fn layout(&self, w: u32, h: u32) -> Vec<Window> {
        let mut out = Vec::new();
        for (scale, &s) in self.scales.iter().enumerate() {
            let Some(side) = self.side(w.min(h), s) else {
                continue;
            };
            let stride = self.stride(side);
            let xs = positions(w, side, stride);
            for y in positions(h, side, stride) {
                out.extend(xs.iter().map(|&x| Window { x, y, side, scale }));
            }
        }
        out
    }

    /// How many model inputs a `w`×`h` frame makes: its windows and the whole-frame view.
    pub fn views(&self, w: u32, h: u32) -> u64 {
        1 + self
            .scales
            .iter()
            .filter_map(|&s| self.side(w.min(h), s))
            .map(|side| {
                let stride = self.stride(side);
                count(w, side, stride) * count(h, side, stride)
            })
            .sum::<u64>()
    }

    /// The most views any frame at most `ratio`:1 makes whose shorter side is at most
    /// `max_short` pixels (every shorter side is tried, at its most elongated frame: the
    /// integer rounding makes the count vary a little with size).
    pub fn worst_views(&self, ratio: f64, max_short: u32) -> u64 {
        (1..=max_short)
            .map(|short| {
                let long = (f64::from(short) * ratio).floor() as u32;
                self.views(long.max(short), short)
            })
            .max()
            .unwrap_or(1)
    }

    /// The most elongated frame (to 0.01) whose views all fit `max_windows`, up to `limit`;
    /// `None` when not even a square frame fits.
    pub fn fitting_aspect_ratio(&self, limit: f64, max_short: u32) -> Option<f64> {
        let fits = |r: f64| self.worst_views(r, max_short) <= u64::from(self.max_windows);
        if !fits(1.0) {
            return None;
        }
        let (mut lo, mut hi) = (100u32, (limit.max(1.0) * 100.0).floor() as u32);
        if fits(f64::from(hi) / 100.0) {
            return Some(f64::from(hi) / 100.0);
        }
        // Views only grow with elongation: the last fitting hundredth.
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if fits(f64::from(mid) / 100.0) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Some(f64::from(lo) / 100.0)
    }

    /// Checks the windows against the largest frames `limits` allow and gives the most
    /// elongated frame the profile takes: refused, naming the keys, when a frame of
    /// `max_aspect_ratio` (when set; else a square one) would make more than `max_windows`
    /// views.
    pub fn resolve_aspect_ratio(&self, limits: &DecodeLimits) -> Result<f64, TileError> {
        self.validate()?;
        let max_short = limits.max_width.min(limits.max_height).max(1);
        let limit = f64::from(limits.max_aspect_ratio.max(1));
        let max_windows = self.max_windows;
        match self.max_aspect_ratio {
            Some(ratio) => {
                let views = self.worst_views(ratio, max_short);
                if views > u64::from(max_windows) {
                    return Err(TileError::TooManyViews {
                        views,
                        ratio,
                        max_windows,
                    });
                }
                Ok(ratio.min(limit))
            }
            None => self.fitting_aspect_ratio(limit, max_short).ok_or_else(|| {
                TileError::TooManyViewsSquare {
                    views: self.worst_views(1.0, max_short),
                    max_windows,
                }
            }),
        }
    }

    /// Structural checks: the error names the key at fault.
    pub fn validate(&self) -> Result<(), TileError> {
        if self.scales.is_empty() {
            return Err(TileError::NoScales);
        }
        if let Some(&scale) = self.scales.iter().find(|&&s| !(s > 0.0 && s <= 1.0)) {
            return Err(TileError::Scale { scale });
        }
        let mut sorted = self.scales.clone();
        sorted.sort_by(f64::total_cmp);
        if sorted.windows(2).any(|p| p[0] == p[1]) {
            return Err(TileError::RepeatedScale {
                scales: self.scales.clone(),
            });
        }
        if !(0.0..=0.9).contains(&self.overlap) {
            return Err(TileError::Overlap {
                overlap: self.overlap,
            });
        }
        if self.max_windows < 2 {
            return Err(TileError::NoRoomForWindows {
                max_windows: self.max_windows,
            });
        }
        if let Some(ratio) = self.max_aspect_ratio.filter(|r| r.is_nan() || *r < 1.0) {
            return Err(TileError::AspectRatioUnderOne { ratio });
        }
        if !(0.0..=1.0).contains(&self.region_threshold) {
            return Err(TileError::RegionThreshold {
                threshold: self.region_threshold,
            });
        }
        Ok(())
    }

    /// The finest scale of `windows` (the smallest side), if any.
    pub fn finest(windows: &[Window]) -> Option<usize> {
        windows.iter().min_by_key(|w| w.side).map(|w| w.scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tiles(scales: &[f64], overlap: f64) -> TileConfig {
        TileConfig {
            scales: scales.to_vec(),
            overlap,
            max_windows: 64,
            max_aspect_ratio: None,
            min_window: 1,
            aggregate: Aggregate::Max,
            region_threshold: 0.5,
            max_regions: 8,
        }
    }

    fn assert_covers(t: &TileConfig, w: u32, h: u32) {
        let windows = t.layout(w, h);
        for (scale, _) in t.scales.iter().enumerate() {
            let of: Vec<_> = windows.iter().filter(|x| x.scale == scale).collect();
            if of.is_empty() {
                continue;
            }
            // Every window inside the frame, and every pixel inside one of the scale's.
            for win in &of {
                assert!(
                    win.x + win.side <= w && win.y + win.side <= h,
                    "{win:?} in {w}×{h}"
                );
            }
            for y in 0..h {
                for x in 0..w {
                    assert!(
                        of.iter().any(|win| win.contains(x, y)),
                        "pixel ({x}, {y}) of {w}×{h} not covered at scale {scale}"
                    );
                }
            }
            // The last column and row flush with the edges.
            assert!(of.iter().any(|win| win.x + win.side == w));
            assert!(of.iter().any(|win| win.y + win.side == h));
        }
        assert_eq!(t.views(w, h), windows.len() as u64 + 1, "the count formula");
    }

    #[test]
    fn every_pixel_is_covered_for_odd_sizes() {
        let t = tiles(&[1.0, 0.5, 0.25], 0.5);
        for (w, h) in [
            (1, 1),
            (1, 37),
            (37, 1),
            (2, 3),
            (7, 13),
            (97, 89),
            (101, 31),
            (224, 224),
            (257, 1000),
        ] {
            assert_covers(&t, w, h);
        }
        assert_covers(&tiles(&[0.3], 0.0), 101, 67);
        assert_covers(&tiles(&[0.7, 0.2], 0.9), 53, 211);
    }

    #[test]
    fn the_count_formula_for_a_1080p_frame() {
        // Scale 1: side 1080, stride 540 → x at 0, 540, 840; y at 0. Scale 0.5: side 540,
        // stride 270 → x 0, 270, …, 1350, 1380 (7); y 0, 270, 540 (3). Scale 0.25: side 270,
        // stride 135 → x 0..1620 by 135 and 1650 (14); y 0..810 (7).
        // 98 windows of the finest scale alone: a 1080p frame needs max_windows ≥ 123.
        let t = tiles(&[1.0, 0.5, 0.25], 0.5);
        let win = t.layout(1920, 1080);
        let at = |s| win.iter().filter(|w| w.scale == s).count();
        assert_eq!((at(0), at(1), at(2)), (3, 21, 98));
        assert_eq!(t.views(1920, 1080), 1 + 3 + 21 + 98);
        assert_eq!(positions(1920, 1080, 540.0), [0, 540, 840]);
        assert_eq!(positions(1080, 540, 270.0), [0, 270, 540]);
        assert_eq!(*positions(1920, 270, 135.0).last().unwrap(), 1650);
        // Odd sides: a fractional stride, floored per position.
        assert_eq!(positions(10, 3, 1.5), [0, 1, 3, 4, 6, 7]);
        // A scale that is not exact in binary still gives the side as written: 0.3 × 100.
        assert_eq!(tiles(&[0.3], 0.5).side(100, 0.3), Some(30));
    }

    #[test]
    fn small_windows_are_skipped() {
        let mut t = tiles(&[1.0, 0.25], 0.5);
        t.min_window = 32;
        assert_eq!(t.layout(100, 100).len(), 1, "25-pixel windows are not made");
        assert_eq!(t.layout(128, 128).len(), 1 + 49);
        assert_eq!(
            t.layout(20, 20).len(),
            0,
            "even the scale-1 window is under 32"
        );
        assert_eq!(t.views(20, 20), 1, "the whole-frame view stays");
    }

    #[test]
    fn worst_case_and_fitting_ratio() {
        let mut t = tiles(&[1.0, 0.5, 0.25], 0.5);
        t.min_window = 32;
        // Square: 1 + 1 + 9 + 49.
        assert_eq!(t.views(1024, 1024), 60);
        assert!(t.worst_views(1.0, 4096) <= 64);
        let r = t.fitting_aspect_ratio(32.0, 4096).unwrap();
        assert!((1.0..1.2).contains(&r), "{r}");
        assert!(t.worst_views(r, 4096) <= 64);
        assert!(t.worst_views(r + 0.01, 4096) > 64);
        t.max_windows = 10;
        assert_eq!(t.fitting_aspect_ratio(32.0, 4096), None);
    }

    #[test]
    fn bad_configs_name_the_key() {
        let bad = |f: &dyn Fn(&mut TileConfig)| {
            let mut t = tiles(&[1.0, 0.5], 0.5);
            f(&mut t);
            t.validate().unwrap_err().to_string()
        };
        assert!(bad(&|t| t.scales.clear()).contains("tiles.scales"));
        assert!(bad(&|t| t.scales = vec![1.5]).contains("tiles.scales"));
        assert!(bad(&|t| t.scales = vec![0.5, 0.5]).contains("repeats"));
        assert!(bad(&|t| t.overlap = 1.0).contains("tiles.overlap"));
        assert!(bad(&|t| t.max_windows = 1).contains("tiles.max_windows"));
        assert!(bad(&|t| t.max_aspect_ratio = Some(0.5)).contains("tiles.max_aspect_ratio"));
        let mut t = tiles(&[0.5, 1.0, 0.5], 0.5);
        assert_eq!(
            t.validate(),
            Err(TileError::RepeatedScale {
                scales: vec![0.5, 1.0, 0.5]
            })
        );
        t.scales = vec![1.0];
        t.region_threshold = 2.0;
        assert_eq!(
            t.validate(),
            Err(TileError::RegionThreshold { threshold: 2.0 })
        );
    }

    proptest! {
        #[test]
        fn windows_cover_any_frame(
            w in 1u32..300, h in 1u32..300,
            scale in 0.05f64..=1.0, overlap in 0.0f64..=0.9,
        ) {
            let t = tiles(&[scale], overlap);
            let win = t.layout(w, h);
            prop_assert_eq!(t.views(w, h), win.len() as u64 + 1);
            // Coverage along each axis is enough: windows form a grid.
            let side = win[0].side;
            let xs: Vec<u32> = win.iter().filter(|x| x.y == win[0].y).map(|w| w.x).collect();
            let mut covered = 0;
            for x in xs {
                prop_assert!(x <= covered, "gap before {}", x);
                covered = covered.max(x + side);
            }
            prop_assert_eq!(covered, w);
        }
    }
}
