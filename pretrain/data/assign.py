"""Who serves what: global batch b of the order (`order.py`) split over ranks, loader workers and micro-batches.
Pure arithmetic on (C, G, R, W, A), the same for every global batch (docs/stream.md, "Layouts").

Rank r of R owns streams [r*S, (r+1)*S), S = C / R; its S x q share (stream i, output j) read output-major is cut
into A micro-batches of m = G / (R*A) rows. Worker w serves the rank's streams i with i % W == w and yields, per
micro-batch, its rows; the main process puts them in place, so a micro-batch never depends on W.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

from pretrain.typed_config import ConfigError


class LayoutError(ConfigError):
    """This layout cannot serve the saved order; the one-line message names the valid values."""


def divisors(n: int) -> list[int]:
    """The positive divisors of n, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def default_streams(world_size: int, workers: int, global_batch: int) -> int:
    """C for a new run: world_size x (the largest divisor of G / world_size that is at most num_workers), so that
    every worker of the starting layout serves one stream and C divides G (e.g. 2 ranks x 4 workers, G 4096: 8)."""
    per_rank = global_batch // world_size
    return world_size * max(d for d in divisors(per_rank) if d <= max(workers, 1))


@dataclass(frozen=True)
class Layout:
    """One physical layout serving C canonical streams.

    Raises LayoutError when R does not divide C, or the batch sizes do not divide.
    """

    streams: int
    """C, from the stream state (fixed at the run's start)."""
    global_batch: int
    """G, train.global_batch_size."""
    world_size: int
    """R, ranks of this run."""
    workers: int
    """data.num_workers requested (0: the rank's main process serves its streams); at most S are used."""
    accum: int = 1
    """A, micro-batches per optimizer step on each rank."""

    def __post_init__(self):
        c, g, r = self.streams, self.global_batch, self.world_size
        if c < 1 or g % c:
            raise LayoutError(f"train.global_batch_size={g} is not a multiple of the {c} canonical streams")
        if c % r:
            ok = ", ".join(str(d) for d in divisors(c))
            raise LayoutError(
                f"the stream has {c} canonical streams (fixed at the run's start) and {r} ranks cannot share them "
                f"equally; resume on a world size that divides {c}: {ok}"
            )
        if self.accum < 1 or (g // r) % self.accum:
            raise LayoutError(f"{g // r} samples per rank and step cannot form {self.accum} equal micro-batches")

    @property
    def per_stream(self) -> int:
        """q: outputs of each stream in one global batch."""
        return self.global_batch // self.streams

    @property
    def per_rank(self) -> int:
        """S: streams of each rank."""
        return self.streams // self.world_size

    @property
    def micro(self) -> int:
        """m: samples per micro-batch on each rank."""
        return self.global_batch // (self.world_size * self.accum)

    @property
    def used_workers(self) -> int:
        """Workers that serve streams: min(num_workers, S), at least 1 (the main process when num_workers is 0)."""
        return min(max(self.workers, 1), self.per_rank)

    def workers_line(self) -> tuple[int, int, int]:
        """(workers asked for, streams per rank, workers used): what the loader logs when fewer are used."""
        return self.workers, self.per_rank, self.used_workers

    def rank_streams(self, rank: int) -> range:
        """Canonical streams of `rank`."""
        return range(rank * self.per_rank, (rank + 1) * self.per_rank)

    def worker_streams(self, worker: int) -> list[int]:
        """Streams of a rank (indices 0..S-1 within the rank) that `worker` serves."""
        return list(range(worker, self.per_rank, self.used_workers))

    @cached_property
    def _rows(self) -> list[list[tuple[int, int]]]:
        s, m = self.per_rank, self.micro
        return [[((a * m + row) % s, (a * m + row) // s) for row in range(m)] for a in range(self.accum)]

    def micro_rows(self, a: int) -> list[tuple[int, int]]:
        """(stream within the rank, output within the global batch) of every row of micro-batch a."""
        return self._rows[a]

    def part_rows(self, worker: int, a: int) -> list[tuple[int, int, int]]:
        """(row, stream within the rank, output within the global batch) of the rows `worker` serves in micro-batch
        a, in row order (each stream's outputs in order)."""
        w = self.used_workers
        return [(row, i, j) for row, (i, j) in enumerate(self._rows[a]) if i % w == worker]


def worker_plan(
    layout: Layout, rank: int, worker: int, epoch: int, batch: int, batches_per_epoch: int | None
) -> Iterator[tuple[int, int, int, list[tuple[int, int, int]]]]:
    """What `worker` of `rank` yields, from global batch `batch` of `epoch` on, forever: per micro-batch
    (epoch, global batch, micro-batch, [(row, canonical stream, output index in the stream's epoch)]).

    `batches_per_epoch` None: resampled mode (one endless epoch 0; the output index counts from the run's start).
    A worker that serves no row of a micro-batch still yields it (an empty part), so the DataLoader's round-robin
    over the workers stays in micro-batch order.
    """
    q, first = layout.per_stream, rank * layout.per_rank
    parts = [layout.part_rows(worker, a) for a in range(layout.accum)]
    while True:
        for a, rows in enumerate(parts):
            yield epoch, batch, a, [(row, first + i, batch * q + j) for row, i, j in rows]
        batch += 1
        if batch == batches_per_epoch:
            epoch, batch = epoch + 1, 0
