"""`verify OUT`: decode every sample of every shard and check labels, keys and counts against `_info.json`.

Works on any shards in the format of `format.py` (the public ImageNet WebDataset layout, KEY.<image> + KEY.cls
[+ KEY.json], with timm's `_info.json`). Member names, image extensions and the `.cls` rule (multi-label `3,7`
included) are the training stream's, from that one module; images are decoded by the stream's own decoder
(`data_tools.decode`). Labels are checked against the class count (`--num-classes`, else `_info.json`'s) when there
is one, else only as the stream reads them (non-negative integers); the label range seen is reported either way. The
class-name check runs when `class_names` is present.
A shard's sample index (`<shard>.idx`, byte offsets for random access) is optional; where there is one, it must match
the shard, because a resume over HTTP or S3 seeks by it.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_tools import format as fmt
from data_tools import storage
from data_tools.decode import BadImage, decode_rgb
from data_tools.parallel import default_workers, run_tasks


@dataclass(frozen=True)
class _Context:
    out: Path | str
    num_classes: int | None
    class_names: tuple[str, ...] | None


_CTX: _Context | None = None


def _init(ctx: _Context) -> None:
    global _CTX
    _CTX = ctx


def verify(
    out: str | os.PathLike, *, workers: int | None = None, progress: bool = True, num_classes: int | None = None
) -> dict:
    """Check every shard listed in `OUT/_info.json`.

    Args:
        out: the shard folder (or its URL).
        workers: processes (default: all cores).
        progress: show a progress bar.
        num_classes: labels must be below it; None takes the class count of `_info.json`, and where that has none
            any non-negative label passes (the stream's rule).

    Returns:
        {"ok": bool, "samples": decoded samples, "shards": shards read, "indexes": sample indexes (`.idx`) checked
        against their shard, "labels": [lowest, highest] label seen (None without any), "num_classes": the class
        count checked against (None: none known), "problems": ["shard: key: what", ...]}.

    Raises:
        DataToolsError: OUT has no readable `_info.json`.
    """
    remote = storage.is_remote(str(out))
    out = str(out).rstrip("/") if remote else Path(out)
    info = fmt.read_info(out)
    names, info_count = info.class_names, info.num_classes
    limit = num_classes if num_classes is not None else info_count
    ctx = _Context(out, limit, names or None)
    problems: list[str] = []
    if names and info_count and len(names) != info_count:
        problems.append(f"{fmt.INFO}: num_classes is {info_count} but class_names lists {len(names)}")

    tasks, listed = [], set()
    for split, s in info.splits.items():
        lengths = list(s.shard_lengths or [None] * len(s.filenames))
        if len(lengths) != len(s.filenames):
            problems.append(f"{fmt.INFO}: split {split} lists {len(s.filenames)} files but {len(lengths)} lengths")
            lengths = [None] * len(s.filenames)
        if sum(x or 0 for x in lengths) != s.num_samples and None not in lengths:
            problems.append(f"{fmt.INFO}: split {split} num_samples {s.num_samples} != sum of shard_lengths")
        tasks += [(f, n) for f, n in zip(s.filenames, lengths, strict=True)]
        listed.update(s.filenames)
    for f in [] if remote else sorted(os.listdir(out)):  # object stores are not listed
        if f.endswith(".tar") and f not in listed:
            problems.append(f"{f}: shard file not listed in {fmt.INFO}")

    samples, hashes, owners, done_files, indexes, seen = 0, [], [], [], 0, []
    desc = f"verify {str(out).rsplit('/', 1)[-1]}"
    with tqdm(total=len(tasks), unit="shard", desc=desc, disable=not progress) as bar:
        for i, result in enumerate(run_tasks(_verify_shard, tasks, workers or default_workers(), _init, (ctx,))):
            samples += result["count"]
            indexes += result["index"]
            seen += result["labels"]  # each shard's lowest and highest
            problems += result["problems"]
            hashes.append(result["key_hashes"])
            done_files.append(result["file"])
            owners.append(np.full(len(result["key_hashes"]), i, dtype=np.int64))
            bar.update(1)
            bar.set_postfix(samples=samples, problems=len(problems))
    problems += _duplicate_keys(hashes, owners, done_files)
    labels = [min(seen), max(seen)] if seen else None
    return {
        "ok": not problems,
        "samples": samples,
        "shards": len(tasks),
        "indexes": indexes,
        "labels": labels,
        "num_classes": limit,
        "problems": problems,
    }


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little", signed=True)


def _duplicate_keys(hashes: list, owners: list, files: list[str]) -> list[str]:
    """Shards sharing keys with another shard; `owners[i]` indexes `files` (within-shard duplicates: shard check)."""
    if not hashes:
        return []
    h, o = np.concatenate(hashes), np.concatenate(owners)
    values, counts = np.unique(h, return_counts=True)
    dup = set(values[counts > 1].tolist())
    if not dup:
        return []
    problems = []
    shards = sorted(set(o[np.isin(h, list(dup))].tolist()))
    for i in shards:
        problems.append(f"{files[i]}: holds keys that also appear in another shard (duplicated samples)")
    return problems


def _verify_shard(task: tuple[str, int | None]) -> dict:
    filename, expected = task
    ctx = _CTX
    problems: list[str] = []
    keys: list[str] = []
    path = storage.join(str(ctx.out), filename)
    if not storage.is_remote(path) and not Path(path).is_file():
        missing = [f"{filename}: missing"]
        empty = np.zeros(0, np.int64)
        return {"file": filename, "count": 0, "problems": missing, "key_hashes": empty, "index": False, "labels": []}
    index, read_whole = fmt.IndexBuilder(), False  # it groups the members into samples as the stream does
    seen: list[int] = []  # the lowest and highest label of the shard
    try:
        with storage.open_stream(path) as f, tarfile.open(fileobj=f, mode="r|") as tf:
            sample: dict[str, bytes] = {}
            at, key = None, ""
            for member in tf:
                placed = index.add(member)
                if placed is None and member.isfile() and not fmt.is_reserved(member.name):
                    problems.append(f"{filename}: {member.name}: member name has no KEY.EXT form")
                if placed is None:
                    continue
                if placed[0] != at:  # the member starts the next sample
                    if at is not None:
                        problems += _check_sample(filename, key, sample, seen)
                        keys.append(key)
                    at, key, sample = placed[0], index.grouping.key, {}
                sample[placed[1]] = tf.extractfile(member).read()
            if at is not None:
                problems += _check_sample(filename, key, sample, seen)
                keys.append(key)
        read_whole = True
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{filename}: unreadable tar after {len(keys)} samples ({type(e).__name__}: {e})")
    if len(set(keys)) != len(keys):
        problems.append(f"{filename}: {len(keys) - len(set(keys))} keys appear twice in this shard")
    if expected is not None and len(keys) != expected:
        problems.append(f"{filename}: holds {len(keys)} samples, {fmt.INFO} says {expected}")
    checked = read_whole and _check_index(path, filename, index.offsets(), problems)
    hashes = np.array([_key_hash(k) for k in set(keys)], dtype=np.int64)
    return {
        "file": filename,
        "count": len(keys),
        "problems": problems,
        "key_hashes": hashes,
        "index": checked,
        "labels": seen,
    }


def _check_index(path: str, filename: str, offsets: list[int], problems: list[str]) -> bool:
    """Compare the shard's sample index (`<shard>.idx`, if it has one) with the offsets just read; False if none.

    A stale index would make a resume over HTTP or S3 start its reads at the wrong samples.
    """
    name = fmt.index_name(filename)
    try:
        raw = storage.read_bytes(fmt.index_name(path))
    except (FileNotFoundError, storage.StorageError):
        return False  # optional: the stream reads a shard without one from its start
    try:
        stored = fmt.parse_index(raw)
    except fmt.FormatError as e:
        problems.append(f"{name}: {e}")
        return True
    if stored != offsets:
        first = next((i for i, (a, b) in enumerate(zip(stored, offsets, strict=False)) if a != b), None)
        where = f"differs from sample {first} on" if first is not None else "has another length"
        problems.append(
            f"{name}: does not match its shard ({len(stored) - 1} samples indexed, {len(offsets) - 1} read; "
            f"{where}); re-run `data_tools shard`"
        )
    return True


def _check_sample(filename: str, key: str, sample: dict[str, bytes], seen: list[int]) -> list[str]:
    """Problems of one sample (members by lower-case extension): its image, its `.cls` and its `.json`.

    `seen` (the lowest and highest label so far, or empty) takes in the sample's labels.
    """
    where = f"{filename}: {key}"
    problems = []
    ext = fmt.image_ext(sample)
    if ext is None:
        problems.append(f"{where}: no image (has {sorted(sample)})")
    else:
        try:
            decode_rgb(sample[ext])  # the stream's decoder: what passes here, the stream reads
        except BadImage as e:
            problems.append(f"{where}: .{ext} does not decode ({e})")
    labels = _check_labels(where, sample.get(fmt.LABEL_EXT), problems, seen)
    if fmt.META_EXT in sample:
        try:
            name = fmt.parse_json(sample[fmt.META_EXT]).get("class")
        except ValueError:
            problems.append(f"{where}: .json does not parse")
            name = None
        names = _CTX.class_names
        # The class-name check needs one label: a multi-label sample's .json names no single class.
        if names and labels and len(labels) == 1 and labels[0] < len(names) and name not in (None, names[labels[0]]):
            problems.append(f"{where}: .json class {name!r} but .cls {labels[0]} is {names[labels[0]]!r}")
    return problems


def _check_labels(where: str, raw: bytes | None, problems: list[str], seen: list[int]) -> list[int] | None:
    """The sample's labels when `.cls` holds valid ones (the format's rule, and below the class count when one is
    known), else None (problems appended). Every parsed label, in range or not, widens `seen`."""
    if raw is None:
        problems.append(f"{where}: no .cls")
        return None
    try:
        labels = fmt.parse_cls(raw)
    except fmt.LabelError as e:
        problems.append(f"{where}: {e} ({raw[:20]!r})")
        return None
    lo, hi = min(labels), max(labels)
    seen[:] = [min(seen[0], lo), max(seen[1], hi)] if seen else [lo, hi]
    try:
        fmt.check_label_range(labels, _CTX.num_classes)
    except fmt.LabelError as e:
        problems.append(f"{where}: {e}")
        return None
    return labels
