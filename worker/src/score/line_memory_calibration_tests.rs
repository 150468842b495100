//! The line memory's calibration: the kept leave-one-out scores and the percentile.

use super::*;
use proptest::prelude::*;

fn vector() -> impl Strategy<Value = Vec<f32>> {
    proptest::collection::vec(-1.0f32..1.0, 8)
        .prop_filter("not zero", |v| v.iter().map(|x| x * x).sum::<f32>() > 0.01)
}

proptest! {
    /// The kept leave-one-out scores are each remembered part's raw score against the
    /// others, computed from scratch ([`score_against`]), whichever way the cosines came
    /// (from `assess`, or computed in `remember`), and through evictions by size.
    #[test]
    fn kept_leave_one_out_scores_are_each_parts_score_against_the_others(
        parts in proptest::collection::vec(proptest::collection::vec(vector(), 1..4), 3..12),
        via_assess in proptest::collection::vec(any::<bool>(), 12),
    ) {
        let m = LineMemory::default();
        let cfg = LineMemoryConfig { size: 6, min_parts: 1, top_fraction: 0.5, ..Default::default() };
        let now = Instant::now();
        for (p, assess) in parts.iter().zip(&via_assess) {
            let known = if *assess {
                m.assess("p", "l", p, &cfg, now).map(|a| a.cosines).unwrap_or_default()
            } else {
                Cosines::default()
            };
            m.remember_with("p", "l", p, &cfg, now, &known);
        }
        let rings = m.rings.lock().unwrap();
        let ring = &rings.by_key[&("p".to_string(), "l".to_string())];
        let kept: Vec<Vec<Vec<f32>>> = ring.parts.iter().map(|p| p.views.clone()).collect();
        prop_assert_eq!(kept.len(), parts.len().min(6));
        let all_but = |i: usize| -> Vec<&[Vec<f32>]> {
            kept.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, v)| v.as_slice()).collect()
        };
        let one = LineMemoryConfig { min_parts: 1, ..cfg.clone() };
        for (i, loo) in ring.loo.iter().enumerate() {
            let direct = score_against(&kept[i], &all_but(i), &one).unwrap();
            prop_assert!((loo - direct).abs() < 1e-5, "part {}: {} vs {}", i, loo, direct);
        }
        prop_assert!(ring.sims.len() == kept.len() * (kept.len() - 1), "{} cosines kept", ring.sims.len());
    }
}

#[test]
fn the_calibrated_score_is_the_percentile_among_the_lines_own_scores() {
    assert_eq!(percentile(0.3, &[0.1, 0.2, 0.4, 0.5]), 0.5);
    assert_eq!(percentile(0.2, &[0.1, 0.2, 0.4, 0.5]), 0.375);
    assert_eq!(percentile(0.9, &[0.1, 0.2]), 1.0);
    assert_eq!(percentile(0.0, &[0.1, 0.2]), 0.0);
    assert_eq!(percentile(0.3, &[]), 0.5);
    // Two lines whose raw scores differ tenfold: a part as odd as its line's usual parts
    // gets the same calibrated score on both, an odder one more.
    let cfg = LineMemoryConfig {
        size: 16,
        min_parts: 4,
        top_fraction: 1.0,
        ..Default::default()
    };
    let now = Instant::now();
    let m = LineMemory::default();
    let line = |key: &str, spread: f32| {
        for i in 0..12 {
            let a = spread * (i as f32 - 5.5) / 5.5;
            m.remember("p", key, &[vec![1.0, a, 0.0]], &cfg, now);
        }
    };
    line("shiny", 0.05);
    line("textured", 0.5);
    let usual = |spread: f32| vec![vec![1.0, spread * 0.5 / 5.5, 0.0]];
    let shiny = m.assess("p", "shiny", &usual(0.05), &cfg, now).unwrap();
    let textured = m.assess("p", "textured", &usual(0.5), &cfg, now).unwrap();
    assert!(
        textured.raw > 5.0 * shiny.raw,
        "{} vs {}",
        textured.raw,
        shiny.raw
    );
    assert!(
        (shiny.percentile - textured.percentile).abs() < 0.1,
        "{} vs {}",
        shiny.percentile,
        textured.percentile
    );
    assert!(shiny.percentile < 0.5);
    let odd = m
        .assess("p", "shiny", &[vec![1.0, 0.0, 0.3]], &cfg, now)
        .unwrap();
    assert_eq!(odd.percentile, 1.0, "raw {}", odd.raw);
}
