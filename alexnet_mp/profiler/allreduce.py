"""The data-parallel gradient all-reduce, counted and timed through DDP's communication hook."""
from __future__ import annotations

from torch.distributed.algorithms.ddp_comm_hooks import default_hooks


class AllReduceMeter:
    """Counts and times the data-parallel gradient all-reduce of a DistributedDataParallel model.

    Registered as the model's DDP communication hook, it runs PyTorch's own
    ``allreduce_hook`` (divide by the replicas, all-reduce: what DDP does with
    no hook) and notes, per bucket, when DDP handed it over (its gradients are
    all computed), when its result was ready, and its bytes. On CUDA both marks
    are stream-ordered events: the ready callback runs on streams that wait for
    the all-reduce. DDP takes one hook, registered before the first backward,
    and never gives it back: `stop` turns the meter into the plain all-reduce.
    """

    def __init__(self, ddp, group, clock):
        self.clock = clock
        self.recording = True
        self.buckets = []  # [launch mark, ready mark, bytes] since the last take()
        ddp.register_comm_hook(group, self._hook)

    def _hook(self, group, bucket):
        if not self.recording:
            return default_hooks.allreduce_hook(group, bucket)
        buffer = bucket.buffer()
        entry = [self.clock.now(), None, buffer.numel() * buffer.element_size()]
        self.buckets.append(entry)

        def ready(fut):
            entry[1] = self.clock.now()
            return fut.value()
        return default_hooks.allreduce_hook(group, bucket).then(ready)

    def take(self) -> list:
        """The buckets since the last call (after backward, every one has its ready mark)."""
        out, self.buckets = self.buckets, []
        return out

    def stop(self) -> None:
        """Record nothing more: the hook stays (DDP cannot drop it) but only all-reduces."""
        self.recording, self.buckets = False, []


def allreduce_spans(buckets: list, clock, start) -> dict:
    """One step's buckets in seconds since `start`: the span in flight and the exposed wait.

    Exposed: from the last bucket's launch (by then every gradient exists, so
    backward has nothing left to hide it behind) to the last result.
    """
    launches = [clock.seconds(start, b[0]) for b in buckets]
    readies = [clock.seconds(start, b[1]) for b in buckets]
    return {"buckets": len(buckets), "bytes": sum(b[2] for b in buckets), "first_launch": min(launches),
            "last_launch": max(launches), "last_ready": max(readies)}
