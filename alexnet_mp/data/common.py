"""Shared pieces of the data package: the error type, seeded generators, stream salts, read errors."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from PIL import Image


class DataError(ValueError):
    """The data cannot be used as configured; the message names the problem and the fix."""


# Salts keep the streams drawn from one train.seed apart.
SALT_TRAIN, SALT_VAL, SALT_SHUFFLE, SALT_AUGMENT = 1, 2, 3, 4

# What a damaged or foreign file raises while it is read or decoded (RuntimeError: torchvision's
# JPEG decoder).
READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, RuntimeError, struct.error,
               Image.DecompressionBombError)


def rng(*keys: int) -> np.random.Generator:
    """A generator that is a pure function of the keys (negative keys wrap instead of failing)."""
    return np.random.default_rng([int(k) % (1 << 64) for k in keys])


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def unreadable(path: str | Path, err: BaseException) -> str:
    """The one-line error for an image that cannot be read."""
    return (f"cannot read image {path} ({first_line(err)}); replace or delete it, "
            f"or set data.bad_images=skip to skip unreadable images")
