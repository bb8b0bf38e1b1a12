"""Comparing two sets of named tensors (logits, gradients, weights): bit for bit, or by the worst
difference relative to each tensor's own scale."""
from __future__ import annotations

import torch


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64 on the CPU (0 for two zero tensors)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        raise ValueError(f"cannot compare tensors of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    scale = b.abs().max().item() if b.numel() else 0.0
    worst = (a - b).abs().max().item() if b.numel() else 0.0
    return worst / scale if scale > 0 else worst


def compare(got: dict, want: dict) -> dict:
    """How `got` differs from `want` (same keys): equal bit for bit, the worst relative difference
    and the tensor it is in."""
    if got.keys() != want.keys():
        raise ValueError(f"the tensors differ in names: {sorted(got.keys() ^ want.keys())}")
    diffs = {k: relative_diff(got[k], want[k]) for k in want}
    worst = max(diffs, key=diffs.get)
    identical = all(torch.equal(got[k].detach().cpu(), want[k].detach().cpu()) for k in want)
    return {"identical": identical, "max_rel_diff": diffs[worst], "worst": worst, "tensors": len(want)}


def describe(result: dict) -> str:
    """'bit for bit' or 'to 3.1e-06 (worst: fc6.weight)'."""
    if result["identical"]:
        return "bit for bit"
    return f"to {result['max_rel_diff']:.1e} (worst: {result['worst']})"


def within(result: dict, tolerance: float) -> bool:
    return result["identical"] or result["max_rel_diff"] <= tolerance


def cpu_state(module: torch.nn.Module) -> dict:
    """A module's state dict as CPU copies (they outlive the module and its device)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}
