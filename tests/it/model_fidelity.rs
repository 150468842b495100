//! Fidelity against the reference implementations, on the same random tiny CLIP:
//! token ids vs transformers' CLIPTokenizer and open_clip's tokenizer, pixels vs
//! CLIPImageProcessor (`view = "center_crop"`) and vs the same resize pasted centred on a
//! mean-colour square with PIL (`view = "pad"`, the default), image embeddings and class
//! probabilities vs transformers' CLIPModel under both views; and a tiled profile's window
//! geometry, window pixels and embeddings, aggregated scores, heatmap and fused map vs the same
//! windows cut and resized with PIL and scored by CLIPModel; the fused map alone vs anomalib's
//! WinCLIP aggregation of the same scores; WinCLIP+'s few-shot scores and maps vs anomalib's
//! (model_fidelity/winclip_plus.rs).
//! The references were computed by tests/reference/make_fixtures.py. Segment Anything's
//! masks against transformers' SAM: model_fidelity/sam.rs.

use crate::common;
#[path = "model_fidelity/device.rs"]
mod device;
#[path = "model_fidelity/sam.rs"]
mod sam;
#[path = "model_fidelity/winclip_plus.rs"]
mod winclip_plus;

use clipqc::config::PreprocessSettings;
use clipqc::model::artifact::TOKENIZER;
use clipqc::model::tch_backend::TchBackend;
use clipqc::model::{Artifact, Backend, DeviceSpec, ImageBatch, PromptTokenizer};
use clipqc::preprocess::{pad_dims, DecodeLimits, Preprocessor, View, Window};
use clipqc::score::{AnomalyMap, ProfileConfig, Scorer};
use common::{cosine, fixtures, max_abs_diff, read_f32, tiny_model};

pub(crate) fn index() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("fixtures.json")).unwrap())
        .unwrap()
}

fn artifact() -> Artifact {
    Artifact::open(tiny_model()).expect("the tiny model exported by the test script opens")
}

fn preprocessor(artifact: &Artifact, view: View) -> Preprocessor {
    Preprocessor::new(&artifact.manifest.image, DecodeLimits::default(), None).with_view(view)
}

#[test]
#[ignore = "compares with Python's reference outputs (scripts/test.sh makes them)"]
fn token_ids_match_clip_tokenizers() {
    let artifact = artifact();
    let tok = PromptTokenizer::load(&artifact.path(TOKENIZER), &artifact.manifest.text).unwrap();
    let text = std::fs::read_to_string(fixtures().join("tokens.jsonl")).unwrap();
    let (mut cases, mut hf_equal, mut oc_checked, mut oc_equal) = (0, 0, 0, 0);
    let mut longer_than_context = 0;
    for line in text.lines() {
        let case: serde_json::Value = serde_json::from_str(line).unwrap();
        let s = case["text"].as_str().unwrap();
        let ids = tok.encode_truncated(s).unwrap();
        let ids_of = |k: &str| -> Vec<i64> {
            case[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect()
        };
        cases += 1;
        longer_than_context += usize::from(tok.encode(s).is_err());
        assert_eq!(
            ids,
            ids_of("hf"),
            "transformers' CLIPTokenizer disagrees on {s:?}"
        );
        hf_equal += 1;
        if !case["ftfy_rewrites"].as_bool().unwrap() {
            oc_checked += 1;
            assert_eq!(
                ids,
                ids_of("open_clip"),
                "open_clip's tokenizer disagrees on {s:?}"
            );
            oc_equal += 1;
        }
    }
    eprintln!(
        "tokens: {hf_equal}/{cases} identical to transformers; {oc_equal}/{oc_checked} identical to open_clip \
         (the other {} are strings open_clip first rewrites with ftfy); {longer_than_context} longer than the context",
        cases - oc_checked
    );
    assert!(cases >= 1000, "only {cases} token cases");
    assert!(
        longer_than_context >= 50,
        "the long-string cases did not exceed the context"
    );
}

#[test]
#[ignore = "compares with Python's reference outputs (scripts/test.sh makes them)"]
fn pixels_and_embeddings_match_clip_image_processor_and_model() {
    let artifact = artifact();
    // The checkpoint's own processor: its resize and center crop.
    let pre = preprocessor(&artifact, View::CenterCrop);
    let mut backend = TchBackend::load(&artifact, DeviceSpec::Cpu).unwrap();
    let (mut worst_pil, mut worst_tv, mut worst_cos) = (0f32, 0f32, 1f64);
    for img in index()["images"].as_array().unwrap() {
        let stem = img["stem"].as_str().unwrap();
        let file = fixtures().join(img["file"].as_str().unwrap());
        let ours = pre.run(stem, &std::fs::read(&file).unwrap(), None).unwrap();
        let max_diff = |reference: &[f32]| {
            assert_eq!(reference.len(), ours.len(), "{stem}: tensor sizes differ");
            ours.iter()
                .zip(reference)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max)
        };
        let pil_ref = read_f32(&fixtures().join(format!("ref/{stem}.pixels_pil.f32")));
        let pil = max_diff(&pil_ref);
        let tv = max_diff(&read_f32(
            &fixtures().join(format!("ref/{stem}.pixels_tv.f32")),
        ));
        let differing = ours
            .iter()
            .zip(&pil_ref)
            .filter(|(a, b)| (*a - *b).abs() > 1e-4)
            .count();
        let mut batch = ImageBatch::new(pre.size());
        batch.push(&ours);
        let emb = backend.embed_images(&batch).unwrap();
        let cos = cosine(
            emb.row(0),
            &read_f32(&fixtures().join(format!("ref/{stem}.embedding.f32"))),
        );
        eprintln!(
            "{stem}: max |Δpixel| vs PIL processor {pil:.5} ({:.2}% of values differ), vs torchvision processor {tv:.5}; \
             embedding cosine {cos:.7}",
            100.0 * differing as f64 / ours.len() as f64
        );
        worst_pil = worst_pil.max(pil);
        worst_tv = worst_tv.max(tv);
        worst_cos = worst_cos.min(cos);
    }
    eprintln!("worst: Δpixel PIL {worst_pil:.5}, torchvision {worst_tv:.5}; cosine {worst_cos:.7}");
    // One grey level after normalisation is 1/255/std ≈ 0.0150 (std ≈ 0.26): allow two.
    assert!(
        worst_pil <= 0.031,
        "pixels differ from CLIPImageProcessor by {worst_pil}"
    );
    assert!(
        worst_cos >= 0.9999,
        "image embedding cosine {worst_cos} < 0.9999"
    );
}

/// The default view: the whole image, its longer side resized to 224 with PIL's BICUBIC,
/// pasted centred on a square of the mean colour, rescaled and normalised by the processor.
#[test]
#[ignore = "compares with Python's reference outputs (scripts/test.sh makes them)"]
fn pad_view_pixels_and_embeddings_match_pil_and_model() {
    let artifact = artifact();
    let pre = preprocessor(&artifact, View::Pad);
    let size = pre.size();
    let mut backend = TchBackend::load(&artifact, DeviceSpec::Cpu).unwrap();
    let (mut worst_px, mut worst_pad, mut worst_cos) = (0f32, 0f32, 1f64);
    for img in index()["images"].as_array().unwrap() {
        let stem = img["stem"].as_str().unwrap();
        let file = fixtures().join(img["file"].as_str().unwrap());
        let ours = pre.run(stem, &std::fs::read(&file).unwrap(), None).unwrap();
        let reference = read_f32(&fixtures().join(format!("ref/{stem}.pixels_pad.f32")));
        assert_eq!(reference.len(), ours.len(), "{stem}: tensor sizes differ");
        let px = ours
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let differing = ours
            .iter()
            .zip(&reference)
            .filter(|(a, b)| (*a - *b).abs() > 1e-4)
            .count();
        // Where the image is not: 0 in ours exactly, and in the reference up to rounding.
        let dims = img["size"].as_array().unwrap();
        let (w, h) = pad_dims(
            size as u32,
            dims[0].as_u64().unwrap() as u32,
            dims[1].as_u64().unwrap() as u32,
        );
        let (w, h) = (w as usize, h as usize);
        let (left, top) = ((size - w) / 2, (size - h) / 2);
        let mut padding = 0usize;
        for (i, (a, b)) in ours.iter().zip(&reference).enumerate() {
            let (y, x) = ((i / size) % size, i % size);
            if !((top..top + h).contains(&y) && (left..left + w).contains(&x)) {
                assert_eq!(*a, 0.0, "{stem}: padding at ({x}, {y})");
                worst_pad = worst_pad.max(b.abs());
                padding += 1;
            }
        }
        assert_eq!(padding, 3 * (size * size - w * h), "{stem}");
        let mut batch = ImageBatch::new(size);
        batch.push(&ours);
        let emb = backend.embed_images(&batch).unwrap();
        let cos = cosine(
            emb.row(0),
            &read_f32(&fixtures().join(format!("ref/{stem}.embedding_pad.f32"))),
        );
        eprintln!(
            "{stem} pad ({w}×{h} at ({left}, {top})): max |Δpixel| vs PIL {px:.5} ({:.2}% of values differ); \
             embedding cosine {cos:.7}",
            100.0 * differing as f64 / ours.len() as f64
        );
        worst_px = worst_px.max(px);
        worst_cos = worst_cos.min(cos);
    }
    eprintln!(
        "pad worst: Δpixel PIL {worst_px:.5}; reference padding within {worst_pad:.1e} of 0; \
         cosine {worst_cos:.7}"
    );
    // The same tolerances as the center crop's: two grey levels, cosine 0.9999.
    assert!(
        worst_px <= 0.031,
        "pad pixels differ from PIL by {worst_px}"
    );
    assert!(
        worst_pad <= 1e-5,
        "the reference's padding is {worst_pad} from 0"
    );
    assert!(
        worst_cos >= 0.9999,
        "pad image embedding cosine {worst_cos} < 0.9999"
    );
}

#[test]
#[ignore = "compares with Python's reference outputs (scripts/test.sh makes them)"]
fn class_probabilities_match_clip_model() {
    let artifact = artifact();
    let index = index();
    let profile: ProfileConfig = serde_json::from_value(index["profile"].clone()).unwrap();
    let tok = PromptTokenizer::load(&artifact.path(TOKENIZER), &artifact.manifest.text).unwrap();
    let mut backend = TchBackend::load(&artifact, DeviceSpec::Cpu).unwrap();
    let scorer = Scorer::build("fixture", &profile, &artifact.manifest, &tok, |b| {
        backend.embed_texts(&b)
    })
    .unwrap();
    // Each view against the model's probabilities on its reference pixels.
    for (view, probabilities, pixels) in [
        (View::CenterCrop, "probabilities", "pixels_pil"),
        (View::Pad, "probabilities_pad", "pixels_pad"),
    ] {
        let pre = preprocessor(&artifact, view);
        let mut worst = 0f32;
        for img in index["images"].as_array().unwrap() {
            let file = fixtures().join(img["file"].as_str().unwrap());
            let mut batch = ImageBatch::new(pre.size());
            batch.push(
                &pre.run("fixture", &std::fs::read(&file).unwrap(), None)
                    .unwrap(),
            );
            let emb = backend.embed_images(&batch).unwrap();
            let ours = scorer.probabilities(emb.row(0));
            let reference: Vec<f32> = img[probabilities]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let diff = ours
                .iter()
                .zip(&reference)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let stem = img["stem"].as_str().unwrap();
            let mut ref_batch = ImageBatch::new(pre.size());
            ref_batch.push(&read_f32(
                &fixtures().join(format!("ref/{stem}.{pixels}.f32")),
            ));
            let ref_px = scorer.probabilities(backend.embed_images(&ref_batch).unwrap().row(0));
            let d2 = ref_px
                .iter()
                .zip(&reference)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            eprintln!("{stem} {view:?}: max |Δp| {diff:.2e} end to end; {d2:.2e} from the reference's own pixels (model + scoring alone)");
            assert!(
                d2 <= 1e-6,
                "{stem} {view:?}: model and scoring alone differ by {d2}"
            );
            worst = worst.max(diff);
            assert!(
                diff <= 1e-4,
                "{} {view:?}: probabilities {ours:?} vs transformers {reference:?}",
                img["file"]
            );
        }
        eprintln!(
            "class probabilities, {view:?}: worst |Δp| vs transformers' CLIPModel {worst:.2e}"
        );
    }
}

pub(crate) fn f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// The windows of an image's tiled reference (`fixtures.json`'s `tiles`: `[x, y, side, scale]`
/// each).
pub(crate) fn windows_of(tiles: &serde_json::Value) -> Vec<Window> {
    tiles["windows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            let w = u32s(w);
            Window {
                x: w[0],
                y: w[1],
                side: w[2],
                scale: w[3] as usize,
            }
        })
        .collect()
}

pub(crate) fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A tiled profile (`profile_tiled`: scales 1, 0.5 and 0.25, overlap 0.5) against
/// make_fixtures.py's `tiled_reference`, which lays the windows out on its own from the rules
/// in worker/src/preprocess/windows.rs, cuts and resizes them with PIL and scores every view
/// with transformers' CLIPModel: the window list exactly; a few windows' pixels (the first and
/// last of each scale, the middle of the finest) with the pad view's tolerance; every window's
/// embedding; each view's probabilities; the aggregated probabilities, anomaly score and
/// heatmap of `decide_views`.
#[test]
#[ignore = "compares with Python's reference outputs (scripts/test.sh makes them)"]
fn tiled_profile_windows_and_scores_match_the_python_reference() {
    let artifact = artifact();
    let index = index();
    let profile: ProfileConfig = serde_json::from_value(index["profile_tiled"].clone()).unwrap();
    assert!(profile.tiles.is_some(), "profile_tiled has no tiles");
    let pre = Preprocessor::for_profile(
        &artifact.manifest.image,
        &PreprocessSettings::default(),
        &profile,
    )
    .unwrap();
    let size = pre.size();
    let tok = PromptTokenizer::load(&artifact.path(TOKENIZER), &artifact.manifest.text).unwrap();
    let mut backend = TchBackend::load(&artifact, DeviceSpec::Cpu).unwrap();
    let scorer = Scorer::build("tiled", &profile, &artifact.manifest, &tok, |b| {
        backend.embed_texts(&b)
    })
    .unwrap();
    let (mut images, mut windows, mut pixel_checks) = (0, 0, 0);
    let (mut worst_px, mut worst_cos, mut worst_view_p) = (0f32, 1f64, 0f32);
    let (mut worst_p, mut worst_anomaly, mut worst_heat) = (0f32, 0f32, 0f32);
    let mut worst_map = 0f32;
    for img in index["images"].as_array().unwrap() {
        let stem = img["stem"].as_str().unwrap();
        let Some(reference) = img.get("tiles") else {
            continue;
        };
        let file = fixtures().join(img["file"].as_str().unwrap());
        let views = pre
            .views(stem, &std::fs::read(&file).unwrap(), None)
            .unwrap();
        assert_eq!(views.origin, (0, 0), "{stem}");
        assert_eq!(
            [views.width, views.height].to_vec(),
            u32s(&img["size"]),
            "{stem}"
        );

        // The geometry, exactly.
        let ours: Vec<Vec<u32>> = views
            .windows
            .iter()
            .map(|w| vec![w.x, w.y, w.side, w.scale as u32])
            .collect();
        let theirs: Vec<Vec<u32>> = reference["windows"]
            .as_array()
            .unwrap()
            .iter()
            .map(u32s)
            .collect();
        assert_eq!(
            ours, theirs,
            "{stem}: the windows differ from Python's layout"
        );
        assert_eq!(
            views.tensors.len(),
            1 + ours.len(),
            "{stem}: one tensor per view"
        );

        // Some windows' pixels.
        let mut px = 0f32;
        for i in u32s(&reference["checked_pixels"]) {
            let path = fixtures().join(format!("ref/{stem}.window{i}.pixels.f32"));
            let d = max_abs_diff(&views.tensors[1 + i as usize], &read_f32(&path));
            // Two grey levels, as the other views' (a few values of the small JPEG's windows,
            // blown up 2-9×, reach the second).
            assert!(
                d <= 0.031,
                "{stem}: window {i} {:?}: pixels differ by {d}",
                views.windows[i as usize]
            );
            px = px.max(d);
            pixel_checks += 1;
        }

        // Every view's embedding, in batches as the worker makes them.
        let mut embeddings: Vec<Vec<f32>> = Vec::with_capacity(views.tensors.len());
        for chunk in views.tensors.chunks(32) {
            let mut batch = ImageBatch::new(size);
            chunk.iter().for_each(|t| batch.push(t));
            embeddings.extend(
                backend
                    .embed_images(&batch)
                    .unwrap()
                    .rows()
                    .map(<[f32]>::to_vec),
            );
        }
        let reference_embeddings =
            read_f32(&fixtures().join(format!("ref/{stem}.windows_embedding.f32")));
        let dim = reference_embeddings.len() / ours.len();
        let cos = embeddings[1..]
            .iter()
            .zip(reference_embeddings.chunks_exact(dim))
            .map(|(a, b)| cosine(a, b))
            .fold(1f64, f64::min);
        let view_p = embeddings
            .iter()
            .zip(reference["view_probabilities"].as_array().unwrap())
            .map(|(e, p)| max_abs_diff(&scorer.probabilities(e), &f32s(p)))
            .fold(0f32, f32::max);

        // The image's scores and heatmap.
        let decision = scorer.decide_views(&embeddings, &views.windows, views.origin);
        let dp = max_abs_diff(&decision.probabilities, &f32s(&reference["probabilities"]));
        let da =
            (decision.anomaly_score - reference["anomaly_score"].as_f64().unwrap() as f32).abs();
        let loc = decision
            .localization
            .as_ref()
            .expect("a tiled profile localizes");
        assert_eq!(loc.views as usize, 1 + ours.len(), "{stem}");
        let heat = loc.heatmap.as_ref().expect("windows make a heatmap");
        let r = &reference["heatmap"];
        assert_eq!(
            (
                heat.rows,
                heat.cols,
                heat.window,
                heat.x.clone(),
                heat.y.clone()
            ),
            (
                r["rows"].as_u64().unwrap() as u32,
                r["cols"].as_u64().unwrap() as u32,
                r["window"].as_u64().unwrap() as u32,
                u32s(&r["x"]),
                u32s(&r["y"])
            ),
            "{stem}: the heatmap's grid"
        );
        let dh = max_abs_diff(&heat.scores, &f32s(&r["scores"]));
        // The fused map of our own views against anomalib's of transformers' views: the grid
        // exactly, the cells within the views' tolerance.
        let map = loc.anomaly_map.as_ref().expect("windows make a fused map");
        let m = &reference["anomaly_map"];
        assert_eq!(
            (map.x_edges.clone(), map.y_edges.clone()),
            (u32s(&m["x_edges"]), u32s(&m["y_edges"])),
            "{stem}: the fused map's cells"
        );
        let dm = max_abs_diff(&map.scores, &f32s(&m["scores"]));
        assert!(dm <= 1e-3, "{stem}: fused map differs by {dm}");
        worst_map = worst_map.max(dm);
        eprintln!(
            "{stem} tiled: {} windows, {} heatmap {}×{} of {} px; max |Δpixel| {px:.5}; min cosine {cos:.7}; \
             max |Δp| per view {view_p:.2e}, aggregated {dp:.2e}; |Δanomaly| {da:.2e}; max |Δheat| {dh:.2e}",
            ours.len(), decision.outcome.as_str(), heat.rows, heat.cols, heat.window
        );
        assert!(
            cos >= 0.9999,
            "{stem}: window embedding cosine {cos} < 0.9999"
        );
        // 1e-3, not the whole view's 1e-4: a 25-pixel window blown up to 224 moves a little
        // more with a grey level of resize rounding (about 4e-4 at worst per view).
        assert!(
            view_p <= 1e-3 && dp <= 1e-3 && da <= 1e-3 && dh <= 1e-3,
            "{stem}: probabilities {:?} (anomaly {}) vs transformers {} (anomaly {}): per view {view_p}, heatmap {dh}",
            decision.probabilities, decision.anomaly_score, reference["probabilities"], reference["anomaly_score"]
        );
        images += 1;
        windows += ours.len();
        worst_px = worst_px.max(px);
        worst_cos = worst_cos.min(cos);
        worst_view_p = worst_view_p.max(view_p);
        worst_p = worst_p.max(dp);
        worst_anomaly = worst_anomaly.max(da);
        worst_heat = worst_heat.max(dh);
    }
    eprintln!(
        "tiled worst over {images} images, {windows} windows ({pixel_checks} windows' pixels checked): \
         Δpixel {worst_px:.5}; cosine {worst_cos:.7}; |Δp| per view {worst_view_p:.2e}, aggregated {worst_p:.2e}; \
         |Δanomaly| {worst_anomaly:.2e}; |Δheat| {worst_heat:.2e}; |Δfused map| {worst_map:.2e}"
    );
    assert!(images >= 8, "only {images} images have a tiled reference");
}

/// The fused multi-scale map, cell by cell, against anomalib's WinCLIP aggregation
/// (`harmonic_aggregation` from the anomalib 2.7.0 wheel, and `_compute_zero_shot_scores`'
/// cross-scale line; make_fixtures.py's `winclip_fused_map`) fed the same window and
/// whole-frame scores (transformers' views of every fixture image): within 1e-5.
#[test]
#[ignore = "compares with Python's reference outputs (scripts/test.sh makes them)"]
fn the_fused_map_is_anomalibs_winclip_aggregation_of_the_same_scores() {
    let index = index();
    let (mut maps, mut cells, mut worst) = (0, 0, 0f32);
    for img in index["images"].as_array().unwrap() {
        let Some(reference) = img.get("tiles") else {
            continue;
        };
        let stem = img["stem"].as_str().unwrap();
        let windows = windows_of(reference);
        let scores = f32s(&reference["window_scores"]);
        let whole = reference["whole_score"].as_f64().unwrap() as f32;
        let ours = AnomalyMap::fuse(&windows, &scores, whole).expect("windows make a map");
        let theirs = &reference["anomaly_map"];
        assert_eq!(ours.x_edges, u32s(&theirs["x_edges"]), "{stem}: columns");
        assert_eq!(ours.y_edges, u32s(&theirs["y_edges"]), "{stem}: rows");
        let expected = f32s(&theirs["scores"]);
        assert_eq!(ours.scores.len(), expected.len(), "{stem}: cells");
        let d = max_abs_diff(&ours.scores, &expected);
        eprintln!(
            "{stem}: {} windows, {}×{} cells, max |Δ| {d:.2e} (map max {:.4})",
            windows.len(),
            ours.cols(),
            ours.rows(),
            ours.max()
        );
        assert!(d <= 1e-5, "{stem}: the fused map differs from anomalib's by {d}");
        maps += 1;
        cells += expected.len();
        worst = worst.max(d);
    }
    eprintln!("fused map vs anomalib: {maps} maps, {cells} cells, max |Δ| {worst:.2e}");
    assert!(maps >= 8, "only {maps} images have a tiled reference");
}

/// Locality, for any weights (the random tiny model's): a patch of pixels changed inside a
/// frame moves the scores of the windows that contain it and no other window's, so the fused
/// map moves only inside their union, and moves at least one cell there. The whole-frame view
/// contains the patch too and is one term of every cell's mean (it moves every cell, by
/// WinCLIP's design): the maps compared here share the first frame's whole-frame score, so
/// what is measured is what the windows do.
#[test]
#[ignore = "needs the tiny model and the fixtures' tiled profile (scripts/test.sh makes them)"]
fn a_changed_patch_moves_the_fused_map_only_inside_the_windows_that_see_it() {
    let artifact = artifact();
    let profile: ProfileConfig =
        serde_json::from_value(index()["profile_tiled"].clone()).unwrap();
    let pre = Preprocessor::for_profile(
        &artifact.manifest.image,
        &PreprocessSettings::default(),
        &profile,
    )
    .unwrap();
    let tok = PromptTokenizer::load(&artifact.path(TOKENIZER), &artifact.manifest.text).unwrap();
    let mut backend = TchBackend::load(&artifact, DeviceSpec::Cpu).unwrap();
    let scorer = Scorer::build("tiled", &profile, &artifact.manifest, &tok, |b| {
        backend.embed_texts(&b)
    })
    .unwrap();
    let size = pre.size();
    let mut score = |frame: &image::RgbImage| {
        let mut png = Vec::new();
        frame
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let views = pre.views("frame", &png, None).unwrap();
        let mut anomaly = Vec::new();
        for chunk in views.tensors.chunks(32) {
            let mut batch = ImageBatch::new(size);
            chunk.iter().for_each(|t| batch.push(t));
            let embeddings = backend.embed_images(&batch).unwrap();
            anomaly.extend(embeddings.rows().map(|e| scorer.view(e).anomaly));
        }
        (views.windows, anomaly)
    };
    let (w, h) = (320u32, 200u32);
    let mut frame = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, ((x * 7 + y * 3) % 256) as u8])
    });
    let (windows, before) = score(&frame);
    let patch = (200u32, 40u32, 12u32);
    for y in patch.1..patch.1 + patch.2 {
        for x in patch.0..patch.0 + patch.2 {
            frame.put_pixel(x, y, image::Rgb([255, 0, 255]));
        }
    }
    let (windows_after, after) = score(&frame);
    assert_eq!(windows, windows_after, "the same frame size, the same windows");
    let sees = |win: &Window| {
        win.x < patch.0 + patch.2
            && patch.0 < win.x + win.side
            && win.y < patch.1 + patch.2
            && patch.1 < win.y + win.side
    };
    for (i, win) in windows.iter().enumerate() {
        if !sees(win) {
            assert_eq!(
                before[1 + i],
                after[1 + i],
                "window {win:?} does not contain the patch, yet its score moved"
            );
        }
    }
    let whole = before[0];
    let m0 = AnomalyMap::fuse(&windows, &before[1..], whole).unwrap();
    let m1 = AnomalyMap::fuse(&windows, &after[1..], whole).unwrap();
    let mut moved = 0;
    for c in 0..m0.scores.len() {
        let (x, y, _, _) = m0.cell(c);
        if m0.scores[c] != m1.scores[c] {
            assert!(
                windows.iter().any(|win| sees(win) && win.contains(x, y)),
                "cell {c} at ({x}, {y}) moved, outside every window that contains the patch"
            );
            moved += 1;
        }
    }
    eprintln!(
        "locality: {} windows ({} see the patch), {moved} of {} cells moved; the whole-frame \
         score {whole:.6} -> {:.6}",
        windows.len(),
        windows.iter().filter(|w| sees(w)).count(),
        m0.scores.len(),
        after[0]
    );
    assert!(moved > 0, "the patch moved no cell");
}
