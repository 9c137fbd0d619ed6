"""Evaluation stream: every held-out sample exactly once across ranks, the same number of batches on every rank.

Samples are read in canonical shard order (no shuffle). Slot (rank, worker) of S slots takes a contiguous block of
ceil(total / S) positions; every worker yields ceil(block / B) batches of exactly B samples, padded with zero images
whose `mask` is False, so all ranks run the same number of steps and the metric sums count each sample once.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from pretrain.data.decode import image_bytes
from pretrain.data.reader import Reader, image_batch, label_tensor, skip_reason
from pretrain.data.stream import StreamSpec

log = logging.getLogger("pretrain.data")


def eval_batches_per_worker(total: int, slots: int, batch_size: int) -> int:
    """Batches each worker yields (equal on all workers of all ranks)."""
    block = -(-total // slots)
    return -(-block // batch_size)


class EvalStream(IterableDataset):
    """Evaluation batches of one rank: {"image", "label", "mask", "key"}; padding has mask False and label 0."""

    def __init__(self, spec: StreamSpec, batch_size: int, rank: int, world_size: int, num_workers: int):
        self.spec, self.batch_size, self.rank, self.world_size = spec, batch_size, rank, world_size
        self.slots = max(1, num_workers)

    def __iter__(self) -> Iterator[dict]:
        s, bs = self.spec, self.batch_size
        info = get_worker_info()
        w = 0 if info is None else info.id
        total, n_slots = sum(s.lengths), self.world_size * self.slots
        block = -(-total // n_slots)
        slot = self.rank * self.slots + w
        reader, counts = Reader(s.urls, s.lengths, s.io), {"bad_samples": 0, "bad_shards": 0}  # per pass
        samples = self._samples(reader, min(slot * block, total), min((slot + 1) * block, total), counts)
        for _ in range(eval_batches_per_worker(total, n_slots, bs)):
            images, mask = image_batch(bs, s.img_size).zero_(), torch.zeros(bs, dtype=torch.bool)
            labels, keys = [[0]] * bs, [""] * bs
            for j, (key, image, label) in enumerate(itertools.islice(samples, bs)):
                if image is not None:
                    keys[j], images[j], labels[j], mask[j] = key, image, label, True
            counts["bad_shards"] = len(reader.bad)
            if counts["bad_shards"] > s.max_bad_shards:
                raise RuntimeError(
                    f"{len(reader.bad)} bad shards (limit data.max_bad_shards={s.max_bad_shards}), e.g. "
                    f"{s.urls[min(reader.bad)]}. Check the shards with `python -m data_tools verify`"
                )
            label = label_tensor(labels, s.multilabel)
            yield {"image": images, "label": label, "mask": mask, "key": keys, "_meta": {"worker": w, **counts}}

    def _samples(self, reader: Reader, a: int, b: int, counts: dict) -> Iterator[tuple]:
        """(key, image, labels) for positions [a, b) in shard order; image None for a bad or missing sample."""
        s, first = self.spec, 0
        for shard, n in enumerate(s.lengths):
            i0, i1 = max(a - first, 0), min(b - first, n)
            first += n
            for _, item in reader.run(shard, i0, i1) if i0 < i1 else ():
                why = item.why
                if item.raw is not None:
                    try:
                        yield item.raw.key, s.transform(image_bytes(item.raw)[0]), item.labels
                        continue
                    except Exception as e:  # noqa: BLE001 - the skip rule (reader.skip_reason): one sample, not the pass
                        why = skip_reason(item.raw.key, e)
                if not item.lost:
                    counts["bad_samples"] += 1
                    log.warning("skipping bad sample: %s (%d so far)", why, counts["bad_samples"])
                yield "", None, None
