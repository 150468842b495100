//! The few-shot bank on the real broker: two workers share it, an exemplar added through the
//! CLI changes both workers' verdicts without a restart, and a worker started later reads the
//! bank before its first verdict.

use std::collections::HashSet;
use std::time::Duration;

use super::common::cli::{clipqc, succeeded};
use super::common::e2e::*;
use super::common::{fixtures, profile, wait_for};

/// A default profile where an exemplar counts for much (alpha 50): one identical to the part
/// makes its class win whatever the random model's prompts say.
pub fn banked() -> String {
    let alpha = "exemplars = { alpha = 50.0 }";
    profile::toml("default", &[alpha], &[profile::SCRATCH, profile::GOOD])
}

/// The workers follow the exemplar topic as records come: an exemplar added (or removed) is
/// in their bank within a second or two; a minute is a worker that never reads it.
const FOLLOWED_WITHIN: Duration = Duration::from_secs(60);

fn has_exemplar(v: &ReadBack) -> bool {
    v.verdict
        .as_ref()
        .is_some_and(|j| j.get("nearestExemplar").is_some())
}

#[test]
#[ignore = "needs Apache Kafka (scripts/kafka.sh) and the Python Kafka client (scripts/test.sh)"]
fn an_exemplar_added_through_the_cli_reaches_every_worker_without_a_restart() {
    let e = E2e::start("bank", 2);
    e.broker.create_topic("clipqc.exemplars", 1);
    let profile = banked();
    let a = e.worker("bank-a").config(&profile).start();
    let b = e.worker("bank-b").config(&profile).start();
    // The first verdicts wait for the workers' start; the reader stops after as long without
    // one, and then `take` says which verdict did not come.
    let verdicts = follow(&e.broker, &e.topics.verdicts, 100_000, START_WITHIN);
    let take = |n: usize| take(&verdicts, n, START_WITHIN, &[&a, &b]);

    // Before: zero-shot verdicts, no exemplar.
    e.produce(10, 0);
    let before = take(10);
    assert!(before.iter().all(|v| !has_exemplar(v)), "{before:?}");
    let zero_shot = before[0].verdict.as_ref().unwrap()["anomalyScore"]
        .as_f64()
        .unwrap_or(0.0);

    // Added through the CLI, with the workers' own config (brokers, model, profiles).
    let image = fixtures().join("images/part_250.jpg");
    let config = e.dir.path().join("bank-a.toml");
    let stdout = add_exemplar(&config, "scratch", &image);
    let key = stdout
        .split_whitespace()
        .nth(1)
        .expect("added <profile/id> …")
        .to_string();
    let id = key.trim_start_matches("default/").to_string();
    assert_eq!(id.len(), 16, "{stdout}");

    // `classify --json` with the same config scores as the workers do: with the bank.
    let (config_arg, image_arg) = (config.display().to_string(), image.display().to_string());
    let out = clipqc(["classify", "--json", "--config", &config_arg, &image_arg]);
    let row: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        row["nearest_exemplar"]["id"],
        serde_json::json!(id),
        "{row}"
    );
    assert_eq!(row["outcome"], "DEFECT", "{row}");

    // Both workers pick it up (each owns one partition): keep asking until both answered
    // with it.
    let mut changed = HashSet::new();
    wait_for("both workers to use the exemplar", FOLLOWED_WITHIN, || {
        e.produce(10, 0);
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
        match changed.len() {
            2 => Ok(()),
            _ => Err(format!(
                "only {changed:?}\n{}\n{}",
                a.log_tail(),
                b.log_tail()
            )),
        }
    });
    assert_eq!(
        changed,
        ["bank-a".to_string(), "bank-b".to_string()].into(),
        "both workers, no restart"
    );

    // A worker started later (its own group and topics) reads the bank before its first
    // verdict.
    let late_topics = Topics::create(&e.broker, "late", 1);
    let c = Worker::named(&e.broker, &late_topics, "bank-c", e.dir.path())
        .config(&profile)
        .start();
    let url = e.part_url();
    produce(&e.broker, &late_topics.requests, 3, &url, 0);
    let late = read_all(&e.broker, &late_topics.verdicts, 3, START_WITHIN);
    assert_eq!(late.len(), 3, "{}", c.log_tail());
    assert!(late.iter().all(has_exemplar), "{late:?}");
    let log = c.log_text();
    let caught_up = log
        .find("exemplar bank read to the end")
        .expect("catch-up logged");
    let consuming = log.find("consuming").expect("consuming logged");
    assert!(caught_up < consuming, "read before consuming");
    assert!(log.contains("records=1"), "{}", c.log_tail());

    // Removed: the next verdicts are zero-shot again. One request at a time, its verdict the
    // newest (one partition): each read ends once it has every verdict so far.
    succeeded(&clipqc([
        "exemplar",
        "remove",
        &id,
        "--config",
        &config_arg,
    ]));
    let mut asked = late.len();
    wait_for("the tombstone to reach bank-c", FOLLOWED_WITHIN, || {
        produce(&e.broker, &late_topics.requests, 1, &url, 0);
        asked += 1;
        let all = read_all(&e.broker, &late_topics.verdicts, asked, IDLE);
        assert_eq!(all.len(), asked, "{}", c.log_tail());
        let newest = all.into_iter().max_by_key(|r| r.offset).unwrap();
        match has_exemplar(&newest) {
            false => Ok(()),
            true => Err(format!("{:?}", newest.verdict)),
        }
    });
    for w in [a, b, c] {
        assert!(w.terminate(), "clean exit");
    }
}

/// `clipqc exemplar add` of `image` to the default profile's `class`, with the workers'
/// `config`; its stdout ("added <profile/id> …").
pub fn add_exemplar(config: &std::path::Path, class: &str, image: &std::path::Path) -> String {
    let (config, image) = (config.display().to_string(), image.display().to_string());
    let add = ["exemplar", "add", "--profile", "default", "--class", class];
    succeeded(&clipqc(
        add.into_iter().chain(["--config", &config, &image]),
    ))
}
