"""What the benchmark runs: its modes, the worker pools they run in, and the peak configurations.

A mode is one way of training the same network on the same global batch. Modes run in
long-lived pools (one per process configuration): "one" (1 process), "indep" (a second
1-process pool, run at the same time as "one" for the two-independent mode), "pair"
(2 processes: the model-parallel pair, its no-communication ablation and DDP) and "four"
(4 processes: 2 data-parallel replicas of the pair). A mode's `kind` names the trainer it
uses; modes of one kind share the trainer (single-1t and single-all differ in threads only).
"""
from __future__ import annotations

from dataclasses import dataclass

POOL_SIZES = {"one": 1, "indep": 1, "pair": 2, "four": 4}


def kind_shape(kind: str) -> tuple[int, int, str | None]:
    """(processes per model, data-parallel replicas, amp or None for the preset's) of a trainer kind."""
    base = kind.removesuffix("-bf16")
    mp = 2 if base in ("column", "null", "grid") else 1
    dp = 2 if base in ("ddp", "grid") else 1
    return mp, dp, "bf16" if kind.endswith("-bf16") else None


@dataclass(frozen=True)
class Mode:
    name: str
    pool: str  # where it runs (POOL_SIZES); "indep" runs in "one" and "indep" at once
    kind: str  # the trainer: reference, column, null (NullLink), ddp, grid (2 x 2); "-bf16" for bf16
    threads: int = 1  # torch threads per process (CPU)
    profiled: bool = False  # the profiler attached (summary mode)
    peak: str = "2x1"  # the peak configuration its FLOP/s are compared with
    meaning: str = ""

    @property
    def processes(self) -> int:
        return 2 if self.pool == "indep" else POOL_SIZES[self.pool]

    @property
    def runs(self) -> int:
        """Independent copies of the network trained at once (each on the whole batch)."""
        return 2 if self.pool == "indep" else 1

    @property
    def dp(self) -> int:
        """Data-parallel replicas sharing the batch."""
        return kind_shape(self.kind)[1]

    @property
    def mp(self) -> int:
        return kind_shape(self.kind)[0]

    @property
    def amp(self) -> str:
        """"bf16" for the bf16 rows, else "off" (the preset's own dist.amp applies)."""
        return kind_shape(self.kind)[2] or "off"


def cpu_modes(cores: int, bf16: bool) -> list[Mode]:
    """The CPU modes; bf16 adds single-1t and mp in bf16 beside the fp32 rows."""
    modes = [
        Mode("single-1t", "one", "reference", 1, peak="1x1", meaning="the whole network, one process, one thread"),
        Mode("single-all", "one", "reference", cores, peak=f"1x{cores}",
             meaning=f"the whole network, one process, {cores} threads"),
        Mode("two-indep", "indep", "reference", 1, meaning="two independent single-1t runs at the same time"),
        Mode("mp", "pair", "column", meaning="the model-parallel pair, one thread per column"),
        Mode("no-comm", "pair", "null", meaning="the pair with every exchange a ready tensor (NullLink)"),
        Mode("ddp", "pair", "ddp", meaning="DistributedDataParallel: two whole networks, half the batch each"),
        Mode("mp-profiled", "pair", "column", profiled=True, meaning="the pair with the profiler attached"),
        Mode("dp2xmp2", "four", "grid", meaning="2 data-parallel replicas of the pair on 4 processes"),
    ]
    if bf16:
        modes += [Mode("single-1t-bf16", "one", "reference-bf16", 1, peak="1x1-bf16",
                       meaning="single-1t under bf16 autocast"),
                  Mode("mp-bf16", "pair", "column-bf16", peak="2x1-bf16", meaning="mp under bf16 autocast")]
    return modes


def gpu_modes(gpus: int) -> list[Mode]:
    """The GPU modes: one GPU, and with two GPUs the pair, its ablation and DDP."""
    modes = [Mode("single", "one", "reference", peak="1 GPU", meaning="the whole network on one GPU")]
    if gpus >= 2:
        modes += [Mode("mp", "pair", "column", peak="2 GPUs", meaning="the model-parallel pair on two GPUs"),
                  Mode("no-comm", "pair", "null", peak="2 GPUs", meaning="the pair with every exchange a ready tensor"),
                  Mode("ddp", "pair", "ddp", peak="2 GPUs", meaning="DistributedDataParallel on two GPUs")]
    return modes


def peak_configs(modes: list[Mode], cores: int, gpu: bool) -> dict[str, dict]:
    """{name: pool, threads, dtype} of the peaks the modes are compared with."""
    if gpu:
        table = {"1 GPU": {"pool": "one", "threads": 1, "dtype": "bf16"},
                 "2 GPUs": {"pool": "pair", "threads": 1, "dtype": "bf16"}}
    else:
        table = {"1x1": {"pool": "one", "threads": 1, "dtype": "fp32"},
                 f"1x{cores}": {"pool": "one", "threads": cores, "dtype": "fp32"},
                 "2x1": {"pool": "pair", "threads": 1, "dtype": "fp32"},
                 "1x1-bf16": {"pool": "one", "threads": 1, "dtype": "bf16"},
                 "2x1-bf16": {"pool": "pair", "threads": 1, "dtype": "bf16"}}
    wanted = {m.peak for m in modes}
    return {k: v for k, v in table.items() if k in wanted}


def pools_for(modes: list[Mode]) -> list[str]:
    """The pools these modes need, "indep" needing "one" too."""
    names = {m.pool for m in modes} | ({"one"} if any(m.pool == "indep" for m in modes) else set())
    return [p for p in POOL_SIZES if p in names]


def modes_at(modes: list[Mode], batch: int, batches: tuple, profiled_batches: int) -> list[Mode]:
    """The modes measured at `batch` (the profiled mode only at the smallest `profiled_batches`)."""
    profiled = set(sorted(batches)[:profiled_batches])
    return [m for m in modes if not m.profiled or batch in profiled]
