//! Line memory through the pipeline: a line's parts are scored against its earlier parts;
//! the same part again scores as normal, a different one higher; nothing before `min_parts`.

use std::time::Duration;

use clipqc::model::tch_backend::TchBackend;
use clipqc::model::{Artifact, DeviceSpec, ModelOwner};
use clipqc::pipeline;
use clipqc::proto::v1::{inspection_request::Image, InspectionRequest, Verdict};
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

use super::common;
use super::common::kafka::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_unlike_its_lines_recent_parts_stands_out() {
    let (_mock, mut settings, brokers) = cluster("clipqc-memory");
    let profile: clipqc::score::ProfileConfig = serde_json::from_value(serde_json::json!({
        "line_memory": {"min_parts": 3},
        "classes": [
            {"name": "dent", "prompts": ["a dent"], "defect": true},
            {"name": "good", "prompts": ["a clean housing"]}
        ]
    }))
    .unwrap();
    settings.profiles.insert("default".into(), profile);
    let artifact = Artifact::open(common::tiny_model()).unwrap();
    let for_thread = artifact.clone();
    let (owner, model) =
        ModelOwner::spawn(move || TchBackend::load(&for_thread, DeviceSpec::Cpu), 2).unwrap();
    let deps = deps(&settings, &brokers, &artifact, &model);
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(pipeline::run(deps, shutdown.clone()));
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let verdicts = reader(&brokers, "clipqc.verdicts");
    let images = common::fixtures().join("images");
    // One at a time, each answered before the next: the memory order is the line's order.
    let ask = async |id: &str, file: &str| -> Verdict {
        let r = InspectionRequest {
            request_id: id.into(),
            line_id: "line-1".into(),
            image: Some(Image::InlineData(std::fs::read(images.join(file)).unwrap())),
            ..Default::default()
        };
        let payload = r.encode_to_vec();
        let record = FutureRecord::to("clipqc.requests")
            .key(id)
            .payload(&payload);
        producer.send(record, Duration::from_secs(5)).await.unwrap();
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(60), clipqc::source::recv(&verdicts))
                .await
                .expect("a verdict")
                .unwrap();
            let v = Verdict::decode(msg.payload().unwrap()).unwrap();
            if v.request_id == id {
                return v;
            }
        }
    };
    let mut scores = Vec::new();
    for i in 0..4 {
        scores.push(
            ask(&format!("same-{i}"), "part_250.jpg")
                .await
                .line_memory_score,
        );
    }
    assert_eq!(
        &scores[..3],
        &[None, None, None],
        "fewer than min_parts remembered"
    );
    let same = scores[3].expect("scored against three earlier parts");
    assert!(same < 1e-4, "the same part again: {same}");
    let other = ask("other", "part_640x480.png")
        .await
        .line_memory_score
        .unwrap();
    assert!(
        other > same + 1e-3,
        "a different part stands out: {other} vs {same}"
    );
    shutdown.cancel();
    worker.await.unwrap().unwrap();
    drop(model);
    owner.join();
}
