#!/usr/bin/env bash
# Checks the monitoring files under deploy/: Prometheus config and rules (promtool check,
# promtool's unit tests of every alert), Alertmanager config and routing (amtool), the Grafana
# dashboard (valid JSON, fixed uid, every panel and target on the ${datasource} variable) and
# that every series the dashboard and rules query is one the worker defines
# (worker/src/metrics.rs).
#
#   scripts/check-monitoring.sh [METRICS_OUT]
#
# Prints the series names the dashboard queries (exact names, e.g. *_bucket), one a line, and
# writes them to METRICS_OUT when given (scripts/dashboard_metrics.py makes the list).
#
# promtool and amtool come from Debian's `prometheus` and `prometheus-alertmanager` packages,
# installed when missing (root, or sudo). On a host with systemd the package also starts a
# prometheus service; CI containers have none.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_FILE="${1:-}"

PROM=deploy/prometheus/prometheus.yml
RULES_DIR=deploy/prometheus/rules
TESTS_DIR=deploy/prometheus/tests
AM=deploy/alertmanager/alertmanager.yml
DASHBOARDS=deploy/grafana/dashboards
DS_PROVISIONING=deploy/grafana/provisioning/datasources/prometheus.yml

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

check_dashboard() { python3 scripts/dashboard_metrics.py --check "$1" >/dev/null; }
for dash in "$DASHBOARDS"/*.json; do
  step "dashboard $dash (JSON, uid, \${datasource})" check_dashboard "$dash"
done

# The provisioned data source is the dashboard variable's default.
ds_default() {
  python3 - "$DASHBOARDS/clipqc.json" "$DS_PROVISIONING" <<'EOF'
import json, re, sys
dash = json.load(open(sys.argv[1]))
var = [v for v in dash["templating"]["list"] if v["name"] == "datasource"][0]
default = (var.get("current") or {}).get("value")
uids = re.findall(r"^\s*uid:\s*['\"]?([\w-]+)", open(sys.argv[2]).read(), re.M)
print("dashboard default %r, provisioned uids %r" % (default, uids))
sys.exit(0 if default in uids else 1)
EOF
}
step "grafana: provisioned data source uid = dashboard default" ds_default

# Every series queried is one the worker defines (histogram series by their base name).
known_series() {
  local missing=0 name base
  while read -r name; do
    base="$name"
    for suffix in _bucket _sum _count; do base="${base%"$suffix"}"; done
    if ! grep -rqF "\"$base\"" worker/src; then
      echo "$name: no \"$base\" in worker/src"
      missing=1
    fi
  done < <({ python3 scripts/dashboard_metrics.py "$DASHBOARDS/clipqc.json"
             for r in "$RULES_DIR"/*.yml; do python3 scripts/dashboard_metrics.py --rules "$r"; done; } |
           sort -u)
  [ "$missing" -eq 0 ] && echo "every queried series is defined in worker/src"
}
step "queried series exist in worker/src" known_series

echo "==> series the dashboard queries${OUT_FILE:+ (also in $OUT_FILE)}"
python3 scripts/dashboard_metrics.py "$DASHBOARDS/clipqc.json" >"$TMP/metrics.txt"
sed 's/^/    /' "$TMP/metrics.txt"
[ -z "$OUT_FILE" ] || cp "$TMP/metrics.txt" "$OUT_FILE"

if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "monitoring checks: OK"
