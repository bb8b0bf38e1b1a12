"""The one process spawner, for the tests and the benchmarks (PyTorch ``common_distributed.py``'s role).

`run_ranks(fn, world_size, args)` starts one spawned process per rank with the
environment torchrun would give it, runs ``fn(rank, *args)`` in each and returns
their results; `WorkerPool` keeps such a group alive and hands it task after task.
A rank that raises has its traceback in the error; ranks that outlive the timeout
are killed and named. Results travel as bytes (torch.save), so tensors survive
the sender's exit.
"""
from __future__ import annotations

import io
import multiprocessing
import os
import queue
import socket
import time
import traceback

import torch
import torch.multiprocessing as mp


class SpawnError(RuntimeError):
    """A spawned rank failed or did not answer in time."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int) -> dict:
    """What torchrun puts in a worker's environment, for one node."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size)}


def _encode(value) -> bytes:
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _decode(blob: bytes):
    return torch.load(io.BytesIO(blob), weights_only=False)


def _as_torchrun_would(rank: int, world_size: int, port: int, env: dict) -> None:
    """The environment and start method of a torchrun worker (whose own children, the loader
    workers, are forked: a spawned child would inherit "spawn" and start each one anew)."""
    os.environ.update(env)
    os.environ.update(rank_env(rank, world_size, port))
    multiprocessing.set_start_method("fork", force=True)


def _child(fn, rank, world_size, port, args, results, env):
    _as_torchrun_would(rank, world_size, port, env)
    try:
        results.put((rank, "ok", _encode(fn(rank, *args))))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    # Leave without process-group teardown: a test may have killed the peer on
    # purpose, and a barrier at exit would then hang.
    results.close()
    results.join_thread()
    os._exit(0)


def _collect(results, wanted: set, timeout: float, what: str) -> dict:
    """{rank: value} for the `wanted` ranks; the first error (with its traceback) raises."""
    out = {}
    deadline = time.monotonic() + timeout
    while wanted - set(out):
        try:
            rank, status, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            missing = sorted(wanted - set(out))
            raise SpawnError(f"ranks {missing} did not finish {what} within {timeout:.0f} s") from None
        if status != "ok":
            raise SpawnError(f"rank {rank} failed in {what}:\n{value}")
        out[rank] = _decode(value)
    return out


def _start(target, world_size: int, make_args) -> list:
    ctx = mp.get_context("spawn")
    # Not daemons: a rank may start loader workers of its own.
    procs = [ctx.Process(target=target, args=make_args(r)) for r in range(world_size)]
    for p in procs:
        p.start()
    return procs


def _stop(procs, grace: float) -> None:
    for p in procs:
        p.join(timeout=grace)
        if p.is_alive():
            p.kill()
            p.join()


def run_ranks(fn, world_size: int = 2, args: tuple = (), timeout: float = 120.0,
              wait_for: list[int] | None = None, env: dict | None = None,
              per_rank_args: dict | None = None) -> dict:
    """Run fn(rank, *args) on `world_size` ranks (`per_rank_args` {rank: args} for some of them);
    return {rank: result} for the ranks in `wait_for`."""
    results = mp.get_context("spawn").Queue()
    port, env = free_port(), {"OMP_NUM_THREADS": "1", **(env or {})}
    per_rank_args = per_rank_args or {}
    procs = _start(_child, world_size,
                   lambda r: (fn, r, world_size, port, per_rank_args.get(r, args), results, env))
    wanted = set(range(world_size) if wait_for is None else wait_for)
    failed = True
    try:
        out = _collect(results, wanted, timeout, getattr(fn, "__name__", "the task"))
        failed = False
    finally:
        _stop(procs, 0.5 if failed else 5)
    return {r: out[r] for r in sorted(wanted)}


def _pool_worker(rank, world_size, port, setup, tasks, results, env):
    _as_torchrun_would(rank, world_size, port, env)
    try:
        context = setup(rank) if setup else None
        results.put((rank, "ok", _encode("ready")))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        return
    while (task := tasks.get()) is not None:
        fn, args = task
        try:
            results.put((rank, "ok", _encode(fn(context, *args))))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))
            break
    # As in _child: no process-group teardown at exit (a peer may be gone, and it only costs time).
    results.close()
    results.join_thread()
    os._exit(0)


class WorkerPool:
    """`world_size` long-lived ranks: `setup(rank)` once in each, then `run(fn, *args)` calls
    fn(setup's result, *args) on every rank and returns their results in rank order."""

    def __init__(self, world_size: int, setup=None, timeout: float = 600.0, env: dict | None = None):
        ctx = mp.get_context("spawn")
        self.world_size, self.timeout = world_size, timeout
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        port, env = free_port(), {"OMP_NUM_THREADS": "1", **(env or {})}
        self.procs = _start(_pool_worker, world_size,
                            lambda r: (r, world_size, port, setup, self.tasks[r], self.results, env))
        try:
            _collect(self.results, set(range(world_size)), timeout, "start-up")
        except BaseException:
            self.close()
            raise

    def submit(self, fn, *args) -> None:
        """Hand every rank fn(context, *args) without waiting; `collect` gets the results."""
        for q in self.tasks:
            q.put((fn, args))

    def collect(self) -> list:
        out = _collect(self.results, set(range(self.world_size)), self.timeout, "a task")
        return [out[r] for r in range(self.world_size)]

    def run(self, fn, *args) -> list:
        self.submit(fn, *args)
        return self.collect()

    def close(self) -> None:
        for q in self.tasks:
            q.put(None)
        _stop(self.procs, 30)
