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
use crate::preprocess::{Preprocessor, Views};
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
    /// Write each image into this folder as a PNG with its verdict drawn on it: a border in
    /// the outcome's colour and, for a tiled profile, the heatmap (translucent red) and the
    /// regions' boxes.
    #[arg(long, value_name = "DIR")]
    pub overlay: Option<PathBuf>,
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
    let pre = Preprocessor::for_profile(&artifact.manifest.image, &settings.preprocess, profile)
        .map_err(|e| anyhow::anyhow!("profile {:?}: {e}", args.profile))?;

    if let Some(dir) = &args.overlay {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("--overlay {}: cannot create: {e}", dir.display()))?;
    }
    let mut out = std::io::stdout().lock();
    let mut failures = 0usize;
    for chunk in args.images.chunks(BATCH) {
        // Every view of every image of the chunk, embedded in batches of BATCH views.
        let mut rows: Vec<(String, Result<Views, String>)> = Vec::with_capacity(chunk.len());
        let mut tensors = Vec::new();
        for path in chunk {
            let name = path.display().to_string();
            let views = std::fs::read(path)
                .map_err(|e| format!("{name}: cannot read: {e}"))
                .and_then(|bytes| pre.views(&name, &bytes, None).map_err(|e| e.to_string()));
            let views = views.map(|mut v| {
                tensors.append(&mut v.tensors);
                v
            });
            rows.push((name, views));
        }
        let mut embeddings: Vec<Vec<f32>> = Vec::with_capacity(tensors.len());
        for part in tensors.chunks(BATCH) {
            let mut batch = ImageBatch::new(pre.size());
            for t in part {
                batch.push(t);
            }
            embeddings.extend(
                model
                    .embed_images_blocking(batch)?
                    .rows()
                    .map(<[f32]>::to_vec),
            );
        }
        let mut next = embeddings.into_iter();
        for (name, row) in rows {
            match row {
                Ok(views) => {
                    let own: Vec<Vec<f32>> = next.by_ref().take(1 + views.windows.len()).collect();
                    let decision = scorer.decide_views(&own, &views.windows, views.origin);
                    print_decision(&mut out, args.json, &name, &scorer, &decision)?;
                    if let Some(dir) = &args.overlay {
                        if let Err(e) = super::overlay::write(
                            dir,
                            &name,
                            &settings.preprocess.limits,
                            &decision,
                        ) {
                            failures += 1;
                            tracing::error!(image = name, error = %e, "cannot write the overlay");
                        }
                    }
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
        let classes = &scorer.profile.classes;
        let mut row = json!({
            "image": image,
            "outcome": d.outcome.as_str(),
            "top_class": names[d.class],
            "top_label": classes[d.class].display(),
            "probability": d.probability,
            "anomaly_score": d.anomaly_score,
            "scores": scores,
            "views": d.localization.as_ref().map_or(1, |l| l.views),
        });
        if let Some(l) = &d.localization {
            row["regions"] = l
                .regions
                .iter()
                .map(|r| {
                    json!({"x": r.x, "y": r.y, "width": r.width, "height": r.height,
                       "class": classes[r.class].name, "label": classes[r.class].display(),
                       "score": r.score})
                })
                .collect();
            if let Some(h) = &l.heatmap {
                row["heatmap"] = json!(h);
            }
        }
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
