"""The benchmark's bookkeeping: from raw timings to the table, the ratios, the files.

No measuring here, so the tests can feed it made-up timings. Definitions (also
in README, "Benchmarks"):

* step time: per repeat, the mean of its timed steps; the table gives the median
  over repeats and the spread (max - min) / median.
* speed-up: the best single-process step time at the same batch over this one.
* scaling efficiency: images/s over (units x the one-unit single-process
  images/s), units being cores (processes x threads) on CPU, devices on GPU.
* exposed communication: seconds a process spent held up in the link's
  exchanges (posting plus waiting, `CommStats.seconds`) over its step time,
  averaged over the two processes.
* exposed all-reduce (modes with a data-parallel all-reduce): seconds from
  the last gradient bucket's launch (every gradient computed) to its result,
  over the step time, averaged over the processes; bytes: each process's
  gradients handed to the all-reduce, against the model's parameter bytes.
* achieved FLOP/s: 3 x forward MACs x 2 per image; its share is of the
  matrix-multiply peak measured in the same run with the same processes and
  threads (for two processes: both multiplying at once, rates summed).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

# The targets for a 2-core CPU (issue 5), and which way each must go.
TARGETS = {
    "mp_vs_best_single": (">=", 1.95),
    "mp_vs_ddp_b32": (">=", 1.5),
    "exposed_comm_share": ("<=", 0.03),
    "bytes_measured_vs_analytic": ("==", 1.0),
    "mp_flops_share_of_matmul_peak": (">=", 0.45),
}
RATIO_KEYS = tuple(TARGETS)


def summarise_run(raw: dict, batch: int, flops_per_image: float, peak_flops: float) -> dict:
    """One (mode, batch) cell from its raw repeats.

    `raw` holds: mode, processes, threads, units, repeats: a list, per repeat,
    of the ranks' results: times (seconds per timed step), peak_mib and
    above_idle_mib, for the model-parallel pair comm_seconds (None on GPUs,
    where exchanges do not hold the host up) and the bytes per step
    sent/recv and analytic_sent/analytic_recv, and where
    replicas all-reduce gradients allreduce_seconds (exposed, all timed
    steps), allreduce_bytes (per step), allreduce_analytic, allreduce_buckets.
    """
    repeat_steps = [statistics.fmean(ranks[0]["times"]) for ranks in raw["repeats"]]
    step = statistics.median(repeat_steps)
    every = [r for ranks in raw["repeats"] for r in ranks]
    n_ranks = len(raw["repeats"][0])
    cell = {
        "mode": raw["mode"], "batch": batch, "processes": raw["processes"], "threads": raw["threads"],
        "units": raw["units"], "repeats": len(repeat_steps),
        "step_s": step, "step_s_min": min(repeat_steps), "step_s_max": max(repeat_steps),
        "spread": (max(repeat_steps) - min(repeat_steps)) / step,
        "images_per_s": batch / step,
        "flops_per_s": flops_per_image * batch / step,
        "peak_flops_per_s": peak_flops,
        "flops_share_of_peak": flops_per_image * batch / step / peak_flops,
        "peak_mib": [max(ranks[i]["peak_mib"] for ranks in raw["repeats"]) for i in range(n_ranks)],
        "above_idle_mib": [max(ranks[i]["above_idle_mib"] for ranks in raw["repeats"]) for i in range(n_ranks)],
        "repeat_step_s": repeat_steps,
    }
    if all(r.get("comm_seconds") is not None for r in every):  # host time, measured on CPUs only
        cell.update(
            exposed_comm_share=statistics.fmean(r["comm_seconds"] / sum(r["times"]) for r in every),
            exposed_comm_share_per_rank=[statistics.fmean(ranks[i]["comm_seconds"] / sum(ranks[i]["times"])
                                                          for ranks in raw["repeats"]) for i in range(n_ranks)])
        if all("comm" in r for r in every):  # where the exposed seconds went, per step
            keys = sorted({k for r in every for k in r["comm"]})
            cell["comm_seconds_per_step"] = {
                k: statistics.fmean(r["comm"].get(k, {}).get("seconds", 0.0) / len(r["times"]) for r in every)
                for k in keys}
    if all("sent" in r for r in every):
        measured = sum(r["sent"] + r["recv"] for r in every)
        analytic = sum(r["analytic_sent"] + r["analytic_recv"] for r in every)
        cell.update(
            # What crosses the wire per step: both columns' sends.
            bytes_per_step=sum(r["sent"] for r in every) / len(raw["repeats"]),
            # Sent and received by both, against summary.analytic_bytes.
            bytes_counted_per_step=measured / len(raw["repeats"]),
            bytes_analytic_per_step=analytic / len(raw["repeats"]),
            bytes_ratio=measured / analytic)
    if all("allreduce_seconds" in r for r in every):
        cell.update(
            exposed_allreduce_share=statistics.fmean(r["allreduce_seconds"] / sum(r["times"]) for r in every),
            allreduce_bytes_per_rank=statistics.fmean(r["allreduce_bytes"] for r in every),
            allreduce_buckets=max(r["allreduce_buckets"] for r in every),
            allreduce_bytes_ratio=(sum(r["allreduce_bytes"] for r in every)
                                   / sum(r["allreduce_analytic"] for r in every)))
    return cell


def add_relative(cells: list[dict], single_modes: tuple, base_mode: str) -> None:
    """Speed-up over the best single process and scaling efficiency, per batch."""
    for batch in {c["batch"] for c in cells}:
        same = [c for c in cells if c["batch"] == batch]
        singles = [c["step_s"] for c in same if c["mode"] in single_modes]
        base = _cell(same, base_mode, batch)
        for c in same:  # None where the baseline was not measured (bench.py --modes)
            c["speedup_vs_best_single"] = min(singles) / c["step_s"] if singles else None
            c["scaling_efficiency"] = c["images_per_s"] / (c["units"] * base["images_per_s"]) if base else None


def _cell(cells, mode, batch):
    return next((c for c in cells if c["mode"] == mode and c["batch"] == batch), None)


def compute_ratios(cells: list[dict], mp_mode: str, single_modes: tuple) -> dict:
    """The headline: at the largest batch measured, and DDP at batch 32 (or the smallest).

    A ratio whose modes were not measured (bench.py --modes) is None.
    """
    batches = sorted({c["batch"] for c in cells})
    big, small = batches[-1], (32 if 32 in batches else batches[0])
    mp, mp_small, ddp = _cell(cells, mp_mode, big), _cell(cells, mp_mode, small), _cell(cells, "ddp", small)
    singles = [c["images_per_s"] for c in cells if c["batch"] == big and c["mode"] in single_modes]
    overlapped = _cell(cells, "mp-overlap", big)
    mp_cells = [c for c in cells if "bytes_ratio" in c]
    return {
        "mp_vs_best_single": mp["images_per_s"] / max(singles) if mp and singles else None,
        "mp_vs_ddp_b32": mp_small["images_per_s"] / ddp["images_per_s"] if mp_small and ddp else None,
        "exposed_comm_share": overlapped.get("exposed_comm_share") if overlapped else None,  # None on GPUs
        "bytes_measured_vs_analytic": (sum(c["bytes_counted_per_step"] for c in mp_cells)
                                       / sum(c["bytes_analytic_per_step"] for c in mp_cells)) if mp_cells else None,
        "mp_flops_share_of_matmul_peak": mp["flops_share_of_peak"] if mp else None,
    }


def ratio_basis(cells: list[dict], mp_mode: str) -> str:
    batches = sorted({c["batch"] for c in cells})
    small = 32 if 32 in batches else batches[0]
    return (f"model parallel = mode {mp_mode} (the dist.overlap default); batch {batches[-1]} except "
            f"mp_vs_ddp_b32 (batch {small}); exposed_comm_share from mp-overlap")


def check_targets(ratios: dict) -> dict:
    out = {}
    for key, (op, target) in TARGETS.items():
        value = ratios[key]
        if value is None:
            met = None
        else:
            met = {">=": value >= target, "<=": value <= target, "==": round(value, 2) == target}[op]
        out[key] = {"target": f"{op} {target:g}", "value": value, "met": met}
    return out


# ------------------------------------------------------------------ files


def _load(result: dict, when: str) -> str:
    load = result.get("load_average", {}).get(when)
    return f"{load[0]:.1f}" if load else "?"


def _opt(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _mib(values):
    return " / ".join(f"{v:.0f}" for v in values)


def render_markdown(result: dict) -> str:
    """The table, the ratios against the targets, the matrix-multiply peaks, the p2p sweep."""
    s = result["settings"]
    lines = [
        f"### {result['machine']}, {result['date']} ({result['preset']})",
        "",
        f"{result['description']}",
        "",
        f"Device {result['device']} ({result['backend']}), {result['cores']} cores, torch {result['torch']}; "
        f"batches {', '.join(map(str, s['batches']))}; {s['repeats']} repeats x {s['steps']} timed steps "
        f"after {s['warmup']} warm-up; amp {s['amp']}, channels_last {s['channels_last']}; "
        f"{result['forward_macs_per_image'] / 1e6:.1f}M forward MACs and {result['params'] / 1e6:.1f}M "
        f"parameters per network. Run time {result.get('seconds', 0):.0f} s; load average (1 min) "
        f"{_load(result, 'before')} before, {_load(result, 'after')} after.",
        "",
        "| mode | batch | proc x thr | images/s | step ms (spread) | vs best single | scaling eff. | "
        "exposed comm | bytes/step (meas./analytic) | exposed all-reduce (MB per rank, meas./analytic) | "
        "peak MiB per rank (above idle) | GFLOP/s | % of mm peak |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in result["runs"]:
        comm = f"{100 * c['exposed_comm_share']:.1f}%" if "exposed_comm_share" in c else "-"
        data = (f"{c['bytes_per_step'] / 1e6:.2f} MB ({c['bytes_ratio']:.2f})" if "bytes_ratio" in c else "-")
        reduce = (f"{100 * c['exposed_allreduce_share']:.1f}% ({c['allreduce_bytes_per_rank'] / 1e6:.2f} MB "
                  f"({c['allreduce_bytes_ratio']:.2f}))" if "allreduce_bytes_ratio" in c else "-")
        lines.append(
            f"| {c['mode']} | {c['batch']} | {c['processes']}x{c['threads']} | {c['images_per_s']:.1f} | "
            f"{1e3 * c['step_s']:.0f} ({100 * c['spread']:.0f}%) | {_opt(c['speedup_vs_best_single'], '{:.2f}x')} | "
            f"{_opt(c['scaling_efficiency'], '{:.0%}')} | {comm} | {data} | {reduce} | {_mib(c['peak_mib'])} "
            f"({_mib(c['above_idle_mib'])}) | {c['flops_per_s'] / 1e9:.1f} | {100 * c['flops_share_of_peak']:.0f}% |")
    lines += ["", f"Ratios ({result['ratio_basis']}):", "", "| ratio | value | target | met |", "|---|---:|---:|---|"]
    for key, t in result["targets"].items():
        value = "not measured" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"| {key} | {value} | {t['target']} | {({True: 'yes', False: 'no'}).get(t['met'], '-')} |")
    lines += ["", f"Matrix-multiply peak ({'bf16' if s['amp'] == 'bf16' else 'fp32'} torch.mm, "
              f"n={s['matmul_n']}, best of the repeats): "
              + "; ".join(f"{k} {v['peak'] / 1e9:.1f} GFLOP/s" for k, v in result["matmul_peak"].items()),
              "", f"Point-to-point exchange ({result['backend']}, both directions at once, as at a crossing):",
              "", "| message | time per exchange | GB/s each way |", "|---:|---:|---:|"]
    for p in result["p2p"]:
        lines.append(f"| {_size(p['bytes'])} | {1e6 * p['seconds']:.0f} us | {p['gbps']:.2f} |")
    return "\n".join(lines) + "\n"


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def plot(result: dict, path: Path) -> None:
    """Images/s per mode, one group of bars per batch size, min-max whiskers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(c["mode"] for c in result["runs"]))
    batches = result["settings"]["batches"]
    width = 0.8 / len(modes)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, mode in enumerate(modes):
        cells = [_cell(result["runs"], mode, b) for b in batches]
        xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(batches))]
        ys = [c["images_per_s"] for c in cells]
        err = [[y - c["batch"] / c["step_s_max"] for y, c in zip(ys, cells)],
               [c["batch"] / c["step_s_min"] - y for y, c in zip(ys, cells)]]
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=mode)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("images / s")
    ax.set_title(f"{result['machine']} {result['date']} ({result['preset']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(result: dict, out_dir: Path) -> dict[str, Path]:
    """results/<machine>-<date>.json, .md and .png; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{result['machine']}-{result['date']}"
    paths = {"json": stem.with_suffix(".json"), "md": stem.with_suffix(".md"), "png": stem.with_suffix(".png")}
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    paths["md"].write_text(render_markdown(result))
    plot(result, paths["png"])
    return paths
