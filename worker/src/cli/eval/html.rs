//! `report.html`: one self-contained file (inline CSS, the plots and thumbnails as data URIs,
//! no script, nothing fetched), so it can be mailed or archived with the line's records.
//!
//! The worst cases are the ten normal images with the highest anomaly score (false alarms,
//! or the closest to being one) and the ten defective images with the lowest (misses), each
//! drawn with its verdict as `clipqc classify --overlay` draws it: the outcome's border and,
//! for a tiled profile, the fused anomaly map and the regions' boxes; with `--masks`, the
//! ground truth's outline beside them, and the pixel metrics.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use base64::Engine;

use super::report::{outcome, Input, Metrics};
use super::Record;
use crate::preprocess::{self, DecodeLimits};
use crate::score::Decision;

/// Thumbnails fit in this square (pixels).
const THUMB: u32 = 240;
const WORST: usize = 10;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn num(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.4}"))
}

fn data_uri(mime: &str, bytes: &[u8]) -> String {
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

pub(crate) fn report(
    input: &Input,
    m: &Metrics,
    roc: &[u8],
    pr: &[u8],
    limits: &DecodeLimits,
) -> String {
    let mut h = String::with_capacity(64 * 1024);
    let op = &m.operating_point;
    let _ = write!(
        h,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>clipqc eval: {profile}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; margin: 8px 0 20px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
.plots img {{ width: 48%; min-width: 400px; border: 1px solid #ddd; }}
.thumbs {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; width: {THUMB}px; font-size: 12px; word-break: break-all; }}
pre {{ background: #f4f4f4; padding: 10px; }}
</style></head><body>
<h1>clipqc eval: profile {profile}</h1>
<p>Dataset <code>{dataset}</code>, model <code>{model}</code>: {images} images ({normal} normal,
{defective} defective), {errors} unreadable (left out of the metrics), {seconds:.1} s.</p>
<h2>Summary</h2>
<table>
<tr><th>AUROC</th><td>{auroc}</td></tr>
<tr><th>average precision</th><td>{ap}</td></tr>
<tr><th>F1-max (threshold)</th><td>{f1} ({f1t})</td></tr>
<tr><th>operating point: recall &ge; {min_recall}</th><td>threshold {opt}, recall {opr}</td></tr>
<tr><th>false-alarm rate there</th><td>{fa}</td></tr>
<tr><th>suggested review_threshold, REVIEW rate (all / normal)</th><td>{rt}, {rr} / {nrr}</td></tr>
<tr><th>as configured (review_threshold {crt}): recall, false alarms, REVIEW</th><td>{cr}, {cfa}, {crr}</td></tr>
</table>
"#,
        profile = esc(&m.profile),
        dataset = esc(&m.dataset),
        model = esc(&m.model),
        images = m.images,
        normal = m.normal,
        defective = m.defective,
        errors = m.errors,
        seconds = m.seconds,
        auroc = num(m.auroc),
        ap = num(m.average_precision),
        f1 = num(m.f1_max),
        f1t = num(m.f1_threshold),
        min_recall = op.min_recall,
        opt = num(op.threshold),
        opr = num(op.recall),
        fa = num(op.false_alarm_rate),
        rt = num(op.review_threshold),
        rr = num(op.review_rate),
        nrr = num(op.normal_review_rate),
        crt = m.as_configured.review_threshold,
        cr = num(m.as_configured.recall),
        cfa = num(m.as_configured.false_alarm_rate),
        crr = num(m.as_configured.review_rate),
    );
    if let (Some(a), Some(best)) = (&m.aggregates, m.best_aggregate) {
        h += "<h2>Aggregation rules (tiles.aggregate) on these images</h2><table><tr><th>rule</th><th>AUROC</th><th>average precision</th></tr>\n";
        for (name, r) in a {
            let _ = writeln!(
                h,
                "<tr><td>{name}{}</td><td>{}</td><td>{}</td></tr>",
                if *name == best { " (best)" } else { "" },
                num(r.auroc),
                num(r.average_precision)
            );
        }
        h += "</table>\n";
    }
    if let Some(p) = &m.pixel {
        let _ = writeln!(
            h,
            "<h2>Where: pixel metrics (--masks)</h2><table>\
             <tr><th>pixel AUROC</th><td>{}</td></tr>\
             <tr><th>AUPRO (FPR &le; 0.3)</th><td>{}</td></tr>\
             <tr><th>region hit rate (defective images)</th><td>{}</td></tr>\
             <tr><th>region precision (reported boxes)</th><td>{}</td></tr>\
             <tr><th>images measured / defective without a mask / without a map</th><td>{} / {} / {}</td></tr>\
             <tr><th>ground-truth regions</th><td>{}</td></tr></table>\
             <p>Thumbnails below draw each mask's outline in magenta beside the predicted regions (yellow).</p>",
            num(p.pixel_auroc),
            num(p.aupro),
            num(p.region_hit_rate),
            num(p.region_precision),
            p.pixel_images,
            p.masks_missing,
            p.images_without_map,
            p.gt_regions
        );
    }
    if !m.undefined.is_empty() {
        h += "<ul>";
        for (k, why) in &m.undefined {
            let _ = write!(h, "<li>{}: undefined ({})</li>", esc(k), esc(why));
        }
        h += "</ul>";
    }
    let _ = writeln!(
        h,
        "<h2>Curves</h2><div class=\"plots\"><img id=\"roc\" alt=\"ROC curve\" src=\"{}\"> <img id=\"pr\" alt=\"precision-recall curve\" src=\"{}\"></div>",
        data_uri("image/png", roc),
        data_uri("image/png", pr)
    );
    let _ = writeln!(
        h,
        "<h2>Thresholds to paste into the profile</h2><pre>{}</pre>",
        esc(&m.suggested.toml)
    );

    h += "<h2>Per folder</h2><table><tr><th>folder</th><th>truth</th><th>class</th><th>images</th><th>PASS</th><th>DEFECT</th><th>REVIEW</th><th>ERROR</th></tr>\n";
    for (name, s) in &m.per_folder {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(name),
            s.truth,
            esc(s.class.as_deref().unwrap_or("")),
            s.images,
            s.pass,
            s.defect,
            s.review,
            s.error
        );
    }
    h += "</table>\n";

    if let (Some(c), Some(rows)) = (&m.confusion, &m.per_class) {
        let _ = write!(h, "<h2>Classes (folders named like them)</h2><p>Accuracy {}.</p><table><tr><th>true \\ decided</th>", num(m.accuracy));
        for name in &c.classes {
            let _ = write!(h, "<th>{}</th>", esc(name));
        }
        h += "<th>precision</th><th>recall</th><th>support</th></tr>\n";
        for (i, row) in c.matrix.iter().enumerate() {
            let _ = write!(h, "<tr><td>{}</td>", esc(&c.classes[i]));
            for v in row {
                let _ = write!(h, "<td>{v}</td>");
            }
            let _ = writeln!(
                h,
                "<td>{}</td><td>{}</td><td>{}</td></tr>",
                num(rows[i].precision),
                num(rows[i].recall),
                rows[i].support
            );
        }
        h += "</table>\n";
    }

    let scored = |defective: bool| {
        let mut v: Vec<(usize, &Record, &Decision)> = input
            .records
            .iter()
            .enumerate()
            .filter(|(_, r)| input.data.folders[r.folder].defective == defective)
            .filter_map(|(i, r)| r.result.as_ref().ok().map(|d| (i, r, d)))
            .collect();
        // False alarms: highest score first; misses: lowest first.
        v.sort_by(|(_, _, a), (_, _, b)| {
            if defective {
                a.anomaly_score.total_cmp(&b.anomaly_score)
            } else {
                b.anomaly_score.total_cmp(&a.anomaly_score)
            }
        });
        v.truncate(WORST);
        v
    };
    for (title, rows) in [
        (
            "Worst false alarms (normal images, highest anomaly_score)",
            scored(false),
        ),
        (
            "Worst misses (defective images, lowest anomaly_score)",
            scored(true),
        ),
    ] {
        let _ = write!(h, "<h2>{title}</h2><div class=\"thumbs\">");
        if rows.is_empty() {
            h += "<p>none in the dataset</p>";
        }
        for (i, r, decision) in rows {
            let name = r.path.display().to_string();
            let mask = input
                .masks
                .and_then(|m| m.by_image.get(i))
                .and_then(Option::as_deref);
            let img = match thumbnail(&r.path, decision, mask, limits) {
                Ok(uri) => format!("<img alt=\"{}\" src=\"{uri}\">", esc(&name)),
                Err(e) => format!("<p>cannot draw: {}</p>", esc(&e.to_string())),
            };
            let _ = write!(
                h,
                "<figure>{img}<figcaption>{} {:.4}<br>{}</figcaption></figure>",
                outcome(r),
                decision.anomaly_score,
                esc(&name)
            );
        }
        h += "</div>\n";
    }
    if !m.error_images.is_empty() {
        h += "<h2>Unreadable images (not in the metrics)</h2><ul>";
        for e in &m.error_images {
            let _ = write!(h, "<li>{}</li>", esc(&e.error));
        }
        h += "</ul>\n";
    }
    h += "</body></html>\n";
    h
}

/// Why a worst case's thumbnail is not drawn (the report says so in its place).
#[derive(Debug, thiserror::Error)]
enum ThumbnailError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Decode(#[from] preprocess::PreprocessError),
    #[error(transparent)]
    Encode(#[from] image::ImageError),
}

/// The image with its verdict (and its ground-truth mask's outline, when it has one) drawn on
/// it, fitted into THUMB×THUMB, as a JPEG data URI.
fn thumbnail(
    path: &Path,
    decision: &Decision,
    mask: Option<&Path>,
    limits: &DecodeLimits,
) -> Result<String, ThumbnailError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| ThumbnailError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut frame = preprocess::to_rgb8(preprocess::decode(&name, &bytes, limits)?);
    crate::cli::overlay::draw(&mut frame, decision);
    if let Some(mask) = mask {
        // Read at scan time already: a failure here only leaves the outline out.
        if let Ok((mw, mh, bits)) = super::pixels::read_mask(mask) {
            if (mw, mh) == frame.dimensions() {
                crate::cli::overlay::outline_bits(&mut frame, &bits, image::Rgb([230, 0, 230]));
            }
        }
    }
    let (w, h) = frame.dimensions();
    let scale = f64::from(THUMB) / f64::from(w.max(h));
    let thumb = if scale < 1.0 {
        let fit = |v: u32| ((f64::from(v) * scale).round() as u32).max(1);
        image::imageops::thumbnail(&frame, fit(w), fit(h))
    } else {
        frame
    };
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(thumb).write_to(&mut out, image::ImageFormat::Jpeg)?;
    Ok(data_uri("image/jpeg", &out.into_inner()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::overlay::tests::decision;
    use crate::score::Outcome;

    #[test]
    fn a_thumbnail_that_cannot_be_drawn_says_why() {
        let d = decision(Outcome::Defect, None);
        let limits = DecodeLimits::default();
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("gone.jpg");
        let err = thumbnail(&missing, &d, None, &limits).unwrap_err();
        assert!(matches!(err, ThumbnailError::Read { .. }), "{err}");
        assert!(
            err.to_string().starts_with(&missing.display().to_string()),
            "{err}"
        );
        let garbage = dir.path().join("garbage.jpg");
        std::fs::write(&garbage, [0x12; 64]).unwrap();
        let err = thumbnail(&garbage, &d, None, &limits).unwrap_err();
        assert!(matches!(err, ThumbnailError::Decode(_)), "{err}");
        let png = dir.path().join("part.png");
        image::RgbImage::from_pixel(64, 32, image::Rgb([90, 90, 90]))
            .save(&png)
            .unwrap();
        let uri = thumbnail(&png, &d, None, &limits).unwrap();
        assert!(uri.starts_with("data:image/jpeg;base64,"), "{uri}");
    }
}
