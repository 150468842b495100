//! Operator feedback into exemplars: the workers read `kafka.feedback_topic` as one consumer
//! group (`<group_id>.feedback`), and each record the profile's policy accepts becomes an
//! exemplar of the class the operator named, published to the exemplar topic that every
//! worker follows.
//!
//! Guarantees: a record's offset is stored only after its exemplar (or its dead letter) was
//! acknowledged, records of a partition in order (one at a time: feedback is people's pace),
//! so a crash repeats work and never skips it; a record not done (its exemplar not
//! acknowledged: the exemplar topic refusing for now, a broker away) is tried again, with a
//! growing pause, before any later record is read, since storing a later record's offset
//! would commit past it; a record that panics its handling, or whose exemplar the topic
//! refuses for what it is (its size), is refused like any bad record; the exemplar's key is the profile and a hash of
//! the image, so a record handled twice (a rebalance, two workers, a restart) still makes one
//! exemplar; feedback naming an unknown profile or class, without an image, whose image cannot
//! be fetched or decoded, is refused with a reason (log, `clipqc_feedback_total{result=
//! "refused"}`, and the record on the dead-letter topic with the usual headers) and the loop
//! goes on; a class over the policy's cap loses its oldest feedback exemplars (tombstones).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use std::panic::AssertUnwindSafe;

use anyhow::Context as _;
use futures_util::FutureExt as _;
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use tokio_util::sync::CancellationToken;

use super::follow::{self, SharedBank};
use super::vetting::Vetting;
use super::{id_of, FEEDBACK_SOURCE};
use crate::fetch::{FetchSettings, Fetcher};
use crate::kafka::KafkaSettings;
use crate::metrics;
use crate::model::{ModelError, ModelHandle};
use crate::preprocess::{PreprocessError, PreprocessSettings, Preprocessor};
use crate::proto::v1::{feedback, inspection_request, Exemplar, Feedback, SourceRecord};
use crate::score::{Learn, ProfileConfig};
use crate::sink::{Record, Sink};

/// The settings the feedback loop reads: the worker's, handed over by `clipqc run` (the loop
/// takes its sections, not the whole config, which sits above the stages).
pub struct FeedbackSettings<'a> {
    pub kafka: &'a KafkaSettings,
    pub fetch: &'a FetchSettings,
    pub preprocess: &'a PreprocessSettings,
    /// Every profile, the built-in default included.
    pub profiles: BTreeMap<String, ProfileConfig>,
    /// `exemplars.feedback_per_operator_hour`.
    pub per_operator_hour: usize,
}

/// What the feedback loop needs (built by `clipqc run`).
pub struct FeedbackDeps {
    pub kafka: KafkaSettings,
    pub brokers: String,
    pub profiles: HashMap<String, (ProfileConfig, Preprocessor)>,
    pub fetcher: Fetcher,
    pub model: ModelHandle,
    pub model_hash: String,
    pub dim: usize,
    pub bank: SharedBank,
    /// For the exemplars and the dead letters.
    pub sink: Sink,
    /// Records tried again because they were not done (tests wait on it).
    pub retried: Arc<std::sync::atomic::AtomicU64>,
    /// Who answered how often; records are handled one at a time, so never contended.
    vetting: std::sync::Mutex<Vetting>,
    per_operator_hour: usize,
}

impl FeedbackDeps {
    /// `None` when `kafka.feedback_topic` is empty (feedback off).
    pub fn new(
        settings: FeedbackSettings<'_>,
        brokers: &str,
        artifact: &crate::model::Artifact,
        model: &ModelHandle,
        bank: SharedBank,
    ) -> anyhow::Result<Option<Self>> {
        if settings.kafka.feedback_topic.is_empty() {
            return Ok(None);
        }
        let profiles = settings
            .profiles
            .into_iter()
            .map(|(name, p)| {
                let pre =
                    Preprocessor::for_profile(&artifact.manifest.image, settings.preprocess, &p)
                        .map_err(|e| anyhow::anyhow!("profile {name:?}: {e}"))?;
                Ok((name, (p, pre)))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Some(Self {
            kafka: settings.kafka.clone(),
            brokers: brokers.into(),
            profiles,
            fetcher: Fetcher::new(settings.fetch.clone())?,
            model: model.clone(),
            model_hash: artifact.model_hash(),
            dim: artifact.manifest.embedding_dim,
            bank,
            sink: Sink::new(settings.kafka, brokers)?,
            retried: Arc::default(),
            vetting: Default::default(),
            per_operator_hour: settings.per_operator_hour,
        }))
    }
}

/// Why a feedback record makes no exemplar.
#[derive(Debug)]
enum Outcome {
    Applied(String),
    Ignored(&'static str),
    Refused(String),
}

/// Reads feedback until `shutdown`; errors only when the consumer cannot be made or fails
/// for good.
pub async fn run(deps: FeedbackDeps, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut cfg = ClientConfig::new();
    for (k, v) in &deps.kafka.properties {
        cfg.set(k, v);
    }
    cfg.set("bootstrap.servers", &deps.brokers)
        .set("group.id", format!("{}.feedback", deps.kafka.group_id))
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest");
    let consumer: StreamConsumer = cfg.create()?;
    consumer.subscribe(&[deps.kafka.feedback_topic.as_str()])?;
    let deps = Arc::new(deps);
    loop {
        let msg = tokio::select! {
            // Polled again every second: a missed queue wakeup parks `recv()` for 150 s.
            m = crate::source::recv(&consumer) => m,
            _ = shutdown.cancelled() => break,
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "reading the feedback topic");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let source = format!("{}/{}/{}", msg.topic(), msg.partition(), msg.offset());
        // The same record until it is done: a later record's stored offset would commit past
        // it.
        let mut pause = Duration::from_millis(500);
        let done = loop {
            let outcome = AssertUnwindSafe(handle(&deps, &msg, &shutdown))
                .catch_unwind()
                .await
                .unwrap_or_else(|panic| {
                    let why = crate::panics::panic_message(&*panic);
                    Ok(Outcome::Refused(format!("handling it panicked: {why}")))
                });
            let done = match outcome {
                Ok(Outcome::Applied(key)) => {
                    tracing::info!(
                        feedback = source,
                        exemplar = key,
                        "feedback became an exemplar"
                    );
                    metrics::feedback("applied");
                    true
                }
                Ok(Outcome::Ignored(why)) => {
                    tracing::info!(
                        feedback = source,
                        why,
                        "feedback ignored by the profile's policy"
                    );
                    metrics::feedback("ignored");
                    true
                }
                Ok(Outcome::Refused(reason)) => {
                    tracing::warn!(feedback = source, reason, "feedback refused");
                    metrics::feedback("refused");
                    dead_letter(&deps, &msg, &reason, &shutdown).await
                }
                Err(e) => {
                    tracing::warn!(feedback = source, error = %e, pause = ?pause,
                        "feedback not done: trying the same record again");
                    false
                }
            };
            if done || shutdown.is_cancelled() {
                break done;
            }
            deps.retried
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.cancelled() => break false,
            }
            pause = (pause * 2).min(Duration::from_secs(30));
        };
        if !done {
            // Stopping: the offset stays, the record is read again after the restart.
            break;
        }
        consumer.store_offset_from_message(&msg)?;
    }
    // Commit what was stored before leaving the group.
    let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
    Ok(())
}

async fn handle(
    deps: &FeedbackDeps,
    msg: &BorrowedMessage<'_>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Outcome> {
    let payload = msg.payload().unwrap_or_default();
    let json = content_type(msg).is_some_and(|c| c.contains("json"));
    let fb = match decode_feedback(payload, json) {
        Ok(fb) => fb,
        Err(e) => return Ok(Outcome::Refused(format!("not a clipqc.v1.Feedback: {e}"))),
    };
    let vetted = deps
        .vetting
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .check(
            &fb,
            (msg.partition(), msg.offset()),
            SystemTime::now(),
            deps.per_operator_hour,
        );
    if let Err(why) = vetted {
        return Ok(Outcome::Refused(why));
    }
    let Some((profile, pre)) = deps.profiles.get(&fb.profile) else {
        return Ok(Outcome::Refused(format!(
            "unknown profile {:?}",
            fb.profile
        )));
    };
    if !profile.classes.iter().any(|c| c.name == fb.true_class) {
        let names: Vec<&str> = profile.classes.iter().map(|c| c.name.as_str()).collect();
        return Ok(Outcome::Refused(format!(
            "profile {:?} has no class {:?} (its classes: {names:?})",
            fb.profile, fb.true_class
        )));
    }
    match profile.feedback.learn {
        Learn::Off => return Ok(Outcome::Ignored("the profile's feedback.learn is off")),
        Learn::Corrections
            if fb.predicted_class == fb.true_class && fb.predicted_outcome != "OUTCOME_REVIEW" =>
        {
            return Ok(Outcome::Ignored(
                "it confirms a verdict that was not REVIEW (feedback.learn = corrections)",
            ))
        }
        _ => {}
    }
    let image = match &fb.image {
        Some(feedback::Image::Uri(u)) => inspection_request::Image::Uri(u.clone()),
        Some(feedback::Image::InlineData(d)) => inspection_request::Image::InlineData(d.clone()),
        None => return Ok(Outcome::Refused("no image (uri or inline_data)".into())),
    };
    let bytes = match deps.fetcher.fetch(&image).await {
        Ok(b) => b,
        Err(e) => return Ok(Outcome::Refused(format!("fetching its image: {e}"))),
    };
    let input = format!("feedback for request {:?}", fb.request_id);
    let (pre, model, raw) = (pre.clone(), deps.model.clone(), bytes.clone());
    let embedded = tokio::task::spawn_blocking(move || embed(&pre, &model, &input, &raw)).await?;
    let (rows, window_scales) = match embedded {
        Ok(r) => r,
        Err(e) => return Ok(Outcome::Refused(e.to_string())),
    };
    let source = msg_source(msg);
    let x = Exemplar {
        id: id_of(&bytes),
        profile: fb.profile.clone(),
        class: fb.true_class.clone(),
        embedding: rows[0].clone(),
        window_embeddings: rows[1..].concat(),
        window_scales,
        dim: deps.dim as u32,
        model_hash: deps.model_hash.clone(),
        source: format!(
            "{FEEDBACK_SOURCE}{}/{}/{} request {}",
            source.topic, source.partition, source.offset, fb.request_id
        ),
        added_by: fb.operator.clone(),
        added_at: fb
            .decided_at
            .or_else(|| Some(crate::timestamps::timestamp(SystemTime::now()))),
    };
    let key = format!("{}/{}", x.profile, x.id);
    if let Err(e) = publish(deps, &key, Some(&x), shutdown).await {
        if let Some(refused) = e.downcast_ref::<crate::sink::SendError>() {
            if refused.refuses_only_the_record() {
                return Ok(Outcome::Refused(format!(
                    "its exemplar {key:?} is refused by the exemplar topic: {refused}"
                )));
            }
        }
        return Err(e);
    }
    trim(deps, profile, &fb.profile, &x, shutdown).await?;
    Ok(Outcome::Applied(key))
}

/// Why a feedback record's payload is not a `clipqc.v1.Feedback` (as its content type says).
#[derive(Debug, thiserror::Error)]
enum NotFeedback {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Protobuf(#[from] prost::DecodeError),
}

/// The record's payload as the feedback it must be: protobuf, or JSON when its content type
/// says so.
fn decode_feedback(payload: &[u8], json: bool) -> Result<Feedback, NotFeedback> {
    if json {
        Ok(serde_json::from_slice(payload)?)
    } else {
        Ok(Feedback::decode(payload)?)
    }
}

/// Why a feedback image gives no embedding: the record is refused with it.
#[derive(Debug, thiserror::Error)]
enum EmbedError {
    /// The image does not decode, or the profile's preprocessing refuses it.
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// The image's views, embedded (the whole-frame view first): blocking, off the runtime.
fn embed(
    pre: &Preprocessor,
    model: &ModelHandle,
    input: &str,
    bytes: &[u8],
) -> Result<(Vec<Vec<f32>>, Vec<f32>), EmbedError> {
    let views = pre.views(input, bytes, None)?;
    let rows = model.embed_all_blocking(pre.size(), &views.tensors, 16)?;
    Ok((rows, pre.window_scales(&views.windows)))
}

/// Keeps the class's feedback exemplars at the policy's cap (counting the one just added,
/// which may not be in the bank snapshot yet): the oldest go.
async fn trim(
    deps: &FeedbackDeps,
    profile: &ProfileConfig,
    name: &str,
    added: &Exemplar,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let class = profile
        .classes
        .iter()
        .position(|c| c.name == added.class)
        .expect("checked before. This is a bug.");
    let bank = deps.bank.load();
    let Some(b) = bank.profile(name) else {
        return Ok(());
    };
    // Indexed by these classes, by name (the bank may be indexed by a newer version's).
    let names: Vec<&str> = profile.classes.iter().map(|c| c.name.as_str()).collect();
    let b = b.for_classes(&names);
    let mut ours: Vec<(i64, &str)> = b
        .entries()
        .iter()
        .filter(|e| e.class == class && e.from_feedback && e.id != added.id)
        .map(|e| (e.added_at, e.id.as_str()))
        .collect();
    let cap = profile.feedback.max_per_class.max(1);
    if ours.len() < cap {
        return Ok(());
    }
    ours.sort();
    for (_, id) in &ours[..ours.len() + 1 - cap] {
        let key = format!("{name}/{id}");
        tracing::info!(
            exemplar = key,
            cap,
            "removing the oldest feedback exemplar of its class"
        );
        publish(deps, &key, None, shutdown).await?;
    }
    Ok(())
}

async fn publish(
    deps: &FeedbackDeps,
    key: &str,
    x: Option<&Exemplar>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let payload = x.map(|x| x.encode_to_vec()).unwrap_or_default();
    let record = Record {
        topic: &deps.kafka.exemplar_topic,
        key: Some(key.as_bytes()),
        payload: &payload,
        headers: vec![],
    };
    if x.is_none() {
        // A tombstone has no payload at all, which the sink's records cannot say.
        let producer = follow::producer(&deps.kafka, &deps.brokers)?;
        return follow::send(&producer, &deps.kafka.exemplar_topic, key, None).await;
    }
    deps.sink
        .send(&record, shutdown)
        .await
        .with_context(|| format!("publishing exemplar {key:?}"))
}

async fn dead_letter(
    deps: &FeedbackDeps,
    msg: &BorrowedMessage<'_>,
    reason: &str,
    shutdown: &CancellationToken,
) -> bool {
    let failure = crate::verdict::Failure::new(
        crate::proto::v1::ErrorCode::InvalidRequest,
        crate::verdict::Stage::Feedback,
        reason,
    );
    let (topic, source) = (&deps.kafka.dlq_topic, msg_source(msg));
    let sent = deps
        .sink
        .send_dead_letter(topic, msg, &source, &failure, shutdown)
        .await;
    match sent {
        Ok(()) => {
            metrics::dead_letter(crate::verdict::Stage::Feedback.as_str());
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "the feedback's dead letter was not published");
            false
        }
    }
}

fn msg_source(msg: &BorrowedMessage<'_>) -> SourceRecord {
    SourceRecord {
        topic: msg.topic().to_string(),
        partition: msg.partition(),
        offset: msg.offset(),
    }
}

fn content_type<'a>(msg: &'a BorrowedMessage<'_>) -> Option<&'a str> {
    let headers = msg.headers()?;
    headers
        .iter()
        .find(|h| h.key.eq_ignore_ascii_case("content-type"))
        .and_then(|h| std::str::from_utf8(h.value?).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::artifact::ImageSettings;
    use crate::model::fake::FakeBackend;
    use crate::model::ModelOwner;
    use crate::preprocess::DecodeLimits;

    #[test]
    fn an_image_that_does_not_decode_is_refused_as_a_preprocess_error() {
        let (owner, model) = ModelOwner::spawn(|| Ok(FakeBackend::new(8, 224)), 1).unwrap();
        let pre = Preprocessor::new(&ImageSettings::clip(), DecodeLimits::default(), None);
        let err = embed(&pre, &model, "feedback for request \"r1\"", &[0x12; 64]).unwrap_err();
        assert!(matches!(err, EmbedError::Preprocess(_)), "{err}");
        assert!(
            err.to_string().starts_with("feedback for request \"r1\": "),
            "{err}"
        );
        drop(model);
        owner.join();
    }

    #[test]
    fn a_payload_that_is_not_feedback_says_in_which_encoding() {
        let err = decode_feedback(b"{\"profile\": 7}", true).unwrap_err();
        assert!(matches!(err, NotFeedback::Json(_)), "{err}");
        let err = decode_feedback(&[0xFF, 0xFF], false).unwrap_err();
        assert!(matches!(err, NotFeedback::Protobuf(_)), "{err}");
        let fb = Feedback {
            profile: "p".into(),
            ..Default::default()
        };
        assert_eq!(decode_feedback(&fb.encode_to_vec(), false).unwrap(), fb);
    }
}
