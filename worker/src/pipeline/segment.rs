//! The segment stage: after scoring, a DEFECT or REVIEW verdict of a profile with
//! `segment = true` gets its defect outlined by Segment Anything, prompted by each region's
//! box (the worst first; the inspected area's box for a profile without regions).
//!
//! Guarantees: segmentation never slows the classification of other records: the frame is
//! handed to the SAM thread with [`SegmentHandle::try_submit`], and when its queue is full
//! the verdict goes out at once without masks (`segmentation = "SEGMENT_QUEUE_FULL"`, counted
//! in `clipqc_segment_skipped_total`); any failure of this stage (the frame, SAM, its thread)
//! leaves the verdict as scored, with the reason, never an ERROR; the bytes it holds (the
//! decoded frame, SAM's input, the masks) are reserved from the worker's budget first.

use std::time::Instant;

use bytes::Bytes;

use super::budget::Reserved;
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
}

impl Segmenting {
    /// With the default bound on a call (30 s).
    pub fn new(handle: SegmentHandle, preprocessor: SamPreprocessor) -> Self {
        Self {
            handle,
            preprocessor,
            call_timeout: std::time::Duration::from_secs(30),
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
    let _reserved = reserved
        .grow_to(usize::try_from(held + need).unwrap_or(usize::MAX))
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
    let reply = s.handle.try_submit(prepared)?;
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
}
