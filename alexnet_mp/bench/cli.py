"""python -m alexnet_mp.bench: the command, from the arguments to the result files."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..config import ConfigError
from ..files import StorageError
from ..spawn import SpawnError
from ..summary import forward_macs, param_count
from . import calibrate, runner
from .figures import Figures
from .gpu import gpu_note
from .loader import measure_loader
from .modes import cpu_modes, gpu_modes, peak_configs
from .presets import PRESETS, bench_config
from .report import assemble, render_markdown, write
from .stats import drift_verdict, load_verdict, wrong_side_verdict

RESULTS = Path("benchmarks") / "results"
POOL_TIMEOUT_S = 1800.0


class BenchError(RuntimeError):
    """The benchmark cannot run as asked; the message says what to do."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m alexnet_mp.bench",
                                description="The model-parallel pair against every other way to train the same "
                                            "network here, with paired statistics; writes RESULTS/<machine>-<date>"
                                            ".json and .md.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the 2-core CPU preset (make bench)")
    size.add_argument("--tiny", action="store_true", help="a toy run for the tests; the numbers mean nothing")
    size.add_argument("--gpu", action="store_true", help="the GPU preset (the default where CUDA is available)")
    p.add_argument("--out", default=str(RESULTS), help=f"results folder (default {RESULTS})")
    p.add_argument("--machine", help="name in the file names (default: from the CPU or GPU model)")
    p.add_argument("--modes", type=lambda s: tuple(s.split(",")), help="only these modes, e.g. single-1t,mp "
                   "(figures needing others are left out)")
    p.add_argument("--repeats", type=int, help="exactly this many repeats (instead of the stopping rule)")
    p.add_argument("--cap-s", type=float, help="time cap of the repeats in seconds (default: the preset's)")
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                   help="bf16 rows on CPU: auto runs them where the CPU has bf16 matrix units")
    p.add_argument("--no-loader", action="store_true", help="leave the loader section out")
    p.add_argument("overrides", nargs="*", help="config key=value on top of the preset, e.g. model.crop_size=99")
    return p.parse_intermixed_args(argv)


def choose_preset(args):
    cuda = torch.cuda.is_available()
    name = "tiny" if args.tiny else "quick" if args.quick else "gpu" if args.gpu or cuda else "quick"
    if name == "gpu" and not cuda:
        raise BenchError("--gpu needs CUDA, which this machine does not have; run --quick for the CPU preset")
    preset = PRESETS[name]
    if args.repeats is not None:
        if args.repeats < 1:
            raise BenchError(f"--repeats {args.repeats} must be at least 1")
        preset = dataclasses.replace(preset, min_repeats=args.repeats, max_repeats=args.repeats)
    if args.cap_s is not None:
        preset = dataclasses.replace(preset, cap_s=args.cap_s)
    return preset


def choose_modes(args, preset, cores: int, gpus: int) -> tuple[list, dict]:
    """(modes, bf16 {run, note}) for this machine and the arguments."""
    if preset.gpu:
        modes, bf16 = gpu_modes(gpus), {"run": True, "note": "the GPU preset runs every mode in bf16"}
    else:
        units, note = calibrate.bf16_support()
        run = args.bf16 == "on" or (args.bf16 == "auto" and units)
        if args.bf16 == "on" and not units:
            note = "bf16 rows run because --bf16 on was given; " + note.replace("bf16 rows not run: ", "")
        elif args.bf16 == "off":
            run, note = False, "bf16 rows not run: --bf16 off"
        modes, bf16 = cpu_modes(cores, run), {"run": run, "note": note}
    if args.modes:
        known = {m.name for m in modes}
        unknown = sorted(set(args.modes) - known)
        if unknown:
            raise BenchError(f"--modes {','.join(unknown)}: not a mode here; choose from {', '.join(sorted(known))}")
        modes = [m for m in modes if m.name in args.modes]
    return modes, bf16


def measure(args, preset, cfg, modes, cores: int, say) -> dict:
    """Everything measured: the loader, the repeats, the machine's state around them."""
    state = {"load_before": os.getloadavg()[0]}
    state["calibration_before"] = calibrate.calibration_rate(preset.calibration_s)
    loader, peaks = None, peak_configs(modes, cores, preset.gpu)
    pools = runner.Pools(runner.pool_names(modes, peaks), cfg.to_dict(), cfg.dist.device, cores, POOL_TIMEOUT_S)
    try:
        if not (args.no_loader or preset.gpu):
            work = Path(tempfile.mkdtemp(prefix="alexnet-bench-loader-"))
            loader = measure_loader(work, preset.loader, preset.loader.get("workers") or cores, POOL_TIMEOUT_S,
                                    say, pools.get("pair"))
        flops = runner.prepare_round(pools, modes, preset)
        meter = calibrate.LoadMeter(pools.pids())

        def figures_of(repeats):
            return Figures(repeats, flops, modes, preset.batches, cfg.model, cfg.dist.amp).ratio_estimates()
        raw = runner.run_repeats(pools, modes, peaks, preset, figures_of)
        state["foreign_cores"] = meter.foreign_cores()
    finally:
        pools.close()
    state.update(load_after=os.getloadavg()[0], calibration_after=calibrate.calibration_rate(preset.calibration_s))
    return {"raw": raw, "flops": flops, "loader": loader, "state": state}


def verdicts(figures: Figures, state: dict, cores: int) -> tuple:
    """(inconclusive reasons or False, warnings): calibration drift, other programs' load, and figures
    on the wrong side."""
    drift, reason = drift_verdict(state["calibration_before"] / 1e9, state["calibration_after"] / 1e9,
                                  unit=" GFLOP/s")
    state["calibration_drift"] = drift
    headline, warnings = figures.headline(), []
    checks = (("profiler_overhead", 0.0, "profiling made the steps faster"),
              ("comm_overhead", 0.0, "the exchanges made the steps faster than no exchanges"))
    for key, floor, what in checks:
        if key in headline:
            message = wrong_side_verdict(key, headline[key], floor, what)
            if message:
                warnings.append(message)
    reasons = [r for r in (reason, load_verdict(state.get("foreign_cores"), cores), *warnings) if r]
    return ("; ".join(reasons) if reasons else False), warnings


def describe(args, preset, cfg, measured: dict, bf16: dict, cores: int, gpus: int) -> dict:
    """The run's settings and circumstances, for the results' top level."""
    gpu, now, raw = preset.gpu, datetime.datetime.now(), measured["raw"]
    return {
        "machine": args.machine or calibrate.machine_name(gpu), "date": now.strftime("%Y-%m-%d"),
        "created": now.isoformat(timespec="seconds"), "preset": preset.name, "description": preset.description,
        "command": " ".join(["python -m alexnet_mp.bench", *(getattr(args, "argv", None) or [])]), "gpu": gpu,
        "device": "cuda" if gpu else "cpu", "backend": "nccl" if gpu else "gloo", "cores": cores, "gpus": gpus,
        "torch": torch.__version__, "python": platform.python_version(), "model": cfg.to_dict()["model"],
        "forward_macs_per_image": forward_macs(cfg.model), "params": param_count(cfg.model),
        "settings": {"batches": list(preset.batches), "warmup": preset.warmup, "steps": preset.steps,
                     "repeats": len(raw["repeats"]), "min_repeats": preset.min_repeats,
                     "max_repeats": preset.max_repeats, "cap_s": preset.cap_s, "stop_reason": raw["stop_reason"],
                     "amp": cfg.dist.amp, "channels_last": cfg.dist.channels_last, "overlap": cfg.dist.overlap,
                     "peak_kernels": preset.peak, "peak_s": preset.peak_s},
        "machine_state": measured["state"], "bf16": bf16, "gpu_note": gpu_note(gpus) if gpu else None,
    }


def run(args, say=runner.say) -> tuple[dict, dict]:
    """Measure, assemble and write; (result, paths)."""
    started = time.perf_counter()
    preset = choose_preset(args)
    cores, gpus = runner.cores(), torch.cuda.device_count() if torch.cuda.is_available() else 0
    cfg = bench_config(preset, args.overrides, "cuda" if preset.gpu else "cpu")
    modes, bf16 = choose_modes(args, preset, cores, gpus)
    torch.set_num_threads(1)  # the coordinator only calibrates and loads; the workers compute
    measured = measure(args, preset, cfg, modes, cores, say)
    figures = Figures(measured["raw"]["repeats"], measured["flops"], modes, preset.batches, cfg.model, cfg.dist.amp)
    inconclusive, warnings = verdicts(figures, measured["state"], cores)
    info = describe(args, preset, cfg, measured, bf16, cores, gpus)
    info.update(inconclusive=inconclusive, warnings=warnings, seconds=time.perf_counter() - started)
    result = assemble(info, figures, measured["loader"], cfg.model.crop_size)
    return result, write(result, Path(args.out))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    try:
        result, paths = run(args)
    except (BenchError, ConfigError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SpawnError as e:
        print(f"error: a benchmark worker failed; its traceback follows. {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; no results were written", file=sys.stderr)
        return 130
    print(render_markdown(result))
    if result["inconclusive"]:
        print(f"bench: INCONCLUSIVE: {result['inconclusive']}", file=sys.stderr)
    print(f"bench: {result['seconds']:.0f} s; wrote {paths['json']} and {paths['md']}", file=sys.stderr)
    return 0
