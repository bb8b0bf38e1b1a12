"""Learning-rate schedules: the original run's steps, or divide-by-10 on a plateau."""
from __future__ import annotations

from .config import TrainConfig


def scaled_milestones(cfg: TrainConfig) -> list[int]:
    """Milestones given for `milestone_epochs` epochs, stretched to `cfg.epochs`.

    The original run divided at 25, 51 and 79 of 90 epochs; a 9-epoch run divides
    at round(25 * 9 / 90) = 2 (rounded), 5 and 8, keeping the same proportions.
    """
    out = []
    for m in cfg.lr_milestones:
        epoch = max(1, round(m * cfg.epochs / cfg.milestone_epochs))
        if epoch < cfg.epochs and epoch not in out:
            out.append(epoch)
    return out


class LRSchedule:
    """The learning rate for each epoch; its state travels in checkpoints."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.drops = 0  # times the rate was divided by 10 (plateau mode)
        self.best_loss = float("inf")
        self.bad_epochs = 0

    def lr(self, epoch: int) -> float:
        if self.cfg.schedule == "step":
            drops = sum(1 for m in scaled_milestones(self.cfg) if epoch >= m)
        else:
            drops = self.drops
        return self.cfg.lr * 0.1 ** drops

    def observe(self, val_loss: float) -> None:
        """Feed the epoch's validation loss (plateau mode divides when it stalls)."""
        if val_loss < self.best_loss:
            self.best_loss, self.bad_epochs = val_loss, 0
        else:
            self.bad_epochs += 1
            if self.cfg.schedule == "plateau" and self.bad_epochs >= self.cfg.plateau_patience:
                self.drops, self.bad_epochs = self.drops + 1, 0

    def state_dict(self) -> dict:
        return {"drops": self.drops, "best_loss": self.best_loss, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.drops, self.best_loss, self.bad_epochs = state["drops"], state["best_loss"], state["bad_epochs"]
