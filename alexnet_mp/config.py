"""Configuration: typed dataclasses, YAML files, dotted ``key=value`` overrides.

Every key carries a one-line meaning (``metadata["help"]``) that ``--help`` lists
(`alexnet_mp.cli`). Every value is checked here, before any process group starts,
so that a typo costs a second and not a lost run. Errors name the dotted key, and
any fix they suggest is one the config accepts.
"""
from __future__ import annotations

import contextvars
import copy
import dataclasses
import datetime
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, mistyped or out of range."""


def _key(default, meaning: str):
    """A config key: its default and the one-line meaning that --help shows."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": meaning})
    return field(default=default, metadata={"help": meaning})


def _section(cls, meaning: str):
    return field(default_factory=cls, metadata={"help": meaning})


@dataclass
class LRNConfig:
    """Local response normalisation in torch.nn.LocalResponseNorm's convention (alpha divided
    by size), which is what the original cuda-convnet code computed."""
    enabled: bool = _key(True, "normalise after the ReLUs of conv1 and conv2; false leaves LRN out")
    size: int = _key(5, "channels in each normalisation window (the paper's n)")
    alpha: float = _key(1e-4, "scale of the sum of squares, divided by size as torch does "
                              "(the paper's formula taken literally is 5e-4 here)")
    beta: float = _key(0.75, "exponent of the denominator")
    k: float = _key(2.0, "additive constant of the denominator (the paper's 2; torch's default is 1)")


@dataclass
class ModelConfig:
    num_classes: int = _key(1000, "classes the network tells apart (fc8's outputs)")
    crop_size: int = _key(227, "side in pixels of the square crops the network sees (at least 67)")
    conv_widths: list = _key([96, 256, 384, 384, 256],
                             "output maps of conv1..conv5 summed over both columns (each column holds half)")
    fc_width: int = _key(4096, "units of fc6 and fc7 summed over both columns")
    lrn: LRNConfig = _section(LRNConfig, "local response normalisation")
    activation: str = _key("relu", "nonlinearity: relu, or tanh (the paper's comparison, section 3.1)")
    pool: str = _key("overlap", "max-pooling: overlap is 3x3 stride 2 (the paper's), plain is 2x2 stride 2")
    columns: int = _key(2, "2: the paper's two-column network; 1: its one-GPU comparison network "
                           "(half the kernels of conv1-conv4), run with dist.mp=1")
    dropout: float = _key(0.5, "probability of dropping an output of fc6 or fc7 in training; 0 turns it off")
    fc8: str = _key("split", "split: each column computes half the classes; rank0: column 0 computes "
                             "all of fc8, as the original code did")
    init: str = _key("paper", "paper: N(0, init_std) weights, biases 1 in conv2/4/5 and fc6/7; caffe: biases "
                              "0.1 there, fc6/7 weights N(0, init_std / 2); he: He-normal weights, zero biases")
    init_std: float = _key(0.01, "std of the normal weights of init=paper and init=caffe")


@dataclass
class DataConfig:
    dataset: str = _key("synthetic", "synthetic: built-in generated images, no files; folder: ROOT/train and "
                                     "ROOT/val class folders; prepared: a set written by python -m alexnet_mp.prepare")
    root: str = _key("", "folder holding the data set (needed by dataset=folder and dataset=prepared)")
    resize: int = _key(256, "pixels of the shorter side after resizing, before the centre crop (folder data)")
    train_size: int = _key(2000, "synthetic training images")
    val_size: int = _key(500, "synthetic validation images")
    image_size: int = _key(256, "side in pixels of the synthetic images, before cropping")
    normalize: str = _key("meanstd", "paper: raw 0-255 pixels minus the training set's mean image; mean: minus "
                                     "a per-channel mean; meanstd: (pixel / 255 - mean) / std per channel")
    random_crop: bool = _key(True, "train on random crops (translations); false trains on centre crops")
    flip: bool = _key(True, "random horizontal reflections in training")
    pca_lighting: float = _key(0.1, "std of the PCA colour-augmentation alphas; 0 turns it off")
    ten_crop: bool = _key(True, "also evaluate on ten crops (four corners, centre, and their reflections)")
    bad_images: str = _key("error", "error: an unreadable image stops the run; skip: it is left out and counted")
    num_workers: int = _key(2, "data-loading worker processes per training process; 0 loads in the process itself")
    decode: str = _key("cpu", "cpu: images decoded on the CPU; device: prepared JPEGs decoded on the GPU (nvJPEG)")
    check: str = _key("sample", "between epochs, check that the data folder did not change: sample "
                                "(check_sample files), full (every file's size and time) or off")
    check_sample: int = _key(1000, "files that check=sample looks at between epochs")


@dataclass
class TrainConfig:
    epochs: int = _key(90, "passes over the training set")
    batch_size: int = _key(128, "images per step per model-parallel pair; the global batch is dp x batch_size")
    lr_scaling: str = _key("none", "how lr follows the data-parallel replicas D: none uses lr as is for the "
                                   "global batch; linear multiplies it by D (Goyal et al.)")
    lr: float = _key(0.01, "SGD learning rate at the start")
    momentum: float = _key(0.9, "SGD momentum, in [0, 1)")
    weight_decay: float = _key(5e-4, "L2 weight decay on the weights (biases are not decayed)")
    schedule: str = _key("step", "step: lr divided by 10 at lr_milestones; plateau: divided by 10 when the "
                                 "validation loss has not improved for plateau_patience epochs")
    lr_milestones: list = _key([25, 51, 79], "epochs where schedule=step divides lr by 10, given for a run of "
                                             "milestone_epochs epochs")
    milestone_epochs: int = _key(90, "run length lr_milestones are given for; they scale to epochs proportionally")
    plateau_patience: int = _key(3, "epochs without a lower validation loss before schedule=plateau divides lr")
    seed: int = _key(0, "seed of the initial weights, the data order, the augmentation and dropout")
    max_steps: int = _key(0, "stop after this many training steps; 0: no limit")
    deterministic: bool = _key(False, "GPUs: deterministic kernels, which exact resume on GPUs rests on; "
                                      "false lets cudnn.benchmark pick the fastest")


@dataclass
class RunConfig:
    out_dir: str = _key("runs", "folder the run directories are made in")
    name: str = _key("", "run directory name under out_dir; empty: a timestamp")
    resume: str = _key("", "run directory to continue; its config.yaml is the base, overrides still apply")
    init_from: str = _key("", "single-device weights file (python -m alexnet_mp.export) to start from")
    keep_checkpoints: int = _key(2, "newest checkpoints kept; older ones are deleted")
    checkpoint_every: int = _key(0, "also checkpoint every N steps mid-epoch; 0: at epoch ends only")
    eval_only: bool = _key(False, "evaluate the weights of run.resume or run.init_from, in a run directory "
                                  "of its own, and stop")
    nonfinite: str = _key("error", "what a NaN or infinite loss or gradient does: error stops the run, "
                                   "skip skips the step")
    progress: bool = _key(True, "show a progress bar on a terminal")
    log_every: int = _key(50, "steps between records in steps.jsonl (and log lines without a terminal)")
    tensorboard: bool = _key(False, "also write TensorBoard event files (needs the tensorboard package)")


@dataclass
class DistConfig:
    device: str = _key("auto", "auto: CUDA when present, else the CPU; cpu; cuda")
    timeout_s: float = _key(120.0, "seconds any exchange or collective may wait, after the first step")
    startup_timeout_s: float = _key(600.0, "seconds for process-group start-up and the first step")
    threads: int = _key(0, "torch threads per process on CPU; 0: cores / local processes")
    dp: int = _key(0, "data-parallel replicas; 0: world size / mp (set it to have the launch checked)")
    mp: int = _key(2, "processes per model replica: 2, the paper's two columns; 1, the whole network "
                      "in each process (data parallel only)")
    flight_recorder: int = _key(2000, "collectives and crossings each rank remembers, dumped to "
                                      "RUN/flight_recorder/ when a peer is lost; 0 turns the recorder off")
    overlap: bool = _key(True, "compute each crossing layer's own half while the exchange is in flight "
                               "(the same arithmetic, less time waiting)")
    amp: str = _key("off", "off: float32; bf16: autocast to bfloat16, activations cross in bf16 "
                           "(half the bytes; results differ at bf16 precision)")
    channels_last: bool = _key(False, "NHWC convolutions and wire layout (for GPUs with tensor cores)")
    tf32: bool = _key(False, "TF32 matmuls and convolutions on Ampere and later GPUs "
                             "(faster, about 1e-3 relative error)")


@dataclass
class ProfileConfig:
    enabled: bool = _key(False, "write profile.json, a table and a timeline in the run directory")
    trace: bool = _key(False, "also write a torch.profiler trace per rank (needs enabled=true)")
    skip_steps: int = _key(2, "first steps left out of the summary (allocator and cache warm-up)")
    trace_wait: int = _key(1, "steps after skip_steps before the trace's warm-up starts")
    trace_warmup: int = _key(1, "steps the tracer runs but discards (torch.profiler warm-up)")
    trace_active: int = _key(2, "steps recorded in the trace")
    nvml_interval_s: float = _key(0.1, "seconds between GPU utilisation and power samples (NVML)")


@dataclass
class Config:
    model: ModelConfig = _section(ModelConfig, "the network; hashed into checkpoints, so a resume must match it")
    data: DataConfig = _section(DataConfig, "the images: where they come from and how they are augmented")
    train: TrainConfig = _section(TrainConfig, "the optimiser, its schedule and the length of the run")
    run: RunConfig = _section(RunConfig, "the run directory, checkpoints, resume and logging")
    dist: DistConfig = _section(DistConfig, "processes, devices and exchanges: how the network runs, "
                                            "not what it computes")
    profile: ProfileConfig = _section(ProfileConfig, "step timing, memory and GPU profiling")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The config as YAML that `build_config` reads back into an equal Config."""
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False)

    def model_hash(self) -> str:
        """Hash of everything that decides parameter shapes and meaning."""
        blob = json.dumps(dataclasses.asdict(self.model), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def validate(self) -> "Config":
        _validate(self)
        return self


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists on one line: [96, 256, 384, 384, 256]."""


_Dumper.add_representer(list, lambda dumper, value: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", value, flow_style=True))

CHOICES = {
    "model.fc8": ("split", "rank0"),
    "model.init": ("paper", "caffe", "he"),
    "model.activation": ("relu", "tanh"),
    "model.pool": ("overlap", "plain"),
    "model.columns": (2, 1),
    "data.dataset": ("synthetic", "folder", "prepared"),
    "data.normalize": ("paper", "mean", "meanstd"),
    "data.bad_images": ("error", "skip"),
    "data.decode": ("cpu", "device"),
    "data.check": ("sample", "full", "off"),
    "dist.mp": (2, 1),
    "train.schedule": ("step", "plateau"),
    "train.lr_scaling": ("none", "linear"),
    "run.nonfinite": ("error", "skip"),
    "dist.device": ("auto", "cpu", "cuda"),
    "dist.amp": ("off", "bf16"),
}


@dataclass(frozen=True)
class KeyInfo:
    """One config key, as --help lists it."""
    key: str  # dotted, e.g. "model.lrn.alpha"
    type: type  # bool, int, float, str or list (of whole numbers)
    default: object
    help: str  # one line
    choices: tuple | None  # CHOICES[key], if the key takes one of a few values


def config_keys(section: type = Config, prefix: str = "") -> list[KeyInfo]:
    """Every key of `section` (default: the whole config), depth first, in declaration order."""
    hints, defaults, out = typing.get_type_hints(section), section(), []
    for f in dataclasses.fields(section):
        key, target = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(target):
            out += config_keys(target, key + ".")
        else:
            out.append(KeyInfo(key, target, getattr(defaults, f.name), f.metadata["help"], CHOICES.get(key)))
    return out


def format_value(value) -> str:
    """A value as one `key=value` override would spell it (and as YAML reads it back)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)


POOL_KERNEL = {"overlap": 3, "plain": 2}  # model.pool: max-pooling window, stride 2 either way


def spatial_sizes(crop: int, pool: str = "overlap") -> list[int]:
    """Side of the feature maps after conv1, pool1, conv2, pool2, conv3..5, pool5."""
    k = POOL_KERNEL[pool]
    conv1 = (crop - 11) // 4 + 1
    pool1 = (conv1 - k) // 2 + 1
    pool2 = (pool1 - k) // 2 + 1  # conv2 keeps the size (5x5, pad 2)
    pool5 = (pool2 - k) // 2 + 1  # conv3..5 keep it (3x3, pad 1)
    return [conv1, pool1, pool1, pool2, pool2, pool2, pool2, pool5]


MIN_CROP = 67  # the smallest crop that survives all three poolings (15 -> 7 -> 7 -> 3 -> 3 -> 1)
MAX_CROP = 512
SYNTHETIC_MAX_SIDE = 256  # the built-in images are drawn at most this large
SEED_LIMIT = 2 ** 48  # |train.seed| below this keeps the derived torch seeds inside 64 bits
MAX_TIMEOUT_S = 365 * 86400.0  # a year; larger values overflow datetime.timedelta in places
MAX_NVML_INTERVAL_S = 3600.0

# ---------------------------------------------------------------- validation

_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text",
          list: "a list of whole numbers like [1, 2]"}
_suggesting = contextvars.ContextVar("suggesting", default=False)  # set while fixes are being tried


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_kind(value, target: type) -> bool:
    if target is bool:
        return isinstance(value, bool)
    if target is int:
        return _is_int(value)
    if target is float:
        return _is_int(value) or isinstance(value, float)
    if target is list:
        return isinstance(value, list) and all(_is_int(v) for v in value)
    return isinstance(value, target)


def _resolve(obj, path: list[str]):
    for part in path:
        obj = getattr(obj, part)
    return obj


def _fixes(cfg: Config, candidates: tuple[dict, ...]) -> str:
    """'; set a=1, or set b=2 and c=3' for those candidate settings that make `cfg` valid."""
    if _suggesting.get():  # already trying a fix: say nothing rather than try fixes of fixes
        return ""
    token, good = _suggesting.set(True), []
    try:
        for settings in candidates:
            trial = copy.deepcopy(cfg)
            for key, value in settings.items():
                *path, name = key.split(".")
                setattr(_resolve(trial, path), name, value)
            try:
                _validate(trial)
            except ConfigError:
                continue
            good.append(" and ".join(f"{k}={format_value(v)}" for k, v in settings.items()))
    finally:
        _suggesting.reset(token)
    return "".join(("; set " if i == 0 else ", or set ") + s for i, s in enumerate(good))


class _Checks:
    """need(ok, key, message, *fixes): a one-line ConfigError unless ok, offering the fixes that work."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def need(self, ok: bool, key: str, message: str, *fixes: dict) -> None:
        if not ok:
            raise ConfigError(f"{key}: {message}{_fixes(self.cfg, fixes)}")

    def at_least(self, key: str, low: int, note: str = "") -> None:
        value = _resolve(self.cfg, key.split("."))
        self.need(value >= low, key, f"must be at least {low}{note}, got {value}")


def _check_kinds(c: _Checks, obj, prefix: str = "") -> None:
    """Every value has its field's type, and every float is finite."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key, value, target = prefix + f.name, getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(target):
            c.need(isinstance(value, target), key, f"expected a section of keys, got {value!r}")
            _check_kinds(c, value, key + ".")
            continue
        c.need(_is_kind(value, target), key, f"expected {_KINDS[target]}, got {value!r}")
        if target is float:
            c.need(math.isfinite(value), key, f"must be a finite number, got {value}")


def _check_model(c: _Checks) -> None:
    m = c.cfg.model
    c.at_least("model.num_classes", 2)
    c.need(len(m.conv_widths) == 5, "model.conv_widths", f"give five widths, conv1..conv5, got "
           f"{len(m.conv_widths)}", {"model.conv_widths": ModelConfig().conv_widths})
    evened = [max(2, w + w % 2) for w in m.conv_widths]
    for i, w in enumerate(m.conv_widths):
        c.need(w > 0 and w % 2 == 0, "model.conv_widths",
               f"conv{i + 1} width {w} must be a positive even number (half per column)",
               {"model.conv_widths": evened})
    c.need(m.fc_width > 0 and m.fc_width % 2 == 0, "model.fc_width",
           f"{m.fc_width} must be a positive even number (half per column)",
           {"model.fc_width": max(2, m.fc_width + m.fc_width % 2)})
    c.need(m.crop_size >= MIN_CROP, "model.crop_size", f"{m.crop_size} is too small: the network needs "
           f"at least {MIN_CROP} px to survive three poolings", {"model.crop_size": MIN_CROP})
    c.need(m.crop_size <= MAX_CROP, "model.crop_size", f"{m.crop_size} is larger than {MAX_CROP}")
    c.at_least("model.lrn.size", 1)
    c.need(m.lrn.alpha >= 0, "model.lrn.alpha", f"must be non-negative, got {m.lrn.alpha}")
    c.need(m.lrn.beta >= 0, "model.lrn.beta", f"must be non-negative, got {m.lrn.beta}")
    c.need(m.lrn.k > 0, "model.lrn.k", f"must be positive, got {m.lrn.k}")
    c.need(0.0 <= m.dropout < 1.0, "model.dropout", f"{m.dropout} must be in [0, 1)")
    c.need(m.init_std > 0, "model.init_std", f"must be positive, got {m.init_std}")
    c.need(m.columns == 2 or c.cfg.dist.mp == 1, "model.columns",
           "1 (the one-column network) runs on one process per replica",
           {"dist.mp": 1}, {"model.columns": 2})


def _check_data(c: _Checks) -> None:
    d, crop = c.cfg.data, c.cfg.model.crop_size
    what = {"folder": "a folder holding train/ and val/", "prepared": "the folder alexnet_mp.prepare wrote"}
    c.need(d.dataset not in what or bool(d.root), "data.root",
           f"data.dataset={d.dataset} needs data.root ({what.get(d.dataset)})", {"data.root": "PATH"})
    c.need(d.dataset != "synthetic" or crop <= d.image_size <= SYNTHETIC_MAX_SIDE, "data.image_size",
           f"{d.image_size} must lie between model.crop_size={crop} and {SYNTHETIC_MAX_SIDE}",
           {"data.image_size": min(max(d.image_size, crop), SYNTHETIC_MAX_SIDE)}, {"model.crop_size": d.image_size})
    c.need(d.resize >= crop, "data.resize", f"{d.resize} is smaller than model.crop_size={crop}",
           {"data.resize": crop}, {"model.crop_size": d.resize})
    c.at_least("data.train_size", 1, " image")
    c.at_least("data.val_size", 1, " image")
    c.need(d.pca_lighting >= 0, "data.pca_lighting", f"must be non-negative (0 turns it off), got {d.pca_lighting}")
    c.at_least("data.num_workers", 0)
    c.need(d.decode != "device" or d.dataset == "prepared", "data.decode",
           f"decode=device reads prepared JPEGs, not data.dataset={d.dataset}",
           {"data.decode": "cpu"}, {"data.dataset": "prepared"})
    c.need(d.decode != "device" or c.cfg.dist.device != "cpu", "data.decode",
           "decode=device decodes on the GPU, but dist.device=cpu", {"data.decode": "cpu"}, {"dist.device": "auto"})
    c.at_least("data.check_sample", 1)


def _check_train(c: _Checks) -> None:
    t = c.cfg.train
    for key in ("epochs", "batch_size", "milestone_epochs", "plateau_patience"):
        c.at_least(f"train.{key}", 1)
    c.need(t.lr > 0, "train.lr", f"must be positive, got {t.lr}")
    c.need(0 <= t.momentum < 1, "train.momentum", f"{t.momentum} must be in [0, 1)")
    c.need(t.weight_decay >= 0, "train.weight_decay", f"must be non-negative, got {t.weight_decay}")
    fixed = sorted({e for e in t.lr_milestones if e > 0})
    c.need(all(e > 0 for e in t.lr_milestones), "train.lr_milestones",
           f"must be positive whole epochs, got {format_value(t.lr_milestones)}", {"train.lr_milestones": fixed})
    c.need(list(t.lr_milestones) == sorted(t.lr_milestones), "train.lr_milestones",
           f"must be increasing, got {format_value(t.lr_milestones)}", {"train.lr_milestones": fixed})
    c.need(-SEED_LIMIT < t.seed < SEED_LIMIT, "train.seed",
           f"{t.seed} is out of range; use a whole number between -2**48 and 2**48")
    c.at_least("train.max_steps", 0, " (0: no limit)")


def _check_run(c: _Checks) -> None:
    r = c.cfg.run
    path = Path(r.out_dir, r.name)
    c.need("/" not in r.name and r.name not in (".", ".."), "run.name",
           f"{r.name!r} is a path, not a folder name; give the parent folder as run.out_dir",
           {"run.out_dir": str(path.parent), "run.name": path.name})
    c.at_least("run.keep_checkpoints", 1)
    c.at_least("run.checkpoint_every", 0, " (0: at epoch ends only)")
    c.at_least("run.log_every", 1)
    c.need(not r.eval_only or bool(r.resume or r.init_from), "run.eval_only",
           "evaluation needs weights to evaluate", {"run.resume": "RUN_DIR"}, {"run.init_from": "FILE"})


def _check_dist(c: _Checks) -> None:
    s = c.cfg.dist
    for key in ("timeout_s", "startup_timeout_s"):
        value = getattr(s, key)
        c.need(0 < value <= MAX_TIMEOUT_S, f"dist.{key}",
               f"{value} must be positive and at most {MAX_TIMEOUT_S:.0f} (a year)")
    c.at_least("dist.threads", 0, " (0: cores / local processes)")
    c.at_least("dist.dp", 0, " (0: world size / dist.mp)")
    c.at_least("dist.flight_recorder", 0, " (0 turns it off)")


def _check_profile(c: _Checks) -> None:
    p = c.cfg.profile
    c.need(p.enabled or not p.trace, "profile.trace", "the trace is written by the profiler, which is off",
           {"profile.enabled": True}, {"profile.trace": False})
    for key in ("skip_steps", "trace_wait", "trace_warmup"):
        c.at_least(f"profile.{key}", 0)
    c.at_least("profile.trace_active", 1)
    c.need(0 < p.nvml_interval_s <= MAX_NVML_INTERVAL_S, "profile.nvml_interval_s",
           f"{p.nvml_interval_s} must be positive and at most {MAX_NVML_INTERVAL_S:.0f}")


def _validate(cfg: Config) -> None:
    c = _Checks(cfg)
    _check_kinds(c, cfg)
    for key, allowed in CHOICES.items():
        value = _resolve(cfg, key.split("."))
        c.need(value in allowed, key, f"{value!r} is not one of {', '.join(map(str, allowed))}")
    for check in (_check_model, _check_data, _check_train, _check_run, _check_dist, _check_profile):
        check(c)


# ---------------------------------------------------------------- loading

# Scalars a text key takes literally: plain YAML types, never a tag the safe loader would refuse.
_LITERAL_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "timestamp")}


def _coerce(value, target, key: str):
    """Check (and gently convert) one value against a dataclass field's type."""
    if target is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" as text
        try:
            value = float(value)
        except ValueError:
            pass
    if target is float and _is_int(value):
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{key}: {value} is too large for a number") from None
    if target is list and isinstance(value, (list, tuple)):
        value = list(value)  # a copy: the config must not share a list with the dict it came from
    if target is str:
        if value is None:
            return ""
        if isinstance(value, bool):  # a file's `name: true`; YAML has already lost the spelling
            return format_value(value)
        if isinstance(value, (int, float, datetime.date)):
            return str(value)
    if not _is_kind(value, target):
        raise ConfigError(f"{key}: expected {_KINDS[target]}, got {value!r}")
    return value


def _field_type(parts: list[str]):
    """The type of the dotted key `parts`: a field type, a section class, or None if unknown."""
    target = Config
    for part in parts:
        if not dataclasses.is_dataclass(target):
            return None
        target = typing.get_type_hints(target).get(part)
    return target


def _merge(obj, updates: dict, prefix: str) -> None:
    if not isinstance(updates, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in hints:
            known = ", ".join(f"{prefix}{n}" for n in hints)
            raise ConfigError(f"unknown key {key!r}; known keys here: {known}")
        target = hints[name]
        if dataclasses.is_dataclass(target):
            _merge(getattr(obj, name), value, key + ".")
        else:
            setattr(obj, name, _coerce(value, target, key))


def _read_override(key: str, raw: str):
    """A value typed on the command line: literal text for text keys, else read as YAML.

    Whole numbers and numbers are read the Python way first, so that 017 is 17, not YAML 1.1's octal 15.
    """
    target = _field_type(key.split("."))
    if target is str:
        return raw
    if target in (int, float):
        try:
            return int(raw) if target is int else float(raw)
        except ValueError:
            pass
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot read value {raw!r}: {_yaml_problem(e)}") from None


def parse_overrides(items: list[str]) -> dict:
    """Turn ``a.b=1`` strings into a nested dict; text keys keep the text after ``=`` verbatim."""
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (for example train.epochs=10)")
        key, raw = item.split("=", 1)
        key = key.strip()
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part} is a value, not a section")
        node[parts[-1]] = _read_override(key, raw)
    return tree


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line: what YAML found wrong, and where."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def _construct(loader: yaml.SafeLoader, node: yaml.Node, section) -> object:
    """Python values of a composed YAML node; scalars under text keys keep their literal text."""
    if not (isinstance(node, yaml.MappingNode) and dataclasses.is_dataclass(section)):
        return loader.construct_object(node, deep=True)
    loader.flatten_mapping(node)  # merge keys (<<: *anchor)
    hints, out = typing.get_type_hints(section), {}
    for key_node, value_node in node.value:
        name = loader.construct_object(key_node, deep=True)
        if not isinstance(name, str):
            raise ConfigError(f"config key {name!r} is not a name; keys are words like train or lr")
        target = hints.get(name)
        if target is str and isinstance(value_node, yaml.ScalarNode) and value_node.tag in _LITERAL_TAGS:
            out[name] = value_node.value
        else:
            out[name] = _construct(loader, value_node, target)
    return out


def read_yaml(text: str):
    """A config file's text as nested dicts, text keys keeping the text as written (`name: 0123`)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        return {} if node is None else _construct(loader, node, Config)
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config configs/<name>.yaml")
    try:
        data = read_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from None
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    return data if data is not None else {}


def build_config(path: str | Path | None = None, overrides: list[str] | tuple = (),
                 base: dict | None = None) -> Config:
    """Defaults, then `base` (a dict), then the YAML file, then overrides; validated."""
    cfg = Config()
    if base:
        _merge(cfg, base, "")
    if path:
        _merge(cfg, load_yaml(path), "")
    _merge(cfg, parse_overrides(list(overrides)), "")
    return cfg.validate()


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    _merge(cfg, data, "")
    return cfg.validate()
