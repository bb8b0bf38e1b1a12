"""python -m alexnet_mp.prepare SRC OUT: write an ImageNet-layout folder once as a prepared set.

SRC holds train/<class>/* and val/<class>/*. Every image is decoded once, its shorter side scaled to
--size and the centre --size x --size kept (the paper's preprocessing), then stored in shards
(alexnet_mp/data/prepared.py describes the format): re-encoded JPEG (--format jpeg, the default;
about a sixth of raw size at quality 95) or raw uint8 (--format raw: no decoding at all when
training, 196 KB per 256 px image). Training reads it with data.dataset=prepared data.root=OUT.

The command uses --workers processes (all cores by default), shows progress (a bar on a terminal,
log lines otherwise), and resumes: finished shards are kept and only the rest are written, so an
interrupted run is continued by running the same command again (--max-shards N stops on purpose
after N shards). Everything written is verified (record counts, sha1 of every file) before the
manifest that marks the set complete; a damaged shard is written again. It also stores the
training set's statistics (mean, std, PCA and mean image over every training image).

An unreadable source image stops the command with its path and the fix; with --skip-bad it is left
out and listed in OUT/skipped.txt. OUT must be new, empty, or an earlier run of the same command:
a folder holding anything else, or a set prepared from other files or settings, is refused, so
nothing already prepared is lost.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .data.common import DataError
from .data.folders import full_fingerprint, scan
from .data.prepared import CODECS, FORMAT, MANIFEST, PLAN, SKIPPED, STATS, VERSION, sha1_file, shard_path
from .data.shardwriter import ShardJob, UnreadableSource, check_shard, read_done, remove_shard, write_shard
from .data.stats import Moments, save_stats


class PrepareError(RuntimeError):
    """The command cannot go on; the message names the problem and the fix."""


class Progress:
    """A tqdm bar on a terminal, otherwise a log line at most every `every` seconds and at the end."""

    def __init__(self, what: str, total: int, unit: str = "img", every: float = 10.0, stream=None):
        stream = sys.stderr if stream is None else stream
        self.what, self.total, self.unit, self.every, self.stream = what, total, unit, every, stream
        self.done, self.last = 0, time.monotonic()
        tty = hasattr(stream, "isatty") and stream.isatty()
        self.bar = tqdm(total=total, desc=what, unit=unit, file=stream) if tty else None

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.monotonic() - self.last >= self.every or self.done >= self.total:
            self.last = time.monotonic()
            print(f"{self.what}: {self.done}/{self.total} {self.unit}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _ScanProgress:
    """build-style progress(done, total, what) callback feeding one Progress line."""

    def __init__(self):
        self.progress = None

    def __call__(self, done: int, total: int, what: str) -> None:
        if self.progress is None:
            self.progress = Progress(what, total, unit="folders")
        self.progress.update(done - self.progress.done)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _lock(out: Path):
    """Hold OUT/.lock for this run: a second prepare of the same OUT is refused."""
    f = open(out / ".lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise PrepareError(f"another prepare is writing {out}; wait for it to finish") from None
    return f


def _check_out(out: Path, plan: dict) -> None:
    """Refuse an OUT that holds anything but an earlier run of this same plan."""
    old_path = out / PLAN
    if not old_path.is_file():
        others = [p.name for p in out.iterdir() if p.name != ".lock"]
        if others:
            raise PrepareError(f"{out} is not empty ({', '.join(sorted(others)[:3])} ...) and holds no "
                               f"prepared set; choose a new or empty OUT folder")
        return
    try:
        old = json.loads(old_path.read_text())
    except (OSError, ValueError) as e:
        raise PrepareError(f"{old_path} cannot be read ({e}); delete {out} to start over") from None
    for key in ("size", "codec", "quality", "shard_size"):
        if old.get(key) != plan[key]:
            raise PrepareError(f"{out} was prepared with {key}={old.get(key)}, not {plan[key]}; run with the "
                               f"same options, or choose another OUT folder (or delete {out})")
    if old.get("listing") != plan["listing"]:
        raise PrepareError(f"the files under the source changed since {out} was started (or it was prepared "
                           f"from another folder); choose another OUT folder, or delete {out} to start over")


def _make_plan(src: Path, size: int, codec: str, quality: int, shard_size: int) -> tuple[dict, dict]:
    """(plan, {split: [ShardJob files]}) for SRC; the plan is what a resumed run must match."""
    listing = scan(str(src), stat=True, progress=_ScanProgress(), what="SRC")
    files = {split: listing.files(split) for split in ("train", "val")}
    chunks = {split: [items[k:k + shard_size] for k in range(0, len(items), shard_size)]
              for split, items in files.items()}
    plan = {"format": FORMAT, "version": VERSION, "size": size, "codec": codec,
            "quality": quality if codec == "jpeg" else None, "shard_size": shard_size,
            "listing": full_fingerprint(listing), "classes": sorted(listing.splits["train"]),
            "source": str(src), "links_skipped": listing.links_skipped,
            "shards": {split: [f"shard-{k:05d}" for k in range(len(c))] for split, c in chunks.items()}}
    return plan, chunks


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use, not the host's
    except AttributeError:
        return os.cpu_count() or 1


def _worker_init() -> None:
    torch.set_num_threads(1)  # one process per core


def _run(jobs: list[ShardJob], workers: int) -> None:
    """Write the shards, workers at a time; the first unreadable image stops the command."""
    progress = Progress("writing shards", sum(len(j.files) for j in jobs))
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                write_shard(job)
                progress.update(len(job.files))
            return
        context = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch threads
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context, initializer=_worker_init) as pool:
            pending = {pool.submit(write_shard, job): job for job in jobs}
            while pending:
                done, _ = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    job = pending.pop(future)
                    if future.exception() is not None:
                        pool.shutdown(wait=True, cancel_futures=True)  # running shards finish and are kept
                        raise future.exception()
                    progress.update(len(job.files))
    except UnreadableSource as e:
        raise PrepareError(str(e)) from None
    finally:
        progress.close()


def _verify(out: Path, plan: dict) -> tuple[dict, list]:
    """({split: [done records]}, [(split, name, problem)]) after checksumming every shard."""
    names = [(split, name) for split, shards in plan["shards"].items() for name in shards]
    progress = Progress("verifying shards", len(names), unit="shards")
    records, bad = {split: [] for split in plan["shards"]}, []
    for split, name in names:
        record = read_done(out, split, name)
        problem = "its files are missing" if record is None else check_shard(out, split, name, record)
        if problem:
            bad.append((split, name, problem))
        else:
            records[split].append(record)
        progress.update()
    progress.close()
    return records, bad


def _check_classes(out: Path, plan: dict, records: dict) -> None:
    for split, recs in records.items():
        seen = set()
        for rec in recs:
            table = np.load(shard_path(out, split, rec["name"], ".idx.npy"), allow_pickle=False)
            seen.update(np.unique(table[:, 2]).tolist())
        missing = [c for k, c in enumerate(plan["classes"]) if k not in seen]
        if missing:
            raise PrepareError(f"class {missing[0]} has no readable images in {split}/ "
                               f"({len(missing)} such classes); add images or remove the class from the source")


def _finish(out: Path, src: Path, plan: dict, records: dict) -> dict:
    """Statistics, the skipped list and, last, the manifest."""
    _check_classes(out, plan, records)
    moments = Moments(plan["size"])
    for rec in records["train"]:
        with np.load(shard_path(out, "train", rec["name"], ".sums.npz"), allow_pickle=False) as z:
            moments.merge(Moments.from_arrays(z))
    save_stats(out / STATS, moments.stats())
    skipped = [str(src / rel) for split in ("train", "val") for rec in records[split] for rel in rec["skipped"]]
    if skipped:
        _write_text_atomic(out / SKIPPED, "".join(f"{p}\n" for p in skipped))
    else:
        (out / SKIPPED).unlink(missing_ok=True)
    manifest = {k: plan[k] for k in ("format", "version", "size", "codec", "quality", "classes", "source")}
    manifest["splits"] = {split: {"count": sum(r["count"] for r in recs), "shards": [
        {"name": r["name"], "count": r["count"], "bytes": r[".bin"]["bytes"], "sha1": r[".bin"]["sha1"],
         "index_sha1": r[".idx.npy"]["sha1"]} for r in recs]} for split, recs in records.items()}
    manifest["stats_sha1"], manifest["skipped"] = sha1_file(out / STATS), skipped
    manifest["links_skipped"] = plan["links_skipped"]
    _write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _clean_temporaries(out: Path) -> None:
    # Left by an interrupted run: a shard is only ever taken from its renamed files.
    for path in [*out.glob("*.tmp-*"), *out.glob("*.tmp"), *out.glob("*/*.tmp-*")]:
        path.unlink(missing_ok=True)


def _jobs(out: Path, src: Path, plan: dict, chunks: dict, skip_bad: bool) -> list[ShardJob]:
    """The shards without a done record."""
    return [ShardJob(str(out), str(src), split, name, files, plan["size"], plan["codec"], plan["quality"] or 0,
                     skip_bad)
            for split, names in plan["shards"].items() for name, files in zip(names, chunks[split])
            if read_done(out, split, name) is None]


def prepare(src, out, size: int = 256, workers: int = 0, skip_bad: bool = False, codec: str = "jpeg",
            quality: int = 95, shard_size: int = 2000, max_shards: int = 0) -> dict | None:
    """Write (or continue, or verify) the prepared set; the manifest, or None when shards remain."""
    src, out = Path(src).expanduser().resolve(), Path(out).expanduser().resolve()
    _check_args(size, codec, quality, shard_size, max_shards)
    try:
        plan, chunks = _make_plan(src, size, codec, quality, shard_size)
    except DataError as e:
        raise PrepareError(str(e)) from None
    if out.is_dir():
        _check_out(out, plan)  # before anything is written there
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        _check_out(out, plan)  # again, now that no other run can change it
        _write_text_atomic(out / PLAN, json.dumps(plan, indent=1))
        for split in plan["shards"]:
            (out / split).mkdir(exist_ok=True)
        _clean_temporaries(out)
        for _ in range(2):  # a shard that fails verification is written once more
            jobs = _jobs(out, src, plan, chunks, skip_bad)
            if max_shards and len(jobs) > max_shards:
                _run(jobs[:max_shards], workers or _cores())
                return None
            _run(jobs, workers or _cores())
            records, bad = _verify(out, plan)
            if not bad:
                return _finish(out, src, plan, records)
            (out / MANIFEST).unlink(missing_ok=True)  # no longer complete until the shards are rewritten
            for split, name, problem in bad:
                print(f"shard {split}/{name}: {problem}; writing it again", file=sys.stderr)
                remove_shard(out, split, name)
        raise PrepareError(f"shard {bad[0][0]}/{bad[0][1]} fails verification after being written again "
                           f"({bad[0][2]}); check the disk holding {out}")
    finally:
        lock.close()


def _check_args(size: int, codec: str, quality: int, shard_size: int, max_shards: int) -> None:
    if size < 16:
        raise PrepareError(f"--size {size} is too small; give the stored side in pixels, e.g. --size 256")
    if codec not in CODECS:
        raise PrepareError(f"--format {codec} is not one of {', '.join(CODECS)}")
    if not 1 <= quality <= 100:
        raise PrepareError(f"--quality {quality} must lie in 1..100")
    if not 1 <= shard_size <= 1 << 20:
        raise PrepareError(f"--shard-size {shard_size} must lie in 1..{1 << 20}")
    if max_shards < 0:
        raise PrepareError(f"--max-shards {max_shards} must be 0 (all) or positive")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m alexnet_mp.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("src", metavar="SRC", help="folder with train/<class>/ and val/<class>/ images")
    p.add_argument("out", metavar="OUT", help="folder to write the prepared set to (new, empty, or an earlier run)")
    p.add_argument("--size", type=int, default=256, help="stored side: shorter side scaled to it, centre crop (256)")
    p.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable images out, listed in OUT/skipped.txt")
    p.add_argument("--format", dest="codec", choices=CODECS, default="jpeg", help="record format (jpeg)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of the records (95)")
    p.add_argument("--shard-size", type=int, default=2000, help="images per shard (2000)")
    p.add_argument("--max-shards", type=int, default=0, help="write at most N shards, then stop (0: all)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start = time.monotonic()
    try:
        manifest = prepare(args.src, args.out, args.size, args.workers, args.skip_bad, args.codec,
                           args.quality, args.shard_size, args.max_shards)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; finished shards are kept: run the same command again to continue", file=sys.stderr)
        return 130
    if manifest is None:
        print(f"wrote {args.max_shards} shards; run the same command again to continue")
        return 0
    counts = {s: manifest["splits"][s]["count"] for s in ("train", "val")}
    gb = sum(sh["bytes"] for s in manifest["splits"].values() for sh in s["shards"]) / 1e9
    print(f"prepared {counts['train']} training and {counts['val']} validation images "
          f"({len(manifest['classes'])} classes, {manifest['size']} px, {manifest['codec']}, {gb:.2f} GB) "
          f"in {args.out} in {time.monotonic() - start:.0f} s"
          + (f"; {len(manifest['skipped'])} unreadable images skipped, listed in {Path(args.out) / SKIPPED}"
             if manifest["skipped"] else ""))
    print(f"train with: data.dataset=prepared data.root={args.out} data.resize={manifest['size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

