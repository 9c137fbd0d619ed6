"""Shuffle quality of the training order, measured on sample positions (no bytes are read): today's per-reader
order, the elastic order (`pretrain.data.order`), and a full random permutation of the epoch.

Data: a class-sorted shard set (1,000 classes x 100 samples written class after class into shards of 300, so each
shard holds 1-2 classes: what per-class i21k tars give when they are sharded without a global shuffle). Layout: 8
ranks x 32 (global batch 256), 4 workers per rank, shuffle buffer 2,000 (the default): each reader's range of the
epoch (3,125 samples) is 1.6 buffers, as for ImageNet-21k on 512 GPUs x 8 workers (14.2 M / 4,096 = 3,467 samples).
Per 256-sample global batch and per 32-sample micro-batch (one rank's forward): mean distinct classes, mean distinct
shards, and the fraction of batches holding two samples of one shard.

Today's order is rebuilt from its own parts (`positions.slot_range`, `stages.Shuffler`: the loader's arithmetic run
on positions); `today_replica_matches` checks that rebuild against the real loader's keys on digits shards.
`loader_quality` measures the same on the real loader's keys: the class-sorted set written as shards (a tiny PNG per
sample, key = position), read by 8 ranks x 32, 4 workers each, buffer 2,000, through the loader's public API.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np

Sample = tuple[int, int]  # (shard index in the canonical list, index in the shard)
DATA = {"classes": 1000, "per_class": 100, "shard_size": 300}
LAYOUT = {"world": 8, "micro": 32, "workers": 4, "buffer": 2000, "seed": 0, "epoch": 0}


def class_sorted(classes: int, per_class: int, shard_size: int) -> tuple[list[int], Callable[[Sample], int]]:
    """Shard sizes of a class-sorted set, and the class of a sample."""
    total = classes * per_class
    lengths = [min(shard_size, total - s) for s in range(0, total, shard_size)]
    return lengths, lambda x: (x[0] * shard_size + x[1]) // per_class


def _locate(order: list[int], offsets: list[int], p: int) -> Sample:
    k = bisect.bisect_right(offsets, p) - 1
    return order[k], p - offsets[k]


def today_batches(lengths: list[int], world: int, micro: int, workers: int, buffer: int, seed: int, epoch: int):
    """Today's epoch order: [global batch][rank] -> the rank's micro-batch of samples (None: not in this tree)."""
    try:
        from pretrain.data.positions import batches_per_rank, epoch_offsets, mix, slot_range, worker_quotas
        from pretrain.data.stages import Shuffler
    except ImportError:
        return None
    order, offsets = epoch_offsets(lengths, seed, epoch)
    n = batches_per_rank(offsets[-1], world, micro, "drop")
    quotas = worker_quotas(n, workers)
    ranks = []
    for r in range(world):
        outs = []
        for w in range(workers):
            v0, v1 = slot_range(r, w, n, quotas, micro)
            shuffler = Shuffler(buffer, random.Random(mix(seed, epoch, r * workers + w)))
            outs.append(list(itertools.islice(shuffler(iter(range(v0, v1))), quotas[w] * micro)))
        # the DataLoader's round-robin: batch i of the rank is worker i % W's batch i // W
        ranks.append([outs[i % workers][(i // workers) * micro : (i // workers + 1) * micro] for i in range(n)])
    return [[[_locate(order, offsets, p) for p in ranks[r][i]] for r in range(world)] for i in range(n)]


def elastic_batches(lengths: list[int], world: int, micro: int, workers: int, buffer: int, seed: int, epoch: int):
    """The elastic order with C = world x workers streams: [global batch][rank] -> micro-batch (None: no order.py)."""
    try:
        from pretrain.data.assign import Layout
        from pretrain.data.order import EpochOrder, OrderSpec
        from tests.helpers.elastic_model import emitted_inputs
    except ImportError:
        return None
    spec = OrderSpec(tuple(lengths), seed, world * workers, world * micro, buffer)
    order = EpochOrder(spec, epoch)
    outs = []
    for c in range(spec.streams):
        stream = order.stream(c)
        outs.append([stream.where(u) for u in emitted_inputs(stream, 0)])
    layout, q = Layout(spec.streams, spec.global_batch, world, workers), spec.per_stream
    s = layout.per_rank
    return [
        [[outs[r * s + i][b * q + j] for i, j in layout.micro_rows(0)] for r in range(world)]
        for b in range(order.batches)
    ]


def permutation_batches(lengths: list[int], world: int, micro: int, seed: int):
    """A full random permutation of the epoch cut into global batches, each split into the ranks' micro-batches."""
    samples = [(s, i) for s, n in enumerate(lengths) for i in range(n)]
    perm = np.random.default_rng(seed).permutation(len(samples))
    g = world * micro
    return [
        [[samples[k] for k in perm[b * g + r * micro : b * g + (r + 1) * micro]] for r in range(world)]
        for b in range(len(samples) // g)
    ]


def metrics(batches: list[list[Sample]], class_of: Callable[[Sample], int]) -> dict:
    """Mean distinct classes and shards per batch, and the fraction of batches with two samples of one shard."""
    classes = [len({class_of(x) for x in b}) for b in batches]
    shards = [len({x[0] for x in b}) for b in batches]
    repeats = [n < len(b) for n, b in zip(shards, batches, strict=True)]
    return {
        "batches": len(batches),
        "mean_distinct_classes": round(float(np.mean(classes)), 2),
        "mean_distinct_shards": round(float(np.mean(shards)), 2),
        "fraction_with_shard_repeat": round(float(np.mean(repeats)), 4),
    }


def quality() -> dict:
    """The three orders' metrics per global batch and per micro-batch."""
    lengths, class_of = class_sorted(**DATA)
    lay = LAYOUT
    orders = {
        "today": today_batches(lengths, **lay),
        "elastic": elastic_batches(lengths, **lay),
        "permutation": permutation_batches(lengths, lay["world"], lay["micro"], lay["seed"]),
    }
    out = {"data": DATA, "layout": lay}
    for name, batches in orders.items():
        if batches is None:
            out[name] = {"skipped": "not in this tree"}
            continue
        out[name] = {
            "global_batch_256": metrics([sum(ranks, []) for ranks in batches], class_of),
            "micro_batch_32": metrics([m for ranks in batches for m in ranks], class_of),
        }
    return out


def today_replica_matches(shards: Path, loader_for: Callable) -> bool | str:
    """Whether `today_batches` gives the real loader's keys (digits shards, 2 ranks x 2 workers, buffer 200)."""
    import json

    from pretrain.config import DataConfig
    from pretrain.data.decode import read_shard

    split = json.loads((shards / "_info.json").read_text())["splits"]["train"]
    keys = [[raw.key for _, raw in read_shard(str(shards / f))] for f in split["filenames"]]
    replica = today_batches(split["shard_lengths"], world=2, micro=16, workers=2, buffer=200, seed=0, epoch=0)
    if replica is None:
        return "skipped: not in this tree"
    cfg = DataConfig(train_shards=str(shards), shuffle_buffer=200, num_workers=2)
    for r in range(2):
        loader = loader_for(cfg, rank=r, world=2, batch=16, workers=2)
        it = iter(loader)
        got = [next(it)["key"] for _ in range(len(replica))]
        it.close()
        if got != [[keys[s][i] for s, i in b[r]] for b in replica]:
            return False
    return True


def loader_quality(tmp: Path, loader_for: Callable) -> dict:
    """`quality`'s metrics on the keys the real loader yields over the class-sorted set written as shards."""
    import io
    import json

    from PIL import Image
    from webdataset import TarWriter

    from pretrain.config import DataConfig

    lengths, class_of = class_sorted(**DATA)
    root, buf = tmp / "class_sorted", io.BytesIO()
    root.mkdir(exist_ok=True)
    Image.new("L", (4, 4)).save(buf, "PNG")
    position = 0
    for s, n in enumerate(lengths):
        with TarWriter(str(root / f"train-{s:06d}.tar")) as tw:
            for _ in range(n):
                tw.write({"__key__": f"{position:06d}", "png": buf.getvalue(), "cls": b"0"})
                position += 1
    names = [f"train-{s:06d}.tar" for s in range(len(lengths))]
    split = {"name": "train", "num_samples": sum(lengths), "filenames": names, "shard_lengths": lengths}
    (root / "_info.json").write_text(json.dumps({"name": "sorted", "splits": {"train": split}, "num_classes": 1}))
    lay = LAYOUT
    cfg = DataConfig(train_shards=str(root), shuffle_buffer=lay["buffer"], num_workers=lay["workers"])
    ranks = []
    for r in range(lay["world"]):
        loader = loader_for(cfg, rank=r, world=lay["world"], batch=lay["micro"], workers=lay["workers"])
        it = iter(loader)
        ranks.append([next(it)["key"] for _ in range(loader.batches_per_epoch)])
        it.close()
    size = DATA["shard_size"]
    batches = [
        [[(int(k) // size, int(k) % size) for k in ranks[r][b]] for r in range(lay["world"])]
        for b in range(len(ranks[0]))
    ]
    return {
        "global_batch_256": metrics([sum(rs, []) for rs in batches], class_of),
        "micro_batch_32": metrics([m for rs in batches for m in rs], class_of),
    }
