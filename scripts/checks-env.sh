# Sourced by scripts/check-monitoring.sh and scripts/check-helm.sh: the Python environment of
# their checks (pytest and what the checks import), from scripts/checks-requirements.txt.
#
# It lives in ~/.cache/clipqc/checks-venv (outside the checkout, so fresh clones on the same
# machine reuse it) and is rebuilt when the requirements change: a stamp named after their hash
# marks a complete install. Sets CHECKS_PY to its interpreter. Python >= 3.11 (tomllib);
# CLIPQC_CHECKS_PYTHON picks the interpreter that creates it.
set -euo pipefail
CHECKS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHECKS_REQS="$CHECKS_ROOT/scripts/checks-requirements.txt"
CHECKS_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/clipqc"
CHECKS_VENV="$CHECKS_CACHE/checks-venv"
CHECKS_STAMP="$CHECKS_VENV/.complete-$(sha256sum "$CHECKS_REQS" | cut -c1-12)"

checks_find_python() {
  local c
  for c in "${CLIPQC_CHECKS_PYTHON:-}" python3 python3.13 python3.12 python3.11; do
    [ -n "$c" ] || continue
    command -v "$c" >/dev/null 2>&1 || [ -x "$c" ] || continue
    if "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  return 1
}

if [ ! -x "$CHECKS_VENV/bin/python" ] || [ ! -f "$CHECKS_STAMP" ]; then
  _checks_py="$(checks_find_python)" || {
    echo "checks-env: the checks need Python >= 3.11 (set CLIPQC_CHECKS_PYTHON)" >&2
    exit 2
  }
  echo "==> creating $CHECKS_VENV with $_checks_py ($(basename "$CHECKS_REQS"))" >&2
  rm -rf "$CHECKS_VENV"
  mkdir -p "$CHECKS_CACHE"
  "$_checks_py" -m venv "$CHECKS_VENV"
  "$CHECKS_VENV/bin/pip" install --quiet --disable-pip-version-check -r "$CHECKS_REQS"
  touch "$CHECKS_STAMP"
fi
CHECKS_PY="$CHECKS_VENV/bin/python"
