//! Exactly-once delivery (`kafka.delivery = "exactly_once"`) on librdkafka's mock cluster.
//!
//! What the mock can show: the transactional producer's whole protocol (init, begin, produce,
//! send_offsets_to_transaction, commit) against a broker that speaks it, each request's
//! verdict (and dead letter) written once, and a fenced worker stopping. What it cannot: it
//! does not fence a zombie by itself (every InitProducerId gets a new producer id), it
//! accepts TxnOffsetCommit without storing the offsets, and it never reports aborted
//! transactions to read_committed readers; so the crash guarantee itself is shown by
//! `sink::outbox`'s property test, not here.

use std::collections::HashMap;
use std::time::Duration;

use clipqc::config::Delivery;
use clipqc::model::{Artifact, ModelOwner};
use clipqc::proto::v1::Verdict;
use prost::Message as _;

use super::common;
use super::common::kafka::*;

fn tiny() -> (Artifact, ModelOwner, clipqc::model::ModelHandle) {
    let artifact = Artifact::open(common::tiny_model()).unwrap();
    let (owner, model) = tiny_clip(&artifact);
    (artifact, owner, model)
}

async fn publish_garbage(brokers: &str, n: usize) {
    let producer = producer(brokers);
    for i in 0..n {
        send(
            &producer,
            None,
            format!("\u{1}not a request {i}").as_bytes(),
            None,
        )
        .await;
    }
}

/// Verdicts (by source partition and offset) on the verdict topic, once `n` are there. The
/// first transaction commits after the mock's 3 s first join and one batch, the others follow
/// within a second each; twice [`PATIENCE`] bounds a hung worker.
async fn verdicts(worker: &Running, brokers: &str, n: usize) -> Vec<(i32, i64)> {
    let within = 2 * PATIENCE;
    let deadline = std::time::Instant::now() + within;
    loop {
        let all = tokio::task::block_in_place(|| {
            read_all(brokers, "clipqc.verdicts", |b| Verdict::decode(b).unwrap())
        });
        if all.len() >= n {
            return all
                .into_iter()
                .map(|(_, _, v)| {
                    let s = v.source.unwrap();
                    (s.partition, s.offset)
                })
                .collect();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {n} verdicts on the topic after {within:?}; {}",
            all.len(),
            worker.state()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_mode_writes_each_verdict_once_in_transactions() {
    let (_mock, mut settings, brokers) = cluster("clipqc-eos");
    settings.kafka.delivery = Delivery::ExactlyOnce;
    settings.kafka.instance_id = Some("eos-1".into());
    publish_inline(&brokers, "eos", 24).await;
    publish_garbage(&brokers, 6).await;
    let (artifact, _owner, model) = tiny();
    let worker = Running::start(deps(&settings, &brokers, &artifact, &model));

    let seen = verdicts(&worker, &brokers, 30).await;
    let stats = worker.stop().await.unwrap();
    let mut copies: HashMap<(i32, i64), usize> = HashMap::new();
    for s in &seen {
        *copies.entry(*s).or_default() += 1;
    }
    let duplicates: Vec<_> = copies.iter().filter(|(_, &n)| n > 1).collect();
    assert_eq!(copies.len(), 30, "every request answered: {copies:?}");
    assert!(duplicates.is_empty(), "duplicates: {duplicates:?}");
    let dead = tokio::task::block_in_place(|| read_all(&brokers, "clipqc.dlq", |b| b.len()));
    assert_eq!(dead.len(), 6, "one dead letter per bad request");
    assert!(
        stats.transactions >= 1,
        "the verdicts were written in transactions: {stats:?}"
    );
    assert_eq!(stats.records, 30);
    println!(
        "exactly-once on the mock: 30 requests, {} transactions, 0 duplicates",
        stats.transactions
    );
}

/// A zombie: the broker answers the worker's transaction with PRODUCER_FENCED (a newer
/// worker with the same `instance_id`, and so the same transactional id, has started). The
/// mock cannot fence by itself (it hands every InitProducerId a new producer id), so the
/// answer is injected.
/// Exactly-once, the same megabyte key and headers: the record's small fallback used to keep
/// them, the producer refused it too, and the worker stopped (`TxnError::Refused`), as would
/// every worker after it. Now the fallback's dead letter is trimmed: every request gets its
/// verdict in a transaction, and the worker goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_a_megabyte_key_or_headers_does_not_stop_the_worker() {
    let (_mock, mut settings, brokers) = cluster("clipqc-eos-megabyte");
    settings.kafka.delivery = Delivery::ExactlyOnce;
    settings.kafka.instance_id = Some("eos-megabyte".into());
    publish_inline(&brokers, "good", 6).await;
    publish_megabyte_key_and_headers(&brokers).await;
    publish_inline(&brokers, "after", 6).await;
    let (artifact, _owner, model) = tiny();
    let worker = Running::start(deps(&settings, &brokers, &artifact, &model));
    let seen = verdicts(&worker, &brokers, 14).await;
    let distinct: std::collections::HashSet<_> = seen.iter().collect();
    assert_eq!(distinct.len(), 14, "{}", worker.state());
    assert_trimmed_dead_letters(&brokers);
    worker
        .stop()
        .await
        .expect("the worker was still running, and stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_worker_stops_with_an_error_naming_it() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let (mock, mut settings, brokers) = cluster("clipqc-eos-fence");
    settings.kafka.delivery = Delivery::ExactlyOnce;
    settings.kafka.instance_id = Some("eos-zombie".into());
    publish_inline(&brokers, "first", 6).await;
    let (artifact, _owner, model) = tiny();
    let worker = Running::start(deps(&settings, &brokers, &artifact, &model));
    assert_eq!(verdicts(&worker, &brokers, 6).await.len(), 6);

    mock.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED; 100],
    );
    publish_inline(&brokers, "second", 6).await;
    // The refusal comes with the transaction of the second records, a batch after they are
    // fetched, and a fenced producer fails for good at once; 90 s bounds a worker that goes on.
    let ended = worker
        .ended(Duration::from_secs(90), "the fence is fatal")
        .await;
    let error = ended.map(|_| ()).unwrap_err().to_string();
    assert!(
        error.contains("failed for good") && error.contains("clipqc-clipqc-eos-fence-eos-zombie"),
        "{error}"
    );
}

/// Throughput of exactly-once against at-least-once, measured in one run on the mock cluster
/// with the fake model (so the delivery's cost is what differs). A benchmark, not a check:
/// `cargo test --test it measure_delivery_throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, run by hand"]
async fn measure_delivery_throughput_exactly_once_against_at_least_once() {
    const N: usize = 600;
    let mut rates = Vec::new();
    // Twice each, alternating, so neither mode alone gets the cold start or a busy moment.
    let modes = [Delivery::AtLeastOnce, Delivery::ExactlyOnce];
    for (round, delivery) in modes.iter().chain(&modes).copied().enumerate() {
        let (_mock, mut settings, brokers) = cluster(&format!("clipqc-rate-{round}"));
        settings.kafka.delivery = delivery;
        settings.kafka.instance_id = Some(format!("rate-{delivery:?}"));
        publish_inline(&brokers, "rate", N).await;
        let (_owner, model) = slow_model(Duration::ZERO);
        let artifact = Artifact::open(common::tiny_model()).unwrap();
        let mut deps = deps(&settings, &brokers, &artifact, &model);
        deps.pipeline.max_in_flight = 256;
        let started = std::time::Instant::now();
        let worker = Running::start(deps);
        // Hundreds of records a second in either mode: 600 take seconds; five minutes is a
        // hung run.
        let deadline = started + Duration::from_secs(300);
        loop {
            let written: i64 = tokio::task::block_in_place(|| ends(&brokers, "clipqc.verdicts"))
                .values()
                .sum();
            if written as usize >= N {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{written} of {N} written in 300 s; {}",
                worker.state()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        let stats = worker.stop().await.unwrap();
        println!(
            "{delivery:?}: {N} requests in {seconds:.2} s = {:.0}/s ({} transactions)",
            N as f64 / seconds,
            stats.transactions
        );
        rates.push(N as f64 / seconds);
    }
    println!(
        "exactly-once / at-least-once throughput: {:.2}",
        (rates[1] + rates[3]) / (rates[0] + rates[2])
    );
}
