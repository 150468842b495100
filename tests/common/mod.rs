//! Paths to what the test command prepares (`scripts/test.sh`): the random tiny model exported
//! by deploy/model/export.py and the reference outputs of tests/reference/make_fixtures.py.
#![allow(dead_code)]

use std::path::PathBuf;

fn required_dir(var: &str) -> PathBuf {
    let dir = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!("{var} is not set: run the tests through scripts/test.sh, which exports the tiny model and the reference fixtures")
    });
    assert!(dir.is_dir(), "{var}={} is not a directory", dir.display());
    dir
}

pub fn tiny_model() -> PathBuf {
    required_dir("CLIPQC_TEST_MODEL")
}

pub fn fixtures() -> PathBuf {
    required_dir("CLIPQC_TEST_FIXTURES")
}

pub fn read_f32(path: &std::path::Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
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
    c.committed_offsets(tpl, std::time::Duration::from_secs(10))
        .unwrap()
        .elements()
        .iter()
        .map(|e| match e.offset() {
            rdkafka::Offset::Offset(o) => (e.partition(), o),
            _ => (e.partition(), 0),
        })
        .collect()
}
