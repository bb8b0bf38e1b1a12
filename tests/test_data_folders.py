"""Tests for image folders: layout, decoding into the stored form, statistics, corrupt files, links, fingerprints."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet_mp.config import build_config
from alexnet_mp.data import DataError, Loaders, build_data, dataset_fingerprint, decode_file

CLASSES = {"cat": (200, 40, 40), "dog": (40, 200, 40), "zebra": (40, 40, 200)}
SIZES = [(100, 90), (90, 120), (130, 100), (85, 85)]


def save(path: Path, size, colour, seed: int) -> None:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour) + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_tree(root: Path) -> Path:
    for k, (name, colour) in enumerate(CLASSES.items()):
        for i, size in enumerate(SIZES):
            save(root / "train" / name / f"{i}.png", size, colour, 10 * k + i)
        for i, size in enumerate(SIZES[:2]):
            save(root / "val" / name / f"v{i}.jpg", size, colour, 100 + 10 * k + i)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "imgs")


def folder_cfg(root: Path, *extra: str):
    return build_config(overrides=["data.dataset=folder", f"data.root={root}", "model.num_classes=3",
                                   "model.crop_size=67", "data.resize=80", "train.batch_size=4",
                                   "data.num_workers=0", *extra])


def one_line_error(cfg, match: str, **kw) -> str:
    with pytest.raises(DataError, match=match) as info:
        build_data(cfg, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_folder_loading_and_progress(tree):
    cfg = folder_cfg(tree)
    calls = []
    b = build_data(cfg, progress=lambda done, total, what: calls.append((done, total, what)))
    assert b.classes == ["cat", "dog", "zebra"] and b.side == 80
    assert len(b.train) == 12 and len(b.val) == 6 and b.skipped == 0 and b.skipped_files == []
    whats = {w for _, _, w in calls}
    assert {"scanning folders", "verifying images", "statistics"} <= whats
    assert all(0 < d <= t for d, t, _ in calls) and (18, 18, "verifying images") in calls
    ev = list(Loaders(b, cfg).eval())
    assert torch.cat([e.labels for e in ev]).tolist() == [0, 0, 1, 1, 2, 2]
    x = torch.cat([e.images for e in ev]).float()
    assert x.mean((2, 3)).argmax(1).tolist() == [0, 0, 1, 1, 2, 2]  # each class's dominant channel
    batches = list(Loaders(b, cfg).train(epoch=0))
    assert len(batches) == 3 and sorted(torch.cat([e.labels for e in batches]).tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    with Loaders(b, folder_cfg(tree, "data.num_workers=2")) as workers:
        assert [e.images.tolist() for e in workers.train(epoch=0)] == [e.images.tolist() for e in batches]


def test_decode_scales_the_shorter_side_and_keeps_the_centre(tmp_path):
    # 200 x 100 with green outer quarters: the shorter side goes to 80 (160 x 80), and the centre
    # 80 x 80 keeps original columns 50..150, all red.
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :, 0] = 255
    arr[:, :50] = arr[:, 150:] = (0, 255, 0)
    for ext in ("png", "jpg"):
        Image.fromarray(arr).save(tmp_path / f"wide.{ext}", quality=95)
        img = decode_file(tmp_path / f"wide.{ext}", 80)
        assert img.shape == (3, 80, 80) and img.dtype == torch.uint8
        assert img[0, :, 3:-3].min() > 230 and img[1, :, 3:-3].max() < 25, ext
    tall = np.zeros((300, 100, 3), np.uint8)
    tall[100:200] = 255  # the middle third is white: after 100 -> 80, the centre 80 rows of 240 are white
    Image.fromarray(tall).save(tmp_path / "tall.png")
    img = decode_file(tmp_path / "tall.png", 80)
    assert img[:, 2:-2].min() > 240


def test_folder_statistics_are_cached(tree, tmp_path):
    cfg, cache = folder_cfg(tree), tmp_path / "cache"
    first = build_data(cfg, cache_dir=cache)
    assert len(list(cache.glob("data-stats-*.npz"))) == 1 and not first.stats_from_cache
    again = build_data(cfg, cache_dir=cache)
    assert again.stats_from_cache and again.mean == first.mean and again.std == first.std
    assert torch.equal(again.mean_image, first.mean_image) and first.mean_image.shape == (3, 80, 80)
    assert again.fingerprint == first.fingerprint == dataset_fingerprint(cfg)
    save(tree / "train" / "cat" / "new.png", (90, 90), (255, 255, 255), 999)
    changed = build_data(cfg, cache_dir=cache)
    assert not changed.stats_from_cache and len(list(cache.glob("data-stats-*.npz"))) == 2
    assert changed.mean != first.mean and changed.fingerprint != first.fingerprint
    for f in cache.glob("data-stats-*.npz"):  # a damaged cache file is recomputed, not trusted
        f.write_bytes(b"not npz")
    assert not build_data(cfg, cache_dir=cache).stats_from_cache
    assert build_data(cfg).mean == changed.mean
    assert not list(cache.glob("*.tmp"))


def test_folder_layout_errors(tree, tmp_path):
    one_line_error(folder_cfg(tmp_path / "nowhere"), "set data.root")
    assert "3 classes" in one_line_error(folder_cfg(tree, "model.num_classes=5"), "set model.num_classes=3")
    with pytest.raises(DataError, match="set data.root"):
        dataset_fingerprint(folder_cfg(tmp_path / "nowhere"), "sample")
    for f in (tree / "val" / "zebra").iterdir():
        f.unlink()
    assert str(tree / "val" / "zebra") in one_line_error(folder_cfg(tree), "holds no readable images")
    (tree / "val" / "zebra").rmdir()
    assert "add them to val/" in one_line_error(folder_cfg(tree), "zebra are in")
    save(tree / "val" / "zebra" / "v0.png", (90, 90), (0, 0, 0), 1)
    save(tree / "val" / "yak" / "v0.png", (90, 90), (0, 0, 0), 2)
    one_line_error(folder_cfg(tree), r"yak are in .*val but not in .*train")
    for name in os.listdir(tree / "val"):
        for f in (tree / "val" / name).iterdir():
            f.unlink()
        (tree / "val" / name).rmdir()
    one_line_error(folder_cfg(tree), "has no class folders")
    (tree / "val").rmdir()
    one_line_error(folder_cfg(tree), r"val is missing")


def test_hidden_files_and_folders_are_ignored(tree):
    (tree / "train" / "cat" / "._0.png").write_bytes(b"mac resource fork")
    (tree / "train" / ".ipynb_checkpoints").mkdir()
    (tree / "train" / "cat" / ".cache").mkdir()
    save(tree / "train" / "cat" / ".cache" / "x.png", (90, 90), (0, 0, 0), 3)
    b = build_data(folder_cfg(tree))
    assert b.classes == ["cat", "dog", "zebra"] and len(b.train) == 12


# ---------------------------------------------------------------- unreadable images


@pytest.fixture
def corrupt(tree):
    bad = tree / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    good = (tree / "train" / "dog" / "0.png").read_bytes()
    (tree / "train" / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    (tree / "val" / "cat" / "cut.jpg").write_bytes((tree / "val" / "cat" / "v0.jpg").read_bytes()[:300])
    return tree, bad


def test_unreadable_images_at_build_time_are_refused_or_listed(corrupt):
    tree, bad = corrupt
    assert str(bad) in one_line_error(folder_cfg(tree), "data.bad_images=skip")
    b = build_data(folder_cfg(tree, "data.bad_images=skip"))
    assert b.skipped == 3 and len(b.train) == 12 and len(b.val) == 6
    assert sorted(b.skipped_files) == sorted(str(p) for p in (bad, tree / "train" / "dog" / "truncated.png",
                                                              tree / "val" / "cat" / "cut.jpg"))


def test_images_damaged_after_build_are_replaced_within_their_class_or_refused(tree):
    cfg = folder_cfg(tree, "data.bad_images=skip", "train.batch_size=12")
    strict_cfg = folder_cfg(tree, "train.batch_size=12", "data.num_workers=1")
    b, strict = build_data(cfg), build_data(strict_cfg)  # both verified every file
    victim = tree / "train" / "dog" / "1.png"
    victim.write_bytes(b"damaged later")
    with Loaders(b, cfg) as loaders:
        (batch,) = list(loaders.train(epoch=0))
    assert batch.unreadable == (str(victim),)
    assert torch.bincount(batch.labels, minlength=3).tolist() == [4, 4, 4]  # labels never change
    row = [i for i, p in enumerate(b.train.paths) if p.endswith(b"dog/1.png")][0]
    assert b.train.image(row)[1] == (str(victim),)
    assert torch.equal(b.train.image(row)[0], b.train.image(row + 1)[0])  # the next dog, dog/2.png
    with pytest.raises(DataError, match="data.bad_images=skip") as info, Loaders(strict, strict_cfg) as loaders:
        list(loaders.train(epoch=0))  # raised in a worker, one line here
    assert "\n" not in str(info.value) and str(victim) in str(info.value)
    for name in ("0.png", "2.png", "3.png"):
        (tree / "train" / "dog" / name).write_bytes(b"gone too")
    with pytest.raises(DataError, match="no image of class 1 can be read"), Loaders(b, cfg) as loaders:
        list(loaders.train(epoch=0))


# ---------------------------------------------------------------- symbolic links


def test_links_that_leave_the_class_folder_or_loop_are_skipped_and_listed(tree, tmp_path):
    cat = tree / "train" / "cat"
    outside = tmp_path / "elsewhere.png"
    save(outside, (90, 90), (0, 0, 0), 5)
    os.symlink(cat, cat / "loop")  # a folder link back to its own parent
    os.symlink(tree / "train" / "dog", cat / "dogs")  # into another class
    os.symlink(outside, cat / "out.png")  # a file outside
    os.symlink(tmp_path / "missing.png", cat / "dangling.png")
    os.symlink(cat / "0.png", cat / "again.png")  # inside its class folder: used
    b = build_data(folder_cfg(tree))
    assert len(b.train) == 13 and b.skipped == 0
    assert sorted(b.skipped_links) == sorted(f"train/cat/{n}" for n in ("loop", "dogs", "out.png", "dangling.png"))
    assert dataset_fingerprint(folder_cfg(tree), "sample") == b.sample_fingerprint
    # A class folder that is itself a link is followed.
    target = tmp_path / "zebras"
    os.rename(tree / "val" / "zebra", target)
    os.symlink(target, tree / "val" / "zebra")
    assert len(build_data(folder_cfg(tree)).val) == 6


# ---------------------------------------------------------------- fingerprints


def test_fingerprints_notice_added_removed_and_changed_files(tree):
    cfg = folder_cfg(tree, "data.check_sample=3")
    b = build_data(cfg)
    assert dataset_fingerprint(cfg, "full") == b.fingerprint_for("full") == b.fingerprint
    assert dataset_fingerprint(cfg, "sample") == b.fingerprint_for("sample") != b.fingerprint
    ref = {m: dataset_fingerprint(cfg, m) for m in ("full", "sample")}
    save(tree / "val" / "dog" / "extra.png", (90, 90), (0, 0, 0), 7)
    added = {m: dataset_fingerprint(cfg, m) for m in ("full", "sample")}
    assert added["full"] != ref["full"] and added["sample"] != ref["sample"]
    (tree / "val" / "dog" / "extra.png").unlink()
    assert {m: dataset_fingerprint(cfg, m) for m in ("full", "sample")} == ref
    (tree / "train" / "zebra" / "3.png").unlink()
    assert dataset_fingerprint(cfg, "sample") != ref["sample"]
    # A file rewritten in place: the full check sees it; the sample sees it when the file is sampled.
    all_files = folder_cfg(tree, "data.check_sample=1000")
    before = {m: dataset_fingerprint(all_files, m) for m in ("full", "sample")}
    with open(tree / "train" / "cat" / "1.png", "ab") as f:
        f.write(b"\0")
    after = {m: dataset_fingerprint(all_files, m) for m in ("full", "sample")}
    assert after["full"] != before["full"] and after["sample"] != before["sample"]
    with pytest.raises(ValueError):
        dataset_fingerprint(cfg, "off")
