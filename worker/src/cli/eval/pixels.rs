//! `clipqc eval --masks DIR`: where the defect is, measured against ground truth.
//!
//! Ground truth in the MVTec AD layout: `DIR/<folder>/<stem>_mask.png` beside the dataset's
//! `<folder>/<stem>.<ext>` (sub-folders kept); any non-zero pixel is defect. A normal folder
//! needs no masks (its images are all-normal, as MVTec AD counts them); a defective image
//! without a mask is left out of the pixel metrics and counted (`masks_missing`). A mask that
//! cannot be read, or whose size is not its image's, is refused, naming the file.
//!
//! Each image's fused anomaly map ([`crate::score::AnomalyMap`]) is bilinearly upsampled to
//! the frame and quantised to 16 bits (`round(score × 65535)`): that is what `maps/` holds and
//! what the pixel metrics are computed on, exactly, so anyone can recompute them from the
//! files. Over every pixel of every measured image (normal images all-normal):
//! - `pixel_auroc`: the area under the pixel ROC, ties counted half (scikit-learn's
//!   `roc_auc_score` on the 16-bit values);
//! - `aupro`: MVTec AD's per-region overlap: ground-truth regions are the masks' 8-connected
//!   components; at each threshold the PRO is the mean over all regions of the share of the
//!   region's pixels at or over it, the FPR the share of normal pixels at or over it; the PRO
//!   curve from (0, 0) to (1, 1) is integrated (trapezoids) up to an FPR of 0.3, linearly
//!   interpolated there, and divided by 0.3 (MVTec AD's `compute_pro` and `trapezoid`);
//! - `region_hit_rate`: defective images where some reported region's box holds a mask pixel;
//! - `region_precision`: reported region boxes (of every measured image) holding a mask pixel.
//!
//! Memory stays bounded whatever the set's size: the metrics are tallied per 16-bit level
//! (three arrays of 65,536), one image's map and mask at a time.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::dataset::Dataset;
use super::metrics::Undefined;
use super::Record;
use crate::score::DefectRegion;

/// 16-bit levels: a score `s` in [0, 1] is level `round(s × 65535)`.
const LEVELS: usize = 65_536;

/// MVTec AD's integration limit for AUPRO.
pub const AUPRO_FPR_LIMIT: f64 = 0.3;

/// Why `--masks` is refused (exit code 2), naming the file.
#[derive(Debug, thiserror::Error)]
pub enum MaskError {
    #[error("--masks {0}: not a folder")]
    NotAFolder(PathBuf),
    #[error("--masks: profile {0:?} has no tiles: pixel metrics need a tiled profile's fused anomaly map")]
    NotTiled(String),
    #[error("--masks {path}: cannot read the mask: {message}")]
    Unreadable { path: PathBuf, message: String },
    #[error("--masks {path}: the mask is {mask_width}×{mask_height} pixels, its image {image} is {width}×{height}")]
    Size {
        path: PathBuf,
        mask_width: u32,
        mask_height: u32,
        image: PathBuf,
        width: u32,
        height: u32,
    },
    #[error("--out {path}: cannot write the map: {message}")]
    WriteMap { path: PathBuf, message: String },
}

/// The masks found for a dataset, one slot per image (`None`: normal, or no mask).
pub(crate) struct Masks {
    pub by_image: Vec<Option<PathBuf>>,
    /// Defective images without a mask.
    pub missing: usize,
}

/// Where an image's mask is: `DIR/<folder>/<path under the folder, its stem>_mask.png`.
fn mask_path(dir: &Path, data: &Dataset, image: &Path, folder: usize) -> Option<PathBuf> {
    let root = data.root.join(&data.folders[folder].name);
    let relative = image.strip_prefix(&root).ok()?;
    let stem = relative.file_stem()?.to_string_lossy();
    let mut path = dir.join(&data.folders[folder].name);
    if let Some(parent) = relative.parent() {
        path.push(parent);
    }
    path.push(format!("{stem}_mask.png"));
    Some(path)
}

/// A mask's pixels, row-major: any non-zero channel (alpha aside) is defect.
pub fn read_mask(path: &Path) -> Result<(u32, u32, Vec<bool>), MaskError> {
    let unreadable = |message: String| MaskError::Unreadable {
        path: path.to_path_buf(),
        message,
    };
    let img = image::ImageReader::open(path)
        .map_err(|e| unreadable(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| unreadable(e.to_string()))?
        .decode()
        .map_err(|e| unreadable(e.to_string()))?;
    let rgba = img.to_rgba16();
    let bits = rgba.pixels().map(|p| p[0] | p[1] | p[2] != 0).collect();
    Ok((img.width(), img.height(), bits))
}

impl Masks {
    /// Finds and reads every defective image's mask before the model is loaded, so a bad mask
    /// costs no scoring: unreadable, or of another size than its image (either orientation:
    /// the exact check against the decoded frame comes after scoring).
    pub(crate) fn scan(dir: &Path, data: &Dataset) -> Result<Self, MaskError> {
        if !dir.is_dir() {
            return Err(MaskError::NotAFolder(dir.to_path_buf()));
        }
        let mut by_image = Vec::with_capacity(data.images.len());
        let mut missing = 0;
        for (image, folder) in &data.images {
            if !data.folders[*folder].defective {
                by_image.push(None);
                continue;
            }
            match mask_path(dir, data, image, *folder).filter(|p| p.is_file()) {
                Some(path) => {
                    let (mw, mh, _) = read_mask(&path)?;
                    // An image the decoder cannot size fails as an ERROR row when scored.
                    if let Ok((w, h)) = image::image_dimensions(image) {
                        if (mw, mh) != (w, h) && (mw, mh) != (h, w) {
                            return Err(MaskError::Size {
                                path,
                                mask_width: mw,
                                mask_height: mh,
                                image: image.clone(),
                                width: w,
                                height: h,
                            });
                        }
                    }
                    by_image.push(Some(path));
                }
                None => {
                    missing += 1;
                    by_image.push(None);
                }
            }
        }
        Ok(Self { by_image, missing })
    }
}

/// `metrics.json`'s pixel metrics (`--masks`).
#[derive(Debug, Default, Serialize)]
pub struct PixelMetrics {
    pub pixel_auroc: Option<f64>,
    pub aupro: Option<f64>,
    pub region_hit_rate: Option<f64>,
    pub region_precision: Option<f64>,
    /// Images the pixel metrics used: scored normal images and defective ones with a mask.
    pub pixel_images: usize,
    /// Defective images without a mask (left out of the pixel metrics).
    pub masks_missing: usize,
    /// Scored images without a fused map (too small for any window): left out too.
    pub images_without_map: usize,
    /// Ground-truth regions (8-connected components of the masks).
    pub gt_regions: u64,
    /// Metric name → why it is `null`.
    #[serde(skip)]
    pub undefined: Vec<(&'static str, String)>,
}

/// The per-level tallies the pixel metrics are computed from.
pub struct PixelTally {
    /// Pixels outside every ground-truth region, per level.
    normal: Vec<u64>,
    /// Pixels inside one, per level.
    defect: Vec<u64>,
    /// Per level: Σ 1 / |region| over the region pixels at that level (PRO's increments).
    pro: Vec<f64>,
    regions: u64,
}

impl Default for PixelTally {
    fn default() -> Self {
        Self {
            normal: vec![0; LEVELS],
            defect: vec![0; LEVELS],
            pro: vec![0.0; LEVELS],
            regions: 0,
        }
    }
}

/// A score's 16-bit level.
pub fn level(score: f32) -> u16 {
    (score.clamp(0.0, 1.0) * 65535.0).round() as u16
}

impl PixelTally {
    /// One image: its levels (row-major, `width` per row) and its mask (`None`: all normal).
    pub fn add(&mut self, levels: &[u16], mask: Option<&[bool]>, width: usize) {
        let Some(mask) = mask else {
            levels.iter().for_each(|&l| self.normal[l as usize] += 1);
            return;
        };
        let (labels, sizes) = components8(mask, width);
        self.regions += sizes.len() as u64;
        for (i, &l) in levels.iter().enumerate() {
            match labels[i] {
                0 => self.normal[l as usize] += 1,
                k => {
                    self.defect[l as usize] += 1;
                    self.pro[l as usize] += 1.0 / sizes[k as usize - 1] as f64;
                }
            }
        }
    }

    pub fn regions(&self) -> u64 {
        self.regions
    }

    /// The area under the pixel ROC: P(defect pixel > normal pixel) + ½ P(tie).
    pub fn auroc(&self) -> Result<f64, Undefined> {
        let positives: u64 = self.defect.iter().sum();
        let negatives: u64 = self.normal.iter().sum();
        if positives == 0 {
            return Err(Undefined(
                "no defect pixels: no mask of a measured image has any",
            ));
        }
        if negatives == 0 {
            return Err(Undefined("no normal pixels"));
        }
        let (mut below, mut sum) = (0u64, 0f64);
        for l in 0..LEVELS {
            sum += self.defect[l] as f64 * (below as f64 + self.normal[l] as f64 / 2.0);
            below += self.normal[l];
        }
        Ok(sum / (positives as f64 * negatives as f64))
    }

    /// MVTec AD's AUPRO up to `limit` (see the module docs).
    pub fn aupro(&self, limit: f64) -> Result<f64, Undefined> {
        let ok_pixels: u64 = self.normal.iter().sum();
        if self.regions == 0 {
            return Err(Undefined(
                "no ground-truth regions: no mask of a measured image has any defect pixel",
            ));
        }
        if ok_pixels == 0 {
            return Err(Undefined("no normal pixels"));
        }
        // The curve from the highest threshold down, one point per level present.
        let mut curve = vec![(0.0, 0.0)];
        let (mut fp, mut pro) = (0u64, 0f64);
        for l in (0..LEVELS).rev() {
            if self.normal[l] == 0 && self.defect[l] == 0 {
                continue;
            }
            fp += self.normal[l];
            pro += self.pro[l];
            let x = (fp as f64 / ok_pixels as f64).min(1.0);
            let y = (pro / self.regions as f64).min(1.0);
            curve.push((x, y));
        }
        curve.push((1.0, 1.0));
        Ok(trapezoid(&curve, limit) / limit)
    }
}

/// MVTec AD's `trapezoid`: the area under the points (sorted by x) up to `x_max`, the last
/// piece interpolated linearly at `x_max` when no point lies on it.
fn trapezoid(points: &[(f64, f64)], x_max: f64) -> f64 {
    let mut area = 0.0;
    for pair in points.windows(2) {
        let ((x0, y0), (x1, y1)) = (pair[0], pair[1]);
        if x1 <= x_max {
            area += 0.5 * (y0 + y1) * (x1 - x0);
        } else {
            if x0 < x_max {
                let y = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0);
                area += 0.5 * (y0 + y) * (x_max - x0);
            }
            break;
        }
    }
    area
}

/// The 8-connected components of `mask` (`width` per row): each pixel's label (0 outside,
/// 1… inside) and each component's size.
fn components8(mask: &[bool], width: usize) -> (Vec<u32>, Vec<u64>) {
    let height = mask.len() / width.max(1);
    let mut labels = vec![0u32; mask.len()];
    let mut sizes = Vec::new();
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || labels[start] != 0 {
            continue;
        }
        sizes.push(0u64);
        let label = sizes.len() as u32;
        labels[start] = label;
        stack.push(start);
        while let Some(i) = stack.pop() {
            sizes[label as usize - 1] += 1;
            let (x, y) = ((i % width) as i64, (i / width) as i64);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= width as i64 || ny >= height as i64 {
                        continue;
                    }
                    let j = ny as usize * width + nx as usize;
                    if mask[j] && labels[j] == 0 {
                        labels[j] = label;
                        stack.push(j);
                    }
                }
            }
        }
    }
    (labels, sizes)
}

/// Whether the box holds a mask pixel.
fn box_hits(r: &DefectRegion, mask: &[bool], width: u32, height: u32) -> bool {
    let (x1, y1) = ((r.x + r.width).min(width), (r.y + r.height).min(height));
    (r.y.min(height)..y1)
        .any(|y| (r.x.min(width)..x1).any(|x| mask[y as usize * width as usize + x as usize]))
}

/// The pixel metrics over the scored records; with `maps_dir`, each measured image's 16-bit
/// map into `maps_dir/<folder>/<path under the folder>.png`.
pub(crate) fn measure(
    data: &Dataset,
    records: &[Record],
    masks: &Masks,
    maps_dir: Option<&Path>,
) -> Result<PixelMetrics, MaskError> {
    let mut tally = PixelTally::default();
    let mut m = PixelMetrics {
        masks_missing: masks.missing,
        ..Default::default()
    };
    let (mut hit_images, mut defect_images, mut boxes, mut boxes_hit) = (0usize, 0usize, 0, 0);
    for (i, r) in records.iter().enumerate() {
        let Ok(decision) = &r.result else { continue };
        let folder = &data.folders[r.folder];
        let mask_file = masks.by_image[i].as_ref();
        let Some(loc) = decision.localization.as_ref() else {
            m.images_without_map += 1;
            continue;
        };
        let Some(map) = loc.anomaly_map.as_ref() else {
            m.images_without_map += 1;
            continue;
        };
        // Eval scores whole frames: the map runs from (0, 0) to the frame's far corner.
        let width = map.x_edges[map.x_edges.len() - 1];
        let height = map.y_edges[map.y_edges.len() - 1];
        let levels: Vec<u16> = map.upsample(width, height).into_iter().map(level).collect();
        if let Some(dir) = maps_dir {
            write_map(dir, data, r, &levels, width, height)?;
        }
        if folder.defective && mask_file.is_none() {
            continue;
        }
        let mask = match mask_file {
            Some(path) => {
                let (mw, mh, bits) = read_mask(path)?;
                if (mw, mh) != (width, height) {
                    return Err(MaskError::Size {
                        path: path.clone(),
                        mask_width: mw,
                        mask_height: mh,
                        image: r.path.clone(),
                        width,
                        height,
                    });
                }
                Some(bits)
            }
            None => None,
        };
        tally.add(&levels, mask.as_deref(), width as usize);
        m.pixel_images += 1;
        let hits = loc
            .regions
            .iter()
            .filter(|reg| {
                mask.as_ref()
                    .is_some_and(|b| box_hits(reg, b, width, height))
            })
            .count();
        boxes += loc.regions.len();
        boxes_hit += hits;
        if folder.defective {
            defect_images += 1;
            hit_images += usize::from(hits > 0);
        }
    }
    m.gt_regions = tally.regions();
    let mut undefined = Vec::new();
    let mut ok = |name: &'static str, v: Result<f64, Undefined>| {
        v.map_err(|e| undefined.push((name, e.to_string()))).ok()
    };
    m.pixel_auroc = ok("pixel_auroc", tally.auroc());
    m.aupro = ok("aupro", tally.aupro(AUPRO_FPR_LIMIT));
    m.region_hit_rate = ok(
        "region_hit_rate",
        super::report::share(hit_images, defect_images)
            .ok_or(Undefined("no defective image with a mask was measured")),
    );
    m.region_precision = ok(
        "region_precision",
        super::report::share(boxes_hit, boxes).ok_or(Undefined("no region was reported")),
    );
    m.undefined = undefined;
    Ok(m)
}

/// A 16-bit greyscale PNG of `levels` at `maps/<folder>/<path under the folder>.png`.
fn write_map(
    dir: &Path,
    data: &Dataset,
    r: &Record,
    levels: &[u16],
    width: u32,
    height: u32,
) -> Result<(), MaskError> {
    let folder = &data.folders[r.folder].name;
    let relative = r
        .path
        .strip_prefix(data.root.join(folder))
        .unwrap_or(&r.path)
        .with_extension("png");
    let path = dir.join(folder).join(relative);
    let fail = |message: String| MaskError::WriteMap {
        path: path.clone(),
        message,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| fail(e.to_string()))?;
    }
    let img: image::ImageBuffer<image::Luma<u16>, Vec<u16>> =
        image::ImageBuffer::from_raw(width, height, levels.to_vec())
            .expect("one level per pixel. This is a bug.");
    img.save_with_format(&path, image::ImageFormat::Png)
        .map_err(|e| fail(e.to_string()))
}

#[cfg(test)]
#[path = "pixels_tests.rs"]
mod tests;
