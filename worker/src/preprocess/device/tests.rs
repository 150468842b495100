//! The device path on the CPU (torchvision's CPU kernel): against the CPU path for every view,
//! window geometry, region and EXIF orientation; fallbacks by format; a corrupt JPEG's
//! error; the memory budget under a burst. torchvision's library must be found (the test
//! environment installs it): every test fails, naming what is missing, when it is not.

use std::io::Cursor;
use std::sync::Arc;

use image::{DynamicImage, ImageFormat, RgbImage};
use tch::Device;

use super::*;
use crate::model::artifact::ImageSettings;
use crate::preprocess::{Aggregate, ClaheSettings, DecodeLimits, TileConfig, Tiles, View};

/// Two grey levels after normalisation (1/255/std ≈ 0.015): the fidelity tests' tolerance.
const TOLERANCE: f32 = 0.031;

fn path_with(settings: &PreprocessSettings) -> Arc<DevicePath> {
    Arc::new(DevicePath::open(settings, Device::Cpu).unwrap_or_else(|e| {
        panic!("the device path needs torchvision 0.26.0 beside torch (scripts/env.sh): {e}")
    }))
}

fn path() -> Arc<DevicePath> {
    path_with(&PreprocessSettings::default())
}

fn tiles(scales: &[f64]) -> Tiles {
    let config = TileConfig {
        scales: scales.to_vec(),
        overlap: 0.5,
        max_windows: 200,
        max_aspect_ratio: None,
        min_window: 16,
        aggregate: Aggregate::Max,
        region_threshold: 0.5,
        max_regions: 8,
    };
    Tiles::new(config, &ImageSettings::clip(), &DecodeLimits::default()).unwrap()
}

fn cpu(view: View) -> Preprocessor {
    Preprocessor::new(&ImageSettings::clip(), DecodeLimits::default(), None).with_view(view)
}

/// A frame with detail at every scale (edges, gradients, noise-like texture).
fn pattern(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 7 % 251) as u8,
            (y * 5 % 241) as u8,
            ((x ^ y).wrapping_mul(37) % 256) as u8,
        ])
    })
}

fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn jpeg(w: u32, h: u32) -> Vec<u8> {
    encode(DynamicImage::ImageRgb8(pattern(w, h)), ImageFormat::Jpeg)
}

/// `jpeg` with an EXIF block giving `orientation` (1-8).
fn with_orientation(jpeg: &[u8], orientation: u8) -> Vec<u8> {
    let mut app1 = vec![0xFF, 0xE1, 0, 34];
    app1.extend_from_slice(b"Exif\0\0MM\0\x2A\0\0\0\x08");
    app1.extend_from_slice(&[
        0,
        1,
        0x01,
        0x12,
        0,
        3,
        0,
        0,
        0,
        1,
        0,
        orientation,
        0,
        0,
        0,
        0,
    ]);
    app1.extend_from_slice(&[0, 0]);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "tensor sizes differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// The device path's views of `bytes` against the CPU path's: geometry exactly, pixels within
/// two grey levels. Returns the worst pixel difference.
fn compare(pre: &Preprocessor, name: &str, bytes: &[u8], region: Option<Region>) -> f32 {
    let on_device = pre.clone().with_device(Some(path()));
    let routed = path().views(&on_device, name, bytes, region).unwrap();
    let Routed::Device(views) = routed else {
        panic!("{name}: fell back ({routed:?})");
    };
    assert_eq!(views.tensor.device(), Device::Cpu);
    let ours = views.into_host().unwrap();
    let theirs = pre.views_cpu(name, bytes, region).unwrap();
    assert_eq!(ours.windows, theirs.windows, "{name}: windows");
    assert_eq!(
        (ours.origin, ours.width, ours.height),
        (theirs.origin, theirs.width, theirs.height),
        "{name}: geometry"
    );
    assert_eq!(ours.tensors.len(), theirs.tensors.len(), "{name}: views");
    let mut worst = 0f32;
    for (i, (a, b)) in ours.tensors.iter().zip(&theirs.tensors).enumerate() {
        let d = max_abs_diff(a, b);
        assert!(d <= TOLERANCE, "{name}: view {i} differs by {d}");
        worst = worst.max(d);
    }
    worst
}

#[test]
fn every_view_matches_the_cpu_path() {
    for view in [View::Pad, View::CenterCrop, View::Squash] {
        for (w, h) in [(250, 250), (640, 480), (300, 701), (97, 61), (1920, 1080)] {
            let d = compare(&cpu(view), &format!("{view:?} {w}×{h}"), &jpeg(w, h), None);
            eprintln!("{view:?} {w}×{h}: max |Δpixel| {d:.5}");
        }
    }
}

#[test]
fn every_window_geometry_matches_the_cpu_path() {
    // Windows downscaled (scale 1 of 640×480: 480 → 224), upscaled (0.25 of 250: 63 → 224)
    // and odd strides; with and without a region of interest.
    for scales in [&[1.0, 0.5, 0.25][..], &[0.3][..], &[0.7, 0.2][..]] {
        let mut pre = cpu(View::Pad);
        pre.tiles = Some(tiles(scales));
        for (w, h) in [(250, 250), (640, 480), (333, 517)] {
            let d = compare(&pre, &format!("{scales:?} {w}×{h}"), &jpeg(w, h), None);
            eprintln!("tiles {scales:?} {w}×{h}: max |Δpixel| {d:.5}");
        }
        let region = Region {
            x: 37,
            y: 21,
            width: 301,
            height: 203,
        };
        compare(&pre, "region", &jpeg(640, 480), Some(region));
    }
}

#[test]
fn exif_orientation_and_region_match_the_cpu_path() {
    let base = jpeg(320, 200);
    let region = Region {
        x: 10,
        y: 30,
        width: 150,
        height: 120,
    };
    for o in 1..=8 {
        let bytes = with_orientation(&base, o);
        for view in [View::Pad, View::CenterCrop] {
            compare(&cpu(view), &format!("orientation {o}"), &bytes, None);
            compare(
                &cpu(view),
                &format!("orientation {o} region"),
                &bytes,
                Some(region),
            );
        }
    }
}

#[test]
fn grey_jpegs_are_resized_as_one_channel_and_replicated() {
    let grey = image::GrayImage::from_fn(300, 200, |x, y| image::Luma([((x * 3 + y) % 256) as u8]));
    let bytes = encode(DynamicImage::ImageLuma8(grey), ImageFormat::Jpeg);
    compare(&cpu(View::Pad), "grey", &bytes, None);
    compare(&cpu(View::CenterCrop), "grey", &bytes, None);
}

#[test]
fn formats_the_operator_cannot_take_fall_back_per_image() {
    let rgb = DynamicImage::ImageRgb8(pattern(120, 90));
    let grey16 = DynamicImage::ImageLuma16(image::ImageBuffer::from_fn(64, 48, |x, y| {
        image::Luma([(x * 900 + y * 7) as u16])
    }));
    let cmyk = {
        let pixels: Vec<u8> = (0..64 * 48 * 4).map(|i| (i % 253) as u8).collect();
        let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_CMYK);
        c.set_size(64, 48);
        let mut started = c.start_compress(Vec::new()).unwrap();
        started.write_scanlines(&pixels).unwrap();
        started.finish().unwrap()
    };
    let pre = cpu(View::Pad).with_device(Some(path()));
    let cases = [
        (
            "png",
            encode(rgb.clone(), ImageFormat::Png),
            Fallback::NotJpeg,
        ),
        (
            "bmp",
            encode(rgb.clone(), ImageFormat::Bmp),
            Fallback::NotJpeg,
        ),
        ("tiff", encode(rgb, ImageFormat::Tiff), Fallback::NotJpeg),
        (
            "16-bit png",
            encode(grey16, ImageFormat::Png),
            Fallback::NotJpeg,
        ),
        ("cmyk jpeg", cmyk, Fallback::Cmyk),
    ];
    for (name, bytes, reason) in cases {
        match path().views(&pre, name, &bytes, None).unwrap() {
            Routed::Fallback(r) => assert_eq!(r, reason, "{name}"),
            Routed::Device(_) => panic!("{name}: taken by the device path"),
        }
        // Through `views`, the CPU path answers: the same tensors as without the device.
        let ours = pre.views(name, &bytes, None).unwrap();
        let theirs = pre.views_cpu(name, &bytes, None).unwrap();
        assert_eq!(ours.tensors, theirs.tensors, "{name}");
    }
}

#[test]
fn clahe_profiles_fall_back() {
    let mut pre = cpu(View::Pad).with_device(Some(path()));
    pre.clahe = Some(ClaheSettings::default());
    let routed = path().views(&pre, "clahe", &jpeg(100, 80), None).unwrap();
    assert!(
        matches!(routed, Routed::Fallback(Fallback::Clahe)),
        "{routed:?}"
    );
}

#[test]
fn a_corrupt_jpeg_gets_the_cpu_paths_error() {
    let good = jpeg(200, 150);
    let pre = cpu(View::Pad).with_device(Some(path()));
    // A Huffman table the operator refuses; a frame cut before its end-of-image marker.
    let dht = good.windows(2).position(|w| w == [0xFF, 0xC4]).unwrap();
    let mut bad_table = good.clone();
    bad_table[dht + 4..dht + 21].fill(0xFF);
    let truncated = good[..good.len() / 2].to_vec();
    let mut not_a_jpeg = good[..4].to_vec();
    not_a_jpeg.extend_from_slice(&[0x12; 64]);
    for (name, bytes) in [
        ("bad table", bad_table),
        ("truncated", truncated),
        ("garbage", not_a_jpeg),
    ] {
        let ours = pre.views(name, &bytes, None).unwrap_err();
        let theirs = pre.views_cpu(name, &bytes, None).unwrap_err();
        assert_eq!(ours.code(), theirs.code(), "{name}");
        assert_eq!(
            ours.code(),
            crate::proto::v1::ErrorCode::DecodeFailed,
            "{name}"
        );
        assert_eq!(ours.to_string(), theirs.to_string(), "{name}");
    }
}

#[test]
fn the_operator_refuses_what_is_not_a_jpeg_in_its_own_words() {
    let path = path();
    let garbage = Tensor::from_slice(&[0x12u8; 64]);
    let err = path.ops.decode_cpu(&garbage).unwrap_err();
    assert!(
        matches!(&err, OpError::Refused(m) if !m.is_empty()),
        "{err}"
    );
    let good = path
        .ops
        .decode_cpu(&Tensor::from_slice(&jpeg(20, 10)))
        .unwrap();
    assert_eq!(good.size(), [3, 10, 20]);
}

#[test]
fn refusals_from_the_header_are_the_cpu_paths() {
    let pre = cpu(View::Pad).with_device(Some(path()));
    let limits = DecodeLimits {
        max_width: 100,
        ..DecodeLimits::default()
    };
    let small = Preprocessor {
        limits,
        ..pre.clone()
    };
    let bytes = jpeg(200, 50);
    let ours = small.views("wide", &bytes, None).unwrap_err();
    let theirs = small.views_cpu("wide", &bytes, None).unwrap_err();
    assert_eq!(ours.to_string(), theirs.to_string());
    let outside = Region {
        x: 150,
        y: 0,
        width: 100,
        height: 10,
    };
    let ours = pre.views("roi", &bytes, Some(outside)).unwrap_err();
    let theirs = pre.views_cpu("roi", &bytes, Some(outside)).unwrap_err();
    assert_eq!(ours.to_string(), theirs.to_string());
}

#[test]
fn a_frame_over_the_budget_falls_back_and_a_burst_stays_within_it() {
    let bytes = jpeg(1600, 1200);
    let mut pre = cpu(View::Pad);
    pre.tiles = Some(tiles(&[1.0, 0.5]));
    // One frame's peak (as the path computes it: the resize target at least the model's
    // size): the decoded frame, its copies, the resize, 1 + 2 + 15 views.
    let need = views::peak_bytes(1600, 1200, 3, 224, 224, 18, 224);
    let tight = Arc::new(
        DevicePath::open(
            &PreprocessSettings {
                device_memory_bytes: Some(need - 1),
                ..PreprocessSettings::default()
            },
            Device::Cpu,
        )
        .unwrap(),
    );
    let routed = tight.views(&pre, "large", &bytes, None).unwrap();
    assert!(
        matches!(routed, Routed::Fallback(Fallback::OverBudget)),
        "{routed:?}"
    );
    assert_eq!(tight.budget().high_water(), 0, "nothing reserved");

    // Room for two frames at once; eight threads bring eight frames together.
    let two = Arc::new(
        DevicePath::open(
            &PreprocessSettings {
                device_memory_bytes: Some(2 * need + need / 2),
                ..PreprocessSettings::default()
            },
            Device::Cpu,
        )
        .unwrap(),
    );
    let pre = Arc::new(pre);
    let bytes = Arc::new(bytes);
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let (two, pre, bytes) = (two.clone(), pre.clone(), bytes.clone());
            std::thread::spawn(move || match two.views(&pre, "burst", &bytes, None) {
                Ok(Routed::Device(v)) => v.tensor.size(),
                other => panic!("frame {i}: {other:?}"),
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), [18, 3, 224, 224]);
    }
    let high = two.budget().high_water();
    assert!(high <= two.budget().total(), "{high} reserved at once");
    assert!(
        high >= need,
        "every frame reserved its peak ({high} < {need})"
    );
}

#[test]
fn the_setting_follows_the_model_device() {
    let mut settings = PreprocessSettings::default();
    assert!(
        DevicePath::for_model(&settings, Device::Cpu)
            .unwrap()
            .is_none(),
        "auto on a CPU"
    );
    settings.device = PreprocessDevice::Cpu;
    assert!(DevicePath::for_model(&settings, Device::Cpu)
        .unwrap()
        .is_none());
    settings.device = PreprocessDevice::Cuda;
    if !tch::Cuda::is_available() {
        let err = DevicePath::for_model(&settings, Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("preprocess.device"), "{err}");
    }
}

#[test]
fn the_library_is_found_beside_torch_and_a_missing_one_is_named() {
    let found = ops::resolve_library(None).unwrap();
    assert!(
        found.ends_with("torchvision/image.so"),
        "{}",
        found.display()
    );
    let missing = std::path::Path::new("/nonexistent/torchvision/image.so");
    let err = ops::resolve_library(Some(missing)).unwrap_err().to_string();
    assert!(
        err.contains("/nonexistent/torchvision/image.so")
            && err.contains("preprocess.device_ops_library"),
        "{err}"
    );
}

/// The metrics own the `reason` label's values (and start each at 0): every fallback is one.
#[test]
fn every_fallback_is_in_the_metrics_vocabulary() {
    let names = Fallback::ALL.map(Fallback::as_str);
    assert_eq!(names, crate::metrics::DEVICE_FALLBACK_REASONS);
}
