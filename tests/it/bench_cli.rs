//! `clipqc bench` as a user runs it: the binary, the tiny model, the embedded broker.
//! Checks that the figures are there and consistent, not how fast they are (that is
//! scripts/bench.sh's job, on a quiet machine).

use crate::common;

use std::ffi::OsString;
use std::process::Output;

use common::cli::{clipqc, refused, stderr, succeeded};
use common::profile::{self, GOOD, SCRATCH};

/// `clipqc bench --device cpu ARGS --model TINY`, with `--image` the fixtures' 250×250 JPEG
/// unless `args` names one.
fn run_bench(args: &[&str]) -> Output {
    let mut all: Vec<OsString> = ["bench", "--device", "cpu"].map(OsString::from).into();
    all.extend(args.iter().map(OsString::from));
    all.extend(["--model".into(), common::tiny_model().into()]);
    if !args.contains(&"--image") {
        let part = common::fixtures().join("images/part_250.jpg");
        all.extend(["--image".into(), part.into()]);
    }
    clipqc(all)
}

/// `clipqc bench --json` on the tiny model, CPU, the fixtures' 250×250 JPEG, plus `args`;
/// asserts it succeeded and returns its JSON report and its stderr.
fn bench(args: &[&str]) -> (serde_json::Value, String) {
    let out = run_bench(&[&["--json"][..], args].concat());
    let report = serde_json::from_str(&succeeded(&out)).expect("one JSON object");
    (report, stderr(&out))
}

#[test]
fn bench_reports_every_request_with_the_ceiling_and_latencies() {
    let (r, stderr) = bench(&[
        "--requests",
        "60",
        "--ceiling-batches",
        "4",
        "--batch-max",
        "8",
    ]);
    assert_eq!(r["requests"], 60);
    assert_eq!(r["received"], 60);
    assert_eq!(r["errors"], 0);
    assert_eq!(r["ceiling"]["batch"], 8);
    assert!(r["ceiling"]["images_per_s"].as_f64().unwrap() > 0.0);
    assert!(r["images_per_s"].as_f64().unwrap() > 0.0);
    let lat = &r["latency_ms"];
    let (p50, p99) = (lat["p50"].as_f64().unwrap(), lat["p99"].as_f64().unwrap());
    assert!(0.0 < p50 && p50 <= p99, "{lat}");
    let size = r["batch"]["mean_size"].as_f64().unwrap();
    assert!((1.0..=8.0).contains(&size), "mean batch size {size}");
    assert!(r["memory"]["peak_rss_bytes"].as_u64().unwrap() > 1 << 20);
    // No GPU here: preprocess.device = auto keeps the host path; the process did some work.
    assert_eq!(r["preprocess"], "host");
    let cores = r["cpu_cores_used"].as_f64().unwrap();
    assert!(cores > 0.0, "CPU cores used {cores}");
    // The human table goes to stderr.
    assert!(stderr.contains("model-only ceiling"), "{stderr}");
    assert!(stderr.contains("CPU cores used"), "{stderr}");
}

/// `--preprocess-device cuda`: refused, naming the setting, without a GPU; on one, the table
/// says the images were preprocessed there.
#[test]
fn bench_preprocess_device_cuda_needs_a_gpu() {
    let out = run_bench(&["--preprocess-device", "cuda", "--requests", "1"]);
    if tch::Cuda::is_available() {
        succeeded(&out);
        let stderr = stderr(&out);
        assert!(stderr.contains("device (Cuda(0))"), "{stderr}");
    } else {
        refused(&out, None, &["preprocess.device = \"cuda\""]);
    }
}

#[test]
fn bench_names_a_missing_image() {
    let out = run_bench(&["--image", "/nonexistent/part.jpg"]);
    refused(&out, None, &["/nonexistent/part.jpg"]);
}

/// Against a real broker process (Apache Kafka): the bench creates its topics there and measures.
#[test]
#[ignore = "needs Apache Kafka (scripts/kafka.sh, scripts/test.sh)"]
fn bench_runs_against_a_given_broker() {
    let _serial = common::e2e::serial();
    let broker = common::e2e::Broker::start();
    let (r, stderr) = bench(&[
        "--requests",
        "30",
        "--ceiling-batches",
        "2",
        "--batch-max",
        "8",
        "--partitions",
        "2",
        "--brokers",
        &broker.brokers(),
    ]);
    assert_eq!(r["received"], 30, "{stderr}");
    assert_eq!(r["errors"], 0);
}

/// A tiled profile: every request is its whole frame and its windows, all model work; the
/// report counts them.
#[test]
fn bench_of_a_tiled_profile_reports_windows_per_second() {
    let dir = tempfile::tempdir().unwrap();
    let tiled = profile::toml("tiled", &[profile::TILED], &[SCRATCH, GOOD]);
    let config = profile::config_file(dir.path(), "tiled.toml", &tiled);
    let (r, stderr) = bench(&[
        "--config",
        config.to_str().unwrap(),
        "--profile",
        "tiled",
        "--requests",
        "20",
        "--ceiling-batches",
        "2",
        "--batch-max",
        "8",
    ]);
    assert_eq!(r["received"], 20, "{stderr}");
    assert_eq!(r["errors"], 0);
    // 250×250: one 250-px window, and 125-px ones every 62.5 px (3 × 3), and the whole frame.
    assert_eq!(r["views_per_image"], 11);
    let (images, windows) = (
        r["images_per_s"].as_f64().unwrap(),
        r["windows_per_s"].as_f64().unwrap(),
    );
    assert!((windows - 11.0 * images).abs() < 1e-6 * windows, "{r}");
    // Eleven views per request fill batches of 8 whatever the arrival pattern.
    let size = r["batch"]["mean_size"].as_f64().unwrap();
    assert!(size > 2.0, "mean batch size {size}");
    assert!(stderr.contains("windows/s"), "{stderr}");
}
