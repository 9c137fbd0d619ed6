"""Exports of a model with the paper's pre-logits layer (issue 14): every format x `--head` choice either loads in
its consumer with our logits, or exits 2 naming the formats that can; `.pth` / `.npz` read back for fine-tuning.

One real checkpoint for the module: `vit_test_patch4` with a pre-logits layer of width 48 (not the model width 64,
so a transposed or misplaced matrix cannot load), 10 classes, bf16 ZeRO-3 written by 2 CPU ranks after 3 steps.
"""

from __future__ import annotations

import json
import os
import pickletools
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pretrain.downstream import finetune as ft
from pretrain.downstream import predict
from pretrain.downstream.backbone import load_backbone
from pretrain.export import FORMATS, HEADS
from pretrain.export.__main__ import main
from pretrain.models.vit import VisionTransformer, ViTArgs
from pretrain.ports import free_port
from tests.helpers import jax_loaders as jl

pytestmark = pytest.mark.slow  # a 2-rank DeepSpeed launch (~20 s, more on a loaded machine)

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "helpers" / "make_ds_checkpoint.py"
WIDTH = 48  # pre-logits width
SHAPE = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4)

# (format, --head) -> the formats the refusal must name; every other pair must export.
REFUSED = {
    ("timm", "keep"): "torchvision, pth, npz",
    ("timm", "pre-logits"): "hf, pth, npz",
    ("torchvision", "pre-logits"): "hf, pth, npz",
    ("hf", "keep"): "torchvision, pth, npz",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The run folder of the i21k-style checkpoint (see the module docstring)."""
    run = tmp_path_factory.mktemp("i21k") / "run"
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), str(HELPER), str(run)]
    cmd += ["--stage", "3", "--steps", "3", "--representation-size", str(WIDTH)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{launcher.parent}{os.pathsep}{os.environ['PATH']}"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and (run / "checkpoints" / "latest").is_file(), p.stdout[-3000:] + p.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def reference(run) -> dict[str, torch.Tensor]:
    """DeepSpeed's own fp32 reconstruction of the checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"))


@pytest.fixture(scope="module")
def ours(reference) -> VisionTransformer:
    model = VisionTransformer(ViTArgs(**SHAPE, num_classes=10, representation_size=WIDTH)).eval()
    model.load_state_dict(reference, strict=True)
    return model


X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _ours(model: VisionTransformer, head: str) -> torch.Tensor:
    """Our output for what an export with `head` keeps: logits, pre-logits features, or class-token features."""
    features = model.forward_head(model.forward_features(X), pre_logits=True)  # (B, D)
    return {"keep": model(X), "pre-logits": model.pre_logits(features), "drop": features}[head]


# --------------------------------------------------------------------- the reproduction's model, written to its layout


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, heads, N, N)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp.fc2(self.mlp.act(self.mlp.fc1(self.norm2(x))))


class ReproViT(nn.Module):
    """The PyTorch reproduction's VisionTransformer (patch_embed.proj, cls_token, pos_embed, blocks, norm,
    pre_logits = Sequential(fc, Tanh) when representation_size is set, head), without its dropout."""

    def __init__(self, representation_size: int | None, num_classes: int) -> None:
        super().__init__()
        D = SHAPE["embed_dim"]
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, D, kernel_size=4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + 8 * 8, D))
        self.blocks = nn.Sequential(*[_Block(D, SHAPE["num_heads"]) for _ in range(SHAPE["depth"])])
        self.norm = nn.LayerNorm(D, eps=1e-6)
        width = representation_size or D
        pre = OrderedDict([("fc", nn.Linear(D, width)), ("act", nn.Tanh())])
        self.pre_logits = nn.Sequential(pre) if representation_size else nn.Identity()
        self.head = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, 1 + N, D)
        return self.head(self.pre_logits(self.norm(self.blocks(x))[:, 0]))


# ------------------------------------------------------------------------------------------------ the consumers


def _pth(out: Path, head: str) -> torch.Tensor:
    state = torch.load(out / "model.pth", weights_only=True)  # no pickled code
    model = ReproViT(WIDTH if head != "drop" else None, 10 if head == "keep" else 0)
    model.load_state_dict(state, strict=True)
    assert list(state) == list(model.state_dict())  # an ordered state dict in the model's order
    return model.eval()(X)


def _npz(out: Path, head: str) -> torch.Tensor:
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    from timm.models.vision_transformer import _load_weights

    model = TimmViT(**SHAPE, num_classes=0).eval()  # timm has no pre-logits layer: apply it as JAX does
    _load_weights(model, str(out / "model.npz"))
    w = np.load(out / "model.npz")
    x = model(X)  # (B, D)
    if head != "drop":
        x = torch.tanh(x @ torch.from_numpy(w["pre_logits/kernel"]) + torch.from_numpy(w["pre_logits/bias"]))
    if head == "keep":
        x = x @ torch.from_numpy(w["head/kernel"]) + torch.from_numpy(w["head/bias"])
    return x


def _timm(out: Path, head: str) -> torch.Tensor:
    import timm

    return timm.create_model(f"local-dir:{out}", pretrained=True).eval()(X)


def _torchvision(out: Path, head: str) -> torch.Tensor:
    import torchvision
    from safetensors.torch import load_file

    cfg = json.loads((out / "config.json").read_text())
    model = torchvision.models.VisionTransformer(**cfg["vision_transformer_args"])
    if not cfg["head"]:
        model.heads = nn.Identity()
    model.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    return model.eval()(X)


def _hf(out: Path, head: str) -> torch.Tensor:
    from transformers import ViTModel

    pooler = head == "pre-logits"  # the pooler (dense + tanh) is the pre-logits layer
    vit, info = ViTModel.from_pretrained(out, add_pooling_layer=pooler, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    y = vit.eval()(pixel_values=X)
    return y.pooler_output if pooler else y.last_hidden_state[:, 0]


CONSUMERS = {"timm": _timm, "torchvision": _torchvision, "hf": _hf, "pth": _pth, "npz": _npz}


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_and_head(run, ours, tmp_path, capsys, fmt, head):
    out = tmp_path / "out"
    code = main([str(run), str(out), "--format", fmt, "--head", head])
    err = capsys.readouterr().err.strip()
    if (fmt, head) in REFUSED:
        assert code == 2 and err.startswith("error: ") and "\n" not in err, err
        assert f"--head {head} works with --format {REFUSED[fmt, head]}" in err, err
        assert not out.exists()
        return
    assert code == 0, err
    assert json.loads((out / "export_info.json").read_text())["head"] == head
    with torch.no_grad():
        torch.testing.assert_close(CONSUMERS[fmt](out, head), _ours(ours, head), atol=1e-5, rtol=0)


def test_default_head_drops_what_the_format_cannot_hold(run, tmp_path, capsys):
    for fmt, head in {"timm": "drop", "torchvision": "keep", "hf": "drop", "pth": "keep", "npz": "keep"}.items():
        assert main([str(run), str(tmp_path / fmt), "--format", fmt]) == 0
        assert json.loads((tmp_path / fmt / "export_info.json").read_text())["head"] == head, fmt
        assert f"head {head})" in capsys.readouterr().out
    assert main([str(run), str(tmp_path / "bf16"), "--format", "npz", "--dtype", "bfloat16"]) == 2
    assert "--format npz stores float32 only" in capsys.readouterr().err


def test_pth_is_the_reproductions_state_dict(run, reference, tmp_path):
    """Bit for bit DeepSpeed's weights; the reproduction's fine-tuning load (head and pre-logits keys removed,
    strict=False into a model with another class count) reports exactly those keys missing."""
    assert main([str(run), str(tmp_path / "pth"), "--format", "pth"]) == 0
    path = tmp_path / "pth" / "model.pth"
    with zipfile.ZipFile(path) as z:  # torch.save's layout; the pickle names no code, only tensor rebuilding
        pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    names = {arg for op, arg, _ in pickletools.genops(pkl) if op.name == "GLOBAL"}
    assert names == {"collections OrderedDict", "torch._utils _rebuild_tensor_v2", "torch FloatStorage"}
    state = torch.load(path, weights_only=True)
    mapped = torch.load(path, weights_only=True, mmap=True)  # every record 64-byte aligned, as torch.save writes
    assert list(mapped) == list(state) and all(torch.equal(mapped[k], v) for k, v in state.items())
    assert sorted(state) == sorted(reference) and all(torch.equal(state[k], v) for k, v in reference.items())
    removed = ["pre_logits.fc.weight", "pre_logits.fc.bias", "head.weight", "head.bias"]
    for k in removed:
        del state[k]
    got = ReproViT(WIDTH, 5).load_state_dict(state, strict=False)
    assert sorted(got.missing_keys) == sorted(removed) and not got.unexpected_keys
    got = ReproViT(None, 5).load_state_dict(state, strict=False)
    assert sorted(got.missing_keys) == ["head.bias", "head.weight"] and not got.unexpected_keys


def test_npz_is_the_jax_layout(run, reference, tmp_path):
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    from timm.models.vision_transformer import _load_weights

    assert main([str(run), str(tmp_path / "npz"), "--format", "npz"]) == 0
    w = np.load(tmp_path / "npz" / "model.npz")
    mha = "Transformer/encoderblock_3/MultiHeadDotProductAttention_1/"
    assert w["embedding/kernel"].shape == (4, 4, 3, 64) and w["cls"].shape == (1, 1, 64)
    assert w[mha + "query/kernel"].shape == (64, 4, 16) and w[mha + "value/bias"].shape == (4, 16)
    assert w[mha + "out/kernel"].shape == (4, 16, 64) and w["Transformer/posembed_input/pos_embedding"].shape[1] == 65
    assert w["pre_logits/kernel"].shape == (64, WIDTH) and w["head/kernel"].shape == (WIDTH, 10)
    model = TimmViT(**SHAPE, num_classes=0)
    _load_weights(model, str(tmp_path / "npz" / "model.npz"))
    got = model.state_dict()
    assert [k for k in got if not torch.equal(got[k], reference[k])] == []  # the backbone, bit for bit


# What vit_jax's and big_vision's own loading code does with each `--head` of `--format npz` of a pre-logits model
# (tests/helpers/jax_loaders.py mirrors it; `outcomes` names each use). "ok", or what the error names. The same
# table is in docs/export.md ("npz: which JAX loader takes which --head").
JAX_LOADERS = {
    "keep": {
        "vit_jax finetune": "ok",  # load_pretrained: pre-logits emptied (representation_size None), head replaced
        "vit_jax finetune rep": "ok",
        "vit_jax inspect": "ok",
        "big_vision transfer": "pre_logits/kernel",  # dont_load head only, model without pre-logits: extra params
        "big_vision transfer rep": "ok",
        "big_vision transfer drop-rep": "ok",
    },
    "pre-logits": {
        "vit_jax finetune": "KeyError: 'head'",  # load_pretrained copies the new head into the file's head
        "vit_jax finetune rep": "KeyError: 'head'",
        "vit_jax inspect": "ok",
        "big_vision transfer": "pre_logits/kernel",
        "big_vision transfer rep": "ok",
        "big_vision transfer drop-rep": "ok",
    },
    "drop": {
        "vit_jax finetune": "KeyError: 'head'",
        "vit_jax finetune rep": "KeyError: 'head'",
        "vit_jax inspect": "ok",
        "big_vision transfer": "ok",
        "big_vision transfer rep": "pre_logits/kernel",  # the model's pre-logits layer is not in the file
        "big_vision transfer drop-rep": "ok",
    },
}


@pytest.mark.parametrize("head", HEADS)
def test_npz_through_the_jax_loaders(run, tmp_path, head):
    """Each `--head` of `--format npz` put through the mirror of vit_jax's and big_vision's loaders, at the trained
    input size and at a larger one (both resize the position embedding); the default (`keep`) loads in both."""
    assert main([str(run), str(tmp_path / "npz"), "--format", "npz", "--head", head]) == 0
    trained = jl.ViTShape.of({**SHAPE, "num_classes": 10, "representation_size": WIDTH})
    for img_size in (None, 48):
        got = jl.outcomes(tmp_path / "npz" / "model.npz", trained, img_size=img_size)
        assert got.keys() == JAX_LOADERS[head].keys()
        for use, want in JAX_LOADERS[head].items():
            assert got[use] == "ok" if want == "ok" else want in got[use], (img_size, use, got[use])


def test_finetune_and_predict_read_pth_and_npz(run, ours, tmp_path, capsys, digits_shards, digits_dir):
    """Our pth / npz export folders, their bare files, and the reproduction's own `.pth` load with our logits; a
    new class count drops head and pre-logits layer; predict and finetune take them on the command line."""
    for fmt in ("pth", "npz"):
        assert main([str(run), str(tmp_path / fmt), "--format", fmt]) == 0
    repro = ReproViT(WIDTH, 10)
    repro.load_state_dict(ours.state_dict())
    torch.save(repro.state_dict(), tmp_path / "vit_test_in21k.pth")
    sources = [tmp_path / "pth", tmp_path / "npz", tmp_path / "npz" / "model.npz", tmp_path / "vit_test_in21k.pth"]
    for src in sources:
        bb = load_backbone(src)
        assert bb.variant == "vit_test_patch4" and bb.model.args.representation_size == WIDTH, src
        assert bb.class_names == ([f"class_{i}" for i in range(10)] if src.is_dir() else []), src
        with torch.no_grad():
            torch.testing.assert_close(bb.model.eval()(X), _ours(ours, "keep"), atol=1e-5, rtol=0)
        new = load_backbone(src, num_classes=5)
        assert new.new_head and new.model.args.representation_size is None and new.model(X).shape == (4, 5)

    image = str(digits_dir / "3" / "0003.png")
    capsys.readouterr()
    assert predict.main([str(tmp_path / "pth"), image]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == image and len(lines) == 6 and all(line.split()[1].startswith("class_") for line in lines[1:])
    args = ["--data", str(digits_shards), "--weights", str(tmp_path / "vit_test_in21k.pth"), "--steps", "1"]
    assert ft.main([*args, "--batch-size", "8", "--workers", "0", "--no-progress", "--out", str(tmp_path / "ft")]) == 0
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["num_classes"] == 10


def test_unregistered_shapes_are_refused(tmp_path, capsys, digits_dir):
    """No silent fallback to another variant: a state dict of no registered shape exits 2 naming the known ones."""
    odd = VisionTransformer(ViTArgs(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3))
    torch.save(odd.state_dict(), tmp_path / "odd.pth")
    assert predict.main([str(tmp_path / "odd.pth"), str(digits_dir / "1" / "0001.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "patch 4, width 32, depth 2" in err and "known: vit_base_patch16" in err, err
    torch.save({"w": torch.zeros(2)}, tmp_path / "not_vit.pth")
    assert predict.main([str(tmp_path / "not_vit.pth"), str(digits_dir / "1" / "0001.png")]) == 2
    assert "not a ViT state dict" in capsys.readouterr().err
