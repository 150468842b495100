//! Settings: a config file (TOML, YAML or JSON), then environment variables.
//!
//! Environment variables override the file: prefix `CLIPQC`, separator `__`, e.g.
//! `CLIPQC__MODEL__DEVICE=cuda:1`. Unknown keys are refused (a typo in a threshold must not
//! silently fall back to a default on a production line).
//!
//! Each section's settings struct lives with the stage that reads them (`fetch`, `kafka`,
//! `preprocess`, `model`, `http`, `notify`, `score`, `exemplars`, `batch`, `routing`): a stage
//! never imports this module, so the stages stay below it. This module only gathers the
//! sections into [`Settings`] and validates what spans several of them (profiles against the
//! SAM artifact and the decoding limits, routes against the profiles). Only `cli` and
//! `pipeline`, which wire the stages, read [`Settings`]; `pipeline`'s own section
//! ([`PipelineSettings`]) stays here, as that module sits above this one.

use std::collections::BTreeMap;
use std::path::Path;

use schemars::JsonSchema;
use serde::Deserialize;

use crate::batch::BatchConfig;
use crate::kafka::property_from_env;
use crate::score::ProfileConfig;

// Each stage owns its settings; these re-exports keep `config::KafkaSettings` and the like
// working for the callers that gather settings (cli, pipeline, tests).
pub use crate::fetch::FetchSettings;
pub use crate::http::HttpSettings;
pub use crate::kafka::{Delivery, KafkaSettings, RESERVED_PROPERTIES};
pub use crate::model::ModelSettings;
pub use crate::notify::NotifySettings;
pub use crate::preprocess::PreprocessSettings;

pub const DEFAULT_PROFILE: &str = "default";

/// Why the settings do not load: each names the file (or `(environment)`) in `source_name`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {source_name}: file not found")]
    FileNotFound { source_name: String },
    #[error("config {source_name}: cannot read it: {source}")]
    Read {
        source_name: String,
        source: std::io::Error,
    },
    #[error(
        "config {source_name}: not a config file format this worker reads (name it .toml, \
         .yaml, .yml or .json)"
    )]
    Format { source_name: String },
    /// Not TOML, YAML or JSON, an unknown key, a value of the wrong type.
    #[error("config {source_name}: {source}")]
    Parse {
        source_name: String,
        source: config::ConfigError,
    },
    /// `kafka.properties` or `kafka.property_files`.
    #[error("config {source_name}: {source}")]
    KafkaProperties {
        source_name: String,
        source: crate::kafka::PropertyError,
    },
    /// A profile's own definition (boxed: the score stage's error is large).
    #[error("config {source_name}: {source}")]
    Profile {
        source_name: String,
        source: Box<crate::score::ScoreError>,
    },
    #[error(
        "config {source_name}: profile {profile:?} has segment = true, but model.sam_dir is not \
         set (the Segment Anything artifact: deploy/model/export.py --sam)"
    )]
    SegmentWithoutSam {
        source_name: String,
        profile: String,
    },
    /// A profile's windows against the decoding limits.
    #[error("config {source_name}: profile {profile:?}: {source}")]
    ProfileTiles {
        source_name: String,
        profile: String,
        source: crate::preprocess::TileError,
    },
    /// The `routes` table, against the profiles.
    #[error("config {source_name}: {source}")]
    Route {
        source_name: String,
        source: crate::routing::RouteError,
    },
}

/// Keys whose environment values are comma-separated lists.
const LIST_KEYS: [&str; 5] = [
    "kafka.input_topics",
    "fetch.allowed_schemes",
    "fetch.allowed_hosts",
    "fetch.allowed_networks",
    "fetch.file_roots",
];

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub kafka: KafkaSettings,
    #[serde(default)]
    pub fetch: FetchSettings,
    #[serde(default)]
    pub batch: BatchConfig,
    #[serde(default)]
    pub pipeline: PipelineSettings,
    #[serde(default)]
    pub http: HttpSettings,
    #[serde(default)]
    pub notify: NotifySettings,
    #[serde(default)]
    pub model: ModelSettings,
    #[serde(default)]
    pub preprocess: PreprocessSettings,
    /// Defect taxonomies by name. `default` is built in unless the file defines it.
    #[serde(default)]
    pub profiles: BTreeMap<String, ProfileConfig>,
    /// Which profile (and region of interest) a request that names none gets, by its
    /// `camera_id` and `line_id` (globs); the first matching route wins.
    #[serde(default)]
    pub routes: Vec<crate::routing::RouteConfig>,
    /// The few-shot exemplar bank's bound.
    #[serde(default)]
    pub exemplars: crate::exemplars::ExemplarSettings,
}

/// How much work a worker holds at once, and how long it may take to finish it.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineSettings {
    /// Records being worked on at once. When all are taken, the consumer pauses its
    /// partitions (it keeps polling, so the group keeps it) until half are free again.
    pub max_in_flight: usize,
    /// Bytes held by records in flight (payloads, fetched images, pixel tensors). A record
    /// larger than the whole budget still passes, alone.
    pub max_in_flight_bytes: u64,
    /// On shutdown or partition revocation: how long in-flight records may take to finish.
    pub drain_timeout_ms: u64,
    /// Consecutive failed model batches after which the model counts as broken: the worker
    /// drains and exits non-zero instead of turning every record into an error verdict.
    pub max_model_failures: u32,
    /// `/healthz` answers 503 when records are in flight and none has finished for this
    /// long (a model call that never returns): the orchestrator restarts the worker. 0: off.
    pub stall_timeout_ms: u64,
    /// `clipqc run --config FILE`: how often the file is read for changed profiles and routes,
    /// which are applied without a restart (other keys take one). 0: not watched.
    pub config_reload_ms: u64,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        Self {
            max_in_flight: 256,
            max_in_flight_bytes: 512 << 20,
            drain_timeout_ms: 20_000,
            max_model_failures: 3,
            stall_timeout_ms: 300_000,
            config_reload_ms: 2_000,
        }
    }
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
        let text = match file {
            None => None,
            Some(path) if !path.exists() => {
                return Err(ConfigError::FileNotFound {
                    source_name: path.display().to_string(),
                })
            }
            Some(path) => Some((
                path,
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    source_name: path.display().to_string(),
                    source,
                })?,
            )),
        };
        Self::load_text_with_env(text.as_ref().map(|(p, t)| (*p, t.as_str())), env)
    }

    /// As [`Self::load_with_env`], with the file's contents given: `(path, text)` is parsed
    /// as the file at `path` (its format from its extension) would be, and the file itself is
    /// not read. The reloader parses exactly the bytes it hashed this way: a file read twice
    /// during an in-place save could give two different configs.
    pub fn load_text_with_env(
        file: Option<(&Path, &str)>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let source_name = file.map_or_else(
            || "(environment)".to_string(),
            |(p, _)| p.display().to_string(),
        );
        let named = || source_name.clone();
        let mut builder = config::Config::builder();
        if let Some((path, text)) = file {
            let format = file_format(path).ok_or_else(|| ConfigError::Format {
                source_name: named(),
            })?;
            builder = builder.add_source(config::File::from_str(text, format));
        }
        let mut properties = BTreeMap::new();
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("CLIPQC__"))
            .filter_map(|(k, v)| match property_from_env(&k) {
                Some(property) => {
                    properties.insert(property, v);
                    None
                }
                None => Some((k, v)),
            })
            .collect();
        let mut environment = config::Environment::with_prefix("CLIPQC")
            .prefix_separator("__")
            .separator("__")
            .list_separator(",")
            .try_parsing(true)
            .source(Some(env));
        for key in LIST_KEYS {
            environment = environment.with_list_parse_key(key);
        }
        builder = builder.add_source(environment);
        let mut settings: Settings =
            builder
                .build()
                .and_then(|c| c.try_deserialize())
                .map_err(|source| ConfigError::Parse {
                    source_name: named(),
                    source,
                })?;
        // The environment wins over the file, as for every other key.
        settings.kafka.properties.extend(properties);
        settings
            .kafka
            .resolve_properties()
            .map_err(|source| ConfigError::KafkaProperties {
                source_name: named(),
                source,
            })?;
        for (name, profile) in &settings.profiles {
            profile
                .validate(name)
                .map_err(|source| ConfigError::Profile {
                    source_name: named(),
                    source: Box::new(source),
                })?;
            if profile.segment && settings.model.sam_dir.is_none() {
                return Err(ConfigError::SegmentWithoutSam {
                    source_name: named(),
                    profile: name.clone(),
                });
            }
            if let Some(t) = &profile.tiles {
                t.resolve_aspect_ratio(&settings.preprocess.limits)
                    .map_err(|source| ConfigError::ProfileTiles {
                        source_name: named(),
                        profile: name.clone(),
                        source,
                    })?;
            }
        }
        settings.router().map_err(|source| ConfigError::Route {
            source_name: named(),
            source,
        })?;
        Ok(settings)
    }

    /// The profiles and routes of the file at `path` as the profile reloader applies them (its
    /// [`crate::profiles::reload::Load`]): loaded and validated as at start, the environment
    /// included, with the built-in default profile.
    /// `text` is the file's contents, as the reloader read (and hashed) them.
    pub fn reloadable(
        path: &Path,
        text: &str,
    ) -> Result<crate::profiles::reload::Definitions, ConfigError> {
        let settings = Self::load_text_with_env(Some((path, text)), std::env::vars())?;
        let router = settings.router().map_err(|source| ConfigError::Route {
            source_name: path.display().to_string(),
            source,
        })?;
        let file = Self::file_values(path, text)?;
        Ok(crate::profiles::reload::Definitions {
            profiles: settings.profiles(),
            routes: settings.routes,
            router,
            file,
        })
    }

    /// The values written in the file (`text`, read from `path`), without the environment or
    /// defaults, as JSON.
    pub fn file_values(path: &Path, text: &str) -> Result<serde_json::Value, ConfigError> {
        let named = || path.display().to_string();
        let format = file_format(path).ok_or_else(|| ConfigError::Format {
            source_name: named(),
        })?;
        config::Config::builder()
            .add_source(config::File::from_str(text, format))
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|source| ConfigError::Parse {
                source_name: named(),
                source,
            })
    }

    /// The compiled `routes` table, checked against the profiles.
    pub fn router(&self) -> Result<crate::routing::Router, crate::routing::RouteError> {
        let profiles = self.profiles();
        crate::routing::Router::new(&self.routes, |p| profiles.contains_key(p))
    }

    /// The JSON Schema of the config file (checked in as `schemas/clipqc-config.schema.json`).
    pub fn json_schema() -> serde_json::Value {
        serde_json::to_value(schemars::schema_for!(Settings))
            .expect("a schema serialises. This is a bug.")
    }

    /// Every profile, the built-in `default` included unless the file overrides it.
    pub fn profiles(&self) -> BTreeMap<String, ProfileConfig> {
        let mut all = self.profiles.clone();
        all.entry(DEFAULT_PROFILE.to_string())
            .or_insert_with(ProfileConfig::builtin_default);
        all
    }
}

/// The format of a config file, from its extension (as the `config` crate tells it).
pub fn file_format(path: &Path) -> Option<config::FileFormat> {
    match path.extension()?.to_str()? {
        "toml" => Some(config::FileFormat::Toml),
        "json" => Some(config::FileFormat::Json),
        "yaml" | "yml" => Some(config::FileFormat::Yaml),
        _ => None,
    }
}

#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;
