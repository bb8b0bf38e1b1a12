"""The loader figures: images/s per core of the folder and prepared paths, where the time goes,
decodes per image per pair and host-to-device bytes per image.

* Per core: one process, one thread, no loader workers, iterating a whole training epoch of
  `Loaders` (decode, crop, batch assembly); images over the process's CPU seconds, so other
  programs on the machine slow the figure less than wall time would. The three paths (folder,
  prepared JPEG, prepared raw) alternate in every round; their ratio is paired per round.
* Stages: the per-image milliseconds of each path's parts, timed alone (best of a few passes).
* Pair: a real 2-process run of the pair over one epoch of each set, reading the sources'
  decode counters (loader workers included) and the bytes of the host tensors that the
  input pipeline copies to the device (the uint8 crops, and the metadata, kept apart).
"""
from __future__ import annotations

import math
import shutil
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

from ..config import build_config
from ..data import Loaders, build_data
from ..data.decode import decode_file, resize_crop
from ..prepare import prepare
from ..spawn import run_ranks
from .images import HEIGHT, WIDTH, write_folder
from .presets import SMALL_WIDTHS
from .stats import estimate
from .steps import host_bytes, run_steps

SIDE = 256  # data.resize and the prepared side
PATHS = ("folder", "prepared-jpeg", "prepared-raw")


def make_sets(work: Path, sizes: dict, cores: int, say) -> dict[str, Path]:
    """The photo-like JPEG folder and its prepared JPEG and raw sets, under `work`."""
    folder = work / "folder"
    n = write_folder(folder, sizes["classes"], sizes["train_per_class"], sizes["val_per_class"],
                     progress=lambda done, total: done % 200 == 0 and say(f"loader: {done}/{total} JPEGs written"))
    say(f"loader: {n} photo-like {WIDTH}x{HEIGHT} JPEGs in {folder}")
    shard = math.ceil(sizes["classes"] * sizes["train_per_class"] / cores)  # one shard per core
    sets = {"folder": folder}
    for codec in ("jpeg", "raw"):
        out = work / f"prepared-{codec}"
        prepare(folder, out, size=SIDE, workers=cores, codec=codec, shard_size=shard)
        sets[f"prepared-{codec}"] = out
    return sets


def loader_config(path: str, root: Path, sizes: dict, workers: int = 0, overrides=()):
    dataset = "folder" if path == "folder" else "prepared"
    return build_config(overrides=[f"data.dataset={dataset}", f"data.root={root}", f"data.resize={SIDE}",
                                   f"model.crop_size={sizes['crop']}", f"model.num_classes={sizes['classes']}",
                                   f"train.batch_size={sizes['pair_batch']}", f"data.num_workers={workers}",
                                   "data.check=off", *overrides])


def _epoch_rate(loaders: Loaders, epoch: int) -> dict:
    images, cpu, wall = 0, time.process_time(), time.perf_counter()
    for batch in loaders.train(epoch):
        images += len(batch.labels)
    return {"images": images, "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}


def per_core_rates(sets: dict, sizes: dict, work: Path, say) -> dict:
    """Every path's images per CPU second (and per wall second), one epoch per path per round."""
    torch.set_num_threads(1)
    loaders = {}
    for p in PATHS:
        cfg = loader_config(p, sets[p], sizes)
        loaders[p] = Loaders(build_data(cfg, cache_dir=work / "cache"), cfg)
    rounds = {p: [] for p in PATHS}
    for r in range(sizes["rounds"]):
        for p in PATHS[r % 3:] + PATHS[:r % 3]:  # rotated, as the modes are
            rounds[p].append(_epoch_rate(loaders[p], r))
        say(f"loader: round {r + 1}/{sizes['rounds']}: " + ", ".join(
            f"{p} {rounds[p][-1]['images'] / rounds[p][-1]['cpu_s']:.0f}" for p in PATHS) + " images per CPU second")
    out = {}
    for p, runs in rounds.items():
        e = estimate([x["images"] / x["cpu_s"] for x in runs])
        out[p] = {"images_per_cpu_s": e.value, "ci": e.as_list(),
                  "images_per_wall_s": statistics.median(x["images"] / x["wall_s"] for x in runs)}
    for p in PATHS[1:]:
        per_core = {q: [x["images"] / x["cpu_s"] for x in rounds[q]] for q in (p, "folder")}
        e = estimate([a / b for a, b in zip(per_core[p], per_core["folder"])])
        out[f"{p}_vs_folder"] = {"value": e.value, "ci": e.as_list()}
    return out


def _best_ms(fn, items, passes: int = 3) -> float:
    """CPU milliseconds per item of fn over `items` (as the per-core rates count), the best of a few passes."""
    best = math.inf
    for _ in range(passes):
        start = time.process_time()
        for item in items:
            fn(item)
        best = min(best, (time.process_time() - start) / len(items))
    return best * 1e3


def stage_times(sets: dict, sizes: dict, count: int = 24) -> dict:
    """Per-image milliseconds of each path's parts, and the per-core ratio the JPEG shards could reach."""
    torch.set_num_threads(1)
    files = sorted((sets["folder"] / "train").rglob("*.JPEG"))[:count]
    blobs = [f.read_bytes() for f in files]
    jpeg = build_data(loader_config("prepared-jpeg", sets["prepared-jpeg"], sizes)).train
    raw = build_data(loader_config("prepared-raw", sets["prepared-raw"], sizes)).train
    count = min(count, len(files), len(jpeg))
    records = [jpeg.record(i) for i in range(count)]
    decoded = [decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB) for b in blobs]
    out = {
        "folder_read_decode_resize_ms": _best_ms(lambda f: decode_file(f, SIDE), files),
        "folder_decode_ms": _best_ms(lambda b: decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8),
                                                           mode=ImageReadMode.RGB), blobs),
        "folder_resize_ms": _best_ms(lambda img: resize_crop(img, SIDE), decoded),
        "prepared_jpeg_read_check_ms": _best_ms(jpeg.record, range(count)),
        "prepared_jpeg_decode_ms": _best_ms(lambda t: decode_jpeg(t, mode=ImageReadMode.RGB), records),
        "prepared_jpeg_image_ms": _best_ms(jpeg.image, range(count)),
        "prepared_raw_image_ms": _best_ms(raw.image, range(count)),
        "prepared_jpeg_record_bytes": statistics.fmean(len(r) for r in records),
        "folder_file_bytes": statistics.fmean(len(b) for b in blobs),
    }
    # With nothing else costing time (crops, batches), the JPEG path's edge is the folder's decode and
    # resize over its own decode: the ratio per core cannot exceed it.
    out["jpeg_ceiling_vs_folder"] = out["folder_read_decode_resize_ms"] / out["prepared_jpeg_image_ms"]
    out["decode_by_quality"] = decode_by_quality([jpeg.image(i)[0] for i in range(count)])
    return out


def decode_by_quality(images: list, qualities=(95, 90, 75)) -> dict:
    """{quality: {bytes, decode_ms}} of the stored images re-encoded, and of the same images without their
    detail ("smooth q95": an eighth of the side, enlarged again): JPEG decoding costs by the bit."""
    smooth = [F.interpolate(F.interpolate(img[None].float(), scale_factor=1 / 8, mode="area"), size=img.shape[-2:],
                            mode="bilinear").round().clamp(0, 255).to(torch.uint8)[0] for img in images]
    out = {}
    for name, quality, pictures in [*((f"q{q}", q, images) for q in qualities), ("smooth q95", 95, smooth)]:
        blobs = [encode_jpeg(img, quality=quality) for img in pictures]
        out[name] = {"bytes": statistics.fmean(b.numel() for b in blobs),
                     "decode_ms": _best_ms(lambda b: decode_jpeg(b, mode=ImageReadMode.RGB), blobs)}
    return out


def _pair_epoch(layout, configs: dict) -> dict:
    """One rank of the pair: an epoch of training on each set; decodes and host bytes per set."""
    from ..config import config_from_dict
    from ..trainer import Trainer
    out = {}
    for path, cfg_dict in configs.items():
        cfg = config_from_dict(cfg_dict)
        bundle = build_data(cfg)
        trainer = Trainer(cfg, layout)
        trainer.attach_data(bundle)
        before = bundle.train.decodes
        batches = list(trainer.loaders.train(0))  # the loader worker decodes the whole epoch
        moved = [host_bytes(b) for b in batches]
        run_steps(trainer, batches, len(batches))
        trainer.close()
        out[path] = {"decodes": bundle.train.decodes - before, "images": sum(len(b.labels) for b in batches),
                     "image_bytes": sum(m["images"] for m in moved),
                     "metadata_bytes": sum(m["metadata"] for m in moved)}
    return out


def pair_epoch_in_pool(worker, configs: dict) -> dict:
    """_pair_epoch as a task of the benchmark's pair pool (its ranks are already a pair)."""
    return _pair_epoch(worker.layout, configs)


def _pair_epoch_spawned(rank: int, configs: dict) -> dict:
    from ..config import config_from_dict
    from ..distributed import setup
    from .worker import fork_loader_workers
    fork_loader_workers()
    return _pair_epoch(setup(config_from_dict(next(iter(configs.values()))).dist), configs)


def pair_counts(sets: dict, sizes: dict, timeout: float, pool=None) -> dict:
    """Decodes per image per pair and host-to-device bytes per image, from a real 2-process run (in
    `pool`, a 2-rank WorkerPool of benchmark workers, or in two processes of its own)."""
    configs = {p: loader_config(p, sets[p], sizes, workers=1, overrides=[
        *SMALL_WIDTHS, "dist.device=cpu", "dist.threads=1", "dist.mp=2", "train.epochs=1"]).to_dict()
        for p in PATHS[:2]}
    if pool is not None:
        ranks = dict(enumerate(pool.run(pair_epoch_in_pool, configs)))
    else:
        ranks = run_ranks(_pair_epoch_spawned, 2, args=(configs,), timeout=timeout)
    out = {}
    for p in configs:
        images = ranks[0][p]["images"]  # every rank sees every row's labels: the pair's images
        out[p] = {"decodes_per_image_per_pair": sum(r[p]["decodes"] for r in ranks.values()) / images,
                  "h2d_image_bytes_per_image": sum(r[p]["image_bytes"] for r in ranks.values()) / images,
                  "h2d_metadata_bytes_per_image": sum(r[p]["metadata_bytes"] for r in ranks.values()) / images,
                  "images": images}
    return out


def measure_loader(work: Path, sizes: dict, cores: int, timeout: float, say, pool=None) -> dict:
    """The `loader` section of the results (`work` is removed afterwards); `pool`: see pair_counts."""
    work.mkdir(parents=True, exist_ok=True)
    try:
        sets = make_sets(work, sizes, cores, say)
        rates = per_core_rates(sets, sizes, work, say)
        stages = stage_times(sets, sizes)
        say("loader: the pair's decodes and copies, one epoch of each set on 2 processes")
        pair = pair_counts(sets, sizes, timeout, pool)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    worst = max(pair.values(), key=lambda v: abs(v["decodes_per_image_per_pair"] - 1))
    return {"crop": sizes["crop"], "side": SIDE, "per_core": rates, "stages_ms": stages, "pair": pair,
            "decodes_per_image_per_pair": worst["decodes_per_image_per_pair"],
            "prepared_vs_folder_per_core": rates["prepared-jpeg_vs_folder"]["value"],
            "prepared_vs_folder_per_core_ci": rates["prepared-jpeg_vs_folder"]["ci"],
            "prepared_raw_vs_folder_per_core": rates["prepared-raw_vs_folder"]["value"],
            "h2d_bytes_per_image": pair["prepared-jpeg"]["h2d_image_bytes_per_image"],
            "h2d_metadata_bytes_per_image": pair["prepared-jpeg"]["h2d_metadata_bytes_per_image"]}

