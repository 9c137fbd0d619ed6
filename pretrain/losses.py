"""Classification losses shared by pretraining and fine-tuning, computed in float32 whatever the precision."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_bce(logits: torch.Tensor, targets: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """big_vision's sigmoid_xent: binary cross-entropy summed over classes, averaged over the batch.

    Integer targets (B,) become one-hot as big_vision's `onehot(num_classes)`; (B, C) targets are used as given.
    With `per_sample` the (B,) sums are returned instead of their mean.
    """
    logits = logits.float()
    if targets.ndim == 1:
        targets = F.one_hot(targets, logits.shape[-1])
    per = F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none").sum(-1)  # (B,)
    return per if per_sample else per.mean()


def softmax_ce(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Softmax cross-entropy over integer (B,) or soft (B, C) targets."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str, label_smoothing: float = 0.0):
    """`kind` "softmax" or "sigmoid" (the `train.loss` setting)."""
    return sigmoid_bce(logits, targets) if kind == "sigmoid" else softmax_ce(logits, targets, label_smoothing)
