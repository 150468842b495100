//! Settings: a config file (TOML, YAML or JSON), then environment variables.
//!
//! Environment variables override the file: prefix `CLIPQC`, separator `__`, e.g.
//! `CLIPQC__MODEL__DEVICE=cuda:1`. Unknown keys are refused (a typo in a threshold must not
//! silently fall back to a default on a production line).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::Deserialize;

use crate::batch::BatchConfig;
use crate::model::DeviceSpec;
use crate::preprocess::DecodeLimits;
use crate::request::Encoding;
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

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSettings {
    /// Bootstrap servers, `host:port[,host:port]`. Unset: `clipqc run` starts an embedded
    /// in-process broker for trying things out.
    pub brokers: Option<String>,
    /// The consumer group the workers share the input partitions in.
    pub group_id: String,
    /// Topics the inspection requests are read from.
    pub input_topics: Vec<String>,
    /// Where verdicts are published (keyed by camera id).
    pub verdict_topic: String,
    /// Where failed requests go, unchanged, with error headers (the dead-letter topic).
    pub dlq_topic: String,
    /// The few-shot exemplar bank: a compacted topic (key `profile/id`) every worker reads
    /// from the beginning before taking requests, then follows.
    pub exemplar_topic: String,
    /// Operators' answers about parts (`clipqc.v1.Feedback`), turned into exemplars by the
    /// workers (their group `<group_id>.feedback` shares the topic's partitions).
    pub feedback_topic: String,
    /// Static group membership (`group.instance.id`): a restarted worker gets its partitions
    /// back at once. On Kubernetes, the pod name.
    pub instance_id: Option<String>,
    /// Encoding of requests without a content-type header.
    pub default_encoding: Encoding,
    /// Encoding of the verdicts published (`protobuf` or `json`).
    pub verdict_encoding: Encoding,
    /// Any other librdkafka property (security.protocol, sasl.*, ssl.*, …), passed through.
    /// From the environment: `CLIPQC__KAFKA__PROPERTIES__SASL_PASSWORD` sets `sasl.password`
    /// (the name after the prefix, lower-cased, `_` read as `.`). Properties the worker's
    /// delivery guarantees depend on are refused (see [`RESERVED_PROPERTIES`]).
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties read from files, e.g. `{ "sasl.password" =
    /// "/var/run/secrets/kafka/password" }` for a mounted Kubernetes secret: the file's
    /// content, without its trailing newline, is the value.
    pub property_files: BTreeMap<String, PathBuf>,
    /// `at_least_once` (the default): a verdict is published, then its request's offset is
    /// committed; a crash between the two repeats the request. `exactly_once`: each
    /// transaction holds a run of finished requests' verdicts and dead letters together with
    /// their input offsets, so a reader with `isolation.level=read_committed` sees each
    /// request's verdict once, crashes included. Needs a broker with transactions (Apache
    /// Kafka ≥ 2.5, Redpanda; not tansu 0.6.0) and should have `instance_id` set.
    pub delivery: Delivery,
    /// Exactly-once: how often the finished requests are committed in a transaction. Verdicts
    /// become visible to read_committed readers at that pace; shorter means more transactions.
    pub transaction_interval_ms: u64,
}

/// How verdicts and input offsets are committed: see [`KafkaSettings::delivery`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    #[default]
    AtLeastOnce,
    ExactlyOnce,
}

/// librdkafka properties the worker sets itself, and why they cannot be overridden.
pub const RESERVED_PROPERTIES: [(&str, &str); 9] = [
    ("bootstrap.servers", "set kafka.brokers"),
    ("group.id", "set kafka.group_id"),
    ("group.instance.id", "set kafka.instance_id"),
    (
        "enable.auto.offset.store",
        "offsets are stored only once their verdicts are acknowledged",
    ),
    (
        "enable.auto.commit",
        "the worker commits what it stored, and nothing before",
    ),
    (
        "enable.idempotence",
        "the verdict producer must not write duplicates or reorder on retries",
    ),
    (
        "acks",
        "the idempotent producer needs acknowledgement by all in-sync replicas",
    ),
    (
        "request.required.acks",
        "the idempotent producer needs acknowledgement by all in-sync replicas",
    ),
    (
        "transactional.id",
        "set by the worker's delivery mode, not by hand",
    ),
];

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            brokers: None,
            group_id: "clipqc".into(),
            input_topics: vec!["clipqc.requests".into()],
            verdict_topic: "clipqc.verdicts".into(),
            dlq_topic: "clipqc.dlq".into(),
            exemplar_topic: "clipqc.exemplars".into(),
            feedback_topic: "clipqc.feedback".into(),
            instance_id: None,
            default_encoding: Encoding::Protobuf,
            verdict_encoding: Encoding::Protobuf,
            properties: BTreeMap::new(),
            property_files: BTreeMap::new(),
            delivery: Delivery::AtLeastOnce,
            transaction_interval_ms: 100,
        }
    }
}

/// `CLIPQC__KAFKA__PROPERTIES__SASL_PASSWORD` → `sasl.password`: config-rs would split a
/// dotted key into sections, and shells do not allow dots in names.
const PROPERTY_ENV_PREFIX: &str = "CLIPQC__KAFKA__PROPERTIES__";

fn property_from_env(name: &str) -> Option<String> {
    let key = name.strip_prefix(PROPERTY_ENV_PREFIX)?;
    (!key.is_empty()).then(|| key.to_ascii_lowercase().replace('_', "."))
}

impl KafkaSettings {
    /// Read `property_files` into `properties`, and refuse reserved properties.
    fn resolve_properties(&mut self) -> Result<(), String> {
        for (key, path) in &self.property_files {
            let value = std::fs::read_to_string(path).map_err(|e| {
                format!(
                    "kafka.property_files.{key:?}: cannot read {}: {e}",
                    path.display()
                )
            })?;
            let value = value.strip_suffix('\n').unwrap_or(&value);
            let value = value.strip_suffix('\r').unwrap_or(value);
            self.properties.insert(key.clone(), value.to_string());
        }
        for (key, why) in RESERVED_PROPERTIES {
            if self.properties.contains_key(key) {
                return Err(format!(
                    "kafka.properties: {key:?} cannot be set here: {why}"
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct FetchSettings {
    /// URI schemes image references may use.
    pub allowed_schemes: Vec<String>,
    /// Hosts image URIs (and their redirects) may name: exact names or IP literals, `*.suffix`
    /// for a domain and its subdomains, `*` for any host; for object stores, bucket names.
    /// Empty (the default): no remote host at all, only inline images and `file://`.
    pub allowed_hosts: Vec<String>,
    /// Networks (CIDR such as `10.20.0.0/16`, or single addresses) that http(s) image hosts
    /// may be at although they are loopback, private, link-local, CGNAT, multicast,
    /// unspecified or reserved (all refused otherwise, IPv6 forms included). Checked on the
    /// addresses actually connected to, after DNS.
    #[serde(deserialize_with = "networks")]
    #[schemars(with = "Vec<String>")]
    pub allowed_networks: Vec<ipnet::IpNet>,
    /// Redirects followed per fetch, each one checked as the first request; 0: none.
    pub max_redirects: u32,
    /// Directories `file://` URIs may read from; none: `file://` is refused.
    pub file_roots: Vec<PathBuf>,
    /// The largest image, in bytes (http(s), object stores, files and inline).
    pub max_bytes: u64,
    /// Connecting to an image host, per attempt.
    pub connect_timeout_ms: u64,
    /// The whole fetch of one image, `file://` reads included.
    pub timeout_ms: u64,
    /// Retries of transient failures (timeouts, connection errors, 5xx, 429).
    pub retries: u32,
    /// Concurrent fetches per worker.
    pub concurrency: usize,
    /// Options of the `s3://`, `gs://` and `az://` clients, over the `AWS_*`, `GOOGLE_*` and
    /// `AZURE_*` environment: object_store's keys, e.g. `aws_endpoint`, `aws_region`,
    /// `aws_allow_http` (S3-compatible stores such as MinIO or Ceph).
    pub object_store: BTreeMap<String, String>,
}

impl Default for FetchSettings {
    fn default() -> Self {
        Self {
            allowed_schemes: ["http", "https", "file", "s3", "gs", "az"]
                .map(String::from)
                .to_vec(),
            allowed_hosts: Vec::new(),
            allowed_networks: Vec::new(),
            max_redirects: 3,
            file_roots: Vec::new(),
            max_bytes: 32 << 20,
            connect_timeout_ms: 2_000,
            timeout_ms: 10_000,
            retries: 3,
            concurrency: 64,
            object_store: BTreeMap::new(),
        }
    }
}

/// `fetch.allowed_networks`: CIDRs, or single addresses (a /32 or /128).
fn networks<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ipnet::IpNet>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| {
            let s = s.trim();
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "fetch.allowed_networks: {s:?} is not a network (CIDR such as \
                         10.20.0.0/16) or an IP address"
                    ))
                })
        })
        .collect()
}

/// Alerting hooks: webhooks told of DEFECT verdicts and of lines' defect rates.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct NotifySettings {
    /// Webhooks told of DEFECT verdicts and of lines' defect rates (Alertmanager or plain
    /// JSON).
    pub webhooks: Vec<crate::notify::WebhookConfig>,
}

/// The operations endpoint (`/metrics`, `/healthz`, `/readyz`).
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Address to listen on; port 0 picks a free one (logged).
    #[schemars(with = "String")]
    pub listen: std::net::SocketAddr,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: ([0, 0, 0, 0], 9400).into(),
        }
    }
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

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    /// The exported artifact directory (deploy/model/export.py).
    pub dir: Option<PathBuf>,
    /// The Segment Anything artifact directory (deploy/model/export.py --sam), for profiles
    /// with `segment = true`; it runs on `device` too. Unset: no profile may segment.
    #[serde(default)]
    pub sam_dir: Option<PathBuf>,
    /// Frames that may wait for the segmentation thread. When that many wait, a DEFECT or
    /// REVIEW verdict goes out at once without masks (`segmentation = "SEGMENT_QUEUE_FULL"`,
    /// counted in `clipqc_segment_skipped_total`), so segmentation never slows classification.
    #[serde(default = "default_sam_queue")]
    pub sam_queue: usize,
    #[serde(default)]
    pub device: DeviceSpec,
}

fn default_sam_queue() -> usize {
    4
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            dir: None,
            sam_dir: None,
            sam_queue: default_sam_queue(),
            device: DeviceSpec::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PreprocessSettings {
    #[serde(default)]
    pub limits: DecodeLimits,
    /// Decode JPEGs scaled down (1/2, 1/4, 1/8) in libjpeg's DCT domain while the shorter
    /// side stays at least this many times the model's input size, e.g. 2.0: a 1920×1080
    /// frame is decoded at 960×540 for a 224 model, in about half the time. Unset (default):
    /// full-size decoding, pixel-for-pixel the checkpoint's own processor. The scaled path
    /// filters differently, so probabilities move slightly; check on your parts first.
    #[serde(default)]
    pub jpeg_dct_headroom: Option<f32>,
    /// Where JPEGs are decoded and windowed: `auto` (on the GPU when the model runs on one,
    /// else the CPU path: the same verdicts as `cpu` on a machine without a GPU; also the CPU
    /// path, with a warning, when torchvision's operators cannot be loaded), `cpu`, or
    /// `cuda` (nvJPEG through torchvision's operators; refused at start without a GPU, and
    /// for a profile with CLAHE). Images the device path cannot take (PNG, TIFF, BMP, CMYK
    /// JPEGs, frames over `device_memory_bytes`) take the CPU path, counted in
    /// `clipqc_device_preprocess_fallbacks_total`.
    #[serde(default)]
    pub device: crate::preprocess::device::PreprocessDevice,
    /// Device memory the frames being preprocessed on the device may hold at once, in bytes
    /// (each reserves its decoded frame, working copies and views first; one needing more
    /// than this takes the CPU path). Unset: 2 GiB.
    #[serde(default)]
    pub device_memory_bytes: Option<u64>,
    /// torchvision's operator library (`.../site-packages/torchvision/image.so`, torchvision
    /// 0.26.0 for torch 2.11) for the device path. Unset: the one beside the libtorch the
    /// worker runs on.
    #[serde(default)]
    pub device_ops_library: Option<PathBuf>,
    /// The `libpythonX.Y.so` torchvision's library needs loaded first (it links
    /// libtorch_python; no interpreter is started). Unset: found from the library's path
    /// (the virtual environment's base Python, then the system's).
    #[serde(default)]
    pub device_python_library: Option<PathBuf>,
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
        let mut settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| invalid(e.to_string()))?;
        // The environment wins over the file, as for every other key.
        settings.kafka.properties.extend(properties);
        settings.kafka.resolve_properties().map_err(invalid)?;
        for (name, profile) in &settings.profiles {
            profile.validate(name).map_err(|e| invalid(e.to_string()))?;
            if profile.segment && settings.model.sam_dir.is_none() {
                return Err(invalid(format!(
                    "profile {name:?} has segment = true, but model.sam_dir is not set (the \
                     Segment Anything artifact: deploy/model/export.py --sam)"
                )));
            }
            if let Some(t) = &profile.tiles {
                t.resolve_aspect_ratio(&settings.preprocess.limits)
                    .map_err(|e| invalid(format!("profile {name:?}: {e}")))?;
            }
        }
        settings.router().map_err(invalid)?;
        Ok(settings)
    }

    /// The compiled `routes` table, checked against the profiles.
    pub fn router(&self) -> Result<crate::routing::Router, String> {
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

#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;
