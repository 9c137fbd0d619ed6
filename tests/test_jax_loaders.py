"""The mirror of vit_jax's and big_vision's `.npz` loading rules (tests/helpers/jax_loaders.py) checked on files in
the layout of the paper's released checkpoints, and our `npz` plan checked against that layout (no DeepSpeed; the
exports themselves go through the mirror in test_export.py and test_export_prelogits.py).

A file in the paper's layout is written here from its documented key list (`gs://vit_models/imagenet21k/ViT-B_16.npz`
and its siblings: pre-Linen module names, the class token's position entry first in the position embedding),
independently of our export's rule table.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.export.base import ExportOptions
from pretrain.export.formats import map_tensor
from pretrain.models.vit import ViTArgs, param_shapes
from tests.helpers import jax_loaders as jl

S = jl.ViTShape(img_size=32, patch=4, hidden=64, depth=3, heads=4, mlp_dim=256, representation_size=48, num_classes=10)


def _paper_layout(s: jl.ViTShape, head: bool = True, pre_logits: bool = True) -> dict[str, tuple[int, ...]]:
    """Array name -> shape in the paper's checkpoints (vit_jax's pre-Linen names)."""
    D, H, g = s.hidden, s.heads, s.img_size // s.patch
    out = {
        "cls": (1, 1, D),
        "embedding/kernel": (s.patch, s.patch, 3, D),
        "embedding/bias": (D,),
        "Transformer/posembed_input/pos_embedding": (1, 1 + g * g, D),
        "Transformer/encoder_norm/scale": (D,),
        "Transformer/encoder_norm/bias": (D,),
    }
    for i in range(s.depth):
        b = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            out |= {b + ln + "/scale": (D,), b + ln + "/bias": (D,)}
        for k in ("query", "key", "value"):
            out |= {f"{b}MultiHeadDotProductAttention_1/{k}/kernel": (D, H, D // H)}
            out |= {f"{b}MultiHeadDotProductAttention_1/{k}/bias": (H, D // H)}
        out |= {b + "MultiHeadDotProductAttention_1/out/kernel": (H, D // H, D)}
        out |= {b + "MultiHeadDotProductAttention_1/out/bias": (D,)}
        out |= {b + "MlpBlock_3/Dense_0/kernel": (D, s.mlp_dim), b + "MlpBlock_3/Dense_0/bias": (s.mlp_dim,)}
        out |= {b + "MlpBlock_3/Dense_1/kernel": (s.mlp_dim, D), b + "MlpBlock_3/Dense_1/bias": (D,)}
    width = s.representation_size if pre_logits else None
    if width:
        out |= {"pre_logits/kernel": (D, width), "pre_logits/bias": (width,)}
    if head:
        out |= {"head/kernel": (width or D, s.num_classes), "head/bias": (s.num_classes,)}
    return out


def _write(path: Path, layout: dict[str, tuple[int, ...]]) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, **{k: rng.standard_normal(shape).astype(np.float32) for k, shape in layout.items()})
    return path


def test_convert_pre_linen_renumbers_per_module_in_natural_order():
    names = ["LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"]
    blocks = {f"encoderblock_{i}": {n: {} for n in names} for i in range(12)}
    got = jl.convert_pre_linen(blocks)
    assert list(got) == [f"encoderblock_{i}" for i in range(12)]  # 10 and 11 after 9, numbers kept
    assert list(got["encoderblock_10"]) == [
        "LayerNorm_0",
        "LayerNorm_1",
        "MlpBlock_0",
        "MultiHeadDotProductAttention_0",
    ]


def test_paper_checkpoint_loads_everywhere_the_papers_recipes_say(tmp_path):
    """The paper's in21k file (pre-logits + head) fine-tunes in vit_jax (pre-logits dropped or kept), loads as it is,
    and transfers in big_vision when the model keeps the pre-logits layer or `dont_load` covers it."""
    path = _write(tmp_path / "ViT.npz", _paper_layout(S))
    got = jl.outcomes(path, S)
    assert got == {
        "vit_jax finetune": "ok",
        "vit_jax finetune rep": "ok",
        "vit_jax inspect": "ok",
        "big_vision transfer": got["big_vision transfer"],  # below
        "big_vision transfer rep": "ok",
        "big_vision transfer drop-rep": "ok",
    }
    assert got["big_vision transfer"].startswith("ValueError") and "pre_logits/kernel" in got["big_vision transfer"]


def test_a_file_without_head_fails_vit_jax_finetuning_as_upstream_does(tmp_path):
    """Issue 23: vit_jax's `load_pretrained` copies the new head into the file's `head` -> KeyError: 'head'."""
    path = _write(tmp_path / "backbone.npz", _paper_layout(S, head=False, pre_logits=False))
    got = jl.outcomes(path, S)
    assert got["vit_jax finetune"] == got["vit_jax finetune rep"] == "KeyError: 'head'"
    assert got["vit_jax inspect"] == got["big_vision transfer"] == "ok"
    with pytest.raises(KeyError, match="head"):
        jl.vit_jax_load_pretrained(path, jl.vit_jax_init_params(S), None)


def test_what_the_loaders_read_and_replace(tmp_path):
    path = _write(tmp_path / "ViT.npz", _paper_layout(S))
    saved = dict(np.load(path))
    init = jl.vit_jax_init_params(dataclasses.replace(S, representation_size=None, num_classes=5))
    p = jl.vit_jax_load_pretrained(path, init, None)
    assert p["pre_logits"] == {} and p["head"]["kernel"] is init["head"]["kernel"]  # dropped; the new zero head
    block = p["Transformer"]["encoderblock_2"]
    assert np.array_equal(
        block["MlpBlock_0"]["Dense_1"]["kernel"], saved["Transformer/encoderblock_2/MlpBlock_3/Dense_1/kernel"]
    )
    assert np.array_equal(block["LayerNorm_1"]["scale"], saved["Transformer/encoderblock_2/LayerNorm_2/scale"])

    bv_init = jl.bv_init_params(dataclasses.replace(S, num_classes=5), None)
    b = jl.bv_load(bv_init, path, [*jl.HEAD, "pre_logits/.*"])
    pe = saved["Transformer/posembed_input/pos_embedding"]  # (1, 1 + 64, D): the class token's entry first
    assert np.array_equal(b["cls"], saved["cls"] + pe[:, :1]) and np.array_equal(b["pos_embedding"], pe[:, 1:])
    assert b["head"]["kernel"] is bv_init["head"]["kernel"] and "pre_logits" not in b


def test_position_embedding_resized_for_a_larger_input(tmp_path):
    """Both loaders zoom the square grid when the fine-tuning model's input is larger (32 -> 48 px: 8x8 -> 12x12)."""
    path = _write(tmp_path / "ViT.npz", _paper_layout(S))
    assert set(jl.outcomes(path, S, img_size=48).values()) >= {"ok"}
    big = dataclasses.replace(S, img_size=48, representation_size=None, num_classes=5)
    p = jl.vit_jax_load_pretrained(path, jl.vit_jax_init_params(big), None)
    assert p["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 1 + 144, 64)
    assert jl.bv_load(jl.bv_init_params(big, None), path, [*jl.HEAD, "pre_logits/.*"])["pos_embedding"].shape == (
        1,
        144,
        64,
    )


def test_a_misnamed_array_is_caught(tmp_path):
    """The mirror is strict where the loaders are: one renamed array fails inspection and big_vision's merge."""
    layout = _paper_layout(S)
    layout["Transformer/encoderblock_1/MlpBlock_2/Dense_0/bias"] = layout.pop(
        "Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias"
    )
    got = jl.outcomes(_write(tmp_path / "bad.npz", layout), S)
    assert got["vit_jax inspect"].startswith("ValueError") and got["big_vision transfer rep"].startswith("ValueError")


@pytest.mark.parametrize("head", ["keep", "pre-logits", "drop"])
def test_our_npz_plan_is_the_paper_layout(head):
    """The names and shapes `--format npz` writes (planned on `meta` tensors, as the export does) are the paper's."""
    args = ViTArgs(
        img_size=S.img_size, patch_size=S.patch, embed_dim=S.hidden, depth=S.depth, num_heads=S.heads,
        num_classes=S.num_classes, representation_size=S.representation_size,
    )  # fmt: skip
    opts = ExportOptions("npz", head=head)
    plan = {
        k: tuple(t.shape)
        for name, shape in param_shapes(args).items()
        for k, t in map_tensor(name, torch.empty(shape, device="meta"), args, opts)
    }
    assert plan == _paper_layout(S, head=head == "keep", pre_logits=head != "drop")
