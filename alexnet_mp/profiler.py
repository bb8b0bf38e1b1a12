"""Profiler: where each training step's time, bytes and memory go, per rank.

Turned on with ``profile.enabled=true`` (and ``profile.trace=true`` for a
torch.profiler trace). One profiler lives for the whole run, as a context
manager around the training (the torchtitan ``profiling.py`` pattern)::

    with profiling(cfg, layout) as prof:               # NullProfiler when disabled
        prof.attach(model, link, optimizer, run_path)  # hooks in (ddp=net with replicas); the trace starts
        for images, labels in prof.batches(loader):    # times the data wait; opens a step
            ...forward, backward, optimizer.step()...
            prof.step_end()

Per step it records, on one clock (host clock on CPUs, CUDA events on GPUs,
so that asynchronous kernels are timed where they run):

* data: the wait for the next batch;
* forward / backward per layer: each layer's stage with the ReLU, LRN,
  pooling and dropout that follow it. Forward: from the layer's forward
  pre-hook to the next mark. Backward: from the previous mark (the previous
  layer's last gradient, or the end of an exchange) to the moment the layer's
  last parameter gradient is accumulated;
* comm: the time blocked in each crossing's exchange (``conv3.forward``, ...);
* allreduce (with replicas, ``prof.attach(..., ddp=net)``): the data-parallel
  gradient all-reduce, through a DDP communication hook (``AllReduceMeter``):
  its bytes, buckets, the span in flight behind backward, and the exposed
  wait after the last gradient;
* loss: from the end of the forward to the first gradient of the logits;
* optimizer: ``optimizer.step()`` (via the optimizer's step hooks);
* other: the rest of the step (batch copy, finiteness check, bookkeeping).

From both ranks' waits at a crossing it splits the wait into the transfer
(the shorter of the pair's two waits: the later arrival waits only for the
data to move) and the wait for the peer (own wait minus the transfer). Bytes
per crossing come from ``PeerLink.stats`` and are checked against
``summary.analytic_bytes`` on every step. Memory: the CUDA allocator's peak,
or the peak resident set on CPUs, over the first training steps. NVML is
sampled in a background thread on GPUs.

At the end rank 0 gathers every rank's records and writes
``profile.json`` and ``profile.png`` (one step's timeline, both ranks) into
the run directory and prints the table. Render them again with

    python -m alexnet_mp.profiler RUN_DIR
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
from collections import Counter, deque
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from .model import LAYERS
from .summary import analytic_bytes, column_params, reference_memory

KEEP_STEPS = 1000  # step records kept for the summary: the latest ones
MEMORY_STEPS = 5  # memory peaks are read at the end of the run's first steps only (cheap, and before any evaluation)
PROFILE_FILE, PICTURE_FILE = "profile.json", "profile.png"
FORMAT = 1


# ------------------------------------------------------------------ clocks


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


# ------------------------------------------------------------------ the data-parallel all-reduce


class AllReduceMeter:
    """Counts and times the data-parallel gradient all-reduce of a DistributedDataParallel model.

    Registered as the model's DDP communication hook, it runs PyTorch's own
    ``allreduce_hook`` (divide by the replicas, all-reduce: what DDP does with
    no hook) and notes, per bucket, when DDP handed it over (its gradients are
    all computed), when its result was ready, and its bytes. On CUDA both marks
    are stream-ordered events: the ready callback runs on streams that wait for
    the all-reduce. DDP takes one hook, registered before the first backward.
    """

    def __init__(self, ddp, group, clock):
        self.clock = clock
        self.buckets = []  # [launch mark, ready mark, bytes] since the last take()
        ddp.register_comm_hook(group, self._hook)

    def _hook(self, group, bucket):
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


def allreduce_spans(buckets: list, clock, start) -> dict:
    """One step's buckets in seconds since `start`: the span in flight and the exposed wait.

    Exposed: from the last bucket's launch (by then every gradient exists, so
    backward has nothing left to hide it behind) to the last result.
    """
    launches = [clock.seconds(start, b[0]) for b in buckets]
    readies = [clock.seconds(start, b[1]) for b in buckets]
    return {"buckets": len(buckets), "bytes": sum(b[2] for b in buckets), "first_launch": min(launches),
            "last_launch": max(launches), "last_ready": max(readies)}


# ------------------------------------------------------------------ NVML


class NvmlSampler:
    """Utilisation, memory, power and clocks of one GPU, read every `interval_s` in a thread."""

    FIELDS = ("gpu_util_pct", "mem_util_pct", "mem_used_bytes", "power_w", "sm_clock_mhz", "mem_clock_mhz")

    def __init__(self, nvml, handle, interval_s: float):
        self.nvml, self.handle, self.interval_s = nvml, handle, interval_s
        self.samples = {f: [] for f in self.FIELDS}
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)

    def read(self) -> dict:
        nvml, h = self.nvml, self.handle
        util = nvml.nvmlDeviceGetUtilizationRates(h)
        return {"gpu_util_pct": util.gpu, "mem_util_pct": util.memory,
                "mem_used_bytes": nvml.nvmlDeviceGetMemoryInfo(h).used,
                "power_w": nvml.nvmlDeviceGetPowerUsage(h) / 1e3,  # NVML reports milliwatts
                "sm_clock_mhz": nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),
                "mem_clock_mhz": nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM)}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for key, value in self.read().items():
                    self.samples[key].append(float(value))
            except Exception:  # a counter this GPU lacks must not end the run
                self.errors += 1
            self._stop.wait(self.interval_s)

    def start(self) -> "NvmlSampler":
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=5)
        out = {"available": True, "samples": len(self.samples["gpu_util_pct"]),
               "interval_s": self.interval_s, "read_errors": self.errors}
        for key, values in self.samples.items():
            out[key] = {"mean": statistics.fmean(values), "max": max(values)} if values else None
        try:
            self.nvml.nvmlShutdown()
        except Exception:
            pass
        return out


def open_nvml(device: torch.device, interval_s: float, nvml=None) -> tuple[NvmlSampler | None, str | None]:
    """A started sampler for `device`, or (None, why not). `nvml` replaces pynvml (tests)."""
    if device.type != "cuda":
        return None, f"this rank runs on the {device.type.upper()}, not on an NVIDIA GPU"
    try:
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"
    index = device.index or 0
    try:  # by UUID: NVML's indices ignore CUDA_VISIBLE_DEVICES
        handle = nvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(index).uuid}")
    except Exception:
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as e:
            return None, f"no NVML handle for cuda:{index}: {e}"
    return NvmlSampler(nvml, handle, interval_s).start(), None


# ------------------------------------------------------------------ memory and machine


def proc_status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def resident_peak_bytes() -> int:
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
    out = {"torch": torch.__version__, "python": platform.python_version(), "backend": backend,
           "platform": platform.platform()}
    if device.type == "cuda":
        out["cuda"] = torch.version.cuda
        if backend == "nccl":
            out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return out


# ------------------------------------------------------------------ the profiler


class NullProfiler:
    """What `profiling` returns when profiling is off: every call does nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def attach(self, model, link, optimizer, run_path, ddp=None) -> None:
        pass

    def batches(self, loader):
        return loader

    def step_end(self) -> None:
        pass


def profiling(cfg, layout, nvml=None):
    """The run's profiler: a Profiler when profile.enabled, else a NullProfiler."""
    return Profiler(cfg, layout, nvml) if cfg.profile.enabled else NullProfiler()


class Profiler:
    """Records each training step of this rank; rank 0 writes the report at the end."""

    def __init__(self, cfg, layout, nvml=None):
        self.cfg, self.layout, self.nvml_module = cfg, layout, nvml
        p = cfg.profile
        self.skip = p.skip_steps
        trace_start = p.skip_steps + p.trace_wait
        self.traced = range(trace_start, trace_start + p.trace_warmup + p.trace_active) if p.trace else range(0)
        self.clock = CudaClock() if layout.device.type == "cuda" else HostClock()
        self.attached = False
        self.timing = False  # inside a training step: the hooks record only then
        self.records = deque(maxlen=KEEP_STEPS)
        self.seen = 0  # training steps started since attach
        # Mismatched steps per key (all of them) and the first few in full.
        self.mismatch_counts, self.byte_mismatches, self.bytes_checked = Counter(), [], 0
        self.undo = []  # how to take every hook out again
        self.sampler, self.nvml_report, self.torch_prof, self.trace_written = None, None, None, False

    # --- the run

    def __enter__(self):
        return self

    def attach(self, model, link, optimizer, run_path, ddp=None) -> None:
        """Hook into this run's model, link, optimizer and DDP wrapper (with replicas); start NVML and the trace."""
        self.model, self.link, self.run_path = model, link, Path(run_path)
        self.allreduce = AllReduceMeter(ddp, self.layout.dp_group, self.clock) if ddp is not None else None
        # DDP all-reduces every gradient once a step, in fp32 (the parameters' dtype, also under bf16 autocast).
        self.allreduce_analytic = 4 * column_params(self.cfg.model, self.layout.column)
        self.column, self.attached = self.layout.column, True
        # Everything crosses in the autocast dtype under dist.amp=bf16 (every layer and the LRN keep bf16).
        self.element_size = 2 if self.cfg.dist.amp == "bf16" else 4
        self.model_state_bytes = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
        self.analytic_cache = {}
        for name, module in model.named_modules():
            layer = name.rsplit(".", 1)[-1]
            if layer in LAYERS:  # any wrapper (DDP, ...) around the column is fine
                self.undo.append(module.register_forward_pre_hook(
                    lambda m, args, layer=layer: self._forward_stage(layer)).remove)
                for param in module.parameters():
                    self.undo.append(param.register_post_accumulate_grad_hook(
                        lambda p, layer=layer: self._backward_mark(layer)).remove)
        self.undo.append(model.register_forward_hook(lambda m, args, out: self._forward_end(out)).remove)
        self.undo.append(optimizer.register_step_pre_hook(lambda *a: self._optimizer_mark(start=True)).remove)
        self.undo.append(optimizer.register_step_post_hook(lambda *a: self._optimizer_mark(start=False)).remove)
        self._wrap_exchange(link)

        device = self.layout.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.memory = {"kind": "cuda allocator", "at_start_bytes": torch.cuda.memory_allocated(device),
                           "peak_bytes": 0, "scope": f"the first {MEMORY_STEPS} training steps"}
        else:
            reset = reset_resident_peak()
            self.memory = {"kind": "resident set (VmHWM)", "at_start_bytes": proc_status_bytes("VmRSS"),
                           "peak_bytes": 0, "scope": f"the first {MEMORY_STEPS} training steps" if reset
                           else "the process's lifetime (VmHWM could not be reset)"}
        self.sampler, reason = open_nvml(device, self.cfg.profile.nvml_interval_s, self.nvml_module)
        self.nvml_report = None if self.sampler else {"available": False, "reason": reason}
        if self.layout.is_main:
            window = (f"; torch.profiler trace of steps {self.traced.start + 1}-{self.traced.stop} "
                      f"(left out of the summary)" if self.traced else "")
            print(f"profiling: every step, the first {self.skip} left out as warm-up{window}")
            if reason:
                print(f"NVML not available: {reason}")
        if self.cfg.profile.trace:
            p = self.cfg.profile
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.trace_file = self.run_path / f"trace_rank{self.layout.rank}.json"
            self.torch_prof = torch.profiler.profile(
                activities=activities,
                schedule=torch.profiler.schedule(skip_first=self.skip, wait=p.trace_wait, warmup=p.trace_warmup,
                                                 active=p.trace_active, repeat=1),
                on_trace_ready=self._write_trace)
            self.torch_prof.start()

    def _write_trace(self, prof) -> None:
        prof.export_chrome_trace(str(self.trace_file))
        self.trace_written = True

    def detach(self):
        """Take every hook out and stop the trace and NVML; returns the NVML report."""
        self.timing = False
        for remove in self.undo:
            remove()
        self.undo = []
        if self.torch_prof is not None:
            self.torch_prof.stop()  # writes the trace if the run ended inside the window
        return self.sampler.stop() if self.sampler else self.nvml_report

    def __exit__(self, exc_type, exc, tb):
        if not self.attached:
            return False
        nvml = self.detach()
        if exc_type is not None:  # the peer may be gone: no collectives
            return False
        mine = {"rank": self.layout.rank, "column": self.column, "peer": self.layout.peer_rank,
                "dp_rank": self.layout.dp_rank, "device": str(self.layout.device),
                "threads": torch.get_num_threads(), "machine": machine_info(self.layout.device),
                "versions": versions(self.layout.backend, self.layout.device),
                "steps": self._resolved_records(), "seen": self.seen, "bytes_checked": self.bytes_checked,
                "byte_mismatches": self.byte_mismatches, "mismatch_counts": dict(self.mismatch_counts),
                "analytic": self._analytic(self._typical_batch()),
                "allreduce_analytic": self.allreduce_analytic if self.allreduce else None,
                "memory": dict(self.memory, model_state_bytes=self.model_state_bytes), "nvml": nvml,
                "trace": self.trace_file.name if self.trace_written else None}
        gathered = [None] * dist.get_world_size() if self.layout.is_main else None
        dist.gather_object(mine, gathered, dst=0)
        if self.layout.is_main:
            profile = build_profile(gathered, self.cfg, str(self.run_path), self.skip, len(self.traced))
            if profile is None:
                print("profile: no training step was measured; nothing written")
            else:
                write_report(profile, self.run_path)
        return False

    # --- per step

    def batches(self, loader):
        """Yield the loader's batches; the wait for each one opens a step."""
        it = iter(loader)
        while True:
            if self.timing:  # the previous step never reached step_end (a skipped step)
                self._close_step(record=False)
            start = self.clock.now()
            try:
                item = next(it)
            except StopIteration:
                return
            self._open_step(start, item)
            yield item

    def _open_step(self, start, item) -> None:
        self.step_start, self.batch = start, len(item[0])
        self.events = [["data", "data", start, self.clock.now()]]
        self.open_stage, self.cursor, self.forward_done = None, None, None
        self.bytes_before = {k: (v["sent"], v["recv"]) for k, v in self.link.stats.bytes.items()}
        self.index, self.seen = self.seen, self.seen + 1
        if self.allreduce:
            self.allreduce.take()  # nothing from outside a training step
        self.timing = True

    def step_end(self) -> None:
        """Close the step (after optimizer.step() and its bookkeeping)."""
        if self.timing:
            self._close_step(record=True)

    def _close_step(self, record: bool) -> None:
        end = self.clock.now()
        self.timing = False
        buckets = self.allreduce.take() if self.allreduce else None
        if self.torch_prof is not None:
            self.torch_prof.step()
        if not record:
            return
        moved = self._check_bytes()
        reduced = sum(b[2] for b in buckets) if buckets is not None else None
        if reduced is not None and reduced != self.allreduce_analytic:
            self._mismatch("dp.allreduce", [reduced], [self.allreduce_analytic])
        if self.seen <= MEMORY_STEPS:
            self._read_memory()
        if self.index >= self.skip and self.index not in self.traced:
            # Raw marks: turned into seconds at the end, so that a step costs no conversion (nor a CUDA sync).
            self.records.append({"index": self.index, "batch": self.batch, "start": self.step_start, "end": end,
                                 "events": self.events, "bytes": moved, "allreduce": buckets})

    def _resolved_records(self) -> list[dict]:
        """The kept steps with every mark in seconds since the step's start."""
        self.clock.settle()
        seconds, out = self.clock.seconds, []
        for r in self.records:
            start = r["start"]
            events = [[kind, name, seconds(start, a), seconds(start, b)] for kind, name, a, b in r["events"]
                      if b is not None]
            step = {"index": r["index"], "batch": r["batch"], "seconds": seconds(start, r["end"]),
                    "events": events, "bytes": r["bytes"]}
            if r["allreduce"]:
                spans = step["allreduce"] = allreduce_spans(r["allreduce"], self.clock, start)
                # The exposed wait starts where this rank's backward marks end, so no moment counts twice.
                begin = max([spans["last_launch"]] + [e[3] for e in events if e[0] == "backward"])
                events.append(["allreduce", "dp.allreduce", begin, max(begin, spans["last_ready"])])
            out.append(step)
        return out

    def _check_bytes(self) -> dict:
        """This step's bytes per crossing, compared with the analytic count."""
        moved = {}
        for key, v in self.link.stats.bytes.items():
            sent0, recv0 = self.bytes_before.get(key, (0, 0))
            if v["sent"] - sent0 or v["recv"] - recv0:
                moved[key] = [v["sent"] - sent0, v["recv"] - recv0]
        expected = self._analytic(self.batch)
        self.bytes_checked += 1
        for key in sorted(set(moved) | set(expected)):
            want = [expected[key]["sent"], expected[key]["recv"]] if key in expected else [0, 0]
            got = moved.get(key, [0, 0])
            if got != want:
                self._mismatch(key, got, want)
        return moved

    def _mismatch(self, key: str, measured: list, analytic: list) -> None:
        self.mismatch_counts[key] += 1
        if len(self.byte_mismatches) < 10:
            self.byte_mismatches.append({"step": self.index, "key": key, "measured": measured, "analytic": analytic})

    def _analytic(self, batch: int) -> dict:
        if batch not in self.analytic_cache:
            self.analytic_cache[batch] = analytic_bytes(self.cfg.model, batch, self.column, self.element_size)
        return self.analytic_cache[batch]

    def _typical_batch(self) -> int:
        return self.records[-1]["batch"] if self.records else self.cfg.train.batch_size

    def _read_memory(self) -> None:
        device = self.layout.device
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else resident_peak_bytes()
        self.memory["peak_bytes"] = max(self.memory["peak_bytes"], peak)

    # --- hooks (each returns at once outside a training step)

    def _close_stage(self, mark) -> None:
        if self.open_stage is not None:
            self.open_stage[3] = mark
            self.open_stage = None

    def _forward_stage(self, layer: str) -> None:
        if self.timing:
            mark = self.clock.now()
            self._close_stage(mark)
            self.open_stage = ["forward", layer, mark, None]
            self.events.append(self.open_stage)

    def _forward_end(self, output) -> None:
        if self.timing:
            self.forward_done = self.clock.now()
            self._close_stage(self.forward_done)
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(self._backward_begin)

    def _backward_begin(self, grad) -> None:
        if self.timing:
            self.cursor = self.clock.now()
            self.events.append(["loss", "loss", self.forward_done, self.cursor])

    def _backward_mark(self, layer: str) -> None:
        if self.timing:
            mark = self.clock.now()
            last = self.events[-1]
            if last[0] == "backward" and last[1] == layer:  # the layer's next parameter
                last[3] = mark
            else:
                self.events.append(["backward", layer, self.cursor if self.cursor is not None else mark, mark])
            self.cursor = mark

    def _optimizer_mark(self, start: bool) -> None:
        if self.timing:
            if start:
                self.events.append(["optimizer", "optimizer", self.clock.now(), None])
            else:
                self.events[-1][3] = self.clock.now()

    def _wrap_exchange(self, link) -> None:
        """Time (and, when tracing, label) every exchange of this link while attached.

        Every exchange, plain or overlapped, is a `link.start` whose `wait` is where
        this rank is held up, so the wait is what is timed. A forward stage the wait
        interrupts resumes after it (an overlapped crossing layer computes on both
        sides of its wait); in backward, the crossing layer's work before the wait
        counts as that layer's backward.
        """
        inner_start, tracing = link.start, self.cfg.profile.trace

        def start(send, recv_shape, like, crossing, phase):
            pending = inner_start(send, recv_shape, like, crossing, phase)
            if not self.timing:
                return pending
            inner_wait, key = pending.wait, f"{crossing}.{phase}"

            def wait():
                begin = self.clock.now()
                interrupted = self.open_stage
                self._close_stage(begin)
                if (interrupted is None and self.cursor is not None and phase == "backward"
                        and hasattr(self.model, crossing)):
                    self.events.append(["backward", crossing, self.cursor, begin])
                with torch.profiler.record_function(f"exchange:{key}") if tracing else nullcontext():
                    out = inner_wait()
                self.cursor = self.clock.now()
                self.events.append(["comm", key, begin, self.cursor])
                if interrupted is not None:
                    self.open_stage = [interrupted[0], interrupted[1], self.cursor, None]
                    self.events.append(self.open_stage)
                return out

            pending.wait = wait
            return pending

        link.start = start
        self.undo.append(lambda: vars(link).pop("start", None))


# ------------------------------------------------------------------ summary (pure: records in, figures out)


def stat(values: list[float], step_mean: float) -> dict:
    mean = statistics.fmean(values) if values else 0.0
    return {"mean_s": mean, "median_s": statistics.median(values) if values else 0.0,
            "share": mean / step_mean if step_mean > 0 else 0.0}


def part_durations(steps: list[dict]) -> dict[tuple[str, str], list[float]]:
    """Seconds per (kind, name) per step, 0 where a step lacks the part; ('other', 'other') is the rest."""
    parts: dict[tuple[str, str], list[float]] = {}
    for i, step in enumerate(steps):
        for kind, name, start, end in step["events"]:
            parts.setdefault((kind, name), [0.0] * len(steps))[i] += end - start
    parts[("other", "other")] = [s["seconds"] - sum(p[i] for p in parts.values()) for i, s in enumerate(steps)]
    return parts


def summarise_rank(data: dict, peer: dict | None) -> dict:
    """One rank's figures; `peer` (its model-parallel peer's data) splits the waits into transfer and peer wait."""
    steps = data["steps"]
    step_times = [s["seconds"] for s in steps]
    mean_step = statistics.fmean(step_times)
    parts = part_durations(steps)
    out = {"step": stat(step_times, mean_step), "phases": {}, "layers": {}, "crossings": {}, "allreduce": None}
    out["images_per_s"] = statistics.fmean(s["batch"] for s in steps) / statistics.median(step_times)
    for (kind, name), values in parts.items():
        if kind in ("forward", "backward"):
            out["layers"].setdefault(name, {})[kind] = stat(values, mean_step)
        elif kind not in ("comm", "allreduce"):
            out["phases"][kind] = stat(values, mean_step)
    peer_waits = {}
    if peer is not None:
        peer_parts = part_durations(peer["steps"])
        for (kind, name), values in peer_parts.items():
            if kind == "comm":
                peer_waits[name] = {s["index"]: v for s, v in zip(peer["steps"], values)}
    mismatched = set(data["mismatch_counts"])
    last = steps[-1]
    for (kind, key), values in parts.items():
        if kind != "comm":
            continue
        transfers = [min(v, peer_waits[key][s["index"]]) for s, v in zip(steps, values)
                     if s["index"] in peer_waits.get(key, {})]
        transfer = statistics.fmean(transfers) if transfers else None
        sent, recv = last["bytes"].get(key, [0, 0])
        analytic = data["analytic"].get(key, {"sent": 0, "recv": 0})
        out["crossings"][key] = {
            "wait": stat(values, mean_step), "transfer_s": transfer,
            "peer_wait_s": statistics.fmean(values) - transfer if transfer is not None else None,
            "sent_bytes": sent, "recv_bytes": recv,
            "analytic_sent_bytes": analytic["sent"], "analytic_recv_bytes": analytic["recv"],
            "bytes_match": key not in mismatched and [sent, recv] == [analytic["sent"], analytic["recv"]],
            "bandwidth_bytes_per_s": (sent + recv) / transfer if transfer else None}
    spans = [s["allreduce"] for s in steps if "allreduce" in s]
    if spans:
        exposed = parts[("allreduce", "dp.allreduce")]
        in_flight = stat([a["last_ready"] - a["first_launch"] for a in spans], mean_step)
        moved = spans[-1]["bytes"]
        out["allreduce"] = {
            "exposed": stat(exposed, mean_step), "in_flight": in_flight,
            "hidden_share": 1 - statistics.fmean(exposed) / in_flight["mean_s"] if in_flight["mean_s"] > 0 else None,
            "buckets": spans[-1]["buckets"], "bytes": moved, "analytic_bytes": data["allreduce_analytic"],
            "bytes_match": "dp.allreduce" not in mismatched and moved == data["allreduce_analytic"]}
    return out


def build_profile(ranks: list[dict], cfg, run_dir: str, skipped: int, traced: int) -> dict | None:
    """The profile.json content from every rank's gathered records."""
    if not all(r["steps"] for r in ranks):
        return None
    by_rank = {r["rank"]: r for r in ranks}
    # The timeline step: one every rank measured, the one whose rank-0 time is the median's nearest.
    common = set.intersection(*({s["index"] for s in r["steps"]} for r in ranks))
    first = ranks[0]["steps"]
    median = statistics.median(s["seconds"] for s in first)
    shown = min((s for s in first if s["index"] in common), key=lambda s: abs(s["seconds"] - median),
                default=first[0])["index"]
    out_ranks = []
    for r in ranks:
        row = {k: r[k] for k in ("rank", "column", "peer", "dp_rank", "device", "threads")}
        row["host"], row["gpu"] = r["machine"]["host"], r["machine"]["gpu"]
        row.update(summarise_rank(r, by_rank.get(r["peer"])))
        row.update(memory=r["memory"], nvml=r["nvml"], trace=r["trace"],
                   bytes_checked_steps=r["bytes_checked"], byte_mismatches=r["byte_mismatches"],
                   mismatch_counts=r["mismatch_counts"])
        step = next((s for s in r["steps"] if s["index"] == shown), r["steps"][0])
        row["timeline"] = {"step": step["index"], "seconds": step["seconds"], "events": step["events"],
                           "allreduce": step.get("allreduce")}
        out_ranks.append(row)
    batch = first[-1]["batch"]
    return {"format": FORMAT, "run_dir": run_dir, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": ranks[0]["machine"], "versions": ranks[0]["versions"],
            "model": {"crop_size": cfg.model.crop_size, "conv_widths": list(cfg.model.conv_widths),
                      "fc_width": cfg.model.fc_width, "num_classes": cfg.model.num_classes, "fc8": cfg.model.fc8},
            "batch_per_pair": batch,
            "steps": {"seen": ranks[0]["seen"], "measured": len(first), "warmup_skipped": skipped,
                      "traced_excluded": traced, "timeline_step": shown},
            "reference_memory": reference_memory(cfg.model, batch, 4),
            "ranks": out_ranks}


# ------------------------------------------------------------------ report


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _rows(profile: dict) -> list[tuple[str, str, str]]:
    """(section, kind, name) of every step part, in the order rank 0's timeline step ran them."""
    first = profile["ranks"][0]["timeline"]["events"]
    order = {}
    for kind, name, start, _ in first:
        order.setdefault((kind, name), start)
    found = set()
    for r in profile["ranks"]:
        found |= {("phases", k, k) for k in r["phases"]}
        found |= {("layers", kind, layer) for layer, d in r["layers"].items() for kind in d}
        found |= {("crossings", "comm", key) for key in r["crossings"]}
        found |= {("allreduce", "allreduce", "dp.allreduce")} if r.get("allreduce") else set()
    rest = float("inf")
    return sorted(found, key=lambda p: (p[1] == "other", order.get((p[1], p[2]), rest), p[1], p[2]))


def _part(rank: dict, section: str, kind: str, name: str) -> dict | None:
    if section == "phases":
        return rank["phases"].get(kind)
    if section == "layers":
        return rank["layers"].get(name, {}).get(kind)
    if section == "allreduce":
        return rank["allreduce"]["exposed"] if rank.get("allreduce") else None
    return rank["crossings"].get(name, {}).get("wait")


def render_table(profile: dict) -> str:
    ranks, steps, m, v = profile["ranks"], profile["steps"], profile["machine"], profile["versions"]
    lines = [f"profile of {profile['run_dir']}: {len(ranks)} ranks, {steps['measured']} steps measured of "
             f"{steps['seen']} ({steps['warmup_skipped']} warm-up, {steps['traced_excluded']} traced left out), "
             f"batch {profile['batch_per_pair']} per pair",
             f"machine: {m['host']}, {m['cpu']}, {m['cores']} cores"
             + (f", {m['memory_bytes'] / 2**30:.1f} GiB" if m["memory_bytes"] else "")
             + (f", {m['gpu']}" if m["gpu"] else "")
             + f"; torch {v['torch']}, python {v['python']}, {v['backend']} on {ranks[0]['device']}", ""]
    head = f"{'where a step goes':<26}" + "".join(f"{'rank ' + str(r['rank']):>28}" for r in ranks)
    sub = f"{'':<26}" + f"{'mean ms':>10}{'median':>9}{'share':>9}" * len(ranks)
    lines += [head, sub]
    for section, kind, name in _rows(profile):
        text = {"phases": kind, "layers": f"{kind} {name}", "crossings": f"wait {name}",
                "allreduce": "wait dp all-reduce"}[section]
        cells = ""
        for r in ranks:
            s = _part(r, section, kind, name)
            cells += (f"{_ms(s['mean_s']):>10}{_ms(s['median_s']):>9}{s['share']:>9.1%}" if s
                      else f"{'':>10}{'':>9}{'':>9}")
        lines.append(f"{text:<26}{cells}")
    lines.append(f"{'step':<26}" + "".join(f"{_ms(r['step']['mean_s']):>10}{_ms(r['step']['median_s']):>9}"
                                          f"{sum_shares(r):>9.1%}" for r in ranks))
    lines.append(f"{'images/s (median step)':<26}" + "".join(f"{r['images_per_s']:>28.1f}" for r in ranks))
    lines += ["", "crossings per step: bytes (measured = analytic?), blocked wait = transfer + wait for the peer",
              f"{'rank':<5}{'crossing':<17}{'sent':>11}{'received':>11}{'analytic':>10}{'wait ms':>9}"
              f"{'transfer':>10}{'peer ms':>9}{'MB/s':>9}"]
    for r in ranks:
        for key, c in r["crossings"].items():
            bw = c["bandwidth_bytes_per_s"]
            lines.append(f"{r['rank']:<5}{key:<17}{c['sent_bytes']:>11,}{c['recv_bytes']:>11,}"
                         f"{'equal' if c['bytes_match'] else 'DIFFERS':>10}{_ms(c['wait']['mean_s']):>9}"
                         f"{_ms(c['transfer_s']):>10}{_ms(c['peer_wait_s']):>9}"
                         f"{'-' if bw is None else f'{bw / 1e6:.0f}':>9}")
    if any(r.get("allreduce") for r in ranks):
        lines += ["", "data-parallel gradient all-reduce per step (DDP between the replicas of each column): "
                      "in flight = first bucket handed over to last result,",
                  "exposed = the wait after the last gradient (the row above), hidden = the rest, behind backward",
                  f"{'rank':<5}{'buckets':>8}{'bytes':>13}{'analytic':>10}{'in flight ms':>14}{'exposed ms':>12}"
                  f"{'hidden':>8}"]
        for r in ranks:
            a = r.get("allreduce")
            if a:
                hidden = "-" if a["hidden_share"] is None else f"{a['hidden_share']:.0%}"
                lines.append(f"{r['rank']:<5}{a['buckets']:>8}{a['bytes']:>13,}"
                             f"{'equal' if a['bytes_match'] else 'DIFFERS':>10}{_ms(a['in_flight']['mean_s']):>14}"
                             f"{_ms(a['exposed']['mean_s']):>12}{hidden:>8}")
    ref = profile["reference_memory"]
    lines += ["", f"memory (peak over {ranks[0]['memory']['scope']}):"]
    for r in ranks:
        mem = r["memory"]
        lines.append(f"  rank {r['rank']}: {mem['kind']} peak {_mib(mem['peak_bytes'])} (at start "
                     f"{_mib(mem['at_start_bytes'])}); this column's parameters+gradients+momentum "
                     f"{_mib(mem['model_state_bytes'])}")
    lines.append(f"  single-device reference needs about {_mib(ref['total'])}: parameters+gradients+momentum "
                 f"{_mib(3 * ref['parameters'])} + activations {_mib(ref['activations'])} for a batch of "
                 f"{profile['batch_per_pair']}")
    lines.append("NVML:")
    for r in ranks:
        n = r["nvml"]
        if not n["available"]:
            lines.append(f"  rank {r['rank']}: not available: {n['reason']}")
            continue
        parts = [f"{n['samples']} samples"]
        for key, unit, scale in (("gpu_util_pct", "%", 1), ("mem_used_bytes", " GiB", 2**30),
                                 ("power_w", " W", 1), ("sm_clock_mhz", " MHz", 1)):
            if n.get(key):
                parts.append(f"{key} mean {n[key]['mean'] / scale:.1f}{unit} max {n[key]['max'] / scale:.1f}{unit}")
        lines.append(f"  rank {r['rank']}: " + ", ".join(parts))
    traces = [r["trace"] for r in ranks if r["trace"]]
    if traces:
        lines.append("traces (chrome://tracing or ui.perfetto.dev): " + ", ".join(traces))
    return "\n".join(lines)


def sum_shares(rank: dict) -> float:
    """The shares of every part of the step (1 up to rounding)."""
    total = sum(p["share"] for p in rank["phases"].values())
    total += sum(p["share"] for d in rank["layers"].values() for p in d.values())
    total += rank["allreduce"]["exposed"]["share"] if rank.get("allreduce") else 0.0
    return total + sum(c["wait"]["share"] for c in rank["crossings"].values())


COLOURS = {"data": "#9e9e9e", "forward": "#1f77b4", "loss": "#8c564b", "backward": "#ff7f0e",
           "comm": "#d62728", "optimizer": "#2ca02c", "allreduce": "#9467bd"}


def plot_timeline(profile: dict, path: Path) -> None:
    """One step, each rank on its own clock from its step start: a compute lane and a comm lane per rank."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ranks = profile["ranks"]
    fig, ax = plt.subplots(figsize=(13, 1.1 + 1.1 * len(ranks)))
    labels = []
    for i, r in enumerate(ranks):
        for lane, kinds in ((0, ("data", "forward", "loss", "backward", "optimizer")), (1, ("comm", "allreduce"))):
            y = (len(ranks) - 1 - i) * 2.4 + (1 - lane) * 1.1
            labels.append((y + 0.45, f"rank {r['rank']} {'comm' if lane else 'compute'}"))
            for kind, name, start, end in r["timeline"]["events"]:
                if kind not in kinds:
                    continue
                ms0, width = start * 1e3, (end - start) * 1e3
                ax.broken_barh([(ms0, width)], (y, 0.9), facecolors=COLOURS[kind], edgecolors="white", linewidth=0.4)
                span = r["timeline"]["seconds"] * 1e3
                if width > span * 0.035:
                    text = name if kind in ("forward", "backward", "comm") else kind
                    ax.text(ms0 + width / 2, y + 0.45, text.replace(".forward", " f").replace(".backward", " b"),
                            ha="center", va="center", fontsize=6, color="white", clip_on=True)
            spans = r["timeline"].get("allreduce")
            if lane == 1 and spans:  # the all-reduce in flight behind backward: a thin bar under the comm lane
                ax.broken_barh([(spans["first_launch"] * 1e3, (spans["last_ready"] - spans["first_launch"]) * 1e3)],
                               (y - 0.15, 0.12), facecolors=COLOURS["allreduce"], alpha=0.6)
        ax.axvline(r["timeline"]["seconds"] * 1e3, color="black", lw=0.6, ls=":")
    ax.set_yticks([y for y, _ in labels], [t for _, t in labels])
    ax.set_xlabel("ms since the rank's step start (gaps: other; dotted line: the rank's step end)")
    ax.set_title(f"step {ranks[0]['timeline']['step'] + 1}: where the time goes, per rank "
                 f"({profile['versions']['backend']}, {ranks[0]['device']})")
    ax.legend(handles=[Patch(color=c, label=k) for k, c in COLOURS.items()], ncol=7, fontsize=7,
              loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(ranks) <= 2 else -0.2), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(profile: dict, run_path: Path) -> None:
    (run_path / PROFILE_FILE).write_text(json.dumps(profile, indent=1))
    plot_timeline(profile, run_path / PICTURE_FILE)
    print(render_table(profile))
    print(f"profile: {run_path / PROFILE_FILE}, timeline: {run_path / PICTURE_FILE}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print a run's profile table and draw its timeline again.")
    parser.add_argument("run_dir", help="a run directory holding profile.json (or the file itself)")
    parser.add_argument("--out", help=f"where to write the timeline (default: RUN_DIR/{PICTURE_FILE})")
    args = parser.parse_args(argv)
    path = Path(args.run_dir)
    file = path if path.is_file() else path / PROFILE_FILE
    if not file.is_file():
        print(f"error: {file} does not exist; run training with profile.enabled=true to write it",
              file=sys.stderr)
        return 2
    try:
        profile = json.loads(file.read_text())
        if profile.get("format") != FORMAT:
            raise ValueError(f"format {profile.get('format')!r}, expected {FORMAT}")
        print(render_table(profile))
        out = Path(args.out) if args.out else file.parent / PICTURE_FILE
        plot_timeline(profile, out)
    except (ValueError, KeyError, TypeError) as e:
        print(f"error: {file} is not a profile this version can read ({e}); write it again with "
              f"profile.enabled=true", file=sys.stderr)
        return 2
    print(f"timeline: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
