"""Checkpoints that survive crashes: every column of a model replica committed together, or not at all.

Layout of a run's checkpoints::

    checkpoints/step-000000120/column0.pt    a column's weights, optimiser, RNG (with dist.mp=1:
    checkpoints/step-000000120/column1.pt    the whole network, column0.pt alone)
    checkpoints/step-000000120/manifest.json step, kind, best_metric, trainer state, config hash,
                                             mp (the number of column files), sha256 per file

The columns write into ``step-N.tmp``; column 0 writes the manifest last and renames
the folder to ``step-N``. A folder without the ``.tmp`` suffix is therefore complete,
and the manifest's checksums catch what a disk or a copy spoils later. Loading walks
back from the newest checkpoint to the newest one that verifies. Files are read with
``weights_only=True``.

Kinds and pruning. A checkpoint is of kind "epoch" (written at an epoch's end) or
"step" (mid-epoch). After each commit the newest `keep` of each kind stay, so step
checkpoints never push out epoch ones; so do the checkpoint just written and the best
one: the highest ``best_metric`` (validation top-1) any manifest records, the earliest
of equals. Folders whose manifest cannot be read are removed (they can never load).
`best` finds the best one from the manifests alone, so it needs no pointer that could
go stale: whatever is committed is the truth.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from . import resilience
from .files import StorageError, describe_os_error, fsync_dir, make_dirs, save_torch, write_text_atomic

FORMAT = 1
MP = 2  # columns per model replica (dist.mp) unless a manifest says otherwise
KINDS = ("epoch", "step")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or none that verifies could be read."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def column_files(mp: int) -> list[str]:
    """The files a checkpoint of `mp` columns holds besides its manifest."""
    return [f"column{c}.pt" for c in range(mp)]


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:09d}"


def _columns(mp_group) -> int:
    """Columns writing this checkpoint: the size of `mp_group`, or 1 without process groups."""
    return dist.get_world_size(mp_group) if dist.is_initialized() else 1


def _gather(what: str, item, mp_group, n: int) -> list:
    """Every column's `item`, column 0's first: all columns then take the same branch."""
    if n == 1:
        return [item]
    out = [None] * n
    with resilience.guarded(f"{what} (all-gather)", mp_group):
        dist.all_gather_object(out, item, group=mp_group)
    return out


def _why(e: Exception) -> str:
    return str(e) if isinstance(e, StorageError) else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def save(root: Path, step: int, column: int, payload: dict, manifest: dict, keep: int,
         mp_group=None, *, kind: str = "epoch", best_metric: float | None = None) -> Path:
    """Called by every column of one model replica (the `mp_group`); returns the committed folder.

    `payload` is this column's state; `manifest` (trainer state, JSON-able) is written
    by column 0 with `kind` ("epoch" or "step") and `best_metric` (validation top-1 of
    an epoch checkpoint, or None). Without process groups a single column writes the
    whole checkpoint. Any write error (a full disk) on any column leaves the earlier
    checkpoints as they were and raises CheckpointError on every column.
    """
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind {kind!r} is not one of {', '.join(KINDS)}")
    root, best_metric = Path(root), None if best_metric is None else float(best_metric)
    final, n = step_dir(root, step), _columns(mp_group)
    if not 0 <= column < n:
        raise ValueError(f"column {column} does not exist in a checkpoint of {n} column(s)")
    tmp = final.with_suffix(".tmp")
    errors = []
    if column == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-write
            make_dirs(tmp)
        except StorageError as e:
            errors.append(f"column 0: {e}")
    errors = sum(_gather("checkpoint start", errors, mp_group, n), [])
    if not errors:
        errors, files = _write_column(tmp, column, payload, mp_group, n)
    if not errors:
        mine = []
        if column == 0:
            body = dict(manifest, format=FORMAT, step=step, files=files, mp=n, kind=kind,
                        best_metric=best_metric)
            mine = _commit(root, tmp, final, body, keep)
        errors = sum(_gather("checkpoint commit", mine, mp_group, n), [])
    if errors:
        if column == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_committed(root)
        kept = (f"the last good checkpoint, {previous.name}, is intact (resume from it after the fix)"
                if previous else "no earlier checkpoint exists")
        raise CheckpointError(f"{errors[0]}; {kept}")
    return final


def _write_column(tmp: Path, column: int, payload: dict, mp_group, n: int) -> tuple[list, dict]:
    """Write this column's file; every column's errors and checksums."""
    name, mine, files = f"column{column}.pt", [], {}
    try:
        save_torch(tmp / name, payload)
        files[name] = sha256(tmp / name)
    except Exception as e:  # a full disk, or a payload torch cannot serialise
        mine.append(f"column {column}: {_why(e)}")
    outcomes = _gather("checkpoint write", (mine, files), mp_group, n)  # no column may commit alone
    return [e for errs, _ in outcomes for e in errs], {k: v for _, f in outcomes for k, v in f.items()}


def _commit(root: Path, tmp: Path, final: Path, body: dict, keep: int) -> list[str]:
    """Column 0: the manifest, then the rename that makes the checkpoint count; then pruning."""
    try:
        text = json.dumps(body, indent=1)
    except (TypeError, ValueError) as e:  # every column must hear of it, not wait for the timeout
        return [f"column 0: the manifest cannot be written as JSON ({e})"]
    try:
        write_text_atomic(tmp / "manifest.json", text)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(root)
    except StorageError as e:
        return [f"column 0: {e}"]
    except OSError as e:  # the rename or the folder's fsync
        return [f"column 0: {describe_os_error(e, final)}"]
    prune(root, keep, current=final)
    return []


def read_manifest(folder: Path) -> dict | None:
    """The manifest of `folder` without checking its files; None when it cannot be read."""
    try:
        manifest = json.loads((Path(folder) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _metric(manifest: dict | None) -> float | None:
    value = (manifest or {}).get("best_metric")
    return float(value) if isinstance(value, (int, float)) and not math.isnan(value) else None


def _by_metric(manifests: dict[Path, dict | None]) -> list[Path]:
    """The folders whose manifest records a best_metric, best first (the earliest of equals)."""
    found = [f for f, m in manifests.items() if _metric(m) is not None]
    return sorted(found, key=lambda f: (-_metric(manifests[f]), f.name))


def _manifests(root: Path) -> dict[Path, dict | None]:
    """Every committed folder's manifest (None where unreadable), oldest first."""
    return {folder: read_manifest(folder) for folder in committed(root)}


def prune(root: Path, keep: int, current: Path | None = None) -> list[Path]:
    """Remove all but the newest `keep` of each kind, `current` and the best; returns what went."""
    manifests = _manifests(root)
    kept = {current} if current else set()
    for kind in KINDS:
        same = [f for f, m in manifests.items() if m is not None and m.get("kind", "epoch") == kind]
        kept.update(same[-keep:] if keep > 0 else [])
    kept.update(_by_metric(manifests)[:1])
    gone = [f for f in manifests if f not in kept]
    for folder in gone:
        shutil.rmtree(folder, ignore_errors=True)
    return gone


def committed(root: Path) -> list[Path]:
    """Committed checkpoint folders, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.suffix != ".tmp")


def latest_committed(root: Path) -> Path | None:
    found = committed(root)
    return found[-1] if found else None


def verify(folder: Path) -> dict:
    """The manifest of `folder` if every file its `mp` needs is present and matches its checksum."""
    manifest_path = Path(folder) / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{manifest_path} is missing or unreadable ({e})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path} has format {manifest.get('format')}, expected {FORMAT}")
    mp = manifest.get("mp", MP)
    if mp not in (1, MP):
        raise CheckpointError(f"{manifest_path} records mp={mp}; a checkpoint holds 1 or {MP} column files")
    unlisted = [name for name in column_files(mp) if name not in manifest.get("files", {})]
    if unlisted:
        raise CheckpointError(f"{manifest_path} has no checksum for {', '.join(unlisted)}")
    for name, digest in manifest["files"].items():
        path = Path(folder) / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        if sha256(path) != digest:
            raise CheckpointError(f"{path} does not match its checksum (torn or corrupted)")
    return manifest


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr)


def _first_good(folders, warn) -> tuple[Path, dict] | None:
    """The first of `folders` that verifies, reporting the broken ones skipped on the way."""
    for folder in folders:
        try:
            return folder, verify(folder)
        except CheckpointError as e:
            warn(f"warning: skipping checkpoint {folder.name}: {e}")
    return None


def latest_good(root: Path, warn=_warn) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies, skipping (and reporting) broken ones."""
    return _first_good(reversed(committed(root)), warn)


def best(root: Path, warn=_warn) -> tuple[Path, dict] | None:
    """The checkpoint with the highest best_metric that verifies (broken ones are reported and skipped)."""
    return _first_good(_by_metric(_manifests(root)), warn)


def resolve(path: str | Path, best_one: bool = False) -> tuple[Path, dict]:
    """A checkpoint folder, given it or a run directory (then its newest good one, or with
    `best_one` its best one by validation top-1)."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        if best_one:
            raise CheckpointError(f"{path} is one checkpoint; to pick the best one give its run directory")
        return path, verify(path)
    root = path / "checkpoints"
    if best_one:
        found = best(root)
        if found is None:
            raise CheckpointError(f"{path} holds no verified checkpoint with a validation top-1 (epoch "
                                  f"checkpoints record one); drop --best to take the newest checkpoint")
        return found
    found = latest_good(root) if root.is_dir() else None
    if found is None:
        raise CheckpointError(f"{path} holds no checkpoint that verifies; give a run directory "
                              f"with checkpoints/ or a checkpoints/step-N folder")
    return found


def check_compatible(folder: Path, manifest: dict, model_hash: str, mp: int = MP) -> None:
    """Refuse a checkpoint this run cannot continue: another model, or another number of columns.

    The data-parallel size may differ: every replica holds the same weights, so a checkpoint
    (one file per column) loads into any number of replicas.
    """
    if manifest["model_hash"] != model_hash:
        raise CheckpointError(
            f"{folder} was written for another model config ({manifest['model_hash']} vs "
            f"{model_hash}); resume with the run's own model.* settings")
    written = manifest.get("mp", MP)
    if written != mp:
        fix = f"resume with dist.mp={written}" if written in (1, MP) else "it cannot be loaded here"
        raise CheckpointError(f"{folder} was written by {written} model-parallel columns, this run has {mp}; {fix}")


def load_column(folder: Path, column: int, device="cpu") -> dict:
    path = Path(folder) / f"column{column}.pt"
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises several types for a damaged zip
        raise CheckpointError(f"{path} cannot be read ({str(e).splitlines()[0]})") from None
