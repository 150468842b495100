//! How many bytes [`Preprocessor::run`] will hold for one image, from its header alone.
//!
//! `run` goes through stages, each holding some buffers at once: decoding (the decoded frame
//! and the decoder's own buffers), EXIF rotation (a rotated copy), the region of interest (a
//! copy of the region at the decoded depth), conversion to 8-bit RGB or grey (a converted
//! copy), CLAHE (its output and an L*a*b* copy) and the resize (the target, the resizer's
//! intermediate image and tables, and the output tensor). The plan is the largest of those
//! sums, computed with the same sizes `run` will meet, so the pipeline can reserve it from its
//! byte budget before a pixel is decoded.

use image::{ColorType, ImageFormat};

use super::decode::{check_dims, dct_numerator, Header};
use super::{PreprocessError, Preprocessor, Region};

/// Header structures, Huffman and quantisation tables, decoder state and allocator rounding,
/// which the stages do not count one by one; and CLAHE's rayon bookkeeping (a job allocated
/// on the calling thread, freed by a pool thread, so sometimes still held when the resize
/// peaks: 1,520 bytes measured).
const FIXED_BYTES: u64 = 16 << 10;

/// What [`Preprocessor::run`] will hold for one image, known from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    /// The most bytes `run` holds at once: the decoded frame at its real depth (16-bit
    /// samples take two bytes), the decoder's own buffers (libjpeg's included, which live
    /// outside Rust's heap), the copies alive at the same time (rotation, region, 8-bit
    /// conversion, CLAHE), the resize target and the output tensor. Not counting the input
    /// bytes, which the caller holds.
    pub peak_bytes: u64,
    /// The decoded frame: `decoded_width × decoded_height × bytes per pixel`.
    pub decoded_bytes: u64,
    /// The tensors `views` returns (3 × size² floats each: the whole-frame view and, for a
    /// tiled profile, every window), still held after it returns.
    pub output_bytes: u64,
    /// The decoded frame's size, after EXIF orientation and any JPEG DCT scaling.
    pub decoded_width: u32,
    pub decoded_height: u32,
    /// The decoded frame's colour type (JPEGs come out of libjpeg as RGB8).
    pub decoded_color: ColorType,
}

pub(super) fn plan(
    pre: &Preprocessor,
    input: &str,
    input_len: usize,
    header: &Header,
    region: Option<Region>,
) -> Result<MemoryPlan, PreprocessError> {
    let (w, h) = (header.width, header.height);
    if w == 0 || h == 0 {
        return Err(PreprocessError::Invalid {
            input: input.into(),
            message: "image has no pixels".into(),
        });
    }
    // JPEGs go to libjpeg unless they have four components (CMYK, YCCK), which `image`'s
    // decoder takes. When the markers could not be followed, either may happen: count both.
    let four_components = header.jpeg.as_ref().map(|j| j.sampling.len() == 4);
    let is_jpeg = header.format == ImageFormat::Jpeg;
    let libjpeg = is_jpeg && four_components != Some(true);
    let fallback = is_jpeg && four_components != Some(false);
    let color = if is_jpeg {
        ColorType::Rgb8
    } else {
        header.color
    };
    let bpp = u64::from(color.bytes_per_pixel());
    let stored_bpp = u64::from(header.stored_bits_per_pixel).div_ceil(8);
    // The decoder's limit, on the frame at full size as libjpeg and `image` check it.
    check_dims(
        input,
        u64::from(w),
        u64::from(h),
        bpp.max(stored_bpp),
        &pre.limits,
    )?;
    if let Some(f) = &header.tiff_jpeg {
        // The JPEG decoder allocates the frame the strips' data declares, not the TIFF's.
        check_dims(
            input,
            u64::from(f.width),
            u64::from(f.height),
            f.channels(),
            &pre.limits,
        )
        .map_err(|e| match e {
            PreprocessError::TooLarge { input, message } => PreprocessError::TooLarge {
                input,
                message: format!(
                    "the JPEG data in its strips declares a {}×{} frame: {message}",
                    f.width, f.height
                ),
            },
            other => other,
        })?;
    }
    // libjpeg may decode scaled down in the DCT domain (never when `image` decodes it).
    let (dw, dh) = match pre.dct_min_short(region).filter(|_| libjpeg && !fallback) {
        Some(min) => {
            let n = u64::from(dct_numerator(w.min(h) as usize, min as usize));
            let scaled = |side: u32| (u64::from(side) * n).div_ceil(8) as u32;
            (scaled(w), scaled(h))
        }
        None => (w, h),
    };
    // Refuse before decoding: the aspect ratio, the region and the resize target, on the
    // frame as stored (`run` checks them again on what was decoded).
    let (ow, oh) = if header.rotates() { (h, w) } else { (w, h) };
    pre.check_geometry(input, ow, oh, region)?;

    let decoded = u64::from(dw) * u64::from(dh) * bpp;
    let mut peak = decoded + decoder_bytes(header, input_len, decoded, libjpeg, fallback);
    if header.rotates() {
        // `apply_orientation` rotates into a new buffer.
        peak = peak.max(2 * decoded);
    }
    let (mut cw, mut ch) = if header.rotates() { (dh, dw) } else { (dw, dh) };
    let mut held = decoded;
    if let Some(r) = region {
        let copy = u64::from(r.width) * u64::from(r.height) * bpp;
        peak = peak.max(held + copy);
        held = copy;
        (cw, ch) = (r.width, r.height);
    }
    // Grey stays one channel unless CLAHE (which works on RGB) is on; anything but RGB8 (or
    // 8-bit grey staying grey) is converted into a new buffer.
    let gray = pre.clahe.is_none() && matches!(color, ColorType::L8 | ColorType::L16);
    let channels = if gray { 1 } else { 3 };
    let converted = u64::from(cw) * u64::from(ch) * channels;
    if !(color == ColorType::Rgb8 || (gray && color == ColorType::L8)) {
        peak = peak.max(held + converted);
    }
    held = converted;
    if let Some(clahe) = &pre.clahe {
        peak = peak.max(held + clahe.held_bytes(cw, ch));
    }
    peak = peak.max(held + pre.transform.held_bytes(cw, ch, channels));
    let mut output_bytes = pre.transform.output_bytes();
    if let Some(t) = &pre.tiles {
        // Every view's tensor is kept until the last window is made; the largest window's
        // copy and resize come on top of them.
        let windows = t.config.layout(cw, ch);
        output_bytes *= 1 + windows.len() as u64;
        let window = windows
            .iter()
            .map(|w| u64::from(w.side))
            .max()
            .map_or(0, |side| {
                side * side * channels + t.window.held_bytes(side as u32, side as u32, channels)
            });
        peak = peak.max(held + output_bytes + window);
    }
    let (decoded_width, decoded_height) = if header.rotates() { (dh, dw) } else { (dw, dh) };
    Ok(MemoryPlan {
        peak_bytes: peak + FIXED_BYTES,
        decoded_bytes: decoded,
        output_bytes,
        decoded_width,
        decoded_height,
        decoded_color: color,
    })
}

/// The decoder's own buffers while it decodes, besides the decoded frame.
fn decoder_bytes(
    header: &Header,
    input_len: usize,
    decoded: u64,
    libjpeg: bool,
    fallback: bool,
) -> u64 {
    let (w, h) = (u64::from(header.width), u64::from(header.height));
    let input_len = input_len as u64;
    let stored_row = (w * u64::from(header.stored_bits_per_pixel)).div_ceil(8);
    let stored = stored_row * h;
    // Every component at full resolution, two bytes a sample, in whole 16×16 macroblocks.
    let all_coefficients = w.next_multiple_of(16) * h.next_multiple_of(16) * 2 * 4;
    match header.format {
        ImageFormat::Jpeg => {
            let coefficients = header
                .jpeg
                .as_ref()
                .map_or(all_coefficients, |j| j.coefficient_bytes());
            let mut bytes = 0;
            if libjpeg {
                // libjpeg's (outside Rust's heap, not measured by the tests): row groups for
                // the IDCT, upsampling and colour conversion, at most a few hundred bytes a
                // column, and the whole image's coefficients when there are several scans.
                bytes = (256 << 10) + 256 * w.next_multiple_of(16) + coefficients;
            }
            if fallback {
                // `image`'s decoder (zune-jpeg): its copy of the input, and per component
                // rows or (progressive) the whole image's coefficients.
                bytes = bytes.max(input_len + (256 << 10) + 256 * w + all_coefficients);
            }
            bytes
        }
        // Rows being unfiltered and the inflater's window and output.
        ImageFormat::Png => 8 * (stored_row + 1) + (512 << 10),
        // A row or two and the palette.
        ImageFormat::Bmp => 4 * stored_row + (64 << 10),
        ImageFormat::Tiff => {
            // `image` has the tiff crate decode the whole image into a buffer at the stored
            // depth, then copies (or converts, CMYK) it into the frame; the chunk offsets and
            // sizes take two u64 a strip, at most one strip a row.
            let base = stored + 16 * h;
            match header.tiff_compression {
                // None, CCITT, LZW, Deflate, PackBits: streamed into that buffer.
                Some(1..=5 | 8 | 32946 | 32773) => base + 4 * stored_row + (512 << 10),
                // JPEG (and the unknown): a chunk, which may be the whole image, is read
                // whole, decoded into a buffer of its own with the decoder's coefficients,
                // at the size the chunk's JPEG data declares, which may exceed the TIFF's;
                // zune-jpeg's own buffers besides (a marker segment's copy, up to 64 KiB,
                // made before it checks the bytes are there; its tables).
                _ => {
                    let frame = header.tiff_jpeg.map_or(0, |f| f.decoded_bytes());
                    base + input_len + (256 << 10) + (3 * stored).max(frame)
                }
            }
        }
        // Not compiled in (the decoder refuses it), but never count less than a copy.
        _ => input_len + decoded,
    }
}
