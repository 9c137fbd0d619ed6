"""The resumable training stream: per-worker pipeline of the training dataset (epoch and resampled modes).

Slot (rank, w) reads the contiguous virtual range of its positions (`positions.py`), shuffles the raw bytes in a
buffer seeded by (seed, epoch, slot), then decodes and augments each sample with an RNG seeded by
(seed, epoch, position): the output never depends on timing. The pipeline is a list of stages (`stages.py`):

    read the slot's positions (bad samples and shards counted) -> shuffle -> [borrow the positions after the
    range if bad samples left it short] -> mark drawn positions finished -> replay on resume -> decode + augment
    -> batch

Each batch carries, per worker, a watermark (every position of the worker's range below it has left the shuffle
buffer), the number of raw samples drawn so far, and the bad-data counters; `loader.TrainLoader` turns these into
its state_dict.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from pretrain.data.positions import batches_per_rank, epoch_offsets, mix, slot_range, virtual_runs, worker_quotas
from pretrain.data.stages import Counters, Sample, augmented, batched, labelled, replay, shard_samples, shuffled


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

    def watermark(self) -> int:
        while self.mark < len(self.done) and self.done[self.mark]:
            self.mark += 1
        return self.mark


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
        finished = Finished(v0, v1)
        buffer_rng = random.Random(mix(s.seed, epoch, s.rank * self.slots + w))
        # The pipeline. If bad samples leave the slot short, it borrows the positions after its range (unshuffled;
        # duplicates are rare).
        own = self._positions(epoch, segment, v0, v1, order, offsets, finished)  # the slot's range
        borrowed = self._positions(epoch, segment, v1, v1 + r, order, offsets, finished)  # read only if needed
        samples = itertools.chain(shuffled(own, s.shuffle_buffer, buffer_rng), borrowed)
        samples = finished.track(samples)  # every drawn position is finished work
        drawn = replay(samples, skip, c)  # resume: pass over the saved run's draws undecoded
        images = augmented(drawn, s.transform, c)  # decode + augment, seeded per sample
        for draws, batch in batched(images, s.batch_size, s.img_size, s.multilabel):
            made += 1
            meta = {"worker": w, "epoch": epoch, "watermark": finished.watermark(), "raw": draws, **c.as_dict()}
            yield {**batch, "_meta": meta}
            if made >= quotas[w]:
                return
        raise RuntimeError(f"worker {w} of rank {s.rank} found no readable samples to fill its batches")

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
                seen = i0
                for i, raw in shard_samples(s.urls[order[k]], i0, i1, c, s.max_bad_shards):
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

    def _resampled(self, w: int) -> Iterator[dict]:
        s, c = self.spec, self.counters
        skip = int((self.resume.get("skip_raw") or [0] * self.slots)[w])
        reseed = int(self.resume.get("reseed", 0))
        shard_rng = random.Random(mix(s.seed, s.rank, w, reseed))
        buffer_rng = random.Random(mix(s.seed, s.rank, w, reseed, 1))
        # The pipeline: as in epoch mode, with whole shards drawn with replacement as the source.
        samples = self._drawn_shards(shard_rng, (s.seed, s.rank, w, reseed))
        samples = shuffled(samples, s.shuffle_buffer, buffer_rng)
        drawn = replay(samples, skip, c)  # resume: pass over the saved run's draws undecoded
        images = augmented(drawn, s.transform, c)  # decode + augment, seeded per sample
        for draws, batch in batched(images, s.batch_size, s.img_size, s.multilabel):
            yield {**batch, "_meta": {"worker": w, "epoch": 0, "watermark": 0, "raw": draws, **c.as_dict()}}

    def _drawn_shards(self, rng: random.Random, seed_of: tuple[int, ...]) -> Iterator[Sample]:
        """Samples of whole shards drawn with replacement; sample n (from 1) is seeded by (*seed_of, n)."""
        s, c = self.spec, self.counters
        n, empty = 0, 0
        while True:
            url, got = s.urls[rng.randrange(len(s.urls))], 0
            for _, raw in shard_samples(url, 0, None, c, s.max_bad_shards):
                labels = labelled(raw, c)
                if labels is not None:
                    got, n = got + 1, n + 1
                    yield Sample(n, mix(*seed_of, n), raw, labels)
            empty = 0 if got else empty + 1
            if empty > 2 * len(s.urls) + 10:
                raise RuntimeError(f"no readable samples in {len(s.urls)} shards (e.g. {url})")
