"""Input stream: WebDataset shards -> uint8 training batches, equal across ranks, exactly resumable.

See docs/stream.md. Public API:
    build_train_loader, build_eval_loader, TrainLoader, EvalLoader  (loader.py)
    resolve_shards, ShardList, ShardError, count_samples             (shards.py)
    normalize, to_targets, mixup, TrainTransform, EvalTransform      (transforms.py)
    unfinished                                                       (positions.py)
The shard format itself (member names, `.cls`, `_info.json`) is `data_tools.format`.
"""

from pretrain.data.loader import EvalLoader, TrainLoader, build_eval_loader, build_train_loader
from pretrain.data.positions import unfinished
from pretrain.data.shards import ShardError, ShardList, count_samples, resolve_shards
from pretrain.data.transforms import EvalTransform, TrainTransform, mixup, normalize, to_targets

__all__ = [
    "EvalLoader",
    "EvalTransform",
    "ShardError",
    "ShardList",
    "TrainLoader",
    "TrainTransform",
    "build_eval_loader",
    "build_train_loader",
    "count_samples",
    "mixup",
    "normalize",
    "resolve_shards",
    "to_targets",
    "unfinished",
]
