"""The client state of a checkpoint: keyed by part, per-rank parts gathered at one point, and the flat layout of
checkpoints written before (a client state made by that code, `tests/fixtures/flat_client_state.pt`) still loads.

The fixture is the client state (everything but DeepSpeed's own keys) of `mp_rank_00_model_states.pt` at step 4 of
a 2-rank run of the code before this layout (commit 332af28, `deepspeed --num_gpus 2 --module pretrain.train
--config configs/tiny_digits.yaml` with tests/test_train.py's BASE overrides). The whole checkpoint, resumed bit for
bit, is tests/test_train.py::test_checkpoint_of_the_flat_layout_resumes_bit_identically.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from pretrain.ports import free_port
from pretrain.train import checkpointer as ckpt
from pretrain.train.distributed import PerRank
from pretrain.train.state import RankRNG, TrainState, set_determinism

FLAT = Path(__file__).parent / "fixtures" / "flat_client_state.pt"


class FakeEngine:
    """The engine's checkpoint calls, keeping the client state in memory."""

    def __init__(self, client: dict | None = None) -> None:
        self.client = client

    def save_checkpoint(self, ckpt_dir: Path, tag: str, client: dict) -> None:
        (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
        self.client = client

    def load_checkpoint(self, ckpt_dir: Path, tag: str) -> dict:
        return self.client


class Stream:
    """A stand-in for the TrainLoader: its state is what it was given."""

    def __init__(self, state: dict | None = None) -> None:
        self.state, self.loaded = state, None

    def state_dict(self) -> dict | None:
        return self.state

    def load_state_dict(self, states: list) -> None:
        self.loaded = states


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def checkpointer(tmp_path: Path, target: tuple[Path, str] | None = None) -> ckpt.Checkpointer:
    from pretrain.config import CheckpointConfig

    return ckpt.Checkpointer(CheckpointConfig(), tmp_path, total_steps=8, target=target, run_meta={})


def test_client_state_is_keyed_by_part_and_resumes(tmp_path, world_of_one):
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    state, rng = TrainState(), RankRNG(set_determinism(3, 0), 0, 1)
    state.advance(32)
    parts = {"state": state, "rng": rng, "stream": PerRank(Stream({"batches": 7}))}
    engine = FakeEngine()
    checkpointer(tmp_path).save(1, engine, parts, state.samples_seen)
    client = engine.client
    assert set(client) == {ckpt.PARTS, UNIVERSAL_CHECKPOINT_INFO}  # no part name meets one of DeepSpeed's keys
    saved = client[ckpt.PARTS]
    assert saved["state"] == {"step": 1, "samples_seen": 32, "nonfinite_steps": 0}  # shared: as is
    assert saved["stream"] == [{"batches": 7}] and len(saved["rng"]) == 1  # per rank: every rank's, in rank order
    expected = torch.rand(4)

    stream, fresh = Stream(), TrainState()
    again = {"state": fresh, "rng": RankRNG(torch.Generator(), 0, 1), "stream": PerRank(stream)}
    checkpointer(tmp_path, (tmp_path, "step_00000001")).resume(engine, again)
    assert fresh.state_dict() == saved["state"] and stream.loaded == [{"batches": 7}]
    assert torch.equal(torch.rand(4), expected)  # this rank's generator is back where it was saved


def test_checkpoint_of_the_flat_layout_loads_every_part(tmp_path, world_of_one):
    flat = torch.load(FLAT, weights_only=False)  # our own fixture: Python's and NumPy's RNG states are not tensors
    assert ckpt.PARTS not in flat and {"step", "rng", "stream"} <= set(flat)  # the layout of the code before
    ckpt.write_meta(tmp_path, "step_00000004", {"step": 4})
    for rank in (0, 1):  # the fixture was written by 2 ranks
        state, stream, mixup = TrainState(), Stream(), torch.Generator()
        parts = {"state": state, "rng": RankRNG(mixup, rank, 2), "stream": PerRank(stream)}
        checkpointer(tmp_path, (tmp_path, "step_00000004")).resume(FakeEngine(flat), parts)
        assert (state.step, state.samples_seen, state.nonfinite_steps) == (4, 128, 0)
        assert stream.loaded == flat["stream"] and [s["rank"] for s in stream.loaded] == [0, 1]
        saved = flat["rng"][rank]
        assert torch.equal(torch.get_rng_state(), saved["torch"]) and torch.equal(mixup.get_state(), saved["mixup"])
        assert random.getstate() == saved["python"]
        assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), saved["numpy"], strict=True))


def test_a_part_the_checkpoint_lacks_is_one_line(tmp_path, world_of_one):
    ckpt.write_meta(tmp_path, "step_00000004", {"step": 4})
    client = {ckpt.PARTS: {"state": {"step": 4, "samples_seen": 128, "nonfinite_steps": 0}}}
    with pytest.raises(ckpt.CheckpointError, match="holds no state for rng, stream; start fresh"):
        checkpointer(tmp_path, (tmp_path, "step_00000004")).resume(
            FakeEngine(client),
            {"state": TrainState(), "rng": RankRNG(torch.Generator(), 0, 1), "stream": PerRank(Stream())},
        )
