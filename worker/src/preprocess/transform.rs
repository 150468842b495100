//! Resize to the profile's view (pad, the checkpoint's own center crop, or squash) and
//! normalise.

use fast_image_resize as fr;
use image::{DynamicImage, GrayImage, RgbImage};

use super::{DecodeLimits, PreprocessError, Region, View};
use crate::model::artifact::{ImageSettings, Interpolation, ResizeMode};

#[derive(Debug, Clone)]
pub struct Transform {
    pub size: u32,
    view: View,
    mode: ResizeMode,
    resize_size: u32,
    filter: fr::FilterType,
    /// Per channel: `pixel * scale + offset` == `(pixel * rescale - mean) / std`.
    scale: [f32; 3],
    offset: [f32; 3],
}

/// Any decoded image as 8-bit RGB: grey is replicated, alpha dropped (as PIL's
/// `convert("RGB")`), 16-bit samples scaled to 8 bits.
pub fn to_rgb8(image: DynamicImage) -> RgbImage {
    match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    }
}

/// Single-channel images as 8-bit grey (16-bit samples rounded to 8 bits, as [`to_rgb8`]
/// does); `None` for colour ones. Borrowed when already 8-bit grey.
pub fn as_gray8(image: &DynamicImage) -> Option<std::borrow::Cow<'_, GrayImage>> {
    match image {
        DynamicImage::ImageLuma8(g) => Some(std::borrow::Cow::Borrowed(g)),
        DynamicImage::ImageLuma16(g) => Some(std::borrow::Cow::Owned(gray16_to_8(g))),
        _ => None,
    }
}

/// As [`as_gray8`], taking the image: a 16-bit one is dropped once converted, and a colour
/// one is handed back.
pub(super) fn into_gray8(image: DynamicImage) -> Result<GrayImage, DynamicImage> {
    match image {
        DynamicImage::ImageLuma8(g) => Ok(g),
        DynamicImage::ImageLuma16(g) => Ok(gray16_to_8(&g)),
        other => Err(other),
    }
}

fn gray16_to_8(g: &image::ImageBuffer<image::Luma<u16>, Vec<u16>>) -> GrayImage {
    let (w, h) = g.dimensions();
    let data = g
        .as_raw()
        .iter()
        .map(|&v| ((u32::from(v) * 255 + 32767) / 65535) as u8)
        .collect();
    GrayImage::from_raw(w, h, data).expect("same dimensions. This is a bug.")
}

/// Refuses a region of interest that is empty or not inside a `w`×`h` image.
pub(super) fn check_region(input: &str, w: u32, h: u32, r: Region) -> Result<(), PreprocessError> {
    let fits = r.width > 0
        && r.height > 0
        && r.x.checked_add(r.width).is_some_and(|right| right <= w)
        && r.y.checked_add(r.height).is_some_and(|bottom| bottom <= h);
    if !fits {
        return Err(PreprocessError::Invalid {
            input: input.into(),
            message: format!("region of interest {r:?} is not inside the {w}×{h} image"),
        });
    }
    Ok(())
}

/// The region of interest, at the decoded depth (converting the region alone is cheaper
/// than converting the whole image); the whole image is dropped once it is copied.
pub(super) fn crop(
    input: &str,
    image: DynamicImage,
    r: Region,
) -> Result<DynamicImage, PreprocessError> {
    check_region(input, image.width(), image.height(), r)?;
    Ok(image.crop_imm(r.x, r.y, r.width, r.height))
}

impl Transform {
    /// The manifest's settings under the default view ([`View::Pad`]).
    pub fn new(s: &ImageSettings) -> Self {
        let filter = match s.interpolation {
            // PIL's BICUBIC is the Catmull-Rom (a = -0.5) kernel, widened when downscaling.
            Interpolation::Bicubic => fr::FilterType::CatmullRom,
            Interpolation::Bilinear => fr::FilterType::Bilinear,
        };
        let scale = std::array::from_fn(|c| s.rescale_factor / s.std[c]);
        let offset = std::array::from_fn(|c| -s.mean[c] / s.std[c]);
        Self {
            size: s.size,
            view: View::default(),
            mode: s.resize,
            resize_size: s.resize_size,
            filter,
            scale,
            offset,
        }
    }

    pub fn with_view(mut self, view: View) -> Self {
        self.view = view;
        self
    }

    pub fn view(&self) -> View {
        self.view
    }

    /// The resize's interpolation (the device path uses libtorch's kernel of the same name).
    pub(super) fn interpolation(&self) -> Interpolation {
        match self.filter {
            fr::FilterType::CatmullRom => Interpolation::Bicubic,
            _ => Interpolation::Bilinear,
        }
    }

    /// Per channel, `(scale, offset)` with `pixel * scale + offset` the normalised value.
    pub(super) fn normalisation(&self) -> ([f32; 3], [f32; 3]) {
        (self.scale, self.offset)
    }

    /// Bytes of the tensor [`Self::apply`] returns: 3 × size² floats.
    pub fn output_bytes(&self) -> u64 {
        3 * u64::from(self.size) * u64::from(self.size) * std::mem::size_of::<f32>() as u64
    }

    /// Refuses a resize whose target would exceed `limits`: more pixels than a source at the
    /// largest aspect ratio allowed gives (`resize_size² × max_aspect_ratio`), or a buffer
    /// over `max_alloc_bytes`.
    pub fn check_resize(
        &self,
        input: &str,
        w: u32,
        h: u32,
        limits: &DecodeLimits,
    ) -> Result<(), PreprocessError> {
        let (rw, rh) = self.resized_dims(w, h);
        let pixels = u64::from(rw) * u64::from(rh);
        let bytes = 3 * pixels;
        let side = u64::from(self.resize_size.max(self.size));
        let max_pixels = side * side * u64::from(limits.max_aspect_ratio.max(1));
        if pixels > max_pixels || bytes > limits.max_alloc_bytes {
            return Err(PreprocessError::TooLarge {
                input: input.into(),
                message: format!(
                    "resizing {w}×{h} would make a {rw}×{rh} image ({bytes} bytes), over the \
                     limit of {max_pixels} pixels and {} bytes",
                    limits.max_alloc_bytes
                ),
            });
        }
        Ok(())
    }

    /// The most bytes [`Self::apply`] (`channels` 3) or [`Self::apply_gray`] (`channels` 1)
    /// holds at once for a `w`×`h` source, not counting the source: the resize target,
    /// fast_image_resize's intermediate image and coefficient tables, and the returned tensor.
    pub fn held_bytes(&self, w: u32, h: u32, channels: u64) -> u64 {
        let out = self.output_bytes();
        let (rw, rh) = self.resized_dims(w, h);
        if (rw, rh) == (w, h) {
            return out;
        }
        let target = u64::from(rw) * u64::from(rh) * channels;
        // Resizing both ways, fast_image_resize runs the vertical pass first (u8 pixels) into
        // an image as wide as the source columns used and as high as the target, plus a pixel.
        let intermediate = if rw != w && rh != h {
            u64::from(w) * u64::from(rh) * channels + channels
        } else {
            0
        };
        let coefficients = self.coefficient_bytes(w, rw) + self.coefficient_bytes(h, rh);
        (intermediate + target + coefficients).max(target + out)
    }

    /// fast_image_resize's tables for one axis: per target pixel, a window of f64 weights and
    /// the same as i16 in a vector of its own, and the window's bounds.
    fn coefficient_bytes(&self, from: u32, to: u32) -> u64 {
        if from == to {
            return 0;
        }
        let support = match self.filter {
            fr::FilterType::Bilinear => 1.0,
            fr::FilterType::CatmullRom => 2.0,
            _ => 3.0,
        };
        let scale = (f64::from(from) / f64::from(to)).max(1.0);
        let window = (support * scale).ceil() as u64 * 2 + 1;
        u64::from(to) * (window * 10 + 96)
    }

    /// The shorter side the resize needs from its source (larger helps nothing). Under
    /// [`View::Pad`] the longer side is what reaches the model's size, so this is more than
    /// enough (JPEG DCT scaling stays conservative there).
    pub fn min_source_side(&self) -> u32 {
        self.resize_size.max(self.size)
    }

    /// The size the whole image is resized to before it is cropped or padded to the square.
    pub fn resized_dims(&self, width: u32, height: u32) -> (u32, u32) {
        match self.view {
            View::Pad => return pad_dims(self.size, width, height),
            View::Squash => return (self.size, self.size),
            View::CenterCrop => {}
        }
        match self.mode {
            ResizeMode::Squash => (self.size, self.size),
            ResizeMode::ShortestEdge => {
                // transformers' get_resize_output_image_size: the long side is truncated, not rounded.
                let (short, long) = if width <= height {
                    (width, height)
                } else {
                    (height, width)
                };
                let new_long =
                    (f64::from(self.resize_size) * f64::from(long) / f64::from(short)) as u32;
                if width <= height {
                    (self.resize_size, new_long)
                } else {
                    (new_long, self.resize_size)
                }
            }
        }
    }

    pub fn apply(&self, input: &str, rgb: &RgbImage) -> Result<Vec<f32>, PreprocessError> {
        let (w, h) = rgb.dimensions();
        self.resize_crop_normalize::<3>(input, rgb.as_raw(), w, h)
    }

    /// For single-channel images: resized as one channel (a third of the work), then
    /// replicated into the three planes, as `convert("RGB")` would have before resizing.
    pub fn apply_gray(&self, input: &str, gray: &GrayImage) -> Result<Vec<f32>, PreprocessError> {
        let (w, h) = gray.dimensions();
        self.resize_crop_normalize::<1>(input, gray.as_raw(), w, h)
    }

    fn resize_crop_normalize<const C: usize>(
        &self,
        input: &str,
        raw: &[u8],
        w: u32,
        h: u32,
    ) -> Result<Vec<f32>, PreprocessError> {
        if w == 0 || h == 0 {
            return Err(PreprocessError::Invalid {
                input: input.into(),
                message: "image has no pixels".into(),
            });
        }
        let (rw, rh) = self.resized_dims(w, h);
        if (rw, rh) == (w, h) {
            return Ok(self.place_normalize::<C>(raw, w as usize, h as usize));
        }
        let pixel = if C == 1 {
            fr::PixelType::U8
        } else {
            fr::PixelType::U8x3
        };
        let src = fr::images::ImageRef::new(w, h, raw, pixel)
            .expect("an image buffer holds width × height × channels bytes. This is a bug.");
        let mut dst = fr::images::Image::new(rw, rh, pixel);
        let options = fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(self.filter));
        fr::Resizer::new()
            .resize(&src, &mut dst, &options)
            .map_err(|e| PreprocessError::Invalid {
                input: input.into(),
                message: format!("resize failed: {e}"),
            })?;
        Ok(self.place_normalize::<C>(dst.buffer(), rw as usize, rh as usize))
    }

    /// Where the resized `w`×`h` image lies in the output square: the image's column and row
    /// at the square's (0, 0) (negative where the image starts inside the square), and per
    /// channel the normalised value of the square's pixels it does not cover.
    pub(super) fn placement(&self, w: usize, h: usize) -> (i64, i64, [f32; 3]) {
        let s = i64::from(self.size);
        let (w, h) = (w as i64, h as i64);
        match self.view {
            // transformers' center_crop: top = (h - crop) // 2 with floor division, and a zero
            // pixel where the image is smaller than the crop.
            View::CenterCrop => ((w - s).div_euclid(2), (h - s).div_euclid(2), self.offset),
            // Centred as PIL's paste at ((size - w) // 2, (size - h) // 2); the mean colour,
            // which normalises to 0.
            View::Pad | View::Squash => (-((s - w).max(0) / 2), -((s - h).max(0) / 2), [0.0; 3]),
        }
    }

    /// The resized image placed in the square ([`Self::placement`]: center crop or padding)
    /// and normalised into CHW. `C` channels per source pixel: 3 (RGB) or 1 (grey, replicated).
    fn place_normalize<const C: usize>(&self, raw: &[u8], w: usize, h: usize) -> Vec<f32> {
        let s = self.size as usize;
        let (left, top, fill) = self.placement(w, h);
        // The square's columns that fall inside the image; the rest is padding.
        let x0 = (-left).clamp(0, s as i64) as usize;
        let x1 = (w as i64 - left).clamp(x0 as i64, s as i64) as usize;
        let mut out = vec![0f32; 3 * s * s];
        for (c, plane) in out.chunks_exact_mut(s * s).enumerate() {
            let (scale, offset, fill) = (self.scale[c], self.offset[c], fill[c]);
            let channel = if C == 1 { 0 } else { c };
            for (y, row) in plane.chunks_exact_mut(s).enumerate() {
                let sy = top + y as i64;
                if !(0..h as i64).contains(&sy) {
                    row.fill(fill);
                    continue;
                }
                row[..x0].fill(fill);
                row[x1..].fill(fill);
                let start = (sy as usize * w) + (left + x0 as i64) as usize;
                let src = &raw[start * C..(start + (x1 - x0)) * C];
                for (d, px) in row[x0..x1].iter_mut().zip(src.chunks_exact(C)) {
                    *d = f32::from(px[channel]) * scale + offset;
                }
            }
        }
        out
    }
}

/// [`View::Pad`]'s resize target for a `width`×`height` image: the longer side `size`, the
/// shorter `size × short / long` rounded to nearest (halves up), at least 1. Integer
/// arithmetic, so tests/reference/make_fixtures.py computes the same.
pub fn pad_dims(size: u32, width: u32, height: u32) -> (u32, u32) {
    let (short, long) = (u64::from(width.min(height)), u64::from(width.max(height)));
    if long == 0 {
        return (size, size);
    }
    let scaled = ((u64::from(size) * short + long / 2) / long).clamp(1, u64::from(size)) as u32;
    if width >= height {
        (size, scaled)
    } else {
        (scaled, size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn center_crop(s: &ImageSettings) -> Transform {
        Transform::new(s).with_view(View::CenterCrop)
    }

    #[test]
    fn shortest_edge_keeps_aspect_and_truncates() {
        let t = center_crop(&ImageSettings::clip());
        assert_eq!(t.resized_dims(640, 480), (298, 224)); // 224 * 640 / 480 = 298.67
        assert_eq!(t.resized_dims(480, 640), (224, 298));
        assert_eq!(t.resized_dims(250, 250), (224, 224));
        assert_eq!(t.resized_dims(2448, 2048), (267, 224));
    }

    #[test]
    fn a_flat_image_normalises_to_the_hand_computed_value() {
        let t = center_crop(&ImageSettings::clip());
        let img = RgbImage::from_pixel(300, 200, image::Rgb([255, 0, 128]));
        let out = t.apply("flat", &img).unwrap();
        assert_eq!(out.len(), 3 * 224 * 224);
        let expect = [
            (1.0 - 0.48145466) / 0.26862954,
            (0.0 - 0.4578275) / 0.261_302_6,
            (128.0 / 255.0 - 0.40821073) / 0.275_777_1,
        ];
        for c in 0..3 {
            let plane = &out[c * 224 * 224..(c + 1) * 224 * 224];
            for v in plane {
                assert!(
                    (v - expect[c]).abs() < 1e-5,
                    "channel {c}: {v} vs {}",
                    expect[c]
                );
            }
        }
    }

    #[test]
    fn center_crop_takes_the_middle() {
        // A 224×300 image whose rows are numbered: the crop must start at row (300-224)/2 = 38.
        let mut img = RgbImage::new(224, 300);
        for (_, y, p) in img.enumerate_pixels_mut() {
            *p = image::Rgb([(y % 256) as u8; 3]);
        }
        let mut s = ImageSettings::clip();
        s.mean = [0.0; 3];
        s.std = [1.0; 3];
        s.rescale_factor = 1.0;
        let out = center_crop(&s).apply("rows", &img).unwrap();
        assert_eq!(out[0], 38.0);
        assert_eq!(out[223 * 224], ((38 + 223) % 256) as f32);
    }

    #[test]
    fn region_outside_the_image_is_refused() {
        let img = DynamicImage::ImageRgb8(RgbImage::new(100, 100));
        let ok = crop(
            "cam1",
            img.clone(),
            Region {
                x: 10,
                y: 10,
                width: 50,
                height: 90,
            },
        )
        .unwrap();
        assert_eq!((ok.width(), ok.height()), (50, 90));
        let err = crop(
            "cam1",
            img,
            Region {
                x: 60,
                y: 0,
                width: 50,
                height: 10,
            },
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with("cam1: region of interest"),
            "{err}"
        );
    }
}
