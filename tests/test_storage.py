"""Storage: checkpoints you can trust and find, run folders nothing can corrupt, writes that fail in one line.

Failures are real: /dev/full gives ENOSPC (a symbolic link at the path written), RLIMIT_FSIZE in a
child process gives EFBIG, a file where a folder should be gives ENOTDIR.
"""
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from alexnet_mp import checkpoint, rundir
from alexnet_mp.checkpoint import CheckpointError
from alexnet_mp.config import build_config
from alexnet_mp.distributed import setup
from alexnet_mp.export import export
from alexnet_mp.files import StorageError, append_line, describe_os_error
from alexnet_mp.rundir import RunDirError, RunLock
from alexnet_mp.weights import build_reference
from harness import SMALL_MODEL, run_ranks

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
RECORD = {"epoch": 1, "step": 8, "train_loss": 2.0, "train_top1": 0.2, "val_loss": 2.1, "val_top1": 0.25,
          "val_top5": 0.6, "lr": 0.01, "images_per_sec": 100.0, "seconds": 1.0}
STEP = {"step": 4, "epoch": 1, "loss": 2.2, "top1": 0.1, "lr": 0.01}


def small_cfg(*overrides):
    return build_config(overrides=[*SMALL_MODEL, "dist.device=cpu", *overrides])


# ---------------------------------------------------------------- checkpoint format


def fake_checkpoint(root: Path, step: int, mp: int = 2, **fields) -> Path:
    """A committed checkpoint in the trainer's format, written without process groups."""
    folder = checkpoint.step_dir(root, step)
    folder.mkdir(parents=True)
    files = {}
    for name in checkpoint.column_files(mp):
        torch.save({"model": {"w": torch.full((64,), float(step))}}, folder / name)
        files[name] = checkpoint.sha256(folder / name)
    manifest = {"format": checkpoint.FORMAT, "step": step, "model_hash": "m", "files": files, "mp": mp, **fields}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _truncate(folder):
    path = folder / "column1.pt"
    path.write_bytes(path.read_bytes()[:100])


def _flip_a_byte(folder):
    data = bytearray((folder / "column0.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "column0.pt").write_bytes(bytes(data))


def _edit_manifest(folder, edit):
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


DAMAGE = {
    "truncated file": (_truncate, "does not match its checksum"),
    "corrupted bytes": (_flip_a_byte, "does not match its checksum"),
    "missing manifest": (lambda f: (f / "manifest.json").unlink(), "missing or unreadable"),
    "torn manifest": (lambda f: (f / "manifest.json").write_text('{"format": 1, "fi'), "missing or unreadable"),
    "checksum of the wrong file": (lambda f: _edit_manifest(f, lambda m: m["files"].update(
        {"column1.pt": m["files"]["column0.pt"]})), "does not match its checksum"),
    "a column missing from the manifest": (lambda f: _edit_manifest(f, lambda m: m["files"].pop("column1.pt")),
                                           "no checksum for column1.pt"),
    "a missing column file": (lambda f: (f / "column0.pt").unlink(), "column0.pt is missing"),
    "fewer columns than recorded": (lambda f: _edit_manifest(f, lambda m: m.update(mp=3)), "records mp=3"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_detected_and_the_previous_good_one_used(tmp_path, damage):
    root = tmp_path / "run" / "checkpoints"
    fake_checkpoint(root, 2)
    newest = fake_checkpoint(root, 4)
    spoil, words = DAMAGE[damage]
    spoil(newest)
    warnings = []
    folder, manifest = checkpoint.latest_good(root, warn=warnings.append)
    assert folder.name == "step-000000002" and manifest["step"] == 2
    assert len(warnings) == 1 and "step-000000004" in warnings[0] and words in warnings[0]
    assert checkpoint.resolve(tmp_path / "run")[0] == folder  # what run.resume=RUN loads
    with pytest.raises(CheckpointError, match=f"{words}|no checkpoint that verifies"):
        checkpoint.resolve(newest)  # named explicitly, a damaged checkpoint is an error


def test_verify_asks_for_the_files_of_the_recorded_number_of_columns(tmp_path):
    one = fake_checkpoint(tmp_path, 1, mp=1)
    assert checkpoint.verify(one)["mp"] == 1 and not (one / "column1.pt").exists()
    two = fake_checkpoint(tmp_path, 2, mp=2)
    (two / "column1.pt").unlink()
    with pytest.raises(CheckpointError, match="column1.pt is missing"):
        checkpoint.verify(two)
    _edit_manifest(one, lambda m: m.update(mp=2))  # claims two columns, holds one
    with pytest.raises(CheckpointError, match="no checksum for column1.pt"):
        checkpoint.verify(one)


class Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.makedirs, (self.target,)


def test_loading_refuses_pickled_code_even_with_a_valid_checksum(tmp_path):
    folder = fake_checkpoint(tmp_path, 1)
    torch.save({"model": Exploit(str(tmp_path / "pwned"))}, folder / "column0.pt")
    _edit_manifest(folder, lambda m: m["files"].update({"column0.pt": checkpoint.sha256(folder / "column0.pt")}))
    checkpoint.verify(folder)
    with pytest.raises(CheckpointError, match="cannot be read"):
        checkpoint.load_column(folder, 0)
    assert not (tmp_path / "pwned").exists()


def test_a_leftover_tmp_folder_is_not_a_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 2)
    (tmp_path / "step-000000004.tmp").mkdir()  # a crash mid-write
    assert [p.name for p in checkpoint.committed(tmp_path)] == ["step-000000002"]


def test_checkpoints_from_another_model_or_number_of_columns_are_refused():
    folder = Path("runs/x/checkpoints/step-000000002")
    manifest = {"model_hash": "m", "world_size": 2, "mp": 2}
    checkpoint.check_compatible(folder, manifest, "m")
    checkpoint.check_compatible(folder, dict(manifest, world_size=8), "m")  # any data-parallel size loads
    checkpoint.check_compatible(folder, dict(manifest, mp=1), "m", mp=1)
    with pytest.raises(CheckpointError, match="another model config"):
        checkpoint.check_compatible(folder, manifest, "other")
    with pytest.raises(CheckpointError, match="4 model-parallel columns"):
        checkpoint.check_compatible(folder, dict(manifest, world_size=4, mp=4), "m")
    with pytest.raises(CheckpointError, match="written by 1 model-parallel columns.*dist.mp=1"):
        checkpoint.check_compatible(folder, dict(manifest, mp=1), "m", mp=2)


# ---------------------------------------------------------------- kinds, pruning, the best one


def save_one(root, step, kind, metric=None, keep=2, payload=None, manifest=None):
    """A checkpoint written by one process without process groups (dist.mp=1)."""
    return checkpoint.save(root, step, 0, payload or {"model": {"w": torch.full((4,), float(step))}},
                           manifest or {"model_hash": "m"}, keep, kind=kind, best_metric=metric)


def names(root):
    return [int(p.name.split("-")[1]) for p in checkpoint.committed(root)]


def test_pruning_keeps_the_newest_of_each_kind_and_the_best(tmp_path):
    root = tmp_path / "checkpoints"
    history = [(8, "epoch", 0.30), (10, "step", None), (12, "step", None), (16, "epoch", 0.50),
               (18, "step", None), (20, "step", None), (22, "step", None), (24, "epoch", 0.40),
               (28, "step", None), (30, "step", None), (32, "epoch", 0.45), (34, "step", None)]
    for step, kind, metric in history:
        folder = save_one(root, step, kind, metric)
        assert folder.is_dir()  # the checkpoint just written always survives its own pruning
    # Newest two epoch checkpoints (24, 32), newest two step ones (30, 34), and the best (16, top-1 0.50).
    assert names(root) == [16, 24, 30, 32, 34]
    folder, manifest = checkpoint.best(root)
    assert folder.name == "step-000000016" and manifest["best_metric"] == 0.5 and manifest["kind"] == "epoch"
    assert checkpoint.latest_good(root)[1]["kind"] == "step" and manifest["mp"] == 1


def test_many_step_checkpoints_never_push_out_epoch_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    save_one(root, 8, "epoch", 0.1, keep=1)
    for step in range(9, 16):
        save_one(root, step, "step", keep=1)
    assert names(root) == [8, 15]


def test_the_best_is_the_earliest_of_equals_and_a_damaged_best_gives_way(tmp_path):
    root = tmp_path / "checkpoints"
    for step, metric in ((8, 0.4), (16, 0.6), (24, 0.6), (32, 0.5)):
        save_one(root, step, "epoch", metric, keep=1)
    assert names(root) == [16, 32] and checkpoint.best(root)[0].name == "step-000000016"
    _flip_a_byte(root / "step-000000016")
    warnings = []
    folder, manifest = checkpoint.best(root, warn=warnings.append)
    assert folder.name == "step-000000032" and "step-000000016" in warnings[0]
    assert checkpoint.best(tmp_path / "none") is None


def test_a_folder_with_an_unreadable_manifest_is_pruned_and_kept_ones_stay(tmp_path):
    root = tmp_path / "checkpoints"
    save_one(root, 8, "epoch", 0.2)
    (checkpoint.step_dir(root, 9)).mkdir()  # committed name, no manifest: can never load
    save_one(root, 16, "epoch", 0.3)
    assert names(root) == [8, 16]


# ---------------------------------------------------------------- export and --best


def column_payloads(cfg, seed=1):
    """Two column payloads of a reference network with random weights, and the network."""
    from alexnet_mp.weights import split_state
    ref = build_reference(cfg.model, seed)
    return ref, [{"model": split_state(ref.state_dict(), cfg.model, c)} for c in (0, 1)]


def two_column_checkpoint(root: Path, cfg, step: int, metric=None, seed=1, stats=None):
    """A committed two-column checkpoint in the trainer's format, without process groups."""
    ref, payloads = column_payloads(cfg, seed)
    payloads[0]["data_stats"] = stats or {"mean": torch.tensor([0.4, 0.5, 0.6]), "std": torch.tensor([0.2, 0.25, 0.3])}
    folder = checkpoint.step_dir(root, step)
    folder.mkdir(parents=True)
    files = {}
    for c, payload in enumerate(payloads):
        torch.save(payload, folder / f"column{c}.pt")
        files[f"column{c}.pt"] = checkpoint.sha256(folder / f"column{c}.pt")
    manifest = {"format": checkpoint.FORMAT, "step": step, "files": files, "mp": 2, "kind": "epoch",
                "best_metric": metric, "config": cfg.to_dict(), "model_hash": cfg.model_hash(),
                "classes": [f"c{i}" for i in range(cfg.model.num_classes)]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return ref


def test_export_merges_two_columns_and_best_picks_the_highest_top1(tmp_path):
    cfg = small_cfg()
    run = tmp_path / "run"
    best_ref = two_column_checkpoint(run / "checkpoints", cfg, 8, metric=0.7, seed=1)
    newest_ref = two_column_checkpoint(run / "checkpoints", cfg, 16, metric=0.5, seed=2)
    for flag, ref, step in (([], newest_ref, 16), (["--best"], best_ref, 8)):
        out = tmp_path / f"out{len(flag)}" / "alexnet.pt"
        proc = subprocess.run([sys.executable, "-m", "alexnet_mp.export", str(run), str(out), *flag],
                              capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        blob = torch.load(out, weights_only=True)
        assert blob["meta"]["step"] == step and f"step {step}" in proc.stdout
        assert all(torch.equal(blob["state_dict"][k], v) for k, v in ref.state_dict().items())
    assert not list(tmp_path.glob("**/*.part"))
    with pytest.raises(CheckpointError, match="give its run directory"):
        export(run / "checkpoints" / "step-000000016", tmp_path / "x.pt", best=True)


def test_export_of_a_run_without_checkpoints_fails_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "alexnet_mp.export", str(tmp_path / "empty"), str(tmp_path / "o.pt")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "holds no checkpoint" in proc.stderr
    assert not (tmp_path / "o.pt").exists()


# ---------------------------------------------------------------- the collective save (two processes)


def collective_save_worker(rank, root):
    """Both columns save through gloo: a good checkpoint, one column's file too large, a file in the
    way of the checkpoints folder, and singleton groups (dist.mp=1) writing one file each."""
    layout = setup(small_cfg().dist)
    root, out = Path(root), {}
    save = lambda r, step, group, **kw: checkpoint.save(r, step, layout.column, {"w": torch.full((256,), 1.0 + rank)},
                                                        {"model_hash": "m"}, 2, group, **kw)
    out["good"] = str(save(root, 1, layout.mp_group, kind="epoch", best_metric=0.5))
    if rank == 1:  # only column 1's file meets the limit
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.RLIM_INFINITY))
    try:
        save(root, 2, layout.mp_group, kind="step")
    except CheckpointError as e:
        out["efbig"] = str(e)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    (root.parent / "blocked").write_text("a file where a folder should be")
    try:
        save(root.parent / "blocked", 3, layout.mp_group)
    except CheckpointError as e:
        out["enotdir"] = str(e)
    singles = [dist.new_group([r]) for r in (0, 1)]  # every rank must create every group
    out["single"] = str(checkpoint.save(root.parent / f"single{rank}", 4, 0, {"w": torch.ones(8)},
                                        {"model_hash": "m"}, 2, singles[rank]))
    return out


def test_the_columns_commit_together_or_neither_and_say_why_in_one_line(tmp_path):
    root = tmp_path / "ckpt"
    results = run_ranks(collective_save_worker, args=(str(root),), timeout=120)
    assert results[0]["good"] == results[1]["good"] == str(checkpoint.step_dir(root, 1))
    manifest = checkpoint.verify(checkpoint.step_dir(root, 1))
    assert manifest["mp"] == 2 and manifest["kind"] == "epoch" and manifest["best_metric"] == 0.5
    assert torch.equal(checkpoint.load_column(checkpoint.step_dir(root, 1), 1)["w"], torch.full((256,), 2.0))
    for rank in (0, 1):  # both columns learn of column 1's failure, with the cause and the fix
        for key, words in (("efbig", "column 1: cannot write .*column1.pt: file too large.*ulimit -f unlimited"),
                           ("enotdir", "column 0: cannot write .*blocked.*not a folder")):
            assert "\n" not in results[rank][key]
            assert re.search(words, results[rank][key]), results[rank][key]
        assert "the last good checkpoint, step-000000001, is intact" in results[rank]["efbig"]
    assert [p.name for p in root.iterdir()] == ["step-000000001"]  # nothing of step 2 left behind
    for rank in (0, 1):
        single = Path(results[rank]["single"])
        assert checkpoint.verify(single)["mp"] == 1 and sorted(p.name for p in single.iterdir()) == [
            "column0.pt", "manifest.json"]


# ---------------------------------------------------------------- every writer under real failures


@pytest.fixture(scope="module")
def filled(tmp_path_factory) -> Path:
    """A run folder holding one of everything a run writes, including a checkpoint and an export."""
    run = tmp_path_factory.mktemp("template") / "run"
    cfg = small_cfg("dist.mp=1")
    run.mkdir(parents=True)
    rundir.write_config(run, cfg)
    rundir.append_metrics(run, RECORD)
    rundir.append_metrics(run, dict(RECORD, epoch=2, step=16))
    rundir.append_steps(run, [STEP, dict(STEP, step=12, epoch=2)])
    rundir.plot(run)
    rundir.write_summary(run, {"epochs": 2, "note": "x" * 64})
    ref = build_reference(cfg.model, 0)
    save_one(run / "checkpoints", 2, "epoch", 0.5, payload={
        "model": ref.state_dict(), "data_stats": {"mean": torch.full((3,), 0.5), "std": torch.full((3,), 0.25)}},
        manifest={"model_hash": cfg.model_hash(), "config": cfg.to_dict(), "classes": list("abcde")})
    export(run, run / "alexnet.pt")
    return run


def filled_run(filled: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(filled, run)
    return run


# name -> (the file it writes, relative to the run; how it is written; the write)
WRITERS = {
    "config.yaml": ("config.yaml", "atomic", lambda run: rundir.write_config(run, small_cfg("train.lr=0.5"))),
    "metrics.jsonl": ("metrics.jsonl", "append", lambda run: rundir.append_metrics(run, dict(RECORD, epoch=3))),
    "metrics.jsonl rewrite": ("metrics.jsonl", "atomic", lambda run: rundir.truncate_metrics(run, 1, 4)),
    "steps.jsonl": ("steps.jsonl", "append", lambda run: rundir.append_steps(run, [dict(STEP, step=20)])),
    "metrics.png": ("metrics.png", "atomic", lambda run: rundir.plot(run)),
    "summary.json": ("summary.json", "atomic", lambda run: rundir.write_summary(run, {"epochs": 3, "n": "y" * 64})),
    "checkpoint": ("checkpoints/step-000000004.tmp/column0.pt", "checkpoint",
                   lambda run: save_one(run / "checkpoints", 4, "step", payload={"w": torch.zeros(64)})),
    "export": ("alexnet.pt", "atomic", lambda run: export(run, run / "alexnet.pt")),
}


def snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and
            not p.is_symlink()}


def plant_full_disk(run: Path, target: str, how: str) -> None:
    """Make the write of `target` meet a full disk (/dev/full) where the writer opens it."""
    path = run / target
    if how == "atomic":
        os.symlink("/dev/full", path.with_name(path.name + ".part"))
    elif how == "append":
        path.unlink()
        os.symlink("/dev/full", path)
    else:  # the checkpoint's .tmp folder, a link to a folder whose part file is /dev/full
        elsewhere = run.parent / "elsewhere"
        elsewhere.mkdir()
        os.symlink("/dev/full", elsewhere / (path.name + ".part"))
        os.symlink(elsewhere, path.parent)


@pytest.mark.parametrize("writer", WRITERS)
def test_a_full_disk_fails_each_writer_in_one_line_and_keeps_what_was_there(filled, tmp_path, writer):
    run = filled_run(filled, tmp_path)
    target, how, write = WRITERS[writer]
    plant_full_disk(run, target, how)
    before = snapshot(run)
    with pytest.raises((StorageError, CheckpointError)) as caught:
        write(run)
    message = str(caught.value)
    assert "\n" not in message and "no space left on the device" in message and "free disk space" in message
    assert Path(target).name in message
    assert snapshot(run) == before  # the old contents, whole
    assert not list(run.parent.rglob("*.part")) and not list((run.parent / "elsewhere").glob("*.part"))
    assert names(run / "checkpoints") == [2]


def efbig_child(run: str) -> None:
    """In a child process: each writer under a 64-byte file-size limit; prints what each raised."""
    run = Path(run)
    import matplotlib.pyplot  # noqa: F401  (imports and font caches are written before the limit)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.RLIM_INFINITY))
    results = {}
    writers = {name: write for name, (_, _, write) in WRITERS.items()}
    writers["short.jsonl"] = lambda run: append_line(run.parent / "short.jsonl", json.dumps({"b": "z" * 100}))
    for name, write in writers.items():
        try:
            write(run)
            results[name] = "no error"
        except (StorageError, CheckpointError) as e:
            results[name] = str(e)
    print(json.dumps(results))


def test_a_file_size_limit_fails_each_writer_in_one_line_and_leaves_no_partial_file(filled, tmp_path):
    run = filled_run(filled, tmp_path)
    (tmp_path / "short.jsonl").write_text('{"a": 1}\n')  # below the limit: the next line crosses it
    before = snapshot(run)
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_storage; test_storage.efbig_child({str(run)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    assert (tmp_path / "short.jsonl").read_text() == '{"a": 1}\n'  # the part that fitted was cut off again
    for name, message in results.items():
        assert "file too large" in message and "ulimit -f unlimited" in message, (name, message)
        target = WRITERS[name][0] if name in WRITERS else name
        assert "\n" not in message and Path(target).name in message, (name, message)
    assert snapshot(run) == before  # appends cut back to whole lines, atomic writes never landed
    assert not list(run.rglob("*.part")) and not list(run.rglob("*.tmp"))


# The plot and the rewrite read the folder first: in a file they find nothing to write.
@pytest.mark.parametrize("writer", [w for w in WRITERS if w not in ("metrics.png", "metrics.jsonl rewrite")])
def test_a_file_in_place_of_the_run_folder_fails_each_writer_in_one_line(filled, tmp_path, writer):
    run = filled_run(filled, tmp_path)
    _, _, write = WRITERS[writer]
    blocked = tmp_path / "blocked"
    blocked.write_text("not a folder")
    if writer == "export":  # export reads the run and writes beside it: block the output's folder
        with pytest.raises(StorageError, match="blocked: a file is in the way of a folder; remove or rename") as caught:
            export(run, blocked / "alexnet.pt")
    else:
        with pytest.raises((StorageError, CheckpointError), match="blocked.*(not a folder|in the way)") as caught:
            write(blocked)
    assert "\n" not in str(caught.value) and blocked.read_text() == "not a folder"


def test_os_errors_are_described_by_cause_and_fix():
    import errno
    for code, words in ((errno.ENOSPC, "no space left"), (errno.EDQUOT, "disk quota exceeded"),
                        (errno.EROFS, "read-only file system"), (errno.ENOTDIR, "not a folder"),
                        (errno.EACCES, "permission denied"), (errno.EFBIG, "file too large")):
        line = describe_os_error(OSError(code, os.strerror(code)), "/x/y", move="run.out_dir")
        assert line.startswith("cannot write /x/y: ") and words in line and "run.out_dir" in line and "\n" not in line


# ---------------------------------------------------------------- metrics files


def test_torn_last_lines_are_ignored_on_reading_and_cut_before_the_next_append(tmp_path):
    rundir.append_metrics(tmp_path, RECORD)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_lo')  # a writer killed mid-line
    assert rundir.read_metrics(tmp_path) == [RECORD]
    rundir.append_metrics(tmp_path, dict(RECORD, epoch=2))
    assert [r["epoch"] for r in rundir.read_metrics(tmp_path)] == [1, 2]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2
    append_line(tmp_path / "x.txt", "a\nb")
    assert (tmp_path / "x.txt").read_text() == "a\nb\n"


def test_truncation_drops_the_epochs_and_steps_a_crash_lost(tmp_path):
    for epoch in (1, 2, 3):
        rundir.append_metrics(tmp_path, dict(RECORD, epoch=epoch, step=8 * epoch))
    rundir.append_steps(tmp_path, [dict(STEP, step=s, epoch=1 + (s - 1) // 8) for s in range(4, 25, 4)])
    rundir.truncate_metrics(tmp_path, 1, last_step=12)
    assert [r["epoch"] for r in rundir.read_metrics(tmp_path)] == [1]
    assert [r["step"] for r in rundir.read_steps(tmp_path)] == [4, 8, 12]
    rundir.truncate_metrics(tmp_path, 0)
    assert rundir.read_metrics(tmp_path) == [] and len(rundir.read_steps(tmp_path)) == 3


def test_the_plot_adds_a_row_of_per_step_panels_when_steps_exist(tmp_path):
    from PIL import Image
    rundir.append_metrics(tmp_path, RECORD)
    rundir.plot(tmp_path)
    with Image.open(tmp_path / "metrics.png") as im:
        one_row = im.size
    rundir.append_steps(tmp_path, [STEP, dict(STEP, step=8, loss=None), dict(STEP, step=12, loss=1.9)])
    rundir.plot(tmp_path)
    with Image.open(tmp_path / "metrics.png") as im:
        assert im.size[0] == one_row[0] and im.size[1] == 2 * one_row[1]
    assert not list(tmp_path.glob("*.part"))


# ---------------------------------------------------------------- the run lock


HOLDER = """
import sys
from alexnet_mp.rundir import RunLock
lock = RunLock(sys.argv[1])
print("held", flush=True)
if sys.argv[2] == "wait":
    sys.stdin.readline()
"""


def hold_in_child(path: Path, wait: bool) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), "wait" if wait else "exit"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def a_run(tmp_path, name="r") -> Path:
    cfg = small_cfg(f"run.out_dir={tmp_path}", f"run.name={name}")
    path = rundir.plan_new(cfg)
    rundir.create(path, cfg).release()
    rundir.append_metrics(path, RECORD)
    return path


def test_a_second_writer_is_refused_naming_the_live_holder_and_changes_nothing(tmp_path):
    run = a_run(tmp_path)
    config = (run / "config.yaml").read_bytes()
    holder = hold_in_child(run, wait=True)
    try:
        expected = re.escape(f"{run} is in use by a live run (pid {holder.pid} on {socket.gethostname()} since ")
        cfg = small_cfg("train.lr=0.5")
        for attempt in (lambda: RunLock(run), lambda: rundir.check_resumable(run), lambda: rundir.reopen(run, cfg),
                        lambda: rundir.plan_new(small_cfg(f"run.out_dir={tmp_path}", "run.name=r"))):
            with pytest.raises(RunDirError, match=expected):
                attempt()
        assert rundir.holder(run)["pid"] == holder.pid
    finally:
        holder.communicate("\n", timeout=30)
    assert (run / "config.yaml").read_bytes() == config  # the refused resume left it byte for byte
    assert rundir.holder(run) is None


def test_the_lock_of_a_dead_run_is_free_and_names_the_dead_holder(tmp_path):
    run = a_run(tmp_path)
    dead = hold_in_child(run, wait=False)
    dead.wait(timeout=30)
    rundir.check_resumable(run)
    with rundir.reopen(run, small_cfg("train.lr=0.5")) as lock:
        assert lock.stale["pid"] == dead.pid and lock.info["pid"] == os.getpid()
        assert rundir.load_run_config(run)["train"]["lr"] == 0.5  # rewritten once the lock is held
        with pytest.raises(RunDirError, match=f"pid {os.getpid()}"):
            RunLock(run)
    assert rundir.holder(run) is None


# ---------------------------------------------------------------- planning before writing


def test_planning_writes_nothing_and_refuses_what_cannot_be_used(tmp_path):
    out = tmp_path / "runs"
    path = rundir.plan_new(small_cfg(f"run.out_dir={out}", "run.name=a"))
    assert path == out / "a" and not out.exists()
    assert rundir.plan_new(small_cfg(f"run.out_dir={out}"), prefix="eval-").name.startswith("eval-")
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirError, match="is a file, not a folder"):
        rundir.plan_new(small_cfg(f"run.out_dir={tmp_path / 'file'}", "run.name=a"))
    with pytest.raises(RunDirError, match="is a file, not a run folder"):
        rundir.plan_new(small_cfg(f"run.out_dir={tmp_path}", "run.name=file"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(RunDirError, match="not a run directory \\(no config.yaml\\)"):
        rundir.check_resumable(tmp_path / "plain")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "plain"]


def test_a_failed_start_leaves_a_folder_the_same_command_reuses_and_a_real_run_is_taken(tmp_path):
    cfg = small_cfg(f"run.out_dir={tmp_path}", "run.name=r")
    path = rundir.plan_new(cfg)
    rundir.create(path, cfg).release()  # then the start failed: no checkpoint, no records
    assert rundir.plan_new(cfg) == path
    with rundir.create(path, cfg):
        rundir.append_steps(path, [STEP])  # the run got going, and was killed in its first epoch
    for attempt in (lambda: rundir.plan_new(cfg), lambda: rundir.create(path, cfg)):  # create: planned before
        with pytest.raises(RunDirError, match="holds the records of a run that wrote no checkpoint"):
            attempt()
    fake_checkpoint(path / "checkpoints", 2)
    with pytest.raises(RunDirError, match=re.escape(f"already holds a run; continue it with run.resume={path}")):
        rundir.plan_new(cfg)
    assert rundir.holder(path) is None  # the refused create let go of the lock


def test_reopen_refuses_a_folder_that_is_not_a_run_without_writing(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(RunDirError, match="no config.yaml"):
        rundir.reopen(tmp_path / "plain", small_cfg())
    assert list((tmp_path / "plain").iterdir()) == []
