//! The pipeline: the only module that knows every stage, and wires them.
//!
//! ```text
//! source ─▶ request ─▶ fetch ─▶ preprocess (blocking pool) ─▶ batch ─▶ model thread
//!    ▲                                                                     │
//!    └── offsets ◀── sink (verdict + dead letter, acknowledged) ◀── score ◀┘
//! ```
//!
//! Guarantees: each record is handled by its own task, bounded by `max_in_flight`; every
//! record ends as exactly one verdict (ERROR for failures, with a dead letter too) before its
//! offset can be stored; a bad record never stops the worker; on shutdown no new record is
//! taken, in-flight ones finish within `drain_timeout`, the producer is flushed and the
//! stored positions committed synchronously.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use prost::Message as _;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::batch::{next_batch, BatchConfig};
use crate::config::{KafkaSettings, DEFAULT_PROFILE};
use crate::fetch::Fetcher;
use crate::model::{ImageBatch, ModelHandle};
use crate::offsets::{OffsetTracker, Partition};
use crate::preprocess::{Preprocessor, Region};
use crate::proto::v1::{
    ErrorCode, InspectionRequest, ModelInfo, SourceRecord, StageLatencies, Verdict,
};
use crate::request::{self, Encoding};
use crate::score::Scorer;
use crate::sink::{Record, Sink};
use crate::source;
use crate::verdict::{self, Failure};

/// A profile ready to serve: its scorer and its preprocessing (CLAHE is per profile).
pub struct Profile {
    pub scorer: Scorer,
    pub preprocessor: Preprocessor,
}

/// Everything the pipeline needs, built by the caller (`clipqc run`, tests).
pub struct Deps {
    pub kafka: KafkaSettings,
    pub batch: BatchConfig,
    pub profiles: HashMap<String, Profile>,
    pub model: ModelHandle,
    pub model_info: ModelInfo,
    pub fetcher: Fetcher,
    pub consumer: StreamConsumer,
    pub sink: Sink,
    pub max_in_flight: usize,
    pub drain_timeout: Duration,
}

struct BatchItem {
    pixels: Vec<f32>,
    reply: oneshot::Sender<Result<Vec<f32>, String>>,
}

struct Shared {
    kafka: KafkaSettings,
    profiles: HashMap<String, Profile>,
    model_info: ModelInfo,
    fetcher: Fetcher,
    sink: Sink,
    to_batcher: mpsc::Sender<BatchItem>,
    /// Fired when the drain time is up: publishes still retrying give up (their offsets stay
    /// uncommitted). Not the shutdown signal itself: in-flight records must get to finish.
    abort: CancellationToken,
}

/// Run until `shutdown` fires, then drain. Errors only for what stops every record
/// (the consumer itself failing).
pub async fn run(deps: Deps, shutdown: CancellationToken) -> anyhow::Result<()> {
    let size = deps
        .profiles
        .values()
        .next()
        .map_or(224, |p| p.preprocessor.size());
    let (to_batcher, batch_rx) = mpsc::channel(deps.batch.max_size.max(1) * 4);
    let batcher = tokio::spawn(batch_loop(batch_rx, deps.batch, deps.model.clone(), size));
    let shared = Arc::new(Shared {
        kafka: deps.kafka,
        profiles: deps.profiles,
        model_info: deps.model_info,
        fetcher: deps.fetcher,
        sink: deps.sink,
        to_batcher,
        abort: CancellationToken::new(),
    });
    let consumer = deps.consumer;
    let permits = Arc::new(Semaphore::new(deps.max_in_flight.max(1)));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Partition, i64, bool)>();
    let mut tracker = OffsetTracker::new();
    // Records handed to tasks and not yet reported back (acknowledged or not).
    let mut running = 0usize;
    let report = |tracker: &mut OffsetTracker, running: &mut usize, done| {
        *running -= 1;
        complete(&consumer, tracker, done);
    };

    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(done) = done_rx.recv() => report(&mut tracker, &mut running, done),
            permit = permits.clone().acquire_owned() => {
                let permit = permit.expect("the semaphore is never closed. This is a bug.");
                // Keep storing positions while waiting for the next record: an idle topic must
                // not hold back the commit of what is already done.
                let msg = loop {
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => break None,
                        Some(done) = done_rx.recv() => report(&mut tracker, &mut running, done),
                        m = consumer.recv() => break Some(m),
                    }
                };
                let Some(msg) = msg else { break };
                let msg = match msg {
                    Ok(m) => m.detach(),
                    Err(e) => {
                        tracing::warn!(error = %e, "consumer error");
                        continue;
                    }
                };
                let p = Partition::new(msg.topic(), msg.partition());
                tracker.received(&p, msg.offset());
                running += 1;
                let shared = shared.clone();
                let done_tx = done_tx.clone();
                tokio::spawn(async move {
                    let offset = msg.offset();
                    let acked = handle(&shared, msg).await;
                    let _ = done_tx.send((p, offset, acked));
                    drop(permit);
                });
            }
        }
    }

    // Drain: take nothing new, let in-flight records finish (bounded), store, commit.
    tracing::info!(running, "draining");
    let deadline = tokio::time::Instant::now() + deps.drain_timeout;
    while running > 0 {
        match tokio::time::timeout_at(deadline, done_rx.recv()).await {
            Ok(Some(done)) => report(&mut tracker, &mut running, done),
            _ => {
                // Out of time: make the stragglers give up, then collect their reports.
                shared.abort.cancel();
                while running > 0 {
                    match tokio::time::timeout(Duration::from_secs(5), done_rx.recv()).await {
                        Ok(Some(done)) => report(&mut tracker, &mut running, done),
                        _ => break,
                    }
                }
                break;
            }
        }
    }
    if let Err(e) = shared.sink.flush(Duration::from_secs(10)) {
        tracing::warn!(error = %e, "producer flush");
    }
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        // Nothing stored since the last commit is not an error worth more than a note.
        tracing::info!(error = %e, "final commit");
    }
    drop(shared);
    batcher.abort();
    tracing::info!(left_in_flight = tracker.total_in_flight(), "stopped");
    Ok(())
}

fn complete(
    consumer: &StreamConsumer,
    tracker: &mut OffsetTracker,
    (p, offset, acked): (Partition, i64, bool),
) {
    if !acked {
        // Shut down before the broker acknowledged: leave it in flight, never store past it.
        return;
    }
    if let Some(position) = tracker.completed(&p, offset) {
        if let Err(e) = source::store_position(consumer, &p.topic, p.partition, position) {
            // Revoked meanwhile: its new owner resumes from the last commit (a duplicate, never a loss).
            tracing::debug!(topic = %p.topic, partition = p.partition, error = %e, "store offset");
        }
    }
}

/// One record to its verdict (and dead letter), published. Returns whether every record was
/// acknowledged by the broker.
async fn handle(shared: &Shared, msg: OwnedMessage) -> bool {
    let started = Instant::now();
    let source = SourceRecord {
        topic: msg.topic().to_string(),
        partition: msg.partition(),
        offset: msg.offset(),
    };
    let mut latencies = StageLatencies::default();
    let outcome = decide(shared, &msg, &mut latencies).await;
    latencies.total_seconds = started.elapsed().as_secs_f64();
    let now = SystemTime::now();
    let (verdict, failure) = match outcome {
        Ok((request, profile, decision)) => {
            let v = verdict::decided(
                &request,
                &profile.scorer,
                &decision,
                &shared.model_info,
                source.clone(),
                latencies,
                now,
            );
            (v, None)
        }
        Err((request, failure)) => {
            tracing::warn!(topic = %source.topic, partition = source.partition, offset = source.offset,
                code = failure.code_name(), stage = failure.stage, error = %failure.message, "request failed");
            let v = verdict::failed(
                request.as_deref(),
                &failure,
                &shared.model_info,
                source.clone(),
                latencies,
                now,
            );
            (v, Some(failure))
        }
    };
    let mut acked = publish_verdict(shared, &verdict).await;
    if let Some(failure) = failure {
        acked &= publish_dead_letter(shared, &msg, &source, &failure).await;
    }
    acked
}

type Decided<'a> = (InspectionRequest, &'a Profile, crate::score::Decision);
/// The request when it could be decoded (boxed: it is large next to the happy path's data).
type Failed = (Option<Box<InspectionRequest>>, Failure);

async fn decide<'a>(
    shared: &'a Shared,
    msg: &OwnedMessage,
    lat: &mut StageLatencies,
) -> Result<Decided<'a>, Failed> {
    let payload = msg.payload().unwrap_or_default();
    let request = request::decode(
        payload,
        source::header(msg, "content-type"),
        shared.kafka.default_encoding,
    )
    .map_err(|e| (None, Failure::from(&e)))?;
    let fail = |code, stage, message: String| {
        Err((
            Some(Box::new(request.clone())),
            Failure::new(code, stage, message),
        ))
    };
    let name = if request.profile.is_empty() {
        DEFAULT_PROFILE
    } else {
        request.profile.as_str()
    };
    let Some(profile) = shared.profiles.get(name) else {
        return fail(
            ErrorCode::UnknownProfile,
            "decode_request",
            format!("unknown profile {name:?}"),
        );
    };
    if past_deadline(&request) {
        return fail(
            ErrorCode::DeadlineExceeded,
            "deadline",
            "deadline passed before fetching".into(),
        );
    }
    let image = request
        .image
        .clone()
        .expect("validated requests have an image. This is a bug.");
    let t = Instant::now();
    let bytes = shared.fetcher.fetch(&image).await.map_err(|e| {
        (
            Some(Box::new(request.clone())),
            Failure::new(e.code(), "fetch", e.to_string()),
        )
    })?;
    lat.fetch_seconds = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let pre = profile.preprocessor.clone();
    let input = format!("request {}", request.request_id);
    let region = request.region.map(|r| Region {
        x: r.x,
        y: r.y,
        width: r.width,
        height: r.height,
    });
    // Decoding and resizing are CPU work: off the async workers.
    let pixels = tokio::task::spawn_blocking(move || pre.run(&input, &bytes, region))
        .await
        .expect("preprocessing does not panic. This is a bug.")
        .map_err(|e| (Some(Box::new(request.clone())), Failure::from(&e)))?;
    lat.decode_seconds = t.elapsed().as_secs_f64();
    if past_deadline(&request) {
        return fail(
            ErrorCode::DeadlineExceeded,
            "deadline",
            "deadline passed before inference".into(),
        );
    }

    let t = Instant::now();
    let (reply, answer) = oneshot::channel();
    if shared
        .to_batcher
        .send(BatchItem { pixels, reply })
        .await
        .is_err()
    {
        return fail(
            ErrorCode::ModelFailed,
            "model",
            "the batcher has stopped".into(),
        );
    }
    let embedding = match answer.await {
        Ok(Ok(e)) => e,
        Ok(Err(message)) => return fail(ErrorCode::ModelFailed, "model", message),
        Err(_) => {
            return fail(
                ErrorCode::ModelFailed,
                "model",
                "the model dropped the request".into(),
            )
        }
    };
    lat.inference_seconds = t.elapsed().as_secs_f64();
    let decision = profile.scorer.decide(&embedding);
    Ok((request, profile, decision))
}

fn past_deadline(r: &InspectionRequest) -> bool {
    r.deadline.as_ref().is_some_and(|d| {
        let deadline =
            SystemTime::UNIX_EPOCH + Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32);
        SystemTime::now() > deadline
    })
}

async fn publish_verdict(shared: &Shared, v: &Verdict) -> bool {
    let encoding = shared.kafka.verdict_encoding;
    let payload = match encoding {
        Encoding::Protobuf => v.encode_to_vec(),
        Encoding::Json => serde_json::to_vec(v).expect("a verdict serialises. This is a bug."),
    };
    let source = v.source.clone().unwrap_or_default();
    let headers = vec![
        (
            "content-type".to_string(),
            encoding.content_type().as_bytes().to_vec(),
        ),
        (
            "clipqc-request-id".to_string(),
            v.request_id.as_bytes().to_vec(),
        ),
        ("clipqc-source-topic".to_string(), source.topic.into_bytes()),
        (
            "clipqc-source-partition".to_string(),
            source.partition.to_string().into_bytes(),
        ),
        (
            "clipqc-source-offset".to_string(),
            source.offset.to_string().into_bytes(),
        ),
    ];
    let key = (!v.camera_id.is_empty()).then_some(v.camera_id.as_bytes());
    let record = Record {
        topic: &shared.kafka.verdict_topic,
        key,
        payload: &payload,
        headers,
    };
    shared.sink.send(&record, &shared.abort).await
}

async fn publish_dead_letter(
    shared: &Shared,
    msg: &OwnedMessage,
    source: &SourceRecord,
    failure: &Failure,
) -> bool {
    let mut headers: Vec<(String, Vec<u8>)> = msg
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default();
    headers.extend(
        verdict::dlq_headers(source, failure)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into_bytes())),
    );
    let record = Record {
        topic: &shared.kafka.dlq_topic,
        key: msg.key(),
        payload: msg.payload().unwrap_or_default(),
        headers,
    };
    shared.sink.send(&record, &shared.abort).await
}

/// Gather items into batches and hand them to the model thread; the next batch is formed
/// while the model runs this one (its answer is awaited on a task of its own).
async fn batch_loop(
    mut rx: mpsc::Receiver<BatchItem>,
    cfg: BatchConfig,
    model: ModelHandle,
    size: usize,
) {
    while let Some(items) = next_batch(&mut rx, &cfg).await {
        let mut batch = ImageBatch::new(size);
        let mut replies = Vec::with_capacity(items.len());
        for item in items {
            batch.push(&item.pixels);
            replies.push(item.reply);
        }
        // Blocks only while the model thread's bounded queue is full: that is the back-pressure.
        let submitted = tokio::task::block_in_place(|| model.submit_images(batch));
        tokio::spawn(async move {
            let result = match submitted {
                Ok(rx) => rx.await.unwrap_or(Err(crate::model::ModelError::Stopped)),
                Err(e) => Err(e),
            };
            match result {
                Ok(embeddings) => {
                    for (i, reply) in replies.into_iter().enumerate() {
                        let _ = reply.send(Ok(embeddings.row(i).to_vec()));
                    }
                }
                Err(e) => {
                    for reply in replies {
                        let _ = reply.send(Err(e.to_string()));
                    }
                }
            }
        });
    }
}
