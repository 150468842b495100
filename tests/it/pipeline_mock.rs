//! The whole pipeline in-process against librdkafka's mock cluster, with the tiny model:
//! every request gets exactly one verdict, every bad one also a dead letter, and the group's
//! committed offsets reach the end of every partition.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use clipqc::model::Artifact;
use clipqc::proto::v1::{
    inspection_request::Image, ErrorCode, InspectionRequest, Outcome, Verdict,
};
use prost::Message as _;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};

use common::kafka::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gets_one_verdict_and_offsets_are_committed() {
    let (_mock, mut settings, brokers) = cluster("clipqc-test");
    let images = common::fixtures().join("images");
    settings.fetch.file_roots = vec![images.clone()];

    // Requests: good ones inline (protobuf) and by file:// URI (JSON), and five kinds of bad.
    let producer = producer(&brokers);
    let jpeg = std::fs::read(images.join("part_250.jpg")).unwrap();
    let png_uri = file_uri(&images.join("part_640x480.png"));
    let mut expected: HashMap<String, Option<ErrorCode>> = HashMap::new();
    for i in 0..40 {
        let id = format!("req-{i}");
        let (payload, ct, err) = match i % 10 {
            0..=3 => {
                let r = InspectionRequest {
                    request_id: id.clone(),
                    camera_id: format!("cam-{}", i % 4),
                    line_id: "line-1".into(),
                    image: Some(Image::InlineData(jpeg.clone())),
                    ..Default::default()
                };
                (r.encode_to_vec(), "application/x-protobuf", None)
            }
            4 | 5 => {
                let body =
                    format!(r#"{{"requestId":"{id}","cameraId":"cam-9","uri":"{png_uri}"}}"#);
                (body.into_bytes(), "application/json", None)
            }
            6 => {
                let body = format!(
                    r#"{{"requestId":"{id}","uri":"{png_uri}","profile":"no-such-profile"}}"#
                );
                (
                    body.into_bytes(),
                    "application/json",
                    Some(ErrorCode::UnknownProfile),
                )
            }
            7 => {
                // Already too late: answered without fetching or GPU time.
                let body = format!(
                    r#"{{"requestId":"{id}","uri":"{png_uri}","deadline":"2020-01-01T00:00:00Z"}}"#
                );
                (
                    body.into_bytes(),
                    "application/json",
                    Some(ErrorCode::DeadlineExceeded),
                )
            }
            8 => {
                // Outside fetch.file_roots.
                let body = format!(r#"{{"requestId":"{id}","uri":"file:///etc/passwd"}}"#);
                (
                    body.into_bytes(),
                    "application/json",
                    Some(ErrorCode::FetchForbidden),
                )
            }
            _ => {
                let r = InspectionRequest {
                    request_id: id.clone(),
                    image: Some(Image::InlineData(b"not an image".to_vec())),
                    ..Default::default()
                };
                (
                    r.encode_to_vec(),
                    "application/x-protobuf",
                    Some(ErrorCode::DecodeFailed),
                )
            }
        };
        expected.insert(id.clone(), err);
        let headers = OwnedHeaders::new().insert(Header {
            key: "content-type",
            value: Some(ct),
        });
        send(&producer, Some(&id), &payload, Some(headers)).await;
    }
    // And one payload that is not a request at all.
    send(&producer, None, b"\xff\xfe garbage", None).await;
    let total = expected.len() + 1;

    let artifact = Artifact::open(common::tiny_model()).unwrap();
    let (owner, model) = tiny_clip(&artifact);
    let worker = Running::start(deps(&settings, &brokers, &artifact, &model));

    // Read every verdict back.
    let verdicts_in = reader(&brokers, "clipqc.verdicts");
    let mut seen = HashSet::new();
    let mut errors = 0;
    while seen.len() < total {
        let msg = worker.next(&verdicts_in, "verdict").await;
        let v = Verdict::decode(msg.payload().unwrap()).unwrap();
        let src = v.source.clone().unwrap();
        assert!(
            seen.insert((src.partition, src.offset)),
            "one verdict per request: {src:?} twice"
        );
        let ct = msg
            .headers()
            .unwrap()
            .iter()
            .find(|h| h.key == "content-type")
            .and_then(|h| h.value)
            .unwrap();
        assert_eq!(ct, b"application/x-protobuf");
        match expected.get(&v.request_id) {
            Some(None) => {
                assert_ne!(v.outcome(), Outcome::Error, "{v:?}");
                assert_eq!(v.scores.len(), 5);
                assert_eq!(v.model.as_ref().unwrap().hash, artifact.model_hash());
            }
            Some(Some(code)) => {
                assert_eq!(v.outcome(), Outcome::Error);
                assert_eq!(v.error.as_ref().unwrap().code(), *code, "{v:?}");
                errors += 1;
            }
            None => {
                assert_eq!(v.request_id, "", "the undecodable payload");
                assert_eq!(v.error.as_ref().unwrap().code(), ErrorCode::InvalidRequest);
                errors += 1;
            }
        }
    }
    // 4 each of unknown profile, deadline, forbidden path, undecodable image; 1 garbage payload.
    assert_eq!(errors, 4 * 4 + 1);

    // Each failure is also on the dead-letter topic, unchanged, with its coordinates.
    let dlq_in = reader(&brokers, "clipqc.dlq");
    for _ in 0..errors {
        let msg = worker.next(&dlq_in, "dead letter").await;
        let h: HashMap<&str, &[u8]> = msg
            .headers()
            .unwrap()
            .iter()
            .map(|h| (h.key, h.value.unwrap_or_default()))
            .collect();
        assert!(
            h.contains_key("__connect.errors.offset") && h.contains_key("__connect.errors.stage"),
            "{h:?}"
        );
    }

    worker.stop().await.unwrap();
    drop(model);
    owner.join();

    // The group's committed offsets reach the end of every partition: nothing left behind.
    let ends = ends(&brokers, "clipqc.requests");
    assert_eq!(
        committed(&brokers, "clipqc-test"),
        ends,
        "committed positions (left), partitions' ends (right)"
    );
    assert_eq!(ends.values().sum::<i64>() as usize, total);
}

/// SIGTERM while records are in flight: the worker stops taking records but finishes those
/// it took, and commits exactly up to them: every committed offset has its verdict, and every
/// verdict's offset is committed. The model holds its batches at a gate, so what is in flight
/// at the shutdown is fixed by the test, not by the machine's speed: one batch done, the next
/// one inside the model, at most `max_in_flight` records taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_records_and_commits_them() {
    let (_mock, mut settings, brokers) = cluster("clipqc-drain");
    settings.batch.max_size = 4;
    let total = 60;
    publish_inline(&brokers, "d", total).await;
    // The real tokenizer and profiles, a fake model that lets batches through one at a time.
    let artifact = Artifact::open(common::tiny_model()).unwrap();
    let gate = clipqc::model::fake::Gate::new();
    let (owner, model) = gated_model(gate.clone());
    let mut deps = deps(&settings, &brokers, &artifact, &model);
    let max_in_flight = deps.pipeline.max_in_flight;
    // A bound on a hung drain (one batch of 4 and the records behind it: a second), far
    // beyond what it takes: nothing is abandoned for time.
    deps.pipeline.drain_timeout_ms = 120_000;
    let worker = Running::start(deps);

    // Events, with bounds on a hung test: the first batch reaches the model after the mock's
    // 3 s first join, the second as soon as the first is let through; 120 s is twice
    // PATIENCE.
    let within = Duration::from_secs(120);
    let wait = |passed| {
        let gate = gate.clone();
        tokio::task::spawn_blocking(move || gate.wait_for_a_batch(passed, within))
    };
    let first = wait(0).await.unwrap();
    assert!(
        first > 0,
        "no batch reached the model within {within:?}; {}",
        worker.state()
    );
    gate.release(1);
    let held = wait(first).await.unwrap();
    assert!(
        held > 0,
        "no second batch reached the model within {within:?} of the first; {}",
        worker.state()
    );
    // Now: `first` records done (or being published), `held` inside the model.
    worker.cancel();
    gate.open();
    worker.stop().await.unwrap();
    drop(model);
    owner.join();

    // What the topic holds, read to its end (not what a reader got within some time).
    let mut verdict_offsets: HashMap<i32, Vec<i64>> = HashMap::new();
    for (_, _, v) in read_all(&brokers, "clipqc.verdicts", |b| Verdict::decode(b).unwrap()) {
        let src = v.source.unwrap();
        verdict_offsets
            .entry(src.partition)
            .or_default()
            .push(src.offset);
    }
    let verdicts: usize = verdict_offsets.values().map(Vec::len).sum();
    eprintln!(
        "shutdown with {first} records through the model and {held} inside it: {verdicts} of \
         {total} records finished and published"
    );
    assert_eq!(
        verdicts,
        gate.passed(),
        "every record the model saw got its verdict, the batch held at the shutdown included"
    );
    assert!(verdicts >= first + held);
    assert!(
        verdicts <= first + max_in_flight + 1 && verdicts < total,
        "records not yet taken at the shutdown stay untaken ({verdicts} verdicts)"
    );

    let mut committed_total = 0;
    for (partition, position) in committed(&brokers, "clipqc-drain") {
        let mut offsets = verdict_offsets.remove(&partition).unwrap_or_default();
        offsets.sort();
        offsets.dedup();
        // Offsets are consumed from 0 in order, so "verdicts for exactly 0..position" is the claim.
        assert_eq!(
            offsets,
            (0..position).collect::<Vec<_>>(),
            "partition {partition}"
        );
        committed_total += position;
    }
    assert_eq!(
        committed_total as usize, verdicts,
        "every verdict's offset is committed, nothing more"
    );
}

/// The broker goes down mid-stream and comes back: no verdict is lost (duplicates allowed,
/// counted), and the committed offsets reach the end of every partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_loses_no_verdict() {
    let (mock, settings, brokers) = cluster("clipqc-outage");
    let total = 40;
    publish_inline(&brokers, "o", total).await;
    let artifact = Artifact::open(common::tiny_model()).unwrap();
    let (owner, model) = slow_model(Duration::from_millis(100));
    let worker = Running::start(deps(&settings, &brokers, &artifact, &model));

    let verdicts_in = reader(&brokers, "clipqc.verdicts");
    let (mut seen, mut received) = (HashSet::new(), 0);
    let mut outage_done = false;
    // After the outage the clients reconnect within librdkafka's reconnect.backoff.max.ms
    // (10 s) and the produce requests are retried; a group that lost its coordinator rejoins
    // within a session timeout (45 s, librdkafka's default). 90 s is twice that.
    let resume_within = Duration::from_secs(90);
    while seen.len() < total {
        let msg = match worker
            .next_within(&verdicts_in, resume_within, "verdict after the outage")
            .await
        {
            Ok(msg) => msg,
            // The reader sees the outage too (transport errors) and recovers by itself.
            Err(_) => continue,
        };
        let src = Verdict::decode(msg.payload().unwrap())
            .unwrap()
            .source
            .unwrap();
        seen.insert((src.partition, src.offset));
        received += 1;
        if !outage_done {
            // Down right after the first verdict, while the rest are in flight. The sleep is
            // the fault itself, not a wait for anything: 3 s of closed connections, in which
            // the worker's fetches, produce requests and commits fail and are retried.
            mock.broker_down(1).unwrap();
            tokio::time::sleep(Duration::from_secs(3)).await;
            mock.broker_up(1).unwrap();
            outage_done = true;
        }
    }
    eprintln!(
        "broker outage: {total} requests, {} distinct verdicts, {} duplicates",
        seen.len(),
        received - seen.len()
    );
    // While the worker idles, auto-commit (every second: source::consumer's
    // auto.commit.interval.ms) commits what was stored: no shutdown needed for the positions
    // to reach the end. The event awaited is that commit; 30 s is thirty commit intervals.
    let finished = || committed_total(&brokers, "clipqc-outage");
    let idle_deadline = std::time::Instant::now() + Duration::from_secs(30);
    while finished() < total as i64 && std::time::Instant::now() < idle_deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        finished() as usize,
        total,
        "committed while running, by auto-commit, within 30 s: {:?}",
        committed(&brokers, "clipqc-outage")
    );
    worker.stop().await.unwrap();
    drop(model);
    owner.join();
    assert_eq!(finished() as usize, total, "and still after the shutdown");
}

/// Routing: a request that names no profile gets its camera's route's profile and region of
/// interest; one that names a profile keeps it; a camera without a route gets `default`.
/// The routed tiled profile's heatmap lies inside the routed region, in frame pixels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_profile_follow_their_cameras_route() {
    let (_mock, mut settings, brokers) = cluster("clipqc-routes");
    let housings: clipqc::score::ProfileConfig = serde_json::from_value(serde_json::json!({
        "tiles": {"scales": [1.0, 0.5], "max_windows": 16},
        "classes": [
            {"name": "dent", "label": "凹痕", "prompts": ["a dent"], "defect": true},
            {"name": "good", "prompts": ["a clean housing"]}
        ]
    }))
    .unwrap();
    settings.profiles.insert("housings".into(), housings);
    settings.routes = serde_json::from_value(serde_json::json!([
        {"camera": "cam-7*", "profile": "housings",
         "region": {"x": 100, "y": 50, "width": 256, "height": 256}},
        {"line": "line-9", "profile": "no-such-profile"}
    ]))
    .unwrap();
    assert!(
        settings
            .router()
            .unwrap_err()
            .to_string()
            .contains("routes[1].profile"),
        "a route to an unknown profile is refused"
    );
    settings.routes.pop();

    let png = std::fs::read(common::fixtures().join("images/part_640x480.png")).unwrap();
    let requests: Vec<_> = [
        ("routed", "cam-71", ""),
        ("explicit", "cam-72", "default"),
        ("unrouted", "cam-1", ""),
    ]
    .into_iter()
    .map(|(id, camera, profile)| InspectionRequest {
        camera_id: camera.into(),
        profile: profile.into(),
        ..inline_request(id, &png)
    })
    .collect();
    publish_requests(&brokers, &requests, true).await;

    let artifact = Artifact::open(common::tiny_model()).unwrap();
    let (owner, model) = tiny_clip(&artifact);
    let worker = Running::start(deps(&settings, &brokers, &artifact, &model));
    let verdicts_in = reader(&brokers, "clipqc.verdicts");
    let mut got = HashMap::new();
    while got.len() < 3 {
        let v = worker.next_verdict(&verdicts_in).await;
        assert_ne!(v.outcome(), Outcome::Error, "{v:?}");
        got.insert(v.request_id.clone(), v);
    }
    worker.stop().await.unwrap();
    drop(model);
    owner.join();

    let routed = &got["routed"];
    assert_eq!(routed.profile, "housings");
    // The 256×256 region: the whole, one 256-px window, 3 × 3 128-px ones.
    assert_eq!(routed.views, 11);
    let heat = routed.heatmap.as_ref().unwrap();
    assert_eq!(
        (heat.x.as_slice(), heat.y.as_slice()),
        (&[100, 164, 228][..], &[50, 114, 178][..])
    );
    assert_eq!(routed.scores[0].label, "凹痕");
    assert_eq!(
        got["explicit"].profile, "default",
        "the request's own profile wins"
    );
    assert_eq!(got["unrouted"].profile, "default");
    assert_eq!(got["unrouted"].views, 1);
    assert!(got["unrouted"].heatmap.is_none());
}

#[path = "pipeline_mock/line_memory.rs"]
mod line_memory;

#[path = "pipeline_mock/exactly_once.rs"]
mod exactly_once;

#[path = "pipeline_mock/exemplar_topic.rs"]
mod exemplar_topic;

#[path = "pipeline_mock/feedback.rs"]
mod feedback;

#[path = "pipeline_mock/segment.rs"]
mod segment;

#[path = "pipeline_mock/device.rs"]
mod device;
