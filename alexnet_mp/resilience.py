"""What keeps a days-long run alive, or makes it stop cleanly: lost peers, restarts, preemption.

Lost peers. Every wait on another process has a deadline: generous until the first step has run
(start-up: compiling, reading caches), short afterwards. The point-to-point crossings enforce it in
exchange.PeerLink; the collectives (the per-step agreement, checkpoint commits, rank 0's
decisions) through the process groups' own timeout, which `set_timeouts` shortens. A failure or a
timeout surfaces as PeerError naming the other ranks and the collective, and the rank dumps its
flight recorder (the last collectives it saw; on NCCL also the crossings) into the run directory.

Restarts. Under ``torchrun --max-restarts=N`` a dead process makes the agent restart the whole
group. Each attempt joins its own key space in the agent's store (`attempt_store`): torchrun (2.14)
hands every attempt the same store, and gloo would otherwise read the dead attempt's addresses and
fail to connect (2 of 3 restarts failed so in a trial without the prefix). Rank 0 records the run
directory in the store, so a restarted attempt continues the same run from its last good checkpoint.

Preemption. SIGTERM or SIGINT only raise a flag (`catch_stop_signals`); the flag travels with the
per-step agreement (trainer/guard.py), so every rank stops after the same step, checkpoints and exits.
torchrun itself, signalled, stops its workers and then exits 1 with a traceback; `launch` (run by
launch/preemptible.py) runs torchrun with those signals passed on to the workers instead, so a
clean stop ends with exit status 0.
"""
from __future__ import annotations

import os
import pickle
import signal
import sys
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


# ---------------------------------------------------------------- flight recorder

FR_DIR = "flight_recorder"


def debug_env(backend: str, entries: int) -> dict:
    """Environment for torch's flight recorder and NCCL's error handling; set before the groups start.

    The recorder keeps the last `entries` collectives and crossings per rank (0: off). On NCCL the
    watchdog aborts a failed or timed-out collective instead of hanging (async error handling) and
    dumps the recorder when it fires.
    """
    env = {}
    if entries:
        env["TORCH_FR_BUFFER_SIZE"] = str(entries)
    if backend == "nccl":
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
        if entries:
            env["TORCH_NCCL_TRACE_BUFFER_SIZE"] = str(entries)
            env["TORCH_NCCL_DUMP_ON_TIMEOUT"] = "1"
    return env


def point_flight_recorder(run_path: Path) -> Path:
    """Send this rank's flight-recorder dump to RUN/flight_recorder/rank_<rank>.

    torch reads TORCH_FR_DUMP_TEMP_FILE when it first dumps, so setting it once the run directory
    is known is early enough. A user's own setting wins.
    """
    folder = Path(run_path) / FR_DIR
    if "TORCH_FR_DUMP_TEMP_FILE" not in os.environ:
        folder.mkdir(parents=True, exist_ok=True)
        os.environ["TORCH_FR_DUMP_TEMP_FILE"] = str(folder / "rank_")
    return folder


def dump_flight_recorder(rank: int) -> Path | None:
    """Write this rank's flight recorder (if on) where point_flight_recorder said; its path or None.

    On NCCL the watchdog dumps by itself on a timeout; on gloo nobody does, so the trainer calls
    this when a peer is lost.
    """
    prefix = os.environ.get("TORCH_FR_DUMP_TEMP_FILE")
    if not prefix or not int(os.environ.get("TORCH_FR_BUFFER_SIZE", "0") or 0):
        return None
    path = Path(f"{prefix}{rank}")
    if path.exists():  # the NCCL watchdog was first
        return path
    try:
        blob = torch._C._distributed_c10d._dump_fr_trace()  # what torch's own dump writes
        path.write_bytes(blob)
    except Exception:  # a private API: best effort, never hide the real error
        return None
    return path


def describe_flight_recorder(folder: Path, last: int = 8) -> str:
    """The newest `last` entries of each rank's dump in `folder`, one line each.

    torchfrtrace (torch's analyser) matches NCCL dumps across ranks; this reader also takes the
    gloo dumps it cannot parse, and a survivor's dump alone.
    """
    lines = []
    for path in sorted(Path(folder).glob("rank_*")):
        try:
            entries = pickle.loads(path.read_bytes())["entries"]
        except Exception as e:  # a foreign or torn file: say so and go on
            lines.append(f"{path.name}: unreadable ({e})")
            continue
        lines.append(f"{path.name}: {len(entries)} entries, newest last")
        for e in entries[-last:]:
            ours = [f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in e.get("frames", [])
                    if "site-packages" not in f["filename"] and "/torch/" not in f["filename"]]
            group = e.get("process_group", ("?", "?"))
            lines.append(f"  {e.get('profiling_name', '?'):<20} group {group[0]} ({group[1]}) "
                         f"seq {e.get('collective_seq_id', '?')}/{e.get('p2p_seq_id', '?')} "
                         f"{e.get('state', '?'):<9} sizes {e.get('input_sizes', '?')} at {' < '.join(ours[:3]) or '?'}")
    return "\n".join(lines) or f"{folder}: no rank_* dumps"


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


# ---------------------------------------------------------------- preemption: the training processes

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_ENV = "ALEXNET_MP_STOP"  # set by the launcher once it was told to stop; processes started later stop too

_stop_signal = ""  # name of the first stop signal received, '' while none


def stop_requested() -> str:
    """The name of the stop signal this process received ('' if none)."""
    return _stop_signal


def _on_stop_signal(signum, frame) -> None:
    # Only a flag: the step in flight must finish on every rank before anyone stops. Repeats change
    # nothing; a process that never stops is killed by whoever signalled it (its grace period).
    global _stop_signal
    _stop_signal = _stop_signal or signal.Signals(signum).name


@contextmanager
def catch_stop_signals(signals=STOP_SIGNALS):
    """Turn SIGTERM/SIGINT into a request to stop after the current step; restored on exit.

    A process started after its launcher was told to stop (a restart) begins with the request set.
    """
    global _stop_signal
    _stop_signal = os.environ.get(STOP_ENV, "")
    previous = {s: signal.signal(s, _on_stop_signal) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------- preemption: the launcher

_launcher_stop = ""  # the first stop signal the launcher received, '' while none


def worker_pids(parent: int | None = None) -> list[int]:
    """The training processes torchrun started from `parent` (this process by default): its live
    children that lead a session of their own, as torchrun starts each; read from /proc."""
    parent = os.getpid() if parent is None else parent
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:  # after the command's closing parenthesis: state, ppid, pgrp, session
            state, ppid, _, session = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        if int(ppid) == parent and int(session) == int(entry.name) and state != "Z":
            found.append(int(entry.name))
    return sorted(found)


def _forward_stop(signum, frame) -> None:
    # torchrun's agent runs in this process: its children are the training processes. They get
    # the signal, stop after the same step and exit 0, and torchrun then ends as after any run.
    global _launcher_stop
    first = not _launcher_stop
    _launcher_stop = _launcher_stop or signal.Signals(signum).name
    workers = worker_pids()
    if workers:
        os.environ[STOP_ENV] = _launcher_stop  # a restart torchrun makes from now on stops too
        for pid in workers:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
    elif first:  # no training process yet (rendezvous, between restarts): torchrun stops as it would
        from torch.distributed.elastic.multiprocessing import SignalException
        raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))


@contextmanager
def forward_stop_signals(signals=STOP_SIGNALS):
    """In the launcher: SIGTERM/SIGINT go to the training processes instead of ending it; the
    handlers and the environment are restored on exit."""
    global _launcher_stop
    _launcher_stop, before = "", os.environ.get(STOP_ENV)
    previous = {s: signal.signal(s, _forward_stop) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if before is None:
            os.environ.pop(STOP_ENV, None)
        else:
            os.environ[STOP_ENV] = before


def launch(argv: list[str]) -> int:
    """Run torchrun with `argv` in this process, SIGTERM/SIGINT passed to the training processes.

    torchrun's own handling of those two (stop the workers, then exit 1 with a traceback) is
    turned off; it keeps SIGHUP and SIGQUIT. The exit status is torchrun's: 0 when every training
    process exited 0, whether it finished or stopped on a signal.
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import record

    args = torchrun.parse_args(argv)
    ours = {s.name for s in STOP_SIGNALS}
    args.signals_to_handle = ",".join(s for s in args.signals_to_handle.split(",") if s.strip() not in ours)
    with forward_stop_signals():
        try:
            record(torchrun.run)(args)
        except SignalException as e:
            if e.sigval not in STOP_SIGNALS:  # SIGHUP, SIGQUIT: torchrun's own handling, its own report
                raise
            print(f"error: torchrun stopped on {e.sigval.name} before its training processes were running "
                  f"(nothing to checkpoint); start the command again", file=sys.stderr)
            return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":  # python -m alexnet_mp.resilience RUN/flight_recorder
    print(describe_flight_recorder(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".")))
