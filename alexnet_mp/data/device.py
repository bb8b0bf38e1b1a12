"""Decoding prepared JPEGs where the model runs (data.decode=device): nvJPEG on a GPU.

The loader then only reads bytes; torchvision.io.decode_jpeg decodes the batch on `device` and the
crops are cut there. On the CPU the decoder is libjpeg-turbo, the same as the loader workers', so
the crops are identical to theirs; nvJPEG's inverse DCT may differ from it by a grey level or so.
"""
from __future__ import annotations

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from .augment import crops
from .common import DataError


class DeviceDecoder:
    """JPEG bytes of stored side x side images -> uint8 crops on `device`."""

    def __init__(self, side: int, crop: int, device):
        if not 0 < crop <= side:
            raise ValueError(f"crop {crop} must lie in [1, side={side}]")
        self.side, self.crop, self.device = side, crop, torch.device(device)

    def __call__(self, jpegs: list, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """uint8 (n, 3, c, c), or (n, 10, 3, c, c) for ten-crop offsets (n, 10, 2), on the device."""
        c = self.crop
        shape = (len(jpegs), *offsets.shape[1:-1], 3, c, c)
        if not len(jpegs):
            return torch.empty(shape, dtype=torch.uint8, device=self.device)
        images = decode_jpeg(list(jpegs), mode=ImageReadMode.RGB, device=self.device)
        for img in images:
            if tuple(img.shape) != (3, self.side, self.side):
                raise DataError(f"a prepared image decoded to {tuple(img.shape)}, not (3, {self.side}, "
                                f"{self.side}); set data.resize to the prepared size or prepare the set again")
        offsets, flips = offsets.cpu(), flips.cpu()
        return torch.stack([crops(img, o, f, c) for img, o, f in zip(images, offsets, flips)])
