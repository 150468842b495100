//! The numbers of `clipqc eval`, as pure functions of (score, label) pairs.
//!
//! Guarantees, each checked against scikit-learn 1.8 in `tests/it/eval_cli.rs`:
//! - a *positive* is a defective image, the score is its `anomaly_score`, and an image is
//!   flagged at threshold `t` when its score is `>= t` (scikit-learn's convention);
//! - the curves have one point per distinct score (tied scores move together), from the
//!   highest score down;
//! - [`auroc`] is the trapezoidal area under the ROC curve from (0, 0), as `roc_auc_score`;
//! - [`average_precision`] is `Σ (Rₙ − Rₙ₋₁) Pₙ` over the curve's points, step-wise and not
//!   interpolated, as `average_precision_score`;
//! - [`f1_max`] is the largest `2PR / (P + R)` over the curve's points; on a tie the highest
//!   threshold (fewer parts stopped for the same F1);
//! - [`operating_point`] is the highest threshold whose recall reaches `min_recall`;
//! - a metric that needs a class the data does not have is `Err(Undefined)` with the
//!   reason, never NaN or a panic.

use std::fmt;

/// Why a metric has no value on this data (written into `metrics.json` under `undefined`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undefined(pub &'static str);

impl fmt::Display for Undefined {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

const NO_POSITIVES: Undefined =
    Undefined("no defective images: recall (and so this metric) needs at least one");
const NO_NEGATIVES: Undefined = Undefined(
    "no normal images: the false-alarm rate (and so this metric) needs at least one; name the good parts' folders with --normal",
);

/// Cumulative counts at each distinct score, from the highest score down.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    /// Distinct scores, descending.
    pub thresholds: Vec<f64>,
    /// Defective images scoring `>= thresholds[i]`.
    pub tps: Vec<usize>,
    /// Normal images scoring `>= thresholds[i]`.
    pub fps: Vec<usize>,
    pub positives: usize,
    pub negatives: usize,
}

impl Curve {
    /// `samples`: (score, defective). NaN scores sort as the highest (they cannot come from
    /// the scorer, whose probabilities are finite, but must not panic here).
    pub fn new(samples: &[(f64, bool)]) -> Self {
        let mut sorted = samples.to_vec();
        sorted.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut c = Curve {
            thresholds: Vec::new(),
            tps: Vec::new(),
            fps: Vec::new(),
            positives: 0,
            negatives: 0,
        };
        let (mut tp, mut fp) = (0, 0);
        for (i, &(score, positive)) in sorted.iter().enumerate() {
            if positive {
                tp += 1;
            } else {
                fp += 1;
            }
            // One point after the last sample of each run of equal scores.
            if sorted.get(i + 1).is_none_or(|next| next.0 != score) {
                c.thresholds.push(score);
                c.tps.push(tp);
                c.fps.push(fp);
            }
        }
        c.positives = tp;
        c.negatives = fp;
        c
    }

    fn recall(&self, i: usize) -> f64 {
        self.tps[i] as f64 / self.positives as f64
    }

    fn precision(&self, i: usize) -> f64 {
        // Every point holds at least one sample, so the denominator is never 0.
        self.tps[i] as f64 / (self.tps[i] + self.fps[i]) as f64
    }

    /// (false-positive rate, true-positive rate) from (0, 0) to (1, 1).
    pub fn roc_points(&self) -> Result<Vec<(f64, f64)>, Undefined> {
        if self.positives == 0 {
            return Err(NO_POSITIVES);
        }
        if self.negatives == 0 {
            return Err(NO_NEGATIVES);
        }
        let n = self.negatives as f64;
        let mut v = vec![(0.0, 0.0)];
        v.extend((0..self.thresholds.len()).map(|i| (self.fps[i] as f64 / n, self.recall(i))));
        Ok(v)
    }

    /// (recall, precision) at each threshold, highest first.
    pub fn pr_points(&self) -> Result<Vec<(f64, f64)>, Undefined> {
        if self.positives == 0 {
            return Err(NO_POSITIVES);
        }
        Ok((0..self.thresholds.len())
            .map(|i| (self.recall(i), self.precision(i)))
            .collect())
    }
}

pub fn auroc(c: &Curve) -> Result<f64, Undefined> {
    let pts = c.roc_points()?;
    Ok(pts
        .windows(2)
        .map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0)
        .sum())
}

pub fn average_precision(c: &Curve) -> Result<f64, Undefined> {
    let pts = c.pr_points()?;
    let mut prev_recall = 0.0;
    let mut ap = 0.0;
    for (r, p) in pts {
        ap += (r - prev_recall) * p;
        prev_recall = r;
    }
    Ok(ap)
}

/// A threshold and what it does on this data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub threshold: f64,
    pub recall: f64,
    pub precision: f64,
    /// Normal images flagged (`>= threshold`) over normal images; `None` without normals.
    pub false_alarm_rate: Option<f64>,
    pub f1: f64,
}

impl Curve {
    fn point(&self, i: usize) -> Point {
        let (r, p) = (self.recall(i), self.precision(i));
        Point {
            threshold: self.thresholds[i],
            recall: r,
            precision: p,
            false_alarm_rate: (self.negatives > 0)
                .then(|| self.fps[i] as f64 / self.negatives as f64),
            f1: if p + r > 0.0 {
                2.0 * p * r / (p + r)
            } else {
                0.0
            },
        }
    }
}

pub fn f1_max(c: &Curve) -> Result<Point, Undefined> {
    if c.positives == 0 {
        return Err(NO_POSITIVES);
    }
    let mut best = c.point(0);
    for i in 1..c.thresholds.len() {
        let p = c.point(i);
        // Strictly better only: the first (highest) threshold wins a tie.
        if p.f1 > best.f1 {
            best = p;
        }
    }
    Ok(best)
}

/// The highest threshold whose recall reaches `min_recall` (in (0, 1]).
pub fn operating_point(c: &Curve, min_recall: f64) -> Result<Point, Undefined> {
    if c.positives == 0 {
        return Err(NO_POSITIVES);
    }
    // Counted in images, so 0.99 of 100 defects is 99 and no rounding of 0.99 × 100 decides.
    let needed = ((min_recall * c.positives as f64) - 1e-9).ceil().max(1.0) as usize;
    let i = c
        .tps
        .iter()
        .position(|&tp| tp >= needed)
        .expect("the last point holds every positive");
    Ok(c.point(i))
}

/// The fraction of `samples` with `lo < score < hi`.
pub fn share_between(scores: &[f64], lo: f64, hi: f64) -> Option<f64> {
    (!scores.is_empty())
        .then(|| scores.iter().filter(|&&s| s > lo && s < hi).count() as f64 / scores.len() as f64)
}

/// A confusion matrix over `n` classes: `m[true][predicted]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Confusion {
    pub matrix: Vec<Vec<usize>>,
}

/// Precision and recall of one class, `None` where nothing was predicted as, or labelled
/// as, that class.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassStats {
    pub support: usize,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
}

impl Confusion {
    pub fn new(n: usize, pairs: impl IntoIterator<Item = (usize, usize)>) -> Self {
        let mut matrix = vec![vec![0; n]; n];
        for (t, p) in pairs {
            matrix[t][p] += 1;
        }
        Self { matrix }
    }

    pub fn total(&self) -> usize {
        self.matrix.iter().flatten().sum()
    }

    pub fn accuracy(&self) -> Option<f64> {
        let total = self.total();
        let right: usize = (0..self.matrix.len()).map(|i| self.matrix[i][i]).sum();
        (total > 0).then(|| right as f64 / total as f64)
    }

    pub fn class(&self, c: usize) -> ClassStats {
        let support: usize = self.matrix[c].iter().sum();
        let predicted: usize = self.matrix.iter().map(|row| row[c]).sum();
        let hit = self.matrix[c][c] as f64;
        ClassStats {
            support,
            precision: (predicted > 0).then(|| hit / predicted as f64),
            recall: (support > 0).then(|| hit / support as f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve(scores: &[f64], labels: &[u8]) -> Curve {
        let s: Vec<(f64, bool)> = scores
            .iter()
            .zip(labels)
            .map(|(&s, &l)| (s, l == 1))
            .collect();
        Curve::new(&s)
    }

    #[test]
    fn perfect_and_inverted_separation() {
        let c = curve(&[0.9, 0.8, 0.2, 0.1], &[1, 1, 0, 0]);
        assert_eq!(auroc(&c), Ok(1.0));
        assert_eq!(average_precision(&c), Ok(1.0));
        let f = f1_max(&c).unwrap();
        assert_eq!((f.f1, f.threshold), (1.0, 0.8));
        let c = curve(&[0.1, 0.2, 0.8, 0.9], &[1, 1, 0, 0]);
        assert_eq!(auroc(&c), Ok(0.0));
    }

    #[test]
    fn ties_count_half_as_scikit_learn() {
        // All scores equal: one point, the diagonal, AUROC 0.5; AP is the prevalence.
        let c = curve(&[0.5; 4], &[1, 0, 1, 0]);
        assert_eq!(c.thresholds, vec![0.5]);
        assert_eq!(auroc(&c), Ok(0.5));
        assert_eq!(average_precision(&c), Ok(0.5));
        // sklearn: roc_auc_score([0,0,1,1], [0.1,0.4,0.35,0.8]) == 0.75
        let c = curve(&[0.1, 0.4, 0.35, 0.8], &[0, 0, 1, 1]);
        assert_eq!(auroc(&c), Ok(0.75));
        // sklearn: average_precision_score(same) == 0.8333…
        assert!((average_precision(&c).unwrap() - 5.0 / 6.0).abs() < 1e-12);
    }

    #[test]
    fn one_class_is_undefined_not_nan() {
        let c = curve(&[0.3, 0.7], &[1, 1]);
        assert_eq!(auroc(&c), Err(NO_NEGATIVES));
        assert_eq!(average_precision(&c), Ok(1.0));
        assert_eq!(operating_point(&c, 0.99).unwrap().false_alarm_rate, None);
        let c = curve(&[0.3, 0.7], &[0, 0]);
        assert_eq!(auroc(&c), Err(NO_POSITIVES));
        assert_eq!(average_precision(&c), Err(NO_POSITIVES));
        assert!(f1_max(&c).is_err() && operating_point(&c, 0.5).is_err());
        let c = curve(&[], &[]);
        assert!(auroc(&c).is_err() && f1_max(&c).is_err());
    }

    #[test]
    fn the_operating_point_is_the_highest_threshold_reaching_the_recall() {
        // Defects at 0.9, 0.6, 0.4, 0.2; normals at 0.5, 0.3, 0.1.
        let c = curve(&[0.9, 0.6, 0.4, 0.2, 0.5, 0.3, 0.1], &[1, 1, 1, 1, 0, 0, 0]);
        let p = operating_point(&c, 0.75).unwrap();
        assert_eq!((p.threshold, p.recall), (0.4, 0.75));
        assert_eq!(p.false_alarm_rate, Some(1.0 / 3.0));
        let p = operating_point(&c, 0.99).unwrap();
        assert_eq!((p.threshold, p.recall), (0.2, 1.0));
        assert_eq!(p.false_alarm_rate, Some(2.0 / 3.0));
        // 0.99 of 100 defects is 99 of them, not 100 through rounding.
        let mut s: Vec<(f64, bool)> = (0..100).map(|i| (f64::from(i) / 100.0, true)).collect();
        s.push((0.5, false));
        let p = operating_point(&Curve::new(&s), 0.99).unwrap();
        assert_eq!(p.threshold, 0.01);
    }

    #[test]
    fn f1_ties_take_the_highest_threshold() {
        // At 0.8: P=1, R=1/2 → 2/3. At 0.2: P=1/2, R=1 → 2/3 (both 1/1.5 exactly).
        let c = curve(&[0.8, 0.5, 0.4, 0.2], &[1, 0, 0, 1]);
        let f = f1_max(&c).unwrap();
        assert_eq!(f.threshold, 0.8);
        assert!((f.f1 - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn confusion_accuracy_and_per_class() {
        let m = Confusion::new(3, [(0, 0), (0, 1), (1, 1), (1, 1), (2, 1)]);
        assert_eq!(m.accuracy(), Some(0.6));
        let c1 = m.class(1);
        assert_eq!(c1.support, 2);
        assert_eq!(c1.precision, Some(0.5));
        assert_eq!(c1.recall, Some(1.0));
        let c2 = m.class(2);
        assert_eq!((c2.precision, c2.recall), (None, Some(0.0)));
        assert_eq!(Confusion::new(2, []).accuracy(), None);
    }

    #[test]
    fn share_between_is_open_on_both_ends() {
        assert_eq!(share_between(&[0.1, 0.2, 0.5, 0.8], 0.2, 0.8), Some(0.25));
        assert_eq!(share_between(&[], 0.0, 1.0), None);
    }
}
