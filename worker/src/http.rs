//! The operations endpoint: `/metrics` (Prometheus text format), `/healthz` (the process
//! answers and its records make progress: 503 when records are in flight and none has
//! finished for `pipeline.stall_timeout_ms`, a model call that never returns, say) and `/readyz` (ready for work: model loaded and warmed up, consumer in its group,
//! not draining). Kubernetes probes and Prometheus scrape these; nothing here touches records.
//! `/debug/pipeline` tells a person where each record in flight is (the pipeline's probe), and
//! a stalled `/healthz` writes the same into the log before the orchestrator restarts the
//! worker, so the stall's place outlives the process.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use schemars::JsonSchema;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// The operations endpoint (`/metrics`, `/healthz`, `/readyz`).
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Address to listen on; port 0 picks a free one (logged).
    #[schemars(with = "String")]
    pub listen: SocketAddr,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: ([0, 0, 0, 0], 9400).into(),
        }
    }
}

/// What `/readyz` reports; set by the parts that know.
#[derive(Debug, Default)]
pub struct Readiness {
    pub model_ready: AtomicBool,
    pub in_group: AtomicBool,
    pub draining: AtomicBool,
    /// Records the broker has refused to take for longer than the sink's stall bound.
    pub publish_stalled: AtomicUsize,
    /// Exactly-once: a commit or an abort of a transaction has timed out and is being
    /// repeated (nothing else may follow it).
    pub transaction_stalled: AtomicBool,
    /// Whether records finish, for `/healthz`.
    pub progress: Progress,
    /// The pipeline's state as text (set by the pipeline when it runs).
    pub state: StateDump,
    /// Parts that can break while the worker runs (the segmentation thread).
    pub checks: Checks,
}

/// Checks of parts that can break while the worker runs: each says why its part is broken at
/// a time, if it is. A broken part fails `/healthz` (the orchestrator restarts the worker)
/// and shows in `/readyz`.
#[derive(Default)]
pub struct Checks(std::sync::Mutex<Vec<Check>>);

type Check = Box<dyn Fn(Instant) -> Option<String> + Send + Sync>;

impl Checks {
    pub fn add(&self, check: impl Fn(Instant) -> Option<String> + Send + Sync + 'static) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(check));
    }

    /// Why parts are broken at `now`.
    pub fn broken(&self, now: Instant) -> Vec<String> {
        let checks = self.0.lock().unwrap_or_else(|e| e.into_inner());
        checks.iter().filter_map(|c| c(now)).collect()
    }
}

impl std::fmt::Debug for Checks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Checks")
    }
}

/// Renders the pipeline's state for `/debug/pipeline` and a stalled `/healthz`.
#[derive(Default)]
pub struct StateDump(std::sync::OnceLock<Box<dyn Fn() -> String + Send + Sync>>);

impl StateDump {
    /// The first pipeline to run on this endpoint wins (one per process).
    pub fn set(&self, dump: impl Fn() -> String + Send + Sync + 'static) {
        let _ = self.0.set(Box::new(dump));
    }

    pub fn render(&self) -> Option<String> {
        self.0.get().map(|dump| dump())
    }
}

impl std::fmt::Debug for StateDump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "StateDump(set)"
        } else {
            "StateDump(unset)"
        })
    }
}

/// Records in flight and when one last finished: a worker whose records stop finishing
/// (a model call that never returns, a stage waiting on something that will not come) is
/// alive but useless, and `/healthz` says so for the orchestrator to restart it.
#[derive(Debug)]
pub struct Progress {
    epoch: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `epoch` of the last finish, or of the start that ended an idle
    /// spell: the clock runs only while there is work.
    last_ms: AtomicU64,
    /// 0: never unhealthy.
    stall_after_ms: AtomicU64,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            stall_after_ms: AtomicU64::new(0),
        }
    }
}

impl Progress {
    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Unhealthy once records have been in flight with none finishing for `bound`.
    pub fn set_stall_after(&self, bound: Duration) {
        self.stall_after_ms
            .store(bound.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn started(&self, at: Instant) {
        if self.in_flight.fetch_add(1, Ordering::Relaxed) == 0 {
            self.last_ms.store(self.ms(at), Ordering::Relaxed);
        }
    }

    pub fn finished(&self, at: Instant) {
        self.last_ms.store(self.ms(at), Ordering::Relaxed);
        let _ = self
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Why the worker is stuck at `now`, if it is.
    pub fn stalled(&self, now: Instant) -> Option<String> {
        let bound = self.stall_after_ms.load(Ordering::Relaxed);
        let n = self.in_flight.load(Ordering::Relaxed);
        let quiet = self
            .ms(now)
            .saturating_sub(self.last_ms.load(Ordering::Relaxed));
        (bound > 0 && n > 0 && quiet > bound).then(|| {
            format!(
                "{n} records in flight and none finished for {} s (pipeline.stall_timeout_ms is {} s)",
                quiet / 1000,
                bound / 1000
            )
        })
    }
}

impl Readiness {
    pub fn set_model_ready(&self) {
        self.model_ready.store(true, Ordering::Relaxed);
    }
    pub fn set_in_group(&self) {
        self.in_group.store(true, Ordering::Relaxed);
    }
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Why the worker is not ready, if it is not.
    pub fn not_ready(&self) -> Vec<&'static str> {
        let mut why = Vec::new();
        if !self.model_ready.load(Ordering::Relaxed) {
            why.push("model not loaded and warmed up");
        }
        if !self.in_group.load(Ordering::Relaxed) {
            why.push("consumer not in its group yet");
        }
        if self.draining.load(Ordering::Relaxed) {
            why.push("draining");
        }
        if self.publish_stalled.load(Ordering::Relaxed) > 0 {
            why.push("publishing stalled: the broker has not acknowledged a record for a while");
        }
        if self.transaction_stalled.load(Ordering::Relaxed) {
            why.push(
                "transaction stalled: the broker has not completed a transaction's commit or abort",
            );
        }
        why
    }
}

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    readiness: Arc<Readiness>,
}

pub fn router(metrics: PrometheusHandle, readiness: Arc<Readiness>) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthy))
        .route("/readyz", get(ready))
        .route("/debug/pipeline", get(pipeline_state))
        .with_state(AppState { metrics, readiness })
}

async fn healthy(State(s): State<AppState>) -> (StatusCode, String) {
    let broken = s.readiness.checks.broken(Instant::now());
    if !broken.is_empty() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("broken: {}\n", broken.join("; ")),
        );
    }
    match s.readiness.progress.stalled(Instant::now()) {
        None => (StatusCode::OK, "ok\n".into()),
        Some(why) => {
            // The orchestrator restarts a worker that stays unhealthy: its log is where the
            // stall's place is kept.
            if let Some(state) = s.readiness.state.render() {
                tracing::warn!(%why, %state, "stalled");
            }
            (StatusCode::SERVICE_UNAVAILABLE, format!("stalled: {why}\n"))
        }
    }
}

async fn pipeline_state(State(s): State<AppState>) -> (StatusCode, String) {
    match s.readiness.state.render() {
        Some(state) => (StatusCode::OK, state + "\n"),
        None => (
            StatusCode::NOT_FOUND,
            "no pipeline runs in this process\n".into(),
        ),
    }
}

async fn render_metrics(State(s): State<AppState>) -> String {
    s.metrics.render()
}

async fn ready(State(s): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let mut why: Vec<String> = s
        .readiness
        .not_ready()
        .into_iter()
        .map(str::to_string)
        .collect();
    why.extend(s.readiness.checks.broken(Instant::now()));
    let status = if why.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({ "ready": why.is_empty(), "not_ready": why })),
    )
}

/// Serve on `listen` until `shutdown`. Returns the bound address (port 0 picks one).
pub async fn serve(
    listen: SocketAddr,
    app: Router,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
        if let Err(e) = server.await {
            tracing::error!(error = %e, "http server");
        }
    });
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_in_flight_with_none_finishing_past_the_bound_are_a_stall() {
        let p = Progress::default();
        let t0 = p.epoch;
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(p.stalled(at(1000)), None, "no bound set: never");
        p.set_stall_after(Duration::from_secs(60));
        assert_eq!(p.stalled(at(1000)), None, "idle is not stuck");
        // Work starts at 1000 s: the clock starts then, not at the last finish long ago.
        p.started(at(1000));
        p.started(at(1001));
        assert_eq!(p.stalled(at(1059)), None);
        // One finishes at 1050: the other may take its time up to 60 s more.
        p.finished(at(1050));
        assert_eq!(p.stalled(at(1100)), None);
        let why = p.stalled(at(1111)).expect("61 s without a finish");
        assert!(
            why.starts_with("1 records in flight and none finished for 61 s"),
            "{why}"
        );
        p.finished(at(1112));
        assert_eq!(p.stalled(at(5000)), None, "nothing in flight");
    }

    #[tokio::test]
    async fn readyz_says_why_until_everything_is_ready() {
        let readiness = Arc::new(Readiness::default());
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle();
        let stop = CancellationToken::new();
        let addr = serve(
            "127.0.0.1:0".parse().unwrap(),
            router(handle, readiness.clone()),
            stop.clone(),
        )
        .await
        .unwrap();
        let get = |path: &'static str| async move {
            let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        };
        assert_eq!(get("/healthz").await.0, 200);
        let (status, body) = get("/readyz").await;
        assert_eq!(status, 503);
        assert!(body.contains("model not loaded"), "{body}");
        readiness.set_model_ready();
        readiness.set_in_group();
        assert_eq!(get("/readyz").await.0, 200);
        readiness.set_draining();
        let (status, body) = get("/readyz").await;
        assert_eq!((status, body.contains("draining")), (503, true), "{body}");
        stop.cancel();
    }

    #[tokio::test]
    async fn debug_pipeline_shows_the_pipelines_state_once_one_runs() {
        let readiness = Arc::new(Readiness::default());
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle();
        let stop = CancellationToken::new();
        let addr = serve(
            "127.0.0.1:0".parse().unwrap(),
            router(handle, readiness.clone()),
            stop.clone(),
        )
        .await
        .unwrap();
        let get = || async move {
            let r = reqwest::get(format!("http://{addr}/debug/pipeline"))
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        };
        let (status, body) = get().await;
        assert_eq!(
            (status, body.as_str()),
            (404, "no pipeline runs in this process\n")
        );
        readiness.state.set(|| "pipeline: 3 records taken".into());
        assert_eq!(get().await, (200, "pipeline: 3 records taken\n".into()));
        stop.cancel();
    }
}
