"""Vision Transformer of "An Image is Worth 16x16 Words" (arXiv 2010.11929), weight-for-weight timm.

Parameter names and shapes equal timm's `VisionTransformer`, so `model.state_dict()` loads into
`timm.create_model("vit_base_patch16_224", num_classes=...)` with `strict=True` and gives the same outputs.
The optional pre-logits layer of the paper's ImageNet-21k models (`pre_logits.fc`) has no timm counterpart (the
names are those of timm's 2020 ViT, which had it); exports keep it where the format holds it (docs/export.md).

The variants and their arguments (`ViTArgs`) are declared in `pretrain.models.specs`. This module never imports
DeepSpeed or torch.distributed: wrapping happens in `pretrain.train.engine`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.models.specs import ViTArgs, resolve_args

__all__ = [
    "VisionTransformer",
    "ViTArgs",
    "create_vit",
    "param_shapes",
    "resize_pos_embed",
    "resolve_args",
    "train_flops_per_image",
]


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        # SDPA picks the flash / memory-efficient kernel on CUDA (bf16/fp16), the math kernel on CPU.
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PreLogits(nn.Module):
    """The paper's representation layer for ImageNet-21k pretraining: Linear + tanh before the head."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


Whole = Callable[[list[nn.Parameter]], AbstractContextManager]
"""Makes the given parameters whole (all their elements present) for the duration of the `with` block."""


def _as_is(params: list[nn.Parameter]) -> AbstractContextManager:
    return nullcontext()


def _lecun_std(w: torch.Tensor) -> float:
    return math.sqrt(1.0 / math.prod(w.shape[1:])) / 0.87962566103423978  # std of the truncated normal


class VisionTransformer(nn.Module):
    def __init__(self, args: ViTArgs, *, init: bool = True) -> None:
        """`init=False` leaves the paper's initialisation to a later `init_weights(whole=...)` call (a model built
        partitioned, whose parameters are not whole inside the constructor)."""
        super().__init__()
        if args.pool not in ("token", "gap"):
            raise ValueError(f"pool must be 'token' or 'gap', got {args.pool!r}")
        self.args = args
        D = args.embed_dim
        self.patch_embed = PatchEmbed(args.img_size, args.patch_size, args.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, D))
        self.pos_drop = nn.Dropout(args.drop_rate)
        dpr = [args.drop_path_rate * i / max(args.depth - 1, 1) for i in range(args.depth)]  # grows with depth
        self.blocks = nn.Sequential(
            *[Block(D, args.num_heads, args.mlp_ratio, args.drop_rate, dpr[i]) for i in range(args.depth)]
        )
        # timm: final norm before token pooling, or fc_norm after average pooling (then `norm` is absent).
        self.norm = nn.LayerNorm(D, eps=1e-6) if args.pool == "token" else nn.Identity()
        self.fc_norm = nn.LayerNorm(D, eps=1e-6) if args.pool == "gap" else nn.Identity()
        width = args.representation_size or 0
        self.pre_logits = PreLogits(D, width) if width else nn.Identity()
        self.head_drop = nn.Dropout(args.drop_rate)
        self.head = nn.Linear(width or D, args.num_classes) if args.num_classes > 0 else nn.Identity()
        self.grad_checkpointing = 0  # checkpoint every k-th block; 0 = off
        if init:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, whole: Whole = _as_is) -> None:
        """The paper's (JAX) initialisation: xavier-uniform linears, LeCun-normal patch projection,
        trunc-normal(0.02) class token and position embedding, zero head with a settable bias.

        Each parameter is written inside `whole([param])`: a no-op for an ordinary model; for a partitioned one it
        gathers the parameter, and re-partitions it afterwards. The random draws are the same either way.
        """
        for param, init in self._init_steps():
            with whole([param]):
                init(param)

    def _init_steps(self) -> Iterator[tuple[nn.Parameter, Callable[[torch.Tensor], object]]]:
        """(parameter, in-place initialiser) in the order of the random draws (the head's xavier draw included,
        though the head is zeroed after: the draws of every later parameter depend on it)."""
        yield self.pos_embed, lambda t: nn.init.trunc_normal_(t, std=0.02)
        yield self.cls_token, lambda t: nn.init.trunc_normal_(t, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                yield m.weight, nn.init.xavier_uniform_
                yield m.bias, (lambda t: nn.init.normal_(t, std=1e-6)) if ".mlp." in name else nn.init.zeros_
            elif isinstance(m, nn.LayerNorm):
                yield m.weight, nn.init.ones_
                yield m.bias, nn.init.zeros_
        # LeCun normal, truncated; fan-in = in_chans x patch x patch, read from the whole tensor
        yield self.patch_embed.proj.weight, lambda t: nn.init.trunc_normal_(t, std=_lecun_std(t))
        yield self.patch_embed.proj.bias, nn.init.zeros_
        if isinstance(self.head, nn.Linear):
            yield self.head.weight, nn.init.zeros_
            yield self.head.bias, lambda t: nn.init.constant_(t, self.args.head_bias_init)

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay besides biases and norms (see `pretrain.train.engine`)."""
        return {"pos_embed", "cls_token"}

    def set_grad_checkpointing(self, enable: bool = True, every: int = 1) -> None:
        """Recompute every `every`-th block in the backward pass instead of storing its activations."""
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.grad_checkpointing = every if enable else 0

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1 + N, D)
        x = self.pos_drop(x)
        k = self.grad_checkpointing
        for i, blk in enumerate(self.blocks):
            if k and self.training and i % k == 0 and torch.is_grad_enabled():
                # non-reentrant checkpoint: works with ZeRO-3's parameter hooks and keeps RNG (dropout) in sync
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)  # (B, 1 + N, D)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.args.pool == "token" else x[:, 1:].mean(dim=1)  # (B, D)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        if pre_logits:
            return x
        return self.head(self.pre_logits(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def create_vit(name: str, **overrides: object) -> VisionTransformer:
    """Build a registered variant, e.g. `create_vit("vit_base_patch16", num_classes=21843, img_size=384)`."""
    return VisionTransformer(resolve_args(name, **overrides))


def param_shapes(args: ViTArgs) -> dict[str, tuple[int, ...]]:
    """`VisionTransformer(args).state_dict()`'s names and shapes, in its order, without building the model (the
    export checks a checkpoint against them: building, even on the meta device, costs more than the export)."""
    D, hidden, grid = args.embed_dim, int(args.embed_dim * args.mlp_ratio), args.img_size // args.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, D),
        "pos_embed": (1, 1 + grid * grid, D),
        "patch_embed.proj.weight": (D, args.in_chans, args.patch_size, args.patch_size),
        "patch_embed.proj.bias": (D,),
    }
    block = {
        "norm1.weight": (D,),
        "norm1.bias": (D,),
        "attn.qkv.weight": (3 * D, D),
        "attn.qkv.bias": (3 * D,),
        "attn.proj.weight": (D, D),
        "attn.proj.bias": (D,),
        "norm2.weight": (D,),
        "norm2.bias": (D,),
        "mlp.fc1.weight": (hidden, D),
        "mlp.fc1.bias": (hidden,),
        "mlp.fc2.weight": (D, hidden),
        "mlp.fc2.bias": (D,),
    }
    for i in range(args.depth):
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
    norm = "norm" if args.pool == "token" else "fc_norm"
    shapes[f"{norm}.weight"], shapes[f"{norm}.bias"] = (D,), (D,)
    width = args.representation_size or 0
    if width:
        shapes["pre_logits.fc.weight"], shapes["pre_logits.fc.bias"] = (width, D), (width,)
    if args.num_classes > 0:
        shapes["head.weight"], shapes["head.bias"] = (args.num_classes, width or D), (args.num_classes,)
    return shapes


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resample a (1, prefix + g*g, D) position embedding to a new_grid x new_grid grid, bicubic (antialiased),
    keeping the class token's embedding aside. Same result as timm's `resample_abs_pos_embed`."""
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise ValueError(f"position embedding of {grid.shape[1]} patches is not a square grid")
    if old == new_grid:
        return pos_embed
    D = grid.shape[-1]
    grid = grid.float().reshape(1, old, old, D).permute(0, 3, 1, 2)  # (1, D, g, g)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, D).to(pos_embed.dtype)  # (1, g'*g', D)
    return torch.cat([prefix, grid], dim=1)


def train_flops_per_image(args: ViTArgs) -> float:
    """Matmul FLOPs of one training step per image: forward x 3 (backward costs twice the forward), except the
    patch projection, whose input needs no gradient (forward x 2).

    Counts what `torch.utils.flop_counter` counts (convolutions, linears, attention matmuls), 2 FLOPs per
    multiply-add. Recomputation from gradient checkpointing is not included: this is the model FLOPs used for MFU.
    """
    D, N, L = args.embed_dim, (args.img_size // args.patch_size) ** 2, args.depth
    T = N + 1  # tokens incl. class token
    hidden = int(D * args.mlp_ratio)
    patch = 2 * N * (args.in_chans * args.patch_size**2) * D
    per_block = 2 * T * D * 3 * D + 2 * 2 * T * T * D + 2 * T * D * D + 2 * 2 * T * D * hidden
    width = args.representation_size or 0
    head = 2 * width * D + 2 * (width or D) * args.num_classes
    return 2.0 * patch + 3.0 * (L * per_block + head)
