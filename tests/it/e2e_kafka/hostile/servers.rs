//! The campaign's servers: the one image server the worker may reach (good images, hostile
//! bodies, redirects anywhere), and traps where it must never connect, which count every
//! connection they accept.

use std::collections::HashMap;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures_util::stream;

/// The allowed image server on 127.0.0.1, on a runtime of its own.
pub struct Server {
    pub base: String,
    pub port: u16,
    _runtime: tokio::runtime::Runtime,
}

type Images = Arc<HashMap<String, Vec<u8>>>;

impl Server {
    /// Serves `images` under `/img/NAME`, and the hostile routes.
    pub fn start(images: HashMap<String, Vec<u8>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new()
            .route("/img/{name}", get(image))
            .route("/redirect/{status}/{target}", get(redirect))
            .route("/loop/{n}", get(redirect_loop))
            .route("/trickle", get(trickle))
            .route("/endless", get(endless))
            .route("/stall", get(stall))
            .route("/lying", get(lying))
            .route("/huge-length", get(huge_length))
            .route("/status/{code}", get(status))
            .route("/html", get(html))
            .route("/empty", get(|| async { "" }))
            .with_state(Arc::new(images));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap()
        });
        Self {
            base: format!("http://127.0.0.1:{port}"),
            port,
            _runtime: runtime,
        }
    }
}

async fn image(State(images): State<Images>, Path(name): Path<String>) -> Response {
    match images.get(&name) {
        Some(bytes) => bytes.clone().into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// `status` with `Location: target` (hex-encoded in the path, so any bytes can travel).
async fn redirect(Path((status, target)): Path<(u16, String)>) -> Response {
    let target = hex::decode(target).unwrap();
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_bytes(&target).unwrap());
    r
}

/// A redirect chain that never ends.
async fn redirect_loop(Path(n): Path<u64>) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::FOUND;
    let next = HeaderValue::from_str(&format!("/loop/{}", n + 1)).unwrap();
    r.headers_mut().insert(header::LOCATION, next);
    r
}

/// A JPEG's first bytes, then one byte every 150 ms, forever.
async fn trickle() -> Body {
    let s = stream::unfold(0u64, |n| async move {
        if n > 0 {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        let byte = if n == 0 { 0xff } else { 0 };
        Some((Ok::<_, std::io::Error>(Bytes::from(vec![byte])), n + 1))
    });
    Body::from_stream(s)
}

/// 64 KiB chunks, forever, with no length said.
fn endless_stream() -> Body {
    let chunk = Bytes::from(vec![0u8; 64 << 10]);
    let s = stream::unfold(chunk, |chunk| async move {
        tokio::task::yield_now().await;
        Some((Ok::<_, std::io::Error>(chunk.clone()), chunk))
    });
    Body::from_stream(s)
}

async fn endless() -> Body {
    endless_stream()
}

/// Headers never come.
async fn stall() -> &'static str {
    tokio::time::sleep(Duration::from_secs(3600)).await;
    "too late"
}

/// Says 100000 bytes, sends 100 and ends.
async fn lying() -> Response {
    let s = stream::iter([Ok::<_, std::io::Error>(Bytes::from(vec![0u8; 100]))]);
    let mut r = Response::new(Body::from_stream(s));
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("100000"));
    r
}

/// Says a terabyte, and would send it.
async fn huge_length() -> Response {
    let mut r = Response::new(endless_stream());
    r.headers_mut().insert(
        header::CONTENT_LENGTH,
        HeaderValue::from_static("1000000000000"),
    );
    r
}

async fn status(Path(code): Path<u16>) -> StatusCode {
    StatusCode::from_u16(code).unwrap()
}

/// Not an image, with text an error message must not repeat.
async fn html() -> Response {
    let body = "<html><body>SECRET-BODY-MARKER: an error page with internals</body></html>";
    ([(header::CONTENT_TYPE, "text/html")], body).into_response()
}

/// Listeners on addresses the worker must never reach; every accepted connection is
/// recorded (with the first line it sent).
pub struct Trap {
    pub addrs: Vec<SocketAddr>,
    hits: Arc<Mutex<Vec<String>>>,
}

impl Trap {
    /// Listen on each of `addrs` (port 0: any free one).
    pub fn start(addrs: &[SocketAddr]) -> Self {
        let hits = Arc::new(Mutex::new(Vec::new()));
        let mut bound = Vec::new();
        for addr in addrs {
            let listener = TcpListener::bind(addr)
                .unwrap_or_else(|e| panic!("trap on {addr}: {e} (is {addr} a local address?)"));
            let at = listener.local_addr().unwrap();
            bound.push(at);
            let hits = hits.clone();
            // Left running: the test process ends with the campaign.
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(mut conn) = conn else { continue };
                    // The hit is recorded whatever comes; 500 ms only bounds the wait for
                    // a first line to name in it (a fetch sends it at once on connecting).
                    let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
                    let mut first = [0u8; 200];
                    let n = conn.read(&mut first).unwrap_or(0);
                    let line = String::from_utf8_lossy(&first[..n]);
                    let line = line.lines().next().unwrap_or("").to_string();
                    hits.lock().unwrap().push(format!("{at}: {line}"));
                }
            });
        }
        Self { addrs: bound, hits }
    }

    pub fn hits(&self) -> Vec<String> {
        self.hits.lock().unwrap().clone()
    }
}
