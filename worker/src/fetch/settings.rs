//! The fetch stage's settings (`fetch` in the config): which URIs may be fetched, and how big
//! and how slow a fetch may be. The stage owns them; `config` only gathers them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::Deserialize;

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
