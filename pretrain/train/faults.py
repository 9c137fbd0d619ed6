"""Fault injection for the crash-safety tests, off unless `PRETRAIN_FAULT` is set.

PRETRAIN_FAULT=save:4    SIGKILL rank 0 in the middle of the save at step 4 (after DeepSpeed wrote its files,
                         before the tag is marked complete)
PRETRAIN_FAULT=step:5    SIGKILL rank 0 after step 5
PRETRAIN_FAULT=nan:3     make step 3's loss NaN on every rank ("nan:all": every step's)
PRETRAIN_FAULT=diskfull:6  the last rank's writes fail with ENOSPC during the save at step 6 (after rank 0's)

Beside them, for the elastic-resume tests: PRETRAIN_KEY_LOG=FOLDER appends the sample keys of every micro-batch a
rank trains on to FOLDER/keys-RANK.jsonl (`logged_keys`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist


def injected(kind: str, step: int) -> bool:
    """Whether `PRETRAIN_FAULT` asks for fault `kind` at `step`."""
    name, _, at = os.environ.get("PRETRAIN_FAULT", "").partition(":")
    return name == kind and at in (str(step), "all")


def kill_rank0_if(kind: str, step: int) -> None:
    """SIGKILL rank 0 (no cleanup, as a crash) where `PRETRAIN_FAULT` asks for it."""
    if injected(kind, step) and dist.get_rank() == 0:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def disk_full_if(step: int) -> Iterator[None]:
    """Make `torch.save` (DeepSpeed's checkpoint writer) fail as on a full disk, on the last rank, where asked."""
    if not (injected("diskfull", step) and dist.get_rank() == dist.get_world_size() - 1):
        yield
        return

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device (PRETRAIN_FAULT)")

    with mock.patch.object(torch, "save", full):
        yield


def logged_keys(batches: Iterator[dict], rank: int) -> Iterator[dict]:
    """The micro-batches unchanged; with `PRETRAIN_KEY_LOG` set, each one's keys appended to its file as it is taken."""
    folder = os.environ.get("PRETRAIN_KEY_LOG")
    if not folder:
        return batches

    def logged() -> Iterator[dict]:
        with open(Path(folder) / f"keys-{rank}.jsonl", "a", buffering=1) as f:
            for batch in batches:
                f.write(json.dumps(batch["key"]) + "\n")
                yield batch

    return logged()
