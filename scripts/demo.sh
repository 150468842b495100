#!/usr/bin/env bash
# The main job on an embedded default: set up, export the random tiny model (or use
# --model DIR), start `clipqc run` with its embedded in-process broker, publish generated
# sample part images as inspection requests, print the verdicts, stop the worker.
set -euo pipefail
started=$SECONDS
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
  echo "==> random tiny model: the classes it picks are meaningless; export a real one (docs/model.md) for real verdicts" >&2
fi
# The dev profile optimises dependencies (Cargo.toml) and shares its build with the tests.
cargo build --quiet --bin clipqc
SAMPLES="$ROOT/target/samples"
python deploy/samples/make_samples.py --out "$SAMPLES" --count 12 >&2

LOG="$ROOT/target/demo-worker.log"
echo "==> starting clipqc run (log: $LOG)" >&2
CLIPQC__KAFKA__VERDICT_ENCODING=json CLIPQC__FETCH__FILE_ROOTS="$SAMPLES" \
  "$ROOT/target/debug/clipqc" run --model "$MODEL" 2>"$LOG" &
WORKER=$!
trap 'kill -TERM $WORKER 2>/dev/null || true' EXIT
BROKERS=""
for _ in $(seq 1 120); do
  BROKERS="$(sed -n 's/.*embedded broker for trying out at \([^ ]*\) .*/\1/p' "$LOG" | head -1)"
  [ -n "$BROKERS" ] && grep -q "consuming" "$LOG" && break
  kill -0 $WORKER 2>/dev/null || { cat "$LOG" >&2; exit 1; }
  sleep 0.5
done
[ -n "$BROKERS" ] || { echo "the worker did not start; see $LOG" >&2; exit 1; }
echo "==> embedded broker at $BROKERS; publishing $(ls "$SAMPLES"/*.jpg | wc -l) requests" >&2
python deploy/samples/demo_client.py --brokers "$BROKERS" "$SAMPLES"/*.jpg
kill -TERM $WORKER
wait $WORKER
trap - EXIT
echo "==> worker drained and stopped" >&2
elapsed=$((SECONDS - started))
echo "==> demo done in $((elapsed / 60)) min $((elapsed % 60)) s (set-up and build included; a second run reuses them)" >&2
