"""Test-only: launch/train.py with stop signals sent to its launcher at a chosen step, and a report at exit.

    python launch/preemptible.py ... tests/signal_driver.py STEP SIGNALS [train.py arguments]

At the end of step STEP, rank 0 sends each signal of SIGNALS (comma-separated names) to its parent
process, the launcher, as a scheduler would; after the first it waits until the launcher has passed
the signal on to it. When main() has returned, every rank prints the threads still alive: Python's
non-daemon threads, and the process groups' native worker threads (gloo, NCCL).
"""
import os
import runpy
import signal
import sys
import threading
import time
from pathlib import Path

from alexnet_mp import preemption
from alexnet_mp.trainer import Callback

ROOT = Path(__file__).resolve().parent.parent


GROUP_THREADS = ("pt_gloo", "gloo", "pt_nccl")  # name prefixes of the process groups' native threads


def native_threads() -> list[str]:
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # ended meanwhile
            pass
    return sorted(names)


class SignalLauncher(Callback):
    def __init__(self, step: int, signals: list[str]):
        self.step, self.signals = step, [signal.Signals[name] for name in signals]

    def on_step_end(self, trainer):
        if trainer.state.step != self.step:
            return
        for sig in self.signals:
            os.kill(os.getppid(), sig)
            deadline = time.monotonic() + 60
            while not preemption.stop_requested() and time.monotonic() < deadline:
                time.sleep(0.01)


if __name__ == "__main__":
    at_step, names = int(sys.argv[1]), sys.argv[2].split(",")
    train = runpy.run_path(str(ROOT / "launch" / "train.py"), run_name="train")
    mine = [SignalLauncher(at_step, names)] if os.environ["RANK"] == "0" else []
    code = train["main"](sys.argv[3:], callbacks=mine)
    alive = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    groups = [name for name in native_threads() if name.startswith(GROUP_THREADS)]
    print(f"rank {os.environ['RANK']}: non-daemon threads at exit: {alive}", flush=True)
    print(f"rank {os.environ['RANK']}: process-group threads at exit: {groups}", flush=True)
    sys.exit(code)
