//! A fetched body is reserved before it is held: the stated size first, more as it streams.

use std::sync::Mutex;
use std::time::Duration;

use axum::body::Body;

use super::*;

const MIB: u64 = 1 << 20;

/// Records the room asked for; holds any ask over `gate_above` until `open` is notified.
#[derive(Default)]
struct Recorded {
    asked: Mutex<Vec<u64>>,
    gate_above: Option<u64>,
    waiting: tokio::sync::Notify,
    open: tokio::sync::Notify,
}

impl Room for Recorded {
    async fn make_room(&self, body_bytes: u64) {
        self.asked.lock().unwrap().push(body_bytes);
        if self.gate_above.is_some_and(|g| body_bytes > g) {
            self.waiting.notify_one();
            self.open.notified().await;
        }
    }
}

/// `/stated`: 3 MiB with its Content-Length; `/streamed`: the same in 64 KiB chunks, chunked
/// (no size stated).
async fn serve_bodies() -> String {
    let body = || vec![7u8; 3 * MIB as usize];
    let app = Router::new()
        .route("/stated", get(move || async move { body() }))
        .route(
            "/streamed",
            get(|| async {
                let chunks =
                    (0..48).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![7u8; 64 << 10])));
                Body::from_stream(futures_util::stream::iter(chunks))
            }),
        );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}

fn fetcher(roots: Vec<PathBuf>) -> Fetcher {
    Fetcher::new(FetchSettings {
        max_bytes: 8 * MIB,
        file_roots: roots,
        ..settings()
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_is_reserved_before_it_is_held_stated_or_streamed() {
    let base = serve_bodies().await;
    let f = fetcher(Vec::new());

    // Stated: the whole size, once, before the first byte.
    let room = Recorded::default();
    let body = f
        .fetch_into(&uri(format!("{base}/stated")), &room)
        .await
        .unwrap();
    assert_eq!(body.len() as u64, 3 * MIB);
    assert_eq!(*room.asked.lock().unwrap(), [3 * MIB]);

    // Streamed without a size: 1 MiB first, then doubling ahead of what arrives.
    let room = Recorded::default();
    let body = f
        .fetch_into(&uri(format!("{base}/streamed")), &room)
        .await
        .unwrap();
    assert_eq!(body.len() as u64, 3 * MIB);
    assert_eq!(*room.asked.lock().unwrap(), [MIB, 2 * MIB, 4 * MIB]);

    // A file: its size.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("part.jpg");
    std::fs::write(&path, vec![1u8; 2 * MIB as usize]).unwrap();
    let f = fetcher(vec![dir.path().canonicalize().unwrap()]);
    let room = Recorded::default();
    let file = uri(reqwest::Url::from_file_path(
        dir.path().canonicalize().unwrap().join("part.jpg"),
    )
    .unwrap()
    .to_string());
    assert_eq!(
        f.fetch_into(&file, &room).await.unwrap().len() as u64,
        2 * MIB
    );
    assert_eq!(*room.asked.lock().unwrap(), [2 * MIB]);
}

/// While the room for more is not there, the body is not read further: the fetch waits, and
/// ends once the room is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_waits_for_room_before_reading_on() {
    let base = serve_bodies().await;
    let f = Arc::new(fetcher(Vec::new()));
    let room = Arc::new(Recorded {
        gate_above: Some(MIB),
        ..Default::default()
    });
    let fetch = tokio::spawn({
        let (f, room) = (f.clone(), room.clone());
        async move { f.fetch_into(&uri(format!("{base}/streamed")), &*room).await }
    });
    // Asked for 2 MiB once the first MiB is in, and held there.
    room.waiting.notified().await;
    assert_eq!(*room.asked.lock().unwrap(), [MIB, 2 * MIB]);
    assert!(!fetch.is_finished(), "the fetch went on without its room");
    room.open.notify_one();
    // 4 MiB is over the gate too: let it through as well.
    room.waiting.notified().await;
    room.open.notify_one();
    let body = fetch.await.unwrap().unwrap();
    assert_eq!(body.len() as u64, 3 * MIB);
}

/// Waiting for room does not count against the fetch's time limit: the worker short of
/// memory is not a slow server. (A good file:// read behind a decompression bomb holding the
/// whole budget failed with a timeout, and a dropped wait panicked its record.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_for_room_does_not_count_against_the_time_limit() {
    let base = serve_bodies().await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    std::fs::write(root.join("part.jpg"), vec![1u8; 2 * MIB as usize]).unwrap();
    let f = Arc::new(
        Fetcher::new(FetchSettings {
            max_bytes: 8 * MIB,
            timeout_ms: 3_000,
            retries: 0,
            file_roots: vec![root.clone()],
            ..settings()
        })
        .unwrap(),
    );
    let file = uri(reqwest::Url::from_file_path(root.join("part.jpg"))
        .unwrap()
        .to_string());
    for (what, image) in [("http", uri(format!("{base}/streamed"))), ("file", file)] {
        let room = Arc::new(Recorded {
            gate_above: Some(MIB / 2),
            ..Default::default()
        });
        let fetch = tokio::spawn({
            let (f, room, image) = (f.clone(), room.clone(), image.clone());
            async move { f.fetch_into(&image, &*room).await }
        });
        room.waiting.notified().await;
        // Held past the 3 s limit.
        tokio::time::sleep(Duration::from_secs(4)).await;
        room.open.notify_one();
        // The http body asks again (2 MiB, then 4): let those through too.
        let more = async {
            loop {
                room.waiting.notified().await;
                room.open.notify_one();
            }
        };
        let body = tokio::select! {
            body = fetch => body.unwrap(),
            _ = more => unreachable!(),
        };
        assert!(body.is_ok(), "{what}: {:?}", body.err());
    }
}
