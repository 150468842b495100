#!/usr/bin/env bash
# Puts into OUT_DIR everything benches/gpu.sh needs on a GPU machine that has Python with torch
# but no Rust toolchain and no network (runs HERE, where PyPI is reachable):
#
#   benches/gpu-bundle.sh OUT_DIR [--with-numpy-pillow] [--pythons "3.11 3.12 3.13"]
#
#   OUT_DIR/gpu.sh, baseline.py, make_images.py   the scripts
#   OUT_DIR/bin/clipqc.gz                          target/release/clipqc (built first; CLIPQC_BIN=FILE
#                                                  bundles another), debug info stripped, gzipped
#   OUT_DIR/model/export.py, clip_bpe.py, sam_export.py  the export tool (gpu.sh exports the random models there)
#   OUT_DIR/wheels/*.whl + requirements.txt        transformers and its dependencies, at the exact
#                                                  versions of the project venv (torch excluded: the
#                                                  machine's own is used), for CPython 3.11-3.13
#                                                  (3.10 cannot be served: transformers 5.23.0, regex,
#                                                  filelock and httpx2 at these versions need 3.11+)
#   OUT_DIR/tv/torchvision-ops.tar.gz              torchvision 0.26.0's operator library (image.so and
#                                                  torchvision.libs: libjpeg, nvJPEG, cudart; 4.6 MiB)
#                                                  for the device preprocessing path, used by gpu.sh
#                                                  when the machine has no torchvision 0.26
#   OUT_DIR/MANIFEST.txt                           what is inside, versions, sizes
#
# numpy and Pillow are not carried by default (16 + 7 MB per Python version; the GPU image has
# both, see the device notes): --with-numpy-pillow adds them. torchvision's Python package is not
# carried either (transformers 5's CLIPImageProcessor runs on it; the GPU image has 0.26.0), only
# its operator library (tv/, above).
# The bundle must stay under 60 MiB: the device tool carries at most 64 MiB with the work tree.
# For the device tool: make it under an ignored path and carry it, e.g.
#   benches/gpu-bundle.sh target/gpu-bundle
#   run(command="bash target/gpu-bundle/gpu.sh", carry=["target/gpu-bundle"], timeout_s=540)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR=""
PYTHONS="3.11 3.12 3.13"
WITH_NP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --with-numpy-pillow) WITH_NP=1 ;;
    --pythons) PYTHONS="$2"; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) [ -z "$OUT_DIR" ] || { echo "usage: $0 OUT_DIR [--with-numpy-pillow] [--pythons LIST]" >&2; exit 2; }; OUT_DIR="$1" ;;
  esac
  shift
done
[ -n "$OUT_DIR" ] || { echo "usage: $0 OUT_DIR [--with-numpy-pillow] [--pythons LIST]" >&2; exit 2; }
LIMIT_MIB=60

loud() { printf '\n!!!!!!!! %s\n\n' "$*" >&2; }

# The project venv (the versions to carry, and pip to download them) and the build's variables.
# shellcheck source=/dev/null
source "$ROOT/scripts/env.sh"
VPY="$(command -v python)"
TORCH_LIB="$("$VPY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"

rm -rf "$OUT_DIR"
mkdir -p "$OUT_DIR/bin" "$OUT_DIR/model" "$OUT_DIR/wheels"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"

# --- the binary -----------------------------------------------------------------------------
# Built here unless CLIPQC_BIN names one, so the bundle never carries a stale binary. The
# same build as scripts/bench.sh (`cargo bench --no-run` also builds target/release/clipqc).
if [ -z "${CLIPQC_BIN:-}" ]; then
  echo "==> building target/release/clipqc (cargo bench --bench stages --no-run)" >&2
  (cd "$ROOT" && cargo bench --bench stages --no-run >&2)
fi
BIN="${CLIPQC_BIN:-$ROOT/target/release/clipqc}"
DRY_RUN=0
if [ ! -x "$BIN" ]; then
  if [ -x "$ROOT/target/debug/clipqc" ]; then
    BIN="$ROOT/target/debug/clipqc"; DRY_RUN=1
    loud "DRY RUN: $ROOT/target/release/clipqc is missing; bundling the DEBUG build $BIN (not for timing)"
  else
    loud "no clipqc binary (build with: cargo build --release); the bundle will lack bin/clipqc.gz"
    BIN=""
  fi
fi
BIN_INFO="none"
if [ -n "$BIN" ]; then
  if readelf -d "$BIN" | grep -q 'NEEDED.*\[libtorch_cuda\.so\]'; then
    echo "==> $BIN: libtorch_cuda.so is NEEDED (the binary can use a GPU)" >&2
  else
    loud "WARNING: $BIN does NOT list libtorch_cuda.so as NEEDED: it will never see a GPU (--device cuda fails). Rebuild against a CUDA torch (README: libtorch)."
  fi
  if LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$BIN" bench --help >/dev/null 2>&1; then
    echo "==> $BIN has the bench subcommand" >&2
  else
    loud "WARNING: $BIN has no 'bench' subcommand (built before it existed?): gpu.sh will skip the clipqc runs"
  fi
  # What the GPU machine's system must provide (the Ubuntu 24.04 image does: glibc 2.39).
  NEEDS="$(objdump -T "$BIN" | grep -oE '(GLIBC|GLIBCXX|OPENSSL)_[0-9.]+' | sort -uV |
           awk -F_ '{ v[$1] = $0 } END { printf "%s %s %s", v["GLIBC"], v["GLIBCXX"], v["OPENSSL"] }')"
  echo "==> $BIN needs at least: $NEEDS" >&2
  strip --strip-debug -o "$OUT_DIR/bin/clipqc" "$BIN"
  BIN_SHA="$(sha256sum "$BIN" | cut -c1-16)"
  gzip -9 -n "$OUT_DIR/bin/clipqc"
  BIN_INFO="$BIN (sha256 $BIN_SHA..., $( [ $DRY_RUN = 1 ] && echo DEBUG || echo release ) build, debug info stripped, gzip; needs $NEEDS)"
fi

# --- scripts and the export tool ------------------------------------------------------------
cp "$ROOT/benches/gpu.sh" "$ROOT/benches/baseline.py" "$ROOT/benches/make_images.py" "$OUT_DIR/"
chmod +x "$OUT_DIR/gpu.sh"
# export.py imports sam_export.py (the SAM export, also used by gpu.sh's segmentation step).
cp "$ROOT/deploy/model/export.py" "$ROOT/deploy/model/clip_bpe.py" "$ROOT/deploy/model/sam_export.py" \
  "$OUT_DIR/model/"

# --- torchvision's operators, for the device preprocessing path (issue 16) ------------------
# The GPU image has torchvision 0.26.0; this copy (the project venv's, built for the same torch
# 2.11.0+cu130) is the fallback. image.so finds its libraries through $ORIGIN/../torchvision.libs.
TV_SITE="$("$VPY" -c 'import os, torchvision; print(os.path.dirname(os.path.dirname(torchvision.__file__)))')"
mkdir -p "$OUT_DIR/tv"
tar czf "$OUT_DIR/tv/torchvision-ops.tar.gz" -C "$TV_SITE" torchvision/image.so torchvision.libs
echo "==> torchvision $("$VPY" -c 'import torchvision; print(torchvision.__version__)') operators: $(du -h "$OUT_DIR/tv/torchvision-ops.tar.gz" | cut -f1)" >&2

# --- wheels ---------------------------------------------------------------------------------
# transformers' runtime closure as far as the export tool and the baseline import it
# (transformers' own requirements, huggingface-hub's, httpx2's), minus torch (the machine's),
# minus what only the command-line tools or hub downloads use (typer and pydantic, click, rich,
# hf-xet). open_clip_torch is carried for one file: export.py --random reads CLIP's BPE
# vocabulary from inside it (clip_bpe.find_bpe_vocab locates the package, never imports it),
# so it goes in without its dependencies (torchvision, timm, ftfy).
PKGS=(transformers huggingface-hub tokenizers safetensors regex pyyaml tqdm packaging filelock fsspec
      httpx2 httpcore2 h11 anyio idna truststore typing-extensions open_clip_torch)
[ "$WITH_NP" = 1 ] && PKGS+=(numpy pillow)
REQ="$OUT_DIR/wheels/requirements.txt"
"$VPY" - "${PKGS[@]}" >"$REQ" <<'EOF'
import importlib.metadata as m
import sys
for name in sys.argv[1:]:
    print(f"{name}=={m.version(name)}")
EOF
echo "==> wheels for CPython $PYTHONS:" >&2
sed 's/^/    /' "$REQ" >&2
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)
MISSING=()
for pyv in $PYTHONS; do
  args=(download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$OUT_DIR/wheels"
        --python-version "$pyv" --implementation cp)
  for p in "${PLATFORMS[@]}"; do args+=(--platform "$p"); done
  mapfile -t specs <"$REQ"
  # One call per version; when it fails, one per package, to name what is missing.
  if ! "$VPY" -m pip "${args[@]}" "${specs[@]}" 2>/dev/null; then
    for spec in "${specs[@]}"; do
      "$VPY" -m pip "${args[@]}" "$spec" 2>/dev/null || MISSING+=("$spec for $pyv")
    done
  fi
done
if [ ${#MISSING[@]} -gt 0 ]; then
  loud "no wheel for: ${MISSING[*]} (gpu.sh falls back to the machine's own package there, with a warning)"
fi

# --- manifest and size ----------------------------------------------------------------------
{
  echo "clipqc GPU bench bundle, made $(date -u +%FT%TZ) from $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "binary: $BIN_INFO"
  echo "venv: $("$VPY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__)')"
  echo "pythons: $PYTHONS"
  echo
  (cd "$OUT_DIR" && find . -type f ! -name MANIFEST.txt -printf '%10s  %p\n' | sort -k2)
} >"$OUT_DIR/MANIFEST.txt"
size_b="$(du -sb "$OUT_DIR" | cut -f1)"
size_mib="$(awk -v b="$size_b" 'BEGIN { printf "%.1f", b / 1048576 }')"
cat "$OUT_DIR/MANIFEST.txt" >&2
echo "==> bundle $OUT_DIR: $size_mib MiB ($size_b bytes)" >&2
if [ "$size_b" -gt $((LIMIT_MIB * 1048576)) ]; then
  loud "the bundle is over $LIMIT_MIB MiB: the device tool will not carry it with the work tree"
  exit 1
fi
[ "$DRY_RUN" = 0 ] || loud "DRY RUN bundle (debug binary): for trying gpu.sh out, not for timing"
