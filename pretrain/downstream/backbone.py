"""Load exported weights into our ViT: `vit-finetune` (new head, maybe a new input size) and `vit-predict`
(head as saved) read them through `load_backbone`.

Three sources:
- a timm export folder (`--format timm`): `config.json` in the layout of timm's `local-dir:` source
  (`architecture`, `model_args`, `num_classes`, `label_names`, `pretrained_cfg` with mean/std/input size) and
  `model.safetensors` with timm's parameter names, which are ours (`pretrain.models.vit`);
- a `--format pth` or `--format npz` export folder: `model.pth` / `model.npz` and `export_info.json` (variant,
  arguments, class names, mean/std);
- a bare `.pth` (the PyTorch reproduction's `vit_base_patch16_224_in21k.pth` layout: a state dict in timm's 2020
  names) or `.npz` (the paper's `vit_jax` layout): the variant is the registered one of the weights' shape.

A `.pth` is unpickled with `weights_only=True` only; a `pytorch_model.bin` in a timm folder is never loaded.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from pretrain.config import Config, DataConfig
from pretrain.export.formats import ADAPTERS, CONFIG, INFO, TIMM, WEIGHTS, ExportOptions, metadata_files
from pretrain.export.plain import read_npz, read_pth
from pretrain.models.specs import SPECS, VARIANT_FIELDS, UnknownModelError, ViTArgs, get_spec, spec_of_shape
from pretrain.models.vit import VisionTransformer, resize_pos_embed

PLAIN = (".pth", ".npz")
"""Suffixes of the weights files read without a config (`pth` and `npz` exports, the reproduction's files)."""


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
        raise BackboneError(
            f"{p} is not a folder nor a .pth / .npz file; pass what `python -m pretrain.export ... --format timm` "
            "(or pth, npz) wrote"
        )
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
            f"{p / CONFIG} does not describe a timm ViT (architecture {arch!r}){hint}; export with --format timm, "
            "pth or npz"
        )
    if not (p / WEIGHTS).is_file():
        pickled = [f.name for f in p.glob("*.bin")]
        extra = f" ({', '.join(pickled)} is pickle and is never loaded)" if pickled else ""
        raise BackboneError(f"{p} has no {WEIGHTS}{extra}; export with `python -m pretrain.export`")
    return cfg


def args_from_config(cfg: dict) -> tuple[str, ViTArgs]:
    """timm's `architecture` + `model_args` -> (our variant name, ViTArgs), head size from `num_classes`.

    The variant is the registered one of the shape `model_args` give (timm's generic architecture names variants
    timm lacks). Raises BackboneError for an architecture or a shape of no registered variant: no fallback.
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
    variant = spec_of_shape(args)
    if variant is None:
        shape = ", ".join(f"{k}={getattr(args, k)}" for k in VARIANT_FIELDS)
        raise BackboneError(
            f"model_args in {CONFIG} ({shape}) are the shape of no registered variant; "
            f"known: {', '.join(sorted(SPECS))}"
        )
    return variant.name, args


@dataclass
class Saved:
    """What a weights source holds, in our names, with the model it describes."""

    source: Path
    """The folder or file read."""
    state: dict[str, torch.Tensor]
    """The tensors, named as `VisionTransformer.state_dict()`."""
    variant: str
    """The registered variant (`pretrain.models.specs.SPECS`)."""
    args: ViTArgs
    """The model the tensors describe (head size, pre-logits width, image size as saved)."""
    class_names: list[str]
    """Names of the saved head's classes (empty when unknown or without a head)."""
    mean: tuple[float, ...]
    """Normalisation mean the weights were trained with (the paper's 0.5 when the source does not say)."""
    std: tuple[float, ...]
    """Normalisation std."""
    crop_pct: float
    """Evaluation centre-crop fraction."""


def _read_plain(path: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """(state dict, heads if the file says) of a `.pth` / `.npz` file. Raises BackboneError."""
    try:
        return (read_pth(path), None) if path.suffix == ".pth" else read_npz(path)
    except ValueError as e:
        raise BackboneError(
            f"{e}; export again with `python -m pretrain.export RUN OUT --format {path.suffix[1:]}`"
        ) from None


def args_from_state(state: dict[str, torch.Tensor], heads: int | None, where: Path) -> tuple[str, ViTArgs]:
    """(variant, ViTArgs) of a bare state dict: the registered variant of its patch size, width, depth and MLP
    (and heads, when the file says); head and pre-logits sizes from their tensors. Raises BackboneError."""
    try:
        w, pos, fc1 = state["patch_embed.proj.weight"], state["pos_embed"], state["blocks.0.mlp.fc1.weight"]
    except KeyError as e:
        raise BackboneError(f"{where} is not a ViT state dict in timm's names (no {e.args[0]})") from None
    D, patch = w.shape[0], w.shape[-1]  # (D, C, p, p)
    depth = len({m[1] for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    shape = (patch, D, depth, fc1.shape[0] / D)
    specs = [
        s for s in SPECS.values() if (s.args.patch_size, s.args.embed_dim, s.args.depth, s.args.mlp_ratio) == shape
    ]
    specs = [s for s in specs if heads in (None, s.args.num_heads)]
    if len({s.args.num_heads for s in specs}) != 1:
        known = ", ".join(sorted(SPECS))
        raise BackboneError(
            f"{where} holds a ViT of patch {patch}, width {D}, depth {depth}, MLP {fc1.shape[0]}"
            f"{f', {heads} heads' if heads else ''}, which is {'no' if not specs else 'more than one'} registered "
            f"variant (known: {known}); export it with `python -m pretrain.export --format pth`, which names it"
        )
    head, pre = state.get("head.weight"), state.get("pre_logits.fc.weight")
    args = replace(
        specs[0].args,
        img_size=math.isqrt(pos.shape[1] - 1) * patch,
        in_chans=w.shape[1],
        num_classes=0 if head is None else head.shape[0],
        representation_size=None if pre is None else pre.shape[0],
        pool="gap" if "fc_norm.weight" in state else "token",
    )
    return specs[0].name, args


def _read_export_info(path: Path) -> Saved:
    """A `--format pth|npz` export folder: the weights file named by its format, the model by `export_info.json`."""
    try:
        info = json.loads((path / INFO).read_text())
        fmt, known = info["format"], {f.name for f in fields(ViTArgs)}
        args = ViTArgs(**{k: v for k, v in info["model_args"].items() if k in known})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BackboneError(f"{path / INFO} is unreadable or incomplete ({e}); export the checkpoint again") from None
    if fmt not in ("pth", "npz"):
        raise BackboneError(f"{path} is a --format {fmt} export; fine-tune from --format timm, pth or npz exports")
    try:
        spec = get_spec(info.get("model_name"))
    except UnknownModelError as e:
        raise BackboneError(f"{e} (model_name in {path / INFO})") from None
    if not spec.same_shape(args):
        raise BackboneError(
            f"model_args in {path / INFO} are not the shape of {spec.name}; export the checkpoint again"
        )
    state, _ = _read_plain(path / ADAPTERS[fmt].weights)
    return Saved(
        source=path,
        state=state,
        variant=spec.name,
        args=args,
        class_names=[str(n) for n in info.get("class_names") or []],
        mean=tuple(info.get("mean", DataConfig.mean)),
        std=tuple(info.get("std", DataConfig.std)),
        crop_pct=float(info.get("crop_pct", DataConfig.eval_crop_pct)),
    )


def read_saved(path: str | Path) -> Saved:
    """The weights and model of a timm / pth / npz export folder or a bare `.pth` / `.npz` file (module docstring).
    Raises BackboneError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    defaults = dict(mean=DataConfig.mean, std=DataConfig.std, crop_pct=DataConfig.eval_crop_pct)
    if p.is_file() and p.suffix in PLAIN:
        state, heads = _read_plain(p)
        return Saved(p, state, *args_from_state(state, heads, p), class_names=[], **defaults)
    if p.is_dir() and (p / INFO).is_file() and not (p / CONFIG).is_file():
        return _read_export_info(p)
    cfg = read_config(p)
    variant, args = args_from_config(cfg)
    pcfg = cfg.get("pretrained_cfg") or {}
    try:
        state = load_file(p / WEIGHTS)
    except (OSError, SafetensorError) as e:
        raise BackboneError(f"{p / WEIGHTS} is unreadable ({e}); export the checkpoint again") from e
    return Saved(
        source=p,
        state=state,
        variant=variant,
        args=args,
        class_names=[str(n) for n in (cfg.get("label_names") or pcfg.get("label_names") or [])],
        mean=tuple(pcfg.get("mean", DataConfig.mean)),
        std=tuple(pcfg.get("std", DataConfig.std)),
        crop_pct=float(pcfg.get("crop_pct", DataConfig.eval_crop_pct)),
    )


def load_backbone(
    path: str | Path | Saved,
    *,
    num_classes: int | None = None,
    img_size: int | None = None,
    drop_path_rate: float | None = None,
    fresh_head: bool = False,
) -> Backbone:
    """Load exported weights (`read_saved`) into our VisionTransformer.

    Args:
        path: a timm, pth or npz export folder, a `.pth` / `.npz` file, or what `read_saved` read from one.
        num_classes: head size; None keeps the saved head (if any). A size other than the saved one builds a new
            zero-initialised head without the pre-logits layer (the ViT paper's fine-tuning head), 0 removes both.
        img_size: input size; a size other than the saved one resamples the position embedding (bicubic).
        drop_path_rate: stochastic depth for fine-tuning (None: 0).
        fresh_head: build a new zero-initialised head even when the class count equals the saved one.

    Raises:
        BackboneError: not an export, unreadable weights, or weights that do not fit the model they name.
    """
    saved = path if isinstance(path, Saved) else read_saved(path)
    p = saved.source
    classes = saved.args.num_classes if num_classes is None else num_classes
    size = img_size or saved.args.img_size
    if size <= 0 or size % saved.args.patch_size:
        raise BackboneError(f"--img-size {size} is not a positive multiple of the patch size {saved.args.patch_size}")
    state = saved.state
    new_head = fresh_head or classes != saved.args.num_classes
    if new_head:  # a different class set: the saved head and pre-logits layer (if any) mean nothing here
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "pre_logits."))}
    if "pos_embed" in state and size != saved.args.img_size:
        state["pos_embed"] = resize_pos_embed(state["pos_embed"].float(), size // saved.args.patch_size)
    args = replace(saved.args, img_size=size, num_classes=classes, drop_path_rate=drop_path_rate or 0.0)
    if new_head:
        args = replace(args, representation_size=None)
    try:
        model = VisionTransformer(args)
    except ValueError as e:
        raise BackboneError(f"{p} describes an impossible ViT ({e})") from e
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
            f"the weights in {p} do not fit the model they name ({first}; {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(wrong)} of another shape); export the checkpoint again"
        )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=not new_head)
    return Backbone(
        model=model,
        variant=saved.variant,
        class_names=[] if new_head or len(saved.class_names) != classes else saved.class_names,
        mean=saved.mean,
        std=saved.std,
        crop_pct=saved.crop_pct,
        new_head=new_head,
    )


def export_files(
    model: VisionTransformer, variant: str, class_names: list[str], mean, std, crop_pct: float, step: int = 0
) -> dict[str, dict]:
    """`config.json` (timm `local-dir:` layout) and `export_info.json` for a model, as `pretrain.export` writes them,
    so `load_backbone`, `vit-predict` and timm read a fine-tuned result like an export."""
    meta = {
        "model_name": variant,
        "class_names": list(class_names),
        "config": Config(data=DataConfig(mean=tuple(mean), std=tuple(std), eval_crop_pct=crop_pct)).to_dict(),
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
