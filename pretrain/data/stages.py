"""The stages of the sample streams: small generators, each reading the one before (as OpenCLIP's data.py lists
webdataset stages), shared by the training stream's two modes and the evaluation stream.

    shard_samples   samples of a range of one shard; a bad or short shard is counted, not raised (the one home
                    of bad-shard handling)
    labelled        a sample without an image or a valid `.cls` is counted and left out
    Shuffler        a shuffle buffer whose state can be saved and restored
    replay          resume without a saved buffer: the saved run's draws are passed over without decoding
    augmented       decode and transform each sample with its own seed; a sample whose decode or transform fails,
                    for whatever reason, is counted and left out (`data.decode=gpu`: JPEGs are only cropped on
                    paper, see `gpu_decode`)
    batched         fixed-size uint8 batches (and the undecoded JPEGs of `data.decode=gpu`)

Every stage pulls one item at a time from the one before and looks no further ahead, so the counters a batch
reports are exactly those of the samples drawn up to it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import torch

from data_tools import format as fmt
from data_tools.decode import reason
from data_tools.storage import IOPolicy, StorageError, is_remote, read_bytes
from pretrain.data.decode import BadSample, BadShard, RawSample, image_bytes, label_of, read_shard
from pretrain.data.gpu_decode import JpegCrop, pack_jpegs

log = logging.getLogger("pretrain.data")
T = TypeVar("T")


@dataclass
class Counters:
    """Bad-data counts of one worker (cumulative); they travel to the main process with every batch."""

    bad_samples: int = 0
    bad_shards: int = 0
    last_bad_shard: str = ""

    def shard(self, err: BadShard, limit: int) -> None:
        """Count a bad shard; more than `limit` of them stop the run."""
        self.bad_shards += 1
        self.last_bad_shard = err.url
        log.warning("skipping bad shard %s (%d so far)", err, self.bad_shards)
        if self.bad_shards > limit:
            raise RuntimeError(
                f"{self.bad_shards} bad shards (limit data.max_bad_shards={limit}); the last was {err}. "
                "Check the shards with `python -m data_tools verify`, or raise the limit"
            )

    def sample(self, why: str) -> None:
        """Count a bad sample (logged the first 20 times, then every 1000th)."""
        self.bad_samples += 1
        if self.bad_samples <= 20 or self.bad_samples % 1000 == 0:
            log.warning("skipping bad sample: %s (%d so far)", why, self.bad_samples)

    def as_dict(self) -> dict:
        return {"bad_samples": self.bad_samples, "bad_shards": self.bad_shards, "last_bad_shard": self.last_bad_shard}


class Sample(NamedTuple):
    """A raw sample on its way to a batch."""

    v: int | tuple[int, int, int]
    """Virtual position in the epoch (epoch mode), or (n, shard, index in shard) in resampled mode: the n-th good
    sample drawn, and where to fetch it again."""
    seed: int
    """Seed of the sample's augmentation RNG."""
    raw: RawSample
    labels: list[int]


def shard_samples(
    url: str,
    start: int,
    end: int | None,
    counters: Counters,
    limit: int,
    offsets: list[int] | None = None,
    policy: IOPolicy | None = None,
) -> Iterator[tuple[int, RawSample]]:
    """`(index, sample)` for samples `start <= index < end` of one shard (`end` None: to the shard's end).

    A shard that cannot be opened or read, or that ends before `end` (its `_info.json` count), is counted as bad
    instead of raised: the caller sees fewer samples. `offsets` (the shard's index) lets a remote read start at
    sample `start`'s byte.
    """
    seen = start
    try:
        for i, raw in read_shard(url, start, end, offsets, policy):
            seen = i + 1
            yield i, raw
    except BadShard as e:
        counters.shard(e, limit)
    else:
        if end is not None and seen < end:
            counters.shard(BadShard(url, f"ended after {seen} samples; _info.json counts more"), limit)


class Indexes:
    """Sample indexes (`<shard>.idx`, byte offsets of each sample) of remote shards, fetched once per worker."""

    def __init__(self, policy: IOPolicy):
        self.policy, self.cache = policy, {}

    def get(self, url: str) -> list[int] | None:
        """The offsets of a remote shard's samples; None for local shards and shards without a readable index."""
        if not is_remote(url):
            return None
        if url not in self.cache:
            try:
                self.cache[url] = fmt.parse_index(read_bytes(fmt.index_name(url), self.policy))
            except (StorageError, fmt.FormatError) as e:
                log.warning("no sample index for %s (%s): it is read from its start", url, e)
                self.cache[url] = None
        return self.cache[url]


def skip_reason(key: str, e: Exception) -> str:
    """Why sample `key` is left out: a `BadSample`'s own message (it says what the file is), else `Type: message`.

    Any exception of one sample's decode or transform is such a reason (the stream's skip rule): one odd image
    never ends a worker, and with it the run.
    """
    why = str(e) if isinstance(e, BadSample) else reason(e)
    return why if why.startswith(f"{key}:") else f"{key}: {why}"


def labelled(raw: RawSample, counters: Counters) -> list[int] | None:
    """The sample's labels when it has an image and a valid `.cls`; else None, counted as a bad sample."""
    try:
        labels = label_of(raw)
        image_bytes(raw)
    except BadSample as e:
        counters.sample(str(e))
        return None
    return labels


class Shuffler:
    """Reservoir-style shuffle buffer: emits a random held item for each new one, then the rest in random order.

    Its state between two draws (the held items, the RNG, whether the input has ended) is what a resume restores:
    `buf` is the held items (in the flush phase, the ones left, last first).
    """

    def __init__(self, size: int, rng: random.Random):
        self.size, self.rng, self.buf, self.flushing = size, rng, [], False

    def __call__(self, items: Iterator[T]) -> Iterator[T]:
        buf, size, rng = self.buf, self.size, self.rng
        if not self.flushing:
            for item in items:
                if len(buf) < size:
                    buf.append(item)
                    continue
                j = rng.randrange(size)
                out, buf[j] = buf[j], item  # swapped before the yield: the state between draws is consistent
                yield out
            rng.shuffle(buf)
            buf.reverse()  # popped from the end: the shuffled order
            self.flushing = True
        while buf:
            yield buf.pop()


def replay(items: Iterator[T], skip: int, counters: Counters) -> Iterator[tuple[int, T]]:
    """`(draws so far, item)` for each item after the first `skip`, which are drawn and passed over undecoded.

    A resumed worker re-reads its raw samples and replays its shuffle buffer up to where the saved run stopped. The
    replay meets the saved run's bad data again: the counters restart from zero for it (so a limit is not reached
    by counting the same bad shard twice) and are set back to the saved ones where the saved run stopped.
    """
    stored = counters.as_dict()
    if skip:
        counters.bad_samples = counters.bad_shards = 0
    drawn = 0
    for item in items:
        drawn += 1
        if drawn <= skip:
            if drawn == skip:
                counters.bad_samples, counters.bad_shards = stored["bad_samples"], stored["bad_shards"]
            continue
        yield drawn, item


def augmented(
    items: Iterator[tuple[int, Sample]], transform: Callable, counters: Counters
) -> Iterator[tuple[int, torch.Tensor | JpegCrop, list[int], str]]:
    """`(draws, image, labels, key)`: each sample decoded and transformed with an RNG seeded by its own seed."""
    for drawn, sample in items:
        raw = sample.raw
        try:
            img = transform(image_bytes(raw)[0], random.Random(sample.seed))
        except Exception as e:  # noqa: BLE001 - the skip rule: see skip_reason
            counters.sample(skip_reason(raw.key, e))
            continue
        yield drawn, img, sample.labels, raw.key


def label_tensor(labels: list[list[int]], multilabel: bool) -> torch.Tensor:
    """int64 (B,) first labels, or (B, K) all labels padded with -1 for multi-label data."""
    if not multilabel:
        return torch.tensor([x[0] for x in labels], dtype=torch.int64)
    k = max(len(x) for x in labels)
    return torch.tensor([x + [-1] * (k - len(x)) for x in labels], dtype=torch.int64)


def batched(
    items: Iterator[tuple[int, torch.Tensor | JpegCrop, list[int], str]],
    batch_size: int,
    img_size: int,
    multilabel: bool,
) -> Iterator[tuple[int, dict]]:
    """`(draws, {"image": uint8 (B, 3, S, S), "label", "key"})` for every `batch_size` samples.

    Under `data.decode=gpu` an item may be an undecoded `JpegCrop`: its row of "image" is left zero and the batch
    carries it in "jpeg" (`gpu_decode.pack_jpegs`), for the main process to decode on the device.
    """
    images, labels, keys, jpegs = None, [], [], []
    for drawn, img, sample_labels, key in items:
        if images is None:
            # channels-last, like the crop-resize output: each sample is one contiguous copy (a CHW batch would
            # need a slow strided transpose per sample)
            shape = (batch_size, 3, img_size, img_size)
            images = torch.empty(shape, dtype=torch.uint8, memory_format=torch.channels_last)
        if isinstance(img, JpegCrop):
            images[len(keys)] = 0
            jpegs.append((len(keys), img))
        else:
            images[len(keys)] = img
        labels.append(sample_labels)
        keys.append(key)
        if len(keys) == batch_size:
            batch = {"image": images, "label": label_tensor(labels, multilabel), "key": keys}
            yield drawn, {**batch, "jpeg": pack_jpegs(jpegs)} if jpegs else batch
            images, labels, keys, jpegs = None, [], [], []


def runs_of(indexes: list[int]) -> list[tuple[int, int]]:
    """Sorted integers as half-open runs of consecutive ones: [1, 2, 3, 7] -> [(1, 4), (7, 8)]."""
    out: list[tuple[int, int]] = []
    for i in indexes:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out
