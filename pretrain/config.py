"""Typed run configuration: YAML file + dotted command-line overrides -> `Config` dataclasses.

This is the single home of every setting. The DeepSpeed JSON is generated from it (`pretrain.train.engine`), and the
resolved config is written next to every run. Print one with:

    python -m pretrain.config configs/vit_b16_i21k.yaml optim.lr=3e-4 model.name=vit_large_patch16
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data_tools.fsutil import atomic_write
from pretrain.fewshot.spec import parse_sets, parse_shots
from pretrain.models.specs import VARIANTS
from pretrain.typed_config import ConfigError, build_dataclass, plain


@dataclass
class RunConfig:
    name: str = "vit"
    """Run name, used in logs."""
    output_dir: str = "runs/vit"
    """Folder for checkpoints, metrics and the resolved config."""
    seed: int = 0
    """Seed for weights init, data order and augmentation."""


@dataclass
class ModelConfig:
    name: str = "vit_base_patch16"
    """Variant from the registry `pretrain.models.specs.SPECS`."""
    img_size: int | None = None
    """Input resolution; None keeps the variant's default (224)."""
    num_classes: int | None = None
    """Head size; None takes it from the class list in the training shards' `_info.json`."""
    pool: Literal["token", "gap"] | None = None
    """Class-token or global-average pooling; None keeps the variant's default."""
    representation_size: int | None = None
    """Width of the pre-logits layer of the paper's ImageNet-21k models; None or 0: no such layer."""
    drop_rate: float = 0.0
    """Dropout after the embeddings and in the MLPs."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate, linearly increasing over blocks."""
    head_bias_init: float = 0.0
    """Initial head bias; -10 for the sigmoid loss as in big_vision's i21k recipe."""


@dataclass
class DataConfig:
    train_shards: str = ""
    """Training shards: a folder with `_info.json` (local, http(s):// or s3://), a folder of `.tar` files, or a brace
    pattern / URL."""
    val_shards: str = ""
    """Held-out shards (same forms); empty disables evaluation."""
    train_split: str = "train"
    """Split name in `_info.json` for training."""
    val_split: str = "val"
    """Split name in `_info.json` for evaluation."""
    num_workers: int = 4
    """Loader worker processes per rank."""
    mode: Literal["epoch", "resampled"] = "epoch"
    """`epoch`: every sample once per epoch; `resampled`: infinite stream, shards drawn with replacement."""
    remainder: Literal["drop", "wrap"] = "drop"
    """What happens to the samples that do not fill a whole global batch at the end of an epoch."""
    shuffle_buffer: int = 2000
    """Samples held per worker for shuffling."""
    crop_scale_min: float = 0.08
    """Lower bound of the Inception-style RandomResizedCrop area fraction."""
    hflip: bool = True
    """Random horizontal flip in training."""
    randaugment_ops: int = 0
    """RandAugment number of ops (0 disables it)."""
    randaugment_magnitude: int = 10
    """RandAugment magnitude."""
    mixup_alpha: float = 0.0
    """Mixup Beta(alpha, alpha) on the device; 0 disables it."""
    eval_crop_pct: float = 0.875
    """Evaluation: resize the shorter side to img_size / crop_pct, then centre crop."""
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Normalisation mean (the ViT paper and big_vision map pixels to [-1, 1])."""
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Normalisation std."""
    max_bad_shards: int = 10
    """Unreadable or truncated shards tolerated per rank before the run stops."""
    io_timeout_s: float = 30.0
    """Remote shards: a connect or read stalling longer than this is a transient fault, retried."""
    io_retries: int = 8
    """Remote shards: transient faults (reset, 5xx/429, stall) retried per request, with backoff, at the same byte."""
    io_chunk_bytes: int = 8 << 20
    """Remote shards: bytes per ranged GET (a resume over-reads at most this much per worker)."""
    decode: Literal["cpu", "gpu"] = "cpu"
    """Training JPEGs decoded and cropped in the loader workers (`cpu`) or in batches on the GPU (`gpu`, CUDA only)."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.03
    """Decoupled (AdamW) weight decay; biases, norms, position embedding and class token are exempt."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


@dataclass
class ScheduleConfig:
    warmup_steps: int = 10_000
    """Linear warmup from 0 to `optim.lr`."""
    decay: Literal["linear", "cosine", "constant"] = "linear"
    """Shape of the decay after warmup."""
    min_lr_ratio: float = 0.0
    """Floor of the decay, as a fraction of the peak learning rate."""


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps in the run."""
    micro_batch_size: int = 64
    """Images per device per forward/backward."""
    global_batch_size: int = 4096
    """Images per optimizer step over all devices; must be micro_batch_size x world size x an integer."""
    grad_checkpointing: bool = False
    """Recompute block activations in the backward pass to save memory."""
    grad_checkpointing_every: int = 1
    """With checkpointing on, checkpoint every k-th block (1 = all)."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Training precision."""
    loss: Literal["softmax", "sigmoid"] = "softmax"
    """Softmax cross-entropy, or sigmoid binary cross-entropy over one-hot targets (big_vision's i21k choice)."""
    label_smoothing: float = 0.0
    """Label smoothing for the softmax loss."""
    resume: str = "auto"
    """`auto`: newest complete checkpoint in output_dir; `none`: start fresh; or a checkpoint path."""
    eval_every_steps: int = 0
    """Evaluate on the held-out split every N steps (0: only at the end)."""
    eval_batches: int = 0
    """Cap on evaluation batches per rank (0: the whole held-out split)."""
    max_nonfinite_steps: int = 5
    """Stop after this many non-finite losses in a row."""
    collective_timeout_s: float = 900.0
    """Bound on one step, save or evaluation: past it a rank names the frozen/dead peer and exits 124 (0: none)."""
    compile: bool = False
    """Regional torch.compile of each transformer block (`pretrain.train.compile`); off until measured on GPU."""

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank; raises ConfigError if the batch sizes do not divide."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by "
                f"train.micro_batch_size ({self.micro_batch_size}) x world size ({world_size}); "
                f"use a multiple of {per_step}"
            )
        return self.global_batch_size // per_step


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    """Save every N steps (and at the end)."""
    keep_last: int = 3
    """Keep the newest K checkpoints."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of M (0: none)."""
    every_minutes: float = 0.0
    """Also save when this many minutes passed since the last save, by rank 0's clock (0: off)."""


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    overlap_comm: bool = True
    """Overlap gradient reduction with the backward pass."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient reduce bucket."""
    allgather_bucket_size: int = 50_000_000
    """Elements per all-gather bucket (stages 1 and 2)."""
    stage3_prefetch_bucket_size: int = 50_000_000
    """Elements of parameters prefetched ahead of use (stage 3)."""
    offload_optimizer: bool = False
    """Keep optimizer state in host memory (ZeRO-Offload)."""
    zero_init: bool = True
    """Stage 3: build the model partitioned (`deepspeed.zero.Init`), never whole on a rank; same initial weights."""
    sub_group_size: int = 20_000_000
    """Stage 3: elements per optimizer sub-group (bounds the fp32 gradient copy and Adam's temporaries)."""
    stage3_max_live_parameters: int = 50_000_000
    """Stage 3: gathered parameter elements kept alive at once."""
    stage3_max_reuse_distance: int = 50_000_000
    """Stage 3: keep a gathered parameter only if it is used again within this many elements."""


@dataclass
class LogConfig:
    every_steps: int = 10
    """Print and record metrics every N steps."""
    tensorboard: bool = True
    """Write TensorBoard event files to output_dir/tb."""
    wandb: bool = False
    """Also log to Weights & Biases from rank 0 (`pip install '.[wandb]'`; `WANDB_MODE=offline` for no network)."""
    wandb_project: str = "vit-pretrain"
    """W&B project."""
    wandb_entity: str = ""
    """W&B entity (user or team); empty: your default entity."""
    wandb_name: str = ""
    """W&B run name; empty: `run.name`."""
    wandb_tags: str = ""
    """Comma-separated W&B tags."""


@dataclass
class FewshotConfig:
    """Few-shot linear evaluation of the frozen backbone during training (`pretrain.fewshot`); off while `sets` is
    empty."""

    sets: str = ""
    """Downstream sets `NAME=TRAIN[@SPLIT][|TEST[@SPLIT]]`, separated by spaces (shard folders / URLs from
    `data_tools shard`, or image folders; `pretrain.fewshot.spec`); empty: off."""
    shots: str = "1,5,10,25"
    """Images per class the linear fit sees, comma-separated, ascending."""
    every_steps: int = 0
    """Evaluate every N steps (0: only at the end); always at the end of the run."""
    seed: int = 0
    """Seed of the k-shot draw: the same shots at every evaluation, on every layout and after a resume."""
    max_train_images: int = 65_000
    """Shots are drawn from the first N images of a train split (labels read once per launch); 0: all of it."""
    max_test_images: int = 10_000
    """Test images per set: the first N of the test split in shard order; 0: all of it."""

    def __post_init__(self) -> None:
        """Refuse bad values where they are set (ConfigError naming the key)."""
        parse_sets(self.sets)
        parse_shots(self.shots)
        for key in ("every_steps", "max_train_images", "max_test_images"):
            if getattr(self, key) < 0:
                raise ConfigError(f"fewshot.{key}={getattr(self, key)} must be >= 0")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    log: LogConfig = field(default_factory=LogConfig)
    fewshot: FewshotConfig = field(default_factory=FewshotConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), as written to YAML and stored in checkpoints."""
        return plain(dataclasses.asdict(self))


# ----------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (optional), apply `section.key=value` overrides, type-check and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p} must hold a mapping of sections (run, model, data, ...), not {type(raw).__name__}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. optim.lr=3e-4")
        section, _, name = key.partition(".")
        try:
            parsed = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            parsed = value
        sec = raw.setdefault(section, {})
        if not isinstance(sec, dict):
            raise ConfigError(f"section {section!r} must be a mapping")
        sec[name] = parsed
    cfg = build_dataclass(Config, raw, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check values that types alone cannot (ranges, combinations). Raises ConfigError."""
    positive = {
        "train.steps": cfg.train.steps,
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "train.global_batch_size": cfg.train.global_batch_size,
        "train.grad_checkpointing_every": cfg.train.grad_checkpointing_every,
        "checkpoint.every_steps": cfg.checkpoint.every_steps,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
        "log.every_steps": cfg.log.every_steps,
        "optim.lr": cfg.optim.lr,
        "data.shuffle_buffer": cfg.data.shuffle_buffer,
        "data.io_timeout_s": cfg.data.io_timeout_s,
        "data.io_chunk_bytes": cfg.data.io_chunk_bytes,
    }
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{key}={v} must be > 0")
    non_negative = {
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.grad_clip": cfg.optim.grad_clip,
        "schedule.warmup_steps": cfg.schedule.warmup_steps,
        "data.num_workers": cfg.data.num_workers,
        "data.mixup_alpha": cfg.data.mixup_alpha,
        "train.eval_every_steps": cfg.train.eval_every_steps,
        "checkpoint.keep_every": cfg.checkpoint.keep_every,
        "checkpoint.every_minutes": cfg.checkpoint.every_minutes,
        "train.collective_timeout_s": cfg.train.collective_timeout_s,
        "data.io_retries": cfg.data.io_retries,
    }
    for key, v in non_negative.items():
        if v < 0:
            raise ConfigError(f"{key}={v} must be >= 0")
    fractions = {
        "model.drop_rate": cfg.model.drop_rate,
        "model.drop_path_rate": cfg.model.drop_path_rate,
        "schedule.min_lr_ratio": cfg.schedule.min_lr_ratio,
        "train.label_smoothing": cfg.train.label_smoothing,
    }
    for key, v in fractions.items():
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"{key}={v} must be in [0, 1)")
    if not 0.0 < cfg.data.crop_scale_min <= 1.0:
        raise ConfigError(f"data.crop_scale_min={cfg.data.crop_scale_min} must be in (0, 1]")
    if not 0.0 < cfg.data.eval_crop_pct <= 1.0:
        raise ConfigError(f"data.eval_crop_pct={cfg.data.eval_crop_pct} must be in (0, 1]")
    if cfg.data.decode == "gpu" and cfg.data.randaugment_ops > 0:
        raise ConfigError(
            "data.decode=gpu cannot run RandAugment (it needs the decoded image in the worker); "
            "set data.randaugment_ops=0 or data.decode=cpu"
        )
    if cfg.train.global_batch_size % cfg.train.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} must be a multiple of "
            f"train.micro_batch_size={cfg.train.micro_batch_size}"
        )
    if cfg.train.precision == "fp16" and cfg.train.loss == "sigmoid" and cfg.model.head_bias_init < -8:
        raise ConfigError("model.head_bias_init below -8 overflows fp16 logits' gradients; use train.precision=bf16")
    if cfg.model.name not in VARIANTS:
        raise ConfigError(f"model.name={cfg.model.name!r} is unknown; choose one of {', '.join(sorted(VARIANTS))}")


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write(path, dump_yaml(cfg))


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML text, sections in declaration order."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. stored in a checkpoint)."""
    cfg = build_dataclass(Config, raw, "")
    validate(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Print the resolved config: `python -m pretrain.config FILE [section.key=value ...]`."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m pretrain.config CONFIG.yaml [section.key=value ...]")
        return 0 if args else 2
    try:
        cfg = load_config(args[0], args[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(dump_yaml(cfg), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
