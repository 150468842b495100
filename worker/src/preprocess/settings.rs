//! The preprocess stage's settings (`preprocess` in the config): decoding limits, JPEG
//! scaling and the device path. The stage owns them; `config` only gathers them.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PreprocessSettings {
    #[serde(default)]
    pub limits: super::DecodeLimits,
    /// Decode JPEGs scaled down (1/2, 1/4, 1/8) in libjpeg's DCT domain while the shorter
    /// side stays at least this many times the model's input size, e.g. 2.0: a 1920×1080
    /// frame is decoded at 960×540 for a 224 model, in about half the time. Unset (default):
    /// full-size decoding, pixel-for-pixel the checkpoint's own processor. The scaled path
    /// filters differently, so probabilities move slightly; check on your parts first.
    #[serde(default)]
    pub jpeg_dct_headroom: Option<f32>,
    /// Where JPEGs are decoded and windowed: `auto` (on the GPU when the model runs on one,
    /// else the CPU path: the same verdicts as `cpu` on a machine without a GPU; also the CPU
    /// path, with a warning, when torchvision's operators cannot be loaded), `cpu`, or
    /// `cuda` (nvJPEG through torchvision's operators; refused at start without a GPU, and
    /// for a profile with CLAHE). Images the device path cannot take (PNG, TIFF, BMP, CMYK
    /// JPEGs, frames over `device_memory_bytes`) take the CPU path, counted in
    /// `clipqc_device_preprocess_fallbacks_total`.
    #[serde(default)]
    pub device: super::device::PreprocessDevice,
    /// Device memory the frames being preprocessed on the device may hold at once, in bytes
    /// (each reserves its decoded frame, working copies and views first; one needing more
    /// than this takes the CPU path). Unset: 2 GiB.
    #[serde(default)]
    pub device_memory_bytes: Option<u64>,
    /// torchvision's operator library (`.../site-packages/torchvision/image.so`, torchvision
    /// 0.26.0 for torch 2.11) for the device path. Unset: the one beside the libtorch the
    /// worker runs on.
    #[serde(default)]
    pub device_ops_library: Option<PathBuf>,
    /// The `libpythonX.Y.so` torchvision's library needs loaded first (it links
    /// libtorch_python; no interpreter is started). Unset: found from the library's path
    /// (the virtual environment's base Python, then the system's).
    #[serde(default)]
    pub device_python_library: Option<PathBuf>,
}
