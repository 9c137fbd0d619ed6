"""Write a small real DeepSpeed ZeRO checkpoint in the run layout of `pretrain.train.checkpointer`, for export tests and
the export benchmark, until tests can use real `pretrain.train` runs.

    deepspeed --num_gpus 2 tests/helpers/make_ds_checkpoint.py RUN --stage 3 [--model vit_test_patch4] [--steps 2]

Builds `create_vit(MODEL, num_classes=10)`, wraps it with the DeepSpeed JSON and AdamW parameter groups of
`pretrain.train.engine` (bf16, the given ZeRO stage), takes a few optimizer steps on random data, then saves exactly as
the training loop does: `engine.save_checkpoint(..., save_latest=False)`, a barrier, and rank 0 writes
`pretrain_meta.json` and `latest` (`pretrain.train.checkpointer.write_meta`). `RUN/config.yaml` holds the resolved config.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from pretrain.train.checkpointer import tag_for, write_meta
from pretrain.train.lifecycle import run_rank
from pretrain.config import Config, save_config
from pretrain.train.engine import deepspeed_config, param_groups
from pretrain.models.vit import create_vit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--model", default="vit_test_patch4")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--local_rank", type=int, default=-1)  # passed by the deepspeed launcher
    a = ap.parse_args()

    deepspeed.init_distributed()
    world = dist.get_world_size()
    cfg = Config()
    cfg.model.name = a.model
    cfg.model.num_classes = a.num_classes
    cfg.deepspeed.zero_stage = a.stage
    cfg.train.micro_batch_size = a.micro_batch
    cfg.train.global_batch_size = a.micro_batch * world
    cfg.train.steps = a.steps

    torch.manual_seed(0)
    model = create_vit(a.model, num_classes=a.num_classes)
    ds_cfg = deepspeed_config(cfg, world, on_cuda=torch.cuda.is_available())
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=ds_cfg
    )
    args = model.args
    g = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(a.steps):
        x = torch.randn(a.micro_batch, 3, args.img_size, args.img_size, generator=g).to(engine.device, torch.bfloat16)
        y = torch.randint(0, a.num_classes, (a.micro_batch,), generator=g).to(engine.device)
        loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
        engine.backward(loss)
        engine.step()

    run = Path(a.run_dir)
    ckpt_dir = run / "checkpoints"
    tag = tag_for(a.steps)
    if dist.get_rank() == 0:
        save_config(cfg, run / "config.yaml")
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": a.steps}, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        meta = {
            "step": a.steps,
            "samples_seen": a.steps * cfg.train.global_batch_size,
            "zero_stage": a.stage,
            "world_size": world,
            "precision": "bf16",
            "model_name": a.model,
            "model_args": dataclasses.asdict(args),
            "class_names": [f"class_{i}" for i in range(a.num_classes)],
            "config": cfg.to_dict(),
        }
        write_meta(ckpt_dir, tag, meta)
    dist.barrier()


if __name__ == "__main__":
    run_rank(main)  # DeepSpeed's shared memory cleaned; barrier, process group destroyed, exit
