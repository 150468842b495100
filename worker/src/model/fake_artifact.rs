//! A model artifact written from Rust, for tests that need *a* model and not a particular
//! one: `cargo test` then runs without Python (the export tool and the checkpoints' reference
//! implementations stay for the fidelity tests, which compare with them).
//!
//! What it writes is a real artifact in every respect the worker checks: a manifest whose
//! sha256s match, two TorchScript modules with the encoders' interfaces (traced from tch
//! operations, loaded by libtorch like an exported CLIP), and a `tokenizers` JSON file.
//! - the image encoder averages each channel over a 4 × 4 grid of the frame and projects those
//!   48 numbers to the embedding with fixed random weights: different frames, different
//!   embeddings; the same frame, the same embedding; a pixel change moves only the grid
//!   cells it falls in;
//! - the text encoder averages fixed random embeddings of the prompt's tokens (the attention
//!   mask's ones);
//! - the tokenizer is byte-level BPE without merges: every UTF-8 byte one token, between a
//!   start and an end token, so any text tokenizes and prompts that differ embed differently.
//!
//! Deterministic: the same `seed` writes the same weights (drawing them holds a process-wide
//! lock on libtorch's generator; nothing else in clipqc draws from it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use tch::{CModule, Kind, Tensor};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::Tokenizer;

use super::artifact::{
    sha256_file, ImageSettings, Interpolation, Manifest, ResizeMode, Scoring, TextSettings,
    IMAGE_ENCODER, MANIFEST_FILE, TEXT_ENCODER, TOKENIZER,
};

/// The fake model's embedding width and input size (those of the exported tiny model).
pub const EMBEDDING_DIM: usize = 32;
pub const IMAGE_SIZE: u32 = 224;
/// Bytes of a prompt are tokens: a longer context than CLIP's 77 words.
pub const CONTEXT_LENGTH: usize = 256;

const START: &str = "<|startoftext|>";
const END: &str = "<|endoftext|>";

/// Write the artifact into `dir` (created if missing; files in it are replaced).
pub fn write(dir: &Path, seed: i64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    // libtorch's generator is one per process: two artifacts written side by side (tests run
    // in parallel) would interleave their draws and neither would be the seed's.
    static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _generator = GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed);
    let _no_grad = tch::no_grad_guard();
    let d = EMBEDDING_DIM as i64;

    let projection = Tensor::randn([48, d], (Kind::Float, tch::Device::Cpu)) / 48f64.sqrt();
    let size = i64::from(IMAGE_SIZE);
    let pixels = Tensor::zeros([2, 3, size, size], (Kind::Float, tch::Device::Cpu));
    let mut image = |x: &[Tensor]| {
        vec![x[0]
            .adaptive_avg_pool2d([4, 4])
            .flatten(1, -1)
            .matmul(&projection)]
    };
    CModule::create_by_tracing("FakeImageEncoder", "forward", &[pixels], &mut image)?
        .save(dir.join(IMAGE_ENCODER))?;

    let tokenizer = byte_tokenizer()?;
    let vocab = tokenizer.get_vocab_size(true) as i64;
    let table = Tensor::randn([vocab, d], (Kind::Float, tch::Device::Cpu));
    let ids = Tensor::zeros([2, 5], (Kind::Int64, tch::Device::Cpu));
    let mask = Tensor::ones([2, 5], (Kind::Int64, tch::Device::Cpu));
    let mut text =
        |x: &[Tensor]| {
            let mask = x[1].to_kind(Kind::Float).unsqueeze(-1);
            let summed = (Tensor::embedding(&table, &x[0], -1, false, false) * &mask)
                .sum_dim_intlist(1, false, Kind::Float);
            vec![summed / mask.sum_dim_intlist(1, false, Kind::Float).clamp_min(1.0)]
        };
    CModule::create_by_tracing("FakeTextEncoder", "forward", &[ids, mask], &mut text)?
        .save(dir.join(TEXT_ENCODER))?;
    tokenizer
        .save(dir.join(TOKENIZER), false)
        .map_err(|e| anyhow::anyhow!("write {TOKENIZER}: {e}"))?;

    let pad = tokenizer
        .token_to_id(END)
        .ok_or_else(|| anyhow::anyhow!("the fake tokenizer has no {END}"))?;
    let mut files = BTreeMap::new();
    for f in [IMAGE_ENCODER, TEXT_ENCODER, TOKENIZER] {
        files.insert(f.to_string(), sha256_file(&dir.join(f))?);
    }
    let manifest = Manifest {
        format_version: 1,
        name: "clip-fake-rust".into(),
        family: "clip".into(),
        source_checkpoint: format!("fake:rust:seed={seed}"),
        embedding_dim: EMBEDDING_DIM,
        image: ImageSettings {
            size: IMAGE_SIZE,
            resize: ResizeMode::ShortestEdge,
            resize_size: IMAGE_SIZE,
            interpolation: Interpolation::Bicubic,
            rescale_factor: 1.0 / 255.0,
            mean: [0.48145466, 0.4578275, 0.40821073],
            std: [0.26862954, 0.261_302_6, 0.275_777_1],
        },
        text: TextSettings {
            context_length: CONTEXT_LENGTH,
            pad_token_id: i64::from(pad),
            inputs: vec!["input_ids".into(), "attention_mask".into()],
        },
        scoring: Scoring::Softmax,
        logit_scale: 14.284_856,
        logit_bias: None,
        exported_with: BTreeMap::from([("clipqc".into(), env!("CARGO_PKG_VERSION").into())]),
        files,
    };
    std::fs::write(
        dir.join(MANIFEST_FILE),
        serde_json::to_string_pretty(&manifest)?,
    )?;
    Ok(())
}

/// Byte-level BPE with no merges: 256 byte tokens, then the start and end tokens.
fn byte_tokenizer() -> anyhow::Result<Tokenizer> {
    let mut vocab: Vocab = ByteLevel::alphabet()
        .into_iter()
        .map(|c| c.to_string())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c, i as u32))
        .collect();
    let n = vocab.len() as u32;
    vocab.insert(START.into(), n);
    vocab.insert(END.into(), n + 1);
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .build()
        .map_err(|e| anyhow::anyhow!("the fake tokenizer's BPE: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer.with_post_processor(Some(
        TemplateProcessing::builder()
            .try_single(format!("{START} $A {END}"))
            .map_err(|e| anyhow::anyhow!("the fake tokenizer's template: {e}"))?
            .special_tokens(vec![(START, n), (END, n + 1)])
            .build()
            .map_err(|e| anyhow::anyhow!("the fake tokenizer's template: {e}"))?,
    ));
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tch_backend::TchBackend;
    use crate::model::{Artifact, Backend, DeviceSpec, ImageBatch, PromptTokenizer};

    #[test]
    fn the_artifact_loads_tokenizes_and_embeds_like_an_exported_one() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 7).unwrap();
        let artifact = Artifact::open(dir.path()).expect("checksums and manifest check out");
        let tokenizer =
            PromptTokenizer::load(&artifact.path(TOKENIZER), &artifact.manifest.text).unwrap();
        let ids = tokenizer.encode("a dent, 表面").unwrap();
        assert_eq!(ids.len(), 2 + "a dent, 表面".len(), "one token per byte");
        let mut backend = TchBackend::load(&artifact, DeviceSpec::Cpu).unwrap();
        let grey = vec![0.1f32; 3 * 224 * 224];
        let mut other = grey.clone();
        other[0] = 5.0;
        let mut batch = ImageBatch::new(224);
        batch.push(&grey);
        batch.push(&other);
        batch.push(&grey);
        let e = backend.embed_images(&batch).unwrap();
        assert_eq!((e.n, e.row(0).len()), (3, EMBEDDING_DIM));
        assert_eq!(e.row(0), e.row(2), "the same frame, the same embedding");
        assert_ne!(e.row(0), e.row(1), "a pixel changed, the embedding too");
        let encoded: Vec<Vec<i64>> = ["a dent", "a scratch", "a dent"]
            .iter()
            .map(|p| tokenizer.encode(p).unwrap())
            .collect();
        let texts = tokenizer.batch(&encoded);
        let t = backend.embed_texts(&texts).unwrap();
        assert_eq!(t.row(0), t.row(2));
        assert_ne!(t.row(0), t.row(1));
    }

    #[test]
    fn the_same_seed_writes_the_same_model() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        write(a.path(), 3).unwrap();
        write(b.path(), 3).unwrap();
        let hash = |d: &Path| Artifact::open(d).unwrap().model_hash();
        assert_eq!(hash(a.path()), hash(b.path()));
    }
}
