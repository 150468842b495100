//! The device preprocessing path (`preprocess.device`, issue 16) on the CPU, with
//! torchvision's CPU kernel: every fixture image against the Python references
//! (CLIPImageProcessor for `center_crop`, PIL's resize pasted centred for `pad`, the tiled
//! profile's windows cut and resized with PIL) and its embeddings against CLIPModel's, with
//! the CPU path's tolerances (two grey levels, cosine 0.9999); non-JPEG fixtures take the CPU
//! path and give its tensors exactly. torchvision's library must load: the tests fail, naming
//! it, when it does not (scripts/env.sh installs torchvision 0.26.0 beside torch).

use std::sync::Arc;

use clipqc::config::PreprocessSettings;
use clipqc::model::tch_backend::TchBackend;
use clipqc::model::{Backend, DeviceSpec, ImageBatch};
use clipqc::preprocess::device::{DevicePath, Routed};
use clipqc::preprocess::{Preprocessor, View, Views};
use clipqc::score::ProfileConfig;

use super::{artifact, fixtures, index, max_abs_diff, preprocessor, read_f32};
use crate::common::cosine;

fn device() -> Arc<DevicePath> {
    Arc::new(
        DevicePath::open(&PreprocessSettings::default(), tch::Device::Cpu).unwrap_or_else(|e| {
            panic!("torchvision's operators must load for the device path: {e}")
        }),
    )
}

/// The device path's views of a fixture, or `None` when it fell back (non-JPEGs).
fn on_device(pre: &Preprocessor, stem: &str, bytes: &[u8]) -> Option<Views> {
    match device().views(pre, stem, bytes, None).unwrap() {
        Routed::Device(v) => Some(v.into_host().unwrap()),
        Routed::Fallback(_) => None,
    }
}

fn embed(backend: &mut TchBackend, size: usize, pixels: &[f32]) -> Vec<f32> {
    let mut batch = ImageBatch::new(size);
    batch.push(pixels);
    backend.embed_images(&batch).unwrap().row(0).to_vec()
}

#[test]
#[ignore = "compares with Python's reference outputs (scripts/test.sh makes them)"]
fn device_path_pixels_and_embeddings_match_the_references() {
    let artifact = artifact();
    let mut backend = TchBackend::load(&artifact, DeviceSpec::Cpu).unwrap();
    let (mut jpegs, mut fallbacks) = (0, 0);
    let (mut worst_px, mut worst_cos) = (0f32, 1f64);
    for (view, pixels, embedding) in [
        (View::CenterCrop, "pixels_pil", "embedding"),
        (View::Pad, "pixels_pad", "embedding_pad"),
    ] {
        let pre = preprocessor(&artifact, view).with_device(Some(device()));
        for img in index()["images"].as_array().unwrap() {
            let stem = img["stem"].as_str().unwrap();
            let bytes = std::fs::read(fixtures().join(img["file"].as_str().unwrap())).unwrap();
            let Some(views) = on_device(&pre, stem, &bytes) else {
                assert!(
                    !img["file"].as_str().unwrap().ends_with(".jpg"),
                    "{stem} fell back"
                );
                // Through `views`: the CPU path's tensors, exactly.
                let cpu = pre.views_cpu(stem, &bytes, None).unwrap();
                assert_eq!(pre.views(stem, &bytes, None).unwrap().tensors, cpu.tensors);
                fallbacks += 1;
                continue;
            };
            let reference = read_f32(&fixtures().join(format!("ref/{stem}.{pixels}.f32")));
            let px = max_abs_diff(&views.tensors[0], &reference);
            let cos = cosine(
                &embed(&mut backend, pre.size(), &views.tensors[0]),
                &read_f32(&fixtures().join(format!("ref/{stem}.{embedding}.f32"))),
            );
            eprintln!("{stem} {view:?} on the device path: max |Δpixel| {px:.5}, cosine {cos:.7}");
            worst_px = worst_px.max(px);
            worst_cos = worst_cos.min(cos);
            jpegs += 1;
        }
    }
    eprintln!("device path worst: Δpixel {worst_px:.5}, cosine {worst_cos:.7}");
    assert!(jpegs >= 4, "only {jpegs} JPEG cases");
    assert!(fallbacks >= 4, "only {fallbacks} non-JPEG cases");
    assert!(worst_px <= 0.031, "pixels differ by {worst_px}");
    assert!(worst_cos >= 0.9999, "embedding cosine {worst_cos}");
}

#[test]
#[ignore = "compares with Python's reference outputs (scripts/test.sh makes them)"]
fn device_path_windows_match_the_tiled_reference() {
    let artifact = artifact();
    let index = index();
    let profile: ProfileConfig = serde_json::from_value(index["profile_tiled"].clone()).unwrap();
    let pre = Preprocessor::for_profile(
        &artifact.manifest.image,
        &PreprocessSettings::default(),
        &profile,
    )
    .unwrap()
    .with_device(Some(device()));
    let mut backend = TchBackend::load(&artifact, DeviceSpec::Cpu).unwrap();
    let (mut checked, mut worst_px, mut worst_cos) = (0, 0f32, 1f64);
    for img in index["images"].as_array().unwrap() {
        let stem = img["stem"].as_str().unwrap();
        let Some(reference) = img.get("tiles") else {
            continue;
        };
        let bytes = std::fs::read(fixtures().join(img["file"].as_str().unwrap())).unwrap();
        let Some(views) = on_device(&pre, stem, &bytes) else {
            continue;
        };
        let ours: Vec<Vec<u64>> = views
            .windows
            .iter()
            .map(|w| vec![w.x.into(), w.y.into(), w.side.into(), w.scale as u64])
            .collect();
        let theirs: Vec<Vec<u64>> = reference["windows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                w.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap())
                    .collect()
            })
            .collect();
        assert_eq!(ours, theirs, "{stem}: windows");
        for i in reference["checked_pixels"].as_array().unwrap() {
            let i = i.as_u64().unwrap() as usize;
            let path = fixtures().join(format!("ref/{stem}.window{i}.pixels.f32"));
            let d = max_abs_diff(&views.tensors[1 + i], &read_f32(&path));
            assert!(d <= 0.031, "{stem}: window {i} differs by {d}");
            worst_px = worst_px.max(d);
            checked += 1;
        }
        // Every window's embedding against CLIPModel's on the PIL windows.
        let all = read_f32(&fixtures().join(format!("ref/{stem}.windows_embedding.f32")));
        let dim = all.len() / views.windows.len();
        for (c, chunk) in views.tensors[1..].chunks(32).enumerate() {
            let mut batch = ImageBatch::new(pre.size());
            chunk.iter().for_each(|t| batch.push(t));
            let e = backend.embed_images(&batch).unwrap();
            for j in 0..chunk.len() {
                let i = c * 32 + j;
                worst_cos = worst_cos.min(cosine(e.row(j), &all[i * dim..(i + 1) * dim]));
            }
        }
    }
    eprintln!(
        "device path windows: {checked} checked, worst Δpixel {worst_px:.5}, cosine {worst_cos:.7}"
    );
    assert!(checked >= 3, "only {checked} windows checked");
    assert!(worst_cos >= 0.9999, "window embedding cosine {worst_cos}");
}
