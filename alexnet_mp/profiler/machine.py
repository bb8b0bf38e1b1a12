"""The machine a rank runs on, its software versions, and the process's memory peak."""
from __future__ import annotations

import os
import platform
import socket
from pathlib import Path

import torch


def proc_status_bytes(field: str) -> int | None:
    """A size field of /proc/self/status (VmRSS, VmHWM, ...) in bytes; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def resident_peak_bytes() -> int:
    """The peak resident set of this process (since the last `reset_resident_peak`)."""
    peak = proc_status_bytes("VmHWM")
    if peak is None:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return peak


def reset_resident_peak() -> bool:
    """Set VmHWM to the current resident set (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def machine_info(device: torch.device) -> dict:
    """Host name, CPU model, cores, memory and (on CUDA) the GPU's name."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = None
    try:
        mem = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        pass
    return {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def versions(backend: str, device: torch.device) -> dict:
    """torch, Python, the process-group backend, the platform, and CUDA and NCCL where used."""
    out = {"torch": torch.__version__, "python": platform.python_version(), "backend": backend,
           "platform": platform.platform()}
    if device.type == "cuda":
        out["cuda"] = torch.version.cuda
        if backend == "nccl":
            out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return out


class MemoryPeak:
    """The peak memory of the first training steps: the CUDA allocator's, or the resident set on CPUs."""

    def __init__(self, device: torch.device, steps: int):
        self.device = device
        scope = f"the first {steps} training steps"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.report = {"kind": "cuda allocator", "at_start_bytes": torch.cuda.memory_allocated(device),
                           "peak_bytes": 0, "scope": scope}
        else:
            reset = reset_resident_peak()
            self.report = {"kind": "resident set (VmHWM)", "at_start_bytes": proc_status_bytes("VmRSS"),
                           "peak_bytes": 0,
                           "scope": scope if reset else "the process's lifetime (VmHWM could not be reset)"}

    def read(self) -> None:
        """Fold the peak so far into the report."""
        peak = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                else resident_peak_bytes())
        self.report["peak_bytes"] = max(self.report["peak_bytes"], peak)
