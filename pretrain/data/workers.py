"""The loaders' worker processes: they ignore stop signals, so the loaders stop them themselves.

SLURM signals every process of a job step at preemption or a time limit; a worker must outlive that signal, because
its rank still needs batches to finish the current step and save (`pretrain.train.preemption`). The price: Python's
exit handler for multiprocessing ends daemonic children with SIGTERM and then joins them, and would wait for such a
worker forever (a script that takes a batch and returns would never end). So a loader stops its own workers:
`close()`, after an error, and at the program's exit at the latest (`running` registers that); a worker still alive
then is killed.

Workers start from a fork server (`start_server`), a small process started before the model exists: forked from the
rank instead, they would keep (and copy-on-write duplicate) pages of the model and its optimizer states, tens of GB
on a large run. The server and its workers ignore stop signals from their start.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.util  # noqa: F401 - its exit handler is registered at import, before ours: ours runs first
import os
import select
import signal
import threading
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


def ignore_stop_signals(
    worker_id: int, loader_pid: int | None = None, env: dict[str, str] | None = None, cwd: str | None = None
) -> None:
    """A worker outlives SIGTERM / SIGUSR1 sent to the whole job (SLURM signals every process of a step): its rank
    still needs batches to finish the current step and save. Workers end with their rank: its loader stops them
    (`stop_workers`); a rank killed outright (SIGKILL, the OOM killer) cannot, and the DataLoader's own watchdog
    watches the worker's parent, which is the fork server: so a thread ends the worker when `loader_pid` ends.

    `env` and `cwd` are the loader's process's at the loader's creation: a worker forked from the server would
    otherwise see the environment and folder of the server's start (credentials such as AWS_* set later, a
    relative shard path after a chdir)."""
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    if loader_pid is not None:
        threading.Thread(target=_end_with, args=(loader_pid,), daemon=True).start()


def _end_with(pid: int) -> None:
    """Exit this process as soon as process `pid` has ended (a pidfd is readable once it has)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # already gone
        os._exit(1)
    select.select([fd], [], [])
    os._exit(1)


def start_server() -> None:
    """Start this process's fork server now, if it is not running (the Trainer calls it before building the model).

    Its workers share nothing of the model: the server is a fresh interpreter that imports the stream's modules
    once (its workers share those pages). It is started with the stop signals blocked, which it and its workers
    keep: a SIGTERM that SLURM sends every process of the step cannot end it, and the rank gets its own signals
    once they are unblocked.
    """
    multiprocessing.set_forkserver_preload(["pretrain.data"])
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def server_pids() -> list[int]:
    """The fork server's process id (if running): its memory counts with the workers'."""
    pid = getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)
    return [pid] if pid and os.path.exists(f"/proc/{pid}") else []


def make_dataloader(ds, num_workers: int, pin_memory: bool | None, prefetch: int) -> DataLoader:
    """The DataLoader of a stream whose workers yield whole batches (from the fork server, stop signals ignored)."""
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    if num_workers:
        start_server()
    return DataLoader(
        ds,
        batch_size=None,  # workers yield whole batches
        num_workers=num_workers,
        pin_memory=pin,
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch if num_workers > 0 else None,
        worker_init_fn=functools.partial(
            ignore_stop_signals, loader_pid=os.getpid(), env=dict(os.environ), cwd=os.getcwd()
        ),
        multiprocessing_context="forkserver" if num_workers else None,
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


def pss_gib(pids: list[int]) -> float:
    """Proportional set size of these processes, summed, in GiB (pages shared with other processes count in
    part); 0 for a process that has ended or where /proc is missing."""
    kib = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                kib += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue
    return kib / 2**20
