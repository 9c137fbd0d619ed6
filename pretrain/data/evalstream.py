"""Evaluation stream: every held-out sample exactly once across ranks, the same number of batches on every rank.

Samples are read in canonical shard order (no shuffle). Slot (rank, worker) of S slots takes a contiguous block of
ceil(total / S) positions; every worker yields ceil(block / B) batches of exactly B samples, padded with zero images
whose `mask` is False, so all ranks run the same number of steps and the metric sums count each sample once.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from pretrain.data.decode import image_bytes, label_of
from pretrain.data.stages import Counters, Indexes, label_tensor, shard_samples, skip_reason
from pretrain.data.stream import StreamSpec


def eval_batches_per_worker(total: int, slots: int, batch_size: int) -> int:
    """Batches each worker yields (equal on all workers of all ranks)."""
    block = -(-total // slots)
    return -(-block // batch_size)


class EvalStream(IterableDataset):
    """Evaluation batches of one rank: {"image", "label", "mask", "key"}; padding has mask False and label 0."""

    def __init__(self, spec: StreamSpec, num_workers: int):
        self.spec, self.slots = spec, max(1, num_workers)
        self.counters = Counters()
        self.indexes = Indexes(spec.io)  # remote shards: read only the slot's samples, not the shard up to them

    def __iter__(self) -> Iterator[dict]:
        s = self.spec
        self.counters = Counters()  # per pass: persistent workers run many evaluations
        info = get_worker_info()
        w = 0 if info is None else info.id
        total, n_slots = sum(s.lengths), s.world_size * self.slots
        block = -(-total // n_slots)
        slot = s.rank * self.slots + w
        a, b = min(slot * block, total), min((slot + 1) * block, total)
        nb = eval_batches_per_worker(total, n_slots, s.batch_size)
        samples = self._samples(a, b)
        for _ in range(nb):
            shape = (s.batch_size, 3, s.img_size, s.img_size)
            images = torch.empty(shape, dtype=torch.uint8, memory_format=torch.channels_last).zero_()
            mask = torch.zeros(s.batch_size, dtype=torch.bool)
            labels, keys = [[0]] * s.batch_size, [""] * s.batch_size
            for j in range(s.batch_size):
                item = next(samples, None)
                if item is None:
                    break
                if item[1] is not None:
                    keys[j], images[j], labels[j], mask[j] = item[0], item[1], item[2], True
            label = label_tensor(labels, s.multilabel)
            yield {
                "image": images,
                "label": label,
                "mask": mask,
                "key": keys,
                "_meta": {"worker": w, **self.counters.as_dict()},
            }

    def _samples(self, a: int, b: int) -> Iterator[tuple[str, torch.Tensor | None, list[int] | None]]:
        """(key, image, labels) for positions [a, b); image None for a bad or missing sample (one per position)."""
        s, c = self.spec, self.counters
        offsets = [0]
        for n in s.lengths:
            offsets.append(offsets[-1] + n)
        g = a
        k = bisect.bisect_right(offsets, g) - 1
        while g < b:
            while offsets[k + 1] <= g:
                k += 1
            i0, i1 = g - offsets[k], min(b, offsets[k + 1]) - offsets[k]
            seen, index = i0, self.indexes.get(s.urls[k])
            for i, raw in shard_samples(s.urls[k], i0, i1, c, s.max_bad_shards, index, s.io):
                seen = i + 1
                try:
                    labels = label_of(raw)
                    image = s.transform(image_bytes(raw)[0])
                except Exception as e:  # noqa: BLE001 - the skip rule (stages.skip_reason): one sample, not the pass
                    c.sample(skip_reason(raw.key, e))
                    image = labels = None
                yield raw.key, image, labels
            for _ in range(i1 - seen):  # positions the shard did not deliver
                yield "", None, None
            g = offsets[k] + i1
