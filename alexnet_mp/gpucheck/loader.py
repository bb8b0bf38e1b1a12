"""Loader throughput: a prepared JPEG set read by the training loaders, decoded on the CPU by the
loader workers (data.decode=cpu) or on the GPU by nvJPEG (data.decode=device).

The set is made here: photo-like images (smooth colour fields with hard-edged shapes and a little
noise, 256 x 320 like a small photo) written as JPEG files, then prepared by
`alexnet_mp.prepare` at 256 px. Both paths cut the same crops from the same records; nvJPEG's
inverse DCT may differ from libjpeg-turbo's by a grey level or so, which the check bounds.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.io import encode_jpeg

from ..data import DeviceDecoder, Loaders, build_data
from ..prepare import prepare
from .configs import config
from .report import verdict

HEIGHT, WIDTH, SIDE = 256, 320, 256  # source images, and the prepared side
MAX_MEAN_GREY_DIFF = 2.0  # nvJPEG against libjpeg-turbo: mean absolute difference of the crops, grey levels


def photo_like(n: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 (n, 3, HEIGHT, WIDTH): smooth colour fields, a hard-edged rectangle each, pixel noise."""
    coarse = torch.rand(n, 3, 5, 6, generator=generator) * 200 + 28
    img = F.interpolate(coarse, size=(HEIGHT, WIDTH), mode="bicubic", align_corners=False)
    for i in range(n):
        y, x = (int(v) for v in torch.randint(0, 160, (2,), generator=generator))
        img[i, :, y:y + 80, x:x + 120] = torch.rand(3, 1, 1, generator=generator) * 255
    img += torch.randn(img.shape, generator=generator) * 4
    return img.clamp(0, 255).to(torch.uint8)


def write_jpeg_folder(root: Path, train: int, val: int, classes: int = 2, seed: int = 0) -> Path:
    """ROOT/{train,val}/c<k>/<i>.jpg: `train` and `val` images in all, spread over `classes` folders."""
    g = torch.Generator().manual_seed(seed)
    for split, count in (("train", train), ("val", val)):
        for start in range(0, count, 64):
            images = photo_like(min(64, count - start), g)
            for j, img in enumerate(images):
                folder = root / split / f"c{(start + j) % classes}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{start + j:06d}.jpg").write_bytes(encode_jpeg(img, quality=90).numpy().tobytes())
    return root


def loader_config(prepared: Path, decode: str, batch: int, workers: int):
    return config("data.dataset=prepared", f"data.root={prepared}", f"data.resize={SIDE}", "model.num_classes=2",
                  "model.crop_size=227", f"train.batch_size={batch}", f"data.num_workers={workers}",
                  f"data.decode={decode}")


def timed_epochs(loaders: Loaders, epochs: int, decode) -> tuple[float, int, torch.Tensor]:
    """(seconds, images) for `epochs` training epochs after a warm-up epoch (the workers start), and
    the first batch's crops. `decode` turns a batch into uint8 crops."""
    first = decode(next(iter(loaders.train(0))))
    for _ in loaders.train(0):  # the rest of the warm-up epoch
        pass
    images, start = 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        for batch in loaders.train(epoch):
            crops = decode(batch)
            images += len(batch.labels)
    if crops.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, images, first


def loader_worker(rank: int, folder: str, train: int, batch: int, workers: int, epochs: int = 2,
                  device: str = "cuda") -> dict:
    """Images per second of the loaders decoding on the CPU and decoding on `device` (nvJPEG on a GPU),
    and how their crops differ."""
    root = Path(folder)
    write_jpeg_folder(root / "src", train, val=8)
    prepare(root / "src", root / "prepared", size=SIDE, workers=max(1, workers))
    out = {"workers": workers, "batch": batch, "cores": os.cpu_count(), "device": device}
    firsts = {}
    for decode in ("cpu", "device"):
        cfg = loader_config(root / "prepared", decode, batch, workers)
        bundle = build_data(cfg)
        dev = DeviceDecoder(bundle.side, cfg.model.crop_size, device) if decode == "device" else None
        as_crops = (lambda b: b.images) if dev is None else (lambda b: dev(b.images, b.offsets, b.flips))
        with Loaders(bundle, cfg) as loaders:
            seconds, images, firsts[decode] = timed_epochs(loaders, epochs, as_crops)
        out[f"{decode}_images_per_s"] = images / seconds
    diff = (firsts["cpu"].float() - firsts["device"].cpu().float()).abs()
    out.update(mean_grey_diff=diff.mean().item(), max_grey_diff=diff.max().item())
    return out


def loader_verdict(r: dict) -> dict:
    ok = r["mean_grey_diff"] <= MAX_MEAN_GREY_DIFF
    name = "nvJPEG" if r["device"].startswith("cuda") else f"decode on {r['device']}"
    return verdict(ok, f"prepared JPEGs, batch {r['batch']}, {r['workers']} workers: CPU decode in the workers "
                       f"{r['cpu_images_per_s']:.0f} img/s, {name} {r['device_images_per_s']:.0f} img/s; its "
                       f"crops differ from the workers' by {r['mean_grey_diff']:.2f} grey levels on average "
                       f"(max {r['max_grey_diff']:.0f}; bound {MAX_MEAN_GREY_DIFF:g})", **r)
