"""Launches that never collide on a port: `pretrain.launch` hosts the rendezvous store itself on a port it takes
when it starts (another one if that port was taken between the choice and the bind), and holds it until its last
rank has exited; a launch that follows waits until every process of the previous one is gone."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from pretrain import exit_codes, launch
from pretrain.ports import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def taken_port():
    """A port another process holds (listening on every address, as a running rendezvous store does)."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_chosen_port_taken_before_the_bind_is_replaced_by_another(taken_port, monkeypatch, capsys):
    chosen = iter([taken_port, free_port()])
    monkeypatch.setattr(launch, "free_port", lambda: next(chosen))  # the race: the choice is taken before the bind
    args = launch.parse_args(["--nproc-per-node=2"])
    store = launch.host_store(args)
    assert args.master_port not in (None, taken_port)
    client = dist.TCPStore("127.0.0.1", args.master_port, is_master=False)  # the ranks reach the store there
    client.set("k", "v")
    assert store.get("k") == b"v"
    assert f"port {taken_port} was taken before the rendezvous store could bind it; taking another" in (
        capsys.readouterr().err
    )


def launch_cmd(*extra: str) -> list[str]:
    return [sys.executable, "-m", "pretrain.launch", "--nproc-per-node=2", *extra]


def test_a_given_port_that_is_taken_is_one_line_and_exit_2(taken_port, tmp_path):
    cmd = launch_cmd(f"--master-port={taken_port}", "--module=tests.helpers.fake_rank", "--", str(tmp_path))
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == exit_codes.USAGE, p.stderr[-3000:]
    assert p.stderr.strip().splitlines() == [
        f"error: --master-port {taken_port} cannot be used (address already in use); pass another port"
    ]
    assert not list(tmp_path.iterdir())  # no rank was started


def test_several_nodes_must_name_their_port(capsys):
    with pytest.raises(SystemExit) as e:
        launch.parse_args(["--nnodes=2", "--node-rank=1"])
    assert e.value.code == 2 and "--master-port is needed with --nnodes > 1" in capsys.readouterr().err


def test_launches_back_to_back_rendezvous_through_the_launchers_store(tmp_path):
    """Two launches in a row, each on a port of its own, its ranks clients of the launcher's store (a rank 0 that
    also tried to host it would fail on the port the launcher holds)."""
    ports = []
    for i in range(2):
        out = tmp_path / str(i)
        out.mkdir()
        cmd = launch_cmd("--module=tests.helpers.rendezvous_rank", "--", str(out))
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
        assert p.returncode == 0, p.stderr[-3000:]
        got = [(out / f"rank-{r}").read_text().split() for r in range(2)]
        assert [g[0] for g in got] == ["3", "3"] and got[0][1] == got[1][1]  # 1 + 2 over both ranks, one port
        ports.append(got[0][1])
    assert len(ports) == 2


def test_waiting_for_a_launch_waits_for_every_process_of_its_group():
    # the group's leader exits at once; a process it started lives on for a moment (a loader worker, say)
    proc = subprocess.Popen(["sh", "-c", "sleep 1 & exit 0"], start_new_session=True)
    assert proc.wait(timeout=30) == 0
    assert launch.wait_group_gone(proc.pid, timeout_s=60)
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)


def test_a_process_that_outlives_the_wait_is_killed():
    proc = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 60 & exit 0"], start_new_session=True)
    proc.wait(timeout=30)
    assert not launch.wait_group_gone(proc.pid, timeout_s=0.5)  # False: what was left had to be killed
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)
