"""Resampled mode's resume: the shuffle buffer refilled by random access where the draws stood, bit-identical to the
uninterrupted stream, bad data counted once; the reader's random access equal to its sequential reads."""

from __future__ import annotations

import random

import pytest
import torch

from data_tools.storage import IOPolicy
from pretrain.config import DataConfig
from pretrain.data import build_train_loader
from pretrain.data.reader import Reader, spans
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
    root, marker = bad_shards  # shard 0: 3 bad samples; shard 1: truncated (a bad shard at every draw)
    cfg = DataConfig(
        train_shards=str(root), mode="resampled", shuffle_buffer=8, num_workers=workers, max_bad_shards=1000
    )
    whole, end = _batches(cfg, 80)
    head, saved = _batches(cfg, 15)
    assert (saved["epoch"], saved["consumed"]) == (0, 15 * BATCH // saved["streams"])  # a position, no buffer
    tail, resumed_end = _batches(cfg, 65, saved)
    assert _same(head + tail, whole)
    assert (resumed_end["bad_samples"], resumed_end["bad_shards"]) == (end["bad_samples"], end["bad_shards"])
    assert end["bad_samples"] > 0 and end["bad_shards"] == [1]  # the run did meet the bad data
    assert not marker.exists()  # the .pyd payload was never unpickled


def test_random_access_gives_the_sequential_reads(digits_shards):
    urls = tuple(str(digits_shards / f"train-{i:06d}.tar") for i in range(3))
    reader = Reader(urls, (200, 200, 200), IOPolicy())
    sequential = {(s, i): item.raw.key for s in range(3) for i, item in reader.run(s, 0, 200)}
    rng = random.Random(0)
    wanted = {n: (rng.randrange(3), rng.randrange(200)) for n in range(150)}
    wanted[150] = wanted[3]  # one sample held twice
    got = Reader(urls, (200, 200, 200), reader.io).fetch(wanted)
    assert {n: item.raw.key for n, item in got.items()} == {n: sequential[w] for n, w in wanted.items()}


def test_spans_merge_the_smallest_gaps_within_the_wanted_count():
    assert spans([1, 2, 3, 7]) == [(1, 8)]  # 4 wanted, gap of 3
    assert spans([0, 10, 11, 30]) == [(0, 1), (10, 12), (30, 31)]  # gaps of 9 and 18 exceed 4 wanted
    wanted = sorted(random.Random(1).sample(range(1000), 100))  # in 94 runs of consecutive samples
    got = spans(wanted)
    assert all(any(a <= i < b for a, b in got) for i in wanted)
    assert sum(b - a for a, b in got) <= 2 * len(wanted)  # at most as many unwanted samples as wanted ones
    assert len(got) == 57  # requests: 57 instead of one per run
