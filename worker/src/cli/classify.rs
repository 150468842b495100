//! `clipqc classify`: score image files against a profile, offline.
//!
//! The engineer's tool for tuning prompts and thresholds on a folder of sample parts. It goes
//! on past an image that fails (the error is its row) and exits non-zero at the end if any
//! failed, so scripts notice.

use std::io::Write;
use std::path::PathBuf;

use serde_json::json;

use crate::config::DEFAULT_PROFILE;
use crate::model::{DeviceSpec, ImageBatch, PromptTokenizer};
use crate::preprocess::Preprocessor;
use crate::score::{self, Decision, Scorer};

/// Images per forward pass.
const BATCH: usize = 16;

#[derive(Debug, clap::Args)]
pub struct ClassifyArgs {
    /// Exported model directory (overrides model.dir from the config).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Profile (defect taxonomy) to score against.
    #[arg(long, default_value = DEFAULT_PROFILE)]
    pub profile: String,
    #[command(flatten)]
    pub config: super::ConfigArgs,
    /// auto, cpu, cuda or cuda:N (overrides model.device).
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

/// Returns whether every image was classified.
pub fn run(args: ClassifyArgs) -> anyhow::Result<bool> {
    let (settings, artifact) = super::settings_and_artifact(&args.config, args.model.clone())?;
    let tokenizer = PromptTokenizer::load(
        &artifact.path(crate::model::artifact::TOKENIZER),
        &artifact.manifest.text,
    )?;
    let profiles = settings.profiles();
    let profile = profiles
        .get(&args.profile)
        .ok_or_else(|| score::ScoreError::UnknownProfile(args.profile.clone()))?;
    // Catch over-long prompts before spending time on the model.
    score::tokenize_profile(&args.profile, profile, &tokenizer)?;

    let (owner, model) = super::spawn_model(&settings, &artifact, args.device)?;
    let scorer = Scorer::build(
        &args.profile,
        profile,
        &artifact.manifest,
        &tokenizer,
        |b| model.embed_texts_blocking(b),
    )?;
    let pre = Preprocessor::new(
        &artifact.manifest.image,
        settings.preprocess.limits,
        profile.clahe.clone(),
    )
    .with_view(profile.view)
    .with_jpeg_dct_headroom(settings.preprocess.jpeg_dct_headroom);

    let mut out = std::io::stdout().lock();
    let mut failures = 0usize;
    for chunk in args.images.chunks(BATCH) {
        let mut batch = ImageBatch::new(pre.size());
        let mut rows: Vec<(String, Result<usize, String>)> = Vec::with_capacity(chunk.len());
        for path in chunk {
            let name = path.display().to_string();
            let pixels = std::fs::read(path)
                .map_err(|e| format!("{name}: cannot read: {e}"))
                .and_then(|bytes| pre.run(&name, &bytes, None).map_err(|e| e.to_string()));
            match pixels {
                Ok(p) => {
                    batch.push(&p);
                    rows.push((name, Ok(batch.n - 1)));
                }
                Err(e) => rows.push((name, Err(e))),
            }
        }
        let embeddings = if batch.n > 0 {
            Some(model.embed_images_blocking(batch)?)
        } else {
            None
        };
        for (name, row) in rows {
            match row {
                Ok(i) => {
                    let emb = embeddings
                        .as_ref()
                        .expect("a batch with rows was embedded. This is a bug.");
                    print_decision(
                        &mut out,
                        args.json,
                        &name,
                        &scorer,
                        &scorer.decide(emb.row(i)),
                    )?;
                }
                Err(e) => {
                    failures += 1;
                    print_error(&mut out, args.json, &name, &e)?;
                }
            }
        }
    }
    drop(model);
    owner.join();
    if failures > 0 {
        tracing::error!(
            failures,
            total = args.images.len(),
            "some images could not be classified"
        );
    }
    Ok(failures == 0)
}

fn print_decision(
    out: &mut impl Write,
    as_json: bool,
    image: &str,
    scorer: &Scorer,
    d: &Decision,
) -> std::io::Result<()> {
    let names: Vec<&str> = scorer.class_names().collect();
    if as_json {
        let scores: serde_json::Map<String, serde_json::Value> = names
            .iter()
            .zip(&d.probabilities)
            .map(|(n, p)| (n.to_string(), json!(p)))
            .collect();
        let row = json!({
            "image": image,
            "outcome": d.outcome.as_str(),
            "top_class": names[d.class],
            "probability": d.probability,
            "anomaly_score": d.anomaly_score,
            "scores": scores,
        });
        writeln!(out, "{row}")
    } else {
        let all: Vec<String> = names
            .iter()
            .zip(&d.probabilities)
            .map(|(n, p)| format!("{n}={p:.4}"))
            .collect();
        writeln!(
            out,
            "{image}\t{}\t{}\t{:.4}\t{}",
            d.outcome.as_str(),
            names[d.class],
            d.probability,
            all.join(" ")
        )
    }
}

fn print_error(
    out: &mut impl Write,
    as_json: bool,
    image: &str,
    error: &str,
) -> std::io::Result<()> {
    if as_json {
        writeln!(out, "{}", json!({"image": image, "error": error}))
    } else {
        writeln!(out, "{image}\tERROR\t{error}")
    }
}
