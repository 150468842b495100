#!/usr/bin/env bash
# The README's test command's Rust passes (scripts/test-lib.sh's rust_passes: the in-process
# suites, the broker suites, the Prometheus suite, the benchmarks' smoke run) N times in a row on
# one build, to find the tests that fail only now and then.
#
#   scripts/soak-tests.sh N [CARGO-TEST-ARGS...]
#
# Builds once, then runs the passes N times with --no-fail-fast, each run's output in
# target/soak/run-I.log. Prints each run's time and failed tests, then the failures by test
# (how many runs each failed in). Exits 1 when any run failed, 0 when all N passed.
set -euo pipefail
n="${1:-}"
if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: scripts/soak-tests.sh N [CARGO-TEST-ARGS...]   (N: runs, at least 1)" >&2
  exit 2
fi
shift
source "$(dirname "$0")/test-lib.sh"
test_prepare
ensure_prometheus
# One build for every run; a run that rebuilt would not be a run of the same build.
cargo test --workspace --lib --bins --tests --bench '*' --no-run "$@" 2>&1 | tail -3 >&2

logs="$ROOT/target/soak"
rm -rf "$logs"
mkdir -p "$logs"
declare -A failed_in=()
failed_runs=0
started=$SECONDS
for i in $(seq 1 "$n"); do
  log="$logs/run-$i.log"
  t0=$SECONDS
  rc=0
  # --no-fail-fast: a failing test binary does not hide the next pass's failures.
  (rust_passes --no-fail-fast "$@") >"$log" 2>&1 || rc=$?
  # libtest's own line for each failed test: "test path::to::name ... FAILED".
  mapfile -t names < <(sed -n 's/^test \(.*\) \.\.\. FAILED$/\1/p' "$log" | sort -u)
  # A run can fail outside any test (a build error, a harness that crashed): say so.
  if [ "$rc" != 0 ] && [ ${#names[@]} = 0 ]; then
    names=("(no test named: exit $rc; see $log)")
  fi
  for t in "${names[@]}"; do
    failed_in["$t"]=$(( ${failed_in["$t"]:-0} + 1 ))
  done
  summary="$(grep -E '^test result: ' "$log" | awk '{p += $4; f += $6} END {printf "%d passed, %d failed", p, f}')"
  if [ "$rc" = 0 ] && [ ${#names[@]} = 0 ]; then
    echo "run $i/$n: ok in $((SECONDS - t0)) s ($summary)"
  else
    failed_runs=$((failed_runs + 1))
    echo "run $i/$n: FAILED in $((SECONDS - t0)) s ($summary): ${names[*]}"
  fi
done
echo "soak: $n runs in $((SECONDS - started)) s, $failed_runs failed"
if [ ${#failed_in[@]} -gt 0 ]; then
  echo "failures by test (runs failed in, of $n):"
  for t in "${!failed_in[@]}"; do
    printf '  %3d  %s\n' "${failed_in[$t]}" "$t"
  done | sort -rn
  exit 1
fi
