#!/usr/bin/env bash
# Coverage-guided fuzzing of the worker's input handling: libFuzzer through cargo-fuzz, on the
# stable toolchain (`--sanitizer none`: sanitizers need nightly; Rust's own checks, overflow
# checks and debug assertions included, catch what they catch, and any panic is a crash).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#   scripts/fuzz.sh --build-only
#
# Runs each target (default: request, preprocess, config; see fuzz/src/) for SECONDS (default
# 30), starting from the checked-in seeds (fuzz/seeds/TARGET) and the corpus earlier runs grew
# (fuzz/corpus-local/TARGET, not checked in). Fails on the first crash, timeout or out-of-memory
# input, printing where the input was saved (fuzz/artifacts/TARGET/) and how to replay it.
# cargo-fuzz is installed once into ~/.cache/clipqc, and the instrumented build is kept there
# too (fuzz-target), apart from the worker's.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"

build_only=false
if [ "${1:-}" = --build-only ]; then
  build_only=true
  shift
fi
seconds="${1:-30}"
[ $# -gt 0 ] && shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(request preprocess config)

tools="$(ensure_cargo_tool cargo-fuzz 0.13.2 "a minute")"
export PATH="$tools:$PATH"

# The instrumented build compiles the whole dependency tree again (15 to 21 minutes from nothing
# on this 2-core machine under other work, 3.4 GB), so it is kept in the cache: CI pays
# it once per machine and dependency set, and later runs rebuild only the worker and the targets
# (about 5 minutes). A new toolchain or dependency set starts it afresh, since cargo never
# removes what it stopped using. CLIPQC_FUZZ_TARGET_DIR names another folder, used as it is. (Not
# CARGO_TARGET_DIR, which CI sets for the worker's build: the instrumented flags would rebuild
# every dependency there, back and forth.)
if [ -n "${CLIPQC_FUZZ_TARGET_DIR:-}" ]; then
  export CARGO_TARGET_DIR="$CLIPQC_FUZZ_TARGET_DIR"
else
  export CARGO_TARGET_DIR="$CACHE/fuzz-target"
  stamp="$( (rustc -vV; cat "$ROOT/Cargo.lock" "$ROOT/fuzz/Cargo.toml") | sha256sum | cut -c1-16)"
  if [ "$(cat "$CARGO_TARGET_DIR/.stamp" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$CARGO_TARGET_DIR"
    mkdir -p "$CARGO_TARGET_DIR"
    echo "$stamp" >"$CARGO_TARGET_DIR/.stamp"
  fi
fi
target="$CARGO_TARGET_DIR"

# Release build with debug assertions and overflow checks (the worker's tests run debug builds,
# where an overflow panics; here it must too).
flags=(--sanitizer none --debug-assertions)
echo "==> building the fuzz targets (instrumented, into $target)" >&2
cargo fuzz build "${flags[@]}" >&2
if $build_only; then
  exit 0
fi

dicts="$target/dicts"
python "$ROOT/fuzz/make_dicts.py" "$dicts"

bin="$target/$(rustc -vV | sed -n 's/^host: //p')/release"
for t in "${targets[@]}"; do
  corpus="$ROOT/fuzz/corpus-local/$t"
  artifacts="$ROOT/fuzz/artifacts/$t"
  mkdir -p "$corpus" "$artifacts"
  echo "==> fuzzing $t for ${seconds}s" >&2
  # The binary itself rather than `cargo fuzz run`, which would rebuild first whenever a
  # source changed since the build above.
  # -timeout: one input taking this long is a hang (a crash); -rss_limit_mb: the process
  # growing past this is a leak or a bomb. New inputs go to the first corpus directory.
  if ! "$bin/$t" "$corpus" "$ROOT/fuzz/seeds/$t" \
      -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 \
      -dict="$dicts/$t.dict" -artifact_prefix="$artifacts/" -print_final_stats=1 >&2; then
    echo "fuzz target $t failed; inputs saved:" >&2
    ls -1t "$artifacts"/* 2>/dev/null | head -5 | sed 's/^/  /' >&2
    echo "replay one (a single run, with the panic's message; RUST_BACKTRACE=1 for the stack):" >&2
    echo "  source scripts/env.sh && $bin/$t INPUT" >&2
    exit 1
  fi
done
echo "==> fuzzing passed: ${targets[*]}, ${seconds}s each" >&2
