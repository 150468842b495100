//! Before the worker starts its consumers and producers: can it reach the brokers and log in?
//!
//! librdkafka retries a refused login (a wrong SASL password, an unknown user) or a failed TLS
//! handshake (a certificate the worker does not trust) for ever, and tells only its error
//! callback and its log. Left at that, the worker's first blocking call fails after its timeout
//! with "broker transport failure", which names neither cause, and a group consumer would just
//! wait for an assignment. [`check`] makes one error out of it that says what failed and
//! which settings to look at, and fails at the first such refusal: a wrong password does not
//! get right by trying again.
//!
//! Guarantees: returns `Ok` once the brokers answered a metadata request; an error naming the
//! authentication or TLS failure as soon as librdkafka reports one; an error naming the
//! brokers and the last failure after `within` otherwise. Secrets are never in the error:
//! only librdkafka's reason and the names of the settings.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, Producer, ProducerContext};
use rdkafka::ClientContext;

use crate::kafka::KafkaSettings;

/// Records the first security failure librdkafka reports (its error events, with their text).
#[derive(Default)]
struct Probe {
    refused: Mutex<Option<(Refusal, String)>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Authentication,
    Tls,
}

impl Refusal {
    fn of(code: RDKafkaErrorCode) -> Option<Self> {
        use RDKafkaErrorCode::*;
        match code {
            Authentication | SaslAuthenticationFailed | UnsupportedSASLMechanism => {
                Some(Self::Authentication)
            }
            SSL => Some(Self::Tls),
            _ => None,
        }
    }
}

impl ClientContext for Probe {
    fn error(&self, error: KafkaError, reason: &str) {
        let refusal = match &error {
            KafkaError::Global(code) => Refusal::of(*code),
            _ => None,
        };
        if let Some(refusal) = refusal {
            let mut first = self.refused.lock().unwrap_or_else(|e| e.into_inner());
            first.get_or_insert_with(|| (refusal, reason.to_string()));
        }
    }
}

impl ProducerContext for Probe {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

/// Connect to `brokers` as the worker's clients will (`kafka.properties`, resolved) and ask for
/// metadata, for at most `within`.
pub fn check(kafka: &KafkaSettings, brokers: &str, within: Duration) -> anyhow::Result<()> {
    let mut cfg = ClientConfig::new();
    for (k, v) in &kafka.properties {
        cfg.set(k, v);
    }
    cfg.set("bootstrap.servers", brokers);
    let producer: BaseProducer<Probe> = cfg.create_with_context(Probe::default())?;
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let answer = producer
            .client()
            .fetch_metadata(None, left.min(Duration::from_millis(500)));
        // Error events reach the context only when the client is polled, and one poll call
        // serves one event: poll for a moment, so the error is not left behind log events.
        producer.poll(Duration::from_millis(100));
        if let Some((refusal, reason)) = producer
            .context()
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            anyhow::bail!("{}", explain(refusal, brokers, &reason, kafka));
        }
        match answer {
            Ok(_) => return Ok(()),
            Err(e) if left.is_zero() => anyhow::bail!(
                "cannot reach the Kafka brokers {brokers} (kafka.brokers) within {within:?}: {e}"
            ),
            Err(_) => {}
        }
    }
}

/// The error for a refusal, with the settings that decide it.
fn explain(refusal: Refusal, brokers: &str, reason: &str, kafka: &KafkaSettings) -> String {
    let setting = |k: &str| {
        kafka
            .properties
            .get(k)
            .map_or("unset".to_string(), |v| format!("{v:?}"))
    };
    match refusal {
        Refusal::Authentication => format!(
            "the Kafka brokers {brokers} refused the worker's authentication: {reason} \
             (security.protocol {}, sasl.mechanism {}, sasl.username {}; the password is \
             sasl.password in kafka.properties, CLIPQC__KAFKA__PROPERTIES__SASL_PASSWORD or \
             kafka.property_files)",
            setting("security.protocol"),
            setting("sasl.mechanism"),
            setting("sasl.username"),
        ),
        Refusal::Tls => format!(
            "TLS with the Kafka brokers {brokers} failed: {reason} (security.protocol {}, \
             ssl.ca.location {}, ssl.endpoint.identification.algorithm {})",
            setting("security.protocol"),
            setting("ssl.ca.location"),
            setting("ssl.endpoint.identification.algorithm"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_brokers_are_an_error_naming_them_within_the_bound() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let brokers = closed.to_string();
        let kafka = KafkaSettings::default();
        let err = check(&kafka, &brokers, Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!(
                "cannot reach the Kafka brokers {brokers} (kafka.brokers) within 1s: "
            )),
            "{err}"
        );
    }

    #[test]
    fn a_refusal_names_the_settings_but_never_the_password() {
        let mut kafka = KafkaSettings::default();
        for (k, v) in [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "clipqc"),
            ("sasl.password", "hunter2"),
            ("ssl.ca.location", "/etc/kafka/ca.pem"),
        ] {
            kafka.properties.insert(k.into(), v.into());
        }
        let auth = explain(Refusal::Authentication, "b:9093", "invalid-proof", &kafka);
        assert!(
            auth.starts_with("the Kafka brokers b:9093 refused the worker's authentication: invalid-proof (security.protocol \"SASL_SSL\", sasl.mechanism \"SCRAM-SHA-512\", sasl.username \"clipqc\";"),
            "{auth}"
        );
        let tls = explain(Refusal::Tls, "b:9093", "certificate verify failed", &kafka);
        assert!(
            tls.contains("ssl.ca.location \"/etc/kafka/ca.pem\""),
            "{tls}"
        );
        for text in [auth, tls] {
            assert!(!text.contains("hunter2"), "{text}");
        }
        assert_eq!(
            Refusal::of(RDKafkaErrorCode::Authentication),
            Some(Refusal::Authentication)
        );
        assert_eq!(Refusal::of(RDKafkaErrorCode::SSL), Some(Refusal::Tls));
        assert_eq!(Refusal::of(RDKafkaErrorCode::BrokerTransportFailure), None);
    }
}
