"""The training stream's workers: the elastic order (`order.py`) read from the shards, as parts of micro-batches.

One worker serves some canonical streams of its rank (`assign.Layout`); for each micro-batch it yields its part: the
rows of its streams. Per canonical stream:

    positions (order.py) -> Reader (held samples by random access, then sequential runs) -> ShuffleBuffer
    -> decode + augment with the slot's seed -> a bad slot filled by the stream's nearest good output -> part

Nothing depends on timing, the number of ranks or workers, or where the run was resumed: a stream's outputs are a
function of (seed, epoch, C, G, buffer, shard sizes) and of which samples are readable (docs/stream.md).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.utils.data import IterableDataset, get_worker_info

from data_tools.decode import decode_stats
from data_tools.storage import IO_STATS, IOPolicy
from pretrain.config import DataConfig
from pretrain.data.assign import Layout, worker_plan
from pretrain.data.decode import image_bytes
from pretrain.data.elastic_state import StreamState
from pretrain.data.gpu_decode import JpegCrop, pack_jpegs
from pretrain.data.order import EpochOrder, EpochStream, ResampledStream, ShuffleBuffer, stream_of, substitute
from pretrain.data.reader import Item, Reader, image_batch, skip_reason
from pretrain.data.shards import ShardList

log = logging.getLogger("pretrain.data")
Stream = EpochStream | ResampledStream


@dataclass(frozen=True)
class StreamSpec:
    """What every worker of a loader needs besides the order (pickled into each worker process); built from the
    config by `of`, with no defaults of its own."""

    urls: tuple[str, ...]
    lengths: tuple[int, ...]
    transform: Callable
    """bytes, random.Random -> uint8 (3, S, S) image (or `JpegCrop` under data.decode=gpu)."""
    img_size: int
    multilabel: bool
    max_bad_shards: int
    io: IOPolicy

    @classmethod
    def of(cls, cfg: DataConfig, shards: ShardList, transform: Callable, img_size: int, multilabel: bool) -> StreamSpec:
        urls, lengths = tuple(shards.urls), shards.counted()
        return cls(urls, lengths, transform, img_size, multilabel, cfg.max_bad_shards, cfg.io_policy())


class Out(NamedTuple):
    """One output slot of a canonical stream, ready for a batch."""

    image: torch.Tensor | JpegCrop
    labels: list[int]
    key: str
    bad: str = ""
    """Why the slot's own sample is bad (it holds a substitute); empty when good."""
    lost: int = -1
    """The bad shard the slot's own sample was lost to, or -1."""


class TrainStream(IterableDataset):
    """The parts one rank's worker yields, forever, from the position `state` on (iterate once per worker).

    Args:
        spec: shards and transform.
        layout: canonical streams, global batch, ranks, workers, micro-batches.
        rank: this rank.
        state: where the run stands (epoch, consumed) and the order's settings.
    """

    def __init__(self, spec: StreamSpec, layout: Layout, rank: int, state: StreamState):
        self.spec, self.layout, self.rank, self.state = spec, layout, rank, state
        self.order = state.spec(spec.lengths)
        self.logged = 0  # bad samples logged by this worker
        self.probes: dict[tuple[int, int, int], Out | None] = {}  # outputs read by random access (look-backs)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, st = 0 if info is None else info.id, self.state
        reader = Reader(self.spec.urls, self.spec.lengths, self.spec.io)
        per_epoch = None if st.mode == "resampled" else EpochOrder(self.order, 0).batches
        outputs: dict[tuple[int, int], Iterator[Out]] = {}
        for epoch, batch, micro, rows in worker_plan(self.layout, self.rank, worker, st.epoch, st.batches, per_epoch):
            outs = []
            for _, c, j in rows:
                if (epoch, c) not in outputs:  # the stream's first output in this epoch (or since the resume)
                    outputs = {key: it for key, it in outputs.items() if key[0] == epoch}
                    outputs[(epoch, c)] = self.filled(reader, epoch, c, j)
                outs.append(next(outputs[(epoch, c)]))
            yield self.part([epoch, batch, micro], [row for row, _, _ in rows], outs)

    def stream(self, epoch: int, c: int) -> Stream:
        return stream_of(self.order, self.state.mode, epoch, c)

    def filled(self, reader: Reader, epoch: int, c: int, k: int) -> Iterator[Out]:
        """Outputs k, k+1, ... of canonical stream c, each bad slot holding a copy of the stream's nearest earlier
        good output in the epoch (a resume looks back for it by random access), at the stream's start its nearest
        later one (`order.substitute`); a stream without any good output in the epoch borrows from the next ones."""
        stream = self.stream(epoch, c)
        last: Out | None = None
        known = k == 0  # whether `last` is known: after a resume, only once looked back for
        pending: list[tuple[int, Out]] = []  # bad slots waiting for the stream's first good output
        for j, item in enumerate(buffered(reader, stream, k), k):
            out = self.augment(item, stream.sample_seed(j))
            if out.bad and not known:
                probe = self.probe(reader, epoch, c)
                last, known = next((o for o in map(probe, range(j - 1, -1, -1)) if o), None), True
            if not out.bad:
                last, known = out, True
                yield from (out._replace(bad=b.bad, lost=b.lost) for _, b in pending)
                pending = []
            elif last is None:
                pending.append((j, out))
                if len(pending) > sum(self.spec.lengths) + self.order.buffer:
                    raise RuntimeError(f"no readable sample in an epoch's worth of stream {c} (e.g. {out.bad})")
                continue
            yield out if not out.bad else last._replace(bad=out.bad, lost=out.lost)
        for j, b in pending:  # the stream has no good output in this epoch
            yield self.borrowed(reader, epoch, c, j)._replace(bad=b.bad, lost=b.lost)

    def borrowed(self, reader: Reader, epoch: int, c: int, j: int) -> Out:
        """The substitute of output j of a stream without good outputs: the same rule in streams c+1, c+2, ..."""
        for step in range(1, self.order.streams):
            other = (c + step) % self.order.streams
            probe = self.probe(reader, epoch, other)
            i = substitute(j, lambda i, probe=probe: probe(i) is not None, self.stream(epoch, other).outputs, 1000)
            if i is not None:
                return probe(i)
        raise RuntimeError(f"no readable sample in any canonical stream of epoch {epoch}")

    def probe(self, reader: Reader, epoch: int, c: int) -> Callable[[int], Out | None]:
        """Output i of stream c read by random access (memoised): None when its own sample is bad."""
        stream = self.stream(epoch, c)

        def out(i: int) -> Out | None:
            if (epoch, c, i) not in self.probes:
                u = stream.shuffle.emitted(i)
                got = self.augment(reader.fetch({u: stream.where(u)})[u], stream.sample_seed(i))
                self.probes[(epoch, c, i)] = None if got.bad else got
            return self.probes[(epoch, c, i)]

        return out

    def augment(self, item: Item, seed: int) -> Out:
        """The sample decoded and transformed with the slot's seed; a bad one says why (the skip rule:
        `reader.skip_reason`)."""
        if item.raw is None:
            return Out(None, [], "", item.why, item.shard if item.lost else -1)
        try:
            return Out(self.spec.transform(image_bytes(item.raw)[0], random.Random(seed)), item.labels, item.raw.key)
        except Exception as e:  # noqa: BLE001 - the skip rule: see skip_reason
            return Out(None, [], "", skip_reason(item.raw.key, e))

    def part(self, at: list[int], rows: list[int], outs: list[Out]) -> dict:
        """A worker's rows of one micro-batch: images (uint8, channels-last), labels, keys, where they go, the bad
        data they met and this process's remote-read totals."""
        images, jpegs = image_batch(len(outs), self.spec.img_size), []
        for n, o in enumerate(outs):
            if isinstance(o.image, JpegCrop):  # data.decode=gpu: decoded by the main process
                images[n] = 0
                jpegs.append((n, o.image))
            else:
                images[n] = o.image
            if o.bad and o.lost < 0:
                self.logged += 1
                if self.logged <= 20 or self.logged % 1000 == 0:
                    log.warning("skipping bad sample: %s (%d so far in this worker)", o.bad, self.logged)
        return {
            "at": at,
            "rows": rows,
            "image": images,
            "label": [o.labels for o in outs],
            "key": [o.key for o in outs],
            "jpeg": pack_jpegs(jpegs) if jpegs else None,
            "bad_samples": sum(1 for o in outs if o.bad and o.lost < 0),
            "bad_shards": sorted({o.lost for o in outs if o.lost >= 0}),
            "io": [IO_STATS.retries, IO_STATS.bytes_read],
            "decode": dict(decode_stats()),  # region decodes and fallbacks by reason, cumulative
        }


def buffered(reader: Reader, stream: Stream, k: int) -> Iterator[Item | None]:
    """The items stream outputs k, k+1, ... emit: the buffer's holdings after k outputs (`SlotShuffle.held`)
    fetched by random access, then the stream's inputs read in order (sequential runs)."""
    sh = stream.shuffle
    held = sh.held(k).tolist()
    got = reader.fetch({u: stream.where(u) for u in held if u >= 0})
    first = sh.n + (k if sh.steps is None else min(k, sh.steps))
    end = sh.length if sh.length is not None else 1 << 62
    inputs = (item for shard, i0, i1, _ in stream.runs(first, end) for _, item in reader.run(shard, i0, i1))
    return iter(ShuffleBuffer(sh, k, [got.get(u) for u in held], inputs, stream.outputs))
