"""python -m alexnet_mp.gpu_check: the GPU path checked on this machine, in at most --budget seconds.

Prints one line per check, ``CHECK name: PASS|FAIL|INFO detail``, and writes every result and figure,
with the machine, its GPUs, the driver and the software versions, to --out (gpu-check.json). Each
check runs in processes of its own under a time budget, so a failing or hanging check never stops
the others. Without CUDA it says so and exits 0. It installs nothing and needs no network: any
Python that has torch, torchvision and this package's dependencies runs it
(``make gpu-check PY=python3``). Exit status: 0 when no check failed, 1 otherwise, 2 for bad
arguments. docs/gpu.md describes every check.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .files import StorageError
from .gpucheck.report import CheckResult, build_report, environment, exit_status, write_report

DEFAULT_BUDGET_S = 480.0  # the whole run, on one node


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m alexnet_mp.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-check.json", help="where the JSON report goes (gpu-check.json)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds for all checks together ({DEFAULT_BUDGET_S:.0f}); checks left when it runs out FAIL")
    p.add_argument("--only", default="", help="comma-separated check names to run (see --list)")
    p.add_argument("--list", action="store_true", help="list the checks and exit")
    return p


def _environment_line(env: dict) -> CheckResult:
    v, gpus = env["versions"], env["gpus"]
    names = sorted({g["name"] for g in gpus})
    return CheckResult("environment", "INFO",
                       f"{len(gpus)} x {', '.join(names) or 'no GPU'}, driver {env['driver']}, torch {v['torch']}, "
                       f"CUDA {v['cuda']}, cuDNN {v['cudnn']}, NCCL {v['nccl']}")


def _no_cuda() -> CheckResult:
    built = ("built without CUDA" if torch.version.cuda is None
             else f"built for CUDA {torch.version.cuda}, but no GPU or driver is usable")
    return CheckResult("cuda", "INFO", f"CUDA is not available here (torch {torch.__version__}, {built}); "
                                       f"nothing to check")


def _select(checks: list, only: str) -> list:
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in {c.name for c in checks}]
    if unknown:
        raise ValueError(f"unknown check {', '.join(unknown)}; --list shows the names")
    return [c for c in checks if not wanted or c.name in wanted]


def _run_checks(only: str, budget_s: float) -> list[CheckResult]:
    from .gpucheck.plan import all_checks  # the checks import the trainer: only when there is a GPU
    from .gpucheck.runner import run_all

    checks = _select(all_checks(), only)
    count = torch.cuda.device_count()
    results = run_all([c for c in checks if c.gpus <= count], budget_s)
    for c in checks:
        if c.gpus > count:
            results.append(CheckResult(c.name, "INFO", f"not run: needs {c.gpus} GPUs, this machine has {count}"))
            print(results[-1].line(), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        from .gpucheck.plan import all_checks

        for c in all_checks():
            print(f"{c.name:<26} {c.gpus} GPU(s), up to {c.budget_s:.0f} s: {c.about}")
        return 0
    if args.budget <= 0:
        print(f"error: --budget {args.budget:g} must be a positive number of seconds", file=sys.stderr)
        return 2
    start = time.monotonic()
    env = environment()
    head = _environment_line(env) if torch.cuda.is_available() else _no_cuda()
    print(head.line(), flush=True)
    results = [head]
    if torch.cuda.is_available():
        try:
            results += _run_checks(args.only, args.budget)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    command = " ".join(["python -m alexnet_mp.gpu_check", *(argv if argv is not None else sys.argv[1:])])
    try:
        path = write_report(build_report(results, env, args.budget, time.monotonic() - start, command), args.out)
    except StorageError as e:
        print(f"error: the report was not written: {e}", file=sys.stderr)
        return 1
    print(f"results: {path}", flush=True)
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
