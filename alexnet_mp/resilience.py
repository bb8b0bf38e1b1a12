"""What keeps a days-long run alive: lost peers and torchrun's restarts.

Lost peers. Every wait on another process has a deadline: generous until the first step has run
(start-up: compiling, reading caches), short afterwards. The point-to-point crossings enforce it in
transport.PeerLink; the collectives (the per-step agreement, checkpoint commits, rank 0's
decisions) through the process groups' own timeout, which `set_timeouts` shortens. A failure or a
timeout surfaces as PeerError naming the other ranks and the collective, and the rank dumps its
flight recorder (flight_recorder.py) into the run directory.

Restarts. Under ``torchrun --max-restarts=N`` a dead process makes the agent restart the whole
group. Each attempt joins its own key space in the agent's store (`attempt_store`): torchrun hands
every attempt the same store, and gloo would otherwise read the dead attempt's addresses and fail
to connect. Rank 0 records the run directory in the store, so a restarted attempt continues the
same run from its last good checkpoint.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from . import compat
from .transport import PeerError

# ---------------------------------------------------------------- timeouts and lost peers

_timeout_s = 0.0  # the timeout now in force on this process's groups


def set_timeouts(seconds: float, link=None, groups=()) -> None:
    """Give the default process group, `groups` and `link` this timeout."""
    global _timeout_s
    _timeout_s = seconds
    if link is not None:
        link.timeout_s = seconds
    for group in (None, *groups):
        compat.set_group_timeout(seconds, group)


def _others(group) -> str:
    me = dist.get_rank()
    ranks = [r for r in (dist.get_process_group_ranks(group) if group is not None
                         else range(dist.get_world_size())) if r != me]
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return f"ranks {', '.join(map(str, ranks))}" if len(ranks) <= 4 else f"the {len(ranks)} other ranks"


@contextmanager
def guarded(what: str, group=None):
    """Report a collective that failed or passed its timeout as a PeerError naming it and its peers."""
    try:
        yield
    except (PeerError, torch.OutOfMemoryError):  # the latter is a RuntimeError, but no peer's fault
        raise
    except RuntimeError as e:  # gloo and NCCL raise DistBackendError, a RuntimeError
        raise PeerError(
            f"rank {dist.get_rank()}: the {what} with {_others(group)} failed or passed its "
            f"{_timeout_s:.0f} s timeout ({str(e).splitlines()[0] if str(e) else type(e).__name__}). "
            f"A peer process has probably died or hung: read its log; raise dist.timeout_s if it is "
            f"only slow.") from e


def current_timeout() -> float:
    """The timeout now in force on this process's groups, in seconds."""
    return _timeout_s


# ---------------------------------------------------------------- restarts

RUN_DIR_KEY = "alexnet_mp/run_dir"  # in the agent's store, outside the per-attempt key spaces


def restart_count() -> int:
    """How many times torchrun has restarted this group (0 for the first attempt, or without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def attempt_store(rank: int, world_size: int, timeout: timedelta):
    """(the launch's store, this attempt's view of it) for init_process_group."""
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    return store, dist.PrefixStore(f"alexnet_mp/attempt-{restart_count()}", store)


def remember_run_dir(store, path: Path) -> None:
    if store is not None:
        store.set(RUN_DIR_KEY, str(path))


def recall_run_dir(store) -> Path | None:
    """The run directory an earlier attempt of this launch recorded, if any."""
    if store is None or restart_count() == 0 or not store.check([RUN_DIR_KEY]):
        return None
    return Path(store.get(RUN_DIR_KEY).decode())
