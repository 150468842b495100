"""The Segment Anything reference for tests/it/model_fidelity/sam.rs: masks and predicted IoUs
computed by transformers' own SamProcessor and SamModel on the checkpoint the SAM artifact was
traced from (`hf/` inside the artifact), for every fixture image and a few boxes.

Called by make_fixtures.py (`--sam DIR`). Per image it writes
  ref/{stem}.sam_pixels.f32    the processor's pixel_values (1×3×S×S, little-endian float32)
  ref/{stem}.sam_low_res.f32   the model's low-resolution mask logits, one box after another
and returns the index entry (`fixtures.json`'s `sam`): per image the boxes (x0, y0, x1, y1 in
source pixels), the processor's sizes, the boxes in the model's input frame, the predicted
IoUs, and each box's mask after the processor's post_process_masks (upscaled, padding cropped,
resized to the image, thresholded) as transformers' own uncompressed COCO RLE, with its area.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Boxes as fractions of the image (x0, y0, x1, y1): an off-centre square-ish one, one reaching
# the far corner, the whole frame, and a thin one, as a scratch's box would be.
BOX_FRACTIONS = [(0.10, 0.15, 0.55, 0.60), (0.45, 0.40, 1.00, 1.00), (0.0, 0.0, 1.0, 1.0),
                 (0.30, 0.45, 0.70, 0.55)]


def boxes_for(width: int, height: int) -> list[list[int]]:
    """Integer corners; the right and bottom ones are the last column and row inside the box,
    as SAM's own mask-to-box gives them."""
    return [[int(fx0 * (width - 1)), int(fy0 * (height - 1)), int(fx1 * (width - 1)), int(fy1 * (height - 1))]
            for fx0, fy0, fx1, fy1 in BOX_FRACTIONS]


def write_sam_reference(sam_dir: Path, images: list[tuple[str, "PIL.Image.Image"]], out: Path) -> dict:
    from transformers import SamModel, SamProcessor
    from transformers.models.sam.image_processing_sam import _mask_to_rle
    import json

    manifest = json.loads((sam_dir / "clipqc-sam.json").read_text())
    threshold = manifest["mask"]["threshold"]
    model = SamModel.from_pretrained(sam_dir / "hf").eval()
    processor = SamProcessor.from_pretrained(sam_dir / "hf")
    entries = []
    for file, img in images:
        stem = Path(file).stem
        width, height = img.size
        boxes = boxes_for(width, height)
        inputs = processor(images=img, input_boxes=[boxes], return_tensors="pt")
        output = model(**inputs, multimask_output=False)
        masks = processor.post_process_masks(output.pred_masks, inputs["original_sizes"],
                                             inputs["reshaped_input_sizes"], mask_threshold=threshold)[0]
        masks = masks[:, 0]  # boxes × H × W
        inputs["pixel_values"][0].numpy().astype("<f4").tofile(out / "ref" / f"{stem}.sam_pixels.f32")
        output.pred_masks[0, :, 0].numpy().astype("<f4").tofile(out / "ref" / f"{stem}.sam_low_res.f32")
        entries.append({
            "file": file,
            "stem": stem,
            "size": [width, height],
            "reshaped_input_size": [int(v) for v in inputs["reshaped_input_sizes"][0]],
            "boxes": boxes,
            "model_boxes": inputs["input_boxes"][0].tolist(),
            "iou": output.iou_scores[0, :, 0].tolist(),
            "masks": _mask_to_rle(masks),
            "area": [int(m.sum()) for m in masks],
        })
    return {
        "processor": type(processor.image_processor).__name__,
        "input_size": manifest["image"]["size"],
        "threshold": threshold,
        "images": entries,
    }
