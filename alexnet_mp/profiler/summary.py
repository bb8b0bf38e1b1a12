"""The profile's figures from the gathered step records: pure arithmetic, records in, figures out."""
from __future__ import annotations

import statistics
import time

from ..summary import reference_memory

FORMAT = 1  # profile.json's layout; the render command reads this one only


def stat(values: list[float], step_mean: float) -> dict:
    """Mean, median and the mean's share of the mean step."""
    mean = statistics.fmean(values) if values else 0.0
    return {"mean_s": mean, "median_s": statistics.median(values) if values else 0.0,
            "share": mean / step_mean if step_mean > 0 else 0.0}


def part_durations(steps: list[dict]) -> dict[tuple[str, str], list[float]]:
    """Seconds per (kind, name) per step, 0 where a step lacks the part; ('other', 'other') is the rest."""
    parts: dict[tuple[str, str], list[float]] = {}
    for i, step in enumerate(steps):
        for kind, name, start, end in step["events"]:
            parts.setdefault((kind, name), [0.0] * len(steps))[i] += end - start
    parts[("other", "other")] = [s["seconds"] - sum(p[i] for p in parts.values()) for i, s in enumerate(steps)]
    return parts


def _comm_waits(data: dict) -> dict[str, dict[int, float]]:
    """Seconds blocked per exchange key, by step index."""
    return {name: {s["index"]: v for s, v in zip(data["steps"], values)}
            for (kind, name), values in part_durations(data["steps"]).items() if kind == "comm"}


def crossing_figures(data: dict, parts: dict, peer: dict | None, mean_step: float) -> dict[str, dict]:
    """Per exchange key: the wait, split into transfer and wait for the peer (with the peer's records),
    the last step's bytes against the analytic count, and the bandwidth.

    Transfer: per step, the shorter of the pair's two waits (the later arrival waits only for
    the data to move); the rest of a rank's own wait is the wait for its peer.
    """
    steps, mismatched = data["steps"], set(data["mismatch_counts"])
    peer_waits = _comm_waits(peer) if peer is not None else {}
    out = {}
    for (kind, key), values in parts.items():
        if kind != "comm":
            continue
        theirs = peer_waits.get(key, {})
        transfers = [min(v, theirs[s["index"]]) for s, v in zip(steps, values) if s["index"] in theirs]
        transfer = statistics.fmean(transfers) if transfers else None
        sent, recv = steps[-1]["bytes"].get(key, [0, 0])
        analytic = data["analytic"].get(key, {"sent": 0, "recv": 0})
        out[key] = {
            "wait": stat(values, mean_step), "transfer_s": transfer,
            "peer_wait_s": statistics.fmean(values) - transfer if transfer is not None else None,
            "sent_bytes": sent, "recv_bytes": recv,
            "analytic_sent_bytes": analytic["sent"], "analytic_recv_bytes": analytic["recv"],
            "bytes_match": key not in mismatched and [sent, recv] == [analytic["sent"], analytic["recv"]],
            "bandwidth_bytes_per_s": (sent + recv) / transfer if transfer else None}
    return out


def allreduce_figures(data: dict, parts: dict, mean_step: float) -> dict | None:
    """The data-parallel all-reduce: exposed wait, span in flight, the share hidden behind backward, bytes."""
    spans = [s["allreduce"] for s in data["steps"] if "allreduce" in s]
    if not spans:
        return None
    exposed = parts[("allreduce", "dp.allreduce")]
    in_flight = stat([a["last_ready"] - a["first_launch"] for a in spans], mean_step)
    moved = spans[-1]["bytes"]
    return {"exposed": stat(exposed, mean_step), "in_flight": in_flight,
            "hidden_share": 1 - statistics.fmean(exposed) / in_flight["mean_s"] if in_flight["mean_s"] > 0 else None,
            "buckets": spans[-1]["buckets"], "bytes": moved, "analytic_bytes": data["allreduce_analytic"],
            "bytes_match": "dp.allreduce" not in data["mismatch_counts"] and moved == data["allreduce_analytic"]}


def summarise_rank(data: dict, peer: dict | None) -> dict:
    """One rank's figures; `peer` (its model-parallel peer's data, None without one) splits the waits."""
    steps = data["steps"]
    step_times = [s["seconds"] for s in steps]
    mean_step = statistics.fmean(step_times)
    parts = part_durations(steps)
    out = {"step": stat(step_times, mean_step), "phases": {}, "layers": {},
           "images_per_s": statistics.fmean(s["batch"] for s in steps) / statistics.median(step_times)}
    for (kind, name), values in parts.items():
        if kind in ("forward", "backward"):
            out["layers"].setdefault(name, {})[kind] = stat(values, mean_step)
        elif kind not in ("comm", "allreduce"):
            out["phases"][kind] = stat(values, mean_step)
    out["crossings"] = crossing_figures(data, parts, peer, mean_step)
    out["allreduce"] = allreduce_figures(data, parts, mean_step)
    return out


def sum_shares(rank: dict) -> float:
    """The shares of every part of a summarised rank's step (1 up to rounding)."""
    total = sum(p["share"] for p in rank["phases"].values())
    total += sum(p["share"] for d in rank["layers"].values() for p in d.values())
    total += rank["allreduce"]["exposed"]["share"] if rank.get("allreduce") else 0.0
    return total + sum(c["wait"]["share"] for c in rank["crossings"].values())


def timeline_step(ranks: list[dict]) -> int:
    """The step the timeline shows: one every rank measured, the one whose rank-0 time is nearest the median."""
    common = set.intersection(*({s["index"] for s in r["steps"]} for r in ranks))
    first = ranks[0]["steps"]
    median = statistics.median(s["seconds"] for s in first)
    return min((s for s in first if s["index"] in common), key=lambda s: abs(s["seconds"] - median),
               default=first[0])["index"]


def _rank_row(r: dict, peer: dict | None, shown: int) -> dict:
    row = {k: r[k] for k in ("rank", "column", "peer", "dp_rank", "device", "threads")}
    row["host"], row["gpu"] = r["machine"]["host"], r["machine"]["gpu"]
    row.update(summarise_rank(r, peer))
    row.update(memory=r["memory"], nvml=r["nvml"], trace=r["trace"],
               bytes_checked_steps=r["bytes_checked"], byte_mismatches=r["byte_mismatches"],
               mismatch_counts=r["mismatch_counts"])
    step = next((s for s in r["steps"] if s["index"] == shown), r["steps"][0])
    row["timeline"] = {"step": step["index"], "seconds": step["seconds"], "events": step["events"],
                       "allreduce": step.get("allreduce")}
    return row


def build_profile(ranks: list[dict], cfg, run_dir: str, skipped: int, traced: int) -> dict | None:
    """The profile.json content from every rank's gathered records; None when a rank measured no step."""
    if not all(r["steps"] for r in ranks):
        return None
    by_rank = {r["rank"]: r for r in ranks}
    shown = timeline_step(ranks)
    first = ranks[0]["steps"]
    batch = first[-1]["batch"]
    return {"format": FORMAT, "run_dir": run_dir, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": ranks[0]["machine"], "versions": ranks[0]["versions"],
            "model": {"crop_size": cfg.model.crop_size, "conv_widths": list(cfg.model.conv_widths),
                      "fc_width": cfg.model.fc_width, "num_classes": cfg.model.num_classes, "fc8": cfg.model.fc8},
            "batch_per_pair": batch,
            "steps": {"seen": ranks[0]["seen"], "measured": len(first), "warmup_skipped": skipped,
                      "traced_excluded": traced, "timeline_step": shown},
            "reference_memory": reference_memory(cfg.model, batch, 4),
            "ranks": [_rank_row(r, by_rank.get(r["peer"]), shown) for r in ranks]}
