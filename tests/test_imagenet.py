"""ILSVRC-2012 validation folders: the MAT v5 reader, the devkit, and valprep on a made-up devkit."""
from __future__ import annotations

import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest

from alexnet_mp.imagenet import (GROUND_TRUTH, ImageNetError, MatError, class_wnids, main, plan_valprep,
                                 read_mat, val_name, val_wnids, valprep)

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- a MAT v5 writer for the tests
# MATLAB's writer, as the format documents it: every value an miMATRIX of flags, dimensions, name and
# data; `compact` stores numbers in the smallest integer type and text as UTF-8 (as MATLAB does),
# otherwise as doubles and UTF-16 code units; empty arrays are then bare tags.


def _element(kind: int, payload: bytes, e: str) -> bytes:
    if len(payload) <= 4:  # small element: size and type in one word
        return struct.pack(e + "I", (len(payload) << 16) | kind) + payload.ljust(4, b"\0")
    return struct.pack(e + "II", kind, len(payload)) + payload + b"\0" * (-len(payload) % 8)


def _array(cls: int, dims: tuple, data: bytes, e: str, name: str = "") -> bytes:
    body = (_element(6, struct.pack(e + "II", cls, 0), e) + _element(5, struct.pack(f"{e}{len(dims)}i", *dims), e)
            + _element(1, name.encode(), e) + data)
    return struct.pack(e + "II", 14, len(body)) + body


def _value(v, e: str, compact: bool) -> bytes:
    if isinstance(v, str):
        data = _element(16, v.encode(), e) if compact else _element(4, struct.pack(f"{e}{len(v)}H", *map(ord, v)), e)
        return _array(4, (1, len(v)), data, e)
    if not v and compact:
        return struct.pack(e + "II", 14, 0)
    data = (_element(2, bytes(map(int, v)), e) if compact and all(x in range(256) for x in v)
            else _element(9, struct.pack(f"{e}{len(v)}d", *v), e))
    return _array(6, (1, len(v)) if v else (0, 0), data, e)


def _struct_array(name: str, rows: list[dict], e: str, compact: bool) -> bytes:
    fields = list(rows[0])
    names = b"".join(f.encode().ljust(32, b"\0") for f in fields)
    data = _element(5, struct.pack(e + "i", 32), e) + _element(1, names, e)
    data += b"".join(_value(r[f], e, compact) for r in rows for f in fields)
    return _array(2, (len(rows), 1), data, e, name)


def mat_file(variables: dict[str, list[dict]], endian: str = "<", compress: bool = True,
             compact: bool = True) -> bytes:
    header = b"MATLAB 5.0 MAT-file, written by the tests".ljust(116) + b"\0" * 8
    header += struct.pack(endian + "HH", 0x0100, 0x4D49)  # version, then "MI" as this file orders it
    out = header
    for name, rows in variables.items():
        element = _struct_array(name, rows, endian, compact)
        if compress:
            packed = zlib.compress(element)
            element = struct.pack(endian + "II", 15, len(packed)) + packed
        out += element
    return out


# ---------------------------------------------------------------- a made-up devkit
# Four classes whose ILSVRC ids run against the sorted wnids (as in the real devkit, where id 1 is
# n02119789 and the sorted list starts with n01440764), plus two non-leaf synsets, as meta.mat has.
IDS = {1: "n01491361", 2: "n01440764", 3: "n01484850", 4: "n01443537"}
PARENTS = {5: ("n01439121", [2, 4]), 6: ("n01482330", [1, 3])}
TRUTH = [3, 1, 4, 1, 2, 2, 4, 3]  # class id of ILSVRC2012_val_00000001.JPEG ... _00000008.JPEG


def synsets(ids=IDS, parents=PARENTS) -> list[dict]:
    rows = [{"ILSVRC2012_ID": [i], "WNID": w, "words": f"class {i}", "num_children": [0], "children": []}
            for i, w in ids.items()]
    rows += [{"ILSVRC2012_ID": [i], "WNID": w, "words": "group", "num_children": [len(c)], "children": c}
             for i, (w, c) in parents.items()]
    return rows


def make_devkit(root: Path, truth=TRUTH, meta: bytes | None = None, as_tar: bool = False) -> Path:
    kit = root / "ILSVRC2012_devkit_t12"
    (kit / "data").mkdir(parents=True)
    (kit / "data" / "meta.mat").write_bytes(mat_file({"synsets": synsets()}) if meta is None else meta)
    (kit / "data" / GROUND_TRUTH).write_text("".join(f"{i}\n" for i in truth))
    if not as_tar:
        return kit
    path = root / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(kit, arcname=kit.name)
    return path


def make_val(root: Path, n: int = len(TRUTH)) -> Path:
    val = root / "val"
    val.mkdir()
    for i in range(1, n + 1):
        (val / val_name(i)).write_bytes(f"image {i}".encode())
    return val


def tree(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under folder (hidden ones too): relative path -> (content, mtime)."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def expected_layout() -> dict[str, bytes]:
    return {f"{IDS[c]}/{val_name(i)}": f"image {i}".encode() for i, c in enumerate(TRUTH, 1)}


def contents(folder: Path) -> dict[str, bytes]:
    return {k: v[0] for k, v in tree(folder).items()}


# ---------------------------------------------------------------- the MAT reader


@pytest.mark.parametrize("endian", ["<", ">"])
@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("compact", [True, False])
def test_mat_reader_reads_struct_arrays_in_every_storage_form(endian, compress, compact):
    data = mat_file({"synsets": synsets(), "other": [{"x": [1.5, 2.5]}]}, endian, compress, compact)
    got = read_mat(data)
    assert got["other"] == [{"x": [1.5, 2.5]}]
    assert [(s["ILSVRC2012_ID"], s["WNID"], s["num_children"], s["children"]) for s in got["synsets"]] == \
        [(r["ILSVRC2012_ID"], r["WNID"], r["num_children"], r["children"]) for r in synsets()]
    assert class_wnids(data) == IDS


@pytest.mark.parametrize("data, says", [
    (b"not a mat file at all" * 10, "not a MAT v5 file"),
    (b"MATLAB 7.3 MAT-file".ljust(512, b"\0"), "HDF5"),
    (mat_file({"synsets": synsets()}, compress=False)[:-40], "truncated"),
    (mat_file({"synsets": synsets()})[:-4] + b"\0\0\0\0", "inflate"),  # the zlib checksum spoilt
])
def test_mat_reader_refuses_unreadable_files(data, says):
    with pytest.raises(MatError, match=says):
        read_mat(data)


@pytest.mark.parametrize("meta, says", [
    (mat_file({"classes": synsets()}), "no synsets struct array"),
    (mat_file({"synsets": [{"ILSVRC2012_ID": [1], "WNID": "n1"}]}), "no synsets struct array"),
    (mat_file({"synsets": synsets(ids={1: "n01440764", 2: "n01440764"})}), "distinct wnids"),
    (b"garbage" * 40, "cannot be read"),
])
def test_devkit_with_unusable_meta_is_refused_in_one_line(tmp_path, meta, says):
    kit = make_devkit(tmp_path, meta=meta)
    with pytest.raises(ImageNetError, match=says) as err:
        val_wnids(kit)
    assert "\n" not in str(err.value) and "--devkit" in str(err.value)


@pytest.mark.parametrize("as_tar", [False, True])
def test_devkit_labels_follow_meta_ids_not_sorted_wnids(tmp_path, as_tar):
    kit = make_devkit(tmp_path, as_tar=as_tar)
    assert val_wnids(kit) == [IDS[c] for c in TRUTH]
    if not as_tar:  # the devkit's parent and its data/ folder work as well
        assert val_wnids(kit.parent) == val_wnids(kit / "data") == [IDS[c] for c in TRUTH]


@pytest.mark.parametrize("truth, says", [
    (TRUTH[:3] + [5] + TRUTH[4:], "line 4 .* class id 5"),  # a non-leaf synset is not a class
    (TRUTH[:2] + [1001], "line 3 .* class id 1001"),
    (["3", "x"], "line 2 .* not a class id"),
    ([], "is empty"),
])
def test_ground_truth_with_unknown_or_bad_ids_is_refused(tmp_path, truth, says):
    kit = make_devkit(tmp_path, truth=truth)
    with pytest.raises(ImageNetError, match=says):
        val_wnids(kit)


def test_devkit_without_its_files_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notatar.tar").write_bytes(b"x" * 1000)
    for path, says in ((tmp_path / "empty", "holds no data/meta.mat"), (tmp_path / "nope", "does not exist"),
                       (tmp_path / "notatar.tar", "not a readable tar")):
        with pytest.raises(ImageNetError, match=says):
            val_wnids(path)


# ---------------------------------------------------------------- valprep


@pytest.mark.parametrize("copy", [False, True])
def test_valprep_files_every_image_under_its_class_and_loses_none(tmp_path, copy):
    kit, val = make_devkit(tmp_path), make_val(tmp_path)
    plan = valprep(kit, val, copy=copy, progress=False)
    assert (len(plan.pending), plan.placed, plan.classes) == (len(TRUTH), 0, len(IDS))
    flat = {val_name(i): f"image {i}".encode() for i in range(1, len(TRUTH) + 1)}
    assert contents(val) == {**expected_layout(), **(flat if copy else {})}


@pytest.mark.parametrize("copy", [False, True])
def test_valprep_second_run_changes_nothing(tmp_path, copy):
    kit, val = make_devkit(tmp_path), make_val(tmp_path)
    valprep(kit, val, copy=copy, progress=False)
    before = tree(val)
    plan = valprep(kit, val, copy=copy, progress=False)
    assert plan.pending == [] and plan.placed == len(TRUTH)
    assert tree(val) == before


def test_valprep_finishes_an_interrupted_run(tmp_path):
    kit, val = make_devkit(tmp_path), make_val(tmp_path)
    for i in (1, 2, 5):  # as if a run had stopped after placing these
        (val / IDS[TRUTH[i - 1]]).mkdir(exist_ok=True)
        (val / val_name(i)).rename(val / IDS[TRUTH[i - 1]] / val_name(i))
    plan = valprep(kit, val, progress=False)
    assert (len(plan.pending), plan.placed) == (len(TRUTH) - 3, 3)
    assert contents(val) == expected_layout()


def test_dry_run_changes_nothing(tmp_path):
    kit, val = make_devkit(tmp_path), make_val(tmp_path)
    before = tree(val)
    plan = valprep(kit, val, dry_run=True, progress=False)
    assert len(plan.pending) == len(TRUTH)
    assert tree(val) == before


def _misplace(val: Path) -> None:
    (val / IDS[2]).mkdir()
    (val / val_name(1)).rename(val / IDS[2] / val_name(1))  # image 1 is class 3's


@pytest.mark.parametrize("spoil, says", [
    (lambda val: (val / val_name(4)).unlink(), r"holds 7 .* labels 8: 1 missing, first ILSVRC2012_val_00000004"),
    (lambda val: (val / val_name(9)).write_bytes(b"9"), r"holds 9 .* labels 8: ILSVRC2012_val_00000009.JPEG"),
    (lambda val: (val / "notes.txt").write_text("x"), r"not validation images .*first: notes.txt"),
    (lambda val: (val / "ILSVRC2012_val_1.JPEG").write_text("x"), r"first: ILSVRC2012_val_1.JPEG"),
    (_misplace, rf"ILSVRC2012_val_00000001.JPEG is in .*{IDS[2]} but its class is {IDS[3]}"),
])
def test_valprep_refuses_any_mismatch_before_changing_anything(tmp_path, spoil, says):
    kit, val = make_devkit(tmp_path), make_val(tmp_path)
    spoil(val)
    before = tree(val)
    with pytest.raises(ImageNetError, match=says) as err:
        valprep(kit, val, progress=False)
    assert "\n" not in str(err.value)
    assert tree(val) == before


def test_valprep_refuses_labels_without_images_and_images_without_labels(tmp_path):
    kit = make_devkit(tmp_path, truth=TRUTH[:6])
    val = make_val(tmp_path)
    with pytest.raises(ImageNetError, match="holds 8 validation images but the ground truth labels 6"):
        plan_valprep(val, val_wnids(kit))
    with pytest.raises(ImageNetError, match="holds 8 .* labels 9: 1 missing"):
        plan_valprep(val, val_wnids(kit) + [IDS[1]] * 3)


def test_command_line_reports_plan_and_errors_in_one_line(tmp_path, capsys):
    kit, val = make_devkit(tmp_path, as_tar=True), make_val(tmp_path)
    assert main(["valprep", "--devkit", str(kit), "--val", str(val), "--dry-run"]) == 0
    assert "would move 8 files" in capsys.readouterr().out
    (val / val_name(8)).unlink()
    assert main(["valprep", "--devkit", str(kit), "--val", str(val)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "ILSVRC2012_val_00000008.JPEG" in err


def test_module_runs_as_a_command_with_progress(tmp_path):
    kit, val = make_devkit(tmp_path), make_val(tmp_path)
    cmd = [sys.executable, "-m", "alexnet_mp.imagenet", "valprep", "--devkit", str(kit), "--val", str(val)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "moved 8 files" in run.stdout and "moving: 8/8 files" in run.stderr
    assert contents(val) == expected_layout()
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert again.returncode == 0 and again.stdout.startswith("nothing to do: all 8 images")
