//! The SAM artifact directory and its manifest (`clipqc-sam.json`), written by
//! `deploy/model/export.py --sam` / `--random-sam`.
//!
//! Guarantee: [`SamArtifact::open`] returns only when the manifest parses, its settings are
//! ones this build serves (SAM's resize and padding rule, a single-mask decoder) and both
//! TorchScript files exist with the sha256 the manifest records, as the CLIP artifact
//! ([`crate::model::Artifact`]) is checked.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::SegmentError;
use crate::model::artifact::{
    check_std, Export, ExportManifest, Exported, Interpolation, NonPositiveStd,
};

pub const MANIFEST_FILE: &str = "clipqc-sam.json";
pub const IMAGE_ENCODER: &str = "image_encoder.pt";
pub const MASK_DECODER: &str = "mask_decoder.pt";
const REQUIRED_FILES: [&str; 2] = [IMAGE_ENCODER, MASK_DECODER];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamManifest {
    pub format_version: u32,
    pub name: String,
    /// `sam`: transformers' SamModel.
    pub family: String,
    pub source_checkpoint: String,
    pub image: SamImageSettings,
    /// The image encoder's output for one image: channels × height × width.
    pub embedding: EmbeddingShape,
    pub mask: MaskSettings,
    #[serde(default)]
    pub exported_with: BTreeMap<String, String>,
    /// sha256 (hex) of each file in the directory.
    pub files: BTreeMap<String, String>,
}

/// How a frame becomes the encoder's input, as the checkpoint's `SamImageProcessor` does it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamImageSettings {
    /// Side of the square the encoder takes (1024 for the published SAMs).
    pub size: u32,
    pub resize: SamResize,
    pub interpolation: Interpolation,
    pub pad: SamPad,
    pub rescale_factor: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamResize {
    /// The longest side to `size`, the other in proportion, rounded to nearest.
    LongestEdge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamPad {
    /// The resized image at the square's top-left corner, zeros (after normalisation) to its
    /// right and below.
    BottomRight,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingShape {
    pub channels: u32,
    pub height: u32,
    pub width: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskSettings {
    /// Side of the decoder's square low-resolution masks (4 × the embedding grid: 256 for SAM).
    pub low_res_size: u32,
    /// Logits above this are inside the mask (transformers' `mask_threshold`, 0).
    pub threshold: f32,
    /// Whether the decoder returns SAM's three candidate masks per box; this build serves the
    /// single-mask decoder.
    pub multimask_output: bool,
}

/// A verified SAM directory (see [`Exported`]).
pub type SamArtifact = Exported<SamManifest>;

impl SamArtifact {
    /// Read and verify `dir`. Hashes both modules (SAM ViT-B's encoder is 360 MB: about a
    /// second); done once at start.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, SegmentError> {
        Self::verify(dir).map_err(|e| SegmentError::Export(Arc::new(e)))
    }
}

/// Why a SAM manifest's settings are not ones this build serves.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamManifestError {
    #[error("family {family:?} is not supported (this build serves sam)")]
    Family { family: String },
    #[error("image.size must be positive")]
    ZeroImageSize,
    #[error(transparent)]
    Std(#[from] NonPositiveStd),
    #[error("image.rescale_factor {rescale_factor} must be positive")]
    RescaleFactor { rescale_factor: f32 },
    #[error("embedding {embedding:?} must have positive dimensions")]
    Embedding { embedding: EmbeddingShape },
    #[error(
        "mask.low_res_size {low_res_size} must be positive and mask.threshold {threshold} a number"
    )]
    Mask { low_res_size: u32, threshold: f32 },
    #[error(
        "mask.multimask_output is true: this build serves single-mask decoders (export again \
         with this version's export.py)"
    )]
    Multimask,
}

impl ExportManifest for SamManifest {
    const EXPORT: Export = Export {
        what: "SAM model",
        manifest: MANIFEST_FILE,
        kind: "SAM manifest",
        command: "deploy/model/export.py --sam",
        required: &REQUIRED_FILES,
    };
    type Invalid = SamManifestError;

    fn format_version(&self) -> u32 {
        self.format_version
    }

    fn validate(&self) -> Result<(), SamManifestError> {
        if self.family != "sam" {
            return Err(SamManifestError::Family {
                family: self.family.clone(),
            });
        }
        let img = &self.image;
        if img.size == 0 {
            return Err(SamManifestError::ZeroImageSize);
        }
        check_std(img.std)?;
        if !(img.rescale_factor.is_finite() && img.rescale_factor > 0.0) {
            return Err(SamManifestError::RescaleFactor {
                rescale_factor: img.rescale_factor,
            });
        }
        let e = self.embedding;
        if e.channels == 0 || e.height == 0 || e.width == 0 {
            return Err(SamManifestError::Embedding { embedding: e });
        }
        let m = self.mask;
        if m.low_res_size == 0 || !m.threshold.is_finite() {
            return Err(SamManifestError::Mask {
                low_res_size: m.low_res_size,
                threshold: m.threshold,
            });
        }
        if m.multimask_output {
            return Err(SamManifestError::Multimask);
        }
        Ok(())
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn files(&self) -> &BTreeMap<String, String> {
        &self.files
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::artifact::{check_verify, write_export, write_manifest, ExportError};

    pub(crate) fn manifest(files: BTreeMap<String, String>) -> SamManifest {
        SamManifest {
            format_version: 1,
            name: "fake-sam".into(),
            family: "sam".into(),
            source_checkpoint: "test".into(),
            image: SamImageSettings {
                size: 64,
                resize: SamResize::LongestEdge,
                interpolation: Interpolation::Bilinear,
                pad: SamPad::BottomRight,
                rescale_factor: 1.0 / 255.0,
                mean: [0.485, 0.456, 0.406],
                std: [0.229, 0.224, 0.225],
            },
            embedding: EmbeddingShape {
                channels: 8,
                height: 4,
                width: 4,
            },
            mask: MaskSettings {
                low_res_size: 16,
                threshold: 0.0,
                multimask_output: false,
            },
            exported_with: BTreeMap::new(),
            files,
        }
    }

    #[test]
    fn verifies_a_sam_export() {
        check_verify(manifest);
    }

    #[test]
    fn open_refuses_in_the_segment_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MANIFEST_FILE), r#"{"format_version": 1}"#).unwrap();
        let err = SamArtifact::open(dir.path()).unwrap_err();
        let SegmentError::Export(refusal) = &err else {
            panic!("not an export refusal: {err}");
        };
        assert!(
            matches!(
                refusal.export_error(),
                Some(ExportError::ManifestMalformed { .. })
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("not a valid SAM manifest"),
            "{err}"
        );
        assert_eq!(err.code(), "SEGMENT_MODEL");
    }

    #[test]
    fn refuses_settings_it_cannot_serve() {
        let dir = tempfile::tempdir().unwrap();
        let good = write_export(dir.path(), manifest);
        type Break = fn(&mut SamManifest);
        let cases: [(&str, Break); 4] = [
            ("image.std", |m| m.image.std[1] = 0.0),
            ("multimask_output", |m| m.mask.multimask_output = true),
            ("family \"sam2\"", |m| m.family = "sam2".into()),
            ("embedding", |m| m.embedding.height = 0),
        ];
        for (needle, break_it) in cases {
            let mut m = good.clone();
            break_it(&mut m);
            write_manifest(dir.path(), &m);
            let err = SamArtifact::verify(dir.path()).unwrap_err();
            assert!(err.to_string().contains(needle), "{needle}: {err}");
            assert!(
                matches!(err.export_error(), Some(ExportError::Invalid { .. })),
                "{err}"
            );
        }
        let mut m = good;
        m.mask.multimask_output = true;
        write_manifest(dir.path(), &m);
        let err = SamArtifact::verify(dir.path()).unwrap_err();
        assert!(matches!(
            err.export_error(),
            Some(ExportError::Invalid {
                source: SamManifestError::Multimask,
                ..
            })
        ));
    }
}
