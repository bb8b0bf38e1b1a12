"""Local response normalisation with a hand-written backward.

The same function as torch.nn.LocalResponseNorm (tests/test_lrn.py),

    b_c = a_c / D_c^beta,   D_c = k + alpha / n * sum of a_j^2 over the n channels j around c,

but computed in a few passes over memory instead of torch's pad + avg_pool3d +
pow + div chain and its autograd graph, which on a CPU cost a large share of the
training step. Gradient, with T_c = g_c * b_c / D_c:

    dL/da_j = g_j / D_j^beta - 2 * alpha * beta / n * a_j * sum of T_c over the c whose window holds j.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def channel_window_sum(t: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """out[:, c] = t[:, c - before] + ... + t[:, c + after], channels past the ends counting zero."""
    out = t.clone()
    channels = t.shape[1]
    for d in range(1, min(before, channels - 1) + 1):
        out[:, d:] += t[:, :channels - d]
    for d in range(1, min(after, channels - 1) + 1):
        out[:, :channels - d] += t[:, d:]
    return out


class _LRN(torch.autograd.Function):
    """Forward: b = a / D^beta. Backward: the gradient above, from a, D and D^-beta."""

    @staticmethod
    def forward(ctx, a, size: int, alpha: float, beta: float, k: float):
        # Reduced precisions (autocast) would lose the small alpha * sum term.
        dtype = torch.promote_types(a.dtype, torch.float32)
        x = a.to(dtype)
        before, after = size // 2, (size - 1) // 2  # torch's window
        d = channel_window_sum(x * x, before, after).mul_(alpha / size).add_(k)
        inv = d.pow(-beta)
        ctx.save_for_backward(x, d, inv)
        ctx.window, ctx.scale, ctx.out_dtype = (before, after), 2 * alpha * beta / size, a.dtype
        return (x * inv).to(a.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, d, inv = ctx.saved_tensors
        before, after = ctx.window
        g_inv = grad.to(x.dtype) * inv
        # T = g * b / D; the transpose of the window mirrors it.
        t = channel_window_sum(g_inv * x / d, after, before)
        return (g_inv - ctx.scale * x * t).to(ctx.out_dtype), None, None, None, None


class LocalResponseNorm(nn.Module):
    """Drop-in for torch.nn.LocalResponseNorm (same arguments, same results) on 4-D inputs."""

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0):
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def forward(self, x):
        return _LRN.apply(x, self.size, self.alpha, self.beta, self.k)

    def extra_repr(self) -> str:
        return f"{self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"
