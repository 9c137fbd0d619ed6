"""Input stream: WebDataset shards -> uint8 training batches in one global order, equal across ranks, resumable on
any layout that divides its canonical streams (docs/stream.md). Public API:
    build_train_loader, build_eval_loader, TrainLoader, EvalLoader  (loader.py)
    StreamState                                                      (elastic_state.py)
    resolve_shards, ShardList, ShardError, count_samples             (shards.py)
    normalize, to_targets, mixup, TrainTransform, EvalTransform      (transforms.py)
The shard format itself (member names, `.cls`, `_info.json`) is `data_tools.format`.
"""

from pretrain.data.elastic_state import StreamState
from pretrain.data.loader import EvalLoader, TrainLoader, build_eval_loader, build_train_loader
from pretrain.data.shards import ShardError, ShardList, count_samples, resolve_shards
from pretrain.data.transforms import EvalTransform, TrainTransform, mixup, normalize, to_targets

__all__ = [
    "EvalLoader",
    "EvalTransform",
    "ShardError",
    "ShardList",
    "StreamState",
    "TrainLoader",
    "TrainTransform",
    "build_eval_loader",
    "build_train_loader",
    "count_samples",
    "mixup",
    "normalize",
    "resolve_shards",
    "to_targets",
]
