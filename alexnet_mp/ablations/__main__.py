"""python -m alexnet_mp.ablations [--config FILE] [--only a,b] [--seeds 0,1] [key=value ...]

Trains every arm of the paper's comparisons once per seed (single-process runs, --parallel at a time,
one thread each), then writes ablations.md, ablations.json and ablations.png into --out. Without
--config it runs the default set: configs/small.yaml for 8 epochs. Runs finished earlier under the
same config are kept, so an interrupted ablation continues where it stopped.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import ConfigError
from ..files import StorageError
from .measure import load_result, summarise
from .plan import KEYS, PlanError, plan_runs, select
from .report import write_report
from .runner import RUNTIME, AblationError, Job, job_config, run_all, span_minutes

SMALL = Path(__file__).resolve().parents[2] / "configs" / "small.yaml"
# The default set's length on configs/small.yaml: fourteen runs in under 25 minutes on two cores.
DEFAULT_SET = ("train.epochs=8", "train.lr_milestones=[6,7]", "train.milestone_epochs=8")


def machine_name() -> str:
    """The CPU model and core count (and the GPU, when there is one)."""
    import torch
    from ..profiler.machine import machine_info

    info = machine_info(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = f", {info['gpu']}" if info.get("gpu") else ", no GPU"
    return f"{info['cpu']}, {info['cores']} cores{gpu}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m alexnet_mp.ablations", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help=f"base config (default: {SMALL.name} with {' '.join(DEFAULT_SET)})")
    p.add_argument("--only", metavar="A,B", help=f"comparisons to run, of: {','.join(KEYS)} (default: all)")
    p.add_argument("--seeds", default="0,1", metavar="S,S", help="train.seed of each repeat (default: 0,1)")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time, one thread each (default: 2)")
    p.add_argument("--threshold", type=float, default=0.25,
                   help="training error whose steps the activation comparison counts (default: 0.25)")
    p.add_argument("--runs-dir", default="runs/ablations", help="where the run folders go (default: runs/ablations)")
    p.add_argument("--out", help="where the report goes (default: the runs dir)")
    p.add_argument("--machine", help="machine description for the report (default: read from this host)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds one run may take (default: 3600)")
    p.add_argument("--list", action="store_true", help="print the runs and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    return p


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise PlanError(f"--seeds takes whole numbers separated by commas, like 0,1; got {text!r}") from None


def plan(args) -> tuple[list, list, list[str]]:
    """(comparisons, [(spec, job)], the overrides every run gets beyond RUNTIME)."""
    comparisons = select([k.strip() for k in args.only.split(",")] if args.only else None)
    overrides = ([] if args.config else list(DEFAULT_SET)) + list(args.overrides)
    config = args.config or str(SMALL)
    specs = plan_runs(comparisons, _seeds(args.seeds))
    jobs = [(s, Job(s.name, job_config(config, overrides, s.overrides(), args.runs_dir, s.name))) for s in specs]
    return comparisons, jobs, overrides


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        comparisons, jobs, overrides = plan(args)
        if args.list:
            for spec, job in jobs:
                print(f"{job.name}: {' '.join(spec.overrides()) or '(the base config)'}")
            return 0
        run_all([job for _, job in jobs], args.parallel, args.timeout)
        results: dict[str, list] = {}
        for spec, job in jobs:
            results.setdefault(spec.arm.name, []).append(load_result(job.folder, job.name, spec.seed))
        rows = [summarise(c, results[c.paper.name], results[c.other.name], args.threshold) for c in comparisons]
        meta = {"machine": args.machine or machine_name(), "config": str(Path(args.config or SMALL).name),
                "overrides": overrides, "runtime": list(RUNTIME), "seeds": _seeds(args.seeds), "runs": len(jobs),
                "arms": len(results), "parallel": args.parallel, "threshold": args.threshold,
                "wall_minutes": span_minutes([job for _, job in jobs])}
        paths = write_report(args.out or args.runs_dir, comparisons, rows, results, meta, args.threshold)
    except (ConfigError, PlanError, AblationError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, (ConfigError, PlanError)) else 1
    print(Path(paths["md"]).read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
