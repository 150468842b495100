//! Exactly-once delivery against tansu 0.6.0, which has no transactions (it answers
//! InitProducerId but does not offer EndTxn): the worker must not pretend. It stops at its
//! first transaction with an error that says why and what to do, and publishes nothing a
//! read_committed reader could take for an answer.

use super::common::e2e::*;

#[test]
#[ignore = "needs the tansu broker and the Python Kafka client (scripts/test.sh)"]
fn exactly_once_on_a_broker_without_transactions_stops_the_worker_with_a_clear_error() {
    let e = E2e::start("eos", 1);
    let delivery = [("CLIPQC__KAFKA__DELIVERY", "exactly_once".to_string())];
    let worker = e.worker("eos-1").env(&delivery).start();
    e.produce(3, 0);
    // The worker starts (START_WITHIN), takes the first records and stops at their
    // transaction: the broker refuses it at once. A bound on a worker that goes on.
    let error = worker.refused(
        START_WITHIN + START_WITHIN / 2,
        "a start, then one batch's transaction",
    );
    assert!(
        error.contains("does not support transactions") && error.contains("at_least_once"),
        "{error}"
    );
}
