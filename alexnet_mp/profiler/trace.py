"""The torch.profiler trace of a few steps (profile.trace), written per rank as a Chrome trace."""
from __future__ import annotations

from pathlib import Path

import torch


def traced_steps(p) -> range:
    """The step indices (from 0) the trace covers under ProfileConfig `p`; left out of the summary."""
    if not p.trace:
        return range(0)
    start = p.skip_steps + p.trace_wait
    return range(start, start + p.trace_warmup + p.trace_active)


class TraceWindow:
    """A running torch.profiler with the profile.* schedule; `step` after each step, `stop` at the end."""

    def __init__(self, p, device: torch.device, path: Path):
        self.path, self.written = path, False
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(skip_first=p.skip_steps, wait=p.trace_wait, warmup=p.trace_warmup,
                                             active=p.trace_active, repeat=1),
            on_trace_ready=self._write)
        self.prof.start()

    def _write(self, prof) -> None:
        prof.export_chrome_trace(str(self.path))
        self.written = True

    def step(self) -> None:
        self.prof.step()

    def stop(self) -> None:
        """Stop tracing (this writes the trace if the run ended inside the window)."""
        self.prof.stop()
