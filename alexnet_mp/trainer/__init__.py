"""The training loop: `Trainer` and its seams (`Callback`)."""
from ..callbacks import Callback, CallbackList
from .guard import StepResult
from .trainer import NonFiniteError, Trainer, TrainState

__all__ = ["Callback", "CallbackList", "NonFiniteError", "StepResult", "Trainer", "TrainState"]
