"""What every split of a data set offers the loaders: labels, stored images, a decode counter.

A source holds images of one stored side S and hands out uint8 (3, S, S) tensors. Labels are kept
as one array, so a batch's labels cost nothing to look up, in any process, without decoding.

Unreadable images (bad_images=skip) are replaced by the next readable image OF THE SAME CLASS
(wrapping within the class), so a row's label never depends on whether its image could be read: a
column that does not decode a row still knows its label. The replacement is the same in every
process.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.utils.data

from .common import READ_ERRORS, DataError, first_line, unreadable

_COUNTER_SLOTS = 256  # one per loader worker (and one for the process itself): no two writers share a slot


class DecodeCounter:
    """Images decoded by this process and its loader workers, kept in shared memory."""

    def __init__(self):
        self.slots = torch.zeros(_COUNTER_SLOTS, dtype=torch.int64).share_memory_()

    def add(self, n: int = 1) -> None:
        info = torch.utils.data.get_worker_info()
        self.slots[0 if info is None else 1 + info.id % (_COUNTER_SLOTS - 1)] += n

    @property
    def total(self) -> int:
        return int(self.slots.sum())


class Source:
    """Base of a split: subclasses set `side`, `labels` (int64) and `bad_images`, and define _decode."""

    side: int
    labels: np.ndarray
    bad_images: str = "error"

    def __init__(self):
        self.counter = DecodeCounter()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def decodes(self) -> int:
        """Images decoded so far by this process and its loader workers."""
        return self.counter.total

    def name(self, i: int) -> str:
        """Where image i comes from, for messages."""
        return f"image {i}"

    def unreadable(self, i: int, err: BaseException) -> str:
        """The one-line error for image i failing with err (bad_images=error)."""
        return unreadable(self.name(i), err)

    def _decode(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def image(self, i: int) -> tuple[torch.Tensor, tuple[str, ...]]:
        """(uint8 (3, S, S) image for index i, names of unreadable images replaced on the way)."""
        skipped, first = [], None
        for j in self._candidates(i):
            self.counter.add()
            try:
                return self._decode(j), tuple(skipped)
            except READ_ERRORS as e:
                if self.bad_images == "error":
                    raise DataError(self.unreadable(j, e)) from None
                skipped.append(self.name(j))
                first = first or f"{self.name(j)}: {first_line(e)}"
        raise DataError(f"no image of class {int(self.labels[i])} can be read ({first}); "
                        f"replace the class's files or remove the class")

    def _candidates(self, i: int):
        # i, then the rest of i's class in index order, wrapping.
        yield i
        same = np.flatnonzero(self.labels == self.labels[i])
        k = int(np.searchsorted(same, i))
        yield from same[k + 1:].tolist()
        yield from same[:k].tolist()
