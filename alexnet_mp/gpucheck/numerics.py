"""The reference network on the GPU against the same network on the CPU.

One forward and backward of the grouped reference (the paper's widths, dropout off: the CPU and
CUDA generators draw different masks) on the same batch and initial weights, on the CPU and on the
GPU with TF32 off and with TF32 on. With TF32 off both sides compute in fp32 and differ only in
their kernels' summation order; TF32 rounds the inputs of every matrix product and convolution to
10 mantissa bits, so its difference is the one parity tolerances must allow for when dist.tf32 is on.
"""
from __future__ import annotations

import os

import torch

from ..distributed import configure_backends
from ..weights import build_reference
from .compare import compare, describe
from .configs import config, fixed_batch, one_pass
from .report import verdict

FP32_TOLERANCE = 5e-4  # worst |gpu - cpu| / max |cpu| over the logits and every gradient, TF32 off


def reference_worker(rank: int, overrides: list, batch: int) -> dict:
    """The GPU's logits and gradients against the CPU's, with TF32 off and on."""
    torch.set_num_threads(os.cpu_count() or 1)  # the CPU side is the slow one
    cfg = config(*overrides, "model.dropout=0")
    images, labels = fixed_batch(cfg, "cpu", batch)
    want = one_pass(build_reference(cfg.model, cfg.train.seed, "cpu"), images, labels)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    out = {}
    for tf32 in (False, True):
        configure_backends(deterministic=False, tf32=tf32)
        got = one_pass(build_reference(cfg.model, cfg.train.seed, device), images.to(device), labels.to(device))
        out["tf32" if tf32 else "fp32"] = compare(got, want)
    configure_backends(deterministic=False, tf32=False)
    return out


def reference_verdict(r: dict, tolerance: float = FP32_TOLERANCE) -> dict:
    fp32, tf32 = r["fp32"], r["tf32"]
    ok = fp32["identical"] or fp32["max_rel_diff"] <= tolerance
    return verdict(ok, f"GPU equals CPU with TF32 off {describe(fp32)} (tolerance {tolerance:g}); with TF32 on "
                       f"{describe(tf32)}",
                   fp32_max_rel_diff=fp32["max_rel_diff"], fp32_worst=fp32["worst"],
                   tf32_max_rel_diff=tf32["max_rel_diff"], tf32_worst=tf32["worst"], tolerance=tolerance)
