"""Input-stream throughput: this stream against torchvision `ImageFolder` + `DataLoader`, and against decode-only.

All three read the same realistic JPEGs (ImageNet-sized 500x375 crops of scikit-learn's sample photos, written by
`data_tools.digits.write_photos`, sharded with the original bytes kept), measured two ways: with ONE loader worker
each (images/s per worker, wall clock), and in-process with one torch thread (images per CPU-second of the process,
i.e. per core; robust when other jobs share the machine). Training transform on both sides: Inception
RandomResizedCrop to 224 + horizontal flip.
  baseline: ImageFolder (PIL decode) -> RandomResizedCrop -> RandomHorizontalFlip -> ToTensor -> Normalize
  ours:     shards -> shuffle buffer -> decode_jpeg (libjpeg-turbo) -> resized_crop on uint8 -> flip -> uint8 batch
  ceiling:  read the same files and decode them with torchvision.io.decode_jpeg, nothing else
Each side runs 3 times, alternating, and keeps its best figure; the first batch (worker start-up) is not timed.

Worker side of `data.decode=gpu`, same run: a worker's whole pipeline (tar read, shuffle, transform, batch) run
in-process, images per CPU-second, with `data.decode=gpu` (JPEG header + crop/flip draw, bytes packed; the decode
happens later on the GPU and is not in this figure) against `data.decode=cpu` (decode + crop-resize + flip): how
many fewer CPU cores per GPU the workers need.

Remote shards, same run: the stream over loopback HTTP (a Range-capable server on 127.0.0.1) against the same shards
from local disk (images/s per worker), and a resume at 90 % of an epoch over HTTP (digits shards, 0 workers, buffer
256): bytes served and seconds until the first batch, refilling the saved shuffle buffer by random access against
re-reading the epoch up to the checkpoint (what a replaying resume reads: the resume before O(buffer) resume).

    python -m benchmarks.bench_loader [--full]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg

from data_tools.digits import write_digits, write_photos
from data_tools.shard import shard
from pretrain.config import DataConfig
from pretrain.data import build_train_loader
from pretrain.data.stream import TrainStream
from tests.helpers.servers import ShardServer

IMG, BATCH = 224, 32


def _timed(batches, n_batches: int, workers: int) -> float:
    """Images/s over `n_batches` batches after the first one: wall clock with a worker process, else CPU time."""
    clock = time.perf_counter if workers else time.process_time
    it = iter(batches)
    next(it)
    start, images = clock(), 0
    for _ in range(n_batches):
        b = next(it)
        images += (b["image"] if isinstance(b, dict) else b[0]).shape[0]
    return images / (clock() - start)


def _baseline(folder: Path, n_batches: int, workers: int) -> float:
    tf = T.Compose(
        [
            T.RandomResizedCrop(IMG, antialias=True),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ]
    )
    dl = DataLoader(
        datasets.ImageFolder(str(folder), transform=tf),
        batch_size=BATCH,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        drop_last=True,
    )
    return _timed(_forever(dl), n_batches, workers)


def _ours(shards: Path | str, n_batches: int, workers: int) -> tuple[float, float]:
    cfg = DataConfig(train_shards=str(shards), num_workers=workers, shuffle_buffer=256)
    loader = build_train_loader(cfg, img_size=IMG, batch_size=BATCH, seed=0, pin_memory=False)
    rate = _timed(loader, n_batches, workers)
    return rate, loader.stats()["data_wait_fraction"]


def _worker_side(shards: Path, n_batches: int, decode: str) -> float:
    """Images per CPU-second of one worker's pipeline, in-process (no main-process decode of `data.decode=gpu`)."""
    cfg = DataConfig(train_shards=str(shards), num_workers=0, shuffle_buffer=256, decode=decode)
    loader = build_train_loader(cfg, img_size=IMG, batch_size=BATCH, seed=0, pin_memory=False, device="cpu")
    # the worker's parts (one worker: whole micro-batches), before the main process's decode of data.decode=gpu
    return _timed(TrainStream(loader.spec, loader.layout, 0, loader.state), n_batches, 0)


class _DecodeOnly(Dataset):
    def __init__(self, folder: Path):
        self.files = sorted(folder.rglob("*.jpg"))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        data = torch.frombuffer(bytearray(self.files[i].read_bytes()), dtype=torch.uint8)
        return torch.tensor(decode_jpeg(data, mode=ImageReadMode.RGB).shape)  # decoded, then only the shape travels


def _stack(xs: list[torch.Tensor]) -> tuple[torch.Tensor]:
    return (torch.stack(xs),)


def _decode_only(folder: Path, n_batches: int, workers: int) -> float:
    dl = DataLoader(
        _DecodeOnly(folder),
        batch_size=BATCH,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        drop_last=True,
        collate_fn=_stack,
    )
    return _timed(_forever(dl), n_batches, workers)


def _forever(dl):
    while True:
        yield from dl


def run(quick: bool = True) -> dict:
    """Measure the three pipelines, per worker (wall clock) and per core (CPU time); returns the figures and ratios."""
    per_class, n_batches, repeats = (40, 12, 3) if quick else (125, 40, 3)
    torch.set_num_threads(1)  # per-core figures: no intra-op threads in the in-process runs
    tmp = Path(tempfile.mkdtemp(prefix="bench_loader-"))
    out: dict = {"images": 4 * per_class, "img_size": IMG, "batch_size": BATCH}
    try:
        photos = write_photos(tmp / "photos", classes=4, per_class=per_class, size=(500, 375))
        shard(photos, tmp / "shards", workers=2, samples_per_shard=64, progress=False)
        for label, workers in (("per_worker", 1), ("per_cpu_s", 0)):
            best = {"imagefolder": 0.0, "stream": 0.0, "decode_only": 0.0}
            for _ in range(repeats):  # alternate, keep each side's best: load from other processes hits all sides
                best["imagefolder"] = max(best["imagefolder"], _baseline(photos, n_batches, workers))
                rate, wait = _ours(tmp / "shards", n_batches, workers)
                if workers and rate > best["stream"]:  # the consumer does nothing: the wait is all data time
                    out["stream_data_wait_fraction"] = round(wait, 3)
                best["stream"] = max(best["stream"], rate)
                best["decode_only"] = max(best["decode_only"], _decode_only(photos, n_batches, workers))
            out.update({f"{k}_img_{label}": round(v, 1) for k, v in best.items()})
            out[f"ratio_vs_imagefolder_{label}"] = round(best["stream"] / best["imagefolder"], 2)
            out[f"ratio_vs_decode_only_{label}"] = round(best["stream"] / best["decode_only"], 2)
        best = {"cpu": 0.0, "gpu": 0.0}
        for _ in range(repeats):
            for decode in best:
                best[decode] = max(best[decode], _worker_side(tmp / "shards", n_batches, decode))
        out.update({f"worker_decode_{k}_img_per_cpu_s": round(v, 1) for k, v in best.items()})
        out["ratio_worker_decode_gpu_vs_cpu"] = round(best["gpu"] / best["cpu"], 2)
        with ShardServer(tmp / "shards") as srv:
            best = {"local": 0.0, "http": 0.0}
            for _ in range(repeats):
                best["local"] = max(best["local"], _ours(tmp / "shards", n_batches, 1)[0])
                best["http"] = max(best["http"], _ours(srv.url + "/", n_batches, 1)[0])
        out.update({f"{k}_img_per_worker": round(v, 1) for k, v in best.items()})
        out["ratio_http_vs_local"] = round(best["http"] / best["local"], 2)
        out["resume_90"] = _resume(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _resume(tmp: Path) -> dict:
    """Bytes and seconds until the first batch of a resume at 90 % of an epoch over HTTP: buffer refill vs reading
    the epoch up to the checkpoint (what a replay reads)."""
    shard(write_digits(tmp / "digits"), tmp / "digits-shards", workers=2, samples_per_shard=200, progress=False)
    cfg = DataConfig(train_shards=str(tmp / "digits-shards"), num_workers=0, shuffle_buffer=256)
    loader = build_train_loader(cfg, img_size=32, batch_size=BATCH)
    k = int(loader.batches_per_epoch * 0.9)
    it = iter(loader)
    for _ in range(k):
        next(it)
    state = loader.state_dict()
    it.close()
    out = {"position_batches": k, "epoch_batches": loader.batches_per_epoch, "shuffle_buffer": 256}
    with ShardServer(tmp / "digits-shards") as srv:
        remote = DataConfig(train_shards=srv.url + "/", num_workers=0, shuffle_buffer=256, io_chunk_bytes=1 << 16)
        for name, st, n in (("buffer", state, 1), ("replay", None, k + 1)):
            srv.reset_counts()
            t0 = time.perf_counter()
            resumed = build_train_loader(remote, img_size=32, batch_size=BATCH)
            if st is not None:
                resumed.load_state_dict(st)
            it = iter(resumed)
            for _ in range(n):
                next(it)
            out[f"{name}_s"] = round(time.perf_counter() - t0, 3)
            out[f"{name}_mb"] = round(srv.served / 1e6, 3)
            it.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="more images and batches (slower, steadier)")
    args = p.parse_args(argv)
    r = run(quick=not args.full)
    print(json.dumps(r, indent=2))
    for label, what in (("per_worker", "images/s per worker (wall clock)"), ("per_cpu_s", "images per CPU-second")):
        print(f"stream / ImageFolder, {what}: {r[f'ratio_vs_imagefolder_{label}']:.2f}x (target >= 1.8x)")
        print(f"stream / decode-only, {what}: {r[f'ratio_vs_decode_only_{label}']:.2f}x (target >= 0.6x)")
    print(
        f"worker pipeline, data.decode=gpu / cpu, images per CPU-second: {r['ratio_worker_decode_gpu_vs_cpu']:.2f}x "
        "(GPU decode not included)"
    )
    print(f"loopback HTTP / local disk, images/s per worker: {r['ratio_http_vs_local']:.2f}x (target >= 0.9x)")
    res = r["resume_90"]
    for what, unit in (("mb", "MB served"), ("s", "s")):
        print(
            f"resume at 90%, {unit} until the first batch: buffer {res[f'buffer_{what}']} vs replay "
            f"{res[f'replay_{what}']} ({res[f'buffer_{what}'] / res[f'replay_{what}']:.3f}x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
