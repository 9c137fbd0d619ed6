"""Region decode (data_tools/jpeg_region.py + jpeg_region.c): the crop's pixels equal the full decode's, bit for bit.

Bound: 0. Every box below, at every scale the draft rule uses, is compared with `torchvision.io.decode_jpeg` (scale
1, the stream's full decoder) or Pillow's draft mode (1/2, 1/4, 1/8, `decode_rgb(data, reduce)`), cropped. Every
fallback of `decode_crop` is named, counted and gives the full decoder's result.
"""

from __future__ import annotations

import io
import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torchvision.io import ImageReadMode, decode_jpeg

from data_tools import jpeg_region
from data_tools.decode import FALLBACKS, BadImage, decode_crop, decode_rgb, decode_stats, scaled_size
from pretrain.data.transforms import EvalTransform, TrainTransform

# The region path needs a C compiler and libjpeg's headers (Debian: libjpeg62-turbo-dev; here and in CI's image).
# The test of the build failing runs everywhere.
needs_region = pytest.mark.skipif(not jpeg_region.available(), reason="no C compiler or libjpeg headers here")


def _photo(w: int, h: int, gray: bool = False) -> np.ndarray:
    """A w x h cut of scikit-learn's sample photo (resized for sizes beyond it)."""
    im = Image.fromarray(load_sample_images().images[0])
    if w > im.width or h > im.height:
        im = im.resize((max(w, im.width), max(h, im.height)), Image.Resampling.BICUBIC)
    a = np.asarray(im)[:h, :w]
    return a.mean(-1).astype(np.uint8) if gray else a


def _jpeg(a: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _sampling(data: bytes, hv: int) -> bytes:
    """`data` with the luma's sampling byte (H << 4 | V) of its frame header replaced: a valid JPEG of another
    layout where the MCU holds the same blocks (4:2:2 -> 4:4:0: 0x12; 4:2:0 -> 4:1:1: 0x41, sizes a multiple of 32)."""
    d = bytearray(data)
    sof = max(d.find(b"\xff\xc0"), d.find(b"\xff\xc2"))
    d[sof + 11] = hv
    return bytes(d)


# Odd sizes put partial MCUs at the right and bottom edges; 1203 x 1601 takes every draft scale.
SMALL, LARGE = (203, 157), (1601, 1203)
KINDS = {
    "4:2:0": dict(subsampling=2),
    "4:4:4": dict(subsampling=0),
    "4:2:2": dict(subsampling=1),
    "grey": dict(gray=True),
    "restart markers": dict(restart_marker_blocks=3),
    "progressive": dict(progressive=True),
}


def _kind(name: str, size: tuple[int, int]) -> bytes:
    kw = dict(KINDS[name])
    return _jpeg(_photo(*size, gray=kw.pop("gray", False)), **kw)


def _full(data: bytes, scale: int) -> torch.Tensor:
    """Today's decode: torchvision's libjpeg-turbo at full size, Pillow's draft mode below it."""
    if scale == 1:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return decode_rgb(data, scale)


def _boxes(w: int, h: int, rng: random.Random, n: int):
    """Random boxes, a third of them touching each edge (top/left 0, bottom/right at the image's end)."""
    for _ in range(n):
        bh, bw = rng.randint(1, h), rng.randint(1, w)
        top = rng.choice([0, h - bh, rng.randint(0, h - bh)])
        left = rng.choice([0, w - bw, rng.randint(0, w - bw)])
        yield top, left, bh, bw


def _assert_region_equals_full(data: bytes, scales, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    for scale in scales:
        full = _full(data, scale)
        h, w = full.shape[1:]
        assert (w, h) == scaled_size(*_full(data, 1).shape[:0:-1], scale)
        for top, left, bh, bw in _boxes(w, h, rng, n):
            got = jpeg_region.decode_region(data, scale, (w, h), (top, left, bh, bw))
            assert got[None].is_contiguous(memory_format=torch.channels_last)
            want = full[:, top : top + bh, left : left + bw]
            assert torch.equal(got, want), (scale, (top, left, bh, bw), (got.int() - want.int()).abs().max())


@needs_region
@pytest.mark.parametrize("kind", KINDS)
def test_region_pixels_equal_the_full_decode_at_every_scale(kind):
    data = _kind(kind, SMALL)
    if kind == "restart markers":
        assert any(bytes([0xFF, 0xD0 + k]) in data for k in range(8))
    if kind == "progressive":
        assert b"\xff\xc2" in data
    _assert_region_equals_full(data, (1, 2, 4, 8), 40)
    _assert_region_equals_full(_kind(kind, LARGE), (1, 8) if kind != "4:2:0" else (1, 2, 4, 8), 12, seed=1)


@needs_region
def test_region_pixels_of_a_4_4_0_jpeg_equal_the_full_decode():
    data = _sampling(_jpeg(_photo(320, 224), subsampling=1), 0x12)
    _assert_region_equals_full(data, (1, 2, 4, 8), 30)


@needs_region
def test_transforms_give_todays_images_with_and_without_the_region_decoder(monkeypatch):
    """TrainTransform / EvalTransform: the same uint8 images from the region path and from the full decode."""
    images = [_kind(k, SMALL) for k in KINDS] + [_kind("4:2:0", LARGE), _kind("4:2:2", (900, 1500))]
    train, evaluate = TrainTransform(64, 0.08, True), EvalTransform(64, 0.875)

    def run():
        out = [train(d, random.Random(i * 7 + j)) for i, d in enumerate(images) for j in range(6)]
        return out + [evaluate(d) for d in images]

    decode_stats().clear()
    region = run()
    assert decode_stats()["region"] == len(region) and sum(decode_stats().values()) == len(region)
    monkeypatch.setattr(jpeg_region, "_library", lambda: None)
    whole = run()
    assert decode_stats()["unavailable"] == len(whole)
    for a, b in zip(region, whole, strict=True):
        assert torch.equal(a, b)
        assert a.stride() == b.stride() == (1, 3 * 64, 3)  # channels-last, as the batch is: a plain copy into it


def _fallback(data: bytes, reason: str, box=(1, 2, 5, 7), reduce: int = 1):
    """decode_crop's result when it falls back for `reason`: counted once, and the full decoder's pixels."""
    decode_stats().clear()
    img, (top, left, h, w) = decode_crop(data, box, reduce)
    assert dict(decode_stats()) == {reason: 1}
    assert torch.equal(img, decode_rgb(data, reduce)) and (top, left, h, w) == box
    return img


@needs_region
def test_every_fallback_is_named_counted_and_gives_the_full_decoders_pixels():
    a = _photo(96, 64)
    png = io.BytesIO()
    Image.fromarray(a).save(png, "PNG")
    _fallback(png.getvalue(), "not_jpeg")
    cmyk = io.BytesIO()
    Image.fromarray(a).convert("CMYK").save(cmyk, "JPEG")
    _fallback(cmyk.getvalue(), "colorspace")
    _fallback(_sampling(_jpeg(_photo(96, 64), subsampling=2), 0x41), "sampling")  # 4:1:1
    _fallback(_jpeg(a) + b"\1\2", "no_eoi")  # bytes after the end marker: the full decoder takes it
    padded = _jpeg(a) + bytes(64)  # zero padding after the marker: the region path
    decode_stats().clear()
    assert torch.equal(decode_crop(padded, (1, 2, 5, 7))[0], decode_rgb(padded)[:, 1:6, 2:9])
    assert dict(decode_stats()) == {"region": 1}
    assert set(FALLBACKS) >= {"not_jpeg", "no_eoi", "colorspace", "sampling", "refused", "size", "region"}


@needs_region
def test_a_truncated_or_corrupt_jpeg_is_a_bad_image_as_before():
    data = _jpeg(_photo(96, 64))
    decode_stats().clear()
    for cut in (data[: len(data) // 2], data[: len(data) // 2] + bytes(100)):  # zero-filled as a partial download
        with pytest.raises(BadImage, match="truncated or corrupt"):
            decode_crop(cut, (0, 0, 4, 4))  # the region path would stop before the cut
    assert dict(decode_stats()) == {"no_eoi": 2}
    bad_table = bytearray(data)
    dht = bad_table.find(b"\xff\xc4")
    bad_table[dht + 5 : dht + 21] = b"\xff" * 16  # Huffman code counts that overflow: libjpeg's error
    decode_stats().clear()
    with pytest.raises(BadImage):
        decode_crop(bytes(bad_table), (0, 0, 4, 4))
    assert dict(decode_stats()) == {"refused": 1}


@needs_region
def test_the_region_decoder_refuses_a_wrong_size_or_a_box_outside():
    data = _jpeg(_photo(96, 64))
    with pytest.raises(jpeg_region.Refused) as e:
        jpeg_region.decode_region(data, 1, (95, 64), (0, 0, 8, 8))
    assert e.value.reason == "size"
    with pytest.raises(jpeg_region.Refused) as e:
        jpeg_region.decode_region(data, 2, (48, 32), (30, 0, 8, 8))
    assert e.value.reason == "region"
    decode_stats().clear()
    _fallback(data, "region", box=(60, 90, 8, 8))  # out of the image: the full image comes back, as before


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """The region decoder built anew in tmp_path (the cached library of this process forgotten before and after)."""
    monkeypatch.setattr(jpeg_region, "build_dir", lambda: tmp_path)
    jpeg_region._library.cache_clear()
    yield tmp_path
    jpeg_region._library.cache_clear()


@pytest.mark.parametrize("cc", ["/nonexistent/cc", "false"])
def test_without_a_compiler_every_image_is_decoded_whole_with_one_warning(fresh_build, monkeypatch, caplog, cc):
    monkeypatch.setenv("CC", cc)
    data = _jpeg(_photo(96, 64))
    with caplog.at_level(logging.WARNING, logger="pretrain.data"):
        assert not jpeg_region.available()
        decode_stats().clear()
        out = [TrainTransform(32, 0.08, True)(data, random.Random(i)) for i in range(3)]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "JPEG region decode unavailable" in warnings[0]
    assert dict(decode_stats()) == {"unavailable": 3} and list(fresh_build.iterdir()) == []
    jpeg_region._library.cache_clear()
    monkeypatch.delenv("CC")
    # with the compiler back (where there is one): the region path, the same images
    assert all(torch.equal(TrainTransform(32, 0.08, True)(data, random.Random(i)), x) for i, x in enumerate(out))


@needs_region
def test_the_build_is_kept_and_reused(fresh_build):
    assert jpeg_region.available()
    (lib,) = fresh_build.iterdir()  # one library, no temporary file left
    assert lib.name.startswith("jpeg_region-") and lib.suffix == ".so"
    mtime = lib.stat().st_mtime_ns
    jpeg_region._library.cache_clear()
    assert jpeg_region.available() and lib.stat().st_mtime_ns == mtime  # loaded again, not rebuilt


@needs_region
def test_the_loader_reports_region_decodes_and_named_fallbacks(tmp_path):
    """Counted in the workers, summed by the loader's stats() (the training metrics line and records read them)."""
    import json

    import webdataset as wds

    from pretrain.config import DataConfig
    from pretrain.data import build_train_loader

    a = _photo(64, 48)
    png, cmyk = io.BytesIO(), io.BytesIO()
    Image.fromarray(a).save(png, "PNG")
    Image.fromarray(a).convert("CMYK").save(cmyk, "JPEG")
    images = [("png", png.getvalue())] * 2 + [("jpg", cmyk.getvalue())] + [("jpg", _jpeg(a))] * 13
    with wds.TarWriter(str(tmp_path / "train-000000.tar")) as tw:
        for i, (ext, data) in enumerate(images):
            tw.write({"__key__": f"k{i:03d}", ext: data, "cls": str(i % 2)})
    split = {"name": "train", "num_samples": 16, "filenames": ["train-000000.tar"], "shard_lengths": [16]}
    info = {"name": "t", "num_classes": 2, "class_names": ["a", "b"], "splits": {"train": split}}
    (tmp_path / "_info.json").write_text(json.dumps(info))
    cfg = DataConfig(train_shards=str(tmp_path), num_workers=1)
    loader = build_train_loader(cfg, img_size=16, batch_size=4, seed=0)
    with loader:
        it = iter(loader)
        for _ in range(4):
            next(it)
        stats = loader.stats()
    assert stats["region_decodes"] == 13 and stats["decode_fallbacks"] == {"colorspace": 1, "not_jpeg": 2}
