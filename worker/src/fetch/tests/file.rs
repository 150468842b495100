//! file:// reads: only under the roots, only regular files, within the size and time limits.

use super::*;

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

fn file_uri(p: &std::path::Path) -> Image {
    uri(reqwest::Url::from_file_path(p).unwrap().to_string())
}

/// Item 5: without roots, or outside them, the answer is FORBIDDEN whether the path exists
/// or not: the file system is not asked.
#[tokio::test]
async fn paths_outside_the_roots_are_refused_before_the_file_system_is_touched() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"key").unwrap();
    let f = Fetcher::new(FetchSettings {
        file_roots: vec![root.path().into()],
        ..settings()
    })
    .unwrap();
    for p in [
        outside.path().join("secret"),
        outside.path().join("nope"),
        outside.path().join("nope").join("deeper"),
    ] {
        let err = f.fetch(&file_uri(&p)).await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::FetchForbidden, "{err}");
        assert!(
            err.to_string().ends_with("outside fetch.file_roots"),
            "{err}"
        );
    }
    let no_roots = Fetcher::new(settings()).unwrap();
    for p in [outside.path().join("secret"), outside.path().join("nope")] {
        let err = no_roots.fetch(&file_uri(&p)).await.unwrap_err();
        assert!(
            err.to_string()
                .ends_with("file:// is off: fetch.file_roots is empty"),
            "{err}"
        );
    }
}

/// Item 5: only regular files are read: a FIFO (whose open or read would wait for a writer
/// forever), a directory, a device are refused at once.
#[cfg(unix)]
#[tokio::test]
async fn fifos_directories_and_devices_are_refused_without_hanging() {
    let root = tempfile::tempdir().unwrap();
    let fifo = root.path().join("pipe.jpg");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo");
    std::fs::create_dir(root.path().join("dir.jpg")).unwrap();
    let f = Fetcher::new(FetchSettings {
        file_roots: vec![root.path().into(), "/dev".into()],
        timeout_ms: 60_000,
        ..settings()
    })
    .unwrap();
    for (p, kind) in [
        (fifo, "a FIFO"),
        (root.path().join("dir.jpg"), "a directory"),
        ("/dev/zero".into(), "a device"),
    ] {
        let err = tokio::time::timeout(Duration::from_secs(5), f.fetch(&file_uri(&p)))
            .await
            .unwrap_or_else(|_| panic!("{} hangs", p.display()))
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::FetchForbidden, "{err}");
        assert!(
            err.to_string()
                .ends_with(&format!("not a regular file: {kind}")),
            "{err}"
        );
    }
}

/// Item 5: the size limit holds for what is read, not for what the metadata says (0 for
/// /proc files).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn file_reads_are_limited_by_what_is_read_not_by_the_stated_size() {
    let status = std::path::Path::new("/proc/self/status");
    assert_eq!(std::fs::metadata(status).unwrap().len(), 0, "a 0-size file");
    let f = Fetcher::new(FetchSettings {
        file_roots: vec!["/proc/self".into()],
        max_bytes: 64,
        ..settings()
    })
    .unwrap();
    let err = f.fetch(&file_uri(status)).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::TooLarge, "{err}");
    let roomy = Fetcher::new(FetchSettings {
        file_roots: vec!["/proc/self".into()],
        max_bytes: 1 << 20,
        ..settings()
    })
    .unwrap();
    let got = roomy.fetch(&file_uri(status)).await.unwrap();
    assert!(got.len() > 64 && got.starts_with(b"Name:"), "{got:?}");
}
