"""Held-out evaluation on every rank, reduced over ranks: loss, top-1, and top-5 for many classes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pretrain.config import TrainConfig
from pretrain.data import EvalLoader
from pretrain.losses import sigmoid_bce

if TYPE_CHECKING:
    from pretrain.train.engine import Engine

TOP5_MIN_CLASSES = 100  # top-5 is reported where it means something (ImageNet-scale label sets)


class Evaluator:
    """Evaluates every `train.eval_every_steps` steps (before the last) and at the end of the run.

    Args:
        loader: this rank's held-out loader, or None when there is no held-out split (nothing is evaluated).
        train: the `train` config section (eval_every_steps, eval_batches, loss, steps).
        num_classes: the model's classes.
    """

    def __init__(self, loader: EvalLoader | None, train: TrainConfig, num_classes: int) -> None:
        self.loader, self.num_classes = loader, num_classes
        self.every, self.max_batches, self.total_steps = train.eval_every_steps, train.eval_batches, train.steps
        self.sigmoid = train.loss == "sigmoid"

    def due(self, step: int) -> bool:
        """An evaluation during training (the one at the end is the caller's)."""
        return bool(self.every) and step % self.every == 0 and step < self.total_steps

    @torch.no_grad()
    def run(self, engine: Engine) -> dict[str, float]:
        """Mean loss and accuracy over the held-out split ({} without one). Every rank runs the same number of
        batches (the loader pads with masked samples), which ZeRO-3 needs: each forward gathers parameters from all
        ranks."""
        if self.loader is None:
            return {}
        model, device = engine.model, engine.device
        was_training = model.training
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, samples
        for i, batch in enumerate(self.loader):
            if self.max_batches and i >= self.max_batches:
                break
            images = engine.inputs(batch["image"])
            labels = batch["label"].to(device, non_blocking=True)  # (B,) or (B, K) padded with -1
            mask = batch["mask"].to(device, non_blocking=True).to(torch.float64)  # (B,) 0 for padding samples
            logits = model(images).float()  # (B, C)
            first = labels if labels.ndim == 1 else labels[:, 0]  # the primary label of a multi-label sample
            if self.sigmoid:
                per_sample = sigmoid_bce(logits, first.clamp(min=0), per_sample=True)
            else:
                per_sample = F.cross_entropy(logits, first.clamp(min=0), reduction="none")
            topk = logits.topk(min(5, self.num_classes), dim=-1).indices  # (B, k)
            hit1 = (topk[:, 0] == first).to(torch.float64)
            hit5 = (topk == first[:, None]).any(-1).to(torch.float64)
            sums += torch.stack(
                [(per_sample.double() * mask).sum(), (hit1 * mask).sum(), (hit5 * mask).sum(), mask.sum()]
            )
        dist.all_reduce(sums)
        if was_training:
            model.train()
        n = max(sums[3].item(), 1.0)
        out = {"loss": sums[0].item() / n, "top1": sums[1].item() / n, "samples": int(sums[3].item())}
        if self.num_classes >= TOP5_MIN_CLASSES:
            out["top5"] = sums[2].item() / n
        return out
