"""make bench's bookkeeping on made-up timings, and a tiny end-to-end run (no timing thresholds)."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench  # noqa: E402
import report  # noqa: E402

SINGLE = ("single-1t", "single-all")
# mode: (processes, threads, units, seconds per step at batch 32; batch 128 takes 4x)
FAKE = {"single-1t": (1, 1, 1, 1.0), "single-all": (1, 2, 2, 0.6), "mp": (2, 1, 2, 0.5),
        "mp-overlap": (2, 1, 2, 0.4), "ddp": (2, 1, 2, 0.8)}


def rank_result(seconds, pair_traffic, allreduce=False):
    out = {"times": [seconds, seconds], "peak_mib": 900.0, "above_idle_mib": 300.0}
    if pair_traffic:  # 10% of the step held up in exchanges; 100 bytes sent and received per step
        out.update(comm_seconds=0.1 * 2 * seconds, sent=100.0, recv=100.0, analytic_sent=100, analytic_recv=100)
    if allreduce:  # 20% of the step waiting for the gradients' all-reduce; 1000 bytes of gradients
        out.update(allreduce_seconds=0.2 * 2 * seconds, allreduce_bytes=1000.0, allreduce_analytic=1000,
                   allreduce_buckets=3)
    return out


def fake_cells(flops_per_image=1e9, peak=1e12):
    cells = []
    for batch, scale in ((32, 1), (128, 4)):
        for mode, (procs, threads, units, seconds) in FAKE.items():
            # Three repeats: 0.9x, 1x, 1.2x the nominal step time.
            repeats = [[rank_result(seconds * scale * f, mode.startswith("mp"), mode == "ddp") for _ in range(procs)]
                       for f in (0.9, 1.0, 1.2)]
            raw = {"mode": mode, "processes": procs, "threads": threads, "units": units, "repeats": repeats}
            cells.append(report.summarise_run(raw, batch, flops_per_image, peak))
    report.add_relative(cells, SINGLE, "single-1t")
    return cells


def cell(cells, mode, batch):
    return next(c for c in cells if c["mode"] == mode and c["batch"] == batch)


def test_cells_ratios_and_targets_from_known_timings():
    cells = fake_cells()
    mp = cell(cells, "mp", 128)
    assert mp["step_s"] == pytest.approx(2.0)  # median of 1.8, 2.0, 2.4
    assert mp["spread"] == pytest.approx(0.3)  # (2.4 - 1.8) / 2.0
    assert mp["images_per_s"] == pytest.approx(64.0)
    assert mp["speedup_vs_best_single"] == pytest.approx(0.6 / 0.5)  # best single: single-all
    assert mp["scaling_efficiency"] == pytest.approx(1.0 / (2 * 0.5))  # against 2 x single-1t
    assert mp["exposed_comm_share"] == pytest.approx(0.1)
    assert mp["bytes_per_step"] == pytest.approx(200.0) and mp["bytes_ratio"] == pytest.approx(1.0)
    assert mp["flops_share_of_peak"] == pytest.approx(1e9 * 128 / 2.0 / 1e12)
    assert mp["peak_mib"] == [900.0, 900.0] and "exposed_comm_share" not in cell(cells, "ddp", 32)
    ddp = cell(cells, "ddp", 32)
    assert ddp["exposed_allreduce_share"] == pytest.approx(0.2) and ddp["allreduce_bytes_ratio"] == 1.0
    assert ddp["allreduce_bytes_per_rank"] == 1000.0 and "allreduce_bytes_ratio" not in mp

    ratios = report.compute_ratios(cells, "mp-overlap", SINGLE)
    assert set(report.RATIO_KEYS) <= set(ratios)
    assert ratios["mp_vs_best_single"] == pytest.approx(0.6 / 0.4)
    assert ratios["mp_vs_ddp_b32"] == pytest.approx(0.8 / 0.4)
    assert ratios["exposed_comm_share"] == pytest.approx(0.1)
    assert ratios["bytes_measured_vs_analytic"] == pytest.approx(1.0)
    assert ratios["mp_flops_share_of_matmul_peak"] == pytest.approx(1e9 * 128 / 1.6 / 1e12)
    targets = report.check_targets(ratios)
    assert [k for k, t in targets.items() if t["met"]] == ["mp_vs_ddp_b32", "bytes_measured_vs_analytic"]


def test_gpu_cells_count_bytes_but_report_no_host_time_for_exchanges():
    cells = []
    for mode, seconds in (("single", 1.0), ("mp-overlap", 0.6)):
        ranks = [rank_result(seconds, mode == "mp-overlap") for _ in range(2 if mode == "mp-overlap" else 1)]
        for r in ranks:
            if "comm_seconds" in r:
                r["comm_seconds"] = None  # what bench.py records on CUDA
        raw = {"mode": mode, "processes": len(ranks), "threads": 1, "units": len(ranks), "repeats": [ranks]}
        cells.append(report.summarise_run(raw, 128, 1e9, 1e12))
    mp = cells[1]
    assert mp["bytes_ratio"] == pytest.approx(1.0) and "exposed_comm_share" not in mp
    ratios = report.compute_ratios(cells, "mp-overlap", ("single",))
    assert ratios["exposed_comm_share"] is None and report.check_targets(ratios)["exposed_comm_share"]["met"] is None
    assert ratios["mp_vs_best_single"] == pytest.approx(1.0 / 0.6)


def test_result_files_hold_the_ratios_and_the_table(tmp_path):
    cells = fake_cells()
    ratios = report.compute_ratios(cells, "mp-overlap", SINGLE)
    result = {
        "machine": "test-machine", "date": "2000-01-02", "preset": "tiny", "description": "made up",
        "device": "cpu", "backend": "gloo", "cores": 2, "torch": "x", "forward_macs_per_image": 1e6,
        "params": 1e6, "settings": {"batches": [32, 128], "repeats": 3, "warmup": 1, "steps": 2, "amp": "off",
                                    "channels_last": False, "matmul_n": 64},
        "ratios": ratios, "ratio_basis": report.ratio_basis(cells, "mp-overlap"),
        "targets": report.check_targets(ratios), "matmul_peak": {"2 processes x 1 thread": {"peak": 1e11}},
        "p2p": [{"bytes": 4096, "seconds": 1e-4, "gbps": 0.04}], "runs": cells,
    }
    paths = report.write(result, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "test-machine-2000-01-02.json", "test-machine-2000-01-02.md", "test-machine-2000-01-02.png"]
    assert json.loads(paths["json"].read_text())["ratios"] == pytest.approx(ratios)
    md = paths["md"].read_text()
    assert md.count("\n| mp-overlap | ") == 2 and "| 64.0 |" in md  # mp at batch 128: 64 images/s
    assert md.count("| 20.0% (0.00 MB (1.00)) |") == 2  # ddp's all-reduce at both batches
    for key in report.RATIO_KEYS:
        assert f"| {key} |" in md
    assert "| 4 KiB | 100 us |" in md


def test_tiny_bench_run_writes_its_files(tmp_path):
    assert bench.main(["--tiny", "--out", str(tmp_path), "--machine", "tiny"]) == 0
    (json_path,) = tmp_path.glob("tiny-*.json")
    result = json.loads(json_path.read_text())
    assert set(report.RATIO_KEYS) <= set(result["ratios"])
    # What the pair sent and received is what the summary predicts, to the byte.
    assert result["ratios"]["bytes_measured_vs_analytic"] == 1.0
    modes = {(c["mode"], c["batch"]) for c in result["runs"]}
    assert modes == {(m, b) for m in (*FAKE, bench.DP_MP_MODE[0]) for b in (4, 8)}
    for c in result["runs"]:
        assert c["images_per_s"] > 0 and len(c["peak_mib"]) == c["processes"]
        if "bytes_ratio" in c:  # per cell: an over- and an under-count must not cancel out
            assert c["bytes_ratio"] == 1.0, c["mode"]
    assert {c["mode"] for c in result["runs"] if "bytes_ratio" in c} == {"mp", "mp-overlap", bench.DP_MP_MODE[0]}
    # Each replica all-reduces exactly its model's gradients (per cell), and waits for it a part of the step.
    reducing = [c for c in result["runs"] if "allreduce_bytes_ratio" in c]
    assert {c["mode"] for c in reducing} == {"ddp", bench.DP_MP_MODE[0]}
    for c in reducing:
        assert c["allreduce_bytes_ratio"] == 1.0 and c["allreduce_buckets"] >= 1, c["mode"]
        assert 0 < c["exposed_allreduce_share"] < 1, c["mode"]
    assert [p["bytes"] for p in result["p2p"]] == [4096, 16384, 65536]
    assert json_path.with_suffix(".md").read_text().startswith("### tiny")
    assert json_path.with_suffix(".png").stat().st_size > 0
