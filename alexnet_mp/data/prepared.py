"""The prepared format (written by python -m alexnet_mp.prepare) and reading it.

Layout of a prepared folder OUT:
    prepared.json           manifest, written last: its presence means the set is complete
    plan.json               the settings and the source listing's hash, written first (for resuming)
    stats.npz               mean, std, eigval, eigvec, mean_image of every training image
    skipped.txt             unreadable source files left out (--skip-bad), one per line
    {train,val}/shard-NNNNN.bin       records back to back: JPEG files, or raw uint8 (3, S, S)
    {train,val}/shard-NNNNN.idx.npy   int64 (n, 4) per record: byte offset, length, label, crc32
    train/shard-NNNNN.sums.npz        the shard's statistics sums (Moments.arrays)
    {train,val}/shard-NNNNN.done.json the shard's commit record: counts, sizes, sha1s, skipped files

Records are in the source folder's order (sorted class, then sorted path), so sample i of a prepared
set is sample i of the folder when nothing was skipped. At build time the manifest, every shard's
size and index checksum, and the statistics are checked; shard contents are checksummed in full for
sets up to VERIFY_BYTES, and every record's crc32 is checked when it is read.
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from .common import DataError
from .sources import Source
from .stats import load_stats

FORMAT, VERSION = "alexnet-mp-prepared", 1
MANIFEST, PLAN, STATS, SKIPPED = "prepared.json", "plan.json", "stats.npz", "skipped.txt"
CODECS = ("jpeg", "raw")
VERIFY_BYTES = 256 << 20  # sets up to this size have every shard checksummed at build time
_OPEN_FILES = 64  # shard files a reader keeps open


def shard_path(root: Path, split: str, name: str, suffix: str) -> Path:
    return Path(root) / split / f"{name}{suffix}"


def sha1_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class DamagedRecord(ValueError):
    """A prepared record whose bytes do not match their checksum."""


def _refuse(root: Path, manifest: dict | None, problem: str) -> DataError:
    source = (manifest or {}).get("source") or "SRC"
    return DataError(f"prepared set {root}: {problem}; run python -m alexnet_mp.prepare {source} {root} "
                     f"again (same options) to finish or repair it")


def read_manifest(root: Path) -> dict:
    """The manifest of a complete prepared set, or a DataError saying what to do."""
    if not root.is_dir():
        raise DataError(f"data.root={root} is not a folder; set data.root to a folder written by "
                        f"python -m alexnet_mp.prepare SRC OUT")
    path = root / MANIFEST
    if not path.is_file():
        if (root / PLAN).is_file():
            raise _refuse(root, None, "the preparation did not finish")
        raise DataError(f"{root} holds no {MANIFEST}; write a prepared set with python -m alexnet_mp.prepare "
                        f"SRC {root}, or use data.dataset=folder for an image folder")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _refuse(root, None, f"{MANIFEST} cannot be read ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(f"{path} is not version {VERSION} of the {FORMAT} format; prepare the set again "
                        f"with this version of alexnet_mp")
    return manifest


def check_settings(root: Path, manifest: dict, resize: int, num_classes: int) -> None:
    if manifest["size"] != resize:
        raise DataError(f"prepared set {root} holds {manifest['size']} px images but data.resize={resize}; "
                        f"set data.resize={manifest['size']}, or prepare the set again with --size {resize}")
    if len(manifest["classes"]) != num_classes:
        raise DataError(f"prepared set {root} has {len(manifest['classes'])} classes but "
                        f"model.num_classes={num_classes}; set model.num_classes={len(manifest['classes'])}")


def load_index(root: Path, manifest: dict, split: str, full_check: bool, progress=None) -> list[np.ndarray]:
    """Every shard's index, after checking its file sizes and checksums against the manifest."""
    shards, out = manifest["splits"][split]["shards"], []
    for k, shard in enumerate(shards):
        name = shard["name"]
        data, index = shard_path(root, split, name, ".bin"), shard_path(root, split, name, ".idx.npy")
        if not data.is_file() or not index.is_file():
            raise _refuse(root, manifest, f"shard {split}/{name} is missing")
        if data.stat().st_size != shard["bytes"]:
            raise _refuse(root, manifest, f"shard {data} has {data.stat().st_size} bytes, not {shard['bytes']}")
        if sha1_file(index) != shard["index_sha1"]:
            raise _refuse(root, manifest, f"index {index} fails its checksum")
        if full_check and sha1_file(data) != shard["sha1"]:
            raise _refuse(root, manifest, f"shard {data} fails its checksum")
        table = np.load(index, allow_pickle=False)
        if table.shape != (shard["count"], 4):
            raise _refuse(root, manifest, f"index {index} holds {len(table)} records, not {shard['count']}")
        out.append(table)
        if progress:
            progress(k + 1, len(shards), f"checking prepared {split} shards")
    return out


def open_prepared(root: str | Path, resize: int, num_classes: int, bad_images: str, progress=None):
    """(manifest, {split: PreparedSource}, statistics) of a verified prepared set."""
    root = Path(root).expanduser()
    manifest = read_manifest(root)
    check_settings(root, manifest, resize, num_classes)
    total = sum(s["bytes"] for split in manifest["splits"].values() for s in split["shards"])
    sources = {}
    for split in ("train", "val"):
        tables = load_index(root, manifest, split, total <= VERIFY_BYTES, progress)
        sources[split] = PreparedSource(root, split, manifest, tables, bad_images)
        if len(sources[split]) != manifest["splits"][split]["count"]:
            raise _refuse(root, manifest, f"{split} holds {len(sources[split])} images, not "
                                          f"{manifest['splits'][split]['count']}")
    stats_path = root / STATS
    if not stats_path.is_file() or sha1_file(stats_path) != manifest["stats_sha1"]:
        raise _refuse(root, manifest, f"{stats_path} is missing or fails its checksum")
    return manifest, sources, load_stats(stats_path)


def prepared_fingerprint(root: str | Path) -> str:
    """Hash of the manifest and of every shard file's size and mtime."""
    root = Path(root).expanduser()
    read_manifest(root)
    h = hashlib.sha1((root / MANIFEST).read_bytes())
    for split in ("train", "val"):
        for path in sorted((root / split).glob("shard-*.bin")):
            st = path.stat()
            h.update(f"{split}/{path.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class PreparedSource(Source):
    """One split of a prepared set: records read with pread, checked by crc32, decoded on access."""

    def __init__(self, root: Path, split: str, manifest: dict, tables: list[np.ndarray], bad_images: str):
        super().__init__()
        self.root, self.split, self.bad_images = root, split, bad_images
        self.side, self.codec = manifest["size"], manifest["codec"]
        self.source = manifest.get("source") or "SRC"
        self.names = [s["name"] for s in manifest["splits"][split]["shards"]]
        table = np.concatenate(tables) if tables else np.zeros((0, 4), np.int64)
        self.shard = np.repeat(np.arange(len(tables), dtype=np.int32), [len(t) for t in tables])
        self.record_no = np.concatenate([np.arange(len(t)) for t in tables]) if tables else np.zeros(0, np.int64)
        self.offset, self.length = table[:, 0].copy(), table[:, 1].copy()
        self.labels, self.crc = table[:, 2].copy(), table[:, 3].copy()
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(manifest["classes"])):
            raise _refuse(root, manifest, f"{split} labels lie outside the {len(manifest['classes'])} classes")
        self._files, self._pid = {}, None

    @property
    def has_records(self) -> bool:
        """Whether records are JPEG files that DeviceDecoder can decode (data.decode=device)."""
        return self.codec == "jpeg"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = {}, None  # descriptors do not travel to other processes
        return state

    def name(self, i: int) -> str:
        return f"{shard_path(self.root, self.split, self.names[self.shard[i]], '.bin')} record {self.record_no[i]}"

    def unreadable(self, i: int, err: BaseException) -> str:
        return (f"prepared image {self.name(i)} cannot be read ({err}); run python -m alexnet_mp.prepare "
                f"{self.source} {self.root} again to rewrite damaged shards, or set data.bad_images=skip")

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker: the parent's descriptors are its, not ours
            self._files, self._pid = {}, os.getpid()
        fd = self._files.pop(shard, None)
        if fd is None:
            if len(self._files) >= _OPEN_FILES:
                os.close(self._files.pop(next(iter(self._files))))
            fd = os.open(shard_path(self.root, self.split, self.names[shard], ".bin"), os.O_RDONLY)
        self._files[shard] = fd  # most recently used last
        return fd

    def _bytes(self, i: int) -> bytes:
        n = int(self.length[i])
        data = os.pread(self._fd(int(self.shard[i])), n, int(self.offset[i]))
        if len(data) != n or zlib.crc32(data) != int(self.crc[i]):
            raise DamagedRecord("its bytes do not match the recorded checksum")
        return data

    def record(self, i: int) -> torch.Tensor:
        """The stored bytes of record i (a JPEG file for jpeg sets) as a 1-D uint8 tensor."""
        try:
            return torch.frombuffer(bytearray(self._bytes(i)), dtype=torch.uint8)
        except (OSError, DamagedRecord) as e:
            raise DataError(self.unreadable(i, e)) from None

    def _decode(self, i: int) -> torch.Tensor:
        data = torch.frombuffer(bytearray(self._bytes(i)), dtype=torch.uint8)
        img = decode_jpeg(data, mode=ImageReadMode.RGB) if self.codec == "jpeg" else data.view(3, self.side, self.side)
        if tuple(img.shape) != (3, self.side, self.side):
            raise DamagedRecord(f"it decodes to {tuple(img.shape)}, not (3, {self.side}, {self.side})")
        return img
