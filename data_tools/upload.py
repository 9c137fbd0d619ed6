"""Uploads to S3: a finished shard folder (`data_tools shard SRC s3://bucket/prefix/ --staging DIR`).

    check_destination(url)              fail fast, before sharding, when S3 refuses the bucket or the credentials
    upload_files([(path, url), ...])    local files to s3:// objects
    publish(folder, url)                a finished shard folder, `_info.json` last

Uploads go through boto3's managed transfer: a staged file is streamed from disk (never read whole into memory), in
parts above `UploadPolicy.multipart_bytes` (S3 takes at most 5 GB in one PUT), with botocore's retries on (a 503 or a
reset connection is sent again, a request or a part at a time). Each object appears whole or not at all (one PUT, or
the completion of its multipart upload); `_info.json` goes last, so a reader never sees a half-written set.
A refusal ends the upload with one `StorageError` naming the URL and the cause.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from data_tools import format as fmt
from data_tools.storage import StorageError, join, s3_fault

MULTIPART_ENV = "DATA_TOOLS_MULTIPART_BYTES"


@dataclass
class UploadPolicy:
    """How `publish` uploads to S3 (environment: DATA_TOOLS_MULTIPART_BYTES)."""

    multipart_bytes: int = 64 << 20
    """Files larger than this go in parts of this size (S3 takes at least 5 MiB a part: smaller is raised to it)."""
    retries: int = 8
    """Transient faults (5xx, throttling, a reset connection) botocore retries per request."""
    timeout_s: float = 60.0
    """A connect or a wait for an answer that stalls longer than this is a transient fault."""
    concurrency: int = 8
    """Requests in flight at once (files and parts)."""

    @classmethod
    def from_env(cls) -> UploadPolicy:
        """The defaults, with DATA_TOOLS_MULTIPART_BYTES (bytes) when set."""
        raw = os.environ.get(MULTIPART_ENV)
        if raw is None:
            return cls()
        if not raw.isdigit() or int(raw) < 1:
            raise StorageError(f"{MULTIPART_ENV}={raw!r} is not a number of bytes; unset it or set e.g. 67108864")
        return cls(multipart_bytes=int(raw))


def _write_client(policy: UploadPolicy):
    """An S3 client for uploads, with botocore's own retries on (the managed transfer retries nothing itself)."""
    import boto3
    from botocore.config import Config

    retries = {"total_max_attempts": policy.retries + 1, "mode": "standard"}  # the first try and the retries
    cfg = Config(connect_timeout=policy.timeout_s, read_timeout=policy.timeout_s, retries=retries)
    return boto3.session.Session().client("s3", config=cfg)


def _s3_refusal(url: str, e: Exception, policy: UploadPolicy) -> StorageError:
    """The one-line error for a failed S3 request about `url` (retries, if any, were botocore's)."""
    fault = s3_fault(e)
    cause = str(fault) if isinstance(fault, StorageError) else f"{fault}; gave up after {policy.retries} retries"
    return StorageError(f"{url}: {cause}")


def check_destination(url: str, policy: UploadPolicy | None = None) -> None:
    """Fail before hours of sharding when S3 refuses `url` (an s3://bucket/prefix/ folder): a bucket that does not
    exist, a key the store does not know, no credentials. One GET of the folder's `_info.json`: absent is fine, and
    so is "access denied" (credentials may be allowed to write but not to read).

    Raises:
        StorageError: the store refused; the message names the URL and the cause.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    policy = policy or UploadPolicy.from_env()
    u = urlparse(join(url, "_info.json"))
    try:
        _write_client(policy).get_object(Bucket=u.netloc, Key=u.path.lstrip("/"), Range="bytes=0-0")
    except (ClientError, BotoCoreError) as e:
        code = e.response.get("Error", {}).get("Code", "") if isinstance(e, ClientError) else ""
        if code in ("NoSuchKey", "AccessDenied", "InvalidRange"):
            return
        raise _s3_refusal(url, e, policy) from None


def upload_files(files: list[tuple[Path, str]], policy: UploadPolicy | None = None) -> None:
    """Upload each local file to its s3:// URL, in parallel, streamed from disk, multipart above the threshold.

    Raises:
        StorageError: a request was refused, or failed beyond its retries (the other uploads are cancelled).
    """
    from boto3.s3.transfer import TransferConfig, create_transfer_manager
    from botocore.exceptions import BotoCoreError, ClientError

    policy = policy or UploadPolicy.from_env()
    for _, url in files:
        if urlparse(url).scheme != "s3":
            raise StorageError(f"cannot upload to {url}: output goes to a local folder or s3://")
    cfg = TransferConfig(
        multipart_threshold=policy.multipart_bytes,
        multipart_chunksize=policy.multipart_bytes,
        max_concurrency=policy.concurrency,
        preferred_transfer_client="classic",
    )
    try:
        client = _write_client(policy)
    except BotoCoreError as e:  # AWS_PROFILE names no profile
        raise _s3_refusal(files[0][1], e, policy) from None
    with create_transfer_manager(client, cfg) as transfers:
        pending = []
        for path, url in files:
            u = urlparse(url)
            pending.append((url, transfers.upload(str(path), u.netloc, u.path.lstrip("/"))))
        for url, future in pending:
            try:
                future.result()
            except (ClientError, BotoCoreError) as e:
                raise _s3_refusal(url, e, policy) from None  # leaving the block cancels the other uploads


def publish(folder: str | os.PathLike, url: str, policy: UploadPolicy | None = None) -> None:
    """Upload a finished shard folder to the s3:// folder `url`: every shard and index it lists, then `_info.json`
    last, so a reader of the URL never finds a description whose shards are not all there.

    Raises:
        StorageError: an upload was refused or failed beyond its retries; `_info.json` is then not uploaded.
    """
    info = fmt.read_info(folder)
    files = []
    for split in info.splits.values():
        for name in split.filenames:
            for f in (name, fmt.index_name(name)):
                if (Path(folder) / f).is_file():
                    files.append((Path(folder) / f, join(url, f)))
    upload_files(files, policy)
    upload_files([(Path(folder) / fmt.INFO, join(url, fmt.INFO))], policy)
