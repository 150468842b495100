//! The feedback loop on the mock cluster: a record whose exemplar is not acknowledged (here:
//! an exemplar topic refusing writes for a while) is tried again before any later record is
//! read. It used to be "left for later", and the next record's stored offset then committed
//! past it: the answer was lost.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use clipqc::exemplars::feedback::{self, FeedbackDeps, FeedbackSettings};
use clipqc::model::Artifact;
use clipqc::proto::v1::{feedback::Image, Exemplar, Feedback};
use prost::Message as _;
use rdkafka::producer::FutureRecord;
use rdkafka::types::RDKafkaRespErr;
use tokio_util::sync::CancellationToken;

use super::common;
use super::common::kafka::*;

/// Feedback loops take a second or two per record; a minute is a loop that never gets there.
const WITHIN: Duration = Duration::from_secs(60);

async fn wait(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WITHIN;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {WITHIN:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_not_done_is_tried_again_before_the_next_record_and_never_skipped() {
    let (mock, mut settings, brokers) = cluster("clipqc-feedback-retry");
    mock.create_topic("clipqc.feedback", 1, 1).unwrap();
    mock.create_topic("clipqc.exemplars", PARTITIONS, 1).unwrap();
    settings.kafka.feedback_topic = "clipqc.feedback".into();
    let producer = producer(&brokers);
    for (i, image) in ["part_250.jpg", "part_640x480.png"].iter().enumerate() {
        let fb = Feedback {
            request_id: format!("r-{i}"),
            image: Some(Image::InlineData(
                std::fs::read(common::fixtures().join("images").join(image)).unwrap(),
            )),
            profile: "default".into(),
            true_class: "surface_scratch".into(),
            operator: "ana".into(),
            ..Default::default()
        };
        let payload = fb.encode_to_vec();
        producer
            .send(
                FutureRecord::to("clipqc.feedback").key("r").payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    // The exemplar topic refuses every write until told otherwise.
    mock.topic_error(
        "clipqc.exemplars",
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
    )
    .unwrap();

    let artifact = Artifact::open(common::tiny_model()).unwrap();
    let (owner, model) = tiny_clip(&artifact);
    let deps = FeedbackDeps::new(
        FeedbackSettings {
            kafka: &settings.kafka,
            fetch: &settings.fetch,
            preprocess: &settings.preprocess,
            profiles: settings.profiles(),
            per_operator_hour: 0,
        },
        &brokers,
        &artifact,
        &model,
        std::sync::Arc::new(ArcSwap::from_pointee(Default::default())),
    )
    .unwrap()
    .expect("feedback is on");
    let retried = deps.retried.clone();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(feedback::run(deps, shutdown.clone()));

    wait("the first record tried again", || {
        retried.load(Ordering::Relaxed) >= 1
    })
    .await;
    let group = format!("{}.feedback", settings.kafka.group_id);
    let committed = || {
        tokio::task::block_in_place(|| {
            common::committed_positions(&brokers, &group, "clipqc.feedback", 1)
        })
    };
    assert_eq!(
        committed().get(&0).copied().unwrap_or(0),
        0,
        "nothing committed while the first record is not done"
    );
    mock.topic_error("clipqc.exemplars", RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR)
        .unwrap();
    let exemplars = || {
        tokio::task::block_in_place(|| {
            read_all(&brokers, "clipqc.exemplars", |b| {
                Exemplar::decode(b).unwrap().source
            })
        })
    };
    wait("both answers as exemplars", || exemplars().len() >= 2).await;
    let mut sources: Vec<String> = exemplars().into_iter().map(|(_, _, s)| s).collect();
    sources.sort();
    assert!(
        sources.len() == 2
            && sources[0].ends_with("request r-0")
            && sources[1].ends_with("request r-1"),
        "both, the first one not skipped: {sources:?}"
    );
    // Stored, then committed (auto-commit every second) up to the end.
    wait("the feedback committed to its end", || {
        committed().get(&0) == Some(&2)
    })
    .await;
    shutdown.cancel();
    running.await.unwrap().unwrap();
    drop(model);
    owner.join();
}
