"""The ablation report: a Markdown table beside the paper's claims, a JSON of every figure and curve,
and one plot (a panel per comparison). Each file is written whole or not at all."""
from __future__ import annotations

import json
from pathlib import Path

from ..files import make_dirs, write_atomic, write_text_atomic
from .measure import RunResult, training_errors
from .plan import Comparison

NAMES = {"md": "ablations.md", "json": "ablations.json", "png": "ablations.png"}


def _claim_cell(row: dict) -> str:
    return row["claim"] + (f" [setup here: {row['setup']}]" if row.get("setup") else "")


def markdown(rows: list[dict], meta: dict) -> str:
    """The table: one row per comparison, the paper's claim beside what was measured."""
    seeds = ", ".join(map(str, meta["seeds"]))
    lines = [
        "# The paper's ablations at small scale", "",
        f"Machine: {meta['machine']}. Base config: `{meta['config']}`"
        + (f" with `{' '.join(meta['overrides'])}`" if meta["overrides"] else "")
        + f"; every run: `{' '.join(meta['runtime'])}`.",
        f"{meta['runs']} runs ({meta['arms']} arms x seeds {seeds}), {meta['parallel']} at a time, "
        f"{meta['wall_minutes']:.0f} minutes from the first run's start to the last run's end.", "",
        "Figures are mean ± standard deviation over the seeds (each seed's value is in the JSON). Errors "
        "are validation errors of the last epoch in points (centre crops); a difference is the paper's "
        "choice minus the alternative, so negative favours the paper. Training-error speeds come from "
        "the per-step records (training top-1 with dropout and augmentation on).", "",
        "| comparison | the paper | measured here (paper's choice vs alternative) | verdict |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['title']} | {_claim_cell(row)} | {row['measured']} | {row['verdict']} |")
    return "\n".join(lines) + "\n"


def _runs_json(results: dict[str, list[RunResult]]) -> dict:
    """Every run's curves: its epochs' records and its step records (step, loss, top-1)."""
    out = {}
    for arm, runs in results.items():
        for r in runs:
            out[r.name] = {"arm": arm, "seed": r.seed, "epochs": r.epochs,
                           "steps": [{k: s.get(k) for k in ("step", "loss", "top1")} for s in r.steps]}
    return out


def _band(ax, curves: list[list[tuple[float, float]]], label: str, style: str = "-") -> None:
    """Mean over seeds as a line, min to max as a band; curves are cut to the shortest."""
    n = min(len(c) for c in curves)
    xs = [curves[0][i][0] for i in range(n)]
    ys = [[c[i][1] for c in curves] for i in range(n)]
    line, = ax.plot(xs, [sum(v) / len(v) for v in ys], style, label=label)
    if len(curves) > 1:
        ax.fill_between(xs, [min(v) for v in ys], [max(v) for v in ys], color=line.get_color(), alpha=0.2)


def _panel(ax, c: Comparison, results: dict[str, list[RunResult]], threshold: float) -> None:
    for arm, style in ((c.paper, "-"), (c.other, "--")):
        runs = results[arm.name]
        if c.measure == "speed":
            _band(ax, [[(s, 100 * e) for s, e in training_errors(r.steps)] for r in runs], arm.name, style)
        else:
            _band(ax, [[(e["epoch"], 100 * (1 - e["val_top1"])) for e in r.epochs] for r in runs],
                  f"{arm.name} (validation)", style)
            if c.measure == "overfitting":
                _band(ax, [[(e["epoch"], 100 * (1 - e["train_top1"])) for e in r.epochs] for r in runs],
                      f"{arm.name} (training)", ":")
    if c.measure == "speed":
        ax.axhline(100 * threshold, color="grey", lw=0.8)
        ax.set(xlabel="step", ylabel="training top-1 error (%)")
    else:
        ax.set(xlabel="epoch", ylabel="top-1 error (%)")
    ax.set_title(c.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot(path: Path, comparisons: list[Comparison], results: dict[str, list[RunResult]], threshold: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(comparisons))
    rows = -(-len(comparisons) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    for ax, c in zip(axes.flat, comparisons):
        _panel(ax, c, results, threshold)
    for ax in list(axes.flat)[len(comparisons):]:
        ax.axis("off")
    fig.tight_layout()
    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=90), move="--out")
    finally:
        plt.close(fig)


def write_report(out_dir: str | Path, comparisons: list[Comparison], rows: list[dict],
                 results: dict[str, list[RunResult]], meta: dict, threshold: float) -> dict[str, Path]:
    """Write the table, the JSON and the plot into `out_dir`; return their paths by kind."""
    out = make_dirs(out_dir, move="--out")
    paths = {kind: out / name for kind, name in NAMES.items()}
    write_text_atomic(paths["md"], markdown(rows, meta), move="--out")
    blob = {"meta": meta, "rows": rows, "runs": _runs_json(results)}
    write_text_atomic(paths["json"], json.dumps(blob, indent=1) + "\n", move="--out")
    plot(paths["png"], comparisons, results, threshold)
    return paths
