"""The machine under the benchmark: its name, its bf16 support, its load, and a calibration rate.

The calibration rate (a one-thread matrix multiply in the coordinating process, while the
workers are idle) is taken before and after the measurements: when it drifts by more than
stats.DRIFT_LIMIT the machine's speed changed under the run, and the run is inconclusive.
The load is the load average before and after, and the CPU time that other programs took
while the modes were measured (the machine's busy time less this benchmark's own processes').
"""
from __future__ import annotations

import os
import re
import statistics
import time
from pathlib import Path

import torch

from ..profiler import machine_info

CALIBRATION_N = 384  # side of the calibration's matrices: small enough to stay in cache


def calibration_rate(seconds: float, bursts: int = 9) -> float:
    """FLOP/s of a fixed one-thread fp32 matrix multiply: the median of `bursts` bursts over about
    `seconds`, so that a momentary dip (a virtual machine's neighbours) does not pass for drift."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        a, b = (torch.randn(CALIBRATION_N, CALIBRATION_N, generator=g) for _ in range(2))
        torch.mm(a, b)
        rates = []
        for _ in range(bursts):
            count, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds / bursts or count == 0:
                torch.mm(a, b)
                count += 1
            rates.append(2 * CALIBRATION_N ** 3 * count / elapsed)
        return statistics.median(rates)
    finally:
        torch.set_num_threads(threads)


def machine_name(gpu: bool) -> str:
    """A file-name-safe name of the CPU (with its core count) or of the GPU (with their count)."""
    info = machine_info(torch.device("cuda", 0) if gpu else torch.device("cpu"))
    name = f"{info['gpu']}x{torch.cuda.device_count()}" if gpu else f"{info['cpu']}-{info['cores']}c"
    name = re.sub(r"\((r|tm)\)|\bcpu\b|@.*?ghz", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def bf16_support(flags: set[str] | None = None) -> tuple[bool, str]:
    """(whether this CPU has bf16 matrix instructions, a sentence saying which or why not)."""
    flags = cpu_flags() if flags is None else flags
    units = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if units:
        return True, f"bf16 rows run: this CPU has {' and '.join(units)}"
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return False, (f"bf16 rows not run: this CPU ({vector}) has no bf16 matrix instructions (no avx512_bf16 "
                   f"or amx_bf16 in /proc/cpuinfo), so bf16 would be emulated and only slower than fp32")


def _busy_seconds() -> float | None:
    """CPU seconds the whole machine has been busy (all cores; idle, iowait and steal left out)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _process_seconds(pid: int) -> float:
    """CPU seconds of a process and its finished children (0 when it is gone)."""
    try:
        parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in parts[11:15]) / os.sysconf("SC_CLK_TCK")


class LoadMeter:
    """Other programs' CPU use over a stretch of time, in cores: the machine's busy time less that of
    this process and `pids` (the worker pools), over the elapsed time."""

    def __init__(self, pids: list[int]):
        self.pids = [os.getpid(), *pids]
        self.origin = (time.perf_counter(), _busy_seconds(), self._ours())

    def _ours(self) -> float:
        return sum(_process_seconds(p) for p in self.pids)

    def foreign_cores(self) -> float | None:
        t0, busy0, ours0 = self.origin
        busy = _busy_seconds()
        if busy is None or busy0 is None:
            return None
        return max(0.0, (busy - busy0) - (self._ours() - ours0)) / (time.perf_counter() - t0)
