"""ILSVRC-2012's validation images into class folders, ``VAL/<wnid>/``, as the training set is laid out.

    python -m alexnet_mp.imagenet valprep --devkit DEVKIT_DIR_OR_TAR --val VAL_DIR [--dry-run] [--copy]

The validation tar unpacks flat: ILSVRC2012_val_00000001.JPEG ... ILSVRC2012_val_00050000.JPEG. In the
devkit (ILSVRC2012_devkit_t12), data/ILSVRC2012_validation_ground_truth.txt gives each image's class as
an ILSVRC2012_ID (line i for image i) and data/meta.mat maps the ids to WordNet ids (wnids, e.g.
n01440764), the training set's folder names.

The mapping comes from meta.mat because the ids do not follow the sorted wnids: id 1 is n02119789 (kit
fox), while the sorted list starts with n01440764 (tench, id 449); numbering the training folders
1..1000 would file almost every image under a wrong class. meta.mat holds one variable, "synsets", a
struct array of 1860 synsets; the 1000 classes are its leaves (num_children == 0). `read_mat`, a
reader of the MAT v5 format (compressed or not, either byte order), reads it, so the project needs no
scipy.

Safety. The whole plan is checked before anything changes: every label names a known class, every
labelled image is present (flat in VAL or already in its class folder), none is in another class's
folder, and VAL holds nothing else. Moves are os.rename calls inside VAL, so each file is at its old
or its new path, never lost; --copy writes a hidden temporary file in the class folder and renames it
into place. An image already in its class folder is left alone, so a second run changes nothing and a
run after an interruption finishes the job.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import struct
import sys
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from tqdm import tqdm

META = "meta.mat"
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")
_DEVKIT_FIX = "point --devkit at the unpacked ILSVRC2012_devkit_t12/ folder or at ILSVRC2012_devkit_t12.tar.gz"


class ImageNetError(ValueError):
    """The devkit or the validation folder cannot be used; the message names the problem and the fix."""


class MatError(ValueError):
    """A file is not a MAT v5 file this reader understands."""


def val_name(index: int) -> str:
    """File name of validation image `index` (1-based)."""
    return f"ILSVRC2012_val_{index:08d}.JPEG"


# ---------------------------------------------------------------- MAT v5 reader

# Element types: struct codes of the numeric ones, text encodings of the character ones.
_MI_NUMERIC = {1: "b", 2: "B", 3: "h", 4: "H", 5: "i", 6: "I", 7: "f", 9: "d", 12: "q", 13: "Q"}
_MI_TEXT = {2: "utf-8", 16: "utf-8", 4: "utf-16", 17: "utf-16", 18: "utf-32"}
_MI_MATRIX, _MI_COMPRESSED = 14, 15
# Array classes (low byte of an array's flags): struct, char, and the numeric classes 6..15.
_MX_STRUCT, _MX_CHAR, _MX_NUMERIC = 2, 4, range(6, 16)


def _elements(buf: bytes, endian: str) -> list[tuple[int, bytes]]:
    """(type, payload) of each data element in buf, in order."""
    out, pos = [], 0
    while pos + 8 <= len(buf):
        word, size = struct.unpack_from(endian + "II", buf, pos)
        if word >> 16:  # small element: size and type share one word, payload in the next 4 bytes
            word, size, start, step = word & 0xFFFF, word >> 16, pos + 4, 8
        else:  # payloads are padded to 8 bytes, except compressed ones
            start = pos + 8
            step = 8 + (size if word == _MI_COMPRESSED else -(-size // 8) * 8)
        if start + size > len(buf):
            raise MatError(f"element of type {word} at byte {pos} runs past the end (truncated file)")
        out.append((word, buf[start:start + size]))
        pos += step
    return out


def _text(kind: int, data: bytes, endian: str, rows: int) -> str | list[str]:
    """A char array: one string, or its rows when it has several (data is column-major)."""
    enc = _MI_TEXT.get(kind)
    if enc is None:
        raise MatError(f"character data stored as element type {kind}")
    if enc != "utf-8":
        enc += "-le" if endian == "<" else "-be"
    text = data.decode(enc, errors="replace")
    return text if rows <= 1 else [text[r::rows] for r in range(rows)]


def _numbers(kind: int, data: bytes, endian: str) -> list:
    """A numeric array's real part, flat, in column-major order."""
    code = _MI_NUMERIC.get(kind)
    if code is None:
        raise MatError(f"numeric data stored as element type {kind}")
    n = len(data) // struct.calcsize(code)
    return list(struct.unpack(f"{endian}{n}{code}", data[:n * struct.calcsize(code)]))


def _struct(parts: list[tuple[int, bytes]], count: int, endian: str) -> list[dict]:
    """A struct array's elements (column-major), each a dict of field name -> value."""
    if len(parts) < 2:
        raise MatError("struct array without field names")
    width = struct.unpack_from(endian + "i", parts[0][1])[0]
    names = parts[1][1]
    fields = [names[i:i + width].split(b"\0")[0].decode("ascii") for i in range(0, len(names), max(width, 1))]
    values = [_matrix(payload, endian)[1] for kind, payload in parts[2:] if kind == _MI_MATRIX]
    if len(values) != count * len(fields):
        raise MatError(f"struct array of {count} elements x {len(fields)} fields holds {len(values)} values")
    k = len(fields)
    return [dict(zip(fields, values[i * k:(i + 1) * k])) for i in range(count)]


def _matrix(payload: bytes, endian: str) -> tuple[str, Any]:
    """(name, value) of one array: structs as lists of dicts, chars as str, numbers as flat lists,
    other classes (cell, sparse, object) as None."""
    if not payload:
        return "", []  # an empty array written as a bare tag
    parts = _elements(payload, endian)
    if len(parts) < 3:
        raise MatError("array without flags, dimensions and name")
    cls = struct.unpack_from(endian + "I", parts[0][1])[0] & 0xFF
    dims = struct.unpack(f"{endian}{len(parts[1][1]) // 4}i", parts[1][1])
    name = parts[2][1].decode("ascii", errors="replace")
    if cls == _MX_STRUCT:
        return name, _struct(parts[3:], math.prod(dims), endian)
    kind, data = parts[3] if len(parts) > 3 else (2, b"")
    if cls == _MX_CHAR:
        return name, _text(kind, data, endian, dims[0] if dims else 0)
    if cls in _MX_NUMERIC:
        return name, _numbers(kind, data, endian)
    return name, None


def read_mat(data: bytes) -> dict[str, Any]:
    """The variables of a MAT v5 file (MATLAB -v6 or -v7, either byte order), by name.

    Struct arrays become lists of dicts (elements in column-major order), char arrays str (a list of
    rows for a multi-row array), numeric arrays flat lists of their real part in column-major order;
    cell, sparse and object arrays become None. Raises MatError for anything else.
    """
    if data[:10] == b"MATLAB 7.3":
        raise MatError("MAT v7.3 (HDF5) file; only MAT v5 (MATLAB -v6/-v7) files are read")
    if len(data) < 128 or data[126:128] not in (b"IM", b"MI"):
        raise MatError("not a MAT v5 file (no MATLAB 5.0 header)")
    endian = "<" if data[126:128] == b"IM" else ">"
    out = {}
    for kind, payload in _elements(data[128:], endian):
        if kind == _MI_COMPRESSED:
            try:
                inner = _elements(zlib.decompress(payload), endian)
            except zlib.error as e:
                raise MatError(f"compressed variable does not inflate ({e})") from None
            kind, payload = inner[0] if inner else (0, b"")
        if kind == _MI_MATRIX:
            name, value = _matrix(payload, endian)
            out[name] = value
    return out


# ---------------------------------------------------------------- the devkit


def _own_synsets(data: bytes) -> list[tuple[int, str, int]]:
    rows = []
    for s in read_mat(data)["synsets"]:
        wnid = s["WNID"]
        if not isinstance(wnid, str):
            raise TypeError(f"WNID is {type(wnid).__name__}, not text")
        rows.append((int(s["ILSVRC2012_ID"][0]), wnid, int(s["num_children"][0])))
    return rows


def class_wnids(meta: bytes) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid of the classes (the leaf synsets) in a devkit's meta.mat."""
    try:
        synsets = _own_synsets(meta)
    except MatError as e:
        raise ImageNetError(f"{META} cannot be read ({e}); {_DEVKIT_FIX}") from None
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise ImageNetError(f"{META} has no synsets struct array with ILSVRC2012_ID, WNID and num_children "
                            f"({type(e).__name__}: {e}); {_DEVKIT_FIX}") from None
    wnids = {i: w.strip() for i, w, children in synsets if children == 0}
    if not wnids or len(set(wnids.values())) != len(wnids):
        raise ImageNetError(f"{META} lists {len(wnids)} classes with {len(set(wnids.values()))} distinct "
                            f"wnids; {_DEVKIT_FIX}")
    return wnids


def _devkit_files(path: Path) -> tuple[bytes, bytes]:
    """(meta.mat, ground truth) read from a devkit folder (or its parent, or its data/) or tar."""
    if path.is_dir():
        for d in (path / "data", path / "ILSVRC2012_devkit_t12" / "data", path):
            if (d / META).is_file() and (d / GROUND_TRUTH).is_file():
                return (d / META).read_bytes(), (d / GROUND_TRUTH).read_bytes()
        raise ImageNetError(f"--devkit {path} holds no data/{META} and data/{GROUND_TRUTH}; {_DEVKIT_FIX}")
    if not path.is_file():
        raise ImageNetError(f"--devkit {path} does not exist; {_DEVKIT_FIX}")
    try:
        with tarfile.open(path) as tar:
            found = {}
            for m in tar.getmembers():
                for want in (META, GROUND_TRUTH):
                    if m.isfile() and (m.name == f"data/{want}" or m.name.endswith(f"/data/{want}")):
                        found.setdefault(want, tar.extractfile(m).read())
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ImageNetError(f"--devkit {path} is not a readable tar archive ({e}); {_DEVKIT_FIX}") from None
    if len(found) < 2:
        raise ImageNetError(f"--devkit {path} holds no data/{META} and data/{GROUND_TRUTH}; {_DEVKIT_FIX}")
    return found[META], found[GROUND_TRUTH]


def _ground_truth(text: bytes) -> list[int]:
    """The class id on each line (trailing blank lines ignored)."""
    lines = text.decode("ascii", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ImageNetError(f"{GROUND_TRUTH} is empty; {_DEVKIT_FIX}")
    ids = []
    for n, line in enumerate(lines, 1):
        try:
            ids.append(int(line.strip()))
        except ValueError:
            raise ImageNetError(f"line {n} of {GROUND_TRUTH} is {line.strip()[:40]!r}, not a class id; "
                                f"use the devkit's unmodified file") from None
    return ids


def val_wnids(devkit: str | Path) -> list[str]:
    """The wnid of each validation image, in file order (item i is ILSVRC2012_val_{i+1:08d}.JPEG's),
    from a devkit folder or tar."""
    meta, truth = _devkit_files(Path(devkit).expanduser())
    wnids = class_wnids(meta)
    labels = []
    for n, i in enumerate(_ground_truth(truth), 1):
        if i not in wnids:
            raise ImageNetError(f"line {n} of {GROUND_TRUTH} names class id {i}, which {META} does not list "
                                f"among its {len(wnids)} classes (ids {min(wnids)}-{max(wnids)}); use the "
                                f"ground truth and {META} of one devkit")
        labels.append(wnids[i])
    return labels


# ---------------------------------------------------------------- the plan


@dataclass
class Plan:
    """What valprep does to the validation folder `val`, checked in full before anything changes."""
    val: Path
    pending: list[tuple[Path, Path]]  # (flat file, its place in its class folder), in file order
    placed: int  # images already in their class folder
    flat_copies: int  # of those, how many also still have a flat copy (left alone)
    classes: int  # class folders the images belong to

    @property
    def total(self) -> int:
        return len(self.pending) + self.placed


def _scan(val: Path) -> tuple[dict[int, list[str]], list[str]]:
    """{image index: the folders holding it ("" for val itself)} and every other entry found.

    Hidden entries (names starting with ".") are not data and are skipped.
    """
    found: dict[int, list[str]] = {}
    strays: list[str] = []
    folders = [("", val)]
    while folders:
        where, folder = folders.pop()
        with os.scandir(folder) as entries:
            for e in entries:
                rel = f"{where}/{e.name}" if where else e.name
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    if where:
                        strays.append(rel + "/")  # class folders hold images only
                    else:
                        folders.append((e.name, Path(e.path)))
                    continue
                m = _VAL_NAME.fullmatch(e.name)
                if m:
                    found.setdefault(int(m.group(1)), []).append(where)
                else:
                    strays.append(rel)
    return found, sorted(strays)


def _check_counts(val: Path, found: dict[int, list[str]], n: int) -> None:
    missing = [i for i in range(1, n + 1) if i not in found]
    if missing:
        raise ImageNetError(f"{val} holds {len(found)} validation images but the ground truth labels {n}: "
                            f"{len(missing)} missing, first {val_name(missing[0])}; restore them from "
                            f"ILSVRC2012_img_val.tar and run again")
    extra = sorted(i for i in found if not 1 <= i <= n)
    if extra:
        raise ImageNetError(f"{val} holds {len(found)} validation images but the ground truth labels {n}: "
                            f"{val_name(extra[0])} and {len(extra) - 1} more have no label; use the "
                            f"ground truth of the devkit that matches these images")


def plan_valprep(val: str | Path, wnids: list[str]) -> Plan:
    """Check the validation folder against `wnids` (item i: the class of image i+1) and list the files
    to place; changes nothing. Raises ImageNetError on any mismatch."""
    val = Path(val).expanduser()
    if not val.is_dir():
        raise ImageNetError(f"--val {val} is not a folder; give the folder ILSVRC2012_img_val.tar was "
                            f"unpacked into")
    found, strays = _scan(val)
    if strays:
        raise ImageNetError(f"{val} holds {len(strays)} entries that are not validation images "
                            f"ILSVRC2012_val_NNNNNNNN.JPEG in VAL or VAL/<wnid>/ (first: {strays[0]}); "
                            f"move them out of {val} and run again")
    _check_counts(val, found, len(wnids))
    pending, placed, flat_copies = [], 0, 0
    for i, wnid in enumerate(wnids, 1):
        wrong = [w for w in found[i] if w and w != wnid]
        if wrong:
            raise ImageNetError(f"{val_name(i)} is in {val / wrong[0]} but its class is {wnid}; move it "
                                f"back to {val} and run again")
        if wnid in found[i]:
            placed += 1
            flat_copies += "" in found[i]
        else:
            pending.append((val / val_name(i), val / wnid / val_name(i)))
    return Plan(val, pending, placed, flat_copies, len(set(wnids)))


# ---------------------------------------------------------------- carrying it out


def _copy(src: Path, dst: Path) -> None:
    """Copy under a hidden temporary name, then rename: dst is complete or absent."""
    tmp = dst.with_name(f".{dst.name}.partial")
    try:
        shutil.copy2(src, tmp)
        os.rename(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _progress(items: list, what: str, show: bool) -> Iterator:
    """Yield items, showing a bar on a terminal and a line per tenth otherwise."""
    if not show:
        yield from items
        return
    if sys.stderr.isatty():
        yield from tqdm(items, desc=what, unit="file", file=sys.stderr)
        return
    step = max(1, len(items) // 10)
    for k, item in enumerate(items, 1):
        yield item
        if k % step == 0 or k == len(items):
            print(f"{what}: {k}/{len(items)} files", file=sys.stderr, flush=True)


def apply_plan(plan: Plan, copy: bool = False, progress: bool = True) -> int:
    """Move (or copy) each pending file into its class folder; returns how many were placed."""
    what = "copying" if copy else "moving"
    try:
        for folder in sorted({dst.parent for _, dst in plan.pending}):
            folder.mkdir(exist_ok=True)
    except OSError as e:
        raise ImageNetError(f"cannot make the class folders in {plan.val} ({e}); make it writable and "
                            f"run again") from None
    done = 0
    for src, dst in _progress(plan.pending, what, progress):
        try:
            if dst.exists():  # appeared since the plan was checked: never overwrite
                raise FileExistsError(f"{dst} exists")
            if copy:
                _copy(src, dst)
            else:
                os.rename(src, dst)
        except OSError as e:
            raise ImageNetError(f"{what} {src.name} to {dst.parent.name}/ failed ({e}); {done} of "
                                f"{len(plan.pending)} files were placed and none is lost: fix the cause "
                                f"and run again to place the rest") from None
        done += 1
    return done


def valprep(devkit: str | Path, val: str | Path, dry_run: bool = False, copy: bool = False,
            progress: bool = True) -> Plan:
    """Sort the flat ILSVRC-2012 validation folder into VAL/<wnid>/ class folders (see the module doc).

    Returns the checked plan; with dry_run nothing changes."""
    plan = plan_valprep(val, val_wnids(devkit))
    if not dry_run:
        apply_plan(plan, copy=copy, progress=progress)
    return plan


# ---------------------------------------------------------------- command line


def _report(plan: Plan, dry_run: bool, copy: bool) -> str:
    verb = ("would copy" if copy else "would move") if dry_run else ("copied" if copy else "moved")
    if not plan.pending:
        line = f"nothing to do: all {plan.total} images of {plan.val} are in their {plan.classes} class folders"
    else:
        src, dst = plan.pending[0]
        line = (f"{verb} {len(plan.pending)} files into class folders under {plan.val} (e.g. {src.name} -> "
                f"{dst.parent.name}/); {plan.placed} were already in place, {plan.classes} classes in all")
    if plan.flat_copies:
        line += f"; {plan.flat_copies} flat copies of placed images remain in {plan.val} (delete them if unneeded)"
    return line


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alexnet_mp.imagenet",
                                     description="ILSVRC-2012 helpers.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("valprep", help="sort the flat validation folder into VAL/<wnid>/ class folders")
    p.add_argument("--devkit", required=True, help="ILSVRC2012_devkit_t12/ folder or its .tar.gz")
    p.add_argument("--val", required=True, help="folder ILSVRC2012_img_val.tar was unpacked into")
    p.add_argument("--dry-run", action="store_true", help="check and report the plan, change nothing")
    p.add_argument("--copy", action="store_true", help="copy into the class folders, keep the flat files")
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        plan = valprep(args.devkit, args.val, dry_run=args.dry_run, copy=args.copy)
    except ImageNetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a folder that cannot be listed
        print(f"error: {e}; check that --devkit and --val can be read", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: every file is at its old or its new place; run again to finish", file=sys.stderr)
        return 130
    print(_report(plan, args.dry_run, args.copy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
