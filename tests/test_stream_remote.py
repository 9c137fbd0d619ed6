"""Shards over HTTP and S3 (real servers on 127.0.0.1): the same batches as local disk, faults retried at the same
sample, a missing shard counted and named, and resume reading O(shuffle buffer) wherever the run stopped."""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from data_tools import format as fmt
from data_tools.__main__ import main as data_tools_main
from data_tools.info import describe
from data_tools.storage import IOPolicy, read_bytes
from data_tools.verify import verify
from pretrain.data import build_eval_loader, build_train_loader, resolve_shards
from pretrain.data.decode import BadShard, read_shard
from tests.helpers.servers import FaultProxy, MotoServer, ShardServer
from tests.test_stream import BS, cfg_for, run
from tests.test_train import fp32_weights, launch, losses

BUFFER = 64  # cfg_for's data.shuffle_buffer
CHUNK = 8192


@pytest.fixture(scope="module")
def moto(digits_shards):
    """moto's S3 server holding the digits shards under s3://shards/digits/; the AWS environment points at it."""
    with MotoServer() as m:
        url = m.upload(digits_shards, "shards", "digits")
        saved = {k: os.environ.get(k) for k in m.env}
        os.environ.update(m.env)
        yield url
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def remote_cfg(url: str, **kw):
    return cfg_for(url, io_chunk_bytes=CHUNK, **kw)


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x["key"] == y["key"] and torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
        for x, y in zip(a, b, strict=True)
    )


def test_http_and_s3_give_the_local_batches(digits_shards, moto):
    local, _ = run(remote_cfg(str(digits_shards)), n=12)
    with ShardServer(digits_shards) as srv:
        http, st = run(remote_cfg(srv.url + "/"), n=12)
        assert srv.requests > 0
        pattern = srv.url + "/train-{000000..000008}.tar"  # a brace pattern takes its counts from _info.json
        assert resolve_shards(pattern).lengths == resolve_shards(str(digits_shards)).lengths
    s3, _ = run(remote_cfg(moto), n=12)
    assert same_batches(local, http) and same_batches(local, s3)
    assert (st["epoch"], st["consumed"]) == (0, 12 * BS // st["streams"])  # the state is a position
    # the index written by `data_tools shard`: a read from sample 150's byte gives samples 150.. of the shard
    offsets = fmt.parse_index((digits_shards / fmt.index_name("train-000001.tar")).read_bytes())
    with open(digits_shards / "train-000001.tar", "rb") as f:
        assert fmt.scan_index(f) == offsets
    want = [raw.key for _, raw in read_shard(str(digits_shards / "train-000001.tar"), 150, 160)]
    with ShardServer(digits_shards) as srv:
        url = srv.url + "/train-000001.tar"
        got = [(i, raw.key) for i, raw in read_shard(url, 150, 160, offsets)]
        served = srv.served
    assert got == list(zip(range(150, 160), want, strict=True))
    assert served == offsets[160] - offsets[150]  # exactly the ten samples' bytes


def remote_epoch(url: str, **kw) -> tuple[list[dict], dict, dict]:
    """One epoch of one rank with 2 workers over `url`: (batches, state, stats)."""
    loader = build_train_loader(remote_cfg(url, **kw), img_size=16, batch_size=BS, num_workers=2)
    it = iter(loader)
    got = [next(it) for _ in range(loader.batches_per_epoch)]
    state, stats = loader.state_dict(), loader.stats()
    it.close()
    return got, state, stats


def test_faults_are_retried_at_the_same_sample(digits_shards):
    ref, _ = run(cfg_for(digits_shards))
    schedule = {2: "reset", 3: "503", 5: "stall", 7: "reset", 8: "reset", 11: "503"}
    with ShardServer(digits_shards) as srv, FaultProxy(srv.url, schedule, stall_s=4.0) as proxy:
        got, state, stats = remote_epoch(proxy.url + "/", io_timeout_s=2.0, io_retries=4)
        injected = proxy.injected
    assert injected == len(schedule)
    # every range is read to its end (the index bounds it), so every fault is met and retried (a response slowed
    # past the timeout by a loaded machine would add a retry of its own: hence >=)
    assert stats["io_retries"] >= injected and stats["storage_bytes_per_s"] > 0
    assert same_batches(ref, got)  # every fault retried where it broke: the batches of the fault-free run
    assert not state["bad_shards"]  # none


def test_a_404_shard_is_counted_and_named_and_the_run_goes_on(digits_shards, tmp_path):
    missing = "train-000004.tar"
    local = tmp_path / "local"  # the reference: the same shards on local disk without that shard
    shutil.copytree(digits_shards, local)
    (local / missing).unlink()
    ref, ref_state = run(cfg_for(local))
    with ShardServer(digits_shards) as srv, FaultProxy(srv.url, {}, missing=(missing,)) as proxy:
        got, state, _ = remote_epoch(proxy.url + "/")
    assert same_batches(ref, got)
    assert state["bad_shards"] == ref_state["bad_shards"] == [4]  # the shard's index in the list


def test_data_tools_shard_to_s3_then_info_and_verify_over_s3_and_http(digits_dir, digits_shards, moto, tmp_path):
    url = "s3://shards/written/"
    args = ["--staging", str(tmp_path / "staging"), "--val-per-class", "5", "--samples-per-shard", "200"]
    assert data_tools_main(["shard", str(digits_dir), url, *args, "--no-progress"]) == 0
    local = resolve_shards(str(digits_shards))
    assert resolve_shards(url).lengths == local.lengths  # the same shards, with _info.json, uploaded
    assert read_bytes(url + "train-000003.tar.idx") == (digits_shards / "train-000003.tar.idx").read_bytes()
    assert data_tools_main(["verify", url, "--workers", "1", "--no-progress"]) == 0
    with ShardServer(digits_shards) as srv:
        assert describe(srv.url + "/")["splits"] == describe(digits_shards)["splits"]  # bytes, counts, nothing missing
        report = verify(srv.url + "/", workers=1, progress=False)
        assert report["ok"] and report["indexes"] == report["shards"] == 10  # each .idx read over HTTP and checked
    assert data_tools_main(["shard", str(digits_dir), "http://127.0.0.1:1/x/", "--no-progress"]) == 2  # no output


def test_retries_exhausted_make_a_bad_shard_with_the_cause(digits_shards):
    with ShardServer(digits_shards) as srv, FaultProxy(srv.url, {1: "503", 2: "503", 3: "503"}) as proxy:
        with pytest.raises(BadShard, match=r"train-000000.tar: unreadable \(HTTP 503; gave up after 2 retries"):
            list(read_shard(proxy.url + "/train-000000.tar", policy=IOPolicy(retries=2, backoff_s=0.01)))


def touched(log: list[tuple[str, int, int]], root: Path) -> int:
    """Samples whose bytes a list of served (path, start, stop) ranges overlaps (with repeats), over all shards."""
    n = 0
    for path, a, b in log:
        if path.endswith(".tar"):
            offsets = fmt.parse_index((root / fmt.index_name(path.lstrip("/"))).read_bytes())
            n += sum(1 for i in range(len(offsets) - 1) if offsets[i] < b and a < offsets[i + 1])
    return n


FRACTIONS = (0.1, 0.5, 0.9)


@pytest.fixture(scope="module")
def one_epoch(digits_shards) -> tuple[list[dict], dict[int, dict]]:
    """An uninterrupted epoch from local disk (0 workers) and the stream state after 10, 50 and 90 % of it."""
    loader = build_train_loader(cfg_for(digits_shards), img_size=16, batch_size=BS, num_workers=0)
    n = loader.batches_per_epoch
    at = {int(n * f) for f in FRACTIONS}
    batches, states, it = [], {}, iter(loader)
    for _ in range(n):
        batches.append(next(it))
        if len(batches) in at:
            states[len(batches)] = loader.state_dict()
    it.close()
    return batches, states


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_resume_reads_the_shuffle_buffer_not_the_epoch(digits_shards, one_epoch, fraction):
    """0 workers: the pipeline runs in this process, pulled one batch at a time, so the bytes are exact."""
    epoch, states = one_epoch
    k = int(len(epoch) * fraction)
    with ShardServer(digits_shards) as srv:
        loader = build_train_loader(remote_cfg(srv.url + "/"), img_size=16, batch_size=BS, num_workers=0)
        loader.load_state_dict(states[k])
        srv.reset_counts()
        it = iter(loader)
        first = next(it)
        reads = touched(srv.log, digits_shards)
        second = next(it)
        it.close()
    assert same_batches([first, second], epoch[k : k + 2])  # bit-identical after resume
    assert reads <= 3 * (BUFFER + 2 * BS)  # one canonical stream: held samples, gaps merged, the first batch's


@pytest.mark.slow
def test_two_rank_training_over_local_http_with_faults_and_s3_is_identical(digits_shards, moto, tmp_path):
    """The same 2-rank run from local disk, from HTTP through the fault-injecting proxy, and from S3."""
    steps = ["train.steps=3", "checkpoint.every_steps=3", "data.io_timeout_s=1", "train.eval_batches=1"]
    schedule = {1: "reset", 4: "503", 6: "stall", 9: "reset"}
    outs = {name: tmp_path / name for name in ("local", "http", "s3")}
    with ShardServer(digits_shards) as srv, FaultProxy(srv.url, schedule, stall_s=2.5) as proxy:
        sources = {"local": digits_shards, "http": proxy.url + "/", "s3": moto}
        with ThreadPoolExecutor(3) as pool:  # three launches at once: their start-up (imports) dominates
            rcs = dict(zip(sources, pool.map(lambda n: launch(sources[n], outs[n], *steps), sources), strict=True))
        injected = proxy.injected
    for name, rc in rcs.items():
        assert rc == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    assert injected == len(schedule) and "retrying" in (tmp_path / "http.log").read_text()
    rows = [json.loads(x) for x in (outs["http"] / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert all("io_retries" in r for r in train) and max(r["storage_mb_per_s"] for r in train) > 0
    assert "io retries" in (tmp_path / "http.log").read_text()  # the live line
    ref = fp32_weights(outs["local"], "step_00000003")
    for name in ("http", "s3"):
        assert losses(outs[name]) == losses(outs["local"]), name  # every step, exactly
        ours = fp32_weights(outs[name], "step_00000003")
        assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref), name


def test_remote_shards_without_an_index_are_read_from_their_start(digits_shards, one_epoch, tmp_path, caplog):
    bare = tmp_path / "bare"
    shutil.copytree(digits_shards, bare, ignore=shutil.ignore_patterns("*" + fmt.INDEX_SUFFIX))
    epoch, states = one_epoch
    k = int(len(epoch) * 0.5)
    with ShardServer(bare) as srv:
        loader = build_train_loader(remote_cfg(srv.url + "/"), img_size=16, batch_size=BS, num_workers=0)
        loader.load_state_dict(states[k])
        it = iter(loader)
        got = [next(it), next(it)]
        it.close()
    assert same_batches(got, epoch[k : k + 2])  # the same batches, at the price of the bytes before the samples
    assert "no sample index for" in caplog.text


def test_resampled_resume_reads_the_shuffle_buffer_not_the_run(digits_shards):
    """Resampled mode (0 workers, exact bytes): the held samples by random access and the current draw from the
    next input on, instead of every shard drawn since the start."""
    k = 100  # batches before the save (1,600 samples: far above the buffer bound)
    cfg = cfg_for(digits_shards, mode="resampled")
    loader = build_train_loader(cfg, img_size=16, batch_size=BS, num_workers=0)
    it = iter(loader)
    for _ in range(k):
        next(it)
    state = loader.state_dict()
    expected = [next(it), next(it)]
    it.close()
    with ShardServer(digits_shards) as srv:
        cfg = remote_cfg(srv.url + "/", mode="resampled")
        loader = build_train_loader(cfg, img_size=16, batch_size=BS, num_workers=0)
        loader.load_state_dict(state)
        srv.reset_counts()
        it = iter(loader)
        got = [next(it), next(it)]
        reads = touched(srv.log, digits_shards)
        it.close()
    assert same_batches(got, expected)  # bit-identical after resume
    assert reads <= 3 * (BUFFER + 2 * BS) < k * BS  # O(buffer), not the 1,600 samples drawn before the save


def test_remote_eval_reads_each_held_out_sample_once(digits_shards):
    """3 ranks split the 50 val samples of one shard; each reads its block by the shard's index, not from the start."""
    local = [
        list(build_eval_loader(cfg_for(digits_shards), img_size=16, batch_size=BS, rank=r, world_size=3, num_workers=0))
        for r in range(3)
    ]
    with ShardServer(digits_shards) as srv:
        srv.reset_counts()
        cfg = remote_cfg(srv.url + "/")
        remote = [
            list(build_eval_loader(cfg, img_size=16, batch_size=BS, rank=r, world_size=3, num_workers=0))
            for r in range(3)
        ]
        served = sum(b - a for path, a, b in srv.log if path.endswith(".tar"))
    offsets = fmt.parse_index((digits_shards / "val-000000.tar.idx").read_bytes())
    for a, b in zip(local, remote, strict=True):
        assert len(a) == len(b) and all(
            x["key"] == y["key"] and torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
            for x, y in zip(a, b, strict=True)
        )
    assert served == offsets[-1] - offsets[0]  # every byte once; before, ranks 1 and 2 read from the shard's start
