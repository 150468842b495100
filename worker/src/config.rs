//! Settings: a config file (TOML, YAML or JSON), then environment variables.
//!
//! Environment variables override the file: prefix `CLIPQC`, separator `__`, e.g.
//! `CLIPQC__MODEL__DEVICE=cuda:1`. Unknown keys are refused (a typo in a threshold must not
//! silently fall back to a default on a production line).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::model::DeviceSpec;
use crate::preprocess::DecodeLimits;
use crate::score::ProfileConfig;

pub const DEFAULT_PROFILE: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {source_name}: {message}")]
    Invalid {
        source_name: String,
        message: String,
    },
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub model: ModelSettings,
    #[serde(default)]
    pub preprocess: PreprocessSettings,
    /// Defect taxonomies by name. `default` is built in unless the file defines it.
    #[serde(default)]
    pub profiles: BTreeMap<String, ProfileConfig>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    /// The exported artifact directory (deploy/model/export.py).
    pub dir: Option<PathBuf>,
    #[serde(default)]
    pub device: DeviceSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessSettings {
    #[serde(default)]
    pub limits: DecodeLimits,
}

impl Settings {
    /// Load `file` (if given) and the `CLIPQC__…` environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, std::env::vars())
    }

    /// As [`Self::load`], with the environment given (tests).
    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let source_name =
            file.map_or_else(|| "(environment)".to_string(), |p| p.display().to_string());
        let invalid = |message: String| ConfigError::Invalid {
            source_name: source_name.clone(),
            message,
        };
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.exists() {
                return Err(invalid("file not found".into()));
            }
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("CLIPQC__"))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("CLIPQC")
                .prefix_separator("__")
                .separator("__")
                .source(Some(env)),
        );
        let settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| invalid(e.to_string()))?;
        for (name, profile) in &settings.profiles {
            profile.validate(name).map_err(|e| invalid(e.to_string()))?;
        }
        Ok(settings)
    }

    /// Every profile, the built-in `default` included unless the file overrides it.
    pub fn profiles(&self) -> BTreeMap<String, ProfileConfig> {
        let mut all = self.profiles.clone();
        all.entry(DEFAULT_PROFILE.to_string())
            .or_insert_with(ProfileConfig::builtin_default);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let err = Settings::load_with_env(Some(&path), [])
            .unwrap_err()
            .to_string();
        assert!(err.contains("clipqc.toml") && err.contains("dri"), "{err}");
        let (_d, path) = write("[profiles.empty]\nclasses = []\n");
        let err = Settings::load_with_env(Some(&path), [])
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"empty\" has no classes"), "{err}");
        let err = Settings::load_with_env(Some(Path::new("/nonexistent.toml")), [])
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent.toml: file not found"), "{err}");
    }
}
