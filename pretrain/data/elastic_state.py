"""The stream's position: one typed state, equal on every rank, used by the workers, the loader and the checkpoint.

Everything the order depends on is a few numbers (`order.OrderSpec` minus the shard sizes, which `_info.json`
holds; `samples` guards against another shard set), and where the run stands is (epoch, consumed): the outputs
each canonical stream has given in this epoch (resampled: since the start), always a whole number of global batches.
Every rank consumes the same global batches, so every rank holds the same state; only the bad-data counts differ
per rank, and `RankCounts.merge` turns them into the run's totals at a save (a sum and a union over ranks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pretrain.data.order import OrderSpec, batches_per_epoch
from pretrain.typed_config import ConfigError

STATE_VERSION = 2
ORDER_FIELDS = ("mode", "seed", "streams", "global_batch", "shuffle_buffer", "remainder", "samples")
"""The fields that define the order: a resume with any of them changed is refused."""


class StateError(ConfigError):
    """A saved stream state that this run cannot continue; the one-line message names the setting."""


@dataclass(frozen=True)
class StreamState:
    """Where the training stream stands (JSON: `to_dict` / `from_dict`)."""

    mode: str
    """`epoch` or `resampled`."""
    seed: int
    """run.seed at the run's start."""
    streams: int
    """C, canonical streams (data.canonical_streams, or the starting layout's default)."""
    global_batch: int
    """G, samples per optimizer step over all ranks."""
    shuffle_buffer: int
    """Shuffle-buffer slots per canonical stream."""
    remainder: str
    """`drop` or `wrap`."""
    samples: int
    """Samples per epoch (sum of the shard sizes); 0 in resampled mode."""
    epoch: int = 0
    """Current epoch (0 in resampled mode)."""
    consumed: int = 0
    """Outputs every canonical stream has given in this epoch (resampled: since the start); batches x G / C."""
    bad_samples: int = 0
    """Bad outputs (substituted) in the consumed global batches, over all ranks, since the run's start."""
    bad_shards: tuple[int, ...] = ()
    """Shards (indices in the canonical shard list) found unreadable or truncated, over all ranks, sorted."""
    version: int = STATE_VERSION
    """Layout of this record."""

    def spec(self, lengths: tuple[int, ...]) -> OrderSpec:
        """The order this state walks, over shards of these sizes."""
        return OrderSpec(lengths, self.seed, self.streams, self.global_batch, self.shuffle_buffer, self.remainder)

    @property
    def batches(self) -> int:
        """Global batches consumed in this epoch (resampled: since the start)."""
        return self.consumed // (self.global_batch // self.streams)

    def advanced(self, batches: int = 1) -> StreamState:
        """The state after `batches` more global batches (epoch mode: rolling over into the next epochs)."""
        q = self.global_batch // self.streams
        consumed, epoch = self.consumed + batches * q, self.epoch
        if self.mode == "epoch":
            per_epoch = batches_per_epoch(self.spec(()), self.samples) * q
            epoch, consumed = epoch + consumed // per_epoch, consumed % per_epoch
        return dataclasses.replace(self, epoch=epoch, consumed=consumed)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (the checkpoint's `stream` entry)."""
        d = dataclasses.asdict(self)
        d["bad_shards"] = list(self.bad_shards)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> StreamState:
        """The state `to_dict` wrote; a state of another version (e.g. a per-rank list from before) is refused."""
        if not isinstance(d, dict) or d.get("version") != STATE_VERSION:
            got = f"version {d.get('version')}" if isinstance(d, dict) else "a per-rank list (version 1)"
            raise StateError(
                f"the checkpoint's stream state is {got}; this code reads version {STATE_VERSION}: resume it with "
                "the code that wrote it"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in d.items() if k in names})
        return dataclasses.replace(state, bad_shards=tuple(sorted(state.bad_shards)))

    @classmethod
    def from_version_1(cls, states: list[dict], run: StreamState) -> StreamState:
        """The state of the code before the elastic order (version 1: every rank's position in its own order) as
        a position in this order: the same epoch and the same number of global batches into it, this run's
        settings. The samples of that epoch may then repeat or be missed once; later epochs are whole."""
        old = states[0]
        done = old["batches"] * old["batch_size"] * old["world_size"] // run.global_batch
        bad = sum(st.get("bad_samples", 0) for st in states)
        return dataclasses.replace(run, epoch=old["epoch"], bad_samples=bad).advanced(done)

    def note_version_1(self) -> str:
        """The warning a resume from a version-1 state logs."""
        return (
            f"the checkpoint's stream state was written before the elastic order (version 1): the stream goes on at "
            f"epoch {self.epoch}, global batch {self.batches} of the new order; samples of this epoch may repeat or "
            "be missed once (later epochs are whole)"
        )

    def check_continues(self, run: StreamState) -> None:
        """Refuse to continue this saved state with a run whose order settings (`run`, a fresh state) differ."""
        diff = [f"{k}: checkpoint {getattr(self, k)!r} vs run {getattr(run, k)!r}" for k in ORDER_FIELDS]
        diff = [x for k, x in zip(ORDER_FIELDS, diff, strict=True) if getattr(self, k) != getattr(run, k)]
        if diff:
            raise StateError(
                f"the checkpoint's sample order was made with other settings ({'; '.join(diff)}); resume with the "
                "checkpoint's settings, or start afresh with train.resume=none"
            )


@dataclass(frozen=True)
class RankCounts:
    """Bad data one rank met in its consumed micro-batches since the resume (travels with the parts as counters)."""

    bad_samples: int = 0
    bad_shards: frozenset[int] = frozenset()

    def add(self, bad_samples: int, bad_shards: frozenset[int] | set[int] = frozenset()) -> RankCounts:
        return RankCounts(self.bad_samples + bad_samples, self.bad_shards | frozenset(bad_shards))

    @staticmethod
    def merge(state: StreamState, ranks: list[RankCounts]) -> StreamState:
        """The run's totals at a save: the resumed totals plus the sum (samples) and union (shards) over ranks.
        Every rank met different bad data, so this is the one exchange a save needs (a gather of these few
        numbers, not of any position)."""
        shards = set(state.bad_shards).union(*(r.bad_shards for r in ranks))
        return dataclasses.replace(
            state, bad_samples=state.bad_samples + sum(r.bad_samples for r in ranks), bad_shards=tuple(sorted(shards))
        )
