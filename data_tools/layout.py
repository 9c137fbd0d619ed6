"""The output folder's layout: shard names, brace patterns, `_info.json` (timm's reader_wds layout), progress files.

OUT/
  _info.json          {"name", "splits": {"train": {"name", "num_samples", "filenames", "shard_lengths"}, "val": ...},
                       "num_classes", "class_names", "fingerprint", "options", "stats", "skipped"}
  _skipped.txt        one `path<TAB>reason` line per input left out
  train-000000.tar    samples: KEY.jpg|png|webp, KEY.cls, KEY.json
  val-000000.tar
  _progress/          only while a run is unfinished: plan.json and one marker per finished shard
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from data_tools.errors import DataToolsError
from data_tools.fsutil import atomic_write

INFO = "_info.json"
SKIPPED = "_skipped.txt"
PROGRESS = "_progress"
PLAN = "plan.json"
SPLITS = ("train", "val")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def shard_name(split: str, index: int) -> str:
    """File name of shard `index` of `split`, e.g. `train-000003.tar`."""
    return f"{split}-{index:06d}.tar"


def brace_pattern(split: str, count: int) -> str:
    """Brace-expandable pattern naming all `count` shards of `split`, e.g. `train-{000000..000012}.tar`."""
    if count == 1:
        return shard_name(split, 0)
    return f"{split}-{{{0:06d}..{count - 1:06d}}}.tar"


def sample_key(position: int) -> str:
    """Sample key from the sample's position in the global shuffled order: unique across splits and shards."""
    return f"{position:09d}"


def load_info(out: str | os.PathLike) -> dict:
    """Read `OUT/_info.json`.

    Raises:
        DataToolsError: The folder or its `_info.json` is missing or unreadable.
    """
    path = Path(out) / INFO
    if not path.is_file():
        raise DataToolsError(f"'{path}' not found; pass a folder written by `data_tools shard`")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataToolsError(f"'{path}' is not valid JSON ({e}); re-run `data_tools shard` to rewrite it") from e


def write_json(path: Path, obj: dict) -> None:
    """Write `obj` as indented, key-sorted JSON, atomically."""
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def check_out_folder(out: Path, fingerprint: str) -> dict | None:
    """Make sure OUT is new, empty, or holds this very dataset (finished or half-written).

    Returns:
        The existing `_info.json` when OUT already holds the finished dataset, else None.

    Raises:
        DataToolsError: OUT is a file, holds a different dataset, or holds unrelated files.
    """
    if out.exists() and not out.is_dir():
        raise DataToolsError(f"OUT '{out}' is a file; pass a folder (new or empty) for the shards")
    if not out.exists():
        return None
    names = [n for n in os.listdir(out) if not n.startswith(".tmp-")]
    if not names:
        return None
    for marker in (out / INFO, out / PROGRESS / PLAN):
        if marker.is_file():
            try:
                existing = json.loads(marker.read_text())
            except ValueError:
                existing = {}
            if existing.get("fingerprint") != fingerprint:
                raise DataToolsError(
                    f"OUT '{out}' holds a different dataset (other input or options); "
                    "pick a new folder, or delete it to start over"
                )
            return existing if marker.name == INFO else None
    raise DataToolsError(f"OUT '{out}' is not empty and was not written by data_tools; pick a new or empty folder")


def clean_temporaries(out: Path) -> None:
    """Remove `.tmp-*` leftovers of a killed run (half-written shards never got their final name)."""
    for folder in (out, out / PROGRESS):
        if folder.is_dir():
            for name in os.listdir(folder):
                if name.startswith(".tmp-"):
                    p = folder / name
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
