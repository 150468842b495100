#!/usr/bin/env bash
# Lints and renders the Helm chart helm/clipqc with Helm's own engine (PyPI helm-sdkpy, which
# needs Python >= 3.12) and checks the manifests (scripts/helm_check.py), then checks the
# compose stack without Docker (scripts/check_compose.py).
#   scripts/check-helm.sh                 # the checks
#   scripts/check-helm.sh --write-schema  # refresh values.schema.json's config part after the
#                                         # worker's config schema changed
# The Python environment lives in ~/.cache/clipqc/helm-venv and is reused while
# scripts/helm-requirements.txt is unchanged.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQS="$ROOT/scripts/helm-requirements.txt"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/clipqc"
VENV="$CACHE/helm-venv"
STAMP="$VENV/.complete-$(sha256sum "$REQS" | cut -c1-12)"

find_python() {
  local c
  for c in "${CLIPQC_HELM_PYTHON:-}" python3.13 python3.12 \
    "$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python3" python3; do
    [ -n "$c" ] || continue
    command -v "$c" >/dev/null 2>&1 || [ -x "$c" ] || continue
    if "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  return 1
}

if [ ! -x "$VENV/bin/python" ] || [ ! -f "$STAMP" ]; then
  PY="$(find_python)" || {
    echo "check-helm: helm-sdkpy needs Python >= 3.12 (set CLIPQC_HELM_PYTHON)" >&2
    exit 2
  }
  echo "==> creating $VENV with $PY (helm-sdkpy)" >&2
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet -r "$REQS"
  touch "$STAMP"
fi

if [ "${1:-}" = "--write-schema" ]; then
  exec "$VENV/bin/python" "$ROOT/scripts/helm_check.py" --write-schema
fi
status=0
"$VENV/bin/python" "$ROOT/scripts/helm_check.py" "$@" || status=1
"$VENV/bin/python" "$ROOT/scripts/check_compose.py" || status=1
exit $status
