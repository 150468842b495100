//! The request stage: a record's payload to a validated [`InspectionRequest`].
//!
//! Guarantees: the encoding is chosen by the record's `content-type` header
//! (`application/x-protobuf` or `application/json`, parameters ignored) or, without one, by
//! the configured default; JSON follows the proto3 JSON mapping; a request that cannot serve
//! an inspection (no id, no image, an empty region) is refused with the reason, so it becomes
//! an ERROR verdict and a dead letter instead of a guess.

use serde::Deserialize;

pub use crate::proto::v1::{inspection_request::Image, InspectionRequest};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    #[default]
    Protobuf,
    Json,
}

impl Encoding {
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let mime = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match mime.as_str() {
            "application/x-protobuf"
            | "application/protobuf"
            | "application/vnd.google.protobuf" => Some(Self::Protobuf),
            "application/json" => Some(Self::Json),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Protobuf => "application/x-protobuf",
            Self::Json => "application/json",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(
        "unsupported content-type {0:?} (expected application/x-protobuf or application/json)"
    )]
    ContentType(String),
    #[error("payload is not a valid protobuf InspectionRequest: {0}")]
    Protobuf(String),
    #[error("payload is not a valid JSON InspectionRequest: {0}")]
    Json(String),
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// Decode and validate one payload.
pub fn decode(
    payload: &[u8],
    content_type: Option<&str>,
    default: Encoding,
) -> Result<InspectionRequest, RequestError> {
    let request = parse(payload, content_type, default)?;
    validate(&request)?;
    Ok(request)
}

/// Decode one payload without validating it (see [`validate`]).
pub fn parse(
    payload: &[u8],
    content_type: Option<&str>,
    default: Encoding,
) -> Result<InspectionRequest, RequestError> {
    let encoding = match content_type {
        Some(ct) => Encoding::from_content_type(ct)
            .ok_or_else(|| RequestError::ContentType(ct.to_string()))?,
        None => default,
    };
    let request = match encoding {
        Encoding::Protobuf => <InspectionRequest as prost::Message>::decode(payload)
            .map_err(|e| RequestError::Protobuf(e.to_string()))?,
        Encoding::Json => {
            serde_json::from_slice(payload).map_err(|e| RequestError::Json(e.to_string()))?
        }
    };
    Ok(request)
}

/// The longest id (request, camera, line, profile) a request may carry: ids become keys of
/// the worker's memory (line memory, rate windows), metric labels and verdict records, so a
/// megabyte id would hold a megabyte in each.
pub const MAX_ID_BYTES: usize = 256;

/// What of an invalid request a verdict may echo: everything but timestamps outside the
/// range a verdict can carry, and ids cut to [`MAX_ID_BYTES`] (ending in `…`).
pub fn echoable(mut r: InspectionRequest) -> InspectionRequest {
    for t in [&mut r.captured_at, &mut r.deadline] {
        if t.as_ref().is_some_and(|t| check_timestamp("", t).is_err()) {
            *t = None;
        }
    }
    for id in [
        &mut r.request_id,
        &mut r.camera_id,
        &mut r.line_id,
        &mut r.profile,
    ] {
        if id.len() > MAX_ID_BYTES {
            let mut cut = MAX_ID_BYTES - '…'.len_utf8();
            while !id.is_char_boundary(cut) {
                cut -= 1;
            }
            id.truncate(cut);
            id.push('…');
        }
    }
    r
}

pub fn validate(r: &InspectionRequest) -> Result<(), RequestError> {
    let invalid = |m: &str| Err(RequestError::Invalid(m.to_string()));
    if r.request_id.trim().is_empty() {
        return invalid("request_id is empty");
    }
    for (name, id) in [
        ("request_id", &r.request_id),
        ("camera_id", &r.camera_id),
        ("line_id", &r.line_id),
        ("profile", &r.profile),
    ] {
        if id.len() > MAX_ID_BYTES {
            return Err(RequestError::Invalid(format!(
                "{name} is {} bytes long (at most {MAX_ID_BYTES})",
                id.len()
            )));
        }
    }
    match &r.image {
        None => return invalid("no image: set uri or inline_data"),
        Some(Image::Uri(u)) if u.trim().is_empty() => return invalid("image uri is empty"),
        Some(Image::InlineData(d)) if d.is_empty() => return invalid("inline_data is empty"),
        Some(_) => {}
    }
    if let Some(region) = &r.region {
        if region.width == 0 || region.height == 0 {
            return invalid("region of interest has zero width or height");
        }
    }
    for (name, t) in [("captured_at", &r.captured_at), ("deadline", &r.deadline)] {
        if let Some(t) = t {
            check_timestamp(name, t)?;
        }
    }
    Ok(())
}

/// The range protobuf's Timestamp allows (0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z, nanos
/// 0..1e9): the JSON mapping cannot write a time outside it, and time arithmetic on one
/// could overflow.
const TIMESTAMP_SECONDS: std::ops::RangeInclusive<i64> = -62_135_596_800..=253_402_300_799;

fn check_timestamp(name: &str, t: &pbjson_types::Timestamp) -> Result<(), RequestError> {
    if !TIMESTAMP_SECONDS.contains(&t.seconds) || !(0..1_000_000_000).contains(&t.nanos) {
        return Err(RequestError::Invalid(format!(
            "{name} is not a valid time (seconds {}, nanos {}): it must lie between years 1 and 9999, nanos 0 to 999999999",
            t.seconds, t.nanos
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn sample() -> InspectionRequest {
        InspectionRequest {
            request_id: "r-1".into(),
            camera_id: "cam-7".into(),
            line_id: "line-2".into(),
            profile: "default".into(),
            image: Some(Image::Uri("http://127.0.0.1:8080/a.jpg".into())),
            attributes: [("sku".to_string(), "B-17".to_string())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn protobuf_round_trips() {
        let r = sample();
        let bytes = r.encode_to_vec();
        assert_eq!(
            decode(&bytes, Some("application/x-protobuf"), Encoding::Json).unwrap(),
            r
        );
        assert_eq!(decode(&bytes, None, Encoding::Protobuf).unwrap(), r);
    }

    #[test]
    fn json_accepts_proto_names_and_lower_camel_case() {
        let camel =
            br#"{"requestId":"r-1","cameraId":"cam-7","lineId":"line-2","profile":"default",
            "uri":"http://127.0.0.1:8080/a.jpg","attributes":{"sku":"B-17"}}"#;
        let snake =
            br#"{"request_id":"r-1","camera_id":"cam-7","line_id":"line-2","profile":"default",
            "uri":"http://127.0.0.1:8080/a.jpg","attributes":{"sku":"B-17"}}"#;
        for payload in [&camel[..], &snake[..]] {
            assert_eq!(
                decode(
                    payload,
                    Some("application/json; charset=utf-8"),
                    Encoding::Protobuf
                )
                .unwrap(),
                sample()
            );
        }
        // bytes are base64 in the JSON mapping; timestamps RFC 3339.
        let inline =
            br#"{"requestId":"r-2","inlineData":"/9j/4A==","capturedAt":"2026-11-26T08:00:00.250Z",
            "region":{"x":1,"y":2,"width":30,"height":40}}"#;
        let r = decode(inline, Some("application/json"), Encoding::Protobuf).unwrap();
        assert_eq!(
            r.image,
            Some(Image::InlineData(vec![0xff, 0xd8, 0xff, 0xe0]))
        );
        let ts = r.captured_at.unwrap();
        assert_eq!((ts.seconds, ts.nanos), (1_795_680_000, 250_000_000));
        assert_eq!(r.region.unwrap().height, 40);
    }

    #[test]
    fn bad_payloads_say_why() {
        let e = decode(b"\xff\xff\xff", None, Encoding::Protobuf).unwrap_err();
        assert!(
            e.to_string().starts_with("payload is not a valid protobuf"),
            "{e}"
        );
        let e = decode(b"{not json", Some("application/json"), Encoding::Protobuf).unwrap_err();
        assert!(
            e.to_string().starts_with("payload is not a valid JSON"),
            "{e}"
        );
        let e = decode(b"{}", Some("text/plain"), Encoding::Protobuf).unwrap_err();
        assert!(e.to_string().contains("\"text/plain\""), "{e}");
        let e = decode(
            br#"{"requestId":"x"}"#,
            Some("application/json"),
            Encoding::Protobuf,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid request: no image: set uri or inline_data"
        );
        let e = decode(
            br#"{"uri":"http://a/b.jpg"}"#,
            Some("application/json"),
            Encoding::Protobuf,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "invalid request: request_id is empty");
        let e = decode(
            br#"{"requestId":"x","uri":"u","region":{"width":0,"height":3}}"#,
            Some("application/json"),
            Encoding::Protobuf,
        )
        .unwrap_err();
        assert!(e.to_string().contains("zero width"), "{e}");
    }

    #[test]
    fn timestamps_outside_the_protobuf_range_are_refused() {
        use pbjson_types::Timestamp;
        for (seconds, nanos) in [
            (i64::MAX, 0),
            (i64::MIN, 0),
            (253_402_300_800, 0),
            (0, -1),
            (0, 1_000_000_000),
        ] {
            for field in ["captured_at", "deadline"] {
                let mut r = sample();
                let t = Some(Timestamp { seconds, nanos });
                if field == "deadline" {
                    r.deadline = t;
                } else {
                    r.captured_at = t;
                }
                let e = decode(&r.encode_to_vec(), None, Encoding::Protobuf).unwrap_err();
                assert!(
                    e.to_string()
                        .starts_with(&format!("invalid request: {field} is not a valid time")),
                    "{e}"
                );
            }
        }
        let mut r = sample();
        r.deadline = Some(Timestamp {
            seconds: 253_402_300_799,
            nanos: 999_999_999,
        });
        r.captured_at = Some(Timestamp {
            seconds: -62_135_596_800,
            nanos: 0,
        });
        assert!(decode(&r.encode_to_vec(), None, Encoding::Protobuf).is_ok());
    }

    /// Ids over 256 bytes are refused, naming the field; the verdict echoes them cut (on a
    /// character boundary), so it stays small enough to publish.
    #[test]
    fn ids_over_the_limit_are_refused_and_echoed_cut() {
        for field in ["request_id", "camera_id", "line_id", "profile"] {
            let mut r = sample();
            let long = "é".repeat(MAX_ID_BYTES);
            match field {
                "request_id" => r.request_id = long,
                "camera_id" => r.camera_id = long,
                "line_id" => r.line_id = long,
                _ => r.profile = long,
            }
            let err = validate(&r).unwrap_err().to_string();
            assert!(err.contains(field) && err.contains("512 bytes"), "{err}");
            let echoed = echoable(r);
            for id in [
                &echoed.request_id,
                &echoed.camera_id,
                &echoed.line_id,
                &echoed.profile,
            ] {
                assert!(id.len() <= MAX_ID_BYTES, "{field}: {} bytes", id.len());
            }
        }
        let mut r = sample();
        r.camera_id = "c".repeat(MAX_ID_BYTES);
        assert!(validate(&r).is_ok(), "at the limit");
    }
}
