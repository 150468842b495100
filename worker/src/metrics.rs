//! Metrics: every series the worker exports, named and described in one place.
//!
//! Conventions (Prometheus'): prefix `clipqc_`, base units in the name (`_seconds`,
//! `_bytes`), counters end in `_total`, label sets are small and fixed (outcome, class,
//! profile, line, stage, kind, topic/partition): never request ids, URLs or offsets. Each
//! event below is one function, so call sites cannot misspell a name or a label.
//!
//! The label values of the rare-event counters are vocabularies owned here (the `*_KINDS`,
//! `*_REASONS` and `*_STAGES` lists), so that this module imports nothing from the stages
//! (every stage reports through it: it must sit below them all). Each stage maps its errors
//! onto these strings, and a unit test in the stage checks that every variant's label is in
//! the list, so the two cannot drift.

use std::collections::HashSet;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets, 1 ms to 60 s.
const SECONDS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];
const BATCH: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
const RATIO: [f64; 10] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

/// Install the global recorder (once per process) and describe every series. Returns the
/// handle that renders `/metrics`.
pub fn install() -> PrometheusHandle {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full("clipqc_batch_size".into()), &BATCH))
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full("clipqc_batch_fill_ratio".into()), &RATIO)
        })
        .expect("bucket lists are non-empty. This is a bug.")
        .build_recorder();
    let handle = recorder.handle();
    // A second install (tests running several workers in one process) keeps the first.
    let first = metrics::set_global_recorder(recorder).is_ok();
    describe();
    gauge!("clipqc_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    // Counters of rare events start at 0, so the first one is an increase (rate() and
    // increase() cannot see a series appear at 1) and dashboards show 0, not "no data".
    if !first {
        return handle;
    }
    counter!("clipqc_model_batch_failures_total").absolute(0);
    counter!("clipqc_consumer_pauses_total").absolute(0);
    counter!("clipqc_record_panics_total").absolute(0);
    for reason in SEGMENT_SKIP_REASONS {
        counter!("clipqc_segment_skipped_total", "reason" => reason).absolute(0);
    }
    counter!("clipqc_profile_reloads_total").absolute(0);
    for reason in PROFILE_RELOAD_FAILURES {
        counter!("clipqc_profile_reload_failures_total", "reason" => reason).absolute(0);
    }
    gauge!("clipqc_publish_stalled_records").set(0.0);
    gauge!("clipqc_transaction_stalled").set(0.0);
    gauge!("clipqc_transaction_staged_records").set(0.0);
    // Queue gauges change only when records come and go; an idle worker holds none.
    for name in [
        "clipqc_records_in_flight",
        "clipqc_records_waiting",
        "clipqc_in_flight_bytes",
    ] {
        gauge!(name).set(0.0);
    }
    for stage in DEAD_LETTER_STAGES {
        counter!("clipqc_dead_letters_total", "stage" => stage).absolute(0);
    }
    for kind in FETCH_ERROR_KINDS {
        counter!("clipqc_fetch_errors_total", "kind" => kind).absolute(0);
    }
    // Counted at their first event otherwise: the alerts and dashboard read them from 0.
    for result in ["applied", "ignored", "refused"] {
        counter!("clipqc_feedback_total", "result" => result).absolute(0);
    }
    for reason in EXEMPLAR_SKIP_REASONS {
        counter!("clipqc_exemplars_skipped_total", "reason" => reason).absolute(0);
    }
    for reason in ADAPTER_SKIP_REASONS {
        counter!("clipqc_adapters_skipped_total", "reason" => reason).absolute(0);
    }
    for reason in DEVICE_FALLBACK_REASONS {
        counter!("clipqc_device_preprocess_fallbacks_total", "reason" => reason).absolute(0);
    }
    handle
}

fn describe() {
    describe_counter!(
        "clipqc_segment_skipped_total",
        "DEFECT and REVIEW verdicts of segmenting profiles published without masks, by reason \
         (queue_full, failed, input, model, stopped)."
    );
    describe_histogram!(
        "clipqc_segment_seconds",
        Unit::Seconds,
        "Time to outline one verdict's defects with Segment Anything: frame decode, SAM's \
         preprocessing, queue wait, encoder and mask decoder."
    );
    describe_histogram!(
        "clipqc_device_decode_seconds",
        Unit::Seconds,
        "JPEG decode time on the device preprocessing path (preprocess.device)."
    );
    describe_counter!(
        "clipqc_device_preprocess_fallbacks_total",
        "Images the device preprocessing path sent to the CPU path, by reason (not_jpeg, \
         cmyk, clahe, over_budget, decode_error)."
    );
    describe_counter!(
        "clipqc_records_consumed_total",
        "Input records taken for processing."
    );
    describe_counter!(
        "clipqc_verdicts_total",
        "Verdicts acknowledged by the broker, by outcome, top class, profile and line."
    );
    describe_counter!(
        "clipqc_dead_letters_total",
        "Records sent to the dead-letter topic, by failing stage."
    );
    describe_counter!(
        "clipqc_fetch_errors_total",
        "Failed image fetches, by kind (forbidden, too_large, failed)."
    );
    describe_histogram!(
        "clipqc_stage_duration_seconds",
        Unit::Seconds,
        "Time per pipeline stage (fetch, decode, queue_wait, inference, total)."
    );
    describe_histogram!(
        "clipqc_capture_to_verdict_seconds",
        Unit::Seconds,
        "From the request's captured_at to its verdict."
    );
    describe_histogram!(
        "clipqc_batch_size",
        Unit::Count,
        "Views per model batch (whole frames and windows of tiled profiles)."
    );
    describe_counter!(
        "clipqc_exemplars_skipped_total",
        "Exemplar records the bank refused, by reason (unknown profile or class, another \
         model's, malformed, bank full)."
    );
    describe_counter!(
        "clipqc_feedback_total",
        "Operator feedback records handled, by result: applied (became an exemplar), ignored \
         (the profile's feedback policy), refused (also dead-lettered)."
    );
    describe_gauge!(
        "clipqc_exemplars",
        "Exemplars in a profile's few-shot bank, per class."
    );
    describe_gauge!(
        "clipqc_exemplar_catch_up_seconds",
        Unit::Seconds,
        "How long reading the exemplar topic to its end took at start."
    );
    describe_counter!(
        "clipqc_profile_reloads_total",
        "Config file changes applied while running (profiles or routes swapped in)."
    );
    describe_counter!(
        "clipqc_profile_reload_failures_total",
        "Config file changes refused (the profiles in service kept), by reason: unreadable, \
         invalid (does not load or validate), build (a changed profile could not be built), emptied (no \
         profile left in the file: a half-written save?)."
    );
    describe_gauge!(
        "clipqc_profile_info",
        "1 for each profile's version in service (the hash verdicts carry), 0 for versions it \
         replaced."
    );
    describe_gauge!(
        "clipqc_profile_reload_seconds",
        Unit::Seconds,
        "How long the last applied config change took, from reading the file to the swap \
         (changed profiles' prompts embedded)."
    );
    describe_gauge!(
        "clipqc_config_restart_pending",
        "1 while the config file differs from the running settings in keys that take a restart."
    );
    describe_counter!(
        "clipqc_views_total",
        "Views the model embedded for decided records: one whole-frame view per record, plus \
         every window of a tiled profile (its rate is windows per second)."
    );
    describe_histogram!("clipqc_batch_fill_ratio", "Batch size over batch.max_size.");
    describe_gauge!(
        "clipqc_records_in_flight",
        Unit::Count,
        "Records being processed."
    );
    describe_gauge!(
        "clipqc_records_waiting",
        Unit::Count,
        "Records received while every slot was taken."
    );
    describe_gauge!(
        "clipqc_in_flight_bytes",
        Unit::Bytes,
        "Bytes held by records in flight (payloads, images, pixels)."
    );
    describe_counter!(
        "clipqc_consumer_pauses_total",
        "Times the partitions were paused because the worker was full."
    );
    describe_gauge!(
        "clipqc_consumer_lag",
        Unit::Count,
        "Records behind the partition's end, per partition this worker owns (librdkafka statistics); 0 once it moved away."
    );
    describe_counter!(
        "clipqc_model_batch_failures_total",
        "Model batches that failed."
    );
    describe_gauge!(
        "clipqc_model_load_seconds",
        Unit::Seconds,
        "Time to load the model."
    );
    describe_gauge!(
        "clipqc_model_warmup_seconds",
        Unit::Seconds,
        "Time of the warm-up passes before readiness."
    );
    describe_counter!(
        "clipqc_webhook_notifications_total",
        "Webhook notifications by webhook and result (sent, failed, dropped, rate_limited)."
    );
    describe_gauge!(
        "clipqc_gpu_memory_bytes",
        Unit::Bytes,
        "Memory of the CUDA device the model runs on (kind: used, total; all processes, from NVML)."
    );
    describe_counter!(
        "clipqc_record_panics_total",
        "Records whose handling panicked (each became an ERROR verdict and a dead letter)."
    );
    describe_counter!(
        "clipqc_transactions_total",
        "Exactly-once transactions (verdicts, dead letters and input offsets together), by result (committed, aborted)."
    );
    describe_histogram!(
        "clipqc_transaction_seconds",
        Unit::Seconds,
        "Time to write and commit one exactly-once transaction."
    );
    describe_counter!(
        "clipqc_publish_refused_total",
        "Records the broker refused for good (too large, unknown topic, not authorised), by topic."
    );
    describe_gauge!(
        "clipqc_transaction_staged_records",
        Unit::Count,
        "Exactly-once: finished records whose verdicts wait for their transaction (each holds a record slot)."
    );
    describe_gauge!(
        "clipqc_transaction_stalled",
        "1 while an exactly-once transaction's commit or abort has timed out and is being repeated (the worker stops after 10 in a row)."
    );
    describe_gauge!(
        "clipqc_publish_stalled_records",
        Unit::Count,
        "Records whose publishing has been retried for longer than the stall bound (30 s)."
    );
    describe_gauge!(
        "clipqc_build_info",
        "Always 1; the version label says which build runs."
    );
}

pub fn record_consumed(topic: &str) {
    counter!("clipqc_records_consumed_total", "topic" => topic.to_string()).increment(1);
}

/// Distinct values a request-supplied label (line, profile, class) may take; later ones are
/// counted as [`OTHER`]. A plant has tens of lines, not thousands: a producer that writes a
/// new line id (or an unknown profile name) into every request must not grow `/metrics`,
/// and Prometheus with it, without bound.
pub const MAX_LABEL_VALUES: usize = 256;
/// The label value past [`MAX_LABEL_VALUES`].
pub const OTHER: &str = "other";

/// The first `max` distinct values seen, kept as they are.
pub struct BoundedLabels {
    seen: Mutex<HashSet<String>>,
    max: usize,
}

impl BoundedLabels {
    pub fn new(max: usize) -> Self {
        Self {
            seen: Mutex::new(HashSet::new()),
            max,
        }
    }

    /// `value` while it is one of the first `max` distinct ones, else [`OTHER`].
    pub fn label(&self, value: &str) -> String {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(value) {
            return value.to_string();
        }
        if seen.len() < self.max {
            seen.insert(value.to_string());
            return value.to_string();
        }
        OTHER.to_string()
    }
}

static VERDICT_LABELS: LazyLock<[BoundedLabels; 3]> =
    LazyLock::new(|| std::array::from_fn(|_| BoundedLabels::new(MAX_LABEL_VALUES)));

pub fn verdict(outcome: &str, class: &str, profile: &str, line: &str) {
    let [classes, profiles, lines] = &*VERDICT_LABELS;
    counter!("clipqc_verdicts_total",
        "outcome" => outcome.to_string(), "class" => classes.label(class),
        "profile" => profiles.label(profile), "line" => lines.label(line))
    .increment(1);
}

/// Why a verdict of a segmenting profile went out without masks (label values).
pub const SEGMENT_SKIP_REASONS: [&str; 6] = [
    "queue_full",
    "failed",
    "input",
    "model",
    "stopped",
    "timed_out",
];

/// Whether the segmentation thread serves (1) or stopped after panicking (0).
pub fn segment_thread_up(up: bool) {
    gauge!("clipqc_segment_thread_up").set(if up { 1.0 } else { 0.0 });
}

/// A segmentation call that panicked (its frame went without masks).
pub fn segment_panicked() {
    counter!("clipqc_segment_panics_total").increment(1);
}

/// A verdict went out without masks, for `reason` (one of [`SEGMENT_SKIP_REASONS`]).
pub fn segment_skipped(reason: &'static str) {
    counter!("clipqc_segment_skipped_total", "reason" => reason).increment(1);
}

/// One verdict's defects outlined in `seconds`.
pub fn segmented(seconds: f64) {
    histogram!("clipqc_segment_seconds").record(seconds);
}

pub fn record_panicked() {
    counter!("clipqc_record_panics_total").increment(1);
}

/// An exactly-once transaction ended (`committed` or `aborted`) after `took`.
pub fn transaction(result: &'static str, took: Duration) {
    counter!("clipqc_transactions_total", "result" => result).increment(1);
    histogram!("clipqc_transaction_seconds").record(took.as_secs_f64());
}

pub fn transaction_staged(records: usize) {
    gauge!("clipqc_transaction_staged_records").set(records as f64);
}

pub fn transaction_stalled(stalled: bool) {
    gauge!("clipqc_transaction_stalled").set(if stalled { 1.0 } else { 0.0 });
}

pub fn publish_refused(topic: &str) {
    counter!("clipqc_publish_refused_total", "topic" => topic.to_string()).increment(1);
}

pub fn publish_stalled(records: usize) {
    gauge!("clipqc_publish_stalled_records").set(records as f64);
}

/// Where a record can fail: the `stage` label of `clipqc_dead_letters_total` (what
/// `verdict::Stage::as_str` gives).
pub const DEAD_LETTER_STAGES: [&str; 8] = [
    "decode_request",
    "fetch",
    "decode_image",
    "deadline",
    "model",
    "internal",
    "publish",
    "feedback",
];

/// A record sent to the dead-letter topic, failed at `stage` (one of [`DEAD_LETTER_STAGES`]).
pub fn dead_letter(stage: &'static str) {
    counter!("clipqc_dead_letters_total", "stage" => stage).increment(1);
}

/// Why an image fetch failed: the `kind` label of `clipqc_fetch_errors_total` (what
/// `fetch::FetchError::kind` gives).
pub const FETCH_ERROR_KINDS: [&str; 3] = ["forbidden", "too_large", "failed"];

/// A failed image fetch (`kind`: one of [`FETCH_ERROR_KINDS`]).
pub fn fetch_error(kind: &'static str) {
    counter!("clipqc_fetch_errors_total", "kind" => kind).increment(1);
}

pub fn stage(stage: &'static str, seconds: f64) {
    histogram!("clipqc_stage_duration_seconds", "stage" => stage).record(seconds);
}

pub fn capture_to_verdict(seconds: f64) {
    histogram!("clipqc_capture_to_verdict_seconds").record(seconds);
}

pub fn batch(size: usize, max_size: usize) {
    histogram!("clipqc_batch_size").record(size as f64);
    histogram!("clipqc_batch_fill_ratio").record(size as f64 / max_size.max(1) as f64);
}

/// Why the bank refused an exemplar record: the `reason` label of
/// `clipqc_exemplars_skipped_total` (what `exemplars::ExemplarError::reason` gives).
pub const EXEMPLAR_SKIP_REASONS: [&str; 6] = [
    "unknown_profile",
    "unknown_class",
    "other_model",
    "malformed",
    "full",
    "over_bytes",
];

/// An exemplar record the bank refused (`reason`: one of [`EXEMPLAR_SKIP_REASONS`]).
pub fn exemplar_skipped(reason: &'static str) {
    counter!("clipqc_exemplars_skipped_total", "reason" => reason).increment(1);
}

/// Why an adapter record is skipped (`clipqc_adapters_skipped_total{reason}`).
pub const ADAPTER_SKIP_REASONS: [&str; 4] = [
    "unknown_profile",
    "other_model",
    "other_classes",
    "malformed",
];

/// An adapter record the bank refused (`reason`: one of [`ADAPTER_SKIP_REASONS`]).
pub fn adapter_skipped(reason: &'static str) {
    counter!("clipqc_adapters_skipped_total", "reason" => reason).increment(1);
}

/// A feedback record handled: `applied` (it became an exemplar), `ignored` (the profile's
/// policy), `refused` (unknown profile or class, no image, fetch or decode failed).
pub fn feedback(result: &'static str) {
    counter!("clipqc_feedback_total", "result" => result).increment(1);
}

/// Exemplars a profile's bank holds of one class.
pub fn exemplars(profile: &str, class: &str, n: usize) {
    gauge!("clipqc_exemplars", "profile" => profile.to_string(), "class" => class.to_string())
        .set(n as f64);
}

/// How long reading the exemplar topic to its end took at start.
pub fn exemplar_catch_up(seconds: f64) {
    gauge!("clipqc_exemplar_catch_up_seconds").set(seconds);
}

/// Why a config change was refused (the `reason` label).
pub const PROFILE_RELOAD_FAILURES: [&str; 4] = ["unreadable", "invalid", "build", "emptied"];

/// A config change applied while running, in `took`.
pub fn profile_reloaded(took: Duration) {
    counter!("clipqc_profile_reloads_total").increment(1);
    gauge!("clipqc_profile_reload_seconds").set(took.as_secs_f64());
}

/// A config change refused (`reason`: one of [`PROFILE_RELOAD_FAILURES`]).
pub fn profile_reload_failed(reason: &'static str) {
    counter!("clipqc_profile_reload_failures_total", "reason" => reason).increment(1);
}

/// A profile's version in service (`true`) or replaced (`false`).
pub fn profile_version(profile: &str, version: &str, in_service: bool) {
    gauge!("clipqc_profile_info", "profile" => profile.to_string(), "version" => version.to_string())
        .set(if in_service { 1.0 } else { 0.0 });
}

/// Whether the config file changed in keys that take a restart.
pub fn config_restart_pending(pending: bool) {
    gauge!("clipqc_config_restart_pending").set(if pending { 1.0 } else { 0.0 });
}

/// One JPEG decoded by the device path (torchvision's operator, on the model's device).
pub fn device_decode(seconds: f64) {
    histogram!("clipqc_device_decode_seconds").record(seconds);
}

/// Why the device preprocessing path sent an image to the CPU path: the `reason` label of
/// `clipqc_device_preprocess_fallbacks_total` (what `preprocess::device::Fallback::as_str`
/// gives).
pub const DEVICE_FALLBACK_REASONS: [&str; 5] =
    ["not_jpeg", "cmyk", "clahe", "over_budget", "decode_error"];

/// One image the device path sent to the CPU path (`reason`: one of
/// [`DEVICE_FALLBACK_REASONS`]).
pub fn device_fallback(reason: &'static str) {
    counter!("clipqc_device_preprocess_fallbacks_total", "reason" => reason).increment(1);
}

/// A record decided on `n` views (its whole frame and its windows).
pub fn views(n: usize) {
    counter!("clipqc_views_total").increment(n as u64);
}

pub fn records_in_flight(n: usize) {
    gauge!("clipqc_records_in_flight").set(n as f64);
}

pub fn records_waiting(n: usize) {
    gauge!("clipqc_records_waiting").set(n as f64);
}

pub fn in_flight_bytes(n: u64) {
    gauge!("clipqc_in_flight_bytes").set(n as f64);
}

pub fn paused() {
    counter!("clipqc_consumer_pauses_total").increment(1);
}

pub fn consumer_lag(topic: &str, partition: i32, lag: i64) {
    gauge!("clipqc_consumer_lag", "topic" => topic.to_string(), "partition" => partition.to_string())
        .set(lag as f64);
}

pub fn model_batch_failed() {
    counter!("clipqc_model_batch_failures_total").increment(1);
}

pub fn model_loaded(load: Duration, warmup: Duration) {
    gauge!("clipqc_model_load_seconds").set(load.as_secs_f64());
    gauge!("clipqc_model_warmup_seconds").set(warmup.as_secs_f64());
}

pub fn webhook(name: &str, result: &'static str) {
    counter!("clipqc_webhook_notifications_total", "webhook" => name.to_string(), "result" => result)
        .increment(1);
}

pub fn gpu_memory(device: u32, used: u64, total: u64) {
    let device = device.to_string();
    gauge!("clipqc_gpu_memory_bytes", "device" => device.clone(), "kind" => "used")
        .set(used as f64);
    gauge!("clipqc_gpu_memory_bytes", "device" => device, "kind" => "total").set(total as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_supplied_label_values_are_bounded() {
        let labels = BoundedLabels::new(3);
        for line in ["l1", "l2", "l3"] {
            assert_eq!(labels.label(line), line);
        }
        // Past the bound: new values are "other", known ones stay themselves.
        assert_eq!(labels.label("l4"), OTHER);
        assert_eq!(labels.label("attacker-0001"), OTHER);
        assert_eq!(labels.label("l2"), "l2");
        assert_eq!(labels.seen.lock().unwrap().len(), 3);
    }

    #[test]
    fn a_new_line_id_in_every_request_does_not_grow_the_verdict_series() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            for i in 0..(MAX_LABEL_VALUES + 500) {
                verdict("pass", "good", "default", &format!("line-{i}"));
            }
        });
        let series = handle
            .render()
            .lines()
            .filter(|l| l.starts_with("clipqc_verdicts_total{"))
            .count();
        // Other tests in this binary may have filled some of the bound first.
        assert!(series <= MAX_LABEL_VALUES + 1, "{series} series");
        assert!(handle.render().contains(r#"line="other""#));
    }
}
