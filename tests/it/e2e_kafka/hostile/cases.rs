//! The campaign's inputs: what a case is, what its verdict may be, a seeded generator, and
//! the fuzzed kinds (random and structure-aware protobuf and JSON, mutated requests). Field
//! values and headers are in `fields`, images in `images`, URLs and files in `urls`.

use std::fmt;

use clipqc::proto::v1::{inspection_request::Image, InspectionRequest};
use prost::Message as _;

pub const PROTO: &str = "application/x-protobuf";
pub const JSON: &str = "application/json";

/// Error codes as the verdicts' JSON form names them.
pub const INVALID: &str = "ERROR_CODE_INVALID_REQUEST";
pub const UNKNOWN_PROFILE: &str = "ERROR_CODE_UNKNOWN_PROFILE";
pub const FAILED: &str = "ERROR_CODE_FETCH_FAILED";
pub const FORBIDDEN: &str = "ERROR_CODE_FETCH_FORBIDDEN";
pub const TOO_LARGE: &str = "ERROR_CODE_TOO_LARGE";
pub const DECODE: &str = "ERROR_CODE_DECODE_FAILED";
pub const DEADLINE: &str = "ERROR_CODE_DEADLINE_EXCEEDED";
pub const PUBLISH: &str = "ERROR_CODE_PUBLISH_FAILED";

/// What is wrong with an image, whichever way the decoder notices it.
pub const IMAGE: &[&str] = &[DECODE, TOO_LARGE];
/// Every code an input may legitimately earn: all but INTERNAL (a panic in the worker) and
/// MODEL_FAILED (the model is not the input's to break).
pub const ANY: &[&str] = &[
    INVALID,
    UNKNOWN_PROFILE,
    FAILED,
    FORBIDDEN,
    TOO_LARGE,
    DECODE,
    DEADLINE,
    PUBLISH,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    FuzzProtobuf,
    FuzzJson,
    Mutated,
    Extreme,
    Oversize,
    Headers,
    CorruptJpeg,
    CorruptPng,
    CorruptTiff,
    CorruptBmp,
    BombJpeg,
    BombPng,
    BombTiff,
    BombBmp,
    Aspect,
    ForbiddenUrl,
    Redirect,
    SlowBody,
    Fifo,
    Good,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

/// What a case's verdict may be: a decided verdict (PASS, DEFECT, REVIEW) when `pass`, or an
/// ERROR verdict with one of `codes` (and then a dead letter).
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    pub pass: bool,
    pub codes: &'static [&'static str],
}

impl Expect {
    pub const PASS: Self = Self {
        pass: true,
        codes: &[],
    };
    pub const ANYTHING: Self = Self {
        pass: true,
        codes: ANY,
    };

    pub const fn error(codes: &'static [&'static str]) -> Self {
        Self { pass: false, codes }
    }

    pub const fn pass_or(codes: &'static [&'static str]) -> Self {
        Self { pass: true, codes }
    }
}

/// One record to publish, and what its answer may be.
pub struct Case {
    pub kind: Kind,
    /// A short description, for failure messages.
    pub what: String,
    /// `None`: a record without a payload (a tombstone).
    pub payload: Option<Vec<u8>>,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The id the verdict must echo, when the request decodes.
    pub request_id: Option<String>,
    pub expect: Expect,
    /// Text that must not appear in the verdict or the dead letter's error headers (a URI's
    /// password or presigned signature, the body of a non-image response).
    pub secrets: &'static [&'static str],
}

impl Case {
    /// A protobuf request.
    pub fn proto(kind: Kind, what: impl Into<String>, r: &InspectionRequest, e: Expect) -> Self {
        Self::raw(kind, what, r.encode_to_vec(), Some(PROTO), e).echoing(r)
    }

    /// The same request in the proto3 JSON mapping.
    pub fn json(kind: Kind, what: impl Into<String>, r: &InspectionRequest, e: Expect) -> Self {
        let payload = serde_json::to_vec(r).unwrap();
        Self::raw(kind, what, payload, Some(JSON), e).echoing(r)
    }

    /// Bytes as they are, with `content_type` if given.
    pub fn raw(
        kind: Kind,
        what: impl Into<String>,
        payload: Vec<u8>,
        content_type: Option<&str>,
        expect: Expect,
    ) -> Self {
        Self {
            kind,
            what: what.into(),
            payload: Some(payload),
            key: None,
            headers: content_type
                .map(|ct| vec![("content-type".to_string(), ct.as_bytes().to_vec())])
                .unwrap_or_default(),
            request_id: None,
            expect,
            secrets: &[],
        }
    }

    fn echoing(mut self, r: &InspectionRequest) -> Self {
        self.request_id = Some(r.request_id.clone());
        self
    }
}

/// xorshift64*: deterministic inputs from a seed, without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    /// `min..max` random bytes.
    pub fn junk(&mut self, min: usize, max: usize) -> Vec<u8> {
        let n = min + self.below(max - min);
        self.bytes(n)
    }

    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }

    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            xs.swap(i, self.below(i + 1));
        }
    }
}

/// A well-formed request for `image`.
pub fn request(id: String, image: Image) -> InspectionRequest {
    InspectionRequest {
        request_id: id,
        camera_id: "cam-hostile".into(),
        line_id: "line-hostile".into(),
        image: Some(image),
        ..Default::default()
    }
}

/// Random bytes and structure-aware garbage as protobuf: unknown fields, wrong wire types,
/// lengths past the end, 10-byte varints, invalid UTF-8 in string fields.
pub fn fuzz_protobuf(rng: &mut Rng, n: usize, out: &mut Vec<Case>) {
    for i in 0..n {
        let (what, payload, ct) = match i % 5 {
            0 => ("random bytes", rng.junk(0, 2000), Some(PROTO)),
            1 => ("short random bytes", rng.junk(1, 17), Some(PROTO)),
            2 => ("random fields", random_fields(rng, false), Some(PROTO)),
            3 => (
                "known fields, random values",
                random_fields(rng, true),
                Some(PROTO),
            ),
            _ => ("random bytes, no content-type", rng.junk(0, 500), None),
        };
        out.push(Case::raw(
            Kind::FuzzProtobuf,
            format!("{what} #{i}"),
            payload,
            ct,
            Expect::ANYTHING,
        ));
    }
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn random_fields(rng: &mut Rng, known: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(12) {
        let field = if known {
            1 + rng.below(10) as u64
        } else {
            rng.next_u64() % (1 << 29)
        };
        // Every field of InspectionRequest is length-delimited (strings, bytes, messages).
        let wire = if known { 2 } else { rng.below(8) as u64 };
        varint(field << 3 | wire, &mut out);
        match wire {
            0 => varint(rng.next_u64(), &mut out),
            1 => out.extend(rng.bytes(8)),
            2 => {
                let len = rng.below(64);
                // Sometimes a length that runs past the end of the message.
                let said = if rng.below(8) == 0 { len + 1000 } else { len };
                varint(said as u64, &mut out);
                out.extend(rng.bytes(len));
            }
            5 => out.extend(rng.bytes(4)),
            _ => out.extend(rng.junk(0, 4)),
        }
    }
    out
}

/// Random bytes, random JSON, the request's keys with values of the wrong types, and nesting
/// deep enough to overflow a recursive parser's stack.
pub fn fuzz_json(rng: &mut Rng, n: usize, out: &mut Vec<Case>) {
    const KEYS: [&str; 12] = [
        "requestId",
        "request_id",
        "cameraId",
        "lineId",
        "profile",
        "uri",
        "inlineData",
        "capturedAt",
        "deadline",
        "region",
        "attributes",
        "unknownKey",
    ];
    for i in 0..n {
        let (what, payload, expect) = match i % 5 {
            0 => ("random bytes", rng.junk(0, 2000), Expect::ANYTHING),
            1 => {
                let v = random_json(rng, 0);
                ("random JSON", v.to_string().into_bytes(), Expect::ANYTHING)
            }
            2 => {
                let mut o = serde_json::Map::new();
                for _ in 0..1 + rng.below(6) {
                    o.insert(rng.pick(&KEYS).to_string(), random_json(rng, 3));
                }
                o.insert("requestId".into(), format!("fj-{i}").into());
                let v = serde_json::Value::Object(o);
                (
                    "request keys, random values",
                    v.to_string().into_bytes(),
                    Expect::ANYTHING,
                )
            }
            3 => {
                // At most 750 kB: records stay under the producer's 1 MB.
                let depth = [1_000, 10_000, 150_000][rng.below(3)];
                let open = if i % 2 == 0 { "[" } else { "{\"a\":" };
                let text = format!(
                    "{{\"requestId\":\"deep-{i}\",\"uri\":\"x\",\"attributes\":{}",
                    open.repeat(depth)
                );
                ("deep nesting", text.into_bytes(), Expect::error(&[INVALID]))
            }
            _ => {
                let mut text = format!("{{\"requestId\":\"fj-{i}\",\"uri\":\"");
                for _ in 0..rng.below(200) {
                    text.push(char::from_u32(rng.below(0x11_0000) as u32).unwrap_or('\u{fffd}'));
                }
                text.push_str("\"}");
                ("random unicode URI", text.into_bytes(), Expect::ANYTHING)
            }
        };
        out.push(Case::raw(
            Kind::FuzzJson,
            format!("{what} #{i}"),
            payload,
            Some(JSON),
            expect,
        ));
    }
}

fn random_json(rng: &mut Rng, depth: usize) -> serde_json::Value {
    use serde_json::Value;
    match rng.below(if depth > 4 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.below(2) == 0),
        2 => serde_json::json!(rng.next_u64() as i64),
        3 => serde_json::json!(f64::from_bits(rng.next_u64()) % 1e300),
        4 => Value::String(String::from_utf8_lossy(&rng.junk(0, 40)).into()),
        5 => Value::Array(
            (0..rng.below(5))
                .map(|_| random_json(rng, depth + 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..rng.below(5))
                .map(|k| (format!("k{k}"), random_json(rng, depth + 1)))
                .collect(),
        ),
    }
}

/// Valid requests (`base`, protobuf and JSON) truncated, bit-flipped, with bytes inserted,
/// deleted or repeated.
pub fn mutated(rng: &mut Rng, base: &[InspectionRequest], n: usize, out: &mut Vec<Case>) {
    for i in 0..n {
        let r = rng.pick(base);
        let (mut bytes, ct) = if i % 2 == 0 {
            (r.encode_to_vec(), PROTO)
        } else {
            (serde_json::to_vec(r).unwrap(), JSON)
        };
        let len = bytes.len();
        let at = rng.below(len);
        let what = match rng.below(5) {
            0 => {
                bytes.truncate(at);
                "truncated"
            }
            1 => {
                for _ in 0..1 + rng.below(8) {
                    let j = rng.below(len);
                    bytes[j] ^= 1 << rng.below(8);
                }
                "bits flipped"
            }
            2 => {
                let junk = rng.junk(1, 33);
                bytes.splice(at..at, junk);
                "bytes inserted"
            }
            3 => {
                let end = (at + 1 + rng.below(32)).min(len);
                bytes.drain(at..end);
                "bytes deleted"
            }
            _ => {
                let end = (at + 1 + rng.below(64)).min(len);
                let piece = bytes[at..end].to_vec();
                bytes.splice(at..at, piece);
                "range repeated"
            }
        };
        out.push(Case::raw(
            Kind::Mutated,
            format!("{ct} {what} #{i}"),
            bytes,
            Some(ct),
            Expect::ANYTHING,
        ));
    }
}
