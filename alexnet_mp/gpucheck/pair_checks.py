"""Checks that need two GPUs: the pair itself, one column per GPU over NCCL.

* reference: the pair's weights after a few steps of `Trainer.fit` against the grouped reference's
  on one GPU (TF32 off, dropout on: both draw the same masks);
* profiled: a bf16, channels_last run with the profiler on: its report, and every exchange's bytes
  equal to the analytic count;
* resume: HALF steps, a checkpoint and a resume equal FULL straight steps, bit for bit;
* scaling: images per second of the pair against one GPU and against DDP on two, at the same
  global batch (bf16, channels_last).

Each takes its configuration as an argument, so the tests run the same logic on CPUs.
"""
from __future__ import annotations

import tempfile

from .compare import compare, describe
from .configs import PAPER, config
from .report import outcome, verdict
from .resume_checks import BASE as RESUME_BASE, resume_runs, same_device_verdict
from .runs import run_spec, runs_worker
from .timing import STEPS as TIMED_STEPS, WARMUP, throughput_worker
from ..weights import merge_states

STEPS = 4
PAIR_BASE = [*PAPER, "data.image_size=232", "data.resize=232", "train.batch_size=16", "data.train_size=96",
             "train.epochs=2", "dist.device=cuda"]
PROFILED = [*PAPER, "data.image_size=232", "data.resize=232", "train.batch_size=32", "data.train_size=352",
            "train.epochs=2", "train.max_steps=10", "dist.device=cuda", "dist.mp=2", "dist.amp=bf16",
            "dist.channels_last=true", "profile.enabled=true", "profile.skip_steps=2"]
TOLERANCE, SHARE = 1e-3, 0.1  # pair against reference: at most this, and this share of the last steps' motion


def _merged(per_rank: dict, name: str, cfg_model) -> dict:
    """A run of the pair as one network: both columns' weights merged, rank 0's other records."""
    run = dict(per_rank[0][name])
    run["weights"] = merge_states([per_rank[0][name]["weights"], per_rank[1][name]["weights"]], cfg_model)
    run["start"] = per_rank[0][name]["start"] if all(
        per_rank[r][name]["start"] == per_rank[0][name]["start"] for r in (0, 1)) else None
    return run


def check_pair_reference(budget, base: tuple = tuple(PAIR_BASE)) -> dict:
    model = config(*base).model
    with tempfile.TemporaryDirectory(prefix="gpu-check-pair-") as tmp:
        pair = budget.spawn(runs_worker, 2, ([*base, "dist.mp=2"], [run_spec("pair", f"train.max_steps={STEPS}")],
                                             tmp))
        ref = budget.spawn(runs_worker, 1, ([*base, "dist.mp=1"], [
            run_spec("reference", f"train.max_steps={STEPS}"), run_spec("reference-1", "train.max_steps=1")], tmp))[0]
    same = compare(_merged(pair, "pair", model)["weights"], ref["reference"]["weights"])
    moved = compare(ref["reference-1"]["weights"], ref["reference"]["weights"])
    ok = same["max_rel_diff"] <= min(TOLERANCE, SHARE * moved["max_rel_diff"])
    return verdict(ok, f"the pair (two processes) after {STEPS} steps equals the reference (one) {describe(same)} "
                       f"(steps 2-{STEPS} move the weights by {moved['max_rel_diff']:.1e}; TF32 off)",
                   max_rel_diff=same["max_rel_diff"], moved=moved["max_rel_diff"])


def check_pair_profiled(budget, base: tuple = tuple(PROFILED)) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpu-check-profiled-") as tmp:
        runs = budget.spawn(runs_worker, 2, (list(base), [run_spec("profiled")], tmp))
    return profiled_verdict(runs[0]["profiled"]["profile"])


def profiled_verdict(profile: dict | None) -> dict:
    """The profiler's report of the pair: steps measured, every exchange's bytes as counted, NVML."""
    if profile is None:
        return verdict(False, "the profiled run wrote no profile.json")
    ranks = profile["ranks"]
    mismatches = sum(len(r["byte_mismatches"]) for r in ranks)  # the mismatching steps each rank kept
    checked = min(r["bytes_checked_steps"] for r in ranks)
    rate = min(r["images_per_s"] for r in ranks)
    waits = {k: round(v["wait"]["share"], 3) for k, v in ranks[0]["crossings"].items()}
    nvml = all((r.get("nvml") or {}).get("available") for r in ranks)
    return verdict(mismatches == 0 and checked > 0 and profile["steps"]["measured"] > 0,
                   f"the pair profiled over {profile['steps']['measured']} steps: {rate:.0f} img/s, bytes of "
                   f"{checked} steps checked against the analytic count with {mismatches} mismatches, NVML sampled "
                   f"on every rank: {nvml}; rank 0's exchange waits as shares of the step: {waits}",
                   images_per_s=rate, byte_mismatches=mismatches, crossing_wait_shares=waits, nvml=nvml,
                   step_median_s=ranks[0]["step"]["median_s"])


def check_pair_resume(budget, base: tuple = (*RESUME_BASE, "dist.device=cuda")) -> dict:
    model = config(*base).model
    with tempfile.TemporaryDirectory(prefix="gpu-check-pair-resume-") as tmp:
        per_rank = budget.spawn(runs_worker, 2, ([*base, "dist.mp=2"], resume_runs("pair"), tmp))
    runs = {name: _merged(per_rank, name, model) for name in per_rank[0]}
    return same_device_verdict(runs, "pair", "the pair")


SCALING_BATCH = 128
SCALING = [*PAPER, "data.image_size=232", "data.resize=232", f"data.train_size={4 * SCALING_BATCH}",
           "dist.device=cuda", "dist.amp=bf16", "dist.channels_last=true"]


def check_scaling(budget, base: tuple = tuple(SCALING), batch: int = SCALING_BATCH, warmup: int = WARMUP,
                  steps: int = TIMED_STEPS) -> dict:
    """The pair (2 GPUs), one GPU and DDP (2 GPUs), each stepping through `batch` images per step."""
    setups = {"one GPU": (1, ["dist.mp=1", f"train.batch_size={batch}"]),
              "pair (MP)": (2, ["dist.mp=2", f"train.batch_size={batch}"]),
              "DDP": (2, ["dist.mp=1", f"train.batch_size={batch // 2}"])}
    figures = {}
    for name, (ranks, extra) in setups.items():
        per_rank = budget.spawn(throughput_worker, ranks, ([*base, *extra], {name: []}, warmup, steps))
        figures[name] = min((r[name] for r in per_rank.values()), key=lambda f: f["images_per_s"])  # the slowest
    one = figures["one GPU"]["images_per_s"]
    text = ", ".join(f"{k} {v['images_per_s']:.0f} img/s ({v['images_per_s'] / one:.2f}x)" for k, v in figures.items())
    return outcome("INFO", f"{batch} images per step: {text}", **figures)
