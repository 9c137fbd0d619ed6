"""Loaders let their program end: their workers ignore SIGTERM (so that SLURM's signal reaches only the rank), so
the loaders stop them themselves: at exit, on `close()` / `with`, and after an error."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading

import pytest

from pretrain.config import DataConfig
from pretrain.data import build_eval_loader, build_train_loader

# A user's script: one batch from a 2-worker loader, the iterator kept in a global, no close(), return.
SCRIPT = """
import sys
from pretrain.config import DataConfig
from pretrain.data import build_eval_loader, build_train_loader
cfg = DataConfig(train_shards=sys.argv[1], val_shards=sys.argv[1], num_workers=2)
build = build_train_loader if sys.argv[2] == "train" else build_eval_loader
it = iter(build(cfg, img_size=32, batch_size=8, pin_memory=False))
batch = next(it)
print("one batch", tuple(batch["image"].shape), flush=True)
"""
EXIT_S = 30  # after its last line; without the fix the script never ends


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_a_script_that_takes_one_batch_and_returns_exits(digits_shards, kind, tmp_path):
    err = tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(digits_shards), kind],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,  # its own process group: the workers are killed with it if it hangs
        )
    guard = threading.Timer(600, os.killpg, (proc.pid, signal.SIGKILL))  # imports take long on a loaded machine
    guard.start()
    try:
        line = proc.stdout.readline()
        assert line.startswith("one batch (8, 3, 32, 32)"), err.read_text()
        code = proc.wait(timeout=EXIT_S)
    finally:
        guard.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 0, err.read_text()


def _children() -> set:
    return set(multiprocessing.active_children())


def test_close_and_with_stop_the_workers(digits_shards):
    cfg = DataConfig(train_shards=str(digits_shards), val_shards=str(digits_shards), num_workers=2)
    before = _children()
    with build_train_loader(cfg, img_size=32, batch_size=8, pin_memory=False) as loader:
        it = iter(loader)
        next(it)
        workers = _children() - before
        assert len(workers) == 2
    assert not workers & _children()
    assert next(it, None) is None  # a closed loader yields nothing more

    evaluation = build_eval_loader(cfg, img_size=32, batch_size=8, pin_memory=False)
    with evaluation:
        first = [batch["key"] for batch in evaluation]
        workers = _children() - before
        assert len(workers) == 2  # they persist between passes
    assert not workers & _children()
    assert [batch["key"] for batch in evaluation] == first  # a pass after close() starts new workers
    evaluation.close()
    assert _children() <= before
