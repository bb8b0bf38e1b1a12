"""Timing the training step: CUDA events on GPUs (the profiler's `CudaClock`), the host clock on CPUs.

`time_steps` runs `Trainer.train_step` as the training loop does (each step's outcome settled one
step late, no synchronisation per step) and reads the clock's marks once at the end, so the figure
is the device's throughput, with the host's own cost per step included only where it is the
bottleneck.
"""
from __future__ import annotations

import torch

from ..data import build_data
from ..distributed import setup
from ..profiler import clock_for
from ..trainer import Trainer
from .configs import config
from .steps import device_batches
from .report import outcome

WARMUP, STEPS = 20, 50  # steps before the first mark, and between the marks


def time_steps(trainer, batches: list, warmup: int = WARMUP, steps: int = STEPS, clock=None) -> dict:
    """Images per second of `trainer.train_step` over `steps` steps after `warmup`, cycling `batches`
    (already on the device); `clock` defaults to the one for the trainer's device."""
    clock = clock or clock_for(trainer.device)

    def run(n: int) -> None:
        for i in range(n):
            trainer.pending.append(trainer.train_step(batches[i % len(batches)]))
            trainer.settle(keep=1)  # the previous step's outcome, as the training loop reads it

    run(warmup)
    start = clock.now()
    run(steps)
    end = clock.now()
    trainer.settle()
    clock.settle()
    seconds = clock.seconds(start, end)
    images = steps * len(batches[0].labels) * trainer.layout.dims.dp  # every replica's batch
    return {"images_per_s": images / seconds, "step_ms": 1e3 * seconds / steps, "warmup": warmup, "steps": steps,
            "batch_per_replica": len(batches[0].labels), "clock": type(clock).__name__}


def throughput_worker(rank: int, base: list, modes: dict, warmup: int = WARMUP, steps: int = STEPS) -> dict:
    """{mode: time_steps' figures} for each mode's config overrides, on one process group."""
    layout = setup(config(*base).dist)
    bundle = build_data(config(*base))  # the modes change how the network runs, not the data
    out = {}
    for name, extra in modes.items():
        trainer = Trainer(config(*base, *extra), layout)
        trainer.attach_data(bundle)
        try:
            out[name] = time_steps(trainer, device_batches(trainer, 2), warmup, steps)
        finally:
            trainer.close()
        del trainer
        if layout.device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def throughput_outcome(figures: dict, what: str) -> dict:
    """INFO: images per second of each mode."""
    text = ", ".join(f"{name} {f['images_per_s']:.0f} img/s ({f['step_ms']:.1f} ms/step)" for name, f in figures.items())
    return outcome("INFO", f"{what}: {text}", **figures)
