//! Operations end to end, with real parts: an Apache Kafka broker, the worker binary, Prometheus and
//! Alertmanager from Debian's packages, and webhook receivers served by the test.
//!
//! One scenario, because each part takes seconds to start: requests flow (some with missing
//! images); Prometheus scrapes the worker and the test reads the counts back through the
//! query API; the project's alert rules load and evaluate cleanly in a real Prometheus; a
//! rule firing in Prometheus and the worker's own DEFECT hook both reach the test's webhook
//! through Alertmanager; the generic hook reports a line's defect rate; verdicts continue the
//! requests' trace context; every series the Grafana dashboard and the rules query is one
//! the worker exposes.

use crate::common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use common::e2e::*;
use common::ops::{self, Receiver};

const REQUESTS: usize = 40;
const BAD_EVERY: usize = 10;

/// Series that only a CUDA device produces: a CPU-only machine cannot expose them.
const CUDA_ONLY: [&str; 1] = ["clipqc_gpu_memory_bytes"];

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
#[ignore = "needs Apache Kafka, Prometheus and Alertmanager (scripts/test.sh)"]
fn prometheus_scrapes_the_worker_and_alerts_reach_webhooks() {
    let e = E2e::start("ops", 3);
    let dir = e.dir.path();
    let receiver = Receiver::start();
    let alertmanager = ops::alertmanager(dir, &receiver.url("alertmanager"));

    // Every part is a DEFECT (a profile with one class, a defect); the worker tells
    // Alertmanager of each (its API format) and the generic hook of the line's rate.
    let extra = format!(
        r#"[profiles.default]
classes = [{{ name = "surface_scratch", prompts = ["a surface scratch"], defect = true }}]

[[notify.webhooks]]
name = "alertmanager"
url = "{am}/api/v2/alerts"
format = "alertmanager"

[[notify.webhooks]]
name = "line-ops"
url = "{generic}"
format = "generic"
on_defect = false
defect_rate = {{ threshold = 0.5, window_seconds = 600, min_verdicts = 5 }}
"#,
        am = alertmanager.base(),
        generic = receiver.url("generic"),
    );
    let worker = e.worker("ops-1").config(&extra).start();
    let addr = worker.http_addr();

    let test_rules = dir.join("test.rules.yml");
    std::fs::write(
        &test_rules,
        r#"groups:
  - name: test
    rules:
      - alert: ClipqcTestDefectsSeen
        expr: sum(clipqc_verdicts_total{outcome="defect"}) > 0
        labels: { severity: test }
"#,
    )
    .unwrap();
    let project_rules = repo().join("deploy/prometheus/rules/clipqc.rules.yml");
    let prometheus = ops::prometheus(dir, &addr, &[project_rules, test_rules], alertmanager.port);

    let published = e.produce(REQUESTS, BAD_EVERY);
    let bad = REQUESTS / BAD_EVERY;
    let verdicts = read_all(&e.broker, &e.topics.verdicts, REQUESTS, START_WITHIN);
    assert_eq!(verdicts.len(), REQUESTS, "{}", worker.log_tail());

    // Trace context: each verdict continues its request's trace, in a span of its own.
    let sent: HashMap<&str, &str> = published
        .iter()
        .map(|p| (p.request_id.as_str(), p.traceparent.as_str()))
        .collect();
    for v in &verdicts {
        let id = v.verdict.as_ref().unwrap()["requestId"].as_str().unwrap();
        let theirs: Vec<&str> = sent[id].split('-').collect();
        let ours: Vec<&str> = v
            .header("traceparent")
            .unwrap_or_else(|| panic!("verdict {id} has no traceparent"))
            .split('-')
            .collect();
        assert_eq!(ours[1], theirs[1], "same trace id for {id}");
        assert_ne!(ours[2], theirs[2], "a span of the worker's own for {id}");
    }

    // Prometheus scraped the worker: the counts read back through its query API. It scrapes
    // every second, and the lag comes from librdkafka's statistics every 5 s: 60 s is ten
    // rounds of the slowest.
    let within = Duration::from_secs(60);
    let expect = |promql: &str, want: usize| {
        ops::expect_value(&prometheus, promql, want as f64, within);
    };
    expect("sum(clipqc_verdicts_total)", REQUESTS);
    expect(
        r#"sum(clipqc_verdicts_total{outcome="defect"})"#,
        REQUESTS - bad,
    );
    expect("sum(clipqc_dead_letters_total)", bad);
    expect("sum(clipqc_records_consumed_total)", REQUESTS);
    // Every partition's lag is exported, and 0 when all is read.
    expect("count(clipqc_consumer_lag == 0)", 3);

    // The project's rules load and evaluate without errors in a real Prometheus.
    let rules: serde_json::Value =
        reqwest::blocking::get(format!("{}/api/v1/rules", prometheus.base()))
            .unwrap()
            .text()
            .map(|t| serde_json::from_str(&t).unwrap())
            .unwrap();
    let groups = rules["data"]["groups"].as_array().unwrap();
    let clipqc = groups
        .iter()
        .find(|g| g["name"] == "clipqc")
        .expect("the clipqc rule group is loaded");
    let alerts: Vec<&str> = clipqc["rules"]
        .as_array()
        .unwrap()
        .iter()
        .inspect(|r| {
            assert_eq!(
                r["health"], "ok",
                "rule {} evaluates: {}",
                r["name"], r["lastError"]
            )
        })
        .filter(|r| r["type"] == "alerting")
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    for name in [
        "ClipqcDefectRateHigh",
        "ClipqcDeadLettersHigh",
        "ClipqcConsumerLagGrowing",
        "ClipqcLatencyP99High",
        "ClipqcWorkerDown",
    ] {
        assert!(alerts.contains(&name), "{name} in {alerts:?}");
    }

    // A rule firing in Prometheus reaches the test's webhook through Alertmanager...
    let am_alert = |name: &'static str| {
        move |body: &serde_json::Value| {
            body["alerts"]
                .as_array()
                .is_some_and(|a| a.iter().any(|a| a["labels"]["alertname"] == name))
        }
    };
    // Prometheus evaluates every second and Alertmanager sends after its group_wait (1 s); the
    // worker tells Alertmanager of each DEFECT as its verdict is published. 90 s is a chain
    // that is broken, with room for a rule group's first evaluation on a loaded machine.
    let within = Duration::from_secs(90);
    receiver.expect(
        "alertmanager",
        "ClipqcTestDefectsSeen",
        within,
        am_alert("ClipqcTestDefectsSeen"),
    );
    // ...and so does the worker's own DEFECT notification, in Alertmanager's API format.
    let defect = receiver.expect(
        "alertmanager",
        "ClipqcDefect",
        within,
        am_alert("ClipqcDefect"),
    );
    let alert = defect["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["labels"]["alertname"] == "ClipqcDefect")
        .unwrap();
    assert_eq!(alert["labels"]["class"], "surface_scratch");
    assert!(alert["labels"]["line"]
        .as_str()
        .unwrap()
        .starts_with("line-"));

    // The generic hook: each line's defect rate (36 of 40 are DEFECT; ERROR verdicts do not
    // count) crossed 0.5 once at least 5 verdicts were in.
    for line in ["line-0", "line-1"] {
        let what = format!("the defect rate notification of {line}");
        let firing = receiver.expect("generic", &what, within, |b| {
            b["event"] == "defect_rate_firing" && b["line_id"] == line
        });
        assert!(firing["defect_rate"].as_f64().unwrap() >= 0.5);
        assert!(firing["verdicts"].as_u64().unwrap() >= 5);
    }

    // Every series the dashboard and the rules query is one the worker exposes.
    let exposed = exposed_names(&worker);
    let mut queried = BTreeSet::new();
    queried.extend(ops::queried_metrics(&[
        "deploy/grafana/dashboards/clipqc.json",
    ]));
    queried.extend(ops::queried_metrics(&[
        "--rules",
        "deploy/prometheus/rules/clipqc.rules.yml",
    ]));
    assert!(
        queried.len() > 10,
        "the extractor found the queries: {queried:?}"
    );
    let missing: Vec<&String> = queried
        .iter()
        .filter(|q| !exposed.contains(q.as_str()))
        .filter(|q| !CUDA_ONLY.contains(&q.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "queried but not in /metrics: {missing:?}"
    );
    // The CUDA-only series are at least ones the worker's code emits.
    let source = std::fs::read_to_string(repo().join("worker/src/metrics.rs")).unwrap();
    for name in CUDA_ONLY {
        assert!(
            source.contains(&format!("\"{name}\"")),
            "{name} is emitted by metrics.rs"
        );
    }

    let log = worker.log.clone();
    assert!(
        worker.terminate(),
        "the worker drains and exits 0 on SIGTERM\n{}",
        tail(&log, 40)
    );
}

/// The series names in the worker's `/metrics` exposition.
fn exposed_names(worker: &Worker) -> BTreeSet<String> {
    worker
        .metrics()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}
