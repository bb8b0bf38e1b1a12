"""The benchmark's statistics: paired ratios, bootstrap intervals, the stopping rule, verdicts.

Every headline figure is a ratio of two modes measured in the same repeat (the modes are
interleaved, so slow spells of the machine hit both). Its value is the median of the
per-repeat ratios, its interval a percentile bootstrap of that median over the repeats.
Nothing here measures; the tests feed it made-up numbers.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95  # the intervals' coverage
RESAMPLES = 4000
TARGET_HALF_WIDTH = 0.05  # repeats go on until every stopping figure's half-width is below this (relative)
DRIFT_LIMIT = 0.10  # calibration drift beyond this marks a run inconclusive
FOREIGN_LIMIT = 0.10  # other programs' CPU use beyond this share of the cores marks a run inconclusive


@dataclass(frozen=True)
class Estimate:
    """A median with its bootstrap interval, over `n` per-repeat values."""

    value: float
    lower: float
    upper: float
    n: int

    @property
    def half_width(self) -> float:
        """Half the interval's width relative to the value (inf when the value is 0)."""
        return (self.upper - self.lower) / 2 / abs(self.value) if self.value else math.inf

    def map(self, fn, decreasing: bool = False) -> "Estimate":
        """The estimate of fn(x) for a monotone fn (bounds swapped when fn decreases)."""
        lo, hi = fn(self.lower), fn(self.upper)
        return Estimate(fn(self.value), *((hi, lo) if decreasing else (lo, hi)), self.n)

    def as_list(self) -> list[float]:
        return [self.lower, self.upper]


def paired_ratios(numerators, denominators) -> list[float]:
    """Per-repeat ratios a[r] / b[r] of two modes measured in the same repeats."""
    if len(numerators) != len(denominators):
        raise ValueError(f"paired ratios need as many numerators ({len(numerators)}) as denominators "
                         f"({len(denominators)})")
    return [a / b for a, b in zip(numerators, denominators)]


def bootstrap_interval(values, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> tuple:
    """Percentile bootstrap interval of the median (the same draws for the same values)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to take an interval of")
    if x.size == 1:
        return float(x[0]), float(x[0])
    draws = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))
    medians = np.median(x[draws], axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(medians, tail)), float(np.percentile(medians, 100 - tail))


def estimate(values) -> Estimate:
    """The median of per-repeat values and its bootstrap interval."""
    values = list(values)
    lower, upper = bootstrap_interval(values)
    return Estimate(float(statistics.median(values)), lower, upper, len(values))


def stop_verdict(estimates: dict, repeats: int, min_repeats: int, max_repeats: int, elapsed_s: float,
                 cap_s: float, next_repeat_s: float = 0.0, target: float = TARGET_HALF_WIDTH) -> tuple:
    """(stop, reason): stop once every estimate's half-width is under `target`, or at the caps.

    The time cap counts the next repeat in: a run stops when that repeat would end past it.
    """
    widest = max(estimates.items(), key=lambda kv: kv[1].half_width) if estimates else None
    if repeats < min_repeats:
        return False, f"{repeats} of at least {min_repeats} repeats"
    if widest is None or widest[1].half_width < target:
        return True, f"every interval's half-width is under {target:.0%} after {repeats} repeats"
    if repeats >= max_repeats:
        return True, (f"{max_repeats} repeats reached with {widest[0]}'s half-width at "
                      f"{widest[1].half_width:.1%} (target {target:.0%})")
    if elapsed_s + next_repeat_s > cap_s:
        return True, (f"time cap of {cap_s:.0f} s reached after {repeats} repeats with {widest[0]}'s "
                      f"half-width at {widest[1].half_width:.1%} (target {target:.0%})")
    return False, f"{widest[0]}'s half-width is {widest[1].half_width:.1%} (target {target:.0%})"


def sig2(x: float | None) -> str:
    """x to two significant figures: 1.94 -> 1.9, 0.0473 -> 0.047, 123 -> 120, 0.999 -> 1.0."""
    if x is None:
        return "-"
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    digits = 1 - math.floor(math.log10(abs(x)))  # negative: round to tens, hundreds, ...
    rounded = round(x, digits)
    if math.floor(math.log10(abs(rounded))) > math.floor(math.log10(abs(x))):
        digits -= 1  # 0.999 rounds up to 1.0, not 1.00
        rounded = round(x, digits)
    return f"{rounded:.{max(0, digits)}f}"


def format_estimate(e: Estimate | None) -> str:
    """'1.9 [1.8, 2.0]': value and 95% interval, each to two significant figures."""
    if e is None:
        return "not measured"
    return f"{sig2(e.value)} [{sig2(e.lower)}, {sig2(e.upper)}]"


def drift_verdict(before: float, after: float, limit: float = DRIFT_LIMIT, unit: str = "") -> tuple:
    """(drift, reason or None): the calibration rate's relative change over the run; beyond
    `limit` the machine's speed changed while modes were measured, and the run is inconclusive."""
    drift = after / before - 1
    if abs(drift) <= limit:
        return drift, None
    return drift, (f"the calibration rate changed by {drift:+.0%} during the run ({sig2(before)}{unit} before, "
                   f"{sig2(after)}{unit} after; limit {limit:.0%}): the machine's speed was not steady")


def load_verdict(foreign_cores: float | None, cores: int, limit: float = FOREIGN_LIMIT) -> str | None:
    """A reason when other programs used more than `limit` of the cores while the modes ran (the
    modes then competed with them, each in its own way); None on a quiet machine or when unknown."""
    if foreign_cores is None or foreign_cores <= limit * cores:
        return None
    return (f"other programs used {sig2(foreign_cores)} of the {cores} cores while the modes ran (limit "
            f"{limit:.0%}): the figures describe a shared machine")


def wrong_side_verdict(name: str, e: Estimate, floor: float, what: str) -> str | None:
    """A message when the whole interval lies below `floor`, which the method must rule out (e.g. a
    profiler that makes steps faster); None when the interval reaches `floor` or lies above it."""
    if e.upper >= floor:
        return None
    return (f"{name} is {format_estimate(e)}, entirely below {sig2(floor)}: {what}; the measurement method "
            f"is wrong (modes not paired, or disturbed), so the run's figures cannot be trusted")
