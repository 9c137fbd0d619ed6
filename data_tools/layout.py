"""The writer's output folder beyond the format (see `format.py`): progress files, the skipped list, refusing an OUT
that holds something else, and cleaning up after a killed run.

OUT/
  _info.json, train-000000.tar, ...   the dataset (`format.py`)
  _skipped.txt        one `path<TAB>reason` line per input left out
  _progress/          only while a run is unfinished: plan.json and one marker per finished shard
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from data_tools.errors import DataToolsError
from data_tools.format import INFO

SKIPPED = "_skipped.txt"
PROGRESS = "_progress"
PLAN = "plan.json"


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
