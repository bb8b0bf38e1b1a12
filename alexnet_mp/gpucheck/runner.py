"""Running the checks: each in processes of its own, under a hard time budget, one failure never
stopping the others.

A check's work runs in fresh processes started by `alexnet_mp.spawn` (torchrun's environment, one
process per rank): a hang (an NCCL wait, a stuck kernel) is ended by killing them when the check's
budget runs out, a crash takes no other check with it, and every check starts from a clean CUDA
context and process group. The parent never needs a GPU itself.
"""
from __future__ import annotations

import sys
import time
import traceback
from contextlib import redirect_stdout
from dataclasses import dataclass
from typing import Callable

from ..spawn import SpawnError, run_ranks
from .report import CheckResult, outcome

MIN_CHECK_S = 20.0  # a check is not started with less than this (or its own budget) left in the whole run


PLUMBING = ("spawn.py", "gpucheck/runner.py")  # frames that only carry a check's work, never its cause


class OutOfTime(RuntimeError):
    """A check's budget ran out before its next process could start."""


class _Quiet:
    """fn with its prints sent to stderr: stdout carries the CHECK lines only."""

    def __init__(self, fn):
        self.fn, self.__name__ = fn, getattr(fn, "__name__", "a check")

    def __call__(self, rank: int, *args):
        with redirect_stdout(sys.stderr):
            return self.fn(rank, *args)


class Budget:
    """The seconds a check may still use, and the way it starts its processes within them."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def spawn(self, fn, ranks: int = 1, args: tuple = (), env: dict | None = None) -> dict:
        """fn(rank, *args) in `ranks` fresh processes; {rank: result}. The processes are killed when
        the budget runs out (SpawnError)."""
        if self.left() < 5:
            raise OutOfTime(f"its {self.seconds:.0f} s budget ran out before {getattr(fn, '__name__', 'a step')}")
        return run_ranks(_Quiet(fn), ranks, args, timeout=self.left(), env=env)


@dataclass(frozen=True)
class Check:
    """A named check: `run(budget)` returns an `outcome`; it needs `gpus` GPUs and at most `budget_s` seconds."""

    name: str
    run: Callable[[Budget], dict]
    budget_s: float
    gpus: int = 1
    about: str = ""  # one line: what it shows


def error_line(text: str) -> str:
    """One line for a failure: a timeout as such, or a traceback's exception line and where in
    alexnet_mp it was raised."""
    lines = [ln for ln in str(text).splitlines() if ln.strip()]
    if not lines:
        return "failed without a message"
    if "did not finish" in lines[0]:
        return f"timed out: {lines[0]}"
    frames = [i for i, ln in enumerate(lines) if ln.startswith("  File ")]
    if not frames:
        return lines[0]
    # The exception line follows the last frame's source line (and any ^^^ markers).
    after = next((ln for ln in lines[frames[-1] + 1:] if not ln.startswith(" ")), lines[-1])
    who = lines[0].split(" failed in ")[0] + ": " if lines[0].startswith("rank ") else ""
    ours = [ln for ln in lines if ln.startswith("  File ") and "/alexnet_mp/" in ln
            and not any(f"/alexnet_mp/{m}" in ln for m in PLUMBING)]
    if ours:
        where = ours[-1].split("/alexnet_mp/", 1)[1].replace('", line ', ":").replace(", in ", " ")
        return f"{who}{after} (at alexnet_mp/{where})"
    return f"{who}{after}"


def run_check(check: Check, until: float, total_s: float) -> CheckResult:
    """Run one check within its budget and what is left before `until`; its result, never an exception."""
    seconds = min(check.budget_s, until - time.monotonic())
    if seconds < min(check.budget_s, MIN_CHECK_S):
        return CheckResult(check.name, "FAIL", f"not run: the {total_s:.0f} s budget of the whole check was spent "
                                               f"(run it alone with --only {check.name})")
    start = time.monotonic()
    try:
        out = check.run(Budget(seconds))
    except SpawnError as e:
        out = outcome("FAIL", error_line(str(e)))
    except Exception:  # the parent's own part of the check
        out = outcome("FAIL", error_line(traceback.format_exc()))
    return CheckResult(check.name, out["status"], out["detail"], time.monotonic() - start, out.get("figures", {}))


def run_all(checks: list[Check], total_s: float, say=None) -> list[CheckResult]:
    """Every check in order, each line printed as it ends; progress on stderr."""
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    until = time.monotonic() + total_s
    results = []
    for i, check in enumerate(checks, 1):
        left = until - time.monotonic()
        say(f"[{i}/{len(checks)}] {check.name}: {check.about} (at most {min(check.budget_s, max(left, 0)):.0f} s)")
        result = run_check(check, until, total_s)
        print(result.line(), flush=True)
        results.append(result)
    return results
