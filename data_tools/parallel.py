"""A bounded, ordered-by-completion process pool: memory stays flat however many tasks the generator yields."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any


def default_workers() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def run_tasks(
    fn: Callable[[Any], Any],
    tasks: Iterable[Any],
    workers: int,
    initializer: Callable[..., None],
    initargs: tuple = (),
) -> Iterator[Any]:
    """Yield `fn(task)` for every task as each finishes, from `workers` processes (in-process when 1).

    At most 2 tasks per worker are submitted ahead, so a lazy `tasks` generator is never materialised.
    The first exception a task raises is re-raised here after the pending tasks are cancelled.
    """
    if workers <= 1:
        initializer(*initargs)
        for task in tasks:
            yield fn(task)
        return
    # fork shares the parent's imports (webdataset pulls in torch: seconds per spawned worker).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    ex = ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer, initargs=initargs)
    pending: set = set()
    try:
        for task in tasks:
            if len(pending) >= 2 * workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (f.result() for f in done)
            pending.add(ex.submit(fn, task))
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            yield from (f.result() for f in done)
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
