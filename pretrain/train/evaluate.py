"""Held-out evaluation on every rank, reduced: loss, top-1, and top-5 for many classes."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pretrain.config import Config
from pretrain.data import normalize

TOP5_MIN_CLASSES = 100  # top-5 is reported where it means something (ImageNet-scale label sets)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, cfg: Config, device: torch.device, dtype: torch.dtype, num_classes: int
) -> dict[str, float]:
    """Mean loss and accuracy over the held-out split. Every rank runs the same number of batches (the loader
    pads with masked samples), which ZeRO-3 needs: each forward gathers parameters from all ranks."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, samples
    for i, batch in enumerate(loader):
        if cfg.train.eval_batches and i >= cfg.train.eval_batches:
            break
        images = normalize(batch["image"].to(device, non_blocking=True), cfg.data.mean, cfg.data.std, dtype)
        labels = batch["label"].to(device, non_blocking=True)  # (B,) or (B, K) padded with -1
        mask = batch["mask"].to(device, non_blocking=True).to(torch.float64)  # (B,) 0 for padding samples
        logits = model(images).float()  # (B, C)
        first = labels if labels.ndim == 1 else labels[:, 0]  # the primary label of a multi-label sample
        if cfg.train.loss == "sigmoid":
            onehot = F.one_hot(first.clamp(min=0), num_classes).float()
            per_sample = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none").sum(-1)
        else:
            per_sample = F.cross_entropy(logits, first.clamp(min=0), reduction="none")
        k = min(5, num_classes)
        topk = logits.topk(k, dim=-1).indices  # (B, k)
        hit1 = (topk[:, 0] == first).to(torch.float64)
        hit5 = (topk == first[:, None]).any(-1).to(torch.float64)
        sums += torch.stack([(per_sample.double() * mask).sum(), (hit1 * mask).sum(), (hit5 * mask).sum(), mask.sum()])
    dist.all_reduce(sums)
    if was_training:
        model.train()
    n = max(sums[3].item(), 1.0)
    out = {"loss": sums[0].item() / n, "top1": sums[1].item() / n, "samples": int(sums[3].item())}
    if num_classes >= TOP5_MIN_CLASSES:
        out["top5"] = sums[2].item() / n
    return out
