"""ImageNet-layout folders (ROOT/train/<class>/..., ROOT/val/<class>/...): scanning and reading.

Symbolic links. The scan never leaves a class folder and cannot loop: links to folders are not
followed, and links to files are used only when their target lies inside the same class folder
(after resolving every link). Any other link (to a folder, out of the class folder, or dangling) is
skipped, counted and listed in the scan's `links_skipped`. A class folder (or train/, val/, ROOT)
that is itself a link is followed: it is where the user points the scan.

Hidden files and folders (".x") are ignored: macOS "._x.jpg" forks and .ipynb_checkpoints are not
data. Images are recognised by extension (torchvision's IMG_EXTENSIONS).

Fingerprints. "full" hashes every file's path, size and mtime; "sample" hashes the directory
listings (every path) and the size and mtime of data.check_sample files spread evenly over the
sorted listing, so it costs one directory read per folder and check_sample stat calls.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

from .common import DataError
from .decode import decode_file
from .sources import Source

Progress = Callable[[int, int, str], None]
SPLITS = ("train", "val")


@dataclass
class Listing:
    """The images of a folder: {split: {class: [(path relative to root, size, mtime_ns)]}}, sorted.

    size and mtime are None when the scan did not stat the files (stat=False).
    """
    root: Path
    splits: dict
    links_skipped: list = field(default_factory=list)

    def files(self, split: str) -> list[tuple[str, int]]:
        """(relative path, label) of a split, labels by sorted training class."""
        labels = {c: k for k, c in enumerate(sorted(self.splits["train"]))}
        return [(rel, labels[c]) for c in sorted(self.splits[split]) for rel, _, _ in self.splits[split][c]]


def _link_inside(path: str, base: str) -> bool:
    """Whether a file link's final target exists and lies inside `base` (a resolved folder)."""
    target = os.path.realpath(path)
    return os.path.isfile(target) and os.path.commonpath([target, base]) == base


def _walk_class(class_dir: Path, root: Path, stat: bool, links: list) -> list[tuple]:
    """(path relative to root, size, mtime_ns) of the images under class_dir, sorted.

    Plain string paths, not pathlib: at a million files pathlib's parsing would dominate the scan.
    """
    base, out = os.path.realpath(class_dir), []
    todo = [(str(class_dir), class_dir.relative_to(root).as_posix() + "/")]
    while todo:
        folder, prefix = todo.pop()
        with os.scandir(folder) as it:
            entries = list(it)
        for e in entries:
            name = e.name
            if name.startswith("."):
                continue
            if e.is_symlink():
                if os.path.isdir(e.path) or not _link_inside(e.path, base):
                    links.append(prefix + name)
                    continue
            elif e.is_dir():
                todo.append((e.path, prefix + name + "/"))
                continue
            if not name.lower().endswith(IMG_EXTENSIONS):
                continue
            if stat:
                st = e.stat()
                out.append((prefix + name, st.st_size, st.st_mtime_ns))
            else:
                out.append((prefix + name, None, None))
    out.sort()
    return out


def _class_dirs(d: Path, what: str) -> list[str]:
    if not d.is_dir():
        raise DataError(f"{d} is missing; {what} must hold train/ and val/, each with one "
                        f"folder of images per class (ImageNet layout)")
    classes = sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{d} has no class folders; put the images in {d}/<class>/")
    return classes


def scan(data_root: str, stat: bool = True, progress: Progress | None = None, what: str = "data.root") -> Listing:
    """The layout checked and every image listed (with sizes and mtimes when stat).

    `what` names the folder in errors (the config key, or a command's argument).
    """
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"{what}={data_root} is not a folder; set {what} to a folder "
                        f"holding train/<class>/ and val/<class>/ image folders (ImageNet layout)")
    names = {split: _class_dirs(root / split, what) for split in SPLITS}
    for a, b in (("train", "val"), ("val", "train")):
        extra = sorted(set(names[a]) - set(names[b]))
        if extra:
            raise DataError(f"class folders {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''} "
                            f"are in {root / a} but not in {root / b}; add them to {b}/ or remove them "
                            f"from {a}/ (both splits need the same classes)")
    listing, total, done = Listing(root, {}), sum(map(len, names.values())), 0
    for split in SPLITS:
        listing.splits[split] = {}
        for c in names[split]:
            listing.splits[split][c] = _walk_class(root / split / c, root, stat, listing.links_skipped)
            done += 1
            if progress:
                progress(done, total, "scanning folders")
    return listing


def full_fingerprint(listing: Listing, only: tuple[str, ...] = SPLITS, salt: str = "") -> str:
    """Hash of every file's path, size and mtime (a listing made with stat=True)."""
    h = hashlib.sha1(salt.encode())
    for split in only:
        for cls in sorted(listing.splits[split]):
            h.update("".join(f"{rel}\t{size}\t{mtime}\n" for rel, size, mtime in listing.splits[split][cls]).encode())
    return h.hexdigest()[:16]


def sample_fingerprint(listing: Listing, count: int) -> str:
    """Hash of every path plus the size and mtime of `count` files spread evenly over the listing."""
    entries = [f for split in SPLITS for cls in sorted(listing.splits[split]) for f in listing.splits[split][cls]]
    h = hashlib.sha1(b"sample v1\n")
    h.update("".join(f"{rel}\n" for rel, _, _ in entries).encode())
    h.update(b"--\n")
    picks = np.linspace(0, len(entries) - 1, min(count, len(entries))).round().astype(np.int64) if entries else []
    for k in np.unique(picks):
        rel, size, mtime = entries[int(k)]
        if size is None:
            st = os.stat(listing.root / rel)
            size, mtime = st.st_size, st.st_mtime_ns
        h.update(f"{rel}\t{size}\t{mtime}\n".encode())
    return h.hexdigest()[:16]


class FolderSource(Source):
    """One split of an image folder, decoded, resized and centre-cropped on access."""

    def __init__(self, root: Path, files: list[tuple[str, int]], side: int, bad_images: str):
        super().__init__()
        self.root, self.side, self.bad_images = root, side, bad_images
        # Compact arrays, not a list of tuples: cheap to hold and to fork into loader workers.
        self.paths = np.array([os.fsencode(rel) for rel, _ in files], dtype=bytes)
        self.labels = np.array([label for _, label in files], dtype=np.int64)

    def path(self, i: int) -> Path:
        return self.root / os.fsdecode(self.paths[i])

    def name(self, i: int) -> str:
        return str(self.path(i))

    def _decode(self, i: int) -> torch.Tensor:
        return decode_file(self.path(i), self.side)
