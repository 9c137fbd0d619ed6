"""The global sample order, pure (no I/O, no torch): a function of (seed, epoch, canonical streams C, global batch,
shuffle buffer, remainder, shard sizes), the same on every rank, worker and resume (docs/stream.md, "The order").

An epoch's positions (shards in a seeded order, samples in tar order) are cut into C contiguous ranges; stream c
reads its range in order through a `SlotShuffle` buffer whose choices are hashes of (key, step), never of the items,
so what it emits and holds at any output is computed without reading anything. Global batch b is outputs
[b*q, (b+1)*q) of every stream, q = G / C. Resampled mode: stream c reads whole shards drawn by a hash of (seed, c).
"""

from __future__ import annotations

import bisect
import hashlib
import random
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from pretrain.typed_config import ConfigError

T = TypeVar("T")
_FLUSH, _DRAWS, _SAMPLES, _RESAMPLED_SEEDS = 1, 2, 3, 4  # salts: independent hash streams of one key


class OrderError(ConfigError):
    """The order cannot be built with these numbers; the message names the setting to change."""


def mix(*ints: int) -> int:
    """A 63-bit seed from integers (a hash, so nearby inputs give unrelated streams)."""
    return int.from_bytes(hashlib.blake2b(struct.pack(f"<{len(ints)}q", *ints), digest_size=8).digest(), "little") >> 1


def epoch_offsets(lengths: Sequence[int], seed: int, epoch: int) -> tuple[list[int], list[int]]:
    """Shard order of an epoch and the first position of each shard in that order (plus the total at the end)."""
    order = list(range(len(lengths)))
    random.Random(mix(seed, epoch)).shuffle(order)
    offsets = [0]
    for k in order:
        offsets.append(offsets[-1] + lengths[k])
    return order, offsets


def hash64(key: int, idx: np.ndarray) -> np.ndarray:
    """Uniform 64-bit values for the integers `idx` under `key` (splitmix64's finaliser; vectorised, uint64)."""
    with np.errstate(over="ignore"):
        z = np.uint64(key) + (np.asarray(idx, dtype=np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class SlotShuffle:
    """A reservoir shuffle buffer whose behaviour depends only on (key, size, length), never on the items.

    Inputs are numbered u = 0, 1, ... (the stream's read order), outputs j = 0, 1, .... Slot s first holds input s;
    output j < `steps` emits slot `slot(j)` and puts input n + j there; output j >= `steps` (the input has ended)
    emits slot `flush_order()[j - steps]`. `length` None: an endless input (resampled mode), no flush.

    Args:
        size: slots (data.shuffle_buffer); fewer when the input is shorter.
        length: inputs in all, or None.
        key: the seed of every choice (a 63-bit `mix` of the stream's identity).
    """

    BLOCK = 4096  # hashes per numpy call

    def __init__(self, size: int, length: int | None, key: int):
        if size < 1:
            raise OrderError(f"data.shuffle_buffer={size}: must be at least 1")
        self.n = size if length is None else min(size, length)
        self.length, self.key = length, key
        self.steps = None if length is None else length - self.n
        self.hashed = 0  # hashes computed so far (the cost of `held` / `emitted`, checked by the tests)
        self._flush: np.ndarray | None = None
        self._end: np.ndarray | None = None

    def slots(self, j0: int, j1: int) -> np.ndarray:
        """Slots of the reservoir outputs j0 <= j < j1 (int64)."""
        self.hashed += max(j1 - j0, 0)
        return (hash64(self.key, np.arange(j0, j1, dtype=np.uint64)) % np.uint64(max(self.n, 1))).astype(np.int64)

    def flush_order(self) -> np.ndarray:
        """The order in which the slots are emitted once the input has ended."""
        if self._flush is None:
            self.hashed += self.n
            self._flush = np.argsort(hash64(mix(self.key, _FLUSH), np.arange(self.n)), kind="stable")
        return self._flush

    def held(self, k: int) -> np.ndarray:
        """Input held in each slot after k outputs (-1: a slot already emitted in the flush)."""
        r = k if self.steps is None else min(k, self.steps)
        content = self._end.copy() if r == self.steps and self._end is not None else self._scan(r)
        if self.steps is not None and r == self.steps:
            self._end = content.copy()
            content[self.flush_order()[: k - self.steps]] = -1
        return content

    def _scan(self, r: int) -> np.ndarray:
        """Slot contents after r reservoir outputs: each slot holds the input of its last assignment before r."""
        content = np.arange(self.n, dtype=np.int64)
        seen = np.zeros(self.n, dtype=bool)
        left, j1 = self.n, r
        while j1 > 0 and left:
            j0 = max(0, j1 - max(self.BLOCK, 2 * self.n))
            desc = self.slots(j0, j1)[::-1]  # outputs j1-1 down to j0
            uniq, first = np.unique(desc, return_index=True)  # first in descending order = last assignment
            new = ~seen[uniq]
            content[uniq[new]] = self.n + (j1 - 1 - first[new])
            seen[uniq[new]] = True
            left -= int(new.sum())
            j1 = j0
        return content

    def emitted(self, j: int) -> int:
        """The input that output j emits."""
        if self.steps is not None and j >= self.steps:
            return int(self.held(self.steps)[self.flush_order()[j - self.steps]])
        s, j1 = int(self.slots(j, j + 1)[0]), j
        while j1 > 0:  # the last output before j that filled slot s
            j0 = max(0, j1 - max(self.BLOCK, 2 * self.n))
            hit = np.flatnonzero(self.slots(j0, j1) == s)
            if len(hit):
                return self.n + j0 + int(hit[-1])
            j1 = j0
        return s

    def plan(self, k: int, end: int | None = None) -> Iterator[tuple[int, int]]:
        """(slot emitted, input put there or -1) for outputs k <= j < end (end None: all of them)."""
        end = self.length if end is None else end
        j = k
        while end is None or j < end:
            stop = j + self.BLOCK if end is None else min(j + self.BLOCK, end)
            if self.steps is not None and j >= self.steps:
                for s in self.flush_order()[j - self.steps : stop - self.steps]:
                    yield int(s), -1
            else:
                stop = stop if self.steps is None else min(stop, self.steps)
                yield from zip(self.slots(j, stop).tolist(), range(self.n + j, self.n + stop), strict=True)
            j = stop


class ShuffleBuffer(Generic[T]):
    """The real buffer: `SlotShuffle`'s slots with the items (samples, bytes) attached; iterate once.

    Args:
        shuffle: the stream's `SlotShuffle`.
        k: outputs already emitted (0 for a fresh start).
        items: the item of every slot after k outputs, in slot order (`held(k)`, fetched by random access; None for
            a slot the flush emptied). A fresh start passes the first n inputs.
        inputs: the items of inputs n + k, n + k + 1, ... in order (sequential reads).
        end: stop after this output (drop mode emits fewer outputs than inputs); None: `shuffle.length`.
    """

    def __init__(self, shuffle: SlotShuffle, k: int, items: Sequence[T | None], inputs: Iterator[T], end=None):
        if len(items) != shuffle.n:
            raise ValueError(f"a buffer of {shuffle.n} slots restored with {len(items)} items")
        self.shuffle, self.k, self.slots, self.inputs, self.end = shuffle, k, list(items), inputs, end

    def __iter__(self) -> Iterator[T]:
        for slot, fill in self.shuffle.plan(self.k, self.end):
            out = self.slots[slot]
            self.slots[slot] = next(self.inputs) if fill >= 0 else None  # refilled before the yield
            self.k += 1
            yield out


@dataclass(frozen=True)
class OrderSpec:
    """Every number the sample order depends on (all stored in the stream state; none depends on the layout)."""

    lengths: tuple[int, ...]
    """Samples per shard, in the shard list's canonical order."""
    seed: int
    """run.seed."""
    streams: int
    """C, the canonical streams, fixed at the run's start."""
    global_batch: int
    """G, samples per optimizer step over all ranks; a multiple of C."""
    buffer: int
    """Shuffle-buffer slots per canonical stream (data.shuffle_buffer)."""
    remainder: str = "drop"
    """`drop` the samples that do not fill the epoch's last global batch, or `wrap` (top up from the next range)."""

    def __post_init__(self):
        if self.streams < 1 or self.global_batch % self.streams:
            raise OrderError(
                f"train.global_batch_size={self.global_batch} is not a multiple of the {self.streams} canonical "
                "streams (data.canonical_streams); pick a divisor of the global batch"
            )

    @property
    def per_stream(self) -> int:
        """q: outputs of every stream in one global batch."""
        return self.global_batch // self.streams


def batches_per_epoch(spec: OrderSpec, total: int) -> int:
    """Global batches in an epoch of `total` samples: drop, every stream's range holds at least this many times q
    samples (the rest, fewer than one global batch, is left in the buffers); wrap, enough to hold every sample."""
    if spec.remainder == "drop":
        batches = total // spec.streams // spec.per_stream
    else:
        batches = -(-total // spec.global_batch)
    if batches == 0:
        raise OrderError(
            f"{total} samples give no global batch of {spec.global_batch} over {spec.streams} canonical streams; "
            "use a smaller train.global_batch_size or data.remainder=wrap"
        )
    return batches


class EpochStream:
    """Canonical stream c of one epoch: its range of epoch positions read in order, through its shuffle buffer."""

    def __init__(self, epoch: EpochOrder, c: int, start: int, length: int):
        self.epoch, self.c, self.start, self.length = epoch, c, start, length
        spec = epoch.spec
        self.shuffle = SlotShuffle(spec.buffer, length, mix(spec.seed, epoch.epoch, c))
        self.outputs = epoch.outputs
        """Outputs this epoch (the same for every stream; drop mode leaves the buffer's last ones out)."""

    def position(self, u: int) -> int:
        """Epoch position of input u (wrap mode: past the epoch's end, from its start)."""
        return (self.start + u) % self.epoch.total

    def where(self, u: int) -> tuple[int, int]:
        """(shard index in the canonical list, sample index in it) of input u."""
        return self.epoch.locate(self.position(u))

    def runs(self, u0: int, u1: int) -> Iterator[tuple[int, int, int, int]]:
        """Sequential reading plan of inputs [u0, u1): (shard, first sample, end sample, first input) per piece."""
        u = u0
        while u < u1:
            shard, i = self.where(u)
            take = min(self.epoch.spec.lengths[shard] - i, u1 - u)
            yield shard, i, i + take, u
            u += take

    def sample_seed(self, j: int) -> int:
        """Seed of the augmentation of output j: a property of the slot, the same on every layout."""
        return mix(self.epoch.spec.seed, self.epoch.epoch, self.c, j, _SAMPLES)


class EpochOrder:
    """One epoch: the shard order, the C stream ranges and the number of outputs per stream."""

    def __init__(self, spec: OrderSpec, epoch: int):
        self.spec, self.epoch = spec, epoch
        self.order, self.offsets = epoch_offsets(list(spec.lengths), spec.seed, epoch)
        self.total = self.offsets[-1]
        self.base, self.extra = divmod(self.total, spec.streams)
        self.batches = batches_per_epoch(spec, self.total)
        self.outputs = self.batches * spec.per_stream

    def stream(self, c: int) -> EpochStream:
        """Stream c: range [c*base + min(c, extra), +length); wrap mode reads `outputs` positions (into the next
        range, past the end from the start), so every position is read and the overlap is the top-up."""
        start = c * self.base + min(c, self.extra)
        length = self.base + (c < self.extra) if self.spec.remainder == "drop" else self.outputs
        return EpochStream(self, c, start, length)

    def locate(self, p: int) -> tuple[int, int]:
        """(shard index in the canonical list, sample index in it) of epoch position p."""
        k = bisect.bisect_right(self.offsets, p) - 1  # the last shard starting at or before p: never an empty one
        return self.order[k], p - self.offsets[k]


class ResampledStream:
    """Canonical stream c of resampled mode: shards drawn with replacement by hash(seed, c, draw), each read whole in
    tar order, forever; the same shuffle buffer. Input u is found by summing the drawn shards' lengths (cached),
    O(u / mean shard length) once per resume."""

    def __init__(self, spec: OrderSpec, c: int):
        if not spec.lengths or not any(spec.lengths):
            raise OrderError("resampled mode needs shards with samples (sample counts from _info.json)")
        self.spec, self.c = spec, c
        self.key = mix(spec.seed, c, _DRAWS)
        self.shuffle = SlotShuffle(spec.buffer, None, mix(spec.seed, c, _RESAMPLED_SEEDS))
        self.outputs = None
        self._cum = np.zeros(1, dtype=np.int64)  # inputs before draw t
        self._lengths = np.asarray(spec.lengths, dtype=np.int64)

    def draw(self, t: int | np.ndarray) -> np.ndarray:
        """Shard index of draw(s) t."""
        return (hash64(self.key, np.asarray(t)) % np.uint64(len(self.spec.lengths))).astype(np.int64)

    def locate(self, u: int) -> tuple[int, int, int]:
        """(draw t, shard, sample index in it) of input u."""
        while self._cum[-1] <= u:
            t0 = len(self._cum) - 1
            more = self._lengths[self.draw(np.arange(t0, t0 + 1024))]
            self._cum = np.concatenate([self._cum, self._cum[-1] + np.cumsum(more)])
        t = int(np.searchsorted(self._cum, u, side="right")) - 1
        return t, int(self.draw(t)), u - int(self._cum[t])

    def where(self, u: int) -> tuple[int, int]:
        return self.locate(u)[1:]

    def runs(self, u0: int, u1: int) -> Iterator[tuple[int, int, int, int]]:
        """Sequential reading plan of inputs [u0, u1): (shard, first sample, end sample, first input) per draw."""
        u = u0
        while u < u1:
            t, shard, i = self.locate(u)
            take = min(int(self._cum[t + 1]) - u, u1 - u)
            yield shard, i, i + take, u
            u += take

    def sample_seed(self, j: int) -> int:
        return mix(self.spec.seed, self.c, j, _RESAMPLED_SEEDS)


def substitute(j: int, good: Callable[[int], bool], end: int | None, reach: int = 1 << 20) -> int | None:
    """The output whose sample fills output j's slot: j when its sample is good; else the stream's nearest earlier
    output (in this epoch) with a good sample; at the stream's start, its nearest later one (within `end` and
    `reach`); None when there is none. `good(i)` says whether output i's own sample is readable and decodes.

    The rule is local to one canonical stream, so it fills a bad slot alike on every layout; and it keeps one output
    per slot, so (epoch, consumed) still says where every stream stands. A resume whose first output is bad looks
    back to the outputs before it (`SlotShuffle.emitted`, then a random-access fetch; `stream.TrainStream`)."""
    for i in range(j, -1, -1):
        if good(i):
            return i
    stop = j + reach if end is None else min(end, j + reach)
    return next((i for i in range(j + 1, stop) if good(i)), None)


def stream_of(spec: OrderSpec, mode: str, epoch: int, c: int) -> EpochStream | ResampledStream:
    """Canonical stream c (epoch mode: of `epoch`)."""
    return ResampledStream(spec, c) if mode == "resampled" else EpochOrder(spec, epoch).stream(c)
