//! Alerting hooks: published verdicts → JSON notifications to webhooks.
//!
//! Two triggers per webhook: each DEFECT verdict, and a line's defect rate over a sliding
//! window crossing a threshold (firing once, then resolved when it falls back).
//! Bodies are Alertmanager's `POST /api/v2/alerts` format or a generic JSON object.
//!
//! Guarantees: [`Notifier::observe`] never waits. Each webhook has its own bounded queue and
//! its own delivery task; a slow, failing or hanging webhook costs only that task and its
//! queue (events beyond it are dropped and counted), never the verdict path. Defect
//! notifications are rate-limited per webhook; rate alerts are not (they are rare and a
//! dropped "resolved" would leave an alert firing). Deliveries are retried with backoff
//! within a per-attempt timeout.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use backon::{ExponentialBuilder, Retryable};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use schemars::JsonSchema;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::metrics;
use crate::proto::v1::{Outcome, Verdict};

/// Alerting hooks: webhooks told of DEFECT verdicts and of lines' defect rates.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct NotifySettings {
    /// Webhooks told of DEFECT verdicts and of lines' defect rates (Alertmanager or plain
    /// JSON).
    pub webhooks: Vec<WebhookConfig>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    /// A JSON array of alerts, as Alertmanager's `POST /api/v2/alerts` takes it.
    #[default]
    Alertmanager,
    /// One JSON object per event: `{"event": "defect" | "defect_rate_firing" | ...}`.
    Generic,
}

/// One webhook. `url` is e.g. `http://alertmanager:9093/api/v2/alerts`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Names the webhook in logs and in `clipqc_webhook_notifications_total{webhook}`.
    pub name: String,
    /// Where notifications are POSTed.
    pub url: String,
    /// `alertmanager`: a JSON array of alerts as Alertmanager's `POST /api/v2/alerts` takes
    /// it; `generic`: one JSON object per event.
    #[serde(default)]
    pub format: WebhookFormat,
    /// Notify on every DEFECT verdict (rate-limited by `max_per_minute`).
    #[serde(default = "yes")]
    pub on_defect: bool,
    /// Notify when a line's defect rate crosses a threshold.
    #[serde(default)]
    pub defect_rate: Option<DefectRateRule>,
    /// Only these lines (empty: every line).
    #[serde(default)]
    pub lines: Vec<String>,
    /// Defect notifications per minute at most; the rest are dropped and counted.
    #[serde(default = "default_per_minute")]
    pub max_per_minute: u32,
    /// Per attempt.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Attempts after the first, with exponential backoff.
    #[serde(default = "default_retries")]
    pub retries: usize,
    /// Events waiting for delivery; beyond it they are dropped and counted.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Extra request headers (e.g. `Authorization`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DefectRateRule {
    /// Fraction of a line's verdicts that are DEFECT, in (0, 1].
    pub threshold: f64,
    /// The sliding window the rate is computed over, in seconds.
    #[serde(default = "default_window")]
    pub window_seconds: u64,
    /// Fewer verdicts than this in the window never fire (1 defect of 2 parts is no trend).
    #[serde(default = "default_min_verdicts")]
    pub min_verdicts: u64,
}

fn yes() -> bool {
    true
}
fn default_per_minute() -> u32 {
    60
}
fn default_timeout_ms() -> u64 {
    5000
}
fn default_retries() -> usize {
    3
}
fn default_queue() -> usize {
    256
}
fn default_window() -> u64 {
    600
}
fn default_min_verdicts() -> u64 {
    20
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("notify.webhooks {name}: {message}")]
    Invalid { name: String, message: String },
}

/// What a webhook is told.
#[derive(Debug, Clone)]
enum Event {
    Defect(Box<Verdict>),
    Rate {
        line: String,
        firing: bool,
        rate: f64,
        verdicts: u64,
        window_seconds: u64,
        since: SystemTime,
    },
}

/// Cheap to clone; owned by the pipeline. Delivery tasks end when every clone is dropped.
#[derive(Clone, Default)]
pub struct Notifier {
    hooks: Arc<Vec<Hook>>,
}

struct Hook {
    config: WebhookConfig,
    queue: mpsc::Sender<Event>,
    limiter: DefaultDirectRateLimiter,
    windows: Mutex<HashMap<String, Window>>,
}

impl Notifier {
    /// No webhooks: observing costs nothing.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Starts one delivery task per webhook on the current tokio runtime.
    pub fn start(configs: &[WebhookConfig], worker: &str) -> Result<Self, NotifyError> {
        let client = reqwest::Client::builder()
            .build()
            .map_err(|e| NotifyError::Invalid {
                name: "*".into(),
                message: format!("http client: {e}"),
            })?;
        let mut hooks = Vec::new();
        for config in configs {
            let invalid = |message: String| NotifyError::Invalid {
                name: config.name.clone(),
                message,
            };
            let url = reqwest::Url::parse(&config.url)
                .map_err(|e| invalid(format!("url {:?}: {e}", config.url)))?;
            if let Some(rule) = &config.defect_rate {
                if !(rule.threshold > 0.0 && rule.threshold <= 1.0) || rule.window_seconds == 0 {
                    return Err(invalid(
                        "defect_rate needs 0 < threshold <= 1 and window_seconds > 0".into(),
                    ));
                }
            }
            let per_minute = NonZeroU32::new(config.max_per_minute)
                .ok_or_else(|| invalid("max_per_minute must be at least 1".into()))?;
            let (tx, rx) = mpsc::channel(config.queue.max(1));
            let delivery = Delivery {
                config: config.clone(),
                url,
                client: client.clone(),
                worker: worker.to_string(),
            };
            tokio::spawn(delivery.run(rx));
            hooks.push(Hook {
                config: config.clone(),
                queue: tx,
                limiter: RateLimiter::direct(Quota::per_minute(per_minute)),
                windows: Mutex::new(HashMap::new()),
            });
        }
        Ok(Self {
            hooks: Arc::new(hooks),
        })
    }

    /// A verdict the broker acknowledged. Never waits.
    pub fn observe(&self, v: &Verdict) {
        for hook in self.hooks.iter() {
            hook.observe(v, Instant::now());
        }
    }
}

impl Hook {
    fn observe(&self, v: &Verdict, now: Instant) {
        let c = &self.config;
        if !c.lines.is_empty() && !c.lines.contains(&v.line_id) {
            return;
        }
        let defect = v.outcome() == Outcome::Defect;
        if defect && c.on_defect {
            if self.limiter.check().is_ok() {
                self.enqueue(Event::Defect(Box::new(v.clone())));
            } else {
                metrics::webhook(&c.name, "rate_limited");
            }
        }
        // ERROR verdicts say nothing about the parts; they are not in the rate.
        let Some(rule) = &c.defect_rate else { return };
        if v.outcome() == Outcome::Error {
            return;
        }
        let event = {
            let mut windows = self.windows.lock().expect("notify window lock poisoned");
            if !windows.contains_key(&v.line_id) && windows.len() >= MAX_WINDOWS {
                // Line ids come from requests: forget lines with nothing in their window
                // (and not firing) before taking a new one, and beyond the bound take none.
                windows.retain(|_, w| !w.idle(now, rule));
                if windows.len() >= MAX_WINDOWS {
                    metrics::webhook(&c.name, "dropped");
                    return;
                }
            }
            let w = windows
                .entry(v.line_id.clone())
                .or_insert_with(|| Window::new(now));
            w.record(now, defect, rule)
        };
        if let Some((firing, rate, verdicts)) = event {
            self.enqueue(Event::Rate {
                line: v.line_id.clone(),
                firing,
                rate,
                verdicts,
                window_seconds: rule.window_seconds,
                since: SystemTime::now(),
            });
        }
    }

    fn enqueue(&self, event: Event) {
        if self.queue.try_send(event).is_err() {
            metrics::webhook(&self.config.name, "dropped");
        }
    }
}

/// One line's verdicts over the window, in one-second buckets (memory bounded by the
/// window, not by the verdict rate).
struct Window {
    start: Instant,
    buckets: VecDeque<(u64, u64, u64)>,
    total: u64,
    defects: u64,
    firing: bool,
    /// Alertmanager forgets a firing alert not re-sent within its resolve_timeout.
    last_sent: Option<Instant>,
}

/// Lines whose defect rate a webhook follows at once; past it, idle lines are forgotten and
/// then new ones are not followed (line ids come from requests, so their number is not ours
/// to trust).
pub const MAX_WINDOWS: usize = 1024;

/// A firing alert is repeated this often while it holds.
const REPEAT: Duration = Duration::from_secs(60);

impl Window {
    fn new(start: Instant) -> Self {
        Self {
            start,
            buckets: VecDeque::new(),
            total: 0,
            defects: 0,
            firing: false,
            last_sent: None,
        }
    }

    /// Nothing left in the window and nothing firing: the line can be forgotten.
    fn idle(&self, now: Instant, rule: &DefectRateRule) -> bool {
        let second = now.duration_since(self.start).as_secs();
        !self.firing
            && self
                .buckets
                .back()
                .is_none_or(|&(s, _, _)| s + rule.window_seconds <= second)
    }

    /// Returns `(firing, rate, verdicts)` when a notification is due.
    fn record(
        &mut self,
        now: Instant,
        defect: bool,
        rule: &DefectRateRule,
    ) -> Option<(bool, f64, u64)> {
        let second = now.duration_since(self.start).as_secs();
        while let Some(&(s, total, defects)) = self.buckets.front() {
            if s + rule.window_seconds > second {
                break;
            }
            self.buckets.pop_front();
            self.total -= total;
            self.defects -= defects;
        }
        match self.buckets.back_mut() {
            Some(b) if b.0 == second => {
                b.1 += 1;
                b.2 += u64::from(defect);
            }
            _ => self.buckets.push_back((second, 1, u64::from(defect))),
        }
        self.total += 1;
        self.defects += u64::from(defect);
        let rate = self.defects as f64 / self.total as f64;
        let over = self.total >= rule.min_verdicts && rate >= rule.threshold;
        let due = match (self.firing, over) {
            (false, true) | (true, false) => true,
            (true, true) => self
                .last_sent
                .is_none_or(|t| now.duration_since(t) >= REPEAT),
            (false, false) => false,
        };
        self.firing = over;
        due.then(|| {
            self.last_sent = Some(now);
            (over, rate, self.total)
        })
    }
}

struct Delivery {
    config: WebhookConfig,
    url: reqwest::Url,
    client: reqwest::Client,
    worker: String,
}

impl Delivery {
    async fn run(self, mut rx: mpsc::Receiver<Event>) {
        while let Some(event) = rx.recv().await {
            let body = match self.config.format {
                WebhookFormat::Alertmanager => body::alertmanager(&event, &self.worker),
                WebhookFormat::Generic => body::generic(&event, &self.worker),
            };
            let attempt = || async {
                let mut req = self
                    .client
                    .post(self.url.clone())
                    .timeout(Duration::from_millis(self.config.timeout_ms))
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.to_string());
                for (k, v) in &self.config.headers {
                    req = req.header(k, v);
                }
                req.send().await?.error_for_status()
            };
            let backoff = ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(10))
                .with_max_times(self.config.retries)
                .with_jitter();
            match attempt.retry(backoff).await {
                Ok(_) => metrics::webhook(&self.config.name, "sent"),
                Err(e) => {
                    metrics::webhook(&self.config.name, "failed");
                    tracing::warn!(webhook = %self.config.name, error = %e, "webhook notification failed");
                }
            }
        }
    }
}

mod body;
#[cfg(test)]
mod tests;
