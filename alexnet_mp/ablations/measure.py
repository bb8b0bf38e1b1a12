"""What a comparison measured: figures per run from its records, their spread over seeds, a verdict.

Errors are in points (percent). A difference is always the paper's arm minus the other arm, so a
negative error difference means the paper's choice did better, as the paper states its results.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .. import rundir
from .plan import Comparison

SMOOTH = 3  # step records averaged when looking for the step a training error is reached
# The smallest effects counted: a speed ratio 10% away from 1 (a few step records), half a point of error.
SPEED_FLOOR = math.log(1.1)
POINTS_FLOOR = 0.5


@dataclass
class RunResult:
    """One finished run's records: metrics.jsonl (per epoch) and steps.jsonl (per run.log_every steps)."""

    name: str
    seed: int
    epochs: list[dict]
    steps: list[dict] = field(default_factory=list)

    @property
    def last(self) -> dict:
        return self.epochs[-1]

    @property
    def total_steps(self) -> int:
        return int(self.last.get("step") or (self.steps[-1]["step"] if self.steps else 0))


def load_result(run_dir: str | Path, name: str, seed: int) -> RunResult:
    path = Path(run_dir)
    epochs = [r for r in rundir.read_metrics(path) if r.get("train_loss") is not None]
    steps = [r for r in rundir.read_steps(path) if r.get("top1") is not None]
    return RunResult(name, seed, epochs, steps)


def training_errors(steps: list[dict], smooth: int = SMOOTH) -> list[tuple[int, float]]:
    """(step, training top-1 error) per step record, averaged over the last `smooth` records."""
    out = []
    for i, record in enumerate(steps):
        window = steps[max(0, i - smooth + 1):i + 1]
        out.append((record["step"], sum(1 - r["top1"] for r in window) / len(window)))
    return out


def steps_to_error(steps: list[dict], threshold: float, smooth: int = SMOOTH) -> int | None:
    """The first step at which the smoothed training error is at most `threshold`; None if never."""
    return next((step for step, err in training_errors(steps, smooth) if err <= threshold), None)


def common_threshold(results: list[RunResult], step: float = 0.05) -> float | None:
    """The lowest training error every run reached, rounded up to a multiple of `step`."""
    lows = [min((e for _, e in training_errors(r.steps)), default=None) for r in results]
    if not lows or any(v is None for v in lows):
        return None
    return round(math.ceil(max(lows) / step - 1e-9) * step, 6)


@dataclass
class Spread:
    """Values over seeds: their mean and sample standard deviation (0 for one value)."""

    values: list[float]

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def sd(self) -> float:
        n = len(self.values)
        if n < 2:
            return 0.0
        return math.sqrt(sum((v - self.mean) ** 2 for v in self.values) / (n - 1))

    def to_dict(self) -> dict:
        return {"mean": self.mean, "sd": self.sd, "values": self.values}


def shown(differences: list[float], floor: float = 0.0) -> bool:
    """Whether paired differences show an effect: two or more, one sign, a mean beyond twice their
    standard deviation over seeds, and at least `floor`. A rule of thumb, not a significance test."""
    if len(differences) < 2 or not (all(d > 0 for d in differences) or all(d < 0 for d in differences)):
        return False
    s = Spread(differences)
    return abs(s.mean) > 2 * s.sd and abs(s.mean) >= floor


def error_points(result: RunResult, key: str) -> float:
    """Validation error of the last epoch, in points: key "top1" or "top5"."""
    return 100 * (1 - result.last[f"val_{key}"])


def gap_points(result: RunResult) -> float:
    """Overfitting of the last epoch: validation minus training top-1 error, in points."""
    return 100 * (result.last["train_top1"] - result.last["val_top1"])


def paired(paper: list[RunResult], other: list[RunResult], fn) -> tuple[Spread, Spread, list[float]]:
    """fn per run for both arms (matched by seed) and the per-seed differences paper - other."""
    a, b = [fn(r) for r in paper], [fn(r) for r in other]
    return Spread(a), Spread(b), [x - y for x, y in zip(a, b)]


def verdict(differences: list[float], claimed: float | None, better: str, floor: float = POINTS_FLOOR) -> str:
    """One phrase: whether the seeds show an effect (`shown`), and whether it goes the paper's way.
    `better` names what a negative difference means ("lower error")."""
    if len(differences) < 2:
        return "one seed: no spread to judge an effect by"
    if not shown(differences, floor):
        return "not shown at this scale (within the spread over seeds, or too small to count)"
    mean = Spread(differences).mean
    if claimed is None or (mean < 0) == (claimed < 0):
        return f"shown: the paper's choice gives {better}" if mean < 0 else "shown, against the paper's choice"
    return "shown, opposite to the paper"


def _fmt(s: Spread, digits: int = 1) -> str:
    return f"{s.mean:.{digits}f} ± {s.sd:.{digits}f}" if len(s.values) > 1 else f"{s.mean:.{digits}f}"


def _steps_at(paper: list[RunResult], other: list[RunResult], threshold: float) -> dict:
    """Steps each run took to reach `threshold` training error (None: not reached) and, per seed, the
    other arm's steps over the paper arm's; a run that never got there counts its total steps, which
    makes that ratio a lower bound."""
    a = [steps_to_error(r.steps, threshold) for r in paper]
    b = [steps_to_error(r.steps, threshold) for r in other]
    ratios, bounded = [], []
    for x, y, rb in zip(a, b, other):
        if x is not None:
            ratios.append((y if y is not None else rb.total_steps) / x)
            bounded.append(y is None)
    return {"threshold": threshold, "paper_steps": a, "other_steps": b, "speedup": ratios, "lower_bound": bounded}


def _speed(c: Comparison, paper: list[RunResult], other: list[RunResult], threshold: float) -> dict:
    main = _steps_at(paper, other, threshold)
    common = common_threshold(paper + other)
    fallback = _steps_at(paper, other, common) if common is not None and common > threshold else None
    # Judged where every seed of the paper's arm got: the threshold, else the error all runs reached.
    judged = main if len(main["speedup"]) == len(paper) else fallback
    logs = [-math.log(r) for r in judged["speedup"]] if judged and len(judged["speedup"]) == len(paper) else []
    claimed = c.claimed.get("speedup")
    text = [_speed_text(f, paper) for f in (main, fallback) if f is not None]
    return {"figures": {"at_threshold": main, "at_common": fallback},
            "verdict": verdict(logs, -math.log(claimed) if claimed else None, "faster training", SPEED_FLOOR) if logs
            else "not measured: the paper's arm reached no common training error in every seed",
            "measured": "; ".join(text)}


def _speed_text(found: dict, paper: list[RunResult]) -> str:
    pct = f"{100 * found['threshold']:.0f}%"
    if not found["speedup"]:
        return f"{pct} training error: not reached by the paper's arm in {paper[0].total_steps} steps"
    s = Spread(found["speedup"])
    bound = "at least " if any(found["lower_bound"]) else ""
    return f"{pct} training error: {bound}{_fmt(s)}x as fast ({', '.join(f'{v:.1f}' for v in s.values)})"


def _error(c: Comparison, paper: list[RunResult], other: list[RunResult]) -> dict:
    figures, text = {}, []
    for key in ("top1", "top5"):
        a, b, d = paired(paper, other, lambda r, k=key: error_points(r, k))
        figures[key] = {"paper": a.to_dict(), "other": b.to_dict(), "difference": Spread(d).to_dict()}
        text.append(f"{key[:3]}-{key[3]} error {_fmt(a)} vs {_fmt(b)} ({Spread(d).mean:+.1f} points)")
    diffs = figures["top1"]["difference"]["values"]
    return {"figures": figures, "verdict": verdict(diffs, c.claimed.get("top1"), "lower error"),
            "measured": "; ".join(text)}


def _overfitting(c: Comparison, paper: list[RunResult], other: list[RunResult]) -> dict:
    gap_a, gap_b, gap_d = paired(paper, other, gap_points)
    err_a, err_b, err_d = paired(paper, other, lambda r: error_points(r, "top1"))
    figures = {"gap": {"paper": gap_a.to_dict(), "other": gap_b.to_dict(), "difference": Spread(gap_d).to_dict()},
               "top1": {"paper": err_a.to_dict(), "other": err_b.to_dict(), "difference": Spread(err_d).to_dict()}}
    text = (f"train-validation top-1 gap {_fmt(gap_a)} vs {_fmt(gap_b)} points; "
            f"validation top-1 error {_fmt(err_a)} vs {_fmt(err_b)} ({Spread(err_d).mean:+.1f} points)")
    return {"figures": figures, "verdict": verdict(gap_d, -1.0, "less overfitting"), "measured": text}


def summarise(c: Comparison, paper: list[RunResult], other: list[RunResult], threshold: float = 0.25) -> dict:
    """One comparison's row: what it measured (mean ± sd over seeds, per-seed values), beside the paper.

    `paper` and `other` hold the runs of the two arms, in the same seed order."""
    if [r.seed for r in paper] != [r.seed for r in other]:
        raise ValueError(f"{c.key}: the arms ran different seeds")
    if c.measure == "speed":
        found = _speed(c, paper, other, threshold)
    elif c.measure == "overfitting":
        found = _overfitting(c, paper, other)
    else:
        found = _error(c, paper, other)
    return {"key": c.key, "title": c.title, "measure": c.measure, "claim": c.claim, "claimed": c.claimed,
            "setup": c.setup, "arms": {"paper": c.paper.name, "other": c.other.name},
            "seeds": [r.seed for r in paper], **found}
