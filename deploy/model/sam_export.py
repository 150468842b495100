"""Export a Segment Anything checkpoint (transformers' SamModel) for clipqc's segment stage.

    python deploy/model/export.py --sam ID_OR_DIR --out DIR/sam
    python deploy/model/export.py --random-sam tiny|vit-b --out DIR/sam

The artifact directory holds:
  image_encoder.pt  TorchScript, float [B,3,S,S] (normalised pixels, the image resized so its
                    longest side is S and padded with zeros at the bottom and right) ->
                    image embeddings [B,C,h,w]
  mask_decoder.pt   TorchScript, (image embeddings [1,C,h,w], boxes [1,N,4] float32 x0,y0,x1,y1
                    in the S×S input frame) -> (low-resolution mask logits [1,N,1,4h,4w],
                    predicted IoU [1,N,1]): the prompt encoder, the image-wide positional
                    embedding and the mask decoder, one mask per box (SAM's single-mask output,
                    what its authors use for unambiguous box prompts)
  clipqc-sam.json   the manifest: input size, resize rule, mean/std, mask threshold, the
                    shapes above and the sha256 of each file
  hf/               the transformers checkpoint (model + processor) the modules were traced
                    from; the fidelity references load it. Not read by the worker.

`--random-sam` builds randomly initialised SAMs offline: `tiny` for tests (a 128-pixel input,
two vision layers: milliseconds on a CPU), `vit-b` with the shapes of facebook/sam-vit-base for
measuring cost. transformers' random initialisation is changed in two ways so that a random
model behaves like a trained one where the tests look: weights drawn with a standard deviation
(`init`) that keeps activations of order one (its default for the vision tower, 1e-10, makes
every image embedding zero, and the masks independent of the image), and the random Fourier
features of the positional embedding drawn with standard deviation 1 as segment-anything's
PositionEmbeddingRandom does (transformers draws them with hidden_size / 2, which makes
neighbouring pixels' encodings unrelated and masks pixel noise).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

MANIFEST = "clipqc-sam.json"
FORMAT_VERSION = 1
ENCODER = "image_encoder.pt"
DECODER = "mask_decoder.pt"
SUPPORTED = ("sam",)

RANDOM_SAM = {
    "tiny": dict(
        init=0.15,
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=128,
                           patch_size=16, window_size=4, global_attn_indexes=[1], output_channels=32,
                           num_pos_feats=16, mlp_dim=64),
        prompt_encoder_config=dict(hidden_size=32, image_size=128, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
    ),
    # facebook/sam-vit-base's shapes; the prompt encoder and mask decoder are transformers'
    # defaults, which are SAM's.
    "vit-b": dict(
        init=0.02,
        vision_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=1024,
                           patch_size=16, window_size=14, global_attn_indexes=[2, 5, 8, 11],
                           output_channels=256, num_pos_feats=128, mlp_dim=3072),
        prompt_encoder_config=dict(hidden_size=256, image_size=1024, patch_size=16),
        mask_decoder_config=dict(),
    ),
}


class ImageEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.vision_encoder = model.vision_encoder

    def forward(self, pixel_values):
        return self.vision_encoder(pixel_values).last_hidden_state


class BoxDecoder(torch.nn.Module):
    """Boxes on one image's embeddings -> one mask and its predicted IoU per box, as
    SamModel.forward(image_embeddings=..., input_boxes=..., multimask_output=False)."""

    def __init__(self, model):
        super().__init__()
        self.shared_image_embedding = model.shared_image_embedding
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        self.grid = model.config.prompt_encoder_config.image_embedding_size

    def positional(self):
        # SamModel.get_image_wide_positional_embeddings, on this module's own weights.
        weight = self.shared_image_embedding.positional_embedding
        grid = torch.ones((self.grid, self.grid), device=weight.device, dtype=weight.dtype)
        y = (grid.cumsum(dim=0) - 0.5) / self.grid
        x = (grid.cumsum(dim=1) - 0.5) / self.grid
        return self.shared_image_embedding(torch.stack([x, y], dim=-1)).permute(2, 0, 1).unsqueeze(0)

    def forward(self, image_embeddings, boxes):
        sparse, dense = self.prompt_encoder(input_points=None, input_labels=None, input_boxes=boxes,
                                            input_masks=None)
        masks, iou = self.mask_decoder(image_embeddings=image_embeddings,
                                       image_positional_embeddings=self.positional(),
                                       sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                       multimask_output=False)
        return masks, iou


def random_sam(preset: str, seed: int):
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    spec = RANDOM_SAM[preset]
    torch.manual_seed(seed)
    vision = dict(spec["vision_config"], initializer_range=spec["init"])
    config = SamConfig(vision_config=vision, prompt_encoder_config=spec["prompt_encoder_config"],
                       mask_decoder_config=spec["mask_decoder_config"], initializer_range=spec["init"])
    model = SamModel(config).eval()
    with torch.no_grad():
        model.shared_image_embedding.positional_embedding.normal_(0.0, 1.0)
        # Tied in transformers' checkpoints; copied so that a save/load round trip keeps them.
        model.prompt_encoder.shared_embedding.positional_embedding.copy_(
            model.shared_image_embedding.positional_embedding)
    size = vision["image_size"]
    processor = SamProcessor(image_processor=SamImageProcessor(
        size={"longest_edge": size}, pad_size={"height": size, "width": size},
        mask_size={"longest_edge": size // 4}, mask_pad_size={"height": size // 4, "width": size // 4}))
    return model, processor


def load_sam(checkpoint: str):
    from transformers import AutoConfig, SamModel, SamProcessor

    family = AutoConfig.from_pretrained(checkpoint).model_type
    if family not in SUPPORTED:
        raise SystemExit(f"{checkpoint}: model type {family!r} is not supported for --sam "
                         f"(supported: {list(SUPPORTED)}; SAM 2 and SAM-HQ have other decoders)")
    model = SamModel.from_pretrained(checkpoint, attn_implementation="eager").eval()
    return model, SamProcessor.from_pretrained(checkpoint)


def image_settings(processor, size: int) -> dict:
    ip = processor.image_processor
    if ip.size.get("longest_edge") != size or (ip.pad_size["height"], ip.pad_size["width"]) != (size, size):
        raise SystemExit(f"the processor resizes to {ip.size} and pads to {ip.pad_size}, but the model takes "
                         f"{size}×{size}: clipqc serves SAM's own rule (longest side to the input size, "
                         "padded bottom and right)")
    if int(ip.resample) != 2:
        raise SystemExit(f"the processor resamples with {ip.resample!r}; clipqc serves bilinear (2) only")
    return {
        "size": size,
        "resize": "longest_edge",
        "interpolation": "bilinear",
        "pad": "bottom_right",
        "rescale_factor": float(ip.rescale_factor),
        "mean": [float(x) for x in ip.image_mean],
        "std": [float(x) for x in ip.image_std],
    }


def export_sam(model, processor, source: str, name: str, out: Path, sha256) -> dict:
    if hasattr(model.config, "_attn_implementation"):
        # Tracing needs the plain attention path, as for CLIP.
        model.set_attn_implementation("eager")
    out.mkdir(parents=True, exist_ok=True)
    size = int(model.config.vision_config.image_size)
    img = image_settings(processor, size)
    encoder, decoder = ImageEncoder(model).eval(), BoxDecoder(model).eval()

    def boxes(n: int) -> torch.Tensor:
        xy = torch.rand(1, n, 2) * size * 0.6
        return torch.cat([xy, xy + torch.rand(1, n, 2) * size * 0.4], dim=-1)

    with torch.no_grad():
        px = torch.randn(1, 3, size, size)
        traced_encoder = torch.jit.trace(encoder, px, check_trace=False)
        embeddings = encoder(px)
        traced_decoder = torch.jit.trace(decoder, (embeddings, boxes(2)), check_trace=False)
        # A trace records one batch size and one box count: check that the graphs generalise,
        # and that the decoder computes what SamModel itself does.
        px2 = torch.randn(2, 3, size, size)
        torch.testing.assert_close(traced_encoder(px2), encoder(px2), rtol=1e-4, atol=1e-5)
        for n in (1, 3):
            b = boxes(n)
            ours = traced_decoder(embeddings, b)
            reference = model(image_embeddings=embeddings, input_boxes=b, multimask_output=False)
            torch.testing.assert_close(ours[0], reference.pred_masks, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ours[1], reference.iou_scores, rtol=1e-4, atol=1e-5)
        channels, grid_h, grid_w = (int(d) for d in embeddings.shape[1:])
        low_res = int(ours[0].shape[-1])

    traced_encoder.save(str(out / ENCODER))
    traced_decoder.save(str(out / DECODER))
    model.save_pretrained(out / "hf")
    processor.save_pretrained(out / "hf")
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "family": "sam",
        "source_checkpoint": source,
        "image": img,
        "embedding": {"channels": channels, "height": grid_h, "width": grid_w},
        "mask": {"low_res_size": low_res, "threshold": 0.0, "multimask_output": False},
        "exported_with": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "files": {f: sha256(out / f) for f in (ENCODER, DECODER)},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
