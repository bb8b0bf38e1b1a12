"""Exported files: a ready model and its preprocessing from the file alone, for every model option."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet_mp import load_exported
from alexnet_mp.config import build_config
from alexnet_mp.export import ExportError, export, load_single_device, make_meta
from alexnet_mp.files import save_torch
from alexnet_mp.weights import build_reference
from harness import SMALL_MODEL
from test_storage import two_column_checkpoint

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
SIDE = 76  # the stored side of the SMALL_MODEL crop (67) in these files

OPTIONS = {
    "defaults": [],
    "tanh": ["model.activation=tanh"],
    "plain pooling": ["model.pool=plain"],
    "no LRN": ["model.lrn.enabled=false"],
    "other LRN": ["model.lrn.size=3", "model.lrn.alpha=0.001", "model.lrn.beta=0.5", "model.lrn.k=1.0"],
    "one column": ["model.columns=1", "dist.mp=1"],
    "fc8 on column 0": ["model.fc8=rank0"],
    "dropout": ["model.dropout=0.2"],
    "odd classes and a larger crop": ["model.num_classes=7", "model.crop_size=99", "data.resize=128"],
}


def cfg_with(*overrides):
    return build_config(overrides=[*SMALL_MODEL, *overrides])


def reference_logits(cfg, images, seed=1):
    ref = build_reference(cfg.model, seed).eval()
    with torch.no_grad():
        return ref, ref(images)


def write_file(path, cfg, ref, **meta_fields):
    meta = make_meta(cfg.model, [f"c{i}" for i in range(cfg.model.num_classes)], MEAN, STD, **meta_fields)
    save_torch(path, {"state_dict": ref.state_dict(), "meta": meta})
    return path


def images_for(cfg, n=3):
    return torch.randn(n, 3, cfg.model.crop_size, cfg.model.crop_size, generator=torch.Generator().manual_seed(5))


def same_options(loaded, expected) -> bool:
    """Every model option equal (init and init_std only decide the first weights, not the network)."""
    return dataclasses.replace(loaded, init=expected.init, init_std=expected.init_std) == expected


@pytest.mark.parametrize("option", OPTIONS)
def test_the_exported_file_alone_rebuilds_the_network_with_its_logits(tmp_path, option):
    cfg = cfg_with(*OPTIONS[option])
    images = images_for(cfg)
    ref, expected = reference_logits(cfg, images)
    model, preprocess = load_exported(write_file(tmp_path / "a.pt", cfg, ref, resize=cfg.data.resize))
    assert not model.training and same_options(model.cfg, cfg.model)
    with torch.no_grad():
        assert torch.equal(model(images), expected)
    assert preprocess.crop == cfg.model.crop_size and preprocess.side == cfg.data.resize


def test_export_of_a_two_column_checkpoint_keeps_options_and_the_mean_image(tmp_path):
    cfg = cfg_with("model.activation=tanh", "model.pool=plain", "model.lrn.enabled=false",
                   "data.normalize=paper", "data.image_size=80")
    mean_image = torch.rand(3, 80, 80, generator=torch.Generator().manual_seed(2)) * 255
    stats = {"mean": torch.tensor(MEAN), "std": torch.tensor(STD), "mean_image": mean_image}
    ref = two_column_checkpoint(tmp_path / "run" / "checkpoints", cfg, 8, metric=0.5, stats=stats)
    export(tmp_path / "run", tmp_path / "a.pt")
    model, preprocess = load_exported(tmp_path / "a.pt")
    images = images_for(cfg)
    with torch.no_grad():
        assert torch.equal(model(images), ref.eval()(images))
    assert same_options(model.cfg, cfg.model)
    assert preprocess.mode == "paper" and preprocess.side == 80
    assert torch.equal(preprocess.normalizer.mean_image, mean_image)


def stored_image(side, width, seed=3):
    """uint8 (3, side, width): its shorter side is already the stored side, so no scaling happens."""
    return torch.randint(0, 256, (3, side, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def hand_input(image, mode, mean_image, crop=67, side=SIDE):
    """The evaluation input computed by hand: the centre side x side, its centre crop, normalised."""
    left = (image.shape[2] - side) // 2  # even margins here, so no rounding question
    m = (side - crop) // 2
    x = image[:, m:m + crop, left + m:left + m + crop].double()
    mean, std = torch.tensor(MEAN, dtype=torch.float64)[:, None, None], torch.tensor(STD, dtype=torch.float64)[:, None, None]
    if mode == "meanstd":
        return ((x / 255 - mean) / std)[None]
    if mode == "mean":
        return (x - 255 * mean)[None]
    return (x - mean_image[:, m:m + crop, m:m + crop].double())[None]


@pytest.mark.parametrize("mode", ["meanstd", "mean", "paper"])
def test_preprocess_gives_the_input_training_evaluated_for_each_normalize_mode(tmp_path, mode):
    cfg = cfg_with()
    ref = build_reference(cfg.model, 0)
    mean_image = torch.rand(3, SIDE, SIDE, generator=torch.Generator().manual_seed(4)) * 255
    path = write_file(tmp_path / "a.pt", cfg, ref, normalize=mode, resize=SIDE,
                      mean_image=mean_image if mode == "paper" else None)
    _, preprocess = load_exported(path)
    image = stored_image(SIDE, 90)
    got = preprocess(image)
    assert got.dtype == torch.float32 and got.shape == (1, 3, 67, 67)
    torch.testing.assert_close(got.double(), hand_input(image, mode, mean_image), rtol=1e-5, atol=1e-4)
    # The same picture as a PIL image, an H x W x 3 tensor or a 3 x H x W tensor gives the same input.
    hwc = image.permute(1, 2, 0).contiguous()
    assert torch.equal(preprocess(hwc), got) and torch.equal(preprocess(Image.fromarray(hwc.numpy())), got)
    # A larger picture of one colour is scaled down to the stored side and stays that colour.
    flat = torch.full((3, 2 * SIDE, 3 * SIDE), 200, dtype=torch.uint8)
    torch.testing.assert_close(preprocess(flat).double(),
                               hand_input(torch.full((3, SIDE, SIDE), 200, dtype=torch.uint8), mode, mean_image),
                               rtol=1e-5, atol=1e-4)


def test_preprocess_refuses_what_is_not_an_rgb_image(tmp_path):
    cfg = cfg_with()
    _, preprocess = load_exported(write_file(tmp_path / "a.pt", cfg, build_reference(cfg.model, 0), resize=SIDE))
    for bad, words in ((torch.zeros(4, 80, 80, dtype=torch.uint8), "no colour axis"),
                       (torch.zeros(3, 80, 80), "uint8"), (np.zeros((80, 80, 3), np.uint8), "PIL image")):
        with pytest.raises(ValueError, match=words):
            preprocess(bad)


def old_meta(cfg):
    """The meta files had before the model options and the input pipeline were recorded."""
    return {"num_classes": cfg.num_classes, "classes": [f"c{i}" for i in range(cfg.num_classes)],
            "crop_size": cfg.crop_size, "mean": MEAN, "std": STD,
            "lrn": {"size": cfg.lrn.size, "alpha": cfg.lrn.alpha, "beta": cfg.lrn.beta, "k": cfg.lrn.k},
            "lrn_per_column": True, "conv_widths": list(cfg.conv_widths), "fc_width": cfg.fc_width,
            "fc8": cfg.fc8, "dropout": cfg.dropout, "step": 8, "source": "runs/x/checkpoints/step-000000008"}


def test_old_exported_files_load_with_their_old_meaning(tmp_path):
    cfg = cfg_with()
    images = images_for(cfg)
    ref, expected = reference_logits(cfg, images)
    save_torch(tmp_path / "old.pt", {"state_dict": ref.state_dict(), "meta": old_meta(cfg.model)})
    model, preprocess = load_exported(tmp_path / "old.pt")
    assert same_options(model.cfg, cfg.model)  # LRN on, relu, overlapping pools, two columns
    with torch.no_grad():
        assert torch.equal(model(images), expected)
    assert preprocess.mode == "meanstd" and preprocess.side == 76  # the paper's 256/227 of the crop
    state, meta = load_single_device(tmp_path / "old.pt", cfg.model)
    assert meta["step"] == 8 and state.keys() == ref.state_dict().keys()


@pytest.mark.parametrize("overrides,words", [
    (["model.activation=tanh"], "model.activation=relu"),
    (["model.pool=plain"], "model.pool=overlap"),
    (["model.columns=1", "dist.mp=1"], "model.columns=2"),
    (["model.lrn.enabled=false"], "LRN"),
    (["model.lrn.k=1.0"], "LRN"),
    (["model.fc_width=64"], "fc6.weight has shape"),
])
def test_a_file_of_another_network_is_refused_for_init_from(tmp_path, overrides, words):
    cfg = cfg_with()
    path = write_file(tmp_path / "a.pt", cfg, build_reference(cfg.model, 0), resize=SIDE)
    load_single_device(path, cfg.model)
    with pytest.raises(ExportError, match=words):
        load_single_device(path, cfg_with(*overrides).model)


def test_unreadable_files_fail_in_one_line(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    for path, words in ((tmp_path / "junk.pt", "not a single-device AlexNet file"),
                        (tmp_path / "missing.pt", "does not exist")):
        with pytest.raises(ExportError, match=words) as caught:
            load_exported(path)
        assert "\n" not in str(caught.value)
