"""One sample's image: decode it fully (to catch truncated files), downscale if asked, keep or re-encode the bytes.

Both judged by `data_tools.decode`, the stream's own decoder: bytes kept as they are decode there (so the training
stream reads every image the writer keeps), and a re-encoded image is converted to RGB by its rule (16-bit scaled).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from data_tools.decode import BadImage, decode_rgb, open_image, reason, to_rgb
from data_tools.format import REENCODED_EXT, STORED_EXTS

__all__ = ["BadImage", "Encoded", "ImageOptions", "encode_image", "target_size", "size_bucket", "bucket_labels"]

DEFAULT_QUALITY = 90
"""JPEG quality used when an image must be re-encoded (resized, or a format readers may not know) and no --quality."""

# Shorter-side buckets for the size distribution `info` prints: [0,32), [32,64), ..., [2048, inf).
SIZE_EDGES = (32, 64, 128, 256, 384, 512, 768, 1024, 2048)


@dataclass(frozen=True)
class ImageOptions:
    """How images are transformed on their way into the shards."""

    resize_shorter: int | None = None
    """Downscale so the shorter side is at most this many pixels (aspect kept, never upscaled); None keeps sizes."""
    quality: int | None = None
    """Re-encode every image as JPEG at this quality; None keeps the original bytes when no resize is needed."""


@dataclass
class Encoded:
    """The stored form of one image."""

    ext: str
    """Sample key for the image: `jpg` when re-encoded, else the source format's extension."""
    data: bytes
    """Bytes written to the shard."""
    width: int
    """Original width in pixels."""
    height: int
    """Original height in pixels."""
    stored_shorter: int
    """Shorter side of the stored image, in pixels."""


def target_size(width: int, height: int, shorter: int | None) -> tuple[int, int]:
    """Size after downscaling so min(width, height) <= shorter; unchanged when already small enough or no limit."""
    if not shorter or min(width, height) <= shorter:
        return width, height
    scale = shorter / min(width, height)
    if width <= height:
        return shorter, max(1, round(height * scale))
    return max(1, round(width * scale)), shorter


def encode_image(data: bytes, opts: ImageOptions) -> Encoded:
    """Decode `data` and return what to store for it.

    Raises:
        BadImage: The bytes cannot be decoded completely, or the image cannot be re-encoded; the message says
            what the file is (`data_tools.decode`).
    """
    im = open_image(data)  # header only; the size guard refuses a bomb here
    fmt = im.format
    width, height = im.size
    size = target_size(width, height, opts.resize_shorter)
    if size == (width, height) and opts.quality is None and fmt in STORED_EXTS:
        # Kept as it is: checked by the stream's decoder (a JPEG at 1/8 scale, as the stream's draft mode does:
        # it still reads every coefficient, so truncation fails, in half the time).
        decode_rgb(data, reduce=8)
        return Encoded(STORED_EXTS[fmt], data, width, height, min(width, height))
    try:
        if fmt == "JPEG" and size != (width, height):
            # libjpeg decodes at a reduced DCT scale (>= the target size): several times faster for big photos.
            im.draft("RGB", size)
        im.load()  # decode everything: truncated or corrupt files fail here, not in the training loader
    except Exception as e:  # noqa: BLE001 - Pillow raises many types (OSError, SyntaxError, ValueError...)
        raise BadImage(f"truncated or corrupt image ({reason(e)})") from None
    try:
        im = to_rgb(im)  # 16-bit scaled to 8, as the stream decodes it
        if im.size != size:
            im = im.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=opts.quality or DEFAULT_QUALITY)
    except Exception as e:  # noqa: BLE001 - an exotic mode Pillow cannot convert: skip it like any bad file
        raise BadImage(f"cannot re-encode as RGB JPEG ({reason(e)})") from None
    return Encoded(REENCODED_EXT, buf.getvalue(), width, height, min(size))


def size_bucket(shorter: int) -> int:
    """Index of the SIZE_EDGES bucket holding a shorter side of `shorter` pixels."""
    for i, edge in enumerate(SIZE_EDGES):
        if shorter < edge:
            return i
    return len(SIZE_EDGES)


def bucket_labels() -> list[str]:
    """Human labels of the size buckets, e.g. '<32', '32-63', ..., '>=2048'."""
    middle = [f"{a}-{b - 1}" for a, b in zip(SIZE_EDGES[:-1], SIZE_EDGES[1:], strict=True)]
    return [f"<{SIZE_EDGES[0]}"] + middle + [f">={SIZE_EDGES[-1]}"]
