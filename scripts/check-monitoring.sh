#!/usr/bin/env bash
# Checks the monitoring files under deploy/: Prometheus config and rules (promtool check,
# promtool's unit tests of every alert), Alertmanager config and routing (amtool), then the
# Python checks with pytest (scripts/tests/test_monitoring.py, and test_promql.py for the
# extraction they rely on): the Grafana dashboard (valid JSON, fixed uid, every panel and target
# on the ${datasource} variable, whose default is the provisioned data source) and that every
# series the dashboard and the rules query is one the worker defines (worker/src). The queries
# are read with a real PromQL parser (promql-parser, scripts/dashboard_metrics.py).
#
#   scripts/check-monitoring.sh [METRICS_OUT]
#
# Prints the series names the dashboard queries (exact names, e.g. *_bucket), one a line, and
# writes them to METRICS_OUT when given (scripts/dashboard_metrics.py makes the list).
#
# promtool and amtool come from Debian's `prometheus` and `prometheus-alertmanager` packages,
# installed when missing (root, or sudo). On a host with systemd the package also starts a
# prometheus service; CI containers have none. The Python environment is
# scripts/checks-env.sh's (cached in ~/.cache/clipqc/checks-venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_FILE="${1:-}"
source scripts/checks-env.sh

PROM=deploy/prometheus/prometheus.yml
RULES_DIR=deploy/prometheus/rules
TESTS_DIR=deploy/prometheus/tests
AM=deploy/alertmanager/alertmanager.yml
DASHBOARDS=deploy/grafana/dashboards

need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v amtool >/dev/null || need+=(prometheus-alertmanager)
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing ${need[*]} (apt)" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 ||
    { $SUDO apt-get update -qq >/dev/null &&
      $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
failed=()
step() { # step NAME COMMAND...: runs it, shows its output, remembers a failure
  local name="$1"; shift
  echo "==> $name"
  if "$@" >"$TMP/out" 2>&1; then
    sed 's/^/    /' "$TMP/out"
  else
    sed 's/^/    /' "$TMP/out"
    echo "    FAILED: $name"
    failed+=("$name")
  fi
}

# prometheus.yml names the rules where the container mounts them (/etc/prometheus/rules); the
# full check reads a copy that names the repository's rule files instead.
sed "s#/etc/prometheus/rules/#$ROOT/$RULES_DIR/#g" "$PROM" >"$TMP/prometheus.yml"
if promtool check config --help 2>&1 | grep -q -- --syntax-only; then
  step "promtool check config --syntax-only $PROM" promtool check config --syntax-only "$PROM"
fi
step "promtool check config $PROM (rules from $RULES_DIR)" promtool check config "$TMP/prometheus.yml"
step "promtool check rules $RULES_DIR" promtool check rules "$RULES_DIR"/*.yml
step "promtool test rules $TESTS_DIR" promtool test rules "$TESTS_DIR"/*.yml

step "amtool check-config $AM" amtool check-config "$AM"
route() { # route RECEIVER LABEL=VALUE...: the receiver an alert with these labels reaches
  local want="$1"; shift
  amtool config routes test --config.file="$AM" --verify.receivers="$want" "$@" 2>&1 |
    grep -v 'flag overrides the --alertmanager.url'
}
step "alertmanager: severity=critical reaches page" route page severity=critical alertname=ClipqcWorkerDown
step "alertmanager: severity=warning reaches default" route default severity=warning alertname=ClipqcConsumerLagGrowing
step "alertmanager: no severity reaches default" route default alertname=Other

echo "==> pytest scripts/tests/test_promql.py scripts/tests/test_monitoring.py"
"$CHECKS_PY" -m pytest -q --tb=short -p no:cacheprovider scripts/tests/test_promql.py scripts/tests/test_monitoring.py ||
  failed+=("pytest")

echo "==> series the dashboard queries${OUT_FILE:+ (also in $OUT_FILE)}"
if "$CHECKS_PY" scripts/dashboard_metrics.py "$DASHBOARDS/clipqc.json" >"$TMP/metrics.txt"; then
  sed 's/^/    /' "$TMP/metrics.txt"
else
  failed+=("dashboard_metrics.py")
fi
[ -z "$OUT_FILE" ] || cp "$TMP/metrics.txt" "$OUT_FILE"

if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "monitoring checks: OK"
