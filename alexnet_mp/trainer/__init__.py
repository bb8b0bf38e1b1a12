"""The training loop: `Trainer` and its seams (`Callback`)."""
from ..callbacks import Callback, CallbackList  # noqa: F401
from .guard import StepResult  # noqa: F401
from .trainer import NonFiniteError, Trainer, TrainState  # noqa: F401
