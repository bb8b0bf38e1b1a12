"""The profiler: summary arithmetic, NVML with and without a GPU, the render command, the trainer and
link seams driven by hand in one process, and profiled 2- and 4-process gloo runs of launch/train.py."""
import json
import statistics
import time
from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from alexnet_mp import profiler
from alexnet_mp.config import build_config
from alexnet_mp.distributed import Layout
from alexnet_mp.model import LAYERS
from alexnet_mp.parallel_dims import ParallelDims
from alexnet_mp.summary import analytic_bytes, param_count, reference_memory
from alexnet_mp.callbacks import Callback
from alexnet_mp.transport import NullLink
from alexnet_mp.weights import build_column, build_reference, dropout_generator
from harness import SMALL_MODEL, run_ranks

# The tiny network of the end-to-end runs, for the tests that run in this process.
UNIT = [*SMALL_MODEL, "train.batch_size=8", "dist.device=cpu", "dist.threads=1"]


def end_to_end():
    """test_train's launch helpers, imported on use: they load the whole training script."""
    import test_train
    return test_train


# --------------------------------------------------------------- synthetic records


def synthetic_rank(rank, conv3_waits, conv1_forward, nbytes=(2304, 2304)):
    """Steps of 10 ms with a known breakdown; the conv3.forward wait varies per step."""
    steps = []
    for index, (wait, fwd) in enumerate(zip(conv3_waits, conv1_forward)):
        t = [0.0]

        def span(seconds):
            t[0] += seconds
            return t[0] - seconds, t[0]

        events = [["data", "data", *span(0.001)], ["forward", "conv1", *span(fwd)],
                  ["comm", "conv3.forward", *span(wait)], ["loss", "loss", *span(0.0005)],
                  ["backward", "conv1", *span(0.002)], ["optimizer", "optimizer", *span(0.0005)]]
        steps.append({"index": index + 2, "batch": 8, "seconds": 0.010, "events": events,
                      "bytes": {"conv3.forward": list(nbytes)}})
    return {"rank": rank, "column": rank, "peer": 1 - rank, "dp_rank": 0, "device": "cpu", "threads": 1,
            "machine": {"host": "h", "cpu": "cpu", "cores": 2, "memory_bytes": 2**30, "gpu": None},
            "versions": {"torch": "t", "python": "p", "backend": "gloo"}, "steps": steps,
            "seen": len(steps) + 2, "bytes_checked": len(steps) + 2, "byte_mismatches": [],
            "mismatch_counts": {},
            "analytic": {"conv3.forward": {"sent": 2304, "recv": 2304}},
            "memory": {"kind": "resident set (VmHWM)", "peak_bytes": 2**29, "at_start_bytes": 2**28,
                       "model_state_bytes": 1000, "scope": "the first 5 training steps"},
            "nvml": {"available": False, "reason": "no GPU"}, "trace": None}


def test_summary_arithmetic_on_synthetic_records(tmp_path):
    waits0, waits1 = [0.004, 0.001, 0.003], [0.002, 0.002, 0.001]  # rank 0 arrives first in steps 1 and 3
    fwd0 = [0.001, 0.003, 0.002]
    ranks = [synthetic_rank(0, waits0, fwd0), synthetic_rank(1, waits1, [0.002] * 3, nbytes=(2304, 2300))]
    ranks[1]["mismatch_counts"] = {"conv3.forward": 1}
    ranks[1]["byte_mismatches"] = [{"step": 3, "key": "conv3.forward", "measured": [2304, 2300],
                                    "analytic": [2304, 2304]}]
    cfg = build_config(overrides=UNIT)
    profile = profiler.build_profile(ranks, cfg, str(tmp_path), skipped=2, traced=0)
    r0, r1 = profile["ranks"]

    for r in (r0, r1):
        assert r["phases"]["other"]["mean_s"] >= 0  # no moment counted in two parts
        assert r["step"]["mean_s"] == pytest.approx(0.010) and r["images_per_s"] == pytest.approx(800)
    assert r0["layers"]["conv1"]["forward"]["median_s"] == pytest.approx(0.002)
    assert r0["layers"]["conv1"]["forward"]["share"] == pytest.approx(0.2)
    other = [0.010 - (0.001 + f + w + 0.0005 + 0.002 + 0.0005) for f, w in zip(fwd0, waits0)]
    assert r0["phases"]["other"]["mean_s"] == pytest.approx(statistics.fmean(other))
    # Transfer: per step the shorter of the two waits; the rest of each rank's wait is the wait for the peer.
    transfer = statistics.fmean(min(a, b) for a, b in zip(waits0, waits1))
    c0, c1 = r0["crossings"]["conv3.forward"], r1["crossings"]["conv3.forward"]
    assert c0["transfer_s"] == pytest.approx(transfer) == c1["transfer_s"]
    assert c0["peer_wait_s"] == pytest.approx(statistics.fmean(waits0) - transfer)
    assert c0["wait"]["median_s"] == pytest.approx(0.003)
    assert c0["bandwidth_bytes_per_s"] == pytest.approx(2 * 2304 / transfer)
    assert c0["bytes_match"] and not c1["bytes_match"]
    assert r0["allreduce"] is None and "all-reduce" not in profiler.render_table(profile)  # no replicas
    assert profiler.sum_shares(r0) == pytest.approx(1.0)
    assert profile["steps"]["timeline_step"] == 2  # every step takes the median time: the first one
    assert profile["reference_memory"] == reference_memory(cfg.model, 8)

    table = profiler.render_table(profile)
    assert "wait conv3.forward" in table and "DIFFERS" in table and "not available: no GPU" in table
    profiler.plot_timeline(profile, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 0


def test_allreduce_arithmetic_on_synthetic_records(tmp_path):
    ranks = [synthetic_rank(r, [0.002] * 3, [0.001] * 3) for r in (0, 1)]
    exposed = [0.001, 0.003, 0.002]
    for r in ranks:
        r["allreduce_analytic"] = 4000
        for step, wait in zip(r["steps"], exposed):  # the wait follows backward, out of what was "other"
            step["events"].append(["allreduce", "dp.allreduce", 0.007, 0.007 + wait])
            step["allreduce"] = {"buckets": 2, "bytes": 4000, "first_launch": 0.006, "last_launch": 0.007,
                                 "last_ready": 0.007 + wait}
    # A mismatch on a step before the last, whose example was cut off: the count alone makes it DIFFER.
    ranks[1]["mismatch_counts"] = {"dp.allreduce": 1}
    profile = profiler.build_profile(ranks, build_config(overrides=UNIT), str(tmp_path), skipped=2, traced=0)
    r0, r1 = profile["ranks"]
    a = r0["allreduce"]
    assert a["exposed"]["mean_s"] == pytest.approx(0.002) and a["exposed"]["share"] == pytest.approx(0.2)
    in_flight = statistics.fmean(0.001 + w for w in exposed)
    assert a["in_flight"]["mean_s"] == pytest.approx(in_flight)
    assert a["hidden_share"] == pytest.approx(1 - 0.002 / in_flight)
    assert (a["buckets"], a["bytes"], a["bytes_match"]) == (2, 4000, True) and not r1["allreduce"]["bytes_match"]
    # Other shrinks by the exposed wait, and the parts still add up to the step.
    other = 0.010 - (0.001 + 0.001 + 0.002 + 0.0005 + 0.002 + 0.0005) - 0.002
    assert r0["phases"]["other"]["mean_s"] == pytest.approx(other)
    assert profiler.sum_shares(r0) == pytest.approx(1.0)
    table = profiler.render_table(profile)
    assert "wait dp all-reduce" in table and "DIFFERS" in table and "equal" in table
    profiler.plot_timeline(profile, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 0


def test_reference_memory_and_disabled_profiler():
    cfg = build_config(overrides=UNIT)
    one, eight = reference_memory(cfg.model, 1), reference_memory(cfg.model, 8)
    assert one["parameters"] == one["gradients"] == one["momentum"] == 4 * param_count(cfg.model)
    assert eight["activations"] == 8 * one["activations"] > 0
    assert eight["total"] == 3 * eight["parameters"] + eight["activations"]
    null = profiler.profiling(cfg, layout=None)  # profile.enabled is off: nothing is set up
    with null as prof:
        assert isinstance(prof, profiler.NullProfiler) and isinstance(prof, Callback)
        prof.on_fit_start(None)  # every seam accepts its call and does nothing
        prof.on_batch_wait(None)
        prof.on_step_begin(None, (torch.zeros(2, 3), torch.zeros(2)))
        prof.on_step_end(None)
        assert prof.detach() is None


def test_render_command_redraws_a_written_profile_and_refuses_what_it_cannot_read(tmp_path, capsys):
    ranks = [synthetic_rank(r, [0.002] * 3, [0.001] * 3) for r in (0, 1)]
    profile = profiler.build_profile(ranks, build_config(overrides=UNIT), str(tmp_path), skipped=2, traced=0)
    profiler.write_report(profile, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile.json", "profile.png"]  # no temporaries
    capsys.readouterr()
    (tmp_path / "profile.png").unlink()
    assert profiler.main([str(tmp_path)]) == 0
    assert profiler.render_table(profile) in capsys.readouterr().out
    assert (tmp_path / "profile.png").stat().st_size > 0
    assert profiler.main([str(tmp_path / "nowhere")]) == 2
    assert "profile.enabled=true" in capsys.readouterr().err
    (tmp_path / "old.json").write_text(json.dumps(dict(profile, format=0)))
    assert profiler.main([str(tmp_path / "old.json")]) == 2
    err = capsys.readouterr().err
    assert "format 0" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------- NVML


class FakeNVML:
    """The parts of pynvml the sampler uses, with canned readings."""

    NVML_CLOCK_SM, NVML_CLOCK_MEM = 1, 2

    class NVMLError(Exception):
        pass

    def __init__(self, fail_init=False):
        self.fail_init, self.shut = fail_init, False

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlDeviceGetHandleByIndex(self, index):
        return f"gpu{index}"

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=87, memory=40)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=3 * 2**30, total=80 * 2**30)

    def nvmlDeviceGetPowerUsage(self, handle):
        return 250_000  # mW

    def nvmlDeviceGetClockInfo(self, handle, kind):
        return {1: 1980, 2: 2619}[kind]

    def nvmlShutdown(self):
        self.shut = True


def test_nvml_sampler_with_a_fake_module():
    fake = FakeNVML()
    sampler, reason = profiler.open_nvml(torch.device("cuda", 0), 0.005, nvml=fake)
    assert reason is None and sampler.handle == "gpu0"
    deadline = time.monotonic() + 10
    while len(sampler.samples["power_w"]) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    report = sampler.stop()
    assert report["available"] and report["samples"] >= 3 and report["read_errors"] == 0 and fake.shut
    assert report["gpu_util_pct"] == {"mean": 87, "max": 87} and report["power_w"]["mean"] == 250
    assert report["mem_used_bytes"]["max"] == 3 * 2**30 and report["sm_clock_mhz"]["mean"] == 1980
    assert report["mem_clock_mhz"]["max"] == 2619


def test_nvml_unavailable_says_why():
    sampler, reason = profiler.open_nvml(torch.device("cuda", 0), 0.1, nvml=FakeNVML(fail_init=True))
    assert sampler is None and "Driver Not Loaded" in reason
    sampler, reason = profiler.open_nvml(torch.device("cpu"), 0.1)
    assert sampler is None and "CPU" in reason


# --------------------------------------------------------------- the seams, driven by hand in one process

Batch = namedtuple("Batch", "images labels")  # the shape of the data package's batches, for batch_size


def hand_trainer(tmp_path, cfg, model, link, net=None):
    """What the Profiler reads of a trainer, for rank 0 of a pair (with a link) or of mp=1 (without)."""
    dims = ParallelDims(2) if link is not None else ParallelDims(1, mp=1)
    layout = Layout(dims, rank=0, local_rank=0, device=torch.device("cpu"), backend="gloo")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return SimpleNamespace(model=model, net=net if net is not None else model, link=link, optimizer=optimizer,
                           run_path=tmp_path, layout=layout, cfg=cfg)


def hook_counts(trainer):
    """Hooks on the model's modules and parameters, on the optimizer, and observers on the link."""
    model, opt = trainer.model, trainer.optimizer
    return (sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()),
            sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters()),
            len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks),
            len(trainer.link.observers) if trainer.link is not None else 0)


def drive(prof, trainer, steps, dropped=(), as_tuples=True):
    """`steps` real SGD steps through the seams in the trainer's order; steps in `dropped` never end."""
    cfg, g = trainer.cfg, torch.Generator().manual_seed(11)
    for i in range(steps):
        images = torch.randn(8, 3, cfg.model.crop_size, cfg.model.crop_size, generator=g)
        labels = torch.randint(0, cfg.model.num_classes, (8,), generator=g)
        prof.on_batch_wait(trainer)
        prof.on_step_begin(trainer, (images, labels) if as_tuples else Batch(images, labels))
        loss = F.cross_entropy(trainer.net(images), labels)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if i in dropped:
            continue
        trainer.optimizer.step()
        prof.on_step_end(trainer)


def assert_no_overlap(events):
    """Every moment of the step belongs to one part at most."""
    spans = sorted((start, end) for _, _, start, end in events)
    assert all(end >= start for start, end in spans)
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:])), spans


@pytest.mark.parametrize("overlap,trace", [(False, False), (True, True)], ids=["gathered", "overlapped-traced"])
def test_seams_record_each_part_of_a_step_and_detach_every_hook(tmp_path, overlap, trace):
    cfg = build_config(overrides=[*UNIT, "profile.enabled=true", "profile.skip_steps=1",
                                  f"profile.trace={str(trace).lower()}"])
    link = NullLink(0)  # exchanges that move nothing: every wait is seen, no byte moves
    model = build_column(cfg.model, 0, link, cfg.train.seed, overlap=overlap)
    model.set_dropout_generator(dropout_generator(cfg.train.seed, "cpu"))
    trainer = hand_trainer(tmp_path, cfg, model, link)
    bare = hook_counts(trainer)
    with profiler.profiling(cfg, trainer.layout) as prof:
        prof.on_fit_start(trainer)
        assert link.observers == [prof.events] and all(a > b for a, b in zip(hook_counts(trainer), bare))
        drive(prof, trainer, steps=7, dropped={5})
        prof.on_fit_end(trainer, None)
        assert hook_counts(trainer) == bare and link.observers == []
    with pytest.raises(RuntimeError, match="make a new Profiler"):
        prof.on_fit_start(trainer)

    profile = json.loads((tmp_path / "profile.json").read_text())
    (r,) = profile["ranks"]
    # 7 steps begun; step 0 is warm-up, step 5 never ended, steps 2-4 are traced when tracing.
    measured = [1, 6] if trace else [1, 2, 3, 4, 6]
    assert profile["steps"]["seen"] == 7 and profile["steps"]["measured"] == len(measured)
    assert profile["steps"]["traced_excluded"] == (3 if trace else 0) and r["timeline"]["step"] in measured
    assert sorted(r["layers"]) == sorted(LAYERS)
    assert all(set(d) == {"forward", "backward"} for d in r["layers"].values())
    assert set(r["phases"]) == {"data", "loss", "optimizer", "other"} and r["phases"]["other"]["mean_s"] >= 0
    # A wait per exchange the column made, named like the link's keys.
    assert set(r["crossings"]) == set(link.stats.bytes) >= {"conv3.forward", "conv3.backward", "logits.forward"}
    assert {e[0] for e in r["timeline"]["events"]} == {"data", "forward", "comm", "loss", "backward", "optimizer"}
    assert_no_overlap(r["timeline"]["events"])
    # NullLink moves no byte: every analytic key differs on each of the 6 steps that ended.
    analytic = analytic_bytes(cfg.model, 8, 0)
    assert r["bytes_checked_steps"] == 6
    assert r["mismatch_counts"] == {k: 6 for k, v in analytic.items() if v["sent"] or v["recv"]}
    assert not any(c["bytes_match"] for c in r["crossings"].values())
    assert r["memory"]["peak_bytes"] >= r["memory"]["at_start_bytes"] > 0
    assert r["allreduce"] is None and (tmp_path / "profile.png").stat().st_size > 0
    if trace:
        assert r["trace"] == "trace_rank0.json"
        names = {e.get("name") for e in json.loads((tmp_path / r["trace"]).read_text())["traceEvents"]}
        assert {"exchange:conv3.forward", "exchange:conv3.backward", "exchange:logits.forward"} <= names


def test_seams_without_a_link_profile_the_whole_network_and_its_allreduce(tmp_path, capsys):
    """dist.mp=1: no link, no peer, no crossing; DDP's all-reduce over a one-process gloo group."""
    cfg = build_config(overrides=[*UNIT, "dist.mp=1", "profile.enabled=true", "profile.skip_steps=1"])
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = build_reference(cfg.model, cfg.train.seed)
        model.set_dropout_generator(dropout_generator(cfg.train.seed, "cpu"))
        trainer = hand_trainer(tmp_path, cfg, model, link=None, net=DistributedDataParallel(model))
        bare = hook_counts(trainer)
        with profiler.profiling(cfg, trainer.layout) as prof:
            prof.on_fit_start(trainer)
            drive(prof, trainer, steps=4, as_tuples=False)
        assert hook_counts(trainer) == bare
        drive(prof, trainer, steps=1)  # after detach the DDP hook only all-reduces
        assert prof.allreduce.buckets == [] and not prof.allreduce.recording
    finally:
        dist.destroy_process_group()

    profile = json.loads((tmp_path / "profile.json").read_text())
    (r,) = profile["ranks"]
    assert (r["peer"], r["crossings"], r["mismatch_counts"]) == (None, {}, {})
    assert profile["steps"]["measured"] == 3 and r["bytes_checked_steps"] == 4
    assert sorted(r["layers"]) == sorted(LAYERS) and set(r["phases"]) == {"data", "loss", "optimizer", "other"}
    assert "comm" not in {e[0] for e in r["timeline"]["events"]}
    a = r["allreduce"]
    assert a["bytes"] == a["analytic_bytes"] == 4 * param_count(cfg.model) and a["bytes_match"]
    assert 0 <= a["exposed"]["mean_s"] <= a["in_flight"]["mean_s"]
    table = profiler.render_table(profile)
    assert table in capsys.readouterr().out  # rank 0 printed it
    assert "crossings per step" not in table and "wait dp all-reduce" in table
    assert [line for line in table.splitlines() if line.startswith("wait ")] == [
        line for line in table.splitlines() if line.startswith("wait dp all-reduce")]


# --------------------------------------------------------------- profiled runs of launch/train.py


def check_bytes_against_analytic(profile, cfg):
    for r in profile["ranks"]:
        expected = analytic_bytes(cfg.model, profile["batch_per_pair"], r["column"])
        measured = {k: {"sent": c["sent_bytes"], "recv": c["recv_bytes"]} for k, c in r["crossings"].items()}
        assert measured == expected, f"rank {r['rank']}"
        assert all(c["bytes_match"] for c in r["crossings"].values())
        assert r["byte_mismatches"] == [] and r["mismatch_counts"] == {}
        assert r["bytes_checked_steps"] == profile["steps"]["seen"]


def test_profiled_run_writes_profile_table_and_timeline(tmp_path, capfd):
    e2e = end_to_end()
    run = e2e.run_script(tmp_path, "train.epochs=1", "profile.enabled=true")
    out = capfd.readouterr().out
    assert "NVML not available: this rank runs on the CPU" in out and "where a step goes" in out
    profile = json.loads((run / "profile.json").read_text())
    cfg = build_config(overrides=e2e.TINY)
    assert [r["rank"] for r in profile["ranks"]] == [0, 1]
    timeline_step = profile["steps"].pop("timeline_step")
    assert profile["steps"] == {"seen": 8, "measured": 6, "warmup_skipped": 2, "traced_excluded": 0}
    assert 2 <= timeline_step < 8  # one of the measured steps
    for r in profile["ranks"]:
        assert sorted(r["layers"]) == sorted(LAYERS)
        assert all(set(d) == {"forward", "backward"} for d in r["layers"].values())
        assert set(r["crossings"]) == set(analytic_bytes(cfg.model, 8, r["column"]))
        assert set(r["phases"]) == {"data", "loss", "optimizer", "other"}
        assert r["phases"]["other"]["mean_s"] >= 0  # no moment counted in two parts
        assert r["memory"]["peak_bytes"] >= r["memory"]["at_start_bytes"] > 0
        assert r["nvml"] == {"available": False, "reason": "this rank runs on the CPU, not on an NVIDIA GPU"}
        kinds = {e[0] for e in r["timeline"]["events"]}
        assert kinds == {"data", "forward", "comm", "loss", "backward", "optimizer"}
        assert r["trace"] is None and r["allreduce"] is None  # one pair: no data-parallel all-reduce
    check_bytes_against_analytic(profile, cfg)
    assert profile["machine"]["cores"] >= 1 and profile["machine"]["cpu"] and profile["machine"]["host"]
    assert profile["versions"]["torch"] == torch.__version__ and profile["versions"]["backend"] == "gloo"
    assert not list(run.glob("trace_rank*.json"))

    # The render command draws the same table and picture again from profile.json alone.
    (run / "profile.png").unlink()
    assert profiler.main([str(run)]) == 0
    again = capfd.readouterr().out
    assert profiler.render_table(profile) in again and (run / "profile.png").stat().st_size > 0


def test_traced_run_with_fc8_on_column_0(tmp_path):
    e2e = end_to_end()
    run = e2e.run_script(tmp_path, "train.epochs=1", "profile.enabled=true", "profile.trace=true",
                         "model.fc8=rank0")
    profile = json.loads((run / "profile.json").read_text())
    cfg = build_config(overrides=[*e2e.TINY, "model.fc8=rank0"])
    check_bytes_against_analytic(profile, cfg)
    # Steps 4-6 (skip 2, wait 1, warm-up 1, active 2) are traced and left out of the summary.
    assert profile["steps"]["traced_excluded"] == 3 and profile["steps"]["measured"] == 3
    assert "fc8" not in profile["ranks"][1]["layers"] and "fc8" in profile["ranks"][0]["layers"]
    for rank in (0, 1):
        trace = run / f"trace_rank{rank}.json"
        assert profile["ranks"][rank]["trace"] == trace.name
        events = json.loads(trace.read_text())["traceEvents"]
        names = {e.get("name") for e in events}
        assert {"exchange:fc8.forward", "exchange:logits.forward", "exchange:conv3.backward"} <= names
        assert sum(1 for n in names if str(n).startswith("ProfilerStep#")) == 2  # the active steps


def test_profiled_2x2_run_reports_the_data_parallel_allreduce(tmp_path):
    e2e = end_to_end()
    argv = [*e2e.TINY, "train.epochs=1", "data.train_size=96", "profile.enabled=true", f"run.out_dir={tmp_path}",
            "run.name=run"]
    codes = run_ranks(e2e.script_worker, world_size=4, args=(argv,), timeout=240)
    assert set(codes.values()) == {0}
    run = tmp_path / "run"
    profile = json.loads((run / "profile.json").read_text())
    cfg = build_config(overrides=e2e.TINY)
    assert [(r["rank"], r["column"], r["dp_rank"]) for r in profile["ranks"]] == [
        (0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)]
    assert profile["steps"]["seen"] == 6 and profile["steps"]["measured"] == 4
    check_bytes_against_analytic(profile, cfg)
    for r in profile["ranks"]:
        a = r["allreduce"]
        column = build_column(cfg.model, r["column"], None, 0)
        assert a["bytes"] == a["analytic_bytes"] == sum(p.numel() * 4 for p in column.parameters())
        assert a["bytes_match"] and a["buckets"] >= 1
        # The exposed wait is part of the in-flight span, and a row of the step's breakdown.
        assert 0 <= a["exposed"]["mean_s"] <= a["in_flight"]["mean_s"] < r["step"]["mean_s"]
        assert a["hidden_share"] == pytest.approx(1 - a["exposed"]["mean_s"] / a["in_flight"]["mean_s"])
        assert r["phases"]["other"]["mean_s"] >= 0  # no moment counted in two parts
        assert r["timeline"]["allreduce"]["buckets"] == a["buckets"]
        assert "allreduce" in {e[0] for e in r["timeline"]["events"]}
    table = profiler.render_table(profile)
    assert "wait dp all-reduce" in table and "data-parallel gradient all-reduce per step" in table
    assert table.count("equal") == sum(len(r["crossings"]) for r in profile["ranks"]) + 4
