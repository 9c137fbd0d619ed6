"""The source of resampled mode: whole shards drawn with replacement, with a state that a resume restores.

Each reader draws a shard from its RNG, reads its samples in tar order, then draws the next; the n-th good sample
(from 1) is seeded by `(*seed_of, n)`. After every sample it hands on, the source's state is where it stands: the
shard RNG, the shard being read and the next sample in it, n, and the run of empty shards. With the shuffle buffer's
held samples (each known by (n, shard, index in shard)) and RNG, that is all a resume needs: it fetches the held
samples by random access, and reads on from the same sample, O(shuffle buffer) bytes wherever the run stopped,
instead of re-reading every draw since the start.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from pretrain.data.positions import mix
from pretrain.data.stages import Counters, Indexes, Sample, labelled, runs_of, shard_samples


def set_rng_state(rng: random.Random, saved: list) -> None:
    """Restore `rng` from `list(rng.getstate())` after a JSON round trip (its middle part back to a tuple)."""
    rng.setstate((saved[0], tuple(saved[1]), saved[2]))


class ShardDraws:
    """Samples of whole shards drawn with replacement; iterate once.

    Args:
        spec: the stream's `StreamSpec` (urls, bad-shard limit, I/O policy).
        counters: the worker's bad-data counters.
        indexes: the worker's sample indexes of remote shards (random access on resume).
        seed_of: the reader's seed tuple: the shard RNG is seeded by `mix(*seed_of)`, sample n by `mix(*seed_of, n)`.
    """

    def __init__(self, spec, counters: Counters, indexes: Indexes, seed_of: tuple[int, ...]):
        self.spec, self.counters, self.indexes, self.seed_of = spec, counters, indexes, seed_of
        self.rng = random.Random(mix(*seed_of))
        self.shard: int | None = None  # index into spec.urls of the shard being read; None: draw the next
        self.next = 0  # the next sample (index in the shard) to read
        self.n = 0  # good samples handed on so far
        self.got = 0  # good samples of the current shard so far
        self.empty = 0  # shards in a row without a good sample

    def state(self) -> dict:
        """Where the source stands after the last sample it handed on (JSON-serialisable)."""
        return {
            "rng": list(self.rng.getstate()),
            "shard": self.shard,
            "next": self.next,
            "n": self.n,
            "got": self.got,
            "empty": self.empty,
        }

    def restore(self, state: dict) -> None:
        """Stand where `state()` was taken: the next sample handed on is the one that followed then."""
        set_rng_state(self.rng, state["rng"])
        self.shard, self.next, self.n = state["shard"], state["next"], state["n"]
        self.got, self.empty = state["got"], state["empty"]

    def __iter__(self) -> Iterator[Sample]:
        s, c = self.spec, self.counters
        while True:
            if self.shard is None:
                self.shard, self.next, self.got = self.rng.randrange(len(s.urls)), 0, 0
            url = s.urls[self.shard]
            index = self.indexes.get(url) if self.next else None  # resumed mid-shard: seek (remote)
            for i, raw in shard_samples(url, self.next, None, c, s.max_bad_shards, index, s.io):
                self.next = i + 1
                labels = labelled(raw, c)
                if labels is not None:
                    self.got, self.n = self.got + 1, self.n + 1
                    yield Sample((self.n, self.shard, i), mix(*self.seed_of, self.n), raw, labels)
            self.empty = 0 if self.got else self.empty + 1
            if self.empty > 2 * len(s.urls) + 10:
                raise RuntimeError(f"no readable samples in {len(s.urls)} shards (e.g. {url})")
            self.shard = None

    def fetch(self, held: list[list[int]]) -> list[Sample]:
        """The samples `held` ([n, shard, index in shard] each, a saved shuffle buffer in its order), read by random
        access: remote shards with an index in runs of consecutive samples, others from the first held sample on."""
        s, c = self.spec, self.counters
        wanted: dict[int, dict[int, list[int]]] = {}  # shard -> {index in shard: [n, ...]} (a shard drawn twice)
        for n, shard, i in held:
            wanted.setdefault(shard, {}).setdefault(i, []).append(n)
        got: dict[int, Sample] = {}
        for shard, at in sorted(wanted.items()):
            url, index = s.urls[shard], self.indexes.get(s.urls[shard])
            for i0, i1 in runs_of(sorted(at)) if index is not None else [(min(at), max(at) + 1)]:
                for i, raw in shard_samples(url, i0, i1, c, s.max_bad_shards, index, s.io):
                    labels = labelled(raw, c) if i in at else None
                    for n in at.get(i, []) if labels is not None else []:
                        got[n] = Sample((n, shard, i), mix(*self.seed_of, n), raw, labels)
        return [got[n] for n, _, _ in held if n in got]
