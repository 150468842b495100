//! The preprocess stage: image bytes to the encoder's input tensor.
//!
//! decode (JPEG, PNG, BMP, TIFF; 8/16-bit gray, RGB, RGBA; EXIF orientation applied) →
//! optional region of interest → optional CLAHE (uneven plant lighting) → the profile's
//! [`View`] with the manifest's interpolation (default [`View::Pad`]: the longer side to the
//! model's input size, aspect kept, centred on a square of the normalisation mean; or the
//! checkpoint's own resize and center crop; or squash) → rescale and normalise into CHW floats.
//!
//! Guarantees: under [`View::Pad`] and [`View::Squash`] every pixel of the frame (or of the
//! region of interest) reaches the tensor, and padding normalises to exactly 0; under
//! [`View::CenterCrop`] the output matches the checkpoint's own processor (CLIP's PIL-based
//! CLIPImageProcessor), and under [`View::Pad`] the same resize and a centred paste done with
//! PIL, to within one grey level before normalisation; decoding is bounded by
//! [`DecodeLimits`] (a header claiming 60000×60000 pixels is refused before any allocation,
//! and so is a frame or region more elongated than `max_aspect_ratio`, whose shortest-edge
//! resize would be huge); [`Preprocessor::plan`] says from the header alone how many bytes
//! [`Preprocessor::run`] will hold at most; every error names the input it is about. Pure CPU
//! work: call it from blocking threads.

pub mod alloc_meter;
mod clahe;
mod decode;
pub mod device;
mod frame;
mod libjpeg;
mod plan;
#[cfg(test)]
mod plan_tests;
pub mod settings;
mod tiff;
mod transform;
#[cfg(test)]
mod view_tests;
#[cfg(test)]
mod views_tests;
pub mod windows;

use serde::{Deserialize, Serialize};

pub use clahe::ClaheSettings;
pub use decode::{decode, decode_scaled, DecodeLimits};
pub use frame::FramePlan;
pub use plan::MemoryPlan;
pub use settings::PreprocessSettings;
pub use transform::{as_gray8, pad_dims, to_rgb8, Transform};
pub use windows::{Aggregate, TileConfig, TileError, Window};

use crate::model::artifact::ImageSettings;

/// What a profile's preprocessing reads of its definition. Profiles are defined in `score`
/// (its `ProfileConfig` implements this), which builds on this stage's views and windows: the
/// trait keeps this stage below it.
pub trait ProfilePreprocessing {
    /// Its CLAHE, when it equalises.
    fn clahe(&self) -> Option<&ClaheSettings>;
    /// The square the model sees.
    fn view(&self) -> View;
    /// Its windows, when it is tiled.
    fn tiles(&self) -> Option<&TileConfig>;
}

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("{input}: not a supported image format ({message}); supported: JPEG, PNG, BMP, TIFF")]
    UnsupportedFormat { input: String, message: String },
    #[error("{input}: cannot decode image: {message}")]
    Decode { input: String, message: String },
    #[error("{input}: image too large: {message}")]
    TooLarge { input: String, message: String },
    #[error("{input}: {message}")]
    Invalid { input: String, message: String },
}

impl PreprocessError {
    /// Its code in verdicts, DLQ headers and metric labels.
    pub fn code(&self) -> crate::proto::v1::ErrorCode {
        use crate::proto::v1::ErrorCode;
        match self {
            Self::UnsupportedFormat { .. } | Self::Decode { .. } | Self::Invalid { .. } => {
                ErrorCode::DecodeFailed
            }
            Self::TooLarge { .. } => ErrorCode::TooLarge,
        }
    }
}

/// Why a profile's preprocessing cannot be built ([`Preprocessor::for_profile`]).
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// Its windows: a key out of range, or more views than `max_windows` allows.
    #[error(transparent)]
    Tiles(#[from] TileError),
    /// The device path cannot serve it (CLAHE under `preprocess.device = "cuda"`).
    #[error(transparent)]
    Device(#[from] device::DeviceError),
}

/// A region of interest in source pixels (after EXIF orientation): inspect only this part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Region {
    /// Left edge, in pixels from the image's left.
    pub x: u32,
    /// Top edge, in pixels from the image's top.
    pub y: u32,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// Which square the model sees of a frame (or of a request's region of interest): a profile's
/// `view`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum View {
    /// The whole frame, aspect kept: the longer side resized to the model's input size (the
    /// checkpoint's interpolation, antialiased when downscaling), the shorter side in
    /// proportion (rounded to nearest, halves up, at least 1 pixel), centred on a square
    /// filled with the checkpoint's normalisation mean colour, so the padding is exactly 0.
    /// Every pixel is seen; nothing is cropped.
    #[default]
    Pad,
    /// The checkpoint's own processor, exactly (CLIP: shorter side to its resize size, then a
    /// center crop; a 1920×1080 frame loses its left and right 22 %). For comparing with
    /// the checkpoint's published behaviour, or parts always centred in the frame.
    CenterCrop,
    /// The whole frame resized to the model's input size, aspect not kept (parts look
    /// squeezed; every pixel is seen).
    Squash,
}

/// Everything needed to turn bytes into pixels; cheap to clone, shared by worker threads.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    pub limits: DecodeLimits,
    pub transform: Transform,
    pub clahe: Option<ClaheSettings>,
    /// JPEGs are decoded scaled down in the DCT domain while their shorter side stays at
    /// least this many times the resize target (`None`: always full size, the reference
    /// pixels). See `preprocess.jpeg_dct_headroom`.
    pub jpeg_dct_headroom: Option<f32>,
    /// The profile's multi-scale windows, if it is tiled.
    pub tiles: Option<Tiles>,
    /// The device path (`preprocess.device`), tried first for each image; `None`: CPU only.
    pub device: Option<std::sync::Arc<device::DevicePath>>,
}

/// A profile's windows, with the most elongated frame they take resolved.
#[derive(Debug, Clone)]
pub struct Tiles {
    pub config: TileConfig,
    /// Frames (or regions) more elongated than this are refused (TOO_LARGE).
    pub max_aspect_ratio: f64,
    /// Squares of a window to the model's input size (no padding, no crop).
    window: Transform,
}

impl Tiles {
    /// Checks `config` against `limits` (the largest frames allowed): refused, naming the
    /// keys, when a frame of the profile's `max_aspect_ratio` (or a square one) would make
    /// more than `max_windows` views.
    pub fn new(
        config: TileConfig,
        image: &ImageSettings,
        limits: &DecodeLimits,
    ) -> Result<Self, TileError> {
        let max_aspect_ratio = config.resolve_aspect_ratio(limits)?;
        Ok(Self {
            config,
            max_aspect_ratio,
            window: Transform::new(image).with_view(View::Squash),
        })
    }
}

/// A frame's views from [`Preprocessor::views_any`]: on the host (the CPU path) or on the
/// device path's device.
#[derive(Debug)]
pub enum AnyViews {
    Host(Views),
    Device(device::DeviceViews),
}

/// What a tiled (or plain) preprocessing produced for one frame.
#[derive(Debug, Clone)]
pub struct Views {
    /// Where the inspected area lies in the frame (after EXIF orientation): the region of
    /// interest's corner, or (0, 0); window coordinates are relative to it.
    pub origin: (u32, u32),
    /// The inspected area's size.
    pub width: u32,
    pub height: u32,
    /// The windows, in the order of `tensors[1..]`.
    pub windows: Vec<Window>,
    /// The whole-frame view first, then one tensor per window.
    pub tensors: Vec<Vec<f32>>,
}

impl Preprocessor {
    pub fn new(image: &ImageSettings, limits: DecodeLimits, clahe: Option<ClaheSettings>) -> Self {
        Self {
            limits,
            transform: Transform::new(image),
            clahe,
            jpeg_dct_headroom: None,
            tiles: None,
            device: None,
        }
    }

    /// A profile's preprocessing: its CLAHE, view and windows under the worker's settings.
    /// Errors (naming the key) when its windows do not fit `max_windows`, or when the device
    /// path it is asked to take cannot serve it.
    pub fn for_profile(
        image: &ImageSettings,
        settings: &PreprocessSettings,
        profile: &impl ProfilePreprocessing,
    ) -> Result<Self, ProfileError> {
        let mut pre = Self::new(image, settings.limits, profile.clahe().cloned())
            .with_view(profile.view())
            .with_jpeg_dct_headroom(settings.jpeg_dct_headroom);
        if let Some(t) = profile.tiles() {
            pre.tiles = Some(Tiles::new(t.clone(), image, &settings.limits)?);
        }
        pre.device = device::for_profile(settings, profile.clahe().is_some())?;
        Ok(pre)
    }

    /// Images tried on `path` first (JPEGs; the rest, and what it cannot take, on the CPU).
    pub fn with_device(mut self, path: Option<std::sync::Arc<device::DevicePath>>) -> Self {
        self.device = path;
        self
    }

    /// The square the model sees (the profile's `view`); [`View::Pad`] unless set.
    pub fn with_view(mut self, view: View) -> Self {
        self.transform = self.transform.with_view(view);
        self
    }

    pub fn view(&self) -> View {
        self.transform.view()
    }

    pub fn with_jpeg_dct_headroom(mut self, headroom: Option<f32>) -> Self {
        self.jpeg_dct_headroom = headroom.filter(|h| *h >= 1.0);
        self
    }

    /// Side of the square tensor produced.
    pub fn size(&self) -> usize {
        self.transform.size as usize
    }

    /// How many bytes [`Self::run`] will hold at most for this image (see [`MemoryPlan`]),
    /// from its header alone: no pixel data is decoded. Refuses, as `run` would, what the
    /// limits do not allow (dimensions, decoded size, aspect ratio, resize target) and a
    /// region of interest that is not inside the image.
    pub fn plan(
        &self,
        input: &str,
        bytes: &[u8],
        region: Option<Region>,
    ) -> Result<MemoryPlan, PreprocessError> {
        let header = decode::read_header(input, bytes, &self.limits)?;
        plan::plan(self, input, bytes.len(), &header, region)
    }

    /// Bytes → CHW floats of the whole-frame view. `input` names the image in errors (a
    /// path, a URI, a request id). Holds no more than [`Self::plan`] says; refuses what `plan`
    /// refuses before decoding.
    pub fn run(
        &self,
        input: &str,
        bytes: &[u8],
        region: Option<Region>,
    ) -> Result<Vec<f32>, PreprocessError> {
        let image = self.prepare(input, bytes, region)?;
        match &image {
            Prepared::Gray(g) => self.transform.apply_gray(input, g),
            Prepared::Rgb(rgb) => self.transform.apply(input, rgb),
        }
    }

    /// Each window's scale as a fraction of the frame's shorter side (the profile's
    /// `tiles.scales` entry it was cut at), what an exemplar records beside its windows.
    pub fn window_scales(&self, windows: &[Window]) -> Vec<f32> {
        let scales = self.tiles.as_ref().map(|t| t.config.scales.as_slice());
        windows
            .iter()
            .map(|w| scales.and_then(|s| s.get(w.scale)).copied().unwrap_or(1.0) as f32)
            .collect()
    }

    /// Bytes → the whole-frame view and, for a tiled profile, every window (in
    /// [`TileConfig::layout`] order), with their geometry. Holds no more than [`Self::plan`]
    /// says.
    pub fn views(
        &self,
        input: &str,
        bytes: &[u8],
        region: Option<Region>,
    ) -> Result<Views, PreprocessError> {
        match self.views_any(input, bytes, region)? {
            AnyViews::Host(views) => Ok(views),
            AnyViews::Device(views) => views.into_host().map_err(|e| PreprocessError::Invalid {
                input: input.into(),
                message: format!("device preprocessing: {e}"),
            }),
        }
    }

    /// As [`Self::views`], the device path's views left on its device (for the model's
    /// batch: no host copy).
    pub fn views_any(
        &self,
        input: &str,
        bytes: &[u8],
        region: Option<Region>,
    ) -> Result<AnyViews, PreprocessError> {
        if let Some(path) = &self.device {
            if let device::Routed::Device(views) = path.views(self, input, bytes, region)? {
                return Ok(AnyViews::Device(views));
            }
        }
        self.views_cpu(input, bytes, region).map(AnyViews::Host)
    }

    /// [`Self::views`] on the CPU path alone.
    pub fn views_cpu(
        &self,
        input: &str,
        bytes: &[u8],
        region: Option<Region>,
    ) -> Result<Views, PreprocessError> {
        let image = self.prepare(input, bytes, region)?;
        let (width, height) = image.dimensions();
        let windows = self
            .tiles
            .as_ref()
            .map(|t| t.config.layout(width, height))
            .unwrap_or_default();
        let mut tensors = Vec::with_capacity(1 + windows.len());
        tensors.push(match &image {
            Prepared::Gray(g) => self.transform.apply_gray(input, g)?,
            Prepared::Rgb(rgb) => self.transform.apply(input, rgb)?,
        });
        if let Some(tiles) = &self.tiles {
            for w in &windows {
                // A copy of the window (counted in the plan), squared to the model's size.
                tensors.push(match &image {
                    Prepared::Gray(g) => {
                        let crop = image::imageops::crop_imm(g, w.x, w.y, w.side, w.side);
                        tiles.window.apply_gray(input, &crop.to_image())?
                    }
                    Prepared::Rgb(rgb) => {
                        let crop = image::imageops::crop_imm(rgb, w.x, w.y, w.side, w.side);
                        tiles.window.apply(input, &crop.to_image())?
                    }
                });
            }
        }
        Ok(Views {
            origin: region.map_or((0, 0), |r| (r.x, r.y)),
            width,
            height,
            windows,
            tensors,
        })
    }

    /// Decode, orient, cut the region of interest, equalise: the pixels every view is made
    /// from, grey kept one channel unless CLAHE (which works on RGB) is on.
    fn prepare(
        &self,
        input: &str,
        bytes: &[u8],
        region: Option<Region>,
    ) -> Result<Prepared, PreprocessError> {
        let planned = self.plan(input, bytes, region)?;
        let image = decode_scaled(input, bytes, &self.limits, self.dct_min_short(region))?;
        let (w, h) = (image.width(), image.height());
        if (w, h) != (planned.decoded_width, planned.decoded_height) {
            tracing::warn!(
                input,
                planned = ?(planned.decoded_width, planned.decoded_height),
                decoded = ?(w, h),
                "the decoded image is not the size its header gave"
            );
        }
        // Again on what was decoded, before the region is copied and the resize allocates.
        self.check_geometry(input, w, h, region)?;
        let image = match region {
            Some(r) => transform::crop(input, image, r)?,
            None => image,
        };
        let image = if self.clahe.is_none() {
            match transform::into_gray8(image) {
                Ok(gray) => return Ok(Prepared::Gray(gray)),
                Err(colour) => colour,
            }
        } else {
            image
        };
        let mut rgb = to_rgb8(image);
        if let Some(c) = &self.clahe {
            rgb = c.apply(&rgb);
        }
        Ok(Prepared::Rgb(rgb))
    }

    /// The shorter side a JPEG may be DCT-scaled down to. A region is given in the full
    /// image's pixels: then it is decoded whole.
    /// Windows need the frame at full size (their coordinates are source pixels, and the
    /// finest ones want every pixel): then it is decoded whole too.
    fn dct_min_short(&self, region: Option<Region>) -> Option<u32> {
        self.jpeg_dct_headroom
            .filter(|_| region.is_none() && self.tiles.is_none())
            .map(|h| (h * self.transform.min_source_side() as f32).ceil() as u32)
    }

    /// Refuses, for a `w`×`h` image (after orientation): a region of interest not inside it;
    /// what is resized (the region, else the image) being more elongated than
    /// `max_aspect_ratio`; a resize target over the limits.
    fn check_geometry(
        &self,
        input: &str,
        w: u32,
        h: u32,
        region: Option<Region>,
    ) -> Result<(), PreprocessError> {
        if w == 0 || h == 0 {
            return Err(PreprocessError::Invalid {
                input: input.into(),
                message: "image has no pixels".into(),
            });
        }
        let (sw, sh, what) = match region {
            Some(r) => {
                transform::check_region(input, w, h, r)?;
                let what = format!(
                    "the {}×{} region of interest at ({}, {}) of the {w}×{h} image",
                    r.width, r.height, r.x, r.y
                );
                (r.width, r.height, what)
            }
            None => (w, h, format!("the {w}×{h} image")),
        };
        let ratio = self.limits.max_aspect_ratio.max(1);
        let (short, long) = (sw.min(sh), sw.max(sh));
        if u64::from(long) > u64::from(short) * u64::from(ratio) {
            return Err(PreprocessError::TooLarge {
                input: input.into(),
                message: format!(
                    "{what} is {:.1}:1, more elongated than the {ratio}:1 allowed \
                     (preprocess.limits.max_aspect_ratio)",
                    f64::from(long) / f64::from(short)
                ),
            });
        }
        if let Some(t) = &self.tiles {
            let views = t.config.views(sw, sh);
            if f64::from(long) > f64::from(short) * t.max_aspect_ratio
                || views > u64::from(t.config.max_windows)
            {
                return Err(PreprocessError::TooLarge {
                    input: input.into(),
                    message: format!(
                        "{what} makes {views} views under the profile's tiles (at most {} \
                         for frames up to {}:1: tiles.max_windows, tiles.max_aspect_ratio)",
                        t.config.max_windows, t.max_aspect_ratio
                    ),
                });
            }
        }
        self.transform.check_resize(input, sw, sh, &self.limits)
    }
}

/// The pixels views are made from.
enum Prepared {
    Gray(image::GrayImage),
    Rgb(image::RgbImage),
}

impl Prepared {
    fn dimensions(&self) -> (u32, u32) {
        match self {
            Self::Gray(g) => g.dimensions(),
            Self::Rgb(rgb) => rgb.dimensions(),
        }
    }
}
