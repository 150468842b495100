//! `clipqc run`: the streaming worker.
//!
//! Loads the model and every profile's prompt embeddings, then runs the pipeline until
//! SIGTERM or Ctrl-C, and drains. With no `kafka.brokers` configured it starts an embedded,
//! in-process broker (librdkafka's mock cluster) on 127.0.0.1 for trying things out: any
//! Kafka client (kcat, confluent-kafka) can publish requests to the address it prints.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::mocking::MockCluster;
use tokio_util::sync::CancellationToken;

use crate::config::{Delivery, Settings};
use crate::exemplars::feedback::{self, FeedbackDeps};
use crate::fetch::Fetcher;
use crate::http::{self, Readiness};
use crate::metrics;
use crate::model::artifact::TOKENIZER;
use crate::model::{Artifact, DeviceSpec, ImageBatch, ModelHandle, PromptTokenizer};
use crate::notify::Notifier;
use crate::pipeline::{self, Deps, Profile};
use crate::profiles;
use crate::proto::v1::ModelInfo;
use crate::sink::transaction::Transactions;
use crate::sink::Sink;
use crate::source;

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

/// Build every profile's scorer (text embeddings computed once, here) and preprocessor.
pub fn load_profiles(
    settings: &Settings,
    artifact: &Artifact,
    model: &ModelHandle,
) -> anyhow::Result<HashMap<String, Profile>> {
    let tokenizer = PromptTokenizer::load(&artifact.path(TOKENIZER), &artifact.manifest.text)?;
    let builder = profiles::Builder {
        manifest: &artifact.manifest,
        tokenizer: &tokenizer,
        model,
        preprocess: &settings.preprocess,
    };
    settings
        .profiles()
        .into_iter()
        .map(|(name, p)| Ok((name.clone(), builder.build(&name, &p)?)))
        .collect()
}

/// The pipeline's dependencies for `settings`, with the profiles already loaded.
pub fn deps(
    settings: &Settings,
    brokers: &str,
    artifact: &Artifact,
    model: &ModelHandle,
    profiles: HashMap<String, Profile>,
    readiness: Arc<Readiness>,
) -> anyhow::Result<Deps> {
    Ok(Deps {
        sink: Sink::new(&settings.kafka, brokers)?
            .reporting_to(readiness.clone(), Sink::STALL_AFTER),
        consumer: source::consumer(
            &settings.kafka,
            brokers,
            Duration::from_millis(settings.pipeline.drain_timeout_ms),
            readiness,
        )?,
        kafka: settings.kafka.clone(),
        batch: settings.batch,
        pipeline: settings.pipeline,
        profiles: profiles::Catalog::new(profiles, settings.router().map_err(anyhow::Error::msg)?)
            .live(),
        model_info: ModelInfo {
            name: artifact.manifest.name.clone(),
            hash: artifact.model_hash(),
        },
        model: model.clone(),
        fetcher: Fetcher::new(settings.fetch.clone())?,
        // Read to the end before the consumer joins its group: the first verdict already
        // sees every exemplar published before the worker started.
        exemplars: crate::exemplars::follow::Exemplars::start(
            &settings.kafka,
            brokers,
            crate::exemplars::follow::BankContext {
                profiles: settings.profiles().into_iter().collect(),
                model_hash: artifact.model_hash(),
                dim: artifact.manifest.embedding_dim,
                settings: settings.exemplars,
            },
            Duration::from_secs(120),
        )?,
        notifier: Notifier::start(
            &settings.notify.webhooks,
            &pipeline::worker_id(&settings.kafka),
        )?,
        transactions: match settings.kafka.delivery {
            Delivery::AtLeastOnce => None,
            Delivery::ExactlyOnce => Some(Arc::new(Transactions::start(
                &settings.kafka,
                brokers,
                &transactional_id(&settings.kafka),
            )?)),
        },
    })
}

/// The transactional id of this worker: fixed per instance, so a restarted worker fences its
/// predecessor and aborts what it left open. Without `kafka.instance_id` it changes with each
/// process (host name and pid), and a killed worker's open transaction holds back
/// read_committed readers until the broker times it out (`transaction.timeout.ms`).
pub fn transactional_id(kafka: &crate::config::KafkaSettings) -> String {
    if kafka.instance_id.is_none() {
        tracing::warn!("exactly-once delivery without kafka.instance_id: a killed worker's open transaction blocks readers until the broker times it out; set it (the pod name on Kubernetes)");
    }
    format!("clipqc-{}-{}", kafka.group_id, pipeline::worker_id(kafka))
}

pub fn run(args: RunArgs) -> anyhow::Result<bool> {
    let (settings, artifact) = super::settings_and_artifact(&args.config, args.model.clone())?;
    let metrics_handle = metrics::install();
    let readiness = Arc::new(Readiness::default());
    let loading = Instant::now();
    let (owner, model) = super::spawn_model(&settings, &artifact, args.device)?;
    let load = loading.elapsed();
    let profiles = load_profiles(&settings, &artifact, &model)?;
    let warmup = warm_up(&model, &profiles, settings.batch.max_size)?;
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
            let mock = MockCluster::new(1).context("start the embedded broker")?;
            let mut topics = settings.kafka.input_topics.clone();
            topics.push(settings.kafka.verdict_topic.clone());
            topics.push(settings.kafka.dlq_topic.clone());
            topics.push(settings.kafka.exemplar_topic.clone());
            if !settings.kafka.feedback_topic.is_empty() {
                topics.push(settings.kafka.feedback_topic.clone());
            }
            for t in &topics {
                mock.create_topic(t, args.embedded_partitions, 1)
                    .with_context(|| format!("create topic {t}"))?;
            }
            let servers = mock.bootstrap_servers();
            eprintln!(
                "clipqc: no kafka.brokers configured: embedded broker for trying out at {servers} \
                 (topics: {}); not for production: it keeps only the newest 5 MiB of each \
                 partition and drops older records, read or not",
                topics.join(", ")
            );
            embedded = Some(mock);
            servers
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
        let deps = deps(&settings, &brokers, &artifact, &model, profiles, readiness)?;
        // Stopped (dropped) before the model thread is joined: it embeds prompts with it.
        let _watcher = watch_config(&args, &settings, &artifact, &model, &deps)?;
        tracing::info!(brokers = %brokers, topics = ?settings.kafka.input_topics, "consuming");
        // Operator feedback into exemplars, beside the intake loop; its failure stops the
        // worker too (a worker that silently stopped learning would look healthy).
        let feedback = FeedbackDeps::new(
            &settings,
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
    let mut reloader = profiles::reload::Reloader::new(
        path,
        settings,
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
pub async fn essential<T>(
    what: &str,
    task: tokio::task::JoinHandle<anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match task.await {
        Ok(result) => result,
        Err(e) if e.is_panic() => {
            let message = pipeline::panic_message(e.into_panic().as_ref());
            tracing::error!(what, panic = %message, "an essential task panicked: stopping");
            anyhow::bail!("{what} panicked: {message}")
        }
        Err(e) => anyhow::bail!("{what} ended: {e}"),
    }
}

/// Full batches through the model before the worker reports ready: the first passes
/// allocate and (on CUDA) pick kernels, which must not land on the first parts' latency.
pub(crate) fn warm_up(
    model: &ModelHandle,
    profiles: &HashMap<String, Profile>,
    max_size: usize,
) -> anyhow::Result<Duration> {
    let size = profiles
        .values()
        .next()
        .map_or(224, |p| p.preprocessor.size());
    let zeros = vec![0.0f32; 3 * size * size];
    let started = Instant::now();
    for _ in 0..2 {
        let batch = ImageBatch::repeated(size, &zeros, max_size.max(1));
        model.embed_images_blocking(batch).context("warm-up pass")?;
    }
    let took = started.elapsed();
    tracing::info!(?took, batch = max_size, "model warmed up");
    Ok(took)
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
            Ok(())
        });
        let err = essential("the intake loop", task).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "the intake loop panicked: offsets of a partition arrive in order"
        );
        let fine = essential("x", tokio::spawn(async { Ok(7) })).await.unwrap();
        assert_eq!(fine, 7);
    }
}
