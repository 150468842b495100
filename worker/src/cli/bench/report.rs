//! The bench's figures: computed from the arrivals and the metrics, shown as a table or JSON.

use serde::Serialize;

use super::{Arrival, BenchArgs, RSS};

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Ceiling {
    pub batch: usize,
    /// Model inputs per second: whole frames or windows alike (the name is kept for the
    /// scripts that read it).
    pub images_per_s: f64,
    /// What one request costs the model: the bench image's views under the profile.
    #[serde(skip)]
    pub views_per_image: usize,
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Serialize)]
pub struct Batches {
    pub count: f64,
    pub mean_size: f64,
    pub mean_fill: f64,
}

#[derive(Debug, Serialize)]
pub struct Memory {
    pub peak_rss_bytes: Option<u64>,
    /// RSS a minute into the run (when it lasted that long) and at its end.
    pub rss_at_60s_bytes: Option<u64>,
    pub rss_end_bytes: Option<u64>,
    pub rss_change_pct: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    /// The model and where it ran, e.g. `clip-vit-b-32@… on Cuda(0) (Half)`.
    pub model: String,
    pub image: String,
    pub requests: usize,
    pub received: usize,
    pub errors: usize,
    /// Requested publish rate (0: as fast as possible).
    pub rate: f64,
    /// Published requests without a verdict at most (the embedded broker's limit; none on a
    /// given cluster).
    pub max_outstanding: Option<usize>,
    /// First publish to last verdict.
    pub seconds: f64,
    /// Steady state: verdicts between the 10th and 90th percentile of arrival.
    pub images_per_s: f64,
    /// The profile the requests named.
    pub profile: String,
    /// Views the model embeds per request: 1, or the whole frame and the windows of a
    /// tiled profile.
    pub views_per_image: usize,
    /// `images_per_s × views_per_image`: the model inputs per second, as the ceiling counts.
    pub windows_per_s: f64,
    pub latency_ms: Latency,
    pub batch: Batches,
    pub memory: Memory,
    pub ceiling: Ceiling,
    pub ratio_to_ceiling: f64,
    /// Where the profile's images were preprocessed: `host` or `device (Cuda(0))`.
    pub preprocess: String,
    /// Process CPU time over `seconds`: cores busy on average (worker, in-process broker,
    /// producer and consumer together).
    pub cpu_cores_used: f64,
}

impl Report {
    pub fn new(
        args: &BenchArgs,
        model: String,
        requests: usize,
        max_outstanding: Option<usize>,
        mut arrivals: Vec<Arrival>,
        ceiling: Ceiling,
        metrics: &str,
    ) -> Self {
        let views_per_image = ceiling.views_per_image;
        arrivals.sort_by_key(|a| a.at);
        let first_publish = arrivals.iter().map(|a| a.at - a.latency).min();
        let seconds = match (first_publish, arrivals.last()) {
            (Some(f), Some(l)) => (l.at - f).as_secs_f64(),
            _ => 0.0,
        };
        let images_per_s = steady_rate(&arrivals);
        let mut ms: Vec<f64> = arrivals
            .iter()
            .map(|a| a.latency.as_secs_f64() * 1e3)
            .collect();
        ms.sort_by(f64::total_cmp);
        let (count, size_sum) = sum_count(metrics, "clipqc_batch_size");
        let (_, fill_sum) = sum_count(metrics, "clipqc_batch_fill_ratio");
        let rss = RSS.lock().unwrap().clone();
        let at_60 = rss.iter().find(|(t, _)| *t >= 60.0).map(|(_, b)| *b);
        let end = rss.last().map(|(_, b)| *b);
        Self {
            model,
            image: args.image.display().to_string(),
            requests,
            received: arrivals.len(),
            errors: arrivals.iter().filter(|a| a.error).count(),
            rate: args.rate,
            max_outstanding,
            seconds,
            images_per_s,
            profile: args.profile.clone(),
            views_per_image,
            windows_per_s: images_per_s * views_per_image as f64,
            latency_ms: Latency {
                p50: percentile(&ms, 0.50),
                p95: percentile(&ms, 0.95),
                p99: percentile(&ms, 0.99),
                max: ms.last().copied().unwrap_or(f64::NAN),
            },
            batch: Batches {
                count,
                mean_size: size_sum / count.max(1.0),
                mean_fill: fill_sum / count.max(1.0),
            },
            memory: Memory {
                peak_rss_bytes: proc_status_bytes("VmHWM:"),
                rss_at_60s_bytes: at_60,
                rss_end_bytes: end,
                rss_change_pct: at_60
                    .zip(end)
                    .map(|(a, e)| (e as f64 - a as f64) / a as f64 * 100.0),
            },
            // Both in model inputs per second: a tiled profile's windows are model work.
            ratio_to_ceiling: images_per_s * views_per_image as f64 / ceiling.images_per_s,
            ceiling,
            preprocess: "host".into(),
            cpu_cores_used: f64::NAN,
        }
        .with_batch_fallback()
    }

    /// Without a metrics recorder (a second install in one process) the batch figures are
    /// unknown, not zero.
    fn with_batch_fallback(mut self) -> Self {
        if self.batch.count == 0.0 {
            self.batch.mean_size = f64::NAN;
            self.batch.mean_fill = f64::NAN;
        }
        self
    }

    pub fn table(&self) -> String {
        let mb =
            |b: Option<u64>| b.map_or("-".into(), |b| format!("{:.0} MiB", b as f64 / 1048576.0));
        let rows = [
            ("model", self.model.clone()),
            ("image", self.image.clone()),
            (
                "requests",
                format!(
                    "{} published, {} verdicts, {} errors",
                    self.requests, self.received, self.errors
                ),
            ),
            (
                "publish rate",
                match (self.rate > 0.0, self.max_outstanding) {
                    (true, None) => format!("{:.1}/s", self.rate),
                    (true, Some(w)) => {
                        format!("{:.1}/s, at most {w} unanswered per partition", self.rate)
                    }
                    (false, None) => "max".into(),
                    (false, Some(w)) => format!("max, at most {w} unanswered per partition"),
                },
            ),
            (
                "throughput",
                format!(
                    "{:.1} images/s, {:.1} windows/s (profile {:?}: {} views each; steady state)",
                    self.images_per_s, self.windows_per_s, self.profile, self.views_per_image
                ),
            ),
            (
                "model-only ceiling",
                format!(
                    "{:.1} views/s (batches of {})",
                    self.ceiling.images_per_s, self.ceiling.batch
                ),
            ),
            (
                "of the ceiling",
                format!("{:.1} %", self.ratio_to_ceiling * 100.0),
            ),
            (
                "preprocessing",
                format!(
                    "{}; {:.2} CPU cores used (process CPU time / wall time)",
                    self.preprocess, self.cpu_cores_used
                ),
            ),
            (
                "latency p50/p95/p99",
                format!(
                    "{:.1} / {:.1} / {:.1} ms (max {:.1})",
                    self.latency_ms.p50,
                    self.latency_ms.p95,
                    self.latency_ms.p99,
                    self.latency_ms.max
                ),
            ),
            (
                "batches",
                format!(
                    "{:.0}, mean size {:.2}, fill {:.2}",
                    self.batch.count, self.batch.mean_size, self.batch.mean_fill
                ),
            ),
            (
                "RSS",
                format!(
                    "peak {}, at 60 s {}, at end {}",
                    mb(self.memory.peak_rss_bytes),
                    mb(self.memory.rss_at_60s_bytes),
                    mb(self.memory.rss_end_bytes)
                ),
            ),
        ];
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        rows.iter()
            .map(|(k, v)| format!("{k:>width$}  {v}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Verdicts per second between the 10th and 90th percentile of arrival (sorted arrivals).
fn steady_rate(arrivals: &[Arrival]) -> f64 {
    let n = arrivals.len();
    if n < 10 {
        return f64::NAN;
    }
    let (a, b) = (n / 10, n - 1 - n / 10);
    let span = (arrivals[b].at - arrivals[a].at).as_secs_f64();
    (b - a) as f64 / span
}

/// `(count, sum)` of a histogram in Prometheus text, summed over label sets.
fn sum_count(text: &str, name: &str) -> (f64, f64) {
    let value = |suffix: &str| -> f64 {
        let series = format!("{name}{suffix}");
        text.lines()
            .filter(|l| {
                l.strip_prefix(&series)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    (value("_count"), value("_sum"))
}

/// A `/proc/self/status` field in bytes (Linux).
pub fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn histogram_sums_and_counts_are_read_from_the_exposition() {
        let text = "# TYPE clipqc_batch_size histogram\n\
                    clipqc_batch_size_bucket{le=\"1\"} 2\n\
                    clipqc_batch_size_sum 70\n\
                    clipqc_batch_size_count 3\n\
                    clipqc_batch_size_fill_sum 9\n";
        assert_eq!(sum_count(text, "clipqc_batch_size"), (3.0, 70.0));
        assert_eq!(sum_count(text, "clipqc_missing"), (0.0, 0.0));
    }

    #[test]
    fn the_steady_rate_leaves_out_start_and_tail() {
        let t0 = Instant::now();
        // 100 arrivals 10 ms apart, then a straggler 5 s later: 100/s steady.
        let mut a: Vec<Arrival> = (0..100)
            .map(|i| Arrival {
                at: t0 + Duration::from_millis(10 * i),
                latency: Duration::ZERO,
                error: false,
            })
            .collect();
        a.push(Arrival {
            at: t0 + Duration::from_secs(6),
            latency: Duration::ZERO,
            error: false,
        });
        let r = steady_rate(&a);
        assert!((r - 100.0).abs() < 1.0, "{r}");
    }

    #[test]
    fn proc_status_has_the_peak_rss() {
        assert!(proc_status_bytes("VmHWM:").unwrap() > 1 << 20);
    }
}
