"""The paper's augmentation as parameters, and crops of uint8 images.

Training: a random crop offset, a horizontal flip and PCA lighting alphas, drawn for every sample
from a generator seeded with (train.seed, epoch, index, salt). Every number is always drawn, so
turning flips or lighting off (or translations: data.random_crop=false gives centre crops) leaves
the other choices as they were. Evaluation: the centre crop; ten-crop: the four corners and the
centre (as torchvision's five_crop), then the same five mirrored.

The lighting vector sum_i alpha_i * lambda_i * p_i is in [0, 1] pixel units and is added by the
Normalizer (on the model's device), not here: the crops stay uint8.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .common import SALT_AUGMENT, rng


@dataclass
class Augment:
    side: int  # stored image side
    crop: int
    seed: int
    flip: bool
    lighting: float  # std of the PCA alphas; 0: off
    random_crop: bool
    eigval: np.ndarray  # (3,) float64
    eigvec: np.ndarray  # (3, 3) float64, eigenvectors as columns

    def train(self, epoch: int, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """offsets int64 (B, 2) as (y, x), flips bool (B,), light float32 (B, 3) for these samples."""
        n, c, side = len(indices), self.crop, self.side
        offsets, flips, light = np.empty((n, 2), np.int64), np.zeros(n, bool), np.zeros((n, 3))
        centre = (side - c) // 2
        for k, index in enumerate(indices):
            r = rng(self.seed, epoch, int(index), SALT_AUGMENT)
            y, x = r.integers(0, side - c + 1, size=2)
            flip = r.random() < 0.5
            alpha = r.normal(0.0, 1.0, size=3)
            offsets[k] = (y, x) if self.random_crop else (centre, centre)
            flips[k] = self.flip and flip
            if self.lighting > 0:
                # Elementwise, not a BLAS product: the numbers must not depend on the BLAS build.
                light[k] = (self.eigvec * (alpha * self.lighting * self.eigval)).sum(1)
        return torch.from_numpy(offsets), torch.from_numpy(flips), torch.from_numpy(light.astype(np.float32))

    def centre(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The centre crop, unflipped, no lighting, for n samples."""
        m = (self.side - self.crop) // 2
        return (torch.full((n, 2), m, dtype=torch.int64), torch.zeros(n, dtype=torch.bool),
                torch.zeros(n, 3, dtype=torch.float32))

    def ten(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ten crops per sample: offsets (n, 10, 2), flips (n, 10); light (n, 3) zeros."""
        c, side = self.crop, self.side
        m, e = (side - c) // 2, side - c
        five = torch.tensor([(0, 0), (0, e), (e, 0), (e, e), (m, m)], dtype=torch.int64)
        offsets = torch.cat([five, five]).expand(n, 10, 2).contiguous()
        flips = torch.tensor([False] * 5 + [True] * 5).expand(n, 10).contiguous()
        return offsets, flips, torch.zeros(n, 3, dtype=torch.float32)


def crop(image: torch.Tensor, offset: torch.Tensor, flip: bool, size: int) -> torch.Tensor:
    """The size x size crop of a (3, S, S) image at offset (y, x), mirrored when flip."""
    y, x = int(offset[0]), int(offset[1])
    out = image[:, y:y + size, x:x + size]
    return out.flip(-1) if flip else out


def crops(image: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """One crop (offsets (2,), flips ()) as (3, c, c), or several (offsets (k, 2)) as (k, 3, c, c)."""
    if offsets.dim() == 1:
        return crop(image, offsets, bool(flips), size).contiguous()
    return torch.stack([crop(image, o, bool(f), size) for o, f in zip(offsets, flips)])
