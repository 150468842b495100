//! The exemplar topic and the adapter topic on Kafka: every worker reads both from the
//! beginning before it takes a request, then follows them (one reader, one bank: an adapter
//! is swapped in with the snapshot it belongs to); the CLI publishes exemplars, adapters and
//! tombstones to them.
//!
//! Guarantees: [`catch_up`] returns only once every partition has been read up to the end it
//! had when the reading started (so a worker's first verdict already sees every exemplar
//! published before it started), or errors after `timeout`; the follower thread swaps in a
//! new bank snapshot only between records (a record is scored against one whole snapshot,
//! never a half-applied one), and stops when told; a record the bank refuses is logged with
//! its reason and counted, and the worker goes on; when the profiles change while the worker
//! runs ([`Exemplars::updates`]) and some profile's classes differ, the topic is read again
//! from the beginning with the new profiles (as a worker started now would read it) and the
//! result swapped in whole (until then records use the old bank, re-indexed by name:
//! [`super::ProfileBank::for_classes`]). Reading is by assignment, not in a group:
//! every worker reads every partition, and nothing is committed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use arc_swap::ArcSwap;
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::{Bank, ExemplarSettings};
use crate::kafka::KafkaSettings;
use crate::metrics;
use crate::proto::v1::{Adapter as AdapterRecord, Exemplar};
use crate::score::ProfileConfig;

/// The bank every record is scored against: a snapshot swapped whole.
pub type SharedBank = Arc<ArcSwap<Bank>>;

/// The bank and its follower thread, which stops when this is dropped.
pub struct Exemplars {
    pub bank: SharedBank,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    updates: Option<ProfileUpdates>,
}

/// The profiles in service, sent to the follower when they change while the worker runs.
pub type ProfileUpdates = std::sync::mpsc::Sender<HashMap<String, ProfileConfig>>;

impl Exemplars {
    /// An empty bank that nothing follows (no broker to read from, tests).
    pub fn empty() -> Self {
        Self {
            bank: Arc::new(ArcSwap::from_pointee(Bank::default())),
            stop: Arc::new(AtomicBool::new(true)),
            thread: None,
            updates: None,
        }
    }

    /// Where to send the profiles after a live change (`None`: nothing follows the topic).
    pub fn updates(&self) -> Option<ProfileUpdates> {
        self.updates.clone()
    }

    /// [`catch_up`], then follow until dropped.
    pub fn start(
        kafka: &KafkaSettings,
        brokers: &str,
        ctx: BankContext,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (updates, changes) = std::sync::mpsc::channel();
        let (bank, thread) = catch_up(kafka, brokers, ctx, timeout, stop.clone(), changes)?;
        Ok(Self {
            bank,
            stop,
            thread: Some(thread),
            updates: Some(updates),
        })
    }
}

impl Drop for Exemplars {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            // It polls every 200 ms; a panic there was logged by the panic hook already.
            let _ = t.join();
        }
    }
}

/// What the bank is checked against.
#[derive(Clone)]
pub struct BankContext {
    pub profiles: HashMap<String, ProfileConfig>,
    pub model_hash: String,
    pub dim: usize,
    pub settings: ExemplarSettings,
}

fn reader(kafka: &KafkaSettings, brokers: &str) -> anyhow::Result<BaseConsumer> {
    let mut cfg = ClientConfig::new();
    for (k, v) in &kafka.properties {
        cfg.set(k, v);
    }
    cfg.set("bootstrap.servers", brokers)
        // librdkafka wants a group id even for assigned reading; nothing is committed.
        .set("group.id", format!("{}.exemplar-reader", kafka.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false");
    Ok(cfg.create()?)
}

/// A partition of the topic: its id and its low and high watermarks when the reading began.
type Span = (i32, i64, i64);

/// The topic's partitions and their watermarks now, or `None` when the topic does not exist.
/// Only "unknown topic" means absent: an authorisation error is an error (a worker that may
/// not read its bank must not serve without it, saying nothing), and anything else (a leader
/// not elected yet, a broker restarting, a timeout) is asked again until `deadline`.
fn spans_of(c: &BaseConsumer, topic: &str, deadline: Instant) -> anyhow::Result<Option<Vec<Span>>> {
    use rdkafka::error::RDKafkaErrorCode as Code;
    let denied = |code: Code| {
        matches!(
            code,
            Code::TopicAuthorizationFailed
                | Code::ClusterAuthorizationFailed
                | Code::GroupAuthorizationFailed
                | Code::SaslAuthenticationFailed
                | Code::Authentication
        )
    };
    loop {
        match look(c, topic) {
            Ok(found) => return Ok(found),
            Err(e) if denied(e) => anyhow::bail!(
                "the topic {topic:?} may not be read ({e}): the worker needs Describe \
                 and Read on it (Kafka ACLs); it does not start without its bank"
            ),
            Err(e) if Instant::now() >= deadline => {
                anyhow::bail!("metadata of the topic {topic:?}: {e}")
            }
            Err(e) => {
                tracing::info!(topic, error = %e, "bank topic not ready: asking again");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

/// One look at the topic's metadata and watermarks: `None` when it does not exist, the
/// error's code when it cannot be told.
fn look(
    c: &BaseConsumer,
    topic: &str,
) -> Result<Option<Vec<Span>>, rdkafka::error::RDKafkaErrorCode> {
    use rdkafka::error::RDKafkaErrorCode as Code;
    let code = |e: rdkafka::error::KafkaError| e.rdkafka_error_code().unwrap_or(Code::Fail);
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(code)?;
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    match t.error().map(Code::from) {
        Some(Code::UnknownTopicOrPartition) => return Ok(None),
        Some(e) => return Err(e),
        None if t.partitions().is_empty() => return Err(Code::LeaderNotAvailable),
        None => {}
    }
    t.partitions()
        .iter()
        .map(|p| {
            let (low, high) = c
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .map_err(code)?;
            Ok((p.id(), low, high))
        })
        .collect::<Result<_, _>>()
        .map(Some)
}

/// The topic's `cleanup.policy`, through the admin API (`None` when it cannot be told: the
/// broker may not allow DescribeConfigs).
pub fn cleanup_policy(kafka: &KafkaSettings, brokers: &str, topic: &str) -> Option<String> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    let mut cfg = ClientConfig::new();
    for (k, v) in &kafka.properties {
        cfg.set(k, v);
    }
    let admin: AdminClient<_> = cfg.set("bootstrap.servers", brokers).create().ok()?;
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    // Called at start, maybe on a runtime's thread: a thread and a small runtime of its own.
    std::thread::scope(|s| {
        s.spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            let described = runtime
                .block_on(admin.describe_configs([&ResourceSpecifier::Topic(topic)], &options))
                .ok()?;
            let resource = described.into_iter().next()?.ok()?;
            resource.get("cleanup.policy")?.value.clone()
        })
        .join()
        .ok()
        .flatten()
    })
}

/// One record of the bank's topics: an exemplar (or a tombstone) from `kafka.exemplar_topic`,
/// an adapter (or a tombstone) from `kafka.adapter_topic`.
pub enum Record {
    Exemplar(Option<Exemplar>),
    Adapter(Option<AdapterRecord>),
}

/// Reads the exemplar topic from the beginning to the ends it has now, handing each record's
/// key and exemplar (`None`: a tombstone) to `each`, and returns the reader positioned after
/// them (`None` when the topic does not exist).
pub fn read_to_end(
    kafka: &KafkaSettings,
    brokers: &str,
    timeout: Duration,
    mut each: impl FnMut(&str, Option<Exemplar>),
) -> anyhow::Result<Option<BaseConsumer>> {
    let topics = [kafka.exemplar_topic.as_str()];
    let (reader, _) = read_topics_to_end(kafka, brokers, &topics, timeout, |key, record| {
        if let Record::Exemplar(x) = record {
            each(key, x)
        }
    })?;
    Ok(reader)
}

/// [`read_to_end`] of both of the bank's topics, the exemplar topic and the adapter topic:
/// the reader (`None` when neither exists) and whether one of them was missing.
pub fn read_bank_to_end(
    kafka: &KafkaSettings,
    brokers: &str,
    timeout: Duration,
    each: impl FnMut(&str, Record),
) -> anyhow::Result<(Option<BaseConsumer>, bool)> {
    let topics = [kafka.exemplar_topic.as_str(), kafka.adapter_topic.as_str()];
    read_topics_to_end(kafka, brokers, &topics, timeout, each)
}

fn read_topics_to_end(
    kafka: &KafkaSettings,
    brokers: &str,
    topics: &[&str],
    timeout: Duration,
    mut each: impl FnMut(&str, Record),
) -> anyhow::Result<(Option<BaseConsumer>, bool)> {
    let c = reader(kafka, brokers)?;
    let started = Instant::now();
    let mut spans: Vec<(String, Span)> = Vec::new();
    let mut missing = false;
    for topic in topics {
        match spans_of(&c, topic, started + timeout)? {
            Some(found) => spans.extend(found.into_iter().map(|s| (topic.to_string(), s))),
            None => missing = true,
        }
    }
    if spans.is_empty() {
        return Ok((None, missing));
    }
    let mut tpl = TopicPartitionList::new();
    for (topic, (p, _, _)) in &spans {
        // The beginning is the low watermark: records deleted (retention, DeleteRecords)
        // are skipped.
        tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    // Done by the consumer's position, not by the offsets of the records read: the position
    // also moves past transaction markers and deleted records, which no record stands for.
    let position = |c: &BaseConsumer| -> anyhow::Result<HashMap<(String, i32), i64>> {
        Ok(c.position()?
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
                _ => None,
            })
            .collect())
    };
    let done = |at: &HashMap<(String, i32), i64>| {
        spans.iter().all(|(t, (p, low, high))| {
            high <= low || at.get(&(t.clone(), *p)).is_some_and(|o| o >= high)
        })
    };
    loop {
        let at = position(&c)?;
        if done(&at) {
            break;
        }
        if started.elapsed() > timeout {
            let read: i64 = spans
                .iter()
                .map(|(t, (p, low, _))| at.get(&(t.clone(), *p)).map_or(0, |o| o - low))
                .sum();
            anyhow::bail!(
                "the topics {topics:?} were not read to their end within {} s \
                 ({read} of {} offsets; positions {at:?}, ends {:?})",
                timeout.as_secs(),
                spans.iter().map(|(_, (_, l, h))| h - l).sum::<i64>(),
                spans
                    .iter()
                    .map(|(t, (p, _, h))| (t, p, h))
                    .collect::<Vec<_>>()
            );
        }
        let Some(msg) = c.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg.with_context(|| format!("reading the topics {topics:?}"))?;
        handle(kafka, &msg, &mut each);
    }
    Ok((Some(c), missing))
}

fn handle(
    kafka: &KafkaSettings,
    msg: &rdkafka::message::BorrowedMessage<'_>,
    each: &mut impl FnMut(&str, Record),
) {
    let key = String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned();
    if msg.topic() == kafka.adapter_topic {
        match msg.payload().map(AdapterRecord::decode).transpose() {
            Ok(x) => each(&key, Record::Adapter(x)),
            Err(e) => {
                tracing::warn!(key, error = %e, "skipping an adapter record that is not a clipqc.v1.Adapter");
                metrics::adapter_skipped("malformed");
            }
        }
        return;
    }
    match msg.payload() {
        None => each(&key, Record::Exemplar(None)),
        Some(bytes) => match Exemplar::decode(bytes) {
            Ok(x) => each(&key, Record::Exemplar(Some(x))),
            Err(e) => {
                tracing::warn!(key, error = %e, "skipping an exemplar record that is not a clipqc.v1.Exemplar");
                metrics::exemplar_skipped("malformed");
            }
        },
    }
}

/// Applies one record of the bank's topics to `bank`; one it refuses is logged with its
/// reason and counted.
pub fn apply(bank: &mut Bank, ctx: &BankContext, key: &str, record: Record) {
    match record {
        Record::Exemplar(x) => {
            if let Err(e) = bank.apply(
                key,
                x,
                &ctx.profiles,
                &ctx.model_hash,
                ctx.dim,
                &ctx.settings,
            ) {
                tracing::warn!(error = %e, "exemplar skipped");
                metrics::exemplar_skipped(e.reason());
            }
        }
        Record::Adapter(x) => {
            let version = x.as_ref().map(|a| a.version.clone());
            match bank.apply_adapter(key, x, &ctx.profiles, &ctx.model_hash, ctx.dim) {
                Ok(()) => tracing::info!(profile = key, version, "adapter applied"),
                Err(e) => {
                    tracing::warn!(error = %e, "adapter skipped");
                    metrics::adapter_skipped(e.reason());
                }
            }
        }
    }
}

fn publish(shared: &SharedBank, bank: &Bank, ctx: &BankContext) {
    shared.store(Arc::new(bank.clone()));
    for (profile, class, n) in bank.counts(&ctx.profiles) {
        metrics::exemplars(profile, class, n);
    }
}

/// Reads the bank to the end of the topic, then follows it on a thread of its own until
/// `stop` is set. An absent topic is an empty bank (logged), looked for again every 30 s.
pub fn catch_up(
    kafka: &KafkaSettings,
    brokers: &str,
    ctx: BankContext,
    timeout: Duration,
    stop: Arc<AtomicBool>,
    changes: Receiver<HashMap<String, ProfileConfig>>,
) -> anyhow::Result<(SharedBank, std::thread::JoinHandle<()>)> {
    let started = Instant::now();
    let mut bank = Bank::default();
    let mut records = 0usize;
    let (reader, missing) = read_bank_to_end(kafka, brokers, timeout, |key, record| {
        records += 1;
        apply(&mut bank, &ctx, key, record);
    })?;
    let shared: SharedBank = Arc::new(ArcSwap::from_pointee(Bank::default()));
    publish(&shared, &bank, &ctx);
    let held: usize = ctx
        .profiles
        .keys()
        .filter_map(|p| bank.profile(p))
        .map(|b| b.bytes())
        .sum();
    tracing::info!(
        topic = kafka.exemplar_topic,
        records,
        bytes = held,
        seconds = started.elapsed().as_secs_f64(),
        present = reader.is_some(),
        "exemplar bank read to the end of its topic"
    );
    metrics::exemplar_catch_up(started.elapsed().as_secs_f64());
    if reader.is_some() {
        let topic = &kafka.exemplar_topic;
        match cleanup_policy(kafka, brokers, topic).as_deref() {
            Some("compact") => {}
            Some(policy) => tracing::warn!(topic, policy,
                "the exemplar topic's cleanup.policy is not compact: retention will delete \
                 exemplars still in use (and the bank shrinks at the next start); set \
                 cleanup.policy=compact on it"),
            None => tracing::info!(topic,
                "could not read the exemplar topic's cleanup.policy (DescribeConfigs): make sure it is compact"),
        }
    }
    let (kafka, brokers, follower_shared) = (kafka.clone(), brokers.to_string(), shared.clone());
    let thread = std::thread::Builder::new()
        .name("clipqc-exemplars".into())
        .spawn(move || {
            follow(
                kafka,
                brokers,
                reader,
                missing,
                bank,
                ctx,
                follower_shared,
                stop,
                changes,
            )
        })
        .context("starting the exemplar follower thread")?;
    Ok((shared, thread))
}

#[allow(clippy::too_many_arguments)]
fn follow(
    kafka: KafkaSettings,
    brokers: String,
    mut reader: Option<BaseConsumer>,
    mut missing: bool,
    mut bank: Bank,
    mut ctx: BankContext,
    shared: SharedBank,
    stop: Arc<AtomicBool>,
    changes: Receiver<HashMap<String, ProfileConfig>>,
) {
    let mut dirty = false;
    let mut looked = Instant::now();
    // Profiles changed while running whose re-read failed, tried again every 30 s.
    let mut pending: Option<(HashMap<String, ProfileConfig>, Instant)> = None;
    while !stop.load(Ordering::Relaxed) {
        let due = pending.take_if(|(_, at)| at.elapsed() > Duration::from_secs(30));
        if let Some(profiles) = changes.try_iter().last().or(due.map(|(p, _)| p)) {
            if let Err((profiles, e)) = reindex(
                &kafka,
                &brokers,
                (&mut reader, &mut missing),
                &mut bank,
                &mut ctx,
                profiles,
                false,
            ) {
                tracing::warn!(error = %e, "re-reading the exemplar topic for changed profiles (again in 30 s)");
                pending = Some((profiles, Instant::now()));
            } else {
                publish(&shared, &bank, &ctx);
                dirty = false;
            }
        }
        // A topic did not exist: looked for again every 30 s (it may be created later); once
        // it does, both are read again into a new bank, swapped in whole.
        if missing && looked.elapsed() > Duration::from_secs(30) {
            looked = Instant::now();
            if exist(&kafka, &brokers) {
                let profiles = ctx.profiles.clone();
                match reindex(
                    &kafka,
                    &brokers,
                    (&mut reader, &mut missing),
                    &mut bank,
                    &mut ctx,
                    profiles,
                    true,
                ) {
                    Ok(()) => dirty = true,
                    Err((_, e)) => tracing::warn!(error = %e, "looking for the bank's topics"),
                }
            }
        }
        let Some(c) = &reader else {
            std::thread::sleep(Duration::from_millis(200));
            if dirty {
                publish(&shared, &bank, &ctx);
                dirty = false;
            }
            continue;
        };
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(msg)) => {
                handle(&kafka, &msg, &mut |k, r| apply(&mut bank, &ctx, k, r));
                dirty = true;
            }
            Some(Err(e)) => tracing::warn!(error = %e, "reading the exemplar topic"),
            // Idle: whatever arrived is swapped in at once, as one snapshot.
            None if dirty => {
                publish(&shared, &bank, &ctx);
                dirty = false;
            }
            None => {}
        }
    }
}

/// The profiles in service changed: when some profile's classes differ (or profiles came or
/// went), the topic is read from the beginning with them into a new bank, as a worker started
/// now would read it (exemplars of a class just added are taken, those of a class removed
/// left out); otherwise the context takes them as they are. On failure nothing changed.
/// Whether both of the bank's topics exist now (one look at their metadata).
fn exist(kafka: &KafkaSettings, brokers: &str) -> bool {
    let Ok(c) = reader(kafka, brokers) else {
        return false;
    };
    [&kafka.exemplar_topic, &kafka.adapter_topic]
        .iter()
        .all(|t| matches!(look(&c, t), Ok(Some(_))))
}

/// The profiles in service changed: when some profile's classes differ (or profiles came or
/// went), or `always` (a topic missing at the last reading may exist now), the topics are read
/// from the beginning with them into a new bank, as a worker started now would read them
/// (exemplars of a class just added are taken, those of a class removed left out); otherwise
/// the context takes them as they are. On failure nothing changed.
#[allow(clippy::type_complexity)]
fn reindex(
    kafka: &KafkaSettings,
    brokers: &str,
    (reader, missing): (&mut Option<BaseConsumer>, &mut bool),
    bank: &mut Bank,
    ctx: &mut BankContext,
    profiles: HashMap<String, ProfileConfig>,
    always: bool,
) -> Result<(), (HashMap<String, ProfileConfig>, anyhow::Error)> {
    let classes = |p: &ProfileConfig| p.classes.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
    let same = ctx.profiles.len() == profiles.len()
        && ctx
            .profiles
            .iter()
            .all(|(n, p)| profiles.get(n).is_some_and(|q| classes(p) == classes(q)));
    if same && !always {
        ctx.profiles = profiles;
        return Ok(());
    }
    let started = Instant::now();
    let fresh_ctx = BankContext {
        profiles,
        ..ctx.clone()
    };
    let mut fresh = Bank::default();
    let mut records = 0usize;
    match read_bank_to_end(kafka, brokers, Duration::from_secs(120), |k, r| {
        records += 1;
        apply(&mut fresh, &fresh_ctx, k, r);
    }) {
        Ok((found, still_missing)) => {
            tracing::info!(
                records,
                seconds = started.elapsed().as_secs_f64(),
                "exemplar bank read again (changed profiles' classes, or a topic created)"
            );
            (*reader, *missing, *bank, *ctx) = (found, still_missing, fresh, fresh_ctx);
            Ok(())
        }
        Err(e) => Err((fresh_ctx.profiles, e)),
    }
}

/// A producer for the exemplar topic (the CLI's): idempotent, acknowledged by all replicas.
pub fn producer(kafka: &KafkaSettings, brokers: &str) -> anyhow::Result<FutureProducer> {
    let mut cfg = ClientConfig::new();
    for (k, v) in &kafka.properties {
        cfg.set(k, v);
    }
    cfg.set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all");
    Ok(cfg.create()?)
}

/// Publishes `x` under its key (`profile/id`), or a tombstone for `key` when `x` is `None`.
pub async fn send(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    x: Option<&Exemplar>,
) -> anyhow::Result<()> {
    let payload = x.map(|x| x.encode_to_vec());
    let mut record = FutureRecord::<str, Vec<u8>>::to(topic).key(key);
    if let Some(p) = &payload {
        record = record.payload(p);
    }
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| anyhow::anyhow!("publishing exemplar {key:?} to {topic:?}: {e}"))?;
    Ok(())
}
