//! The device preprocessing path (`preprocess.device`): JPEGs decoded and windowed as tensors
//! on the model's device, so camera frames do not starve a GPU.
//!
//! Route: torchvision's own operators (`image::decode_jpeg`, libjpeg-turbo on the CPU, and
//! `image::decode_jpegs_cuda`, nvJPEG) from the `image.so` of the torchvision 0.26.0 wheel
//! that matches torch 2.11, loaded at start and called through a two-method TorchScript module
//! embedded in the binary ([`ops`]): tch 0.24 cannot call a custom operator by name, and a
//! C++ shim would mean compiling against libtorch's headers. Everything after the decode is
//! tch ([`views`]), so the geometry (EXIF orientation, region, windows, the view's resize,
//! crop or padding) is the CPU path's own code, and the same code runs on the CPU in CI with
//! the operator's CPU kernel.
//!
//! Guarantees:
//! - What the CPU path refuses from the header (limits, aspect ratio, region, windows) is
//!   refused here first, with the same error ([`super::Preprocessor::plan`]).
//! - Anything this path cannot take falls back to the CPU path for that image, counted by
//!   reason ([`Fallback`]): not a JPEG (PNG, TIFF, BMP, 16-bit), four-component JPEGs (CMYK),
//!   a profile with CLAHE, a frame over the device budget, and a JPEG the operator refuses, so
//!   a corrupt JPEG gets the CPU path's DECODE_FAILED error, word for word.
//! - Device memory is bounded: each frame reserves its peak ([`views::peak_bytes`]) from
//!   `preprocess.device_memory_bytes` before decoding and waits for room; a frame needing more
//!   than the whole budget falls back. (nvJPEG's own working buffers, allocated once by
//!   torchvision's decoder and reused, are not counted.)
//! - Pixels: within one grey level of the CPU path before normalisation (both are
//!   libjpeg-turbo with the same IDCT and chroma upsampling on the CPU; nvJPEG's IDCT may
//!   differ by a level more).
//!
//! Not guarded like the CPU path: libjpeg's "data ended early" warning. A JPEG cut in transit
//! and closed with an end-of-image marker is refused by the CPU path; torchvision's decoder
//! fills the rest with grey (a truncated one without the marker is refused by both).

mod budget;
pub mod ops;
#[cfg(test)]
mod tests;
pub mod views;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use image::ImageFormat;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use super::{
    decode, plan, PreprocessError, PreprocessSettings, Preprocessor, Region, Views, Window,
};
pub use budget::Budget;
pub use ops::{DeviceOps, OpError};

/// `preprocess.device`: where JPEGs are decoded and windowed.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum PreprocessDevice {
    /// On the model's device when that is a GPU, else on the CPU path (the same verdicts as
    /// `cpu` on a machine without a GPU).
    #[default]
    Auto,
    /// Always the CPU path.
    Cpu,
    /// On the GPU (the model's, else the first); refused at start when there is none.
    Cuda,
}

/// Errors of the device path's set-up (per-image problems are [`Fallback`]s or the CPU path's
/// [`PreprocessError`]s).
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeviceError {
    #[error("preprocess.device = \"cuda\": {0}")]
    NoGpu(String),
    #[error("device preprocessing: {path}: {message}")]
    Library { path: PathBuf, message: String },
    #[error("preprocess.device = \"cuda\": {0}")]
    Clahe(String),
}

/// Why an image went to the CPU path: the label of `clipqc_device_preprocess_fallbacks_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// PNG, TIFF, BMP (and so every 16-bit format).
    NotJpeg,
    /// A JPEG of four components (CMYK, YCCK).
    Cmyk,
    /// The profile equalises with CLAHE, which this path does not do.
    Clahe,
    /// The frame's peak is over `preprocess.device_memory_bytes`.
    OverBudget,
    /// The operator refused the JPEG: the CPU path decides (and names the fault).
    DecodeError,
}

impl Fallback {
    pub const ALL: [Fallback; 5] = [
        Self::NotJpeg,
        Self::Cmyk,
        Self::Clahe,
        Self::OverBudget,
        Self::DecodeError,
    ];

    /// The metric label: one of [`crate::metrics::DEVICE_FALLBACK_REASONS`] (a test checks).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotJpeg => "not_jpeg",
            Self::Cmyk => "cmyk",
            Self::Clahe => "clahe",
            Self::OverBudget => "over_budget",
            Self::DecodeError => "decode_error",
        }
    }
}

/// What the device path made of one image.
#[derive(Debug)]
pub enum Routed {
    Device(DeviceViews),
    Fallback(Fallback),
}

/// The views of one frame, on the device: [`Views`] with one batch tensor for the pixels.
#[derive(Debug)]
pub struct DeviceViews {
    pub origin: (u32, u32),
    pub width: u32,
    pub height: u32,
    pub windows: Vec<Window>,
    /// `(1 + windows)×3×S×S` float32 on the path's device, the whole-frame view first.
    pub tensor: Tensor,
}

impl DeviceViews {
    /// As the CPU path's [`Views`] (one host copy of the pixels).
    pub fn into_host(self) -> Result<Views, tch::TchError> {
        let n = self.tensor.size()[0] as usize;
        let flat = self.tensor.to_device(Device::Cpu).contiguous().view(-1);
        let data = Vec::<f32>::try_from(&flat)?;
        let per = data.len() / n.max(1);
        Ok(Views {
            origin: self.origin,
            width: self.width,
            height: self.height,
            windows: self.windows,
            tensors: data.chunks_exact(per).map(<[f32]>::to_vec).collect(),
        })
    }
}

/// The device path: the operators, the device, the memory budget. Shared by every profile.
#[derive(Debug)]
pub struct DevicePath {
    ops: Arc<DeviceOps>,
    device: Device,
    budget: Budget,
}

/// The process's device path, chosen once the model's device is known ([`install`]).
static INSTALLED: OnceLock<Option<Arc<DevicePath>>> = OnceLock::new();

/// Default of `preprocess.device_memory_bytes`: a few 20 MP frames with their views at once.
pub const DEFAULT_MEMORY_BYTES: u64 = 2 << 30;

impl DevicePath {
    /// The path on `device` (CPU in tests and CI; `Cuda(n)` on a GPU), with `settings`'
    /// libraries and budget.
    pub fn open(settings: &PreprocessSettings, device: Device) -> Result<Self, DeviceError> {
        let ops = DeviceOps::load(
            settings.device_ops_library.as_deref(),
            settings.device_python_library.as_deref(),
        )?;
        let budget = Budget::new(settings.device_memory_bytes.unwrap_or(DEFAULT_MEMORY_BYTES));
        Ok(Self {
            ops,
            device,
            budget,
        })
    }

    /// What `settings.device` gives for a model on `model`: `None` for the CPU path (also
    /// under `auto` when torchvision's operators cannot be loaded: logged as a warning).
    pub fn for_model(
        settings: &PreprocessSettings,
        model: Device,
    ) -> Result<Option<Self>, DeviceError> {
        let device = match (settings.device, model) {
            (PreprocessDevice::Cpu, _) => return Ok(None),
            (PreprocessDevice::Auto, Device::Cuda(_)) => model,
            (PreprocessDevice::Auto, _) => return Ok(None),
            (PreprocessDevice::Cuda, Device::Cuda(_)) => model,
            (PreprocessDevice::Cuda, _) => {
                if !tch::Cuda::is_available() {
                    return Err(DeviceError::NoGpu(format!(
                        "libtorch sees {} CUDA device(s); set preprocess.device to \"auto\" or \
                         \"cpu\" on a machine without a GPU",
                        tch::Cuda::device_count()
                    )));
                }
                Device::Cuda(0)
            }
        };
        let path = match Self::open(settings, device) {
            Ok(path) => path,
            // `auto` must not stop a GPU worker that has no torchvision (the container image
            // carries none yet): it keeps the CPU path, loudly. `cuda` asked for the device.
            Err(e) if settings.device == PreprocessDevice::Auto => {
                tracing::warn!(
                    error = %e,
                    "preprocess.device = \"auto\": the device path cannot start; JPEGs are \
                     preprocessed on the CPU"
                );
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        tracing::info!(
            device = ?device,
            library = %path.ops.library.display(),
            budget_bytes = path.budget.total(),
            "device preprocessing: JPEGs decoded and windowed on the device"
        );
        Ok(Some(path))
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// The views of one image through this path, or why it must take the CPU path. Errors
    /// are the CPU path's, for what its header already refuses.
    pub fn views(
        &self,
        pre: &Preprocessor,
        input: &str,
        bytes: &[u8],
        region: Option<Region>,
    ) -> Result<Routed, PreprocessError> {
        let header = decode::read_header(input, bytes, &pre.limits)?;
        plan::plan(pre, input, bytes.len(), &header, region)?;
        if header.format != ImageFormat::Jpeg {
            return Ok(fallback(Fallback::NotJpeg));
        }
        if header.jpeg.as_ref().is_some_and(|j| j.sampling.len() == 4) {
            return Ok(fallback(Fallback::Cmyk));
        }
        if pre.clahe.is_some() {
            return Ok(fallback(Fallback::Clahe));
        }
        let (mut w, mut h) = (header.width, header.height);
        if header.rotates() {
            (w, h) = (h, w);
        }
        pre.check_geometry(input, w, h, region)?;
        let (aw, ah) = region.map_or((w, h), |r| (r.width, r.height));
        let windows = pre
            .tiles
            .as_ref()
            .map(|t| t.config.layout(aw, ah))
            .unwrap_or_default();
        let (rw, rh) = pre.transform.resized_dims(aw, ah);
        let channels = header.jpeg.as_ref().map_or(3, |j| j.sampling.len() as u64);
        let peak = views::peak_bytes(
            u64::from(w),
            u64::from(h),
            channels,
            u64::from(rw.max(pre.transform.size)),
            u64::from(rh.max(pre.transform.size)),
            1 + windows.len() as u64,
            u64::from(pre.transform.size),
        );
        let Some(_reserved) = self.budget.reserve(peak) else {
            return Ok(fallback(Fallback::OverBudget));
        };
        let t = Instant::now();
        let data = Tensor::from_slice(bytes);
        let decoded = match self.device {
            Device::Cuda(i) => self.ops.decode_cuda(&data, i),
            _ => self.ops.decode_cpu(&data),
        };
        let decoded = match decoded {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(
                    input,
                    message = %e,
                    "device decode refused: the CPU path decides"
                );
                return Ok(fallback(Fallback::DecodeError));
            }
        };
        crate::metrics::device_decode(t.elapsed().as_secs_f64());
        let dims = decoded.size();
        if dims.len() != 3 || !(dims[0] == 1 || dims[0] == 3) {
            return Ok(fallback(Fallback::Cmyk));
        }
        let upright = views::orient(decoded, header.orientation);
        if upright.size()[1..] != [i64::from(h), i64::from(w)] {
            return Err(PreprocessError::Decode {
                input: input.into(),
                message: format!(
                    "decoded {:?}, not the {w}×{h} its header gives",
                    &upright.size()[1..]
                ),
            });
        }
        let frame = match region {
            Some(r) => views::crop(&upright, r),
            None => upright,
        };
        let window = pre.tiles.as_ref().map(|t| &t.window);
        let tensor =
            views::batch(&frame, &pre.transform, window, &windows, self.device).map_err(|e| {
                PreprocessError::Invalid {
                    input: input.into(),
                    message: format!("device preprocessing failed: {e}"),
                }
            })?;
        Ok(Routed::Device(DeviceViews {
            origin: region.map_or((0, 0), |r| (r.x, r.y)),
            width: aw,
            height: ah,
            windows,
            tensor,
        }))
    }
}

fn fallback(reason: Fallback) -> Routed {
    crate::metrics::device_fallback(reason.as_str());
    Routed::Fallback(reason)
}

/// Chooses the process's device path once the model's device is known (`clipqc run`,
/// `bench`, `classify`, `exemplar` call it after loading the model); profiles built later
/// take it ([`for_profile`]). Errors when `preprocess.device = "cuda"` cannot be served.
pub fn install(settings: &PreprocessSettings, model: Device) -> Result<(), DeviceError> {
    if INSTALLED.get().is_some() {
        return Ok(());
    }
    let path = DevicePath::for_model(settings, model)?.map(Arc::new);
    let _ = INSTALLED.set(path);
    Ok(())
}

/// The installed path for a profile: `None` (the CPU path) when none is installed or the
/// profile equalises with CLAHE under `auto`; an error for CLAHE under `cuda`.
pub fn for_profile(
    settings: &PreprocessSettings,
    clahe: bool,
) -> Result<Option<Arc<DevicePath>>, DeviceError> {
    let Some(path) = INSTALLED.get().cloned().flatten() else {
        return Ok(None);
    };
    if !clahe {
        return Ok(Some(path));
    }
    if settings.device == PreprocessDevice::Cuda {
        return Err(DeviceError::Clahe(
            "the profile's clahe is not done on the device; remove it or set \
             preprocess.device to \"auto\" (CLAHE profiles then take the CPU path)"
                .into(),
        ));
    }
    tracing::info!("a profile equalises with CLAHE: it takes the CPU preprocessing path");
    Ok(None)
}
