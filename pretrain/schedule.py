"""The learning-rate rule shared by pretraining and fine-tuning: linear warmup, then a decay to a floor."""

from __future__ import annotations

import math
from typing import Literal

Decay = Literal["linear", "cosine", "constant"]


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, decay: Decay, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based).

    Linear warmup over `warmup_steps` (step 0 already gets 1/warmup), then `decay` from 1 to `min_ratio` at
    `total_steps`. Pretraining uses the ViT paper's linear decay; fine-tuning its cosine decay to 0.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape
