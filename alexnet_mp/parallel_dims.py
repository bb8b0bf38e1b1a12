"""The layout of the processes: `dp` data-parallel replicas of an `mp`-process model (torchtitan's
``parallel_dims.py``): validated once, then built into a 2-D device mesh.

Ranks are laid out as ``rank = dp_rank * mp + column``, so the two columns of a pair are
neighbouring ranks: on a node they share a switch or an NVLink bridge, and the heavy
point-to-point traffic stays between them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

MP = 2  # the paper's two columns: processes per model replica, unless dist.mp=1


class LaunchError(RuntimeError):
    """The processes were started in a way this program cannot run in."""


@dataclass(frozen=True)
class ParallelDims:
    """`world_size` processes as `dp` replicas x `mp` processes per replica (mp = 2 or 1)."""

    world_size: int
    mp: int = MP
    local_world_size: int | None = None  # processes on this node, when known

    def __post_init__(self):
        if self.mp not in (1, MP):
            raise LaunchError(f"dist.mp must be {MP} (the two columns) or 1 (the whole network per process), "
                              f"got {self.mp}")
        if self.world_size < self.mp or self.world_size % self.mp:
            raise LaunchError(
                f"alexnet-mp runs one process per column, so the number of processes must be even "
                f"(2 per model-parallel pair); got {self.world_size}. "
                f"Start it with torchrun --nproc_per_node=2 (or any even total across nodes), "
                f"or set dist.mp=1 to train the whole network in each process.")
        local = self.local_world_size
        if local is not None and local % self.mp:
            raise LaunchError(
                f"--nproc_per_node={local} is odd: a model-parallel pair would straddle two nodes "
                f"(its point-to-point traffic would cross the network); start an even number of "
                f"processes per node")

    @property
    def dp(self) -> int:
        return self.world_size // self.mp

    def column(self, rank: int) -> int:
        return rank % self.mp

    def dp_rank(self, rank: int) -> int:
        return rank // self.mp

    def peer(self, rank: int) -> int | None:
        return rank ^ 1 if self.mp == MP else None

    def check_replicas(self, wanted: int) -> None:
        """dist.dp, when set, must be what the launch gives."""
        if wanted and wanted != self.dp:
            raise LaunchError(f"dist.dp={wanted} replicas x {self.mp} processes needs {wanted * self.mp} "
                              f"processes, but {self.world_size} were started; start {wanted * self.mp} "
                              f"or set dist.dp=0")

    def build_mesh(self, device_type: str):
        """The 2-D ("dp", "mp") device mesh over every rank; its groups carry the gradients and the pairs."""
        return dist.device_mesh.init_device_mesh(device_type, (self.dp, self.mp), mesh_dim_names=("dp", "mp"))
