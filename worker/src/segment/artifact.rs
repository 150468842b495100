//! The SAM artifact directory and its manifest (`clipqc-sam.json`), written by
//! `deploy/model/export.py --sam` / `--random-sam`.
//!
//! Guarantee: [`SamArtifact::open`] returns only when the manifest parses, its settings are
//! ones this build serves (SAM's resize and padding rule, a single-mask decoder) and both
//! TorchScript files exist with the sha256 the manifest records, as the CLIP artifact
//! ([`crate::model::Artifact`]) is checked.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::SegmentError;
use crate::model::artifact::{files_hash, Export, FileMismatch, Interpolation};

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

/// A verified SAM directory.
#[derive(Debug, Clone)]
pub struct SamArtifact {
    pub dir: PathBuf,
    pub manifest: SamManifest,
}

impl SamArtifact {
    /// Read and verify `dir`. Hashes both modules (SAM ViT-B's encoder is 360 MB: about a
    /// second); done once at start.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, SegmentError> {
        let dir = dir.as_ref().to_path_buf();
        let fail = |message: String| SegmentError::Artifact {
            dir: dir.clone(),
            message,
        };
        let export = Export {
            manifest: MANIFEST_FILE,
            kind: "SAM manifest",
            command: "deploy/model/export.py --sam",
            required: &REQUIRED_FILES,
        };
        let manifest = export
            .open(&dir, SamManifest::validate, |m: &SamManifest| &m.files)
            .map_err(|e| match e {
                FileMismatch::Unusable(message) => fail(message),
                FileMismatch::Checksum {
                    path,
                    expected,
                    actual,
                } => SegmentError::Checksum {
                    path,
                    expected,
                    actual,
                },
            })?;
        Ok(Self { dir, manifest })
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// `name@hash`, the hash over every file's sha256: two exports that differ in any weight
    /// get different ids (as [`crate::model::Artifact::model_id`]).
    pub fn model_id(&self) -> String {
        format!(
            "{}@{}",
            self.manifest.name,
            files_hash(&self.manifest.files)
        )
    }
}

impl SamManifest {
    fn validate(&self) -> Result<(), String> {
        if self.format_version != 1 {
            return Err(format!(
                "format_version {} is not supported (this build reads 1)",
                self.format_version
            ));
        }
        if self.family != "sam" {
            return Err(format!(
                "family {:?} is not supported (this build serves sam)",
                self.family
            ));
        }
        let img = &self.image;
        if img.size == 0 {
            return Err("image.size must be positive".into());
        }
        if img.std.iter().any(|s| s.is_nan() || *s <= 0.0) {
            return Err(format!("image.std {:?} must be positive", img.std));
        }
        if !(img.rescale_factor.is_finite() && img.rescale_factor > 0.0) {
            return Err(format!(
                "image.rescale_factor {} must be positive",
                img.rescale_factor
            ));
        }
        let e = &self.embedding;
        if e.channels == 0 || e.height == 0 || e.width == 0 {
            return Err(format!("embedding {e:?} must have positive dimensions"));
        }
        if self.mask.low_res_size == 0 || !self.mask.threshold.is_finite() {
            return Err(format!(
                "mask.low_res_size {} must be positive and mask.threshold {} a number",
                self.mask.low_res_size, self.mask.threshold
            ));
        }
        if self.mask.multimask_output {
            return Err(
                "mask.multimask_output is true: this build serves single-mask decoders (export \
                 again with this version's export.py)"
                    .into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::artifact::sha256_file;

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

    fn write(dir: &Path, manifest: &SamManifest) {
        std::fs::write(
            dir.join(MANIFEST_FILE),
            serde_json::to_string(manifest).unwrap(),
        )
        .unwrap();
    }

    fn write_fake_artifact(dir: &Path) -> SamManifest {
        let mut files = BTreeMap::new();
        for name in REQUIRED_FILES {
            std::fs::write(dir.join(name), name.as_bytes()).unwrap();
            files.insert(name.to_string(), sha256_file(&dir.join(name)).unwrap());
        }
        let m = manifest(files);
        write(dir, &m);
        m
    }

    #[test]
    fn opens_a_consistent_directory() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = write_fake_artifact(dir.path());
        let artifact = SamArtifact::open(dir.path()).unwrap();
        assert_eq!(artifact.manifest, manifest);
        let id = artifact.model_id();
        assert!(id.starts_with("fake-sam@") && id.len() == "fake-sam@".len() + 12);
    }

    #[test]
    fn refuses_a_modified_or_missing_file_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        write_fake_artifact(dir.path());
        std::fs::write(dir.path().join(MASK_DECODER), b"swapped").unwrap();
        let err = SamArtifact::open(dir.path()).unwrap_err();
        assert!(matches!(err, SegmentError::Checksum { .. }), "{err}");
        assert!(err.to_string().contains(MASK_DECODER), "{err}");
        std::fs::remove_file(dir.path().join(IMAGE_ENCODER)).unwrap();
        let err = SamArtifact::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains(IMAGE_ENCODER), "{err}");
    }

    #[test]
    fn refuses_a_directory_without_a_manifest_or_a_clip_one() {
        let dir = tempfile::tempdir().unwrap();
        let err = SamArtifact::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("cannot read clipqc-sam.json"), "{err}");
        std::fs::write(dir.path().join(MANIFEST_FILE), r#"{"format_version": 1}"#).unwrap();
        let err = SamArtifact::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a valid SAM manifest"), "{err}");
    }

    #[test]
    fn refuses_settings_it_cannot_serve() {
        let dir = tempfile::tempdir().unwrap();
        let good = write_fake_artifact(dir.path());
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
            write(dir.path(), &m);
            let err = SamArtifact::open(dir.path()).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }
}
