"""The run's own counters and random state: step, samples seen, non-finite steps, every rank's RNG."""

from __future__ import annotations

from typing import Any

import torch

from pretrain.train.distributed import gather, rng_state, set_rng_state


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses in a row); the message says why."""


class TrainState:
    """Step and sample counters, the non-finite step count, and this rank's random state.

    Creating it seeds this rank: mixup draws from its own generator (so resume reproduces it) and dropout /
    drop-path masks differ per rank. Build it after the model and the loaders, whose seeding comes first.
    """

    def __init__(self, seed: int, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.step, self.samples_seen, self.nonfinite_steps = 0, 0, 0
        self.nonfinite_in_a_row = 0  # not checkpointed: a resumed run starts counting again
        self.mixup_rng = torch.Generator().manual_seed(seed * 1000 + rank)
        torch.manual_seed(seed * 1000 + rank)

    def advance(self, global_batch_size: int) -> None:
        """Count one optimizer step of `global_batch_size` images."""
        self.step += 1
        self.samples_seen += global_batch_size

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

    def state_dict(self) -> dict[str, Any]:
        """Counters and every rank's RNG state (a collective)."""
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "nonfinite_steps": self.nonfinite_steps,  # not "skipped_steps": DeepSpeed keeps that key for itself
            "rng": gather(rng_state(self.mixup_rng)),
        }

    def load_state_dict(self, client: dict[str, Any]) -> None:
        """Restore the counters; the RNG state only when the world size is the same (otherwise ranks differ)."""
        self.step, self.samples_seen = client["step"], client["samples_seen"]
        self.nonfinite_steps = client["nonfinite_steps"]
        if len(client["rng"]) == self.world_size:
            set_rng_state(client["rng"][self.rank], self.mixup_rng)
