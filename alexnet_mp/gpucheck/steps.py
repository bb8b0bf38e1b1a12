"""The trainer's own step run outside `Trainer.fit`: batches put on the device beforehand, each step
settled one step late as the training loop does, optionally under CUDA's sync-debug mode."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..callbacks import Callback


@contextmanager
def sync_debug(mode: str | None):
    """torch.cuda.set_sync_debug_mode(mode) inside the block (None: leave it as it is)."""
    if mode is None:
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


class Losses(Callback):
    """The mean loss of every settled step."""

    def __init__(self):
        self.values = []

    def on_step_settled(self, trainer, result):
        self.values.append(result.loss_sum / result.images if result.finite else float("nan"))


def device_batches(trainer, count: int) -> list:
    """Up to `count` batches of epoch 0, already on the trainer's device."""
    run = trainer.loaders.train(0)
    return [trainer.inputs.prefetch(b) for _, b in zip(range(count), run)]


def guarded_steps(trainer, batches: list, watch_from: int) -> int:
    """One `train_step` per batch, settled one step late as the training loop does; from step
    `watch_from` on (CUDA only) each step runs under sync-debug mode "error". Steps watched."""
    watched = 0
    for i, batch in enumerate(batches):
        watch = trainer.device.type == "cuda" and i >= watch_from
        with sync_debug("error" if watch else None):
            trainer.pending.append(trainer.train_step(batch))
        watched += watch
        trainer.settle(keep=1)
    trainer.settle()
    return watched
