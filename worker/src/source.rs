//! The source stage: the Kafka consumer.
//!
//! Guarantees: offsets are never stored automatically (`enable.auto.offset.store=false`);
//! the pipeline stores a partition's position only when every record below it is done
//! (see `offsets`), and auto-commit commits what was stored. Cooperative-sticky assignment
//! moves only the partitions that must move on a rebalance; `kafka.instance_id` gives static
//! membership so a restarted worker gets its partitions back at once.
//!
//! On revocation the rebalance callback waits (up to the drain bound) for the revoked
//! partitions' records in flight, then commits synchronously before letting them go: their
//! next owner starts where this worker stopped, not at the last auto-commit. Knows nothing
//! of CLIP.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::http::Readiness;
use crate::kafka::{Delivery, GroupProtocol, KafkaSettings};
use crate::metrics;
use crate::offsets::{Ledger, Partition};
use crate::sink::transaction::Transactions;

/// The worker's consumer.
pub type Source = StreamConsumer<SourceContext>;

/// Connects librdkafka's rebalance callbacks to the offset ledger.
pub struct SourceContext {
    pub ledger: Arc<Ledger>,
    pub readiness: Arc<Readiness>,
    /// Exactly-once delivery: revoked partitions' finished records are committed in a
    /// transaction instead of by a consumer commit (set by the pipeline).
    pub transactions: OnceLock<Arc<Transactions>>,
    drain_timeout: Duration,
    /// librdkafka's view of the group and of each partition, from its last statistics: what
    /// the pipeline's probe shows for a record that never left the consumer.
    last_stats: std::sync::Mutex<Option<ConsumerStats>>,
}

/// The consumer as librdkafka last reported it (every `statistics.interval.ms`).
#[derive(Debug, Clone)]
pub struct ConsumerStats {
    pub at: std::time::Instant,
    /// The group's state and join state (`up`, `steady`…), and how many rebalances so far.
    pub group: Option<(String, String, i64)>,
    pub partitions: Vec<PartitionStats>,
}

/// One partition in librdkafka's statistics: whether it is being fetched, what is fetched
/// and not yet handed to the worker, and the offsets along the way.
#[derive(Debug, Clone)]
pub struct PartitionStats {
    pub topic: String,
    pub partition: i32,
    /// `active`, `stopped`, `offset-query`, `none`…
    pub fetch_state: String,
    /// Messages fetched and queued for the worker, not yet taken by it.
    pub fetchq_cnt: i64,
    /// The next offset to fetch, the next the worker takes, the last stored and committed.
    pub next_offset: i64,
    pub app_offset: i64,
    pub stored_offset: i64,
    pub committed_offset: i64,
    pub hi_offset: i64,
}

impl std::fmt::Display for ConsumerStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "librdkafka {:.1} s ago:",
            self.at.elapsed().as_secs_f64()
        )?;
        if let Some((state, join, rebalances)) = &self.group {
            write!(f, " group {state}/{join}, {rebalances} rebalances;")?;
        }
        for p in &self.partitions {
            write!(
                f,
                " {}[{}] fetch {} queued {} next {} app {} stored {} committed {} high {};",
                p.topic,
                p.partition,
                p.fetch_state,
                p.fetchq_cnt,
                p.next_offset,
                p.app_offset,
                p.stored_offset,
                p.committed_offset,
                p.hi_offset
            )?;
        }
        Ok(())
    }
}

impl ClientContext for SourceContext {
    /// librdkafka's statistics (every `statistics.interval.ms`): the lag of each partition
    /// this worker consumes.
    fn stats(&self, statistics: rdkafka::Statistics) {
        self.report_lag(statistics.topics.iter().flat_map(|(topic, t)| {
            t.partitions
                .iter()
                .map(move |(id, p)| (topic.as_str(), *id, p.consumer_lag))
        }));
        let partitions = statistics
            .topics
            .iter()
            .flat_map(|(topic, t)| {
                t.partitions
                    .values()
                    // -1 is librdkafka's internal partition.
                    .filter(|p| p.partition >= 0)
                    .map(move |p| PartitionStats {
                        topic: topic.clone(),
                        partition: p.partition,
                        fetch_state: p.fetch_state.clone(),
                        fetchq_cnt: p.fetchq_cnt,
                        next_offset: p.next_offset,
                        app_offset: p.app_offset,
                        stored_offset: p.stored_offset,
                        committed_offset: p.committed_offset,
                        hi_offset: p.hi_offset,
                    })
            })
            .collect();
        let kept = ConsumerStats {
            at: std::time::Instant::now(),
            group: statistics
                .cgrp
                .map(|g| (g.state, g.join_state, g.rebalance_cnt)),
            partitions,
        };
        *self.last_stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(kept);
    }
}

impl SourceContext {
    /// librdkafka's last statistics of this consumer, if any came yet.
    pub fn last_stats(&self) -> Option<ConsumerStats> {
        self.last_stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Lag gauges for the partitions this worker owns. librdkafka keeps reporting a lag for a
    /// partition after it moved to another worker (frozen at its last value), which would
    /// count that partition twice in a sum over workers: only owned partitions are reported.
    fn report_lag<'a>(&self, lags: impl Iterator<Item = (&'a str, i32, i64)>) {
        for (topic, partition, lag) in lags {
            // -1 (unknown) and the internal partition -1 are not lags.
            if partition >= 0
                && lag >= 0
                && self.ledger.is_assigned(&Partition::new(topic, partition))
            {
                metrics::consumer_lag(topic, partition, lag);
            }
        }
    }

    /// Revoked partitions' lag goes to 0 here: their next owner reports it from now on.
    fn released(&self, partitions: &[Partition]) {
        for p in partitions {
            metrics::consumer_lag(&p.topic, p.partition, 0);
        }
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let tpl = match rebalance {
            Rebalance::Revoke(tpl) => tpl,
            Rebalance::Assign(_) => return,
            Rebalance::Error(e) => {
                // rdkafka answers a rebalance error by dropping the whole assignment, with no
                // revocation: forget every partition now, so a later assignment starts from
                // the committed positions instead of tripping over records seen before.
                let lost = self.ledger.lost_all();
                if let Some(txn) = self.transactions.get() {
                    txn.forget(&lost, self.ledger.latest_epoch());
                }
                self.released(&lost);
                tracing::error!(error = %e, ?lost, "rebalance error: every partition dropped; their records in flight will be processed again by their next owner");
                return;
            }
        };
        let partitions = partitions(tpl);
        if partitions.is_empty() {
            return;
        }
        tracing::info!(?partitions, "partitions revoked: finishing their records");
        // This runs inside `recv()` on a runtime worker: let the runtime move its other tasks
        // (the records being waited for among them) to other threads while this one waits.
        let wait = || self.ledger.revoke(&partitions, self.drain_timeout);
        let (positions, left) = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        };
        self.released(&partitions);
        if left > 0 {
            tracing::warn!(left, "drain bound reached on revocation: those records will be processed again by the partitions' next owner");
        }
        if let Some(txn) = self.transactions.get() {
            // What finished is committed with its verdicts now; the rest (and all of it if
            // this fails) is redone by the partitions' next owner, never shown twice.
            match txn.commit(Some(&partitions), || consumer.group_metadata()) {
                Ok(answered) => tracing::info!(
                    answered,
                    ?positions,
                    "revoked partitions committed in a transaction"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "transaction on revocation failed: the partitions' next owner redoes their records")
                }
            }
            txn.forget(&partitions, self.ledger.latest_epoch());
            return;
        }
        if positions.is_empty() {
            return;
        }
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => tracing::info!(?positions, "revoked partitions committed"),
            // Nothing stored since the last commit (auto-commit or the drain's final commit
            // got there first): the positions are already the group's.
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {
                tracing::info!(?positions, "revoked partitions already committed")
            }
            Err(e) => tracing::warn!(
                error = %e,
                ?positions,
                "commit on revocation failed: the partitions' next owner starts from the last commit and repeats the records after it"
            ),
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // Even an empty assignment means the group has taken this member in.
            self.readiness.set_in_group();
            let partitions = partitions(tpl);
            if !partitions.is_empty() {
                tracing::info!(?partitions, "partitions assigned");
                self.ledger.assigned(&partitions);
            }
        }
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<Partition> {
    tpl.elements()
        .iter()
        .map(|e| Partition::new(e.topic(), e.partition()))
        .collect()
}

/// How often [`recv`] looks at the consumer's queue without being woken.
pub const REPOLL: Duration = Duration::from_secs(1);

/// The next message or error of `consumer`, as `consumer.recv()`, but never parked on a
/// wakeup that does not come.
///
/// rust-rdkafka's stream sleeps until librdkafka's "queue non-empty" callback, which fires only
/// on the queue's empty → non-empty edge; when that edge is missed (a known race: rust-rdkafka
/// issue 665) the stream is woken only by its fallback timer, every `max.poll.interval.ms / 2`
/// (150 s by default), while records sit fetched in the queue. Here the queue is polled again
/// every [`REPOLL`] besides: one look a second at a local queue, and a missed wakeup costs at
/// most that. Cancel-safe, as `recv()` is: a message is taken from the queue only when it is
/// returned.
pub async fn recv<C: ConsumerContext + 'static, R>(
    consumer: &StreamConsumer<C, R>,
) -> KafkaResult<rdkafka::message::BorrowedMessage<'_>> {
    use futures_util::StreamExt;
    let mut stream = consumer.stream();
    let mut repoll = tokio::time::interval_at(tokio::time::Instant::now() + REPOLL, REPOLL);
    repoll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            next = stream.next() => return next.expect("Kafka message streams never end"),
            // Polling `stream.next()` again looks at the queue first, woken or not.
            _ = repoll.tick() => {}
        }
    }
}

/// Pause (`true`) or resume every assigned partition. Polling goes on either way, so the
/// group keeps this member and its rebalance callbacks run.
pub fn set_paused(consumer: &Source, paused: bool) -> KafkaResult<()> {
    let assignment = consumer.assignment()?;
    if paused {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    }
}

pub fn consumer(
    settings: &KafkaSettings,
    brokers: &str,
    drain_timeout: Duration,
    readiness: Arc<Readiness>,
) -> KafkaResult<Source> {
    let exactly_once = settings.delivery == Delivery::ExactlyOnce;
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers)
        .set("group.id", &settings.group_id)
        // Exactly-once: offsets are committed by the verdicts' transactions. (Requests
        // written in transactions upstream are read once committed either way:
        // librdkafka's default isolation.level is read_committed.)
        .set("enable.auto.commit", (!exactly_once).to_string())
        // Commit what was stored every second (librdkafka's default is 5 s): after a crash,
        // the work done again is what was in flight plus a second's verdicts. (100 ms was
        // tried: on tansu, ten commits a second per worker slowed a second worker's join
        // enough that the handover test saw it take partitions only at the stream's end.)
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("group.protocol", settings.group_protocol.as_str())
        // Consumer lag per partition for the metrics.
        .set("statistics.interval.ms", "5000");
    if settings.group_protocol == GroupProtocol::Classic {
        // Incremental hand-overs: a joining member takes partitions without the others
        // stopping theirs. (KIP-848's broker-side assignors are incremental and sticky
        // already, and librdkafka refuses the setting with `group.protocol=consumer`.)
        cfg.set("partition.assignment.strategy", "cooperative-sticky");
    }
    if let Some(id) = &settings.instance_id {
        cfg.set("group.instance.id", id);
    }
    for (k, v) in &settings.properties {
        cfg.set(k, v);
    }
    let context = SourceContext {
        ledger: Arc::new(Ledger::new()),
        readiness,
        transactions: OnceLock::new(),
        drain_timeout,
        last_stats: Default::default(),
    };
    let consumer: Source = cfg.create_with_context(context)?;
    let topics: Vec<&str> = settings.input_topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok(consumer)
}

/// Store `position` (the next offset to consume) for a partition, for the next auto-commit.
pub fn store_position(
    consumer: &Source,
    topic: &str,
    partition: i32,
    position: i64,
) -> KafkaResult<()> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(position))?;
    consumer.store_offsets(&tpl)
}

/// A header's value as text, if the record has it.
pub fn header<'a>(msg: &'a impl Message, name: &str) -> Option<&'a str> {
    let headers = msg.headers()?;
    headers
        .iter()
        .find(|h| h.key.eq_ignore_ascii_case(name))
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> SourceContext {
        SourceContext {
            ledger: Arc::new(Ledger::new()),
            readiness: Arc::new(Readiness::default()),
            transactions: OnceLock::new(),
            drain_timeout: Duration::from_millis(10),
            last_stats: Default::default(),
        }
    }

    fn lag_series(rendered: &str) -> Vec<&str> {
        rendered
            .lines()
            .filter(|l| l.starts_with("clipqc_consumer_lag{"))
            .collect()
    }

    #[test]
    fn lag_is_reported_for_owned_partitions_only_and_zeroed_when_they_move() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let ctx = context();
        let (p0, p1) = (Partition::new("req", 0), Partition::new("req", 1));
        ctx.ledger.assigned(&[p0.clone(), p1.clone()]);
        ::metrics::with_local_recorder(&recorder, || {
            ctx.report_lag(
                [("req", 0, 7), ("req", 1, 3), ("req", 2, 9), ("req", -1, 4)].into_iter(),
            );
            ctx.report_lag([("req", 0, -1)].into_iter()); // unknown: the last value stays
        });
        let mut series = lag_series(&handle.render())
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        series.sort();
        assert_eq!(
            series,
            [
                r#"clipqc_consumer_lag{topic="req",partition="0"} 7"#,
                r#"clipqc_consumer_lag{topic="req",partition="1"} 3"#,
            ]
        );

        // Partition 1 moves to another worker; librdkafka still reports its frozen lag.
        ctx.ledger
            .revoke(std::slice::from_ref(&p1), Duration::from_millis(10));
        ::metrics::with_local_recorder(&recorder, || {
            ctx.released(std::slice::from_ref(&p1));
            ctx.report_lag([("req", 0, 2), ("req", 1, 3)].into_iter());
        });
        let rendered = handle.render();
        let series = lag_series(&rendered);
        assert!(
            series.contains(&r#"clipqc_consumer_lag{topic="req",partition="0"} 2"#),
            "{series:?}"
        );
        assert!(
            series.contains(&r#"clipqc_consumer_lag{topic="req",partition="1"} 0"#),
            "{series:?}"
        );
    }
}
