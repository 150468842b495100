//! `clipqc bench` as a user runs it: the binary, the tiny model, the embedded broker.
//! Checks that the figures are there and consistent, not how fast they are (that is
//! scripts/bench.sh's job, on a quiet machine).

use crate::common;

use std::process::Command;

/// `clipqc bench --json` on the tiny model, CPU, the fixtures' 250×250 JPEG, plus `args`;
/// asserts it succeeded and returns its JSON report and its stderr.
fn bench(args: &[&str]) -> (serde_json::Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_clipqc"))
        .args(["bench", "--device", "cpu", "--json"])
        .args(args)
        .arg("--model")
        .arg(common::tiny_model())
        .arg("--image")
        .arg(common::fixtures().join("images/part_250.jpg"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "clipqc bench {args:?} failed:\n{stderr}"
    );
    let report = serde_json::from_slice(&out.stdout).expect("one JSON object");
    (report, stderr)
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
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clipqc"))
        .args([
            "bench",
            "--device",
            "cpu",
            "--preprocess-device",
            "cuda",
            "--requests",
            "1",
        ])
        .arg("--model")
        .arg(common::tiny_model())
        .arg("--image")
        .arg(common::fixtures().join("images/part_250.jpg"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if tch::Cuda::is_available() {
        assert!(out.status.success(), "{stderr}");
        assert!(stderr.contains("device (Cuda(0))"), "{stderr}");
    } else {
        assert!(!out.status.success());
        assert!(stderr.contains("preprocess.device = \"cuda\""), "{stderr}");
    }
}

#[test]
fn bench_names_a_missing_image() {
    let out = Command::new(env!("CARGO_BIN_EXE_clipqc"))
        .args([
            "bench",
            "--device",
            "cpu",
            "--image",
            "/nonexistent/part.jpg",
        ])
        .arg("--model")
        .arg(common::tiny_model())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/part.jpg"), "{stderr}");
}

/// Against a real broker process (tansu): the bench creates its topics there and measures.
#[test]
#[ignore = "needs the tansu broker (scripts/test.sh)"]
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
    let config = dir.path().join("tiled.toml");
    std::fs::write(
        &config,
        r#"
[profiles.tiled]
tiles = { scales = [1.0, 0.5], overlap = 0.5, max_windows = 16 }
[[profiles.tiled.classes]]
name = "scratch"
prompts = ["a scratch"]
defect = true
[[profiles.tiled.classes]]
name = "good"
prompts = ["a clean part"]
"#,
    )
    .unwrap();
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
