//! The preprocess stage: image bytes to the encoder's input tensor.
//!
//! decode (JPEG, PNG, BMP, TIFF; 8/16-bit gray, RGB, RGBA; EXIF orientation applied) →
//! optional region of interest → optional CLAHE (uneven plant lighting) → the manifest's
//! resize (shortest side to `resize_size` with bicubic, then center crop; or squash) →
//! rescale and normalise into CHW floats.
//!
//! Guarantees: the output matches the checkpoint's own processor (CLIP's PIL-based
//! CLIPImageProcessor) to within one grey level before normalisation; decoding is bounded by
//! [`DecodeLimits`] (a header claiming 60000×60000 pixels is refused before any allocation);
//! every error names the input it is about. Pure CPU work: call it from blocking threads.

mod clahe;
mod decode;
mod transform;

use serde::{Deserialize, Serialize};

pub use clahe::ClaheSettings;
pub use decode::{decode, decode_scaled, DecodeLimits};
pub use transform::{as_gray8, to_rgb8, Transform};

use crate::model::artifact::ImageSettings;

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("{input}: not a supported image format ({message}); supported: JPEG, PNG, BMP, TIFF")]
    UnsupportedFormat { input: String, message: String },
    #[error("{input}: cannot decode image: {message}")]
    Decode { input: String, message: String },
    #[error("{input}: image too large: {message}")]
    TooLarge { input: String, message: String },
    #[error("{input}: {message}")]
    Invalid { input: String, message: String },
}

impl PreprocessError {
    /// Stable code for verdicts, DLQ headers and metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnsupportedFormat { .. } | Self::Decode { .. } | Self::Invalid { .. } => {
                "DECODE_FAILED"
            }
            Self::TooLarge { .. } => "TOO_LARGE",
        }
    }
}

/// A region of interest in source pixels (after EXIF orientation): inspect only this part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// Everything needed to turn bytes into pixels; cheap to clone, shared by worker threads.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    pub limits: DecodeLimits,
    pub transform: Transform,
    pub clahe: Option<ClaheSettings>,
    /// JPEGs are decoded scaled down in the DCT domain while their shorter side stays at
    /// least this many times the resize target (`None`: always full size, the reference
    /// pixels). See `preprocess.jpeg_dct_headroom`.
    pub jpeg_dct_headroom: Option<f32>,
}

impl Preprocessor {
    pub fn new(image: &ImageSettings, limits: DecodeLimits, clahe: Option<ClaheSettings>) -> Self {
        Self {
            limits,
            transform: Transform::new(image),
            clahe,
            jpeg_dct_headroom: None,
        }
    }

    pub fn with_jpeg_dct_headroom(mut self, headroom: Option<f32>) -> Self {
        self.jpeg_dct_headroom = headroom.filter(|h| *h >= 1.0);
        self
    }

    /// Side of the square tensor produced.
    pub fn size(&self) -> usize {
        self.transform.size as usize
    }

    /// Bytes → CHW floats. `input` names the image in errors (a path, a URI, a request id).
    pub fn run(
        &self,
        input: &str,
        bytes: &[u8],
        region: Option<Region>,
    ) -> Result<Vec<f32>, PreprocessError> {
        // A region is given in the full image's pixels: decode it whole.
        let min_short = self
            .jpeg_dct_headroom
            .filter(|_| region.is_none())
            .map(|h| (h * self.transform.min_source_side() as f32).ceil() as u32);
        let image = decode_scaled(input, bytes, &self.limits, min_short)?;
        // Grey images stay one channel through the resize (CLAHE works on RGB).
        if region.is_none() && self.clahe.is_none() {
            if let Some(gray) = as_gray8(&image) {
                return self.transform.apply_gray(input, &gray);
            }
        }
        let mut rgb = to_rgb8(image);
        if let Some(r) = region {
            rgb = transform::crop_region(input, &rgb, r)?;
        }
        if let Some(c) = &self.clahe {
            rgb = c.apply(&rgb);
        }
        self.transform.apply(input, &rgb)
    }
}
