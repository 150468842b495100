//! WinCLIP+ (few-shot) against anomalib: the first tiled fixture image's windows against the
//! next ones' as normal references, all embedded by transformers' CLIPModel (the random tiny
//! model), through the worker's [`ProfileBank::association`], [`AnomalyMap::few_shot`] and
//! [`AnomalyMap::mean_with`], and through anomalib 2.7.0's own `visual_association_score`
//! and `harmonic_aggregation` with `WinClipModel`'s few-shot lines (make_fixtures.py's
//! `winclip_plus_reference`).

use super::{f32s, index, u32s, windows_of};
use crate::common::{fixtures, max_abs_diff, read_f32};
use clipqc::score::bank::{Entry, ProfileBank};
use clipqc::score::{normalized, AnomalyMap};

/// Each window's visual association score, the few-shot map, the fused map and the image
/// score: within 1e-5 of anomalib's.
#[test]
#[ignore = "compares with Python's reference outputs (scripts/test.sh makes them)"]
fn winclip_plus_window_scores_and_maps_are_anomalibs() {
    let index = index();
    let reference = &index["winclip_plus"];
    let images = index["images"].as_array().unwrap();
    let by_stem = |stem: &str| images.iter().find(|i| i["stem"] == stem).unwrap();
    let scales = f32s(&reference["scales"]);
    let embeddings = |img: &serde_json::Value| -> Vec<Vec<f32>> {
        let stem = img["stem"].as_str().unwrap();
        let flat = read_f32(&fixtures().join(format!("ref/{stem}.windows_embedding.f32")));
        let n = windows_of(&img["tiles"]).len();
        flat.chunks(flat.len() / n).map(normalized).collect()
    };
    let mut bank = ProfileBank::default();
    bank.index_by(["defect", "good"].into_iter());
    for stem in reference["references"].as_array().unwrap() {
        let img = by_stem(stem.as_str().unwrap());
        let windows = embeddings(img);
        let entry = Entry {
            id: stem.as_str().unwrap().into(),
            class: 1,
            whole: windows[0].clone(),
            window_scales: windows_of(&img["tiles"])
                .iter()
                .map(|w| scales[w.scale])
                .collect(),
            windows,
            added_at: 0,
            from_feedback: false,
        };
        assert!(bank.insert(entry, 16));
    }
    let test = by_stem(reference["test"].as_str().unwrap());
    let windows = windows_of(&test["tiles"]);
    let ours: Vec<f32> = embeddings(test)
        .iter()
        .zip(&windows)
        .map(|(e, w)| {
            bank.association(e, scales[w.scale], &[false, true])
                .expect("every scale has reference windows")
        })
        .collect();
    let theirs = f32s(&reference["window_vas"]);
    let d = max_abs_diff(&ours, &theirs);
    eprintln!(
        "WinCLIP+ vs anomalib: {} windows against {} references, visual association max |Δ| {d:.2e}",
        windows.len(),
        reference["references"].as_array().unwrap().len()
    );
    assert!(d <= 1e-5, "visual association scores differ by {d}");
    assert!(
        theirs.iter().any(|&v| v > 1e-3),
        "the references are not all identical to the test image's windows"
    );

    let few_shot = AnomalyMap::few_shot(&windows, &ours).unwrap();
    let expected = &reference["few_shot_map"];
    assert_eq!(few_shot.x_edges, u32s(&expected["x_edges"]));
    assert_eq!(few_shot.y_edges, u32s(&expected["y_edges"]));
    let d = max_abs_diff(&few_shot.scores, &f32s(&expected["scores"]));
    eprintln!("few-shot map: {} cells, max |Δ| {d:.2e}", few_shot.scores.len());
    assert!(d <= 1e-5, "the few-shot map differs by {d}");

    let text = f32s(&test["tiles"]["window_scores"]);
    let whole = test["tiles"]["whole_score"].as_f64().unwrap() as f32;
    let image = (whole + few_shot.max()) / 2.0;
    let fused = AnomalyMap::fuse(&windows, &text, whole)
        .unwrap()
        .mean_with(&few_shot);
    let d = max_abs_diff(&fused.scores, &f32s(&reference["anomaly_map"]["scores"]));
    eprintln!("fused map: max |Δ| {d:.2e}");
    assert!(d <= 1e-5, "the fused WinCLIP+ map differs by {d}");
    let expected = reference["image_score"].as_f64().unwrap() as f32;
    assert!(
        (image - expected).abs() <= 1e-5,
        "image score {image} vs anomalib's {expected}"
    );
}
