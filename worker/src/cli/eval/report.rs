//! What `clipqc eval` measures: [`Metrics`] (`metrics.json`, `--json`) and the summary
//! printed without `--json`, computed once from the records; the files are written from
//! them by `files.rs`.

use std::collections::BTreeMap;
use std::io::Write;

use serde::Serialize;

use super::dataset::Dataset;
use super::metrics::{self, Confusion, Curve, Point};
use super::{EvalArgs, Record};
use crate::model::artifact::Scoring;
use crate::score::Scorer;

/// The definitions, as `clipqc eval --help` prints them and `metrics.json` carries them.
const DEFINITIONS: &[(&str, &str)] = &[
    ("positive", "an image of a defective folder; normal folders are the --normal ones and those named like an acceptable class"),
    ("score", "the image's anomaly_score (the defect probability the outcome rules decide on); flagged at threshold t when score >= t"),
    ("auroc", "area under the ROC curve, trapezoidal over the distinct scores (scikit-learn roc_auc_score)"),
    ("average_precision", "sum over the distinct scores, highest first, of (recall gained) x precision; not interpolated (scikit-learn average_precision_score)"),
    ("f1_max", "the largest 2PR/(P+R) over the distinct scores; f1_threshold is that score (the highest on a tie)"),
    ("operating_point.threshold", "the highest score threshold whose recall reaches min_recall"),
    ("operating_point.false_alarm_rate", "normal images scoring at or over the threshold, over normal images"),
    ("operating_point.review_threshold", "the profile review_threshold that makes the threshold the line's: the smallest multiple of 0.001 over 1 - threshold (0.5 when the threshold is over 0.5: defects win ties, so the rules stop every part at or over 0.5); softmax models only, where the acceptable mass is 1 - anomaly_score"),
    ("operating_point.review_rate", "scored images whose anomaly_score lies strictly between 1 - review_threshold and review_threshold (the outcome rules' REVIEW band with the suggested review_threshold; the profile's class thresholds can move some of them to DEFECT and are not counted)"),
    ("operating_point.normal_review_rate", "the same band over the normal images only: good parts a person has to look at"),
    ("operating_point.line_recall", "defective images the rules stop (not PASS) with the suggested review_threshold: over 1 - review_threshold, or at or over 0.5 when it is 0.5"),
    ("operating_point.line_false_alarm_rate", "normal images the rules stop with the suggested review_threshold (the threshold's false_alarm_rate, plus what rounding to 0.001 adds)"),
    ("as_configured", "the profile's own outcomes: recall = defective images not PASS, false_alarm_rate = normal images not PASS, review_rate = REVIEW over scored images"),
    ("confusion", "rows: the class a folder is named like; columns: the decision's class (the winning side's most probable class); only images of such folders"),
    ("aggregates", "tiled profiles: auroc and average_precision of the image anomaly score under each tiles.aggregate rule (max, mean_max, winclip), from the same views; best_aggregate has the highest auroc (then average_precision)"),
    ("line_memory_auroc", "--line-memory: image AUROC of line_memory_score, each image scored against every other image of the set with the profile's line_memory settings (MuSc-style); line_memory_weights: the AUROC of (1 - w) x anomaly_score + w x line_memory_score per weight w"),
    ("pixel_auroc", "--masks: area under the ROC of every pixel of the measured images (good images all-normal), scored by the fused anomaly map bilinearly upsampled and quantised to 16 bits (the maps/ PNGs); ties count half"),
    ("aupro", "--masks: MVTec AD's per-region overlap (regions: 8-connected mask components; PRO: their mean share of pixels at or over a threshold) integrated over the normal pixels' false-positive rate up to 0.3, divided by 0.3"),
    ("region_hit_rate", "--masks: defective images with a mask where some reported region box holds a mask pixel, over those images"),
    ("region_precision", "--masks: reported region boxes (all measured images) holding a mask pixel, over all reported boxes"),
    ("pixel_images", "--masks: images the pixel metrics used: scored normal images, and defective ones with a mask (masks_missing counts those without)"),
    ("suggested.exemplars", "--search: the exemplars.alpha and exemplars.beta of the best setting in search.grid (highest AUROC, then F1-max, then the smaller alpha), in-sample"),
    ("search", "--search: Tip-Adapter's search_hp on these images: each (alpha, beta) of the grid (beta 0.5 x 1.55^k, alpha 0.25 x 2^k) with the image AUROC and F1-max of its anomaly scores; current: the profile's own setting; exemplars: the bank's size"),
    ("suggested.class_thresholds", "per defect class with a folder: the F1-max threshold of that class's probability, its folder's images against the normal images, rounded down to 0.001"),
];

pub const DEFINITIONS_HELP: &str = "Definitions (also under \"definitions\" in metrics.json):
  positive: a defective image; score: its anomaly_score; flagged when score >= threshold.
  auroc, average_precision: as scikit-learn's roc_auc_score and average_precision_score.
  f1_max / f1_threshold: the best F1 over the distinct scores, and that score.
  operating_point: the highest threshold with recall >= --min-recall; false_alarm_rate:
    normal images at or over it; review_threshold: the profile value that makes it the
    line's (smallest 0.001 step over 1 - threshold, at least 0.5); review_rate: scored
    images strictly between 1 - review_threshold and review_threshold (the REVIEW band).
  aggregates: each tiles.aggregate rule's auroc and AP (tiled profiles), best_aggregate.
  --masks DIR: pixel_auroc, aupro (MVTec AD, FPR up to 0.3), region_hit_rate,
    region_precision, pixel_images, masks_missing; maps/ in --out (16-bit PNGs).
  Files in --out: metrics.json, scores.csv, roc.png, pr.png, report.html.";

/// Everything the reports are computed from.
pub(crate) struct Input<'a> {
    pub args: &'a EvalArgs,
    pub model: String,
    pub scoring: Scoring,
    pub scorer: &'a Scorer,
    pub data: &'a Dataset,
    pub records: &'a [Record],
    pub seconds: f64,
    /// `--masks`: each image's ground-truth mask, if any.
    pub masks: Option<&'a super::pixels::Masks>,
}

#[derive(Debug, Default, Serialize)]
pub struct OperatingPoint {
    pub min_recall: f64,
    pub threshold: Option<f64>,
    pub recall: Option<f64>,
    pub precision: Option<f64>,
    pub false_alarm_rate: Option<f64>,
    pub review_threshold: Option<f64>,
    pub review_rate: Option<f64>,
    pub normal_review_rate: Option<f64>,
    /// With the suggested review_threshold (3 decimals; 0.5 at least): defective images not
    /// PASS over defective images.
    pub line_recall: Option<f64>,
    /// With the suggested review_threshold: normal images not PASS over normal images.
    pub line_false_alarm_rate: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct AsConfigured {
    pub review_threshold: f32,
    pub recall: Option<f64>,
    pub false_alarm_rate: Option<f64>,
    pub review_rate: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct FolderStats {
    /// `normal` or `defective`.
    pub truth: &'static str,
    /// The profile class the folder is named like.
    pub class: Option<String>,
    pub images: usize,
    #[serde(rename = "PASS")]
    pub pass: usize,
    #[serde(rename = "DEFECT")]
    pub defect: usize,
    #[serde(rename = "REVIEW")]
    pub review: usize,
    #[serde(rename = "ERROR")]
    pub error: usize,
}

#[derive(Debug, Serialize)]
pub struct ClassRow {
    pub class: String,
    pub support: usize,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct ConfusionJson {
    /// Row and column labels: the profile's classes, in its order.
    pub classes: Vec<String>,
    /// `matrix[true][predicted]`.
    pub matrix: Vec<Vec<usize>>,
}

#[derive(Debug, Default, Serialize)]
pub struct Suggested {
    pub review_threshold: Option<f64>,
    pub class_thresholds: BTreeMap<String, f64>,
    /// `--search`: the best `exemplars.alpha` and `beta` on these images.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exemplars: Option<SuggestedExemplars>,
    /// The lines to paste into the profile.
    pub toml: String,
}

#[derive(Debug, Serialize)]
pub struct SuggestedExemplars {
    pub alpha: f32,
    pub beta: f32,
}

#[derive(Debug, Serialize)]
pub struct Metrics {
    pub dataset: String,
    pub profile: String,
    pub model: String,
    /// Image files found (scored + errors).
    pub images: usize,
    pub scored: usize,
    pub errors: usize,
    pub normal: usize,
    pub defective: usize,
    pub skipped_files: usize,
    pub seconds: f64,
    pub auroc: Option<f64>,
    pub average_precision: Option<f64>,
    pub f1_max: Option<f64>,
    pub f1_threshold: Option<f64>,
    pub f1_precision: Option<f64>,
    pub f1_recall: Option<f64>,
    pub operating_point: OperatingPoint,
    pub as_configured: AsConfigured,
    pub outcomes: BTreeMap<&'static str, usize>,
    pub per_folder: BTreeMap<String, FolderStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_class: Option<Vec<ClassRow>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confusion: Option<ConfusionJson>,
    pub suggested: Suggested,
    /// Tiled profiles: each `tiles.aggregate` rule's image AUROC and AP on these images (the
    /// profile's own rule is `aggregate`), and the one that ranks them best.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aggregates: Option<BTreeMap<&'static str, AggregateRank>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_aggregate: Option<&'static str>,
    /// `--line-memory`: the set scored against itself.
    #[serde(flatten)]
    pub line_memory: Option<super::line_memory::LineMemoryMetrics>,
    /// `--masks`: the pixel metrics.
    #[serde(flatten)]
    pub pixel: Option<super::pixels::PixelMetrics>,
    /// `--search`: Tip-Adapter's grid search of `exemplars.alpha` and `beta`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search: Option<super::search::Search>,
    /// Metric name → why it is `null`.
    pub undefined: BTreeMap<&'static str, String>,
    /// The image files that could not be scored, with the reason.
    pub error_images: Vec<ErrorImage>,
    pub definitions: BTreeMap<&'static str, &'static str>,
    /// The curves behind the plots (not serialised).
    #[serde(skip)]
    pub curve: Curve,
}

/// One aggregation rule's image metrics.
#[derive(Debug, Serialize)]
pub struct AggregateRank {
    pub auroc: Option<f64>,
    pub average_precision: Option<f64>,
}

/// Each rule's AUROC and AP from the anomaly scores every tiled decision carries for all of
/// them, and the best (highest AUROC, then AP; the earlier rule on a tie). `None` for a
/// profile without tiles.
fn aggregates(
    data: &Dataset,
    scored: &[(&Record, &crate::score::Decision)],
) -> Option<(BTreeMap<&'static str, AggregateRank>, Option<&'static str>)> {
    use crate::score::AggregateScores;
    let per: Vec<([f32; 3], bool)> = scored
        .iter()
        .map(|(r, d)| {
            d.localization
                .as_ref()
                .map(|l| (l.aggregates.values(), data.folders[r.folder].defective))
        })
        .collect::<Option<_>>()?;
    let mut out = BTreeMap::new();
    let mut best: Option<(&'static str, f64, f64)> = None;
    for (i, name) in AggregateScores::NAMES.into_iter().enumerate() {
        let samples: Vec<(f64, bool)> = per.iter().map(|(v, d)| (f64::from(v[i]), *d)).collect();
        let curve = Curve::new(&samples);
        let auroc = metrics::auroc(&curve).ok();
        let ap = metrics::average_precision(&curve).ok();
        if let (Some(a), Some(p)) = (auroc, ap) {
            if best.is_none_or(|(_, ba, bp)| a > ba || (a == ba && p > bp)) {
                best = Some((name, a, p));
            }
        }
        out.insert(
            name,
            AggregateRank {
                auroc,
                average_precision: ap,
            },
        );
    }
    Some((out, best.map(|b| b.0)))
}

impl Metrics {
    /// The pixel metrics of `--masks`, their undefined ones under `undefined`.
    pub(crate) fn set_pixel(&mut self, mut pixel: super::pixels::PixelMetrics) {
        for (name, why) in std::mem::take(&mut pixel.undefined) {
            self.undefined.insert(name, why);
        }
        self.pixel = Some(pixel);
    }
}

#[derive(Debug, Serialize)]
pub struct ErrorImage {
    pub path: String,
    pub error: String,
}

pub(crate) fn share(n: usize, of: usize) -> Option<f64> {
    (of > 0).then(|| n as f64 / of as f64)
}

impl Metrics {
    pub(crate) fn compute(input: &Input) -> Self {
        let Input {
            args,
            data,
            records,
            scorer,
            ..
        } = input;
        let profile = &scorer.profile;
        let mut undefined = BTreeMap::new();
        let scored: Vec<(&Record, &crate::score::Decision)> = records
            .iter()
            .filter_map(|r| r.result.as_ref().ok().map(|d| (r, d)))
            .collect();
        let samples: Vec<(f64, bool)> = scored
            .iter()
            .map(|(r, d)| (f64::from(d.anomaly_score), data.folders[r.folder].defective))
            .collect();
        let curve = Curve::new(&samples);
        let mut ok = |name: &'static str, v: Result<f64, metrics::Undefined>| {
            v.map_err(|e| undefined.insert(name, e.to_string())).ok()
        };
        let auroc = ok("auroc", metrics::auroc(&curve));
        let average_precision = ok("average_precision", metrics::average_precision(&curve));
        let f1 = metrics::f1_max(&curve);
        let f1p = f1.as_ref().ok().copied();
        ok("f1_max", f1.map(|p| p.f1));
        let op = metrics::operating_point(&curve, args.min_recall);
        let opp = op.as_ref().ok().copied();
        ok("operating_point", op.map(|p| p.threshold));
        if opp.is_some() && curve.negatives == 0 {
            undefined.insert(
                "operating_point.false_alarm_rate",
                "no normal images".into(),
            );
        }

        let scores: Vec<f64> = samples.iter().map(|s| s.0).collect();
        let normal_scores: Vec<f64> = samples.iter().filter(|s| !s.1).map(|s| s.0).collect();
        let review_threshold = match (opp, input.scoring) {
            (Some(p), Scoring::Softmax) => Some(suggested_review_threshold(p.threshold)),
            (Some(_), Scoring::Sigmoid) => {
                undefined.insert(
                    "operating_point.review_threshold",
                    "sigmoid scoring: the acceptable mass is not 1 - anomaly_score, so no single review_threshold makes the threshold the line's".into(),
                );
                None
            }
            (None, _) => None,
        };
        let band = |s: &[f64]| review_threshold.and_then(|t| metrics::share_between(s, 1.0 - t, t));
        let defect_scores: Vec<f64> = samples.iter().filter(|s| s.1).map(|s| s.0).collect();
        let stopped = |s: &[f64]| review_threshold.and_then(|t| stopped_share(s, t));
        let operating_point = OperatingPoint {
            min_recall: args.min_recall,
            threshold: opp.map(|p| p.threshold),
            recall: opp.map(|p| p.recall),
            precision: opp.map(|p| p.precision),
            false_alarm_rate: opp.and_then(|p| p.false_alarm_rate),
            review_threshold,
            review_rate: band(&scores),
            normal_review_rate: band(&normal_scores),
            line_recall: stopped(&defect_scores),
            line_false_alarm_rate: stopped(&normal_scores),
        };

        let mut outcomes: BTreeMap<&'static str, usize> =
            ["PASS", "DEFECT", "REVIEW", "ERROR"].map(|k| (k, 0)).into();
        let mut per_folder: BTreeMap<String, FolderStats> = data
            .folders
            .iter()
            .map(|f| {
                let stats = FolderStats {
                    truth: if f.defective { "defective" } else { "normal" },
                    class: f.class.map(|c| profile.classes[c].name.clone()),
                    ..Default::default()
                };
                (f.name.clone(), stats)
            })
            .collect();
        let (mut stopped_defects, mut stopped_normals) = (0, 0);
        for r in records.iter() {
            let folder = &data.folders[r.folder];
            let s = per_folder.get_mut(&folder.name).expect("every folder");
            s.images += 1;
            let outcome = outcome(r);
            *outcomes.get_mut(outcome).expect("every outcome") += 1;
            match outcome {
                "PASS" => s.pass += 1,
                "DEFECT" => s.defect += 1,
                "REVIEW" => s.review += 1,
                _ => s.error += 1,
            }
            if outcome == "DEFECT" || outcome == "REVIEW" {
                if folder.defective {
                    stopped_defects += 1;
                } else {
                    stopped_normals += 1;
                }
            }
        }
        let as_configured = AsConfigured {
            review_threshold: profile.review_threshold,
            recall: share(stopped_defects, curve.positives),
            false_alarm_rate: share(stopped_normals, curve.negatives),
            review_rate: share(outcomes["REVIEW"], scored.len()),
        };

        let names: Vec<String> = profile.classes.iter().map(|c| c.name.clone()).collect();
        let matched: Vec<(usize, usize)> = scored
            .iter()
            .filter_map(|(r, d)| data.folders[r.folder].class.map(|c| (c, d.class)))
            .collect();
        let (accuracy, per_class, confusion) = if matched.is_empty() {
            (None, None, None)
        } else {
            let m = Confusion::new(names.len(), matched);
            let rows = (0..names.len())
                .map(|c| {
                    let s = m.class(c);
                    ClassRow {
                        class: names[c].clone(),
                        support: s.support,
                        precision: s.precision,
                        recall: s.recall,
                    }
                })
                .collect();
            let confusion = ConfusionJson {
                classes: names.clone(),
                matrix: m.matrix.clone(),
            };
            (m.accuracy(), Some(rows), Some(confusion))
        };

        let class_thresholds = class_thresholds(input, &scored);
        let suggested = Suggested {
            toml: suggestion_toml(input, review_threshold, opp, &class_thresholds),
            review_threshold,
            class_thresholds,
            exemplars: None,
        };
        let errors = outcomes["ERROR"];
        let (aggregates, best_aggregate) = match aggregates(data, &scored) {
            Some((a, b)) => (Some(a), b),
            None => (None, None),
        };
        Metrics {
            dataset: args.dataset.display().to_string(),
            profile: scorer.name.clone(),
            model: input.model.clone(),
            images: records.len(),
            scored: scored.len(),
            errors,
            normal: curve.negatives,
            defective: curve.positives,
            skipped_files: data.skipped.len(),
            seconds: input.seconds,
            auroc,
            average_precision,
            f1_max: f1p.map(|p| p.f1),
            f1_threshold: f1p.map(|p| p.threshold),
            f1_precision: f1p.map(|p| p.precision),
            f1_recall: f1p.map(|p| p.recall),
            operating_point,
            as_configured,
            outcomes,
            per_folder,
            accuracy,
            per_class,
            confusion,
            suggested,
            aggregates,
            best_aggregate,
            pixel: None,
            search: None,
            line_memory: None,
            undefined,
            error_images: records
                .iter()
                .filter_map(|r| {
                    r.result.as_ref().err().map(|e| ErrorImage {
                        path: r.path.display().to_string(),
                        error: e.to_string(),
                    })
                })
                .collect(),
            definitions: DEFINITIONS.iter().copied().collect(),
            curve,
        }
    }
}

pub(crate) fn outcome(r: &Record) -> &'static str {
    r.result.as_ref().map_or("ERROR", |d| d.outcome.as_str())
}

/// The smallest multiple of 0.001 over `1 - threshold`, within [0.5, 1]: PASS needs an
/// acceptable mass `1 - score >= review_threshold`, so every score at or over the threshold
/// is stopped.
fn suggested_review_threshold(threshold: f64) -> f64 {
    let t = ((1.0 - threshold) * 1000.0 + 1e-9).floor() / 1000.0 + 0.001;
    (t * 1000.0).round().clamp(500.0, 1000.0) / 1000.0
}

/// The share of `scores` the outcome rules do not PASS under `review_threshold` (softmax:
/// acceptable mass `1 - score`): over `1 - review_threshold`, or at or over 0.5 when that is
/// the review_threshold (the defect side wins ties).
fn stopped_share(scores: &[f64], review_threshold: f64) -> Option<f64> {
    let stop = |s: f64| {
        if review_threshold <= 0.5 {
            s >= 0.5
        } else {
            s > 1.0 - review_threshold
        }
    };
    share(scores.iter().filter(|&&s| stop(s)).count(), scores.len())
}

/// Per defect class with a folder named like it: the F1-max threshold of the class's
/// probability, that folder's images against the normal images, rounded down to 0.001.
fn class_thresholds(
    input: &Input,
    scored: &[(&Record, &crate::score::Decision)],
) -> BTreeMap<String, f64> {
    let folders = &input.data.folders;
    let mut out = BTreeMap::new();
    for (c, class) in input.scorer.profile.classes.iter().enumerate() {
        if !class.defect {
            continue;
        }
        let samples: Vec<(f64, bool)> = scored
            .iter()
            .filter(|(r, _)| !folders[r.folder].defective || folders[r.folder].class == Some(c))
            .map(|(r, d)| {
                (
                    f64::from(d.probabilities[c]),
                    folders[r.folder].class == Some(c),
                )
            })
            .collect();
        let curve = Curve::new(&samples);
        if curve.negatives == 0 {
            continue;
        }
        if let Ok(p) = metrics::f1_max(&curve) {
            out.insert(class.name.clone(), (p.threshold * 1000.0).floor() / 1000.0);
        }
    }
    out
}

fn suggestion_toml(
    input: &Input,
    review_threshold: Option<f64>,
    op: Option<Point>,
    classes: &BTreeMap<String, f64>,
) -> String {
    let name = &input.scorer.name;
    let mut s = format!(
        "# clipqc eval {} ({} images), model {}\n# into the profile's table of the config file (the built-in default: copy it there whole first)\n[profiles.{name}]\n",
        input.args.dataset.display(),
        input.records.len(),
        input.model
    );
    match (review_threshold, op) {
        (Some(rt), Some(p)) => s += &format!(
            "review_threshold = {rt:.3}   # anomaly_score {} {:.3} is not PASS (--min-recall {}: threshold {:.4})\n",
            if rt <= 0.5 { "at or over" } else { "over" },
            1.0 - rt,
            input.args.min_recall,
            p.threshold,
        ),
        _ => s += "# review_threshold: no suggestion (see \"undefined\" in metrics.json)\n",
    }
    for (class, t) in classes {
        s += &format!("# in the [[profiles.{name}.classes]] table with name = \"{class}\":\n#   threshold = {t:.3}   # F1-max of its probability\n");
    }
    s
}

/// The human summary printed without `--json`.
pub fn summary(out: &mut impl Write, m: &Metrics) -> std::io::Result<()> {
    let f = |v: Option<f64>| v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.4}"));
    writeln!(
        out,
        "{} images ({} normal, {} defective, {} errors) in {:.1} s, profile {}",
        m.images, m.normal, m.defective, m.errors, m.seconds, m.profile
    )?;
    writeln!(
        out,
        "AUROC {}  AP {}  F1-max {} at {}",
        f(m.auroc),
        f(m.average_precision),
        f(m.f1_max),
        f(m.f1_threshold)
    )?;
    let op = &m.operating_point;
    writeln!(
        out,
        "recall >= {}: threshold {}, false alarms {}, review_threshold {}, REVIEW {}",
        op.min_recall,
        f(op.threshold),
        f(op.false_alarm_rate),
        f(op.review_threshold),
        f(op.review_rate)
    )?;
    writeln!(out, "folder\ttruth\timages\tPASS\tDEFECT\tREVIEW\tERROR")?;
    for (name, s) in &m.per_folder {
        writeln!(
            out,
            "{name}\t{}\t{}\t{}\t{}\t{}\t{}",
            s.truth, s.images, s.pass, s.defect, s.review, s.error
        )?;
    }
    if let (Some(a), Some(best)) = (&m.aggregates, m.best_aggregate) {
        let ranks: Vec<String> = a
            .iter()
            .map(|(name, r)| format!("{name} {}", f(r.auroc)))
            .collect();
        writeln!(
            out,
            "image AUROC by tiles.aggregate: {} (best: {best})",
            ranks.join(", ")
        )?;
    }
    if let Some(l) = &m.line_memory {
        writeln!(
            out,
            "line memory: AUROC {} alone; best line_memory.weight {}",
            f(l.line_memory_auroc),
            f(l.line_memory_best_weight)
        )?;
    }
    if let Some(s) = &m.search {
        writeln!(
            out,
            "search ({} exemplars, {} settings): best alpha {} beta {}: AUROC {} F1-max {}; the profile's alpha {} beta {}: AUROC {} (in-sample)",
            s.exemplars,
            s.grid.len(),
            s.best.alpha,
            s.best.beta,
            f(s.best.auroc),
            f(s.best.f1_max),
            s.current.alpha,
            s.current.beta,
            f(s.current.auroc)
        )?;
    }
    if let Some(p) = &m.pixel {
        writeln!(
            out,
            "pixels ({} images, {} masks missing): pixel AUROC {}  AUPRO {}  region hit rate {}  region precision {}",
            p.pixel_images,
            p.masks_missing,
            f(p.pixel_auroc),
            f(p.aupro),
            f(p.region_hit_rate),
            f(p.region_precision)
        )?;
    }
    for (k, why) in &m.undefined {
        writeln!(out, "{k}: undefined ({why})")?;
    }
    write!(out, "{}", m.suggested.toml)
}
