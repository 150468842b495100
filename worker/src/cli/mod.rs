//! Command-line entry points. `main.rs` only parses and dispatches to these.

pub mod adapt;
pub mod bench;
pub mod classify;
pub mod eval;
pub mod exemplar;
mod overlay;
pub mod run;
mod segment;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::Settings;
use crate::model::tch_backend::TchBackend;
use crate::model::{Artifact, DeviceSpec, ModelHandle, ModelOwner};

#[derive(Debug, Parser)]
#[command(
    name = "clipqc",
    version,
    about = "Zero-shot visual quality inspection with CLIP"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines as text or as JSON objects (for log collectors), on stderr.
    #[arg(long, global = true, env = "CLIPQC_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Classify image files offline: one row (or JSON object) per image. For tuning prompts.
    Classify(classify::ClassifyArgs),
    /// The streaming worker: requests from Kafka, verdicts to Kafka.
    Run(run::RunArgs),
    /// Requests through a broker into verdicts, measured against the model-only ceiling.
    Bench(bench::BenchArgs),
    /// The few-shot exemplar bank on the cluster: add images to a profile's class, list, remove.
    Exemplar(exemplar::ExemplarArgs),
    /// Measure a profile on labelled images (one sub-folder per label): AUROC, AP, F1-max,
    /// the operating point for a recall, thresholds to paste; plots and an HTML report.
    Eval(eval::EvalArgs),
    /// Periodic fine-tuning with a gate: train a Tip-Adapter-F adapter on a profile's
    /// exemplars, measure it against the current profile on held-out images, publish it
    /// only when it is not worse.
    Adapt(adapt::AdaptArgs),
}

/// Options shared by the commands that load a config file.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// Config file (TOML, YAML or JSON); `CLIPQC__…` environment variables override it.
    #[arg(long, env = "CLIPQC_CONFIG")]
    pub config: Option<PathBuf>,
}

/// The settings and the verified model directory (`--model` overrides `model.dir`).
pub fn settings_and_artifact(
    config: &ConfigArgs,
    model: Option<PathBuf>,
) -> anyhow::Result<(Settings, Artifact)> {
    let settings = Settings::load(config.config.as_deref())?;
    let dir = model
        .or(settings.model.dir.clone())
        .context("no model: pass --model DIR or set model.dir in the config")?;
    let artifact = Artifact::open(&dir)?;
    Ok((settings, artifact))
}

/// Start the model thread on the artifact's TorchScript encoders (`--device` overrides
/// `model.device`).
pub fn spawn_model(
    settings: &Settings,
    artifact: &Artifact,
    device: Option<DeviceSpec>,
) -> anyhow::Result<(ModelOwner, ModelHandle)> {
    let device = device.unwrap_or(settings.model.device);
    let for_thread = artifact.clone();
    let (owner, model) = ModelOwner::spawn(move || TchBackend::load(&for_thread, device), 2)?;
    tracing::info!(model = model.describe(), "model loaded");
    // The device preprocessing path follows the model's device (preprocess.device = auto),
    // before any profile is built.
    let on = crate::model::tch_backend::resolve_device(device)?;
    crate::preprocess::device::install(&settings.preprocess, on)?;
    Ok((owner, model))
}

/// Logs go to stderr, so stdout stays the command's output.
pub fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only for people: log files and collectors get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
