"""Whole training runs (`Trainer.fit`, with the profiler when a run asks for it), several one after
another in the same processes and process group, each reporting what it ended with."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ..callbacks import Callback
from ..distributed import setup
from ..profiler import PROFILE_FILE, profiling
from ..trainer import Trainer
from .compare import cpu_state
from .configs import config


def buffer_layout(optimizer: torch.optim.Optimizer) -> dict:
    """Whether every momentum buffer lies on its parameter's device with its parameter's strides."""
    pairs = [(p, optimizer.state.get(p, {}).get("momentum_buffer"))
             for g in optimizer.param_groups for p in g["params"]]
    held = [(p, b) for p, b in pairs if b is not None]
    return {"buffers": len(held), "on_param_device": all(b.device == p.device for p, b in held),
            "param_strides": all(b.stride() == p.stride() for p, b in held)}


class FinalState(Callback):
    """A run's momentum-buffer layout when training starts (after any resume) and when it ends, its
    step count and its final weights as CPU copies."""

    def __init__(self):
        self.layout_at_start = self.layout_at_end = self.weights = None
        self.steps = 0

    def on_fit_start(self, trainer):
        self.layout_at_start = buffer_layout(trainer.optimizer)

    def on_fit_end(self, trainer, error):
        if error is None:
            self.layout_at_end, self.steps = buffer_layout(trainer.optimizer), trainer.state.step
            self.weights = cpu_state(trainer.model)


def run_spec(name: str, *overrides: str, resume: str = "") -> dict:
    """One run of `runs_worker`: its folder name, its config overrides, and the run it continues (a
    copy of that run's folder, so that several runs can continue the same one)."""
    return {"name": name, "overrides": list(overrides), "resume": resume}


def runs_worker(rank: int, base: list, runs: list, out_dir: str) -> dict:
    """Every run of `runs` (run_spec's) in turn, on this process group: {name: what it ended with}."""
    layout = setup(config(*base).dist)
    out = {}
    for run in runs:
        extra = []
        if run["resume"]:
            folder = Path(out_dir) / run["name"]
            if rank == 0:
                shutil.copytree(Path(out_dir) / run["resume"], folder)
            if dist.get_world_size() > 1:
                dist.barrier()  # the copy is complete before any rank looks for it
            extra = [f"run.resume={folder}"]
        cfg = config(*base, f"run.out_dir={out_dir}", f"run.name={run['name']}", *run["overrides"], *extra)
        probe = FinalState()
        with profiling(cfg, layout) as prof:
            Trainer(cfg, layout, callbacks=[prof, probe]).fit()
        profile = Path(out_dir) / run["name"] / PROFILE_FILE
        out[run["name"]] = {"weights": probe.weights, "start": probe.layout_at_start, "end": probe.layout_at_end, "steps": probe.steps,
                            "profile": json.loads(profile.read_text()) if rank == 0 and profile.is_file() else None}
    return out
