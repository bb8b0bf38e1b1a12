"""Batch plans and one persistent torch DataLoader per process.

Training batches: the epoch's permutation is drawn from (train.seed, epoch); global batch i is the
i-th chunk of dp_size * batch_size indices, replica r takes its contiguous slice, and the last
partial global batch is dropped. Evaluation: replica r takes samples r, r + dp_size, ... in file
order, the last batch partial.

Loaders keeps ONE DataLoader for the life of the process. Its sampler is a plan that train() and
eval() switch; with data.num_workers > 0 the workers persist across every epoch and evaluation, so
the pool starts once. One iteration runs at a time: starting another (a new epoch, an evaluation)
ends the previous one, which then raises if it is iterated further.
"""
from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401  (its exit handler must be registered before ours: see _LIVE)
import os
import signal
import weakref
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..config import Config
from .augment import Augment
from .batch import Batch, BatchMaker, Request
from .common import SALT_SHUFFLE, DataError, rng


def _check_replica(dp_rank: int, dp_size: int) -> None:
    if not (dp_size >= 1 and 0 <= dp_rank < dp_size):
        raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size})")


def steps_per_epoch(bundle, cfg: Config, dp_size: int = 1) -> int:
    """Training batches per epoch: full global batches of dp_size * train.batch_size."""
    return len(bundle.train) // (dp_size * cfg.train.batch_size)


def train_plan(n: int, cfg: Config, epoch: int, start_batch: int, dp_rank: int, dp_size: int) -> list[Request]:
    """The requests of epoch `epoch` from batch `start_batch` on, for one replica."""
    batch = cfg.train.batch_size
    steps = n // (dp_size * batch)
    if steps == 0:
        raise DataError(f"the training set has {n} images, fewer than one batch of {dp_size * batch}; "
                        f"lower train.batch_size or add training images")
    if not 0 <= start_batch <= steps:
        raise ValueError(f"start_batch={start_batch} is outside epoch {epoch}'s {steps} batches")
    perm = rng(cfg.train.seed, epoch, SALT_SHUFFLE).permutation(n)
    order = perm[:steps * dp_size * batch].reshape(steps, dp_size, batch)[start_batch:, dp_rank]
    return [Request("train", "train", epoch, idx) for idx in order]


def eval_plan(n: int, batch: int, ten_crop: bool, dp_rank: int, dp_size: int) -> list[Request]:
    """Evaluation requests: this replica's samples in file order, the last batch partial."""
    order = np.arange(dp_rank, n, dp_size)
    kind = "ten" if ten_crop else "centre"
    return [Request("val", kind, 0, order[s:s + batch]) for s in range(0, len(order), batch)]


class _Plan(Sampler):
    """The DataLoader's sampler: yields the current plan's requests; Loaders switches the plan."""

    def __init__(self):
        self.requests: list[Request] = []

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[Request]:
        return iter(list(self.requests))


def _as_is(batch: Batch) -> Batch:
    return batch  # each item is already a whole batch


def _own_process_group(worker_id: int) -> None:
    # A stop signal asks the trainer to finish its step and checkpoint, so its loader's workers
    # must outlive it, whoever sends it: torchrun (the training process's group), Ctrl-C (the
    # terminal's group) or a scheduler that signals every process of the job. In a group of
    # their own and ignoring the stop signals they do; they still end with the loader's
    # shutdown (a message, then SIGKILL if stuck: see Loaders.close) and when their parent dies.
    os.setpgrp()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _one_line(e: DataError) -> DataError:
    # torch re-raises a worker's error with its traceback in the message; keep the last line.
    lines = str(e).strip().splitlines()
    return e if len(lines) <= 1 else DataError(lines[-1].split("DataError: ", 1)[-1])


class _Run:
    """One pass over a plan: len() is the number of batches; iterating it runs the shared loader."""

    def __init__(self, loaders: "Loaders", requests: list[Request]):
        self.loaders, self.requests = loaders, requests

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[Batch]:
        generation = self.loaders._start(self.requests)
        batches = iter(self.loaders._loader)
        while True:
            # Checked before pulling: the loader's iterator is shared with any newer pass.
            if self.loaders._generation != generation:
                raise RuntimeError("this batch iteration was ended by a newer train() or eval() "
                                   "iteration; iterate one at a time")
            try:
                batch = next(batches)
            except StopIteration:
                return
            except DataError as e:
                raise _one_line(e) from None
            yield batch


# Every Loaders still open at interpreter exit is closed then, before multiprocessing's own exit
# handler (registered earlier, so run later) would SIGTERM its workers, which ignore it, and wait
# for them forever: a crash whose traceback keeps an iteration alive must still let the process end.
_LIVE: "weakref.WeakSet[Loaders]" = weakref.WeakSet()


@atexit.register
def _close_live_loaders() -> None:
    for loaders in list(_LIVE):
        loaders.close()


class Loaders:
    """Training and evaluation batches for one process: replica dp_rank of dp_size, column of columns.

    With data.decode=device, Batch.images holds the JPEG bytes of the own rows (prepared JPEG sets
    only); DeviceDecoder turns them into crops on the device.
    """

    def __init__(self, bundle, cfg: Config, dp_rank: int = 0, dp_size: int = 1, column: int = 0, columns: int = 1):
        _check_replica(dp_rank, dp_size)
        self.bundle, self.cfg = bundle, cfg
        self.dp_rank, self.dp_size = dp_rank, dp_size
        raw = cfg.data.decode == "device"
        if raw and not getattr(bundle.train, "has_records", False):
            raise DataError("data.decode=device needs a prepared JPEG set (data.dataset=prepared, made by "
                            "python -m alexnet_mp.prepare --format jpeg); set data.decode=cpu")
        d, stats = cfg.data, bundle.stats
        augment = Augment(side=bundle.side, crop=cfg.model.crop_size, seed=cfg.train.seed, flip=d.flip,
                          lighting=d.pca_lighting, random_crop=d.random_crop,
                          eigval=np.asarray(stats["eigval"], np.float64),
                          eigvec=np.asarray(stats["eigvec"], np.float64))
        maker = BatchMaker({"train": bundle.train, "val": bundle.val}, augment, column, columns, raw)
        self._plan, self._generation = _Plan(), 0
        _LIVE.add(self)
        workers = d.num_workers
        self._loader = DataLoader(
            maker, batch_size=None, sampler=self._plan, collate_fn=_as_is, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
            worker_init_fn=_own_process_group if workers > 0 else None,
            # Its own generator: otherwise the DataLoader draws its worker seed from the global torch
            # RNG, and the trainer's dropout masks would depend on when loaders were made.
            generator=torch.Generator())

    def _start(self, requests: list[Request]) -> int:
        self._plan.requests = requests
        self._generation += 1
        return self._generation

    def train(self, epoch: int, start_batch: int = 0) -> _Run:
        """Shuffled, augmented batches of epoch `epoch` from batch `start_batch` on; len() = batches left."""
        return _Run(self, train_plan(len(self.bundle.train), self.cfg, epoch, start_batch,
                                     self.dp_rank, self.dp_size))

    def eval(self, ten_crop: bool = False) -> _Run:
        """Evaluation batches (centre crop, or ten crops per image) in file order, the last one partial."""
        return _Run(self, eval_plan(len(self.bundle.val), self.cfg.train.batch_size, ten_crop,
                                    self.dp_rank, self.dp_size))

    def worker_pids(self) -> list[int]:
        """Process ids of the running loader workers (empty before the first pass or without workers)."""
        it = self._loader._iterator
        return [w.pid for w in it._workers] if it is not None and hasattr(it, "_workers") else []

    def close(self) -> None:
        """Stop the workers (a later pass would start new ones)."""
        it, self._loader._iterator = self._loader._iterator, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            workers = list(it._workers)
            it._shutdown_workers()
            # torch ends a worker that did not stop with SIGTERM, which ours ignore: kill it.
            for w in workers:
                if w.is_alive():
                    w.kill()
                    w.join()
        self._generation += 1

    def __enter__(self) -> "Loaders":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
