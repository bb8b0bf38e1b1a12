"""Data: the built-in synthetic set and ImageNet-layout folders, with the paper's augmentation.

Determinism. Both processes of a model-parallel pair build their own loader and must see the same
batches. Every random choice is therefore a pure function of (train.seed, epoch, sample index): the
epoch's shuffle is a permutation drawn from (seed, epoch), and each sample's crop, flip and lighting
come from a generator seeded with (seed, epoch, index). Nothing reads a global RNG, so the batches do
not depend on num_workers, on which worker loads a sample, or on what else the process has drawn.

Images are kept (or decoded) as uint8 3 x H x W at the "stored" side (data.image_size for synthetic
data, data.resize for folders); cropping, flipping, PCA lighting and normalisation happen on access.

Corrupt images (folder data). A set of at most VERIFY_AT_BUILD_MAX files is decoded in full at build
time, so a bad file is reported before training starts, and with bad_images=skip it is left out and
counted in DataBundle.skipped. Larger sets are not read at build time (that would cost a full pass
over the data per process); a file that fails to decode later raises DataError (bad_images=error) or
is replaced by the next readable sample of the split, with a warning (bad_images=skip). Such late
replacements are the same in every process, but they are not counted in DataBundle.skipped.

Statistics. The per-channel mean/std and the PCA of the RGB covariance come from up to
STATS_IMAGES training images. For folders they are cached as JSON in cache_dir, keyed by the
training file list (paths, sizes, mtimes) and data.resize; for synthetic data they are recomputed
(cheaply) from the generated images.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from .config import Config


class DataError(ValueError):
    """The data cannot be used as configured; the message names the problem and the fix."""


VERIFY_AT_BUILD_MAX = 5000  # folder sets up to this many files are fully decoded at build time
STATS_IMAGES = 1000  # training images sampled for the mean/std/PCA statistics
_STATS_VERSION = 2  # bump when the statistics change meaning, to ignore old cache files
_SYNTH_VERSION = 2  # bump when the synthetic images change, so fingerprints change with them
SYNTH_MEMORY_MAX = 1 << 30  # bytes: larger synthetic splits are rendered on access, not kept

# Salts keep the streams drawn from one train.seed apart.
_SALT_TRAIN, _SALT_VAL, _SALT_SHUFFLE, _SALT_AUGMENT = 1, 2, 3, 4
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


def _rng(*keys: int) -> np.random.Generator:
    # SeedSequence wants non-negative entropy; wrap negative seeds instead of refusing them.
    return np.random.default_rng([int(k) % (1 << 64) for k in keys])


@dataclass
class DataBundle:
    train: Dataset  # training set with augmentation
    val: Dataset  # evaluation set, centre crop
    val_ten_crop: Dataset | None  # items (10, 3, crop, crop); None when data.ten_crop is off
    classes: list[str]  # class names in label order
    mean: list[float]  # RGB, pixels in [0, 1]
    std: list[float]
    skipped: int  # unreadable images left out at build time (bad_images=skip)
    eigval: list[float] = field(default_factory=list)  # PCA of the RGB covariance, descending
    eigvec: list[list[float]] = field(default_factory=list)  # eigenvectors as columns
    fingerprint: str = ""  # dataset_fingerprint() at build time
    stats_from_cache: bool = False  # statistics read from cache_dir rather than computed


# ---------------------------------------------------------------- synthetic images
#
# A class is a (colour, shape, texture) triple. Colours vary fastest and shapes are offset against
# them, so the first ten classes differ in both colour and shape, and textures appear only past
# len(_COLOURS) * len(_SHAPES) classes. 10 x 10 x 10 covers the paper's 1000 classes.

_COLOURS = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.75, 0.15), "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.85, 0.1), "white": (0.95, 0.95, 0.95), "black": (0.05, 0.05, 0.05),
    "cyan": (0.1, 0.85, 0.85), "magenta": (0.9, 0.15, 0.85), "orange": (1.0, 0.55, 0.05),
    "purple": (0.5, 0.2, 0.8),
}


def _odd(x: np.ndarray) -> np.ndarray:
    return (np.floor(x).astype(np.int32) & 1).astype(bool)


def _star(u, v):
    r = np.sqrt(u * u + v * v) + 1e-6
    c = -v / r  # cosine of the angle from "up"; cos(5a) as a polynomial keeps it exact (no atan2)
    return r < 0.6 + 0.35 * (((16 * c * c - 20) * c * c + 5) * c)


# Shapes and textures are written with arithmetic and sqrt only: those are correctly rounded, so an
# image is the same bytes whether it is rendered alone or in a chunk (SIMD sin/cos need not be).
# Coordinates are in units of the shape's radius, rotated with the shape.
_SHAPES = {
    "circle": lambda u, v: u * u + v * v < 1,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) < 0.8,
    "triangle": lambda u, v: (v < 0.5) & (v > np.sqrt(np.float32(3)) * np.abs(u) - 1),
    "plus": lambda u, v: ((np.abs(u) < 0.3) & (np.abs(v) < 0.95)) | ((np.abs(v) < 0.3) & (np.abs(u) < 0.95)),
    "ring": lambda u, v: (u * u + v * v < 1) & (u * u + v * v > 0.3),
    "star": _star,
    "crescent": lambda u, v: (u * u + v * v < 1) & ((u - 0.45) ** 2 + v * v > 0.56),
    "frame": lambda u, v: (np.maximum(np.abs(u), np.abs(v)) < 0.85) & (np.maximum(np.abs(u), np.abs(v)) > 0.5),
    "semicircle": lambda u, v: (u * u + v * v < 1) & (v > -0.1),
    "bowtie": lambda u, v: (np.abs(v) < np.abs(u)) & (np.abs(u) < 0.9),
}
# A texture marks the part of the shape drawn in a shade of its colour; s, t are shifted by a
# per-image phase so stripes do not sit in the same place on every image.
_TEXTURES = {
    "solid": None,
    "hstripes": lambda s, t: _odd(4 * t),
    "vstripes": lambda s, t: _odd(4 * s),
    "diagonal": lambda s, t: _odd(2.8 * (s + t)),
    "checked": lambda s, t: _odd(3 * s) ^ _odd(3 * t),
    "dotted": lambda s, t: (np.mod(3 * s, 1) - 0.5) ** 2 + (np.mod(3 * t, 1) - 0.5) ** 2 < 0.09,
    "grid": lambda s, t: (np.mod(3 * s, 1) < 0.3) | (np.mod(3 * t, 1) < 0.3),
    "rings": lambda s, t: _odd(4 * np.sqrt(s * s + t * t)),
    "split": lambda s, t: t > 0.5,
    "zigzag": lambda s, t: _odd(4 * t + 2 * np.abs(np.mod(2 * s, 1) - 0.5)),
}


def synthetic_classes(num_classes: int) -> list[tuple[str, str, str]]:
    """(colour, shape, texture) of each class, in label order."""
    nc, ns = len(_COLOURS), len(_SHAPES)
    if num_classes > nc * ns * len(_TEXTURES):
        raise DataError(f"the synthetic set has at most {nc * ns * len(_TEXTURES)} classes; "
                        f"lower model.num_classes or use data.dataset=folder")
    colours, shapes, textures = list(_COLOURS), list(_SHAPES), list(_TEXTURES)
    out = []
    for k in range(num_classes):
        r = k % (nc * ns)
        c = r % nc
        out.append((colours[c], shapes[(r // nc + c) % ns], textures[k // (nc * ns)]))
    return out


def _class_name(colour: str, shape: str, texture: str) -> str:
    return f"{colour}-{shape}" if texture == "solid" else f"{colour}-{shape}-{texture}"


class _SyntheticRenderer:
    """Draws image i of a split as a pure function of (seed, split salt, i)."""

    GRID = 4  # background control points per side

    def __init__(self, num_classes: int, side: int, seed: int, salt: int):
        self.side, self.seed, self.salt = side, seed, salt
        self.num_classes = num_classes
        spec = synthetic_classes(num_classes)
        self.shape_id = np.array([list(_SHAPES).index(s) for _, s, _ in spec])
        self.texture_id = np.array([list(_TEXTURES).index(t) for _, _, t in spec])
        self.colour = colour = np.array([_COLOURS[c] for c, _, _ in spec], dtype=np.float32)
        # The texture shade: darker for bright colours, lighter for black, so it is always visible.
        self.shade = np.where(colour.max(1, keepdims=True) > 0.5, colour * 0.4, colour + 0.5)
        # Bilinear spread of the background grid: pixel x lies between knots knot[x] and knot[x] + 1.
        pos = np.linspace(0, self.GRID - 1, side, dtype=np.float32)
        knot = np.minimum(pos.astype(np.intp), self.GRID - 2)
        self.frac = pos - knot.astype(np.float32)
        self.spans = [slice(int(np.searchsorted(knot, a)), int(np.searchsorted(knot, a, "right")))
                      for a in range(self.GRID - 1)]
        self.coords = np.arange(side, dtype=np.float32) + 0.5

    def label(self, i: int) -> int:
        return i % self.num_classes  # balanced up to the remainder; the shuffle mixes them

    def render(self, indices: np.ndarray) -> np.ndarray:
        """uint8 (n, 3, side, side) images for the given sample indices."""
        n, S, g = len(indices), self.side, self.GRID
        params = np.empty((n, 11), np.float32)
        grid = np.empty((n, 3, g, g), np.float32)
        noise = np.empty((n, 3, S, S), np.uint8)
        for j, i in enumerate(indices):
            r = _rng(self.seed, self.salt, i)
            params[j] = r.random(11, dtype=np.float32)
            grid[j] = r.random((1, g, g), dtype=np.float32) * 0.3 + r.random((3, g, g), dtype=np.float32) * 0.1
            # Raw generator words as bytes: several times cheaper than integers() on this scale.
            noise[j] = r.bit_generator.random_raw(-(-3 * S * S // 8)).view(np.uint8)[:3 * S * S].reshape(3, S, S)
        labels = np.asarray(indices) % self.num_classes
        p = params.T[:, :, None, None]  # per-image scalars, ready to broadcast over pixels

        # Pose: centre, radius and a rotation of up to 20 degrees either way, written with
        # tan(angle / 2) so that no sin/cos is needed.
        cx, cy = S * (0.4 + 0.2 * p[0]), S * (0.4 + 0.2 * p[1])
        radius = S * (0.2 + 0.1 * p[2])
        half = 0.1763 * (2 * p[3] - 1)
        cos, sin = (1 - half * half) / (1 + half * half), 2 * half / (1 + half * half)
        dx = self.coords[None, None, :] - cx
        dy = self.coords[None, :, None] - cy
        u = (cos * dx + sin * dy) / radius
        v = (cos * dy - sin * dx) / radius

        inside = np.zeros((n, S, S), bool)
        shaded = np.zeros((n, S, S), bool)
        shapes, textures = self.shape_id[labels], self.texture_id[labels]
        for k, fn in enumerate(_SHAPES.values()):
            sel = shapes == k
            if sel.any():
                inside[sel] = fn(u[sel], v[sel])
        for k, fn in enumerate(_TEXTURES.values()):
            sel = textures == k
            if fn is not None and sel.any():
                shaded[sel] = fn(u[sel] + 0.5 * p[4][sel], v[sel] + 0.5 * p[5][sel])

        # Values below are in grey levels, offset so that adding noise of 0..20 and truncating to
        # uint8 rounds to the nearest level and never leaves 0..255 (which saves a clip).
        offset = 0.5 - 10
        # Colour jitter: brightness and a small per-channel shift; kept in [0.04, 0.96] for the noise.
        bright = (0.8 + 0.3 * params[:, 6])[:, None]
        shift = (params[:, 7:10] - 0.5) * 0.12
        fg = (np.clip(self.colour[labels] * bright + shift, 0.04, 0.96) * 255 + offset)[:, :, None, None]
        dark = (np.clip(self.shade[labels] * bright + shift, 0.04, 0.96) * 255 + offset)[:, :, None, None]

        # Background: a grey of random level with smooth, low-contrast blotches of colour, the
        # control grid spread bilinearly (the weights sum to 1, so the level can go on the grid).
        grid = (grid + (0.05 + 0.3 * params[:, 10])[:, None, None, None]) * 255 + offset
        w = self.frac
        rows = np.empty((n, 3, g, S), np.float32)
        bg = np.empty((n, 3, S, S), np.float32)
        # Interval a of the grid covers the pixels `span` on each axis; slices, not gathers, are cheap.
        for a, span in enumerate(self.spans):
            rows[..., span] = grid[..., a, None] * (1 - w[span]) + grid[..., a + 1, None] * w[span]
        for a, span in enumerate(self.spans):
            bg[:, :, span] = rows[:, :, a, None] * (1 - w[span, None]) + rows[:, :, a + 1, None] * w[span, None]

        img = np.where(inside[:, None], np.where(shaded[:, None], dark, fg), bg)
        img += noise * np.float32(20 / 255)
        return img.astype(np.uint8)


class _SyntheticSource:
    """One split of the synthetic set, rendered once into memory when it fits SYNTH_MEMORY_MAX."""

    CHUNK = 8  # images rendered together: vectorised, yet small enough to stay in cache

    def __init__(self, renderer: _SyntheticRenderer, size: int):
        self.renderer, self.size, self.side = renderer, size, renderer.side
        self.images = None
        if size * self.side * self.side * 3 <= SYNTH_MEMORY_MAX:
            self.images = np.empty((size, 3, self.side, self.side), np.uint8)
            for start in range(0, size, self.CHUNK):
                stop = min(size, start + self.CHUNK)
                self.images[start:stop] = renderer.render(np.arange(start, stop))

    def __len__(self) -> int:
        return self.size

    def sample(self, i: int) -> tuple[np.ndarray, int]:
        img = self.images[i] if self.images is not None else self.renderer.render(np.array([i]))[0]
        return img, self.renderer.label(i)


# ---------------------------------------------------------------- image folders


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _unreadable(path: Path, err: BaseException) -> str:
    return (f"cannot read image {path} ({_first_line(err)}); replace or delete it, "
            f"or set data.bad_images=skip to skip unreadable images")


def _load_image(path: Path, side: int) -> np.ndarray:
    """Decode, scale the shorter side to `side` and centre-crop side x side: uint8 (3, side, side)."""
    with Image.open(path) as im:
        im.draft("RGB", (side, side))  # JPEG: decode at the smallest scale still >= side (fast)
        im = im.convert("RGB")
    im = TF.center_crop(TF.resize(im, side), side)
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))


class _FolderSource:
    """One split of an image folder: decoded, resized and centre-cropped on access."""

    def __init__(self, root: Path, files: list[tuple[str, int]], side: int, bad_images: str):
        self.root, self.files, self.side, self.bad_images = root, files, side, bad_images

    def __len__(self) -> int:
        return len(self.files)

    def sample(self, i: int) -> tuple[np.ndarray, int]:
        # A file that fails here was not checked at build time (large sets; see the module doc).
        # The replacement is the next readable file, which every process picks alike.
        for k in range(len(self.files)):
            rel, label = self.files[(i + k) % len(self.files)]
            path = self.root / rel
            try:
                return _load_image(path, self.side), label
            except _READ_ERRORS as e:
                if self.bad_images == "error":
                    raise DataError(_unreadable(path, e)) from None
                warnings.warn(f"skipping unreadable image {path} ({_first_line(e)}); using the next image",
                              stacklevel=2)
        raise DataError(f"no image under {self.root} can be read; check the files or data.root")


def _list_images(class_dir: Path, root: Path) -> list[tuple[str, int, int]]:
    """(path relative to root, size, mtime_ns) of the images under class_dir, sorted.

    Hidden files and folders are ignored: macOS "._x.jpg" forks and .ipynb_checkpoints are not data.
    """
    out = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(IMG_EXTENSIONS):
                continue
            path = Path(dirpath) / name
            st = path.stat()
            out.append((path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return sorted(out)


def _scan_folder(cfg: Config) -> tuple[Path, dict[str, dict[str, list[tuple[str, int, int]]]]]:
    """root and {split: {class: files}}, with the layout checked."""
    root = Path(cfg.data.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={cfg.data.root} is not a folder; set data.root to a folder "
                        f"holding train/<class>/ and val/<class>/ image folders (ImageNet layout)")
    splits = {}
    for split in ("train", "val"):
        d = root / split
        if not d.is_dir():
            raise DataError(f"{d} is missing; data.root must hold train/ and val/, each with one "
                            f"folder of images per class (ImageNet layout)")
        classes = sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise DataError(f"{d} has no class folders; put the images in {d}/<class>/")
        splits[split] = {c: _list_images(d / c, root) for c in classes}
    for a, b in (("train", "val"), ("val", "train")):
        extra = sorted(set(splits[a]) - set(splits[b]))
        if extra:
            raise DataError(f"class folders {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''} "
                            f"are in {root / a} but not in {root / b}; add them to {b}/ or remove them "
                            f"from {a}/ (both splits need the same classes)")
    return root, splits


def _hash_listing(splits: dict, only: tuple[str, ...] = ("train", "val"), salt: str = "") -> str:
    h = hashlib.sha1(salt.encode())
    for split in only:
        for cls in sorted(splits[split]):
            for rel, size, mtime in splits[split][cls]:
                h.update(f"{rel}\t{size}\t{mtime}\n".encode())
    return h.hexdigest()[:16]


def _synthetic_fingerprint(cfg: Config) -> str:
    d = cfg.data
    blob = json.dumps({"version": _SYNTH_VERSION, "seed": cfg.train.seed, "classes": cfg.model.num_classes,
                       "side": d.image_size, "train": d.train_size, "val": d.val_size}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def dataset_fingerprint(cfg: Config) -> str:
    """Cheap identity of the data: the file list with sizes and mtimes, or the synthetic settings.

    A trainer compares it between epochs (or on resume) to notice a data folder that changed.
    """
    if cfg.data.dataset == "synthetic":
        return _synthetic_fingerprint(cfg)
    return _hash_listing(_scan_folder(cfg)[1])


# ---------------------------------------------------------------- statistics


def _pixel_stats(images: Iterable[np.ndarray]) -> dict:
    """Mean, std and PCA (eigenvalues descending, eigenvectors as columns) of RGB in [0, 1]."""
    total, prods, count = np.zeros(3), np.zeros((3, 3)), 0
    for img in images:
        step = max(1, img.shape[1] // 64)  # about 64 x 64 pixels per image is plenty for 3x3 moments
        x = img[:, ::step, ::step].reshape(3, -1).T.astype(np.float64) / 255
        total += x.sum(0)
        # Elementwise sums, not a BLAS product: the result must not depend on the thread count.
        for a in range(3):
            for b in range(3):
                prods[a, b] += (x[:, a] * x[:, b]).sum()
        count += len(x)
    mean = total / count
    cov = prods / count - np.outer(mean, mean)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = np.maximum(eigval[order], 0), eigvec[:, order]
    # Eigenvectors have no inherent sign; fix one (largest component positive) so that LAPACK
    # builds that disagree still give the same lighting.
    eigvec = eigvec * np.where(eigvec[np.abs(eigvec).argmax(0), range(3)] < 0, -1, 1)
    # A floor on std keeps single-colour data from dividing by zero.
    std = np.sqrt(np.maximum(np.diag(cov), (1 / 255) ** 2))
    # Rounded, so that last-bit differences between machines do not reach the normalised pixels.
    return {k: np.round(v, 6).tolist() for k, v in
            {"mean": mean, "std": std, "eigval": eigval, "eigvec": eigvec}.items()}


def _stats_sample(source) -> Iterator[np.ndarray]:
    n = len(source)
    for i in np.unique(np.linspace(0, n - 1, min(n, STATS_IMAGES)).round().astype(int)):
        yield source.sample(int(i))[0]


def _cached_stats(cache_dir: str | Path | None, key: str, source) -> tuple[dict, bool]:
    """(stats, read from cache?) for the folder training split identified by `key`."""
    path = Path(cache_dir) / f"data-stats-{key}.json" if cache_dir else None
    if path is not None and path.is_file():
        try:
            cached = json.loads(path.read_text())
            return {k: cached[k] for k in ("mean", "std", "eigval", "eigvec")}, True
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache file is recomputed below
    stats = _pixel_stats(_stats_sample(source))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename: both processes of a pair may write at once; readers never see half a file.
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dict(stats, key=key), indent=1))
        os.replace(tmp, path)
    return stats, False


# ---------------------------------------------------------------- augmentation


class AugmentedImages(Dataset):
    """Model inputs from a source of uint8 images.

    mode "train": random crop, optional flip and PCA lighting, drawn from (seed, epoch, index);
    "centre": the centre crop; "ten": corners and centre, then the same five flipped, (10, 3, c, c).
    An item key is an index, or (index, epoch) as the training sampler passes it.
    """

    def __init__(self, source, mode: str, crop: int, seed: int, flip: bool, lighting: float, stats: dict):
        self.source, self.mode, self.crop, self.seed = source, mode, crop, seed
        self.flip, self.lighting = flip, lighting
        self.side = source.side
        self.mean = np.asarray(stats["mean"], np.float64)
        self.std = np.asarray(stats["std"], np.float64)
        self.scale = (1 / (255 * self.std)).astype(np.float32)[:, None, None]
        self.eigval = np.asarray(stats["eigval"], np.float64)
        self.eigvec = np.asarray(stats["eigvec"], np.float64)

    def __len__(self) -> int:
        return len(self.source)

    def _normalise(self, crop: np.ndarray, light: np.ndarray) -> torch.Tensor:
        # Lighting is added to [0, 1] pixels before normalising, and not clipped (as in the paper).
        bias = ((light - self.mean) / self.std).astype(np.float32)[:, None, None]
        return torch.from_numpy(np.ascontiguousarray(crop * self.scale + bias))

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        img, label = self.source.sample(int(index))
        c, side = self.crop, self.side
        no_light = np.zeros(3)
        if self.mode == "train":
            # Always draw every number, so turning flip or lighting off leaves the crops as they were.
            r = _rng(self.seed, epoch, index, _SALT_AUGMENT)
            y, x = r.integers(0, side - c + 1, size=2)
            flip = r.random() < 0.5
            alpha = r.normal(0.0, 1.0, size=3)
            crop = img[:, y:y + c, x:x + c]
            if self.flip and flip:
                crop = crop[:, :, ::-1]
            # Elementwise, not a BLAS product: the bytes must not depend on the BLAS build.
            light = (self.eigvec * (alpha * self.lighting * self.eigval)).sum(1) if self.lighting > 0 else no_light
            return self._normalise(crop, light), label
        m = (side - c) // 2
        if self.mode == "centre":
            return self._normalise(img[:, m:m + c, m:m + c], no_light), label
        corners = [(0, 0), (0, side - c), (side - c, 0), (side - c, side - c), (m, m)]  # as torchvision's five_crop
        crops = [img[:, y:y + c, x:x + c] for y, x in corners]
        crops += [cr[:, :, ::-1] for cr in crops]
        return torch.stack([self._normalise(cr, no_light) for cr in crops]), label


# ---------------------------------------------------------------- building


def _build_synthetic(cfg: Config):
    d = cfg.data
    renderers = [_SyntheticRenderer(cfg.model.num_classes, d.image_size, cfg.train.seed, salt)
                 for salt in (_SALT_TRAIN, _SALT_VAL)]
    train = _SyntheticSource(renderers[0], d.train_size)
    val = _SyntheticSource(renderers[1], d.val_size)
    classes = [_class_name(*spec) for spec in synthetic_classes(cfg.model.num_classes)]
    return train, val, classes, _pixel_stats(_stats_sample(train)), 0, False, _synthetic_fingerprint(cfg)


def _build_folder(cfg: Config, cache_dir):
    d = cfg.data
    root, splits = _scan_folder(cfg)
    classes = sorted(splits["train"])
    if cfg.model.num_classes != len(classes):
        raise DataError(f"{root} has {len(classes)} classes but model.num_classes={cfg.model.num_classes}; "
                        f"set model.num_classes={len(classes)}")
    files = {split: [(rel, label) for label, cls in enumerate(classes) for rel, _, _ in splits[split][cls]]
             for split in splits}
    skipped = 0
    if sum(len(f) for f in files.values()) <= VERIFY_AT_BUILD_MAX:
        for split, items in files.items():
            keep = []
            for rel, label in items:
                try:
                    _load_image(root / rel, d.resize)
                except _READ_ERRORS as e:
                    if d.bad_images == "error":
                        raise DataError(_unreadable(root / rel, e)) from None
                    skipped += 1
                    continue
                keep.append((rel, label))
            files[split] = keep
    for split, items in files.items():
        present = {label for _, label in items}
        for label, cls in enumerate(classes):
            if label not in present:
                raise DataError(f"class folder {root / split / cls} holds no readable images "
                                f"({' '.join(IMG_EXTENSIONS)}); add images or remove the class from train/ and val/")
    train = _FolderSource(root, files["train"], d.resize, d.bad_images)
    val = _FolderSource(root, files["val"], d.resize, d.bad_images)
    key = _hash_listing(splits, only=("train",), salt=f"stats v{_STATS_VERSION} resize={d.resize}\n")
    stats, from_cache = _cached_stats(cache_dir, key, train)
    return train, val, classes, stats, skipped, from_cache, _hash_listing(splits)


def build_data(cfg: Config, cache_dir: str | Path | None = None) -> DataBundle:
    """Build the training and evaluation sets that cfg.data describes (once per process)."""
    build = _build_synthetic(cfg) if cfg.data.dataset == "synthetic" else _build_folder(cfg, cache_dir)
    train, val, classes, stats, skipped, from_cache, fingerprint = build
    d, crop, seed = cfg.data, cfg.model.crop_size, cfg.train.seed

    def split(source, mode):
        return AugmentedImages(source, mode, crop, seed, d.flip, d.pca_lighting, stats)

    return DataBundle(
        train=split(train, "train"), val=split(val, "centre"),
        val_ten_crop=split(val, "ten") if d.ten_crop else None,
        classes=classes, mean=list(stats["mean"]), std=list(stats["std"]), skipped=skipped,
        eigval=list(stats["eigval"]), eigvec=[list(r) for r in stats["eigvec"]],
        fingerprint=fingerprint, stats_from_cache=from_cache)


# ---------------------------------------------------------------- loaders


class _Batches:
    """Batch sampler: consecutive chunks of `order` as lists of (index, epoch) keys."""

    def __init__(self, order: np.ndarray, batch: int, epoch: int):
        self.order, self.batch, self.epoch = order, batch, epoch

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for start in range(0, len(self.order), self.batch):
            yield [(int(i), self.epoch) for i in self.order[start:start + self.batch]]


class _Loader:
    """A DataLoader whose worker errors come out as the one-line DataError raised in the worker."""

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            yield from self.loader
        except DataError as e:
            # torch re-raises a worker's error with its traceback in the message; keep the last line.
            lines = str(e).strip().splitlines()
            if len(lines) <= 1:
                raise
            raise DataError(lines[-1].split("DataError: ", 1)[-1]) from None


def _own_process_group(worker_id: int) -> None:
    # torchrun stops a training process by signalling its whole process group, and Ctrl-C
    # signals the terminal's; the trainer then finishes its step and checkpoints, so its
    # loader's workers must outlive the signal. In a group of their own they do, yet a
    # signal sent to the worker itself (the loader's shutdown) still ends it, and torch's
    # workers still exit when their parent dies.
    os.setpgrp()


def _make_loader(dataset: Dataset, order: np.ndarray, cfg: Config, epoch: int) -> _Loader:
    return _Loader(DataLoader(
        dataset, batch_sampler=_Batches(order, cfg.train.batch_size, epoch),
        num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available(),
        worker_init_fn=_own_process_group,
        # Its own generator: otherwise the DataLoader draws its worker seed from the global torch
        # RNG, and the trainer's dropout masks would depend on when loaders were made.
        generator=torch.Generator()))


def _check_replica(dp_rank: int, dp_size: int) -> None:
    if not (dp_size >= 1 and 0 <= dp_rank < dp_size):
        raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size})")


def steps_per_epoch(bundle: DataBundle, cfg: Config, dp_size: int = 1) -> int:
    """Training batches per epoch: full global batches of dp_size * train.batch_size."""
    return len(bundle.train) // (dp_size * cfg.train.batch_size)


def train_loader(bundle: DataBundle, cfg: Config, epoch: int, start_batch: int = 0,
                 dp_rank: int = 0, dp_size: int = 1) -> _Loader:
    """Shuffled, augmented training batches of epoch `epoch`, from batch `start_batch` on.

    Step i's global batch is the i-th chunk of dp_size * batch_size indices of the epoch's
    permutation; replica dp_rank takes its own contiguous slice. The last partial batch is dropped.
    """
    _check_replica(dp_rank, dp_size)
    batch, n = cfg.train.batch_size, len(bundle.train)
    steps = steps_per_epoch(bundle, cfg, dp_size)
    if steps == 0:
        raise DataError(f"the training set has {n} images, fewer than one batch of {dp_size * batch}; "
                        f"lower train.batch_size or add training images")
    if not 0 <= start_batch <= steps:
        raise ValueError(f"start_batch={start_batch} is outside epoch {epoch}'s {steps} batches")
    perm = _rng(cfg.train.seed, epoch, _SALT_SHUFFLE).permutation(n)
    order = perm[:steps * dp_size * batch].reshape(steps, dp_size, batch)[start_batch:, dp_rank].reshape(-1)
    return _make_loader(bundle.train, order, cfg, epoch)


def eval_loader(bundle: DataBundle, cfg: Config, ten_crop: bool = False,
                dp_rank: int = 0, dp_size: int = 1) -> _Loader:
    """Evaluation batches in file order, the last one partial; replica r takes samples r, r+dp_size, ...

    Items are (B, 3, c, c), or (B, 10, 3, c, c) with ten_crop.
    """
    _check_replica(dp_rank, dp_size)
    dataset = bundle.val_ten_crop if ten_crop else bundle.val
    if dataset is None:
        raise DataError("ten-crop evaluation is off; set data.ten_crop=true to build it")
    return _make_loader(dataset, np.arange(dp_rank, len(dataset), dp_size), cfg, 0)


def batch_checksum(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha1 of a batch's shapes and bytes, to compare batches across processes."""
    h = hashlib.sha1(repr((tuple(images.shape), tuple(labels.shape))).encode())
    h.update(images.detach().cpu().contiguous().numpy().tobytes())
    h.update(labels.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()
