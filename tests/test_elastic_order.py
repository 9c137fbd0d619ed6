"""The elastic order's pure core on synthetic shard sizes (no I/O): the same global batches on every layout, the
shuffle buffer's contents recomputed at any point equal to a run from the start, every sample once per epoch,
the recomputation's cost bounded by the buffer, and the stream state of a few numbers."""

from __future__ import annotations

import collections
import json
import random

import numpy as np
import pytest

from pretrain.data.assign import Layout, LayoutError, default_streams
from pretrain.data.elastic_state import RankCounts, StateError, StreamState
from pretrain.data.order import EpochOrder, OrderError, OrderSpec, ShuffleBuffer, SlotShuffle
from tests.helpers.elastic_model import emitted_inputs, global_batches

# uneven shards, an empty one among them: 1,011 samples
LENGTHS = (37, 0, 50, 12, 200, 3, 61, 128, 90, 45, 77, 100, 64, 31, 114)
C, G, BUFFER = 12, 24, 16


def spec_for(remainder: str = "drop", **kw) -> OrderSpec:
    args = {"lengths": LENGTHS, "seed": 7, "streams": C, "global_batch": G, "buffer": BUFFER, "remainder": remainder}
    return OrderSpec(**{**args, **kw})


def simulate(shuffle: SlotShuffle, upto: int) -> tuple[list[int], list[list[int]]]:
    """A buffer run from the start on input indices: the outputs, and the slot contents after each output."""
    n = shuffle.n
    buf = ShuffleBuffer(shuffle, 0, list(range(n)), iter(range(n, shuffle.length or 10**12)), upto)
    outs, contents = [], [list(range(n))]
    for x in buf:
        outs.append(x)
        contents.append([-1 if v is None else v for v in buf.slots])
    return outs, contents


@pytest.mark.parametrize(("size", "length"), [(16, 300), (7, 7), (50, 20), (1, 40), (64, None)])
def test_recomputed_buffer_equals_a_run_from_the_start(size, length):
    sh = SlotShuffle(size, length, key=12345)
    upto = length if length is not None else 700
    outs, contents = simulate(sh, upto)
    if length is not None:
        assert sorted(outs) == list(range(length))  # every input leaves the buffer exactly once
    rng = random.Random(0)
    for k in sorted({0, 1, upto - 1, upto, *(rng.randrange(upto + 1) for _ in range(25))}):
        fresh = SlotShuffle(size, length, key=12345)  # nothing cached from earlier calls
        assert fresh.held(k).tolist() == contents[k], k
    for j in [0, upto - 1, *(rng.randrange(upto) for _ in range(25))]:
        assert SlotShuffle(size, length, key=12345).emitted(j) == outs[j], j


def test_recomputation_costs_the_buffer_not_the_position():
    """held(k) scans back from k until every slot was seen: about buffer x ln(buffer) hashes, whatever k is."""
    size, length = 2000, 10**7
    for k in (5 * 10**6, length - size - 1, length - 5):  # middle, just before the flush, inside the flush
        sh = SlotShuffle(size, length, key=99)
        held = sh.held(k)
        assert sh.hashed <= 15 * size < k // 100
        assert len(set(held.tolist()) - {-1}) == (size if k <= length - size else length - k)
    sh = SlotShuffle(size, length, key=99)
    sh.emitted(5 * 10**6)
    assert sh.hashed <= 15 * size


LAYOUTS = [(1, 1, 1), (1, 2, 1), (2, 1, 1), (2, 2, 1), (4, 1, 1), (2, 3, 1), (3, 4, 1), (6, 2, 1), (12, 1, 1)]
ACCUM = [(2, 2, 2), (1, 3, 3), (4, 1, 2), (1, 0, 1)]  # (R, W, A): A dividing q or not; W = 0 (main process)


@pytest.mark.parametrize("mode", ["drop", "wrap", "resampled"])
def test_global_batches_are_the_same_on_every_layout(mode):
    spec = spec_for("drop" if mode == "resampled" else mode)
    kind = "resampled" if mode == "resampled" else "epoch"
    n = 2 * EpochOrder(spec, 0).batches + 3  # two epochs and into the third
    ref, _ = global_batches(spec, kind, Layout(C, G, 1, 1), n)
    assert len(ref) == n and all(len(rows) == G for _, _, rows in ref)
    for r, w, a in LAYOUTS + ACCUM:
        got, _ = global_batches(spec, kind, Layout(C, G, r, w, a), n)
        assert got == ref, (r, w, a)


def test_micro_batches_do_not_depend_on_the_workers():
    """The same rank's micro-batches, content and order, with 1, 2, 3 or 6 workers (6 streams per rank)."""
    spec = spec_for()
    for r, a in ((2, 1), (2, 2), (1, 3)):
        runs = []
        for w in (1, 2, 3, 6, 9):
            _, per_rank = global_batches(spec, "epoch", Layout(C, G, r, w, a), 30)
            runs.append(per_rank)
        assert all(x == runs[0] for x in runs[1:])
    assert Layout(C, G, 2, 9).used_workers == 6  # more workers than streams: the extra ones are not started


@pytest.mark.parametrize("remainder", ["drop", "wrap"])
def test_every_sample_once_per_epoch(remainder):
    spec = spec_for(remainder)
    total, per_epoch = sum(LENGTHS), EpochOrder(spec, 0).batches
    batches, _ = global_batches(spec, "epoch", Layout(C, G, 2, 2), 2 * per_epoch)
    everything = {(s, i) for s, n in enumerate(LENGTHS) for i in range(n)}
    for e in (0, 1):
        seen = collections.Counter((s, i) for be, _, rows in batches if be == e for _, _, s, i, _ in rows)
        assert sum(seen.values()) == per_epoch * G
        if remainder == "drop":
            assert max(seen.values()) == 1 and total - len(seen) < G  # the left-out part is under one batch
            assert per_epoch == total // G
        else:
            assert set(seen) == everything  # all of it, topped up: the repeats are less than one batch
            assert sum(v - 1 for v in seen.values()) == per_epoch * G - total < G
    orders = [[(s, i) for be, _, rows in batches if be == e for _, _, s, i, _ in rows] for e in (0, 1)]
    assert orders[0] != orders[1]  # the epoch reshuffles


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_resume_anywhere_on_any_layout_continues_the_same_batches(mode):
    """A resume at global batch k (possibly in a later epoch) on another layout recomputes every stream's buffer
    from (epoch, consumed) and gives the batches of the uninterrupted run."""
    spec = spec_for()
    per_epoch = EpochOrder(spec, 0).batches
    full, _ = global_batches(spec, mode, Layout(C, G, 2, 2), 2 * per_epoch + 4)
    for k in (1, 7, per_epoch - 1, per_epoch, per_epoch + 5):
        state = StreamState(mode, 7, C, G, BUFFER, "drop", sum(LENGTHS) if mode == "epoch" else 0).advanced(k)
        for r, w, a in ((1, 1, 1), (4, 1, 1), (2, 3, 2), (3, 4, 1)):
            layout = Layout(C, G, r, w, a)
            got, _ = global_batches(spec, mode, layout, len(full) - k, state.epoch, state.consumed)
            assert got == full[k:], (k, r, w, a)


def test_streams_read_their_range_in_order():
    """Every stream's inputs are consecutive epoch positions (sequential reads), and the inputs a resume reads
    sequentially start right after the held ones."""
    order = EpochOrder(spec_for(), 3)
    starts = []
    for c in range(C):
        stream = order.stream(c)
        starts.append(stream.start)
        pieces = list(stream.runs(0, stream.length))
        assert sum(b - a for _, a, b, _ in pieces) == stream.length
        assert [u for *_, u in pieces] == sorted(u for *_, u in pieces)
        k = 5
        outs = list(emitted_inputs(stream, 0))
        held = set(stream.shuffle.held(k).tolist())  # with the k outputs: exactly the first n + k inputs
        assert sorted(held | set(outs[:k])) == list(range(stream.shuffle.n + k)) and len(held) == stream.shuffle.n
        assert list(emitted_inputs(stream, k)) == outs[k:]
    assert starts == sorted(starts) and starts[0] == 0


def test_layouts_that_cannot_serve_the_order_are_refused():
    with pytest.raises(LayoutError, match=r"world size that divides 12: 1, 2, 3, 4, 6, 12"):
        Layout(C, G, 5, 1)
    with pytest.raises(LayoutError, match="not a multiple"):
        Layout(C, 30, 2, 1)
    with pytest.raises(LayoutError, match="equal micro-batches"):
        Layout(C, G, 2, 1, 5)
    with pytest.raises(OrderError, match="not a multiple"):
        spec_for(global_batch=30)
    with pytest.raises(OrderError, match="no global batch"):
        EpochOrder(spec_for(global_batch=1200, streams=12), 0)
    assert default_streams(2, 4, 4096) == 8 and default_streams(2, 3, 128) == 4 and default_streams(4, 0, 64) == 4


def test_state_is_a_few_numbers_equal_on_every_rank():
    state = StreamState("epoch", 7, C, G, BUFFER, "drop", sum(LENGTHS))
    per_epoch = EpochOrder(spec_for(), 0).batches
    later = state.advanced(per_epoch + 3)
    assert (later.epoch, later.consumed, later.batches) == (1, 3 * G // C, 3)
    counts = [RankCounts().add(2, {4}), RankCounts().add(1, {9, 4}), RankCounts()]
    saved = RankCounts.merge(later, counts)
    assert (saved.bad_samples, saved.bad_shards) == (3, (4, 9))
    text = json.dumps(saved.to_dict())
    assert len(text) < 300  # whatever the number of ranks and workers
    assert StreamState.from_dict(json.loads(text)) == saved
    with pytest.raises(StateError, match="version"):
        StreamState.from_dict([{"version": 1}])
    with pytest.raises(StateError, match="streams: checkpoint 12 vs run 8"):
        saved.check_continues(StreamState("epoch", 7, 8, G, BUFFER, "drop", sum(LENGTHS)))
    saved.check_continues(state)  # position and counts may differ, the order settings not


def test_hash_is_uniform_enough_for_slot_choices():
    """The counter-based choices fill every slot about equally (a broken hash, e.g. constant, would not)."""
    slots = SlotShuffle(10, 10**6, key=3).slots(0, 100_000)
    counts = np.bincount(slots, minlength=10)
    assert counts.min() > 9_500 and counts.max() < 10_500


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_bad_samples_are_filled_alike_on_every_layout_and_resume(mode):
    """A bad shard (all its positions) and scattered bad samples: each bad slot gets its stream's previous good
    sample on every layout (a stream whose whole range lies in the bad shard: the next stream's), a resume just
    after a bad output looks back, and the bad count is layout-free."""
    spec = spec_for()
    rng = random.Random(1)
    bad = frozenset({(4, i) for i in range(200)} | {(s, rng.randrange(n)) for s, n in enumerate(LENGTHS) if n})
    n = EpochOrder(spec, 0).batches + 4
    ref, _ = global_batches(spec, mode, Layout(C, G, 1, 1), n, bad=bad)
    subs = sum(x[4] for _, _, rows in ref for x in rows)
    assert subs > (100 if mode == "epoch" else 10) and all(
        (s, i) not in bad for _, _, rows in ref for _, _, s, i, _ in rows
    )
    for r, w, a in ((2, 2, 1), (3, 4, 2), (12, 1, 1)):
        got, per_rank = global_batches(spec, mode, Layout(C, G, r, w, a), n, bad=bad)
        assert got == ref
        per_rank_subs = [sum(x[4] for rows in micro for x in rows) for micro in per_rank.values()]
        assert sum(per_rank_subs) == subs  # the ranks' counts sum to the run's, whatever the layout
    first_bad = [k for k, (_, _, rows) in enumerate(ref) if k and any(x[4] for x in rows)][:3]
    for k in first_bad:  # resumes whose first batch holds substitutes
        state = StreamState(mode, 7, C, G, BUFFER, "drop", sum(LENGTHS) if mode == "epoch" else 0).advanced(k)
        got, _ = global_batches(spec, mode, Layout(C, G, 4, 1), n - k, state.epoch, state.consumed, bad=bad)
        assert got == ref[k:]
