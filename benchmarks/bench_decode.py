"""Where a training image's CPU time goes in the stream, part by part, and the JPEG decoders side by side.

On one of the loader benchmark's image sets (`bench_loader.write_images`), in-process, one torch thread, CPU time
per image, each figure the best of 3 runs alternating between the sides:

  stream      the whole worker pipeline (`TrainStream`, 0 workers, batch 64): tar read, shuffle, transform, batch;
              and the same with the region decoder switched off (`_full_decode`: every image decoded whole)
  transform   `TrainTransform` (crop 224 + flip) alone, on the same bytes (and with the region decoder off); its
              parts on the same boxes:
    header    `image_size` + the crop/flip draw (`TrainTransform.draw`)
    decode    the region decode of the crop (`decode_crop` at the draft rule's scale), and, beside it, the full
              decode the stream used before (`decode_rgb` at the same scale: torchvision's `decode_jpeg` at full
              size, Pillow's draft mode below)
    resize    the antialiased crop-resize to 224 (`resized_crop`), and the flip
  decoders    the full image with `torchvision.io.decode_jpeg` and with TorchCodec's `decode_jpeg` (the replacement
              torchvision 0.29's deprecation names; skipped where torchcodec is not installed; its pixels compared);
              and the entropy decoding alone (`entropy_all_rows`: the region decode of the image's last row, which
              Huffman-decodes every row and runs the IDCT on one iMCU row)

    python -m benchmarks.bench_decode [--images photo|i21k|large] [--per-class N] [--progressive]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from data_tools import jpeg_region
from data_tools.decode import decode_rgb, decode_stats, image_size, is_jpeg
from data_tools.shard import shard
from pretrain.config import DataConfig
from pretrain.data import TrainTransform, build_train_loader
from pretrain.data.stream import TrainStream
from pretrain.data.transforms import _decode_for_crop, draft_factor, resized_crop

IMG, BATCH = 224, 64


def _per_image_ms(fn: Callable, items: list) -> float:
    start = time.process_time()
    for x in items:
        fn(x)
    return (time.process_time() - start) / len(items) * 1e3


def _stream_ms(shards: Path, n: int) -> float:
    """CPU ms per image of the whole worker pipeline, in-process, over `n` images after the first batch."""
    cfg = DataConfig(train_shards=str(shards), num_workers=0, shuffle_buffer=256)
    loader = build_train_loader(cfg, img_size=IMG, batch_size=BATCH, seed=0, pin_memory=False)
    it = iter(TrainStream(loader.spec, loader.layout, 0, loader.state))  # the worker's parts, forever
    batches = max(1, n // BATCH)
    next(it)
    start = time.process_time()
    for _ in range(batches):
        next(it)
    return (time.process_time() - start) / (batches * BATCH) * 1e3


def _without_region(measure: Callable[[], float]) -> float:
    """`measure()` with the region decoder switched off: every image decoded whole, as before it."""
    library = jpeg_region._library
    jpeg_region._library = lambda: None
    try:
        return measure()
    finally:
        jpeg_region._library = library


def _bottom_row(data: bytes) -> torch.Tensor:
    """The last row of the image at full size: Huffman decoding of every row, the IDCT of one iMCU row."""
    w, h = image_size(data)
    return jpeg_region.decode_region(data, 1, (w, h), (h - 1, 0, 1, w))


def _tv_full(data: bytes) -> torch.Tensor:
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def _sides(datas: list[bytes], shards: Path) -> dict[str, Callable[[], float]]:
    """Each side: a function that measures it once (ms per image)."""
    tf = TrainTransform(IMG, 0.08, True)
    draws = [tf.draw(*image_size(d), random.Random(i)) for i, d in enumerate(datas)]
    jobs = [(d, *image_size(d), box) for d, (box, _) in zip(datas, draws, strict=True)]
    crops = [_decode_for_crop(d, w, h, box, IMG) for d, w, h, box in jobs]
    outs = [resized_crop(img, *box, IMG) for img, box in crops]

    def full_at_draft_scale(job):
        d, _, _, (_, _, ch, cw) = job
        return decode_rgb(d, draft_factor(cw, ch, IMG) if is_jpeg(d) else 1)

    stream = partial(_stream_ms, shards, len(datas))
    transform = partial(_per_image_ms, lambda ix: tf(datas[ix], random.Random(ix)), range(len(datas)))
    sides = {
        "stream": stream,
        "stream_full_decode": partial(_without_region, stream),
        "transform": transform,
        "transform_full_decode": partial(_without_region, transform),
        "header": lambda: _per_image_ms(
            lambda ix: tf.draw(*image_size(datas[ix]), random.Random(ix)), range(len(datas))
        ),
        "decode_region": lambda: _per_image_ms(lambda j: _decode_for_crop(j[0], j[1], j[2], j[3], IMG), jobs),
        "decode_full_before": lambda: _per_image_ms(full_at_draft_scale, jobs),
        "resize": lambda: _per_image_ms(lambda c: resized_crop(c[0], *c[1], IMG), crops),
        "flip": lambda: _per_image_ms(lambda o: o.flip(-1), outs),
        "torchvision_decode_jpeg_full": lambda: _per_image_ms(_tv_full, datas),
        "entropy_all_rows": lambda: _per_image_ms(_bottom_row, datas),
    }
    if importlib.util.find_spec("torchcodec") is not None:
        from torchcodec.decoders import decode_jpeg as tc_decode_jpeg

        sides["torchcodec_decode_jpeg_full"] = lambda: _per_image_ms(tc_decode_jpeg, datas)
    return sides


def measure(photos: Path, shards: Path, repeats: int = 3) -> dict:
    """The per-image breakdown on the JPEGs under `photos` (sharded in `shards`); ms per image, best of `repeats`."""
    torch.set_num_threads(1)
    datas = [p.read_bytes() for p in sorted(photos.rglob("*.jpg"))]
    sides = _sides(datas, shards)
    decode_stats().clear()
    runs: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(repeats):  # alternate, keep each side's best: load from other processes hits all sides
        for k, measure_once in sides.items():
            runs[k].append(measure_once())
    best = {k: round(min(v), 4) for k, v in runs.items()}
    parts = ("header", "decode_region", "resize", "flip")
    out = {"images": len(datas), "ms_per_image": best}
    out["transform_rest_ms"] = round(best["transform"] - sum(best[k] for k in parts), 4)
    out["stream_rest_ms"] = round(best["stream"] - best["transform"], 4)
    out["region_vs_full_before"] = round(best["decode_region"] / best["decode_full_before"], 3)
    bare = best["torchvision_decode_jpeg_full"]
    out["stream_vs_bare_full_decode"] = round(bare / best["stream"], 3)  # as images per CPU-second
    out["stream_full_decode_vs_bare_full_decode"] = round(bare / best["stream_full_decode"], 3)
    if "torchcodec_decode_jpeg_full" not in best:
        out["torchcodec"] = "skipped: pip install torchcodec"
    else:
        from torchcodec.decoders import decode_jpeg as tc_decode_jpeg

        out["torchcodec_same_pixels"] = all(torch.equal(tc_decode_jpeg(d), _tv_full(d)) for d in datas)
    out["decode_outcomes"] = dict(decode_stats())
    out["runs"] = {k: [round(x, 4) for x in v] for k, v in runs.items()}
    return out


def run(images: str = "photo", per_class: int = 100, repeats: int = 3, progressive: bool = False) -> dict:
    """`measure` on `4 * per_class` images of the loader benchmark's set `images` (written and sharded here);
    `progressive`: each re-encoded as a progressive JPEG first (Pillow, quality 90)."""
    from benchmarks.bench_loader import IMAGE_SETS, write_images  # bench_loader imports this module

    tmp = Path(tempfile.mkdtemp(prefix="bench_decode-"))
    try:
        photos = write_images(images, tmp / "photos", classes=4, per_class=per_class)
        for f in sorted(photos.rglob("*.jpg")) if progressive else ():
            with Image.open(f) as im:
                im.load()
            im.save(f, quality=90, progressive=True)
        shard(photos, tmp / "shards", workers=1, samples_per_shard=64, progress=False)
        out = {"image_set": images, "size": IMAGE_SETS[images], "progressive": progressive}
        return {**out, **measure(photos, tmp / "shards", repeats)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", choices=["photo", "i21k", "large"], default="photo")
    p.add_argument("--per-class", type=int, default=100, help="images per class (4 classes)")
    p.add_argument("--progressive", action="store_true", help="re-encode the images as progressive JPEGs")
    args = p.parse_args(argv)
    print(json.dumps(run(args.images, args.per_class, progressive=args.progressive), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
