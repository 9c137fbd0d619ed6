"""Input-stream throughput: this stream against torchvision `ImageFolder` + `DataLoader`, and against decode-only.

All three read the same realistic JPEGs (`--images photo`: ImageNet-sized 500x375 crops of scikit-learn's sample
photos, written by `data_tools.digits.write_photos`; `i21k`: about 500x400; `large`: 1600x1200; sharded with the
original bytes kept), measured two ways: with ONE loader worker
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

Peers, same run (`benchmarks/peers.py`): this stream, decode-only and what users would otherwise write
(webdataset's own pipeline, with PIL and with a decode_jpeg handler; MosaicML Streaming; litdata), all with the same
transform, ONE worker, batch 64, in images per CPU-second of the process and its worker; best of 3 alternating.

Per image, same run (`benchmarks/bench_decode.py`): where a training image's CPU time goes in the stream (header,
region decode, crop-resize, flip, the rest), the region decode against the full decode it replaces, the stream
in-process with and without the region decoder, and TorchCodec's decode_jpeg against torchvision's.

Remote shards, same run: the stream over loopback HTTP (a Range-capable server on 127.0.0.1) against the same shards
from local disk (images/s per worker), and a resume at 90 % of an epoch over HTTP (digits shards, 0 workers, buffer
256): bytes served and seconds until the first batch, refilling the saved shuffle buffer by random access against
re-reading the epoch up to the checkpoint (what a replaying resume reads: the resume before O(buffer) resume).

    python -m benchmarks.bench_loader [--full] [--images photo|i21k|large]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg

from benchmarks import bench_decode, peers
from benchmarks.peers import alternating, forever, images_per_second, loader_rate
from data_tools.digits import write_digits, write_photos
from data_tools.shard import shard
from pretrain.config import DataConfig
from pretrain.data import TrainLoader, build_train_loader
from pretrain.data.stream import TrainStream
from tests.helpers.servers import ShardServer

IMG, BATCH = 224, 32
# --images, the input of the whole benchmark: ImageNet-sized photos (the figures so far), ImageNet-21k-sized
# originals, and large originals (>= 1500 px), all cut from scikit-learn's sample photos (`write_images`).
IMAGE_SETS = {"photo": (500, 375), "i21k": (500, 400), "large": (1600, 1200)}


def _timed(batches, n_batches: int, workers: int) -> float:
    """Images/s over `n_batches` batches after the first one: wall clock with a worker process, else CPU time."""
    return images_per_second(batches, n_batches, time.perf_counter if workers else time.process_time)


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
    return _timed(forever(dl), n_batches, workers)


def _our_loader(shards: Path | str, workers: int, batch_size: int = BATCH) -> TrainLoader:
    """This stream's training loader over `shards`: the one place the benchmark builds it."""
    cfg = DataConfig(train_shards=str(shards), num_workers=workers, shuffle_buffer=256)
    return build_train_loader(cfg, img_size=IMG, batch_size=batch_size, seed=0, pin_memory=False)


def _ours(shards: Path | str, n_batches: int, workers: int) -> tuple[float, float]:
    loader = _our_loader(shards, workers)
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


def _decode_only_loader(folder: Path, workers: int, batch_size: int = BATCH) -> DataLoader:
    return DataLoader(
        _DecodeOnly(folder),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        drop_last=True,
        collate_fn=_stack,
    )


def _decode_only(folder: Path, n_batches: int, workers: int) -> float:
    return _timed(forever(_decode_only_loader(folder, workers)), n_batches, workers)


def write_images(kind: str, out: Path, classes: int, per_class: int) -> Path:
    """The image set `kind` (`IMAGE_SETS`) as `out/class_<k>/<i>.jpg`, cut from scikit-learn's sample photos.

    Deterministic. `large`: each image a 2x2 mosaic of 800x600 photo crops (each upscaled 1.4-2.8x; one crop
    upscaled 2.8-5.6x to the whole size is smoother than a photo: 0.12 B/pixel against 0.17 for the mosaic and
    0.23 for the photo set, and cheaper to decode), re-encoded at quality 75-95, a random half turned to portrait.
    """
    if kind != "large":
        return write_photos(out, classes=classes, per_class=per_class, size=IMAGE_SETS[kind])
    (w, h), rng = IMAGE_SETS[kind], np.random.default_rng(0)
    tiles = out.with_name(out.name + "-tiles")
    write_photos(tiles, classes=classes, per_class=4 * per_class, size=(w // 2, h // 2))
    for k in range(classes):
        names = sorted((tiles / f"class_{k}").glob("*.jpg"))
        (out / f"class_{k}").mkdir(parents=True)
        for i in range(per_class):
            canvas = Image.new("RGB", (w, h))
            for j, name in enumerate(names[4 * i : 4 * i + 4]):
                with Image.open(name) as tile:
                    tile = tile if tile.width >= tile.height else tile.transpose(Image.Transpose.ROTATE_90)
                    canvas.paste(tile, (j % 2 * w // 2, j // 2 * h // 2))
            if rng.random() < 0.5:
                canvas = canvas.transpose(Image.Transpose.ROTATE_90)
            canvas.save(out / f"class_{k}" / f"{i:05d}.jpg", quality=int(rng.integers(75, 96)))
    shutil.rmtree(tiles)
    return out


def _peers(photos: Path, shards: Path, tmp: Path, n_batches: int, repeats: int) -> dict:
    """This stream, decode-only and the peers (`benchmarks/peers.py`): 1 worker, batch 64, images per CPU-second."""
    samples = [(p, int(p.parent.name.removeprefix("class_"))) for p in sorted(photos.rglob("*.jpg"))]
    loaders, skipped = peers.prepare(samples, [str(p) for p in sorted(shards.rglob("*.tar"))], tmp)
    makers = {
        "stream": lambda: _our_loader(shards, workers=1, batch_size=peers.BATCH),
        "decode_only": lambda: _decode_only_loader(photos, workers=1, batch_size=peers.BATCH),
        **loaders,
    }
    runs = alternating({side: partial(loader_rate, make, n_batches) for side, make in makers.items()}, repeats)
    best = {side: max(rates) for side, rates in runs.items()}
    return {
        "batch_size": peers.BATCH,
        "workers": 1,
        "batches_timed": n_batches,
        "img_per_cpu_s": {k: round(v, 1) for k, v in best.items()},
        "runs": {k: [round(v, 1) for v in rates] for k, rates in runs.items()},
        "ratio_stream_vs": {k: round(best["stream"] / v, 2) for k, v in best.items() if k != "stream"},
        "skipped": skipped,
    }


def run_peers(
    images: str = "photo", classes: int = 2, per_class: int = 64, n_batches: int = 3, repeats: int = 1
) -> dict:
    """Only the peer comparison, on its own images (a smoke run: `tests/test_benchmarks.py`)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_peers-"))
    try:
        photos = write_images(images, tmp / "photos", classes, per_class)
        shard(photos, tmp / "shards", workers=1, samples_per_shard=64, progress=False)
        return {"image_set": images, **_peers(photos, tmp / "shards", tmp, n_batches, repeats)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(quick: bool = True, images: str = "photo") -> dict:
    """Measure the pipelines on the image set `images`, per worker (wall clock) and per core (CPU time), and the
    peers per CPU-second; returns the figures and ratios."""
    per_class, n_batches, n_peer_batches, repeats = (120, 12, 4, 3) if quick else (500, 40, 20, 3)
    torch.set_num_threads(1)  # per-core figures: no intra-op threads in the in-process runs
    tmp = Path(tempfile.mkdtemp(prefix="bench_loader-"))
    out: dict = {"image_set": images, "images": 4 * per_class, "img_size": IMG, "batch_size": BATCH}
    try:
        photos = write_images(images, tmp / "photos", classes=4, per_class=per_class)
        shard(photos, tmp / "shards", workers=2, samples_per_shard=64, progress=False)
        out["peers"] = _peers(photos, tmp / "shards", tmp, n_peer_batches, repeats)
        out["per_image"] = bench_decode.measure(photos, tmp / "shards", repeats)
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
    p.add_argument("--images", choices=list(IMAGE_SETS), default="photo", help="the image set (default photo)")
    args = p.parse_args(argv)
    r = run(quick=not args.full, images=args.images)
    print(json.dumps(r, indent=2))
    pr = r["peers"]
    for side, rate in pr["img_per_cpu_s"].items():
        vs = "" if side == "stream" else f"  stream / {side}: {pr['ratio_stream_vs'][side]:.2f}x"
        print(f"{side}: {rate:,.0f} images per CPU-second (1 worker, batch {pr['batch_size']}){vs}")
    for side, reason in pr["skipped"].items():
        print(f"{side}: {reason}")
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
