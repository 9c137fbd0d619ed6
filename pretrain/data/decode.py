"""Safe reading of untrusted shards: only the image, `cls` and `json` members are read, with explicit decoders.

Member names, image extensions and the `.cls` rule are the shard format's (`data_tools.format`), shared with the
writer and `data_tools verify`.

webdataset's default `.decode()` would unpickle `.pyd` / `.pickle` / `.pth` members, which runs arbitrary code from
the shard. Here every other member is skipped unread (the tar stream seeks past it), so nothing in a shard is ever
unpickled or executed.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from data_tools.format import LABEL_EXT, SAMPLE_EXTS, LabelError, image_ext, is_ignored, parse_cls, split_name
from data_tools.storage import IOPolicy, StorageError, is_remote, open_stream

MAX_PIXELS = 1 << 28
"""Larger images are rejected as corrupt (a decompression bomb guard, as Pillow's)."""
_ZERO_BLOCK = bytes(512)


class BadShard(Exception):
    """A shard could not be opened or is truncated / not a tar file."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.url, self.reason = url, reason


class BadSample(Exception):
    """A sample lacks its image or label, or the image cannot be decoded."""


@dataclass
class RawSample:
    """One undecoded sample, as read from the tar (bytes only; nothing decoded yet)."""

    key: str
    """The sample key (member name without extension)."""
    members: dict[str, bytes]
    """Wanted members by lower-case extension: an image extension, `cls`, `json`."""


def read_shard(
    url: str, start: int = 0, end: int | None = None, offsets: list[int] | None = None, policy: IOPolicy | None = None
) -> Iterator[tuple[int, RawSample]]:
    """Yield `(index_in_shard, RawSample)` for samples `start <= index < end` of one shard.

    Samples before `start` are passed over without reading their bytes (local files: headers only; remote shards
    with their index `offsets`: the read starts at sample `start`'s byte and stops before sample `end`'s); reading
    stops after sample `end - 1`. Members whose extension is not wanted (e.g. `.pyd`, `.pth`) are never read.

    Raises:
        BadShard: the shard cannot be opened, is not a tar file, or ends in the middle of a member.
    """
    base = 0
    try:
        if is_remote(url):
            if offsets is not None and start >= len(offsets) - 1:
                return  # the index holds fewer samples: the caller counts the shortfall
            if offsets is not None:
                base = start
                hi = None if end is None else offsets[min(end, len(offsets) - 1)]
                stream = open_stream(url, offsets[start], hi, policy)
            else:
                stream = open_stream(url, 0, None, policy)
        else:
            stream = wds.gopen(url, "rb")
    except Exception as e:  # noqa: BLE001 - any opener failure (missing file, HTTP error) is a bad shard
        raise BadShard(url, f"cannot open ({type(e).__name__}: {e})") from None
    try:
        index, key, members = base - 1, None, {}
        for name, read in _members(stream):
            if is_ignored(name):
                continue
            k, ext = split_name(name)
            if k != key:
                if index >= start and key is not None:
                    yield index, RawSample(key, members)
                index, key, members = index + 1, k, {}
                if end is not None and index >= end:
                    return
            if index >= start and ext in SAMPLE_EXTS:
                members[ext] = read()
        if key is not None and index >= start and (end is None or index < end):
            yield index, RawSample(key, members)
    except StorageError as e:
        raise BadShard(url, f"unreadable ({e})") from None
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise BadShard(url, f"truncated or not a tar file ({type(e).__name__}: {e})") from None
    finally:
        try:
            stream.close()
        except Exception:  # noqa: BLE001 - closing a broken connection must not kill the worker (it is done)
            pass


def _members(f) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(name, read) for each regular member; data that is not read is skipped (seeked over on local files)."""
    seekable = getattr(f, "seekable", lambda: False)()
    if not seekable or f.read(2) == b"\x1f\x8b":  # a stream or gzip: let tarfile handle it
        if seekable:
            f.seek(0)
        tar = tarfile.open(fileobj=f, mode="r|*")
        for info in tar:
            if info.isreg():
                yield info.name, tar.extractfile(info).read
            tar.members = []  # tarfile keeps every header otherwise
        return
    # plain tar on a local file: a minimal ustar/GNU/pax header walk, several times faster than tarfile in Python
    f.seek(0)
    file_size, long_name, pax_size = os.fstat(f.fileno()).st_size, None, None
    while True:
        hdr = f.read(512)
        if len(hdr) < 512 or hdr == _ZERO_BLOCK:
            if hdr.strip(b"\0"):
                raise EOFError("truncated tar header")
            return
        if sum(hdr) - sum(hdr[148:156]) + 256 != int(hdr[148:156].split(b"\0")[0].strip() or b"-1", 8):
            raise ValueError("bad tar header checksum (not a tar file, or corrupt)")
        field = hdr[124:136]
        size = int.from_bytes(field[1:], "big") if field[0] & 0x80 else int(field.split(b"\0")[0].strip() or b"0", 8)
        size = pax_size if pax_size is not None else size
        kind, padded = hdr[156:157], -(-size // 512) * 512
        if kind in (b"L", b"x", b"g"):  # GNU long name, pax header (path, size), global pax header
            data = f.read(padded)[:size]
            if kind == b"L":
                long_name = data.split(b"\0", 1)[0]
            elif kind == b"x":
                pax = _pax(data)
                long_name = pax.get(b"path", long_name)
                pax_size = int(pax[b"size"]) if b"size" in pax else None
            continue
        name = hdr[:100].split(b"\0", 1)[0]
        if hdr[257:262] == b"ustar" and hdr[345:500].strip(b"\0"):
            name = hdr[345:500].split(b"\0", 1)[0] + b"/" + name
        name, long_name, pax_size = (long_name or name), None, None
        start = f.tell()
        if kind in (b"0", b"\0", b"7"):

            def read(n: int = size) -> bytes:
                data = f.read(n)
                if len(data) < n:
                    raise EOFError("unexpected end of data")
                return data

            yield name.decode("utf-8", "surrogateescape"), read
        f.seek(start + padded)
        if start + size > file_size:
            raise EOFError("unexpected end of data")


def _pax(data: bytes) -> dict[bytes, bytes]:
    out, i = {}, 0
    while i < len(data):
        length = int(data[i : data.index(b" ", i)])
        key, _, value = data[data.index(b" ", i) + 1 : i + length - 1].partition(b"=")
        out[key], i = value, i + length
    return out


def label_of(sample: RawSample) -> list[int]:
    """Integer label(s) from `.cls` (`data_tools.format.parse_cls`: `3`, or `3,7` for multi-label data)."""
    raw = sample.members.get(LABEL_EXT)
    if raw is None:
        raise BadSample(f"{sample.key}: no .cls member")
    try:
        return parse_cls(raw)
    except LabelError as e:
        raise BadSample(f"{sample.key}: {e}") from None


def image_bytes(sample: RawSample) -> tuple[bytes, str]:
    """The image member and its extension; raises BadSample when the sample has none."""
    ext = image_ext(sample.members)
    if ext is None:
        raise BadSample(f"{sample.key}: no image member")
    return sample.members[ext], ext


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header only; raises BadSample if the header is unreadable or huge."""
    size = _jpeg_size(data) if is_jpeg(data) else None
    if size is None:
        try:
            with Image.open(io.BytesIO(data)) as im:
                size = im.size
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for malformed input
            raise BadSample(f"unreadable image header ({type(e).__name__})") from None
    w, h = size
    if w <= 0 or h <= 0 or w * h > MAX_PIXELS:
        raise BadSample(f"image size {w}x{h} out of range")
    return w, h


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


def is_jpeg(data: bytes) -> bool:
    """True for JPEG bytes (SOI marker), whatever the member's extension says."""
    return data[:2] == b"\xff\xd8"


def decode_rgb(data: bytes, reduce: int = 1) -> torch.Tensor:
    """Decode to a uint8 RGB tensor (3, H, W).

    Args:
        data: encoded image.
        reduce: 1, 2, 4 or 8: JPEG draft mode, decoding at 1/reduce scale (much faster for large originals).

    Raises:
        BadSample: the image is corrupt or truncated.
    """
    try:
        if is_jpeg(data) and reduce == 1:
            # libjpeg-turbo straight to a tensor; no PIL object, no float conversion
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        if not is_jpeg(data) and data[:8] == b"\x89PNG\r\n\x1a\n":
            return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        with Image.open(io.BytesIO(data)) as im:
            if reduce > 1 and im.format == "JPEG":
                im.draft("RGB", (im.width // reduce, im.height // reduce))
            arr = np.asarray(im.convert("RGB"))  # (H, W, 3)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, H, W), a view with channel-first strides
    except BadSample:
        raise
    except Exception as e:  # noqa: BLE001 - decoders raise RuntimeError, OSError, SyntaxError, ... on bad input
        raise BadSample(f"corrupt image ({type(e).__name__}: {str(e)[:80]})") from None
