//! One record's way to its verdict: request → profile → deadline → fetch → preprocess (on
//! the blocking pool) → batch/model → score → publish.
//!
//! Guarantees: every record ends as exactly one verdict (ERROR for failures, with a dead
//! letter too), except when the model is broken or the drain time ran out: then nothing is
//! published and the record is reported not acknowledged, so its offset is never stored.
//! The bytes a record holds (payload, image, pixels) are reserved from the worker's budget
//! while it holds them.

use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use rdkafka::message::{Message, OwnedMessage};
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::infer::{BatchItem, Embedded};
use super::{publish, Profile, Shared};
use crate::config::DEFAULT_PROFILE;
use crate::metrics;
use crate::preprocess::Region;
use crate::proto::v1::{ErrorCode, InspectionRequest, SourceRecord, StageLatencies};
use crate::request;
use crate::score::Decision;
use crate::source;
use crate::trace_context;
use crate::verdict::{self, stage, Failure};

/// One record to its verdict (and dead letter), published. Returns whether every record was
/// acknowledged by the broker.
pub async fn handle(shared: &Shared, msg: OwnedMessage) -> bool {
    let started = Instant::now();
    let source = SourceRecord {
        topic: msg.topic().to_string(),
        partition: msg.partition(),
        offset: msg.offset(),
    };
    let trace = trace_context::continue_from(&msg);
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
        Err(Stop::Abandon) => return false,
        Err(Stop::Failed(request, failure)) => {
            let trace_id = trace.as_ref().map(|t| t.trace_id.to_string());
            tracing::warn!(topic = %source.topic, partition = source.partition, offset = source.offset,
                trace_id, code = failure.code_name(), stage = failure.stage, error = %failure.message, "request failed");
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
    let mut acked = publish::verdict(shared, &verdict, trace_headers).await;
    if acked {
        count(&verdict, now);
        shared.notifier.observe(&verdict);
    }
    if let Some(failure) = failure {
        let dead = publish::dead_letter(shared, &msg, &source, &failure).await;
        if dead {
            metrics::dead_letter(failure.stage);
        }
        acked &= dead;
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
    shared: &'a Shared,
    msg: &OwnedMessage,
    lat: &mut StageLatencies,
) -> Result<Decided<'a>, Stop> {
    let payload = msg.payload().unwrap_or_default();
    let _payload_bytes = shared.budget.reserve(payload.len()).await;
    let request = request::decode(
        payload,
        source::header(msg, "content-type"),
        shared.kafka.default_encoding,
    )
    .map_err(|e| Stop::Failed(None, Failure::from(&e)))?;
    let failed = |code, stage, message: String| {
        Stop::Failed(
            Some(Box::new(request.clone())),
            Failure::new(code, stage, message),
        )
    };
    let name = if request.profile.is_empty() {
        DEFAULT_PROFILE
    } else {
        request.profile.as_str()
    };
    let Some(profile) = shared.profiles.get(name) else {
        return Err(failed(
            ErrorCode::UnknownProfile,
            stage::DECODE_REQUEST,
            format!("unknown profile {name:?}"),
        ));
    };
    if past_deadline(&request) {
        return Err(failed(
            ErrorCode::DeadlineExceeded,
            stage::DEADLINE,
            "deadline passed before fetching".into(),
        ));
    }
    let image = request
        .image
        .clone()
        .expect("validated requests have an image. This is a bug.");
    let t = Instant::now();
    let bytes = shared.fetcher.fetch(&image).await.map_err(|e| {
        metrics::fetch_error(e.kind());
        failed(e.code(), stage::FETCH, e.to_string())
    })?;
    lat.fetch_seconds = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let pre = profile.preprocessor.clone();
    let pixel_bytes = 3 * pre.size() * pre.size() * std::mem::size_of::<f32>();
    let _image_bytes = shared.budget.reserve(bytes.len() + pixel_bytes).await;
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
        .map_err(|e| Stop::Failed(Some(Box::new(request.clone())), Failure::from(&e)))?;
    lat.decode_seconds = t.elapsed().as_secs_f64();
    if past_deadline(&request) {
        return Err(failed(
            ErrorCode::DeadlineExceeded,
            stage::DEADLINE,
            "deadline passed before inference".into(),
        ));
    }

    let t = Instant::now();
    let (reply, answer) = oneshot::channel();
    if shared
        .to_batcher
        .send(BatchItem {
            pixels,
            queued: Instant::now(),
            reply,
        })
        .await
        .is_err()
    {
        return Err(Stop::Abandon);
    }
    let embedding = match answer.await {
        Ok(Embedded::Ok(e)) => e,
        Ok(Embedded::Failed(message)) => {
            return Err(failed(ErrorCode::ModelFailed, stage::MODEL, message))
        }
        Ok(Embedded::Broken) | Err(_) => return Err(Stop::Abandon),
    };
    lat.inference_seconds = t.elapsed().as_secs_f64();
    let decision = profile.scorer.decide(&embedding);
    Ok((request, profile, decision))
}

fn past_deadline(r: &InspectionRequest) -> bool {
    r.deadline
        .as_ref()
        .is_some_and(|d| SystemTime::now() > verdict::system_time(d))
}

/// Bytes held by records in flight, capped.
pub struct ByteBudget {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    total_kib: u32,
    held: std::sync::atomic::AtomicU64,
    peak: std::sync::atomic::AtomicU64,
}

/// Bytes reserved until dropped.
pub struct Reserved<'a> {
    budget: &'a ByteBudget,
    bytes: u64,
    _permit: Option<OwnedSemaphorePermit>,
}

impl ByteBudget {
    pub fn new(max_bytes: u64) -> Self {
        let total_kib = (max_bytes / 1024).clamp(1, u32::MAX as u64 >> 4) as u32;
        Self {
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(total_kib as usize)),
            total_kib,
            held: 0.into(),
            peak: 0.into(),
        }
    }

    /// Wait until `bytes` fit. A reservation larger than the whole budget waits for all of
    /// it, so one huge image passes alone instead of never.
    pub async fn reserve(&self, bytes: usize) -> Reserved<'_> {
        let kib = (bytes as u64).div_ceil(1024).min(self.total_kib as u64) as u32;
        let permit = match kib {
            0 => None,
            n => Some(
                self.permits
                    .clone()
                    .acquire_many_owned(n)
                    .await
                    .expect("the byte budget is never closed. This is a bug."),
            ),
        };
        let reserved = u64::from(kib) * 1024;
        let held = self.held.fetch_add(reserved, Ordering::Relaxed) + reserved;
        self.peak.fetch_max(held, Ordering::Relaxed);
        metrics::in_flight_bytes(held);
        Reserved {
            budget: self,
            bytes: reserved,
            _permit: permit,
        }
    }

    /// Most bytes held at once so far (in whole KiB per reservation).
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        let held = self.budget.held.fetch_sub(self.bytes, Ordering::Relaxed) - self.bytes;
        metrics::in_flight_bytes(held);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn reservations_wait_for_room_and_an_oversized_one_passes_alone() {
        let budget = std::sync::Arc::new(ByteBudget::new(10 * 1024));
        let a = budget.reserve(6 * 1024).await;
        // 6 + 6 > 10: the second waits until the first is dropped.
        let b = tokio::time::timeout(Duration::from_millis(50), budget.reserve(6 * 1024)).await;
        assert!(b.is_err(), "over budget: must wait");
        drop(a);
        let b = budget.reserve(6 * 1024).await;
        drop(b);
        // Larger than everything: takes the whole budget, no deadlock.
        let huge = budget.reserve(1 << 30).await;
        assert_eq!(budget.peak(), 10 * 1024);
        drop(huge);
        assert_eq!(budget.held.load(Ordering::Relaxed), 0);
    }
}
