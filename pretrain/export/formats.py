"""Key names and metadata of the three export formats: timm, torchvision and Hugging Face transformers.

Our parameter names are timm's, so `timm` is the identity; `torchvision` and `hf` rename each tensor (and `hf`
splits the fused `qkv` projection into query/key/value). Every mapping works one tensor at a time, so the export
can stream: `map_tensor` is also run on `meta` tensors to know every output name and shape before any data is read.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, replace
from typing import Any

import torch

from pretrain.models.vit import TIMM_NAMES, ViTArgs, resize_pos_embed

FORMATS = ("timm", "torchvision", "hf")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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
    """`keep` the classifier head, or `drop` it (and the pre-logits layer) to export the backbone alone."""
    img_size: int | None = None
    """Resample the position embedding (bicubic) for this input size; None keeps the trained size."""


def check_options(args: ViTArgs, opts: ExportOptions) -> None:
    """Refuse exports the target library cannot represent, with the fix in the message."""
    if opts.format not in FORMATS:
        raise ExportError(f"unknown format {opts.format!r}; choose one of {', '.join(FORMATS)}")
    if opts.dtype not in DTYPES:
        raise ExportError(f"unknown dtype {opts.dtype!r}; choose one of {', '.join(DTYPES)}")
    if opts.head not in ("keep", "drop"):
        raise ExportError(f"--head must be keep or drop, got {opts.head!r}")
    if opts.head == "keep" and args.representation_size:
        raise ExportError(
            f"the model has a pre-logits layer (representation_size={args.representation_size}), which timm, "
            "torchvision and transformers ViTs lack; export the backbone with --head drop"
        )
    if opts.head == "keep" and args.num_classes <= 0:
        raise ExportError("the checkpoint has no classifier head (num_classes=0); export with --head drop")
    if opts.format in ("torchvision", "hf") and args.pool != "token":
        raise ExportError(
            f"{opts.format} ViTs pool the class token only; this model uses pool={args.pool!r}: use --format timm"
        )
    if opts.img_size is not None and (opts.img_size <= 0 or opts.img_size % args.patch_size):
        raise ExportError(f"--img-size {opts.img_size} is not a positive multiple of the patch size {args.patch_size}")


def target_args(args: ViTArgs, opts: ExportOptions) -> ViTArgs:
    """The model the exported weights describe: new input size, no head when dropped."""
    head = opts.head == "keep"
    return replace(
        args,
        img_size=opts.img_size or args.img_size,
        num_classes=args.num_classes if head else 0,
        representation_size=args.representation_size if head else None,
    )


def map_tensor(name: str, t: torch.Tensor, args: ViTArgs, opts: ExportOptions) -> list[tuple[str, torch.Tensor]]:
    """One of our (timm-named) fp32 tensors -> zero or more (name, tensor) of the target format."""
    if opts.head == "drop" and (name.startswith("head.") or name.startswith("pre_logits.")):
        return []
    if name == "pos_embed" and opts.img_size and opts.img_size != args.img_size:
        grid = opts.img_size // args.patch_size
        if t.is_meta:  # planning: only the shape matters
            t = torch.empty(1, 1 + grid * grid, t.shape[-1], device="meta")
        else:
            t = resize_pos_embed(t, grid)  # (1, 1 + g'*g', D), bicubic as timm's resample_abs_pos_embed
    if t.is_floating_point():
        t = t.to(DTYPES[opts.dtype])
    if opts.format == "timm":
        return [(name, t)]
    if opts.format == "torchvision":
        return [(_rename(name, _TORCHVISION), t)]
    return _to_hf(name, t, opts.head == "keep")


def _rename(name: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    raise ExportError(f"no mapping for parameter {name!r}; the checkpoint holds a model this export does not know")


# torchvision.models.vision_transformer: MLPBlock is Sequential(Linear, GELU, Dropout, Linear, Dropout).
_TORCHVISION = [
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
    (r"^head\.", "heads.head."),
]

# transformers' ViT checkpoint names (as its convert_vit_timm_to_pytorch.py writes them; transformers 5 renames
# them on load to its new module names, 4.x uses them as they are).
_HF = [
    (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
    (r"^cls_token$", "embeddings.cls_token"),
    (r"^pos_embed$", "embeddings.position_embeddings"),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layer.\1.layernorm_before."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layer.\1.layernorm_after."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"^norm\.", "layernorm."),
]


def _to_hf(name: str, t: torch.Tensor, head: bool) -> list[tuple[str, torch.Tensor]]:
    # With a head the file is a ViTForImageClassification checkpoint (backbone under "vit."), else a ViTModel one.
    prefix = "vit." if head else ""
    if name.startswith("head."):
        return [("classifier." + name[len("head.") :], t)]
    m = re.match(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", name)
    if m:  # fused (3D, D) / (3D,) in q, k, v order -> three (D, D) / (D,)
        base = f"{prefix}encoder.layer.{m.group(1)}.attention.attention"
        q, k, v = t.chunk(3, dim=0)
        return [
            (f"{base}.{part}.{m.group(2)}", x.contiguous())
            for part, x in zip(("query", "key", "value"), (q, k, v), strict=True)
        ]
    return [(prefix + _rename(name, _HF), t)]


# ------------------------------------------------------------------------------------------------- metadata


def metadata_files(args: ViTArgs, meta: dict[str, Any], opts: ExportOptions) -> dict[str, dict[str, Any]]:
    """JSON files (name -> content) that the target library, or a user of it, needs next to the weights.

    Args:
        args: the exported model (`target_args`).
        meta: the checkpoint's `pretrain_meta.json`.
        opts: the export options.
    """
    data = meta.get("config", {}).get("data", {})
    mean, std = list(data.get("mean", (0.5, 0.5, 0.5))), list(data.get("std", (0.5, 0.5, 0.5)))
    crop_pct = data.get("eval_crop_pct", 0.875)
    names = list(meta.get("class_names") or [])
    head = args.num_classes > 0
    if head and len(names) != args.num_classes:
        names = [str(i) for i in range(args.num_classes)]  # a checkpoint without usable class names
    mlp_dim = int(args.embed_dim * args.mlp_ratio)
    info = {
        "format": opts.format,
        "model_name": meta.get("model_name"),
        "model_args": dataclasses.asdict(args),
        "class_names": names if head else [],
        "head": opts.head,
        "dtype": opts.dtype,
        "mean": mean,
        "std": std,
        "source": {k: meta.get(k) for k in ("step", "samples_seen", "zero_stage", "world_size", "precision")},
    }
    files: dict[str, dict[str, Any]] = {"export_info.json": info}
    if opts.format == "timm":
        # Read by timm's `local-dir:` source (timm/models/_hub.py: load_model_config_from_path, _parse_model_cfg).
        files["config.json"] = {
            "architecture": TIMM_NAMES.get(meta.get("model_name", ""), "vit_base_patch16_224"),
            "num_classes": args.num_classes,
            "num_features": args.embed_dim,
            "global_pool": "token" if args.pool == "token" else "avg",
            **({"label_names": names} if head else {}),
            "model_args": {
                "img_size": args.img_size,
                "patch_size": args.patch_size,
                "in_chans": args.in_chans,
                "embed_dim": args.embed_dim,
                "depth": args.depth,
                "num_heads": args.num_heads,
                "mlp_ratio": args.mlp_ratio,
                "global_pool": "token" if args.pool == "token" else "avg",
            },
            "pretrained_cfg": {
                "input_size": [args.in_chans, args.img_size, args.img_size],
                "fixed_input_size": True,
                "interpolation": "bicubic",
                "crop_pct": crop_pct,
                "crop_mode": "center",
                "mean": mean,
                "std": std,
                "num_classes": args.num_classes,
                "first_conv": "patch_embed.proj",
                "classifier": "head",
            },
        }
    elif opts.format == "torchvision":
        vt_args = {
            "image_size": args.img_size,
            "patch_size": args.patch_size,
            "num_layers": args.depth,
            "num_heads": args.num_heads,
            "hidden_dim": args.embed_dim,
            "mlp_dim": mlp_dim,
            **({"num_classes": args.num_classes} if head else {}),
        }
        files["config.json"] = {
            "architecture": "torchvision.models.VisionTransformer",
            "vision_transformer_args": vt_args,
            "head": head,  # False: set `model.heads = torch.nn.Identity()` before load_state_dict (docs/export.md)
            "class_names": names if head else [],
            "mean": mean,
            "std": std,
            "interpolation": "bicubic",
            "crop_pct": crop_pct,
        }
    else:
        files["config.json"] = {
            "architectures": ["ViTForImageClassification" if head else "ViTModel"],
            "model_type": "vit",
            "hidden_size": args.embed_dim,
            "num_hidden_layers": args.depth,
            "num_attention_heads": args.num_heads,
            "intermediate_size": mlp_dim,
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
            "dtype": opts.dtype,
            **(
                {"id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}
                if head
                else {}
            ),
        }
        files["preprocessor_config.json"] = {
            "image_processor_type": "ViTImageProcessor",
            "do_resize": True,
            "size": {"height": args.img_size, "width": args.img_size},
            "resample": 3,  # PIL bicubic
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": mean,
            "image_std": std,
        }
    return files


def expected_shapes(args: ViTArgs) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of our model with these arguments, computed without building it (building even on the
    meta device imports ~900 modules, ~170 MiB and ~1.5 s: more than the whole streamed export needs)."""
    D, hidden, grid = args.embed_dim, int(args.embed_dim * args.mlp_ratio), args.img_size // args.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, D),
        "pos_embed": (1, 1 + grid * grid, D),
        "patch_embed.proj.weight": (D, args.in_chans, args.patch_size, args.patch_size),
        "patch_embed.proj.bias": (D,),
    }
    for i in range(args.depth):
        for name, shape in (
            ("norm1.weight", (D,)),
            ("norm1.bias", (D,)),
            ("attn.qkv.weight", (3 * D, D)),
            ("attn.qkv.bias", (3 * D,)),
            ("attn.proj.weight", (D, D)),
            ("attn.proj.bias", (D,)),
            ("norm2.weight", (D,)),
            ("norm2.bias", (D,)),
            ("mlp.fc1.weight", (hidden, D)),
            ("mlp.fc1.bias", (hidden,)),
            ("mlp.fc2.weight", (D, hidden)),
            ("mlp.fc2.bias", (D,)),
        ):
            shapes[f"blocks.{i}.{name}"] = shape
    norm = "norm" if args.pool == "token" else "fc_norm"
    shapes[f"{norm}.weight"], shapes[f"{norm}.bias"] = (D,), (D,)
    width = args.representation_size or 0
    if width:
        shapes["pre_logits.fc.weight"], shapes["pre_logits.fc.bias"] = (width, D), (width,)
    if args.num_classes > 0:
        shapes["head.weight"], shapes["head.bias"] = (args.num_classes, width or D), (args.num_classes,)
    return shapes
