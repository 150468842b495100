//! OpenTelemetry trace context (W3C `traceparent` / `tracestate`) from a request's Kafka
//! headers to its verdict's headers.
//!
//! Guarantees: a verdict continues the trace of the request it judges: same trace id, a new
//! span id for the worker's step (its parent is the camera's span), the trace flags and
//! `tracestate` kept. A request without (or with a malformed) `traceparent` gets none added:
//! the worker does not start traces of its own.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TraceId};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
use rdkafka::message::{Headers, Message};

/// The worker's span of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Continued {
    pub trace_id: TraceId,
    /// `traceparent` (and `tracestate` when the request had one) for the verdict.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// `None` when the record carries no valid trace context.
pub fn continue_from<M: Message>(msg: &M) -> Option<Continued> {
    let propagator = TraceContextPropagator::new();
    let parent = propagator.extract(&KafkaHeaders(msg));
    let parent = parent.span().span_context().clone();
    if !parent.is_valid() {
        return None;
    }
    let ours = SpanContext::new(
        parent.trace_id(),
        RandomIdGenerator::default().new_span_id(),
        parent.trace_flags(),
        false,
        parent.trace_state().clone(),
    );
    let mut out = Out(Vec::new());
    propagator.inject_context(&Context::new().with_remote_span_context(ours), &mut out);
    Some(Continued {
        trace_id: parent.trace_id(),
        headers: out.0,
    })
}

struct KafkaHeaders<'a, M>(&'a M);

impl<M: Message> Extractor for KafkaHeaders<'_, M> {
    fn get(&self, key: &str) -> Option<&str> {
        let headers = self.0.headers()?;
        // Header names are case-insensitive in W3C trace context; Kafka's are not.
        headers
            .iter()
            .find(|h| h.key.eq_ignore_ascii_case(key))
            .and_then(|h| std::str::from_utf8(h.value?).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .headers()
            .map(|h| h.iter().map(|h| h.key).collect())
            .unwrap_or_default()
    }
}

struct Out(Vec<(String, Vec<u8>)>);

impl Injector for Out {
    fn set(&mut self, key: &str, value: String) {
        if !value.is_empty() {
            self.0.push((key.to_string(), value.into_bytes()));
        }
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};

    use super::*;

    fn msg(headers: &[(&str, &str)]) -> OwnedMessage {
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        OwnedMessage::new(
            None,
            None,
            "t".into(),
            Timestamp::NotAvailable,
            0,
            0,
            Some(h),
        )
    }

    fn header<'a>(c: &'a Continued, key: &str) -> Option<&'a str> {
        c.headers
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| std::str::from_utf8(v).unwrap())
    }

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_verdict_continues_the_requests_trace_with_a_new_span() {
        let c = continue_from(&msg(&[("traceparent", PARENT), ("tracestate", "plant=7")]))
            .expect("a valid context");
        assert_eq!(c.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let tp = header(&c, "traceparent").unwrap();
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts[0], "00");
        assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parts[2].len(), 16);
        assert_ne!(parts[2], "00f067aa0ba902b7", "a span of its own");
        assert_eq!(parts[3], "01", "sampled flag kept");
        assert_eq!(header(&c, "tracestate"), Some("plant=7"));
    }

    #[test]
    fn header_names_are_matched_without_case() {
        assert!(continue_from(&msg(&[("Traceparent", PARENT)])).is_some());
    }

    #[test]
    fn no_or_malformed_context_adds_nothing() {
        assert_eq!(continue_from(&msg(&[])), None);
        assert_eq!(
            continue_from(&msg(&[("traceparent", "00-zz-00f067aa0ba902b7-01")])),
            None
        );
        let zero = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
        assert_eq!(continue_from(&msg(&[("traceparent", zero)])), None);
    }
}
