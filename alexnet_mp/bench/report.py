"""The results document, its Markdown rendering and its files (benchmarks/results/<machine>-<date>.*).

No measuring here: `assemble` takes what the run measured, `render_markdown` writes every
figure to two significant figures with its 95% interval, `write` stores the JSON and the
Markdown atomically (a failed write leaves no half file).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..files import make_dirs, write_text_atomic
from .figures import Figures, as_overhead, check_targets
from .stats import Estimate, estimate, format_estimate, sig2

SCHEMA = 2
SCALING_COLUMNS = (("mp_vs_one_device", "MP vs one device"), ("mp_vs_two_independent", "MP vs two independent"),
                   ("mp_vs_best_single", "MP vs best single"), ("best_single_ceiling", "ceiling 2/S"),
                   ("mp_vs_ddp", "MP vs DDP"), ("comm_overhead", "comm overhead"),
                   ("dp2xmp2_overhead", "2x2 overhead vs the pair"), ("profiler_overhead", "profiler overhead"))


def _scaling_row(figures: Figures, batch: int) -> dict:
    """{figure: [value, lower, upper]} at one batch, overheads as shares (1 - ratio)."""
    out = {}
    for key, series in figures.scaling(batch).items():
        if series:
            name, e = as_overhead(key, estimate(series))
            out[name] = [e.value, e.lower, e.upper]
    return out


def ratio_basis(figures: Figures) -> str:
    return (f"paired per repeat, median with a bootstrap 95% interval; scaling, overheads and mp_vs_ddp_b32 at "
            f"batch {figures.small} (the harder case), flops_share_of_peak at batch {figures.big}; model "
            f"parallel = mode mp (dist.overlap at its default)")


def assemble(info: dict, figures: Figures, loader: dict | None, crop: int) -> dict:
    """The result document. `info`: machine, settings and verdicts gathered by the command."""
    headline: dict[str, Estimate] = figures.headline()
    ratios = {k: e.value for k, e in headline.items()}
    intervals = {k: e.as_list() for k, e in headline.items()}
    ratios["bytes_measured_vs_analytic"] = figures.bytes_ratio()
    if loader:
        for key in ("decodes_per_image_per_pair", "prepared_vs_folder_per_core", "h2d_bytes_per_image"):
            ratios[key] = loader[key]
        intervals["prepared_vs_folder_per_core"] = loader["prepared_vs_folder_per_core_ci"]
    targets = check_targets(ratios, intervals, loader["crop"] if loader else crop) if not info.get("gpu") else {}
    return {
        "schema": SCHEMA, **info,
        "ratios": ratios, "ratios_ci": intervals, "ratio_basis": ratio_basis(figures), "targets": targets,
        "scaling": {str(b): _scaling_row(figures, b) for b in figures.batches},
        "runs": figures.cell_summaries(), "peaks": figures.peaks(), "loader": loader,
    }


def _met(t: dict) -> str:
    return {True: "yes", False: "**no**"}.get(t["met"], "-")


def _headline_lines(result: dict) -> list[str]:
    lines = ["| figure | value [95% interval] | target | met |", "|---|---:|---|---|"]
    ci = result["ratios_ci"]
    for key, value in result["ratios"].items():
        t = result["targets"].get(key)
        if key in ci and value is not None:
            shown = format_estimate(Estimate(value, *ci[key], 0))
        elif t and t["target"].startswith("=="):
            shown = f"{value:g}" if value is not None else "-"  # an exact count: every digit
        else:
            shown = sig2(value)
        lines.append(f"| {key} | {shown} | {t['target'] if t else ''} | {_met(t) if t else ''} |")
    return lines


def _scaling_lines(result: dict) -> list[str]:
    present = [(k, name) for k, name in SCALING_COLUMNS if any(k in row for row in result["scaling"].values())]
    lines = ["| batch | " + " | ".join(name for _, name in present) + " |",
             "|---:|" + "---:|" * len(present)]
    for batch, row in result["scaling"].items():
        cells = [format_estimate(Estimate(*row[k], 0)) if k in row else "-" for k, _ in present]
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    return lines


def _cell_lines(result: dict) -> list[str]:
    unit, scale = ("TFLOP/s", 1e12) if result.get("gpu") else ("GFLOP/s", 1e9)
    lines = [f"| mode | batch | processes x threads | images/s [95%] | step ms | {unit} | share of peak (peak) | "
             "exchanged MB/step | non-finite |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for c in result["runs"]:
        sent = sum(sum(v["sent"]) for v in c.get("comm", {}).values())
        speed = Estimate(c["images_per_s"], *c["images_per_s_ci"], 0)
        lines.append(f"| {c['mode']} | {c['batch']} | {c['processes']}x{c['threads']} | {format_estimate(speed)} | "
                     f"{sig2(1e3 * c['step_s'])} | {sig2(c['flops_per_s'] / scale)} | "
                     f"{sig2(c['flops_share_of_peak'])} ({c['peak']}) | {sig2(sent / 1e6) if sent else '-'} | "
                     f"{c['nonfinite_steps']} |")
    return lines


def _comm_lines(result: dict) -> list[str]:
    """The per-crossing breakdown of the plain pair at the smallest batch (detail, not the cost)."""
    cell = next((c for c in result["runs"] if c["mode"] == "mp" and "comm" in c), None)
    if cell is None:
        return []
    lines = [f"Per crossing (mp, batch {cell['batch']}; host seconds inside the exchange calls, which include "
             f"waiting for the peer but not gloo's transfer work in its own threads; the cost of communication "
             f"is comm_overhead above):", "", "| exchange | MB sent per step (rank 0 / 1) | host ms per step "
             "(rank 0 / 1) |", "|---|---:|---:|"]
    for key, v in cell["comm"].items():
        lines.append(f"| {key} | {' / '.join(sig2(x / 1e6) for x in v['sent'])} | "
                     f"{' / '.join(sig2(1e3 * x) for x in v['host_seconds'])} |")
    return lines


def _stage_sentence(st: dict) -> str:
    """Where a loader's time goes, per image, and the ceiling of the JPEG shards."""
    quality = "; ".join(f"{q} {sig2(v['bytes'] / 1e3)} KB {sig2(v['decode_ms'])} ms"
                        for q, v in st["decode_by_quality"].items())
    return (f"Per image (CPU ms): folder {sig2(st['folder_read_decode_resize_ms'])} (decode "
            f"{sig2(st['folder_decode_ms'])}, resize {sig2(st['folder_resize_ms'])}; "
            f"{sig2(st['folder_file_bytes'] / 1e3)} KB files); prepared JPEG {sig2(st['prepared_jpeg_image_ms'])} "
            f"(read and check {sig2(st['prepared_jpeg_read_check_ms'])}, decode {sig2(st['prepared_jpeg_decode_ms'])}; "
            f"{sig2(st['prepared_jpeg_record_bytes'] / 1e3)} KB records); prepared raw "
            f"{sig2(st['prepared_raw_image_ms'])}. The JPEG shards can be at most "
            f"{sig2(st['jpeg_ceiling_vs_folder'])}x the folder per core (the folder's decode and resize over the "
            f"JPEG decode), whatever the rest costs. Decode of the stored images re-encoded: {quality}.")


def _loader_lines(loader: dict | None) -> list[str]:
    if not loader:
        return []
    pc = loader["per_core"]
    lines = [f"Loader (stored side {loader['side']}, crop {loader['crop']}; one process, one thread, whole epochs; "
             f"images per CPU second):", "", "| path | images/s per core [95%] | images/s (wall) |", "|---|---:|---:|"]
    for path in ("folder", "prepared-jpeg", "prepared-raw"):
        e = Estimate(pc[path]["images_per_cpu_s"], *pc[path]["ci"], 0)
        lines.append(f"| {path} | {format_estimate(e)} | {sig2(pc[path]['images_per_wall_s'])} |")
    pair = "; ".join(f"{p}: {sig2(v['decodes_per_image_per_pair'])} decodes per image per pair, "
                     f"{v['h2d_image_bytes_per_image']:.0f} image bytes and {v['h2d_metadata_bytes_per_image']:.0f} "
                     f"metadata bytes to the device per image" for p, v in loader["pair"].items())
    return lines + ["", _stage_sentence(loader["stages_ms"]), "", f"Pair run: {pair}."]


def _state_lines(result: dict) -> list[str]:
    s = result["machine_state"]
    foreign = s.get("foreign_cores")
    run = result["settings"]
    return [f"Machine: {result['cores']} cores, torch {result['torch']}, {result['device']} ({result['backend']}). "
            f"Load average (1 min) {sig2(s['load_before'])} before, {sig2(s['load_after'])} after; other programs "
            f"used {sig2(foreign) if foreign is not None else '?'} cores while the modes ran. Calibration "
            f"{sig2(s['calibration_before'] / 1e9)} GFLOP/s before, {sig2(s['calibration_after'] / 1e9)} after "
            f"({s['calibration_drift']:+.1%}). {run['repeats']} repeats of {run['steps']} timed steps after "
            f"{run['warmup']} warm-up ({run['stop_reason']}); run time {result['seconds']:.0f} s."]


def render_markdown(result: dict) -> str:
    """Everything in the results, for people: headline, scaling, modes, peaks, exchanges, loader."""
    lines = [f"### {result['machine']}, {result['date']} ({result['preset']})", "", result["description"], ""]
    lines += _state_lines(result) + [""]
    if result["inconclusive"]:
        lines += [f"**Inconclusive**: {result['inconclusive']}", ""]
    lines += [f"**Warning**: {w}" for w in result["warnings"]] + ([""] if result["warnings"] else [])
    lines += [f"Figures ({result['ratio_basis']}):", ""] + _headline_lines(result) + [""]
    lines += ["Scaling and overheads per batch:", ""] + _scaling_lines(result) + [""]
    lines += ["Modes:", ""] + _cell_lines(result) + [""]
    unit, scale = ("TFLOP/s", 1e12) if result.get("gpu") else ("GFLOP/s", 1e9)
    lines += ["Peaks (median over repeats; a configuration's processes run the kernel at once): " + "; ".join(
        f"{name}: " + ", ".join(f"{k} {sig2(v / scale)} {unit}" for k, v in p.items() if k != "peak")
        for name, p in result["peaks"].items()), ""]
    lines += _comm_lines(result) + [""]
    lines += _loader_lines(result.get("loader")) + [""]
    lines += [f"bf16: {result['bf16']['note']}"] + ([f"GPUs: {result['gpu_note']}"] if result.get("gpu_note") else [])
    return "\n".join(lines) + "\n"


def write(result: dict, out_dir: Path) -> dict[str, Path]:
    """results/<machine>-<date>.json and .md, each written whole or not at all; their paths."""
    make_dirs(out_dir, move="--out")
    stem = Path(out_dir) / f"{result['machine']}-{result['date']}"
    paths = {"json": stem.with_suffix(".json"), "md": stem.with_suffix(".md")}
    write_text_atomic(paths["json"], json.dumps(result, indent=1) + "\n", move="--out")
    write_text_atomic(paths["md"], render_markdown(result), move="--out")
    return paths
