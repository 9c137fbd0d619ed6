"""The labelled data of fine-tuning: shard folders or image folders (sharded once), their classes, the loaders."""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pretrain.config import DataConfig
from pretrain.data import EvalLoader, ShardError, TrainLoader, build_eval_loader, build_train_loader, resolve_shards
from pretrain.downstream.backbone import Backbone
from pretrain.downstream.options import FinetuneError


@dataclass
class LabelledData:
    """Where the training and held-out samples are, and the class names they share."""

    train: str
    """Training shards (an image folder given as data is replaced by its cache shard folder)."""
    train_split: str
    """Split of `train` trained on."""
    val: str
    """Held-out shards."""
    val_split: str
    """Split of `val` evaluated on."""
    names: list[str]
    """Class names, in label order."""

    def single_label(self, batch: dict) -> dict:
        """The batch itself; raises FinetuneError for multi-label data, which fine-tuning cannot learn."""
        if batch["label"].dim() != 1:
            raise FinetuneError(f"{self.train} is multi-label; fine-tuning needs one class per image")
        return batch


def _image_folder(path: Path) -> bool:
    """A folder of class sub-folders (not shards): no `_info.json` and no `.tar` files in it."""
    return (
        path.is_dir()
        and not (path / "_info.json").exists()
        and not any(path.glob("*.tar"))
        and any(d.is_dir() for d in path.iterdir())
    )


def shard_image_folder(path: Path, val_fraction: float, seed: int) -> Path:
    """Shard an image folder once into a cache folder named after its file list; return the shard folder."""
    from data_tools.shard import shard

    files = sorted(f for f in path.rglob("*") if f.is_file())
    h = hashlib.sha1(f"{path.resolve()}|{val_fraction}|{seed}".encode())
    for f in files:  # a changed file list or file gives a new cache folder
        st = f.stat()
        h.update(f"{f.relative_to(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    out = Path(tempfile.gettempdir()) / "pretrain-finetune" / f"{path.name}-{h.hexdigest()[:16]}"
    if not (out / "_info.json").is_file():
        shard(path, out, workers=1, seed=seed, val_fraction=val_fraction, progress=False)
    return out


def resolve_data(
    data: str, val_data: str | None, train_split: str, val_split: str, val_fraction: float, seed: int
) -> tuple[str, str, str, str]:
    """(train shards, train split, val shards, val split) for the two data options (image folders get sharded)."""
    p = Path(data)
    if not p.exists() and "{" not in data and "://" not in data and not data.startswith("pipe:"):
        raise FinetuneError(f"--data {data} does not exist; pass a shard folder or an image folder of class folders")
    if _image_folder(p):
        p = shard_image_folder(p, 0.0 if val_data else val_fraction, seed)
        data, train_split = str(p), "train"
    if val_data is None:
        return data, train_split, data, val_split
    v = Path(val_data)
    if not v.exists():
        raise FinetuneError(f"--val-data {val_data} does not exist; pass a shard folder or an image folder")
    if _image_folder(v):  # all of it is held out: sharded as a single "train" split
        return data, train_split, str(shard_image_folder(v, 0.0, seed)), "train"
    return data, train_split, val_data, val_split


def labelled_data(train: str, train_split: str, val: str, val_split: str) -> LabelledData:
    """Check that the training shards carry a class list and the held-out split exists with the same classes."""
    train_shards = resolve_shards(train, train_split)
    names = train_shards.class_names or [str(i) for i in range(train_shards.num_classes or 0)]
    if not names:
        raise FinetuneError(f"{train} carries no class list (_info.json); shard it with `python -m data_tools shard`")
    try:
        val_shards = resolve_shards(val, val_split)
    except ShardError as e:
        raise FinetuneError(f"no held-out split ({e}); pass --val-data or --val-split") from None
    if val_shards.class_names and val_shards.class_names != names:
        raise FinetuneError(f"{val} has other classes than {train}; shard both with the same class list (--classes)")
    return LabelledData(train, train_split, val, val_split, names)


def data_config(
    data: LabelledData, bb: Backbone, *, workers: int, batch_size: int, crop_scale_min: float, hflip: bool
) -> DataConfig:
    """The input stream's settings for fine-tuning: normalisation and crop from the backbone, no sample dropped."""
    return DataConfig(
        train_shards=data.train,
        val_shards=data.val,
        train_split=data.train_split,
        val_split=data.val_split,
        num_workers=workers,
        remainder="wrap",  # small datasets: top the last batch of an epoch up from its start
        shuffle_buffer=min(DataConfig.shuffle_buffer, max(64, 4 * batch_size)),
        crop_scale_min=crop_scale_min,
        hflip=hflip,
        eval_crop_pct=bb.crop_pct,
        mean=bb.mean,
        std=bb.std,
    )


def build_loaders(
    cfg: DataConfig, *, img_size: int, batch_size: int, rank: int, world_size: int, seed: int
) -> tuple[TrainLoader, EvalLoader, int]:
    """(train loader, eval loader, batches per epoch) of this process; raises FinetuneError for too little data."""
    train = build_train_loader(
        cfg, img_size=img_size, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed
    )
    evaluation = build_eval_loader(cfg, img_size=img_size, batch_size=batch_size, rank=rank, world_size=world_size)
    per_epoch = train.batches_per_epoch or 0
    if per_epoch < 1:
        raise FinetuneError(f"{cfg.train_shards} has fewer samples than one global batch; lower --batch-size")
    return train, evaluation, per_epoch
