"""Shard lists: a brace pattern / URL list, a folder of `.tar` files, or a folder with `_info.json` (local, or an
http(s):// / s3:// URL of a folder holding `_info.json`).

The training order needs the number of samples in every shard (in epoch and resampled mode, before reading
anything). `_info.json`, written by `data_tools shard`, holds them; a local folder or pattern without it is counted
by reading the tar headers (no sample is decoded); remote shards take their counts from the `_info.json` at the
folder URL (or next to a remote brace pattern), and without one cannot be streamed.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand

from data_tools import format as fmt
from data_tools.storage import is_remote, join, parent


class ShardError(ValueError):
    """The shard specification cannot be resolved; the message names the problem and the fix."""


@dataclass
class ShardList:
    urls: list[str]
    """Shard paths or URLs, in their canonical (sorted / listed) order."""
    lengths: list[int] | None
    """Samples per shard, or None when unknown (remote shards without `_info.json`)."""
    class_names: list[str] = field(default_factory=list)
    """Class names from `_info.json` (index = label); empty when unknown."""
    num_classes: int | None = None
    """Number of classes from `_info.json`, or None when unknown."""

    @property
    def num_samples(self) -> int | None:
        """Total samples, or None when the counts are unknown."""
        return None if self.lengths is None else sum(self.lengths)

    def counted(self) -> tuple[int, ...]:
        """The samples per shard; ShardError (one line) when they are unknown."""
        if self.lengths is None:
            raise ShardError(
                "the stream needs per-shard sample counts (in epoch and resampled mode alike): point the shards at "
                "a folder with _info.json (`data_tools shard` writes it), or use local shards (counted from their "
                "tar headers)"
            )
        return tuple(self.lengths)


def resolve_shards(spec: str, split: str = "train") -> ShardList:
    """Turn a shard specification into a `ShardList`.

    Args:
        spec: a folder holding `_info.json` (the split's `filenames` and `shard_lengths` are used), a folder of
            `.tar` files (`{split}-*.tar` if any, else every `.tar`), the URL of a folder holding `_info.json`
            (`http://host/i21k/train/`, `s3://bucket/prefix/`), or a brace pattern / URL such as
            `/data/train-{000000..000127}.tar`, `s3://bucket/train-{000000..000127}.tar` or
            `pipe:curl -s https://host/train-{000..127}.tar`.
        split: split name in `_info.json` and in shard file names.

    Raises:
        ShardError: nothing matches, or `_info.json` lacks the split.
    """
    if not spec:
        raise ShardError(f"no shards given for split {split!r}; set data.train_shards / data.val_shards")
    if is_remote(spec) and not spec.endswith(".tar") and "{" not in spec:  # a remote folder
        return _from_info(spec, _read_info(spec), split)
    path = Path(spec)
    if path.is_dir():
        if (path / fmt.INFO).is_file():
            return _from_info(path, _read_info(path), split)
        tars = sorted(path.glob(fmt.shard_glob(split))) or sorted(path.glob("*.tar"))
        if not tars:
            raise ShardError(f"{path} holds neither _info.json nor .tar files; run `python -m data_tools shard` first")
        urls = [str(t) for t in tars]
    else:
        urls = list(braceexpand.braceexpand(spec))
        local = [u for u in urls if _is_local(u)]
        if local and len(local) == len(urls):
            missing = [u for u in urls if not Path(_strip_file(u)).is_file()]
            if missing:
                raise ShardError(f"shard {missing[0]} does not exist ({len(missing)} of {len(urls)} missing)")
            folder = Path(_strip_file(urls[0])).parent
            if (folder / fmt.INFO).is_file():
                return _match_info(urls, _read_info(folder), split)
        elif all(is_remote(u) for u in urls):
            info = _read_info(parent(urls[0]), required=False)
            if info is not None:
                return _match_info(urls, info, split)
    lengths = None
    if all(_is_local(u) for u in urls):  # counted from the tar headers
        lengths = [count_samples(_strip_file(u)) for u in urls]
    return ShardList(urls, lengths)


def count_samples(path: str) -> int:
    """Samples in a local tar shard, grouped as the stream groups them (reads headers, skips data)."""
    grouping = fmt.Grouping()
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isreg():
                grouping.place(member.name)
    return grouping.index + 1


def _read_info(folder: Path | str, required: bool = True) -> fmt.DatasetInfo | None:
    """`_info.json` of a folder (local or remote); None when it cannot be read and it is not `required`."""
    try:
        return fmt.read_info(folder)
    except fmt.FormatError as e:
        if required:
            raise ShardError(str(e)) from None
        return None


def _from_info(folder: Path | str, info: fmt.DatasetInfo, split: str) -> ShardList:
    try:
        s = info.split(split, str(folder))
    except fmt.FormatError as e:
        raise ShardError(str(e)) from None
    urls, lengths = [join(str(folder), f) for f in s.filenames], list(s.shard_lengths or ())
    if len(urls) != len(lengths):
        raise ShardError(f"{folder}/{fmt.INFO}: split {split!r} lists {len(urls)} files but {len(lengths)} lengths")
    return ShardList(urls, lengths, list(info.class_names), info.num_classes)


def _match_info(urls: list[str], info: fmt.DatasetInfo, split: str) -> ShardList:
    """Counts for an explicit pattern whose folder holds `_info.json` (any split may describe each file)."""
    known: dict[str, int] = {}
    for s in info.splits.values():
        known.update(zip(s.filenames, s.shard_lengths or (), strict=False))
    lengths = [known.get(_strip_file(u).rsplit("/", 1)[-1]) for u in urls]
    classes = (list(info.class_names), info.num_classes)
    if any(n is None for n in lengths) and any(is_remote(u) for u in urls):
        return ShardList(urls, None, *classes)  # remote files it does not list: no counts (refused by the stream)
    if any(n is None for n in lengths):
        lengths = [count_samples(_strip_file(u)) if n is None else n for u, n in zip(urls, lengths, strict=True)]
    return ShardList(urls, lengths, *classes)


def _is_local(url: str) -> bool:
    return "://" not in url.replace("file://", "", 1) and not url.startswith("pipe:")


def _strip_file(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url
