//! The sink stage: verdicts and dead letters to Kafka.
//!
//! Guarantees: the producer is idempotent (`enable.idempotence=true`: no duplicates from
//! its own retries, order kept per partition); [`Sink::send`] returns Ok only once the broker
//! has acknowledged the record, and retries transient failures until it does or the worker
//! shuts down, because the input offset must not be committed before. A permanent refusal
//! (the record is too large, the topic does not exist, the worker is not authorised) is not
//! retried: it comes back as [`SendError::Refused`] for the caller to act on, instead of
//! holding the record's slot and its partition forever. A send retrying for longer than
//! [`Sink::STALL_AFTER`] shows on `/readyz` and in `clipqc_publish_stalled_records`.
//! Verdicts are keyed by camera id (one camera's verdicts stay in order) and carry their
//! source coordinates in headers.
//!
//! With `kafka.delivery = "exactly_once"` the pipeline's verdicts and dead letters go through
//! [`transaction`] instead: staged in an [`outbox`], then written with their input offsets in
//! one transaction.

pub mod dead_letter;
pub mod outbox;
pub mod transaction;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use tokio_util::sync::CancellationToken;

use crate::http::Readiness;
use crate::kafka::KafkaSettings;
use crate::metrics;
use crate::proto::v1::SourceRecord;
use crate::verdict::{dlq_headers, Failure};

#[derive(Clone)]
pub struct Sink {
    producer: FutureProducer,
    /// Told of sends stalled past [`Sink::STALL_AFTER`] (a fresh one where nobody asks).
    readiness: Arc<Readiness>,
    stall_after: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("gave up: the worker is stopping and the broker had not acknowledged the record")]
    Aborted,
    #[error("{topic}: the record is refused for good: {error}")]
    Refused { topic: String, error: KafkaError },
}

impl SendError {
    /// Refused for its size: a smaller record would go through.
    pub fn too_large(&self) -> bool {
        matches!(self, Self::Refused { error, .. } if error.rdkafka_error_code().is_some_and(is_size_error))
    }
}

impl SendError {
    /// Refused for something in this record alone (its size, its contents): another record to
    /// the same topic would go through, so the refusal must not stop the worker.
    pub fn refuses_only_the_record(&self) -> bool {
        matches!(self, Self::Refused { error, .. } if refuses_only_the_record(error))
    }
}

/// `e` refuses one record for what it is (its size, its contents), not its topic or the
/// client (authorisation, an unknown topic): another record would go through.
pub fn refuses_only_the_record(e: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    e.rdkafka_error_code()
        .is_some_and(|c| is_size_error(c) || matches!(c, InvalidRecord | InvalidMessage))
}

fn is_size_error(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        MessageSizeTooLarge | InvalidMessageSize | MessageBatchTooLarge
    )
}

/// Errors that the same record meets again however often it is sent: its size, a topic
/// that does not exist or is invalid, missing authorisation, a broker policy. Everything
/// else (leader elections, timeouts, a broker down, queue full) passes.
pub fn is_permanent(e: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    let Some(code) = e.rdkafka_error_code() else {
        return false;
    };
    is_size_error(code)
        || matches!(
            code,
            UnknownTopic
                | UnknownTopicOrPartition
                | UnknownPartition
                | InvalidTopic
                | TopicAuthorizationFailed
                | ClusterAuthorizationFailed
                | PolicyViolation
                | InvalidRecord
                | InvalidMessage
                | UnsupportedForMessageFormat
                | InvalidRequiredAcks
                | Authentication
                | SaslAuthenticationFailed
                | Fatal
        )
}

/// Headers as librdkafka takes them.
fn owned_headers(headers: &[(String, Vec<u8>)]) -> OwnedHeaders {
    headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
        h.insert(Header {
            key: k,
            value: Some(v),
        })
    })
}

/// Counts one stalled send while it lives.
struct Stalled<'a>(&'a Readiness);

impl<'a> Stalled<'a> {
    fn new(readiness: &'a Readiness) -> Self {
        let n = readiness.publish_stalled.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::publish_stalled(n);
        Self(readiness)
    }
}

impl Drop for Stalled<'_> {
    fn drop(&mut self) {
        let n = self.0.publish_stalled.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::publish_stalled(n);
    }
}

/// One record to publish.
pub struct Record<'a> {
    pub topic: &'a str,
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
    pub headers: Vec<(String, Vec<u8>)>,
}

/// The headers of `msg`'s dead letter: the record's own, unchanged, then the failure's in
/// Kafka Connect's names ([`crate::verdict::dlq_headers`]).
pub fn dead_letter_headers(
    msg: &impl Message,
    source: &SourceRecord,
    failure: &Failure,
) -> Vec<(String, Vec<u8>)> {
    let own = msg.headers().into_iter().flat_map(|h| h.iter());
    own.map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
        .chain(
            dlq_headers(source, failure)
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.into_bytes())),
        )
        .collect()
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
            readiness: Arc::default(),
            stall_after: Self::STALL_AFTER,
        })
    }

    /// How long a send may keep failing before the worker reports publishing as stalled.
    pub const STALL_AFTER: Duration = Duration::from_secs(30);

    /// Report stalled sends to `readiness` (and after `stall_after`).
    pub fn reporting_to(mut self, readiness: Arc<Readiness>, stall_after: Duration) -> Self {
        self.readiness = readiness;
        self.stall_after = stall_after;
        self
    }

    /// Publish and wait for the broker's acknowledgement, retrying transient failures until
    /// it comes. [`SendError::Aborted`] when `abort` fired first (the record may or may not
    /// be published; the input offset stays uncommitted, so it is processed again:
    /// at-least-once); [`SendError::Refused`] at once for a permanent refusal. A send not
    /// done after the stall bound counts as stalled (readiness, metric) until it is.
    pub async fn send(
        &self,
        record: &Record<'_>,
        abort: &CancellationToken,
    ) -> Result<(), SendError> {
        let send = self.send_until_acknowledged(record, abort);
        tokio::pin!(send);
        tokio::select! {
            done = &mut send => return done,
            _ = tokio::time::sleep(self.stall_after) => {}
        }
        tracing::error!(
            topic = record.topic,
            waited = ?self.stall_after,
            "publishing stalled: the broker has not acknowledged this record yet"
        );
        let _stalled = Stalled::new(&self.readiness);
        let done = send.await;
        tracing::info!(
            topic = record.topic,
            ok = done.is_ok(),
            "stalled publish ended"
        );
        done
    }

    /// [`Self::send`] for an owned record.
    pub async fn send_owned(
        &self,
        record: &outbox::OwnedRecord,
        abort: &CancellationToken,
    ) -> Result<(), SendError> {
        let borrowed = Record {
            topic: &record.topic,
            key: record.key.as_deref(),
            payload: &record.payload,
            headers: record.headers.clone(),
        };
        self.send(&borrowed, abort).await
    }

    async fn send_until_acknowledged(
        &self,
        record: &Record<'_>,
        abort: &CancellationToken,
    ) -> Result<(), SendError> {
        use backon::{ExponentialBuilder, Retryable};
        let send = || async {
            let mut r = FutureRecord::to(record.topic)
                .payload(record.payload)
                .headers(owned_headers(&record.headers));
            if let Some(k) = record.key {
                r = r.key(k);
            }
            self.producer
                .send(r, Timeout::After(Duration::from_secs(5)))
                .await
                .map_err(|(e, _)| e)
        };
        // A transient error is retried for as long as it lasts (the record's offset waits for
        // its verdict; readiness reports a stall after `STALL_AFTER`), doubling from 100 ms to
        // 5 s between tries; a permanent one is returned at once.
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .without_max_times();
        let retried = send
            .retry(backoff)
            .when(|e| !is_permanent(e))
            .notify(|e, retry_in| {
                tracing::warn!(topic = record.topic, error = %e, ?retry_in, "publish failed; retrying");
            });
        let result = tokio::select! {
            r = retried => r,
            _ = abort.cancelled() => return Err(SendError::Aborted),
        };
        match result {
            Ok(d) => {
                tracing::debug!(
                    topic = record.topic,
                    partition = d.partition,
                    offset = d.offset,
                    "delivered"
                );
                Ok(())
            }
            Err(e) => {
                metrics::publish_refused(record.topic);
                Err(SendError::Refused {
                    topic: record.topic.to_string(),
                    error: e,
                })
            }
        }
    }

    pub fn flush(&self, timeout: Duration) -> KafkaResult<()> {
        self.producer.flush(Timeout::After(timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_keeps_the_records_headers_and_adds_the_failures() {
        use rdkafka::message::{Header, OwnedMessage, Timestamp};
        let headers = OwnedHeaders::new().insert(Header {
            key: "content-type",
            value: Some("application/json"),
        });
        let msg = OwnedMessage::new(
            Some(b"{}".to_vec()),
            None,
            "requests".into(),
            Timestamp::NotAvailable,
            3,
            77,
            Some(headers),
        );
        let source = SourceRecord {
            topic: "requests".into(),
            partition: 3,
            offset: 77,
        };
        let failure = Failure::new(
            crate::proto::v1::ErrorCode::InvalidRequest,
            crate::verdict::Stage::Feedback,
            "no image",
        );
        let headers = dead_letter_headers(&msg, &source, &failure);
        assert_eq!(
            headers[0],
            ("content-type".to_string(), b"application/json".to_vec())
        );
        let connect: Vec<(String, Vec<u8>)> = dlq_headers(&source, &failure)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into_bytes()))
            .collect();
        assert_eq!(headers[1..], connect[..]);
    }

    /// A broker refusing every produce request with a transient error: the send keeps
    /// retrying, shows as stalled once past the bound, and stops showing once delivered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_send_retrying_past_the_bound_shows_as_stalled_until_delivered() {
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
        let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
        mock.create_topic("verdicts", 1, 1).unwrap();
        mock.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 10_000],
        );
        let readiness = Arc::new(Readiness::default());
        let sink = Sink::new(&KafkaSettings::default(), &mock.bootstrap_servers())
            .unwrap()
            .reporting_to(readiness.clone(), Duration::from_millis(200));
        let abort = CancellationToken::new();
        let send = tokio::spawn({
            let sink = sink.clone();
            let abort = abort.clone();
            async move {
                let record = Record {
                    topic: "verdicts",
                    key: None,
                    payload: b"v",
                    headers: Vec::new(),
                };
                sink.send(&record, &abort).await
            }
        });
        // Generous bound: the stall shows after 200 ms of a machine that may be busy.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while readiness.publish_stalled.load(Ordering::Relaxed) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "never reported stalled"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(readiness
            .not_ready()
            .iter()
            .any(|why| why.starts_with("publishing stalled")));
        mock.clear_request_errors(RDKafkaApiKey::Produce);
        let sent = tokio::time::timeout(Duration::from_secs(60), send)
            .await
            .expect("delivered once the broker takes records again")
            .unwrap();
        assert!(sent.is_ok(), "{sent:?}");
        assert_eq!(readiness.publish_stalled.load(Ordering::Relaxed), 0);
        assert!(readiness
            .not_ready()
            .iter()
            .all(|why| !why.starts_with("publishing")));
    }

    #[test]
    fn size_topic_and_authorisation_errors_are_permanent_and_broker_moves_are_not() {
        use RDKafkaErrorCode::*;
        let produce = KafkaError::MessageProduction;
        for code in [
            MessageSizeTooLarge,
            UnknownTopicOrPartition,
            UnknownTopic,
            TopicAuthorizationFailed,
            InvalidRecord,
        ] {
            assert!(is_permanent(&produce(code)), "{code:?}");
        }
        for code in [
            NotLeaderForPartition,
            NotEnoughReplicas,
            RequestTimedOut,
            MessageTimedOut,
            QueueFull,
            AllBrokersDown,
        ] {
            assert!(!is_permanent(&produce(code)), "{code:?}");
        }
        let refused = |code| SendError::Refused {
            topic: "t".into(),
            error: produce(code),
        };
        assert!(refused(MessageSizeTooLarge).too_large());
        assert!(!refused(TopicAuthorizationFailed).too_large());
        assert!(!SendError::Aborted.too_large());
    }
}
