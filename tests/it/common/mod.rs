//! Paths to what the tests need. Under `scripts/test.sh`: the random tiny model exported by
//! deploy/model/export.py and the reference outputs of tests/reference/make_fixtures.py
//! (`CLIPQC_TEST_MODEL`, `CLIPQC_TEST_FIXTURES`). Under a plain `cargo test`, without them: a
//! model artifact written from Rust ([`clipqc::model::fake_artifact`]) and the same test
//! images drawn in Rust ([`images`]), so every test that does not compare with a Python
//! reference runs without Python; those that do are `#[ignore]`d with the reason, and
//! scripts/test.sh runs them too (`--include-ignored`).
#![allow(dead_code)]

pub mod cli;
pub mod images;
pub mod profile;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn env_dir(var: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os(var)?);
    assert!(dir.is_dir(), "{var}={} is not a directory", dir.display());
    Some(dir)
}

/// `dir` made once by `make` (into a temporary sibling renamed into place, so test processes
/// running side by side never see half of it).
fn made_once(dir: PathBuf, make: impl FnOnce(&Path) -> anyhow::Result<()>) -> PathBuf {
    if !dir.is_dir() {
        let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        make(&tmp).unwrap_or_else(|e| panic!("write {}: {e:#}", tmp.display()));
        if std::fs::rename(&tmp, &dir).is_err() {
            // Another process got there first: its copy is as good.
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    dir
}

/// The model artifact the tests run: the exported tiny CLIP (`CLIPQC_TEST_MODEL`), else one
/// written from Rust.
pub fn tiny_model() -> PathBuf {
    static FAKE: OnceLock<PathBuf> = OnceLock::new();
    env_dir("CLIPQC_TEST_MODEL").unwrap_or_else(|| {
        FAKE.get_or_init(|| {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fake-model-v1");
            made_once(dir, |d| clipqc::model::fake_artifact::write(d, 0))
        })
        .clone()
    })
}

/// The reference fixtures (`CLIPQC_TEST_FIXTURES`: images and Python's outputs), else a folder
/// with only the test images (`images/`), drawn in Rust.
pub fn fixtures() -> PathBuf {
    static DRAWN: OnceLock<PathBuf> = OnceLock::new();
    env_dir("CLIPQC_TEST_FIXTURES").unwrap_or_else(|| {
        DRAWN
            .get_or_init(|| {
                let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fixture-images-v1");
                made_once(dir, |d| images::write(&d.join("images")))
            })
            .clone()
    })
}

/// The exported tiny SAM beside the tiny model (`scripts/test.sh` exports it with Python).
pub fn tiny_sam() -> PathBuf {
    let dir = tiny_model().join("sam");
    assert!(
        dir.is_dir(),
        "{} is missing: the tiny SAM is exported with Python (scripts/test.sh)",
        dir.display()
    );
    dir
}

pub fn read_f32(path: &std::path::Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// The largest difference between two vectors of the same length.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}
pub mod kafka;

/// The worker's logs in the test output (`RUST_LOG`, default `warn`), once per test binary.
pub fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .try_init();
}
pub mod e2e;
pub mod ops;

/// Look every 200 ms until `look` finds what is awaited (`Ok`), for at most `within`; then
/// panic, saying what was awaited (`what`), for how long, and what was seen last (`Err`).
pub fn wait_for<T>(what: &str, within: Duration, mut look: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + within;
    loop {
        match look() {
            Ok(found) => return found,
            Err(seen) if Instant::now() >= deadline => {
                panic!("waited {within:?} for {what}; last seen: {seen}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The sum of the samples of metric `name` in a Prometheus text exposition (a worker's
/// `/metrics`) whose labels include each of `labels`; 0 when there is none.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (sample, set) = match series.split_once('{') {
                Some((sample, set)) => (sample, set.trim_end_matches('}')),
                None => (series, ""),
            };
            let has = |(k, v): &(&str, &str)| set.split(',').any(|kv| kv == format!("{k}=\"{v}\""));
            (sample == name && labels.iter().all(has)).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// A consumer group's committed position on each of `partitions` partitions of `topic`, read
/// back from the broker (0 where the group has committed nothing).
pub fn committed_positions(
    brokers: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> std::collections::BTreeMap<i32, i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    // One request to the coordinator (found first): milliseconds on a local broker; 30 s is
    // librdkafka's own request.timeout.ms, a bound on a hung one (it was 10 s).
    c.committed_offsets(tpl, std::time::Duration::from_secs(30))
        .unwrap()
        .elements()
        .iter()
        .map(|e| match e.offset() {
            rdkafka::Offset::Offset(o) => (e.partition(), o),
            _ => (e.partition(), 0),
        })
        .collect()
}
