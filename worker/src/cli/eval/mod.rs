//! `clipqc eval`: measure a profile on labelled images before it goes on the line.
//!
//! Guarantees:
//! - every image is scored by the code `clipqc classify` uses ([`super::classify::classify_files`]:
//!   the profile's preprocessing, windows, scoring and outcome rules, as `clipqc run`);
//! - an image that cannot be read or decoded is an `ERROR` row of `scores.csv`, counted under
//!   `errors` and left out of every metric; the other images are still measured;
//! - the exit code is 0 whenever the measurement ran, however poor the numbers (a
//!   measurement, not a test); non-zero only when it could not run (no dataset, no images, no
//!   image readable, unknown profile, bad model, unwritable `--out`), naming the input;
//! - `metrics.json` (and `--json`) carry `null` with a reason under `undefined` for a metric
//!   the data cannot give (one class only), never NaN.
//!
//! The metric definitions are in [`metrics`]; what goes into each file in [`report`].

pub(crate) mod dataset;
mod files;
mod html;
mod line_memory;
pub mod metrics;
pub mod pixels;
pub(crate) mod plot;
mod report;
mod search;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::classify::ImageError;
use crate::config::DEFAULT_PROFILE;
use crate::model::DeviceSpec;
use crate::score::{Decision, ScoreError};

pub use report::Metrics;

#[derive(Debug, clap::Args)]
#[command(after_long_help = report::DEFINITIONS_HELP)]
pub struct EvalArgs {
    /// Exported model directory (overrides model.dir from the config).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub config: super::ConfigArgs,
    /// Profile (defect taxonomy) to measure.
    #[arg(long, default_value = DEFAULT_PROFILE)]
    pub profile: String,
    /// auto, cpu, cuda or cuda:N (overrides model.device).
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// A sub-folder of good parts (repeatable). Folders named like an acceptable class of the
    /// profile are normal too; every other folder counts as defective.
    #[arg(long = "normal", value_name = "FOLDER")]
    pub normal: Vec<String>,
    /// The recall the line needs: the operating point is the highest anomaly-score
    /// threshold that flags at least this share of the defective images.
    #[arg(long, default_value_t = 0.99, value_parser = recall)]
    pub min_recall: f64,
    /// Write metrics.json, scores.csv, roc.png, pr.png and report.html into this folder.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Print metrics.json to stdout instead of the summary.
    #[arg(long)]
    pub json: bool,
    /// Measure without the profile's few-shot exemplars (by default they are read from
    /// `kafka.exemplar_topic` when `kafka.brokers` is set, as `clipqc run` scores).
    #[arg(long)]
    pub zero_shot: bool,
    /// Ground-truth masks in the MVTec AD layout, `DIR/<folder>/<stem>_mask.png` (any non-zero
    /// pixel is defect; normal folders need none): adds the pixel metrics (pixel AUROC, AUPRO,
    /// region hit rate and precision) of a tiled profile's fused anomaly map, and with `--out`
    /// the maps as 16-bit PNGs under maps/.
    #[arg(long, value_name = "DIR")]
    pub masks: Option<PathBuf>,
    /// Also score every image against the rest of the set, MuSc-style, with the profile's
    /// line_memory settings: line_memory_score in scores.csv, its AUROC and the AUROC of each
    /// line_memory.weight's blend in metrics.json.
    #[arg(long)]
    pub line_memory: bool,
    /// Grid-search the profile's exemplars.alpha and exemplars.beta on these images, as
    /// Tip-Adapter's search_hp does (needs exemplars in the bank): `search` in metrics.json,
    /// the best into `suggested`. In-sample: check it on other images.
    #[arg(long, conflicts_with = "zero_shot")]
    pub search: bool,
    /// One sub-folder per label (the image-folder layout).
    pub dataset: PathBuf,
}

fn recall(s: &str) -> Result<f64, RecallError> {
    let recall: f64 = s.parse().map_err(|source| RecallError::NotANumber {
        input: s.to_string(),
        source,
    })?;
    if recall > 0.0 && recall <= 1.0 {
        Ok(recall)
    } else {
        Err(RecallError::OutOfRange { recall })
    }
}

/// Why `--min-recall` is refused (clap prints it).
#[derive(Debug, PartialEq, thiserror::Error)]
enum RecallError {
    #[error("{input:?}: {source}")]
    NotANumber {
        input: String,
        source: std::num::ParseFloatError,
    },
    #[error("{recall} is not in (0, 1]")]
    OutOfRange { recall: f64 },
}

/// Why `clipqc eval` could not run (exit code 2). Failures of single images are not errors.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("dataset {0}: not a folder")]
    NotAFolder(PathBuf),
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("dataset {0}: no image files (.jpg .jpeg .png .bmp .tif .tiff) in its sub-folders; expected one sub-folder per label, e.g. good/ and scratch/")]
    NoImages(PathBuf),
    #[error("--normal {folder:?}: no such sub-folder in {dataset} (it has: {folders:?})")]
    NoSuchNormal {
        folder: String,
        dataset: PathBuf,
        folders: Vec<String>,
    },
    #[error("--normal {folder:?}: the folder is named like the defect class {class:?}")]
    NormalIsADefect { folder: String, class: String },
    #[error("dataset {dataset}: none of its {images} images could be read (first: {first})")]
    NothingScored {
        dataset: PathBuf,
        images: usize,
        first: String,
    },
    #[error("--out {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot draw the plot {0}")]
    Plot(String),
    #[error(transparent)]
    Profile(#[from] ScoreError),
    #[error(transparent)]
    Masks(#[from] pixels::MaskError),
}

/// One image of the dataset and what became of it.
pub(crate) struct Record {
    pub path: PathBuf,
    /// Index into the dataset's folders.
    pub folder: usize,
    pub result: Result<Decision, ImageError>,
    /// `--line-memory`: the image's score against the rest of the set.
    pub line_memory_score: Option<f32>,
}

/// Always `Ok(true)` when the measurement ran (see the module docs).
pub fn run(args: EvalArgs) -> anyhow::Result<bool> {
    let (settings, artifact) = super::settings_and_artifact(&args.config, args.model.clone())?;
    let profiles = settings.profiles();
    let profile = profiles
        .get(&args.profile)
        .ok_or_else(|| EvalError::Profile(ScoreError::UnknownProfile(args.profile.clone())))?;
    // Everything that can be refused is refused before the model is loaded.
    let data = dataset::Dataset::scan(&args.dataset, &args.normal, profile)?;
    let masks = match &args.masks {
        Some(_) if profile.tiles.is_none() => {
            return Err(EvalError::from(pixels::MaskError::NotTiled(args.profile.clone())).into())
        }
        Some(dir) => Some(pixels::Masks::scan(dir, &data).map_err(EvalError::from)?),
        None => None,
    };
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).map_err(|source| EvalError::Write {
            path: dir.clone(),
            source,
        })?;
    }
    if !data.skipped.is_empty() {
        tracing::warn!(
            files = data.skipped.len(),
            first = %data.skipped[0].display(),
            "skipped files that are not images in a label folder"
        );
    }
    if !data.folders.iter().any(|f| !f.defective) {
        tracing::warn!(
            "no folder of good parts: every image counts as defective (name them with --normal)"
        );
    }

    let (owner, model, scorer, pre) =
        super::classify::load_scorer(&settings, &artifact, &args.profile, profile, args.device)?;
    let started = Instant::now();
    let paths: Vec<PathBuf> = data.images.iter().map(|(p, _)| p.clone()).collect();
    let mut progress = Progress::new(paths.len(), "images");
    let mut records = Vec::with_capacity(paths.len());
    let mut folders = data.images.iter().map(|(_, f)| *f);
    let bank = super::classify::offline_bank(&settings, &artifact, &args.profile, args.zero_shot)?;
    if args.search && bank.as_ref().is_none_or(|b| b.is_empty()) {
        return Err(search::SearchError::NoExemplars(args.profile.clone()).into());
    }
    // --line-memory: every scored image's unit view embeddings, kept for the mutual scoring.
    let mut kept_views: Vec<Option<Vec<Vec<f32>>>> = Vec::new();
    // --search: every scored image's views, scored again for each setting.
    let mut samples: Vec<search::Sample> = Vec::new();
    super::classify::classify_files_with_views(
        &model,
        &pre,
        &scorer,
        bank.as_ref(),
        &paths,
        |path, result| {
            if let Err(e) = &result {
                tracing::debug!(image = %path.display(), error = %e, "cannot score");
            }
            let (result, views) = match result {
                Ok((d, views)) => (Ok(d), Some(views)),
                Err(e) => (Err(e), None),
            };
            if args.line_memory {
                kept_views.push(views.as_ref().map(|v| {
                    v.embeddings
                        .iter()
                        .map(|e| crate::score::normalized(e))
                        .collect()
                }));
            }
            let folder = folders.next().expect("one folder per image");
            if let (true, Some(views), Some(bank)) = (args.search, views, bank.as_ref()) {
                let defective = data.folders[folder].defective;
                samples.push(search::Sample::new(&scorer, bank, views, defective));
            }
            records.push(Record {
                path: path.to_path_buf(),
                folder,
                result,
                line_memory_score: None,
            });
            progress.tick();
            Ok(())
        },
    )?;
    progress.finish();
    if args.line_memory {
        let cfg = profile.line_memory.clone().unwrap_or_default();
        let scores = line_memory::scores(&kept_views, &cfg);
        for (r, s) in records.iter_mut().zip(scores) {
            r.line_memory_score = s;
        }
    }
    drop(model);
    owner.join();
    let seconds = started.elapsed().as_secs_f64();
    if records.iter().all(|r| r.result.is_err()) {
        let first = records[0]
            .result
            .as_ref()
            .err()
            .map(ToString::to_string)
            .unwrap_or_default();
        return Err(EvalError::NothingScored {
            dataset: args.dataset.clone(),
            images: records.len(),
            first,
        }
        .into());
    }

    let input = report::Input {
        args: &args,
        model: artifact.model_id(),
        scoring: artifact.manifest.scoring,
        scorer: &scorer,
        data: &data,
        records: &records,
        seconds,
        masks: masks.as_ref(),
    };
    let mut metrics = report::Metrics::compute(&input);
    if let (true, Some(bank)) = (args.search, bank.as_ref()) {
        let grid = search::betas().len() * search::alphas().len();
        let mut progress = Progress::new(grid, "settings");
        let found = search::search(&scorer, bank, &samples, || progress.tick())?;
        progress.finish();
        metrics.suggested.toml += &search::toml(&args.profile, &found);
        metrics.suggested.exemplars = Some(report::SuggestedExemplars {
            alpha: found.best.alpha,
            beta: found.best.beta,
        });
        metrics.search = Some(found);
    }
    if args.line_memory {
        let samples: Vec<(f32, f32, bool)> = records
            .iter()
            .filter_map(|r| {
                let d = r.result.as_ref().ok()?;
                Some((
                    d.anomaly_score,
                    r.line_memory_score?,
                    data.folders[r.folder].defective,
                ))
            })
            .collect();
        metrics.line_memory = Some(line_memory::measure(&samples));
    }
    if let Some(masks) = &masks {
        let maps = args.out.as_ref().map(|d| d.join("maps"));
        let pixel =
            pixels::measure(&data, &records, masks, maps.as_deref()).map_err(EvalError::from)?;
        metrics.set_pixel(pixel);
    }
    if let Some(dir) = &args.out {
        files::write_all(dir, &input, &metrics, &settings.preprocess.limits)?;
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &metrics)?;
        writeln!(out)?;
    } else {
        report::summary(&mut out, &metrics)?;
        if let Some(dir) = &args.out {
            writeln!(out, "report: {}", dir.join("report.html").display())?;
        }
    }
    Ok(true)
}

/// An indicatif bar on a terminal; elsewhere (CI logs, pipes) a plain line on stderr every
/// 10 s, because a redrawn bar in a log file is one line per redraw.
pub(crate) struct Progress {
    bar: Option<indicatif::ProgressBar>,
    /// The command the plain lines name (`eval`, `adapt`).
    command: &'static str,
    what: &'static str,
    total: usize,
    done: usize,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    const EVERY: Duration = Duration::from_secs(10);

    pub(crate) fn new(total: usize, what: &'static str) -> Self {
        Self::named("eval", total, what)
    }

    /// A bar counting `total` `what`s of `command`.
    pub(crate) fn named(command: &'static str, total: usize, what: &'static str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(&format!(
                    "{{bar:40}} {{pos}}/{{len}} {what}  {{per_sec}}  eta {{eta}}"
                ))
                .expect("a valid template"),
            );
            bar
        });
        let now = Instant::now();
        Self {
            bar,
            command,
            what,
            total,
            done: 0,
            started: now,
            last_line: now,
        }
    }

    pub(crate) fn tick(&mut self) {
        self.done += 1;
        match &self.bar {
            Some(bar) => bar.inc(1),
            None if self.last_line.elapsed() >= Self::EVERY => {
                self.last_line = Instant::now();
                self.line();
            }
            None => {}
        }
    }

    fn line(&self) {
        let rate = self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        eprintln!(
            "{}: {}/{} {} ({:.0} %), {rate:.1} {}/s",
            self.command,
            self.done,
            self.total,
            self.what,
            100.0 * self.done as f64 / self.total.max(1) as f64,
            self.what
        );
    }

    pub(crate) fn finish(&self) {
        match &self.bar {
            Some(bar) => bar.finish_and_clear(),
            None => self.line(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_recall_is_a_number_in_the_unit_interval() {
        assert_eq!(recall("0.95"), Ok(0.95));
        assert_eq!(recall("1"), Ok(1.0));
        assert_eq!(recall("0"), Err(RecallError::OutOfRange { recall: 0.0 }));
        assert_eq!(recall("0").unwrap_err().to_string(), "0 is not in (0, 1]");
        let err = recall("most").unwrap_err();
        assert!(
            matches!(&err, RecallError::NotANumber { input, .. } if input == "most"),
            "{err}"
        );
        assert_eq!(err.to_string(), "\"most\": invalid float literal");
    }
}
