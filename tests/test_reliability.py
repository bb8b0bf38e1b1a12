"""Reliability: lost peers, restarts, preemption, checkpoints you can trust, numerical faults, bad input.

Faults are injected through the trainer's seams (callbacks, link observers) and torch's own hooks,
inside spawned ranks (run_ranks) or, under a real torchrun, through tests/fault_driver.py.
"""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from alexnet_mp import checkpoint, flight_recorder, preemption, resilience
from alexnet_mp.config import ConfigError, build_config
from alexnet_mp.distributed import setup
from alexnet_mp.rundir import RunDirError, load_run_config
from alexnet_mp.trainer import Callback
from alexnet_mp.transport import PeerError
from harness import free_port, run_ranks
from test_train import TINY, final_weights, run_script, script_worker

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 3  # dist.timeout_s in the lost-peer tests


def assert_same_weights(got, expected):
    for c in (0, 1):
        assert got[c].keys() == expected[c].keys()
        for key, value in expected[c].items():
            assert torch.equal(got[c][key], value), f"column {c} {key}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Final weights of an uninterrupted TINY run (2 epochs, 16 steps)."""
    return final_weights(run_script(tmp_path_factory.mktemp("straight"), name="straight"))


def torchrun(fault, step, rank, *overrides, restarts=0):
    """launch/train.py under a real torchrun, with tests/fault_driver.py's fault at (step, rank)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}", str(ROOT / "tests" / "fault_driver.py"), fault, str(step), str(rank),
           *TINY, *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


# ---------------------------------------------------------------- restart and preemption


def test_sigkill_mid_exchange_restarts_and_ends_with_the_uninterrupted_weights(tmp_path, straight):
    out_dir = tmp_path / "runs"
    # Rank 1 dies in step 5's fc6 backward exchange; checkpoints exist at steps 2 and 4.
    proc = torchrun("kill", 5, 1, f"run.out_dir={out_dir}", "run.checkpoint_every=2", restarts=1)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "backward exchange with the peer, rank 1" in log and "exitcode: -9" in log  # killed mid-exchange
    [run] = [p for p in out_dir.iterdir() if not p.name.startswith(".")]  # one run, kept across restarts
    assert "restart 1: continuing" in log and f"resumed from {run / 'checkpoints' / 'step-000000004'}" in log
    assert_same_weights(final_weights(run), straight)
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_sigterm_stops_both_ranks_after_the_same_step_with_a_checkpoint_and_the_next_start_resumes(tmp_path,
                                                                                                     straight):
    # Rank 0 signals the torchrun agent after step 3, as a scheduler would; the agent forwards SIGTERM
    # to both workers (and their data-loader processes). Step 4 carries the request in its agreement;
    # the host reads that one step late, so both ranks stop after step 5.
    proc = torchrun("term", 3, 0, f"run.out_dir={tmp_path}", "run.name=pre", "data.num_workers=1",
                    "dist.timeout_s=30")
    log = proc.stdout + proc.stderr
    assert "stopped after step 5 on a stop signal" in log, log[-3000:]
    assert "error (rank" not in log and "exited unexpectedly" not in log
    folder, manifest = checkpoint.latest_good(tmp_path / "pre" / "checkpoints")
    assert folder.name == "step-000000005" and manifest["trainer"]["step"] == 5
    run_script(tmp_path, f"run.resume={tmp_path / 'pre'}", name="unused")
    assert_same_weights(final_weights(tmp_path / "pre"), straight)


def test_stop_signals_only_raise_a_flag_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with preemption.catch_stop_signals():
        assert preemption.stop_requested() == ""
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not preemption.stop_requested() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)  # a repeat (torchrun forwards Ctrl-C again) changes nothing
        time.sleep(0.1)
        assert preemption.stop_requested() == "SIGTERM"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_each_restart_gets_its_own_keys_and_finds_the_first_attempts_run(monkeypatch, tmp_path):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    launch, first = resilience.attempt_store(0, 1, timedelta(seconds=10))
    first.set("rank_0", "address of a process that is about to die")
    resilience.remember_run_dir(launch, tmp_path / "run")
    assert resilience.recall_run_dir(launch) is None  # the first attempt starts a new run
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    # The restarted attempt joins the same launch store, through attempt_store itself.
    monkeypatch.setattr(dist, "rendezvous", lambda *args, **kwargs: iter([(launch, 0, 1)]))
    _, second = resilience.attempt_store(0, 1, timedelta(seconds=10))
    assert not second.check(["rank_0"]) and first.check(["rank_0"])
    assert resilience.recall_run_dir(launch) == tmp_path / "run"


# ---------------------------------------------------------------- lost peers


def hang(done: Path) -> None:
    """Stay alive and silent until the survivor has finished (it writes `done`)."""
    deadline = time.monotonic() + 60
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os._exit(0)


class HangBeforeAgreement(Callback):
    """Rank 1 stops answering at the end of step 2's backward, just before the per-step agreement."""

    def __init__(self, done: str):
        self.done = done

    def on_fit_start(self, trainer):
        first = next(trainer.model.parameters())  # conv1's weight: its gradient is the last one of a backward
        steps = [trainer.state.step]
        first.register_post_accumulate_grad_hook(lambda p: hang(Path(self.done)) if trainer.state.step == steps[0] + 1
                                                 else None)


def hang_in_step_worker(rank, argv, done):
    code = script_worker(rank, argv, [HangBeforeAgreement(done)] if rank == 1 else [])
    Path(done).touch()
    return code


@pytest.mark.parametrize("resumed", [False, True])
def test_hung_peer_in_a_collective_ends_the_survivor_within_the_timeout(tmp_path, capfd, resumed):
    argv = [*TINY, f"run.out_dir={tmp_path}", "run.name=hang", f"dist.timeout_s={TIMEOUT_S}"]
    if resumed:  # the short timeout must also follow a resume's first step, not only a fresh run's step 1
        run_script(tmp_path, "train.max_steps=3", name="hang")
        argv += [f"run.resume={tmp_path / 'hang'}", "train.max_steps=0"]
    # No clock in the test: the harness's timeout fails it if the survivor waits on.
    code = run_ranks(hang_in_step_worker, args=(argv, str(tmp_path / "done")), wait_for=[0], timeout=120)[0]
    err = capfd.readouterr().err
    assert code == 1
    assert "per-step agreement" in err and "with rank 1" in err and f"{TIMEOUT_S} s timeout" in err
    # The survivor's flight recorder names the collective it was stuck in, and where it was called.
    dump = tmp_path / "hang" / "flight_recorder" / "rank_0"
    assert f"flight recorder written to {dump}" in err
    newest = pickle.loads(dump.read_bytes())["entries"][-1]
    assert newest["profiling_name"].endswith("all_reduce")
    assert any(f["name"] == "agree" for f in newest["frames"])
    text = flight_recorder.describe_flight_recorder(dump.parent)
    assert "rank_0" in text and "all_reduce" in text.splitlines()[-1] and "agree" in text.splitlines()[-1]


def hang_in_checkpoint_worker(rank, root, done):
    layout = setup(build_config(overrides=TINY).dist)
    resilience.set_timeouts(TIMEOUT_S, None, (layout.mp_group, layout.dp_group))
    if rank == 1:
        hang(Path(done))
    error = None
    try:
        checkpoint.save(Path(root), 1, layout.column, {"w": torch.ones(1)}, {}, 1, layout.mp_group)
    except PeerError as e:
        error = str(e)
    Path(done).touch()
    return error


def test_hung_peer_in_a_checkpoint_commit_ends_the_survivor_within_the_timeout(tmp_path):
    error = run_ranks(hang_in_checkpoint_worker, args=(str(tmp_path / "ckpt"), str(tmp_path / "done")),
                      wait_for=[0], timeout=60)[0]
    assert error is not None and "checkpoint start" in error and "rank 1" in error
    assert f"{TIMEOUT_S} s timeout" in error
    assert checkpoint.committed(tmp_path / "ckpt") == []  # nothing half-written counts as a checkpoint


def test_debug_env_turns_on_nccl_error_handling_and_the_flight_recorder():
    env = flight_recorder.debug_env("nccl", 2000)
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert env["TORCH_NCCL_TRACE_BUFFER_SIZE"] == env["TORCH_FR_BUFFER_SIZE"] == "2000"
    assert flight_recorder.debug_env("gloo", 2000) == {"TORCH_FR_BUFFER_SIZE": "2000"}
    assert flight_recorder.debug_env("nccl", 0) == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


# ---------------------------------------------------------------- numerical faults


class Faults(Callback):
    """Poisons this rank's loss ("loss") or one gradient element ("grad") at given steps (1-based), through
    torch's hooks; records the weights after every step and at the end."""

    def __init__(self, faults: dict):
        self.faults, self.after_step, self.final, self.trainer = faults, {}, None, None

    def on_fit_start(self, trainer):
        self.trainer = trainer
        trainer.model.register_forward_hook(lambda m, args, out: out * float("nan")
                                            if m.training and self._now() == "loss" else None)
        first = next(trainer.model.parameters())
        first.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("inf")) if self._now() == "grad" else None)

    def _now(self):
        return self.faults.get(self.trainer.state.step + 1)

    def on_step_end(self, trainer):
        self.after_step[trainer.state.step] = _weights(trainer.model)

    def on_fit_end(self, trainer, error):
        self.final = _weights(trainer.model)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fault_worker(rank, argv, faults):
    """The trainer with `faults` {rank: {step: kind}}: (exit code, weights after each step, final weights)."""
    recorder = Faults(faults.get(rank, {}))
    code = script_worker(rank, argv, [recorder])
    return code, recorder.after_step, recorder.final


def test_nan_loss_on_one_rank_stops_both_before_the_update(tmp_path, capfd):
    argv = [*TINY, f"run.out_dir={tmp_path}", "run.name=nan", "run.checkpoint_every=1", "run.keep_checkpoints=5"]
    results = run_ranks(fault_worker, args=(argv, {1: {3: "loss"}}), timeout=120)
    assert [results[r][0] for r in (0, 1)] == [1, 1]
    assert "non-finite loss or gradient at step 3 (epoch 1, batch 2)" in capfd.readouterr().err
    folder, manifest = checkpoint.latest_good(tmp_path / "nan" / "checkpoints")
    assert folder.name == "step-000000002"  # nothing written after the fault
    for c in (0, 1):  # the weights in memory are still those of step 2: no update was applied after it
        saved = checkpoint.load_column(folder, c)["model"]
        assert all(torch.equal(results[c][2][k], v) for k, v in saved.items())
        assert all(torch.equal(results[c][1][3][k], v) for k, v in saved.items())


def test_skipped_nonfinite_steps_are_counted_and_never_reach_the_weights(tmp_path, capfd):
    argv = [*TINY, f"run.out_dir={tmp_path}", "run.name=skip", "run.nonfinite=skip", "train.epochs=1"]
    # An infinite gradient on rank 0 in step 2, a NaN loss on rank 1 in step 5.
    results = run_ranks(fault_worker, args=(argv, {0: {2: "grad"}, 1: {5: "loss"}}), timeout=120)
    assert [results[r][0] for r in (0, 1)] == [0, 0]
    out = capfd.readouterr().out
    assert "skipped step 2 (epoch 1, batch 1)" in out and "skipped step 5 (epoch 1, batch 4)" in out
    for c in (0, 1):
        after = results[c][1]
        for step in (2, 5):  # both columns skipped both updates: the weights did not move
            assert all(torch.equal(after[step][k], after[step - 1][k]) for k in after[step])
        for step in (3, 6):  # and the steps after them trained again
            assert not all(torch.equal(after[step][k], after[step - 1][k]) for k in after[step])
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["skipped_steps"] == 2 and summary["steps"] == 8
    folder, manifest = checkpoint.latest_good(tmp_path / "skip" / "checkpoints")
    assert manifest["trainer"]["step"] == 8 and manifest["trainer"]["skipped"] == 2
    for c in (0, 1):
        assert all(torch.isfinite(v).all() for v in checkpoint.load_column(folder, c)["model"].values())


# ---------------------------------------------------------------- bad input while running


class AddImageAfterFirstEpoch(Callback):
    def __init__(self, root):
        self.root = Path(root)

    def on_epoch_end(self, trainer, record):
        if trainer.layout.is_main:
            _image(self.root / "train" / "c0" / "late.png", 7)


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (72, 72, 3), dtype=np.uint8)).save(path)


def test_a_data_folder_that_changes_between_epochs_stops_the_run(tmp_path, capfd):
    root = tmp_path / "data"
    for k in range(5):
        for i in range(4):
            _image(root / "train" / f"c{k}" / f"{i}.png", 10 * k + i)
        _image(root / "val" / f"c{k}" / "v.png", 100 + k)
    argv = [*TINY, f"run.out_dir={tmp_path}", "run.name=data", "data.dataset=folder", f"data.root={root}"]
    assert run_ranks(script_worker, args=(argv, [AddImageAfterFirstEpoch(root)]), timeout=120) == {0: 1, 1: 1}
    err = capfd.readouterr().err
    assert f"the data set changed during the run ({root}" in err and "epoch 1 is intact" in err
    folder, manifest = checkpoint.latest_good(tmp_path / "data" / "checkpoints")
    assert manifest["trainer"]["epoch"] == 1


class FileSizeLimit(Callback):
    """After step `step`, this process may write no file larger than `limit` bytes (RLIMIT_FSIZE, as a
    quota would): the next checkpoint's write fails with EFBIG, for real."""

    def __init__(self, step: int, limit: int):
        self.step, self.limit = step, limit

    def on_step_end(self, trainer):
        if trainer.state.step == self.step:
            import resource
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error return instead of a kill
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, resource.RLIM_INFINITY))


def test_a_write_that_fails_mid_checkpoint_stops_both_ranks_and_keeps_the_last_checkpoint(tmp_path, capfd):
    argv = [*TINY, f"run.out_dir={tmp_path}", "run.name=full", "run.checkpoint_every=2", "train.epochs=1"]
    codes = run_ranks(script_worker, args=(argv, ()), timeout=120,
                      per_rank_args={1: (argv, [FileSizeLimit(3, 4096)])})
    assert codes == {0: 1, 1: 1}
    err = capfd.readouterr().err
    assert err.count("file too large") >= 2, err  # both ranks say why, not "the peer died"
    assert "the last good checkpoint, step-000000002, is intact" in err
    root = tmp_path / "full" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-000000002"]  # no half-written step-4 left behind
    assert checkpoint.latest_good(root)[1]["trainer"]["step"] == 2


# ---------------------------------------------------------------- configs


def test_yaml_with_python_tags_is_refused_without_running_anything(tmp_path):
    target = tmp_path / "pwned"
    evil = f"train:\n  epochs: !!python/object/apply:os.makedirs ['{target}']\n"
    (tmp_path / "evil.yaml").write_text(evil)
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(tmp_path / "evil.yaml")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(evil)
    with pytest.raises(RunDirError, match="not a valid config"):
        load_run_config(tmp_path / "run")
    assert not target.exists()
    with pytest.raises(ConfigError, match="dist.flight_recorder"):
        build_config(overrides=["dist.flight_recorder=-1"])


def test_out_of_memory_is_not_blamed_on_a_peer():
    with pytest.raises(torch.OutOfMemoryError, match="out of memory"):
        with resilience.guarded("backward (with the data-parallel gradient all-reduce)"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


class FullDiskFor(Callback):
    """Rank 0's writes of `name` meet a full disk (a link to /dev/full, which refuses every write)."""

    def __init__(self, name: str):
        self.name = name

    def on_fit_start(self, trainer):
        if trainer.layout.is_main:
            (trainer.run_path / self.name).symlink_to("/dev/full")


@pytest.mark.parametrize("name", ["steps.jsonl", "metrics.jsonl", "summary.json.part"])
def test_a_write_that_fails_on_rank_0_stops_every_rank_with_its_reason(tmp_path, capfd, name):
    argv = [*TINY, f"run.out_dir={tmp_path}", "run.name=r", "train.epochs=1", "run.log_every=2"]
    codes = run_ranks(script_worker, args=(argv, [FullDiskFor(name)]), timeout=120)
    assert codes == {0: 1, 1: 1}
    err = capfd.readouterr().err
    for rank in (0, 1):
        lines = [x for x in err.splitlines() if f"error (rank {rank})" in x]
        assert lines, f"no error line from rank {rank} in:\n{err[-4000:]}"
        assert "no space left" in lines[0] and name.split(".part")[0] in lines[0], lines[0]
    assert "peer process has probably died" not in err
