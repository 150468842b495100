#!/usr/bin/env bash
# The test suite, from a fresh clone: Python environment, the random tiny model, the reference
# fixtures, Apache Kafka for the end-to-end tests (scripts/kafka.sh), the deployment checks, then
# every Rust test. `.ci/run` calls exactly this.
set -euo pipefail

source "$(dirname "$0")/test-lib.sh"
test_prepare
# Deployment and monitoring files: promtool (rules + unit tests), amtool, then pytest
# (scripts/tests/) on the dashboard and the series it and the rules query (promql-parser), the
# Helm chart linted and rendered as `helm template` does (helm-python-sdk), the compose file.
# The first also installs Debian's Prometheus and Alertmanager, which tests/it/ops_stack.rs runs.
scripts/check-monitoring.sh
scripts/check-helm.sh
fuzz_seconds="${CLIPQC_FUZZ_SECONDS:-30}"
# The fuzz targets' instrumented build (its own target directory, in the cache) goes on beside
# the test passes, which wait much of the time: from nothing it is the longest build of CI.
if [ "$fuzz_seconds" != 0 ]; then
  export CLIPQC_BESIDE_TESTS="scripts/fuzz.sh --build-only"
fi
rust_passes "$@"
# Then a short coverage-guided fuzzing run of each fuzz target (scripts/fuzz.sh; its instrumented
# build is separate, kept in ~/.cache/clipqc). CLIPQC_FUZZ_SECONDS: seconds per target, 0 to skip.
if [ "$fuzz_seconds" != 0 ]; then
  scripts/fuzz.sh "$fuzz_seconds"
fi
