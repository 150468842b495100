//! `clipqc adapt` on a (mock) broker's exemplar bank and a held-out labelled set: one seed
//! gives the same adapter twice; a challenger made worse on purpose (trained on exemplars
//! whose labels are swapped, weighted heavily, against a zero-shot current profile) is
//! refused, exit 1, and nothing is published; adapt.json and adapt.png are written either way.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::{make_dataset, Output};
use crate::common::cli::{clipqc, succeeded};
use crate::common::profile::{self, Class};
use crate::common::{kafka, tiny_model};

const SCRATCH: Class = Class {
    name: "surface_scratch",
    ..profile::SCRATCH
};

fn config(dir: &Path, brokers: &str) -> std::path::PathBuf {
    let text = format!(
        "[kafka]\nbrokers = \"{brokers}\"\n[model]\ndir = \"{}\"\n{}",
        tiny_model().display(),
        // The cache off: the current profile is zero-shot, whatever the bank holds.
        profile::toml("default", &["exemplars = { alpha = 0.0 }"], &[SCRATCH, profile::GOOD])
    );
    let path = dir.join("clipqc.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn adapt(config: &Path, data: &Path, out: &Path, extra: &[&str]) -> (Output, Value) {
    let (c, d, o) = (
        config.display().to_string(),
        data.display().to_string(),
        out.display().to_string(),
    );
    let mut args = vec![
        "adapt", "--config", &c, "--holdout", &d, "--normal", "good", "--out", &o, "--epochs", "10",
    ];
    args.extend(extra);
    let output = clipqc(&args);
    let report = std::fs::read(out.join("adapt.json"))
        .map(|b| serde_json::from_slice(&b).unwrap())
        .unwrap_or(Value::Null);
    (output, report)
}

fn add(config: &Path, data: &Path, class: &str, images: &[&str]) {
    let c = config.display().to_string();
    let mut args = vec!["exemplar", "add", "--profile", "default", "--class", class, "--config", &c];
    let paths: Vec<String> = images.iter().map(|i| data.join(i).display().to_string()).collect();
    args.extend(paths.iter().map(String::as_str));
    succeeded(&clipqc(&args));
}

fn records_on(brokers: &str, topic: &str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "adapt-test")
        .create()
        .unwrap();
    let (low, high) = c
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .unwrap();
    high - low
}

#[test]
#[ignore = "needs the tiny model (scripts/test.sh makes it)"]
fn one_seed_one_adapter_and_a_worse_challenger_is_refused() {
    let (mock, _, brokers) = kafka::cluster("adapt-cli");
    mock.create_topic("clipqc.exemplars", 1, 1).unwrap();
    mock.create_topic("clipqc.adapters", 1, 1).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("parts");
    make_dataset(&data);
    let cfg = config(tmp.path(), &brokers);

    // Labels swapped on purpose: good parts filed as scratches, scratched ones as good.
    add(&cfg, &data, "surface_scratch", &["good/good_0.png", "good/good_1.png", "good/good_2.png"]);
    add(&cfg, &data, "good", &["surface_scratch/surface_scratch_0.png", "surface_scratch/surface_scratch_1.png", "surface_scratch/surface_scratch_2.png"]);
    let worse = tmp.path().join("worse");
    let (out, report) = adapt(&cfg, &data, &worse, &["--alpha", "100", "--publish"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert_eq!(out.status.code(), Some(1), "refused: exit 1\n{stdout}");
    assert!(stdout.contains("refused"), "{stdout}");
    assert_eq!(report["published"], false, "{report}");
    assert!(report["adapter_version"].is_null(), "{report}");
    let (c, ch) = (&report["current"], &report["challenger"]);
    assert!(
        ch["auroc"].as_f64() < c["auroc"].as_f64() || ch["f1_max"].as_f64() < c["f1_max"].as_f64(),
        "{report}"
    );
    assert_eq!(records_on(&brokers, "clipqc.adapters"), 0, "nothing published");
    assert_eq!(report["exemplars"], 6);
    assert_eq!(report["loss"].as_array().unwrap().len(), 10);
    let png = image::open(worse.join("adapt.png")).expect("adapt.png is a PNG");
    assert_eq!((png.width(), png.height()), (800, 600));

    // One seed, one adapter: the same version (a hash of the keys) twice; another seed moves it.
    let run = |dir: &str, seed: &str| {
        let (out, report) = adapt(&cfg, &data, &tmp.path().join(dir), &["--seed", seed]);
        assert!(matches!(out.status.code(), Some(0 | 1)), "{}", String::from_utf8_lossy(&out.stderr));
        report["challenger_version"].as_str().unwrap().to_string()
    };
    let (a, b) = (run("a", "7"), run("b", "7"));
    assert_eq!(a, b, "same seed, same adapter");
    assert_eq!(a.len(), 16);
}
