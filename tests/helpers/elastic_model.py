"""A reference model of one rank's elastic loader, on positions only: every worker's parts (`assign.worker_plan`)
filled from the pure order (`emitted_inputs`) and put in place by row, as the real loader must do with bytes.
The tests of the order use it across layouts; a real loader's keys can be checked against it sample by sample."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator

from pretrain.data.assign import Layout, worker_plan
from pretrain.data.order import (
    EpochOrder,
    EpochStream,
    OrderSpec,
    ResampledStream,
    ShuffleBuffer,
    stream_of,
    substitute,
)


def emitted_inputs(stream: EpochStream | ResampledStream, k: int) -> Iterator[int]:
    """The input index of every output of `stream` from output k on: the real `ShuffleBuffer` run on input indices
    instead of samples (what a resumed worker does, with the held inputs fetched and the rest read in order)."""
    sh = stream.shuffle
    first = sh.n + (k if sh.steps is None else min(k, sh.steps))  # the next input a sequential read gives
    inputs = itertools.count(first) if sh.length is None else iter(range(first, sh.length))
    return iter(ShuffleBuffer(sh, k, sh.held(k).tolist(), inputs, stream.outputs))


Row = tuple[int, int, int, int, bool]
"""(canonical stream, output index in its epoch, shard, sample index in the shard, a substitute for a bad sample)"""


def rank_micro_batches(
    spec: OrderSpec,
    mode: str,
    layout: Layout,
    rank: int,
    epoch: int = 0,
    consumed: int = 0,
    bad: frozenset[tuple[int, int]] = frozenset(),
) -> Iterator[tuple[int, int, int, list[Row]]]:
    """(epoch, global batch, micro-batch, rows) of every micro-batch `rank` yields from (epoch, consumed) on;
    samples in `bad` ((shard, index)) are replaced by the `order.substitute` rule."""
    per_epoch = None if mode == "resampled" else EpochOrder(spec, epoch).batches
    start = consumed // spec.per_stream
    plans = [worker_plan(layout, rank, w, epoch, start, per_epoch) for w in range(layout.used_workers)]
    readers: dict[tuple[int, int], tuple[object, Iterator[int], list[int]]] = {}
    for parts in zip(*plans, strict=True):  # the DataLoader's round-robin: one part per worker per micro-batch
        e, b, a, _ = parts[0]
        rows: list[Row | None] = [None] * layout.micro
        for pe, pb, pa, part in parts:
            assert (pe, pb, pa) == (e, b, a), "the workers' parts belong to one micro-batch"
            for row, c, j in part:
                if (e, c) not in readers:  # a stream's first output in this run: resume it at j
                    stream = stream_of(spec, mode, e, c)
                    readers[(e, c)] = (stream, emitted_inputs(stream, j), [j])
                stream, outputs, at = readers[(e, c)]
                assert at[0] == j, f"stream {c} asked for output {j}, its next is {at[0]}"
                at[0] += 1
                rows[row] = (c, j, *_sample(spec, mode, e, c, j, stream.where(next(outputs)), bad))
        for key in [key for key in readers if key[0] < e]:  # streams of a finished epoch
            del readers[key]
        yield e, b, a, rows


@functools.cache
def _stream(spec: OrderSpec, mode: str, epoch: int, c: int):
    return stream_of(spec, mode, epoch, c)


@functools.cache
def _own(spec: OrderSpec, mode: str, epoch: int, c: int, j: int) -> tuple[int, int]:
    """(shard, index) of output j's own sample (random access to the order, as a look-back does)."""
    s = _stream(spec, mode, epoch, c)
    return s.where(s.shuffle.emitted(j))


def _sample(spec: OrderSpec, mode: str, e: int, c: int, j: int, own: tuple, bad: frozenset) -> tuple[int, int, bool]:
    """(shard, index, substituted) of output j of stream c, whose own sample is `own`: `order.substitute` in the
    stream, and when its whole epoch is bad, the same rule in the next streams (c+1, c+2, ... mod C) at output j."""
    if own not in bad:
        return *own, False
    for step in range(spec.streams):
        other = (c + step) % spec.streams
        outputs = _stream(spec, mode, e, other).outputs
        sub = substitute(j, lambda i, o=other: _own(spec, mode, e, o, i) not in bad, outputs, reach=1000)
        if sub is not None:
            return *_own(spec, mode, e, other, sub), True
    raise RuntimeError("no readable sample in any stream")


def global_batches(
    spec: OrderSpec,
    mode: str,
    layout: Layout,
    n: int,
    epoch: int = 0,
    consumed: int = 0,
    bad: frozenset[tuple[int, int]] = frozenset(),
) -> tuple[list, dict]:
    """The next `n` global batches over all ranks of `layout`: (epoch, batch, rows sorted canonically) each, and
    every rank's micro-batches as they came (rank -> list of rows lists)."""
    per_rank = {r: [] for r in range(layout.world_size)}
    batches: dict[tuple[int, int], list[Row]] = {}
    for r in range(layout.world_size):
        it = rank_micro_batches(spec, mode, layout, r, epoch, consumed, bad)
        for _ in range(n * layout.accum):
            e, b, _, rows = next(it)
            per_rank[r].append(rows)
            batches.setdefault((e, b), []).extend(rows)
    ordered = [(e, b, sorted(rows)) for (e, b), rows in sorted(batches.items())]
    return ordered, per_rank
