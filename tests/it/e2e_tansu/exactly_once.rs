//! Exactly-once delivery against tansu 0.6.0, which has no transactions (it answers
//! InitProducerId but does not offer EndTxn): the worker must not pretend. It stops at its
//! first transaction with an error that says why and what to do, and publishes nothing a
//! read_committed reader could take for an answer.

use std::time::Duration;

use super::common::e2e::*;
use super::common::fixtures;

#[test]
#[ignore = "needs the tansu broker and the Python Kafka client (scripts/test.sh)"]
fn exactly_once_on_a_broker_without_transactions_stops_the_worker_with_a_clear_error() {
    let _serial = serial();
    let broker = Broker::start();
    let topics = Topics::create(&broker, "eos", 1);
    let images = ImageServer::start(&fixtures().join("images"));
    let dir = tempfile::tempdir().unwrap();
    let mut worker = Worker::start_with_env(
        &broker,
        &topics,
        "eos-1",
        true,
        dir.path(),
        "",
        &[("CLIPQC__KAFKA__DELIVERY", "exactly_once".to_string())],
    );
    produce(&broker, &topics.requests, 3, &images.url("part_250.jpg"), 0);
    let status = worker
        .wait_exit(Duration::from_secs(180))
        .unwrap_or_else(|| panic!("the worker kept running\n{}", worker.log_tail()));
    assert!(!status.success(), "{status:?}");
    let log = std::fs::read_to_string(&worker.log).unwrap();
    assert!(
        log.contains("does not support transactions") && log.contains("at_least_once"),
        "{}",
        worker.log_tail()
    );
}
