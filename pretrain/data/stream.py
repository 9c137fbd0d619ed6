"""The resumable sample stream: per-worker logic of the training and evaluation datasets.

An epoch is one global sequence of samples: shards in an order seeded by (seed, epoch), samples in tar order, so
position p of the epoch names one sample. The work left in an epoch is a list of position intervals ("segment",
initially [(0, total)]), read as one virtual sequence of R positions. With S = world_size x workers slots and
global batch G = world_size x B, every rank gets N = floor(R / G) (drop) or ceil(R / G) (wrap; positions >= R wrap
to the start) batches, worker w of a rank n_w = N // W + (w < N % W) of them; the DataLoader returns them round-robin,
so batch i of a rank comes from worker i % W. Slot (rank, w) reads the contiguous virtual range of its n_w x B
positions, shuffles the raw bytes in a buffer seeded by (seed, epoch, slot), then decodes and augments each sample
with an RNG seeded by (seed, epoch, position): the output never depends on timing.

Each batch carries, per worker, a watermark (every position of the worker's range below it has left the shuffle
buffer), the number of raw samples drawn so far, and the bad-data counters; `loader.TrainLoader` turns these into
its state_dict.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pretrain.data.decode import BadSample, BadShard, RawSample, image_bytes, label_of, read_shard

log = logging.getLogger("pretrain.data")


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


@dataclass
class StreamSpec:
    """Everything a loader worker needs (pickled into each worker process)."""

    urls: list[str]
    lengths: list[int] | None
    batch_size: int
    rank: int
    world_size: int
    seed: int
    transform: object
    mode: str = "epoch"
    remainder: str = "drop"
    shuffle_buffer: int = 2000
    max_bad_shards: int = 10
    multilabel: bool = False
    img_size: int = 224


@dataclass
class Counters:
    """Bad-data counts of one worker (cumulative); they travel to the main process with every batch."""

    bad_samples: int = 0
    bad_shards: int = 0
    last_bad_shard: str = ""
    notes: list[str] = field(default_factory=list)

    def shard(self, err: BadShard, limit: int) -> None:
        self.bad_shards += 1
        self.last_bad_shard = err.url
        log.warning("skipping bad shard %s (%d so far)", err, self.bad_shards)
        if self.bad_shards > limit:
            raise RuntimeError(
                f"{self.bad_shards} bad shards (limit data.max_bad_shards={limit}); the last was {err}. "
                "Check the shards with `python -m data_tools verify`, or raise the limit"
            )

    def sample(self, why: str) -> None:
        self.bad_samples += 1
        if self.bad_samples <= 20 or self.bad_samples % 1000 == 0:
            log.warning("skipping bad sample: %s (%d so far)", why, self.bad_samples)

    def as_dict(self) -> dict:
        return {"bad_samples": self.bad_samples, "bad_shards": self.bad_shards, "last_bad_shard": self.last_bad_shard}


def shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Reservoir-style shuffle buffer: emits a random held item for each new one, then the rest in random order."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


def label_tensor(labels: list[list[int]], multilabel: bool) -> torch.Tensor:
    """int64 (B,) first labels, or (B, K) all labels padded with -1 for multi-label data."""
    if not multilabel:
        return torch.tensor([x[0] for x in labels], dtype=torch.int64)
    k = max(len(x) for x in labels)
    return torch.tensor([x + [-1] * (k - len(x)) for x in labels], dtype=torch.int64)


class _Batcher:
    """Fills fixed-size uint8 batches; yields a dict when full."""

    def __init__(self, spec: StreamSpec):
        self.spec, self.images, self.labels, self.keys = spec, None, [], []

    def add(self, img: torch.Tensor, labels: list[int], key: str) -> bool:
        if self.images is None:
            s = self.spec
            # channels-last, like the crop-resize output: each sample is one contiguous copy (a CHW batch would
            # need a slow strided transpose per sample)
            shape = (s.batch_size, 3, s.img_size, s.img_size)
            self.images = torch.empty(shape, dtype=torch.uint8, memory_format=torch.channels_last)
        self.images[len(self.keys)] = img
        self.labels.append(labels)
        self.keys.append(key)
        return len(self.keys) == self.spec.batch_size

    def take(self, meta: dict) -> dict:
        label = label_tensor(self.labels, self.spec.multilabel)
        out = {"image": self.images, "label": label, "key": self.keys, "_meta": meta}
        self.images, self.labels, self.keys = None, [], []
        return out


class TrainStream(IterableDataset):
    """Training batches of one rank; each DataLoader worker yields the whole batches of its slot.

    Args:
        spec: shards, batch size, rank layout, transform.
        num_workers: DataLoader workers of this rank (0 -> one slot, run in the main process).
        resume: from `loader.TrainLoader.load_state_dict`: {"epoch", "segment", "skip_raw": [per worker],
            "counters": [per worker], "reseed"}; None starts at epoch 0.
    """

    def __init__(self, spec: StreamSpec, num_workers: int, resume: dict | None = None):
        self.spec, self.slots = spec, max(1, num_workers)
        self.resume = resume or {}
        self.epoch = int(self.resume.get("epoch", 0))
        self.counters = Counters()

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w = 0 if info is None else info.id
        epoch, self.epoch = self.epoch, self.epoch + 1  # the next __iter__ in this worker process is the next epoch
        resuming = bool(self.resume) and (self.spec.mode == "resampled" or epoch == self.resume["epoch"])
        stored = None
        if resuming:
            # the DataLoader's round-robin starts at worker 0 while the saved run's next batch belongs to worker
            # k % W: rotate the roles so the resumed order is the uninterrupted one
            w = (w + self.resume.get("shift", 0)) % self.slots
            stored = (self.resume.get("counters") or [None] * self.slots)[w]
        self.counters = Counters(**stored) if stored else Counters()  # per epoch; the main process sums them
        if self.spec.mode == "resampled":
            yield from self._resampled(w)
            return
        if resuming:
            segment, skip, made = self.resume["segment"], self.resume["skip_raw"][w], self.resume["skip_batches"][w]
        else:
            segment, skip, made = [[0, sum(self.spec.lengths)]], 0, 0
        yield from self._epoch(epoch, segment, w, skip, made)

    # ------------------------------------------------------------------------------------------- epoch mode

    def _epoch(self, epoch: int, segment: list[list[int]], w: int, skip: int, made: int) -> Iterator[dict]:
        s, c = self.spec, self.counters
        r = sum(b - a for a, b in segment)
        n = batches_per_rank(r, s.world_size, s.batch_size, s.remainder)
        if n == 0 and r == sum(s.lengths):
            raise ValueError(
                f"{r} samples are fewer than one global batch ({s.world_size} ranks x {s.batch_size}); "
                "use a smaller batch or data.remainder=wrap"
            )
        quotas = worker_quotas(n, self.slots)
        v0, v1 = slot_range(s.rank, w, n, quotas, s.batch_size)
        if made >= quotas[w]:
            return
        order, offsets = epoch_offsets(s.lengths, s.seed, epoch)
        done = np.zeros(v1 - v0, dtype=bool)  # positions of this slot that are finished (emitted or bad)
        mark = 0
        slot_seed = mix(s.seed, epoch, s.rank * self.slots + w)
        own = shuffled(
            self._read(segment, v0, v1, order, offsets, done, v0), s.shuffle_buffer, random.Random(slot_seed)
        )
        # if bad samples leave the slot short, borrow the positions after its range (unshuffled; duplicates are rare)
        borrowed = self._read(segment, v1, v1 + r, order, offsets, None, v0)
        batcher, drawn, stored = _Batcher(s), 0, dict(c.as_dict())
        for src in (own, borrowed):
            for v, pos, raw, labels in src:
                drawn += 1
                if 0 <= v - v0 < len(done):
                    done[v - v0] = True
                if drawn <= skip:  # resume: replay the raw stream and the shuffle buffer without decoding
                    if drawn == skip:
                        c.bad_samples, c.bad_shards = stored["bad_samples"], stored["bad_shards"]
                    continue
                try:
                    img = s.transform(image_bytes(raw)[0], random.Random(mix(s.seed, epoch, pos, v // max(r, 1))))
                except BadSample as e:
                    c.sample(f"{raw.key}: {e}")
                    continue
                if batcher.add(img, labels, raw.key):
                    while mark < len(done) and done[mark]:
                        mark += 1
                    made += 1
                    yield batcher.take({"worker": w, "epoch": epoch, "watermark": mark, "raw": drawn, **c.as_dict()})
                    if made >= quotas[w]:
                        return
        if made < quotas[w]:
            raise RuntimeError(f"worker {w} of rank {s.rank} found no readable samples to fill its batches")

    def _read(self, segment, v0, v1, order, offsets, done, own0) -> Iterator[tuple[int, int, RawSample, list[int]]]:
        """Raw samples of virtual positions [v0, v1) as (virtual, position, sample, labels); bad ones are counted."""
        s, c = self.spec, self.counters
        for g0, g1, vbase in virtual_runs(segment, v0, v1):
            k = bisect.bisect_right(offsets, g0) - 1
            while g0 < g1:
                while offsets[k + 1] <= g0:  # skip empty shards
                    k += 1
                i0, i1 = g0 - offsets[k], min(g1, offsets[k + 1]) - offsets[k]
                url, seen = s.urls[order[k]], i0
                try:
                    for i, raw in read_shard(url, i0, i1):
                        seen = i + 1
                        v = vbase + (offsets[k] + i - g0)
                        try:
                            labels = label_of(raw)
                            image_bytes(raw)
                        except BadSample as e:
                            c.sample(str(e))
                            if done is not None and 0 <= v - own0 < len(done):
                                done[v - own0] = True
                            continue
                        yield v, offsets[k] + i, raw, labels
                except BadShard as e:
                    c.shard(e, s.max_bad_shards)
                else:
                    if seen < i1:
                        c.shard(BadShard(url, f"ended after {seen} samples; _info.json counts more"), s.max_bad_shards)
                if seen < i1 and done is not None:  # missing samples (bad or short shard) are finished work
                    lo = vbase + offsets[k] + seen - g0 - own0
                    done[max(lo, 0) : max(lo + i1 - seen, 0)] = True
                vbase += offsets[k] + i1 - g0
                g0 = offsets[k] + i1
                k += 1

    # ------------------------------------------------------------------------------------------- resampled

    def _resampled(self, w: int) -> Iterator[dict]:
        s, c = self.spec, self.counters
        skip = int((self.resume.get("skip_raw") or [0] * self.slots)[w])
        reseed = int(self.resume.get("reseed", 0))
        rng = random.Random(mix(s.seed, s.rank, w, reseed))

        def source() -> Iterator[tuple[int, int, RawSample, list[int]]]:
            n, empty = 0, 0
            while True:
                url, got = s.urls[rng.randrange(len(s.urls))], 0
                try:
                    for _, raw in read_shard(url):
                        try:
                            labels = label_of(raw)
                            image_bytes(raw)
                        except BadSample as e:
                            c.sample(str(e))
                            continue
                        got += 1
                        n += 1
                        yield n, n, raw, labels
                except BadShard as e:
                    c.shard(e, s.max_bad_shards)
                empty = 0 if got else empty + 1
                if empty > 2 * len(s.urls) + 10:
                    raise RuntimeError(f"no readable samples in {len(s.urls)} shards (e.g. {url})")

        batcher, drawn, stored = _Batcher(s), 0, dict(c.as_dict())
        buf_rng = random.Random(mix(s.seed, s.rank, w, reseed, 1))
        for _, n, raw, labels in shuffled(source(), s.shuffle_buffer, buf_rng):
            drawn += 1
            if drawn <= skip:
                if drawn == skip:
                    c.bad_samples, c.bad_shards = stored["bad_samples"], stored["bad_shards"]
                continue
            try:
                img = s.transform(image_bytes(raw)[0], random.Random(mix(s.seed, s.rank, w, reseed, n)))
            except BadSample as e:
                c.sample(f"{raw.key}: {e}")
                continue
            if batcher.add(img, labels, raw.key):
                yield batcher.take({"worker": w, "epoch": 0, "watermark": 0, "raw": drawn, **c.as_dict()})
