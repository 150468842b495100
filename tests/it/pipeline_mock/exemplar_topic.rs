//! The exemplar topic's metadata at start, on the mock cluster: only "unknown topic" means
//! "no bank". An authorisation error used to read as an absent topic, and the worker served
//! with an empty bank and said nothing; a topic whose leader was not elected yet, the same.

use std::time::Duration;

use clipqc::exemplars::follow::{BankContext, Exemplars};
use clipqc::proto::v1::Exemplar;
use clipqc::score::ProfileConfig;
use prost::Message as _;
use rdkafka::producer::FutureRecord;
use rdkafka::types::RDKafkaRespErr;

use super::common::kafka::*;

fn context() -> BankContext {
    BankContext {
        profiles: [("default".to_string(), ProfileConfig::builtin_default())].into(),
        model_hash: "m".into(),
        dim: 2,
        settings: Default::default(),
    }
}

/// The mock with one exemplar on `clipqc.exemplars`.
async fn with_one_exemplar() -> (
    rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    clipqc::config::Settings,
    String,
) {
    let (mock, settings, brokers) = cluster("clipqc-exemplar-topic");
    mock.create_topic("clipqc.exemplars", 1, 1).unwrap();
    let x = Exemplar {
        id: "e1".into(),
        profile: "default".into(),
        class: "good_part".into(),
        embedding: vec![1.0, 0.0],
        dim: 2,
        model_hash: "m".into(),
        ..Default::default()
    };
    let payload = x.encode_to_vec();
    producer(&brokers)
        .send(
            FutureRecord::to("clipqc.exemplars")
                .key("default/e1")
                .payload(&payload),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    (mock, settings, brokers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exemplar_topic_the_worker_may_not_read_stops_its_start() {
    let (mock, settings, brokers) = with_one_exemplar().await;
    mock.topic_error(
        "clipqc.exemplars",
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
    )
    .unwrap();
    let started = tokio::task::block_in_place(|| {
        Exemplars::start(&settings.kafka, &brokers, context(), Duration::from_secs(60))
    });
    let err = started.err().expect("the start is refused");
    let message = format!("{err:#}");
    assert!(
        message.contains("clipqc.exemplars") && message.contains("may not be read"),
        "{message}"
    );
}

/// A leader not elected yet (a broker restarting at the fleet's rollout) is asked again:
/// once the topic answers, the bank is read whole before the start returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_without_a_leader_yet_is_asked_again_and_read_whole() {
    let (mock, settings, brokers) = with_one_exemplar().await;
    mock.topic_error(
        "clipqc.exemplars",
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
    )
    .unwrap();
    let (asked_tx, asked) = std::sync::mpsc::channel::<()>();
    let start = std::thread::spawn({
        let (kafka, brokers) = (settings.kafka.clone(), brokers.clone());
        move || {
            let started = Exemplars::start(&kafka, &brokers, context(), Duration::from_secs(120));
            let _ = asked_tx.send(());
            started
        }
    });
    // Still asking after a few tries (each half a second apart): not taken as "no topic".
    assert!(
        asked.recv_timeout(Duration::from_secs(2)).is_err(),
        "the start returned while the topic had no leader"
    );
    mock.topic_error("clipqc.exemplars", RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR)
        .unwrap();
    let exemplars = start.join().unwrap().unwrap();
    let bank = exemplars.bank.load();
    let held = bank.profile("default").map_or(0, |b| b.len());
    assert_eq!(held, 1, "the exemplar read before the start returned");
}
