#!/usr/bin/env python3
"""The usual Python script, written down: what clipqc is benchmarked against (issue 5).

    python benches/baseline.py preprocess --model DIR --images DIR [--repeat N] [--json]
    python benches/baseline.py e2e --model DIR --image FILE --n N [--device cpu|cuda] [--json]

`--model` is a clipqc artifact directory (deploy/model/export.py); the script reads only its
`hf/` folder, the transformers checkpoint and processor the TorchScript encoders were traced
from, so both sides run identical weights.

preprocess: per image file, the time of the decode from bytes plus CLIPProcessor on ONE core
  (torch.set_num_threads(1)): Image.open(BytesIO(data)), then processor(images=img,
  return_tensors="pt"). Median over --repeat after a warm-up; images/s per core = 1000 / ms.
e2e: what a typical inspection script does per image: decode, processor(text=prompts,
  images=img, return_tensors="pt", padding=True), one forward pass of CLIPModel (float16 on
  CUDA, float32 on CPU), softmax over logits_per_image, argmax. One image per forward pass, the
  text encoded again every time (the script keeps no text embeddings). 5 warm-up passes.

Both print a table on stderr, and with --json one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import sys
import time
from io import BytesIO
from pathlib import Path

# Offline and quiet: the checkpoint is local; progress bars would interleave with the table.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

# padding=True with the tokenizer's model_max_length set: transformers warns on every call.
warnings.filterwarnings("ignore", message=r"`max_length` is ignored when `padding`=`True`")

# clipqc's built-in `default` profile (worker/src/score/profile.rs, ProfileConfig::builtin_default):
# templates and each class's prompts. The usual script writes one sentence per class; it uses the
# first template with each class's first prompt ("a photo of a surface scratch." ...).
DEFAULT_TEMPLATES = ["a photo of {}.", "a close-up photo of {} on a manufactured part."]
DEFAULT_CLASSES = [
    ("surface_scratch", ["a surface scratch", "a scratched surface"]),
    ("edge_chip", ["a chipped edge", "a chip broken off the edge"]),
    ("paint_spot", ["a paint spot", "a stain of paint"]),
    ("misassembly", ["a misassembled part", "a wrongly assembled component"]),
    ("good_part", ["a good part", "a flawless clean surface"]),
]
PROFILE_RS = Path(__file__).resolve().parent.parent / "worker" / "src" / "score" / "profile.rs"

BENCH_IMAGES = ("part_250.jpg", "part_1920x1080.jpg", "part_2448x2048_16bit.png")


def check_profile_source() -> None:
    """In the repository, warn when the constants above drift from profile.rs (the bundle for
    the GPU machine carries no Rust source, so there this is skipped)."""
    if not PROFILE_RS.exists():
        return
    src = PROFILE_RS.read_text()
    body = src[src.find("fn builtin_default"):src.find("#[cfg(test)]")]
    strings = re.findall(r'"([^"]*)"', body)
    expected = list(DEFAULT_TEMPLATES)
    for name, prompts in DEFAULT_CLASSES:
        expected += [name, *prompts]
    missing = [s for s in expected if s not in strings]
    if missing:
        print(f"warning: baseline.py's default profile differs from {PROFILE_RS}: {missing}", file=sys.stderr)


def default_prompts() -> tuple[list[str], list[str]]:
    return [n for n, _ in DEFAULT_CLASSES], [DEFAULT_TEMPLATES[0].format(p[0]) for _, p in DEFAULT_CLASSES]


def versions() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "pillow": Image.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0]}


def load_processor(model_dir: Path):
    from transformers import CLIPProcessor

    return CLIPProcessor.from_pretrained(model_dir / "hf")


def percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "max": float(a.max())}


def peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


# --- preprocess -------------------------------------------------------------------------------

def cmd_preprocess(args) -> dict:
    torch.set_num_threads(1)  # one core: CLIPImageProcessor's torchvision ops run on torch's CPU pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # and the fast tokenizer's batch on one thread
    processor = load_processor(args.model)
    files = [args.images / n for n in BENCH_IMAGES if (args.images / n).exists()]
    if not files:
        raise SystemExit(f"{args.images}: none of {', '.join(BENCH_IMAGES)} (benches/make_images.py writes them)")
    rows = []
    for path in files:
        data = path.read_bytes()
        # The 16-bit PNG opens as mode "I;16". The processor's do_convert_rgb calls
        # img.convert("RGB"), which in Pillow CLIPS each 16-bit value to 255 instead of scaling
        # it (0..65535 -> min(v, 255)): a full-range 16-bit image comes out almost white. The
        # usual script does exactly this, silently; it is timed as it is (the conversion is part
        # of the cost), and the mean pixel is reported to make the damage visible.
        img = Image.open(BytesIO(data))
        info = {"image": path.name, "bytes": len(data), "width": img.width, "height": img.height, "mode": img.mode}
        total, decode, proc = [], [], []
        for i in range(args.warmup + args.repeat):
            t0 = time.perf_counter()
            img = Image.open(BytesIO(data))
            img.load()  # the decode (Image.open only reads the header); the processor would do it anyway
            t1 = time.perf_counter()
            out = processor(images=img, return_tensors="pt")
            t2 = time.perf_counter()
            if i >= args.warmup:
                total.append((t2 - t0) * 1e3)
                decode.append((t1 - t0) * 1e3)
                proc.append((t2 - t1) * 1e3)
        px = out["pixel_values"]
        ms = statistics.median(total)
        rows.append({**info, "ms_per_image": ms, "decode_ms": statistics.median(decode),
                     "processor_ms": statistics.median(proc), "images_per_s_per_core": 1e3 / ms,
                     "pixel_values_shape": list(px.shape),
                     "pixel_mean_0_255": float(np.asarray(img.convert("RGB"), dtype=np.float32).mean())})
    # Tokenization and scoring as the usual script does them, next to the Rust micro-benchmarks
    # of the same work: the processor's tokenizer on one prompt and on the default profile's 20
    # (prompt x template) sentences; softmax(100 * cos) of one 512-d embedding against 5 classes.
    def median_us(fn, n: int) -> float:
        for _ in range(max(3, n // 10)):
            fn()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)
    tok = processor.tokenizer
    one = "a photo of a surface scratch on a steel bracket."
    # The same 20 sentences as the Rust bench: every prompt through every template.
    sentences = [t.format(p) for _, ps in DEFAULT_CLASSES for p in ps for t in DEFAULT_TEMPLATES]
    img_emb = torch.randn(1, 512)
    cls_emb = torch.nn.functional.normalize(torch.randn(5, 512), dim=-1)
    def score():
        e = torch.nn.functional.normalize(img_emb, dim=-1)
        return (100.0 * e @ cls_emb.T).softmax(dim=-1).argmax()
    micro = {
        "tokenize_one_us": median_us(lambda: tok(one, padding="max_length", max_length=77, truncation=True), 200),
        "tokenize_20_us": median_us(lambda: tok(sentences, padding="max_length", max_length=77, truncation=True), 100),
        "tokenizer": type(tok).__name__,
        "score_us": median_us(score, 2000),
    }
    result = {"kind": "preprocess", "model": str(args.model), "threads": torch.get_num_threads(),
              "repeat": args.repeat, "warmup": args.warmup,
              "image_processor": type(processor.image_processor).__name__, **versions(), "images": rows,
              "micro": micro}
    print(f"preprocess on one core ({result['image_processor']}, torch {result['torch']}, "
          f"transformers {result['transformers']}, Pillow {result['pillow']}; median of {args.repeat}):",
          file=sys.stderr)
    print(f"  {'image':<28} {'size':>11} {'mode':>5} {'decode ms':>10} {'proc ms':>9} {'total ms':>9} {'img/s/core':>11}",
          file=sys.stderr)
    for r in rows:
        print(f"  {r['image']:<28} {r['width']:>5}x{r['height']:<5} {r['mode']:>5} {r['decode_ms']:>10.2f} "
              f"{r['processor_ms']:>9.2f} {r['ms_per_image']:>9.2f} {r['images_per_s_per_core']:>11.1f}", file=sys.stderr)
    return result


# --- e2e --------------------------------------------------------------------------------------

def cmd_e2e(args) -> dict:
    from transformers import CLIPModel

    check_profile_source()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU")
    dtype = torch.float16 if cuda else torch.float32
    t_load = time.perf_counter()
    processor = load_processor(args.model)
    # `dtype=` is transformers 5's name for the usual script's `torch_dtype=`.
    model = CLIPModel.from_pretrained(args.model / "hf", dtype=dtype).to(device).eval()
    load_s = time.perf_counter() - t_load
    classes, prompts = default_prompts()
    data = args.image.read_bytes()

    def one() -> int:
        img = Image.open(BytesIO(data))
        inputs = processor(text=prompts, images=img, return_tensors="pt", padding=True).to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.inference_mode():
            out = model(**inputs)
            probs = out.logits_per_image.softmax(dim=-1)
            top = int(probs.argmax(dim=-1)[0])  # .item(): the host waits for the GPU here
        if cuda:
            torch.cuda.synchronize()
        return top

    for _ in range(args.warmup):
        one()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    lat, tops = [], [0] * len(classes)
    t0 = time.perf_counter()
    for _ in range(args.n):
        t = time.perf_counter()
        tops[one()] += 1
        lat.append((time.perf_counter() - t) * 1e3)
        if args.max_seconds and time.perf_counter() - t0 > args.max_seconds:
            break  # a time box (gpu.sh): report the images done so far
    seconds = time.perf_counter() - t0
    n = len(lat)
    result = {
        "kind": "e2e", "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "model": str(args.model), "image": str(args.image), "image_bytes": len(data),
        "image_processor": type(processor.image_processor).__name__,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "prompts": prompts, "n": n, "n_asked": args.n, "warmup": args.warmup, "load_s": load_s,
        "seconds": seconds, "images_per_s": n / seconds, "latency_ms": percentiles(lat),
        "top_class_counts": dict(zip(classes, tops)), "peak_rss_bytes": peak_rss_bytes(),
        "peak_gpu_bytes": int(torch.cuda.max_memory_allocated(device)) if cuda else None,
        **versions(),
    }
    lm = result["latency_ms"]
    print(f"baseline e2e: {n} images, one per forward pass, {result['device_name']} ({result['dtype']}), "
          f"torch {result['torch']}, transformers {result['transformers']}", file=sys.stderr)
    print(f"  images/s {result['images_per_s']:.1f}   latency ms p50 {lm['p50']:.2f}  p95 {lm['p95']:.2f}  "
          f"p99 {lm['p99']:.2f}   peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB   (load {load_s:.1f} s)",
          file=sys.stderr)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("preprocess", help="decode + CLIPProcessor per image on one core")
    pp.add_argument("--model", type=Path, required=True, help="clipqc artifact directory (its hf/ is read)")
    pp.add_argument("--images", type=Path, required=True, help="directory written by make_images.py")
    pp.add_argument("--repeat", type=int, default=20)
    pp.add_argument("--warmup", type=int, default=2)
    pp.add_argument("--json", action="store_true")
    pe = sub.add_parser("e2e", help="decode + processor + one forward pass per image")
    pe.add_argument("--model", type=Path, required=True, help="clipqc artifact directory (its hf/ is read)")
    pe.add_argument("--image", type=Path, required=True)
    pe.add_argument("--n", type=int, default=200)
    pe.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    pe.add_argument("--warmup", type=int, default=5)
    pe.add_argument("--max-seconds", type=float, default=0, help="stop after this long (0: run all --n)")
    pe.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = cmd_preprocess(args) if args.cmd == "preprocess" else cmd_e2e(args)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
