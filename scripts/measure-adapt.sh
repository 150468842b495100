#!/usr/bin/env bash
# The learning figures of the sample dataset, on Apache Kafka (scripts/kafka.sh):
#   - held-out image AUROC and F1-max of the default profile zero-shot, with exemplars in the
#     bank, and with the adapter `clipqc adapt` trains on them;
#   - the CPU time of `clipqc adapt` (user + system, /usr/bin/time) and its training time, for
#     banks of 50, 200 and 1,000 exemplars.
#
#   scripts/measure-adapt.sh MODEL_DIR OUT_DIR [CLIPQC_BINARY]
#
# The exemplars are the labelled sample set of seed 1 (deploy/samples/make_samples.py, 250
# images per kind, taken round-robin over the kinds so every bank is balanced); the held-out
# set is seed 2's (25 per kind). Everything runs on the CPU. Writes OUT_DIR/summary.md.
set -euo pipefail
source "$(dirname "$0")/env.sh"
set +u
MODEL="$(realpath "$1")"
OUT="$(realpath -m "$2")"
BIN="${3:-target/release/clipqc}"
set -u
mkdir -p "$OUT"
python deploy/samples/make_samples.py --labelled --count 250 --seed 1 --out "$OUT/train" >/dev/null
python deploy/samples/make_samples.py --labelled --count 25 --seed 2 --out "$OUT/holdout" >/dev/null
rm -rf "$OUT/kafka"
BROKER="$(scripts/kafka.sh start "$OUT/kafka")"
trap 'scripts/kafka.sh stop "$OUT/kafka" >/dev/null 2>&1 || true' EXIT
for t in clipqc.exemplars clipqc.adapters; do
  scripts/kafka.sh tool "$OUT/kafka" topics --create --topic "$t" --partitions 1 \
    --config cleanup.policy=compact >/dev/null
done
cat >"$OUT/clipqc.toml" <<EOF
[kafka]
brokers = "$BROKER"
[model]
dir = "$MODEL"
device = "cpu"
EOF
CFG="$OUT/clipqc.toml"
kinds=(good_part surface_scratch paint_spot edge_chip)
# Round-robin over the kinds: image i of the list is kind i % 4, number i / 4.
image() { local i=$1 k=${kinds[$(($1 % 4))]}; ls "$OUT/train/$k" | sort | sed -n "$(($i / 4 + 1))p" | sed "s|^|$OUT/train/$k/|"; }
kind() { echo "${kinds[$(($1 % 4))]}"; }

zero=$("$BIN" eval --config "$CFG" --zero-shot --normal good_part --json "$OUT/holdout" 2>/dev/null |
  python -c 'import json,sys; m=json.load(sys.stdin); print(m["auroc"], m["f1_max"])')
echo "zero-shot: AUROC F1-max = $zero" >&2

{
  echo "| exemplars | zero-shot AUROC / F1-max | exemplars AUROC / F1-max | adapted AUROC / F1-max | adapt CPU s (user+sys) | wall s | training s |"
  echo "|---|---|---|---|---|---|---|"
} >"$OUT/summary.md"
added=0
for tier in 50 200 1000; do
  for kind in "${kinds[@]}"; do
    files=()
    for ((i = added; i < tier; i++)); do
      [ "$(kind $i)" = "$kind" ] && files+=("$(image $i)")
    done
    [ ${#files[@]} -gt 0 ] && "$BIN" exemplar add --config "$CFG" --profile default --class "$kind" "${files[@]}" >/dev/null 2>&1
  done
  added=$tier
  /usr/bin/time -f "%U %S %e" -o "$OUT/time-$tier" "$BIN" adapt --config "$CFG" --holdout "$OUT/holdout" \
    --normal good_part --seed 1 --out "$OUT/adapt-$tier" >"$OUT/adapt-$tier.txt" 2>"$OUT/adapt-$tier.err" || true
  python - "$OUT" "$tier" "$zero" >>"$OUT/summary.md" <<'PY'
import json, sys
out, tier, zero = sys.argv[1], sys.argv[2], sys.argv[3].split()
r = json.load(open(f"{out}/adapt-{tier}/adapt.json"))
user, sys_, wall = open(f"{out}/time-{tier}").read().split()[-3:]
f = lambda x: f"{x['auroc']:.4f} / {x['f1_max']:.4f}"
print(f"| {r['exemplars']} | {float(zero[0]):.4f} / {float(zero[1]):.4f} | {f(r['current'])} | {f(r['challenger'])} "
      f"| {float(user) + float(sys_):.1f} | {float(wall):.1f} | {r['train_seconds']:.2f} |")
PY
  tail -1 "$OUT/summary.md" >&2
done
cat "$OUT/summary.md"
