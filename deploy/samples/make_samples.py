#!/usr/bin/env python3
"""Synthetic part images for demos, tests and benchmarks: a grey machined part on a darker
background, with scratches, paint spots or a chipped edge drawn on it (or none).

    python deploy/samples/make_samples.py --out DIR [--count N] [--size WxH] [--seed S] [--labelled [--masks]]

--labelled writes a labelled dataset for `clipqc eval` instead: one sub-folder per kind, named
like the default profile's classes (good_part/ is normal, surface_scratch/, paint_spot/ and
edge_chip/ are defects), --count images in each:

    python deploy/samples/make_samples.py --labelled --count 20 --out target/samples-labelled
    clipqc eval --model DIR --out target/eval target/samples-labelled

--labelled --masks writes the MVTec AD layout: images in OUT/test/<kind>/, each defect's mask
(its pixels white) in OUT/ground_truth/<kind>/<stem>_mask.png, for the pixel metrics of a tiled
profile:

    python deploy/samples/make_samples.py --labelled --masks --count 10 --out target/mvtec-like
    clipqc eval --model DIR --config tiled.toml --masks target/mvtec-like/ground_truth \\
        --out target/eval target/mvtec-like/test
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

DEFECTS = ("scratch", "spot", "chip", "none")
# --labelled: each kind's folder, named like the class of the built-in default profile.
FOLDERS = {"none": "good_part", "scratch": "surface_scratch", "spot": "paint_spot", "chip": "edge_chip"}


def synthetic_part(w: int, h: int, rng: random.Random, defect: str, mask: Image.Image | None = None) -> Image.Image:
    """A part with `defect` drawn on it; with `mask` (mode "L", the same size), each defect's
    pixels are also drawn on the mask in white (the same shapes, before the image's blur)."""
    img = Image.new("RGB", (w, h), (rng.randint(90, 140),) * 3)
    d = ImageDraw.Draw(img)
    m = ImageDraw.Draw(mask) if mask is not None else None
    d.rectangle([w * 0.1, h * 0.15, w * 0.9, h * 0.85], fill=(rng.randint(150, 200),) * 3, outline=(60, 60, 60))
    for _ in range(40):  # machining texture
        d.point((rng.randrange(w), rng.randrange(h)), fill=(rng.randint(100, 220),) * 3)
    if defect == "scratch":
        for _ in range(3):
            line = [rng.randrange(w), rng.randrange(h), rng.randrange(w), rng.randrange(h)]
            d.line(line, fill=(40, 40, 40), width=2)
            if m:
                m.line(line, fill=255, width=2)
    elif defect == "spot":
        for _ in range(4):
            x, y, r = rng.randrange(w), rng.randrange(h), rng.randint(3, max(4, w // 20))
            d.ellipse([x - r, y - r, x + r, y + r], fill=(200, 30, 30))
            if m:
                m.ellipse([x - r, y - r, x + r, y + r], fill=255)
    elif defect == "chip":
        chip = [(w * 0.9, h * 0.15), (w * 0.75, h * 0.15), (w * 0.9, h * 0.35)]
        d.polygon(chip, fill=(20, 20, 20))
        if m:
            m.polygon(chip, fill=255)
    return img.filter(ImageFilter.GaussianBlur(0.6))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--size", default="640x480")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labelled", action="store_true", help="one sub-folder per kind, --count images in each")
    p.add_argument("--masks", action="store_true",
                   help="with --labelled: the MVTec AD layout, images in OUT/test/<kind>/ and each defect's "
                        "mask in OUT/ground_truth/<kind>/<stem>_mask.png (for clipqc eval --masks)")
    args = p.parse_args()
    if args.masks and not args.labelled:
        p.error("--masks goes with --labelled")
    w, h = (int(x) for x in args.size.split("x"))
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.labelled:
        images = args.out / "test" if args.masks else args.out
        for defect, folder in FOLDERS.items():
            (images / folder).mkdir(parents=True, exist_ok=True)
            if args.masks and defect != "none":
                (args.out / "ground_truth" / folder).mkdir(parents=True, exist_ok=True)
            for i in range(args.count):
                mask = Image.new("L", (w, h), 0) if args.masks else None
                # PNG with masks: a JPEG's ringing would put defect-coloured pixels outside the mask.
                name = f"part_{i:04d}.png" if args.masks else f"part_{i:04d}.jpg"
                img = synthetic_part(w, h, rng, defect, mask)
                img.save(images / folder / name, **({} if args.masks else {"quality": 90}))
                if mask is not None and defect != "none":
                    mask.save(args.out / "ground_truth" / folder / f"part_{i:04d}_mask.png")
        print(f"wrote {args.count} images into each of {', '.join(FOLDERS.values())} in {images}"
              + (f", masks in {args.out / 'ground_truth'}" if args.masks else ""))
        return 0
    for i in range(args.count):
        defect = DEFECTS[i % len(DEFECTS)]
        synthetic_part(w, h, rng, defect).save(args.out / f"part_{i:04d}_{defect}.jpg", quality=90)
    print(f"wrote {args.count} images to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
