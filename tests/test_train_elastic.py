"""Elastic resume of a real run (DeepSpeed on CPU ranks): a 2-rank run stopped at 40 % of an epoch, converted to a
universal checkpoint and resumed on 1 rank and on 4 ranks with the same global batch, trains on exactly the
uninterrupted run's samples, step by step, through the end of the epoch and into the next (the ranks' logged keys
compared), with losses within a stated tolerance."""

from __future__ import annotations

import collections
import json
import shutil
import sys
from pathlib import Path

import pytest

from pretrain.ports import free_port
from pretrain.train.universal import main as universal_main
from tests.test_train import DEEPSPEED, losses, run_logged

pytestmark = pytest.mark.slow
GLOBAL, STOP, UNTIL = 64, 11, 30  # 4 canonical streams: an epoch of 1,747 digits is 27 steps; stopped at 41 %
LOSS_TOLERANCE = 0.02
"""Absolute loss difference allowed per step: the same samples and weights, summed in another order (another
partitioning of ZeRO's reductions, another micro-batch size in the bf16 matmuls)."""
RUN = [
    "--config",
    "configs/tiny_digits.yaml",
    "data.val_shards=",
    "data.num_workers=1",
    "data.canonical_streams=4",
    "train.precision=fp32",
    f"train.global_batch_size={GLOBAL}",
    f"train.steps={UNTIL}",
    f"checkpoint.every_steps={STOP}",
    "checkpoint.keep_last=5",
    "log.every_steps=1",
    "log.tensorboard=false",
]


def train(shards: Path, out: Path, ranks: int, micro: int, *extra: str) -> None:
    """Run `pretrain.train` on `ranks` CPU ranks (1: a plain process), logging every micro-batch's keys."""
    keys = out.parent / f"{out.name}_keys"
    keys.mkdir(exist_ok=True)
    args = [*RUN, f"data.train_shards={shards}", f"run.output_dir={out}", f"train.micro_batch_size={micro}", *extra]
    if ranks == 1:
        cmd = [sys.executable, "-m", "pretrain.train", *args]
    else:
        cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module", "pretrain.train"]
        cmd += args
    log = out.parent / f"{out.name}.log"
    assert run_logged(cmd, log, env={"PRETRAIN_KEY_LOG": str(keys)}, timeout=900) == 0, log.read_text()[-3000:]


def keys_by_step(folder: Path, first_step: int, accum: int) -> dict[int, list[str]]:
    """Every rank's logged keys as the global batch of each step (sorted)."""
    steps: dict[int, list[str]] = collections.defaultdict(list)
    for f in folder.glob("keys-*.jsonl"):
        for i, line in enumerate(f.read_text().splitlines()):
            steps[first_step + i // accum] += json.loads(line)
    return {s: sorted(k) for s, k in steps.items()}


def test_resume_on_1_and_4_ranks_trains_on_the_uninterrupted_runs_samples(digits_shards, tmp_path):
    ref = tmp_path / "ref"
    train(digits_shards, ref, 2, GLOBAL // 2)
    expected = keys_by_step(tmp_path / "ref_keys", 1, 1)
    assert sorted(expected) == list(range(1, UNTIL + 1)) and all(len(k) == GLOBAL for k in expected.values())
    epoch = collections.Counter(k for s in range(1, 28) for k in expected[s])
    assert max(epoch.values()) == 1  # every sample at most once in epoch 0 (steps 1-27)

    for ranks, micro in ((1, GLOBAL // 2), (4, GLOBAL // 4)):  # 1 rank: 2 micro-batches per step
        run = tmp_path / f"on_{ranks}"
        shutil.copytree(ref, run)
        for tag in sorted((run / "checkpoints").glob("step_*")):
            if int(tag.name.split("_")[1]) > STOP:
                shutil.rmtree(tag)
        (run / "checkpoints" / "latest").write_text(f"step_{STOP:08d}")
        assert universal_main([str(run / "checkpoints" / f"step_{STOP:08d}")]) == 0
        uni = run / "checkpoints" / f"step_{STOP:08d}_universal"
        train(digits_shards, run, ranks, micro, f"train.resume={uni}")
        got = keys_by_step(tmp_path / f"on_{ranks}_keys", STOP + 1, GLOBAL // (ranks * micro))
        assert got == {s: expected[s] for s in range(STOP + 1, UNTIL + 1)}, ranks  # 0 repeated, 0 skipped
        ours, theirs = losses(run), losses(ref)
        diffs = [abs(ours[s] - theirs[s]) for s in range(STOP + 1, UNTIL + 1)]
        print(f"on {ranks} ranks: max |loss - uninterrupted loss| over steps {STOP + 1}-{UNTIL} = {max(diffs):.2e}")
        assert max(diffs) <= LOSS_TOLERANCE, (ranks, [f"{d:.2e}" for d in diffs])
