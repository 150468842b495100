//! `s3://` images from a real S3-compatible server (moto's, from PyPI, as a process), through
//! object_store: the object's bytes, a missing key, an object over the size limit, a bucket
//! outside the allowlist. The bucket is filled by boto3 (an independent client).

use crate::common;

use std::process::{Child, Command, Stdio};

use clipqc::config::FetchSettings;
use clipqc::fetch::{FetchError, Fetcher};
use clipqc::proto::v1::inspection_request::Image;

struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start() -> Self {
        let port = common::e2e::free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server (tests/requirements.txt, installed by scripts/test.sh)");
        let moto = Self { child, port };
        common::e2e::wait_for_port(port, "moto_server");
        moto
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Create `bucket` and upload `files` (key, local path) with boto3.
fn upload(moto: &Moto, bucket: &str, files: &[(&str, &std::path::Path)]) {
    let mut script = format!(
        "import boto3\ns3 = boto3.client('s3', endpoint_url='{}', region_name='us-east-1', \
         aws_access_key_id='test', aws_secret_access_key='test')\ns3.create_bucket(Bucket='{bucket}')\n",
        moto.endpoint()
    );
    for (key, path) in files {
        script.push_str(&format!(
            "s3.upload_file('{}', '{bucket}', '{key}')\n",
            path.display()
        ));
    }
    let status = Command::new("python")
        .args(["-c", &script])
        .status()
        .unwrap();
    assert!(status.success(), "boto3 upload");
}

fn settings(moto: &Moto) -> FetchSettings {
    let mut s = FetchSettings::default();
    for (k, v) in [
        ("aws_endpoint", moto.endpoint()),
        ("aws_allow_http", "true".into()),
        ("aws_region", "us-east-1".into()),
        ("aws_access_key_id", "test".into()),
        ("aws_secret_access_key", "test".into()),
    ] {
        s.object_store.insert(k.into(), v);
    }
    s.retries = 1;
    // The bucket used below (the store's endpoint, moto on 127.0.0.1, is configuration: the
    // address rules of http(s) images do not apply to it).
    s.allowed_hosts = vec!["parts".into()];
    s
}

#[tokio::test]
#[ignore = "needs moto's S3 server, from PyPI (scripts/test.sh)"]
async fn s3_objects_are_fetched_with_limits_and_allowlist() {
    let moto = Moto::start();
    let images = common::fixtures().join("images");
    let jpeg = images.join("part_250.jpg");
    let png = images.join("part_640x480.png");
    upload(
        &moto,
        "parts",
        &[("line-1/part.jpg", &jpeg), ("line-1/big.png", &png)],
    );

    let fetcher = Fetcher::new(settings(&moto)).unwrap();
    let got = fetcher
        .fetch(&Image::Uri("s3://parts/line-1/part.jpg".into()))
        .await
        .unwrap();
    assert_eq!(&got[..], &std::fs::read(&jpeg).unwrap()[..]);

    let err = fetcher
        .fetch(&Image::Uri("s3://parts/line-1/missing.jpg".into()))
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Failed { .. }), "{err}");
    assert!(
        err.to_string().contains("s3://parts/line-1/missing.jpg"),
        "names the URI: {err}"
    );

    let mut small = settings(&moto);
    small.max_bytes = std::fs::metadata(&jpeg).unwrap().len() + 1;
    let fetcher = Fetcher::new(small).unwrap();
    let err = fetcher
        .fetch(&Image::Uri("s3://parts/line-1/big.png".into()))
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::TooLarge { .. }), "{err}");

    let mut fenced = settings(&moto);
    fenced.allowed_hosts = vec!["other-bucket".into()];
    let err = Fetcher::new(fenced)
        .unwrap()
        .fetch(&Image::Uri("s3://parts/line-1/part.jpg".into()))
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Forbidden { .. }), "{err}");
}
