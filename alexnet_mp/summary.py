"""Model accounting: shapes, parameters, multiply-accumulates and bytes exchanged.

All figures are analytic (from the config alone), so the profiler and the
benchmarks can put measured numbers next to them.

    python -m alexnet_mp.summary [--config FILE] [key=value ...]
"""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, ModelConfig, build_config, spatial_sizes
from .model import CROSSINGS, column_range, conv_widths, layer_specs


def layer_table(cfg: ModelConfig) -> list[dict]:
    """One row per layer: output shape after its pooling, params and MACs per column."""
    sizes = spatial_sizes(cfg.crop_size, cfg.pool)
    conv_out = {"conv1": sizes[0], "conv2": sizes[2], "conv3": sizes[4], "conv4": sizes[5], "conv5": sizes[6]}
    after = {"conv1": sizes[1], "conv2": sizes[3], "conv3": sizes[4], "conv4": sizes[5], "conv5": sizes[7]}
    rows = []
    for spec in layer_specs(cfg):
        per_col_in = spec.in_features // spec.groups
        row = {"layer": spec.name, "reads": "both" if spec.name in CROSSINGS else "own", "columns": []}
        for column in (0, 1):
            start, end = column_range(cfg, spec.name, column)
            out = end - start
            if spec.kernel:
                weights = out * per_col_in * spec.kernel ** 2
                macs = weights * conv_out[spec.name] ** 2
                shape = (out, after[spec.name], after[spec.name])
            else:
                weights = macs = out * spec.in_features
                shape = (out,)
            row["columns"].append({"shape": shape, "params": weights + out, "macs": macs})
        row["params"] = sum(c["params"] for c in row["columns"])
        row["macs"] = sum(c["macs"] for c in row["columns"])
        rows.append(row)
    return rows


def column_params(cfg: ModelConfig, column: int) -> int:
    """The parameters one column holds (what its data-parallel all-reduce carries)."""
    return sum(row["columns"][column]["params"] for row in layer_table(cfg))


def param_count(cfg: ModelConfig) -> int:
    return sum(r["params"] for r in layer_table(cfg))


def forward_macs(cfg: ModelConfig, column: int | None = None) -> int:
    """Multiply-accumulates per image, forward, for one column or both."""
    rows = layer_table(cfg)
    if column is None:
        return sum(r["macs"] for r in rows)
    return sum(r["columns"][column]["macs"] for r in rows)


def crossing_widths(cfg: ModelConfig) -> dict[str, int]:
    """Elements per image that one column contributes at each crossing's input."""
    widths = conv_widths(cfg)
    c2, c5 = widths[1], widths[4]
    sizes = spatial_sizes(cfg.crop_size, cfg.pool)
    return {"conv3": c2 // 2 * sizes[3] ** 2, "fc6": c5 // 2 * sizes[7] ** 2,
            "fc7": cfg.fc_width // 2, "fc8": cfg.fc_width // 2}


def analytic_bytes(cfg: ModelConfig, batch: int, column: int, element_size: int = 4) -> dict[str, dict]:
    """Bytes this column sends and receives per training step, keyed like CommStats.

    `input.forward` is the uint8 crops the columns swap (each decodes its own rows of the batch);
    the activations cross in `element_size` bytes (2 under bf16 autocast).
    """
    out = {}
    widths = crossing_widths(cfg)
    first = batch - batch // 2  # column 0 decodes the first ceil(batch / 2) images
    decoded = first if column == 0 else batch - first
    image = 3 * cfg.crop_size ** 2
    out["input.forward"] = {"sent": decoded * image, "recv": (batch - decoded) * image}

    def put(key, sent, recv):
        out[key] = {"sent": sent * batch * element_size, "recv": recv * batch * element_size}

    both_ways = CROSSINGS if cfg.fc8 == "split" else CROSSINGS[:-1]
    for name in both_ways:
        put(f"{name}.forward", widths[name], widths[name])
        put(f"{name}.backward", widths[name], widths[name])
    own = column_range(cfg, "fc8", column)
    peer = column_range(cfg, "fc8", 1 - column)
    if cfg.fc8 == "split":
        put("logits.forward", own[1] - own[0], peer[1] - peer[0])
    else:  # column 1 ships its fc7 output to column 0 and gets the logits back
        first = column == 0
        put("fc8.forward", 0 if first else widths["fc8"], widths["fc8"] if first else 0)
        put("fc8.backward", widths["fc8"] if first else 0, 0 if first else widths["fc8"])
        put("logits.forward", cfg.num_classes if first else 0, 0 if first else cfg.num_classes)
    return out


def activation_elements(cfg: ModelConfig) -> int:
    """Elements per image that the single-device reference keeps for its backward pass.

    The input, then each layer's output and the output of every ReLU, LRN,
    pooling and dropout after it, once each. A lower bound: LRN's intermediate
    tensors and the pooling indices come on top.
    """
    s = spatial_sizes(cfg.crop_size, cfg.pool)  # conv1, pool1, conv2, pool2, conv3, conv4, conv5, pool5
    c1, c2, c3, c4, c5 = conv_widths(cfg)
    return (3 * cfg.crop_size ** 2
            + c1 * (3 * s[0] ** 2 + s[1] ** 2)  # conv1, ReLU, LRN; pool1
            + c2 * (3 * s[2] ** 2 + s[3] ** 2)  # conv2, ReLU, LRN; pool2
            + 2 * (c3 * s[4] ** 2 + c4 * s[5] ** 2 + c5 * s[6] ** 2)  # conv3..5 and their ReLUs
            + c5 * s[7] ** 2  # pool5
            + 2 * 3 * cfg.fc_width  # fc6, fc7: output, ReLU, dropout
            + cfg.num_classes)


def reference_memory(cfg: ModelConfig, batch: int, element_size: int = 4) -> dict[str, int]:
    """Bytes the single-device reference needs to train on `batch` images with SGD and momentum:
    parameters + gradients + momentum (3 x parameters) + activations (`activation_elements` x batch)."""
    params = param_count(cfg) * element_size
    activations = activation_elements(cfg) * batch * element_size
    return {"parameters": params, "gradients": params, "momentum": params, "activations": activations,
            "total": 3 * params + activations}


def _fmt(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def render(cfg: ModelConfig, batch: int = 128) -> str:
    rows = layer_table(cfg)
    lines = [f"AlexNet, two columns: crop {cfg.crop_size}, {cfg.num_classes} classes, fc8={cfg.fc8}",
             f"{'layer':<6} {'reads':<5} {'output per column':<22} {'params c0':>12} {'params c1':>12} "
             f"{'params':>12} {'MACs c0':>9} {'MACs c1':>9} {'MACs':>9}"]
    for r in rows:
        c0, c1 = r["columns"]
        shape = " / ".join("x".join(map(str, c["shape"])) for c in (c0, c1))
        lines.append(f"{r['layer']:<6} {r['reads']:<5} {shape:<22} {c0['params']:>12,} {c1['params']:>12,} "
                     f"{r['params']:>12,} {_fmt(c0['macs']):>9} {_fmt(c1['macs']):>9} {_fmt(r['macs']):>9}")
    total_c = [sum(r["columns"][c]["params"] for r in rows) for c in (0, 1)]
    lines.append(f"{'total':<6} {'':<5} {'':<22} {total_c[0]:>12,} {total_c[1]:>12,} {param_count(cfg):>12,} "
                 f"{_fmt(forward_macs(cfg, 0)):>9} {_fmt(forward_macs(cfg, 1)):>9} {_fmt(forward_macs(cfg)):>9}")
    lines.append(f"parameters: {param_count(cfg):,}; forward MACs per image: {forward_macs(cfg):,}")
    lines.append(f"bytes exchanged per step of {batch} images (fp32), per column, sent / received:")
    for column in (0, 1):
        for key, b in analytic_bytes(cfg, batch, column).items():
            lines.append(f"  column {column} {key:<16} {b['sent'] / 1e6:9.3f} MB / {b['recv'] / 1e6:9.3f} MB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the two-column AlexNet's layers, parameters and MACs.")
    parser.add_argument("--config", help="YAML config (default: the paper's network)")
    parser.add_argument("--batch", type=int, default=128, help="batch size for the byte counts")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.crop_size=67")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = build_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render(cfg.model, args.batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
