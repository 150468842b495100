#!/usr/bin/env python3
"""Export a CLIP-type checkpoint to the directory clipqc serves.

    python deploy/model/export.py --checkpoint ID_OR_DIR --out DIR
    python deploy/model/export.py --random tiny|vit-b-32 --out DIR
    python deploy/model/export.py --sam ID_OR_DIR --out DIR/sam       (Segment Anything)
    python deploy/model/export.py --random-sam tiny|vit-b --out DIR/sam

The artifact directory holds:
  image_encoder.pt   TorchScript, float [B,3,H,W] (normalised pixels) -> [B,D] (unnormalised)
  text_encoder.pt    TorchScript, int64 ids [B,L] (+ int64 attention mask [B,L] if the family
                     needs it) -> [B,D] (unnormalised)
  tokenizer.json     Hugging Face tokenizers format, loaded by the `tokenizers` crate
  clipqc-model.json  the manifest: how to preprocess, tokenize and score, plus sha256 of each file
  hf/                the transformers checkpoint (model + processor, save_pretrained) the encoders
                     were traced from: the fidelity tests and the Python baseline load it, so both
                     sides see identical weights. Not read by the worker.

Families: `clip` (OpenAI CLIP and OpenCLIP checkpoints in transformers format, e.g. laion/*),
`siglip` (sigmoid scoring, logit bias, squash resize), `chinese_clip` (BERT text tower; the
seed's Chinese defect prompts). `--random` builds randomly initialised CLIP models of real
architectures, offline: `tiny` for tests (seconds on CPU), `vit-b-32` for benchmarks (the
compute of the real ViT-B/32). Their tokenizer is CLIP's real BPE tokenizer, built from the
vocabulary that ships inside open_clip_torch.

`--sam` and `--random-sam` export a Segment Anything model for the segment stage instead: see
sam_export.py for its artifact.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import clip_bpe  # noqa: E402
import sam_export  # noqa: E402

MANIFEST = "clipqc-model.json"
FORMAT_VERSION = 1
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]

RANDOM_CONFIGS = {
    # Small enough to export and run in seconds on a laptop CPU, with CLIP's real input and
    # vocabulary sizes so that preprocessing and tokenization are exercised for real.
    "tiny": dict(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, vocab_size=49408),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, image_size=224, patch_size=32),
        projection_dim=32,
    ),
    # transformers' CLIPConfig defaults are OpenAI's ViT-B/32.
    "vit-b-32": dict(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, vocab_size=49408),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, image_size=224, patch_size=32),
        projection_dim=512,
    ),
}


@dataclass
class Adapter:
    """What differs between families: how to get features and how the worker must score."""

    family: str
    scoring: str  # "softmax" | "sigmoid"
    text_inputs: tuple[str, ...]  # ("input_ids", "attention_mask") or ("input_ids",)
    resize: str  # "shortest_edge" (+ center crop) | "squash"


ADAPTERS = {
    "clip": Adapter("clip", "softmax", ("input_ids", "attention_mask"), "shortest_edge"),
    "chinese_clip": Adapter("chinese_clip", "softmax", ("input_ids", "attention_mask"), "shortest_edge"),
    # SigLIP was trained on max-length padded text without a mask.
    "siglip": Adapter("siglip", "sigmoid", ("input_ids",), "squash"),
}


def features(out):
    """transformers >= 5 returns a model output whose pooler_output is the projected embedding."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def tower(model, prefixes: tuple[str, ...]):
    """A shallow copy of `model` holding only the submodules named with `prefixes`.

    A trace keeps every parameter of the module it wraps; without this each encoder file would
    carry both towers (for ViT-B/32, 600 MB instead of 350 + 250).
    """
    import copy

    m = copy.copy(model)
    m._modules = {k: (v if k.startswith(prefixes) else None) for k, v in model._modules.items()}
    return m


class ImageEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = tower(model, ("vision", "visual"))

    def forward(self, pixel_values):
        return features(self.model.get_image_features(pixel_values=pixel_values))


class TextEncoder(torch.nn.Module):
    def __init__(self, model, with_mask: bool):
        super().__init__()
        self.model = tower(model, ("text",))
        self.with_mask = with_mask

    def forward(self, input_ids, attention_mask=None):
        if self.with_mask:
            return features(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
        return features(self.model.get_text_features(input_ids=input_ids))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def image_settings(processor, adapter: Adapter) -> dict:
    ip = processor.image_processor
    size = ip.size
    crop = getattr(ip, "crop_size", None) or size
    if adapter.resize == "shortest_edge":
        resize_to = size.get("shortest_edge") or min(size["height"], size["width"])
        crop_size = crop.get("height", resize_to)
    else:
        resize_to = size.get("height") or size.get("shortest_edge")
        crop_size = resize_to
    resample = int(getattr(ip, "resample", 3))
    return {
        "size": int(crop_size),
        "resize": adapter.resize,
        "resize_size": int(resize_to),
        "interpolation": {2: "bilinear", 3: "bicubic"}.get(resample, "bicubic"),
        "rescale_factor": float(getattr(ip, "rescale_factor", 1 / 255)),
        "mean": [float(x) for x in ip.image_mean],
        "std": [float(x) for x in ip.image_std],
    }


def random_clip(preset: str, seed: int, work: Path):
    """A randomly initialised CLIP of a real architecture plus CLIP's real tokenizer/processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(seed)
    config = CLIPConfig(**RANDOM_CONFIGS[preset])
    # Pad with <|endoftext|> as OpenAI's checkpoints do; pooling takes the first eos.
    config.text_config.pad_token_id = 49407
    model = CLIPModel(config).eval()
    tok_dir = work / "tokenizer"
    clip_bpe.write_hf_tokenizer_files(tok_dir)
    vocab, merges = clip_bpe.load_vocab_and_merges(clip_bpe.find_bpe_vocab())
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in merges], pad_token=clip_bpe.EOS)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
        resample=3, image_mean=OPENAI_MEAN, image_std=OPENAI_STD,
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    # The served tokenizer.json is the one built here from the vocabulary, not transformers' own
    # construction: the fidelity tests then compare two independent builds of CLIP's tokenizer.
    return model, processor, "clip", tok_dir / "tokenizer.json"


def load_checkpoint(checkpoint: str):
    from transformers import AutoConfig, AutoModel, AutoProcessor

    config = AutoConfig.from_pretrained(checkpoint)
    family = config.model_type
    if family not in ADAPTERS:
        raise SystemExit(f"{checkpoint}: model type {family!r} is not supported (supported: {sorted(ADAPTERS)})")
    model = AutoModel.from_pretrained(checkpoint, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    return model, processor, family, None


def export(model, processor, family: str, source: str, name: str, out: Path,
           tokenizer_json: Path | None = None, batch_check: int = 3) -> dict:
    adapter = ADAPTERS[family]
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model.config, "_attn_implementation"):
        # Tracing needs the plain attention path; sdpa/flash dispatch does not script stably.
        model.set_attn_implementation("eager")
    img = image_settings(processor, adapter)
    tokenizer = processor.tokenizer
    text_cfg = getattr(model.config, "text_config", model.config)
    context_length = int(getattr(text_cfg, "max_position_embeddings", 77))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    example_px = torch.randn(2, 3, img["size"], img["size"])
    enc = tokenizer(["a photo of a part", "edge chip"], padding="max_length", max_length=context_length,
                    truncation=True, return_tensors="pt")
    example_text = tuple(enc[k] for k in adapter.text_inputs)

    with torch.no_grad():
        image_encoder = torch.jit.trace(ImageEncoder(model), example_px, check_trace=False)
        text_encoder = torch.jit.trace(TextEncoder(model, "attention_mask" in adapter.text_inputs),
                                       example_text, check_trace=False)
        # A trace records one batch size; check that the graph generalises to others.
        px = torch.randn(batch_check, 3, img["size"], img["size"])
        eager = ImageEncoder(model)(px)
        torch.testing.assert_close(image_encoder(px), eager, rtol=1e-4, atol=1e-5)
        enc3 = tokenizer(["a", "good part", "a photo of a scratched metal surface"], padding="max_length",
                         max_length=context_length, truncation=True, return_tensors="pt")
        t3 = tuple(enc3[k] for k in adapter.text_inputs)
        torch.testing.assert_close(text_encoder(*t3), TextEncoder(model, len(t3) == 2)(*t3), rtol=1e-4, atol=1e-5)
        dim = int(eager.shape[-1])

    image_encoder.save(str(out / "image_encoder.pt"))
    text_encoder.save(str(out / "text_encoder.pt"))
    if tokenizer_json is not None:
        (out / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    else:
        tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    hf_dir = out / "hf"
    model.save_pretrained(hf_dir)
    processor.save_pretrained(hf_dir)

    logit_scale = float(model.logit_scale.exp()) if hasattr(model, "logit_scale") else 100.0
    logit_bias = float(model.logit_bias) if getattr(model, "logit_bias", None) is not None else None
    files = ["image_encoder.pt", "text_encoder.pt", "tokenizer.json"]
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "family": family,
        "source_checkpoint": source,
        "embedding_dim": dim,
        "image": img,
        "text": {
            "context_length": context_length,
            "pad_token_id": int(pad_id),
            "inputs": list(adapter.text_inputs),
        },
        "scoring": adapter.scoring,
        "logit_scale": logit_scale,
        "logit_bias": logit_bias,
        "exported_with": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "files": {f: sha256(out / f) for f in files},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="Hugging Face hub id or local directory of a CLIP/SigLIP/Chinese-CLIP model")
    src.add_argument("--random", choices=sorted(RANDOM_CONFIGS), help="randomly initialised model, offline")
    src.add_argument("--sam", metavar="CHECKPOINT_OR_DIR", help="Hugging Face hub id or local directory of a "
                     "Segment Anything model (transformers' SamModel)")
    src.add_argument("--random-sam", choices=sorted(sam_export.RANDOM_SAM),
                     help="randomly initialised Segment Anything model, offline")
    p.add_argument("--out", required=True, type=Path, help="artifact directory to write")
    p.add_argument("--seed", type=int, default=0, help="seed for --random (same seed, same weights)")
    p.add_argument("--name", help="model name recorded in the manifest and in every verdict")
    args = p.parse_args(argv)

    torch.set_grad_enabled(False)
    if args.sam or args.random_sam:
        if args.random_sam:
            model, processor = sam_export.random_sam(args.random_sam, args.seed)
            source, name = f"random:{args.random_sam}:seed={args.seed}", args.name or f"sam-{args.random_sam}-random"
        else:
            model, processor = sam_export.load_sam(args.sam)
            source, name = args.sam, args.name or args.sam.rstrip("/").split("/")[-1]
        manifest = sam_export.export_sam(model, processor, source, name, args.out, sha256)
        print(f"exported {manifest['name']} (sam, input {manifest['image']['size']}) to {args.out}")
        return 0
    with tempfile.TemporaryDirectory() as work:
        if args.random:
            model, processor, family, tokenizer_json = random_clip(args.random, args.seed, Path(work))
            source, name = f"random:{args.random}:seed={args.seed}", args.name or f"clip-{args.random}-random"
        else:
            model, processor, family, tokenizer_json = load_checkpoint(args.checkpoint)
            source, name = args.checkpoint, args.name or args.checkpoint.rstrip("/").split("/")[-1]
        manifest = export(model, processor, family, source, name, args.out, tokenizer_json)
    print(f"exported {manifest['name']} ({manifest['family']}, dim {manifest['embedding_dim']}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
