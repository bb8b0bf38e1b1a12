"""From a loader's batch to the model's input on the device, in one place for training and evaluation.

The loader hands over uint8 crops (only the rows this column decoded) and the batch's
metadata. Here they are copied to the device (on CUDA from pinned memory on a side stream,
while the previous step runs), the two columns swap their decoded halves over the pair's
link (so each image is decoded once per pair), and the `Normalizer` turns uint8 into the
model's float input (mean subtraction, PCA lighting, scaling) on the device.
"""
from __future__ import annotations

import torch

from ..data import Batch, DeviceDecoder, Normalizer


class InputPipeline:
    def __init__(self, bundle, cfg, layout, link):
        self.device, self.link = layout.device, link
        side, crop = bundle.side, cfg.model.crop_size
        self.normalizer = Normalizer(bundle.stats, cfg.data.normalize, side, crop).to(self.device)
        self.decoder = DeviceDecoder(side, crop, self.device) if cfg.data.decode == "device" else None
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def prefetch(self, batch: Batch) -> Batch:
        """The batch's tensors on the device; on CUDA the copy is issued on a side stream and returns at once."""
        if self.stream is None:
            return batch
        with torch.cuda.stream(self.stream):
            images = batch.images if self.decoder is not None else batch.images.to(self.device, non_blocking=True)
            return batch._replace(images=images, labels=batch.labels.to(self.device, non_blocking=True),
                                  offsets=batch.offsets.to(self.device, non_blocking=True),
                                  flips=batch.flips.to(self.device, non_blocking=True),
                                  light=batch.light.to(self.device, non_blocking=True))

    def _ready(self, batch: Batch) -> Batch:
        """Make the compute stream wait for the side stream's copy, and keep the memory alive for it."""
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for t in (batch.labels, batch.offsets, batch.flips, batch.light,
                      *(() if self.decoder is not None else (batch.images,))):
                t.record_stream(current)
        return batch

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(float model input of the whole batch, labels), both on the device."""
        if batch.labels.device != self.device:  # not prefetched (evaluation): copy now
            batch = self.prefetch(batch)
        batch = self._ready(batch)
        own = batch.images
        if self.decoder is not None:
            own = self.decoder(own, *self._own_meta(batch))
        full = self._swap_halves(own, batch) if self.link is not None else own
        offsets, flips, light = batch.offsets, batch.flips, batch.light
        if full.dim() == 5:  # ten crops: every view is an image of its own
            views = full.shape[1]
            full, offsets, flips = full.flatten(0, 1), offsets.flatten(0, 1), flips.flatten(0, 1)
            light = light.repeat_interleave(views, dim=0)
        return self.normalizer(full, offsets, flips, light), batch.labels

    @staticmethod
    def _own_meta(batch: Batch):
        rows = slice(batch.first, batch.first + len(batch.images))
        return batch.offsets[rows], batch.flips[rows]

    def _swap_halves(self, own: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The whole batch's uint8 crops: this column's rows and the peer's, in batch order."""
        total = len(batch.labels)
        peer_rows = total - len(own)
        peer_shape = (peer_rows, *own.shape[1:])
        pending = self.link.start(own if len(own) else None, peer_shape if peer_rows else None, own,
                                  "input", "forward")
        peer = pending.wait()
        if peer is None:
            return own
        return torch.cat([own, peer] if self.link.column == 0 else [peer, own])
