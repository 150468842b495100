//! CLAHE (contrast-limited adaptive histogram equalisation) for unevenly lit parts.
//!
//! Equalises lightness in the CIE L*a*b* space so colours (paint spots) keep their hue; the
//! work is done by the `histogram_equalization` crate.

use image::RgbImage;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ClaheSettings {
    /// Histogram clip limit, relative (OpenCV's clipLimit; 2–4 is usual).
    pub clip_limit: f32,
    /// Tiles across and down.
    pub grid: u32,
}

impl Default for ClaheSettings {
    fn default() -> Self {
        Self {
            clip_limit: 2.0,
            grid: 8,
        }
    }
}

/// Histogram bins per tile.
const BINS: usize = 128;

impl ClaheSettings {
    /// The tile grid used for a `w`×`h` image: no more tiles than pixels across or down.
    fn grid_for(&self, w: u32, h: u32) -> u32 {
        self.grid.clamp(1, w.min(h).max(1))
    }

    /// Bytes [`Self::apply`] holds at once for a `w`×`h` image, besides its input: the
    /// output (3 bytes a pixel), the crate's L*a*b* copy (three u16 a pixel) and one histogram
    /// of u64 bins per tile (a tile is `w / grid` pixels wide, so there can be up to twice
    /// `grid` of them across).
    pub fn held_bytes(&self, w: u32, h: u32) -> u64 {
        let pixels = u64::from(w) * u64::from(h);
        let grid = self.grid_for(w, h);
        let tiles = |side: u32| u64::from(side / (side / grid).max(1));
        let histograms = tiles(w) * tiles(h) * (BINS as u64 * 8 + 64) + 4096;
        pixels * 3 + pixels * 6 + histograms
    }

    pub fn apply(&self, rgb: &RgbImage) -> RgbImage {
        let (w, h) = rgb.dimensions();
        let grid = self.grid_for(w, h);
        let mut out = vec![0u8; rgb.as_raw().len()];
        histogram_equalization::clahe_lab_rgb(
            rgb.as_raw(),
            w * 3,
            &mut out,
            w * 3,
            w,
            h,
            self.clip_limit,
            histogram_equalization::ClaheGridSize::new(grid, grid),
            BINS,
        );
        RgbImage::from_raw(w, h, out).expect("CLAHE output has the input's size. This is a bug.")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stretches_a_low_contrast_image() {
        // A dim, flat-looking gradient between grey levels 100 and 116 over tiles of 32×32
        // pixels: CLAHE must widen that range.
        let img = RgbImage::from_fn(256, 256, |x, y| image::Rgb([100 + ((x + y) / 32) as u8; 3]));
        let out = ClaheSettings::default().apply(&img);
        let range = |im: &RgbImage| {
            let g: Vec<u8> = im.pixels().map(|p| p[0]).collect();
            i32::from(*g.iter().max().unwrap()) - i32::from(*g.iter().min().unwrap())
        };
        assert!(
            range(&out) > range(&img),
            "range {} -> {}",
            range(&img),
            range(&out)
        );
    }
}
