"""Crash-safe checkpoints on top of DeepSpeed's: a tag is complete only once `pretrain_meta.json` is in it.

Layout of a run folder:

    RUN/config.yaml
    RUN/checkpoints/step_00000100/      DeepSpeed's files (model, optimizer shards of every rank, client state)
    RUN/checkpoints/step_00000100/pretrain_meta.json   written last, after every rank saved: marks it complete
    RUN/checkpoints/latest              the newest complete tag, replaced atomically

A crash at any moment, even in the middle of a save, leaves the previous complete tag as the one that resume
(and `pretrain.export`) picks: a tag folder without `pretrain_meta.json` is never used.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

from data_tools.fsutil import atomic_write

META = "pretrain_meta.json"
FORMAT_VERSION = 1
_TAG = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit this run; the message says what to do."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_dir(path: str | Path) -> Path:
    """Accept a run folder (with `checkpoints/`) or the checkpoints folder itself."""
    p = Path(path)
    return p / "checkpoints" if (p / "checkpoints").is_dir() else p


def complete_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for d in ckpt_dir.iterdir():
        m = _TAG.match(d.name)
        if m and (d / META).is_file():
            found.append((int(m.group(1)), d.name))
    return sorted(found)


def newest_complete(ckpt_dir: Path) -> str | None:
    """The tag to resume from: `latest` if it names a complete tag, else the highest complete step."""
    latest = ckpt_dir / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if (ckpt_dir / tag / META).is_file():
            return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1][1] if tags else None


def resolve_resume(resume: str, output_dir: str | Path) -> tuple[Path, str] | None:
    """Turn `train.resume` (auto | none | PATH) into (checkpoints dir, tag), or None to start fresh."""
    if resume == "none":
        return None
    if resume == "auto":
        ckpt_dir = Path(output_dir) / "checkpoints"
        tag = newest_complete(ckpt_dir)
        return (ckpt_dir, tag) if tag else None
    p = Path(resume)
    if (p / META).is_file():  # a tag folder
        return p.parent, p.name
    if _TAG.match(p.name) and p.is_dir():
        raise CheckpointError(f"checkpoint {p} is incomplete (no {META}; the run died while saving); pick another")
    ckpt_dir = checkpoints_dir(p)
    tag = newest_complete(ckpt_dir)
    if tag is None:
        raise CheckpointError(f"train.resume={resume}: no complete checkpoint there; use a run or tag folder")
    return ckpt_dir, tag


def read_meta(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    return json.loads((ckpt_dir / tag / META).read_text())


def write_meta(ckpt_dir: Path, tag: str, meta: dict[str, Any]) -> None:
    """Mark `tag` complete and point `latest` at it (rank 0, after every rank finished writing)."""
    atomic_write(ckpt_dir / tag / META, json.dumps({**meta, "format_version": FORMAT_VERSION}, indent=1))
    atomic_write(ckpt_dir / "latest", tag)


def check_model_matches(meta: dict[str, Any], model_args: Any, where: str) -> None:
    """Refuse to resume into a model of another shape."""
    ours = dataclasses.asdict(model_args)
    theirs = meta.get("model_args", {})
    shape_keys = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads",
                  "mlp_ratio", "pool", "representation_size")  # fmt: skip
    diff = [k for k in shape_keys if theirs.get(k) != ours.get(k)]
    if diff:
        detail = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs config {ours.get(k)!r}" for k in diff)
        raise CheckpointError(
            f"checkpoint {where} holds a model of another shape ({detail}); "
            "resume with the same model settings, or start fresh with train.resume=none and a new run.output_dir"
        )


def prune(ckpt_dir: Path, keep_last: int, keep_every: int) -> list[str]:
    """Delete complete checkpoints beyond the newest `keep_last`, except steps that are multiples of
    `keep_every`; also delete incomplete tags older than the newest complete one. Returns the deleted tags."""
    tags = complete_tags(ckpt_dir)
    keep = {t for _, t in tags[-keep_last:]}
    keep |= {t for s, t in tags if keep_every and s % keep_every == 0}
    newest = tags[-1][0] if tags else -1
    deleted = []
    for d in sorted(ckpt_dir.iterdir()) if ckpt_dir.is_dir() else []:
        m = _TAG.match(d.name)
        if not m or d.name in keep:
            continue
        step = int(m.group(1))
        if (d / META).is_file() or step < newest:
            shutil.rmtree(d, ignore_errors=True)
            deleted.append(d.name)
    return deleted
