"""The coordinator: worker pools, the preparation round, and the interleaved repeats.

Every repeat measures every (mode, batch) once, plus the peak kernels of every process
configuration, in an order rotated from repeat to repeat, so that a slow spell of the
machine falls on all modes alike and each mode's figures pair with the others' of the same
repeat. Repeats go on until the stopping rule (stats.stop_verdict) is met.
"""
from __future__ import annotations

import functools
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from ..spawn import WorkerPool
from . import worker
from .figures import cell_key
from .modes import POOL_SIZES, Mode, modes_at, pools_for
from .stats import stop_verdict

START_DELAY_S = 0.05  # lead time of a wall-clock start shared by pools that run side by side
_STARTED = time.perf_counter()


def say(message: str) -> None:
    """A progress line on stderr, with the seconds since the command started."""
    print(f"bench [{time.perf_counter() - _STARTED:.0f} s]: {message}", file=sys.stderr, flush=True)


class Pools:
    """The worker pools by name, started once; `run` hands every rank of one pool a task."""

    def __init__(self, names: list[str], config: dict, device: str, cores: int, timeout: float):
        self.pools = {}
        say(f"starting the worker pools: {', '.join(f'{n} ({POOL_SIZES[n]})' for n in names)} processes")

        def start(name: str) -> WorkerPool:
            spec = {"config": config, "mp": 2 if POOL_SIZES[name] > 1 else 1, "device": device}
            # The "one" pool also runs single-all: its OpenMP runtime may use every core.
            env = {"OMP_NUM_THREADS": str(cores if name == "one" else 1)}
            return WorkerPool(POOL_SIZES[name], setup=functools.partial(worker.start, spec), timeout=timeout, env=env)
        with ThreadPoolExecutor(len(names)) as threads:  # side by side: each start waits on process start-up
            futures = {name: threads.submit(start, name) for name in names}
        failed = None
        for name, future in futures.items():
            try:
                self.pools[name] = future.result()
            except BaseException as e:
                failed = failed or e
        if failed is not None:
            self.close()
            raise failed

    def get(self, name: str) -> WorkerPool | None:
        return self.pools.get(name)

    def run(self, name: str, fn, *args) -> list:
        return self.pools[name].run(fn, *args)

    def run_together(self, names: tuple, fn, *args) -> list:
        """fn on every rank of several pools at once; their results in the order of `names`."""
        for name in names:
            self.pools[name].submit(fn, *args)
        return [r for name in names for r in self.pools[name].collect()]

    def pids(self) -> list[int]:
        return [p.pid for pool in self.pools.values() for p in pool.procs]

    def close(self) -> None:
        """Stop every pool, side by side (a rank takes seconds to leave its process group)."""
        with ThreadPoolExecutor(max(1, len(self.pools))) as threads:
            list(threads.map(WorkerPool.close, self.pools.values()))
        self.pools = {}


def prepare_round(pools: Pools, modes: list[Mode], preset) -> dict:
    """Build every trainer and batch and count each cell's FLOPs per step (all ranks together)."""
    flops, done = {}, set()
    for batch in preset.batches:
        for mode in modes_at(modes, batch, preset.batches, preset.profiled_batches):
            names = ("one", "indep") if mode.pool == "indep" else (mode.pool,)
            for name in names:
                if (name, mode.kind, batch) not in done:
                    started = time.perf_counter()
                    ranks = pools.run(name, worker.prepare, mode.kind, batch)
                    done.add((name, mode.kind, batch))
                    flops[name, mode.kind, batch] = sum(r["flops"] for r in ranks)
                    say(f"prepared {mode.kind} at batch {batch} in the {name!r} pool "
                        f"({time.perf_counter() - started:.1f} s)")
            flops[cell_key(mode.name, batch)] = sum(flops[n, mode.kind, batch] for n in names)
    return {k: v for k, v in flops.items() if isinstance(k, str)}


def measure_cell(pools: Pools, mode: Mode, batch: int, preset) -> dict:
    """One measurement: the mode's warm-up, then its timed steps; the slowest rank's seconds per step."""
    names = ("one", "indep") if mode.pool == "indep" else (mode.pool,)
    pools.run_together(names, worker.warm, mode.kind, batch, mode.threads, mode.profiled, preset.warmup)
    start_at = time.time() + START_DELAY_S if len(names) > 1 else None
    ranks = pools.run_together(names, worker.timed, mode.kind, batch, preset.steps, start_at)
    return {"seconds": max(r["seconds"] for r in ranks), "ranks": ranks}


def measure_peak(pools: Pools, config: dict, preset) -> dict:
    """The configuration's peak kernels, its processes running them at once (rates summed)."""
    start_at = time.time() + START_DELAY_S
    ranks = pools.run(config["pool"], worker.peak, preset.peak, preset.peak_s, config["dtype"],
                      config["threads"], start_at)
    rates = {k: sum(r[k] for r in ranks) for k in ranks[0]}
    return dict(rates, peak=max(rates.values()))


def repeat_tasks(modes: list[Mode], peaks: dict, preset, r: int) -> list[tuple]:
    """This repeat's tasks: the peaks, then each batch's modes rotated by r (batches alternate)."""
    names = list(peaks)
    k = r % max(1, len(names))
    tasks = [("peak", name) for name in names[k:] + names[:k]]
    batches = list(preset.batches) if r % 2 == 0 else list(reversed(preset.batches))
    for batch in batches:
        here = modes_at(modes, batch, preset.batches, preset.profiled_batches)
        k = r % len(here)
        tasks += [("cell", m, batch) for m in here[k:] + here[:k]]
    return tasks


def one_repeat(pools: Pools, modes: list[Mode], peaks: dict, preset, r: int, label: str) -> dict:
    record, started = {"cells": {}, "peaks": {}}, time.perf_counter()
    tasks = repeat_tasks(modes, peaks, preset, r)
    for i, task in enumerate(tasks, 1):
        if task[0] == "peak":
            record["peaks"][task[1]] = rates = measure_peak(pools, peaks[task[1]], preset)
            say(f"{label} [{i}/{len(tasks)}] peak {task[1]}: {rates['peak'] / 1e9:.0f} GFLOP/s")
            continue
        _, mode, batch = task
        cell = record["cells"][cell_key(mode.name, batch)] = measure_cell(pools, mode, batch, preset)
        images = batch * mode.runs
        say(f"{label} [{i}/{len(tasks)}] batch {batch} {mode.name}: {cell['seconds']:.3f} s/step, "
            f"{images / cell['seconds']:.1f} images/s")
    record["seconds"] = time.perf_counter() - started
    return record


def run_repeats(pools: Pools, modes: list[Mode], peaks: dict, preset, figures) -> dict:
    """Repeats until `figures(repeats)` (name -> Estimate) meet the stopping rule or a cap is reached."""
    repeats, started = [], time.perf_counter()
    while True:
        label = f"repeat {len(repeats) + 1} (of {preset.min_repeats}-{preset.max_repeats})"
        repeats.append(one_repeat(pools, modes, peaks, preset, len(repeats), label))
        durations = [r["seconds"] for r in repeats]
        stop, reason = stop_verdict(figures(repeats), len(repeats), preset.min_repeats, preset.max_repeats,
                                    time.perf_counter() - started, preset.cap_s, max(durations))
        say(f"after {len(repeats)} repeats ({time.perf_counter() - started:.0f} s): {reason}"
            + ("; stopping" if stop else "; continuing"))
        if stop:
            return {"repeats": repeats, "stop_reason": reason, "seconds": time.perf_counter() - started}


def pool_names(modes: list[Mode], peaks: dict) -> list[str]:
    names = set(pools_for(modes)) | {p["pool"] for p in peaks.values()}
    return [p for p in POOL_SIZES if p in names]


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
