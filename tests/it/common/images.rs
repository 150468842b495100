//! The test images of tests/reference/make_fixtures.py (same names, sizes, formats and colour
//! types), drawn in Rust for runs without Python: a lit metal part on a dark background with a
//! scratch, a spot or a chipped corner.

use std::path::Path;

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};

const SPECS: [(&str, u32, u32, Defect, ImageFormat, Colour); 8] = [
    (
        "part_250.jpg",
        250,
        250,
        Defect::Scratch,
        ImageFormat::Jpeg,
        Colour::Rgb,
    ),
    (
        "part_640x480.png",
        640,
        480,
        Defect::Spot,
        ImageFormat::Png,
        Colour::Rgb,
    ),
    (
        "part_480x640.bmp",
        480,
        640,
        Defect::Chip,
        ImageFormat::Bmp,
        Colour::Rgb,
    ),
    (
        "part_300x201.tiff",
        300,
        201,
        Defect::None,
        ImageFormat::Tiff,
        Colour::Rgb,
    ),
    (
        "part_rgba_333x222.png",
        333,
        222,
        Defect::Spot,
        ImageFormat::Png,
        Colour::Rgba,
    ),
    (
        "part_gray_320x240.png",
        320,
        240,
        Defect::Scratch,
        ImageFormat::Png,
        Colour::Gray,
    ),
    (
        "part_small_150x100.jpg",
        150,
        100,
        Defect::Chip,
        ImageFormat::Jpeg,
        Colour::Rgb,
    ),
    (
        "part_1920x1080.jpg",
        1920,
        1080,
        Defect::Scratch,
        ImageFormat::Jpeg,
        Colour::Rgb,
    ),
];

#[derive(Clone, Copy)]
enum Defect {
    None,
    Scratch,
    Spot,
    Chip,
}

#[derive(Clone, Copy)]
enum Colour {
    Rgb,
    Rgba,
    Gray,
}

/// Write the eight images into `dir`.
pub fn write(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, w, h, defect, format, colour) in SPECS {
        let part = DynamicImage::ImageRgb8(part(w, h, defect));
        let image = match colour {
            Colour::Rgb => part,
            Colour::Rgba => DynamicImage::ImageRgba8(part.to_rgba8()),
            Colour::Gray => DynamicImage::ImageLuma8(part.to_luma8()),
        };
        image.save_with_format(dir.join(name), format)?;
    }
    Ok(())
}

fn part(w: u32, h: u32, defect: Defect) -> RgbImage {
    let (wf, hf) = (w as f32, h as f32);
    RgbImage::from_fn(w, h, |x, y| {
        let (u, v) = (x as f32 / wf, y as f32 / hf);
        let on_part = (0.15..0.85).contains(&u) && (0.2..0.8).contains(&v);
        let mut level = if on_part {
            // Brushed metal: a light gradient with fine streaks.
            150.0 + 60.0 * u + 8.0 * ((x * 7 + y * 3) % 5) as f32
        } else {
            30.0 + 20.0 * v
        };
        let hit = match defect {
            Defect::None => false,
            Defect::Scratch => on_part && ((v - 0.3) - 0.5 * (u - 0.25)).abs() < 0.006,
            Defect::Spot => on_part && (u - 0.6).powi(2) + (v - 0.45).powi(2) < 0.0025,
            Defect::Chip => (0.15..0.25).contains(&u) && (0.2..0.3).contains(&v) && u + v < 0.45,
        };
        if hit {
            level = 40.0;
        }
        let l = level.clamp(0.0, 255.0) as u8;
        Rgb([l, l.saturating_sub(4), l.saturating_sub(10)])
    })
}
