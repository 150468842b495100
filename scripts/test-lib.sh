# Sourced by scripts/test.sh and scripts/soak-tests.sh: what the Rust tests need prepared
# (test_prepare) and the Rust passes themselves (rust_passes), so the soak runs exactly the
# passes CI runs.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"

MODEL="$ROOT/target/models/tiny"
FIXTURES="$ROOT/target/fixtures"

# The random tiny models, the reference fixtures, Apache Kafka's jars (scripts/kafka.sh), the
# tests' Python packages and the
# bench images; exports the variables the tests read. Prometheus and Alertmanager, which
# tests/it/ops_stack.rs runs, come with scripts/check-monitoring.sh (test.sh) or
# ensure_prometheus (the soak).
test_prepare() {
  ensure_model tiny "$MODEL"
  # Segment Anything's tiny random model beside it (tests/it/model_fidelity/sam.rs finds it there).
  ensure_sam_model tiny "$MODEL/sam"
  ensure_fixtures
  scripts/kafka.sh fetch >/dev/null
  # Test-only Python packages (moto's S3 server), once per requirements version.
  local test_reqs_stamp
  test_reqs_stamp="$VENV/.tests-$(sha256sum tests/requirements.txt | cut -c1-12)"
  if [ ! -f "$test_reqs_stamp" ]; then
    echo "==> installing tests/requirements.txt" >&2
    pip install --quiet -r tests/requirements.txt
    touch "$test_reqs_stamp"
  fi
  export CLIPQC_TEST_MODEL="$MODEL" CLIPQC_TEST_FIXTURES="$FIXTURES"
  # The criterion benchmarks' smoke run uses the tiny model and the bench images
  # (scripts/bench.sh runs them for figures, on ViT-B/32).
  python benches/make_images.py --out "$ROOT/target/bench-images" >&2
  export CLIPQC_BENCH_MODEL="$MODEL" CLIPQC_BENCH_IMAGES="$ROOT/target/bench-images"
}

# The reference outputs of the fidelity tests (transformers, open_clip, SAM), computed once per
# model and reference code into the cache, as the models are, and copied into the checkout.
ensure_fixtures() {
  local stamp cached
  stamp="$(cat "$MODEL/.stamp" "$MODEL/sam/.stamp" tests/reference/*.py tests/reference/anomalib.txt deploy/samples/*.py | sha256sum | cut -c1-16)"
  [ "$(cat "$FIXTURES/.stamp" 2>/dev/null)" = "$stamp" ] && return 0
  cached="$CACHE/fixtures/$stamp"
  if [ ! -f "$cached/.stamp" ]; then
    echo "==> computing reference outputs (transformers, open_clip) into $cached" >&2
    rm -rf "$cached"
    mkdir -p "$CACHE/fixtures"
    # anomalib's wheel alone (its WinCLIP aggregation imports only torch), beside the cache.
    local anomalib="$CACHE/anomalib-$(sha256sum tests/reference/anomalib.txt | cut -c1-12)"
    if [ ! -d "$anomalib/anomalib" ]; then
      rm -rf "$anomalib.part"
      pip install --quiet --no-deps --require-hashes --target "$anomalib.part" -r tests/reference/anomalib.txt
      mv "$anomalib.part" "$anomalib"
    fi
    python tests/reference/make_fixtures.py --model "$MODEL" --sam "$MODEL/sam" --anomalib "$anomalib" \
      --out "$cached.part"
    echo "$stamp" >"$cached.part/.stamp"
    mv "$cached.part" "$cached"
  fi
  rm -rf "$FIXTURES"
  mkdir -p "$(dirname "$FIXTURES")"
  cp -r "$cached" "$FIXTURES"
}

# Debian's Prometheus and Alertmanager for tests/it/ops_stack.rs, when missing.
ensure_prometheus() {
  command -v prometheus >/dev/null && command -v alertmanager >/dev/null && return 0
  echo "==> installing prometheus, prometheus-alertmanager (apt)" >&2
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -qq --no-install-recommends prometheus prometheus-alertmanager >/dev/null 2>&1 ||
    { $sudo apt-get update -qq >/dev/null &&
      $sudo apt-get install -y -qq --no-install-recommends prometheus prometheus-alertmanager >/dev/null; }
}

# Every Rust test, in the passes CI runs; extra arguments go to each `cargo test`.
#
# One integration-test binary (tests/it). `--include-ignored`: the tests a plain `cargo test`
# leaves out because they compare with Python or need the programs prepared above; not the
# `measure_*` measurements. The suites that start a broker or Prometheus run by themselves
# afterwards, so they never share the 2 cores with the in-process suites. --nocapture: the
# fidelity tests print the measured differences.
#
# CLIPQC_BESIDE_TESTS: a command run in the background, at the lowest CPU priority, from when
# the tests are built to the end of the passes (the suites spend much of their time waiting: on
# timers, rebalances, session timeouts); the passes wait for it and fail when it failed.
# test.sh builds the fuzz targets so.
rust_passes() {
  # Built first, so what runs beside takes only the cycles the tests leave idle.
  cargo test --workspace --lib --bins --tests --bench '*' --no-run "$@"
  local beside=""
  if [ -n "${CLIPQC_BESIDE_TESTS:-}" ]; then
    nice -n 19 bash -c "$CLIPQC_BESIDE_TESTS" &
    beside=$!
  fi
  local rc=0
  {
    cargo test --workspace --lib --bins --tests "$@" -- --nocapture --include-ignored \
      --skip measure_ --skip e2e_kafka:: --skip ops_stack:: &&
      cargo test --workspace --test it "$@" -- --nocapture --include-ignored --skip measure_ e2e_kafka:: &&
      cargo test --workspace --test it "$@" -- --nocapture --include-ignored --skip measure_ ops_stack:: &&
      # Each criterion benchmark once, as a smoke test (`--bench '*'`: the bench targets only;
      # with `--benches` cargo would run the library's unit tests a second time).
      cargo test --workspace --bench '*' "$@"
  } || rc=$?
  if [ -n "$beside" ]; then
    wait "$beside" || { echo "the command run beside the tests failed: $CLIPQC_BESIDE_TESTS" >&2; rc=1; }
  fi
  return "$rc"
}
