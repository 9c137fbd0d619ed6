"""Shard lists: a brace pattern / URL list, a folder of `.tar` files, or a folder with `_info.json` (local, or an
http(s):// / s3:// URL of a folder holding `_info.json`).

Epoch mode needs the number of samples in every shard (so every rank can be given the same number of batches
before reading anything). `_info.json`, written by `data_tools shard`, holds them; a local folder or pattern without
it is counted by reading the tar headers (no sample is decoded); remote shards take their counts from the `_info.json`
at the folder URL (or next to a remote brace pattern), and without one can only be used in resampled mode.
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


def resolve_shards(spec: str, split: str = "train", *, count: bool = True) -> ShardList:
    """Turn a shard specification into a `ShardList`.

    Args:
        spec: a folder holding `_info.json` (the split's `filenames` and `shard_lengths` are used), a folder of
            `.tar` files (`{split}-*.tar` if any, else every `.tar`), the URL of a folder holding `_info.json`
            (`http://host/i21k/train/`, `s3://bucket/prefix/`), or a brace pattern / URL such as
            `/data/train-{000000..000127}.tar`, `s3://bucket/train-{000000..000127}.tar` or
            `pipe:curl -s https://host/train-{000..127}.tar`.
        split: split name in `_info.json` and in shard file names.
        count: count samples of local shards that `_info.json` does not describe (reads tar headers only).

    Raises:
        ShardError: nothing matches, or `_info.json` lacks the split.
    """
    if not spec:
        raise ShardError(f"no shards given for split {split!r}; set data.train_shards / data.val_shards")
    if is_remote(spec) and not spec.endswith(".tar") and "{" not in spec:  # a remote folder
        return _from_info(spec, _remote_info(spec, required=True), split)
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
            info = _remote_info(parent(urls[0]), required=False)
            if info is not None:
                return _match_info(urls, info, split)
    lengths = None
    if count and all(_is_local(u) for u in urls):
        lengths = [count_samples(_strip_file(u)) for u in urls]
    return ShardList(urls, lengths)


def count_samples(path: str) -> int:
    """Samples in a local tar shard: runs of consecutive members sharing a key (reads headers, skips data)."""
    n, last = 0, None
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isreg() or fmt.is_ignored(member.name):  # as read_shard skips them
                continue
            key = fmt.split_name(member.name)[0]
            if key != last:
                n, last = n + 1, key
    return n


def _read_info(folder: Path) -> dict:
    try:
        return fmt.read_info(folder)
    except fmt.FormatError as e:
        raise ShardError(str(e)) from None


def _remote_info(folder: str, required: bool) -> dict | None:
    """`_info.json` of a remote folder; None when it cannot be read and it is not `required`."""
    try:
        return fmt.read_info(folder)
    except fmt.FormatError as e:
        if required:
            raise ShardError(str(e)) from None
        return None


def _split_info(info: dict, split: str, where: Path | str) -> dict:
    splits = info.get("splits", {})
    if split not in splits:
        have = ", ".join(sorted(splits)) or "none"
        raise ShardError(f"{where}/{fmt.INFO} has no split {split!r} (it has: {have}); set data.train_split/val_split")
    return splits[split]


def _from_info(folder: Path | str, info: dict, split: str) -> ShardList:
    s = _split_info(info, split, folder)
    urls = [join(str(folder), f) for f in s["filenames"]]
    lengths = [int(n) for n in s["shard_lengths"]]
    if len(urls) != len(lengths):
        raise ShardError(f"{folder}/{fmt.INFO}: split {split!r} lists {len(urls)} files but {len(lengths)} lengths")
    return ShardList(urls, lengths, *fmt.info_classes(info))


def _match_info(urls: list[str], info: dict, split: str) -> ShardList:
    """Counts for an explicit pattern whose folder holds `_info.json` (any split may describe each file)."""
    known: dict[str, int] = {}
    for s in info.get("splits", {}).values():
        known.update(zip(s.get("filenames", []), s.get("shard_lengths", []), strict=False))
    lengths = [known.get(_strip_file(u).rsplit("/", 1)[-1]) for u in urls]
    if any(n is None for n in lengths) and any(is_remote(u) for u in urls):
        return ShardList(urls, None, *fmt.info_classes(info))  # remote files it does not list: resampled mode only
    if any(n is None for n in lengths):
        lengths = [count_samples(_strip_file(u)) if n is None else n for u, n in zip(urls, lengths, strict=True)]
    return ShardList(urls, [int(n) for n in lengths], *fmt.info_classes(info))


def _is_local(url: str) -> bool:
    return "://" not in url.replace("file://", "", 1) and not url.startswith("pipe:")


def _strip_file(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url
