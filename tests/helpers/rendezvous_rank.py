"""A stand-in rank that joins a real gloo process group through torch's env:// rendezvous (as `pretrain.train` does
through DeepSpeed) and sums its rank + 1 over the group, for the launcher's port tests.

    python -m tests.helpers.rendezvous_rank --local_rank=I OUT_DIR     writes OUT_DIR/rank-RANK: "SUM MASTER_PORT"
"""

import argparse
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

p = argparse.ArgumentParser()
p.add_argument("--local_rank", type=int)
p.add_argument("out", type=Path)
args = p.parse_args()
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
total = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(total)
(args.out / f"rank-{dist.get_rank()}").write_text(f"{total.item():g} {os.environ['MASTER_PORT']}")
dist.destroy_process_group()
