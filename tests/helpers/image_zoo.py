"""A zoo of real-world image files, made from scikit-learn's sample photos, each good one with its correct picture.

ImageNet-21k holds such files: CMYK and YCCK JPEGs, progressive and grayscale ones, 16-bit PNGs, palette and alpha
images, GIF/BMP/TIFF/WebP, degenerate sizes, a PNG named `.JPEG`; and bad ones: a decompression bomb, truncated and
empty files, text. `good_files()` gives {name: (bytes, reference)}, the reference being the true 8-bit RGB picture
(H, W, 3) (16-bit values scaled by 1/257; alpha dropped, as every RGB reader does); `bad_files()` gives
{name: (bytes, words its skip reason must hold)}.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterable

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

BOMB_SIDE = 20_000
"""The bomb's width and height: 400M pixels (over 1 GB as RGB), a 50 KB file."""


def _photo(index: int, top: int, left: int, h: int = 96, w: int = 128) -> np.ndarray:
    return np.ascontiguousarray(load_sample_images().images[index][top : top + h, left : left + w])  # (h, w, 3)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png(rows: Iterable[bytes], width: int, height: int, depth: int, colour: int) -> bytes:
    """A PNG from its raw scanlines (no filter byte; it is added here), compressed as they come: for what Pillow
    cannot write (16-bit RGB) and for a bomb that is never held in memory whole."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z = zlib.compressobj(9)
    idat = b"".join(z.compress(b"\0" + row) for row in rows) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def ycck_jpeg(rgb: np.ndarray) -> bytes:
    """An Adobe YCCK JPEG (transform 2) of `rgb`: libjpeg writes Y, Cb, Cr, K as given when saved as CMYK; the
    Adobe marker Pillow writes says transform 0 (plain CMYK) and is set to 2."""
    ycc = np.asarray(Image.fromarray(rgb).convert("YCbCr"))
    k = np.zeros(rgb.shape[:2], np.uint8)
    data = bytearray(encode(Image.fromarray(np.dstack([ycc, k]), "CMYK"), "JPEG", quality=95))
    at = data.find(b"Adobe")
    assert at > 0 and data[at + 11] == 0, "Pillow wrote no Adobe marker"
    data[at + 11] = 2  # APP14 "Adobe": version(2) flags0(2) flags1(2) transform(1)
    return bytes(data)


def good_files() -> dict[str, tuple[bytes, np.ndarray]]:
    """{file name: (bytes, correct uint8 RGB (H, W, 3))}; names carry the extension a crawl would give them."""
    rgb = _photo(0, 150, 200)
    flower = _photo(1, 160, 250)
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    grey3 = np.dstack([grey] * 3)
    noise = np.random.default_rng(0).integers(-128, 129, size=rgb.shape)
    rgb16 = np.clip(flower.astype(np.int64) * 257 + noise, 0, 65535).astype(np.uint16)  # true 16-bit values
    grey16 = rgb16[..., 1].copy()
    palette = Image.fromarray(flower).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    alpha = np.tile(np.linspace(0, 255, rgb.shape[1], dtype=np.uint8), (rgb.shape[0], 1))
    strip = np.asarray(Image.fromarray(rgb).resize((4000, 8), Image.Resampling.BILINEAR))
    pixel = np.array([[[200, 30, 90]]], np.uint8)
    scaled16 = ((rgb16.astype(np.uint32) + 128) // 257).astype(np.uint8)  # value / 257, rounded
    return {
        "rgb.jpg": (encode(Image.fromarray(rgb), "JPEG", quality=95), rgb),
        "cmyk.jpg": (encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95), rgb),
        "ycck.jpg": (ycck_jpeg(rgb), rgb),
        "progressive.jpg": (encode(Image.fromarray(flower), "JPEG", quality=95, progressive=True), flower),
        "grey.jpg": (encode(Image.fromarray(grey), "JPEG", quality=95), grey3),
        "grey16.png": (encode(Image.fromarray(grey16), "PNG"), np.dstack([scaled16[..., 1]] * 3)),
        "rgb16.png": (png((r.astype(">u2").tobytes() for r in rgb16), 128, 96, 16, 2), scaled16),
        "palette.png": (encode(palette, "PNG"), np.asarray(palette.convert("RGB"))),
        "rgba.png": (encode(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG"), rgb),
        "grey_alpha.png": (encode(Image.fromarray(np.dstack([grey, alpha]), "LA"), "PNG"), grey3),
        "palette.gif": (encode(palette, "GIF"), np.asarray(palette.convert("RGB"))),
        "photo.bmp": (encode(Image.fromarray(flower), "BMP"), flower),
        "photo.tiff": (encode(Image.fromarray(rgb), "TIFF"), rgb),
        "photo.webp": (encode(Image.fromarray(flower), "WEBP", lossless=True), flower),
        "one_pixel.png": (encode(Image.fromarray(pixel), "PNG"), pixel),
        "strip_4000x8.jpg": (encode(Image.fromarray(strip), "JPEG", quality=95), strip),
        "png_named.JPEG": (encode(Image.fromarray(flower), "PNG"), flower),
    }


def bomb_png() -> bytes:
    """A real 20000 x 20000 1-bit grey PNG (all black): tiny on disk, 400M pixels once decoded."""
    row = bytes(BOMB_SIDE // 8)
    return png((row for _ in range(BOMB_SIDE)), BOMB_SIDE, BOMB_SIDE, 1, 0)


def bad_files() -> dict[str, tuple[bytes, str]]:
    """{file name: (bytes, what its skip reason must say)}."""
    jpeg = encode(Image.fromarray(_photo(0, 0, 0)), "JPEG", quality=90)
    png_bytes = encode(Image.fromarray(_photo(1, 0, 0)), "PNG")
    return {
        "bomb.png": (bomb_png(), f"image size {BOMB_SIDE}x{BOMB_SIDE} out of range"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated or corrupt image"),
        "truncated.png": (png_bytes[: len(png_bytes) // 2], "truncated or corrupt image"),
        "empty.jpg": (b"", "empty file"),
        "notes.txt": (b"not a picture, just notes\n", "not an image: starts with b'not a picture, j'"),
    }


def mean_error(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two uint8 pictures of one shape, in units of 1/255."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())
