#!/usr/bin/env bash
# The benchmarks (issue 5), one command each. Figures go to target/bench-results/ and the table
# to the terminal. Ratios are measured within one run on one machine; never compare figures
# from different machines.
#
#   scripts/bench.sh micro       criterion micro-benchmarks (preprocessing of the three bench
#                                images, tokenization, scoring), one core, next to CLIPProcessor
#                                on the same files and one core (benches/baseline.py preprocess)
#   scripts/bench.sh e2e [N]     `clipqc bench`: N requests (default 600) through the embedded
#                                broker into verdicts on the random ViT-B/32, CPU, next to the
#                                model-only ceiling (same run) and the Python per-image loop
#   scripts/bench.sh tiled [N]   `clipqc bench` of a tiled profile (windows at scales 1 and 0.5,
#                                25 views per 1920×1080 frame): N requests (default 40) of the
#                                1080p JPEG; windows/s next to images/s and to the ceiling
#   scripts/bench.sh sustained [SECONDS] [RATE]
#                                a sustained run (default 600 s at 80 % of the CPU ceiling):
#                                RSS at the first minute and at the end
#   benches/gpu.sh               the GPU machine's script (see its header; no Rust there)
#
# Exit status 1 when a target the command checks is missed (everything is printed first).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"

MODEL="$ROOT/target/models/vit-b-32"
IMAGES="$ROOT/target/bench-images"
OUT="$ROOT/target/bench-results"
mkdir -p "$OUT"
ensure_model vit-b-32 "$MODEL"
python benches/make_images.py --out "$IMAGES" >&2

# `cargo bench` builds the binary too (into target/release, bench profile = release): one
# build for every command here. (`cargo build --release` would resolve the dev-dependencies'
# features differently and compile everything a second time.)
clipqc_release() {
  cargo bench --bench stages --no-run >&2
  echo "$ROOT/target/release/clipqc"
}

case "${1:-}" in
  micro)
    export CLIPQC_BENCH_MODEL="$MODEL" CLIPQC_BENCH_IMAGES="$IMAGES"
    cargo bench --bench stages
    python benches/baseline.py preprocess --model "$MODEL" --images "$IMAGES" --json \
      >"$OUT/baseline-preprocess.json"
    python benches/summary.py micro "$ROOT/target/criterion" "$OUT/baseline-preprocess.json" \
      | tee "$OUT/micro.txt"
    ;;
  e2e)
    n="${2:-600}"
    bin="$(clipqc_release)"
    "$bin" bench --model "$MODEL" --device cpu --image "$IMAGES/part_250.jpg" \
      --requests "$n" --json >"$OUT/clipqc-e2e-cpu.json"
    python benches/baseline.py e2e --model "$MODEL" --image "$IMAGES/part_250.jpg" --n 100 \
      --device cpu --json >"$OUT/baseline-e2e-cpu.json"
    python benches/summary.py e2e "$OUT/clipqc-e2e-cpu.json" "$OUT/baseline-e2e-cpu.json" \
      | tee "$OUT/e2e.txt"
    ;;
  tiled)
    n="${2:-40}"
    bin="$(clipqc_release)"
    cat >"$OUT/tiled.toml" <<'TOML'
[profiles.tiled]
tiles = { scales = [1.0, 0.5], overlap = 0.5, max_windows = 32 }
[[profiles.tiled.classes]]
name = "scratch"
prompts = ["a surface scratch"]
defect = true
[[profiles.tiled.classes]]
name = "good"
prompts = ["a clean part"]
TOML
    "$bin" bench --model "$MODEL" --device cpu --config "$OUT/tiled.toml" --profile tiled \
      --image "$IMAGES/part_1920x1080.jpg" --requests "$n" --json >"$OUT/clipqc-tiled-cpu.json"
    python - "$OUT/clipqc-tiled-cpu.json" <<'PY' | tee "$OUT/tiled.txt"
import json, sys
r = json.load(open(sys.argv[1]))
ratio = r["ratio_to_ceiling"]
met = ratio >= 0.9
print(f"tiled ({r['views_per_image']} views per 1920x1080 frame): {r['images_per_s']:.2f} images/s, "
      f"{r['windows_per_s']:.1f} windows/s; model-only ceiling {r['ceiling']['images_per_s']:.1f} views/s; "
      f"{ratio * 100:.1f} % of the ceiling in windows (target >= 90 %: {'met' if met else 'MISSED'}); "
      f"mean batch {r['batch']['mean_size']:.1f}; {r['received']}/{r['requests']} verdicts")
sys.exit(0 if met else 1)
PY
    ;;
  sustained)
    seconds="${2:-600}"
    bin="$(clipqc_release)"
    rate="${3:-}"
    if [ -z "$rate" ]; then
      # 80 % of what this machine's model alone does: a load it can keep up with.
      "$bin" bench --model "$MODEL" --device cpu --image "$IMAGES/part_250.jpg" \
        --requests 64 --json >"$OUT/ceiling-probe.json"
      rate="$(python -c 'import json,sys; print(round(0.8*json.load(open(sys.argv[1]))["ceiling"]["images_per_s"],1))' "$OUT/ceiling-probe.json")"
    fi
    "$bin" bench --model "$MODEL" --device cpu --image "$IMAGES/part_250.jpg" \
      --rate "$rate" --duration "$seconds" --json >"$OUT/sustained-cpu.json"
    python - "$OUT/sustained-cpu.json" <<'PY' | tee "$OUT/sustained.txt"
import json, sys
r = json.load(open(sys.argv[1]))
m = r["memory"]
mib = lambda b: f"{b / 2**20:.0f} MiB" if b else "-"
change = m["rss_change_pct"]
met = change is not None and abs(change) <= 5
print(f"sustained {r['seconds']:.0f} s at {r['rate']}/s: {r['received']}/{r['requests']} verdicts; "
      f"RSS at 60 s {mib(m['rss_at_60s_bytes'])}, at end {mib(m['rss_end_bytes'])}, "
      f"change {change:+.1f} % (target within ±5 %: {'met' if met else 'MISSED'}); "
      f"p99 {r['latency_ms']['p99']:.0f} ms")
sys.exit(0 if met else 1)
PY
    ;;
  *)
    sed -n '2,16p' "$0" >&2
    exit 2
    ;;
esac
