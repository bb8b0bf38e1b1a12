"""The training loop's seams: a Callback sees the trainer at fixed points of a run.

The profiler, the fault-injection tests and the benchmarks hook in here (and through
`transport.LinkObserver`) instead of patching the trainer. Every method is optional and
runs on the training thread; the trainer's attributes (`model`, `net`, `link`,
`optimizer`, `run_path`, `layout`, `cfg`, `state`) are what a callback may read.
"""
from __future__ import annotations


class Callback:
    def on_fit_start(self, trainer) -> None:
        """The model, link, optimizer, DDP wrapper (`net`) and run directory exist; no step has run."""

    def on_batch_wait(self, trainer) -> None:
        """The loop is about to wait for the next batch (the data-wait time starts here)."""

    def on_step_begin(self, trainer, batch) -> None:
        """The batch is in hand; `train_step` follows."""

    def on_step_end(self, trainer) -> None:
        """`train_step` returned: the optimizer step is issued (on CUDA it may still be running)."""

    def on_step_settled(self, trainer, result) -> None:
        """A step's outcome is known on the host (`trainer.StepResult`), one step late."""

    def on_epoch_end(self, trainer, record: dict) -> None:
        """An epoch finished and was evaluated; `record` is its metrics.jsonl line."""

    def on_fit_end(self, trainer, error: BaseException | None) -> None:
        """The run ended (error is None) or is failing; no collectives when error is set."""


class CallbackList(Callback):
    """Calls each callback in turn; callbacks may be added or removed between steps."""

    def __init__(self, callbacks=()):
        self.callbacks = list(callbacks)

    def _each(self, name, *args):
        for cb in list(self.callbacks):
            getattr(cb, name)(*args)

    def on_fit_start(self, trainer):
        self._each("on_fit_start", trainer)

    def on_batch_wait(self, trainer):
        self._each("on_batch_wait", trainer)

    def on_step_begin(self, trainer, batch):
        self._each("on_step_begin", trainer, batch)

    def on_step_end(self, trainer):
        self._each("on_step_end", trainer)

    def on_step_settled(self, trainer, result):
        self._each("on_step_settled", trainer, result)

    def on_epoch_end(self, trainer, record):
        self._each("on_epoch_end", trainer, record)

    def on_fit_end(self, trainer, error):
        self._each("on_fit_end", trainer, error)
