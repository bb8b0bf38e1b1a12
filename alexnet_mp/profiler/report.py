"""The profile as a table (printed) and as files in the run directory (profile.json, profile.png)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .plots import plot_timeline
from .summary import sum_shares

PROFILE_FILE, PICTURE_FILE = "profile.json", "profile.png"


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _rows(profile: dict) -> list[tuple[str, str, str]]:
    """(section, kind, name) of every step part, in the order rank 0's timeline step ran them."""
    order = {}
    for kind, name, start, _ in profile["ranks"][0]["timeline"]["events"]:
        order.setdefault((kind, name), start)
    found = set()
    for r in profile["ranks"]:
        found |= {("phases", k, k) for k in r["phases"]}
        found |= {("layers", kind, layer) for layer, d in r["layers"].items() for kind in d}
        found |= {("crossings", "comm", key) for key in r["crossings"]}
        found |= {("allreduce", "allreduce", "dp.allreduce")} if r.get("allreduce") else set()
    rest = float("inf")
    return sorted(found, key=lambda p: (p[1] == "other", order.get((p[1], p[2]), rest), p[1], p[2]))


def _part(rank: dict, section: str, kind: str, name: str) -> dict | None:
    if section == "phases":
        return rank["phases"].get(kind)
    if section == "layers":
        return rank["layers"].get(name, {}).get(kind)
    if section == "allreduce":
        return rank["allreduce"]["exposed"] if rank.get("allreduce") else None
    return rank["crossings"].get(name, {}).get("wait")


def _header(profile: dict) -> list[str]:
    ranks, steps, m, v = profile["ranks"], profile["steps"], profile["machine"], profile["versions"]
    return [f"profile of {profile['run_dir']}: {len(ranks)} ranks, {steps['measured']} steps measured of "
            f"{steps['seen']} ({steps['warmup_skipped']} warm-up, {steps['traced_excluded']} traced left out), "
            f"batch {profile['batch_per_pair']} per model replica",
            f"machine: {m['host']}, {m['cpu']}, {m['cores']} cores"
            + (f", {m['memory_bytes'] / 2**30:.1f} GiB" if m["memory_bytes"] else "")
            + (f", {m['gpu']}" if m["gpu"] else "")
            + f"; torch {v['torch']}, python {v['python']}, {v['backend']} on {ranks[0]['device']}", ""]


def _breakdown(profile: dict) -> list[str]:
    """Where a step goes: one row per part, mean, median and share per rank."""
    ranks = profile["ranks"]
    lines = [f"{'where a step goes':<26}" + "".join(f"{'rank ' + str(r['rank']):>28}" for r in ranks),
             f"{'':<26}" + f"{'mean ms':>10}{'median':>9}{'share':>9}" * len(ranks)]
    for section, kind, name in _rows(profile):
        text = {"phases": kind, "layers": f"{kind} {name}", "crossings": f"wait {name}",
                "allreduce": "wait dp all-reduce"}[section]
        cells = ""
        for r in ranks:
            s = _part(r, section, kind, name)
            cells += (f"{_ms(s['mean_s']):>10}{_ms(s['median_s']):>9}{s['share']:>9.1%}" if s
                      else f"{'':>10}{'':>9}{'':>9}")
        lines.append(f"{text:<26}{cells}")
    lines.append(f"{'step':<26}" + "".join(f"{_ms(r['step']['mean_s']):>10}{_ms(r['step']['median_s']):>9}"
                                          f"{sum_shares(r):>9.1%}" for r in ranks))
    lines.append(f"{'images/s (median step)':<26}" + "".join(f"{r['images_per_s']:>28.1f}" for r in ranks))
    return lines


def _crossings(ranks: list[dict]) -> list[str]:
    """Bytes and waits per exchange key; nothing when no rank has a peer column (dist.mp=1)."""
    if not any(r["crossings"] for r in ranks):
        return []
    lines = ["", "crossings per step: bytes (measured = analytic?), blocked wait = transfer + wait for the peer",
             f"{'rank':<5}{'crossing':<17}{'sent':>11}{'received':>11}{'analytic':>10}{'wait ms':>9}"
             f"{'transfer':>10}{'peer ms':>9}{'MB/s':>9}"]
    for r in ranks:
        for key, c in r["crossings"].items():
            bw = c["bandwidth_bytes_per_s"]
            lines.append(f"{r['rank']:<5}{key:<17}{c['sent_bytes']:>11,}{c['recv_bytes']:>11,}"
                         f"{'equal' if c['bytes_match'] else 'DIFFERS':>10}{_ms(c['wait']['mean_s']):>9}"
                         f"{_ms(c['transfer_s']):>10}{_ms(c['peer_wait_s']):>9}"
                         f"{'-' if bw is None else f'{bw / 1e6:.0f}':>9}")
    return lines


def _allreduce(ranks: list[dict]) -> list[str]:
    """The data-parallel all-reduce per rank; nothing without replicas."""
    if not any(r.get("allreduce") for r in ranks):
        return []
    lines = ["", "data-parallel gradient all-reduce per step (DDP between the replicas): "
                 "in flight = first bucket handed over to last result,",
             "exposed = the wait after the last gradient (the row above), hidden = the rest, behind backward",
             f"{'rank':<5}{'buckets':>8}{'bytes':>13}{'analytic':>10}{'in flight ms':>14}{'exposed ms':>12}"
             f"{'hidden':>8}"]
    for r in ranks:
        a = r.get("allreduce")
        if a:
            hidden = "-" if a["hidden_share"] is None else f"{a['hidden_share']:.0%}"
            lines.append(f"{r['rank']:<5}{a['buckets']:>8}{a['bytes']:>13,}"
                         f"{'equal' if a['bytes_match'] else 'DIFFERS':>10}{_ms(a['in_flight']['mean_s']):>14}"
                         f"{_ms(a['exposed']['mean_s']):>12}{hidden:>8}")
    return lines


def _memory(profile: dict) -> list[str]:
    ranks, ref = profile["ranks"], profile["reference_memory"]
    lines = ["", f"memory (peak over {ranks[0]['memory']['scope']}):"]
    for r in ranks:
        mem = r["memory"]
        lines.append(f"  rank {r['rank']}: {mem['kind']} peak {_mib(mem['peak_bytes'])} (at start "
                     f"{_mib(mem['at_start_bytes'])}); this rank's parameters+gradients+momentum "
                     f"{_mib(mem['model_state_bytes'])}")
    lines.append(f"  single-device reference needs about {_mib(ref['total'])}: parameters+gradients+momentum "
                 f"{_mib(3 * ref['parameters'])} + activations {_mib(ref['activations'])} for a batch of "
                 f"{profile['batch_per_pair']}")
    return lines


def _nvml(ranks: list[dict]) -> list[str]:
    lines = ["NVML:"]
    for r in ranks:
        n = r["nvml"]
        if not n["available"]:
            lines.append(f"  rank {r['rank']}: not available: {n['reason']}")
            continue
        parts = [f"{n['samples']} samples"]
        for key, unit, scale in (("gpu_util_pct", "%", 1), ("mem_used_bytes", " GiB", 2**30),
                                 ("power_w", " W", 1), ("sm_clock_mhz", " MHz", 1)):
            if n.get(key):
                parts.append(f"{key} mean {n[key]['mean'] / scale:.1f}{unit} max {n[key]['max'] / scale:.1f}{unit}")
        lines.append(f"  rank {r['rank']}: " + ", ".join(parts))
    return lines


def render_table(profile: dict) -> str:
    """The profile as text: the step's breakdown per rank, crossings, all-reduce, memory, NVML, traces."""
    ranks = profile["ranks"]
    lines = (_header(profile) + _breakdown(profile) + _crossings(ranks) + _allreduce(ranks)
             + _memory(profile) + _nvml(ranks))
    traces = [r["trace"] for r in ranks if r["trace"]]
    if traces:
        lines.append("traces (chrome://tracing or ui.perfetto.dev): " + ", ".join(traces))
    return "\n".join(lines)


def write_whole(path: Path, write) -> None:
    """`write(temporary path)`, then the file replaces `path`: a failure leaves no half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_report(profile: dict, run_path: Path) -> None:
    """profile.json and profile.png into the run directory; the table and the paths on stdout."""
    text = json.dumps(profile, indent=1)
    write_whole(run_path / PROFILE_FILE, lambda tmp: tmp.write_text(text))
    write_whole(run_path / PICTURE_FILE, lambda tmp: plot_timeline(profile, tmp))
    print(render_table(profile))
    print(f"profile: {run_path / PROFILE_FILE}, timeline: {run_path / PICTURE_FILE}")
