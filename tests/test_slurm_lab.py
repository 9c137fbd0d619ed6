"""launch/slurm.sbatch on a real SLURM: the two-node lab of launch/slurm_lab.sh (munged, slurmctld, `slurmd -N n1` and
`-N n2` on 127.0.0.1, node names that do not resolve, a private TMPDIR per node). Every job is 1 CPU rank per node.
Skipped, with the reason and how to enable them, where the lab cannot start (not root, packages missing)."""

from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint_format import tag_for
from pretrain.ports import free_port
from tests.helpers.slurm_lab import SlurmLab, unavailable
from tests.test_train import fp32_weights, losses, run_logged

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "launch" / "slurm.sbatch"
STEPS = 24  # enough steps that the few between a signal and the step the ranks agree on never reach the end
CONFIG = "configs/tiny_digits.yaml"
RUN = [
    f"train.steps={STEPS}",
    "train.micro_batch_size=16",
    "train.global_batch_size=32",
    "log.every_steps=1",
    f"checkpoint.every_steps={STEPS}",  # the periodic save only at the end: a mid-run checkpoint is the signal's
    "schedule.warmup_steps=2",
    "data.num_workers=1",
    "data.val_shards=",
    "log.tensorboard=false",
]
PREEMPTED = re.compile(r"preempted at step (\d+): checkpoint saved")


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """The lab, started once per session; stopped (every job and daemon) when the session ends."""
    why = unavailable()
    if why:
        pytest.skip(why)
    lab, why = SlurmLab.start(tmp_path_factory.mktemp("slurm_lab"))
    if lab is None:
        pytest.skip(why)
    yield lab
    lab.stop()
    assert not lab.pids(), "the SLURM lab left processes behind (launch/slurm_lab.sh pids)"


@pytest.fixture(scope="module")
def reference(digits_shards, tmp_path_factory) -> Path:
    """The same run on one machine: `python -m pretrain.launch` with 2 local ranks, uninterrupted."""
    out = tmp_path_factory.mktemp("slurm_reference") / "run"
    launch = [sys.executable, "-m", "pretrain.launch", "--nproc-per-node", "2", "--master-port", str(free_port())]
    cmd = [*launch, "--", "--config", CONFIG, *RUN, f"data.train_shards={digits_shards}", f"run.output_dir={out}"]
    log = out.parent / "run.log"
    assert run_logged(cmd, log, env={"PYTHONPATH": str(ROOT)}) == 0, log.read_text()[-3000:]
    return out


def submit(lab: SlurmLab, shards: Path, out: Path, *sbatch_options: str) -> int:
    """`sbatch --nodes=2 [options] launch/slurm.sbatch --cpu CONFIG ...` with its log beside `out`; the job id."""
    log = out.parent / f"{out.name}-%j.out"
    args = [*sbatch_options, str(SBATCH), "--cpu", CONFIG, *RUN, f"data.train_shards={shards}", f"run.output_dir={out}"]
    env = {"PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "MASTER_PORT": str(free_port())}
    return lab.sbatch("--nodes=2", f"--output={log}", *args, env=env)


def job_log(out: Path, job: int) -> str:
    path = out.parent / f"{out.name}-{job}.out"
    return path.read_text() if path.exists() else ""


def wait_for_step(out: Path, step: int, timeout: float = 400) -> None:
    """Until the run logged `step` (its ranks are then training, their signal handlers installed)."""
    deadline = time.monotonic() + timeout
    while logged_step(out) < step:
        assert time.monotonic() < deadline, f"{out} did not reach step {step} within {timeout:.0f} s"
        time.sleep(0.2)


def logged_step(out: Path) -> int:
    """The last training step in metrics.jsonl so far (0 before the first); a line being written is not read."""
    path = out / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return max((row["step"] for row in map(json.loads, lines) if row["kind"] == "train"), default=0)


def assert_same_weights(out: Path, reference: Path, tag: str) -> None:
    ours, ref = fp32_weights(out, tag), fp32_weights(reference, tag)
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)


def saved_step(out: Path, log: str) -> int:
    """The step the ranks said they saved at; it is the checkpoint `latest` names."""
    steps = [int(s) for s in PREEMPTED.findall(log)]
    assert steps, log[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == tag_for(steps[-1])
    return steps[-1]


def test_each_lab_node_has_its_own_tmpdir(lab, tmp_path):
    """The premise of the runs below: what the batch step writes in TMPDIR (as the old script's hostfile) is not
    there for the step on the other node, as on a cluster whose /tmp is local to each node."""
    script = tmp_path / "tmpdir.sh"
    script.write_text(
        "#!/bin/bash\necho hostfile > $TMPDIR/hostfile\n"
        "srun --ntasks-per-node=1 bash -c 'echo $SLURMD_NODENAME $(cat $TMPDIR/hostfile 2>/dev/null || echo none)'\n"
    )
    job = lab.sbatch("--nodes=2", f"--output={tmp_path / 'tmpdir.out'}", str(script))
    assert lab.wait_ended(job, timeout=60)["JobState"] == "COMPLETED"
    seen = sorted((tmp_path / "tmpdir.out").read_text().split("\n"))
    assert [line for line in seen if line] == ["n1 hostfile", "n2 none"]


def test_two_node_sbatch_gives_the_losses_of_one_machine(lab, reference, digits_shards, tmp_path):
    """Each node's step gets TMPDIR private to its node (above): nothing one node writes there is read by another."""
    out = tmp_path / "two_nodes"
    job = submit(lab, digits_shards, out)
    record = lab.wait_ended(job, timeout=400)
    log = job_log(out, job)
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert "2 nodes x 1 ranks, rendezvous 127.0.0.1:" in log  # NodeAddr: the names n1, n2 resolve nowhere
    assert losses(out) == losses(reference)  # every step, exactly
    assert_same_weights(out, reference, tag_for(STEPS))


def warn_at_next_check(lab: SlurmLab, job: int, out: Path) -> None:
    """Make one of slurmctld's time-limit checks send the job its `--signal` warning while the job runs.

    slurmctld tests time limits every 30 s and warns once the time left is within the signal's lead time plus those
    30 s; it skips a suspended job. So the job is suspended (stopped, that time not counted), its limit cut to leave
    70 to 130 s (the warning below is @100), and resumed 2 s before the next check: the warning lands after a few more
    steps. Should that check come before the resume took effect, the job waits, suspended, for the one after."""
    lab.run("scontrol", "suspend", str(job))
    minutes = math.ceil((lab.run_seconds(job) + 70) / 60)
    lab.run("scontrol", "update", f"JobId={job}", f"TimeLimit={minutes}")
    for _ in range(3):
        time.sleep(max(0.0, lab.next_time_limit_check() - 2 - time.time()))
        checks = len(lab.time_limit_checks())
        lab.run("scontrol", "resume", str(job))
        deadline = time.monotonic() + 10
        while len(lab.time_limit_checks()) == checks:
            assert time.monotonic() < deadline, "slurmctld's time-limit check did not come within 12 s"
            time.sleep(0.2)
        deadline = time.monotonic() + 2  # the warning reaches the batch script within a fraction of a second
        while "got SIGUSR1" not in job_log(out, job) and time.monotonic() < deadline:
            time.sleep(0.2)
        if "got SIGUSR1" in job_log(out, job):
            return
        lab.run("scontrol", "suspend", str(job))
    raise AssertionError(f"job {job} got no time-limit warning in 3 checks: {lab.job(job)}")


def test_time_limit_warning_saves_requeues_and_resumes_bit_identical(lab, reference, digits_shards, tmp_path):
    """`--time` + `--signal=B:USR1@100`: SLURM warns the batch script, the ranks save at the step they are in (none
    lost), the script requeues the job, and the job comes back, resumes and ends with the uninterrupted weights."""
    out = tmp_path / "warned"
    job = submit(lab, digits_shards, out, "--time=10", "--signal=B:USR1@100")
    wait_for_step(out, 1)
    warn_at_next_check(lab, job, out)
    # The reason of a requeued job is set by slurmctld's next scheduling pass: under load the job is first seen
    # PENDING with Reason=None, so wait for the hold itself (seen once in a loaded run).
    requeued = lab.wait_job(
        job,
        lambda j: j["Restarts"] == "1" and j["JobState"] == "PENDING" and j["Reason"] == "BeginTime",
        200,
        "requeue held until its BeginTime",
    )
    log = job_log(out, job)
    assert "got SIGUSR1" in log and f"requeueing job {job}" in log, log[-3000:]
    saved = saved_step(out, log)
    assert 1 <= saved < STEPS and logged_step(out) == saved  # the checkpoint is at the last step trained
    # SLURM holds a requeued job for a while (BeginTime, about 2 min) before it may start again: start it now, with
    # a limit long enough that no second warning comes.
    assert requeued["Reason"] == "BeginTime"
    lab.wait_nodes_released()
    lab.run("scontrol", "update", f"JobId={job}", "TimeLimit=10", "StartTime=now")
    record = lab.wait_ended(job, timeout=400)
    log = job_log(out, job)
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-3000:]
    assert "resumed from" in log
    assert losses(out) == losses(reference)
    assert_same_weights(out, reference, tag_for(STEPS))


def test_scancel_term_saves_at_the_current_step_and_stops(lab, digits_shards, tmp_path):
    """`scancel --signal=TERM` reaches the step's tasks (not the batch script): the ranks save at the step they are
    in and the job ends with 75 (checkpoint saved, not requeued: the same sbatch command continues)."""
    out = tmp_path / "term"
    job = submit(lab, digits_shards, out)
    wait_for_step(out, 1)
    lab.run("scancel", "--signal=TERM", str(job))
    record = lab.wait_ended(job, timeout=200)
    log = job_log(out, job)
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("FAILED", "75:0", "0"), log[-3000:]
    saved = saved_step(out, log)
    assert 1 <= saved < STEPS and max(losses(out)) == saved
    assert (out / "checkpoints" / tag_for(saved) / "pretrain_meta.json").is_file()  # complete
    assert "job stopped: submit the same command again to resume" in log
