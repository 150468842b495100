//! `clipqc bench`: requests through a broker into verdicts, measured, next to the model-only
//! ceiling on the same model and device.
//!
//! What it measures: the model-only ceiling first (full batches back to back through the
//! model thread, no Kafka, no decoding), then N requests carrying the same image inline,
//! published at `--rate` (or as fast as the producer goes) into a real pipeline (the
//! embedded broker unless `--brokers`), each one's latency from its publish call to its
//! verdict arriving at a consumer. Throughput is the steady state: verdicts between the 10th
//! and the 90th percentile of arrival, over the time between them (start-up and tail
//! excluded). Peak RSS is the process's (VmHWM), model included. CPU cores used is the
//! process's CPU time (user and system, every thread: worker, embedded broker, producer and
//! verdict consumer) over the wall time from the first publish to the last verdict: what a
//! node must give one worker and its GPU, the in-process broker's share included.
//! `--preprocess-device` picks the preprocessing path (`preprocess.device`), so host and
//! device preprocessing are compared on the same model, image and profile.
//!
//! On the embedded broker the publisher spreads requests evenly over the partitions and keeps
//! at most `max_outstanding` of each partition's requests unanswered: librdkafka's mock broker
//! keeps only the newest 5 MiB (or 100,000 records) of each partition and silently drops
//! older records, so a deeper backlog loses requests (measured: 4,000 inline 250×250 JPEGs on
//! 4 partitions gave 1,195 verdicts; with one window over all partitions, 3,419, because the
//! worker drained one partition more slowly than the others).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio_util::sync::CancellationToken;

use super::ConfigArgs;
use crate::http::Readiness;
use crate::metrics;
use crate::model::{DeviceSpec, ImageBatch, ModelHandle};
use crate::pipeline;
use crate::pipeline::build::{deps, load_profiles, warm_up};
use crate::preprocess::device::PreprocessDevice;
use crate::proto::v1::{inspection_request::Image, InspectionRequest, Outcome, Verdict};

mod report;

use report::{Ceiling, Report};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Exported model directory (overrides model.dir).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N (overrides model.device).
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// auto, cpu or cuda (overrides preprocess.device): where JPEGs are decoded and windowed.
    #[arg(long, value_parser = parse_preprocess_device)]
    pub preprocess_device: Option<PreprocessDevice>,
    /// The image every request carries inline.
    #[arg(long)]
    pub image: PathBuf,
    /// Requests to publish.
    #[arg(long, default_value_t = 1000)]
    pub requests: usize,
    /// Requests per second (0: as fast as the producer goes).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Publish for this many seconds at --rate instead of --requests (a sustained run; RSS is
    /// sampled at the first minute and at the end).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Overrides batch.max_size.
    #[arg(long)]
    pub batch_max: Option<usize>,
    /// Full batches for the model-only ceiling.
    #[arg(long, default_value_t = 20)]
    pub ceiling_batches: usize,
    /// A running Kafka cluster: the run creates its own topics there (bench-PID.requests,
    /// .verdicts, .dlq; replication factor 1) and leaves them. Default: the embedded broker.
    #[arg(long)]
    pub brokers: Option<String>,
    /// Partitions of the run's topics (the embedded broker gets more when it would otherwise
    /// hold fewer than four full batches of the image).
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// One JSON object on stdout (the table still goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// The profile the requests name: a tiled one makes several views (windows) per
    /// request, and the report gives windows/s next to images/s.
    #[arg(long, default_value = crate::config::DEFAULT_PROFILE)]
    pub profile: String,
}

pub fn run(args: BenchArgs) -> anyhow::Result<bool> {
    let (mut settings, artifact) = super::settings_and_artifact(&args.config, args.model.clone())?;
    if let Some(b) = args.batch_max {
        settings.batch.max_size = b;
    }
    if let Some(d) = args.preprocess_device {
        settings.preprocess.device = d;
    }
    let image = std::fs::read(&args.image)
        .with_context(|| format!("read --image {}", args.image.display()))?;
    let metrics_handle = metrics::install();
    let (owner, model) = super::spawn_model(&settings, &artifact, args.device)?;
    let profiles = load_profiles(&settings, &artifact, &model)?;
    warm_up(&model, &profiles, settings.batch.max_size)?;
    let profile = profiles
        .get(&args.profile)
        .with_context(|| format!("--profile {:?}: no such profile", args.profile))?;
    // The ceiling's batches hold the bench image's own pixels (its whole-frame view).
    let views = profile
        .preprocessor
        .views(&args.image.display().to_string(), &image, None)
        .with_context(|| format!("preprocess --image {}", args.image.display()))?;
    let views_per_image = views.tensors.len();
    let preprocess = match &profile.preprocessor.device {
        Some(d) => format!("device ({:?})", d.device()),
        None => "host".to_string(),
    };
    let ceiling = Ceiling {
        views_per_image,
        ..ceiling(
            &model,
            &views.tensors[0],
            profile.preprocessor.size(),
            settings.batch.max_size,
            args.ceiling_batches,
        )?
    };
    eprintln!(
        "model-only ceiling: {:.1} views/s (batches of {}); {views_per_image} views per request",
        ceiling.images_per_s, ceiling.batch
    );

    let n = match args.duration {
        Some(d) if args.rate > 0.0 => (d * args.rate).round() as usize,
        Some(_) => anyhow::bail!("--duration needs --rate"),
        None => args.requests,
    };
    let run_id = format!("bench-{}", std::process::id());
    settings.kafka.input_topics = vec![format!("{run_id}.requests")];
    settings.kafka.verdict_topic = format!("{run_id}.verdicts");
    settings.kafka.dlq_topic = format!("{run_id}.dlq");
    settings.kafka.group_id = run_id.clone();
    let topics = [
        settings.kafka.input_topics[0].clone(),
        settings.kafka.verdict_topic.clone(),
        settings.kafka.dlq_topic.clone(),
    ];
    // The embedded broker's window, and enough partitions that it holds four full batches.
    let max_outstanding = match args.brokers {
        Some(_) => None,
        None => Some(embedded_window(image.len() + 64)),
    };
    let mut partitions = args.partitions.max(1) as usize;
    if let Some(w) = max_outstanding {
        if w == 0 {
            anyhow::bail!(
                "--image {} is {} bytes: the embedded broker keeps only {} MiB per partition; \
                 use a smaller image or --brokers",
                args.image.display(),
                image.len(),
                MOCK_PARTITION_BYTES / 1048576
            );
        }
        partitions = partitions.max((4 * settings.batch.max_size).div_ceil(w));
        eprintln!(
            "embedded broker: {partitions} partitions, at most {w} requests unanswered on each \
             (it keeps {} MiB per partition)",
            MOCK_PARTITION_BYTES / 1048576
        );
    }
    let mut embedded = None;
    let brokers = match &args.brokers {
        Some(b) => {
            create_topics(b, &topics, partitions as i32)?;
            b.clone()
        }
        None => {
            let mock =
                crate::pipeline::build::Embedded::start(&mut settings.kafka, partitions as i32)?;
            let servers = mock.brokers.clone();
            embedded = Some(mock);
            servers
        }
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let measured = runtime.block_on(async {
        let readiness = Arc::new(Readiness::default());
        readiness.set_model_ready();
        let deps = deps(
            &settings,
            &brokers,
            &artifact,
            &model,
            profiles,
            readiness.clone(),
        )?;
        let shutdown = CancellationToken::new();
        let worker = tokio::spawn(pipeline::run(deps, shutdown.clone()));
        let verdicts = verdict_consumer(&brokers, &settings.kafka.verdict_topic, &run_id)?;
        // Publishing before the worker is in its group would count the join as latency.
        let joining = Instant::now();
        while !readiness.not_ready().is_empty() {
            if worker.is_finished() {
                worker.await.context("worker task")??;
                anyhow::bail!("the worker stopped before joining its consumer group");
            }
            if joining.elapsed() > Duration::from_secs(120) {
                anyhow::bail!(
                    "the worker is not ready after 120 s: {}",
                    readiness.not_ready().join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let cpu_at_start = process_cpu_seconds();
        let sent = Arc::new(Mutex::new(vec![None; n]));
        let answered: Answered = Arc::new((0..partitions).map(|_| AtomicUsize::new(0)).collect());
        let producer = tokio::spawn(publish(
            brokers.clone(),
            settings.kafka.input_topics[0].clone(),
            args.profile.clone(),
            image,
            n,
            Pace {
                rate: args.rate,
                max_outstanding,
                answered: answered.clone(),
            },
            sent.clone(),
        ));
        let rss = tokio::spawn(sample_rss());
        let arrivals = receive(&verdicts, n, &sent, &answered).await;
        if arrivals.len() < n && !producer.is_finished() {
            // The receiver gave up; a publisher waiting for answers would wait forever.
            producer.abort();
        } else {
            producer.await.context("producer task")??;
        }
        rss.abort();
        let cpu_seconds = process_cpu_seconds() - cpu_at_start;
        shutdown.cancel();
        let stats = worker.await.context("worker task")??;
        anyhow::Ok((arrivals, stats, cpu_seconds))
    })?;
    let (arrivals, _stats, cpu_seconds) = measured;
    let described = model.describe().to_string();
    drop(model);
    owner.join();
    drop(embedded);

    let mut report = Report::new(
        &args,
        described,
        n,
        max_outstanding,
        arrivals,
        ceiling,
        &metrics_handle.render(),
    );
    report.preprocess = preprocess;
    report.cpu_cores_used = cpu_seconds / report.seconds;
    eprintln!("{}", report.table());
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(report.errors == 0 && report.received == n)
}

fn parse_preprocess_device(s: &str) -> Result<PreprocessDevice, NotADevice> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| NotADevice(s.to_string()))
}

/// `--preprocess-device` names no `preprocess.device` (clap prints it).
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("{0:?}: expected auto, cpu or cuda")]
struct NotADevice(String);

/// CPU time (user and system, all threads) this process has used so far, in seconds.
fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return f64::NAN;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// The run's topics on a real cluster, through the admin API.
fn create_topics(brokers: &str, topics: &[String], partitions: i32) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .with_context(|| format!("admin client for {brokers}"))?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    // Called before the bench's runtime exists: a small one of its own for this call.
    let results = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(admin.create_topics(&new, &options))
        .with_context(|| format!("create topics on {brokers}"))?;
    for r in results {
        if let Err((topic, e)) = r {
            anyhow::bail!("create topic {topic} on {brokers}: {e}");
        }
    }
    Ok(())
}

/// Full batches back to back through the model thread: what the model alone can do.
fn ceiling(
    model: &ModelHandle,
    pixels: &[f32],
    size: usize,
    batch: usize,
    batches: usize,
) -> anyhow::Result<Ceiling> {
    let make = || ImageBatch::repeated(size, pixels, batch.max(1));
    let started = Instant::now();
    // Two in the model thread's queue at a time, as the pipeline keeps it.
    let mut pending = std::collections::VecDeque::new();
    for _ in 0..batches.max(1) {
        pending.push_back(model.submit_images(make())?);
        if pending.len() >= 2 {
            pending.pop_front().unwrap().blocking_recv()??;
        }
    }
    for rx in pending {
        rx.blocking_recv()??;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Ceiling {
        batch: batch.max(1),
        images_per_s: (batches.max(1) * batch.max(1)) as f64 / seconds,
        views_per_image: 1,
    })
}

/// Reads the verdicts by assignment, not in a group: a group join would take seconds and
/// every verdict published meanwhile would count that wait as latency.
fn verdict_consumer(brokers: &str, topic: &str, run_id: &str) -> anyhow::Result<StreamConsumer> {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{run_id}-reader"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()?;
    let metadata = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("metadata of {topic}"))?;
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().len())
        .filter(|&n| n > 0)
        .with_context(|| format!("topic {topic} has no partitions"))?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    Ok(c)
}

type Sent = Arc<Mutex<Vec<Option<Instant>>>>;

/// How fast the publisher goes.
struct Pace {
    /// Requests per second (0: as fast as the producer goes).
    rate: f64,
    /// With a limit (the embedded broker's), request `i` goes to partition `i % partitions`
    /// and waits until fewer than this many of that partition's requests are unanswered.
    max_outstanding: Option<usize>,
    /// Distinct requests answered so far per partition, counted by the receiver.
    answered: Answered,
}

/// Requests answered, per partition of the requests topic (request `i` on `i % len`).
type Answered = Arc<Vec<AtomicUsize>>;

/// Requests of `record_bytes` one partition of the embedded broker holds without dropping
/// any: 4 of the mock's 5 MiB (headroom for record overhead), and fewer than its 100,000
/// records.
fn embedded_window(record_bytes: usize) -> usize {
    (MOCK_PARTITION_BYTES * 4 / 5 / record_bytes.max(1)).min(MOCK_PARTITION_RECORDS * 9 / 10)
}

/// What the mock broker keeps of each partition (librdkafka's `rdkafka_mock.c`): bytes and
/// records.
const MOCK_PARTITION_BYTES: usize = 5 * 1048576;
const MOCK_PARTITION_RECORDS: usize = 100_000;

/// Publish `n` requests at the pace given, noting when each was handed over.
async fn publish(
    brokers: String,
    topic: String,
    profile: String,
    image: Vec<u8>,
    n: usize,
    pace: Pace,
    sent: Sent,
) -> anyhow::Result<()> {
    let rate = pace.rate;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "1")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let started = tokio::time::Instant::now();
    let mut deliveries = Vec::with_capacity(n);
    for i in 0..n {
        if rate > 0.0 {
            tokio::time::sleep_until(started + Duration::from_secs_f64(i as f64 / rate)).await;
        }
        // With a window: round robin over the partitions; `i / partitions` of this request's
        // partition were published before it.
        let partitions = pace.answered.len();
        let partition = pace.max_outstanding.map(|window| (i % partitions, window));
        if let Some((p, window)) = partition {
            while i / partitions >= pace.answered[p].load(Ordering::Relaxed) + window {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let request = InspectionRequest {
            request_id: i.to_string(),
            camera_id: "bench".into(),
            line_id: "bench".into(),
            profile: profile.clone(),
            image: Some(Image::InlineData(image.clone())),
            ..Default::default()
        };
        let payload = request.encode_to_vec();
        let key = i.to_string();
        sent.lock().unwrap()[i] = Some(Instant::now());
        let mut record = FutureRecord::to(&topic).key(&key).payload(&payload);
        if let Some((p, _)) = partition {
            record = record.partition(p as i32);
        }
        match producer.send_result(record) {
            Ok(delivery) => deliveries.push(delivery),
            Err((e, _)) => anyhow::bail!("publish request {i}: {e}"),
        }
    }
    for (i, d) in deliveries.into_iter().enumerate() {
        match d.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => anyhow::bail!("request {i} not delivered: {e}"),
            Err(_) => anyhow::bail!("request {i}: delivery cancelled"),
        }
    }
    producer.flush(Duration::from_secs(10))?;
    Ok(())
}

/// One verdict's arrival.
struct Arrival {
    pub at: Instant,
    pub latency: Duration,
    pub error: bool,
}

/// Verdicts until `n` distinct requests are answered, or 60 s pass without one.
async fn receive(
    verdicts: &StreamConsumer,
    n: usize,
    sent: &Sent,
    answered: &[AtomicUsize],
) -> Vec<Arrival> {
    let bar = indicatif::ProgressBar::new(n as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} verdicts {per_sec} eta {eta}",
        )
        .expect("a valid template. This is a bug."),
    );
    let mut seen = vec![false; n];
    let mut arrivals = Vec::with_capacity(n);
    while arrivals.len() < n {
        let Ok(msg) =
            tokio::time::timeout(Duration::from_secs(60), crate::source::recv(verdicts)).await
        else {
            bar.abandon_with_message("no verdict for 60 s");
            break;
        };
        let Ok(msg) = msg else { continue };
        let at = Instant::now();
        let Ok(v) = Verdict::decode(msg.payload().unwrap_or_default()) else {
            continue;
        };
        let Some(i) = v.request_id.parse::<usize>().ok().filter(|&i| i < n) else {
            continue;
        };
        if std::mem::replace(&mut seen[i], true) {
            continue; // a duplicate after a retry: counted once
        }
        let published = sent.lock().unwrap()[i].unwrap_or(at);
        arrivals.push(Arrival {
            at,
            latency: at.saturating_duration_since(published),
            error: v.outcome() == Outcome::Error,
        });
        answered[i % answered.len()].fetch_add(1, Ordering::Relaxed);
        bar.inc(1);
    }
    bar.finish_and_clear();
    arrivals
}

/// RSS samples (seconds since start, bytes), for the memory-flatness figure.
static RSS: Mutex<Vec<(f64, u64)>> = Mutex::new(Vec::new());

async fn sample_rss() {
    let started = Instant::now();
    loop {
        if let Some(rss) = report::proc_status_bytes("VmRSS:") {
            RSS.lock()
                .unwrap()
                .push((started.elapsed().as_secs_f64(), rss));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_window_fits_the_mock_brokers_partitions() {
        // A 250×250 JPEG request: 214 per partition, about 4.0 of the mock's 5 MiB.
        let w = embedded_window(19_531);
        assert_eq!(w, 214);
        assert!(w * 19_531 < MOCK_PARTITION_BYTES);
        // Small records: the mock's 100,000-record limit binds instead.
        assert_eq!(embedded_window(10), 90_000);
        // A 1080p JPEG: 10 per partition (`clipqc bench` then raises the partitions).
        assert_eq!(embedded_window(409_324), 10);
        // Larger than the share kept: none fits (`clipqc bench` refuses the image).
        assert_eq!(embedded_window(8_702_833), 0);
    }

    #[test]
    fn preprocess_devices_are_the_settings_names() {
        assert_eq!(parse_preprocess_device("cuda"), Ok(PreprocessDevice::Cuda));
        let err = parse_preprocess_device("gpu").unwrap_err();
        assert_eq!(err, NotADevice("gpu".into()));
        assert_eq!(err.to_string(), "\"gpu\": expected auto, cpu or cuda");
    }
}
