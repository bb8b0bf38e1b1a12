"""The network's initial weights, and conversion between the reference's and the columns' state dicts.

Every process draws the same full reference tensors (each layer from its own seeded
CPU generator) and keeps its slice, so the pair starts exactly where the reference
starts, whatever the devices.
"""
from __future__ import annotations

import math

import torch

from .config import ModelConfig
from .model import LAYERS, AlexNetColumn, AlexNetReference, column_range, layer_specs
from .transport import PeerLink

# Biases the paper sets to 1 (Caffe: 0.1), so that the ReLUs start with positive inputs.
UNIT_BIAS_LAYERS = ("conv2", "conv4", "conv5", "fc6", "fc7")


def layer_init(cfg: ModelConfig, name: str, fan_in: int) -> tuple[float, float]:
    """(weight std, bias value) of one layer under model.init."""
    if cfg.init == "he":
        return math.sqrt(2.0 / fan_in), 0.0
    if cfg.init == "caffe":  # bvlc_alexnet: biases 0.1, fc6/fc7 weights N(0, 0.005) at the default std
        std = cfg.init_std / 2 if name in ("fc6", "fc7") else cfg.init_std
        return std, 0.1 if name in UNIT_BIAS_LAYERS else 0.0
    return cfg.init_std, 1.0 if name in UNIT_BIAS_LAYERS else 0.0


def init_reference_state(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """The reference's initial weights, drawn on the CPU layer by layer."""
    state = {}
    for index, spec in enumerate(layer_specs(cfg)):
        g = torch.Generator().manual_seed(seed * 1009 + index)
        if spec.kernel:
            shape = (spec.out_features, spec.in_features // spec.groups, spec.kernel, spec.kernel)
        else:
            shape = (spec.out_features, spec.in_features)
        std, bias = layer_init(cfg, spec.name, math.prod(shape[1:]))
        state[f"{spec.name}.weight"] = torch.randn(shape, generator=g) * std
        state[f"{spec.name}.bias"] = torch.full((spec.out_features,), bias)
    return state


def split_state(ref_state: dict, cfg: ModelConfig, column: int) -> dict[str, torch.Tensor]:
    """The slice of a reference state dict that `column` holds."""
    out = {}
    for name in LAYERS:
        start, end = column_range(cfg, name, column)
        if end > start:
            for kind in ("weight", "bias"):
                out[f"{name}.{kind}"] = ref_state[f"{name}.{kind}"][start:end].clone()
    return out


def merge_states(column_states: list[dict], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The reference state dict assembled from both columns' state dicts."""
    out = {}
    for name in LAYERS:
        for kind in ("weight", "bias"):
            key = f"{name}.{kind}"
            out[key] = torch.cat([s[key] for s in column_states if key in s], dim=0)
    return out


def build_column(cfg: ModelConfig, column: int, link: PeerLink | None, seed: int,
                 device: torch.device | str = "cpu", overlap: bool = False, amp: str = "off",
                 channels_last: bool = False) -> AlexNetColumn:
    """One column with its share of the reference's initial weights; the
    keyword options are AlexNetColumn's (the dist.* config keys)."""
    model = AlexNetColumn(cfg, column, link, overlap=overlap, amp=amp, channels_last=channels_last)
    model.load_state_dict(split_state(init_reference_state(cfg, seed), cfg, column))
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def build_reference(cfg: ModelConfig, seed: int, device: torch.device | str = "cpu", amp: str = "off",
                    channels_last: bool = False) -> AlexNetReference:
    model = AlexNetReference(cfg, amp=amp, channels_last=channels_last)
    model.load_state_dict(init_reference_state(cfg, seed))
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def dropout_generator(seed: int, device) -> torch.Generator:
    # Offset from the init seeds so that masks and weights are unrelated streams.
    return torch.Generator(device=device).manual_seed(seed + 7_000_003)
