//! Operator feedback on the real broker: two workers share the feedback topic as one group;
//! each accepted record becomes exactly one exemplar (keyed by its image), duplicates change
//! nothing, and records naming an unknown profile or class are refused to the dead-letter
//! topic with a reason.

use std::process::Command;
use std::time::{Duration, Instant};

use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::common::e2e::*;
use super::common::fixtures;
use clipqc::proto::v1::{feedback, Feedback};

const PROFILE: &str = r#"
[profiles.default]
feedback = { learn = "all" }
[[profiles.default.classes]]
name = "scratch"
prompts = ["a surface scratch"]
defect = true
[[profiles.default.classes]]
name = "good"
prompts = ["a clean part"]
"#;

const IMAGES: [&str; 6] = [
    "part_250.jpg",
    "part_300x201.tiff",
    "part_480x640.bmp",
    "part_640x480.png",
    "part_gray_320x240.png",
    "part_small_150x100.jpg",
];

fn publish(broker: &Broker, records: &[Feedback]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.brokers())
        .create()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for f in records {
        let payload = f.encode_to_vec();
        let record = FutureRecord::to("clipqc.feedback")
            .key(&f.request_id)
            .payload(&payload);
        rt.block_on(producer.send(record, Duration::from_secs(10)))
            .unwrap();
    }
}

fn feedback(i: usize, image: &str, profile: &str, class: &str) -> Feedback {
    Feedback {
        request_id: format!("r-{i}"),
        image: Some(feedback::Image::InlineData(
            std::fs::read(fixtures().join("images").join(image)).unwrap(),
        )),
        profile: profile.into(),
        true_class: class.into(),
        operator: "ana".into(),
        ..Default::default()
    }
}

/// The bank on the topic, as `clipqc exemplar list --json` sees it.
fn list(config: &std::path::Path) -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_clipqc"))
        .args(["exemplar", "list", "--json", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
#[ignore = "needs the tansu broker and the Python Kafka client (scripts/test.sh)"]
fn feedback_becomes_exactly_one_exemplar_per_image_with_two_workers() {
    let _serial = serial();
    let broker = Broker::start();
    broker.create_topic("clipqc.exemplars", 1);
    broker.create_topic("clipqc.feedback", 2);
    let topics = Topics::create(&broker, "fb", 2);
    let dir = tempfile::tempdir().unwrap();
    let a = Worker::start_with(&broker, &topics, "fb-a", true, dir.path(), PROFILE);
    let b = Worker::start_with(&broker, &topics, "fb-b", true, dir.path(), PROFILE);
    let config = dir.path().join("fb-a.toml");
    let images = ImageServer::start(&fixtures().join("images"));
    let url = images.url("part_250.jpg");
    let verdicts = follow(&broker, &topics.verdicts, 100_000, Duration::from_secs(90));
    let take = |n: usize| -> Vec<(String, serde_json::Value)> {
        (0..n)
            .map(|_| {
                verdicts
                    .recv_timeout(Duration::from_secs(90))
                    .expect("a verdict")
            })
            .map(|v| {
                let worker = v.header("clipqc-worker").unwrap_or_default().to_string();
                (worker, v.verdict.expect("JSON verdicts"))
            })
            .collect()
    };
    // Before any feedback: the zero-shot verdict of part_250.
    produce(&broker, &topics.requests, 6, &url, 0);
    let before = take(6);
    assert!(before
        .iter()
        .all(|(_, v)| v.get("nearestExemplar").is_none()));
    let zero_shot = before[0].1["anomalyScore"].as_f64().unwrap_or(0.0);

    let mut records: Vec<Feedback> = IMAGES
        .iter()
        .enumerate()
        .map(|(i, img)| {
            feedback(
                i,
                img,
                "default",
                if i % 2 == 0 { "good" } else { "scratch" },
            )
        })
        .collect();
    records.push(feedback(90, "part_250.jpg", "default", "dent"));
    records.push(feedback(91, "part_250.jpg", "housings", "good"));
    publish(&broker, &records);

    let deadline = Instant::now() + Duration::from_secs(90);
    let mut bank = list(&config);
    while bank.len() < IMAGES.len() {
        assert!(
            Instant::now() < deadline,
            "{} exemplars\n{}\n{}",
            bank.len(),
            a.log_tail(),
            b.log_tail()
        );
        std::thread::sleep(Duration::from_secs(1));
        bank = list(&config);
    }
    // The operator said part_250 is good: the next verdicts for that part, on both workers
    // (each owns one partition), come with that exemplar and a lower anomaly score.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut changed = std::collections::HashSet::new();
    while changed.len() < 2 {
        assert!(Instant::now() < deadline, "only {changed:?} changed");
        produce(&broker, &topics.requests, 10, &url, 0);
        for (worker, v) in take(10) {
            let Some(near) = v.get("nearestExemplar") else {
                continue;
            };
            assert_eq!(near["class"], "good", "{v}");
            assert!(near["similarity"].as_f64().unwrap() > 0.999, "{v}");
            let anomaly = v["anomalyScore"].as_f64().unwrap_or(0.0);
            assert!(anomaly < zero_shot, "{anomaly} vs {zero_shot}");
            changed.insert(worker);
        }
    }
    // The same feedback again (a replay, a second operator): still one exemplar per image.
    publish(&broker, &records[..IMAGES.len()]);
    let dead = read_all(&broker, &topics.dlq, 2, Duration::from_secs(60));
    assert_eq!(dead.len(), 2, "the two refused records are dead-lettered");
    for d in &dead {
        assert_eq!(d.header("__connect.errors.stage"), Some("feedback"));
        let msg = d
            .header("__connect.errors.exception.message")
            .unwrap_or_default();
        assert!(msg.contains("dent") || msg.contains("housings"), "{msg}");
    }
    // Both workers' counts: every record handled once, by one of them.
    let metric = |w: &Worker, result: &str| -> f64 {
        let text = reqwest::blocking::get(format!("http://{}/metrics", w.http_addr()))
            .unwrap()
            .text()
            .unwrap();
        text.lines()
            .filter(|l| l.starts_with("clipqc_feedback_total{") && l.contains(result))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&a, "applied") + metric(&b, "applied") < 12.0 {
        assert!(Instant::now() < deadline, "the replay was not handled");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(metric(&a, "applied") + metric(&b, "applied"), 12.0);
    assert_eq!(metric(&a, "refused") + metric(&b, "refused"), 2.0);
    let bank = list(&config);
    assert_eq!(bank.len(), IMAGES.len(), "{bank:?}");
    for x in &bank {
        assert!(
            x["source"].as_str().unwrap().starts_with("feedback:"),
            "{x}"
        );
        assert_eq!(x["added_by"], "ana");
    }
    let good = bank.iter().filter(|x| x["class"] == "good").count();
    assert_eq!(good, 3);
    for w in [a, b] {
        assert!(w.terminate(Duration::from_secs(30)), "clean exit");
    }
}
