"""Typed run configuration: YAML file + dotted command-line overrides -> `Config` dataclasses.

This is the single home of every setting and its default. The DeepSpeed JSON is generated from it
(`pretrain.train.engine`), and the resolved config is written next to every run. Print one with:

    python -m pretrain.config configs/vit_b16_i21k.yaml optim.lr=3e-4 model.name=vit_large_patch16

Where each rule lives:
- a field's type: its annotation (`pretrain.typed_config.build_dataclass` refuses anything else);
- a rule on one section's values: that section's `check` (a `Section`), beside its fields;
- a rule across sections: `check_across`; between the model and the data found: `head_size`;
- the batch split over ranks and micro-steps: `BatchPlan`, built once per run for the world size.
A new section is a `Section` dataclass with its own `check`, and one field of `Config`.
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
from pretrain.typed_config import ConfigError, Section, build_dataclass, in_range, plain


@dataclass
class RunConfig(Section):
    name: str = "vit"
    """Run name, used in logs."""
    output_dir: str = "runs/vit"
    """Folder for checkpoints, metrics and the resolved config."""
    seed: int = 0
    """Seed for weights init, data order and augmentation."""


@dataclass
class ModelConfig(Section):
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

    def check(self, name: str) -> None:
        if self.name not in VARIANTS:
            raise ConfigError(f"{name}.name={self.name!r} is unknown; choose one of {', '.join(sorted(VARIANTS))}")
        in_range(self, name, "in [0, 1)", "drop_rate", "drop_path_rate")


@dataclass
class DataConfig(Section):
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

    def check(self, name: str) -> None:
        in_range(self, name, "> 0", "shuffle_buffer", "io_timeout_s", "io_chunk_bytes")
        in_range(self, name, ">= 0", "num_workers", "mixup_alpha", "io_retries")
        in_range(self, name, "in (0, 1]", "crop_scale_min", "eval_crop_pct")
        if self.decode == "gpu" and self.randaugment_ops > 0:
            raise ConfigError(
                f"{name}.decode=gpu cannot run RandAugment (it needs the decoded image in the worker); "
                f"set {name}.randaugment_ops=0 or {name}.decode=cpu"
            )


@dataclass
class OptimConfig(Section):
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

    def check(self, name: str) -> None:
        in_range(self, name, "> 0", "lr")
        in_range(self, name, ">= 0", "weight_decay", "grad_clip")


@dataclass
class ScheduleConfig(Section):
    warmup_steps: int = 10_000
    """Linear warmup from 0 to `optim.lr`."""
    decay: Literal["linear", "cosine", "constant"] = "linear"
    """Shape of the decay after warmup."""
    min_lr_ratio: float = 0.0
    """Floor of the decay, as a fraction of the peak learning rate."""

    def check(self, name: str) -> None:
        in_range(self, name, ">= 0", "warmup_steps")
        in_range(self, name, "in [0, 1)", "min_lr_ratio")


@dataclass
class TrainConfig(Section):
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

    def check(self, name: str) -> None:
        in_range(self, name, "> 0", "steps", "micro_batch_size", "global_batch_size", "grad_checkpointing_every")
        in_range(self, name, ">= 0", "eval_every_steps", "collective_timeout_s")
        in_range(self, name, "in [0, 1)", "label_smoothing")
        BatchPlan.of(self, world_size=1)  # the split that must hold on any number of ranks


@dataclass(frozen=True)
class BatchPlan:
    """How the images of one optimizer step split over ranks and micro-steps: built once per run (`BatchPlan.of`)
    and handed to the engine, the metrics and the loop, so that nothing else does this arithmetic."""

    micro_batch: int
    """Images per rank per forward/backward (`train.micro_batch_size`)."""
    accum_steps: int
    """Micro-batches per rank per optimizer step (gradient accumulation)."""
    world_size: int
    """Data-parallel ranks."""

    @property
    def per_rank(self) -> int:
        """Images per rank per optimizer step: this rank's share of the global batch."""
        return self.micro_batch * self.accum_steps

    @property
    def global_batch(self) -> int:
        """Images per optimizer step over all ranks (`train.global_batch_size`)."""
        return self.per_rank * self.world_size

    @classmethod
    def of(cls, train: TrainConfig, world_size: int) -> BatchPlan:
        """Split `train.global_batch_size` over `world_size` ranks; raises ConfigError if it does not divide."""
        per_micro_step = train.micro_batch_size * world_size
        if train.global_batch_size % per_micro_step:
            raise ConfigError(
                f"train.global_batch_size={train.global_batch_size} must be a multiple of train.micro_batch_size "
                f"({train.micro_batch_size}) x world size ({world_size}); use a multiple of {per_micro_step}"
            )
        return cls(train.micro_batch_size, train.global_batch_size // per_micro_step, world_size)


@dataclass
class CheckpointConfig(Section):
    every_steps: int = 1000
    """Save every N steps (and at the end)."""
    keep_last: int = 3
    """Keep the newest K checkpoints."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of M (0: none)."""
    every_minutes: float = 0.0
    """Also save when this many minutes passed since the last save, by rank 0's clock (0: off)."""

    def check(self, name: str) -> None:
        in_range(self, name, "> 0", "every_steps", "keep_last")
        in_range(self, name, ">= 0", "keep_every", "every_minutes")


@dataclass
class DeepSpeedConfig(Section):
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
class LogConfig(Section):
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

    def check(self, name: str) -> None:
        in_range(self, name, "> 0", "every_steps")


@dataclass
class FewshotConfig(Section):
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

    def check(self, name: str) -> None:
        parse_sets(self.sets)
        parse_shots(self.shots)
        in_range(self, name, ">= 0", "every_steps", "max_train_images", "max_test_images")


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

    def __post_init__(self) -> None:
        """Every section's own rules, then the rules across sections: an invalid Config is never built."""
        for f in dataclasses.fields(self):
            getattr(self, f.name).check(f.name)
        check_across(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), as written to YAML and stored in checkpoints."""
        return plain(dataclasses.asdict(self))


# ----------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (optional), apply `section.key=value` overrides, type-check and check the values."""
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
    return build_dataclass(Config, raw, "")  # checked as it is built (Config.__post_init__)


def check_across(cfg: Config) -> None:
    """The rules between sections (each section's own are its `check`). Raises ConfigError."""
    if cfg.train.precision == "fp16" and cfg.train.loss == "sigmoid" and cfg.model.head_bias_init < -8:
        raise ConfigError("model.head_bias_init below -8 overflows fp16 logits' gradients; use train.precision=bf16")


def head_size(model: ModelConfig, shard_classes: int, class_names: list[str]) -> int:
    """The head size: `model.num_classes`, else the training shards' class count (`_info.json`). The rule between the
    model section and the data, checked once the shards are found (`pretrain.train.trainer.preflight`)."""
    num_classes = model.num_classes or shard_classes or len(class_names)
    if not num_classes:
        raise ConfigError("model.num_classes is unset and the shards carry no class list; set model.num_classes")
    if shard_classes and model.num_classes and model.num_classes != shard_classes:
        raise ConfigError(
            f"model.num_classes={model.num_classes} but the shards have {shard_classes} classes; "
            "remove model.num_classes to take it from the data"
        )
    return num_classes


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write(path, dump_yaml(cfg))


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML text, sections in declaration order."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. stored in a checkpoint), typed and checked."""
    return build_dataclass(Config, raw, "")


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
