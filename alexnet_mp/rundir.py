"""A run directory: resolved config, per-epoch metrics, plot, summary, checkpoints.

    runs/<name>/config.yaml      the resolved config (what actually ran)
    runs/<name>/metrics.jsonl    one JSON object per epoch
    runs/<name>/metrics.png      loss and accuracy per epoch
    runs/<name>/summary.json     the final figures
    runs/<name>/checkpoints/     see checkpoint.py
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from .config import Config, ConfigError, config_from_dict

METRIC_KEYS = ("epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr",
               "images_per_sec", "seconds")


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked."""


def default_name() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def prepare(cfg: Config, path: Path, resuming: bool) -> Path:
    """Create (or, when resuming, reuse) the run directory. Rank 0 only."""
    config_file = path / "config.yaml"
    if config_file.exists() and not resuming:
        raise RunDirError(f"{path} already holds a run; continue it with run.resume={path} "
                          f"or choose another run.name")
    if resuming and not config_file.exists():
        raise RunDirError(f"{path} is not a run directory (no config.yaml); give the folder a training run wrote")
    path.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def load_run_config(path: str | Path) -> dict:
    config_file = Path(path) / "config.yaml"
    if not config_file.is_file():
        raise RunDirError(f"{path} is not a run directory (no config.yaml); give the folder a training run wrote")
    try:
        data = yaml.safe_load(config_file.read_text())
        config_from_dict(data)
    except (yaml.YAMLError, ConfigError) as e:
        raise RunDirError(f"{config_file} is not a valid config: {e}") from None
    return data


def append_metrics(path: Path, record: dict) -> None:
    with open(path / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    file = path / "metrics.jsonl"
    if not file.is_file():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """Drop records of epochs after `last_epoch` (they were lost with a crash)."""
    kept = [r for r in read_metrics(path) if r["epoch"] <= last_epoch]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))


def plot(path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(path) if r.get("train_loss") is not None]
    if not records:
        return
    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in records], label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in records], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.plot(epochs, [r["train_top1"] for r in records], label="train top-1")
    ax_acc.plot(epochs, [r["val_top1"] for r in records], label="validation top-1")
    ax_acc.plot(epochs, [r["val_top5"] for r in records], label="validation top-5")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path / "metrics.png", dpi=90)
    plt.close(fig)


def write_summary(path: Path, summary: dict) -> str:
    (path / "summary.json").write_text(json.dumps(summary, indent=1))
    parts = [f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()]
    return "summary: " + " ".join(parts)
