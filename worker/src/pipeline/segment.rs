//! The segment stage: after scoring, a DEFECT or REVIEW verdict of a profile with
//! `segment = true` gets its defect outlined by Segment Anything, prompted by each region's
//! box (the worst first; the inspected area's box for a profile without regions).
//!
//! Guarantees: segmentation never slows the classification of other records: the frame is
//! handed to the SAM thread with [`SegmentHandle::try_submit`], and when its queue is full
//! the verdict goes out at once without masks (`segmentation = "SEGMENT_QUEUE_FULL"`, counted
//! in `clipqc_segment_skipped_total`); any failure of this stage (the frame, SAM, its thread)
//! leaves the verdict as scored, with the reason, never an ERROR. The place in SAM's queue is
//! taken before anything else (a frame that would find the queue full costs no decode and no
//! budget), and what segmenting holds (the decoded frame, SAM's input, the masks) is reserved
//! from SAM's own byte budget (`model.sam_max_in_flight_bytes`), while the record keeps of
//! the classification budget only its payload and image: records waiting for SAM never hold
//! back the classification of others.

use std::time::Instant;

use bytes::Bytes;

use super::budget::{ByteBudget, Reserved};
use crate::metrics;
use crate::preprocess::Region;
use crate::score::masks::{with_outline, Outline};
use crate::score::{Decision, Outcome};
use crate::segment::prepare::MAX_BOXES;
use crate::segment::{SamBox, SamPreprocessor, SegmentError, SegmentHandle};

/// The SAM model's thread and how frames are made into its input.
#[derive(Clone)]
pub struct Segmenting {
    pub handle: SegmentHandle,
    pub preprocessor: SamPreprocessor,
    /// How long a verdict waits for its masks (`model.sam_timeout_ms`): past it, it goes out
    /// without (`SEGMENT_TIMEOUT`), so a hung SAM call holds no record for ever.
    pub call_timeout: std::time::Duration,
    /// What frames being segmented may hold, apart from the classification's budget.
    pub budget: std::sync::Arc<ByteBudget>,
}

impl Segmenting {
    /// With the default bound on a call (30 s) and budget (512 MiB).
    pub fn new(handle: SegmentHandle, preprocessor: SamPreprocessor) -> Self {
        Self {
            handle,
            preprocessor,
            call_timeout: std::time::Duration::from_secs(30),
            budget: std::sync::Arc::new(ByteBudget::new(512 << 20)),
        }
    }
}

/// What the stage needs to know of one record.
pub(super) struct Frame<'a> {
    /// Names the frame in errors and logs.
    pub input: String,
    pub bytes: Bytes,
    pub preprocessor: &'a crate::preprocess::Preprocessor,
    /// The request's (or its route's) region of interest.
    pub region: Option<Region>,
    /// The camera's `mm_per_pixel`.
    pub mm_per_pixel: Option<f64>,
}

/// Whether `decision` is one the profile segments.
pub fn wanted(profile: &crate::score::profile::ProfileConfig, d: &Decision) -> bool {
    profile.segment && matches!(d.outcome, Outcome::Defect | Outcome::Review)
}

/// The box prompts of a decision: each region's, worst first, at most [`MAX_BOXES`]; for a
/// decision without regions, the inspected area (the region of interest, else the frame).
pub fn prompts(d: &Decision, region: Option<Region>, frame: (u32, u32)) -> Vec<SamBox> {
    let regions: Vec<Region> = d
        .localization
        .iter()
        .flat_map(|l| &l.regions)
        .map(|r| Region {
            x: r.x,
            y: r.y,
            width: r.width,
            height: r.height,
        })
        .take(MAX_BOXES)
        .collect();
    if regions.is_empty() {
        let whole = Region {
            x: 0,
            y: 0,
            width: frame.0,
            height: frame.1,
        };
        vec![SamBox::from_region(region.unwrap_or(whole))]
    } else {
        regions.into_iter().map(SamBox::from_region).collect()
    }
}

/// `decision` with its outline (or the reason it has none) and the profile's mask rules
/// applied. `reserved` (the record's reservation, `held` bytes of which stay needed) grows to
/// cover what segmenting holds, and is given back when done.
pub(super) async fn outline(
    segmenting: Option<&Segmenting>,
    profile: &crate::score::profile::ProfileConfig,
    decision: Decision,
    frame: Frame<'_>,
    reserved: (Reserved<'_>, u64),
) -> Decision {
    let started = Instant::now();
    let result = match segmenting {
        None => Err(SegmentError::Artifact {
            dir: "model.sam_dir".into(),
            message: "no SAM model is loaded (model.sam_dir is unset)".into(),
        }),
        Some(s) => segment(s, &decision, &frame, reserved).await,
    };
    let outline = match result {
        Ok(masks) => {
            metrics::segmented(started.elapsed().as_secs_f64());
            Outline::segmented(masks, frame.mm_per_pixel)
        }
        Err(e) => {
            metrics::segment_skipped(e.reason());
            if !matches!(e, SegmentError::QueueFull { .. }) {
                tracing::warn!(input = %frame.input, error = %e, "no masks for this verdict");
            }
            Outline::failed(e.code())
        }
    };
    with_outline(profile, decision, outline)
}

/// Decode the frame (off the async workers), prompt SAM with the decision's boxes, wait for
/// its masks. Each mask is paired with the index of its region.
async fn segment(
    s: &Segmenting,
    decision: &Decision,
    frame: &Frame<'_>,
    (reserved, held): (Reserved<'_>, u64),
) -> Result<Vec<(u32, crate::segment::MaskSummary)>, SegmentError> {
    // The queue first: a frame turned away costs nothing more.
    let slot = s.handle.try_slot()?;
    // The classification's decode is done: of its budget the record keeps its payload and
    // image only, while it waits for SAM.
    let _kept = reserved.shrink_to(usize::try_from(held).unwrap_or(usize::MAX));
    let input = &frame.input;
    let bad_frame = |e: crate::preprocess::PreprocessError| SegmentError::Input {
        input: input.clone(),
        message: e.to_string(),
    };
    let plan = frame
        .preprocessor
        .frame_plan(input, &frame.bytes)
        .map_err(bad_frame)?;
    let boxes = prompts(decision, frame.region, (plan.width, plan.height));
    let pixels = u64::from(plan.width) * u64::from(plan.height);
    let square = u64::from(s.preprocessor.size()).pow(2);
    // The frame's decode, SAM's input (and its resize), one mask's float upscale at a time,
    // and every mask kept until encoded.
    let need = plan.peak_bytes + square * 3 * 4 * 2 + pixels * 6 + boxes.len() as u64 * pixels;
    let _reserved = s
        .budget
        .reserve(usize::try_from(need).unwrap_or(usize::MAX))
        .await;
    let (sam, pre) = (s.preprocessor.clone(), frame.preprocessor.clone());
    let (name, bytes) = (input.clone(), frame.bytes.clone());
    let prepared = tokio::task::spawn_blocking(move || {
        let rgb = pre.frame(&name, &bytes).map_err(|e| SegmentError::Input {
            input: name.clone(),
            message: e.to_string(),
        })?;
        sam.prepare(&name, &rgb, &boxes)
    })
    .await
    .map_err(|e| SegmentError::Inference(format!("{input}: preparing the frame failed: {e}")))??;
    let reply = s.handle.submit(slot, prepared)?;
    let segments = tokio::time::timeout(s.call_timeout, reply)
        .await
        .map_err(|_| SegmentError::TimedOut {
            seconds: s.call_timeout.as_secs(),
        })?
        .map_err(|_| SegmentError::Stopped)??;
    Ok(segments
        .iter()
        .enumerate()
        .map(|(i, seg)| (i as u32, seg.summary()))
        .collect())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::score::{DefectRegion, Localization};

    fn decision(regions: Vec<DefectRegion>) -> Decision {
        let mut d = crate::score::decide(
            &crate::score::profile::ProfileConfig::builtin_default(),
            vec![0.9, 0.025, 0.025, 0.025, 0.025],
        );
        d.localization = Some(Localization {
            views: 1 + regions.len() as u32,
            regions,
            heatmap: None,
            anomaly_map: None,
            aggregates: Default::default(),
        });
        d
    }

    fn region(x: u32, y: u32) -> DefectRegion {
        DefectRegion {
            x,
            y,
            width: 10,
            height: 20,
            class: 0,
            score: 0.9,
        }
    }

    #[test]
    fn each_region_prompts_a_box_in_order_and_none_prompts_the_inspected_area() {
        let d = decision(vec![region(5, 6), region(100, 0)]);
        assert_eq!(
            prompts(&d, None, (640, 480)),
            vec![
                SamBox::new(5.0, 6.0, 14.0, 25.0),
                SamBox::new(100.0, 0.0, 109.0, 19.0)
            ]
        );
        let d = decision(vec![]);
        assert_eq!(
            prompts(&d, None, (640, 480)),
            vec![SamBox::new(0.0, 0.0, 639.0, 479.0)]
        );
        let roi = Region {
            x: 50,
            y: 60,
            width: 100,
            height: 40,
        };
        assert_eq!(
            prompts(&d, Some(roi), (640, 480)),
            vec![SamBox::new(50.0, 60.0, 149.0, 99.0)]
        );
    }

    #[test]
    fn at_most_max_boxes_regions_prompt() {
        let d = decision((0..40).map(|i| region(i, 0)).collect());
        let p = prompts(&d, None, (640, 480));
        assert_eq!(p.len(), MAX_BOXES);
        assert_eq!(p[0].x0, 0.0, "the worst region first");
    }

    /// Holds every frame at `gate`, then answers a one-pixel mask per box.
    struct Held(crate::model::fake::Gate);

    impl crate::segment::Segmenter for Held {
        fn describe(&self) -> String {
            "held".into()
        }

        fn segment(
            &mut self,
            input: &crate::segment::SamInput,
        ) -> Result<Vec<crate::segment::Segment>, SegmentError> {
            self.0.pass(1);
            let (w, h) = input.frame;
            let mut bits = vec![false; (w * h) as usize];
            bits[0] = true;
            let mask = crate::segment::Mask::new(w, h, bits)?;
            Ok(input
                .boxes
                .iter()
                .map(|_| crate::segment::Segment {
                    mask: mask.clone(),
                    iou: 0.5,
                })
                .collect())
        }
    }

    /// A record waiting for SAM keeps of the classification budget only its payload and image,
    /// what segmenting holds comes from SAM's own budget, and a frame that finds SAM's queue
    /// full is turned away before it is decoded or reserves anything. (Before, the record's
    /// classification reservation grew by everything segmenting holds and was kept through
    /// SAM's inference: a burst of large DEFECT frames held back every other record.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_at_sam_holds_its_image_only_of_the_classification_budget() {
        use crate::model::artifact::ImageSettings;
        let gate = crate::model::fake::Gate::new();
        let held = Held(gate.clone());
        let (owner, handle) = crate::segment::SegmentOwner::spawn(move || Ok(held), 1).unwrap();
        // The fake SAM export's input settings (the fake answers whatever they are).
        let sam_pre = SamPreprocessor::new(
            &crate::segment::artifact::tests::manifest(Default::default()).image,
        );
        let s = Segmenting::new(handle, sam_pre);
        let pre = crate::preprocess::Preprocessor::new(
            &ImageSettings::clip(),
            crate::preprocess::DecodeLimits::default(),
            None,
        );
        let mut jpeg = std::io::Cursor::new(Vec::new());
        image::RgbImage::from_pixel(320, 240, image::Rgb([90, 90, 90]))
            .write_to(&mut jpeg, image::ImageFormat::Jpeg)
            .unwrap();
        let jpeg = Bytes::from(jpeg.into_inner());
        let profile = crate::score::profile::ProfileConfig {
            segment: true,
            ..crate::score::profile::ProfileConfig::builtin_default()
        };
        let classification = ByteBudget::new(64 << 20);
        let frame = || Frame {
            input: "request r".into(),
            bytes: jpeg.clone(),
            preprocessor: &pre,
            region: None,
            mm_per_pixel: None,
        };
        // Each record held its payload and image (64 KiB) and its decode's peak (8 MiB).
        let (image, peak) = (64u64 << 10, 8u64 << 20);
        let record = || async {
            let r = classification.reserve((image + peak) as usize).await;
            outline(Some(&s), &profile, decision(vec![]), frame(), (r, image)).await
        };
        // The first record goes to SAM and is held there; then the second takes the queue's
        // one place and reserves for SAM; then a third comes.
        let first = record();
        let then = async {
            let at_sam = gate.clone();
            tokio::task::spawn_blocking(move || {
                at_sam.wait_for_a_batch(0, Duration::from_secs(60))
            })
            .await
            .unwrap();
            let one = s.budget.held();
            assert!(one > 0, "the decode for SAM comes from its own budget");
            assert_eq!(
                classification.held(),
                image,
                "the first holds only its image"
            );
            let second = record();
            let check = async {
                while s.budget.held() < 2 * one {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                assert_eq!(classification.held(), 2 * image, "only their images");
                // A third finds the queue full at once, without touching SAM's budget.
                let third = record().await;
                assert_eq!(third.outline.unwrap().status, "SEGMENT_QUEUE_FULL");
                assert_eq!(s.budget.held(), 2 * one);
                gate.open();
            };
            tokio::join!(second, check).0
        };
        let (a, b) = tokio::join!(first, then);
        for d in [a, b] {
            assert_eq!(d.outline.unwrap().status, "OK");
        }
        assert_eq!((classification.held(), s.budget.held()), (0, 0));
        drop(s);
        owner.join();
    }
}
