"""`pretrain.export`: ZeRO 1/2/3 checkpoints written by 2 CPU ranks -> timm, torchvision, Hugging Face.

Every test runs on a real DeepSpeed checkpoint per ZeRO stage (the `zero_run` fixture) and compares with
DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint` and with the real libraries.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pretrain.export import export_checkpoint
from pretrain.export.__main__ import main
from pretrain.models.vit import VisionTransformer, ViTArgs
from pretrain.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "helpers" / "make_ds_checkpoint.py"
TAG = "step_00000002"


@pytest.fixture(scope="session", params=[1, 2, 3], ids=lambda s: f"zero{s}")
def zero_run(request, tmp_path_factory) -> Path:
    """A run folder (config.yaml, checkpoints/step_00000002 complete, `latest`) holding a bf16 ZeRO-{1,2,3}
    checkpoint of `vit_test_patch4` (10 classes) written by 2 CPU ranks after 2 AdamW steps.

    Made by tests/helpers/make_ds_checkpoint.py, which saves as the training loop does; point this fixture at a
    real `pretrain.train` run once one fits in the test budget.
    """
    run = tmp_path_factory.mktemp(f"zero{request.param}") / "run"
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port())]  # own port: runs may overlap
    cmd += [str(HELPER), str(run), "--stage", str(request.param)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{launcher.parent}{os.pathsep}{os.environ['PATH']}"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0 and (run / "checkpoints" / TAG / "pretrain_meta.json").is_file(), p.stdout + p.stderr
    return run


@pytest.fixture(scope="session")
def reference(zero_run) -> dict[str, torch.Tensor]:
    """DeepSpeed's own fp32 reconstruction of the same checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(zero_run / "checkpoints"))


@pytest.fixture(scope="session")
def ours(zero_run, reference) -> VisionTransformer:
    """This project's model with the reference weights."""
    meta = json.loads((zero_run / "checkpoints" / TAG / "pretrain_meta.json").read_text())
    model = VisionTransformer(ViTArgs(**meta["model_args"])).eval()
    model.load_state_dict(reference, strict=True)
    return model


def _images(size: int = 32) -> torch.Tensor:
    return torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------ reconstruction


def test_stream_equals_deepspeed(zero_run, reference):
    from pretrain.export.zero import ZeroCheckpoint

    with ZeroCheckpoint(zero_run / "checkpoints" / TAG) as ckpt:
        shapes = ckpt.shapes()
        got = dict(ckpt.tensors())
    assert list(got) == list(reference) == list(shapes)
    for k, ref in reference.items():
        assert got[k].dtype == ref.dtype == torch.float32 and shapes[k] == (ref.shape, ref.dtype)
        assert torch.equal(got[k], ref), k


def test_export_reads_master_weights_only(zero_run, reference, tmp_path, monkeypatch):
    """The optimizer moments (2/3 of each optimizer shard) are never read: bytes read = the fp32 weights."""
    from pretrain.export import torchzip

    read = []
    original = torchzip.TorchZipFile.read_elements

    def spy(self, storage, start, count):
        read.append(count * storage.dtype.itemsize)
        return original(self, storage, start, count)

    monkeypatch.setattr(torchzip.TorchZipFile, "read_elements", spy)
    export_checkpoint(zero_run, tmp_path / "out", "timm")
    n_bytes = sum(t.numel() * 4 for t in reference.values())
    assert n_bytes <= sum(read) <= n_bytes + 4 * 64  # at most a few padding elements more (ZeRO-3 last-rank pad)
    assert max(read) <= max(t.numel() for t in reference.values()) * 4  # one parameter (piece) at a time


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_timm_export_equals_deepspeed(zero_run, reference, tmp_path, dtype):
    out = tmp_path / "timm"
    assert main([str(zero_run), str(out), "--format", "timm", "--dtype", dtype]) == 0
    got = load_file(out / "model.safetensors")
    assert list(got) == list(reference)
    for k, ref in reference.items():
        assert torch.equal(got[k], ref.to(getattr(torch, dtype))), k
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata()["tag"] == TAG and f.metadata()["format"] == "pt"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "export_info.json", "model.safetensors"]
    assert not list(tmp_path.glob(".tmp-*"))


# ---------------------------------------------------------------------------------------------- libraries


def test_timm_local_dir(zero_run, reference, ours, tmp_path):
    import timm

    out = tmp_path / "timm"
    export_checkpoint(zero_run, out, "timm")
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    sd = model.state_dict()
    assert sorted(sd) == sorted(reference) and all(torch.equal(sd[k], v) for k, v in reference.items())
    cfg = model.pretrained_cfg
    assert cfg["label_names"] == [f"class_{i}" for i in range(10)] and model.num_classes == 10
    assert tuple(cfg["input_size"]) == (3, 32, 32) and tuple(cfg["mean"]) == (0.5, 0.5, 0.5)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ours.forward_features(x), atol=1e-4, rtol=0)
        torch.testing.assert_close(model(x), ours(x), atol=1e-4, rtol=0)

    export_checkpoint(zero_run, out, "timm", head="drop")  # replaces the earlier export
    backbone = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert backbone.num_classes == 0 and not any(k.startswith("head") for k in backbone.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            backbone(x), ours.forward_head(ours.forward_features(x), pre_logits=True), atol=1e-4, rtol=0
        )


def _torchvision(out: Path):
    import torchvision

    cfg = json.loads((out / "config.json").read_text())
    model = torchvision.models.VisionTransformer(**cfg["vision_transformer_args"])
    if not cfg["head"]:
        model.heads = torch.nn.Identity()
    model.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    return model.eval(), cfg


def _torchvision_features(model, x: torch.Tensor) -> torch.Tensor:
    x = model._process_input(x)  # (B, N, D)
    x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, D)
    return model.encoder(x)  # adds the position embedding, runs the blocks and the final norm


def test_torchvision(zero_run, ours, tmp_path):
    x = _images()
    export_checkpoint(zero_run, tmp_path / "tv", "torchvision")
    model, cfg = _torchvision(tmp_path / "tv")
    assert cfg["class_names"][3] == "class_3" and model.heads.head.out_features == 10
    with torch.no_grad():
        torch.testing.assert_close(_torchvision_features(model, x), ours.forward_features(x), atol=1e-4, rtol=0)
        torch.testing.assert_close(model(x), ours(x), atol=1e-4, rtol=0)

    export_checkpoint(zero_run, tmp_path / "tv_drop", "torchvision", head="drop")
    backbone, cfg = _torchvision(tmp_path / "tv_drop")
    assert cfg["head"] is False
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), ours.forward_features(x)[:, 0], atol=1e-4, rtol=0)


def test_huggingface(zero_run, ours, tmp_path):
    from transformers import ViTForImageClassification, ViTModel

    x = _images()
    export_checkpoint(zero_run, tmp_path / "hf", "hf")
    clf, info = ViTForImageClassification.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert clf.config.layer_norm_eps == 1e-6 and clf.config.id2label[7] == "class_7"
    with torch.no_grad():
        torch.testing.assert_close(clf.eval()(pixel_values=x).logits, ours(x), atol=1e-4, rtol=0)

    export_checkpoint(zero_run, tmp_path / "hf_drop", "hf", head="drop", dtype="bfloat16")
    # No pooler: ViT's class-token features are the last hidden state's first token, not HF's extra tanh layer.
    vit, info = ViTModel.from_pretrained(tmp_path / "hf_drop", add_pooling_layer=False, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert vit.dtype == torch.bfloat16
    with torch.no_grad():
        got = vit.float().eval()(pixel_values=x).last_hidden_state
        ours_bf16 = VisionTransformer(ours.args).eval()
        ours_bf16.load_state_dict({k: v.bfloat16().float() for k, v in ours.state_dict().items()})
        torch.testing.assert_close(got, ours_bf16.forward_features(x), atol=1e-4, rtol=0)


def test_img_size_resamples_like_timm(zero_run, reference, tmp_path):
    import timm
    from timm.layers import resample_abs_pos_embed
    from transformers import ViTModel

    export_checkpoint(zero_run, tmp_path / "timm48", "timm", img_size=48, head="drop")
    got = load_file(tmp_path / "timm48" / "model.safetensors")["pos_embed"]
    want = resample_abs_pos_embed(reference["pos_embed"], (12, 12), num_prefix_tokens=1)  # 8x8 grid -> 12x12
    assert got.shape == (1, 145, 64)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    model = timm.create_model(f"local-dir:{tmp_path / 'timm48'}", pretrained=True)
    assert model(_images(48)).shape == (4, 64)

    export_checkpoint(zero_run, tmp_path / "hf48", "hf", img_size=48, head="drop")
    vit = ViTModel.from_pretrained(tmp_path / "hf48", add_pooling_layer=False)
    assert vit.config.image_size == 48
    assert vit(pixel_values=_images(48)).last_hidden_state.shape == (4, 145, 64)


# ------------------------------------------------------------------------------------------------- errors


def _fails(argv: list[str], capsys, *words: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for w in words:
        assert w in err, err


def test_bad_checkpoint_folders(zero_run, tmp_path, capsys):
    out = str(tmp_path / "out")
    _fails([str(tmp_path / "nope"), out, "--format", "timm"], capsys, "not a folder")
    (tmp_path / "empty").mkdir()
    _fails([str(tmp_path / "empty"), out, "--format", "timm"], capsys, "not a checkpoint folder")
    _fails([str(zero_run), out, "--format", "hf", "--tag", "step_00000099"], capsys, "does not exist", TAG)

    # A crash while saving: a newer tag folder without pretrain_meta.json, and `latest` pointing at it.
    run = tmp_path / "run"
    shutil.copytree(zero_run, run)
    ckpts = run / "checkpoints"
    shutil.copytree(ckpts / TAG, ckpts / "step_00000004")
    (ckpts / "step_00000004" / "pretrain_meta.json").unlink()
    (ckpts / "latest").write_text("step_00000004")
    assert main([str(run), out, "--format", "timm"]) == 0
    assert json.loads((tmp_path / "out" / "export_info.json").read_text())["source"]["step"] == 2
    _fails([str(run), out, "--format", "timm", "--tag", "step_00000004"], capsys, "incomplete")
    _fails([str(ckpts / "step_00000004"), out, "--format", "timm"], capsys, "incomplete")

    # Only a half-written checkpoint left.
    shutil.rmtree(ckpts / TAG)
    _fails([str(run), out, "--format", "timm"], capsys, "only incomplete")

    # A tag marked complete whose rank-1 optimizer shard is missing, or truncated.
    run2 = tmp_path / "run2"
    shutil.copytree(zero_run, run2)
    shard = next((run2 / "checkpoints" / TAG).glob("*rank_1_mp_rank_00_optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:1000])
    _fails([str(run2), out, "--format", "timm"], capsys, "half-written")
    shard.unlink()
    _fails([str(run2), out, "--format", "timm"], capsys, "optimizer shards")


def test_output_is_atomic_and_guarded(zero_run, tmp_path, monkeypatch, capsys):
    from pretrain.export import zero

    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    _fails([str(zero_run), str(other), "--format", "timm"], capsys, "not an earlier result")

    original = zero.ZeroCheckpoint.tensors

    def broken(self):  # the export dies after 3 tensors
        for i, item in enumerate(original(self)):
            if i == 3:
                raise OSError("disk full")
            yield item

    monkeypatch.setattr(zero.ZeroCheckpoint, "tensors", broken)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(zero_run, tmp_path / "out", "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no OUT, no temporary folder left


def test_unsupported_models_are_refused():
    from pretrain.export.formats import ExportError, ExportOptions, check_options, default_head

    pre_logits = ViTArgs(img_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=4, representation_size=64)
    with pytest.raises(ExportError, match="--head keep works with --format torchvision, pth, npz"):
        check_options(pre_logits, ExportOptions("timm"))
    check_options(pre_logits, ExportOptions("hf", head="drop"))
    defaults = {f: default_head(pre_logits, f) for f in ("timm", "torchvision", "hf", "pth", "npz")}
    assert defaults == {"timm": "drop", "torchvision": "keep", "hf": "drop", "pth": "keep", "npz": "keep"}
    plain = ViTArgs(img_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=4)
    with pytest.raises(ExportError, match="no pre-logits layer"):
        check_options(plain, ExportOptions("pth", head="pre-logits"))
    with pytest.raises(ExportError, match="stores float32 only"):
        check_options(plain, ExportOptions("npz", dtype="bfloat16"))
    gap = ViTArgs(img_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=4, pool="gap")
    with pytest.raises(ExportError, match="--format timm"):
        check_options(gap, ExportOptions("torchvision"))
    with pytest.raises(ExportError, match="multiple of the patch size"):
        check_options(gap, ExportOptions("timm", img_size=30))


@pytest.mark.parametrize("head", ["keep", "drop"])
def test_npz_through_the_jax_loaders(zero_run, tmp_path, head):
    """A model without pre-logits layer: `--head keep` (the npz default) loads through vit_jax's fine-tuning
    `load_pretrained`, strict `inspect_params` and big_vision's transfer `load` (mirrored in
    tests/helpers/jax_loaders.py); `drop` everywhere but vit_jax's fine-tuning, which needs `head/*` to replace."""
    from tests.helpers import jax_loaders as jl

    assert main([str(zero_run), str(tmp_path / "npz"), "--format", "npz", "--head", head]) == 0
    meta = json.loads((zero_run / "checkpoints" / TAG / "pretrain_meta.json").read_text())
    got = jl.outcomes(tmp_path / "npz" / "model.npz", jl.ViTShape.of(meta["model_args"]))
    finetune = "ok" if head == "keep" else "KeyError: 'head'"
    want = {"vit_jax finetune": finetune, "vit_jax inspect": "ok"}
    assert got == {**want, "big_vision transfer": "ok", "big_vision transfer drop-rep": "ok"}


def test_no_import_circle_in_export():
    """formats and plain share `base`; no module of the package imports one that imports it back."""
    import ast

    pkg = ROOT / "pretrain" / "export"
    deps = {}
    for f in pkg.glob("*.py"):
        tree = ast.parse(f.read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        deps[f.stem] = {m.rsplit(".", 1)[1] for m in names if m.startswith("pretrain.export.")}

    def reaches(a: str, b: str, seen: frozenset = frozenset()) -> bool:
        return any(d == b or (d not in seen and reaches(d, b, seen | {d})) for d in deps.get(a, ()))

    assert deps["formats"] >= {"base", "plain"} and "formats" not in deps["plain"]
    assert [m for m in deps if reaches(m, m)] == []


def _meta_only_checkpoint(tmp_path: Path, **meta) -> Path:
    """A tag folder holding only its pretrain_meta.json: enough for every check made before weights are read."""
    tag = tmp_path / "checkpoints" / TAG
    tag.mkdir(parents=True)
    args = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4, "num_classes": 10}
    data = {"mean": [0.5] * 3, "std": [0.5] * 3, "eval_crop_pct": 0.875}
    meta = {"model_name": "vit_test_patch4", "model_args": args, "config": {"data": data}, **meta}
    (tag / "pretrain_meta.json").write_text(json.dumps(meta))
    return tmp_path


@pytest.mark.parametrize("fmt", ["timm", "torchvision", "hf"])
def test_unknown_variant_exits_2_naming_the_known_ones(tmp_path, capsys, fmt):
    run = _meta_only_checkpoint(tmp_path, model_name="vit_gigantic_patch16")
    known = (
        "vit_base_patch16, vit_huge_patch14, vit_large_patch16, vit_small_patch16, vit_test_patch4, vit_tiny_patch16"
    )
    _fails([str(run), str(tmp_path / "out"), "--format", fmt], capsys, "unknown model 'vit_gigantic_patch16'", known)
    assert not (tmp_path / "out").exists()


def test_meta_without_preprocessing_is_refused(tmp_path, capsys):
    run = _meta_only_checkpoint(tmp_path, config={})
    _fails([str(run), str(tmp_path / "out"), "--format", "timm"], capsys, "config.data", "damaged")


@pytest.mark.parametrize("name", ["vit_test_patch4", "vit_small_patch16", "vit_huge_patch14"])
@pytest.mark.parametrize("pool", ["token", "gap"])
def test_timm_config_reads_back_as_the_same_variant(name, pool):
    """The timm adapter's config.json, read by the backbone loader, names the variant and arguments exported."""
    from pretrain.downstream.backbone import args_from_config
    from pretrain.export.formats import ExportOptions, metadata_files
    from pretrain.models.vit import resolve_args

    args = resolve_args(name, num_classes=3, pool=pool, img_size=2 * resolve_args(name).img_size)
    data = {"mean": [0.5] * 3, "std": [0.5] * 3, "eval_crop_pct": 0.9}
    meta = {"model_name": name, "class_names": ["a", "b", "c"], "config": {"data": data}}
    cfg = metadata_files(args, meta, ExportOptions("timm"))["config.json"]
    assert args_from_config(cfg) == (name, args)


def test_backbone_refuses_an_unknown_architecture():
    from pretrain.downstream.backbone import BackboneError, args_from_config

    with pytest.raises(BackboneError, match="'vit_gigantic_patch16_224'.*known: vit_base_patch16_224"):
        args_from_config({"architecture": "vit_gigantic_patch16_224", "num_classes": 0})
    odd = {"architecture": "vit_base_patch16_224", "model_args": {"embed_dim": 320, "depth": 5, "num_heads": 5}}
    with pytest.raises(BackboneError, match="embed_dim=320, depth=5.*no registered variant; known: vit_base"):
        args_from_config(odd)  # no fallback to the variant the architecture names


def test_reader_never_runs_pickled_code(tmp_path):
    """DeepSpeed's files pickle its own classes; our reader turns any class into an inert record."""
    from pretrain.export.torchzip import Opaque, TorchZipFile

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"w": torch.arange(6.0).view(2, 3), "evil": Evil()}, tmp_path / "f.pt")
    with TorchZipFile(tmp_path / "f.pt") as f:
        obj = f.load()
        assert isinstance(obj["evil"], Opaque) and not marker.exists()
        assert torch.equal(obj["w"].load(), torch.arange(6.0).view(2, 3))
        assert torch.equal(obj["w"].read(2, 3), torch.tensor([2.0, 3.0, 4.0]))
