"""Profiler: where each training step's time, bytes and memory go, per rank.

Turned on with ``profile.enabled=true`` (and ``profile.trace=true`` for a
torch.profiler trace). One profiler lives for the whole run, as a context
manager around the training (the torchtitan ``profiling.py`` pattern), and
hooks in through the trainer's `Callback` seam and the link's `LinkObserver`
seam::

    with profiling(cfg, layout) as prof:   # a NullProfiler when profiling is off
        ...the trainer runs with prof among its callbacks...
    # rank 0 has gathered every rank's steps and written the report

Per step it records, on one clock (host clock on CPUs, CUDA events on GPUs,
so that asynchronous kernels are timed where they run), the data wait, each
layer's forward and backward, the loss, the wait in each exchange between the
columns, the optimizer step, the exposed part of the data-parallel gradient
all-reduce (with replicas) and the rest ("other"); see `events.py`. From
both ranks' waits at a crossing it splits the wait into the transfer and the
wait for the peer. Bytes per exchange come from ``PeerLink.stats`` and are
checked against ``summary.analytic_bytes`` on every step. Memory: the CUDA
allocator's peak, or the peak resident set on CPUs, over the first training
steps. NVML is sampled in a background thread on GPUs. With ``dist.mp=1``
(the whole network per process) there are no exchanges, and no crossing rows.

Rank 0 writes ``profile.json`` and ``profile.png`` (one step's timeline,
every rank) into the run directory and prints the table. Render them again with

    python -m alexnet_mp.profiler RUN_DIR

Modules: clocks, events (a step's marks), allreduce (DDP hook), checks
(bytes against the analytic counts), nvml, machine (host, versions, memory),
trace, recorder (the Profiler), summary (records to figures), report (table
and files), plots (timeline), cli.
"""
from .allreduce import AllReduceMeter, allreduce_spans
from .checks import ByteCheck, allreduce_analytic_bytes
from .cli import main
from .clocks import CudaClock, HostClock, clock_for
from .events import StepEvents
from .machine import MemoryPeak, machine_info, proc_status_bytes, reset_resident_peak, resident_peak_bytes, versions
from .nvml import NvmlSampler, open_nvml
from .plots import plot_timeline
from .recorder import NullProfiler, Profiler, batch_size, profiling
from .report import PICTURE_FILE, PROFILE_FILE, render_table, write_report
from .summary import FORMAT, build_profile, part_durations, stat, sum_shares, summarise_rank

__all__ = [
    "AllReduceMeter", "allreduce_spans", "ByteCheck", "allreduce_analytic_bytes", "main", "CudaClock",
    "HostClock", "clock_for", "StepEvents", "MemoryPeak", "machine_info", "proc_status_bytes",
    "reset_resident_peak", "resident_peak_bytes", "versions", "NvmlSampler", "open_nvml", "plot_timeline",
    "NullProfiler", "Profiler", "batch_size", "profiling", "PICTURE_FILE", "PROFILE_FILE", "render_table",
    "write_report", "FORMAT", "build_profile", "part_durations", "stat", "sum_shares", "summarise_rank",
]
