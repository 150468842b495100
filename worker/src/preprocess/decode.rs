//! Bytes to a decoded image, within limits, orientation applied; and what a header says
//! before any pixel is decoded ([`read_header`]).

use std::io::Cursor;

use image::metadata::Orientation;
use image::{ColorType, DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader};
use serde::{Deserialize, Serialize};

use super::tiff::{self, Ifd, JpegFrame};
use super::PreprocessError;

/// Bounds on what a decoder may allocate: an image header is untrusted input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeLimits {
    /// Widest image decoded, in pixels (its header is read first: wider is TOO_LARGE).
    pub max_width: u32,
    /// Tallest image decoded, in pixels.
    pub max_height: u32,
    /// Largest single allocation a decoder may make, in bytes. Also bounds the decoded
    /// frame itself and the shortest-edge resize's target.
    pub max_alloc_bytes: u64,
    /// Longest side over shortest side of what is resized (the region of interest when there
    /// is one, else the whole image, after EXIF orientation), at most this many to one;
    /// longer is refused as TOO_LARGE before decoding. The shortest-edge resize scales the
    /// shorter side to the model's size, so without a bound a 16000×1 frame would become a
    /// 3,584,000×224 image (2.4 GB) on its way to a 224×224 crop. The default, 32, is twice
    /// what line-scan cameras usually deliver (16384×1024 or 8192×512 frames: 16:1) and
    /// covers 16384×512 ones; area-scan sensors stay under 3:1. At 32 the resize target of a
    /// 224 model is at most 7168×224 pixels (4.8 MB).
    #[schemars(range(min = 1))]
    pub max_aspect_ratio: u32,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        // 16384² covers every machine-vision sensor in use; 512 MiB holds a 16-bit RGBA frame of
        // 8K × 8K, and far less than that is needed for the usual 5–25 MP cameras.
        Self {
            max_width: 16384,
            max_height: 16384,
            max_alloc_bytes: 512 << 20,
            max_aspect_ratio: 32,
        }
    }
}

/// What an image's header says, read without decoding pixel data.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub format: ImageFormat,
    /// As stored, before EXIF orientation.
    pub width: u32,
    pub height: u32,
    /// What `image`'s decoder yields (JPEGs decoded by libjpeg come out RGB8 instead).
    pub color: ColorType,
    /// Bits per pixel as stored: TIFF decodes into a buffer of this depth before converting.
    pub stored_bits_per_pixel: u16,
    pub orientation: Orientation,
    /// JPEG only: its frame and first scan, when the markers could be followed.
    pub jpeg: Option<JpegLayout>,
    /// TIFF only: the first image's compression tag, when it could be read.
    pub tiff_compression: Option<u16>,
    /// JPEG-compressed TIFF only: the largest frame its strips' JPEG data could make the
    /// decoder allocate, whatever size the TIFF gives them (see [`super::tiff`]).
    pub tiff_jpeg: Option<JpegFrame>,
}

impl Header {
    /// Whether applying the orientation swaps width and height (and copies the image).
    pub fn rotates(&self) -> bool {
        matches!(
            self.orientation,
            Orientation::Rotate90
                | Orientation::Rotate270
                | Orientation::Rotate90FlipH
                | Orientation::Rotate270FlipH
        )
    }
}

/// Reads the header: format, dimensions, colour type, orientation. Applies the dimension
/// limits; decodes no pixel data (for a JPEG, only the bytes up to its first scan are read).
pub(crate) fn read_header(
    input: &str,
    bytes: &[u8],
    limits: &DecodeLimits,
) -> Result<Header, PreprocessError> {
    let format = check_input(input, bytes, limits)?;
    let jpeg = (format == ImageFormat::Jpeg)
        .then(|| JpegLayout::parse(bytes))
        .flatten();
    let map = |e: ImageError| map_error(input, e);
    // `image`'s JPEG decoder copies all the bytes it is given: give it the headers only.
    let head = jpeg.as_ref().map_or(bytes, |j| &bytes[..j.header_end]);
    let mut decoder = reader(input, head, limits)?.into_decoder().map_err(map)?;
    let (width, height) = decoder.dimensions();
    let tiff = (format == ImageFormat::Tiff)
        .then(|| Ifd::parse(bytes))
        .flatten();
    let tiff_compression = tiff.as_ref().and_then(Ifd::compression);
    let tiff_jpeg = match &tiff {
        Some(ifd) if tiff_compression.is_none_or(|c| c == tiff::JPEG) => {
            ifd.largest_jpeg_frame()
                .map_err(|e| PreprocessError::Decode {
                    input: input.into(),
                    message: e.to_string(),
                })?
        }
        _ => None,
    };
    Ok(Header {
        format,
        width,
        height,
        color: decoder.color_type(),
        stored_bits_per_pixel: decoder.original_color_type().bits_per_pixel(),
        // A missing or broken EXIF block is not worth refusing the image for: assume upright.
        orientation: decoder.orientation().unwrap_or(Orientation::NoTransforms),
        jpeg,
        tiff_compression,
        tiff_jpeg,
    })
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
    let format = check_input(input, bytes, limits)?;
    let map = |e: ImageError| map_error(input, e);
    let image = if format == ImageFormat::Jpeg {
        // The orientation from a decoder given only the headers, dropped before libjpeg
        // decodes: `image`'s decoder holds a copy of the bytes it reads.
        let head = JpegLayout::parse(bytes).map_or(bytes, |j| &bytes[..j.header_end]);
        let orientation = reader(input, head, limits)?
            .into_decoder()
            .map_err(map)?
            .orientation()
            .unwrap_or(Orientation::NoTransforms);
        let mut image = match decode_jpeg_libjpeg(input, bytes, limits, min_short_edge) {
            Some(decoded) => decoded?,
            None => {
                let decoder = reader(input, bytes, limits)?.into_decoder().map_err(map)?;
                DynamicImage::from_decoder(decoder).map_err(map)?
            }
        };
        image.apply_orientation(orientation);
        image
    } else {
        let mut decoder = reader(input, bytes, limits)?.into_decoder().map_err(map)?;
        let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
        let mut image = DynamicImage::from_decoder(decoder).map_err(map)?;
        image.apply_orientation(orientation);
        image
    };
    if image.width() == 0 || image.height() == 0 {
        return Err(PreprocessError::Invalid {
            input: input.into(),
            message: "image has no pixels".into(),
        });
    }
    Ok(image)
}

/// The checks every input gets before a decoder sees it: not empty, a known signature, a
/// JPEG not cut short. Returns the format.
fn check_input(
    input: &str,
    bytes: &[u8],
    limits: &DecodeLimits,
) -> Result<ImageFormat, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Invalid {
            input: input.into(),
            message: "empty image (0 bytes)".into(),
        });
    }
    let Some(format) = reader(input, bytes, limits)?.format() else {
        return Err(PreprocessError::UnsupportedFormat {
            input: input.into(),
            message: format!(
                "unrecognised signature {:02x?}",
                &bytes[..bytes.len().min(8)]
            ),
        });
    };
    if format == ImageFormat::Jpeg && !has_jpeg_end(bytes) {
        // The JPEG decoder fills a cut-off scan with grey and reports success; a part image
        // cut short in transit must not be inspected as if it were whole.
        return Err(PreprocessError::Decode {
            input: input.into(),
            message: "truncated JPEG (no end-of-image marker)".into(),
        });
    }
    Ok(format)
}

/// A reader over `bytes` with its format guessed and the limits set.
fn reader<'a>(
    input: &str,
    bytes: &'a [u8],
    limits: &DecodeLimits,
) -> Result<ImageReader<Cursor<&'a [u8]>>, PreprocessError> {
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
    Ok(reader)
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
            let mut d = mozjpeg::Decompress::with_err(super::libjpeg::strict()).from_mem(bytes)?;
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
        Err(panic) => Some(Err(PreprocessError::Decode {
            input: input.into(),
            message: match panic.downcast::<super::libjpeg::LibjpegError>() {
                Ok(e) => format!("libjpeg: {}", e.0),
                Err(_) => "libjpeg failed on this data".into(),
            },
        })),
    }
}

/// The smallest libjpeg scale (numerator over 8) that keeps the shorter side at `min` or
/// more (libjpeg rounds the scaled size up).
pub(crate) fn dct_numerator(short: usize, min: usize) -> u8 {
    [1u8, 2, 4]
        .into_iter()
        .find(|&n| (short * usize::from(n)).div_ceil(8) >= min)
        .unwrap_or(8)
}

pub(crate) fn check_dims(
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

/// A JPEG's frame and first scan as its markers say, followed without decoding anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JpegLayout {
    /// Offset just past the first scan's header: all a header reader needs.
    pub header_end: usize,
    pub width: u32,
    pub height: u32,
    /// (horizontal, vertical) sampling factors, one pair per component.
    pub sampling: Vec<(u8, u8)>,
    /// libjpeg keeps the whole image's DCT coefficients (2 bytes a sample) when there is more
    /// than one scan: a progressive JPEG, or a first scan without every component.
    pub multi_scan: bool,
}

impl JpegLayout {
    /// `None` when the markers cannot be followed to a first scan (the caller then assumes
    /// the worst).
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        if !bytes.starts_with(&[0xFF, 0xD8]) {
            return None;
        }
        let mut pos = 2;
        // The frame header's, until the first scan says where the headers end.
        let mut frame: Option<Self> = None;
        loop {
            if *bytes.get(pos)? != 0xFF {
                return None;
            }
            while *bytes.get(pos)? == 0xFF {
                pos += 1;
            }
            let code = bytes[pos];
            pos += 1;
            match code {
                // Markers without a length: restart intervals, TEM.
                0xD0..=0xD7 | 0x01 => continue,
                0x00 | 0xD8 | 0xD9 => return None,
                _ => {}
            }
            let len = usize::from(u16::from_be_bytes([*bytes.get(pos)?, *bytes.get(pos + 1)?]));
            let segment = bytes.get(pos + 2..pos.checked_add(len)?)?;
            match code {
                // SOF0..SOF15 (not DHT, JPG, DAC).
                0xC0..=0xCF if !matches!(code, 0xC4 | 0xC8 | 0xCC) => {
                    let height = u16::from_be_bytes([*segment.get(1)?, *segment.get(2)?]);
                    let width = u16::from_be_bytes([*segment.get(3)?, *segment.get(4)?]);
                    let count = usize::from(*segment.get(5)?);
                    let sampling = (0..count)
                        .map(|i| {
                            let s = *segment.get(6 + 3 * i + 1)?;
                            Some(((s >> 4).max(1), (s & 0x0F).max(1)))
                        })
                        .collect::<Option<Vec<_>>>()?;
                    frame = Some(Self {
                        header_end: 0,
                        width: width.into(),
                        height: height.into(),
                        sampling,
                        multi_scan: matches!(code, 0xC2 | 0xC6 | 0xCA | 0xCE),
                    });
                }
                0xDA => {
                    let mut layout = frame?;
                    layout.header_end = pos + len;
                    layout.multi_scan |= usize::from(*segment.first()?) < layout.sampling.len();
                    return Some(layout);
                }
                _ => {}
            }
            pos += len;
        }
    }

    /// Bytes of libjpeg's whole-image coefficient buffer (jdcoefct.c: each component's
    /// blocks, rounded up to its sampling factors, 64 two-byte coefficients a block); 0 for a
    /// single-scan JPEG, which is decoded one row of blocks at a time.
    pub fn coefficient_bytes(&self) -> u64 {
        if !self.multi_scan {
            return 0;
        }
        let h_max = self
            .sampling
            .iter()
            .map(|s| u64::from(s.0))
            .max()
            .unwrap_or(1);
        let v_max = self
            .sampling
            .iter()
            .map(|s| u64::from(s.1))
            .max()
            .unwrap_or(1);
        let blocks = |size: u32, factor: u8, max: u64| {
            let factor = u64::from(factor);
            (u64::from(size) * factor)
                .div_ceil(8 * max)
                .next_multiple_of(factor)
        };
        self.sampling
            .iter()
            .map(|&(h, v)| blocks(self.width, h, h_max) * blocks(self.height, v, v_max) * 128)
            .sum()
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
    fn limits_without_the_aspect_ratio_default_it() {
        let old: DecodeLimits = serde_json::from_str(r#"{"max_width": 8192}"#).unwrap();
        assert_eq!((old.max_width, old.max_aspect_ratio), (8192, 32));
        let set: DecodeLimits = serde_json::from_str(r#"{"max_aspect_ratio": 64}"#).unwrap();
        assert_eq!(set.max_aspect_ratio, 64);
        assert!(serde_json::from_str::<DecodeLimits>(r#"{"max_aspect": 64}"#).is_err());
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
        assert_eq!(err.code(), crate::proto::v1::ErrorCode::TooLarge);
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
