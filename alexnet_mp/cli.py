"""The command line of launch/train.py: ``--config FILE``, ``--print-config`` and ``key=value`` overrides.

``--help`` lists every config key with its type, default, choices and one-line meaning, generated
from the dataclasses of `alexnet_mp.config`, so that it cannot drift from them.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

from . import rundir
from .config import Config, build_config, config_keys, format_value, load_yaml, parse_overrides

DESCRIPTION = "Train the two-column AlexNet: one process per column."
TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "text", list: "list[int]"}


def shown_default(value) -> str:
    """A default as --help shows it: as an override would spell it, with empty text as ""."""
    return '""' if value == "" else format_value(value)


def keys_help() -> str:
    """Every config key, by section: `  key  type, default D; one of: ...` and its meaning below it."""
    sections = {f.name: f.metadata["help"] for f in dataclasses.fields(Config)}
    lines = ["config keys (key=value on the command line; a --config YAML file holds the same keys",
             "by section, for example `train: {lr: 0.01}`):"]
    current = None
    for info in config_keys():
        section = info.key.split(".")[0]
        if section != current:
            lines += ["", f"{section}: {sections[section]}"]
            current = section
        choices = f"; one of: {', '.join(map(str, info.choices))}" if info.choices else ""
        lines += [f"  {info.key}  {TYPE_NAMES[info.type]}, default {shown_default(info.default)}{choices}",
                  f"      {info.help}"]
    return "\n".join(lines)


def build_parser(prog: str | None, description: str, *,
                 default_config: Path | None = None) -> argparse.ArgumentParser:
    """The parser of launch/train.py; its --help ends with every config key (`keys_help`)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=keys_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    default = f" (default: {default_config})" if default_config else ""
    parser.add_argument("--config", metavar="FILE", help=f"YAML config file{default}")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config keys, e.g. train.epochs=5 (all keys are listed below)")
    return parser


def _resume_of(tree) -> str:
    run = tree.get("run") if isinstance(tree, dict) else None
    resume = run.get("resume") if isinstance(run, dict) else None
    return resume if isinstance(resume, str) else ""


def resolve_config(config_file: str | Path | None, overrides: list[str], default_config: Path) -> Config:
    """The validated config of a run.

    A new run: `config_file` (or `default_config`), then the overrides. A resumed run (run.resume
    in the overrides or the file): the run's own config.yaml, then the file, then the overrides;
    an evaluation-only run gets a name of its own rather than the trained run's.
    """
    resume = _resume_of(parse_overrides(overrides)) or (_resume_of(load_yaml(config_file)) if config_file else "")
    if not resume:
        return build_config(config_file or default_config, overrides)
    trained = rundir.load_run_config(resume)
    unnamed = copy.deepcopy(trained)
    unnamed.setdefault("run", {})["name"] = ""
    cfg = build_config(config_file, overrides, base=unnamed)
    return cfg if cfg.run.eval_only else build_config(config_file, overrides, base=trained)


def load_config(argv: list[str] | None, default_config: Path, *,
                parser: argparse.ArgumentParser | None = None) -> tuple[Config, argparse.Namespace]:
    """Parse the command line into a validated Config; --print-config prints it and exits 0.

    Raises ConfigError (a bad value or file) or rundir.RunDirError (a run.resume that is not a run).
    """
    parser = parser or build_parser(None, DESCRIPTION, default_config=default_config)
    args = parser.parse_intermixed_args(argv)
    cfg = resolve_config(args.config, args.overrides, default_config)
    if args.print_config:
        sys.stdout.write(cfg.to_yaml())
        sys.stdout.flush()
        raise SystemExit(0)
    return cfg, args
