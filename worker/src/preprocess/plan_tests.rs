//! [`Preprocessor::plan`] against what [`Preprocessor::run`] really holds (measured by the
//! test allocator), and the refusals of elongated frames and regions.

use std::io::Cursor;

use image::{DynamicImage, ImageFormat};
use mozjpeg::ColorSpaceExt;

use super::alloc_meter::peak_of;
use super::decode::JpegLayout;
use super::*;
use crate::model::artifact::ImageSettings;

/// The checkpoint's own resize and center crop: the largest resize targets (a 32:1 strip
/// becomes 7168×224). [`plan_bounds_what_run_holds_under_every_view`] covers the others.
fn pre() -> Preprocessor {
    Preprocessor::new(&ImageSettings::clip(), DecodeLimits::default(), None)
        .with_view(View::CenterCrop)
}

fn with_clahe() -> Preprocessor {
    Preprocessor::new(
        &ImageSettings::clip(),
        DecodeLimits::default(),
        Some(ClaheSettings::default()),
    )
    .with_view(View::CenterCrop)
}

fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn rgb(w: u32, h: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x ^ y) % 256) as u8])
    }))
}

fn rgb16(w: u32, h: u32) -> DynamicImage {
    DynamicImage::ImageRgb16(image::ImageBuffer::from_fn(w, h, |x, y| {
        image::Rgb([(x * 26) as u16, (y * 31) as u16, ((x + y) * 13) as u16])
    }))
}

fn gray(w: u32, h: u32) -> DynamicImage {
    DynamicImage::ImageLuma8(image::GrayImage::from_fn(w, h, |x, y| {
        image::Luma([((x + 2 * y) % 256) as u8])
    }))
}

fn gray16(w: u32, h: u32) -> DynamicImage {
    DynamicImage::ImageLuma16(image::ImageBuffer::from_fn(w, h, |x, y| {
        image::Luma([(x * 40 + y * 7) as u16])
    }))
}

/// A JPEG through libjpeg's encoder: mozjpeg writes progressive JPEGs by default.
fn mozjpeg(w: usize, h: usize, space: mozjpeg::ColorSpace, progressive: bool) -> Vec<u8> {
    let channels = space.num_components();
    let pixels: Vec<u8> = (0..w * h * channels).map(|i| (i % 253) as u8).collect();
    let mut c = mozjpeg::Compress::new(space);
    if !progressive {
        c.set_fastest_defaults();
    }
    c.set_size(w, h);
    c.set_quality(85.0);
    let mut started = c.start_compress(Vec::new()).unwrap();
    started.write_scanlines(&pixels).unwrap();
    started.finish().unwrap()
}

/// `jpeg` with an EXIF block saying "rotate 90° clockwise to view" (orientation 6).
pub(crate) fn with_exif_rotation(jpeg: &[u8]) -> Vec<u8> {
    let mut app1 = vec![0xFF, 0xE1, 0, 34];
    app1.extend_from_slice(b"Exif\0\0MM\0\x2A\0\0\0\x08");
    app1.extend_from_slice(&[0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0]);
    assert_eq!(app1.len(), 36);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

/// Plans, runs under the meter, and checks that the plan bounds what run held, not wildly
/// above it, and that its decoded size is what decoding gives.
fn check(pre: &Preprocessor, name: &str, bytes: &[u8], region: Option<Region>) -> MemoryPlan {
    let plan = pre.plan(name, bytes, region).unwrap();
    if let Some(clahe) = &pre.clahe {
        // CLAHE runs on rayon: the process's first call starts rayon's global pool (a few KB,
        // once, kept for good), which would be counted against whichever image came first.
        clahe.apply(&image::RgbImage::new(16, 16));
    }
    let (out, held) = peak_of(|| pre.run(name, bytes, region));
    assert_eq!(out.unwrap().len(), 3 * 224 * 224, "{name}");
    // The meter sees at least the decoded frame (libjpeg's output vector is Rust's).
    assert!(
        held >= plan.decoded_bytes.max(plan.output_bytes),
        "{name}: held {held}"
    );
    assert!(
        held <= plan.peak_bytes,
        "{name}: run held {held} bytes at once, the plan said {}",
        plan.peak_bytes
    );
    assert!(
        plan.peak_bytes <= held + held / 4 + (4 << 20),
        "{name}: the plan ({}) is far above what run held ({held})",
        plan.peak_bytes
    );
    let decoded = decode_scaled(name, bytes, &pre.limits, pre.dct_min_short(region)).unwrap();
    assert_eq!(
        (decoded.width(), decoded.height(), decoded.color()),
        (plan.decoded_width, plan.decoded_height, plan.decoded_color),
        "{name}"
    );
    assert_eq!(
        decoded.as_bytes().len() as u64,
        plan.decoded_bytes,
        "{name}"
    );
    assert_eq!(plan.output_bytes, 3 * 224 * 224 * 4);
    plan
}

fn too_large(result: Result<impl std::fmt::Debug, PreprocessError>) -> String {
    let err = result.unwrap_err();
    assert_eq!(err.code(), crate::proto::v1::ErrorCode::TooLarge, "{err}");
    err.to_string()
}

#[test]
fn a_16000_by_1_frame_is_refused_by_plan_and_run_before_decoding() {
    for (w, h) in [(16000, 1), (1, 16000)] {
        let bytes = encode(rgb(w, h), ImageFormat::Png);
        let name = format!("line/{w}x{h}.png");
        let message = too_large(pre().plan(&name, &bytes, None));
        assert_eq!(
            message,
            format!(
                "{name}: image too large: the {w}×{h} image is 16000.0:1, more elongated than \
                 the 32:1 allowed (preprocess.limits.max_aspect_ratio)"
            )
        );
        let (result, held) = peak_of(|| pre().run(&name, &bytes, None));
        assert_eq!(too_large(result), message);
        assert!(held < 1 << 20, "run held {held} bytes before refusing");
    }
}

#[test]
fn a_one_pixel_high_region_is_refused_and_one_within_the_ratio_passes() {
    let bytes = encode(rgb(640, 480), ImageFormat::Png);
    let line = Region {
        x: 0,
        y: 100,
        width: 640,
        height: 1,
    };
    let message = too_large(pre().plan("cam1/0007.png", &bytes, Some(line)));
    assert!(
        message.starts_with(
            "cam1/0007.png: image too large: the 640×1 region of interest at (0, 100) of the \
             640×480 image is 640.0:1"
        ),
        "{message}"
    );
    assert_eq!(
        too_large(pre().run("cam1/0007.png", &bytes, Some(line))),
        message
    );
    // 32:1 exactly is allowed: resized to 7168×224.
    let strip = Region {
        x: 5,
        y: 5,
        width: 32,
        height: 1,
    };
    check(&pre(), "strip", &bytes, Some(strip));
    // Outside the image: refused by plan as by run, as before.
    let outside = Region {
        x: 600,
        y: 0,
        width: 64,
        height: 64,
    };
    let err = pre().plan("cam1", &bytes, Some(outside)).unwrap_err();
    assert!(matches!(err, PreprocessError::Invalid { .. }), "{err}");
}

#[test]
fn the_aspect_ratio_limit_and_the_resize_target_bound() {
    // 32:1 passes, one column more does not.
    check(
        &pre(),
        "4096x128",
        &encode(gray(4096, 128), ImageFormat::Png),
        None,
    );
    let wider = encode(gray(4097, 128), ImageFormat::Png);
    too_large(pre().plan("4097x128", &wider, None));
    too_large(pre().run("4097x128", &wider, None));
    // The limit is configurable.
    let mut strict = pre();
    strict.limits.max_aspect_ratio = 4;
    let frame = encode(rgb(1920, 400), ImageFormat::Png);
    assert!(too_large(strict.plan("f", &frame, None)).contains("the 4:1 allowed"));
    // Within the ratio, the resize target must still fit one allocation: 2048×64 decodes in
    // 393 KB but resizes to 7168×224 (4.8 MB).
    let mut small = pre();
    small.limits.max_alloc_bytes = 1 << 20;
    let frame = encode(rgb(2048, 64), ImageFormat::Png);
    let message = too_large(small.plan("f", &frame, None));
    assert!(
        message.contains("resizing 2048×64 would make a 7168×224 image (4816896 bytes)"),
        "{message}"
    );
    too_large(small.run("f", &frame, None));
}

#[test]
fn a_header_claiming_huge_dimensions_is_refused_by_plan_without_allocating() {
    let png = encode(rgb(8, 8), ImageFormat::Png);
    let claiming = |w: u32, h: u32, depth: u8, colour: u8| {
        let mut b = png.clone();
        b[16..20].copy_from_slice(&w.to_be_bytes());
        b[20..24].copy_from_slice(&h.to_be_bytes());
        b[24] = depth;
        b[25] = colour;
        let crc = crc32fast::hash(&b[12..29]);
        b[29..33].copy_from_slice(&crc.to_be_bytes());
        b
    };
    // Over the dimension limits; within them but 2 GiB as 16-bit RGBA.
    for bytes in [claiming(60000, 60000, 8, 2), claiming(16000, 16000, 16, 6)] {
        let (result, held) = peak_of(|| pre().plan("huge.png", &bytes, None));
        too_large(result);
        assert!(held < 1 << 20, "plan held {held} bytes");
        let (result, held) = peak_of(|| pre().run("huge.png", &bytes, None));
        too_large(result);
        assert!(held < 1 << 20, "run held {held} bytes");
    }
    // A JPEG whose frame header claims 65000×65000.
    let mut jpeg = encode(rgb(16, 16), ImageFormat::Jpeg);
    let sof = jpeg.windows(2).position(|m| m == [0xFF, 0xC0]).unwrap();
    jpeg[sof + 5..sof + 9].copy_from_slice(&[0xFD, 0xE8, 0xFD, 0xE8]);
    let (result, held) = peak_of(|| pre().plan("huge.jpg", &jpeg, None));
    too_large(result);
    assert!(held < 1 << 20, "plan held {held} bytes");
}

#[test]
fn plan_bounds_what_run_holds_for_jpeg() {
    let hd = encode(rgb(1920, 1080), ImageFormat::Jpeg);
    let plan = check(&pre(), "1920x1080.jpg", &hd, None);
    assert_eq!(plan.decoded_bytes, 1920 * 1080 * 3);
    let region = Region {
        x: 100,
        y: 80,
        width: 800,
        height: 600,
    };
    check(&pre(), "1920x1080.jpg region", &hd, Some(region));
    check(&with_clahe(), "1920x1080.jpg clahe", &hd, None);
    // DCT scaling: decoded at 1/2 (shorter side 540 ≥ 2 × 224).
    let scaled = pre().with_jpeg_dct_headroom(Some(2.0));
    let plan = check(&scaled, "1920x1080.jpg scaled", &hd, None);
    assert_eq!((plan.decoded_width, plan.decoded_height), (960, 540));
    // Grey JPEGs come out of libjpeg as RGB.
    check(
        &pre(),
        "grey.jpg",
        &encode(gray(1000, 800), ImageFormat::Jpeg),
        None,
    );
    // Progressive: libjpeg buffers the whole image's coefficients (counted, not measured).
    let progressive = mozjpeg(1280, 720, mozjpeg::ColorSpace::JCS_RGB, true);
    let layout = JpegLayout::parse(&progressive).unwrap();
    assert!(layout.multi_scan);
    let plan = check(&pre(), "progressive.jpg", &progressive, None);
    assert!(plan.peak_bytes > plan.decoded_bytes + layout.coefficient_bytes());
    let baseline = mozjpeg(1280, 720, mozjpeg::ColorSpace::JCS_RGB, false);
    assert!(!JpegLayout::parse(&baseline).unwrap().multi_scan);
    check(&pre(), "baseline.jpg", &baseline, None);
    // EXIF orientation 6: 1200×800 stored, 800×1200 upright, rotated into a copy.
    let rotated = with_exif_rotation(&encode(rgb(1200, 800), ImageFormat::Jpeg));
    let plan = check(&pre(), "rotated.jpg", &rotated, None);
    assert_eq!((plan.decoded_width, plan.decoded_height), (800, 1200));
    // CMYK goes to `image`'s decoder.
    let cmyk = mozjpeg(640, 480, mozjpeg::ColorSpace::JCS_CMYK, false);
    assert_eq!(JpegLayout::parse(&cmyk).unwrap().sampling.len(), 4);
    check(&pre(), "cmyk.jpg", &cmyk, None);
}

#[test]
fn plan_bounds_what_run_holds_for_16_bit_png() {
    let bytes = encode(rgb16(2448, 2048), ImageFormat::Png);
    let plan = check(&pre(), "2448x2048x16.png", &bytes, None);
    assert_eq!(plan.decoded_bytes, 2448 * 2048 * 6);
    assert_eq!(plan.decoded_color, image::ColorType::Rgb16);
    let region = Region {
        x: 1000,
        y: 500,
        width: 1024,
        height: 768,
    };
    check(&pre(), "2448x2048x16.png region", &bytes, Some(region));
    check(&with_clahe(), "2448x2048x16.png clahe", &bytes, None);
}

#[test]
fn plan_bounds_what_run_holds_for_grey_tiff_bmp_and_small() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("grey.png", encode(gray(1000, 800), ImageFormat::Png)),
        ("grey16.png", encode(gray16(1000, 800), ImageFormat::Png)),
        (
            "rgba.png",
            encode(
                DynamicImage::ImageRgba8(rgb(800, 600).to_rgba8()),
                ImageFormat::Png,
            ),
        ),
        ("rgb.tiff", encode(rgb(1200, 900), ImageFormat::Tiff)),
        ("grey16.tiff", encode(gray16(800, 600), ImageFormat::Tiff)),
        ("rgb.bmp", encode(rgb(1000, 700), ImageFormat::Bmp)),
        (
            "rgba.bmp",
            encode(
                DynamicImage::ImageRgba8(rgb(640, 480).to_rgba8()),
                ImageFormat::Bmp,
            ),
        ),
        // Upscaled: 100×50 → 448×224.
        ("small.png", encode(rgb(100, 50), ImageFormat::Png)),
        // Already the model's size: no resize.
        ("224.png", encode(rgb(224, 224), ImageFormat::Png)),
    ];
    for (name, bytes) in &cases {
        check(&pre(), name, bytes, None);
        check(&with_clahe(), &format!("{name} clahe"), bytes, None);
    }
    let grey = &cases[1].1;
    let region = Region {
        x: 10,
        y: 20,
        width: 300,
        height: 200,
    };
    check(&pre(), "grey16.png region", grey, Some(region));
}

#[test]
fn headers_are_read_without_decoding() {
    let tiff = encode(rgb(64, 48), ImageFormat::Tiff);
    let header = decode::read_header("t", &tiff, &DecodeLimits::default()).unwrap();
    assert_eq!((header.width, header.height), (64, 48));
    assert_eq!(header.tiff_compression, Some(1));
    let jpeg = encode(rgb(64, 48), ImageFormat::Jpeg);
    let layout = JpegLayout::parse(&jpeg).unwrap();
    assert_eq!((layout.width, layout.height), (64, 48));
    assert!(!layout.multi_scan);
    assert_eq!(layout.coefficient_bytes(), 0);
    // The header reader is given only what precedes the first scan.
    assert!(layout.header_end < jpeg.len());
    let header = decode::read_header("j", &jpeg, &DecodeLimits::default()).unwrap();
    assert_eq!((header.width, header.height), (64, 48));
    // A cut JPEG is refused by plan as by run.
    let err = pre()
        .plan("cut.jpg", &jpeg[..jpeg.len() / 2], None)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "cut.jpg: cannot decode image: truncated JPEG (no end-of-image marker)"
    );
}

#[test]
fn plan_bounds_what_run_holds_under_every_view() {
    let hd = encode(rgb(1920, 1080), ImageFormat::Jpeg);
    let region = Region {
        x: 100,
        y: 80,
        width: 800,
        height: 600,
    };
    let strip = Region {
        x: 5,
        y: 5,
        width: 32,
        height: 1,
    };
    let png = encode(rgb(640, 480), ImageFormat::Png);
    let cases: Vec<(&str, Vec<u8>, Option<Region>)> = vec![
        ("1920x1080.jpg", hd.clone(), None),
        ("1920x1080.jpg region", hd, Some(region)),
        ("strip", png, Some(strip)),
        (
            "rotated.jpg",
            with_exif_rotation(&encode(rgb(1200, 800), ImageFormat::Jpeg)),
            None,
        ),
        (
            "2448x2048x16.png",
            encode(rgb16(2448, 2048), ImageFormat::Png),
            None,
        ),
        ("grey.png", encode(gray(1000, 800), ImageFormat::Png), None),
        (
            "grey16.png",
            encode(gray16(801, 599), ImageFormat::Png),
            None,
        ),
        ("4096x128", encode(gray(4096, 128), ImageFormat::Png), None),
        // Upscaled under every view: 100×50 → 224×112 (pad), 224×224 (squash).
        ("small.png", encode(rgb(100, 50), ImageFormat::Png), None),
        // Already the padded size: no resize, only the padding.
        ("224x126.png", encode(rgb(224, 126), ImageFormat::Png), None),
        ("224.png", encode(rgb(224, 224), ImageFormat::Png), None),
    ];
    for view in [View::Pad, View::Squash] {
        for (name, bytes, region) in &cases {
            let name = format!("{name} {view:?}");
            check(&pre().with_view(view), &name, bytes, *region);
            check(
                &with_clahe().with_view(view),
                &format!("{name} clahe"),
                bytes,
                *region,
            );
        }
        let scaled = pre().with_view(view).with_jpeg_dct_headroom(Some(2.0));
        let plan = check(&scaled, "1920x1080.jpg scaled", &cases[0].1, None);
        assert_eq!((plan.decoded_width, plan.decoded_height), (960, 540));
    }
}

/// A little-endian TIFF of `w`×`h` RGB pixels in one strip of JPEG data (compression 7, as
/// libtiff writes it): `jpeg`, whatever frame it declares.
fn tiff_with_jpeg_strip(w: u32, h: u32, jpeg: &[u8]) -> Vec<u8> {
    let strip = 8u32;
    let bits = strip + jpeg.len() as u32;
    let ifd = bits + 6;
    let mut out = b"II*\0".to_vec();
    out.extend_from_slice(&ifd.to_le_bytes());
    out.extend_from_slice(jpeg);
    out.extend_from_slice(&[8, 0, 8, 0, 8, 0]);
    // (tag, type, count, value): SHORT 3, LONG 4.
    let entries: [(u16, u16, u32, u32); 10] = [
        (256, 4, 1, w),
        (257, 4, 1, h),
        (258, 3, 3, bits),
        (259, 3, 1, 7),
        (262, 3, 1, 2),
        (273, 4, 1, strip),
        (277, 3, 1, 3),
        (278, 4, 1, h),
        (279, 4, 1, jpeg.len() as u32),
        (284, 3, 1, 1),
    ];
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    for (tag, kind, count, value) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&value.to_le_bytes());
    }
    out.extend_from_slice(&0u32.to_le_bytes());
    out
}

/// Found by `fuzz/`'s preprocess target: the `tiff` crate has zune-jpeg decode a JPEG strip at
/// the size the JPEG data declares, not the TIFF's; `plan` must count that frame (and the
/// limits refuse it) or the byte budget means nothing for a TIFF of a few kilobytes.
#[test]
fn a_tiff_whose_jpeg_strip_declares_a_larger_frame_is_planned_for_or_refused() {
    let pre = pre();
    let honest = mozjpeg(24, 16, mozjpeg::ColorSpace::JCS_RGB, false);
    let tiff = tiff_with_jpeg_strip(24, 16, &honest);
    check(&pre, "24x16 jpeg.tiff", &tiff, None);

    // A 24×16 TIFF whose strip is a 4096×16 JPEG: 196 KB decoded.
    let wide = mozjpeg(4096, 16, mozjpeg::ColorSpace::JCS_RGB, false);
    let tiff = tiff_with_jpeg_strip(24, 16, &wide);
    let plan = pre.plan("wide strip.tiff", &tiff, None).unwrap();
    let (_, held) = peak_of(|| pre.run("wide strip.tiff", &tiff, None));
    assert!(
        held > 4096 * 16 * 3,
        "the strip was not decoded: held {held}"
    );
    assert!(
        held <= plan.peak_bytes,
        "run held {held} bytes at once, the plan said {}",
        plan.peak_bytes
    );

    // The same strip declaring 16000×16000 (768 MB to decode) in a file of 1 KB: refused
    // before anything is decoded.
    let mut bomb = honest.clone();
    let sof = bomb.windows(2).position(|m| m == [0xFF, 0xC0]).unwrap();
    bomb[sof + 5..sof + 9].copy_from_slice(&[0x3E, 0x80, 0x3E, 0x80]);
    let tiff = tiff_with_jpeg_strip(24, 16, &bomb);
    assert!(tiff.len() < 2048);
    let err = too_large(pre.plan("bomb.tiff", &tiff, None));
    assert!(err.contains("16000×16000"), "{err}");
    let err = too_large(pre.run("bomb.tiff", &tiff, None));
    assert!(err.contains("16000×16000"), "{err}");
}

/// Also found by the fuzz target: zune-jpeg copies a marker segment at the length its header
/// declares (up to 64 KiB) before it checks the bytes are there. Under a 32-pixel model the
/// resize holds little, so nothing else in the plan covered it.
#[test]
fn a_tiff_jpeg_strip_declaring_a_long_segment_is_planned_for() {
    let mut image = ImageSettings::clip();
    (image.size, image.resize_size) = (32, 32);
    let pre = Preprocessor::new(&image, DecodeLimits::default(), None);
    let jpeg = mozjpeg(24, 16, mozjpeg::ColorSpace::JCS_RGB, false);
    // An ICC profile segment (APP2) declaring 65,000 bytes, right after the start of image.
    let mut long = jpeg[..2].to_vec();
    long.extend_from_slice(&[0xFF, 0xE2, 0xFD, 0xE8]);
    long.extend_from_slice(b"ICC_PROFILE\0\x01\x01");
    long.extend_from_slice(&jpeg[2..]);
    let tiff = tiff_with_jpeg_strip(24, 16, &long);
    let plan = pre.plan("long segment.tiff", &tiff, None).unwrap();
    let (_, held) = peak_of(|| pre.run("long segment.tiff", &tiff, None));
    assert!(held > 65_000, "the segment was not copied: held {held}");
    assert!(
        held <= plan.peak_bytes,
        "run held {held} bytes at once, the plan said {}",
        plan.peak_bytes
    );
}
