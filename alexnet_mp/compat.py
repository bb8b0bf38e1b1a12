"""Small shims for the torch versions the project supports (setup.cfg's floor through requirements.txt)."""
from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist
from torch.distributed import distributed_c10d


def set_group_timeout(seconds: float, group=None) -> None:
    """The timeout of a process group's future operations (dist.set_timeout where torch has it; torch 2.11 has only the private setter)."""
    timeout = timedelta(seconds=seconds)
    if hasattr(dist, "set_timeout"):
        dist.set_timeout(timeout, group)
    else:
        distributed_c10d._set_pg_timeout(timeout, group)
