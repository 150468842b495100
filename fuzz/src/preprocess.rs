//! An image, as a request's inline data or a fetched body: bytes → `Preprocessor::plan` →
//! `run` (or `views`, for a tiled profile), under every preprocessing option a profile can
//! choose.
//!
//! Input layout: one byte of options, eight bytes of region of interest, then the image.
//!
//! | byte | meaning |
//! |------|---------|
//! | 0 | bits 0–1 view (pad, center_crop, squash, pad); bit 2 CLAHE; bit 3 region; bit 4 JPEG DCT scaling; bit 5 tiles; bit 6 squash resize (SigLIP) instead of shortest edge; bit 7 bilinear instead of bicubic |
//! | 1–8 | region x, y, width, height: u16 little-endian each |
//! | 9… | the image (JPEG, PNG, BMP, TIFF, or anything else) |
//!
//! Asserts, besides "nothing panics" (a decoder's, a resizer's or our own arithmetic's):
//! - `run`/`views` never hold more heap at once than `plan` said (`peak_bytes`, measured by
//!   [`crate::meter`]), which is what the worker reserves from its byte budget before
//!   decoding; and what `plan` refuses, they refuse;
//! - a success gives the tensors `plan` promised (`output_bytes`: 3 × size² floats per view,
//!   one view per window of a tiled profile), every value finite;
//! - the windows lie inside the inspected area.
//!
//! The limits are small (2048 pixels a side, 4 MiB a decoder allocation) and the model's
//! input is 32 pixels, so the fuzzer spends its time on the code paths rather than on big
//! buffers; the plan's arithmetic is the same at any size.

use std::sync::OnceLock;

use clipqc::model::artifact::{ImageSettings, Interpolation, ResizeMode};
use clipqc::preprocess::{
    ClaheSettings, DecodeLimits, Preprocessor, Region, TileConfig, Tiles, View,
};

const SIZE: u32 = 32;

fn limits() -> DecodeLimits {
    DecodeLimits {
        max_width: 2048,
        max_height: 2048,
        max_alloc_bytes: 4 << 20,
        max_aspect_ratio: 32,
    }
}

fn image_settings(options: u8) -> ImageSettings {
    ImageSettings {
        size: SIZE,
        resize: if options & 0x40 != 0 {
            ResizeMode::Squash
        } else {
            ResizeMode::ShortestEdge
        },
        // Larger than `size`, as for checkpoints that resize to 256 and crop 224.
        resize_size: SIZE + 4,
        interpolation: if options & 0x80 != 0 {
            Interpolation::Bilinear
        } else {
            Interpolation::Bicubic
        },
        rescale_factor: 1.0 / 255.0,
        mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
        std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
    }
}

/// A profile's windows, as in the README's example (two scales, half overlap), checked
/// against the limits once: resolving the most elongated frame they take costs more than a run.
fn tiles(image: &ImageSettings) -> Tiles {
    static TILES: OnceLock<[Tiles; 2]> = OnceLock::new();
    let make = |options: u8| {
        let config = TileConfig {
            scales: vec![1.0, 0.5],
            overlap: 0.5,
            max_windows: 16,
            max_aspect_ratio: None,
            min_window: 8,
            aggregate: Default::default(),
            region_threshold: 0.5,
            max_regions: 8,
        };
        Tiles::new(config, &image_settings(options), &limits()).expect("the tiles fit")
    };
    let all = TILES.get_or_init(|| [make(0), make(0x40)]);
    all[usize::from(image.resize == ResizeMode::Squash)].clone()
}

pub fn check(data: &[u8]) {
    let Some((head, bytes)) = data.split_first_chunk::<9>() else {
        return;
    };
    let options = head[0];
    let u16_at = |i: usize| u32::from(u16::from_le_bytes([head[i], head[i + 1]]));
    let region = (options & 0x08 != 0).then(|| Region {
        x: u16_at(1),
        y: u16_at(3),
        width: u16_at(5),
        height: u16_at(7),
    });
    let view = match options & 0x03 {
        1 => View::CenterCrop,
        2 => View::Squash,
        _ => View::Pad,
    };
    let image = image_settings(options);
    let clahe = (options & 0x04 != 0).then(ClaheSettings::default);
    let mut pre = Preprocessor::new(&image, limits(), clahe)
        .with_view(view)
        .with_jpeg_dct_headroom((options & 0x10 != 0).then_some(1.0));
    let tiled = options & 0x20 != 0;
    if tiled {
        pre.tiles = Some(tiles(&image));
    }

    let plan = pre.plan("fuzz", bytes, region);
    if pre.clahe.is_some() {
        // CLAHE runs on rayon: the process's first call starts rayon's global pool (kept for
        // good), which would be counted against whichever image came first.
        warm_up_rayon();
    }
    let tensor = 3 * (SIZE as usize).pow(2);
    if tiled {
        let (views, held) = crate::meter::peak_of(|| pre.views("fuzz", bytes, region));
        let Ok(plan) = plan else {
            assert!(views.is_err(), "views took what plan refused");
            return;
        };
        assert!(
            held <= plan.peak_bytes,
            "views held {held} bytes at once, the plan said {}: {plan:?}",
            plan.peak_bytes
        );
        let Ok(views) = views else { return };
        assert_eq!(views.tensors.len(), 1 + views.windows.len());
        let floats: usize = views.tensors.iter().map(Vec::len).sum();
        assert_eq!(
            (floats * std::mem::size_of::<f32>()) as u64,
            plan.output_bytes
        );
        for t in &views.tensors {
            assert_eq!(t.len(), tensor);
            assert!(
                t.iter().all(|v| v.is_finite()),
                "a tensor value is not finite"
            );
        }
        for w in &views.windows {
            assert!(
                w.side > 0 && w.x + w.side <= views.width && w.y + w.side <= views.height,
                "window {w:?} outside the {}×{} inspected area",
                views.width,
                views.height
            );
        }
    } else {
        let (out, held) = crate::meter::peak_of(|| pre.run("fuzz", bytes, region));
        let Ok(plan) = plan else {
            assert!(out.is_err(), "run took what plan refused");
            return;
        };
        assert!(
            held <= plan.peak_bytes,
            "run held {held} bytes at once, the plan said {}: {plan:?}",
            plan.peak_bytes
        );
        let Ok(out) = out else { return };
        assert_eq!(
            (out.len() * std::mem::size_of::<f32>()) as u64,
            plan.output_bytes
        );
        assert_eq!(out.len(), tensor);
        assert!(
            out.iter().all(|v| v.is_finite()),
            "a tensor value is not finite"
        );
    }
}

fn warm_up_rayon() {
    static WARM: OnceLock<()> = OnceLock::new();
    WARM.get_or_init(|| {
        ClaheSettings::default().apply(&image::RgbImage::new(16, 16));
    });
}
