//! Line memory through the pipeline: a line's parts are scored against its earlier parts and
//! the score calibrated against the line's own (leave-one-out) scores: the same part again
//! scores as the line's usual parts (the median, 0.5), a different one as odder than all of
//! them (1); nothing before `min_parts`.

use clipqc::model::Artifact;
use clipqc::proto::v1::{InspectionRequest, Verdict};
use prost::Message as _;

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
    let (owner, model) = tiny_clip(&artifact);
    let worker = Running::start(deps(&settings, &brokers, &artifact, &model));
    let producer = producer(&brokers);
    let verdicts = reader(&brokers, "clipqc.verdicts");
    let images = common::fixtures().join("images");
    // One at a time, each answered before the next: the memory order is the line's order.
    let ask = async |id: &str, file: &str| -> Verdict {
        let r = InspectionRequest {
            line_id: "line-1".into(),
            ..inline_request(id, &std::fs::read(images.join(file)).unwrap())
        };
        send(&producer, Some(id), &r.encode_to_vec(), None).await;
        loop {
            let v = worker.next_verdict(&verdicts).await;
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
    assert_eq!(same, 0.5, "the same part again: as usual as the line's parts");
    let other = ask("other", "part_640x480.png")
        .await
        .line_memory_score
        .unwrap();
    assert_eq!(other, 1.0, "a different part stands out from every part remembered");
    worker.stop().await.unwrap();
    drop(model);
    owner.join();
}
