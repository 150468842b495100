//! The served model directory and its manifest (`clipqc-model.json`).
//!
//! Guarantee: [`Artifact::open`] returns only when the manifest parses, its settings are sane
//! and every file it lists exists with the sha256 it records. A directory that was half
//! copied, or whose encoders were swapped without a new export, is refused before any
//! verdict depends on it.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ModelError;

pub const MANIFEST_FILE: &str = "clipqc-model.json";
pub const IMAGE_ENCODER: &str = "image_encoder.pt";
pub const TEXT_ENCODER: &str = "text_encoder.pt";
pub const TOKENIZER: &str = "tokenizer.json";
const REQUIRED_FILES: [&str; 3] = [IMAGE_ENCODER, TEXT_ENCODER, TOKENIZER];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub name: String,
    /// `clip`, `siglip`, `chinese_clip`: which export adapter produced the encoders.
    pub family: String,
    pub source_checkpoint: String,
    pub embedding_dim: usize,
    pub image: ImageSettings,
    pub text: TextSettings,
    pub scoring: Scoring,
    /// Multiplier of the cosine similarities (CLIP's exp(logit_scale), 100 for trained CLIP).
    pub logit_scale: f32,
    /// Added to the scaled similarities before the sigmoid (SigLIP).
    pub logit_bias: Option<f32>,
    #[serde(default)]
    pub exported_with: BTreeMap<String, String>,
    /// sha256 (hex) of each file in the directory.
    pub files: BTreeMap<String, String>,
}

/// How an image becomes the encoder's input, as the checkpoint's own processor does it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSettings {
    /// Side of the square the encoder takes.
    pub size: u32,
    pub resize: ResizeMode,
    /// For `shortest_edge`: the length the shorter side is resized to before the center crop.
    pub resize_size: u32,
    pub interpolation: Interpolation,
    pub rescale_factor: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

#[cfg(test)]
impl ImageSettings {
    /// CLIP ViT's processor (openai/clip-vit-base-patch32), for tests of preprocessing.
    pub(crate) fn clip() -> Self {
        Self {
            size: 224,
            resize: ResizeMode::ShortestEdge,
            resize_size: 224,
            interpolation: Interpolation::Bicubic,
            rescale_factor: 1.0 / 255.0,
            mean: [0.48145466, 0.4578275, 0.40821073],
            std: [0.26862954, 0.261_302_6, 0.275_777_1],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Shorter side to `resize_size` (aspect kept), then a center crop of `size` (CLIP).
    ShortestEdge,
    /// Straight to `size` × `size`, aspect not kept (SigLIP).
    Squash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    Bicubic,
    Bilinear,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextSettings {
    pub context_length: usize,
    pub pad_token_id: i64,
    /// The text encoder's inputs in order: `input_ids`, optionally `attention_mask`.
    pub inputs: Vec<String>,
}

impl TextSettings {
    pub fn needs_attention_mask(&self) -> bool {
        self.inputs.iter().any(|i| i == "attention_mask")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scoring {
    /// Softmax over the classes: probabilities sum to one (CLIP).
    Softmax,
    /// Independent sigmoid per class (SigLIP).
    Sigmoid,
}

/// A verified model directory.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Artifact {
    /// Read and verify `dir`. Hashes every file, so it costs a read of the encoders (well
    /// under a second for ViT-B/32); done once at start.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, ModelError> {
        let dir = dir.as_ref().to_path_buf();
        let fail = |message: String| ModelError::Artifact {
            dir: dir.clone(),
            message,
        };
        let export = Export {
            manifest: MANIFEST_FILE,
            kind: "manifest",
            command: "deploy/model/export.py",
            required: &REQUIRED_FILES,
        };
        let manifest = export
            .open(&dir, Manifest::validate, |m: &Manifest| &m.files)
            .map_err(|e| match e {
                FileMismatch::Unusable(message) => fail(message),
                FileMismatch::Checksum {
                    path,
                    expected,
                    actual,
                } => ModelError::Checksum {
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

    /// `name@hash`: the model identity written into every verdict. The hash covers every
    /// served file, so two exports that differ in any weight get different ids.
    pub fn model_id(&self) -> String {
        format!("{}@{}", self.manifest.name, self.model_hash())
    }

    pub fn model_hash(&self) -> String {
        files_hash(&self.manifest.files)
    }
}

/// Why an exported directory does not check out against its manifest (shared by the CLIP and
/// the SAM artifacts, which map it into their own error).
#[derive(Debug)]
pub(crate) enum FileMismatch {
    /// The manifest unreadable or invalid, or a file unlisted or unreadable: the message says
    /// which and why.
    Unusable(String),
    /// Its bytes are not the ones the manifest hashed: a partial copy or a different export.
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

/// An exported directory as its manifest describes it (the CLIP model's, SAM's): which file is
/// the manifest, what to call it in errors, the command that writes one, and the files it must
/// list with their sha256.
pub(crate) struct Export<'a> {
    pub manifest: &'a str,
    pub kind: &'a str,
    pub command: &'a str,
    pub required: &'a [&'a str],
}

impl Export<'_> {
    /// Read the manifest from `dir`, `validate` it, and check that each required file is listed in
    /// its `files` with the sha256 it has. Every byte is read: a copy cut short or a file from
    /// another export is refused at start instead of loading weights nobody checked.
    pub(crate) fn open<M: serde::de::DeserializeOwned>(
        &self,
        dir: &Path,
        validate: impl FnOnce(&M) -> Result<(), String>,
        files: impl FnOnce(&M) -> &BTreeMap<String, String>,
    ) -> Result<M, FileMismatch> {
        let Export {
            manifest: file,
            kind,
            command,
            required,
        } = self;
        let unusable = FileMismatch::Unusable;
        let text = std::fs::read_to_string(dir.join(file)).map_err(|e| {
            unusable(format!(
                "cannot read {file}: {e} (export one with {command})"
            ))
        })?;
        let manifest: M = serde_json::from_str(&text)
            .map_err(|e| unusable(format!("{file} is not a valid {kind}: {e}")))?;
        validate(&manifest).map_err(|m| unusable(format!("{file}: {m}")))?;
        let listed = files(&manifest);
        for name in required.iter() {
            let expected = listed
                .get(*name)
                .ok_or_else(|| unusable(format!("{file} lists no sha256 for {name}")))?;
            let path = dir.join(name);
            let actual =
                sha256_file(&path).map_err(|e| unusable(format!("cannot read {name}: {e}")))?;
            if !actual.eq_ignore_ascii_case(expected) {
                return Err(FileMismatch::Checksum {
                    path,
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        Ok(manifest)
    }
}

/// The short hash in a model id: over every file's name and sha256, so two exports that differ
/// in any weight get different ids, and the same export always the same one.
pub(crate) fn files_hash(files: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    for (name, sum) in files {
        h.update(name.as_bytes());
        h.update(b"=");
        h.update(sum.as_bytes());
        h.update(b"\n");
    }
    hex::encode(&h.finalize()[..6])
}

impl Manifest {
    fn validate(&self) -> Result<(), String> {
        if self.format_version != 1 {
            return Err(format!(
                "format_version {} is not supported (this build reads 1)",
                self.format_version
            ));
        }
        let img = &self.image;
        if img.size == 0 || img.resize_size == 0 {
            return Err("image.size and image.resize_size must be positive".into());
        }
        if img.resize == ResizeMode::ShortestEdge && img.resize_size < img.size {
            return Err(format!(
                "image.resize_size {} is smaller than the crop {}",
                img.resize_size, img.size
            ));
        }
        if img.std.iter().any(|s| s.is_nan() || *s <= 0.0) {
            return Err(format!("image.std {:?} must be positive", img.std));
        }
        if self.embedding_dim == 0 || self.text.context_length == 0 {
            return Err("embedding_dim and text.context_length must be positive".into());
        }
        if self.text.inputs.first().map(String::as_str) != Some("input_ids") {
            return Err(format!(
                "text.inputs {:?} must start with input_ids",
                self.text.inputs
            ));
        }
        if !(self.logit_scale.is_finite() && self.logit_scale > 0.0) {
            return Err(format!(
                "logit_scale {} must be a positive number",
                self.logit_scale
            ));
        }
        Ok(())
    }
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn write_fake_artifact(dir: &Path) -> Manifest {
        let mut files = BTreeMap::new();
        for name in REQUIRED_FILES {
            std::fs::write(dir.join(name), name.as_bytes()).unwrap();
            files.insert(name.to_string(), sha256_file(&dir.join(name)).unwrap());
        }
        let manifest = Manifest {
            format_version: 1,
            name: "fake".into(),
            family: "clip".into(),
            source_checkpoint: "test".into(),
            embedding_dim: 4,
            image: ImageSettings {
                size: 224,
                resize: ResizeMode::ShortestEdge,
                resize_size: 224,
                interpolation: Interpolation::Bicubic,
                rescale_factor: 1.0 / 255.0,
                mean: [0.5; 3],
                std: [0.5; 3],
            },
            text: TextSettings {
                context_length: 77,
                pad_token_id: 0,
                inputs: vec!["input_ids".into()],
            },
            scoring: Scoring::Softmax,
            logit_scale: 100.0,
            logit_bias: None,
            exported_with: BTreeMap::new(),
            files,
        };
        std::fs::write(
            dir.join(MANIFEST_FILE),
            serde_json::to_string(&manifest).unwrap(),
        )
        .unwrap();
        manifest
    }

    #[test]
    fn opens_a_consistent_directory() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = write_fake_artifact(dir.path());
        let artifact = Artifact::open(dir.path()).unwrap();
        assert_eq!(artifact.manifest, manifest);
        assert!(artifact.model_id().starts_with("fake@"));
        assert_eq!(artifact.model_hash().len(), 12);
    }

    #[test]
    fn refuses_a_modified_file_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        write_fake_artifact(dir.path());
        std::fs::write(dir.path().join(TEXT_ENCODER), b"swapped").unwrap();
        let err = Artifact::open(dir.path()).unwrap_err();
        assert!(matches!(err, ModelError::Checksum { .. }), "{err}");
        assert!(err.to_string().contains("text_encoder.pt"), "{err}");
    }

    #[test]
    fn refuses_a_missing_file_or_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let err = Artifact::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("clipqc-model.json"), "{err}");
        write_fake_artifact(dir.path());
        std::fs::remove_file(dir.path().join(TOKENIZER)).unwrap();
        let err = Artifact::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
    }

    #[test]
    fn refuses_insane_settings() {
        let dir = tempfile::tempdir().unwrap();
        let mut manifest = write_fake_artifact(dir.path());
        manifest.image.std = [0.5, 0.0, 0.5];
        std::fs::write(
            dir.path().join(MANIFEST_FILE),
            serde_json::to_string(&manifest).unwrap(),
        )
        .unwrap();
        let err = Artifact::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("image.std"), "{err}");
    }
}
