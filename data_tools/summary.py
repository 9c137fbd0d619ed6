"""What a finished run reports: `_info.json` assembled from the shard markers, and the summary `shard` returns."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from data_tools import format as fmt
from data_tools import layout
from data_tools.sources import Catalog


def assemble_info(name: str, fingerprint: str, options: dict, catalog: Catalog, markers: dict) -> fmt.DatasetInfo:
    """`_info.json`: timm's split layout plus the class list, options and statistics."""
    stats = {}
    for split, ms in markers.items():
        class_counts = [0] * len(catalog.class_names)
        for m in ms:
            for label, c in m["class_counts"]:
                class_counts[label] += c
        stats[split] = {
            "bytes": sum(m["file_bytes"] for m in ms),
            "class_counts": class_counts,
            "orig_shorter_hist": np.sum([m["orig_shorter_hist"] for m in ms], axis=0).tolist(),
            "stored_shorter_hist": np.sum([m["stored_shorter_hist"] for m in ms], axis=0).tolist(),
        }
    return fmt.make_info(
        name,
        catalog.class_names,
        {split: [m["count"] for m in ms] for split, ms in markers.items()},
        fingerprint=fingerprint,
        options=options,
        skipped=sum(len(m["skipped"]) for ms in markers.values() for m in ms),
        stats=stats,
    )


def shard_count(info: fmt.DatasetInfo) -> int:
    """Shards over all splits of an `_info.json`."""
    return sum(len(s.filenames) for s in info.splits.values())


def all_shards_exist(out: Path, info: fmt.DatasetInfo) -> bool:
    """True when every shard an `_info.json` lists is a file in OUT."""
    return all((out / f).is_file() for s in info.splits.values() for f in s.filenames)


def summarize(out: Path, info: fmt.DatasetInfo, *, written: int, reused: int, images: int, seconds: float) -> dict:
    """The summary `shard` returns and prints, from a finished `_info.json`; `images` were processed in `seconds`."""
    splits = {}
    for split, s in info.splits.items():
        splits[split] = {
            "samples": s.num_samples,
            "shards": len(s.filenames),
            "bytes": info.extra.get("stats", {}).get(split, {}).get("bytes")
            or sum((out / f).stat().st_size for f in s.filenames),
            "pattern": fmt.brace_pattern(split, len(s.filenames)),
        }
    return {
        "out": str(out),
        "name": info.name,
        "num_classes": info.num_classes,
        "splits": splits,
        "skipped": info.extra.get("skipped", 0),
        "written_shards": written,
        "reused_shards": reused,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 1) if images and seconds > 0 else None,
    }


def format_summary(summary: dict) -> str:
    """Human-readable lines for the summary."""
    lines = [f"{summary['out']}: {summary['num_classes']} classes"]
    for split, s in summary["splits"].items():
        lines.append(
            f"  {split}: {s['samples']:,} samples in {s['shards']} shards, {s['bytes'] / 1e6:,.1f} MB: "
            f"{os.path.join(summary['out'], s['pattern'])}"
        )
    lines.append(f"  skipped: {summary['skipped']}" + (f" (see {layout.SKIPPED})" if summary["skipped"] else ""))
    rate = f", {summary['images_per_s']:,.1f} images/s" if summary["images_per_s"] else ""
    lines.append(
        f"  wrote {summary['written_shards']} shards, kept {summary['reused_shards']} finished earlier, "
        f"{summary['seconds']:.1f} s{rate}"
    )
    return "\n".join(lines)
