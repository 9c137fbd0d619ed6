"""The standalone evaluation's models: every export this project writes, and a timm model name with local weights,
each as a feature function over the same input pipeline, so two backbones are held against each other with the
same numbers.

- `--format timm`, `pth`, `npz` exports and bare `.pth` / `.npz` files (`pretrain.downstream.backbone`): the
  head's input, i.e. the pre-logits output, else the final-norm class token (pooled features for `pool=gap`);
- `--format torchvision` (`torchvision.models.VisionTransformer`): the input of `heads.head` (pre-logits + tanh
  when kept), else the encoder's class token;
- `--format hf` (`transformers.ViTModel`): `pooler_output` when the export holds the pooler (pre-logits), else the
  final-layernorm class token;
- `--timm NAME --weights FILE` (`timm.create_model(NAME, num_classes=0, pretrained_cfg_overlay={"file": FILE})`):
  timm's pooled pre-logits features, with timm's mean, std and crop for the model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.config import DataConfig
from pretrain.data import normalize
from pretrain.data.loader import io_policy
from pretrain.downstream.backbone import BackboneError, load_backbone
from pretrain.export.formats import CONFIG, WEIGHTS
from pretrain.fewshot.evaluate import FewShot, SetResult
from pretrain.fewshot.features import Embedder, input_of
from pretrain.models.vit import VisionTransformer


@dataclass
class FeatureModel:
    """A loaded model as the few-shot evaluation sees it."""

    module: nn.Module
    """The model (moved to the device by the caller)."""
    features: Callable[[torch.Tensor], torch.Tensor]
    """Normalised float images (B, 3, S, S) -> features (B, F)."""
    img_size: int
    """Input size."""
    mean: tuple[float, ...]
    """Normalisation mean."""
    std: tuple[float, ...]
    """Normalisation std."""
    crop_pct: float
    """Centre-crop fraction."""
    what: str
    """One line: the model and where its features come from."""


def _json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BackboneError(f"{path} is unreadable ({e}); export the checkpoint again") from None
    return cfg if isinstance(cfg, dict) else {}


def from_vit(model: VisionTransformer, mean, std, crop_pct: float, name: str) -> FeatureModel:
    """One of our ViTs: features are the head's input (pre-logits output, else the final-norm class token)."""
    a = model.args
    where = "pre-logits" if a.representation_size else "final-norm class token" if a.pool == "token" else "pooled"
    return FeatureModel(
        model,
        lambda x: input_of(model.head, model, x),
        a.img_size,
        tuple(mean),
        tuple(std),
        crop_pct,
        f"{name} ({where}, {a.representation_size or a.embed_dim}-d)",
    )


def _ours(path: Path) -> FeatureModel:
    bb = load_backbone(path)
    return from_vit(bb.model, bb.mean, bb.std, bb.crop_pct, bb.variant)


def _torchvision(path: Path, cfg: dict) -> FeatureModel:
    from safetensors.torch import load_file
    from torchvision.models import VisionTransformer

    vt = cfg.get("vision_transformer_args") or {}
    m = VisionTransformer(**vt)
    if not cfg.get("head", True):
        m.heads = nn.Identity()
    try:
        m.load_state_dict(load_file(path / WEIGHTS), strict=True)
    except (OSError, RuntimeError) as e:
        raise BackboneError(f"{path / WEIGHTS} does not fit its config.json ({str(e)[:120]}); export again") from None
    head = getattr(m.heads, "head", None)
    feats = (lambda x: input_of(head, m, x)) if head is not None else (lambda x: m(x).float())
    width = vt.get("representation_size") or vt.get("hidden_dim")
    return FeatureModel(
        m,
        feats,
        int(vt.get("image_size", 224)),
        tuple(cfg.get("mean", DataConfig.mean)),
        tuple(cfg.get("std", DataConfig.std)),
        float(cfg.get("crop_pct", DataConfig.eval_crop_pct)),
        f"torchvision VisionTransformer ({width}-d)",
    )


def _hf(path: Path, cfg: dict) -> FeatureModel:
    from safetensors import safe_open
    from transformers import ViTModel

    with safe_open(str(path / WEIGHTS), "pt") as f:
        pooled = any(k.startswith(("pooler.", "vit.pooler.")) for k in f.keys())  # noqa: SIM118 - not a dict
    try:
        m = ViTModel.from_pretrained(str(path), add_pooling_layer=pooled)
    except (OSError, ValueError) as e:
        raise BackboneError(f"{path} is not a loadable Hugging Face ViT ({str(e)[:120]}); export again") from None
    pre = _json(path / "preprocessor_config.json") if (path / "preprocessor_config.json").is_file() else {}

    def feats(x: torch.Tensor) -> torch.Tensor:
        out = m(pixel_values=x)
        return (out.pooler_output if pooled else out.last_hidden_state[:, 0]).float()

    return FeatureModel(
        m,
        feats,
        int(cfg.get("image_size", 224)),
        tuple(pre.get("image_mean", DataConfig.mean)),
        tuple(pre.get("image_std", DataConfig.std)),
        DataConfig.eval_crop_pct,  # the HF processor resizes without a crop; the same pipeline for every model
        f"transformers ViTModel ({'pooler' if pooled else 'final-layernorm class token'}, {cfg.get('hidden_size')}-d)",
    )


def _timm(name: str, weights: Path) -> FeatureModel:
    import timm

    if not weights.is_file():
        raise BackboneError(f"--weights {weights} is not a file; with --timm pass the model's weights file")
    try:
        m = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(weights)})
    except RuntimeError as e:  # timm: unknown model, weights of another shape
        raise BackboneError(f"--timm {name}: {str(e).splitlines()[0][:160]}") from None
    dc = timm.data.resolve_model_data_config(m)
    return FeatureModel(
        m,
        lambda x: m(x).float(),
        int(dc["input_size"][-1]),
        tuple(dc["mean"]),
        tuple(dc["std"]),
        float(dc.get("crop_pct", DataConfig.eval_crop_pct)),
        f"timm {name} ({m.num_features}-d)",
    )


def load_feature_model(weights: str | Path, timm_name: str | None = None) -> FeatureModel:
    """The model of an export folder / weights file (module docstring), or of a timm name with local weights.
    Raises BackboneError with one line naming the problem and the fix."""
    p = Path(weights)
    if timm_name:
        return _timm(timm_name, p)
    if not p.exists():
        raise BackboneError(f"--weights {p} does not exist; pass an export folder, a .pth / .npz file, or --timm NAME")
    cfg = _json(p / CONFIG) if p.is_dir() and (p / CONFIG).is_file() else {}
    if "vision_transformer_args" in cfg:
        return _torchvision(p, cfg)
    if cfg.get("model_type") == "vit":
        return _hf(p, cfg)
    return _ours(p)


def run_model(
    fm: FeatureModel,
    setup: FewShot,
    *,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 4,
    bf16: bool = True,
    progress: Callable[[str, int, int], Any] | None = None,
) -> list[SetResult]:
    """Evaluate one model on `setup`'s sets in this process: uint8 images -> normalised -> features, under no_grad
    and (with `bf16`) bf16 autocast."""
    fm.module.to(device).eval()

    @torch.no_grad()
    def forward(images: torch.Tensor) -> torch.Tensor:
        x = normalize(images.to(device), fm.mean, fm.std)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return fm.features(x)

    embedder = Embedder(forward, fm.img_size, fm.crop_pct, batch_size, device, io_policy(DataConfig()), workers)
    return setup.run(embedder, progress)
