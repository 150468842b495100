//! The segment stage through the pipeline: DEFECT and REVIEW verdicts of a segmenting
//! profile carry masks at the upright frame's size, prompted by the region of interest; the
//! profile's area rule turns a too-small defect into REVIEW; and when the segmentation queue
//! is full the verdict goes out at once without masks, saying so, while SAM is still busy.

use std::sync::{Arc, Mutex};

use clipqc::model::artifact::Interpolation;
use clipqc::model::fake::Gate;
use clipqc::model::Artifact;
use clipqc::pipeline;
use clipqc::proto::v1::{InspectionRequest, Outcome, RegionOfInterest, Verdict};
use clipqc::segment::artifact::{SamImageSettings, SamPad, SamResize};
use clipqc::segment::{
    Mask, SamBox, SamInput, SamPreprocessor, Segment, SegmentError, SegmentOwner, Segmenter,
};
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::Message;

use super::common;
use super::common::kafka::*;

/// Holds every frame at `gate`; then answers one mask per box with only the top-left pixel
/// set (area 1), and records what it was given.
struct GatedSegmenter {
    gate: Gate,
    seen: Arc<Mutex<Vec<SamInput>>>,
}

impl Segmenter for GatedSegmenter {
    fn describe(&self) -> String {
        "gated fake SAM".into()
    }

    fn segment(&mut self, input: &SamInput) -> Result<Vec<Segment>, SegmentError> {
        self.gate.pass(1);
        self.seen.lock().unwrap().push(input.clone());
        let (w, h) = input.frame;
        let mut bits = vec![false; (w * h) as usize];
        bits[0] = true;
        let mask = Mask::new(w, h, bits)?;
        Ok(input
            .boxes
            .iter()
            .map(|_| Segment {
                mask: mask.clone(),
                iou: 0.5,
            })
            .collect())
    }
}

/// The tiny SAM's input settings (no SAM runs here: the fake stands in for it).
fn tiny_sam_input() -> SamPreprocessor {
    SamPreprocessor::new(&SamImageSettings {
        size: 128,
        resize: SamResize::LongestEdge,
        interpolation: Interpolation::Bilinear,
        pad: SamPad::BottomRight,
        rescale_factor: 1.0 / 255.0,
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    })
}

/// `jpeg` with an EXIF block saying "rotate 90° clockwise to view" (orientation 6).
fn with_exif_rotation(jpeg: &[u8]) -> Vec<u8> {
    let mut app1 = vec![0xFF, 0xE1, 0, 34];
    app1.extend_from_slice(b"Exif\0\0MM\0\x2A\0\0\0\x08");
    app1.extend_from_slice(&[0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0]);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

/// The next verdict, within twice [`PATIENCE`]: each of these runs the tiny CLIP and then
/// waits for the segment stage's queue (the fake SAM itself is instant once let through).
async fn next_verdict(worker: &Running, verdicts: &StreamConsumer) -> Verdict {
    let msg = worker
        .next_within(verdicts, 2 * PATIENCE, "verdict")
        .await
        .unwrap();
    prost::Message::decode(msg.payload().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defects_get_masks_and_a_full_segmentation_queue_does_not_hold_verdicts_back() {
    let (_mock, mut settings, brokers) = cluster("clipqc-segment");
    // Only defect classes: every part is a DEFECT. Masks under 2 pixels do not count as one.
    let profile: clipqc::score::ProfileConfig = serde_json::from_value(serde_json::json!({
        "segment": true,
        "min_area_pixels": 2,
        "classes": [
            {"name": "dent", "prompts": ["a dent"], "defect": true},
            {"name": "scratch", "prompts": ["a scratch"], "defect": true}
        ]
    }))
    .unwrap();
    settings.profiles.insert("default".into(), profile);
    let artifact = Artifact::open(common::tiny_model()).unwrap();
    let (owner, model) = tiny_clip(&artifact);
    let mut deps = deps(&settings, &brokers, &artifact, &model);
    let sam_pre = tiny_sam_input();
    let (gate, seen) = (Gate::new(), Arc::new(Mutex::new(Vec::new())));
    let fake = GatedSegmenter {
        gate: gate.clone(),
        seen: seen.clone(),
    };
    // One frame at SAM, one waiting: the rest find the queue full.
    let (sam_owner, handle) = SegmentOwner::spawn(move || Ok(fake), 1).unwrap();
    deps.segmenting = Some(pipeline::Segmenting::new(handle, sam_pre.clone()));
    let worker = Running::start(deps);

    // 150 × 100 stored, 100 × 150 upright; the region of interest is in upright pixels.
    let jpeg = std::fs::read(common::fixtures().join("images/part_small_150x100.jpg")).unwrap();
    let rotated = with_exif_rotation(&jpeg);
    let roi = RegionOfInterest {
        x: 10,
        y: 20,
        width: 50,
        height: 60,
    };
    let verdicts = reader(&brokers, "clipqc.verdicts");
    const N: usize = 6;
    let requests: Vec<_> = (0..N)
        .map(|i| InspectionRequest {
            region: Some(roi),
            ..inline_request(&format!("seg-{i}"), &rotated)
        })
        .collect();
    publish_requests(&brokers, &requests, false).await;

    // SAM holds its first frame: at most two are at SAM, the others come out without masks.
    let mut all = Vec::new();
    let mut skipped = 0;
    while skipped < N - 2 {
        let v = next_verdict(&worker, &verdicts).await;
        assert_eq!(
            v.segmentation, "SEGMENT_QUEUE_FULL",
            "only skipped verdicts can come out while SAM is held: {v:?}"
        );
        assert!(v.masks.is_empty());
        assert_eq!(v.outcome(), Outcome::Defect, "no masks, no area rule");
        skipped += 1;
        all.push(v);
    }
    assert_eq!(gate.passed(), 0, "SAM was held the whole time");
    gate.open();
    while all.len() < N {
        all.push(next_verdict(&worker, &verdicts).await);
    }
    let mut ids: Vec<&str> = all.iter().map(|v| v.request_id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), N, "one verdict per request");
    let outlined: Vec<&Verdict> = all.iter().filter(|v| v.segmentation == "OK").collect();
    let full = all
        .iter()
        .filter(|v| v.segmentation == "SEGMENT_QUEUE_FULL")
        .count();
    assert!(
        (1..=2).contains(&outlined.len()) && outlined.len() + full == N,
        "{} outlined, {full} skipped",
        outlined.len()
    );
    for v in &outlined {
        let m = &v.masks[0];
        assert_eq!(v.masks.len(), 1, "one region: the region of interest");
        let rle = m.rle.as_ref().unwrap();
        assert_eq!(
            rle.size,
            vec![150, 100],
            "[height, width] of the upright frame"
        );
        assert_eq!((m.area, m.iou), (1, 0.5));
        assert_eq!(
            v.outcome(),
            Outcome::Review,
            "1 pixel is under min_area_pixels"
        );
        assert_eq!(v.outcome_before_mask_rules, Some(Outcome::Defect as i32));
        assert!(v.latencies.unwrap().segment_seconds > 0.0);
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), outlined.len());
    let roi_box = SamBox::new(10.0, 20.0, 59.0, 79.0);
    for input in seen.iter() {
        assert_eq!(input.frame, (100, 150));
        assert_eq!(input.boxes, vec![sam_pre.map_box(roi_box, (100, 150))]);
    }
    worker.stop().await.unwrap();
    drop(model);
    owner.join();
    sam_owner.join();
}

/// A SAM call that never returns (the fake holds every frame): verdicts wait for their masks
/// at most `call_timeout`, then go out without (`SEGMENT_TIMEOUT`), and the worker's
/// readiness names the hang once the call has run twice that long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_sam_call_holds_no_verdict_and_shows_in_readiness() {
    let (_mock, mut settings, brokers) = cluster("clipqc-segment-hung");
    let profile: clipqc::score::ProfileConfig = serde_json::from_value(serde_json::json!({
        "segment": true,
        "classes": [{"name": "dent", "prompts": ["a dent"], "defect": true}]
    }))
    .unwrap();
    settings.profiles.insert("default".into(), profile);
    let artifact = Artifact::open(common::tiny_model()).unwrap();
    let (owner, model) = tiny_clip(&artifact);
    let mut deps = deps(&settings, &brokers, &artifact, &model);
    let sam_pre = tiny_sam_input();
    let gate = Gate::new();
    let fake = GatedSegmenter {
        gate: gate.clone(),
        seen: Arc::default(),
    };
    let (sam_owner, handle) = SegmentOwner::spawn(move || Ok(fake), 4).unwrap();
    let health = handle.health();
    let mut segmenting = pipeline::Segmenting::new(handle, sam_pre);
    segmenting.call_timeout = std::time::Duration::from_secs(1);
    deps.segmenting = Some(segmenting);
    let worker = Running::start(deps);
    let verdicts = reader(&brokers, "clipqc.verdicts");
    publish_inline(&brokers, "hung", 3).await;
    let mut codes = Vec::new();
    for _ in 0..3 {
        codes.push(next_verdict(&worker, &verdicts).await.segmentation);
    }
    assert!(
        codes.iter().all(|c| c == "SEGMENT_TIMEOUT"),
        "every verdict out without masks, past the bound: {codes:?}"
    );
    let later = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let problem = health.problem(later, std::time::Duration::from_secs(2));
    assert!(problem.is_some_and(|p| p.contains("hangs")));
    gate.open();
    worker.stop().await.unwrap();
    drop(model);
    owner.join();
    sam_owner.join();
}
