#!/usr/bin/env python3
"""Benchmark images: a machined metal part (brushed texture, lighting falloff, bolt holes, a
chamfered rim) with a scratch and a paint spot, at the sizes a production line sends.

    python benches/make_images.py --out DIR [--seed S]

Writes, deterministically for a given seed (numpy's PCG64 stream and Pillow's encoders):
  part_250.jpg                 250x250 RGB, JPEG quality 90 (a cropped thumbnail)
  part_1920x1080.jpg           1920x1080 RGB, JPEG quality 90 (a 1080p camera)
  part_2448x2048_16bit.png     2448x2048 16-bit greyscale PNG, the full 0..65535 range used
                               (a 5 MP machine-vision camera, e.g. a Sony IMX264 sensor)
  part_2592x1944.jpg           2592x1944 RGB, JPEG quality 90 (a 5 MP colour camera: the device
                               preprocessing comparison's largest JPEG)
A stamp file (.stamp: this script's hash and the seed) skips regeneration when the files
already exist and match. deploy/samples/make_samples.py draws flat shapes (small, fast-decoding
JPEGs); a benchmark wants the texture and noise of a real photo, which decode and compress
like one, so this draws its own with numpy.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
from PIL import Image

FILES = {
    "part_250.jpg": (250, 250, "rgb8"),
    "part_1920x1080.jpg": (1920, 1080, "rgb8"),
    "part_2448x2048_16bit.png": (2448, 2048, "grey16"),
    "part_2592x1944.jpg": (2592, 1944, "rgb8"),
}


def _box_blur(a: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Moving average of length n along axis (cumulative sums; edges padded by reflection)."""
    if n <= 1:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (n // 2 + 1, n - n // 2)
    c = np.cumsum(np.pad(a, pad, mode="reflect"), axis=axis, dtype=np.float64)
    hi = np.take(c, np.arange(n, n + a.shape[axis]), axis=axis)
    lo = np.take(c, np.arange(0, a.shape[axis]), axis=axis)
    return ((hi - lo) / n).astype(np.float32)


def _smooth(d: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased step: 1 inside (d < 0), 0 outside, over `width` pixels."""
    return np.clip(0.5 - d / max(width, 1e-3), 0.0, 1.0).astype(np.float32)


def _segment_distance(x, y, p0, p1):
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.hypot(x - (x0 + t * dx), y - (y0 + t * dy))


def render(w: int, h: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear luminance in [0, 1] (float32 HxW) and the paint-spot mask (for colour)."""
    rng = np.random.default_rng(seed)
    s = min(w, h)  # feature sizes scale with the shorter side
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)

    # Background: a dark conveyor belt with coarse grain and light falling off downwards.
    grain = _box_blur(_box_blur(rng.standard_normal((h, w)).astype(np.float32), max(2, s // 150), 0), max(2, s // 150), 1)
    lum = 0.10 + 0.05 * (1 - y / h) + 0.05 * grain

    # The part: a rounded rectangle plate (signed distance in pixels).
    cx, cy = w * 0.5 + rng.uniform(-0.02, 0.02) * w, h * 0.5 + rng.uniform(-0.02, 0.02) * h
    hw, hh, r = w * 0.36, h * 0.33, s * 0.06
    qx, qy = np.abs(x - cx) - (hw - r), np.abs(y - cy) - (hh - r)
    sd = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - r
    plate = _smooth(sd, 1.5)

    # Brushed metal: noise smeared along the machining direction, plus fine isotropic grain.
    brushed = _box_blur(rng.standard_normal((h, w)).astype(np.float32), max(3, w // 25), 1)
    brushed /= brushed.std() + 1e-6
    fine = _box_blur(rng.standard_normal((h, w)).astype(np.float32), 2, 0)
    # Lighting: a diagonal falloff and a soft specular band across the plate.
    u = ((x - cx) * 0.8 + (y - cy) * 0.6) / s
    light = 0.55 + 0.12 * np.tanh(-u) + 0.18 * np.exp(-(((x - cx) * 0.3 - (y - cy) * 0.95) / (0.12 * s)) ** 2)
    metal = light + 0.035 * brushed + 0.015 * fine
    # Chamfered rim: a bright band just inside the edge, a dark line at the edge.
    metal += 0.20 * np.exp(-(((sd + s * 0.012) / (s * 0.005)) ** 2)) - 0.15 * np.exp(-((sd / (s * 0.003)) ** 2))

    # Bolt holes: dark, with a bright inner bevel.
    for hx, hy in ((-1, -1), (1, -1), (-1, 1), (1, 1)):
        px, py = cx + hx * (hw - 2.2 * r), cy + hy * (hh - 2.2 * r)
        d = np.hypot(x - px, y - py) - s * 0.035
        metal = metal * (1 - _smooth(d, 1.5)) + 0.06 * _smooth(d, 1.5)
        metal += 0.25 * np.exp(-(((d - s * 0.006) / (s * 0.004)) ** 2))

    # The scratch: a thin dark groove with a bright lip, slightly curved, inside the plate.
    p0 = (cx + rng.uniform(-0.25, -0.05) * 2 * hw, cy + rng.uniform(-0.3, 0.0) * 2 * hh)
    p1 = (cx + rng.uniform(0.05, 0.25) * 2 * hw, cy + rng.uniform(0.0, 0.3) * 2 * hh)
    wobble = 0.004 * s * np.sin((x - p0[0]) / (0.05 * s))
    d = _segment_distance(x, y + wobble, p0, p1)
    width = max(1.0, s * 0.0025)
    metal = metal - 0.35 * np.exp(-((d / width) ** 2)) + 0.12 * np.exp(-(((d - 2 * width) / width) ** 2))

    # The paint spot: an irregular blob (a circle with a noisy radius).
    sx, sy = cx + rng.uniform(0.1, 0.3) * hw, cy - rng.uniform(0.1, 0.4) * hh
    ang = np.arctan2(y - sy, x - sx)
    radius = s * 0.03 * (1 + 0.15 * np.sin(3 * ang + rng.uniform(0, 6)) + 0.08 * np.sin(7 * ang))
    spot = _smooth(np.hypot(x - sx, y - sy) - radius, 2.0) * plate
    metal = metal * (1 - 0.6 * spot)

    lum = lum * (1 - plate) + metal * plate
    lum += 0.01 * rng.standard_normal((h, w)).astype(np.float32)  # sensor noise
    return np.clip(lum, 0.0, 1.0).astype(np.float32), spot


def rgb8(lum: np.ndarray, spot: np.ndarray) -> Image.Image:
    tint = np.array([0.97, 1.0, 1.04], dtype=np.float32)  # steel: a slightly cold grey
    paint = np.array([0.75, 0.18, 0.12], dtype=np.float32)  # red-brown primer
    rgb = lum[..., None] * tint * (1 - spot[..., None]) + (lum[..., None] * 1.6 * paint) * spot[..., None]
    return Image.fromarray(np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8), "RGB")


def grey16(lum: np.ndarray) -> Image.Image:
    # Stretch to the full 16-bit range (as a camera with its exposure set to the part does):
    # the darkest pixel is 0, the brightest 65535, and the low bits carry noise, not zeros.
    lo, hi = float(lum.min()), float(lum.max())
    a = np.round((lum - lo) / (hi - lo) * 65535.0).astype(np.uint16)
    return Image.fromarray(a)  # mode I;16: PNG writes it as 16-bit greyscale (colour type 0)


def stamp(seed: int) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    return f"{h}-seed{seed}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=5)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    want = stamp(args.seed)
    stamp_file = args.out / ".stamp"
    if all((args.out / f).exists() for f in FILES) and stamp_file.exists() and stamp_file.read_text().strip() == want:
        print(f"bench images in {args.out} are current ({want})", file=sys.stderr)
        return 0
    stamp_file.unlink(missing_ok=True)
    for i, (name, (w, h, kind)) in enumerate(FILES.items()):
        lum, spot = render(w, h, args.seed * 1000 + i)
        path = args.out / name
        if kind == "rgb8":
            rgb8(lum, spot).save(path, quality=90)
        else:
            grey16(lum).save(path)
        print(f"wrote {path} ({w}x{h} {kind}, {path.stat().st_size} bytes)", file=sys.stderr)
    stamp_file.write_text(want + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
