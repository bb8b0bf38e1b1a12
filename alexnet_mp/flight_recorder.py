"""torch's flight recorder: the last collectives and crossings each rank saw, dumped when a peer is lost.

    python -m alexnet_mp.flight_recorder RUN/flight_recorder
"""
from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import torch

FR_DIR = "flight_recorder"


def debug_env(backend: str, entries: int) -> dict:
    """Environment for torch's flight recorder and NCCL's error handling; set before the groups start.

    The recorder keeps the last `entries` collectives and crossings per rank (0: off). On NCCL the
    watchdog aborts a failed or timed-out collective instead of hanging (async error handling) and
    dumps the recorder when it fires.
    """
    env = {}
    if entries:
        env["TORCH_FR_BUFFER_SIZE"] = str(entries)
    if backend == "nccl":
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
        if entries:
            env["TORCH_NCCL_TRACE_BUFFER_SIZE"] = str(entries)
            env["TORCH_NCCL_DUMP_ON_TIMEOUT"] = "1"
    return env


def point_flight_recorder(run_path: Path) -> Path:
    """Send this rank's flight-recorder dump to RUN/flight_recorder/rank_<rank>.

    torch reads TORCH_FR_DUMP_TEMP_FILE when it first dumps, so setting it once the run directory
    is known is early enough. A user's own setting wins.
    """
    folder = Path(run_path) / FR_DIR
    if "TORCH_FR_DUMP_TEMP_FILE" not in os.environ:
        folder.mkdir(parents=True, exist_ok=True)
        os.environ["TORCH_FR_DUMP_TEMP_FILE"] = str(folder / "rank_")
    return folder


def dump_flight_recorder(rank: int) -> Path | None:
    """Write this rank's flight recorder (if on) where point_flight_recorder said; its path or None.

    On NCCL the watchdog dumps by itself on a timeout; on gloo nobody does, so the trainer calls
    this when a peer is lost.
    """
    prefix = os.environ.get("TORCH_FR_DUMP_TEMP_FILE")
    if not prefix or not int(os.environ.get("TORCH_FR_BUFFER_SIZE", "0") or 0):
        return None
    path = Path(f"{prefix}{rank}")
    if path.exists():  # the NCCL watchdog was first
        return path
    try:
        blob = torch._C._distributed_c10d._dump_fr_trace()  # what torch's own dump writes
        path.write_bytes(blob)
    except Exception:  # a private API: best effort, never hide the real error
        return None
    return path


def describe_flight_recorder(folder: Path, last: int = 8) -> str:
    """The newest `last` entries of each rank's dump in `folder`, one line each.

    torchfrtrace (torch's analyser) matches NCCL dumps across ranks; this reader also takes the
    gloo dumps it cannot parse, and a survivor's dump alone.
    """
    lines = []
    for path in sorted(Path(folder).glob("rank_*")):
        try:
            entries = pickle.loads(path.read_bytes())["entries"]
        except Exception as e:  # a foreign or torn file: say so and go on
            lines.append(f"{path.name}: unreadable ({e})")
            continue
        lines.append(f"{path.name}: {len(entries)} entries, newest last")
        for e in entries[-last:]:
            ours = [f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in e.get("frames", [])
                    if "site-packages" not in f["filename"] and "/torch/" not in f["filename"]]
            group = e.get("process_group", ("?", "?"))
            lines.append(f"  {e.get('profiling_name', '?'):<20} group {group[0]} ({group[1]}) "
                         f"seq {e.get('collective_seq_id', '?')}/{e.get('p2p_seq_id', '?')} "
                         f"{e.get('state', '?'):<9} sizes {e.get('input_sizes', '?')} at {' < '.join(ours[:3]) or '?'}")
    return "\n".join(lines) or f"{folder}: no rank_* dumps"


if __name__ == "__main__":
    print(describe_flight_recorder(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".")))
