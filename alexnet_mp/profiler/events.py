"""The marks of one training step, taken by hooks on the model and optimizer and by a link observer.

An event is ``[kind, name, start mark, end mark]`` on the profiler's clock:

* data: the wait for the batch (marked by the caller, `open`);
* forward per layer: from the layer's forward pre-hook to the next mark, so a
  layer's stage includes the ReLU, LRN, pooling and dropout that follow it;
* loss: from the end of the forward to the first gradient of the output;
* backward per layer: from the previous mark (the previous layer's last
  gradient, or the end of an exchange) to the accumulation of the layer's last
  parameter gradient;
* comm: the time blocked in each exchange's wait (``conv3.forward``, ...);
* optimizer: ``optimizer.step()``, through its step hooks.
"""
from __future__ import annotations

import torch

from ..model import LAYERS
from ..transport import LinkObserver


class StepEvents(LinkObserver):
    """The open step's events. Every hook returns at once outside a step (`open` to `close`)."""

    def __init__(self, clock, tracing: bool = False):
        self.clock, self.tracing = clock, tracing
        self.events: list | None = None
        self.model, self.link = None, None
        self._undo: list = []
        self._wait = None  # (begin mark, interrupted forward stage, trace label) while an exchange is waited on

    # --- wiring

    def install(self, model: torch.nn.Module, link, optimizer) -> None:
        """Hook into the layers of `model` (any wrapper around them is fine), its output, `optimizer`
        and, when there is one, the `link` (as a LinkObserver)."""
        self.model, self.link = model, link
        for name, module in model.named_modules():
            layer = name.rsplit(".", 1)[-1]
            if layer in LAYERS:
                self._undo.append(module.register_forward_pre_hook(
                    lambda m, args, layer=layer: self._forward_stage(layer)).remove)
                for param in module.parameters():
                    self._undo.append(param.register_post_accumulate_grad_hook(
                        lambda p, layer=layer: self._backward_mark(layer)).remove)
        self._undo.append(model.register_forward_hook(lambda m, args, out: self._forward_end(out)).remove)
        self._undo.append(optimizer.register_step_pre_hook(lambda *a: self._optimizer_mark(start=True)).remove)
        self._undo.append(optimizer.register_step_post_hook(lambda *a: self._optimizer_mark(start=False)).remove)
        if link is not None:
            link.add_observer(self)
            self._undo.append(lambda: link.remove_observer(self))

    def remove(self) -> None:
        """Take every hook and the observer out again; an open step is dropped."""
        self.close()
        for undo in self._undo:
            undo()
        self._undo = []

    # --- the step

    def open(self, wait_start) -> None:
        """Start a step whose data wait began at `wait_start` and ends now."""
        self.close()
        self.events = [["data", "data", wait_start, self.clock.now()]]
        self.open_stage, self.cursor, self.forward_done = None, None, None

    def close(self) -> list | None:
        """End the step; its events (None when no step was open)."""
        self._end_label()
        events, self.events = self.events, None
        return events

    def _end_label(self) -> None:
        # A wait that never ended (its exchange failed) leaves its trace label open.
        if self._wait is not None and self._wait[2] is not None:
            self._wait[2].__exit__(None, None, None)
        self._wait = None

    # --- model and optimizer hooks

    def _close_stage(self, mark) -> None:
        if self.open_stage is not None:
            self.open_stage[3] = mark
            self.open_stage = None

    def _forward_stage(self, layer: str) -> None:
        if self.events is not None:
            mark = self.clock.now()
            self._close_stage(mark)
            self.open_stage = ["forward", layer, mark, None]
            self.events.append(self.open_stage)

    def _forward_end(self, output) -> None:
        if self.events is not None:
            self.forward_done = self.clock.now()
            self._close_stage(self.forward_done)
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(self._backward_begin)

    def _backward_begin(self, grad) -> None:
        if self.events is not None and self.forward_done is not None:
            self.cursor = self.clock.now()
            self.events.append(["loss", "loss", self.forward_done, self.cursor])

    def _backward_mark(self, layer: str) -> None:
        if self.events is not None:
            mark = self.clock.now()
            last = self.events[-1]
            if last[0] == "backward" and last[1] == layer:  # the layer's next parameter
                last[3] = mark
            else:
                self.events.append(["backward", layer, self.cursor if self.cursor is not None else mark, mark])
            self.cursor = mark

    def _optimizer_mark(self, start: bool) -> None:
        if self.events is not None:
            if start:
                self.events.append(["optimizer", "optimizer", self.clock.now(), None])
            elif self.events[-1][0] == "optimizer":
                self.events[-1][3] = self.clock.now()

    # --- the link (LinkObserver)

    def wait_begin(self, exchange) -> None:
        """Close the forward stage the wait interrupts; in backward, the crossing layer's work
        before its wait counts as that layer's backward."""
        if self.events is None:
            return
        begin = self.clock.now()
        interrupted = self.open_stage
        self._close_stage(begin)
        if (interrupted is None and self.cursor is not None and exchange.phase == "backward"
                and hasattr(self.model, exchange.crossing)):
            self.events.append(["backward", exchange.crossing, self.cursor, begin])
        label = None
        if self.tracing:
            label = torch.profiler.record_function(f"exchange:{exchange.key}")
            label.__enter__()
        self._wait = (begin, interrupted, label)

    def wait_end(self, exchange) -> None:
        """The wait is a comm event; a forward stage it interrupted resumes after it (an overlapped
        crossing layer computes on both sides of its wait)."""
        if self.events is None or self._wait is None:
            return
        begin, interrupted = self._wait[:2]
        self._end_label()
        self.cursor = self.clock.now()
        self.events.append(["comm", exchange.key, begin, self.cursor])
        if interrupted is not None:
            self.open_stage = [interrupted[0], interrupted[1], self.cursor, None]
            self.events.append(self.open_stage)
