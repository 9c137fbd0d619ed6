"""launch/slurm.sbatch without SLURM: bash runs the batch script with a fake `scontrol` and `srun` on PATH; the fake
srun runs the script's real per-node command, whose `python` is a fake launcher that records its arguments and, like
`pretrain.launch`, exits 75 (checkpoint saved) on USR1 or TERM. Signals go to the batch script as SLURM sends them."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "launch" / "slurm.sbatch"
CONFIG = "configs/tiny_digits.yaml"

# `scontrol`: two nodes whose names do not resolve; n1's address is 10.9.8.7. `requeue` is recorded.
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
  "show hostnames") printf 'n1\\nn2\\n' ;;
  "show node") echo "NodeName=$3 Arch=x86_64 CoresPerSocket=1 NodeAddr=10.9.8.7 NodeHostName=host-$3 Port=6818" ;;
  "requeue "*) [ -z "${FAKE_NO_REQUEUE:-}" ] || { echo "Requested operation is presently disabled" >&2; exit 1; }
               echo "$2" >> "$FAKE/requeued" ;;
  *) echo "fake scontrol: unexpected $*" >&2; exit 1 ;;
esac
"""
# `srun`: records its options, then runs the command after them as node 1 of 2 would (SLURM_NODEID=1).
FAKE_SRUN = """#!/usr/bin/env bash
while [ "${1#--}" != "$1" ]; do echo "$1" >> "$FAKE/srun_options"; shift; done
SLURM_NODEID=1 exec "$@"
"""
# The launcher: records argv, waits (bounded) for a signal; USR1/TERM -> "saves" and exits 75. FAKE_RC: exit at once.
FAKE_PYTHON = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE/launch_args"
on_signal() { echo "$1" >> "$FAKE/step_signals"; kill "$sleeper" 2>/dev/null; sleep 0.2; exit 75; }
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
[ -z "${FAKE_RC:-}" ] || exit "$FAKE_RC"
sleep 30 & sleeper=$!
touch "$FAKE/started"
wait "$sleeper"
exit 0
"""


@pytest.fixture
def fake(tmp_path):
    """A folder holding the fake commands; the environment SLURM gives a batch script on the first of 2 nodes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"scontrol": FAKE_SCONTROL, "srun": FAKE_SRUN, "python": FAKE_PYTHON}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        FAKE=str(tmp_path),
        PYTHON=str(bin_dir / "python"),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="n[1-2]",
        SLURM_NNODES="2",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_CPUS_ON_NODE="6",
    )
    return tmp_path, env


def start(env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", str(SBATCH), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def run_until_step_started(folder: Path, env: dict, *args: str) -> subprocess.Popen:
    """The batch script with its job step running (the fake launcher's signal handlers installed)."""
    proc = start(env, *args)
    deadline = time.monotonic() + 20
    while not (folder / "started").exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the fake job step did not start within 20 s"
        time.sleep(0.05)
    return proc


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        out = proc.communicate(timeout=20)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, out


def read(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_early_warning_is_forwarded_to_the_step_and_the_job_requeued(fake):
    folder, env = fake
    proc = run_until_step_started(folder, env, "--cpu", CONFIG, "train.steps=7")
    proc.send_signal(signal.SIGUSR1)  # SLURM's --signal=B:USR1@N: the batch shell only
    rc, out = finish(proc)
    assert rc == 75, out
    assert read(folder / "step_signals") == ["USR1"]
    assert read(folder / "requeued") == ["4242"]
    assert "requeueing job 4242" in out
    # the per-node command: ranks from the allocation, rendezvous at n1's NodeAddr, config and overrides passed on
    port = str(20000 + 4242 % 20000)
    assert read(folder / "launch_args") == [
        *("-m", "pretrain.launch", "--nproc-per-node", "1", "--nnodes", "2", "--node-rank", "1"),
        *("--master-addr", "10.9.8.7", "--master-port", port, "--", "--config", CONFIG, "train.steps=7"),
    ]
    assert read(folder / "srun_options") == [
        *("--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=0", "--cpus-per-task=6"),
    ]


def test_refused_requeue_still_ends_with_the_saved_checkpoint(fake):
    """`sbatch --no-requeue`: scontrol refuses; the job ends with 75 and says how to continue."""
    folder, env = fake
    proc = run_until_step_started(folder, {**env, "FAKE_NO_REQUEUE": "1"}, "--cpu", CONFIG)
    proc.send_signal(signal.SIGUSR1)
    rc, out = finish(proc)
    assert rc == 75 and not (folder / "requeued").exists()
    assert "requeue refused: submit the same command again to resume" in out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_to_batch_script_reaches_the_step_as_usr1(fake, sig):
    """srun ends its step at once on TERM: the step must always be sent USR1, the signal it passes on."""
    folder, env = fake
    proc = run_until_step_started(folder, env, "--cpu", CONFIG)
    proc.send_signal(sig)
    rc, _ = finish(proc)
    assert rc == 75 and read(folder / "step_signals") == ["USR1"]


def test_term_saves_and_stops_without_requeue(fake):
    folder, env = fake
    proc = run_until_step_started(folder, env, "--cpu", CONFIG)
    proc.send_signal(signal.SIGTERM)  # scancel --batch --signal=TERM
    rc, out = finish(proc)
    assert rc == 75 and not (folder / "requeued").exists()
    assert "job stopped: submit the same command again to resume" in out


@pytest.mark.parametrize("step_rc", ["0", "1", "75"])
def test_step_exit_code_is_the_jobs_and_only_the_warning_requeues(fake, step_rc):
    """A step that saved after `scancel --signal=TERM` (to the step, not this script) exits 75: no requeue."""
    folder, env = fake
    rc, out = finish(start({**env, "FAKE_RC": step_rc}, "--cpu", CONFIG))
    assert rc == int(step_rc), out
    assert not (folder / "requeued").exists()


def test_ranks_per_node_from_gpus_or_the_argument(fake):
    folder, env = fake
    for extra_env, args, ranks in [
        ({"SLURM_GPUS_ON_NODE": "4"}, [], "4"),
        ({"SLURM_GPUS_ON_NODE": "4"}, ["--ranks-per-node", "2"], "2"),
        ({"SLURM_NTASKS_PER_NODE": "3"}, ["--cpu"], "3"),
    ]:
        rc, out = finish(start({**env, **extra_env, "FAKE_RC": "0"}, *args, CONFIG))
        assert rc == 0, out
        launch_args = read(folder / "launch_args")
        assert launch_args[launch_args.index("--nproc-per-node") + 1] == ranks


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([CONFIG], "the job holds no GPUs: sbatch --gpus-per-node N ..., or pass --cpu for CPU ranks"),
        (["--cpu", "no/such.yaml"], "config no/such.yaml does not exist"),
        (["--ranks-per-node", "x", "--cpu", CONFIG], "ranks per node must be a positive number, got 'x'"),
        (["--gpu", CONFIG], "unknown option --gpu"),
    ],
)
def test_bad_input_exits_2_with_one_line(fake, args, message):
    folder, env = fake
    rc, out = finish(start(env, *args))
    assert rc == 2 and out.count("\n") == 1 and out.startswith("error: slurm.sbatch: ") and message in out, out
    assert not (folder / "launch_args").exists()
