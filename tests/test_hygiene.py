"""Launches leave /dev/shm as they found it (DeepSpeed's CPU all-reduce buffers, `pretrain.train.shm`) and end in
order (`pretrain.train.lifecycle`)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.ports import free_port
from pretrain.train import shm

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "helpers" / "make_ds_checkpoint.py"
DS_SOURCE = Path(__import__("deepspeed").__file__).parent / "ops" / "csrc" / "cpu" / "comm" / "shm.cpp"

pytestmark = pytest.mark.skipif(not shm.SHM_DIR.is_dir(), reason="no /dev/shm (Linux only)")


def _fake(tag: str) -> Path:
    """A buffer name of this user that no real run can have (its address field is not an address)."""
    return shm.SHM_DIR / shm.buffer_name(0, f"h5test-{os.getpid()}-{tag}", "0")


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear within {seconds} s"
        time.sleep(0.05)


def test_buffer_name_is_deepspeeds():
    """The name rule of the installed DeepSpeed (shm.cpp), which `buffer_name` repeats."""
    src = DS_SOURCE.read_text()
    assert f'#define SHM_BUFFER_NAME "{shm.PREFIX}"' in src
    assert re.search(r'"%s_%d_%s_%s",\s*SHM_BUFFER_NAME,\s*getuid\(\),\s*addr_string,\s*port_string\)', src)
    assert 'snprintf(shm_name, NAME_BUF_SIZE, "%s_%d", shm_name_prefix, rank);' in src
    assert shm.buffer_name(1, "127.0.0.1", "29500", uid=7) == "deepspeed_allreduce_buffer_7_127.0.0.1_29500_1"


_HOLDER = """
import mmap, os, sys
mapped = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(mapped, 4096)
os.close(mapped)  # held through the mapping only
opened = os.open(sys.argv[2], os.O_RDWR)  # held through the descriptor only, as between shm_open and mmap
open(sys.argv[3], "w").close()
sys.stdin.read()
"""


def test_orphans_are_removed_and_buffers_of_live_processes_kept(tmp_path):
    orphan, mapped, opened = _fake("orphan"), _fake("mapped"), _fake("opened")
    ready = tmp_path / "ready"
    try:
        for p in (orphan, mapped, opened):
            p.write_bytes(bytes(4096))
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(mapped), str(opened), str(ready)], stdin=subprocess.PIPE
        )
        try:
            _wait_for(ready, holder)
            assert shm.remove_orphans([orphan, mapped, opened]) == [orphan]
            assert not orphan.exists() and mapped.exists() and opened.exists()
        finally:
            holder.communicate(timeout=60)  # closing its stdin ends it
        assert shm.remove_orphans([mapped, opened]) == [mapped, opened]  # nobody holds them now
    finally:
        for p in (orphan, mapped, opened):
            p.unlink(missing_ok=True)


_RANK = """
import sys, time
from pretrain.train import shm
shm.install()
shm.own_buffer().write_bytes(b"x")  # stands in for DeepSpeed's shm_open(O_CREAT) in init_distributed
if sys.argv[1] == "error":
    raise SystemExit("error: stands in for a failed run")
if sys.argv[1] == "sigterm":
    time.sleep(120)
"""


@pytest.mark.parametrize("how,code", [("normal", 0), ("error", 1), ("sigterm", -signal.SIGTERM)])
def test_a_rank_unlinks_its_own_buffer_at_exit(tmp_path, how, code):
    port = f"h5test{os.getpid()}{how}"
    own, peer = shm.SHM_DIR / shm.buffer_name(1, "127.0.0.1", port), shm.SHM_DIR / shm.buffer_name(0, "127.0.0.1", port)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    peer.write_bytes(b"x")
    held = os.open(peer, os.O_RDONLY)  # another rank's buffer, held by a live process (this one): not to be removed
    try:
        proc = subprocess.Popen([sys.executable, "-c", _RANK, how], env=env, stderr=subprocess.PIPE, text=True)
        try:
            if how == "sigterm":
                _wait_for(own, proc)
                proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == code, err
        assert not own.exists() and peer.exists()
    finally:
        os.close(held)
        own.unlink(missing_ok=True)
        peer.unlink(missing_ok=True)


_MAIN = """
import atexit
from pretrain.train.lifecycle import run_rank
atexit.register(print, "exit handler ran")
def main():
    print("main ran", end="")  # no newline: stdout to a pipe is block-buffered, so only a flush writes it
    return 3
run_rank(main)
print("never reached")
"""


def test_run_rank_exits_with_mains_code_after_the_exit_handlers():
    p = subprocess.run(
        [sys.executable, "-c", _MAIN],
        env={**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (p.returncode, p.stdout) == (3, "main ranexit handler ran\n"), p.stderr


def test_a_launch_leaves_no_buffer_and_removes_dead_runs_buffers(tmp_path):
    """A real 2-rank DeepSpeed launch on CPU: it creates its buffers, and none is left after it."""
    orphan = _fake("dead-run")
    orphan.write_bytes(bytes(4096))
    port = free_port()
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [
        str(launcher),
        "--num_gpus",
        "2",
        "--master_port",
        str(port),
        str(HELPER),
        str(tmp_path / "run"),
        "--stage",
        "1",
        "--steps",
        "1",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{launcher.parent}{os.pathsep}{os.environ['PATH']}"}
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        # the launcher set LOCAL_SIZE == world size and the ranks loaded the op: each created its buffer
        assert "deepspeed_shm_comm_op built successfully" in p.stdout + p.stderr
        assert [n for n in os.listdir(shm.SHM_DIR) if f"_{port}_" in n] == []
        assert not orphan.exists()  # removed by the launch's start-up cleanup
    finally:
        orphan.unlink(missing_ok=True)


def test_a_rank_killed_by_sigkill_leaves_no_buffer(digits_shards, tmp_path):
    """Exit handlers never run under SIGKILL (or the OOM killer): the names are unlinked right after start-up."""
    port = free_port()
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(port), "--module", "pretrain.train"]
    cmd += ["--config", "configs/tiny_digits.yaml", f"data.train_shards={digits_shards}", "data.num_workers=0"]
    cmd += [f"data.val_shards={digits_shards}"]  # not the config's demo_out/ folder, which a fresh clone lacks
    cmd += [f"run.output_dir={tmp_path / 'run'}", "train.steps=3", "train.micro_batch_size=8"]
    cmd += ["train.global_batch_size=16", "log.tensorboard=false", "log.every_steps=1"]
    env = {**os.environ, "PRETRAIN_FAULT": "step:2", "PATH": f"{launcher.parent}{os.pathsep}{os.environ['PATH']}"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "train step 1 " in out, out[-3000:]  # rank 0 was killed after step 2
    assert "deepspeed_shm_comm_op built successfully" in out  # the ranks did create their buffers
    assert [n for n in os.listdir(shm.SHM_DIR) if f"_{port}_" in n] == []
