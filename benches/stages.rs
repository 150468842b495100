//! Micro-benchmarks of the CPU stages, one core: preprocessing (decode + resize + crop +
//! normalise, from the file's bytes) of the three bench images, tokenization of prompts, and
//! scoring one image embedding against a profile, fusing a tiled frame's anomaly map; the
//! device preprocessing path on the CPU
//! (torchvision's CPU kernel) against the host path on three JPEGs up to 5 MP.
//!
//! Run through `scripts/bench.sh micro`, which makes the images (benches/make_images.py),
//! exports the random ViT-B/32 artifact, and sets:
//!   CLIPQC_BENCH_MODEL   artifact directory (its manifest and tokenizer are used)
//!   CLIPQC_BENCH_IMAGES  directory with part_250.jpg, part_1920x1080.jpg,
//!                        part_2448x2048_16bit.png
//! The Python side of the comparison (CLIPProcessor on the same files) is
//! `benches/baseline.py preprocess`.

use std::path::PathBuf;

use clipqc::config::PreprocessSettings;
use clipqc::model::artifact::TOKENIZER;
use clipqc::model::fake::FakeBackend;
use clipqc::model::{Artifact, Backend, PromptTokenizer};
use clipqc::preprocess::device::DevicePath;
use clipqc::preprocess::{DecodeLimits, Preprocessor, View};
use clipqc::score::{AnomalyMap, ProfileConfig, Scorer};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// The three bench images: a cropped part, a full-HD frame, a machine-vision camera's
/// 16-bit grayscale frame.
pub const IMAGES: [&str; 3] = [
    "part_250.jpg",
    "part_1920x1080.jpg",
    "part_2448x2048_16bit.png",
];

/// The JPEGs of the device preprocessing comparison: thumbnail, 1080p, 5 MP.
const JPEGS: [&str; 3] = ["part_250.jpg", "part_1920x1080.jpg", "part_2592x1944.jpg"];

fn dir(var: &str) -> PathBuf {
    let d = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{var} is not set: run scripts/bench.sh micro"));
    assert!(d.is_dir(), "{var}={} is not a directory", d.display());
    d
}

fn benches(c: &mut Criterion) {
    let artifact = Artifact::open(dir("CLIPQC_BENCH_MODEL")).expect("the bench model");
    let images = dir("CLIPQC_BENCH_IMAGES");
    let manifest = &artifact.manifest;

    // The checkpoint's own resize and crop: the same work as the CLIPProcessor it is compared
    // with (benches/baseline.py). The worker's default view (pad) is timed below.
    let pre = Preprocessor::new(&manifest.image, DecodeLimits::default(), None)
        .with_view(View::CenterCrop);
    let mut group = c.benchmark_group("preprocess");
    for name in IMAGES {
        let bytes = std::fs::read(images.join(name)).unwrap();
        // Once outside the timing: a failure here is a clear error, not a benchmark.
        pre.run(name, &bytes, None)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::from_parameter(name), &bytes, |b, bytes| {
            b.iter(|| pre.run(name, bytes, None).unwrap())
        });
    }
    group.finish();

    // The default view: the whole frame, aspect kept, padded to the square.
    let mut group = c.benchmark_group("preprocess_pad");
    let padded = pre.clone().with_view(View::Pad);
    for name in IMAGES {
        let bytes = std::fs::read(images.join(name)).unwrap();
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::from_parameter(name), &bytes, |b, bytes| {
            b.iter(|| padded.run(name, bytes, None).unwrap())
        });
    }
    group.finish();

    // The opt-in DCT-domain JPEG downscaling (preprocess.jpeg_dct_headroom).
    let mut group = c.benchmark_group("preprocess_jpeg_dct");
    for headroom in [2.0f32, 1.0] {
        let pre = pre.clone().with_jpeg_dct_headroom(Some(headroom));
        for name in IMAGES.iter().filter(|n| n.ends_with(".jpg")) {
            let bytes = std::fs::read(images.join(name)).unwrap();
            group.throughput(Throughput::Elements(1));
            let id = BenchmarkId::new(format!("headroom {headroom}"), name);
            group.bench_with_input(id, &bytes, |b, bytes| {
                b.iter(|| pre.run(name, bytes, None).unwrap())
            });
        }
    }
    group.finish();

    // The device preprocessing path (preprocess.device) on the CPU, torchvision's CPU kernel,
    // against the host path on the same JPEGs (pad view, whole frame): what the device path
    // costs where there is no GPU. On a GPU the comparison is benches/gpu.sh's.
    let device = std::sync::Arc::new(
        DevicePath::open(&PreprocessSettings::default(), tch::Device::Cpu)
            .expect("torchvision's operators (scripts/env.sh installs torchvision)"),
    );
    let on_device = padded.clone().with_device(Some(device));
    let mut group = c.benchmark_group("preprocess_device_cpu");
    for name in JPEGS {
        let Ok(bytes) = std::fs::read(images.join(name)) else {
            panic!("{name} is missing from CLIPQC_BENCH_IMAGES: run benches/make_images.py");
        };
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::new("host", name), &bytes, |b, bytes| {
            b.iter(|| padded.views_cpu(name, bytes, None).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("device", name), &bytes, |b, bytes| {
            b.iter(|| on_device.views(name, bytes, None).unwrap())
        });
    }
    group.finish();

    let tokenizer =
        PromptTokenizer::load(&artifact.path(TOKENIZER), &manifest.text).expect("tokenizer");
    let profile = ProfileConfig::builtin_default();
    let prompts: Vec<String> = profile
        .classes
        .iter()
        .flat_map(|c| profile.expanded_prompts(c))
        .collect();
    let mut group = c.benchmark_group("tokenize");
    group.throughput(Throughput::Elements(1));
    group.bench_function("one prompt", |b| {
        b.iter(|| {
            tokenizer
                .encode("a photo of a surface scratch on a steel bracket.")
                .unwrap()
        })
    });
    group.throughput(Throughput::Elements(prompts.len() as u64));
    group.bench_function(
        format!("default profile ({} prompts)", prompts.len()),
        |b| {
            b.iter(|| {
                prompts
                    .iter()
                    .map(|p| tokenizer.encode(p).unwrap())
                    .collect::<Vec<_>>()
            })
        },
    );
    group.finish();

    // Scoring needs class embeddings, not a trained model: a fake text encoder of the
    // artifact's embedding width gives the same arithmetic.
    let dim = manifest.embedding_dim;
    let mut fake = FakeBackend::new(dim, manifest.image.size as usize);
    let scorer = Scorer::build("default", &profile, manifest, &tokenizer, |t| {
        fake.embed_texts(&t)
    })
    .unwrap();
    let embedding: Vec<f32> = (0..dim)
        .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
        .collect();
    let mut group = c.benchmark_group("score");
    group.throughput(Throughput::Elements(1));
    group.bench_function(format!("decide (5 classes, dim {dim})"), |b| {
        b.iter(|| scorer.decide(&embedding))
    });
    // The fused multi-scale map of a tiled frame (score/anomaly_map.rs): its cost per frame on
    // top of the model's per window. 1080p and 5 MP under [1, .5, .25] at overlap 0.5.
    let tiles = clipqc::preprocess::TileConfig {
        scales: vec![1.0, 0.5, 0.25],
        overlap: 0.5,
        max_windows: 1000,
        max_aspect_ratio: None,
        min_window: 32,
        aggregate: Default::default(),
        region_threshold: 0.5,
        max_regions: 8,
    };
    for (w, h) in [(1920u32, 1080u32), (2448, 2048)] {
        let windows = tiles.layout(w, h);
        let scores: Vec<f32> = (0..windows.len())
            .map(|i| 0.05 + ((i * 37) % 90) as f32 / 100.0)
            .collect();
        group.bench_function(
            format!("fused map {w}x{h} ({} windows)", windows.len()),
            |b| b.iter(|| AnomalyMap::fuse(&windows, &scores, 0.3)),
        );
    }
    group.finish();
}

criterion_group!(stages, benches);
criterion_main!(stages);
