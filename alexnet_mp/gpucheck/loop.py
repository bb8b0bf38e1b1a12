"""A column that is its own peer: how the pair's real link is checked with one GPU.

Two NCCL ranks cannot share one GPU, so on one GPU the point-to-point path runs in a one-rank
process group whose only rank sends to itself (NCCL takes a send and a receive to oneself in one
batch; `torch.distributed.isend` allows it). Every exchange of such a column delivers what it sent,
so the column run over the real `PeerLink` must compute what the same column computes over a
`LoopbackLink`, which copies each send into its receive buffer in memory: the in-process copy.

gloo keeps no connection to itself, so on CPUs the same comparison runs as a mirrored pair: two
processes that both hold column 0, each the other's peer, on the same inputs; each receives a
copy of what it sent. Every exchange is then symmetric only if fc8 is split by classes, the class
count is even and so is the batch (`check_symmetric`).
"""
from __future__ import annotations

from ..config import Config
from ..distributed import Layout
from ..parallel_dims import ParallelDims
from ..transport import PeerLink


class LoopbackLink(PeerLink):
    """The pair's link with the process as its own peer, in memory: every receive is a copy of the
    send, in the same wire layout (NHWC with channels_last), bytes counted as the real link counts them."""

    def __init__(self, column: int = 0, timeout_s: float = 120.0):
        super().__init__(column, peer_rank=-1, timeout_s=timeout_s)

    def _post(self, send, recv, crossing: str, phase: str) -> list:
        if send is None or recv is None or send.shape != recv.shape:
            raise ValueError(f"the {crossing} {phase} exchange is one-sided or asymmetric; a column can be its "
                             f"own peer only with model.fc8=split, an even class count and an even batch")
        recv.copy_(send)
        return []


class ColumnZeroDims(ParallelDims):
    """Every process holds column 0 of one model replica; the peer of a rank is itself with one
    process (the self-loop) and the other process with two (the mirrored pair)."""

    def __post_init__(self):
        if self.world_size not in (1, 2):
            raise ValueError(f"a self-loop has 1 process and a mirrored pair 2, not {self.world_size}")

    @property
    def dp(self) -> int:
        return 1

    def column(self, rank: int) -> int:
        return 0

    def dp_rank(self, rank: int) -> int:
        return 0

    def peer(self, rank: int) -> int:
        return rank ^ (self.world_size - 1)


def column_zero_layout(base: Layout) -> Layout:
    """`base`'s process (its device, rank and process group) holding column 0 with the peer above;
    the pair's exchanges and the per-step agreement run on the default process group."""
    return Layout(ColumnZeroDims(base.dims.world_size), base.rank, base.local_rank, base.device, base.backend,
                  store=base.store)


def check_symmetric(cfg: Config) -> None:
    """Refuse a config in which some exchange is one-sided or of unequal halves."""
    m = cfg.model
    if m.fc8 != "split" or m.num_classes % 2 or cfg.train.batch_size % 2:
        raise ValueError(f"a column can be its own peer only with model.fc8=split, an even model.num_classes and an "
                         f"even train.batch_size (got {m.fc8}, {m.num_classes}, {cfg.train.batch_size})")
