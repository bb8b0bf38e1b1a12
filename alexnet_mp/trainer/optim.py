"""The optimiser: the paper's SGD with momentum, weight decay on weights only."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights only, as in the paper's update rule."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    return [{"params": weights, "weight_decay": weight_decay}, {"params": biases, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """Fused SGD (one pass over the weights per step, the same numbers as the loop).

    Momentum buffers start as zeros laid out like their parameters: the first step then
    computes what SGD's own first step computes (0.9 * 0 + g is g), an update skipped on the
    device (`found_inf`) never leaves a buffer uninitialised, and the buffers keep the
    parameters' memory format.
    """
    optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                                fused=True)
    if cfg.momentum:
        for group in optimizer.param_groups:
            for p in group["params"]:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return optimizer


def lr_factor(cfg: TrainConfig, replicas: int) -> int:
    """train.lr_scaling: "linear" multiplies the rate by the number of data-parallel replicas."""
    return replicas if cfg.lr_scaling == "linear" else 1


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def conform_state(optimizer: torch.optim.Optimizer) -> None:
    """After loading a state dict: momentum buffers laid out like their parameters.

    A checkpoint written in another memory format (dist.channels_last flipped) keeps its old
    strides on load, and the fused kernel walks parameters and buffers element by element.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None and buf.stride() != p.stride():
                optimizer.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(buf)
