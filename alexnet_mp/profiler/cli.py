"""``python -m alexnet_mp.profiler RUN_DIR``: print a run's profile table and draw its timeline again."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .plots import plot_timeline
from .report import PICTURE_FILE, PROFILE_FILE, render_table, write_whole
from .summary import FORMAT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alexnet_mp.profiler",
                                     description="Print a run's profile table and draw its timeline again.")
    parser.add_argument("run_dir", help="a run directory holding profile.json (or the file itself)")
    parser.add_argument("--out", help=f"where to write the timeline (default: RUN_DIR/{PICTURE_FILE})")
    args = parser.parse_args(argv)
    path = Path(args.run_dir)
    file = path if path.is_file() else path / PROFILE_FILE
    if not file.is_file():
        print(f"error: {file} does not exist; run training with profile.enabled=true to write it",
              file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else file.parent / PICTURE_FILE
    try:
        profile = json.loads(file.read_text())
        if profile.get("format") != FORMAT:
            raise ValueError(f"format {profile.get('format')!r}, expected {FORMAT}")
        table = render_table(profile)
        write_whole(out, lambda tmp: plot_timeline(profile, tmp))
    except (ValueError, KeyError, TypeError, IndexError) as e:
        print(f"error: {file} is not a profile this version can read ({type(e).__name__}: {e}); "
              f"write it again with profile.enabled=true", file=sys.stderr)
        return 2
    print(table)
    print(f"timeline: {out}")
    return 0
