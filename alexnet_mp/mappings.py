"""The crossings between the two columns, as autograd Functions (Megatron-LM's ``mappings.py`` style).

Private Functions, one per communication pattern, each docstring naming its
forward/backward pair; public lowercase wrappers that `model.py` calls.
All of them move tensors through the pair's `transport.PeerLink`.

Why the backward of the main crossing is a reduce-scatter: after a gather, each
column computes *different* outputs (its own half of conv3, fc6, ...) from the
*same* full input, so each column's gradient for the full input is only part of
the truth. The true gradient of a column's activations is its own share plus the
share the peer computed for them.
"""
from __future__ import annotations

import torch

from .transport import PeerLink


class _GatherFromPeer(torch.autograd.Function):
    """Forward: all-gather the pair's activations along dim 1 (column 0 first).
    Backward: reduce-scatter: own slice of the gradient plus the slice the peer
    computed for this column; the peer's slice is sent to the peer.
    """

    @staticmethod
    def forward(ctx, act_shard, link: PeerLink, crossing: str):
        ctx.link, ctx.crossing, ctx.own_width = link, crossing, act_shard.shape[1]
        peer_shard = link.exchange(act_shard, act_shard.shape, act_shard, crossing, "forward")
        return link.in_column_order(act_shard, peer_shard)

    @staticmethod
    def backward(ctx, grad_full):
        link = ctx.link
        grad_own, grad_for_peer = link.split(grad_full, ctx.own_width)
        grad_from_peer = link.exchange(grad_for_peer, grad_own.shape, grad_full, ctx.crossing, "backward")
        return grad_own + grad_from_peer, None, None


class _GatherOutput(torch.autograd.Function):
    """Forward: all-gather the pair's outputs along dim 1 (column 0 first).
    Backward: split, keeping the own slice and sending nothing: both processes
    compute the same loss from the same logits, so each already holds the full
    gradient, and counting the peer's copy too would double it.
    """

    @staticmethod
    def forward(ctx, out_shard, peer_width: int, link: PeerLink):
        ctx.link, ctx.own_width = link, out_shard.shape[1]
        peer_shape = (out_shard.shape[0], peer_width, *out_shard.shape[2:])
        peer_shard = link.exchange(out_shard, peer_shape, out_shard, "logits", "forward")
        return link.in_column_order(out_shard, peer_shard)

    @staticmethod
    def backward(ctx, grad_full):
        grad_own, _ = ctx.link.split(grad_full, ctx.own_width)
        return grad_own.contiguous(), None, None


class _GatherToFirst(torch.autograd.Function):
    """Column 0 only. Forward: receive column 1's activations and concatenate
    (column 0 first). Backward: send column 1 its slice of the gradient.
    """

    @staticmethod
    def forward(ctx, act_shard, link: PeerLink):
        ctx.link, ctx.own_width = link, act_shard.shape[1]
        peer_shard = link.exchange(None, act_shard.shape, act_shard, "fc8", "forward")
        return link.in_column_order(act_shard, peer_shard)

    @staticmethod
    def backward(ctx, grad_full):
        grad_own, grad_for_peer = ctx.link.split(grad_full, ctx.own_width)
        ctx.link.exchange(grad_for_peer, None, grad_full, "fc8", "backward")
        return grad_own, None


class _BroadcastFromFirst(torch.autograd.Function):
    """Column 0 only. Forward: send the logits to column 1. Backward: identity
    (column 1 computes the same loss from the same logits; nothing comes back).
    """

    @staticmethod
    def forward(ctx, logits, link: PeerLink):
        link.exchange(logits, None, logits, "logits", "forward")
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad_logits):
        return grad_logits, None


class _ExchangeWithFirst(torch.autograd.Function):
    """Column 1 only, the counterpart of _GatherToFirst and _BroadcastFromFirst.
    Forward: send this column's fc7 activations to column 0, receive the logits.
    Backward: drop the logits' gradient (column 0 owns fc8) and receive from
    column 0 the gradient of this column's activations.
    """

    @staticmethod
    def forward(ctx, act_shard, num_classes: int, link: PeerLink):
        ctx.link, ctx.shape = link, act_shard.shape
        link.exchange(act_shard, None, act_shard, "fc8", "forward")
        return link.exchange(None, (act_shard.shape[0], num_classes), act_shard, "logits", "forward")

    @staticmethod
    def backward(ctx, grad_logits):
        grad_own = ctx.link.exchange(None, ctx.shape, grad_logits, "fc8", "backward")
        return grad_own, None, None


# ------------------------------------------------------------------ public wrappers


def gather_from_peer(act_shard: torch.Tensor, link: PeerLink, crossing: str) -> torch.Tensor:
    """Both columns' activations, column 0's first; used at conv3, fc6, fc7 and (split) fc8."""
    return _GatherFromPeer.apply(act_shard, link, crossing)


def gather_output(out_shard: torch.Tensor, peer_width: int, link: PeerLink) -> torch.Tensor:
    """The full logits from both columns' class shards (fc8 split by classes)."""
    return _GatherOutput.apply(out_shard, peer_width, link)


def gather_to_first(act_shard: torch.Tensor, link: PeerLink) -> torch.Tensor:
    """Column 0 with fc8: its fc7 activations and column 1's, in column order."""
    return _GatherToFirst.apply(act_shard, link)


def broadcast_from_first(logits: torch.Tensor, link: PeerLink) -> torch.Tensor:
    """Column 0 with fc8: hand the logits to column 1."""
    return _BroadcastFromFirst.apply(logits, link)


def exchange_with_first(act_shard: torch.Tensor, num_classes: int, link: PeerLink) -> torch.Tensor:
    """Column 1 when column 0 holds fc8: send fc7's activations, receive the logits."""
    return _ExchangeWithFirst.apply(act_shard, num_classes, link)
