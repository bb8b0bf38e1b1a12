"""Every rank's verdict on a step, decided on the device and read by the host one step late.

After backward each rank checks its loss and gradients for NaN/inf and adds whether it was
asked to stop (SIGTERM/SIGINT) and whether it failed outside the step (a write of rank 0's
per-step record); one all-reduce (MIN) gives every rank the same three flags.
The optimiser skips a non-finite update on the device (`optimizer.found_inf`, as GradScaler
does), so nothing in the step waits for the host to read a flag. With run.nonfinite=error
the skip is sticky: once a step is non-finite no later update is applied, and the host
raises when it reads the flag, so the weights are those from before the bad step.

The flags, the loss and the number of correct answers travel to the host in one small
copy, pinned and asynchronous on CUDA; `PendingStep.settle` reads it after the next step
has been queued, when the device has long finished it.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .. import resilience

RING = 4  # pinned host buffers in rotation (a step's copy is read one step later)


@dataclass
class StepResult:
    """What the host learns of a step once it is settled."""

    step: int  # 1-based training step
    epoch: int  # 0-based
    batch: int  # 0-based batch of the epoch
    images: int
    finite: bool  # every rank's loss and gradients were finite (else the update was skipped)
    stop: bool  # some rank was asked to stop
    failed: bool  # some rank failed outside the step and every rank must stop with its error
    loss_sum: float  # loss x images (0 when not finite)
    correct: int
    data_wait_s: float  # host seconds waiting for this step's batch
    seconds: float  # host seconds from the previous step's end to this one's
    lr: float


class PendingStep:
    """A step whose verdict and figures are still on their way to the host."""

    def __init__(self, values: torch.Tensor, event, meta: dict):
        self.values, self.event, self.meta = values, event, meta

    def settle(self) -> StepResult:
        if self.event is not None:
            self.event.synchronize()  # this step's copy only, not the queue behind it
        finite, carry_on, healthy, loss_sum, correct = self.values.tolist()
        return StepResult(finite=finite > 0, stop=carry_on < 1, failed=healthy < 1,
                          loss_sum=loss_sum if finite > 0 else 0.0, correct=int(correct) if finite > 0 else 0,
                          **self.meta)


class StepGuard:
    """The per-step agreement on one device: flags in, skip decision out, figures to the host."""

    def __init__(self, device: torch.device, sticky: bool, group=None):
        self.device, self.sticky, self.group = device, sticky, group
        self.bad = torch.zeros((), dtype=torch.float32, device=device)  # found_inf for the optimiser
        self.on_cuda = device.type == "cuda"
        self.ring = [torch.empty(5, dtype=torch.float64, pin_memory=True) for _ in range(RING)] if self.on_cuda else []
        self.turn = 0

    def agree(self, loss: torch.Tensor, params, stop_requested: bool, failed: bool = False) -> torch.Tensor:
        """(finite everywhere, nobody stopping, nobody failed) as a float tensor on the device, the same on
        every rank."""
        checks = [torch.isfinite(loss).all(), *(torch.isfinite(p.grad).all() for p in params if p.grad is not None)]
        # torch.full fills on the device; torch.tensor(...) would copy from the host and wait.
        flags = torch.stack([torch.stack(checks).all(), torch.full((), not stop_requested, device=self.device),
                             torch.full((), not failed, device=self.device)]).float()
        with resilience.guarded("per-step agreement (all-reduce of the finite, stop and failure flags)", self.group):
            work = dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=self.group, async_op=True)
            if self.on_cuda:
                work.wait()  # stream-ordered on NCCL: the host goes on; the watchdog enforces the timeout
            else:
                work.wait(timeout=timedelta(seconds=resilience.current_timeout()))
        return flags

    def skip_flag(self, flags: torch.Tensor) -> torch.Tensor:
        """1.0 where the optimiser must not update (the `found_inf` GradScaler would pass)."""
        bad = 1.0 - flags[0]
        if self.sticky:
            self.bad = torch.maximum(self.bad, bad)
            return self.bad
        return bad.reshape(())

    def pending(self, flags, loss, correct, meta: dict) -> PendingStep:
        """The step's flags, loss x images and correct answers, on their way to the host."""
        values = torch.cat([flags.double(), (loss.detach().double() * meta["images"]).reshape(1),
                            correct.double().reshape(1)])
        if not self.on_cuda:
            return PendingStep(values, None, meta)
        host = self.ring[self.turn]
        self.turn = (self.turn + 1) % RING
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return PendingStep(host, event, meta)
