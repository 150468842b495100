//! The model stage: an exported CLIP artifact behind the [`Backend`] trait.
//!
//! Guarantees: an artifact is used only after its manifest and every file's sha256 check out
//! ([`artifact`]); prompts are tokenized exactly as CLIP's tokenizer does and never cut
//! silently ([`tokenizer`]); the backend lives on one OS thread that alone touches libtorch
//! ([`owner`]), fed through a bounded channel.

pub mod artifact;
pub mod fake;
pub mod fake_artifact;
pub mod owner;
pub mod tch_backend;
pub mod tokenizer;

use std::path::PathBuf;
use std::sync::Arc;

use schemars::JsonSchema;
use serde::Deserialize;

pub use artifact::{Artifact, Manifest};
pub use owner::{ModelHandle, ModelOwner};
pub use tokenizer::PromptTokenizer;

// The `model` section of the config, beside the stage that reads it. (Without a doc comment,
// as before: one would become the JSON schema's description of the section.)
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    /// The exported artifact directory (deploy/model/export.py).
    pub dir: Option<PathBuf>,
    /// The Segment Anything artifact directory (deploy/model/export.py --sam), for profiles
    /// with `segment = true`; it runs on `device` too. Unset: no profile may segment.
    #[serde(default)]
    pub sam_dir: Option<PathBuf>,
    /// Frames that may wait for the segmentation thread. When that many wait, a DEFECT or
    /// REVIEW verdict goes out at once without masks (`segmentation = "SEGMENT_QUEUE_FULL"`,
    /// counted in `clipqc_segment_skipped_total`), so segmentation never slows classification.
    #[serde(default = "default_sam_queue")]
    pub sam_queue: usize,
    /// How long a verdict waits for its masks: past it, it goes out without
    /// (`segmentation = "SEGMENT_TIMEOUT"`). A SAM call running twice as long makes `/healthz`
    /// fail (the orchestrator restarts the worker: SAM hangs).
    #[serde(default = "default_sam_timeout_ms")]
    pub sam_timeout_ms: u64,
    /// What frames being segmented may hold in memory (the full-size decode, SAM's input, the
    /// masks), apart from `pipeline.max_in_flight_bytes`: a burst of large DEFECT frames waits
    /// here, not in front of the classification of the next parts.
    #[serde(default = "default_sam_max_in_flight_bytes")]
    pub sam_max_in_flight_bytes: u64,
    #[serde(default)]
    pub device: DeviceSpec,
}

fn default_sam_queue() -> usize {
    4
}

fn default_sam_timeout_ms() -> u64 {
    30_000
}

fn default_sam_max_in_flight_bytes() -> u64 {
    512 << 20
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            dir: None,
            sam_dir: None,
            sam_queue: default_sam_queue(),
            sam_timeout_ms: default_sam_timeout_ms(),
            sam_max_in_flight_bytes: default_sam_max_in_flight_bytes(),
            device: DeviceSpec::default(),
        }
    }
}

/// Errors of the model stage. Each names the file or prompt it is about.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelError {
    #[error("model directory {dir}: {message}")]
    Artifact { dir: PathBuf, message: String },
    /// The directory does not check out against its manifest ([`Artifact::open`]).
    #[error(transparent)]
    Export(Arc<artifact::OpenError<artifact::ManifestError>>),
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("prompt {prompt:?} is {tokens} tokens long, over the model's context of {max}: it would be cut silently")]
    PromptTooLong {
        prompt: String,
        tokens: usize,
        max: usize,
    },
    #[error("device {0:?}: {1}")]
    Device(String, String),
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("the model thread has stopped")]
    Stopped,
    #[error("the model returned {got} embeddings for a batch of {expected} images")]
    WrongRows { got: usize, expected: usize },
}

/// A batch of preprocessed images: `n` × 3 × `size` × `size` floats, row-major, CHW per image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageBatch {
    pub data: Vec<f32>,
    pub n: usize,
    pub size: usize,
}

impl ImageBatch {
    pub fn new(size: usize) -> Self {
        Self {
            data: Vec::new(),
            n: 0,
            size,
        }
    }

    /// Append one image's CHW pixels.
    pub fn push(&mut self, pixels: &[f32]) {
        assert_eq!(
            pixels.len(),
            3 * self.size * self.size,
            "image tensor of the wrong size. This is a bug."
        );
        self.data.extend_from_slice(pixels);
        self.n += 1;
    }

    /// `n` copies of one image: a full batch for warm-up and for measuring the model alone.
    pub fn repeated(size: usize, pixels: &[f32], n: usize) -> Self {
        let mut batch = Self::new(size);
        for _ in 0..n {
            batch.push(pixels);
        }
        batch
    }
}

/// A batch of tokenized texts: `n` × `len` ids and the matching attention mask (1 = token).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatch {
    pub ids: Vec<i64>,
    pub mask: Vec<i64>,
    pub n: usize,
    pub len: usize,
}

/// `n` embeddings of `dim` floats each, as the encoders return them (not normalised).
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    pub data: Vec<f32>,
    pub n: usize,
    pub dim: usize,
}

impl Embeddings {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    pub fn rows(&self) -> impl Iterator<Item = &[f32]> {
        self.data.chunks_exact(self.dim)
    }
}

/// What runs the encoders. Implementations live on the model thread and are never shared.
pub trait Backend {
    /// One line for logs: the model and where it runs.
    fn describe(&self) -> String;
    fn embed_images(&mut self, batch: &ImageBatch) -> Result<Embeddings, ModelError>;
    fn embed_texts(&mut self, batch: &TokenBatch) -> Result<Embeddings, ModelError>;

    /// A batch already in a tensor (`n×3×S×S` float32, on any device: the device
    /// preprocessing path's views), embedded without a trip through host memory where the
    /// backend can. By default: copied to the host and embedded as an [`ImageBatch`].
    fn embed_tensor(&mut self, batch: &tch::Tensor) -> Result<Embeddings, ModelError> {
        let dims = batch.size();
        if dims.len() != 4 || dims[1] != 3 || dims[2] != dims[3] {
            return Err(ModelError::Inference(format!(
                "an image batch tensor must be n×3×S×S, not {dims:?}"
            )));
        }
        let flat = batch
            .to_device(tch::Device::Cpu)
            .to_kind(tch::Kind::Float)
            .contiguous()
            .view(-1);
        let data = Vec::<f32>::try_from(&flat).map_err(|e| ModelError::Inference(e.to_string()))?;
        self.embed_images(&ImageBatch {
            data,
            n: dims[0] as usize,
            size: dims[2] as usize,
        })
    }
}

/// Where to run: `auto` (first CUDA device if there is one), `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum DeviceSpec {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| ModelError::Device(s.to_string(), why.to_string());
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map(Self::Cuda)
                    .map_err(|_| bad("expected cuda:N with N a device index")),
                None => Err(bad("expected auto, cpu, cuda or cuda:N")),
            },
        }
    }
}

impl schemars::JsonSchema for DeviceSpec {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "DeviceSpec".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "auto (first CUDA device if any), cpu, cuda or cuda:N",
            "type": "string",
            "pattern": "^(auto|cpu|cuda|gpu|cuda:[0-9]+)$"
        })
    }
}

impl<'de> serde::Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse() {
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        let err = "tpu".parse::<DeviceSpec>().unwrap_err().to_string();
        assert!(err.contains("\"tpu\""), "{err}");
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }
}
