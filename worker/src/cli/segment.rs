//! `clipqc classify` with a segmenting profile: DEFECT and REVIEW decisions outlined by
//! Segment Anything as `clipqc run` outlines them (the same box prompts, the same mask rules),
//! offline, one image at a time.

use crate::config::Settings;
use crate::model::DeviceSpec;
use crate::preprocess::Preprocessor;
use crate::score::masks::{with_outline, Outline};
use crate::score::{Decision, ProfileConfig};
use crate::segment::{SamArtifact, SamBackend, SamPreprocessor, SegmentHandle, SegmentOwner};

pub(crate) struct OfflineSegmenter {
    owner: SegmentOwner,
    handle: SegmentHandle,
    sam: SamPreprocessor,
    mm_per_pixel: Option<f64>,
}

impl OfflineSegmenter {
    /// SAM loaded from `model.sam_dir` when the profile segments; `None` when it does not.
    pub fn start(
        settings: &Settings,
        profile: &ProfileConfig,
        device: Option<DeviceSpec>,
        mm_per_pixel: Option<f64>,
    ) -> anyhow::Result<Option<Self>> {
        if !profile.segment {
            return Ok(None);
        }
        // The settings' own check makes a segmenting profile come with a SAM artifact.
        let Some(dir) = settings.model.sam_dir.as_deref() else {
            anyhow::bail!("the profile has segment = true, but model.sam_dir is not set");
        };
        let artifact = SamArtifact::open(dir)?;
        let sam = SamPreprocessor::new(&artifact.manifest.image);
        let device = device.unwrap_or(settings.model.device);
        let (owner, handle) = SegmentOwner::spawn(move || SamBackend::load(&artifact, device), 1)?;
        tracing::info!(sam = handle.describe(), "segmentation loaded");
        Ok(Some(Self {
            owner,
            handle,
            sam,
            mm_per_pixel,
        }))
    }

    /// `decision` outlined (a DEFECT or REVIEW; others as they are), the profile's mask rules
    /// applied. A frame SAM cannot take leaves the decision as scored, with the reason.
    pub fn outline(
        &self,
        profile: &ProfileConfig,
        pre: &Preprocessor,
        path: &str,
        decision: Decision,
    ) -> Decision {
        if !crate::pipeline::segment_wanted(profile, &decision) {
            return decision;
        }
        let outline = match self.segment(pre, path, &decision) {
            Ok(masks) => Outline::segmented(masks, self.mm_per_pixel),
            Err(e) => {
                tracing::warn!(image = path, error = %e, "no masks for this image");
                Outline::failed(e.code())
            }
        };
        with_outline(profile, decision, outline)
    }

    fn segment(
        &self,
        pre: &Preprocessor,
        path: &str,
        decision: &Decision,
    ) -> Result<Vec<(u32, crate::segment::MaskSummary)>, crate::segment::SegmentError> {
        let input = |e: String| crate::segment::SegmentError::Input {
            input: path.into(),
            message: e,
        };
        let bytes = std::fs::read(path).map_err(|e| input(format!("cannot read: {e}")))?;
        let frame = pre.frame(path, &bytes).map_err(|e| input(e.to_string()))?;
        let boxes = crate::pipeline::segment_prompts(decision, None, frame.dimensions());
        let prepared = self.sam.prepare(path, &frame, &boxes)?;
        let segments = self.handle.segment_blocking(prepared)?;
        Ok(segments
            .iter()
            .enumerate()
            .map(|(i, s)| (i as u32, s.summary()))
            .collect())
    }

    /// Stop the SAM thread.
    pub fn join(self) {
        drop(self.handle);
        self.owner.join();
    }
}
