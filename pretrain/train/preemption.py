"""Stopping on request: SIGTERM or SIGUSR1 makes every rank finish its current optimizer step, agree on that step,
save a checkpoint there and exit with `exit_codes.PREEMPTED`.

The signal can reach any subset of the ranks (SLURM signals every process of the step; our launcher forwards what
it gets; DeepSpeed's launcher sends SIGTERM again after a first one), so no rank acts on its own flag: at each step
boundary the ranks all-reduce their flags (`agree`), and all of them stop after the same step or none does. A
second signal while stopping changes nothing.
"""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist

from pretrain.exit_codes import STOP_SIGNALS


class Preempted(Exception):
    """Raised out of the loop once the checkpoint at `step` is saved on every rank."""

    def __init__(self, step: int, path: str) -> None:
        super().__init__(f"preempted at step {step}: checkpoint saved ({path}); run the same command again to resume")
        self.step, self.path = step, path


class StopRequest:
    """Remembers the first stop signal this process got (`install` sets the handlers; main thread only)."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self.at: float | None = None

    def install(self) -> None:
        """Set the handlers, then unblock the signals (`pretrain.launch` starts ranks with them blocked, so that one
        sent during the imports waits for this handler)."""
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal, self.at = signal.Signals(signum), time.monotonic()
            note = f"{name} received: finishing the current step, then saving a checkpoint\n"
        else:
            note = f"{name} received again: already stopping, ignored\n"
        # os.write, not print: a handler can run while the main thread is inside a print to the same stream
        os.write(2, f"[rank {os.environ.get('RANK', '0')}] {note}".encode())

    @property
    def requested(self) -> bool:
        return self.signal is not None


def agree(*flags: bool, device: torch.device) -> tuple[bool, ...]:
    """Each flag OR-ed over all ranks: one tiny all-reduce at a step boundary (a collective: every rank calls it)."""
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())
