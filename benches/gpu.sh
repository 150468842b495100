#!/usr/bin/env bash
# clipqc against the usual Python script on a GPU machine (issue 5), from a bundle made by
# benches/gpu-bundle.sh. The machine needs Python with torch (2.11.0, CUDA build) and, as the
# GPU image has them, numpy, Pillow and torchvision; it needs no Rust and no network.
#
#   gpu.sh [--device cuda|cpu] [--quick] [--python PY] [--image NAME] [--work DIR]
#
#   --device   cuda (default) or cpu (a smoke run anywhere)
#   --quick    the tiny model and a handful of requests: checks the plumbing in a minute
#   --python   the interpreter holding torch (default: searched, see find_python)
#   --image    bench image: part_250.jpg (default: the target is on 250×250 JPEGs), part_1920x1080.jpg
#   --work     scratch folder for the installed wheels, the exported model and the images
#              (default /tmp/clipqc-gpu; reused by a later run on the same machine)
#
# Steps, each time-boxed so the whole run stays under 8 minutes: install the carried wheels
# into WORK/pylib (PYTHONPATH; torch stays the machine's), export the random ViT-B/32
# (export.py --random vit-b-32), make the bench images, run the baseline (preprocess on one
# core, then e2e: one image per forward pass), run `clipqc bench` at the maximum rate (it
# measures the model-only ceiling in the same run), compare host and device preprocessing
# (issue 16: `--preprocess-device cpu` against `cuda` on 250x250, 1080p and 5 MP JPEGs, and on the
# tiled profile: images/s, windows/s, the ceiling and CPU cores used per GPU), run it again at
# half the rate it reached, measure SAM's cost per DEFECT verdict (issue 15, with the time
# left), print the tables. Results (JSON, and gpu.log) go to $OUT when set,
# else ./gpu-results. Every step's time box is cut to what is left of DEADLINE_S (450 s), and a
# step with under 15 s left is skipped, so the whole run stays within 8 minutes.
#
# With the device tool: bundle under an ignored path, carry it, e.g.
#   benches/gpu-bundle.sh target/gpu-bundle
#   run(command="bash target/gpu-bundle/gpu.sh", carry=["target/gpu-bundle"], timeout_s=540)
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEVICE=cuda
QUICK=0
PY="${PYTHON:-}"
IMAGE_NAME=part_250.jpg
WORK="${CLIPQC_GPU_WORK:-/tmp/clipqc-gpu}"
RES="${OUT:-$PWD/gpu-results}"
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift ;;
    --quick) QUICK=1 ;;
    --python) PY="$2"; shift ;;
    --image) IMAGE_NAME="$2"; shift ;;
    --work) WORK="$2"; shift ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1 (--help)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$RES" "$WORK"
RES="$(cd "$RES" && pwd)"
WORK="$(cd "$WORK" && pwd)"

if [ "$QUICK" = 1 ]; then
  PRESET=tiny; BASE_N=10; CLIPQC_N=40; PRE_REPEAT=2
  T_INSTALL=60; T_EXPORT=120; T_IMAGES=60; T_PRE=60; T_BASE=120; T_MAX=120; T_HALF=120
  TILED_N=8; T_TILED=120
  PREP_N=(20 10 6); T_PREP_RUN=60
  SAM_PRESET=tiny; SEG_N=8; T_SAM_EXPORT=60; T_SEG=60
else
  # Caps add up to 510 s; a normal run takes far less (the export and the two benches dominate).
  PRESET=vit-b-32; BASE_N=500; CLIPQC_N=4000; PRE_REPEAT=10
  T_INSTALL=40; T_EXPORT=110; T_IMAGES=30; T_PRE=30; T_BASE=90; T_MAX=90; T_HALF=60
  TILED_N=800; T_TILED=60
  # Device vs host preprocessing, per image (250x250, 1080p, 5 MP): about 10 s of requests each.
  PREP_N=(3000 1500 600); T_PREP_RUN=30
  # Issue 15, last and only with the time left: the random ViT-B-shaped SAM, 1080p DEFECTs.
  SAM_PRESET=vit-b; SEG_N=200; T_SAM_EXPORT=60; T_SEG=40
fi
BASE_MAX_S=$((T_BASE * 2 / 3))  # the baseline stops timing here and reports what it did
DEADLINE_S=450  # 7.5 minutes: every time box is cut to what is left of it

note() { printf '==> [%3ss] %s\n' "$SECONDS" "$*"; }
warn() { printf '!!! %s\n' "$*"; }

# The interpreter that holds torch: --python/$PYTHON, else the first that imports torch among
# python3 on PATH and the usual places (the GPU image's is /opt/torch/.venv/bin/python3),
# preferring torch 2.11.0 that sees a GPU when --device cuda.
find_python() {
  local c info best="" best_score=-1 score
  local -a cands=()
  [ -n "$PY" ] && cands+=("$PY")
  cands+=("$(command -v python3 2>/dev/null)" "$(command -v python 2>/dev/null)" /opt/torch/.venv/bin/python3
          /opt/conda/bin/python3 /opt/*/.venv/bin/python3 /opt/*/bin/python3 /root/.venv/bin/python3
          /venv/bin/python3 /workspace/.venv/bin/python3 /usr/local/bin/python3 /usr/bin/python3)
  note "looking for a Python with torch"
  local seen=" "
  for c in "${cands[@]}"; do
    [ -n "$c" ] && [ -x "$c" ] || continue
    # (no readlink -f: a venv's python is a link to the system one and would lose the venv)
    case "$seen" in *" $c "*) continue ;; esac
    seen="$seen$c "
    info="$("$c" -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())' 2>/dev/null)" ||
      { echo "    $c: no torch"; continue; }
    echo "    $c: python/torch/cuda = $info"
    score=1
    case "$info" in *" 2.11.0"*) score=$((score + 2)) ;; esac
    case "$info" in *True) [ "$DEVICE" = cpu ] || score=$((score + 4)) ;; esac
    [ -n "$PY" ] && [ "$c" = "$PY" ] && score=100
    if [ "$score" -gt "$best_score" ]; then best="$c"; best_score="$score"; fi
    [ "$score" -ge 7 ] && break  # torch 2.11.0 that sees the GPU (or asked for by name): done
  done
  PY="$best"
}

# The carried wheels into WORK/pylib-X.Y, with pip (no index, no dependencies: each one is
# named in requirements.txt) or, where that Python has no pip, by unpacking the wheels.
install_wheels() {
  local pyv stamp lib
  pyv="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
  lib="$WORK/pylib-$pyv"
  stamp="$(cat "$HERE/wheels/requirements.txt" | sha256sum | cut -c1-16)-$PY"
  if [ "$(cat "$lib/.stamp" 2>/dev/null)" = "$stamp" ]; then
    note "wheels already installed in $lib"
  else
    rm -rf "$lib"
    note "installing the carried wheels into $lib (Python $pyv)"
    local pipargs=(install --quiet --disable-pip-version-check --no-index --no-deps --no-compile
                   --find-links "$HERE/wheels" --target "$lib")
    if "$PY" -m pip --version >/dev/null 2>&1; then
      if ! timeout "$T_INSTALL" "$PY" -m pip "${pipargs[@]}" -r "$HERE/wheels/requirements.txt"; then
        warn "pip could not install them all at once; one by one:"
        while read -r line; do
          [ -n "$line" ] || continue
          timeout "$T_INSTALL" "$PY" -m pip "${pipargs[@]}" "$line" >/dev/null 2>&1 ||
            warn "  no carried wheel fits for '$line': the machine's own package is used, if any"
        done <"$HERE/wheels/requirements.txt"
      fi
    else
      warn "$PY has no pip: unpacking the wheels"
      "$PY" - "$HERE/wheels" "$lib" <<'EOF' || warn "unpacking failed"
import re, sys, zipfile
from pathlib import Path
wheels, lib = Path(sys.argv[1]), Path(sys.argv[2])
v = sys.version_info
def fits(tags):
    py, abi, plat = tags
    if plat != "any" and "x86_64" not in plat: return False
    for t in py.split("."):
        if t in ("py3", f"py3{v[1]}", f"cp3{v[1]}"): return abi in ("none", "abi3", f"cp3{v[1]}")
        m = re.fullmatch(r"cp3(\d+)", t)
        if m and abi == "abi3" and int(m.group(1)) <= v[1]: return True
    return False
for line in (wheels / "requirements.txt").read_text().splitlines():
    spec, _, marker = line.partition(";")
    if "python_version < \"3.11\"" in marker and v >= (3, 11): continue
    name, ver = spec.strip().split("==")
    norm = re.sub(r"[-_.]+", "_", name).lower()
    for w in sorted(wheels.glob("*.whl")):
        parts = w.name[:-4].split("-")
        if re.sub(r"[-_.]+", "_", parts[0]).lower() == norm and parts[1] == ver and fits(parts[-3:]):
            zipfile.ZipFile(w).extractall(lib); break
    else:
        print(f"!!! no carried wheel fits for {spec}", file=sys.stderr)
EOF
    fi
    echo "$stamp" >"$lib/.stamp"
  fi
  export PYTHONPATH="$lib" PYTHONNOUSERSITE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
  note "modules and where they come from (bundle = $lib):"
  "$PY" - "$lib" <<'EOF'
import importlib, importlib.metadata as md, importlib.util, sys
lib = sys.argv[1]
bad = []
for mod, dist, need_bundle in [("transformers", "transformers", True), ("huggingface_hub", "huggingface-hub", True),
                               ("tokenizers", "tokenizers", False), ("safetensors", "safetensors", False),
                               ("regex", "regex", False), ("yaml", "pyyaml", False), ("numpy", "numpy", False),
                               ("PIL", "pillow", False), ("torch", "torch", False), ("torchvision", "torchvision", False),
                               ("open_clip", "open_clip_torch", True)]:
    spec = importlib.util.find_spec(mod)  # finds, does not import (open_clip would pull in timm)
    if spec is None:
        print(f"    {mod:<16} MISSING"); bad.append(mod); continue
    where = spec.origin or (list(spec.submodule_search_locations or []) or ["?"])[0]
    src = "bundle" if where.startswith(lib) else "machine"
    try:
        ver = md.version(dist)
    except md.PackageNotFoundError:
        ver = "?"
    print(f"    {mod:<16} {ver:<14} {src:<8} {where}")
    if need_bundle and src != "bundle":
        bad.append(f"{mod} (not from the bundle)")
if bad:
    print(f"!!! {', '.join(bad)}")
    sys.exit(1)
EOF
}

# Results of a step: JSON on stdout into a file, the table and logs on stderr into the log.
run_step() { # name timeout outfile cmd...
  local name="$1" t="$2" out="$3"; shift 3
  local left=$((DEADLINE_S - SECONDS))
  if [ "$left" -lt 15 ]; then
    warn "$name: skipped (${left}s left of the ${DEADLINE_S}s deadline)"
    return 1
  fi
  [ "$t" -le "$left" ] || t="$left"
  note "$name (time box ${t}s)"
  local rc=0
  timeout --kill-after=10 "$t" "$@" >"$out.tmp" || rc=$?
  if [ "$rc" -eq 0 ] && [ -s "$out.tmp" ]; then mv "$out.tmp" "$out"; return 0; fi
  [ "$rc" -eq 124 ] && warn "$name: ran past its ${t}s time box" || warn "$name: failed (exit $rc)"
  rm -f "$out.tmp"
  return 1
}

# Issue 16: the same bench with host (CPU) and device (nvJPEG + tensor ops) preprocessing, on
# three JPEG sizes and the tiled profile. The device path needs torchvision's operator library
# for this torch: the machine's torchvision 0.26 when it has one, else the bundle's copy
# (tv/torchvision-ops.tar.gz); and the libpython it links (a shared build of the machine's
# Python). Both are named in a config file, so nothing is guessed from paths.
compare_preprocessing() { # bin model images
  local bin="$1" model="$2" images="$3" tv pylib
  if [ "$DEVICE" != cuda ]; then
    warn "device preprocessing needs --device cuda: host vs device comparison skipped"
    return 0
  fi
  tv="$("$PY" -c 'import os, torchvision
assert torchvision.__version__.startswith("0.26"), torchvision.__version__
print(os.path.join(os.path.dirname(torchvision.__file__), "image.so"))' 2>/dev/null)" || tv=""
  if [ -z "$tv" ] || [ ! -f "$tv" ]; then
    if [ -f "$HERE/tv/torchvision-ops.tar.gz" ]; then
      mkdir -p "$WORK/tv" && tar xzf "$HERE/tv/torchvision-ops.tar.gz" -C "$WORK/tv"
      tv="$WORK/tv/torchvision/image.so"
      note "no torchvision 0.26 here: the bundle's operator library $tv"
    else
      warn "no torchvision 0.26 and none in the bundle: device preprocessing skipped"
      return 0
    fi
  fi
  pylib="$("$PY" -c 'import os, sysconfig
d = sysconfig.get_config_var("LIBDIR") or ""
for n in (sysconfig.get_config_var("INSTSONAME"), sysconfig.get_config_var("LDLIBRARY")):
    if n and ".so" in n and os.path.exists(os.path.join(d, n)):
        print(os.path.join(d, n)); break')"
  [ -n "$pylib" ] || warn "no shared libpython for $PY (a static build?): the device path will name what is missing"
  note "device preprocessing: operators $tv, libpython ${pylib:-?}"
  {
    echo "[preprocess]"
    echo "device_ops_library = \"$tv\""
    [ -z "$pylib" ] || echo "device_python_library = \"$pylib\""
  } >"$WORK/prep.toml"
  # The tiled profile with the same settings, for windows/s on both paths.
  cat "$WORK/prep.toml" "$WORK/tiled-profile.toml" >"$WORK/prep-tiled.toml"
  local i=0 name stem pd
  for name in part_250.jpg part_1920x1080.jpg part_2592x1944.jpg; do
    stem="${name%.jpg}"
    for pd in cpu cuda; do
      run_step "clipqc bench, $name, preprocessing on $pd, ${PREP_N[$i]} requests" "$T_PREP_RUN" \
        "$RES/prep-$pd-$stem.json" \
        "$bin" bench --model "$model" --device cuda --preprocess-device "$pd" --config "$WORK/prep.toml" \
        --requests "${PREP_N[$i]}" --image "$images/$name" --json
    done
    i=$((i + 1))
  done
  for pd in cpu cuda; do
    run_step "clipqc bench, tiled 1080p, preprocessing on $pd, $TILED_N requests" "$T_TILED" \
      "$RES/prep-$pd-tiled.json" \
      "$bin" bench --model "$model" --device cuda --preprocess-device "$pd" --config "$WORK/prep-tiled.toml" \
      --profile tiled --requests "$TILED_N" --image "$images/part_1920x1080.jpg" --json
  done
}

# Issue 15: what outlining a DEFECT with SAM costs next to classifying it. The same 1080p
# requests through a profile that always says DEFECT (two defect classes), without and with
# `segment = true` (SAM's encoder in fp16 on CUDA; a queue long enough that no verdict skips
# its mask): images/s of each, so SAM's cost per verdict is 1/images_per_s(segment) against
# 1/images_per_s(classify).
segment_cost() { # bin model images
  local bin="$1" model="$2" images="$3" sam="$WORK/sam-$SAM_PRESET" stamp seg
  stamp="$(cat "$HERE/model/export.py" "$HERE/model/sam_export.py" "$HERE/wheels/requirements.txt" | sha256sum | cut -c1-16)-$SAM_PRESET"
  if [ "$(cat "$sam/.stamp" 2>/dev/null)" != "$stamp" ]; then
    local left=$((DEADLINE_S - SECONDS)) t="$T_SAM_EXPORT"
    [ "$left" -ge 30 ] || { warn "SAM export: skipped (${left}s left)"; return 0; }
    [ "$t" -le "$left" ] || t="$left"
    rm -rf "$sam"
    note "exporting the random $SAM_PRESET SAM to $sam (time box ${t}s)"
    timeout "$t" "$PY" "$HERE/model/export.py" --random-sam "$SAM_PRESET" --out "$sam" ||
      { warn "SAM export failed or ran out of time: segmentation cost skipped"; return 0; }
    echo "$stamp" >"$sam/.stamp"
  fi
  for seg in false true; do
    cat >"$WORK/segment-$seg.toml" <<TOML
[model]
sam_dir = "$sam"
sam_queue = 100000

[profiles.seg]
segment = $seg
[[profiles.seg.classes]]
name = "dent"
prompts = ["a dent"]
defect = true
[[profiles.seg.classes]]
name = "scratch"
prompts = ["a scratch"]
defect = true
TOML
    run_step "clipqc bench on $DEVICE, 1080p DEFECTs, segment = $seg, $SEG_N requests" "$T_SEG" \
      "$RES/segment-$seg.json" \
      "$bin" bench --model "$model" --device "$DEVICE" --config "$WORK/segment-$seg.toml" \
      --profile seg --requests "$SEG_N" --image "$images/part_1920x1080.jpg" --json
  done
}

main() {
  note "clipqc GPU bench: device $DEVICE, $( [ "$QUICK" = 1 ] && echo quick || echo full ) run, work $WORK, results $RES"
  [ -f "$HERE/MANIFEST.txt" ] && head -3 "$HERE/MANIFEST.txt" | sed 's/^/    /'
  command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | sed 's/^/    /'
  echo "    $(nproc) CPUs, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) memory, $(ldd --version 2>/dev/null | head -1)"
  find_python
  [ -n "$PY" ] || { warn "no Python with torch found (give --python)"; return 1; }
  note "using $PY"
  install_wheels || { warn "the Python side is incomplete: see above"; return 1; }

  local model="$WORK/model-$PRESET" images="$WORK/images" stamp
  stamp="$(cat "$HERE/model/export.py" "$HERE/model/clip_bpe.py" "$HERE/wheels/requirements.txt" | sha256sum | cut -c1-16)-$PRESET"
  if [ "$(cat "$model/.stamp" 2>/dev/null)" = "$stamp" ]; then
    note "model $model is current"
  else
    rm -rf "$model"
    note "exporting the random $PRESET model to $model (time box ${T_EXPORT}s)"
    timeout "$T_EXPORT" "$PY" "$HERE/model/export.py" --random "$PRESET" --out "$model" ||
      { warn "export failed"; return 1; }
    echo "$stamp" >"$model/.stamp"
  fi
  timeout "$T_IMAGES" "$PY" "$HERE/make_images.py" --out "$images" || { warn "make_images failed"; return 1; }
  local image="$images/$IMAGE_NAME"
  [ -f "$image" ] || { warn "no image $image"; return 1; }

  run_step "baseline preprocess, one core" "$T_PRE" "$RES/baseline-preprocess.json" \
    "$PY" "$HERE/baseline.py" preprocess --model "$model" --images "$images" --repeat "$PRE_REPEAT" --json
  run_step "baseline e2e on $DEVICE, $BASE_N images of $IMAGE_NAME" "$T_BASE" "$RES/baseline-e2e.json" \
    "$PY" "$HERE/baseline.py" e2e --model "$model" --image "$image" --n "$BASE_N" --device "$DEVICE" \
    --max-seconds "$BASE_MAX_S" --json

  # clipqc: the carried binary against this machine's libtorch.
  local bin="$WORK/bin/clipqc"
  if [ -f "$HERE/bin/clipqc.gz" ]; then
    mkdir -p "$WORK/bin"
    gzip -dc "$HERE/bin/clipqc.gz" >"$bin" && chmod +x "$bin"
    TORCH_LIB="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
    export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    note "clipqc with LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    if ldd "$bin" | grep -q 'not found'; then warn "unresolved libraries:"; ldd "$bin" | grep 'not found'; fi
    if ! "$bin" bench --help >/dev/null 2>&1; then
      warn "this clipqc binary has no 'bench' subcommand (or does not start): clipqc runs skipped"
      "$bin" --version 2>&1 | head -3
    else
      run_step "clipqc bench on $DEVICE at the maximum rate, $CLIPQC_N requests" "$T_MAX" "$RES/clipqc-max.json" \
        "$bin" bench --model "$model" --device "$DEVICE" --requests "$CLIPQC_N" --image "$image" --json
      # A tiled profile on 1080p frames: 25 views (windows at scales 1 and 0.5) per request,
      # all model work: windows/s against the ceiling counted in views.
      cat >"$WORK/tiled-profile.toml" <<'TOML'
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
      cp "$WORK/tiled-profile.toml" "$WORK/tiled.toml"
      compare_preprocessing "$bin" "$model" "$images"
      if [ -s "$RES/clipqc-max.json" ]; then
        # Half the rate reached, for long enough to settle (~15 s) but no more requests than above.
        read -r rate n2 < <("$PY" -c '
import json, sys
d = json.load(open(sys.argv[1]))
# Half of what it reached, never above half the model-only ceiling (a short run can report a
# throughput the model cannot have delivered).
r = min(d["images_per_s"], (d.get("ceiling") or {}).get("images_per_s") or float("inf")) / 2
print(f"{r:.1f}", max(20, min(int(sys.argv[2]), int(r * 15))))' "$RES/clipqc-max.json" "$CLIPQC_N")
        run_step "clipqc bench on $DEVICE at half that rate ($rate/s), $n2 requests" "$T_HALF" "$RES/clipqc-half.json" \
          "$bin" bench --model "$model" --device "$DEVICE" --requests "$n2" --rate "$rate" --image "$image" --json
      fi
      run_step "clipqc bench on $DEVICE, tiled profile (25 views per 1920x1080 frame), $TILED_N requests" \
        "$T_TILED" "$RES/clipqc-tiled.json" \
        "$bin" bench --model "$model" --device "$DEVICE" --config "$WORK/tiled.toml" --profile tiled \
        --requests "$TILED_N" --image "$images/part_1920x1080.jpg" --json
      segment_cost "$bin" "$model" "$images"
    fi
  else
    warn "the bundle has no bin/clipqc.gz: clipqc runs skipped"
  fi

  "$PY" - "$RES" "$DEVICE" "$IMAGE_NAME" "$PRESET" <<'EOF'
import json, sys
from pathlib import Path
res, device, image, preset = Path(sys.argv[1]), *sys.argv[2:]
def load(name):
    try:
        return json.loads((res / name).read_text())
    except (OSError, ValueError):
        return None
pre, base, cmax, chalf, tiled = (load(f) for f in ("baseline-preprocess.json", "baseline-e2e.json", "clipqc-max.json", "clipqc-half.json", "clipqc-tiled.json"))
g = lambda d, *ks: (None if d is None else (d.get(ks[0]) if len(ks) == 1 else g(d.get(ks[0]), *ks[1:])))
f = lambda x, fmt="{:.1f}": "n/a" if x is None else fmt.format(x)
ceiling = g(cmax, "ceiling", "images_per_s")
ratio = g(cmax, "ratio_to_ceiling") or (g(cmax, "images_per_s") / ceiling if cmax and ceiling else None)
speedup = g(cmax, "images_per_s") / g(base, "images_per_s") if cmax and base else None
summary = {
    "device": device, "device_name": g(base, "device_name"), "image": image, "model": preset,
    "torch": g(base, "torch"), "transformers": g(base, "transformers"),
    "baseline_images_per_s": g(base, "images_per_s"), "baseline_p99_ms": g(base, "latency_ms", "p99"),
    "clipqc_model": g(cmax, "model"),
    "clipqc_images_per_s": g(cmax, "images_per_s"), "ceiling_images_per_s": ceiling,
    "ceiling_batch": g(cmax, "ceiling", "batch"), "ratio_clipqc_to_ceiling": ratio,
    "speedup_clipqc_over_baseline": speedup,
    "clipqc_p99_ms_at_max_rate": g(cmax, "latency_ms", "p99"),
    "clipqc_half_rate": g(chalf, "images_per_s"), "clipqc_p99_ms_at_half_rate": g(chalf, "latency_ms", "p99"),
    "clipqc_mean_batch": g(cmax, "batch", "mean_size"),
    "tiled_images_per_s": g(tiled, "images_per_s"), "tiled_windows_per_s": g(tiled, "windows_per_s"),
    "tiled_views_per_image": g(tiled, "views_per_image"), "tiled_ceiling_views_per_s": g(tiled, "ceiling", "images_per_s"),
    "tiled_ratio_to_ceiling": g(tiled, "ratio_to_ceiling"),
    "clipqc_peak_rss_bytes": g(cmax, "peak_rss_bytes") or g(cmax, "memory", "peak_rss_bytes"),
    "baseline_peak_rss_bytes": g(base, "peak_rss_bytes"),
    "baseline_preprocess_ms_per_core": {r["image"]: r["ms_per_image"] for r in (pre or {}).get("images", [])} or None,
}
(res / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
if pre:
    print(f"\npreprocess, usual script, one core ({pre['image_processor']}):")
    for r in pre["images"]:
        print(f"  {r['image']:<28} {r['ms_per_image']:8.2f} ms  {r['images_per_s_per_core']:7.1f} images/s/core")
print(f"\n== clipqc vs the usual script: {summary['device_name'] or device}, {preset} model, {image}")
rows = [
    ("baseline images/s (1 image/pass)", f(summary["baseline_images_per_s"])),
    ("clipqc images/s (max rate)", f(summary["clipqc_images_per_s"])),
    (f"model-only ceiling images/s (batch {f(summary['ceiling_batch'], '{}')})", f(ceiling)),
    ("ratio clipqc / ceiling", f(ratio, "{:.2f}")),
    ("speedup clipqc / baseline", f(speedup, "{:.1f}x")),
    ("clipqc p99 ms at max rate", f(summary["clipqc_p99_ms_at_max_rate"])),
    (f"clipqc p99 ms at half rate ({f(g(chalf, 'images_per_s'))}/s)", f(summary["clipqc_p99_ms_at_half_rate"])),
    ("baseline p99 ms", f(summary["baseline_p99_ms"])),
    (f"tiled 1080p ({f(summary['tiled_views_per_image'], '{}')} views): images/s, windows/s",
     f"{f(summary['tiled_images_per_s'])}, {f(summary['tiled_windows_per_s'])}"),
    ("tiled windows/s / ceiling views/s", f(summary["tiled_ratio_to_ceiling"], "{:.2f}")),
    ("peak RSS MiB, baseline / clipqc", " / ".join(f(x and x / 2**20, "{:.0f}") for x in
                                                  (summary["baseline_peak_rss_bytes"], summary["clipqc_peak_rss_bytes"]))),
]
for k, v in rows:
    print(f"  {k:<48} {v:>10}")
# Issue 16: host vs device preprocessing, per image and on the tiled profile.
prep = []
for stem in ("part_250", "part_1920x1080", "part_2592x1944", "tiled"):
    for pd in ("cpu", "cuda"):
        d = load(f"prep-{pd}-{stem}.json")
        if d is None:
            continue
        cores = d.get("cpu_cores_used")
        prep.append({
            "image": stem, "preprocess_device": pd, "preprocess": d.get("preprocess"),
            "images_per_s": d.get("images_per_s"), "windows_per_s": d.get("windows_per_s"),
            "views_per_image": d.get("views_per_image"),
            "ceiling_views_per_s": g(d, "ceiling", "images_per_s"),
            "ratio_to_ceiling": d.get("ratio_to_ceiling"), "cpu_cores_used": cores,
            "images_per_s_per_core": d.get("images_per_s") / cores if cores else None,
            "p99_ms": g(d, "latency_ms", "p99"), "errors": d.get("errors"),
        })
if prep:
    summary["preprocessing"] = prep
    (res / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n== host vs device preprocessing (issue 16), max rate; CPU cores = process CPU time / wall time")
    print(f"  {'image':<16} {'prep':<5} {'images/s':>9} {'windows/s':>10} {'ceiling':>9} {'of ceil':>8} {'CPU cores':>9} {'img/s/core':>10} {'p99 ms':>8}")
    for r in prep:
        print(f"  {r['image']:<16} {r['preprocess_device']:<5} {f(r['images_per_s']):>9} {f(r['windows_per_s']):>10} "
              f"{f(r['ceiling_views_per_s']):>9} {f(r['ratio_to_ceiling'], '{:.2f}'):>8} {f(r['cpu_cores_used'], '{:.2f}'):>9} "
              f"{f(r['images_per_s_per_core']):>10} {f(r['p99_ms']):>8}")
# Issue 15: SAM's cost per DEFECT verdict next to classifying it.
plain, seg = load("segment-false.json"), load("segment-true.json")
if plain and seg and plain.get("images_per_s") and seg.get("images_per_s"):
    summary["segmentation"] = {
        "classify_images_per_s": plain["images_per_s"], "segment_images_per_s": seg["images_per_s"],
        "classify_ms_per_verdict": 1000 / plain["images_per_s"],
        "segment_ms_per_verdict": 1000 / seg["images_per_s"],
        "segment_p99_ms": g(seg, "latency_ms", "p99"),
    }
    (res / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    s = summary["segmentation"]
    print("\n== SAM masks (issue 15): 1080p DEFECT verdicts, max rate")
    print(f"  classified only            {s['classify_images_per_s']:8.1f} verdicts/s  {s['classify_ms_per_verdict']:8.1f} ms each")
    print(f"  classified and outlined    {s['segment_images_per_s']:8.1f} verdicts/s  {s['segment_ms_per_verdict']:8.1f} ms each")
print(f"(JSON in {res})")
EOF
}

main 2>&1 | tee "$RES/gpu.log"
rc=${PIPESTATUS[0]}
exit "$rc"
