"""How much of the input reaches each layer at initialisation, per init and crop: why an init trains
slowly or not at all.

For a batch of built-in images, prepared as configs/paper.yaml prepares them (raw pixels minus the
mean image), it reports per layer of the full-width network: the input's share of the activations
(their variance across images over their mean square: near 0 when a constant, such as a bias, drowns
the image out) and the relative size of the first SGD step on the weights (lr x |grad| / |weight|).

    python -m alexnet_mp.ablations.init_signal [--inits paper,caffe,he] [--crops 67,227] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ConfigError, build_config
from ..data import Normalizer, build_data
from ..files import StorageError, make_dirs, write_text_atomic
from ..model import LAYERS
from ..weights import build_reference

PAPER = Path(__file__).resolve().parents[2] / "configs" / "paper.yaml"
BATCH = 32


def _config(init: str, crop: int, classes: int):
    side = crop + 13  # the margin the 67-of-80 crops of the small runs have
    return build_config(PAPER, [f"model.init={init}", f"model.crop_size={crop}", f"model.num_classes={classes}",
                                "data.dataset=synthetic", f"data.image_size={side}", f"data.resize={side}",
                                f"data.train_size={BATCH * 2}", f"data.val_size={BATCH}", "data.num_workers=0",
                                f"train.batch_size={BATCH}", "dist.mp=1"])


def _batch(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """BATCH validation images as the paper's input (centre crops minus the mean image), and labels."""
    bundle = build_data(cfg)
    side, crop = bundle.side, cfg.model.crop_size
    norm = Normalizer(bundle.stats, cfg.data.normalize, side, crop)
    m = (side - crop) // 2
    images = torch.stack([bundle.val.image(i)[0][:, m:m + crop, m:m + crop] for i in range(BATCH)])
    return norm(images), torch.as_tensor(bundle.val.labels[:BATCH])


def layer_signal(init: str, crop: int, classes: int = 40, seed: int = 0) -> list[dict]:
    """Per layer: input share of the (pre-activation) outputs, and lr x |grad| / |weight|."""
    cfg = _config(init, crop, classes)
    torch.manual_seed(seed)
    model = build_reference(cfg.model, seed).eval()  # no dropout: the input's share, not the masks'
    outputs = {}
    hooks = [getattr(model, name).register_forward_hook(lambda m, i, o, n=name: outputs.__setitem__(n, o.detach()))
             for name in LAYERS]
    x, y = _batch(cfg)
    F.cross_entropy(model(x), y).backward()
    for h in hooks:
        h.remove()
    rows = []
    for name in LAYERS:
        out = outputs[name].flatten(1)  # a unit per map and position
        w = getattr(model, name).weight
        share = out.var(0, unbiased=False).mean() / out.pow(2).mean().clamp_min(1e-30)
        rows.append({"layer": name, "input_share": float(share),
                     "rms": float(out.pow(2).mean().sqrt()),
                     "step": float(cfg.train.lr * w.grad.norm() / w.detach().norm())})
    return rows


def markdown(found: dict) -> str:
    lines = []
    for (crop, init), rows in found.items():
        lines += [f"### init={init}, {crop} px crops", "", "| layer | input's share of the outputs | rms output | "
                  "first step, lr x abs(grad) / abs(weight) |", "|---|---|---|---|"]
        lines += [f"| {r['layer']} | {r['input_share']:.3g} | {r['rms']:.3g} | {r['step']:.2g} |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m alexnet_mp.ablations.init_signal", description=__doc__.split("\n\n")[0])
    p.add_argument("--inits", default="paper,caffe,he")
    p.add_argument("--crops", default="67,227")
    p.add_argument("--out", help="folder for init_signal.md and init_signal.json (default: print only)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        crops = [int(c) for c in args.crops.split(",")]
        found = {}
        for crop in crops:
            for init in args.inits.split(","):
                print(f"init={init}, crop {crop}: measuring", flush=True)
                found[(crop, init)] = layer_signal(init, crop)
        text = markdown(found)
        if args.out:
            out = make_dirs(args.out, move="--out")
            write_text_atomic(out / "init_signal.md", text, move="--out")
            blob = [{"crop": c, "init": i, "layers": rows} for (c, i), rows in found.items()]
            write_text_atomic(out / "init_signal.json", json.dumps(blob, indent=1) + "\n", move="--out")
    except (ConfigError, StorageError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
