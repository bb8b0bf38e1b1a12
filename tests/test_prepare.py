"""Tests for python -m alexnet_mp.prepare and reading prepared sets (data.dataset=prepared)."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet_mp.config import build_config
from alexnet_mp.data import DataError, DeviceDecoder, Loaders, build_data
from alexnet_mp.prepare import PrepareError, main, prepare

COLOURS = {"ant": (200, 40, 40), "bee": (40, 200, 40), "cow": (40, 40, 200)}
SIZE, CROP = 72, 67


def make_source(root: Path, train: int = 5, val: int = 2) -> Path:
    """Three classes of small noisy images, JPEG and PNG, of varied shapes."""
    for k, (name, colour) in enumerate(COLOURS.items()):
        for split, n in (("train", train), ("val", val)):
            for i in range(n):
                rng = np.random.default_rng(100 * k + 10 * i + (split == "val"))
                w, h = 80 + 7 * i, 90 - 3 * i
                arr = np.clip(np.array(colour) + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                path = root / split / name / f"{i}.{'jpg' if i % 2 else 'png'}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(path, quality=92)
    return root


def cfg_for(root: Path, *extra: str):
    return build_config(overrides=["data.dataset=prepared", f"data.root={root}", "model.num_classes=3",
                                   f"model.crop_size={CROP}", f"data.resize={SIZE}", "train.batch_size=5",
                                   "data.num_workers=0", *extra])


def folder_cfg(root: Path, *extra: str):
    return cfg_for(root, "data.dataset=folder", *extra)


def run(src: Path, out: Path, **kw) -> dict | None:
    kw = {"size": SIZE, "workers": 1, "shard_size": 4, **kw}
    return prepare(src, out, **kw)


def shard_sha1s(manifest: dict) -> list[str]:
    return [s["sha1"] for split in ("train", "val") for s in manifest["splits"][split]["shards"]]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("src") / "imgs")


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "prepared"
    return out, run(source, out)


@pytest.fixture(scope="module")
def raw_set(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("raw") / "prepared"
    return out, run(source, out, codec="raw")


# ---------------------------------------------------------------- round trip


def test_round_trip_gives_the_folders_batches(source, reference, raw_set, tmp_path):
    out, manifest = reference
    assert manifest["splits"]["train"]["count"] == 15 and manifest["splits"]["val"]["count"] == 6
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [4, 4, 4, 3]
    folder, prepared = build_data(folder_cfg(source)), build_data(cfg_for(out))
    assert prepared.classes == folder.classes == ["ant", "bee", "cow"] and prepared.side == SIZE
    # Statistics over every training image, stored with the set: the folder's (all 15 images) exactly.
    assert prepared.mean == folder.mean and prepared.eigvec == folder.eigvec
    assert torch.allclose(prepared.mean_image, folder.mean_image, atol=1e-4)
    # Raw records are the decoded images themselves; JPEG records are close to them.
    assert raw_set[1]["codec"] == "raw" and shard_sha1s(raw_set[1]) != shard_sha1s(manifest)
    lossless = build_data(cfg_for(raw_set[0]))
    for f, p, r in zip(Loaders(folder, folder_cfg(source)).train(epoch=1), Loaders(prepared, cfg_for(out)).train(epoch=1),
                       Loaders(lossless, cfg_for(raw_set[0])).train(epoch=1)):
        assert torch.equal(f.labels, p.labels) and torch.equal(f.offsets, p.offsets) and torch.equal(f.light, p.light)
        assert torch.equal(r.images, f.images)
        # Noise is JPEG's worst case: a few grey levels per pixel, the colours themselves kept.
        assert (p.images.float() - f.images.float()).abs().mean() < 10
        assert (p.images.float().mean((2, 3)) - f.images.float().mean((2, 3))).abs().max() < 2
    # Several worker processes write the same bytes as one.
    assert shard_sha1s(run(source, tmp_path / "two", workers=2)) == shard_sha1s(manifest)


def test_device_decoder_on_the_cpu_cuts_the_workers_crops(reference, raw_set):
    out, _ = reference
    cfg, dev = cfg_for(out), cfg_for(out, "data.decode=device")
    b = build_data(cfg)
    decoder = DeviceDecoder(SIZE, CROP, "cpu")
    for ten in (False, True):
        cpu_run = Loaders(b, cfg).eval(ten) if ten else Loaders(b, cfg).train(epoch=0)
        raw_run = Loaders(b, dev, column=1, columns=2).eval(ten) if ten else Loaders(b, dev, column=1, columns=2).train(epoch=0)
        for ref, raw in zip(cpu_run, raw_run):
            s, n = raw.first, len(raw.images)
            assert n == len(ref.labels) - s and all(j.dtype == torch.uint8 and j.dim() == 1 for j in raw.images)
            crops = decoder(raw.images, raw.offsets[s:s + n], raw.flips[s:s + n])
            assert torch.equal(crops, ref.images[s:])
    assert decoder([], torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, dtype=torch.bool)).shape == (0, 3, CROP, CROP)
    with pytest.raises(DataError, match="prepared JPEG set .*set data.decode=cpu"):
        Loaders(build_data(cfg_for(raw_set[0])), cfg_for(raw_set[0], "data.decode=device"))


# ---------------------------------------------------------------- resuming


def test_an_interrupted_preparation_resumes_without_redoing_finished_shards(source, reference, tmp_path):
    out = tmp_path / "out"
    assert run(source, out, max_shards=2) is None  # stopped on purpose after two shards
    first = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "train").glob("shard-*")}
    assert len(list((out / "train").glob("*.done.json"))) == 2 and not (out / "prepared.json").exists()
    with pytest.raises(DataError, match="did not finish"):
        build_data(cfg_for(out))
    # What a kill leaves behind: a temporary file, a shard without its done record.
    (out / "val").mkdir(exist_ok=True)
    (out / "val" / "shard-00000.bin.tmp-4242").write_bytes(b"half")
    (out / "train" / "shard-00001.done.json").unlink()
    manifest = run(source, out)
    assert shard_sha1s(manifest) == shard_sha1s(reference[1])
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "train").glob("shard-00000*")}
    assert kept == {n: v for n, v in first.items() if n.startswith("shard-00000")}
    assert not list(out.glob("*/*.tmp-*"))


def test_a_killed_preparation_is_finished_by_running_it_again(source, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(source), str(out), "--size", str(SIZE), "--workers", "1", "--shard-size", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "alexnet_mp.prepare", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(out.glob("train/*.done.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # mid-shard or between shards: no chance to clean up
    proc.wait()
    assert main(args) == 0
    manifest = json.loads((out / "prepared.json").read_text())
    assert shard_sha1s(manifest) == shard_sha1s(run(source, tmp_path / "again", shard_size=1))
    err = capsys.readouterr().err
    assert "writing shards" in err and "verifying shards" in err  # log lines without a terminal


# ---------------------------------------------------------------- verification


def test_build_refuses_prepared_sets_that_do_not_verify(reference, tmp_path):
    out = tmp_path / "p"
    shutil.copytree(reference[0], out)
    msg = str(pytest.raises(DataError, build_data, cfg_for(out, "data.resize=80")).value)
    assert "holds 72 px images" in msg and "set data.resize=72" in msg
    with pytest.raises(DataError, match="set model.num_classes=3"):
        build_data(cfg_for(out, "model.num_classes=4"))
    shard = out / "train" / "shard-00002.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    msg = str(pytest.raises(DataError, build_data, cfg_for(out)).value)
    assert "shard-00002.bin fails its checksum" in msg and "python -m alexnet_mp.prepare" in msg and "\n" not in msg
    shard.unlink()
    with pytest.raises(DataError, match="shard train/shard-00002 is missing"):
        build_data(cfg_for(out))
    shutil.copy(reference[0] / "train" / "shard-00002.bin", shard)
    np.save(out / "val" / "shard-00000.idx.npy", np.zeros((4, 4), np.int64))
    with pytest.raises(DataError, match="fails its checksum"):
        build_data(cfg_for(out))
    (out / "stats.npz").unlink()
    (out / "prepared.json").unlink()
    with pytest.raises(DataError, match="did not finish"):
        build_data(cfg_for(out))
    with pytest.raises(DataError, match="holds no prepared.json"):
        build_data(cfg_for(tmp_path))


def test_rerunning_repairs_a_damaged_shard(source, reference, tmp_path):
    out = tmp_path / "p"
    shutil.copytree(reference[0], out)
    shard = out / "val" / "shard-00001.bin"
    shard.write_bytes(b"\0" + shard.read_bytes()[1:])
    assert shard_sha1s(run(source, out)) == shard_sha1s(reference[1])
    assert len(build_data(cfg_for(out)).val) == 6


def test_records_damaged_after_build_are_refused_or_replaced(reference, tmp_path):
    out = tmp_path / "p"
    shutil.copytree(reference[0], out)
    strict, lenient = build_data(cfg_for(out)), build_data(cfg_for(out, "data.bad_images=skip"))
    shard = out / "train" / "shard-00000.bin"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # the last record of the first shard: sample 3, class ant
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="record 3 cannot be read .*python -m alexnet_mp.prepare"):
        strict.train.image(3)
    img, skipped = lenient.train.image(3)
    assert skipped == (f"{shard} record 3",) and torch.equal(img, lenient.train.image(4)[0])
    assert lenient.train.labels[3] == lenient.train.labels[4] == 0


# ---------------------------------------------------------------- unreadable sources, refusals


def test_unreadable_sources_stop_the_command_or_are_listed(source, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(source, src)
    bad = src / "train" / "bee" / "2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert main([str(src), str(tmp_path / "a"), "--size", str(SIZE), "--workers", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: cannot read image") and str(bad) in err and "--skip-bad" in err
    assert main([str(src), str(tmp_path / "a"), "--size", str(SIZE), "--workers", "1", "--skip-bad"]) == 0
    assert (tmp_path / "a" / "skipped.txt").read_text() == f"{bad}\n"
    b = build_data(cfg_for(tmp_path / "a"))
    assert len(b.train) == 14 and b.skipped == 1 and b.skipped_files == [str(bad)]


def test_nothing_already_there_is_overwritten(source, reference, tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(PrepareError, match="not empty"):
        run(source, foreign)
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]  # nor a lock file left behind
    out = tmp_path / "p"
    shutil.copytree(reference[0], out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(PrepareError, match="size=72, not 80"):
        run(source, out, size=80)
    src = tmp_path / "src"
    shutil.copytree(source, src)
    (src / "val" / "cow" / "0.png").unlink()
    with pytest.raises(PrepareError, match="changed since"):
        run(src, out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(PrepareError, match="--quality"):
        run(source, tmp_path / "q", quality=0)
