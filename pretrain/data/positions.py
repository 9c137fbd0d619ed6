"""Epoch positions: the arithmetic that gives every rank and worker its part of an epoch (no I/O, no state).

An epoch is one global sequence of samples: shards in an order seeded by (seed, epoch), samples in tar order, so
position p of the epoch names one sample. The work left in an epoch is a list of position intervals ("segment",
initially [(0, total)]), read as one virtual sequence of R positions. With S = world_size x workers slots and
global batch G = world_size x B, every rank gets N = floor(R / G) (drop) or ceil(R / G) (wrap; positions >= R wrap
to the start) batches, worker w of a rank n_w = N // W + (w < N % W) of them; the DataLoader returns them round-robin,
so batch i of a rank comes from worker i % W. Slot (rank, w) reads the contiguous virtual range of its n_w x B
positions.
"""

from __future__ import annotations

import bisect
import hashlib
import random
import struct
from collections.abc import Iterator


def mix(*ints: int) -> int:
    """A 63-bit seed from integers (a hash, so nearby inputs give unrelated streams)."""
    return int.from_bytes(hashlib.blake2b(struct.pack(f"<{len(ints)}q", *ints), digest_size=8).digest(), "little") >> 1


def epoch_offsets(lengths: list[int], seed: int, epoch: int) -> tuple[list[int], list[int]]:
    """Shard order of an epoch and the first position of each shard in that order (plus the total at the end)."""
    order = list(range(len(lengths)))
    random.Random(mix(seed, epoch)).shuffle(order)
    offsets = [0]
    for k in order:
        offsets.append(offsets[-1] + lengths[k])
    return order, offsets


def batches_per_rank(remaining: int, world_size: int, batch_size: int, remainder: str) -> int:
    """Batches every rank yields for `remaining` positions (equal on all ranks)."""
    g = world_size * batch_size
    return remaining // g if remainder == "drop" else -(-remaining // g)


def worker_quotas(n: int, workers: int) -> list[int]:
    """Batches per worker so that round-robin order gives batch i to worker i % workers."""
    return [n // workers + (w < n % workers) for w in range(workers)]


def slot_range(rank: int, worker: int, n: int, quotas: list[int], batch_size: int) -> tuple[int, int]:
    """Virtual range [start, end) of slot (rank, worker)."""
    start = rank * n * batch_size + batch_size * sum(quotas[:worker])
    return start, start + quotas[worker] * batch_size


def virtual_runs(intervals: list[list[int]], v0: int, v1: int) -> Iterator[tuple[int, int, int]]:
    """Contiguous runs (global_start, global_end, virtual_start) of virtual positions [v0, v1); wraps past the end."""
    cum = [0]
    for a, b in intervals:
        cum.append(cum[-1] + b - a)
    total, v = cum[-1], v0
    while v < v1 and total:
        u = v % total
        i = bisect.bisect_right(cum, u) - 1
        off = u - cum[i]
        take = min(intervals[i][1] - intervals[i][0] - off, v1 - v)
        yield intervals[i][0] + off, intervals[i][0] + off + take, v
        v += take


def merge(intervals: list[tuple[int, int]]) -> list[list[int]]:
    """Sorted, merged, non-empty intervals."""
    out: list[list[int]] = []
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def unfinished(states: list[dict]) -> list[list[int]]:
    """Epoch positions not yet consumed on any rank of a saved run (all ranks' states, same epoch and segment)."""
    old = states[0]
    segment, batch, world, slots = old["segment"], old["batch_size"], old["world_size"], old["num_workers"]
    if any(st["epoch"] != old["epoch"] or st["segment"] != segment for st in states):
        raise ValueError("the ranks' stream states disagree on the epoch; they must come from the same step")
    r = sum(b - a for a, b in segment)
    n = batches_per_rank(r, world, batch, old["remainder"])
    quotas = worker_quotas(n, slots)
    todo: list[tuple[int, int]] = []
    for st in states:
        for w in range(slots):
            v0, v1 = slot_range(st["rank"], w, n, quotas, batch)
            lo, hi = v0 + st["workers"][w]["watermark"], min(v1, r)  # virtual positions >= r are wrapped repeats
            if lo < hi:
                todo += [(g0, g1) for g0, g1, _ in virtual_runs(segment, lo, hi)]
    if world * n * batch < r:  # the dropped tail of the segment was never assigned
        todo += [(g0, g1) for g0, g1, _ in virtual_runs(segment, world * n * batch, r)]
    return merge(todo)
