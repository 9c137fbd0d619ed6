"""Build the training `Engine` in two ways on the same seed and data, take a few steps with each, and write what the
tests compare to OUT (JSON, from rank 0).

    deepspeed --num_gpus 2 tests/helpers/engine_variants.py OUT

- `zero_init`: ZeRO-3, the model built partitioned (`deepspeed.zero_init=true`) vs whole (`false`): the gathered
  initial weights of both against a plain non-DeepSpeed build of the same seed, and the per-step losses.
- `compile_zero2` / `compile_zero3`: `train.compile=true` vs eager, gradient checkpointing on: per-step losses.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from pretrain.config import BatchPlan, Config, load_config
from pretrain.models.vit import create_vit
from pretrain.train.distributed import init_distributed
from pretrain.train.engine import Engine
from pretrain.train.lifecycle import run_rank
from pretrain.train.trainer import model_args
from pretrain.train.zero_init import build_model

SEED, STEPS, MICRO = 5, 4, 4


def config(*overrides: str) -> Config:
    return load_config(
        "configs/tiny_digits.yaml",
        [
            "model.num_classes=10",
            f"train.micro_batch_size={MICRO}",
            f"train.global_batch_size={2 * MICRO}",
            "train.grad_checkpointing=true",
            "schedule.warmup_steps=0",
            "schedule.decay=constant",
            "optim.lr=0.01",
            "deepspeed.reduce_bucket_size=100000",
            "deepspeed.allgather_bucket_size=100000",
            "deepspeed.stage3_prefetch_bucket_size=100000",
            *overrides,
        ],
    )


def batches(rank: int) -> Iterator[dict]:
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data, the same for every variant
    while True:
        yield {
            "image": torch.randint(0, 256, (MICRO, 3, 32, 32), dtype=torch.uint8, generator=g),
            "label": torch.randint(0, 10, (MICRO,), generator=g),
        }


def gathered(engine: Engine) -> dict[str, torch.Tensor]:
    """Every parameter whole (as fp32 copies of the bf16 weights)."""
    import deepspeed

    params = dict(engine.model.module.named_parameters())
    partitioned = hasattr(next(iter(params.values())), "ds_id")
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=partitioned):
        return {k: v.detach().float().clone() for k, v in params.items()}


def run(cfg: Config, rank: int, world: int, device: torch.device) -> tuple[dict, list[float], dict]:
    """(initial weights, per-step losses, final weights) of `STEPS` steps."""
    torch.manual_seed(SEED)
    plan = BatchPlan.of(cfg.train, world)
    model = build_model(cfg, model_args(cfg.model, 10), plan, device=device)
    model.set_grad_checkpointing(cfg.train.grad_checkpointing)
    engine = Engine.from_config(model, cfg, plan, device=device)
    engine.train()
    data, losses = batches(rank), []
    initial = gathered(engine)
    for _ in range(STEPS):
        losses += [float(x) for x in engine.train_step(data, torch.Generator())]
    return initial, losses, gathered(engine)


def distance(a: dict, b: dict) -> float:
    """L2 distance between two sets of weights."""
    return sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--local_rank", type=int, default=-1)  # passed by the deepspeed launcher
    args = ap.parse_args()
    rank, world, device = init_distributed()
    out: dict = {}

    torch.manual_seed(SEED)
    plain = create_vit("vit_test_patch4", num_classes=10).named_parameters()
    plain = {k: v.to(torch.bfloat16).float() for k, v in plain}  # as DeepSpeed casts a whole model
    init_on, loss_on, _ = run(config("deepspeed.zero_stage=3", "deepspeed.zero_init=true"), rank, world, device)
    init_off, loss_off, _ = run(config("deepspeed.zero_stage=3", "deepspeed.zero_init=false"), rank, world, device)
    out["zero_init"] = {
        "names_equal": list(init_on) == list(plain) == list(init_off),
        "partitioned_equals_plain": [k for k in plain if not torch.equal(init_on[k], plain[k])],
        "whole_equals_plain": [k for k in plain if not torch.equal(init_off[k], plain[k])],
        "losses_partitioned": loss_on,
        "losses_whole": loss_off,
    }
    for stage in (2, 3):
        w0, eager, w_eager = run(config(f"deepspeed.zero_stage={stage}"), rank, world, device)
        compiled_cfg = config(f"deepspeed.zero_stage={stage}", "train.compile=true")
        _, compiled, w_compiled = run(compiled_cfg, rank, world, device)
        out[f"compile_zero{stage}"] = {
            "eager": eager,
            "compiled": compiled,
            "update": distance(w0, w_eager),  # how far eager training moved the weights
            "gap": distance(w_eager, w_compiled),  # how far compiled training ended from eager
        }
    if rank == 0:
        args.out.write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    run_rank(main)
