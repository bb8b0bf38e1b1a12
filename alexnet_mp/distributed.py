"""Process setup from torchrun's environment: who am I, which device, who is my peer.

Ranks are laid out as ``rank = dp_rank * 2 + column``, so the two columns of a
pair are neighbouring ranks: on a node they share a switch or an NVLink bridge,
and the heavy point-to-point traffic stays between them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from . import resilience
from .config import DistConfig
from .exchange import PeerLink

MP = 2  # the paper's two columns


class LaunchError(RuntimeError):
    """The processes were started in a way this program cannot run in."""


@dataclass(frozen=True)
class ParallelDims:
    """The 2-D layout: `dp` data-parallel replicas of a `mp`=2 model-parallel pair."""

    world_size: int
    mp: int = MP

    def __post_init__(self):
        if self.mp != MP:
            raise LaunchError(f"model parallelism is fixed at {MP} columns, got mp={self.mp}")
        if self.world_size < MP or self.world_size % MP:
            raise LaunchError(
                f"alexnet-mp runs one process per column, so the number of processes must be even "
                f"(2 per model-parallel pair); got {self.world_size}. "
                f"Start it with torchrun --nproc_per_node=2 (or any even total across nodes).")

    @property
    def dp(self) -> int:
        return self.world_size // self.mp

    def column(self, rank: int) -> int:
        return rank % self.mp

    def dp_rank(self, rank: int) -> int:
        return rank // self.mp

    def peer(self, rank: int) -> int:
        return rank ^ 1


@dataclass
class Layout:
    dims: ParallelDims
    rank: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    mp_group: object = None
    dp_group: object = None
    mesh: object = None
    store: object = None  # the launch's store, shared by torchrun's restarts (see resilience.py)

    @property
    def column(self) -> int:
        return self.dims.column(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.dims.dp_rank(self.rank)

    @property
    def peer_rank(self) -> int:
        return self.dims.peer(self.rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def link(self, timeout_s: float) -> PeerLink:
        return PeerLink(self.column, self.peer_rank, self.mp_group, timeout_s)


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except KeyError:
        raise LaunchError(f"{name} is not set: start this program with "
                          f"torchrun --nproc_per_node=2 launch/train.py") from None


def choose_device(cfg: DistConfig, local_rank: int) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LaunchError("dist.device=cuda but CUDA is not available here; use dist.device=cpu")
    if local_rank >= torch.cuda.device_count():
        raise LaunchError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                          f"start at most that many processes per node (--nproc_per_node)")
    return torch.device("cuda", local_rank)


def setup(cfg: DistConfig) -> Layout:
    """Join the process group that torchrun describes and build the 2-D mesh."""
    dims = ParallelDims(_env_int("WORLD_SIZE"))
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dims.world_size))
    if cfg.dp and cfg.dp != dims.dp:
        raise LaunchError(f"dist.dp={cfg.dp} replicas x 2 columns needs {cfg.dp * MP} processes, but "
                          f"{dims.world_size} were started; start {cfg.dp * MP} or set dist.dp=0")
    if local_world % MP and local_world != 1:
        raise LaunchError(f"--nproc_per_node={local_world} is odd: a model-parallel pair would straddle two "
                          f"nodes; use an even number of processes per node")
    device = choose_device(cfg, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # Two processes on a small CPU must not each claim every core.
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // local_world))
    for key, value in resilience.debug_env(backend, cfg.flight_recorder).items():
        os.environ.setdefault(key, value)  # read when the groups start; the user's own settings win
    timeout = timedelta(seconds=cfg.startup_timeout_s)
    launch_store, attempt_store = resilience.attempt_store(rank, dims.world_size, timeout)
    init_kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, store=attempt_store, rank=rank, world_size=dims.world_size,
                            timeout=timeout, **init_kwargs)
    resilience.set_timeouts(cfg.startup_timeout_s)
    layout = Layout(dims, rank, local_rank, local_world, device, backend, store=launch_store)
    layout.mesh = dist.device_mesh.init_device_mesh(
        device.type, (dims.dp, dims.mp), mesh_dim_names=("dp", "mp"))
    layout.mp_group = layout.mesh.get_group("mp")
    layout.dp_group = layout.mesh.get_group("dp")
    return layout


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
