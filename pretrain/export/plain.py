"""The formats the paper's own downstream users load: a plain PyTorch `.pth` and the original JAX `.npz`.

- `pth`: `torch.save` of an ordered state dict in timm's 2020 ViT names (ours: `patch_embed.proj.*`, `cls_token`,
  `pos_embed`, `blocks.N.*`, `norm.*`, `pre_logits.fc.*`, `head.*`), the layout of the PyTorch reproduction's
  `vit_base_patch16_224_in21k.pth`. Written tensor by tensor into torch's zip layout with Python's zipfile (torch's
  own zip writer, `PyTorchFileWriter`, raised the peak by the size of the model), so memory holds one tensor, and
  `torch.load(path, weights_only=True)` reads it: the pickle names only tensor-rebuilding globals.
- `npz`: the layout of the paper's `vit_jax` (`embedding/kernel` HWIO, `cls`, `Transformer/posembed_input/...`,
  `Transformer/encoderblock_N/MultiHeadDotProductAttention_1/query|key|value|out/...` with heads split,
  `MlpBlock_3/Dense_0|1/...`, `LayerNorm_0|2`, `encoder_norm`, `pre_logits/...`, `head/...`; dense kernels are
  (in, out)), which timm's `_load_weights`, big_vision and vit_jax read (vit_jax's fine-tuning `load_pretrained`
  only with the head kept: it overwrites `head/*`; docs/export.md has which loader takes which `--head`). `_RULES`
  maps both ways (`read_npz` for fine-tuning).
"""

from __future__ import annotations

import io
import math
import pickle
import re
import struct
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

import numpy as np
import torch

from pretrain.export.base import HEADS, Adapter, ExportError, Metadata
from pretrain.models.specs import ModelSpec, ViTArgs

Plan = dict[str, tuple[torch.Size, torch.dtype]]


def _check(name: str, t: torch.Tensor, want: tuple[str, tuple[torch.Size, torch.dtype]] | None) -> None:
    if want is None or name != want[0] or t.shape != want[1][0] or t.dtype != want[1][1]:
        raise ValueError(f"tensor {name} {tuple(t.shape)} {t.dtype} does not match the plan ({want and want[0]})")


# ---------------------------------------------------------------------------------------------------- .pth


class _Storage:
    """Stands for one tensor's storage in the pickle (written as a persistent id, as torch.save does)."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor:
    """Pickles as torch.save pickles a contiguous tensor: `_rebuild_tensor_v2(storage, 0, size, stride, ...)`."""

    def __init__(self, storage: _Storage, shape: torch.Size) -> None:
        self.storage, self.shape = storage, tuple(shape)

    def __reduce__(self) -> tuple[Any, tuple]:
        stride = tuple(math.prod(self.shape[i + 1 :]) for i in range(len(self.shape)))  # contiguous
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.shape, stride, False, OrderedDict())


class _Pickler(pickle.Pickler):
    _types = torch.storage._dtype_to_storage_type_map()  # torch.float32 -> "FloatStorage", ...

    def persistent_id(self, obj: object) -> tuple | None:
        if isinstance(obj, _Storage):  # ("storage", torch.FloatStorage, key, location, numel) as torch.save
            return ("storage", getattr(torch, self._types[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


_ALIGN = 64
"""torch.save starts every record's data at a multiple of 64 bytes, so `torch.load(mmap=True)` can map it."""


def _record(zf: zipfile.ZipFile, raw: BinaryIO, name: str, size: int) -> IO[bytes]:
    """Open the stored (uncompressed) zip member `name` of `size` bytes for writing, its data 64-byte aligned."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.file_size = size  # known up front: zipfile picks zip64 headers only when needed
    header = 30 + len(name.encode()) + 4  # local file header + name + the padding field's own header
    pad = -(raw.tell() + header) % _ALIGN
    info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # the padding field torch's writer uses ("FB")
    return zf.open(info, "w")


def write_pth(path: str | Path, plan: Plan, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """`torch.save(OrderedDict(tensors), path)` with the names in the model's order, holding one tensor at a time:
    the pickle (known from `plan`) first, then each tensor's bytes as its `data/N` record, in torch's zip layout."""
    storages = {n: _Storage(str(i), dt, math.prod(shape)) for i, (n, (shape, dt)) in enumerate(plan.items())}
    state = OrderedDict((n, _Tensor(storages[n], plan[n][0])) for n in sorted(plan, key=model_order))
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(state)
    records = {"data.pkl": buf.getvalue(), ".format_version": b"1", ".storage_alignment": str(_ALIGN).encode()}
    records["byteorder"] = sys.byteorder.encode()
    archive = Path(path).stem or "archive"  # torch.save's folder name inside the zip; any name loads
    wanted = iter(plan.items())
    with open(path, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, data in records.items():
            with _record(zf, raw, f"{archive}/{name}", len(data)) as f:
                f.write(data)
        for i, (name, t) in enumerate(tensors):
            _check(name, t, next(wanted, None))
            data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()  # the tensor's bytes, no copy
            with _record(zf, raw, f"{archive}/data/{i}", data.nbytes) as f:
                f.write(data)
        with _record(zf, raw, f"{archive}/version", 2) as f:
            f.write(b"3\n")  # the serialization version torch.save writes last
    missing = [n for n, _ in wanted]
    if missing:
        raise ValueError(f"{len(missing)} planned tensors were never written, first {missing[0]}")


def read_pth(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a `.pth` file, unpickled with `weights_only=True` (no code named in the file runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path} is not a loadable weights-only .pth ({str(e).splitlines()[0]})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(state)


class PthAdapter(Adapter):
    """The reproduction's `.pth`: our (timm 2020) names, pre-logits and head included."""

    name = "pth"
    weights = "model.pth"
    class_token_only = True  # the reproduction's ViT classifies the class token
    pre_logits_heads = HEADS

    def rename(self, name: str, t: torch.Tensor, args: ViTArgs, head: str) -> list[tuple[str, torch.Tensor]]:
        return [(name, t)]

    def config_files(self, spec: ModelSpec, args: ViTArgs, md: Metadata) -> dict[str, dict[str, Any]]:
        return {}  # the state dict is all its users read; export_info.json names the model

    def write(self, path: Path, plan: Plan, tensors: Iterator, info: dict[str, str]) -> None:
        write_pth(path, plan, tensors)


# ---------------------------------------------------------------------------------------------------- .npz


@dataclass(frozen=True)
class _Rule:
    """One tensor of ours <-> one (or, for qkv, three) JAX arrays; `{i}`: block index, `{qkv}`: query|key|value."""

    ours: str
    """Our (timm) name."""
    jax: str
    """The vit_jax array name."""
    kind: str
    """How the tensor changes: same | conv (OIHW <-> HWIO) | dense ((out, in) <-> (in, out)) | qkv_kernel |
    qkv_bias | out_kernel (heads split out of a dimension)."""


_BLOCK = "Transformer/encoderblock_{i}/"
_MHA = _BLOCK + "MultiHeadDotProductAttention_1/"
_RULES = (  # in the model's order (`pretrain.models.vit.param_shapes`)
    _Rule("cls_token", "cls", "same"),
    _Rule("pos_embed", "Transformer/posembed_input/pos_embedding", "same"),
    _Rule("patch_embed.proj.weight", "embedding/kernel", "conv"),
    _Rule("patch_embed.proj.bias", "embedding/bias", "same"),
    _Rule("blocks.{i}.norm1.weight", _BLOCK + "LayerNorm_0/scale", "same"),
    _Rule("blocks.{i}.norm1.bias", _BLOCK + "LayerNorm_0/bias", "same"),
    _Rule("blocks.{i}.attn.qkv.weight", _MHA + "{qkv}/kernel", "qkv_kernel"),
    _Rule("blocks.{i}.attn.qkv.bias", _MHA + "{qkv}/bias", "qkv_bias"),
    _Rule("blocks.{i}.attn.proj.weight", _MHA + "out/kernel", "out_kernel"),
    _Rule("blocks.{i}.attn.proj.bias", _MHA + "out/bias", "same"),
    _Rule("blocks.{i}.norm2.weight", _BLOCK + "LayerNorm_2/scale", "same"),
    _Rule("blocks.{i}.norm2.bias", _BLOCK + "LayerNorm_2/bias", "same"),
    _Rule("blocks.{i}.mlp.fc1.weight", _BLOCK + "MlpBlock_3/Dense_0/kernel", "dense"),
    _Rule("blocks.{i}.mlp.fc1.bias", _BLOCK + "MlpBlock_3/Dense_0/bias", "same"),
    _Rule("blocks.{i}.mlp.fc2.weight", _BLOCK + "MlpBlock_3/Dense_1/kernel", "dense"),
    _Rule("blocks.{i}.mlp.fc2.bias", _BLOCK + "MlpBlock_3/Dense_1/bias", "same"),
    _Rule("norm.weight", "Transformer/encoder_norm/scale", "same"),
    _Rule("norm.bias", "Transformer/encoder_norm/bias", "same"),
    _Rule("pre_logits.fc.weight", "pre_logits/kernel", "dense"),
    _Rule("pre_logits.fc.bias", "pre_logits/bias", "same"),
    _Rule("head.weight", "head/kernel", "dense"),
    _Rule("head.bias", "head/bias", "same"),
)
_QKV = ("query", "key", "value")


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(
        re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{qkv\}", "(?P<qkv>" + "|".join(_QKV) + ")")
    )


_OURS = [(_pattern(r.ours), r) for r in _RULES]
_JAX = [(_pattern(r.jax), r) for r in _RULES]


def model_order(name: str) -> tuple[int, int, int]:
    """Sort key putting our tensor names in the model's order (the checkpoint streams them by parameter group)."""
    rule = next((i for i, (p, _) in enumerate(_OURS) if p.fullmatch(name)), len(_OURS))
    block = re.match(r"blocks\.(\d+)\.", name)
    first_block = next(i for i, r in enumerate(_RULES) if r.ours.startswith("blocks."))
    return (first_block, int(block[1]), rule) if block else (rule, 0, 0)


def to_jax(name: str, t: torch.Tensor, num_heads: int) -> list[tuple[str, torch.Tensor]]:
    """One of our tensors -> its JAX array(s), as torch tensors (views; `meta` tensors work for planning)."""
    rule, m = next(((r, m) for p, r in _OURS if (m := p.fullmatch(name))), (None, None))
    if rule is None:
        raise ExportError(f"no .npz mapping for parameter {name!r}; only class-token ViTs export to npz")
    key = rule.jax.replace("{i}", m.groupdict().get("i") or "")
    if rule.kind in ("qkv_kernel", "qkv_bias"):
        D = t.shape[-1] if rule.kind == "qkv_kernel" else t.shape[0] // 3
        shape = (D, num_heads, D // num_heads) if rule.kind == "qkv_kernel" else (num_heads, D // num_heads)
        parts = t.chunk(3, dim=0)  # (3D, D) / (3D,) in q, k, v order
        parts = [(x.T if x.ndim == 2 else x).reshape(shape) for x in parts]  # (D, heads, hd) / (heads, hd)
        return [(key.replace("{qkv}", n), x) for n, x in zip(_QKV, parts, strict=True)]
    if rule.kind == "conv":
        return [(key, t.permute(2, 3, 1, 0))]  # (D, C, p, p) -> (p, p, C, D)
    if rule.kind == "dense":
        return [(key, t.T)]  # (out, in) -> (in, out)
    if rule.kind == "out_kernel":
        D = t.shape[0]
        return [(key, t.T.reshape(num_heads, D // num_heads, D))]  # (D, D) -> (heads, head_dim, D)
    return [(key, t)]


def _from_jax(rule: _Rule, a: torch.Tensor) -> torch.Tensor:
    if rule.kind == "conv":
        return a.permute(3, 2, 0, 1)  # (p, p, C, D) -> (D, C, p, p)
    if rule.kind in ("dense", "qkv_kernel", "out_kernel"):
        return a.reshape(a.shape[0], -1).T if rule.kind == "qkv_kernel" else a.reshape(-1, a.shape[-1]).T
    return a.reshape(-1) if rule.kind == "qkv_bias" else a


def read_npz(path: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """(our state dict, number of heads) from a `.npz` in the JAX layout. Raises ValueError."""
    try:
        arrays = np.load(path, allow_pickle=False)
        items = {k: torch.from_numpy(np.asarray(arrays[k], dtype=np.float32)) for k in arrays.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable .npz ({e})") from None
    state, qkv, heads = {}, {}, None
    for key, a in items.items():
        rule, m = next(((r, m) for p, r in _JAX if (m := p.fullmatch(key))), (None, None))
        if rule is None:
            raise ValueError(f"{path} holds {key!r}, which is not a ViT array of the vit_jax layout")
        name = rule.ours.replace("{i}", m.groupdict().get("i") or "")
        if rule.kind == "qkv_kernel":
            heads = a.shape[1]  # (D, heads, head_dim)
        if rule.kind.startswith("qkv"):
            qkv.setdefault(name, {})[m["qkv"]] = _from_jax(rule, a)
        else:
            state[name] = _from_jax(rule, a)
    for name, parts in qkv.items():
        if sorted(parts) != sorted(_QKV):
            raise ValueError(f"{path} lacks part of {name} (has {', '.join(sorted(parts))})")
        state[name] = torch.cat([parts[n] for n in _QKV])  # (3D, D) / (3D,)
    return state, heads


def write_npz(path: str | Path, plan: Plan, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """`numpy.savez(path, **arrays)`, holding one array at a time: each is one `.npy` member of the zip."""
    wanted = iter(plan.items())
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, t in tensors:
            _check(name, t, next(wanted, None))
            a = t.detach().contiguous().numpy()
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                # header, then the bytes as they are (np.save's write_array stages them through a 16 MiB buffer)
                np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(a))
                f.write(a.data)
    missing = [n for n, _ in wanted]
    if missing:
        raise ValueError(f"{len(missing)} planned tensors were never written, first {missing[0]}")


class NpzAdapter(Adapter):
    """The paper's `vit_jax` `.npz` (float32; numpy has no bfloat16)."""

    name = "npz"
    weights = "model.npz"
    class_token_only = True  # vit_jax's gap head pools after the encoder norm; ours uses fc_norm (timm)
    pre_logits_heads = HEADS
    dtypes = ("float32",)

    def rename(self, name: str, t: torch.Tensor, args: ViTArgs, head: str) -> list[tuple[str, torch.Tensor]]:
        return to_jax(name, t, args.num_heads)

    def config_files(self, spec: ModelSpec, args: ViTArgs, md: Metadata) -> dict[str, dict[str, Any]]:
        return {}

    def write(self, path: Path, plan: Plan, tensors: Iterator, info: dict[str, str]) -> None:
        write_npz(path, plan, tensors)
