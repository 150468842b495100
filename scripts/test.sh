#!/usr/bin/env bash
# The test suite, from a fresh clone: Python environment, the random tiny model, the reference
# fixtures, the tansu broker for the end-to-end tests, the deployment checks, then every Rust test. `.ci/run` calls exactly this.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"

MODEL="$ROOT/target/models/tiny"
FIXTURES="$ROOT/target/fixtures"
ensure_model tiny "$MODEL"
# Segment Anything's tiny random model beside it (tests/it/model_fidelity/sam.rs finds it there).
ensure_sam_model tiny "$MODEL/sam"
stamp="$(cat "$MODEL/.stamp" "$MODEL/sam/.stamp" tests/reference/*.py deploy/samples/*.py | sha256sum | cut -c1-16)"
if [ "$(cat "$FIXTURES/.stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "==> computing reference outputs (transformers, open_clip) into $FIXTURES" >&2
  rm -rf "$FIXTURES"
  python tests/reference/make_fixtures.py --model "$MODEL" --sam "$MODEL/sam" --out "$FIXTURES"
  echo "$stamp" >"$FIXTURES/.stamp"
fi

ensure_tansu
# Test-only Python packages (moto's S3 server), once per requirements version.
test_reqs_stamp="$VENV/.tests-$(sha256sum tests/requirements.txt | cut -c1-12)"
if [ ! -f "$test_reqs_stamp" ]; then
  echo "==> installing tests/requirements.txt" >&2
  pip install --quiet -r tests/requirements.txt
  touch "$test_reqs_stamp"
fi
# Deployment and monitoring files: promtool (rules + unit tests), amtool, then pytest
# (scripts/tests/) on the dashboard and the series it and the rules query (promql-parser), the
# Helm chart linted and rendered as `helm template` does (helm-python-sdk), the compose file.
# The first also installs Debian's Prometheus and Alertmanager, which tests/it/ops_stack.rs runs.
scripts/check-monitoring.sh
scripts/check-helm.sh
export CLIPQC_TEST_MODEL="$MODEL" CLIPQC_TEST_FIXTURES="$FIXTURES"
# The criterion benchmarks' smoke run below uses the tiny model and the bench images
# (scripts/bench.sh runs them for figures, on ViT-B/32).
python benches/make_images.py --out "$ROOT/target/bench-images" >&2
export CLIPQC_BENCH_MODEL="$MODEL" CLIPQC_BENCH_IMAGES="$ROOT/target/bench-images"
# One integration-test binary (tests/it). `--include-ignored`: the tests a plain `cargo test`
# leaves out because they compare with Python or need the programs prepared above; not the
# `measure_*` measurements. The suites that start a broker or Prometheus run by themselves
# afterwards, as they did in binaries of their own, so they never share the 2 cores with the
# in-process suites. --nocapture: the fidelity tests print the measured differences.
cargo test --workspace --lib --bins --tests "$@" -- --nocapture --include-ignored \
  --skip measure_ --skip e2e_tansu:: --skip ops_stack::
cargo test --workspace --test it "$@" -- --nocapture --include-ignored --skip measure_ e2e_tansu::
cargo test --workspace --test it "$@" -- --nocapture --include-ignored --skip measure_ ops_stack::
# Each criterion benchmark once, as a smoke test (`--bench '*'`: the bench targets only; with
# `--benches` cargo would run the library's unit tests a second time).
cargo test --workspace --bench '*' "$@"
# Then a short coverage-guided fuzzing run of each fuzz target (scripts/fuzz.sh; its instrumented
# build is separate, kept in ~/.cache/clipqc). CLIPQC_FUZZ_SECONDS: seconds per target, 0 to skip.
fuzz_seconds="${CLIPQC_FUZZ_SECONDS:-30}"
if [ "$fuzz_seconds" != 0 ]; then
  scripts/fuzz.sh "$fuzz_seconds"
fi
