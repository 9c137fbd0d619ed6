"""The export formats, one adapter per target library over the model spec: timm, torchvision, Hugging Face, and
(`pretrain.export.plain`) a plain PyTorch `.pth` and the original JAX `.npz`.

Our parameter names are timm's, so the timm adapter keeps them; the others rename each tensor by a table of rules
(and `hf` splits the fused `qkv` projection into query/key/value). Each adapter also says which models its library
can hold and writes the JSON files (constructor arguments, labels, preprocessing) its library reads. Every mapping
works one tensor at a time, so the export can stream: `map_tensor` is also run on `meta` tensors to know every
output name and shape before any data is read. A new format is one adapter added to `ADAPTERS`; a new model family
is one entry in `pretrain.models.specs`. The `Adapter` interface and what every format shares: `pretrain.export.base`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import replace
from typing import Any

import torch

from pretrain.checkpoint_format import META
from pretrain.config import ConfigError, config_from_dict
from pretrain.export.base import (
    CONFIG,
    DTYPES,
    HEADS,
    INFO,
    WEIGHTS,  # noqa: F401 - re-exported (pretrain.downstream.backbone reads it from here)
    Adapter,
    ExportError,
    ExportOptions,
    Metadata,
)
from pretrain.export.plain import NpzAdapter, PthAdapter
from pretrain.models.specs import BACKBONE_FIELDS, SPECS, ModelSpec, UnknownModelError, ViTArgs, get_spec
from pretrain.models.vit import resize_pos_embed


class TimmAdapter(Adapter):
    """timm's `local-dir:` layout; our names are timm's."""

    name = "timm"
    GENERIC = "vit_base_patch16_224"
    """timm's ViT builder for a variant timm has no name for: `model_args` in config.json set the shape."""

    def architecture(self, spec: ModelSpec) -> str:
        """timm's model name for a variant."""
        return spec.timm or self.GENERIC

    def spec_of(self, architecture: str) -> ModelSpec | None:
        """The variant a timm model name starts from, whatever its image-size suffix (`vit_base_patch16_384`)."""
        family = re.sub(r"_\d+$", "", architecture)
        return next((s for s in SPECS.values() if s.timm and re.sub(r"_\d+$", "", s.timm) == family), None)

    def rename(self, name: str, t: torch.Tensor, args: ViTArgs, head: str) -> list[tuple[str, torch.Tensor]]:
        return [(name, t)]

    def config_files(self, spec: ModelSpec, args: ViTArgs, md: Metadata) -> dict[str, dict[str, Any]]:
        # Read by timm's `local-dir:` source (timm/models/_hub.py: load_model_config_from_path, _parse_model_cfg).
        pool = "token" if args.pool == "token" else "avg"
        config = {
            "architecture": self.architecture(spec),
            "num_classes": args.num_classes,
            "num_features": args.embed_dim,
            "global_pool": pool,
            **({"label_names": md.class_names} if args.num_classes > 0 else {}),
            "model_args": {**{k: getattr(args, k) for k in BACKBONE_FIELDS}, "global_pool": pool},
            "pretrained_cfg": {
                "input_size": [args.in_chans, args.img_size, args.img_size],
                "fixed_input_size": True,
                "interpolation": "bicubic",
                "crop_pct": md.crop_pct,
                "crop_mode": "center",
                "mean": md.mean,
                "std": md.std,
                "num_classes": args.num_classes,
                "first_conv": "patch_embed.proj",
                "classifier": "head",
            },
        }
        return {CONFIG: config}


_QKV = "{qkv}"
"""In a renaming rule's replacement: the fused (3D, D) projection is written as query, key and value tensors."""


class RenamingAdapter(Adapter):
    """A library whose names follow from ours by a table of rules."""

    rules: tuple[tuple[str, str], ...]
    """(regex on our name, replacement); the first rule that matches wins."""
    backbone_prefix = ""
    """Prefix of every backbone name when the head is kept."""
    class_token_only = True

    def rename(self, name: str, t: torch.Tensor, args: ViTArgs, head: str) -> list[tuple[str, torch.Tensor]]:
        new = next((re.sub(p, r, name) for p, r in self.rules if re.search(p, name)), None)
        if new is None:
            raise ExportError(
                f"no mapping for parameter {name!r}; the checkpoint holds a model this export does not know"
            )
        if head == "keep" and not name.startswith("head."):
            new = self.backbone_prefix + new
        if _QKV not in new:
            return [(new, t)]
        parts = t.chunk(3, dim=0)  # (3D, D) / (3D,) in q, k, v order -> three (D, D) / (D,)
        return [(new.replace(_QKV, k), x.contiguous()) for k, x in zip(("query", "key", "value"), parts, strict=True)]


class TorchvisionAdapter(RenamingAdapter):
    """torchvision.models.vision_transformer; its MLPBlock is Sequential(Linear, GELU, Dropout, Linear, Dropout)."""

    name = "torchvision"
    pre_logits_heads = ("keep", "drop")  # VisionTransformer(representation_size=...): heads.pre_logits + Tanh
    rules = (
        (r"^patch_embed\.proj\.", "conv_proj."),
        (r"^cls_token$", "class_token"),
        (r"^pos_embed$", "encoder.pos_embedding"),
        (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.encoder_layer_\1.ln_1."),
        (r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", r"encoder.layers.encoder_layer_\1.self_attention.in_proj_\2"),
        (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.encoder_layer_\1.self_attention.out_proj."),
        (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.encoder_layer_\1.ln_2."),
        (r"^blocks\.(\d+)\.mlp\.fc1\.", r"encoder.layers.encoder_layer_\1.mlp.0."),
        (r"^blocks\.(\d+)\.mlp\.fc2\.", r"encoder.layers.encoder_layer_\1.mlp.3."),
        (r"^norm\.", "encoder.ln."),
        (r"^pre_logits\.fc\.", "heads.pre_logits."),
        (r"^head\.", "heads.head."),
    )

    def config_files(self, spec: ModelSpec, args: ViTArgs, md: Metadata) -> dict[str, dict[str, Any]]:
        head = args.num_classes > 0
        vt_args = {
            "image_size": args.img_size,
            "patch_size": args.patch_size,
            "num_layers": args.depth,
            "num_heads": args.num_heads,
            "hidden_dim": args.embed_dim,
            "mlp_dim": int(args.embed_dim * args.mlp_ratio),
            **({"num_classes": args.num_classes} if head else {}),
            **({"representation_size": args.representation_size} if head and args.representation_size else {}),
        }
        config = {
            "architecture": "torchvision.models.VisionTransformer",
            "vision_transformer_args": vt_args,
            "head": head,  # False: set `model.heads = torch.nn.Identity()` before load_state_dict (docs/export.md)
            "class_names": md.class_names,
            "mean": md.mean,
            "std": md.std,
            "interpolation": "bicubic",
            "crop_pct": md.crop_pct,
        }
        return {CONFIG: config}


class HFAdapter(RenamingAdapter):
    """transformers' ViT checkpoint names, as its convert_vit_timm_to_pytorch.py writes them (transformers 5
    renames them on load to its new module names, 4.x uses them as they are). With a head the file is a
    ViTForImageClassification checkpoint (backbone under "vit."), else a ViTModel one, whose pooler (dense + tanh)
    holds the pre-logits layer with `--head pre-logits` (the layout of the Hub's in21k checkpoints).
    ViTForImageClassification classifies the class token directly, so no class holds pre-logits and head."""

    name = "hf"
    pre_logits_heads = ("pre-logits", "drop")
    backbone_prefix = "vit."
    rules = (
        (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
        (r"^cls_token$", "embeddings.cls_token"),
        (r"^pos_embed$", "embeddings.position_embeddings"),
        (r"^blocks\.(\d+)\.norm1\.", r"encoder.layer.\1.layernorm_before."),
        (r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", r"encoder.layer.\1.attention.attention." + _QKV + r".\2"),
        (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.output.dense."),
        (r"^blocks\.(\d+)\.norm2\.", r"encoder.layer.\1.layernorm_after."),
        (r"^blocks\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
        (r"^blocks\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
        (r"^norm\.", "layernorm."),
        (r"^pre_logits\.fc\.", "pooler.dense."),
        (r"^head\.", "classifier."),
    )

    def config_files(self, spec: ModelSpec, args: ViTArgs, md: Metadata) -> dict[str, dict[str, Any]]:
        names, head = md.class_names, args.num_classes > 0
        config = {
            "architectures": ["ViTForImageClassification" if head else "ViTModel"],
            "model_type": "vit",
            "hidden_size": args.embed_dim,
            "num_hidden_layers": args.depth,
            "num_attention_heads": args.num_heads,
            "intermediate_size": int(args.embed_dim * args.mlp_ratio),
            "hidden_act": "gelu",  # exact (erf) GELU, as nn.GELU()
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "initializer_range": 0.02,
            "layer_norm_eps": 1e-6,  # ViT's; transformers' default 1e-12 would change every feature
            "image_size": args.img_size,
            "patch_size": args.patch_size,
            "num_channels": args.in_chans,
            "qkv_bias": True,
            "encoder_stride": args.patch_size,
            "dtype": md.dtype,
            # --head pre-logits: the pooler (dense + tanh) is the pre-logits layer
            **({"pooler_output_size": width, "pooler_act": "tanh"} if (width := args.representation_size) else {}),
            **(
                {"id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}
                if head
                else {}
            ),
        }
        preprocessor = {
            "image_processor_type": "ViTImageProcessor",
            "do_resize": True,
            "size": {"height": args.img_size, "width": args.img_size},
            "resample": 3,  # PIL bicubic
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": md.mean,
            "image_std": md.std,
        }
        return {CONFIG: config, "preprocessor_config.json": preprocessor}


TIMM = TimmAdapter()
ADAPTERS: dict[str, Adapter] = {
    a.name: a for a in (TIMM, TorchvisionAdapter(), HFAdapter(), PthAdapter(), NpzAdapter())
}
FORMATS = tuple(ADAPTERS)


def default_head(args: ViTArgs, format: str) -> str:
    """--head when not given: `keep` what the format can hold whole, else `drop` (the paper's fine-tuning recipe:
    remove the head and the pre-logits layer)."""
    adapter = ADAPTERS.get(format)
    if args.num_classes <= 0 or (args.representation_size and adapter and "keep" not in adapter.pre_logits_heads):
        return "drop"
    return "keep"


def check_options(args: ViTArgs, opts: ExportOptions) -> None:
    """Refuse exports the target library cannot represent, with the fix in the message."""
    if opts.format not in ADAPTERS:
        raise ExportError(f"unknown format {opts.format!r}; choose one of {', '.join(FORMATS)}")
    adapter = ADAPTERS[opts.format]
    if opts.dtype not in DTYPES:
        raise ExportError(f"unknown dtype {opts.dtype!r}; choose one of {', '.join(DTYPES)}")
    if opts.dtype not in adapter.dtypes:
        raise ExportError(f"--format {opts.format} stores {', '.join(adapter.dtypes)} only; use --dtype float32")
    if opts.head not in HEADS:
        raise ExportError(f"--head must be one of {', '.join(HEADS)}, got {opts.head!r}")
    width = args.representation_size
    if opts.head == "pre-logits" and not width:
        raise ExportError("the model has no pre-logits layer (representation_size); use --head keep or drop")
    if opts.head != "drop" and width and opts.head not in adapter.pre_logits_heads:
        what = "the pre-logits layer and the head" if opts.head == "keep" else "the pre-logits layer alone"
        can = ", ".join(f for f, a in ADAPTERS.items() if opts.head in a.pre_logits_heads)
        raise ExportError(
            f"--format {opts.format} cannot hold {what} (representation_size={width}); --head {opts.head} works "
            f"with --format {can}, and --format {opts.format} takes --head {' or '.join(adapter.pre_logits_heads)}"
        )
    if opts.head == "keep" and args.num_classes <= 0:
        raise ExportError("the checkpoint has no classifier head (num_classes=0); export with --head drop")
    if ADAPTERS[opts.format].class_token_only and args.pool != "token":
        raise ExportError(
            f"{opts.format} ViTs pool the class token only; this model uses pool={args.pool!r}: use --format timm"
        )
    if opts.img_size is not None and (opts.img_size <= 0 or opts.img_size % args.patch_size):
        raise ExportError(f"--img-size {opts.img_size} is not a positive multiple of the patch size {args.patch_size}")


def target_args(args: ViTArgs, opts: ExportOptions) -> ViTArgs:
    """The model the exported weights describe: new input size, no head (or pre-logits layer) when dropped."""
    return replace(
        args,
        img_size=opts.img_size or args.img_size,
        num_classes=args.num_classes if opts.head == "keep" else 0,
        representation_size=args.representation_size if opts.head != "drop" else None,
    )


def map_tensor(name: str, t: torch.Tensor, args: ViTArgs, opts: ExportOptions) -> list[tuple[str, torch.Tensor]]:
    """One of our (timm-named) fp32 tensors -> zero or more (name, tensor) of the target format."""
    if (opts.head != "keep" and name.startswith("head.")) or (opts.head == "drop" and name.startswith("pre_logits.")):
        return []
    if name == "pos_embed" and opts.img_size and opts.img_size != args.img_size:
        grid = opts.img_size // args.patch_size
        if t.is_meta:  # planning: only the shape matters
            t = torch.empty(1, 1 + grid * grid, t.shape[-1], device="meta")
        else:
            t = resize_pos_embed(t, grid)  # (1, 1 + g'*g', D), bicubic as timm's resample_abs_pos_embed
    if t.is_floating_point():
        t = t.to(DTYPES[opts.dtype])
    return ADAPTERS[opts.format].rename(name, t, args, opts.head)


def metadata_files(args: ViTArgs, meta: dict[str, Any], opts: ExportOptions) -> dict[str, dict[str, Any]]:
    """JSON files (name -> content) that the target library, or a user of it, needs next to the weights.

    Args:
        args: the exported model (`target_args`).
        meta: the checkpoint's `pretrain_meta.json` (`model_name`, `class_names`, `config.data`, source fields).
        opts: the export options.

    Raises:
        ExportError: `model_name` is not a registered variant, or `config.data` lacks the preprocessing.
    """
    try:
        spec = get_spec(meta.get("model_name"))
    except UnknownModelError as e:
        raise ExportError(f"{e} (model_name in {META})") from None
    stored = meta.get("config")
    if not isinstance(stored, dict) or "data" not in stored:
        raise ExportError(f"{META} lacks config.data (the preprocessing); the checkpoint is damaged")
    try:
        data = config_from_dict(stored).data  # the run's config, typed as it was written
    except ConfigError as e:
        raise ExportError(f"{META} holds an unreadable config ({e}); the checkpoint is damaged") from None
    mean, std, crop_pct = list(data.mean), list(data.std), data.eval_crop_pct
    names = list(meta.get("class_names") or [])
    head = args.num_classes > 0
    if head and len(names) != args.num_classes:
        names = [str(i) for i in range(args.num_classes)]  # a checkpoint without usable class names
    md = Metadata(class_names=names if head else [], mean=mean, std=std, crop_pct=crop_pct, dtype=opts.dtype)
    info = {
        "format": opts.format,
        "model_name": meta.get("model_name"),
        "model_args": dataclasses.asdict(args),
        "class_names": md.class_names,
        "head": opts.head,
        "dtype": opts.dtype,
        "mean": mean,
        "std": std,
        "crop_pct": crop_pct,
        "source": {k: meta.get(k) for k in ("step", "samples_seen", "zero_stage", "world_size", "precision")},
    }
    return {INFO: info, **ADAPTERS[opts.format].config_files(spec, args, md)}
