"""Multi-process tests on gloo, in the spirit of PyTorch's common_distributed.py.

`run_ranks(fn, world_size, ...)` starts one spawned process per rank with the
environment torchrun would give it, runs ``fn(rank, *args)`` in each, and returns
the ranks' results. A rank that raises has its traceback surfaced in the test
failure; ranks that outlive the per-test timeout are killed and named.
"""
from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback

import torch
import torch.multiprocessing as mp

SMALL_MODEL = [
    "model.num_classes=5", "model.crop_size=67", "model.conv_widths=[8,16,24,24,16]",
    "model.fc_width=32", "model.init=he", "model.dropout=0.5",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world_size, port, args, results, env):
    os.environ.update(env)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size)})
    try:
        # Tensors travel as bytes: torch's queue would share them through file
        # descriptors that die with this process.
        buf = io.BytesIO()
        torch.save(fn(rank, *args), buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    # Leave without process-group teardown: a test may have killed the peer on
    # purpose, and a barrier at exit would then hang.
    results.close()
    results.join_thread()
    os._exit(0)


def run_ranks(fn, world_size: int = 2, args: tuple = (), timeout: float = 120.0,
              wait_for: list[int] | None = None, env: dict | None = None) -> dict:
    """Run fn on `world_size` ranks; return {rank: result} for the ranks in `wait_for`."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, args, results, env))
             for r in range(world_size)]
    for p in procs:
        p.start()
    wanted = set(range(world_size) if wait_for is None else wait_for)
    out, errors = {}, {}
    deadline = time.monotonic() + timeout
    try:
        while wanted - set(out) - set(errors):
            try:
                rank, status, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                missing = sorted(wanted - set(out) - set(errors))
                raise AssertionError(f"ranks {missing} did not finish within {timeout:.0f} s") from None
            if status == "ok":
                out[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                errors[rank] = value
            if errors:
                break
    finally:
        for p in procs:
            p.join(timeout=0.5 if errors else 5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        rank = min(errors)
        raise AssertionError(f"rank {rank} failed:\n{errors[rank]}")
    return {r: out[r] for r in wanted}
