//! `clipqc eval --search` on a labelled set with exemplars on a (mock) broker: the grid is
//! searched, the best setting lands in `suggested`, and its figures are the ones a plain
//! `eval` of a profile set to that `alpha` and `beta` measures: the search re-scores the
//! embedded views with the worker's own scoring, it does not estimate.

use std::path::Path;

use serde_json::Value;

use super::{make_dataset, Output};
use crate::common::cli::{clipqc, refused, succeeded};
use crate::common::profile::{self, Class};
use crate::common::{kafka, tiny_model};

const SCRATCH: Class = Class {
    name: "surface_scratch",
    ..profile::SCRATCH
};

fn config(dir: &Path, brokers: &str, exemplars: &str) -> std::path::PathBuf {
    let tiles = "tiles = { scales = [1.0, 0.5], aggregate = \"winclip\" }";
    let text = format!(
        "[kafka]\nbrokers = \"{brokers}\"\n[model]\ndir = \"{}\"\n{}",
        tiny_model().display(),
        profile::toml("default", &[tiles, exemplars], &[SCRATCH, profile::GOOD])
    );
    let path = dir.join(format!("clipqc-{}.toml", exemplars.len()));
    std::fs::write(&path, text).unwrap();
    path
}

fn eval_json(config: &Path, data: &Path, extra: &[&str]) -> (Output, Option<Value>) {
    let (config, data) = (config.display().to_string(), data.display().to_string());
    let mut args = vec!["eval", "--config", &config, "--normal", "good", "--json"];
    args.extend(extra);
    args.push(&data);
    let out = clipqc(&args);
    let json = serde_json::from_slice(&out.stdout).ok();
    (out, json)
}

#[test]
#[ignore = "needs the tiny model (scripts/test.sh makes it)"]
fn search_finds_the_best_setting_and_plain_eval_agrees_with_its_figures() {
    let (mock, _, brokers) = kafka::cluster("eval-search");
    mock.create_topic("clipqc.exemplars", 1, 1).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("parts");
    make_dataset(&data);
    let cfg = config(tmp.path(), &brokers, "");

    // No exemplars yet: refused, saying why.
    let (out, _) = eval_json(&cfg, &data, &["--search"]);
    refused(&out, None, &["--search", "no exemplars"]);

    let c = cfg.display().to_string();
    let add = |class: &str, images: &[&str]| {
        let mut args = vec!["exemplar", "add", "--profile", "default", "--class", class, "--config", &c];
        let paths: Vec<String> = images.iter().map(|i| data.join(i).display().to_string()).collect();
        args.extend(paths.iter().map(String::as_str));
        succeeded(&clipqc(&args));
    };
    add("good", &["good/good_0.png", "good/good_1.png"]);
    add("surface_scratch", &["surface_scratch/surface_scratch_0.png"]);

    let (out, m) = eval_json(&cfg, &data, &["--search"]);
    succeeded(&out);
    let m = m.expect("metrics.json on stdout");
    let search = &m["search"];
    assert_eq!(search["exemplars"], 3);
    assert_eq!(search["grid"].as_array().unwrap().len(), 132);
    let best = &search["best"];
    let (alpha, beta) = (best["alpha"].as_f64().unwrap(), best["beta"].as_f64().unwrap());
    assert_eq!(m["suggested"]["exemplars"]["alpha"], best["alpha"]);
    let toml = m["suggested"]["toml"].as_str().unwrap();
    assert!(toml.contains(&format!("alpha = {}", alpha as f32)), "{toml}");
    // The profile's own setting, measured by the search, is what plain eval measures.
    assert_eq!(search["current"]["auroc"], m["auroc"], "{search:#}");
    let best_auroc = best["auroc"].as_f64().unwrap();
    for s in search["grid"].as_array().unwrap() {
        assert!(s["auroc"].as_f64().unwrap() <= best_auroc, "{s} beats the best");
    }

    // A profile set to the best setting: plain eval measures the search's figures.
    let tuned = config(
        tmp.path(),
        &brokers,
        &format!("exemplars = {{ alpha = {}, beta = {} }}", alpha as f32, beta as f32),
    );
    let (out, plain) = eval_json(&tuned, &data, &[]);
    succeeded(&out);
    let plain = plain.unwrap();
    eprintln!(
        "search: best alpha {alpha} beta {beta}: AUROC {best_auroc}; profile default: {}; plain eval at the best: {}",
        search["current"]["auroc"], plain["auroc"]
    );
    assert_eq!(plain["auroc"], best["auroc"]);
    assert_eq!(plain["f1_max"], best["f1_max"]);
}
