"""The resumable training stream: per-worker pipeline of the training dataset (epoch and resampled modes).

Slot (rank, w) reads the contiguous virtual range of its positions (`positions.py`), shuffles the raw bytes in a
buffer seeded by (seed, epoch, slot), then decodes and augments each sample with an RNG seeded by
(seed, epoch, position): the output never depends on timing. The pipeline is a list of stages (`stages.py`):

    read the slot's positions (bad samples and shards counted) -> shuffle -> [borrow the positions after the
    range if bad samples left it short] -> mark drawn positions finished -> [replay, on a resume without a saved
    buffer] -> decode + augment -> batch

Each batch carries, per worker, a watermark (every position of the worker's range below it has left the shuffle
buffer), the number of raw samples drawn so far, the bad-data counters, and the shuffle buffer's state (the
positions it holds, its RNG, the read cursor); `loader.TrainLoader` turns these into its state_dict. A resume
fetches the held positions by random access (`<shard>.idx` offsets for remote shards) and reads on from the
cursor: O(buffer) bytes, not O(position). Resampled mode does the same with its own source (`resampled.py`). A state
without the buffer (saved before it existed) is replayed instead.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from data_tools.decode import decode_stats
from data_tools.storage import IO_STATS, IOPolicy
from pretrain.data.positions import batches_per_rank, epoch_offsets, mix, slot_range, virtual_runs, worker_quotas
from pretrain.data.resampled import ShardDraws, set_rng_state
from pretrain.data.stages import (
    Counters,
    Indexes,
    Sample,
    Shuffler,
    augmented,
    batched,
    labelled,
    replay,
    runs_of,
    shard_samples,
)


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
    io: IOPolicy = field(default_factory=IOPolicy)


class Finished:
    """Which positions of a slot's own virtual range [v0, v1) are finished work (drawn, bad or missing), and the
    watermark below which all of them are: where a resume with another layout may start."""

    def __init__(self, v0: int, v1: int):
        self.v0, self.done, self.mark = v0, np.zeros(v1 - v0, dtype=bool), 0

    def set(self, v: int) -> None:
        if 0 <= v - self.v0 < len(self.done):
            self.done[v - self.v0] = True

    def set_range(self, a: int, b: int) -> None:
        self.done[max(a - self.v0, 0) : max(b - self.v0, 0)] = True

    def track(self, samples: Iterator[Sample]) -> Iterator[Sample]:
        """The samples unchanged; each one drawn is finished work."""
        for sample in samples:
            self.set(sample.v)
            yield sample

    def restore(self, cursor: int, held: list[int]) -> None:
        """A resumed slot: everything read before `cursor` is finished, except the positions still `held`."""
        self.set_range(self.v0, cursor)
        for v in held:
            if 0 <= v - self.v0 < len(self.done):
                self.done[v - self.v0] = False

    def watermark(self) -> int:
        while self.mark < len(self.done) and self.done[self.mark]:
            self.mark += 1
        return self.mark


class Cursor:
    """The next virtual position a slot reads (one past the last sample handed to the shuffle buffer)."""

    def __init__(self, v: int):
        self.next = v

    def track(self, samples: Iterator[Sample]) -> Iterator[Sample]:
        for sample in samples:
            self.next = sample.v + 1
            yield sample


class TrainStream(IterableDataset):
    """Training batches of one rank; each DataLoader worker yields the whole batches of its slot.

    Args:
        spec: shards, batch size, rank layout, transform.
        num_workers: DataLoader workers of this rank (0 -> one slot, run in the main process).
        resume: from `loader.TrainLoader.load_state_dict`: {"epoch", "segment", "skip_raw": [per worker],
            "counters": [per worker], "buffers": [per worker, or None: replay], "reseed"}; None starts at epoch 0.
    """

    def __init__(self, spec: StreamSpec, num_workers: int, resume: dict | None = None):
        self.spec, self.slots = spec, max(1, num_workers)
        self.resume = resume or {}
        self.epoch = int(self.resume.get("epoch", 0))
        self.counters = Counters()
        self.indexes = Indexes(spec.io)

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
        skip = (self.resume.get("skip_raw") or [0] * self.slots)[w] if resuming else 0
        buffer = (self.resume.get("buffers") or [None] * self.slots)[w] if skip else None
        if self.spec.mode == "resampled":
            yield from self._resampled(w, skip, buffer)
            return
        if resuming:
            segment, made = self.resume["segment"], self.resume["skip_batches"][w]
        else:
            segment, made = [[0, sum(self.spec.lengths)]], 0
        yield from self._epoch(epoch, segment, w, skip, made, buffer)

    # ------------------------------------------------------------------------------------------- epoch mode

    def _epoch(
        self, epoch: int, segment: list[list[int]], w: int, skip: int, made: int, buffer: dict | None
    ) -> Iterator[dict]:
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
        finished, cursor = Finished(v0, v1), Cursor(v0)
        shuffler = Shuffler(s.shuffle_buffer, random.Random(mix(s.seed, epoch, s.rank * self.slots + w)))
        if buffer is not None:  # resume: refill the shuffle buffer by random access, read on from the cursor
            shuffler.buf[:] = self._fetch(epoch, segment, buffer["held"], order, offsets)
            set_rng_state(shuffler.rng, buffer["rng"])
            shuffler.flushing, cursor.next = buffer["flushing"], buffer["cursor"]
            finished.restore(v1 if shuffler.flushing else cursor.next, buffer["held"])  # flushing: all read
        # The pipeline. If bad samples leave the slot short, it borrows the positions after its range (unshuffled;
        # duplicates are rare).
        own = self._positions(epoch, segment, cursor.next, v1, order, offsets, finished)  # the slot's range
        borrowed = self._positions(epoch, segment, max(v1, cursor.next), v1 + r, order, offsets, finished)
        samples = itertools.chain(shuffler(cursor.track(own)), cursor.track(borrowed))
        samples = finished.track(samples)  # every drawn position is finished work
        if buffer is None:
            drawn = replay(samples, skip, c)  # resume without a saved buffer: pass over the saved draws undecoded
        else:
            drawn = ((skip + i, x) for i, x in enumerate(samples, 1))
        images = augmented(drawn, s.transform, c)  # decode + augment, seeded per sample
        for draws, batch in batched(images, s.batch_size, s.img_size, s.multilabel):
            made += 1
            state = {
                "held": [x.v for x in shuffler.buf],
                "rng": list(shuffler.rng.getstate()),
                "flushing": shuffler.flushing,
                "cursor": cursor.next,
            }
            meta = {"worker": w, "epoch": epoch, "watermark": finished.watermark(), "raw": draws, "buffer": state}
            yield {**batch, "_meta": {**meta, **c.as_dict(), **_io()}}
            if made >= quotas[w]:
                return
        raise RuntimeError(f"worker {w} of rank {s.rank} found no readable samples to fill its batches")

    def _fetch(
        self, epoch: int, segment: list[list[int]], held: list[int], order: list[int], offsets: list[int]
    ) -> list[Sample]:
        """The samples at virtual positions `held` (a saved shuffle buffer, in its order), read by random access.

        Remote shards with an index are read in runs of consecutive samples (only the held samples' bytes);
        local shards and remote ones without an index are read from the first held sample to the last.
        """
        s, c = self.spec, self.counters
        r = max(sum(b - a for a, b in segment), 1)
        wanted: dict[int, dict[int, int]] = {}  # shard (epoch order) -> {index in shard: virtual position}
        for v in held:
            g = next(virtual_runs(segment, v, v + 1))[0]
            k = bisect.bisect_right(offsets, g) - 1
            wanted.setdefault(k, {})[g - offsets[k]] = v
        got: dict[int, Sample] = {}
        for k, at in sorted(wanted.items()):
            url, idx = s.urls[order[k]], self.indexes.get(s.urls[order[k]])
            runs = runs_of(sorted(at)) if idx is not None else [(min(at), max(at) + 1)]
            for i0, i1 in runs:
                for i, raw in shard_samples(url, i0, i1, c, s.max_bad_shards, idx, s.io):
                    labels = labelled(raw, c) if i in at else None
                    if labels is not None:
                        got[at[i]] = Sample(at[i], mix(s.seed, epoch, offsets[k] + i, at[i] // r), raw, labels)
        return [got[v] for v in held if v in got]

    def _positions(
        self,
        epoch: int,
        segment: list[list[int]],
        v0: int,
        v1: int,
        order: list[int],
        offsets: list[int],
        finished: Finished,
    ) -> Iterator[Sample]:
        """Samples of virtual positions [v0, v1); bad samples and positions a shard did not deliver are finished."""
        s, c = self.spec, self.counters
        r = max(sum(b - a for a, b in segment), 1)
        for g0, g1, vbase in virtual_runs(segment, v0, v1):
            k = bisect.bisect_right(offsets, g0) - 1
            while g0 < g1:
                while offsets[k + 1] <= g0:  # skip empty shards
                    k += 1
                i0, i1 = g0 - offsets[k], min(g1, offsets[k + 1]) - offsets[k]
                seen, url = i0, s.urls[order[k]]
                idx = self.indexes.get(url)  # remote: read exactly the range's bytes
                for i, raw in shard_samples(url, i0, i1, c, s.max_bad_shards, idx, s.io):
                    seen = i + 1
                    v, pos = vbase + (offsets[k] + i - g0), offsets[k] + i
                    labels = labelled(raw, c)
                    if labels is None:
                        finished.set(v)
                    else:
                        yield Sample(v, mix(s.seed, epoch, pos, v // r), raw, labels)
                finished.set_range(vbase + offsets[k] + seen - g0, vbase + offsets[k] + i1 - g0)  # not delivered
                vbase += offsets[k] + i1 - g0
                g0 = offsets[k] + i1
                k += 1

    # ------------------------------------------------------------------------------------------- resampled

    def _resampled(self, w: int, skip: int, buffer: dict | None) -> Iterator[dict]:
        s, c = self.spec, self.counters
        reseed = int(self.resume.get("reseed", 0))
        source = ShardDraws(s, c, self.indexes, (s.seed, s.rank, w, reseed))  # whole shards, with replacement
        shuffler = Shuffler(s.shuffle_buffer, random.Random(mix(s.seed, s.rank, w, reseed, 1)))
        if buffer is not None:  # resume: refill the shuffle buffer by random access, read on where the source stood
            shuffler.buf[:] = source.fetch(buffer["held"])
            set_rng_state(shuffler.rng, buffer["rng"])
            source.restore(buffer["source"])
        # The pipeline: as in epoch mode, with whole shards drawn with replacement as the source.
        samples = shuffler(iter(source))
        if buffer is None:
            drawn = replay(samples, skip, c)  # resume without a saved buffer: pass over the saved draws undecoded
        else:
            drawn = ((skip + i, x) for i, x in enumerate(samples, 1))
        images = augmented(drawn, s.transform, c)  # decode + augment, seeded per sample
        for draws, batch in batched(images, s.batch_size, s.img_size, s.multilabel):
            state = {"held": [list(x.v) for x in shuffler.buf], "rng": list(shuffler.rng.getstate())}
            state["source"] = source.state()
            meta = {"worker": w, "epoch": 0, "watermark": 0, "raw": draws, "buffer": state}
            yield {**batch, "_meta": {**meta, **c.as_dict(), **_io()}}


def _io() -> dict:
    """This process's remote-read totals and decode outcomes (cumulative), reported with every batch."""
    return {"io_retries": IO_STATS.retries, "io_bytes": IO_STATS.bytes_read, "decode": dict(decode_stats())}
