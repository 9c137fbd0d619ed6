"""Few-shot features and accuracies of one training checkpoint under DeepSpeed, on any number of ranks, through the
Trainer's own `FewShotEvaluator`: the layout-independence check.

    deepspeed --num_gpus 2 tests/helpers/fewshot_features.py RUN SHARDS OUT.npz [--stage 3]
    python tests/helpers/fewshot_features.py RUN SHARDS OUT.npz                     (one rank)

Loads the fp32 weights of RUN's newest checkpoint (DeepSpeed's own reconstruction) into the run's model, wraps it
in the `Engine` (bf16, the given ZeRO stage), and has rank 0 write the train and test features, their labels and
the evaluator's metric values to OUT.npz.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from pretrain.checkpoint_format import read_meta
from pretrain.config import load_config
from pretrain.fewshot.evaluate import FewShotEvaluator
from pretrain.fewshot.features import embed
from pretrain.fewshot.sets import Samples, first_positions
from pretrain.models.vit import VisionTransformer, ViTArgs
from pretrain.train.distributed import init_distributed
from pretrain.train.engine import Engine
from pretrain.train.lifecycle import run_rank


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("shards")
    ap.add_argument("out", type=Path)
    ap.add_argument("--stage", type=int, default=3)
    ap.add_argument("--local_rank", type=int, default=-1)  # passed by the deepspeed launcher
    a = ap.parse_args()
    rank, world, device = init_distributed()
    ckpts = a.run / "checkpoints"
    tag = (ckpts / "latest").read_text().strip()
    meta = read_meta(ckpts / tag)
    model = VisionTransformer(ViTArgs(**meta["model_args"]))
    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpts), tag=tag), strict=True)
    over = [f"deepspeed.zero_stage={a.stage}", "train.micro_batch_size=16", f"train.global_batch_size={16 * world}"]
    over += [f"data.train_shards={a.shards}", f"fewshot.sets=digits={a.shards}", "fewshot.shots=1,5"]
    cfg = load_config(a.run / "config.yaml", over)
    engine = Engine.from_config(model, cfg, world_size=world, device=device)
    ev = FewShotEvaluator(cfg.fewshot, cfg.data, img_size=model.args.img_size, batch_size=16, total_steps=1)
    values = ev.run(engine)  # the Trainer's call
    setup, embedder = ev.setup, ev.embedder(engine)
    (s,) = setup.sets
    engine.model.eval()
    with torch.no_grad():
        tx, ty, _ = embed(embedder, Samples(s.train, setup.draw(s, rank, world).positions()))
        qx, qy, _ = embed(embedder, Samples(s.test, first_positions(s.test, setup.max_test)))
    if rank == 0:
        np.savez(a.out, train=tx, train_labels=ty, test=qx, test_labels=qy, values=json.dumps(values), world=world)


if __name__ == "__main__":
    run_rank(main)
