"""Training-set statistics: per-channel mean and std, the PCA of the RGB covariance, the mean image.

Moments are taken over about 64 x 64 pixels per image (plenty for 3 x 3 moments), the mean image over
every pixel, both from uint8 (3, S, S) stored images. Folder and synthetic sets use up to
STATS_IMAGES training images spread evenly over the split; a prepared set adds up every training
image while it is written. Folder statistics are cached in cache_dir, keyed by the caller.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

STATS_IMAGES = 1000  # training images sampled for the statistics of folder and synthetic sets
STATS_VERSION = 3  # bump when the statistics change meaning, to ignore old cache files
STAT_KEYS = ("mean", "std", "eigval", "eigvec", "mean_image")


class Moments:
    """Running sums over uint8 (3, S, S) images; merge() adds another's (order matters for bytes)."""

    def __init__(self, side: int):
        self.total, self.prods, self.count = np.zeros(3), np.zeros((3, 3)), 0
        self.image_sum = np.zeros((3, side, side), np.int64)
        self.images = 0

    def add(self, img: np.ndarray) -> None:
        step = max(1, img.shape[1] // 64)
        x = img[:, ::step, ::step].reshape(3, -1).T.astype(np.float64) / 255
        self.total += x.sum(0)
        # Elementwise sums, not a BLAS product: the result must not depend on the thread count.
        for a in range(3):
            for b in range(3):
                self.prods[a, b] += (x[:, a] * x[:, b]).sum()
        self.count += len(x)
        self.image_sum += img
        self.images += 1

    def merge(self, other: "Moments") -> None:
        self.total += other.total
        self.prods += other.prods
        self.count += other.count
        self.image_sum += other.image_sum
        self.images += other.images

    def arrays(self) -> dict:
        """The sums as arrays, to store (image sums as uint32: exact below 16.8M images)."""
        return {"total": self.total, "prods": self.prods, "count": np.int64(self.count),
                "image_sum": self.image_sum.astype(np.uint32), "images": np.int64(self.images)}

    @classmethod
    def from_arrays(cls, arrays) -> "Moments":
        m = cls(arrays["image_sum"].shape[-1])
        m.total, m.prods, m.count = np.array(arrays["total"]), np.array(arrays["prods"]), int(arrays["count"])
        m.image_sum, m.images = arrays["image_sum"].astype(np.int64), int(arrays["images"])
        return m

    def stats(self) -> dict:
        """mean, std, eigval (descending), eigvec (columns) in [0, 1] units; mean_image 0-255."""
        if not self.images:
            raise ValueError("no images to compute statistics from")
        mean = self.total / self.count
        cov = self.prods / self.count - np.outer(mean, mean)
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval)[::-1]
        eigval, eigvec = np.maximum(eigval[order], 0), eigvec[:, order]
        # Eigenvectors have no inherent sign; fix one (largest component positive) so that LAPACK
        # builds that disagree still give the same lighting.
        eigvec = eigvec * np.where(eigvec[np.abs(eigvec).argmax(0), range(3)] < 0, -1, 1)
        # A floor on std keeps single-colour data from dividing by zero.
        std = np.sqrt(np.maximum(np.diag(cov), (1 / 255) ** 2))
        # Rounded, so that last-bit differences between machines do not reach the normalised pixels.
        out = {k: np.round(v, 6).tolist() for k, v in
               {"mean": mean, "std": std, "eigval": eigval, "eigvec": eigvec}.items()}
        out["mean_image"] = torch.from_numpy((self.image_sum / self.images).astype(np.float32))
        return out


def sample_indices(n: int, count: int = STATS_IMAGES) -> np.ndarray:
    """Up to `count` indices spread evenly over range(n)."""
    return np.unique(np.linspace(0, n - 1, min(n, count)).round().astype(np.int64))


def source_stats(source, progress: Callable | None = None) -> dict:
    """Statistics of up to STATS_IMAGES images of a source, spread evenly over it."""
    picks = sample_indices(len(source))
    moments = Moments(source.side)
    for k, i in enumerate(picks):
        moments.add(source.image(int(i))[0].numpy())
        if progress and ((k + 1) % 50 == 0 or k + 1 == len(picks)):
            progress(k + 1, len(picks), "statistics")
    return moments.stats()


def save_stats(path: Path, stats: dict, **extra) -> None:
    """Write statistics to an .npz file atomically (write-then-rename: readers never see half a file)."""
    arrays = {k: np.asarray(stats[k], np.float64) for k in STAT_KEYS if k != "mean_image"}
    arrays["mean_image"] = np.asarray(stats["mean_image"], np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays, **{k: np.asarray(v) for k, v in extra.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_stats(path: Path) -> dict:
    """Statistics written by save_stats; raises OSError, ValueError or KeyError when damaged."""
    with np.load(path, allow_pickle=False) as z:
        out = {k: np.round(z[k], 6).tolist() for k in STAT_KEYS if k != "mean_image"}
        out["mean_image"] = torch.from_numpy(np.ascontiguousarray(z["mean_image"], np.float32))
    if out["mean_image"].dim() != 3 or out["mean_image"].shape[0] != 3:
        raise ValueError(f"mean_image has shape {tuple(out['mean_image'].shape)}")
    return out


def cached_stats(cache_dir: str | Path | None, key: str, source, progress=None) -> tuple[dict, bool]:
    """(statistics, read from cache?) for the source identified by `key`."""
    path = Path(cache_dir) / f"data-stats-{key}.npz" if cache_dir else None
    if path is not None and path.is_file():
        try:
            stats = load_stats(path)
            if stats["mean_image"].shape[-1] == source.side:
                return stats, True
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache file is recomputed below
    stats = source_stats(source, progress)
    if path is not None:
        save_stats(path, stats)
    return stats, False


def from_images(images: Iterable[np.ndarray], side: int) -> dict:
    """Statistics of the given uint8 (3, side, side) images."""
    moments = Moments(side)
    for img in images:
        moments.add(img)
    return moments.stats()
