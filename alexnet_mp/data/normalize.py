"""Model input from uint8 crops, on the model's device: the data.normalize modes and PCA lighting.

    meanstd: (x / 255 - mean + light) / std per channel (mean, std in [0, 1] units)
    mean:    x - 255 * mean + 255 * light per channel (raw 0-255 pixels, centred)
    paper:   x - mean_image[source pixel] + 255 * light, where the source pixel of crop pixel (i, j)
             is (y + i, x + j) in the stored image, or (y + i, x + c - 1 - j) for a mirrored crop:
             the mean is subtracted where the pixel came from, as Caffe does before cropping.

Lighting is added before any division and not clipped (as in the paper).
"""
from __future__ import annotations

import torch


class Normalizer(torch.nn.Module):
    """uint8 (N, 3, c, c) crops, their offsets (N, 2), flips (N,) and lighting (N, 3) -> float32 input.

    stats: "mean" and "std" (3 values, [0, 1] units) and, for mode "paper", "mean_image" (3, side,
    side) in 0-255 units. Ten-crop batches are flattened to (B * 10, ...) by the caller. The
    statistics are buffers: .to(device) once avoids a copy per call on another device.
    """

    def __init__(self, stats: dict, mode: str, side: int, crop: int):
        super().__init__()
        if mode not in ("paper", "mean", "meanstd"):
            raise ValueError(f"normalize mode {mode!r} is not one of paper, mean, meanstd")
        if not 0 < crop <= side:
            raise ValueError(f"crop {crop} must lie in [1, side={side}]")
        self.mode, self.side, self.crop = mode, side, crop
        mean = torch.as_tensor(stats["mean"], dtype=torch.float64)
        std = torch.as_tensor(stats["std"], dtype=torch.float64)
        self.register_buffer("mean", mean.float())
        # meanstd as x * scale + (light - mean) / std: one multiply-add per pixel.
        self.register_buffer("scale", (1 / (255 * std)).float())
        self.register_buffer("inv_std", (1 / std).float())
        image = stats.get("mean_image") if mode == "paper" else None
        if mode == "paper":
            if image is None:
                raise ValueError("normalize mode paper needs stats['mean_image']; rebuild the data statistics")
            image = torch.as_tensor(image, dtype=torch.float32)
            if tuple(image.shape) != (3, side, side):
                raise ValueError(f"mean_image has shape {tuple(image.shape)}, not (3, {side}, {side}); "
                                 f"use statistics of the same stored side")
        self.register_buffer("mean_image", image)

    def _source_mean(self, offsets: torch.Tensor, flips: torch.Tensor, dev: torch.device) -> torch.Tensor:
        """mean_image at each crop pixel's source position: (N, 3, c, c), gathered on `dev`."""
        c, image = self.crop, self.mean_image.to(dev)
        offsets, flips = offsets.to(dev), flips.to(dev)
        span = torch.arange(c, device=dev)
        rows = offsets[:, 0, None] + span  # (N, c)
        cols = offsets[:, 1, None] + torch.where(flips[:, None], c - 1 - span, span)
        return image[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)

    def forward(self, images_u8: torch.Tensor, offsets: torch.Tensor | None = None,
                flips: torch.Tensor | None = None, light: torch.Tensor | None = None) -> torch.Tensor:
        """float32 (N, 3, c, c) on the images' device; offsets default to the centre, flips to none."""
        dev, n = images_u8.device, images_u8.shape[0]
        x = images_u8.to(torch.float32)
        light = torch.zeros(n, 3, device=dev) if light is None else light.to(dev, torch.float32)
        mean = self.mean.to(dev)
        if self.mode == "meanstd":
            bias = (light - mean) * self.inv_std.to(dev)
            return torch.addcmul(bias[:, :, None, None], x, self.scale.to(dev)[:, None, None])
        if self.mode == "mean":
            return x + (255 * (light - mean))[:, :, None, None]
        if offsets is None:
            offsets = torch.full((n, 2), (self.side - self.crop) // 2, dtype=torch.int64)
        if flips is None:
            flips = torch.zeros(n, dtype=torch.bool)
        return x - self._source_mean(offsets, flips, dev) + (255 * light)[:, :, None, None]
