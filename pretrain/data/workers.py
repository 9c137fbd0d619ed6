"""The loaders' worker processes: they ignore stop signals, so the loaders stop them themselves.

SLURM signals every process of a job step at preemption or a time limit; a worker must outlive that signal, because
its rank still needs batches to finish the current step and save (`pretrain.train.preemption`). The price: Python's
exit handler for multiprocessing ends daemonic children with SIGTERM and then joins them, and would wait for such a
worker forever (a script that takes a batch and returns would never end). So a loader stops its own workers:
`close()`, after an error, and at the program's exit at the latest (`running` registers that); a worker still alive
then is killed.
"""

from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401 - its exit handler is registered at import, before ours: ours runs first
import signal
import weakref
from typing import Protocol

import torch
from torch.utils.data import DataLoader

from pretrain.exit_codes import STOP_SIGNALS

_JOIN_S = 5.0
"""How long a killed worker is waited for."""


class Closable(Protocol):
    def close(self) -> None: ...


_OPEN: weakref.WeakSet = weakref.WeakSet()
"""Loaders whose workers may be running: closed at exit."""
_WORKERS: weakref.WeakSet = weakref.WeakSet()
"""Every worker process a loader started: killed at exit if still alive (e.g. one of a loader already collected)."""
_registered: list[bool] = []


def ignore_stop_signals(worker_id: int) -> None:
    """A worker outlives SIGTERM / SIGUSR1 sent to the whole job (SLURM signals every process of a step): its rank
    still needs batches to finish the current step and save. Workers end with their rank: its loader stops them
    (`stop_workers`), or the DataLoader's watchdog does when the rank is gone."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def make_dataloader(ds, num_workers: int, pin_memory: bool | None, prefetch: int) -> DataLoader:
    """The DataLoader of a stream whose workers yield whole batches (persistent, stop signals ignored)."""
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    return DataLoader(
        ds,
        batch_size=None,  # workers yield whole batches
        num_workers=num_workers,
        pin_memory=pin,
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch if num_workers > 0 else None,
        worker_init_fn=ignore_stop_signals,
        # Without a generator of its own, every iter() draws its worker base seed from torch's global RNG: a resumed
        # run would then draw at another point than the uninterrupted one, and its dropout masks would differ.
        # Our workers seed every random choice themselves, so a fixed base seed changes no batch.
        generator=torch.Generator().manual_seed(0),
    )


def running(loader: Closable, it) -> None:
    """Note that `loader` runs the workers of DataLoader iterator `it`: at exit it is closed, at the latest.

    The exit handler is registered once, after multiprocessing's (imported above): atexit runs the handler
    registered last first, so our workers are gone before multiprocessing would join them.
    """
    _OPEN.add(loader)
    _WORKERS.update(getattr(it, "_workers", ()))
    if not _registered:
        atexit.register(_stop_all)
        _registered.append(True)


def closed(loader: Closable) -> None:
    """`loader` has stopped its workers (`stop_workers`): nothing to do for it at exit."""
    _OPEN.discard(loader)


def stop_workers(it) -> None:
    """Stop the workers of a DataLoader iterator: ask them to end (torch's shutdown, which waits up to 5 s for each),
    then kill any that is left (the SIGTERM torch sends as its last resort is ignored by ours)."""
    workers = list(getattr(it, "_workers", ()))
    if hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    _kill(workers)


def _stop_all() -> None:
    for loader in list(_OPEN):
        loader.close()
    _kill(list(_WORKERS))


def _kill(workers: list) -> None:
    for w in workers:
        if w.is_alive():
            w.kill()
            w.join(timeout=_JOIN_S)
