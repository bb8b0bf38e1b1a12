"""Single-process checks: accounting, layouts, the init, the schedule, export."""
import subprocess
import sys

import pytest
import torch

from alexnet_mp.config import build_config
from alexnet_mp.export import ExportError, load_single_device, make_meta
from alexnet_mp.model import AlexNetColumn, AlexNetReference, conv_widths
from alexnet_mp.weights import build_reference, init_reference_state, merge_states, split_state
from alexnet_mp.schedule import LRSchedule, scaled_milestones
from alexnet_mp.summary import analytic_bytes, forward_macs, layer_table, param_count
from harness import SMALL_MODEL


def test_paper_network_has_the_papers_parameter_count():
    cfg = build_config().model
    assert param_count(cfg) == 60_965_224
    assert sum(p.numel() for p in AlexNetReference(cfg).parameters()) == 60_965_224
    columns = [sum(p.numel() for p in AlexNetColumn(cfg, c, None).parameters()) for c in (0, 1)]
    assert sum(columns) == 60_965_224 and columns[0] == columns[1]


def test_paper_macs_and_crossing_bytes_match_paper_md():
    cfg = build_config().model
    macs = {r["layer"]: r["macs"] for r in layer_table(cfg)}
    expected_m = {"conv1": 105.4, "conv2": 223.9, "conv3": 149.5, "conv4": 112.1, "conv5": 74.8,
                  "fc6": 37.7, "fc7": 16.8, "fc8": 4.1}
    for layer, m in expected_m.items():
        assert abs(macs[layer] / 1e6 - m) < 0.06, layer
    assert 723e6 < forward_macs(cfg) < 725e6
    sent = {k: v["sent"] / 1e6 for k, v in analytic_bytes(cfg, 128, 0).items()}
    assert round(sent["conv3.forward"], 1) == 11.1 and round(sent["fc6.forward"], 1) == 2.4
    assert round(sent["fc7.forward"], 1) == 1.0 and round(sent["fc8.backward"], 1) == 1.0


def test_summary_command_prints_paper_count():
    out = subprocess.run([sys.executable, "-m", "alexnet_mp.summary"], capture_output=True, text=True, check=True)
    assert "60,965,224" in out.stdout and "conv3  both" in out.stdout


def test_fc6_input_follows_crop_size():
    for crop, side in ((227, 6), (67, 1), (99, 2), (131, 3)):
        cfg = build_config(overrides=[f"model.crop_size={crop}"]).model
        assert AlexNetReference(cfg).fc6.in_features == 256 * side * side
        out = AlexNetReference(build_config(overrides=[*SMALL_MODEL, f"model.crop_size={crop}"]).model).eval()(
            torch.zeros(1, 3, crop, crop))
        assert out.shape == (1, 5)


@pytest.mark.parametrize("fc8", ["split", "rank0"])
def test_split_then_merge_is_exact(fc8):
    cfg = build_config(overrides=[*SMALL_MODEL, f"model.fc8={fc8}"]).model
    ref = init_reference_state(cfg, seed=3)
    halves = [split_state(ref, cfg, c) for c in (0, 1)]
    for c in (0, 1):  # each half loads into its column as is
        AlexNetColumn(cfg, c, None).load_state_dict(halves[c])
    merged = merge_states(halves, cfg)
    assert merged.keys() == ref.keys() and all(torch.equal(merged[k], ref[k]) for k in ref)
    assert halves[0]["conv2.weight"].shape == (8, 4, 5, 5)  # half of the maps, half of the inputs


UNIT_BIAS = ("conv2", "conv4", "conv5", "fc6", "fc7")


@pytest.mark.parametrize("init", ["paper", "caffe", "he"])
def test_every_layers_init_statistics(init):
    """Per layer: the weights' mean and std, and every bias, as each model.init defines them (PAPER.md)."""
    cfg = build_config(overrides=["model.conv_widths=[32,64,96,96,64]", "model.fc_width=512",
                                  "model.num_classes=100", "model.crop_size=99", f"model.init={init}"]).model
    state = init_reference_state(cfg, seed=0)
    fan_in = {"conv1": 3 * 121, "conv2": 16 * 25, "conv3": 64 * 9, "conv4": 48 * 9, "conv5": 48 * 9,
              "fc6": 64 * 4, "fc7": 512, "fc8": 512}  # grouped layers see half the maps; pool5 is 2x2 at 99 px
    for name, fan in fan_in.items():
        w, b = state[f"{name}.weight"], state[f"{name}.bias"]
        assert w[0].numel() == fan, name
        std = {"paper": 0.01, "caffe": 0.005 if name in ("fc6", "fc7") else 0.01, "he": (2 / fan) ** 0.5}[init]
        bias = {"paper": 1.0, "caffe": 0.1, "he": 0.0}[init] if name in UNIT_BIAS else 0.0
        assert abs(w.std().item() / std - 1) < 0.1 and abs(w.mean().item()) < 0.1 * std, name
        assert torch.all(b == bias), name
    # Each layer draws from its own stream: the same seed gives the same tensors, another seed others.
    again, other = init_reference_state(cfg, seed=0), init_reference_state(cfg, seed=1)
    assert all(torch.equal(again[k], v) for k, v in state.items())
    assert not torch.equal(other["conv1.weight"], state["conv1.weight"])


def test_the_one_column_network_has_the_papers_comparison_widths():
    """model.columns=1: half the kernels of conv1-conv4, conv5 and the fc layers as wide as both columns."""
    cfg = build_config(overrides=["model.columns=1", "dist.mp=1"]).model
    assert conv_widths(cfg) == [48, 128, 192, 192, 256]
    net = AlexNetReference(cfg)
    assert [m.groups for m in (net.conv2, net.conv4, net.conv5)] == [1, 1, 1]
    assert net.fc6.weight.shape == (4096, 256 * 6 * 6) and net.fc8.weight.shape == (1000, 4096)
    assert param_count(cfg) == sum(p.numel() for p in net.parameters())


def test_step_schedule_scales_the_original_milestones():
    cfg = build_config().train
    assert scaled_milestones(cfg) == [25, 51, 79]
    short = build_config(overrides=["train.epochs=9"]).train
    assert scaled_milestones(short) == [2, 5, 8]
    sched = LRSchedule(short)
    assert [round(sched.lr(e), 8) for e in (0, 1, 2, 5, 8)] == [0.01, 0.01, 0.001, 0.0001, 0.00001]


def test_plateau_schedule_divides_after_patience_and_round_trips():
    sched = LRSchedule(build_config(overrides=["train.schedule=plateau", "train.plateau_patience=2"]).train)
    for loss in (1.0, 0.9, 0.95, 0.93):
        sched.observe(loss)
    assert sched.lr(4) == pytest.approx(0.001)
    again = LRSchedule(sched.cfg)
    again.load_state_dict(sched.state_dict())
    assert again.lr(5) == sched.lr(5) and again.best_loss == 0.9


def test_single_device_file_checks_shapes_and_lrn(tmp_path):
    cfg = build_config(overrides=SMALL_MODEL).model
    ref = build_reference(cfg, seed=0)
    path = tmp_path / "ref.pt"
    torch.save({"state_dict": ref.state_dict(), "meta": make_meta(cfg, list("abcde"), [0.5] * 3, [0.25] * 3)}, path)
    state, meta = load_single_device(path, cfg)
    assert meta["classes"] == list("abcde") and all(torch.equal(state[k], v) for k, v in ref.state_dict().items())
    wider = build_config(overrides=[*SMALL_MODEL, "model.fc_width=64"]).model
    with pytest.raises(ExportError, match="fc6.weight has shape"):
        load_single_device(path, wider)
    other_lrn = build_config(overrides=[*SMALL_MODEL, "model.lrn.k=1.0"]).model
    with pytest.raises(ExportError, match="LRN"):
        load_single_device(path, other_lrn)
    with pytest.raises(ExportError, match="does not exist"):
        load_single_device(tmp_path / "nope.pt", cfg)
