"""The two-node SLURM lab of `launch/slurm_lab.sh` as a test object: start it, submit jobs, watch them, stop it."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAB_SCRIPT = ROOT / "launch" / "slurm_lab.sh"
TIME_LIMIT_CHECK = "Testing job time limits and checkpoints"  # slurmctld's log line (debug2) for that check
CHECK_PERIOD_S = 30  # slurmctld's PERIODIC_TIMEOUT: how often it tests time limits and sends --signal warnings
SKIP_REASON = (
    "SLURM lab tests skipped: {why}. Enable them as root with `apt-get install -y slurm-wlm munge` "
    "(`make test` does it when run as root)"
)


def unavailable() -> str | None:
    """Why this machine cannot run the lab, or None when it can."""
    missing = [cmd for cmd in ("slurmctld", "slurmd", "munged", "sbatch", "unshare") if shutil.which(cmd) is None]
    if missing:
        return SKIP_REASON.format(why=f"{', '.join(missing)} not installed")
    if os.geteuid() != 0:
        return SKIP_REASON.format(why="the lab's daemons need root")
    return None


class SlurmLab:
    """A running lab in `folder`: munged, slurmctld and nodes n1, n2 (NodeAddr 127.0.0.1, each with its own tmpfs
    at `nodetmp`, the TMPDIR jobs get)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.nodetmp = folder / "nodetmp"
        self.env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf"), "TMPDIR": str(self.nodetmp)}

    @classmethod
    def start(cls, folder: Path) -> tuple[SlurmLab | None, str]:
        """Start a lab; returns (lab, "") or (None, the reason it did not start, with the lab stopped again)."""
        lab = cls(folder)
        proc = subprocess.run(
            ["bash", str(LAB_SCRIPT), "start", str(folder)], capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            lab.stop()
            lines = (proc.stderr or proc.stdout).strip().splitlines() or [f"exit code {proc.returncode}"]
            return None, SKIP_REASON.format(why=f"the lab did not start ({lines[-1]})")
        return lab, ""

    def stop(self) -> None:
        """Cancel every job, end every daemon and job process of the lab (bounded waits inside the script)."""
        if (self.folder / "slurm.conf").exists():
            subprocess.run(["bash", str(LAB_SCRIPT), "stop", str(self.folder)], capture_output=True, timeout=300)

    def pids(self) -> list[int]:
        """The lab's processes still alive: its daemons and the processes of its jobs."""
        out = subprocess.run(["bash", str(LAB_SCRIPT), "pids", str(self.folder)], capture_output=True, text=True)
        return [int(pid) for pid in out.stdout.split()]

    def run(self, *cmd: str, env: dict | None = None, timeout: float = 30) -> str:
        """A SLURM client command against this lab; its stdout (raises on a non-zero exit)."""
        proc = subprocess.run(cmd, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def sbatch(self, *args: str, env: dict | None = None) -> int:
        """Submit from the repository root (the folder configs/ is relative to); returns the job id."""
        cmd = ["sbatch", "--parsable", "--chdir", str(ROOT), *args]
        return int(self.run(*cmd, env=env).strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o` as a dict: JobState, Restarts, ExitCode (code:signal), ..."""
        fields = self.run("scontrol", "show", "job", str(job_id), "-o").split()
        return dict(f.split("=", 1) for f in fields if "=" in f)

    def wait_job(self, job_id: int, done, timeout: float, what: str) -> dict[str, str]:
        """Poll the job until `done(job)` holds; fails naming `what` and the job's last state after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if done(job):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id}: {what} not within {timeout:.0f} s; last state {job}")
            time.sleep(0.5)

    def run_seconds(self, job_id: int) -> int:
        """The job's run time so far (suspended time excluded), from RunTime=[D-]HH:MM:SS."""
        days, _, hms = self.job(job_id)["RunTime"].rpartition("-")
        h, m, s = (int(x) for x in hms.split(":"))
        return int(days or 0) * 86400 + h * 3600 + m * 60 + s

    def time_limit_checks(self) -> list[float]:
        """When slurmctld tested time limits so far (time.time() values): it does every 30 s and logs it (debug2)."""
        log = self.folder / "log" / "slurmctld.log"
        stamps = [line[1:24] for line in log.read_text().splitlines() if TIME_LIMIT_CHECK in line]
        return [datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%f").timestamp() for s in stamps]

    def next_time_limit_check(self) -> float:
        """When slurmctld will next test time limits (time.time()), at least 2 s from now."""
        deadline = time.monotonic() + 40
        while not (checks := self.time_limit_checks()):
            assert time.monotonic() < deadline, f"no '{TIME_LIMIT_CHECK}' in slurmctld.log within 40 s"
            time.sleep(0.5)
        at = checks[-1] + CHECK_PERIOD_S
        while at < time.time() + 2:  # that one is (nearly) past: the one after
            at += CHECK_PERIOD_S
        return at

    def wait_nodes_released(self, timeout: float = 60) -> None:
        """Until no node is still cleaning up a job (COMPLETING), then 2 s more: slurmd revokes an ended job's
        credential with a timestamp in whole seconds, and a requeued job started on a node within that second is
        killed as "Job credential revoked" (seen on a loaded machine)."""
        deadline = time.monotonic() + timeout
        while "COMPLETING" in self.run("scontrol", "show", "node", "-o").upper():
            assert time.monotonic() < deadline, f"nodes still COMPLETING after {timeout} s"
            time.sleep(0.2)
        time.sleep(2)

    def wait_ended(self, job_id: int, timeout: float) -> dict[str, str]:
        """The job's record once it has ended (completed, failed, cancelled or timed out), not merely requeued."""
        ended = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}
        return self.wait_job(job_id, lambda j: j["JobState"] in ended, timeout, "end")
