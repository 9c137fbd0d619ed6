"""THE shard codec: every rule that `data_tools shard` writes, `data_tools verify` checks and `pretrain.data` reads:
the member grouping (`Grouping`), the `.cls` rule, the sample index (`IndexBuilder`) and `_info.json` (`DatasetInfo`).

The public ImageNet WebDataset layout plus timm's `_info.json` (reader_wds):

OUT/
  _info.json          {"name", "splits": {"train": {"name", "num_samples", "filenames", "shard_lengths"}, "val": ...},
                       "num_classes", "class_names", ...writer's own keys: "fingerprint", "options", "stats", "skipped"}
  train-000000.tar    samples: consecutive members sharing a key (`Grouping`): KEY.<image ext>, KEY.cls, KEY.json
  train-000000.tar.idx  the shard's sample index: byte offset of each sample's first header (random access, resume)
  val-000000.tar

Shards made elsewhere in this layout work too; this module imports nothing beyond the standard library and
`data_tools`' own small helpers, so the reader can use it without pulling in the writer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from data_tools import storage
from data_tools.errors import DataToolsError
from data_tools.fsutil import atomic_write

INFO = "_info.json"
"""The dataset description next to the shards."""

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
"""Member extensions read as the sample's image; when a sample has several, the first in this order wins."""
STORED_EXTS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
"""Formats the writer stores unchanged, as every WebDataset/timm reader decodes them (Pillow format -> member
extension); any other image is re-encoded as `jpg`."""
REENCODED_EXT = "jpg"
"""Member extension of an image the writer re-encoded (RGB JPEG)."""
LABEL_EXT = "cls"
META_EXT = "json"
SAMPLE_EXTS = frozenset((*IMAGE_EXTS, LABEL_EXT, META_EXT))
"""The only members a reader opens; every other one (e.g. a pickled `.pyd`) is skipped unread."""


class FormatError(DataToolsError):
    """A dataset description that cannot be used; the message names the file and the fix."""


class LabelError(ValueError):
    """A `.cls` member that holds no valid label; the message says why (e.g. `.cls is not an integer label`)."""


# ----------------------------------------------------------------------------------------------- samples


def split_name(name: str) -> tuple[str, str]:
    """(key, lower-case extension) of a member name.

    webdataset's rule: the key is the path up to the first dot of the last component, the extension the rest
    (`a/b.seg.png` -> (`a/b`, `seg.png`)); a name without a dot has an empty extension.
    """
    head, _, tail = name.rpartition("/")
    stem, _, ext = tail.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def has_key_form(name: str) -> bool:
    """True when the member's base name is KEY.EXT with a non-empty KEY (what a sample member looks like)."""
    stem, dot, _ = name.rpartition("/")[2].partition(".")
    return bool(stem and dot)


def is_reserved(name: str) -> bool:
    """True for base names starting with `__` (e.g. `__index__`): members of the tar, not of any sample."""
    return name.rpartition("/")[2].startswith("__")


def is_ignored(name: str) -> bool:
    """True for members that belong to no sample: reserved names, and names without the KEY.EXT form (webdataset
    skips them too; `verify` reports them)."""
    return is_reserved(name) or not has_key_form(name)


class Grouping:
    """THE rule that groups a tar's regular members into samples, used by every reader and writer of shards (the
    stream, `count_samples`, the sample index, `verify`): members in tar order, ignored ones (`is_ignored`) left
    out, a new sample wherever the key (`split_name`) changes. Feed it each regular member's name in order."""

    def __init__(self) -> None:
        self.index, self.key = -1, None

    def place(self, name: str) -> tuple[int, str] | None:
        """(sample index, lower-case extension) of the next member, or None when it belongs to no sample."""
        if is_ignored(name):
            return None
        key, ext = split_name(name)
        if key != self.key:
            self.index, self.key = self.index + 1, key
        return self.index, ext


def sample_key(position: int) -> str:
    """Key of the sample at `position` of the writer's global shuffled order: unique across splits and shards."""
    return f"{position:09d}"


def image_ext(members: Mapping[str, object]) -> str | None:
    """The extension of the sample's image among its members (by lower-case extension), or None when it has none."""
    return next((ext for ext in IMAGE_EXTS if ext in members), None)


def parse_cls(raw: bytes) -> list[int]:
    """The label(s) of a `.cls` member: ASCII integers, several separated by commas or spaces (`3`, `3,7`).

    The one label rule: the stream reads `.cls` with it, `verify` checks with it (and `check_label_range`).

    Raises:
        LabelError: not ASCII integers, no label at all, or a negative one.
    """
    try:
        labels = [int(t) for t in raw.decode("ascii").replace(",", " ").split()]
    except (UnicodeDecodeError, ValueError):
        raise LabelError(".cls is not an integer label") from None
    if not labels or min(labels) < 0:
        raise LabelError(".cls holds no valid label")
    return labels


def check_label_range(labels: Sequence[int], num_classes: int | None) -> None:
    """The class-count half of the label rule: every label of `parse_cls` below `num_classes`.

    None (shards made elsewhere often carry no class list) accepts every label `parse_cls` accepts, as the stream
    does.

    Raises:
        LabelError: a label >= `num_classes`.
    """
    if num_classes is not None and max(labels) >= num_classes:
        raise LabelError(f".cls {max(labels)} not in [0, {num_classes})")


def cls_bytes(labels: int | Sequence[int]) -> bytes:
    """A `.cls` member: one label as `7`, several as `3,7`."""
    if isinstance(labels, Sequence):
        return ",".join(str(x) for x in labels).encode()
    return str(labels).encode()


def parse_json(raw: bytes) -> dict:
    """A `.json` member as a dict (a JSON value that is not an object gives {}).

    Raises:
        ValueError: the bytes are not JSON.
    """
    meta = json.loads(raw)
    return meta if isinstance(meta, dict) else {}


def json_bytes(meta: dict) -> bytes:
    """A `.json` member: compact, key-sorted (the writer's metadata: class, path, width, height)."""
    return json.dumps(meta, sort_keys=True).encode()


# ----------------------------------------------------------------------------------------------- shards


def shard_name(split: str, index: int) -> str:
    """File name of shard `index` of `split`, e.g. `train-000003.tar`."""
    return f"{split}-{index:06d}.tar"


def shard_glob(split: str) -> str:
    """Glob matching the shard files of `split` in a folder."""
    return f"{split}-*.tar"


def brace_pattern(split: str, count: int) -> str:
    """Brace-expandable pattern naming all `count` shards of `split`, e.g. `train-{000000..000012}.tar`."""
    if count == 1:
        return shard_name(split, 0)
    return f"{split}-{{{0:06d}..{count - 1:06d}}}.tar"


INDEX_SUFFIX = ".idx"
"""A shard's sample index is the file `<shard name>.idx` next to it."""
INDEX_MAGIC = b"WDSIDX1\n"
"""First bytes of an index; then n + 1 little-endian uint64: where sample i starts, and where the last one ends."""


def index_name(shard: str) -> str:
    """Name (or URL) of the sample index of `shard`, e.g. `train-000003.tar.idx`."""
    return shard + INDEX_SUFFIX


def index_bytes(offsets: Sequence[int]) -> bytes:
    """An index file: the magic, then `offsets` (n samples' starts and the end of the last) as uint64."""
    return INDEX_MAGIC + struct.pack(f"<{len(offsets)}Q", *offsets)


def parse_index(raw: bytes) -> list[int]:
    """The offsets of an index file.

    Raises:
        FormatError: not an index (wrong magic or length, offsets out of order).
    """
    body = raw[len(INDEX_MAGIC) :]
    if not raw.startswith(INDEX_MAGIC) or len(body) % 8 or not body:
        raise FormatError("not a shard index (bad magic or length); re-run `data_tools shard`")
    offsets = list(struct.unpack(f"<{len(body) // 8}Q", body))
    if any(b < a for a, b in zip(offsets, offsets[1:], strict=False)):
        raise FormatError("shard index offsets are not increasing; re-run `data_tools shard`")
    return offsets


class IndexBuilder:
    """The sample index of a tar read member by member (`add` each header in order, then `offsets`), its samples
    grouped by `Grouping`. `verify` checks a shard's `.idx` with it; the writer records the same offsets as it
    writes (`data_tools.shard`)."""

    def __init__(self) -> None:
        self.grouping, self.starts, self.end = Grouping(), [], 0

    def add(self, member: tarfile.TarInfo) -> tuple[int, str] | None:
        """Account for the next member header of the tar; returns its `Grouping.place`."""
        placed = self.grouping.place(member.name) if member.isreg() else None
        if placed is not None:
            if placed[0] == len(self.starts):
                self.starts.append(member.offset)
            self.end = member.offset_data + -(-member.size // 512) * 512
        return placed

    def offsets(self) -> list[int]:
        """Where each sample starts, then where the last one ends (the index file's numbers)."""
        return self.starts + [self.end]


def scan_index(fileobj) -> list[int]:
    """The index of a tar read as a stream: where each sample (a run of members sharing a key) starts."""
    index = IndexBuilder()
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for member in tar:
            index.add(member)
            tar.members = []  # tarfile keeps every header otherwise
    return index.offsets()


# ----------------------------------------------------------------------------------------------- _info.json


@dataclass(frozen=True)
class SplitInfo:
    """One split of `_info.json` (timm's keys), as stored: `verify` reports what does not add up, readers refuse."""

    name: str
    filenames: tuple[str, ...]
    """Shard files, relative to the folder, in their canonical order."""
    shard_lengths: tuple[int, ...] | None
    """Samples per shard; None when not given (shards made elsewhere)."""
    num_samples: int | None
    """The split's sample count as stored (the writer's: the sum of `shard_lengths`)."""

    @classmethod
    def of(cls, split: str, lengths: Sequence[int]) -> SplitInfo:
        """The writer's split: shard i is `shard_name(split, i)` and holds `lengths[i]` samples."""
        names = tuple(shard_name(split, i) for i in range(len(lengths)))
        return cls(split, names, tuple(lengths), sum(lengths))


@dataclass(frozen=True)
class DatasetInfo:
    """`_info.json`: the splits, the class list, and the writer's own keys (`extra`: fingerprint, options, stats,
    skipped), kept as they are."""

    name: str | None
    splits: dict[str, SplitInfo]
    class_names: tuple[str, ...] = ()
    """Index = label; empty when unknown (shards made elsewhere)."""
    stored_num_classes: int | None = None
    """`num_classes` as stored (None when absent)."""
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int | None:
        """The class count: as stored, else the length of the class list, else None."""
        return self.stored_num_classes if self.stored_num_classes is not None else (len(self.class_names) or None)

    def split(self, name: str, where: str) -> SplitInfo:
        """Split `name`, or FormatError naming the ones there are (`where`: the folder, for the message)."""
        if name not in self.splits:
            have = ", ".join(sorted(self.splits)) or "none"
            raise FormatError(f"{where}/{INFO} has no split {name!r} (it has: {have}); set data.train_split/val_split")
        return self.splits[name]

    def to_dict(self) -> dict:
        splits = {k: dataclasses.asdict(v) for k, v in self.splits.items()}
        core = {"name": self.name, "splits": splits, "num_classes": self.num_classes, "class_names": self.class_names}
        return json.loads(json.dumps({**core, **self.extra}))  # tuples as lists

    @classmethod
    def from_dict(cls, d: dict, where: str) -> DatasetInfo:
        """The description a parsed `_info.json` holds; FormatError when it is not one (names `where`)."""
        if not isinstance(d, dict) or not isinstance(d.get("splits", {}), dict):
            raise FormatError(f"'{where}' is not a dataset description (no splits object); re-run `data_tools shard`")
        try:
            splits = {
                k: SplitInfo(
                    s.get("name", k),
                    tuple(s["filenames"]),
                    None if s.get("shard_lengths") is None else tuple(int(n) for n in s["shard_lengths"]),
                    s.get("num_samples"),
                )
                for k, s in d.get("splits", {}).items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FormatError(f"'{where}': a split lacks its filenames or has bad shard_lengths ({e!r})") from None
        extra = {k: v for k, v in d.items() if k not in ("name", "splits", "num_classes", "class_names")}
        names = tuple(str(n) for n in d.get("class_names") or ())
        return cls(d.get("name"), splits, names, d.get("num_classes"), extra)


def make_info(
    name: str, class_names: Sequence[str], splits: Mapping[str, Sequence[int]], **extra: object
) -> DatasetInfo:
    """The writer's `_info.json`: name, splits (split -> samples per shard), the class list, then `extra` keys."""
    parts = {split: SplitInfo.of(split, lengths) for split, lengths in splits.items()}
    return DatasetInfo(name, parts, tuple(class_names), len(class_names), dict(extra))


def read_info(folder: str | os.PathLike) -> DatasetInfo:
    """Read `folder/_info.json` (a local folder, or an http(s):// / s3:// folder URL).

    Raises:
        FormatError: the file is missing or unreadable, is not JSON, or is not a dataset description.
    """
    if storage.is_remote(str(folder)):
        url = storage.join(str(folder), INFO)
        try:
            return parse_info(storage.read_bytes(url), url)
        except storage.StorageError as e:
            raise FormatError(
                f"'{url}' cannot be read ({e}); pass the URL of a folder written by `data_tools shard`"
            ) from None
    path = Path(folder) / INFO
    if not path.is_file():
        raise FormatError(f"'{path}' not found; pass a folder written by `data_tools shard`")
    try:
        return parse_info(path.read_bytes(), str(path))
    except OSError as e:
        raise FormatError(f"'{path}' cannot be read ({e})") from e


def parse_info(raw: bytes, where: str) -> DatasetInfo:
    """An `_info.json` from its bytes (`where` names it in errors: a path or URL).

    Raises:
        FormatError: not JSON, or not a dataset description.
    """
    try:
        info = json.loads(raw)
    except ValueError as e:
        raise FormatError(f"'{where}' is not valid JSON ({e}); re-run `data_tools shard` to rewrite it") from e
    return DatasetInfo.from_dict(info, where)


def write_json(path: str | os.PathLike, obj: dict) -> None:
    """Write `obj` as indented, key-sorted JSON, atomically (the style of `_info.json` and the writer's markers)."""
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def write_info(folder: str | os.PathLike, info: DatasetInfo) -> None:
    """Write `folder/_info.json` atomically: a reader never sees a half-written description."""
    write_json(Path(folder) / INFO, info.to_dict())
