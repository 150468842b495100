//! Dead letters: the original record, key, payload and headers, plus Kafka Connect style
//! error headers ([`super::dead_letter_headers`]); or, when a topic refuses that for its size,
//! *trimmed*: without its payload (header `clipqc-payload-dropped`: its size), its key cut to
//! [`TRIMMED_KEY_BYTES`] (`clipqc-key-truncated`: the key's size), only the original headers
//! that fit [`TRIMMED_HEADER_BYTES`] each and [`TRIMMED_HEADERS_TOTAL`] together
//! (`clipqc-headers-dropped`: how many were left out, `clipqc-headers-dropped-bytes`: their
//! size), and the error message cut to 4 KiB. A trimmed dead letter is some 20 KiB at most
//! whatever the record held, so no topic with a sane limit refuses it for its size.

use rdkafka::message::{Headers, Message};
use tokio_util::sync::CancellationToken;

use super::outbox::OwnedRecord;
use crate::proto::v1::SourceRecord;
use crate::verdict::{dlq_headers, Failure};

/// A trimmed dead letter's key is cut to this many bytes.
pub const TRIMMED_KEY_BYTES: usize = 1024;
/// A trimmed dead letter keeps an original header only if its name and value together are
/// at most this many bytes...
pub const TRIMMED_HEADER_BYTES: usize = 1024;
/// ...and while the original headers kept total at most this many.
pub const TRIMMED_HEADERS_TOTAL: usize = 16 * 1024;
/// A trimmed dead letter's error message (`__connect.errors.exception.message`) is cut here.
const TRIMMED_MESSAGE_BYTES: usize = 4096;

/// The dead letter of `msg` on `topic`: whole, or trimmed when `whole` is false.
pub fn record(
    topic: &str,
    msg: &impl Message,
    source: &SourceRecord,
    failure: &Failure,
    whole: bool,
) -> OwnedRecord {
    let payload = msg.payload().unwrap_or_default();
    if whole {
        return OwnedRecord {
            topic: topic.to_string(),
            key: msg.key().map(<[u8]>::to_vec),
            payload: payload.to_vec(),
            headers: super::dead_letter_headers(msg, source, failure),
        };
    }
    let mut headers = Vec::new();
    let (mut kept, mut dropped, mut dropped_bytes) = (0, 0, 0);
    for h in msg.headers().into_iter().flat_map(|h| h.iter()) {
        let size = h.key.len() + h.value.map_or(0, <[u8]>::len);
        if size <= TRIMMED_HEADER_BYTES && kept + size <= TRIMMED_HEADERS_TOTAL {
            kept += size;
            headers.push((h.key.to_string(), h.value.unwrap_or_default().to_vec()));
        } else {
            dropped += 1;
            dropped_bytes += size;
        }
    }
    for (name, mut value) in dlq_headers(source, failure) {
        if value.len() > TRIMMED_MESSAGE_BYTES {
            let mut cut = TRIMMED_MESSAGE_BYTES;
            while !value.is_char_boundary(cut) {
                cut -= 1;
            }
            value.truncate(cut);
            value.push('…');
        }
        headers.push((name.to_string(), value.into_bytes()));
    }
    let mut note = |name: &str, n: usize| headers.push((name.into(), n.to_string().into_bytes()));
    if !payload.is_empty() {
        note("clipqc-payload-dropped", payload.len());
    }
    let mut key = msg.key().map(<[u8]>::to_vec);
    if let Some(k) = key.as_mut().filter(|k| k.len() > TRIMMED_KEY_BYTES) {
        note("clipqc-key-truncated", k.len());
        k.truncate(TRIMMED_KEY_BYTES);
    }
    if dropped > 0 {
        note("clipqc-headers-dropped", dropped);
        note("clipqc-headers-dropped-bytes", dropped_bytes);
    }
    OwnedRecord {
        topic: topic.to_string(),
        key,
        payload: Vec::new(),
        headers,
    }
}

impl super::Sink {
    /// Publish `msg`'s dead letter on `topic`, acknowledged: whole, or trimmed if the topic
    /// refuses it for its size (the request pipeline and the feedback loop both send theirs
    /// this way).
    pub async fn send_dead_letter(
        &self,
        topic: &str,
        msg: &(impl Message + Sync),
        source: &SourceRecord,
        failure: &Failure,
        abort: &CancellationToken,
    ) -> Result<(), super::SendError> {
        let whole = record(topic, msg, source, failure, true);
        match self.send_owned(&whole, abort).await {
            Err(e) if e.too_large() => {
                tracing::warn!(topic, bytes = whole.size(),
                    "dead letter too large for its topic: sending it trimmed (no payload, key and headers cut)");
                let trimmed = record(topic, msg, source, failure, false);
                self.send_owned(&trimmed, abort).await
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};

    use super::*;
    use crate::proto::v1::ErrorCode;
    use crate::verdict::Stage;

    fn header<'a>(r: &'a OwnedRecord, name: &str) -> Option<&'a [u8]> {
        r.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Whatever a record carries (a 1 MiB key, 1 MiB of headers, a 1 MiB error message), its
    /// trimmed dead letter is small and says what was cut; small headers are kept whole.
    #[test]
    fn a_trimmed_dead_letter_is_small_whatever_the_record_carried() {
        let bulk = vec![b'h'; 64 << 10];
        let mut headers = OwnedHeaders::new().insert(Header {
            key: "x-keep",
            value: Some("yes"),
        });
        for _ in 0..16 {
            headers = headers.insert(Header {
                key: "x-bulk",
                value: Some(&bulk),
            });
        }
        let msg = OwnedMessage::new(
            Some(vec![b'p'; 10]),
            Some(vec![b'k'; 1 << 20]),
            "clipqc.requests".into(),
            Timestamp::NotAvailable,
            3,
            42,
            Some(headers),
        );
        let source = SourceRecord {
            topic: "clipqc.requests".into(),
            partition: 3,
            offset: 42,
        };
        let failure = Failure::new(
            ErrorCode::InvalidRequest,
            Stage::DecodeRequest,
            "é".repeat(1 << 19),
        );
        let whole = record("dlq", &msg, &source, &failure, true);
        assert!(whole.size() > 2 << 20);
        let r = record("dlq", &msg, &source, &failure, false);
        assert!(r.size() < 24 << 10, "{} bytes", r.size());
        assert_eq!(r.topic, "dlq");
        assert!(r.payload.is_empty());
        assert_eq!(r.key.as_ref().map(Vec::len), Some(TRIMMED_KEY_BYTES));
        assert_eq!(header(&r, "clipqc-key-truncated"), Some(&b"1048576"[..]));
        assert_eq!(header(&r, "clipqc-payload-dropped"), Some(&b"10"[..]));
        assert_eq!(header(&r, "clipqc-headers-dropped"), Some(&b"16"[..]));
        let dropped = (16 * ("x-bulk".len() + bulk.len())).to_string();
        assert_eq!(
            header(&r, "clipqc-headers-dropped-bytes"),
            Some(dropped.as_bytes())
        );
        assert_eq!(header(&r, "x-keep"), Some(&b"yes"[..]));
        let message = header(&r, "__connect.errors.exception.message").unwrap();
        let message = std::str::from_utf8(message).expect("cut on a character boundary");
        assert!(message.len() <= TRIMMED_MESSAGE_BYTES + 3 && message.ends_with('…'));
        assert_eq!(
            header(&r, "__connect.errors.offset"),
            Some(&b"42"[..]),
            "the coordinates of the original are kept"
        );
        // A small record trimmed loses its payload only.
        let small = OwnedMessage::new(
            Some(vec![b'p'; 10]),
            Some(b"cam-1".to_vec()),
            "clipqc.requests".into(),
            Timestamp::NotAvailable,
            3,
            42,
            None,
        );
        let r = record("dlq", &small, &source, &failure, false);
        assert_eq!(r.key.as_deref(), Some(&b"cam-1"[..]));
        assert!(header(&r, "clipqc-key-truncated").is_none());
        assert!(header(&r, "clipqc-headers-dropped").is_none());
    }
}
