"""Samples by position, for the training and evaluation streams: sequential runs of a shard, random access to
scattered samples (remote shards: by their `.idx` index, nearby samples merged into one request), and every sample
a shard fails to deliver as a marked bad item, so that positions never shift.

A sample without an image or a valid `.cls` is a bad item too, and so is one whose decode or transform fails,
whatever the exception (`skip_reason`): one odd file never ends a worker.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Iterator
from typing import NamedTuple

import torch

from data_tools import format as fmt
from data_tools.decode import reason
from data_tools.storage import IOPolicy, StorageError, is_remote, read_bytes
from pretrain.data.decode import BadSample, BadShard, RawSample, image_bytes, label_of, read_shard

log = logging.getLogger("pretrain.data")


class Item(NamedTuple):
    """One position's sample: its bytes and labels, or why it is bad."""

    raw: RawSample | None
    """None when bad."""
    labels: list[int] | None
    shard: int
    """Index of its shard in the shard list."""
    why: str = ""
    """Why it is bad (names the sample or the shard); empty when good."""
    lost: bool = False
    """Bad because its shard could not be read to it (a bad shard), not because of the sample itself."""


class Reader:
    """One process's reads of a shard list: `run` (a range of one shard), `fetch` (scattered positions).

    Args:
        urls, lengths: the shard list (lengths: `_info.json`'s counts; a shard that ends before is bad).
        io: timeouts, retries and request size of remote reads.
    """

    def __init__(self, urls: tuple[str, ...], lengths: tuple[int, ...], io: IOPolicy):
        self.urls, self.lengths, self.io = urls, lengths, io
        self.indexes: dict[str, list[int] | None] = {}
        self.bad: set[int] = set()
        """Shards found bad by this reader (each logged once)."""

    def index(self, url: str) -> list[int] | None:
        """The byte offsets of a remote shard's samples (`<shard>.idx`, fetched once); None for local shards and
        shards without a readable index (read from their start)."""
        if url not in self.indexes:
            self.indexes[url] = None
            if is_remote(url):
                try:
                    self.indexes[url] = fmt.parse_index(read_bytes(fmt.index_name(url), self.io))
                except (StorageError, fmt.FormatError) as e:
                    log.warning("no sample index for %s (%s): it is read from its start", url, e)
        return self.indexes[url]

    def run(self, shard: int, i0: int, i1: int, want: Container[int] | None = None) -> Iterator[tuple[int, Item]]:
        """`(index, Item)` for samples i0 <= index < i1 of a shard (only those in `want`, when given), in order;
        samples the shard does not deliver (unreadable, truncated, shorter than its count) come as lost items."""
        url, got, why = self.urls[shard], i0, ""
        try:
            for i, raw in read_shard(url, i0, i1, self.index(url), self.io, want):
                got = i + 1
                yield i, self.item(raw, shard)
        except BadShard as e:
            why = str(e)
        rest = [i for i in range(got, i1) if want is None or i in want]
        if rest:
            why = why or f"{url}: ends before sample {rest[0]}; _info.json counts {self.lengths[shard]}"
            if shard not in self.bad:
                self.bad.add(shard)
                log.warning("skipping bad shard %s", why)
            yield from ((i, Item(None, None, shard, why, True)) for i in rest)

    @staticmethod
    def item(raw: RawSample, shard: int) -> Item:
        """The sample with its labels when it has an image and a valid `.cls`, else a bad item saying why."""
        try:
            labels = label_of(raw)
            image_bytes(raw)
        except BadSample as e:
            return Item(None, None, shard, str(e))
        return Item(raw, labels, shard)

    def fetch(self, where: dict[int, tuple[int, int]]) -> dict[int, Item]:
        """The items of scattered positions, by random access: {id: (shard, index)} -> {id: Item}.

        A local shard (or a remote one without an index) is read once from its first wanted sample to its last,
        only the wanted ones' bytes taken; an indexed remote shard in `spans`, one request each."""
        by_shard: dict[int, dict[int, list[int]]] = {}
        for key, (shard, i) in where.items():
            by_shard.setdefault(shard, {}).setdefault(i, []).append(key)
        out: dict[int, Item] = {}
        for shard, at in sorted(by_shard.items()):
            wanted = sorted(at)
            indexed = is_remote(self.urls[shard]) and self.index(self.urls[shard]) is not None
            for i0, i1 in spans(wanted) if indexed else [(wanted[0], wanted[-1] + 1)]:
                for i, item in self.run(shard, i0, i1, at):
                    out.update((key, item) for key in at[i])
        return out


def spans(wanted: list[int]) -> list[tuple[int, int]]:
    """Sorted sample indices as the ranges to request: runs of consecutive ones, the smallest gaps between runs
    merged while the merged gaps hold at most as many samples as are wanted (so a resume reads at most twice the
    held samples, in far fewer requests than one per run)."""
    runs: list[list[int]] = []
    for i in wanted:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    budget, merge = len(wanted), set()
    for g in sorted(range(len(runs) - 1), key=lambda g: runs[g + 1][0] - runs[g][1]):
        budget -= runs[g + 1][0] - runs[g][1]
        if budget < 0:
            break
        merge.add(g)
    out: list[tuple[int, int]] = []
    for g, (a, b) in enumerate(runs):
        if g - 1 in merge:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def skip_reason(key: str, e: Exception) -> str:
    """Why sample `key` is left out: a `BadSample`'s own message (it says what the file is), else `Type: message`.

    Any exception of one sample's decode or transform is such a reason (the stream's skip rule): one odd image
    never ends a worker, and with it the run.
    """
    why = str(e) if isinstance(e, BadSample) else reason(e)
    return why if why.startswith(f"{key}:") else f"{key}: {why}"


def label_tensor(labels: list[list[int]], multilabel: bool) -> torch.Tensor:
    """int64 (B,) first labels, or (B, K) all labels padded with -1 for multi-label data."""
    if not multilabel:
        return torch.tensor([x[0] for x in labels], dtype=torch.int64)
    k = max(len(x) for x in labels)
    return torch.tensor([x + [-1] * (k - len(x)) for x in labels], dtype=torch.int64)


def image_batch(n: int, size: int, pin: bool = False) -> torch.Tensor:
    """An uninitialised uint8 (n, 3, size, size) batch, channels-last like the crop-resize output: each sample is
    one contiguous copy (a CHW batch would need a slow strided transpose per sample)."""
    return torch.empty((n, 3, size, size), dtype=torch.uint8, memory_format=torch.channels_last, pin_memory=pin)
