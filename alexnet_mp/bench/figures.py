"""From the repeats' raw timings to the benchmark's figures: cells, paired ratios, targets.

No measuring here (the tests feed it made-up repeats). Definitions (docs/benchmarks.md):

* a cell is one mode at one global batch; its speed in a repeat is images / (slowest rank's
  seconds per step, barrier to barrier); two-indep counts both runs' images;
* a ratio "A vs B" is speed(A) / speed(B) per repeat; the figure is the median over repeats
  with a bootstrap 95% interval (stats.estimate);
* comm_overhead = 1 - t(no-comm) / t(mp); dp2xmp2_overhead = 1 - speed(2x2) / speed(mp);
  profiler_overhead = t(mp-profiled) / t(mp) - 1;
* best_single_ceiling = 2 / S, S = the best single process's speed over one core's;
* flops_share_of_peak: the step's counted FLOPs per second over the better of the matrix-
  multiply and convolution peaks of the same processes and threads, measured in the same repeat.
"""
from __future__ import annotations

import statistics

from ..summary import analytic_bytes
from .modes import Mode
from .stats import Estimate, estimate

TARGETS = {  # the targets for `make bench` (quick preset, 2-core CPU): (op, bound, [lower bound])
    "mp_vs_one_device": (">=", 1.9, 1.8),
    "mp_vs_two_independent": (">=", 0.95),
    "mp_vs_ddp_b32": (">=", 1.5),
    "comm_overhead": ("<=", 0.05),
    "bytes_measured_vs_analytic": ("==", 1.0),
    "flops_share_of_peak": ("between", 0.4, 1.0),
    "decodes_per_image_per_pair": ("==", 1.0),
    "prepared_vs_folder_per_core": (">=", 5.0),
    "h2d_bytes_per_image": ("==", None),  # 3 x crop x crop, from the config
}


def cell_key(mode: str, batch: int) -> str:
    return f"{mode}@{batch}"


def speeds(repeats: list, mode: Mode, batch: int) -> list[float] | None:
    """Images per second of a cell in each repeat (None when it was not measured)."""
    key = cell_key(mode.name, batch)
    if not repeats or key not in repeats[0]["cells"]:
        return None
    return [batch * mode.runs / r["cells"][key]["seconds"] for r in repeats]


class Figures:
    """The figures of one run: `repeats` (runner.run_repeats), `flops` per cell, the modes."""

    def __init__(self, repeats: list, flops: dict, modes: list[Mode], batches: tuple, model_cfg, amp: str):
        self.repeats, self.flops, self.batches = repeats, flops, tuple(sorted(batches))
        self.modes = {m.name: m for m in modes}
        self.model_cfg, self.amp = model_cfg, amp
        self.small, self.big = self.batches[0], self.batches[-1]
        self.one = "single" if "single" in self.modes else "single-1t"

    def speed(self, name: str, batch: int) -> list[float] | None:
        mode = self.modes.get(name)
        return speeds(self.repeats, mode, batch) if mode else None

    def ratio(self, a: str, b: str, batch: int) -> list[float] | None:
        """speed(a) / speed(b) per repeat."""
        sa, sb = self.speed(a, batch), self.speed(b, batch)
        return [x / y for x, y in zip(sa, sb)] if sa and sb else None

    def best_single(self, batch: int) -> list[float] | None:
        """The faster of single-1t and single-all per repeat (None unless both were measured)."""
        one, every = self.speed(self.one, batch), self.speed("single-all", batch)
        return [max(a, b) for a, b in zip(one, every)] if one and every else None

    def share(self, name: str, batch: int) -> list[float] | None:
        """Achieved FLOP/s over the peak of the mode's configuration, per repeat."""
        mode, sp = self.modes.get(name), self.speed(name, batch)
        if not sp:
            return None
        flops_per_image = self.flops[cell_key(name, batch)] / (batch * mode.runs)
        return [flops_per_image * s / r["peaks"][mode.peak]["peak"] for s, r in zip(sp, self.repeats)]

    def scaling(self, batch: int) -> dict[str, list[float] | None]:
        """The per-repeat series of every scaling and overhead figure at one batch."""
        best, one = self.best_single(batch), self.speed(self.one, batch)
        mp = self.speed("mp", batch)
        return {
            "mp_vs_one_device": self.ratio("mp", self.one, batch),
            "mp_vs_two_independent": self.ratio("mp", "two-indep", batch),
            "mp_vs_best_single": [m / b for m, b in zip(mp, best)] if mp and best else None,
            "best_single_ceiling": [2 * o / b for o, b in zip(one, best)] if one and best else None,
            "mp_vs_ddp": self.ratio("mp", "ddp", batch),
            "comm_ratio": self.ratio("mp", "no-comm", batch),  # t(no-comm) / t(mp)
            "dp2xmp2_ratio": self.ratio("dp2xmp2", "mp", batch),
            "profiler_ratio": self.ratio("mp", "mp-profiled", batch),  # t(profiled) / t(mp)
            "mp_bf16_vs_one_device_bf16": self.ratio("mp-bf16", "single-1t-bf16", batch),
            "flops_share_of_peak": self.share("mp", batch),
        }

    def ratio_estimates(self) -> dict[str, Estimate]:
        """The headline figures as estimates on the ratio scale (what the stopping rule watches)."""
        small, big = self.scaling(self.small), self.scaling(self.big)
        series = {k: small[k] for k in ("mp_vs_one_device", "mp_vs_two_independent", "mp_vs_best_single",
                                         "best_single_ceiling", "comm_ratio", "dp2xmp2_ratio",
                                         "profiler_ratio", "mp_bf16_vs_one_device_bf16")}
        series["mp_vs_ddp_b32"] = small["mp_vs_ddp"]
        series["flops_share_of_peak"] = big["flops_share_of_peak"]
        return {k: estimate(v) for k, v in series.items() if v}

    def headline(self) -> dict[str, Estimate]:
        """The headline figures: ratios as they are, overheads as shares of the step."""
        return dict(as_overhead(key, e) for key, e in self.ratio_estimates().items())

    def bytes_ratio(self) -> float | None:
        """1 + (the bytes by which each rank's sends and receives at each crossing, in every pair cell,
        differ from summary.analytic_bytes) / (the analytic bytes): exactly 1 only when every exchange
        moved exactly what the analytic count says (an over- and an under-count do not cancel)."""
        differ = analytic = 0.0
        element = 2 if self.amp == "bf16" else 4
        for r in self.repeats:
            for key, cell in r["cells"].items():
                name, batch = key.rsplit("@", 1)
                mode = self.modes[name]
                if mode.mp != 2 or mode.kind.startswith("null"):
                    continue
                size = 2 if mode.amp == "bf16" else element
                for rank in cell["ranks"]:
                    expected = analytic_bytes(self.model_cfg, int(batch) // mode.dp, rank["column"], size)
                    for k in set(expected) | set(rank["comm"]):
                        got, want = rank["comm"].get(k, {}), expected.get(k, {})
                        differ += sum(abs(got.get(d, 0) - want.get(d, 0)) for d in ("sent", "recv"))
                        analytic += sum(want.get(d, 0) for d in ("sent", "recv"))
        return 1 + differ / analytic if analytic else None

    def cell_summaries(self) -> list[dict]:
        """One row per (mode, batch): speed, step time, FLOP/s, share of peak, exchanges."""
        rows = []
        for batch in self.batches:
            for name, mode in self.modes.items():
                sp = self.speed(name, batch)
                if sp:
                    rows.append(self._cell(mode, batch, sp))
        return rows

    def _cell(self, mode: Mode, batch: int, sp: list[float]) -> dict:
        key = cell_key(mode.name, batch)
        cells = [r["cells"][key] for r in self.repeats]
        images = batch * mode.runs
        speed, share = estimate(sp), self.share(mode.name, batch)
        row = {"mode": mode.name, "batch": batch, "processes": mode.processes, "threads": mode.threads,
               "meaning": mode.meaning, "images_per_s": speed.value, "images_per_s_ci": speed.as_list(),
               "step_s": images / speed.value, "step_s_per_repeat": [c["seconds"] for c in cells],
               "flops_per_step": self.flops[key], "flops_per_image": self.flops[key] / images,
               "flops_per_s": self.flops[key] / images * speed.value, "peak": mode.peak,
               "flops_share_of_peak": statistics.median(share),
               "nonfinite_steps": sum(rank["nonfinite"] for c in cells for rank in c["ranks"])}
        comm = _comm_detail(cells)
        if comm:
            row["comm"] = comm
        return row

    def peaks(self) -> dict[str, dict]:
        """Median over repeats of each configuration's matrix-multiply and convolution rates."""
        out = {}
        for name, first in (self.repeats[0]["peaks"] if self.repeats else {}).items():
            out[name] = {k: statistics.median(r["peaks"][name][k] for r in self.repeats) for k in first}
        return out


def as_overhead(key: str, e: Estimate) -> tuple[str, Estimate]:
    """(name, estimate) of a figure as reported: comm_ratio and dp2xmp2_ratio become 1 - ratio (the share
    of the step lost), profiler_ratio becomes ratio - 1 (the step's growth); other figures stay."""
    if key in ("comm_ratio", "dp2xmp2_ratio"):
        return key.replace("_ratio", "_overhead"), e.map(lambda x: 1 - x, decreasing=True)
    if key == "profiler_ratio":
        return "profiler_overhead", e.map(lambda x: x - 1)
    return key, e


def _comm_detail(cells: list[dict]) -> dict:
    """Per crossing and direction: bytes and host seconds inside the exchange calls, per step, per rank
    (averaged over the repeats): the per-crossing breakdown, not the communication cost."""
    keys = sorted({k for c in cells for rank in c["ranks"] for k in rank["comm"]})
    empty, out = {"sent": 0, "recv": 0, "seconds": 0.0}, {}
    for k in keys:
        per_rank = [[c["ranks"][i]["comm"].get(k, empty) for c in cells] for i in range(len(cells[0]["ranks"]))]
        out[k] = {"sent": [statistics.fmean(v["sent"] for v in rank) for rank in per_rank],
                  "recv": [statistics.fmean(v["recv"] for v in rank) for rank in per_rank],
                  "host_seconds": [statistics.fmean(v["seconds"] for v in rank) for rank in per_rank]}
    return out


def check_targets(values: dict, intervals: dict, crop: int) -> dict:
    """{key: target, value, ci, met} for every target whose figure was measured (met None otherwise)."""
    out = {}
    for key, (op, bound, *extra) in TARGETS.items():
        bound = 3 * crop * crop if key == "h2d_bytes_per_image" else bound
        value, ci = values.get(key), intervals.get(key)
        if op == "between":
            text, met = f"between {bound:g} and {extra[0]:g}", None if value is None else bound <= value <= extra[0]
        else:
            text = f"{op} {bound:g}" + (f" with lower bound >= {extra[0]:g}" if extra else "")
            met = None if value is None else {">=": value >= bound, "<=": value <= bound, "==": value == bound}[op]
            if met and extra:
                met = ci is not None and ci[0] >= extra[0]
        out[key] = {"target": text, "value": value, "ci": ci, "met": met}
    return out
