"""Export a ZeRO checkpoint's fp32 master weights to timm, torchvision, Hugging Face transformers, a plain PyTorch
`.pth` or the original JAX `.npz`.

    python -m pretrain.export RUN_OR_CHECKPOINTS_DIR OUT --format timm|torchvision|hf|pth|npz \\
        [--tag TAG] [--dtype float32|bfloat16] [--head keep|pre-logits|drop] [--img-size S]

Steps: pick the checkpoint (newest complete tag, or `--tag`), list its tensors from the shard headers, map every
name to the target format (on `meta` tensors, for the file's header), then stream: rebuild one fp32 parameter from
the rank shards (`zero.py`), rename / split / resample / cast it (`formats.py`, `plain.py`), append it to the
weights file. Everything is written into a temporary folder that is renamed to OUT only at the end.
See docs/export.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from data_tools.fsutil import atomic_path, check_replaceable
from pretrain import checkpoint_format
from pretrain.checkpoint_format import META, CheckpointError
from pretrain.export.base import DTYPES, HEADS, INFO, WEIGHTS, ExportError, ExportOptions
from pretrain.export.formats import (
    ADAPTERS,
    FORMATS,
    check_options,
    default_head,
    map_tensor,
    metadata_files,
    target_args,
)
from pretrain.export.zero import ZeroCheckpoint, ZeroCheckpointError
from pretrain.models.specs import ViTArgs
from pretrain.models.vit import param_shapes

__all__ = [
    "DTYPES",
    "FORMATS",
    "HEADS",
    "WEIGHTS",
    "ExportError",
    "ExportOptions",
    "ExportResult",
    "export_checkpoint",
    "find_checkpoint",
]


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    out: Path
    """The output folder."""
    tag_dir: Path
    """The checkpoint tag folder that was read."""
    num_tensors: int
    """Tensors in the weights file."""
    num_params: int
    """Elements in the weights file."""
    head: str
    """What was kept of the head (`HEADS`): as asked, or the format's default."""
    seconds: float
    """Wall time of the export."""


def find_checkpoint(path: str | Path, tag: str | None = None) -> Path:
    """The complete tag folder to export from a run folder, its `checkpoints/` folder or a tag folder.

    Without `tag`: `latest` if it names a complete tag, else the highest complete step. A tag folder without
    `pretrain_meta.json` (the run died while saving) is never picked. Raises ExportError with the fix.
    """
    try:
        return checkpoint_format.find_complete(path, tag)
    except CheckpointError as e:
        raise ExportError(str(e)) from None


def _read_meta(tag_dir: Path) -> tuple[dict[str, Any], ViTArgs]:
    try:
        meta = checkpoint_format.read_meta(tag_dir)
        known = {f.name for f in fields(ViTArgs)}
        args = ViTArgs(**{k: v for k, v in meta["model_args"].items() if k in known})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{tag_dir / META} is unreadable or lacks model_args ({e}); the checkpoint is damaged") from e
    return meta, args


def _check_out(out: Path) -> None:
    """Only replace an earlier export: never a folder of something else a user mistyped as OUT."""
    try:
        check_replaceable(out, INFO, "OUT")
    except ValueError as e:
        raise ExportError(str(e)) from None


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    format: str,
    tag: str | None = None,
    dtype: str = "float32",
    head: str | None = None,
    img_size: int | None = None,
) -> ExportResult:
    """Export one checkpoint to `out` (a folder) in `format`; see the module docstring and docs/export.md.

    `head` None: `default_head` (keep what the format can hold whole, else drop head and pre-logits layer)."""
    t0 = time.perf_counter()
    out = Path(out)
    _check_out(out)
    tag_dir = find_checkpoint(checkpoint, tag)
    meta, args = _read_meta(tag_dir)
    head = head or default_head(args, format)
    opts = ExportOptions(format=format, dtype=dtype, head=head, img_size=img_size)
    check_options(args, opts)
    files = metadata_files(target_args(args, opts), meta, opts)  # refuses an unknown model before any weight is read
    with ZeroCheckpoint(tag_dir) as ckpt:
        shapes = ckpt.shapes()
        want = param_shapes(args)
        wrong = [k for k in want if k not in shapes or tuple(shapes[k][0]) != tuple(want[k])]
        extra = [k for k in shapes if k not in want]
        if wrong or extra:
            raise ExportError(
                f"{tag_dir} does not hold the model its {META} describes (first mismatch: {(wrong + extra)[0]}); "
                "the checkpoint is damaged"
            )
        # Output names, shapes and dtypes, known before any weight is read (meta tensors carry no data).
        plan = {
            k: (t.shape, t.dtype)
            for name, (shape, dt) in shapes.items()
            for k, t in map_tensor(name, torch.empty(shape, dtype=dt, device="meta"), args, opts)
        }
        with atomic_path(out) as tmp:
            tmp.mkdir()
            info = {"format": "pt", "source": "pretrain.export", "tag": tag_dir.name, "export_format": format}
            adapter = ADAPTERS[format]
            adapter.write(tmp / adapter.weights, plan, _mapped(ckpt, args, opts), info)
            for name, content in files.items():
                (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
    return ExportResult(
        out=out,
        tag_dir=tag_dir,
        num_tensors=len(plan),
        num_params=sum(int(torch.Size(s).numel()) for s, _ in plan.values()),
        head=head,
        seconds=time.perf_counter() - t0,
    )


def _mapped(ckpt: ZeroCheckpoint, args: ViTArgs, opts: ExportOptions) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's fp32 tensors in the target format, one at a time."""
    for name, tensor in ckpt.tensors():
        yield from map_tensor(name, tensor, args, opts)


def errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean bad input (a one-line message, exit code 2), not a bug."""
    return (ExportError, ZeroCheckpointError)
