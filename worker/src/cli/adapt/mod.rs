//! `clipqc adapt`: periodic fine-tuning with a gate. Trains a Tip-Adapter-F adapter
//! ([`train`]) on a profile's exemplars in the bank, measures it against the profile as the
//! workers score it now on held-out labelled images, and publishes it only when it is not
//! worse.
//!
//! Guarantees:
//! - the held-out images are scored by the code `clipqc eval` and the workers run (the
//!   profile's preprocessing, windows, WinCLIP+ and Tip-Adapter scoring, outcome rules): each
//!   is embedded once, then decided twice, with the bank as it is (its current adapter
//!   included) and with the challenger;
//! - a challenger worse on the image AUROC **or** on F1-max is never published: the command
//!   prints both sets of figures, writes them, and exits 1; figures that cannot be computed
//!   (a held-out set without both normal and defective images) refuse the run (exit 2);
//! - for one seed (and device) the same adapter, bit for bit, and so the same
//!   `adapter_version` (a hash of its keys and settings);
//! - `--publish` writes the adapter to `kafka.adapter_topic` (key = the profile) and waits for
//!   the broker's acknowledgement; workers follow that topic with the exemplar bank.

mod train;

use std::io::Write;
use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use anyhow::Context;
use serde::Serialize;

use super::eval::{dataset::Dataset, metrics, Progress};
use crate::config::DEFAULT_PROFILE;
use crate::exemplars::ProfileBank;
use crate::model::DeviceSpec;
use crate::proto::v1::Adapter as AdapterRecord;
use crate::score::bank::Adapter;
use crate::score::ProfileConfig;

#[derive(Debug, clap::Args)]
pub struct AdaptArgs {
    #[command(flatten)]
    pub config: super::ConfigArgs,
    /// The profile whose exemplars train the adapter.
    #[arg(long, default_value = DEFAULT_PROFILE)]
    pub profile: String,
    /// Exported model directory (overrides model.dir from the config).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Held-out labelled images, one sub-folder per label (as for `clipqc eval`): the gate.
    #[arg(long, value_name = "DATASET")]
    pub holdout: PathBuf,
    /// A sub-folder of good parts (repeatable), as `clipqc eval --normal`.
    #[arg(long = "normal", value_name = "FOLDER")]
    pub normal: Vec<String>,
    /// Training epochs (Tip-Adapter-F's default).
    #[arg(long, default_value_t = 20)]
    pub epochs: usize,
    /// The seed of the training order: one seed, one adapter.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The cache's weight (default: the profile's exemplars.alpha).
    #[arg(long)]
    pub alpha: Option<f32>,
    /// The cache's sharpness (default: the profile's exemplars.beta).
    #[arg(long)]
    pub beta: Option<f32>,
    /// auto, cpu, cuda or cuda:N: the model's and the training's (overrides model.device).
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Write adapt.json and adapt.png (the training curve) into this folder.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Publish the adapter to kafka.adapter_topic when it is not worse.
    #[arg(long)]
    pub publish: bool,
}

/// AUROC and F1-max of one side of the gate.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Figures {
    pub auroc: f64,
    pub f1_max: f64,
}

/// `adapt.json`.
#[derive(Debug, Serialize)]
pub struct Report {
    pub profile: String,
    pub model: String,
    pub seed: u64,
    /// Exemplars the adapter was trained on (its keys).
    pub exemplars: usize,
    pub epochs: usize,
    /// The mean training loss of each epoch.
    pub loss: Vec<f32>,
    pub alpha: f32,
    pub beta: f32,
    pub holdout: String,
    pub holdout_images: usize,
    pub current: Figures,
    pub challenger: Figures,
    /// Whether the adapter was written to the adapter topic.
    pub published: bool,
    /// The published adapter's version; null when none was published.
    pub adapter_version: Option<String>,
    /// The challenger's version, published or not.
    pub challenger_version: String,
    /// The adapter the bank had (the current side), if any.
    pub current_adapter_version: Option<String>,
    pub train_seconds: f64,
    pub device: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AdaptError {
    #[error("no brokers: clipqc adapt reads the profile's exemplars from kafka.exemplar_topic (set kafka.brokers)")]
    NoBrokers,
    #[error("profile {0:?} has no exemplars in the bank: add some (clipqc exemplar add) before adapting")]
    NoExemplars(String),
    #[error("--holdout {dataset}: {metric} cannot be computed ({why}): it needs normal and defective images")]
    Undefined {
        dataset: PathBuf,
        metric: &'static str,
        why: String,
    },
    #[error("--epochs must be at least 1")]
    NoEpochs,
}

/// Whether the challenger may replace the current profile: not worse on either figure.
pub fn not_worse(current: &Figures, challenger: &Figures) -> bool {
    challenger.auroc >= current.auroc && challenger.f1_max >= current.f1_max
}

/// The adapter's version: the first 16 hex digits of the SHA-256 of what it scores with.
fn version(a: &Adapter, model_hash: &str) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(model_hash.as_bytes());
    for c in &a.classes {
        h.update(c.as_bytes());
        h.update([0]);
    }
    for (k, c) in a.keys.iter().zip(&a.key_classes) {
        h.update((*c as u32).to_le_bytes());
        k.iter().for_each(|v| h.update(v.to_le_bytes()));
    }
    h.update(a.alpha.to_le_bytes());
    h.update(a.beta.to_le_bytes());
    hex::encode(&h.finalize()[..8])
}

/// Exit `Ok(true)` when the challenger is not worse (published with `--publish`),
/// `Ok(false)` when it is (exit 1).
pub fn run(args: AdaptArgs) -> anyhow::Result<bool> {
    if args.epochs == 0 {
        return Err(AdaptError::NoEpochs.into());
    }
    let (settings, artifact) = super::settings_and_artifact(&args.config, args.model.clone())?;
    let profiles = settings.profiles();
    let profile: &ProfileConfig = profiles
        .get(&args.profile)
        .ok_or_else(|| crate::score::ScoreError::UnknownProfile(args.profile.clone()))?;
    let brokers = settings
        .kafka
        .brokers
        .clone()
        .ok_or(AdaptError::NoBrokers)?;
    let data = Dataset::scan(&args.holdout, &args.normal, profile)?;
    let bank = super::classify::offline_bank(&settings, &artifact, &args.profile, false)?
        .filter(|b| !b.entries().is_empty())
        .ok_or_else(|| AdaptError::NoExemplars(args.profile.clone()))?;
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("--out {}", dir.display()))?;
    }
    let (owner, model, scorer, pre) =
        super::classify::load_scorer(&settings, &artifact, &args.profile, profile, args.device)?;
    let device =
        crate::model::tch_backend::resolve_device(args.device.unwrap_or(settings.model.device))?;
    let (alpha, beta) = (
        args.alpha.unwrap_or(profile.exemplars.alpha),
        args.beta.unwrap_or(profile.exemplars.beta),
    );

    // Train on the exemplars' whole-frame views.
    let entries = bank.entries();
    let features: Vec<Vec<f32>> = entries.iter().map(|e| e.whole.clone()).collect();
    let labels: Vec<usize> = entries.iter().map(|e| e.class).collect();
    let text_logits: Vec<Vec<f32>> = features.iter().map(|f| scorer.text_logits(f)).collect();
    // One thread while training: libtorch's CPU kernels are deterministic at a fixed thread
    // count. The setting is the process's, so the held-out images get the threads back.
    let threads = tch::get_num_threads();
    tch::set_num_threads(1);
    let started = Instant::now();
    let mut bar = Progress::named("adapt", args.epochs, "epochs");
    let trained = train::train(
        &train::Training {
            features: &features,
            labels: &labels,
            text_logits: &text_logits,
            classes: profile.classes.len(),
            alpha,
            beta,
            epochs: args.epochs,
            seed: args.seed,
            device,
        },
        |_| bar.tick(),
    );
    bar.finish();
    tch::set_num_threads(threads);
    let train_seconds = started.elapsed().as_secs_f64();
    let mut adapter = Adapter {
        version: String::new(),
        classes: profile.classes.iter().map(|c| c.name.clone()).collect(),
        keys: trained.keys,
        key_classes: labels,
        alpha,
        beta,
    };
    adapter.version = version(&adapter, &artifact.model_hash());

    // The gate: every held-out image embedded once, decided with the bank as it is and with
    // the challenger.
    let mut challenger_bank: ProfileBank = bank.clone();
    challenger_bank.set_adapter(Some(std::sync::Arc::new(adapter.clone())));
    let paths: Vec<PathBuf> = data.images.iter().map(|(p, _)| p.clone()).collect();
    let mut folders = data.images.iter().map(|(_, f)| *f);
    let (mut current, mut challenger) = (Vec::new(), Vec::new());
    let mut progress = Progress::named("adapt", paths.len(), "held-out images");
    super::classify::classify_files_with_views(
        &model,
        &pre,
        &scorer,
        Some(&bank),
        &paths,
        |path, result| {
            let defective = data.folders[folders.next().expect("one folder per image")].defective;
            progress.tick();
            match result {
                Ok((d, v)) => {
                    let c = scorer.decide_views_with(
                        &v.embeddings,
                        &v.windows,
                        v.origin,
                        Some(&challenger_bank),
                    );
                    current.push((f64::from(d.anomaly_score), defective));
                    challenger.push((f64::from(c.anomaly_score), defective));
                }
                Err(e) => {
                    tracing::warn!(image = %path.display(), error = %e, "held-out image skipped")
                }
            }
            Ok(())
        },
    )?;
    progress.finish();
    drop(model);
    owner.join();
    let figures = |scores: &[(f64, bool)]| -> Result<Figures, AdaptError> {
        let curve = metrics::Curve::new(scores);
        let undefined = |metric, why: metrics::Undefined| AdaptError::Undefined {
            dataset: args.holdout.clone(),
            metric,
            why: why.0.to_string(),
        };
        Ok(Figures {
            auroc: metrics::auroc(&curve).map_err(|e| undefined("AUROC", e))?,
            f1_max: metrics::f1_max(&curve)
                .map_err(|e| undefined("F1-max", e))?
                .f1,
        })
    };
    let (current, challenger) = (figures(&current)?, figures(&challenger)?);
    let ok = not_worse(&current, &challenger);

    let mut published = false;
    if ok && args.publish {
        publish(
            &settings,
            &brokers,
            &args,
            &artifact,
            &adapter,
            &current,
            &challenger,
        )?;
        published = true;
    }
    let report = Report {
        profile: args.profile.clone(),
        model: artifact.model_id(),
        seed: args.seed,
        exemplars: features.len(),
        epochs: args.epochs,
        loss: trained.loss,
        alpha,
        beta,
        holdout: args.holdout.display().to_string(),
        holdout_images: data.images.len(),
        current,
        challenger,
        published,
        adapter_version: published.then(|| adapter.version.clone()),
        challenger_version: adapter.version.clone(),
        current_adapter_version: bank.adapter().map(|a| a.version.clone()),
        train_seconds,
        device: format!("{device:?}"),
    };
    if let Some(dir) = &args.out {
        let json = serde_json::to_vec_pretty(&report)?;
        std::fs::write(dir.join("adapt.json"), json)
            .with_context(|| format!("--out {}", dir.display()))?;
        std::fs::write(dir.join("adapt.png"), curve_png(&report.loss)?)
            .with_context(|| format!("--out {}", dir.display()))?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "adapter {} of profile {}: {} exemplars, {} epochs (seed {}), loss {:.4} -> {:.4} in {:.1} s",
        adapter.version,
        args.profile,
        report.exemplars,
        report.epochs,
        report.seed,
        report.loss.first().copied().unwrap_or(0.0),
        report.loss.last().copied().unwrap_or(0.0),
        train_seconds
    )?;
    writeln!(
        out,
        "held-out ({} images): current AUROC {:.4} F1-max {:.4}; challenger AUROC {:.4} F1-max {:.4}",
        data.images.len(),
        current.auroc,
        current.f1_max,
        challenger.auroc,
        challenger.f1_max
    )?;
    match (ok, published) {
        (false, _) => writeln!(
            out,
            "refused: the challenger is worse than the current profile"
        )?,
        (true, true) => writeln!(
            out,
            "published {} to {} (key {})",
            adapter.version, settings.kafka.adapter_topic, args.profile
        )?,
        (true, false) => writeln!(out, "not worse: --publish to put it on the line")?,
    }
    Ok(ok)
}

fn publish(
    settings: &crate::config::Settings,
    brokers: &str,
    args: &AdaptArgs,
    artifact: &crate::model::Artifact,
    adapter: &Adapter,
    current: &Figures,
    challenger: &Figures,
) -> anyhow::Result<()> {
    use prost::Message as _;
    let record = AdapterRecord {
        profile: args.profile.clone(),
        version: adapter.version.clone(),
        model_hash: artifact.model_hash(),
        classes: adapter.classes.clone(),
        dim: artifact.manifest.embedding_dim as u32,
        keys: adapter.keys.concat(),
        key_classes: adapter.key_classes.iter().map(|&c| c as u32).collect(),
        alpha: adapter.alpha,
        beta: adapter.beta,
        seed: args.seed,
        epochs: args.epochs as u32,
        current_auroc: current.auroc as f32,
        current_f1_max: current.f1_max as f32,
        challenger_auroc: challenger.auroc as f32,
        challenger_f1_max: challenger.f1_max as f32,
        trained_by: std::env::var("USER").unwrap_or_default(),
        trained_at: Some(crate::timestamps::timestamp(SystemTime::now())),
    };
    let producer = crate::exemplars::follow::producer(&settings.kafka, brokers)?;
    let topic = &settings.kafka.adapter_topic;
    let payload = record.encode_to_vec();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime
        .block_on(
            producer.send(
                rdkafka::producer::FutureRecord::to(topic)
                    .key(&args.profile)
                    .payload(&payload),
                std::time::Duration::from_secs(30),
            ),
        )
        .map_err(|(e, _)| anyhow::anyhow!("publishing the adapter to {topic:?}: {e}"))?;
    Ok(())
}

/// `adapt.png`: the mean training loss per epoch.
fn curve_png(loss: &[f32]) -> anyhow::Result<Vec<u8>> {
    use plotters::prelude::*;
    let (w, h) = (super::eval::plot::WIDTH, super::eval::plot::HEIGHT);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let family = super::eval::plot::family();
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| anyhow::anyhow!("adapt.png: {e}"))?;
        let top = loss.iter().copied().fold(0f32, f32::max).max(1e-6) * 1.05;
        let mut chart = ChartBuilder::on(&root)
            .caption("Tip-Adapter-F training", (family, 26))
            .margin(16)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(1f32..(loss.len().max(2) as f32), 0f32..top)
            .map_err(|e| anyhow::anyhow!("adapt.png: {e}"))?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc("mean cross-entropy")
            .axis_desc_style((family, 18))
            .label_style((family, 14))
            .draw()
            .map_err(|e| anyhow::anyhow!("adapt.png: {e}"))?;
        chart
            .draw_series(LineSeries::new(
                loss.iter().enumerate().map(|(i, l)| ((i + 1) as f32, *l)),
                RGBColor(31, 90, 180).stroke_width(3),
            ))
            .map_err(|e| anyhow::anyhow!("adapt.png: {e}"))?;
        root.present()
            .map_err(|e| anyhow::anyhow!("adapt.png: {e}"))?;
    }
    let img = image::RgbImage::from_raw(w, h, buf).expect("buffer of WIDTH × HEIGHT");
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_challenger_worse_on_either_figure_is_refused() {
        let f = |auroc, f1_max| Figures { auroc, f1_max };
        assert!(not_worse(&f(0.8, 0.7), &f(0.8, 0.7)));
        assert!(not_worse(&f(0.8, 0.7), &f(0.9, 0.75)));
        assert!(!not_worse(&f(0.8, 0.7), &f(0.79, 0.9)));
        assert!(!not_worse(&f(0.8, 0.7), &f(0.95, 0.69)));
    }
}
