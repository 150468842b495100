//! One record's way to its verdict: request → profile → deadline → fetch → preprocess (on
//! the blocking pool) → batch/model → score → segment (DEFECT and REVIEW verdicts of
//! segmenting profiles) → publish.
//!
//! Guarantees: every record ends as exactly one verdict (ERROR for failures, with a dead
//! letter too), except when the model is broken or the drain time ran out: then nothing is
//! published and the record is reported not acknowledged, so its offset is never stored.
//! The bytes a record holds (payload, image, pixels) are reserved from the worker's budget
//! while it holds them.

use std::time::{Instant, SystemTime};

use rdkafka::message::{Message, OwnedMessage};
use tokio::sync::oneshot;

use super::ack::Delivered;
use super::infer::{BatchItem, Embedded, Pixels};
use super::probe::{Step, Tracked};
use super::publish::{self, PublishError};
use super::{Profile, Shared};
use crate::config::DEFAULT_PROFILE;
use crate::metrics;
use crate::preprocess::Region;
use crate::profiles::Catalog;
use crate::proto::v1::{ErrorCode, InspectionRequest, SourceRecord, StageLatencies};
use crate::request;
use crate::score::line_memory::MemoryKey;
use crate::score::{Decision, Outcome};
use crate::sink::outbox::Staged;
use crate::sink::SendError;
use crate::source;
use crate::trace_context;
use crate::verdict::{self, Failure, Stage};

/// One record to its verdict (and dead letter), published, routed and scored with `catalog`
/// alone (the snapshot taken when the record was started). Returns how its delivery ended.
pub async fn handle(
    shared: &Shared,
    catalog: &Catalog,
    msg: &OwnedMessage,
    tracked: &Tracked,
) -> Delivered {
    let started = Instant::now();
    let source = source_record(msg);
    let trace = trace_context::continue_from(msg);
    let mut latencies = StageLatencies::default();
    let outcome = decide(shared, catalog, msg, &mut latencies, tracked).await;
    tracked.step(Step::Publish);
    latencies.total_seconds = started.elapsed().as_secs_f64();
    let now = SystemTime::now();
    let (verdict, failure) = match outcome {
        Ok((request, profile, decision)) => {
            let mut v = verdict::decided(
                &request,
                &profile.scorer,
                &decision,
                &shared.model_info,
                source.clone(),
                latencies,
                now,
            );
            v.profile_version = profile.version.clone();
            (v, None)
        }
        Err(Stop::Abandon) => return Delivered::NotAcknowledged,
        Err(Stop::Failed(request, failure)) => {
            let trace_id = trace.as_ref().map(|t| t.trace_id.to_string());
            tracing::warn!(topic = %source.topic, partition = source.partition, offset = source.offset,
                trace_id, code = failure.code_name(), stage = %failure.stage, error = %failure.message, "request failed");
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
    let trace_headers = trace.map(|t| t.headers).unwrap_or_default();
    deliver(shared, msg, &source, verdict, failure, trace_headers).await
}

/// The record's handling panicked: its ERROR verdict (echoing the request when it decodes)
/// and dead letter, as for any other failure of the record.
pub async fn panicked(shared: &Shared, msg: &OwnedMessage, panic: String) -> Delivered {
    metrics::record_panicked();
    let source = source_record(msg);
    tracing::error!(topic = %source.topic, partition = source.partition, offset = source.offset,
        panic, "handling the record panicked: it gets an ERROR verdict and a dead letter");
    let failure = Failure::new(
        ErrorCode::Internal,
        Stage::Internal,
        format!("the worker failed on this record (a bug, please report it): {panic}"),
    );
    // Decoding may have been what panicked: this answer must not panic again.
    let (payload, encoding) = (
        msg.payload().unwrap_or_default(),
        shared.kafka.default_encoding,
    );
    let content_type = crate::source::header(msg, "content-type");
    let request = std::panic::catch_unwind(|| request::decode(payload, content_type, encoding))
        .ok()
        .and_then(Result::ok);
    let v = verdict::failed(
        request.as_ref(),
        &failure,
        &shared.model_info,
        source.clone(),
        StageLatencies::default(),
        SystemTime::now(),
    );
    deliver(shared, msg, &source, v, Some(failure), Vec::new()).await
}

fn source_record(msg: &OwnedMessage) -> SourceRecord {
    SourceRecord {
        topic: msg.topic().to_string(),
        partition: msg.partition(),
        offset: msg.offset(),
    }
}

/// Publish the verdict and, for a failure, the dead letter (exactly-once: stage them for the
/// next transaction). A verdict the broker refuses for good is replaced by a small ERROR
/// verdict (and the record dead-lettered); a verdict or dead-letter topic that refuses even
/// that stops the worker: every record would fail alike.
async fn deliver(
    shared: &Shared,
    msg: &OwnedMessage,
    source: &SourceRecord,
    verdict: crate::proto::v1::Verdict,
    failure: Option<Failure>,
    trace: Vec<(String, Vec<u8>)>,
) -> Delivered {
    if shared.transactions.is_some() {
        return stage(shared, msg, source, verdict, failure, trace);
    }
    if publish_acknowledged(shared, msg, source, verdict, failure, trace).await {
        Delivered::Acknowledged
    } else {
        Delivered::NotAcknowledged
    }
}

/// Exactly-once: the records for the next transaction, with the small ERROR verdict and
/// payload-less dead letter to publish instead if the broker refuses them (used at once
/// when they are over the producer's size limit).
fn stage(
    shared: &Shared,
    msg: &OwnedMessage,
    source: &SourceRecord,
    verdict: crate::proto::v1::Verdict,
    failure: Option<Failure>,
    trace: Vec<(String, Vec<u8>)>,
) -> Delivered {
    let refusal = Failure::new(
        ErrorCode::PublishFailed,
        Stage::Publish,
        "the verdict could not be published: the broker refused it".to_string(),
    );
    let small = verdict::shrunk(&verdict, &refusal);
    let mut fallback = Vec::new();
    // Encoding fails only for JSON that serde refuses; the small verdict has no scores left.
    if let Ok(r) = publish::verdict_record(shared, &small, trace.clone()) {
        fallback.push(r);
        fallback.push(publish::dead_letter_record(
            shared,
            msg,
            source,
            failure.as_ref().unwrap_or(&refusal),
            false,
        ));
    }
    let mut records = Vec::new();
    let primary = publish::verdict_record(shared, &verdict, trace);
    if let Ok(r) = &primary {
        records.push(r.clone());
        if let Some(f) = &failure {
            records.push(publish::dead_letter_record(shared, msg, source, f, true));
        }
    }
    let txn = shared
        .transactions
        .as_ref()
        .expect("checked by the caller. This is a bug.");
    let on_fallback = primary.is_err() || !txn.fits(&records);
    if on_fallback {
        tracing::warn!(topic = %source.topic, partition = source.partition, offset = source.offset,
            "verdict too large or not encodable: staging a small ERROR verdict instead");
        metrics::publish_refused(&shared.kafka.verdict_topic);
    }
    let published = if on_fallback { small } else { verdict };
    count(&published, SystemTime::now());
    shared.notifier.observe(&published);
    if on_fallback || failure.is_some() {
        metrics::dead_letter(
            failure
                .as_ref()
                .map_or(Stage::Publish, |f| f.stage)
                .as_str(),
        );
    }
    Delivered::Staged(Staged {
        records,
        fallback,
        on_fallback,
        hold: None,
    })
}

/// At-least-once: publish and wait for the broker's acknowledgement. Returns whether every
/// record was acknowledged.
async fn publish_acknowledged(
    shared: &Shared,
    msg: &OwnedMessage,
    source: &SourceRecord,
    verdict: crate::proto::v1::Verdict,
    mut failure: Option<Failure>,
    trace: Vec<(String, Vec<u8>)>,
) -> bool {
    // The record was refused for what it is, even small: answered as well as it can be.
    let mut skipped = false;
    let published = match publish::verdict(shared, &verdict, trace.clone()).await {
        Ok(()) => Some(verdict),
        Err(e) if e.is_refusal() => {
            let refusal = Failure::new(
                ErrorCode::PublishFailed,
                Stage::Publish,
                format!("the verdict could not be published: {e}"),
            );
            tracing::warn!(topic = %source.topic, partition = source.partition, offset = source.offset,
                error = %e, "verdict refused: publishing a small ERROR verdict instead");
            let small = verdict::shrunk(&verdict, &refusal);
            failure = Some(refusal);
            match publish::verdict(shared, &small, trace).await {
                Ok(()) => Some(small),
                Err(PublishError::Send(e)) if e.refuses_only_the_record() => {
                    // This record alone: skip it (loudly) rather than stop the partition.
                    tracing::error!(topic = %source.topic, partition = source.partition,
                        offset = source.offset, error = %e,
                        "even the small ERROR verdict is refused: the record goes without a verdict");
                    metrics::publish_refused(&shared.kafka.verdict_topic);
                    skipped = true;
                    None
                }
                Err(e) => {
                    if e.is_refusal() {
                        shared.fatal.declare(super::RunError::TopicRefuses {
                            what: "verdict",
                            topic: shared.kafka.verdict_topic.clone(),
                            detail: e.to_string(),
                        });
                    }
                    None
                }
            }
        }
        Err(_) => None,
    };
    let mut acked = match published {
        Some(v) => {
            count(&v, SystemTime::now());
            shared.notifier.observe(&v);
            true
        }
        None => skipped,
    };
    if let Some(failure) = failure {
        match publish::dead_letter(shared, msg, source, &failure).await {
            Ok(()) => metrics::dead_letter(failure.stage.as_str()),
            Err(e) if e.refuses_only_the_record() => {
                // Even trimmed (a few kilobytes): this record alone. Its verdict is out and
                // the original stays on the input topic: skip the dead letter, loudly.
                tracing::error!(topic = %source.topic, partition = source.partition,
                    offset = source.offset, error = %e,
                    "the dead letter is refused even trimmed: the record goes without one");
                metrics::publish_refused(&shared.kafka.dlq_topic);
            }
            Err(e) => {
                if matches!(e, SendError::Refused { .. }) {
                    shared.fatal.declare(super::RunError::TopicRefuses {
                        what: "dead-letter",
                        topic: shared.kafka.dlq_topic.clone(),
                        detail: e.to_string(),
                    });
                }
                acked = false;
            }
        }
    }
    acked
}

/// A published verdict in the metrics.
fn count(v: &crate::proto::v1::Verdict, now: SystemTime) {
    let outcome = v
        .outcome()
        .as_str_name()
        .trim_start_matches("OUTCOME_")
        .to_ascii_lowercase();
    metrics::verdict(&outcome, &v.top_class, &v.profile, &v.line_id);
    if let Some(l) = &v.latencies {
        for (stage, seconds) in [
            ("fetch", l.fetch_seconds),
            ("decode", l.decode_seconds),
            ("total", l.total_seconds),
        ] {
            if seconds > 0.0 {
                metrics::stage(stage, seconds);
            }
        }
    }
    if let Some(t) = v.captured_at.as_ref().filter(|t| t.seconds > 0) {
        if let Ok(age) = now.duration_since(verdict::system_time(t)) {
            metrics::capture_to_verdict(age.as_secs_f64());
        }
    }
}

type Decided<'a> = (InspectionRequest, &'a Profile, Decision);

enum Stop {
    /// The record's own failure: an ERROR verdict and a dead letter. The request is there
    /// when it could be decoded (boxed: it is large next to the happy path's data).
    Failed(Option<Box<InspectionRequest>>, Failure),
    /// Not the record's fault (the model is broken): publish nothing, commit nothing.
    Abandon,
}

async fn decide<'a>(
    shared: &Shared,
    catalog: &'a Catalog,
    msg: &OwnedMessage,
    lat: &mut StageLatencies,
    tracked: &Tracked,
) -> Result<Decided<'a>, Stop> {
    let payload = msg.payload().unwrap_or_default();
    let reserved = shared.budget.reserve(payload.len()).await;
    tracked.step(Step::Request);
    let request = request::parse(
        payload,
        source::header(msg, "content-type"),
        shared.kafka.default_encoding,
    )
    .map_err(|e| Stop::Failed(None, Failure::from(&e)))?;
    if let Err(e) = request::validate(&request) {
        // Decoded but unusable: the verdict still says which request it answers.
        let echo = request::echoable(request);
        return Err(Stop::Failed(Some(Box::new(echo)), Failure::from(&e)));
    }
    let failed = |code, stage, message: String| {
        Stop::Failed(
            Some(Box::new(request.clone())),
            Failure::new(code, stage, message),
        )
    };
    // The request's own profile and region, else its camera's or line's route's.
    let requested = request.region.map(|r| Region {
        x: r.x,
        y: r.y,
        width: r.width,
        height: r.height,
    });
    let (routed, region) = catalog.router.resolve(
        &request.camera_id,
        &request.line_id,
        &request.profile,
        requested,
    );
    let name = routed.unwrap_or(DEFAULT_PROFILE);
    let Some(profile) = catalog.profiles.get(name).map(AsRef::as_ref) else {
        return Err(failed(
            ErrorCode::UnknownProfile,
            Stage::DecodeRequest,
            format!("unknown profile {name:?}"),
        ));
    };
    if past_deadline(&request) {
        return Err(failed(
            ErrorCode::DeadlineExceeded,
            Stage::Deadline,
            "deadline passed before fetching".into(),
        ));
    }
    let image = request
        .image
        .clone()
        .expect("validated requests have an image. This is a bug.");
    let t = Instant::now();
    tracked.step(Step::Fetch);
    // The body is reserved before it is held, as it streams in.
    let room = super::budget::BodyRoom::new(&shared.budget, reserved, payload.len());
    let fetched = shared.fetcher.fetch_into(&image, &room).await;
    let reserved = room.into_reserved().await;
    let bytes = fetched.map_err(|e| {
        metrics::fetch_error(e.kind());
        Stop::Failed(Some(Box::new(request.clone())), Failure::from(&e))
    })?;
    lat.fetch_seconds = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let pre = profile.preprocessor.clone();
    let input = format!("request {}", request.request_id);
    // What decoding will hold at its peak (decoded pixels, copies, resize target, tensor),
    // from the image's header, before anything is decoded: a small file that decodes to
    // gigabytes, or an extreme aspect ratio, is refused here (TOO_LARGE).
    let plan = pre
        .plan(&input, &bytes, region)
        .map_err(|e| Stop::Failed(Some(Box::new(request.clone())), Failure::from(&e)))?;
    // Payload, image and all of that in one reservation, never waited for while holding a
    // part of it.
    let held = payload.len() + bytes.len();
    tracked.step(Step::FrameBytes((held + plan.peak_bytes as usize) as u64));
    let reserved = reserved.grow_to(held + plan.peak_bytes as usize).await;
    tracked.step(Step::Decode);
    // The segment stage decodes the frame again, at full size, for the verdicts it outlines
    // (a count, not a copy: the bytes are shared).
    let frame_bytes = bytes.clone();
    // Decoding and resizing are CPU work: off the async workers. A decoder that panics on
    // this image fails this image.
    let views =
        match tokio::task::spawn_blocking(move || pre.views_any(&input, &bytes, region)).await {
            Ok(result) => result
                .map_err(|e| Stop::Failed(Some(Box::new(request.clone())), Failure::from(&e)))?,
            Err(e) => {
                metrics::record_panicked();
                let why = match e.try_into_panic() {
                    Ok(panic) => super::panic_message(panic.as_ref()),
                    Err(e) => e.to_string(),
                };
                return Err(failed(
                    ErrorCode::DecodeFailed,
                    Stage::DecodeImage,
                    format!(
                        "request {}: the image decoder failed on this image: {why}",
                        request.request_id
                    ),
                ));
            }
        };
    lat.decode_seconds = t.elapsed().as_secs_f64();
    if past_deadline(&request) {
        return Err(failed(
            ErrorCode::DeadlineExceeded,
            Stage::Deadline,
            "deadline passed before inference".into(),
        ));
    }

    // Every view (the whole frame, each window) is one batch item: the batcher, its batch
    // size and fill count windows, and a frame's windows share batches with other frames'.
    let t = Instant::now();
    // The device path's views stay on the device, one `3×S×S` slice of its batch each.
    let (origin, windows, tensors): (_, _, Vec<Pixels>) = match views {
        crate::preprocess::AnyViews::Host(v) => (
            v.origin,
            v.windows,
            v.tensors.into_iter().map(Pixels::Host).collect(),
        ),
        crate::preprocess::AnyViews::Device(d) => {
            let n = d.tensor.size()[0];
            let views = (0..n).map(|i| Pixels::Device(d.tensor.get(i))).collect();
            (d.origin, d.windows, views)
        }
    };
    let mut answers = Vec::with_capacity(tensors.len());
    tracked.step(Step::Model(tensors.len()));
    for pixels in tensors {
        let (reply, answer) = oneshot::channel();
        let item = BatchItem {
            pixels,
            queued: Instant::now(),
            reply,
        };
        if shared.to_batcher.send(item).await.is_err() {
            return Err(Stop::Abandon);
        }
        answers.push(answer);
    }
    let mut embeddings = Vec::with_capacity(answers.len());
    let mut failure = None;
    for answer in answers {
        // Every answer is awaited, so a broken model is told apart from one failed window.
        match answer.await {
            Ok(Embedded::Ok(e)) => embeddings.push(e),
            Ok(Embedded::Failed(message)) => failure = failure.or(Some(message)),
            Ok(Embedded::Broken) | Err(_) => return Err(Stop::Abandon),
        }
    }
    if let Some(message) = failure {
        return Err(failed(ErrorCode::ModelFailed, Stage::Model, message));
    }
    lat.inference_seconds = t.elapsed().as_secs_f64();
    metrics::views(embeddings.len());
    // One snapshot of the bank for the whole record, indexed by this profile's classes (the
    // bank may still be indexed by another version's until the follower has re-read it).
    let bank = shared.exemplars.load();
    let classes: Vec<&str> = profile.scorer.class_names().collect();
    let bank = bank.profile(name).map(|b| b.for_classes(&classes));
    let mut decision =
        profile
            .scorer
            .decide_views_with(&embeddings, &windows, origin, bank.as_deref());
    if let Some(memory) = &profile.scorer.profile.line_memory {
        // Scored against the line's earlier parts, then remembered unless judged a defect.
        let key = match memory.key {
            MemoryKey::Line => &request.line_id,
            MemoryKey::Camera => &request.camera_id,
        };
        let now = Instant::now();
        // Scoring compares every view with every remembered part's views (tens of
        // milliseconds for a full memory): on the blocking pool, not the async workers.
        let score = tokio::task::spawn_blocking({
            let lines = shared.line_memory.clone();
            let (name, key, embeddings, memory) = (
                name.to_string(),
                key.clone(),
                embeddings.clone(),
                memory.clone(),
            );
            move || lines.assess(&name, &key, &embeddings, &memory, now)
        })
        .await
        .map_err(|e| {
            let why = if e.is_panic() {
                super::panic_message(e.into_panic().as_ref())
            } else {
                "cancelled: the runtime is stopping".to_string()
            };
            failed(
                ErrorCode::Internal,
                Stage::Internal,
                format!("line memory: {why}"),
            )
        })?;
        let mut cosines = Default::default();
        if let Some(a) = score {
            // The percentile, not the raw score: see score::line_memory's calibration.
            decision = profile.scorer.with_line_memory(decision, a.percentile);
            cosines = a.cosines;
        }
        if decision.outcome != Outcome::Defect {
            shared
                .line_memory
                .remember_with(name, key, &embeddings, memory, now, &cosines);
        }
    }
    if super::segment::wanted(&profile.scorer.profile, &decision) {
        let t = Instant::now();
        tracked.step(Step::Segment);
        let frame = super::segment::Frame {
            input: format!("request {}", request.request_id),
            bytes: frame_bytes,
            preprocessor: &profile.preprocessor,
            region,
            mm_per_pixel: catalog
                .router
                .mm_per_pixel(&request.camera_id, &request.line_id),
        };
        decision = super::segment::outline(
            shared.segmenting.as_ref(),
            &profile.scorer.profile,
            decision,
            frame,
            (reserved, held as u64),
        )
        .await;
        lat.segment_seconds = t.elapsed().as_secs_f64();
    }
    Ok((request, profile, decision))
}

fn past_deadline(r: &InspectionRequest) -> bool {
    r.deadline
        .as_ref()
        .is_some_and(|d| SystemTime::now() > verdict::system_time(d))
}
