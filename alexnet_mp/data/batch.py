"""One batch as the loaders deliver it, and how it is put together from a source.

A batch covers B samples (this data-parallel replica's share of a step). Its metadata (labels, crop
offsets, flips, lighting) covers all B rows and costs no decoding; its images are only the rows
this column decodes (own_rows): with two model-parallel columns each decodes half of every batch,
and the columns exchange the uint8 crops on the device, so every image is decoded once per pair.
"""
from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np
import torch

from .augment import Augment, crops


class Batch(NamedTuple):
    # uint8 (n_own, 3, c, c); ten-crop (n_own, 10, 3, c, c): the rows own_rows() gives this column.
    # With data.decode=device: a list of 1-D uint8 tensors, the JPEG bytes of those rows.
    images: torch.Tensor | list
    labels: torch.Tensor  # int64 (B,): every row
    offsets: torch.Tensor  # int64 (B, 2): (y, x) of each crop in the stored image; ten-crop (B, 10, 2)
    flips: torch.Tensor  # bool (B,); ten-crop (B, 10)
    light: torch.Tensor  # float32 (B, 3): PCA lighting to add, [0, 1] pixel units (zeros when off / eval)
    first: int  # row of this column's first image in the batch
    unreadable: tuple  # images of this column replaced because they could not be read (bad_images=skip)


def own_rows(batch_size: int, column: int, columns: int) -> tuple[int, int]:
    """[start, end) of the rows a column decodes: columns=1 -> all; 2 -> column 0 the first ceil(B/2)."""
    if not (columns >= 1 and 0 <= column < columns):
        raise ValueError(f"column={column} must lie in [0, columns={columns})")
    base, extra = divmod(batch_size, columns)
    start = column * base + min(column, extra)
    return start, start + base + (column < extra)


class Request(NamedTuple):
    """What one batch holds: a split, a kind ("train", "centre" or "ten"), an epoch, sample indices."""
    split: str
    kind: str
    epoch: int
    indices: np.ndarray


class BatchMaker(torch.utils.data.Dataset):
    """Turns a Request into a Batch (in a loader worker, or in the process itself)."""

    def __init__(self, sources: dict, augment: Augment, column: int, columns: int, raw: bool = False):
        own_rows(1, column, columns)  # checks the column
        self.sources, self.augment = sources, augment
        self.column, self.columns, self.raw = column, columns, raw

    def __getitem__(self, req: Request) -> Batch:
        source, n = self.sources[req.split], len(req.indices)
        if req.kind == "train":
            offsets, flips, light = self.augment.train(req.epoch, req.indices)
        elif req.kind == "centre":
            offsets, flips, light = self.augment.centre(n)
        else:
            offsets, flips, light = self.augment.ten(n)
        start, stop = own_rows(n, self.column, self.columns)
        own = [int(i) for i in req.indices[start:stop]]
        labels = torch.from_numpy(np.ascontiguousarray(source.labels[req.indices], dtype=np.int64))
        if self.raw:
            return Batch([source.record(i) for i in own], labels, offsets, flips, light, start, ())
        shape = (0, 10, 3) if req.kind == "ten" else (0, 3)
        images, replaced = [], []
        for k, i in zip(range(start, stop), own):
            img, skipped = source.image(i)
            images.append(crops(img, offsets[k], flips[k], self.augment.crop))
            replaced.extend(skipped)
        c = self.augment.crop
        out = torch.stack(images) if images else torch.empty(*shape, c, c, dtype=torch.uint8)
        return Batch(out, labels, offsets, flips, light, start, tuple(replaced))


def batch_checksum(*tensors) -> str:
    """sha1 of the shapes, dtypes and bytes of tensors (lists and tuples of them are walked)."""
    h = hashlib.sha1()

    def add(t) -> None:
        if isinstance(t, (list, tuple)):
            h.update(f"seq{len(t)}".encode())
            for item in t:
                add(item)
            return
        t = torch.as_tensor(t)
        h.update(repr((str(t.dtype), tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())

    for t in tensors:
        add(t)
    return h.hexdigest()
