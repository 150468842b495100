//! Against a real HTTP server on loopback (axum) and real files.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use super::*;

struct Server {
    base: String,
    flaky_calls: Arc<AtomicUsize>,
}

async fn serve() -> Server {
    let flaky_calls = Arc::new(AtomicUsize::new(0));
    let calls = flaky_calls.clone();
    let app = Router::new()
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
        .route(
            "/slow.jpg",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                vec![1u8]
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server { base, flaky_calls }
}

fn settings() -> FetchSettings {
    FetchSettings {
        max_bytes: 1024,
        timeout_ms: 500,
        retries: 3,
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

    let no_retry = Fetcher::new(FetchSettings {
        retries: 0,
        ..settings()
    })
    .unwrap();
    let err = no_retry
        .fetch(&uri(format!("{}/slow.jpg", s.base)))
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
async fn files_are_read_only_under_the_configured_roots() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("a.jpg"), b"abc").unwrap();
    std::fs::write(outside.path().join("secret"), b"key").unwrap();
    std::fs::write(root.path().join("big.jpg"), vec![0u8; 2048]).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("link.jpg"))
        .unwrap();
    let f = Fetcher::new(FetchSettings {
        file_roots: vec![root.path().into()],
        ..settings()
    })
    .unwrap();
    let file_uri = |p: PathBuf| uri(reqwest::Url::from_file_path(p).unwrap().to_string());

    assert_eq!(
        &f.fetch(&file_uri(root.path().join("a.jpg"))).await.unwrap()[..],
        b"abc"
    );
    let escapes = [
        outside.path().join("secret"),
        root.path()
            .join("..")
            .join(outside.path().file_name().unwrap())
            .join("secret"),
        root.path().join("link.jpg"),
    ];
    for p in escapes {
        let err = f.fetch(&file_uri(p.clone())).await.unwrap_err();
        assert_eq!(
            err.code(),
            ErrorCode::FetchForbidden,
            "{}: {err}",
            p.display()
        );
    }
    let err = f
        .fetch(&file_uri(root.path().join("big.jpg")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::TooLarge);
    let err = f
        .fetch(&file_uri(root.path().join("nope.jpg")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::FetchFailed);

    let no_roots = Fetcher::new(settings()).unwrap();
    let err = no_roots
        .fetch(&file_uri(root.path().join("a.jpg")))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        ErrorCode::FetchForbidden,
        "no roots: file:// refused"
    );
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
