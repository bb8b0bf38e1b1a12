"""The built-in synthetic set: image i of a split is a pure function of (train.seed, split, i).

A class is a (colour, shape, texture) triple, drawn as the largest object of the image. Each image
varies its pose (position, size, any rotation) and colour, and adds clutter: smaller distractor
shapes of any colour and shape, sometimes a bar across the object, a blotchy striped background and
pixel noise (`SyntheticRenderer`). Splits that fit SYNTH_MEMORY_MAX are rendered once into memory,
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

SYNTH_VERSION = 3  # bump when the synthetic images change, so fingerprints change with them
SYNTH_MEMORY_MAX = 1 << 30  # bytes: larger synthetic splits are rendered on access, not kept
DISTRACTORS = 2  # smaller shapes behind the object of each image
# The uniform [0, 1) numbers drawn per image, by name and count, in the order they are drawn.
_DRAWS = (("pose", 4), ("size", 1), ("phase", 2), ("jitter", 5), ("background", 4),
          ("distractors", 7 * DISTRACTORS), ("occluder", 6))
_DRAW_COUNT = sum(width for _, width in _DRAWS)


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


def _fields(params: np.ndarray) -> dict[str, np.ndarray]:
    """The per-image draws by name: (n, width) slices of the params rows, shaped to broadcast over
    pixels, i.e. (n, width, 1, 1)."""
    out, at = {}, 0
    for name, width in _DRAWS:
        out[name] = params[:, at:at + width, None, None]
        at += width
    return out


def _rotation(turn: np.ndarray, half_turn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) of any angle without sin/cos: tan(angle / 2) = 2 * turn - 1 covers -90..90
    degrees, and half_turn >= 0.5 adds 180."""
    t = 2 * turn - 1
    sign = np.where(half_turn < 0.5, np.float32(1), np.float32(-1))
    return sign * (1 - t * t) / (1 + t * t), sign * 2 * t / (1 + t * t)


def _shape_masks(shape_ids: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside shape shape_ids[j] at shape coordinates (u[j], v[j]): bool (n, S, S)."""
    inside = np.zeros(u.shape, bool)
    for k, fn in enumerate(_SHAPES.values()):
        sel = shape_ids == k
        if sel.any():
            inside[sel] = fn(u[sel], v[sel])
    return inside


def _grey_levels(colour: np.ndarray, offset: float) -> np.ndarray:
    """[0, 1] colours (n, 3) as grey levels (n, 3, 1, 1), kept where the pixel noise cannot overflow."""
    return (np.clip(colour, 0.04, 0.96) * 255 + offset)[:, :, None, None].astype(np.float32)


class SyntheticRenderer:
    """Draws image i of a split as a pure function of (seed, split salt, i).

    The class is the largest object: its colour, shape and texture. Everything else varies per
    image: the object's position, size (radius 0.17 to 0.3 of the side) and rotation (any angle);
    its colour's brightness, tint and washing out; a blotchy background of random level with faint
    stripes; DISTRACTORS smaller shapes of any palette colour and shape, behind the object; in
    about a third of the images a bar of random grey across the object; pixel noise.
    """

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
        self.palette = np.array(list(_COLOURS.values()), dtype=np.float32)
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
        p, labels = _fields(params), np.asarray(indices) % self.num_classes
        # Values below are in grey levels, offset so that adding noise of 0..20 and truncating to
        # uint8 rounds to the nearest level and never leaves 0..255 (which saves a clip).
        offset = 0.5 - 10
        img = self._background(grid, p, offset)
        for d in range(DISTRACTORS):
            self._distractor(img, p["distractors"][:, 7 * d:7 * d + 7], p["size"], offset)
        inside, shaded = self._object(p, labels)
        fg, dark = (_grey_levels(self._jitter(c[labels], p["jitter"][:, :, 0, 0]), offset)
                    for c in (self.colour, self.shade))
        img = np.where(inside[:, None], np.where(shaded[:, None], dark, fg), img)
        img = self._occlude(img, p["occluder"], offset)
        img += noise * np.float32(20 / 255)
        return img.astype(np.uint8)

    def _draws(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-image random numbers: the _DRAWS scalars, the background grid and the pixel noise."""
        n, S, g = len(indices), self.side, self.GRID
        params = np.empty((n, _DRAW_COUNT), np.float32)
        grid = np.empty((n, 3, g, g), np.float32)
        noise = np.empty((n, 3, S, S), np.uint8)
        for j, i in enumerate(indices):
            r = rng(self.seed, self.salt, i)
            params[j] = r.random(_DRAW_COUNT, dtype=np.float32)
            grid[j] = r.random((1, g, g), dtype=np.float32) * 0.3 + r.random((3, g, g), dtype=np.float32) * 0.1
            # Raw generator words as bytes: several times cheaper than integers() on this scale.
            noise[j] = r.bit_generator.random_raw(-(-3 * S * S // 8)).view(np.uint8)[:3 * S * S].reshape(3, S, S)
        return params, grid, noise

    def _frame(self, x, y, radius, turn, half_turn) -> tuple[np.ndarray, np.ndarray]:
        """Every pixel in a shape's coordinates: units of its radius, rotated with it; (n, S, S) each."""
        cos, sin = _rotation(turn, half_turn)
        dx = self.coords[None, None, :] - x * self.side
        dy = self.coords[None, :, None] - y * self.side
        return (cos * dx + sin * dy) / radius, (cos * dy - sin * dx) / radius

    def _radius(self, p: dict) -> np.ndarray:
        return self.side * (0.17 + 0.13 * p["size"])  # the object's radius, (n, 1, 1, 1)

    def _object(self, p: dict, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(inside the object, inside its texture) per pixel, bool (n, S, S)."""
        q = p["pose"][:, :, 0]  # (n, 4, 1): x, y, turn, half turn
        u, v = self._frame(0.3 + 0.4 * q[:, 0:1], 0.3 + 0.4 * q[:, 1:2], self._radius(p)[:, 0],
                           q[:, 2:3], q[:, 3:4])
        inside = _shape_masks(self.shape_id[labels], u, v)
        shaded = np.zeros(inside.shape, bool)
        textures, phase = self.texture_id[labels], p["phase"][:, :, 0]
        for k, fn in enumerate(_TEXTURES.values()):
            sel = textures == k
            if fn is not None and sel.any():
                shaded[sel] = fn(u[sel] + 0.5 * phase[sel, 0:1], v[sel] + 0.5 * phase[sel, 1:2])
        return inside, shaded

    @staticmethod
    def _jitter(colour: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Brightness 0.7-1.15, a tint of up to 0.1 per channel, washed out towards grey by up to 35%."""
        lit = colour * (0.7 + 0.45 * j[:, 0:1]) + (j[:, 1:4] - 0.5) * 0.2
        wash = 0.35 * j[:, 4:5]
        return lit * (1 - wash) + 0.5 * wash

    def _distractor(self, img: np.ndarray, q: np.ndarray, size: np.ndarray, offset: float) -> None:
        """Paint one smaller shape (0.25-0.45 of the object's radius, the larger the brighter) of a
        random palette colour and shape anywhere in the image, in place."""
        q = q[:, :, 0]  # (n, 7, 1): x, y, size, turn, half turn, shape, colour
        radius = self._radius({"size": size})[:, 0] * (0.25 + 0.2 * q[:, 2:3])
        shapes = np.minimum((q[:, 5, 0] * len(_SHAPES)).astype(np.intp), len(_SHAPES) - 1)
        colours = np.minimum((q[:, 6, 0] * len(_COLOURS)).astype(np.intp), len(_COLOURS) - 1)
        u, v = self._frame(0.1 + 0.8 * q[:, 0:1], 0.1 + 0.8 * q[:, 1:2], radius, q[:, 3:4], q[:, 4:5])
        inside = _shape_masks(shapes, u, v)
        np.copyto(img, _grey_levels(self.palette[colours] * (0.7 + 0.45 * q[:, 2]), offset), where=inside[:, None])

    def _occlude(self, img: np.ndarray, q: np.ndarray, offset: float) -> np.ndarray:
        """In 35% of the images, a bar 5-14% of the side wide and of a random grey, through the
        middle region at any angle."""
        q = q[:, :, 0]  # (n, 6, 1): present, x, y, angle, width, grey
        cos, sin = _rotation(q[:, 3:4], np.zeros_like(q[:, 3:4]))  # a bar turned by 180 degrees is the same bar
        dx = self.coords[None, None, :] - (0.3 + 0.4 * q[:, 1:2]) * self.side
        dy = self.coords[None, :, None] - (0.3 + 0.4 * q[:, 2:3]) * self.side
        bar = np.abs(cos * dy - sin * dx) < self.side * (0.025 + 0.045 * q[:, 4:5])
        bar &= q[:, 0:1] < 0.35
        grey = (np.clip(0.1 + 0.8 * q[:, 5, 0], 0.04, 0.96) * 255 + offset)[:, None, None, None]
        return np.where(bar[:, None], grey.astype(np.float32), img)

    def _background(self, grid: np.ndarray, p: dict, offset: float) -> np.ndarray:
        """A grey of random level with smooth blotches of colour and faint stripes at any angle:
        float32 (n, 3, S, S) grey levels.

        The control grid is spread bilinearly (the weights sum to 1, so the level can go on the grid).
        """
        n, S, g = len(grid), self.side, self.GRID
        b = p["background"]  # (n, 4, 1, 1): level, stripe angle, stripe period, stripe contrast
        grid = (grid + 0.05 + 0.45 * b[:, 0:1]) * 255 + offset
        w = self.frac
        rows = np.empty((n, 3, g, S), np.float32)
        bg = np.empty((n, 3, S, S), np.float32)
        # Interval a of the grid covers the pixels `span` on each axis; slices, not gathers, are cheap.
        for a, span in enumerate(self.spans):
            rows[..., span] = grid[..., a, None] * (1 - w[span]) + grid[..., a + 1, None] * w[span]
        for a, span in enumerate(self.spans):
            bg[:, :, span] = rows[:, :, a, None] * (1 - w[span, None]) + rows[:, :, a + 1, None] * w[span, None]
        cos, sin = _rotation(b[:, 1], np.zeros_like(b[:, 1]))
        along = (cos * self.coords[None, None, :] + sin * self.coords[None, :, None]) / (S * (0.08 + 0.12 * b[:, 2]))
        stripes = (np.abs(along - np.floor(along) - 0.5) - 0.25) * (255 * 0.2 * b[:, 3])  # +-13 levels at most
        return np.clip(bg + stripes[:, None], 0.04 * 255 + offset, 0.96 * 255 + offset)


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
