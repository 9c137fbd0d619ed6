"""Faults a cluster throws at a job, each a non-event: a stop signal (preemption, time limit) saves the last finished
step and the restart continues bit for bit; a frozen rank ends the launch within the watchdog's bound; a save that
fails keeps the previous checkpoint; the launcher forwards signals once and ends the ranks when one fails."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from pretrain import exit_codes
from pretrain.checkpoint_format import complete_tags
from pretrain.data.loader import _dataloader
from pretrain.ports import free_port
from tests.test_train import BASE, DEEPSPEED, fp32_weights, losses

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
RUN = [*BASE, f"train.steps={STEPS}", "checkpoint.every_steps=100"]  # periodic checkpoints far apart


def train_args(shards: Path, out: Path, stage: int, *extra: str) -> list[str]:
    return [
        "--config",
        "configs/tiny_digits.yaml",
        f"data.train_shards={shards}",
        f"data.val_shards={shards}",
        f"run.output_dir={out}",
        f"deepspeed.zero_stage={stage}",
        *RUN,
        *extra,
    ]


def ours(args: list[str], nproc: int = 2) -> list[str]:
    """`python -m pretrain.launch` on this machine's CPU."""
    return [sys.executable, "-m", "pretrain.launch", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
            "--", *args]  # fmt: skip


def deepspeeds(args: list[str]) -> list[str]:
    return [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "pretrain.train", *args]


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """A launch in its own process group (the group a scheduler signals), output to `log`."""
    with open(log, "w") as f:
        return subprocess.Popen(
            cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def finish(proc: subprocess.Popen, timeout: float) -> int:
    """The launcher's exit code once every process of its group is gone, all within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    try:
        code = proc.wait(timeout=timeout)
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return code
            time.sleep(0.1)
        raise AssertionError(f"processes of the launch still alive {timeout} s after the signal")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run(cmd: list[str], log: Path, env: dict | None = None) -> int:
    return finish(start(cmd, log, env), timeout=400)


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count('"kind": "train"') if path.exists() else 0


def wait_for_step(proc: subprocess.Popen, out: Path, log: Path, step: int) -> None:
    deadline = time.monotonic() + 300
    while logged_steps(out) < step:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"the run did not reach step {step}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(digits_shards, tmp_path_factory):
    """Final weights and losses of the uninterrupted runs, by ZeRO stage (stage 3 also saves every ~0.1 minute)."""
    runs = {}
    for stage, extra in ((2, []), (3, ["checkpoint.every_minutes=0.002"])):
        out = tmp_path_factory.mktemp("preempt") / f"ref{stage}"
        log = out.parent / "ref.log"
        assert run(ours(train_args(digits_shards, out, stage, *extra)), log) == 0, log.read_text()[-3000:]
        runs[stage] = out
    return runs


def check_resumes_bit_identically(cmd: list[str], out: Path, log: Path, reference: Path, stopped_at: int) -> None:
    assert run(cmd, log) == 0, log.read_text()[-3000:]
    assert f"at step {stopped_at}" in log.read_text()  # "resumed from ... at step N"
    assert losses(out) == losses(reference)
    tag = f"step_{STEPS:08d}"
    mine, ref = fp32_weights(out, tag), fp32_weights(reference, tag)
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)


@pytest.mark.parametrize(
    "launcher, target, sig, stage",
    [
        ("ours", "group", signal.SIGTERM, 2),  # as SLURM does at a time limit or scancel: every process
        ("ours", "launcher", signal.SIGUSR1, 3),  # SLURM's early warning, to the launcher only
        ("deepspeed", "group", signal.SIGTERM, 2),  # deepspeed's runner dies at once; its child re-signals the ranks
    ],
)
def test_stop_signal_saves_the_last_finished_step_and_the_restart_is_bit_identical(
    uninterrupted, digits_shards, tmp_path, launcher, target, sig, stage
):
    out, log = tmp_path / "run", tmp_path / "run.log"
    cmd = (ours if launcher == "ours" else deepspeeds)(train_args(digits_shards, out, stage))
    proc = start(cmd, log)
    wait_for_step(proc, out, log, random.randint(2, 6))
    (os.killpg if target == "group" else os.kill)(proc.pid, sig)
    code = finish(proc, timeout=120)

    text = log.read_text()
    stopped_at = logged_steps(out)  # every step is logged: the last one the ranks finished
    assert 2 <= stopped_at < STEPS, text[-3000:]
    assert f"preempted at step {stopped_at}: checkpoint saved" in text, text[-3000:]
    assert complete_tags(out / "checkpoints") == [(stopped_at, f"step_{stopped_at:08d}")]  # 0 steps lost
    assert (out / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"
    if launcher == "ours":
        assert code == exit_codes.PREEMPTED  # on "group" a rank gets SIGTERM twice (or once, merged by the kernel)
        check_resumes_bit_identically(cmd, out, tmp_path / "resume.log", uninterrupted[stage], stopped_at)
    else:
        assert code != 0  # the runner died of the signal at once; its ranks still saved (resuming is as above)


def test_time_based_checkpoints(uninterrupted):
    """checkpoint.every_minutes saved steps that checkpoint.every_steps (100) never would."""
    steps = [s for s, _ in complete_tags(uninterrupted[3] / "checkpoints")]
    assert steps[-1] == STEPS and len(steps) >= 2 and all(s % 100 for s in steps[:-1])


def test_a_frozen_rank_ends_the_launch_within_the_timeout(digits_shards, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    proc = start(ours(train_args(digits_shards, out, 2, "train.steps=2000", "train.collective_timeout_s=20")), log)
    wait_for_step(proc, out, log, 3)
    rank1 = next(p for p in psutil.Process(proc.pid).children() if "--local_rank=1" in p.cmdline())
    rank1.suspend()  # SIGSTOP
    try:
        code = finish(proc, timeout=110)
    finally:
        if rank1.is_running():
            rank1.kill()
    text = log.read_text()
    assert code == exit_codes.STALLED, text[-3000:]
    assert "did not finish within train.collective_timeout_s=20 s; rank 1 stopped responding" in text, text[-3000:]


def test_a_failed_save_keeps_the_previous_checkpoint(uninterrupted, digits_shards, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    cmd = ours(train_args(digits_shards, out, 2, "checkpoint.every_steps=5"))
    code = finish(start(cmd, log, env={"PRETRAIN_FAULT": "diskfull:10"}), timeout=120)
    text = log.read_text()
    assert code == exit_codes.USAGE, text[-3000:]
    assert (
        "error: rank 1: saving the checkpoint at step 10 failed: [Errno 28] No space left on device (PRETRAIN_FAULT); "
        "the previous checkpoint step_00000005 is intact and resume picks it" in text
    ), text[-3000:]
    assert complete_tags(out / "checkpoints") == [(5, "step_00000005")]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000005"
    check_resumes_bit_identically(cmd, out, tmp_path / "resume.log", uninterrupted[2], 5)


# The launcher alone, with stand-in ranks (tests/helpers/fake_rank.py): fast, no DeepSpeed.


def fake_launch(tmp_path: Path, stop_timeout: float, *rank_args: str, nproc: int = 3) -> tuple[subprocess.Popen, Path]:
    """Node 1 of 2 with `nproc` stand-in ranks; returns once every rank has set its signal handlers."""
    ready = tmp_path / "ready"
    ready.mkdir()
    launcher = [sys.executable, "-m", "pretrain.launch", f"--nproc-per-node={nproc}", "--nnodes=2", "--node-rank=1",
                f"--master-port={free_port()}"]  # fmt: skip
    cmd = [*launcher, "--module=tests.helpers.fake_rank", f"--stop-timeout={stop_timeout}", "--", *rank_args]
    cmd.append(str(ready))
    proc = start(cmd, tmp_path / "launch.log")
    deadline = time.monotonic() + 60
    while len(list(ready.glob("rank-*"))) < nproc and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc, ready


def test_launcher_forwards_a_stop_signal_once_and_reports_preempted(tmp_path):
    proc, ready = fake_launch(tmp_path, 60)
    assert sorted(p.name for p in ready.glob("rank-*")) == ["rank-3", "rank-4", "rank-5"]  # node 1 of 2, 3 per node
    assert {p.read_text() for p in ready.glob("rank-*")} == {"6"}
    os.kill(proc.pid, signal.SIGUSR1)
    os.kill(proc.pid, signal.SIGUSR1)  # a second one is not passed on
    assert finish(proc, timeout=60) == exit_codes.PREEMPTED
    assert [p.read_text() for p in sorted(ready.glob("signals-*"))] == ["1", "1", "1"]


def test_a_stop_signal_while_the_ranks_still_start_waits_for_their_handlers(tmp_path):
    ready = tmp_path / "ready"
    ready.mkdir()
    launcher = [sys.executable, "-m", "pretrain.launch", "--nproc-per-node=2", "--module=tests.helpers.fake_rank"]
    proc = start([*launcher, "--", "--slow-start", str(ready)], tmp_path / "launch.log")
    time.sleep(1)  # the ranks are still in their 2 s of "imports"
    os.killpg(proc.pid, signal.SIGTERM)  # to every process, as SLURM does
    assert finish(proc, timeout=60) == exit_codes.PREEMPTED
    assert sorted(p.name for p in ready.glob("signals-*")) == ["signals-0", "signals-1"]


def test_launcher_ends_the_other_ranks_when_one_fails(tmp_path):
    proc, _ = fake_launch(tmp_path, 60, "--fail-rank=4")
    assert finish(proc, timeout=60) == 3
    assert "rank 4 exited with 3: stopping the rest" in (tmp_path / "launch.log").read_text()


def test_launcher_kills_ranks_that_do_not_finish_saving(tmp_path):
    proc, _ = fake_launch(tmp_path, 1, "--deaf")
    os.kill(proc.pid, signal.SIGTERM)
    assert finish(proc, timeout=60) == exit_codes.FAILED
    assert "did not finish saving within --stop-timeout=1 s" in (tmp_path / "launch.log").read_text()


class _Numbers(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from range(10**6)


def test_loader_workers_outlive_stop_signals_and_a_dead_worker_is_an_error():
    it = iter(_dataloader(_Numbers(), num_workers=1, pin_memory=False, prefetch=2))
    assert next(it) == 0
    (worker,) = it._workers
    for s in (signal.SIGTERM, signal.SIGUSR1):  # what SLURM sends every process of the step
        os.kill(worker.pid, s)
    time.sleep(0.5)
    assert [next(it) for _ in range(5)] == [1, 2, 3, 4, 5] and worker.is_alive()
    os.kill(worker.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="DataLoader worker .* exited unexpectedly|killed by signal"):
        for _ in range(10**6):  # the prefetched batches first, then the error (torch checks every 5 s at most)
            next(it)
    del it
