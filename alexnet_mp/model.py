"""AlexNet in two forms that compute the same function.

* `AlexNetReference`: the whole network in one process. With model.columns=2 it is
  the Caffe-style grouped layout (groups=2 in conv2, conv4, conv5): the oracle of
  the tests, the baseline of the benchmarks and the layout of exported files. With
  model.columns=1 it is the paper's one-GPU comparison network.
* `AlexNetColumn`: one of the paper's two columns, living in its own process and
  meeting its peer at conv3, fc6, fc7 and fc8 (`mappings.py`, `overlap.py`).

Every layer of the grouped reference is split between the columns along its
*output* dimension (column 0's maps and classes first), so converting between the
two layouts is slicing and concatenating dim 0 of each weight and bias (`weights.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import POOL_KERNEL, ModelConfig, spatial_sizes
from .lrn import LocalResponseNorm
from .mappings import broadcast_from_first, exchange_with_first, gather_from_peer, gather_output, gather_to_first
from .overlap import op_for, overlapped_crossing
from .transport import PeerLink

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
# Layers that read both columns' outputs, i.e. where the columns exchange.
CROSSINGS = ("conv3", "fc6", "fc7", "fc8")


@dataclass(frozen=True)
class LayerSpec:
    name: str
    in_features: int  # per reference layer (full input seen by one output unit's group)
    out_features: int  # over both columns
    kernel: int = 0  # 0 for fully connected layers
    stride: int = 1
    padding: int = 0
    groups: int = 1  # in the single-device reference


def conv_widths(cfg: ModelConfig) -> list[int]:
    """Output maps of conv1..conv5. The one-column network halves conv1-conv4 and keeps conv5
    (and the fc layers) as wide as both columns together, as the paper's footnote 3 says."""
    if cfg.columns == 1:
        return [w // 2 for w in cfg.conv_widths[:4]] + [cfg.conv_widths[4]]
    return list(cfg.conv_widths)


def layer_specs(cfg: ModelConfig) -> list[LayerSpec]:
    c1, c2, c3, c4, c5 = conv_widths(cfg)
    g = 2 if cfg.columns == 2 else 1
    pool5 = spatial_sizes(cfg.crop_size, cfg.pool)[-1]
    return [
        LayerSpec("conv1", 3, c1, 11, 4, 0),
        LayerSpec("conv2", c1, c2, 5, 1, 2, groups=g),
        LayerSpec("conv3", c2, c3, 3, 1, 1),
        LayerSpec("conv4", c3, c4, 3, 1, 1, groups=g),
        LayerSpec("conv5", c4, c5, 3, 1, 1, groups=g),
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


class _Crossing:
    """A layer of a column that reads both columns' activations. With a link set
    (dist.overlap), its forward takes this column's shard and exchanges inside,
    computing its own half while the peer's activations travel; without, it is
    the plain layer applied to the gathered input. Module hooks see it either way."""

    link: PeerLink | None = None
    crossing, mutual = "", True

    def overlap_with(self, link: PeerLink, crossing: str, mutual: bool) -> None:
        self.link, self.crossing, self.mutual, self.op = link, crossing, mutual, op_for(self)

    def forward(self, x):
        if self.link is None:
            return super().forward(x)
        return overlapped_crossing(x, self, self.op, self.link, self.crossing, self.mutual)


class CrossingConv2d(_Crossing, nn.Conv2d):
    pass


class CrossingLinear(_Crossing, nn.Linear):
    pass


def _make_layer(spec: LayerSpec, out_features: int, columns: int, crossing: bool = False) -> nn.Module:
    """`columns`=2 builds the reference layer; 1 builds one column's share."""
    if spec.kernel == 0:
        return (CrossingLinear if crossing else nn.Linear)(spec.in_features, out_features)
    groups = spec.groups if columns == 2 else 1
    in_ch = spec.in_features if (columns == 2 or spec.groups == 1) else spec.in_features // 2
    cls = CrossingConv2d if crossing else nn.Conv2d
    return cls(in_ch, out_features, spec.kernel, spec.stride, spec.padding, groups=groups)


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
    """What every form shares: the stages after each layer, and the runtime options.

    Runtime options (the dist.* config keys; they change speed, not results):
    `amp`="bf16" runs under bf16 autocast (activations cross in bf16, half the bytes);
    `channels_last` runs the convolutions, and sends 4-D activations, in NHWC.
    """

    def __init__(self, cfg: ModelConfig, amp: str = "off", channels_last: bool = False):
        super().__init__()
        self.cfg, self.amp, self.channels_last = cfg, amp, channels_last
        self.act = F.relu if cfg.activation == "relu" else torch.tanh
        self.pool_kernel = POOL_KERNEL[cfg.pool]
        lrn = cfg.lrn
        # torch.nn.LocalResponseNorm's function, a few times faster (lrn.py).
        self.lrn = LocalResponseNorm(lrn.size, lrn.alpha, lrn.beta, lrn.k) if lrn.enabled else None

    def set_dropout_generator(self, generator: torch.Generator, replica: int = 0, replicas: int = 1) -> None:
        for m in self.modules():
            if isinstance(m, SharedDropout):
                m.generator, m.replica, m.replicas = generator, replica, replicas

    def pool(self, x):
        return F.max_pool2d(x, self.pool_kernel, 2)

    def norm(self, x):
        """LRN over this column's maps (identity with model.lrn.enabled=false)."""
        return x if self.lrn is None else self.lrn(x)

    def forward(self, x):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp == "bf16"):
            logits = self.features_and_classifier(x)
        return logits.float()  # the loss and softmax in fp32


class AlexNetReference(_AlexNetBase):
    """The whole network in one process: grouped convolutions (model.columns=2) or one column (1)."""

    def __init__(self, cfg: ModelConfig, amp: str = "off", channels_last: bool = False):
        super().__init__(cfg, amp, channels_last)
        for spec in layer_specs(cfg):
            setattr(self, spec.name, _make_layer(spec, spec.out_features, columns=2))
        self.drop6 = SharedDropout(cfg.dropout, cfg.fc_width, (0, cfg.fc_width))
        self.drop7 = SharedDropout(cfg.dropout, cfg.fc_width, (0, cfg.fc_width))

    def grouped_norm(self, x):
        # Each column normalised over its own maps only; one LRN over all the
        # reference's maps would mix the columns at their border.
        if self.lrn is None or self.cfg.columns == 1:
            return self.norm(x)
        return torch.cat([self.lrn(half) for half in x.chunk(2, dim=1)], dim=1)

    def features_and_classifier(self, x):
        act, pool = self.act, self.pool
        x = pool(self.grouped_norm(act(self.conv1(x))))
        x = pool(self.grouped_norm(act(self.conv2(x))))
        x = act(self.conv3(x))
        x = act(self.conv4(x))
        x = pool(act(self.conv5(x)))
        x = self.drop6(act(self.fc6(x.flatten(1))))
        x = self.drop7(act(self.fc7(x)))
        return self.fc8(x)


class AlexNetColumn(_AlexNetBase):
    """One column of the pair. `forward` returns the full logits on both columns.

    `overlap` (dist.overlap) computes each crossing layer's own half while the
    exchange is in flight (overlap.py); otherwise the input is gathered first.
    """

    def __init__(self, cfg: ModelConfig, column: int, link: PeerLink | None, overlap: bool = False,
                 amp: str = "off", channels_last: bool = False):
        super().__init__(cfg, amp, channels_last)
        self.column, self.link, self.overlap = column, link, overlap
        for spec in layer_specs(cfg):
            start, end = column_range(cfg, spec.name, column)
            if end > start:  # column 1 holds no fc8 when fc8 lives on column 0
                setattr(self, spec.name, _make_layer(spec, end - start, columns=1,
                                                     crossing=spec.name in CROSSINGS))
        self.drop6 = SharedDropout(cfg.dropout, cfg.fc_width, column_range(cfg, "fc6", column))
        self.drop7 = SharedDropout(cfg.dropout, cfg.fc_width, column_range(cfg, "fc7", column))
        peer_fc8 = column_range(cfg, "fc8", 1 - column)
        self.peer_classes = peer_fc8[1] - peer_fc8[0]  # the width of the logits the peer sends
        if link is not None and channels_last:
            link.memory_format = torch.channels_last  # the wire layout follows the model's
        if overlap:
            for name in CROSSINGS:
                if hasattr(self, name):
                    getattr(self, name).overlap_with(link, name, mutual=not (name == "fc8" and cfg.fc8 == "rank0"))

    def cross(self, layer, act_shard, crossing):
        """`layer` applied to both columns' activations."""
        if self.overlap:
            return layer(act_shard)
        return layer(gather_from_peer(act_shard, self.link, crossing))

    def features_and_classifier(self, x):
        act, pool = self.act, self.pool
        x = pool(self.norm(act(self.conv1(x))))
        x = pool(self.norm(act(self.conv2(x))))
        x = act(self.cross(self.conv3, x, "conv3"))
        x = act(self.conv4(x))
        x = pool(act(self.conv5(x)))
        x = self.drop6(act(self.cross(self.fc6, x.flatten(1), "fc6")))
        x = self.drop7(act(self.cross(self.fc7, x, "fc7")))
        return self.classify(x)

    def classify(self, act_shard):
        if self.cfg.fc8 == "split":
            logits_shard = self.cross(self.fc8, act_shard, "fc8")
            return gather_output(logits_shard, self.peer_classes, self.link)
        if self.column == 1:
            return exchange_with_first(act_shard, self.cfg.num_classes, self.link)
        if self.overlap:
            logits = self.fc8(act_shard)
        else:
            logits = self.fc8(gather_to_first(act_shard, self.link))
        return broadcast_from_first(logits, self.link)
