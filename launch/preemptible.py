"""torchrun for schedulers: a stop signal makes the training processes checkpoint, and the exit status is 0.

    python launch/preemptible.py [torchrun options] launch/train.py [train.py arguments]
    python launch/preemptible.py --standalone --nproc_per_node=2 launch/train.py run.name=big

It takes torchrun's own options and runs torchrun in this process. SIGTERM or SIGINT (Ctrl-C) to
this process is passed to the training processes, which finish their step, write a checkpoint and
exit 0; torchrun then ends as after any run, with status 0. Plain torchrun, signalled, exits 1 with a
traceback even when its workers stopped cleanly.
"""
import sys

from alexnet_mp.preemption import launch

if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:]))
