//! The operations endpoint: `/metrics` (Prometheus text format), `/healthz` (the process
//! answers) and `/readyz` (ready for work: model loaded and warmed up, consumer in its group,
//! not draining). Kubernetes probes and Prometheus scrape these; nothing here touches records.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

/// What `/readyz` reports; set by the parts that know.
#[derive(Debug, Default)]
pub struct Readiness {
    pub model_ready: AtomicBool,
    pub in_group: AtomicBool,
    pub draining: AtomicBool,
    /// Records the broker has refused to take for longer than the sink's stall bound.
    pub publish_stalled: AtomicUsize,
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
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(AppState { metrics, readiness })
}

async fn render_metrics(State(s): State<AppState>) -> String {
    s.metrics.render()
}

async fn ready(State(s): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let why = s.readiness.not_ready();
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
}
