"""Training figures on the host, from settled steps: the epoch's sums and the per-step record.

Nothing here reads the device: the figures arrive in `StepResult`s (guard.py), one step late.
"""
from __future__ import annotations

import time
from pathlib import Path

from .guard import StepResult


class EpochMeter:
    """Loss, correct answers, images and seconds of the epoch so far (this replica's share)."""

    def __init__(self, partial: dict | None = None):
        self.loss, self.correct, self.seen, self.seconds = 0.0, 0, 0, 0.0
        if partial:  # a mid-epoch checkpoint's sums
            self.loss, self.correct = partial["loss"], partial["correct"]
            self.seen, self.seconds = partial["seen"], partial["seconds"]
        self.started = time.perf_counter()

    def add(self, result: StepResult) -> None:
        if result.finite:  # a skipped step's figures are left out
            self.loss += result.loss_sum
            self.correct += result.correct
            self.seen += result.images

    def elapsed(self) -> float:
        return self.seconds + time.perf_counter() - self.started

    def sums(self) -> dict:
        return {"loss": self.loss, "correct": self.correct, "seen": self.seen, "seconds": self.elapsed()}


class StepLog:
    """Every `every` steps, one record of the steps since the last: steps.jsonl, a log line,
    TensorBoard scalars. `write(records)` persists them (rank 0 only)."""

    KEYS = ("step", "epoch", "loss", "top1", "lr", "images_per_sec", "data_wait_share", "step_time_s")

    def __init__(self, every: int, replicas: int, write=None, tensorboard=None):
        self.every, self.replicas, self.write, self.tensorboard = every, replicas, write, tensorboard
        self._reset()

    def _reset(self) -> None:
        self.loss, self.correct, self.images, self.steps = 0.0, 0, 0, 0
        self.seconds, self.waited = 0.0, 0.0

    def add(self, result: StepResult) -> dict | None:
        """Take a settled step; the window's record when it closes one, else None."""
        self.steps += 1
        self.seconds += result.seconds
        self.waited += result.data_wait_s
        if result.finite:
            self.loss += result.loss_sum
            self.correct += result.correct
            self.images += result.images
        if result.step % self.every:
            return None
        record = {"step": result.step, "epoch": result.epoch + 1,
                  "loss": self.loss / self.images if self.images else None,
                  "top1": self.correct / self.images if self.images else None, "lr": result.lr,
                  "images_per_sec": self.images * self.replicas / self.seconds if self.seconds > 0 else None,
                  "data_wait_share": self.waited / self.seconds if self.seconds > 0 else None,
                  "step_time_s": self.seconds / self.steps}
        self._reset()
        if self.write is not None:
            self.write([record])
        if self.tensorboard is not None:
            for key in ("loss", "top1", "lr", "images_per_sec", "data_wait_share", "step_time_s"):
                if record[key] is not None:
                    self.tensorboard.add_scalar(f"train/{key}", record[key], record["step"])
        return record


def open_tensorboard(run_path: Path, enabled: bool):
    """A SummaryWriter into RUN/tensorboard, or None; says why when asked for and unavailable."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("warning: run.tensorboard=true but the tensorboard package is not installed "
              "(pip install -e '.[tensorboard]'); continuing without event files")
        return None
    return SummaryWriter(str(Path(run_path) / "tensorboard"))
