"""What users would otherwise write to feed a ViT: the peer input pipelines of the loader benchmark.

Every side reads the same JPEGs with the same training transform (RandomResizedCrop 224 + horizontal flip, uint8
CHW out; torchvision v2), in batches of 64 from ONE DataLoader worker, and is measured in images per CPU-second of
the process and all its workers (`cpu_seconds`) over `n` batches after the first (worker start-up not timed):
  webdataset        wds.WebDataset(tars).shuffle(256).decode("pil") -> to_tuple("jpg", "cls") -> transform
  webdataset+dj     the same with a torchvision.io.decode_jpeg handler (a uint8 tensor, no PIL): the fastest
                    decoder a webdataset user would reasonably write
  mds               MosaicML Streaming: the JPEG bytes written once with MDSWriter (columns x: jpeg, y: int, as its
                    ImageNet converter), read with StreamingVisionDataset(local=...) (a StreamingDataset; PIL decode)
  litdata           litdata.optimize of {"image": the opened JPEG (its bytes kept), "label"}, read with its
                    StreamingDataset (its JPEG serializer decodes with torchvision's decode_jpeg)
The peer packages come from the benchmark extra (`pip install '.[bench]'`); a side whose package is missing is
skipped with the reason (`missing`). MosaicML Streaming is installed without its declared dependencies
(`MDS_INSTALL`): its metadata caps numpy < 2.2 and transformers < 5, below this project's pins, although it imports
and runs with them; `.[bench]` carries the packages it imports.
"""

from __future__ import annotations

import gc
import importlib.util
import multiprocessing
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

IMG, BATCH, SHUFFLE = 224, 64, 256
BENCH_INSTALL = "pip install '.[bench]'"
MDS_INSTALL = f"{BENCH_INSTALL} && pip install --no-deps -c constraints.txt mosaicml-streaming"
# side -> (module it needs, how to install it)
PACKAGES = {
    "webdataset": ("webdataset", BENCH_INSTALL),
    "webdataset_decode_jpeg": ("webdataset", BENCH_INSTALL),
    "mds": ("streaming", MDS_INSTALL),
    "litdata": ("litdata", BENCH_INSTALL),
}


def missing(side: str) -> str | None:
    """Why a peer side cannot run here ("skipped: <install command>"), or None when it can."""
    module, install = PACKAGES[side]
    if importlib.util.find_spec(module) is None or (module == "streaming" and _mds_broken()):
        return f"skipped: {install}"
    return None


def _mds_broken() -> bool:
    """MosaicML Streaming installed without `.[bench]`: one of the packages it imports is absent (see MDS_INSTALL)."""
    return any(importlib.util.find_spec(m) is None for m in ("brotli", "snappy", "zstd", "catalogue", "xxhash"))


def cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and its descendants, live or reaped."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()  # children_*: the reaped children of p; live ones are in the list themselves
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def images_per_second(batches: Iterable, n_batches: int, clock: Callable[[], float] = cpu_seconds) -> float:
    """Images per second of `clock` over `n_batches` batches after the first (start-up and first batch excluded)."""
    it = iter(batches)
    next(it)
    start, images = clock(), 0
    for _ in range(n_batches):
        b = next(it)
        images += (b["image"] if isinstance(b, dict) else b[0]).shape[0]
    if (spent := clock() - start) <= 0:  # e.g. fewer batches than a worker prefetches: all made before the start
        raise ValueError(f"no time measured over {n_batches} batches: time more batches")
    return images / spent


def forever(loader: Iterable) -> Iterable:
    """A loader's batches, epoch after epoch."""
    while True:
        yield from loader


def loader_rate(make: Callable[[], Iterable], n_batches: int) -> float:
    """Images per CPU-second of a new loader from `make()`, which is then closed and its worker stopped."""
    loader = make()
    try:
        return images_per_second(forever(loader), n_batches)
    finally:
        if hasattr(loader, "close"):  # this project's TrainLoader
            loader.close()
        del loader
        gc.collect()  # litdata's loader and its iterator refer to each other: stop its worker now, not in a fork


def alternating(sides: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each side's rates over `repeats` rounds, the sides alternating (A B C A B C ...) so load hits all alike."""
    runs: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, measure in sides.items():
            runs[name].append(measure())
    return runs


def train_transform() -> v2.Compose:
    """RandomResizedCrop 224 + flip on a PIL image or a uint8 tensor; a uint8 (3, 224, 224) image out."""
    return v2.Compose([v2.RandomResizedCrop(IMG, antialias=True), v2.RandomHorizontalFlip(), v2.ToImage()])


def _decode_jpeg(data: bytes) -> torch.Tensor:
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def _loader(dataset, **kw) -> DataLoader:
    return DataLoader(dataset, batch_size=BATCH, num_workers=1, persistent_workers=True, **kw)


def webdataset_loader(tars: list[str], decoder: str) -> DataLoader:
    """webdataset's own pipeline; `decoder` "pil" (its documented default) or "decode_jpeg" (a tensor handler)."""
    import webdataset as wds

    ds = wds.WebDataset(tars, shardshuffle=len(tars), seed=0, empty_check=False).shuffle(SHUFFLE)
    ds = ds.decode("pil") if decoder == "pil" else ds.decode(wds.handle_extension("jpg jpeg", _decode_jpeg))
    return _loader(ds.to_tuple("jpg", "cls").map_tuple(train_transform(), int))


def write_mds(samples: list[tuple[Path, int]], out: Path) -> Path:
    """The JPEG files as MosaicML Streaming MDS shards (`x`: the file's bytes, `y`: the label), once."""
    from PIL import Image
    from streaming import MDSWriter

    with MDSWriter(out=str(out), columns={"x": "jpeg", "y": "int"}, size_limit=1 << 26, progress_bar=False) as w:
        for path, label in samples:
            with Image.open(path) as im:  # the "jpeg" column keeps an opened file's bytes as they are
                w.write({"x": im, "y": label})
    return out


def mds_loader(local: Path) -> DataLoader:
    """MosaicML Streaming's reader over the local MDS shards, the transform applied to each PIL image."""
    from streaming.vision.base import StreamingVisionDataset

    ds = StreamingVisionDataset(local=str(local), batch_size=BATCH, shuffle=True, transform=train_transform())
    return _loader(ds)


def _lit_sample(item: tuple[str, int]) -> dict:
    from PIL import Image

    path, label = item
    return {"image": Image.open(path), "label": label}


def write_litdata(samples: list[tuple[Path, int]], out: Path) -> Path:
    """The JPEG files in litdata's chunk format with `litdata.optimize` (its JPEG serializer keeps the bytes)."""
    import litdata

    inputs = [(str(p), label) for p, label in samples]
    method = multiprocessing.get_start_method(allow_none=True)
    try:  # optimize sets the process-wide start method (to spawn by default): every later DataLoader would spawn
        litdata.optimize(
            fn=_lit_sample,
            inputs=inputs,
            output_dir=str(out),
            chunk_bytes="64MB",
            num_workers=1,
            start_method="fork",
            verbose=False,
        )
    finally:
        multiprocessing.set_start_method(method, force=True)
    return out


class _ImageTransform:
    """litdata's `transform` gets the whole sample; this applies the training transform to its image."""

    def __init__(self):
        self.tf = train_transform()

    def __call__(self, item: dict) -> tuple[torch.Tensor, int]:
        return self.tf(item["image"]), item["label"]


def litdata_loader(data: Path, cache: Path) -> DataLoader:
    """litdata's StreamingDataset + StreamingDataLoader over the optimized chunks."""
    import litdata

    ds = litdata.StreamingDataset(str(data), cache_dir=str(cache), shuffle=True, transform=_ImageTransform())
    return litdata.StreamingDataLoader(ds, batch_size=BATCH, num_workers=1, persistent_workers=True)


def prepare(samples: list[tuple[Path, int]], tars: list[str], tmp: Path) -> tuple[dict, dict]:
    """Write the peers' formats once; returns ({side: () -> DataLoader}, {side: skip reason}) for the peer sides."""
    loaders, skipped = {}, {}
    for side in PACKAGES:
        if reason := missing(side):
            skipped[side] = reason
        elif side == "webdataset":
            loaders[side] = partial(webdataset_loader, tars, "pil")
        elif side == "webdataset_decode_jpeg":
            loaders[side] = partial(webdataset_loader, tars, "decode_jpeg")
        elif side == "mds":
            loaders[side] = partial(mds_loader, write_mds(samples, tmp / "mds"))
        else:
            loaders[side] = partial(litdata_loader, write_litdata(samples, tmp / "litdata"), tmp / "litdata-cache")
    return loaders, skipped
