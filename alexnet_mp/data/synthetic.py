"""The built-in synthetic set: image i of a split is a pure function of (train.seed, split, i).

A class is a (colour, shape, texture) triple; each image adds a random pose, colour jitter, a
blotchy background and pixel noise. Splits that fit SYNTH_MEMORY_MAX are rendered once into memory,
larger ones on access.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from ..config import Config
from .common import DataError, rng
from .sources import Source

SYNTH_VERSION = 2  # bump when the synthetic images change, so fingerprints change with them
SYNTH_MEMORY_MAX = 1 << 30  # bytes: larger synthetic splits are rendered on access, not kept


# ---------------------------------------------------------------- classes and rendering
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


def class_name(colour: str, shape: str, texture: str) -> str:
    return f"{colour}-{shape}" if texture == "solid" else f"{colour}-{shape}-{texture}"


class SyntheticRenderer:
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
        params, grid, noise = self._draws(indices)
        labels = np.asarray(indices) % self.num_classes
        inside, shaded = self._masks(params, labels)
        # Values below are in grey levels, offset so that adding noise of 0..20 and truncating to
        # uint8 rounds to the nearest level and never leaves 0..255 (which saves a clip).
        offset = 0.5 - 10
        # Colour jitter: brightness and a small per-channel shift; kept in [0.04, 0.96] for the noise.
        bright = (0.8 + 0.3 * params[:, 6])[:, None]
        shift = (params[:, 7:10] - 0.5) * 0.12
        fg = (np.clip(self.colour[labels] * bright + shift, 0.04, 0.96) * 255 + offset)[:, :, None, None]
        dark = (np.clip(self.shade[labels] * bright + shift, 0.04, 0.96) * 255 + offset)[:, :, None, None]
        bg = self._background(grid, params, offset)
        img = np.where(inside[:, None], np.where(shaded[:, None], dark, fg), bg)
        img += noise * np.float32(20 / 255)
        return img.astype(np.uint8)

    def _draws(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-image random numbers: 11 scalars, the background grid and the pixel noise."""
        n, S, g = len(indices), self.side, self.GRID
        params = np.empty((n, 11), np.float32)
        grid = np.empty((n, 3, g, g), np.float32)
        noise = np.empty((n, 3, S, S), np.uint8)
        for j, i in enumerate(indices):
            r = rng(self.seed, self.salt, i)
            params[j] = r.random(11, dtype=np.float32)
            grid[j] = r.random((1, g, g), dtype=np.float32) * 0.3 + r.random((3, g, g), dtype=np.float32) * 0.1
            # Raw generator words as bytes: several times cheaper than integers() on this scale.
            noise[j] = r.bit_generator.random_raw(-(-3 * S * S // 8)).view(np.uint8)[:3 * S * S].reshape(3, S, S)
        return params, grid, noise

    def _masks(self, params: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(inside the shape, inside its texture) per pixel, bool (n, S, S)."""
        n, S = len(labels), self.side
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
        return inside, shaded

    def _background(self, grid: np.ndarray, params: np.ndarray, offset: float) -> np.ndarray:
        """A grey of random level with smooth, low-contrast blotches of colour: float32 (n, 3, S, S).

        The control grid is spread bilinearly (the weights sum to 1, so the level can go on the grid).
        """
        n, S, g = len(grid), self.side, self.GRID
        grid = (grid + (0.05 + 0.3 * params[:, 10])[:, None, None, None]) * 255 + offset
        w = self.frac
        rows = np.empty((n, 3, g, S), np.float32)
        bg = np.empty((n, 3, S, S), np.float32)
        # Interval a of the grid covers the pixels `span` on each axis; slices, not gathers, are cheap.
        for a, span in enumerate(self.spans):
            rows[..., span] = grid[..., a, None] * (1 - w[span]) + grid[..., a + 1, None] * w[span]
        for a, span in enumerate(self.spans):
            bg[:, :, span] = rows[:, :, a, None] * (1 - w[span, None]) + rows[:, :, a + 1, None] * w[span, None]
        return bg


class SyntheticSource(Source):
    """One split of the synthetic set, rendered once into memory when it fits `memory_max` bytes."""

    CHUNK = 8  # images rendered together: vectorised, yet small enough to stay in cache

    def __init__(self, renderer: SyntheticRenderer, size: int, memory_max: int = SYNTH_MEMORY_MAX):
        super().__init__()
        self.renderer, self.side = renderer, renderer.side
        self.labels = np.arange(size, dtype=np.int64) % renderer.num_classes
        self.images = None
        if size * self.side * self.side * 3 <= memory_max:
            self.images = np.empty((size, 3, self.side, self.side), np.uint8)
            for start in range(0, size, self.CHUNK):
                stop = min(size, start + self.CHUNK)
                self.images[start:stop] = renderer.render(np.arange(start, stop))

    def name(self, i: int) -> str:
        return f"synthetic image {i}"

    def _decode(self, i: int) -> torch.Tensor:
        img = self.images[i] if self.images is not None else self.renderer.render(np.array([i]))[0]
        return torch.from_numpy(img)


def synthetic_fingerprint(cfg: Config) -> str:
    """Identity of the synthetic set: everything its images depend on."""
    d = cfg.data
    blob = json.dumps({"version": SYNTH_VERSION, "seed": cfg.train.seed, "classes": cfg.model.num_classes,
                       "side": d.image_size, "train": d.train_size, "val": d.val_size}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]
