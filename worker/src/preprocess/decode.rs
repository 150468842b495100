//! Bytes to a decoded image, within limits, orientation applied.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader};
use serde::{Deserialize, Serialize};

use super::PreprocessError;

/// Bounds on what a decoder may allocate: an image header is untrusted input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeLimits {
    pub max_width: u32,
    pub max_height: u32,
    /// Largest single allocation a decoder may make, in bytes.
    pub max_alloc_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        // 16384² covers every machine-vision sensor in use; 512 MiB holds a 16-bit RGBA frame of
        // 8K × 8K, and far less than that is needed for the usual 5–25 MP cameras.
        Self {
            max_width: 16384,
            max_height: 16384,
            max_alloc_bytes: 512 << 20,
        }
    }
}

pub fn decode(
    input: &str,
    bytes: &[u8],
    limits: &DecodeLimits,
) -> Result<DynamicImage, PreprocessError> {
    decode_scaled(input, bytes, limits, None)
}

/// As [`decode`]; a JPEG may come out smaller, scaled by 1/2, 1/4 or 1/8 in libjpeg's DCT
/// domain (a fraction of the work), but never with its shorter side under `min_short_edge`.
pub fn decode_scaled(
    input: &str,
    bytes: &[u8],
    limits: &DecodeLimits,
    min_short_edge: Option<u32>,
) -> Result<DynamicImage, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Invalid {
            input: input.into(),
            message: "empty image (0 bytes)".into(),
        });
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| PreprocessError::Decode {
            input: input.into(),
            message: e.to_string(),
        })?;
    let mut l = image::Limits::default();
    l.max_image_width = Some(limits.max_width);
    l.max_image_height = Some(limits.max_height);
    l.max_alloc = Some(limits.max_alloc_bytes);
    reader.limits(l);
    if reader.format().is_none() {
        return Err(PreprocessError::UnsupportedFormat {
            input: input.into(),
            message: format!(
                "unrecognised signature {:02x?}",
                &bytes[..bytes.len().min(8)]
            ),
        });
    }
    if reader.format() == Some(ImageFormat::Jpeg) && !has_jpeg_end(bytes) {
        // The JPEG decoder fills a cut-off scan with grey and reports success; a part image
        // cut short in transit must not be inspected as if it were whole.
        return Err(PreprocessError::Decode {
            input: input.into(),
            message: "truncated JPEG (no end-of-image marker)".into(),
        });
    }
    let is_jpeg = reader.format() == Some(ImageFormat::Jpeg);
    let map = |e: ImageError| map_error(input, e);
    let mut decoder = reader.into_decoder().map_err(map)?;
    // A missing or broken EXIF block is not worth refusing the image for: assume upright.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = match is_jpeg
        .then(|| decode_jpeg_libjpeg(input, bytes, limits, min_short_edge))
        .flatten()
    {
        Some(decoded) => decoded?,
        None => DynamicImage::from_decoder(decoder).map_err(map)?,
    };
    image.apply_orientation(orientation);
    Ok(image)
}

/// JPEG through libjpeg-turbo (the mozjpeg fork), the decoder Pillow uses: same integer IDCT
/// and "fancy" chroma upsampling, hence the same pixels as CLIP's reference preprocessing
/// (`image`'s pure-Rust decoder differs by a grey level here and there, which moved class
/// probabilities by up to 2e-4 on the test model). `None` for what libjpeg cannot give as RGB
/// (CMYK): the caller falls back to `image`'s decoder.
fn decode_jpeg_libjpeg(
    input: &str,
    bytes: &[u8],
    limits: &DecodeLimits,
    min_short_edge: Option<u32>,
) -> Option<Result<DynamicImage, PreprocessError>> {
    let decoded = std::panic::catch_unwind(
        || -> std::io::Result<Option<Result<DynamicImage, PreprocessError>>> {
            let mut d = mozjpeg::Decompress::new_mem(bytes)?;
            let (w, h) = d.size();
            if let Err(e) = check_dims(input, w as u64, h as u64, 3, limits) {
                return Ok(Some(Err(e)));
            }
            if matches!(
                d.color_space(),
                mozjpeg::ColorSpace::JCS_CMYK | mozjpeg::ColorSpace::JCS_YCCK
            ) {
                return Ok(None);
            }
            if let Some(min) = min_short_edge {
                d.scale(dct_numerator(w.min(h), min as usize));
            }
            let mut started = d.rgb()?;
            let (w, h) = (started.width(), started.height());
            let data: Vec<u8> = started.read_scanlines()?;
            started.finish()?;
            let rgb = image::RgbImage::from_raw(w as u32, h as u32, data).ok_or_else(|| {
                std::io::Error::other("libjpeg returned fewer rows than the header declares")
            })?;
            Ok(Some(Ok(DynamicImage::ImageRgb8(rgb))))
        },
    );
    match decoded {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Some(Err(PreprocessError::Decode {
            input: input.into(),
            message: e.to_string(),
        })),
        Err(_) => Some(Err(PreprocessError::Decode {
            input: input.into(),
            message: "libjpeg failed on this data".into(),
        })),
    }
}

/// The smallest libjpeg scale (numerator over 8) that keeps the shorter side at `min` or
/// more (libjpeg rounds the scaled size up).
fn dct_numerator(short: usize, min: usize) -> u8 {
    [1u8, 2, 4]
        .into_iter()
        .find(|&n| (short * usize::from(n)).div_ceil(8) >= min)
        .unwrap_or(8)
}

fn check_dims(
    input: &str,
    w: u64,
    h: u64,
    channels: u64,
    limits: &DecodeLimits,
) -> Result<(), PreprocessError> {
    let too_large = |message: String| PreprocessError::TooLarge {
        input: input.into(),
        message,
    };
    if w > u64::from(limits.max_width) || h > u64::from(limits.max_height) {
        return Err(too_large(format!(
            "{w}×{h} exceeds the {}×{} limit",
            limits.max_width, limits.max_height
        )));
    }
    if w * h * channels > limits.max_alloc_bytes {
        return Err(too_large(format!(
            "{w}×{h} needs more than the {} bytes allowed",
            limits.max_alloc_bytes
        )));
    }
    Ok(())
}

/// Whether a JPEG stream ends with its EOI marker (FF D9), allowing for the zero or 0xFF
/// padding some cameras append.
fn has_jpeg_end(bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(256)..];
    let end = tail
        .iter()
        .rposition(|&b| b != 0x00 && b != 0xFF)
        .map_or(0, |i| i + 1);
    let trimmed = &tail[..end];
    // After trimming padding the last byte is D9, preceded by FF.
    trimmed.ends_with(&[0xD9]) && end >= 2 && tail[end - 2] == 0xFF
}

fn map_error(input: &str, e: ImageError) -> PreprocessError {
    let input = input.to_string();
    match e {
        ImageError::Limits(l) => PreprocessError::TooLarge {
            input,
            message: l.to_string(),
        },
        ImageError::Unsupported(u) => PreprocessError::UnsupportedFormat {
            input,
            message: u.to_string(),
        },
        other => PreprocessError::Decode {
            input,
            message: other.to_string(),
        },
    }
}

#[cfg(test)]
mod dct_tests {
    use super::*;

    #[test]
    fn dct_scaling_keeps_the_shorter_side_above_the_minimum() {
        assert_eq!(dct_numerator(1080, 448), 4); // 540
        assert_eq!(dct_numerator(1080, 224), 2); // 270
        assert_eq!(dct_numerator(2048, 224), 1); // 256
        assert_eq!(dct_numerator(250, 224), 8); // no room
        assert_eq!(dct_numerator(448, 224), 4); // exactly 224
    }

    #[test]
    fn a_scaled_jpeg_decodes_smaller_and_whole() {
        let img = image::RgbImage::from_fn(1920, 1080, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 90])
        });
        let mut bytes = Vec::new();
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut std::io::Cursor::new(&mut bytes), ImageFormat::Jpeg)
            .unwrap();
        let full = decode("f.jpg", &bytes, &DecodeLimits::default()).unwrap();
        assert_eq!((full.width(), full.height()), (1920, 1080));
        let scaled = decode_scaled("f.jpg", &bytes, &DecodeLimits::default(), Some(448)).unwrap();
        assert_eq!((scaled.width(), scaled.height()), (960, 540));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img =
            image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 3) as u8, 90]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Jpeg).unwrap();
        out.into_inner()
    }

    #[test]
    fn a_whole_jpeg_decodes_and_a_cut_one_is_refused() {
        let bytes = jpeg(64, 48);
        let img = decode("cam3/0001.jpg", &bytes, &DecodeLimits::default()).unwrap();
        assert_eq!((img.width(), img.height()), (64, 48));
        let mut padded = bytes.clone();
        padded.extend_from_slice(&[0, 0, 0]);
        assert!(decode("padded", &padded, &DecodeLimits::default()).is_ok());
        let err = decode(
            "cam3/0002.jpg",
            &bytes[..bytes.len() / 2],
            &DecodeLimits::default(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "cam3/0002.jpg: cannot decode image: truncated JPEG (no end-of-image marker)"
        );
    }

    #[test]
    fn limits_refuse_before_decoding() {
        let bytes = jpeg(64, 48);
        let limits = DecodeLimits {
            max_width: 32,
            ..DecodeLimits::default()
        };
        let err = decode("wide.jpg", &bytes, &limits).unwrap_err();
        assert!(matches!(err, PreprocessError::TooLarge { .. }), "{err}");
        assert_eq!(err.code(), "TOO_LARGE");
    }

    #[test]
    fn sixteen_bit_grey_png_decodes() {
        let img = image::ImageBuffer::<image::Luma<u16>, _>::from_fn(40, 30, |x, _| {
            image::Luma([(x * 1000) as u16])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        let decoded = decode("mono16.png", out.get_ref(), &DecodeLimits::default()).unwrap();
        assert_eq!(decoded.color(), image::ColorType::L16);
        let rgb = crate::preprocess::to_rgb8(decoded);
        assert_eq!(rgb.get_pixel(39, 0).0, [152, 152, 152]); // 39000 / 257 = 151.75
    }
}
