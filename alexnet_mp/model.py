"""AlexNet in two forms that compute the same function.

* `AlexNetReference`: one process, the Caffe-style grouped layout
  (groups=2 in conv2, conv4, conv5). The oracle of the tests, the baseline of
  the benchmarks, and the layout of exported files.
* `AlexNetColumn`: one of the paper's two columns, living in its own process
  and meeting its peer at conv3, fc6, fc7 and fc8 through `exchange`.

Every layer of the reference is split between the columns along its *output*
dimension (column 0's maps and classes first), so converting between the two
layouts is slicing and concatenating dim 0 of each weight and bias.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig, spatial_sizes
from .exchange import (BroadcastFromFirst, ExchangeWithFirst, GatherFromPeer, GatherOutput,
                       GatherToFirst, PeerLink)
from .lrn import LocalResponseNorm
from .overlap import CrossingLayer, op_for

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
# Layers that read both columns' outputs, i.e. where the columns exchange.
CROSSINGS = ("conv3", "fc6", "fc7", "fc8")
# Biases set to 1 by the paper's init, so that the ReLUs start with positive inputs.
PAPER_UNIT_BIAS = ("conv2", "conv4", "conv5", "fc6", "fc7")


@dataclass(frozen=True)
class LayerSpec:
    name: str
    in_features: int  # per reference layer (full input seen by one output unit's group)
    out_features: int  # over both columns
    kernel: int = 0  # 0 for fully connected layers
    stride: int = 1
    padding: int = 0
    groups: int = 1  # in the single-device reference


def layer_specs(cfg: ModelConfig) -> list[LayerSpec]:
    c1, c2, c3, c4, c5 = cfg.conv_widths
    pool5 = spatial_sizes(cfg.crop_size)[-1]
    return [
        LayerSpec("conv1", 3, c1, 11, 4, 0),
        LayerSpec("conv2", c1, c2, 5, 1, 2, groups=2),
        LayerSpec("conv3", c2, c3, 3, 1, 1),
        LayerSpec("conv4", c3, c4, 3, 1, 1, groups=2),
        LayerSpec("conv5", c4, c5, 3, 1, 1, groups=2),
        LayerSpec("fc6", c5 * pool5 * pool5, cfg.fc_width),
        LayerSpec("fc7", cfg.fc_width, cfg.fc_width),
        LayerSpec("fc8", cfg.fc_width, cfg.num_classes),
    ]


def column_range(cfg: ModelConfig, layer: str, column: int) -> tuple[int, int]:
    """The [start, end) output rows of `layer` that `column` owns."""
    spec = next(s for s in layer_specs(cfg) if s.name == layer)
    if layer == "fc8":
        if cfg.fc8 == "rank0":
            return (0, spec.out_features) if column == 0 else (spec.out_features, spec.out_features)
        first = spec.out_features - spec.out_features // 2  # odd class counts: column 0 takes one more
        return (0, first) if column == 0 else (first, spec.out_features)
    half = spec.out_features // 2
    return (column * half, (column + 1) * half)


def _make_layer(spec: LayerSpec, out_features: int, columns: int) -> nn.Module:
    """`columns`=2 builds the reference layer; 1 builds one column's share."""
    if spec.kernel == 0:
        return nn.Linear(spec.in_features, out_features)
    groups = spec.groups if columns == 2 else 1
    in_ch = spec.in_features if (columns == 2 or spec.groups == 1) else spec.in_features // 2
    return nn.Conv2d(in_ch, out_features, spec.kernel, spec.stride, spec.padding, groups=groups)


class SharedDropout(nn.Module):
    """Inverted dropout whose mask is drawn for the full width of the layer.

    The reference and both columns draw the same full mask from generators
    seeded alike, and each column keeps its own slice, so the pair drops exactly
    the units the reference drops. Likewise each of D data-parallel replicas
    draws the mask of the whole global batch and keeps its own rows.
    """

    def __init__(self, p: float, full_width: int, keep: tuple[int, int]):
        super().__init__()
        self.p, self.full_width, self.keep = p, full_width, keep
        self.generator: torch.Generator | None = None  # set by `set_dropout_generator`
        self.replica, self.replicas = 0, 1

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        rows = x.shape[0]
        noise = torch.rand((rows * self.replicas, self.full_width), generator=self.generator, device=x.device)
        noise = noise[self.replica * rows:(self.replica + 1) * rows]
        mask = (noise[:, self.keep[0]:self.keep[1]] >= self.p).to(x.dtype)
        return x * mask / (1 - self.p)


class _AlexNetBase(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        lrn = cfg.lrn
        # torch.nn.LocalResponseNorm's function, a few times faster (lrn.py).
        self.lrn = LocalResponseNorm(lrn.size, lrn.alpha, lrn.beta, lrn.k)

    def set_dropout_generator(self, generator: torch.Generator, replica: int = 0, replicas: int = 1) -> None:
        for m in self.modules():
            if isinstance(m, SharedDropout):
                m.generator, m.replica, m.replicas = generator, replica, replicas

    @staticmethod
    def pool(x):
        return F.max_pool2d(x, 3, 2)


class AlexNetReference(_AlexNetBase):
    """The whole network in one process, with grouped convolutions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        for spec in layer_specs(cfg):
            setattr(self, spec.name, _make_layer(spec, spec.out_features, columns=2))
        self.drop6 = SharedDropout(cfg.dropout, cfg.fc_width, (0, cfg.fc_width))
        self.drop7 = SharedDropout(cfg.dropout, cfg.fc_width, (0, cfg.fc_width))

    def grouped_lrn(self, x):
        # Each column normalised over its own maps only; one LRN over all the
        # reference's maps would mix the columns at their border.
        return torch.cat([self.lrn(half) for half in x.chunk(2, dim=1)], dim=1)

    def forward(self, x):
        x = self.pool(self.grouped_lrn(F.relu(self.conv1(x))))
        x = self.pool(self.grouped_lrn(F.relu(self.conv2(x))))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        x = self.pool(F.relu(self.conv5(x)))
        x = self.drop6(F.relu(self.fc6(x.flatten(1))))
        x = self.drop7(F.relu(self.fc7(x)))
        return self.fc8(x)


class AlexNetColumn(_AlexNetBase):
    """One column of the pair. `forward` returns the full logits on both columns.

    Runtime options (the dist.* config keys; they change speed, not results):
    `overlap` computes each crossing layer's own half while the exchange is in
    flight (overlap.py); `amp`="bf16" runs under bf16 autocast, so activations
    cross in bf16 (half the bytes); `channels_last` runs the convolutions, and
    sends 4-D activations, in NHWC.
    """

    def __init__(self, cfg: ModelConfig, column: int, link: PeerLink | None, overlap: bool = False,
                 amp: str = "off", channels_last: bool = False):
        super().__init__(cfg)
        self.column, self.link, self.overlap = column, link, overlap
        self.amp, self.channels_last = amp, channels_last
        for spec in layer_specs(cfg):
            start, end = column_range(cfg, spec.name, column)
            if end > start:  # column 1 holds no fc8 when fc8 lives on column 0
                setattr(self, spec.name, _make_layer(spec, end - start, columns=1))
        self.drop6 = SharedDropout(cfg.dropout, cfg.fc_width, column_range(cfg, "fc6", column))
        self.drop7 = SharedDropout(cfg.dropout, cfg.fc_width, column_range(cfg, "fc7", column))
        peer_fc8 = column_range(cfg, "fc8", 1 - column)
        self.peer_classes = peer_fc8[1] - peer_fc8[0]  # the width of the logits the peer sends
        if link is not None and channels_last:
            link.memory_format = torch.channels_last  # the wire layout follows the model's
        if overlap:
            # Overlapped crossing layers take this column's shard and exchange inside
            # their own forward, so module hooks (the profiler's) still see the layer.
            for name in CROSSINGS:
                if hasattr(self, name):
                    mutual = not (name == "fc8" and cfg.fc8 == "rank0")
                    layer = getattr(self, name)
                    layer.forward = functools.partial(self.overlapped, layer, op_for(layer), name, mutual)

    def gather(self, act_shard, crossing):
        return GatherFromPeer.apply(act_shard, self.link, crossing)

    def overlapped(self, layer, op, crossing, mutual, act_shard):
        return CrossingLayer.apply(act_shard, layer.weight, layer.bias, op, self.link, crossing, mutual)

    def cross(self, layer, act_shard, crossing):
        """`layer` applied to both columns' activations."""
        if self.overlap:
            return layer(act_shard)
        return layer(self.gather(act_shard, crossing))

    def forward(self, x):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp == "bf16"):
            logits = self.features_and_classifier(x)
        return logits.float()  # the loss and softmax in fp32

    def features_and_classifier(self, x):
        x = self.pool(self.lrn(F.relu(self.conv1(x))))
        x = self.pool(self.lrn(F.relu(self.conv2(x))))
        x = F.relu(self.cross(self.conv3, x, "conv3"))
        x = F.relu(self.conv4(x))
        x = self.pool(F.relu(self.conv5(x)))
        x = self.drop6(F.relu(self.cross(self.fc6, x.flatten(1), "fc6")))
        x = self.drop7(F.relu(self.cross(self.fc7, x, "fc7")))
        return self.classify(x)

    def classify(self, act_shard):
        if self.cfg.fc8 == "split":
            logits_shard = self.cross(self.fc8, act_shard, "fc8")
            return GatherOutput.apply(logits_shard, self.peer_classes, self.link)
        if self.column == 1:
            return ExchangeWithFirst.apply(act_shard, self.cfg.num_classes, self.link)
        if self.overlap:
            logits = self.fc8(act_shard)
        else:
            logits = self.fc8(GatherToFirst.apply(act_shard, self.link))
        return BroadcastFromFirst.apply(logits, self.link)


# ------------------------------------------------------------------ weights


def init_reference_state(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """The reference's initial weights, drawn on the CPU layer by layer.

    Every process draws the same full tensors (each layer from its own seeded
    generator) and keeps its slice, so the pair starts exactly where the
    reference starts, whatever the devices.
    """
    state = {}
    for index, spec in enumerate(layer_specs(cfg)):
        g = torch.Generator().manual_seed(seed * 1009 + index)
        if spec.kernel:
            shape = (spec.out_features, spec.in_features // spec.groups, spec.kernel, spec.kernel)
        else:
            shape = (spec.out_features, spec.in_features)
        fan_in = math.prod(shape[1:])
        if cfg.init == "paper":
            std, bias = cfg.init_std, 1.0 if spec.name in PAPER_UNIT_BIAS else 0.0
        else:  # He-normal for ReLU networks
            std, bias = math.sqrt(2.0 / fan_in), 0.0
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


def build_reference(cfg: ModelConfig, seed: int, device: torch.device | str = "cpu") -> AlexNetReference:
    model = AlexNetReference(cfg)
    model.load_state_dict(init_reference_state(cfg, seed))
    return model.to(device)


def dropout_generator(seed: int, device) -> torch.Generator:
    # Offset from the init seeds so that masks and weights are unrelated streams.
    return torch.Generator(device=device).manual_seed(seed + 7_000_003)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights only, as in the paper's update rule."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    return [{"params": weights, "weight_decay": weight_decay}, {"params": biases, "weight_decay": 0.0}]
