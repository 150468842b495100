#!/usr/bin/env bash
# The main job on an embedded default: set up, export the random tiny model (or use --model
# DIR), generate sample part images and classify them.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"

MODEL=""
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL="$2"; shift 2 ;;
    *) echo "usage: scripts/demo.sh [--model DIR]" >&2; exit 2 ;;
  esac
done
if [ -z "$MODEL" ]; then
  MODEL="$ROOT/target/models/tiny"
  ensure_model tiny "$MODEL"
  echo "==> random tiny model: the classes it picks are meaningless; export a real one (README) for real verdicts" >&2
fi
# The dev profile optimises dependencies (Cargo.toml) and shares its build with the tests.
cargo build --quiet --bin clipqc
SAMPLES="$ROOT/target/samples"
python deploy/samples/make_samples.py --out "$SAMPLES" --count 8 >&2
echo "==> clipqc classify --model $MODEL $SAMPLES/*.jpg" >&2
exec "$ROOT/target/debug/clipqc" classify --model "$MODEL" "$SAMPLES"/*.jpg
