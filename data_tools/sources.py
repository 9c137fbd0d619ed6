"""List the input samples of SRC into a compact catalog: an image folder, a CSV/TSV file list, or per-class tars.

The catalog is streamed to a JSON-lines file on disk; memory holds only three numbers per sample (record offset,
label, size), so listing 14M ImageNet-21k files costs about 20 bytes each, never the images or their paths.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tarfile
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_tools.errors import DataToolsError

LIST_SUFFIXES = (".csv", ".tsv", ".txt")


@dataclass
class Record:
    """One input sample as the catalog stores it."""

    label: int
    """Class index into the catalog's class names."""
    size: int
    """Source bytes (0 when the file could not be stat'ed; the shard step then reports it)."""
    display: str
    """Path shown to users and stored in the sample's json: relative to SRC, or `class.tar/member`."""
    location: str
    """Absolute path of the file (or of the tar holding it)."""
    member_offset: int
    """Byte offset of the member's data inside the tar at `location`; -1 for a plain file."""


@dataclass
class Catalog:
    """Every input sample of SRC, indexed by position in the (sorted, deterministic) listing order."""

    path: Path
    """JSON-lines file holding one `Record` per line."""
    class_names: list[str]
    """Class names; a record's label indexes this list."""
    offsets: np.ndarray
    """int64 [N]: byte offset of each record's line in `path`."""
    labels: np.ndarray
    """int32 [N]: class index of each sample."""
    sizes: np.ndarray
    """int64 [N]: source bytes of each sample (plans shard byte sizes)."""
    digest: str
    """sha256 of (class, relative path, size) of every sample: identifies the input wherever SRC lives."""

    def __len__(self) -> int:
        return len(self.labels)


def read_record(f, offset: int) -> Record:
    """Read the catalog record at byte `offset` of the open (binary) catalog file `f`."""
    f.seek(int(offset))
    return Record(*json.loads(f.readline()))


def read_bytes(rec: Record) -> bytes:
    """Return the raw bytes of a sample, from its file or from its slice of a per-class tar."""
    with open(rec.location, "rb") as f:
        if rec.member_offset < 0:
            return f.read()
        f.seek(rec.member_offset)
        return f.read(rec.size)


def check_src(src: str | os.PathLike) -> Path:
    """Return SRC as a Path; raise DataToolsError when it does not exist."""
    src = Path(src)
    if not src.exists():
        raise DataToolsError(
            f"SRC '{src}' does not exist; pass an image folder, a CSV/TSV file list or a folder of per-class .tar files"
        )
    return src


def build_catalog(src: str | os.PathLike, catalog_path: Path, classes_file: str | os.PathLike | None = None) -> Catalog:
    """List every sample of `src` into `catalog_path`.

    Args:
        src: An image folder (one sub-folder per class), a CSV/TSV file list of `path,label`, or a folder of
            per-class `.tar` files (the ImageNet-21k release layout).
        catalog_path: Where to write the JSON-lines catalog.
        classes_file: Optional text file with one class name per line, fixing the class order. Classes not listed
            are left out; a listed class without samples is an error.

    Raises:
        DataToolsError: SRC is missing or has no recognisable layout, or a class is empty.
    """
    src = check_src(src)
    fixed = _read_classes_file(classes_file) if classes_file else None
    if src.is_file():
        if src.suffix.lower() not in LIST_SUFFIXES:
            raise DataToolsError(f"SRC '{src}' is a file but not a .csv/.tsv/.txt file list of path,label rows")
        class_names = fixed or _list_labels(src)
        entries = _list_file_rows(src, class_names)
    else:
        class_names, entries = _folder_entries(src, fixed)

    offsets, labels, sizes = array("q"), array("i"), array("q")
    digest = hashlib.sha256()
    counts = [0] * len(class_names)
    pos = 0
    with open(catalog_path, "wb") as f:
        for label, size, display, location, member_offset in entries:
            line = (json.dumps([label, size, display, location, member_offset]) + "\n").encode()
            f.write(line)
            offsets.append(pos)
            labels.append(label)
            sizes.append(size)
            counts[label] += 1
            pos += len(line)
            digest.update(f"{class_names[label]}\t{display}\t{size}\n".encode())
    for name, n in zip(class_names, counts, strict=True):
        if n == 0:
            raise DataToolsError(f"class '{name}' has no samples in '{src}'; remove it or add images")
    return Catalog(
        path=catalog_path,
        class_names=class_names,
        offsets=np.frombuffer(offsets, dtype=np.int64).copy(),
        labels=np.frombuffer(labels, dtype=np.int32).copy(),
        sizes=np.frombuffer(sizes, dtype=np.int64).copy(),
        digest=digest.hexdigest(),
    )


def _read_classes_file(path: str | os.PathLike) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise DataToolsError(f"--classes file '{p}' does not exist; pass a text file with one class name per line")
    names = [line.strip() for line in p.read_text().splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    dup = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) != len(names) else []
    if dup:
        raise DataToolsError(f"--classes file '{p}' lists {dup[0]!r} twice; list each class once")
    if not names:
        raise DataToolsError(f"--classes file '{p}' lists no classes; write one class name per line")
    return names


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _folder_entries(src: Path, fixed: list[str] | None) -> tuple[list[str], Iterator[tuple]]:
    """Class names and a lazy entry stream for a folder of class sub-folders or of per-class tars."""
    children = sorted((e for e in os.scandir(src) if _visible(e.name)), key=lambda e: e.name)
    dirs = {e.name: Path(e.path) for e in children if e.is_dir()}
    tars = {e.name[: -len(".tar")]: Path(e.path) for e in children if e.is_file() and e.name.endswith(".tar")}
    if dirs:
        where, kind = dirs, "folder"
    elif tars:
        where, kind = tars, "tar"
    else:
        raise DataToolsError(
            f"SRC '{src}' holds neither class sub-folders nor per-class .tar files; "
            "put each class's images in a sub-folder named after the class"
        )
    class_names = fixed or sorted(where)
    missing = [c for c in class_names if c not in where]
    if missing:
        raise DataToolsError(f"class '{missing[0]}' from --classes has no {kind} in '{src}'; fix the class list")

    def entries() -> Iterator[tuple]:
        for label, name in enumerate(class_names):
            it = _walk_folder(src, where[name]) if kind == "folder" else _walk_tar(where[name])
            for size, display, location, member_offset in it:
                yield label, size, display, location, member_offset

    return class_names, entries()


def _walk_folder(src: Path, folder: Path) -> Iterator[tuple]:
    # os.walk with sorted names: the listing order, hence the catalog and the shards, never depends on the filesystem.
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if _visible(d))
        for name in sorted(files):
            if _visible(name):
                path = os.path.join(root, name)
                yield _stat_size(path), Path(os.path.relpath(path, src)).as_posix(), os.path.abspath(path), -1


def _walk_tar(path: Path) -> Iterator[tuple]:
    try:
        with tarfile.open(path, "r:") as tf:
            members = [m for m in tf if m.isfile() and _visible(os.path.basename(m.name))]
    except (tarfile.TarError, OSError) as e:
        raise DataToolsError(f"cannot read class tar '{path}' ({e}); re-download it or remove it") from e
    for m in sorted(members, key=lambda m: m.name):
        yield m.size, f"{path.name}/{m.name}", os.path.abspath(path), m.offset_data


def _stat_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _rows(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line number, path, label) of each data row of a CSV/TSV list; a `path,label` header row is skipped."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter=delimiter), 1):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2:
                raise DataToolsError(f"{path}:{lineno}: expected 'path{delimiter}label', got {row!r}")
            if lineno == 1 and row[0].strip().lower() == "path" and row[1].strip().lower() == "label":
                continue
            yield lineno, row[0].strip(), row[1].strip()


def _list_labels(path: Path) -> list[str]:
    labels = {label for _, _, label in _rows(path)}
    if not labels:
        raise DataToolsError(f"file list '{path}' has no rows; write one 'path,label' row per image")
    # Numeric labels sort as numbers so "10" follows "9".
    return sorted(labels, key=lambda s: (0, int(s), s) if s.isdigit() else (1, 0, s))


def _list_file_rows(path: Path, class_names: list[str]) -> Iterator[tuple]:
    index = {name: i for i, name in enumerate(class_names)}
    base = path.parent
    for _, rel, label in _rows(path):
        if label not in index:
            continue  # a class left out by --classes
        full = (base / rel) if not os.path.isabs(rel) else Path(rel)
        yield index[label], _stat_size(str(full)), rel, os.path.abspath(full), -1
