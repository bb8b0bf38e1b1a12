"""The crossings between the two columns, as autograd Functions.

One Function per communication pattern (the Megatron-LM ``mappings.py`` style);
each docstring names its forward/backward pair. All of them move tensors with
``torch.distributed.batch_isend_irecv`` between the two processes of a pair, so
the same code runs on NCCL (GPUs) and gloo (CPUs).

Why the backward of the main crossing is a reduce-scatter: after a gather, each
column computes *different* outputs (its own half of conv3, fc6, ...) from the
*same* full input, so each column's gradient for the full input is only part of
the truth. The true gradient of a column's activations is its own share plus the
share the peer computed for them.
"""
from __future__ import annotations

import time
from collections import defaultdict
from datetime import timedelta

import torch
import torch.distributed as dist


class PeerError(RuntimeError):
    """The other column did not answer in time, or its process is gone."""


class CommStats:
    """Bytes and seconds per crossing and direction, summed until `reset`."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.bytes = defaultdict(lambda: {"sent": 0, "recv": 0})
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)

    def record(self, key: str, sent: int, recv: int, seconds: float) -> None:
        self.bytes[key]["sent"] += sent
        self.bytes[key]["recv"] += recv
        self.seconds[key] += seconds
        self.calls[key] += 1

    def as_dict(self) -> dict:
        return {k: dict(v, seconds=self.seconds[k], calls=self.calls[k]) for k, v in self.bytes.items()}


class PeerLink:
    """This process's connection to the other column of its model-parallel pair.

    `column` is 0 or 1 (column 0's channels and classes come first in the
    single-device layout); `peer_rank` is the peer's global rank. The timeout is
    mutable: long while the pair starts up, short once steps are flowing.
    """

    def __init__(self, column: int, peer_rank: int, group=None, timeout_s: float = 120.0):
        self.column = column
        self.peer_rank = peer_rank
        self.group = group
        self.timeout_s = timeout_s
        self.stats = CommStats()
        # Layout of 4-D tensors on the wire; both columns must use the same one
        # (build_column sets channels_last when the model runs in it).
        self.memory_format = torch.contiguous_format

    def in_column_order(self, own: torch.Tensor, peer: torch.Tensor) -> torch.Tensor:
        return torch.cat([own, peer] if self.column == 0 else [peer, own], dim=1)

    def split(self, full: torch.Tensor, own_width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Split a column-ordered tensor (dim 1) into (own slice, peer slice)."""
        peer_width = full.shape[1] - own_width
        if self.column == 0:
            return full[:, :own_width], full[:, own_width:]
        return full[:, peer_width:], full[:, :peer_width]

    def exchange(self, send: torch.Tensor | None, recv_shape, like: torch.Tensor,
                 crossing: str, phase: str) -> torch.Tensor | None:
        """Send `send` to the peer and/or receive a tensor of `recv_shape`, then wait."""
        return self.start(send, recv_shape, like, crossing, phase).wait()

    def start(self, send: torch.Tensor | None, recv_shape, like: torch.Tensor,
              crossing: str, phase: str) -> "PendingExchange":
        """Post the send and/or the receive and return at once; `.wait()` finishes it.

        Between the two, the caller computes what does not need the peer's data
        (the overlapped crossings of `overlap.py`). One exchange at a time: the
        pair matches messages in the order they are posted.
        """
        # The wire carries dense row-major tensors (a view would send garbage).
        # With channels_last, 4-D tensors travel as (N, H, W, C), so NHWC
        # activations cross without a layout conversion on either side.
        ops, recv, received = [], None, None
        if send is not None:
            send = (send.permute(0, 2, 3, 1) if self.nhwc(send.dim()) else send).contiguous()
            ops.append(dist.P2POp(dist.isend, send, self.peer_rank, self.group))
        if recv_shape is not None:
            n, *rest = recv_shape
            nhwc = self.nhwc(len(recv_shape))
            recv = torch.empty((n, *rest[1:], rest[0]) if nhwc else recv_shape, dtype=like.dtype,
                               device=like.device)
            received = recv.permute(0, 3, 1, 2) if nhwc else recv
            ops.append(dist.P2POp(dist.irecv, recv, self.peer_rank, self.group))
        posted = time.perf_counter()
        try:
            # On NCCL this makes the communication stream wait for the current
            # stream, so the send reads finished activations.
            works = dist.batch_isend_irecv(ops)
        except RuntimeError as e:
            raise self._peer_error(crossing, phase, e) from e
        return PendingExchange(self, works, send, recv, received, crossing, phase, time.perf_counter() - posted)

    def nhwc(self, ndim: int) -> bool:
        return ndim == 4 and self.memory_format == torch.channels_last

    def _peer_error(self, crossing: str, phase: str, e: Exception) -> PeerError:
        return PeerError(
            f"rank {dist.get_rank()} (column {self.column}): the {crossing} {phase} exchange with the "
            f"peer, rank {self.peer_rank} (column {1 - self.column}), failed or passed its "
            f"{self.timeout_s:.0f} s timeout ({str(e).splitlines()[0]}). The peer process has "
            f"probably died or hung: read its log; raise dist.timeout_s if it is only slow.")


class PendingExchange:
    """An exchange in flight, from `PeerLink.start`. It keeps the send buffer
    alive until `wait`, which gloo needs (it reads the buffer in the
    background) and which spares NCCL a record_stream.
    """

    def __init__(self, link: PeerLink, works, send, recv, received, crossing: str, phase: str,
                 post_seconds: float):
        self.link, self.works, self.send, self.recv, self.received = link, works, send, recv, received
        self.crossing, self.phase, self.post_seconds = crossing, phase, post_seconds

    def wait(self) -> torch.Tensor | None:
        """Finish the exchange; return the received tensor (or None).

        The seconds recorded are the time this process was held up: posting plus
        waiting, not the time the bytes were in flight behind other work.

        gloo: the host waits, at most the link's timeout. CUDA (NCCL): the
        current stream waits for the communication stream, and the host goes
        on queueing work. A timeout there would make NCCL poll on the host
        (sleeping a millisecond at a time) until the transfer ends, which
        stalls the queue that overlap.py keeps full; a hung peer is caught by
        NCCL's watchdog after the process group's timeout instead. So the host
        seconds are near zero on GPUs; the profiler's CUDA trace shows the
        device side.
        """
        link = self.link
        on_device = any(t is not None and t.is_cuda for t in (self.send, self.recv))
        start = time.perf_counter()
        try:
            for work in self.works:
                if on_device:
                    work.wait()
                else:
                    work.wait(timeout=timedelta(seconds=link.timeout_s))
        except RuntimeError as e:
            raise link._peer_error(self.crossing, self.phase, e) from e
        seconds = self.post_seconds + time.perf_counter() - start
        sent = self.send.numel() * self.send.element_size() if self.send is not None else 0
        got = self.recv.numel() * self.recv.element_size() if self.recv is not None else 0
        key = f"{self.crossing}.{self.phase}"
        link.stats.record(key, sent, got, seconds)
        self.send = None  # the buffer may be freed now
        return self.received


class GatherFromPeer(torch.autograd.Function):
    """Forward: all-gather the pair's activations along dim 1 (column 0 first).
    Backward: reduce-scatter: own slice of the gradient plus the slice the peer
    computed for this column; the peer's slice is sent to the peer.

    Used at conv3, fc6, fc7 and (classes split) fc8, whose inputs are both columns.
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


class GatherOutput(torch.autograd.Function):
    """Forward: all-gather the pair's outputs along dim 1 (column 0 first).
    Backward: split, keeping the own slice and sending nothing.

    Used for the logits when fc8 is split by classes: both processes compute the
    same loss from the same logits, so each already holds the full gradient and
    counting the peer's copy too would double it.
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


class GatherToFirst(torch.autograd.Function):
    """Column 0 only. Forward: receive column 1's activations and concatenate
    (column 0 first). Backward: send column 1 its slice of the gradient.

    Used at fc8 when column 0 holds all of fc8 (the original code's layout).
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


class BroadcastFromFirst(torch.autograd.Function):
    """Column 0 only. Forward: send the logits to column 1. Backward: identity.

    Column 1 computes the same loss from the same logits, so the gradient of the
    logits already lives here and nothing comes back.
    """

    @staticmethod
    def forward(ctx, logits, link: PeerLink):
        link.exchange(logits, None, logits, "logits", "forward")
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad_logits):
        return grad_logits, None


class ExchangeWithFirst(torch.autograd.Function):
    """Column 1 only, the counterpart of GatherToFirst and BroadcastFromFirst.
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
