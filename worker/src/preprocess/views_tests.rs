//! A tiled profile's views: windows cut from the frame (or region), each squared to the
//! model's size; memory within the plan; frames the windows cannot take refused.

use std::io::Cursor;

use image::{DynamicImage, ImageFormat, RgbImage};

use super::alloc_meter::peak_of;
use super::*;
use crate::model::artifact::ImageSettings;

fn tiled(scales: &[f64], max_windows: u32) -> Preprocessor {
    let config = TileConfig {
        scales: scales.to_vec(),
        overlap: 0.5,
        max_windows,
        max_aspect_ratio: None,
        min_window: 32,
        aggregate: Aggregate::Max,
        region_threshold: 0.5,
        max_regions: 8,
    };
    let image = ImageSettings::clip();
    let limits = DecodeLimits::default();
    let mut pre = Preprocessor::new(&image, limits, None);
    pre.tiles = Some(Tiles::new(config, &image, &limits).unwrap());
    pre
}

fn png(image: RgbImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(image)
        .write_to(&mut out, ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

fn pattern(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 7 % 251) as u8,
            (y * 5 % 241) as u8,
            ((x ^ y) % 256) as u8,
        ])
    })
}

#[test]
fn a_pixel_change_moves_only_the_windows_that_contain_it() {
    let pre = tiled(&[1.0, 0.5], 64);
    let frame = pattern(300, 200);
    let before = pre.views("frame", &png(frame.clone()), None).unwrap();
    // 200-pixel windows at 0, 100 (x); 100-pixel windows every 50 px: 5 × 3.
    assert_eq!(before.windows.len(), 2 + 15);
    assert_eq!(before.tensors.len(), 1 + before.windows.len());
    let (px, py) = (40, 160);
    let mut changed = frame;
    changed.put_pixel(px, py, image::Rgb([255, 255, 255]));
    let after = pre.views("frame", &png(changed), None).unwrap();
    assert_ne!(
        before.tensors[0], after.tensors[0],
        "the whole-frame view sees it"
    );
    let mut moved = 0;
    for (i, w) in before.windows.iter().enumerate() {
        let same = before.tensors[1 + i] == after.tensors[1 + i];
        assert_eq!(!same, w.contains(px, py), "window {w:?}");
        moved += usize::from(!same);
    }
    assert_eq!(
        moved, 2,
        "the 200-px window at x 0 and the 100-px one at (0, 100) hold (40, 160)"
    );
}

#[test]
fn a_window_is_its_crop_squared_to_the_model_size() {
    let pre = tiled(&[0.5], 64);
    let frame = pattern(448, 448);
    let views = pre.views("frame", &png(frame.clone()), None).unwrap();
    // 224-pixel windows: no resize, so each tensor is its crop, normalised.
    let w = views.windows[4];
    assert_eq!((w.x, w.y, w.side), (112, 112, 224));
    let crop = image::imageops::crop_imm(&frame, w.x, w.y, 224, 224).to_image();
    let direct = Transform::new(&ImageSettings::clip())
        .with_view(View::Squash)
        .apply("crop", &crop)
        .unwrap();
    assert_eq!(views.tensors[5], direct);
}

#[test]
fn windows_lie_in_the_region_and_the_origin_says_where_it_is() {
    let pre = tiled(&[1.0, 0.5], 64);
    let region = Region {
        x: 50,
        y: 20,
        width: 128,
        height: 64,
    };
    let views = pre
        .views("frame", &png(pattern(300, 200)), Some(region))
        .unwrap();
    assert_eq!(views.origin, (50, 20));
    assert_eq!((views.width, views.height), (128, 64));
    assert!(views
        .windows
        .iter()
        .all(|w| w.x + w.side <= 128 && w.y + w.side <= 64));
    assert_eq!(
        views.windows.len(),
        3 + 21,
        "64-px windows, stride 32: 3 × 1; 32-px ones, stride 16: 7 × 3"
    );
}

#[test]
fn the_plan_bounds_what_the_views_hold() {
    let pre = tiled(&[1.0, 0.5, 0.25], 64);
    let bytes = png(pattern(640, 640));
    let plan = pre.plan("frame", &bytes, None).unwrap();
    let (views, held) = peak_of(|| pre.views("frame", &bytes, None));
    let views = views.unwrap();
    assert_eq!(views.tensors.len(), 1 + 1 + 9 + 49);
    assert_eq!(plan.output_bytes, 60 * 3 * 224 * 224 * 4);
    assert!(
        held <= plan.peak_bytes,
        "held {held}, plan {}",
        plan.peak_bytes
    );
    assert!(held >= plan.output_bytes, "held {held}");
}

#[test]
fn a_frame_that_would_make_too_many_windows_is_refused_before_decoding() {
    let pre = tiled(&[1.0, 0.5, 0.25], 64);
    let ratio = pre.tiles.as_ref().unwrap().max_aspect_ratio;
    assert!((1.0..1.5).contains(&ratio), "{ratio}");
    let bytes = png(pattern(1920, 1080));
    let err = pre.plan("request r-9", &bytes, None).unwrap_err();
    assert_eq!(err.code(), crate::proto::v1::ErrorCode::TooLarge);
    let msg = err.to_string();
    assert!(msg.starts_with("request r-9: "), "{msg}");
    assert!(
        msg.contains("123 views") && msg.contains("tiles.max_windows"),
        "{msg}"
    );
    // A region of the same frame that is square enough is taken.
    let square = Region {
        x: 420,
        y: 0,
        width: 1080,
        height: 1080,
    };
    assert_eq!(
        pre.views("r", &bytes, Some(square)).unwrap().tensors.len(),
        60
    );
}

#[test]
fn configs_whose_windows_cannot_fit_are_refused_naming_the_keys() {
    let image = ImageSettings::clip();
    let limits = DecodeLimits::default();
    let config = |max_windows, max_aspect_ratio| TileConfig {
        scales: vec![1.0, 0.5, 0.25],
        overlap: 0.5,
        max_windows,
        max_aspect_ratio,
        min_window: 32,
        aggregate: Aggregate::Max,
        region_threshold: 0.5,
        max_regions: 8,
    };
    let err = Tiles::new(config(40, None), &image, &limits).unwrap_err();
    assert!(
        matches!(
            err,
            TileError::TooManyViewsSquare {
                max_windows: 40,
                ..
            }
        ),
        "{err}"
    );
    let err = err.to_string();
    assert!(
        err.contains("even for a square frame") && err.contains("tiles.max_windows 40"),
        "{err}"
    );
    let err = Tiles::new(config(64, Some(16.0 / 9.0)), &image, &limits).unwrap_err();
    assert!(
        matches!(err, TileError::TooManyViews { views: 123, .. }),
        "{err}"
    );
    let err = err.to_string();
    assert!(
        err.contains("tiles.max_aspect_ratio") && err.contains("123"),
        "{err}"
    );
    let ok = Tiles::new(config(123, Some(16.0 / 9.0)), &image, &limits).unwrap();
    assert!((ok.max_aspect_ratio - 16.0 / 9.0).abs() < 1e-9);

    // A profile of those windows: its preprocessing is refused with the same error.
    struct Tiled(TileConfig);
    impl ProfilePreprocessing for Tiled {
        fn clahe(&self) -> Option<&ClaheSettings> {
            None
        }
        fn view(&self) -> View {
            View::Pad
        }
        fn tiles(&self) -> Option<&TileConfig> {
            Some(&self.0)
        }
    }
    let settings = PreprocessSettings::default();
    let err = Preprocessor::for_profile(&image, &settings, &Tiled(config(40, None))).unwrap_err();
    assert!(
        matches!(
            err,
            ProfileError::Tiles(TileError::TooManyViewsSquare { .. })
        ),
        "{err}"
    );
    assert!(err.to_string().starts_with("tiles make up to"), "{err}");
}

#[test]
fn bad_regions_and_frames_are_errors_naming_the_request() {
    let pre = tiled(&[1.0, 0.5], 64);
    let bytes = png(pattern(300, 200));
    let region = |x, y, width, height| {
        Some(Region {
            x,
            y,
            width,
            height,
        })
    };
    for (r, what) in [
        (region(250, 0, 100, 100), "region of interest"),
        (region(0, 0, 0, 50), "region of interest"),
    ] {
        // (Mapped first: a failing unwrap_err would print every tensor.)
        let err = pre
            .views("request r-3", &bytes, r)
            .map(|v| v.tensors.len())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("request r-3: ") && err.contains(what),
            "{err}"
        );
    }
    // A 1×1 region at the corner is fine: too small for any window, it is the whole view.
    let corner = pre.views("r", &bytes, region(299, 199, 1, 1)).unwrap();
    assert_eq!((corner.windows.len(), corner.origin), (0, (299, 199)));
    // A 1×16384 line: refused by its aspect ratio before any pixel is decoded.
    let line = png(RgbImage::new(1, 16384));
    let err = pre.plan("request r-4", &line, None).unwrap_err();
    assert_eq!(err.code(), crate::proto::v1::ErrorCode::TooLarge);
    assert!(err.to_string().starts_with("request r-4: "), "{err}");
}
