//! `s3://`, `gs://` and `az://` images through object_store.
//!
//! Guarantees: one client per bucket, built once and reused (connection pools, credentials);
//! credentials come from the usual environment variables (`AWS_*`, `GOOGLE_*`, `AZURE_*`:
//! on Kubernetes, from a secret or workload identity) and `fetch.object_store` overrides
//! them (endpoints of S3-compatible stores, regions); the object's size is checked against
//! `max_bytes` before its body is read, and again while it streams; object_store retries
//! transient errors itself (`fetch.retries` times), so an error here is final.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};

use super::FetchError;
use super::FetchSettings;

pub const SCHEMES: [&str; 3] = ["s3", "gs", "az"];

pub struct ObjectStores {
    options: BTreeMap<String, String>,
    client: ClientOptions,
    retry: RetryConfig,
    stores: Mutex<HashMap<String, Arc<dyn ObjectStore>>>,
}

impl ObjectStores {
    pub fn new(settings: &FetchSettings) -> Self {
        // Environment first, the config file's options over it.
        let mut options: BTreeMap<String, String> = std::env::vars()
            .filter(|(k, _)| {
                ["AWS_", "GOOGLE_", "AZURE_"]
                    .iter()
                    .any(|p| k.starts_with(p))
            })
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        options.extend(settings.object_store.clone());
        Self {
            options,
            client: ClientOptions::new()
                .with_connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
                .with_timeout(Duration::from_millis(settings.timeout_ms)),
            retry: RetryConfig {
                max_retries: settings.retries as usize,
                retry_timeout: Duration::from_millis(settings.timeout_ms),
                ..RetryConfig::default()
            },
            stores: Mutex::new(HashMap::new()),
        }
    }

    fn store(&self, uri: &str, url: &reqwest::Url) -> Result<Arc<dyn ObjectStore>, FetchError> {
        let bucket = format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default());
        let mut stores = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(store) = stores.get(&bucket) {
            return Ok(store.clone());
        }
        let failed = |e: object_store::Error| FetchError::Failed {
            uri: uri.to_string(),
            message: format!("object store client: {e}"),
            transient: false,
        };
        // Client options first: the configured ones (`aws_allow_http`…) go on top of them.
        // Options a builder does not know belong to another cloud: skip them.
        // The three builders have the same methods but no common trait.
        macro_rules! build {
            ($builder:ty) => {{
                let mut b = <$builder>::new()
                    .with_url(bucket.clone())
                    .with_client_options(self.client.clone());
                for (k, v) in &self.options {
                    if let Ok(key) = k.parse() {
                        b = b.with_config(key, v);
                    }
                }
                Arc::new(b.with_retry(self.retry.clone()).build().map_err(failed)?)
            }};
        }
        let store: Arc<dyn ObjectStore> = match url.scheme() {
            "s3" => build!(AmazonS3Builder),
            "gs" => build!(GoogleCloudStorageBuilder),
            "az" => build!(MicrosoftAzureBuilder),
            other => unreachable!("scheme {other} is checked by the caller. This is a bug."),
        };
        stores.insert(bucket, store.clone());
        Ok(store)
    }

    pub async fn get(
        &self,
        uri: &str,
        url: &reqwest::Url,
        limit: u64,
        room: &impl super::Room,
    ) -> Result<Bytes, FetchError> {
        let failed = |e: object_store::Error| FetchError::Failed {
            uri: uri.to_string(),
            message: e.to_string(),
            transient: false,
        };
        let store = self.store(uri, url)?;
        let key = url.path().trim_start_matches('/');
        let path = Path::from_url_path(key).map_err(|e| FetchError::Forbidden {
            uri: uri.to_string(),
            reason: format!("not a valid object key: {e}"),
        })?;
        let result = store.get(&path).await.map_err(failed)?;
        if result.meta.size > limit {
            return Err(FetchError::TooLarge {
                uri: uri.to_string(),
                limit,
            });
        }
        let stated = Some(result.meta.size);
        super::read_limited(uri, limit, stated, room, result.into_stream(), failed).await
    }
}
