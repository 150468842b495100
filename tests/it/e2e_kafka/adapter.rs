//! Periodic fine-tuning on the real broker: `clipqc adapt --publish` trains an adapter on the
//! bank's exemplars, passes the gate on held-out images, and writes it to the adapter topic;
//! both running workers then name it in their verdicts (`adapter_version`), without a restart.

use std::collections::HashSet;
use std::time::Duration;

use super::common::cli::{clipqc, succeeded};
use super::common::e2e::*;
use super::common::wait_for;
use super::exemplars::{add_exemplar, banked};

/// A worker follows the adapter topic as it follows the exemplar topic: seconds, not a minute.
const FOLLOWED_WITHIN: Duration = Duration::from_secs(60);

#[test]
#[ignore = "needs Apache Kafka (scripts/kafka.sh) and the Python Kafka client (scripts/test.sh)"]
fn a_published_adapter_reaches_every_worker_without_a_restart() {
    let e = E2e::start("adapt", 2);
    e.broker.create_topic("clipqc.exemplars", 1);
    e.broker.create_topic("clipqc.adapters", 1);
    let profile = banked();
    let a = e.worker("adapt-a").config(&profile).start();
    let b = e.worker("adapt-b").config(&profile).start();
    let verdicts = follow(&e.broker, &e.topics.verdicts, 100_000, START_WITHIN);
    let take = |n: usize| take(&verdicts, n, START_WITHIN, &[&a, &b]);
    let adapter_of = |v: &ReadBack| {
        v.verdict
            .as_ref()
            .and_then(|j| j.get("adapterVersion"))
            .and_then(|s| s.as_str())
            .map(str::to_string)
    };
    e.produce(10, 0);
    assert!(take(10).iter().all(|v| adapter_of(v).is_none()));

    // A bank of the held-out set's own kind of parts, then the adapter trained on it.
    let data = e.dir.path().join("holdout");
    crate::eval_cli::make_dataset(&data);
    let config = e.dir.path().join("adapt-a.toml");
    add_exemplar(&config, "good", &data.join("good/good_0.png"));
    add_exemplar(&config, "good", &data.join("good/good_1.png"));
    add_exemplar(&config, "scratch", &data.join("surface_scratch/surface_scratch_0.png"));
    let out_dir = e.dir.path().join("adapt-out");
    let (c, d, o) = (
        config.display().to_string(),
        data.display().to_string(),
        out_dir.display().to_string(),
    );
    let stdout = succeeded(&clipqc([
        "adapt", "--config", &c, "--holdout", &d, "--normal", "good", "--out", &o, "--publish",
    ]));
    eprintln!("{stdout}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("adapt.json")).unwrap()).unwrap();
    assert_eq!(report["published"], true, "{report}");
    let version = report["adapter_version"].as_str().unwrap().to_string();
    assert_eq!(version.len(), 16);

    let mut named = HashSet::new();
    wait_for("both workers to use the adapter", FOLLOWED_WITHIN, || {
        e.produce(10, 0);
        for v in take(10) {
            if adapter_of(&v).as_deref() == Some(version.as_str()) {
                named.insert(v.header("clipqc-worker").unwrap().to_string());
            }
        }
        match named.len() {
            2 => Ok(()),
            _ => Err(format!("only {named:?}\n{}\n{}", a.log_tail(), b.log_tail())),
        }
    });
    assert!(a.log_text().contains("adapter applied"), "{}", a.log_tail());
    for w in [a, b] {
        assert!(w.terminate(), "clean exit");
    }
}
