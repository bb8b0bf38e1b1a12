"""FLOPs of an actual training step, and the peak rates they are compared with.

The step's FLOPs come from torch.utils.flop_counter (matrix multiplies and convolutions,
forward and backward, as dispatched); its convolution-backward formula counts a grouped
convolution's weight gradient as if it were ungrouped (`groups` times too much: the grouped
reference's conv2, conv4 and conv5), so that one formula is replaced here.

The peak is the better of a matrix multiply and a convolution measured for the same time
in the same processes and threads, so that a step, which runs only such kernels, cannot
show more than it unless the kernels it runs are faster than both.
"""
from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count


def _transpose(shape) -> list:
    return [shape[1], shape[0], *shape[2:]]


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, groups, output_mask, out_shape, **kwargs) -> int:
    """torch's convolution-backward count with the weight gradient divided by `groups`."""
    flops = 0
    if output_mask[0]:  # the input gradient: a transposed convolution with the (grouped) weight
        flops += conv_flop_count(list(grad_out_shape), list(w_shape), list(out_shape[0]), not transposed)
    if output_mask[1]:  # the weight gradient: a convolution of the input with the output gradient
        a, b = (grad_out_shape, x_shape) if transposed else (x_shape, grad_out_shape)
        flops += conv_flop_count(_transpose(a), _transpose(b), _transpose(out_shape[1]), False) // groups
    return flops


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode with the grouped-convolution correction, printing nothing."""
    return FlopCounterMode(display=False,
                           custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops})


def _rate(fn, flops_per_call: float, seconds: float, sync) -> float:
    """FLOP/s of fn() called for about `seconds` (after one untimed call)."""
    fn()
    sync()
    count, start = 0, time.perf_counter()
    while True:
        fn()
        count += 1
        if count % 4 == 0 or seconds <= 0:  # on a GPU: keep a few kernels queued between reads
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return flops_per_call * count / elapsed


def peak_rates(sizes: dict, seconds: float, dtype: str, device: torch.device) -> dict:
    """{"mm": FLOP/s, "conv": FLOP/s} of this process's kernels at the sizes given.

    sizes["mm"] is n of an n x n matrix multiply; sizes["conv"] is (batch, in, out, side) of a
    3 x 3 convolution with padding 1, forward only (CPU only: a GPU's peak is its matrix multiply).
    """
    kind = torch.bfloat16 if dtype == "bf16" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {}
    n = sizes["mm"]
    a, b = (torch.randn(n, n, device=device, dtype=kind) for _ in range(2))
    out["mm"] = _rate(lambda: torch.mm(a, b), 2 * n ** 3, seconds, sync)
    if "conv" in sizes:
        batch, c_in, c_out, side = sizes["conv"]
        x = torch.randn(batch, c_in, side, side, device=device, dtype=kind)
        w = torch.randn(c_out, c_in, 3, 3, device=device, dtype=kind)
        flops = 2 * batch * c_out * c_in * 9 * side * side
        with torch.no_grad():
            out["conv"] = _rate(lambda: torch.nn.functional.conv2d(x, w, padding=1), flops, seconds, sync)
    return out
