"""Single-device files: a checkpoint's network in one file, and reading such a file back.

    python -m alexnet_mp.export RUN_OR_CHECKPOINT OUT.pt [--best]

The source is a run directory (its newest good checkpoint, or with --best the one with
the highest validation top-1) or one ``checkpoints/step-N`` folder. OUT.pt loads with
``torch.load(OUT, weights_only=True)`` as ``{"state_dict": {...}, "meta": {...}}``:
`AlexNetReference`'s keys and shapes (with two columns: the grouped layout, column 0's
channels and classes first) and everything needed to run it without this repository's
config: the model options (widths, crop, classes, fc8 layout, LRN incl. enabled,
activation, pool, columns, dropout), the class names, and the input pipeline of
evaluation (``resize``: the stored image side; ``normalize``: paper | mean | meanstd
with ``mean``, ``std`` and, for paper, ``mean_image``).

`load_exported` turns such a file into a ready model and its `Preprocess`;
`load_single_device` reads it for ``run.init_from``, checked against a model config.
Files written before a field existed load with its old meaning (`LEGACY`).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

import torch

from . import checkpoint
from .config import Config, ConfigError, LRNConfig, ModelConfig, config_from_dict
from .files import StorageError, make_dirs, save_torch
from .model import AlexNetReference
from .weights import merge_states

# What a file without these meta fields was trained with.
LEGACY = {"normalize": "meanstd", "activation": "relu", "pool": "overlap", "columns": 2, "fc8": "split",
          "dropout": 0.5}
OUT_FIX = "the output file"  # what describe_os_error tells the user to move


class ExportError(RuntimeError):
    """A single-device file is unreadable or does not fit the model config."""


def stored_side(cfg: Config) -> int:
    """The side of the stored (square) images the crops are cut from."""
    return cfg.data.image_size if cfg.data.dataset == "synthetic" else cfg.data.resize


def make_meta(cfg: ModelConfig, classes, mean, std, *, normalize: str = "meanstd", resize: int | None = None,
              mean_image: torch.Tensor | None = None, **extra) -> dict:
    """The meta of a single-device file: the model options and the evaluation input pipeline."""
    return {
        "num_classes": cfg.num_classes, "classes": list(classes), "crop_size": cfg.crop_size,
        "mean": [float(v) for v in mean], "std": [float(v) for v in std],
        "normalize": normalize, "resize": resize,
        "mean_image": None if mean_image is None else torch.as_tensor(mean_image, dtype=torch.float32).clone(),
        "lrn": {"size": cfg.lrn.size, "alpha": cfg.lrn.alpha, "beta": cfg.lrn.beta, "k": cfg.lrn.k,
                "enabled": cfg.lrn.enabled},
        "lrn_per_column": True,  # each column normalises over its own maps only
        "conv_widths": list(cfg.conv_widths), "fc_width": cfg.fc_width, "fc8": cfg.fc8,
        "dropout": cfg.dropout, "activation": cfg.activation, "pool": cfg.pool, "columns": cfg.columns,
        **extra,
    }


def model_config(meta: dict) -> ModelConfig:
    """The model config a file's meta describes (old files: `LEGACY` for the missing fields)."""
    lrn = dict(meta["lrn"])
    lrn.setdefault("enabled", True)
    known = {f.name for f in fields(LRNConfig)}
    values = {key: meta.get(key, default) for key, default in LEGACY.items() if key != "normalize"}
    return ModelConfig(num_classes=meta["num_classes"], crop_size=meta["crop_size"],
                       conv_widths=list(meta["conv_widths"]), fc_width=meta["fc_width"],
                       lrn=LRNConfig(**{k: v for k, v in lrn.items() if k in known}), **values)


def _column_stats(payload: dict, manifest: dict) -> tuple[list, list, torch.Tensor | None]:
    """(mean, std, mean_image) of the training set: column 0's data_stats, else the manifest's."""
    stats = payload.get("data_stats") or {}
    mean = stats.get("mean", manifest.get("mean"))
    std = stats.get("std", manifest.get("std"))
    if mean is None or std is None:
        raise ExportError("the checkpoint records no input statistics (data_stats in column0.pt or mean/std "
                          "in the manifest); it cannot be exported with its preprocessing")
    mean_image = stats.get("mean_image")
    return (torch.as_tensor(mean).tolist(), torch.as_tensor(std).tolist(),
            None if mean_image is None else torch.as_tensor(mean_image, dtype=torch.float32))


def export(source: str | Path, out: str | Path, best: bool = False) -> dict:
    """Write the checkpoint at `source` (with `best`: the run's best one) as one file; returns its contents."""
    folder, manifest = checkpoint.resolve(source, best_one=best)
    try:
        blob = _single_device(folder, manifest)
    except KeyError as e:
        raise ExportError(f"{folder} has no {e} in its manifest or column files; it was not written by "
                          f"this trainer and cannot be exported") from None
    out = Path(out)
    make_dirs(out.parent, move=OUT_FIX)
    save_torch(out, blob, move=OUT_FIX)
    return blob


def _single_device(folder: Path, manifest: dict) -> dict:
    """The single-device file's contents: the merged weights and their meta."""
    cfg = config_from_dict(manifest["config"])
    payloads = [checkpoint.load_column(folder, c) for c in range(manifest.get("mp", checkpoint.MP))]
    if len(payloads) == 1:  # dist.mp=1: the whole network in one file
        state = payloads[0]["model"]
    else:
        state = merge_states([p["model"] for p in payloads], cfg.model)
    mean, std, mean_image = _column_stats(payloads[0], manifest)
    side = int(mean_image.shape[-1]) if mean_image is not None else stored_side(cfg)
    meta = make_meta(cfg.model, manifest["classes"], mean, std, normalize=cfg.data.normalize, resize=side,
                     mean_image=mean_image if cfg.data.normalize == "paper" else None,
                     step=manifest["step"], source=str(folder), best_metric=manifest.get("best_metric"))
    return {"state_dict": state, "meta": meta}


def read_file(path: str | Path) -> tuple[dict, dict]:
    """(state_dict, meta) of a single-device file, unchecked."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return blob["state_dict"], blob["meta"]
    except FileNotFoundError:
        raise ExportError(f"{path} does not exist; give a file written by python -m alexnet_mp.export") from None
    except Exception as e:
        raise ExportError(f"{path} is not a single-device AlexNet file ({str(e).splitlines()[0]})") from None


def _check_options(path, meta: dict, cfg: ModelConfig) -> None:
    """The options that do not show in the weights' shapes must match too."""
    lrn = {"size": cfg.lrn.size, "alpha": cfg.lrn.alpha, "beta": cfg.lrn.beta, "k": cfg.lrn.k}
    stored = {k: meta.get("lrn", {}).get(k) for k in lrn}
    enabled = meta.get("lrn", {}).get("enabled", True)
    if enabled != cfg.lrn.enabled or (enabled and stored != lrn):
        raise ExportError(f"{path} was trained with LRN {dict(stored, enabled=enabled)}; set model.lrn.* to match")
    for key in ("activation", "pool", "columns"):
        value = meta.get(key, LEGACY[key])
        if value != getattr(cfg, key):
            raise ExportError(f"{path} was trained with model.{key}={value}; set model.{key}={value} to use it")


def load_single_device(path: str | Path, cfg: ModelConfig) -> tuple[dict, dict]:
    """(state_dict, meta) of an exported file, checked against the model config."""
    state, meta = read_file(path)
    _check_options(path, meta, cfg)
    expected = AlexNetReference(cfg).state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise ExportError(f"{path} has no {key}; it was not written by alexnet_mp.export")
        if state[key].shape != tensor.shape:
            raise ExportError(f"{path}: {key} has shape {tuple(state[key].shape)} but this config needs "
                              f"{tuple(tensor.shape)}; set model.* to match the file (its meta: "
                              f"crop {meta.get('crop_size')}, widths {meta.get('conv_widths')}, "
                              f"fc {meta.get('fc_width')}, classes {meta.get('num_classes')})")
    return {k: state[k] for k in expected}, meta


def load_exported(path: str | Path):
    """(model, preprocess) of an exported file: the network in eval mode, built from the file's
    meta alone, and the `Preprocess` that turns an image into its input as training evaluated it."""
    from .preprocess import Preprocess  # the data package is needed for inference only

    state, meta = read_file(path)
    try:
        cfg = model_config(meta)
        model = AlexNetReference(cfg)
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ExportError(f"{path} does not describe a network its weights fit "
                          f"({str(e).splitlines()[0]}); export it again with python -m alexnet_mp.export") from None
    return model.eval(), Preprocess(meta)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a checkpoint as one single-device file.")
    parser.add_argument("checkpoint", help="run directory or checkpoints/step-N folder")
    parser.add_argument("out", help="output file, e.g. alexnet.pt")
    parser.add_argument("--best", action="store_true",
                        help="the run's checkpoint with the highest validation top-1, not its newest")
    args = parser.parse_args(argv)
    try:
        blob = export(args.checkpoint, args.out, best=args.best)
    except (checkpoint.CheckpointError, ConfigError, ExportError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = blob["meta"]
    n = sum(t.numel() for t in blob["state_dict"].values())
    top1 = f", validation top-1 {meta['best_metric']:.4f}" if meta.get("best_metric") is not None else ""
    print(f"wrote {args.out}: {n:,} parameters, {meta['num_classes']} classes, crop {meta['crop_size']}, "
          f"step {meta['step']}{top1}, from {meta['source']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
