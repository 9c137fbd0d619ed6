"""Safe reading of untrusted shards: only the image, `cls` and `json` members are read, with explicit decoders.

Member names, image extensions and the `.cls` rule are the shard format's (`data_tools.format`); the image decoder
(`decode_rgb`, `image_size`, the size guard) is `data_tools.decode`: all shared with the writer and
`data_tools verify`, so what they accept is what the stream reads.

webdataset's default `.decode()` would unpickle `.pyd` / `.pickle` / `.pth` members, which runs arbitrary code from
the shard. Here every other member is skipped unread (the tar stream seeks past it), so nothing in a shard is ever
unpickled or executed.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass

import webdataset as wds

from data_tools.decode import BadSample, decode_crop, decode_rgb, image_size, is_jpeg, scaled_size
from data_tools.format import LABEL_EXT, SAMPLE_EXTS, Grouping, LabelError, image_ext, parse_cls
from data_tools.storage import IOPolicy, StorageError, is_remote, open_stream

__all__ = [  # the decoder's names are re-exported: the stream's modules take them from here
    "BadSample",
    "BadShard",
    "RawSample",
    "decode_crop",
    "decode_rgb",
    "image_bytes",
    "image_size",
    "is_jpeg",
    "label_of",
    "read_shard",
    "scaled_size",
]
_ZERO_BLOCK = bytes(512)


class BadShard(Exception):
    """A shard could not be opened or is truncated / not a tar file."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.url, self.reason = url, reason


@dataclass
class RawSample:
    """One undecoded sample, as read from the tar (bytes only; nothing decoded yet)."""

    key: str
    """The sample key (member name without extension)."""
    members: dict[str, bytes]
    """Wanted members by lower-case extension: an image extension, `cls`, `json`."""


def read_shard(
    url: str,
    start: int = 0,
    end: int | None = None,
    offsets: list[int] | None = None,
    policy: IOPolicy | None = None,
    want: Container[int] | None = None,
) -> Iterator[tuple[int, RawSample]]:
    """Yield `(index_in_shard, RawSample)` for samples `start <= index < end` of one shard (only those in `want`,
    when given), grouped by the shard format's rule (`data_tools.format.Grouping`).

    Samples before `start` and outside `want` are passed over without reading their bytes (local files: headers
    only; remote shards with their index `offsets`: the read starts at sample `start`'s byte and stops before sample
    `end`'s). Members whose extension is not wanted (e.g. `.pyd`, `.pth`) are never read.

    Raises:
        BadShard: the shard cannot be opened, is not a tar file, or ends in the middle of a member.
    """
    base = 0
    try:
        if is_remote(url) and offsets is not None:
            if start >= len(offsets) - 1:
                return  # the index holds fewer samples: the caller counts the shortfall
            base, hi = start, None if end is None else offsets[min(end, len(offsets) - 1)]
            stream = open_stream(url, offsets[start], hi, policy)
        else:
            stream = open_stream(url, 0, None, policy) if is_remote(url) else wds.gopen(url, "rb")
    except Exception as e:  # noqa: BLE001 - any opener failure (missing file, HTTP error) is a bad shard
        raise BadShard(url, f"cannot open ({type(e).__name__}: {e})") from None
    try:
        grouping, at, key, members = Grouping(), None, "", {}
        wanted = (lambda i: i >= start) if want is None else (lambda i: i >= start and i in want)
        for name, read in _members(stream):
            placed = grouping.place(name)
            if placed is None:
                continue
            i, ext = placed[0] + base, placed[1]
            if i != at:
                if at is not None and wanted(at):
                    yield at, RawSample(key, members)
                at, key, members = i, grouping.key, {}
                if end is not None and i >= end:
                    return
            if ext in SAMPLE_EXTS and wanted(i):
                members[ext] = read()
        if at is not None and wanted(at) and (end is None or at < end):
            yield at, RawSample(key, members)
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
