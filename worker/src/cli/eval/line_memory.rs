//! `clipqc eval --line-memory`: the set scored MuSc-style, so `line_memory.weight` can be chosen
//! on data before it goes on the line.
//!
//! Each scored image is scored against every other scored image of the dataset, all folders
//! together (MuSc scores each unlabelled test image against the rest of the set: on a line, and
//! in a representative set, most parts are good), with the profile's `line_memory` settings
//! (`top_fraction`, `min_parts`; the defaults when the profile has none) and the same code the
//! worker's memory uses ([`crate::score::line_memory::score_against`]). The worker remembers only
//! the line's last `size` parts that were not DEFECT; here every other image counts, so the
//! figure is the method's on this set, not a replay of a line. The score is calibrated as the
//! worker's is: its percentile among the other images' scores.
//!
//! `metrics.json` gains `line_memory_auroc` and `line_memory_average_precision` (the score
//! alone), and `line_memory_weights`: the image AUROC of `(1 − w) × anomaly_score + w ×
//! line_memory_score` for w = 0, 0.1, …, 1, the blend the worker makes with `line_memory.weight`
//! (its outcome rules run on that blend), with the best weight.

use serde::Serialize;

use super::metrics::{self, Curve};
use crate::score::line_memory::{percentile, score_against, LineMemoryConfig};

/// The blend's AUROC at one weight.
#[derive(Debug, Serialize)]
pub struct Weighted {
    pub weight: f64,
    pub auroc: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct LineMemoryMetrics {
    pub line_memory_auroc: Option<f64>,
    pub line_memory_average_precision: Option<f64>,
    pub line_memory_weights: Vec<Weighted>,
    /// The weight whose blend has the highest AUROC (the smallest on a tie).
    pub line_memory_best_weight: Option<f64>,
}

/// Each image's calibrated score against the others (`None` where it has no views, or too
/// few others): its raw score against the rest of the set, as a percentile of the other
/// images' raw scores (each against the rest too), as the worker calibrates a part against its
/// line's leave-one-out scores ([`crate::score::line_memory`]). `views[i]`: image i's unit view
/// embeddings, `None` when it was not scored.
pub fn scores(views: &[Option<Vec<Vec<f32>>>], cfg: &LineMemoryConfig) -> Vec<Option<f32>> {
    let raw = raw_scores(views, cfg);
    raw.iter()
        .enumerate()
        .map(|(i, r)| {
            let r = (*r)?;
            let others: Vec<f32> = raw
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .filter_map(|(_, o)| *o)
                .collect();
            Some(percentile(r, &others))
        })
        .collect()
}

/// Each image's raw score against the others.
fn raw_scores(views: &[Option<Vec<Vec<f32>>>], cfg: &LineMemoryConfig) -> Vec<Option<f32>> {
    (0..views.len())
        .map(|i| {
            let own = views[i].as_ref()?;
            let others: Vec<&[Vec<f32>]> = views
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .filter_map(|(_, v)| v.as_deref())
                .collect();
            score_against(own, &others, cfg)
        })
        .collect()
}

/// The metrics from `(anomaly_score, line_memory_score, defective)` of the images that have
/// both.
pub fn measure(samples: &[(f32, f32, bool)]) -> LineMemoryMetrics {
    let curve = |w: f64| {
        let s: Vec<(f64, bool)> = samples
            .iter()
            .map(|&(a, m, d)| ((1.0 - w) * f64::from(a) + w * f64::from(m), d))
            .collect();
        Curve::new(&s)
    };
    let alone = curve(1.0);
    let line_memory_weights: Vec<Weighted> = (0..=10)
        .map(|k| {
            let weight = f64::from(k) / 10.0;
            Weighted {
                weight,
                auroc: metrics::auroc(&curve(weight)).ok(),
            }
        })
        .collect();
    let best = line_memory_weights
        .iter()
        .filter_map(|w| w.auroc.map(|a| (w.weight, a)))
        .fold(None::<(f64, f64)>, |best, (w, a)| match best {
            Some((_, ba)) if ba >= a => best,
            _ => Some((w, a)),
        });
    LineMemoryMetrics {
        line_memory_auroc: metrics::auroc(&alone).ok(),
        line_memory_average_precision: metrics::average_precision(&alone).ok(),
        line_memory_weights,
        line_memory_best_weight: best.map(|b| b.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        crate::score::normalized(v)
    }

    /// Four near-identical good parts and one odd one: the odd one stands out; a part without
    /// views gets no score and is no one's reference.
    #[test]
    fn the_odd_part_out_scores_highest_against_the_rest() {
        let good = |k: f32| Some(vec![unit(&[1.0, 0.01 * k, 0.0])]);
        let views = vec![
            good(1.0),
            good(2.0),
            good(3.0),
            Some(vec![unit(&[0.0, 0.0, 1.0])]),
            None,
            good(4.0),
        ];
        let cfg = LineMemoryConfig {
            min_parts: 3,
            top_fraction: 0.5,
            ..Default::default()
        };
        let s = scores(&views, &cfg);
        assert!(s[4].is_none());
        let odd = s[3].unwrap();
        for i in [0, 1, 2, 5] {
            assert!(s[i].unwrap() < odd, "{s:?}");
        }
        let few = LineMemoryConfig {
            min_parts: 6,
            ..cfg
        };
        assert!(
            scores(&views, &few).iter().all(Option::is_none),
            "under min_parts"
        );
    }

    #[test]
    fn the_best_weight_is_the_blend_that_ranks_best() {
        // The anomaly score ranks the defects wrong, the line memory right.
        let samples = [
            (0.9, 0.1, false),
            (0.8, 0.2, false),
            (0.2, 0.9, true),
            (0.1, 0.8, true),
        ];
        let m = measure(&samples);
        assert_eq!(m.line_memory_auroc, Some(1.0));
        assert_eq!(m.line_memory_weights.len(), 11);
        assert_eq!(
            m.line_memory_weights[0].auroc,
            Some(0.0),
            "w = 0: the anomaly score alone"
        );
        let best = m.line_memory_best_weight.unwrap();
        assert!(best > 0.5, "{best}");
    }
}
