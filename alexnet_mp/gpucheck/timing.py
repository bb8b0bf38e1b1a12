"""Timing the training step: CUDA events on GPUs (the profiler's `CudaClock`), the host clock on CPUs.

`time_steps` runs `Trainer.train_step` as the training loop does (each step's outcome settled one
step late, no synchronisation per step) and reads the clock's marks once at the end, so the figure
is the device's throughput, with the host's own cost per step included only where it is the
bottleneck.
"""
from __future__ import annotations

import traceback

import torch

from ..data import build_data
from ..distributed import setup
from ..profiler import clock_for
from ..spawn import SpawnError
from ..trainer import Trainer
from .configs import config
from .report import outcome
from .runner import OutOfTime, error_line
from .steps import device_batches

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
    return throughput(setup(config(*base).dist), base, modes, warmup, steps)


def throughput(layout, base: list, modes: dict, warmup: int = WARMUP, steps: int = STEPS) -> dict:
    """{mode: time_steps' figures} for each mode's config overrides (on `base`), on `layout`'s group."""
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
    """INFO: images per second of each mode (and the achieved TFLOP/s where measured)."""
    def row(name: str, f: dict) -> str:
        flops = (f" = {f['tflops']:.1f} TFLOP/s, {f['share_of_matmul_peak']:.0%} of a matrix multiply's"
                 if "tflops" in f else "")
        return f"{name} {f['images_per_s']:.0f} img/s ({f['step_ms']:.1f} ms/step{flops})"

    return outcome("INFO", f"{what}: {', '.join(row(n, f) for n, f in figures.items())}", **figures)


# dist.amp, dist.channels_last and further overrides of each mode of `check_throughput`
BENCH_ROWS = {"fp32": ("off", False, ()), "fp32 TF32": ("off", False, ("dist.tf32=true",)),
              "bf16 channels_last": ("bf16", True, ())}


def bench_measure():
    """alexnet_mp.bench's single-GPU measurement (`gpu_images_per_s`), or None where it is missing."""
    try:
        from ..bench.gpu import gpu_images_per_s
    except ImportError:
        return None
    return gpu_images_per_s


def check_throughput(budget, base: list, batch: int, find_measure=bench_measure) -> dict:
    """One device's training images/s in each BENCH_ROWS mode, measured by alexnet_mp.bench's GPU
    function (the figure `make bench` reports); by `throughput_worker` where that function is missing,
    or where it fails, which then makes the check FAIL. `base` holds the device and the network."""
    measure, failure = find_measure(), "alexnet_mp.bench.gpu is not there"
    if measure is not None:
        device = config(*base).dist.device
        try:
            rows = {name: measure(batch=batch, amp=amp, channels_last=cl, overrides=extra, device=device,
                                  timeout=max(budget.left(), 1.0))
                    for name, (amp, cl, extra) in BENCH_ROWS.items()}
            return throughput_outcome(rows, f"one {device} device, batch {batch} (alexnet_mp.bench.gpu_images_per_s)")
        except SpawnError as e:
            failure = f"alexnet_mp.bench.gpu_images_per_s failed: {error_line(str(e))}"
        except Exception:
            failure = f"alexnet_mp.bench.gpu_images_per_s failed: {error_line(traceback.format_exc())}"
    modes = {name: [f"dist.amp={amp}", f"dist.channels_last={str(cl).lower()}", *extra]
             for name, (amp, cl, extra) in BENCH_ROWS.items()}
    try:
        figures = budget.spawn(throughput_worker, 1, ([*base, f"train.batch_size={batch}"], modes))[0]
    except OutOfTime as e:
        return outcome("FAIL", f"{failure}; no time left to time it here ({e})")
    own = throughput_outcome(figures, f"batch {batch}, timed here ({failure})")
    return own if measure is None else outcome("FAIL", own["detail"], **own["figures"])
