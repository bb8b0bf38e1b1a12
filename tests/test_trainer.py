"""What a real run does, pinned through the trainer's own code paths (not a test-built copy of them).

Three small runs of the real `Trainer.fit()`: the pair (2 processes) and the single-process
reference (dist.mp=1) on the same config with dropout, and the reference without dropout. A
`Recorder` callback captures what each step actually used: the model's input, the dropout masks,
the optimiser's hyper-parameters, the weights. The assertions compare the pair with the reference
(inputs, masks, weights: a mistake in the wiring the pair and reference share would not show there)
and the reference with an independent recipe written out here (the paper's SGD with the schedule
computed by hand), so a mistake both share shows too.
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from alexnet_mp import resilience
from alexnet_mp.config import build_config
from alexnet_mp.distributed import setup
from alexnet_mp.model import SharedDropout
from alexnet_mp.trainer import Callback, Trainer
from alexnet_mp.trainer.evaluate import batch_sums
from alexnet_mp.weights import build_reference, merge_states
from harness import SMALL_MODEL, run_ranks

BASE = [*SMALL_MODEL, "model.num_classes=12", "data.image_size=72", "data.resize=72", "data.train_size=32",
        "data.val_size=12", "data.num_workers=0", "train.batch_size=8", "train.epochs=3", "train.lr=0.02",
        "dist.device=cpu", "dist.threads=1", "run.progress=false", "data.ten_crop=false"]
STEPS = 12  # 4 steps per epoch, 3 epochs: the scaled milestones divide the rate after epochs 1 and 2


class Recorder(Callback):
    """Captures, per training step, what the step really used."""

    def __init__(self):
        self.inputs, self.labels, self.masks, self.hyper, self.weights = [], [], [], [], None

    def on_fit_start(self, trainer):
        model = trainer.model
        model.register_forward_pre_hook(lambda m, args: self.inputs.append(args[0].detach().clone())
                                        if m.training else None)
        for name, module in model.named_modules():
            if isinstance(module, SharedDropout):
                module.register_forward_hook(lambda m, args, out, name=name: self._mask(name, args[0], out)
                                             if m.training else None)

    def _mask(self, name, before, after):
        if len(self.masks) < len(self.inputs):
            self.masks.append({})
        self.masks[-1][name] = (before.detach().clone(), after.detach().clone())

    def on_step_begin(self, trainer, batch):
        self.labels.append(batch.labels.clone())

    def on_step_end(self, trainer):
        self.hyper.append([{k: g[k] for k in ("lr", "momentum", "weight_decay", "dampening", "nesterov")}
                           | {"names": sorted(n for n, p in trainer.model.named_parameters()
                                              if any(p is q for q in g["params"]))}
                           for g in trainer.optimizer.param_groups])

    def on_fit_end(self, trainer, error):
        self.weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def fit_worker(rank, overrides, out_dir):
    cfg = build_config(overrides=[*BASE, f"run.out_dir={out_dir}", f"run.name=r{len(overrides)}", *overrides])
    recorder = Recorder()
    Trainer(cfg, setup(cfg.dist), callbacks=[recorder]).fit()
    return {k: getattr(recorder, k) for k in ("inputs", "labels", "masks", "hyper", "weights")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    pair = run_ranks(fit_worker, 2, args=(["model.dropout=0.5"], str(out / "pair")), timeout=180)
    single = run_ranks(fit_worker, 1, args=(["model.dropout=0.5", "dist.mp=1"], str(out / "single")), timeout=180)
    plain = run_ranks(fit_worker, 1, args=(["model.dropout=0", "dist.mp=1"], str(out / "plain")), timeout=180)
    return pair, single[0], plain[0], out


def test_both_columns_and_the_reference_train_on_the_same_inputs(runs):
    pair, single, _, _ = runs
    assert len(single["inputs"]) == STEPS
    for step in range(STEPS):
        for rank in (0, 1):
            assert torch.equal(pair[rank]["inputs"][step], single["inputs"][step]), f"rank {rank} step {step}"
            assert torch.equal(pair[rank]["labels"][step], single["labels"][step])
    assert not torch.equal(single["inputs"][0], single["inputs"][4])


def test_the_columns_apply_the_slices_of_the_references_dropout_masks(runs):
    pair, single, _, _ = runs
    for step in (0, STEPS - 1):
        for name in ("drop6", "drop7"):
            ref_in, ref_out = single["masks"][step][name]
            kept = [pair[r]["masks"][step][name] for r in (0, 1)]
            col_in = torch.cat([k[0] for k in kept], dim=1)
            col_out = torch.cat([k[1] for k in kept], dim=1)
            where = (ref_in.abs() > 1e-6) & (col_in.abs() > 1e-6)  # a unit with no input shows no mask
            assert where.sum() > 20
            assert torch.equal(ref_out[where] != 0, col_out[where] != 0), f"{name} step {step}"
            assert 0.2 < (ref_out[where] != 0).float().mean() < 0.8  # p = 0.5 did drop units
    # Every step draws new masks.
    a, b = (single["masks"][s]["drop6"] for s in (0, 1))
    assert not torch.equal(a[1] != 0, b[1] != 0)


def test_the_pair_ends_with_the_references_weights(runs):
    pair, single, _, _ = runs
    cfg = build_config(overrides=BASE).model
    merged = merge_states([pair[0]["weights"], pair[1]["weights"]], cfg)
    for key, value in single["weights"].items():
        torch.testing.assert_close(merged[key], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")


def test_the_optimiser_uses_the_papers_recipe_at_every_step(runs):
    _, single, _, _ = runs
    for step, groups in enumerate(single["hyper"]):
        epoch = step // 4
        lr = 0.02 * 0.1 ** epoch  # the scaled milestones: epochs 1 and 2
        decayed, plain = groups
        assert decayed["lr"] == pytest.approx(lr) and plain["lr"] == pytest.approx(lr)
        assert decayed["momentum"] == plain["momentum"] == 0.9
        assert decayed["weight_decay"] == 5e-4 and plain["weight_decay"] == 0.0
        assert decayed["dampening"] == 0 and not decayed["nesterov"]
        assert all(n.endswith(".weight") for n in decayed["names"]) and len(decayed["names"]) == 8
        assert all(n.endswith(".bias") for n in plain["names"]) and len(plain["names"]) == 8


def test_the_run_equals_the_recipe_written_out_by_hand(runs):
    """The reference trained here with torch's plain SGD on the inputs the run used."""
    _, _, plain, _ = runs
    cfg = build_config(overrides=[*BASE, "model.dropout=0", "dist.mp=1"])
    model = build_reference(cfg.model, cfg.train.seed)  # the init is checked in test_units
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.SGD([{"params": weights, "weight_decay": 5e-4}, {"params": biases, "weight_decay": 0.0}],
                          lr=0.02, momentum=0.9)
    model.train()
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = 0.02 * 0.1 ** (step // 4)
        loss = F.cross_entropy(model(plain["inputs"][step]), plain["labels"][step])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(plain["weights"][key], value, rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")


def ten_views(*views):
    return torch.stack([torch.tensor(v, dtype=torch.float32) for v in views])


def test_batch_sums_are_the_hand_computed_figures():
    """Ten crops: probabilities (not logits) averaged per image, views grouped image by image; top-5 is 5."""
    k = 12
    # Image 0 (label 3): nine views favour class 3 a little, one view class 5 a lot. Averaged
    # probabilities pick 3; averaged logits would pick 5.
    mild = [0.0] * k
    mild[3] = 2.0
    loud = [0.0] * k
    loud[5] = 30.0
    image0 = ten_views(*([mild] * 9), loud)
    # Image 1 (label 4): four classes above the label: a top-5 hit, a top-4 miss.
    four_above = [5.0] * 4 + [4.0] + [0.0] * (k - 5)
    # Image 2 (label 6): five classes above: a top-5 miss.
    five_above = [5.0] * 5 + [0.0, 4.0] + [0.0] * (k - 7)
    logits = torch.cat([image0, ten_views(*[four_above] * 10), ten_views(*[five_above] * 10)])
    labels = torch.tensor([3, 4, 6])
    loss, top1, top5 = batch_sums(logits, labels, views=10).tolist()
    probs = [F.softmax(logits[10 * i:10 * (i + 1)], dim=1).mean(0) for i in range(3)]
    assert loss == pytest.approx(sum(-math.log(p[y]) for p, y in zip(probs, labels.tolist())))
    assert (top1, top5) == (1, 2)
    assert batch_sums(logits[:10].mean(0, keepdim=True), labels[:1]).tolist()[1] == 0  # logits averaged: a miss


class HostRead(RuntimeError):
    pass


class NoHostReads(Callback):
    """While `train_step` runs, any read of a tensor's value by the host raises."""

    NAMES = ("item", "tolist", "__bool__", "cpu")

    def __init__(self):
        self.saved, self.steps = {}, 0

    def on_step_begin(self, trainer, batch):
        self.saved = {name: getattr(torch.Tensor, name) for name in self.NAMES}
        for name in self.NAMES:
            setattr(torch.Tensor, name, self._refuse(name))
        with pytest.raises(HostRead):  # the trap is set
            torch.ones(1).item()

    @staticmethod
    def _refuse(name):
        def refuse(*args, **kwargs):
            raise HostRead(f"Tensor.{name} inside the training step")
        return refuse

    def on_step_end(self, trainer):
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, fn)
        self.steps += 1


def no_host_read_worker(rank, overrides, out_dir):
    cfg = build_config(overrides=[*BASE, f"run.out_dir={out_dir}", "run.name=r", "train.max_steps=3", *overrides])
    trap = NoHostReads()
    Trainer(cfg, setup(cfg.dist), callbacks=[trap]).fit()
    return trap.steps


@pytest.mark.parametrize("overrides", [[], ["dist.overlap=false", "run.nonfinite=skip"]])
def test_the_training_step_never_reads_the_device_from_the_host(tmp_path, overrides):
    assert run_ranks(no_host_read_worker, 2, args=(overrides, str(tmp_path)), timeout=120) == {0: 3, 1: 3}


def test_the_trainer_runs_without_ten_crop_when_asked(runs):
    """data.ten_crop=false (BASE): the epoch records carry no ten-crop figures."""
    records = [json.loads(x) for folder in runs[3].rglob("metrics.jsonl") for x in folder.read_text().splitlines()]
    assert len(records) >= 9 and not any("val_tencrop_top1" in r for r in records)


class Timeouts(Callback):
    def __init__(self):
        self.seen = []

    def on_fit_start(self, trainer):
        self.seen.append((resilience.current_timeout(), trainer.link.timeout_s, torch.get_num_threads()))

    def on_step_end(self, trainer):
        self.seen.append((resilience.current_timeout(), trainer.link.timeout_s, torch.get_num_threads()))


def timeout_worker(rank, out_dir):
    cfg = build_config(overrides=[*BASE, f"run.out_dir={out_dir}", "run.name=t", "train.max_steps=2",
                                  "dist.startup_timeout_s=77", "dist.timeout_s=33", "dist.threads=2"])
    recorder = Timeouts()
    Trainer(cfg, setup(cfg.dist), callbacks=[recorder]).fit()
    return recorder.seen


def test_timeouts_are_the_start_up_ones_until_the_first_step(tmp_path):
    seen = run_ranks(timeout_worker, 2, args=(str(tmp_path),), timeout=120)
    for rank in (0, 1):
        assert seen[rank] == [(77.0, 77.0, 2), (33.0, 33.0, 2), (33.0, 33.0, 2)]


def test_device_decoding_gives_the_crops_the_loader_workers_give(tmp_path):
    """data.decode=device: the own rows arrive as JPEG bytes and the input pipeline decodes them on the
    device (the CPU here): the model gets exactly the inputs the CPU-decoding path gives it."""
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from alexnet_mp.data import Loaders, build_data
    from alexnet_mp.prepare import prepare
    from alexnet_mp.trainer.inputs import InputPipeline
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "src" / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (90, 110, 3), dtype=np.uint8)).save(
                    tmp_path / "src" / split / c / f"{i}.jpg")
    prepare(tmp_path / "src", tmp_path / "prep", size=72, workers=1)
    overrides = [*BASE, "model.num_classes=2", "data.dataset=prepared", f"data.root={tmp_path / 'prep'}",
                 "train.batch_size=4"]
    cfg = build_config(overrides=overrides)
    layout = SimpleNamespace(device=torch.device("cpu"))
    inputs = {}
    for decode in ("cpu", "device"):
        cfg.data.decode = decode  # "device" is refused by validation without a GPU: set it past the check
        bundle = build_data(cfg)
        loaders = Loaders(bundle, cfg)
        batch = next(iter(loaders.train(0)))
        loaders.close()
        pipeline = InputPipeline(bundle, cfg, layout, None)
        assert (pipeline.decoder is not None) == (decode == "device")
        assert isinstance(batch.images, list) == (decode == "device")
        inputs[decode] = pipeline(batch)
    assert torch.equal(inputs["cpu"][0], inputs["device"][0]) and torch.equal(inputs["cpu"][1], inputs["device"][1])


def round_trip_worker(rank, out_dir):
    from pathlib import Path

    from alexnet_mp import checkpoint
    from alexnet_mp.data import build_data
    cfg = build_config(overrides=[*BASE, "dist.mp=1", "train.schedule=plateau", "train.plateau_patience=1",
                                  "run.nonfinite=skip"])
    layout = setup(cfg.dist)
    first = Trainer(cfg, layout)
    first.attach_data(build_data(cfg))
    first.run_path = Path(out_dir)
    batches = iter(first.loaders.train(0))
    for _ in range(3):
        first.pending.append(first.train_step(next(batches)))
    first.settle()
    for loss in (1.0, 2.0, 3.0):  # two epochs without improvement: the plateau schedule drops twice
        first.schedule.observe(loss)
    first.state.skipped, first.state.best_top1, first.state.epoch = 1, 0.25, 2
    first.save_checkpoint("epoch", best_metric=0.25)
    folder, manifest = checkpoint.resolve(out_dir)
    second = Trainer(cfg, layout)
    second.attach_data(first.data)
    second.load_state_dict(checkpoint.load_column(folder, 0), manifest)
    return {name: (t.model.state_dict(), t.optimizer.state_dict()["state"], t.schedule.state_dict(),
                   vars(t.state)) for name, t in (("first", first), ("second", second))}


def test_the_whole_trainer_state_round_trips_through_a_checkpoint(tmp_path):
    out = run_ranks(round_trip_worker, 1, args=(str(tmp_path),), timeout=120)[0]
    (weights, momenta, schedule, state), (weights2, momenta2, schedule2, state2) = out["first"], out["second"]
    assert all(torch.equal(weights[k], weights2[k]) for k in weights)
    assert momenta.keys() == momenta2.keys() and len(momenta) == 16
    assert all(torch.equal(momenta[i]["momentum_buffer"], momenta2[i]["momentum_buffer"]) for i in momenta)
    assert any(momenta[i]["momentum_buffer"].abs().sum() > 0 for i in momenta)  # the steps did fill them
    assert schedule == schedule2 and schedule["drops"] == 2
    assert state == state2 and state["step"] == 3 and state["skipped"] == 1 and state["best_top1"] == 0.25
