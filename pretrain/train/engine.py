"""The model under DeepSpeed: the DeepSpeed JSON generated from the typed config, AdamW parameter groups, the LR
schedule, the loss, and one optimizer step over accumulated micro-batches.

The model (`pretrain.models.vit`) knows nothing of DeepSpeed; everything distributed is decided here and in the other
parts of `pretrain.train`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.config import BatchPlan, Config, DataConfig, DeepSpeedConfig, OptimConfig, ScheduleConfig, TrainConfig
from pretrain.data import mixup, normalize, to_targets
from pretrain.losses import classification_loss
from pretrain.models.vit import VisionTransformer
from pretrain.schedule import lr_factor
from pretrain.train.compile import compile_blocks


def deepspeed_config(
    plan: BatchPlan, train: TrainConfig, optim: OptimConfig, ds: DeepSpeedConfig, on_cuda: bool
) -> dict[str, Any]:
    """The DeepSpeed JSON for this run, derived from the batch plan and the config sections (never kept as a second
    hand-written copy)."""
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
        # DeepSpeed's defaults (1e9 each) exceed ViT-H's whole partition: one fp32 gradient copy and Adam temporaries
        # of the full shard, and the whole bf16 model kept gathered (benchmarks/bench_zero3.py measures the peak).
        zero["sub_group_size"] = ds.sub_group_size
        zero["stage3_max_live_parameters"] = ds.stage3_max_live_parameters
        zero["stage3_max_reuse_distance"] = ds.stage3_max_reuse_distance
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_cuda}
    return {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accum_steps,
        "gradient_clipping": optim.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                # DeepSpeed's fused (multi-tensor) Adam on CUDA; torch's AdamW where no CUDA kernels exist.
                "torch_adam": not on_cuda,
            },
        },
        "bf16": {"enabled": train.precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
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


def lr_lambda(schedule: ScheduleConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of `optim.lr` by optimizer step (0-based), as `pretrain.schedule.lr_factor` defines it."""
    return partial(
        lr_factor,
        warmup_steps=schedule.warmup_steps,
        total_steps=total_steps,
        decay=schedule.decay,
        min_ratio=schedule.min_lr_ratio,
    )


def autocast_dtype(precision: str) -> torch.dtype:
    """Dtype the model computes in (DeepSpeed casts the weights; inputs must match)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


class Engine:
    """The model wrapped by DeepSpeed (ZeRO, optimizer, LR schedule) and the training step.

    Its checkpoint state is DeepSpeed's own files, written and read through `save_checkpoint` / `load_checkpoint`.
    """

    def __init__(
        self,
        model: VisionTransformer,
        *,
        train: TrainConfig,
        optim: OptimConfig,
        schedule: ScheduleConfig,
        ds: DeepSpeedConfig,
        data: DataConfig,
        plan: BatchPlan,
        device: torch.device,
        universal: bool = False,
    ) -> None:
        import deepspeed

        config = deepspeed_config(plan, train, optim, ds, on_cuda=device.type == "cuda")
        if train.compile:
            compile_blocks(model, ds.zero_stage)  # before initialize: ZeRO-3 hooks go on the leaf blocks
        if universal:
            config["checkpoint"] = {"load_universal": True}  # a `ds_to_universal` folder: any world size
        self.model, *_ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, optim.weight_decay),
            config=config,
            lr_scheduler=partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lr_lambda(schedule, train.steps)),
        )
        self.device, self.dtype = device, autocast_dtype(train.precision)
        self.accum = plan.accum_steps
        self.num_classes = model.args.num_classes
        self.loss_kind, self.label_smoothing = train.loss, train.label_smoothing
        self.mean, self.std, self.mixup_alpha = data.mean, data.std, data.mixup_alpha

    @classmethod
    def from_config(
        cls, model: nn.Module, cfg: Config, plan: BatchPlan, *, device: torch.device, universal: bool = False
    ) -> Engine:
        """Wrap `model` with the batch plan and the sections of `cfg` the engine reads (train, optim, schedule,
        deepspeed, data)."""
        return cls(
            model,
            train=cfg.train,
            optim=cfg.optim,
            schedule=cfg.schedule,
            ds=cfg.deepspeed,
            data=cfg.data,
            plan=plan,
            device=device,
            universal=universal,
        )

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) images of a batch -> normalised, on the device, in the compute dtype."""
        return normalize(images.to(self.device, non_blocking=True), self.mean, self.std, self.dtype)

    def train_step(
        self, batches: Iterator[dict], mixup_rng: torch.Generator, poison: bool = False
    ) -> list[torch.Tensor]:
        """One optimizer step over `accum` micro-batches: forward, backward and DeepSpeed's step for each.

        `poison` makes the loss NaN (fault injection). Returns the detached loss of every micro-batch.
        """
        losses = []
        for _ in range(self.accum):
            batch = next(batches)
            images = self.inputs(batch["image"])  # (B, 3, H, W)
            targets = batch["label"].to(self.device, non_blocking=True)  # (B,) or (B, K) multi-label
            if self.mixup_alpha > 0 or targets.ndim == 2:
                targets = to_targets(targets, self.num_classes)  # (B, C) soft / multi-hot
                images, targets, _ = mixup(images, targets, self.mixup_alpha, mixup_rng)
            loss = classification_loss(self.model(images), targets, self.loss_kind, self.label_smoothing)
            if poison:
                loss = loss * float("nan")
            self.model.backward(loss)
            self.model.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
            losses.append(loss.detach())
        return losses

    def step_applied(self) -> bool:
        """False when DeepSpeed skipped the last update (non-finite gradients: overflow or clipping norm check)."""
        return self.model.was_step_applied()

    def lr(self) -> float:
        return self.model.get_lr()[0]

    def grad_norm(self) -> float | None:
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def train(self) -> None:
        self.model.train()

    def save_checkpoint(self, ckpt_dir: Path, tag: str, client: dict[str, Any]) -> None:
        """DeepSpeed's files of this rank, with `client` (the other parts' state); `latest` is the Checkpointer's."""
        self.model.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False)

    def load_checkpoint(self, ckpt_dir: Path, tag: str) -> dict[str, Any]:
        """Load DeepSpeed's files; returns the client state saved with them."""
        _, client = self.model.load_checkpoint(str(ckpt_dir), tag=tag)
        return client
