//! The fetch stage: an image reference to its bytes.
//!
//! Guarantees: only allowed schemes and hosts are contacted (`fetch.allowed_hosts` empty: no
//! remote host at all); http(s) never reaches a loopback, private, link-local, CGNAT,
//! multicast or otherwise special address (IPv6 and IPv4-in-IPv6 forms included) unless
//! `fetch.allowed_networks` lists it, checked on the addresses actually connected to (a DNS
//! resolver of our own), and every redirect hop is checked as the first request (at most
//! `fetch.max_redirects`); `file://` only reads regular files under the configured roots
//! (checked on the path as written before touching the file system, and again after resolving
//! symlinks), so a request cannot make a worker read its own secrets, probe the plant network
//! or its cloud's metadata service; a body never exceeds `max_bytes` in memory (checked
//! against the stated size and again while reading) and a fetch, `file://` included, never
//! takes longer than `timeout_ms`; transient failures (connection errors, timeouts, 5xx, 429)
//! are retried with exponential backoff, permanent ones (4xx, forbidden, too large) are not;
//! every error names the URI, without its credentials or query string. A body is reserved
//! before it is held ([`Room`]): the stated size (Content-Length, the object's or file's size)
//! before any byte is read, and, when none was stated, more as it arrives (doubling, from
//! 1 MiB, never past `max_bytes`), so what bodies hold while they stream is in the worker's
//! byte budget. The time limit (`timeout_ms`, per attempt) does not count those waits: a
//! worker short of memory is not a slow server ([`within`]).

mod guard;
mod object;
pub mod settings;

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;

use crate::proto::v1::ErrorCode;
use crate::request::Image;
pub use settings::FetchSettings;

/// Room for a body in the caller's memory budget: [`Fetcher::fetch_into`] asks for the
/// whole body's size (in bytes, at most `max_bytes`) before it holds that much, and may ask
/// again for more; each call returns once the room is there.
pub trait Room: Sync {
    fn make_room(&self, body_bytes: u64) -> impl std::future::Future<Output = ()> + Send;
}

/// No budget to keep (the CLI, the feedback loop: one image at a time).
pub struct Unbudgeted;

impl Room for Unbudgeted {
    async fn make_room(&self, _: u64) {}
}

/// The first room asked for a body of unknown size.
const FIRST_ROOM: u64 = 1 << 20;

/// A [`Room`] that keeps the time spent waiting in it, for [`within`].
struct Paused<'r, R> {
    room: &'r R,
    /// Waits finished, and the one going on.
    waited: std::sync::Mutex<(Duration, Option<std::time::Instant>)>,
}

impl<'r, R: Room> Paused<'r, R> {
    fn new(room: &'r R) -> Self {
        Self {
            room,
            waited: Default::default(),
        }
    }

    /// Time spent waiting for room up to `now`.
    fn waited(&self, now: std::time::Instant) -> Duration {
        let w = self.waited.lock().unwrap_or_else(|e| e.into_inner());
        w.0 + w
            .1
            .map_or(Duration::ZERO, |since| now.saturating_duration_since(since))
    }
}

impl<R: Room> Room for Paused<'_, R> {
    async fn make_room(&self, body_bytes: u64) {
        let started = std::time::Instant::now();
        self.waited.lock().unwrap_or_else(|e| e.into_inner()).1 = Some(started);
        // Counted done whether the wait ends or is dropped.
        struct Done<'a>(&'a std::sync::Mutex<(Duration, Option<std::time::Instant>)>);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                let mut w = self.0.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(since) = w.1.take() {
                    w.0 += since.elapsed();
                }
            }
        }
        let _done = Done(&self.waited);
        self.room.make_room(body_bytes).await;
    }
}

/// `fut`'s output, or `None` when it took longer than `limit`, not counting its waits for
/// room in `room` (the worker's memory, not the source's slowness).
async fn within<T, R: Room>(
    limit: Duration,
    room: &Paused<'_, R>,
    fut: impl std::future::Future<Output = T>,
) -> Option<T> {
    let started = tokio::time::Instant::now();
    tokio::pin!(fut);
    loop {
        let deadline = started + limit + room.waited(std::time::Instant::now());
        tokio::select! {
            out = &mut fut => return Some(out),
            _ = tokio::time::sleep_until(deadline) => {
                // A wait for room that went on meanwhile moves the deadline.
                let now = tokio::time::Instant::now();
                if now >= started + limit + room.waited(std::time::Instant::now()) {
                    return None;
                }
            }
        }
    }
}

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

    /// Every [`FetchError::kind`]: the metrics' vocabulary of the `kind` label (they own it,
    /// and start each at 0), which a test checks the variants map onto.
    pub const KINDS: [&'static str; 3] = crate::metrics::FETCH_ERROR_KINDS;

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
    policy: Arc<guard::Policy>,
    /// Canonical forms of the configured file roots (resolved once).
    roots: Arc<Vec<PathBuf>>,
    /// The configured file roots as written (made absolute, `.` and `..` resolved).
    lexical_roots: Arc<Vec<PathBuf>>,
    permits: Arc<Semaphore>,
    objects: Arc<object::ObjectStores>,
}

impl Fetcher {
    pub fn new(settings: FetchSettings) -> Result<Self, FetchError> {
        let policy = Arc::new(guard::Policy::new(&settings));
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
            // No total timeout here: `within` bounds each attempt, less its waits for room.
            .dns_resolver(guard::GuardedResolver {
                policy: policy.clone(),
            })
            .redirect(policy.redirects(settings.max_redirects))
            // A presigned URL's query must not travel to a redirect's target.
            .referer(false)
            .build()
            .map_err(|e| FetchError::Failed {
                uri: "(client)".into(),
                message: describe(e),
                transient: false,
            })?;
        let remote: Vec<&str> = ["http", "https"]
            .iter()
            .chain(object::SCHEMES.iter())
            .copied()
            .filter(|s| policy.scheme_allowed(s))
            .collect();
        if settings.allowed_hosts.is_empty() && !remote.is_empty() {
            tracing::warn!(
                schemes = ?remote,
                "fetch.allowed_hosts is empty: no image will be fetched from a remote host \
                 (only inline images, and file:// under fetch.file_roots); list the image \
                 hosts and buckets in fetch.allowed_hosts, or \"*\" for any host"
            );
        }
        // A root that does not exist yet is kept as written: it cannot match anything anyway.
        let roots = settings
            .file_roots
            .iter()
            .map(|r| r.canonicalize().unwrap_or_else(|_| r.clone()))
            .collect();
        let lexical_roots = settings
            .file_roots
            .iter()
            .map(|r| lexical(&std::path::absolute(r).unwrap_or_else(|_| r.clone())))
            .collect();
        let permits = Arc::new(Semaphore::new(settings.concurrency.max(1)));
        Ok(Self {
            http,
            policy,
            objects: Arc::new(object::ObjectStores::new(&settings)),
            settings: Arc::new(settings),
            roots: Arc::new(roots),
            lexical_roots: Arc::new(lexical_roots),
            permits,
        })
    }

    /// The bytes of a request's image, inline or fetched.
    pub async fn fetch(&self, image: &Image) -> Result<Bytes, FetchError> {
        self.fetch_into(image, &Unbudgeted).await
    }

    /// [`Self::fetch`], asking `room` for a fetched body's size before holding it (an inline
    /// image is already held: its request's payload).
    pub async fn fetch_into(&self, image: &Image, room: &impl Room) -> Result<Bytes, FetchError> {
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
                self.fetch_uri(uri, room).await
            }
        }
    }

    async fn fetch_uri(&self, uri: &str, room: &impl Room) -> Result<Bytes, FetchError> {
        // Errors name the URI without its credentials or query string.
        let shown = guard::redact(uri);
        let forbidden = |reason: String| FetchError::Forbidden {
            uri: shown.clone(),
            reason,
        };
        let url =
            reqwest::Url::parse(uri).map_err(|e| forbidden(format!("not a valid URI: {e}")))?;
        let scheme = url.scheme();
        if !self.policy.scheme_allowed(scheme) {
            return Err(forbidden(format!(
                "scheme {scheme:?} is not in fetch.allowed_schemes"
            )));
        }
        match scheme {
            "file" => self.read_file(&shown, &url, room).await,
            s if object::SCHEMES.contains(&s) => {
                // For object stores the "host" is the bucket (or account); the store's own
                // endpoint is configuration, not the request's to choose.
                let bucket = url.host_str().unwrap_or_default();
                if let Some(reason) = self.policy.host_refusal(bucket) {
                    return Err(forbidden(reason));
                }
                self.objects
                    .get(&shown, &url, self.settings.max_bytes, room)
                    .await
            }
            "http" | "https" => {
                if let Some(reason) = self.policy.http_refusal(&url) {
                    return Err(forbidden(reason));
                }
                let backoff = ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(2))
                    .with_max_times(self.settings.retries as usize)
                    .with_jitter();
                let timeout = Duration::from_millis(self.settings.timeout_ms);
                let attempt = || async {
                    let room = Paused::new(room);
                    within(timeout, &room, self.get_once(&shown, url.clone(), &room))
                        .await
                        .unwrap_or_else(|| {
                            Err(FetchError::Failed {
                                uri: shown.clone(),
                                message: format!(
                                    "no whole answer within {} ms (fetch.timeout_ms)",
                                    self.settings.timeout_ms
                                ),
                                transient: true,
                            })
                        })
                };
                attempt.retry(backoff).when(FetchError::is_transient).await
            }
            other => Err(forbidden(format!(
                "scheme {other:?} is not supported by this build"
            ))),
        }
    }

    /// One GET; `uri` is the redacted form, for errors.
    async fn get_once(
        &self,
        uri: &str,
        url: reqwest::Url,
        room: &impl Room,
    ) -> Result<Bytes, FetchError> {
        let failed = |message: String, transient: bool| FetchError::Failed {
            uri: uri.to_string(),
            message,
            transient,
        };
        // A refusal of the resolver or the redirect policy is final: forbidden, not failed.
        let send_error = |e: reqwest::Error| match guard::Refused::find(&e) {
            Some(refused) => FetchError::Forbidden {
                uri: uri.to_string(),
                reason: refused.0.clone(),
            },
            None => failed(describe(e), true),
        };
        let limit = self.settings.max_bytes;
        let response = self.http.get(url).send().await.map_err(send_error)?;
        let status = response.status();
        if !status.is_success() {
            let transient =
                status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
            let hint = if status.is_redirection() && self.settings.max_redirects == 0 {
                " (redirects are not followed: fetch.max_redirects is 0)"
            } else {
                ""
            };
            return Err(failed(format!("HTTP {status}{hint}"), transient));
        }
        if response.content_length().is_some_and(|n| n > limit) {
            return Err(FetchError::TooLarge {
                uri: uri.to_string(),
                limit,
            });
        }
        let stated = response.content_length();
        read_limited(uri, limit, stated, room, response.bytes_stream(), |e| {
            failed(describe(e), true)
        })
        .await
    }

    /// A `file://` image; `uri` is the redacted form, for errors.
    async fn read_file(
        &self,
        uri: &str,
        url: &reqwest::Url,
        room: &impl Room,
    ) -> Result<Bytes, FetchError> {
        let forbidden = |reason: String| FetchError::Forbidden {
            uri: uri.to_string(),
            reason,
        };
        // Refused before the file system is touched: neither the existence nor the kind of a
        // path outside the roots can be learnt from the answer.
        if self.roots.is_empty() {
            return Err(forbidden(
                "file:// is off: fetch.file_roots is empty".into(),
            ));
        }
        let path = url
            .to_file_path()
            .map_err(|_| forbidden("not a local file path".into()))?;
        let written = lexical(&path);
        let under = |p: &Path, roots: &[PathBuf]| roots.iter().any(|root| p.starts_with(root));
        if !under(&written, &self.lexical_roots) && !under(&written, &self.roots) {
            return Err(forbidden("outside fetch.file_roots".into()));
        }
        let timeout = Duration::from_millis(self.settings.timeout_ms);
        let room = Paused::new(room);
        within(timeout, &room, self.read_under_roots(uri, &path, &room))
            .await
            .unwrap_or_else(|| {
                Err(FetchError::Failed {
                    uri: uri.to_string(),
                    message: format!(
                        "reading took longer than {} ms (fetch.timeout_ms)",
                        self.settings.timeout_ms
                    ),
                    transient: true,
                })
            })
    }

    async fn read_under_roots(
        &self,
        uri: &str,
        path: &Path,
        room: &impl Room,
    ) -> Result<Bytes, FetchError> {
        let forbidden = |reason: String| FetchError::Forbidden {
            uri: uri.to_string(),
            reason,
        };
        let failed = |e: std::io::Error| FetchError::Failed {
            uri: uri.to_string(),
            message: e.to_string(),
            transient: false,
        };
        let limit = self.settings.max_bytes;
        // Resolve `..` and symlinks: the real location must be under a root too.
        let real = tokio::fs::canonicalize(path).await.map_err(failed)?;
        if !self.roots.iter().any(|root| real.starts_with(root)) {
            return Err(forbidden(
                "outside fetch.file_roots (through a symlink)".into(),
            ));
        }
        // Only regular files: a FIFO would block the read, a device never end.
        let meta = tokio::fs::metadata(&real).await.map_err(failed)?;
        if let Some(kind) = not_regular(&meta) {
            return Err(forbidden(format!("not a regular file: {kind}")));
        }
        if meta.len() > limit {
            return Err(FetchError::TooLarge {
                uri: uri.to_string(),
                limit,
            });
        }
        let mut options = tokio::fs::OpenOptions::new();
        options.read(true);
        // Opening does not wait for a writer even if the path became a FIFO since, and does
        // not follow a symlink put in its place.
        #[cfg(unix)]
        options.custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW);
        let file = options.open(&real).await.map_err(failed)?;
        let meta = file.metadata().await.map_err(failed)?;
        if let Some(kind) = not_regular(&meta) {
            return Err(forbidden(format!("not a regular file: {kind}")));
        }
        // The stated size is not trusted (it is 0 for /proc files and can change): at most
        // one byte over the limit is read, and the room is made for what was read (the
        // file's own size is the first guess).
        room.make_room(meta.len().min(limit)).await;
        let mut body = Vec::with_capacity(meta.len().min(limit) as usize);
        file.take(limit.saturating_add(1))
            .read_to_end(&mut body)
            .await
            .map_err(failed)?;
        if body.len() as u64 > limit {
            return Err(FetchError::TooLarge {
                uri: uri.to_string(),
                limit,
            });
        }
        if body.len() as u64 > meta.len() {
            room.make_room(body.len() as u64).await;
        }
        Ok(Bytes::from(body))
    }
}

/// What a file is when it is not a regular file.
fn not_regular(meta: &std::fs::Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    if t.is_file() {
        return None;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return Some("a FIFO");
        }
        if t.is_char_device() || t.is_block_device() {
            return Some("a device");
        }
        if t.is_socket() {
            return Some("a socket");
        }
    }
    Some(if t.is_dir() {
        "a directory"
    } else {
        "not a plain file"
    })
}

/// `path` with `.` and `..` resolved as written (no file system access).
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Collect a body stream, refusing it as soon as it grows past `limit` bytes (a server's or
/// store's stated size is checked before; this holds when it lied or did not say). Room is
/// made for the `stated` size before the first byte, and for more, doubling, whenever the
/// body would outgrow it: the bytes held never exceed the room made.
async fn read_limited<E>(
    uri: &str,
    limit: u64,
    stated: Option<u64>,
    room: &impl Room,
    mut stream: impl futures_util::Stream<Item = Result<Bytes, E>> + Unpin,
    failed: impl Fn(E) -> FetchError,
) -> Result<Bytes, FetchError> {
    let mut made = stated.unwrap_or(FIRST_ROOM).min(limit);
    room.make_room(made).await;
    let mut body = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(&failed)?;
        let needed = body.len() as u64 + chunk.len() as u64;
        if needed > limit {
            return Err(FetchError::TooLarge {
                uri: uri.to_string(),
                limit,
            });
        }
        if needed > made {
            made = needed.max(made.saturating_mul(2)).min(limit);
            room.make_room(made).await;
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

fn describe(e: reqwest::Error) -> String {
    use std::error::Error;
    // Without the URL: it can carry credentials and a presigned query (the error's own URI
    // is shown redacted).
    let e = e.without_url();
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
