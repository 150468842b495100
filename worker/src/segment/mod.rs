//! The segment stage: Segment Anything (SAM) outlines a defect inside a box.
//!
//! ```text
//! frame (RGB) + boxes ──SamPreprocessor::prepare──▶ SamInput ──SegmentHandle (one OS thread)──▶
//!   image encoder ──▶ mask decoder (one mask per box) ──postprocess──▶ Segment {mask, iou}
//!   ──Segment::summary──▶ {rle, area, box, iou}
//! ```
//!
//! Like `model`, this module knows nothing of Kafka, HTTP or tokio's runtime.
//!
//! Guarantees:
//! - an artifact is used only after its manifest and every file's sha256 check out
//!   ([`SamArtifact::open`]);
//! - a frame is prepared as transformers' `SamImageProcessor` prepares it: the longest side
//!   resized to the model's input size (bilinear, antialiased when downscaling), the shorter in
//!   proportion (rounded to nearest), rescaled, normalised and padded with zeros at the bottom
//!   and right; boxes are mapped into that frame as `SamProcessor` maps them ([`prepare`]);
//! - a mask comes back at the frame's own size, computed as transformers' `post_process_masks`
//!   does it (bilinear upscale of the low-resolution logits to the padded input, padding cropped,
//!   bilinear resize to the frame, threshold), so it lines up with the frame pixel for pixel;
//! - masks are encoded as uncompressed COCO RLE (column-major, runs starting with zeros),
//!   identical to transformers' own encoder, and decode back to the same mask ([`mask`]);
//! - the models live on their own thread, separate from the classification model's, fed
//!   through a bounded queue; [`SegmentHandle::try_submit`] never waits: a full queue is an
//!   error ([`SegmentError::QueueFull`]), so segmentation cannot slow classification down;
//! - bad input (an empty frame, a box outside the frame or not a number, too many boxes, an
//!   inconsistent RLE) is an error naming it, never a panic.

pub mod artifact;
pub mod backend;
pub mod mask;
pub mod owner;
pub mod prepare;

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use artifact::{SamArtifact, SamManifest};
pub use backend::{postprocess, LowRes, SamBackend};
pub use mask::{Mask, MaskBox, MaskSummary, Rle};
pub use owner::{SegmentHandle, SegmentOwner, SegmentReply};
pub use prepare::{SamInput, SamPreprocessor};

/// Errors of the segment stage. Each names the file, input or box it is about.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SegmentError {
    #[error("SAM model directory {dir}: {message}")]
    Artifact { dir: PathBuf, message: String },
    /// The directory does not check out against its manifest ([`SamArtifact::open`]).
    #[error(transparent)]
    Export(Arc<crate::model::artifact::OpenError<artifact::SamManifestError>>),
    #[error("device {0:?}: {1}")]
    Device(String, String),
    /// A frame or box prompt that cannot be segmented.
    #[error("{input}: {message}")]
    Input { input: String, message: String },
    #[error("invalid RLE: {0}")]
    Rle(String),
    #[error("segmentation failed: {0}")]
    Inference(String),
    #[error("the segmentation queue is full ({capacity} frames waiting)")]
    QueueFull { capacity: usize },
    #[error("the segmentation thread has stopped")]
    Stopped,
    #[error("no masks within {seconds} s (model.sam_timeout_ms): SAM is busy or hangs")]
    TimedOut { seconds: u64 },
}

impl SegmentError {
    /// The `reason` label of `clipqc_segment_skipped_total` (one of
    /// [`crate::metrics::SEGMENT_SKIP_REASONS`]).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Artifact { .. } | Self::Export(_) | Self::Device(..) => "model",
            Self::Input { .. } | Self::Rle(_) => "input",
            Self::Inference(_) => "failed",
            Self::QueueFull { .. } => "queue_full",
            Self::Stopped => "stopped",
            Self::TimedOut { .. } => "timed_out",
        }
    }

    /// Stable code for verdicts, logs and metric labels: why a verdict has no mask.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Artifact { .. } | Self::Export(_) | Self::Device(..) => "SEGMENT_MODEL",
            Self::Input { .. } | Self::Rle(_) => "SEGMENT_INPUT",
            Self::Inference(_) => "SEGMENT_FAILED",
            Self::QueueFull { .. } => "SEGMENT_QUEUE_FULL",
            Self::Stopped => "SEGMENT_STOPPED",
            Self::TimedOut { .. } => "SEGMENT_TIMEOUT",
        }
    }
}

/// A box prompt in source-frame pixels, as SAM takes it (XYXY): `x0, y0` the top-left corner,
/// `x1, y1` the bottom-right one. SAM's own boxes (its mask-to-box) put the right and bottom
/// corners on the last column and row inside the box; [`SamBox::from_region`] does the same.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamBox {
    pub x0: f32,
    pub y0: f32,
    pub x1: f32,
    pub y1: f32,
}

impl SamBox {
    pub fn new(x0: f32, y0: f32, x1: f32, y1: f32) -> Self {
        Self { x0, y0, x1, y1 }
    }

    /// The box of a region of `width` × `height` pixels at (`x`, `y`) (a window, a region of
    /// interest): its first and last columns and rows.
    pub fn from_region(region: crate::preprocess::Region) -> Self {
        let last = |start: u32, len: u32| (start + len.max(1) - 1) as f32;
        Self {
            x0: region.x as f32,
            y0: region.y as f32,
            x1: last(region.x, region.width),
            y1: last(region.y, region.height),
        }
    }
}

/// One box's result: the mask at the frame's size and SAM's own estimate of its IoU with the
/// object (its `iou_scores`; a trained SAM gives 0..1, a random one anything).
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub mask: Mask,
    pub iou: f32,
}

impl Segment {
    /// What a verdict carries: the mask as COCO RLE, its area and box, the predicted IoU.
    pub fn summary(&self) -> MaskSummary {
        MaskSummary {
            rle: self.mask.to_rle(),
            area: self.mask.area(),
            bbox: self.mask.bbox(),
            iou: self.iou,
        }
    }
}

/// What runs SAM. Implementations live on the segmentation thread and are never shared.
pub trait Segmenter {
    /// One line for logs: the model and where it runs.
    fn describe(&self) -> String;
    /// One [`Segment`] per box of `input`, in order.
    fn segment(&mut self, input: &SamInput) -> Result<Vec<Segment>, SegmentError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::Region;

    #[test]
    fn a_region_becomes_its_first_and_last_pixels() {
        let b = SamBox::from_region(Region {
            x: 10,
            y: 20,
            width: 5,
            height: 1,
        });
        assert_eq!(b, SamBox::new(10.0, 20.0, 14.0, 20.0));
    }

    #[test]
    fn codes_are_stable() {
        assert_eq!(
            SegmentError::QueueFull { capacity: 4 }.code(),
            "SEGMENT_QUEUE_FULL"
        );
        let e = SegmentError::Input {
            input: "cam1".into(),
            message: "box 0 is outside".into(),
        };
        assert_eq!(e.code(), "SEGMENT_INPUT");
        assert_eq!(e.to_string(), "cam1: box 0 is outside");
    }
}
