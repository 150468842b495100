//! Profiles changed while the workers run, on the real broker: under a steady request stream
//! each worker's config file gets a changed prompt, then an invalid profile. Every request
//! gets exactly one verdict, each verdict names the version it was decided with (the old or
//! the new one), each partition switches once in offset order, and the invalid change is
//! refused with the old profile kept, a log line naming the problem and a metric.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use super::common::e2e::*;
use super::common::profile::{self, Class, DENT, GOOD, SCRATCH};
use super::common::{fixtures, metric};

fn old_profile() -> String {
    profile::toml("default", &[], &[SCRATCH, GOOD])
}

/// The good class with another prompt.
const GOOD_TOO: Class = Class {
    prompts: &["a clean part", "a flawless part"],
    ..GOOD
};

/// The change: another prompt for one class.
fn new_profile() -> String {
    profile::toml("default", &[], &[SCRATCH, GOOD_TOO])
}

/// Not valid: a template without `{}`.
fn invalid_profile() -> String {
    profile::toml(
        "default",
        &["templates = [\"a photo\"]"],
        &[SCRATCH, GOOD_TOO],
    )
}

/// A worker reads its config file every `pipeline.config_reload_ms` (2 s) and applies a
/// change at once (the changed prompts embedded by the tiny model: milliseconds); 30 s is
/// fifteen reads.
const APPLIED_WITHIN: Duration = Duration::from_secs(30);

/// The version a worker gives `profile` (the default profile of that TOML).
fn version_of(profile: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(&path, profile).unwrap();
    let settings = clipqc::config::Settings::load_with_env(Some(&path), []).unwrap();
    clipqc::profiles::version(&settings.profiles()["default"])
}

/// Rewrites the worker's config file with `profile` in place of its current profile section,
/// the way an editor or a ConfigMap update does: a new file renamed over the old one.
fn rewrite(config: &Path, old: &str, profile: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    assert!(text.contains(old), "{text}");
    let tmp = config.with_extension("toml.new");
    std::fs::write(&tmp, text.replace(old, profile)).unwrap();
    std::fs::rename(&tmp, config).unwrap();
}

struct Seen {
    version: String,
    worker: String,
    decided_at: SystemTime,
}

#[test]
#[ignore = "needs Apache Kafka (scripts/kafka.sh) and the Python Kafka client (scripts/test.sh)"]
fn profiles_change_under_a_steady_stream_with_one_switch_per_partition_and_nothing_lost() {
    let e = E2e::start("reload", 3);
    let names = ["reload-a", "reload-b"];
    let old_toml = old_profile();
    let workers: Vec<Worker> = names
        .iter()
        .map(|n| e.worker(n).config(&old_toml).start())
        .collect();
    let configs: Vec<_> = names
        .iter()
        .map(|n| e.dir.path().join(format!("{n}.toml")))
        .collect();
    let (old, new) = (version_of(&old_toml), version_of(&new_profile()));
    assert_ne!(old, new);
    for w in &workers {
        w.wait_ready();
    }

    // 25 requests a second, read back as they come, until the test has seen verdicts of
    // every phase (at most 4 minutes): a stream of a fixed length once ran out before the
    // last phase, when the workers' first assignment and the reloads were slow under load.
    let verdicts = follow(&e.broker, &e.topics.verdicts, usize::MAX >> 1, IDLE);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producing = produce_until(
        &e.broker,
        &e.topics.requests,
        &e.part_url(),
        25.0,
        50,
        stop.clone(),
        Duration::from_secs(240),
    );
    let mut seen: HashMap<(i32, i64), Vec<Seen>> = HashMap::new();
    type Verdicts = HashMap<(i32, i64), Vec<Seen>>;
    // Reads verdicts until `until` holds. Each phase needs 20 verdicts of each worker, about
    // 2 s of the stream, after a change applied within APPLIED_WITHIN; 120 s is four times
    // that. The reader itself stops after IDLE without a verdict.
    let read = |what: &str, seen: &mut Verdicts, until: &mut dyn FnMut(&Verdicts) -> bool| {
        let within = Duration::from_secs(120);
        let deadline = Instant::now() + within;
        while !until(seen) {
            let tails = || format!("{}\n{}", workers[0].log_tail(), workers[1].log_tail());
            assert!(
                Instant::now() < deadline,
                "{what}: not within {within:?} ({} verdicts read)\n{}",
                seen.len(),
                tails()
            );
            let Ok(r) = verdicts.recv() else {
                let mut by: BTreeMap<(&str, &str), usize> = BTreeMap::new();
                for v in seen.values().flatten() {
                    *by.entry((v.worker.as_str(), v.version.as_str())).or_default() += 1;
                }
                panic!(
                    "{what}: the reader stopped, no verdict for {IDLE:?} ({} read; by worker and \
                     version: {by:?})\n{}",
                    seen.len(),
                    tails()
                );
            };
            let v = r.verdict.as_ref().expect("a verdict");
            assert_eq!(
                v["outcome"].as_str().map(|o| o != "OUTCOME_ERROR"),
                Some(true),
                "{v}"
            );
            let decided = v["decidedAt"].as_str().unwrap();
            seen.entry(r.source()).or_default().push(Seen {
                version: v["profileVersion"].as_str().unwrap_or_default().to_string(),
                worker: r.header("clipqc-worker").unwrap().to_string(),
                decided_at: humantime::parse_rfc3339(decided).unwrap(),
            });
        }
    };
    let count = |seen: &Verdicts, version: &str, worker: &str| {
        seen.values()
            .flatten()
            .filter(|s| s.version == version && s.worker == worker)
            .count()
    };

    // Both workers deciding with the old profile, then the change, mid-stream.
    read("20 old verdicts of each worker", &mut seen, &mut |s| {
        names.iter().all(|w| count(s, &old, w) >= 20)
    });
    let changed_at = SystemTime::now();
    let phase = |what: &str, s: &Verdicts| {
        eprintln!(
            "{what}: {} verdicts read, {:.1} s after the change",
            s.len(),
            changed_at.elapsed().unwrap().as_secs_f64()
        );
    };
    for c in &configs {
        rewrite(c, &old_toml, &new_profile());
    }
    read("20 new verdicts of each worker", &mut seen, &mut |s| {
        names.iter().all(|w| count(s, &new, w) >= 20)
    });
    phase("new version everywhere", &seen);
    // Then an invalid one: refused, the workers go on with the last good version.
    for c in &configs {
        rewrite(c, &new_profile(), &invalid_profile());
    }
    for w in &workers {
        w.wait_for_log("config change refused", APPLIED_WITHIN);
    }
    let refused_at = SystemTime::now();
    phase("refused everywhere", &seen);
    read("20 verdicts of each worker after the refusal", &mut seen, &mut |s| {
        names.iter().all(|w| {
            s.values()
                .flatten()
                .filter(|v| v.worker == *w && v.decided_at > refused_at)
                .count()
                >= 20
        })
    });
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let published = producing.join().unwrap();
    let total = published.len();
    read("every verdict", &mut seen, &mut |s| s.len() >= total);

    // 0 lost, none twice (static members, no crash: no redelivery either).
    let sources: HashSet<(i32, i64)> = published.iter().map(|p| (p.partition, p.offset)).collect();
    assert_eq!(seen.keys().copied().collect::<HashSet<_>>(), sources);
    assert!(
        seen.values().all(|v| v.len() == 1),
        "a request answered twice"
    );
    let all: Vec<&Seen> = seen.values().flatten().collect();
    assert!(
        all.iter().all(|s| s.version == old || s.version == new),
        "a version other than {old} and {new}"
    );
    // Each partition switches once, in offset order: no old verdict after a new one.
    let mut partitions: BTreeMap<i32, Vec<(i64, &Seen)>> = BTreeMap::new();
    for ((p, o), v) in &seen {
        partitions.entry(*p).or_default().push((*o, &v[0]));
    }
    for (p, mut rows) in partitions {
        rows.sort_by_key(|(o, _)| *o);
        let versions: Vec<&str> = rows.iter().map(|(_, s)| s.version.as_str()).collect();
        let first_new = versions.iter().position(|v| *v == new).expect("switched");
        assert!(
            versions[first_new..].iter().all(|v| *v == new),
            "partition {p} went back to the old version after offset {}",
            rows[first_new].0
        );
        assert!(
            first_new > 0,
            "partition {p} had old verdicts before the change"
        );
        // One worker per partition (static members, no rebalance).
        let owners: HashSet<&str> = rows.iter().map(|(_, s)| s.worker.as_str()).collect();
        assert_eq!(owners.len(), 1, "partition {p}: {owners:?}");
    }
    // After the refusal: still the last good version.
    let late: Vec<&&Seen> = all.iter().filter(|s| s.decided_at > refused_at).collect();
    assert!(!late.is_empty(), "the stream went on after the refusal");
    assert!(late.iter().all(|s| s.version == new));

    for (w, name) in workers.iter().zip(names) {
        // From the file's write to the worker's first verdict of the new version.
        let first_new = all
            .iter()
            .filter(|s| s.worker == name && s.version == new)
            .map(|s| s.decided_at)
            .min()
            .unwrap();
        let last_old = all
            .iter()
            .filter(|s| s.worker == name && s.version == old)
            .map(|s| s.decided_at)
            .max()
            .unwrap();
        let log = w.log_text();
        let reload_line = log
            .lines()
            .find(|l| l.contains("profiles reloaded"))
            .expect("the reload logged");
        eprintln!(
            "{name}: first verdict of the new version {:.2} s after the file was written \
             (last old one {:+.2} s); {reload_line}",
            first_new.duration_since(changed_at).unwrap().as_secs_f64(),
            last_old
                .duration_since(changed_at)
                .map(|d| d.as_secs_f64())
                .unwrap_or_else(|e| -e.duration().as_secs_f64()),
        );
        let refusal = log
            .lines()
            .find(|l| l.contains("config change refused"))
            .unwrap();
        assert!(
            refusal.contains("\\\"a photo\\\"") || refusal.contains("\"a photo\""),
            "{refusal}"
        );
        assert!(refusal.contains("{}"), "{refusal}");
        let text = w.metrics();
        let value = |name: &str, labels: &[(&str, &str)]| metric(&text, name, labels);
        assert_eq!(value("clipqc_profile_reloads_total", &[]), 1.0, "{text}");
        let invalid = [("reason", "invalid")];
        let failures = value("clipqc_profile_reload_failures_total", &invalid);
        assert_eq!(failures, 1.0, "{text}");
        let info = |v: &str| {
            value(
                "clipqc_profile_info",
                &[("profile", "default"), ("version", v)],
            )
        };
        assert_eq!(info(&new), 1.0, "{text}");
        assert_eq!(info(&old), 0.0, "{text}");
        assert!(value("clipqc_profile_reload_seconds", &[]) > 0.0, "{text}");
    }
    for w in workers {
        assert!(w.terminate(), "clean exit");
    }
}

/// [`super::exemplars::banked`] with a class inserted first: every class after it moves.
fn with_dent() -> String {
    let alpha = "exemplars = { alpha = 50.0 }";
    profile::toml("default", &[alpha], &[DENT, SCRATCH, GOOD])
}

fn add_exemplar(config: &Path, class: &str, image: &str) {
    super::exemplars::add_exemplar(config, class, &fixtures().join("images").join(image));
}

/// A class added to a profile while the worker runs: the worker reads the exemplar bank again
/// with the new classes, so an exemplar of the new class that it skipped before now counts,
/// and the exemplars of the classes that moved keep their class.
#[test]
#[ignore = "needs Apache Kafka (scripts/kafka.sh) and the Python Kafka client (scripts/test.sh)"]
fn a_class_added_while_running_takes_its_exemplars_and_the_others_keep_theirs() {
    let e = E2e::start("relearn", 1);
    e.broker.create_topic("clipqc.exemplars", 1);
    let banked = super::exemplars::banked();
    let worker = e.worker("relearn-1").config(&banked).start();
    let config = e.dir.path().join("relearn-1.toml");
    worker.wait_ready();
    // A scratch exemplar the worker knows, and a dent one it skips (the CLI with the new
    // profile publishes it).
    add_exemplar(&config, "scratch", "part_640x480.png");
    let cli = e.dir.path().join("cli.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&cli, text.replace(&banked, &with_dent())).unwrap();
    add_exemplar(&cli, "dent", "part_250.jpg");
    // The worker follows the exemplar topic as records come (a second or two); 60 s is a
    // worker that never reads it.
    let unknown = [("reason", "unknown_class")];
    worker.wait_for_metric(
        "clipqc_exemplars_skipped_total",
        &unknown,
        1.0,
        Duration::from_secs(60),
    );

    // One request at a time, its verdict the newest one (one partition): each read ends once
    // it has every verdict so far, so no reader outlives the broker.
    let asked = std::cell::Cell::new(0);
    let verdict_for = |image: &str| -> serde_json::Value {
        produce(&e.broker, &e.topics.requests, 1, &e.images.url(image), 0);
        asked.set(asked.get() + 1);
        let all = read_all(&e.broker, &e.topics.verdicts, asked.get(), IDLE);
        assert_eq!(all.len(), asked.get(), "{}", worker.log_tail());
        let newest = all.into_iter().max_by_key(|r| r.offset).unwrap();
        newest.verdict.unwrap()
    };
    let nearest = |v: &serde_json::Value| {
        (
            v["nearestExemplar"]["class"].as_str().unwrap().to_string(),
            v["nearestExemplar"]["similarity"].as_f64().unwrap(),
            v["topClass"].as_str().unwrap().to_string(),
        )
    };
    let scratch = verdict_for("part_640x480.png");
    let (class, similarity, top) = nearest(&scratch);
    assert_eq!(
        (class.as_str(), top.as_str()),
        ("scratch", "scratch"),
        "{scratch}"
    );
    assert!(similarity > 0.999);
    let dent = verdict_for("part_250.jpg");
    assert_eq!(
        nearest(&dent).0,
        "scratch",
        "the dent exemplar is skipped: {dent}"
    );

    rewrite(&config, &banked, &with_dent());
    // The change applied (APPLIED_WITHIN), then the bank read again from the start of its
    // topic: one record, milliseconds. 60 s is twice APPLIED_WITHIN.
    worker.wait_for_log("exemplar bank read again", 2 * APPLIED_WITHIN);
    let new = version_of(&with_dent());
    let dent = verdict_for("part_250.jpg");
    let (class, similarity, top) = nearest(&dent);
    assert_eq!((class.as_str(), top.as_str()), ("dent", "dent"), "{dent}");
    assert!(similarity > 0.999);
    assert_eq!(dent["profileVersion"], serde_json::json!(new));
    assert_eq!(dent["scores"][0]["name"], serde_json::json!("dent"));
    // scratch moved from the first class to the second; its exemplar moved with it.
    let scratch = verdict_for("part_640x480.png");
    let (class, _, top) = nearest(&scratch);
    assert_eq!(
        (class.as_str(), top.as_str()),
        ("scratch", "scratch"),
        "{scratch}"
    );
    assert!(worker.terminate(), "clean exit");
}
