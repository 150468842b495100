//! Binary masks, their geometry and their COCO RLE.
//!
//! Guarantees: [`Mask::to_rle`] writes uncompressed COCO RLE — `size` is `[height, width]`,
//! `counts` the lengths of alternating runs of 0 and 1 over the pixels in column-major order
//! (down the first column, then the next), starting with a run of 0 (of length 0 when the
//! first pixel is set), no other run empty — which is what pycocotools' `frPyObjects` reads
//! and what transformers' own `_mask_to_rle` writes; [`Mask::from_rle`] reads any RLE whose
//! runs cover the size exactly (empty runs allowed anywhere) and refuses the rest;
//! `from_rle(to_rle(m)) == m`.

use serde::{Deserialize, Serialize};

use super::SegmentError;

/// A binary mask, row-major: pixel (x, y) at `y * width + x`.
#[derive(Clone, PartialEq, Eq)]
pub struct Mask {
    width: u32,
    height: u32,
    bits: Vec<bool>,
}

impl std::fmt::Debug for Mask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Mask({}×{}, area {})",
            self.width,
            self.height,
            self.area()
        )
    }
}

/// Uncompressed COCO run-length encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rle {
    /// `[height, width]`, COCO's order.
    pub size: [u32; 2],
    pub counts: Vec<u32>,
}

/// The smallest rectangle holding every pixel of a mask, in pixels: `x, y` its first column
/// and row, `width` and `height` how many columns and rows it spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MaskBox {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// One mask as a verdict carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskSummary {
    pub rle: Rle,
    /// Pixels in the mask.
    pub area: u64,
    /// `None` for an empty mask.
    #[serde(rename = "box")]
    pub bbox: Option<MaskBox>,
    /// SAM's predicted IoU of the mask with the object.
    pub iou: f32,
}

impl Mask {
    /// A `width` × `height` mask from row-major bits. Refuses a size that is empty, whose
    /// pixel count does not fit the RLE's 32-bit runs, or that `bits` does not fill.
    pub fn new(width: u32, height: u32, bits: Vec<bool>) -> Result<Self, SegmentError> {
        let pixels = u64::from(width) * u64::from(height);
        if pixels == 0 || pixels > u64::from(u32::MAX) {
            return Err(SegmentError::Rle(format!(
                "a {width}×{height} mask: sides must be positive and the pixels fewer than 2³²"
            )));
        }
        if bits.len() as u64 != pixels {
            return Err(SegmentError::Rle(format!(
                "{} bits for a {width}×{height} mask",
                bits.len()
            )));
        }
        Ok(Self {
            width,
            height,
            bits,
        })
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// Whether pixel (`x`, `y`) is in the mask; `false` outside it.
    pub fn get(&self, x: u32, y: u32) -> bool {
        x < self.width && y < self.height && self.bits[self.index(x, y)]
    }

    /// The row-major bits.
    pub fn bits(&self) -> &[bool] {
        &self.bits
    }

    fn index(&self, x: u32, y: u32) -> usize {
        y as usize * self.width as usize + x as usize
    }

    /// Pixels in the mask.
    pub fn area(&self) -> u64 {
        self.bits.iter().filter(|b| **b).count() as u64
    }

    /// The bounding box of the mask's pixels; `None` when it is empty.
    pub fn bbox(&self) -> Option<MaskBox> {
        let w = self.width as usize;
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        for (y, row) in self.bits.chunks_exact(w).enumerate() {
            let Some(first) = row.iter().position(|b| *b) else {
                continue;
            };
            let last = row.iter().rposition(|b| *b).unwrap_or(first);
            (x0, x1) = (x0.min(first), x1.max(last));
            (y0, y1) = (y0.min(y), y);
        }
        (x0 != usize::MAX).then(|| MaskBox {
            x: x0 as u32,
            y: y0 as u32,
            width: (x1 - x0 + 1) as u32,
            height: (y1 - y0 + 1) as u32,
        })
    }

    /// Intersection over union with `other` (1 when both are empty); `None` when the sizes
    /// differ.
    pub fn iou(&self, other: &Mask) -> Option<f64> {
        if (self.width, self.height) != (other.width, other.height) {
            return None;
        }
        let (mut inter, mut union) = (0u64, 0u64);
        for (a, b) in self.bits.iter().zip(&other.bits) {
            inter += u64::from(*a && *b);
            union += u64::from(*a || *b);
        }
        Some(if union == 0 {
            1.0
        } else {
            inter as f64 / union as f64
        })
    }

    /// COCO's uncompressed RLE of the mask (see the module's guarantees).
    pub fn to_rle(&self) -> Rle {
        let mut counts = Vec::new();
        let (mut value, mut run) = (false, 0u32);
        for x in 0..self.width {
            for y in 0..self.height {
                let bit = self.bits[self.index(x, y)];
                if bit != value {
                    counts.push(run);
                    (value, run) = (bit, 0);
                }
                run += 1;
            }
        }
        counts.push(run);
        Rle {
            size: [self.height, self.width],
            counts,
        }
    }

    /// The mask an RLE describes. Refuses one whose runs do not add up to its size. Holds a
    /// byte per pixel of the size: bound the sizes of RLEs from outside before decoding them.
    pub fn from_rle(rle: &Rle) -> Result<Self, SegmentError> {
        let [height, width] = rle.size;
        let pixels = u64::from(width) * u64::from(height);
        let total: u64 = rle.counts.iter().map(|c| u64::from(*c)).sum();
        if total != pixels {
            return Err(SegmentError::Rle(format!(
                "runs cover {total} pixels, the size [{height}, {width}] has {pixels}"
            )));
        }
        let mut mask = Self::new(width, height, vec![false; pixels as usize])?;
        let mut at = 0u64;
        for (i, count) in rle.counts.iter().enumerate() {
            if i % 2 == 1 {
                for p in at..at + u64::from(*count) {
                    // Column-major position p: column p / height, row p % height.
                    let (x, y) = (
                        (p / u64::from(height)) as u32,
                        (p % u64::from(height)) as u32,
                    );
                    let index = mask.index(x, y);
                    mask.bits[index] = true;
                }
            }
            at += u64::from(*count);
        }
        Ok(mask)
    }
}

impl Rle {
    /// Pixels in the mask, from the runs alone.
    pub fn area(&self) -> u64 {
        self.counts
            .iter()
            .skip(1)
            .step_by(2)
            .map(|c| u64::from(*c))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A mask drawn as text: rows top to bottom, `#` set.
    fn drawn(rows: &[&str]) -> Mask {
        let bits = rows
            .iter()
            .flat_map(|r| r.chars().map(|c| c == '#'))
            .collect();
        Mask::new(rows[0].len() as u32, rows.len() as u32, bits).unwrap()
    }

    #[test]
    fn runs_go_down_the_columns_starting_with_zeros() {
        let m = drawn(&["#..", "##.", "..."]);
        // Column 0: # # .  column 1: . # .  column 2: . . .
        // → 0 zeros, 2 ones, 2 zeros, 1 one, 4 zeros.
        let rle = m.to_rle();
        assert_eq!(rle.size, [3, 3]);
        assert_eq!(rle.counts, vec![0, 2, 2, 1, 4]);
        assert_eq!(rle.area(), 3);
        assert_eq!(m.area(), 3);
    }

    #[test]
    fn an_empty_and_a_full_mask_as_transformers_writes_them() {
        let empty = Mask::new(4, 3, vec![false; 12]).unwrap();
        assert_eq!(empty.to_rle().counts, vec![12]);
        assert_eq!(empty.bbox(), None);
        let full = Mask::new(4, 3, vec![true; 12]).unwrap();
        assert_eq!(full.to_rle().counts, vec![0, 12]);
        assert_eq!(
            full.bbox(),
            Some(MaskBox {
                x: 0,
                y: 0,
                width: 4,
                height: 3
            })
        );
    }

    #[test]
    fn box_and_area_of_known_shapes() {
        let m = drawn(&[
            "......", //
            "..#...", //
            ".###..", //
            "..#.#.", //
            "......",
        ]);
        assert_eq!(m.area(), 6);
        assert_eq!(
            m.bbox(),
            Some(MaskBox {
                x: 1,
                y: 1,
                width: 4,
                height: 3
            })
        );
        let dot = drawn(&["....", "...#"]);
        assert_eq!(
            dot.bbox(),
            Some(MaskBox {
                x: 3,
                y: 1,
                width: 1,
                height: 1
            })
        );
        assert!(dot.get(3, 1) && !dot.get(2, 1) && !dot.get(9, 9));
        assert_eq!(m.iou(&m), Some(1.0));
        assert_eq!(m.iou(&dot), None);
        let half = drawn(&["##", ".."]);
        assert_eq!(half.iou(&drawn(&["#.", "#."])), Some(1.0 / 3.0));
    }

    #[test]
    fn the_summary_serialises_as_the_verdict_field() {
        let segment = crate::segment::Segment {
            mask: drawn(&[".#", ".#"]),
            iou: 0.5,
        };
        let json = serde_json::to_value(segment.summary()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"rle": {"size": [2, 2], "counts": [2, 2]}, "area": 2,
                               "box": {"x": 1, "y": 0, "width": 1, "height": 2}, "iou": 0.5})
        );
    }

    #[test]
    fn inconsistent_rles_and_sizes_are_refused() {
        let bad = |size: [u32; 2], counts: Vec<u32>| Mask::from_rle(&Rle { size, counts });
        let e = bad([2, 3], vec![1, 2]).unwrap_err().to_string();
        assert!(
            e.contains("runs cover 3 pixels") && e.contains("has 6"),
            "{e}"
        );
        assert!(bad([0, 3], vec![]).is_err());
        assert!(bad([2, 2], vec![u32::MAX, 5]).is_err());
        // Empty runs inside are not canonical but describe a mask: accepted.
        assert_eq!(
            bad([1, 3], vec![1, 0, 0, 2]).unwrap().bits(),
            &[false, true, true]
        );
        assert!(Mask::new(2, 2, vec![true; 3]).is_err());
        assert!(Mask::new(0, 2, vec![]).is_err());
    }

    fn masks() -> impl Strategy<Value = Mask> {
        (1u32..24, 1u32..24, 0u8..3).prop_flat_map(|(w, h, style)| {
            let n = (w * h) as usize;
            let bits = match style {
                // Pixel noise: many short runs.
                0 => proptest::collection::vec(any::<bool>(), n).boxed(),
                // Mostly one value: long runs, the empty and full masks.
                1 => proptest::collection::vec(proptest::bool::weighted(0.05), n).boxed(),
                _ => proptest::collection::vec(proptest::bool::weighted(0.95), n).boxed(),
            };
            bits.prop_map(move |b| Mask::new(w, h, b).unwrap())
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn rle_round_trips_and_is_canonical(mask in masks()) {
            let rle = mask.to_rle();
            prop_assert_eq!(rle.size, [mask.height(), mask.width()]);
            prop_assert_eq!(rle.counts.iter().map(|c| u64::from(*c)).sum::<u64>(),
                            u64::from(mask.width() * mask.height()));
            prop_assert!(rle.counts.iter().skip(1).all(|c| *c > 0), "{:?}", rle.counts);
            prop_assert_eq!(rle.area(), mask.area());
            let back = Mask::from_rle(&rle).unwrap();
            prop_assert_eq!(&back, &mask);
            let json = serde_json::to_string(&rle).unwrap();
            prop_assert_eq!(serde_json::from_str::<Rle>(&json).unwrap(), rle);
        }

        #[test]
        fn the_box_holds_every_pixel_and_touches_each_side(mask in masks()) {
            match mask.bbox() {
                None => prop_assert_eq!(mask.area(), 0),
                Some(b) => {
                    let inside = |x: u32, y: u32| {
                        (b.x..b.x + b.width).contains(&x) && (b.y..b.y + b.height).contains(&y)
                    };
                    let set: Vec<(u32, u32)> = (0..mask.height())
                        .flat_map(|y| (0..mask.width()).map(move |x| (x, y)))
                        .filter(|(x, y)| mask.get(*x, *y))
                        .collect();
                    prop_assert!(set.iter().all(|(x, y)| inside(*x, *y)));
                    prop_assert!(set.iter().any(|(x, _)| *x == b.x));
                    prop_assert!(set.iter().any(|(x, _)| *x == b.x + b.width - 1));
                    prop_assert!(set.iter().any(|(_, y)| *y == b.y));
                    prop_assert!(set.iter().any(|(_, y)| *y == b.y + b.height - 1));
                }
            }
        }
    }
}
