"""One rank of the ZeRO memory benchmark (launched by benchmarks/bench_train.py under `deepspeed --num_gpus 2`).

Builds the engine with pretrain.train's own `Engine` (same generated DeepSpeed JSON, parameter groups, LR schedule and
training step), runs one step, then counts the bytes of every live tensor on this rank (unique storages), which after
the step are the model states.
"""

from __future__ import annotations

import argparse
import gc
import json

import torch

from pretrain.train.distributed import release_shm_names
from pretrain.train.lifecycle import run_rank


def live_tensor_bytes() -> int:
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not torch.is_tensor(obj) or obj.device.type == "meta":
                continue
            st = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - gc holds half-built objects of every kind
            continue
        if st.data_ptr() and st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def main() -> None:
    import deepspeed
    import torch.distributed as dist

    from pretrain.config import BatchPlan, load_config
    from pretrain.models.vit import create_vit
    from pretrain.train.engine import Engine

    p = argparse.ArgumentParser()
    p.add_argument("--stage", type=int, required=True)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--bucket", type=int, default=1_000_000, help="elements per communication bucket")
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    release_shm_names()
    world = dist.get_world_size()
    cfg = load_config(
        "configs/tiny_digits.yaml",
        [
            f"deepspeed.zero_stage={args.stage}",
            "train.micro_batch_size=2",
            f"train.global_batch_size={2 * world}",
            # Communication buckets are allocated up front (50M elements by default: ~95 MiB of bf16 at ZeRO-3);
            # at this model size they would dwarf the model states the accounting is about, so keep them small.
            f"deepspeed.reduce_bucket_size={args.bucket}",
            f"deepspeed.allgather_bucket_size={args.bucket}",
            f"deepspeed.stage3_prefetch_bucket_size={args.bucket}",
        ],
    )
    torch.manual_seed(0)
    model = create_vit("vit_small_patch16", num_classes=1000, depth=args.depth)
    n = sum(p.numel() for p in model.parameters())
    engine = Engine.from_config(model, cfg, BatchPlan.of(cfg.train, world), device=torch.device("cpu"))
    del model
    engine.train_step(one_batch(), torch.Generator())
    gc.collect()
    print("ZEROMEM " + json.dumps({"rank": dist.get_rank(), "world": world, "params": n, "bytes": live_tensor_bytes()}))


def one_batch():
    """One micro-batch as the stream yields it: uint8 images (2, 3, 224, 224) and labels (2,)."""
    yield {"image": torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8), "label": torch.randint(0, 1000, (2,))}


if __name__ == "__main__":
    run_rank(main)  # DeepSpeed's shared memory cleaned; barrier, process group destroyed, exit
