"""Tests for the Normalizer (three modes, source-position mean image) against reference arithmetic."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from alexnet_mp.config import build_config
from alexnet_mp.data import Loaders, Normalizer, build_data
from alexnet_mp.data.common import rng
from alexnet_mp.data.loaders import train_plan

SMALL = ["model.num_classes=4", "model.crop_size=67", "data.image_size=80", "data.train_size=64",
         "data.val_size=20", "train.batch_size=8", "data.num_workers=0", "data.pca_lighting=0.5"]


def reference_item(bundle, index: int, epoch: int, seed: int, lighting: float) -> torch.Tensor:
    """The float model input of one training sample as the pre-Normalizer pipeline computed it:
    its own draws from (seed, epoch, index, 4), crop, flip, then crop / (255 std) + (light - mean) / std
    with the constants taken in float64 and rounded to float32."""
    img = bundle.train.image(index)[0].numpy()
    side, c = img.shape[-1], 67
    r = rng(seed, epoch, index, 4)
    y, x = r.integers(0, side - c + 1, size=2)
    flip = r.random() < 0.5
    alpha = r.normal(0.0, 1.0, size=3)
    crop = img[:, y:y + c, x:x + c]
    crop = crop[:, :, ::-1] if flip else crop
    mean, std = np.asarray(bundle.mean, np.float64), np.asarray(bundle.std, np.float64)
    eigval, eigvec = np.asarray(bundle.eigval, np.float64), np.asarray(bundle.eigvec, np.float64)
    light = (eigvec * (alpha * lighting * eigval)).sum(1)
    scale = (1 / (255 * std)).astype(np.float32)[:, None, None]
    bias = ((light - mean) / std).astype(np.float32)[:, None, None]
    return torch.from_numpy(np.ascontiguousarray(crop * scale + bias))


def test_meanstd_equals_the_reference_float_path():
    cfg = build_config(overrides=SMALL)
    b = build_data(cfg)
    norm = Normalizer(b.stats, "meanstd", 80, 67)
    plan = train_plan(64, cfg, 2, 0, 0, 1)
    for request, batch in zip(plan, Loaders(b, cfg).train(epoch=2)):
        x = norm(batch.images, batch.offsets, batch.flips, batch.light)
        assert x.dtype == torch.float32 and x.shape == (8, 3, 67, 67)
        want = torch.stack([reference_item(b, int(i), 2, 0, 0.5) for i in request.indices])
        assert torch.allclose(x, want, rtol=0, atol=2e-6), (x - want).abs().max()


def test_mean_mode_is_raw_pixels_minus_the_channel_mean_plus_lighting():
    stats = {"mean": [0.2, 0.4, 0.6], "std": [0.1, 0.2, 0.3]}
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2).contiguous()
    light = torch.tensor([[0.0, 0.0, 0.0], [0.1, -0.2, 0.0]])
    out = Normalizer(stats, "mean", 2, 2)(x, None, None, light)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0 - 51.0, 51 - 102.0, 255 - 153.0]))
    assert torch.allclose(out[1, :, 1, 1], torch.tensor([-51 + 25.5, -51 - 51.0, 102.0]))
    meanstd = Normalizer(stats, "meanstd", 2, 2)(x, None, None, light)
    assert torch.allclose(meanstd[1, :, 0, 1], torch.tensor([(0 - 0.2 + 0.1) / 0.1, (0.2 - 0.4 - 0.2) / 0.2,
                                                             (1 - 0.6) / 0.3]), atol=1e-6)


def test_paper_mode_subtracts_the_mean_image_at_each_pixels_source():
    side, c = 5, 3
    mean_image = torch.arange(3 * side * side, dtype=torch.float32).view(3, side, side)
    norm = Normalizer({"mean": [0.5] * 3, "std": [0.2] * 3, "mean_image": mean_image}, "paper", side, c)
    x = torch.full((2, 3, c, c), 100, dtype=torch.uint8)
    offsets = torch.tensor([[1, 2], [0, 0]])
    flips = torch.tensor([True, False])
    light = torch.tensor([[0.0, 0.0, 0.0], [0.01, 0.0, 0.0]])
    out = norm(x, offsets, flips, light)
    # Hand-computed: flipped crop at (1, 2): crop pixel (0, 0) shows stored pixel (1, 2 + 2) = (1, 4);
    # channel 1 there is mean 25 + 1 * 5 + 4 = 34.
    assert out[0, 1, 0, 0].item() == 100 - 34
    assert out[0, 0, 2, 2].item() == 100 - (3 * 5 + 2)  # (1 + 2, 2 + 0) = (3, 2): mean 17
    assert out[1, 0, 0, 0].item() == pytest.approx(100 - 0 + 2.55)  # unflipped at (0, 0), plus 255 * 0.01
    # Whatever the crop, a stored image equal to the mean image normalises to zero.
    stored = mean_image.round().to(torch.uint8)
    for (y, x0), flip in [((0, 0), False), ((2, 1), True), ((1, 2), False), ((2, 2), True)]:
        crop = stored[:, y:y + c, x0:x0 + c]
        crop = crop.flip(-1) if flip else crop
        z = norm(crop[None], torch.tensor([[y, x0]]), torch.tensor([flip]), torch.zeros(1, 3))
        assert z.abs().max().item() == 0
    # Defaults: the centre crop, unflipped, no lighting.
    centre = stored[:, 1:4, 1:4][None]
    assert norm(centre).abs().max().item() == 0


def test_paper_mode_on_a_real_batch_matches_per_sample_slicing():
    cfg = build_config(overrides=SMALL)
    b = build_data(cfg)
    norm = Normalizer(b.stats, "paper", 80, 67)
    batch = next(iter(Loaders(b, cfg).train(epoch=0)))
    out = norm(batch.images, batch.offsets, batch.flips, batch.light)
    for k in range(8):
        (y, x), m = batch.offsets[k].tolist(), b.mean_image
        src = m[:, y:y + 67, x:x + 67]
        src = src.flip(-1) if batch.flips[k] else src
        want = batch.images[k].float() - src + 255 * batch.light[k][:, None, None]
        assert torch.allclose(out[k], want, atol=1e-4)


def test_normalizer_refuses_what_it_cannot_do():
    stats = {"mean": [0.5] * 3, "std": [0.2] * 3}
    with pytest.raises(ValueError, match="not one of"):
        Normalizer(stats, "caffe", 8, 6)
    with pytest.raises(ValueError, match="mean_image"):
        Normalizer(stats, "paper", 8, 6)
    with pytest.raises(ValueError, match=r"not \(3, 8, 8\)"):
        Normalizer(dict(stats, mean_image=torch.zeros(3, 9, 9)), "paper", 8, 6)
    with pytest.raises(ValueError, match="crop"):
        Normalizer(stats, "mean", 8, 9)
    norm = Normalizer(dict(stats, mean_image=torch.zeros(3, 8, 8)), "paper", 8, 6)
    assert {n for n, _ in norm.named_buffers()} >= {"mean", "mean_image"}  # moves with .to(device)
