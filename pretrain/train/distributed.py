"""The process group and what differs per rank: joining it, gathering every rank's state, the RNG state of a rank."""

from __future__ import annotations

import os
import random
from datetime import timedelta
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from pretrain.ports import free_port
from pretrain.train import shm


class Stateful(Protocol):
    """A part of the run the checkpoint holds, under its name (`pretrain.train.checkpointer`).

    `state_dict()` runs no collective. A part whose state differs per rank says so with `per_rank = True`: the
    Checkpointer gathers every rank's `state_dict()` (at one point of the save, for all such parts at once) and hands
    the part the list of them, in rank order, on resume.
    """

    per_rank: bool

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


def release_shm_names() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer name as soon as every rank has mapped every buffer.

    DeepSpeed's `shm_initialize` maps all ranks' buffers before `init_distributed` returns; after a barrier no rank
    still needs a name, and the memory stays mapped until the last rank exits. Then even a rank killed by SIGKILL
    or the OOM killer leaves nothing in /dev/shm. (Launches without such a buffer unlink nothing.)
    """
    dist.barrier()
    shm.unlink_own()


def init_distributed(collective_timeout_s: float = 0) -> tuple[int, int, torch.device]:
    """Join the process group (NCCL on CUDA, gloo on CPU); one process started by hand becomes a world of one.

    `collective_timeout_s` (`train.collective_timeout_s`, 0: the backend's default) also bounds the process group's
    own waits, a minute after the watchdog's, so that the watchdog's one line comes first.
    Returns (rank, world size, this rank's device).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:  # plain `python -m pretrain.train`: a single-rank world on a free local port
        port = free_port()
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    timeout = {"timeout": timedelta(seconds=collective_timeout_s + 60)} if collective_timeout_s > 0 else {}
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), **timeout)
    release_shm_names()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    acc = get_accelerator()
    if acc.device_name() == "cuda":
        acc.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(acc.device_name())
    return dist.get_rank(), dist.get_world_size(), device


def gather(obj: object) -> list:
    """`obj` of every rank, in rank order (a collective: every rank must call it)."""
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rng_state(mixup_rng: torch.Generator) -> dict[str, Any]:
    """This rank's random state: torch (and CUDA), Python, NumPy and the mixup generator."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    state["mixup"] = mixup_rng.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any], mixup_rng: torch.Generator) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    mixup_rng.set_state(state["mixup"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class PerRank:
    """A part whose state differs per rank but that does not say so itself (the input stream, `TrainLoader`): its
    `load_state_dict` gets every rank's state, so that it can re-split them over another number of ranks."""

    per_rank = True

    def __init__(self, part: Any) -> None:
        self.part = part

    def state_dict(self) -> Any:
        return self.part.state_dict()

    def load_state_dict(self, states: list) -> None:
        self.part.load_state_dict(states)
