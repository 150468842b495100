//! Against real HTTP servers on loopback (axum), a trap listener that counts the connections
//! it is not supposed to get, and real files.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::Path as UrlPath;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::guard::{host_allowed, redact};
use super::*;

struct Server {
    base: String,
    flaky_calls: Arc<AtomicUsize>,
}

async fn serve() -> Server {
    serve_at("127.0.0.1", None).await
}

/// The test server on `ip`; with `trap`, `/to-trap` redirects to it by address and
/// `/to-trap-by-name` by the name `localhost`.
async fn serve_at(ip: &str, trap: Option<SocketAddr>) -> Server {
    let flaky_calls = Arc::new(AtomicUsize::new(0));
    let calls = flaky_calls.clone();
    let redirect = |to: String| (StatusCode::FOUND, [(header::LOCATION, to)]).into_response();
    let trap_port = trap.map_or(9, |t| t.port());
    let app = Router::new()
        .route(
            "/to-trap",
            get(move || async move { redirect(format!("http://127.0.0.1:{trap_port}/x.jpg")) }),
        )
        .route(
            "/to-trap-by-name",
            get(move || async move { redirect(format!("http://localhost:{trap_port}/x.jpg")) }),
        )
        .route(
            "/to-file",
            get(move || async move { redirect("file:///etc/hostname".into()) }),
        )
        .route(
            // `hops` redirects on this server, then an image.
            "/hop/{n}",
            get(move |UrlPath(n): UrlPath<u32>| async move {
                if n == 0 {
                    vec![9u8, 9, 9].into_response()
                } else {
                    redirect(format!("/hop/{}", n - 1))
                }
            }),
        )
        .route(
            "/part.jpg",
            get(|| async { vec![0xffu8, 0xd8, 0xff, 0xd9] }),
        )
        .route("/missing.jpg", get(|| async { StatusCode::NOT_FOUND }))
        .route("/big.jpg", get(|| async { vec![0u8; 4096] }))
        .route(
            "/flaky.jpg",
            get(move || {
                let calls = calls.clone();
                async move {
                    // Fails twice with 503, then serves: retries must get through.
                    if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                        Err(StatusCode::SERVICE_UNAVAILABLE)
                    } else {
                        Ok(vec![1u8, 2, 3])
                    }
                }
            }),
        )
        .route("/never.jpg", get(std::future::pending::<Vec<u8>>));
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server { base, flaky_calls }
}

/// A listener on 127.0.0.1 that counts the connections it accepts (and drops them).
async fn trap() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(conn);
        }
    });
    (addr, hits)
}

/// Settings for the local test servers: 127.0.0.1, which is loopback, allowed explicitly.
fn settings() -> FetchSettings {
    FetchSettings {
        max_bytes: 1024,
        // Generous: on a loaded machine a slow answer must not become a timeout, which would
        // be retried and change the counts the tests assert.
        timeout_ms: 30_000,
        retries: 3,
        allowed_hosts: vec!["127.0.0.1".into()],
        allowed_networks: vec!["127.0.0.0/8".parse().unwrap()],
        ..FetchSettings::default()
    }
}

fn uri(u: String) -> Image {
    Image::Uri(u)
}

#[tokio::test]
async fn http_fetches_retries_transient_errors_and_stops_on_permanent_ones() {
    let s = serve().await;
    let f = Fetcher::new(settings()).unwrap();
    assert_eq!(
        &f.fetch(&uri(format!("{}/part.jpg", s.base))).await.unwrap()[..],
        [0xff, 0xd8, 0xff, 0xd9]
    );

    assert_eq!(
        &f.fetch(&uri(format!("{}/flaky.jpg", s.base)))
            .await
            .unwrap()[..],
        [1, 2, 3]
    );
    assert_eq!(
        s.flaky_calls.load(Ordering::SeqCst),
        3,
        "two 503s retried, then success"
    );

    let err = f
        .fetch(&uri(format!("{}/missing.jpg", s.base)))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::Failed {
                transient: false,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("/missing.jpg: fetch failed: HTTP 404"),
        "{err}"
    );

    let err = f
        .fetch(&uri(format!("{}/big.jpg", s.base)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::TooLarge, "{err}");

    // A server that never answers: the timeout is the only way out, however short.
    let no_retry = Fetcher::new(FetchSettings {
        retries: 0,
        timeout_ms: 200,
        ..settings()
    })
    .unwrap();
    let err = no_retry
        .fetch(&uri(format!("{}/never.jpg", s.base)))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::Failed {
                transient: true,
                ..
            }
        ),
        "a timeout is transient: {err}"
    );
}

#[tokio::test]
async fn schemes_and_hosts_outside_the_allowlist_are_forbidden() {
    let s = serve().await;
    let only_plant = Fetcher::new(FetchSettings {
        allowed_hosts: vec!["*.plant.local".into()],
        ..settings()
    })
    .unwrap();
    let err = only_plant
        .fetch(&uri(format!("{}/part.jpg", s.base)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::FetchForbidden);
    assert!(
        err.to_string()
            .contains("host \"127.0.0.1\" is not in fetch.allowed_hosts"),
        "{err}"
    );
    for bad in ["ftp://127.0.0.1/x.jpg", "s3://bucket/key.jpg", "not a uri"] {
        let err = only_plant.fetch(&uri(bad.into())).await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::FetchForbidden, "{bad}: {err}");
        assert!(
            err.to_string().starts_with(bad),
            "the error names the URI: {err}"
        );
    }
    assert!(host_allowed(&["*.plant.local".into()], "cam1.plant.local"));
    assert!(host_allowed(&["*.plant.local".into()], "plant.local"));
    assert!(!host_allowed(&["*.plant.local".into()], "evilplant.local"));
}

#[tokio::test]
async fn inline_images_respect_the_size_limit() {
    let f = Fetcher::new(settings()).unwrap();
    assert_eq!(
        &f.fetch(&Image::InlineData(vec![7; 10])).await.unwrap()[..],
        [7; 10]
    );
    let err = f
        .fetch(&Image::InlineData(vec![7; 2000]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::TooLarge);
}

#[test]
fn every_error_kind_is_listed_for_the_metrics() {
    let errors = [
        FetchError::Forbidden {
            uri: "u".into(),
            reason: "r".into(),
        },
        FetchError::TooLarge {
            uri: "u".into(),
            limit: 1,
        },
        FetchError::Failed {
            uri: "u".into(),
            message: "m".into(),
            transient: false,
        },
    ];
    let kinds: Vec<&str> = errors.iter().map(FetchError::kind).collect();
    assert_eq!(kinds, FetchError::KINDS);
}

/// Item 4: a redirect is checked like the first request (host allowlist, then the address
/// rules, by literal and by name), and there are at most `fetch.max_redirects` of them.
#[tokio::test]
async fn every_redirect_hop_is_checked_and_their_number_limited() {
    let (trap_addr, trap_hits) = trap().await;
    // The redirecting server on 127.0.0.2; the trap on 127.0.0.1.
    let s = serve_at("127.0.0.2", Some(trap_addr)).await;
    let get = |f: Fetcher, path: &str| {
        let u = format!("{}{path}", s.base);
        async move { f.fetch(&uri(u)).await }
    };

    // The target's host is not in the allowlist (its address would be).
    let by_host = Fetcher::new(FetchSettings {
        allowed_hosts: vec!["127.0.0.2".into()],
        ..settings()
    })
    .unwrap();
    let err = get(by_host.clone(), "/to-trap").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::FetchForbidden, "{err}");
    assert!(
        err.to_string().contains(&format!(
            "redirect to http://127.0.0.1:{}/x.jpg: host \"127.0.0.1\" is not in fetch.allowed_hosts",
            trap_addr.port()
        )),
        "{err}"
    );

    // Any host, but only 127.0.0.2 of the loopback network: the target's address is refused,
    // as a literal and behind a name.
    let by_address = Fetcher::new(FetchSettings {
        allowed_hosts: vec!["*".into()],
        allowed_networks: vec!["127.0.0.2/32".parse().unwrap()],
        ..settings()
    })
    .unwrap();
    let err = get(by_address.clone(), "/to-trap").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::FetchForbidden, "{err}");
    assert!(
        err.to_string()
            .contains("address 127.0.0.1 is loopback: list its network in fetch.allowed_networks"),
        "{err}"
    );
    let err = get(by_address.clone(), "/to-trap-by-name")
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::FetchForbidden, "{err}");
    assert!(
        err.to_string()
            .contains("host \"localhost\" resolves only to denied addresses (")
            && err.to_string().contains("address 127.0.0.1 is loopback"),
        "{err}"
    );

    // Nor to another scheme (reqwest answers the redirect itself, unfollowed).
    let err = get(by_address.clone(), "/to-file").await.unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::Failed {
                transient: false,
                ..
            }
        ) && err.to_string().ends_with("HTTP 302 Found"),
        "{err}"
    );

    // At most fetch.max_redirects (3 by default) hops.
    assert_eq!(
        &get(by_address.clone(), "/hop/3").await.unwrap()[..],
        [9, 9, 9]
    );
    let err = get(by_address.clone(), "/hop/4").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::FetchForbidden, "{err}");
    assert!(
        err.to_string()
            .contains("more than 3 redirects (fetch.max_redirects)"),
        "{err}"
    );

    // 0: none followed.
    let no_redirects = Fetcher::new(FetchSettings {
        max_redirects: 0,
        allowed_hosts: vec!["*".into()],
        ..settings()
    })
    .unwrap();
    let err = get(no_redirects.clone(), "/to-trap").await.unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::Failed {
                transient: false,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("HTTP 302 Found (redirects are not followed: fetch.max_redirects is 0)"),
        "{err}"
    );

    assert_eq!(trap_hits.load(Ordering::SeqCst), 0, "the trap was reached");
}

/// Item 4: the default allows no remote host, says so at start-up and in the error; `*`
/// allows any host (the address rules still apply).
#[tokio::test]
async fn an_empty_host_allowlist_allows_no_remote_host() {
    let s = serve().await;
    let log = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || LogWriter(writer.clone()))
        .with_ansi(false)
        .finish();
    let default = tracing::subscriber::with_default(subscriber, || {
        Fetcher::new(FetchSettings {
            allowed_networks: vec!["127.0.0.0/8".parse().unwrap()],
            ..FetchSettings::default()
        })
        .unwrap()
    });
    let log = String::from_utf8(log.lock().unwrap().clone()).unwrap();
    assert!(
        log.contains("WARN") && log.contains("fetch.allowed_hosts is empty"),
        "{log}"
    );
    for u in [format!("{}/part.jpg", s.base), "s3://parts/a.jpg".into()] {
        let err = default.fetch(&uri(u.clone())).await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::FetchForbidden, "{u}: {err}");
        assert!(
            err.to_string()
                .contains("is not in fetch.allowed_hosts, which is empty: no remote host is allowed (list the image hosts and buckets, or \"*\" for any host)"),
            "{err}"
        );
    }
    let any = Fetcher::new(FetchSettings {
        allowed_hosts: vec!["*".into()],
        ..settings()
    })
    .unwrap();
    assert!(any
        .fetch(&uri(format!("{}/part.jpg", s.base)))
        .await
        .is_ok());
    assert!(host_allowed(&["*".into()], "cam1.plant.local"));
    assert!(!host_allowed(&[], "cam1.plant.local"));
    assert!(host_allowed(&["*.Plant.local".into()], "CAM1.plant.local"));
}

struct LogWriter(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Item 4: error messages show URIs without passwords and query strings (presigned URLs),
/// whether the fetch was forbidden, answered with an error or could not connect.
#[tokio::test]
async fn errors_do_not_show_credentials_or_query_strings() {
    assert_eq!(
        redact("https://user:secret@host:8443/a/b.jpg?X-Amz-Signature=abc#f"),
        "https://user:***@host:8443/a/b.jpg?…"
    );
    assert_eq!(
        redact("https://ghp_token@host/b.jpg"),
        "https://***@host/b.jpg"
    );
    assert_eq!(redact("http://h/p@q?x=@y"), "http://h/p@q?…");
    for same in ["s3://bucket/key.jpg", "file:///data/a.jpg", "not a uri"] {
        assert_eq!(redact(same), same);
    }

    let s = serve().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let f = Fetcher::new(FetchSettings {
        retries: 0,
        ..settings()
    })
    .unwrap();
    let with_secrets = |base: &str, path: &str| {
        let base = base.replacen("http://", "http://user:secret@", 1);
        format!("{base}{path}?X-Amz-Signature=abc123&X-Amz-Credential=AKIA")
    };
    for (u, code) in [
        (
            with_secrets(&s.base, "/missing.jpg"),
            ErrorCode::FetchFailed,
        ),
        (
            with_secrets(&format!("http://127.0.0.1:{closed}"), "/x.jpg"),
            ErrorCode::FetchFailed,
        ),
        (
            with_secrets("http://evil.example", "/x.jpg"),
            ErrorCode::FetchForbidden,
        ),
        (
            with_secrets("http://10.0.0.1", "/x.jpg"),
            ErrorCode::FetchForbidden,
        ),
    ] {
        let err = f.fetch(&uri(u.clone())).await.unwrap_err();
        let text = err.to_string();
        assert_eq!(err.code(), code, "{text}");
        assert!(text.contains("user:***@"), "{text}");
        for secret in ["secret", "abc123", "AKIA", "Signature"] {
            assert!(!text.contains(secret), "{secret} shown: {text}");
        }
    }
}

mod addresses;
mod file;
mod room;
