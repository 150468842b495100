//! Image references for the campaign: forbidden addresses in every spelling, redirects from
//! the allowed server to them, slow and never-ending bodies, FIFOs and other non-files under
//! the allowed file root, and the good requests.

use std::path::{Path, PathBuf};

use clipqc::proto::v1::inspection_request::Image;

use super::cases::{
    request, Case, Expect, Kind, Rng, DECODE, FAILED, FORBIDDEN, INVALID, TOO_LARGE,
};

/// Where the campaign's references point.
pub struct Env {
    /// The allowed image server, `http://127.0.0.1:PORT`.
    pub server: String,
    /// Authorities (`host:port`) where a trap listens: the worker must never connect there.
    pub traps: Vec<String>,
    /// The allowed `file://` root (canonical).
    pub root: PathBuf,
}

/// In a URI's password and a presigned query: must never show in verdicts or dead letters.
pub const SECRETS: &[&str] = &["hunter2", "SECRETSIG"];

impl Env {
    fn port(&self) -> &str {
        self.server.rsplit(':').next().unwrap()
    }

    /// Every spelling of a forbidden place this test can think of; those with a port point
    /// at a trap's port, so a worker that got through would be counted.
    fn forbidden(&self) -> Vec<String> {
        let p = self.port();
        let root = self.root.display();
        let mut urls: Vec<String> = self
            .traps
            .iter()
            .flat_map(|t| {
                [
                    format!("http://{t}/img/part_250.jpg"),
                    format!("https://{t}/x"),
                ]
            })
            .collect();
        urls.extend(
            [
                "http://2130706434:{P}/x",
                "http://0x7f000002:{P}/x",
                "http://0177.0.0.2:{P}/x",
                "http://127.2:{P}/x",
                "http://127.0.2:{P}/x",
                "http://[::ffff:127.0.0.2]:{P}/x",
                "http://[::ffff:7f00:3]:{P}/x",
                "http://[::127.0.0.2]:{P}/x",
                "http://[64:ff9b::7f00:2]:{P}/x",
                "http://[2002:7f00:2::]:{P}/x",
                "http://[::]:{P}/x",
                "http://0.0.0.0:{P}/x",
                "http://0:{P}/x",
                "http://localhost:{P}/x",
                "http://LOCALHOST.:{P}/x",
                "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
                "http://[fd00:ec2::254]/latest/meta-data/",
                "http://metadata.google.internal/computeMetadata/v1/",
                "http://10.0.0.1/x",
                "http://172.16.0.1/x",
                "http://192.168.1.1/x",
                "http://100.64.0.1/x",
                "http://255.255.255.255/x",
                "http://224.0.0.1/x",
                "http://[fe80::1]/x",
                "http://[ff02::1]/x",
                "http://kubernetes.default.svc/api",
                "http://example.com/x",
                "http://user:hunter2@127.0.0.2:{P}/x?X-Amz-Signature=SECRETSIG",
                "http://127.0.0.1@127.0.0.2:{P}/x",
                "http://127.0.0.1:{P}@127.0.0.2:{P}/x",
                "http://127.0.0.2:{P}#@127.0.0.1:{P}/x",
                "http:\\\\127.0.0.2:{P}\\x",
                "http:/127.0.0.2:{P}/x",
                "HTTP://127.0.0.2:{P}/x",
                "ftp://127.0.0.1:{P}/x",
                "gopher://127.0.0.1:{P}/_GET",
                "dict://127.0.0.1:{P}/x",
                "data:image/png;base64,iVBORw0KGgo=",
                "javascript:alert(1)",
                "unix:///var/run/docker.sock",
                "s3://not-an-allowed-bucket/x.jpg",
                "gs://not-an-allowed-bucket/x.jpg",
                "az://account/container/x.jpg",
                "file:///etc/passwd",
                "file:///dev/zero",
                "file:///proc/self/environ",
                "file://{ROOT}/../../../etc/passwd",
                "file://{ROOT}/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                "file://otherhost{ROOT}/good.jpg",
                "file://{ROOT}/link-out",
                "file://{ROOT}/link-dev",
                "not a uri",
                "//127.0.0.2:{P}/x",
            ]
            .iter()
            .map(|u| u.replace("{P}", p).replace("{ROOT}", &root.to_string())),
        );
        urls
    }

    fn redirect(&self, status: u16, target: &str) -> String {
        format!("{}/redirect/{status}/{}", self.server, hex::encode(target))
    }
}

fn by_uri(kind: Kind, i: usize, uri: String, e: Expect, json: bool) -> Case {
    let r = request(format!("{kind}-{i}"), Image::Uri(uri.clone()));
    let what = uri.chars().take(120).collect::<String>();
    let mut c = if json {
        Case::json(kind, what, &r, e)
    } else {
        Case::proto(kind, what, &r, e)
    };
    c.secrets = SECRETS;
    c
}

/// Each forbidden reference, as protobuf and as JSON.
pub fn forbidden(env: &Env, out: &mut Vec<Case>) {
    for (i, uri) in env.forbidden().into_iter().enumerate() {
        for json in [false, true] {
            let e = Expect::error(&[FORBIDDEN]);
            out.push(by_uri(
                Kind::ForbiddenUrl,
                i * 2 + usize::from(json),
                uri.clone(),
                e,
                json,
            ));
        }
    }
}

/// The allowed server redirecting (301, 302, 303, 307, 308; directly, through another
/// redirect, or scheme-relative) to each forbidden place; redirect loops; and redirects that
/// are fine (to the same server's images).
pub fn redirects(env: &Env, out: &mut Vec<Case>) {
    let statuses = [301, 302, 303, 307, 308];
    let mut targets: Vec<(String, Expect)> = env
        .forbidden()
        .into_iter()
        .filter(|u| u.starts_with("http") || u.starts_with("HTTP") || u.starts_with("//"))
        .map(|u| {
            // "http:/host/x" in a Location is a path on the same server (WHATWG: a special
            // scheme equal to the base's makes it relative): a 404 from the allowed server.
            let relative = u.starts_with("http:/") && !u.starts_with("http://");
            let e = if relative {
                Expect::error(&[FORBIDDEN, FAILED])
            } else {
                Expect::error(&[FORBIDDEN])
            };
            (u, e)
        })
        .collect();
    let p = env.port();
    // A redirect to another scheme is refused or left unfollowed: never read.
    let other_scheme = Expect::error(&[FORBIDDEN, FAILED]);
    targets.push(("file:///etc/passwd".into(), other_scheme));
    let root = env.root.display();
    targets.push((format!("file://{root}/good.jpg"), other_scheme));
    targets.push((format!("gopher://127.0.0.1:{p}/_x"), other_scheme));
    let trap = format!("http://{}/x", env.traps[0]);
    targets.push((
        env.redirect(302, &env.redirect(307, &trap)),
        Expect::error(&[FORBIDDEN]),
    ));
    targets.push((
        format!("{}/loop/0", env.server),
        Expect::error(&[FORBIDDEN]),
    ));
    let good = format!("{}/img/part_250.jpg", env.server);
    targets.push((good.clone(), Expect::PASS));
    targets.push((env.redirect(301, &good), Expect::PASS));
    // The allowed address, a port where nothing listens: a failed fetch, not a forbidden one.
    targets.push(("http://127.0.0.1:9/x".into(), Expect::error(&[FAILED])));
    for (i, (target, e)) in targets.into_iter().enumerate() {
        let status = statuses[i % statuses.len()];
        let uri = env.redirect(status, &target);
        let mut c = by_uri(Kind::Redirect, i, uri, e, i % 2 == 1);
        c.what = format!(
            "{status} to {}",
            target.chars().take(100).collect::<String>()
        );
        out.push(c);
        if i % 3 == 0 {
            let uri = env.redirect(statuses[(i + 1) % statuses.len()], &target);
            out.push(by_uri(Kind::Redirect, 1000 + i, uri, e, false));
        }
    }
}

/// Bodies that trickle, never end, never start, lie about their length, fail, or are not
/// images.
pub fn slow(env: &Env, out: &mut Vec<Case>) {
    let s = &env.server;
    let routes: [(&str, usize, Expect); 11] = [
        ("trickle", 10, Expect::error(&[FAILED])),
        ("stall", 8, Expect::error(&[FAILED])),
        ("endless", 6, Expect::error(&[TOO_LARGE])),
        ("huge-length", 4, Expect::error(&[TOO_LARGE])),
        ("lying", 4, Expect::error(&[FAILED])),
        ("status/500", 1, Expect::error(&[FAILED])),
        ("status/503", 1, Expect::error(&[FAILED])),
        ("status/429", 1, Expect::error(&[FAILED])),
        ("status/404", 1, Expect::error(&[FAILED])),
        ("html", 2, Expect::error(&[DECODE])),
        ("empty", 2, Expect::error(&[DECODE])),
    ];
    let mut i = 0;
    for (route, times, e) in routes {
        for _ in 0..times {
            let mut c = by_uri(Kind::SlowBody, i, format!("{s}/{route}"), e, i % 2 == 1);
            c.secrets = &["SECRET-BODY-MARKER", "hunter2", "SECRETSIG"];
            out.push(c);
            i += 1;
        }
    }
}

/// What the file root holds besides good images: FIFOs (a read would block forever),
/// symlinks to them and out of the root, a directory, a sparse file far over the limit.
pub struct Files {
    pub fifos: Vec<PathBuf>,
    pub links: Vec<PathBuf>,
    pub dirs: Vec<PathBuf>,
    pub big: PathBuf,
}

/// Fill `root` (canonical) with the good image, FIFOs, links, a directory and a big file.
pub fn make_files(root: &Path, good_jpeg: &[u8], max_bytes: u64) -> Files {
    std::fs::write(root.join("good.jpg"), good_jpeg).unwrap();
    let mut fifos = Vec::new();
    for i in 0..10 {
        let p = root.join(format!("fifo-{i}.jpg"));
        let ok = std::process::Command::new("mkfifo")
            .arg(&p)
            .status()
            .unwrap();
        assert!(ok.success(), "mkfifo {}", p.display());
        fifos.push(p);
    }
    let mut links = Vec::new();
    for (i, fifo) in fifos.iter().take(4).enumerate() {
        let p = root.join(format!("link-fifo-{i}.jpg"));
        std::os::unix::fs::symlink(fifo, &p).unwrap();
        links.push(p);
    }
    std::os::unix::fs::symlink("/etc/passwd", root.join("link-out")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", root.join("link-dev")).unwrap();
    let dir = root.join("a-directory.jpg");
    std::fs::create_dir(&dir).unwrap();
    let big = root.join("big.jpg");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(max_bytes * 4096).unwrap();
    Files {
        fifos,
        links,
        dirs: vec![dir.clone(), dir],
        big,
    }
}

pub fn fifos(files: &Files, root: &Path, out: &mut Vec<Case>) {
    let uri = |p: &Path| format!("file://{}", p.display());
    let mut i = 0;
    let mut add = |p: &Path, e: Expect| {
        out.push(by_uri(Kind::Fifo, i, uri(p), e, i % 2 == 1));
        i += 1;
    };
    for p in files.fifos.iter().chain(&files.links).chain(&files.dirs) {
        add(p, Expect::error(&[FORBIDDEN]));
    }
    add(&files.big, Expect::error(&[TOO_LARGE]));
    add(&files.big, Expect::error(&[TOO_LARGE]));
    add(&root.join("missing.jpg"), Expect::error(&[FAILED]));
    add(&root.join("missing.jpg"), Expect::error(&[FAILED, INVALID]));
}

/// `n` good requests: inline (protobuf and JSON), over HTTP in each format, from the file
/// root, through a redirect.
pub fn good(env: &Env, rng: &mut Rng, jpeg: &[u8], n: usize, out: &mut Vec<Case>) {
    let names = [
        "part_250.jpg",
        "part_640x480.png",
        "part_300x201.tiff",
        "part_small_150x100.jpg",
        "part_gray_320x240.png",
        "part_rgba_333x222.png",
        "sample.bmp",
        "sample.png",
        "sample.tiff",
    ];
    for i in 0..n {
        let (what, image) = match i % 4 {
            0 | 1 => ("inline", Image::InlineData(jpeg.to_vec())),
            2 => {
                let name = rng.pick(&names);
                ("http", Image::Uri(format!("{}/img/{name}", env.server)))
            }
            _ => (
                "file",
                Image::Uri(format!("file://{}/good.jpg", env.root.display())),
            ),
        };
        let mut r = request(format!("good-{i}"), image);
        r.camera_id = format!("cam-{}", i % 7);
        let what = format!("{what} #{i}");
        out.push(if i % 2 == 0 {
            Case::proto(Kind::Good, what, &r, Expect::PASS)
        } else {
            Case::json(Kind::Good, what, &r, Expect::PASS)
        });
    }
}
