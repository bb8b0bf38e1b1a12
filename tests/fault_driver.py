"""Test-only: launch/train.py under a real torchrun, with one fault injected (see test_reliability.py).

    torchrun ... tests/fault_driver.py FAULT STEP RANK [train.py arguments]

FAULT "kill": rank RANK SIGKILLs itself in the middle of step STEP, as it enters the fc6 backward
exchange, on torchrun's first attempt only (the restarted attempt must run through).
FAULT "term": rank RANK sends SIGTERM to the torchrun agent during step STEP, as a scheduler would,
and holds the step until the agent's SIGTERM has reached it too.
"""
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))

import train  # noqa: E402
from alexnet_mp import resilience  # noqa: E402
from alexnet_mp.exchange import PeerLink  # noqa: E402

fault, at_step, at_rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
me = int(os.environ["RANK"])
verdicts = 0  # training steps finished so far (one agreement per step)

real_verdict, real_start = resilience.step_verdict, PeerLink.start


def step_verdict(loss, model, device, stop_requested, group=None):
    global verdicts
    if fault == "term" and me == at_rank and verdicts + 1 == at_step:
        os.kill(os.getppid(), signal.SIGTERM)  # the agent; it forwards SIGTERM to every worker
        deadline = time.monotonic() + 60
        while not resilience.stop_requested() and time.monotonic() < deadline:
            time.sleep(0.01)
        stop_requested = bool(resilience.stop_requested())
    verdicts += 1
    return real_verdict(loss, model, device, stop_requested, group)


def start(self, send, recv_shape, like, crossing, phase):
    # Every exchange, plain or overlapped (dist.overlap), is posted through PeerLink.start.
    if (fault == "kill" and me == at_rank and resilience.restart_count() == 0
            and verdicts + 1 == at_step and (crossing, phase) == ("fc6", "backward")):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_start(self, send, recv_shape, like, crossing, phase)


resilience.step_verdict = step_verdict
PeerLink.start = start
sys.exit(train.main(sys.argv[4:]))
