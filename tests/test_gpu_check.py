"""The GPU check (python -m alexnet_mp.gpu_check) where there is no GPU: its no-CUDA path, its
report and runner, and the logic of every check that also runs on CPUs. gloo keeps no connection
to itself, so NCCL's one-rank self-loop is stood in for by a mirrored pair: two processes that both
hold column 0, each the other's peer (alexnet_mp/gpucheck/loop.py)."""
import json
import os
import subprocess
import sys
import time
import traceback

import pytest
import torch

from alexnet_mp.gpucheck.compare import compare
from alexnet_mp.gpucheck.configs import SMALL, config
from alexnet_mp.gpucheck.hardware import clock_verdict, nvml_verdict
from alexnet_mp.gpucheck.link_checks import (link_values, link_values_verdict, loop_layout, step_verdict,
                                             steps_against_copy)
from alexnet_mp.gpucheck.loader import loader_verdict, loader_worker
from alexnet_mp.gpucheck.loop import LoopbackLink, check_symmetric
from alexnet_mp.gpucheck.numerics import reference_verdict, reference_worker
from alexnet_mp.gpucheck.pair_checks import check_pair_reference, check_pair_resume, check_scaling, profiled_verdict
from alexnet_mp.gpucheck.resume_checks import resume_runs
from alexnet_mp.gpucheck.report import CheckResult, build_report, exit_status, outcome, write_report
from alexnet_mp.gpucheck.resume_checks import check_across, check_resume, same_device_verdict
from alexnet_mp.gpucheck.runner import Budget, Check, error_line, run_all, run_check
from alexnet_mp.gpucheck.runs import run_spec, runs_worker
from alexnet_mp.gpucheck.timing import check_throughput, throughput_worker
from alexnet_mp.gpu_check import main
from alexnet_mp.weights import build_column, merge_states
from harness import run_ranks

CPU = ["dist.device=cpu", "dist.threads=1"]
LOOP = [*SMALL, "train.batch_size=8", "data.train_size=32", *CPU]  # even classes and batch: symmetric exchanges
REPORT_KEYS = {"format", "created", "command", "machine", "gpus", "driver", "versions", "budget_s", "elapsed_s",
               "counts", "checks"}


# ---------------------------------------------------------------- the command and its report


def test_without_cuda_the_check_says_so_exits_0_and_writes_its_report(tmp_path):
    out = tmp_path / "report.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "alexnet_mp.gpu_check", "--out", str(out)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    checks = [ln for ln in proc.stdout.splitlines() if ln.startswith("CHECK ")]
    assert checks == [checks[0]] and checks[0].startswith("CHECK cuda: INFO CUDA is not available")
    report = json.loads(out.read_text())
    assert REPORT_KEYS <= report.keys() and report["gpus"] == []
    assert {"torch", "torchvision", "python", "cuda", "cudnn", "nccl"} <= report["versions"].keys()
    assert report["counts"] == {"PASS": 0, "FAIL": 0, "INFO": 1} and report["checks"][0]["name"] == "cuda"
    assert not list(tmp_path.glob("*.part"))


def test_bad_arguments_are_refused_in_one_line(tmp_path, capsys):
    assert main(["--budget", "0", "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "--budget" in err
    assert not (tmp_path / "r.json").exists()


def test_report_lines_are_one_line_each_and_the_json_counts_them(tmp_path):
    results = [CheckResult("a", "PASS", "fine\n  really", 1.5, {"x": 1.0}), CheckResult("b", "INFO", "a figure"),
               CheckResult("c", "FAIL", "broken")]
    assert [r.line() for r in results] == ["CHECK a: PASS fine really", "CHECK b: INFO a figure",
                                           "CHECK c: FAIL broken"]
    with pytest.raises(ValueError, match="status"):
        CheckResult("d", "OK", "")
    report = build_report(results, {"machine": {}, "gpus": [], "driver": None, "versions": {}}, 480, 12.0, "cmd")
    path = write_report(report, tmp_path / "r.json")
    back = json.loads(path.read_text())
    assert REPORT_KEYS <= back.keys() and back["counts"] == {"PASS": 1, "FAIL": 1, "INFO": 1}
    assert back["checks"][0] == {"name": "a", "status": "PASS", "detail": "fine really", "seconds": 1.5,
                                 "figures": {"x": 1.0}}
    assert exit_status(results) == 1 and exit_status(results[:2]) == 0


def test_error_lines_name_the_exception_the_rank_and_where_it_was_raised():
    try:
        check_symmetric(config("model.num_classes=5"))
    except ValueError:
        text = "rank 1 failed in a_worker:\n" + traceback.format_exc()
    line = error_line(text)
    assert line.startswith("rank 1: ValueError: a column can be its own peer") and "\n" not in line
    assert line.endswith("(at alexnet_mp/gpucheck/loop.py:" + line.rsplit(":", 1)[1])
    assert "check_symmetric" in line
    assert error_line("ranks [0] did not finish x within 5 s").startswith("timed out:")


def hanging(rank):  # module level: a spawned process imports it
    time.sleep(600)


def test_a_failing_or_hanging_check_never_stops_the_others(capsys):
    checks = [Check("hangs", lambda b: b.spawn(hanging)[0], 8),
              Check("fails", lambda b: 1 / 0, 60),
              Check("passes", lambda b: outcome("PASS", "fine", value=1), 60)]
    results = run_all(checks, total_s=600, say=lambda text: None)
    by_name = {r.name: r for r in results}
    assert [r.status for r in results] == ["FAIL", "FAIL", "PASS"]
    assert by_name["hangs"].detail.startswith("timed out") and by_name["hangs"].seconds < 60
    assert by_name["fails"].detail.startswith("ZeroDivisionError")
    assert by_name["passes"].figures == {"value": 1}
    assert capsys.readouterr().out.splitlines() == [r.line() for r in results]
    late = run_check(Check("late", lambda b: outcome("PASS", "never"), 60), until=time.monotonic() - 1, total_s=480)
    assert late.status == "FAIL" and "not run" in late.detail and "--only late" in late.detail


class Replay(Budget):
    """A budget whose processes are replaced by recorded results, handed out in order."""

    def __init__(self, *results):
        super().__init__(60)
        self.results, self.calls, self.args = list(results), [], []

    def spawn(self, fn, ranks=1, args=(), env=None):
        self.calls.append((fn.__name__, ranks))
        self.args.append(args)
        return self.results.pop(0)


# ---------------------------------------------------------------- the link: self-loop logic on a mirrored pair


STEP_VARIANTS = {"fp32": [], "bf16 NHWC": ["dist.amp=bf16", "dist.channels_last=true"]}


def mirrored_worker(rank):
    """The link checks' work on a mirrored pair: one process group for both."""
    cfg, layout = loop_layout(LOOP)
    return {"values": link_values(cfg, layout), "steps": steps_against_copy(layout, LOOP, STEP_VARIANTS, 3, 1)}


@pytest.fixture(scope="module")
def mirrored():
    return run_ranks(mirrored_worker, 2, timeout=300)


def test_the_real_link_equals_the_in_process_copy_in_every_variant(mirrored):
    for rank in (0, 1):
        variants = mirrored[rank]["values"]
        assert len(variants) == 8 and all(v["identical"] for v in variants.values())
        assert link_values_verdict(variants)["status"] == "PASS"
    variants = mirrored[0]["values"]
    spoiled = dict(variants, **{"bf16 NHWC": dict(variants["bf16 NHWC"], identical=False, max_rel_diff=0.3)})
    assert link_values_verdict(spoiled)["status"] == "FAIL"


def test_the_training_step_over_the_real_link_trains_the_copys_weights(mirrored):
    steps = mirrored[0]["steps"]
    verdict = step_verdict(steps)
    assert verdict["status"] == "PASS", verdict["detail"]
    assert all(len(f["losses"]) == 3 and f["watched"] == 0 for f in verdict["figures"].values())  # no CUDA, no watch
    broken = {"fp32": dict(steps["fp32"], copy=dict(steps["fp32"]["copy"], losses=[float("nan")] * 3))}
    assert step_verdict(broken)["status"] == "FAIL"


def test_a_column_can_be_its_own_peer_only_when_every_exchange_is_symmetric():
    with pytest.raises(ValueError, match="even"):
        check_symmetric(config(*LOOP, "model.num_classes=5"))
    cfg = config(*LOOP, "model.fc8=rank0")
    model = build_column(cfg.model, 0, LoopbackLink(0), cfg.train.seed)
    with pytest.raises(ValueError, match="one-sided"):
        model(torch.zeros(2, 3, 67, 67))


# ---------------------------------------------------------------- numerics, checkpoints, figures


def test_the_reference_comparison_passes_equal_devices_and_fails_beyond_its_tolerance():
    threads = torch.get_num_threads()
    try:
        r = reference_worker(0, [*SMALL, *CPU], 4)  # the CPU against itself: no GPU here
    finally:
        torch.set_num_threads(threads)
    assert r["fp32"]["identical"] and r["fp32"]["tensors"] == 1 + 16  # logits and every gradient
    assert reference_verdict(r)["status"] == "PASS"
    assert reference_verdict(dict(r, fp32=dict(r["fp32"], identical=False, max_rel_diff=1e-2)))["status"] == "FAIL"


def finished(value: float, steps: int = 6) -> dict:
    """What runs_worker reports for a run that ended with every weight at `value`."""
    return {"weights": {"w": torch.full((4,), value)}, "steps": steps,
            "start": {"buffers": 1, "on_param_device": True, "param_strides": True}}


@pytest.mark.parametrize("resumed_value,status", [(1.0, "PASS"), (1.0 + 1e-9, "PASS"), (1.1, "FAIL")])
def test_the_cross_device_check_resumes_each_way_and_compares_on_the_resuming_device(resumed_value, status):
    budget = Replay({0: {"d0-straight": finished(1.0), "d0-half": finished(0.5, 3)}},
                    {0: {"d1-straight": finished(1.0), "d1-half": finished(0.5, 3), "d1-from-d0": finished(1.0)}},
                    {0: {"d0-from-d1": finished(resumed_value)}})
    verdict = check_across(budget, ("cuda", "cpu"))
    assert budget.calls == [("runs_worker", 1)] * 3 and verdict["status"] == status, verdict["detail"]
    devices = [next(k for k in args[0] if k.startswith("dist.device=")) for args in budget.args]
    assert devices == ["dist.device=cuda", "dist.device=cpu", "dist.device=cuda"]
    assert [r["resume"] for args in budget.args for r in args[1] if r["resume"]] == ["d0-half", "d1-half"]
    assert set(verdict["figures"]) == {"cuda->cpu", "cpu->cuda"}
    assert verdict["figures"]["cpu->cuda"]["ok"] == (status == "PASS")


def test_the_one_device_resume_check_wants_bit_equality():
    for resumed, status in ((1.0, "PASS"), (1.0 + 1e-6, "FAIL")):
        budget = Replay({0: {"same-straight": finished(1.0), "same-half": finished(0.5, 3),
                             "same-resumed": finished(resumed)}})
        assert check_resume(budget, "cuda")["status"] == status
        assert "dist.device=cuda" in budget.args[0][0] and "train.deterministic=true" in budget.args[0][0]


SMALL_PAIR = (*LOOP, "data.train_size=64", "train.epochs=2", "train.deterministic=true")


@pytest.fixture(scope="module")
def pair_runs(tmp_path_factory):
    """The pair check's runs (straight, half, resumed) and a profiled run, on two gloo processes."""
    runs = [*resume_runs("pair"), run_spec("profiled", "profile.enabled=true", "profile.skip_steps=1",
                                           "train.max_steps=4")]
    out = tmp_path_factory.mktemp("pair")
    return run_ranks(runs_worker, 2, args=([*SMALL_PAIR, "dist.mp=2"], runs, str(out)), timeout=300)


def test_the_pair_resume_check_passes_a_pair_that_resumes_exactly(pair_runs):
    budget = Replay({r: {k: v for k, v in runs.items() if k.startswith("pair-")} for r, runs in pair_runs.items()})
    verdict = check_pair_resume(budget, base=SMALL_PAIR)
    assert budget.calls == [("runs_worker", 2)]
    assert verdict["status"] == "PASS" and verdict["figures"]["max_rel_diff"] == 0, verdict["detail"]
    # A resumed run that does not match its straight run fails.
    same = {"weights": {"w": torch.ones(3)}, "start": {"buffers": 1, "on_param_device": True, "param_strides": True},
            "steps": 6}
    runs = {"p-straight": same, "p-half": dict(same, weights={"w": torch.zeros(3)}),
            "p-resumed": dict(same, weights={"w": torch.full((3,), 1.001)})}
    assert same_device_verdict(runs, "p", "here")["status"] == "FAIL"


def test_the_pair_reference_check_allows_rounding_not_a_difference(pair_runs):
    model = config(*SMALL_PAIR).model
    pair = {r: {"pair": pair_runs[r]["pair-straight"]} for r in (0, 1)}
    merged = merge_states([pair_runs[r]["pair-straight"]["weights"] for r in (0, 1)], model)
    early = merge_states([pair_runs[r]["pair-half"]["weights"] for r in (0, 1)], model)

    def reference(scale):
        weights = {k: v * (1 + scale) for k, v in merged.items()}
        return {0: {"reference": {"weights": weights}, "reference-1": {"weights": early}}}

    assert check_pair_reference(Replay(pair, reference(1e-7)), base=SMALL_PAIR)["status"] == "PASS"
    assert check_pair_reference(Replay(pair, reference(1e-2)), base=SMALL_PAIR)["status"] == "FAIL"


def test_a_profiled_pair_reports_its_bytes_as_counted(pair_runs):
    verdict = profiled_verdict(pair_runs[0]["profiled"]["profile"])
    assert verdict["status"] == "PASS" and verdict["figures"]["byte_mismatches"] == 0, verdict["detail"]
    assert pair_runs[1]["profiled"]["profile"] is None  # rank 0 writes the report
    assert profiled_verdict(None)["status"] == "FAIL"


def test_step_timing_counts_every_replicas_images_on_the_host_clock():
    ddp = run_ranks(throughput_worker, 2, args=([*LOOP, "data.train_size=64", "dist.mp=1"], {"DDP": []}, 1, 2),
                    timeout=300)
    for r in (0, 1):
        f = ddp[r]["DDP"]
        assert f["clock"] == "HostClock" and f["steps"] == 2 and f["images_per_s"] > 0
        assert f["images_per_s"] * f["step_ms"] / 1e3 == pytest.approx(2 * 8)  # both replicas' batches
    # The scaling check: the slowest rank of each setup, and the ratios to one device.
    fast, slow = dict(ddp[0]["DDP"], images_per_s=200.0), dict(ddp[0]["DDP"], images_per_s=100.0)
    budget = Replay({0: {"one GPU": slow}}, {0: {"pair (MP)": fast}, 1: {"pair (MP)": slow}},
                    {0: {"DDP": fast}, 1: {"DDP": fast}})
    result = check_scaling(budget, base=tuple(LOOP), batch=8)
    assert [c[1] for c in budget.calls] == [1, 2, 2] and result["status"] == "INFO"
    assert result["figures"]["pair (MP)"]["images_per_s"] == 100 and "DDP 200 img/s (2.00x)" in result["detail"]


def no_gpu_measure(**settings):
    raise RuntimeError("this measurement needs a GPU")


def canned_measure(**settings):
    return {"images_per_s": 1000.0, "step_ms": 128.0, "tflops": 2.0, "share_of_matmul_peak": 0.5, **settings}


def test_one_device_throughput_comes_from_the_benchs_measurement_or_is_timed_here_when_it_fails():
    base = [*LOOP, "data.train_size=64", "dist.mp=1"]
    shared = check_throughput(Budget(60), base, 8, find_measure=lambda: canned_measure)
    assert shared["status"] == "INFO" and set(shared["figures"]) == {"fp32", "fp32 TF32", "bf16 channels_last"}
    assert shared["figures"]["bf16 channels_last"]["amp"] == "bf16" and "2.0 TFLOP/s" in shared["detail"]
    assert shared["figures"]["fp32"]["device"] == "cpu"
    own = check_throughput(Budget(300), base, 8, find_measure=lambda: no_gpu_measure)
    assert own["status"] == "FAIL" and "RuntimeError: this measurement needs a GPU" in own["detail"]
    assert all(f["clock"] == "HostClock" and f["images_per_s"] > 0 for f in own["figures"].values())


def test_the_loader_check_cuts_the_same_crops_on_both_paths(tmp_path):
    r = loader_worker(0, str(tmp_path), train=48, batch=16, workers=0, epochs=1, device="cpu")
    assert r["cpu_images_per_s"] > 0 and r["device_images_per_s"] > 0
    assert r["mean_grey_diff"] == 0 and loader_verdict(r)["status"] == "PASS"
    assert loader_verdict(dict(r, mean_grey_diff=9.0))["status"] == "FAIL"


def test_clock_and_nvml_verdicts_need_what_they_claim():
    assert clock_verdict({"device_s": 0.25, "host_s": 0.26, "queued_s": 0.001})["status"] == "PASS"
    assert clock_verdict({"device_s": 0.25, "host_s": 0.26, "queued_s": 0.25})["status"] == "FAIL"  # marks waited
    assert clock_verdict({"device_s": 0.01, "host_s": 0.26, "queued_s": 0.001})["status"] == "FAIL"  # missed the work
    sampler = {"samples": 20, "read_errors": 0, "gpu_util_pct": {"mean": 90.0, "max": 100.0},
               "power_w": {"mean": 300.0, "max": 400.0}, "sm_clock_mhz": {"mean": 1900.0, "max": 1980.0}}
    good = {"torch_uuid": "abc-1", "nvml_uuid": "abc-1", "found_by_uuid": True, "sampler": sampler}
    assert nvml_verdict(good)["status"] == "PASS"
    assert nvml_verdict(dict(good, nvml_uuid="def-2"))["status"] == "FAIL"
    assert nvml_verdict({"error": "no driver", "torch_uuid": "abc-1"})["status"] == "FAIL"


def test_comparisons_report_bit_equality_and_the_worst_relative_difference():
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([10.0, 0.0])}
    assert compare(a, dict(a))["identical"]
    r = compare({"x": a["x"], "y": torch.tensor([10.0, 0.5])}, a)
    assert not r["identical"] and r["worst"] == "y" and r["max_rel_diff"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="names"):
        compare({"x": a["x"]}, a)
