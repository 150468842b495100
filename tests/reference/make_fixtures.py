#!/usr/bin/env python3
"""Reference outputs for the Rust fidelity tests (tests/it/model_fidelity.rs), computed offline
with the reference implementations on the same artifact the Rust side loads.

    python tests/reference/make_fixtures.py --model DIR --out DIR

Writes:
  tokens.jsonl     >= 1,000 strings with transformers' CLIPTokenizer ids and open_clip's ids
  images/*         generated test images (JPEG, PNG, BMP, TIFF; RGB, RGBA, 8/16-bit grey)
  ref/*.f32        per image: CLIPImageProcessor pixels (PIL and torchvision backends) and the
                   transformers model's image embedding of them; the pad view's pixels
                   (pad_view below) and their embedding; for the tiled profile
                   (`profile_tiled`): a few windows' pixels (`{stem}.window{i}.pixels.f32`)
                   and every window's embedding (`{stem}.windows_embedding.f32`, in window
                   order, unit length); little-endian float32
  fixtures.json    the index: images, shapes, test profile prompts and reference probabilities
                   (`probabilities`: the processor's center crop; `probabilities_pad`: pad_view;
                   `tiles`: the tiled profile's windows, per-view and aggregated probabilities,
                   anomaly score, heatmap and the fused anomaly map anomalib's WinCLIP makes of the same window
                   scores, see `tiled_reference`); with `--sam DIR`, `sam`:
                   Segment Anything's masks and IoUs by transformers (sam_reference.py)
"""

from __future__ import annotations

import argparse
import importlib.util
import html
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy" / "samples"))
from make_samples import synthetic_part  # noqa: E402

SEED_PROMPTS_ZH = ["表面划痕", "边缘缺口", "油漆斑点", "装配错误", "合格产品", "这是一张有划痕的金属零件的照片。"]
DEFECTS = ["surface scratch", "edge chip", "paint spot", "misassembly", "good part", "dent", "crack",
           "burr", "rust stain", "missing screw", "weld spatter", "porosity"]
MATERIALS = ["metal part", "steel bracket", "aluminium housing", "plastic cover", "painted panel",
             "circuit board", "glass lens", "rubber seal"]
TEMPLATES = ["a photo of a {} on a {}.", "a close-up photo of a {} on a {}", "{} ({})",
             "There is a {} on the {}!", "an image showing a {} on a {}, industrial inspection",
             "a {}? on a {}...", "A {} ON A {}", "quality check: {} / {}"]
ODD = ["it's", "don't", "we'll", "they're", "I'm", "you've", "he'd", "part #123-45", "3.5mm", "±0.01",
       "café", "naïve", "Straße", "Ärger", "ørsted", "日本語のテキスト", "한국어 문장", "Привет мир", "مرحبا",
       "emoji 🔧🔩⚙️", "tab\tseparated", "line\nbreak", "  leading and trailing  ", "MiXeD CaSe",
       "hyphen-ated", "under_score", "slash/path", "quote \"double\"", "'single'", "<html>", "a&b",
       "100%", "$5.00", "e-mail@example.com", "C++", "x=y+z", "…", "—dash—", "“curly”", "¿qué?", "¡sí!",
       "ﬁne ligature", "１２３ fullwidth", "零件编号 A-17", "第3号产品", "good, ok; fine: yes"]


def make_strings(rng: random.Random) -> list[str]:
    out = list(SEED_PROMPTS_ZH)
    for t in TEMPLATES:
        for d in DEFECTS:
            for m in MATERIALS:
                out.append(t.format(d, m))
    out += ODD
    words = DEFECTS + MATERIALS + ODD + SEED_PROMPTS_ZH + ["the", "a", "of", "and", "with", "on", "under"]
    for _ in range(250):
        out.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 8))))
    for _ in range(60):  # longer than the 77-token context
        out.append(" ".join(rng.choice(words) for _ in range(rng.randint(40, 120))))
    for _ in range(60):  # random punctuation and digits
        out.append("".join(rng.choice("abc XYZ 0123456789 .,;:!?'\"()[]{}-_/\\@#$%^&*+=~`|<>") for _ in range(rng.randint(1, 40))))
    return out


def write_images(dir: Path, rng: random.Random) -> list[tuple[str, Image.Image]]:
    dir.mkdir(parents=True, exist_ok=True)
    specs = [
        ("part_250.jpg", 250, 250, "scratch", "JPEG", "RGB"),
        ("part_640x480.png", 640, 480, "spot", "PNG", "RGB"),
        ("part_480x640.bmp", 480, 640, "chip", "BMP", "RGB"),
        ("part_300x201.tiff", 300, 201, "none", "TIFF", "RGB"),
        ("part_rgba_333x222.png", 333, 222, "spot", "PNG", "RGBA"),
        ("part_gray_320x240.png", 320, 240, "scratch", "PNG", "L"),
        ("part_small_150x100.jpg", 150, 100, "chip", "JPEG", "RGB"),
        ("part_1920x1080.jpg", 1920, 1080, "scratch", "JPEG", "RGB"),
    ]
    written = []
    for name, w, h, defect, fmt, mode in specs:
        img = synthetic_part(w, h, rng, defect)
        if mode != "RGB":
            img = img.convert(mode)
        path = dir / name
        img.save(path, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
        written.append((name, Image.open(path)))
    return written


def pad_dims(size: int, width: int, height: int) -> tuple[int, int]:
    """The pad view's resize target, as worker/src/preprocess/transform.rs `pad_dims`: the
    longer side `size`, the shorter `size * short / long` rounded to nearest with halves up
    (integer arithmetic), at least 1."""
    short, long = min(width, height), max(width, height)
    scaled = min(max((size * short + long // 2) // long, 1), size)
    return (size, scaled) if width >= height else (scaled, size)


def to_rgb(img: Image.Image) -> Image.Image:
    """The processor's RGB conversion (grey replicated, transparency composited on white)."""
    from transformers.image_transforms import convert_to_rgb

    return Image.fromarray(convert_to_rgb(img, return_numpy=True))


def normalized_chw(proc, hwc) -> torch.Tensor:
    """HWC pixel values (0..255, float) → the processor's rescale and normalise, 1×3×H×W."""
    import numpy as np

    chw = np.asarray(hwc, dtype=np.float32).transpose(2, 0, 1)
    chw = proc.rescale(chw, proc.rescale_factor)
    chw = proc.normalize(chw, proc.image_mean, proc.image_std)
    return torch.from_numpy(np.ascontiguousarray(chw, dtype=np.float32))[None]


def pad_view(proc, img: Image.Image, size: int) -> torch.Tensor:
    """The worker's default `view = "pad"` with PIL: the processor's RGB conversion; the whole
    image resized with BICUBIC (PIL widens the kernel when downscaling: antialiased) so its
    longer side is `size`, aspect kept; pasted at ((size - w) // 2, (size - h) // 2) on a
    size×size canvas of the normalisation mean colour (kept in float: mean / rescale_factor,
    122.77... for CLIP's red, so the padding normalises to 0 and not to a rounded grey); then
    the processor's own rescale and normalise, without its resize and center crop."""
    import numpy as np

    rgb = to_rgb(img)
    w, h = pad_dims(size, *rgb.size)
    resized = np.asarray(rgb.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    mean = np.asarray(proc.image_mean, dtype=np.float32)
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = mean / np.float32(proc.rescale_factor)
    left, top = (size - w) // 2, (size - h) // 2
    canvas[top:top + h, left:left + w] = resized
    return normalized_chw(proc, canvas)


# The tiled profile: the test profile plus multi-scale windows. min_window 16 keeps every
# scale for every fixture image (the smallest, 150×100, has 25-pixel windows at 0.25).
TILES = {"scales": [1.0, 0.5, 0.25], "overlap": 0.5, "max_windows": 1000, "min_window": 16}
TILED_MIN_SHORT = 64  # images with a shorter side under this get no tiled reference


def tile_positions(length: int, side: int, stride: float) -> list[int]:
    """Window starts along an axis, as worker/src/preprocess/windows.rs documents: every
    `stride` pixels (floored), as many as start before `length - side`, the last flush with
    the far edge; one at 0 when the window spans the axis."""
    if side >= length:
        return [0]
    n = math.ceil((length - side) / stride - 1e-6) + 1
    return [math.floor(k * stride + 1e-6) for k in range(n - 1)] + [length - side]


def tile_layout(tiles: dict, width: int, height: int) -> list[tuple[int, int, int, int]]:
    """Every window (x, y, side, scale index) of a width×height frame: scale by scale in the
    config's order, then row by row; a scale whose side is under `min_window` is skipped."""
    short = min(width, height)
    out = []
    for index, scale in enumerate(tiles["scales"]):
        side = min(max(math.ceil(scale * short - 1e-6), 1), short)
        if side < tiles["min_window"]:
            continue
        stride = max(1.0, side * (1.0 - tiles["overlap"]))
        xs = tile_positions(width, side, stride)
        for y in tile_positions(height, side, stride):
            out += [(x, y, side, index) for x in xs]
    return out


def window_view(proc, rgb: Image.Image, window: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """A window as the model sees it: the square cropped from the RGB frame, resized to
    size×size with BICUBIC (antialiased when downscaling, as pad_view), then rescaled and
    normalised by the processor."""
    x, y, side, _ = window
    crop = rgb.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BICUBIC)
    return normalized_chw(proc, crop)


def load_winclip_utils(root: Path):
    """anomalib's own WinCLIP utilities (src/anomalib/models/image/winclip/utils.py:
    `harmonic_aggregation`, `visual_association_score`), loaded by path from the wheel pinned
    in tests/reference/anomalib.txt: the module imports only torch, while the anomalib package
    would import Lightning and the rest."""
    path = root / "anomalib" / "models" / "image" / "winclip" / "utils.py"
    spec = importlib.util.spec_from_file_location("anomalib_winclip_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def per_scale_maps(harmonic_aggregation, windows: list, window_scores: list):
    """The frame cut at every window edge into cells (anomalib's patch grid) and, per scale,
    anomalib's `harmonic_aggregation` of that scale's window scores, each window's mask the
    cells it covers (a window covering fewer cells than the longest repeats its first:
    anomalib's masks are one tensor, and coverage is `any`)."""
    xs = sorted({e for (x, _, side, _) in windows for e in (x, x + side)})
    ys = sorted({e for (_, y, side, _) in windows for e in (y, y + side)})
    cols, rows = len(xs) - 1, len(ys) - 1
    maps = []
    for scale in sorted({w[3] for w in windows}):
        of = [(w, s) for w, s in zip(windows, window_scores) if w[3] == scale]
        cells = []
        for (x, y, side, _), _ in of:
            c0, c1, r0, r1 = xs.index(x), xs.index(x + side), ys.index(y), ys.index(y + side)
            cells.append([r * cols + c for r in range(r0, r1) for c in range(c0, c1)])
        longest = max(len(c) for c in cells)
        masks = torch.tensor([c + [c[0]] * (longest - len(c)) for c in cells]).T
        scores = torch.tensor([[s for _, s in of]], dtype=torch.float32)
        maps.append(harmonic_aggregation(scores, (rows, cols), masks))
    return xs, ys, maps


def winclip_fused_map(harmonic_aggregation, windows: list, window_scores: list, whole: float) -> dict:
    """The fused multi-scale map as anomalib's WinCLIP makes it, on the worker's windows
    ([`per_scale_maps`]); across scales with the whole-image score, the line of
    `WinClipModel._compute_zero_shot_scores`: `(len(scales) + 1) / (1 / stack).sum(dim=0)`."""
    xs, ys, maps = per_scale_maps(harmonic_aggregation, windows, window_scores)
    whole_map = torch.tensor([whole], dtype=torch.float32).view(-1, 1, 1).repeat(1, len(ys) - 1, len(xs) - 1)
    maps = [whole_map] + maps
    fused = len(maps) / (1 / torch.stack(maps)).sum(dim=0)
    return {"x_edges": xs, "y_edges": ys, "scores": fused.flatten().tolist()}


def winclip_plus_reference(utils, ref: Path, tiled: list, scales: list, dim: int) -> dict:
    """WinCLIP+ (few-shot) on the first tiled image with the others as its normal references,
    all with transformers' window embeddings: per window, anomalib's `visual_association_score`
    against every reference window of its scale; the few-shot map as
    `WinClipModel._compute_few_shot_scores` makes it (per scale `harmonic_aggregation`, then
    the mean over scales; without its patch-level term, which needs the ViT's patch tokens);
    the map `(zero_shot + few_shot) / 2` and the image score `(whole + few_shot.amax()) / 2`,
    as `WinClipModel.forward` with `k_shot`."""
    def embeddings(e):
        return torch.from_numpy(np.fromfile(ref / f"{e['stem']}.windows_embedding.f32", dtype="<f4").reshape(-1, dim))

    test, references = tiled[0], tiled[1:4]
    windows = test["tiles"]["windows"]
    own = embeddings(test)
    vas = [0.0] * len(windows)
    for scale in sorted({w[3] for w in windows}):
        idx = [i for i, w in enumerate(windows) if w[3] == scale]
        refs = torch.cat([embeddings(r)[[i for i, w in enumerate(r["tiles"]["windows"]) if w[3] == scale]]
                          for r in references])
        scores = utils.visual_association_score(own[idx].unsqueeze(0), refs.unsqueeze(0))[0]
        for i, v in zip(idx, scores.tolist()):
            vas[i] = v
    xs, ys, maps = per_scale_maps(utils.harmonic_aggregation, windows, vas)
    few_shot = torch.stack(maps).mean(dim=0)
    whole = test["tiles"]["whole_score"]
    zero_shot = torch.tensor(winclip_fused_map(utils.harmonic_aggregation, windows, test["tiles"]["window_scores"],
                                               whole)["scores"], dtype=torch.float32).view(few_shot.shape)
    fused = (zero_shot + few_shot) / 2
    return {
        "test": test["stem"],
        "references": [r["stem"] for r in references],
        "scales": scales,
        "window_vas": vas,
        "few_shot_map": {"x_edges": xs, "y_edges": ys, "scores": few_shot.flatten().tolist()},
        "anomaly_map": {"x_edges": xs, "y_edges": ys, "scores": fused.flatten().tolist()},
        "image_score": (whole + few_shot.amax().item()) / 2,
    }


def tiled_reference(proc, model, text, img: Image.Image, px_pad: torch.Tensor, stem: str, size: int,
                    profile: dict, ref: Path, harmonic_aggregation) -> dict:
    """The tiled profile on one image with transformers' CLIPModel: each view's softmax
    probabilities (the whole frame's pad view first, then the windows); aggregated with
    `aggregate = "max"` (worker/src/score/localize.rs): a defect class its largest probability
    over the views, an acceptable class the whole view's, the anomaly score the largest
    defect mass (sum of the defect classes' probabilities) of any view; the heatmap: the
    finest scale's windows' defect masses, row-major. Writes every window's embedding and the
    pixels of the first and last window of each scale and of the middle one of the finest."""
    rgb = to_rgb(img)
    windows = tile_layout(profile["tiles"], *rgb.size)
    pixels = torch.cat([window_view(proc, rgb, w, size) for w in windows])
    # One pass of the model over the views: their embeddings (unit length, as CLIPModel
    # returns them: compare by cosine) and their probabilities.
    embeddings, views = [], []
    for chunk in torch.cat([px_pad, pixels]).split(64):
        output = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=chunk)
        embeddings.append(output.image_embeds)
        views += output.logits_per_image.softmax(-1).tolist()
    torch.cat(embeddings)[1:].numpy().astype("<f4").tofile(ref / f"{stem}.windows_embedding.f32")

    finest = min(w[2] for w in windows)
    fine = [i for i, w in enumerate(windows) if w[2] == finest]
    checked = set()
    for scale in {w[3] for w in windows}:
        of = [i for i, w in enumerate(windows) if w[3] == scale]
        checked |= {of[0], of[-1]}
    checked.add(fine[len(fine) // 2])
    for i in sorted(checked):
        pixels[i].numpy().astype("<f4").tofile(ref / f"{stem}.window{i}.pixels.f32")

    defect = [c["defect"] for c in profile["classes"]]
    mass = [sum(p for p, d in zip(v, defect) if d) for v in views]
    probabilities = [max(v[c] for v in views) if d else views[0][c] for c, d in enumerate(defect)]
    xs = sorted({windows[i][0] for i in fine})
    ys = sorted({windows[i][1] for i in fine})
    return {
        "whole_score": mass[0],
        "window_scores": mass[1:],
        "anomaly_map": winclip_fused_map(harmonic_aggregation, windows, mass[1:], mass[0]),
        "windows": [list(w) for w in windows],
        "checked_pixels": sorted(checked),
        "view_probabilities": views,
        "probabilities": probabilities,
        "anomaly_score": max(mass),
        "heatmap": {"rows": len(ys), "cols": len(xs), "window": finest, "x": xs, "y": ys,
                    "scores": [mass[1 + i] for i in fine]},
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sam", type=Path, help="a SAM artifact (export.py --random-sam): its reference as well")
    p.add_argument("--anomalib", type=Path, required=True,
                   help="the anomalib wheel unpacked (pip install --no-deps --target): WinCLIP's aggregation")
    args = p.parse_args()
    rng = random.Random(0)
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    out: Path = args.out
    (out / "ref").mkdir(parents=True, exist_ok=True)
    winclip_utils = load_winclip_utils(args.anomalib)
    harmonic_aggregation = winclip_utils.harmonic_aggregation

    import ftfy
    import open_clip
    from transformers import CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_clip import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    hf = args.model / "hf"
    tokenizer = CLIPTokenizer.from_pretrained(hf)
    manifest = json.loads((args.model / "clipqc-model.json").read_text())
    context = manifest["text"]["context_length"]

    # 1. Tokens: transformers' CLIPTokenizer (from vocab.json/merges, built by transformers) and
    #    open_clip's SimpleTokenizer (the original CLIP code: ftfy, html unescape, its own BPE).
    strings = make_strings(rng)
    oc = open_clip.tokenize(strings, context_length=context).tolist()
    with (out / "tokens.jsonl").open("w") as f:
        for s, oc_ids in zip(strings, oc):
            hf_ids = tokenizer(s, truncation=True, max_length=context)["input_ids"]
            eot = oc_ids.index(49407)
            # open_clip first rewrites text with ftfy.fix_text and html.unescape (curly quotes,
            # ligatures, fullwidth forms, entities); transformers' tokenizer does not.
            rewritten = ftfy.fix_text(s) != s or html.unescape(html.unescape(s)) != s
            f.write(json.dumps({"text": s, "hf": hf_ids, "open_clip": oc_ids[: eot + 1], "ftfy_rewrites": rewritten},
                               ensure_ascii=False) + "\n")

    # 2. Images through both CLIPImageProcessor backends, embedded by the transformers model.
    pil_proc = CLIPImageProcessorPil.from_pretrained(hf)
    tv_proc = CLIPImageProcessor.from_pretrained(hf)
    model = CLIPModel.from_pretrained(hf).eval()
    profile = {
        "templates": ["{}"],
        "review_threshold": 0.5,
        "classes": [
            {"name": "surface_scratch", "prompts": ["a photo of a surface scratch on a metal part"], "defect": True},
            {"name": "edge_chip", "prompts": ["a photo of a chipped edge on a metal part"], "defect": True},
            {"name": "paint_spot", "prompts": ["a photo of a paint spot on a metal part"], "defect": True},
            {"name": "misassembly", "prompts": ["a photo of a misassembled part"], "defect": True},
            {"name": "good_part", "prompts": ["a photo of a good metal part"], "defect": False},
        ],
    }
    prompts = [c["prompts"][0] for c in profile["classes"]]
    text = tokenizer(prompts, padding="max_length", max_length=context, return_tensors="pt")
    profile_tiled = {**profile, "tiles": TILES}
    index = {"images": [], "profile": profile, "profile_tiled": profile_tiled, "context_length": context}
    for name, img in write_images(out / "images", rng):
        stem = name.rsplit(".", 1)[0]
        px_pil = pil_proc(images=img, return_tensors="pt")["pixel_values"]
        px_tv = tv_proc(images=img, return_tensors="pt")["pixel_values"]
        emb = model.get_image_features(pixel_values=px_pil).pooler_output
        logits = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=px_pil).logits_per_image
        probs = logits.softmax(-1)[0].tolist()
        px_pad = pad_view(pil_proc, img, manifest["image"]["size"])
        emb_pad = model.get_image_features(pixel_values=px_pad).pooler_output
        logits_pad = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                           pixel_values=px_pad).logits_per_image
        px_pad[0].numpy().astype("<f4").tofile(out / "ref" / f"{stem}.pixels_pad.f32")
        emb_pad[0].numpy().astype("<f4").tofile(out / "ref" / f"{stem}.embedding_pad.f32")
        px_pil[0].numpy().astype("<f4").tofile(out / "ref" / f"{stem}.pixels_pil.f32")
        px_tv[0].numpy().astype("<f4").tofile(out / "ref" / f"{stem}.pixels_tv.f32")
        emb[0].numpy().astype("<f4").tofile(out / "ref" / f"{stem}.embedding.f32")
        entry = {"file": f"images/{name}", "stem": stem, "size": list(img.size), "mode": img.mode,
                 "probabilities": probs, "probabilities_pad": logits_pad.softmax(-1)[0].tolist()}
        if min(img.size) >= TILED_MIN_SHORT:
            entry["tiles"] = tiled_reference(pil_proc, model, text, img, px_pad, stem, manifest["image"]["size"],
                                             profile_tiled, out / "ref", harmonic_aggregation)
        index["images"].append(entry)
    tiled = [e for e in index["images"] if "tiles" in e]
    if len(tiled) >= 2:
        index["winclip_plus"] = winclip_plus_reference(winclip_utils, out / "ref", tiled, TILES["scales"],
                                                       manifest["embedding_dim"])
    if args.sam:
        from sam_reference import write_sam_reference

        images = [(e["file"], Image.open(out / e["file"])) for e in index["images"]]
        index["sam"] = write_sam_reference(args.sam, images, out)
    (out / "fixtures.json").write_text(json.dumps(index, indent=1, ensure_ascii=False))
    print(f"wrote {len(strings)} token cases and {len(index['images'])} images to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
