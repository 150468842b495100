//! The pipeline against librdkafka's mock cluster with faults: a worker that is full, the
//! broker refusing produce and commit requests, a model that breaks. (Workers joining and
//! leaving a group are tested against a real broker, in tests/e2e_kafka.rs: the mock
//! coordinator holds every rebalance for a whole session timeout and sometimes loops.) The fake model (with a delay) stands in for CLIP: these tests are
//! about records and offsets, not about scores.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use clipqc::model::{Artifact, ModelOwner};
use clipqc::pipeline::{self, RunStats};
use clipqc::proto::v1::{ErrorCode, Outcome, Verdict};
use prost::Message as _;
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::Message;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use common::kafka::*;

/// Verdicts by their source record (partition, offset), and how many came in all.
#[derive(Default)]
struct Seen {
    by_source: HashMap<(i32, i64), Verdict>,
    received: usize,
}

impl Seen {
    fn duplicates(&self) -> usize {
        self.received - self.by_source.len()
    }

    /// Read verdicts until `n` distinct source records are seen, or `patience` passes
    /// without one. Cancel-safe: what was read stays in `self`.
    async fn read(&mut self, verdicts: &StreamConsumer, n: usize, patience: Duration) {
        self.read_until(verdicts, |s| s.by_source.len() >= n, patience)
            .await
    }

    /// Read verdicts until `done`, or until `patience` passes without one.
    async fn read_until(
        &mut self,
        verdicts: &StreamConsumer,
        done: impl Fn(&Self) -> bool,
        patience: Duration,
    ) {
        while !done(self) {
            let Ok(msg) = tokio::time::timeout(patience, clipqc::source::recv(verdicts)).await
            else {
                break;
            };
            let Ok(msg) = msg else { continue };
            let v = Verdict::decode(msg.payload().unwrap()).unwrap();
            let src = v.source.clone().unwrap();
            self.by_source.insert((src.partition, src.offset), v);
            self.received += 1;
        }
    }
}

async fn collect(verdicts: &StreamConsumer, n: usize, patience: Duration) -> Seen {
    let mut seen = Seen::default();
    seen.read(verdicts, n, patience).await;
    seen
}

/// Run a worker on `settings` until `until` completes, then stop it; returns its stats, what
/// `until` returned, and the pipeline's state when `until` completed (where each record still
/// in flight was, and the consumer as librdkafka saw it: the dump for a test that waited in
/// vain).
async fn with_worker<F: std::future::Future>(
    settings: &clipqc::config::Settings,
    brokers: &str,
    model: &clipqc::model::ModelHandle,
    tune: impl FnOnce(&mut pipeline::Deps),
    until: F,
) -> (
    Result<RunStats, pipeline::RunError>,
    F::Output,
    pipeline::Snapshot,
) {
    let artifact = Artifact::open(common::tiny_model()).unwrap();
    let mut deps = deps(settings, brokers, &artifact, model);
    tune(&mut deps);
    let worker = Running::start(deps);
    let out = until.await;
    let state = worker.state();
    (worker.stop().await, out, state)
}

/// Run a worker on `settings` with `model` (its thread joined after) until `total` distinct
/// records have their verdicts, or [`PATIENCE`] passes without one; it must stop cleanly.
/// Returns its stats, the verdicts, and the pipeline's state when the reading ended, for the
/// message of a test that counts fewer.
async fn verdicts_of(
    settings: &clipqc::config::Settings,
    brokers: &str,
    (owner, model): (ModelOwner, clipqc::model::ModelHandle),
    tune: impl FnOnce(&mut pipeline::Deps),
    total: usize,
) -> (RunStats, Seen, pipeline::Snapshot) {
    let verdicts = reader(brokers, "clipqc.verdicts");
    let (stats, seen, state) = with_worker(
        settings,
        brokers,
        &model,
        tune,
        collect(&verdicts, total, PATIENCE),
    )
    .await;
    drop(model);
    owner.join();
    (stats.unwrap(), seen, state)
}

/// At most `slots` records in flight and `bytes` of byte budget.
fn slots_and_bytes(slots: usize, bytes: u64) -> impl FnOnce(&mut pipeline::Deps) {
    move |d| {
        d.pipeline.max_in_flight = slots;
        d.pipeline.max_in_flight_bytes = bytes;
    }
}

/// The faults of the tests that end in [`stops_by_itself`] show on the first records or
/// batches, seconds after the mock's 3 s first join; two minutes without a stop is a worker
/// that goes on.
const STOPS_WITHIN: Duration = Duration::from_secs(120);

/// Run a worker on `settings` with no shutdown signal: it must stop by itself within
/// [`STOPS_WITHIN`], with an error, which is returned. The model thread is joined.
async fn stops_by_itself(
    settings: &clipqc::config::Settings,
    brokers: &str,
    (owner, model): (ModelOwner, clipqc::model::ModelHandle),
    tune: impl FnOnce(&mut pipeline::Deps),
) -> pipeline::RunError {
    let artifact = Artifact::open(common::tiny_model()).unwrap();
    let mut deps = deps(settings, brokers, &artifact, &model);
    tune(&mut deps);
    let result = Running::start(deps)
        .ended(STOPS_WITHIN, "its fault shows on the first records")
        .await;
    drop(model);
    owner.join();
    result.expect_err("the worker stops with an error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_worker_pauses_its_partitions_and_keeps_to_its_byte_budget() {
    let (_mock, settings, brokers) = cluster("clipqc-full");
    let total = 40;
    publish_inline(&brokers, "f", total).await;
    let budget = 1 << 20; // a 224×224 pixel tensor is 588 KiB: one image at a time
    let model = slow_model(Duration::from_millis(50));
    let (stats, seen, state) = verdicts_of(
        &settings,
        &brokers,
        model,
        slots_and_bytes(4, budget),
        total,
    )
    .await;
    eprintln!("full worker: {stats:?}");
    assert_eq!(
        seen.by_source.len(),
        total,
        "every record got its verdict; {state}"
    );
    assert!(
        stats.pauses > 0,
        "40 records, 4 slots: the partitions were paused"
    );
    assert!(stats.peak_in_flight_bytes <= budget, "{stats:?}");
    assert_eq!(committed_total(&brokers, "clipqc-full"), total as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_produce_and_commit_requests_lose_nothing() {
    common::logs();
    let (mock, mut settings, brokers) = cluster("clipqc-refused");
    // Two settings for the mock broker's sake, not the worker's:
    // - One produce request in flight per connection. The mock does not check an idempotent
    //   producer's sequence numbers (it does only for transactional ones), while librdkafka
    //   relies on the broker doing so: when a batch is refused and the next one, already in
    //   flight, succeeds, it takes the first as written ("implicitly acked"). A real broker
    //   refuses the second with OUT_OF_ORDER_SEQUENCE_NUMBER; the mock appends it and the
    //   first batch is lost while reported delivered (seen: delivery offset -1001, librdkafka
    //   debug line IMPLICITACK).
    // - A short session: the mock coordinator holds a rebalance for a session timeout, and
    //   the second worker below must get the partitions within the test's patience.
    for (k, v) in [
        ("max.in.flight.requests.per.connection", "1"),
        ("session.timeout.ms", "6000"),
    ] {
        settings.kafka.properties.insert(k.into(), v.into());
    }
    let total = 30;
    publish_inline(&brokers, "r", total).await;
    // From now on the broker refuses the next produce and offset-commit requests with errors
    // a real cluster returns during leader elections and coordinator moves.
    use RDKafkaRespErr::*;
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        ]
        .repeat(6),
    );
    mock.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[
            RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
            RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
            RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        ]
        .repeat(3),
    );
    let (owner, model) = slow_model(Duration::from_millis(20));
    let verdicts = reader(&brokers, "clipqc.verdicts");
    // The faulty stretch, bounded: it ends when every verdict is read or none came for 20 s
    // (librdkafka retries a refused request within a second, its retry.backoff.max.ms, so 20 s
    // without a verdict is a worker that is stuck or done). Its length decides only how much
    // the first worker does: what must hold is at-least-once (nothing committed without its
    // verdict), so a second worker finishes whatever the first left.
    let (stats, mut seen, _) = with_worker(&settings, &brokers, &model, |_| {}, async {
        collect(&verdicts, total, Duration::from_secs(20)).await
    })
    .await;
    let first = seen.by_source.len();
    stats.unwrap();
    // The claim: below each committed position every record has its verdict on the topic.
    // The test's own reader may lag behind the worker under load (the broker refuses its
    // commits too), so it reads on until it has them all, or nothing comes for 30 s (the
    // worker has stopped: what is on the topic is there, fetched in milliseconds, and 30 s is
    // past a refused fetch's retries).
    let committed_by_first = committed(&brokers, "clipqc-refused");
    let unverified = |seen: &Seen| {
        committed_by_first
            .iter()
            .flat_map(|(&p, &position)| (0..position).map(move |o| (p, o)))
            .filter(|k| !seen.by_source.contains_key(k))
            .collect::<Vec<_>>()
    };
    seen.read_until(
        &verdicts,
        |s| unverified(s).is_empty(),
        Duration::from_secs(30),
    )
    .await;
    let read_after_the_stop = seen.by_source.len();
    let missing = unverified(&seen);
    if !missing.is_empty() {
        // Tell a reader that lags from verdicts the topic does not hold.
        let on_topic: HashMap<(i32, i64), (i32, i64)> =
            read_all(&brokers, "clipqc.verdicts", |b| Verdict::decode(b).unwrap())
                .into_iter()
                .map(|(p, o, v)| {
                    let s = v.source.unwrap();
                    ((s.partition, s.offset), (p, o))
                })
                .collect();
        let found: Vec<_> = missing.iter().map(|k| (k, on_topic.get(k))).collect();
        panic!(
            "committed past records whose verdicts the reader did not get: \
             {found:?} (source, where the topic holds the verdict, read afresh); \
             the topic holds {} verdicts",
            on_topic.len()
        );
    }
    mock.clear_request_errors(RDKafkaApiKey::Produce);
    mock.clear_request_errors(RDKafkaApiKey::OffsetCommit);
    let (stats, (), _) = with_worker(&settings, &brokers, &model, |_| {}, async {
        seen.read(&verdicts, total, PATIENCE).await;
        // The second worker commits its verdicts' offsets every second (auto-commit, see
        // source::consumer); 30 s is thirty commits, room for a coordinator slow to answer.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while committed_total(&brokers, "clipqc-refused") < total as i64
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    stats.unwrap();
    drop(model);
    owner.join();
    eprintln!(
        "refused produce/commit: {total} requests, {first} verdicts read while the worker ran \
         under faults, {read_after_the_stop} after it had stopped, {} distinct in all \
         after a second worker, {} duplicates",
        seen.by_source.len(),
        seen.duplicates()
    );
    assert_eq!(seen.by_source.len(), total);
    assert_eq!(
        committed(&brokers, "clipqc-refused"),
        ends(&brokers, "clipqc.requests"),
        "committed positions (left) reach the end of every partition (right); the first \
         worker had committed {committed_by_first:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_model_stops_the_worker_instead_of_failing_every_record() {
    let (_mock, mut settings, brokers) = cluster("clipqc-broken");
    settings.batch.max_size = 4;
    let total = 40;
    publish_inline(&brokers, "b", total).await;
    let model = fake_model(|fake| {
        fake.fail_images = Some("CUDA error: an illegal memory access was encountered".into());
        fake.delay = Duration::from_millis(20);
    });
    let err = stops_by_itself(&settings, &brokers, model, |d| {
        d.pipeline.max_model_failures = 3;
        // The records the model failed publish their verdicts in the drain: no time limit
        // may cut it short (this bound is far beyond what it takes).
        d.pipeline.drain_timeout_ms = 100_000;
    })
    .await;
    assert!(err.to_string().contains("illegal memory access"), "{err}");

    // What the topic holds, read to its end after the worker stopped (a reader given a few
    // seconds could see nothing, and every check below would pass on nothing).
    let seen: HashMap<(i32, i64), Verdict> =
        read_all(&brokers, "clipqc.verdicts", |b| Verdict::decode(b).unwrap())
            .into_iter()
            .map(|(_, _, v)| {
                let src = v.source.clone().unwrap();
                ((src.partition, src.offset), v)
            })
            .collect();
    eprintln!(
        "broken model: {} of {total} records got MODEL_FAILED verdicts before the worker stopped",
        seen.len()
    );
    assert!(seen.values().all(|v| v.outcome() == Outcome::Error
        && v.error.as_ref().unwrap().code() == ErrorCode::ModelFailed));
    // The first two failed batches (of 1 to 4 images) are taken for the records' own errors;
    // the third in a row declares the model broken, and the rest are left alone.
    assert!(
        (2..=2 * 4).contains(&seen.len()),
        "{} error verdicts",
        seen.len()
    );
    // Only offsets with a verdict are committed: the rest wait for a healthy worker.
    let committed = committed(&brokers, "clipqc-broken");
    for (partition, position) in committed {
        for o in 0..position {
            assert!(
                seen.contains_key(&(partition, o)),
                "committed past {partition}/{o} without a verdict"
            );
        }
    }
}

/// A webhook that takes a request and never answers: the worker's notifications to it pile
/// up in their own bounded queue while every verdict is published and committed as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_webhook_costs_the_verdicts_nothing() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let entered = Arc::new(AtomicUsize::new(0));
    let counter = entered.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<axum::http::StatusCode>()
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let (_mock, mut settings, brokers) = cluster("clipqc-hook");
    // One class, a defect: every part is a DEFECT, and each one is a notification.
    let profile = serde_json::json!({
        "classes": [{"name": "surface_scratch", "prompts": ["a surface scratch"], "defect": true}]
    });
    settings
        .profiles
        .insert("default".into(), serde_json::from_value(profile).unwrap());
    let hook: clipqc::notify::WebhookConfig = serde_json::from_value(serde_json::json!({
        "name": "hangs", "url": url, "format": "generic", "timeout_ms": 600_000, "queue": 8,
        "max_per_minute": 100_000
    }))
    .unwrap();
    let total = 200;
    publish_inline(&brokers, "h", total).await;
    let started = std::time::Instant::now();
    let (_, seen, state) = verdicts_of(
        &settings,
        &brokers,
        fake_model(|_| {}),
        |d| d.notifier = clipqc::notify::Notifier::start(&[hook], "test").unwrap(),
        total,
    )
    .await;
    eprintln!(
        "hanging webhook: {total} verdicts in {:?}; requests the hook got: {}",
        started.elapsed(),
        entered.load(Ordering::SeqCst)
    );
    assert_eq!(
        seen.by_source.len(),
        total,
        "every record got its verdict; {state}"
    );
    assert!(seen
        .by_source
        .values()
        .all(|v| v.outcome() == Outcome::Defect));
    // The one delivery the hook took is still hanging; nothing else got through to it. That
    // first request is sent as the first DEFECT verdict is published, over loopback: it has
    // arrived long before the 200th verdict, but is waited for (30 s, a bound on a hung
    // notifier) so that a slow machine cannot make it look missing.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while entered.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        entered.load(Ordering::SeqCst),
        1,
        "requests the hanging hook got (awaited: the first, for 30 s)"
    );
    assert_eq!(committed_total(&brokers, "clipqc-hook"), total as i64);
}

#[path = "pipeline_faults/records.rs"]
mod records;
#[path = "pipeline_faults/wakeups.rs"]
mod wakeups;
