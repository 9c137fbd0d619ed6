"""`info OUT`: samples per split, shards, bytes, classes and the image size distribution, from `_info.json`."""

from __future__ import annotations

import os
from pathlib import Path

from data_tools import format as fmt
from data_tools import storage
from data_tools.images import bucket_labels


def describe(out: str | os.PathLike) -> dict:
    """Everything `info` prints, as a dict (bytes measured on disk or storage; statistics from `_info.json`).

    OUT is a local folder or the URL of one (http(s)://, s3://).

    Raises:
        DataToolsError: OUT has no readable `_info.json`.
    """
    out = str(out) if storage.is_remote(str(out)) else Path(out)
    info = fmt.read_info(out)
    stats = info.extra.get("stats", {})
    splits = {}
    for split, s in info.splits.items():
        files = list(s.filenames)
        sizes = {f: _size(out, f) for f in files}
        lengths = s.shard_lengths or []
        st = stats.get(split, {})
        counts = [c for c in st.get("class_counts", []) if c]
        splits[split] = {
            "samples": s.num_samples,
            "shards": len(files),
            "bytes": sum(n for n in sizes.values() if n is not None),
            "missing_files": [f for f in files if sizes[f] is None],
            "pattern": _pattern(split, files),
            "shard_samples": (min(lengths), max(lengths)) if lengths else None,
            "classes_present": len(counts) if st else None,
            "per_class": (min(counts), sorted(counts)[len(counts) // 2], max(counts)) if counts else None,
            "orig_shorter_hist": st.get("orig_shorter_hist"),
            "stored_shorter_hist": st.get("stored_shorter_hist"),
        }
    return {
        "out": str(out),
        "name": info.name,
        "num_classes": info.num_classes,
        "class_names": list(info.class_names),
        "options": info.extra.get("options"),
        "skipped": info.extra.get("skipped"),
        "splits": splits,
    }


def _size(out: Path | str, name: str) -> int | None:
    """Bytes of the shard `name` in OUT, or None when it is missing or unreadable."""
    try:
        return storage.object_size(storage.join(str(out), name))
    except OSError:  # StorageError is one
        return None


def _pattern(split: str, files: list[str]) -> str:
    """Our brace pattern when the files follow our naming, else the first and last names (shards made elsewhere)."""
    if files == [fmt.shard_name(split, i) for i in range(len(files))]:
        return fmt.brace_pattern(split, len(files))
    return files[0] if len(files) == 1 else f"{files[0]} .. {files[-1]}" if files else ""


def format_info(d: dict) -> str:
    """The text `info` prints."""
    names = d["class_names"]
    shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
    lines = [f"{d['out']}: dataset {d['name']!r}, {d['num_classes']} classes" + (f": {shown}" if names else "")]
    if d["options"]:
        lines.append("  options: " + ", ".join(f"{k}={v}" for k, v in sorted(d["options"].items())))
    if d["skipped"] is not None:
        lines.append(f"  skipped inputs: {d['skipped']}")
    for split, s in d["splits"].items():
        lines.append(
            f"  {split}: {s['samples']:,} samples in {s['shards']} shards, {s['bytes'] / 1e6:,.1f} MB: {s['pattern']}"
        )
        if s["shard_samples"]:
            lines.append(f"    samples per shard: {s['shard_samples'][0]}..{s['shard_samples'][1]}")
        if s["per_class"]:
            lo, med, hi = s["per_class"]
            lines.append(
                f"    classes present: {s['classes_present']}; samples per class min/median/max {lo}/{med}/{hi}"
            )
        if s["missing_files"]:
            lines.append(f"    MISSING: {len(s['missing_files'])} shard files, e.g. {s['missing_files'][0]}")
        for label, key in (("original", "orig_shorter_hist"), ("stored", "stored_shorter_hist")):
            if s[key]:
                hist = ", ".join(f"{b}: {c}" for b, c in zip(bucket_labels(), s[key], strict=True) if c)
                lines.append(f"    shorter side ({label}, px): {hist}")
    return "\n".join(lines)
