"""The initialisation experiments of docs/paper.md: which init trains the full-width network under
the paper's recipe (configs/paper.yaml: lr 0.01, batch 128, momentum 0.9, weight decay 5e-4, raw
pixels minus the mean image), at 67 px crops on the built-in set so that a CPU can run it.

    python -m alexnet_mp.ablations.init_study [--arms paper,caffe] [--seeds 0] [--epochs 16]
        [--runs-dir runs/init_study] [--out DIR] [key=value ...]

Each arm is one single-process run per seed (one thread, two at a time) through the project's
trainer; the learning rate stays at 0.01 for the whole run (the first phase of the paper's
schedule). The report (init_study.md, .json, .png: loss and accuracy per epoch, training loss per
step) goes to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import ConfigError
from ..files import StorageError, make_dirs, write_atomic, write_text_atomic
from .measure import RunResult, load_result
from .plan import Arm, PlanError
from .runner import AblationError, Job, job_config, run_all, span_minutes

PAPER = Path(__file__).resolve().parents[2] / "configs" / "paper.yaml"
# The paper's network and recipe at a scale a CPU can train: 67 px crops of 80 px built-in images.
SCALE = ("model.crop_size=67", "model.num_classes=40", "data.dataset=synthetic", "data.image_size=80",
         "data.resize=80", "data.train_size=5000", "data.val_size=1000", "train.lr_milestones=[90]",
         "train.milestone_epochs=90")


ARMS = {name: Arm(name, (f"model.init={name}",)) for name in ("paper", "caffe")}  # model.init values


def left_chance(result: RunResult, classes: int, factor: float = 2.0) -> int | None:
    """The first epoch whose validation top-1 exceeds `factor` times chance; None if none did."""
    return next((e["epoch"] for e in result.epochs if e["val_top1"] > factor / classes), None)


def table(results: dict[str, list[RunResult]], classes: int) -> str:
    lines = ["| arm | seed | epochs | left chance (val top-1 > 2x chance) at epoch | train loss, first -> last epoch "
             "| val top-1 / top-5, last epoch | best val top-1 |", "|---|---|---|---|---|---|---|"]
    for arm, runs in results.items():
        for r in runs:
            first, last = r.epochs[0], r.last
            gone = left_chance(r, classes)
            lines.append(f"| {arm} | {r.seed} | {len(r.epochs)} | {gone if gone else 'never'} | "
                         f"{first['train_loss']:.3f} -> {last['train_loss']:.3f} | "
                         f"{last['val_top1']:.3f} / {last['val_top5']:.3f} | "
                         f"{max(e['val_top1'] for e in r.epochs):.3f} |")
    return "\n".join(lines) + "\n"


def plot(path: Path, results: dict[str, list[RunResult]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for arm, runs in results.items():
        for r in runs:
            label = f"{arm} (seed {r.seed})"
            axes[0].plot([s["step"] for s in r.steps], [s["loss"] for s in r.steps], label=label, lw=0.8)
            axes[1].plot([e["epoch"] for e in r.epochs], [e["train_loss"] for e in r.epochs], label=label)
            axes[2].plot([e["epoch"] for e in r.epochs], [e["val_top1"] for e in r.epochs], label=label)
    for ax, (x, y) in zip(axes, (("step", "training loss"), ("epoch", "training loss"),
                                 ("epoch", "validation top-1"))):
        ax.set(xlabel=x, ylabel=y)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=90), move="--out")
    finally:
        plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m alexnet_mp.ablations.init_study",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", default="paper,caffe", help=f"arms to run, of: {','.join(ARMS)} (default: paper,caffe)")
    p.add_argument("--seeds", default="0", help="train.seed of each repeat (default: 0)")
    p.add_argument("--epochs", type=int, default=16, help="epochs per run (default: 16)")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time, one thread each (default: 2)")
    p.add_argument("--runs-dir", default="runs/init_study", help="where the run folders go")
    p.add_argument("--out", help="where the report goes (default: the runs dir)")
    p.add_argument("--timeout", type=float, default=4 * 3600.0, help="seconds one run may take")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    return p


def _jobs(args) -> list[tuple[str, int, Job]]:
    names = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in names if a not in ARMS]
    if unknown or not names:
        raise PlanError(f"unknown arm {', '.join(unknown) or '(none given)'}; choose from {', '.join(ARMS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise PlanError(f"--seeds takes whole numbers separated by commas, like 0,1; got {args.seeds!r}") from None
    jobs = []
    for seed in seeds:
        for name in names:
            arm = ARMS[name]
            run = f"{name}-seed{seed}"
            cfg = job_config(PAPER, [*SCALE, f"train.epochs={args.epochs}", *args.overrides],
                             (*arm.overrides, f"train.seed={seed}"), args.runs_dir, run)
            jobs.append((name, seed, Job(run, cfg)))
    return jobs


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        jobs = _jobs(args)
        run_all([j for _, _, j in jobs], args.parallel, args.timeout)
        results: dict[str, list[RunResult]] = {}
        for name, seed, job in jobs:
            results.setdefault(name, []).append(load_result(job.folder, job.name, seed))
        runs = {r.name: {"arm": arm, "seed": r.seed, "epochs": r.epochs, "steps": r.steps}
                for arm, found in results.items() for r in found}
        classes = jobs[0][2].cfg.model.num_classes
        out = make_dirs(args.out or args.runs_dir, move="--out")
        text = table(results, classes)
        write_text_atomic(out / "init_study.md", text, move="--out")
        blob = {"config": str(PAPER.name), "scale": list(SCALE), "overrides": args.overrides,
                "wall_minutes": span_minutes([j for _, _, j in jobs]),
                "runs": runs}
        write_text_atomic(out / "init_study.json", json.dumps(blob, indent=1) + "\n", move="--out")
        plot(out / "init_study.png", results)
    except (ConfigError, PlanError, AblationError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, (ConfigError, PlanError)) else 1
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
