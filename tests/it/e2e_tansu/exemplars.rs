//! The few-shot bank on the real broker: two workers share it, an exemplar added through the
//! CLI changes both workers' verdicts without a restart, and a worker started later reads the
//! bank before its first verdict.

use std::process::Command;
use std::time::{Duration, Instant};

use super::common::e2e::*;
use super::common::fixtures;

/// A default profile where an exemplar counts for much (alpha 50): one identical to the part
/// makes its class win whatever the random model's prompts say.
const PROFILE: &str = r#"
[profiles.default]
exemplars = { alpha = 50.0 }
[[profiles.default.classes]]
name = "scratch"
prompts = ["a surface scratch"]
defect = true
[[profiles.default.classes]]
name = "good"
prompts = ["a clean part"]
"#;

fn has_exemplar(v: &ReadBack) -> bool {
    v.verdict
        .as_ref()
        .is_some_and(|j| j.get("nearestExemplar").is_some())
}

#[test]
#[ignore = "needs the tansu broker and the Python Kafka client (scripts/test.sh)"]
fn an_exemplar_added_through_the_cli_reaches_every_worker_without_a_restart() {
    let _serial = serial();
    let broker = Broker::start();
    broker.create_topic("clipqc.exemplars", 1);
    let topics = Topics::create(&broker, "bank", 2);
    let images = ImageServer::start(&fixtures().join("images"));
    let url = images.url("part_250.jpg");
    let dir = tempfile::tempdir().unwrap();
    let a = Worker::start_with(&broker, &topics, "bank-a", true, dir.path(), PROFILE);
    let b = Worker::start_with(&broker, &topics, "bank-b", true, dir.path(), PROFILE);
    let verdicts = follow(&broker, &topics.verdicts, 100_000, Duration::from_secs(90));
    let take = |n: usize| -> Vec<ReadBack> {
        (0..n)
            .map(|_| {
                verdicts
                    .recv_timeout(Duration::from_secs(90))
                    .expect("a verdict")
            })
            .collect()
    };

    // Before: zero-shot verdicts, no exemplar.
    produce(&broker, &topics.requests, 10, &url, 0);
    let before = take(10);
    assert!(before.iter().all(|v| !has_exemplar(v)), "{before:?}");
    let zero_shot = before[0].verdict.as_ref().unwrap()["anomalyScore"]
        .as_f64()
        .unwrap_or(0.0);

    // Added through the CLI, with the workers' own config (brokers, model, profiles).
    let image = fixtures().join("images/part_250.jpg");
    let out = Command::new(env!("CARGO_BIN_EXE_clipqc"))
        .args([
            "exemplar",
            "add",
            "--profile",
            "default",
            "--class",
            "scratch",
        ])
        .arg("--config")
        .arg(dir.path().join("bank-a.toml"))
        .arg(&image)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = stdout
        .split_whitespace()
        .nth(1)
        .expect("added <profile/id> …")
        .to_string();
    let id = key.trim_start_matches("default/").to_string();
    assert_eq!(id.len(), 16, "{stdout}");

    // `classify --json` with the same config scores as the workers do: with the bank.
    let out = Command::new(env!("CARGO_BIN_EXE_clipqc"))
        .args(["classify", "--json", "--config"])
        .arg(dir.path().join("bank-a.toml"))
        .arg(&image)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let row: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        row["nearest_exemplar"]["id"],
        serde_json::json!(id),
        "{row}"
    );
    assert_eq!(row["outcome"], "DEFECT", "{row}");

    // Both workers pick it up (each owns one partition): keep asking until both answered
    // with it, within a minute.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut changed = std::collections::HashSet::new();
    while changed.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "only {changed:?} used the exemplar\n{}\n{}",
            a.log_tail(),
            b.log_tail()
        );
        produce(&broker, &topics.requests, 10, &url, 0);
        for v in take(10).iter().filter(|v| has_exemplar(v)) {
            let j = v.verdict.as_ref().unwrap();
            let near = &j["nearestExemplar"];
            assert_eq!(
                (&near["id"], &near["class"]),
                (&serde_json::json!(id), &serde_json::json!("scratch"))
            );
            assert!(near["similarity"].as_f64().unwrap() > 0.999, "{j}");
            let anomaly = j["anomalyScore"].as_f64().unwrap();
            assert!(
                anomaly > 0.99 && anomaly >= zero_shot,
                "{anomaly} vs {zero_shot}"
            );
            assert_eq!(j["outcome"], "OUTCOME_DEFECT", "{j}");
            changed.insert(v.header("clipqc-worker").unwrap().to_string());
        }
    }
    assert_eq!(
        changed,
        ["bank-a".to_string(), "bank-b".to_string()].into(),
        "both workers, no restart"
    );

    // A worker started later (its own group and topics) reads the bank before its first
    // verdict.
    let late_topics = Topics::create(&broker, "late", 1);
    let c = Worker::start_with(&broker, &late_topics, "bank-c", true, dir.path(), PROFILE);
    produce(&broker, &late_topics.requests, 3, &url, 0);
    let late = read_all(&broker, &late_topics.verdicts, 3, Duration::from_secs(90));
    assert_eq!(late.len(), 3, "{}", c.log_tail());
    assert!(late.iter().all(has_exemplar), "{late:?}");
    let log = std::fs::read_to_string(&c.log).unwrap();
    let caught_up = log
        .find("exemplar bank read to the end")
        .expect("catch-up logged");
    let consuming = log.find("consuming").expect("consuming logged");
    assert!(caught_up < consuming, "read before consuming");
    assert!(log.contains("records=1"), "{}", c.log_tail());

    // Removed: the next verdicts are zero-shot again.
    let out = Command::new(env!("CARGO_BIN_EXE_clipqc"))
        .args(["exemplar", "remove", &id, "--config"])
        .arg(dir.path().join("bank-a.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        produce(&broker, &late_topics.requests, 1, &url, 0);
        let v = follow(
            &broker,
            &late_topics.verdicts,
            usize::MAX >> 1,
            Duration::from_secs(5),
        )
        .iter()
        .last()
        .unwrap();
        if !has_exemplar(&v) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the tombstone never reached bank-c"
        );
    }
    for w in [a, b, c] {
        assert!(w.terminate(Duration::from_secs(30)), "clean exit");
    }
}
