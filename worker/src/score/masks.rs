//! A decision's defect outlines (Segment Anything's masks) and the profile's rules on their
//! geometry: "spots under 0.5 mm² accepted" is written as `min_area_mm2 = 0.5`.
//!
//! Guarantees: only a DEFECT is ever changed by the rules, and only when every mask was
//! measured against a minimum and found under it (a verdict without masks, or a camera
//! without `mm_per_pixel` under a millimetre rule alone, keeps its outcome); the outcome the
//! scores gave is kept beside the new one, so a changed verdict says so.

use serde::Serialize;

use super::profile::{BelowMinArea, ProfileConfig};
use super::{Decision, Outcome};
use crate::segment::MaskSummary;

/// One region's outline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegionMask {
    pub mask: MaskSummary,
    /// Index into the decision's regions of the region whose box prompted it (0 for the
    /// inspected area's box of a profile without regions).
    pub region: u32,
    /// The area in mm², when the camera's `mm_per_pixel` is known.
    pub area_mm2: Option<f64>,
}

/// What segmentation gave a decision.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outline {
    /// `"OK"`, or the [`crate::segment::SegmentError::code`] of why there are no masks.
    pub status: &'static str,
    pub masks: Vec<RegionMask>,
    /// The outcome before the mask rules changed it (unset when they did not).
    pub outcome_before_rules: Option<Outcome>,
}

impl Outline {
    /// Masks of the regions, in the regions' order; `mm_per_pixel` the camera's calibration.
    pub fn segmented(masks: Vec<(u32, MaskSummary)>, mm_per_pixel: Option<f64>) -> Self {
        let masks = masks
            .into_iter()
            .map(|(region, mask)| RegionMask {
                area_mm2: mm_per_pixel.map(|mm| mask.area as f64 * mm * mm),
                mask,
                region,
            })
            .collect();
        Self {
            status: "OK",
            masks,
            outcome_before_rules: None,
        }
    }

    /// No masks, and why (a [`crate::segment::SegmentError::code`]).
    pub fn failed(code: &'static str) -> Self {
        Self {
            status: code,
            masks: Vec::new(),
            outcome_before_rules: None,
        }
    }
}

/// `decision` with its outline, and the profile's area rules applied: a DEFECT whose every
/// mask is under `min_area_pixels` (and, where the camera is calibrated, `min_area_mm2`)
/// becomes `below_min_area`.
pub fn with_outline(profile: &ProfileConfig, mut decision: Decision, outline: Outline) -> Decision {
    let mut outline = outline;
    if decision.outcome == Outcome::Defect && all_under_minimum(profile, &outline.masks) {
        outline.outcome_before_rules = Some(decision.outcome);
        decision.outcome = match profile.below_min_area {
            BelowMinArea::Review => Outcome::Review,
            BelowMinArea::Pass => Outcome::Pass,
        };
    }
    decision.outline = Some(outline);
    decision
}

/// Whether there are masks and each is under a minimum that applies to it.
fn all_under_minimum(profile: &ProfileConfig, masks: &[RegionMask]) -> bool {
    let under = |m: &RegionMask| {
        let by_pixels = profile.min_area_pixels.map(|min| m.mask.area < min);
        let by_mm = match (profile.min_area_mm2, m.area_mm2) {
            (Some(min), Some(area)) => Some(area < min),
            _ => None,
        };
        match (by_pixels, by_mm) {
            // Both rules apply: under both minimums (a mask is small only if no rule says big).
            (Some(p), Some(mm)) => p && mm,
            (Some(p), None) => p,
            (None, Some(mm)) => mm,
            (None, None) => false,
        }
    };
    !masks.is_empty() && masks.iter().all(under)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::Rle;

    fn mask(area: u64) -> MaskSummary {
        MaskSummary {
            rle: Rle {
                size: [100, 100],
                counts: vec![0, area as u32, 10_000 - area as u32],
            },
            area,
            bbox: None,
            iou: 0.9,
        }
    }

    fn profile(min_mm2: Option<f64>, min_px: Option<u64>, below: BelowMinArea) -> ProfileConfig {
        let mut p = ProfileConfig::builtin_default();
        p.segment = true;
        p.min_area_mm2 = min_mm2;
        p.min_area_pixels = min_px;
        p.below_min_area = below;
        p
    }

    fn defect() -> Decision {
        super::super::decide(
            &ProfileConfig::builtin_default(),
            vec![0.9, 0.025, 0.025, 0.025, 0.025],
        )
    }

    #[test]
    fn a_defect_under_the_minimum_area_in_mm2_becomes_review_and_says_what_it_was() {
        assert_eq!(defect().outcome, Outcome::Defect);
        let p = profile(Some(0.5), None, BelowMinArea::Review);
        // 0.1 mm per pixel: 40 px = 0.4 mm², under 0.5.
        let d = with_outline(
            &p,
            defect(),
            Outline::segmented(vec![(0, mask(40))], Some(0.1)),
        );
        assert_eq!(d.outcome, Outcome::Review);
        let o = d.outline.unwrap();
        assert_eq!(o.outcome_before_rules, Some(Outcome::Defect));
        assert!((o.masks[0].area_mm2.unwrap() - 0.4).abs() < 1e-9);
    }

    #[test]
    fn one_mask_over_the_minimum_keeps_the_defect() {
        let p = profile(Some(0.5), None, BelowMinArea::Pass);
        let masks = vec![(0, mask(40)), (1, mask(60))];
        let d = with_outline(&p, defect(), Outline::segmented(masks, Some(0.1)));
        assert_eq!(d.outcome, Outcome::Defect);
        assert_eq!(d.outline.unwrap().outcome_before_rules, None);
    }

    #[test]
    fn below_min_area_pass_passes_the_part() {
        let p = profile(None, Some(50), BelowMinArea::Pass);
        let d = with_outline(&p, defect(), Outline::segmented(vec![(0, mask(49))], None));
        assert_eq!(d.outcome, Outcome::Pass);
        let d = with_outline(&p, defect(), Outline::segmented(vec![(0, mask(50))], None));
        assert_eq!(d.outcome, Outcome::Defect, "the minimum itself counts");
    }

    #[test]
    fn a_millimetre_rule_without_a_calibration_or_without_masks_changes_nothing() {
        let p = profile(Some(0.5), None, BelowMinArea::Pass);
        let d = with_outline(&p, defect(), Outline::segmented(vec![(0, mask(1))], None));
        assert_eq!(d.outcome, Outcome::Defect);
        assert_eq!(d.outline.as_ref().unwrap().masks[0].area_mm2, None);
        let d = with_outline(&p, defect(), Outline::failed("SEGMENT_QUEUE_FULL"));
        assert_eq!(d.outcome, Outcome::Defect);
        assert_eq!(d.outline.unwrap().status, "SEGMENT_QUEUE_FULL");
    }

    #[test]
    fn both_rules_must_call_a_mask_small() {
        let p = profile(Some(0.5), Some(50), BelowMinArea::Pass);
        // 40 px is under 50 px, but 0.2 mm per pixel makes it 1.6 mm², over 0.5.
        let d = with_outline(
            &p,
            defect(),
            Outline::segmented(vec![(0, mask(40))], Some(0.2)),
        );
        assert_eq!(d.outcome, Outcome::Defect);
    }

    #[test]
    fn a_review_is_never_changed() {
        let p = profile(None, Some(50), BelowMinArea::Pass);
        let mut review = defect();
        review.outcome = Outcome::Review;
        let d = with_outline(&p, review, Outline::segmented(vec![(0, mask(1))], None));
        assert_eq!(d.outcome, Outcome::Review);
    }
}
