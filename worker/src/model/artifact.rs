//! The served model directory and its manifest (`clipqc-model.json`).
//!
//! Guarantee: [`Artifact::open`] returns only when the manifest parses, its settings are sane
//! and every file it lists exists with the sha256 it records. A directory that was half
//! copied, or whose encoders were swapped without a new export, is refused before any
//! verdict depends on it.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
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

/// A verified CLIP model directory (see [`Exported`]).
pub type Artifact = Exported<Manifest>;

impl Artifact {
    /// Read and verify `dir`. Hashes every file, so it costs a read of the encoders (well
    /// under a second for ViT-B/32); done once at start.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, ModelError> {
        Self::verify(dir).map_err(|e| ModelError::Export(Arc::new(e)))
    }
}

/// The manifest of an exported directory (the CLIP model's, SAM's): where it lies, what it
/// lists, and what this build serves of it. [`Exported::verify`] reads one.
pub trait ExportManifest: DeserializeOwned {
    /// Its file, the files it must list, and what to call it in errors.
    const EXPORT: Export;
    /// Why its settings are not ones this build serves.
    type Invalid: std::error::Error + Send + Sync + 'static;
    fn format_version(&self) -> u32;
    /// Beyond the format version: the settings this build serves.
    fn validate(&self) -> Result<(), Self::Invalid>;
    fn name(&self) -> &str;
    /// sha256 (hex) of each file in the directory.
    fn files(&self) -> &BTreeMap<String, String>;
}

/// An exported directory as its manifest describes it: which file is the manifest, what to
/// call it in errors, the command that writes one, and the files it must list with their
/// sha256.
#[derive(Debug, Clone, Copy)]
pub struct Export {
    /// `model`, `SAM model`: what the directory is, in errors.
    pub what: &'static str,
    pub manifest: &'static str,
    pub kind: &'static str,
    pub command: &'static str,
    pub required: &'static [&'static str],
}

/// The only manifest format this build reads (its errors say 1).
pub const FORMAT_VERSION: u32 = 1;

/// A verified export: its manifest parsed and sane, every file it must list hashed as it
/// says.
#[derive(Debug, Clone)]
pub struct Exported<M> {
    pub dir: PathBuf,
    pub manifest: M,
}

/// Why an exported directory was refused (the CLIP model's, SAM's): `what` and `dir` name it.
#[derive(Debug, thiserror::Error)]
pub enum OpenError<V: std::error::Error + 'static> {
    #[error("{what} directory {dir}: {source}")]
    Unusable {
        what: &'static str,
        dir: PathBuf,
        source: ExportError<V>,
    },
    /// Its bytes are not the ones the manifest hashed: a partial copy or a different export.
    #[error("{what} file {path}: sha256 {actual} does not match the manifest's {expected}")]
    Checksum {
        what: &'static str,
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

impl<V: std::error::Error + 'static> OpenError<V> {
    /// What is wrong with the directory, unless its refusal is a checksum's.
    pub fn export_error(&self) -> Option<&ExportError<V>> {
        match self {
            Self::Unusable { source, .. } => Some(source),
            Self::Checksum { .. } => None,
        }
    }
}

/// What is wrong with a directory beside a checksum (see [`OpenError`]).
#[derive(Debug, thiserror::Error)]
pub enum ExportError<V: std::error::Error + 'static> {
    #[error("cannot read {file}: {source} (export one with {command})")]
    ManifestUnreadable {
        file: &'static str,
        command: &'static str,
        source: std::io::Error,
    },
    #[error("{file} is not a valid {kind}: {source}")]
    ManifestMalformed {
        file: &'static str,
        kind: &'static str,
        source: serde_json::Error,
    },
    #[error("{file}: format_version {version} is not supported (this build reads 1)")]
    UnsupportedVersion { file: &'static str, version: u32 },
    #[error("{file}: {source}")]
    Invalid { file: &'static str, source: V },
    #[error("{file} lists no sha256 for {name}")]
    Unlisted {
        file: &'static str,
        name: &'static str,
    },
    #[error("cannot read {name}: {source}")]
    FileUnreadable {
        name: &'static str,
        source: std::io::Error,
    },
}

impl<M: ExportManifest> Exported<M> {
    /// Read the manifest from `dir`, check its format version, validate it, and check that
    /// each required file is listed with the sha256 it has. Every byte is read: a copy cut
    /// short or a file from another export is refused at start instead of loading weights
    /// nobody checked.
    pub fn verify(dir: impl AsRef<Path>) -> Result<Self, OpenError<M::Invalid>> {
        let dir = dir.as_ref().to_path_buf();
        let Export {
            what,
            manifest: file,
            kind,
            command,
            required,
        } = M::EXPORT;
        let unusable = |source| OpenError::Unusable {
            what,
            dir: dir.clone(),
            source,
        };
        let text = std::fs::read_to_string(dir.join(file)).map_err(|source| {
            unusable(ExportError::ManifestUnreadable {
                file,
                command,
                source,
            })
        })?;
        let manifest: M = serde_json::from_str(&text)
            .map_err(|source| unusable(ExportError::ManifestMalformed { file, kind, source }))?;
        let version = manifest.format_version();
        if version != FORMAT_VERSION {
            return Err(unusable(ExportError::UnsupportedVersion { file, version }));
        }
        manifest
            .validate()
            .map_err(|source| unusable(ExportError::Invalid { file, source }))?;
        for &name in required {
            let expected = manifest
                .files()
                .get(name)
                .ok_or_else(|| unusable(ExportError::Unlisted { file, name }))?;
            let path = dir.join(name);
            let actual = sha256_file(&path)
                .map_err(|source| unusable(ExportError::FileUnreadable { name, source }))?;
            if !actual.eq_ignore_ascii_case(expected) {
                return Err(OpenError::Checksum {
                    what,
                    path,
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        Ok(Self { dir, manifest })
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// `name@hash`: the model identity written into every verdict. The hash covers every
    /// served file, so two exports that differ in any weight get different ids.
    pub fn model_id(&self) -> String {
        format!("{}@{}", self.manifest.name(), self.model_hash())
    }

    /// The short hash in a model id: over every file's name and sha256, so two exports that
    /// differ in any weight get different ids, and the same export always the same one.
    pub fn model_hash(&self) -> String {
        let mut h = Sha256::new();
        for (name, sum) in self.manifest.files() {
            h.update(name.as_bytes());
            h.update(b"=");
            h.update(sum.as_bytes());
            h.update(b"\n");
        }
        hex::encode(&h.finalize()[..6])
    }
}

/// Why a CLIP manifest's settings are not ones this build serves.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ManifestError {
    #[error("image.size and image.resize_size must be positive")]
    ZeroImageSize,
    #[error("image.resize_size {resize_size} is smaller than the crop {size}")]
    ResizeSmallerThanCrop { resize_size: u32, size: u32 },
    #[error(transparent)]
    Std(#[from] NonPositiveStd),
    #[error("embedding_dim and text.context_length must be positive")]
    ZeroDimension,
    #[error("text.inputs {inputs:?} must start with input_ids")]
    TextInputs { inputs: Vec<String> },
    #[error("logit_scale {logit_scale} must be a positive number")]
    LogitScale { logit_scale: f32 },
}

/// `image.std` with a zero, negative or NaN entry (shared by the CLIP and SAM manifests).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("image.std {std:?} must be positive")]
pub struct NonPositiveStd {
    pub std: [f32; 3],
}

/// `std` as a normalisation can divide by: every entry positive.
pub fn check_std(std: [f32; 3]) -> Result<(), NonPositiveStd> {
    if std.iter().any(|s| s.is_nan() || *s <= 0.0) {
        return Err(NonPositiveStd { std });
    }
    Ok(())
}

impl ExportManifest for Manifest {
    const EXPORT: Export = Export {
        what: "model",
        manifest: MANIFEST_FILE,
        kind: "manifest",
        command: "deploy/model/export.py",
        required: &REQUIRED_FILES,
    };
    type Invalid = ManifestError;

    fn format_version(&self) -> u32 {
        self.format_version
    }

    fn validate(&self) -> Result<(), ManifestError> {
        let img = &self.image;
        if img.size == 0 || img.resize_size == 0 {
            return Err(ManifestError::ZeroImageSize);
        }
        if img.resize == ResizeMode::ShortestEdge && img.resize_size < img.size {
            return Err(ManifestError::ResizeSmallerThanCrop {
                resize_size: img.resize_size,
                size: img.size,
            });
        }
        check_std(img.std)?;
        if self.embedding_dim == 0 || self.text.context_length == 0 {
            return Err(ManifestError::ZeroDimension);
        }
        if self.text.inputs.first().map(String::as_str) != Some("input_ids") {
            return Err(ManifestError::TextInputs {
                inputs: self.text.inputs.clone(),
            });
        }
        if !(self.logit_scale.is_finite() && self.logit_scale > 0.0) {
            return Err(ManifestError::LogitScale {
                logit_scale: self.logit_scale,
            });
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

/// Test builds: writes `M`'s required files (each holding its own name) into `dir`, and the
/// manifest `make` builds from their sha256s; returns that manifest.
#[cfg(test)]
pub(crate) fn write_export<M: ExportManifest + Serialize>(
    dir: &Path,
    make: impl FnOnce(BTreeMap<String, String>) -> M,
) -> M {
    let mut files = BTreeMap::new();
    for name in M::EXPORT.required {
        std::fs::write(dir.join(name), name.as_bytes()).unwrap();
        files.insert(name.to_string(), sha256_file(&dir.join(name)).unwrap());
    }
    let manifest = make(files);
    write_manifest(dir, &manifest);
    manifest
}

/// Test builds: (re)writes `manifest` into `dir`.
#[cfg(test)]
pub(crate) fn write_manifest<M: ExportManifest + Serialize>(dir: &Path, manifest: &M) {
    std::fs::write(
        dir.join(M::EXPORT.manifest),
        serde_json::to_string(manifest).unwrap(),
    )
    .unwrap();
}

/// Test builds: what every export's opener does, checked on `M` (the CLIP and the SAM
/// manifests' tests call it with a manifest of theirs): a missing manifest, one of another
/// format version, a changed file and a missing one are refused, naming the file; a consistent
/// directory opens, with a model id of the name and 12 hex digits.
#[cfg(test)]
pub(crate) fn check_verify<M>(make: impl FnOnce(BTreeMap<String, String>) -> M)
where
    M: ExportManifest + Serialize + PartialEq + std::fmt::Debug,
{
    let dir = tempfile::tempdir().unwrap();
    let (d, export) = (dir.path(), M::EXPORT);
    let verify = || Exported::<M>::verify(d);
    let err = verify().unwrap_err();
    assert!(
        matches!(
            err.export_error(),
            Some(ExportError::ManifestUnreadable { .. })
        ),
        "{err}"
    );
    let text = err.to_string();
    let directory = format!("{} directory {}: ", export.what, d.display());
    assert!(text.starts_with(&directory), "{text}");
    assert!(
        text.contains(&format!("cannot read {}", export.manifest)),
        "{text}"
    );

    let manifest = write_export(d, make);
    let opened = verify().unwrap();
    assert_eq!(opened.manifest, manifest);
    let id = opened.model_id();
    let name = manifest.name();
    assert!(
        id.starts_with(&format!("{name}@")) && id.len() == name.len() + 13,
        "{id}"
    );

    let mut json = serde_json::to_value(&manifest).unwrap();
    json["format_version"] = 2.into();
    std::fs::write(d.join(export.manifest), json.to_string()).unwrap();
    let err = verify().unwrap_err();
    assert!(
        matches!(
            err.export_error(),
            Some(ExportError::UnsupportedVersion { version: 2, .. })
        ),
        "{err}"
    );
    assert!(
        err.to_string().ends_with(&format!(
            "{}: format_version 2 is not supported (this build reads 1)",
            export.manifest
        )),
        "{err}"
    );
    write_manifest(d, &manifest);

    let [first, .., last] = export.required else {
        panic!("an export of fewer than two files");
    };
    std::fs::write(d.join(last), b"swapped").unwrap();
    let err = verify().unwrap_err();
    assert!(matches!(err, OpenError::Checksum { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("{} file ", export.what)) && text.contains(last),
        "{text}"
    );
    std::fs::remove_file(d.join(first)).unwrap();
    let err = verify().unwrap_err();
    assert!(
        matches!(err.export_error(), Some(ExportError::FileUnreadable { name, .. }) if name == first),
        "{err}"
    );
    assert!(
        err.to_string().ends_with(&format!(
            "cannot read {first}: No such file or directory (os error 2)"
        )),
        "{err}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_manifest(files: BTreeMap<String, String>) -> Manifest {
        Manifest {
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
        }
    }

    #[test]
    fn verifies_a_model_export() {
        check_verify(fake_manifest);
    }

    #[test]
    fn open_refuses_in_the_model_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = write_export(dir.path(), fake_manifest);
        assert_eq!(Artifact::open(dir.path()).unwrap().manifest, manifest);
        std::fs::write(dir.path().join(TEXT_ENCODER), b"swapped").unwrap();
        let err = Artifact::open(dir.path()).unwrap_err();
        assert!(
            matches!(&err, ModelError::Export(e) if matches!(**e, OpenError::Checksum { .. })),
            "{err}"
        );
        assert!(err.to_string().contains("text_encoder.pt"), "{err}");
    }

    #[test]
    fn refuses_insane_settings() {
        let dir = tempfile::tempdir().unwrap();
        let mut manifest = write_export(dir.path(), fake_manifest);
        manifest.image.std = [0.5, 0.0, 0.5];
        write_manifest(dir.path(), &manifest);
        let err = Exported::<Manifest>::verify(dir.path()).unwrap_err();
        assert!(
            matches!(
                err.export_error(),
                Some(ExportError::Invalid {
                    source: ManifestError::Std(_),
                    ..
                })
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "model directory {}: clipqc-model.json: image.std [0.5, 0.0, 0.5] must be positive",
                dir.path().display()
            )
        );
    }
}
