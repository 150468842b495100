//! Assembly: `Settings` and a loaded model turned into the pipeline's dependencies, in one
//! place for `clipqc run`, `clipqc bench` and the tests (the CLI only parses and calls it).
//!
//! Order matters and is kept here: profiles are embedded with the model before anything
//! consumes; the exemplar bank is read to the end of its topic before the consumer joins its
//! group (the first verdict already sees every exemplar published before the start); the
//! exactly-once producer is initialised (fencing its predecessor) before the first record.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::mocking::MockCluster;

use super::{Deps, Profile};
use crate::config::{Delivery, KafkaSettings, Settings};
use crate::fetch::Fetcher;
use crate::http::Readiness;
use crate::model::artifact::TOKENIZER;
use crate::model::{Artifact, ImageBatch, ModelHandle, PromptTokenizer};
use crate::notify::Notifier;
use crate::profiles;
use crate::proto::v1::ModelInfo;
use crate::segment::{SamArtifact, SamBackend, SamPreprocessor, SegmentOwner};
use crate::sink::transaction::Transactions;
use crate::sink::Sink;
use crate::source;

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
            readiness.clone(),
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
            &super::worker_id(&settings.kafka),
        )?,
        segmenting: segmenting(settings)?.inspect(|s| {
            // A SAM call running twice as long as a verdict waits for it hangs.
            let (health, limit) = (s.handle.health(), 2 * s.call_timeout);
            readiness.checks.add(move |now| health.problem(now, limit));
        }),
        probe: Default::default(),
        transactions: match settings.kafka.delivery {
            Delivery::AtLeastOnce => None,
            Delivery::ExactlyOnce => Some(Arc::new(Transactions::start(
                &settings.kafka,
                brokers,
                &transactional_id(&settings.kafka),
                readiness.clone(),
            )?)),
        },
    })
}

/// The SAM thread, when `model.sam_dir` is set and a profile segments: its artifact checked
/// and loaded on `model.device` (the encoder in half precision on CUDA), its queue
/// `model.sam_queue` frames long. The thread ends with the last handle.
pub fn segmenting(settings: &Settings) -> anyhow::Result<Option<super::Segmenting>> {
    let Some(dir) = &settings.model.sam_dir else {
        return Ok(None);
    };
    if !settings.profiles().values().any(|p| p.segment) {
        tracing::info!(sam_dir = %dir.display(), "no profile has segment = true: SAM is not loaded");
        return Ok(None);
    }
    let artifact = SamArtifact::open(dir)?;
    let preprocessor = SamPreprocessor::new(&artifact.manifest.image);
    let device = settings.model.device;
    let (_owner, handle) = SegmentOwner::spawn(
        move || SamBackend::load(&artifact, device),
        settings.model.sam_queue,
    )?;
    tracing::info!(
        sam = handle.describe(),
        queue = handle.capacity(),
        "segmentation ready"
    );
    Ok(Some(super::Segmenting {
        handle,
        preprocessor,
        call_timeout: Duration::from_millis(settings.model.sam_timeout_ms.max(1)),
        budget: Arc::new(super::budget::ByteBudget::new(
            settings.model.sam_max_in_flight_bytes,
        )),
    }))
}

/// The transactional id of this worker: fixed per instance, so a restarted worker fences its
/// predecessor and aborts what it left open. Without `kafka.instance_id` it changes with each
/// process (host name and pid), and a killed worker's open transaction holds back
/// read_committed readers until the broker times it out (`transaction.timeout.ms`).
pub fn transactional_id(kafka: &crate::config::KafkaSettings) -> String {
    if kafka.instance_id.is_none() {
        tracing::warn!("exactly-once delivery without kafka.instance_id: a killed worker's open transaction blocks readers until the broker times it out; set it (the pod name on Kubernetes)");
    }
    format!("clipqc-{}-{}", kafka.group_id, super::worker_id(kafka))
}

/// Full batches through the model before the worker reports ready: the first passes
/// allocate and (on CUDA) pick kernels, which must not land on the first parts' latency.
pub fn warm_up(
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

/// The embedded broker (librdkafka's mock cluster on 127.0.0.1) with the worker's topics, for
/// trying things out without Kafka: any client can connect to [`Embedded::brokers`]. Not for
/// production: it keeps only the newest 5 MiB of each partition. Lives as long as the value.
pub struct Embedded {
    _mock: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    pub brokers: String,
    pub topics: Vec<String>,
}

/// The consumers' `fetch.wait.max.ms` on the embedded broker unless `kafka.properties` sets
/// it. librdkafka's mock broker answers a fetch with no data only when this wait is up (a
/// real broker answers as soon as data arrives: there the default 500 ms costs no latency),
/// so at librdkafka's default every verdict waited up to 500 ms for its request to be
/// fetched: measured at 100 requests/s (tiny model), p50 314 ms, p99 555 ms; at 10 ms, p50
/// 22 ms, p99 40 ms. The price is an idle consumer polling the in-process broker 100 times a
/// second (docs/benchmarks.md).
pub const EMBEDDED_FETCH_WAIT_MS: &str = "10";

impl Embedded {
    /// Start it with `partitions` partitions for each of the worker's topics; `kafka` gets
    /// the embedded broker's consumer settings ([`EMBEDDED_FETCH_WAIT_MS`]).
    pub fn start(kafka: &mut KafkaSettings, partitions: i32) -> anyhow::Result<Self> {
        kafka
            .properties
            .entry("fetch.wait.max.ms".into())
            .or_insert_with(|| EMBEDDED_FETCH_WAIT_MS.into());
        let mock = MockCluster::new(1).context("start the embedded broker")?;
        let mut topics = kafka.input_topics.clone();
        topics.push(kafka.verdict_topic.clone());
        topics.push(kafka.dlq_topic.clone());
        topics.push(kafka.exemplar_topic.clone());
        topics.push(kafka.adapter_topic.clone());
        if !kafka.feedback_topic.is_empty() {
            topics.push(kafka.feedback_topic.clone());
        }
        for t in &topics {
            mock.create_topic(t, partitions, 1)
                .with_context(|| format!("create topic {t}"))?;
        }
        Ok(Self {
            brokers: mock.bootstrap_servers(),
            _mock: mock,
            topics,
        })
    }
}
