"""What profiling in summary mode costs: the profiler attached and detached every few steps of one run.

    python benchmarks/profiler_overhead.py [--blocks 100] [--block-steps 6]

Two processes train the small config's pair (configs/small.yaml) on the built-in
data; every other block of steps runs with the profiler attached (hooks,
timed exchanges), the rest without. Interleaving in one run, rather than two
runs, puts both sides under the same machine noise. Prints, per rank, the
median step time with and without and their ratio, and writes
benchmarks/results/profiler-overhead-<machine>-<date>.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from alexnet_mp import profiler, resilience  # noqa: E402
from alexnet_mp.config import build_config  # noqa: E402
from alexnet_mp.data import build_data, train_loader  # noqa: E402
from alexnet_mp.distributed import setup  # noqa: E402
from alexnet_mp.model import build_column, dropout_generator, param_groups  # noqa: E402
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench import machine_name  # noqa: E402

OVERRIDES = ["dist.device=cpu", "dist.threads=1", "data.train_size=640", "data.val_size=32",
             "data.num_workers=0", "profile.enabled=true", "profile.skip_steps=0"]


def worker(rank: int, port: int, blocks: int, block_steps: int, out_dir: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    cfg = build_config(ROOT / "configs" / "small.yaml", OVERRIDES)
    layout = setup(cfg.dist)
    data = build_data(cfg)
    link = layout.link(600)
    model = build_column(cfg.model, layout.column, link, cfg.train.seed, layout.device, overlap=cfg.dist.overlap)
    model.set_dropout_generator(dropout_generator(cfg.train.seed, layout.device))
    opt = torch.optim.SGD(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                          momentum=cfg.train.momentum, fused=True)
    batches = itertools.chain.from_iterable(train_loader(data, cfg, e) for e in itertools.count())
    times = {"on": [], "off": []}
    for block in range(blocks):
        on = block % 2 == 1
        prof = profiler.Profiler(cfg, layout) if on else profiler.NullProfiler()
        if on:
            prof.attach(model, link, opt, out_dir)
        tick = time.perf_counter()
        for i, (images, labels) in enumerate(prof.batches(batches)):
            loss = F.cross_entropy(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            resilience.step_verdict(loss, model, torch.device("cpu"), False)  # the trainer's per-step agreement
            opt.step()
            prof.step_end()
            now = time.perf_counter()
            if i >= 1:  # the first step of a block pays for switching
                times["on" if on else "off"].append(now - tick)
            tick = now
            if i + 1 >= block_steps:
                break
        if on:
            prof.detach()  # no report: only the cost is measured
    results.put((rank, times))
    dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=100, help="blocks of steps, alternating off/on")
    parser.add_argument("--block-steps", type=int, default=6)
    args = parser.parse_args(argv)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=worker, args=(r, port, args.blocks, args.block_steps, out_dir, results))
                 for r in range(2)]
        for p in procs:
            p.start()
        got = dict(results.get(timeout=1800) for _ in procs)
        for p in procs:
            p.join()
    report = {"machine": machine_name("cpu"), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "config": "configs/small.yaml + " + " ".join(OVERRIDES), "ranks": {}}
    for rank, t in sorted(got.items()):
        off, on = statistics.median(t["off"]), statistics.median(t["on"])
        report["ranks"][rank] = {"steps_off": len(t["off"]), "steps_on": len(t["on"]), "median_off_ms": off * 1e3,
                                 "median_on_ms": on * 1e3, "ratio_on_off": on / off}
        print(f"rank {rank}: median step {off * 1e3:.2f} ms off, {on * 1e3:.2f} ms on "
              f"({len(t['off'])}/{len(t['on'])} steps): on/off {on / off:.4f}")
    worst = max(r["ratio_on_off"] for r in report["ranks"].values())
    report["worst_ratio_on_off"] = worst
    print(f"profiling in summary mode costs {100 * (worst - 1):+.1f}% step time (worst rank; target within 3%)")
    out = ROOT / "benchmarks" / "results" / f"profiler-overhead-{report['machine']}-{report['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
