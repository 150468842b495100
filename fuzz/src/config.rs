//! A config file, as `clipqc run --config FILE` and the profile reloader read it: bytes
//! written to a `.toml` file → `Settings::load_with_env` (parse, unknown keys refused,
//! properties, profiles, tiles and routes validated) with an empty environment.
//!
//! Asserts, besides "nothing panics" (nor hangs: libFuzzer's `-timeout`):
//! - what loads is usable as the worker uses it: every profile (the built-in `default`
//!   included) has a version, builds its preprocessing (`Preprocessor::for_profile`, which
//!   load promises by checking the windows), and decides any probabilities without panicking,
//!   naming one of its own classes; the routes compile and only ever name a known profile
//!   and a non-empty region;
//! - the webhooks start or are refused with an error (the worker's start-up check), never a
//!   panic;
//! - loading is deterministic: the same bytes load the same profiles and routes again.

use std::path::PathBuf;
use std::sync::OnceLock;

use clipqc::config::Settings;
use clipqc::model::artifact::{ImageSettings, Interpolation, ResizeMode};
use clipqc::preprocess::Preprocessor;
use clipqc::score::{self, ProfileConfig};

/// The file the bytes are written to: one per process (libFuzzer's `-fork`/`-jobs` run
/// several), in the system's temporary directory.
fn path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("clipqc-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the fuzz config directory");
        dir.join("clipqc.toml")
    })
}

fn image() -> ImageSettings {
    ImageSettings {
        size: 224,
        resize: ResizeMode::ShortestEdge,
        resize_size: 224,
        interpolation: Interpolation::Bicubic,
        rescale_factor: 1.0 / 255.0,
        mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
        std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
    }
}

pub fn check(data: &[u8]) {
    let path = path();
    std::fs::write(path, data).expect("write the fuzz config");
    let settings = match Settings::load_with_env(Some(path), std::iter::empty()) {
        Ok(settings) => settings,
        Err(e) => {
            // `CLIPQC_FUZZ_VERBOSE=1`: why a seed does not load (a refused seed only
            // exercises the parser).
            static VERBOSE: OnceLock<bool> = OnceLock::new();
            if *VERBOSE.get_or_init(|| std::env::var_os("CLIPQC_FUZZ_VERBOSE").is_some()) {
                eprintln!("{e}");
            }
            return;
        }
    };
    let profiles = settings.profiles();
    for (name, profile) in &profiles {
        let version = clipqc::profiles::version(profile);
        assert!(!version.is_empty(), "profile {name:?} has no version");
        if let Err(e) = Preprocessor::for_profile(&image(), &settings.preprocess, profile) {
            panic!("profile {name:?} loaded but its preprocessing cannot be built: {e}");
        }
        decides(name, profile, data);
    }
    let router = settings
        .router()
        .expect("the routes of a loaded config compile");
    for camera in ["", "cam-1", "housing-cam-7", "*"] {
        for line in ["", "line-1", "line-2", "[", "\u{0}"] {
            let (profile, region) = router.resolve(camera, line, "", None);
            if let Some(p) = profile {
                assert!(
                    profiles.contains_key(p),
                    "a route names the unknown profile {p:?}"
                );
            }
            if let Some(r) = region {
                assert!(
                    r.width > 0 && r.height > 0,
                    "a route gives the empty region {r:?}"
                );
            }
        }
    }
    if !settings.notify.webhooks.is_empty() {
        webhooks_start(&settings.notify.webhooks);
    }
    let again =
        Settings::load_with_env(Some(path), std::iter::empty()).expect("the same bytes load again");
    assert_eq!(again.profiles(), profiles);
    assert_eq!(again.routes, settings.routes);
}

/// `Notifier::start` as `clipqc run` calls it, on a runtime of the fuzzer's own; the delivery
/// tasks it spawns end once the notifier is dropped and they are polled.
fn webhooks_start(webhooks: &[clipqc::notify::WebhookConfig]) {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let rt = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    });
    // Started or refused with an error: either is an answer; only a panic is not.
    let _ = rt.block_on(async { clipqc::notify::Notifier::start(webhooks, "fuzz").map(drop) });
    rt.block_on(async {
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    });
}

/// A validated profile decides any probabilities (softmax-like, one-hot, extreme, from the
/// input's bytes) and names one of its classes.
fn decides(name: &str, profile: &ProfileConfig, data: &[u8]) {
    let n = profile.classes.len();
    assert!(n > 0, "profile {name:?} loaded without classes");
    let mut inputs = vec![vec![1.0 / n as f32; n], vec![0.0; n], vec![f32::NAN; n]];
    for i in 0..n.min(8) {
        let mut one_hot = vec![0.0; n];
        one_hot[i] = 1.0;
        inputs.push(one_hot);
    }
    inputs.push(
        (0..n)
            .map(|i| f32::from(data.get(i).copied().unwrap_or(0)) / 255.0)
            .collect(),
    );
    for probabilities in inputs {
        let d = score::decide(profile, probabilities);
        assert!(d.class < n, "profile {name:?}: class {} of {n}", d.class);
        assert_eq!(d.probabilities.len(), n);
    }
}
