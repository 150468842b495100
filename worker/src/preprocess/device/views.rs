//! The views of one decoded frame as tensor ops, on whatever device the frame is on.
//!
//! The geometry is the CPU path's own ([`Transform::resized_dims`], [`Transform::placement`],
//! [`TileConfig::layout`]), only the pixel work differs: orientation by flips and transposes,
//! the region and windows by `narrow` (views, no copy), the resize by libtorch's antialiased
//! bicubic (`_upsample_bicubic2d_aa`, the Catmull-Rom kernel widened when downscaling, with
//! PIL's edge handling: what fast_image_resize computes) or bilinear, rounded to 8 bits as the
//! CPU path's resize is, then placed and normalised into one preallocated `N×3×S×S` batch.

use image::metadata::Orientation;
use tch::{Device, Kind, Tensor};

use super::super::transform::Transform;
use super::super::{Region, Window};
use crate::model::artifact::Interpolation;

/// `image` (CHW uint8, as stored) turned upright as `image`'s `apply_orientation` does.
pub fn orient(image: Tensor, orientation: Orientation) -> Tensor {
    // CHW: dimension 1 is rows, 2 columns. rotate90 (clockwise) = transpose, then mirror.
    match orientation {
        Orientation::NoTransforms => image,
        Orientation::Rotate90 => image.transpose(1, 2).flip([2]),
        Orientation::Rotate180 => image.flip([1, 2]),
        Orientation::Rotate270 => image.transpose(1, 2).flip([1]),
        Orientation::FlipHorizontal => image.flip([2]),
        Orientation::FlipVertical => image.flip([1]),
        // rotate90 then fliph: the two mirrors cancel.
        Orientation::Rotate90FlipH => image.transpose(1, 2),
        Orientation::Rotate270FlipH => image.transpose(1, 2).flip([1, 2]),
    }
}

/// The region of interest of `image` (already checked to be inside it): a view.
pub fn crop(image: &Tensor, r: Region) -> Tensor {
    image.narrow(1, i64::from(r.y), i64::from(r.height)).narrow(
        2,
        i64::from(r.x),
        i64::from(r.width),
    )
}

/// Fills `out` (`3×S×S` float, a slice of the batch) with `src` (`C×h×w` uint8, C 1 or 3)
/// through `transform`: resized, rounded to 8 bits, placed in the square, normalised.
pub fn render(
    transform: &Transform,
    norm: &Normalisation,
    src: &Tensor,
    out: &mut Tensor,
) -> Result<(), tch::TchError> {
    let dims = src.size();
    let (h, w) = (dims[1], dims[2]);
    let (rw, rh) = transform.resized_dims(w as u32, h as u32);
    let (rw, rh) = (i64::from(rw), i64::from(rh));
    // As fast_image_resize does: the vertical pass, then the horizontal one, each into 8-bit
    // pixels (rounded and clipped: bicubic overshoots at edges). One 2-D pass in float differs
    // by up to 8 grey levels on sharp edges, where the clipped intermediate matters.
    let mut x = src.f_to_kind(Kind::Float)?.f_unsqueeze(0)?;
    if rh != h {
        x = resize_pass(transform.interpolation(), &x, rh, w)?;
    }
    if rw != w {
        x = resize_pass(transform.interpolation(), &x, rh, rw)?;
    }
    let resized = x.f_squeeze_dim(0)?;
    // Grey is resized as one channel and replicated, as the CPU path does.
    let normalised = resized
        .f_expand([3, rh, rw], false)?
        .f_mul(&norm.scale)?
        .f_add(&norm.offset)?;
    let s = i64::from(transform.size);
    let (left, top, fill) = transform.placement(rw as usize, rh as usize);
    for (c, v) in fill.iter().enumerate() {
        drop(out.f_get(c as i64)?.f_fill_(f64::from(*v))?);
    }
    // The square's columns and rows the image covers; the rest keeps the fill.
    let x0 = (-left).clamp(0, s);
    let x1 = (rw - left).clamp(x0, s);
    let y0 = (-top).clamp(0, s);
    let y1 = (rh - top).clamp(y0, s);
    if x1 > x0 && y1 > y0 {
        out.f_narrow(1, y0, y1 - y0)?
            .f_narrow(2, x0, x1 - x0)?
            .f_copy_(&normalised.f_narrow(1, top + y0, y1 - y0)?.f_narrow(
                2,
                left + x0,
                x1 - x0,
            )?)?;
    }
    Ok(())
}

/// A transform's per-channel normalisation as `3×1×1` tensors on the frame's device: made
/// once per frame, not once per view (each is a copy to the device).
pub struct Normalisation {
    scale: Tensor,
    offset: Tensor,
}

impl Normalisation {
    pub fn new(transform: &Transform, device: Device) -> Self {
        let (scale, offset) = transform.normalisation();
        let on = |v: [f32; 3]| Tensor::from_slice(&v).to_device(device).view([3, 1, 1]);
        Self {
            scale: on(scale),
            offset: on(offset),
        }
    }
}

/// One antialiased resize of `x` (`1×C×h×w` float) to `h2`×`w2`, rounded and clipped to
/// 8-bit values. Along an axis whose size does not change the kernel is the identity.
fn resize_pass(
    interpolation: Interpolation,
    x: &Tensor,
    h2: i64,
    w2: i64,
) -> Result<Tensor, tch::TchError> {
    let y = match interpolation {
        Interpolation::Bicubic => {
            x.f_internal_upsample_bicubic2d_aa([h2, w2], false, None, None)?
        }
        Interpolation::Bilinear => {
            x.f_internal_upsample_bilinear2d_aa([h2, w2], false, None, None)?
        }
    };
    y.f_round()?.f_clamp(0.0, 255.0)
}

/// Every view of an upright, cropped frame (`C×h×w` uint8) into one `(1 + windows)×3×S×S`
/// float batch on `device`: the whole-frame view through `whole`, each window through
/// `window`.
pub fn batch(
    frame: &Tensor,
    whole: &Transform,
    window: Option<&Transform>,
    windows: &[Window],
    device: Device,
) -> Result<Tensor, tch::TchError> {
    let s = i64::from(whole.size);
    let n = 1 + windows.len() as i64;
    let out = Tensor::f_empty([n, 3, s, s], (Kind::Float, device))?;
    // Windows are squashed with the same checkpoint settings: the same normalisation.
    let norm = Normalisation::new(whole, device);
    render(whole, &norm, frame, &mut out.f_get(0)?)?;
    if let Some(t) = window {
        for (i, w) in windows.iter().enumerate() {
            let src = frame
                .f_narrow(1, i64::from(w.y), i64::from(w.side))?
                .f_narrow(2, i64::from(w.x), i64::from(w.side))?;
            render(t, &norm, &src, &mut out.f_get(1 + i as i64)?)?;
        }
    }
    Ok(out)
}

/// The most bytes [`batch`] and the decode before it hold at once for a `w`×`h` frame of
/// `channels` (as stored; `rw`×`rh` the largest resize target): the decoded frame, its
/// oriented copy, one view's float source and its resize (the separable antialiased resize's
/// intermediate is at most as large as source plus target) and the batch.
pub fn peak_bytes(w: u64, h: u64, channels: u64, rw: u64, rh: u64, views: u64, size: u64) -> u64 {
    let frame = w * h * channels;
    let float_source = 4 * frame;
    let intermediate = 4 * channels * h.max(rh) * w.max(rw);
    let resized = 4 * 3 * rw * rh;
    let batch = views * 3 * size * size * 4;
    2 * frame + float_source + intermediate + resized + batch
}
