"""Process setup from torchrun's environment: who am I, which device, who is my peer; and how
the ranks agree on a decision (rank 0 decides, every rank learns the answer or the error).
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from . import flight_recorder, resilience
from .config import DistConfig
from .parallel_dims import LaunchError, ParallelDims
from .transport import PeerLink


@dataclass
class Layout:
    """This process's place in the launch: its rank, device, groups and (with mp=2) its peer."""

    dims: ParallelDims
    rank: int
    local_rank: int
    device: torch.device
    backend: str
    mp_group: object = None
    dp_group: object = None
    mesh: object = None
    store: object = None  # the launch's store, shared by torchrun's restarts (resilience.attempt_store)

    @property
    def column(self) -> int:
        return self.dims.column(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.dims.dp_rank(self.rank)

    @property
    def peer_rank(self) -> int | None:
        return self.dims.peer(self.rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def link(self, timeout_s: float) -> PeerLink | None:
        """This process's link to its peer column (None when each process holds the whole network)."""
        return PeerLink(self.column, self.peer_rank, self.mp_group, timeout_s) if self.dims.mp == 2 else None


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except KeyError:
        raise LaunchError(f"{name} is not set: start this program with "
                          f"torchrun --nproc_per_node=2 launch/train.py") from None


def choose_device(cfg: DistConfig, local_rank: int) -> torch.device:
    """CPU, or the GPU of this local rank; a process that sees exactly one GPU (a scheduler
    that gives each task its own) uses that one."""
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LaunchError("dist.device=cuda but CUDA is not available here; use dist.device=cpu")
    count = torch.cuda.device_count()
    if count == 1:
        return torch.device("cuda", 0)
    if local_rank >= count:
        raise LaunchError(f"local rank {local_rank} has no GPU: this process sees {count}; start at most "
                          f"that many processes per node (--nproc_per_node), or give each process one GPU")
    return torch.device("cuda", local_rank)


def setup(cfg: DistConfig) -> Layout:
    """Join the process group that torchrun describes and build the 2-D mesh."""
    local_world = int(os.environ["LOCAL_WORLD_SIZE"]) if "LOCAL_WORLD_SIZE" in os.environ else None
    dims = ParallelDims(_env_int("WORLD_SIZE"), cfg.mp, local_world)
    dims.check_replicas(cfg.dp)
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    device = choose_device(cfg, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # Processes sharing a small CPU must not each claim every core.
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // (local_world or dims.world_size)))
    for key, value in flight_recorder.debug_env(backend, cfg.flight_recorder).items():
        os.environ.setdefault(key, value)  # read when the groups start; the user's own settings win
    timeout = timedelta(seconds=cfg.startup_timeout_s)
    launch_store, attempt_store = resilience.attempt_store(rank, dims.world_size, timeout)
    init_kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, store=attempt_store, rank=rank, world_size=dims.world_size,
                            timeout=timeout, **init_kwargs)
    resilience.set_timeouts(cfg.startup_timeout_s)
    layout = Layout(dims, rank, local_rank, device, backend, store=launch_store)
    layout.mesh = dims.build_mesh(device.type)
    layout.mp_group, layout.dp_group = layout.mesh.get_group("mp"), layout.mesh.get_group("dp")
    return layout


def configure_backends(deterministic: bool, tf32: bool) -> None:
    """This process's math settings: train.deterministic and dist.tf32 (see the config's help)."""
    if deterministic:
        # cuBLAS reads it when its first handle is made, before any matmul of this process.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def teardown() -> None:
    """Leave the process groups and free them now, which joins their threads: a gloo thread still
    alive at interpreter exit may free a tensor after Python has shut down, and abort the process.
    Drop every reference to the Layout and the Trainer first (`gc.collect` frees their cycles)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


# ------------------------------------------------------------------ agreeing


class RunFailed(RuntimeError):
    """An error one rank found, raised on every rank."""


def decided_by_main(layout: Layout, fn, errors=(Exception,)):
    """fn() run on rank 0 alone; its result, or its error (one of `errors`), reaches every rank.

    The other ranks learn of rank 0's failure instead of waiting for it in a
    collective until the timeout.
    """
    box = [None, None]
    if layout.is_main:
        try:
            box = [fn(), None]
        except errors as e:
            box = [None, str(e)]
    with resilience.guarded("broadcast of rank 0's decision"):
        dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise RunFailed(box[1])
    return box[0]


def on_main_first(layout: Layout, fn, errors=(Exception,)):
    """fn() on rank 0 (its error reaches every rank), then on the others: for work that fills a
    shared cache. Each rank keeps its own result; nothing is sent."""
    kept = []
    decided_by_main(layout, lambda: kept.append(fn()), errors)
    return kept[0] if layout.is_main else fn()


def sum_over_replicas(values, layout: Layout) -> list[float]:
    """Add up per-replica figures (numbers, or a float64 tensor on the device), read once.

    Both columns of a pair hold the same figures, so the sum runs over the data-parallel group.
    """
    t = torch.as_tensor(values, dtype=torch.float64, device=layout.device)
    if layout.dims.dp > 1:
        dist.all_reduce(t, group=layout.dp_group)
    return t.tolist()
