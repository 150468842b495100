//! Faults that come with a record or a component, not with the broker: records that panicked
//! their task or resized to gigabytes, verdicts and dead letters the producer may not send, a
//! dead-letter topic that refuses records, a byte budget a few large images could deadlock, a
//! consumer with a fatal error, a backend that answers with too few rows. Each once stalled a
//! partition or left a worker alive doing nothing.

use super::*;

/// Records that used to panic their task (timestamps no clock can hold), to be retried
/// forever (a verdict, and a dead letter, larger than the producer may send) or to resize to
/// gigabytes (a 16000×1 frame) among good ones: each gets one ERROR verdict and a dead letter, and every partition is committed to
/// its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_timestamps_and_oversized_verdicts_are_answered_and_the_partitions_move_on() {
    use clipqc::proto::v1::inspection_request::Image;
    use pbjson_types::Timestamp;

    let (_mock, settings, brokers) = cluster("clipqc-hostile");
    let jpeg = std::fs::read(common::fixtures().join("images/part_250.jpg")).unwrap();
    let request = |id: &str| inline_request(id, &jpeg);
    let mut requests = Vec::new();
    let mut expected: HashMap<String, Option<ErrorCode>> = HashMap::new();
    for i in 0..12 {
        let id = format!("good-{i}");
        requests.push(request(&id));
        expected.insert(id, None);
    }
    for (i, t) in [(i64::MAX, 0), (i64::MIN, 0), (0, -5), (253_402_300_800, 0)]
        .into_iter()
        .enumerate()
    {
        let mut deadline = request(&format!("deadline-{i}"));
        deadline.deadline = Some(Timestamp {
            seconds: t.0,
            nanos: t.1,
        });
        let mut captured = request(&format!("captured-{i}"));
        captured.captured_at = Some(Timestamp {
            seconds: t.0,
            nanos: t.1,
        });
        for r in [deadline, captured] {
            expected.insert(r.request_id.clone(), Some(ErrorCode::InvalidRequest));
            requests.push(r);
        }
    }
    // A 16000×1 frame: resized so its shorter side fits the model it would be gigabytes.
    let mut png = std::io::Cursor::new(Vec::new());
    image::GrayImage::new(16000, 1)
        .write_to(&mut png, image::ImageFormat::Png)
        .unwrap();
    let mut line = request("line");
    line.image = Some(Image::InlineData(png.into_inner()));
    expected.insert("line".into(), Some(ErrorCode::TooLarge));
    requests.push(line);
    // 300 KB of attributes, echoed into the verdict: over the worker's 200 KB producer limit
    // below, and so is the record itself as a dead letter.
    let mut bulky = request("bulky");
    bulky.attributes.insert("notes".into(), "n".repeat(300_000));
    expected.insert("bulky".into(), Some(ErrorCode::PublishFailed));
    requests.push(bulky);
    publish_requests(&brokers, &requests, false).await;

    let mut small_producer = settings.kafka.clone();
    small_producer
        .properties
        .insert("message.max.bytes".into(), "200000".into());
    let total = requests.len();
    let (_, seen, state) = verdicts_of(
        &settings,
        &brokers,
        slow_model(Duration::from_millis(5)),
        |d| d.sink = clipqc::sink::Sink::new(&small_producer, &brokers).unwrap(),
        total,
    )
    .await;

    let by_id: HashMap<String, &Verdict> = seen
        .by_source
        .values()
        .map(|v| (v.request_id.clone(), v))
        .collect();
    for (id, code) in &expected {
        let v = by_id
            .get(id)
            .unwrap_or_else(|| panic!("no verdict for {id}"));
        match code {
            None => assert_ne!(v.outcome(), Outcome::Error, "{id}: {:?}", v.error),
            Some(code) => {
                assert_eq!(v.outcome(), Outcome::Error, "{id}");
                assert_eq!(
                    v.error.as_ref().unwrap().code(),
                    *code,
                    "{id}: {:?}",
                    v.error
                );
            }
        }
    }
    assert!(
        by_id["bulky"].attributes.is_empty(),
        "the small verdict echoes no attributes"
    );
    assert_eq!(seen.by_source.len(), total, "{state}");
    assert_eq!(seen.duplicates(), 0);

    let errors = expected.values().filter(|c| c.is_some()).count();
    let dead = read_all(&brokers, "clipqc.dlq", |b| b.len());
    assert_eq!(dead.len(), errors, "one dead letter per ERROR verdict");
    assert!(
        dead.iter().any(|(_, _, len)| *len == 0),
        "the bulky record's dead letter went without its payload"
    );
    assert_eq!(
        committed(&brokers, "clipqc-hostile"),
        ends(&brokers, "clipqc.requests"),
        "every partition committed to its end"
    );
}

/// One record used to crash-loop the group: a bad payload whose key, or headers, alone are
/// over the producer's `message.max.bytes` (1 MiB each; 1,000,000 by default) makes a dead
/// letter too large even without its payload; the refusal stopped the worker without
/// committing, and every worker that took the partition after it. Now the dead letter goes
/// trimmed (key cut, bulky headers left out, both said in headers), every record gets its
/// verdict, and every partition is committed to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_key_or_headers_gets_a_trimmed_dead_letter_and_the_partition_moves_on() {
    let (_mock, settings, brokers) = cluster("clipqc-megabyte");
    publish_inline(&brokers, "good", 6).await;
    publish_megabyte_key_and_headers(&brokers).await;
    publish_inline(&brokers, "after", 6).await;
    let (_, seen, state) = verdicts_of(
        &settings,
        &brokers,
        slow_model(Duration::ZERO),
        |_| {},
        14,
    )
    .await;
    assert_eq!(seen.by_source.len(), 14, "{state}");
    let errors: Vec<&Verdict> = seen
        .by_source
        .values()
        .filter(|v| v.outcome() == Outcome::Error)
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors
        .iter()
        .all(|v| v.error.as_ref().unwrap().code() == ErrorCode::InvalidRequest));
    assert_trimmed_dead_letters(&brokers);
    assert_eq!(
        committed(&brokers, "clipqc-megabyte"),
        ends(&brokers, "clipqc.requests"),
        "every partition committed to its end"
    );
}

/// A dead-letter topic the worker may not write to: every failing record would be stuck, so
/// the worker stops by itself with an error naming the topic, without committing the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_topic_that_refuses_records_stops_the_worker() {
    let (mock, settings, brokers) = cluster("clipqc-dlq-refused");
    mock.topic_error(
        "clipqc.dlq",
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
    )
    .unwrap();
    let not_an_image = inline_request("not-an-image", b"GIF89a, not really");
    publish_requests(&brokers, &[not_an_image], false).await;
    let err = stops_by_itself(&settings, &brokers, slow_model(Duration::ZERO), |_| {}).await;
    assert!(
        err.to_string()
            .starts_with("the dead-letter topic \"clipqc.dlq\" refuses records"),
        "{err}"
    );
    assert_eq!(
        committed_total(&brokers, "clipqc-dlq-refused"),
        0,
        "the record without its dead letter stays uncommitted"
    );
}

/// Inline images each about a third of the byte budget, many at once: records that held
/// their payload's share while waiting for room for the image and pixels deadlocked the
/// worker (each waiting for room only the others could free). Every record must finish, and
/// the budget holds.
///
/// The wait is for the eighth verdict, with at most 60 s ([`PATIENCE`]) between two verdicts:
/// the records pass one at a time (each needs the whole budget), and one takes well under a second here
/// (a 480×480 PNG decoded, 5 ms in the fake model), so 60 s without a verdict is a stall, not
/// a slow machine. It failed so once under the full suite with "records: 7": the eighth
/// record never left the consumer, though fetched with the rest within milliseconds of the
/// assignment; a missed queue wakeup parks rust-rdkafka's stream for 150 s (see
/// wakeups.rs, which now shows that stall deterministically). On a failure the message
/// carries the pipeline's state: where each record was, and librdkafka's queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_inline_images_cannot_deadlock_a_small_byte_budget() {
    let (_mock, settings, brokers) = cluster("clipqc-budget");
    // Noise does not compress: a 480×480 RGB PNG is about 0.7 MB (the mock broker takes
    // records up to 1 MB).
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let noise = image::RgbImage::from_fn(480, 480, |_, _| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        image::Rgb([state as u8, (state >> 8) as u8, (state >> 16) as u8])
    });
    let mut png = std::io::Cursor::new(Vec::new());
    noise.write_to(&mut png, image::ImageFormat::Png).unwrap();
    let png = png.into_inner();
    assert!(png.len() > 650_000, "{} bytes", png.len());
    let total = 8;
    let requests: Vec<_> = (0..total)
        .map(|i| inline_request(&format!("big-{i}"), &png))
        .collect();
    publish_requests(&brokers, &requests, false).await;
    // One record needs payload + image + pixels, about 2 MB; two holding their payloads
    // while waiting for the rest could never both go on.
    let budget = 2 << 20;
    let model = slow_model(Duration::from_millis(5));
    let (stats, seen, state) = verdicts_of(
        &settings,
        &brokers,
        model,
        slots_and_bytes(8, budget),
        total,
    )
    .await;
    assert_eq!(
        seen.by_source.len(),
        total,
        "every record finished: {stats:?}; {state}"
    );
    assert!(seen
        .by_source
        .values()
        .all(|v| v.outcome() != Outcome::Error));
    assert!(stats.peak_in_flight_bytes <= budget, "{stats:?}");
    assert_eq!(committed_total(&brokers, "clipqc-budget"), total as i64);
}

/// A consumer that hits a fatal error (librdkafka raises one for a fenced static member)
/// never gets a record again: the worker stops with the reason instead of polling it forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_consumer_error_stops_the_worker() {
    use rdkafka::consumer::Consumer as _;
    common::logs();
    let (_mock, settings, brokers) = cluster("clipqc-fatal");
    publish_inline(&brokers, "x", 3).await;
    let (owner, model) = slow_model(Duration::ZERO);
    let artifact = Artifact::open(common::tiny_model()).unwrap();
    let deps = deps(&settings, &brokers, &artifact, &model);
    // The consumer's handle, kept for the injection (it lives as long as the worker).
    let native = deps.consumer.client().native_ptr() as usize;
    let worker = Running::start(deps);
    let verdicts = reader(&brokers, "clipqc.verdicts");
    let seen = collect(&verdicts, 3, PATIENCE).await;
    assert_eq!(
        seen.by_source.len(),
        3,
        "the worker consumed before the fault; {}",
        worker.state()
    );
    let reason = std::ffi::CString::new("fenced by the test").unwrap();
    // SAFETY: the consumer is alive (the worker is running); librdkafka's own test hook.
    unsafe {
        rdkafka::bindings::rd_kafka_test_fatal_error(
            native as *mut rdkafka::bindings::rd_kafka_t,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_FENCED_INSTANCE_ID,
            reason.as_ptr(),
        );
    }
    // The error is the consumer's next event, which the worker looks for at least every
    // source::REPOLL (1 s); 60 s is a worker that polls the dead consumer forever.
    let result = worker
        .ended(Duration::from_secs(60), "a fatal error is the next event")
        .await;
    drop(model);
    owner.join();
    let err = result.expect_err("a fatal consumer error is an error of the worker");
    assert!(
        err.to_string()
            .starts_with("the Kafka consumer failed for good"),
        "{err}"
    );
    assert!(err.to_string().contains("fenced by the test"), "{err}");
}

/// A backend that returns fewer embeddings than the batch had images: indexing past the end
/// panicked the reply task and left the batch's records waiting forever. The worker now
/// declares the model broken and stops, the records left for a healthy worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_returning_too_few_rows_stops_the_worker() {
    let (_mock, settings, brokers) = cluster("clipqc-rows");
    publish_inline(&brokers, "r", 6).await;
    let model = fake_model(|fake| fake.short_by_one = true);
    let err = stops_by_itself(&settings, &brokers, model, |_| {}).await;
    assert!(
        err.to_string().contains("embeddings for a batch of"),
        "{err}"
    );
    assert_eq!(
        committed_total(&brokers, "clipqc-rows"),
        0,
        "no record was blamed for the model's fault"
    );
}

/// One transient model failure (a CUDA out-of-memory) used to turn its whole batch of
/// healthy records into committed ERROR verdicts. The failed batch is now retried in halves:
/// every record gets its real verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_model_failure_costs_no_record_its_verdict() {
    let (_mock, mut settings, brokers) = cluster("clipqc-transient");
    settings.batch.max_size = 8;
    settings.batch.max_delay_ms = 1000;
    let total = 8;
    publish_inline(&brokers, "t", total).await;
    let model = fake_model(|fake| fake.fail_first = 1);
    let (_, seen, state) = verdicts_of(&settings, &brokers, model, |_| {}, total).await;
    assert_eq!(seen.by_source.len(), total, "{state}");
    let errors: Vec<_> = seen
        .by_source
        .values()
        .filter(|v| v.outcome() == Outcome::Error)
        .map(|v| (v.request_id.clone(), v.error.clone()))
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
}

/// One image the model fails on, batched with healthy ones: only its record gets
/// MODEL_FAILED (found by halving the batch); the others get their verdicts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_image_the_model_fails_on_gets_an_error() {
    let (_mock, mut settings, brokers) = cluster("clipqc-poison");
    settings.batch.max_size = 8;
    settings.batch.max_delay_ms = 1000;
    let jpeg = std::fs::read(common::fixtures().join("images/part_250.jpg")).unwrap();
    let mut white = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(64, 64, image::Rgb([255, 255, 255]))
        .write_to(&mut white, image::ImageFormat::Png)
        .unwrap();
    let mut requests: Vec<_> = (0..7)
        .map(|i| inline_request(&format!("part-{i}"), &jpeg))
        .collect();
    requests.insert(3, inline_request("white", &white.into_inner()));
    publish_requests(&brokers, &requests, false).await;
    // White normalises to about +1.9 per value under CLIP's mean and std; the part photo
    // averages far below.
    let model = fake_model(|fake| fake.fail_bright = Some(1.5));
    let (_, seen, state) = verdicts_of(&settings, &brokers, model, |_| {}, requests.len()).await;
    assert_eq!(seen.by_source.len(), requests.len(), "{state}");
    for v in seen.by_source.values() {
        if v.request_id == "white" {
            assert_eq!(
                v.error.as_ref().map(|e| e.code()),
                Some(ErrorCode::ModelFailed)
            );
        } else {
            assert_ne!(
                v.outcome(),
                Outcome::Error,
                "{}: {:?}",
                v.request_id,
                v.error
            );
        }
    }
}
