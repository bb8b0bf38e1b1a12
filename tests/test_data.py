"""Tests for alexnet_mp.data: shapes, determinism, sharding, the synthetic set and image folders."""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from alexnet_mp import data
from alexnet_mp.config import build_config
from alexnet_mp.data import DataError, batch_checksum, build_data, eval_loader, train_loader

SMALL = ["model.num_classes=4", "model.crop_size=67", "data.image_size=80", "data.resize=80",
         "data.train_size=64", "data.val_size=20", "train.batch_size=8", "data.num_workers=0"]


def small_cfg(*extra: str):
    return build_config(overrides=SMALL + list(extra))


def checksums(loader) -> list[str]:
    return [batch_checksum(x, y) for x, y in loader]


def sample_sums(loader) -> list[str]:
    """One checksum per sample, to compare which samples a loader yields."""
    return [batch_checksum(x[i], y[i]) for x, y in loader for i in range(len(y))]


@pytest.fixture(scope="module")
def small():
    cfg = small_cfg()
    return cfg, build_data(cfg)


# ---------------------------------------------------------------- shapes and normalisation


def test_shapes_dtypes_and_batch_counts(small):
    cfg, b = small
    batches = list(train_loader(b, cfg, epoch=0))
    assert len(batches) == 64 // 8 == len(train_loader(b, cfg, epoch=0))
    for x, y in batches:
        assert x.shape == (8, 3, 67, 67) and x.dtype == torch.float32
        assert y.shape == (8,) and y.dtype == torch.int64
        assert 0 <= int(y.min()) and int(y.max()) < 4
    # Evaluation keeps the last partial batch: 20 = 8 + 8 + 4, in file order.
    ev = list(eval_loader(b, cfg))
    assert [len(y) for _, y in ev] == [8, 8, 4]
    assert torch.cat([y for _, y in ev]).tolist() == [i % 4 for i in range(20)]
    assert len(b.classes) == 4 and b.skipped == 0 and b.val_ten_crop is not None


def test_normalisation(small):
    cfg, b = small
    x = torch.cat([x for x, _ in train_loader(b, cfg, epoch=0)])
    # Statistics come from the stored images, the loader sees crops: roughly zero mean, unit std.
    assert x.mean((0, 2, 3)).abs().max() < 0.2
    assert ((x.std((0, 2, 3)) - 1).abs() < 0.25).all()
    # Eval images undo exactly to the stored centre crop: (pixel/255 - mean) / std.
    mean, std = torch.tensor(b.mean)[:, None, None], torch.tensor(b.std)[:, None, None]
    img, _ = b.val.source.sample(3)
    m = (80 - 67) // 2
    expected = torch.from_numpy(img[:, m:m + 67, m:m + 67].astype(np.float32)) / 255
    assert torch.allclose(b.val[3][0] * std + mean, expected, atol=1e-5)
    assert all(0 < v < 1 for v in b.mean) and all(0 < v < 0.5 for v in b.std)


# ---------------------------------------------------------------- determinism


def test_independent_builds_give_identical_batches():
    cfg = small_cfg()
    a, b = build_data(cfg), build_data(small_cfg())
    sums_a = checksums(train_loader(a, cfg, epoch=2))
    assert sums_a == checksums(train_loader(b, cfg, epoch=2))
    assert len(set(sums_a)) == len(sums_a)
    assert checksums(eval_loader(a, cfg)) == checksums(eval_loader(b, cfg))
    assert checksums(eval_loader(a, cfg, ten_crop=True)) == checksums(eval_loader(b, cfg, ten_crop=True))


def test_num_workers_do_not_change_batches(small):
    cfg, b = small
    workers = small_cfg("data.num_workers=2")
    assert checksums(train_loader(b, cfg, epoch=1)) == checksums(train_loader(b, workers, epoch=1))
    assert checksums(eval_loader(b, cfg)) == checksums(eval_loader(b, workers))


def test_loaders_leave_global_rngs_alone(small):
    _, b = small
    cfg = small_cfg("data.num_workers=1")
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    list(train_loader(b, cfg, epoch=0))
    list(eval_loader(b, cfg))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert (np.random.get_state()[1] == np_state).all()


def test_epochs_shuffle_differently_over_the_same_samples(small):
    cfg, b = small
    e0, e1 = list(train_loader(b, cfg, epoch=0)), list(train_loader(b, cfg, epoch=1))
    y0, y1 = torch.cat([y for _, y in e0]), torch.cat([y for _, y in e1])
    assert not torch.equal(y0, y1)
    # Every sample is used once per epoch (64 is a whole number of batches), so labels match as sets.
    assert sorted(y0.tolist()) == sorted(y1.tolist()) == sorted(i % 4 for i in range(64))
    assert not set(checksums(e0)) & set(checksums(e1))


def test_augmentation_depends_on_epoch_not_on_position(small):
    _, b = small
    assert torch.equal(b.train[(5, 3)][0], b.train[(5, 3)][0])
    assert not torch.equal(b.train[(5, 3)][0], b.train[(5, 4)][0])


def test_start_batch_gives_the_tail_of_the_epoch(small):
    cfg, b = small
    full = checksums(train_loader(b, cfg, epoch=4))
    tail = train_loader(b, cfg, epoch=4, start_batch=3)
    assert len(tail) == len(full) - 3
    assert checksums(tail) == full[3:]
    assert checksums(train_loader(b, cfg, epoch=4, start_batch=len(full))) == []
    with pytest.raises(ValueError):
        train_loader(b, cfg, epoch=4, start_batch=len(full) + 1)


def test_data_parallel_replicas_split_each_global_batch(small):
    cfg, b = small
    wide = small_cfg("train.batch_size=16")  # one replica-free loader with the global batch
    glob = list(train_loader(b, wide, epoch=1))
    ranks = [list(train_loader(b, cfg, epoch=1, dp_rank=r, dp_size=2)) for r in range(2)]
    assert len(glob) == len(ranks[0]) == len(ranks[1]) == 64 // 16
    for step, (gx, gy) in enumerate(glob):
        (x0, y0), (x1, y1) = ranks[0][step], ranks[1][step]
        assert torch.equal(torch.cat([x0, x1]), gx) and torch.equal(torch.cat([y0, y1]), gy)
    # Resuming a replica mid-epoch skips the same global steps.
    assert checksums(train_loader(b, cfg, epoch=1, start_batch=2, dp_rank=1, dp_size=2)) == \
        checksums(ranks[1])[2:]
    # Evaluation shards cover every sample exactly once.
    shards = [sample_sums(eval_loader(b, cfg, dp_rank=r, dp_size=3)) for r in range(3)]
    assert sum(map(len, shards)) == 20
    assert sorted(sum(shards, [])) == sorted(sample_sums(eval_loader(b, cfg)))
    with pytest.raises(ValueError):
        train_loader(b, cfg, epoch=0, dp_rank=2, dp_size=2)


def test_too_small_training_set_is_an_error():
    cfg = small_cfg("data.train_size=6")
    with pytest.raises(DataError, match="train.batch_size"):
        train_loader(build_data(cfg), cfg, epoch=0)


def test_batch_checksum_sees_one_changed_value():
    x, y = torch.zeros(2, 3, 4, 4), torch.tensor([0, 1])
    x2 = x.clone()
    x2[1, 2, 3, 3] = 1e-6
    assert batch_checksum(x, y) == batch_checksum(x.clone(), y.clone())
    assert batch_checksum(x, y) != batch_checksum(x2, y)
    assert batch_checksum(x, y) != batch_checksum(x, torch.tensor([1, 0]))


# ---------------------------------------------------------------- augmentation


def test_ten_crop(small):
    cfg, b = small
    ten, label = b.val_ten_crop[7]
    assert ten.shape == (10, 3, 67, 67) and label == b.val[7][1]
    assert torch.equal(ten[4], b.val[7][0])  # the centre crop
    for i in range(5):
        assert torch.equal(ten[5 + i], ten[i].flip(-1))
    assert not torch.equal(ten[0], ten[3])
    x, y = next(iter(eval_loader(b, cfg, ten_crop=True)))
    assert x.shape == (8, 10, 3, 67, 67) and y.shape == (8,)
    off = small_cfg("data.ten_crop=false")
    nb = build_data(off)
    assert nb.val_ten_crop is None
    with pytest.raises(DataError, match="data.ten_crop=true"):
        eval_loader(nb, off, ten_crop=True)


def test_pca_lighting_shifts_colours_only_when_on():
    on, off = build_data(small_cfg("data.pca_lighting=0.5")), build_data(small_cfg("data.pca_lighting=0"))
    std = torch.tensor(on.std)[:, None, None]
    shifted = 0
    for i in range(10):
        a, b = on.train[(i, 0)][0], off.train[(i, 0)][0]
        # Same crop and flip; lighting adds one RGB offset to every pixel.
        diff = (a - b) * std
        offset = diff.mean((1, 2), keepdim=True)
        assert torch.allclose(diff, offset.expand_as(diff), atol=1e-5)
        shifted += int(offset.abs().max() > 1e-3)
        # Without lighting, pixels stay on the 1/255 grid of the stored image.
        levels = (b * std + torch.tensor(off.mean)[:, None, None]) * 255
        assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert shifted == 10


def test_flip_mirrors_some_samples():
    flip, fixed = build_data(small_cfg("data.flip=true")), build_data(small_cfg("data.flip=false"))
    mirrored = 0
    for i in range(16):
        a, b = flip.train[(i, 0)][0], fixed.train[(i, 0)][0]
        if not torch.equal(a, b):
            assert torch.equal(a, b.flip(-1))
            mirrored += 1
    assert 2 <= mirrored <= 14


# ---------------------------------------------------------------- synthetic set


def test_synthetic_classes_are_learnable():
    # 20 classes: colours repeat from class 10 on (red-circle vs red-square), so shape matters too.
    cfg = build_config(overrides=["model.num_classes=20", "model.crop_size=67", "data.image_size=80",
                                  "data.resize=80", "data.train_size=400", "data.val_size=100",
                                  "train.batch_size=50", "data.num_workers=0"])
    b = build_data(cfg)
    assert b.classes[0] == "red-circle" and b.classes[10].startswith("red-") and b.classes[10] != "red-circle"

    def features(loader):
        xs, ys = zip(*loader)
        return F.adaptive_avg_pool2d(torch.cat(xs), 16).flatten(1), torch.cat(ys)

    x, y = features(train_loader(b, cfg, epoch=0))
    xv, yv = features(eval_loader(b, cfg))
    means = torch.stack([x[y == k].mean(0) for k in range(20)])
    accuracy = (torch.cdist(xv, means).argmin(1) == yv).float().mean().item()
    assert accuracy > 0.4, accuracy  # chance is 0.05
    # Per-image variation: two training images of one class are not the same picture.
    assert not torch.equal(b.val[0][0], b.val[20][0])


def test_synthetic_names_for_1000_classes():
    cfg = build_config(overrides=["model.num_classes=1000", "model.crop_size=67", "data.image_size=67",
                                  "data.resize=67", "data.train_size=16", "data.val_size=8",
                                  "train.batch_size=8", "data.num_workers=0"])
    b = build_data(cfg)
    assert len(b.classes) == 1000 == len(set(b.classes))
    assert all(re.fullmatch(r"[a-z]+-[a-z]+(-[a-z]+)?", c) for c in b.classes)
    assert len(set(data.synthetic_classes(1000))) == 1000
    x, y = next(iter(train_loader(b, cfg, epoch=0)))
    assert x.shape == (8, 3, 67, 67) and y.max() < 1000
    two = build_data(small_cfg("model.num_classes=2"))
    assert two.classes == ["red-circle", "green-square"]
    with pytest.raises(DataError, match="at most 1000 classes"):
        build_data(small_cfg("model.num_classes=1001"))


def test_synthetic_rendering_on_access_matches_memory(monkeypatch):
    cfg = small_cfg()
    kept = build_data(cfg)
    monkeypatch.setattr(data, "SYNTH_MEMORY_MAX", 0)
    lazy = build_data(cfg)
    assert lazy.train.source.images is None and kept.train.source.images is not None
    assert checksums(train_loader(kept, cfg, epoch=0)) == checksums(train_loader(lazy, cfg, epoch=0))
    assert lazy.mean == kept.mean


def test_synthetic_depends_on_seed_and_fingerprint(small):
    cfg, b = small
    other = build_data(small_cfg("train.seed=1"))
    assert not torch.equal(other.val[0][0], b.val[0][0])
    negative = build_data(small_cfg("train.seed=-1"))  # wrapped, not refused
    assert not torch.equal(negative.train[(0, 0)][0], b.train[(0, 0)][0])
    assert data.dataset_fingerprint(cfg) == b.fingerprint != data.dataset_fingerprint(small_cfg("train.seed=1"))


# ---------------------------------------------------------------- image folders

CLASSES = {"cat": (200, 40, 40), "dog": (40, 200, 40), "zebra": (40, 40, 200)}
SIZES = [(100, 90), (90, 120), (130, 100), (85, 85)]


def _save(path: Path, size, colour, seed: int) -> None:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour) + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "imgs"
    for k, (name, colour) in enumerate(CLASSES.items()):
        for i, size in enumerate(SIZES):
            _save(root / "train" / name / f"{i}.png", size, colour, 10 * k + i)
        for i, size in enumerate(SIZES[:2]):
            _save(root / "val" / name / f"v{i}.jpg", size, colour, 100 + 10 * k + i)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def folder_cfg(root: Path, *extra: str):
    return build_config(overrides=["data.dataset=folder", f"data.root={root}", "model.num_classes=3",
                                   "model.crop_size=67", "data.resize=80", "train.batch_size=4",
                                   "data.num_workers=0", *extra])


def test_folder_loading(tree):
    cfg = folder_cfg(tree)
    b = build_data(cfg)
    assert b.classes == ["cat", "dog", "zebra"]
    assert len(b.train) == 12 and len(b.val) == 6 and b.skipped == 0
    xs, ys = zip(*eval_loader(b, cfg))
    assert torch.cat(ys).tolist() == [0, 0, 1, 1, 2, 2]
    x = torch.cat(xs)
    assert x.shape == (6, 3, 67, 67) and x.dtype == torch.float32
    # Each class has its dominant colour channel, after undoing the normalisation.
    rgb = x * torch.tensor(b.std)[:, None, None] + torch.tensor(b.mean)[:, None, None]
    assert rgb.mean((2, 3)).argmax(1).tolist() == [0, 0, 1, 1, 2, 2]
    batches = list(train_loader(b, cfg, epoch=0))
    assert len(batches) == 3 and all(x.shape == (4, 3, 67, 67) for x, _ in batches)
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    workers = folder_cfg(tree, "data.num_workers=2")
    assert checksums(train_loader(b, cfg, epoch=1)) == checksums(train_loader(b, workers, epoch=1))
    assert b.val_ten_crop[0][0].shape == (10, 3, 67, 67)


def test_folder_resize_and_centre_crop(tmp_path):
    # 200 x 100 with green outer quarters: the shorter side goes to 80 (160 x 80), and the centre
    # 80 x 80 crop keeps original columns 50..150, all red.
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :, 0] = 255
    arr[:, :50] = arr[:, 150:] = (0, 255, 0)
    Image.fromarray(arr).save(tmp_path / "wide.png")
    img = data._load_image(tmp_path / "wide.png", 80)
    assert img.shape == (3, 80, 80) and img.dtype == np.uint8
    assert img[0, :, 2:-2].min() > 240 and img[1, :, 2:-2].max() < 15
    Image.fromarray(np.full((40, 50), 128, np.uint8), mode="L").save(tmp_path / "grey.png")
    assert data._load_image(tmp_path / "grey.png", 80).shape == (3, 80, 80)  # greyscale, upscaled


def test_folder_stats_cache(tree, tmp_path):
    cfg, cache = folder_cfg(tree), tmp_path / "cache"
    first = build_data(cfg, cache_dir=cache)
    files = list(cache.glob("data-stats-*.json"))
    assert len(files) == 1 and not first.stats_from_cache
    assert first.eigval[0] >= first.eigval[1] >= first.eigval[2] >= 0
    # Eigenvectors: orthonormal columns.
    vec = np.array(first.eigvec)
    assert np.allclose(vec.T @ vec, np.eye(3), atol=1e-4)
    again = build_data(cfg, cache_dir=cache)
    assert again.stats_from_cache and again.mean == first.mean and again.std == first.std
    assert again.fingerprint == first.fingerprint == data.dataset_fingerprint(cfg)

    _save(tree / "train" / "cat" / "new.png", (90, 90), (255, 255, 255), 999)
    changed = build_data(cfg, cache_dir=cache)
    assert not changed.stats_from_cache and len(list(cache.glob("data-stats-*.json"))) == 2
    assert changed.mean != first.mean and changed.fingerprint != first.fingerprint
    assert data.dataset_fingerprint(cfg) == changed.fingerprint
    # A damaged cache file is recomputed, not trusted.
    for f in cache.glob("data-stats-*.json"):
        f.write_text("{not json")
    assert not build_data(cfg, cache_dir=cache).stats_from_cache
    # No cache_dir: computed every time, same values.
    assert build_data(cfg).mean == changed.mean


def _one_line_error(cfg, match: str, **kw) -> str:
    with pytest.raises(DataError, match=match) as info:
        build_data(cfg, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_folder_layout_errors(tree, tmp_path):
    _one_line_error(folder_cfg(tmp_path / "nowhere"), "set data.root")
    msg = _one_line_error(folder_cfg(tree, "model.num_classes=5"), "set model.num_classes=3")
    assert "3 classes" in msg
    with pytest.raises(DataError, match="set data.root"):
        data.dataset_fingerprint(folder_cfg(tmp_path / "nowhere"))

    (tree / "val" / "zebra" / "v0.jpg").unlink()
    (tree / "val" / "zebra" / "v1.jpg").unlink()
    msg = _one_line_error(folder_cfg(tree), "holds no readable images")
    assert str(tree / "val" / "zebra") in msg
    (tree / "val" / "zebra").rmdir()
    msg = _one_line_error(folder_cfg(tree), "zebra are in")
    assert "add them to val/" in msg
    _save(tree / "val" / "zebra" / "v0.png", (90, 90), (0, 0, 0), 1)
    _save(tree / "val" / "yak" / "v0.png", (90, 90), (0, 0, 0), 2)
    _one_line_error(folder_cfg(tree), r"yak are in .*val but not in .*train")

    for name in os.listdir(tree / "val"):
        for f in (tree / "val" / name).iterdir():
            f.unlink()
        (tree / "val" / name).rmdir()
    _one_line_error(folder_cfg(tree), "has no class folders")
    (tree / "val").rmdir()
    _one_line_error(folder_cfg(tree), r"val is missing")


def test_hidden_files_and_folders_are_ignored(tree):
    (tree / "train" / "cat" / "._0.png").write_bytes(b"mac resource fork")
    (tree / "train" / ".ipynb_checkpoints").mkdir()
    b = build_data(folder_cfg(tree))
    assert b.classes == ["cat", "dog", "zebra"] and len(b.train) == 12


@pytest.fixture
def corrupt(tree):
    bad = tree / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    good = (tree / "train" / "dog" / "0.png").read_bytes()
    (tree / "train" / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    return tree, bad


def test_corrupt_images_error_or_skip(corrupt):
    tree, bad = corrupt
    msg = _one_line_error(folder_cfg(tree), "data.bad_images=skip")
    assert str(bad) in msg
    b = build_data(folder_cfg(tree, "data.bad_images=skip"))
    assert b.skipped == 2 and len(b.train) == 12


def test_corrupt_images_found_while_loading(corrupt, monkeypatch, tmp_path):
    tree, bad = corrupt
    monkeypatch.setattr(data, "VERIFY_AT_BUILD_MAX", 0)  # a "large" set: no decoding at build time
    skip = folder_cfg(tree, "data.num_workers=0", "train.batch_size=14", "data.bad_images=skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = build_data(skip, cache_dir=tmp_path)
        assert len(b.train) == 14 and b.skipped == 0
        (x, y), = list(train_loader(b, skip, epoch=0))
    assert x.shape == (14, 3, 67, 67) and torch.isfinite(x).all()
    assert any("skipping unreadable image" in str(w.message) and str(bad) in str(w.message) for w in caught)
    # Both bad dog files (sorted last in dog/) are replaced by the next readable file, zebra/0.png.
    assert torch.bincount(y, minlength=3).tolist() == [4, 4, 6]

    # With bad_images=error the statistics (here from the cache) need no bad file, the batch does.
    cfg = folder_cfg(tree, "data.num_workers=1", "train.batch_size=14")
    b = build_data(cfg, cache_dir=tmp_path)
    assert b.stats_from_cache
    with pytest.raises(DataError, match="data.bad_images=skip") as info:
        list(train_loader(b, cfg, epoch=0))
    assert "\n" not in str(info.value) and str(tree / "train" / "dog") in str(info.value)
    _one_line_error(cfg, "data.bad_images=skip")  # without the cache, the statistics meet it first
