//! The device preprocessing path (`preprocess.device`) through the whole pipeline, on the
//! CPU with torchvision's CPU kernel: every profile's preprocessor given the path as `cuda`
//! would on a GPU. A JPEG gets the verdict the CPU path gives (same outcome, top class, and
//! probabilities within the fidelity tolerance), a PNG falls back and gets the CPU path's
//! verdict, and corrupt JPEGs get the CPU path's DECODE_FAILED verdict, message included.

use std::collections::HashMap;
use std::sync::Arc;

use clipqc::model::Artifact;
use clipqc::pipeline::Profile;
use clipqc::preprocess::device::DevicePath;
use clipqc::profiles::Catalog;
use clipqc::proto::v1::{ErrorCode, Outcome, Verdict};

use super::common;
use super::common::kafka::*;

/// The verdicts of `requests` through a pipeline, on the device path when `device` (then also
/// the most bytes its budget had reserved at once: more than 0 once a frame took the path).
async fn verdicts(
    group: &str,
    requests: &[(String, Vec<u8>)],
    device: bool,
) -> (HashMap<String, Verdict>, u64) {
    let mut path = None;
    let (_mock, settings, brokers) = cluster(group);
    let artifact = Artifact::open(common::tiny_model()).unwrap();
    let (owner, model) = tiny_clip(&artifact);
    let deps = deps(&settings, &brokers, &artifact, &model);
    if device {
        let on_cpu = Arc::new(
            DevicePath::open(&settings.preprocess, tch::Device::Cpu)
                .unwrap_or_else(|e| panic!("torchvision's operators must load: {e}")),
        );
        let catalog = deps.profiles.load();
        let profiles = catalog
            .profiles
            .iter()
            .map(|(name, p)| {
                let profile = Profile {
                    scorer: p.scorer.clone(),
                    preprocessor: p.preprocessor.clone().with_device(Some(on_cpu.clone())),
                    version: p.version.clone(),
                };
                (name.clone(), profile)
            })
            .collect();
        deps.profiles
            .store(Arc::new(Catalog::new(profiles, catalog.router.clone())));
        path = Some(on_cpu);
    }
    let worker = Running::start(deps);
    let reader = reader(&brokers, "clipqc.verdicts");
    let requests: Vec<_> = requests
        .iter()
        .map(|(id, image)| inline_request(id, image))
        .collect();
    publish_requests(&brokers, &requests, true).await;
    let mut got = HashMap::new();
    while got.len() < requests.len() {
        let v = worker.next_verdict(&reader).await;
        got.insert(v.request_id.clone(), v);
    }
    worker.stop().await.unwrap();
    drop(model);
    owner.join();
    (got, path.map_or(0, |p| p.budget().high_water()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_path_verdicts_match_the_cpu_paths() {
    let images = common::fixtures().join("images");
    let jpeg = std::fs::read(images.join("part_250.jpg")).unwrap();
    let png = std::fs::read(images.join("part_640x480.png")).unwrap();
    // A Huffman table of 0xFF counts, and a frame cut before its end-of-image marker.
    let dht = jpeg.windows(2).position(|w| w == [0xFF, 0xC4]).unwrap();
    let mut bad_table = jpeg.clone();
    bad_table[dht + 4..dht + 21].fill(0xFF);
    let cut = jpeg[..jpeg.len() / 2].to_vec();
    let requests = vec![
        ("jpeg".to_string(), jpeg),
        ("png".to_string(), png),
        ("bad-table".to_string(), bad_table),
        ("cut".to_string(), cut),
    ];
    let (cpu, _) = verdicts("clipqc-device-host", &requests, false).await;
    let (dev, reserved) = verdicts("clipqc-device-dev", &requests, true).await;
    assert!(reserved > 0, "no frame took the device path");
    for id in ["jpeg", "png"] {
        let (c, d) = (&cpu[id], &dev[id]);
        assert_ne!(d.outcome(), Outcome::Error, "{id}: {d:?}");
        assert_eq!(c.outcome(), d.outcome(), "{id}");
        let probabilities = |v: &Verdict| -> Vec<(String, f32)> {
            v.scores
                .iter()
                .map(|s| (s.label.clone(), s.probability))
                .collect()
        };
        let (pc, pd) = (probabilities(c), probabilities(d));
        assert_eq!(pc.len(), pd.len(), "{id}");
        for ((lc, vc), (ld, vd)) in pc.iter().zip(&pd) {
            assert_eq!(lc, ld, "{id}: the classes in the same order");
            // One grey level moved class probabilities by up to 2e-4 on this model.
            assert!((vc - vd).abs() <= 1e-3, "{id} {lc}: {vc} vs {vd}");
        }
    }
    for id in ["bad-table", "cut"] {
        let (c, d) = (&cpu[id], &dev[id]);
        assert_eq!(d.outcome(), Outcome::Error, "{id}: {d:?}");
        let (ec, ed) = (c.error.as_ref().unwrap(), d.error.as_ref().unwrap());
        assert_eq!(ed.code(), ErrorCode::DecodeFailed, "{id}: {ed:?}");
        assert_eq!(ec, ed, "{id}: the CPU path's error, word for word");
    }
}
