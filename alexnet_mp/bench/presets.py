"""The benchmark's presets: which network, which batches, how many steps and repeats, which caps."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import SYNTHETIC_MAX_SIDE, build_config

SMALL_WIDTHS = ["model.conv_widths=[8,16,24,24,16]", "model.fc_width=32"]


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    overrides: tuple  # model.* (and other) config keys on top of the defaults
    batches: tuple  # images per step per model-parallel pair (the global batch of every mode)
    warmup: int  # untimed steps before each measurement
    steps: int  # timed steps per measurement
    min_repeats: int
    max_repeats: int
    cap_s: float  # the repeats stop when the next one would end past this many seconds
    gpu: bool = False
    amp: str = "off"  # dist.amp of every mode (bf16 rows are added on CPUs with bf16 matrix units)
    channels_last: bool = False
    peak: dict = field(default_factory=dict)  # sizes of the peak kernels (flops.peak_rates)
    peak_s: float = 0.5  # seconds per peak kernel
    # the loader section: images, rounds, crop, batch, prepare's processes (0: every core); loader.measure_loader
    loader: dict = field(default_factory=dict)
    profiled_batches: int = 1  # the profiler-overhead mode runs at this many of the smallest batches
    calibration_s: float = 5.0  # seconds of the calibration rate (median of bursts), before and after


QUICK = Preset(
    name="quick",
    description=("Quick (a 2-core CPU): the paper's widths and classes (96-256-384-384-256 maps, 4096-unit "
                 "fc6/fc7, 1000 classes) on 131 px crops instead of 227 (maps 31-15-7-3 instead of 55-27-13-6, "
                 "about a third of the paper's work per image), so that every mode at batches 32 and 128 is "
                 "measured several times in about 10 minutes."),
    overrides=("model.crop_size=131",),
    batches=(32, 128), warmup=1, steps=2, min_repeats=4, max_repeats=12, cap_s=480.0,
    peak={"mm": 1024, "conv": (32, 192, 192, 15)}, peak_s=0.4,
    loader={"train_per_class": 60, "classes": 10, "val_per_class": 2, "rounds": 3, "pair_batch": 32, "crop": 227},
)

TINY = Preset(
    name="tiny",
    description="Tiny: a toy network for the tests; the numbers mean nothing.",
    overrides=("model.num_classes=5", "model.crop_size=67", *SMALL_WIDTHS),
    batches=(4, 8), warmup=1, steps=1, min_repeats=2, max_repeats=2, cap_s=60.0,
    peak={"mm": 64, "conv": (2, 8, 8, 9)}, peak_s=0.02,
    loader={"train_per_class": 6, "classes": 2, "val_per_class": 1, "rounds": 2, "pair_batch": 4, "crop": 67,
            "workers": 1},
    calibration_s=0.2,
)

GPU = Preset(
    name="gpu",
    description=("GPU: the paper's network (227 px crops, 96-256-384-384-256 maps, 4096-unit fc6/fc7, 1000 "
                 "classes) in bf16 with channels_last and cudnn.benchmark, timed with CUDA events over 50 steps "
                 "after 20 warm-up steps, no synchronisation inside the timed steps."),
    overrides=(), batches=(128, 256, 512, 1024), warmup=20, steps=50, min_repeats=3, max_repeats=6, cap_s=600.0,
    gpu=True, amp="bf16", channels_last=True, peak={"mm": 8192}, peak_s=1.0, profiled_batches=0,
)

PRESETS = {p.name: p for p in (QUICK, TINY, GPU)}


def bench_config(preset: Preset, overrides=(), device: str = "cpu"):
    """The base config of every mode: the preset's network, the built-in data with enough images for
    two batches of the largest size, no loader workers, patient timeouts, non-finite steps skipped."""
    cfg = build_config(overrides=[*preset.overrides, *overrides])
    crop, biggest = cfg.model.crop_size, max(preset.batches)
    return build_config(overrides=[
        *preset.overrides, f"data.train_size={2 * biggest}", "data.val_size=1",
        f"data.image_size={min(SYNTHETIC_MAX_SIDE, crop + 32)}", "data.num_workers=0", "data.check=off",
        "dist.timeout_s=900", "dist.startup_timeout_s=900", "run.nonfinite=skip", "run.progress=false",
        f"dist.device={device}", f"dist.amp={preset.amp}", f"dist.channels_last={str(preset.channels_last).lower()}",
        *overrides])
