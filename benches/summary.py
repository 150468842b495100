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
    print(f"{'image':<28}{'clipqc ms':>12}{'CLIPProcessor ms':>18}{'speed-up':>10}  target")
    missed = 0
    for name in IMAGES:
        ours = criterion_mean_ms(criterion, "preprocess", name)
        theirs = per_image.get(name, {}).get("ms_per_image")
        if ours is None or theirs is None:
            print(f"{name:<28}{'?':>12}{'?':>18}")
            missed += 1
            continue
        ratio = theirs / ours
        ok = ratio >= TARGET_PREPROCESS
        missed += not ok
        print(f"{name:<28}{ours:>12.3f}{theirs:>18.3f}{ratio:>9.1f}x  {'met' if ok else 'MISSED'}")
    for group in ("tokenize", "score"):
        gdir = criterion / group
        if gdir.is_dir():
            for d in sorted(gdir.iterdir()):
                bj = d / "new" / "benchmark.json"
                if bj.is_file():
                    meta = json.loads(bj.read_text())
                    est = json.loads((d / "new" / "estimates.json").read_text())
                    print(f"{group}: {meta.get('function_id')}: {est['mean']['point_estimate'] / 1e3:.2f} us")
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
    return 0


def main() -> int:
    if len(sys.argv) != 4 or sys.argv[1] not in ("micro", "e2e"):
        print(__doc__, file=sys.stderr)
        return 2
    a, b = Path(sys.argv[2]), Path(sys.argv[3])
    return micro(a, b) if sys.argv[1] == "micro" else e2e(a, b)


if __name__ == "__main__":
    sys.exit(main())
