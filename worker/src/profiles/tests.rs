use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};

use super::reload::{restart_keys, Checked, Definitions, LoadError, Reloader, Source};
use super::*;
use crate::model::fake::FakeBackend;
use crate::model::ModelOwner;
use crate::routing::RouteConfig;

/// The config file as the reloader is given it: profiles (the built-in default added) and
/// routes, each profile validated and the routes checked against them, as the worker's
/// settings do; other sections are not this module's and are left unread. (`clipqc run`
/// gives the settings' own loader, `Settings::reloadable`, which the config's tests check.)
fn load(_path: &Path, text: &str) -> Result<Definitions, LoadError> {
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        profiles: BTreeMap<String, ProfileConfig>,
        #[serde(default)]
        routes: Vec<RouteConfig>,
    }
    let values: Value = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize())?;
    let file: File = serde_json::from_value(values.clone())?;
    let mut profiles = file.profiles;
    for (name, p) in &profiles {
        p.validate(name)?;
    }
    profiles
        .entry("default".into())
        .or_insert_with(ProfileConfig::builtin_default);
    let router = Router::new(&file.routes, |p| profiles.contains_key(p))?;
    Ok(Definitions {
        profiles,
        routes: file.routes,
        router,
        file: values,
    })
}

fn profile(toml: &str) -> ProfileConfig {
    let defined = load(Path::new("clipqc.toml"), toml).unwrap();
    defined.profiles["p"].clone()
}

fn write_temp(dir: &tempfile::TempDir, toml: &str) -> std::path::PathBuf {
    let path = dir.path().join("clipqc.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

const TWO_CLASSES: &str = r#"
[profiles.p]
[[profiles.p.classes]]
name = "scratch"
prompts = ["a"]
defect = true
[[profiles.p.classes]]
name = "good"
prompts = ["b"]
[profiles.default]
[[profiles.default.classes]]
name = "ok"
prompts = ["y"]
"#;

#[test]
fn a_version_is_stable_and_counts_defaults_as_written() {
    let a = profile(TWO_CLASSES);
    assert_eq!(version(&a), version(&a.clone()));
    assert_eq!(version(&a).len(), 12);
    assert!(version(&a).chars().all(|c| c.is_ascii_hexdigit()));
    // Writing out a default is the same definition: the same version.
    let explicit = TWO_CLASSES.replace(
        "[profiles.p]\n",
        "[profiles.p]\nreview_threshold = 0.6\ntemplates = [\"{}\"]\n",
    );
    assert_eq!(version(&profile(&explicit)), version(&a));
}

/// Every leaf of the definition's JSON, changed in turn (and the optional parts set): each
/// change gives another version.
#[test]
fn a_change_in_any_field_changes_the_version() {
    let mut base = ProfileConfig::builtin_default();
    base.states = Some(serde_json::from_value(json!({"object": "bracket"})).unwrap());
    base.tiles = Some(serde_json::from_value(json!({"scales": [0.5]})).unwrap());
    base.classes[0].threshold = Some(0.7);
    let json = serde_json::to_value(&base).unwrap();
    let mut seen = HashMap::from([(version(&base), "the base".to_string())]);
    let mut changed = 0;
    for (path, mutated) in mutations(&json) {
        let Ok(p) = serde_json::from_value::<ProfileConfig>(mutated) else {
            continue; // an enum's name changed: not a definition
        };
        if let Some(other) = seen.insert(version(&p), path.clone()) {
            panic!("{path} and {other} have the same version");
        }
        changed += 1;
    }
    assert!(changed > 30, "only {changed} fields changed");
    let mut clahe = base.clone();
    clahe.clahe = Some(Default::default());
    assert!(!seen.contains_key(&version(&clahe)));
}

/// (path, the JSON with that leaf changed) for every number, string and boolean.
fn mutations(v: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let changed = |leaf: &Value| match leaf {
        Value::Number(n) => Some(json!(n.as_f64().unwrap() + 0.125)),
        Value::String(s) => Some(json!(format!("{s} x"))),
        Value::Bool(b) => Some(json!(!b)),
        _ => None,
    };
    if let Some(c) = changed(v) {
        out.push((String::new(), c));
    }
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                for (path, c) in mutations(child) {
                    let mut whole = v.clone();
                    whole[k] = c;
                    out.push((format!(".{k}{path}"), whole));
                }
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                for (path, c) in mutations(child) {
                    let mut whole = v.clone();
                    whole[i] = c;
                    out.push((format!("[{i}]{path}"), whole));
                }
            }
        }
        _ => {}
    }
    out
}

fn manifest() -> Manifest {
    serde_json::from_value(json!({
        "format_version": 1, "name": "fake", "family": "clip", "source_checkpoint": "test",
        "embedding_dim": 8,
        "image": {"size": 4, "resize": "squash", "resize_size": 4, "interpolation": "bilinear",
                  "rescale_factor": 0.00392, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        "text": {"context_length": 4, "pad_token_id": 9, "inputs": ["input_ids"]},
        "scoring": "softmax", "logit_scale": 100.0, "logit_bias": null, "files": {}
    }))
    .unwrap()
}

/// A worker's catalog for the config file at `path`, and its reloader (fake model, word
/// tokenizer with a context of 4 tokens).
struct Running {
    live: Live,
    reloader: Reloader,
    bank: std::sync::mpsc::Receiver<HashMap<String, ProfileConfig>>,
    _model: ModelOwner,
}

fn running(path: &Path) -> Running {
    let defined = load(path, &std::fs::read_to_string(path).unwrap()).unwrap();
    let preprocess = crate::preprocess::PreprocessSettings::default();
    let (owner, model) = ModelOwner::spawn(|| Ok(FakeBackend::new(8, 4)), 2).unwrap();
    let manifest = manifest();
    let tokenizer = crate::model::tokenizer::tests::word_tokenizer();
    let builder = Builder {
        manifest: &manifest,
        tokenizer: &tokenizer,
        model: &model,
        preprocess: &preprocess,
    };
    let profiles = defined
        .profiles
        .iter()
        .map(|(n, p)| (n.clone(), builder.build(n, p).unwrap()))
        .collect();
    let live = Catalog::new(profiles, defined.router).live();
    let (tx, bank) = std::sync::mpsc::channel();
    let source = Source {
        load: Box::new(load),
        preprocess,
        routes: defined.routes,
    };
    let reloader = Reloader::new(
        path.to_path_buf(),
        source,
        manifest,
        tokenizer,
        model,
        live.clone(),
    )
    .with_bank(tx);
    Running {
        live,
        reloader,
        bank,
        _model: owner,
    }
}

fn in_service(live: &Live, name: &str) -> Arc<Profile> {
    live.load().profiles[name].clone()
}

#[test]
fn a_changed_profile_is_rebuilt_and_swapped_in_and_the_others_are_kept() {
    let other = "\n[profiles.other]\n[[profiles.other.classes]]\nname = \"x\"\nprompts = [\"x\"]\n";
    let dir = tempfile::tempdir().unwrap();
    let path = write_temp(&dir, &format!("{TWO_CLASSES}{other}"));
    let mut w = running(&path);
    // The file as the worker started with it: nothing to do.
    assert_eq!(w.reloader.check(), Checked::Unchanged);
    let (before, kept) = (in_service(&w.live, "p"), in_service(&w.live, "other"));

    let changed = TWO_CLASSES.replace("prompts = [\"a\"]", "prompts = [\"a b\"]");
    std::fs::write(&path, format!("{changed}{other}")).unwrap();
    let Checked::Applied(a) = w.reloader.check() else {
        panic!("not applied")
    };
    let after = in_service(&w.live, "p");
    assert_ne!(after.version, before.version);
    assert_eq!(
        a.changed,
        [(
            "p".to_string(),
            before.version.clone(),
            after.version.clone()
        )]
    );
    assert_eq!(after.version, version(&profile(&changed)));
    assert_eq!(after.scorer.profile.classes[0].prompts, ["a b"]);
    // The unchanged profile (and the built-in default) are the same objects, not rebuilt.
    assert!(Arc::ptr_eq(&kept, &in_service(&w.live, "other")));
    assert!(a.removed.is_empty() && !a.routes);
    // The exemplar follower is told the profiles in service.
    let told = w.bank.try_recv().unwrap();
    assert_eq!(told["p"].classes[0].prompts, ["a b"]);
    assert!(told.contains_key("other") && told.contains_key("default"));
    // Read again, the same bytes change nothing.
    assert_eq!(w.reloader.check(), Checked::Unchanged);

    // A removed profile and a new route.
    let route = "\n[[routes]]\ncamera = \"cam-*\"\nprofile = \"p\"\n";
    std::fs::write(&path, format!("{changed}{route}")).unwrap();
    let Checked::Applied(a) = w.reloader.check() else {
        panic!("not applied")
    };
    assert_eq!((a.removed, a.routes), (vec!["other".to_string()], true));
    assert!(a.changed.is_empty());
    let catalog = w.live.load();
    assert!(!catalog.profiles.contains_key("other"));
    let (routed, _) = catalog.router.resolve("cam-1", "", "", None);
    assert_eq!(routed, Some("p"));
}

#[test]
fn an_invalid_change_is_refused_naming_the_problem_and_the_old_profile_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_temp(&dir, TWO_CLASSES);
    let mut w = running(&path);
    let before = in_service(&w.live, "p");

    // A template without {}: the file does not validate.
    let bad = TWO_CLASSES.replace(
        "[profiles.p]\n",
        "[profiles.p]\ntemplates = [\"a photo\"]\n",
    );
    std::fs::write(&path, &bad).unwrap();
    let Checked::Refused { reason, message } = w.reloader.check() else {
        panic!("not refused")
    };
    assert_eq!(reason, "invalid");
    assert!(
        message.contains("\"p\"") && message.contains("\"a photo\"") && message.contains("{}"),
        "{message}"
    );
    assert!(Arc::ptr_eq(&before, &in_service(&w.live, "p")));
    assert!(w.bank.try_recv().is_err(), "nothing told to the follower");
    // The same broken file is not parsed (nor logged, nor counted) again.
    assert_eq!(w.reloader.check(), Checked::Unchanged);

    // A prompt over the tokenizer's 4 tokens: valid as config, but it cannot be built.
    let long = TWO_CLASSES.replace("prompts = [\"b\"]", "prompts = [\"a b a b a\"]");
    std::fs::write(&path, &long).unwrap();
    let Checked::Refused { reason, message } = w.reloader.check() else {
        panic!("not refused")
    };
    assert_eq!(reason, "build");
    assert!(
        message.contains("\"p\"") && message.contains("a b a b a"),
        "{message}"
    );
    assert!(Arc::ptr_eq(&before, &in_service(&w.live, "p")));

    // A route to a profile that does not exist.
    let route = format!("{TWO_CLASSES}\n[[routes]]\nline = \"l1\"\nprofile = \"nope\"\n");
    std::fs::write(&path, route).unwrap();
    assert!(matches!(
        w.reloader.check(),
        Checked::Refused { reason: "invalid", message } if message.contains("nope")
    ));

    // A file gone: refused, the catalog kept.
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(
        w.reloader.check(),
        Checked::Refused {
            reason: "unreadable",
            ..
        }
    ));
    assert!(Arc::ptr_eq(&before, &in_service(&w.live, "p")));

    // Fixed: applied.
    let fixed = TWO_CLASSES.replace("prompts = [\"b\"]", "prompts = [\"b a\"]");
    std::fs::write(&path, fixed).unwrap();
    assert!(matches!(w.reloader.check(), Checked::Applied(_)));
    assert_ne!(in_service(&w.live, "p").version, before.version);
}

#[test]
fn changes_outside_profiles_and_routes_are_named_as_taking_a_restart() {
    let old = json!({"kafka": {"brokers": "a:9092", "group_id": "g"}, "batch": {"max_size": 8},
                     "profiles": {"p": {}}, "routes": []});
    let new = json!({"kafka": {"brokers": "b:9092", "group_id": "g"}, "model": {"device": "cpu"},
                     "profiles": {"p": {"x": 1}}, "routes": [{}]});
    assert_eq!(
        restart_keys(&old, &new),
        ["batch", "kafka.brokers", "model"].map(String::from)
    );
    assert!(restart_keys(&old, &old).is_empty());

    // A file changing both: the profile is applied, the worker goes on with its batch size.
    let dir = tempfile::tempdir().unwrap();
    let path = write_temp(&dir, TWO_CLASSES);
    let mut w = running(&path);
    let both = format!(
        "[batch]\nmax_size = 3\n{}",
        TWO_CLASSES.replace("\"b\"", "\"b b\"")
    );
    std::fs::write(&path, both).unwrap();
    assert!(matches!(w.reloader.check(), Checked::Applied(_)));
    assert_eq!(w.reloader.restart_pending(), ["batch"]);
    // Put back as it was: nothing pending.
    std::fs::write(&path, TWO_CLASSES).unwrap();
    assert!(matches!(w.reloader.check(), Checked::Applied(_)));
    assert!(w.reloader.restart_pending().is_empty());
}

#[test]
fn a_bank_is_indexed_by_the_profile_classes_by_name() {
    let p = profile(TWO_CLASSES);
    let mut bank = crate::exemplars::Bank::default();
    let profiles = HashMap::from([("p".to_string(), p)]);
    for (id, class) in [("e1", "scratch"), ("e2", "good")] {
        let x = crate::proto::v1::Exemplar {
            id: id.into(),
            profile: "p".into(),
            class: class.into(),
            embedding: vec![1.0, 0.0],
            dim: 2,
            model_hash: "m".into(),
            ..Default::default()
        };
        bank.apply(
            &format!("p/{id}"),
            Some(x),
            &profiles,
            "m",
            2,
            &Default::default(),
        )
        .unwrap();
    }
    let b = bank.profile("p").unwrap();
    assert!(matches!(
        b.for_classes(&["scratch", "good"]),
        std::borrow::Cow::Borrowed(_)
    ));
    // Classes reordered, one added, "scratch" removed.
    let moved = b.for_classes(&["dent", "good"]);
    let classes: Vec<(&str, usize)> = moved
        .entries()
        .iter()
        .map(|e| (e.id.as_str(), e.class))
        .collect();
    assert_eq!(classes, [("e2", 1)]);
    let swapped = b.for_classes(&["good", "scratch"]);
    let classes: Vec<usize> = swapped.entries().iter().map(|e| e.class).collect();
    assert_eq!(classes, [1, 0]);
}

/// An in-place save seen half-way: an empty file (or one with only a comment yet) parses as a
/// valid config with only the built-in profile, and is refused (reason `emptied`); a file cut
/// after its routes or inside a table header does not load (`invalid`). The profiles and
/// routes in service stay, and the whole file, once written, is applied.
#[test]
fn a_file_truncated_mid_write_is_refused_and_the_profiles_in_service_stay() {
    let route = "\n[[routes]]\ncamera = \"cam-*\"\nprofile = \"p\"\n";
    let whole = format!("{route}{TWO_CLASSES}");
    let dir = tempfile::tempdir().unwrap();
    let path = write_temp(&dir, &whole);
    let mut w = running(&path);
    let before = in_service(&w.live, "p");
    let cut = &whole[..whole.find("[profiles.p]").unwrap() + "[profiles".len()];
    for (text, expected) in [
        ("", "emptied"),
        ("# the line's profiles\n", "emptied"),
        // The routes written, the profiles they name not yet.
        (&whole[..route.len()], "invalid"),
    ] {
        std::fs::write(&path, text).unwrap();
        let checked = w.reloader.check();
        let what = format!("{text:?}");
        assert!(
            matches!(&checked, Checked::Refused { reason, message }
                if *reason == expected && (expected != "emptied" || message.contains("no profile"))),
            "{what}: {checked:?}"
        );
        assert!(Arc::ptr_eq(&before, &in_service(&w.live, "p")), "{what}");
        let catalog = w.live.load();
        assert_eq!(catalog.router.resolve("cam-1", "", "", None).0, Some("p"));
    }
    // Cut inside a table header: not TOML at all.
    std::fs::write(&path, cut).unwrap();
    assert!(matches!(
        w.reloader.check(),
        Checked::Refused {
            reason: "invalid",
            ..
        }
    ));
    assert!(Arc::ptr_eq(&before, &in_service(&w.live, "p")));
    // The save finished, with a change: applied.
    std::fs::write(&path, whole.replace("\"b\"", "\"b b\"")).unwrap();
    assert!(matches!(w.reloader.check(), Checked::Applied(_)));
    assert_ne!(in_service(&w.live, "p").version, before.version);
}

/// The bytes hashed are the bytes parsed: a loader that is handed the text never sees the
/// file as it is a moment later. Here the file is emptied while the reloader parses what it
/// read (as an editor saving in place would): the change read is applied, and the empty file
/// seen at the next poll is refused.
#[test]
fn the_bytes_hashed_are_the_bytes_parsed() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_temp(&dir, TWO_CLASSES);
    let mut w = running(&path);
    let changed = TWO_CLASSES.replace("\"b\"", "\"b b\"");
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let source = Source {
        load: Box::new(move |path, text| {
            // The first call is the reloader's start; at the next, the save's next step lands
            // between the read and the parse.
            if calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed) > 0 {
                std::fs::write(path, "").unwrap();
            }
            load(path, text)
        }),
        preprocess: crate::preprocess::PreprocessSettings::default(),
        routes: Vec::new(),
    };
    std::fs::write(&path, &changed).unwrap();
    let catalog = w.live.clone();
    let (_owner, model) = ModelOwner::spawn(|| Ok(FakeBackend::new(8, 4)), 2).unwrap();
    let mut racing = Reloader::new(
        path.clone(),
        source,
        manifest(),
        crate::model::tokenizer::tests::word_tokenizer(),
        model,
        catalog,
    );
    assert!(matches!(racing.check(), Checked::Applied(_)));
    assert_eq!(
        in_service(&w.live, "p").version,
        version(&profile(&changed))
    );
    // The file is empty now: refused, the change applied above stays.
    assert!(matches!(
        w.reloader.check(),
        Checked::Refused {
            reason: "emptied",
            ..
        }
    ));
    assert_eq!(
        in_service(&w.live, "p").version,
        version(&profile(&changed))
    );
}

/// A file still being written when read (its bytes differ a moment later) is not parsed:
/// it is looked at again at the next poll, and applied once it stays the same.
#[test]
fn a_file_still_changing_is_looked_at_again_at_the_next_poll() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_temp(&dir, TWO_CLASSES);
    let mut w = running(&path);
    let before = in_service(&w.live, "p");
    let changed = TWO_CLASSES.replace("\"b\"", "\"b b\"");
    // The first half read, the rest written before the second read.
    std::fs::write(&path, &changed[..changed.len() / 2]).unwrap();
    let checked = w
        .reloader
        .check_settling(|| std::fs::write(&path, &changed).unwrap());
    assert_eq!(checked, Checked::Unchanged);
    assert!(Arc::ptr_eq(&before, &in_service(&w.live, "p")));
    assert!(matches!(w.reloader.check(), Checked::Applied(_)));
    assert_eq!(
        in_service(&w.live, "p").version,
        version(&profile(&changed))
    );
}
