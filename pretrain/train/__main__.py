"""Pretraining entry point: `vit-train` (console script) or `python -m pretrain.train`.

    vit-launch --nproc-per-node N [--nnodes M --node-rank K --master-addr A] -- --config X.yaml [...]
    deepspeed [--num_gpus N | --hostfile H ...] --module pretrain.train --config configs/X.yaml [section.key=value ...]
    torchrun --nproc_per_node N -m pretrain.train --config ...        (or plain `vit-train --config ...` for 1 rank)

Thin: parses the arguments, builds the `Trainer` (pretrain.train.trainer) and runs it.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

import torch.distributed as dist

from data_tools.extras import MissingExtra, require
from pretrain import exit_codes
from pretrain.checkpoint_format import CheckpointError
from pretrain.config import ConfigError, load_config
from pretrain.data import ShardError
from pretrain.train.lifecycle import run_rank
from pretrain.train.preemption import Preempted
from pretrain.train.state import TrainingError
from pretrain.train.trainer import Trainer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vit-train", description="Pretrain a ViT with DeepSpeed ZeRO.")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/vit_b16_i21k.yaml")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="dotted overrides: optim.lr=3e-4 train.steps=100 ...")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Parse, build the Trainer, run it. Exit codes (`pretrain.exit_codes`): 0 done; 2 one line for a problem the
    user can fix; 75 preempted by SIGTERM / SIGUSR1 with a checkpoint saved at the last finished step."""
    args = parse_args(argv)
    code = exit_codes.OK
    try:
        require("deepspeed")  # the `train` extra
        Trainer.build(load_config(args.config, args.overrides)).run()
        if dist.is_initialized():
            dist.barrier()  # every rank is done communicating before any tears its process group down
    except Preempted as e:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(e, flush=True)
        code = exit_codes.PREEMPTED
    except (ConfigError, ShardError, CheckpointError, TrainingError, MissingExtra) as e:
        print(f"error: {e}", file=sys.stderr)
        code = exit_codes.USAGE
    finally:
        # After a failure a peer may wait in a collective: a launched rank just exits (`run_rank`); only a world of
        # one (a test calling main() in-process) is torn down so that it can start another.
        if dist.is_initialized() and (code == exit_codes.OK or dist.get_world_size() == 1):
            dist.destroy_process_group()
    return code


def cli() -> NoReturn:
    """The `vit-train` console script: `main` run as a launched rank."""
    run_rank(main)  # DeepSpeed's shared memory cleaned; exit without finalizing beside gloo's threads


if __name__ == "__main__":
    cli()
