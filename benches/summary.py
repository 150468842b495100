#!/usr/bin/env python3
"""Tables of the benchmark figures (stdlib only), from the JSON the benchmarks wrote.

    summary.py micro CRITERION_DIR BASELINE_PREPROCESS_JSON
        Rust preprocessing per image (criterion's mean, one core) next to CLIPProcessor's
        (benches/baseline.py preprocess, one core), with the speed-up; tokenization and scoring.
    summary.py e2e CLIPQC_BENCH_JSON BASELINE_E2E_JSON
        clipqc bench (throughput, ceiling, latency) next to the Python per-image loop.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

IMAGES = ["part_250.jpg", "part_1920x1080.jpg", "part_2448x2048_16bit.png"]
TARGET_PREPROCESS = 10.0
TARGET_CPU_CEILING = 0.90


def criterion_mean_ms(root: Path, group: str, bench: str) -> float | None:
    # criterion writes target/criterion/<group>/<bench>/new/estimates.json (nanoseconds);
    # ids are sanitised (e.g. "." kept, " " and "(" replaced), so match by directory listing.
    gdir = root / group
    if not gdir.is_dir():
        return None
    for d in gdir.iterdir():
        bench_json = d / "new" / "benchmark.json"
        if bench_json.is_file():
            meta = json.loads(bench_json.read_text())
            if meta.get("value_str") == bench or meta.get("function_id") == bench:
                est = json.loads((d / "new" / "estimates.json").read_text())
                return est["mean"]["point_estimate"] / 1e6
    return None


def micro(criterion: Path, baseline_json: Path) -> int:
    base = json.loads(baseline_json.read_text())
    per_image = {r["image"]: r for r in base["images"]}
    print(f"Preprocessing, one core (decode + resize + crop + normalise), target >= {TARGET_PREPROCESS:.0f}x")
    print(f"{'image':<42}{'clipqc ms':>12}{'CLIPProcessor ms':>18}{'speed-up':>10}  target")
    missed = 0
    for name in IMAGES:
        ours = criterion_mean_ms(criterion, "preprocess", name)
        theirs = per_image.get(name, {}).get("ms_per_image")
        if ours is None or theirs is None:
            print(f"{name:<42}{'?':>12}{'?':>18}")
            missed += 1
            continue
        ratio = theirs / ours
        ok = ratio >= TARGET_PREPROCESS
        missed += not ok
        print(f"{name:<42}{ours:>12.3f}{theirs:>18.3f}{ratio:>9.1f}x  {'met' if ok else 'MISSED'}")
    for name in IMAGES[:2]:
        fast = criterion_mean_ms(criterion / "preprocess_jpeg_dct", "headroom 2", name)
        theirs = per_image.get(name, {}).get("ms_per_image")
        if fast is not None and theirs:
            print(f"{name + ' (jpeg_dct_headroom 2)':<42}{fast:>12.3f}{theirs:>18.3f}{theirs / fast:>9.1f}x  (opt-in)")
    micro_base = base.get("micro", {})
    rows = [("tokenize", "one prompt", "tokenize_one_us"),
            ("tokenize", "default profile (20 prompts)", "tokenize_20_us"),
            ("score", "decide (5 classes, dim 512)", "score_us")]
    print(f"{'':<40}{'clipqc us':>12}{'Python us':>12}{'speed-up':>10}")
    for group, bench, key in rows:
        ours = criterion_mean_ms(criterion, group, bench)
        theirs = micro_base.get(key)
        if ours is None:
            continue
        ours_us = ours * 1e3
        line = f"{group + ': ' + bench:<40}{ours_us:>12.2f}"
        if theirs:
            line += f"{theirs:>12.2f}{theirs / ours_us:>9.1f}x"
        print(line)
    return 1 if missed else 0


def e2e(ours_json: Path, baseline_json: Path) -> int:
    ours = json.loads(ours_json.read_text())
    base = json.loads(baseline_json.read_text())
    ratio = ours["ratio_to_ceiling"]
    speedup = ours["images_per_s"] / base["images_per_s"]
    lat = ours["latency_ms"]
    print(f"{'':<34}{'images/s':>10}")
    print(f"{'Python loop (CLIPModel, 1/pass)':<34}{base['images_per_s']:>10.1f}")
    print(f"{'clipqc end to end':<34}{ours['images_per_s']:>10.1f}")
    print(f"{'model-only ceiling':<34}{ours['ceiling']['images_per_s']:>10.1f}")
    print(f"clipqc / ceiling: {ratio * 100:.1f} % (target >= {TARGET_CPU_CEILING * 100:.0f} %: "
          f"{'met' if ratio >= TARGET_CPU_CEILING else 'MISSED'}); clipqc / Python loop: {speedup:.1f}x")
    print(f"latency p50/p95/p99 {lat['p50']:.0f}/{lat['p95']:.0f}/{lat['p99']:.0f} ms at "
          f"{'max rate' if not ours['rate'] else str(ours['rate']) + '/s'}; mean batch "
          f"{ours['batch']['mean_size']:.1f} (fill {ours['batch']['mean_fill']:.2f}); peak RSS "
          f"{(ours['memory']['peak_rss_bytes'] or 0) / 2**20:.0f} MiB")
    return 0 if ratio >= TARGET_CPU_CEILING else 1


def main() -> int:
    if len(sys.argv) != 4 or sys.argv[1] not in ("micro", "e2e"):
        print(__doc__, file=sys.stderr)
        return 2
    a, b = Path(sys.argv[2]), Path(sys.argv[3])
    return micro(a, b) if sys.argv[1] == "micro" else e2e(a, b)


if __name__ == "__main__":
    sys.exit(main())
