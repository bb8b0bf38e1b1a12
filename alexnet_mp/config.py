"""Configuration: typed dataclasses, YAML files, dotted ``key=value`` overrides.

Every value is checked here, before any process group starts, so that a typo
costs a second and not a lost run. Errors name the dotted key and the fix.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, mistyped or out of range."""


@dataclass
class LRNConfig:
    # torch.nn.LocalResponseNorm's convention (alpha is divided by size), which
    # is what the original cuda-convnet code computed; the paper's formula taken
    # literally would be alpha=5e-4 here.
    enabled: bool = True  # after the ReLUs of conv1 and conv2; false leaves it out
    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 2.0


@dataclass
class ModelConfig:
    num_classes: int = 1000
    crop_size: int = 227
    # Output maps of conv1..conv5 summed over both columns; each column holds half.
    conv_widths: list = field(default_factory=lambda: [96, 256, 384, 384, 256])
    fc_width: int = 4096  # fc6 and fc7 units over both columns
    lrn: LRNConfig = field(default_factory=LRNConfig)
    activation: str = "relu"  # or "tanh" (the paper's comparison, section 3.1)
    pool: str = "overlap"  # max-pool 3/2 (overlapping, the paper's) or "plain" 2/2
    # 2: the paper's two-column network; 1: its one-GPU comparison network (half the kernels
    # of conv1-conv4, conv5 and the fc layers as wide as the two columns together), one process.
    columns: int = 2
    dropout: float = 0.5
    # "split": each column computes half the classes (balanced);
    # "rank0": column 0 computes all of fc8, as the original code did on GPU 0.
    fc8: str = "split"
    # "paper": N(0, init_std) weights, biases 1 in conv2/4/5 and fc6/7 (the paper's text);
    # "caffe": biases 0.1 there and fc6/fc7 weights N(0, init_std / 2) (Caffe's bvlc_alexnet);
    # "he": He-normal weights, zero biases (learns quickly in narrow, short runs).
    init: str = "paper"
    init_std: float = 0.01


@dataclass
class DataConfig:
    # "synthetic": built-in generated data set, no files; "folder": ROOT/train, ROOT/val;
    # "prepared": a set written by python -m alexnet_mp.prepare.
    dataset: str = "synthetic"
    root: str = ""
    resize: int = 256  # shorter side before the centre crop (folder data)
    train_size: int = 2000  # synthetic images per split
    val_size: int = 500
    image_size: int = 256  # synthetic image side before cropping
    # "paper": raw 0-255 pixels minus the training set's mean image (the original code, Caffe);
    # "mean": minus a per-channel mean; "meanstd": (pixel / 255 - mean) / std per channel.
    normalize: str = "meanstd"
    random_crop: bool = True  # translations; false trains on centre crops
    flip: bool = True
    pca_lighting: float = 0.1  # std of the PCA colour alphas; 0 turns it off
    ten_crop: bool = True  # ten-crop evaluation in addition to the centre crop
    bad_images: str = "error"  # or "skip" (skipped files are counted and reported)
    num_workers: int = 2
    decode: str = "cpu"  # "device": prepared JPEGs decoded on the GPU (nvJPEG)
    # Between epochs, check that the folder did not change: "sample" (check_sample files),
    # "full" (every file's size and time) or "off".
    check: str = "sample"
    check_sample: int = 1000


@dataclass
class TrainConfig:
    epochs: int = 90
    batch_size: int = 128  # per model-parallel pair; the global batch is dp x batch_size
    # How lr follows the number of data-parallel replicas D: "none" uses lr as is
    # for the global batch (a step then equals the reference's step on that batch);
    # "linear" multiplies it by D (Goyal et al.'s linear scaling rule).
    lr_scaling: str = "none"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # "step": divide by 10 at lr_milestones, given for a run of milestone_epochs
    # epochs and scaled proportionally to `epochs`; "plateau": divide by 10 when
    # validation loss has not improved for `plateau_patience` epochs.
    schedule: str = "step"
    lr_milestones: list = field(default_factory=lambda: [25, 51, 79])
    milestone_epochs: int = 90
    plateau_patience: int = 3
    seed: int = 0
    max_steps: int = 0  # stop after this many training steps (0: no limit)
    # GPUs: deterministic kernels (cudnn.deterministic, use_deterministic_algorithms); what exact
    # resume on GPUs rests on. False lets cudnn.benchmark pick the fastest kernels.
    deterministic: bool = False


@dataclass
class RunConfig:
    out_dir: str = "runs"
    name: str = ""  # run directory name; empty: a timestamp
    resume: str = ""  # run directory to continue
    init_from: str = ""  # single-device file written by alexnet_mp.export
    keep_checkpoints: int = 2
    checkpoint_every: int = 0  # also checkpoint every N steps mid-epoch (0: at epoch ends only)
    eval_only: bool = False
    nonfinite: str = "error"  # or "skip": what a NaN/inf loss or gradient does
    progress: bool = True
    log_every: int = 50  # steps between records in steps.jsonl (and log lines without a terminal)
    tensorboard: bool = False  # also write TensorBoard event files (needs the tensorboard package)


@dataclass
class DistConfig:
    device: str = "auto"  # "auto" (CUDA when present), "cpu" or "cuda"
    timeout_s: float = 120.0  # any exchange or collective after the first step
    startup_timeout_s: float = 600.0  # process-group start-up and the first step
    threads: int = 0  # torch threads per process on CPU; 0: cores / local processes
    dp: int = 0  # data-parallel replicas; 0: world size / mp. Set it to have the launch checked
    # Processes per model replica: 2, the paper's two columns; 1, the whole network in each
    # process (the single-device reference, or model.columns=1), data parallel only.
    mp: int = 2
    # Collectives and crossings each rank remembers, dumped to RUN/flight_recorder/ when a peer is
    # lost (read with torchfrtrace); 0 turns the recorder off.
    flight_recorder: int = 2000
    # How the columns run, not what they compute (so not in the model hash).
    # overlap: compute each crossing layer's own half while the exchange is in
    # flight (alexnet_mp/overlap.py). On by default: the same arithmetic as the
    # plain path, less time held up in exchanges in most `make bench` runs, and
    # the design that hides transfers on GPUs (README, "Benchmarks").
    overlap: bool = True
    # "bf16": autocast to bfloat16; activations cross in bf16 (half the bytes).
    # For GPUs, and CPUs with bf16 matrix units; results then differ at bf16 precision.
    amp: str = "off"
    channels_last: bool = False  # NHWC convolutions and wire layout; for GPUs with tensor cores
    tf32: bool = False  # TF32 matmuls and convolutions on Ampere and later GPUs (faster, ~1e-3 relative error)


@dataclass
class ProfileConfig:
    enabled: bool = False  # profile.json, a table and a timeline in the run directory (alexnet_mp/profiler.py)
    trace: bool = False  # also write a torch.profiler trace per rank
    skip_steps: int = 2  # first steps left out of the summary (allocator and cache warm-up)
    trace_wait: int = 1
    trace_warmup: int = 1
    trace_active: int = 2
    nvml_interval_s: float = 0.1


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model_hash(self) -> str:
        """Hash of everything that decides parameter shapes and meaning."""
        blob = json.dumps(dataclasses.asdict(self.model), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def validate(self) -> "Config":
        _validate(self)
        return self


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


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


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


def _validate(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _check(value in allowed, key, f"{value!r} is not one of {', '.join(map(str, allowed))}")
    m = cfg.model
    _check(m.num_classes >= 2, "model.num_classes", "needs at least 2 classes")
    _check(len(m.conv_widths) == 5, "model.conv_widths", "give five widths, conv1..conv5")
    for i, w in enumerate(m.conv_widths):
        _check(isinstance(w, int) and w > 0 and w % 2 == 0, "model.conv_widths",
               f"conv{i + 1} width {w} must be a positive even number (half per column)")
    _check(m.fc_width > 0 and m.fc_width % 2 == 0, "model.fc_width",
           f"{m.fc_width} must be a positive even number (half per column)")
    _check(m.crop_size >= MIN_CROP, "model.crop_size",
           f"{m.crop_size} is too small: the network needs at least {MIN_CROP} px to survive three poolings")
    _check(m.crop_size <= 512, "model.crop_size", f"{m.crop_size} is larger than 512")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", f"{m.dropout} must be in [0, 1)")
    _check(m.lrn.size >= 1, "model.lrn.size", "must be at least 1")
    _check(m.lrn.k > 0 and m.lrn.alpha >= 0 and m.lrn.beta >= 0, "model.lrn",
           "k must be positive and alpha, beta non-negative")
    _check(m.init_std > 0, "model.init_std", "must be positive")
    _check(m.columns == 2 or cfg.dist.mp == 1, "model.columns",
           "model.columns=1 (the one-column network) runs on one process per replica; set dist.mp=1")
    d = cfg.data
    _check(d.dataset != "folder" or bool(d.root), "data.root",
           "data.dataset=folder needs data.root=PATH (a folder holding train/ and val/)")
    _check(d.resize >= m.crop_size, "data.resize",
           f"{d.resize} is smaller than model.crop_size={m.crop_size}; raise data.resize or lower the crop")
    _check(m.crop_size <= d.image_size <= 256 or d.dataset != "synthetic", "data.image_size",
           f"{d.image_size} must lie between model.crop_size={m.crop_size} and 256")
    _check(d.train_size > 0 and d.val_size > 0, "data.train_size", "synthetic splits need at least one image")
    _check(d.pca_lighting >= 0, "data.pca_lighting", "must be non-negative")
    _check(d.num_workers >= 0, "data.num_workers", "must be non-negative")
    t = cfg.train
    _check(t.epochs >= 1, "train.epochs", "must be at least 1")
    _check(t.batch_size >= 1, "train.batch_size", "must be at least 1")
    _check(t.lr > 0, "train.lr", "must be positive")
    _check(0 <= t.momentum < 1, "train.momentum", "must be in [0, 1)")
    _check(t.weight_decay >= 0, "train.weight_decay", "must be non-negative")
    _check(all(isinstance(e, int) and 0 < e for e in t.lr_milestones), "train.lr_milestones",
           "must be positive whole epochs")
    _check(list(t.lr_milestones) == sorted(t.lr_milestones), "train.lr_milestones", "must be increasing")
    _check(t.milestone_epochs >= 1, "train.milestone_epochs", "must be at least 1")
    _check(t.plateau_patience >= 1, "train.plateau_patience", "must be at least 1")
    _check(t.max_steps >= 0, "train.max_steps", "must be non-negative")
    _check(cfg.run.checkpoint_every >= 0, "run.checkpoint_every", "must be non-negative")
    _check(cfg.run.keep_checkpoints >= 1, "run.keep_checkpoints", "must be at least 1")
    _check(cfg.dist.timeout_s > 0 and cfg.dist.startup_timeout_s > 0, "dist.timeout_s", "timeouts must be positive")
    _check(cfg.dist.threads >= 0, "dist.threads", "must be non-negative")
    _check(cfg.dist.dp >= 0, "dist.dp", "must be non-negative (0: world size / 2)")
    _check(cfg.dist.flight_recorder >= 0, "dist.flight_recorder", "must be non-negative (0 turns it off)")
    p = cfg.profile
    _check(p.skip_steps >= 0, "profile.skip_steps", "must be non-negative")
    _check(p.trace_wait >= 0 and p.trace_warmup >= 0 and p.trace_active >= 1, "profile.trace_active",
           "trace window needs wait>=0, warmup>=0, active>=1")
    _check(p.nvml_interval_s > 0, "profile.nvml_interval_s", "must be positive")


# ---------------------------------------------------------------- loading


def _coerce(value, target, key: str):
    """Check (and gently convert) one value against a dataclass field's type."""
    if target is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if target is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected a whole number, got {value!r}")
    if target is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if target is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        raise ConfigError(f"{key}: expected text, got {value!r}")
    if target is list:
        if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
        raise ConfigError(f"{key}: expected a list of whole numbers like [1, 2], got {value!r}")
    raise TypeError(f"unsupported config type {target} for {key}")


def _merge(obj, updates: dict, prefix: str) -> None:
    if not isinstance(updates, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {updates!r}")
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


def parse_overrides(items: list[str]) -> dict:
    """Turn ``a.b=1`` strings into a nested dict; values are read as YAML."""
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (for example train.epochs=10)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot read value {raw!r}: {e}") from None
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part} is a value, not a section")
        node[parts[-1]] = value
    return tree


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config configs/<name>.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return data or {}


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
