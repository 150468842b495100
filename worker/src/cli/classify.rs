//! `clipqc classify`: score image files against a profile, offline.
//!
//! The engineer's tool for tuning prompts and thresholds on a folder of sample parts. It goes
//! on past an image that fails (the error is its row) and exits non-zero at the end if any
//! failed, so scripts notice.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::config::{Settings, DEFAULT_PROFILE};
use crate::exemplars::ProfileBank;
use crate::model::{Artifact, DeviceSpec, ModelHandle, ModelOwner, PromptTokenizer};
use crate::preprocess::{PreprocessError, Preprocessor, Views};
use crate::score::{self, Decision, ProfileConfig, Scorer};

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
    /// regions' boxes; for a segmenting profile, each mask's outline (cyan).
    #[arg(long, value_name = "DIR")]
    pub overlay: Option<PathBuf>,
    /// Millimetres per pixel of these images, for mask areas in mm² (`area_mm2`) and the
    /// profile's `min_area_mm2`. (A profile with `segment = true` outlines DEFECT and REVIEW
    /// images with the SAM artifact of model.sam_dir: `masks` in --json, outlines in
    /// --overlay.)
    #[arg(long, value_name = "MM")]
    pub mm_per_pixel: Option<f64>,
    /// Score without the profile's few-shot exemplars (by default they are read from
    /// `kafka.exemplar_topic` when `kafka.brokers` is set, as `clipqc run` scores).
    #[arg(long)]
    pub zero_shot: bool,
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

/// Returns whether every image was classified.
pub fn run(args: ClassifyArgs) -> anyhow::Result<bool> {
    let (settings, artifact) = super::settings_and_artifact(&args.config, args.model.clone())?;
    let profiles = settings.profiles();
    let profile = profiles
        .get(&args.profile)
        .ok_or_else(|| score::ScoreError::UnknownProfile(args.profile.clone()))?;
    let (owner, model, scorer, pre) =
        load_scorer(&settings, &artifact, &args.profile, profile, args.device)?;

    if let Some(dir) = &args.overlay {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("--overlay {}: cannot create: {e}", dir.display()))?;
    }
    if let Some(mm) = args.mm_per_pixel.filter(|m| !(m.is_finite() && *m > 0.0)) {
        anyhow::bail!("--mm-per-pixel {mm}: not a positive number");
    }
    let segmenter = super::segment::OfflineSegmenter::start(
        &settings,
        profile,
        args.device,
        args.mm_per_pixel,
    )?;
    let bank = offline_bank(&settings, &artifact, &args.profile, args.zero_shot)?;
    let mut out = std::io::stdout().lock();
    let mut failures = 0usize;
    classify_files(
        &model,
        &pre,
        &scorer,
        bank.as_ref(),
        &args.images,
        |path, result| {
            let name = path.display().to_string();
            match result {
                Ok(decision) => {
                    let decision = match &segmenter {
                        Some(s) => s.outline(profile, &pre, &name, decision),
                        None => decision,
                    };
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
                    print_error(&mut out, args.json, &name, &e.to_string())?;
                }
            }
            Ok(())
        },
    )?;
    drop(model);
    owner.join();
    if let Some(s) = segmenter {
        s.join();
    }
    if failures > 0 {
        tracing::error!(
            failures,
            total = args.images.len(),
            "some images could not be classified"
        );
    }
    Ok(failures == 0)
}

/// The model thread, the profile's scorer (its class embeddings computed) and its
/// preprocessor. Over-long prompts are refused before the model is loaded.
pub(crate) fn load_scorer(
    settings: &Settings,
    artifact: &Artifact,
    name: &str,
    profile: &ProfileConfig,
    device: Option<DeviceSpec>,
) -> anyhow::Result<(ModelOwner, ModelHandle, Scorer, Preprocessor)> {
    let tokenizer = PromptTokenizer::load(
        &artifact.path(crate::model::artifact::TOKENIZER),
        &artifact.manifest.text,
    )?;
    score::tokenize_profile(name, profile, &tokenizer)?;
    let (owner, model) = super::spawn_model(settings, artifact, device)?;
    let scorer = Scorer::build(name, profile, &artifact.manifest, &tokenizer, |b| {
        model.embed_texts_blocking(b)
    })?;
    let pre = Preprocessor::for_profile(&artifact.manifest.image, &settings.preprocess, profile)
        .map_err(|e| anyhow::anyhow!("profile {name:?}: {e}"))?;
    Ok((owner, model, scorer, pre))
}

/// The profile's exemplar bank as the workers have it: read from `kafka.exemplar_topic` (and
/// its adapter from `kafka.adapter_topic`) to their end when `kafka.brokers` is set (and
/// `zero_shot` is not), else none.
pub(crate) fn offline_bank(
    settings: &Settings,
    artifact: &Artifact,
    profile: &str,
    zero_shot: bool,
) -> anyhow::Result<Option<ProfileBank>> {
    let Some(brokers) = settings.kafka.brokers.as_deref().filter(|_| !zero_shot) else {
        return Ok(None);
    };
    let profiles = settings.profiles().into_iter().collect();
    let mut bank = crate::exemplars::Bank::default();
    let ctx = crate::exemplars::follow::BankContext {
        profiles,
        model_hash: artifact.model_hash(),
        dim: artifact.manifest.embedding_dim,
        settings: settings.exemplars,
    };
    crate::exemplars::follow::read_bank_to_end(
        &settings.kafka,
        brokers,
        std::time::Duration::from_secs(120),
        |key, record| crate::exemplars::follow::apply(&mut bank, &ctx, key, record),
    )?;
    let found = bank.profile(profile).cloned();
    tracing::info!(
        profile,
        exemplars = found.as_ref().map_or(0, ProfileBank::len),
        adapter = found
            .as_ref()
            .and_then(|b| b.adapter())
            .map(|a| a.version.clone()),
        "scoring with the profile's exemplar bank"
    );
    Ok(found)
}

/// Why an image file has no decision: its row says so, and the other images go on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ImageError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not an image this worker decodes, too large, or a region or frame it refuses (the
    /// error names the file).
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
}

/// The views of the image file at `path`, as `pre` makes them.
fn views_of(pre: &Preprocessor, path: &Path) -> Result<Views, ImageError> {
    let bytes = std::fs::read(path).map_err(|source| ImageError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(pre.views(&path.display().to_string(), &bytes, None)?)
}

/// Score image files as `clipqc run` scores requests (the profile's preprocessing, views and
/// outcome rules): every view of a chunk of BATCH images is embedded in batches of BATCH
/// views. `each` gets every path, in order, with its decision or, for an image that could not
/// be read or decoded, the error naming it; an error from `each` or from the model stops
/// the loop. `clipqc classify` and `clipqc eval` share this, so they cannot drift apart.
pub(crate) fn classify_files(
    model: &ModelHandle,
    pre: &Preprocessor,
    scorer: &Scorer,
    bank: Option<&ProfileBank>,
    paths: &[PathBuf],
    mut each: impl FnMut(&Path, Result<Decision, ImageError>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    classify_files_with_views(model, pre, scorer, bank, paths, |path, result| {
        each(path, result.map(|(decision, _)| decision))
    })
}

/// An image's views as the model saw them: their embeddings (the whole frame first, then the
/// windows) and the windows' geometry.
pub(crate) struct Viewed {
    pub embeddings: Vec<Vec<f32>>,
    pub windows: Vec<crate::preprocess::Window>,
    pub origin: (u32, u32),
}

/// [`classify_files`], each decision with its views: what `clipqc eval --line-memory` scores
/// the images against each other with, and `--search` scores again for each setting.
pub(crate) fn classify_files_with_views(
    model: &ModelHandle,
    pre: &Preprocessor,
    scorer: &Scorer,
    bank: Option<&ProfileBank>,
    paths: &[PathBuf],
    mut each: impl FnMut(&Path, Result<(Decision, Viewed), ImageError>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    for chunk in paths.chunks(BATCH) {
        let mut rows: Vec<Result<Views, ImageError>> = Vec::with_capacity(chunk.len());
        let mut tensors = Vec::new();
        for path in chunk {
            rows.push(views_of(pre, path).map(|mut v| {
                tensors.append(&mut v.tensors);
                v
            }));
        }
        let embeddings = model.embed_all_blocking(pre.size(), &tensors, BATCH)?;
        let mut next = embeddings.into_iter();
        for (path, row) in chunk.iter().zip(rows) {
            let decision = row.map(|views| {
                let own: Vec<Vec<f32>> = next.by_ref().take(1 + views.windows.len()).collect();
                let d = scorer.decide_views_with(&own, &views.windows, views.origin, bank);
                let viewed = Viewed {
                    embeddings: own,
                    windows: views.windows,
                    origin: views.origin,
                };
                (d, viewed)
            });
            each(path, decision)?;
        }
    }
    Ok(())
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
        if let Some(n) = &d.nearest {
            row["nearest_exemplar"] =
                json!({"id": n.id, "class": classes[n.class].name, "similarity": n.similarity});
        }
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
            if let Some(m) = &l.anomaly_map {
                row["anomaly_map"] = json!(m);
            }
        }
        if let Some(o) = &d.outline {
            row["segmentation"] = json!(o.status);
            row["masks"] = o
                .masks
                .iter()
                .map(|m| {
                    json!({"rle": m.mask.rle, "area": m.mask.area, "area_mm2": m.area_mm2,
                           "box": m.mask.bbox, "iou": m.mask.iou, "region": m.region})
                })
                .collect();
            if let Some(before) = o.outcome_before_rules {
                row["outcome_before_mask_rules"] = json!(before.as_str());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::artifact::ImageSettings;
    use crate::preprocess::DecodeLimits;

    #[test]
    fn an_image_that_cannot_be_read_or_decoded_is_an_error_naming_it() {
        let pre = Preprocessor::new(&ImageSettings::clip(), DecodeLimits::default(), None);
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.png");
        let err = views_of(&pre, &missing).unwrap_err();
        assert!(
            matches!(&err, ImageError::Read { path, .. } if *path == missing),
            "{err}"
        );
        assert!(
            err.to_string()
                .starts_with(&format!("{}: cannot read: ", missing.display())),
            "{err}"
        );
        let garbage = dir.path().join("garbage.png");
        std::fs::write(&garbage, [0x12; 64]).unwrap();
        let err = views_of(&pre, &garbage).unwrap_err();
        assert!(matches!(err, ImageError::Preprocess(_)), "{err}");
        assert!(
            err.to_string().starts_with(&garbage.display().to_string()),
            "{err}"
        );
    }
}
