"""Per-rank loaders: the training stream (micro-batches, state_dict / load_state_dict, meters) and evaluation.

loader = build_train_loader(cfg.data, img_size=224, batch_size=64, rank=r, world_size=w, seed=cfg.run.seed)
loader.load_state_dict(saved)                   # optional, before iterating: the checkpoint's stream state
for batch in loader:                            # infinite: epochs follow each other
    x = normalize(batch["image"].to(dev, non_blocking=True), cfg.data.mean, cfg.data.std, torch.bfloat16)
    ...
    state = loader.state_dict()                 # at a step boundary; `TrainLoader.merge` of every rank's is saved

Workers ignore stop signals (`workers.py`): the loaders stop them themselves, with `close()` (or `with loader:`),
after an error, and at the program's exit at the latest, so a script that takes a batch and returns ends.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Iterator

import torch

from pretrain.config import DataConfig
from pretrain.data.assign import Layout, default_streams
from pretrain.data.elastic_state import RankCounts, StateError, StreamState
from pretrain.data.evalstream import EvalStream, eval_batches_per_worker
from pretrain.data.gpu_decode import Decoder, DeferredTrainTransform, DeviceBatches
from pretrain.data.order import batches_per_epoch
from pretrain.data.reader import image_batch, label_tensor
from pretrain.data.shards import ShardList, resolve_shards
from pretrain.data.stream import StreamSpec, TrainStream
from pretrain.data.transforms import EvalTransform, TrainTransform
from pretrain.data.workers import closed, pss_gib, running, server_pids, stop_workers
from pretrain.data.workers import make_dataloader as _dataloader

log = logging.getLogger("pretrain.data")


class TrainLoader:
    """Training micro-batches of one rank: {"image": uint8 (m, 3, S, S), "label": int64 (m,) or (m, K), "key"}.

    Iterate it once (the iterator is infinite); `state_dict()` at a step boundary says where the run stands. With
    `on_device` (`data.decode=gpu`) each batch's images are assembled on the device before it is handed out.
    `close()` (or `with loader:`) stops the workers; so does an error, dropping the iterator, or the program's exit.

    Args:
        spec: shards and transform (`StreamSpec.of`).
        layout: canonical streams, global batch, ranks, workers, micro-batches per step.
        rank: this rank.
        state: a fresh run's state (order settings, epoch 0).
        shards: the shard list (class names).
        fixed_streams: C was set in the config (a resume must match it); else the checkpoint's C is taken.
    """

    per_rank = True
    """The Checkpointer gathers every rank's `state_dict()` and stores their `merge` (one record)."""

    def __init__(
        self,
        spec: StreamSpec,
        layout: Layout,
        rank: int,
        state: StreamState,
        shards: ShardList,
        fixed_streams: bool = False,
        pin_memory: bool | None = None,
        prefetch: int = 2,
        on_device: DeviceBatches | None = None,
    ):
        self.spec, self.layout, self.rank, self.state, self.fixed_streams = spec, layout, rank, state, fixed_streams
        self.num_classes, self.class_names = shards.num_classes, shards.class_names
        self.pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch, self.on_device = prefetch, on_device
        self._started, self._it, self._epoch, self._micro = False, None, state.epoch, 0
        self._counts = RankCounts()  # this rank's bad data in consumed micro-batches since the start or resume
        self._io: dict[int, list[int]] = {}  # per worker process: cumulative [retries, bytes]
        self._decode: dict[int, dict[str, int]] = {}  # per worker process: cumulative decode outcomes
        self._wait, self._images, self._t0, self._io_bytes0 = 0.0, 0, time.perf_counter(), 0

    @property
    def batches_per_epoch(self) -> int | None:
        """Micro-batches per rank in an epoch (None in resampled mode)."""
        if self.state.mode == "resampled":
            return None
        return batches_per_epoch(self.state.spec(self.spec.lengths), self.state.samples) * self.layout.accum

    @property
    def epoch(self) -> int:
        """The epoch of the last micro-batch handed out."""
        return self._epoch

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes now (idempotent); the loader yields nothing more."""
        self._started = True  # a closed loader is not iterated again
        it, self._it = self._it, None
        closed(self)
        if it is not None:
            stop_workers(it)

    def __iter__(self) -> Iterator[dict]:
        if self._started:
            raise RuntimeError("a TrainLoader is iterated once (its iterator is infinite); keep the iterator")
        self._started = True
        lay = self.layout
        if lay.workers > lay.used_workers:
            log.info("data.num_workers=%d: the rank's %d canonical streams keep %d busy", *lay.workers_line())
        stream = TrainStream(self.spec, self.layout, self.rank, self.state)
        workers = self.layout.used_workers if self.layout.workers else 0
        self._it = it = iter(_dataloader(stream, workers, False, self.prefetch))
        running(self, it)
        try:
            while True:
                t0 = time.perf_counter()
                batch = self._assemble([next(it) for _ in range(self.layout.used_workers)])
                if self.on_device is not None:  # data.decode=gpu: decoding is part of the wait for data
                    self._counts = self._counts.add(self.on_device(batch))
                self._wait += time.perf_counter() - t0
                self._images += len(batch["key"])
                yield batch
                if self._it is None:  # closed while the caller held this batch
                    return
        finally:  # an error, close(), or the iterator dropped: stop the workers now, not at garbage collection
            self.close()

    def _assemble(self, parts: list[dict]) -> dict:
        """One micro-batch from every worker's part: rows put in place, counters taken, the position advanced."""
        at, m = parts[0]["at"], self.layout.micro
        if any(p["at"] != at for p in parts):
            raise RuntimeError(f"the workers' parts belong to different micro-batches: {[p['at'] for p in parts]}")
        if len(parts) == 1 and parts[0]["rows"] == list(range(m)):  # one worker serves every row, in order
            image = parts[0]["image"].pin_memory() if self.pin else parts[0]["image"]
        else:
            image = image_batch(m, self.spec.img_size, self.pin)
            for p in parts:
                image[p["rows"]] = p["image"]
        labels, keys = [None] * m, [None] * m
        for w, p in enumerate(parts):
            for row, label, key in zip(p["rows"], p["label"], p["key"], strict=True):
                labels[row], keys[row] = label, key
            self._counts = self._counts.add(p["bad_samples"], p["bad_shards"])
            self._io[w], self._decode[w] = p["io"], p["decode"]
        self._check_bad_shards(parts)
        batch = {"image": image, "label": label_tensor(labels, self.spec.multilabel), "key": keys}
        jpeg = _merged_jpegs(parts)
        if jpeg is not None:
            batch["jpeg"] = jpeg
        self._epoch, self._micro = at[0], self._micro + 1
        if self._micro % self.layout.accum == 0:  # the step's last micro-batch: its global batch is consumed
            self.state = self.state.advanced(1)
        return batch

    def _check_bad_shards(self, parts: list[dict]) -> None:
        bad = set(self.state.bad_shards) | self._counts.bad_shards
        if len(bad) > self.spec.max_bad_shards:
            last = next(s for p in parts for s in p["bad_shards"])
            raise RuntimeError(
                f"{len(bad)} bad shards (limit data.max_bad_shards={self.spec.max_bad_shards}); the last was "
                f"{self.spec.urls[last]}. Check the shards with `python -m data_tools verify`, or raise the limit"
            )

    def stats(self, reset: bool = True) -> dict:
        """images_per_s, data_wait_fraction (time spent waiting in next() / wall time) and storage_bytes_per_s
        (remote reads) since the last reset; the bad-data counts, io_retries (remote faults retried), region_decodes,
        decode_fallbacks ({reason: images decoded whole}, `data_tools.decode.FALLBACKS`) and workers_gib (resident
        memory of the workers and their fork server, PSS) now."""
        now = time.perf_counter()
        dt = max(now - self._t0, 1e-9)
        io_bytes = sum(x[1] for x in self._io.values())
        workers = [w.pid for w in getattr(self._it, "_workers", ())]
        workers += server_pids() if workers else []
        decode = Counter()
        for x in self._decode.values():
            decode.update(x)
        out = {
            "images_per_s": self._images / dt,
            "data_wait_fraction": min(1.0, self._wait / dt),
            "storage_bytes_per_s": (io_bytes - self._io_bytes0) / dt,
            "io_retries": sum(x[0] for x in self._io.values()),
            "region_decodes": decode.pop("region", 0),
            "decode_fallbacks": dict(sorted(decode.items())),
            **self.bad_counts(),
            "workers_gib": pss_gib(workers),
        }
        if reset:
            self._wait, self._images, self._t0, self._io_bytes0 = 0.0, 0, now, io_bytes
        return out

    def bad_counts(self) -> dict:
        """Bad samples and shards met so far: the run's before the resume plus this rank's since."""
        bad_shards = set(self.state.bad_shards) | self._counts.bad_shards
        return {"bad_samples": self.state.bad_samples + self._counts.bad_samples, "bad_shards": len(bad_shards)}

    def state_dict(self) -> dict:
        """Where the run stands (the same on every rank), with this rank's bad data since the resume under "rank";
        `merge` turns every rank's into the run's record. Refused between the micro-batches of a step."""
        if self._micro % self.layout.accum:
            raise RuntimeError("the stream's state is saved at a step boundary, not between its micro-batches")
        mine = {"bad_samples": self._counts.bad_samples, "bad_shards": sorted(self._counts.bad_shards)}
        return {**RankCounts.merge(self.state, [self._counts]).to_dict(), "rank": mine}

    @staticmethod
    def merge(states: list[dict]) -> dict:
        """Every rank's `state_dict()` -> the run's record (`StreamState.to_dict()`): the position they share, the
        bad samples summed and the bad shards united. A record merged before is returned as it is."""
        if "rank" not in states[0]:
            return states[0]
        if len({(s["epoch"], s["consumed"]) for s in states}) > 1:
            raise StateError("the ranks' stream states stand at different positions; save at a step boundary")
        first = StreamState.from_dict(states[0])
        base = dataclasses.replace(first, bad_samples=first.bad_samples - states[0]["rank"]["bad_samples"])
        ranks = [RankCounts(s["rank"]["bad_samples"], frozenset(s["bad_shards"])) for s in states]
        return RankCounts.merge(base, ranks).to_dict()

    def load_state_dict(self, saved: dict | list) -> None:
        """Continue where the saved run stopped, on any layout whose world size divides its canonical streams: the
        global batches go on as in the uninterrupted run, sample for sample.

        Args:
            saved: the checkpoint's record (`merge`), a `state_dict()`, or every rank's `state_dict()`; a state of
                the code before the elastic order (version 1, per-rank lists) continues at its epoch and global
                batch in this order, with a warning.
        """
        if self._started:
            raise RuntimeError("load_state_dict must be called before iterating the loader")
        states = saved if isinstance(saved, list) else [saved]
        if states and states[0].get("version") == 1:
            state = StreamState.from_version_1(states, self.state)
            log.warning("%s", state.note_version_1())
        else:
            state = StreamState.from_dict(self.merge(states))
        fresh = self.state if self.fixed_streams else dataclasses.replace(self.state, streams=state.streams)
        state.check_continues(fresh)
        self.layout = dataclasses.replace(self.layout, streams=state.streams)  # refuses a world size not dividing C
        self.state, self._epoch = state, state.epoch


def _merged_jpegs(parts: list[dict]) -> dict | None:
    """`data.decode=gpu`: the parts' packed JPEGs as one pack whose rows are the micro-batch's."""
    packs = [(p["rows"], p["jpeg"]) for p in parts if p["jpeg"] is not None]
    if not packs:
        return None
    if len(packs) == 1 and packs[0][0] == list(range(len(packs[0][0]))):
        return packs[0][1]
    shifts = torch.tensor([0] + [int(j["offsets"][-1]) for _, j in packs[:-1]]).cumsum(0)  # bytes before each
    ends = [j["offsets"][1:] + shift for (_, j), shift in zip(packs, shifts, strict=True)]
    return {
        "index": torch.cat([torch.tensor(rows)[j["index"]] for rows, j in packs]),
        "data": torch.cat([j["data"] for _, j in packs]),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), *ends]),
        "box": torch.cat([j["box"] for _, j in packs]),
        "flip": torch.cat([j["flip"] for _, j in packs]),
    }


class EvalLoader:
    """Evaluation batches of one rank: {"image", "label", "mask": bool (B,), "key"}; `len()` equal on all ranks.

    Its workers persist from one pass to the next; `close()` (or `with loader:`), an error in a pass, or the
    program's exit stops them (a pass after `close()` starts new ones).
    """

    def __init__(
        self,
        shards: ShardList,
        spec: StreamSpec,
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
        pin_memory: bool | None = None,
    ):
        self.spec, self.slots = spec, max(1, num_workers)
        self.num_classes, self.class_names = shards.num_classes, shards.class_names
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_samples = sum(spec.lengths)
        self.last_bad_counts = {"bad_samples": 0, "bad_shards": 0}
        """Bad samples / shards met by the latest (or current) pass."""
        self._loader_args = (num_workers, pin_memory, 2)
        self._dl = _dataloader(self._stream(), *self._loader_args)
        self._it = None  # the DataLoader iterator, while workers may run

    def _stream(self) -> EvalStream:
        return EvalStream(self.spec, self.batch_size, self.rank, self.world_size, self._loader_args[0])

    def __enter__(self) -> EvalLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes now (idempotent); the next pass starts new ones."""
        it, self._it = self._it, None
        closed(self)
        if it is not None:
            stop_workers(it)
            # a fresh DataLoader: the old one would hand the stopped iterator to the next pass
            self._dl = _dataloader(self._stream(), *self._loader_args)

    def __len__(self) -> int:
        return self.slots * eval_batches_per_worker(self.num_samples, self.world_size * self.slots, self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        counters: dict[int, dict] = {}
        self._it = it = iter(self._dl)
        running(self, it)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except BaseException:
                self.close()  # a worker failed (e.g. too many bad shards): the others must not outlive the error
                raise
            meta = batch.pop("_meta")
            counters[meta["worker"]] = meta
            self.last_bad_counts = {k: sum(c[k] for c in counters.values()) for k in ("bad_samples", "bad_shards")}
            yield batch


def build_train_loader(
    cfg: DataConfig,
    *,
    img_size: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    accum_steps: int = 1,
    seed: int = 0,
    multilabel: bool = False,
    num_workers: int | None = None,
    pin_memory: bool | None = None,
    device: torch.device | str = "cuda",
    decoder: Decoder | None = None,
) -> TrainLoader:
    """The training loader of one rank from a `DataConfig`: micro-batches of `batch_size`, `accum_steps` of them
    per optimizer step, so the global batch is batch_size x world_size x accum_steps.

    `device` and `decoder` serve `data.decode=gpu` only: where the batches are assembled, and the batched JPEG
    decoder (default nvJPEG on `device`; see `gpu_decode.DeviceBatches`).
    """
    shards = resolve_shards(cfg.train_shards, cfg.train_split)
    on_device = None
    if cfg.decode == "gpu":
        transform = DeferredTrainTransform(img_size, cfg.crop_scale_min, cfg.hflip)
        on_device = DeviceBatches(device, decoder)
    else:
        transform = TrainTransform(
            img_size, cfg.crop_scale_min, cfg.hflip, cfg.randaugment_ops, cfg.randaugment_magnitude
        )
    spec = StreamSpec.of(cfg, shards, transform, img_size, multilabel)
    workers = cfg.num_workers if num_workers is None else num_workers
    g = batch_size * world_size * accum_steps
    streams = cfg.canonical_streams or default_streams(world_size, workers, g)
    state = StreamState(cfg.mode, seed, streams, g, cfg.shuffle_buffer, cfg.remainder, sum(spec.lengths))
    state.spec(spec.lengths)  # refuses C not dividing G (one line)
    layout = Layout(streams, g, world_size, workers, accum_steps)
    return TrainLoader(spec, layout, rank, state, shards, cfg.canonical_streams > 0, pin_memory, on_device=on_device)


def build_eval_loader(
    cfg: DataConfig,
    *,
    img_size: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    multilabel: bool = False,
    num_workers: int | None = None,
    pin_memory: bool | None = None,
) -> EvalLoader | None:
    """The evaluation loader of one rank (None when `cfg.val_shards` is empty)."""
    if not cfg.val_shards:
        return None
    shards = resolve_shards(cfg.val_shards, cfg.val_split)
    spec = StreamSpec.of(cfg, shards, EvalTransform(img_size, cfg.eval_crop_pct), img_size, multilabel)
    workers = cfg.num_workers if num_workers is None else num_workers
    return EvalLoader(shards, spec, batch_size, rank, world_size, workers, pin_memory)
