"""`verify OUT`: decode every sample of every shard and check labels, keys and counts against `_info.json`.

Works on any shards in the public ImageNet WebDataset layout (KEY.jpg/png/webp + KEY.cls [+ KEY.json]) whose
`_info.json` follows timm's reader_wds layout; the class-name check runs when `class_names` is present.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_tools import layout
from data_tools.parallel import default_workers, run_tasks

# webdataset's rule (tariterators.base_plus_ext): the key is the path up to the first dot of the base name.
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


@dataclass(frozen=True)
class _Context:
    out: Path
    num_classes: int
    class_names: tuple[str, ...] | None


_CTX: _Context | None = None


def _init(ctx: _Context) -> None:
    global _CTX
    _CTX = ctx


def verify(out: str | os.PathLike, *, workers: int | None = None, progress: bool = True) -> dict:
    """Check every shard listed in `OUT/_info.json`.

    Returns:
        {"ok": bool, "samples": decoded samples, "shards": shards read, "problems": ["shard: key: what", ...]}.

    Raises:
        DataToolsError: OUT has no readable `_info.json`.
    """
    out = Path(out)
    info = layout.load_info(out)
    names = info.get("class_names")
    num_classes = int(info.get("num_classes") or (len(names) if names else 0))
    ctx = _Context(out, num_classes, tuple(names) if names else None)
    problems: list[str] = []
    if names is not None and len(names) != num_classes:
        problems.append(f"{layout.INFO}: num_classes is {num_classes} but class_names lists {len(names)}")

    tasks, listed = [], set()
    for split, s in info.get("splits", {}).items():
        lengths = list(s.get("shard_lengths") or [None] * len(s["filenames"]))
        if len(lengths) != len(s["filenames"]):
            problems.append(
                f"{layout.INFO}: split {split} lists {len(s['filenames'])} files but {len(lengths)} lengths"
            )
            lengths = [None] * len(s["filenames"])
        if sum(x or 0 for x in lengths) != s.get("num_samples") and None not in lengths:
            problems.append(f"{layout.INFO}: split {split} num_samples {s.get('num_samples')} != sum of shard_lengths")
        tasks += [(f, n) for f, n in zip(s["filenames"], lengths, strict=True)]
        listed.update(s["filenames"])
    for f in sorted(os.listdir(out)):
        if f.endswith(".tar") and f not in listed:
            problems.append(f"{f}: shard file not listed in {layout.INFO}")

    samples, hashes, owners, done_files = 0, [], [], []
    with tqdm(total=len(tasks), unit="shard", desc=f"verify {out.name}", disable=not progress) as bar:
        for i, result in enumerate(run_tasks(_verify_shard, tasks, workers or default_workers(), _init, (ctx,))):
            samples += result["count"]
            problems += result["problems"]
            hashes.append(result["key_hashes"])
            done_files.append(result["file"])
            owners.append(np.full(len(result["key_hashes"]), i, dtype=np.int64))
            bar.update(1)
            bar.set_postfix(samples=samples, problems=len(problems))
    problems += _duplicate_keys(hashes, owners, done_files)
    return {"ok": not problems, "samples": samples, "shards": len(tasks), "problems": problems}


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
    path = ctx.out / filename
    if not path.is_file():
        return {"file": filename, "count": 0, "problems": [f"{filename}: missing"], "key_hashes": np.zeros(0, np.int64)}
    try:
        with tarfile.open(path, "r|") as tf:
            sample: dict[str, bytes] = {}
            key = None
            for member in tf:
                if not member.isfile():
                    continue
                m = _KEY_RE.match(member.name)
                if not m:
                    problems.append(f"{filename}: {member.name}: member name has no KEY.EXT form")
                    continue
                if m.group(1) != key:
                    if key is not None:
                        problems += _check_sample(filename, key, sample)
                        keys.append(key)
                    key, sample = m.group(1), {}
                sample[m.group(2)] = tf.extractfile(member).read()
            if key is not None:
                problems += _check_sample(filename, key, sample)
                keys.append(key)
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{filename}: unreadable tar after {len(keys)} samples ({type(e).__name__}: {e})")
    if len(set(keys)) != len(keys):
        problems.append(f"{filename}: {len(keys) - len(set(keys))} keys appear twice in this shard")
    if expected is not None and len(keys) != expected:
        problems.append(f"{filename}: holds {len(keys)} samples, {layout.INFO} says {expected}")
    hashes = np.array([_key_hash(k) for k in set(keys)], dtype=np.int64)
    return {"file": filename, "count": len(keys), "problems": problems, "key_hashes": hashes}


def _check_sample(filename: str, key: str, sample: dict[str, bytes]) -> list[str]:
    where = f"{filename}: {key}"
    ctx = _CTX
    problems = []
    image_keys = [k for k in layout.IMAGE_KEYS if k in sample]
    if not image_keys:
        problems.append(f"{where}: no image (has {sorted(sample)})")
    else:
        try:
            Image.open(io.BytesIO(sample[image_keys[0]])).load()
        except Exception as e:  # PIL raises many exception types for bad data
            problems.append(f"{where}: .{image_keys[0]} does not decode ({type(e).__name__}: {e})")
    label = None
    if "cls" not in sample:
        problems.append(f"{where}: no .cls")
    else:
        try:
            label = int(sample["cls"].decode().strip())
        except (ValueError, UnicodeDecodeError):
            problems.append(f"{where}: .cls {sample['cls'][:20]!r} is not an integer")
        if label is not None and not 0 <= label < ctx.num_classes:
            problems.append(f"{where}: .cls {label} not in [0, {ctx.num_classes})")
            label = None
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            problems.append(f"{where}: .json does not parse")
            meta = {}
        name = meta.get("class") if isinstance(meta, dict) else None
        if ctx.class_names and label is not None and name is not None and name != ctx.class_names[label]:
            problems.append(f"{where}: .json class {name!r} but .cls {label} is {ctx.class_names[label]!r}")
    return problems
