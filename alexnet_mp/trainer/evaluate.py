"""Evaluation: centre crops, or the paper's ten crops (the softmax averaged over the views)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distributed import sum_over_replicas


def batch_sums(logits: torch.Tensor, labels: torch.Tensor, views: int = 1) -> torch.Tensor:
    """(loss x images, top-1 hits, top-5 hits) of one batch on the device; `views` crops per image
    (rows image-major) have their probabilities averaged first."""
    probs = F.softmax(logits, dim=1)
    if views > 1:
        probs = probs.view(-1, views, probs.shape[1]).mean(1)
    top5 = probs.topk(min(5, probs.shape[1]), dim=1).indices
    return torch.stack([F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum").double(),
                        (top5[:, 0] == labels).sum().double(),
                        (top5 == labels[:, None]).any(1).sum().double()])


@torch.no_grad()
def evaluate(trainer, ten_crop: bool = False) -> dict:
    """Loss, top-1 and top-5 over the validation set; each replica evaluates its share."""
    trainer.net.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=trainer.device)  # read once, at the end
    images = 0
    loader = trainer.loaders.eval(ten_crop=ten_crop)
    with trainer.progress.task("ten-crop evaluation" if ten_crop else "evaluation", len(loader)) as task:
        for batch in loader:
            trainer.unreadable.extend(batch.unreadable)
            inputs, labels = trainer.inputs(batch)
            views = 10 if ten_crop else 1
            sums += batch_sums(trainer.net(inputs), labels, views)
            images += len(labels)
            task.update()
    loss, top1, top5, n = sum_over_replicas([*sums.tolist(), images], trainer.layout)
    return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n}
