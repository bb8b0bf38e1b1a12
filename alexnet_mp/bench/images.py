"""Photo-like JPEGs for the loader benchmark: real-size (500 x 375), with smooth regions and edges.

Each image is a smooth colour field (a bicubically enlarged 4 x 5 grid) with filled ellipses and
polygons, softened, under a vertical shading, with a 1/f ("pink") texture that is
stronger inside the shapes, plus mild sensor noise, saved at JPEG quality 90. Such images
compress and decode like photographs (a few tens of KB), unlike white noise, which makes
JPEG decoding several times slower than on real photographs.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

WIDTH, HEIGHT = 500, 375
QUALITY = 90
_TEXTURES = 4  # pink-noise fields shared by all images, cut at random places


def pink_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A (height, width) field with a 1/f spectrum, unit standard deviation."""
    spectrum = np.fft.rfft2(rng.normal(size=(height, width)))
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    spectrum /= np.maximum(np.hypot(fy, fx), 1.0 / max(height, width)) ** 0.9
    field = np.fft.irfft2(spectrum, s=(height, width))
    return (field / field.std()).astype(np.float32)


class PhotoMaker:
    """photo(i) -> JPEG bytes of image i, a pure function of (seed, i)."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.seed = seed
        self.textures = [pink_noise(rng, 2 * HEIGHT, 2 * WIDTH) for _ in range(_TEXTURES)]
        self.grain = rng.normal(0, 2, size=(2 * HEIGHT, 2 * WIDTH, 3)).astype(np.float32)  # sensor noise

    def _shapes(self, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
        grid = rng.uniform(0, 255, size=(4, 5, 3)).astype(np.uint8)
        image = Image.fromarray(grid, "RGB").resize((WIDTH, HEIGHT), Image.BICUBIC)
        mask = Image.new("L", (WIDTH, HEIGHT), 0)
        draw, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
        for _ in range(int(rng.integers(4, 9))):
            x0, y0 = rng.uniform(-50, WIDTH), rng.uniform(-50, HEIGHT)
            colour = tuple(int(c) for c in rng.uniform(0, 255, 3))
            strength = int(rng.integers(60, 255))
            if rng.random() < 0.5:
                box = [x0, y0, x0 + rng.uniform(40, 250), y0 + rng.uniform(40, 200)]
                draw.ellipse(box, fill=colour)
                draw_mask.ellipse(box, fill=strength)
            else:
                points = [(float(x0 + rng.uniform(0, 200)), float(y0 + rng.uniform(0, 200)))
                          for _ in range(int(rng.integers(3, 6)))]
                draw.polygon(points, fill=colour)
                draw_mask.polygon(points, fill=strength)
        return image.filter(ImageFilter.SMOOTH), mask  # softened edges, as a lens leaves them

    def photo(self, i: int) -> bytes:
        rng = np.random.default_rng([self.seed, i])
        image, mask = self._shapes(rng)
        pixels = np.asarray(image, dtype=np.float32)
        rows = np.linspace(-1, 1, HEIGHT, dtype=np.float32)[:, None, None]
        pixels *= 0.8 + 0.2 * np.cos(rows * rng.uniform(1, 3) + rng.uniform(0, 6))  # shading
        texture = self.textures[int(rng.integers(_TEXTURES))]
        y, x = int(rng.integers(HEIGHT)), int(rng.integers(WIDTH))
        strength = 8 + 22 * np.asarray(mask, dtype=np.float32)[..., None] / 255
        pixels += strength * texture[y:y + HEIGHT, x:x + WIDTH, None] * rng.uniform(0.6, 1.0, 3).astype(np.float32)
        y, x = int(rng.integers(HEIGHT)), int(rng.integers(WIDTH))
        pixels += self.grain[y:y + HEIGHT, x:x + WIDTH]
        out = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=QUALITY)
        return out.getvalue()


def write_folder(root: Path, classes: int, train_per_class: int, val_per_class: int, seed: int = 0,
                 progress=None) -> int:
    """An ImageNet-layout folder (root/train/<class>/*.JPEG, root/val/<class>/*.JPEG); the image count."""
    maker, count = PhotoMaker(seed), 0
    total = classes * (train_per_class + val_per_class)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"class{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                (folder / f"{split}_{c:03d}_{k:05d}.JPEG").write_bytes(maker.photo(count))
                count += 1
                if progress:
                    progress(count, total)
    return count
