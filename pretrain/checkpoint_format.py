"""THE checkpoint layout, read by training (resume), export and conversion alike.

    RUN/config.yaml
    RUN/checkpoints/step_00000100/                      DeepSpeed's files (model, every rank's optimizer shard,
                                                        client state)
    RUN/checkpoints/step_00000100/pretrain_meta.json    written last, after every rank saved: marks it complete
    RUN/checkpoints/latest                              the newest complete tag, replaced atomically

A tag folder without `pretrain_meta.json` (the run died while saving it) is never picked. Writing and pruning live
in `pretrain.train.checkpointer`; this module only names and finds things, so export needs no training code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

META = "pretrain_meta.json"
LATEST = "latest"
FORMAT_VERSION = 2
"""2: DeepSpeed's client state holds the run's parts keyed by name; 1: one flat namespace (`pretrain.train.
checkpointer.client_parts` reads both). The files export reads are the same in both."""
TAG = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit; the message says what to do."""


def tag_for(step: int) -> str:
    """The tag folder name of `step`."""
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
        m = TAG.match(d.name)
        if m and (d / META).is_file():
            found.append((int(m.group(1)), d.name))
    return sorted(found)


def newest_complete(ckpt_dir: Path) -> str | None:
    """The tag to resume from: `latest` if it names a complete tag, else the highest complete step."""
    latest = ckpt_dir / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if (ckpt_dir / tag / META).is_file():
            return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1][1] if tags else None


def find_complete(path: str | Path, tag: str | None = None) -> Path:
    """The complete tag folder named by a run folder, its `checkpoints/` folder or a tag folder (+ optional tag).

    Without `tag`: `latest` if it names a complete tag, else the highest complete step. Raises CheckpointError
    naming the problem and the fix.
    """
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a folder; pass a run folder, its checkpoints/ folder or a tag folder")
    if tag is None and (p / META).is_file():  # a tag folder itself
        return p
    incomplete = f"(no {META}: the run died while saving it); use an older tag"
    if tag is None and TAG.match(p.name):
        raise CheckpointError(f"{p} is an incomplete checkpoint {incomplete}")
    ckpt_dir = checkpoints_dir(p)
    if tag is not None:
        d = ckpt_dir / tag
        if not d.is_dir():
            have = ", ".join(t for _, t in complete_tags(ckpt_dir)[-5:]) or "none"
            raise CheckpointError(f"tag {tag!r} does not exist in {ckpt_dir}; complete tags: {have}")
        if not (d / META).is_file():
            raise CheckpointError(f"tag {tag!r} is incomplete {incomplete}")
        return d
    found = newest_complete(ckpt_dir)
    if found is None:
        if any(TAG.match(d.name) for d in ckpt_dir.iterdir() if d.is_dir()):
            raise CheckpointError(
                f"{ckpt_dir} holds only incomplete checkpoints (no {META}: the run died while saving); "
                "resume training to write a complete one"
            )
        raise CheckpointError(
            f"{p} is not a checkpoint folder (no tag with {META}); pass a run folder or its checkpoints/"
        )
    return ckpt_dir / found


def read_meta(tag_dir: Path) -> dict[str, Any]:
    """The `pretrain_meta.json` of a complete tag folder."""
    return json.loads((tag_dir / META).read_text())
