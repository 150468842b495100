//! Exactly-once delivery (`kafka.delivery = "exactly_once"`): a transactional producer
//! writes the verdicts and dead letters of a run of finished input records and commits those
//! records' input offsets in the same transaction (`send_offsets_to_transaction`), so a
//! reader with `isolation.level=read_committed` sees each request's verdict once, however
//! the worker dies.
//!
//! Guarantees: what a transaction writes and commits comes from the [`Outbox`] (see its
//! docs: exactly the verdicts of the offsets it commits). A failed transaction is aborted and
//! its records wait for the next one; a record the broker refuses for good is replaced by its
//! small fallback (an ERROR verdict and a trimmed dead letter: no payload, key and headers
//! cut) and the transaction retried, so one record cannot stall its partition; a fallback
//! record refused for its size or contents even so is left out (logged, counted); a topic
//! that refuses every record (authorisation, no such topic), a
//! fenced producer or a broker without transactions is [`TxnError::is_fatal`]: the worker
//! stops (a restart resumes from the last committed transaction). Zombies are fenced: the
//! transactional id is fixed per worker instance, so a restarted worker's
//! `init_transactions` aborts what its predecessor left open and fences it, and the group
//! metadata sent with the offsets lets the broker refuse a worker whose partitions have
//! moved on (KIP-447). One transaction at a time: the committer's, a revocation's or the
//! drain's.
//!
//! A commit (or an abort) that times out is still in progress in librdkafka: only the same
//! call may follow, and it is repeated (an abort or a new transaction would fail with
//! `_CONFLICT` for ever) while `/readyz` says the transaction is stalled and
//! `clipqc_transaction_stalled` is 1; after [`MAX_RESUMES`] timeouts in a row the worker
//! stops, and its restart's `init_transactions` ends the stalled transaction.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::FutureExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use super::outbox::{Batch, OwnedRecord, Staged};
use super::{is_permanent, owned_headers};
use crate::http::Readiness;
use crate::kafka::KafkaSettings;
use crate::metrics;
use crate::offsets::Partition;

pub use super::outbox::Outbox;

#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    #[error(
        "the broker does not support transactions ({0}): kafka.delivery = \"exactly_once\" \
         needs a broker with Kafka transactions (Apache Kafka 2.5 or later; tansu 0.6.0 has no \
         EndTxn); use \"at_least_once\""
    )]
    Unsupported(String),
    #[error(
        "transactional producer {id:?} failed for good ({detail}): another worker with the same \
         kafka.instance_id took over, or this one was fenced out of its group; restart it"
    )]
    Fenced { id: String, detail: String },
    #[error("the topic {topic:?} refuses records, even a small ERROR verdict: {error}")]
    Refused { topic: String, error: KafkaError },
    #[error(
        "transaction stalled: {call} timed out {times} times in a row ({error}); the worker \
         stops so that its restart ends the transaction"
    )]
    Stalled {
        call: &'static str,
        times: u32,
        error: KafkaError,
    },
    #[error("transaction not committed (its records wait for the next one): {0}")]
    Failed(KafkaError),
}

/// Timeouts in a row of a commit or an abort before the worker gives up on a stalled
/// transaction. Each waits `kafka.transaction_call_timeout_ms` (30 s by default) or, for the
/// requests librdkafka bounds by its own request timeout (AddOffsetsToTxn: measured on Apache
/// Kafka 4.1.1), `socket.timeout.ms` (60 s): 5 to 10 minutes by default, longer than a broker's
/// restart or a coordinator's move, short enough that a broker that never comes back ends in a
/// restart.
pub const MAX_RESUMES: u32 = 10;

impl TxnError {
    /// The worker cannot go on: every later transaction would fail alike.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, Self::Failed(_))
    }
}

/// How one attempt at a transaction ended, when it did not commit.
enum Attempt {
    /// These records (part, record index) were refused for good: retry with their fallback.
    Refused(Vec<(usize, usize)>, String, Box<KafkaError>),
    Retry(KafkaError),
    Fatal(TxnError),
}

pub struct Transactions {
    producer: FutureProducer,
    outbox: Mutex<Outbox>,
    /// One transaction at a time (the producer has one open at most).
    committing: Mutex<()>,
    id: String,
    /// `message.max.bytes`: a record larger is refused by the producer itself.
    max_message_bytes: usize,
    timeout: Duration,
    committed: AtomicU64,
    /// Where a stalled transaction shows (`/readyz`).
    readiness: std::sync::Arc<Readiness>,
}

impl Transactions {
    /// A transactional producer named `id`, initialised: a transaction its previous
    /// incarnation left open is aborted, and that incarnation fenced.
    pub fn start(
        settings: &KafkaSettings,
        brokers: &str,
        id: &str,
        readiness: std::sync::Arc<Readiness>,
    ) -> Result<Self, TxnError> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", brokers)
            .set("transactional.id", id)
            .set("linger.ms", "5");
        for (k, v) in &settings.properties {
            cfg.set(k, v);
        }
        let max_message_bytes = settings
            .properties
            .get("message.max.bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000);
        let producer: FutureProducer = cfg.create().map_err(TxnError::Failed)?;
        let timeout = Duration::from_millis(settings.transaction_call_timeout_ms.max(1));
        Self::with_producer(producer, id, max_message_bytes, timeout, readiness)
    }

    /// Around a transactional producer made elsewhere (the tests give it short timeouts).
    pub fn with_producer(
        producer: FutureProducer,
        id: &str,
        max_message_bytes: usize,
        timeout: Duration,
        readiness: std::sync::Arc<Readiness>,
    ) -> Result<Self, TxnError> {
        producer
            .init_transactions(timeout)
            .map_err(|e| classify(id, e))?;
        tracing::info!(
            transactional_id = id,
            "exactly-once delivery: transactional producer ready"
        );
        Ok(Self {
            producer,
            outbox: Mutex::new(Outbox::new()),
            committing: Mutex::new(()),
            id: id.to_string(),
            max_message_bytes,
            timeout,
            committed: AtomicU64::new(0),
            readiness,
        })
    }

    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        // Plain bookkeeping: a panic elsewhere while it was held leaves it usable.
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether every record is small enough for the producer to take.
    pub fn fits(&self, records: &[OwnedRecord]) -> bool {
        records.iter().all(|r| r.size() <= self.max_message_bytes)
    }

    /// The input record at `offset` of `p` is finished; `staged`: what it publishes.
    pub fn stage(&self, p: &Partition, epoch: u64, offset: i64, staged: Staged) {
        let mut outbox = self.outbox();
        outbox.stage(p, epoch, offset, staged);
        metrics::transaction_staged(outbox.staged());
    }

    /// Every offset of `p` below `position` is done.
    pub fn advance(&self, p: &Partition, epoch: u64, position: i64) {
        self.outbox().advance(p, epoch, position);
    }

    /// `partitions` left this worker: drop what they staged (their next owner redoes it),
    /// and what records of assignments up to `upto` (the ledger's latest epoch) stage later.
    pub fn forget(&self, partitions: &[Partition], upto: u64) {
        let mut outbox = self.outbox();
        for p in partitions {
            outbox.forget(p, upto);
        }
        metrics::transaction_staged(outbox.staged());
    }

    /// Records waiting for a transaction.
    pub fn staged(&self) -> usize {
        self.outbox().staged()
    }

    /// Transactions committed so far.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    /// Commit what is done (of `only`, or of every partition) in one transaction, with the
    /// input positions; `group` gives the consumer's current group metadata. Blocks (it waits
    /// for the broker): call it off the async runtime. Returns the input records answered.
    pub fn commit(
        &self,
        only: Option<&[Partition]>,
        group: impl Fn() -> Option<ConsumerGroupMetadata>,
    ) -> Result<usize, TxnError> {
        let _one = self.committing.lock().unwrap_or_else(|e| e.into_inner());
        let mut batch = self.outbox().take(only);
        if batch.is_empty() {
            return Ok(0);
        }
        // An aborted transaction is tried again twice, 100 ms then 400 ms later; refused
        // records swapped for their small ERROR verdicts are tried again at once.
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_factor(4.0)
            .with_max_times(2)
            .build();
        for attempt in 1.. {
            let Some(group) = group() else {
                self.outbox().restore(batch);
                return Err(TxnError::Failed(KafkaError::ClientCreation(
                    "the consumer has no group metadata (not in its group yet)".into(),
                )));
            };
            let started = std::time::Instant::now();
            if attempt > 1 {
                // Rare (an abort came first), and the path a stranded transaction was last
                // seen on: say when each try starts and ends.
                tracing::info!(
                    attempt,
                    partitions = batch.parts.len(),
                    "transaction tried again"
                );
            }
            match self.attempt(&batch, &group) {
                Ok(()) => {
                    if attempt > 1 {
                        tracing::info!(attempt, "transaction committed after a retry");
                    }
                    metrics::transaction("committed", started.elapsed());
                    let answered = batch.answered();
                    let mut outbox = self.outbox();
                    outbox.committed(&batch);
                    metrics::transaction_staged(outbox.staged());
                    drop(outbox);
                    self.committed.fetch_add(1, Ordering::Relaxed);
                    return Ok(answered);
                }
                Err(Attempt::Refused(keys, topic, error)) => {
                    let error = *error;
                    metrics::transaction("aborted", started.elapsed());
                    for (part, record) in keys {
                        let (offset, staged) = &mut batch.parts[part].records[record];
                        if staged.on_fallback && super::refuses_only_the_record(&error) {
                            // Even the small records: this record alone (the fallback's dead
                            // letter is trimmed to a few kilobytes, so only a broker limit
                            // below that gets here). Leave that topic's record out, loudly,
                            // rather than stop the worker on it.
                            tracing::error!(topic, error = %error, offset = *offset,
                                "record refused even in its small form: left out of the transaction");
                            metrics::publish_refused(&topic);
                            staged.fallback.retain(|r| r.topic != topic);
                            continue;
                        }
                        if staged.on_fallback {
                            return Err(TxnError::Refused { topic, error });
                        }
                        tracing::warn!(topic, error = %error, offset = *offset,
                            "record refused in a transaction: publishing its small ERROR verdict instead");
                        metrics::publish_refused(&topic);
                        staged.on_fallback = true;
                    }
                }
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(e)) => {
                    metrics::transaction("aborted", started.elapsed());
                    let Some(delay) = delays.next() else {
                        self.outbox().restore(batch);
                        return Err(TxnError::Failed(e));
                    };
                    tracing::info!(error = %e, attempt, "transaction aborted; retrying");
                    std::thread::sleep(delay);
                }
            }
        }
        unreachable!("the loop returns")
    }

    fn attempt(&self, batch: &Batch, group: &ConsumerGroupMetadata) -> Result<(), Attempt> {
        self.producer.begin_transaction().map_err(|e| {
            if is_fatal(&e) {
                Attempt::Fatal(classify(&self.id, e))
            } else {
                Attempt::Retry(e)
            }
        })?;
        let mut deliveries = Vec::new();
        for (i, part) in batch.parts.iter().enumerate() {
            for (j, (_, staged)) in part.records.iter().enumerate() {
                for r in staged.current() {
                    let mut record = FutureRecord::to(&r.topic)
                        .payload(&r.payload)
                        .headers(owned_headers(&r.headers));
                    if let Some(k) = &r.key {
                        record = record.key(k);
                    }
                    match self.producer.send_result(record) {
                        Ok(delivery) => deliveries.push(((i, j), delivery)),
                        Err((e, _)) => {
                            let refused = is_permanent(&e).then(|| vec![(i, j)]);
                            if let Err(abort) = self.abort() {
                                return Err(Attempt::Fatal(abort));
                            }
                            return Err(match refused {
                                Some(keys) => Attempt::Refused(keys, r.topic.clone(), Box::new(e)),
                                None => Attempt::Retry(e),
                            });
                        }
                    }
                }
            }
        }
        let mut offsets = TopicPartitionList::new();
        for part in &batch.parts {
            let p = &part.partition;
            offsets
                .add_partition_offset(&p.topic, p.partition, Offset::Offset(part.position))
                .map_err(Attempt::Retry)?;
        }
        match self.resume("send_offsets_to_transaction", || {
            self.producer
                .send_offsets_to_transaction(&offsets, group, self.timeout)
        }) {
            Ok(()) => {}
            Err(Resumed::Gave(e)) => return Err(self.abort_after(e, &mut deliveries)),
            Err(Resumed::Stalled(e)) => return Err(Attempt::Fatal(e)),
        }
        match self.resume("commit_transaction", || {
            self.producer.commit_transaction(self.timeout)
        }) {
            Ok(()) => Ok(()),
            Err(Resumed::Gave(e)) => Err(self.abort_after(e, &mut deliveries)),
            Err(Resumed::Stalled(e)) => Err(Attempt::Fatal(e)),
        }
    }

    /// `call` (a step of the transaction that librdkafka lets resume), repeated while it times
    /// out: in between the transaction is stalled (`/readyz`, `clipqc_transaction_stalled`).
    fn resume(
        &self,
        name: &'static str,
        call: impl Fn() -> Result<(), KafkaError>,
    ) -> Result<(), Resumed> {
        let mut times = 0;
        let result = loop {
            match call() {
                Ok(()) => break Ok(()),
                Err(e) if resumable(&e) => {
                    times += 1;
                    if times >= MAX_RESUMES {
                        break Err(Resumed::Stalled(TxnError::Stalled {
                            call: name,
                            times,
                            error: e,
                        }));
                    }
                    if times == 1 {
                        self.stalled(true);
                    }
                    tracing::warn!(call = name, error = %e, times, "transaction step timed out: repeating it (a timed-out step stays in progress; nothing else may follow)");
                }
                Err(e) => break Err(Resumed::Gave(e)),
            }
        };
        if times > 0 {
            self.stalled(false);
        }
        result
    }

    /// How long one step of a transaction may wait for the broker.
    pub fn call_timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether a transaction is stalled, for `/readyz` and `clipqc_transaction_stalled`: set
    /// here when a step times out, and by the committer while a step runs past its bound
    /// (librdkafka's own request timeouts can keep a step waiting longer than the call's).
    pub fn stalled(&self, stalled: bool) {
        self.readiness
            .transaction_stalled
            .store(stalled, Ordering::Relaxed);
        metrics::transaction_stalled(stalled);
    }

    /// A step of the transaction failed with `e`: find records refused for good (every
    /// delivery has resolved once a commit failed: it flushes first), abort, and say what next.
    fn abort_after(
        &self,
        e: KafkaError,
        deliveries: &mut [((usize, usize), DeliveryFuture)],
    ) -> Attempt {
        if is_fatal(&e) {
            return Attempt::Fatal(classify(&self.id, e));
        }
        let mut refused = Vec::new();
        let mut refusal = None;
        for (key, delivery) in deliveries.iter_mut() {
            if let Some(Ok(Err((error, msg)))) = delivery.now_or_never() {
                if is_permanent(&error) {
                    refused.push(*key);
                    refusal.get_or_insert((rdkafka::Message::topic(&msg).to_string(), error));
                }
            }
        }
        if let Err(abort) = self.abort() {
            return Attempt::Fatal(abort);
        }
        match refusal {
            Some((topic, error)) => Attempt::Refused(refused, topic, Box::new(error)),
            None => Attempt::Retry(e),
        }
    }

    /// Aborts the open transaction; an error only when no later transaction can follow.
    fn abort(&self) -> Result<(), TxnError> {
        match self.resume("abort_transaction", || {
            self.producer.abort_transaction(self.timeout)
        }) {
            Ok(()) => Ok(()),
            Err(Resumed::Stalled(e)) => Err(e),
            Err(Resumed::Gave(e)) if is_fatal(&e) => Err(classify(&self.id, e)),
            Err(Resumed::Gave(e)) => {
                tracing::warn!(error = %e, "abort_transaction");
                Ok(())
            }
        }
    }
}

/// How a resumable step ended, when it did not succeed.
enum Resumed {
    /// It failed otherwise than by timing out: the caller aborts (or stops, if fatal).
    Gave(KafkaError),
    /// It timed out [`MAX_RESUMES`] times in a row: a [`TxnError::Stalled`].
    Stalled(TxnError),
}

/// A step that timed out (or met another retriable error) and may be called again as it is,
/// without an abort: librdkafka keeps it in progress.
fn resumable(e: &KafkaError) -> bool {
    match e {
        KafkaError::Transaction(t) => t.is_retriable() && !t.txn_requires_abort() && !t.is_fatal(),
        _ => false,
    }
}

/// An error no later transaction can get past: fenced, unsupported, or fatal to the client.
fn is_fatal(e: &KafkaError) -> bool {
    match e {
        KafkaError::Transaction(t) => {
            t.is_fatal() || t.code() == RDKafkaErrorCode::UnsupportedFeature
        }
        other => other.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal),
    }
}

fn classify(id: &str, e: KafkaError) -> TxnError {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::UnsupportedFeature | RDKafkaErrorCode::UnsupportedVersion) => {
            TxnError::Unsupported(e.to_string())
        }
        _ if is_fatal(&e) => TxnError::Fenced {
            id: id.to_string(),
            detail: e.to_string(),
        },
        _ => TxnError::Failed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A broker without transactions (tansu 0.6.0 answers InitProducerId but has no EndTxn;
    /// others answer UNSUPPORTED_VERSION) stops the worker with an error that says so and
    /// what to do; a plain failure does not.
    #[test]
    fn a_broker_without_transactions_is_fatal_and_says_what_to_do() {
        for code in [
            RDKafkaErrorCode::UnsupportedFeature,
            RDKafkaErrorCode::UnsupportedVersion,
        ] {
            let e = classify("clipqc-g-w", KafkaError::Global(code));
            assert!(matches!(e, TxnError::Unsupported(_)), "{e:?}");
            assert!(e.is_fatal());
            let text = e.to_string();
            assert!(
                text.contains("does not support transactions") && text.contains("at_least_once"),
                "{text}"
            );
        }
        let e = classify(
            "clipqc-g-w",
            KafkaError::Global(RDKafkaErrorCode::RequestTimedOut),
        );
        assert!(matches!(e, TxnError::Failed(_)) && !e.is_fatal(), "{e:?}");
        // Only librdkafka's transactional errors can be resumed; others cannot.
        assert!(!resumable(&KafkaError::Global(
            RDKafkaErrorCode::OperationTimedOut
        )));
    }

    /// A stall that ran out of repeats stops the worker, naming the step and the count.
    #[test]
    fn a_stalled_transaction_is_fatal_and_names_its_step() {
        let e = TxnError::Stalled {
            call: "commit_transaction",
            times: MAX_RESUMES,
            error: KafkaError::Global(RDKafkaErrorCode::OperationTimedOut),
        };
        assert!(e.is_fatal());
        assert!(
            e.to_string()
                .starts_with("transaction stalled: commit_transaction timed out 10 times in a row"),
            "{e}"
        );
    }
}
