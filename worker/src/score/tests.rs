use super::*;

fn profile(classes: &[(&str, bool, Option<f32>)]) -> ProfileConfig {
    ProfileConfig {
        templates: vec!["{}".into()],
        review_threshold: 0.5,
        clahe: None,
        view: Default::default(),
        tiles: None,
        states: None,
        exemplars: Default::default(),
        feedback: Default::default(),
        line_memory: None,
        segment: false,
        min_area_mm2: None,
        min_area_pixels: None,
        below_min_area: Default::default(),
        classes: classes
            .iter()
            .map(|(n, d, t)| ClassConfig {
                name: n.to_string(),
                label: None,
                prompts: vec![n.to_string()],
                defect: *d,
                threshold: *t,
            })
            .collect(),
    }
}

fn scorer(class_embeddings: Vec<Vec<f32>>, scoring: Scoring, scale: f32, bias: f32) -> Scorer {
    let names: Vec<(&str, bool, Option<f32>)> =
        vec![("scratch", true, None), ("good", false, None)];
    Scorer {
        name: "t".into(),
        profile: profile(&names[..class_embeddings.len()]),
        class_embeddings,
        states: None,
        scoring,
        logit_scale: scale,
        logit_bias: bias,
    }
}

#[test]
fn softmax_of_scaled_cosines_matches_hand_computation() {
    // image (3,4) → unit (0.6, 0.8); classes e1 and e2: cosines 0.6 and 0.8.
    let s = scorer(
        vec![vec![1.0, 0.0], vec![0.0, 1.0]],
        Scoring::Softmax,
        10.0,
        0.0,
    );
    let p = s.probabilities(&[3.0, 4.0]);
    // softmax(6, 8) = (1/(1+e^2), e^2/(1+e^2)) = (0.119203, 0.880797)
    assert!((p[0] - 0.119_203).abs() < 1e-5, "{p:?}");
    assert!((p[1] - 0.880_797).abs() < 1e-5, "{p:?}");
}

#[test]
fn sigmoid_scoring_uses_the_bias_and_does_not_sum_to_one() {
    let s = scorer(
        vec![vec![1.0, 0.0], vec![0.0, 1.0]],
        Scoring::Sigmoid,
        10.0,
        -7.0,
    );
    let p = s.probabilities(&[3.0, 4.0]);
    // sigmoid(6 - 7) = 0.268941, sigmoid(8 - 7) = 0.731059
    assert!((p[0] - 0.268_941).abs() < 1e-5, "{p:?}");
    assert!((p[1] - 0.731_059).abs() < 1e-5, "{p:?}");
}

#[test]
fn outcomes_follow_the_rules() {
    let p = profile(&[
        ("scratch", true, None),
        ("chip", true, Some(0.3)),
        ("good", false, None),
    ]);
    // Top is good and confident: PASS.
    assert_eq!(decide(&p, vec![0.1, 0.1, 0.8]).outcome, Outcome::Pass);
    // Top is a defect without threshold and confident: DEFECT on it.
    let d = decide(&p, vec![0.7, 0.1, 0.2]);
    assert_eq!((d.outcome, d.class), (Outcome::Defect, 0));
    // Chip reaches its threshold though good is top: DEFECT on chip.
    let d = decide(&p, vec![0.05, 0.35, 0.6]);
    assert_eq!(
        (d.outcome, d.class, d.probability),
        (Outcome::Defect, 1, 0.35)
    );
    // Good is the top class, but 60 % of the mass is on defects: DEFECT on the top defect.
    let d = decide(&p, vec![0.4, 0.2, 0.4 + 1e-3]);
    assert_eq!((d.outcome, d.class), (Outcome::Defect, 0));
    assert!((d.anomaly_score - 0.6).abs() < 1e-6);
    // The defect side wins through chip, whose threshold it does not reach: REVIEW.
    let d = decide(&p, vec![0.25, 0.29, 0.46]);
    assert_eq!((d.outcome, d.class), (Outcome::Review, 1));
    // Neither side sure enough: REVIEW on the winning side's top class.
    let mut doubtful = p.clone();
    doubtful.review_threshold = 0.6;
    let d = decide(&doubtful, vec![0.25, 0.2, 0.55]);
    assert_eq!((d.outcome, d.class), (Outcome::Review, 2));
}

/// The flaw the defect probability fixes: a part 80 % likely defective, its mass split over
/// three defect sub-classes, was judged by its top class alone (PASS or REVIEW). However a
/// defect's mass is split, the part is judged by the mass.
#[test]
fn splitting_a_defect_into_sub_classes_never_makes_a_part_pass() {
    let p = profile(&[
        ("scratch_fine", true, None),
        ("scratch_deep", true, None),
        ("dent", true, None),
        ("good", false, None),
    ]);
    let d = decide(&p, vec![0.3, 0.3, 0.2, 0.2]);
    assert_eq!((d.outcome, d.class), (Outcome::Defect, 0));
    assert!((d.anomaly_score - 0.8).abs() < 1e-6);
    // Any split of the same 0.8 over the three: the same outcome and score.
    for split in [
        [0.8, 0.0, 0.0],
        [0.4, 0.2, 0.2],
        [0.27, 0.27, 0.26],
        [0.0, 0.1, 0.7],
    ] {
        let mut probs = split.to_vec();
        probs.push(0.2);
        let d = decide(&p, probs);
        assert_eq!(d.outcome, Outcome::Defect, "{split:?}");
        assert!((d.anomaly_score - 0.8).abs() < 1e-5, "{split:?}");
    }
    // One coarse class with the same mass decides the same way.
    let coarse = profile(&[("scratch", true, None), ("good", false, None)]);
    assert_eq!(decide(&coarse, vec![0.8, 0.2]).outcome, Outcome::Defect);
}

#[test]
fn independent_sigmoid_scores_take_the_most_probable_class_of_each_side() {
    let p = profile(&[
        ("scratch", true, None),
        ("dent", true, None),
        ("good", false, None),
    ]);
    // Independent probabilities do not split: the defect side is as sure as its surest class.
    let d = decide_as(&p, Scoring::Sigmoid, vec![0.7, 0.6, 0.3]);
    assert_eq!(
        (d.outcome, d.class, d.anomaly_score),
        (Outcome::Defect, 0, 0.7)
    );
    let d = decide_as(&p, Scoring::Sigmoid, vec![0.1, 0.2, 0.9]);
    assert_eq!(
        (d.outcome, d.class, d.anomaly_score),
        (Outcome::Pass, 2, 0.2)
    );
    // Nothing above the review threshold (0.5): REVIEW, as with the top class before.
    let d = decide_as(&p, Scoring::Sigmoid, vec![0.1, 0.2, 0.3]);
    assert_eq!((d.outcome, d.class), (Outcome::Review, 2));
}

#[test]
fn prompt_ensembles_average_unit_vectors() {
    // Two prompts along x and y average to the diagonal.
    let mut calls = 0;
    let manifest_json = r#"{"format_version":1,"name":"m","family":"clip","source_checkpoint":"s","embedding_dim":2,
        "image":{"size":224,"resize":"shortest_edge","resize_size":224,"interpolation":"bicubic","rescale_factor":0.0039,
        "mean":[0,0,0],"std":[1,1,1]},"text":{"context_length":77,"pad_token_id":0,"inputs":["input_ids"]},
        "scoring":"softmax","logit_scale":100.0,"logit_bias":null,"files":{}}"#;
    let manifest: Manifest = serde_json::from_str(manifest_json).unwrap();
    let tokenizer = crate::model::tokenizer::tests::word_tokenizer();
    let mut p = profile(&[("a", true, None), ("b", false, None)]);
    p.classes[0].prompts = vec!["x".into(), "y".into()];
    p.classes[1].prompts = vec!["x".into()];
    let s = Scorer::build("t", &p, &manifest, &tokenizer, |batch| {
        calls += 1;
        assert_eq!(batch.n, 3, "all prompts in one batch");
        Ok(Embeddings {
            data: vec![2.0, 0.0, 0.0, 5.0, 1.0, 0.0],
            n: 3,
            dim: 2,
        })
    })
    .unwrap();
    assert_eq!(calls, 1);
    let h = std::f32::consts::FRAC_1_SQRT_2;
    assert!(
        (s.class_embeddings[0][0] - h).abs() < 1e-6 && (s.class_embeddings[0][1] - h).abs() < 1e-6
    );
    assert_eq!(s.class_embeddings[1], vec![1.0, 0.0]);
}

#[test]
fn state_prompts_go_through_every_template_with_the_object() {
    let mut p = profile(&[("scratch", true, None), ("good", false, None)]);
    p.templates = vec!["a photo of a {}.".into(), "{}".into()];
    let states = StatesConfig {
        object: "steel bracket".into(),
        normal: vec!["flawless {}".into()],
        anomalous: vec!["damaged {}".into(), "{} with a flaw".into()],
        weight: 0.5,
    };
    assert_eq!(
        p.state_prompts(&states),
        [
            vec![
                "a photo of a flawless steel bracket.",
                "flawless steel bracket"
            ],
            vec![
                "a photo of a damaged steel bracket.",
                "a photo of a steel bracket with a flaw.",
                "damaged steel bracket",
                "steel bracket with a flaw",
            ],
        ]
        .map(|v| v.into_iter().map(String::from).collect::<Vec<_>>())
    );
    let mut bad = states.clone();
    bad.anomalous = vec!["no placeholder".into()];
    p.states = Some(bad);
    let err = p.validate("x").unwrap_err().to_string();
    assert!(err.contains("states.anomalous"), "{err}");
    let mut bad = states;
    bad.weight = 1.5;
    p.states = Some(bad);
    assert!(p
        .validate("x")
        .unwrap_err()
        .to_string()
        .contains("states.weight"));
}

#[test]
fn the_states_blend_into_the_anomaly_score_by_their_weight() {
    // Classes: scratch along x, good along y. States: normal along y, anomalous along z.
    let mut s = scorer(
        vec![vec![1.0, 0.0, 0.0], vec![0.0, 1.0, 0.0]],
        Scoring::Softmax,
        100.0,
        0.0,
    );
    let image = [0.0, 0.6, 0.8]; // good by the classes, anomalous by the states
    let classes_only = s.decide(&image);
    assert_eq!(classes_only.outcome, Outcome::Pass);
    assert!(classes_only.anomaly_score < 1e-6);
    let prototypes = [vec![0.0, 1.0, 0.0], vec![0.0, 0.0, 1.0]];
    // softmax(100 × [0.6, 0.8])[1] = 1 / (1 + e^-20).
    let state = 1.0 / (1.0 + (-20f32).exp());
    for weight in [0.0, 0.5, 1.0] {
        s.states = Some((prototypes.clone(), weight));
        let v = s.view(&image);
        assert!(
            (v.anomaly - weight * state).abs() < 1e-5,
            "weight {weight}: {}",
            v.anomaly
        );
        assert!((v.anomaly + v.acceptable - 1.0).abs() < 1e-5);
        assert_eq!(
            v.probabilities, classes_only.probabilities,
            "classes unchanged"
        );
    }
    // By the states alone the part is a defect: the most probable defect class is named.
    assert_eq!(s.decide(&image).outcome, Outcome::Defect);
    assert_eq!(s.decide(&image).class, 0);
}

fn bank_with(entries: &[(&str, &str, Vec<f32>)]) -> crate::exemplars::ProfileBank {
    let profiles: std::collections::HashMap<String, ProfileConfig> = [(
        "t".to_string(),
        profile(&[("scratch", true, None), ("good", false, None)]),
    )]
    .into();
    let mut bank = crate::exemplars::Bank::default();
    for (id, class, e) in entries {
        let x = crate::proto::v1::Exemplar {
            id: id.to_string(),
            profile: "t".into(),
            class: class.to_string(),
            dim: e.len() as u32,
            embedding: e.clone(),
            model_hash: "m".into(),
            ..Default::default()
        };
        bank.apply(
            &format!("t/{id}"),
            Some(x),
            &profiles,
            "m",
            e.len(),
            &Default::default(),
        )
        .unwrap();
    }
    bank.profile("t").cloned().unwrap_or_default()
}

#[test]
fn an_empty_bank_is_the_zero_shot_verdict_bit_for_bit() {
    let s = scorer(
        vec![vec![1.0, 0.0], vec![0.0, 1.0]],
        Scoring::Softmax,
        100.0,
        0.0,
    );
    let image = vec![0.6, 0.8];
    let empty = crate::exemplars::ProfileBank::default();
    let zero_shot = s.decide_views(std::slice::from_ref(&image), &[], (0, 0));
    let with_empty = s.decide_views_with(std::slice::from_ref(&image), &[], (0, 0), Some(&empty));
    assert_eq!(zero_shot, with_empty);
    assert_eq!(zero_shot.nearest, None);
}

#[test]
fn exemplars_add_their_affinity_to_the_logits_as_hand_computed() {
    // Classes scratch (x) and good (y); the image is nearer scratch by the prompts alone.
    let s = scorer(
        vec![vec![1.0, 0.0], vec![0.0, 1.0]],
        Scoring::Softmax,
        10.0,
        0.0,
    );
    let image = vec![0.8, 0.6];
    let before = s.decide(&image);
    // softmax(10 × [0.8, 0.6]) = [1, e^-2] / (1 + e^-2).
    assert!((before.anomaly_score - 1.0 / (1.0 + (-2f32).exp())).abs() < 1e-6);
    // A nominal exemplar identical to the image: good gains alpha × exp(0) = 1 (alpha 1).
    let bank = bank_with(&[
        ("g1", "good", image.clone()),
        ("s1", "scratch", vec![1.0, -1.0]),
    ]);
    let after = s.decide_views_with(std::slice::from_ref(&image), &[], (0, 0), Some(&bank));
    // scratch's nearest exemplar has cosine 0.8·0.707 − 0.6·0.707 = 0.1414.
    let a_scratch = (-5.5f32 * (1.0 - 0.2f32 / 2f32.sqrt())).exp();
    let logits = [8.0 + a_scratch, 6.0 + 1.0];
    let expected = 1.0 / (1.0 + (logits[1] - logits[0]).exp());
    assert!(
        (after.anomaly_score - expected).abs() < 1e-5,
        "{} vs {expected}",
        after.anomaly_score
    );
    assert!(
        after.anomaly_score < before.anomaly_score,
        "a look-alike nominal part lowers it"
    );
    let nearest = after.nearest.unwrap();
    assert_eq!((nearest.id.as_str(), nearest.class), ("g1", 1));
    assert!(
        (nearest.similarity - 1.0).abs() < 1e-6,
        "the same image: similarity 1"
    );
}

#[test]
fn a_weighted_line_memory_score_moves_the_outcome() {
    let mut s = scorer(
        vec![vec![1.0, 0.0], vec![0.0, 1.0]],
        Scoring::Softmax,
        10.0,
        0.0,
    );
    let image = [0.0, 1.0]; // good by the prompts
    let d = s.decide(&image);
    assert_eq!(d.outcome, Outcome::Pass);
    // Reported only (weight 0): same outcome, the score recorded.
    s.profile.line_memory = Some(line_memory::LineMemoryConfig::default());
    let reported = s.with_line_memory(d.clone(), 0.9);
    assert_eq!(reported.outcome, Outcome::Pass);
    assert_eq!(reported.anomaly_score, d.anomaly_score);
    assert_eq!(reported.line_memory_score, Some(0.9));
    // Weight 0.8: anomaly 0.2 × a + 0.8 × 0.9 ≥ 0.72: the part stands out from its line.
    s.profile.line_memory.as_mut().unwrap().weight = 0.8;
    let blended = s.with_line_memory(d.clone(), 0.9);
    let expected = 0.2 * d.anomaly_score + 0.8 * 0.9;
    assert!((blended.anomaly_score - expected).abs() < 1e-6);
    assert_eq!(blended.outcome, Outcome::Defect);
}

#[test]
fn bad_tiles_and_line_memory_are_refused_as_their_own_errors() {
    let mut p = ProfileConfig::builtin_default();
    p.tiles = Some(serde_json::from_value(serde_json::json!({"scales": []})).unwrap());
    let err = p.validate("x").unwrap_err();
    assert!(
        matches!(
            &err,
            ScoreError::Tiles {
                source: crate::preprocess::TileError::NoScales,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("profile \"x\" tiles.scales is empty"),
        "{err}"
    );
    p.tiles = None;
    p.line_memory = Some(line_memory::LineMemoryConfig {
        weight: 2.0,
        ..Default::default()
    });
    let err = p.validate("x").unwrap_err();
    assert!(
        matches!(
            &err,
            ScoreError::LineMemory {
                source: line_memory::LineMemoryError::Weight { .. },
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "profile \"x\" line_memory.weight 2 is not within [0, 1]"
    );
}
