"""Byte access to shards on local disk, HTTP(S) and S3, with transient faults retried at the same byte.

    open_stream(url, start, end, io)   a sequential reader of bytes [start, end) of one object
    read_bytes(url, io)                 a whole small object (`_info.json`, a shard index)
    object_size(url, io)                the size of an object (one ranged GET of its first byte)

Uploads to S3 (`shard --out s3://...`) are in `data_tools.upload`.

Here in `data_tools` (the lower layer) so that `info`, `verify` and `shard --out s3://` use the same access as the
training stream (`pretrain.data`), which imports it.

Remote objects are read with ranged requests of at most `io.chunk_bytes` (urllib3 for HTTP, boto3 for S3; both
do no retries of their own here). A connection reset in the middle of a body, a 5xx / 429 / throttling answer or a
read that stalls longer than `io.timeout_s` is retried up to `io.retries` times with exponential backoff and jitter,
from the byte where it broke: the bytes a reader sees are exactly those of a fault-free read. A permanent fault
(404, 403, retries exhausted) raises `StorageError`. Every retry is logged and counted in `IO_STATS` (per process),
with the bytes read, for the loader's metrics.

A refusal (missing bucket or object, access denied, a key the store does not know, no credentials at all) is never
retried: it raises `StorageError` at once, its message saying what was refused and what to set.
"""

from __future__ import annotations

import io
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from data_tools.extras import require

log = logging.getLogger("pretrain.data")
REMOTE_SCHEMES = ("http", "https", "s3")


class StorageError(OSError):
    """An object that cannot be read or written: missing, forbidden, no credentials, or faults beyond the retries."""


CREDENTIALS_HINT = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
# What an S3 error code means to the user (HEAD answers carry no code: their status stands in for it).
_S3_REFUSALS = {
    "NoSuchBucket": "the bucket does not exist",
    "NoSuchKey": "no such object",
    "404": "no such object",
    "AccessDenied": "access denied (the credentials lack the permission, or the bucket's policy refuses it)",
    "403": "access denied",
    "AllAccessDisabled": "all access to this bucket is disabled",
    "InvalidAccessKeyId": f"the store does not know this access key; {CREDENTIALS_HINT}",
    "SignatureDoesNotMatch": "the secret key does not match the access key; check AWS_SECRET_ACCESS_KEY",
    "ExpiredToken": "the session token has expired; renew the credentials (AWS_SESSION_TOKEN or AWS_PROFILE)",
    "InvalidToken": "the session token is not valid; renew the credentials (AWS_SESSION_TOKEN or AWS_PROFILE)",
    "InvalidBucketName": "not a valid bucket name",
}


@dataclass
class IOPolicy:
    """How remote objects are read (from `DataConfig`: io_timeout_s, io_retries, io_chunk_bytes)."""

    timeout_s: float = 30.0
    """A connect or read that stalls longer than this is a transient fault."""
    retries: int = 8
    """Transient faults retried per request before the object counts as unreadable."""
    chunk_bytes: int = 8 << 20
    """Bytes per ranged request."""
    backoff_s: float = 0.2
    """First retry's mean delay; doubled per retry (with +-50% jitter), at most 10 s."""


@dataclass
class IOStats:
    """Remote reads of this process (cumulative)."""

    retries: int = 0
    bytes_read: int = 0


IO_STATS = IOStats()


def is_remote(url: str) -> bool:
    """True for http(s):// and s3:// URLs."""
    return urlparse(url).scheme in REMOTE_SCHEMES


def join(base: str, name: str) -> str:
    """`name` inside the folder `base` (a local path or a URL)."""
    return f"{base.rstrip('/')}/{name}" if is_remote(base) else str(Path(base) / name)


def parent(url: str) -> str:
    """The folder holding `url`."""
    return url.rsplit("/", 1)[0] if is_remote(url) else str(Path(url).parent)


class _Transient(Exception):
    """A fault worth retrying (internal)."""


def s3_fault(e: Exception) -> _Transient | StorageError:
    """What a boto3 / botocore failure means: a fault worth retrying, or a refusal named in words."""
    from botocore.exceptions import (
        ClientError,
        CredentialRetrievalError,
        NoCredentialsError,
        PartialCredentialsError,
        ProfileNotFound,
    )

    if isinstance(e, ClientError):
        meta = e.response.get("ResponseMetadata", {})
        status, code = meta.get("HTTPStatusCode", 0), e.response.get("Error", {}).get("Code", "")
        if status >= 500 or status == 429 or "Throttl" in code or code in ("SlowDown", "RequestTimeout"):
            return _Transient(f"S3 {status} {code}")
        what = _S3_REFUSALS.get(code) or e.response.get("Error", {}).get("Message") or "refused"
        return StorageError(f"S3 {status} {code}: {what}")
    if isinstance(e, NoCredentialsError):
        return StorageError(f"no AWS credentials found; {CREDENTIALS_HINT}")
    if isinstance(e, (PartialCredentialsError, ProfileNotFound, CredentialRetrievalError)):
        return StorageError(f"{e}; {CREDENTIALS_HINT}")
    return _Transient(f"{type(e).__name__}: {e}")


# ------------------------------------------------------------------------------------------- backends


_CLIENTS: dict[tuple[int, str, float], object] = {}


def require_remote() -> None:
    """Remote URLs need urllib3 and boto3 (the `remote` extra); without them, one line naming it (MissingExtra)."""
    require("urllib3")
    require("boto3")


def _client(kind: str, timeout_s: float):
    """One urllib3 pool / boto3 client per process and timeout (made after a fork, never shared with the parent)."""
    require_remote()
    key = (os.getpid(), kind, timeout_s)
    if key not in _CLIENTS:
        if kind == "http":
            import urllib3

            _CLIENTS[key] = urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s), retries=False, maxsize=4
            )
        else:
            import boto3
            from botocore.config import Config

            # one attempt: botocore retries nothing here (RangeReader retries, resuming at the byte)
            cfg = Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"total_max_attempts": 1})
            _CLIENTS[key] = boto3.session.Session().client("s3", config=cfg)
    return _CLIENTS[key]


def _http_get(url: str, start: int, stop: int | None, timeout_s: float):
    """(body, total size or None) of bytes [start, stop) of an HTTP object; None body: past the end."""
    import urllib3

    headers = {"Range": f"bytes={start}-{'' if stop is None else stop - 1}"}
    try:
        r = _client("http", timeout_s).request("GET", url, headers=headers, preload_content=False, redirect=True)
    except urllib3.exceptions.HTTPError as e:
        raise _Transient(f"{type(e).__name__}: {e}") from None
    if r.status == 416:
        r.release_conn()
        return None, start, False
    if r.status >= 500 or r.status == 429:
        r.release_conn()
        raise _Transient(f"HTTP {r.status}")
    if r.status not in (200, 206):
        r.release_conn()
        raise StorageError(f"HTTP {r.status}")
    if r.status == 206:
        return r, _total(r.headers.get("Content-Range")), False
    _drain(r, start)  # no Range support: the whole object, skipped to the byte
    length = r.headers.get("Content-Length")
    return r, int(length) if length and length.isdigit() else None, True


def _s3_get(url: str, start: int, stop: int | None, timeout_s: float):
    from botocore.exceptions import BotoCoreError, ClientError

    u = urlparse(url)
    rng = f"bytes={start}-{'' if stop is None else stop - 1}"
    try:
        r = _client("s3", timeout_s).get_object(Bucket=u.netloc, Key=u.path.lstrip("/"), Range=rng)
    except (ClientError, BotoCoreError) as e:
        if isinstance(e, ClientError) and _past_the_end(e):
            return None, start, False
        raise s3_fault(e) from None
    return r["Body"], _total(r.get("ContentRange")), False


def _past_the_end(e) -> bool:
    """A ranged GET that starts at or past the object's end (416 InvalidRange)."""
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status == 416 or e.response.get("Error", {}).get("Code") == "InvalidRange"


def _total(content_range: str | None) -> int | None:
    """The object size from a `bytes a-b/total` header."""
    if not content_range or "/" not in content_range:
        return None
    total = content_range.rsplit("/", 1)[1]
    return int(total) if total.isdigit() else None


def _drain(body, n: int) -> None:
    while n > 0:
        got = body.read(min(n, 1 << 20))
        if not got:
            raise _Transient("body ended while skipping to the resume byte")
        n -= len(got)


def _read_body(body, n: int) -> bytes:
    """Up to n bytes of a response body; a reset or a stall becomes `_Transient`."""
    from botocore.exceptions import BotoCoreError
    from urllib3.exceptions import HTTPError

    try:
        return body.read(n)
    except (HTTPError, BotoCoreError, OSError, ValueError) as e:
        raise _Transient(f"{type(e).__name__}: {e}") from None


# ------------------------------------------------------------------------------------------- reader


class RangeReader(io.RawIOBase):
    """Sequential reader of bytes [start, end) of a remote object that resumes at its byte after a transient fault."""

    def __init__(self, url: str, start: int = 0, end: int | None = None, policy: IOPolicy | None = None):
        require_remote()
        self.url, self.pos, self.end = url, start, end
        self.policy = policy or IOPolicy()
        self._get = _s3_get if url.startswith("s3://") else _http_get
        self._body, self._stop, self._size = None, None, None

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def read(self, n: int = -1) -> bytes:
        """Up to n bytes (all that is left for n < 0); b"" at the end."""
        out = bytearray()
        while n < 0 or len(out) < n:
            want = (1 << 20) if n < 0 else n - len(out)
            got = self._retrying(want)
            if not got:
                break
            out += got
        return bytes(out)

    def _retrying(self, want: int) -> bytes:
        for attempt in range(self.policy.retries + 1):
            try:
                return self._read_some(want)
            except _Transient as e:
                self._drop()
                if attempt == self.policy.retries:
                    raise StorageError(f"{e}; gave up after {self.policy.retries} retries (data.io_retries)") from None
                delay = min(10.0, self.policy.backoff_s * 2**attempt) * random.uniform(0.5, 1.5)
                IO_STATS.retries += 1
                log.warning("retrying %s at byte %d in %.2fs (%s; retry %d)", self.url, self.pos, delay, e, attempt + 1)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _read_some(self, want: int) -> bytes:
        while True:
            if self.end is not None and self.pos >= self.end or self._size is not None and self.pos >= self._size:
                return b""
            if self._body is None:
                stop = self.pos + self.policy.chunk_bytes
                stop = stop if self.end is None else min(stop, self.end)
                self._body, total, whole = self._get(self.url, self.pos, stop, self.policy.timeout_s)
                if self._body is None:  # 416: the object ends at pos
                    self._size = self.pos
                    return b""
                self._stop = (1 << 62) if whole else stop  # a server without Range support sends the rest
                self._size = total if total is not None else self._size
            data = _read_body(self._body, min(want, self._stop - self.pos))
            if data:
                self.pos += len(data)
                IO_STATS.bytes_read += len(data)
                return data
            self._drop(reuse=True)
            if self.pos < self._stop:  # the body ended before the chunk's end: the object's end, or a cut body
                if self._size is not None and self.pos < self._size:
                    raise _Transient(f"body ended at byte {self.pos} of {self._size}")
                self._size = self.pos

    def _drop(self, reuse: bool = False) -> None:
        """Let go of the current response: a fully read one returns its connection to the pool (`reuse`)."""
        if self._body is not None:
            try:
                if reuse and hasattr(self._body, "release_conn"):  # urllib3: keep-alive for the next range
                    self._body.release_conn()
                else:
                    self._body.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may raise anything; it is discarded
                pass
        self._body = None

    def close(self) -> None:
        self._drop()
        super().close()


def open_stream(url: str, start: int = 0, end: int | None = None, policy: IOPolicy | None = None):
    """A binary reader of bytes [start, end) of a local file or remote object (local: a seekable file at start)."""
    if not is_remote(url):
        path = url[len("file://") :] if url.startswith("file://") else url
        f = open(path, "rb")  # noqa: SIM115 - the caller closes it
        f.seek(start)
        return f
    return RangeReader(url, start, end, policy)


def read_bytes(url: str, policy: IOPolicy | None = None) -> bytes:
    """A whole object (small ones: `_info.json`, a shard index); raises StorageError / FileNotFoundError."""
    if not is_remote(url):
        return Path(url).read_bytes()
    with RangeReader(url, 0, None, policy) as r:
        return r.read()


def object_size(url: str, policy: IOPolicy | None = None) -> int:
    """Bytes in a local file or remote object; raises StorageError / FileNotFoundError when it cannot be read."""
    if not is_remote(url):
        return Path(url).stat().st_size
    r = RangeReader(url, 0, 1, policy)
    try:
        r.read(1)
    finally:
        r.close()
    if r._size is None:
        raise StorageError(f"{url}: the server gave no object size (Content-Range)")
    return r._size
