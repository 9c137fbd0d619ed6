"""The run's own counters and random state: step, samples seen, non-finite steps (`TrainState`), and every rank's
random generators (`RankRNG`), seeded once by `set_determinism`."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from pretrain.train.distributed import rng_state, set_rng_state


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses in a row); the message says why."""


def set_determinism(seed: int, rank: int) -> torch.Generator:
    """Seed this rank's random state, once per run, and return the mixup generator seeded alike.

    torch's global generator (dropout and drop-path masks, which differ per rank), Python's and NumPy's get
    `seed * 1000 + rank`; mixup draws from its own generator, which the checkpoint restores. The initial weights
    are drawn before this, from `run.seed` alone (the same on every rank: `Trainer.build`), so call it once every
    part is built.
    """
    rank_seed = seed * 1000 + rank
    torch.manual_seed(rank_seed)
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    return torch.Generator().manual_seed(rank_seed)


class RankRNG:
    """This rank's random generators (torch/CUDA, Python, NumPy and mixup's), checkpointed per rank.

    Args:
        mixup: the mixup generator `set_determinism` returned.
        rank, world_size: this rank and the number of ranks.
    """

    per_rank = True
    """The state differs per rank: the Checkpointer gathers every rank's `state_dict()` and hands back the list."""

    def __init__(self, mixup: torch.Generator, rank: int, world_size: int) -> None:
        self.mixup, self.rank, self.world_size = mixup, rank, world_size

    def state_dict(self) -> dict[str, Any]:
        """This rank's random state (no collective)."""
        return rng_state(self.mixup)

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        """Restore this rank's state from every rank's; on another world size the ranks go on unrestored (their
        streams would not line up with the saved ones anyway)."""
        if len(states) == self.world_size:
            set_rng_state(states[self.rank], self.mixup)


class TrainState:
    """Step and sample counters and the non-finite step count: the same on every rank."""

    per_rank = False
    """The same on every rank: the Checkpointer saves this rank's state as is."""

    def __init__(self) -> None:
        self.step, self.samples_seen, self.nonfinite_steps = 0, 0, 0
        self.nonfinite_in_a_row = 0  # not checkpointed: a resumed run starts counting again

    def advance(self, global_batch: int) -> None:
        """Count one optimizer step of `global_batch` images (`BatchPlan.global_batch`)."""
        self.step += 1
        self.samples_seen += global_batch

    def count_nonfinite(self, step_applied: bool, limit: int) -> None:
        """DeepSpeed skips the update of a step with non-finite gradients; `limit` such steps in a row stop the run."""
        if step_applied:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row >= limit:
            raise TrainingError(
                f"{self.nonfinite_in_a_row} steps in a row had non-finite gradients (at step {self.step}); lower "
                "optim.lr, check the data, or use train.precision=bf16"
            )

    def state_dict(self) -> dict[str, int]:
        """The counters (no collective)."""
        return {"step": self.step, "samples_seen": self.samples_seen, "nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.nonfinite_steps = state["nonfinite_steps"]
