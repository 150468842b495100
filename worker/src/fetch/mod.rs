//! The fetch stage: an image reference to its bytes.
//!
//! Guarantees: only allowed schemes and hosts are contacted, and `file://` only reads under
//! the configured roots (after resolving `..` and symlinks), so a request cannot make a
//! worker read its own secrets or probe the plant network; a body never exceeds `max_bytes`
//! in memory (checked against Content-Length and again while streaming); transient failures
//! (connection errors, timeouts, 5xx, 429) are retried with exponential backoff, permanent
//! ones (4xx, forbidden, too large) are not; every error names the URI.

mod object;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::Semaphore;

use crate::config::FetchSettings;
use crate::proto::v1::ErrorCode;
use crate::request::Image;

#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("{uri}: forbidden: {reason}")]
    Forbidden { uri: String, reason: String },
    #[error("{uri}: image larger than the {limit}-byte limit")]
    TooLarge { uri: String, limit: u64 },
    #[error("{uri}: fetch failed: {message}")]
    Failed {
        uri: String,
        message: String,
        transient: bool,
    },
}

impl FetchError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Forbidden { .. } => ErrorCode::FetchForbidden,
            Self::TooLarge { .. } => ErrorCode::TooLarge,
            Self::Failed { .. } => ErrorCode::FetchFailed,
        }
    }

    /// Every [`FetchError::kind`], for the metrics to start each at 0.
    pub const KINDS: [&'static str; 3] = ["forbidden", "too_large", "failed"];

    /// The metrics label of this error (one of [`FetchError::KINDS`]).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Forbidden { .. } => "forbidden",
            Self::TooLarge { .. } => "too_large",
            Self::Failed { .. } => "failed",
        }
    }

    fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Failed {
                transient: true,
                ..
            }
        )
    }
}

#[derive(Clone)]
pub struct Fetcher {
    http: reqwest::Client,
    settings: Arc<FetchSettings>,
    /// Canonical forms of the configured file roots (resolved once).
    roots: Arc<Vec<PathBuf>>,
    permits: Arc<Semaphore>,
    objects: Arc<object::ObjectStores>,
}

impl Fetcher {
    pub fn new(settings: FetchSettings) -> Result<Self, FetchError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
            .timeout(Duration::from_millis(settings.timeout_ms))
            .build()
            .map_err(|e| FetchError::Failed {
                uri: "(client)".into(),
                message: e.to_string(),
                transient: false,
            })?;
        // A root that does not exist yet is kept as written: it cannot match anything anyway.
        let roots = settings
            .file_roots
            .iter()
            .map(|r| r.canonicalize().unwrap_or_else(|_| r.clone()))
            .collect();
        let permits = Arc::new(Semaphore::new(settings.concurrency.max(1)));
        Ok(Self {
            http,
            objects: Arc::new(object::ObjectStores::new(&settings)),
            settings: Arc::new(settings),
            roots: Arc::new(roots),
            permits,
        })
    }

    /// The bytes of a request's image, inline or fetched.
    pub async fn fetch(&self, image: &Image) -> Result<Bytes, FetchError> {
        match image {
            Image::InlineData(data) => {
                if data.len() as u64 > self.settings.max_bytes {
                    return Err(FetchError::TooLarge {
                        uri: "(inline)".into(),
                        limit: self.settings.max_bytes,
                    });
                }
                Ok(Bytes::copy_from_slice(data))
            }
            Image::Uri(uri) => {
                let _permit = self
                    .permits
                    .acquire()
                    .await
                    .expect("the semaphore is never closed. This is a bug.");
                self.fetch_uri(uri).await
            }
        }
    }

    async fn fetch_uri(&self, uri: &str) -> Result<Bytes, FetchError> {
        let forbidden = |reason: String| FetchError::Forbidden {
            uri: uri.to_string(),
            reason,
        };
        let url =
            reqwest::Url::parse(uri).map_err(|e| forbidden(format!("not a valid URI: {e}")))?;
        let scheme = url.scheme();
        if !self.settings.allowed_schemes.iter().any(|s| s == scheme) {
            return Err(forbidden(format!(
                "scheme {scheme:?} is not in fetch.allowed_schemes"
            )));
        }
        if scheme != "file" {
            // For object stores the "host" is the bucket (or account).
            let host = url.host_str().unwrap_or_default();
            if !host_allowed(&self.settings.allowed_hosts, host) {
                return Err(forbidden(format!(
                    "host {host:?} is not in fetch.allowed_hosts"
                )));
            }
        }
        match scheme {
            "file" => self.read_file(uri, &url).await,
            s if object::SCHEMES.contains(&s) => {
                self.objects.get(uri, &url, self.settings.max_bytes).await
            }
            "http" | "https" => {
                let backoff = ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(2))
                    .with_max_times(self.settings.retries as usize)
                    .with_jitter();
                (|| self.get_once(uri, url.clone()))
                    .retry(backoff)
                    .when(FetchError::is_transient)
                    .await
            }
            other => Err(forbidden(format!(
                "scheme {other:?} is not supported by this build"
            ))),
        }
    }

    async fn get_once(&self, uri: &str, url: reqwest::Url) -> Result<Bytes, FetchError> {
        let failed = |message: String, transient: bool| FetchError::Failed {
            uri: uri.to_string(),
            message,
            transient,
        };
        let limit = self.settings.max_bytes;
        let response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| failed(describe(&e), true))?;
        let status = response.status();
        if !status.is_success() {
            let transient =
                status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
            return Err(failed(format!("HTTP {status}"), transient));
        }
        if response.content_length().is_some_and(|n| n > limit) {
            return Err(FetchError::TooLarge {
                uri: uri.to_string(),
                limit,
            });
        }
        read_limited(uri, limit, response.bytes_stream(), |e| {
            failed(describe(&e), true)
        })
        .await
    }

    async fn read_file(&self, uri: &str, url: &reqwest::Url) -> Result<Bytes, FetchError> {
        let forbidden = |reason: String| FetchError::Forbidden {
            uri: uri.to_string(),
            reason,
        };
        let path = url
            .to_file_path()
            .map_err(|_| forbidden("not a local file path".into()))?;
        // Resolve `..` and symlinks before the check: the real location must be under a root.
        let real = tokio::fs::canonicalize(&path)
            .await
            .map_err(|e| FetchError::Failed {
                uri: uri.to_string(),
                message: e.to_string(),
                transient: false,
            })?;
        if !self.roots.iter().any(|root| real.starts_with(root)) {
            return Err(forbidden("outside fetch.file_roots".into()));
        }
        let len = tokio::fs::metadata(&real)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        if len > self.settings.max_bytes {
            return Err(FetchError::TooLarge {
                uri: uri.to_string(),
                limit: self.settings.max_bytes,
            });
        }
        tokio::fs::read(&real)
            .await
            .map(Bytes::from)
            .map_err(|e| FetchError::Failed {
                uri: uri.to_string(),
                message: e.to_string(),
                transient: false,
            })
    }
}

/// Collect a body stream, refusing it as soon as it grows past `limit` bytes (a server's or
/// store's stated size is checked before; this holds when it lied or did not say).
async fn read_limited<E>(
    uri: &str,
    limit: u64,
    mut stream: impl futures_util::Stream<Item = Result<Bytes, E>> + Unpin,
    failed: impl Fn(E) -> FetchError,
) -> Result<Bytes, FetchError> {
    let mut body = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(&failed)?;
        if body.len() as u64 + chunk.len() as u64 > limit {
            return Err(FetchError::TooLarge {
                uri: uri.to_string(),
                limit,
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Exact host names, or `*.suffix` for a domain and its subdomains; an empty list allows all.
fn host_allowed(allowed: &[String], host: &str) -> bool {
    allowed.is_empty()
        || allowed.iter().any(|a| match a.strip_prefix("*.") {
            Some(suffix) => host == suffix || host.ends_with(&format!(".{suffix}")),
            None => a.eq_ignore_ascii_case(host),
        })
}

fn describe(e: &reqwest::Error) -> String {
    use std::error::Error;
    // reqwest's own message is terse ("error sending request"); the cause says what happened.
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

#[cfg(test)]
mod tests;
