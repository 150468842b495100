//! Against real HTTP servers on loopback (axum): one that records, one that fails first,
//! one that never answers.

use std::sync::atomic::{AtomicUsize, Ordering};

use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::*;
use crate::proto::v1::SourceRecord;

fn verdict(line: &str, outcome: Outcome) -> Verdict {
    let mut v = Verdict {
        request_id: "req-1".into(),
        camera_id: "cam-7".into(),
        line_id: line.into(),
        profile: "default".into(),
        top_class: "surface_scratch".into(),
        probability: 0.91,
        source: Some(SourceRecord {
            topic: "clipqc.requests".into(),
            partition: 2,
            offset: 40,
        }),
        ..Verdict::default()
    };
    v.set_outcome(outcome);
    v
}

fn hook(url: String) -> WebhookConfig {
    WebhookConfig {
        name: "test".into(),
        url,
        format: WebhookFormat::Generic,
        on_defect: true,
        defect_rate: None,
        lines: vec![],
        max_per_minute: 1000,
        // Generous: a slow answer on a loaded machine must not turn into a failed attempt.
        timeout_ms: 30_000,
        retries: 2,
        queue: 16,
        headers: BTreeMap::from([("x-token".to_string(), "s3cret".to_string())]),
    }
}

/// A server whose first `fail_first` requests get 503; every body (and the x-token header)
/// goes to the returned channel.
async fn recorder(fail_first: usize) -> (String, UnboundedReceiver<(Value, String)>) {
    let (url, rx, _) = counting_recorder(fail_first).await;
    (url, rx)
}

/// As [`recorder`], with the number of requests it got.
async fn counting_recorder(
    fail_first: usize,
) -> (String, UnboundedReceiver<(Value, String)>, Arc<AtomicUsize>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let app = Router::new().route(
        "/hook",
        post(
            move |headers: axum::http::HeaderMap, Json(body): Json<Value>| {
                let tx = tx.clone();
                let calls = calls.clone();
                async move {
                    let token = headers
                        .get("x-token")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    if calls.fetch_add(1, Ordering::SeqCst) < fail_first {
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    tx.send((body, token)).unwrap();
                    StatusCode::OK
                }
            },
        ),
    );
    (serve(app).await, rx, counted)
}

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

async fn next(rx: &mut UnboundedReceiver<(Value, String)>) -> (Value, String) {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a notification within 10 s")
        .expect("server alive")
}

#[tokio::test]
async fn a_defect_is_posted_as_generic_json_with_the_configured_headers() {
    let (url, mut rx) = recorder(0).await;
    let n = Notifier::start(&[hook(url)], "worker-a").unwrap();
    n.observe(&verdict("L1", Outcome::Pass));
    n.observe(&verdict("L1", Outcome::Defect));
    let mut after = verdict("L1", Outcome::Defect);
    after.request_id = "req-2".into();
    n.observe(&after);
    let (body, token) = next(&mut rx).await;
    assert_eq!(token, "s3cret");
    assert_eq!(body["event"], "defect");
    assert_eq!(body["line_id"], "L1");
    assert_eq!(body["class"], "surface_scratch");
    assert_eq!(body["source"]["offset"], 40);
    assert_eq!(body["worker"], "worker-a");
    // Deliveries keep the order of the verdicts: the PASS one, had it been notified, would
    // have come before this.
    let (body, _) = next(&mut rx).await;
    assert_eq!(
        (&body["event"], &body["request_id"]),
        (&json!("defect"), &json!("req-2"))
    );
}

#[tokio::test]
async fn failed_deliveries_are_retried() {
    let (url, mut rx, calls) = counting_recorder(2).await;
    let n = Notifier::start(&[hook(url)], "w").unwrap();
    n.observe(&verdict("L1", Outcome::Defect));
    let (body, _) = next(&mut rx).await;
    assert_eq!(body["request_id"], "req-1");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "two 503s, each retried, then the delivery"
    );
}

#[tokio::test]
async fn alertmanager_format_is_an_array_of_alerts() {
    let (url, mut rx) = recorder(0).await;
    let mut config = hook(url);
    config.format = WebhookFormat::Alertmanager;
    let n = Notifier::start(&[config], "w").unwrap();
    n.observe(&verdict("L9", Outcome::Defect));
    let (body, _) = next(&mut rx).await;
    let alert = &body.as_array().expect("an array")[0];
    assert_eq!(alert["labels"]["alertname"], "ClipqcDefect");
    assert_eq!(alert["labels"]["line"], "L9");
    assert_eq!(alert["annotations"]["request_id"], "req-1");
    let starts = alert["startsAt"].as_str().unwrap();
    humantime::parse_rfc3339(starts).expect("startsAt is RFC 3339");
}

#[tokio::test]
async fn a_hanging_webhook_never_blocks_observe_and_drops_beyond_its_queue() {
    let (entered, mut hung) = tokio::sync::mpsc::unbounded_channel();
    let app = Router::new().route(
        "/hook",
        post(move || {
            let entered = entered.clone();
            async move {
                entered.send(()).unwrap();
                std::future::pending::<StatusCode>().await
            }
        }),
    );
    let mut config = hook(serve(app).await);
    config.timeout_ms = 60_000;
    config.queue = 4;
    let n = Notifier::start(&[config], "w").unwrap();
    // Far more than the queue: observe must return every time, on this (test) thread, while
    // the delivery task is stuck in its first request.
    n.observe(&verdict("L1", Outcome::Defect));
    tokio::time::timeout(Duration::from_secs(10), hung.recv())
        .await
        .expect("the first delivery reached the server");
    for _ in 0..10_000 {
        n.observe(&verdict("L1", Outcome::Defect));
    }
    let queued = n.hooks[0].queue.max_capacity() - n.hooks[0].queue.capacity();
    assert_eq!(
        queued, 4,
        "the queue holds its bound; the rest were dropped"
    );
    // Still only the one request in flight.
    assert!(hung.try_recv().is_err());
}

#[tokio::test]
async fn defect_notifications_are_rate_limited() {
    let (url, mut rx) = recorder(0).await;
    let mut config = hook(url);
    config.max_per_minute = 3;
    config.queue = 100;
    // Rate alerts are not rate-limited: the 20th verdict's alert comes after whatever defect
    // notifications got through, in order, and shows there were no more.
    config.defect_rate = Some(DefectRateRule {
        min_verdicts: 20,
        ..rule()
    });
    let n = Notifier::start(&[config], "w").unwrap();
    for _ in 0..20 {
        n.observe(&verdict("L1", Outcome::Defect));
    }
    let mut events = Vec::new();
    for _ in 0..4 {
        events.push(next(&mut rx).await.0["event"].clone());
    }
    assert_eq!(
        events,
        ["defect", "defect", "defect", "defect_rate_firing"],
        "3 of 20 defects within the minute's allowance, then the rate alert"
    );
}

#[tokio::test]
async fn lines_filter_applies() {
    let (url, mut rx) = recorder(0).await;
    let mut config = hook(url);
    config.lines = vec!["L2".into()];
    let n = Notifier::start(&[config], "w").unwrap();
    n.observe(&verdict("L1", Outcome::Defect));
    n.observe(&verdict("L2", Outcome::Defect));
    let (body, _) = next(&mut rx).await;
    assert_eq!(body["line_id"], "L2");
}

fn rule() -> DefectRateRule {
    DefectRateRule {
        threshold: 0.5,
        window_seconds: 10,
        min_verdicts: 4,
    }
}

#[test]
fn the_rate_fires_once_over_the_threshold_and_resolves_below() {
    let t0 = Instant::now();
    let mut w = Window::new(t0);
    let r = rule();
    // Three defects: over the threshold but under min_verdicts.
    for _ in 0..3 {
        assert_eq!(w.record(t0, true, &r), None);
    }
    assert_eq!(w.record(t0, false, &r), Some((true, 0.75, 4)));
    // Still over, just sent: quiet.
    assert_eq!(w.record(t0, true, &r), None);
    // Good parts bring it down: 4 of 6, 4 of 7, 4 of 8 (= the threshold) still fire...
    let t1 = t0 + Duration::from_secs(1);
    for _ in 0..3 {
        assert_eq!(w.record(t1, false, &r), None);
    }
    // ...4 of 9 resolves, once.
    assert_eq!(w.record(t1, false, &r), Some((false, 4.0 / 9.0, 9)));
    assert_eq!(w.record(t1, false, &r), None);
}

#[test]
fn the_window_forgets_old_verdicts() {
    let t0 = Instant::now();
    let mut w = Window::new(t0);
    let r = rule();
    for _ in 0..4 {
        w.record(t0, true, &r);
    }
    assert!(w.firing);
    // Eleven seconds later the defects have left the 10 s window: one good part resolves.
    let later = t0 + Duration::from_secs(11);
    assert_eq!(w.record(later, false, &r), Some((false, 0.0, 1)));
    assert_eq!(w.total, 1);
    assert_eq!(w.buckets.len(), 1);
}

#[test]
fn a_firing_rate_is_repeated_for_alertmanager() {
    let t0 = Instant::now();
    let mut w = Window::new(t0);
    let r = DefectRateRule {
        window_seconds: 600,
        ..rule()
    };
    for _ in 0..4 {
        w.record(t0, true, &r);
    }
    assert_eq!(w.record(t0 + Duration::from_secs(30), true, &r), None);
    assert_eq!(
        w.record(t0 + Duration::from_secs(61), true, &r),
        Some((true, 1.0, 6))
    );
}

#[tokio::test]
async fn invalid_webhooks_are_refused_by_name() {
    let mut bad = hook("not a url".into());
    bad.name = "line-ops".into();
    let err = Notifier::start(&[bad], "w").err().unwrap().to_string();
    assert!(
        err.contains("line-ops") && err.contains("not a url"),
        "{err}"
    );
    let mut bad = hook("http://x/".into());
    bad.defect_rate = Some(DefectRateRule {
        threshold: 1.5,
        ..rule()
    });
    assert!(Notifier::start(&[bad], "w").is_err());
}

/// Line ids come from requests: a new one in every request must not grow the windows without
/// bound. Past the bound idle lines are forgotten first, and beyond it new lines are not
/// followed.
#[tokio::test]
async fn rate_windows_are_bounded_and_idle_lines_forgotten() {
    let mut config = hook("http://127.0.0.1:9/hook".into());
    config.on_defect = false;
    config.defect_rate = Some(rule());
    let notifier = Notifier::start(&[config], "w").unwrap();
    let hook = &notifier.hooks[0];
    let windows = || hook.windows.lock().unwrap().len();
    let t0 = Instant::now();
    for i in 0..MAX_WINDOWS + 100 {
        hook.observe(&verdict(&format!("line-{i}"), Outcome::Pass), t0);
    }
    assert_eq!(windows(), MAX_WINDOWS, "the bound holds");
    assert!(!hook.windows.lock().unwrap().contains_key("line-1050"));
    // One line keeps firing: it is never forgotten.
    for _ in 0..4 {
        hook.observe(&verdict("line-7", Outcome::Defect), t0);
    }
    // The window (10 s) is over for every other line: a new line evicts the idle ones.
    let later = t0 + Duration::from_secs(11);
    hook.observe(&verdict("new-line", Outcome::Pass), later);
    let held = hook.windows.lock().unwrap();
    assert!(held.contains_key("new-line") && held.contains_key("line-7"));
    assert_eq!(held.len(), 2, "idle lines forgotten");
}

#[test]
fn a_defect_body_carries_each_masks_area_and_box_but_not_the_mask() {
    use crate::proto::v1::{DefectMask, MaskBox, MaskRle};
    let mut v = verdict("line-1", Outcome::Defect);
    v.masks = vec![DefectMask {
        rle: Some(MaskRle {
            size: vec![480, 640],
            counts: vec![1000, 24, 306_176],
        }),
        area: 24,
        area_mm2: Some(0.24),
        r#box: Some(MaskBox {
            x: 2,
            y: 40,
            width: 1,
            height: 24,
        }),
        iou: 0.88,
        region: 0,
    }];
    let event = Event::Defect(v.clone().into());
    let generic = body::generic(&event, "w-1");
    assert_eq!(
        generic["masks"],
        json!([{"region": 0, "area": 24, "area_mm2": 0.24, "iou": 0.88f32,
                "box": {"x": 2, "y": 40, "width": 1, "height": 24}}])
    );
    assert!(!generic.to_string().contains("counts"), "{generic}");
    let alert = body::alertmanager(&event, "w-1");
    let masks: Value =
        serde_json::from_str(alert[0]["annotations"]["masks"].as_str().unwrap()).unwrap();
    assert_eq!(masks[0]["area"], 24);
    assert!(!alert.to_string().contains("counts"));
}

#[test]
fn a_defect_body_summarises_the_anomaly_map_without_its_cells() {
    use crate::proto::v1::AnomalyMap;
    let mut v = verdict("line-1", Outcome::Defect);
    let event = Event::Defect(v.clone().into());
    assert_eq!(body::generic(&event, "w-1")["anomaly_map"], Value::Null);
    v.anomaly_map = Some(AnomalyMap {
        x_edges: vec![0, 10, 30],
        y_edges: vec![5, 20, 40],
        scores: vec![0.1, 0.2, 0.7, 0.3],
    });
    let event = Event::Defect(v.into());
    let generic = body::generic(&event, "w-1");
    assert_eq!(
        generic["anomaly_map"],
        json!({"cols": 2, "rows": 2, "max": 0.7f32,
               "hottest": {"x": 0, "y": 20, "width": 10, "height": 20, "score": 0.7f32}})
    );
    let alert = body::alertmanager(&event, "w-1");
    let map: Value =
        serde_json::from_str(alert[0]["annotations"]["anomaly_map"].as_str().unwrap()).unwrap();
    assert_eq!(map["hottest"]["y"], 20);
    assert!(!generic.to_string().contains("x_edges"), "{generic}");
}
