"""Train the two-column AlexNet: one process per column.

    torchrun --standalone --nproc_per_node=2 launch/train.py [--config FILE] [key=value ...]
    python launch/train.py --help            # every config key, its type, default and meaning
    python launch/preemptible.py --standalone --nproc_per_node=2 launch/train.py ...  # torchrun that
                                             # exits 0 when SIGTERM/Ctrl-C stopped the run cleanly

Without --config it trains the small network of configs/small.yaml on the built-in
data set. Any even number of processes runs D = processes / 2 data-parallel replicas
of the pair, on one node or on several (docs/operations.md):

    torchrun --standalone --nproc_per_node=8 launch/train.py ...           # 4 replicas
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=FIRST_NODE:29500 --rdzv_id=RUN launch/train.py ...  # 8 replicas

The script reads top to bottom: the configuration, the processes, the training, the end.
"""
from __future__ import annotations

import sys
from pathlib import Path

from alexnet_mp import checkpoint, flight_recorder, preemption, rundir
from alexnet_mp.cli import load_config
from alexnet_mp.config import ConfigError
from alexnet_mp.data import DataError
from alexnet_mp.distributed import RunFailed, setup, teardown
from alexnet_mp.export import ExportError
from alexnet_mp.files import StorageError
from alexnet_mp.parallel_dims import LaunchError
from alexnet_mp.profiler import profiling
from alexnet_mp.trainer import NonFiniteError, Trainer
from alexnet_mp.transport import PeerError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "small.yaml"
# Errors that explain themselves: printed as one line, without a traceback.
USER_ERRORS = (ConfigError, LaunchError, DataError, ExportError, PeerError, StorageError,
               checkpoint.CheckpointError, rundir.RunDirError)


def main(argv=None, callbacks=()) -> int:
    """Train as the command line says; the exit status is 0 (done or stopped cleanly), 1 (the run
    failed) or 2 (it could not start). `callbacks` are extra trainer seams (tests)."""
    # SIGTERM/SIGINT from here on ask every rank to finish its step, checkpoint and stop (0).
    with preemption.catch_stop_signals():
        # 1. The configuration: defaults, the YAML file, key=value overrides, all checked.
        try:
            cfg, _ = load_config(argv, DEFAULT_CONFIG)  # --help and --print-config print and exit here
            # 2. The processes: torchrun's environment, the device, the process groups, the mesh.
            layout = setup(cfg.dist)
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        # 3. The training.
        try:
            return train(cfg, layout, callbacks)
        finally:
            # 4. The end: leave the process groups (nothing may hold them any more: see teardown).
            del layout
            teardown()


def train(cfg, layout, callbacks=()) -> int:
    """Run the trainer: 0 when it finished or stopped cleanly, 1 with the error in one line.
    The profiler (profile.enabled) writes profile.json and a table at the end."""
    try:
        with profiling(cfg, layout) as prof:
            Trainer(cfg, layout, callbacks=[prof, *callbacks]).fit()
    except (*USER_ERRORS, RunFailed, NonFiniteError) as e:
        print(f"error (rank {layout.rank}): {e}", file=sys.stderr)
        dump = flight_recorder.dump_flight_recorder(layout.rank) if isinstance(e, PeerError) else None
        if dump:
            print(f"rank {layout.rank}: flight recorder written to {dump}; read it with torchfrtrace {dump.parent}",
                  file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
