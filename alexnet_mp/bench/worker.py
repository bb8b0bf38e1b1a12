"""What runs inside the benchmark's worker processes (alexnet_mp.spawn.WorkerPool ranks).

Each rank joins its pool's process group with `distributed.setup` (`start`), then serves
tasks: `prepare` (build a mode's trainer and batches, count one step's FLOPs), `warm`
(untimed steps), `timed` (timed steps, barrier to barrier) and `peak` (the peak kernels).
Trainers are kept per kind for the pool's life; their batches are cut once per batch size
from the loaders of the built-in data set, so no data loading is timed.
"""
from __future__ import annotations

import contextlib
import copy
import io
import itertools
import tempfile
import time

import torch
import torch.distributed as dist

from ..config import build_config
from ..data import Loaders, build_data
from ..distributed import Layout, setup
from ..parallel_dims import ParallelDims
from ..profiler import Profiler
from ..trainer import Trainer
from ..transport import NullLink
from .flops import flop_counter, peak_rates
from .modes import kind_shape
from .steps import StepClock, run_steps

DISTINCT_BATCHES = 2  # batches per (kind, size), cycled through by the steps


def start(spec: dict, rank: int) -> "BenchWorker":
    """A pool rank's setup: join the pool's group as dist.mp=spec["mp"] with one thread."""
    cfg = build_config(base=spec["config"], overrides=[f"dist.mp={spec['mp']}", "dist.dp=0", "dist.threads=1",
                                                       f"dist.device={spec['device']}"])
    return BenchWorker(cfg, setup(cfg.dist))


class BenchWorker:
    """One rank's trainers, batches and FLOP counts, by trainer kind (see modes.Mode.kind)."""

    def __init__(self, cfg, layout: Layout):
        self.cfg, self.layout = cfg, layout
        self.trainers, self.batches, self.layouts = {}, {}, {}
        self.bundle, self.profiler, self.scratch = None, None, None

    def config(self, kind: str, batch: int):
        """The config of a kind at a global batch: its dist.mp, amp and per-replica batch."""
        mp, dp, amp = kind_shape(kind)
        cfg = copy.deepcopy(self.cfg)
        cfg.dist.mp, cfg.dist.amp = mp, amp or cfg.dist.amp
        cfg.train.batch_size = batch // dp
        return cfg.validate()

    def layout_for(self, kind: str) -> Layout:
        """The pool's own layout, or (DDP in the pair's pool) the same ranks as replicas of the whole network."""
        mp = self.config(kind, 2).dist.mp
        if mp == self.layout.dims.mp:
            return self.layout
        if mp not in self.layouts:
            base = self.layout
            dims = ParallelDims(base.dims.world_size, mp, base.dims.local_world_size)
            layout = Layout(dims, base.rank, base.local_rank, base.device, base.backend, store=base.store)
            layout.mesh = dims.build_mesh(base.device.type)
            layout.mp_group, layout.dp_group = layout.mesh.get_group("mp"), layout.mesh.get_group("dp")
            self.layouts[mp] = layout
        return self.layouts[mp]

    def trainer(self, kind: str, batch: int) -> Trainer:
        if kind not in self.trainers:
            cfg, layout = self.config(kind, batch), self.layout_for(kind)
            if self.bundle is None:
                self.bundle = build_data(cfg)
            link = NullLink(layout.column, cfg.dist.startup_timeout_s) if kind.startswith("null") else None
            trainer = Trainer(cfg, layout, link=link)
            trainer.attach_data(self.bundle)
            self.trainers[kind] = trainer
        return self.trainers[kind]

    def batches_for(self, kind: str, batch: int) -> list:
        """The first batches of epoch 0 at this global batch, as the loaders deliver them."""
        if (kind, batch) not in self.batches:
            cfg, layout = self.config(kind, batch), self.layout_for(kind)
            with Loaders(self.bundle, cfg, layout.dp_rank, layout.dims.dp, layout.column, layout.dims.mp) as loaders:
                self.batches[kind, batch] = list(itertools.islice(loaders.train(0), DISTINCT_BATCHES))
        return self.batches[kind, batch]


# ------------------------------------------------------------------ tasks (fn(worker, *args))


def prepare(worker: BenchWorker, kind: str, batch: int) -> dict:
    """Build the kind's trainer and batches; FLOPs of one (untimed) training step on this rank."""
    trainer = worker.trainer(kind, batch)
    batches = worker.batches_for(kind, batch)
    with flop_counter() as counter:
        run_steps(trainer, batches[:1], 1)
    return {"flops": counter.get_total_flops()}


def _attach_profiler(worker: BenchWorker, trainer) -> None:
    if worker.scratch is None:  # the profiler's run folder: it writes nothing there unless asked to report
        worker.scratch = tempfile.TemporaryDirectory(prefix="alexnet-bench-")
    profiler = Profiler(trainer.cfg, trainer.layout)
    with contextlib.redirect_stdout(io.StringIO()):  # its start-up line, once per measurement
        profiler.attach(trainer.model, trainer.link, trainer.optimizer, worker.scratch.name)
    trainer.callbacks.callbacks.append(profiler)
    worker.profiler = profiler


def _detach_profiler(worker: BenchWorker, trainer) -> None:
    if worker.profiler is not None:
        worker.profiler.detach()
        trainer.callbacks.callbacks.remove(worker.profiler)
        worker.profiler = None


def warm(worker: BenchWorker, kind: str, batch: int, threads: int, profiled: bool, steps: int) -> dict:
    """Set the mode up (threads, profiler) and run its untimed steps; `timed` follows."""
    trainer = worker.trainer(kind, batch)
    torch.set_num_threads(threads)
    if profiled:
        _attach_profiler(worker, trainer)
    return run_steps(trainer, worker.batches_for(kind, batch), steps)


def _wait_until(start_at: float) -> None:
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)


def timed(worker: BenchWorker, kind: str, batch: int, steps: int, start_at: float | None) -> dict:
    """Seconds per step of `steps` steps, barrier to barrier (or from the wall-clock `start_at`, for
    pools that run side by side), with the link's bytes and host seconds per step and crossing."""
    trainer = worker.trainer(kind, batch)
    synced = start_at is None and dist.get_world_size() > 1
    try:
        if start_at is not None:
            _wait_until(start_at)
        elif synced:
            dist.barrier()
        link = trainer.link
        if link is not None:
            link.stats.reset()
        clock = StepClock(worker.layout.device)
        clock.start()
        outcome = run_steps(trainer, worker.batches_for(kind, batch), steps)
        if synced:
            dist.barrier()
        seconds = clock.stop()
    finally:
        _detach_profiler(worker, trainer)
        torch.set_num_threads(1)
    comm = link.stats.as_dict() if link is not None else {}
    per_step = {k: {"sent": v["sent"] / steps, "recv": v["recv"] / steps, "seconds": v["seconds"] / steps}
                for k, v in comm.items()}
    return {"seconds": seconds / steps, "comm": per_step, "nonfinite": outcome["nonfinite"],
            "column": trainer.layout.column}


def peak(worker: BenchWorker, sizes: dict, seconds: float, dtype: str, threads: int, start_at: float) -> dict:
    """{"mm", "conv"} FLOP/s of this rank's peak kernels, started at the wall-clock `start_at`."""
    torch.set_num_threads(threads)
    try:
        _wait_until(start_at)
        return peak_rates(sizes, seconds, dtype, worker.layout.device)
    finally:
        torch.set_num_threads(1)
