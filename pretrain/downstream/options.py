"""The options of `vit-finetune` (`pretrain.downstream.finetune`): one typed dataclass, the command line built over
it, and their checks."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

from data_tools.fsutil import check_replaceable
from pretrain.config import DataConfig


class FinetuneError(ValueError):
    """Bad options or data; the message names the problem and the fix."""


@dataclass
class FinetuneOptions:
    """What `vit-finetune` does; each field is the command-line option of the same name (docs/finetune.md)."""

    data: str
    """Shard folder with `_info.json`, or an image folder of class folders (sharded once into a cache folder)."""
    weights: str | None = None
    """Exported backbone (timm, pth or npz export folder, or a .pth / .npz file); None trains `model` from scratch."""
    out: str | None = None
    """Folder for the result (safetensors + config.json), written atomically; None saves nothing."""
    val_data: str | None = None
    """Held-out shards or image folder; None: the `val_split` of `data`."""
    train_split: str = DataConfig.train_split
    """Split of `data` to train on."""
    val_split: str = DataConfig.val_split
    """Held-out split name in the shards."""
    model: str = "vit_base_patch16"
    """Variant trained from scratch (without `weights`)."""
    img_size: int | None = None
    """Input size; None keeps the backbone's (another size resamples its position embedding)."""
    epochs: int | None = None
    """Passes over the training data; with neither this nor `steps`, one."""
    steps: int | None = None
    """Optimizer steps; wins over `epochs`."""
    batch_size: int = 32
    """Images per process per step."""
    lr: float = 0.01
    """Peak learning rate."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """SGD with momentum 0.9 as the ViT paper fine-tunes, or AdamW."""
    weight_decay: float = 0.0
    """Weight decay of the optimizer."""
    warmup_steps: int | None = None
    """Linear warmup steps (None: 10% of the steps), then cosine decay to 0."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables it."""
    freeze_backbone: bool = False
    """Linear probe: train the head only; the backbone stays bit for bit as loaded."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Passed to `accelerate.Accelerator`."""
    crop_scale_min: float = DataConfig.crop_scale_min
    """RandomResizedCrop lower area bound."""
    hflip: bool = DataConfig.hflip
    """Random horizontal flip in training."""
    val_fraction: float = 0.1
    """Held out of an image-folder `data` when there is no `val_data`."""
    workers: int = 2
    """Loader worker processes per process."""
    seed: int = 0
    """Seeds the new head, the model from scratch and the data order."""
    progress: bool = True
    """Show a progress bar."""

    def check(self) -> None:
        """Raise FinetuneError naming the first bad option (the output folder first, before anything is built)."""
        if self.out is not None:
            try:
                check_replaceable(self.out, "config.json", "--out")
            except ValueError as e:
                raise FinetuneError(str(e)) from None
        if self.optimizer not in ("sgd", "adamw"):
            raise FinetuneError(f"--optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise FinetuneError(f"--mixed-precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if (
            self.batch_size < 1
            or (self.steps is not None and self.steps < 1)
            or (self.epochs is not None and self.epochs < 1)
        ):
            raise FinetuneError("--batch-size, --steps and --epochs must be positive")


def build_parser(description: str) -> argparse.ArgumentParser:
    """The command line; an option left out keeps the `FinetuneOptions` default (the one home of the defaults)."""
    ap = argparse.ArgumentParser(prog="vit-finetune", description=description, argument_default=argparse.SUPPRESS)
    add = ap.add_argument
    add("--weights", help="exported backbone: timm / pth / npz export folder or .pth / .npz file; omit: from scratch")
    add("--data", required=True, help="shard folder with _info.json, or image folder of class folders")
    add("--val-data", help="held-out shards or image folder (default: the val split of --data)")
    add("--train-split", help="split of --data to train on")
    add("--val-split", help="held-out split name in the shards")
    add("--val-fraction", type=float, help="held out of an image --data without --val-data")
    add("--model", help="variant trained from scratch (without --weights)")
    add("--img-size", type=int, help="input size (default: the backbone's); resamples pos_embed")
    add("--epochs", type=int, help="passes over the training data (default 1)")
    add("--steps", type=int, help="optimizer steps (instead of --epochs)")
    add("--batch-size", type=int, help="images per process per step")
    add("--lr", type=float, help="peak learning rate")
    add("--optimizer", choices=("sgd", "adamw"), help="SGD momentum 0.9 as the paper")
    add("--weight-decay", type=float)
    add("--warmup-steps", type=int, help="linear warmup (default: 10%% of the steps), then cosine")
    add("--grad-clip", type=float, help="global gradient-norm clip; 0 disables it")
    add("--freeze-backbone", action="store_true", help="linear probe: train the head only")
    add("--mixed-precision", choices=("no", "bf16", "fp16"), help="passed to accelerate")
    add("--crop-scale-min", type=float, help="RandomResizedCrop lower area bound")
    add("--no-hflip", dest="hflip", action="store_false", help="no random horizontal flip")
    add("--workers", type=int, help="loader worker processes per process")
    add("--seed", type=int)
    add("--out", help="folder for the result (safetensors + config.json), written atomically")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return ap


def parse_options(argv: list[str] | None, description: str) -> FinetuneOptions:
    """FinetuneOptions from the command line (argparse exits 2 on an unknown or malformed option)."""
    return FinetuneOptions(**vars(build_parser(description).parse_args(argv)))
