"""Checkpoints on GPUs: a resumed run against a straight one, on one device and across CPU and CUDA.

Checkpoints hold no RNG state (dropout masks come from (seed, step), the data order from (seed,
epoch)) and the optimiser state is mapped to the parameters' device on load, so:

* on one device with train.deterministic=true, HALF steps, a checkpoint and a resume to FULL steps
  end with the weights of FULL straight steps, bit for bit (dropout on);
* a checkpoint written on CUDA resumes on the CPU and the reverse (dropout off: the CPU and CUDA
  generators draw different masks); the resumed run matches a straight run on its own device to
  fp32 rounding, far closer than the last steps move the weights.

Every run is `Trainer.fit` in processes of the check's own (runs.py), in a temporary folder that is
removed afterwards.
"""
from __future__ import annotations

import tempfile

from .compare import compare, describe
from .configs import SMALL
from .report import verdict
from .runs import run_spec, runs_worker

HALF, FULL = 3, 6  # steps before the checkpoint, and in all (one epoch holds 10)
BASE = [*SMALL, "train.batch_size=16", "data.train_size=160", "train.epochs=2", "train.lr=0.02",
        "train.deterministic=true", "run.keep_checkpoints=1"]
ACROSS_TOLERANCE = 1e-3  # resumed on another device against straight: worst relative difference
ACROSS_SHARE = 0.01  # ... and at most this share of what the steps after the checkpoint move the weights


def resume_runs(prefix: str, *overrides: str) -> list:
    """Straight to FULL steps, HALF steps, and a resume of the latter to FULL."""
    return [run_spec(f"{prefix}-straight", *overrides, f"train.max_steps={FULL}"),
            run_spec(f"{prefix}-half", *overrides, f"train.max_steps={HALF}"),
            run_spec(f"{prefix}-resumed", *overrides, f"train.max_steps={FULL}", resume=f"{prefix}-half")]


def _restored(run: dict) -> bool:
    start = run["start"]
    return bool(start and start["buffers"] and start["on_param_device"] and start["param_strides"])


def same_device_verdict(runs: dict, prefix: str, where: str) -> dict:
    """Resumed equals straight bit for bit, and the momentum buffers came back where their parameters are."""
    straight, half, resumed = (runs[f"{prefix}-{k}"] for k in ("straight", "half", "resumed"))
    same, moved = compare(resumed["weights"], straight["weights"]), compare(half["weights"], straight["weights"])
    ok = same["identical"] and _restored(resumed) and resumed["steps"] == straight["steps"] == FULL
    return verdict(ok, f"{where}: {HALF} steps, checkpoint, resume to {FULL} equals {FULL} straight steps "
                       f"{describe(same)} (the last {FULL - HALF} steps move the weights by "
                       f"{moved['max_rel_diff']:.1e}); "
                       f"momentum buffers restored on the parameters' device and layout: {_restored(resumed)}",
                   max_rel_diff=same["max_rel_diff"], moved=moved["max_rel_diff"], steps=resumed["steps"])


def check_resume(budget, device: str = "cuda", extra: tuple = ()) -> dict:
    """One device, one process: straight, half, resumed (train.deterministic=true, dropout on)."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-resume-") as tmp:
        base = [*BASE, f"dist.device={device}", "dist.mp=1", *extra]
        runs = budget.spawn(runs_worker, 1, (base, resume_runs("same"), tmp))[0]
    return same_device_verdict(runs, "same", f"on {device}")


def across_verdict(runs: dict, devices: tuple) -> dict:
    lines, ok, figures = [], True, {}
    for written, resumed_on in ((0, 1), (1, 0)):
        resumed, straight = runs[f"d{resumed_on}-from-d{written}"], runs[f"d{resumed_on}-straight"]
        half = runs[f"d{resumed_on}-half"]
        same, moved = compare(resumed["weights"], straight["weights"]), compare(half["weights"], straight["weights"])
        good = (same["max_rel_diff"] <= min(ACROSS_TOLERANCE, ACROSS_SHARE * moved["max_rel_diff"])
                and _restored(resumed) and resumed["steps"] == FULL)
        ok = ok and good
        name = f"{devices[written]}->{devices[resumed_on]}"
        lines.append(f"{name} {describe(same)} (moved {moved['max_rel_diff']:.1e}, restored {_restored(resumed)})")
        figures[name] = {"max_rel_diff": same["max_rel_diff"], "moved": moved["max_rel_diff"], "ok": good}
    return verdict(ok, f"checkpoints resume across devices; resumed against straight on the resuming device: "
                       f"{'; '.join(lines)}", **figures)


def check_across(budget, devices: tuple = ("cuda", "cpu"), extra: tuple = ()) -> dict:
    """A checkpoint of devices[0] resumed on devices[1] and the reverse (one process per device)."""
    base = [*BASE, "dist.mp=1", "model.dropout=0", *extra]

    def first(d: int) -> list:
        return [run_spec(f"d{d}-straight", f"train.max_steps={FULL}"),
                run_spec(f"d{d}-half", f"train.max_steps={HALF}")]

    with tempfile.TemporaryDirectory(prefix="gpu-check-across-") as tmp:
        runs = budget.spawn(runs_worker, 1, ([*base, f"dist.device={devices[0]}"], first(0), tmp))[0]
        runs.update(budget.spawn(runs_worker, 1, ([*base, f"dist.device={devices[1]}"], [
            *first(1), run_spec("d1-from-d0", f"train.max_steps={FULL}", resume="d0-half")], tmp))[0])
        runs.update(budget.spawn(runs_worker, 1, ([*base, f"dist.device={devices[0]}"], [
            run_spec("d0-from-d1", f"train.max_steps={FULL}", resume="d1-half")], tmp))[0])
    return across_verdict(runs, devices)
