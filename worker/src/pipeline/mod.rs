//! The pipeline: the only module that knows every stage, and wires them.
//!
//! ```text
//! source ─▶ request ─▶ fetch ─▶ preprocess (blocking pool) ─▶ batch ─▶ model thread
//!    ▲                                                                     │
//!    └── offsets ◀── sink (verdict + dead letter, acknowledged) ◀── score ◀┘
//! ```
//!
//! Files: [`build`] assembles the dependencies from the settings; this one takes records in
//! (intake, pause/resume, drain); [`handle`] takes one record
//! to its verdict; [`infer`] batches for the model; [`segment`] outlines defects with SAM;
//! [`publish`] writes verdicts and dead letters.
//!
//! Guarantees: each record is handled by its own task, and a panic in it becomes the
//! record's ERROR verdict and dead letter (its [`ack::Acknowledgement`] resolves whatever
//! happens, so no partition's position freezes); at most `max_in_flight` records and
//! `max_in_flight_bytes` are held at once, and when the records are all taken the consumer's
//! partitions are paused (polling goes on) until half are free; every record ends as exactly
//! one verdict (ERROR for failures, with a dead letter too) before its offset can be stored;
//! a bad record never stops the worker (one the broker refuses for its size or contents is
//! published trimmed, or, refused even then, skipped with an error log and
//! `clipqc_publish_refused_total`); a broken model, a batcher that died, a consumer with
//! a fatal error, or a topic that refuses every record (authorisation, no such topic) do (after draining: `run`
//! returns the reason, and the process exits non-zero for its orchestrator to restart it);
//! on shutdown no new record is taken, in-flight ones finish within `drain_timeout`, the
//! producer is flushed and the stored positions committed synchronously. Each record takes
//! one snapshot of the profiles and routes when it is started (in its partition's offset
//! order) and is routed, preprocessed and scored against that snapshot alone, however the
//! profiles change meanwhile ([`crate::profiles`]).

mod ack;
mod budget;
pub mod build;
mod handle;
mod infer;
pub mod probe;
mod publish;
mod segment;
mod transaction;

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::batch::BatchConfig;
use crate::config::{KafkaSettings, PipelineSettings};
use crate::fetch::Fetcher;
use crate::metrics;
use crate::model::ModelHandle;
use crate::notify::Notifier;
use crate::offsets::{Ledger, Partition};
use crate::proto::v1::ModelInfo;
use crate::sink::transaction::Transactions;
use crate::sink::Sink;
use crate::source::{self, Source};
use budget::ByteBudget;
use infer::{BatchItem, Fatal};
pub use probe::{Probe, Snapshot};
// A profile in service is the profiles module's (its catalog holds them); re-exported here,
// where the pipeline's callers have always found it.
pub use crate::profiles::Profile;
pub use segment::{prompts as segment_prompts, wanted as segment_wanted, Segmenting};

/// Everything the pipeline needs, built by the caller (`clipqc run`, tests).
pub struct Deps {
    pub kafka: KafkaSettings,
    pub batch: BatchConfig,
    pub pipeline: PipelineSettings,
    /// The profiles in service and the routes (profiles and regions for requests that name
    /// none, by camera and line), swapped whole when the config file changes.
    pub profiles: crate::profiles::Live,
    pub model: ModelHandle,
    pub model_info: ModelInfo,
    pub fetcher: Fetcher,
    /// Made by [`source::consumer`] with the same drain timeout.
    pub consumer: Source,
    pub sink: Sink,
    /// Webhooks told of published verdicts ([`Notifier::disabled`] for none).
    pub notifier: Notifier,
    /// The few-shot exemplar bank, read to the end of its topic and followed.
    pub exemplars: crate::exemplars::follow::Exemplars,
    /// Exactly-once delivery (`kafka.delivery`): verdicts, dead letters and input offsets
    /// committed together. `None`: at-least-once through `sink`.
    pub transactions: Option<Arc<Transactions>>,
    /// The SAM thread, for profiles with `segment = true` (`None` without `model.sam_dir`).
    pub segmenting: Option<Segmenting>,
    /// Where each record in flight is, for a dump when something waits too long: keep a
    /// clone to take [`Probe::snapshot`]s of the run.
    pub probe: Arc<Probe>,
}

/// Why a run stopped by itself: the worker cannot go on, and its orchestrator should restart
/// it (a new process rejoins the group, reloads the model, starts a new transactional
/// producer). Each is a whole sentence for the exit message.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the model is broken: {0}")]
    ModelBroken(String),
    #[error("the batcher ended: {0}")]
    Batcher(String),
    #[error("{0}")]
    Consumer(String),
    #[error("the {what} topic {topic:?} refuses records: {detail}")]
    TopicRefuses {
        what: &'static str,
        topic: String,
        detail: String,
    },
    #[error(transparent)]
    Transactions(#[from] crate::sink::transaction::TxnError),
}

/// What a run did, for tests and the exit log.
#[derive(Debug, Default, Clone, Copy)]
pub struct RunStats {
    pub records: u64,
    /// Times the consumer's partitions were paused because every record slot was taken.
    pub pauses: u64,
    pub peak_in_flight_bytes: u64,
    /// Records still unfinished when the drain time ran out (processed again after restart).
    pub abandoned: usize,
    /// Exactly-once: transactions committed.
    pub transactions: u64,
}

struct Shared {
    kafka: KafkaSettings,
    /// Names this worker in each verdict's `clipqc-worker` header: the static member id, or
    /// host name and process id (the pod's name on Kubernetes).
    worker_id: String,
    profiles: crate::profiles::Live,
    exemplars: crate::exemplars::follow::SharedBank,
    /// Profiles with `line_memory`: the recent parts of each line (or camera).
    /// Shared with the blocking pool, where the scoring runs.
    line_memory: Arc<crate::score::line_memory::LineMemory>,
    model_info: ModelInfo,
    fetcher: Fetcher,
    sink: Sink,
    transactions: Option<Arc<Transactions>>,
    segmenting: Option<Segmenting>,
    notifier: Notifier,
    to_batcher: mpsc::Sender<BatchItem>,
    budget: ByteBudget,
    /// Fired when the drain time is up: publishes still retrying give up (their offsets stay
    /// uncommitted). Not the shutdown signal itself: in-flight records must get to finish.
    abort: CancellationToken,
    /// Declared when the worker cannot go on (the model broke, the dead-letter topic refuses
    /// records): it drains and `run` returns the reason.
    fatal: Arc<Fatal>,
    probe: Arc<Probe>,
}

/// Names this worker in verdict headers and notifications: the static member id, or host
/// name and process id (the pod's name on Kubernetes).
pub fn worker_id(kafka: &KafkaSettings) -> String {
    kafka.instance_id.clone().unwrap_or_else(|| {
        let host = gethostname::gethostname();
        format!("{}/{}", host.to_string_lossy(), std::process::id())
    })
}

/// Run until `shutdown` fires (or the model breaks), then drain. Errors when the model broke.
pub async fn run(deps: Deps, shutdown: CancellationToken) -> Result<RunStats, RunError> {
    let size = deps
        .profiles
        .load()
        .profiles
        .values()
        .next()
        .map_or(224, |p| p.preprocessor.size());
    let settings = deps.pipeline;
    let fatal = Arc::new(Fatal::default());
    let (to_batcher, batch_rx) = mpsc::channel(deps.batch.max_size.max(1) * 4);
    let mut batcher = tokio::spawn(infer::batch_loop(
        batch_rx,
        deps.batch,
        deps.model.clone(),
        size,
        settings.max_model_failures.max(1),
        fatal.clone(),
    ));
    let worker_id = worker_id(&deps.kafka);
    let shared = Arc::new(Shared {
        worker_id,
        kafka: deps.kafka,
        profiles: deps.profiles,
        exemplars: deps.exemplars.bank.clone(),
        line_memory: Default::default(),
        model_info: deps.model_info,
        fetcher: deps.fetcher,
        sink: deps.sink,
        transactions: deps.transactions.clone(),
        segmenting: deps.segmenting,
        notifier: deps.notifier,
        to_batcher,
        budget: ByteBudget::new(settings.max_in_flight_bytes),
        abort: CancellationToken::new(),
        fatal: fatal.clone(),
        probe: deps.probe.clone(),
    });
    let consumer = Arc::new(deps.consumer);
    let ledger = consumer.context().ledger.clone();
    consumer
        .context()
        .readiness
        .progress
        .set_stall_after(Duration::from_millis(settings.stall_timeout_ms));
    let max = settings.max_in_flight.max(1);
    let slots = Arc::new(Semaphore::new(max));
    shared.probe.attach(&consumer, &shared, max);
    let probe = shared.probe.clone();
    consumer
        .context()
        .readiness
        .state
        .set(move || probe.snapshot().to_string());
    let committer = deps.transactions.clone().map(|txn| {
        // Revoked partitions are committed by the rebalance callback, in their last moments here.
        let _ = consumer.context().transactions.set(txn.clone());
        tokio::spawn(transaction::commit_loop(
            txn,
            consumer.clone(),
            Duration::from_millis(shared.kafka.transaction_interval_ms.max(1)),
            slots.clone(),
            max,
            fatal.clone(),
        ))
    });
    let mut intake = Intake {
        consumer: consumer.clone(),
        ledger: ledger.clone(),
        shared: shared.clone(),
        tasks: tokio::task::JoinSet::new(),
        waiting: VecDeque::new(),
        paused: false,
        stats: RunStats::default(),
    };

    let mut repoll =
        tokio::time::interval_at(tokio::time::Instant::now() + source::REPOLL, source::REPOLL);
    repoll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Resume once the waiting records are taken and half the slots are free again.
        if intake.paused
            && intake.waiting.is_empty()
            && slots.available_permits() >= max.div_ceil(2)
        {
            intake.set_paused(false);
        }
        shared.probe.intake(
            intake.waiting.len(),
            intake.paused,
            slots.available_permits(),
        );
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = fatal.token.cancelled() => break,
            // The batcher ends only when the pipeline does: records would wait for it forever.
            ended = &mut batcher => {
                let why = match ended {
                    Err(e) if e.is_panic() => format!("it panicked: {}", panic_message(e.into_panic().as_ref())),
                    _ => "it stopped".to_string(),
                };
                fatal.declare(RunError::Batcher(why));
                break;
            }
            // Exactly-once: records waiting for their transaction hold slots, and the
            // committer frees them, not a task ending: wake up to resume then.
            _ = slots.acquire_many(max.div_ceil(2) as u32), if intake.paused && intake.waiting.is_empty() => {}
            Some(joined) = intake.tasks.join_next() => {
                if let Err(e) = joined {
                    // Panics inside a record's handling are caught in the task; this is one in
                    // the catching itself. Its acknowledgement resolved (not acknowledged).
                    tracing::error!(error = %e, "a record task failed");
                }
                metrics::records_in_flight(intake.tasks.len());
            }
            slot = slots.clone().acquire_owned(), if !intake.waiting.is_empty() => {
                let slot = slot.expect("the slots are never closed. This is a bug.");
                let (msg, epoch) = intake.waiting.pop_front().expect("checked non-empty. This is a bug.");
                metrics::records_waiting(intake.waiting.len());
                intake.start(msg, epoch, slot);
            }
            // Polled again every `REPOLL` whether or not librdkafka woke it (a missed wakeup
            // left fetched records waiting for 150 s: see `source::recv`).
            _ = repoll.tick() => {}
            msg = consumer.recv() => {
                let msg = match msg {
                    Ok(m) => m.detach(),
                    Err(e) => {
                        // A fatal error (a fenced static member, an unrecoverable protocol
                        // state) leaves a consumer that never gets records again: a worker
                        // that goes on polling it looks alive and does nothing.
                        if let Some(why) = fatal_consumer_error(&consumer, &e) {
                            fatal.declare(RunError::Consumer(why));
                            break;
                        }
                        tracing::warn!(error = %e, "consumer error");
                        continue;
                    }
                };
                let epoch = ledger.epoch(&Partition::new(msg.topic(), msg.partition()));
                // Records wait in arrival order: a partition's records are taken in offset order.
                match slots.clone().try_acquire_owned() {
                    Ok(slot) if intake.waiting.is_empty() => intake.start(msg, epoch, slot),
                    _ => {
                        intake.waiting.push_back((msg, epoch));
                        metrics::records_waiting(intake.waiting.len());
                        // Also when already paused: partitions assigned since are not.
                        intake.set_paused(true);
                    }
                }
            }
        }
    }

    // Drain: take nothing new, let in-flight records finish (bounded), then flush and commit.
    consumer.context().readiness.set_draining();
    let drain_timeout = Duration::from_millis(settings.drain_timeout_ms);
    tracing::info!(
        running = intake.tasks.len(),
        waiting = intake.waiting.len(),
        "draining"
    );
    intake.waiting.clear();
    let drained = tokio::time::timeout(drain_timeout, async {
        while intake.tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        // Out of time: say what the stragglers were doing (a stall shows here), then make
        // them give up publishing; their offsets stay uncommitted.
        tracing::warn!(state = %shared.probe.snapshot(), "the drain time ran out");
        shared.abort.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while intake.tasks.join_next().await.is_some() {}
        })
        .await;
    }
    let mut stats = intake.stats;
    stats.abandoned = ledger.total_in_flight();
    stats.peak_in_flight_bytes = shared.budget.peak();
    if let Err(e) = shared.sink.flush(Duration::from_secs(10)) {
        tracing::warn!(error = %e, "producer flush");
    }
    match (&shared.transactions, committer) {
        (Some(txn), Some(committer)) => {
            committer.abort();
            transaction::final_commit(txn, &consumer, &fatal).await;
        }
        _ => final_commit(&consumer).await,
    }
    stats.transactions = shared.transactions.as_ref().map_or(0, |t| t.committed());
    if consumer.client().fatal_error().is_some() {
        // Closing a consumer after a fatal error never finishes (rdkafka's drop polls for a
        // close that librdkafka refuses): leak it, the process is on its way out.
        std::mem::forget(Arc::clone(&consumer));
    }
    batcher.abort();
    tracing::info!(?stats, "stopped");
    let reason = fatal
        .reason
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    match reason {
        Some(reason) => Err(reason),
        None => Ok(stats),
    }
}

/// Why the consumer cannot go on, when `e` (or an earlier error) was fatal to it.
fn fatal_consumer_error(consumer: &Source, e: &rdkafka::error::KafkaError) -> Option<String> {
    let fatal = consumer.client().fatal_error();
    if fatal.is_none() && !matches!(e, rdkafka::error::KafkaError::MessageConsumptionFatal(_)) {
        return None;
    }
    let detail = fatal.map_or_else(
        || e.to_string(),
        |(code, reason)| format!("{code}: {reason}"),
    );
    Some(format!(
        "the Kafka consumer failed for good ({detail}); restart the worker to rejoin the group"
    ))
}

pub use crate::panics::panic_message;

/// Commit what was stored, retrying briefly: a rebalance in progress (another worker joining
/// or leaving) refuses commits for a moment, and every offset not committed now is processed
/// again by the partition's next owner.
async fn final_commit(consumer: &Source) {
    use backon::{ConstantBuilder, Retryable};
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    let commit = || async {
        match consumer.commit_consumer_state(CommitMode::Sync) {
            // Nothing stored since the last commit.
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => Ok(()),
            Err(e) => Err(e),
        }
    };
    // Five tries in about two seconds: long enough for a rebalance's moment, short enough
    // for the drain's budget.
    let every = ConstantBuilder::default()
        .with_delay(Duration::from_millis(500))
        .with_max_times(4);
    let result = commit
        .retry(every)
        .notify(|e, _| tracing::info!(error = %e, "final commit refused; retrying"))
        .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "final commit failed: the partitions' next owners redo what was not committed");
    }
}

/// Records taken from the consumer: running as tasks, or waiting for a slot.
struct Intake {
    consumer: Arc<Source>,
    ledger: Arc<Ledger>,
    shared: Arc<Shared>,
    tasks: tokio::task::JoinSet<()>,
    /// Records received while every slot was taken, with their partition's assignment epoch.
    waiting: VecDeque<(OwnedMessage, u64)>,
    paused: bool,
    stats: RunStats,
}

impl Intake {
    fn start(&mut self, msg: OwnedMessage, epoch: u64, slot: OwnedSemaphorePermit) {
        let p = Partition::new(msg.topic(), msg.partition());
        let offset = msg.offset();
        let Some(epoch) = self.ledger.received(&p, offset, epoch) else {
            // Revoked since it arrived: its partition's next owner processes it.
            tracing::debug!(topic = %p.topic, partition = p.partition, offset, "dropped: revoked");
            return;
        };
        self.stats.records += 1;
        metrics::record_consumed(&p.topic);
        let tracked = self.shared.probe.taken(&p.topic, p.partition, offset);
        let ack = ack::Acknowledgement::new(
            self.ledger.clone(),
            self.consumer.clone(),
            self.shared.transactions.clone(),
            p,
            offset,
            epoch,
        );
        let shared = self.shared.clone();
        // Taken here, in the partition's offset order, not in the task: tasks may run in any
        // order, and a later record must never get an older catalog than an earlier one.
        let catalog = shared.profiles.load_full();
        self.tasks.spawn(async move {
            // A panic anywhere in the record's handling (time arithmetic, a decoder, a
            // serialiser) is the record's failure: an ERROR verdict and a dead letter, never a
            // frozen partition. The state it leaves behind is the record's own.
            let delivered =
                match AssertUnwindSafe(handle::handle(&shared, &catalog, &msg, &tracked))
                    .catch_unwind()
                    .await
                {
                    Ok(delivered) => delivered,
                    Err(panic) => {
                        handle::panicked(&shared, &msg, panic_message(panic.as_ref())).await
                    }
                };
            match delivered {
                // Exactly-once: the record keeps its slot until its transaction commits, so
                // a broker that stops committing pauses the intake (see `max_in_flight`).
                ack::Delivered::Staged(mut staged) => {
                    staged.hold = Some(crate::sink::outbox::Hold(Box::new(slot)));
                    ack.resolve(ack::Delivered::Staged(staged));
                }
                delivered => {
                    ack.resolve(delivered);
                    drop(slot);
                }
            }
        });
        metrics::records_in_flight(self.tasks.len());
    }

    fn set_paused(&mut self, paused: bool) {
        if paused && !self.paused {
            self.stats.pauses += 1;
            metrics::paused();
            tracing::debug!("every record slot taken: pausing the partitions");
        }
        if let Err(e) = source::set_paused(&self.consumer, paused) {
            tracing::warn!(paused, error = %e, "pause/resume partitions");
        }
        self.paused = paused;
    }
}
