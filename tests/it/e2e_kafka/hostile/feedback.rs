//! Feedback records at their extremes and with fields missing, on the worker's feedback
//! topic beside the campaign's requests: each must be refused and dead-lettered (stage
//! `feedback`, naming its own coordinates), the feedback group must commit past every one,
//! and none may teach the bank.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clipqc::proto::v1::{feedback::Image, Feedback};
use pbjson_types::Timestamp;
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// One feedback record: its description and payload (JSON when `json`).
pub struct FeedbackCase {
    pub what: &'static str,
    pub payload: Vec<u8>,
    pub json: bool,
}

fn at(seconds: i64, nanos: i32) -> Option<Timestamp> {
    Some(Timestamp { seconds, nanos })
}

/// Every case: none of them may become an exemplar.
pub fn cases(jpeg: &[u8]) -> Vec<FeedbackCase> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let good = Feedback {
        request_id: "fb".into(),
        image: Some(Image::InlineData(jpeg.to_vec())),
        profile: "default".into(),
        true_class: "good".into(),
        operator: "ana".into(),
        decided_at: at(now, 0),
        ..Default::default()
    };
    let with = |f: &dyn Fn(&mut Feedback)| {
        let mut fb = good.clone();
        f(&mut fb);
        fb.encode_to_vec()
    };
    let proto = |what, payload| FeedbackCase {
        what,
        payload,
        json: false,
    };
    vec![
        proto("no operator", with(&|f| f.operator.clear())),
        proto("a 1 MB operator", with(&|f| f.operator = "o".repeat(1_000_000))),
        proto("an operator with control characters", with(&|f| f.operator = "ana\u{7}".into())),
        proto("decided in year 9999", with(&|f| f.decided_at = at(253_402_300_799, 0))),
        proto("decided 10 minutes ahead", with(&|f| f.decided_at = at(now + 600, 0))),
        proto("decided at i64::MAX", with(&|f| f.decided_at = at(i64::MAX, i32::MAX))),
        proto("negative nanos", with(&|f| f.decided_at = at(now, -1))),
        proto(
            "decided before its verdict",
            with(&|f| f.verdict_decided_at = at(now + 60, 0)),
        ),
        proto("an unknown profile", with(&|f| f.profile = "nope".into())),
        proto("an unknown class", with(&|f| f.true_class = "nope".into())),
        proto("no image", with(&|f| f.image = None)),
        proto("no profile", with(&|f| f.profile.clear())),
        proto("not protobuf", vec![0xff; 64]),
        FeedbackCase {
            what: "JSON with nothing in it",
            payload: b"{}".to_vec(),
            json: true,
        },
        FeedbackCase {
            what: "JSON that is not JSON",
            payload: b"{\"operator\": ".to_vec(),
            json: true,
        },
    ]
}

/// Publish `cases` to partition 0 of `topic`, in order.
pub fn publish(brokers: &str, topic: &str, cases: &[FeedbackCase]) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.max.bytes", "1048000")
        .create()
        .unwrap();
    for c in cases {
        let mut record = FutureRecord::<(), [u8]>::to(topic)
            .partition(0)
            .payload(&c.payload);
        if c.json {
            record = record.headers(OwnedHeaders::new().insert(Header {
                key: "content-type",
                value: Some("application/json"),
            }));
        }
        runtime
            .block_on(producer.send(record, Duration::from_secs(30)))
            .unwrap_or_else(|(e, _)| panic!("publishing feedback {}: {e}", c.what));
    }
}
