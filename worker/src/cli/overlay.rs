//! `clipqc classify --overlay DIR`: each image with its verdict drawn on it, because people
//! would rather look than read. A border in the outcome's colour (green PASS, red DEFECT,
//! amber REVIEW); for a tiled profile the fused anomaly map laid over the frame in translucent
//! red (each pixel as red as its cell: every scale and the whole frame, see
//! `score::anomaly_map`) and each region's box; for a segmenting profile, each mask's outline
//! in cyan.

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};

use crate::preprocess::{self, DecodeLimits};
use crate::score::{Decision, Outcome};

/// Writes `DIR/<file stem>.png` for the image at `path`; returns where.
pub fn write(
    dir: &Path,
    path: &str,
    limits: &DecodeLimits,
    decision: &Decision,
) -> anyhow::Result<PathBuf> {
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("{path}: cannot read: {e}"))?;
    let mut frame = preprocess::to_rgb8(preprocess::decode(path, &bytes, limits)?);
    draw(&mut frame, decision);
    let stem = Path::new(path)
        .file_stem()
        .map_or_else(|| "image".into(), |s| s.to_string_lossy().into_owned());
    let out = dir.join(format!("{stem}.png"));
    frame
        .save(&out)
        .map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", out.display()))?;
    Ok(out)
}

const RED: Rgb<u8> = Rgb([230, 30, 30]);

/// The verdict drawn on the frame (in source-frame pixels, as the verdict's coordinates).
pub fn draw(frame: &mut RgbImage, decision: &Decision) {
    let (w, h) = frame.dimensions();
    // Lines scale with the frame so they show on a 5 MP image and stay thin on a small one.
    let thick = (w.min(h) / 200).max(2);
    if let Some(l) = &decision.localization {
        if let Some(map) = &l.anomaly_map {
            // Each pixel as red as its cell of the fused map: the map is in frame pixels,
            // so a pixel's cell is found along each axis once, not per pixel.
            for y in 0..h {
                for x in 0..w {
                    let score = map.at(x, y);
                    if score > 0.0 {
                        blend(frame.get_pixel_mut(x, y), RED, 0.55 * score.clamp(0.0, 1.0));
                    }
                }
            }
        }
        for r in &l.regions {
            rectangle(
                frame,
                (r.x, r.y, r.width, r.height),
                thick,
                Rgb([255, 220, 0]),
            );
        }
    }
    if let Some(o) = &decision.outline {
        for m in &o.masks {
            outline(frame, &m.mask.rle, Rgb([0, 230, 255]));
        }
    }
    let colour = match decision.outcome {
        Outcome::Pass => Rgb([30, 180, 60]),
        Outcome::Defect => RED,
        Outcome::Review => Rgb([240, 160, 0]),
    };
    rectangle(frame, (0, 0, w, h), thick * 2, colour);
}

/// A mask's boundary: its pixels with a 4-neighbour outside it (or on the frame's edge).
/// A mask of another size than the frame (not the verdict's frame) is skipped.
fn outline(frame: &mut RgbImage, rle: &crate::segment::Rle, c: Rgb<u8>) {
    let Ok(mask) = crate::segment::Mask::from_rle(rle) else {
        return;
    };
    let (w, h) = frame.dimensions();
    if (mask.width(), mask.height()) != (w, h) {
        return;
    }
    outline_with(frame, |x, y| mask.get(x, y), c);
}

/// [`outline`] of a row-major mask of the frame's size (a ground-truth mask); another size is
/// skipped.
pub fn outline_bits(frame: &mut RgbImage, bits: &[bool], c: Rgb<u8>) {
    let (w, h) = frame.dimensions();
    if bits.len() != w as usize * h as usize {
        return;
    }
    outline_with(frame, |x, y| bits[y as usize * w as usize + x as usize], c);
}

fn outline_with(frame: &mut RgbImage, get: impl Fn(u32, u32) -> bool, c: Rgb<u8>) {
    let (w, h) = frame.dimensions();
    let inside = |x: i64, y: i64| {
        x >= 0 && y >= 0 && x < i64::from(w) && y < i64::from(h) && get(x as u32, y as u32)
    };
    for y in 0..h {
        for x in 0..w {
            let (xi, yi) = (i64::from(x), i64::from(y));
            if inside(xi, yi)
                && [(1, 0), (-1, 0), (0, 1), (0, -1)]
                    .iter()
                    .any(|(dx, dy)| !inside(xi + dx, yi + dy))
            {
                frame.put_pixel(x, y, c);
            }
        }
    }
}

fn blend(px: &mut Rgb<u8>, over: Rgb<u8>, alpha: f32) {
    for c in 0..3 {
        let v = f32::from(px[c]) * (1.0 - alpha) + f32::from(over[c]) * alpha;
        px[c] = v.round() as u8;
    }
}

/// A hollow rectangle `thick` pixels wide, inside `(x, y, width, height)`, clipped.
fn rectangle(frame: &mut RgbImage, (x, y, rw, rh): (u32, u32, u32, u32), thick: u32, c: Rgb<u8>) {
    let (w, h) = frame.dimensions();
    let (x1, y1) = ((x + rw).min(w), (y + rh).min(h));
    for py in y.min(h)..y1 {
        for px in x.min(w)..x1 {
            let edge = px < x + thick || px + thick >= x1 || py < y + thick || py + thick >= y1;
            if edge {
                frame.put_pixel(px, py, c);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::score::{AnomalyMap, DefectRegion, Localization};

    pub(crate) fn decision(outcome: Outcome, localization: Option<Localization>) -> Decision {
        Decision {
            outcome,
            class: 0,
            probability: 0.9,
            anomaly_score: 0.9,
            probabilities: vec![0.9, 0.1],
            localization,
            nearest: None,
            acceptable: 0.1,
            line_memory_score: None,
            outline: None,
            adapter_version: None,
        }
    }

    #[test]
    fn the_fused_map_reddens_only_hot_cells_and_boxes_are_drawn() {
        let mut frame = RgbImage::from_pixel(400, 400, Rgb([100, 100, 100]));
        let map = AnomalyMap {
            x_edges: vec![0, 200, 400],
            y_edges: vec![0, 200, 400],
            scores: vec![0.0, 1.0, 0.0, 0.0],
        };
        let region = DefectRegion {
            x: 250,
            y: 50,
            width: 100,
            height: 100,
            class: 0,
            score: 1.0,
        };
        let l = Localization {
            views: 5,
            regions: vec![region],
            heatmap: None,
            anomaly_map: Some(map),
            aggregates: Default::default(),
        };
        draw(&mut frame, &decision(Outcome::Defect, Some(l)));
        // The top-right cell (score 1) is red-tinted; the bottom-left (score 0) untouched.
        let hot = frame.get_pixel(220, 180);
        assert!(hot[0] > 150 && hot[1] < 80, "{hot:?}");
        assert_eq!(*frame.get_pixel(100, 300), Rgb([100, 100, 100]));
        // The box's edge is yellow, its inside only tinted; the border is the outcome's.
        assert_eq!(*frame.get_pixel(250, 100), Rgb([255, 220, 0]));
        assert_ne!(*frame.get_pixel(300, 100), Rgb([255, 220, 0]));
        assert_eq!(*frame.get_pixel(0, 0), RED);
    }

    #[test]
    fn a_masks_boundary_is_drawn_and_its_inside_left_alone() {
        use crate::score::masks::Outline;
        use crate::segment::Mask;
        let (w, h) = (120, 100);
        // A 20 × 10 block at (50, 40).
        let bits = (0..w * h)
            .map(|i| (50..70).contains(&(i % w)) && (40..50).contains(&(i / w)))
            .collect();
        let mask = Mask::new(w, h, bits).unwrap();
        let summary = crate::segment::Segment { mask, iou: 0.9 }.summary();
        let mut d = decision(Outcome::Defect, None);
        d.outline = Some(Outline::segmented(vec![(0, summary)], None));
        let mut frame = RgbImage::from_pixel(w, h, Rgb([100, 100, 100]));
        draw(&mut frame, &d);
        let cyan = Rgb([0, 230, 255]);
        for (x, y) in [(50, 40), (69, 49), (60, 40), (50, 45)] {
            assert_eq!(
                *frame.get_pixel(x, y),
                cyan,
                "({x}, {y}) is on the boundary"
            );
        }
        assert_eq!(*frame.get_pixel(60, 45), Rgb([100, 100, 100]), "inside");
        assert_eq!(*frame.get_pixel(49, 45), Rgb([100, 100, 100]), "outside");
    }

    #[test]
    fn an_untiled_pass_gets_a_green_border_only() {
        let mut frame = RgbImage::from_pixel(50, 30, Rgb([100, 100, 100]));
        draw(&mut frame, &decision(Outcome::Pass, None));
        assert_eq!(*frame.get_pixel(0, 15), Rgb([30, 180, 60]));
        assert_eq!(*frame.get_pixel(25, 15), Rgb([100, 100, 100]));
    }
}
