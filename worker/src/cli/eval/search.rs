//! `clipqc eval --search`: Tip-Adapter's hyper-parameter search (`search_hp` in
//! gaopengcuhk/Tip-Adapter) for a profile's `exemplars.alpha` and `exemplars.beta`, on the
//! labelled set being measured.
//!
//! Tip-Adapter searches a grid of `beta` (the cache's sharpness) and `alpha` (its weight
//! against CLIP's logits) for the best accuracy on a validation set. Here the measure is the
//! one `eval` leads with, the image AUROC of the anomaly score (then F1-max, then the smaller
//! `alpha`: the least change from zero-shot that scores as well), and the grid is geometric,
//! because on one product the cache's affinities differ in the second decimal while the text
//! logits are 100 × cosine apart: `beta` 0.5 … 64 and `alpha` 0.25 … 256, 12 × 11 settings.
//!
//! Each image is embedded once; every setting re-runs only the scoring, with the same code
//! the worker runs ([`crate::score::Scorer::decide_views_associated`]; the windows' WinCLIP+
//! scores do not depend on `alpha` and `beta` and are computed once per image).
//!
//! The figures are in-sample: the setting chosen is the best **on these images**. Measure it on
//! images it was not chosen on (another `eval` of a held-out folder) before trusting the gain.

use serde::Serialize;

use super::metrics::{self, Curve};
use crate::cli::classify::Viewed;
use crate::score::{ProfileBank, Scorer};

/// `beta`: 0.5 × 1.55^k, k = 0..12 (0.5 … 63).
pub fn betas() -> Vec<f32> {
    (0..12).map(|k| 0.5 * 1.55f32.powi(k)).collect()
}

/// `alpha`: 0.25 × 2^k, k = 0..11 (0.25 … 256).
pub fn alphas() -> Vec<f32> {
    (0..11).map(|k| 0.25 * 2f32.powi(k)).collect()
}

/// One setting's figures.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Setting {
    pub alpha: f32,
    pub beta: f32,
    pub auroc: Option<f64>,
    pub f1_max: Option<f64>,
}

/// What `metrics.json` gains under `search`.
#[derive(Debug, Serialize)]
pub struct Search {
    /// The profile's own `exemplars` setting, measured the same way.
    pub current: Setting,
    /// The best setting (the module docs say how ties go).
    pub best: Setting,
    /// Every setting tried, `beta` outer, `alpha` inner.
    pub grid: Vec<Setting>,
    /// Exemplars in the bank searched with.
    pub exemplars: usize,
}

/// Why `--search` cannot run.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("--search: the profile {0:?} has no exemplars in the bank (add some with `clipqc exemplar add`, and leave out --zero-shot)")]
    NoExemplars(String),
}

/// One scored image: its views, its windows' WinCLIP+ scores, and whether it is defective.
pub struct Sample {
    pub viewed: Viewed,
    pub associations: Option<Vec<f32>>,
    pub defective: bool,
}

impl Sample {
    pub fn new(scorer: &Scorer, bank: &ProfileBank, viewed: Viewed, defective: bool) -> Self {
        let associations = scorer
            .profile
            .tiles
            .as_ref()
            .and_then(|_| scorer.associations(bank, &viewed.embeddings[1..], &viewed.windows));
        Self {
            viewed,
            associations,
            defective,
        }
    }
}

/// The figures of one setting on `samples`.
fn measure(
    scorer: &Scorer,
    bank: &ProfileBank,
    samples: &[Sample],
    alpha: f32,
    beta: f32,
) -> Setting {
    let mut s = scorer.clone();
    s.profile.exemplars.alpha = alpha;
    s.profile.exemplars.beta = beta;
    let scores: Vec<(f64, bool)> = samples
        .iter()
        .map(|x| {
            let d = s.decide_views_associated(
                &x.viewed.embeddings,
                &x.viewed.windows,
                x.viewed.origin,
                Some(bank),
                x.associations.clone(),
            );
            (f64::from(d.anomaly_score), x.defective)
        })
        .collect();
    let curve = Curve::new(&scores);
    Setting {
        alpha,
        beta,
        auroc: metrics::auroc(&curve).ok(),
        f1_max: metrics::f1_max(&curve).ok().map(|p| p.f1),
    }
}

/// Whether `a` beats `b`: higher AUROC, then higher F1-max, then smaller `alpha`.
fn better(a: &Setting, b: &Setting) -> bool {
    let key = |s: &Setting| (s.auroc.unwrap_or(-1.0), s.f1_max.unwrap_or(-1.0));
    let (ka, kb) = (key(a), key(b));
    ka.0 > kb.0 || (ka.0 == kb.0 && (ka.1 > kb.1 || (ka.1 == kb.1 && a.alpha < b.alpha)))
}

/// Searches the grid; `tick` is called once per setting (the progress bar).
pub fn search(
    scorer: &Scorer,
    bank: &ProfileBank,
    samples: &[Sample],
    mut tick: impl FnMut(),
) -> Result<Search, SearchError> {
    if bank.is_empty() {
        return Err(SearchError::NoExemplars(scorer.name.clone()));
    }
    let w = &scorer.profile.exemplars;
    let current = measure(scorer, bank, samples, w.alpha, w.beta);
    let mut grid = Vec::new();
    for beta in betas() {
        for alpha in alphas() {
            grid.push(measure(scorer, bank, samples, alpha, beta));
            tick();
        }
    }
    let best = grid
        .iter()
        .copied()
        .reduce(|best, s| if better(&s, &best) { s } else { best })
        .expect("the grid is not empty");
    Ok(Search {
        current,
        best,
        grid,
        exemplars: bank.len(),
    })
}

/// The lines `suggested.toml` gains.
pub fn toml(profile: &str, s: &Search) -> String {
    format!(
        "# --search: exemplars (AUROC {} at alpha {}, beta {}; the profile's own: {}; in-sample)\n[profiles.{profile}.exemplars]\nalpha = {}\nbeta = {}\n",
        fmt(s.best.auroc),
        s.best.alpha,
        s.best.beta,
        fmt(s.current.auroc),
        s.best.alpha,
        s.best.beta
    )
}

fn fmt(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.4}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_go_to_f1_then_the_smaller_alpha() {
        let s = |alpha, auroc, f1| Setting {
            alpha,
            beta: 1.0,
            auroc: Some(auroc),
            f1_max: Some(f1),
        };
        assert!(better(&s(8.0, 0.9, 0.5), &s(1.0, 0.8, 0.9)));
        assert!(better(&s(8.0, 0.9, 0.6), &s(1.0, 0.9, 0.5)));
        assert!(better(&s(1.0, 0.9, 0.5), &s(8.0, 0.9, 0.5)));
        assert!(!better(&s(8.0, 0.9, 0.5), &s(1.0, 0.9, 0.5)));
        assert_eq!(betas().len() * alphas().len(), 132);
        assert!((betas()[11] - 63.0).abs() < 1.0 && alphas()[10] == 256.0);
    }
}
