"""Resampled mode's resume: the shuffle buffer refilled by random access and the source restored where it stood,
bit-identical to the uninterrupted stream, bad data counted once; held samples fetched again with their own seeds."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import DataConfig
from pretrain.data import build_train_loader
from pretrain.data.resampled import ShardDraws
from pretrain.data.stages import Counters, Indexes
from pretrain.data.stream import StreamSpec
from tests.test_stream_data import bad_shards  # noqa: F401 - the fixture

BATCH = 4


def _batches(cfg: DataConfig, n: int, state: dict | None = None) -> tuple[list[dict], dict]:
    loader = build_train_loader(cfg, img_size=16, batch_size=BATCH, seed=0)
    if state is not None:
        loader.load_state_dict(state)
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    st = loader.state_dict()
    it.close()
    return out, st


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x["key"] == y["key"] and torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_resampled_resume_is_bit_identical_and_counts_bad_data_once(bad_shards, workers):  # noqa: F811
    root, marker = bad_shards  # shard 0: 4 bad samples; shard 1: truncated (a bad shard at every draw)
    cfg = DataConfig(
        train_shards=str(root), mode="resampled", shuffle_buffer=8, num_workers=workers, max_bad_shards=1000
    )
    whole, end = _batches(cfg, 40)
    head, saved = _batches(cfg, 15)
    assert all(w["buffer"]["held"] for w in saved["workers"])  # every worker saved its buffer
    tail, resumed_end = _batches(cfg, 25, saved)
    assert _same(head + tail, whole)
    assert (resumed_end["bad_samples"], resumed_end["bad_shards"]) == (end["bad_samples"], end["bad_shards"])
    assert end["bad_samples"] > 0 and end["bad_shards"] > 0  # the run did meet the bad data
    replay = {**saved, "workers": [{**w, "buffer": None} for w in saved["workers"]]}  # a state from before buffers
    assert _same(_batches(cfg, 25, replay)[0], tail)
    assert not marker.exists()  # the .pyd payload was never unpickled


def test_fetch_returns_held_samples_in_order_with_their_own_seeds(digits_shards):
    urls = [str(digits_shards / f"train-{i:06d}.tar") for i in range(3)]
    spec = StreamSpec(urls=urls, lengths=None, batch_size=BATCH, rank=0, world_size=1, seed=0, transform=None)
    source = ShardDraws(spec, Counters(), Indexes(spec.io), (0, 0, 0, 0))
    drawn = [x for _, x in zip(range(450), source, strict=False)]  # more than two shards' worth
    by_n = {x.v[0]: x for x in drawn}
    held = [[7, *by_n[7].v[1:]], [300, *by_n[300].v[1:]], [2, *by_n[2].v[1:]], [9, *by_n[7].v[1:]]]
    got = ShardDraws(spec, Counters(), Indexes(spec.io), (0, 0, 0, 0)).fetch(held)
    assert [x.v for x in got] == [tuple(h) for h in held]
    assert [x.raw.key for x in got[:3]] == [by_n[n].raw.key for n in (7, 300, 2)]
    assert [x.seed for x in got[:3]] == [by_n[n].seed for n in (7, 300, 2)]
    # the same sample held twice (its shard drawn twice): the same bytes, its own seed
    assert got[3].raw.key == got[0].raw.key and got[3].seed != got[0].seed


def test_restored_source_hands_on_the_same_samples(digits_shards):
    urls = [str(digits_shards / f"train-{i:06d}.tar") for i in range(9)]
    spec = StreamSpec(urls=urls, lengths=None, batch_size=BATCH, rank=0, world_size=1, seed=5, transform=None)
    seed_of = (5, 0, 1, 0)
    whole = ShardDraws(spec, Counters(), Indexes(spec.io), seed_of)
    it = iter(whole)
    head = [next(it) for _ in range(333)]
    state = whole.state()
    rest = [next(it) for _ in range(250)]  # crosses into the next shard draws
    again = ShardDraws(spec, Counters(), Indexes(spec.io), seed_of)
    again.restore(state)
    got = [x for _, x in zip(range(250), again, strict=False)]
    assert [(x.v, x.seed, x.raw.key) for x in got] == [(x.v, x.seed, x.raw.key) for x in rest]
    assert head[-1].v[0] == 333 and got[0].v[0] == 334
