"""Training the planned runs: each a single-process run of the project's trainer, started through the
project's spawner, a few at a time, one thread each.

A run writes its folder (RUNS/NAME: metrics.jsonl, steps.jsonl, summary.json) and its console output
to RUNS/NAME.log. A folder that already holds a summary under the same config is kept, so running
the same command again continues an interrupted ablation; an unfinished folder is started over.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .. import rundir
from ..config import Config, build_config, config_from_dict
from ..files import StorageError, make_dirs
from ..spawn import SpawnError, run_ranks

# How every ablation run executes (not what it computes): the whole network in one process on one
# thread, loading in that process, no progress bar, records every 20 steps, centre-crop evaluation.
RUNTIME = ("dist.mp=1", "dist.threads=1", "data.num_workers=0", "run.progress=false", "data.ten_crop=false",
           "run.log_every=20", "run.keep_checkpoints=1")


class AblationError(RuntimeError):
    """Runs failed or cannot start; the message names them and their logs."""


@dataclass
class Job:
    name: str
    cfg: Config

    @property
    def folder(self) -> Path:
        return Path(self.cfg.run.out_dir) / self.name

    @property
    def log(self) -> Path:
        return Path(self.cfg.run.out_dir) / f"{self.name}.log"


def job_config(config_file: str | Path | None, overrides: list[str], run_overrides: tuple[str, ...],
               runs_dir: str | Path, name: str) -> Config:
    """A run's config: the file, RUNTIME, the user's overrides, then the run's own (its arm and seed)."""
    return build_config(config_file, [*RUNTIME, *overrides, *run_overrides, f"run.out_dir={runs_dir}",
                                      f"run.name={name}"])


def _train(rank: int, cfg_dict: dict, log_path: str) -> dict:
    """In the spawned process: the trainer's whole run, its output (file descriptors 1 and 2) to the log."""
    from ..distributed import setup, teardown
    from ..trainer import Trainer

    with open(log_path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    cfg = config_from_dict(cfg_dict)
    layout = setup(cfg.dist)
    try:
        return Trainer(cfg, layout).fit()
    finally:
        teardown()


def finished(job: Job) -> bool:
    """Whether the job's folder holds a finished run (summary.json) of exactly the job's config."""
    folder = job.folder
    try:
        if not (folder / "summary.json").is_file() or not rundir.read_metrics(folder):
            return False
        return config_from_dict(rundir.load_run_config(folder)).to_dict() == job.cfg.to_dict()
    except (rundir.RunDirError, ValueError):
        return False


def _clear(job: Job) -> None:
    """Remove what an unfinished earlier attempt left (never a folder a live run holds)."""
    if job.folder.exists():
        live = rundir.holder(job.folder)
        if live is not None:
            raise AblationError(f"{job.folder} is in use by process {live.get('pid')}; wait for it or "
                                f"choose another --runs-dir")
        shutil.rmtree(job.folder)
    job.log.unlink(missing_ok=True)


class _Tally:
    """Prints one line when a job starts and one when it ends, with the count and the time left."""

    def __init__(self, total: int, parallel: int, say):
        self.total, self.parallel, self.say = total, parallel, say
        self.done, self.durations, self.started = 0, [], time.monotonic()
        self.lock = threading.Lock()

    def start(self, job: Job) -> None:
        with self.lock:
            self.say(f"{job.name}: training (its output: {job.log})")

    def finish(self, job: Job, seconds: float | None, outcome: str) -> None:
        with self.lock:
            self.done += 1
            if seconds is not None:
                self.durations.append(seconds)
            left = self.total - self.done
            eta = ""
            if self.durations and left:
                eta = f", about {left * sum(self.durations) / len(self.durations) / self.parallel / 60:.0f} min left"
            elapsed = (time.monotonic() - self.started) / 60
            self.say(f"[{self.done}/{self.total}] {job.name}: {outcome} ({elapsed:.0f} min so far{eta})")


def _run_one(job: Job, timeout: float, tally: _Tally) -> str | None:
    """Train one job unless already finished; None on success, else the one-line failure."""
    if finished(job):
        tally.finish(job, None, "kept (finished earlier with the same config)")
        return None
    start = time.monotonic()
    tally.start(job)
    try:
        _clear(job)
        make_dirs(job.folder.parent)
        summary = run_ranks(_train, 1, (job.cfg.to_dict(), str(job.log)), timeout=timeout)[0]
    except (SpawnError, AblationError, StorageError, OSError) as e:
        tally.finish(job, None, "FAILED")
        return f"{job.name}: {str(e).strip().splitlines()[-1]} (log: {job.log})"
    top1 = summary.get("val_top1")
    tally.finish(job, time.monotonic() - start,
                 f"done in {(time.monotonic() - start) / 60:.1f} min, validation top-1 {top1:.3f}"
                 if top1 is not None else "done")
    return None


def span_minutes(jobs: list[Job]) -> float:
    """Minutes from the first job's start (its config.yaml) to the last one's end (its summary.json)."""
    if not jobs:
        return 0.0
    starts = [(j.folder / "config.yaml").stat().st_mtime for j in jobs]
    ends = [(j.folder / "summary.json").stat().st_mtime for j in jobs]
    return (max(ends) - min(starts)) / 60


def run_all(jobs: list[Job], parallel: int = 2, timeout: float = 3600.0, say=print) -> None:
    """Train every job, `parallel` at a time; raise AblationError naming every failed run at the end."""
    if parallel < 1:
        raise AblationError(f"--parallel must be at least 1, got {parallel}")
    tally = _Tally(len(jobs), parallel, say)
    say(f"{len(jobs)} runs, {parallel} at a time" if jobs else "nothing to run")
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        failures = [f for f in pool.map(lambda j: _run_one(j, timeout, tally), jobs) if f]
    if failures:
        raise AblationError(f"{len(failures)} of {len(jobs)} runs failed: " + "; ".join(failures))
