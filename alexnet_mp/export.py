"""Conversion between a two-column checkpoint and the single-device layout.

    python -m alexnet_mp.export CHECKPOINT OUT.pt

CHECKPOINT is a run directory (its newest good checkpoint is used) or one
``checkpoints/step-N`` folder. OUT.pt loads with ``torch.load(OUT, weights_only=True)``
as ``{"state_dict": {...}, "meta": {...}}``: the grouped reference's keys and
shapes (column 0's channels and classes first) and what a user needs to run it:
classes, crop size, input normalisation and the LRN parameters in
``torch.nn.LocalResponseNorm``'s convention. `load_single_device` reads such a
file back for ``run.init_from``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import checkpoint
from .config import ConfigError, ModelConfig, config_from_dict
from .model import AlexNetReference, merge_states


class ExportError(RuntimeError):
    """A single-device file is unreadable or does not fit the model config."""


def make_meta(cfg: ModelConfig, classes, mean, std, **extra) -> dict:
    return {
        "num_classes": cfg.num_classes, "classes": list(classes), "crop_size": cfg.crop_size,
        "mean": list(mean), "std": list(std),
        "lrn": {"size": cfg.lrn.size, "alpha": cfg.lrn.alpha, "beta": cfg.lrn.beta, "k": cfg.lrn.k},
        "lrn_per_column": True,  # each column normalises over its own maps only
        "conv_widths": list(cfg.conv_widths), "fc_width": cfg.fc_width, "fc8": cfg.fc8,
        "dropout": cfg.dropout, **extra,
    }


def export(source: str | Path, out: str | Path) -> dict:
    folder, manifest = checkpoint.resolve(source)
    cfg = config_from_dict(manifest["config"])
    states = [checkpoint.load_column(folder, c)["model"] for c in (0, 1)]
    meta = make_meta(cfg.model, manifest["classes"], manifest["mean"], manifest["std"],
                     step=manifest["step"], source=str(folder))
    blob = {"state_dict": merge_states(states, cfg.model), "meta": meta}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_atomic(out, lambda f: torch.save(blob, f))
    return blob


def load_single_device(path: str | Path, cfg: ModelConfig) -> tuple[dict, dict]:
    """(state_dict, meta) of an exported file, checked against the model config."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        state, meta = blob["state_dict"], blob["meta"]
    except FileNotFoundError:
        raise ExportError(f"{path} does not exist; give a file written by python -m alexnet_mp.export") from None
    except Exception as e:
        raise ExportError(f"{path} is not a single-device AlexNet file ({str(e).splitlines()[0]})") from None
    expected = AlexNetReference(cfg).state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise ExportError(f"{path} has no {key}; it was not written by alexnet_mp.export")
        if state[key].shape != tensor.shape:
            raise ExportError(f"{path}: {key} has shape {tuple(state[key].shape)} but this config needs "
                              f"{tuple(tensor.shape)}; set model.* to match the file (its meta: "
                              f"crop {meta.get('crop_size')}, widths {meta.get('conv_widths')}, "
                              f"fc {meta.get('fc_width')}, classes {meta.get('num_classes')})")
    if meta.get("lrn") != {"size": cfg.lrn.size, "alpha": cfg.lrn.alpha, "beta": cfg.lrn.beta, "k": cfg.lrn.k}:
        raise ExportError(f"{path} was trained with LRN {meta.get('lrn')}; set model.lrn.* to match")
    return {k: state[k] for k in expected}, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a two-column checkpoint as one single-device file.")
    parser.add_argument("checkpoint", help="run directory or checkpoints/step-N folder")
    parser.add_argument("out", help="output file, e.g. alexnet.pt")
    args = parser.parse_args(argv)
    try:
        blob = export(args.checkpoint, args.out)
    except (checkpoint.CheckpointError, ConfigError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(t.numel() for t in blob["state_dict"].values())
    print(f"wrote {args.out}: {n:,} parameters, {blob['meta']['num_classes']} classes, "
          f"crop {blob['meta']['crop_size']}, from {blob['meta']['source']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
