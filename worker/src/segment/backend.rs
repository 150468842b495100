//! The TorchScript SAM: the artifact's image encoder and box decoder on libtorch, through
//! `tch`, and the post-processing of their masks.
//!
//! Guarantees: inference mode (no autograd state kept); the decoder always runs in float32
//! (its trace fixes the positional embedding's dtype), the encoder in half precision on CUDA
//! and in float32 on CPU unless [`SamBackend::with_half_encoder`] asks otherwise; masks are
//! post-processed on the host in float32 with the same libtorch kernels transformers'
//! `post_process_masks` calls, so the thresholded masks agree with it wherever the logits do.

use std::time::{Duration, Instant};

use tch::{CModule, Device, IValue, Kind, Tensor};

use super::artifact::{SamArtifact, SamManifest, IMAGE_ENCODER, MASK_DECODER};
use super::mask::Mask;
use super::prepare::SamInput;
use super::{Segment, SegmentError, Segmenter};
use crate::model::tch_backend::{resolve_device, to_half};
use crate::model::DeviceSpec;

pub struct SamBackend {
    encoder: CModule,
    decoder: CModule,
    device: Device,
    encoder_kind: Kind,
    manifest: SamManifest,
    dir: std::path::PathBuf,
    name: String,
    /// Time spent in the encoder, the decoder and post-processing by the last frame.
    pub last_timings: Timings,
}

/// Where a frame's time went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    pub encoder: Duration,
    pub decoder: Duration,
    pub postprocess: Duration,
}

/// The decoder's output for one frame, on the host: a square low-resolution logit map and a
/// predicted IoU per box.
#[derive(Debug, Clone, PartialEq)]
pub struct LowRes {
    /// Boxes × `side` × `side` logits, row-major.
    pub logits: Vec<f32>,
    pub iou: Vec<f32>,
    pub side: u32,
}

fn failed(what: &str) -> impl Fn(tch::TchError) -> SegmentError + '_ {
    move |e| SegmentError::Inference(format!("{what}: {e}"))
}

impl SamBackend {
    pub fn load(artifact: &SamArtifact, spec: DeviceSpec) -> Result<Self, SegmentError> {
        let device = resolve_device(spec).map_err(|e| match e {
            crate::model::ModelError::Device(d, m) => SegmentError::Device(d, m),
            other => SegmentError::Device(format!("{spec:?}"), other.to_string()),
        })?;
        let load = |file: &str| -> Result<CModule, SegmentError> {
            let mut m = CModule::load_on_device(artifact.path(file), device).map_err(|e| {
                SegmentError::Artifact {
                    dir: artifact.dir.clone(),
                    message: format!("cannot load {file} as TorchScript: {e}"),
                }
            })?;
            m.set_eval();
            Ok(m)
        };
        let backend = Self {
            encoder: load(IMAGE_ENCODER)?,
            decoder: load(MASK_DECODER)?,
            device,
            encoder_kind: Kind::Float,
            manifest: artifact.manifest.clone(),
            dir: artifact.dir.clone(),
            name: artifact.model_id(),
            last_timings: Timings::default(),
        };
        if device.is_cuda() {
            backend.with_half_encoder()
        } else {
            Ok(backend)
        }
    }

    /// The image encoder in half precision (the default on CUDA, where it halves the
    /// encoder's memory traffic; on CPU for tests of that path).
    pub fn with_half_encoder(mut self) -> Result<Self, SegmentError> {
        to_half(&self.encoder).map_err(|e| SegmentError::Artifact {
            dir: self.dir.clone(),
            message: format!("cannot convert {IMAGE_ENCODER} to half precision: {e}"),
        })?;
        self.encoder_kind = Kind::Half;
        Ok(self)
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn manifest(&self) -> &SamManifest {
        &self.manifest
    }

    /// Encoder and decoder on one prepared frame: the low-resolution masks and IoUs.
    pub fn low_res(&mut self, input: &SamInput) -> Result<LowRes, SegmentError> {
        let _guard = tch::no_grad_guard();
        let s = i64::from(self.manifest.image.size);
        if input.size as i64 != s || input.pixels.len() as i64 != 3 * s * s {
            return Err(SegmentError::Inference(format!(
                "an input of {} floats prepared for a {}-pixel square; this model takes {s}",
                input.pixels.len(),
                input.size
            )));
        }
        let started = Instant::now();
        let pixels = Tensor::from_slice(&input.pixels)
            .view([1, 3, s, s])
            .f_to_device_(self.device, self.encoder_kind, false, false)
            .map_err(failed("pixels to the device"))?;
        let embeddings = self
            .encoder
            .forward_ts(&[pixels])
            .map_err(failed(IMAGE_ENCODER))?
            .to_kind(Kind::Float);
        let e = self.manifest.embedding;
        let want = [
            1,
            i64::from(e.channels),
            i64::from(e.height),
            i64::from(e.width),
        ];
        if embeddings.size() != want {
            return Err(SegmentError::Inference(format!(
                "{IMAGE_ENCODER} returned shape {:?}, the manifest says {want:?}",
                embeddings.size()
            )));
        }
        let encoded = Instant::now();
        let n = input.boxes.len() as i64;
        let flat: Vec<f32> = input.boxes.iter().flatten().copied().collect();
        let boxes = Tensor::from_slice(&flat)
            .view([1, n, 4])
            .to_device(self.device);
        let out = self
            .decoder
            .forward_is(&[IValue::Tensor(embeddings), IValue::Tensor(boxes)])
            .map_err(failed(MASK_DECODER))?;
        let (masks, iou) = match out {
            IValue::Tuple(mut v) if v.len() == 2 => match (v.remove(0), v.remove(0)) {
                (IValue::Tensor(m), IValue::Tensor(i)) => (m, i),
                _ => {
                    return Err(SegmentError::Inference(format!(
                        "{MASK_DECODER} returned no tensors"
                    )))
                }
            },
            other => {
                return Err(SegmentError::Inference(format!(
                    "{MASK_DECODER} returned {other:?}, not (masks, iou)"
                )))
            }
        };
        let l = i64::from(self.manifest.mask.low_res_size);
        if masks.size() != [1, n, 1, l, l] || iou.size() != [1, n, 1] {
            return Err(SegmentError::Inference(format!(
                "{MASK_DECODER} returned masks {:?} and IoUs {:?} for {n} boxes (expected low-res side {l})",
                masks.size(),
                iou.size()
            )));
        }
        let host = |t: Tensor| -> Result<Vec<f32>, SegmentError> {
            let t = t.to_kind(Kind::Float).to_device(Device::Cpu).contiguous();
            Vec::<f32>::try_from(t.view(-1)).map_err(failed("copying the masks to the host"))
        };
        let low = LowRes {
            logits: host(masks)?,
            iou: host(iou)?,
            side: l as u32,
        };
        self.last_timings.encoder = encoded - started;
        self.last_timings.decoder = encoded.elapsed();
        Ok(low)
    }
}

impl Segmenter for SamBackend {
    fn describe(&self) -> String {
        format!(
            "{} on {:?} (encoder {:?})",
            self.name, self.device, self.encoder_kind
        )
    }

    fn segment(&mut self, input: &SamInput) -> Result<Vec<Segment>, SegmentError> {
        let low = self.low_res(input)?;
        let started = Instant::now();
        let masks = postprocess(&low, input, self.manifest.mask.threshold)?;
        self.last_timings.postprocess = started.elapsed();
        Ok(masks
            .into_iter()
            .zip(low.iou)
            .map(|(mask, iou)| Segment { mask, iou })
            .collect())
    }
}

/// The low-resolution logits back to frame masks, as transformers' `post_process_masks`:
/// bilinearly (align_corners = false) to the padded input square, the padding cropped off,
/// bilinearly to the frame's size, then `logit > threshold`. One box at a time, so a frame
/// holds one float mask at its size at once.
pub fn postprocess(
    low: &LowRes,
    input: &SamInput,
    threshold: f32,
) -> Result<Vec<Mask>, SegmentError> {
    let _guard = tch::no_grad_guard();
    let l = low.side as usize;
    if l == 0 || low.logits.len() != input.boxes.len() * l * l {
        return Err(SegmentError::Inference(format!(
            "{} low-resolution logits for {} boxes of side {l}",
            low.logits.len(),
            input.boxes.len()
        )));
    }
    let s = i64::from(input.size);
    let (rw, rh) = (i64::from(input.resized.0), i64::from(input.resized.1));
    let (w, h) = input.frame;
    let failed = failed("post-processing a mask");
    low.logits
        .chunks_exact(l * l)
        .map(|logits| {
            let t = Tensor::from_slice(logits).view([1, 1, l as i64, l as i64]);
            let bits = t
                .f_upsample_bilinear2d([s, s], false, None, None)
                .and_then(|t| t.f_narrow(2, 0, rh)?.f_narrow(3, 0, rw))
                .and_then(|t| {
                    t.f_upsample_bilinear2d([i64::from(h), i64::from(w)], false, None, None)
                })
                .and_then(|t| t.f_gt(f64::from(threshold))?.f_view(-1))
                .map_err(&failed)?;
            Mask::new(w, h, Vec::<bool>::try_from(bits).map_err(&failed)?)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(frame: (u32, u32), resized: (u32, u32), size: u32, boxes: usize) -> SamInput {
        SamInput {
            pixels: Vec::new(),
            size,
            frame,
            resized,
            boxes: vec![[0.0; 4]; boxes],
        }
    }

    #[test]
    fn a_constant_logit_map_gives_an_empty_or_a_full_mask() {
        let low = LowRes {
            logits: [vec![-1.0; 16], vec![2.0; 16]].concat(),
            iou: vec![0.1, 0.9],
            side: 4,
        };
        let masks = postprocess(&low, &input((30, 20), (16, 11), 16, 2), 0.0).unwrap();
        assert_eq!((masks[0].width(), masks[0].height()), (30, 20));
        assert_eq!((masks[0].area(), masks[1].area()), (0, 600));
    }

    #[test]
    fn the_padding_is_cropped_before_resizing_to_the_frame() {
        // A 64 × 32 frame in a 16-pixel square: resized 16 × 8, the lower half padding. The
        // 4 × 4 low-res map is positive in its top-left quarter only, i.e. the left half of
        // the image part of the square: the left half of the frame.
        let mut logits = vec![-10.0f32; 16];
        for y in 0..2 {
            for x in 0..2 {
                logits[y * 4 + x] = 10.0;
            }
        }
        let low = LowRes {
            logits,
            iou: vec![0.5],
            side: 4,
        };
        let m = &postprocess(&low, &input((64, 32), (16, 8), 16, 1), 0.0).unwrap()[0];
        let b = m.bbox().expect("a mask");
        assert_eq!((b.x, b.y, b.height), (0, 0, 32), "{b:?}");
        // The boundary, where bilinear interpolation crosses 0, is at the middle column.
        assert!((30..=34).contains(&b.width), "{b:?}");
        assert!(m.get(0, 31) && m.get(28, 0) && !m.get(36, 16));
    }

    #[test]
    fn inconsistent_logits_are_an_error_not_a_panic() {
        let low = LowRes {
            logits: vec![0.0; 15],
            iou: vec![0.0],
            side: 4,
        };
        let err = postprocess(&low, &input((8, 8), (4, 4), 4, 1), 0.0).unwrap_err();
        assert!(
            err.to_string().contains("15 low-resolution logits"),
            "{err}"
        );
    }
}
