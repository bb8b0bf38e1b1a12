"""Stop signals: every rank stops after the same step, repeats change nothing, the launcher a scheduler
signals exits 0, and a stopped run leaves no thread or process behind.

The in-process runs use the package's spawner; the launcher runs as a real subprocess
(launch/preemptible.py) with tests/signal_driver.py sending the signals from inside the run.
"""
import io
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from alexnet_mp import checkpoint, preemption
from alexnet_mp.trainer import Callback
from harness import free_port, run_ranks
from test_train import TINY, script_worker

ROOT = Path(__file__).resolve().parent.parent
ONE_EPOCH = [*TINY, "train.epochs=1"]


class SignalSelf(Callback):
    """Sends this process `signals` at the end of step `step`, as a scheduler would; records where it stopped."""

    def __init__(self, step: int, signals):
        self.step, self.signals, self.stopped_at, self.flag = step, signals, None, None

    def on_step_end(self, trainer):
        if trainer.state.step == self.step:
            for sig in self.signals:
                os.kill(os.getpid(), sig)  # the handler runs before the next step begins

    def on_fit_end(self, trainer, error):
        self.stopped_at, self.flag = trainer.state.step, preemption.stop_requested()


def signalled_worker(rank, argv, signals_by_rank):
    """(exit code, stopping step, stop flag) of this rank, and what it printed."""
    recorder, out = SignalSelf(2, signals_by_rank.get(rank, ())), io.StringIO()
    with redirect_stdout(out):
        code = script_worker(rank, argv, [recorder])
    return (code, recorder.stopped_at, recorder.flag), out.getvalue()


def stopped_run(tmp_path, signals_by_rank):
    """{rank: (exit code, stopping step, stop flag)}, the checkpointed step, rank 0's output."""
    argv = [*ONE_EPOCH, f"run.out_dir={tmp_path}", "run.name=stop"]
    results = run_ranks(signalled_worker, args=(argv, signals_by_rank), timeout=180)
    _, manifest = checkpoint.latest_good(tmp_path / "stop" / "checkpoints")
    return {r: outcome for r, (outcome, _) in results.items()}, manifest["trainer"]["step"], results[0][1]


# ---------------------------------------------------------------- the training processes


@pytest.fixture(scope="module")
def told_once(tmp_path_factory):
    """A run whose rank 1 alone gets one SIGTERM after step 2: ({rank: (code, stopping step, flag)},
    the checkpointed step, rank 0's output)."""
    return stopped_run(tmp_path_factory.mktemp("once"), {1: (signal.SIGTERM,)})


def test_a_stop_request_in_one_rank_stops_every_rank_after_the_same_step(told_once):
    results, saved, out = told_once
    (code0, step0, flag0), (code1, step1, flag1) = results[0], results[1]
    assert code0 == code1 == 0
    assert flag0 == "" and flag1 == "SIGTERM"  # rank 0 learnt of the request from the agreement alone
    assert step0 == step1 == saved  # the same step everywhere, and that step is checkpointed
    assert 2 < saved < 8  # after the signal, before the end of the epoch
    assert f"stopped after step {saved} on a stop signal" in out


def test_repeated_stop_signals_change_nothing(told_once, tmp_path):
    results, saved, _ = told_once
    repeated, saved_repeated, _ = stopped_run(tmp_path, {1: (signal.SIGTERM, signal.SIGINT, signal.SIGTERM)})
    assert saved_repeated == saved
    assert repeated == results  # same exit codes, same stopping step, the first signal's name


def test_the_stop_flag_is_set_from_the_start_in_a_process_started_after_the_launcher_stopped(monkeypatch):
    monkeypatch.setenv(preemption.STOP_ENV, "SIGTERM")
    with preemption.catch_stop_signals():
        assert preemption.stop_requested() == "SIGTERM"
    monkeypatch.delenv(preemption.STOP_ENV)
    with preemption.catch_stop_signals():
        assert preemption.stop_requested() == ""


# ---------------------------------------------------------------- the launcher

CHILD = ("import signal, sys, time\n"
         "got = []\n"
         "signal.signal(signal.SIGTERM, lambda s, f: got.append(s))\n"
         "signal.signal(signal.SIGINT, lambda s, f: got.append(s))\n"
         "print('ready', flush=True)\n"
         "deadline = time.monotonic() + 30\n"
         "while len(got) < 2 and time.monotonic() < deadline:\n"
         "    time.sleep(0.01)\n"
         "print(*got, flush=True)\n")


def test_the_launcher_passes_stop_signals_to_its_children_and_survives_them():
    with preemption.forward_stop_signals():
        # A session of its own, as torchrun starts each training process.
        child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True,
                                 start_new_session=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            assert preemption.worker_pids() == [child.pid]
            os.kill(os.getpid(), signal.SIGTERM)  # this process would end here without the forwarding
            os.kill(os.getpid(), signal.SIGINT)
            out, _ = child.communicate(timeout=60)
            assert os.environ[preemption.STOP_ENV] == "SIGTERM"  # for training processes started later
        finally:
            child.kill()
    assert out.split() == [str(int(signal.SIGTERM)), str(int(signal.SIGINT))]
    assert preemption.STOP_ENV not in os.environ


def test_a_stop_signal_before_any_training_process_stops_the_launcher_as_torchrun_would():
    from torch.distributed.elastic.multiprocessing import SignalException

    with preemption.forward_stop_signals():
        with pytest.raises(SignalException) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun is stopping already: a repeat changes nothing
    assert stopped.value.sigval == signal.SIGTERM


def handles(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler installed for `sig` (SigCgt in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (int(sig) - 1) & 1)
    return False


def test_a_launcher_stopped_before_its_training_processes_start_says_so_in_one_line():
    # Two nodes are asked for and one comes: torchrun waits in the rendezvous, with no training process.
    port = free_port()
    launcher = subprocess.Popen([sys.executable, str(ROOT / "launch" / "preemptible.py"), "--nnodes=2",
                                 "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                                 str(ROOT / "launch" / "train.py")], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not handles(launcher.pid, signal.SIGTERM) and time.monotonic() < deadline:
            time.sleep(0.05)
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "error: torchrun stopped on SIGTERM before its training processes were running" in err
    assert "Traceback" not in err


def processes_tagged(tag: str) -> list[int]:
    """Live processes whose environment carries `tag` (children, grandchildren, orphans)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and tag.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            pass
    return found


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    """A launcher told to stop twice (SIGTERM, then SIGINT) after step 3 of a run with a loader worker."""
    out = tmp_path_factory.mktemp("preempted")
    tag = uuid.uuid4().hex  # in the environment of every process the run starts
    cmd = [sys.executable, str(ROOT / "launch" / "preemptible.py"), "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "signal_driver.py"), "3", "SIGTERM,SIGINT",
           *TINY, "data.num_workers=1", f"run.out_dir={out}", "run.name=pre"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "ALEXNET_MP_TEST_TAG": tag})
    return proc, out / "pre", processes_tagged(tag)


def test_a_launcher_told_to_stop_exits_0_after_its_workers_checkpoint(preempted):
    proc, run, _ = preempted
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "Traceback" not in log and "SignalException" not in log and "error" not in log.lower()
    _, manifest = checkpoint.latest_good(run / "checkpoints")
    assert f"stopped after step {manifest['trainer']['step']} on a stop signal" in log
    assert 3 < manifest["trainer"]["step"] < 8


def test_a_stopped_run_leaves_no_thread_or_process_behind(preempted):
    proc, _, left = preempted
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: non-daemon threads at exit: []" in proc.stdout
        # A gloo thread alive when the interpreter exits may free a tensor then and abort the process.
        assert f"rank {rank}: process-group threads at exit: []" in proc.stdout
    assert left == []  # training processes, loader workers: all gone when the launcher returns


CRASHED_WITH_AN_OPEN_LOADER = """
import sys
from alexnet_mp.config import build_config
from alexnet_mp.data import Loaders, build_data
cfg = build_config(overrides=["model.num_classes=4", "model.crop_size=67", "data.image_size=80",
                              "data.resize=80", "data.train_size=64", "data.val_size=8",
                              "train.batch_size=8", "data.num_workers=2"])
loaders = Loaders(build_data(cfg), cfg)
batches = iter(loaders.train(epoch=0))
next(batches)
print("workers", len(loaders.worker_pids()), flush=True)
raise SystemExit("crashed mid-epoch")  # the module keeps the loader and its iteration alive
"""


def test_a_process_that_crashes_mid_epoch_still_exits_though_its_loader_workers_ignore_stop_signals():
    # multiprocessing's exit handler SIGTERMs daemonic workers (ours ignore it) and then waits for
    # them: without Loaders' own exit handler this process would never end.
    proc = subprocess.run([sys.executable, "-c", CRASHED_WITH_AN_OPEN_LOADER], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.strip() == "workers 2", proc.stderr[-2000:]
    assert proc.returncode == 1 and "crashed mid-epoch" in proc.stderr
