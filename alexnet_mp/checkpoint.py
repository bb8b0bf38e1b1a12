"""Checkpoints that survive crashes: both columns committed together, or not at all.

Layout of a run's checkpoints::

    checkpoints/step-000000120/column0.pt    this column's weights, optimiser, RNG
    checkpoints/step-000000120/column1.pt
    checkpoints/step-000000120/manifest.json step, trainer state, config hash, sha256 per file

Both columns write into ``step-N.tmp``; column 0 writes the manifest last and
renames the folder to ``step-N``. A folder without the ``.tmp`` suffix is
therefore complete, and the manifest's checksums catch what a disk or a copy
spoils later. Loading walks back from the newest checkpoint to the newest one
that verifies. Files are read with ``weights_only=True``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from . import resilience

FORMAT = 1
COLUMN_FILES = ("column0.pt", "column1.pt")
MP = 2  # columns per model replica (distributed.MP); a checkpoint holds one file per column


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or none that verifies could be read."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write) -> None:
    """Write through `write(file)` to a temporary name, fsync, then rename into place."""
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)
    _fsync_dir(path.parent)


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:09d}"


def save(root: Path, step: int, column: int, payload: dict, manifest: dict, keep: int,
         mp_group=None) -> Path:
    """Called by both columns of one pair; returns the committed folder.

    `payload` is this column's state; `manifest` (trainer state, JSON-able) is
    written by column 0. Keeps the newest `keep` checkpoints. Any write error
    (a full disk) on either column leaves the earlier checkpoints as they were
    and raises CheckpointError on both.
    """
    final, tmp = step_dir(root, step), step_dir(root, step).with_suffix(".tmp")
    name = f"column{column}.pt"
    mine = []  # this column's errors; every step below joins both columns' lists first
    if column == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-write
            tmp.mkdir(parents=True)
        except OSError as e:
            mine.append(f"column 0 could not create {tmp}: {e}")
    errors = _gather("checkpoint start", mine, mp_group)
    files = {}
    if not errors:
        try:
            write_atomic(tmp / name, lambda f: torch.save(payload, f))
            files[name] = sha256(tmp / name)
        except (OSError, RuntimeError) as e:  # torch's zip writer may wrap the OSError
            mine.append(f"column {column} could not write {tmp / name}: {e}")
        outcomes = _gather("checkpoint write", [mine, files], mp_group)  # neither column may commit alone
        errors = [e for i in (0, 2) for e in outcomes[i]]
        files = {**outcomes[1], **outcomes[3]}
    if not errors:
        if column == 0:
            body = dict(manifest, format=FORMAT, step=step, files=files)
            try:
                write_atomic(tmp / "manifest.json", lambda f: f.write(json.dumps(body, indent=1).encode()))
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                _fsync_dir(root)
            except OSError as e:
                mine.append(f"could not commit {final}: {e}")
            _prune(root, keep)
        errors = _gather("checkpoint commit", mine, mp_group)
    if errors:
        if column == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_committed(root)
        kept = f"the last good checkpoint, {previous.name}, is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"{errors[0]}; {kept}. Free disk space or move run.out_dir, then resume.")
    return final


def _gather(what: str, items: list, mp_group) -> list:
    """Both columns' `items`, column 0's first: both then take the same branch."""
    both = [None, None]
    with resilience.guarded(f"{what} (all-gather)", mp_group):
        dist.all_gather_object(both, items, group=mp_group)
    return both[0] + both[1]


def _prune(root: Path, keep: int) -> None:
    for old in committed(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def committed(root: Path) -> list[Path]:
    """Committed checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.suffix != ".tmp")


def latest_committed(root: Path) -> Path | None:
    found = committed(root)
    return found[-1] if found else None


def verify(folder: Path) -> dict:
    """The manifest of `folder` if every file is present and matches its checksum."""
    manifest_path = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{manifest_path} is missing or unreadable ({e})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path} has format {manifest.get('format')}, expected {FORMAT}")
    unlisted = [name for name in COLUMN_FILES if name not in manifest.get("files", {})]
    if unlisted:
        raise CheckpointError(f"{manifest_path} has no checksum for {', '.join(unlisted)}")
    for name, digest in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        if sha256(path) != digest:
            raise CheckpointError(f"{path} does not match its checksum (torn or corrupted)")
    return manifest


def latest_good(root: Path, warn=lambda msg: print(msg, file=sys.stderr)) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies, skipping (and reporting) broken ones."""
    for folder in reversed(committed(root)):
        try:
            return folder, verify(folder)
        except CheckpointError as e:
            warn(f"warning: skipping checkpoint {folder.name}: {e}")
    return None


def resolve(path: str | Path) -> tuple[Path, dict]:
    """A checkpoint folder, given it or a run directory (then its newest good one)."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return path, verify(path)
    found = latest_good(path / "checkpoints") if (path / "checkpoints").is_dir() else None
    if found is None:
        raise CheckpointError(f"{path} holds no checkpoint that verifies; give a run directory "
                              f"with checkpoints/ or a checkpoints/step-N folder")
    return found


def check_compatible(folder: Path, manifest: dict, model_hash: str) -> None:
    """Refuse a checkpoint this run cannot continue: another model, or another model-parallel size.

    The data-parallel size may differ: every replica holds the same weights, so a checkpoint
    (one file per column) loads into any number of replicas.
    """
    if manifest["model_hash"] != model_hash:
        raise CheckpointError(
            f"{folder} was written for another model config ({manifest['model_hash']} vs "
            f"{model_hash}); resume with the run's own model.* settings")
    mp = manifest.get("mp", MP)
    if mp != MP:
        raise CheckpointError(f"{folder} was written by {mp} model-parallel columns, this program runs {MP}; "
                              f"it cannot be loaded here")


def load_column(folder: Path, column: int, device="cpu") -> dict:
    path = folder / f"column{column}.pt"
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises several types for a damaged zip
        raise CheckpointError(f"{path} cannot be read ({str(e).splitlines()[0]})") from None
