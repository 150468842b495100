#!/usr/bin/env bash
# Lints and renders the Helm chart helm/clipqc with Helm's own engine (PyPI helm-python-sdk:
# `helm lint`, and `helm template` as a client-only dry-run install, no cluster) and checks the
# manifests (scripts/tests/test_helm_chart.py), then checks the compose stack without Docker
# (scripts/tests/test_compose.py); pytest reports both.
#   scripts/check-helm.sh                 # the checks (extra arguments go to pytest, e.g. -k keda)
#   scripts/check-helm.sh --write-schema  # refresh values.schema.json's config part after the
#                                         # worker's config schema changed
# The Python environment is scripts/checks-env.sh's (cached in ~/.cache/clipqc/checks-venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/checks-env.sh

if [ "${1:-}" = "--write-schema" ]; then
  exec "$CHECKS_PY" scripts/helm_check.py --write-schema
fi
PYTHONPATH=scripts "$CHECKS_PY" -c 'import helm_render; print(helm_render.versions())'
exec "$CHECKS_PY" -m pytest -q --tb=short -p no:cacheprovider scripts/tests/test_helm_chart.py scripts/tests/test_compose.py "$@"
