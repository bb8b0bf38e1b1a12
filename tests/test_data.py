"""Tests for alexnet_mp.data: the Batch contract, decode-once, determinism, sharding, synthetic data."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alexnet_mp import data
from alexnet_mp.config import build_config
from alexnet_mp.data import Batch, DataError, Loaders, Normalizer, batch_checksum, build_data, own_rows
from alexnet_mp.data.synthetic import SyntheticRenderer, SyntheticSource

SMALL = ["model.num_classes=4", "model.crop_size=67", "data.image_size=80", "data.resize=80",
         "data.train_size=64", "data.val_size=20", "train.batch_size=8", "data.num_workers=0"]


def small_cfg(*extra: str):
    return build_config(overrides=SMALL + list(extra))


def checksums(run) -> list[str]:
    return [batch_checksum(b.images, b.labels, b.offsets, b.flips, b.light) for b in run]


@pytest.fixture(scope="module")
def small():
    cfg = small_cfg()
    return cfg, build_data(cfg)


def loaders(bundle, cfg, **kw) -> Loaders:
    return Loaders(bundle, cfg, **kw)


# ---------------------------------------------------------------- the Batch contract


def test_batch_contract_for_training_and_evaluation(small):
    cfg, b = small
    run = loaders(b, cfg).train(epoch=0)
    batches = list(run)
    assert len(run) == len(batches) == 64 // 8 == data.steps_per_epoch(b, cfg)
    for batch in batches:
        assert isinstance(batch, Batch) and batch.first == 0 and batch.unreadable == ()
        assert batch.images.shape == (8, 3, 67, 67) and batch.images.dtype == torch.uint8
        assert batch.labels.shape == (8,) and batch.labels.dtype == torch.int64
        assert batch.offsets.shape == (8, 2) and batch.offsets.dtype == torch.int64
        assert batch.flips.shape == (8,) and batch.flips.dtype == torch.bool
        assert batch.light.shape == (8, 3) and batch.light.dtype == torch.float32
        assert 0 <= int(batch.offsets.min()) and int(batch.offsets.max()) <= 80 - 67
        assert 0 <= int(batch.labels.min()) and int(batch.labels.max()) < 4
    # Every crop is the stored image at its offset, mirrored when flipped.
    batch, k = batches[0], 3
    index = int(data.loaders.train_plan(64, cfg, 0, 0, 0, 1)[0].indices[k])
    (y, x), img = batch.offsets[k].tolist(), b.train.image(index)[0]
    want = img[:, y:y + 67, x:x + 67]
    assert torch.equal(batch.images[k], want.flip(-1) if batch.flips[k] else want)
    # Evaluation: file order, the last batch partial, centre crops without lighting.
    ev = list(loaders(b, cfg).eval())
    assert [len(e.labels) for e in ev] == [8, 8, 4] and [e.images.shape[0] for e in ev] == [8, 8, 4]
    assert torch.cat([e.labels for e in ev]).tolist() == [i % 4 for i in range(20)]
    assert all((e.offsets == 6).all() and not e.flips.any() and not e.light.any() for e in ev)
    ten = list(loaders(b, cfg).eval(ten_crop=True))
    assert ten[0].images.shape == (8, 10, 3, 67, 67) and ten[-1].images.shape == (4, 10, 3, 67, 67)
    assert ten[0].offsets.shape == (8, 10, 2) and ten[0].flips.shape == (8, 10)


def test_own_rows_split_every_batch_size():
    for columns in (1, 2, 3):
        for n in range(10):
            rows = [own_rows(n, c, columns) for c in range(columns)]
            assert rows[0][0] == 0 and rows[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))  # contiguous, no overlap
            sizes = [e - s for s, e in rows]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert own_rows(7, 0, 2) == (0, 4) and own_rows(7, 1, 2) == (4, 7) and own_rows(8, 0, 1) == (0, 8)
    for bad in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError):
            own_rows(8, *bad)


def test_each_column_decodes_only_its_rows():
    cfg = small_cfg("train.batch_size=7")
    whole = build_data(cfg)
    cols = [build_data(cfg) for _ in range(2)]  # one process per column, each with its own counter
    built = [c.train.decodes for c in cols]  # the statistics' decodes
    ref = list(loaders(whole, cfg).train(epoch=1))
    halves = [list(loaders(cols[c], cfg, column=c, columns=2).train(epoch=1)) for c in range(2)]
    for full, a, b in zip(ref, *halves):
        assert (a.first, b.first) == (0, 4) and a.images.shape[0] == 4 and b.images.shape[0] == 3
        assert torch.equal(torch.cat([a.images, b.images]), full.images)
        for field in ("labels", "offsets", "flips", "light"):
            assert torch.equal(getattr(a, field), getattr(full, field))
            assert torch.equal(getattr(b, field), getattr(full, field))
    decoded = [c.train.decodes - n for c, n in zip(cols, built)]
    assert decoded == [4 * len(ref), 3 * len(ref)]
    # Evaluation too, down to a last batch where column 1 has nothing to decode.
    one = small_cfg("train.batch_size=19")  # 20 = 19 + 1
    last = [list(loaders(cols[c], one, column=c, columns=2).eval())[-1] for c in range(2)]
    assert last[0].images.shape == (1, 3, 67, 67) and last[1].images.shape == (0, 3, 67, 67)
    assert last[1].first == 1 and torch.equal(last[0].labels, last[1].labels)


# ---------------------------------------------------------------- determinism


def test_batches_identical_across_builds_and_worker_counts(small):
    cfg, b = small
    other = build_data(small_cfg())
    sums = checksums(loaders(b, cfg).train(epoch=2))
    assert len(set(sums)) == len(sums)
    assert sums == checksums(loaders(other, cfg).train(epoch=2))
    with loaders(b, small_cfg("data.num_workers=2")) as workers:
        assert checksums(workers.train(epoch=2)) == sums
        assert checksums(workers.eval(ten_crop=True)) == checksums(loaders(other, cfg).eval(ten_crop=True))


def test_persistent_workers_serve_every_epoch_and_evaluation():
    cfg = small_cfg("data.num_workers=2")
    b = build_data(cfg)
    before = b.train.decodes
    with loaders(b, cfg) as ld:
        assert len(list(ld.train(epoch=0))) == 8
        pids = ld.worker_pids()
        assert len(pids) == 2 and os.getpid() not in pids
        list(ld.eval())
        list(ld.train(epoch=1))
        assert ld.worker_pids() == pids
        # Decodes in the workers are counted in the process that made the source.
        assert b.train.decodes - before == 2 * 64
        # An abandoned pass does not leak into the next; a superseded one refuses to go on.
        first = iter(ld.train(epoch=3))
        next(first)
        assert checksums(ld.train(epoch=3)) == checksums(loaders(b, small_cfg()).train(epoch=3))
        with pytest.raises(RuntimeError, match="one at a time"):
            next(first)
        assert ld.worker_pids() == pids
    for pid in pids:  # close() stopped (and reaped) them
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_loaders_leave_global_rngs_alone(small):
    _, b = small
    cfg = small_cfg("data.num_workers=1")
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    with loaders(b, cfg) as ld:
        list(ld.train(epoch=0))
        list(ld.eval())
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert (np.random.get_state()[1] == np_state).all()


def test_epochs_shuffle_differently_over_the_same_samples(small):
    cfg, b = small
    ld = loaders(b, cfg)
    e0, e1 = list(ld.train(epoch=0)), list(ld.train(epoch=1))
    y0, y1 = torch.cat([x.labels for x in e0]), torch.cat([x.labels for x in e1])
    assert not torch.equal(y0, y1)
    assert sorted(y0.tolist()) == sorted(y1.tolist()) == sorted(i % 4 for i in range(64))
    assert not set(checksums(e0)) & set(checksums(e1))


def test_augmentation_depends_on_epoch_and_index_not_on_batch_position(small):
    cfg, b = small
    aug = data.Augment(80, 67, cfg.train.seed, True, 0.1, True, np.array(b.eigval), np.array(b.eigvec))
    alone = aug.train(3, np.array([5]))
    among = aug.train(3, np.array([9, 2, 5]))
    assert all(torch.equal(x[0], y[2]) for x, y in zip(alone, among))
    assert not torch.equal(torch.cat([t.flatten().float() for t in aug.train(4, np.array([5]))]),
                           torch.cat([t.flatten().float() for t in alone]))


def test_start_batch_gives_the_tail_of_the_epoch(small):
    cfg, b = small
    ld = loaders(b, cfg)
    full = checksums(ld.train(epoch=4))
    tail = ld.train(epoch=4, start_batch=3)
    assert len(tail) == len(full) - 3 and checksums(tail) == full[3:]
    assert checksums(ld.train(epoch=4, start_batch=len(full))) == []
    with pytest.raises(ValueError):
        ld.train(epoch=4, start_batch=len(full) + 1)


def test_data_parallel_replicas_split_each_global_batch(small):
    cfg, b = small
    glob = list(loaders(b, small_cfg("train.batch_size=16")).train(epoch=1))
    ranks = [list(loaders(b, cfg, dp_rank=r, dp_size=2).train(epoch=1)) for r in range(2)]
    assert len(glob) == len(ranks[0]) == len(ranks[1]) == 64 // 16
    for step, g in enumerate(glob):
        r0, r1 = ranks[0][step], ranks[1][step]
        for field in ("images", "labels", "offsets", "flips", "light"):
            assert torch.equal(torch.cat([getattr(r0, field), getattr(r1, field)]), getattr(g, field))
    assert checksums(loaders(b, cfg, dp_rank=1, dp_size=2).train(epoch=1, start_batch=2)) == checksums(ranks[1])[2:]
    shards = [[batch_checksum(e.images[i]) for e in loaders(b, cfg, dp_rank=r, dp_size=3).eval()
               for i in range(len(e.labels))] for r in range(3)]
    assert sorted(sum(shards, [])) == sorted(batch_checksum(e.images[i]) for e in loaders(b, cfg).eval()
                                             for i in range(len(e.labels)))
    assert sum(map(len, shards)) == 20
    with pytest.raises(ValueError):
        Loaders(b, cfg, dp_rank=2, dp_size=2)


def test_too_small_training_set_is_an_error():
    cfg = small_cfg("data.train_size=6")
    with pytest.raises(DataError, match="train.batch_size"):
        loaders(build_data(cfg), cfg).train(epoch=0)


def test_batch_checksum_sees_one_changed_value():
    x, y = torch.zeros(2, 3, 4, 4), torch.tensor([0, 1])
    x2 = x.clone()
    x2[1, 2, 3, 3] = 1e-6
    assert batch_checksum(x, y) == batch_checksum(x.clone(), y.clone())
    assert batch_checksum(x, y) != batch_checksum(x2, y)
    assert batch_checksum(x, y) != batch_checksum(x, torch.tensor([1, 0]))
    assert batch_checksum(x.to(torch.uint8), y) != batch_checksum(x, y)  # dtype counts
    assert batch_checksum([torch.tensor([1, 2])], y) != batch_checksum([torch.tensor([1]), torch.tensor([2])], y)


# ---------------------------------------------------------------- augmentation switches


def _train_params(cfg, epoch=0):
    batches = list(loaders(build_data(cfg), cfg).train(epoch=epoch))
    return [torch.cat([getattr(b, f) for b in batches]) for f in ("images", "offsets", "flips", "light")]


def test_switching_one_augmentation_leaves_the_others(small):
    cfg, b = small
    images, offsets, flips, light = _train_params(cfg)
    assert flips.any() and not flips.all() and light.abs().min() > 0 and (offsets != 6).any()
    _, o2, f2, l2 = _train_params(small_cfg("data.flip=false"))
    assert torch.equal(o2, offsets) and not f2.any() and torch.equal(l2, light)
    _, o3, f3, l3 = _train_params(small_cfg("data.pca_lighting=0"))
    assert torch.equal(o3, offsets) and torch.equal(f3, flips) and not l3.any()
    i4, o4, f4, l4 = _train_params(small_cfg("data.random_crop=false"))
    assert (o4 == 6).all() and torch.equal(f4, flips) and torch.equal(l4, light)
    # Lighting is one RGB offset per image along the PCA directions, scaled by data.pca_lighting.
    _, _, _, l5 = _train_params(small_cfg("data.pca_lighting=0.2"))
    assert torch.allclose(l5, 2 * light, atol=1e-7)


def test_ten_crop_is_corners_centre_and_their_mirrors(small):
    cfg, b = small
    ten = next(iter(loaders(b, cfg).eval(ten_crop=True)))
    centre = next(iter(loaders(b, cfg).eval()))
    img = b.val.image(0)[0]
    assert torch.equal(ten.images[0, 0], img[:, :67, :67]) and torch.equal(ten.images[0, 3], img[:, 13:, 13:])
    assert torch.equal(ten.images[:, 4], centre.images)
    assert torch.equal(ten.images[:, 5:], ten.images[:, :5].flip(-1))
    assert ten.offsets[0, :5].tolist() == [[0, 0], [0, 13], [13, 0], [13, 13], [6, 6]]


# ---------------------------------------------------------------- synthetic set


def test_synthetic_images_are_a_pure_function_of_seed_split_and_index():
    r = SyntheticRenderer(40, 80, 0, data.common.SALT_TRAIN)
    indices = np.arange(100, 124)
    chunk = r.render(indices)
    assert chunk.dtype == np.uint8 and chunk.shape == (24, 3, 80, 80)
    alone = np.stack([r.render(np.array([i]))[0] for i in indices])
    assert np.array_equal(chunk, alone)  # the same bytes in a chunk and alone
    assert np.array_equal(r.render(indices[::-1]), chunk[::-1])  # and in any order
    again = SyntheticRenderer(40, 80, 0, data.common.SALT_TRAIN).render(indices)
    assert np.array_equal(again, chunk)
    other_split = SyntheticRenderer(40, 80, 0, data.common.SALT_VAL).render(indices)
    assert not np.array_equal(other_split, chunk)


def test_synthetic_classes_are_distinct_and_not_separable_by_colour_alone():
    # 20 classes: every colour carries two shapes, so a colour gives the class only half the time.
    classes = data.synthetic_classes(20)
    assert len(set(classes)) == 20
    colours = [c for c, _, _ in classes]
    assert all(colours.count(c) == 2 for c in set(colours))
    cfg = build_config(overrides=["model.num_classes=20", "model.crop_size=67", "data.image_size=80",
                                  "data.resize=80", "data.train_size=600", "data.val_size=200",
                                  "train.batch_size=50", "data.num_workers=0"])
    b = build_data(cfg)
    assert b.classes[0] == "red-circle" and b.classes[10].startswith("red-") and b.classes[10] != "red-circle"
    norm = Normalizer(b.stats, "meanstd", 80, 67)

    def features(run):
        batches = list(run)
        x = torch.cat([norm(e.images, e.offsets, e.flips, e.light) for e in batches])
        return F.adaptive_avg_pool2d(x, 16).flatten(1), torch.cat([e.labels for e in batches])

    ld = loaders(b, cfg)
    x, y = features(ld.train(epoch=0))
    xv, yv = features(ld.eval())
    means = torch.stack([x[y == k].mean(0) for k in range(20)])
    # A nearest-mean classifier on the pixels: the classes differ (above chance, 0.05), yet pose,
    # clutter and colour jitter keep it far from solving the set.
    accuracy = (torch.cdist(xv, means).argmin(1) == yv).float().mean().item()
    assert 0.07 < accuracy < 0.4, accuracy
    assert not torch.equal(b.val.image(0)[0], b.val.image(20)[0])


def test_synthetic_names_for_1000_classes():
    cfg = build_config(overrides=["model.num_classes=1000", "model.crop_size=67", "data.image_size=67",
                                  "data.resize=67", "data.train_size=16", "data.val_size=8",
                                  "train.batch_size=8", "data.num_workers=0"])
    b = build_data(cfg)
    assert len(b.classes) == 1000 == len(set(b.classes))
    assert all(re.fullmatch(r"[a-z]+-[a-z]+(-[a-z]+)?", c) for c in b.classes)
    assert len(set(data.synthetic_classes(1000))) == 1000
    batch = next(iter(loaders(b, cfg).train(epoch=0)))
    assert batch.images.shape == (8, 3, 67, 67) and batch.labels.max() < 1000
    assert build_data(small_cfg("model.num_classes=2")).classes == ["red-circle", "green-square"]
    with pytest.raises(DataError, match="at most 1000 classes"):
        build_data(small_cfg("model.num_classes=1001"))


def test_synthetic_rendering_on_access_matches_memory(small):
    cfg, b = small
    lazy = SyntheticSource(SyntheticRenderer(4, 80, 0, data.common.SALT_TRAIN), 64, memory_max=0)
    assert lazy.images is None and b.train.images is not None
    for i in (0, 17, 63):
        assert torch.equal(lazy.image(i)[0], b.train.image(i)[0])


def test_synthetic_set_depends_on_seed_and_fingerprint(small):
    cfg, b = small
    other = build_data(small_cfg("train.seed=1"))
    assert not torch.equal(other.val.image(0)[0], b.val.image(0)[0])
    negative = build_data(small_cfg("train.seed=-1"))  # wrapped, not refused
    assert not torch.equal(negative.train.image(0)[0], b.train.image(0)[0])
    assert data.dataset_fingerprint(cfg) == b.fingerprint == b.fingerprint_for("sample")
    assert data.dataset_fingerprint(cfg, "sample") == b.fingerprint != data.dataset_fingerprint(small_cfg("train.seed=1"))


def test_statistics_and_mean_image(small):
    cfg, b = small
    assert all(0 < v < 1 for v in b.mean) and all(0 < v < 0.5 for v in b.std)
    assert b.eigval[0] >= b.eigval[1] >= b.eigval[2] >= 0
    vec = np.array(b.eigvec)
    assert np.allclose(vec.T @ vec, np.eye(3), atol=1e-4)
    # The mean image is the pixelwise mean of the training images (all 64: fewer than STATS_IMAGES).
    want = torch.stack([b.train.image(i)[0] for i in range(64)]).double().mean(0)
    assert b.mean_image.shape == (3, 80, 80) and b.mean_image.dtype == torch.float32
    assert torch.allclose(b.mean_image.double(), want, atol=1e-3)
    assert np.allclose(b.mean, (want.mean((1, 2)) / 255).numpy(), atol=0.01)  # moments use a pixel subsample
