"""Crossing layers that overlap the exchange with their own work.

A convolution or linear layer is linear in its input channels. At a crossing a
column's layer reads both columns' activations,

    y = W_own * own + W_peer * peer + b,

so the column can post the exchange of `own`, compute W_own * own + b while the
peer's activations are in flight, and only then add W_peer * peer. Backward is
the mirror image: compute the gradient of the peer's activations first and post
it, compute the weight and bias gradients and the gradient of its own
activations while it travels, then add the share the peer computed for this
column. The sums are those of `mappings.gather_from_peer` followed by the layer, taken in
another order, so the two paths agree to fp32 rounding (tests/test_parity.py),
and the bytes on the wire are the same (`summary.analytic_bytes`).

Under autocast the activations go on the wire in the autocast dtype (bf16
halves the bytes); the weights stay fp32 and their gradients come back fp32.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .transport import PeerLink


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a conv or linear layer computes in here: autocast's, if it is on."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


def _autocast_off(t: torch.Tensor):
    # The Function casts explicitly, so autocast must not cast again (and it
    # has no rule for convolution_backward, which would see mixed dtypes).
    return torch.autocast(t.device.type, enabled=False)


class ConvOp:
    """F.conv2d and its two gradients, for a crossing convolution (groups=1)."""

    def __init__(self, conv: nn.Conv2d):
        self.stride, self.padding = conv.stride, conv.padding

    def forward(self, x, w, b=None):
        return F.conv2d(x, w, b, self.stride, self.padding)

    def backward(self, g, x, w, input=False, weight=False, bias=False):
        """(grad input, grad weight, grad bias), each None unless asked for."""
        return torch.ops.aten.convolution_backward(
            g, x, w, [w.shape[0]] if bias else None, self.stride, self.padding, (1, 1),
            False, (0, 0), 1, [input, weight, bias])


class LinearOp:
    """F.linear and its two gradients, for a crossing fully connected layer."""

    def forward(self, x, w, b=None):
        return F.linear(x, w, b)

    def backward(self, g, x, w, input=False, weight=False, bias=False):
        return (g @ w if input else None, g.t() @ x if weight else None, g.sum(0) if bias else None)


def op_for(layer: nn.Module):
    return ConvOp(layer) if isinstance(layer, nn.Conv2d) else LinearOp()


class _CrossingLayer(torch.autograd.Function):
    """Forward: post the all-gather of the pair's activations; compute this
    column's share of the layer (W_own * own + b) while they travel; add
    W_peer * peer.
    Backward: the matching reduce-scatter, overlapped: compute and post the
    gradient of the peer's activations; compute the weight and bias gradients
    and the gradient of the own activations; add the gradient the peer sent.

    `mutual`=False is the one-sided crossing of column 0 when it holds all of
    fc8 (model.fc8=rank0): receive in forward, send in backward; column 1 runs
    `exchange_with_first`. Used at conv3, fc6, fc7 and fc8 when dist.overlap is on.
    """

    @staticmethod
    def forward(ctx, own, weight, bias, op, link: PeerLink, crossing: str, mutual: bool):
        dtype = compute_dtype(own)
        ctx.input_dtype = own.dtype
        own = own.to(dtype)  # what goes on the wire: bf16 under bf16 autocast
        with _autocast_off(own):
            pending = link.start(own if mutual else None, own.shape, own, crossing, "forward")
            w = weight.to(dtype)  # saved as cast: backward need not cast the weight again
            w_own, w_peer = link.split(w, own.shape[1])
            out = op.forward(own, w_own, bias.to(dtype))
            peer = pending.wait()  # both columns' crossings have the same width
            out += op.forward(peer, w_peer)
        ctx.save_for_backward(own, peer, w)
        ctx.weight_dtype = weight.dtype
        ctx.op, ctx.link, ctx.crossing, ctx.mutual = op, link, crossing, mutual
        return out

    @staticmethod
    def backward(ctx, grad_out):
        own, peer, w = ctx.saved_tensors
        op, link = ctx.op, ctx.link
        with _autocast_off(grad_out):
            g = grad_out.to(own.dtype)
            w_own, w_peer = link.split(w, own.shape[1])
            # First what the peer is waiting for, then the rest behind its transfer.
            grad_peer = op.backward(g, peer, w_peer, input=True)[0]
            pending = link.start(grad_peer, own.shape if ctx.mutual else None, g, ctx.crossing, "backward")
            # One weight gradient over the full input: a copy of the activations
            # is cheaper than concatenating two halves of the weight gradient.
            _, grad_w, grad_b = op.backward(g, link.in_column_order(own, peer), w, weight=True, bias=True)
            grad_own = op.backward(g, own, w_own, input=True)[0]
            from_peer = pending.wait()
            if from_peer is not None:
                grad_own += from_peer
        return (grad_own.to(ctx.input_dtype), grad_w.to(ctx.weight_dtype), grad_b.to(ctx.weight_dtype),
                None, None, None, None)


def overlapped_crossing(act_shard: torch.Tensor, layer: nn.Module, op, link: PeerLink, crossing: str,
                        mutual: bool = True) -> torch.Tensor:
    """`layer` (a conv or linear layer holding this column's output rows) applied to both
    columns' activations, computing the own half while the peer's are in flight."""
    return _CrossingLayer.apply(act_shard, layer.weight, layer.bias, op, link, crossing, mutual)
