"""Write a small real DeepSpeed ZeRO checkpoint through the training code's own `Engine` and `Checkpointer`, for
export tests and the export benchmark, until tests can use real `pretrain.train` runs.

    deepspeed --num_gpus 2 tests/helpers/make_ds_checkpoint.py RUN --stage 3 [--model vit_test_patch4] [--steps 2] \
        [--representation-size R]

Builds `create_vit(MODEL, num_classes=10)` (with a pre-logits layer of width R if given) under
`pretrain.train.engine.Engine` (bf16, the given ZeRO stage, AdamW at a constant learning rate), takes a few optimizer
steps on random images, then saves with `pretrain.train.checkpointer.Checkpointer` exactly as the training loop does.
`RUN/config.yaml` holds the resolved config.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import torch

from pretrain.config import BatchPlan, Config, save_config
from pretrain.models.vit import create_vit
from pretrain.train.checkpointer import Checkpointer, run_meta
from pretrain.train.distributed import init_distributed
from pretrain.train.engine import Engine
from pretrain.train.lifecycle import run_rank
from pretrain.train.state import RankRNG, TrainState, set_determinism


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--model", default="vit_test_patch4")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--representation-size", type=int, help="pre-logits width (the paper's i21k models)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--local_rank", type=int, default=-1)  # passed by the deepspeed launcher
    return ap.parse_args()


def config(a: argparse.Namespace, world: int) -> Config:
    cfg = Config()
    cfg.model.name = a.model
    cfg.model.num_classes = a.num_classes
    cfg.model.representation_size = a.representation_size
    cfg.deepspeed.zero_stage = a.stage
    cfg.train.micro_batch_size = a.micro_batch
    cfg.train.global_batch_size = a.micro_batch * world
    cfg.train.steps = a.steps
    cfg.schedule.warmup_steps, cfg.schedule.decay = 0, "constant"  # a few steps at optim.lr
    return cfg


def random_batches(a: argparse.Namespace, img_size: int, rank: int) -> Iterator[dict]:
    """Batches as the stream yields them: uint8 images (B, 3, H, W) and integer labels (B,)."""
    g = torch.Generator().manual_seed(rank)
    while True:
        images = torch.randint(0, 256, (a.micro_batch, 3, img_size, img_size), generator=g, dtype=torch.uint8)
        yield {"image": images, "label": torch.randint(0, a.num_classes, (a.micro_batch,), generator=g)}


def main() -> None:
    a = parse_args()
    rank, world, device = init_distributed()
    cfg = config(a, world)
    torch.manual_seed(0)
    model = create_vit(a.model, num_classes=a.num_classes, representation_size=a.representation_size)
    args = model.args
    plan = BatchPlan.of(cfg.train, world)
    engine = Engine.from_config(model, cfg, plan, device=device)
    rng, state = RankRNG(set_determinism(cfg.run.seed, rank), rank, world), TrainState()
    batches = random_batches(a, args.img_size, rank)
    engine.train()
    for _ in range(a.steps):
        engine.train_step(batches, rng.mixup)
        state.advance(plan.global_batch)
    if rank == 0:
        save_config(cfg, a.run_dir / "config.yaml")
    class_names = [f"class_{i}" for i in range(a.num_classes)]
    checkpointer = Checkpointer(
        cfg.checkpoint,
        a.run_dir / "checkpoints",
        total_steps=a.steps,
        target=None,
        run_meta=run_meta(cfg, world, args, class_names),
    )
    checkpointer.save(state.step, engine, {"state": state, "rng": rng}, state.samples_seen)


if __name__ == "__main__":
    run_rank(main)  # DeepSpeed's shared memory cleaned; barrier, process group destroyed, exit
