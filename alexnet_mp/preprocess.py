"""An exported network's input pipeline: one image in, the model's input out, as training evaluated it.

The image becomes 8-bit RGB and its stored form exactly as the data package makes it from a
file (`data.decode.pil_to_rgb`, `data.decode.resize_crop`: the shorter side scaled to the
stored side S, the meta's ``resize``, and the centre S x S kept); the centre crop x crop is
cut from that and normalised by the data package's `Normalizer` with the meta's
``normalize`` mode, ``mean``, ``std`` and, for ``paper``, ``mean_image``.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .data import Normalizer
from .data.decode import UnsupportedImage, pil_to_rgb, resize_crop

PAPER_RATIO = 256 / 227  # the paper's stored side over its crop, for files that do not record the side


class PreprocessError(ValueError):
    """An image that cannot be turned into the model's input."""


def as_chw_uint8(image) -> torch.Tensor:
    """A PIL image (any mode training reads), or a uint8 tensor H x W x 3 or 3 x H x W, as uint8 3 x H x W."""
    if isinstance(image, Image.Image):
        try:
            rgb = pil_to_rgb(image)
        except UnsupportedImage as e:
            raise PreprocessError(str(e)) from None
        return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.dim() != 3:
        raise PreprocessError(f"expected a PIL image or a uint8 tensor of 3 dimensions, got "
                              f"{type(image).__name__} {getattr(image, 'dtype', '')} "
                              f"{tuple(getattr(image, 'shape', ()))}; convert it to uint8 RGB first")
    if image.shape[0] == 3:
        return image
    if image.shape[-1] == 3:
        return image.permute(2, 0, 1).contiguous()
    raise PreprocessError(f"a uint8 tensor of shape {tuple(image.shape)} has no colour axis of 3; "
                          f"give H x W x 3 or 3 x H x W RGB")


class Preprocess:
    """Callable: image -> float32 (1, 3, crop, crop), ready for the exported model."""

    def __init__(self, meta: dict):
        self.crop = int(meta["crop_size"])
        side = meta.get("resize")
        self.side = int(side) if side else max(self.crop, round(self.crop * PAPER_RATIO))
        self.mode = meta.get("normalize", "meanstd")
        stats = {"mean": meta["mean"], "std": meta["std"], "mean_image": meta.get("mean_image")}
        if self.mode == "paper" and stats["mean_image"] is None:
            raise PreprocessError("the file's meta says normalize=paper but holds no mean_image; export it again")
        self.normalizer = Normalizer(stats, self.mode, self.side, self.crop)
        self.offset = (self.side - self.crop) // 2  # the centre crop of evaluation

    def stored(self, image) -> torch.Tensor:
        """uint8 (3, S, S): the shorter side scaled to S, the centre S x S kept."""
        return resize_crop(as_chw_uint8(image), self.side)

    @torch.no_grad()
    def __call__(self, image) -> torch.Tensor:
        m, c = self.offset, self.crop
        crop = self.stored(image)[:, m:m + c, m:m + c].unsqueeze(0)
        offsets = torch.tensor([[m, m]], dtype=torch.int64)
        flips = torch.zeros(1, dtype=torch.bool)
        light = torch.zeros(1, 3, dtype=torch.float32)
        return self.normalizer(crop, offsets, flips, light)
