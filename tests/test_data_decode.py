"""Tests for decoding: every image mode PIL opens becomes correct 8-bit RGB or is refused by name."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet_mp.data import decode_bytes, pil_to_rgb
from alexnet_mp.data.decode import UnsupportedImage, resize_crop


def encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png16(arr: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit colour): 0 grey, 2 RGB, 4 grey+alpha, 6 RGBA."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def pixel(data: bytes, side: int = 4) -> list[int]:
    return decode_bytes(data, side)[:, 0, 0].tolist()


def test_sixteen_bit_images_are_scaled_not_clipped():
    grey = np.full((4, 4), 0xABCD, np.uint16)  # 43981 / 65535 * 255 = 171.1
    assert pixel(png16(grey, 0)) == [171, 171, 171]
    rgb = np.zeros((4, 4, 3), np.uint16)
    rgb[...] = (0xABCD, 0x1234, 0xFFFF)
    assert pixel(png16(rgb, 2)) == [171, 18, 255]
    half = np.zeros((4, 4, 4), np.uint16)
    half[...] = (0, 0, 0, 0x8000)  # black at 50% alpha, over white
    assert pixel(png16(half, 6)) == [127, 127, 127]
    ramp = np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369  # 0, 4369, ... 65535
    out = decode_bytes(png16(ramp, 0), 4)[0].flatten().tolist()
    assert out == [17 * k for k in range(16)]


def test_alpha_and_transparency_are_composited_over_white():
    rgba = Image.new("RGBA", (4, 4), (200, 0, 0, 0))
    assert pixel(encoded(rgba, "PNG")) == [255, 255, 255]  # fully transparent: white
    rgba = Image.new("RGBA", (4, 4), (200, 0, 0, 255))
    assert pixel(encoded(rgba, "PNG")) == [200, 0, 0]
    la = Image.new("LA", (4, 4), (0, 51))  # black at alpha 51/255: 255 * (1 - 0.2) = 204
    assert pixel(encoded(la, "PNG")) == [204, 204, 204]
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert pixel(encoded(pal, "PNG")) == [10, 20, 30]
    assert pixel(encoded(pal, "PNG", transparency=1)) == [255, 255, 255]
    assert pixel(encoded(pal, "GIF")) == [10, 20, 30]


def test_other_modes_become_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red in CMYK
    for fmt, side in (("JPEG", 8), ("JPEG", 4), ("TIFF", 8)):  # JPEG: torchvision's decoder, then PIL's draft
        r, g, b = pixel(encoded(cmyk, fmt), side)
        assert r > 240 and g < 15 and b < 15, fmt
    assert pixel(encoded(Image.new("L", (8, 8), 77), "JPEG"), 8) == [77, 77, 77]
    assert pixel(encoded(Image.new("1", (4, 4), 1), "PNG")) == [255, 255, 255]
    assert pixel(encoded(Image.new("L", (4, 4), 90), "PNG")) == [90, 90, 90]
    assert pil_to_rgb(Image.new("HSV", (2, 2), (0, 255, 255)))[0, 0].tolist() == [255, 0, 0]
    assert pil_to_rgb(Image.new("YCbCr", (2, 2), (255, 128, 128)))[0, 0].tolist() == [255, 255, 255]
    assert pil_to_rgb(Image.new("I;16", (2, 2), 65535))[0, 0].tolist() == [255, 255, 255]


def test_modes_without_a_faithful_rgb_form_are_refused_by_name():
    with pytest.raises(UnsupportedImage, match="mode F"):
        decode_bytes(encoded(Image.new("F", (4, 4), 0.5), "TIFF"), 4)
    with pytest.raises(UnsupportedImage, match="mode I .*outside 0..65535"):
        decode_bytes(encoded(Image.new("I", (4, 4), 70000), "TIFF"), 4)
    with pytest.raises(Exception):
        decode_bytes(b"\xff\xd8\xff" + b"\0" * 50, 4)  # a JPEG header and nothing behind it


def test_jpeg_paths_agree_and_do_not_depend_on_threads():
    rng = np.random.default_rng(0)
    arr = np.clip(rng.normal(128, 40, (150, 200, 3)).cumsum(1) / 8 + 64, 0, 255).astype(np.uint8)
    data = encoded(Image.fromarray(arr), "JPEG", quality=90)
    # libjpeg-turbo through torchvision decodes exactly as PIL does; the resize is the same torch op.
    via_pil = resize_crop(torch.from_numpy(pil_to_rgb(Image.open(io.BytesIO(data))).transpose(2, 0, 1).copy()), 64)
    assert torch.equal(decode_bytes(data, 64), via_pil)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(decode_bytes(data, 64))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*outs)
    # Large JPEGs (shorter side >= 2 x side) take PIL's reduced-scale decode: close to the full decode.
    small = decode_bytes(data, 32)
    full = resize_crop(torch.from_numpy(pil_to_rgb(Image.open(io.BytesIO(data))).transpose(2, 0, 1).copy()), 32)
    assert small.shape == (3, 32, 32) and (small.float() - full.float()).abs().mean() < 4
