"""Decoding one image file into the stored form: uint8 RGB, 3 x side x side.

JPEGs are decoded with torchvision.io.decode_jpeg (libjpeg-turbo); large ones (shorter side at
least twice the target) with PIL's draft mode, which decodes at a reduced DCT scale and is several
times faster there. Everything else goes through PIL, and every mode PIL opens becomes 8-bit RGB:
16-bit samples are scaled to 8 bits (not clipped), alpha and transparency are composited over white,
palettes, CMYK, greyscale, bilevel, YCbCr, LAB and HSV are converted. Floating-point images and
32-bit integers beyond the 16-bit range are refused by name (their range is unknown). EXIF
orientation is not applied (as in ImageNet's usual pipelines).

The shorter side is then scaled to `side` (bilinear, antialiased, torch ops on uint8) and the centre
side x side kept. Every step is deterministic: the same bytes give the same image in every process,
whatever its thread count.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

DECODER_VERSION = 1  # bump when decoded pixels change, so caches keyed on it are recomputed
_JPEG_MAGIC = b"\xff\xd8\xff"
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class UnsupportedImage(ValueError):
    """A file that opens as an image whose pixels cannot be turned into RGB faithfully."""


def is_jpeg(data: bytes) -> bool:
    return data[:3] == _JPEG_MAGIC


def _composite_white(rgba: np.ndarray) -> np.ndarray:
    # Rounded integer blend over white: c * a + 255 * (1 - a), alpha in 0..255.
    c, a = rgba[..., :3].astype(np.uint32), rgba[..., 3:].astype(np.uint32)
    return ((c * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def pil_to_rgb(im: Image.Image) -> np.ndarray:
    """uint8 H x W x 3 from an image of any mode PIL opens, or UnsupportedImage naming the mode."""
    mode = im.mode
    if mode in _SIXTEEN_BIT:
        a = np.asarray(im)
        if a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise UnsupportedImage(f"image mode {mode} holds values outside 0..65535; convert it to 8-bit RGB")
        grey = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # 16 to 8 bits, rounded
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "F":
        raise UnsupportedImage("image mode F (floating point) has no fixed range; convert it to 8-bit RGB")
    if mode == "La":
        im, mode = im.convert("LA"), "LA"
    transparent = "transparency" in im.info and mode in ("P", "L", "RGB", "1")
    try:
        if mode in ("RGBA", "LA", "PA", "RGBa") or transparent:
            return _composite_white(np.asarray(im.convert("RGBA")))
        return np.asarray(im.convert("RGB"))
    except (ValueError, OSError) as e:
        raise UnsupportedImage(f"image mode {mode} cannot be converted to RGB ({e}); convert it to RGB") from None


def _decode_pil(data: bytes, side: int) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG":
            im.draft("RGB", (side, side))  # DCT scaling: decode at the smallest scale still >= side
        rgb = pil_to_rgb(im)
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def _jpeg_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:  # reads the header only
        return im.size


def resize_crop(img: torch.Tensor, side: int) -> torch.Tensor:
    """Shorter side to `side` (bilinear, antialiased), then the centre side x side: uint8 (3, side, side)."""
    h, w = img.shape[-2:]
    if min(h, w) != side:
        img = TF.resize(img, side, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    if img.shape[-2:] != (side, side):
        img = TF.center_crop(img, [side, side])
    return img.contiguous()


def decode_bytes(data: bytes, side: int) -> torch.Tensor:
    """The stored image (uint8 (3, side, side)) of an encoded file's bytes; raises on bad data."""
    if is_jpeg(data) and min(_jpeg_size(data)) < 2 * side:
        try:
            img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            img = _decode_pil(data, side)  # what libjpeg-turbo refuses here, PIL may still read
    else:
        img = _decode_pil(data, side)
    if img.shape[0] != 3 or min(img.shape[1:]) < 1:
        raise UnsupportedImage(f"decoded to shape {tuple(img.shape)}, not an RGB image")
    return resize_crop(img, side)


def decode_file(path: str | Path, side: int) -> torch.Tensor:
    """decode_bytes of a file's contents."""
    with open(path, "rb") as f:
        return decode_bytes(f.read(), side)
