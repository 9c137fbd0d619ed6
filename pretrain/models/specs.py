"""THE registry of model variants: each is declared once here, and everything else derives from it.

Training (`model.name`), fine-tuning (`--model`), the config check, the export adapters (timm, torchvision, Hugging
Face: `pretrain.export.formats`) and the backbone loader all read these specs, so a new model family is one entry in
`SPECS`. This module imports no torch: the config loader uses it to refuse an unknown `model.name`.

The paper's ImageNet-21k models (pre-logits layer) are not separate entries: a run sets the pre-logits width with
`model.representation_size` on top of a variant (configs/vit_b16_i21k.yaml); which export formats hold the layer is
each adapter's `pre_logits_heads` (docs/export.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ViTArgs:
    """Shape and regularisation of one ViT."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    pool: str = "token"  # "token" (class token, as in the paper) or "gap" (global average pooling + fc_norm)
    representation_size: int | None = None  # pre-logits width of the paper's i21k models; None: no such layer
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    head_bias_init: float = 0.0


# THE shape keys: which `ViTArgs` fields make a model another shape. Every other module reads these tuples.
VARIANT_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
"""What tells registered variants apart; image size, head, pooling and regularisation are per-run settings."""
INPUT_FIELDS = ("img_size", "in_chans")
"""The input the model takes (the position embedding and the patch projection depend on them)."""
HEAD_FIELDS = ("num_classes", "pool", "representation_size")
"""The head: class count, pooling (`gap` adds `fc_norm`), pre-logits layer."""
BACKBONE_FIELDS = INPUT_FIELDS + VARIANT_FIELDS
"""The backbone at its input size: timm's `model_args` in an export's `config.json`."""
WEIGHT_FIELDS = BACKBONE_FIELDS + HEAD_FIELDS
"""Every field that changes a weight's shape: resuming a checkpoint that differs in any of them is refused."""


@dataclass(frozen=True)
class ModelSpec:
    """One registered variant."""

    name: str
    """Our name, the value of `model.name`."""
    args: ViTArgs
    """Default arguments: depth, width, heads, patch, MLP ratio, pre-logits width, image size, pooling."""
    timm: str | None
    """timm's model of exactly this shape at the default size, or None when timm has none."""

    def same_shape(self, args: ViTArgs) -> bool:
        """True when `args` describe this variant's weights (whatever the image size, head or pooling)."""
        return all(getattr(self.args, k) == getattr(args, k) for k in VARIANT_FIELDS)


SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        # A CPU-sized model for tests and the demo: 32 px images, 4x4 patches, 4 blocks.
        ModelSpec("vit_test_patch4", ViTArgs(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4), None),
        ModelSpec("vit_tiny_patch16", ViTArgs(embed_dim=192, depth=12, num_heads=3), "vit_tiny_patch16_224"),
        ModelSpec("vit_small_patch16", ViTArgs(embed_dim=384, depth=12, num_heads=6), "vit_small_patch16_224"),
        ModelSpec("vit_base_patch16", ViTArgs(embed_dim=768, depth=12, num_heads=12), "vit_base_patch16_224"),
        ModelSpec("vit_large_patch16", ViTArgs(embed_dim=1024, depth=24, num_heads=16), "vit_large_patch16_224"),
        ModelSpec(
            "vit_huge_patch14", ViTArgs(patch_size=14, embed_dim=1280, depth=32, num_heads=16), "vit_huge_patch14_224"
        ),
    )
}

# Views of SPECS for callers that need only one column.
VARIANTS: dict[str, ViTArgs] = {n: s.args for n, s in SPECS.items()}
TIMM_NAMES: dict[str, str] = {n: s.timm for n, s in SPECS.items() if s.timm}


class UnknownModelError(ValueError):
    """A model name that is not in `SPECS`; the message names the known ones."""


def get_spec(name: str) -> ModelSpec:
    """The registered variant `name`. Raises UnknownModelError naming the known variants."""
    if name not in SPECS:
        raise UnknownModelError(f"unknown model {name!r}; choose one of {', '.join(sorted(SPECS))}")
    return SPECS[name]


def spec_of_shape(args: ViTArgs) -> ModelSpec | None:
    """The first registered variant whose weights have the shape `args` describe, or None."""
    return next((s for s in SPECS.values() if s.same_shape(args)), None)


def resolve_args(name: str, **overrides: object) -> ViTArgs:
    """The variant's arguments with `overrides` applied (None values keep the default)."""
    return replace(get_spec(name).args, **{k: v for k, v in overrides.items() if v is not None})
