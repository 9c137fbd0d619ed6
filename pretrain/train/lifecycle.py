"""How a launched rank starts and ends: shared memory left clean, the process group torn down in order, and no
interpreter finalization while gloo's C++ threads run.

Why the last point: a rank whose interpreter finalizes while gloo's worker and event-loop threads are alive can abort
there with "terminate called without an active exception" (SIGABRT, exit -6; reproduced with plain torch + gloo, two
ranks, a final barrier and no `destroy_process_group()`, on a loaded machine). Destroying the process group is not
enough under DeepSpeed: it keeps its own references to the groups (the engine, the ZeRO optimizer,
`DeepSpeedZeRoOffload`, every ZeRO-3 parameter's `ds_process_group`, `deepspeed.utils.groups._WORLD_GROUP`), so
those threads live until the process ends. So a rank runs the exit handlers itself and ends with `os._exit`,
skipping only the finalization.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable
from typing import NoReturn

import torch.distributed as dist

from pretrain.train import shm


def exit_process(code: int) -> NoReturn:
    """Run the exit handlers (ours unlinks this rank's shared-memory buffer), flush, end without finalization."""
    atexit._run_exitfuncs()  # what Python runs first at exit, before it starts finalizing
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


MMAP_THRESHOLD_ENV = "PRETRAIN_MMAP_THRESHOLD"


def return_freed_memory() -> None:
    """Serve every host allocation of 1 MiB or more (`PRETRAIN_MMAP_THRESHOLD` bytes; 0: glibc's default) from its
    own mapping, so that freeing it returns the memory to the system.

    glibc raises its mmap threshold to the size of each mapped block freed (up to 32 MiB), after which tensors of a
    few MiB come from the heap and stay resident once freed: building a model (whole, or module by module under
    ZeRO-3) left ~1 GiB per rank of freed ViT-L weights resident and raised every later peak by as much
    (benchmarks/bench_zero3.py). Setting the threshold fixes it and turns the adjustment off.
    """
    threshold = int(os.environ.get(MMAP_THRESHOLD_ENV, 1 << 20))
    libc = ctypes.util.find_library("c")
    if threshold and libc and sys.platform.startswith("linux"):
        ctypes.CDLL(libc).mallopt(-3, threshold)  # -3: M_MMAP_THRESHOLD; a no-op on a libc without it


def run_rank(main: Callable[[], int | None]) -> NoReturn:
    """Run a launched process's `main` and exit with its code (None counts as 0).

    Before: DeepSpeed's shared-memory buffers of dead runs are removed and this rank's is unlinked at exit
    (`shm.install`). After a success: a barrier (no rank still talks to this one), then the process group is destroyed.
    After a failure the peers may never reach a barrier, so the rank exits at once (the launcher stops the others).
    An exception propagates as usual: Python prints it and exits with 1 (the exit handlers still run).
    """
    shm.install()
    return_freed_memory()
    code = main() or 0
    if code == 0 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    exit_process(code)
