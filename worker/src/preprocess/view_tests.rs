//! The profile's [`View`]: nothing of the frame (or of the region of interest) is cropped
//! unless `center_crop` is asked for; padding normalises to exactly 0; the aspect-kept size
//! and placement of elongated, tiny and odd-sized images.

use std::io::Cursor;

use image::{DynamicImage, GrayImage, ImageFormat, RgbImage};

use super::transform::pad_dims;
use super::*;
use crate::model::artifact::ImageSettings;

const S: usize = 224;

fn pre(view: View) -> Preprocessor {
    Preprocessor::new(&ImageSettings::clip(), DecodeLimits::default(), None).with_view(view)
}

fn png(image: DynamicImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Normalised value of the 8-bit level `v` in channel `c`.
fn norm(v: u8, c: usize) -> f32 {
    let s = ImageSettings::clip();
    (f32::from(v) / 255.0 - s.mean[c]) / s.std[c]
}

/// Plane `c`'s row `y` of a CHW tensor.
fn row(t: &[f32], c: usize, y: usize) -> &[f32] {
    &t[c * S * S + y * S..c * S * S + (y + 1) * S]
}

/// The rows and columns of the square holding something other than exact zero (padding),
/// over all three planes: (first row, rows, first column, columns).
fn covered(t: &[f32]) -> (usize, usize, usize, usize) {
    let (mut ys, mut xs) = (Vec::new(), Vec::new());
    for y in 0..S {
        for x in 0..S {
            if (0..3).any(|c| row(t, c, y)[x] != 0.0) {
                ys.push(y);
                xs.push(x);
            }
        }
    }
    let (y0, y1) = (*ys.iter().min().unwrap(), *ys.iter().max().unwrap());
    let (x0, x1) = (*xs.iter().min().unwrap(), *xs.iter().max().unwrap());
    (y0, y1 + 1 - y0, x0, x1 + 1 - x0)
}

/// A mid-grey 1920×1080 frame with a white mark 60 px wide in its leftmost 5 % (x 20..80).
fn frame_with_a_mark_at_the_left_edge() -> RgbImage {
    RgbImage::from_fn(1920, 1080, |x, y| {
        if (20..80).contains(&x) && (500..580).contains(&y) {
            image::Rgb([255; 3])
        } else {
            image::Rgb([128; 3])
        }
    })
}

#[test]
fn a_mark_at_the_left_edge_of_a_wide_frame_is_seen_by_default_and_lost_by_center_crop() {
    let bytes = png(DynamicImage::ImageRgb8(frame_with_a_mark_at_the_left_edge()));
    let grey = norm(128, 0);
    let brightest = |t: &[f32]| t[..S * S].iter().copied().fold(f32::MIN, f32::max);

    // The default view (what a profile without `view` gets): the mark reaches the tensor, in
    // the leftmost columns (x 20..80 of 1920 → about 2..10 of 224).
    let seen = pre(View::default()).run("frame", &bytes, None).unwrap();
    let mark = brightest(&seen);
    assert!(
        mark > grey + 0.8 * (norm(255, 0) - grey),
        "the default view lost the mark: brightest {mark}, grey {grey}"
    );
    let seen_ref = &seen;
    let column = |x: usize| (0..S).map(move |y| row(seen_ref, 0, y)[x]);
    assert!(column(5).any(|v| v > grey + 0.5));
    assert!((20..S).all(|x| column(x).all(|v| v <= grey + 1e-4)));
    // Squash sees it too.
    let squashed = pre(View::Squash).run("frame", &bytes, None).unwrap();
    assert!(brightest(&squashed) > grey + 0.8 * (norm(255, 0) - grey));

    // The checkpoint's center crop keeps the middle 1080×1080: the mark is gone, the tensor
    // is the grey alone.
    let cropped = pre(View::CenterCrop).run("frame", &bytes, None).unwrap();
    for (c, plane) in cropped.chunks_exact(S * S).enumerate() {
        for v in plane {
            assert!((v - norm(128, c)).abs() < 1e-4, "channel {c}: {v}");
        }
    }
}

#[test]
fn a_mark_at_the_edge_of_a_region_of_interest_is_seen() {
    let bytes = png(DynamicImage::ImageRgb8(frame_with_a_mark_at_the_left_edge()));
    // 1000×400 from x 20: the mark is the region's leftmost 60 columns.
    let region = Region {
        x: 20,
        y: 300,
        width: 1000,
        height: 400,
    };
    let grey = norm(128, 0);
    let seen = pre(View::Pad).run("frame", &bytes, Some(region)).unwrap();
    assert!(seen[..S * S]
        .iter()
        .any(|v| *v > grey + 0.8 * (norm(255, 0) - grey)));
    let cropped = pre(View::CenterCrop)
        .run("frame", &bytes, Some(region))
        .unwrap();
    assert!(cropped[..S * S].iter().all(|v| *v <= grey + 1e-4));
}

#[test]
fn padding_rows_normalise_to_exactly_zero() {
    // 1920×1080 → 224×126, 49 rows of padding above and below.
    assert_eq!(pad_dims(224, 1920, 1080), (224, 126));
    let bytes = png(DynamicImage::ImageRgb8(frame_with_a_mark_at_the_left_edge()));
    let t = pre(View::Pad).run("frame", &bytes, None).unwrap();
    for c in 0..3 {
        for y in (0..49).chain(175..S) {
            assert!(row(&t, c, y).iter().all(|v| *v == 0.0), "plane {c} row {y}");
        }
        for y in [49, 80, 174] {
            assert!(
                row(&t, c, y)
                    .iter()
                    .all(|v| (v - norm(128, c)).abs() < 1e-4),
                "plane {c} row {y}"
            );
        }
    }
    assert_eq!(covered(&t), (49, 126, 0, 224));
    // Grey frames take the one-channel path: the same padding in all three planes.
    let grey = GrayImage::from_fn(1080, 1920, |x, _| {
        image::Luma([if x < 60 { 255 } else { 90 }])
    });
    let t = pre(View::Pad)
        .run("portrait", &png(DynamicImage::ImageLuma8(grey)), None)
        .unwrap();
    assert_eq!(covered(&t), (0, 224, 49, 126));
    assert!((0..3).all(|c| (0..S).all(|y| row(&t, c, y)[..49].iter().all(|v| *v == 0.0))));
    assert!(
        row(&t, 0, 100)[50] > norm(200, 0),
        "the bright left columns are seen"
    );
    // Under the checkpoint's crop nothing is padding.
    let t = pre(View::CenterCrop).run("frame", &bytes, None).unwrap();
    assert!(t.iter().all(|v| *v != 0.0));
}

#[test]
fn pad_keeps_the_aspect_ratio_rounding_to_nearest() {
    assert_eq!(pad_dims(224, 640, 480), (224, 168));
    assert_eq!(pad_dims(224, 480, 640), (168, 224));
    assert_eq!(pad_dims(224, 250, 250), (224, 224));
    assert_eq!(pad_dims(224, 300, 201), (224, 150)); // 150.08
    assert_eq!(pad_dims(224, 333, 222), (224, 149)); // 149.33
    assert_eq!(pad_dims(224, 333, 221), (224, 149)); // 148.66, rounded up
    assert_eq!(pad_dims(224, 150, 100), (224, 149)); // upscaled
    assert_eq!(pad_dims(10, 4, 1), (10, 3)); // 2.5: halves go up
                                             // Elongated and tiny: never under one pixel.
    assert_eq!(pad_dims(224, 32, 1), (224, 7));
    assert_eq!(pad_dims(224, 1, 32), (7, 224));
    assert_eq!(pad_dims(224, 1, 1), (224, 224));
    assert_eq!(pad_dims(30, 32, 1), (30, 1)); // 0.94
    assert_eq!(pad_dims(14, 1, 32), (1, 14)); // 0.44
}

#[test]
fn one_pixel_wide_and_high_frames_within_the_aspect_limit() {
    // 32:1, the limit: 224×7 centred at row (224 - 7) / 2 = 108, and its transpose.
    let line = RgbImage::from_fn(32, 1, |x, _| image::Rgb([(x * 8) as u8, 200, 50]));
    let t = pre(View::Pad)
        .run("32x1", &png(DynamicImage::ImageRgb8(line.clone())), None)
        .unwrap();
    assert_eq!(covered(&t), (108, 7, 0, 224));
    // A flat colour stays that colour through the resize.
    assert!(row(&t, 1, 110)
        .iter()
        .all(|v| (v - norm(200, 1)).abs() < 1e-4));
    let column = image::imageops::rotate90(&line);
    assert_eq!(column.dimensions(), (1, 32));
    let t = pre(View::Pad)
        .run("1x32", &png(DynamicImage::ImageRgb8(column)), None)
        .unwrap();
    assert_eq!(covered(&t), (0, 224, 108, 7));
    // 1×1: the whole square.
    let dot = RgbImage::from_pixel(1, 1, image::Rgb([10, 200, 30]));
    let t = pre(View::Pad)
        .run("1x1", &png(DynamicImage::ImageRgb8(dot)), None)
        .unwrap();
    for (c, v) in [10, 200, 30].into_iter().enumerate() {
        assert!(t[c * S * S..(c + 1) * S * S]
            .iter()
            .all(|p| (p - norm(v, c)).abs() < 1e-4));
    }
    // 1×20 (within the limit) in one channel: 11×224 (11.2), columns 106..117.
    let grey = GrayImage::from_pixel(1, 20, image::Luma([255]));
    let t = pre(View::Pad)
        .run("1x20", &png(DynamicImage::ImageLuma8(grey)), None)
        .unwrap();
    assert_eq!(covered(&t), (0, 224, 106, 11));
    // Beyond the limit: refused whatever the view.
    let wide = png(DynamicImage::ImageRgb8(RgbImage::new(33, 1)));
    for view in [View::Pad, View::CenterCrop, View::Squash] {
        let err = pre(view).run("33x1", &wide, None).unwrap_err();
        assert_eq!(
            err.code(),
            crate::proto::v1::ErrorCode::TooLarge,
            "{view:?}: {err}"
        );
    }
}

#[test]
fn odd_sizes_are_padded_with_the_odd_row_below_and_right() {
    // (size, image, first row, rows, first column, columns) of what the image covers.
    let cases = [
        ((333, 221), (37, 149, 0, 224)), // 75 rows of padding: 37 above, 38 below
        ((221, 333), (0, 224, 37, 149)),
        ((225, 223), (1, 222, 0, 224)),
        ((223, 225), (0, 224, 1, 222)),
        ((224, 101), (61, 101, 0, 224)), // not resized: 123 rows, 61 above
        ((101, 224), (0, 224, 61, 101)),
        ((7, 5), (32, 160, 0, 224)), // upscaled: 160 (160.4)
    ];
    for ((w, h), expect) in cases {
        let img = RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(40 + x % 150) as u8, (30 + y % 160) as u8, 250])
        });
        let t = pre(View::Pad)
            .run(
                &format!("{w}x{h}"),
                &png(DynamicImage::ImageRgb8(img)),
                None,
            )
            .unwrap();
        assert_eq!(covered(&t), expect, "{w}×{h}");
        // Blue is 250 everywhere in the image, exactly 0 in the padding.
        let (y0, rows, x0, cols) = expect;
        for y in 0..S {
            for x in 0..S {
                let v = row(&t, 2, y)[x];
                if (y0..y0 + rows).contains(&y) && (x0..x0 + cols).contains(&x) {
                    assert!(
                        (v - norm(250, 2)).abs() < 1e-4,
                        "{w}×{h} at ({x}, {y}): {v}"
                    );
                } else {
                    assert_eq!(v, 0.0, "{w}×{h} at ({x}, {y})");
                }
            }
        }
    }
    // Not resized: the pixels are the image's own, exactly.
    let img = RgbImage::from_fn(224, 101, |x, y| image::Rgb([(x % 256) as u8, y as u8, 7]));
    let t = pre(View::Pad)
        .run("224x101", &png(DynamicImage::ImageRgb8(img)), None)
        .unwrap();
    assert!((row(&t, 0, 61 + 17)[200] - norm(200, 0)).abs() < 1e-5);
    assert!((row(&t, 1, 61 + 17)[200] - norm(17, 1)).abs() < 1e-5);
}

#[test]
fn the_view_is_a_profile_setting_and_pad_is_the_default() {
    assert_eq!(View::default(), View::Pad);
    assert_eq!(pre(View::default()).view(), View::Pad);
    assert_eq!(
        Preprocessor::new(&ImageSettings::clip(), DecodeLimits::default(), None).view(),
        View::Pad
    );
    let p: crate::score::ProfileConfig =
        serde_json::from_str(r#"{"classes": [{"name": "a", "prompts": ["a"]}]}"#).unwrap();
    assert_eq!(p.view, View::Pad);
    assert_eq!(
        crate::score::ProfileConfig::builtin_default().view,
        View::Pad
    );
    for (text, view) in [
        ("pad", View::Pad),
        ("center_crop", View::CenterCrop),
        ("squash", View::Squash),
    ] {
        let p: crate::score::ProfileConfig = serde_json::from_str(&format!(
            r#"{{"view": "{text}", "classes": [{{"name": "a", "prompts": ["a"]}}]}}"#
        ))
        .unwrap();
        assert_eq!(p.view, view);
    }
    let err = serde_json::from_str::<crate::score::ProfileConfig>(
        r#"{"view": "crop", "classes": [{"name": "a", "prompts": ["a"]}]}"#,
    )
    .unwrap_err();
    assert!(err.to_string().contains("unknown variant `crop`"), "{err}");
}
