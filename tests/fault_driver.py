"""Test-only: launch/train.py under a real torchrun, with one fault injected through the trainer's seams.

    torchrun ... tests/fault_driver.py FAULT STEP RANK [train.py arguments]

FAULT "kill": rank RANK SIGKILLs itself in the middle of step STEP, as it posts the fc6 backward
exchange, on torchrun's first attempt only (the restarted attempt must run through).
FAULT "term": rank RANK sends SIGTERM to the torchrun agent at the end of step STEP, as a scheduler
would, and holds the run until the agent's SIGTERM has reached it too.
"""
import os
import runpy
import signal
import sys
import time
from pathlib import Path

from alexnet_mp import preemption, resilience
from alexnet_mp.trainer import Callback
from alexnet_mp.transport import LinkObserver

ROOT = Path(__file__).resolve().parent.parent


class KillMidExchange(Callback, LinkObserver):
    def __init__(self, step: int):
        self.step, self.trainer = step, None

    def on_fit_start(self, trainer):
        self.trainer = trainer
        trainer.link.add_observer(self)

    def posting(self, link, crossing, phase):
        if (resilience.restart_count() == 0 and self.trainer.state.step + 1 == self.step
                and (crossing, phase) == ("fc6", "backward")):
            os.kill(os.getpid(), signal.SIGKILL)

    def on_fit_end(self, trainer, error):
        self.trainer = None  # the trainer holds the process groups; teardown must free them


class TermAfterStep(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer):
        if trainer.state.step == self.step:
            os.kill(os.getppid(), signal.SIGTERM)  # the agent; it forwards SIGTERM to every worker
            deadline = time.monotonic() + 60
            while not preemption.stop_requested() and time.monotonic() < deadline:
                time.sleep(0.01)


if __name__ == "__main__":
    fault, at_step, at_rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    train = runpy.run_path(str(ROOT / "launch" / "train.py"), run_name="train")
    chosen = {"kill": KillMidExchange, "term": TermAfterStep}[fault](at_step)
    mine = [chosen] if int(os.environ["RANK"]) == at_rank else []
    sys.exit(train["main"](sys.argv[4:], callbacks=mine))
