"""The Profiler: a trainer Callback that records each training step of its rank, and reports at the end.

It lives for the whole run as a context manager (the torchtitan ``profiling``
pattern); the trainer calls its Callback methods; when the context exits
without an error, rank 0 gathers every rank's records and writes the report.
"""
from __future__ import annotations

from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..callbacks import Callback
from .allreduce import AllReduceMeter, allreduce_spans
from .checks import ByteCheck, allreduce_analytic_bytes, bytes_moved, link_bytes
from .clocks import clock_for
from .events import StepEvents
from .machine import MemoryPeak, machine_info, versions
from .nvml import open_nvml
from .report import write_report
from .summary import build_profile
from .trace import TraceWindow, traced_steps

KEEP_STEPS = 1000  # step records kept for the summary: the latest ones
MEMORY_STEPS = 5  # memory peaks are read at the end of the run's first steps only (cheap, and before any evaluation)


class NullProfiler(Callback):
    """What `profiling` returns when profiling is off: every call does nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def attach(self, model, link, optimizer, run_path, ddp=None) -> None:
        pass

    def detach(self) -> None:
        return None


def profiling(cfg, layout, nvml=None):
    """The run's profiler: a Profiler when profile.enabled, else a NullProfiler. `nvml` replaces pynvml."""
    return Profiler(cfg, layout, nvml) if cfg.profile.enabled else NullProfiler()


def batch_size(batch) -> int:
    """Images in a batch: the data package's Batch (by its labels) or an (images, labels) tuple."""
    return len(batch.labels if hasattr(batch, "labels") else batch[1])


class Profiler(Callback):
    """Records each training step of this rank (`events.StepEvents` marks the parts of a step);
    checks its bytes; rank 0 writes profile.json, profile.png and the table when the context exits.

    A step runs from `on_batch_wait` (its data wait) through `on_step_begin` to
    `on_step_end`; a step that never reaches `on_step_end` (a skipped step) is
    dropped. A Profiler attaches once; `detach` may come early (the report then
    covers the steps recorded until then).
    """

    def __init__(self, cfg, layout, nvml=None):
        self.cfg, self.layout, self.nvml_module = cfg, layout, nvml
        self.skip = cfg.profile.skip_steps
        self.traced = traced_steps(cfg.profile)
        self.clock = clock_for(layout.device)
        self.events = StepEvents(self.clock, tracing=cfg.profile.trace)
        self.records = deque(maxlen=KEEP_STEPS)
        self.seen = 0  # training steps begun since attach
        self.used = self.attached = False
        self.step = None  # the open step: start mark, index, batch size, link bytes before it
        self.waiting = None  # (mark, link bytes) from on_batch_wait, until the step begins
        self.link = self.allreduce = self.checks = self.memory = self.sampler = self.trace = None
        self.nvml_report, self.run_path = None, None

    # --- the trainer's seams

    def on_fit_start(self, trainer) -> None:
        """Attach to the trainer's model, link, optimizer, DDP wrapper and run directory."""
        ddp = trainer.net if isinstance(trainer.net, DistributedDataParallel) else None
        self.attach(trainer.model, trainer.link, trainer.optimizer, trainer.run_path, ddp)

    def on_batch_wait(self, trainer) -> None:
        if self.attached:
            self._close_step(record=False)  # a step that never reached on_step_end
            self.waiting = (self.clock.now(), link_bytes(self.link))

    def on_step_begin(self, trainer, batch) -> None:
        if not self.attached:
            return
        self._close_step(record=False)
        start, before = self.waiting or (self.clock.now(), link_bytes(self.link))
        self.waiting = None
        self.events.open(start)
        self.step = {"start": start, "index": self.seen, "batch": batch_size(batch), "before": before}
        self.seen += 1
        if self.allreduce:
            self.allreduce.take()  # nothing from outside a training step

    def on_step_end(self, trainer) -> None:
        self._close_step(record=True)

    def on_fit_end(self, trainer, error) -> None:
        self.detach()

    # --- attaching

    def attach(self, model, link, optimizer, run_path, ddp=None) -> None:
        """Hook into a model, its link (None when each process holds the whole network), its optimizer
        and its DistributedDataParallel wrapper (with replicas); start NVML and the trace."""
        if self.used:
            raise RuntimeError("this Profiler was attached before; make a new Profiler to attach again")
        self.used = self.attached = True
        layout, device = self.layout, self.layout.device
        self.link, self.run_path = link, Path(run_path)
        self.allreduce = AllReduceMeter(ddp, layout.dp_group, self.clock) if ddp is not None else None
        reduced = allreduce_analytic_bytes(self.cfg.model, layout.column, layout.peer_rank is None)
        self.checks = ByteCheck(self.cfg, layout.column, crossings=link is not None,
                                allreduce_bytes=reduced if ddp is not None else None)
        self.model_state_bytes = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
        self.events.install(model, link, optimizer)
        self.memory = MemoryPeak(device, MEMORY_STEPS)
        self.sampler, reason = open_nvml(device, self.cfg.profile.nvml_interval_s, self.nvml_module)
        self.nvml_report = None if self.sampler else {"available": False, "reason": reason}
        if self.cfg.profile.trace:
            self.trace = TraceWindow(self.cfg.profile, device, self.run_path / f"trace_rank{layout.rank}.json")
        if layout.is_main:
            window = (f"; torch.profiler trace of steps {self.traced.start + 1}-{self.traced.stop} "
                      f"(left out of the summary)" if self.traced else "")
            print(f"profiling: every step, the first {self.skip} left out as warm-up{window}")
            if reason:
                print(f"NVML not available: {reason}")

    def detach(self) -> dict | None:
        """Take every hook and the link observer out, stop the trace and NVML; the NVML report.
        The DDP communication hook stays (DDP cannot drop it) but records nothing more."""
        if not self.attached:
            return self.nvml_report
        self._close_step(record=False)
        self.attached, self.waiting = False, None
        self.events.remove()
        if self.allreduce:
            self.allreduce.stop()
        if self.trace:
            self.trace.stop()
        if self.sampler:
            self.nvml_report, self.sampler = self.sampler.stop(), None
        return self.nvml_report

    # --- per step

    def _close_step(self, record: bool) -> None:
        if self.step is None:
            return
        end = self.clock.now()
        events, step, self.step = self.events.close(), self.step, None
        buckets = self.allreduce.take() if self.allreduce else None
        if self.trace:
            self.trace.step()
        if not record:
            return
        moved = bytes_moved(link_bytes(self.link), step["before"])
        self.checks.check(step["index"], step["batch"], moved,
                          sum(b[2] for b in buckets) if buckets is not None else None)
        if self.seen <= MEMORY_STEPS:
            self.memory.read()
        if step["index"] >= self.skip and step["index"] not in self.traced:
            # Raw marks: turned into seconds at the end, so that a step costs no conversion (nor a CUDA sync).
            self.records.append({"index": step["index"], "batch": step["batch"], "start": step["start"],
                                 "end": end, "events": events, "bytes": moved, "allreduce": buckets})

    def resolved_records(self) -> list[dict]:
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

    # --- the report

    def rank_record(self) -> dict:
        """Everything this rank contributes to the report (what rank 0 gathers)."""
        layout = self.layout
        batch = self.records[-1]["batch"] if self.records else self.cfg.train.batch_size
        return {"rank": layout.rank, "column": layout.column, "peer": layout.peer_rank, "dp_rank": layout.dp_rank,
                "device": str(layout.device), "threads": torch.get_num_threads(),
                "machine": machine_info(layout.device), "versions": versions(layout.backend, layout.device),
                "steps": self.resolved_records(), "seen": self.seen, **self.checks.as_dict(),
                "analytic": self.checks.analytic(batch), "allreduce_analytic": self.checks.allreduce_bytes,
                "memory": dict(self.memory.report, model_state_bytes=self.model_state_bytes),
                "nvml": self.nvml_report,
                "trace": self.trace.path.name if self.trace and self.trace.written else None}

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.used:
            return False
        self.detach()
        if exc_type is None:  # after an error the peer may be gone: no collectives
            self._gather_and_write()
        return False

    def _gather_and_write(self) -> None:
        """Rank 0 gathers every rank's record over the default group (if there is one) and writes the report."""
        mine = self.rank_record()
        if dist.is_available() and dist.is_initialized():
            gathered = [None] * dist.get_world_size() if self.layout.is_main else None
            dist.gather_object(mine, gathered, dst=0)
        else:
            gathered = [mine]
        if not self.layout.is_main:
            return
        profile = build_profile(gathered, self.cfg, str(self.run_path), self.skip, len(self.traced))
        if profile is None:
            print("profile: no training step was measured; nothing written")
        else:
            write_report(profile, self.run_path)
