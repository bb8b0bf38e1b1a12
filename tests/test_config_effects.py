"""Every config key does something: changing it changes what the code builds or does.

Each key either has a probe here (build what the key feeds, once with the default and once with
another value, and compare what comes out) or names the tests that exercise its effect end to end;
a key with neither fails the completeness test, so a new key cannot be added without a test.
"""
import importlib

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet_mp import rundir
from alexnet_mp.config import build_config, config_keys
from alexnet_mp.data import Loaders, Normalizer, build_data, dataset_fingerprint
from alexnet_mp.distributed import choose_device, configure_backends
from alexnet_mp.model import AlexNetColumn
from alexnet_mp.parallel_dims import ParallelDims
from alexnet_mp.flight_recorder import debug_env
from alexnet_mp.schedule import LRSchedule
from alexnet_mp.trainer.optim import build_optimizer, lr_factor
from alexnet_mp.weights import build_reference
from harness import SMALL_MODEL

BASE = [*SMALL_MODEL, "data.image_size=72", "data.resize=72", "data.train_size=16", "data.val_size=8",
        "train.batch_size=4", "data.num_workers=0", "train.epochs=9"]


def cfg_with(*overrides):
    return build_config(overrides=[*BASE, *overrides])


# ---------------------------------------------------------------- probes


def logits(cfg, training=False):
    model = build_reference(cfg.model, cfg.train.seed)
    model.set_dropout_generator(torch.Generator().manual_seed(1))
    model.train(training)
    x = torch.randn(2, 3, cfg.model.crop_size, cfg.model.crop_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(x)


def first_batch(cfg):
    loaders = Loaders(build_data(cfg), cfg)
    try:
        return next(iter(loaders.train(0)))
    finally:
        loaders.close()


def normalised(cfg):
    bundle = build_data(cfg)
    b = first_batch(cfg)
    return Normalizer(bundle.stats, cfg.data.normalize, bundle.side, cfg.model.crop_size)(
        b.images, b.offsets, b.flips, b.light)


def schedule_lrs(cfg, losses=(1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)):
    sched, out = LRSchedule(cfg.train), []
    for epoch, loss in enumerate(losses):
        out.append(sched.lr(epoch))
        sched.observe(loss)
    return out


def optimiser_groups(cfg):
    opt = build_optimizer(build_reference(cfg.model, 0), cfg.train)
    return [(g["lr"], g["momentum"], g["weight_decay"]) for g in opt.param_groups]


def backend_flags(cfg):
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cuda.matmul.allow_tf32,
              torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        configure_backends(cfg.train.deterministic, cfg.dist.tf32)
        return (torch.are_deterministic_algorithms_enabled(), torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.benchmark)
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[1], before[2]
        torch.backends.cudnn.benchmark = before[3]


def outcome(fn, cfg):
    try:
        return ("ok", fn(cfg))
    except Exception as e:  # the probe's answer is which error, if any
        return ("error", type(e).__name__)


def image_folder(root, classes, per_class=3, corrupt=False):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (90, 80, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    if corrupt:
        (root / "train" / classes[0] / "bad.png").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("folders")
    return {"a": image_folder(base / "a", ["cat", "dog", "emu", "fox", "gnu"]),
            "b": image_folder(base / "b", ["ant", "bee", "cod", "doe", "elk"]),
            "bad": image_folder(base / "bad", ["ant", "bee", "cod", "doe", "elk"], corrupt=True)}


FOLDER = ["data.dataset=folder", "model.num_classes=5"]

# key: (the other value's overrides, the probe). Probes return something comparable.
PROBES = {
    "model.num_classes": (["model.num_classes=7"], logits),
    "model.crop_size": (["model.crop_size=71"], lambda cfg: (first_batch(cfg).images.shape, logits(cfg).shape)),
    "model.conv_widths": (["model.conv_widths=[8,16,24,24,32]"], logits),
    "model.fc_width": (["model.fc_width=48"], logits),
    "model.lrn.enabled": (["model.lrn.enabled=false"], logits),
    "model.lrn.size": (["model.lrn.size=3"], logits),
    "model.lrn.alpha": (["model.lrn.alpha=0.01"], logits),
    "model.lrn.beta": (["model.lrn.beta=0.5"], logits),
    "model.lrn.k": (["model.lrn.k=1.0"], logits),
    "model.activation": (["model.activation=tanh"], logits),
    "model.pool": (["model.pool=plain"], logits),
    "model.columns": (["model.columns=1", "dist.mp=1"], logits),
    "model.dropout": (["model.dropout=0.2"], lambda cfg: logits(cfg, training=True)),
    "model.fc8": (["model.fc8=rank0"], lambda cfg: hasattr(AlexNetColumn(cfg.model, 1, None), "fc8")),
    "model.init": (["model.init=caffe"], logits),
    "model.init_std": (["model.init=paper", "model.init_std=0.02"], logits),
    "data.train_size": (["data.train_size=20"], lambda cfg: len(build_data(cfg).train)),
    "data.val_size": (["data.val_size=12"], lambda cfg: len(build_data(cfg).val)),
    "data.image_size": (["data.image_size=80"], lambda cfg: build_data(cfg).side),
    "data.normalize": (["data.normalize=paper"], normalised),
    "data.random_crop": (["data.random_crop=false"], lambda cfg: first_batch(cfg).offsets),
    "data.flip": (["data.flip=false"], lambda cfg: first_batch(cfg).flips),
    "data.pca_lighting": (["data.pca_lighting=0.5"], lambda cfg: first_batch(cfg).light),
    "data.num_workers": (["data.num_workers=1"], lambda cfg: len(_worker_pids(cfg))),
    "train.epochs": (["train.epochs=18"], schedule_lrs),
    "train.batch_size": (["train.batch_size=8"], lambda cfg: len(first_batch(cfg).labels)),
    "train.lr_scaling": (["train.lr_scaling=linear"], lambda cfg: lr_factor(cfg.train, 4)),
    "train.lr": (["train.lr=0.02"], schedule_lrs),
    "train.momentum": (["train.momentum=0.5"], optimiser_groups),
    "train.weight_decay": (["train.weight_decay=0.001"], optimiser_groups),
    "train.schedule": (["train.schedule=plateau"], schedule_lrs),
    "train.lr_milestones": (["train.lr_milestones=[10,60]"], schedule_lrs),
    "train.milestone_epochs": (["train.milestone_epochs=45"], schedule_lrs),
    "train.plateau_patience": (["train.schedule=plateau", "train.plateau_patience=2"], schedule_lrs),
    "train.seed": (["train.seed=3"], lambda cfg: (logits(cfg), first_batch(cfg).labels)),
    "train.deterministic": (["train.deterministic=true"], backend_flags),
    "dist.tf32": (["dist.tf32=true"], backend_flags),
    "run.out_dir": (["run.out_dir=elsewhere"], lambda cfg: rundir.plan_new(cfg)),
    "run.name": (["run.name=named"], lambda cfg: rundir.plan_new(cfg).name),
    "dist.device": (["dist.device=cuda"], lambda cfg: outcome(lambda c: choose_device(c.dist, 0), cfg)),
    "dist.dp": (["dist.dp=2"], lambda cfg: outcome(lambda c: ParallelDims(2).check_replicas(c.dist.dp), cfg)),
    "dist.mp": (["dist.mp=1"], lambda cfg: ParallelDims(2, cfg.dist.mp).dp),
    "dist.flight_recorder": (["dist.flight_recorder=10"], lambda cfg: debug_env("gloo", cfg.dist.flight_recorder)),
}
# Keys whose probe needs an image folder: (the default run's overrides, the other's).
FOLDER_PROBES = {
    "data.dataset": ([], [*FOLDER, "data.root={a}"], lambda cfg: build_data(cfg).classes),
    "data.root": ([*FOLDER, "data.root={a}"], [*FOLDER, "data.root={b}"], lambda cfg: build_data(cfg).classes),
    "data.resize": ([*FOLDER, "data.root={a}"], [*FOLDER, "data.root={a}", "data.resize=80"],
                    lambda cfg: build_data(cfg).side),
    "data.bad_images": ([*FOLDER, "data.root={bad}"], [*FOLDER, "data.root={bad}", "data.bad_images=skip"],
                        lambda cfg: outcome(build_data, cfg)),
    "data.check": ([*FOLDER, "data.root={a}"], [*FOLDER, "data.root={a}", "data.check=full"],
                   lambda cfg: dataset_fingerprint(cfg, mode=cfg.data.check)),
    "data.check_sample": ([*FOLDER, "data.root={a}", "data.check_sample=1"],
                          [*FOLDER, "data.root={a}", "data.check_sample=4"],
                          lambda cfg: dataset_fingerprint(cfg, mode="sample")),
}


def _worker_pids(cfg):
    loaders = Loaders(build_data(cfg), cfg)
    try:
        next(iter(loaders.train(0)))
        return loaders.worker_pids()
    finally:
        loaders.close()


def differs(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape != b.shape or not torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return any(differs(x, y) for x, y in zip(a, b))
    return a != b


@pytest.mark.parametrize("key", PROBES)
def test_the_key_changes_what_it_feeds(key, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # run.out_dir's probe plans folders relative to here
    other, probe = PROBES[key]
    assert differs(probe(cfg_with()), probe(cfg_with(*other))), f"{key}: no effect seen"


@pytest.mark.parametrize("key", FOLDER_PROBES)
def test_the_data_key_changes_what_it_feeds(key, folders):
    default, other, probe = FOLDER_PROBES[key]

    def fill(items):
        return [x.format(**folders) for x in items]
    assert differs(probe(cfg_with(*fill(default))), probe(cfg_with(*fill(other)))), f"{key}: no effect seen"


# Keys whose effect needs a real run (a checkpoint, a second process, a signal, a GPU): the tests that
# exercise them, "module::test".
END_TO_END = {
    "data.ten_crop": ["test_train::test_torchrun_trains_and_writes_the_run_directory",
                      "test_trainer::test_the_trainer_runs_without_ten_crop_when_asked"],
    "data.decode": ["test_trainer::test_device_decoding_gives_the_crops_the_loader_workers_give"],
    "train.max_steps": ["test_train::test_resumed_run_equals_uninterrupted_run"],
    "run.resume": ["test_train::test_resumed_run_equals_uninterrupted_run"],
    "run.init_from": ["test_train::test_export_gives_the_pairs_logits_and_round_trips"],
    "run.keep_checkpoints": ["test_train::test_torchrun_trains_and_writes_the_run_directory"],
    "run.checkpoint_every": ["test_reliability::test_nan_loss_on_one_rank_stops_both_before_the_update"],
    "run.eval_only": ["test_train::test_eval_only_writes_the_same_metric_keys"],
    "run.nonfinite": ["test_reliability::test_skipped_nonfinite_steps_are_counted_and_never_reach_the_weights"],
    "run.progress": ["test_train::test_torchrun_trains_and_writes_the_run_directory"],
    "run.log_every": ["test_train::test_torchrun_trains_and_writes_the_run_directory"],
    "run.tensorboard": ["test_train::test_tensorboard_event_files_carry_the_per_step_record"],
    "dist.timeout_s": ["test_reliability::test_hung_peer_in_a_collective_ends_the_survivor_within_the_timeout"],
    "dist.startup_timeout_s": ["test_trainer::test_timeouts_are_the_start_up_ones_until_the_first_step"],
    "dist.threads": ["test_trainer::test_timeouts_are_the_start_up_ones_until_the_first_step"],
    "dist.overlap": ["test_parity::test_gradients_match_reference"],
    "dist.amp": ["test_parity::test_bf16_autocast_halves_the_bytes_and_keeps_the_logits"],
    "dist.channels_last": ["test_parity::test_gradients_match_reference",
                          "test_devices::test_a_checkpoint_resumes_in_the_other_memory_format_and_trains_on"],
    "profile.enabled": ["test_profiler::test_profiled_run_writes_profile_table_and_timeline"],
    "profile.trace": ["test_profiler::test_traced_run_with_fc8_on_column_0"],
    "profile.skip_steps": ["test_profiler::test_profiled_run_writes_profile_table_and_timeline"],
    "profile.trace_wait": ["test_profiler::test_traced_run_with_fc8_on_column_0"],
    "profile.trace_warmup": ["test_profiler::test_traced_run_with_fc8_on_column_0"],
    "profile.trace_active": ["test_profiler::test_traced_run_with_fc8_on_column_0"],
    "profile.nvml_interval_s": ["test_profiler::test_nvml_sampler_with_a_fake_module"],
}


def test_every_key_has_a_probe_or_an_end_to_end_test():
    keys = {k.key for k in config_keys()}
    covered = set(PROBES) | set(FOLDER_PROBES) | set(END_TO_END)
    assert keys - covered == set(), f"keys without a test of their effect: {sorted(keys - covered)}"
    assert covered - keys == set(), f"tests for keys that do not exist: {sorted(covered - keys)}"
    for key, tests in END_TO_END.items():
        for name in tests:
            module, test = name.split("::")
            assert hasattr(importlib.import_module(module), test), f"{key}: {name} does not exist"
