//! Operator feedback on the real broker: two workers share the feedback topic as one group;
//! each accepted record becomes exactly one exemplar (keyed by its image), duplicates change
//! nothing, and records naming an unknown profile or class are refused to the dead-letter
//! topic with a reason.

use std::collections::HashSet;
use std::time::Duration;

use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::common::cli::{clipqc, succeeded};
use super::common::e2e::*;
use super::common::{fixtures, metric, profile, wait_for};
use clipqc::proto::v1::{feedback, Feedback};

/// Every feedback record learned from.
fn learning() -> String {
    let learn = "feedback = { learn = \"all\" }";
    profile::toml("default", &[learn], &[profile::SCRATCH, profile::GOOD])
}

/// The workers' feedback group takes a record as it comes, embeds its image with the tiny
/// model and publishes the exemplar: a second or two per record; 90 s for the eight here is a
/// feedback loop that is stuck.
const LEARNED_WITHIN: Duration = Duration::from_secs(90);

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
        // The send's queue timeout: room in the producer's queue, never short for eight
        // records (the delivery is bounded by librdkafka's message.timeout.ms, 300 s).
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
    let config = config.display().to_string();
    succeeded(&clipqc(["exemplar", "list", "--json", "--config", &config]))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
#[ignore = "needs Apache Kafka (scripts/kafka.sh) and the Python Kafka client (scripts/test.sh)"]
fn feedback_becomes_exactly_one_exemplar_per_image_with_two_workers() {
    let e = E2e::start("fb", 2);
    e.broker.create_topic("clipqc.exemplars", 1);
    e.broker.create_topic("clipqc.feedback", 2);
    let profile = learning();
    let a = e.worker("fb-a").config(&profile).start();
    let b = e.worker("fb-b").config(&profile).start();
    let config = e.dir.path().join("fb-a.toml");
    // The first verdicts wait for the workers' start; the reader stops after as long without
    // one, and then `take` says which verdict did not come.
    let verdicts = follow(&e.broker, &e.topics.verdicts, 100_000, START_WITHIN);
    let take = |n: usize| -> Vec<(String, serde_json::Value)> {
        take(&verdicts, n, START_WITHIN, &[&a, &b])
            .into_iter()
            .map(|v| {
                let worker = v.header("clipqc-worker").unwrap_or_default().to_string();
                (worker, v.verdict.expect("JSON verdicts"))
            })
            .collect()
    };
    // Before any feedback: the zero-shot verdict of part_250.
    e.produce(6, 0);
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
    publish(&e.broker, &records);

    wait_for("an exemplar per image", LEARNED_WITHIN, || {
        let bank = list(&config);
        match bank.len() >= IMAGES.len() {
            true => Ok(()),
            false => Err(format!(
                "{} exemplars\n{}\n{}",
                bank.len(),
                a.log_tail(),
                b.log_tail()
            )),
        }
    });
    // The operator said part_250 is good: the next verdicts for that part, on both workers
    // (each owns one partition), come with that exemplar and a lower anomaly score. The
    // workers follow the exemplar topic as records come (a second or two); 60 s is a worker
    // that never reads it.
    let mut changed = HashSet::new();
    wait_for(
        "both workers to use the exemplar",
        Duration::from_secs(60),
        || {
            e.produce(10, 0);
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
            match changed.len() {
                2 => Ok(()),
                _ => Err(format!("only {changed:?} changed")),
            }
        },
    );
    // The same feedback again (a replay, a second operator): still one exemplar per image.
    publish(&e.broker, &records[..IMAGES.len()]);
    let dead = read_all(&e.broker, &e.topics.dlq, 2, IDLE);
    assert_eq!(dead.len(), 2, "the two refused records are dead-lettered");
    for d in &dead {
        assert_eq!(d.header("__connect.errors.stage"), Some("feedback"));
        let msg = d
            .header("__connect.errors.exception.message")
            .unwrap_or_default();
        assert!(msg.contains("dent") || msg.contains("housings"), "{msg}");
    }
    // Both workers' counts: every record handled once, by one of them. The replay's six
    // records take the same path as the first ones (LEARNED_WITHIN).
    let count = |result: &str| -> f64 {
        [&a, &b]
            .iter()
            .map(|w| metric(&w.metrics(), "clipqc_feedback_total", &[("result", result)]))
            .sum()
    };
    wait_for("the replay to be handled", LEARNED_WITHIN, || {
        match (count("applied"), count("refused")) {
            (applied, refused) if applied >= 12.0 && refused >= 2.0 => Ok(()),
            (applied, refused) => Err(format!("{applied} applied, {refused} refused")),
        }
    });
    assert_eq!(count("applied"), 12.0);
    assert_eq!(count("refused"), 2.0);
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
        assert!(w.terminate(), "clean exit");
    }
}
