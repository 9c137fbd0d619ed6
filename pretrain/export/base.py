"""What every export format shares: the option values, the folder's file names, the error type, and the `Adapter`
interface each target library implements (`pretrain.export.formats` for timm, torchvision and Hugging Face,
`pretrain.export.plain` for `.pth` and `.npz`). `formats` gathers every adapter into `ADAPTERS`, so it imports
`plain`; `plain` imports this module and nothing of `formats`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pretrain.export.safetensors_stream import write_safetensors
from pretrain.models.specs import ModelSpec, ViTArgs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
HEADS = ("keep", "pre-logits", "drop")
"""--head: keep the pre-logits layer and the head, keep the pre-logits layer alone, or drop both."""

# What an export folder holds (also what `pretrain.downstream.backbone` reads back and fine-tuning writes).
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
INFO = "export_info.json"


class ExportError(ValueError):
    """The export cannot be done as asked; the message says why and what to do instead."""


@dataclass(frozen=True)
class ExportOptions:
    """What to write."""

    format: str
    """One of `FORMATS`."""
    dtype: str = "float32"
    """Floating-point dtype of the written tensors: `float32` or `bfloat16`."""
    head: str = "keep"
    """One of `HEADS`: `keep` the head (and pre-logits layer), `pre-logits` without the head, or `drop` both."""
    img_size: int | None = None
    """Resample the position embedding (bicubic) for this input size; None keeps the trained size."""


@dataclass(frozen=True)
class Metadata:
    """What the files say besides the model's shape."""

    class_names: list[str]
    """Names of the head's classes; empty without a head."""
    mean: list[float]
    """Normalisation mean of the inputs."""
    std: list[float]
    """Normalisation std of the inputs."""
    crop_pct: float
    """Evaluation centre-crop fraction."""
    dtype: str
    """dtype of the written weights."""


class Adapter(ABC):
    """One target library: which models it holds, its tensor names, and the JSON files it reads."""

    name: str
    class_token_only = False
    """True when the library's ViT pools the class token only (no `pool=gap`)."""
    pre_logits_heads: tuple[str, ...] = ("drop",)
    """The `--head` choices the library can hold for a model with a pre-logits layer."""
    dtypes: tuple[str, ...] = tuple(DTYPES)
    """The `--dtype` choices the file format can store."""
    weights = WEIGHTS
    """Name of the weights file in the output folder."""

    @abstractmethod
    def rename(self, name: str, t: torch.Tensor, args: ViTArgs, head: str) -> list[tuple[str, torch.Tensor]]:
        """One of our (timm-named) tensors of the model `args` -> (name, tensor) of the library; `head`: `HEADS`."""

    @abstractmethod
    def config_files(self, spec: ModelSpec, args: ViTArgs, md: Metadata) -> dict[str, dict[str, Any]]:
        """JSON files (name -> content) the library needs next to the weights of the model `args` describe."""

    def write(
        self, path: Path, plan: dict[str, tuple[torch.Size, torch.dtype]], tensors: Iterator, info: dict[str, str]
    ) -> None:
        """Stream `tensors` (in `plan` order) into the weights file `path`; `info`: file metadata, where it has any."""
        write_safetensors(path, plan, tensors, info)
