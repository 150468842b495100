//! The sink stage: verdicts and dead letters to Kafka.
//!
//! Guarantees: the producer is idempotent (`enable.idempotence=true`: no duplicates from
//! its own retries, order kept per partition); [`Sink::send`] returns only once the broker
//! has acknowledged the record, and retries until it does or the worker shuts down, because
//! the input offset must not be committed before. Verdicts are keyed by camera id (one
//! camera's verdicts stay in order) and carry their source coordinates in headers.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaResult;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use tokio_util::sync::CancellationToken;

use crate::config::KafkaSettings;

#[derive(Clone)]
pub struct Sink {
    producer: FutureProducer,
}

/// One record to publish.
pub struct Record<'a> {
    pub topic: &'a str,
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Sink {
    pub fn new(settings: &KafkaSettings, brokers: &str) -> KafkaResult<Self> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("linger.ms", "2")
            // A bounded per-attempt delivery time; `send` itself retries past it.
            .set("message.timeout.ms", "30000");
        for (k, v) in &settings.properties {
            cfg.set(k, v);
        }
        Ok(Self {
            producer: cfg.create()?,
        })
    }

    /// Publish and wait for the broker's acknowledgement, retrying until it comes. Returns
    /// false only if `abort` fired first (the record may or may not be published; the input
    /// offset stays uncommitted, so it is processed again: at-least-once).
    pub async fn send(&self, record: &Record<'_>, abort: &CancellationToken) -> bool {
        let mut delay = Duration::from_millis(100);
        loop {
            let mut headers = OwnedHeaders::new();
            for (k, v) in &record.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            let mut r = FutureRecord::to(record.topic)
                .payload(record.payload)
                .headers(headers);
            if let Some(k) = record.key {
                r = r.key(k);
            }
            let attempt = self
                .producer
                .send(r, Timeout::After(Duration::from_secs(5)));
            let result = tokio::select! {
                r = attempt => r,
                _ = abort.cancelled() => return false,
            };
            match result {
                Ok(d) => {
                    tracing::debug!(
                        topic = record.topic,
                        partition = d.partition,
                        offset = d.offset,
                        "delivered"
                    );
                    return true;
                }
                Err((e, _)) => {
                    tracing::warn!(topic = record.topic, error = %e, retry_in = ?delay, "publish failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = abort.cancelled() => return false,
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    pub fn flush(&self, timeout: Duration) -> KafkaResult<()> {
        self.producer.flush(Timeout::After(timeout))
    }
}
