"""Writes that leave either the old file or the new one, and one-line reasons when they fail.

Every file a run writes goes through here:

* `write_atomic` / `write_text_atomic` / `save_torch` write ``NAME.part`` next to the
  target, fsync it, rename it over ``NAME`` and fsync the folder. On failure the
  ``.part`` file is removed and ``NAME`` is as it was.
* `append_line` appends whole lines (metrics.jsonl, steps.jsonl). A line that a failed
  write left half-written is cut off again, and a torn last line left by a killed
  process is cut off before the next append.
* `make_dirs` creates folders.

Their failures raise `StorageError` carrying `describe_os_error`'s line: the path, the
cause in words and the fix.
"""
from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import torch

# errno -> (the cause in words, the fix); "{move}" names what to point elsewhere.
_CAUSES = {
    errno.ENOSPC: ("no space left on the device", "free disk space or move {move} to a disk with room"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota or move {move} elsewhere"),
    errno.EROFS: ("read-only file system", "move {move} to a writable file system"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder",
                    "remove or rename that file, or move {move} elsewhere"),
    errno.EEXIST: ("a file is in the way of a folder", "remove or rename that file, or move {move} elsewhere"),
    errno.EISDIR: ("a folder is in the way of a file", "remove or rename that folder, or move {move} elsewhere"),
    errno.EACCES: ("permission denied", "make it writable for this user or move {move} elsewhere"),
    errno.EPERM: ("operation not permitted", "make it writable for this user or move {move} elsewhere"),
    errno.EFBIG: ("file too large (the file system's or the process's file-size limit, ulimit -f)",
                  "raise the limit (ulimit -f unlimited) or move {move} to a file system that allows large files"),
    errno.EIO: ("input/output error (a failing disk or network mount)", "check the disk, or move {move} elsewhere"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter run.name or {move}"),
}


class StorageError(RuntimeError):
    """A file or folder could not be written; the message is one line with the cause and the fix."""


def find_os_error(error: BaseException) -> OSError | None:
    """The OSError behind `error`: itself, or one it was raised from or while handling."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def describe_os_error(e: OSError, path: str | Path, move: str = "run.out_dir") -> str:
    """One line: what could not be written, why in words, and what to do."""
    cause, fix = _CAUSES.get(e.errno, (e.strerror or str(e), "check the path, or move {move} elsewhere"))
    return f"cannot write {path}: {cause}; {fix.format(move=move)}"


def _fail(e: BaseException, path: Path, move: str) -> None:
    """Raise `e` as a StorageError when an OSError lies behind it, else as it is."""
    found = find_os_error(e)
    if found is None:
        raise e
    raise StorageError(describe_os_error(found, path, move)) from None


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def part_path(path: Path) -> Path:
    """The temporary name `write_atomic` writes before renaming into place."""
    return path.with_name(path.name + ".part")


def write_atomic(path: str | Path, write, move: str = "run.out_dir") -> None:
    """Write through `write(binary file)` to ``NAME.part``, fsync, then rename over `path`."""
    path = Path(path)
    part = part_path(path)
    try:
        with open(part, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, path)
        fsync_dir(path.parent)
    except BaseException as e:
        try:
            part.unlink()
        except OSError:
            pass  # never created, or the folder itself is unusable
        _fail(e, path, move)


def write_text_atomic(path: str | Path, text: str, move: str = "run.out_dir") -> None:
    write_atomic(path, lambda f: f.write(text.encode()), move)


def save_torch(path: str | Path, obj, move: str = "run.out_dir") -> None:
    """torch.save `obj` to `path` atomically. It is serialised in memory first, so that a full
    disk reads "no space left" and not the zip writer's "unexpected pos"."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, lambda f: f.write(buf.getbuffer()), move)


def make_dirs(path: str | Path, move: str = "run.out_dir") -> Path:
    """Create `path` and its parents (existing folders are fine)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if isinstance(e, FileExistsError):  # a file where the folder should be
            e = OSError(errno.EEXIST, os.strerror(errno.EEXIST))
        raise StorageError(describe_os_error(e, path, move)) from None
    return path


def _whole_lines_length(fd: int, size: int) -> int:
    """The length of the file up to and including its last newline."""
    block = 1 << 16
    end = size
    while end > 0:
        start = max(0, end - block)
        chunk = os.pread(fd, end - start, start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        end = start
    return 0


def append_line(path: str | Path, text: str, move: str = "run.out_dir") -> None:
    """Append `text` (one or more lines) to `path` and fsync; on failure the file keeps only whole lines."""
    path = Path(path)
    data = (text if text.endswith("\n") else text + "\n").encode()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as e:
        raise StorageError(describe_os_error(e, path, move)) from None
    try:
        size = os.fstat(fd).st_size
        keep = _whole_lines_length(fd, size) if size else 0
        if keep != size:  # a torn last line from a killed process
            os.ftruncate(fd, keep)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, keep)
            except OSError:
                pass  # devices and some mounts cannot be truncated
            raise
    except OSError as e:
        raise StorageError(describe_os_error(e, path, move)) from None
    finally:
        os.close(fd)
