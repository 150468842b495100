//! The whole frame at its own resolution, upright, as 8-bit RGB: what Segment Anything is
//! prompted on (masks are in source-frame pixels, whatever the profile's view or region).
//!
//! Guarantees: the same limits as the model's views ([`DecodeLimits`]): a frame they refuse
//! is refused here too, from its header, before anything is decoded; [`FramePlan`] says
//! from the header alone what decoding will hold at most.

use image::RgbImage;

use super::{decode, to_rgb8, PreprocessError, Preprocessor};

/// The frame's size after EXIF orientation, and the bytes [`Preprocessor::frame`] holds at
/// its peak (the decoded frame at its real depth, its copies, and the RGB8 result).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramePlan {
    pub width: u32,
    pub height: u32,
    pub peak_bytes: u64,
}

impl Preprocessor {
    /// What [`Self::frame`] will hold for these bytes, from the header alone.
    pub fn frame_plan(&self, input: &str, bytes: &[u8]) -> Result<FramePlan, PreprocessError> {
        // The views' plan at full resolution (no DCT scaling, no CLAHE, no windows): the
        // decoded frame and its copies, plus one small resize target that is not made here.
        let full = Self {
            jpeg_dct_headroom: None,
            clahe: None,
            tiles: None,
            ..self.clone()
        };
        let plan = full.plan(input, bytes, None)?;
        let rgb = u64::from(plan.decoded_width) * u64::from(plan.decoded_height) * 3;
        Ok(FramePlan {
            width: plan.decoded_width,
            height: plan.decoded_height,
            peak_bytes: plan.peak_bytes + rgb,
        })
    }

    /// The whole frame, upright, full resolution, 8-bit RGB (gray and 16-bit frames
    /// converted). `input` names it in errors.
    pub fn frame(&self, input: &str, bytes: &[u8]) -> Result<RgbImage, PreprocessError> {
        Ok(to_rgb8(decode(input, bytes, &self.limits)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::artifact::ImageSettings;
    use crate::preprocess::DecodeLimits;

    fn jpeg(width: u32, height: u32, rotated: bool) -> Vec<u8> {
        let img = RgbImage::from_fn(width, height, |x, y| image::Rgb([x as u8, y as u8, 9]));
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95)
            .encode_image(&img)
            .unwrap();
        if rotated {
            crate::preprocess::plan_tests::with_exif_rotation(&out)
        } else {
            out
        }
    }

    #[test]
    fn the_frame_is_upright_at_full_size_and_its_plan_says_so_first() {
        let pre = Preprocessor::new(&ImageSettings::clip(), DecodeLimits::default(), None)
            .with_jpeg_dct_headroom(Some(1.0));
        // EXIF 6: stored 64 × 40, shown rotated a quarter turn: 40 × 64.
        let bytes = jpeg(64, 40, true);
        let plan = pre.frame_plan("f.jpg", &bytes).unwrap();
        assert_eq!((plan.width, plan.height), (40, 64));
        assert!(plan.peak_bytes >= 40 * 64 * 3 * 2, "{plan:?}");
        let frame = pre.frame("f.jpg", &bytes).unwrap();
        assert_eq!(frame.dimensions(), (40, 64));
    }

    #[test]
    fn what_the_limits_refuse_is_refused_from_the_header() {
        let limits = DecodeLimits {
            max_width: 32,
            ..DecodeLimits::default()
        };
        let pre = Preprocessor::new(&ImageSettings::clip(), limits, None);
        let err = pre.frame_plan("big.jpg", &jpeg(64, 40, false)).unwrap_err();
        assert!(err.to_string().starts_with("big.jpg: "), "{err}");
        assert!(pre.frame("big.jpg", &jpeg(64, 40, false)).is_err());
    }
}
