"""A few-shot set's data: where its samples are, their classes, the labels of the shot pool and the k-shot draw.

The draw is a function of the labels of the pool (the first `max_train_images` samples of the train split, in
shard order), the seed and the shot counts only: the same shots at every evaluation, on any number of ranks and
after a resume. As in big_vision, each class's pool samples are permuted by one seeded generator (classes in label
order) and the k shots of a class are the first k of its permutation, so the 5 shots hold the 1 shot.
"""

from __future__ import annotations

import fcntl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.distributed as dist

from data_tools.storage import IOPolicy, is_remote
from pretrain.data import ShardError, ShardList, resolve_shards
from pretrain.data.decode import BadSample, label_of
from pretrain.data.stages import Counters, Indexes, shard_samples
from pretrain.fewshot.spec import SetSpec
from pretrain.typed_config import ConfigError

IMAGE_FOLDER_TEST_FRACTION = 0.2
"""An image folder given without a test location is sharded once with this fraction held out as its test split."""


class FewshotError(ConfigError):
    """A few-shot set that cannot be used; the message names it and the fix (exit 2 like a bad config)."""


@dataclass
class Samples:
    """Positions of a split's samples (in shard order) to embed."""

    shards: ShardList
    """The split's shards, with their sample counts."""
    positions: np.ndarray
    """(N,) sorted global positions: position p is sample p - offset of the shard that holds it."""


@dataclass
class FewshotSet:
    """A resolved set: its train and test shards and classes."""

    name: str
    """Name in the metrics."""
    train: ShardList
    """Train split (the shot pool is its first `max_train_images` samples)."""
    test: ShardList
    """Test split."""
    num_classes: int
    """Classes (from `_info.json`)."""


def _exists(location: str) -> bool:
    return is_remote(location) or "{" in location or location.startswith("pipe:") or Path(location).exists()


def _shard_image_folders(spec: SetSpec, seed: int) -> SetSpec:
    """`spec` with image folders replaced by their cache shard folders (sharded once per machine, under a lock so
    that the ranks of a node do not shard the same folder at once)."""
    from pretrain.downstream.finetune_data import resolve_data  # image folders -> shards: one home for that rule

    lock = Path(tempfile.gettempdir()) / "pretrain-fewshot.lock"
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        test = spec.test if spec.separate_test else None
        train, train_split, test, test_split = resolve_data(
            spec.train, test, spec.train_split, spec.test_split, IMAGE_FOLDER_TEST_FRACTION, seed
        )
    return SetSpec(spec.name, train, train_split, test, test_split, spec.separate_test)


def resolve_set(spec: SetSpec, seed: int = 0) -> FewshotSet:
    """Check a set's data and read its shard lists. Raises FewshotError (one line naming the set and the fix)."""
    for where in (spec.train, spec.test):
        if not _exists(where):
            raise FewshotError(
                f"few-shot set {spec.name}: {where} does not exist; pass a folder written by `python -m data_tools "
                "shard`, its URL, or an image folder of class folders"
            )
    spec = _shard_image_folders(spec, seed)
    try:
        train = resolve_shards(spec.train, spec.train_split)
        test = resolve_shards(spec.test, spec.test_split)
    except ShardError as e:
        raise FewshotError(f"few-shot set {spec.name}: {e}") from None
    if train.lengths is None or test.lengths is None:
        raise FewshotError(
            f"few-shot set {spec.name}: sample counts unknown; use a folder written by `python -m data_tools shard`"
        )
    num_classes = train.num_classes or len(train.class_names)
    if not num_classes:
        raise FewshotError(
            f"few-shot set {spec.name}: {spec.train} carries no class list (_info.json); shard it with "
            "`python -m data_tools shard`"
        )
    if test.class_names and train.class_names and test.class_names != train.class_names:
        raise FewshotError(
            f"few-shot set {spec.name}: the test shards have other classes than the train shards; shard both with "
            "the same class list (`data_tools shard --classes`)"
        )
    return FewshotSet(spec.name, train, test, num_classes)


def first_positions(shards: ShardList, limit: int) -> np.ndarray:
    """Positions 0 .. min(limit, total) - 1 (limit 0: all)."""
    total = shards.num_samples or 0
    return np.arange(min(limit, total) if limit else total)


def read_labels(shards: ShardList, count: int, io: IOPolicy, rank: int = 0, world: int = 1) -> np.ndarray:
    """Labels of samples 0 .. count - 1 (-1 for an unreadable sample), read by all ranks (shard j by rank j mod
    world, nothing decoded) and gathered: a collective when world > 1. Raises FewshotError for multi-label data."""
    counters, indexes = Counters(), Indexes(io)
    mine: dict[int, list[int]] = {}
    start = 0
    for j, n in enumerate(shards.lengths or []):
        take = min(n, count - start)
        if take <= 0:
            break
        if j % world == rank:
            labels = [-1] * take
            for i, raw in shard_samples(shards.urls[j], 0, take, counters, 1 << 30, indexes.get(shards.urls[j]), io):
                try:
                    found = label_of(raw)
                except BadSample:
                    continue
                if len(found) != 1:
                    raise FewshotError(
                        f"{shards.urls[j]} is multi-label; few-shot evaluation needs one class per image"
                    )
                labels[i] = found[0]
            mine[j] = labels
        start += take
    parts: list = [mine]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
    every = {j: labels for part in parts for j, labels in part.items()}
    return np.array([x for j in sorted(every) for x in every[j]], dtype=np.int64)


@dataclass
class Draw:
    """The k-shot draw of one set: for every class, its pool positions in drawn order (at most max(shots))."""

    per_class: list[np.ndarray]
    """per_class[c]: positions of class c's shots; the k shots are the first k."""

    def shots(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(positions, labels, shot index within the class) of the k-shot train set, classes in label order."""
        pos = [p[:k] for p in self.per_class]
        labels = [np.full(len(p), c) for c, p in enumerate(pos)]
        index = [np.arange(len(p)) for p in pos]
        return np.concatenate(pos), np.concatenate(labels), np.concatenate(index)

    def positions(self) -> np.ndarray:
        """Every drawn position, sorted (the train images to embed)."""
        return np.sort(np.concatenate(self.per_class))

    def short_classes(self, k: int) -> int:
        """Classes with fewer than k images in the pool."""
        return sum(len(p) < k for p in self.per_class)


def draw_shots(labels: np.ndarray, num_classes: int, max_shots: int, seed: int) -> Draw:
    """Permute each class's pool positions with one generator seeded by `seed` (classes in label order) and keep
    the first `max_shots` of each."""
    rng = np.random.default_rng(seed)
    return Draw([rng.permutation(np.flatnonzero(labels == c))[:max_shots] for c in range(num_classes)])
