//! The monitoring side of end-to-end tests: Prometheus and Alertmanager from Debian's packages
//! as processes, and a webhook receiver (axum) that records what it is sent.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::e2e::{free_port, serve_in_background, tail, wait_for_port};

/// A binary from PATH (`scripts/check-monitoring.sh` installs Debian's packages).
fn binary(names: &[&str]) -> PathBuf {
    if let Some(p) = names.iter().find_map(|n| which::which(n).ok()) {
        return p;
    }
    panic!("none of {names:?} on PATH: install Debian's prometheus and prometheus-alertmanager (scripts/check-monitoring.sh does)")
}

/// A child process killed on drop, its output in a log file.
pub struct Process {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Process {
    fn spawn(cmd: &mut Command, port: u16, log: PathBuf, what: &str) -> Self {
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {what}: {e}"));
        wait_for_port(port, what);
        Self { child, port, log }
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log, 30)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Alertmanager sending every alert, at once, to `webhook`.
pub fn alertmanager(dir: &Path, webhook: &str) -> Process {
    let config = dir.join("alertmanager.yml");
    std::fs::write(
        &config,
        format!(
            r#"route:
  receiver: test
  group_by: [alertname, line]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: test
    webhook_configs:
      - url: "{webhook}"
"#
        ),
    )
    .unwrap();
    let port = free_port();
    let storage = dir.join("alertmanager-data");
    Process::spawn(
        Command::new(binary(&["prometheus-alertmanager", "alertmanager"]))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", storage.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            // A single instance: no gossip port.
            .arg("--cluster.listen-address="),
        port,
        dir.join("alertmanager.log"),
        "alertmanager",
    )
}

/// Prometheus scraping `target` (job `clipqc`) every second, evaluating `rule_files` every
/// second and alerting to `alertmanager`.
pub fn prometheus(dir: &Path, target: &str, rule_files: &[PathBuf], alertmanager: u16) -> Process {
    let config = dir.join("prometheus.yml");
    let rules: Vec<String> = rule_files
        .iter()
        .map(|p| format!("  - \"{}\"", p.display()))
        .collect();
    std::fs::write(
        &config,
        format!(
            r#"global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
{rules}
alerting:
  alertmanagers:
    - static_configs:
        - targets: ["127.0.0.1:{alertmanager}"]
scrape_configs:
  - job_name: clipqc
    static_configs:
      - targets: ["{target}"]
"#,
            rules = rules.join("\n"),
        ),
    )
    .unwrap();
    let port = free_port();
    Process::spawn(
        Command::new(binary(&["prometheus"]))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("prometheus-data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}")),
        port,
        dir.join("prometheus.log"),
        "prometheus",
    )
}

/// One instant query through Prometheus's HTTP API: the result vector.
pub fn query(prometheus: &Process, promql: &str) -> Vec<Value> {
    let url = reqwest::Url::parse_with_params(
        &format!("{}/api/v1/query", prometheus.base()),
        &[("query", promql)],
    )
    .unwrap();
    let body: Value = reqwest::blocking::get(url)
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.text())
        .map(|t| serde_json::from_str::<Value>(&t).expect("Prometheus answers JSON"))
        .unwrap_or_else(|e| panic!("query {promql}: {e}"));
    assert_eq!(body["status"], "success", "query {promql}: {body}");
    body["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Polls the single value of `promql` until it equals `want`, for at most `within`; panics
/// with the last value (NaN: no series) and Prometheus's log when it never does.
pub fn expect_value(prometheus: &Process, promql: &str, want: f64, within: Duration) {
    crate::common::wait_for(&format!("{promql} == {want}"), within, || {
        let got = query(prometheus, promql)
            .first()
            .and_then(|s| s["value"][1].as_str()?.parse::<f64>().ok())
            .unwrap_or(f64::NAN);
        if got == want {
            Ok(())
        } else {
            Err(format!("{got}\n{}", prometheus.log_tail()))
        }
    })
}

/// An HTTP server recording every JSON body POSTed to it, by path.
pub struct Receiver {
    pub addr: std::net::SocketAddr,
    pub bodies: Arc<Mutex<Vec<(String, Value)>>>,
    _runtime: tokio::runtime::Runtime,
}

impl Receiver {
    pub fn start() -> Self {
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let sink = bodies.clone();
        let app = axum::Router::new().route(
            "/{*path}",
            axum::routing::post(
                move |axum::extract::Path(path): axum::extract::Path<String>,
                      axum::Json(body): axum::Json<Value>| {
                    let sink = sink.clone();
                    async move {
                        sink.lock().unwrap().push((path, body));
                        axum::http::StatusCode::OK
                    }
                },
            ),
        );
        let (addr, runtime) = serve_in_background(app);
        Self {
            addr,
            bodies,
            _runtime: runtime,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{path}", self.addr)
    }

    /// Waits, for at most `within`, until a body POSTed to `path` satisfies `pred` (`what`:
    /// what it is, for the message when none does); returns it.
    pub fn expect(
        &self,
        path: &str,
        what: &str,
        within: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        crate::common::wait_for(&format!("{what} POSTed to /{path}"), within, || {
            let bodies = self.bodies.lock().unwrap();
            bodies
                .iter()
                .find(|(p, b)| p == path && pred(b))
                .map(|(_, b)| b.clone())
                .ok_or_else(|| format!("{} bodies: {:?}", bodies.len(), *bodies))
        })
    }
}

/// The metric names a dashboard or rules file queries (scripts/dashboard_metrics.py).
pub fn queried_metrics(args: &[&str]) -> Vec<String> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("python3")
        .arg(repo.join("scripts/dashboard_metrics.py"))
        .args(args)
        .current_dir(&repo)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dashboard_metrics.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect()
}
