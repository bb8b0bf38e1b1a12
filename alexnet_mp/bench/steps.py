"""Timing the project's training step: the loop the trainer runs, between two clock marks.

`run_steps` drives `Trainer.train_step` as `Trainer.run_epoch` does: the next batch's copy to
the device is issued before the current step, the callbacks see the same seams, and each
step's outcome is read one step late, so nothing inside the timed steps waits for the device.
`StepClock` reads the host clock on a CPU and CUDA events on a GPU.
"""
from __future__ import annotations

import itertools
import time
from collections import deque

import torch


class StepClock:
    """start() and stop() -> seconds between them: the host clock, or CUDA events on the current
    stream (the device's own time; the host only waits for the end mark in stop())."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.began = None

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()  # nothing queued from before counts
            self.began = torch.cuda.Event(enable_timing=True)
            self.began.record()
        else:
            self.began = time.perf_counter()

    def stop(self) -> float:
        if not self.cuda:
            return time.perf_counter() - self.began
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return self.began.elapsed_time(end) / 1e3


def host_bytes(batch) -> dict:
    """{"images", "metadata"}: bytes of the host tensors the input pipeline copies to the device for a batch."""
    images = batch.images
    image_bytes = (sum(t.numel() * t.element_size() for t in images) if isinstance(images, list)
                   else images.numel() * images.element_size())
    meta = sum(t.numel() * t.element_size() for t in (batch.labels, batch.offsets, batch.flips, batch.light))
    return {"images": image_bytes, "metadata": meta}


def run_steps(trainer, batches, count: int) -> dict:
    """`count` training steps over `batches` (cycled); {"steps", "nonfinite"} once every step settled."""
    if count <= 0:
        return {"steps": 0, "nonfinite": 0}
    source = itertools.cycle(batches)
    callbacks, pending, nonfinite = trainer.callbacks, deque(), 0
    callbacks.on_batch_wait(trainer)
    ready = trainer.inputs.prefetch(next(source))
    for i in range(count):
        batch = ready
        if i + 1 < count:  # as run_epoch: the next batch's copy is issued before this step
            callbacks.on_batch_wait(trainer)
            ready = trainer.inputs.prefetch(next(source))
        callbacks.on_step_begin(trainer, batch)
        pending.append(trainer.train_step(batch))
        callbacks.on_step_end(trainer)
        while len(pending) > 1:  # the previous step: long done on the device
            nonfinite += not pending.popleft().settle().finite
    while pending:
        nonfinite += not pending.popleft().settle().finite
    return {"steps": count, "nonfinite": nonfinite}
