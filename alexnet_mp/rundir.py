"""A run directory: resolved config, metrics, plot, summary, checkpoints, and the lock of the run using it.

    runs/<name>/config.yaml      the resolved config (what actually ran)
    runs/<name>/run.lock         held (flock) by the live run; records its pid, host and start
    runs/<name>/metrics.jsonl    one JSON object per epoch
    runs/<name>/steps.jsonl      one JSON object per logged step (the plot reads "step", "loss", "top1")
    runs/<name>/metrics.png      loss and accuracy per epoch; below, per step when steps.jsonl exists
    runs/<name>/summary.json     the final figures
    runs/<name>/checkpoints/     see checkpoint.py

A folder is changed only by a run that will go on in it. Starting is split so that every
check comes before the first write: `plan_new` / `check_resumable` only look, then
`create` / `reopen` make the folder, take its lock and (only then) write config.yaml.

Reuse rule: a folder that holds no committed checkpoint and no record (metrics.jsonl and
steps.jsonl empty or absent), and that no live run holds, is what a start that failed after
`create` leaves behind; `plan_new` (and `create`) accept it, so the same command can simply
be run again. Any other existing folder is taken.

Every write goes through files.py: atomic replacement, whole-line appends, one-line errors.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

import yaml

from . import checkpoint
from .config import Config, ConfigError, config_from_dict
from .files import StorageError, append_line, describe_os_error, make_dirs, write_atomic, write_text_atomic

METRIC_KEYS = ("epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr",
               "images_per_sec", "seconds")
LOCK_FILE = "run.lock"


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked."""


def default_name() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


# ---------------------------------------------------------------- the lock


def _holder_text(info: dict) -> str:
    since = info.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {when}"


def _read_holder(fd: int) -> dict:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


class RunLock:
    """An exclusive flock on RUN/run.lock, held while this object lives (until `release`).

    The kernel drops a flock when its holder dies, so the lock of a run that was killed
    is free again; `stale` is then the dead holder's record (pid, host, since), else None.
    A second taker is refused with RunDirError naming the holder. The lock is as good as
    the file system's flock: local disks honour it; some network mounts do not.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        lock_path = self.path / LOCK_FILE
        try:
            self.fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise StorageError(describe_os_error(e, lock_path)) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(self.fd)
            os.close(self.fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunDirError(_in_use(self.path, holder)) from None
            raise StorageError(describe_os_error(e, lock_path)) from None
        self.stale = _read_holder(self.fd) or None
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        try:  # in place: a rename would give later takers another file to lock
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps(self.info).encode(), 0)
            os.fsync(self.fd)
        except OSError as e:
            self.release()
            raise StorageError(describe_os_error(e, lock_path)) from None

    def release(self) -> None:
        """Give the folder up (the record stays in the file for the next taker's `stale`)."""
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _in_use(path: Path, holder: dict) -> str:
    who = _holder_text(holder) if holder else "another process"
    return (f"{path} is in use by a live run ({who}); wait for it to finish or stop it, "
            f"or choose another run.name")


def holder(path: str | Path) -> dict | None:
    """The record of the live run holding `path` (pid, host, since), or None. Writes nothing."""
    try:
        fd = os.open(Path(path) / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RunDirError(f"cannot read the lock of {path} ({e.strerror}); check the folder's permissions") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # nobody holds it exclusively (closing the descriptor drops this probe)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise RunDirError(f"cannot probe the lock of {path} ({e.strerror})") from None
        return _read_holder(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- planning (no writes)


def _has_records(path: Path) -> bool:
    """Whether a run has logged anything (epochs or steps) in `path`."""
    return any((path / name).is_file() and (path / name).stat().st_size > 0
               for name in ("metrics.jsonl", "steps.jsonl"))


def _taken(path: Path) -> str:
    """Why `path` cannot hold a new run ("" when it can): a checkpoint, or records of a run."""
    if checkpoint.committed(path / "checkpoints"):
        return f"{path} already holds a run; continue it with run.resume={path} or choose another run.name"
    if _has_records(path):
        return (f"{path} holds the records of a run that wrote no checkpoint; choose another run.name, "
                f"or delete the folder to start that run again")
    return ""


def is_reusable(path: str | Path) -> bool:
    """A folder a failed start left: no committed checkpoint, no records, no live holder."""
    path = Path(path)
    return path.is_dir() and not _taken(path) and holder(path) is None


def _check_parent(path: Path) -> None:
    """The nearest existing ancestor of `path` must be a folder this process can write into."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RunDirError(f"cannot create {path}: {parent} is a file, not a folder; remove or rename it, "
                          f"or set run.out_dir elsewhere")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot create {path}: {parent} is not writable; set run.out_dir to a writable folder")


def plan_new(cfg: Config, prefix: str = "") -> Path:
    """The folder a new run will use: run.out_dir / (run.name, or `prefix` + a timestamp). Writes nothing.

    Refuses a name that is taken (see the reuse rule above) with the fix."""
    path = Path(cfg.run.out_dir) / (cfg.run.name or prefix + default_name())
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path} is a file, not a run folder; remove it or choose another run.name")
    if path.is_dir():
        live = holder(path)
        if live is not None:
            raise RunDirError(_in_use(path, live))
        if _taken(path):
            raise RunDirError(_taken(path))
    else:
        _check_parent(path)
    return path


def check_resumable(path: str | Path) -> None:
    """Refuse to resume `path` unless it is a run folder (valid config.yaml) that no live run holds.
    Writes nothing."""
    path = Path(path)
    load_run_config(path)
    live = holder(path)
    if live is not None:
        raise RunDirError(_in_use(path, live))


# ---------------------------------------------------------------- taking the folder (the first writes)


def create(path: str | Path, cfg: Config) -> RunLock:
    """Make the folder of a new run, lock it and write config.yaml; the lock is the caller's to release.

    A folder made meanwhile by another start is refused (the checks of `plan_new` run again
    under the lock)."""
    path = make_dirs(path)
    lock = RunLock(path)
    try:
        if _taken(path):
            raise RunDirError(_taken(path))
        write_config(path, cfg)
    except BaseException:
        lock.release()
        raise
    return lock


def reopen(path: str | Path, cfg: Config) -> RunLock:
    """Lock an existing run folder, then rewrite its config.yaml; the lock is the caller's to release."""
    path = Path(path)
    load_run_config(path)  # refused before the lock file is written
    lock = RunLock(path)
    try:
        load_run_config(path)  # still a run folder, now that no other run can change it
        write_config(path, cfg)
    except BaseException:
        lock.release()
        raise
    return lock


def write_config(path: Path, cfg: Config) -> None:
    write_text_atomic(Path(path) / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load_run_config(path: str | Path) -> dict:
    config_file = Path(path) / "config.yaml"
    if not config_file.is_file():
        raise RunDirError(f"{path} is not a run directory (no config.yaml); give the folder a training run wrote")
    try:
        data = yaml.safe_load(config_file.read_text())
        config_from_dict(data)
    except (yaml.YAMLError, ConfigError) as e:
        raise RunDirError(f"{config_file} is not a valid config: {str(e).splitlines()[0]}") from None
    return data


# ---------------------------------------------------------------- metrics and figures


def _read_jsonl(file: Path) -> list[dict]:
    """Records of a JSON-lines file; a torn last line (a killed writer) is left out."""
    if not file.is_file():
        return []
    text = file.read_text()
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]  # no newline yet: the write was cut short
    out = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                raise RunDirError(f"{file} line {number} is not JSON; repair or delete that line") from None
    return out


def append_metrics(path: Path, record: dict) -> None:
    append_line(Path(path) / "metrics.jsonl", json.dumps(record))


def read_metrics(path: Path) -> list[dict]:
    return _read_jsonl(Path(path) / "metrics.jsonl")


def truncate_metrics(path: Path, last_epoch: int, last_step: int | None = None) -> None:
    """Drop what a crash lost: metrics.jsonl records of epochs after `last_epoch` and, when
    `last_step` is given, steps.jsonl records of steps after it."""
    path = Path(path)
    cuts = [("metrics.jsonl", read_metrics, "epoch", last_epoch)]
    if last_step is not None:
        cuts.append(("steps.jsonl", read_steps, "step", last_step))
    for name, read, key, last in cuts:
        if not (path / name).is_file():
            continue
        records = read(path)
        kept = [r for r in records if r.get(key, 0) <= last]
        if len(kept) < len(records) or not _ends_whole(path / name):
            write_text_atomic(path / name, "".join(json.dumps(r) + "\n" for r in kept))


def _ends_whole(file: Path) -> bool:
    """False when `file` ends in a torn line (a write cut short)."""
    if not file.is_file() or file.stat().st_size == 0:
        return True
    with open(file, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def append_steps(path: Path, records: list[dict]) -> None:
    """Append per-step records (each a JSON object) to steps.jsonl."""
    if records:
        append_line(Path(path) / "steps.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def read_steps(path: Path) -> list[dict]:
    return _read_jsonl(Path(path) / "steps.jsonl")


def _epoch_panels(ax_loss, ax_acc, records: list[dict]) -> None:
    epochs = [r["epoch"] for r in records]
    ax_loss.plot(epochs, [r["train_loss"] for r in records], label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in records], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss per epoch")
    ax_acc.plot(epochs, [r["train_top1"] for r in records], label="train top-1")
    ax_acc.plot(epochs, [r["val_top1"] for r in records], label="validation top-1")
    ax_acc.plot(epochs, [r["val_top5"] for r in records], label="validation top-5")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy per epoch", ylim=(0, 1))


def _step_panels(ax_loss, ax_acc, steps: list[dict]) -> None:
    for ax, key, title in ((ax_loss, "loss", "training loss per step"), (ax_acc, "top1", "training top-1 per step")):
        points = [(r["step"], r[key]) for r in steps if r.get(key) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=f"train {key}")
        ax.set(xlabel="step", ylabel=key, title=title)
    ax_acc.set_ylim(0, 1)


def plot(path: Path) -> None:
    """metrics.png: loss and accuracy per epoch, and below them per step when steps.jsonl exists.
    Written under a temporary name and renamed: never half a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    records = [r for r in read_metrics(path) if r.get("train_loss") is not None]
    steps = [r for r in read_steps(path) if r.get("step") is not None]
    rows = [kind for kind, found in (("epoch", records), ("step", steps)) if found]
    if not rows:
        return
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 4 * len(rows)), squeeze=False)
    for (ax_loss, ax_acc), kind in zip(axes, rows):
        if kind == "epoch":
            _epoch_panels(ax_loss, ax_acc, records)
        else:
            _step_panels(ax_loss, ax_acc, steps)
        for ax in (ax_loss, ax_acc):
            ax.legend()
            ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        write_atomic(path / "metrics.png", lambda f: fig.savefig(f, format="png", dpi=90))
    finally:
        plt.close(fig)


def write_summary(path: Path, summary: dict) -> str:
    write_text_atomic(Path(path) / "summary.json", json.dumps(summary, indent=1))
    parts = [f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()]
    return "summary: " + " ".join(parts)
