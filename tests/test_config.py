"""The config: documented keys, the command line, literal text, and values checked before a run."""
import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from alexnet_mp.cli import build_parser, load_config
from alexnet_mp.config import CHOICES, Config, ConfigError, build_config, config_keys

ROOT = Path(__file__).resolve().parent.parent
SMALL = ROOT / "configs" / "small.yaml"
TYPE_WORDS = {bool: "bool", int: "int", float: "float", str: "text", list: "list[int]"}


def walk(section=Config, prefix=""):
    """(dotted key, type, default, dataclass field) of every key, found without the code under test."""
    hints, defaults = typing.get_type_hints(section), section()
    for f in dataclasses.fields(section):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from walk(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name], getattr(defaults, f.name), f


def value_of(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def keys_of(kind):
    return [key for key, target, _, _ in walk() if target is kind]


FLOAT_KEYS, INT_KEYS, BOOL_KEYS = keys_of(float), keys_of(int), keys_of(bool)
TEXT_KEYS = [key for key in keys_of(str) if key not in CHOICES]


def rejected(overrides, path=None) -> str:
    with pytest.raises(ConfigError) as err:
        build_config(path, overrides)
    message = str(err.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- documentation and the command line


def test_help_lists_every_key_with_type_default_choices_and_meaning():
    text = build_parser("train.py", "Train.").format_help()
    keys = list(walk())
    assert [k.key for k in config_keys()] == [k for k, _, _, _ in keys]
    for key, target, default, f in keys:
        meaning = f.metadata["help"]
        assert meaning.strip() and "\n" not in meaning, key
        m = re.search(rf"^  {re.escape(key)}  (\S+), default (.*?)(?:; one of: (.*))?\n      (.*)$", text, re.M)
        assert m, f"{key} is missing from --help"
        assert m.group(1) == TYPE_WORDS[target] and m.group(4) == meaning, key
        assert m.group(3) == (", ".join(map(str, CHOICES[key])) if key in CHOICES else None), key
        shown = m.group(2)
        if default == "":
            assert shown == '""', key
        else:  # the default as shown, typed back as an override, is the default
            assert value_of(build_config(overrides=[f"{key}={shown}"]), key) == default, key


def test_print_config_round_trips(tmp_path, capsys):
    argv = ["--config", str(SMALL), "run.name=2024", "data.root=/data/0123", "run.out_dir=a: b #c",
            "model.lrn.alpha=1e-5", "train.lr_milestones=[3,5]", "dist.amp=bf16", "train.seed=017"]
    cfg, args = load_config(argv, SMALL)
    assert args.config == str(SMALL) and cfg.train.seed == 17
    with pytest.raises(SystemExit) as done:
        load_config([*argv, "--print-config"], SMALL)
    assert done.value.code == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert build_config(printed) == cfg
    assert yaml.safe_load(printed.read_text()) == cfg.to_dict()


def test_resume_starts_from_the_runs_own_config(tmp_path):
    trained = build_config(overrides=["run.name=trained", "model.num_classes=7", "train.epochs=4"])
    run = tmp_path / "trained"
    run.mkdir()
    (run / "config.yaml").write_text(trained.to_yaml())  # what a run directory holds of its config
    cfg, _ = load_config([f"run.resume={run}", "train.epochs=6"], SMALL)
    assert cfg.model == trained.model and cfg.train.epochs == 6 and cfg.run.name == "trained"
    evaluated, _ = load_config([f"run.resume={run}", "run.eval_only=true"], SMALL)
    assert evaluated.model == trained.model and evaluated.run.name == ""  # a run directory of its own
    named, _ = load_config([f"run.resume={run}", "run.eval_only=true", "run.name=ev"], SMALL)
    assert named.run.name == "ev"
    fresh, _ = load_config(["train.epochs=2"], SMALL)
    assert fresh.model == build_config(SMALL).model and fresh.train.epochs == 2


def test_model_hash_of_an_unchanged_network_is_stable():
    # Checkpoints record this hash; a resume refuses a different one.
    assert Config().model_hash() == "c37df91ba969b083"
    assert build_config(SMALL).model_hash() == "fcca72c27d119b32"


# ---------------------------------------------------------------- literal text


@pytest.mark.parametrize("key", TEXT_KEYS)
@pytest.mark.parametrize("text", ["2024", "1e3", "1.50", "true", "no", "null", "~", "0123", "0x1F", "2024-01-01",
                                  "12:30", "[a, b]", "{a: 1}", "'quoted'", " padded ", "a=b", "#hash", ""])
def test_text_overrides_keep_their_text(key, text):
    assert value_of(build_config(overrides=[f"{key}={text}"]), key) == text


@pytest.mark.parametrize("written, text", [
    ("2024", "2024"), ("1e3", "1e3"), ("1.50", "1.50"), ("true", "true"), ("no", "no"), ("0123", "0123"),
    ("0x1F", "0x1F"), ("2024-01-01", "2024-01-01"), ("12:30", "12:30"), ("'007'", "007"), ('"a: b"', "a: b"),
    ("~", ""), ("", ""),
])
def test_text_in_files_keeps_its_text(tmp_path, written, text):
    path = tmp_path / "c.yaml"
    path.write_text(f"run:\n  name: {written}\n  out_dir: {written}\ndata:\n  root: {written}\n")
    cfg = build_config(path)
    assert cfg.run.name == cfg.run.out_dir == cfg.data.root == text


def test_text_from_a_dict_turns_numbers_into_text():
    cfg = build_config(base={"run": {"name": 2024, "out_dir": True}})
    assert cfg.run.name == "2024" and cfg.run.out_dir == "true"
    assert "run.name: expected text" in str(pytest.raises(ConfigError, build_config, base={"run": {"name": [1]}}).value)


# ---------------------------------------------------------------- kinds and ranges


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", ["nan", ".nan", "inf", ".inf", "-inf", "-.Inf", "1e999"])
def test_numeric_keys_reject_nan_and_inf(key, value):
    assert rejected([f"{key}={value}"]).startswith(f"{key}: must be a finite number")


@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_numeric_keys_reject_nan_in_files_and_in_code(tmp_path, key):
    *sections, name = key.split(".")
    path = tmp_path / "c.yaml"
    path.write_text("".join(f"{'  ' * depth}{part}:\n" for depth, part in enumerate(sections))
                    + f"{'  ' * len(sections)}{name}: .nan\n")
    assert rejected([], path).startswith(f"{key}: must be a finite number")
    cfg = Config()
    setattr(value_of(cfg, ".".join(sections)), name, float("inf"))
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}: must be a finite number"):
        cfg.validate()


@pytest.mark.parametrize("key", list(CHOICES))
def test_choice_keys_reject_unknown_values_naming_the_allowed_ones(key):
    bad = "bogus" if isinstance(CHOICES[key][0], str) else "3"
    message = rejected([f"{key}={bad}"])
    assert message.startswith(f"{key}: ") and all(str(allowed) in message for allowed in CHOICES[key])


@pytest.mark.parametrize("key", INT_KEYS)
@pytest.mark.parametrize("value", ["1.5", "2.0", "ten", "true", "[1]", ""])
def test_int_keys_reject_non_integers(key, value):
    assert rejected([f"{key}={value}"]).startswith(f"{key}: expected a whole number")


@pytest.mark.parametrize("key", INT_KEYS)
def test_int_keys_reject_non_integers_set_in_code(key):
    cfg = Config()
    *sections, name = key.split(".")
    setattr(value_of(cfg, ".".join(sections)), name, 3.0)
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}: expected a whole number"):
        cfg.validate()


@pytest.mark.parametrize("key", BOOL_KEYS)
@pytest.mark.parametrize("value", ["maybe", "2", "0", ""])
def test_bool_keys_reject_non_booleans(key, value):
    assert rejected([f"{key}={value}"]).startswith(f"{key}: expected true or false")


@pytest.mark.parametrize("value", ["[1.5,2]", "[a]", "[true]", "3", "{a: 1}"])
def test_list_keys_reject_other_elements(value):
    for key in ("model.conv_widths", "train.lr_milestones"):
        assert rejected([f"{key}={value}"]).startswith(f"{key}: expected a list of whole numbers")


def test_whole_numbers_are_read_as_decimal():
    cfg = build_config(overrides=["train.epochs=017", "train.seed=1_000", "train.lr=1e-3", "dist.timeout_s=30"])
    assert (cfg.train.epochs, cfg.train.seed, cfg.train.lr, cfg.dist.timeout_s) == (17, 1000, 1e-3, 30.0)


@pytest.mark.parametrize("overrides, words", [
    (["model.widths=3"], "unknown key 'model.widths'"),
    (["model.lrn.sise=3"], "unknown key 'model.lrn.sise'"),
    (["train.epochs=ten"], "train.epochs: expected a whole number"),
    (["train.lr=-1"], "train.lr: must be positive"),
    (["model.crop_size=60"], "model.crop_size: 60 is too small"),
    (["model.crop_size=600", "data.resize=600"], "model.crop_size: 600 is larger than 512"),
    (["model.conv_widths=[96,255,384,384,256]"], "must be a positive even number"),
    (["model.conv_widths=[96,256,384,384]"], "model.conv_widths: give five widths"),
    (["model.fc8=gpu1"], "model.fc8: 'gpu1' is not one of split, rank0"),
    (["data.resize=200"], "data.resize: 200 is smaller than model.crop_size=227"),
    (["data.dataset=folder"], "data.root"),
    (["data.dataset=prepared"], "data.root"),
    (["model.columns=1"], "model.columns"),
    (["train"], "is not key=value"),
    (["train.momentum=1"], "train.momentum: 1.0 must be in [0, 1)"),
    (["model.dropout=1"], "model.dropout: 1.0 must be in [0, 1)"),
    (["model.lrn.k=0"], "model.lrn.k: must be positive"),
    (["model.lrn.beta=-1"], "model.lrn.beta: must be non-negative"),
    (["data.pca_lighting=-0.1"], "data.pca_lighting: must be non-negative"),
    (["run.log_every=0"], "run.log_every: must be at least 1"),
    (["data.check_sample=0"], "data.check_sample: must be at least 1"),
    (["data.val_size=0"], "data.val_size: must be at least 1"),
    (["dist.timeout_s=0"], "dist.timeout_s: 0.0 must be positive"),
    (["dist.startup_timeout_s=1e20"], "dist.startup_timeout_s"),
    (["profile.trace_active=0"], "profile.trace_active: must be at least 1"),
    (["profile.trace=true"], "profile.trace"),
    (["run.eval_only=true"], "run.eval_only"),
    (["run.name=a/b"], "run.name: 'a/b' is a path"),
    (["train.seed=-300000000000000000"], "train.seed"),
    (["data.decode=device"], "data.decode"),
])
def test_bad_config_names_the_key(overrides, words):
    assert words in rejected(overrides)


def test_yaml_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  crop_size: [unclosed\n")
    assert re.search(r"not valid YAML: .*line \d+, column \d+", rejected([], bad))
    assert "does not exist" in rejected([], tmp_path / "missing.yaml")
    (tmp_path / "two.yaml").write_text("a: 1\n---\nb: 2\n")
    assert "not valid YAML" in rejected([], tmp_path / "two.yaml")
    assert "cannot read value" in rejected(["model.conv_widths=[1,"])


def test_yaml_tags_are_refused_under_text_keys_too(tmp_path):
    for value in ("!!python/name:os.system", "!!python/object/apply:os.getcwd []"):
        (tmp_path / "evil.yaml").write_text(f"run:\n  name: {value}\n")
        assert "not valid YAML" in rejected([], tmp_path / "evil.yaml")


def test_yaml_1_1_floats_are_numbers(tmp_path):
    (tmp_path / "ok.yaml").write_text("train:\n  lr: 1e-3\n  weight_decay: 5e-4\n")  # YAML 1.1 reads them as text
    cfg = build_config(tmp_path / "ok.yaml")
    assert (cfg.train.lr, cfg.train.weight_decay) == (1e-3, 5e-4)


# ---------------------------------------------------------------- suggested fixes


def suggestions(message: str) -> list[list[str]]:
    """The settings after '; set ', one list per alternative ('a=1 and b=2, or set c=3')."""
    found = re.search(r"; set (.*)$", message)
    return [alt.split(" and ") for alt in found.group(1).split(", or set ")] if found else []


@pytest.mark.parametrize("path, overrides", [
    (None, ["model.columns=1"]),
    (None, ["data.dataset=folder"]),
    (None, ["data.dataset=prepared"]),
    (None, ["data.resize=200"]),
    (SMALL, ["model.crop_size=100"]),  # too big for both the 80 px images and data.resize=80
    (None, ["data.image_size=300"]),
    (None, ["model.conv_widths=[96,255,384,384,-3]"]),
    (None, ["model.conv_widths=[96,256]"]),
    (None, ["model.fc_width=4095"]),
    (None, ["model.crop_size=60"]),
    (None, ["data.decode=device"]),
    (None, ["data.decode=device", "data.dataset=prepared", "data.root=/x", "dist.device=cpu"]),
    (None, ["train.lr_milestones=[51,25,79]"]),
    (None, ["train.lr_milestones=[0,25,25]"]),
    (None, ["run.name=exp/a"]),
    (None, ["run.name=/abs/a"]),
    (None, ["run.eval_only=true"]),
    (None, ["profile.trace=true"]),
])
def test_suggested_fixes_validate(path, overrides):
    offered = suggestions(rejected(overrides, path))
    assert offered, "the message should suggest a fix"
    for settings in offered:
        build_config(path, [*overrides, *settings])  # raises if the suggestion does not fix the config
