"""The elastic stream on real shards: a run stopped at 40 % of an epoch and resumed on another number of ranks or
workers consumes exactly the uninterrupted run's samples, global batch by global batch, through the epoch's end and
into the next (keys and images compared exactly); the loader's micro-batches equal the reference model's
(tests/helpers/elastic_model.py), bad data included; settings the order depends on cannot change on resume."""

from __future__ import annotations

import collections
import logging

import pytest
import torch

from data_tools import format as fmt
from pretrain.config import ConfigError, DataConfig
from pretrain.data import StreamState, build_train_loader
from pretrain.data.assign import Layout
from pretrain.data.decode import BadShard, read_shard
from pretrain.data.order import EpochOrder
from tests.helpers.elastic_model import rank_micro_batches
from tests.test_stream_data import bad_shards  # noqa: F401 - the fixture

C, G, BUFFER = 12, 48, 64  # 12 canonical streams: any of 1, 2, 3, 4, 6, 12 ranks; q = 4 outputs per stream per batch
EPOCH = 1747 // C // (G // C)  # 36 global batches per epoch (drop)
STOP, UNTIL = 14, 40  # stopped at 39 % of epoch 0; compared into epoch 1


def cfg_for(shards, **kw) -> DataConfig:
    return DataConfig(train_shards=str(shards), shuffle_buffer=BUFFER, canonical_streams=C, **kw)


def rank_loader(cfg, rank, world, workers, accum=1, global_batch=G):
    """Rank `rank` of `world`: micro-batches of global_batch / (world x accum)."""
    m = global_batch // (world * accum)
    return build_train_loader(
        cfg, img_size=16, batch_size=m, rank=rank, world_size=world, accum_steps=accum, num_workers=workers
    )


def global_batches(cfg, world, n, state=None, workers=2, accum=1):
    """`n` global batches over `world` ranks from `state` on: per batch its sorted (key, image bytes); and every
    rank's state after them."""
    per_rank, states = [], []
    for r in range(world):
        loader = rank_loader(cfg, r, world, workers, accum)
        if state is not None:
            loader.load_state_dict(state)
        with loader:
            it = iter(loader)
            per_rank.append([next(it) for _ in range(n * accum)])
            states.append(loader.state_dict())
    out = []
    for b in range(n):
        micro = [m for r in range(world) for m in per_rank[r][b * accum : (b + 1) * accum]]
        rows = [(k, img.numpy().tobytes()) for m in micro for k, img in zip(m["key"], m["image"], strict=True)]
        out.append(sorted(rows))
    return out, states


@pytest.fixture(scope="module")
def uninterrupted(digits_shards):
    """2 ranks x 2 workers: UNTIL global batches, and the state of every rank after STOP of them."""
    cfg = cfg_for(digits_shards)
    full, _ = global_batches(cfg, 2, UNTIL)
    _, states = global_batches(cfg, 2, STOP)
    return full, states


@pytest.mark.parametrize(("world", "workers", "accum"), [(1, 2, 1), (4, 2, 1), (2, 3, 1), (3, 1, 2)])
def test_resume_on_another_layout_consumes_the_uninterrupted_runs_samples(
    digits_shards, uninterrupted, world, workers, accum
):
    full, states = uninterrupted
    rest, _ = global_batches(cfg_for(digits_shards), world, UNTIL - STOP, states, workers, accum)
    assert rest == full[STOP:]  # through the end of epoch 0 and 4 batches into epoch 1
    epoch0 = collections.Counter(k for batch in full[:STOP] + rest[: EPOCH - STOP] for k, _ in batch)
    assert max(epoch0.values()) == 1 and len(epoch0) == EPOCH * G  # 0 repeated, 0 skipped (drop: 19 left out)


def test_more_workers_at_the_same_world_size_give_the_same_micro_batches(digits_shards, uninterrupted):
    _, states = uninterrupted
    cfg = cfg_for(digits_shards)
    for r in range(2):
        got = {}
        for workers in (2, 3):  # 6 streams per rank: 3 per worker, or 2
            loader = rank_loader(cfg, r, 2, workers)
            loader.load_state_dict(states)
            with loader:
                it = iter(loader)
                got[workers] = [next(it) for _ in range(3)]
        for a, b in zip(got[2], got[3], strict=True):
            assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_resampled_mode_resumes_exactly_on_another_layout(digits_shards):
    cfg = cfg_for(digits_shards, mode="resampled")
    full, _ = global_batches(cfg, 2, 30)
    _, states = global_batches(cfg, 2, 12)
    for world, workers in ((1, 2), (4, 1), (2, 3)):
        rest, _ = global_batches(cfg, world, 18, states, workers)
        assert rest == full[12:], (world, workers)


def keys_by_position(root, lengths) -> dict[tuple[int, int], str]:
    """(shard, index) -> key of every sample the shards deliver."""
    out = {}
    for s in range(len(lengths)):
        try:
            for i, raw in read_shard(str(root / fmt.shard_name("train", s))):
                out[(s, i)] = raw.key
        except BadShard:
            pass
    return out


def resume_at_a_bad_output(spec, bad) -> int:
    """The first global batch b > 0 at which some stream's first output is bad: a resume there must look back."""
    q = spec.per_stream
    for b in range(1, EpochOrder(spec, 0).batches):
        for c in range(spec.streams):
            stream = EpochOrder(spec, 0).stream(c)
            if stream.where(stream.shuffle.emitted(b * q)) in bad:
                return b
    raise AssertionError("no resume point at a bad output")


@pytest.mark.parametrize(("bad_data", "resume"), [(False, False), (True, False), (True, True)])
def test_micro_batches_equal_the_reference_model(digits_shards, bad_shards, bad_data, resume):  # noqa: F811
    """Every micro-batch of every rank, row for row, is the one tests/helpers/elastic_model.py computes on positions
    (2 ranks x 3 workers, 2 micro-batches per step), from the start, or resumed where a stream's first output is
    bad. With bad data: each bad slot holds its stream's nearest good sample, on every layout and after a resume (a
    truncated shard, two corrupt JPEGs, a sample without .cls)."""
    root, _ = bad_shards if bad_data else (digits_shards, None)
    cfg = DataConfig(train_shards=str(root), shuffle_buffer=8 if bad_data else BUFFER, canonical_streams=4)
    lengths = (20, 20, 20) if bad_data else tuple(200 if s < 8 else 147 for s in range(9))
    keys = keys_by_position(root, lengths)
    bad = (
        frozenset({(0, 3), (0, 5), (0, 11)} | {(1, i) for i in range(20) if (1, i) not in keys})
        if bad_data
        else frozenset()
    )
    g, accum, world = 8 if bad_data else 16, 2, 2
    n = 10 if bad_data else 6
    state = StreamState("epoch", 0, 4, g, cfg.shuffle_buffer, "drop", sum(lengths))
    state = state.advanced(resume_at_a_bad_output(state.spec(lengths), bad) if resume else 0)
    layout = Layout(4, g, world, 3, accum)
    for r in range(world):
        model = rank_micro_batches(state.spec(lengths), "epoch", layout, r, consumed=state.consumed, bad=bad)
        loader = rank_loader(cfg, r, world, 3, accum, g)
        loader.load_state_dict(state.to_dict())
        with loader:
            it = iter(loader)
            for _ in range(n):
                _, _, _, rows = next(model)
                assert next(it)["key"] == [keys[(shard, i)] for _, _, shard, i, _ in rows]


def test_order_settings_cannot_change_on_resume(digits_shards, uninterrupted, caplog):
    _, states = uninterrupted
    with pytest.raises(ConfigError, match="resume on a world size that divides 12: 1, 2, 3, 4, 6, 12"):
        build_train_loader(cfg_for(digits_shards), img_size=16, batch_size=G // 8, world_size=8).load_state_dict(states)
    with pytest.raises(ConfigError, match="global_batch: checkpoint 48 vs run 96"):
        build_train_loader(cfg_for(digits_shards), img_size=16, batch_size=48, world_size=2).load_state_dict(states)
    other = DataConfig(train_shards=str(digits_shards), shuffle_buffer=32)  # C from the checkpoint (canonical 0)
    with pytest.raises(ConfigError, match="shuffle_buffer: checkpoint 64 vs run 32"):
        build_train_loader(other, img_size=16, batch_size=24, world_size=2).load_state_dict(states)


def test_a_state_of_the_code_before_continues_at_its_epoch_and_batch(digits_shards, caplog):
    old = [{"version": 1, "epoch": 1, "batches": 10, "batch_size": 16, "world_size": 2, "bad_samples": 3}] * 2
    loader = build_train_loader(cfg_for(digits_shards), img_size=16, batch_size=24, world_size=2)
    with caplog.at_level(logging.WARNING, logger="pretrain.data"):
        loader.load_state_dict(old)
    st = loader.state_dict()
    assert (st["epoch"], st["consumed"], st["bad_samples"]) == (1, 320 // G * (G // C), 6)
    assert "written before the elastic order (version 1)" in caplog.text
