"""Writing and checking one shard of a prepared set (the format is described in prepared.py).

A shard is written under temporary names and renamed into place; its done record (.done.json) is
written last, so a shard either has a done record that matches its files or is written again.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.io import encode_jpeg

from .common import READ_ERRORS, first_line
from .decode import decode_file
from .prepared import sha1_file, shard_path
from .stats import Moments


class UnreadableSource(ValueError):
    """A source image that cannot be read (and --skip-bad was not given)."""


@dataclass
class ShardJob:
    root: str  # the prepared folder
    src: str  # the source folder
    split: str
    name: str
    files: list  # (path relative to src, label)
    size: int
    codec: str
    quality: int
    skip_bad: bool


def _encode(img: torch.Tensor, codec: str, quality: int) -> bytes:
    if codec == "jpeg":
        return encode_jpeg(img, quality=quality).numpy().tobytes()
    return img.numpy().tobytes()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def write_shard(job: ShardJob) -> dict:
    """Decode, resize, encode and write one shard; returns its done record."""
    out, src = Path(job.root), Path(job.src)
    rows, chunks, skipped, offset = [], [], [], 0
    moments = Moments(job.size) if job.split == "train" else None
    for rel, label in job.files:
        try:
            img = decode_file(src / rel, job.size)
        except READ_ERRORS as e:
            if not job.skip_bad:
                raise UnreadableSource(f"cannot read image {src / rel} ({first_line(e)}); replace or delete it, "
                                       f"or pass --skip-bad to leave unreadable images out (they are listed "
                                       f"in {out / 'skipped.txt'})") from None
            skipped.append(rel)
            continue
        blob = _encode(img, job.codec, job.quality)
        rows.append((offset, len(blob), label, zlib.crc32(blob)))
        chunks.append(blob)
        offset += len(blob)
        if moments is not None:
            moments.add(img.numpy())
    files = {".bin": b"".join(chunks), ".idx.npy": _npy_bytes(np.array(rows, np.int64).reshape(-1, 4))}
    if moments is not None:
        files[".sums.npz"] = _npz_bytes(moments.arrays())
    record = {"name": job.name, "split": job.split, "count": len(rows), "planned": len(job.files),
              "skipped": skipped}
    for suffix, data in files.items():
        _write_atomic(shard_path(out, job.split, job.name, suffix), data)
        record[suffix] = {"bytes": len(data), "sha1": hashlib.sha1(data).hexdigest()}
    _write_atomic(shard_path(out, job.split, job.name, ".done.json"), json.dumps(record).encode())
    return record


def read_done(root: Path, split: str, name: str) -> dict | None:
    """A shard's done record when it and the files it names are present with their sizes, else None."""
    try:
        record = json.loads(shard_path(root, split, name, ".done.json").read_text())
        for suffix, info in record.items():
            if suffix.startswith(".") and shard_path(root, split, name, suffix).stat().st_size != info["bytes"]:
                return None
        return record
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def check_shard(root: Path, split: str, name: str, record: dict) -> str | None:
    """What is wrong with a finished shard's files (checksums, record count), or None."""
    for suffix, info in record.items():
        if suffix.startswith(".") and sha1_file(shard_path(root, split, name, suffix)) != info["sha1"]:
            return f"{shard_path(root, split, name, suffix)} fails its checksum"
    table = np.load(shard_path(root, split, name, ".idx.npy"), allow_pickle=False)
    if table.shape != (record["count"], 4) or record["count"] + len(record["skipped"]) != record["planned"]:
        return f"{split}/{name} holds {len(table)} records, not {record['count']}"
    if len(table) and int(table[-1, 0] + table[-1, 1]) != record[".bin"]["bytes"]:
        return f"{split}/{name}'s index does not cover its data file"
    return None


def remove_shard(root: Path, split: str, name: str) -> None:
    """Delete a shard's files, done record first (so a half-deleted shard is never taken as done)."""
    for suffix in (".done.json", ".bin", ".idx.npy", ".sums.npz"):
        shard_path(root, split, name, suffix).unlink(missing_ok=True)
