//! libjpeg's error manager for the worker: errors unwind (as the mozjpeg crate's own manager
//! does, to the `catch_unwind` around every libjpeg call), and so does the warning that a
//! scan's data ended before its frame did.
//!
//! libjpeg answers data that runs out early (a marker where entropy-coded data should be:
//! "premature end of data segment"; or the end of the input) with a warning, fills the rest
//! of the frame with grey and reports success. A frame header that claims 12000×12000 over
//! the scan of a 250×250 image, or a part image cut in transit and closed with an end-of-image
//! marker, would then be inspected as a whole part that is mostly grey: a verdict on pixels
//! no camera took. With this manager they are decoding errors, as a file cut short before
//! its end-of-image marker already is. Other warnings (extraneous bytes before a marker,
//! which some encoders write) are still ignored.

use std::os::raw::c_int;

use mozjpeg_sys::{jpeg_common_struct, jpeg_error_mgr, J_MESSAGE_CODE};

/// The panic payload of a refused decode: what libjpeg said.
pub(crate) struct LibjpegError(pub String);

/// Warnings that mean the frame was not all there.
const DATA_ENDED_EARLY: [J_MESSAGE_CODE; 2] =
    [mozjpeg_sys::JWRN_HIT_MARKER, mozjpeg_sys::JWRN_JPEG_EOF];

/// An error manager for [`mozjpeg::Decompress::with_err`].
pub(crate) fn strict() -> jpeg_error_mgr {
    // SAFETY: a zeroed jpeg_error_mgr is what libjpeg's own callers hand to jpeg_std_error
    // (plain integers, null pointers and `None` callbacks), which fills in every field.
    let mut err: jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { mozjpeg_sys::jpeg_std_error(&mut err) };
    // jpeg_std_error's error_exit calls exit(): never in a worker.
    err.error_exit = Some(unwind_on_error);
    err.emit_message = Some(unwind_on_early_end);
    err
}

/// The text of libjpeg's current message: its format string from the message table (the
/// parameters are not substituted: that would mean calling C's printf on them).
fn message(cinfo: &jpeg_common_struct) -> String {
    // SAFETY: libjpeg sets `err` before it calls back, and the table it points to (libjpeg's
    // static message table, `last_jpeg_message + 1` entries of C strings) lives as long as
    // the library.
    unsafe {
        let err = &*cinfo.err;
        let code = err.msg_code;
        if err.jpeg_message_table.is_null() || code < 0 || code > err.last_jpeg_message {
            return format!("libjpeg message {code}");
        }
        let text = *err.jpeg_message_table.add(code as usize);
        if text.is_null() {
            return format!("libjpeg message {code}");
        }
        std::ffi::CStr::from_ptr(text)
            .to_string_lossy()
            .into_owned()
    }
}

extern "C-unwind" fn unwind_on_error(cinfo: &mut jpeg_common_struct) {
    std::panic::resume_unwind(Box::new(LibjpegError(message(cinfo))));
}

extern "C-unwind" fn unwind_on_early_end(cinfo: &mut jpeg_common_struct, level: c_int) {
    // Levels 0 and up are trace messages; -1 is a warning.
    if level >= 0 {
        return;
    }
    // SAFETY: as in `message`.
    let code = unsafe { (*cinfo.err).msg_code };
    if DATA_ENDED_EARLY.contains(&code) {
        let why = format!(
            "the image data ends before the frame does ({}): libjpeg would fill the rest with grey",
            message(cinfo)
        );
        std::panic::resume_unwind(Box::new(LibjpegError(why)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::{decode, DecodeLimits};

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img =
            image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 3) as u8, 90]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
        out.into_inner()
    }

    /// `bytes` with the baseline frame header (SOF0) changed by `f(segment)`.
    fn with_sof(bytes: &[u8], f: impl FnOnce(&mut [u8])) -> Vec<u8> {
        let mut out = bytes.to_vec();
        let at = out.windows(2).position(|w| w == [0xff, 0xc0]).unwrap();
        f(&mut out[at..at + 10]);
        out
    }

    #[test]
    fn a_frame_larger_than_its_scan_is_refused_not_filled_with_grey() {
        // The scan of a 64×48 image under a header that says 2000×1500: libjpeg alone decoded
        // it as a 2000×1500 image, grey but for the corner (the hostile-input campaign's
        // 12000×12000 "bomb" of 5 kB got PASS, DEFECT or REVIEW verdicts).
        let lying = with_sof(&jpeg(64, 48), |sof| {
            sof[5..7].copy_from_slice(&1500u16.to_be_bytes());
            sof[7..9].copy_from_slice(&2000u16.to_be_bytes());
        });
        let err = decode("lying.jpg", &lying, &DecodeLimits::default()).unwrap_err();
        assert_eq!(err.code(), crate::proto::v1::ErrorCode::DecodeFailed);
        assert!(
            err.to_string()
                .contains("the image data ends before the frame does"),
            "{err}"
        );
    }

    #[test]
    fn a_scan_cut_short_and_closed_with_an_end_marker_is_refused() {
        let whole = jpeg(256, 192);
        let mut cut = whole[..whole.len() / 2].to_vec();
        cut.extend_from_slice(&[0xff, 0xd9]);
        let err = decode("cut.jpg", &cut, &DecodeLimits::default()).unwrap_err();
        assert!(
            err.to_string().contains("premature end of data segment"),
            "{err}"
        );
    }

    #[test]
    fn whole_jpegs_still_decode_with_padding_after_their_end() {
        let mut bytes = jpeg(64, 48);
        let img = decode("whole.jpg", &bytes, &DecodeLimits::default()).unwrap();
        assert_eq!((img.width(), img.height()), (64, 48));
        // Padding (0x00, 0xFF) after the end-of-image marker, as some cameras write.
        bytes.extend_from_slice(&[0, 0, 0xff, 0]);
        assert!(decode("padded.jpg", &bytes, &DecodeLimits::default()).is_ok());
    }

    #[test]
    fn libjpeg_errors_unwind_with_libjpegs_message() {
        // Precision 7: libjpeg refuses the frame (JERR_BAD_PRECISION) through error_exit,
        // which must unwind to the caller (jpeg_std_error's would exit the process).
        let bad = with_sof(&jpeg(16, 16), |sof| sof[4] = 7);
        let panic = std::panic::catch_unwind(|| {
            mozjpeg::Decompress::with_err(strict())
                .from_mem(&bad)
                .and_then(|d| d.rgb()?.read_scanlines::<u8>())
        })
        .unwrap_err();
        let e = panic.downcast::<LibjpegError>().ok().unwrap();
        assert!(e.0.contains("precision"), "{}", e.0);
    }
}
