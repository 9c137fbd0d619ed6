"""The rules two JAX code bases apply when they load a ViT `.npz`, re-implemented in Python + numpy (no JAX), so tests
can put our `--format npz` exports through them: key sets, shapes, what each loader reads, replaces and drops.

Each function names the upstream file and lines it mirrors, at these revisions:

- google-research/vision_transformer c6de1e53 (2024-05-21): `vit_jax/checkpoint.py`, `vit_jax/models_vit.py`,
  `vit_jax/train.py` (its fine-tuning entry point);
- google-research/big_vision 0127fb6b (2025-05-19): `big_vision/models/vit.py`, `big_vision/models/common.py`,
  `big_vision/utils.py`, `big_vision/train.py`, `big_vision/configs/transfer.py`;
- google/flax 18f8f311: `flax/training/checkpoints.py` (`convert_pre_linen`, which both loaders call),
  `flax/core/scope.py` (what `model.apply` demands of the params), `flax/linen/attention.py` (attention shapes).

Leaves are numpy arrays. A model's own parameters (what its `init` gives) are zero-stride arrays of the right shape
(`_leaf`), so even a ViT-H tree costs no memory.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage

Tree = dict[str, Any]


def _leaf(*shape: int) -> np.ndarray:
    return np.broadcast_to(np.float32(0), shape)


# ------------------------------------------------------------------------------------------------ shared by both


def recover_tree(keys: list[str], values: list[Any]) -> Tree:
    """vit_jax/checkpoint.py:83-109 (the same code as big_vision/utils.py:836-862): '/'-joined names -> nested dicts."""
    tree: Tree = {}
    sub_trees: dict[str, list] = defaultdict(list)
    for k, v in zip(keys, values, strict=True):
        if "/" not in k:
            tree[k] = v
        else:
            left, right = k.split("/", 1)
            sub_trees[left].append((right, v))
    for k, pairs in sub_trees.items():
        sub_keys, sub_values = zip(*pairs, strict=True)
        tree[k] = recover_tree(list(sub_keys), list(sub_values))
    return tree


_MODULE_NUM_RE = re.compile(r"(.*)_\d+$")  # flax/training/checkpoints.py:61
_SIGNED_FLOAT_RE = re.compile(r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)")  # flax/training/checkpoints.py:55


def _natural_sort(names: list[str]) -> list[str]:
    """flax/training/checkpoints.py:347-372 (signed=True): number substrings compare as numbers."""

    def split(s: str) -> list:
        return [float(c) if _SIGNED_FLOAT_RE.match(c) else c for c in _SIGNED_FLOAT_RE.split(s)]

    return sorted(names, key=split)


def convert_pre_linen(tree: Any) -> Any:
    """flax/training/checkpoints.py:1240-1257: at every level, in natural order, `Name_<n>` is renumbered per
    `Name` from 0 (pre-Linen numbered submodules across classes: vit_jax's `LayerNorm_0, MultiHeadDotProduct-
    Attention_1, LayerNorm_2, MlpBlock_3` become `LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1,
    MlpBlock_0`). vit_jax/checkpoint.py:135 and big_vision/models/vit.py:327-328 call it on every load."""
    if not isinstance(tree, dict):
        return tree
    renamed, counts = {}, {}
    for name in _natural_sort(list(tree)):
        value = tree[name]
        if m := _MODULE_NUM_RE.match(name):
            module = m.group(1)
            num = counts.get(module, 0)
            name = f"{module}_{num}"
            counts[module] = num + 1
        renamed[name] = convert_pre_linen(value)
    return renamed


def flatten(tree: Tree, parent: str = "") -> dict[str, Any]:
    """vit_jax/checkpoint.py:31-45 `_flatten_dict`: '/'-joined leaf names; an explicitly empty dict is kept as a leaf.
    (big_vision's `tree_flatten_with_names`, utils.py:616-669, gives the same names for dicts of arrays.)"""
    items: dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{parent}/{k}" if parent else k
        if isinstance(v, dict):
            items.update(flatten(v, path))
        else:
            items[path] = v
    if parent and not tree:
        items[parent] = {}
    return items


def check_apply(params: Tree, init_params: Tree) -> None:
    """What `model.apply({"params": params}, ...)` demands, flax/core/scope.py:955-982: every parameter the model
    declares exists (else ScopeParamNotFoundError) with the shape its initializer gives (else ScopeParamShapeError).
    Parameters the model does not declare are never looked up. Raises ValueError naming the first violation."""
    have = flatten(params)
    for name, want in flatten(init_params).items():
        if isinstance(want, dict):  # a module without parameters
            continue
        if name not in have:
            raise ValueError(f"ScopeParamNotFoundError: {name}")
        if np.shape(have[name]) != np.shape(want):
            raise ValueError(f"ScopeParamShapeError: {name} {np.shape(have[name])} != {np.shape(want)}")


@dataclass(frozen=True)
class ViTShape:
    """A class-token ViT as both code bases describe it (the names are vit_jax's config keys)."""

    img_size: int
    patch: int
    hidden: int
    depth: int
    heads: int
    mlp_dim: int
    representation_size: int | None
    num_classes: int

    @classmethod
    def of(cls, args: dict[str, Any]) -> ViTShape:
        """From our model arguments (`ViTArgs` fields, as `pretrain_meta.json` stores them)."""
        D = args["embed_dim"]
        return cls(
            img_size=args["img_size"],
            patch=args["patch_size"],
            hidden=D,
            depth=args["depth"],
            heads=args["num_heads"],
            mlp_dim=int(D * args.get("mlp_ratio", 4.0)),
            representation_size=args.get("representation_size"),
            num_classes=args["num_classes"],
        )


def _block(s: ViTShape) -> Tree:
    """One Linen-named encoder block: vit_jax/models_vit.py:105-156 = big_vision/models/vit.py:81-112 (LayerNorm,
    attention, LayerNorm, MlpBlock 66-102 / 57-78). Attention shapes: flax/linen/attention.py:534-551 (query, key,
    value: DenseGeneral from D to (heads, head_dim)) and 678-687 (out: from (heads, head_dim) to D)."""
    D, H = s.hidden, s.heads
    qkv = {"kernel": _leaf(D, H, D // H), "bias": _leaf(H, D // H)}
    return {
        "LayerNorm_0": {"scale": _leaf(D), "bias": _leaf(D)},
        "MultiHeadDotProductAttention_0": {
            **{k: dict(qkv) for k in ("query", "key", "value")},
            "out": {"kernel": _leaf(H, D // H, D), "bias": _leaf(D)},
        },
        "LayerNorm_1": {"scale": _leaf(D), "bias": _leaf(D)},
        "MlpBlock_0": {
            "Dense_0": {"kernel": _leaf(D, s.mlp_dim), "bias": _leaf(s.mlp_dim)},
            "Dense_1": {"kernel": _leaf(s.mlp_dim, D), "bias": _leaf(D)},
        },
    }


def _top(s: ViTShape, rep_size: int | None) -> Tree:
    """`pre_logits` (a Dense only with a representation size) and `head` (only with classes): vit_jax/models_vit.py:
    296-307, big_vision/models/vit.py:259-274."""
    tree: Tree = {}
    if rep_size:
        tree["pre_logits"] = {"kernel": _leaf(s.hidden, rep_size), "bias": _leaf(rep_size)}
    if s.num_classes:
        tree["head"] = {"kernel": _leaf(rep_size or s.hidden, s.num_classes), "bias": _leaf(s.num_classes)}
    return tree


# ------------------------------------------------------------------------------------------------------- vit_jax


def vit_jax_init_params(s: ViTShape) -> Tree:
    """`models_vit.VisionTransformer(num_classes, representation_size, classifier='token', ...).init(...)["params"]`
    (vit_jax/models_vit.py:211-308): `embedding` Conv (264-270), `cls` (280-283), `Transformer` (285; Encoder
    159-208: `posembed_input` (1, 1 + tokens, D) added after the class token (190-194, 60-62), `encoderblock_{i}`
    (198-205), `encoder_norm` (206)), then `pre_logits` and `head` (296-307; the IdentityLayer has no params)."""
    grid = s.img_size // s.patch
    D = s.hidden
    return {
        "embedding": {"kernel": _leaf(s.patch, s.patch, 3, D), "bias": _leaf(D)},
        "cls": _leaf(1, 1, D),
        "Transformer": {
            "posembed_input": {"pos_embedding": _leaf(1, 1 + grid * grid, D)},
            **{f"encoderblock_{i}": _block(s) for i in range(s.depth)},
            "encoder_norm": {"scale": _leaf(D), "bias": _leaf(D)},
        },
        **_top(s, s.representation_size),
    }


def vit_jax_load(path: Path) -> Tree:
    """vit_jax/checkpoint.py:130-140 `load`: every array of the file, as a tree, pre-Linen names converted.
    (`_fix_groupnorm`, 143-156, squeezes only `gn*` modules of the hybrid models: none in a ViT.)"""
    with np.load(path, allow_pickle=False) as f:
        keys = list(f.files)
        values = [f[k] for k in keys]
    return convert_pre_linen(recover_tree(keys, values))


def vit_jax_inspect_params(
    *, params: Tree, expected: Tree, fail_if_extra: bool = True, fail_if_missing: bool = True
) -> Tree:
    """vit_jax/checkpoint.py:48-80: compare the flat key sets; an expected empty module is added back (61-66);
    missing or extra keys raise ValueError when asked to (75-79)."""
    params_flat, expected_flat = flatten(params), flatten(expected)
    missing = expected_flat.keys() - params_flat.keys()
    extra = params_flat.keys() - expected_flat.keys()
    empty = {k for k in missing if isinstance(expected_flat[k], dict) and not expected_flat[k]}
    for k in empty:
        params[k] = {}
    missing -= empty
    if (missing and fail_if_missing) or (extra and fail_if_extra):
        raise ValueError(
            f"Missing params from checkpoint: {sorted(missing)}. Extra params in checkpoint: {sorted(extra)}"
        )
    return params


def vit_jax_interpolate_posembed(posemb: np.ndarray, num_tokens: int, has_class_token: bool) -> np.ndarray:
    """vit_jax/checkpoint.py:209-238: keep the class token's entry, zoom the square grid (order 1) to the new one."""
    assert posemb.shape[0] == 1
    if has_class_token:
        tok, grid = posemb[:, :1], posemb[0, 1:]
        num_tokens -= 1
    else:
        tok, grid = posemb[:, :0], posemb[0, 0:]
    gs_old, gs_new = int(np.sqrt(len(grid))), int(np.sqrt(num_tokens))
    assert gs_old**2 == len(grid), f"{gs_old**2} != {len(grid)}"
    assert gs_new**2 == num_tokens, f"{gs_new**2} != {num_tokens}"
    grid = scipy.ndimage.zoom(grid.reshape(gs_old, gs_old, -1), (gs_new / gs_old, gs_new / gs_old, 1), order=1)
    return np.concatenate([tok, grid.reshape(1, gs_new * gs_new, -1)], axis=1)


def vit_jax_load_pretrained(path: Path, init_params: Tree, representation_size: int | None) -> Tree:
    """vit_jax/checkpoint.py:159-206 `load_pretrained`, as vit_jax/train.py:128-131 calls it to fine-tune (model
    config: classifier 'token'; representation_size None in every fine-tuning config, vit_jax/configs/models.py).

    Loose key check (174-178); with representation_size None a `pre_logits` subtree is emptied (185-188); the
    file's `head` kernel and bias are replaced by the new model's (189-190): a file without `head` raises
    KeyError('head') here. A position embedding of another length is interpolated (192-201)."""
    restored = vit_jax_inspect_params(
        params=vit_jax_load(path), expected=init_params, fail_if_extra=False, fail_if_missing=False
    )
    if representation_size is None and "pre_logits" in restored:
        restored["pre_logits"] = {}
    restored["head"]["kernel"] = init_params["head"]["kernel"]
    restored["head"]["bias"] = init_params["head"]["bias"]
    if "posembed_input" in restored.get("Transformer", {}):
        posemb = restored["Transformer"]["posembed_input"]["pos_embedding"]
        posemb_new = init_params["Transformer"]["posembed_input"]["pos_embedding"]
        if posemb.shape != posemb_new.shape:
            posemb = vit_jax_interpolate_posembed(posemb, posemb_new.shape[1], has_class_token=True)
            restored["Transformer"]["posembed_input"]["pos_embedding"] = posemb
    return restored


# ----------------------------------------------------------------------------------------------------- big_vision


def bv_init_params(s: ViTShape, rep_size: int | None, pool_type: str = "tok") -> Tree:
    """`big_vision.models.vit.Model(num_classes, variant, rep_size=..., pool_type=...).init(...)["params"]`
    (big_vision/models/vit.py:186-276, not scanned): `embedding` Conv (212-214), `pos_embedding` (1, h*w, D) of the
    patch grid only, added before the class token (219-221; get_posemb 47-50), `cls` only for pool_type 'tok'
    (223-225), `Transformer` (230-239; Encoder 115-160: `encoderblock_{i}` 150-157, `encoder_norm` 160), then
    `pre_logits` and `head` (259-274)."""
    grid = s.img_size // s.patch
    D = s.hidden
    return {
        "embedding": {"kernel": _leaf(s.patch, s.patch, 3, D), "bias": _leaf(D)},
        "pos_embedding": _leaf(1, grid * grid, D),
        **({"cls": _leaf(1, 1, D)} if pool_type == "tok" else {}),
        "Transformer": {
            **{f"encoderblock_{i}": _block(s) for i in range(s.depth)},
            "encoder_norm": {"scale": _leaf(D), "bias": _leaf(D)},
        },
        **_top(s, rep_size),
    }


def bv_load_params(path: Path) -> Tree:
    """big_vision/utils.py:172-227 `load_params` on a local `.npz`: `npload` (133-148), `load_checkpoint_np`'s
    `recover_tree` (151-169); the params are the whole tree unless it holds `params` or `opt` (206-214).
    (`recover_dtype`, 827-833, only re-views 2-byte arrays as bfloat16: ours are float32.)"""
    with np.load(path, allow_pickle=False) as f:
        loaded = {k: f[k] for k in f.files}
    tree = recover_tree(list(loaded), list(loaded.values()))
    if "params" in tree:
        return tree["params"]
    return tree["opt"]["target"] if "opt" in tree else tree


def bv_fix_old_checkpoints(params: Tree) -> Tree:
    """big_vision/models/vit.py:324-360: Linen names (327-328); the paper's `Transformer/posembed_input/pos_embedding`
    moves to `pos_embedding` (331-339); a (1, 1 + g*g, D) one is split: its first entry is added to `cls` and the
    grid stays (345-351), since big_vision adds the position embedding before the class token is prepended."""
    params = convert_pre_linen(params)
    if "posembed_input" in params["Transformer"]:
        params["pos_embedding"] = params["Transformer"].pop("posembed_input")["pos_embedding"]
    if "pos_embedding" in params["Transformer"]:
        params["pos_embedding"] = params["Transformer"].pop("pos_embedding")
    if "pos_embedding" in params:
        pe = params["pos_embedding"]
        if int(np.sqrt(pe.shape[1])) ** 2 + 1 == int(pe.shape[1]):
            pe_cls, params["pos_embedding"] = pe[:, :1], pe[:, 1:]
            if "cls" in params:
                params["cls"] = params["cls"] + pe_cls
    if "probe" in params:  # 353-358: MAP-head checkpoints only
        raise NotImplementedError("MAP-head checkpoints are not mirrored")
    return params


def bv_merge_params(loaded: Tree, inited: Tree, dont_load: list[str] | tuple[str, ...] = ()) -> Tree:
    """big_vision/models/common.py:24-92 `merge_params`: every parameter of the model (`inited`) is taken from the
    checkpoint unless a `dont_load` regex fullmatches its name (47-65); a name on one side only that no pattern
    covers raises ValueError (73-90). Shapes are not compared here. Patterns as utils.py:1169-1192 (none may start
    with '/')."""
    patterns = [re.compile(p) for p in ([dont_load] if isinstance(dont_load, str) else dont_load)]
    assert not any(p.pattern.startswith("/") for p in patterns)

    def should_merge(name: str) -> bool:
        return not any(p.fullmatch(name) for p in patterns)

    loaded_flat, inited_flat = flatten(loaded), flatten(inited)
    merged = {n: loaded_flat[n] if n in loaded_flat and should_merge(n) else v for n, v in inited_flat.items()}
    not_in_loaded = {k for k in inited_flat.keys() - loaded_flat.keys() if should_merge(k)}
    not_in_inited = {k for k in loaded_flat.keys() - inited_flat.keys() if should_merge(k)}
    if not_in_loaded or not_in_inited:
        raise ValueError(
            f"Params in model (code) but not in checkpoint and not `dont_load`ed: {sorted(not_in_loaded)}; "
            f"Params in checkpoint but not in model (code) and not `dont_load`ed: {sorted(not_in_inited)}"
        )
    return recover_tree(list(merged), list(merged.values()))


def bv_resample_posemb(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """big_vision/models/vit.py:306-321: a square grid zoomed (order 1) to the new grid."""
    if old.shape == new.shape:
        return old
    gs_old, gs_new = int(np.sqrt(old.shape[1])), int(np.sqrt(new.shape[1]))
    grid = scipy.ndimage.zoom(old.reshape(gs_old, gs_old, -1), (gs_new / gs_old, gs_new / gs_old, 1), order=1)
    return grid.reshape(1, gs_new * gs_new, -1)


def bv_load(init_params: Tree, path: Path, dont_load: list[str] | tuple[str, ...] = ()) -> Tree:
    """big_vision/models/vit.py:408-433 `load`, as big_vision/train.py:353-359 calls it with `config.model_load`
    (configs/transfer.py:42: `dont_load=['head/kernel', 'head/bias']`), for an unscanned model (416-421 convert
    scanned checkpoints only; ours are not)."""
    restored = bv_fix_old_checkpoints(bv_load_params(path))
    assert "encoderblock" not in restored["Transformer"]
    restored = bv_merge_params(restored, init_params, dont_load)
    if init_params and "pos_embedding" in init_params:
        restored["pos_embedding"] = bv_resample_posemb(restored["pos_embedding"], init_params["pos_embedding"])
    return restored


# ---------------------------------------------------------------------------------------------------- the uses

HEAD = ["head/kernel", "head/bias"]
"""big_vision's usual `dont_load` when transferring (configs/transfer.py:42)."""


def file_shape(path: Path, img_size: int, patch: int) -> ViTShape:
    """The model a vit_jax-layout `.npz` describes: pre-logits width and classes from what it holds."""
    with np.load(path, allow_pickle=False) as f:
        shapes = {k: f[k].shape for k in f.files}
    depth = sum(1 for k in shapes if k.endswith("LayerNorm_0/scale"))
    q = shapes["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"]  # (D, heads, head_dim)
    return ViTShape(
        img_size=img_size,
        patch=patch,
        hidden=q[0],
        depth=depth,
        heads=q[1],
        mlp_dim=shapes["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"][1],
        representation_size=shapes["pre_logits/bias"][0] if "pre_logits/bias" in shapes else None,
        num_classes=shapes["head/bias"][0] if "head/bias" in shapes else 0,
    )


def outcomes(path: Path, trained: ViTShape, new_classes: int = 5, img_size: int | None = None) -> dict[str, str]:
    """Each way the two code bases load `path` (a vit_jax-layout `.npz` of the model `trained`, or of its backbone)
    -> "ok", or the exception it raises (`KeyError: 'head'`, `ValueError: ...`). Fine-tuning builds a model with
    `new_classes` classes at `img_size` (default: the trained size) and then checks what `model.apply` needs.

    - `vit_jax finetune`: `load_pretrained` for a model without the pre-logits layer (every vit_jax fine-tuning
      config); `vit_jax finetune rep`: the same model keeping a pre-logits layer of the trained width;
    - `vit_jax inspect`: `load` + strict `inspect_params` (+ apply) for the model the file holds, as it is;
    - `big_vision transfer`: `load` with `dont_load` = the head, model without pre-logits (configs/transfer.py);
      `big_vision transfer rep`: the same with `rep_size` = the trained width;
      `big_vision transfer drop-rep`: without pre-logits, `dont_load` also `pre_logits/.*`.
    """
    size = img_size or trained.img_size
    new = ViTShape(**{**trained.__dict__, "img_size": size, "num_classes": new_classes})
    rep = trained.representation_size
    held = file_shape(path, trained.img_size, trained.patch)

    def vit_jax(representation_size: int | None) -> None:
        model = ViTShape(**{**new.__dict__, "representation_size": representation_size})
        init = vit_jax_init_params(model)
        check_apply(vit_jax_load_pretrained(path, init, representation_size), init)

    def inspect() -> None:
        init = vit_jax_init_params(held)
        check_apply(vit_jax_inspect_params(params=vit_jax_load(path), expected=init), init)

    def big_vision(rep_size: int | None, dont_load: list[str]) -> None:
        init = bv_init_params(new, rep_size)
        check_apply(bv_load(init, path, dont_load), init)

    uses = {
        "vit_jax finetune": lambda: vit_jax(None),
        "vit_jax inspect": inspect,
        "big_vision transfer": lambda: big_vision(None, HEAD),
        "big_vision transfer drop-rep": lambda: big_vision(None, [*HEAD, "pre_logits/.*"]),
    }
    if rep:
        uses["vit_jax finetune rep"] = lambda: vit_jax(rep)
        uses["big_vision transfer rep"] = lambda: big_vision(rep, HEAD)
    result = {}
    for name, use in uses.items():
        try:
            use()
            result[name] = "ok"
        except (KeyError, ValueError, AssertionError) as e:
            result[name] = f"{type(e).__name__}: {e}"
    return result
