//! Resize, crop and normalise, as the checkpoint's processor does.

use fast_image_resize as fr;
use image::{DynamicImage, RgbImage};

use super::{PreprocessError, Region};
use crate::model::artifact::{ImageSettings, Interpolation, ResizeMode};

#[derive(Debug, Clone)]
pub struct Transform {
    pub size: u32,
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

pub(super) fn crop_region(
    input: &str,
    rgb: &RgbImage,
    r: Region,
) -> Result<RgbImage, PreprocessError> {
    let (w, h) = rgb.dimensions();
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
    Ok(image::imageops::crop_imm(rgb, r.x, r.y, r.width, r.height).to_image())
}

impl Transform {
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
            mode: s.resize,
            resize_size: s.resize_size,
            filter,
            scale,
            offset,
        }
    }

    /// The size the whole image is resized to before cropping.
    pub fn resized_dims(&self, width: u32, height: u32) -> (u32, u32) {
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
        if w == 0 || h == 0 {
            return Err(PreprocessError::Invalid {
                input: input.into(),
                message: "image has no pixels".into(),
            });
        }
        let (rw, rh) = self.resized_dims(w, h);
        let resized = if (rw, rh) == (w, h) {
            rgb.clone()
        } else {
            let src = fr::images::ImageRef::new(w, h, rgb.as_raw(), fr::PixelType::U8x3)
                .expect("an RgbImage buffer holds width × height × 3 bytes. This is a bug.");
            let mut dst = fr::images::Image::new(rw, rh, fr::PixelType::U8x3);
            let options =
                fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(self.filter));
            fr::Resizer::new()
                .resize(&src, &mut dst, &options)
                .map_err(|e| PreprocessError::Invalid {
                    input: input.into(),
                    message: format!("resize failed: {e}"),
                })?;
            RgbImage::from_raw(rw, rh, dst.into_vec())
                .expect("resized buffer has rw × rh × 3 bytes. This is a bug.")
        };
        Ok(self.crop_normalize(&resized))
    }

    /// Center crop (zero-padded where the image is smaller, as transformers does) and
    /// normalise into CHW.
    fn crop_normalize(&self, img: &RgbImage) -> Vec<f32> {
        let s = self.size as usize;
        let (w, h) = (img.width() as i64, img.height() as i64);
        // transformers' center_crop: top = (h - crop) // 2 with floor division.
        let top = (h - s as i64).div_euclid(2);
        let left = (w - s as i64).div_euclid(2);
        let mut out = vec![0f32; 3 * s * s];
        let raw = img.as_raw();
        for y in 0..s {
            let sy = top + y as i64;
            for x in 0..s {
                let sx = left + x as i64;
                let inside = (0..h).contains(&sy) && (0..w).contains(&sx);
                for c in 0..3 {
                    let v = if inside {
                        f32::from(raw[((sy * w + sx) * 3) as usize + c])
                    } else {
                        0.0
                    };
                    out[c * s * s + y * s + x] = v * self.scale[c] + self.offset[c];
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clip_settings() -> ImageSettings {
        ImageSettings {
            size: 224,
            resize: ResizeMode::ShortestEdge,
            resize_size: 224,
            interpolation: Interpolation::Bicubic,
            rescale_factor: 1.0 / 255.0,
            mean: [0.48145466, 0.4578275, 0.40821073],
            std: [0.26862954, 0.261_302_6, 0.275_777_1],
        }
    }

    #[test]
    fn shortest_edge_keeps_aspect_and_truncates() {
        let t = Transform::new(&clip_settings());
        assert_eq!(t.resized_dims(640, 480), (298, 224)); // 224 * 640 / 480 = 298.67
        assert_eq!(t.resized_dims(480, 640), (224, 298));
        assert_eq!(t.resized_dims(250, 250), (224, 224));
        assert_eq!(t.resized_dims(2448, 2048), (267, 224));
    }

    #[test]
    fn a_flat_image_normalises_to_the_hand_computed_value() {
        let t = Transform::new(&clip_settings());
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
        let mut s = clip_settings();
        s.mean = [0.0; 3];
        s.std = [1.0; 3];
        s.rescale_factor = 1.0;
        let out = Transform::new(&s).apply("rows", &img).unwrap();
        assert_eq!(out[0], 38.0);
        assert_eq!(out[223 * 224], ((38 + 223) % 256) as f32);
    }

    #[test]
    fn region_outside_the_image_is_refused() {
        let img = RgbImage::new(100, 100);
        let ok = crop_region(
            "cam1",
            &img,
            Region {
                x: 10,
                y: 10,
                width: 50,
                height: 90,
            },
        )
        .unwrap();
        assert_eq!(ok.dimensions(), (50, 90));
        let err = crop_region(
            "cam1",
            &img,
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
