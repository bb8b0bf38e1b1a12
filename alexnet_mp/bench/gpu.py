"""One GPU's training throughput, for other modules (alexnet_mp.gpu_check) and the GPU preset's notes.

`gpu_images_per_s` runs the project's training step (`Trainer.train_step`) of the whole network
on one device in a spawned one-rank process: it counts the step's FLOPs, runs `warmup` steps,
times `steps` more with CUDA events and no synchronisation inside them, and measures a matrix
multiply of the same precision on the device for the share of its rate.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from ..spawn import run_ranks
from . import worker
from .presets import GPU, bench_config


def _single_device(rank: int, spec: dict, batch: int, warmup: int, steps: int, mm: int, mm_s: float) -> dict:
    w = worker.start(spec, rank)
    flops = worker.prepare(w, "reference", batch)["flops"]
    worker.warm(w, "reference", batch, 1, False, warmup)
    timing = worker.timed(w, "reference", batch, steps, None)
    dtype = "bf16" if w.cfg.dist.amp == "bf16" else "fp32"
    peak = worker.peak(w, {"mm": mm}, mm_s, dtype, 1, time.time())["mm"]
    device = w.layout.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    return {"seconds": timing["seconds"], "flops": flops, "peak": peak, "device_name": name,
            "nonfinite": timing["nonfinite"]}


def gpu_images_per_s(batch: int = 128, amp: str = "bf16", channels_last: bool = True, warmup: int = 20,
                     steps: int = 50, overrides=(), device: str = "cuda", mm: int = 8192, mm_s: float = 1.0,
                     timeout: float = 900.0) -> dict:
    """Training images/s of the whole network on one device (GPU 0 by default).

    The network is the paper's unless `overrides` (config key=value) say otherwise; `amp` is
    dist.amp ("bf16" or "off"), `channels_last` dist.channels_last; cudnn.benchmark is on
    (train.deterministic=false). Returns images_per_s, step_ms, flops_per_image (counted on the
    step), tflops (achieved), matmul_tflops (an `mm` x `mm` matrix multiply in the same precision,
    `mm_s` seconds), share_of_matmul_peak, and the settings. Raises alexnet_mp.spawn.SpawnError
    (with the rank's traceback) when the measurement fails.
    """
    preset = dataclasses.replace(GPU, batches=(batch,), amp=amp, channels_last=channels_last)
    cfg = bench_config(preset, overrides, device)
    spec = {"config": cfg.to_dict(), "mp": 1, "device": device}
    out = run_ranks(_single_device, 1, args=(spec, batch, warmup, steps, mm, mm_s), timeout=timeout)[0]
    achieved = out["flops"] / out["seconds"]
    return {"images_per_s": batch / out["seconds"], "step_ms": 1e3 * out["seconds"],
            "flops_per_image": out["flops"] / batch, "tflops": achieved / 1e12, "matmul_tflops": out["peak"] / 1e12,
            "share_of_matmul_peak": achieved / out["peak"], "batch": batch, "amp": amp,
            "channels_last": channels_last, "warmup_steps": warmup, "timed_steps": steps,
            "device": out["device_name"], "nonfinite_steps": out["nonfinite"]}


def gpu_note(gpus: int) -> str:
    """What the GPU preset could run on this machine."""
    if gpus >= 2:
        return f"{gpus} GPUs: one GPU for the single rows, GPUs 0 and 1 for the pair and DDP"
    return ("one GPU: two NCCL ranks cannot share a GPU, so only the single-GPU rows ran (no model-parallel "
            "pair, no DDP)")
