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
    apply_up_to(bank, key, x, 2)
}

fn apply_up_to(
    bank: &mut Bank,
    key: &str,
    x: Option<Exemplar>,
    max_per_profile: usize,
) -> Result<(), ExemplarError> {
    let limits = ExemplarSettings {
        max_per_profile,
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

/// Tip-Adapter's cache term, `Σ exp(−β (1 − A))` per class, computed by hand, over each
/// class's `k` nearest exemplars (`k` the smallest count of a class with exemplars).
#[test]
fn affinity_is_tip_adapters_cache_term_over_each_class_k_nearest() {
    let mut bank = Bank::default();
    let s = std::f32::consts::FRAC_1_SQRT_2;
    for (id, v) in [
        ("g1", vec![1.0, 0.0, 0.0]),
        ("g2", vec![s, s, 0.0]),
        ("g3", vec![0.0, 0.0, 1.0]),
    ] {
        apply_up_to(
            &mut bank,
            &format!("brackets/{id}"),
            Some(exemplar(id, "good", v)),
            10,
        )
        .unwrap();
    }
    apply_up_to(
        &mut bank,
        "brackets/s",
        Some(exemplar("s", "surface_scratch", vec![0.0, 1.0, 0.0])),
        10,
    )
    .unwrap();
    let b = bank.profile("brackets").unwrap();
    let beta = 5.5f32;
    let a = b.affinity(&[1.0, 0.0, 0.0], 2, beta);
    // k = 1 (scratch has one): good's nearest is g1 (cosine 1), scratch's cosine is 0.
    assert!((a.per_class[1] - 1.0).abs() < 1e-6, "{a:?}");
    assert!((a.per_class[0] - (-beta).exp()).abs() < 1e-6);
    assert_eq!(a.nearest, Some((0, 1.0)));
    // A second scratch makes k = 2: good sums g1 and g2 (cosine 1/√2).
    apply_up_to(
        &mut bank,
        "brackets/s2",
        Some(exemplar("s2", "surface_scratch", vec![s, 0.0, s])),
        10,
    )
    .unwrap();
    let b = bank.profile("brackets").unwrap();
    let a = b.affinity(&[1.0, 0.0, 0.0], 2, beta);
    let e = |cos: f32| (-beta * (1.0 - cos)).exp();
    assert!((a.per_class[1] - (e(1.0) + e(s))).abs() < 1e-5, "{a:?}");
    assert!((a.per_class[0] - (e(0.0) + e(s))).abs() < 1e-5, "{a:?}");
    assert_eq!(id_of(b"abc").len(), 16);
}

/// WinCLIP+'s visual association score: the least `(1 − cos) / 2` to a normal reference's
/// window of the same scale; defect exemplars' windows never count, nor other scales'.
#[test]
fn association_is_the_least_distance_to_normal_windows_of_the_scale() {
    let mut bank = Bank::default();
    let mut good = exemplar("g", "good", vec![1.0, 0.0, 0.0]);
    good.window_embeddings = vec![0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
    good.window_scales = vec![0.5, 0.25];
    apply(&mut bank, "brackets/g", Some(good)).unwrap();
    let mut scratch = exemplar("s", "surface_scratch", vec![0.0, 1.0, 0.0]);
    scratch.window_embeddings = vec![0.0, 0.0, 1.0];
    scratch.window_scales = vec![0.5];
    apply(&mut bank, "brackets/s", Some(scratch)).unwrap();
    let b = bank.profile("brackets").unwrap();
    let acceptable = [false, true];
    // At scale 0.5 the good window is y: a z window is at cosine 0 → 0.5 (the scratch's z
    // window, a defect's, does not count).
    assert_eq!(b.association(&[0.0, 0.0, 1.0], 0.5, &acceptable), Some(0.5));
    assert_eq!(b.association(&[0.0, 1.0, 0.0], 0.5, &acceptable), Some(0.0));
    // At scale 0.25 the good window is z.
    assert_eq!(
        b.association(&[0.0, 0.0, 1.0], 0.25, &acceptable),
        Some(0.0)
    );
    assert_eq!(b.association(&[0.0, 0.0, 1.0], 1.0, &acceptable), None);
    // Mismatched scales are refused, naming the exemplar.
    let mut bad = exemplar("b", "good", vec![1.0, 0.0, 0.0]);
    bad.window_embeddings = vec![0.0, 1.0, 0.0];
    bad.window_scales = vec![0.5, 0.25];
    let err = apply(&mut bank, "brackets/b", Some(bad)).unwrap_err();
    assert!(
        err.to_string().contains("2 window scales for 1 windows"),
        "{err}"
    );
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

mod adapters {
    use super::*;
    use crate::exemplars::adapters::AdapterError;
    use crate::proto::v1::Adapter as AdapterRecord;

    fn record() -> AdapterRecord {
        AdapterRecord {
            profile: "brackets".into(),
            version: "v1".into(),
            model_hash: "m1".into(),
            classes: profiles()["brackets"]
                .classes
                .iter()
                .map(|c| c.name.clone())
                .collect(),
            dim: 3,
            keys: vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            key_classes: vec![1, 0],
            alpha: 2.0,
            beta: 5.5,
            ..Default::default()
        }
    }

    fn apply_adapter(bank: &mut Bank, x: Option<AdapterRecord>) -> Result<(), AdapterError> {
        bank.apply_adapter("brackets", x, &profiles(), "m1", 3)
    }

    /// An adapter is used only by a worker serving its model and a profile with its class
    /// list; any other is refused with its reason and the profile keeps what it had.
    #[test]
    fn adapters_of_another_model_or_class_list_are_skipped_and_the_old_one_kept() {
        let mut bank = Bank::default();
        apply_adapter(&mut bank, Some(record())).unwrap();
        let version = |b: &Bank| {
            b.profile("brackets")
                .and_then(|p| p.adapter())
                .map(|a| a.version.clone())
        };
        assert_eq!(version(&bank).as_deref(), Some("v1"));
        // The cache term uses its keys and its own alpha: a view along x is nearest key 0 (good).
        let p = bank.profile("brackets").unwrap();
        let a = p.cache_logits(&[1.0, 0.0, 0.0], 2, 1.0, 5.5);
        assert!((a.per_class[1] - 2.0).abs() < 1e-6, "{a:?}");
        assert!(
            (a.per_class[0] - 2.0 * (-5.5f32).exp()).abs() < 1e-6,
            "{a:?}"
        );

        let refused = |x: AdapterRecord| {
            let mut b = bank.clone();
            let err = apply_adapter(
                &mut b,
                Some(AdapterRecord {
                    version: "v2".into(),
                    ..x
                }),
            )
            .unwrap_err();
            assert_eq!(
                version(&b).as_deref(),
                Some("v1"),
                "{err}: the old adapter stays"
            );
            err
        };
        let e = refused(AdapterRecord {
            model_hash: "m2".into(),
            ..record()
        });
        assert_eq!(e.reason(), "other_model");
        assert!(e.to_string().contains("m2"), "{e}");
        let e = refused(AdapterRecord {
            classes: vec!["good".into(), "surface_scratch".into()],
            ..record()
        });
        assert_eq!(e.reason(), "other_classes");
        let e = refused(AdapterRecord {
            keys: vec![1.0; 5],
            ..record()
        });
        assert_eq!(e.reason(), "malformed");
        let e = refused(AdapterRecord {
            key_classes: vec![1, 7],
            ..record()
        });
        assert_eq!(e.reason(), "malformed");
        let e = refused(AdapterRecord {
            alpha: f32::NAN,
            ..record()
        });
        assert_eq!(e.reason(), "malformed");
        let e = refused(AdapterRecord {
            profile: "other".into(),
            ..record()
        });
        assert_eq!(e.reason(), "malformed", "its key is not its profile");
        let mut b = bank.clone();
        let e = b
            .apply_adapter(
                "other",
                Some(AdapterRecord {
                    profile: "other".into(),
                    ..record()
                }),
                &profiles(),
                "m1",
                3,
            )
            .unwrap_err();
        assert_eq!(e.reason(), "unknown_profile");
        for r in [
            "unknown_profile",
            "other_model",
            "other_classes",
            "malformed",
        ] {
            assert!(crate::metrics::ADAPTER_SKIP_REASONS.contains(&r));
        }

        // A tombstone removes it; the bank is then zero-shot again.
        apply_adapter(&mut bank, None).unwrap();
        assert_eq!(version(&bank), None);
        assert!(bank.profile("brackets").is_none());
    }
}
