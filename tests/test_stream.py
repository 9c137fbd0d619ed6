"""The training stream on digits shards made by data_tools: coverage, equal ranks, determinism, exact resume on the
same layout (other layouts: tests/test_stream_elastic.py)."""

from __future__ import annotations

import collections
import itertools
import json
from pathlib import Path

import pytest
import torch

from pretrain.config import DataConfig
from pretrain.data import StreamState, build_eval_loader, build_train_loader
from pretrain.data.decode import label_of, read_shard

BS = 16
TOTAL = 1747


@pytest.fixture
def shards(digits_shards) -> Path:
    """Digits shards from conftest: 9 uneven train shards (8 x 200 + 147 = 1,747 samples), 50 val samples."""
    return digits_shards


def cfg_for(shards: Path, **kw) -> DataConfig:
    return DataConfig(train_shards=str(shards), val_shards=str(shards), shuffle_buffer=64, num_workers=2, **kw)


def run(cfg, rank=0, world=1, n=None, state=None, workers=2, bs=BS, seed=0, img=16):
    """First `n` batches (default: one epoch) of one rank; returns (batches, loader state after them)."""
    loader = build_train_loader(
        cfg, img_size=img, batch_size=bs, rank=rank, world_size=world, seed=seed, num_workers=workers
    )
    if state is not None:
        loader.load_state_dict(state)
    it = iter(loader)
    out = list(itertools.islice(it, loader.batches_per_epoch if n is None else n))
    st = loader.state_dict()
    it.close()
    return out, st


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def all_keys(shards: Path, split: str = "train") -> list[str]:
    info = json.loads((shards / "_info.json").read_text())["splits"][split]
    return [raw.key for f in info["filenames"] for _, raw in read_shard(str(shards / f))]


def test_every_sample_once_per_epoch_2_ranks_2_workers(shards):
    cfg = cfg_for(shards)
    per_rank = [run(cfg, rank=r, world=2)[0] for r in range(2)]
    seen = collections.Counter(k for b in per_rank for k in keys_of(b))
    everything = set(all_keys(shards))
    assert len(everything) == TOTAL
    assert max(seen.values()) == 1  # nothing duplicated across ranks or workers
    assert set(seen) <= everything
    assert len(seen) == TOTAL // (2 * BS) * 2 * BS  # drop: only the last partial global batch is left out
    b = per_rank[0][0]
    assert b["image"].dtype == torch.uint8 and b["image"].shape == (BS, 3, 16, 16)
    assert b["label"].dtype == torch.int64 and b["label"].shape == (BS,)
    info = json.loads((shards / "_info.json").read_text())["splits"]["train"]
    cls = {raw.key: label_of(raw)[0] for f in info["filenames"] for _, raw in read_shard(str(shards / f))}
    assert b["label"].tolist() == [cls[k] for k in b["key"]]  # each image with its own .cls


class FakeClock:
    """`time.perf_counter` that advances one unit per call, plus what the test adds: timings become exact."""

    def __init__(self) -> None:
        self.t = 0.0

    def perf_counter(self) -> float:
        self.t += 1.0
        return self.t - 1.0


def test_stats_report_throughput_and_wait(shards, monkeypatch):
    import pretrain.data.loader as loader_module

    clock = FakeClock()
    monkeypatch.setattr(loader_module, "time", clock)
    loader = build_train_loader(cfg_for(shards), img_size=16, batch_size=BS, num_workers=2)
    it = iter(loader)
    next(it)
    loader.stats()  # reset after start-up: 1 unit
    for _ in range(10):
        clock.t += 9.0  # the training step between two batches: not waiting for data
        next(it)  # 2 units: t0 on resume, t1 after the batch arrived; waited 1 unit
    st = loader.stats()
    it.close()
    # 1 + 10 x (9 + 2) = 111 units since the reset, 10 of them waiting, 10 batches of BS images
    assert st["images_per_s"] == pytest.approx(10 * BS / 111, rel=1e-12)
    assert st["data_wait_fraction"] == pytest.approx(10 / 111, rel=1e-12)
    assert st["bad_samples"] == 0 and st["bad_shards"] == 0


def test_wrap_mode_covers_everything(shards):
    cfg = cfg_for(shards, remainder="wrap")
    per_rank = [run(cfg, rank=r, world=2)[0] for r in range(2)]
    seen = collections.Counter(k for b in per_rank for k in keys_of(b))
    assert set(seen) == set(all_keys(shards))
    assert len(per_rank[0]) == len(per_rank[1]) == -(-TOTAL // (2 * BS))
    assert sum(seen.values()) - TOTAL == sum(v - 1 for v in seen.values()) < 2 * BS  # top-up repeats only


@pytest.mark.parametrize("world,workers", [(2, 2), (3, 2), (4, 1), (3, 0)])
def test_equal_batch_counts_with_uneven_shards(shards, world, workers):
    cfg = cfg_for(shards)
    expected = TOTAL // (world * BS)
    for r in range(world):
        batches, st = run(cfg, rank=r, world=world, workers=workers, n=expected + 1)
        # batch expected + 1 is already epoch 1's first: every rank had exactly `expected` batches in epoch 0
        assert (st["epoch"], StreamState.from_dict(st).batches) == (1, 1)
        assert len(batches) == expected + 1


def test_same_seed_same_order_other_seed_or_epoch_differs(shards):
    cfg = cfg_for(shards)
    a, _ = run(cfg, n=5)
    b, _ = run(cfg, n=5)
    c, _ = run(cfg, n=5, seed=1)
    assert keys_of(a) == keys_of(b)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))
    assert keys_of(a) != keys_of(c)
    per_epoch = TOTAL // BS
    two, _ = run(cfg, n=2 * per_epoch)
    assert keys_of(two[:per_epoch]) != keys_of(two[per_epoch:])


@pytest.mark.parametrize("k", [1, 7, 30])
def test_resume_same_world_is_bit_identical(shards, k):
    cfg = cfg_for(shards)
    full = [run(cfg, rank=r, world=2, n=40)[0] for r in range(2)]
    states = [run(cfg, rank=r, world=2, n=k)[1] for r in range(2)]
    for r in range(2):
        rest, _ = run(cfg, rank=r, world=2, n=40 - k, state=states)
        assert keys_of(rest) == keys_of(full[r][k:])
        for x, y in zip(rest, full[r][k:], strict=True):
            assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])


def test_resume_across_epoch_boundary(shards):
    cfg = cfg_for(shards, remainder="wrap")
    per_epoch = -(-TOTAL // BS)  # wrap mode
    full, _ = run(cfg, n=per_epoch + 5, workers=2)
    _, st = run(cfg, n=per_epoch - 2, workers=2)
    rest, st2 = run(cfg, n=7, workers=2, state=[st])
    assert keys_of(rest) == keys_of(full[per_epoch - 2 :])
    assert st2["epoch"] == 1 and StreamState.from_dict(st2).batches == 5


def test_eval_loader_every_sample_once_same_steps(shards):
    cfg = cfg_for(shards)
    seen, lens = collections.Counter(), []
    for r in range(3):
        loader = build_eval_loader(cfg, img_size=16, batch_size=BS, rank=r, world_size=3, num_workers=2)
        batches = list(loader)
        lens.append(len(batches))
        assert len(batches) == len(loader)
        for b in batches:
            assert b["image"].shape == (BS, 3, 16, 16) and b["mask"].dtype == torch.bool
            seen.update(k for k, m in zip(b["key"], b["mask"].tolist(), strict=True) if m)
    assert lens == [lens[0]] * 3
    assert sorted(seen) == sorted(all_keys(shards, "val")) and max(seen.values()) == 1


def test_resampled_mode_infinite_and_resumable(shards):
    cfg = cfg_for(shards, mode="resampled")
    full, _ = run(cfg, n=150)  # more than one epoch's worth: the stream does not end
    assert len(full) == 150 and len(set(keys_of(full))) < 150 * BS  # shards drawn with replacement
    _, st = run(cfg, n=60)
    rest, _ = run(cfg, n=90, state=[st])
    assert keys_of(rest) == keys_of(full[60:])
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(rest, full[60:], strict=True))


@pytest.mark.parametrize("workers", [0, 1])
def test_loaders_leave_torchs_global_rng_alone(shards, workers):
    """Dropout draws from torch's global RNG; if starting a loader drew from it too, a resumed run (which starts its
    loader after restoring the saved RNG state) would get other dropout masks than the uninterrupted run."""
    cfg = DataConfig(train_shards=str(shards), val_shards=str(shards), shuffle_buffer=64, num_workers=workers)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    train = build_train_loader(cfg, img_size=16, batch_size=BS, seed=0)
    it = iter(train)
    next(it)
    it.close()
    assert torch.equal(torch.get_rng_state(), before)
    next(iter(build_eval_loader(cfg, img_size=16, batch_size=BS)))
    assert torch.equal(torch.get_rng_state(), before)


def test_workers_fork_from_the_fork_server_and_count_in_the_stats(shards):
    """The workers are children of the fork server (a small process started before any model), not of the process
    that iterates the loader; their memory (with the server's) is in `stats()`."""
    import multiprocessing.forkserver
    import os

    import psutil

    loader = build_train_loader(cfg_for(shards), img_size=16, batch_size=BS, num_workers=2, pin_memory=False)
    with loader:
        it = iter(loader)
        next(it)
        workers = [w.pid for w in loader._it._workers]
        server = multiprocessing.forkserver._forkserver._forkserver_pid
        assert len(workers) == 2 and {psutil.Process(p).ppid() for p in workers} == {server} != {os.getpid()}
        assert loader.stats()["workers_gib"] > 0
    in_process = build_train_loader(cfg_for(shards), img_size=16, batch_size=BS, num_workers=0)
    with in_process:
        next(iter(in_process))
        assert in_process.stats()["workers_gib"] == 0


def test_workers_see_the_loaders_environment_and_folder_not_the_fork_servers(tmp_path, monkeypatch):
    """The fork server is started once (by the first loader, or the Trainer); a loader made after a change of the
    environment (credentials set by a fixture or a script) or of the working folder gives its workers those."""
    from pretrain.data.workers import make_dataloader, start_server
    from tests.helpers.probe import EnvProbe

    start_server()
    monkeypatch.setenv("PROBE_AFTER_SERVER_START", "set later")
    monkeypatch.chdir(tmp_path)
    dl = make_dataloader(EnvProbe("PROBE_AFTER_SERVER_START"), num_workers=1, pin_memory=False, prefetch=1)
    it = iter(dl)
    try:
        assert list(next(it)) == ["set later", str(tmp_path)]
    finally:
        it._shutdown_workers()


KILLED = """
import os, sys
from pretrain.config import DataConfig
from pretrain.data import build_train_loader
if __name__ == "__main__":
    loader = build_train_loader(DataConfig(train_shards=sys.argv[1], num_workers=2), img_size=16, batch_size=8)
    it = iter(loader)
    next(it)
    with open(sys.argv[2], "w") as f:
        f.write(" ".join(str(w.pid) for w in loader._it._workers))
    os.kill(os.getpid(), 9)
"""


def test_workers_end_when_their_rank_is_killed(shards, tmp_path):
    """A rank killed outright (SIGKILL, the OOM killer) cannot stop its workers, and they are not its children:
    they end by themselves, and so does the fork server."""
    import subprocess
    import sys
    import time

    import psutil

    script, out = tmp_path / "killed.py", tmp_path / "pids"
    script.write_text(KILLED)
    done = subprocess.run([sys.executable, str(script), str(shards), str(out)], stdout=subprocess.DEVNULL, timeout=600)
    pids = [int(p) for p in out.read_text().split()]
    assert len(pids) == 2 and done.returncode == -9
    deadline = time.monotonic() + 60
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids):
        if time.monotonic() > deadline:
            for p in pids:  # ours: not left behind for the next test
                psutil.Process(p).kill()
            raise AssertionError("the workers outlived their rank")
        time.sleep(0.2)
