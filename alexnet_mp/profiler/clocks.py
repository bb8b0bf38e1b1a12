"""The clocks a step's marks are taken on: the host's, or CUDA events where kernels run asynchronously."""
from __future__ import annotations

import time

import torch


class HostClock:
    """perf_counter marks: right on CPUs, where every op has finished when it returns."""

    def now(self):
        return time.perf_counter()

    def settle(self) -> None:
        pass

    def seconds(self, start, mark) -> float:
        return mark - start


class CudaClock:
    """CUDA events on the current stream: marks land between kernels, not at host launch times."""

    def now(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def settle(self) -> None:
        torch.cuda.synchronize()  # once, at the end: steps never wait for their marks

    def seconds(self, start, mark) -> float:
        return start.elapsed_time(mark) / 1e3


def clock_for(device: torch.device) -> HostClock | CudaClock:
    """The clock that times work on `device`."""
    return CudaClock() if device.type == "cuda" else HostClock()
