"""make bench: the model-parallel pair against what else one could run, side by side.

    python benchmarks/bench.py --quick   # 2-core CPU, under 10 minutes (what `make bench` runs)
    python benchmarks/bench.py           # full: the paper's network, for GPUs
    python benchmarks/bench.py --tiny    # a smoke run for the tests, seconds
    python benchmarks/bench.py --quick model.crop_size=99 --repeats 5   # any model.* key, any setting

Modes, all on the same synthetic batches: the single-device reference in one
process (on CPU with one thread and with every core), the two-process
model-parallel pair (one thread per process on CPU) with plain and with
overlapped crossings, and two-process DistributedDataParallel on the reference
(each process half the batch). Two worker processes start once and stay; the
coordinator hands them one measurement at a time and rotates the modes'
order every repeat, so that machine noise hits all modes alike. Writes
benchmarks/results/<machine>-<date>.json (top-level `ratios`), a Markdown
table beside it (printed too) and a PNG of images/s per mode.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import platform
import queue
import re
import socket
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runs from a plain checkout too
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402
from alexnet_mp.config import DistConfig, build_config, config_from_dict  # noqa: E402
from alexnet_mp.exchange import PeerLink  # noqa: E402
from alexnet_mp.model import build_column, build_reference, dropout_generator, param_groups  # noqa: E402
from alexnet_mp.profiler import (AllReduceMeter, CudaClock, HostClock, allreduce_spans, machine_info,  # noqa: E402
                                 proc_status_bytes, reset_resident_peak, resident_peak_bytes)
from alexnet_mp.summary import analytic_bytes, column_params, forward_macs, param_count  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
PRESETS = {
    "full": dict(
        overrides=[], repeats=5, warmup=2, steps=5, matmul_n=8192, matmul_s=2.0, sweep_max=64 * MiB,
        sweep_iters=200,
        description="Full: the paper's network (227 px crops, 96-256-384-384-256 maps, 4096-unit fc6/fc7, "
                    "1000 classes, 61.0M parameters); meant for two GPUs."),
    "quick": dict(
        overrides=["model.crop_size=131"], repeats=5, warmup=1, steps=2, matmul_n=2048, matmul_s=1.0,
        sweep_max=64 * MiB, sweep_iters=100,
        description="Quick: the paper's widths and classes (96-256-384-384-256 maps, 4096-unit fc6/fc7, "
                    "1000 classes) on 131 px crops instead of 227 (maps 31-15-7-3 instead of 55-27-13-6: "
                    "a third of the paper's work per image, 32.7M parameters), so that every mode at batch "
                    "32 and 128 fits in a few minutes on a 2-core CPU."),
    "tiny": dict(
        overrides=["model.num_classes=5", "model.crop_size=67", "model.conv_widths=[8,16,24,24,16]",
                   "model.fc_width=32"], repeats=1, warmup=1, steps=1, matmul_n=128, matmul_s=0.05,
        sweep_max=64 * KiB, sweep_iters=3, batches=(4, 8),
        description="Tiny: a toy network for the tests; the numbers mean nothing."),
}
CPU_SINGLE, CUDA_SINGLE = ("single-1t", "single-all"), ("single",)
MP_MODES = ("mp", "mp-overlap")
# Data parallel x model parallel: 2 replicas of the overlapped pair on 4 processes, measured after
# the 2-process modes in a pool of its own (same run, same data, same global batch).
DP_MP_MODE = ("dp2xmp2", 4, 1, 4)
SEED = 0


# ------------------------------------------------------------------ workers


class PeakMemory:
    """Peak memory of this process over a stretch of work, in MiB.

    CUDA: the allocator's peak. CPU: the resident set's high-water mark, reset
    at the start (Linux's clear_refs), after handing freed heap back to the
    system so that earlier modes' leftovers do not count.
    """

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.idle = torch.cuda.memory_allocated() / MiB
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass  # not glibc: earlier modes' freed heap may still count
        reset_resident_peak()  # where it cannot, the peak covers the process's life
        self.idle = (proc_status_bytes("VmRSS") or 0) / MiB

    def peak(self) -> tuple[float, float]:
        """(peak, peak above the level at start)."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / MiB
        else:
            peak = resident_peak_bytes() / MiB
        return peak, peak - self.idle


def synthetic_batch(model_cfg, batch: int, device: torch.device):
    """The same images and labels for every mode; pinned on the host for a GPU."""
    g = torch.Generator().manual_seed(SEED)
    images = torch.randn(batch, 3, model_cfg.crop_size, model_cfg.crop_size, generator=g)
    labels = torch.randint(0, model_cfg.num_classes, (batch,), generator=g)
    if device.type == "cuda":
        # Copied every step, as from a loader: pinned memory lets the copy run
        # asynchronously (non_blocking) instead of through a staging buffer.
        images, labels = images.pin_memory(), labels.pin_memory()
    return images, labels


_DP_MP_GROUPS = []


def dp_mp_groups():
    """The 2 x 2 mode's (pair groups, replica groups), made once per worker: groups are never freed."""
    if not _DP_MP_GROUPS:
        _DP_MP_GROUPS.extend([[dist.new_group([0, 1]), dist.new_group([2, 3])],
                              [dist.new_group([0, 2]), dist.new_group([1, 3])]])
    return _DP_MP_GROUPS


def train_task(task: dict, rank: int, device: torch.device) -> dict:
    """Time `steps` training steps of one mode after `warmup` untimed ones."""
    cfg = config_from_dict(task["config"])
    mode, batch, amp, channels_last = task["mode"], task["batch"], task["amp"], task["channels_last"]
    pair = mode in MP_MODES or mode in ("ddp", DP_MP_MODE[0])
    if device.type == "cpu":
        torch.set_num_threads(task["threads"])
    images, labels = synthetic_batch(cfg.model, batch, device)
    link = None
    if mode in MP_MODES:
        link = PeerLink(rank, 1 - rank, None, timeout_s=600)
        model = build_column(cfg.model, rank, link, SEED, device, overlap=mode == "mp-overlap", amp=amp,
                             channels_last=channels_last)
    elif mode == DP_MP_MODE[0]:  # ranks 2i, 2i+1: pair i; each pair half the global batch
        column, replica = rank % 2, rank // 2
        mp_groups, dp_groups = dp_mp_groups()
        link = PeerLink(column, rank ^ 1, mp_groups[replica], timeout_s=600)
        model = build_column(cfg.model, column, link, SEED, device, overlap=True, amp=amp,
                             channels_last=channels_last)
        images, labels = images.chunk(2)[replica], labels.chunk(2)[replica]
    else:
        model = build_reference(cfg.model, SEED, device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
    model.set_dropout_generator(dropout_generator(SEED, device))
    clock = CudaClock() if device.type == "cuda" else HostClock()
    meter = None  # the data-parallel gradient all-reduce, where there is one
    if mode == DP_MP_MODE[0]:
        model = torch.nn.parallel.DistributedDataParallel(model, process_group=dp_groups[column])
        meter = AllReduceMeter(model, dp_groups[column], clock)
        gradient_bytes = 4 * column_params(cfg.model, column)  # fp32 gradients, counted from the config
    optimizer = torch.optim.SGD(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                                momentum=cfg.train.momentum, fused=True)
    if mode == "ddp":  # each process half of the batch, gradients all-reduced
        images, labels = images.chunk(2)[rank], labels.chunk(2)[rank]
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        meter = AllReduceMeter(model, None, clock)
        gradient_bytes = 4 * param_count(cfg.model)
    reference_model = mode not in (*MP_MODES, DP_MP_MODE[0])  # the columns cast and reformat themselves
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16" and reference_model)

    def step():
        x, y = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if channels_last and reference_model:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    memory = PeakMemory(device)
    memory.start()
    for _ in range(task["warmup"]):
        step()
    sync()
    if pair:
        dist.barrier()  # both processes start the clock together
    if link is not None:
        link.stats.reset()
    if meter is not None:
        meter.take()
    times, allreduce = [], []
    for _ in range(task["steps"]):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
        if meter is not None:
            buckets = meter.take()
            allreduce.append(allreduce_spans(buckets, clock, buckets[0][0]))
    peak, above_idle = memory.peak()
    out = {"times": times, "peak_mib": peak, "above_idle_mib": above_idle}
    if meter is not None:  # exposed: from the last bucket's launch (every gradient computed) to the last result
        out.update(allreduce_seconds=sum(a["last_ready"] - a["last_launch"] for a in allreduce),
                   allreduce_bytes=sum(a["bytes"] for a in allreduce) / len(allreduce),
                   allreduce_analytic=gradient_bytes, allreduce_buckets=allreduce[-1]["buckets"])
    if link is not None:
        element_size = 2 if amp == "bf16" else 4
        pair_batch = batch // 2 if mode == DP_MP_MODE[0] else batch
        analytic = analytic_bytes(cfg.model, pair_batch, rank % 2, element_size).values()
        steps = task["steps"]
        # On CUDA an exchange only orders streams and never holds the host up: no host time to report.
        out.update(comm_seconds=sum(link.stats.seconds.values()) if device.type == "cpu" else None,
                   sent=sum(v["sent"] for v in link.stats.bytes.values()) / steps,
                   recv=sum(v["recv"] for v in link.stats.bytes.values()) / steps,
                   analytic_sent=sum(v["sent"] for v in analytic), analytic_recv=sum(v["recv"] for v in analytic),
                   comm=link.stats.as_dict())
    if device.type == "cpu":
        torch.set_num_threads(1)
    return out


def matmul_task(task: dict, rank: int, device: torch.device) -> dict:
    """FLOP/s of a large fp32 (or bf16 with amp) matrix multiply, for `seconds`."""
    if device.type == "cpu":
        torch.set_num_threads(task["threads"])
    n = task["n"]
    dtype = torch.bfloat16 if task["amp"] == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)
    if task["processes"] == 2:
        dist.barrier()  # both multiply at once: the two-process peak
    count, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        count += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if elapsed >= task["seconds"]:
            break
    if device.type == "cpu":
        torch.set_num_threads(1)
    return {"flops_per_s": 2 * n ** 3 * count / elapsed}


def sweep_task(task: dict, rank: int, device: torch.device) -> dict:
    """Time per exchange through the link, both directions at once, per size."""
    link = PeerLink(rank, 1 - rank, None, timeout_s=600)
    out = []
    size = 4 * KiB
    while size <= task["max_bytes"]:
        send = torch.ones(size // 4, device=device)
        iters = max(3, min(task["iters"], (256 * MiB) // size))
        for _ in range(2):
            link.exchange(send, send.shape, send, "p2p", "sweep")
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            link.exchange(send, send.shape, send, "p2p", "sweep")
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / iters
        out.append({"bytes": size, "seconds": seconds, "gbps": size / seconds / 1e9})
        size *= 4
    return {"p2p": out}


TASKS = {"train": train_task, "matmul": matmul_task, "sweep": sweep_task}


def worker(rank: int, port: int, device_type: str, tasks, results, world_size: int = 2) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=900),
                            **({"device_id": device} if device.type == "cuda" else {}))
    while (task := tasks.get()) is not None:
        try:
            results.put((rank, "ok", TASKS[task["kind"]](task, rank, device)))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))
            break
    dist.destroy_process_group()


class Workers:
    """Long-lived worker processes (two, or four for the 2 x 2 mode) and a way to hand them tasks."""

    def __init__(self, device_type: str, count: int = 2):
        ctx = mp.get_context("spawn")
        self.tasks = [ctx.Queue() for _ in range(count)]
        self.results = ctx.Queue()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.procs = [ctx.Process(target=worker, args=(r, port, device_type, self.tasks[r], self.results, count),
                                  daemon=True) for r in range(count)]
        for p in self.procs:
            p.start()

    def run(self, task: dict, ranks=(0, 1), timeout: float = 1800) -> list[dict]:
        for r in ranks:
            self.tasks[r].put(task)
        out = {}
        while len(out) < len(ranks):
            try:
                rank, status, value = self.results.get(timeout=timeout)
            except queue.Empty:
                raise RuntimeError(f"bench: task {task['kind']} {task.get('mode', '')} got no answer "
                                   f"in {timeout:.0f} s") from None
            if status == "error":
                raise RuntimeError(f"bench: rank {rank} failed in {task['kind']} {task.get('mode', '')}:\n{value}")
            out[rank] = value
        return [out[r] for r in ranks]

    def close(self) -> None:
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


# ------------------------------------------------------------------ the run


def machine_name(device_type: str) -> str:
    info = machine_info(torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu"))
    if device_type == "cuda":
        name = f"{info['gpu']}x{torch.cuda.device_count()}"
    else:
        name = f"{info['cpu']}-{info['cores']}c"
    name = re.sub(r"\((r|tm)\)|\bcpu\b|@.*?ghz", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def modes_for(device_type: str) -> tuple[tuple[str, int, int, int], ...]:
    """(mode, processes, threads per process, units) for this machine."""
    if device_type == "cuda":
        return (("single", 1, 1, 1), ("mp", 2, 1, 2), ("mp-overlap", 2, 1, 2), ("ddp", 2, 1, 2))
    cores = os.cpu_count() or 1
    return (("single-1t", 1, 1, 1), ("single-all", 1, cores, cores), ("mp", 2, 1, 2),
            ("mp-overlap", 2, 1, 2), ("ddp", 2, 1, 2))


def measure(args, preset: dict, cfg, device_type: str, say=print) -> dict:
    modes = [m for m in modes_for(device_type) if not args.modes or m[0] in args.modes]
    common = {"amp": args.amp, "channels_last": args.channels_last}
    cores = os.cpu_count() or 1
    peaks = {"1 process x 1 thread": ((0,), 1), f"1 process x {cores} threads": ((0,), cores),
             "2 processes x 1 thread": ((0, 1), 1)}
    if device_type == "cuda":
        peaks = {"1 GPU": ((0,), 1), "2 GPUs": ((0, 1), 1)}
    peak_rates = {name: [] for name in peaks}
    raw = {(m[0], b): {"mode": m[0], "processes": m[1], "threads": m[2], "units": m[3], "repeats": []}
           for m in modes for b in args.batches}
    workers = Workers(device_type)
    try:
        say("bench: point-to-point sweep")
        p2p = workers.run({"kind": "sweep", "max_bytes": preset["sweep_max"],
                           "iters": preset["sweep_iters"]})[0]["p2p"]
        for r in range(args.repeats):
            for name, (ranks, threads) in peaks.items():
                rates = workers.run({"kind": "matmul", "n": preset["matmul_n"], "seconds": preset["matmul_s"],
                                     "threads": threads, "processes": len(ranks), **common}, ranks)
                peak_rates[name].append(sum(x["flops_per_s"] for x in rates))
            for batch in args.batches:
                for i in range(len(modes)):
                    mode, processes, threads, _ = modes[(i + r) % len(modes)]  # rotated every repeat
                    task = {"kind": "train", "mode": mode, "batch": batch, "threads": threads,
                            "warmup": args.warmup, "steps": args.steps, "config": cfg.to_dict(), **common}
                    started = time.perf_counter()
                    raw[(mode, batch)]["repeats"].append(workers.run(task, (0, 1)[:processes]))
                    say(f"bench: repeat {r + 1}/{args.repeats} batch {batch} {mode}: "
                        f"{time.perf_counter() - started:.1f} s")
    finally:
        workers.close()
    if device_type == "cpu" and (not args.modes or DP_MP_MODE[0] in args.modes):
        mode, processes, threads, units = DP_MP_MODE
        units = min(units, os.cpu_count() or units)  # 4 processes on 2 cores use 2 cores
        workers = Workers(device_type, count=processes)
        try:
            for r in range(args.repeats):
                for batch in args.batches:
                    task = {"kind": "train", "mode": mode, "batch": batch, "threads": threads,
                            "warmup": args.warmup, "steps": args.steps, "config": cfg.to_dict(), **common}
                    cell = raw.setdefault((mode, batch), {"mode": mode, "processes": processes, "threads": threads,
                                                          "units": units, "repeats": []})
                    started = time.perf_counter()
                    cell["repeats"].append(workers.run(task, tuple(range(processes))))
                    say(f"bench: repeat {r + 1}/{args.repeats} batch {batch} {mode}: "
                        f"{time.perf_counter() - started:.1f} s")
        finally:
            workers.close()
    return {"raw": raw, "p2p": p2p, "peak_rates": peak_rates, "peaks": peaks}


def assemble(args, preset_name: str, preset: dict, cfg, device_type: str, measured: dict) -> dict:
    """The result document: settings, cells, ratios, targets."""
    peaks = {name: {"per_repeat": rates, "peak": max(rates)} for name, rates in measured["peak_rates"].items()}
    names = list(peaks)
    flops_per_image = 6 * forward_macs(cfg.model)
    cells = []
    for (mode, batch), raw in measured["raw"].items():
        if raw["processes"] >= 2:
            peak = peaks[names[-1]]["peak"]
        else:
            peak = peaks[names[0] if raw["threads"] == 1 else names[1]]["peak"]
        cells.append(report.summarise_run(raw, batch, flops_per_image, peak))
    single = CUDA_SINGLE if device_type == "cuda" else CPU_SINGLE
    report.add_relative(cells, single, single[0])
    mp_mode = "mp-overlap" if DistConfig().overlap else "mp"
    ratios = report.compute_ratios(cells, mp_mode, single)
    now = datetime.datetime.now()
    return {
        "schema": 1,
        "machine": args.machine or machine_name(device_type),
        "date": now.strftime("%Y-%m-%d"),
        "created": now.isoformat(timespec="seconds"),
        "preset": preset_name,
        "description": preset["description"],
        "command": " ".join(["benchmarks/bench.py", *sys.argv[1:]]),
        "device": device_type,
        "backend": "nccl" if device_type == "cuda" else "gloo",
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": cfg.to_dict()["model"],
        "forward_macs_per_image": forward_macs(cfg.model),
        "params": param_count(cfg.model),
        "settings": {"batches": list(args.batches), "repeats": args.repeats, "warmup": args.warmup,
                     "steps": args.steps, "amp": args.amp, "channels_last": args.channels_last,
                     "matmul_n": preset["matmul_n"], "overlap_default": DistConfig().overlap},
        "ratios": ratios,
        "ratio_basis": report.ratio_basis(cells, mp_mode),
        "targets": report.check_targets(ratios),
        "matmul_peak": peaks,
        "p2p": measured["p2p"],
        "runs": sorted(cells, key=lambda c: (c["batch"], [m[0] for m in (*modes_for(device_type), DP_MP_MODE)]
                                                      .index(c["mode"]))),
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the 2-CPU-core preset (make bench)")
    size.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests)")
    parser.add_argument("--batches", type=lambda s: tuple(int(b) for b in s.split(",")), help="e.g. 32,128")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--steps", type=int, help="timed steps per repeat")
    parser.add_argument("--modes", type=lambda s: tuple(s.split(",")),
                        help="a subset of the modes, e.g. mp,mp-overlap (ratios needing others are left out)")
    parser.add_argument("--amp", choices=("off", "bf16"), default="off", help="bf16 autocast in every mode")
    parser.add_argument("--channels-last", action="store_true", help="NHWC in every mode")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="results folder")
    parser.add_argument("--machine", help="name in the file names (default: from the CPU or GPU model)")
    parser.add_argument("overrides", nargs="*", help="model.* key=value on top of the preset")
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    preset_name = "tiny" if args.tiny else "quick" if args.quick else "full"
    preset = PRESETS[preset_name]
    for key, default in (("batches", preset.get("batches", (32, 128))), ("repeats", preset["repeats"]),
                         ("warmup", preset["warmup"]), ("steps", preset["steps"])):
        if getattr(args, key) is None:
            setattr(args, key, default)
    cfg = build_config(overrides=[*preset["overrides"], *args.overrides])
    device_type = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and torch.cuda.device_count() < 2:
        print("error: the two-process modes need two GPUs; use --device cpu", file=sys.stderr)
        return 2
    started, load_before = time.perf_counter(), os.getloadavg()
    measured = measure(args, preset, cfg, device_type)
    result = assemble(args, preset_name, preset, cfg, device_type, measured)
    # Other work on the machine shows up as spread: say how busy it was.
    result["load_average"] = {"before": load_before, "after": os.getloadavg()}
    result["seconds"] = time.perf_counter() - started
    paths = report.write(result, Path(args.out))
    print(report.render_markdown(result))
    print(f"bench: {result['seconds']:.0f} s; wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
