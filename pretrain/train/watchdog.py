"""A bound on every phase of the run: a step (with its collectives inside DeepSpeed), the stop agreement, a save, an
evaluation. A phase that outlasts `train.collective_timeout_s` ends this rank with one line and
`exit_codes.STALLED`; the launcher then ends the others.

Why a watchdog and not only the process group's timeout: a collective waiting for a frozen peer (SIGSTOP, a bad GPU,
a stuck filesystem) was seen to block in ZeRO's all-gather for over 15 minutes with DeepSpeed's process-group timeout
lowered, and NCCL collectives are asynchronous: the wait can surface anywhere.

Which rank: a thread beats a counter per rank in the rendezvous store every few seconds. When a phase expires, the
ranks whose counter stopped are named (frozen or dead); if the store itself does not answer, its host is named:
rank 0, or the launcher of the first node where it hosts the store (`pretrain.launch`, torchrun:
TORCHELASTIC_USE_AGENT_STORE).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from datetime import timedelta

from pretrain import exit_codes


class NoHeartbeats(Exception):
    """The launch gives no address of the rendezvous store (MASTER_ADDR / MASTER_PORT)."""


def store_host() -> str:
    """Who hosts the rendezvous store of this launch: the first node's launcher (`pretrain.launch`, torchrun) or
    rank 0 (`deepspeed`, a plain `python -m pretrain.train`)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return "the first node's launcher"
    return "rank 0"


class Watchdog:
    """Ends this process when a phase named by `phase()` runs longer than `timeout_s` (0: never).

    Args:
        timeout_s: the bound on one phase (`train.collective_timeout_s`).
        rank, world_size: this rank and the world, for the heartbeat keys.
    """

    def __init__(self, timeout_s: float, rank: int, world_size: int) -> None:
        self.timeout_s, self.rank, self.world_size = timeout_s, rank, world_size
        self.beat_s = max(0.5, min(5.0, timeout_s / 4))
        self._what: str | None = None
        self._deadline = float("inf")
        self._store = None
        if timeout_s > 0:
            threading.Thread(target=self._watch, name="pretrain-watchdog", daemon=True).start()

    def phase(self, what: str) -> None:
        """Start the clock of a new phase (`what` names it in the line printed on expiry)."""
        self._what, self._deadline = what, time.monotonic() + self.timeout_s

    def idle(self) -> None:
        """No bound until the next `phase()` (after the loop, or around work of unbounded length)."""
        self._what, self._deadline = None, float("inf")

    def _watch(self) -> None:
        while True:
            time.sleep(self.beat_s)
            self._beat()
            if time.monotonic() > self._deadline:
                self._expire(self._what)

    def _client(self):
        """Our own connection to the rendezvous store, with a short timeout (the default one waits for long)."""
        if self._store is None and self.world_size > 1:
            import torch.distributed as dist

            addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
            if not addr or not port:  # a launch without env:// rendezvous variables: no heartbeats
                raise NoHeartbeats("MASTER_ADDR and MASTER_PORT are not set, so the ranks' heartbeats are not kept")
            self._store = dist.TCPStore(
                addr,
                int(port),
                is_master=False,
                timeout=timedelta(seconds=2 * self.beat_s),
                wait_for_workers=False,
            )
        return self._store

    def _beat(self) -> None:
        try:
            if self._client() is not None:
                self._store.add(f"pretrain/beat/{self.rank}", 1)
        except Exception:  # noqa: BLE001 - a store that does not answer is reported on expiry, not here
            pass

    def silent_ranks(self) -> str:
        """Which ranks stopped beating, read twice a few beats apart."""
        try:
            store = self._client()
            if store is None:
                return ""
            keys = [f"pretrain/beat/{r}" for r in range(self.world_size)]
            before = [store.add(k, 0) for k in keys]
            for _ in range(3):  # keep beating meanwhile: the other live ranks may be expiring and reading too
                time.sleep(self.beat_s)
                self._beat()
            after = [store.add(k, 0) for k in keys]
        except NoHeartbeats as e:
            return f"; which rank stopped is not known ({e})"
        except Exception:  # noqa: BLE001 - whatever the store raises, it did not answer
            return f"; the rendezvous store does not answer: its host, {store_host()}, froze or died"
        silent = [str(r) for r, (b, a) in enumerate(zip(before, after, strict=True)) if a == b and r != self.rank]
        return f"; rank {', '.join(silent)} stopped responding (frozen or dead)" if silent else ""

    def _expire(self, what: str | None) -> None:
        suspects = self.silent_ranks()
        line = (
            f"error: rank {self.rank}: {what} did not finish within train.collective_timeout_s={self.timeout_s:g} s"
            f"{suspects}; stopping this rank (exit {exit_codes.STALLED})\n"
        )
        sys.stdout.flush()
        os.write(2, line.encode())
        os._exit(exit_codes.STALLED)
