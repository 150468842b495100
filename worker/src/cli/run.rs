//! `clipqc run`: the streaming worker.
//!
//! Loads the model and every profile's prompt embeddings, then runs the pipeline until
//! SIGTERM or Ctrl-C, and drains. With no `kafka.brokers` configured it starts an embedded,
//! in-process broker (librdkafka's mock cluster) on 127.0.0.1 for trying things out: any
//! Kafka client (kcat, confluent-kafka) can publish requests to the address it prints.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::exemplars::feedback::{self, FeedbackDeps};
use crate::http::{self, Readiness};
use crate::metrics;
use crate::model::artifact::TOKENIZER;
use crate::model::{Artifact, DeviceSpec, ModelHandle, PromptTokenizer};
use crate::pipeline::{self, build, Deps};
use crate::profiles;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: super::ConfigArgs,
    /// Exported model directory (overrides model.dir).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N (overrides model.device).
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Partitions of each topic the embedded broker creates.
    #[arg(long, default_value_t = 4)]
    pub embedded_partitions: i32,
}

pub fn run(args: RunArgs) -> anyhow::Result<bool> {
    let (mut settings, artifact) = super::settings_and_artifact(&args.config, args.model.clone())?;
    let metrics_handle = metrics::install();
    let readiness = Arc::new(Readiness::default());
    let loading = Instant::now();
    let (owner, model) = super::spawn_model(&settings, &artifact, args.device)?;
    let load = loading.elapsed();
    let profiles = build::load_profiles(&settings, &artifact, &model)?;
    let warmup = build::warm_up(&model, &profiles, settings.batch.max_size)?;
    metrics::model_loaded(load, warmup);
    let device = args.device.unwrap_or(settings.model.device);
    if let Ok(tch::Device::Cuda(i)) = crate::model::tch_backend::resolve_device(device) {
        crate::gpu::spawn_monitor(i, Duration::from_secs(5));
    }
    readiness.set_model_ready();
    tracing::info!(profiles = ?profiles.keys().collect::<Vec<_>>(), "profiles ready");

    // The embedded broker lives as long as this function.
    let mut embedded = None;
    let brokers = match &settings.kafka.brokers {
        Some(b) => b.clone(),
        None => {
            let mock = build::Embedded::start(&mut settings.kafka, args.embedded_partitions)?;
            eprintln!(
                "clipqc: no kafka.brokers configured: embedded broker for trying out at {} \
                 (topics: {}); not for production: it keeps only the newest 5 MiB of each \
                 partition and drops older records, read or not",
                mock.brokers,
                mock.topics.join(", ")
            );
            let brokers = mock.brokers.clone();
            embedded = Some(mock);
            brokers
        }
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let app = http::router(metrics_handle, readiness.clone());
        let http_stop = CancellationToken::new();
        let addr = http::serve(settings.http.listen, app, http_stop.clone())
            .await
            .with_context(|| format!("listen on {} (http.listen)", settings.http.listen))?;
        tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
        // The endpoint outlives the drain: probes and the last scrape still get answers.
        let _http = http_stop.drop_guard();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested");
            signal.cancel();
        });
        if settings.kafka.brokers.is_some() {
            // A refused login or TLS handshake is named here, at once, rather than surfacing
            // later as a generic transport failure (or never, in the group consumer).
            crate::brokers::check(&settings.kafka, &brokers, Duration::from_secs(60))?;
        }
        let deps = build::deps(&settings, &brokers, &artifact, &model, profiles, readiness)?;
        // Stopped (dropped) before the model thread is joined: it embeds prompts with it.
        let _watcher = watch_config(&args, &settings, &artifact, &model, &deps)?;
        tracing::info!(brokers = %brokers, topics = ?settings.kafka.input_topics, "consuming");
        // Operator feedback into exemplars, beside the intake loop; its failure stops the
        // worker too (a worker that silently stopped learning would look healthy).
        let feedback_settings = feedback::FeedbackSettings {
            kafka: &settings.kafka,
            fetch: &settings.fetch,
            preprocess: &settings.preprocess,
            profiles: settings.profiles(),
            per_operator_hour: settings.exemplars.feedback_per_operator_hour,
        };
        let feedback = FeedbackDeps::new(
            feedback_settings,
            &brokers,
            &artifact,
            &model,
            deps.exemplars.bank.clone(),
        )?
        .map(|f| {
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let done = feedback::run(f, stop.clone()).await;
                if done.is_err() {
                    stop.cancel();
                }
                done
            })
        });
        let intake = essential(
            "the intake loop",
            tokio::spawn(pipeline::run(deps, shutdown.clone())),
        )
        .await;
        shutdown.cancel();
        let learned = match feedback {
            Some(f) => essential("the feedback loop", f).await,
            None => Ok(()),
        };
        let stats = intake?;
        learned?;
        anyhow::Ok(stats)
    });
    // Tasks still running after a failure (a webhook delivery, a fetch) must not keep a
    // worker that has stopped working alive: give them a moment, then exit regardless.
    runtime.shutdown_timeout(Duration::from_secs(5));
    result?;
    drop(model);
    owner.join();
    drop(embedded);
    Ok(true)
}

/// `clipqc run --config FILE` with `pipeline.config_reload_ms` > 0: the file is polled for
/// profile and route changes, applied to the pipeline's catalog (see [`profiles::reload`]).
fn watch_config(
    args: &RunArgs,
    settings: &Settings,
    artifact: &Artifact,
    model: &ModelHandle,
    deps: &Deps,
) -> anyhow::Result<Option<profiles::reload::Watcher>> {
    let every = settings.pipeline.config_reload_ms;
    let Some(path) = args.config.config.clone().filter(|_| every > 0) else {
        return Ok(None);
    };
    let tokenizer = PromptTokenizer::load(&artifact.path(TOKENIZER), &artifact.manifest.text)?;
    let source = profiles::reload::Source {
        load: Box::new(|path, text| Ok(Settings::reloadable(path, text)?)),
        preprocess: settings.preprocess.clone(),
        routes: settings.routes.clone(),
    };
    let mut reloader = profiles::reload::Reloader::new(
        path,
        source,
        artifact.manifest.clone(),
        tokenizer,
        model.clone(),
        deps.profiles.clone(),
    );
    if let Some(updates) = deps.exemplars.updates() {
        reloader = reloader.with_bank(updates);
    }
    let watcher = profiles::reload::Watcher::spawn(reloader, Duration::from_millis(every))
        .context("starting the config watcher thread")?;
    Ok(Some(watcher))
}

/// Await a task the worker cannot live without: its panic becomes an error naming it, so
/// the process exits non-zero (and is restarted) instead of living on without it.
pub async fn essential<T, E: Into<anyhow::Error>>(
    what: &str,
    task: tokio::task::JoinHandle<Result<T, E>>,
) -> anyhow::Result<T> {
    match task.await {
        Ok(result) => result.map_err(Into::into),
        Err(e) if e.is_panic() => {
            let message = pipeline::panic_message(e.into_panic().as_ref());
            tracing::error!(what, panic = %message, "an essential task panicked: stopping");
            anyhow::bail!("{what} panicked: {message}")
        }
        Err(e) => anyhow::bail!("{what} ended: {e}"),
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler cannot fail. This is a bug.");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::essential;

    #[tokio::test]
    async fn an_essential_task_that_panics_is_an_error_naming_it() {
        let task = tokio::spawn(async {
            if std::hint::black_box(true) {
                panic!("offsets of a partition arrive in order");
            }
            anyhow::Ok(())
        });
        let err = essential("the intake loop", task).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "the intake loop panicked: offsets of a partition arrive in order"
        );
        let fine = essential("x", tokio::spawn(async { anyhow::Ok(7) }))
            .await
            .unwrap();
        assert_eq!(fine, 7);
    }
}
