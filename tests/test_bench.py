"""make bench: its statistics and figures on made-up numbers, its report, and a tiny end-to-end run.

No timing thresholds: made-up repeats have known answers, and the real runs are checked for
what must hold exactly (bytes against the analytic counts, decodes per image per pair).
"""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet_mp.bench import gpu_images_per_s
from alexnet_mp.bench.calibrate import bf16_support
from alexnet_mp.bench.cli import main, verdicts
from alexnet_mp.bench.figures import Figures, check_targets
from alexnet_mp.bench.flops import flop_counter
from alexnet_mp.bench.images import HEIGHT, WIDTH, PhotoMaker
from alexnet_mp.bench.modes import cpu_modes, modes_at, peak_configs
from alexnet_mp.bench.report import assemble, render_markdown, write
from alexnet_mp.bench.runner import repeat_tasks
from alexnet_mp.bench.presets import TINY
from alexnet_mp.bench.stats import (Estimate, bootstrap_interval, drift_verdict, format_estimate, load_verdict,
                                    paired_ratios, sig2, stop_verdict, wrong_side_verdict)
from alexnet_mp.config import build_config
from alexnet_mp.summary import analytic_bytes
from alexnet_mp.transport import NullLink
from alexnet_mp.weights import build_column, build_reference
from harness import SMALL_MODEL

# ------------------------------------------------------------------ statistics


def test_paired_ratios_pair_repeat_by_repeat():
    assert paired_ratios([2.0, 4.0, 9.0], [1.0, 2.0, 3.0]) == [2.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="as many"):
        paired_ratios([1.0, 2.0], [1.0])


def test_bootstrap_interval_brackets_the_median_and_repeats_itself():
    values = [1.0, 1.1, 0.9, 1.05, 1.2, 0.95, 1.02]
    lower, upper = bootstrap_interval(values)
    assert lower <= float(np.median(values)) <= upper
    assert (lower, upper) == bootstrap_interval(values)  # seeded: the same run gives the same interval
    assert bootstrap_interval([3.0]) == (3.0, 3.0)
    tight = bootstrap_interval([1.0, 1.001, 0.999, 1.0005, 0.9995, 1.0, 1.0002])
    assert tight[1] - tight[0] < upper - lower


def test_bootstrap_interval_covers_the_true_median_about_as_often_as_it_claims():
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(200):  # log-normal samples: true median 1
        lower, upper = bootstrap_interval(np.exp(rng.normal(0, 0.1, size=15)), resamples=1000)
        hits += lower <= 1.0 <= upper
    assert 0.85 <= hits / 200 <= 1.0


def test_estimates_map_through_monotone_functions():
    e = Estimate(0.97, 0.95, 0.99, 5)
    overhead = e.map(lambda x: 1 - x, decreasing=True)
    assert (overhead.value, overhead.lower, overhead.upper) == pytest.approx((0.03, 0.01, 0.05))
    assert e.half_width == pytest.approx(0.02 / 0.97)


def test_stopping_rule_waits_for_narrow_intervals_or_a_cap():
    narrow, wide = {"a": Estimate(1.0, 0.98, 1.02, 4)}, {"a": Estimate(1.0, 0.8, 1.2, 4)}
    assert stop_verdict(narrow, 2, 3, 10, 0, 100)[0] is False  # fewer than the minimum
    stop, reason = stop_verdict(narrow, 3, 3, 10, 0, 100)
    assert stop and "under 5%" in reason
    assert stop_verdict(wide, 3, 3, 10, 10, 100, next_repeat_s=20)[0] is False
    stop, reason = stop_verdict(wide, 3, 3, 10, 90, 100, next_repeat_s=20)  # the next repeat would pass the cap
    assert stop and "time cap" in reason and "a's half-width" in reason
    stop, reason = stop_verdict(wide, 10, 3, 10, 0, 100)
    assert stop and "10 repeats" in reason


@pytest.mark.parametrize("x, text", [(1.94, "1.9"), (0.0473, "0.047"), (123.0, "120"), (0.999, "1.0"),
                                     (9.96, "10"), (2.0, "2.0"), (-0.012, "-0.012"), (0.05, "0.050"),
                                     (1234.5, "1200"), (None, "-")])
def test_two_significant_figures(x, text):
    assert sig2(x) == text


def test_estimates_print_with_their_interval():
    assert format_estimate(Estimate(1.94, 1.81, 2.04, 6)) == "1.9 [1.8, 2.0]"
    assert format_estimate(None) == "not measured"


def test_calibration_drift_beyond_the_limit_makes_a_run_inconclusive():
    assert drift_verdict(100.0, 95.0) == (pytest.approx(-0.05), None)
    for after in (85.0, 115.0):
        drift, reason = drift_verdict(100.0, after, unit=" GFLOP/s")
        assert abs(drift) == pytest.approx(0.15) and "15%" in reason and "100 GFLOP/s before" in reason


def test_other_programs_load_beyond_the_limit_makes_a_run_inconclusive():
    assert load_verdict(0.1, cores=2) is None and load_verdict(None, cores=2) is None
    assert "0.97 of the 2 cores" in load_verdict(0.97, cores=2)


def test_an_interval_wholly_on_the_wrong_side_condemns_the_method():
    assert wrong_side_verdict("x", Estimate(0.95, 0.93, 0.97, 5), 1.0, "profiling made steps faster") is not None
    assert wrong_side_verdict("x", Estimate(0.99, 0.97, 1.01, 5), 1.0, "...") is None  # reaches 1
    assert wrong_side_verdict("x", Estimate(1.05, 1.02, 1.08, 5), 1.0, "...") is None


# ------------------------------------------------------------------ figures on made-up repeats

CORES = 2
MODEL = build_config(overrides=SMALL_MODEL).model
# seconds per step at batch 32 (batch 128 takes 4x); two-indep trains two copies
STEP = {"single-1t": 1.0, "single-all": 0.6, "two-indep": 1.05, "mp": 0.52, "no-comm": 0.5, "ddp": 0.8,
        "mp-profiled": 0.53, "dp2xmp2": 0.65}
SPEED_OF_MACHINE = (1.0, 1.3, 0.8, 1.1)  # every mode slowed alike in a repeat
FLOPS_PER_IMAGE = 1e9


def fake_rank(mode, batch, column, seconds):
    comm = {}
    if mode.mp == 2 and mode.kind != "null":  # what the pair really sends: the analytic count
        comm = {k: dict(v, seconds=0.01) for k, v in analytic_bytes(MODEL, batch // mode.dp, column).items()}
    return {"seconds": seconds, "comm": comm, "nonfinite": 0, "column": column}


def fake_run(modes, batches=(32, 128), speeds=SPEED_OF_MACHINE, step=STEP):
    repeats = []
    for f in speeds:
        cells = {}
        for batch in batches:
            for m in modes_at(modes, batch, batches, 1):
                t = step[m.name] * batch / 32 * f
                cells[f"{m.name}@{batch}"] = {"seconds": t, "ranks": [fake_rank(m, batch, r % 2, t)
                                                                      for r in range(m.processes)]}
        peaks = {name: {"mm": 2e11 / f, "conv": 1e11 / f, "peak": 2e11 / f} for name in ("1x1", "1x2", "2x1")}
        repeats.append({"cells": cells, "peaks": peaks, "seconds": 1.0})
    flops = {k: FLOPS_PER_IMAGE * int(k.split("@")[1]) * (2 if k.startswith("two") else 1) for k in repeats[0]["cells"]}
    return repeats, flops


def test_paired_figures_cancel_the_machine_speed_between_repeats():
    modes = cpu_modes(CORES, bf16=False)
    figures = Figures(*fake_run(modes), modes, (32, 128), MODEL, "off")
    h = figures.headline()
    for key, e in h.items():  # every repeat gives the same ratio: the intervals close on it
        assert e.lower == pytest.approx(e.value) and e.upper == pytest.approx(e.value), key
    assert h["mp_vs_one_device"].value == pytest.approx(1.0 / 0.52)
    assert h["mp_vs_two_independent"].value == pytest.approx((1 / 0.52) / (2 / 1.05))
    assert h["mp_vs_best_single"].value == pytest.approx(0.6 / 0.52)
    assert h["best_single_ceiling"].value == pytest.approx(2 * 0.6 / 1.0)  # 2 / S, S = 1 / 0.6
    assert h["mp_vs_ddp_b32"].value == pytest.approx(0.8 / 0.52)
    assert h["comm_overhead"].value == pytest.approx(1 - 0.5 / 0.52)
    assert h["dp2xmp2_overhead"].value == pytest.approx(1 - 0.52 / 0.65)
    assert h["profiler_overhead"].value == pytest.approx(0.53 / 0.52 - 1)
    # FLOPs per second of the pair at batch 128 over the 2x1 peak measured in the same repeat
    assert h["flops_share_of_peak"].value == pytest.approx(FLOPS_PER_IMAGE * 128 / (4 * 0.52) * 1.0 / 2e11)
    assert figures.bytes_ratio() == 1.0


def test_unpaired_noise_widens_the_interval():
    modes = cpu_modes(CORES, bf16=False)
    step = dict(STEP)
    repeats, flops = fake_run(modes, step=step)
    for k, r in enumerate(repeats):  # the pair alone jitters from repeat to repeat
        for batch in (32, 128):
            r["cells"][f"mp@{batch}"]["seconds"] *= (1.0, 1.2, 0.9, 1.1)[k]
    e = Figures(repeats, flops, modes, (32, 128), MODEL, "off").headline()["mp_vs_one_device"]
    assert e.lower < e.value < e.upper


def test_bytes_over_or_under_the_analytic_count_show_in_the_ratio_and_do_not_cancel():
    modes = cpu_modes(CORES, bf16=False)
    repeats, flops = fake_run(modes)
    comm = repeats[0]["cells"]["mp@32"]["ranks"][0]["comm"]
    comm["fc6.forward"]["sent"] += 4  # one float too many here ...
    comm["fc7.forward"]["sent"] -= 4  # ... and one too few there
    assert Figures(repeats, flops, modes, (32, 128), MODEL, "off").bytes_ratio() > 1.0
    del comm["logits.forward"]  # an exchange that never happened
    assert Figures(repeats, flops, modes, (32, 128), MODEL, "off").bytes_ratio() > 1.0


def test_targets_say_met_and_unmet_and_need_the_lower_bound():
    values = {"mp_vs_one_device": 1.95, "mp_vs_two_independent": 0.9, "comm_overhead": 0.03,
              "bytes_measured_vs_analytic": 1.0, "flops_share_of_peak": 1.2, "h2d_bytes_per_image": 3 * 67 * 67}
    t = check_targets(values, {"mp_vs_one_device": [1.7, 2.1]}, crop=67)
    assert t["mp_vs_one_device"]["met"] is False  # 1.95 >= 1.9, but the interval reaches below 1.8
    assert t["mp_vs_two_independent"]["met"] is False and t["comm_overhead"]["met"] is True
    assert t["bytes_measured_vs_analytic"]["met"] is True and t["flops_share_of_peak"]["met"] is False
    assert t["h2d_bytes_per_image"]["met"] is True and t["mp_vs_ddp_b32"]["met"] is None
    assert check_targets(values, {"mp_vs_one_device": [1.85, 2.0]}, crop=67)["mp_vs_one_device"]["met"] is True


def fake_state():
    return {"load_before": 0.5, "load_after": 0.6, "foreign_cores": 0.1, "calibration_before": 5e10,
            "calibration_after": 5.1e10}


def fake_result(step=STEP):
    modes = cpu_modes(CORES, bf16=False)
    figures = Figures(*fake_run(modes, step=step), modes, (32, 128), MODEL, "off")
    state = fake_state()
    inconclusive, warnings = verdicts(figures, state, CORES)
    info = {"machine": "made-up", "date": "2000-01-02", "preset": "quick", "description": "made up", "gpu": False,
            "device": "cpu", "backend": "gloo", "cores": CORES, "torch": "x", "seconds": 1.0,
            "settings": {"repeats": 4, "steps": 2, "warmup": 1, "stop_reason": "made up"},
            "machine_state": state, "bf16": {"run": False, "note": "no bf16 here"},
            "inconclusive": inconclusive, "warnings": warnings}
    return assemble(info, figures, None, crop=MODEL.crop_size)


def test_report_prints_every_figure_with_its_interval_and_writes_whole_files(tmp_path):
    result = fake_result()
    assert result["inconclusive"] is False and result["warnings"] == []
    assert result["ratios_ci"]["mp_vs_one_device"] == pytest.approx([1 / 0.52] * 2)
    md = render_markdown(result)
    assert "| mp_vs_one_device | 1.9 [1.9, 1.9] | >= 1.9 with lower bound >= 1.8 | yes |" in md
    assert "| comm_overhead | 0.038 [0.038, 0.038] | <= 0.05 | yes |" in md
    assert "| bytes_measured_vs_analytic | 1 | == 1 | yes |" in md
    assert md.count("\n| mp | ") == 2 and "| 32 | 1.9 [1.9, 1.9] |" in md  # a mode row per batch; scaling
    paths = write(result, tmp_path / "results")
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["made-up-2000-01-02.json",
                                                                        "made-up-2000-01-02.md"]
    assert json.loads(paths["json"].read_text())["ratios"] == pytest.approx(result["ratios"])


def test_a_profiler_that_speeds_steps_up_marks_the_run_inconclusive():
    result = fake_result(dict(STEP, **{"mp-profiled": 0.45}))
    assert "profiler_overhead" in result["inconclusive"] and "method is wrong" in result["warnings"][0]
    assert "**Inconclusive**" in render_markdown(result)


def test_every_repeat_measures_every_mode_once_in_a_rotated_order():
    modes = cpu_modes(CORES, bf16=False)
    peaks = peak_configs(modes, CORES, gpu=False)
    orders = [repeat_tasks(modes, peaks, TINY, r) for r in range(3)]
    for tasks in orders:
        cells = [(t[1].name, t[2]) for t in tasks if t[0] == "cell"]
        assert len(cells) == len(set(cells)) == 2 * len(modes) - 1  # mp-profiled at the smallest batch only
        assert sorted(t[1] for t in tasks if t[0] == "peak") == sorted(peaks)
    firsts = [[t for t in tasks if t[0] == "cell"][0][1].name for tasks in orders]
    assert len(set(firsts)) == 3


# ------------------------------------------------------------------ pieces that measure


def test_bf16_rows_follow_the_cpus_matrix_units():
    assert bf16_support({"avx2", "fma"}) == (False, pytest.approx(bf16_support({"avx2"})[1]))
    assert "AVX2" in bf16_support({"avx2"})[1]
    assert bf16_support({"avx512f", "amx_bf16"})[0] is True
    assert [m.name for m in cpu_modes(2, bf16=True)][-2:] == ["single-1t-bf16", "mp-bf16"]


def test_flop_count_of_the_grouped_reference_equals_the_two_columns():
    cfg = build_config(overrides=SMALL_MODEL).model
    x = torch.randn(2, 3, cfg.crop_size, cfg.crop_size)
    with flop_counter() as counter:
        build_reference(cfg, 0)(x).sum().backward()
    reference = counter.get_total_flops()
    columns = 0
    for c in (0, 1):
        with flop_counter() as counter:
            build_column(cfg, c, NullLink(c), 0)(x).sum().backward()
        columns += counter.get_total_flops()
    assert reference == columns > 0


def test_photo_like_images_are_real_size_deterministic_and_compress_like_photos():
    maker = PhotoMaker(seed=3)
    jpeg = maker.photo(0)
    assert jpeg == PhotoMaker(seed=3).photo(0) and jpeg != maker.photo(1)
    with Image.open(io.BytesIO(jpeg)) as im:
        assert im.format == "JPEG" and im.size == (WIDTH, HEIGHT)
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(
        noise, "JPEG", quality=90)
    assert len(jpeg) < len(noise.getvalue()) / 3


def test_tiny_bench_run_writes_its_files_with_exact_counts(tmp_path):
    out = tmp_path / "results"
    assert main(["--tiny", "--modes", "single-1t,mp", "--repeats", "1", "--out", str(out), "--machine", "tiny"]) == 0
    (json_path,) = out.glob("tiny-*.json")
    result = json.loads(json_path.read_text())
    assert set(result) >= {"ratios", "ratios_ci", "targets", "loader", "inconclusive"}
    # What the pair sent and received is what summary.analytic_bytes predicts, to the byte.
    assert result["ratios"]["bytes_measured_vs_analytic"] == 1.0
    assert result["targets"]["bytes_measured_vs_analytic"]["met"] is True
    loader = result["loader"]
    assert loader["decodes_per_image_per_pair"] == 1.0  # each image decoded once per pair, by one column
    assert loader["h2d_bytes_per_image"] == 3 * 67 * 67 and loader["h2d_metadata_bytes_per_image"] > 0
    assert all(v["decodes_per_image_per_pair"] == 1.0 for v in loader["pair"].values())
    assert {c["mode"] for c in result["runs"]} == {"single-1t", "mp"}
    assert all(c["images_per_s"] > 0 and c["flops_per_step"] > 0 for c in result["runs"])
    assert json_path.with_suffix(".md").read_text().startswith("### tiny")
    assert not list(out.glob("*.part"))


def test_single_device_measurement_for_other_modules_runs_the_training_step():
    out = gpu_images_per_s(batch=4, amp="off", channels_last=False, warmup=1, steps=2, device="cpu",
                           overrides=[*SMALL_MODEL, "model.num_classes=5"], mm=64, mm_s=0.01, timeout=300)
    assert out["images_per_s"] > 0 and out["batch"] == 4 and out["timed_steps"] == 2
    assert out["flops_per_image"] > 0 and out["matmul_tflops"] > 0 and out["share_of_matmul_peak"] > 0


# ---------------------------------------------------------------- the data checks on a big folder

def test_the_folder_check_counts_every_file_it_made_and_times_each_mode(tmp_path, capsys):
    from alexnet_mp.bench import folder_check

    out = tmp_path / "result.json"
    assert folder_check.main(["--files", "250", "--classes", "7", "--sample", "20", "--repeats", "2",
                              "--dir", str(tmp_path), "--out", str(out), "--machine", "here"]) == 0
    result = json.loads(out.read_text())
    assert result["files"] == 250 + 7 and result["machine"] == "here" and result["check_sample_files"] == 20
    assert all(result[k] > 0 for k in ("listing_with_stat_s", "check_sample_s", "check_full_s"))
    assert "257 files" in out.with_suffix(".md").read_text() and "257 files" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json", "result.md"]  # the folder is gone


def test_the_folder_check_refuses_sizes_below_one(capsys):
    from alexnet_mp.bench import folder_check

    assert folder_check.main(["--files", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
