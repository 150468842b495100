//! Command-line entry points. `main.rs` only parses and dispatches to these.

pub mod classify;
pub mod run;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "clipqc",
    version,
    about = "Zero-shot visual quality inspection with CLIP"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Classify image files offline: one row (or JSON object) per image. For tuning prompts.
    Classify(classify::ClassifyArgs),
    /// The streaming worker: requests from Kafka, verdicts to Kafka.
    Run(run::RunArgs),
}

/// Options shared by the commands that load a config file.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// Config file (TOML, YAML or JSON); `CLIPQC__…` environment variables override it.
    #[arg(long, env = "CLIPQC_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Logs go to stderr, so stdout stays the command's output.
pub fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
