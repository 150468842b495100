use std::path::PathBuf;

use super::*;
use crate::model::DeviceSpec;

#[test]
fn kafka_properties_come_from_the_environment_and_from_files_and_reserved_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("password");
    std::fs::write(&secret, "s3cr.t\n").unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        format!(
            "[kafka.properties]\n\"security.protocol\" = \"sasl_plaintext\"\n\"sasl.username\" = \"file\"\n\
             [kafka.property_files]\n\"sasl.password\" = {:?}\n",
            secret.display().to_string()
        ),
    )
    .unwrap();
    let s = Settings::load_with_env(
        Some(&file),
        [
            (
                "CLIPQC__KAFKA__PROPERTIES__SASL_USERNAME".into(),
                "env".into(),
            ),
            (
                "CLIPQC__KAFKA__PROPERTIES__SASL_MECHANISM".into(),
                "PLAIN".into(),
            ),
        ],
    )
    .unwrap();
    let p = &s.kafka.properties;
    assert_eq!(
        p["sasl.password"], "s3cr.t",
        "the file, without its newline"
    );
    assert_eq!(
        p["sasl.username"], "env",
        "the environment wins over the file"
    );
    assert_eq!(p["sasl.mechanism"], "PLAIN");
    assert_eq!(p["security.protocol"], "sasl_plaintext");

    let err = Settings::load_with_env(
        None,
        [(
            "CLIPQC__KAFKA__PROPERTIES__ENABLE_AUTO_OFFSET_STORE".into(),
            "true".into(),
        )],
    )
    .unwrap_err();
    assert!(
        matches!(
            &err,
            ConfigError::KafkaProperties {
                source: crate::kafka::PropertyError::Reserved {
                    key: "enable.auto.offset.store",
                    ..
                },
                ..
            }
        ),
        "{err}"
    );
    let err = err.to_string();
    assert!(
        err.contains("\"enable.auto.offset.store\" cannot be set here"),
        "{err}"
    );
    std::fs::write(
        &file,
        "[kafka.properties]\n\"enable.idempotence\" = \"false\"\n",
    )
    .unwrap();
    let err = Settings::load_with_env(Some(&file), [])
        .unwrap_err()
        .to_string();
    assert!(err.contains("enable.idempotence"), "{err}");
    std::fs::write(
        &file,
        "[kafka.property_files]\n\"ssl.key.password\" = \"/nonexistent/pw\"\n",
    )
    .unwrap();
    let err = Settings::load_with_env(Some(&file), []).unwrap_err();
    assert!(
        matches!(
            &err,
            ConfigError::KafkaProperties {
                source: crate::kafka::PropertyError::Unreadable { key, .. },
                ..
            } if key == "ssl.key.password"
        ),
        "{err}"
    );
    let err = err.to_string();
    assert!(
        err.contains("ssl.key.password") && err.contains("/nonexistent/pw"),
        "{err}"
    );
}

const FILE: &str = r#"
[model]
dir = "/models/clip"
device = "cpu"

[profiles.brackets]
templates = ["a photo of {} on a steel bracket"]
review_threshold = 0.6

[[profiles.brackets.classes]]
name = "burr"
prompts = ["a sharp burr", "a metal burr on the edge"]
defect = true
threshold = 0.4

[[profiles.brackets.classes]]
name = "ok"
prompts = ["a clean edge"]
"#;

fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clipqc.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

#[test]
fn file_then_environment() {
    let (_d, path) = write(FILE);
    let env = [
        ("CLIPQC__MODEL__DEVICE".to_string(), "cuda:1".to_string()),
        ("OTHER".into(), "x".into()),
    ];
    let s = Settings::load_with_env(Some(&path), env).unwrap();
    assert_eq!(s.model.dir.as_deref(), Some(Path::new("/models/clip")));
    assert_eq!(s.model.device, DeviceSpec::Cuda(1));
    let profiles = s.profiles();
    assert_eq!(profiles.keys().collect::<Vec<_>>(), ["brackets", "default"]);
    let b = &profiles["brackets"];
    assert_eq!(b.classes[0].threshold, Some(0.4));
    assert!(!b.classes[1].defect);
    assert_eq!(b.review_threshold, 0.6);
}

#[test]
fn streaming_keys_have_the_documented_defaults_and_env_overrides() {
    let s = Settings::load_with_env(None, []).unwrap();
    assert_eq!(s.kafka.brokers, None);
    assert_eq!(s.kafka.group_id, "clipqc");
    assert_eq!(s.kafka.input_topics, ["clipqc.requests"]);
    assert_eq!(
        (s.kafka.verdict_topic.as_str(), s.kafka.dlq_topic.as_str()),
        ("clipqc.verdicts", "clipqc.dlq")
    );
    assert_eq!((s.batch.max_size, s.batch.max_delay_ms), (32, 5));
    let env = [
        ("CLIPQC__KAFKA__BROKERS", "10.0.0.1:9092,10.0.0.2:9092"),
        (
            "CLIPQC__KAFKA__INPUT_TOPICS",
            "line1.requests,line2.requests",
        ),
        ("CLIPQC__KAFKA__INSTANCE_ID", "clipqc-0"),
        ("CLIPQC__FETCH__ALLOWED_HOSTS", "images.plant.local"),
        ("CLIPQC__FETCH__ALLOWED_NETWORKS", "10.20.0.0/16,127.0.0.1"),
        ("CLIPQC__FETCH__FILE_ROOTS", "/data/images"),
        ("CLIPQC__BATCH__MAX_SIZE", "64"),
        ("CLIPQC__BATCH__MAX_DELAY_MS", "8"),
        ("CLIPQC__MODEL__DIR", "/models/clip"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let s = Settings::load_with_env(None, env).unwrap();
    assert_eq!(
        s.kafka.brokers.as_deref(),
        Some("10.0.0.1:9092,10.0.0.2:9092")
    );
    assert_eq!(s.kafka.input_topics, ["line1.requests", "line2.requests"]);
    assert_eq!(s.kafka.instance_id.as_deref(), Some("clipqc-0"));
    assert_eq!(s.fetch.allowed_hosts, ["images.plant.local"]);
    assert_eq!(
        s.fetch.allowed_networks,
        [
            "10.20.0.0/16".parse().unwrap(),
            "127.0.0.1/32".parse().unwrap()
        ]
    );
    assert_eq!(s.fetch.file_roots, [PathBuf::from("/data/images")]);
    assert_eq!((s.batch.max_size, s.batch.max_delay_ms), (64, 8));
    assert_eq!(s.model.dir.as_deref(), Some(Path::new("/models/clip")));
}

/// The checked-in schema is the one the code defines. To refresh it after changing the
/// settings: `CLIPQC_UPDATE_SCHEMAS=1 cargo test --lib config`.
#[test]
fn checked_in_schema_is_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/clipqc-config.schema.json");
    let generated = serde_json::to_string_pretty(&Settings::json_schema()).unwrap() + "\n";
    if std::env::var_os("CLIPQC_UPDATE_SCHEMAS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == generated,
        "{} is stale: run CLIPQC_UPDATE_SCHEMAS=1 cargo test --lib config",
        path.display()
    );
}

/// `docs/configuration.md` is the reference rendered from the schema: every key, type,
/// default and description. Refreshed with the schema (`CLIPQC_UPDATE_SCHEMAS=1`).
#[test]
fn the_configuration_reference_is_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
    let schema = serde_json::to_value(Settings::json_schema()).unwrap();
    let generated = super::reference::markdown(&schema);
    if std::env::var_os("CLIPQC_UPDATE_SCHEMAS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &generated).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == generated,
        "{} is stale: run CLIPQC_UPDATE_SCHEMAS=1 cargo test --lib config",
        path.display()
    );
    // Every key has a description (a field without a doc comment would leave it empty).
    let undescribed: Vec<&str> = generated
        .lines()
        .filter(|l| l.starts_with("| `") && l.ends_with("|  |"))
        .collect();
    assert!(
        undescribed.is_empty(),
        "keys without a description: {undescribed:#?}"
    );
    // Every key of every section is there, nested ones included.
    for key in [
        "`kafka.delivery`",
        "`fetch.allowed_networks`",
        "`profiles.<name>.classes[].prompts`",
        "`routes[].camera`",
        "`notify.webhooks[].url`",
    ] {
        assert!(generated.contains(key), "{key} missing");
    }
}

/// What `clipqc run` gives the profile reloader: the file's profiles (the built-in default
/// added) and routes, validated as at start; a file that does not validate is refused with
/// the message loading it gives.
#[test]
fn the_reloader_reads_profiles_and_routes_as_the_worker_loads_them() {
    let route = "\n[[routes]]\nline = \"l1\"\nprofile = \"brackets\"\n";
    let (_d, path) = write(&format!("{FILE}{route}"));
    let text = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
    let d = Settings::reloadable(&path, &text(&path)).unwrap();
    let s = Settings::load(Some(&path)).unwrap();
    assert_eq!(
        d.profiles.keys().collect::<Vec<_>>(),
        ["brackets", "default"]
    );
    assert_eq!(d.profiles["brackets"].review_threshold, 0.6);
    assert_eq!(d.routes, s.routes);
    assert_eq!(d.router.resolve("cam", "l1", "", None).0, Some("brackets"));
    let (_d, bad) = write(&FILE.replace("a photo of {} on", "a photo on"));
    let err = Settings::reloadable(&bad, &text(&bad)).err().unwrap();
    assert!(matches!(err, ConfigError::Profile { .. }), "{err}");
    let expected = Settings::load(Some(&bad)).unwrap_err().to_string();
    assert_eq!(err.to_string(), expected);
    assert!(expected.contains("\"brackets\""), "{err}");
    // As the reloader is given it (`clipqc run`): the same error, boxed.
    let load: crate::profiles::reload::Load =
        Box::new(|path, text| Ok(Settings::reloadable(path, text)?));
    let err = load(&bad, &text(&bad)).err().unwrap();
    assert_eq!(err.to_string(), expected);
    assert!(
        matches!(
            err.downcast_ref::<ConfigError>(),
            Some(ConfigError::Profile { .. })
        ),
        "{err}"
    );
}

/// The reloader's loader parses the text it is given, in the format the path's extension
/// names, and never reads the file itself (which may have changed since it was hashed).
#[test]
fn the_reloader_parses_the_text_given_not_the_file() {
    let (_d, path) = write(FILE);
    let given = FILE.replace("review_threshold = 0.6", "review_threshold = 0.7");
    let d = Settings::reloadable(&path, &given).unwrap();
    assert_eq!(d.profiles["brackets"].review_threshold, 0.7);
    assert_eq!(d.file["profiles"]["brackets"]["review_threshold"], 0.7);
    let json = std::path::Path::new("clipqc.json");
    let d = Settings::reloadable(json, r#"{"batch": {"max_size": 3}}"#).unwrap();
    assert_eq!(d.file["batch"]["max_size"], 3);
    assert_eq!(d.profiles.keys().collect::<Vec<_>>(), ["default"]);
    let err = Settings::reloadable(std::path::Path::new("clipqc.conf"), "")
        .err()
        .unwrap();
    assert!(err.to_string().contains("clipqc.conf"), "{err}");
}

/// A route to a profile that does not exist is refused at load, naming the route.
#[test]
fn a_route_to_an_unknown_profile_is_refused() {
    let route = "\n[[routes]]\nline = \"l1\"\nprofile = \"housings\"\n";
    let (_d, path) = write(&format!("{FILE}{route}"));
    let err = Settings::load_with_env(Some(&path), []).unwrap_err();
    assert!(
        matches!(
            &err,
            ConfigError::Route {
                source: crate::routing::RouteError::UnknownProfile { index: 0, profile },
                ..
            } if profile == "housings"
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .ends_with("clipqc.toml: routes[0].profile \"housings\" is not a profile"),
        "{err}"
    );
}

#[test]
fn the_shipped_example_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/clipqc.example.toml");
    let s = Settings::load_with_env(Some(&path), []).unwrap();
    let b = &s.profiles()["brackets"];
    assert_eq!(b.classes.len(), 3);
    assert_eq!(b.clahe.as_ref().map(|c| c.grid), Some(8));
}

#[test]
fn typos_and_bad_profiles_are_refused_naming_the_file() {
    let (_d, path) = write("[model]\ndri = \"/x\"\n");
    let err = Settings::load_with_env(Some(&path), []).unwrap_err();
    assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    let err = err.to_string();
    assert!(err.contains("clipqc.toml") && err.contains("dri"), "{err}");
    let (_d, path) = write("[profiles.empty]\nclasses = []\n");
    let err = Settings::load_with_env(Some(&path), []).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Profile { source, .. }
            if matches!(&**source, crate::score::ScoreError::InvalidProfile { profile, .. } if profile == "empty")),
        "{err}"
    );
    let err = err.to_string();
    assert!(err.contains("\"empty\" has no classes"), "{err}");
    let (_d, path) = write("[fetch]\nallowed_networks = [\"10.0.0.0/33\"]\n");
    let err = Settings::load_with_env(Some(&path), [])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("fetch.allowed_networks: \"10.0.0.0/33\" is not a network"),
        "{err}"
    );
    let err = Settings::load_with_env(Some(Path::new("/nonexistent.toml")), []).unwrap_err();
    assert!(
        matches!(&err, ConfigError::FileNotFound { source_name } if source_name == "/nonexistent.toml"),
        "{err}"
    );
    assert_eq!(err.to_string(), "config /nonexistent.toml: file not found");
}

#[test]
fn a_segmenting_profile_needs_the_sam_artifact() {
    let profile = "[profiles.welds]\nsegment = true\n\
                   [[profiles.welds.classes]]\nname = \"crack\"\nprompts = [\"a crack\"]\ndefect = true\n\
                   [[profiles.welds.classes]]\nname = \"ok\"\nprompts = [\"a weld\"]\n";
    let (_d, path) = write(profile);
    let err = Settings::load_with_env(Some(&path), []).unwrap_err();
    assert!(
        matches!(&err, ConfigError::SegmentWithoutSam { profile, .. } if profile == "welds"),
        "{err}"
    );
    let err = err.to_string();
    assert!(
        err.contains("profile \"welds\" has segment = true") && err.contains("model.sam_dir"),
        "{err}"
    );
    let env = [(
        "CLIPQC__MODEL__SAM_DIR".to_string(),
        "/models/sam".to_string(),
    )];
    let s = Settings::load_with_env(Some(&path), env).unwrap();
    assert_eq!(s.model.sam_dir.as_deref(), Some(Path::new("/models/sam")));
    assert!(s.profiles()["welds"].segment);
    assert!(!s.profiles()["default"].segment, "off unless asked for");
}
