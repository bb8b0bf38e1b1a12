"""The checks `python -m alexnet_mp.gpu_check` runs, in order, with their budgets: the one-GPU checks
first (exactness before figures), then those that need two GPUs."""
from __future__ import annotations

import os
import tempfile

from .configs import PAPER
from .hardware import clock_probe, clock_verdict, nvml_probe, nvml_verdict
from .link_checks import (host_async_verdict, host_async_worker, link_values_verdict, link_values_worker,
                          step_verdict, step_worker)
from .loader import loader_verdict, loader_worker
from .numerics import reference_verdict, reference_worker
from .pair_checks import check_pair_profiled, check_pair_reference, check_pair_resume, check_scaling
from .resume_checks import check_across, check_resume
from .runner import Check
from .timing import check_throughput

CUDA = "dist.device=cuda"
LINK = [*PAPER, "train.batch_size=16", CUDA]  # the paper's widths: a conv3 crossing of 6 MB
STEP = [*PAPER, "data.image_size=232", "data.resize=232", "train.batch_size=32", "data.train_size=160", CUDA]
STEP_VARIANTS = {"fp32": [], "bf16 NHWC": ["dist.amp=bf16", "dist.channels_last=true"]}
THROUGHPUT_BATCH = 128
THROUGHPUT = [*PAPER, "data.image_size=232", "data.resize=232", f"data.train_size={2 * THROUGHPUT_BATCH}",
              "dist.mp=1", CUDA]
LOADER_IMAGES = 1024


def _first(budget, fn, *args):
    return budget.spawn(fn, 1, args)[0]


def _loader(budget) -> dict:
    workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    with tempfile.TemporaryDirectory(prefix="gpu-check-loader-") as tmp:
        return loader_verdict(_first(budget, loader_worker, tmp, LOADER_IMAGES, THROUGHPUT_BATCH, workers))


def one_gpu_checks() -> list[Check]:
    return [
        Check("link_values", lambda b: link_values_verdict(_first(b, link_values_worker, LINK)), 120, 1,
              "the real PeerLink over NCCL, the column its own peer, against the in-process copy"),
        Check("link_host_async", lambda b: host_async_verdict(_first(b, host_async_worker, LINK)), 60, 1,
              "an exchange behind busy device work does not hold the host"),
        Check("step_sync_debug", lambda b: step_verdict(_first(b, step_worker, STEP, STEP_VARIANTS, 5, 2)), 180, 1,
              "Trainer.train_step over the real link under sync-debug mode 'error'"),
        Check("reference_gpu_vs_cpu", lambda b: reference_verdict(_first(b, reference_worker, [*PAPER, CUDA], 16)),
              120, 1, "the reference network's logits and gradients on the GPU against the CPU, TF32 off and on"),
        Check("cuda_event_timing", lambda b: clock_verdict(_first(b, clock_probe)), 60, 1,
              "the profiler's CUDA-event clock against the host's"),
        Check("nvml_by_uuid", lambda b: nvml_verdict(_first(b, nvml_probe)), 60, 1,
              "the profiler's NVML handle is this GPU, found by UUID"),
        Check("checkpoint_resume_cuda", lambda b: check_resume(b, "cuda"), 120, 1,
              "a checkpoint and resume on CUDA equal a straight run bit for bit"),
        Check("checkpoint_across_devices", lambda b: check_across(b, ("cuda", "cpu")), 180, 1,
              "a CUDA checkpoint resumes on the CPU and a CPU checkpoint on CUDA"),
        Check("throughput_one_gpu", lambda b: check_throughput(b, THROUGHPUT, THROUGHPUT_BATCH), 200, 1,
              "Trainer.train_step images/s: fp32, fp32 with TF32, bf16 with channels_last"),
        Check("loader_throughput", _loader, 150, 1, "loader images/s from a prepared JPEG set: CPU decode, nvJPEG"),
    ]


def two_gpu_checks() -> list[Check]:
    return [
        Check("pair_vs_reference", check_pair_reference, 180, 2, "the pair on two GPUs against the reference on one"),
        Check("pair_profiled_bf16", check_pair_profiled, 180, 2, "a profiled bf16 channels_last run of the pair"),
        Check("pair_resume", check_pair_resume, 150, 2, "the pair's checkpoint and resume equal a straight run"),
        Check("scaling", check_scaling, 240, 2, "images/s: the pair against one GPU and against DDP"),
    ]


def all_checks() -> list[Check]:
    return [*one_gpu_checks(), *two_gpu_checks()]
