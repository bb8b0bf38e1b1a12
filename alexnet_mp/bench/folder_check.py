"""python -m alexnet_mp.bench.folder_check: what the data checks cost on an image folder of N files.

Makes an ImageNet-layout folder of --files training images (plus one validation image per class)
in --classes class folders, all the same tiny JPEG: the checks read names, sizes and modification
times, never pixels. Then times, best of --repeats, the listing a run starts with (every file with
its size and time) and the between-epoch check (`data.check`) in its two modes: sample (every path,
plus the size and time of data.check_sample files) and full (every file's size and time). The folder
was just written, so the figures are for a warm page cache; a cold or network file system is slower.
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from ..config import build_config
from ..data.bundle import dataset_fingerprint
from ..data.folders import scan
from ..files import write_text_atomic
from ..progress import Progress


def tiny_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 60, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def make_folder(root: Path, files: int, classes: int, progress: Progress) -> int:
    """root/train/<class>/<i>.jpg for `files` images spread over `classes`, root/val/<class>/0.jpg;
    returns the number of files written."""
    blob, written = tiny_jpeg(), 0
    with progress.task("writing the folder", files + classes) as task:
        for c in range(classes):
            names = [("train", i) for i in range(c, files, classes)] + [("val", 0)]
            for split, i in names:
                folder = root / split / f"c{c:04d}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{i}.jpg").write_bytes(blob)
            task.update(len(names))
            written += len(names)
    return written


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def time_checks(root: Path, classes: int, sample: int, repeats: int) -> dict:
    """Seconds (best of `repeats`) of the start-up listing and of each data.check mode."""
    cfg = build_config(overrides=["data.dataset=folder", f"data.root={root}", f"model.num_classes={classes}",
                                  f"data.check_sample={sample}"])
    listing = scan(str(root), stat=True)
    return {
        "files": sum(len(files) for split in listing.splits.values() for files in split.values()),
        "listing_with_stat_s": _best_of(lambda: scan(str(root), stat=True), repeats),
        "check_sample_s": _best_of(lambda: dataset_fingerprint(cfg, mode="sample"), repeats),
        "check_full_s": _best_of(lambda: dataset_fingerprint(cfg, mode="full"), repeats),
        "check_sample_files": sample, "repeats": repeats,
    }


def markdown(result: dict) -> str:
    return "\n".join([
        f"### Data checks on a folder of {result['files']:,} files: {result['machine']}, {result['date']}", "",
        f"{result['python']}; warm page cache, best of {result['repeats']} "
        f"(`python -m alexnet_mp.bench.folder_check`).", "",
        "| what | seconds |", "|---|---:|",
        f"| listing at start-up (every file, with size and time) | {result['listing_with_stat_s']:.2g} |",
        f"| between epochs, `data.check=sample` ({result['check_sample_files']} files stat'ed) "
        f"| {result['check_sample_s']:.2g} |",
        f"| between epochs, `data.check=full` | {result['check_full_s']:.2g} |", ""])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m alexnet_mp.bench.folder_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=100_000, help="training images (100000)")
    p.add_argument("--classes", type=int, default=1000, help="class folders (1000)")
    p.add_argument("--sample", type=int, default=1000, help="data.check_sample (1000, the default)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, the best is kept (3)")
    p.add_argument("--dir", default=None, help="where to make the folder (a new temporary folder)")
    p.add_argument("--out", default=None, help="also write the result here as JSON, and as Markdown beside it")
    p.add_argument("--machine", default=platform.node(), help="the machine's name in the result")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if min(args.files, args.classes, args.sample, args.repeats) < 1:
        print("error: --files, --classes, --sample and --repeats must be at least 1", file=sys.stderr)
        return 2
    progress = Progress(every=max(1, args.files // 10))  # ten lines when stderr is not a terminal
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        root = Path(work) / "folder"
        make_folder(root, args.files, args.classes, progress)
        print(f"timing the listing and the data checks, best of {args.repeats}", file=sys.stderr)
        result = time_checks(root, args.classes, args.sample, args.repeats)
    result.update(machine=args.machine, date=time.strftime("%Y-%m-%d"),
                  python=f"Python {platform.python_version()} on {platform.system()} {platform.release()}")
    text = markdown(result)
    print(text)
    if args.out:
        out = Path(args.out)
        write_text_atomic(out, json.dumps(result, indent=1) + "\n", move="--out")
        write_text_atomic(out.with_suffix(".md"), text, move="--out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
