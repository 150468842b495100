//! End to end against a real broker process, Apache Kafka (`scripts/kafka.sh`: one KRaft node,
//! a process per test): the worker binary as a process,
//! images from an HTTP server, requests published and verdicts read back by confluent-kafka
//! (an independent client with its own librdkafka). Each test has its own topics and group.
//!
//! Crash tests use static membership (KIP-345), as a StatefulSet would: a restarted static
//! member takes its partitions back at once, without waiting for its session to end.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::e2e::*;

/// The end of each partition, from what the client published.
fn ends(published: &[Published]) -> HashMap<i32, i64> {
    let mut ends = HashMap::new();
    for p in published {
        let e = ends.entry(p.partition).or_insert(0);
        *e = (*e).max(p.offset + 1);
    }
    ends
}

struct Tally {
    distinct: HashSet<(i32, i64)>,
    received: usize,
    by_worker: HashMap<String, usize>,
}

impl Tally {
    fn new() -> Self {
        Self {
            distinct: HashSet::new(),
            received: 0,
            by_worker: HashMap::new(),
        }
    }

    fn add(&mut self, r: &ReadBack) {
        self.distinct.insert(r.source());
        self.received += 1;
        let w = r.header("clipqc-worker").unwrap_or("?").to_string();
        *self.by_worker.entry(w).or_default() += 1;
    }

    fn duplicates(&self) -> usize {
        self.received - self.distinct.len()
    }
}

/// A worker counts a verdict or a dead letter in its metrics when the broker has confirmed its
/// delivery, which may come a moment after a reader already has the record: the counts are
/// awaited (milliseconds; 30 s is a bound on a worker that never counts them).
const COUNTED_WITHIN: Duration = Duration::from_secs(30);

#[test]
#[ignore = "needs Apache Kafka (scripts/kafka.sh) and the Python Kafka client (scripts/test.sh)"]
fn requests_flow_through_a_real_broker_with_dead_letters_and_commits() {
    let e = E2e::start("flow", 3);
    let worker = e.worker("flow-1").start();
    let published = e.produce(300, 10);
    assert_eq!(published.len(), 300);
    let bad = bad(&published);

    // The first verdicts wait for the worker's start.
    let verdicts = read_all(&e.broker, &e.topics.verdicts, 300, START_WITHIN);
    let mut tally = Tally::new();
    for v in &verdicts {
        tally.add(v);
        let verdict = v.verdict.as_ref().expect("JSON verdicts");
        let outcome = verdict["outcome"].as_str().unwrap();
        if bad.contains(&v.source()) {
            assert_eq!(outcome, "OUTCOME_ERROR", "{verdict}");
            assert_eq!(
                verdict["error"]["code"], "ERROR_CODE_FETCH_FAILED",
                "{verdict}"
            );
        } else {
            assert_ne!(outcome, "OUTCOME_ERROR", "{verdict}");
            assert_eq!(verdict["scores"].as_array().unwrap().len(), 5);
        }
    }
    assert_eq!(tally.distinct.len(), 300, "{}", worker.log_tail());
    let dead = read_all(&e.broker, &e.topics.dlq, bad.len(), IDLE);
    let dead_sources: HashSet<_> = dead.iter().map(ReadBack::source).collect();
    assert_eq!(
        dead_sources, bad,
        "each bad request also on the dead-letter topic"
    );
    for d in &dead {
        assert_eq!(d.header("__connect.errors.stage"), Some("fetch"));
        assert_eq!(
            d.header("__connect.errors.topic"),
            Some(e.topics.requests.as_str())
        );
    }

    // The worker's own account, from its /metrics endpoint, once it has counted every verdict
    // and dead letter the readers got.
    assert_eq!(
        worker.get("/readyz").0,
        200,
        "ready: model warmed up, in its group"
    );
    let verdicts_counted = 300.0 + tally.duplicates() as f64;
    worker.wait_for_metric(
        "clipqc_verdicts_total",
        &[],
        verdicts_counted,
        COUNTED_WITHIN,
    );
    worker.wait_for_metric("clipqc_dead_letters_total", &[], 30.0, COUNTED_WITHIN);
    let text = worker.metrics();
    let sum = |name: &str, labels: &[(&str, &str)]| common::metric(&text, name, labels);
    let error = [("outcome", "error")];
    assert_eq!(sum("clipqc_verdicts_total", &error), 30.0, "{text}");
    assert_eq!(
        sum("clipqc_verdicts_total", &[]),
        verdicts_counted,
        "{text}"
    );
    let fetch = [("stage", "fetch")];
    assert_eq!(sum("clipqc_dead_letters_total", &fetch), 30.0, "{text}");
    let failed = [("kind", "failed")];
    assert_eq!(sum("clipqc_fetch_errors_total", &failed), 30.0, "{text}");
    assert!(sum("clipqc_batch_size_count", &[]) > 0.0, "{text}");
    let inference = [("stage", "inference")];
    assert!(
        sum("clipqc_stage_duration_seconds_count", &inference) > 0.0,
        "{text}"
    );
    assert!(text.contains("clipqc_build_info{version="), "{text}");

    assert!(worker.terminate(), "clean exit on SIGTERM");
    assert_eq!(e.committed(3), ends(&published));
    // Nothing failed: nothing may be repeated.
    assert_eq!(tally.duplicates(), 0, "duplicates in a fault-free run");
    eprintln!(
        "kafka flow: 300 requests, {} verdicts ({} duplicates), {} dead letters",
        tally.received,
        tally.duplicates(),
        dead.len()
    );
}

/// The worker SIGKILLed three times mid-stream and restarted: every request still gets its
/// verdict (the bad ones their dead letter too), and what a kill repeats is bounded: the
/// records in flight (at most `max_in_flight`) and those finished since the last commit (the
/// commit interval's worth at the measured rate, with a second of slack for the commit's own
/// round trip on a loaded machine).
#[test]
#[ignore = "needs Apache Kafka (scripts/kafka.sh) and the Python Kafka client (scripts/test.sh)"]
fn a_worker_killed_mid_batch_loses_nothing() {
    const TOTAL: usize = 2000;
    const MAX_IN_FLIGHT: usize = 32;
    // librdkafka's consumer-group log too: once under load (another CI run beside it) a
    // restarted member was assigned, revoked 3 s later and never assigned again; the kept log
    // (slow_or_stuck) then says which join or sync the broker left unanswered.
    let env = [
        ("CLIPQC__PIPELINE__MAX_IN_FLIGHT", MAX_IN_FLIGHT.to_string()),
        ("CLIPQC__KAFKA__PROPERTIES__DEBUG", "cgrp".to_string()),
        ("RUST_LOG", "info,librdkafka=debug".to_string()),
    ];
    let e = E2e::start("crash", 4);
    let start = || e.worker("crash-1").env(&env).start();
    let published = e.produce(TOTAL, 50);
    let bad = published.iter().filter(|p| p.bad).count();
    let started = Instant::now();
    let mut worker = Some(start());
    // Each kill leaves a gap in the verdicts as long as a restart: a new process's start (a
    // static member takes its partitions back at once), within START_WITHIN. The reader stops
    // after that long without a verdict, and the checks below say what was missing.
    let verdicts = follow(&e.broker, &e.topics.verdicts, TOTAL, START_WITHIN);
    let mut tally = Tally::new();
    let mut kills = Vec::new();
    let kill_at = [TOTAL * 15 / 100, TOTAL * 45 / 100, TOTAL * 75 / 100];
    for r in verdicts.iter() {
        tally.add(&r);
        if kills.len() < kill_at.len() && tally.distinct.len() >= kill_at[kills.len()] {
            // Mid-batch: verdicts are flowing, so records are in flight.
            worker.take().unwrap().kill();
            kills.push(tally.distinct.len());
            worker = Some(start());
        }
    }
    let worker = worker.unwrap();
    let lost: Vec<_> = published
        .iter()
        .filter(|p| !tally.distinct.contains(&(p.partition, p.offset)))
        .collect();
    eprintln!(
        "crash test: {TOTAL} requests ({bad} bad), {} SIGKILLs (after {:?} verdicts), {} lost, {} duplicates, {} verdicts in all, {:.0} s",
        kills.len(),
        kills,
        lost.len(),
        tally.duplicates(),
        tally.received,
        started.elapsed().as_secs_f64()
    );
    if kills.len() < 3 {
        // The verdicts stopped coming before the third kill: say whether the worker is slow
        // (a loaded machine) or stuck (no partitions, no progress).
        panic!(
            "only {} kills: the verdicts stopped at {}\n{}\n{}",
            kills.len(),
            tally.distinct.len(),
            slow_or_stuck(&e, &worker),
            worker.log_tail()
        );
    }
    let rate = tally.distinct.len() as f64 / started.elapsed().as_secs_f64();
    let commit_interval = 1.0; // source::consumer's auto.commit.interval.ms
    let bound = kills.len() * (MAX_IN_FLIGHT + (rate * (commit_interval + 1.0)).ceil() as usize);
    eprintln!(
        "crash test: duplicate bound {bound} = {} kills x ({MAX_IN_FLIGHT} in flight + {rate:.0} verdicts/s x 2 s)",
        kills.len()
    );
    assert!(
        tally.duplicates() <= bound,
        "{} duplicates, more than {bound}",
        tally.duplicates()
    );
    if !lost.is_empty() {
        panic!(
            "lost: {:?} ({} in all)\n{}\n{}",
            &lost[..lost.len().min(10)],
            lost.len(),
            slow_or_stuck(&e, &worker),
            worker.log_tail()
        );
    }
    let dead: HashSet<_> = read_all(&e.broker, &e.topics.dlq, bad, IDLE)
        .iter()
        .map(ReadBack::source)
        .collect();
    assert_eq!(dead.len(), bad, "every bad request has its dead letter");
    assert!(worker.terminate(), "clean exit on SIGTERM");
    assert_eq!(e.committed(4), ends(&published));
}

/// Why verdicts are missing, for the failure message: a worker whose group position still
/// moves is slow (the machine is loaded: more patience would do), one whose position stands
/// still while records wait is stuck, and its partition events say whether it owns any. The
/// look is 20 s long: a worker at work commits every second (auto-commit), so twenty commits
/// that do not move it mean it is stuck; it is taken only when the test has already failed.
fn slow_or_stuck(e: &E2e, worker: &Worker) -> String {
    let before = e.committed(4);
    std::thread::sleep(Duration::from_secs(20));
    let after = e.committed(4);
    let log = worker.log_text();
    let events: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("partitions assigned")
                || l.contains("partitions revoked")
                || l.contains("rebalance error")
                || l.contains("failed for good")
        })
        .collect();
    let verdict = if before != after {
        "SLOW: its committed positions still move"
    } else {
        "STUCK: its committed positions did not move in 20 s"
    };
    format!(
        "{verdict} ({before:?} -> {after:?}); the worker's last partition events:\n{}\n\
         (its whole log: {})",
        events[events.len().saturating_sub(6)..].join("\n"),
        worker.keep_log("crash-worker").display()
    )
}

/// Two workers in one group share the partitions; the second leaves with SIGTERM and its
/// partitions go back to the first with nothing lost.
#[test]
#[ignore = "needs Apache Kafka (scripts/kafka.sh) and the Python Kafka client (scripts/test.sh)"]
fn two_workers_share_the_partitions_and_hand_them_over() {
    hand_over("classic");
}

/// As [`two_workers_share_the_partitions_and_hand_them_over`], in the consumer group protocol
/// of KIP-848 (`kafka.group_protocol = "consumer"`): the broker assigns the partitions through
/// heartbeats, incrementally.
#[test]
#[ignore = "needs Apache Kafka (scripts/kafka.sh) and the Python Kafka client (scripts/test.sh)"]
fn two_workers_hand_over_under_the_kip_848_protocol() {
    hand_over("consumer");
}

/// Two dynamic members in `protocol`: B comes (its first verdict's time after its start is
/// reported), takes partitions, leaves on SIGTERM mid-stream; nothing lost or repeated.
fn hand_over(protocol: &str) {
    let e = E2e::start(&format!("pair-{protocol}"), 4);
    // Dynamic membership: a leaving member says so and the broker rebalances at once.
    let a = e.worker("pair-a").dynamic().group_protocol(protocol).start();
    // 30 requests a second, as cameras would, until the second worker has come and gone (at most
    // 4 minutes): work keeps coming while the group changes, however long the broker takes to
    // rebalance. (A fixed 30-second stream once ended before tansu, the broker of these tests
    // before Apache Kafka, gave B its partitions.)
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut producer = Some(produce_until(
        &e.broker,
        &e.topics.requests,
        &e.part_url(),
        30.0,
        60,
        stop.clone(),
        Duration::from_secs(240),
    ));
    // Verdicts come every 1/30 s while the stream lasts, the first after A's start: the
    // reader stops after START_WITHIN without one (then whatever is missing is counted lost
    // below).
    let verdicts = follow(&e.broker, &e.topics.verdicts, usize::MAX >> 1, START_WITHIN);
    let mut published: Option<Vec<Published>> = None;
    let mut tally = Tally::new();
    let mut b = None;
    let mut b_name = String::new();
    let mut b_stopped = false;
    let mut by_b = 0;
    let mut b_started = Instant::now();
    let mut b_first = None;
    loop {
        // A tick, not a bound: the loop looks at the producer at least every second.
        match verdicts.recv_timeout(Duration::from_secs(1)) {
            Ok(r) => {
                tally.add(&r);
                let worker = r.header("clipqc-worker").unwrap_or_default();
                if !b_name.is_empty() && worker.ends_with(&b_name) {
                    by_b += 1;
                    b_first.get_or_insert(b_started.elapsed());
                }
                if b.is_none() && !b_stopped && tally.distinct.len() >= 50 {
                    b_started = Instant::now();
                    let w = e.worker("pair-b").dynamic().group_protocol(protocol).start();
                    b_name = format!("/{}", w.pid());
                    b = Some(w);
                } else if !b_stopped && by_b >= 30 {
                    // The second worker has partitions and is producing verdicts: stop it
                    // mid-stream, then let the stream end.
                    let w = b.take().unwrap();
                    assert!(w.terminate(), "B drains and exits cleanly");
                    b_stopped = true;
                    stop.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            // The reader stopped for lack of verdicts: whatever is missing is lost (counted
            // below).
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if producer.as_ref().is_some_and(|p| p.is_finished()) {
            published = Some(producer.take().unwrap().join().unwrap());
        }
        if published
            .as_ref()
            .is_some_and(|p| tally.distinct.len() >= p.len())
        {
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let published = match published {
        Some(p) => p,
        None => producer.take().unwrap().join().unwrap(),
    };
    let lost = published
        .iter()
        .filter(|p| !tally.distinct.contains(&(p.partition, p.offset)))
        .count();
    eprintln!(
        "two workers ({protocol} protocol): {} requests, {} lost, {} duplicates, verdicts by worker {:?}; \
         B's first verdict {:.1} s after its process started",
        published.len(),
        lost,
        tally.duplicates(),
        tally.by_worker,
        b_first.unwrap_or_default().as_secs_f64()
    );
    assert!(
        b_stopped,
        "the second worker got partitions\n{}",
        a.log_tail()
    );
    assert_eq!(lost, 0, "{}", a.log_tail());
    // Partitions change hands only after their records are done and committed (revocation
    // waits and commits; B drains and commits on SIGTERM): nothing is repeated.
    assert_eq!(
        tally.duplicates(),
        0,
        "duplicates in a handover without a crash"
    );
    assert!(a.terminate(), "clean exit on SIGTERM");
    assert_eq!(e.committed(4), ends(&published));
}

/// A tiled default profile on the real broker: every verdict carries its views, heatmap and
/// regions (region_threshold 0 makes every finest window a region, so they merge into one box
/// over the whole frame), class labels travel, nothing is lost and the offsets are committed.
#[test]
#[ignore = "needs Apache Kafka (scripts/kafka.sh) and the Python Kafka client (scripts/test.sh)"]
fn a_tiled_profile_says_where_on_a_real_broker() {
    use common::profile::{self, GOOD, LABELLED_SCRATCH};
    let e = E2e::start("tiled", 2);
    let tiled = profile::toml("default", &[profile::TILED], &[LABELLED_SCRATCH, GOOD]);
    let worker = e.worker("tiled-1").config(&tiled).start();
    let published = e.produce(40, 0);
    let verdicts = read_all(&e.broker, &e.topics.verdicts, 40, START_WITHIN);
    let mut tally = Tally::new();
    for v in &verdicts {
        tally.add(v);
        let verdict = v.verdict.as_ref().expect("JSON verdicts");
        assert_ne!(verdict["outcome"], "OUTCOME_ERROR", "{verdict}");
        // 250×250: the whole frame, one 250-px window, 3 × 3 125-px ones.
        assert_eq!(verdict["views"], 11, "{verdict}");
        let heat = &verdict["heatmap"];
        assert_eq!(
            (heat["rows"].as_u64(), heat["cols"].as_u64()),
            (Some(3), Some(3))
        );
        assert_eq!(heat["window"], 125);
        assert_eq!(heat["x"], serde_json::json!([0, 62, 125]));
        assert_eq!(heat["scores"].as_array().unwrap().len(), 9);
        let regions = verdict["regions"].as_array().unwrap();
        assert_eq!(regions.len(), 1, "{verdict}");
        let r = &regions[0];
        // The proto3 JSON mapping leaves out zero values: a box at the origin has no x or y.
        let at = |k: &str| r[k].as_u64().unwrap_or(0);
        assert_eq!(
            (at("x"), at("y"), at("width"), at("height")),
            (0, 0, 250, 250),
            "{verdict}"
        );
        assert_eq!(
            (&r["class"], &r["label"]),
            (
                &serde_json::json!("scratch"),
                &serde_json::json!("表面划痕")
            )
        );
        let labels: Vec<_> = verdict["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["label"].clone())
            .collect();
        assert_eq!(
            labels,
            [serde_json::json!("表面划痕"), serde_json::json!("good")]
        );
    }
    assert_eq!(tally.distinct.len(), 40, "{}", worker.log_tail());
    assert!(worker.terminate(), "clean exit on SIGTERM");
    assert_eq!(e.committed(2), ends(&published));
}

#[path = "e2e_kafka/exemplars.rs"]
mod exemplars;

#[path = "e2e_kafka/adapter.rs"]
mod adapter;

#[path = "e2e_kafka/exemplar_topic.rs"]
mod exemplar_topic;

#[path = "e2e_kafka/feedback.rs"]
mod feedback;

#[path = "e2e_kafka/reload.rs"]
mod reload;

#[path = "e2e_kafka/security.rs"]
mod security;

#[path = "e2e_kafka/hostile.rs"]
mod hostile;

#[path = "e2e_kafka/exactly_once.rs"]
mod exactly_once;

#[path = "e2e_kafka/segment.rs"]
mod segment;

#[path = "e2e_kafka/lag.rs"]
mod lag;
