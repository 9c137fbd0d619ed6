"""DeepSpeed wiring: the DeepSpeed JSON generated from the typed config, parameter groups, LR schedule, losses.

The model (`pretrain.models.vit`) knows nothing of DeepSpeed; everything distributed is decided here and in
`pretrain.train`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import Config


def deepspeed_config(cfg: Config, world_size: int, on_cuda: bool) -> dict[str, Any]:
    """The DeepSpeed JSON for this run, derived from `cfg` (never kept as a second hand-written copy)."""
    ds = cfg.deepspeed
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": ds.reduce_bucket_size,
        "allgather_bucket_size": ds.allgather_bucket_size,
    }
    if ds.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = ds.stage3_prefetch_bucket_size
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # export rebuilds fp32 from the shards instead
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_cuda}
    o = cfg.optim
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps(world_size),
        "gradient_clipping": o.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                # DeepSpeed's fused (multi-tensor) Adam on CUDA; torch's AdamW where no CUDA kernels exist.
                "torch_adam": not on_cuda,
            },
        },
        "bf16": {"enabled": cfg.train.precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": cfg.train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # pretrain.train.metrics logs; silence DeepSpeed's own step lines
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices; none on biases, norms, position embedding and class token."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_factor(step: int, cfg: Config) -> float:
    """Multiplier of `optim.lr` at optimizer step `step` (0-based): linear warmup, then decay to the floor."""
    s, total = cfg.schedule, cfg.train.steps
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    if s.decay == "constant":
        return 1.0
    progress = min(1.0, (step - s.warmup_steps) / max(1, total - s.warmup_steps))
    shape = 1.0 - progress if s.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return s.min_lr_ratio + (1.0 - s.min_lr_ratio) * shape


def lr_scheduler(cfg: Config):
    """A callable DeepSpeed gives its optimizer to; returns the LambdaLR it steps once per optimizer step."""
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Softmax cross-entropy (integer or soft targets) or sigmoid binary cross-entropy (one-/multi-hot targets).

    Computed in float32 whatever the training precision.
    """
    logits = logits.float()
    if cfg.train.loss == "sigmoid":
        if targets.ndim == 1:  # integer labels -> one-hot, as big_vision's onehot(num_classes)
            targets = F.one_hot(targets, logits.shape[-1])
        # big_vision's sigmoid_xent: sum over classes, mean over the batch
        return F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none").sum(-1).mean()
    return F.cross_entropy(logits, targets, label_smoothing=cfg.train.label_smoothing)


def autocast_dtype(precision: str) -> torch.dtype:
    """Dtype the model computes in (DeepSpeed casts the weights; inputs must match)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
