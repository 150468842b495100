//! A frame and its box prompts, made into SAM's input: transformers' `SamImageProcessor`
//! (resize the longest side to the input size, rescale, normalise, pad bottom and right with
//! zeros) and `SamProcessor`'s box mapping.
//!
//! Pure CPU work, no model: callers run it on their own (blocking) threads, so the
//! segmentation thread only runs the network.

use fast_image_resize as fr;
use image::RgbImage;

use super::artifact::SamImageSettings;
use super::{SamBox, SegmentError};
use crate::model::artifact::Interpolation;

/// The most boxes one frame may carry: each mask is held at the frame's size until encoded
/// (a byte per pixel), so this bounds a job's memory (32 × 12 MP = 384 MB at worst).
pub const MAX_BOXES: usize = 32;

/// A frame ready for the segmentation thread.
#[derive(Debug, Clone, PartialEq)]
pub struct SamInput {
    /// 3 × `size` × `size` floats, CHW: the resized frame at the top-left, zeros elsewhere.
    pub pixels: Vec<f32>,
    /// Side of the model's input square.
    pub size: u32,
    /// The frame's own width and height: the masks come back at this size.
    pub frame: (u32, u32),
    /// Width and height of the resized frame inside the square.
    pub resized: (u32, u32),
    /// The box prompts in the input square's pixels, `[x0, y0, x1, y1]`.
    pub boxes: Vec<[f32; 4]>,
}

/// The manifest's image settings, resolved once; cheap to clone.
#[derive(Debug, Clone)]
pub struct SamPreprocessor {
    size: u32,
    filter: fr::FilterType,
    /// Per channel: `pixel * scale + offset` == `(pixel * rescale - mean) / std`.
    scale: [f32; 3],
    offset: [f32; 3],
}

impl SamPreprocessor {
    pub fn new(s: &SamImageSettings) -> Self {
        let filter = match s.interpolation {
            // torchvision's antialiased bilinear resize of uint8 images (what
            // SamImageProcessor runs) is PIL's: a triangle kernel widened when downscaling.
            Interpolation::Bilinear => fr::FilterType::Bilinear,
            Interpolation::Bicubic => fr::FilterType::CatmullRom,
        };
        Self {
            size: s.size,
            filter,
            scale: std::array::from_fn(|c| s.rescale_factor / s.std[c]),
            offset: std::array::from_fn(|c| -s.mean[c] / s.std[c]),
        }
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    /// Width and height of a `width` × `height` frame inside the input square: the longest
    /// side `size`, the other `side × size / longest` rounded to nearest, as transformers'
    /// `_get_preprocess_shape` (`int(side * scale + 0.5)`, in double precision); at least 1
    /// (transformers would make a 0-pixel side of a 1 × 5000 frame).
    pub fn resized_dims(&self, width: u32, height: u32) -> (u32, u32) {
        let scale = f64::from(self.size) / f64::from(width.max(height).max(1));
        let side = |v: u32| ((f64::from(v) * scale + 0.5) as u32).clamp(1, self.size);
        (side(width), side(height))
    }

    /// A box in frame pixels mapped into the input square, as `SamProcessor` maps it: x by
    /// `resized_width / width`, y by `resized_height / height` (double precision; the model
    /// takes float32).
    pub fn map_box(&self, b: SamBox, frame: (u32, u32)) -> [f32; 4] {
        let (rw, rh) = self.resized_dims(frame.0, frame.1);
        let sx = f64::from(rw) / f64::from(frame.0.max(1));
        let sy = f64::from(rh) / f64::from(frame.1.max(1));
        [
            (f64::from(b.x0) * sx) as f32,
            (f64::from(b.y0) * sy) as f32,
            (f64::from(b.x1) * sx) as f32,
            (f64::from(b.y1) * sy) as f32,
        ]
    }

    /// Checks the frame and boxes and makes the model's input. `input` names the frame in
    /// errors. A box must lie inside the frame: `0 ≤ x0 ≤ x1 ≤ width` and `0 ≤ y0 ≤ y1 ≤
    /// height` (the far edge itself allowed, for callers whose boxes end past the last pixel).
    pub fn prepare(
        &self,
        input: &str,
        frame: &RgbImage,
        boxes: &[SamBox],
    ) -> Result<SamInput, SegmentError> {
        let fail = |message: String| SegmentError::Input {
            input: input.into(),
            message,
        };
        let (w, h) = frame.dimensions();
        if w == 0 || h == 0 {
            return Err(fail("the frame has no pixels".into()));
        }
        if boxes.is_empty() {
            return Err(fail("no box to segment".into()));
        }
        if boxes.len() > MAX_BOXES {
            return Err(fail(format!(
                "{} boxes, over the {MAX_BOXES} one frame may carry",
                boxes.len()
            )));
        }
        for (i, b) in boxes.iter().enumerate() {
            let inside = |lo: f32, hi: f32, limit: u32| {
                lo.is_finite() && hi.is_finite() && 0.0 <= lo && lo <= hi && hi <= limit as f32
            };
            if !(inside(b.x0, b.x1, w) && inside(b.y0, b.y1, h)) {
                return Err(fail(format!(
                    "box {i} ({}, {}, {}, {}) is not inside the {w}×{h} frame \
                     (0 ≤ x0 ≤ x1 ≤ width, 0 ≤ y0 ≤ y1 ≤ height)",
                    b.x0, b.y0, b.x1, b.y1
                )));
            }
        }
        let (rw, rh) = self.resized_dims(w, h);
        let pixels = if (rw, rh) == (w, h) {
            self.place_normalize(frame.as_raw(), rw, rh)
        } else {
            let src = fr::images::ImageRef::new(w, h, frame.as_raw(), fr::PixelType::U8x3)
                .map_err(|e| fail(format!("frame buffer: {e}")))?;
            let mut dst = fr::images::Image::new(rw, rh, fr::PixelType::U8x3);
            let options =
                fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(self.filter));
            fr::Resizer::new()
                .resize(&src, &mut dst, &options)
                .map_err(|e| fail(format!("resize failed: {e}")))?;
            self.place_normalize(dst.buffer(), rw, rh)
        };
        Ok(SamInput {
            pixels,
            size: self.size,
            frame: (w, h),
            resized: (rw, rh),
            boxes: boxes.iter().map(|b| self.map_box(*b, (w, h))).collect(),
        })
    }

    /// The `w` × `h` RGB pixels at the square's top-left, normalised into CHW; the rest 0,
    /// as the processor pads after normalising.
    fn place_normalize(&self, raw: &[u8], w: u32, h: u32) -> Vec<f32> {
        let (s, w, h) = (self.size as usize, w as usize, h as usize);
        let mut out = vec![0f32; 3 * s * s];
        for (c, plane) in out.chunks_exact_mut(s * s).enumerate() {
            let (scale, offset) = (self.scale[c], self.offset[c]);
            for (row, src) in plane
                .chunks_exact_mut(s)
                .zip(raw.chunks_exact(3 * w))
                .take(h)
            {
                for (d, px) in row[..w].iter_mut().zip(src.chunks_exact(3)) {
                    *d = f32::from(px[c]) * scale + offset;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::artifact::tests::manifest;

    fn pre(size: u32) -> SamPreprocessor {
        let mut s = manifest(Default::default()).image;
        s.size = size;
        SamPreprocessor::new(&s)
    }

    #[test]
    fn the_longest_side_becomes_the_input_size_the_other_rounds_to_nearest() {
        let p = pre(1024);
        assert_eq!(p.resized_dims(1920, 1080), (1024, 576));
        assert_eq!(p.resized_dims(480, 640), (768, 1024));
        assert_eq!(p.resized_dims(1024, 1024), (1024, 1024));
        // 1000 × 1024 / 1500 = 682.67 → 683; 333 × 128 / 222 = 192 exactly for the long side.
        assert_eq!(p.resized_dims(1500, 1000), (1024, 683));
        let p = pre(128);
        assert_eq!(p.resized_dims(333, 222), (128, 85)); // 85.33
        assert_eq!(p.resized_dims(300, 201), (128, 86)); // 85.76
        assert_eq!(p.resized_dims(5000, 1), (128, 1)); // 0.0256 + 0.5 → 0, kept at 1
        assert_eq!(p.resized_dims(64, 32), (128, 64)); // upscaled
    }

    #[test]
    fn boxes_scale_with_each_axis_own_ratio() {
        let p = pre(128);
        // 640 × 480 → 128 × 96: both ratios 0.2.
        let b = p.map_box(SamBox::new(63.0, 71.0, 351.0, 287.0), (640, 480));
        let want = [12.6, 14.2, 70.2, 57.4];
        for (got, want) in b.iter().zip(want) {
            assert!((got - want).abs() < 1e-5, "{b:?}");
        }
        // 300 × 201 → 128 × 86: x by 128/300, y by 86/201, not the same.
        let b = p.map_box(SamBox::new(300.0, 201.0, 300.0, 201.0), (300, 201));
        assert_eq!(b, [128.0, 86.0, 128.0, 86.0]);
    }

    #[test]
    fn pixels_are_normalised_at_the_top_left_and_padded_with_zeros() {
        let mut s = manifest(Default::default()).image;
        s.size = 8;
        s.mean = [0.0; 3];
        s.std = [1.0; 3];
        s.rescale_factor = 1.0;
        let p = SamPreprocessor::new(&s);
        // 8 × 4: no resize; each pixel's red is its column, green its row, blue 7.
        let frame = RgbImage::from_fn(8, 4, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let input = p
            .prepare("f", &frame, &[SamBox::new(0.0, 0.0, 8.0, 4.0)])
            .unwrap();
        assert_eq!((input.frame, input.resized), ((8, 4), (8, 4)));
        let at = |c: usize, x: usize, y: usize| input.pixels[c * 64 + y * 8 + x];
        assert_eq!((at(0, 5, 2), at(1, 5, 2), at(2, 5, 2)), (5.0, 2.0, 7.0));
        assert_eq!((at(0, 5, 4), at(1, 5, 7), at(2, 0, 6)), (0.0, 0.0, 0.0));
        assert_eq!(input.boxes, vec![[0.0, 0.0, 8.0, 4.0]]);
    }

    #[test]
    fn a_flat_frame_resizes_to_the_flat_normalised_value() {
        let p = pre(64);
        let frame = RgbImage::from_pixel(300, 100, image::Rgb([255, 0, 128]));
        let input = p
            .prepare("flat", &frame, &[SamBox::new(1.0, 1.0, 2.0, 2.0)])
            .unwrap();
        assert_eq!(input.resized, (64, 21));
        let expect = [
            (1.0 - 0.485) / 0.229,
            (0.0 - 0.456) / 0.224,
            (128.0 / 255.0 - 0.406) / 0.225,
        ];
        for (c, want) in expect.iter().enumerate() {
            let v = input.pixels[c * 64 * 64 + 20 * 64 + 63];
            assert!((v - want).abs() < 1e-5, "channel {c}: {v}");
            assert_eq!(input.pixels[c * 64 * 64 + 21 * 64], 0.0, "padding row");
        }
    }

    #[test]
    fn bad_frames_and_boxes_are_refused_naming_them() {
        let p = pre(64);
        let frame = RgbImage::new(100, 50);
        let ok = SamBox::new(0.0, 0.0, 99.0, 49.0);
        let err = |boxes: &[SamBox]| p.prepare("cam7", &frame, boxes).unwrap_err().to_string();
        assert!(err(&[]).contains("cam7: no box"));
        let e = err(&[ok, SamBox::new(10.0, 0.0, 101.0, 5.0)]);
        assert!(
            e.contains("box 1 (10, 0, 101, 5)") && e.contains("100×50"),
            "{e}"
        );
        assert!(err(&[SamBox::new(f32::NAN, 0.0, 1.0, 1.0)]).contains("box 0"));
        assert!(err(&[SamBox::new(5.0, 0.0, 4.0, 1.0)]).contains("box 0"));
        assert!(err(&[SamBox::new(0.0, -1.0, 4.0, 1.0)]).contains("box 0"));
        assert!(err(&vec![ok; MAX_BOXES + 1]).contains("33 boxes"));
        let e = p.prepare("empty", &RgbImage::new(0, 5), &[ok]).unwrap_err();
        assert!(e.to_string().contains("empty: the frame has no pixels"));
    }
}
