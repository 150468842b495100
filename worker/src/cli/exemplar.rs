//! `clipqc exemplar add | list | remove`: the few-shot bank on the cluster's exemplar topic.
//!
//! `add` embeds images locally with the profile's own preprocessing (whole frame and, for a
//! tiled profile, every window) and the served model, and publishes them; every worker
//! following the topic picks them up without a restart. An image's id is a hash of its
//! bytes, so adding it again replaces rather than duplicates. `remove` publishes tombstones
//! (the topic is compacted). Each command errors, naming the input, when it cannot do all it
//! was asked: an unknown profile or class, an unreadable image, an id not in the bank.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use serde_json::json;

use crate::config::Settings;
use crate::exemplars::{follow, id_of};
use crate::model::DeviceSpec;
use crate::preprocess::Preprocessor;
use crate::proto::v1::Exemplar;

#[derive(Debug, clap::Args)]
pub struct ExemplarArgs {
    #[command(subcommand)]
    pub command: ExemplarCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum ExemplarCommand {
    /// Embed images as exemplars of a profile's class and publish them to the bank.
    Add(AddArgs),
    /// The bank as it is on the topic now (one row, or JSON object, per exemplar).
    List(ListArgs),
    /// Remove exemplars by id (`profile/id` or the id alone).
    Remove(RemoveArgs),
}

#[derive(Debug, clap::Args)]
pub struct AddArgs {
    #[arg(long)]
    pub profile: String,
    /// The class the images show (one of the profile's, nominal ones included).
    #[arg(long)]
    pub class: String,
    #[command(flatten)]
    pub config: super::ConfigArgs,
    /// Exported model directory (overrides model.dir): the one the workers serve.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Who adds them (default: $USER).
    #[arg(long)]
    pub by: Option<String>,
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[arg(long)]
    pub profile: Option<String>,
    #[command(flatten)]
    pub config: super::ConfigArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct RemoveArgs {
    #[command(flatten)]
    pub config: super::ConfigArgs,
    #[arg(required = true)]
    pub ids: Vec<String>,
}

pub fn run(args: ExemplarArgs) -> anyhow::Result<bool> {
    match args.command {
        ExemplarCommand::Add(a) => add(a),
        ExemplarCommand::List(a) => list(a),
        ExemplarCommand::Remove(a) => remove(a),
    }
}

fn brokers(settings: &Settings) -> anyhow::Result<String> {
    settings.kafka.brokers.clone().context(
        "kafka.brokers is not set: the exemplar bank lives on the cluster's \
         kafka.exemplar_topic (an embedded broker is private to one process)",
    )
}

/// Exemplars published at once by `add`.
const IN_FLIGHT: usize = 64;

/// How long reading the topic to its end may take.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

fn add(args: AddArgs) -> anyhow::Result<bool> {
    let (settings, artifact) = super::settings_and_artifact(&args.config, args.model.clone())?;
    let brokers = brokers(&settings)?;
    let profiles = settings.profiles();
    let profile = profiles
        .get(&args.profile)
        .with_context(|| format!("--profile {:?}: no such profile", args.profile))?;
    if !profile.classes.iter().any(|c| c.name == args.class) {
        let names: Vec<&str> = profile.classes.iter().map(|c| c.name.as_str()).collect();
        anyhow::bail!(
            "--class {:?}: profile {:?} has the classes {names:?}",
            args.class,
            args.profile
        );
    }
    let pre = Preprocessor::for_profile(&artifact.manifest.image, &settings.preprocess, profile)
        .map_err(|e| anyhow::anyhow!("profile {:?}: {e}", args.profile))?;
    let (owner, model) = super::spawn_model(&settings, &artifact, args.device)?;
    let by = args
        .by
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_default();
    let producer = follow::producer(&settings.kafka, &brokers)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let bar = indicatif::ProgressBar::new(args.images.len() as u64);
    if args.images.len() < 10 {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut failed = 0;
    // Published IN_FLIGHT at a time and awaited together: one acknowledgement at a time
    // made 500 exemplars take minutes on a broker that syncs each write.
    let mut pending: Vec<(String, Exemplar)> = Vec::new();
    let topic = settings.kafka.exemplar_topic.clone();
    let flush = |pending: &mut Vec<(String, Exemplar)>| -> anyhow::Result<()> {
        let keys: Vec<String> = pending
            .iter()
            .map(|(_, x)| format!("{}/{}", x.profile, x.id))
            .collect();
        runtime.block_on(futures_util::future::try_join_all(
            pending
                .iter()
                .zip(&keys)
                .map(|((_, x), key)| follow::send(&producer, &topic, key, Some(x))),
        ))?;
        for ((name, x), key) in pending.drain(..).zip(&keys) {
            bar.suspend(|| println!("added {key} ({}) from {name}", x.class));
        }
        Ok(())
    };
    for path in &args.images {
        let name = path.display().to_string();
        let made = (|| -> anyhow::Result<Exemplar> {
            let bytes = std::fs::read(path).with_context(|| format!("{name}: cannot read"))?;
            let views = pre.views(&name, &bytes, None)?;
            let rows = model.embed_all_blocking(pre.size(), &views.tensors, 16)?;
            let dim = artifact.manifest.embedding_dim;
            Ok(Exemplar {
                id: id_of(&bytes),
                profile: args.profile.clone(),
                class: args.class.clone(),
                embedding: rows[0].clone(),
                window_embeddings: rows[1..].concat(),
                window_scales: pre.window_scales(&views.windows),
                dim: dim as u32,
                model_hash: artifact.model_hash(),
                source: name.clone(),
                added_by: by.clone(),
                added_at: Some(crate::verdict::timestamp(SystemTime::now())),
            })
        })();
        match made {
            Ok(x) => pending.push((name, x)),
            Err(e) => {
                failed += 1;
                bar.suspend(|| eprintln!("error: {e:#}"));
            }
        }
        if pending.len() >= IN_FLIGHT {
            flush(&mut pending)?;
        }
        bar.inc(1);
    }
    flush(&mut pending)?;
    bar.finish_and_clear();
    drop(model);
    owner.join();
    Ok(failed == 0)
}

/// The bank on the topic now: the last record of each key, tombstones dropping it.
fn current(settings: &Settings, brokers: &str) -> anyhow::Result<BTreeMap<String, Exemplar>> {
    let mut bank = BTreeMap::new();
    let found = follow::read_to_end(&settings.kafka, brokers, READ_TIMEOUT, |key, x| {
        match x {
            Some(x) => bank.insert(key.to_string(), x),
            None => bank.remove(key),
        };
    })?;
    if found.is_none() {
        tracing::warn!(
            topic = settings.kafka.exemplar_topic,
            "the exemplar topic does not exist yet: the bank is empty"
        );
    }
    Ok(bank)
}

fn list(args: ListArgs) -> anyhow::Result<bool> {
    let settings = Settings::load(args.config.config.as_deref())?;
    let bank = current(&settings, &brokers(&settings)?)?;
    for (key, x) in bank
        .iter()
        .filter(|(_, x)| args.profile.as_ref().is_none_or(|p| *p == x.profile))
    {
        let windows = x.window_embeddings.len() / (x.dim.max(1) as usize);
        let at = x
            .added_at
            .as_ref()
            .map(|t| humantime::format_rfc3339_seconds(crate::verdict::system_time(t)).to_string())
            .unwrap_or_default();
        if args.json {
            let row = json!({"key": key, "id": x.id, "profile": x.profile, "class": x.class,
                "windows": windows, "dim": x.dim, "model_hash": x.model_hash,
                "source": x.source, "added_by": x.added_by, "added_at": at});
            println!("{row}");
        } else {
            println!(
                "{key}\t{}\t{windows} windows\tmodel {}\t{}\t{}\t{at}",
                x.class, x.model_hash, x.source, x.added_by
            );
        }
    }
    Ok(true)
}

fn remove(args: RemoveArgs) -> anyhow::Result<bool> {
    let settings = Settings::load(args.config.config.as_deref())?;
    let brokers = brokers(&settings)?;
    let bank = current(&settings, &brokers)?;
    let producer = follow::producer(&settings.kafka, &brokers)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut missing = 0;
    for id in &args.ids {
        let keys: Vec<&String> = bank
            .iter()
            .filter(|(k, x)| *k == id || x.id == *id)
            .map(|(k, _)| k)
            .collect();
        if keys.is_empty() {
            missing += 1;
            eprintln!("error: exemplar {id:?} is not in the bank");
        }
        for key in keys {
            runtime.block_on(follow::send(
                &producer,
                &settings.kafka.exemplar_topic,
                key,
                None,
            ))?;
            println!("removed {key}");
        }
    }
    Ok(missing == 0)
}
