"""Load an exported backbone folder (timm layout, `python -m pretrain.export ... --format timm`) into our ViT.

The folder holds `config.json` in the layout of timm's `local-dir:` source (`architecture`, `model_args`,
`num_classes`, `label_names`, `pretrained_cfg` with mean/std/input size) and `model.safetensors` with timm's
parameter names, which are ours (`pretrain.models.vit`). Weights are read with safetensors only: a pickle file is never
loaded. Used by `pretrain.finetune` (new head, maybe a new input size) and `pretrain.predict` (head as saved).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from pretrain.config import DataConfig
from pretrain.export.formats import CONFIG, TIMM, WEIGHTS, ExportOptions, metadata_files
from pretrain.models.specs import SPECS, ViTArgs, spec_of_shape
from pretrain.models.vit import VisionTransformer, resize_pos_embed


class BackboneError(ValueError):
    """The folder is not a loadable export; the message names the problem and the fix."""


@dataclass
class Backbone:
    """A loaded export: our model plus what its metadata says about inputs and classes."""

    model: VisionTransformer
    """The ViT with the exported weights (and a new zero-initialised head when the class count changed)."""
    variant: str
    """Our variant name (`pretrain.models.specs.SPECS`)."""
    class_names: list[str]
    """Names of the head's classes (empty for a new head or a head-less export)."""
    mean: tuple[float, ...]
    """Normalisation mean the backbone was trained with."""
    std: tuple[float, ...]
    """Normalisation std the backbone was trained with."""
    crop_pct: float
    """Evaluation centre-crop fraction (shorter side resized to img_size / crop_pct)."""
    new_head: bool
    """True when the head was (re)created here rather than loaded."""


def read_config(path: str | Path) -> dict:
    """`config.json` of an export folder, checked to be a timm-layout ViT export. Raises BackboneError."""
    p = Path(path)
    if not p.is_dir():
        raise BackboneError(f"{p} is not a folder; pass the folder `python -m pretrain.export ... --format timm` wrote")
    if not (p / CONFIG).is_file():
        raise BackboneError(f"{p} has no {CONFIG}: not an export; export with `python -m pretrain.export RUN OUT`")
    try:
        cfg = json.loads((p / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise BackboneError(f"{p / CONFIG} is not valid JSON ({e}); export the checkpoint again") from e
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    if not isinstance(arch, str) or not arch.startswith("vit_"):
        hint = " (a torchvision or Hugging Face export?)" if isinstance(cfg, dict) and arch is None else ""
        raise BackboneError(
            f"{p / CONFIG} does not describe a timm ViT (architecture {arch!r}){hint}; export with --format timm"
        )
    if not (p / WEIGHTS).is_file():
        pickled = [f.name for f in p.glob("*.bin")] + [f.name for f in p.glob("*.pth")]
        extra = f" ({', '.join(pickled)} is pickle and is never loaded)" if pickled else ""
        raise BackboneError(f"{p} has no {WEIGHTS}{extra}; export with `python -m pretrain.export`")
    return cfg


def args_from_config(cfg: dict) -> tuple[str, ViTArgs]:
    """timm's `architecture` + `model_args` -> (our variant name, ViTArgs), head size from `num_classes`.

    The variant is the registered one of the same shape, else the one the architecture name starts from (with the
    shape of `model_args`). Raises BackboneError for an architecture of no registered variant.
    """
    arch = cfg["architecture"]
    spec = TIMM.spec_of(arch)
    if spec is None:
        known = ", ".join(sorted(s.timm for s in SPECS.values() if s.timm))
        raise BackboneError(f"architecture {arch!r} in {CONFIG} is no registered ViT variant; known: {known}")
    m = re.search(r"_(\d+)$", arch)
    margs = dict(cfg.get("model_args") or {})
    known_args = {f.name for f in fields(ViTArgs)}
    over: dict = {k: v for k, v in margs.items() if k in known_args}
    if "global_pool" in margs:
        if margs["global_pool"] not in ("token", "avg"):
            raise BackboneError(f"global_pool {margs['global_pool']!r} is not supported; only 'token' and 'avg'")
        over["pool"] = "token" if margs["global_pool"] == "token" else "gap"
    if "img_size" not in over and m:
        over["img_size"] = int(m.group(1))
    over["num_classes"] = int(cfg.get("num_classes", margs.get("num_classes", 0)) or 0)
    over["representation_size"] = None  # timm ViTs have no pre-logits layer; exports drop ours
    try:
        args = replace(spec.args, **over)
    except TypeError as e:
        raise BackboneError(f"model_args of {arch} do not fit a ViT ({e}); export with --format timm") from e
    return (spec_of_shape(args) or spec).name, args


def load_backbone(
    path: str | Path,
    *,
    num_classes: int | None = None,
    img_size: int | None = None,
    drop_path_rate: float | None = None,
    fresh_head: bool = False,
) -> Backbone:
    """Load an export folder into our VisionTransformer.

    Args:
        path: the folder (`config.json` + `model.safetensors`).
        num_classes: head size; None keeps the saved head (if any). A size other than the saved one builds a new
            zero-initialised head (the ViT paper's fine-tuning head), 0 removes the head.
        img_size: input size; a size other than the saved one resamples the position embedding (bicubic).
        drop_path_rate: stochastic depth for fine-tuning (None: 0).
        fresh_head: build a new zero-initialised head even when the class count equals the saved one.

    Raises:
        BackboneError: not an export folder, unreadable weights, or weights that do not fit the config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    cfg = read_config(p)
    variant, saved = args_from_config(cfg)
    pcfg = cfg.get("pretrained_cfg") or {}
    names = [str(n) for n in (cfg.get("label_names") or pcfg.get("label_names") or [])]
    classes = saved.num_classes if num_classes is None else num_classes
    size = img_size or saved.img_size
    if size <= 0 or size % saved.patch_size:
        raise BackboneError(f"--img-size {size} is not a positive multiple of the patch size {saved.patch_size}")
    try:
        state = load_file(p / WEIGHTS)
    except (OSError, SafetensorError) as e:
        raise BackboneError(f"{p / WEIGHTS} is unreadable ({e}); export the checkpoint again") from e
    new_head = fresh_head or classes != saved.num_classes
    if new_head:  # a different class set: the saved head (if any) means nothing here
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    if "pos_embed" in state and size != saved.img_size:
        state["pos_embed"] = resize_pos_embed(state["pos_embed"].float(), size // saved.patch_size)
    args = replace(saved, img_size=size, num_classes=classes, drop_path_rate=drop_path_rate or 0.0)
    try:
        model = VisionTransformer(args)
    except ValueError as e:
        raise BackboneError(f"{p / CONFIG} describes an impossible ViT ({e})") from e
    want = model.state_dict()
    missing = [k for k in want if k not in state and not (new_head and k.startswith("head."))]
    unexpected = [k for k in state if k not in want]
    wrong = [k for k in state if k in want and state[k].shape != want[k].shape]
    if missing or unexpected or wrong:
        first = (
            f"missing {missing[0]}"
            if missing
            else f"unexpected {unexpected[0]}"
            if unexpected
            else f"shape of {wrong[0]}"
        )
        raise BackboneError(
            f"{p / WEIGHTS} does not fit {p / CONFIG} ({first}; {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong)} of another shape); export the checkpoint again"
        )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=not new_head)
    return Backbone(
        model=model,
        variant=variant,
        class_names=[] if new_head or len(names) != classes else names,
        mean=tuple(pcfg.get("mean", DataConfig.mean)),
        std=tuple(pcfg.get("std", DataConfig.std)),
        crop_pct=float(pcfg.get("crop_pct", DataConfig.eval_crop_pct)),
        new_head=new_head,
    )


def export_files(
    model: VisionTransformer, variant: str, class_names: list[str], mean, std, crop_pct: float, step: int = 0
) -> dict[str, dict]:
    """`config.json` (timm `local-dir:` layout) and `export_info.json` for a model, as `pretrain.export` writes them,
    so `load_backbone`, `pretrain.predict` and timm read a fine-tuned result like an export."""
    meta = {
        "model_name": variant,
        "class_names": list(class_names),
        "config": {"data": {"mean": list(mean), "std": list(std), "eval_crop_pct": crop_pct}},
        "step": step,
    }
    return metadata_files(model.args, meta, ExportOptions(format="timm"))


def save_backbone(model: VisionTransformer, out: str | Path, files: dict[str, dict]) -> None:
    """Write `model.safetensors` and the JSON `files` (name -> content) into `out`, atomically (temp folder, rename)."""
    from safetensors.torch import save_file

    from data_tools.fsutil import atomic_path

    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out) as tmp:
        tmp.mkdir()
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
