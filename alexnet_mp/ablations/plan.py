"""The paper's comparisons as training runs: the two arms of each (config overrides), and the seeds.

Each comparison sets the paper's choice against the alternative it was measured against. Arms are
shared between comparisons (the baseline is every comparison's paper arm but one), so a plan trains
each distinct arm once per seed.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class PlanError(ValueError):
    """The comparisons or seeds asked for do not make a plan."""


@dataclass(frozen=True)
class Arm:
    name: str  # used in run folder names: letters, digits and dashes
    overrides: tuple[str, ...] = ()  # key=value over the base config


@dataclass(frozen=True)
class Comparison:
    key: str  # the name --only takes
    title: str
    measure: str  # "speed": steps to a training error; "error": validation error; "overfitting": the gap
    paper: Arm  # the paper's choice
    other: Arm  # what the paper compared it with
    claim: str  # the paper's finding, in words
    claimed: dict = field(default_factory=dict)  # its numbers: speedup, or error changes in points
    setup: str = ""  # where this comparison's runs differ from the baseline, and why


BASELINE = Arm("baseline")
NO_DROPOUT = Arm("no-dropout", ("model.dropout=0",))

COMPARISONS = (
    Comparison("activation", "ReLU vs tanh", "speed", NO_DROPOUT,
               Arm("tanh-no-dropout", ("model.dropout=0", "model.activation=tanh")),
               "a four-layer CNN on CIFAR-10 reached 25% training error six times faster with ReLUs "
               "than with tanh (section 3.1, figure 1)", {"speedup": 6.0},
               "both arms without dropout: the paper's CIFAR-10 network had no regularisation"),
    Comparison("lrn", "LRN on vs off", "error", BASELINE, Arm("no-lrn", ("model.lrn.enabled=false",)),
               "response normalisation reduces top-1 and top-5 error by 1.4 and 1.2 points (section 3.3)",
               {"top1": -1.4, "top5": -1.2}),
    Comparison("pool", "overlapping vs plain pooling", "error", BASELINE, Arm("plain-pool", ("model.pool=plain",)),
               "3x3 stride-2 pooling instead of 2x2 stride 2 reduces top-1 and top-5 error by 0.4 and "
               "0.3 points (section 3.4)", {"top1": -0.4, "top5": -0.3}),
    Comparison("dropout", "dropout on vs off", "overfitting", BASELINE, NO_DROPOUT,
               "without dropout the network overfits substantially; dropout roughly doubles the "
               "iterations needed to converge (section 4.2)"),
    Comparison("pca", "PCA lighting on vs off", "error", BASELINE, Arm("no-pca", ("data.pca_lighting=0",)),
               "PCA colour augmentation reduces top-1 error by over 1 point (section 4.1)", {"top1": -1.0}),
    Comparison("columns", "two columns vs one with half the kernels", "error", BASELINE,
               Arm("one-column", ("model.columns=1",)),
               "two columns on two GPUs reduce top-1 and top-5 error by 1.7 and 1.2 points against one "
               "column with half the kernels (section 3.2)", {"top1": -1.7, "top5": -1.2}),
)
KEYS = tuple(c.key for c in COMPARISONS)


@dataclass(frozen=True)
class RunSpec:
    """One training run: an arm under one seed."""

    arm: Arm
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arm.name}-seed{self.seed}"

    def overrides(self) -> tuple[str, ...]:
        return (*self.arm.overrides, f"train.seed={self.seed}")


def select(keys: list[str] | None) -> list[Comparison]:
    """The comparisons named in `keys` (all when None or empty), in the paper's order."""
    if not keys:
        return list(COMPARISONS)
    unknown = [k for k in keys if k not in KEYS]
    if unknown:
        raise PlanError(f"unknown comparison {', '.join(unknown)}; choose from {', '.join(KEYS)}")
    return [c for c in COMPARISONS if c.key in keys]


def arms_of(comparisons: list[Comparison]) -> list[Arm]:
    """Every distinct arm the comparisons need, first use first."""
    out: list[Arm] = []
    for c in comparisons:
        for arm in (c.paper, c.other):
            if arm not in out:
                out.append(arm)
    return out


def plan_runs(comparisons: list[Comparison], seeds: list[int]) -> list[RunSpec]:
    """Each distinct arm once per seed, seed by seed (the first seed's set completes first)."""
    if len(seeds) < 1 or len(set(seeds)) != len(seeds):
        raise PlanError(f"give distinct seeds, at least one (two or more for a spread), got {seeds}")
    return [RunSpec(arm, seed) for seed in seeds for arm in arms_of(comparisons)]
