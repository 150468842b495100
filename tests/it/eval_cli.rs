//! `clipqc eval`: the metric code against scikit-learn on fixed score vectors, and the real
//! binary on a labelled dataset made here (with one corrupt file): the files it writes agree
//! with each other, the plots are real plots, and the report opens in a real browser
//! (Debian's Chromium, installed with apt when missing).
//!
//! The tiny model's weights are random, so nothing here expects good accuracy: correctness
//! is checked by construction.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::cli::{clipqc, refused, stderr, succeeded};
use common::tiny_model;
use image::{Rgb, RgbImage};
use serde_json::Value;

fn eval(dataset: &Path, extra: &[&str]) -> Output {
    let model = tiny_model().display().to_string();
    let mut args = vec!["eval", "--model", &model];
    args.extend(extra);
    let ds = dataset.display().to_string();
    args.push(&ds);
    clipqc(&args)
}

#[path = "eval_cli/sklearn.rs"]
mod sklearn;

#[path = "eval_cli/masks.rs"]
mod masks;

#[path = "eval_cli/search.rs"]
mod search;

#[path = "eval_cli/adapt.rs"]
mod adapt;

// ---------------------------------------------------------------- the binary on a dataset

/// A grey part on a darker background; `defect` draws dark scratches across it.
fn part(seed: u32, defect: bool) -> RgbImage {
    let (w, h) = (160 + seed * 8, 120 + seed * 4);
    let mut img = RgbImage::from_fn(w, h, |x, y| {
        let inside = x > w / 10 && x < w * 9 / 10 && y > h / 7 && y < h * 6 / 7;
        let v = if inside {
            170 + ((x * 7 + y * 13 + seed) % 20) as u8
        } else {
            100
        };
        Rgb([v, v, v])
    });
    if defect {
        for k in 0..3 {
            for t in 0..w {
                let y = (h / 4 + k * h / 5 + t * (seed + 1) / 9) % h;
                img.put_pixel(t, y, Rgb([30, 30, 30]));
            }
        }
    }
    img
}

/// good/ (normal, with a corrupt file), surface_scratch/ (a class of the default profile),
/// dent/ (defective, no class): 12 readable images and one that is not.
pub(crate) fn make_dataset(root: &Path) {
    for (folder, n, defect) in [
        ("good", 5, false),
        ("surface_scratch", 4, true),
        ("dent", 3, true),
    ] {
        let dir = root.join(folder);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..n {
            part(i + if defect { 10 } else { 0 }, defect)
                .save(dir.join(format!("{folder}_{i}.png")))
                .unwrap();
        }
    }
    std::fs::write(
        root.join("good/corrupt.jpg"),
        b"\xff\xd8\xff\xe0 not really a jpeg",
    )
    .unwrap();
    std::fs::write(root.join("good/notes.txt"), b"not an image").unwrap();
}

fn read_csv(path: &Path) -> (Vec<String>, Vec<BTreeMap<String, String>>) {
    let mut r = csv::Reader::from_path(path).unwrap();
    let header: Vec<String> = r.headers().unwrap().iter().map(String::from).collect();
    let rows = r
        .records()
        .map(|rec| {
            let rec = rec.unwrap();
            header
                .iter()
                .cloned()
                .zip(rec.iter().map(String::from))
                .collect()
        })
        .collect();
    (header, rows)
}

/// AUROC as the probability that a defective image outscores a normal one (ties half):
/// pairwise, independent of the curve code under test.
fn pairwise_auroc(pos: &[f64], neg: &[f64]) -> f64 {
    let mut wins = 0.0;
    for p in pos {
        for n in neg {
            wins += if p > n {
                1.0
            } else if p == n {
                0.5
            } else {
                0.0
            };
        }
    }
    wins / (pos.len() * neg.len()) as f64
}

/// The PNG decoded, checked for size, and the pixels of the curve's colour.
fn curve_pixels(path: &Path) -> (RgbImage, Vec<(u32, u32)>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{}: not a PNG",
        path.display()
    );
    let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
        .unwrap()
        .to_rgb8();
    assert_eq!(img.dimensions(), (800, 600), "{}", path.display());
    let blue: Vec<(u32, u32)> = img
        .enumerate_pixels()
        .filter(|(_, _, p)| p.0 == [31, 90, 180])
        .map(|(x, y, _)| (x, y))
        .collect();
    (img, blue)
}

#[test]
fn eval_writes_files_that_agree_plots_and_a_report_a_browser_shows() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("parts");
    make_dataset(&data);
    let out_dir = tmp.path().join("report");
    let out = eval(
        &data,
        &[
            "--normal",
            "good",
            "--out",
            out_dir.to_str().unwrap(),
            "--json",
        ],
    );
    succeeded(&out);
    // Not a terminal: plain progress lines, the last one at the end.
    assert!(
        stderr(&out).contains("eval: 13/13 images (100 %)"),
        "{}",
        stderr(&out)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).expect("--json prints metrics.json");
    let m: Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(printed, m, "--json and metrics.json differ");
    for key in [
        "images",
        "errors",
        "auroc",
        "average_precision",
        "f1_max",
        "f1_threshold",
        "operating_point",
        "per_folder",
        "confusion",
    ] {
        assert!(m.get(key).is_some(), "metrics.json lacks {key}");
    }
    for key in ["min_recall", "threshold", "false_alarm_rate", "review_rate"] {
        assert!(
            m["operating_point"].get(key).is_some(),
            "operating_point lacks {key}"
        );
    }
    assert_eq!(
        (m["images"].as_u64(), m["errors"].as_u64()),
        (Some(13), Some(1))
    );
    assert_eq!(
        (m["normal"].as_u64(), m["defective"].as_u64()),
        (Some(5), Some(7))
    );
    assert_eq!(m["per_folder"]["good"]["ERROR"], 1);
    assert_eq!(m["per_folder"]["dent"]["truth"], "defective");
    assert_eq!(m["operating_point"]["min_recall"], 0.99);
    assert!(m["error_images"][0]["path"]
        .as_str()
        .unwrap()
        .ends_with("corrupt.jpg"));

    // scores.csv: the contract's header, one row per image, the error row empty.
    let (header, rows) = read_csv(&out_dir.join("scores.csv"));
    let classes = [
        "surface_scratch",
        "edge_chip",
        "paint_spot",
        "misassembly",
        "good_part",
    ];
    assert_eq!(header[..4], ["path", "folder", "outcome", "anomaly_score"]);
    assert_eq!(header[4..9], classes);
    assert_eq!(rows.len(), 13);
    let bad: Vec<_> = rows.iter().filter(|r| r["outcome"] == "ERROR").collect();
    assert_eq!(bad.len(), 1);
    assert!(bad[0]["path"].ends_with("corrupt.jpg") && bad[0]["anomaly_score"].is_empty());
    assert!(classes.iter().all(|c| bad[0][*c].is_empty()));

    // The AUROC recomputed from the CSV (folders as the truth) is metrics.json's.
    let score = |folder: &str| -> Vec<f64> {
        rows.iter()
            .filter(|r| r["folder"] == folder && r["outcome"] != "ERROR")
            .map(|r| r["anomaly_score"].parse::<f64>().unwrap())
            .collect()
    };
    let neg = score("good");
    let pos: Vec<f64> = [score("surface_scratch"), score("dent")].concat();
    let auroc = pairwise_auroc(&pos, &neg);
    assert!(
        (auroc - m["auroc"].as_f64().unwrap()).abs() < 1e-12,
        "CSV {auroc} vs {}",
        m["auroc"]
    );
    // Per-folder outcome counts too.
    for (folder, stats) in m["per_folder"].as_object().unwrap() {
        for outcome in ["PASS", "DEFECT", "REVIEW", "ERROR"] {
            let n = rows
                .iter()
                .filter(|r| &r["folder"] == folder && r["outcome"] == outcome)
                .count();
            assert_eq!(
                stats[outcome].as_u64(),
                Some(n as u64),
                "{folder} {outcome}"
            );
        }
    }
    // The confusion matrix covers the images of the folder named like a class.
    let total: u64 = m["confusion"]["matrix"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(total, 4);

    // The plots: PNGs of 800×600 whose curve is one unbroken line across the plot.
    for name in ["roc.png", "pr.png"] {
        let (_, blue) = curve_pixels(&out_dir.join(name));
        assert!(blue.len() > 300, "{name}: {} curve pixels", blue.len());
        let xs: std::collections::BTreeSet<u32> = blue.iter().map(|p| p.0).collect();
        let (lo, hi) = (*xs.first().unwrap(), *xs.last().unwrap());
        assert!(
            hi - lo > 400,
            "{name}: the curve spans only columns {lo}..{hi}"
        );
        assert!(
            (lo..=hi).all(|x| xs.contains(&x)),
            "{name}: the curve is broken between {lo} and {hi}"
        );
        let red = image::open(out_dir.join(name))
            .unwrap()
            .to_rgb8()
            .pixels()
            .filter(|p| p.0 == [210, 40, 40])
            .count();
        assert!(red > 50, "{name}: no operating point marked");
    }

    // The report in a real browser: the screenshot shows the ROC plot's curve.
    let html = std::fs::read_to_string(out_dir.join("report.html")).unwrap();
    assert!(html.contains("data:image/png;base64,") && !html.contains("src=\"http"));
    assert!(
        html.matches("data:image/jpeg;base64,").count() >= 12,
        "thumbnails of the worst cases"
    );
    let shot = tmp.path().join("shot.png");
    screenshot(&out_dir.join("report.html"), &shot, (1600, 1400));
    let img = image::open(&shot).unwrap().to_rgb8();
    let near_blue = img
        .pixels()
        .filter(|p| {
            p.0.iter()
                .zip([31u8, 90, 180])
                .all(|(a, b)| a.abs_diff(b) < 40)
        })
        .count();
    assert!(
        near_blue > 200,
        "the screenshot shows no curve ({near_blue} curve-coloured pixels)"
    );
}

fn ensure_chromium() -> PathBuf {
    if let Ok(p) = which::which("chromium") {
        return p;
    }
    // As .ci/run and scripts/env.sh install their Debian packages: root on CI and here.
    let install = "apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
        { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }";
    let status = Command::new("sh").args(["-c", install]).status().unwrap();
    assert!(
        status.success(),
        "cannot install Debian's chromium with apt-get (needs root)"
    );
    which::which("chromium").expect("chromium on PATH after apt-get install")
}

fn screenshot(html: &Path, png: &Path, (w, h): (u32, u32)) {
    let chromium = ensure_chromium();
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            &format!("--user-data-dir={}", profile.path().display()),
            &format!("--screenshot={}", png.display()),
            &format!("--window-size={w},{h}"),
            &format!("file://{}", html.display()),
        ])
        .output()
        .unwrap();
    assert!(
        png.is_file(),
        "chromium wrote no screenshot: {}",
        stderr(&out)
    );
}

#[test]
fn one_class_datasets_get_nulls_with_reasons_and_exit_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("parts");
    std::fs::create_dir_all(data.join("good")).unwrap();
    part(1, false).save(data.join("good/only.png")).unwrap();
    let out = eval(&data, &["--normal", "good", "--json"]);
    let text = succeeded(&out);
    assert!(!text.contains("NaN"));
    let m: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(m["images"], 1);
    assert!(m["auroc"].is_null() && m["average_precision"].is_null() && m["f1_max"].is_null());
    assert!(m["undefined"]["auroc"]
        .as_str()
        .unwrap()
        .contains("no defective images"));
    assert!(m["operating_point"]["threshold"].is_null());
    assert!(
        m.get("confusion").is_none(),
        "no folder is named like a class"
    );
}

#[test]
fn what_cannot_be_measured_is_refused_naming_the_input() {
    let tmp = tempfile::tempdir().unwrap();
    let expect_refusal = |out: Output, needle: &str| {
        refused(&out, Some(2), &[needle]);
    };
    expect_refusal(eval(&tmp.path().join("missing"), &[]), "missing");
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(empty.join("good")).unwrap();
    expect_refusal(eval(&empty, &[]), "no image files");
    let data = tmp.path().join("parts");
    std::fs::create_dir_all(data.join("good")).unwrap();
    std::fs::write(data.join("good/a.png"), b"not a png").unwrap();
    expect_refusal(eval(&data, &["--normal", "goood"]), "goood");
    expect_refusal(eval(&data, &["--profile", "nope"]), "nope");
    expect_refusal(eval(&data, &["--normal", "good"]), "none of its 1 images");
}
