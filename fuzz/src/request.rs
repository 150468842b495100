//! A Kafka payload, as the worker takes it: bytes → `InspectionRequest` (protobuf and JSON),
//! validated, then the answer the worker publishes for it.
//!
//! Asserts, besides "nothing panics":
//! - the content-type header and the configured default encoding choose the same decoder;
//!   `decode` is `parse` then `validate`;
//! - a valid request survives both encodings unchanged (protobuf and the proto3 JSON mapping
//!   the worker writes), and stays valid;
//! - every payload gets an answer that can be published: the ERROR verdict (echoing the
//!   request when it parses, as `pipeline::handle` does) encodes to protobuf and to JSON, its
//!   small stand-in (`verdict::shrunk`, for a broker that refuses the full one) does too and
//!   stays small, and the dead letter's headers can be made.

use std::time::{Duration, SystemTime};

use clipqc::proto::v1::{ModelInfo, SourceRecord, StageLatencies};
use clipqc::request::{self, Encoding, InspectionRequest, RequestError};
use clipqc::verdict::{self, Failure};
use prost::Message as _;

/// A shrunk verdict echoes at most four fields of 256 bytes and a 1 KiB message; with the
/// source, model and timestamps it stays well under this.
const SHRUNK_MAX_BYTES: usize = 4096;

pub fn check(data: &[u8]) {
    for (content_type, encoding) in [
        ("application/x-protobuf", Encoding::Protobuf),
        ("application/json; charset=utf-8", Encoding::Json),
    ] {
        let parsed = request::parse(data, Some(content_type), Encoding::Protobuf);
        // No header: the configured default decides, the same way.
        let by_default = request::parse(data, None, encoding);
        assert_eq!(
            parsed.as_ref().ok(),
            by_default.as_ref().ok(),
            "{content_type}"
        );
        let decoded = request::decode(data, Some(content_type), Encoding::Json);
        match parsed {
            Err(e) => {
                assert!(
                    decoded.is_err(),
                    "{content_type}: decode took what parse refused"
                );
                answer(None, &Failure::from(&e));
            }
            Ok(r) => match request::validate(&r) {
                Err(e) => {
                    assert!(
                        decoded.is_err(),
                        "{content_type}: decode took an invalid request"
                    );
                    let echo = request::echoable(r);
                    answer(Some(&echo), &Failure::from(&e));
                }
                Ok(()) => {
                    assert_eq!(decoded.as_ref().ok(), Some(&r), "{content_type}");
                    round_trips(&r);
                    // Valid timestamps are usable as times (deadline checks, latencies).
                    for t in [&r.captured_at, &r.deadline].into_iter().flatten() {
                        let at = verdict::system_time(t);
                        let _ = at.duration_since(SystemTime::UNIX_EPOCH);
                        let _ = at.checked_add(Duration::from_secs(3600));
                    }
                    let failure = Failure::from(&RequestError::Invalid("fuzz".into()));
                    answer(Some(&r), &failure);
                }
            },
        }
    }
    // Whatever a record's content-type header says is either chosen or refused, never a panic.
    if let Ok(header) = std::str::from_utf8(data) {
        match Encoding::from_content_type(header) {
            Some(e) => assert!(Encoding::from_content_type(e.content_type()) == Some(e)),
            None => assert!(matches!(
                request::parse(b"", Some(header), Encoding::Protobuf),
                Err(RequestError::ContentType(_))
            )),
        }
    }
}

/// A valid request re-encoded in either encoding decodes to itself, and is still valid.
fn round_trips(r: &InspectionRequest) {
    let protobuf = r.encode_to_vec();
    let again = request::decode(&protobuf, Some("application/x-protobuf"), Encoding::Json)
        .expect("a valid request re-encoded as protobuf decodes");
    assert_eq!(&again, r, "protobuf round trip");
    let json = serde_json::to_vec(r).expect("a valid request serialises as JSON");
    let again = request::decode(&json, Some("application/json"), Encoding::Protobuf)
        .unwrap_or_else(|e| {
            panic!(
                "a valid request re-encoded as JSON does not decode: {e}: {}",
                String::from_utf8_lossy(&json)
            )
        });
    assert_eq!(&again, r, "JSON round trip");
}

/// The ERROR verdict and dead letter the worker publishes for a failed request.
fn answer(request: Option<&InspectionRequest>, failure: &Failure) {
    let source = SourceRecord {
        topic: "clipqc.requests".into(),
        partition: 3,
        offset: 1234,
    };
    let v = verdict::failed(
        request,
        failure,
        &ModelInfo::default(),
        source.clone(),
        StageLatencies::default(),
        SystemTime::now(),
    );
    let protobuf = v.encode_to_vec();
    let json = serde_json::to_vec(&v).expect("an ERROR verdict serialises as JSON");
    let shrunk = verdict::shrunk(&v, failure);
    serde_json::to_vec(&shrunk).expect("a shrunk verdict serialises as JSON");
    let small = shrunk.encode_to_vec();
    assert!(
        small.len() <= SHRUNK_MAX_BYTES,
        "the shrunk verdict is {} bytes (the full one {} protobuf, {} JSON)",
        small.len(),
        protobuf.len(),
        json.len()
    );
    let headers = verdict::dlq_headers(&source, failure);
    assert!(headers.iter().all(|(k, _)| !k.is_empty()));
}
