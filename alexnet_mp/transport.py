"""The point-to-point transport between the two columns of a pair.

`PeerLink` posts a send and/or a receive with ``torch.distributed.batch_isend_irecv``
(NCCL on GPUs, gloo on CPUs) and hands back a `PendingExchange`; `wait` finishes it.
`CommStats` counts bytes and host-blocked seconds per crossing and direction.
Observers (`LinkObserver`) see every exchange as it is posted and waited on: the
profiler times the waits through them, the fault-injection tests act through them.

The autograd Functions that use the link live in `mappings.py` and `overlap.py`.
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


class LinkObserver:
    """Sees a link's exchanges; override what you need. Called on the training thread."""

    def posting(self, link: "PeerLink", crossing: str, phase: str) -> None:
        """Before the send/receive of `crossing`.`phase` is posted."""

    def wait_begin(self, exchange: "PendingExchange") -> None:
        """Before the process waits for a posted exchange."""

    def wait_end(self, exchange: "PendingExchange") -> None:
        """After the exchange finished (its stats are recorded)."""


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
        self.observers: list[LinkObserver] = []
        # Layout of 4-D tensors on the wire; both columns must use the same one
        # (build_column sets channels_last when the model runs in it).
        self.memory_format = torch.contiguous_format

    def add_observer(self, observer: LinkObserver) -> None:
        self.observers.append(observer)

    def remove_observer(self, observer: LinkObserver) -> None:
        self.observers = [o for o in self.observers if o is not observer]

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
        pair matches messages in the order they are posted. The received tensor
        has `like`'s dtype and device.
        """
        for observer in self.observers:
            observer.posting(self, crossing, phase)
        # The wire carries dense row-major tensors (a view would send garbage).
        # With channels_last, 4-D tensors travel as (N, H, W, C), so NHWC
        # activations cross without a layout conversion on either side.
        send = self._wire(send) if send is not None else None
        recv, received = self._receive_buffer(recv_shape, like) if recv_shape is not None else (None, None)
        posted = time.perf_counter()
        works = self._post(send, recv, crossing, phase)
        return PendingExchange(self, works, send, recv, received, crossing, phase, time.perf_counter() - posted)

    def _wire(self, t: torch.Tensor) -> torch.Tensor:
        return (t.permute(0, 2, 3, 1) if self.nhwc(t.dim()) else t).contiguous()

    def _receive_buffer(self, shape, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the dense buffer the bytes land in, the same memory in the shape the caller asked for)."""
        if self.nhwc(len(shape)):
            n, c, h, w = shape
            recv = torch.empty((n, h, w, c), dtype=like.dtype, device=like.device)
            return recv, recv.permute(0, 3, 1, 2)
        recv = torch.empty(shape, dtype=like.dtype, device=like.device)
        return recv, recv

    def _post(self, send, recv, crossing: str, phase: str) -> list:
        ops = []
        if send is not None:
            ops.append(dist.P2POp(dist.isend, send, self.peer_rank, self.group))
        if recv is not None:
            ops.append(dist.P2POp(dist.irecv, recv, self.peer_rank, self.group))
        try:
            # On NCCL this makes the communication stream wait for the current
            # stream, so the send reads finished activations.
            return dist.batch_isend_irecv(ops)
        except RuntimeError as e:
            raise self._peer_error(crossing, phase, e) from e

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

    @property
    def key(self) -> str:
        return f"{self.crossing}.{self.phase}"

    def wait(self) -> torch.Tensor | None:
        """Finish the exchange; return the received tensor (or None).

        The seconds recorded are the time this process was held up: posting plus
        waiting, not the time the bytes were in flight behind other work.

        gloo: the host waits, at most the link's timeout. CUDA (NCCL): the
        current stream waits for the communication stream and the host goes on
        queueing work; a timeout would make NCCL poll on the host until the
        transfer ends, so a hung peer is caught by NCCL's watchdog after the
        process group's timeout instead, and the host seconds are near zero.
        """
        link = self.link
        for observer in link.observers:
            observer.wait_begin(self)
        start = time.perf_counter()
        self._finish()
        seconds = self.post_seconds + time.perf_counter() - start
        link.stats.record(self.key, _nbytes(self.send), _nbytes(self.recv), seconds)
        self.send = None  # the buffer may be freed now
        for observer in link.observers:
            observer.wait_end(self)
        return self.received

    def _finish(self) -> None:
        on_device = any(t is not None and t.is_cuda for t in (self.send, self.recv))
        try:
            for work in self.works:
                if on_device:
                    work.wait()
                else:
                    work.wait(timeout=timedelta(seconds=self.link.timeout_s))
        except RuntimeError as e:
            raise self.link._peer_error(self.crossing, self.phase, e) from e


def _nbytes(t: torch.Tensor | None) -> int:
    return t.numel() * t.element_size() if t is not None else 0


class NullLink(PeerLink):
    """A link whose exchanges move nothing and never wait: each receive is a ready
    buffer of the right shape (zeros, kept per shape). `make bench` runs the columns
    over it to measure what communication costs (its `no-comm` mode); no bytes count."""

    def __init__(self, column: int, timeout_s: float = 120.0):
        super().__init__(column, peer_rank=-1, timeout_s=timeout_s)
        self._buffers: dict = {}

    def start(self, send, recv_shape, like, crossing, phase) -> PendingExchange:
        for observer in self.observers:
            observer.posting(self, crossing, phase)
        received = None
        if recv_shape is not None:
            key = (tuple(recv_shape), like.dtype, like.device, self.nhwc(len(recv_shape)))
            if key not in self._buffers:
                self._buffers[key] = self._receive_buffer(recv_shape, like)[1].zero_()
            received = self._buffers[key]
        return PendingExchange(self, [], None, None, received, crossing, phase, 0.0)
