"""Writes the TorchScript module through which clipqc reaches torchvision's JPEG decoder.

    python deploy/model/device_ops.py worker/assets/device_ops.pt

tch 0.24 has no way to call a custom operator by name, but TorchScript can: this module's
methods call ``torch.ops.image.decode_jpeg`` (torchvision's CPU kernel, libjpeg-turbo) and
``torch.ops.image.decode_jpegs_cuda`` (nvJPEG) and nothing else. The worker embeds the file
(``include_bytes!``), loads torchvision's ``image.so`` so that the operators are registered, then
loads the module from memory (``worker/src/preprocess/device/ops.rs``). Every other step of the
device path (orientation, region, windows, resize, normalisation) is plain libtorch through tch,
so its geometry is the same Rust code as the CPU path's. Regenerate only when torchvision's
operator schemas change (the module records the calls, not torchvision's code).
"""

import sys
from typing import List

import torch
import torchvision  # noqa: F401  (registers torch.ops.image.*)


class DeviceOps(torch.nn.Module):
    def forward(self, data: torch.Tensor, mode: int) -> torch.Tensor:
        """One JPEG (uint8 bytes on the CPU) to CHW uint8 on the CPU, EXIF orientation NOT
        applied (the worker applies its own reading of it, the same on both devices)."""
        return torch.ops.image.decode_jpeg(data, mode, False)

    @torch.jit.export
    def decode_cuda(self, data: List[torch.Tensor], mode: int, index: int) -> List[torch.Tensor]:
        """A batch of JPEGs (uint8 bytes on the CPU) to CHW uint8 tensors on cuda:index."""
        return torch.ops.image.decode_jpegs_cuda(data, mode, torch.device("cuda", index))


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: device_ops.py OUT.pt")
    module = torch.jit.script(DeviceOps().eval())
    module.save(sys.argv[1])
    print(f"wrote {sys.argv[1]} (torch {torch.__version__}, torchvision {torchvision.__version__})")


if __name__ == "__main__":
    main()
