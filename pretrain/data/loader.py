"""Per-rank loaders: the training stream with state_dict / load_state_dict and throughput meters, and evaluation.

loader = build_train_loader(cfg.data, img_size=224, batch_size=64, rank=r, world_size=w, seed=cfg.run.seed)
loader.load_state_dict(all_ranks_states)       # optional, before iterating
for batch in loader:                            # infinite: epochs follow each other
    x = normalize(batch["image"].to(dev, non_blocking=True), cfg.data.mean, cfg.data.std, torch.bfloat16)
    ...
    states = all_gather_object(loader.state_dict())   # stored in the checkpoint

Workers ignore stop signals (`workers.py`): the loaders stop them themselves, with `close()` (or `with loader:`),
after an error, and at the program's exit at the latest, so a script that takes a batch and returns ends.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from data_tools.storage import IOPolicy
from pretrain.config import DataConfig
from pretrain.data.evalstream import EvalStream, eval_batches_per_worker
from pretrain.data.gpu_decode import Decoder, DeferredTrainTransform, DeviceBatches
from pretrain.data.positions import batches_per_rank, unfinished
from pretrain.data.shards import ShardError, ShardList, resolve_shards
from pretrain.data.stream import StreamSpec, TrainStream
from pretrain.data.transforms import EvalTransform, TrainTransform
from pretrain.data.workers import closed, running, stop_workers
from pretrain.data.workers import make_dataloader as _dataloader

STATE_VERSION = 1


class TrainLoader:
    """Training batches of one rank: {"image": uint8 (B, 3, S, S), "label": int64 (B,) or (B, K), "key": [str]}.

    Iterate it once (the iterator is infinite); `state_dict()` describes the batches consumed so far. With
    `on_device` (`data.decode=gpu`) each batch's images are assembled on the device before it is handed out.
    `close()` (or `with loader:`) stops the workers; so does an error, dropping the iterator, or the program's exit.
    """

    def __init__(
        self,
        shards: ShardList,
        spec: StreamSpec,
        num_workers: int,
        pin_memory=None,
        prefetch: int = 2,
        on_device: DeviceBatches | None = None,
    ):
        if spec.mode == "epoch" and shards.lengths is None:
            raise ShardError(
                "epoch mode needs per-shard sample counts: use a folder with _info.json or data.mode=resampled"
            )
        self.shards, self.spec, self.num_workers = shards, spec, num_workers
        self.slots = max(1, num_workers)
        self.pin_memory, self.prefetch, self.on_device = pin_memory, prefetch, on_device
        self.num_classes, self.class_names = shards.num_classes, shards.class_names
        self._resume: dict | None = None
        self._started = False
        self._it = None  # the DataLoader iterator, while workers may run
        self._epoch, self._k, self._reseed = 0, 0, 0
        self._segment = [[0, shards.num_samples or 0]]
        self._new_epoch_workers()
        self._counters = [_zero_counters() for _ in range(self.slots)]
        self._base = {"bad_samples": 0, "bad_shards": 0}
        self._wait, self._images, self._t0 = 0.0, 0, time.perf_counter()
        self._io = [{"io_retries": 0, "io_bytes": 0, "decode": {}} for _ in range(self.slots)]  # per worker, cumulative
        self._io_bytes0 = 0

    def _new_epoch_workers(self) -> None:
        self._workers = [{"watermark": 0, "raw": 0, "buffer": None} for _ in range(self.slots)]

    @property
    def batches_per_epoch(self) -> int | None:
        """Batches per rank in a full epoch (None in resampled mode)."""
        s = self.spec
        return (
            None if s.mode == "resampled" else batches_per_rank(sum(s.lengths), s.world_size, s.batch_size, s.remainder)
        )

    @property
    def epoch(self) -> int:
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
        stream = TrainStream(self.spec, self.num_workers, self._resume)
        dl = _dataloader(stream, self.num_workers, self.pin_memory, self.prefetch)
        try:
            yield from self._epochs(dl)
        finally:  # an error, close(), or the iterator dropped: stop the workers now, not at garbage collection
            self.close()

    def _epochs(self, dl: DataLoader) -> Iterator[dict]:
        while True:
            self._it = it = iter(dl)  # persistent workers: the same iterator (and processes) every epoch
            running(self, it)
            t0 = time.perf_counter()
            while True:
                try:
                    batch = next(it)
                except StopIteration:
                    break
                self._consume(batch.pop("_meta"))
                if self.on_device is not None:  # data.decode=gpu: decoding is part of the wait for data
                    self._base["bad_samples"] += self.on_device(batch)
                self._wait += time.perf_counter() - t0
                self._images += batch["image"].shape[0]
                yield batch
                if self._it is None:  # closed while the caller held this batch
                    return
                t0 = time.perf_counter()
            if self.spec.mode == "resampled":
                return
            self._base = self.bad_counts()  # worker counters restart with every epoch
            self._counters = [_zero_counters() for _ in range(self.slots)]
            self._epoch, self._k = self._epoch + 1, 0
            self._segment = [[0, sum(self.spec.lengths)]]
            self._new_epoch_workers()

    def _consume(self, meta: dict) -> None:
        w = meta["worker"]
        self._k += 1
        self._workers[w] = {"watermark": meta["watermark"], "raw": meta["raw"], "buffer": meta["buffer"]}
        self._io[w] = {"io_retries": meta["io_retries"], "io_bytes": meta["io_bytes"], "decode": meta["decode"]}
        self._counters[w] = {k: meta[k] for k in ("bad_samples", "bad_shards", "last_bad_shard")}
        bad = self._base["bad_shards"] + sum(c["bad_shards"] for c in self._counters)
        if bad > self.spec.max_bad_shards:
            raise RuntimeError(
                f"{bad} bad shards on rank {self.spec.rank} (limit data.max_bad_shards={self.spec.max_bad_shards}); "
                f"the last was {meta['last_bad_shard']}. Check the shards with `python -m data_tools verify`"
            )

    def stats(self, reset: bool = True) -> dict:
        """images_per_s, data_wait_fraction (time spent waiting in next() / wall time) and storage_bytes_per_s
        (remote reads) since the last reset; the bad-data counts, io_retries (remote faults retried), region_decodes
        and decode_fallbacks ({reason: images decoded whole}, `data_tools.decode.FALLBACKS`) so far."""
        now = time.perf_counter()
        dt = max(now - self._t0, 1e-9)
        io_bytes = sum(x["io_bytes"] for x in self._io)
        decode = Counter()
        for x in self._io:
            decode.update(x["decode"])
        out = {
            "images_per_s": self._images / dt,
            "data_wait_fraction": min(1.0, self._wait / dt),
            "storage_bytes_per_s": (io_bytes - self._io_bytes0) / dt,
            "io_retries": sum(x["io_retries"] for x in self._io),
            "region_decodes": decode.pop("region", 0),
            "decode_fallbacks": dict(sorted(decode.items())),
            **self.bad_counts(),
        }
        if reset:
            self._wait, self._images, self._t0, self._io_bytes0 = 0.0, 0, now, io_bytes
        return out

    def bad_counts(self) -> dict:
        """Bad samples and shards skipped on this rank so far (also stored in the state)."""
        return {k: self._base[k] + sum(c[k] for c in self._counters) for k in ("bad_samples", "bad_shards")}

    def state_dict(self) -> dict:
        """This rank's position; gather it from all ranks and pass the list to `load_state_dict` on resume."""
        s = self.spec
        return {
            "version": STATE_VERSION,
            "mode": s.mode,
            "seed": s.seed,
            "remainder": s.remainder,
            "batch_size": s.batch_size,
            "world_size": s.world_size,
            "rank": s.rank,
            "num_workers": self.slots,
            "epoch": self._epoch,
            "batches": self._k,
            "reseed": self._reseed,
            "segment": [list(x) for x in self._segment],
            "workers": [dict(w, **c) for w, c in zip(self._workers, self._counters, strict=True)],
            **self.bad_counts(),
        }

    def load_state_dict(self, states: list[dict] | dict) -> None:
        """Continue where the saved run stopped.

        Same world size, workers and batch size: the batches continue bit for bit. Otherwise (epoch mode) every
        position of the epoch not yet consumed on any old rank is read again by the new layout: nothing is skipped;
        a few samples (at most a shuffle buffer and a batch per old worker) are repeated once.

        Args:
            states: `state_dict()` of every rank of the saved run (a single dict for a one-rank run).
        """
        if self._started:
            raise RuntimeError("load_state_dict must be called before iterating the loader")
        states = [states] if isinstance(states, dict) else sorted(states, key=lambda st: st["rank"])
        s, old = self.spec, states[0]
        if old.get("version") != STATE_VERSION or old["mode"] != s.mode:
            raise ValueError(
                f"stream state is for mode={old['mode']!r} version {old.get('version')}; this run uses {s.mode!r}"
            )
        if [st["rank"] for st in states] != list(range(old["world_size"])):
            raise ValueError(
                f"need the stream state of all {old['world_size']} ranks, got ranks {[st['rank'] for st in states]}"
            )
        same = all(
            (st["world_size"], st["num_workers"], st["batch_size"], st["remainder"], st["seed"])
            == (s.world_size, self.slots, s.batch_size, s.remainder, s.seed)
            for st in states
        )
        if same:
            mine = states[s.rank]
            k = mine["batches"]
            self._epoch, self._k, self._segment, self._reseed = mine["epoch"], k, mine["segment"], mine["reseed"]
            self._workers = [
                {"watermark": w["watermark"], "raw": w["raw"], "buffer": w.get("buffer")} for w in mine["workers"]
            ]
            self._counters = [
                {x: w[x] for x in ("bad_samples", "bad_shards", "last_bad_shard")} for w in mine["workers"]
            ]
            self._base = {x: mine[x] - sum(c[x] for c in self._counters) for x in ("bad_samples", "bad_shards")}
            self._resume = {
                "epoch": self._epoch,
                "segment": self._segment,
                "skip_raw": [w["raw"] for w in self._workers],
                "buffers": [w["buffer"] for w in self._workers],
                "skip_batches": [k // self.slots + (w < k % self.slots) for w in range(self.slots)],
                "counters": self._counters,
                "reseed": self._reseed,
                "shift": k % self.slots,
            }
            return
        # a different layout: carry the counts over (summed onto new ranks), then re-split the unfinished work
        self._base = {
            x: sum(st[x] for st in states if st["rank"] % s.world_size == s.rank) for x in ("bad_samples", "bad_shards")
        }
        if s.mode == "resampled":  # no positions to track: a fresh stream with a new seed
            self._reseed = old["reseed"] + sum(st["batches"] for st in states) + 1
            self._resume = {"reseed": self._reseed, "skip_raw": [0] * self.slots, "shift": 0}
            return
        self._epoch, self._k, self._segment = old["epoch"], 0, unfinished(states)
        if not self._segment:
            self._epoch, self._segment = self._epoch + 1, [[0, sum(s.lengths)]]
        zeros = [0] * self.slots
        self._resume = {"epoch": self._epoch, "segment": self._segment, "skip_raw": zeros, "skip_batches": zeros}


def _zero_counters() -> dict:
    return {"bad_samples": 0, "bad_shards": 0, "last_bad_shard": ""}


class EvalLoader:
    """Evaluation batches of one rank: {"image", "label", "mask": bool (B,), "key"}; `len()` equal on all ranks.

    Its workers persist from one pass to the next; `close()` (or `with loader:`), an error in a pass, or the
    program's exit stops them (a pass after `close()` starts new ones).
    """

    def __init__(self, shards: ShardList, spec: StreamSpec, num_workers: int, pin_memory=None, prefetch: int = 2):
        if shards.lengths is None:
            raise ShardError(
                "evaluation needs per-shard sample counts: point data.val_shards at a folder with _info.json"
            )
        self.shards, self.spec, self.slots = shards, spec, max(1, num_workers)
        self.num_classes, self.class_names = shards.num_classes, shards.class_names
        self.num_samples = sum(shards.lengths)
        self.last_bad_counts = {"bad_samples": 0, "bad_shards": 0}
        """Bad samples / shards met by the latest (or current) pass."""
        self._loader_args = (num_workers, pin_memory, prefetch)
        self._dl = _dataloader(EvalStream(spec, num_workers), *self._loader_args)
        self._it = None  # the DataLoader iterator, while workers may run

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
            self._dl = _dataloader(EvalStream(self.spec, self._loader_args[0]), *self._loader_args)

    def __len__(self) -> int:
        return self.slots * eval_batches_per_worker(
            self.num_samples, self.spec.world_size * self.slots, self.spec.batch_size
        )

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


def io_policy(cfg: DataConfig) -> IOPolicy:
    """Timeouts, retries and request size for remote shards, from the data config."""
    return IOPolicy(timeout_s=cfg.io_timeout_s, retries=cfg.io_retries, chunk_bytes=cfg.io_chunk_bytes)


def build_train_loader(
    cfg: DataConfig,
    *,
    img_size: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    multilabel: bool = False,
    num_workers: int | None = None,
    pin_memory: bool | None = None,
    device: torch.device | str = "cuda",
    decoder: Decoder | None = None,
) -> TrainLoader:
    """The training loader of one rank from a `DataConfig` (`cfg.train_shards`, mode, augmentation, ...).

    `device` and `decoder` serve `data.decode=gpu` only: where the batches are assembled, and the batched JPEG
    decoder (default nvJPEG on `device`; see `gpu_decode.DeviceBatches`).
    """
    io = io_policy(cfg)
    shards = resolve_shards(cfg.train_shards, cfg.train_split, count=cfg.mode == "epoch")
    on_device = None
    if cfg.decode == "gpu":
        transform = DeferredTrainTransform(img_size, cfg.crop_scale_min, cfg.hflip)
        on_device = DeviceBatches(device, decoder)
    else:
        transform = TrainTransform(
            img_size, cfg.crop_scale_min, cfg.hflip, cfg.randaugment_ops, cfg.randaugment_magnitude
        )
    spec = StreamSpec(
        shards.urls,
        shards.lengths,
        batch_size,
        rank,
        world_size,
        seed,
        transform,
        mode=cfg.mode,
        remainder=cfg.remainder,
        shuffle_buffer=cfg.shuffle_buffer,
        max_bad_shards=cfg.max_bad_shards,
        multilabel=multilabel,
        img_size=img_size,
        io=io,
    )
    workers = cfg.num_workers if num_workers is None else num_workers
    return TrainLoader(shards, spec, workers, pin_memory, on_device=on_device)


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
    spec = StreamSpec(
        shards.urls,
        shards.lengths,
        batch_size,
        rank,
        world_size,
        0,
        EvalTransform(img_size, cfg.eval_crop_pct),
        shuffle_buffer=1,
        max_bad_shards=cfg.max_bad_shards,
        multilabel=multilabel,
        img_size=img_size,
        io=io_policy(cfg),
    )
    workers = cfg.num_workers if num_workers is None else num_workers
    return EvalLoader(shards, spec, workers, pin_memory)
