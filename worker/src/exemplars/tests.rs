use super::*;
use crate::score::ClassConfig;

fn profiles() -> HashMap<String, ProfileConfig> {
    let mut p = ProfileConfig::builtin_default();
    p.classes.truncate(1);
    p.classes.push(ClassConfig {
        name: "good".into(),
        label: None,
        prompts: vec!["a good part".into()],
        defect: false,
        threshold: None,
    });
    [("brackets".to_string(), p)].into()
}

fn exemplar(id: &str, class: &str, embedding: Vec<f32>) -> Exemplar {
    Exemplar {
        id: id.into(),
        profile: "brackets".into(),
        class: class.into(),
        dim: embedding.len() as u32,
        embedding,
        model_hash: "m1".into(),
        ..Default::default()
    }
}

fn apply(bank: &mut Bank, key: &str, x: Option<Exemplar>) -> Result<(), ExemplarError> {
    let limits = ExemplarSettings {
        max_per_profile: 2,
        ..Default::default()
    };
    bank.apply(key, x, &profiles(), "m1", 3, &limits)
}

#[test]
fn adds_replaces_and_removes_by_key() {
    let mut bank = Bank::default();
    assert!(bank.profile("brackets").is_none(), "empty: no bank");
    apply(
        &mut bank,
        "brackets/a",
        Some(exemplar("a", "good", vec![3.0, 0.0, 4.0])),
    )
    .unwrap();
    let b = bank.profile("brackets").unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(b.entry(0).whole, [0.6, 0.0, 0.8], "stored as a unit vector");
    assert_eq!(b.entry(0).class, 1);
    // The same key again replaces (re-reading the topic is idempotent).
    apply(
        &mut bank,
        "brackets/a",
        Some(exemplar("a", "surface_scratch", vec![1.0, 0.0, 0.0])),
    )
    .unwrap();
    assert_eq!(bank.profile("brackets").unwrap().len(), 1);
    assert_eq!(bank.profile("brackets").unwrap().entry(0).class, 0);
    apply(&mut bank, "brackets/a", None).unwrap();
    assert!(bank.profile("brackets").is_none(), "a tombstone removes it");
}

/// The metrics own the `reason` label's values (and start each at 0): every refusal is one.
#[test]
fn every_reason_is_in_the_metrics_vocabulary() {
    let (key, profile) = (String::new(), String::new());
    let errors = [
        ExemplarError::UnknownProfile {
            key: key.clone(),
            profile: profile.clone(),
        },
        ExemplarError::UnknownClass {
            key: key.clone(),
            profile: profile.clone(),
            class: String::new(),
        },
        ExemplarError::OtherModel {
            key: key.clone(),
            got: String::new(),
            expected: String::new(),
        },
        ExemplarError::Malformed {
            key: key.clone(),
            message: String::new(),
        },
        ExemplarError::Full {
            key: key.clone(),
            profile: profile.clone(),
            max: 1,
        },
        ExemplarError::OverBytes {
            key,
            profile,
            max_bytes: 1,
        },
    ];
    let reasons: Vec<&str> = errors.iter().map(ExemplarError::reason).collect();
    assert_eq!(reasons, crate::metrics::EXEMPLAR_SKIP_REASONS);
}

#[test]
fn refusals_name_the_exemplar_and_the_reason() {
    let mut bank = Bank::default();
    let err = |key: &str, x: Exemplar| {
        let mut bank = Bank::default();
        apply(&mut bank, key, Some(x)).unwrap_err()
    };
    let mut other = exemplar("a", "good", vec![1.0, 0.0, 0.0]);
    other.model_hash = "m2".into();
    assert_eq!(err("brackets/a", other).reason(), "other_model");
    let mut unknown = exemplar("a", "good", vec![1.0, 0.0, 0.0]);
    unknown.profile = "housings".into();
    assert_eq!(err("housings/a", unknown).reason(), "unknown_profile");
    let e = err("brackets/a", exemplar("a", "dent", vec![1.0, 0.0, 0.0]));
    assert_eq!(e.reason(), "unknown_class");
    assert!(e.to_string().contains("\"dent\""), "{e}");
    let e = err("brackets/a", exemplar("a", "good", vec![1.0, 0.0]));
    assert!(e.to_string().contains("the model's have 3"), "{e}");
    assert_eq!(
        err("brackets/b", exemplar("a", "good", vec![1.0, 0.0, 0.0])).reason(),
        "malformed",
        "key and id disagree"
    );
    let mut nan = exemplar("a", "good", vec![1.0, 0.0, 0.0]);
    nan.window_embeddings = vec![f32::NAN, 0.0, 0.0];
    assert_eq!(err("brackets/a", nan).reason(), "malformed");
    // The bound: two per profile here.
    for id in ["a", "b"] {
        apply(
            &mut bank,
            &format!("brackets/{id}"),
            Some(exemplar(id, "good", vec![1.0, 0.0, 0.0])),
        )
        .unwrap();
    }
    let full = apply(
        &mut bank,
        "brackets/c",
        Some(exemplar("c", "good", vec![1.0, 0.0, 0.0])),
    )
    .unwrap_err();
    assert!(
        full.to_string().contains("exemplars.max_per_profile"),
        "{full}"
    );
    assert_eq!(
        bank.profile("brackets").unwrap().len(),
        2,
        "nothing past the bound"
    );
}

#[test]
fn affinity_is_the_nearest_exemplar_per_class() {
    let mut bank = Bank::default();
    apply(
        &mut bank,
        "brackets/g",
        Some(exemplar("g", "good", vec![1.0, 0.0, 0.0])),
    )
    .unwrap();
    let mut scratch = exemplar("s", "surface_scratch", vec![0.0, 1.0, 0.0]);
    scratch.window_embeddings = vec![0.0, 0.0, 1.0, 0.0, 1.0, 0.0];
    apply(&mut bank, "brackets/s", Some(scratch)).unwrap();
    let b = bank.profile("brackets").unwrap();
    let a = b.affinity(&[1.0, 0.0, 0.0], false, 2, 5.5);
    // good: cosine 1 → exp(0) = 1; scratch: cosine 0 → exp(−5.5).
    assert!((a.per_class[1] - 1.0).abs() < 1e-6);
    assert!((a.per_class[0] - (-5.5f32).exp()).abs() < 1e-6);
    assert_eq!(a.nearest, Some((0, 1.0)));
    // A window is compared with the exemplars' windows (the good one has none: its whole).
    let w = b.affinity(&[0.0, 0.0, 1.0], true, 2, 5.5);
    assert!((w.per_class[0] - 1.0).abs() < 1e-6, "{w:?}");
    assert_eq!(w.nearest, Some((1, 1.0)));
    assert_eq!(id_of(b"abc").len(), 16);
}

/// A bank is bounded in bytes as well as in entries: exemplars carrying many windows are
/// refused once the profile's embeddings would pass `max_bytes_per_profile` (a replacement
/// counts its new size, not both), one with over `MAX_WINDOWS` windows is malformed; and a
/// snapshot of the bank shares the entries instead of copying their embeddings.
#[test]
fn the_bank_is_bounded_in_bytes_and_its_snapshots_share_the_embeddings() {
    let limits = ExemplarSettings {
        max_per_profile: 1000,
        max_bytes_per_profile: 100_000,
        ..Default::default()
    };
    let windowed = |id: &str, windows: usize| Exemplar {
        window_embeddings: vec![1.0; 3 * windows],
        ..exemplar(id, "good", vec![1.0, 0.0, 0.0])
    };
    let mut bank = Bank::default();
    let apply = |bank: &mut Bank, x: Exemplar| {
        let key = format!("brackets/{}", x.id);
        bank.apply(&key, Some(x), &profiles(), "m1", 3, &limits)
    };
    // (1 + 4000) × 3 floats × 4 bytes + 200 = 48 KiB each: two fit, a third does not.
    apply(&mut bank, windowed("a", 4000)).unwrap();
    apply(&mut bank, windowed("b", 4000)).unwrap();
    let err = apply(&mut bank, windowed("c", 4000)).unwrap_err();
    assert_eq!(err.reason(), "over_bytes");
    assert!(
        err.to_string().contains("exemplars.max_bytes_per_profile"),
        "{err}"
    );
    // Replacing one with a smaller one fits (its old size is given back).
    apply(&mut bank, windowed("b", 10)).unwrap();
    apply(&mut bank, windowed("c", 4000)).unwrap();
    assert_eq!(bank.profile("brackets").unwrap().len(), 3);
    assert!(bank.profile("brackets").unwrap().bytes() <= 100_000);
    let err = apply(&mut bank, windowed("d", MAX_WINDOWS + 1)).unwrap_err();
    assert_eq!(err.reason(), "malformed");
    // A snapshot (what the follower publishes at each change) points at the same entries.
    let snapshot = bank.clone();
    let (held, shared) = (
        bank.profile("brackets").unwrap().entries(),
        snapshot.profile("brackets").unwrap().entries(),
    );
    assert!(held
        .iter()
        .zip(shared)
        .all(|(a, b)| std::sync::Arc::ptr_eq(a, b)));
}
