"""The configurations the checks run, and the fixed batch their single passes use."""
from __future__ import annotations

import torch

from ..config import Config, build_config

# Every check: the built-in images, loaded in the process, no progress bars or ten-crop evaluation.
QUIET = ["data.dataset=synthetic", "data.num_workers=0", "data.ten_crop=false", "run.progress=false",
         "run.log_every=1000", "data.val_size=16"]
# A small network for the checks of exactness: seconds even on a CPU, every code path of the paper's.
SMALL = ["model.num_classes=10", "model.crop_size=67", "model.conv_widths=[16,32,48,48,32]",
         "model.fc_width=64", "model.init=he", "data.image_size=72", "data.resize=72"]
# The paper's network (every width, 1000 classes, 227 px crops) for the figures and the numerics.
PAPER = ["model.init=he", "data.image_size=256", "data.resize=256"]


def config(*overrides: str) -> Config:
    return build_config(overrides=[*QUIET, *overrides])


def fixed_batch(cfg: Config, device, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal-distributed images and labels drawn on the CPU from train.seed, then moved to `device`."""
    g = torch.Generator().manual_seed(cfg.train.seed + 1)
    n, c = batch or cfg.train.batch_size, cfg.model.crop_size
    images = torch.randn(n, 3, c, c, generator=g)
    labels = torch.randint(0, cfg.model.num_classes, (n,), generator=g)
    return images.to(device), labels.to(device)


def one_pass(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """The logits and every parameter's gradient after one forward and backward pass in training mode."""
    model.train()
    logits = model(images)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    out = {"logits": logits.detach()}
    out.update({f"grad.{name}": p.grad.detach() for name, p in model.named_parameters()})
    return out
