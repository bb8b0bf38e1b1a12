"""Preemption: a stop signal ends a run cleanly, after the same step on every rank, with a checkpoint.

In the training processes SIGTERM or SIGINT only raise a flag (`catch_stop_signals`); the flag
travels with the per-step agreement (trainer/guard.py), so every rank stops after the same step,
checkpoints and exits 0. torchrun itself, signalled, stops its workers and then exits 1 with a
traceback; `launch` (run by launch/preemptible.py) runs torchrun with those signals passed on to
the training processes instead, so a clean stop ends with exit status 0 (docs/operations.md).
"""
from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

# ---------------------------------------------------------------- the training processes

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_ENV = "ALEXNET_MP_STOP"  # set by the launcher once it was told to stop; processes started later stop too

_stop_signal = ""  # name of the first stop signal received, '' while none


@contextmanager
def _handling(signals, handler):
    """`handler` for `signals` inside the block; the previous handlers restored after it."""
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


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
    with _handling(signals, _on_stop_signal):
        yield


# ---------------------------------------------------------------- the launcher

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
    try:
        with _handling(signals, _forward_stop):
            yield
    finally:
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
