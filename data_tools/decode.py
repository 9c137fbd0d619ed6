"""Image bytes -> uint8 RGB: the one decoder that judges an image for the shard writer, `verify` and the stream.

    image_size    (width, height) from the header alone, and the decompression-bomb guard (MAX_PIXELS)
    open_image    a Pillow image with only its header read, under the same guard
    to_rgb        any Pillow mode -> 8-bit RGB; 16-bit and 32-bit integer images are scaled (value / 257), not clipped
    decode_rgb    bytes -> uint8 (3, H, W) tensor: libjpeg-turbo for JPEG, libpng for PNG (16-bit scaled as above),
                  Pillow for the rest and for reduced-scale JPEG (draft mode)
    decode_crop   bytes + box -> the box's pixels, decoding only the rows and iMCU columns it needs where the JPEG
                  region decoder (`jpeg_region`) takes the image, else `decode_rgb` whole; same pixels either way
    scaled_size   an image's size decoded at 1/2, 1/4 or 1/8 (libjpeg's and Pillow's rounding)
    decode_stats  this process's region decodes and fallbacks by reason (cumulative)

Every failure is a `BadImage` whose message says what the file is ("empty file", "not an image: starts with
b'...'", "truncated or corrupt image (...)"), so a writer, `verify` and the stream name a bad file the same way.
The writer re-encodes with `open_image` + `to_rgb`, and checks the bytes it keeps with `decode_rgb`; the stream
(`pretrain.data`) and `verify` decode with `decode_rgb`.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_tools import jpeg_region

if TYPE_CHECKING:
    import torch

MAX_PIXELS = 1 << 28
"""Larger images are refused from their header, before any pixel is decoded (a decompression-bomb guard)."""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EOI = b"\xff\xd9"
"""A JPEG's end marker: `decode_crop` takes the region path only for data that ends with it."""
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
"""Pillow modes of 16-bit (and 32-bit integer) images, whose values run to 65535, not 255."""
_SOURCE_PREFIX = re.compile(r"^[\w(), ]*\S+\.(?:cpp|h):\d+, ")
"""torchvision's error messages start with the C++ source location: not the user's business."""
FALLBACKS = ("not_jpeg", "no_eoi", *jpeg_region.REASONS.values(), "unavailable")
"""Why `decode_crop` decoded a whole image: not a JPEG; no end marker at the end (truncated, or bytes after it: the
full decoder judges); the region decoder's refusals (`jpeg_region.REASONS`); the region decoder not built here."""
_STATS: dict[int, Counter[str]] = {}

# torchvision 0.29 warns at every decode call that its image decoding is deprecated in favour of TorchCodec. Measured
# (docs/stream.md "Speed"): TorchCodec 0.17's decode_jpeg gives the same pixels in the same time and has no region
# decode, so crops take our region decoder and full decodes (decode_rgb: the fallbacks, verify, the writer) and the
# nvJPEG path keep torchvision.io. Replacement plan, when torchvision removes them: torchcodec.decoders.decode_jpeg /
# decode_image (same call, mode="RGB") here and in pretrain/data/gpu_decode.py.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")


class BadSample(ValueError):
    """A sample that is left out: no image or label, a bad label, or an image that does not decode; the message
    says why."""


class BadImage(BadSample):
    """Image bytes that give no usable RGB picture (empty, not an image, truncated, too large); the message says
    which."""


def is_jpeg(data: bytes) -> bool:
    """True for JPEG bytes (SOI marker), whatever the member's extension says."""
    return data[:2] == b"\xff\xd8"


def is_png(data: bytes) -> bool:
    """True for PNG bytes (signature), whatever the member's extension says."""
    return data[:8] == PNG_MAGIC


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header only (JPEG and PNG parsed directly, other formats by Pillow).

    Raises:
        BadImage: empty, not an image, an unreadable header, or more than MAX_PIXELS pixels.
    """
    size = _header_size(data)
    if size is None:
        with open_image(data) as im:
            return im.size
    return _checked(size)


def open_image(data: bytes) -> Image.Image:
    """A Pillow image of `data` with its header read and nothing decoded, after the size guard.

    Raises:
        BadImage: empty, not an image, an unreadable header, or more than MAX_PIXELS pixels.
    """
    if not data:
        raise BadImage("empty file")
    size = _header_size(data)
    if size is not None:
        _checked(size)  # refused before Pillow is asked
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImage(f"image too large ({e})") from None
    except UnidentifiedImageError:
        if is_jpeg(data) or is_png(data):
            raise BadImage(f"corrupt {'JPEG' if is_jpeg(data) else 'PNG'} header") from None
        raise BadImage(f"not an image: starts with {data[:16]!r}") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for malformed headers
        raise BadImage(f"unreadable image header ({reason(e)})") from None
    _checked(im.size)
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """`im` as 8-bit RGB. 16-bit grey (and 32-bit integer) values are scaled by 1/257, as `decode_rgb` scales
    16-bit PNGs: Pillow's own `convert("RGB")` clips them at 255 (a near-white picture)."""
    if im.mode in _HIGH_BIT_MODES:
        grey = to_uint8(np.clip(np.asarray(im), 0, 65535).astype(np.uint16))
        return Image.fromarray(grey, "L").convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def to_uint8(a: np.ndarray) -> np.ndarray:
    """uint16 values -> uint8, rounded value / 257 (65535 -> 255); uint8 unchanged."""
    if a.dtype == np.uint8:
        return a
    return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)


def decode_rgb(data: bytes, reduce: int = 1) -> torch.Tensor:
    """Decode to a uint8 RGB tensor (3, H, W).

    Args:
        data: encoded image.
        reduce: 1, 2, 4 or 8: JPEG draft mode, decoding at 1/reduce scale (much faster for large originals).

    Raises:
        BadImage: the image is empty, not an image, too large (checked from the header first), corrupt or
            truncated.
    """
    # torch is imported here, not at the top: `data_tools info` / `verify` / a refused `shard` start in under a
    # second without it (its import takes seconds on a busy machine).
    import torch
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    w, h = image_size(data)  # the bomb guard, before anything is allocated
    try:
        if is_jpeg(data) and reduce == 1:
            # libjpeg-turbo straight to a tensor; no PIL object, no float conversion
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        if is_png(data):
            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            # a 16-bit PNG decodes to uint16 (3, H, W), which no uint8 kernel takes
            return img if img.dtype == torch.uint8 else torch.from_numpy(to_uint8(img.numpy()))
        with open_image(data) as im:
            if reduce > 1 and im.format == "JPEG":
                im.draft("RGB", (max(1, w // reduce), max(1, h // reduce)))
            arr = np.asarray(to_rgb(im))  # (H, W, 3)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, H, W), a view with channel-first strides
    except BadImage:
        raise
    except Exception as e:  # noqa: BLE001 - decoders raise RuntimeError, OSError, SyntaxError, ... on bad input
        raise BadImage(f"truncated or corrupt image ({reason(e)})") from None


def decode_stats() -> Counter[str]:
    """This process's `decode_crop` outcomes (cumulative): "region" and each of `FALLBACKS` that happened. Kept by
    process id, so a forked loader worker counts from zero, not from its parent's counts."""
    return _STATS.setdefault(os.getpid(), Counter())


def scaled_size(w: int, h: int, reduce: int) -> tuple[int, int]:
    """(width, height) of a w x h JPEG decoded at 1/`reduce`: rounded up, as libjpeg and Pillow's draft mode do."""
    return -(-w // reduce), -(-h // reduce)


def decode_crop(data: bytes, box: tuple[int, int, int, int], reduce: int = 1) -> tuple[torch.Tensor, tuple]:
    """The pixels of `box` of an image decoded at 1/`reduce` (JPEG; other images at full size), decoding as little as
    the region decoder allows.

    Args:
        data: encoded image.
        box: (top, left, height, width) in the decoded image's pixels (`scaled_size`), inside it.
        reduce: 1, 2, 4 or 8: JPEG scale, as `decode_rgb`'s draft mode.

    Returns:
        (img, (top, left, height, width)): uint8 (3, H', W') and the box within it; `img` is the box itself (box
        (0, 0, height, width)) when the region decoder took the image, the whole decoded image otherwise. The
        pixels are the same either way (tests/test_jpeg_region.py); `decode_stats()` counts which happened.

    Raises:
        BadImage: as `decode_rgb`.
    """
    w, h = image_size(data)  # the bomb guard, before anything is allocated
    if not is_jpeg(data):
        why = "not_jpeg"
    elif not (data.endswith(EOI) or data.rstrip(b"\0").endswith(EOI)):  # zero padding after the marker is fine
        why = "no_eoi"  # the region path could stop before a truncation that the full decode refuses
    else:
        try:
            img = jpeg_region.decode_region(data, reduce, scaled_size(w, h, reduce), box)
            decode_stats()["region"] += 1
            return img, (0, 0, box[2], box[3])
        except jpeg_region.Refused as e:
            why = e.reason
    decode_stats()[why] += 1
    return decode_rgb(data, reduce), box


def reason(e: BaseException) -> str:
    """`Type: message` on one line, without torchvision's C++ source location, at most 120 characters."""
    text = _SOURCE_PREFIX.sub("", str(e)).replace("\n", " ").strip()
    return f"{type(e).__name__}: {text}"[:120]


def _checked(size: tuple[int, int]) -> tuple[int, int]:
    w, h = size
    if w <= 0 or h <= 0 or w * h > MAX_PIXELS:
        raise BadImage(f"image size {w}x{h} out of range (at most {MAX_PIXELS:,} pixels)")
    return w, h


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG (first SOF) or PNG (IHDR) from its first bytes; None for other formats or an
    unexpected header (Pillow then reads it)."""
    if is_png(data) and len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return _jpeg_size(data) if is_jpeg(data) else None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first SOF marker, walking the marker segments (a few microseconds, no PIL)."""
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame: P, Y, X
            h, w = int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big")
            return (w, h) if w and h else None
        i += 2 + length
    return None
