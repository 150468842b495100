//! The consumer lag the worker exports (`clipqc_consumer_lag`, which the chart's HPA reads)
//! against Apache Kafka's own account of the group (`kafka-consumer-groups --describe`, the
//! same log-end-minus-committed per partition that the chart's KEDA Kafka trigger computes).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::time::Duration;

use super::common::e2e::*;
use super::common::{metric, wait_for};

/// Requests whose image never comes (a server that accepts and never answers) hold the
/// worker's record slots, so its committed positions stand still with a known backlog behind
/// them: the worker's lag per partition must then equal what `kafka-consumer-groups` says,
/// and their sum the backlog.
#[test]
#[ignore = "needs Apache Kafka (scripts/kafka.sh) and the Python Kafka client (scripts/test.sh)"]
fn the_exported_lag_agrees_with_kafka_consumer_groups() {
    const ANSWERED: usize = 20;
    const HELD: usize = 60;
    let e = E2e::start("lag", 2);
    let env = [
        ("CLIPQC__PIPELINE__MAX_IN_FLIGHT", "4".to_string()),
        // The held requests stay in flight for the whole test.
        ("CLIPQC__FETCH__TIMEOUT_MS", "600000".to_string()),
    ];
    let worker = e.worker("lag-1").env(&env).start();
    let answered = e.produce(ANSWERED, 0);
    let verdicts = read_all(&e.broker, &e.topics.verdicts, ANSWERED, START_WITHIN);
    assert_eq!(verdicts.len(), ANSWERED, "{}", worker.log_tail());
    // The answered requests' positions committed (auto-commit, every second).
    let ends: BTreeMap<i32, i64> = {
        let mut ends = BTreeMap::from([(0, 0), (1, 0)]);
        for p in &answered {
            let end = ends.entry(p.partition).or_insert(0);
            *end = (*end).max(p.offset + 1);
        }
        ends
    };
    wait_for("the answered requests' commits", Duration::from_secs(60), || {
        let committed: BTreeMap<i32, i64> = e.committed(2).into_iter().collect();
        if committed == ends {
            Ok(())
        } else {
            Err(format!("{committed:?}, not {ends:?}"))
        }
    });
    // A server that takes connections and never answers.
    let hold = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/held.jpg", hold.local_addr().unwrap());
    let holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in hold.incoming().take(HELD) {
            held.push(c);
        }
        held
    });
    let published = produce(&e.broker, &e.topics.requests, HELD, &url, 0);
    let mut backlog = BTreeMap::from([(0, 0), (1, 0)]);
    for p in &published {
        *backlog.entry(p.partition).or_insert(0) += 1;
    }
    // The worker's figure comes from librdkafka's statistics, every 5 s; the tool's from the
    // broker at each call (a JVM start: seconds). A minute bounds both settling.
    let (ours, theirs) = wait_for(
        "the worker's lag to match kafka-consumer-groups",
        Duration::from_secs(60),
        || {
            let text = worker.metrics();
            let ours: BTreeMap<i32, i64> = (0..2)
                .map(|p| {
                    let partition = p.to_string();
                    let labels = [("topic", e.topics.requests.as_str()), ("partition", &partition)];
                    (p, metric(&text, "clipqc_consumer_lag", &labels) as i64)
                })
                .collect();
            let theirs = describe(&e.broker, &e.topics.group, &e.topics.requests);
            if ours == theirs && ours == backlog {
                Ok((ours, theirs))
            } else {
                Err(format!(
                    "worker {ours:?}, kafka-consumer-groups {theirs:?}, backlog {backlog:?}"
                ))
            }
        },
    );
    eprintln!(
        "lag: worker {ours:?}, kafka-consumer-groups {theirs:?} ({HELD} requests held behind {ANSWERED} answered)"
    );
    drop(worker);
    drop(holder);
}

/// `kafka-consumer-groups --describe --group G`: LAG per partition of `topic`.
fn describe(broker: &Broker, group: &str, topic: &str) -> BTreeMap<i32, i64> {
    let out = broker.tool("consumer-groups", &["--describe", "--group", group]);
    // GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG CONSUMER-ID HOST CLIENT-ID
    out.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|cols| cols.len() >= 6 && cols[0] == group && cols[1] == topic)
        .map(|cols| (cols[2].parse().unwrap(), cols[5].parse().unwrap_or(-1)))
        .collect()
}
